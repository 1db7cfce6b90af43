//! Merged export: the base model with its LoRA factors merged in, written as a Hugging Face
//! checkpoint that loads and runs without any adapter (`fedlora merge`).
//!
//! The weights are written in the checkpoint's own dtype unless asked otherwise (a bf16 model
//! stays bf16, half of f32's size), each projection merged in f32 and rounded once, and split
//! into shards with `model.safetensors.index.json` past a size, as transformers' `save_pretrained`
//! writes them. One shard's tensors are computed at a time: beside the model, the export holds one
//! shard in the written type, never the whole merged model in f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::BaseModel;
use super::llama::MergedTensor;
use super::peft::write_whole;
use crate::error::{ClientError, Result};

/// Largest shard by default: 5 GB, as most published checkpoints are split (transformers 5's
/// `save_pretrained` uses 50 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The float type a checkpoint's weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name transformers gives it in `config.json` (`torch.bfloat16` without the module).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// How a merged export stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// The written weights' type; `None` keeps the checkpoint's own
    /// ([`BaseModel::stored_dtype`]).
    pub dtype: Option<WeightDtype>,
    /// Largest shard file in bytes: a larger model is split into `model-0000i-of-0000n`
    /// files with an index (a single tensor larger than this gets a shard of its own).
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What a merged export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedExport {
    pub dtype: WeightDtype,
    /// The weight files, in order (one `model.safetensors`, or the shards).
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data over all files (the index's `total_size`).
    pub total_bytes: u64,
}

/// Writes `base` with its attached LoRA factors merged into the weights as a Hugging Face
/// directory (`config.json`, `model.safetensors` or shards with their index, `tokenizer.json`,
/// and the model's tokenizer config, special tokens map, generation config and chat template
/// where it has them) that loads and runs without any adapter, and renders prompts as training
/// did. The output directory must be new, empty or an earlier export's (see `claim_output`):
/// weight files of an earlier export there are replaced.
pub fn export_merged(
    base: &BaseModel,
    out_dir: &Path,
    options: &ExportOptions,
) -> Result<MergedExport> {
    let dtype = options.dtype.unwrap_or(base.stored_dtype);
    if options.max_shard_bytes == 0 {
        return Err(ClientError::InvalidArgument(
            "a maximum shard size of 0 bytes".into(),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(ClientError::io_write(out_dir))?;
    // Writing into the model's own directory (a GGUF file's, too) would replace the base's
    // weights and the files copied below.
    let canonical = |path: &Path| path.canonicalize().map_err(ClientError::io(path));
    let model_dir = if base.dir.is_dir() {
        Some(base.dir.clone())
    } else {
        // A bare file name lies in the working directory.
        base.dir
            .parent()
            .map(|dir| match dir.as_os_str().is_empty() {
                true => PathBuf::from("."),
                false => dir.to_path_buf(),
            })
    };
    if let Some(model_dir) = model_dir
        && canonical(out_dir)? == canonical(&model_dir)?
    {
        return Err(ClientError::Unsupported(format!(
            "merged export into the model's own directory {}: choose another output directory",
            model_dir.display()
        )));
    }
    claim_output(out_dir)?;
    remove_weight_files(out_dir)?;
    let config_path = out_dir.join("config.json");
    let mut config = base.model.config().clone();
    // transformers ≥ 4.56 reads `dtype`, earlier versions (and other tools) `torch_dtype`.
    config.dtype = Some(dtype.torch_name().into());
    config.torch_dtype = config.dtype.clone();
    let config = serde_json::to_string_pretty(&config)
        .map_err(|error| ClientError::Unsupported(error.to_string()))?;
    write_whole(&config_path, config.as_bytes())?;
    let permissions = std::fs::metadata(&config_path)
        .map_err(ClientError::io(&config_path))?
        .permissions();
    let export = write_weights(
        &base.model.merged_tensors()?,
        dtype,
        options,
        out_dir,
        &permissions,
    )?;
    let tokenizer = base
        .tokenizer
        .to_string(false)
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    write_whole(&out_dir.join("tokenizer.json"), tokenizer.as_bytes())?;
    // What tells tools how to use the tokenizer and to generate (special tokens, the chat
    // template, sampling defaults) goes along as the model shipped it.
    let mut has_tokenizer_config = false;
    for name in TOKENIZER_SIDE_FILES {
        let (from, to) = (base.dir.join(name), out_dir.join(name));
        if base.dir.is_dir() && from.is_file() {
            // Read, then written under a new name and renamed: a link at `to` to the base's own
            // file is replaced, never written through.
            let bytes = std::fs::read(&from).map_err(ClientError::io(&from))?;
            write_whole(&to, &bytes)?;
            has_tokenizer_config |= name == "tokenizer_config.json";
        } else if to.is_file() {
            // Left by an earlier export into the same directory: it may be another model's.
            std::fs::remove_file(&to).map_err(ClientError::io_write(&to))?;
        }
    }
    // The template training rendered instruction data in (a GGUF file's comes from its
    // metadata): `chat_template.jinja` is what transformers 5 writes and reads first.
    if let Some(template) = &base.chat_template {
        let jinja = out_dir.join("chat_template.jinja");
        write_whole(&jinja, template.source().as_bytes())?;
        let config_path = out_dir.join("tokenizer_config.json");
        if !has_tokenizer_config {
            let config = serde_json::json!({
                "bos_token": template.bos_token(),
                "eos_token": template.eos_token(),
            });
            write_whole(&config_path, config.to_string().as_bytes())?;
        }
    }
    Ok(export)
}

/// Writes the weights, shard by shard (safetensors writes each file under a temporary name and
/// renames it when complete, so an interrupted export leaves no weight file that looks whole),
/// the index last. Each file gets `like`'s permissions: safetensors creates its files readable by
/// their owner only, where a model directory's other files follow the umask.
fn write_weights(
    tensors: &[MergedTensor<'_>],
    dtype: WeightDtype,
    options: &ExportOptions,
    out_dir: &Path,
    like: &std::fs::Permissions,
) -> Result<MergedExport> {
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|tensor| {
            tensor.shape.iter().product::<usize>() as u64 * dtype.dtype().size_in_bytes() as u64
        })
        .collect();
    let shards = plan_shards(&sizes, options.max_shard_bytes);
    let file_name = |index: usize| match shards.len() {
        1 => "model.safetensors".to_string(),
        count => format!("model-{:05}-of-{count:05}.safetensors", index + 1),
    };
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let mut files = Vec::with_capacity(shards.len());
    let mut weight_map = BTreeMap::new();
    for (index, members) in shards.iter().enumerate() {
        let name = file_name(index);
        let mut shard = Vec::with_capacity(members.len());
        for tensor in members.iter().map(|&member| &tensors[member]) {
            shard.push((tensor.name.clone(), cast_checked(tensor, dtype)?));
            weight_map.insert(tensor.name.clone(), name.clone());
        }
        let path = out_dir.join(&name);
        safetensors::serialize_to_file(shard, metadata.clone(), &path).map_err(
            |error| match error {
                safetensors::SafeTensorError::IoError(error) => ClientError::Write {
                    path: path.clone(),
                    error,
                },
                other => ClientError::Unsupported(format!("{}: {other}", path.display())),
            },
        )?;
        std::fs::set_permissions(&path, like.clone()).map_err(ClientError::io_write(&path))?;
        files.push(path);
    }
    let total_bytes = sizes.iter().sum();
    if shards.len() > 1 {
        let parameters: usize = tensors
            .iter()
            .map(|tensor| tensor.shape.iter().product::<usize>())
            .sum();
        let index = serde_json::json!({
            "metadata": {"total_parameters": parameters, "total_size": total_bytes},
            "weight_map": weight_map,
        });
        let path = out_dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index)
            .map_err(|error| ClientError::Unsupported(error.to_string()))?;
        std::fs::write(&path, text).map_err(ClientError::io_write(&path))?;
    }
    Ok(MergedExport {
        dtype,
        files,
        total_bytes,
    })
}

/// The merged tensor in `dtype`, refused where a value is not finite or, in f16, beyond its
/// range (65504): written as such it would load as infinities.
fn cast_checked(tensor: &MergedTensor<'_>, dtype: WeightDtype) -> Result<Tensor> {
    let merged = tensor.compute()?;
    let largest = merged
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .try_fold(0f32, |largest, value| {
            value.is_finite().then(|| largest.max(value.abs()))
        });
    let limit = match dtype {
        WeightDtype::F16 => F16_MAX,
        WeightDtype::F32 | WeightDtype::Bf16 => f32::MAX,
    };
    match largest {
        Some(largest) if largest <= limit => Ok(merged.to_dtype(dtype.dtype())?),
        Some(largest) => Err(ClientError::InvalidArgument(format!(
            "{} holds {largest}, beyond f16's range: export it in bf16 or f32 (--dtype)",
            tensor.name
        ))),
        None => Err(ClientError::Unsupported(format!(
            "{} holds a value that is not finite after merging (NaN or infinite)",
            tensor.name
        ))),
    }
}

/// Splits tensors of `sizes` bytes into shards of at most `max_bytes` each (lists of indices),
/// as huggingface_hub's `split_torch_state_dict_into_shards` does: tensors fill the current
/// shard in order, and one that does not fit closes it and starts the next; a tensor larger than
/// `max_bytes` is a shard of its own at once, while the shard being filled stays open. Never
/// empty (an empty model is one empty shard).
pub fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let (mut current, mut filled) = (Vec::new(), 0u64);
    for (index, &size) in sizes.iter().enumerate() {
        if size > max_bytes {
            shards.push(vec![index]);
            continue;
        }
        if !current.is_empty() && filled.saturating_add(size) > max_bytes {
            shards.push(std::mem::take(&mut current));
            filled = 0;
        }
        current.push(index);
        filled = filled.saturating_add(size);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Parses a shard size: a number of bytes, or a number with a unit, decimal (`KB`, `MB`, `GB`,
/// `TB`, as transformers' `max_shard_size` takes them) or binary (`KiB`, `MiB`, `GiB`, `TiB`),
/// case ignored: `5GB`, `500MB`, `2GiB`, `1.5GB`.
pub fn parse_byte_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use bytes, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 5GB, 500MB or 2GiB"))?;
    let bytes = (value * factor as f64).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!(
            "{text:?}: a size must be between one byte and 16 EiB"
        ));
    }
    Ok(bytes as u64)
}

/// The largest finite f16.
const F16_MAX: f32 = 65504.0;

const INDEX_FILE: &str = "model.safetensors.index.json";

/// Removes the weight files an earlier export (or transformers) left in `dir`: a single file,
/// an index and shards named as transformers names them. Nothing else is touched.
/// Marks a directory as `fedlora merge`'s output: only such a directory (or an empty one) has
/// its weight and tokenizer files replaced.
const EXPORT_MARKER: &str = "fedlora_export.json";

/// Refuses an output directory that holds files the marker does not vouch for, and marks it as
/// an export's. A Hugging Face checkpoint holds exactly the names an export writes, so names
/// prove nothing: without the marker, only an empty directory (or one where writing the marker
/// was interrupted) is taken. An export by a release before the marker is refused too.
fn claim_output(out_dir: &Path) -> Result<()> {
    let marker = out_dir.join(EXPORT_MARKER);
    if !marker.is_file() {
        let partial = format!("{EXPORT_MARKER}.partial");
        for entry in std::fs::read_dir(out_dir).map_err(ClientError::io(out_dir))? {
            let name = entry.map_err(ClientError::io(out_dir))?.file_name();
            if name.to_string_lossy() != partial {
                return Err(ClientError::InvalidArgument(format!(
                    "{} holds files that no `fedlora merge` marked as its own ({EXPORT_MARKER} \
                     is not there: another model?), and the export would replace its weights: \
                     choose a new or empty output directory",
                    out_dir.display()
                )));
            }
        }
    }
    let json =
        serde_json::json!({ "written_by": "fedlora merge", "version": env!("CARGO_PKG_VERSION") });
    write_whole(&marker, format!("{json}\n").as_bytes())
}

/// Removes the weight files (single, shards, index) an earlier export left in `dir`.
fn remove_weight_files(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(ClientError::io(dir))?;
    for entry in entries {
        let entry = entry.map_err(ClientError::io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = name == "model.safetensors" || name == INDEX_FILE || is_shard_name(name);
        if stale && entry.path().is_file() {
            std::fs::remove_file(entry.path()).map_err(ClientError::io_write(entry.path()))?;
        }
    }
    Ok(())
}

/// `model-00001-of-00004.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(middle) = name
        .strip_prefix("model-")
        .and_then(|rest| rest.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |part: &str| part.len() == 5 && part.bytes().all(|byte| byte.is_ascii_digit());
    middle
        .split_once("-of-")
        .is_some_and(|(index, count)| digits(index) && digits(count))
}

/// Where a merged export keeps a chat template that fedlora could not use (minijinja does not
/// parse or render it), a caveat for whoever runs the merged model: instruction data was laid out in
/// ChatML or Alpaca instead (see [`crate::chat::usable`]), while tools that can render the
/// copied template (transformers' `apply_chat_template`) would prompt the model in it. Whether
/// the adapter saw instruction data at all, the export cannot know, so it keeps the model's
/// template and says so. `None` where the template was used, or there is none, or where
/// `tokenizer_config.json` is malformed (not a refused template; the copy is malformed too).
pub fn merged_template_caveat(base: &BaseModel) -> Option<String> {
    // Only a directory's template is copied; a GGUF file's goes along only where it was used.
    let refused = base
        .chat_template_refused
        .as_deref()
        .filter(|_| base.dir.is_dir())?;
    let layout = crate::chat::PromptTemplate::for_tokenizer(&base.tokenizer).name();
    Some(format!(
        "the merged model keeps {}'s own chat template, which fedlora cannot use ({refused}); \
         fedlora laid instruction data out in {layout} instead, so if the adapter was trained on \
         instruction examples, prompt the merged model in {layout}, not with its chat template \
         (`fedlora generate` does so by itself)",
        base.dir.display()
    ))
}

/// Files of a Hugging Face model directory beside `tokenizer.json` that a merged export keeps.
const TOKENIZER_SIDE_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::Device;
    use fedlora_proto::adapter::LoraSpec;
    use safetensors::SafeTensors;

    use super::*;
    use crate::testing::{logits, max_abs_difference, randomize_lora_b};
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    /// A merged export keeps what the model shipped beside its tokenizer, so that the merged
    /// model renders prompts in the chat template its adapter was trained on.
    #[test]
    fn merged_export_keeps_the_chat_template_and_generation_config() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\
                        {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        std::fs::write(base_dir.join("chat_template.jinja"), template).unwrap();
        std::fs::write(
            base_dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 64}"#,
        )
        .unwrap();
        let generation = r#"{"temperature": 0.2, "top_p": 0.9}"#;
        std::fs::write(base_dir.join("generation_config.json"), generation).unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert!(base.chat_template.is_some());
        let out = dir.path().join("merged");
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        let merged = BaseModel::load(&out, &Device::Cpu).unwrap();
        assert_eq!(merged.chat_template, base.chat_template);
        assert_eq!(merged.chat_template.unwrap().eos_token(), "</s>");
        assert_eq!(
            std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
            generation
        );
        // Without a tokenizer_config.json of its own (a GGUF's template), one is written with
        // the template's special tokens.
        std::fs::remove_file(base_dir.join("tokenizer_config.json")).unwrap();
        std::fs::remove_file(base_dir.join("generation_config.json")).unwrap();
        let mut base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        base.chat_template = Some(std::sync::Arc::new(
            crate::chat::ChatTemplate::new(template.into(), "<s>".into(), "</s>".into()).unwrap(),
        ));
        // Into the first export's directory: its generation_config.json (another model's, as
        // far as this export knows) does not stay.
        let out = dir.path().join("merged");
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        let merged = BaseModel::load(&out, &Device::Cpu).unwrap();
        assert_eq!(merged.chat_template, base.chat_template);
        assert!(!out.join("generation_config.json").exists());
        // Never into the model's own directory, which would overwrite its weights.
        let weights = std::fs::read(base_dir.join("model.safetensors")).unwrap();
        let error = export_merged(&base, &base_dir.join("."), &ExportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("own directory"), "{error}");
        assert_eq!(
            std::fs::read(base_dir.join("model.safetensors")).unwrap(),
            weights
        );
    }

    /// An export replaces files only in a directory that is new, empty or an earlier export's:
    /// another checkpoint (the GGUF's own directory among them) keeps its weights, and a link
    /// in an earlier export's directory to the base's own file is replaced, not written through.
    #[test]
    fn an_export_never_replaces_what_it_did_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        let side = r#"{"bos_token": "<s>", "eos_token": "</s>"}"#;
        std::fs::write(base_dir.join("tokenizer_config.json"), side).unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        // Refused, naming `reason`, with the weights in `target` as they were.
        let refused = |base: &BaseModel, target: &Path, reason: &str| {
            let weights = std::fs::read(target.join("model.safetensors")).unwrap();
            let error = export_merged(base, target, &ExportOptions::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(reason), "{error}");
            assert_eq!(
                std::fs::read(target.join("model.safetensors")).unwrap(),
                weights
            );
        };
        let other = dir.path().join("other");
        write_tiny_model(&other, &TinyModelSpec::default()).unwrap();
        refused(&base, &other, "no `fedlora merge` marked");

        // A GGUF file beside the checkpoint it was converted from.
        let gguf = base_dir.join("model.gguf");
        std::fs::copy(fixtures().join("gguf").join("llama.gguf"), &gguf).unwrap();
        let from_gguf = BaseModel::load(&gguf, &Device::Cpu).unwrap();
        refused(&from_gguf, &base_dir, "own directory");

        let out = dir.path().join("merged");
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        #[cfg(unix)]
        {
            let copied = out.join("tokenizer_config.json");
            std::fs::remove_file(&copied).unwrap();
            std::os::unix::fs::symlink(base_dir.join("tokenizer_config.json"), &copied).unwrap();
            export_merged(&base, &out, &ExportOptions::default()).unwrap();
            assert!(!copied.symlink_metadata().unwrap().file_type().is_symlink());
            assert_eq!(std::fs::read_to_string(&copied).unwrap(), side);
            assert_eq!(
                std::fs::read_to_string(base_dir.join("tokenizer_config.json")).unwrap(),
                side
            );
        }
        // An earlier export's directory takes another export, and so does a new directory
        // where writing the marker was interrupted.
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        let interrupted = dir.path().join("interrupted");
        std::fs::create_dir(&interrupted).unwrap();
        std::fs::write(interrupted.join("fedlora_export.json.partial"), b"{").unwrap();
        export_merged(&base, &interrupted, &ExportOptions::default()).unwrap();
    }

    /// A chat template fedlora cannot render is copied as it is, with a caveat naming the
    /// layout instruction data fell back to.
    #[test]
    fn a_merged_export_of_an_unusable_template_says_which_layout_was_trained() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert_eq!(merged_template_caveat(&base), None, "no template at all");
        let unusable = "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}";
        std::fs::write(base_dir.join("chat_template.jinja"), unusable).unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert!(base.chat_template.is_none());
        let caveat = merged_template_caveat(&base).unwrap();
        let layout = crate::chat::PromptTemplate::for_tokenizer(&base.tokenizer).name();
        assert!(
            caveat.contains(&format!("prompt the merged model in {layout}")),
            "{caveat}"
        );
        let out = dir.path().join("merged");
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
            unusable
        );
        // A template fedlora renders needs no caveat.
        let usable = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}\
                      {% if add_generation_prompt %}<|assistant|>{% endif %}";
        std::fs::write(base_dir.join("chat_template.jinja"), usable).unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert!(base.chat_template.is_some());
        assert_eq!(merged_template_caveat(&base), None);
        // Nor does a malformed tokenizer_config.json, which names no refused template.
        std::fs::remove_file(base_dir.join("chat_template.jinja")).unwrap();
        std::fs::write(
            base_dir.join("tokenizer_config.json"),
            "{\"chat_template\": ",
        )
        .unwrap();
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert!(base.chat_template.is_none());
        assert_eq!(base.chat_template_refused, None);
        assert_eq!(merged_template_caveat(&base), None);
    }

    /// Qwen2's config as transformers 5 saved it has no `head_dim`: the export must not write
    /// `"head_dim": null` (transformers' Qwen2 attention reads it as a head size of None), nor
    /// any other null.
    #[test]
    fn merged_export_of_a_transformers_checkpoint_writes_no_nulls() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/qwen2");
        let dir = tempfile::tempdir().unwrap();
        let (base_dir, out) = (dir.path().join("base"), dir.path().join("merged"));
        // The fixture's checkpoint, with a tokenizer (which it lacks) from the tiny model.
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        for name in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(name), base_dir.join(name)).unwrap();
        }
        let base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        assert_eq!(base.model.config().head_dim, None);
        export_merged(&base, &out, &ExportOptions::default()).unwrap();
        let config: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let nulls: Vec<&String> = config
            .iter()
            .filter(|(_, value)| value.is_null())
            .map(|(key, _)| key)
            .collect();
        assert!(nulls.is_empty(), "null fields: {nulls:?}");
        assert_eq!(config["num_key_value_heads"], 2);
        // The fixture's weights are f16, and so are the export's, under both names of the field.
        assert_eq!(base.stored_dtype, WeightDtype::F16);
        assert_eq!(config["dtype"], "float16");
        assert_eq!(config["torch_dtype"], "float16");
        let merged = BaseModel::load(&out, &Device::Cpu).unwrap();
        assert_eq!(merged.stored_dtype, WeightDtype::F16);
        let mut expected = base.model.config().clone();
        expected.torch_dtype = Some("float16".into());
        assert_eq!(merged.model.config(), &expected);
    }

    /// The merged checkpoint, loaded with no adapter, computes what base + adapter computes.
    #[test]
    fn merged_export_matches_base_plus_adapter() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(&dir.path().join("base"), &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(&dir.path().join("base"), &Device::Cpu).unwrap();
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
        base.model.attach_lora(&lora, 5).unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.2, 9);
        export_merged(&base, &dir.path().join("merged"), &ExportOptions::default()).unwrap();
        let merged = BaseModel::load(&dir.path().join("merged"), &Device::Cpu).unwrap();
        assert!(merged.model.lora_vars().is_empty());
        let input = Tensor::new(&[[5u32, 70, 71, 72, 3, 90]], &Device::Cpu).unwrap();
        let expected = logits(&base.model, &input);
        let got = logits(&merged.model, &input);
        let difference = max_abs_difference(&expected, &got);
        assert!(difference < 1e-4, "logits differ by {difference}");
        let plain = BaseModel::load(&dir.path().join("base"), &Device::Cpu).unwrap();
        let unadapted = logits(&plain.model, &input);
        assert!(
            unadapted
                .iter()
                .zip(&got)
                .any(|(a, b)| (a - b).abs() > 1e-3),
            "the adapter changed the model"
        );
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// The tiny model's tokenizer with the checkpoint (config and weights) of a PEFT fixture.
    fn fixture_model(dir: &Path, fixture: &str) -> BaseModel {
        write_tiny_model(dir, &TinyModelSpec::default()).unwrap();
        for name in ["config.json", "model.safetensors"] {
            std::fs::copy(
                fixtures().join("peft").join(fixture).join(name),
                dir.join(name),
            )
            .unwrap();
        }
        BaseModel::load(dir, &Device::Cpu).unwrap()
    }

    fn adapt(base: &mut BaseModel, bound: f32) {
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
        base.model.attach_lora(&lora, 5).unwrap();
        randomize_lora_b(&base.model, bound, 9);
    }

    const INPUT: [[u32; 6]; 1] = [[5, 70, 71, 72, 3, 90]];

    fn model_logits(model: &crate::model::Llama) -> Vec<f32> {
        logits(model, &Tensor::new(&INPUT, &Device::Cpu).unwrap())
    }

    #[test]
    fn shards_are_planned_as_huggingface_hub_plans_them() {
        let plan = |sizes: &[u64], max| plan_shards(sizes, max);
        assert_eq!(plan(&[4, 4, 4], 12), [vec![0, 1, 2]]);
        assert_eq!(plan(&[4, 4, 4], 8), [vec![0, 1], vec![2]]);
        assert_eq!(plan(&[4, 4, 4], 7), [vec![0], vec![1], vec![2]]);
        // A tensor beyond the limit is a shard of its own at once; the open shard goes on
        // (huggingface_hub 2.4's splitter gives these, run on the same sizes).
        assert_eq!(plan(&[1, 10, 1], 8), [vec![1], vec![0, 2]]);
        assert_eq!(
            plan(&[3, 10, 3, 10, 3], 8),
            [vec![1], vec![3], vec![0, 2], vec![4]]
        );
        assert_eq!(plan(&[10, 1, 1], 8), [vec![0], vec![1, 2]]);
        assert_eq!(plan(&[], 8), [Vec::<usize>::new()]);
    }

    #[test]
    fn byte_sizes_parse_in_decimal_and_binary_units() {
        for (text, bytes) in [
            ("5GB", 5_000_000_000),
            ("50GB", 50_000_000_000),
            ("500MB", 500_000_000),
            ("2GiB", 2 << 30),
            ("1.5GB", 1_500_000_000),
            ("10 kib", 10_240),
            ("1TB", 1_000_000_000_000),
            ("4096", 4096),
        ] {
            assert_eq!(parse_byte_size(text), Ok(bytes), "{text}");
        }
        for text in ["", "GB", "5XB", "0", "0.1", "-1GB", "1e3", "5 G B"] {
            assert!(parse_byte_size(text).is_err(), "{text}");
        }
    }

    #[test]
    fn only_transformers_weight_file_names_count_as_shards() {
        assert!(is_shard_name("model-00001-of-00004.safetensors"));
        assert!(is_shard_name("model-00004-of-00004.safetensors"));
        for name in [
            "model.safetensors",
            "model-1-of-4.safetensors",
            "model-00001-of-00004.bin",
            "adapter-00001-of-00004.safetensors",
            "model-0000a-of-00004.safetensors",
            "model-00001-of-00004.safetensors.bak",
        ] {
            assert!(!is_shard_name(name), "{name}");
        }
    }

    /// The type most of a checkpoint's elements are stored in; quantized GGUF blocks count as
    /// f32 (their dequantized values need it).
    #[test]
    fn the_stored_dtype_is_what_most_weights_are_stored_in() {
        let gguf = fixtures().join("gguf");
        for (file, dtype) in [
            ("llama.gguf", WeightDtype::F32),
            ("qwen2.gguf", WeightDtype::F16),
            ("qwen2_q4_0.gguf", WeightDtype::F32),
        ] {
            let base = BaseModel::load(&gguf.join(file), &Device::Cpu).unwrap();
            assert_eq!(base.stored_dtype, dtype, "{file}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            fixture_model(dir.path(), "mistral").stored_dtype,
            WeightDtype::Bf16
        );
        let mut counts = crate::model::StoredDtypes::default();
        assert_eq!(counts.most_common(), WeightDtype::F32);
        counts.add(DType::F16, 3);
        counts.add(DType::F32, 3);
        assert_eq!(counts.most_common(), WeightDtype::F32, "a tie keeps f32");
        counts.add(DType::BF16, 4);
        assert_eq!(counts.most_common(), WeightDtype::Bf16);
    }

    /// A bf16 checkpoint (the Mistral fixture, as transformers saved it) is exported in bf16:
    /// each adapted projection merged in f32 and rounded once, every other tensor the checkpoint's
    /// own bytes; f32 on request.
    #[test]
    fn a_bf16_checkpoint_is_exported_in_bf16_rounded_once() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        let mut base = fixture_model(&base_dir, "mistral");
        adapt(&mut base, 0.2);
        let out = dir.path().join("merged");
        let export = export_merged(&base, &out, &ExportOptions::default()).unwrap();
        assert_eq!(export.dtype, WeightDtype::Bf16);
        assert_eq!(export.files, vec![out.join("model.safetensors")]);
        assert!(!out.join(INDEX_FILE).exists());
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            metadata.metadata().as_ref().unwrap()["format"],
            "pt",
            "as save_pretrained writes it"
        );
        let written = SafeTensors::deserialize(&bytes).unwrap();
        let source_bytes = std::fs::read(base_dir.join("model.safetensors")).unwrap();
        let source = SafeTensors::deserialize(&source_bytes).unwrap();
        let tensors = base.model.merged_tensors().unwrap();
        assert_eq!(written.len(), tensors.len());
        assert_eq!(
            export.total_bytes,
            written
                .tensors()
                .iter()
                .map(|(_, view)| view.data().len() as u64)
                .sum::<u64>()
        );
        let mut adapted = 0;
        for tensor in &tensors {
            let view = written.tensor(&tensor.name).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{}", tensor.name);
            assert_eq!(view.shape(), tensor.shape.as_slice(), "{}", tensor.name);
            // bf16 → f32 is exact: equal f32 values are equal bf16 bits.
            let as_f32 = |tensor: Tensor| {
                tensor
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let rounded = as_f32(tensor.compute().unwrap().to_dtype(DType::BF16).unwrap());
            let got = Tensor::from_raw_buffer(view.data(), DType::BF16, view.shape(), &Device::Cpu)
                .unwrap();
            assert_eq!(as_f32(got), rounded, "{} rounded once", tensor.name);
            let original = source.tensor(&tensor.name).unwrap();
            if view.data() == original.data() {
                continue;
            }
            assert!(
                ["q_proj", "v_proj", "down_proj"]
                    .iter()
                    .any(|module| tensor.name.contains(module)),
                "{} changed without an adapter",
                tensor.name
            );
            adapted += 1;
        }
        assert_eq!(
            adapted,
            3 * 2,
            "every adapted projection of both layers changed"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            (&config["dtype"], &config["torch_dtype"]),
            (&"bfloat16".into(), &"bfloat16".into())
        );

        // The merged model computes base + adapter, to bf16's rounding of the weights; in f32,
        // to float rounding.
        let expected = model_logits(&base.model);
        let merged = BaseModel::load(&out, &Device::Cpu).unwrap();
        assert_eq!(merged.stored_dtype, WeightDtype::Bf16);
        let bf16_difference = max_abs_difference(&expected, &model_logits(&merged.model));
        let f32_export = ExportOptions {
            dtype: Some(WeightDtype::F32),
            ..ExportOptions::default()
        };
        let export = export_merged(&base, &out, &f32_export).unwrap();
        assert_eq!(export.dtype, WeightDtype::F32);
        let merged = BaseModel::load(&out, &Device::Cpu).unwrap();
        assert_eq!(merged.stored_dtype, WeightDtype::F32);
        let f32_difference = max_abs_difference(&expected, &model_logits(&merged.model));
        assert!(
            f32_difference < 1e-4,
            "f32 export: logits differ by {f32_difference}"
        );
        assert!(
            bf16_difference < 2.5e-2,
            "bf16 export: logits differ by {bf16_difference}"
        );
        assert!(
            bf16_difference > f32_difference,
            "{bf16_difference} vs {f32_difference}"
        );
    }

    /// Past the maximum shard size, the weights are split into shards named as transformers names
    /// them, with an index; the sharded export loads to the same model as the single file. An
    /// export into the same directory replaces the weight files of the earlier one, and only
    /// those.
    #[test]
    fn a_large_model_is_split_into_shards_with_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        adapt(&mut base, 0.2);
        let (whole, sharded) = (dir.path().join("whole"), dir.path().join("sharded"));
        let single = export_merged(&base, &whole, &ExportOptions::default()).unwrap();
        assert_eq!(single.files.len(), 1);
        // Into a directory holding a single-file export: that file goes (transformers would
        // load it before the index).
        export_merged(&base, &sharded, &ExportOptions::default()).unwrap();
        assert!(sharded.join("model.safetensors").exists());
        let max_shard_bytes = 100_000;
        let options = ExportOptions {
            max_shard_bytes,
            ..ExportOptions::default()
        };
        let export = export_merged(&base, &sharded, &options).unwrap();
        let count = export.files.len();
        assert!(count > 2, "{count} shards");
        assert_eq!(export.total_bytes, single.total_bytes);
        let names: Vec<String> = (1..=count)
            .map(|index| format!("model-{index:05}-of-{count:05}.safetensors"))
            .collect();
        let files: Vec<PathBuf> = names.iter().map(|name| sharded.join(name)).collect();
        assert_eq!(export.files, files);
        assert!(!sharded.join("model.safetensors").exists());
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sharded.join(INDEX_FILE)).unwrap())
                .unwrap();
        assert_eq!(index["metadata"]["total_size"], export.total_bytes);
        let parameters: usize = base
            .model
            .merged_tensors()
            .unwrap()
            .iter()
            .map(|tensor| tensor.shape.iter().product::<usize>())
            .sum();
        assert_eq!(index["metadata"]["total_parameters"], parameters);
        let weight_map = index["weight_map"].as_object().unwrap();
        let mut data_bytes = 0;
        for (name, file) in names.iter().zip(&files) {
            let bytes = std::fs::read(file).unwrap();
            let shard = SafeTensors::deserialize(&bytes).unwrap();
            let shard_bytes: usize = shard
                .tensors()
                .iter()
                .map(|(_, view)| view.data().len())
                .sum();
            assert!(
                shard_bytes <= max_shard_bytes as usize || shard.len() == 1,
                "{name}: {shard_bytes} bytes in {} tensors",
                shard.len()
            );
            for tensor in shard.names() {
                assert_eq!(weight_map[tensor], name.as_str());
            }
            data_bytes += shard_bytes;
        }
        assert_eq!(data_bytes as u64, export.total_bytes);
        assert_eq!(weight_map.len(), base.model.merged_tensors().unwrap().len());
        let from_whole = BaseModel::load(&whole, &Device::Cpu).unwrap();
        let from_shards = BaseModel::load(&sharded, &Device::Cpu).unwrap();
        assert_eq!(
            model_logits(&from_shards.model),
            model_logits(&from_whole.model)
        );

        // The weight files are as readable as the directory's other files (safetensors alone
        // would leave them readable by their owner only).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode();
            for file in &files {
                assert_eq!(mode(file), mode(&sharded.join("config.json")), "{file:?}");
            }
        }

        // Exported again as one file into the same directory: the shards, their index and a
        // shard of some other export go; other files stay.
        std::fs::write(sharded.join("model-00001-of-00009.safetensors"), b"old").unwrap();
        let kept = ["notes.txt", "model-00001-of-00004.safetensors.bak"];
        for name in kept {
            std::fs::write(sharded.join(name), b"kept").unwrap();
        }
        export_merged(&base, &sharded, &ExportOptions::default()).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&sharded)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains("safetensors"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["model-00001-of-00004.safetensors.bak", "model.safetensors"]
        );
        assert!(sharded.join("notes.txt").exists());
        let reloaded = BaseModel::load(&sharded, &Device::Cpu).unwrap();
        assert_eq!(
            model_logits(&reloaded.model),
            model_logits(&from_whole.model)
        );
    }

    /// An f16 export refuses a merged weight beyond f16's range (it would load as infinities)
    /// and names the tensor; bf16 holds it.
    #[test]
    fn an_f16_export_refuses_weights_beyond_f16s_range() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        write_tiny_model(&base_dir, &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(&base_dir, &Device::Cpu).unwrap();
        adapt(&mut base, 1e7);
        let f16 = ExportOptions {
            dtype: Some(WeightDtype::F16),
            ..ExportOptions::default()
        };
        let error = export_merged(&base, &dir.path().join("f16"), &f16)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.layers.0.self_attn.q_proj.weight")
                && error.contains("beyond f16's range"),
            "{error}"
        );
        let bf16 = ExportOptions {
            dtype: Some(WeightDtype::Bf16),
            ..ExportOptions::default()
        };
        export_merged(&base, &dir.path().join("bf16"), &bf16).unwrap();
        let merged = BaseModel::load(&dir.path().join("bf16"), &Device::Cpu).unwrap();
        let weights = merged.model.merged_weights().unwrap();
        let largest = weights["model.layers.0.self_attn.q_proj.weight"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(largest > F16_MAX && largest.is_finite(), "{largest}");
    }
}
