//! Prompt templates shared by training on instruction data and by `fedlora generate`, so that a
//! model is prompted at inference exactly as it was fine-tuned.
//!
//! The model's own chat template when it ships one (the Jinja `chat_template` of a Hugging Face
//! `tokenizer_config.json`, or a GGUF file's `tokenizer.chat_template`), rendered as
//! transformers' `apply_chat_template` does; otherwise ChatML (`<|im_start|>user … <|im_end|>`)
//! when the tokenizer has its control tokens; otherwise the Alpaca layout, which needs no
//! special tokens.

use std::path::Path;
use std::sync::Arc;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};
use tokenizers::Tokenizer;

use crate::error::{ClientError, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum PromptTemplate {
    /// The model's own Jinja template.
    Model(Arc<ChatTemplate>),
    ChatMl,
    Alpaca,
}

impl PromptTemplate {
    /// ChatML when the tokenizer knows `<|im_start|>` and `<|im_end|>`, else Alpaca.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        if tokenizer.token_to_id("<|im_start|>").is_some()
            && tokenizer.token_to_id("<|im_end|>").is_some()
        {
            Self::ChatMl
        } else {
            Self::Alpaca
        }
    }

    /// The model's template when it has one, else [`PromptTemplate::for_tokenizer`].
    pub fn for_model(template: Option<&Arc<ChatTemplate>>, tokenizer: &Tokenizer) -> Self {
        template.map_or_else(
            || Self::for_tokenizer(tokenizer),
            |template| Self::Model(template.clone()),
        )
    }

    /// A short name for logs: `model`, `chatml` or `alpaca`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Model(_) => "model",
            Self::ChatMl => "chatml",
            Self::Alpaca => "alpaca",
        }
    }

    /// Everything up to where the answer starts, for an instruction with optional input.
    pub fn prompt(&self, instruction: &str, input: &str) -> Result<String> {
        let request = user_turn(instruction, input);
        Ok(match self {
            Self::Model(template) => template.render(&[("user", &request)], true)?,
            Self::ChatMl => {
                format!("<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n")
            }
            Self::Alpaca if input.is_empty() => {
                format!("### Instruction:\n{instruction}\n\n### Response:\n")
            }
            Self::Alpaca => {
                format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
            }
        })
    }

    /// Whether text laid out in this template is tokenized with the tokenizer's own special
    /// tokens (the BOS a Llama tokenizer's post-processor prepends): a model's template writes
    /// them itself (`bos_token`), and transformers' `apply_chat_template` tokenizes its text
    /// without them; ChatML and Alpaca text is tokenized as `tokenizer(text)` does, with them.
    pub fn adds_special_tokens(&self) -> bool {
        !matches!(self, Self::Model(_))
    }

    /// Whether [`PromptTemplate::example`]'s answers end their turn themselves, so that no
    /// end-of-sequence token is to be appended: ChatML's do (`<|im_end|>`), Alpaca's do not, and
    /// a model template's do where it writes an added token of `tokenizer` after an answer
    /// (Llama 3's `<|eot_id|>`, not its config's `<|end_of_text|>`:
    /// [`ChatTemplate::end_of_turn_ids`]). A template that ends a turn in plain text gets the
    /// end-of-sequence token appended, or the model would never learn to stop. Decided once per
    /// template, not from each answer's tokens (an answer may spell a special token itself).
    pub fn closes(&self, tokenizer: &Tokenizer) -> bool {
        match self {
            Self::Model(template) => !template.end_of_turn_ids(tokenizer).is_empty(),
            Self::ChatMl => true,
            Self::Alpaca => false,
        }
    }

    /// `(prompt, whole)`: the prompt, and the prompt followed by the answer as trained on
    /// (ChatML closes the turn with `<|im_end|>`, a model template as it renders an assistant
    /// turn, Alpaca relies on the end-of-sequence token the caller appends).
    pub fn example(
        &self,
        instruction: &str,
        input: &str,
        output: &str,
    ) -> Result<(String, String)> {
        let prompt = self.prompt(instruction, input)?;
        let whole = match self {
            Self::Model(template) => {
                let request = user_turn(instruction, input);
                let whole = template.render(&[("user", &request), ("assistant", output)], false)?;
                if !whole.starts_with(&prompt) {
                    return Err(ClientError::ChatTemplate(
                        "the template renders a conversation that does not start with its own \
                         generation prompt, so the answer cannot be told from the prompt"
                            .into(),
                    ));
                }
                whole
            }
            Self::ChatMl => format!("{prompt}{output}<|im_end|>"),
            Self::Alpaca => format!("{prompt}{output}"),
        };
        Ok((prompt, whole))
    }
}

