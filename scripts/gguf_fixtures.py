#!/usr/bin/env python3
"""Writes the GGUF fixtures under client/tests/fixtures/gguf/, with llama.cpp's own Python
library (`gguf`) and Hugging Face transformers as the references:

  models  `llama.gguf`, `qwen2.gguf`: the tiny random Llama and Qwen2 checkpoints of
          client/tests/fixtures/peft (made by scripts/peft_parity.py) written as llama.cpp's
          converter writes them (convert_hf_to_gguf.py: tensor names from `gguf.TENSOR_NAMES`,
          Llama's q/k rows and biases permuted for its interleaved RoPE, Qwen2's not, norms and
          biases in F32); `llama_bias.gguf`, a tiny Llama with `attention_bias` made here;
          `qwen2_q4_0.gguf`, the Qwen2 with Q4_0 projections (where the input width fits its
          blocks). The script loads each file back with transformers' own GGUF reader
          (`from_pretrained(..., gguf_file=...)`) and checks that it gives transformers' logits of
          the Hugging Face checkpoint within 1e-4; `expected.safetensors` holds the logits of
          the two that client/tests/fixtures/peft/expected.safetensors lacks (the bias Llama's
          checkpoint, and the Q4_0 file as transformers dequantizes it). The vocabulary is the
          tiny models' 259 ids as a SentencePiece one (<unk>, <s>, </s>, 256 byte tokens).
  vocab   `bpe_vocab.json`: a small byte-level BPE vocabulary (trained here with `tokenizers`, plus
          one token no merge reaches, one merge made by hand, a user-defined and two control
          tokens) as GGUF metadata holds it, and, for every `tokenizer.ggml.pre` name fedlora
          reads, the ids the reference gives for sample texts. The reference is transformers'
          GGUF tokenizer (transformers/integrations/gguf/gguf_tokenizer_mapping.py, which carries
          the split regexes of Llama 3, Qwen2, Qwen3.5, GPT-4o and Mistral's Tekken), with
          llama.cpp's `ignore_merges` (llama-vocab.cpp: the Llama 3 names and `tekken` take a
          pre-token whole from the vocabulary before merging). Where transformers has no entry
          for a name llama.cpp knows, the reference is built from llama.cpp's regex list in the
          same way: digits one by one before GPT-2's split (SmolLM's
          tokenizer.json; llama.cpp's `smollm`, `starcoder`, `refact`, `command-r`, ...),
          Qwen2's split for `stablelm2`, DeepSeek LLM's six splits and DeepSeek Coder's five.
          Beside the ids, the file holds the pieces each pre-tokenizer cuts the texts into (ids
          show a split only where a merge crosses it). The script checks that the sample texts
          tell every two kinds of pre-tokenizer apart.

`gguf::tests` reads these files and must reproduce the logits and ids. Needs `pip install torch
transformers peft gguf` (transformers 5.24 and gguf 0.19 made the committed files; peft because
the tiny models' settings come from scripts/peft_parity.py); not run by CI:

    python3 scripts/gguf_fixtures.py models
    python3 scripts/gguf_fixtures.py vocab
"""
import json
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from peft_parity import DIMS, INPUT_IDS, load, logits, make_model

ROOT = Path(__file__).resolve().parent.parent
PEFT = ROOT / "client/tests/fixtures/peft"
OUT = ROOT / "client/tests/fixtures/gguf"

# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def llama_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


HF_TO_GGUF = {
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
}


