//! Local data, tokenized and split into train and held-out examples, then cut into windows:
//!
//! - JSONL, one object per line: `{"text": ...}` is a document; `{"instruction": ...,
//!   "input": ... (optional), "output": ...}` is an instruction example (also where a `text`
//!   field stands beside them), rendered through the model's prompt template (`crate::chat`),
//!   trained with loss on the response only.
//! - CSV with a header row: one column (default `text`) holds the documents.
//!
//! Text is tokenized as transformers' `tokenizer(text)` does, with the tokenizer's special tokens:
//! a Llama tokenizer's post-processor starts every document and every Alpaca or ChatML example
//! with BOS, as at inference. Text rendered through a model's own chat template carries the BOS
//! the template writes (`bos_token`) and is tokenized without them, as `apply_chat_template` does.
//!
//! Documents are packed (each followed by EOS) into full windows, and kept apart inside them:
//! a window records where each document starts ([`Window::starts`]), the model's attention is
//! block-diagonal along those starts and rotary positions restart at each (as transformers does
//! for padding-free packing), and the target that would predict a document's first token from
//! the one before is not counted. Each instruction example gets its own window, right-padded
//! within its batch. Causal attention never looks right, so right padding needs no attention
//! mask: real positions are computed exactly as without padding, and padded positions are
//! excluded from the loss by the window's target range.
//!
//! Nothing here leaves the site: the daemon only reports counts derived from it.

use std::ops::Range;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::chat::PromptTemplate;
use crate::error::{ClientError, Result};

/// Every `HELDOUT_EVERY`-th example (index ≡ HELDOUT_EVERY−1) is held out for evaluation.
pub const HELDOUT_EVERY: usize = 10;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Plain text: every token is a target.
    Text(Vec<u32>),
    /// An instruction example: only the response (and the closing EOS) are targets.
    Supervised {
        prompt: Vec<u32>,
        response: Vec<u32>,
        /// The response already ends with the template's end-of-turn token: no EOS is appended.
        closed: bool,
    },
}

/// A site's tokenized examples, split deterministically into train and held-out parts.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteData {
    pub train: Vec<Example>,
    pub heldout: Vec<Example>,
    /// The line of the file each example starts on, in the file's order (train and held-out
    /// examples as they were read): errors about an example name its line, not its position
    /// among the non-blank records.
    pub lines: Vec<usize>,
}

/// One row of a batch: inputs are `tokens[..n-1]`, targets `tokens[1..]`, and only targets at
/// positions in `targets` count in the loss (see [`Window::counts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub targets: Range<usize>,
    /// Indices into `tokens`, ascending and above 0, where another packed document starts: from
    /// each on, positions attend only to their own document, and the target predicting that
    /// document's first token (from the end of the one before) does not count. Empty for a
    /// window holding one document or part of one.
    pub starts: Vec<usize>,
}

impl Window {
    /// A window of one document whose every target counts.
    pub fn full(tokens: Vec<u32>) -> Self {
        let targets = 0..tokens.len().saturating_sub(1);
        Self {
            tokens,
            targets,
            starts: Vec::new(),
        }
    }

    /// Input positions (real tokens, padding excluded).
    pub fn input_len(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }

    /// Whether the target at `position` (predicting `tokens[position + 1]`) counts in the loss.
    pub fn counts(&self, position: usize) -> bool {
        self.targets.contains(&position) && self.starts.binary_search(&(position + 1)).is_err()
    }

    pub fn num_targets(&self) -> usize {
        self.targets
            .clone()
            .filter(|&position| self.counts(position))
            .count()
    }

    /// The first index of the document holding input position `position`.
    pub fn document_start(&self, position: usize) -> usize {
        match self.starts.partition_point(|&start| start <= position) {
            0 => 0,
            after => self.starts[after - 1],
        }
    }

    /// Whether some input position belongs to another document than the first (a start at the
    /// last token only drops a target).
    pub fn is_packed(&self) -> bool {
        self.starts
            .first()
            .is_some_and(|&start| start < self.input_len())
    }
}

impl SiteData {
    /// Reads `path`: CSV (by its `.csv` extension, documents from `text_column`) or JSONL, whose
    /// instruction examples are laid out in `template`.
    pub fn load(
        path: &Path,
        tokenizer: &Tokenizer,
        template: &PromptTemplate,
        text_column: &str,
    ) -> Result<Self> {
        if path
            .extension()
            .is_some_and(|extension| extension.eq_ignore_ascii_case("csv"))
        {
            Self::from_csv(path, text_column, tokenizer)
        } else {
            Self::from_jsonl(path, tokenizer, template)
        }
    }

