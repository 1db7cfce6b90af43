//! Loading a Llama-family model from a Hugging Face directory (`config.json`, `model.safetensors`
//! or shards listed in `model.safetensors.index.json`, `tokenizer.json`), and its fingerprint.

pub mod attention;
pub mod combine;
pub mod config;
pub mod cpu_peak;
pub mod export;
pub mod frozen;
pub mod fused;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod packed_gemm;
pub mod peft;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

pub use config::LlamaConfig;
pub use export::{ExportOptions, MergedExport, WeightDtype, export_merged, merged_template_caveat};
pub use fused::DocumentStarts;
pub use llama::Llama;

use crate::error::{ClientError, Result};

/// A base model on disk with its tokenizer.
pub struct BaseModel {
    pub dir: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// End-of-sequence id used to separate packed documents.
    pub eos_token_id: u32,
    /// The model's own chat template, when it ships one (instruction data is rendered in it).
    pub chat_template: Option<std::sync::Arc<crate::chat::ChatTemplate>>,
    /// Why the model's own chat template was refused, where it ships one fedlora cannot use
    /// (see [`crate::chat::usable`]); instruction data was then laid out in ChatML or Alpaca.
    pub chat_template_refused: Option<String>,
    /// The dtype the checkpoint stores most of its weights in (f32, bf16 or f16), whatever the
    /// model is held in now: what a merged export writes by default. f32 for a quantized GGUF
    /// file, the one type that holds its dequantized blocks exactly.
    pub stored_dtype: WeightDtype,
}

impl BaseModel {
    /// Loads a model: a Hugging Face directory (`config.json`, safetensors weights,
    /// `tokenizer.json`) or a Llama-family `.gguf` file (architectures `llama` and `qwen2`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if is_gguf(dir) {
            return gguf::load_gguf(dir, device, false);
        }
        Self::load_hf(dir, device, None)
    }

    /// A Hugging Face directory, its projections quantized as they are read with `quantize`
    /// (see [`load_llama_quantizing`]).
    fn load_hf(
        dir: &Path,
        device: &Device,
        quantize: Option<candle_core::quantized::GgmlDType>,
    ) -> Result<Self> {
        let (model, stored_dtype) = load_llama_counting(dir, device, quantize)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_error = |error: tokenizers::Error| {
            ClientError::Tokenizer(format!("{}: {error}", tokenizer_path.display()))
        };
        let mut tokenizer = read_tokenizer(&tokenizer_path)?;
        // A saved tokenizer.json may carry the truncation and padding of the session that saved
        // it; transformers' `tokenizer(text)` ignores them, and so must training here (they
        // would cut documents short and make pad tokens targets).
        tokenizer.with_truncation(None).map_err(tokenizer_error)?;
        tokenizer.with_padding(None);
        // Where config.json names none: tokenizer_config.json's eos_token (a string or an
        // AddedToken object), then the usual spellings.
        let configured_eos = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|config| {
                crate::chat::token_text(config.get("eos_token")?).map(str::to_string)
            });
        let eos_token_id = model
            .config()
            .eos_token_id()
            .or_else(|| tokenizer.token_to_id(configured_eos.as_deref()?))
            .or_else(|| tokenizer.token_to_id("</s>"))
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .or_else(|| tokenizer.token_to_id("<|end_of_text|>"))
            .ok_or_else(|| {
                ClientError::Tokenizer("no eos_token_id in config.json or tokenizer".into())
            })?;
        let (chat_template, chat_template_refused) =
            crate::chat::usable(crate::chat::ChatTemplate::from_model_dir(dir));
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            eos_token_id,
            chat_template,
            chat_template_refused,
            stored_dtype,
        })
    }
}

/// The block type a Hugging Face checkpoint's projections are quantized to on load (QLoRA).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// 8.5 bits per weight, blocks of 32: close to f32 (the default).
    #[default]
    Q8_0,
    /// 4.5 bits per weight, super-blocks of 256 (llama.cpp's `Q4_K`): about half of Q8_0's memory.
    Q4K,
}

