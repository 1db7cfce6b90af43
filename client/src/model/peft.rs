//! PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`): read and
//! written exactly as PEFT does, including rsLoRA, DoRA, dropout and per-module rank/alpha.

use std::path::Path;

use fedlora_proto::adapter::{Adapter, LoraSpec, parse_peft_adapter_config, peft_adapter_config};

use sha2::{Digest, Sha256};

use crate::error::{ClientError, Result};

/// The LoRA spec and tensors of a PEFT adapter directory. Options this engine cannot apply are
/// refused by name (see `parse_peft_adapter_config`) rather than silently mis-applied.
pub fn read_peft_adapter(dir: &Path) -> Result<(LoraSpec, Adapter)> {
    let (text, bytes) = read_adapter_files(dir)?;
    parse_adapter_files(dir, &text, &bytes)
}

/// As [`read_peft_adapter`], with a sha256 over the two files as they were read (each after its
/// length): what was checked is what is used.
pub(crate) fn read_peft_adapter_fingerprinted(dir: &Path) -> Result<(LoraSpec, Adapter, String)> {
    let (text, bytes) = read_adapter_files(dir)?;
    let mut hasher = Sha256::new();
    for file in [text.as_bytes(), &bytes] {
        hasher.update((file.len() as u64).to_le_bytes());
        hasher.update(file);
    }
    let (lora, adapter) = parse_adapter_files(dir, &text, &bytes)?;
    Ok((lora, adapter, hex::encode(hasher.finalize())))
}

/// An adapter directory's config text and weight bytes.
fn read_adapter_files(dir: &Path) -> Result<(String, Vec<u8>)> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(ClientError::io(&config_path))?;
    let weights_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights_path).map_err(ClientError::io(&weights_path))?;
    Ok((text, bytes))
}

/// The spec and tensors of an adapter directory's files as read; errors name the file.
fn parse_adapter_files(dir: &Path, text: &str, bytes: &[u8]) -> Result<(LoraSpec, Adapter)> {
    let config_error = |message: String| ClientError::Config {
        path: dir.join("adapter_config.json"),
        message,
    };
    let config: serde_json::Value =
        serde_json::from_str(text).map_err(|error| config_error(error.to_string()))?;
    let lora =
        parse_peft_adapter_config(&config).map_err(|error| config_error(error.to_string()))?;
    let adapter = Adapter::from_safetensors(bytes).map_err(|error| ClientError::Weights {
        path: dir.join("adapter_model.safetensors"),
        message: error.to_string(),
    })?;
    Ok((lora, adapter))
}

/// The base model an adapter directory's `adapter_config.json` names
/// (`base_model_name_or_path`), or `None` where it names none.
pub fn base_model_of(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(ClientError::io(&path))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ClientError::Config {
            path: path.clone(),
            message: error.to_string(),
        })?;
    Ok(config
        .get("base_model_name_or_path")
        .and_then(serde_json::Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_string))
}

/// `adapter` as PEFT saves its weights: safetensors with `{"format": "pt"}` in the metadata.
pub fn peft_weights(adapter: &Adapter) -> Result<Vec<u8>> {
    let format = [("format".to_string(), "pt".to_string())];
    Ok(adapter.to_safetensors(Some(format.into_iter().collect()))?)
}

/// Writes a PEFT adapter directory: `adapter_config.json` for `lora` on `base_model`, and the
/// safetensors bytes `weights` (as encoded, so what is written is exactly what was sent).
pub fn write_peft_adapter(
    dir: &Path,
    lora: &LoraSpec,
    base_model: &str,
    weights: &[u8],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(ClientError::io_write(dir))?;
    let json = serde_json::to_string_pretty(&peft_adapter_config(lora, base_model))
        .map_err(|error| ClientError::Protocol(error.to_string()))?;
    write_whole(&dir.join("adapter_model.safetensors"), weights)?;
    write_whole(&dir.join("adapter_config.json"), (json + "\n").as_bytes())
}

/// Writes `bytes` to a temporary file beside `path`, synced to disk, then renames it there and
/// syncs the directory ([`sync_dir`]): an interrupted process (or machine) leaves the old file or
/// the new one, never a truncated one (and the temporary file is removed when the write fails),
/// and files written one after another reach the disk in that order.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let written = std::fs::File::create(&partial).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(ClientError::Write {
            path: partial,
            error,
        });
    }
    std::fs::rename(&partial, path).map_err(ClientError::io_write(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Syncs directory `dir`, which makes the renames and new entries in it durable (POSIX; Unix
/// only). Some file systems refuse (CIFS, FUSE without fsyncdir): a warning then, not an error,
/// as the files themselves are whole.
pub(crate) fn sync_dir(dir: &Path) {
    if cfg!(not(unix)) {
        return;
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::debug!(dir = %dir.display(), %error, "cannot sync the directory");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::AdapterTensor;

    use super::*;

    #[test]
    fn reads_back_what_it_writes_and_refuses_what_it_cannot_apply() {
        let dir = tempfile::tempdir().unwrap();
        let lora = LoraSpec {
            use_rslora: true,
            use_dora: true,
            ..LoraSpec::new(2, 4.0, &["q_proj"])
        };
        let mut adapter = Adapter::default();
        adapter.tensors.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            AdapterTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        let bytes = adapter.to_safetensors(None).unwrap();
        write_peft_adapter(dir.path(), &lora, "base", &bytes).unwrap();
        let (read_lora, read_adapter) = read_peft_adapter(dir.path()).unwrap();
        assert_eq!((read_lora, read_adapter), (lora, adapter));

        let config_path = dir.path().join("adapter_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["peft_type"] = serde_json::json!("LOHA");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let error = read_peft_adapter(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("adapter_config.json") && error.contains("LOHA"),
            "{error}"
        );
    }
}