    /// Reads JSONL (UTF-8, a byte-order mark ignored): per line a `text` document or an
    /// `instruction`/`input`/`output` example (which wins where a line has both, as Alpaca
    /// exports do); blank lines are skipped.
    pub fn from_jsonl(
        path: &Path,
        tokenizer: &Tokenizer,
        template: &PromptTemplate,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(ClientError::io(path))?;
        // A byte-order mark (some editors write one) is not part of the first line's JSON.
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
            return Err(ClientError::Data {
                path: path.to_path_buf(),
                line: 1,
                message: "the file is UTF-16 text (a byte-order mark says so); save it as UTF-8"
                    .into(),
            });
        }
        let closed = template.closes(tokenizer);
        let mut examples = Vec::new();
        for (index, line) in bytes.split(|&byte| byte == b'\n').enumerate() {
            let data_error = |message: String| ClientError::Data {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let line = std::str::from_utf8(line)
                .map_err(|error| data_error(format!("not UTF-8 text: {error}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|error| data_error(json_error(&error, index, line)))?;
            let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
            if value
                .get("input")
                .is_some_and(|input| !input.is_string() && !input.is_null())
            {
                return Err(data_error("\"input\" must be a string".into()));
            }
            let encode = |text: &str| -> Result<Vec<u32>> {
                Ok(tokenizer
                    .encode(text, true)
                    .map_err(|error| data_error(format!("tokenizer: {error}")))?
                    .get_ids()
                    .to_vec())
            };
            let example = match (field("text"), field("instruction"), field("output")) {
                // Blank documents teach nothing, and are not counted (as in CSV).
                (Some(text), None, None) if text.trim().is_empty() => continue,
                (Some(text), None, None) => Example::Text(encode(text)?),
                // Alpaca-style exports carry a pre-rendered `text` beside the fields: the fields
                // win, rendered in this model's template with loss on the response only.
                (_, Some(instruction), Some(output)) => {
                    let (prompt, full) = template
                        .example(instruction, field("input").unwrap_or(""), output)
                        .map_err(|error| data_error(error.to_string()))?;
                    // One encoding of the whole text, split where the response starts: encoding
                    // the two parts apart would tokenize the seam differently from inference
                    // (SentencePiece would start the response with a word-boundary piece).
                    let encoding = tokenizer
                        .encode(full.as_str(), template.adds_special_tokens())
                        .map_err(|error| data_error(format!("tokenizer: {error}")))?;
                    let split = encoding
                        .get_offsets()
                        .iter()
                        .position(|(_, end)| *end > prompt.len())
                        .unwrap_or(encoding.len());
                    let ids = encoding.get_ids();
                    Example::Supervised {
                        prompt: ids[..split].to_vec(),
                        response: ids[split..].to_vec(),
                        closed,
                    }
                }
                _ => {
                    return Err(data_error(
                        "expected an object with a string \"text\", or strings \"instruction\" and \"output\" (and optionally \"input\")".into(),
                    ));
                }
            };
            examples.push((index + 1, example));
        }
        Ok(Self::split_lines(examples))
    }

    /// Reads CSV with a header row; each non-empty value of `column` is a document.
    pub fn from_csv(path: &Path, column: &str, tokenizer: &Tokenizer) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(ClientError::io(path))?;
        let mut reader = csv::Reader::from_reader(file);
        let headers = reader.headers().map_err(|error| ClientError::Data {
            path: path.to_path_buf(),
            line: 1,
            message: error.to_string(),
        })?;
        let index = headers
            .iter()
            .position(|header| header == column)
            .ok_or_else(|| ClientError::Data {
                path: path.to_path_buf(),
                line: 1,
                // The names are not printed: in a file without a header row they are the
                // first record, data that must not reach a log.
                message: format!(
                    "no column {column:?} among the {} of the first row, which must name the \
                     columns (choose one with --text-column)",
                    headers.len()
                ),
            })?;
        let mut examples = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|error| ClientError::Data {
                path: path.to_path_buf(),
                line: error
                    .position()
                    .map_or(0, |position| position.line() as usize),
                message: error.to_string(),
            })?;
            let line = record
                .position()
                .map_or(0, |position| position.line() as usize);
            let text = record.get(index).unwrap_or("");
            if text.trim().is_empty() {
                continue;
            }
            let encoding = tokenizer
                .encode(text, true)
                .map_err(|error| ClientError::Data {
                    path: path.to_path_buf(),
                    line,
                    message: format!("tokenizer: {error}"),
                })?;
            examples.push((line, Example::Text(encoding.get_ids().to_vec())));
        }
        Ok(Self::split_lines(examples))
    }

