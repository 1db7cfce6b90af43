//! Loading a Llama-family model from a Hugging Face directory (`config.json`, `model.safetensors`
//! or shards listed in `model.safetensors.index.json`, `tokenizer.json`), and its fingerprint.

pub mod config;
pub mod frozen;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod peft;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Device;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

pub use config::LlamaConfig;
pub use llama::Llama;

use crate::error::{ClientError, Result};

/// A base model on disk with its tokenizer.
pub struct BaseModel {
    pub dir: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// End-of-sequence id used to separate packed documents.
    pub eos_token_id: u32,
}

impl BaseModel {
    /// Loads a model: a Hugging Face directory (`config.json`, safetensors weights,
    /// `tokenizer.json`) or a Llama `.gguf` file.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if is_gguf(dir) {
            return gguf::load_gguf(dir, device);
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut weights = HashMap::new();
        for file in weight_files(dir)? {
            weights.extend(candle_core::safetensors::load(&file, device)?);
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|error| {
            ClientError::Tokenizer(format!("{}: {error}", tokenizer_path.display()))
        })?;
        let eos_token_id = config
            .eos_token_id()
            .or_else(|| tokenizer.token_to_id("</s>"))
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .ok_or_else(|| {
                ClientError::Tokenizer("no eos_token_id in config.json or tokenizer".into())
            })?;
        let model = Llama::from_weights(config, weights, device)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            eos_token_id,
        })
    }
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
