#!/usr/bin/env python3
"""Makes the PEFT parity fixtures that `client/tests/peft_parity.rs` checks fedlora against.

Hugging Face transformers + PEFT are the reference: tiny random models and adapters are made
here, their logits recorded, and the Rust test loads the same files and must reproduce the
logits within 1e-4. Both directions:

  1. `make`: random tiny Llama (f32), Qwen2 (f16, attention biases) and Mistral (bf16) checkpoints
     in Hugging Face layout; PEFT adapters on them (plain LoRA on all seven projections, rsLoRA,
     DoRA with perturbed magnitudes, rank_pattern/alpha_pattern, LoRA on Qwen2); Llama 3 rope
     scaling; the logits of every case in `expected.safetensors`.
  2. `cargo test -p fedlora-client --test peft_parity -- --ignored write_our_adapter` writes an
     adapter with fedlora (DoRA + rsLoRA + rank_pattern) into `ours/`.
  3. `ours`: PEFT loads fedlora's adapter and records its logits in `ours.safetensors`.

Run from the repository root with torch, transformers and peft importable (not needed in CI;
the fixtures are committed):

  python3 scripts/peft_parity.py make client/tests/fixtures/peft
  cargo test -p fedlora-client --test peft_parity -- --ignored write_our_adapter
  python3 scripts/peft_parity.py ours client/tests/fixtures/peft

`rope DIR` records, in `rope_scalings.safetensors`, the Llama weights' logits under each RoPE
scaling of `rope_scalings.json` (linear, and YaRN with defaults and with every option set).

`verify DIR [cpu|cuda]` recomputes every committed case with the installed versions (on the GPU
with `cuda`) and fails if a logit moves by 1e-4 or more: the fixtures' stability check.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

# Two rows of 12 token ids below the vocabulary size (259, the tiny model's).
INPUT_IDS = torch.tensor(
    [
        [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108],
        [1, 3, 50, 200, 17, 99, 255, 4, 8, 15, 16, 23],
    ]
)
DIMS = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DEVICE = "cpu"


def load(model_dir):
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.to(DEVICE).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS.to(DEVICE)).logits.float().cpu().contiguous()


def randomize(model, seed):
    """HF initialises N(0, 0.02) weights, zero biases and unit norms: too close to uniform logits
    for a parity test to mean much. Use unit-variance weights, and non-trivial biases and norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            uniform = torch.rand(parameter.shape, generator=generator) * 2 - 1
            if name.endswith("bias"):
                parameter.copy_(0.5 * uniform)
            elif parameter.dim() == 1:  # rms norm weights
                parameter.copy_(1 + 0.2 * uniform)
            else:
                bound = (3.0 / parameter.shape[1]) ** 0.5
                parameter.copy_(bound * uniform)


def make_model(config, seed, dtype, out_dir):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / "generation_config.json").unlink(missing_ok=True)