    /// Splits examples into train and held-out parts (every tenth example is held out),
    /// numbering them as lines 1, 2, … (examples that come from no file).
    #[cfg(test)]
    pub(crate) fn split(examples: Vec<Example>) -> Self {
        Self::split_lines(
            examples
                .into_iter()
                .enumerate()
                .map(|(index, example)| (index + 1, example))
                .collect(),
        )
    }

    /// Splits `(line, example)` pairs, in the file's order, into train and held-out parts
    /// (every tenth example is held out), keeping each example's line.
    pub fn split_lines(examples: Vec<(usize, Example)>) -> Self {
        let mut train = Vec::new();
        let mut heldout = Vec::new();
        let mut lines = Vec::with_capacity(examples.len());
        for (index, (line, example)) in examples.into_iter().enumerate() {
            lines.push(line);
            if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 {
                heldout.push(example);
            } else {
                train.push(example);
            }
        }
        Self {
            train,
            heldout,
            lines,
        }
    }

    /// Refuses data too small to split: at least 10 examples are needed (every tenth is held
    /// out). `path` names the file in the error.
    pub fn check_split(&self, path: &Path) -> Result<()> {
        if self.train.is_empty() || self.heldout.is_empty() {
            return Err(ClientError::NotEnoughData(format!(
                "{} has {} examples; at least 10 are needed (every tenth is held out; blank \
                 documents, and blank cells of a CSV file's text column, do not count)",
                path.display(),
                self.train.len() + self.heldout.len()
            )));
        }
        Ok(())
    }

    /// Refuses token ids the model has no embedding for (`vocab` rows): a tokenizer with tokens
    /// added after the checkpoint's embeddings were sized. Caught here, when the data is read,
    /// and not by the first step's embedding lookup, whose error names neither file. The error
    /// counts them and names the line of the first (in the file's order); no id or text is
    /// printed.
    pub fn check_vocab(&self, path: &Path, vocab: usize) -> Result<()> {
        let outside = |ids: &[u32]| ids.iter().filter(|&&id| id as usize >= vocab).count();
        let tokens = |example: &Example| match example {
            Example::Text(ids) => outside(ids),
            Example::Supervised {
                prompt, response, ..
            } => outside(prompt) + outside(response),
        };
        // The file's order: every tenth example is held out, the nine before it train.
        let train = self
            .train
            .iter()
            .enumerate()
            .map(|(index, example)| (index + index / (HELDOUT_EVERY - 1), example));
        let heldout = self
            .heldout
            .iter()
            .enumerate()
            .map(|(index, example)| (index * HELDOUT_EVERY + HELDOUT_EVERY - 1, example));
        let (mut count, mut examples, mut first) = (0, 0, usize::MAX);
        for (position, example) in train.chain(heldout) {
            let found = tokens(example);
            if found > 0 {
                count += found;
                examples += 1;
                first = first.min(position);
            }
        }
        if count == 0 {
            return Ok(());
        }
        Err(ClientError::Tokenizer(format!(
            "{}: {count} tokens in {examples} examples (the first on line {}) have ids beyond \
             the model's {vocab} embeddings: the tokenizer has tokens the checkpoint has no \
             embedding for (tokens added to tokenizer.json without resizing the model?)",
            path.display(),
            self.lines.get(first).copied().unwrap_or(first + 1)
        )))
    }

    /// Number of training examples: the count reported to the coordinator.
    pub fn num_examples(&self) -> usize {
        self.train.len()
    }
}

/// A JSONL line's parse error, without serde_json's own position (always line 1 of the line),
/// with a hint for the usual wrong inputs: a JSON array of examples, pretty-printed objects.
fn json_error(error: &serde_json::Error, index: usize, line: &str) -> String {
    let text = error.to_string();
    let reason = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(reason, _)| reason);
    let hint = if index == 0 && line.trim_start().starts_with('[') {
        " (the file looks like one JSON array; JSONL holds one object per line: \
         `jq -c '.[]' data.json > data.jsonl` converts it)"
    } else if error.is_eof() {
        " (each line must hold one whole JSON object: pretty-printed JSON is not JSONL)"
    } else {
        ""
    };
    format!("invalid JSON at column {}: {reason}{hint}", error.column())
}

