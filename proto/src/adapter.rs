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

/// LoRA options beyond plain LoRA that this build trains, as announced at join.
pub const LORA_FEATURES: [&str; 5] = ["rslora", "dora", "dropout", "rank_pattern", "alpha_pattern"];

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

/// The trained tensors of a LoRA layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    /// `lora_A`, shape `[r, in]`.
    A,
    /// `lora_B`, shape `[out, r]`.
    B,
    /// DoRA's `lora_magnitude_vector`, shape `[out]`.
    Magnitude,
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
    /// A two-layer toy model's dimensions, shared by tests and the fuzz target.
    #[doc(hidden)]
    pub fn toy() -> Self {
        Self {
            num_layers: 2,
            hidden_size: 8,
            intermediate_size: 12,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
        }
    }

    /// The update layout the validator's property test and fuzz target check against: the toy
    /// model with rank 2 on q and v, one definition so that the two cannot drift apart.
    #[doc(hidden)]
    pub fn toy_update_spec() -> Result<Vec<TensorSpec>, AdapterError> {
        adapter_spec(&Self::toy(), &LoraSpec::new(2, 4.0, &["q_proj", "v_proj"]))
    }

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

/// LoRA hyper-parameters shared by every client of a round, with PEFT's meaning.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by α/√r instead of α/r, so the update's size does not shrink with the rank.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: each adapted layer also learns a magnitude per output row,
    /// `W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row` (the norm held constant in the backward pass).
    #[serde(default)]
    pub use_dora: bool,
    /// PEFT's `lora_dropout`: the probability of zeroing an input of the low-rank path while
    /// training (never at inference).
    #[serde(default)]
    pub dropout: f32,
    /// PEFT's `rank_pattern`: `(pattern, rank)`, tried in order against the module's full name
    /// (`model.layers.3.self_attn.q_proj`); the first whose regex matches a dot-separated suffix wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT's `alpha_pattern`, matched like `rank_pattern`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpha_pattern: Vec<(String, f32)>,
}

impl LoraSpec {
    /// Plain LoRA (no rsLoRA, DoRA, dropout or per-module patterns).
    pub fn new(rank: usize, alpha: f32, target_modules: &[&str]) -> Self {
        Self {
            rank,
            alpha,
            target_modules: target_modules
                .iter()
                .map(|module| module.to_string())
                .collect(),
            use_rslora: false,
            use_dora: false,
            dropout: 0.0,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }

    /// The scale applied to B·A for the default rank and alpha: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        self.scale_of(self.rank, self.alpha)
    }

    fn scale_of(&self, rank: usize, alpha: f32) -> f64 {
        let rank = rank as f64;
        f64::from(alpha) / if self.use_rslora { rank.sqrt() } else { rank }
    }

    /// The rank of `module` in `layer` after `rank_pattern`. Compiles the patterns tried: for
    /// every module of a model, use [`LoraSpec::patterns`] once.
    pub fn rank_for(&self, layer: usize, module: &str) -> usize {
        let name = module_path(layer, module);
        first_match(&self.rank_pattern, &name).unwrap_or(self.rank)
    }

    /// The alpha of `module` in `layer` after `alpha_pattern` (see [`LoraSpec::rank_for`]).
    pub fn alpha_for(&self, layer: usize, module: &str) -> f32 {
        let name = module_path(layer, module);
        first_match(&self.alpha_pattern, &name).unwrap_or(self.alpha)
    }

    /// The scale of `module` in `layer`, from its own rank and alpha.
    pub fn scale_for(&self, layer: usize, module: &str) -> f64 {
        self.scale_of(self.rank_for(layer, module), self.alpha_for(layer, module))
    }

