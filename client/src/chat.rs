//! Prompt templates shared by training on instruction data and by `fedlora generate`, so that a
//! model is prompted at inference exactly as it was fine-tuned.
//!
//! ChatML (`<|im_start|>user … <|im_end|>`) when the tokenizer has its control tokens, as SmolLM2,
//! Qwen2 and many instruction-tuned models do; otherwise the Alpaca layout, which needs no special
//! tokens.

use tokenizers::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTemplate {
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

    /// Everything up to where the answer starts, for an instruction with optional input.
    pub fn prompt(self, instruction: &str, input: &str) -> String {
        let request = if input.is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{input}")
        };
        match self {
            Self::ChatMl => {
                format!("<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n")
            }
            Self::Alpaca if input.is_empty() => {
                format!("### Instruction:\n{instruction}\n\n### Response:\n")
            }
            Self::Alpaca => {
                format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
            }
        }
    }

    /// The answer as trained on: ChatML closes the turn with `<|im_end|>`; Alpaca relies on the
    /// end-of-sequence token the caller appends.
    pub fn response(self, output: &str) -> String {
        match self {
            Self::ChatMl => format!("{output}<|im_end|>"),
            Self::Alpaca => output.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_prompt_and_response() {
        assert_eq!(
            PromptTemplate::ChatMl.prompt("Summarise.", "Some text"),
            "<|im_start|>user\nSummarise.\n\nSome text<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(PromptTemplate::ChatMl.response("Done."), "Done.<|im_end|>");
        assert_eq!(
            PromptTemplate::Alpaca.prompt("Say hi.", ""),
            "### Instruction:\nSay hi.\n\n### Response:\n"
        );
        assert!(
            PromptTemplate::Alpaca
                .prompt("Say hi.", "x")
                .contains("### Input:\nx\n\n")
        );
    }
}
