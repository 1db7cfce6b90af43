#!/usr/bin/env python3
"""The PyTorch + PEFT side of `fedlora bench-train`: the same model shapes, LoRA, batch and
optimizer, on random tokens, on the CPU; the base model in float32 or (--dtype bf16) bfloat16, the
LoRA factors float32 either way. Prints one line like fedlora's.

  OMP_WAIT_POLICY=PASSIVE python3 scripts/bench_peft.py --preset reference --threads 2 [--dtype bf16]

Set OMP_WAIT_POLICY=PASSIVE before Python starts: with PyTorch's default spin-waiting, 2 threads
on a 2-core machine run several times slower. scripts/bench_vs_peft.sh runs both sides.
"""

import argparse
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # fedlora's TrainBench::reference: hidden 512, 8 layers, 8 heads, intermediate 1408, vocab
    # 32000 untied; LoRA r=16 alpha=32 on q,k,v,o; batch 8 x 128.
    "reference": dict(
        model=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=1408, vocab_size=32000, tie_word_embeddings=False),
        lora=dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        batch=8, seq=128,
    ),
    # TrainBench::smollm2: SmolLM2-135M's shapes; LoRA r=8 on q,v; batch 4 x 64.
    "smollm2": dict(
        model=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        batch=4, seq=64,
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                        help="bf16: frozen base weights in bfloat16 (LoRA factors stay float32, as PEFT keeps them)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**preset["model"], max_position_embeddings=2048, rms_norm_eps=1e-5)
    base = LlamaForCausalLM(config)
    if args.dtype == "bf16":
        base = base.to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **preset["lora"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    batch, seq = preset["batch"], preset["seq"]
    tokens = torch.randint(0, config.vocab_size, (batch * 4, seq + 1))

    def step(index):
        rows = torch.randint(0, tokens.shape[0], (batch,))
        window = tokens[rows]
        loss = model(input_ids=window[:, :-1], labels=window[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(args.warmup):
        step(index)
    started = time.perf_counter()
    for index in range(args.steps):
        step(index)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(
        f"peft {args.preset}: {batch * seq * args.steps / seconds:.1f} tokens/s "
        f"({seconds / args.steps:.3f} s/step over {args.steps} steps, batch {batch} x {seq}, "
        f"{args.threads} threads, {args.dtype} base), peak rss {peak_mib} MiB, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