    /// The LoRA options this spec uses beyond plain LoRA, by the names clients announce at join
    /// (see [`LORA_FEATURES`]).
    pub fn features(&self) -> Vec<&'static str> {
        let used = [
            self.use_rslora,
            self.use_dora,
            self.dropout > 0.0,
            !self.rank_pattern.is_empty(),
            !self.alpha_pattern.is_empty(),
        ];
        LORA_FEATURES
            .iter()
            .zip(used)
            .filter_map(|(feature, used)| used.then_some(*feature))
            .collect()
    }

    /// The largest rank any module gets: what a client must be able to train.
    pub fn max_rank(&self) -> usize {
        self.rank_pattern
            .iter()
            .map(|(_, rank)| *rank)
            .fold(self.rank, usize::max)
    }

    /// Checks ranks are positive, alphas finite and positive, the dropout in [0, 1), every
    /// pattern a valid regex, and every target known and listed once.
    pub fn validate(&self) -> Result<(), AdapterError> {
        self.patterns().map(drop)
    }

    /// Validates the spec (as [`LoraSpec::validate`]) and compiles `rank_pattern` and
    /// `alpha_pattern` once, for looking up many modules: an adapter converted from AdaLoRA can
    /// carry a pattern per module, and compiling each at every lookup made a model's layout cost
    /// modules × patterns compilations.
    pub fn patterns(&self) -> Result<ModulePatterns<'_>, AdapterError> {
        let invalid = |message: String| Err(AdapterError::InvalidConfig(message));
        if self.rank == 0 {
            return invalid("rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return invalid(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        for patterns in [
            self.rank_pattern
                .iter()
                .map(|(pattern, _)| pattern)
                .collect::<Vec<_>>(),
            self.alpha_pattern
                .iter()
                .map(|(pattern, _)| pattern)
                .collect(),
        ] {
            let mut seen = std::collections::HashSet::with_capacity(patterns.len());
            if let Some(duplicate) = patterns.into_iter().find(|pattern| !seen.insert(*pattern)) {
                return invalid(format!("pattern {duplicate:?} is listed twice"));
            }
        }
        let mut ranks = Vec::with_capacity(self.rank_pattern.len());
        for (pattern, rank) in &self.rank_pattern {
            ranks.push((pattern_regex(pattern)?, *rank));
            if *rank == 0 {
                return invalid(format!("rank_pattern {pattern:?} gives rank 0"));
            }
        }
        let mut alphas = Vec::with_capacity(self.alpha_pattern.len());
        for (pattern, alpha) in &self.alpha_pattern {
            alphas.push((pattern_regex(pattern)?, *alpha));
            if !(alpha.is_finite() && *alpha > 0.0) {
                return invalid(format!("alpha_pattern {pattern:?} gives alpha {alpha}"));
            }
        }
        if self.target_modules.is_empty() {
            return invalid("at least one target module is needed".into());
        }
        for (index, module) in self.target_modules.iter().enumerate() {
            if !LORA_MODULES.contains(&module.as_str()) {
                return Err(AdapterError::UnknownModule(module.clone()));
            }
            if self.target_modules[..index].contains(module) {
                return invalid(format!("target module {module:?} listed twice"));
            }
        }
        Ok(ModulePatterns {
            lora: self,
            ranks,
            alphas,
        })
    }
}

/// PEFT's `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", name)`, i.e. the pattern must
/// match a whole dot-separated suffix of the module's name.
fn pattern_regex(pattern: &str) -> Result<regex::Regex, AdapterError> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|error| {
        AdapterError::InvalidConfig(format!("pattern {pattern:?} is not a valid regex: {error}"))
    })
}

/// A validated [`LoraSpec`] with its per-module patterns compiled ([`LoraSpec::patterns`]).
#[derive(Debug, Clone)]
pub struct ModulePatterns<'a> {
    lora: &'a LoraSpec,
    ranks: Vec<(regex::Regex, usize)>,
    alphas: Vec<(regex::Regex, f32)>,
}

impl ModulePatterns<'_> {
    /// [`LoraSpec::rank_for`], without compiling.
    pub fn rank_for(&self, layer: usize, module: &str) -> usize {
        compiled_match(&self.ranks, &module_path(layer, module)).unwrap_or(self.lora.rank)
    }

    /// [`LoraSpec::alpha_for`], without compiling.
    pub fn alpha_for(&self, layer: usize, module: &str) -> f32 {
        compiled_match(&self.alphas, &module_path(layer, module)).unwrap_or(self.lora.alpha)
    }

    /// [`LoraSpec::scale_for`], without compiling.
    pub fn scale_for(&self, layer: usize, module: &str) -> f64 {
        self.lora
            .scale_of(self.rank_for(layer, module), self.alpha_for(layer, module))
    }
}

