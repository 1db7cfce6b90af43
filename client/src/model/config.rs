//! Serde mirror of a Hugging Face Llama-family `config.json`, and its checked runtime form.

use std::path::Path;

use fedlora_proto::adapter::ModelDims;
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};

/// The fields of `config.json` that a Llama-family decoder needs. Unknown fields are ignored:
/// real configs carry many we do not use. Absent optional fields stay absent when written (a
/// merged export's config): transformers reads a `"head_dim": null` as a head size of None.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `rope_theta` and the scaling here instead (see [`LlamaConfig::normalize`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// A pretraining context given beside the scaling (Phi-3 style); transformers lets it
    /// override the scaling's own for llama3 and yarn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Rotary embeddings on part of each head only (not supported unless 1: refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Mistral's (and Qwen2's, with `use_sliding_window`) attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Biases on the MLP projections (not supported: refused).
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// An id or a list of ids in real configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    /// The weights' dtype (`"bfloat16"`), as transformers ≥ 4.56 writes it; kept so that a
    /// merged export can say what it wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// The same, as transformers before 4.56 (and most published checkpoints) wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A pre-quantized checkpoint's method (GPTQ, AWQ, bitsandbytes, FP8, ...): refused, since
    /// its weights are not the float matrices this engine reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

/// The ids of a `config.json` or `generation_config.json` token field: an id or a list of ids.
pub fn token_ids(value: &serde_json::Value) -> Vec<u32> {
    let id = |value: &serde_json::Value| value.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        serde_json::Value::Array(ids) => ids.iter().filter_map(id).collect(),
        other => id(other).into_iter().collect(),
    }
}

/// Llama 3's `rope_scaling` (`rope_type: "llama3"`): long wavelengths are stretched by
/// `factor`, short ones kept, and the band between interpolated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl Llama3RopeScaling {
    /// Applies the scaling to one inverse frequency, as Hugging Face's
    /// `_compute_llama3_parameters` does.
    pub fn scale(&self, inverse_frequency: f64) -> f64 {
        let original = self.original_max_position_embeddings as f64;
        let low_freq_wavelen = original / self.low_freq_factor;
        let high_freq_wavelen = original / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inverse_frequency;
        if wavelen < high_freq_wavelen {
            inverse_frequency
        } else if wavelen > low_freq_wavelen {
            inverse_frequency / self.factor
        } else {
            let smooth = (original / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inverse_frequency / self.factor + smooth * inverse_frequency
        }
    }
}

impl Llama3RopeScaling {
    /// The parameters Meta's Llama 3.1, 3.2 and 3.3 use: low 1, high 4, 8192 original positions.
    const META_LOW: f64 = 1.0;
    const META_HIGH: f64 = 4.0;
    const META_ORIGINAL: usize = 8192;

    /// Recovers the scaling from a GGUF's `rope_freqs.weight`: llama.cpp's converter stores, for
    /// each frequency, the divisor `frequency / scale(frequency)` instead of the parameters. Meta's
    /// low/high/original with the largest divisor as the factor are accepted when they reproduce
    /// every divisor (to 1e-4, the tensor is f32); `None` otherwise.
    pub fn from_gguf_divisors(divisors: &[f32], rope_theta: f64, head_dim: usize) -> Option<Self> {
        if divisors.len() != head_dim / 2 || divisors.is_empty() {
            return None;
        }
        let factor = divisors.iter().copied().fold(f32::MIN, f32::max);
        let scaling = Self {
            factor: f64::from(factor),
            low_freq_factor: Self::META_LOW,
            high_freq_factor: Self::META_HIGH,
            original_max_position_embeddings: Self::META_ORIGINAL,
        };
        let reproduced = divisors.iter().enumerate().all(|(index, divisor)| {
            let frequency = 1.0 / rope_theta.powf(2.0 * index as f64 / head_dim as f64);
            let expected = frequency / scaling.scale(frequency);
            (expected - f64::from(*divisor)).abs() <= 1e-4 * expected
        });
        reproduced.then_some(scaling)
    }

    /// As `config.json`'s `rope_scaling`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        })
    }
}

