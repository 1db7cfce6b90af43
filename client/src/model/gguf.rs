//! Llama-family GGUF files (llama.cpp's format; architectures `llama` and `qwen2`): configuration
//! and tokenizer from the metadata, weights under Hugging Face names: dequantized to f32, or
//! (QLoRA) the projections kept in their quantized types as loaded.
//!
//! llama.cpp's converter permutes the rows of a Llama file's `q_proj`/`k_proj` for its interleaved
//! RoPE; they are un-permuted here so the same rotate-half RoPE as for Hugging Face weights
//! applies (Qwen2's are stored unpermuted). A missing `output.weight` means tied embeddings.

use std::collections::HashMap;
use std::path::Path;

use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Tokenizer};

use super::config::Llama3RopeScaling;
use super::{BaseModel, Llama, LlamaConfig};
use crate::chat::ChatTemplate;
use crate::error::{ClientError, Result};

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| ClientError::Unsupported(format!("gguf metadata has no {key:?}")))
}

fn meta_usize(content: &Content, key: &str) -> Result<usize> {
    let value = meta(content, key)?;
    let number = value.to_u32().map_err(|_| {
        ClientError::Unsupported(format!(
            "gguf metadata {key:?} is a {:?}, not a u32",
            value.value_type()
        ))
    })?;
    Ok(number as usize)
}

/// `key` as a u32, or `default` when the file has no such key (but an error when it holds
/// something else: a default would silently run another model).
fn meta_usize_or(content: &Content, key: &str, default: usize) -> Result<usize> {
    match content.metadata.get(key) {
        None => Ok(default),
        Some(_) => meta_usize(content, key),
    }
}

/// A GGUF architecture this engine runs: Llama's graph, under llama.cpp's name (also the
/// `config.json` model type).
struct Architecture {
    name: &'static str,
    class: &'static str,
    /// llama.cpp's converter permutes q/k rows (and biases) for its interleaved RoPE: Llama's,
    /// not Qwen2's.
    permutes_qk: bool,
}

/// `llama` (which llama.cpp also uses for Mistral, SmolLM and TinyLlama) and `qwen2` (biases on
/// q/k/v).
const ARCHITECTURES: [Architecture; 2] = [
    Architecture {
        name: "llama",
        class: "LlamaForCausalLM",
        permutes_qk: true,
    },
    Architecture {
        name: "qwen2",
        class: "Qwen2ForCausalLM",
        permutes_qk: false,
    },
];

/// The file's `general.architecture`, if this engine runs it.
fn architecture(content: &Content) -> Result<&'static Architecture> {
    let name = meta(content, "general.architecture")?.to_string()?;
    ARCHITECTURES
        .iter()
        .find(|architecture| architecture.name == name)
        .ok_or_else(|| {
            ClientError::Unsupported(format!("gguf architecture {name:?} (llama and qwen2 only)"))
        })
}

/// The Llama-family configuration described by GGUF metadata (keys under the architecture's
/// name).
pub fn gguf_config(content: &Content) -> Result<LlamaConfig> {
    let Architecture {
        name: arch, class, ..
    } = architecture(content)?;
    let key = |name: &str| format!("{arch}.{name}");
    // Llama 3.1+ files carry their rope scaling as a `rope_freqs.weight` tensor, which
    // `load_gguf` reads; linear and YaRN scalings are named in the metadata.
    let rope_scaling = gguf_rope_scaling(content, arch)?;
    let hidden = meta_usize(content, &key("embedding_length"))?;
    let heads = meta_usize(content, &key("attention.head_count"))?;
    let kv_heads = meta_usize_or(content, &key("attention.head_count_kv"), heads)?;
    let vocab = meta(content, "tokenizer.ggml.tokens")?.to_vec()?.len();
    let rope_theta = content
        .metadata
        .get(&key("rope.freq_base"))
        .map(|value| value.to_f32())
        .transpose()?
        .unwrap_or(10_000.0);
    let eps = content
        .metadata
        .get(&key("attention.layer_norm_rms_epsilon"))
        .map(|value| value.to_f32())
        .transpose()?
        .unwrap_or(1e-5);
    let config = LlamaConfig {
        architectures: vec![(*class).into()],
        model_type: (*arch).into(),
        hidden_size: hidden,
        intermediate_size: meta_usize(content, &key("feed_forward_length"))?,
        num_hidden_layers: meta_usize(content, &key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: content
            .metadata
            .get(&key("attention.key_length"))
            .map(|value| value.to_u32().map(|length| length as usize))
            .transpose()?,
        vocab_size: vocab,
        rms_norm_eps: f64::from(eps),
        rope_theta: f64::from(rope_theta),
        rope_scaling,
        rope_parameters: None,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        sliding_window: None,
        use_sliding_window: None,
        mlp_bias: false,
        max_position_embeddings: meta_usize_or(content, &key("context_length"), 2048)?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        hidden_act: "silu".into(),
        // Llama's `attention_bias` (q/k/v/o); Qwen2's q/k/v biases go with its model type.
        attention_bias: *arch == "llama" && content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: meta(content, "tokenizer.ggml.bos_token_id")
            .and_then(|value| Ok(value.to_u32()?))
            .ok(),
        eos_token_id: meta(content, "tokenizer.ggml.eos_token_id")
            .and_then(|value| Ok(value.to_u32()?))
            .ok()
            .map(|id| serde_json::json!(id)),
        dtype: None,
        torch_dtype: None,
        quantization_config: None,
    };
    config.validate().map_err(ClientError::Unsupported)?;
    Ok(config)
}

/// The `rope_scaling` of `config.json` for llama.cpp's rope metadata (keys under the
/// architecture's name, `arch`), read as llama.cpp reads it:
///
/// - `{arch}.rope.scaling.type` (absent: linear, if a factor other than 0 or 1 is given, from
///   `.factor` or the older `{arch}.rope.scale_linear`);
/// - `linear`: `.factor`; a `.attn_factor` other than 1 (llama.cpp scales cos and sin by it,
///   which transformers' linear scaling cannot express) is refused;
/// - `yarn`: `.factor`, `.original_context_length`, `.yarn_beta_fast`, `.yarn_beta_slow`; the
///   factor on cos and sin is `.yarn_attn_factor` (transformers' `attention_factor`, written by
///   llama.cpp's converter) or else `.attn_factor` times YaRN's default `0.1·ln(factor) + 1`
///   (llama.cpp multiplies the two); `.yarn_log_multiplier` and `.yarn_ext_factor`, whose
///   meaning depends on the architecture, are refused unless neutral (0 and 1).
///
/// `None` for no scaling.
fn gguf_rope_scaling(content: &Content, arch: &str) -> Result<Option<serde_json::Value>> {
    let number = |key: &str| -> Result<Option<f64>> {
        content
            .metadata
            .get(key)
            .map(|value| match value {
                Value::F32(number) => Ok(f64::from(*number)),
                Value::F64(number) => Ok(*number),
                other => Ok(other.to_u64()? as f64),
            })
            .transpose()
    };
    let scaling = |key: &str| number(&format!("{arch}.rope.scaling.{key}"));
    let factor = scaling("factor")?
        .or(number(&format!("{arch}.rope.scale_linear"))?)
        .filter(|&factor| factor != 0.0);
    let kind = match content.metadata.get(&format!("{arch}.rope.scaling.type")) {
        Some(kind) => kind.to_string().map(String::as_str).unwrap_or("?"),
        None if factor.is_some_and(|factor| factor != 1.0) => "linear",
        None => return Ok(None),
    };
    let factor = || {
        factor.ok_or_else(|| {
            ClientError::Unsupported(format!(
                "gguf rope scaling of type {kind:?} without {arch}.rope.scaling.factor"
            ))
        })
    };
    let refuse_unless = |key: &str, neutral: f64| -> Result<()> {
        match scaling(key)? {
            Some(value) if value != neutral => Err(ClientError::Unsupported(format!(
                "gguf rope scaling of type {kind:?} with {arch}.rope.scaling.{key} = {value} \
                 (only {neutral} can be run as transformers runs it)"
            ))),
            _ => Ok(()),
        }
    };
    Ok(match kind {
        "none" => None,
        "linear" => {
            refuse_unless("attn_factor", 1.0)?;
            Some(serde_json::json!({"rope_type": "linear", "factor": factor()?}))
        }
        "yarn" => {
            refuse_unless("yarn_log_multiplier", 0.0)?;
            refuse_unless("yarn_ext_factor", 1.0)?;
            let factor = factor()?;
            let default_magnitude = if factor <= 1.0 {
                1.0
            } else {
                0.1 * factor.ln() + 1.0
            };
            let attention_factor = match scaling("yarn_attn_factor")? {
                Some(attention_factor) => attention_factor,
                None => scaling("attn_factor")?.unwrap_or(1.0) * default_magnitude,
            };
            let mut rope = serde_json::json!({"rope_type": "yarn", "factor": factor,
                "attention_factor": attention_factor});
            if let Some(original) = scaling("original_context_length")? {
                rope["original_max_position_embeddings"] = serde_json::json!(original as u64);
            }
            for (gguf, hf) in [
                ("yarn_beta_fast", "beta_fast"),
                ("yarn_beta_slow", "beta_slow"),
            ] {
                if let Some(value) = scaling(gguf)? {
                    rope[hf] = serde_json::json!(value);
                }
            }
            Some(rope)
        }
        other => {
            return Err(ClientError::Unsupported(format!(
                "gguf with rope scaling of type {other:?} (linear and yarn are supported)"
            )));
        }
    })
}

/// Llama 3.1+ rope scaling, as one divisor per frequency (not a weight of the model).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Hugging Face name of a GGUF tensor, and whether its rows need un-permuting with that many heads
/// (q/k weights and biases, where the architecture `permutes_qk`).
fn hf_name(gguf: &str, config: &LlamaConfig, permutes_qk: bool) -> Option<(String, Option<usize>)> {
    let plain = |name: &str| Some((name.to_string(), None));
    match gguf {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (tensor, kind) = tensor.rsplit_once('.')?;
    let (module, permute_heads) = match tensor {
        "attn_q" => ("self_attn.q_proj", Some(config.num_attention_heads)),
        "attn_k" => ("self_attn.k_proj", Some(config.num_kv_heads())),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        _ => return None,
    };
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    Some((
        format!("model.layers.{layer}.{module}.{kind}"),
        permute_heads.filter(|_| permutes_qk),
    ))
}

/// llama.cpp's permutation of q/k rows (Hugging Face → GGUF), for `[out, in]` weights.
pub fn permute_for_gguf(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, input) = weight.dims2()?;
    Ok(weight
        .reshape((heads, 2, out / heads / 2, input))?
        .transpose(1, 2)?
        .reshape((out, input))?)
}

/// The inverse of [`permute_for_gguf`].
pub fn unpermute_from_gguf(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, input) = weight.dims2()?;
    Ok(weight
        .reshape((heads, out / heads / 2, 2, input))?
        .transpose(1, 2)?
        .reshape((out, input))?)
}