def gguf_name(hf_name):
    names = gguf.TENSOR_NAMES
    top = {
        "model.embed_tokens.weight": names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight",
        "model.norm.weight": names[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight",
        "lm_head.weight": names[gguf.MODEL_TENSOR.OUTPUT] + ".weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return names[HF_TO_GGUF[module]].format(bid=int(layer)) + "." + kind


def write_model(model_dir, path, quantized=None):
    """`model_dir`'s checkpoint as llama.cpp's converter writes it; with `quantized` (a
    GGMLQuantizationType), projections whose input width fits its blocks in that type."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"fedlora tiny {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config["hidden_size"] // heads)
    # The tiny models' 259 ids: a SentencePiece vocabulary of three specials and 256 bytes.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    for hf_name, tensor in sorted(load_file(model_dir / "model.safetensors").items()):
        data = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_permute(data, heads, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_permute(data, heads, kv_heads)
        if data.ndim == 1:  # norms and biases: F32, as the converter keeps them
            data = data.astype(np.float32)
        block = quantized and gguf.GGML_QUANT_SIZES[quantized][0]
        if quantized and hf_name.endswith("_proj.weight") and data.shape[1] % block == 0:
            packed = gguf.quants.quantize(data.astype(np.float32), quantized)
            writer.add_tensor(gguf_name(hf_name), packed, raw_dtype=quantized)
        else:
            writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_logits(path, config=None):
    """transformers' logits of the GGUF file `path`; `config` (a Hugging Face config) replaces
    what transformers reads from the metadata, where that misses something (Llama's
    `attention_bias`: llama.cpp loads the biases, transformers' GGUF config leaves them out)."""
    options = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager", **options
    ).eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def models():
    """The PEFT fixtures' Llama and Qwen2 (whose transformers logits are in
    fixtures/peft/expected.safetensors), a Llama with `attention_bias` (biases on q/k/v/o, q/k's
    permuted too) and the Qwen2 with Q4_0 projections; the last two's logits go into
    fixtures/gguf/expected.safetensors: transformers' of the Hugging Face checkpoint for the
    Llama, transformers' of the GGUF file itself for the Q4_0 Qwen2 (each reader dequantizes the
    same blocks)."""
    expected = load_file(PEFT / "expected.safetensors")
    assert torch.equal(expected["input_ids"], INPUT_IDS)
    OUT.mkdir(parents=True, exist_ok=True)
    ours = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        make_model(LlamaConfig(**DIMS, attention_bias=True, rms_norm_eps=1e-5), 4, torch.float32,
                   scratch / "llama_bias")
        expected["llama_bias"] = logits(load(scratch / "llama_bias"))
        ours["llama_bias"] = expected["llama_bias"]
        cases = [
            ("llama", PEFT / "llama", None),
            ("qwen2", PEFT / "qwen2", None),
            ("llama_bias", scratch / "llama_bias", None),
            ("qwen2_q4_0", PEFT / "qwen2", gguf.GGMLQuantizationType.Q4_0),
        ]
        for name, model_dir, quantized in cases:
            path = scratch / f"{name}.gguf"
            write_model(model_dir, path, quantized)
            config = AutoConfig.from_pretrained(model_dir) if name == "llama_bias" else None
            got = gguf_logits(path, config)
            if quantized is None:
                difference = (got - expected[name]).abs().max().item()
                print(f"{name}: transformers' GGUF reader against its HF checkpoint: {difference:.2e}")
                if not difference < 1e-4:
                    sys.exit(f"{name}: the GGUF file does not hold the checkpoint ({difference})")
            else:
                ours[name] = got
                drift = (got - expected[model_dir.name]).abs().max().item()
                print(f"{name}: quantized, {drift:.2e} from the f16 checkpoint's logits")
            (OUT / path.name).write_bytes(path.read_bytes())
            print(f"  -> {OUT / path.name} ({path.stat().st_size} bytes)")
    save_file({name: tensor.contiguous() for name, tensor in ours.items()}, OUT / "expected.safetensors")


CORPUS = """
The patient was admitted on 12 March 2024 with a temperature of 38.5 degrees.
Blood pressure: 120/80 mmHg. Heart rate 72 bpm; respiratory rate 16. Ref 1234567.
The bank approved the loan of 250,000 euros at a fixed rate of 3.1% for 25 years.
Federated learning trains a shared model while the data stays where it is.
HelloWorld, camelCase and XMLHttpRequest are names; so are iPhone and McDonald.
def forward(self, x):
    return self.norm(x + self.attention(x))  # path/to/file.txt
She'll say we've done it; THEY'RE sure it's fine. I'M here. Don't.
Questions? Ask the on-call physician, Dr. Müller, or the night nurse in Straße 5.
Le modèle apprend sans que les données quittent l'hôpital. Naïve café.
東京は晴れ。２０２４年 🚑 emergency\t\ttabs
""".strip().splitlines()

# Sample texts holding these are kept from training: their tokens are made by hand below, or the
# texts came after the vocabulary, which must stay as it was.
UNTRAINED = ["quizzical", "<think>", "a\u0301", "\u2126"]

TEXTS = [
    "Hello world 12345 don't\n\n",
    " HELLO 12 1234567 DON'T\r\n\n  x",
    "HelloWorld camelCase XMLHttpRequest iPhone McDonald",
    "path/to/file.txt // comment\n/* c */",
    "naïve café Straße Ölfeld",
    "e\u0301 combining, \u01c5 titlecase",
    "東京は晴れ 123 ２０２４",
    "🚑 emoji\tand tabs\t\t",
    "   leading and trailing   ",
    "she'll we've I'M it's THEY'RE",
    "<|endoftext|>after <|im_start|>special",
    " quizzical",
    "rate 3.1% for 25 years.",
    "<think>\nthe dose</think> ok",
    "नमस्ते 한국어 ㄱㄴ ㈠⺀ 東京",
    "",
    "la\u0301piz a\u0301 e\u0301",
    # Letters DeepSeek LLM's split lists that Unicode normalization would turn into others (ohm,
    # kelvin, Greek extended), each after two spaces (a later split cuts them from one), full-width
    # letters and punctuation.
    "5  \u2126 at 300  \u212a:  \u1fd3  \u1fbe  \u1f7d [x]^{y}_z ｆｕｌｌ－ｗｉｄｔｈ！ ok",
]

# fedlora's pre-tokenizer kinds, each with the llama.cpp names it reads (client/src/model/gguf.rs).
KINDS = {
    "gpt2": ["gpt-2", "default", "phi-2", "mpt", "olmo", "jais"],
    "digits": ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
    "llama3": [
        "llama-bpe",
        "llama3",
        "llama-v3",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
    ],
    "llama3-merges": ["dbrx", "smaug-bpe"],
    "qwen2": ["qwen2", "deepseek-r1-qwen", "stablelm2", "kormo", "megrez", "f2llmv2"],
    "qwen35": ["qwen35"],
    "tekken": ["tekken"],
    "gpt-4o": ["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
    "deepseek-coder": ["deepseek-coder"],
    "deepseek-llm": ["deepseek-llm"],
}
# llama.cpp's regex list for `deepseek-coder` (llama-vocab.cpp), each split in turn (`\p{N}`: digits
# one by one); transformers has no entry for the name.
DEEPSEEK_CODER_SPLITS = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}",
]
# llama.cpp's regex list for `deepseek-llm` (llama-vocab.cpp; DeepSeek LLM's tokenizer.json splits
# alike): line breaks, runs of Latin, Greek, Cyrillic and other cased letters with one leading
# space, ASCII and full-width punctuation runs likewise, trailing spaces, CJK and Hangul runs, digit
# runs. transformers has no entry for the name.
DEEPSEEK_LLM_SPLITS = [
    r"[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
]
# llama.cpp's `ignore_merges` names (llama-vocab.cpp).
IGNORE_MERGES = set(KINDS["llama3"]) | {"tekken"}


def reference(name, tokenizer_dict):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _QWEN2_SPLIT,
        GGUF_PRE_TOKENIZER_SPLITS,
        convert_gguf_tokenizer,
    )

    backend, _ = convert_gguf_tokenizer("llama", dict(tokenizer_dict, pre_tokenizer_type=name))
    if name in KINDS["digits"]:
        # SmolLM's tokenizer.json; llama.cpp's regexes "\p{N}", then GPT-2's.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif name in KINDS["deepseek-coder"] or name in KINDS["deepseek-llm"]:
        splits = DEEPSEEK_CODER_SPLITS if name in KINDS["deepseek-coder"] else DEEPSEEK_LLM_SPLITS
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif name not in GGUF_PRE_TOKENIZER_SPLITS and name in KINDS["qwen2"]:
        # llama.cpp reads these with Qwen2's regex; transformers lists only some of them.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if name in IGNORE_MERGES:
        backend.model.ignore_merges = True
    return backend