/// The user's turn: the instruction, then the input after a blank line.
fn user_turn(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// A model's Jinja chat template, compiled once, with the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    environment: Environment<'static>,
}

impl PartialEq for ChatTemplate {
    fn eq(&self, other: &Self) -> bool {
        (&self.source, &self.bos_token, &self.eos_token)
            == (&other.source, &other.bos_token, &other.eos_token)
    }
}

/// The compiled template's name in its environment.
const TEMPLATE: &str = "chat";

impl ChatTemplate {
    /// Compiles `source` and renders one exchange with it, as instruction data will (an error
    /// names what minijinja cannot parse, or what failed to render: minijinja reports an
    /// unknown filter or method only when it runs, and a template that cannot render a plain
    /// user/assistant exchange would fail on every example).
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut environment = environment();
        environment
            .add_template_owned(TEMPLATE, without_generation_tags(&source)?)
            .map_err(jinja_error)?;
        let template = Self {
            source,
            bos_token,
            eos_token,
            environment,
        };
        for (messages, add_generation_prompt) in [
            (&[("user", "Hi")][..], true),
            (&[("user", "Hi"), ("assistant", "Hello")][..], false),
        ] {
            template
                .render(messages, add_generation_prompt)
                .map_err(|error| {
                    let reason = match error {
                        ClientError::ChatTemplate(reason) => reason,
                        other => other.to_string(),
                    };
                    ClientError::ChatTemplate(format!(
                        "it fails on a plain user/assistant exchange: {reason}"
                    ))
                })?;
        }
        Ok(template)
    }

    /// The text of the model's end-of-sequence token (what the template calls `eos_token`).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The text of the model's beginning-of-sequence token (the template's `bos_token`).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The Jinja source, as the model ships it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of a Hugging Face model directory: `chat_template.jinja` (transformers 5
    /// writes it there), else `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// named templates of which `default` is used). `None` when there is none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            // Not a template's fault: `usable` keeps no refusal for it (see `merge`'s caveat).
            Ok(text) => serde_json::from_str(&text).map_err(|error| ClientError::Config {
                path: config_path.clone(),
                message: error.to_string(),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(error) => return Err(ClientError::io(&config_path)(error)),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => Some(source),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match config.get("chat_template") {
                    Some(serde_json::Value::String(source)) => Some(source.clone()),
                    Some(serde_json::Value::Array(named)) => named
                        .iter()
                        .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|entry| entry.get("template")?.as_str())
                        .map(str::to_string),
                    _ => None,
                }
            }
            Err(error) => return Err(ClientError::io(&jinja_path)(error)),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        // A special token is a string or an AddedToken object with its text in `content`, in
        // tokenizer_config.json or, for older checkpoints, special_tokens_map.json.
        let map: serde_json::Value = std::fs::read_to_string(dir.join("special_tokens_map.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let token = |name: &str| {
            [&config, &map]
                .iter()
                .find_map(|source| token_text(source.get(name)?))
                .unwrap_or_default()
                .to_string()
        };
        Self::new(source, token("bos_token"), token("eos_token")).map(Some)
    }

    /// The added tokens (special or not) this template writes after an assistant's answer (Llama
    /// 3's `<|eot_id|>`, ChatML's `<|im_end|>`, Llama 2's `</s>`), by rendering one exchange:
    /// where generation stops. Empty where the template ends a turn in plain text or cannot
    /// render it.
    pub fn end_of_turn_ids(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        const ANSWER: &str = "fedlora-answer";
        let Ok(whole) = self.render(&[("user", "Hi"), ("assistant", ANSWER)], false) else {
            return Vec::new();
        };
        let Some(at) = whole.rfind(ANSWER) else {
            return Vec::new();
        };
        let added = tokenizer.get_added_tokens_decoder();
        tokenizer
            .encode(&whole[at + ANSWER.len()..], false)
            .map(|encoding| {
                encoding
                    .get_ids()
                    .iter()
                    .copied()
                    .filter(|id| added.contains_key(id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Renders `messages` (`(role, content)`), with the assistant's opening when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| context! { role => *role, content => *content })
            .collect();
        let template = self
            .environment
            .get_template(TEMPLATE)
            .map_err(jinja_error)?;
        // transformers passes tools and documents as None when there are none.
        let none = Value::from(());
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                tools => none.clone(),
                documents => none,
            })
            .map_err(jinja_error)
    }
}

/// A special token's text as tokenizer_config.json and special_tokens_map.json give it: a string,
/// or an AddedToken object with its text in `content`.
pub fn token_text(value: &serde_json::Value) -> Option<&str> {
    value.as_str().or_else(|| value.get("content")?.as_str())
}

/// A loaded template, or `None` with a warning when it cannot be used (minijinja does not parse
/// every Jinja2 extension): text and CSV training, `merge` and raw generation need no template,
/// and instruction data falls back to ChatML or Alpaca. The second value is why a template the
/// model ships was refused ([`ClientError::ChatTemplate`]: it does not parse or render), kept
/// for `merge`'s caveat; `None` where there is no template, or where the files around it could
/// not be read (an unreadable or malformed `tokenizer_config.json` says nothing about a template).
pub fn usable(
    template: Result<Option<ChatTemplate>>,
) -> (Option<Arc<ChatTemplate>>, Option<String>) {
    match template {
        Ok(template) => (template.map(Arc::new), None),
        Err(error) => {
            tracing::warn!(
                %error,
                "the model's chat template cannot be used: instruction data falls back to \
                 ChatML or Alpaca"
            );
            let refused = matches!(error, ClientError::ChatTemplate(_)).then(|| error.to_string());
            (None, refused)
        }
    }
}

/// transformers' `{% generation %}` … `{% endgeneration %}` tags (an extension of its own that
/// marks the assistant's text for `return_assistant_tokens_mask`) render their body as it is;
/// minijinja has no such tag. Rewritten as `{% if true %}` … `{% endif %}`, block tags as they
/// are, with each tag's whitespace control (`{%-`, `-%}`) kept, the template renders the same text.
/// The rewrite is textual: the tag's spelling inside a string literal or a `{% raw %}` block
/// would be rewritten too (no shipped template is known to hold one).
fn without_generation_tags(source: &str) -> Result<String> {
    let tag = regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}")
        .map_err(|error| ClientError::ChatTemplate(error.to_string()))?;
    Ok(tag
        .replace_all(source, |captures: &regex::Captures<'_>| {
            let (open, close) = (&captures[1], &captures[3]);
            let statement = match captures.get(2) {
                Some(_) => "endif",
                None => "if true",
            };
            format!("{{%{open} {statement} {close}%}}")
        })
        .into_owned())
}