/// How a byte-level BPE vocabulary splits text before merging, read from llama.cpp's
/// `tokenizer.ggml.pre` name, with what else llama.cpp's `llama-vocab.cpp` ties to that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PreTokenizer {
    split: PreSplit,
    /// A pre-token found whole in the vocabulary is taken before merging (llama.cpp's
    /// `ignore_merges`, tokenizer.json's `"ignore_merges": true`).
    ignore_merges: bool,
    /// BOS is added unless the file says otherwise (`tokenizer.ggml.add_bos_token`).
    adds_bos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreSplit {
    /// GPT-2's byte-level split.
    Gpt2,
    /// Digits one by one, then GPT-2's split.
    Digits,
    /// Regexes, each splitting the pieces of the one before (tokenizer.json's `Split` with
    /// `Isolated` pieces, llama.cpp's regex lists), then bytes.
    Regexes(&'static [&'static str]),
}

impl PreTokenizer {
    /// llama.cpp's names, grouped by split as its `llama-vocab.cpp` groups them (checked by
    /// `gguf_bpe_pre_tokenizers_match_transformers` against transformers' GGUF tokenizer where
    /// transformers knows the name, else against llama.cpp's regexes rebuilt in the fixture
    /// script). Only the tokenizer: files of architectures other than `llama` and `qwen2` (OLMo,
    /// Command-R, StarCoder, ...) are refused by [`gguf_config`]. A missing name or `default`
    /// splits as GPT-2, as transformers reads such a file (llama.cpp, warning of degraded output,
    /// falls back to regexes of its own).
    fn named(name: Option<&str>) -> Result<Self> {
        let plain = |split| Self {
            split,
            ignore_merges: false,
            adds_bos: false,
        };
        Ok(match name {
            None | Some("default" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais") => {
                plain(PreSplit::Gpt2)
            }
            Some(
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva-7b",
            ) => plain(PreSplit::Digits),
            Some(
                "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral"
                | "midm-2.0" | "lfm2" | "jina-v5-nano",
            ) => Self {
                split: PreSplit::Regexes(&[LLAMA3_PATTERN]),
                ignore_merges: true,
                adds_bos: true,
            },
            Some("dbrx" | "smaug-bpe") => plain(PreSplit::Regexes(&[LLAMA3_PATTERN])),
            Some("qwen2" | "deepseek-r1-qwen" | "stablelm2" | "kormo" | "megrez" | "f2llmv2") => {
                plain(PreSplit::Regexes(&[QWEN2_PATTERN]))
            }
            Some("qwen35") => plain(PreSplit::Regexes(&[QWEN35_PATTERN])),
            Some("gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2") => {
                plain(PreSplit::Regexes(&[GPT4O_PATTERN]))
            }
            Some("tekken") => Self {
                split: PreSplit::Regexes(&[TEKKEN_PATTERN]),
                ignore_merges: true,
                adds_bos: true,
            },
            Some("deepseek-coder") => plain(PreSplit::Regexes(&DEEPSEEK_CODER_PATTERNS)),
            Some("deepseek-llm") => plain(PreSplit::Regexes(&DEEPSEEK_LLM_PATTERNS)),
            Some(other) => {
                return Err(ClientError::Unsupported(format!(
                    "gguf pre-tokenizer {other:?} (supported: the GPT-2, SmolLM/StarCoder, \
                     Llama 3, Qwen2, Qwen3.5, GPT-4o, Tekken, DeepSeek LLM and DeepSeek Coder \
                     splits, under llama.cpp's names for them)"
                )));
            }
        })
    }

