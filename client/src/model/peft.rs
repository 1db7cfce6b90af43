//! Reading a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

use std::path::Path;

use fedlora_proto::adapter::{Adapter, LoraSpec};

use crate::error::{ClientError, Result};

/// The LoRA spec and tensors of a PEFT adapter directory. rsLoRA and DoRA adapters are refused
/// (not supported yet) rather than silently mis-scaled.
pub fn read_peft_adapter(dir: &Path) -> Result<(LoraSpec, Adapter)> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(ClientError::io(&config_path))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ClientError::Config {
            path: config_path.clone(),
            message: error.to_string(),
        })?;
    let bad = |message: &str| ClientError::Config {
        path: config_path.clone(),
        message: message.to_string(),
    };
    for flag in ["use_rslora", "use_dora"] {
        if config.get(flag).and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(bad(&format!("{flag} adapters are not supported yet")));
        }
    }
    let rank = config
        .get("r")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad("no integer \"r\""))? as usize;
    let alpha = config
        .get("lora_alpha")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| bad("no number \"lora_alpha\""))? as f32;
    let target_modules: Vec<String> = config
        .get("target_modules")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad("no list \"target_modules\""))?
        .iter()
        .filter_map(|module| module.as_str().map(String::from))
        .collect();
    let weights_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights_path).map_err(ClientError::io(&weights_path))?;
    Ok((
        LoraSpec {
            rank,
            alpha,
            target_modules,
        },
        Adapter::from_safetensors(&bytes)?,
    ))
}