def make(root):
    root.mkdir(parents=True, exist_ok=True)
    expected = {"input_ids": INPUT_IDS.to(torch.int64)}
    make_model(LlamaConfig(**DIMS, rms_norm_eps=1e-5, rope_theta=10000.0), 1, torch.float32, root / "llama")
    make_model(
        Qwen2Config(**DIMS, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False),
        2,
        torch.float16,
        root / "qwen2",
    )
    make_model(
        MistralConfig(**DIMS, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096),
        3,
        torch.bfloat16,
        root / "mistral",
    )
    for name in ["llama", "qwen2", "mistral"]:
        expected[name] = logits(load(root / name))

    # Llama 3 rope scaling on the Llama weights, with short original context so that the
    # smoothed and the scaled frequency bands both occur within 12 positions.
    rope_scaling = json.loads((root / "llama3_rope.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        scaled = Path(scratch) / "llama3"
        shutil.copytree(root / "llama", scaled)
        config = json.loads((scaled / "config.json").read_text())
        config.update(rope_scaling)
        (scaled / "config.json").write_text(json.dumps(config))
        expected["llama3_rope"] = logits(load(scaled))

    def adapter(name, model_name, **options):
        torch.manual_seed(100 + len(expected))
        config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **options)
        model = get_peft_model(load(root / model_name), config)
        if options.get("use_dora"):
            # PEFT starts the magnitude at the row norms, where DoRA equals LoRA: move it away.
            generator = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for key, parameter in model.named_parameters():
                    if "lora_magnitude_vector" in key:
                        parameter.mul_(0.5 + torch.rand(parameter.shape, generator=generator))
        model.eval()
        expected[name] = logits(model)
        model.save_pretrained(root / name)
        (root / name / "README.md").unlink(missing_ok=True)

    adapter("lora", "llama", r=4, lora_alpha=8, target_modules=ALL_MODULES)
    adapter("rslora", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    adapter("dora", "llama", r=4, lora_alpha=8, target_modules=ALL_MODULES, use_dora=True, lora_dropout=0.1)
    adapter(
        "rank_pattern",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.down_proj": 6, "q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    adapter("qwen2_lora", "qwen2", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    save_file(expected, str(root / "expected.safetensors"), metadata=versions())


def with_config(root, patch, scratch):
    """The Llama fixture's directory copied into `scratch`, its config updated with `patch`."""
    scaled = Path(scratch) / "llama_patched"
    shutil.rmtree(scaled, ignore_errors=True)
    shutil.copytree(root / "llama", scaled)
    config = json.loads((scaled / "config.json").read_text())
    config.update(patch)
    (scaled / "config.json").write_text(json.dumps(config))
    return scaled


def rope_scalings(root):
    cases = json.loads((root / "rope_scalings.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        return {name: logits(load(with_config(root, patch, scratch))) for name, patch in cases.items()}


def rope(root):
    save_file(rope_scalings(root), str(root / "rope_scalings.safetensors"), metadata=versions())


def ours(root):
    model = PeftModel.from_pretrained(load(root / "llama"), root / "ours").eval()
    save_file({"ours": logits(model)}, str(root / "ours.safetensors"), metadata=versions())


def verify(root):
    from safetensors.torch import load_file

    expected = load_file(str(root / "expected.safetensors"))
    expected.update(load_file(str(root / "ours.safetensors")))
    expected.update(load_file(str(root / "rope_scalings.safetensors")))
    got = {name: logits(load(root / name)) for name in ["llama", "qwen2", "mistral"]}
    with tempfile.TemporaryDirectory() as scratch:
        scaled = Path(scratch) / "llama3"
        shutil.copytree(root / "llama", scaled)
        config = json.loads((scaled / "config.json").read_text())
        config.update(json.loads((root / "llama3_rope.json").read_text()))
        (scaled / "config.json").write_text(json.dumps(config))
        got["llama3_rope"] = logits(load(scaled))
    got.update(rope_scalings(root))
    for case, base in [("lora", "llama"), ("rslora", "llama"), ("dora", "llama"),
                       ("rank_pattern", "llama"), ("qwen2_lora", "qwen2"), ("ours", "llama")]:
        got[case] = logits(PeftModel.from_pretrained(load(root / base), root / case).to(DEVICE).eval())
    worst = 0.0
    for case, value in got.items():
        difference = float((value - expected[case]).abs().max())
        worst = max(worst, difference)
        print(f"{case:14s} max |logit difference| {difference:.2e}")
    print(f"on {DEVICE} with {versions()}: worst {worst:.2e}")
    if worst >= 1e-4:
        sys.exit("fixtures not reproduced within 1e-4")


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("make", "ours", "rope", "verify"):
        sys.exit(__doc__)
    torch.set_num_threads(1)
    if sys.argv[1] == "verify":
        DEVICE = sys.argv[3] if len(sys.argv) == 4 else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        verify(Path(sys.argv[2]))
    else:
        {"make": make, "ours": ours, "rope": rope}[sys.argv[1]](Path(sys.argv[2]))
        print(f"wrote fixtures in {sys.argv[2]} with {versions()}")