/// Windows of at most `seq_len + 1` tokens: text documents packed (see [`pack_windows`]), each
/// instruction example in its own window (prompt + response + EOS, cut at `seq_len + 1`) with
/// only its response positions as targets. Examples whose prompt fills the window are dropped.
pub fn make_windows(examples: &[Example], eos: u32, seq_len: usize) -> Vec<Window> {
    let documents: Vec<Vec<u32>> = examples
        .iter()
        .filter_map(|example| match example {
            Example::Text(tokens) => Some(tokens.clone()),
            Example::Supervised { .. } => None,
        })
        .collect();
    let mut windows = pack_windows(&documents, eos, seq_len);
    windows.extend(
        examples
            .iter()
            .filter_map(|example| supervised_window(example, eos, seq_len)),
    );
    windows
}

/// An instruction example's window (prompt + response + EOS, cut at `seq_len + 1`, targets on
/// the response), or `None` for text and for examples whose prompt fills the window.
fn supervised_window(example: &Example, eos: u32, seq_len: usize) -> Option<Window> {
    let Example::Supervised {
        prompt,
        response,
        closed,
    } = example
    else {
        return None;
    };
    let mut tokens: Vec<u32> = prompt.iter().chain(response).copied().collect();
    if !closed && tokens.last() != Some(&eos) {
        tokens.push(eos);
    }
    tokens.truncate(seq_len + 1);
    let targets = prompt.len().saturating_sub(1)..tokens.len().saturating_sub(1);
    (!targets.is_empty()).then_some(Window {
        tokens,
        targets,
        starts: Vec::new(),
    })
}

/// How many instruction examples of `examples` are cut at `seq_len`: trained, but their
/// response (with its end-of-sequence or end-of-turn token) does not fit the window, so the
/// model does not learn where it ends. A count for a warning; [`make_windows`] cuts them.
pub fn cut_examples(examples: &[Example], eos: u32, seq_len: usize) -> usize {
    examples
        .iter()
        .filter(|example| match example {
            Example::Supervised {
                prompt,
                response,
                closed,
            } => {
                let ends_with_eos = *closed || response.last() == Some(&eos);
                let length = prompt.len() + response.len() + usize::from(!ends_with_eos);
                prompt.len() <= seq_len && length > seq_len + 1
            }
            Example::Text(_) => false,
        })
        .count()
}

/// How many of `examples` [`make_windows`] trains on at `seq_len`: the text documents with a
/// counted target in some packed window (not those that fall wholly in the stream's tail past
/// the last full window, nor a document that is only an EOS token, whose one target is not
/// counted), and the instruction examples whose prompt leaves room for a response token (a
/// longer response is cut). This is the weight a site's update carries in FedAvg, so examples
/// that teach nothing do not count.
pub fn trained_examples(examples: &[Example], eos: u32, seq_len: usize) -> usize {
    let (starts, extents): (Vec<usize>, Vec<usize>) = stream_layout(
        examples.iter().filter_map(|example| match example {
            Example::Text(tokens) => Some(tokens.as_slice()),
            Example::Supervised { .. } => None,
        }),
        eos,
    )
    .unzip();
    let stream_len = starts.last().zip(extents.last()).map_or(0, |(s, e)| s + e);
    // A document's tokens after its first are predicted, and counted, up to `last`.
    let documents = last_target(stream_len, seq_len).map_or(0, |last| {
        starts
            .iter()
            .zip(&extents)
            .filter(|&(&start, &extent)| extent >= 2 && start < last)
            .count()
    });
    let instructions = examples
        .iter()
        .filter(|example| supervised_window(example, eos, seq_len).is_some())
        .count();
    documents + instructions
}

/// Where each non-empty document starts in the packed stream, and how many tokens it takes
/// there (its own, and the EOS appended unless it already ends with one).
fn stream_layout<'a>(
    documents: impl IntoIterator<Item = &'a [u32]>,
    eos: u32,
) -> impl Iterator<Item = (usize, usize)> {
    documents
        .into_iter()
        .filter(|document| !document.is_empty())
        .scan(0, move |next, document| {
            let start = *next;
            let extent = document.len() + usize::from(document.last() != Some(&eos));
            *next += extent;
            Some((start, extent))
        })
}

/// The stream position of the last token that [`pack_windows`]' targets predict, for a stream
/// of `len` tokens cut at `seq_len`: the end of the last full window, or the stream's own end
/// when it is shorter than one window; `None` when no window is cut. Every token at positions
/// `1..=last` is predicted by exactly one window's target.
fn last_target(len: usize, seq_len: usize) -> Option<usize> {
    if seq_len == 0 || len < 2 {
        None
    } else if len <= seq_len {
        Some(len - 1)
    } else {
        Some((len - 1) / seq_len * seq_len)
    }
}