/// YaRN (`rope_type: "yarn"`, Peng et al. 2023): frequencies with fewer than `beta_slow`
/// rotations over the original context are interpolated (divided by `factor`), those with more
/// than `beta_fast` kept, the band between ramped; cos and sin are scaled by `attention_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnRopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub attention_factor: f64,
    /// Round the ramp's ends outwards to whole dimensions (transformers' default).
    pub truncate: bool,
}

impl YarnRopeScaling {
    /// Reads `rope_scaling` as transformers' `_compute_yarn_parameters` does: a missing
    /// `original_max_position_embeddings` is the model's context, a null `factor` the ratio of
    /// the two (a missing one is refused, as transformers refuses it), a missing
    /// `attention_factor` `0.1·ln(factor) + 1` (or the ratio of that with `mscale` and with
    /// `mscale_all_dim`, when both are given), `beta_fast`/`beta_slow` 32 and 1 when missing or
    /// zero, `truncate` true when missing (and false when null, as Python reads it).
    fn from_json(
        value: &serde_json::Value,
        max_position_embeddings: usize,
    ) -> std::result::Result<Self, String> {
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64);
        let original = match value.get("original_max_position_embeddings") {
            None | Some(serde_json::Value::Null) => max_position_embeddings,
            Some(original) => original.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                format!("rope_scaling of type yarn: original_max_position_embeddings {original}")
            })? as usize,
        };
        let factor = match value.get("factor") {
            None => return Err("rope_scaling of type yarn needs a factor".into()),
            Some(serde_json::Value::Null) => max_position_embeddings as f64 / original as f64,
            Some(factor) => factor.as_f64().unwrap_or(f64::NAN),
        };
        if !(factor.is_finite() && factor > 0.0) {
            return Err(format!("rope_scaling of type yarn: factor {factor}"));
        }
        let mscale = |scale: f64, mscale: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * mscale * scale.ln() + 1.0
            }
        };
        let attention_factor = match (
            number("attention_factor"),
            number("mscale").filter(|&m| m != 0.0),
            number("mscale_all_dim").filter(|&m| m != 0.0),
        ) {
            (Some(attention_factor), _, _) => attention_factor,
            (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
            _ => mscale(factor, 1.0),
        };
        let beta = |key: &str, default: f64| match number(key)
            .filter(|&beta| beta != 0.0)
            .unwrap_or(default)
        {
            beta if beta.is_finite() && beta > 0.0 => Ok(beta),
            beta => Err(format!("rope_scaling of type yarn: {key} {beta}")),
        };
        let truncate = match value.get("truncate") {
            None => true,
            Some(serde_json::Value::Null) => false,
            Some(truncate) => truncate
                .as_bool()
                .ok_or_else(|| format!("rope_scaling of type yarn: truncate {truncate}"))?,
        };
        if !(attention_factor.is_finite() && attention_factor > 0.0) {
            return Err(format!(
                "rope_scaling of type yarn: attention_factor {attention_factor}"
            ));
        }
        Ok(Self {
            factor,
            original_max_position_embeddings: original,
            beta_fast: beta("beta_fast", 32.0)?,
            beta_slow: beta("beta_slow", 1.0)?,
            attention_factor,
            truncate,
        })
    }

    /// The inverse frequencies of a head of `head_dim` at base `theta`.
    fn inverse_frequencies(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let dim = head_dim as f64;
        let original = self.original_max_position_embeddings as f64;
        // The dimension at which a frequency turns `rotations` times over the original context.
        let correction = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        (0..head_dim / 2)
            .map(|index| {
                let extrapolated = 1.0 / theta.powf(2.0 * index as f64 / dim);
                let interpolated = extrapolated / self.factor;
                let ramp = ((index as f64 - low) / (high - low)).clamp(0.0, 1.0);
                interpolated * ramp + extrapolated * (1.0 - ramp)
            })
            .collect()
    }
}

/// A RoPE frequency scaling the engine runs (`rope_scaling`'s `rope_type`), computed as
/// transformers computes it (`modeling_rope_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    Llama3(Llama3RopeScaling),
    Yarn(YarnRopeScaling),
}

