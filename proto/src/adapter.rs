//! LoRA adapters as the federation sees them: named 2-D f32 tensors in PEFT naming, the expected
//! tensor layout for a model and LoRA configuration, and the safetensors codec with validation.
//!
//! PEFT stores, for every adapted linear layer `W ∈ R^{out×in}`, `lora_A.weight ∈ R^{r×in}` and
//! `lora_B.weight ∈ R^{out×r}` under `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.`;
//! the update is ΔW = (α/r)·B·A.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use safetensors::tensor::{Dtype, SafeTensors, View};
use sha2::{Digest, Sha256};

/// Modules LoRA can adapt, in PEFT's names.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Errors of adapter layout, decoding and validation. Messages are lowercase and name the tensor.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum AdapterError {
    #[error(
        "unknown lora target module {0:?} (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    )]
    UnknownModule(String),
    #[error("invalid lora config: {0}")]
    InvalidConfig(String),
    #[error("malformed safetensors: {0}")]
    Malformed(String),
    #[error("tensor {name:?} has unsupported dtype {dtype} (f32, bf16 and f16 are accepted)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("unexpected tensor {0:?}")]
    UnexpectedTensor(String),
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {name:?} contains a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
}

/// The two low-rank factors of a LoRA layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    /// `lora_A`, shape `[r, in]`.
    A,
    /// `lora_B`, shape `[out, r]`.
    B,
}

/// Base-model dimensions that decide the shapes of the LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelDims {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl ModelDims {
    /// `(in_features, out_features)` of a Llama linear layer, by PEFT module name.
    pub fn module_in_out(&self, module: &str) -> Result<(usize, usize), AdapterError> {
        let q_out = self.num_attention_heads * self.head_dim;
        let kv_out = self.num_key_value_heads * self.head_dim;
        Ok(match module {
            "q_proj" => (self.hidden_size, q_out),
            "k_proj" | "v_proj" => (self.hidden_size, kv_out),
            "o_proj" => (q_out, self.hidden_size),
            "gate_proj" | "up_proj" => (self.hidden_size, self.intermediate_size),
            "down_proj" => (self.intermediate_size, self.hidden_size),
            other => return Err(AdapterError::UnknownModule(other.to_string())),
        })
    }
}

/// LoRA hyper-parameters shared by every client of a round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by α/√r instead of α/r, so the update's size does not shrink with the rank.
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraSpec {
    /// The scale applied to B·A: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        let rank = self.rank as f64;
        f64::from(self.alpha) / if self.use_rslora { rank.sqrt() } else { rank }
    }

    /// Checks the rank is positive, alpha finite and positive, and every target known and listed once.
    pub fn validate(&self) -> Result<(), AdapterError> {
        if self.rank == 0 {
            return Err(AdapterError::InvalidConfig(
                "rank must be at least 1".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(AdapterError::InvalidConfig(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            )));
        }
        if self.target_modules.is_empty() {
            return Err(AdapterError::InvalidConfig(
                "at least one target module is needed".into(),
            ));
        }
        for (index, module) in self.target_modules.iter().enumerate() {
            if !LORA_MODULES.contains(&module.as_str()) {
                return Err(AdapterError::UnknownModule(module.clone()));
            }
            if self.target_modules[..index].contains(module) {
                return Err(AdapterError::InvalidConfig(format!(
                    "target module {module:?} listed twice"
                )));
            }
        }
        Ok(())
    }
}

/// The PEFT tensor name of one LoRA factor.
pub fn peft_key(layer: usize, module: &str, factor: Factor) -> Result<String, AdapterError> {
    let block = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        other => return Err(AdapterError::UnknownModule(other.to_string())),
    };
    let factor = match factor {
        Factor::A => "A",
        Factor::B => "B",
    };
    Ok(format!(
        "base_model.model.model.layers.{layer}.{block}.{module}.lora_{factor}.weight"
    ))
}

/// Name and shape of one tensor an adapter must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: [usize; 2],
}