/// How a site holds its frozen base model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BasePrecision {
    /// f32 weights and products (the default; exact against PyTorch/PEFT in f32), packed once
    /// for the AVX-512 or AVX2 kernel where the CPU has one ([`Llama::pack_base_f32`]): faster,
    /// but the projections take twice their memory, and a tied output head adds two packed
    /// copies of the embedding table.
    #[default]
    F32,
    /// f32 as loaded, multiplied by candle's GEMM: the projections' memory once, a slower step.
    F32Unpacked,
    /// Projections and output head in bf16, bf16 products with f32 accumulation (PyTorch's bf16
    /// autocast); faster than f32 only where the CPU has AMX or its bf16 dot products outrun its
    /// f32 FMAs (AMD Zen 4 and Zen 5), see [`Llama::pack_base_bf16`]. CPU only.
    Bf16,
    /// QLoRA: projections quantized (to the given type, or a GGUF's own types): about a
    /// quarter (Q8_0) or an eighth (Q4K) of f32's memory.
    Quantized(QuantType),
}

impl QuantType {
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        match self {
            Self::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
            Self::Q4K => candle_core::quantized::GgmlDType::Q4K,
        }
    }
}

impl BaseModel {
    /// The tokens that end a generated answer: every end-of-sequence id of `config.json` and of
    /// `generation_config.json` (Llama 3.1 Instruct lists `<|eom_id|>` and `<|eot_id|>` there,
    /// Qwen2.5 Instruct `<|im_end|>` and `<|endoftext|>`), `<|im_end|>` where the tokenizer has
    /// it, and the special tokens the model's chat template writes after an answer.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut stop = vec![self.eos_token_id];
        stop.extend(self.model.config().eos_token_ids());
        let generation = self.dir.join("generation_config.json");
        if let Some(eos) = std::fs::read_to_string(&generation)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|config| config.get("eos_token_id").map(config::token_ids))
        {
            stop.extend(eos);
        }
        stop.extend(self.tokenizer.token_to_id("<|im_end|>"));
        if let Some(template) = &self.chat_template {
            stop.extend(self.tokenizer.token_to_id(template.eos_token()));
            stop.extend(template.end_of_turn_ids(&self.tokenizer));
        }
        stop.sort_unstable();
        stop.dedup();
        stop
    }

    /// How instruction data is laid out for this model: its own chat template, else ChatML or
    /// Alpaca by its tokenizer ([`crate::chat::PromptTemplate::for_model`]).
    pub fn prompt_template(&self) -> crate::chat::PromptTemplate {
        crate::chat::PromptTemplate::for_model(self.chat_template.as_ref(), &self.tokenizer)
    }

    /// [`BaseModel::load`], then the frozen base held as `base` says: quantized as
    /// [`BaseModel::load_quantized`] does, else [`Llama::apply_base_precision`].
    pub fn load_as(path: &Path, device: &Device, base: BasePrecision) -> Result<Self> {
        if let BasePrecision::Quantized(quant) = base {
            return Self::load_quantized(path, device, quant);
        }
        let mut loaded = Self::load(path, device)?;
        loaded.model.apply_base_precision(base)?;
        Ok(loaded)
    }

    /// QLoRA: as [`BaseModel::load`] with the frozen projections quantized. A GGUF file keeps its
    /// quantized types as loaded (a Llama file's q/k requantized to Q8_0, see
    /// `gguf::load_gguf`; `quant` is not used); a Hugging Face checkpoint's projections are
    /// quantized to `quant` as they are read (see [`load_llama_quantizing`]).
    pub fn load_quantized(path: &Path, device: &Device, quant: QuantType) -> Result<Self> {
        if is_gguf(path) {
            return gguf::load_gguf(path, device, true);
        }
        Self::load_hf(path, device, Some(quant.ggml()))
    }
}

/// Loads the model of a Hugging Face directory (`config.json` and safetensors weights, single or
/// sharded, f32/f16/bf16), without its tokenizer.
pub fn load_llama(dir: &Path, device: &Device) -> Result<Llama> {
    load_llama_quantizing(dir, device, None)
}