impl RopeScaling {
    /// The inverse frequencies of a head of `head_dim` at base `theta`, scaled.
    pub fn inverse_frequencies(scaling: Option<&Self>, theta: f64, head_dim: usize) -> Vec<f64> {
        let plain = |index: usize| 1.0 / theta.powf(2.0 * index as f64 / head_dim as f64);
        match scaling {
            Some(Self::Yarn(yarn)) => yarn.inverse_frequencies(theta, head_dim),
            Some(Self::Linear { factor }) => (0..head_dim / 2)
                .map(|index| plain(index) / factor)
                .collect(),
            Some(Self::Llama3(llama3)) => (0..head_dim / 2)
                .map(|index| llama3.scale(plain(index)))
                .collect(),
            None => (0..head_dim / 2).map(plain).collect(),
        }
    }

    /// The factor on cos and sin (YaRN's; 1 for the others).
    pub fn attention_factor(scaling: Option<&Self>) -> f64 {
        match scaling {
            Some(Self::Yarn(yarn)) => yarn.attention_factor,
            _ => 1.0,
        }
    }
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
        let mut config: Self =
            serde_json::from_str(&text).map_err(|error| ClientError::Config {
                path: path.to_path_buf(),
                message: error.to_string(),
            })?;
        config.normalize();
        config.validate().map_err(|message| ClientError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Folds transformers 5's `rope_parameters` into `rope_theta` and `rope_scaling`, the
    /// fields the rest of the engine reads, with transformers' precedence: a (legacy, non-empty)
    /// `rope_scaling` replaces `rope_parameters` whole; the `rope_theta` of whichever is used
    /// wins over a top-level one.
    pub fn normalize(&mut self) {
        let non_empty = |value: &Option<serde_json::Value>| {
            value
                .as_ref()
                .filter(|value| value.as_object().is_some_and(|object| !object.is_empty()))
                .cloned()
        };
        let legacy = non_empty(&self.rope_scaling);
        let Some(parameters) = legacy.clone().or_else(|| non_empty(&self.rope_parameters)) else {
            return;
        };
        if let Some(theta) = parameters
            .get("rope_theta")
            .and_then(serde_json::Value::as_f64)
        {
            self.rope_theta = theta;
        }
        let kind = parameters
            .get("rope_type")
            .or_else(|| parameters.get("type"))
            .and_then(serde_json::Value::as_str);
        if legacy.is_none() && kind.is_some_and(|kind| kind != "default") {
            self.rope_scaling = Some(parameters);
        }
    }

    /// The attention window, when the model uses one: sequences are limited to it, since the
    /// engine runs full causal attention.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Every end-of-sequence id the config names (an id or a list of ids).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map_or_else(Vec::new, token_ids)
    }