/// Packs the non-empty documents (each followed by `eos`, unless the tokenizer already ended it
/// so) into one stream and cuts windows of `seq_len + 1` tokens that overlap by one, so every
/// token up to the last full window is a target exactly once, except each document's first (see
/// [`Window::starts`]); the stream's tail past the last full window is left out. A document cut
/// by a window's end continues in the next window as if it started there (at position 0,
/// without its beginning). A stream shorter than one window becomes a single shorter window (if
/// it has at least two tokens), so a site with little data still trains and evaluates.
pub fn pack_windows(documents: &[Vec<u32>], eos: u32, seq_len: usize) -> Vec<Window> {
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for document in documents.iter().filter(|document| !document.is_empty()) {
        starts.push(stream.len());
        stream.extend_from_slice(document);
        if document.last() != Some(&eos) {
            stream.push(eos);
        }
    }
    let Some(last) = last_target(stream.len(), seq_len) else {
        return Vec::new();
    };
    // Window i spans stream[i·seq_len ..= min((i+1)·seq_len, last)].
    (0..last.div_ceil(seq_len))
        .map(|index| {
            let first = index * seq_len;
            let end = (first + seq_len).min(last) + 1;
            Window {
                tokens: stream[first..end].to_vec(),
                targets: 0..end - first - 1,
                starts: starts
                    .iter()
                    .filter(|&&start| start > first && start < end)
                    .map(|start| start - first)
                    .collect(),
            }
        })
        // A window whose every target predicts a document's first token teaches nothing.
        .filter(|window| window.num_targets() > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn windows_cover_every_target_once_and_record_where_documents_start() {
        let documents = vec![
            vec![10, 11, 12],
            vec![20, 21],
            vec![],
            vec![30, 31, 32, 33, 99],
        ];
        // stream: 10 11 12 E 20 21 E 30 31 32 33 E  (12 tokens; the empty document is skipped,
        // the last already ends in EOS)
        let windows = pack_windows(&documents, 99, 4);
        let window = |tokens: Vec<u32>, starts: Vec<usize>| Window {
            targets: 0..tokens.len() - 1,
            tokens,
            starts,
        };
        assert_eq!(
            windows,
            vec![
                window(vec![10, 11, 12, 99, 20], vec![4]),
                window(vec![20, 21, 99, 30, 31], vec![3]),
            ]
        );
        // The targets predicting 20 and 30 from the document before them do not count.
        assert_eq!(
            (0..4).map(|p| windows[0].counts(p)).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(windows[1].num_targets(), 3);
        assert_eq!(
            (0..4)
                .map(|p| windows[1].document_start(p))
                .collect::<Vec<_>>(),
            [0, 0, 0, 3]
        );
        assert_eq!(
            pack_windows(&documents, 99, 64),
            vec![window(
                vec![10, 11, 12, 99, 20, 21, 99, 30, 31, 32, 33, 99],
                vec![4, 7]
            )]
        );
        assert!(pack_windows(&[], 99, 4).is_empty());
    }

    /// The FedAvg weight counts exactly the documents some counted target of the packed windows
    /// predicts a token of: not those wholly in the tail past the last full window.
    #[test]
    fn trained_documents_are_those_the_windows_teach() {
        use rand::Rng;
        let text = |documents: &[Vec<u32>]| -> Vec<Example> {
            documents.iter().cloned().map(Example::Text).collect()
        };
        // stream: 1 2 3 4 E 5 6 E; at seq_len 4 one window (positions 0..=4): the second
        // document lies in the left-out tail.
        let documents = vec![vec![1, 2, 3, 4], vec![5, 6]];
        assert_eq!(trained_examples(&text(&documents), 99, 4), 1);
        assert_eq!(trained_examples(&text(&documents), 99, 7), 2);
        assert_eq!(trained_examples(&text(&documents), 99, 64), 2);
        // A document that is only an EOS has no counted target (a one-token one gets EOS
        // appended and predicts it); an empty one is no document.
        assert_eq!(trained_examples(&text(&[vec![7], vec![5, 6]]), 99, 64), 2);
        assert_eq!(
            trained_examples(&text(&[vec![99], vec![], vec![5, 6]]), 99, 64),
            1
        );
        assert_eq!(trained_examples(&text(&documents), 99, 0), 0);

        let mut rng = crate::model::lora::seeded_rng(11);
        for _ in 0..500 {
            // Token 1000 + 100·d + j is document d's j-th: every real token names its document.
            let documents: Vec<Vec<u32>> = (0..rng.random_range(0..8u32))
                .map(|d| {
                    let mut tokens: Vec<u32> = (0..rng.random_range(0..7u32))
                        .map(|j| 1000 + 100 * d + j)
                        .collect();
                    if rng.random_bool(0.3) {
                        tokens.push(99);
                    }
                    tokens
                })
                .collect();
            let seq_len = rng.random_range(1..10);
            let mut taught = std::collections::BTreeSet::new();
            for window in pack_windows(&documents, 99, seq_len) {
                for position in window.targets.clone().filter(|&p| window.counts(p)) {
                    // A predicted EOS belongs to the document of the token before it.
                    let token = match window.tokens[position + 1] {
                        99 => window.tokens[position],
                        token => token,
                    };
                    assert_ne!(token, 99);
                    taught.insert((token - 1000) / 100);
                }
            }
            assert_eq!(
                trained_examples(&text(&documents), 99, seq_len),
                taught.len(),
                "{documents:?} at seq_len {seq_len}"
            );
        }
    }

    #[test]
    fn instruction_windows_target_the_response_only() {
        let examples = vec![
            Example::Text(vec![10, 11, 12, 13, 14]),
            Example::Supervised {
                prompt: vec![1, 2, 3],
                response: vec![7, 8],
                closed: false,
            },
            // Cut at seq_len + 1 = 6 tokens: two response targets remain.
            Example::Supervised {
                prompt: vec![1, 2, 3, 4],
                response: vec![7, 8, 9],
                closed: false,
            },
            // The prompt fills the window: nothing to learn, dropped.
            Example::Supervised {
                prompt: vec![1, 2, 3, 4, 5, 6],
                response: vec![7],
                closed: false,
            },
            // Closed by the template's own end-of-turn token: no EOS appended.
            Example::Supervised {
                prompt: vec![1, 2],
                response: vec![7, 50],
                closed: true,
            },
        ];
        let windows = make_windows(&examples, 99, 5);
        assert_eq!(
            windows,
            vec![
                Window::full(vec![10, 11, 12, 13, 14, 99]),
                // inputs 1 2 3 7 8, targets 2 3 7 8 99: positions 2.. predict 7, 8, EOS.
                Window {
                    tokens: vec![1, 2, 3, 7, 8, 99],
                    targets: 2..5,
                    starts: vec![],
                },
                Window {
                    tokens: vec![1, 2, 3, 4, 7, 8],
                    targets: 3..5,
                    starts: vec![],
                },
                Window {
                    tokens: vec![1, 2, 7, 50],
                    targets: 1..3,
                    starts: vec![],
                },
            ]
        );
        // The dropped example carries no FedAvg weight; with room for it, it counts.
        assert_eq!(examples.len(), 5);
        assert_eq!(trained_examples(&examples, 99, 5), 4);
        assert_eq!(trained_examples(&examples, 99, 64), 5);
    }

    /// With a tokenizer that adds BOS (a Llama one), documents and Alpaca or ChatML examples
    /// start with it once, as `tokenizer(text)` makes them; a model template that writes
    /// `bos_token` itself gets it once too, not twice.
    #[test]
    fn text_starts_with_the_tokenizers_bos_once() {
        let mut tokenizer = crate::tiny::byte_level_tokenizer().unwrap();
        crate::model::gguf::add_special_tokens_processor(
            &mut tokenizer,
            Some(("<s>".into(), 1)),
            None,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("data.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"ab\"}\n{\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n",
        )
        .unwrap();
        let llama_like = crate::chat::ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}\
             {% if add_generation_prompt %}[assistant] {% endif %}"
                .into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let templates = [
            PromptTemplate::Alpaca,
            PromptTemplate::ChatMl,
            PromptTemplate::Model(std::sync::Arc::new(llama_like)),
        ];
        for template in &templates {
            let data = SiteData::load(&jsonl, &tokenizer, template, "text").unwrap();
            let Example::Text(text) = &data.train[0] else {
                panic!("document");
            };
            assert_eq!(text[..], [1, 3 + u32::from(b'a'), 3 + u32::from(b'b')]);
            let Example::Supervised {
                prompt,
                response,
                closed,
            } = &data.train[1]
            else {
                panic!("instruction example");
            };
            // Only ChatML ends the turn itself (<|im_end|>); this model template ends it in plain
            // text, so the answer gets EOS like Alpaca's, or the model would never learn to stop.
            assert_eq!(
                *closed,
                matches!(template, PromptTemplate::ChatMl),
                "{}",
                template.name()
            );
            let bos_count = prompt.iter().chain(response).filter(|&&id| id == 1).count();
            assert_eq!((prompt[0], bos_count), (1, 1), "{}", template.name());
            let layout = template.prompt("x", "").unwrap();
            let first = layout.strip_prefix("<s>").unwrap_or(&layout).as_bytes()[0];
            assert_eq!(prompt[1], 3 + u32::from(first), "{}", template.name());
        }
        let csv = dir.path().join("notes.csv");
        std::fs::write(&csv, "text\nab\n").unwrap();
        let data = SiteData::load(&csv, &tokenizer, &templates[0], "text").unwrap();
        assert_eq!(data.train, [Example::Text(vec![1, 100, 101])]);
    }

    /// Token ids past the model's embeddings are refused when the data is read, counted, with
    /// the first example named in the file's order.
    #[test]
    fn ids_beyond_the_embeddings_are_refused() {
        let mut examples: Vec<Example> = (0..20).map(|index| Example::Text(vec![index])).collect();
        let data = SiteData::split(examples.clone());
        data.check_vocab(Path::new("notes.jsonl"), 20).unwrap();
        examples[12] = Example::Supervised {
            prompt: vec![1, 25],
            response: vec![30],
            closed: false,
        };
        examples[19] = Example::Text(vec![40]);
        let data = SiteData::split(examples);
        let error = data
            .check_vocab(Path::new("notes.jsonl"), 20)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("notes.jsonl: 3 tokens in 2 examples (the first on line 13)")
                && error.contains("20 embeddings"),
            "{error}"
        );

        // Read from files, the error names the line the example is on: blank lines and blank
        // records do not shift it, nor does a CSV record spanning lines. The byte-level
        // tokenizer gives 3 + byte: '~' (129) is beyond 120 embeddings, letters are not.
        let tokenizer = crate::tiny::byte_level_tokenizer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("notes.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n{\"text\": \" \"}\n\n{\"text\": \"c~\"}\n{\"text\": \"d\"}\n",
        )
        .unwrap();
        let csv = dir.path().join("notes.csv");
        std::fs::write(&csv, "text,site\n\"a\nb\",x\n,y\nc,z\n~d,w\n").unwrap();
        for (path, line) in [(&jsonl, 6), (&csv, 6)] {
            let data = SiteData::load(path, &tokenizer, &PromptTemplate::Alpaca, "text").unwrap();
            let error = data.check_vocab(path, 120).unwrap_err().to_string();
            assert!(
                error.contains(&format!(
                    "1 tokens in 1 examples (the first on line {line})"
                )),
                "{}: {error}",
                path.display()
            );
        }
    }

    /// An instruction example is counted as cut exactly where its window holds fewer tokens
    /// than prompt, response and EOS: not where it fits, nor where its prompt fills the window
    /// (then it is skipped, not trained).
    #[test]
    fn cut_examples_are_those_whose_window_loses_tokens() {
        let eos = 2;
        let example = |prompt: usize, response: usize, closed: bool| Example::Supervised {
            prompt: vec![5; prompt],
            response: vec![6; response],
            closed,
        };
        let seq_len = 8;
        let cases = [
            (example(3, 5, false), false), // 3 + 5 + EOS = 9 = seq_len + 1: fits
            (example(3, 6, false), true),  // 10 tokens: the EOS is cut
            (example(3, 6, true), false),  // closed: no EOS appended, 9 tokens
            (example(8, 4, false), true),  // one response token trained, the rest cut
            (example(9, 4, false), false), // the prompt fills the window: skipped
            (Example::Text(vec![7; 40]), false),
        ];
        for (index, (example, cut)) in cases.iter().enumerate() {
            let examples = std::slice::from_ref(example);
            assert_eq!(
                cut_examples(examples, eos, seq_len),
                usize::from(*cut),
                "case {index}"
            );
            if let (
                Some(window),
                Example::Supervised {
                    prompt,
                    response,
                    closed,
                },
            ) = (supervised_window(example, eos, seq_len), example)
            {
                let whole = prompt.len() + response.len() + usize::from(!closed);
                assert_eq!(window.tokens.len() < whole, *cut, "case {index}");
            }
        }
    }

    #[test]
    fn every_tenth_example_is_held_out() {
        let examples: Vec<Example> = (0..25).map(|index| Example::Text(vec![index])).collect();
        let data = SiteData::split(examples);
        assert_eq!(
            data.heldout,
            vec![Example::Text(vec![9]), Example::Text(vec![19])]
        );
        assert_eq!(data.num_examples(), 23);
    }

    #[test]
    fn jsonl_and_csv_read_every_format_and_name_bad_lines() {
        let tokenizer = crate::tiny::byte_level_tokenizer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("data.jsonl");
        // A byte-order mark, CRLF line ends, and an Alpaca export's pre-rendered `text` beside
        // its fields (the fields win).
        std::fs::write(
            &jsonl,
            concat!(
                "\u{feff}{\"text\": \"ab\"}\r\n",
                "\n",
                "{\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n",
                "{\"instruction\": \"Echo\", \"input\": \"x\", \"output\": \"x\", \"text\": \"x\"}\n",
            ),
        )
        .unwrap();
        let data = SiteData::load(
            &jsonl,
            &tokenizer,
            &PromptTemplate::for_tokenizer(&tokenizer),
            "text",
        )
        .unwrap();
        assert_eq!(data.train.len(), 3);
        assert!(matches!(&data.train[0], Example::Text(tokens) if tokens.len() == 2));
        let Example::Supervised {
            prompt, response, ..
        } = &data.train[1]
        else {
            panic!("instruction example");
        };
        // Byte-level tokenizer without ChatML tokens: the Alpaca layout, one token per byte.
        assert_eq!(
            prompt.len(),
            PromptTemplate::Alpaca.prompt("Say hi.", "").unwrap().len()
        );
        assert_eq!(response.len(), 2);
        assert!(matches!(&data.train[2], Example::Supervised { .. }));

        let refused_file = |path: &Path, contents: &[u8]| {
            std::fs::write(path, contents).unwrap();
            SiteData::load(
                path,
                &tokenizer,
                &PromptTemplate::for_tokenizer(&tokenizer),
                "text",
            )
            .unwrap_err()
            .to_string()
        };
        let refused = |contents: &[u8]| refused_file(&jsonl, contents);
        let error = refused(b"{\"text\": \"ok\"}\n{\"instruction\": \"no output\"}\n");
        assert!(
            error.contains("line 2") && error.contains("instruction"),
            "{error}"
        );
        let error = refused(b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n");
        assert!(
            error.contains("line 2") && error.contains("not UTF-8"),
            "{error}"
        );
        // serde_json's own position (always line 1 of a line) is left out; the usual wrong
        // inputs get a hint.
        let error = refused(b"{\"text\": \"ok\"}\n{\"text\": \"ok\" \"more\"}\n");
        assert!(
            error.contains("line 2: invalid JSON at column 15: expected `,` or `}`")
                && !error.contains("at line 1"),
            "{error}"
        );
        let error = refused(b"[\n  {\"text\": \"ok\"}\n]\n");
        assert!(
            error.contains("line 1") && error.contains("jq -c"),
            "{error}"
        );
        let error = refused(b"{\n  \"text\": \"ok\"\n}\n");
        assert!(error.contains("pretty-printed"), "{error}");
        let error = refused(b"\xff\xfe{\x00}\x00");
        assert!(error.contains("UTF-16"), "{error}");
        let error = refused(b"{\"instruction\": \"a\", \"input\": 3, \"output\": \"b\"}\n");
        assert!(
            error.contains("line 1") && error.contains("\"input\" must be a string"),
            "{error}"
        );

        let csv = dir.path().join("notes.csv");
        std::fs::write(&csv, "id,note\n1,\"first, with comma\"\n2,\n3,third\n").unwrap();
        let data = SiteData::load(
            &csv,
            &tokenizer,
            &PromptTemplate::for_tokenizer(&tokenizer),
            "note",
        )
        .unwrap();
        assert_eq!(
            data.train,
            vec![
                Example::Text(
                    tokenizer
                        .encode("first, with comma", false)
                        .unwrap()
                        .get_ids()
                        .to_vec()
                ),
                Example::Text(tokenizer.encode("third", false).unwrap().get_ids().to_vec()),
            ]
        );
        let error = refused_file(&csv, b"id,note\n1,first\n");
        assert!(error.contains("no column \"text\" among the 2"), "{error}");
        // A file without a header row: its first record is read as the names, and stays out of
        // the error.
        let error = refused_file(&csv, b"Jane Roe,diabetes type 2\n");
        assert!(
            !error.contains("Jane") && !error.contains("diabetes"),
            "{error}"
        );
    }
}
