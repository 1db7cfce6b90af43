//! Reading a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

use std::path::Path;

use fedlora_proto::adapter::{Adapter, LoraSpec};

use crate::error::{ClientError, Result};

/// The LoRA spec and tensors of a PEFT adapter directory (plain LoRA or rsLoRA). DoRA adapters
/// are refused (not supported yet) rather than silently mis-applied.
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
    if config.get("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err(bad("use_dora adapters are not supported yet"));
    }
    let use_rslora = config
        .get("use_rslora")
        .and_then(serde_json::Value::as_bool)
        == Some(true);
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
            use_rslora,
            rank,
            alpha,
            target_modules,
        },
        Adapter::from_safetensors(&bytes)?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::{AdapterTensor, peft_adapter_config};

    use super::*;

    #[test]
    fn reads_back_what_peft_format_writes_including_rslora_and_refuses_dora() {
        let dir = tempfile::tempdir().unwrap();
        let lora = LoraSpec {
            rank: 2,
            alpha: 4.0,
            target_modules: vec!["q_proj".into()],
            use_rslora: true,
        };
        let mut adapter = Adapter::default();
        adapter.tensors.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            AdapterTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        let mut config = peft_adapter_config(&lora, "base");
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.path().join("adapter_model.safetensors"),
            adapter.to_safetensors(None).unwrap(),
        )
        .unwrap();
        let (read_lora, read_adapter) = read_peft_adapter(dir.path()).unwrap();
        assert_eq!((read_lora, read_adapter), (lora, adapter));

        config["use_dora"] = serde_json::json!(true);
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        assert!(
            read_peft_adapter(dir.path())
                .unwrap_err()
                .to_string()
                .contains("use_dora")
        );
    }
}