    fn wrapper(self) -> Result<PreTokenizerWrapper> {
        let byte_level = ByteLevel::default().add_prefix_space(false);
        Ok(match self.split {
            PreSplit::Gpt2 => PreTokenizerWrapper::ByteLevel(byte_level),
            PreSplit::Digits => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])),
            PreSplit::Regexes(patterns) => {
                let mut steps = patterns
                    .iter()
                    .map(|pattern| {
                        Split::new(
                            SplitPattern::Regex((*pattern).into()),
                            SplitDelimiterBehavior::Isolated,
                            false,
                        )
                        .map(PreTokenizerWrapper::Split)
                        .map_err(|error| ClientError::Tokenizer(error.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                steps.push(PreTokenizerWrapper::ByteLevel(byte_level.use_regex(false)));
                PreTokenizerWrapper::Sequence(Sequence::new(steps))
            }
        })
    }
}

/// Llama 3's pre-tokenizer regex, as in its `tokenizer.json` and llama.cpp's `llama-bpe`: numbers
/// in groups of up to three, contractions, words with one leading non-letter, punctuation runs,
/// newlines, and trailing spaces.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (transformers' `Qwen2Tokenizer`, llama.cpp's `qwen2`): Llama 3's with digits one by one.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's (transformers' `Qwen3_5Tokenizer`, llama.cpp's `qwen35`): Qwen2's with combining
/// marks kept with the letters before them.
const QWEN35_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (o200k; llama.cpp's `gpt-4o`, also Llama 4's and MiniMax-M2's): Tekken's word split
/// with contractions kept on the word and numbers in groups of up to three.
const GPT4O_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken (Mistral NeMo, Ministral; llama.cpp's `tekken`): words split at case changes,
/// digits one by one, no contractions, `/` kept with the punctuation before it.
const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek Coder's splits (llama.cpp's `deepseek-coder` list, in turn): line breaks, letter runs
/// with one leading space, punctuation runs likewise, runs of CJK, Hangul and everything from
/// U+0800 to U+4E00 (Indic scripts, Thai, Georgian, Greek Extended, symbols, ...), digits one by
/// one.
const DEEPSEEK_CODER_PATTERNS: [&str; 5] = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    r"\p{N}",
];

/// DeepSeek LLM's splits (llama.cpp's `deepseek-llm` list, in turn): line breaks; runs of cased
/// letters (Unicode's Lu, Ll and Lt, Latin, Greek, Cyrillic, Armenian, Georgian, ..., as the list
/// has them) with one leading space; ASCII and full-width punctuation runs likewise; trailing
/// spaces; runs of CJK, Hangul and everything from U+0800 to U+4E00 (Indic scripts, Thai,
/// Georgian, Greek Extended, symbols, ...); digit runs. Six letters are escaped: Unicode normalization (an
/// editor's, a copy's) would turn them into others (the ohm and kelvin signs into Ω and K, four
/// Greek ones likewise), and the range from the kelvin sign would then start at ASCII's `K`,
/// taking in punctuation and most alphabets.
const DEEPSEEK_LLM_PATTERNS: [&str; 6] = [
    r"[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1f7d}ᾀ-ᾴᾶ-ᾼ\u{1fbe}ῂ-ῄῆ-ῌῐ-\u{1fd3}ῖ-\u{1fdb}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212a}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    r"\p{N}+",
];

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The tokenizer a GGUF file's metadata describes (`tokenizer.ggml.model`): a byte-level BPE
/// (`gpt2`: SmolLM, Llama 3, ...) or a SentencePiece BPE (`llama`: Llama 2, TinyLlama, Mistral).
pub fn gguf_tokenizer(content: &Content) -> Result<Tokenizer> {
    let model = meta(content, "tokenizer.ggml.model")?.to_string()?;
    if !matches!(model.as_str(), "gpt2" | "llama") {
        return Err(ClientError::Unsupported(format!(
            "gguf tokenizer model {model:?} (byte-level bpe \"gpt2\" and sentencepiece \"llama\" \
             only)"
        )));
    }
    let tokens: Vec<String> = meta(content, "tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|value| value.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let token_types: Vec<i32> = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|value| value.to_vec().ok())
        .map(|values| {
            values
                .iter()
                .filter_map(|value| value.to_i32().ok())
                .collect()
        })
        .unwrap_or_default();
    let flag = |key: &str| -> Result<Option<bool>> {
        Ok(content.metadata.get(key).map(Value::to_bool).transpose()?)
    };
    let mut tokenizer = if model == "gpt2" {
        byte_level_tokenizer(content, &tokens, &token_types)?
    } else {
        let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores")?
            .to_vec()?
            .iter()
            .map(Value::to_f32)
            .collect::<candle_core::Result<_>>()?;
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        sentencepiece_tokenizer(&tokens, &scores, &token_types, add_space_prefix)?
    };
    // llama.cpp's defaults where the file does not say: BOS for SentencePiece vocabularies and
    // for the byte-level ones of Llama 3 and Tekken, none for other byte-level ones (SmolLM,
    // GPT-2, Qwen2, DeepSeek Coder, whose files say so themselves); never EOS.
    let bos_by_default = model == "llama" || pre_tokenizer(content)?.adds_bos;
    // Read as leniently as the config reads the same ids: a file that names no usable token
    // gets none added.
    let token_of = |key: &str, wanted: bool| -> Option<(String, u32)> {
        let id = meta(content, key).ok()?.to_u32().ok().filter(|_| wanted)?;
        Some((tokens.get(id as usize)?.clone(), id))
    };
    let bos = token_of(
        "tokenizer.ggml.bos_token_id",
        flag("tokenizer.ggml.add_bos_token")?.unwrap_or(bos_by_default),
    );
    let eos = token_of(
        "tokenizer.ggml.eos_token_id",
        flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    );
    add_special_tokens_processor(&mut tokenizer, bos, eos)?;
    Ok(tokenizer)
}

/// A post-processor that surrounds encoded text with `bos` and `eos` (each when given), as
/// transformers' `tokenizer.json` for Llama does (`<s> $A`, a pair as `<s> $A <s> $B`), so that
/// `encode(text, true)` adds what the model was trained with. Built as `tokenizer.json` spells
/// it, so a token of any spelling (`:` and spaces included) is taken whole.
pub(crate) fn add_special_tokens_processor(
    tokenizer: &mut Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<()> {
    use serde_json::json;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::processors::template::TemplateProcessing;
    if bos.is_none() && eos.is_none() {
        return Ok(());
    }
    let sequence = |name: &str, type_id: u32| {
        let special =
            |(token, _): &(String, u32)| json!({"SpecialToken": {"id": token, "type_id": type_id}});
        let mut pieces: Vec<serde_json::Value> = bos.iter().map(special).collect();
        pieces.push(json!({"Sequence": {"id": name, "type_id": type_id}}));
        pieces.extend(eos.iter().map(special));
        pieces
    };
    let special_tokens: serde_json::Map<String, serde_json::Value> = bos
        .iter()
        .chain(&eos)
        .map(|(token, id)| {
            (
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            )
        })
        .collect();
    let pair = [sequence("A", 0), sequence("B", 1)].concat();
    let processor: TemplateProcessing = serde_json::from_value(json!({
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": pair,
        "special_tokens": special_tokens,
    }))
    .map_err(|error| ClientError::Tokenizer(format!("special tokens template: {error}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(processor)));
    Ok(())
}

/// A SentencePiece BPE vocabulary (pieces, their scores and llama.cpp token types) as a
/// `tokenizers` BPE, as transformers converts Llama 2's `tokenizer.model`: merges are every split
/// of a normal piece into two normal pieces, ranked by the merged piece's score, which replays
/// SentencePiece's highest-score-first merging (ties, which SentencePiece BPE scores do not have,
/// go by piece id, then the halves' ids, where transformers breaks them by the halves' lengths);
/// spaces become `▁`, with one prepended (`add_space_prefix`, SentencePiece's dummy prefix);
/// characters outside the vocabulary fall back to their UTF-8 bytes (`<0xXX>` pieces). Control
/// tokens (`<s>`, `</s>`) are matched whole in text, as in Llama 2's `tokenizer.json`, so a
/// rendered chat template's markers become their ids; user-defined tokens (a fine-tune's added
/// `<|im_start|>`, say) are matched whole too, as ordinary tokens.
pub fn sentencepiece_tokenizer(
    tokens: &[String],
    scores: &[f32],
    token_types: &[i32],
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};

    if scores.len() != tokens.len() {
        return Err(ClientError::Tokenizer(format!(
            "gguf sentencepiece vocabulary: {} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let kind = |id: usize| token_types.get(id).copied().unwrap_or(TOKEN_NORMAL);
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let normal_id = |piece: &str| {
        vocab
            .get(piece)
            .copied()
            .filter(|&id| kind(id as usize) == TOKEN_NORMAL)
    };
    // (merged piece's score, its id, left id, right id)
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if kind(id) != TOKEN_NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(left), Some(right)) = (normal_id(left), normal_id(right)) {
                ranked.push((scores[id], id as u32, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, _, left, right)| {
            (
                tokens[left as usize].clone(),
                tokens[right as usize].clone(),
            )
        })
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unknown) = (0..tokens.len()).find(|&id| kind(id) == TOKEN_UNKNOWN) {
        builder = builder.unk_token(tokens[unknown].clone());
    }
    let bpe = builder
        .build()
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let to_metaspace = NormalizerWrapper::Replace(
        Replace::new(" ", "▁").map_err(|error| ClientError::Tokenizer(error.to_string()))?,
    );
    tokenizer
        .with_normalizer(Some(if add_space_prefix {
            NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(vec![
                NormalizerWrapper::Prepend(Prepend::new("▁".into())),
                to_metaspace,
            ]))
        } else {
            to_metaspace
        }))
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(
            tokenizers::normalizers::Replace::new("▁", " ")
                .map_err(|error| ClientError::Tokenizer(error.to_string()))?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(
        decoders,
    )));
    add_whole_tokens(&mut tokenizer, tokens, token_types)?;
    Ok(tokenizer)
}

/// Control tokens (type 3), such as `<|im_start|>` or `</s>`, and user-defined ones (type 4,
/// added tokens not marked special, such as Qwen2's `<tool_call>` or DeepSeek-R1's `<think>`) are
/// matched whole in the raw text, never split, as llama.cpp and transformers match them; the
/// user-defined ones are not special (decoding keeps them).
fn add_whole_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[String],
    token_types: &[i32],
) -> Result<()> {
    let of_kind = |wanted: i32| {
        tokens
            .iter()
            .zip(token_types.iter().chain(std::iter::repeat(&TOKEN_NORMAL)))
            .filter(move |(_, kind)| **kind == wanted)
            .map(|(token, _)| token.clone())
    };
    let specials: Vec<AddedToken> = of_kind(TOKEN_CONTROL)
        .map(|token| AddedToken::from(token, true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    let user_defined: Vec<AddedToken> = of_kind(TOKEN_USER_DEFINED)
        // Matched in the raw text: normalising the token itself would prepend a `▁` to it.
        .map(|token| AddedToken::from(token, false).normalized(false))
        .collect();
    tokenizer
        .add_tokens(user_defined)
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    Ok(())
}

/// The pre-tokenizer a byte-level vocabulary's `tokenizer.ggml.pre` names.
fn pre_tokenizer(content: &Content) -> Result<PreTokenizer> {
    PreTokenizer::named(
        content
            .metadata
            .get("tokenizer.ggml.pre")
            .map(|value| value.to_string().cloned())
            .transpose()?
            .as_deref(),
    )
}

/// A byte-level BPE tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`), split as the
/// pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_tokenizer(
    content: &Content,
    tokens: &[String],
    token_types: &[i32],
) -> Result<Tokenizer> {
    let pre = pre_tokenizer(content)?;
    let merges: Vec<(String, String)> = meta(content, "tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .filter_map(|value| value.to_string().ok())
        .filter_map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|error| ClientError::Tokenizer(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.wrapper()?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    add_whole_tokens(&mut tokenizer, tokens, token_types)?;
    Ok(tokenizer)
}

/// llama.cpp's names of a block's seven projections (`blk.N.NAME.weight`).
const PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// The header (metadata and tensor table) of the GGUF file `path`; errors name the file.
fn read_header(path: &Path, file: &mut std::fs::File) -> Result<Content> {
    Content::read(file).map_err(|error| ClientError::Weights {
        path: path.into(),
        message: format!("not a readable GGUF file: {error}"),
    })
}

/// The tensor `name` of the GGUF file `path`, once its declared size is checked against the
/// file's (candle's reader multiplies the dimensions unchecked); errors name file and tensor.
fn read_tensor(
    path: &Path,
    file: &mut std::fs::File,
    content: &Content,
    name: &str,
    device: &Device,
) -> Result<QTensor> {
    let error = |message: String| ClientError::Weights {
        path: path.into(),
        message: format!("tensor {name:?}: {message}"),
    };
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| error("not in the file".into()))?;
    let length = file.metadata().map_err(ClientError::io(path))?.len();
    // No GGUF type stores a weight in under one bit.
    let elements = info
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |count, &dim| count.checked_mul(dim as u64));
    if elements.is_none_or(|elements| elements > length.saturating_mul(8)) {
        return Err(error(format!(
            "its shape {:?} is more than the file's {length} bytes can hold",
            info.shape.dims()
        )));
    }
    content
        .tensor(file, name, device)
        .map_err(|candle| error(candle.to_string()))
}

/// Whether a GGUF file stores its projections in quantized types (not F32, F16 or BF16): read
/// from the header alone.
pub fn stores_quantized_projections(path: &Path) -> Result<bool> {
    let mut file = std::fs::File::open(path).map_err(ClientError::io(path))?;
    let content = read_header(path, &mut file)?;
    Ok(content.tensor_infos.iter().any(|(name, info)| {
        name.starts_with("blk.")
            && PROJECTIONS
                .iter()
                .any(|projection| name.ends_with(&format!(".{projection}.weight")))
            && !matches!(
                info.ggml_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            )
    }))
}

/// Loads a Llama-family GGUF file (architecture `llama` or `qwen2`), tokenizer from the metadata.
/// Weights are dequantized to f32, unless `keep_quantized` (QLoRA): then the projections stay in
/// their GGUF types as loaded (no f32 copy is ever made), except a Llama file's q/k, whose rows
/// must be un-permuted and are requantized to Q8_0 (near-lossless for 4- and 5-bit sources), as
/// are projections stored as F32/F16/BF16. Embeddings, norms, biases and the head are f32.
pub fn load_gguf(path: &Path, device: &Device, keep_quantized: bool) -> Result<BaseModel> {
    let mut file = std::fs::File::open(path).map_err(ClientError::io(path))?;
    let content = read_header(path, &mut file)?;
    let mut config = gguf_config(&content)?;
    let permutes_qk = architecture(&content)?.permutes_qk;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let divisors = read_tensor(path, &mut file, &content, ROPE_FREQS, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let scaling = Llama3RopeScaling::from_gguf_divisors(
            &divisors,
            config.rope_theta,
            config.head_dim(),
        )
        .ok_or_else(|| {
            ClientError::Unsupported(
                "gguf rope_freqs.weight that is not llama 3's rope scaling (factor, low 1, high 4, 8192 original positions)".into(),
            )
        })?;
        if config.rope_scaling.is_some() {
            return Err(ClientError::Unsupported(
                "gguf with both rope_freqs.weight and a rope scaling in its metadata".into(),
            ));
        }
        config.rope_scaling = Some(scaling.to_json());
    }
    let tokenizer = gguf_tokenizer(&content)?;
    let (chat_template, chat_template_refused) = crate::chat::usable(gguf_chat_template(&content));
    let mut weights = HashMap::new();
    let mut quantized = HashMap::new();
    let mut stored = super::StoredDtypes::default();
    for name in content.tensor_infos.keys() {
        let Some((hf, permute_heads)) = hf_name(name, &config, permutes_qk) else {
            continue;
        };
        let tensor = read_tensor(path, &mut file, &content, name, device)?;
        let is_projection = super::llama::is_projection_weight(&hf);
        let dtype = tensor.dtype();
        let stored_as = match dtype {
            GgmlDType::BF16 => candle_core::DType::BF16,
            GgmlDType::F16 => candle_core::DType::F16,
            // F32, and quantized blocks (exact only in f32 once dequantized).
            _ => candle_core::DType::F32,
        };
        stored.add(stored_as, tensor.shape().elem_count());
        let stays_quantized = keep_quantized
            && is_projection
            && !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if stays_quantized && permute_heads.is_none() {
            quantized.insert(hf, Arc::new(tensor));
            continue;
        }
        let dense = tensor.dequantize(device)?;
        let dense = match permute_heads {
            // A bias is one column.
            Some(heads) if dense.rank() == 1 => {
                unpermute_from_gguf(&dense.unsqueeze(1)?, heads)?.squeeze(1)?
            }
            Some(heads) => unpermute_from_gguf(&dense, heads)?,
            None => dense,
        };
        let in_features = dense.dim(dense.rank() - 1)?;
        // Requantized: un-permuted q/k, and float projections (F32/F16/BF16 files) under QLoRA.
        if keep_quantized
            && is_projection
            && in_features.is_multiple_of(GgmlDType::Q8_0.block_size())
        {
            quantized.insert(hf, Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?));
        } else {
            weights.insert(hf, dense);
        }
    }
    let eos_token_id = config
        .eos_token_id()
        .ok_or_else(|| ClientError::Tokenizer("gguf metadata has no eos token id".into()))?;
    Ok(BaseModel {
        dir: path.to_path_buf(),
        model: Llama::from_parts(config, weights, quantized, device)?,
        tokenizer,
        eos_token_id,
        chat_template,
        chat_template_refused,
        stored_dtype: stored.most_common(),
    })
}

/// `tokenizer.chat_template` (llama.cpp copies the Hugging Face template there), with the bos and
/// eos tokens' text from the vocabulary.
fn gguf_chat_template(content: &Content) -> Result<Option<ChatTemplate>> {
    let Some(source) = content.metadata.get("tokenizer.chat_template") else {
        return Ok(None);
    };
    let tokens = meta(content, "tokenizer.ggml.tokens")?.to_vec()?;
    let token = |key: &str| -> String {
        content
            .metadata
            .get(key)
            .and_then(|id| id.to_u32().ok())
            .and_then(|id| tokens.get(id as usize))
            .and_then(|token| token.to_string().ok())
            .cloned()
            .unwrap_or_default()
    };
    ChatTemplate::new(
        source.to_string()?.clone(),
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

    use tokenizers::{OffsetReferential, OffsetType};

    use super::*;
    use crate::model::config::{RopeScaling, YarnRopeScaling};
    use crate::testing::{Corruptible, corruption_never_panics, flat, logits, max_abs_difference};
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    /// Writes the tiny HF model in `dir` as a llama.cpp-style GGUF `tiny.gguf` (q/k permuted,
    /// llama.cpp tensor names, tokenizer in the metadata), projections in `projection_dtype`.
    fn write_tiny_gguf(
        dir: &Path,
        config: &LlamaConfig,
        hf: &BaseModel,
        projection_dtype: GgmlDType,
    ) -> std::path::PathBuf {
        let weights =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();

        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (gguf_name, _) in [("token_embd.weight", ()), ("output_norm.weight", ())] {
            let hf_name = hf_name(gguf_name, config, true).unwrap().0;
            tensors.push((
                gguf_name.into(),
                QTensor::quantize(&weights[&hf_name], GgmlDType::F32).unwrap(),
            ));
        }
        for layer in 0..config.num_hidden_layers {
            for suffix in PROJECTIONS.into_iter().chain(["attn_norm", "ffn_norm"]) {
                let gguf_name = format!("blk.{layer}.{suffix}.weight");
                let (hf_name, heads) = hf_name(&gguf_name, config, true).unwrap();
                let tensor = match heads {
                    Some(heads) => permute_for_gguf(&weights[&hf_name], heads).unwrap(),
                    None => weights[&hf_name].clone(),
                };
                let dtype = if suffix.ends_with("norm") {
                    GgmlDType::F32
                } else {
                    projection_dtype
                };
                tensors.push((gguf_name, QTensor::quantize(&tensor, dtype).unwrap()));
            }
        }
        // Llama 3.1+ scaling as llama.cpp's converter writes it: one divisor per frequency.
        if let Some(scaling) = config.llama3_rope_scaling().unwrap() {
            let head_dim = config.head_dim();
            let divisors: Vec<f32> = (0..head_dim / 2)
                .map(|index| {
                    let frequency =
                        1.0 / config.rope_theta.powf((2 * index) as f64 / head_dim as f64);
                    (frequency / scaling.scale(frequency)) as f32
                })
                .collect();
            let divisors = Tensor::from_vec(divisors, head_dim / 2, &Device::Cpu).unwrap();
            tensors.push((
                ROPE_FREQS.into(),
                QTensor::quantize(&divisors, GgmlDType::F32).unwrap(),
            ));
        }
        let vocab_size = hf.tokenizer.get_vocab_size(true);
        let tokens: Vec<Value> = (0..vocab_size as u32)
            .map(|id| Value::String(hf.tokenizer.id_to_token(id).unwrap()))
            .collect();
        let token_types: Vec<Value> = (0..vocab_size)
            .map(|id| Value::I32(if id < 3 { 3 } else { 1 }))
            .collect();
        let u32_value = |value: usize| Value::U32(value as u32);
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", u32_value(config.hidden_size)),
            (
                "llama.feed_forward_length",
                u32_value(config.intermediate_size),
            ),
            ("llama.block_count", u32_value(config.num_hidden_layers)),
            (
                "llama.attention.head_count",
                u32_value(config.num_attention_heads),
            ),
            (
                "llama.attention.head_count_kv",
                u32_value(config.num_kv_heads()),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(config.rms_norm_eps as f32),
            ),
            ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
            (
                "llama.context_length",
                u32_value(config.max_position_embeddings),
            ),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.merges", Value::Array(Vec::new())),
            ("tokenizer.ggml.token_type", Value::Array(token_types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ];
        let path = dir.join("tiny.gguf");
        let mut file = std::fs::File::create(&path).unwrap();
        let metadata_refs: Vec<(&str, &Value)> =
            metadata.iter().map(|(key, value)| (*key, value)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor))
            .collect();
        gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
        path
    }

    /// Malformed GGUF files are errors that name the file and what is wrong, not panics or
    /// allocations of what a header claims: an alignment of 0, a head count of the wrong type,
    /// a layer count past any model's, a tensor whose shape the file cannot hold.
    #[test]
    fn malformed_gguf_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::F32);
        let mut file = std::fs::File::open(&path).unwrap();
        let content = Content::read(&mut file).unwrap();
        let tensors: Vec<(String, QTensor)> = content
            .tensor_infos
            .keys()
            .map(|name| {
                let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
                (name.clone(), tensor)
            })
            .collect();
        let error = |key: &str, value: Value| {
            let mut metadata = content.metadata.clone();
            metadata.insert(key.into(), value);
            let metadata: Vec<(&str, &Value)> = metadata
                .iter()
                .map(|(key, value)| (key.as_str(), value))
                .collect();
            let tensors: Vec<(&str, &QTensor)> = tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor))
                .collect();
            let bad = dir.path().join("bad.gguf");
            gguf_file::write(
                &mut std::fs::File::create(&bad).unwrap(),
                &metadata,
                &tensors,
            )
            .unwrap();
            BaseModel::load(&bad, &Device::Cpu)
                .err()
                .unwrap()
                .to_string()
        };
        let message = error("general.alignment", Value::U32(0));
        assert!(
            message.contains("bad.gguf") && message.contains("alignment 0"),
            "{message}"
        );
        let message = error("llama.attention.head_count_kv", Value::String("2".into()));
        assert!(
            message.contains("llama.attention.head_count_kv"),
            "{message}"
        );
        let message = error("llama.block_count", Value::U32(1 << 30));
        assert!(
            message.contains("num_hidden_layers 1073741824 is outside"),
            "{message}"
        );

        // token_embd.weight's first dimension (ggml order: hidden, then vocab) made 2^40.
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"token_embd.weight";
        let at = bytes
            .windows(name.len())
            .position(|window| window == name)
            .unwrap()
            + name.len();
        assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 2);
        bytes[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let bad = dir.path().join("huge.gguf");
        std::fs::write(&bad, bytes).unwrap();
        let message = BaseModel::load(&bad, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("huge.gguf")
                && message.contains("token_embd.weight")
                && message.contains("more than the file"),
            "{message}"
        );
    }

    /// Random corruptions of a GGUF file's header (metadata and tensor table: counts, lengths,
    /// types, shapes, offsets) give errors or a model, never a panic: 200 files per run, or
    /// `FEDLORA_GGUF_CASES` (60 000 passed at 7256828's successor; the first 3000 found the
    /// misaligned view of the vendored `ggml_file::from_raw_data`, see vendor/README.md).
    #[test]
    fn corrupted_gguf_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::F32);
        let header = Content::read(&mut std::fs::File::open(&path).unwrap())
            .unwrap()
            .tensor_data_offset as usize;
        let file = Corruptible {
            bytes: std::fs::read(&path).unwrap(),
            path,
            prefix: header,
        };
        let load = || BaseModel::load(&file.path, &Device::Cpu);
        corruption_never_panics(
            "FEDLORA_GGUF_CASES",
            200,
            11,
            std::slice::from_ref(&file),
            &[0, 0xff],
            load,
        );
    }

