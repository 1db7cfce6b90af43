//! Serde mirror of a Hugging Face Llama-family `config.json`, and its checked runtime form.

use std::path::Path;

use fedlora_proto::adapter::ModelDims;
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};

/// The fields of `config.json` that a Llama-family decoder needs. Unknown fields are ignored:
/// real configs carry many we do not use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// An id or a list of ids in real configs.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(ClientError::io(path))?;
        let config: Self = serde_json::from_str(&text).map_err(|error| ClientError::Config {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
        config.validate().map_err(|message| ClientError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The first end-of-sequence id, if the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(number)) => number.as_u64().map(|id| id as u32),
            Some(serde_json::Value::Array(ids)) => ids
                .first()
                .and_then(serde_json::Value::as_u64)
                .map(|id| id as u32),
            _ => None,
        }
    }

    pub fn dims(&self) -> ModelDims {
        ModelDims {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
        }
    }

    /// Names the first thing this engine cannot run, as a lowercase message.
    pub fn validate(&self) -> std::result::Result<(), String> {
        const FAMILY: [&str; 4] = ["llama", "mistral", "qwen2", "smollm"];
        if !FAMILY.contains(&self.model_type.as_str()) {
            return Err(format!(
                "model_type {:?} is not a llama-family decoder",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (silu only)",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.model_type == "qwen2" {
            return Err("attention biases (qwen2) are not supported yet".into());
        }
        if self
            .rope_scaling
            .as_ref()
            .is_some_and(|value| !value.is_null())
        {
            return Err("rope_scaling is not supported yet".into());
        }
        if self.num_attention_heads == 0 || self.num_kv_heads() == 0 {
            return Err("attention heads must be at least 1".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rope",
                self.head_dim()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn parses_a_smollm2_style_config() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,
            "eos_token_id":[2, 0],"torch_dtype":"bfloat16","rope_scaling":null}"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        config.validate().unwrap();
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.num_kv_heads(), 3);
        assert_eq!(config.eos_token_id(), Some(2));
        assert_eq!(config.rope_theta, 100_000.0);
        assert!(config.tie_word_embeddings);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let json = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":10}"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        assert!(config.validate().unwrap_err().contains("gpt2"));
    }
}
