#!/usr/bin/env python3
"""Writes client/tests/fixtures/gguf_spm/vocab.json: a small SentencePiece BPE model trained here
the way Llama 2's tokenizer was configured (BPE, byte fallback, digits split, no normalisation,
whitespace kept), exported as a GGUF file's tokenizer metadata would hold it (llama.cpp's
convert script: pieces, scores, token types), with SentencePiece's own ids for sample texts.

`gguf::tests::sentencepiece_gguf_tokenizer_matches_sentencepiece` rebuilds the tokenizer from
that metadata and must give the same ids. Needs `pip install sentencepiece`; not run by CI.

    python3 scripts/gguf_spm_fixture.py
"""
import io
import json
import pathlib

import sentencepiece as spm

CORPUS = """
The patient was admitted on 12 March 2024 with a temperature of 38.5 degrees.
Blood pressure: 120/80 mmHg. Heart rate 72 bpm; respiratory rate 16.
The bank approved the loan of 250,000 euros at a fixed rate of 3.1% for 25 years.
Federated learning trains a shared model while the data stays where it is.
Low-rank adaptation freezes the base weights and learns two small matrices per layer.
def forward(self, x):
    return self.norm(x + self.attention(x))
Questions? Ask the on-call physician, Dr. Müller, or the night nurse.
Le modèle apprend sans que les données quittent l'hôpital.
""".strip().splitlines()

TEXTS = [
    "Hello world",
    "The patient was admitted on 12 March 2024.",
    " leading space and  two spaces",
    "tabs\tand\nnewlines\n\n",
    "def f(x):\n    return x * 2",
    "Müller — 東京 🚑",
    "3.14159 + 2,718 = 5.85959",
    "",
    "   ",
    "a  b   c",
]
# Not "</s>" inside a text: SentencePiece reads it as characters, while fedlora (like the
# tokenizer.json of Llama 2 and llama.cpp with special tokens parsed) matches control tokens whole,
# so that a rendered chat template's <s> and </s> become BOS and EOS.

# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def main() -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        elif sp.is_unused(i):
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    cases = [{"text": text, "ids": sp.encode(text)} for text in TEXTS]
    out = pathlib.Path(__file__).resolve().parent.parent / "client/tests/fixtures/gguf_spm"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps(
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": pieces,
                "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types,
                "cases": cases,
            },
            ensure_ascii=False,
            indent=0,
        )
        + "\n"
    )
    print(f"{len(pieces)} pieces, {len(cases)} cases -> {out / 'vocab.json'}")


if __name__ == "__main__":
    main()