def vocab():
    from tokenizers import Tokenizer, models as tok_models, trainers

    specials = ["<|endoftext|>", "<|im_start|>"]
    # Merges learned under several splits (GPT-2's, Llama 3's, Qwen2's, Tekken's, and none at
    # all), so that pieces one pre-tokenizer keeps whole and another cuts have merges of their own.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _LLAMA3_SPLIT,
        _QWEN2_SPLIT,
        _TEKKEN_SPLIT,
    )

    def split(pattern):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    splits = [
        (pre_tokenizers.ByteLevel(add_prefix_space=False), 700),
        (split(_LLAMA3_SPLIT), 700),
        (split(_QWEN2_SPLIT), 700),
        (split(_TEKKEN_SPLIT), 700),
        (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), 420),
    ]
    tokens = list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    for pre_tokenizer, size in splits:
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=specials,
            show_progress=False,
        )
        trained = Tokenizer(tok_models.BPE())
        trained.pre_tokenizer = pre_tokenizer
        seen = [text for text in TEXTS if not any(word in text for word in UNTRAINED)]
        trained.train_from_iterator((CORPUS + seen) * 4, trainer)
        for merge in json.loads(trained.to_str())["model"]["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            if left + right not in tokens:
                tokens.append(left + right)
                merges.append(f"{left} {right}")
    # In the vocabulary but reachable by no merge: only `ignore_merges` finds it whole.
    assert "Ġquizzical" not in tokens
    tokens.append("Ġquizzical")
    # An added token not marked special (llama.cpp's USER_DEFINED), as Qwen2's <tool_call> or
    # DeepSeek-R1's <think>: matched whole, by llama.cpp and transformers alike.
    assert "<think>" not in tokens
    tokens.append("<think>")
    # " a" and a combining acute accent: one piece for Qwen3.5's split (letters with their marks),
    # two for Qwen2's, so this merge tells them apart.
    assert {"Ġa", "Ìģ"} <= set(tokens) and "ĠaÌģ" not in tokens
    tokens.append("ĠaÌģ")
    merges.append("Ġa Ìģ")
    types = [
        CONTROL if token in specials else USER_DEFINED if token == "<think>" else NORMAL
        for token in tokens
    ]
    tokenizer_dict = {
        "tokenizer_type": "gpt2",
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
    }
    cases = {}
    pieces = {}
    for names in KINDS.values():
        for name in names:
            backend = reference(name, tokenizer_dict)
            cases[name] = [backend.encode(text, add_special_tokens=False).ids for text in TEXTS]
            # The split alone (byte-level pieces), which ids show only where a merge crosses it.
            pieces[name] = [
                [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)] for text in TEXTS
            ]
    # Every two kinds give different ids on some sample text, so a name read as the wrong kind
    # fails the Rust test; names of one kind agree.
    kinds = {kind: cases[names[0]] for kind, names in KINDS.items()}
    for kind, names in KINDS.items():
        for name in names:
            assert cases[name] == kinds[kind], f"{name} differs from {names[0]}"
        for other in KINDS:
            if other != kind:
                assert kinds[other] != kinds[kind], f"the texts do not tell {kind} from {other}"
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bpe_vocab.json"
    path.write_text(
        json.dumps(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.merges": merges,
                "texts": TEXTS,
                "ids": cases,
                "pieces": pieces,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        + "\n"
    )
    print(f"{len(tokens)} tokens, {len(merges)} merges, {len(cases)} names -> {path}")


if __name__ == "__main__":
    {"models": models, "vocab": vocab}[sys.argv[1]]()