/// As [`load_llama`]; with `quantize` (QLoRA), each projection is quantized to that type (or
/// Q8_0, or kept, where its rows do not fit: [`llama::quantized_type_for`]) as soon as it is read.
/// Tensors are read from their files one at a time and made f32 (and quantized) on the spot, so a
/// quantized base never holds the checkpoint, nor its projections in f32, all at once: the peak
/// is about what is kept plus a few copies of the largest tensor (its bytes as read, as stored,
/// in f32), where quantizing after loading needed 4 bytes per parameter first (32 GB for an 8B
/// model).
pub fn load_llama_quantizing(
    dir: &Path,
    device: &Device,
    quantize: Option<candle_core::quantized::GgmlDType>,
) -> Result<Llama> {
    Ok(load_llama_counting(dir, device, quantize)?.0)
}

/// As [`load_llama_quantizing`], with the dtype the checkpoint stores most of its weights in
/// ([`BaseModel::stored_dtype`]).
fn load_llama_counting(
    dir: &Path,
    device: &Device,
    quantize: Option<candle_core::quantized::GgmlDType>,
) -> Result<(Llama, WeightDtype)> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let mut weights = HashMap::new();
    let mut quantized = HashMap::new();
    let mut stored = StoredDtypes::default();
    for file in weight_files(dir)? {
        for_each_tensor(&file, device, |name, tensor| {
            stored.add(tensor.dtype(), tensor.elem_count());
            let tensor = tensor.to_dtype(DType::F32)?;
            let fitting = match quantize {
                Some(dtype) if llama::is_projection_weight(&name) => {
                    llama::quantized_type_for(tensor.dim(candle_core::D::Minus1)?, dtype)
                }
                _ => None,
            };
            match fitting {
                Some(dtype) => {
                    let tensor = candle_core::quantized::QTensor::quantize(&tensor, dtype)?;
                    quantized.insert(name, std::sync::Arc::new(tensor));
                }
                None => {
                    weights.insert(name, tensor);
                }
            }
            Ok(())
        })?;
    }
    let model = Llama::from_parts(config, weights, quantized, device)?;
    Ok((model, stored.most_common()))
}

/// Counts a checkpoint's elements by the float type they are stored in.
#[derive(Debug, Default)]
pub(crate) struct StoredDtypes {
    /// Elements stored as f32 (or another type, see [`StoredDtypes::add`]), bf16, f16.
    elements: [usize; 3],
}

impl StoredDtypes {
    const TYPES: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16];

    /// Counts `elements` stored as `dtype`: f16 and bf16 as themselves, any other type (f32,
    /// f64, quantized blocks dequantized to f32) as f32.
    pub(crate) fn add(&mut self, dtype: DType, elements: usize) {
        let slot = Self::TYPES
            .iter()
            .position(|weight| weight.dtype() == dtype)
            .unwrap_or(0);
        self.elements[slot] += elements;
    }

    /// The type that holds the most elements (the first of f32, bf16, f16 on a tie: f32 where
    /// nothing was counted).
    pub(crate) fn most_common(&self) -> WeightDtype {
        let mut best = 0;
        for slot in 1..Self::TYPES.len() {
            if self.elements[slot] > self.elements[best] {
                best = slot;
            }
        }
        Self::TYPES[best]
    }
}