fn compiled_match<T: Copy>(patterns: &[(regex::Regex, T)], name: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(regex, _)| regex.is_match(name))
        .map(|(_, value)| *value)
}

fn first_match<T: Copy>(patterns: &[(String, T)], name: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(pattern, _)| pattern_regex(pattern).is_ok_and(|regex| regex.is_match(name)))
        .map(|(_, value)| *value)
}

fn block_of(module: &str) -> Result<&'static str, AdapterError> {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => Ok("self_attn"),
        "gate_proj" | "up_proj" | "down_proj" => Ok("mlp"),
        other => Err(AdapterError::UnknownModule(other.to_string())),
    }
}

/// The module's name inside a Hugging Face Llama (`model.layers.3.self_attn.q_proj`), the name
/// PEFT matches `rank_pattern` against.
pub fn module_path(layer: usize, module: &str) -> String {
    let block = block_of(module).unwrap_or("unknown");
    format!("model.layers.{layer}.{block}.{module}")
}

/// The PEFT tensor name of one LoRA factor (or DoRA magnitude).
pub fn peft_key(layer: usize, module: &str, factor: Factor) -> Result<String, AdapterError> {
    let block = block_of(module)?;
    let suffix = match factor {
        Factor::A => "lora_A.weight",
        Factor::B => "lora_B.weight",
        Factor::Magnitude => "lora_magnitude_vector",
    };
    Ok(format!(
        "base_model.model.model.layers.{layer}.{block}.{module}.{suffix}"
    ))
}

/// Name and shape of one tensor an adapter must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The exact tensor layout (names and shapes, sorted by name) of an adapter for `dims` and `lora`:
/// A `[r, in]` and B `[out, r]` per adapted layer, with each layer's rank after `rank_pattern`,
/// and DoRA's magnitude `[out]`.
pub fn adapter_spec(dims: &ModelDims, lora: &LoraSpec) -> Result<Vec<TensorSpec>, AdapterError> {
    let patterns = lora.patterns()?;
    let mut spec = Vec::with_capacity(dims.num_layers * lora.target_modules.len() * 3);
    for layer in 0..dims.num_layers {
        for module in &lora.target_modules {
            let (in_features, out_features) = dims.module_in_out(module)?;
            let rank = patterns.rank_for(layer, module);
            spec.push(TensorSpec {
                name: peft_key(layer, module, Factor::A)?,
                shape: vec![rank, in_features],
            });
            spec.push(TensorSpec {
                name: peft_key(layer, module, Factor::B)?,
                shape: vec![out_features, rank],
            });
            if lora.use_dora {
                spec.push(TensorSpec {
                    name: peft_key(layer, module, Factor::Magnitude)?,
                    shape: vec![out_features],
                });
            }
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

    /// The string metadata of safetensors bytes (empty when there is none).
    pub fn safetensors_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, AdapterError> {
        let (_, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|error| AdapterError::Malformed(error.to_string().to_lowercase()))?;
        Ok(metadata.metadata().clone().unwrap_or_default())
    }

    /// Checks that the adapter has exactly the tensors of `spec`, with their shapes, and only finite values.
    pub fn validate(&self, spec: &[TensorSpec]) -> Result<(), AdapterError> {
        check_against_spec(
            spec,
            self.tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
        )
    }
}

/// A tensor as the layout check sees it: decoded ([`AdapterTensor`]) or still in its bytes
/// (`tensor_bytes::TensorBytes`).
pub(crate) trait CheckedTensor {
    fn shape(&self) -> &[usize];
    /// Index of the first NaN or infinity.
    fn first_non_finite(&self) -> Option<usize>;
}

impl CheckedTensor for AdapterTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn first_non_finite(&self) -> Option<usize> {
        self.data.iter().position(|value| !value.is_finite())
    }
}

/// The one layout rule of both validators: exactly the tensors of `spec`, with their shapes, and
/// only finite values; the first problem is the error.
pub(crate) fn check_against_spec<'a, T: CheckedTensor + 'a>(
    spec: &[TensorSpec],
    tensors: impl IntoIterator<Item = (&'a str, &'a T)>,
) -> Result<(), AdapterError> {
    let by_name: HashMap<&str, &T> = tensors.into_iter().collect();
    for expected in spec {
        let tensor = by_name
            .get(expected.name.as_str())
            .ok_or_else(|| AdapterError::MissingTensor(expected.name.clone()))?;
        if tensor.shape() != expected.shape.as_slice() {
            return Err(AdapterError::ShapeMismatch {
                name: expected.name.clone(),
                expected: expected.shape.to_vec(),
                got: tensor.shape().to_vec(),
            });
        }
        if let Some(index) = tensor.first_non_finite() {
            return Err(AdapterError::NonFinite {
                name: expected.name.clone(),
                index,
            });
        }
    }
    if by_name.len() != spec.len() {
        let unexpected = by_name
            .keys()
            .find(|name| !spec.iter().any(|expected| expected.name == **name));
        if let Some(name) = unexpected {
            return Err(AdapterError::UnexpectedTensor((*name).to_string()));
        }
    }
    Ok(())
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
    let rank_pattern: serde_json::Map<String, serde_json::Value> = lora
        .rank_pattern
        .iter()
        .map(|(pattern, rank)| (pattern.clone(), (*rank).into()))
        .collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = lora
        .alpha_pattern
        .iter()
        .map(|(pattern, alpha)| (pattern.clone(), f64::from(*alpha).into()))
        .collect();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
        "inference_mode": true,
    })
}