/// The exact tensor layout (names and shapes, sorted by name) of an adapter for `dims` and `lora`.
pub fn adapter_spec(dims: &ModelDims, lora: &LoraSpec) -> Result<Vec<TensorSpec>, AdapterError> {
    lora.validate()?;
    let mut spec = Vec::with_capacity(dims.num_layers * lora.target_modules.len() * 2);
    for layer in 0..dims.num_layers {
        for module in &lora.target_modules {
            let (in_features, out_features) = dims.module_in_out(module)?;
            spec.push(TensorSpec {
                name: peft_key(layer, module, Factor::A)?,
                shape: [lora.rank, in_features],
            });
            spec.push(TensorSpec {
                name: peft_key(layer, module, Factor::B)?,
                shape: [out_features, lora.rank],
            });
        }
    }
    spec.sort_by(|left, right| left.name.cmp(&right.name));
    Ok(spec)
}

/// One dense tensor of an adapter, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl AdapterTensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }
}

impl View for &AdapterTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(
            self.data
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect(),
        )
    }

    fn data_len(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}

/// A LoRA adapter: PEFT tensor name → tensor. Ordered, so encoding is deterministic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adapter {
    pub tensors: BTreeMap<String, AdapterTensor>,
}

impl Adapter {
    /// An adapter of zeros with the given layout.
    pub fn zeros(spec: &[TensorSpec]) -> Self {
        Self {
            tensors: spec
                .iter()
                .map(|tensor| (tensor.name.clone(), AdapterTensor::zeros(&tensor.shape)))
                .collect(),
        }
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|tensor| tensor.data.len()).sum()
    }

    /// Encodes as safetensors (f32, little endian) with optional string metadata.
    pub fn to_safetensors(
        &self,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>, AdapterError> {
        safetensors::tensor::serialize(
            self.tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
            metadata,
        )
        .map_err(|error| AdapterError::Malformed(error.to_string().to_lowercase()))
    }

    /// Decodes safetensors bytes (f32, bf16 or f16 tensors) into f32. Does not check the layout:
    /// call [`Adapter::validate`] for that.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, AdapterError> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|error| AdapterError::Malformed(error.to_string().to_lowercase()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let data = decode_floats(&name, view.dtype(), view.data())?;
            tensors.insert(
                name,
                AdapterTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(Self { tensors })
    }

    /// Checks that the adapter has exactly the tensors of `spec`, with their shapes, and only finite values.
    pub fn validate(&self, spec: &[TensorSpec]) -> Result<(), AdapterError> {
        for expected in spec {
            let tensor = self
                .tensors
                .get(&expected.name)
                .ok_or_else(|| AdapterError::MissingTensor(expected.name.clone()))?;
            if tensor.shape != expected.shape {
                return Err(AdapterError::ShapeMismatch {
                    name: expected.name.clone(),
                    expected: expected.shape.to_vec(),
                    got: tensor.shape.clone(),
                });
            }
            if let Some(index) = tensor.data.iter().position(|value| !value.is_finite()) {
                return Err(AdapterError::NonFinite {
                    name: expected.name.clone(),
                    index,
                });
            }
        }
        if self.tensors.len() != spec.len() {
            let unexpected = self
                .tensors
                .keys()
                .find(|name| !spec.iter().any(|expected| &expected.name == *name));
            if let Some(name) = unexpected {
                return Err(AdapterError::UnexpectedTensor(name.clone()));
            }
        }
        Ok(())
    }
}

fn decode_floats(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, AdapterError> {
    let pairs = || bytes.chunks_exact(2).map(|pair| [pair[0], pair[1]]);
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|word| f32::from_le_bytes([word[0], word[1], word[2], word[3]]))
            .collect(),
        Dtype::BF16 => pairs()
            .map(|pair| half::bf16::from_le_bytes(pair).to_f32())
            .collect(),
        Dtype::F16 => pairs()
            .map(|pair| half::f16::from_le_bytes(pair).to_f32())
            .collect(),
        other => {
            return Err(AdapterError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}").to_lowercase(),
            });
        }
    })
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// PEFT's `adapter_config.json` for an adapter trained with `lora` on the model at `base_model`.
pub fn peft_adapter_config(lora: &LoraSpec, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": lora.use_rslora,
        "use_dora": false,
        "inference_mode": true,
    })
}