/// Calls `each` with every tensor of a safetensors file, in file order, each read on its own
/// (the file is never in memory whole), with errors that name the file: a missing shard, a Git
/// LFS pointer left where the weights should be (a clone without `git lfs`), a truncated or
/// otherwise malformed file.
fn for_each_tensor(
    file: &Path,
    device: &Device,
    mut each: impl FnMut(String, candle_core::Tensor) -> Result<()>,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let invalid = |message: String| ClientError::Weights {
        path: file.to_path_buf(),
        message,
    };
    let mut reader = std::fs::File::open(file).map_err(ClientError::io(file))?;
    let file_len = reader.metadata().map_err(ClientError::io(file))?.len();
    let mut head = [0u8; 64];
    let read = reader.read(&mut head).map_err(ClientError::io(file))?;
    if head[..read].starts_with(b"version https://git-lfs") {
        return Err(invalid(
            "a Git LFS pointer, not the weights: fetch them with `git lfs pull`".into(),
        ));
    }
    let Some(header_len) = head
        .get(..8)
        .filter(|_| read >= 8)
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map(u64::from_le_bytes)
    else {
        return Err(invalid(format!(
            "{file_len} bytes, too short for a safetensors file (a failed download?)"
        )));
    };
    // safetensors' own limit on the JSON header.
    if header_len > 100_000_000 || header_len.saturating_add(8) > file_len {
        return Err(invalid(format!(
            "not a safetensors file (a header of {header_len} bytes in a file of {file_len})"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader
        .seek(SeekFrom::Start(8))
        .and_then(|_| reader.read_exact(&mut header))
        .map_err(ClientError::io(file))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|error| invalid(format!("not a safetensors file: {error}")))?;
    let mut tensors: Vec<_> = metadata.tensors().into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let data_start = 8 + header_len;
    let data_len = tensors.last().map_or(0, |(_, info)| info.data_offsets.1) as u64;
    if data_start + data_len != file_len {
        return Err(invalid(format!(
            "truncated or damaged: its header describes {} bytes, the file holds {file_len}",
            data_start + data_len
        )));
    }
    let mut buffer = Vec::new();
    for (name, info) in tensors {
        use candle_core::DType;
        use safetensors::Dtype;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::F8_E4M3 => DType::F8E4M3,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::I16 => DType::I16,
            Dtype::U32 => DType::U32,
            Dtype::U8 => DType::U8,
            other => {
                return Err(invalid(format!(
                    "tensor {name:?} is {other:?}, a type this engine does not read"
                )));
            }
        };
        let (start, end) = info.data_offsets;
        buffer.resize(end - start, 0);
        reader
            .seek(SeekFrom::Start(data_start + start as u64))
            .and_then(|_| reader.read_exact(&mut buffer))
            .map_err(ClientError::io(file))?;
        let tensor = candle_core::Tensor::from_raw_buffer(&buffer, dtype, &info.shape, device)
            .map_err(|error| invalid(format!("tensor {name:?}: {error}")))?;
        each(name, tensor)?;
    }
    Ok(())
}

/// A `tokenizer.json`, parsed as JSON first: the tokenizers crate panics on some syntax errors
/// (its decoder's untagged deserializer `expect`s), which from a parsed value cannot occur.
fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(ClientError::io(path))?;
    let error = |message: String| ClientError::Tokenizer(format!("{}: {message}", path.display()));
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|json| error(format!("not valid JSON: {json}")))?;
    serde_json::from_value(value).map_err(|tokenizer| error(tokenizer.to_string()))
}

fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|extension| extension == "gguf")
}

/// The safetensors files of a model directory: the shards named by `model.safetensors.index.json`
/// when it exists, else `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(ClientError::io(&index_path))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| ClientError::Config {
                path: index_path.clone(),
                message: error.to_string(),
            })?;
        let shards: BTreeSet<&str> = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| ClientError::Config {
                path: index_path.clone(),
                message: "no weight_map object".into(),
            })?
            .values()
            .filter_map(serde_json::Value::as_str)
            .collect();
        // Shards are files of this directory: a name that leads elsewhere is refused.
        if let Some(stray) = shards.iter().find(|shard| {
            let path = Path::new(shard);
            path.file_name() != Some(path.as_os_str())
        }) {
            return Err(ClientError::Config {
                path: index_path.clone(),
                message: format!("weight_map names {stray:?}, not a file of this directory"),
            });
        }
        if shards.is_empty() {
            return Err(ClientError::Config {
                path: index_path.clone(),
                message: "weight_map names no shard".into(),
            });
        }
        return Ok(shards.into_iter().map(|shard| dir.join(shard)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(ClientError::Unsupported(format!(
            "no model.safetensors or model.safetensors.index.json in {}",
            dir.display()
        )))
    }
}