    #[test]
    fn gguf_of_the_tiny_model_matches_its_hugging_face_form() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec {
            tie_word_embeddings: true,
            ..TinyModelSpec::default()
        };
        let config = write_tiny_model(dir.path(), &spec).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::F32);

        let gguf = BaseModel::load(&path, &Device::Cpu).unwrap();
        assert_eq!(gguf.model.config().dims(), config.dims());
        assert!(gguf.model.config().tie_word_embeddings);
        assert_eq!(gguf.eos_token_id, 2);
        let text = "Transfer of 12.50 EUR on 2026-03-04";
        let ids = hf.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let gguf_ids = gguf
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(gguf_ids, ids);
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let max_difference =
            max_abs_difference(&logits(&hf.model, &input), &logits(&gguf.model, &input));
        assert!(max_difference < 1e-4, "logits differ by {max_difference}");
    }

    /// GGUF files written by llama.cpp's own Python library as its converter writes them
    /// (`scripts/gguf_fixtures.py models`: a Llama with q/k permuted, the same with biases on
    /// q/k/v/o (q/k's permuted too), a Qwen2 with q/k/v biases and f16 projections, and that Qwen2
    /// with Q4_0 projections) give the logits transformers gives: of the Hugging Face checkpoints
    /// they hold (which transformers' GGUF reader also gave), and of the Q4_0 file itself. Under
    /// QLoRA the Q4_0 file's projections stay Q4_0, q/k included (Qwen2's need no un-permuting),
    /// with the same logits; the float files' become Q8_0, with logits close to those.
    #[test]
    fn gguf_files_of_llama_cpp_give_transformers_logits() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let load = |file: &str| {
            candle_core::safetensors::load(manifest.join("tests/fixtures").join(file), &Device::Cpu)
                .unwrap()
        };
        let mut expected = load("peft/expected.safetensors");
        expected.extend(load("gguf/expected.safetensors"));
        let input = expected["input_ids"]
            .to_dtype(candle_core::DType::U32)
            .unwrap();
        // Name, model type, biases per layer, the type QLoRA keeps q_proj in.
        let cases = [
            ("llama", "llama", 0, GgmlDType::Q8_0),
            ("llama_bias", "llama", 4, GgmlDType::Q8_0),
            ("qwen2", "qwen2", 3, GgmlDType::Q8_0),
            ("qwen2_q4_0", "qwen2", 3, GgmlDType::Q4_0),
        ];
        for (name, model_type, biases, kept) in cases {
            let path = manifest.join(format!("tests/fixtures/gguf/{name}.gguf"));
            let base = BaseModel::load(&path, &Device::Cpu).unwrap();
            let config = base.model.config();
            assert_eq!(config.model_type, model_type);
            assert_eq!(config.attention_bias, biases == 4, "{name}");
            assert_eq!((config.num_attention_heads, config.num_kv_heads()), (4, 2));
            let weights = base.model.merged_weights().unwrap();
            let loaded_biases = weights
                .keys()
                .filter(|key| key.starts_with("model.layers.0.") && key.ends_with(".bias"))
                .count();
            assert_eq!(loaded_biases, biases, "{name}");
            let want = flat(&expected[name]);
            let difference = max_abs_difference(&want, &logits(&base.model, &input));
            assert!(difference < 1e-4, "{name}: logits differ by {difference}");

            assert_eq!(
                stores_quantized_projections(&path).unwrap(),
                kept == GgmlDType::Q4_0,
                "{name}"
            );
            let quantized = load_gguf(&path, &Device::Cpu, true).unwrap();
            for (module, dtype) in quantized.model.projection_dtypes() {
                // down_proj's input width, 176, is no multiple of a block of 32.
                let want = (!module.ends_with("down_proj")).then_some(kept);
                assert_eq!(dtype, want, "{name}: {module}");
            }
            let scale = want.iter().fold(0.0f32, |max, logit| max.max(logit.abs()));
            let difference = max_abs_difference(&want, &logits(&quantized.model, &input));
            let close = match kept {
                // The blocks as loaded, dequantized for 16 rows and more, as above.
                GgmlDType::Q4_0 => difference < 1e-4,
                _ => difference > 0.0 && difference < 0.03 * scale,
            };
            assert!(
                close,
                "{name} QLoRA: logits differ by {difference} (largest {scale})"
            );
        }
    }

    /// QLoRA on a Q4_1 GGUF: projections stay Q4_1 as loaded (q/k, un-permuted, become Q8_0),
    /// outputs stay close to the dequantized model's, and LoRA factors below get gradients.
    #[test]
    fn quantized_gguf_keeps_its_types_as_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec {
            intermediate_size: 192, // Q4_1 blocks are 32 wide
            ..TinyModelSpec::default()
        };
        let config = write_tiny_model(dir.path(), &spec).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::Q4_1);

        let dequantized = BaseModel::load(&path, &Device::Cpu).unwrap();
        let mut kept = BaseModel::load_quantized(&path, &Device::Cpu, Default::default()).unwrap();
        assert!(
            dequantized
                .model
                .projection_dtypes()
                .iter()
                .all(|(_, dtype)| dtype.is_none())
        );
        for (module, dtype) in kept.model.projection_dtypes() {
            let expected = if module.ends_with("q_proj") || module.ends_with("k_proj") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4_1
            };
            assert_eq!(dtype, Some(expected), "{module}");
        }
        let input = Tensor::new(&[[3u32, 70, 101, 32, 250, 9, 44]], &Device::Cpu).unwrap();
        let reference = logits(&dequantized.model, &input);
        let scale = reference
            .iter()
            .map(|value| value.abs())
            .fold(0.0f32, f32::max);
        let difference = max_abs_difference(&reference, &logits(&kept.model, &input));
        assert!(
            difference < 0.05 * scale,
            "{difference} vs logits up to {scale}"
        );

        kept.model
            .attach_lora(
                &fedlora_proto::adapter::LoraSpec::new(2, 4.0, &["q_proj"]),
                1,
            )
            .unwrap();
        crate::testing::randomize_lora_b(&kept.model, 0.2, 2);
        let loss = kept
            .model
            .forward(&input)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let gradients = loss.backward().unwrap();
        for (name, var) in kept.model.named_lora_vars().unwrap() {
            let norm = crate::testing::gradient_norm_squared(&gradients, &var, &name);
            assert!(
                norm > 0.0,
                "{name} gets no gradient through the Q4_1 layers above it"
            );
        }
    }

    /// A Llama 3.1-style GGUF: its `rope_freqs.weight` becomes the same llama3 `rope_scaling` the
    /// Hugging Face model has, and the two give the same logits over positions where the scaling
    /// matters (the unscaled model does not).
    #[test]
    fn llama3_rope_freqs_become_its_rope_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec {
            tie_word_embeddings: true, // the test's GGUF writer has no output.weight
            ..TinyModelSpec::default()
        };
        write_tiny_model(dir.path(), &spec).unwrap();
        let config_path = dir.path().join("config.json");
        let unscaled = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        // With 16-wide heads and theta 1e4 the wavelengths run from 6 to 19869 positions, so
        // they fall in all three bands (kept below 2048, interpolated, divided above 8192).
        json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        std::fs::write(&config_path, json.to_string()).unwrap();
        let config = LlamaConfig::from_file(&config_path).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::F32);

        let gguf = BaseModel::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            gguf.model.config().llama3_rope_scaling().unwrap(),
            config.llama3_rope_scaling().unwrap()
        );
        let ids: Vec<u32> = (0..200)
            .map(|index| 3 + (index * 37 % 250) as u32)
            .collect();
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let scaled = logits(&hf.model, &input);
        let difference = max_abs_difference(&scaled, &logits(&gguf.model, &input));
        assert!(difference < 1e-4, "logits differ by {difference}");
        let unscaled_difference = max_abs_difference(&scaled, &logits(&unscaled.model, &input));
        assert!(
            unscaled_difference > 100.0 * difference.max(1e-6),
            "the scaling should matter here: {unscaled_difference}"
        );
    }

    /// The GGUF tokenizer named `llama-bpe` splits and merges as Llama 3's `tokenizer.json` does
    /// (its pre-tokenizer and `ignore_merges`, written out below as Meta ships them), on a small
    /// vocabulary whose merges tell the regexes apart.
    #[test]
    fn llama_bpe_tokenizer_matches_llama3_tokenizer_json() {
        let mut alphabet: Vec<String> = ByteLevel::alphabet()
            .into_iter()
            .map(|character| character.to_string())
            .collect();
        alphabet.sort();
        let specials = ["<|begin_of_text|>", "<|end_of_text|>"];
        let merges = [
            ("Ġ", "1"),
            ("Ġ1", "2"),
            ("1", "2"),
            ("12", "3"),
            ("4", "5"),
            ("'", "t"),
            ("Ġ", "d"),
            ("Ġd", "o"),
            ("Ġdo", "n"),
            ("Ċ", "Ċ"),
            ("Ġ", "w"),
        ];
        let mut tokens: Vec<String> = specials.iter().map(|token| token.to_string()).collect();
        tokens.extend(alphabet);
        tokens.extend(merges.iter().map(|(left, right)| format!("{left}{right}")));
        // In the vocabulary but reachable by no merge: only `ignore_merges` finds it.
        tokens.push("Ġhello".into());

        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), serde_json::json!(id)))
            .collect();
        let tokenizer_json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": specials.iter().enumerate().map(|(id, token)| serde_json::json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})).collect::<Vec<_>>(),
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": true, "vocab": vocab,
                "merges": merges.iter().map(|(left, right)| format!("{left} {right}")).collect::<Vec<_>>()},
        });
        let meta = Tokenizer::from_bytes(tokenizer_json.to_string()).unwrap();

        let write = |pre: Option<&str>| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vocab.gguf");
            let mut metadata = vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(tokens.iter().cloned().map(Value::String).collect()),
                ),
                (
                    "tokenizer.ggml.merges",
                    Value::Array(
                        merges
                            .iter()
                            .map(|(left, right)| Value::String(format!("{left} {right}")))
                            .collect(),
                    ),
                ),
                (
                    "tokenizer.ggml.token_type",
                    Value::Array(
                        (0..tokens.len())
                            .map(|id| Value::I32(if id < specials.len() { 3 } else { 1 }))
                            .collect(),
                    ),
                ),
            ];
            if let Some(pre) = pre {
                metadata.push(("tokenizer.ggml.pre", Value::String(pre.into())));
            }
            let refs: Vec<(&str, &Value)> =
                metadata.iter().map(|(key, value)| (*key, value)).collect();
            gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
            let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
            gguf_tokenizer(&content).unwrap()
        };
        let ours = write(Some("llama-bpe"));

        let ids = |tokenizer: &Tokenizer, text: &str| {
            tokenizer.encode(text, false).unwrap().get_ids().to_vec()
        };
        let id = |token: &str| tokens.iter().position(|known| known == token).unwrap() as u32;
        for text in [
            "Hello world 12345 don't\n\n",
            " hello 12 1234567 DON'T\r\n\n  x",
            "<|begin_of_text|>1 12 123 1234  \t ok",
            "naïve café 4545",
        ] {
            assert_eq!(ids(&ours, text), ids(&meta, text), "{text:?}");
        }
        assert_eq!(
            ids(&ours, " 12345"),
            [id("Ġ"), id("123"), id("45")],
            "numbers in groups of three, the space alone"
        );
        assert_eq!(ids(&ours, " hello"), [id("Ġhello")], "ignore_merges");

        assert_eq!(
            pre_tokenized(&ours, "Hello world 12345 don't\n\n"),
            ["Hello", "Ġworld", "Ġ", "123", "45", "Ġdon", "'t", "ĊĊ"]
        );
        // GPT-2's split keeps " 12345" whole, so the same vocabulary gives other tokens.
        assert_ne!(ids(&write(None), " 12345"), ids(&ours, " 12345"));
    }

    /// The byte-level BPE vocabulary of `scripts/gguf_fixtures.py vocab` as GGUF metadata under
    /// the pre-tokenizer name `pre`, with the bos id 0 (its first control token).
    fn bpe_fixture_content(fixture: &serde_json::Value, pre: &str) -> Content {
        let strings = |key: &str| {
            Value::Array(
                fixture[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|value| Value::String(value.as_str().unwrap().into()))
                    .collect(),
            )
        };
        let types = fixture["tokenizer.ggml.token_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|value| Value::I32(value.as_i64().unwrap() as i32))
            .collect();
        let metadata = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens".to_string(),
                strings("tokenizer.ggml.tokens"),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                strings("tokenizer.ggml.merges"),
            ),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
        ]);
        Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    /// Every `tokenizer.ggml.pre` name read here splits and merges as transformers' GGUF
    /// tokenizer does (with llama.cpp's `ignore_merges`, and its regexes rebuilt where
    /// transformers has none: see `scripts/gguf_fixtures.py`), on a vocabulary whose merges tell
    /// the GPT-2, digit, Llama 3, Qwen2, Qwen3.5, GPT-4o, Tekken, DeepSeek LLM and DeepSeek Coder
    /// splits apart (contractions in capitals, case changes inside words, digit groups, `/` runs,
    /// marks, CJK, Devanagari and Hangul jamo, whitespace runs, a token no merge reaches, a
    /// user-defined token, a letter with a combining accent); each name's pre-tokenizer cuts every
    /// text into the same pieces as the reference's; and BOS is added by default exactly where
    /// llama.cpp adds it (Llama 3's names and Tekken).
    #[test]
    fn gguf_bpe_pre_tokenizers_match_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf/bpe_vocab.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let texts: Vec<&str> = fixture["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|text| text.as_str().unwrap())
            .collect();
        let names = fixture["ids"].as_object().unwrap();
        assert_eq!(names.len(), 39);
        for (name, expected) in names {
            let tokenizer = gguf_tokenizer(&bpe_fixture_content(&fixture, name)).unwrap();
            // The split itself, which the ids below show only where a merge crosses it.
            let pieces: Vec<Vec<String>> =
                serde_json::from_value(fixture["pieces"][name].clone()).unwrap();
            assert_eq!(pieces.len(), texts.len(), "{name}");
            assert_eq!(expected.as_array().unwrap().len(), texts.len(), "{name}");
            for (text, expected) in texts.iter().zip(&pieces) {
                assert_eq!(
                    &pre_tokenized(&tokenizer, text),
                    expected,
                    "{name}: {text:?}"
                );
            }
            for (text, expected) in texts.iter().zip(expected.as_array().unwrap()) {
                let expected: Vec<u32> = expected
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|id| id.as_u64().unwrap() as u32)
                    .collect();
                let ours = tokenizer.encode(*text, false).unwrap();
                assert_eq!(ours.get_ids(), expected, "{name}: {text:?}");
                if !text.contains("<|") {
                    assert_eq!(tokenizer.decode(ours.get_ids(), false).unwrap(), *text);
                }
            }
            let with_bos = tokenizer.encode("hi", true).unwrap().get_ids().to_vec();
            let plain = tokenizer.encode("hi", false).unwrap().get_ids().to_vec();
            let adds_bos = PreTokenizer::named(Some(name)).unwrap().adds_bos;
            assert_eq!(adds_bos, with_bos.len() > plain.len(), "{name}: bos");
            // llama-vocab.cpp's `add_bos = true` names.
            let llama_cpp_adds_bos = [
                "llama-bpe",
                "llama3",
                "llama-v3",
                "falcon3",
                "falcon-h1",
                "pixtral",
                "midm-2.0",
                "lfm2",
                "jina-v5-nano",
                "tekken",
            ];
            assert_eq!(
                adds_bos,
                llama_cpp_adds_bos.contains(&name.as_str()),
                "{name}: llama.cpp's add_bos"
            );
        }
        // DeepSeek V3's split (its architecture is refused anyway).
        let unknown = gguf_tokenizer(&bpe_fixture_content(&fixture, "deepseek-v3")).unwrap_err();
        assert!(unknown.to_string().contains("\"deepseek-v3\""), "{unknown}");
    }

    /// The byte-level pieces `tokenizer`'s pre-tokenizer cuts `text` into.
    fn pre_tokenized(tokenizer: &Tokenizer, text: &str) -> Vec<String> {
        let mut split = tokenizers::PreTokenizedString::from(text);
        tokenizers::PreTokenizer::pre_tokenize(tokenizer.get_pre_tokenizer().unwrap(), &mut split)
            .unwrap();
        split
            .get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    /// A GGUF file's metadata of a SentencePiece BPE vocabulary, made by
    /// `scripts/gguf_spm_fixture.py` with SentencePiece itself (byte fallback, digits split,
    /// whitespace kept, as Llama 2's), with SentencePiece's ids for its sample texts.
    fn sentencepiece_fixture() -> (Content, Vec<(String, Vec<u32>)>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf_spm/vocab.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let array = |key: &str, value: &dyn Fn(&serde_json::Value) -> Value| {
            Value::Array(fixture[key].as_array().unwrap().iter().map(value).collect())
        };
        let metadata = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                array("tokenizer.ggml.tokens", &|v| {
                    Value::String(v.as_str().unwrap().into())
                }),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                array("tokenizer.ggml.scores", &|v| {
                    Value::F32(v.as_f64().unwrap() as f32)
                }),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                array("tokenizer.ggml.token_type", &|v| {
                    Value::I32(v.as_i64().unwrap() as i32)
                }),
            ),
        ]);
        let cases = fixture["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|case| {
                let ids = case["ids"].as_array().unwrap();
                (
                    case["text"].as_str().unwrap().to_string(),
                    ids.iter().map(|id| id.as_u64().unwrap() as u32).collect(),
                )
            })
            .collect();
        let content = Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        (content, cases)
    }

    /// Llama 2, TinyLlama and Mistral GGUF files carry a SentencePiece vocabulary
    /// (`tokenizer.ggml.model = llama`): rebuilt from it, the tokenizer gives SentencePiece's
    /// own ids (merges by score, the dummy space prefix, whitespace runs, digits, byte fallback
    /// for characters outside the vocabulary, the empty text), and decodes back to the text.
    #[test]
    fn sentencepiece_gguf_tokenizer_matches_sentencepiece() {
        let (content, cases) = sentencepiece_fixture();
        let tokenizer = gguf_tokenizer(&content).unwrap();
        assert!(cases.len() >= 10);
        for (text, expected) in &cases {
            let ids = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(&ids, expected, "{text:?}");
            assert_eq!(&tokenizer.decode(&ids, false).unwrap(), text, "{text:?}");
        }
        // Some case needed the byte fallback, and some merged several characters.
        let all: Vec<u32> = cases.iter().flat_map(|(_, ids)| ids.clone()).collect();
        assert!(
            all.iter().any(|&id| (3..259).contains(&id)),
            "no byte piece used"
        );
        assert!(
            all.iter()
                .any(|&id| tokenizer.id_to_token(id).unwrap().chars().count() > 2)
        );
        // Control tokens are matched whole (a chat template's </s> is EOS), never split.
        let ids = tokenizer
            .encode("hi</s>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids.last(), Some(&2));
        // A user-defined token (type 4, a fine-tune's addition) is matched whole.
        let mut content = content;
        let added = {
            let Value::Array(tokens) = content.metadata.get_mut("tokenizer.ggml.tokens").unwrap()
            else {
                panic!("tokens")
            };
            tokens.push(Value::String("<|sep|>".into()));
            tokens.len() as u32 - 1
        };
        for (key, value) in [
            ("tokenizer.ggml.scores", Value::F32(0.0)),
            ("tokenizer.ggml.token_type", Value::I32(4)),
        ] {
            let Value::Array(values) = content.metadata.get_mut(key).unwrap() else {
                panic!("{key}")
            };
            values.push(value);
        }
        let with_added = gguf_tokenizer(&content).unwrap();
        // The text after it starts a new piece, with its own space prefix, as llama.cpp's
        // tokenizer and transformers' legacy Llama tokenizer both do.
        let encode = |text: &str| with_added.encode(text, false).unwrap().get_ids().to_vec();
        let ids = encode("ab<|sep|>cd");
        assert_eq!(ids, [encode("ab"), vec![added], encode("cd")].concat());
        assert_eq!(with_added.decode(&ids, false).unwrap(), "ab<|sep|> cd");
        // Without the dummy prefix (`tokenizer.ggml.add_space_prefix = false`) no ▁ is added.
        content
            .metadata
            .insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        let bare = gguf_tokenizer(&content).unwrap();
        let ids = bare.encode("The", false).unwrap().get_ids().to_vec();
        assert!(!bare.id_to_token(ids[0]).unwrap().starts_with('▁'));
        assert_eq!(bare.decode(&ids, false).unwrap(), "The");
    }

    /// `encode(text, true)` adds what llama.cpp adds: BOS for a SentencePiece vocabulary unless
    /// `tokenizer.ggml.add_bos_token` says not, EOS only where `add_eos_token` says so; none
    /// for a byte-level vocabulary unless the file asks.
    #[test]
    fn gguf_tokenizers_add_the_special_tokens_llama_cpp_adds() {
        let (mut content, cases) = sentencepiece_fixture();
        content
            .metadata
            .insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        content
            .metadata
            .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        let (text, ids) = &cases[1];
        let encode = |content: &Content| {
            gguf_tokenizer(content)
                .unwrap()
                .encode(text.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        assert_eq!(encode(&content), [&[1], &ids[..]].concat());
        content
            .metadata
            .insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
        assert_eq!(encode(&content), [&[1], &ids[..], &[2]].concat());
        for key in [
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ] {
            content.metadata.insert(key.into(), Value::Bool(false));
        }
        assert_eq!(&encode(&content), ids);

        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let hf = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let path = write_tiny_gguf(dir.path(), &config, &hf, GgmlDType::F32);
        let mut file = std::fs::File::open(&path).unwrap();
        let mut content = Content::read(&mut file).unwrap();
        let byte_level = |content: &Content| {
            gguf_tokenizer(content)
                .unwrap()
                .encode("hi", true)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        let plain = byte_level(&content);
        assert_eq!(plain.len(), 2);
        content
            .metadata
            .insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        assert_eq!(byte_level(&content), [&[1], &plain[..]].concat());
        // A token of any spelling is added whole: here ":" (id 3 + 58) as BOS.
        content
            .metadata
            .insert("tokenizer.ggml.bos_token_id".into(), Value::U32(61));
        assert_eq!(byte_level(&content), [&[61], &plain[..]].concat());
        // An id outside the vocabulary adds nothing, as the config ignores it.
        content
            .metadata
            .insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1 << 20));
        assert_eq!(byte_level(&content), plain);
    }

    /// llama.cpp's `llama.rope.scaling.*` metadata becomes the `rope_scaling` transformers reads.
    #[test]
    fn gguf_linear_and_yarn_scalings_become_rope_scaling() {
        let content = |entries: Vec<(&str, Value)>| Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: entries
                .into_iter()
                .map(|(key, value)| (key.to_string(), value))
                .collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let kind = |name: &str| ("llama.rope.scaling.type", Value::String(name.into()));
        assert_eq!(gguf_rope_scaling(&content(vec![]), "llama").unwrap(), None);
        assert_eq!(
            gguf_rope_scaling(&content(vec![kind("none")]), "llama").unwrap(),
            None
        );
        let factor = ("llama.rope.scaling.factor", Value::F32(4.0));
        let linear = Some(serde_json::json!({"rope_type": "linear", "factor": 4.0}));
        assert_eq!(
            gguf_rope_scaling(&content(vec![kind("linear"), factor.clone()]), "llama").unwrap(),
            linear
        );
        // Without a type, a factor means linear, as in llama.cpp; so does the older key.
        assert_eq!(
            gguf_rope_scaling(&content(vec![factor.clone()]), "llama").unwrap(),
            linear
        );
        assert_eq!(
            gguf_rope_scaling(
                &content(vec![("llama.rope.scale_linear", Value::F32(4.0))]),
                "llama"
            )
            .unwrap(),
            linear
        );
        for neutral in [0.0, 1.0] {
            let entries = vec![("llama.rope.scaling.factor", Value::F32(neutral))];
            assert_eq!(gguf_rope_scaling(&content(entries), "llama").unwrap(), None);
        }
        // Keys under the file's architecture: Qwen2.5's long-context YaRN, and nothing of
        // another architecture's.
        let qwen2 = content(vec![
            ("qwen2.rope.scaling.type", Value::String("yarn".into())),
            ("qwen2.rope.scaling.factor", Value::F32(4.0)),
            (
                "qwen2.rope.scaling.original_context_length",
                Value::U32(32768),
            ),
        ]);
        let rope = gguf_rope_scaling(&qwen2, "qwen2").unwrap().unwrap();
        assert_eq!(
            (
                &rope["rope_type"],
                &rope["factor"],
                &rope["original_max_position_embeddings"]
            ),
            (
                &serde_json::json!("yarn"),
                &serde_json::json!(4.0),
                &serde_json::json!(32768)
            )
        );
        assert_eq!(gguf_rope_scaling(&qwen2, "llama").unwrap(), None);
        let yarn_config = |entries: Vec<(&str, Value)>| -> YarnRopeScaling {
            let rope = gguf_rope_scaling(&content(entries), "llama")
                .unwrap()
                .unwrap();
            let config: LlamaConfig = serde_json::from_value(serde_json::json!({
                "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 32768,
                "rope_scaling": rope,
            }))
            .unwrap();
            match config.rope_scaling().unwrap() {
                Some(RopeScaling::Yarn(parameters)) => parameters,
                other => panic!("yarn: {other:?}"),
            }
        };
        let original = (
            "llama.rope.scaling.original_context_length",
            Value::U32(8192),
        );
        // llama.cpp's attn_factor multiplies YaRN's own magnitude, 0.1·ln(4) + 1.
        let parameters = yarn_config(vec![
            kind("yarn"),
            factor.clone(),
            original.clone(),
            ("llama.rope.scaling.attn_factor", Value::F32(0.5)),
        ]);
        assert_eq!(
            (
                parameters.factor,
                parameters.original_max_position_embeddings,
                parameters.beta_fast
            ),
            (4.0, 8192, 32.0)
        );
        let magnitude = 0.1 * 4f64.ln() + 1.0;
        assert!((parameters.attention_factor - 0.5 * magnitude).abs() < 1e-12);
        let default = yarn_config(vec![kind("yarn"), factor.clone(), original.clone()]);
        assert!((default.attention_factor - magnitude).abs() < 1e-12);
        // The converter's yarn_attn_factor is transformers' attention_factor itself.
        let explicit = yarn_config(vec![
            kind("yarn"),
            factor.clone(),
            ("llama.rope.scaling.yarn_attn_factor", Value::F32(0.75)),
        ]);
        assert_eq!(explicit.attention_factor, 0.75);
        for (entries, named) in [
            (vec![kind("longrope"), factor.clone()], "longrope"),
            (vec![kind("linear")], "factor"),
            (
                vec![
                    kind("linear"),
                    factor.clone(),
                    ("llama.rope.scaling.attn_factor", Value::F32(2.0)),
                ],
                "attn_factor",
            ),
            (
                vec![
                    kind("yarn"),
                    factor.clone(),
                    ("llama.rope.scaling.yarn_log_multiplier", Value::F32(0.1)),
                ],
                "yarn_log_multiplier",
            ),
            (
                vec![
                    kind("yarn"),
                    factor,
                    ("llama.rope.scaling.yarn_ext_factor", Value::F32(0.5)),
                ],
                "yarn_ext_factor",
            ),
        ] {
            let error = gguf_rope_scaling(&content(entries), "llama")
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn unknown_gguf_tokenizer_models_are_named() {
        let (mut content, _) = sentencepiece_fixture();
        content
            .metadata
            .insert("tokenizer.ggml.model".into(), Value::String("rwkv".into()));
        let error = gguf_tokenizer(&content).unwrap_err().to_string();
        assert!(
            error.contains("\"rwkv\"") && error.contains("sentencepiece"),
            "{error}"
        );
    }

    #[test]
    fn permutation_round_trips() {
        let weight = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 6))
            .unwrap();
        let permuted = permute_for_gguf(&weight, 2).unwrap();
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            weight.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_from_gguf(&permuted, 2).unwrap();
        assert_eq!(
            back.to_vec2::<f32>().unwrap(),
            weight.to_vec2::<f32>().unwrap()
        );
    }
}
