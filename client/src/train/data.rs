//! Local data: a JSONL file with one `{"text": ...}` object per line, tokenized, split into train
//! and held-out documents, packed (documents joined by EOS) and cut into fixed-length windows.
//!
//! Nothing here leaves the site: the daemon only reports counts derived from it.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{ClientError, Result};

/// Every `HELDOUT_EVERY`-th document (index ≡ HELDOUT_EVERY−1) is held out for evaluation.
pub const HELDOUT_EVERY: usize = 10;

/// A site's tokenized documents, split deterministically into train and held-out parts.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteData {
    pub train: Vec<Vec<u32>>,
    pub heldout: Vec<Vec<u32>>,
}

impl SiteData {
    /// Reads `path` (JSONL, a `text` string per line; blank lines are skipped) and tokenizes it.
    pub fn from_jsonl(path: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(ClientError::io(path))?;
        let mut documents = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let data_error = |message: String| ClientError::Data {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|error| data_error(error.to_string()))?;
            let text = value
                .get("text")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| {
                    data_error("expected an object with a string field \"text\"".into())
                })?;
            let encoding = tokenizer
                .encode(text, false)
                .map_err(|error| data_error(format!("tokenizer: {error}")))?;
            documents.push(encoding.get_ids().to_vec());
        }
        Ok(Self::split(documents))
    }

    /// Splits documents into train and held-out parts (every tenth document is held out).
    pub fn split(documents: Vec<Vec<u32>>) -> Self {
        let mut train = Vec::new();
        let mut heldout = Vec::new();
        for (index, document) in documents.into_iter().enumerate() {
            if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 {
                heldout.push(document);
            } else {
                train.push(document);
            }
        }
        Self { train, heldout }
    }

    /// Number of training documents: the example count reported to the coordinator.
    pub fn num_examples(&self) -> usize {
        self.train.len()
    }
}

/// Packs documents (each followed by `eos`) into one stream and cuts windows of `seq_len + 1`
/// tokens that overlap by one, so every token after the first is a target exactly once. A stream
/// shorter than one window becomes a single shorter window (if it has at least two tokens), so a
/// site with little data still trains and evaluates.
pub fn pack_windows(documents: &[Vec<u32>], eos: u32, seq_len: usize) -> Vec<Vec<u32>> {
    let stream: Vec<u32> = documents
        .iter()
        .flat_map(|document| document.iter().copied().chain(std::iter::once(eos)))
        .collect();
    if seq_len == 0 || stream.len() < 2 {
        return Vec::new();
    }
    if stream.len() < seq_len + 1 {
        return vec![stream];
    }
    (0..=(stream.len() - seq_len - 1) / seq_len)
        .map(|window| stream[window * seq_len..window * seq_len + seq_len + 1].to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_target_once() {
        let documents = vec![vec![10, 11, 12], vec![20, 21], vec![30, 31, 32, 33]];
        // stream: 10 11 12 E 20 21 E 30 31 32 33 E  (12 tokens)
        let windows = pack_windows(&documents, 99, 4);
        assert_eq!(
            windows,
            vec![vec![10, 11, 12, 99, 20], vec![20, 21, 99, 30, 31]]
        );
        assert_eq!(
            pack_windows(&documents, 99, 64),
            vec![vec![10, 11, 12, 99, 20, 21, 99, 30, 31, 32, 33, 99]]
        );
        assert!(pack_windows(&[], 99, 4).is_empty());
    }

    #[test]
    fn every_tenth_document_is_held_out() {
        let documents: Vec<Vec<u32>> = (0..25).map(|index| vec![index]).collect();
        let data = SiteData::split(documents);
        assert_eq!(data.heldout, vec![vec![9], vec![19]]);
        assert_eq!(data.num_examples(), 23);
    }
}