/// Reads PEFT's `adapter_config.json` (as JSON) into a spec. Options this engine cannot honour
/// (other PEFT types, LoRA on layers other than the seven projections, `fan_in_fan_out`, trained
/// biases) are refused by name rather than silently ignored.
pub fn parse_peft_adapter_config(config: &serde_json::Value) -> Result<LoraSpec, AdapterError> {
    let bad = |message: String| AdapterError::InvalidConfig(message);
    let field = |name: &str| config.get(name).filter(|value| !value.is_null());
    if let Some(peft_type) = field("peft_type").and_then(serde_json::Value::as_str)
        && peft_type != "LORA"
    {
        return Err(bad(format!("peft_type {peft_type:?} is not LORA")));
    }
    if field("fan_in_fan_out").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err(bad(
            "fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported".into(),
        ));
    }
    if let Some(bias) = field("bias").and_then(serde_json::Value::as_str)
        && bias != "none"
    {
        return Err(bad(format!(
            "bias {bias:?} is not supported (only \"none\")"
        )));
    }
    // Options that restrict or extend which weights an adapter touches: applying such an adapter
    // as if it covered every layer's projections would be wrong, so they are refused.
    for option in [
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "modules_to_save",
        "trainable_token_indices",
        "target_parameters",
        // Activated LoRA: the update applies only after the invocation tokens.
        "alora_invocation_tokens",
    ] {
        let set = match field(option) {
            None | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Array(items)) => !items.is_empty(),
            Some(serde_json::Value::Object(items)) => !items.is_empty(),
            Some(serde_json::Value::String(text)) => !text.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(format!("{option} is not supported")));
        }
    }
    let flag = |name: &str| field(name).and_then(serde_json::Value::as_bool) == Some(true);
    if flag("lora_bias") {
        return Err(bad("lora_bias is not supported".into()));
    }
    let rank = field("r")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad("no integer \"r\"".into()))? as usize;
    let alpha = field("lora_alpha")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| bad("no number \"lora_alpha\"".into()))? as f32;
    let target_modules: Vec<String> = match field("target_modules") {
        Some(serde_json::Value::Array(modules)) => modules
            .iter()
            .map(|module| {
                module
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| bad(format!("target module {module} is not a string")))
            })
            .collect::<Result<_, _>>()?,
        Some(serde_json::Value::String(regex)) => {
            return Err(bad(format!(
                "target_modules as a regex ({regex:?}) is not supported; list the modules"
            )));
        }
        _ => return Err(bad("no list \"target_modules\"".into())),
    };
    let pattern = |name: &str| -> Result<Vec<(String, f64)>, AdapterError> {
        match field(name) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Object(map)) => map
                .iter()
                .map(|(pattern, value)| {
                    value
                        .as_f64()
                        .map(|value| (pattern.clone(), value))
                        .ok_or_else(|| bad(format!("{name} {pattern:?} is not a number")))
                })
                .collect(),
            Some(_) => Err(bad(format!("{name} is not an object"))),
        }
    };
    let rank_pattern = pattern("rank_pattern")?
        .into_iter()
        .map(|(pattern, rank)| {
            if rank >= 1.0 && rank.fract() == 0.0 {
                Ok((pattern, rank as usize))
            } else {
                Err(bad(format!(
                    "rank_pattern {pattern:?} is not a positive integer"
                )))
            }
        })
        .collect::<Result<_, _>>()?;
    let alpha_pattern = pattern("alpha_pattern")?
        .into_iter()
        .map(|(pattern, alpha)| (pattern, alpha as f32))
        .collect();
    let spec = LoraSpec {
        rank,
        alpha,
        target_modules,
        use_rslora: flag("use_rslora"),
        use_dora: flag("use_dora"),
        dropout: field("lora_dropout")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0) as f32,
        rank_pattern,
        alpha_pattern,
    };
    spec.validate()?;
    Ok(spec)
}

