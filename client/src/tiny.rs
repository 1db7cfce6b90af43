//! Writes a small random Llama in Hugging Face layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`) for tests and the demo: the same loader reads it as any real model.
//!
//! The tokenizer is a byte-level BPE (GPT-2's byte alphabet, no merges) with `<unk>`, `<s>`,
//! `</s>`, so any UTF-8 text encodes. Weights are uniform with variance 1/fan_in: signals keep
//! unit scale through the layers, so the random base is a fair starting point for LoRA.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{ClientError, Result};
use crate::model::LlamaConfig;
use crate::model::lora::seeded_rng;

/// Special tokens, in id order, before the 256 byte tokens.
const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// Dimensions of the tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 176,
            num_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            seed: 0,
        }
    }
}

/// Writes the model into `dir` (created if missing) and returns its config.
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec) -> Result<LlamaConfig> {
    std::fs::create_dir_all(dir).map_err(ClientError::io(dir))?;
    let vocab_size = SPECIAL_TOKENS.len() + 256;
    let config = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_layers,
        num_attention_heads: spec.num_attention_heads,
        num_key_value_heads: Some(spec.num_key_value_heads),
        head_dim: None,
        vocab_size,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_parameters: None,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        sliding_window: None,
        use_sliding_window: None,
        mlp_bias: false,
        max_position_embeddings: spec.max_position_embeddings,
        tie_word_embeddings: spec.tie_word_embeddings,
        hidden_act: "silu".into(),
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(serde_json::json!(2)),
        dtype: None,
        torch_dtype: None,
        quantization_config: None,
    };
    config
        .validate()
        .map_err(|message| ClientError::Unsupported(format!("tiny model spec: {message}")))?;

    let config_path = dir.join("config.json");
    let config_json = serde_json::to_string_pretty(&config)
        .map_err(|error| ClientError::Unsupported(error.to_string()))?;
    std::fs::write(&config_path, config_json).map_err(ClientError::io(&config_path))?;

    let weights = random_weights(&config, spec.seed)?;
    let weights_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &weights_path)?;

    let tokenizer_path = dir.join("tokenizer.json");
    byte_level_tokenizer()?
        .save(&tokenizer_path, true)
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    Ok(config)
}

pub(crate) fn random_weights(config: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = seeded_rng(seed);
    let device = Device::Cpu;
    let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
        // Uniform(-b, b) has variance b²/3; b = √(3/cols) gives variance 1/fan_in.
        let bound = (3.0 / cols as f32).sqrt();
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Tensor::from_vec(values, (rows, cols), &device)?)
    };
    let hidden = config.hidden_size;
    let q_out = config.num_attention_heads * config.head_dim();
    let kv_out = config.num_kv_heads() * config.head_dim();
    let intermediate = config.intermediate_size;
    let mut weights = HashMap::new();
    weights.insert(
        "model.embed_tokens.weight".to_string(),
        matrix(config.vocab_size, hidden)?,
    );
    for layer in 0..config.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q_out, hidden),
            ("self_attn.k_proj", kv_out, hidden),
            ("self_attn.v_proj", kv_out, hidden),
            ("self_attn.o_proj", hidden, q_out),
            ("mlp.gate_proj", intermediate, hidden),
            ("mlp.up_proj", intermediate, hidden),
            ("mlp.down_proj", hidden, intermediate),
        ] {
            weights.insert(format!("{prefix}.{name}.weight"), matrix(rows, cols)?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            weights.insert(
                format!("{prefix}.{norm}.weight"),
                Tensor::ones(hidden, candle_core::DType::F32, &device)?,
            );
        }
    }
    weights.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(hidden, candle_core::DType::F32, &device)?,
    );
    if !config.tie_word_embeddings {
        weights.insert(
            "lm_head.weight".to_string(),
            matrix(config.vocab_size, hidden)?,
        );
    }
    Ok(weights)
}

/// A byte-level BPE tokenizer with no merges: every byte is one token.
pub fn byte_level_tokenizer() -> Result<Tokenizer> {
    let mut vocab: tokenizers::models::bpe::Vocab = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| ((*token).to_string(), id as u32))
        .collect();
    for (byte, character) in gpt2_byte_alphabet().into_iter().enumerate() {
        vocab.insert(character.to_string(), (SPECIAL_TOKENS.len() + byte) as u32);
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .unk_token("<unk>".into())
        .build()
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    Ok(tokenizer)
}

/// GPT-2's reversible map from the 256 byte values to printable characters, in byte order.
fn gpt2_byte_alphabet() -> Vec<char> {
    let printable = |byte: u32| {
        (u32::from('!')..=u32::from('~')).contains(&byte)
            || (0xA1..=0xAC).contains(&byte)
            || (0xAE..=0xFF).contains(&byte)
    };
    let mut next_unprintable = 0u32;
    (0..256u32)
        .map(|byte| {
            let code = if printable(byte) {
                byte
            } else {
                next_unprintable += 1;
                255 + next_unprintable
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::model::BaseModel;

    #[test]
    fn written_model_loads_and_tokenizes_any_text() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(base.model.config(), &config);
        assert_eq!(base.eos_token_id, 2);
        let text = "Patient reports mild fever — 38.2°C.";
        let encoding = base.tokenizer.encode(text, false).unwrap();
        assert_eq!(encoding.get_ids().len(), text.len(), "one token per byte");
        assert!(encoding.get_ids().iter().all(|id| *id >= 3 && *id < 259));
        let decoded = base.tokenizer.decode(encoding.get_ids(), true).unwrap();
        assert_eq!(decoded, text);
    }

    #[test]
    fn alphabet_is_a_bijection() {
        let alphabet = gpt2_byte_alphabet();
        let unique: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(unique.len(), 256);
        assert_eq!(alphabet[usize::from(b'A')], 'A');
        assert_eq!(alphabet[usize::from(b' ')], 'Ġ');
    }

    /// A Qwen2 config needs q/k/v biases; zero biases reproduce the Llama logits, others change them.
    #[test]
    fn qwen2_biases_are_required_and_applied() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let llama = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let input = Tensor::new(&[[5u32, 80, 81, 3]], &Device::Cpu).unwrap();
        let logits = |base: &BaseModel| {
            base.model
                .forward(&input)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let qwen = LlamaConfig {
            model_type: "qwen2".into(),
            ..config.clone()
        };
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_string(&qwen).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            BaseModel::load(dir.path(), &Device::Cpu),
            Err(ClientError::MissingWeight(name)) if name.ends_with("q_proj.bias")
        ));

        let weights_path = dir.path().join("model.safetensors");
        let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
        let kv_out = config.num_kv_heads() * config.head_dim();
        for layer in 0..config.num_hidden_layers {
            for (module, out) in [
                ("q_proj", config.hidden_size),
                ("k_proj", kv_out),
                ("v_proj", kv_out),
            ] {
                weights.insert(
                    format!("model.layers.{layer}.self_attn.{module}.bias"),
                    Tensor::zeros(out, candle_core::DType::F32, &Device::Cpu).unwrap(),
                );
            }
        }
        candle_core::safetensors::save(&weights, &weights_path).unwrap();
        let zero_bias = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(logits(&zero_bias), logits(&llama));

        weights.insert(
            "model.layers.0.self_attn.v_proj.bias".into(),
            Tensor::ones(kv_out, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&weights, &weights_path).unwrap();
        let biased = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_ne!(logits(&biased), logits(&llama));
    }
}