/// What one render may spend (minijinja's fuel: about one per instruction, and one per 64 bytes
/// it allocates, so at most about 300 MB).
const TEMPLATE_FUEL: u64 = 5_000_000;

/// The environment transformers renders chat templates in: blocks trimmed and left-stripped,
/// Python's string methods, `raise_exception`, and `strftime_now`.
fn environment() -> Environment<'static> {
    let mut environment = Environment::new();
    // A render of one example costs thousands; a template that loops (or builds strings) far
    // past that is refused with minijinja's out-of-fuel error instead of hanging the site.
    environment.set_fuel(Some(TEMPLATE_FUEL));
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        environment.set_syntax(syntax);
    }
    environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    environment.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    environment.add_filter("tojson", python_tojson);
    // Llama 3.1+ templates print today's date in their system turn; a fixed date keeps the
    // rendered training text, and so the tokens every site trains on, reproducible.
    environment.add_function("strftime_now", |_format: String| "26 Jul 2024".to_string());
    environment
}

/// Jinja's `tojson` as transformers defines it, `json.dumps(value, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`: `", "` and `": "` between items (`","` before a new line
/// when indented), non-ASCII text as it is, nothing HTML-escaped. minijinja's own filter writes
/// compact, HTML-safe JSON, which would change the tokens a template produces.
fn python_tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted and ignored, as transformers does with `separators` unset.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|error| {
        JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {error}"))
    })?;
    let mut out = String::new();
    write_python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    value: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as Json;
    let (open, close, items): (char, char, Vec<(Option<&String>, &Json)>) = match value {
        Json::Array(items) => ('[', ']', items.iter().map(|item| (None, item)).collect()),
        Json::Object(entries) => {
            let mut entries: Vec<_> = entries.iter().map(|(k, v)| (Some(k), v)).collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            ('{', '}', entries)
        }
        scalar => {
            out.push_str(&scalar.to_string());
            return;
        }
    };
    out.push(open);
    for (index, (key, item)) in items.iter().enumerate() {
        match indent {
            Some(width) => {
                out.push_str(if index == 0 { "\n" } else { ",\n" });
                out.push_str(&" ".repeat(width * (level + 1)));
            }
            None if index > 0 => out.push_str(", "),
            None => {}
        }
        if let Some(key) = key {
            out.push_str(&Json::String((*key).clone()).to_string());
            out.push_str(": ");
        }
        write_python_json(item, indent, sort_keys, level + 1, out);
    }
    if let (Some(width), false) = (indent, items.is_empty()) {
        out.push('\n');
        out.push_str(&" ".repeat(width * level));
    }
    out.push(close);
}