    /// The first end-of-sequence id, if the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(number)) => {
                number.as_u64().and_then(|id| u32::try_from(id).ok())
            }
            Some(serde_json::Value::Array(ids)) => ids
                .first()
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok()),
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

    /// The RoPE frequency scaling `rope_scaling` asks for. `None` for no scaling (absent,
    /// null, or type "default"); an error for scaling types this engine does not run (dynamic
    /// NTK, which changes with each sequence's length, and longrope).
    pub fn rope_scaling(&self) -> std::result::Result<Option<RopeScaling>, String> {
        let Some(value) = self.rope_scaling.as_ref().filter(|value| !value.is_null()) else {
            return Ok(None);
        };
        let kind = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default");
        if let Some(partial) = value
            .get("partial_rotary_factor")
            .and_then(serde_json::Value::as_f64)
            && partial != 1.0
        {
            return Err(format!(
                "partial_rotary_factor {partial} (rotary embeddings on part of each head) is \
                 not supported"
            ));
        }
        // transformers lets a top-level pretraining context override the scaling's own.
        let mut value = value.clone();
        if let Some(original) = self.original_max_position_embeddings
            && matches!(kind, "llama3" | "yarn")
        {
            value["original_max_position_embeddings"] = serde_json::json!(original);
        }
        let value = &value;
        match kind {
            "default" => Ok(None),
            "linear" => match value.get("factor").and_then(serde_json::Value::as_f64) {
                Some(factor) if factor.is_finite() && factor > 0.0 => {
                    Ok(Some(RopeScaling::Linear { factor }))
                }
                _ => Err("rope_scaling of type linear needs a positive factor".into()),
            },
            "llama3" => {
                let scaling: Llama3RopeScaling = serde_json::from_value(value.clone())
                    .map_err(|error| format!("rope_scaling of type llama3: {error}"))?;
                let positive = |value: f64| value.is_finite() && value > 0.0;
                if !(positive(scaling.factor)
                    && positive(scaling.low_freq_factor)
                    && scaling.high_freq_factor.is_finite()
                    && scaling.high_freq_factor > scaling.low_freq_factor
                    && scaling.original_max_position_embeddings > 0)
                {
                    return Err(format!(
                        "rope_scaling of type llama3 needs a positive factor, 0 < \
                         low_freq_factor < high_freq_factor and original_max_position_embeddings \
                         of at least 1, not {scaling:?}"
                    ));
                }
                Ok(Some(RopeScaling::Llama3(scaling)))
            }
            "yarn" => YarnRopeScaling::from_json(value, self.max_position_embeddings)
                .map(|scaling| Some(RopeScaling::Yarn(scaling))),
            other => Err(format!(
                "rope_scaling of type {other:?} is not supported (default, linear, llama3 and \
                 yarn are)"
            )),
        }
    }

    /// Llama 3's RoPE frequency scaling, when that is the one `rope_scaling` asks for.
    pub fn llama3_rope_scaling(&self) -> std::result::Result<Option<Llama3RopeScaling>, String> {
        Ok(match self.rope_scaling()? {
            Some(RopeScaling::Llama3(scaling)) => Some(scaling),
            _ => None,
        })
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
        if let Some(quantization) = &self.quantization_config {
            let method = quantization
                .get("quant_method")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unnamed");
            return Err(format!(
                "the checkpoint is pre-quantized (quantization_config, method {method:?}), which \
                 is not supported: use its unquantized form (with --quantize-base for QLoRA) or a \
                 GGUF file"
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (silu only)",
                self.hidden_act
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0 && self.rope_theta != 1.0) {
            return Err(format!(
                "rope_theta {} (rotary frequencies need a positive base other than 1)",
                self.rope_theta
            ));
        }
        if let Some(partial) = self.partial_rotary_factor
            && partial != 1.0
        {
            return Err(format!(
                "partial_rotary_factor {partial} (rotary embeddings on part of each head) is not \
                 supported"
            ));
        }
        self.rope_scaling()?;
        if self.mlp_bias {
            return Err("mlp_bias is not supported".into());
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
        // Far past any published model's sizes: a corrupt file, refused before anything is
        // allocated from it (and so that the products of these sizes cannot overflow).
        let limits = [
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("head_dim", self.head_dim(), 1 << 12),
            ("vocab_size", self.vocab_size, 1 << 22),
        ];
        for (name, value, limit) in limits {
            if value == 0 || value > limit {
                return Err(format!("{name} {value} is outside 1..={limit}"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps {} must be a finite number, not negative",
                self.rms_norm_eps
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

        // A pre-quantized checkpoint (here bitsandbytes 4-bit, as unsloth publishes them) is
        // refused by name, not left to fail on its packed weights.
        let mut quantized: serde_json::Value = serde_json::from_str(json).unwrap();
        quantized["quantization_config"] =
            serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
        let error = serde_json::from_value::<LlamaConfig>(quantized)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            error.contains("pre-quantized") && error.contains("bitsandbytes"),
            "{error}"
        );
    }

    #[test]
    fn llama3_rope_scaling_keeps_short_and_stretches_long_wavelengths() {
        let json = r#"{"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
            "vocab_size":10,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        config.validate().unwrap();
        let scaling = config.llama3_rope_scaling().unwrap().unwrap();
        // Wavelength 2π ≪ 8192/4: unchanged.
        assert_eq!(scaling.scale(1.0), 1.0);
        // Wavelength 2π/1e-4 ≈ 62832 > 8192: divided by the factor.
        assert!((scaling.scale(1e-4) - 1e-4 / 8.0).abs() < 1e-15);
        // Wavelength 4096 (between 2048 and 8192): interpolated with smooth = (2 - 1) / 3.
        let frequency = 2.0 * std::f64::consts::PI / 4096.0;
        let expected = (2.0 / 3.0) * frequency / 8.0 + (1.0 / 3.0) * frequency;
        assert!((scaling.scale(frequency) - expected).abs() < 1e-15);

        let longrope = json.replace("llama3", "longrope");
        let config: LlamaConfig = serde_json::from_str(&longrope).unwrap();
        assert!(config.validate().unwrap_err().contains("longrope"));
    }

    /// llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, rope_type llama3) writes these divisors;
    /// they are recomputed here as it does, for Llama 3.2's parameters.
    #[test]
    fn llama3_scaling_is_recovered_from_gguf_rope_freqs() {
        let (theta, head_dim, factor) = (500_000.0f64, 64usize, 32.0f64);
        let (low, high, original) = (1.0f64, 4.0f64, 8192.0f64);
        let divisors: Vec<f32> = (0..head_dim / 2)
            .map(|index| {
                let frequency = 1.0 / theta.powf((2 * index) as f64 / head_dim as f64);
                let wavelength = 2.0 * std::f64::consts::PI / frequency;
                if wavelength < original / high {
                    1.0
                } else if wavelength > original / low {
                    factor as f32
                } else {
                    let smooth = (original / wavelength - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        assert!(
            divisors
                .iter()
                .any(|divisor| *divisor > 1.0 && *divisor < 32.0)
        );
        let scaling = Llama3RopeScaling::from_gguf_divisors(&divisors, theta, head_dim).unwrap();
        assert_eq!(
            scaling,
            Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }
        );
        let config: LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10, "rope_scaling": scaling.to_json(),
        }))
        .unwrap();
        assert_eq!(config.llama3_rope_scaling().unwrap(), Some(scaling));
        // Divisors from other parameters are not passed off as Meta's.
        let mut other = divisors.clone();
        other[head_dim / 2 - 6] *= 1.01;
        assert_eq!(
            Llama3RopeScaling::from_gguf_divisors(&other, theta, head_dim),
            None
        );
        assert_eq!(
            Llama3RopeScaling::from_gguf_divisors(&divisors[1..], theta, head_dim),
            None
        );
    }

    fn config_with_scaling(scaling: serde_json::Value) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 256,
            "rope_scaling": scaling,
        }))
        .unwrap()
    }

    /// Linear divides every frequency; YaRN keeps the fast ones, divides the slow ones, ramps
    /// between, and reads transformers' defaults where the config is silent.
    #[test]
    fn linear_and_yarn_scalings_read_and_scale_as_transformers_does() {
        let plain = RopeScaling::inverse_frequencies(None, 10_000.0, 16);
        let linear = config_with_scaling(serde_json::json!({"type": "linear", "factor": 4.0}))
            .rope_scaling()
            .unwrap();
        assert_eq!(linear, Some(RopeScaling::Linear { factor: 4.0 }));
        let scaled = RopeScaling::inverse_frequencies(linear.as_ref(), 10_000.0, 16);
        for (plain, scaled) in plain.iter().zip(&scaled) {
            assert!((plain / 4.0 - scaled).abs() < 1e-15);
        }
        assert_eq!(RopeScaling::attention_factor(linear.as_ref()), 1.0);

        // Defaults: the original context is the model's (256), beta 32 and 1, truncation.
        let yarn = config_with_scaling(serde_json::json!({"rope_type": "yarn", "factor": 4.0}))
            .rope_scaling()
            .unwrap();
        let Some(RopeScaling::Yarn(parameters)) = yarn else {
            panic!("yarn: {yarn:?}");
        };
        assert_eq!(
            parameters,
            YarnRopeScaling {
                factor: 4.0,
                original_max_position_embeddings: 256,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
                truncate: true,
            }
        );
        // head_dim 16, theta 1e4, 256 positions: the correction range is 0.21..3.22, truncated
        // to 0..4, so frequency i is i/4 of the way to interpolated, up to 4.
        let scaled = RopeScaling::inverse_frequencies(yarn.as_ref(), 10_000.0, 16);
        for index in 0..8 {
            let ramp = (index as f64 / 4.0).min(1.0);
            let expected = plain[index] / 4.0 * ramp + plain[index] * (1.0 - ramp);
            assert!((scaled[index] - expected).abs() < 1e-15, "{index}");
        }
        assert_eq!(scaled[0], plain[0]);

        // mscale and mscale_all_dim set the attention factor when it is not given.
        let yarn = config_with_scaling(serde_json::json!({"rope_type": "yarn", "factor": 4.0,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 0}))
        .rope_scaling()
        .unwrap();
        let Some(RopeScaling::Yarn(parameters)) = yarn else {
            panic!("yarn: {yarn:?}");
        };
        let expected = (0.1 * 4f64.ln() + 1.0) / (0.05 * 4f64.ln() + 1.0);
        assert!((parameters.attention_factor - expected).abs() < 1e-15);
        assert_eq!(
            parameters.beta_fast, 32.0,
            "0 means the default, as in transformers"
        );

        // A null truncate is Python's falsy None: no truncation. A top-level pretraining
        // context overrides the scaling's.
        let mut config = config_with_scaling(serde_json::json!({"rope_type": "yarn",
            "factor": 4.0, "truncate": null, "original_max_position_embeddings": 128}));
        config.original_max_position_embeddings = Some(64);
        let Some(RopeScaling::Yarn(parameters)) = config.rope_scaling().unwrap() else {
            panic!("yarn");
        };
        assert_eq!(
            (
                parameters.truncate,
                parameters.original_max_position_embeddings
            ),
            (false, 64)
        );

        for (scaling, named) in [
            (
                serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
                "dynamic",
            ),
            (serde_json::json!({"rope_type": "linear"}), "factor"),
            (
                serde_json::json!({"rope_type": "yarn", "factor": -1.0}),
                "factor",
            ),
            (serde_json::json!({"rope_type": "yarn"}), "factor"),
            (
                serde_json::json!({"rope_type": "yarn", "factor": 2.0, "beta_slow": -1.0}),
                "beta_slow",
            ),
            (
                serde_json::json!({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}),
                "truncate",
            ),
            (
                serde_json::json!({"rope_type": "linear", "factor": 2.0,
                "partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
        ] {
            let error = config_with_scaling(scaling).validate().unwrap_err();
            assert!(error.contains(named), "{error}");
        }
        let mut config = config_with_scaling(serde_json::Value::Null);
        config.rope_theta = 1.0;
        assert!(config.validate().unwrap_err().contains("rope_theta"));
    }

    /// transformers 5's precedence: `rope_parameters` when alone (its theta over a top-level
    /// one); a legacy `rope_scaling` replaces it whole, with the top-level theta unless it has
    /// its own.
    #[test]
    fn rope_parameters_and_legacy_keys_resolve_as_in_transformers() {
        let config = |extra: serde_json::Value| {
            let mut json = serde_json::json!({"hidden_size": 64, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10});
            for (key, value) in extra.as_object().unwrap() {
                json[key] = value.clone();
            }
            let mut config: LlamaConfig = serde_json::from_value(json).unwrap();
            config.normalize();
            (config.rope_theta, config.rope_scaling().unwrap())
        };
        let linear = Some(RopeScaling::Linear { factor: 2.0 });
        assert_eq!(
            config(serde_json::json!({"rope_theta": 100.0,
                "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}})),
            (5e5, linear)
        );
        assert_eq!(
            config(serde_json::json!({"rope_theta": 100.0,
                "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"},
                "rope_scaling": {"rope_type": "linear", "factor": 2.0}})),
            (100.0, linear)
        );
        assert_eq!(
            config(serde_json::json!({"rope_theta": 100.0,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}})),
            (7.0, linear)
        );
        assert_eq!(
            config(
                serde_json::json!({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
            ),
            (5e5, None)
        );
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let json = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":10}"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        assert!(config.validate().unwrap_err().contains("gpt2"));
    }
}