/// sha256 over `config.json` and the weight files (or the one `.gguf` file), in order: two sites hold the same base model
/// exactly when their fingerprints agree.
pub fn fingerprint(dir: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let files = if is_gguf(dir) {
        vec![dir.to_path_buf()]
    } else {
        let mut files = vec![dir.join("config.json")];
        files.extend(weight_files(dir)?);
        files
    };
    let mut buffer = vec![0u8; 1 << 20];
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(ClientError::io(&path))?;
        loop {
            let read = file.read(&mut buffer).map_err(ClientError::io(&path))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The device to train on: CUDA device 0 when built with the `cuda` feature and one is present,
/// else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::testing::{Corruptible, corruption_never_panics, logits};
    use candle_core::Tensor;

    use super::*;
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    /// QLoRA on a Hugging Face checkpoint quantizes each projection as it is read: Q4K where its
    /// rows are whole blocks of 256, Q8_0 where they are whole blocks of 32 only (down_proj's 288
    /// inputs here), f32 where neither fits (176); and the same model as quantizing after
    /// loading.
    #[test]
    fn quantizing_while_loading_matches_quantizing_after() {
        use candle_core::quantized::GgmlDType;
        for (intermediate, down) in [(288, Some(GgmlDType::Q8_0)), (176, None)] {
            let dir = tempfile::tempdir().unwrap();
            let spec = TinyModelSpec {
                hidden_size: 256,
                intermediate_size: intermediate,
                ..TinyModelSpec::default()
            };
            write_tiny_model(dir.path(), &spec).unwrap();
            let during =
                BaseModel::load_quantized(dir.path(), &Device::Cpu, QuantType::Q4K).unwrap();
            let types = during.model.projection_dtypes();
            for (module, dtype) in &types {
                let want = if module.ends_with("down_proj") {
                    down
                } else {
                    Some(GgmlDType::Q4K)
                };
                assert_eq!(*dtype, want, "{module}");
            }
            let mut after = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
            after.model.quantize_base(GgmlDType::Q4K).unwrap();
            assert_eq!(types, after.model.projection_dtypes());
            let input = Tensor::new(&[[5u32, 70, 71, 72, 3, 90]], &Device::Cpu).unwrap();
            assert_eq!(logits(&during.model, &input), logits(&after.model, &input));
        }
    }

    /// Weight files that are not weights get errors naming the file: a Git LFS pointer (a
    /// clone without `git lfs`), a truncated download, a missing shard.
    #[test]
    fn unreadable_weight_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let weights = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        let error = |contents: &[u8]| {
            std::fs::write(&weights, contents).unwrap();
            BaseModel::load(dir.path(), &Device::Cpu)
                .err()
                .unwrap()
                .to_string()
        };
        let pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n";
        let message = error(pointer);
        assert!(
            message.contains("model.safetensors") && message.contains("git lfs pull"),
            "{message}"
        );
        let message = error(&bytes[..bytes.len() / 2]);
        assert!(
            message.contains("model.safetensors") && message.contains("truncated"),
            "{message}"
        );
        let message = error(b"{}");
        assert!(
            message.contains("unreadable weights") && message.contains("too short"),
            "{message}"
        );
        std::fs::remove_file(&weights).unwrap();
        let message = BaseModel::load(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("model.safetensors"), "{message}");
    }

    /// A config.json that does not belong with its weights is refused naming what disagrees:
    /// a size (the tensor and both shapes), sizes past any real model's (before anything is
    /// allocated from them); fewer layers than the weights hold load the first. An adapter whose
    /// config names a rank its tensors do not have is refused before factors of that rank are
    /// made.
    #[test]
    fn configs_that_disagree_with_their_weights_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let config_file = dir.path().join("config.json");
        let original = std::fs::read_to_string(&config_file).unwrap();
        let error = |key: &str, value: serde_json::Value| {
            let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
            config[key] = value;
            std::fs::write(&config_file, config.to_string()).unwrap();
            let error = BaseModel::load(dir.path(), &Device::Cpu).err().unwrap();
            std::fs::write(&config_file, &original).unwrap();
            error.to_string()
        };
        let message = error("intermediate_size", serde_json::json!(192));
        assert!(
            message.contains("model.layers.0.mlp.gate_proj.weight")
                && message.contains("[176, 64]")
                && message.contains("[192, 64]"),
            "{message}"
        );
        let message = error("num_hidden_layers", serde_json::json!(1_000_000_000_000u64));
        assert!(
            message.contains("num_hidden_layers 1000000000000 is outside"),
            "{message}"
        );
        let message = error("vocab_size", serde_json::json!(0));
        assert!(message.contains("vocab_size 0 is outside"), "{message}");
        let message = error("rms_norm_eps", serde_json::json!(-1e-5));
        assert!(message.contains("rms_norm_eps"), "{message}");

        // Fewer layers than the weights hold: the first are used (logged), as transformers does
        // for a config cut short to try a model quickly.
        let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
        config["num_hidden_layers"] = serde_json::json!(1);
        std::fs::write(&config_file, config.to_string()).unwrap();
        let shallow = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(shallow.model.config().dims().num_layers, 1);
        std::fs::write(&config_file, &original).unwrap();

        let mut base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let lora = fedlora_proto::adapter::LoraSpec::new(4, 8.0, &["q_proj"]);
        base.model.attach_lora(&lora, 1).unwrap();
        let adapter = base.model.export_adapter().unwrap();
        let huge = fedlora_proto::adapter::LoraSpec {
            rank: 1 << 40,
            ..lora
        };
        let message = base
            .model
            .set_adapter(&huge, &adapter)
            .unwrap_err()
            .to_string();
        assert!(message.contains("lora_A"), "{message}");
    }

    /// Random corruptions of an adapter directory (its config's text, its weights' header) are
    /// refused or applied, never a panic: 200 cases per run, or `FEDLORA_ADAPTER_CASES`.
    #[test]
    fn corrupted_adapters_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let lora = fedlora_proto::adapter::LoraSpec {
            use_dora: true,
            rank_pattern: vec![("v_proj".into(), 2)],
            alpha_pattern: vec![("layers\\.1\\..*".into(), 3.0)],
            ..fedlora_proto::adapter::LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])
        };
        base.model.attach_lora(&lora, 1).unwrap();
        let adapter = dir.path().join("adapter");
        peft::write_peft_adapter(
            &adapter,
            &lora,
            "tiny",
            &peft::peft_weights(&base.model.export_adapter().unwrap()).unwrap(),
        )
        .unwrap();
        let files = ["adapter_config.json", "adapter_model.safetensors"].map(|name| {
            let path = adapter.join(name);
            let bytes = std::fs::read(&path).unwrap();
            // The config whole; of the weights, the length of their JSON header and the header.
            let prefix = match name {
                "adapter_config.json" => bytes.len(),
                _ => 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize,
            };
            Corruptible {
                path,
                bytes,
                prefix,
            }
        });
        corruption_never_panics("FEDLORA_ADAPTER_CASES", 200, 5, &files, b"9-", || {
            let (spec, weights) = peft::read_peft_adapter(&adapter)?;
            base.model.set_adapter(&spec, &weights)
        });
    }

    /// Random corruptions of a model directory's JSON files (config, tokenizer, tokenizer
    /// config with its chat template) and of a site's data are refused or loaded, never a panic:
    /// 100 cases per run, or `FEDLORA_MODEL_DIR_CASES`.
    #[test]
    fn corrupted_model_directories_and_data_never_panic() {
        use crate::chat::PromptTemplate;
        use crate::train::data::{SiteData, make_windows};
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let template = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] | trim }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({ "chat_template": template, "eos_token": "</s>", "bos_token": "<s>" })
                .to_string(),
        )
        .unwrap();
        let data = dir.path().join("data.jsonl");
        let lines: Vec<String> = (0..30)
            .map(|i| {
                if i % 2 == 0 {
                    serde_json::json!({ "text": format!("note {i}: stable, discharged") })
                } else {
                    serde_json::json!({ "instruction": "Summarise", "input": format!("case {i}"), "output": "ok" })
                }
                .to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let files: Vec<Corruptible> = [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "data.jsonl",
        ]
        .iter()
        .map(|name| {
            let path = dir.path().join(name);
            let bytes = std::fs::read(&path).unwrap();
            Corruptible {
                path,
                prefix: bytes.len(),
                bytes,
            }
        })
        .collect();
        corruption_never_panics("FEDLORA_MODEL_DIR_CASES", 100, 3, &files, b"9\"{", || {
            let base = BaseModel::load(dir.path(), &Device::Cpu)?;
            let template: PromptTemplate = base.prompt_template();
            let site = SiteData::load(&data, &base.tokenizer, &template, "text")?;
            site.check_vocab(&data, base.model.config().vocab_size)?;
            let windows = make_windows(&site.train, base.eos_token_id, 16);
            crate::train::evaluate_heldout(&base.model, &windows, 4, 2)
        });
    }

    /// Generation stops on every end-of-sequence id of config.json and generation_config.json
    /// (Llama 3.1 Instruct lists three there).
    #[test]
    fn stop_ids_gather_every_end_of_sequence_id() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"bos_token_id": 1, "eos_token_id": [2, 40, 41]}"#,
        )
        .unwrap();
        let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(base.stop_ids(), [2, 40, 41]);
    }

    /// Without an eos_token_id in config.json, the end of sequence is tokenizer_config.json's
    /// eos_token.
    #[test]
    fn eos_falls_back_to_the_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let config_path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("eos_token_id");
        std::fs::write(&config_path, config.to_string()).unwrap();
        // An AddedToken object, or a plain string.
        for eos in [r#"{"content": "<unk>", "special": true}"#, r#""<unk>""#] {
            std::fs::write(
                dir.path().join("tokenizer_config.json"),
                format!(r#"{{"eos_token": {eos}}}"#),
            )
            .unwrap();
            let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
            assert_eq!(
                base.eos_token_id,
                base.tokenizer.token_to_id("<unk>").unwrap()
            );
        }
    }

    /// The truncation and padding a saved tokenizer.json may carry are ignored, as transformers'
    /// `tokenizer(text)` ignores them.
    #[test]
    fn saved_truncation_and_padding_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let path = dir.path().join("tokenizer.json");
        let text = "Transfer of 12.50 EUR on 2026-03-04, reference 77";
        let plain = Tokenizer::from_file(&path)
            .unwrap()
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(plain.len() > 8);
        let mut saved = Tokenizer::from_file(&path).unwrap();
        saved
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: 4,
                ..Default::default()
            }))
            .unwrap();
        saved.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(64),
            ..Default::default()
        }));
        assert_eq!(saved.encode(text, true).unwrap().get_ids().len(), 64);
        saved.save(&path, false).unwrap();
        let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(base.tokenizer.encode(text, true).unwrap().get_ids(), plain);
    }

    /// A checkpoint split into shards with `model.safetensors.index.json` (as transformers
    /// saves large models) loads to the same model; an index naming a file outside the
    /// directory, or no shard, is refused.
    #[test]
    fn sharded_checkpoints_load_like_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, sharded) = (dir.path().join("whole"), dir.path().join("sharded"));
        write_tiny_model(&whole, &TinyModelSpec::default()).unwrap();
        std::fs::create_dir_all(&sharded).unwrap();
        for name in ["config.json", "tokenizer.json"] {
            std::fs::copy(whole.join(name), sharded.join(name)).unwrap();
        }
        let tensors =
            candle_core::safetensors::load(whole.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for (shard, half) in names.chunks(names.len().div_ceil(2)).enumerate() {
            let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
            let part: HashMap<String, Tensor> = half
                .iter()
                .map(|&name| (name.clone(), tensors[name].clone()))
                .collect();
            candle_core::safetensors::save(&part, sharded.join(&file)).unwrap();
            for &name in half {
                weight_map.insert(name.clone(), file.clone().into());
            }
        }
        let index = sharded.join("model.safetensors.index.json");
        let write_index = |weight_map: &serde_json::Map<String, serde_json::Value>| {
            let index_json = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(&index, index_json.to_string()).unwrap();
        };
        write_index(&weight_map);
        assert_eq!(weight_files(&sharded).unwrap().len(), 2);
        let input = Tensor::new(&[[5u32, 70, 71, 72, 3, 90]], &Device::Cpu).unwrap();
        let expected = logits(
            &BaseModel::load(&whole, &Device::Cpu).unwrap().model,
            &input,
        );
        let got = logits(
            &BaseModel::load(&sharded, &Device::Cpu).unwrap().model,
            &input,
        );
        assert_eq!(expected, got);

        let first = names[0].clone();
        for stray in [
            "../whole/model.safetensors",
            "/etc/passwd",
            "sub/model.safetensors",
            "",
        ] {
            let mut hostile = weight_map.clone();
            hostile.insert(first.clone(), stray.into());
            write_index(&hostile);
            let error = weight_files(&sharded).unwrap_err().to_string();
            assert!(
                error.contains("not a file of this directory"),
                "{stray}: {error}"
            );
        }
        write_index(&serde_json::Map::new());
        let error = weight_files(&sharded).unwrap_err().to_string();
        assert!(error.contains("no shard"), "{error}");
    }
}