impl fmt::Display for Factor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn dims() -> ModelDims {
        ModelDims {
            num_layers: 2,
            hidden_size: 8,
            intermediate_size: 12,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 2,
        }
    }

    fn lora() -> LoraSpec {
        LoraSpec {
            use_rslora: false,
            rank: 2,
            alpha: 4.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }

    fn filled(spec: &[TensorSpec]) -> Adapter {
        let mut adapter = Adapter::zeros(spec);
        for (offset, tensor) in adapter.tensors.values_mut().enumerate() {
            for (index, value) in tensor.data.iter_mut().enumerate() {
                *value = (index as f32 * 0.25) - offset as f32;
            }
        }
        adapter
    }

    #[test]
    fn spec_has_peft_names_and_shapes() {
        let spec = adapter_spec(&dims(), &lora()).unwrap();
        assert_eq!(spec.len(), 8);
        let v_b = spec
            .iter()
            .find(|t| t.name == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
            .unwrap();
        assert_eq!(v_b.shape, [4, 2]);
        let q_a = spec
            .iter()
            .find(|t| t.name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            .unwrap();
        assert_eq!(q_a.shape, [2, 8]);
        assert_eq!(
            peft_key(3, "down_proj", Factor::A).unwrap(),
            "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"
        );
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let spec = adapter_spec(&dims(), &lora()).unwrap();
        let adapter = filled(&spec);
        let bytes = adapter.to_safetensors(None).unwrap();
        let decoded = Adapter::from_safetensors(&bytes).unwrap();
        assert_eq!(decoded, adapter);
        decoded.validate(&spec).unwrap();
        // Deterministic encoding: same adapter, same bytes, same hash.
        assert_eq!(
            sha256_hex(&adapter.to_safetensors(None).unwrap()),
            sha256_hex(&bytes)
        );
    }

    #[test]
    fn bf16_tensors_decode_to_f32() {
        let values = [1.5f32, -2.0, 0.0, 3.25];
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::BF16, vec![2, 2], &raw).unwrap();
        let bytes = safetensors::tensor::serialize([("x", view)], None).unwrap();
        let adapter = Adapter::from_safetensors(&bytes).unwrap();
        assert_eq!(adapter.tensors["x"].data, values);
    }

    #[test]
    fn validation_names_the_problem() {
        let spec = adapter_spec(&dims(), &lora()).unwrap();
        let good = filled(&spec);

        let mut missing = good.clone();
        let first = spec[0].name.clone();
        missing.tensors.remove(&first);
        assert_eq!(
            missing.validate(&spec),
            Err(AdapterError::MissingTensor(first))
        );

        let mut extra = good.clone();
        extra
            .tensors
            .insert("evil".into(), AdapterTensor::zeros(&[1, 1]));
        assert_eq!(
            extra.validate(&spec),
            Err(AdapterError::UnexpectedTensor("evil".into()))
        );

        let mut reshaped = good.clone();
        let tensor = reshaped.tensors.get_mut(&spec[1].name).unwrap();
        tensor.shape = vec![tensor.shape[1], tensor.shape[0]];
        assert!(matches!(
            reshaped.validate(&spec),
            Err(AdapterError::ShapeMismatch { .. })
        ));

        let mut nan = good.clone();
        nan.tensors.get_mut(&spec[2].name).unwrap().data[3] = f32::NAN;
        assert_eq!(
            nan.validate(&spec),
            Err(AdapterError::NonFinite {
                name: spec[2].name.clone(),
                index: 3
            })
        );

        assert!(matches!(
            Adapter::from_safetensors(b"not a safetensors file"),
            Err(AdapterError::Malformed(_))
        ));
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let plain = LoraSpec {
            rank: 16,
            alpha: 32.0,
            ..lora()
        };
        assert_eq!(plain.scale(), 2.0);
        let rslora = LoraSpec {
            use_rslora: true,
            ..plain
        };
        assert_eq!(rslora.scale(), 8.0);
        assert_eq!(
            peft_adapter_config(&rslora, "m")["use_rslora"],
            serde_json::json!(true)
        );
    }

    #[test]
    fn lora_config_is_checked() {
        let mut bad = lora();
        bad.target_modules.push("embed_tokens".into());
        assert_eq!(
            adapter_spec(&dims(), &bad),
            Err(AdapterError::UnknownModule("embed_tokens".into()))
        );
        let zero_rank = LoraSpec {
            use_rslora: false,
            rank: 0,
            ..lora()
        };
        assert!(matches!(
            zero_rank.validate(),
            Err(AdapterError::InvalidConfig(_))
        ));
    }
}