fn jinja_error(error: JinjaError) -> ClientError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ClientError::ChatTemplate(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn builtin_templates_render_prompt_and_answer() {
        let (prompt, whole) = PromptTemplate::ChatMl
            .example("Summarise.", "Some text", "Done.")
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nSummarise.\n\nSome text<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(whole, format!("{prompt}Done.<|im_end|>"));
        assert_eq!(
            PromptTemplate::Alpaca.prompt("Say hi.", "").unwrap(),
            "### Instruction:\nSay hi.\n\n### Response:\n"
        );
        assert!(
            PromptTemplate::Alpaca
                .prompt("Say hi.", "x")
                .unwrap()
                .contains("### Input:\nx\n\n")
        );
    }

    /// Llama 3's template as Meta ships it in tokenizer_config.json: `bos_token`, `trim`, loop
    /// state and the generation prompt.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// SmolLM2-Instruct's: ChatML with a default system message.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Every expected string below is what transformers 5.24's `render_jinja_template` printed
    /// for the same template and messages.
    #[test]
    fn model_templates_render_as_transformers_does() {
        let llama3 = PromptTemplate::Model(Arc::new(
            ChatTemplate::new(
                LLAMA3.into(),
                "<|begin_of_text|>".into(),
                "<|eot_id|>".into(),
            )
            .unwrap(),
        ));
        let (prompt, whole) = llama3.example("Say hi.", "", " Hi! ").unwrap();
        // What transformers 5's apply_chat_template prints for these messages.
        assert_eq!(
            prompt,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hi.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            whole,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hi.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>"
        );

        // Generation stops on the special tokens a template writes after an answer: Llama 3's
        // <|eot_id|>, ChatML's <|im_end|> (not the newline after it); none for a plain-text
        // turn end.
        let mut tokenizer = crate::tiny::byte_level_tokenizer().unwrap();
        let added: Vec<tokenizers::AddedToken> = ["<|eot_id|>", "<|begin_of_text|>", "<|im_end|>"]
            .into_iter()
            .chain(["<|start_header_id|>", "<|end_header_id|>", "<|im_start|>"])
            .map(|token| tokenizers::AddedToken::from(token, true))
            .collect();
        tokenizer.add_special_tokens(added).unwrap();
        let id = |token: &str| tokenizer.token_to_id(token).unwrap();
        let PromptTemplate::Model(llama3_template) = &llama3 else {
            unreachable!()
        };
        assert_eq!(
            llama3_template.end_of_turn_ids(&tokenizer),
            [id("<|eot_id|>")]
        );
        let plain = ChatTemplate::new(
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(plain.end_of_turn_ids(&tokenizer).is_empty());
        assert!(llama3.closes(&tokenizer));
        assert!(!PromptTemplate::Model(Arc::new(plain)).closes(&tokenizer));
        // An end-of-turn token the tokenizer adds without marking it special still ends a turn.
        let chatml_like = PromptTemplate::Model(Arc::new(
            ChatTemplate::new(
                "{% for m in messages %}<|turn|>{{ m['content'] }}<|endturn|>\n{% endfor %}".into(),
                String::new(),
                String::new(),
            )
            .unwrap(),
        ));
        assert!(!chatml_like.closes(&tokenizer));
        let mut unmarked = tokenizer.clone();
        unmarked
            .add_tokens(vec![tokenizers::AddedToken::from("<|endturn|>", false)])
            .unwrap();
        assert!(chatml_like.closes(&unmarked));

        let smollm2 = PromptTemplate::Model(Arc::new(
            ChatTemplate::new(SMOLLM2.into(), String::new(), "<|im_end|>".into()).unwrap(),
        ));
        if let PromptTemplate::Model(template) = &smollm2 {
            assert_eq!(template.end_of_turn_ids(&tokenizer), [id("<|im_end|>")]);
        }
        let (prompt, whole) = smollm2.example("Say hi.", "", "Hi!").unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            &whole[prompt.len() - "<|im_start|>assistant\n".len()..],
            "<|im_start|>assistant\nHi!<|im_end|>\n"
        );

        // Blocks on lines of their own: trimmed and left-stripped; Python's str.strip().
        let layout = ChatTemplate::new(
            "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n  {{ message['content'].strip() }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n>{% endif %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            layout.render(&[("user", " Say hi. ")], true).unwrap(),
            "  Say hi.\n>"
        );

        // transformers' `{% generation %}` tags render their body, whitespace control and all:
        // the expected text is what transformers' own environment rendered from this template.
        let generation = ChatTemplate::new(
            "{%- for message in messages %}\n{%- if message['role'] == 'assistant' %}\n\
             <|assistant|>\n{%- generation -%}\n {{ message['content'] }} \n{%- endgeneration %}\n\
             <|end|>\n{% else %}\n<|{{ message['role'] }}|>\n{% generation %}  \
             {{ message['content'] }}{% endgeneration %}\n\n{%- endif %}\n{%- endfor %}\n\
             {%- if add_generation_prompt %}<|assistant|>{% endif %}"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            generation
                .render(&[("user", "Hi"), ("assistant", "Hello!")], true)
                .unwrap(),
            "<|user|>\n  Hi<|assistant|>Hello!<|end|>\n<|assistant|>"
        );
        assert!(generation.source().contains("{%- generation -%}"));

        // No tools and no documents are None, as transformers passes them.
        let tools = ChatTemplate::new(
            "{% if tools is not none %}tools{% endif %}{% if documents is none %}ok{% endif %}"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(tools.render(&[("user", "x")], true).unwrap(), "ok");

        // tojson as Python's json.dumps writes it: spaces after separators, keys in order (or
        // sorted), text unescaped but for JSON's own escapes.
        let json = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson }}\
             {{ {} | tojson(indent=2) }}|{{ {'b': 1, 'a': [1.5, true, none]} | tojson(sort_keys=true) }}"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            json.render(&[("user", "héllo <b>&'\"\n")], false).unwrap(),
            "[{\"role\": \"user\", \"content\": \"héllo <b>&'\\\"\\n\"}]|\
             {\n  \"role\": \"user\",\n  \"content\": \"héllo <b>&'\\\"\\n\"\n}|[]{}|\
             {\"a\": [1.5, true, null], \"b\": 1}"
        );
    }

    #[test]
    fn templates_load_from_a_model_directory_and_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ChatTemplate::from_model_dir(dir.path()).unwrap(), None);
        let config = serde_json::json!({
            "chat_template": [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": "x"}],
            "bos_token": {"content": "<|begin_of_text|>", "lstrip": false},
            "eos_token": "<|eot_id|>",
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
        assert_eq!(template.bos_token, "<|begin_of_text|>");
        assert!(
            template
                .render(&[("user", "x")], true)
                .unwrap()
                .ends_with("assistant<|end_header_id|>\n\n")
        );

        // transformers 5 keeps the template in its own file, which wins.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ raise_exception('no system role') }}",
        )
        .unwrap();
        let error = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no system role"), "{error}");
        // An unknown filter compiles in minijinja and fails only when it runs: refused on
        // load too, so that `usable` falls back to ChatML or Alpaca.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}",
        )
        .unwrap();
        let error = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("plain user/assistant exchange"), "{error}");
        let (template, refused) = usable(ChatTemplate::from_model_dir(dir.path()));
        assert!(template.is_none());
        assert!(refused.unwrap().contains("plain user/assistant exchange"));

        // A template that would run (or allocate) without end runs out of fuel instead.
        for endless in [
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
            "{{ 'x' * 100000000000 }}",
        ] {
            std::fs::write(dir.path().join("chat_template.jinja"), endless).unwrap();
            let error = ChatTemplate::from_model_dir(dir.path())
                .unwrap_err()
                .to_string();
            assert!(error.contains("fuel"), "{error}");
        }

        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let error = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("chat template: "), "{error}");

        // A malformed tokenizer_config.json is the config's fault, not a refused template.
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            "{\"chat_template\": ",
        )
        .unwrap();
        let error = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
        assert!(matches!(error, ClientError::Config { .. }), "{error}");
        assert_eq!(usable(Err(error)), (None, None));
    }
}