impl fmt::Display for Factor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
            Factor::Magnitude => "lora_magnitude_vector",
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
        LoraSpec::new(2, 4.0, &["q_proj", "v_proj"])
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
        let zero_rank = LoraSpec { rank: 0, ..lora() };
        assert!(matches!(
            zero_rank.validate(),
            Err(AdapterError::InvalidConfig(_))
        ));
    }

    #[test]
    fn rank_and_alpha_patterns_match_like_peft() {
        let spec = LoraSpec {
            rank_pattern: vec![
                ("layers.1.self_attn.q_proj".into(), 6),
                ("q_proj".into(), 3),
                (r"layers\.[0-9]+\.mlp\.(up|down)_proj".into(), 5),
            ],
            alpha_pattern: vec![("v_proj".into(), 1.5)],
            ..LoraSpec::new(
                2,
                4.0,
                &["q_proj", "v_proj", "up_proj", "down_proj", "gate_proj"],
            )
        };
        spec.validate().unwrap();
        // First matching pattern in order wins; a pattern must match a whole dotted suffix.
        assert_eq!(spec.rank_for(1, "q_proj"), 6);
        assert_eq!(spec.rank_for(0, "q_proj"), 3);
        assert_eq!(spec.rank_for(0, "down_proj"), 5);
        assert_eq!(spec.rank_for(0, "gate_proj"), 2);
        assert_eq!(spec.rank_for(0, "v_proj"), 2);
        assert_eq!(spec.max_rank(), 6);
        assert_eq!(spec.alpha_for(0, "v_proj"), 1.5);
        assert_eq!(spec.scale_for(0, "v_proj"), 0.75);
        assert_eq!(spec.scale_for(0, "q_proj"), 4.0 / 3.0);
        // Compiled once, the patterns give every module the same rank, alpha and scale.
        let patterns = spec.patterns().unwrap();
        for layer in 0..3 {
            for module in LORA_MODULES {
                assert_eq!(
                    patterns.rank_for(layer, module),
                    spec.rank_for(layer, module)
                );
                assert_eq!(
                    patterns.alpha_for(layer, module),
                    spec.alpha_for(layer, module)
                );
                assert_eq!(
                    patterns.scale_for(layer, module),
                    spec.scale_for(layer, module)
                );
            }
        }
        assert_eq!(patterns.rank_for(1, "q_proj"), 6);
        assert_eq!(patterns.alpha_for(1, "v_proj"), 1.5);
        let broken = LoraSpec {
            alpha_pattern: vec![("v_proj(".into(), 1.5)],
            ..spec.clone()
        };
        assert!(matches!(
            broken.patterns(),
            Err(AdapterError::InvalidConfig(message)) if message.contains("not a valid regex")
        ));
        let twice = LoraSpec {
            rank_pattern: vec![
                ("q_proj".into(), 3),
                ("v_proj".into(), 2),
                ("q_proj".into(), 4),
            ],
            ..spec.clone()
        };
        assert!(matches!(
            twice.validate(),
            Err(AdapterError::InvalidConfig(message)) if message == "pattern \"q_proj\" is listed twice"
        ));
        // "proj" is not a whole suffix of "q_proj".
        let partial = LoraSpec {
            rank_pattern: vec![("proj".into(), 7)],
            ..lora()
        };
        assert_eq!(partial.rank_for(0, "q_proj"), 2);

        let shapes = adapter_spec(&dims(), &spec).unwrap();
        let shape = |name: &str| {
            shapes
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .shape
                .clone()
        };
        assert_eq!(
            shape("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"),
            [6, 8]
        );
        assert_eq!(
            shape("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
            [8, 5]
        );

        let twice = LoraSpec {
            alpha_pattern: vec![("q_proj".into(), 4.0), ("q_proj".into(), 2.0)],
            ..lora()
        };
        assert!(matches!(
            twice.validate(),
            Err(AdapterError::InvalidConfig(message)) if message.contains("twice")
        ));
        let broken = LoraSpec {
            rank_pattern: vec![("q_proj(".into(), 4)],
            ..lora()
        };
        assert!(matches!(
            broken.validate(),
            Err(AdapterError::InvalidConfig(message)) if message.contains("regex")
        ));
    }

    #[test]
    fn dora_adds_one_magnitude_per_output_row() {
        let dora = LoraSpec {
            use_dora: true,
            ..lora()
        };
        let spec = adapter_spec(&dims(), &dora).unwrap();
        assert_eq!(spec.len(), 12);
        let magnitude = spec
            .iter()
            .find(|t| {
                t.name == "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
            })
            .unwrap();
        assert_eq!(magnitude.shape, [4]);
    }

    #[test]
    fn peft_config_round_trips_every_option_and_refuses_what_it_cannot_apply() {
        let full = LoraSpec {
            use_rslora: true,
            use_dora: true,
            dropout: 0.05,
            rank_pattern: vec![("v_proj".into(), 4), ("q_proj".into(), 1)],
            alpha_pattern: vec![("q_proj".into(), 2.0)],
            ..lora()
        };
        let config = peft_adapter_config(&full, "base");
        assert_eq!(parse_peft_adapter_config(&config).unwrap(), full);
        // Pattern order is PEFT's precedence, so it must survive the JSON text.
        let text = config.to_string();
        assert!(text.find("\"v_proj\":4").unwrap() < text.find("\"q_proj\":1").unwrap());

        for (field, value, needle) in [
            ("peft_type", serde_json::json!("IA3"), "peft_type"),
            ("fan_in_fan_out", serde_json::json!(true), "fan_in_fan_out"),
            ("bias", serde_json::json!("all"), "bias"),
            ("target_modules", serde_json::json!(".*proj"), "regex"),
            ("target_modules", serde_json::json!(["lm_head"]), "lm_head"),
            ("r", serde_json::json!(0), "rank"),
            (
                "rank_pattern",
                serde_json::json!({"q_proj": 1.5}),
                "rank_pattern",
            ),
            ("lora_dropout", serde_json::json!(1.0), "dropout"),
            (
                "layers_to_transform",
                serde_json::json!([0]),
                "layers_to_transform",
            ),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
            ("lora_bias", serde_json::json!(true), "lora_bias"),
            (
                "alora_invocation_tokens",
                serde_json::json!([128006, 78191]),
                "alora_invocation_tokens",
            ),
        ] {
            let mut bad = config.clone();
            bad[field] = value;
            let error = parse_peft_adapter_config(&bad).unwrap_err().to_string();
            assert!(error.contains(needle), "{field}: {error}");
        }
    }
}
