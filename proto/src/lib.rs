//! The fedlora wire: the generated `fedlora.v1` gRPC types, and the adapter domain type with its
//! safetensors codec and PEFT naming, shared by the coordinator and the client.
//!
//! Only the gRPC layers of the coordinator and the client touch [`v1`]; everything else speaks
//! [`adapter`] types.

pub mod adapter;
pub mod factors;
pub mod tensor_bytes;
pub mod tls;

/// Generated protobuf and tonic code for `fedlora.v1`.
#[allow(clippy::all, missing_docs, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("fedlora.v1");
}

/// Size of one chunk of adapter bytes on the wire (uploads and downloads).
pub const CHUNK_BYTES: usize = 1 << 20;

impl From<adapter::ModelDims> for v1::ModelShape {
    fn from(dims: adapter::ModelDims) -> Self {
        let narrow = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        Self {
            num_layers: narrow(dims.num_layers),
            hidden_size: narrow(dims.hidden_size),
            intermediate_size: narrow(dims.intermediate_size),
            num_attention_heads: narrow(dims.num_attention_heads),
            num_key_value_heads: narrow(dims.num_key_value_heads),
            head_dim: narrow(dims.head_dim),
        }
    }
}

impl From<v1::ModelShape> for adapter::ModelDims {
    fn from(shape: v1::ModelShape) -> Self {
        Self {
            num_layers: shape.num_layers as usize,
            hidden_size: shape.hidden_size as usize,
            intermediate_size: shape.intermediate_size as usize,
            num_attention_heads: shape.num_attention_heads as usize,
            num_key_value_heads: shape.num_key_value_heads as usize,
            head_dim: shape.head_dim as usize,
        }
    }
}

impl From<&adapter::LoraSpec> for v1::LoraConfig {
    fn from(lora: &adapter::LoraSpec) -> Self {
        let narrow = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        Self {
            rank: narrow(lora.rank),
            alpha: lora.alpha,
            target_modules: lora.target_modules.clone(),
            use_rslora: lora.use_rslora,
            use_dora: lora.use_dora,
            dropout: lora.dropout,
            rank_pattern: lora
                .rank_pattern
                .iter()
                .map(|(pattern, rank)| v1::RankOverride {
                    pattern: pattern.clone(),
                    rank: narrow(*rank),
                })
                .collect(),
            alpha_pattern: lora
                .alpha_pattern
                .iter()
                .map(|(pattern, alpha)| v1::AlphaOverride {
                    pattern: pattern.clone(),
                    alpha: *alpha,
                })
                .collect(),
        }
    }
}

/// The spec a task carries; the receiver validates it (`LoraSpec::validate`) before use.
impl From<v1::LoraConfig> for adapter::LoraSpec {
    fn from(config: v1::LoraConfig) -> Self {
        Self {
            rank: config.rank as usize,
            alpha: config.alpha,
            target_modules: config.target_modules,
            use_rslora: config.use_rslora,
            use_dora: config.use_dora,
            dropout: config.dropout,
            rank_pattern: config
                .rank_pattern
                .into_iter()
                .map(|entry| (entry.pattern, entry.rank as usize))
                .collect(),
            alpha_pattern: config
                .alpha_pattern
                .into_iter()
                .map(|entry| (entry.pattern, entry.alpha))
                .collect(),
        }
    }
}
