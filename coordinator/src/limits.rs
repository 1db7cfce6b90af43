//! Operational limits of a running coordinator (not part of the federation's stored config, so
//! they can change across restarts): call rates per caller, audit rows per remote address,
//! connections, and upload messages, chunks and deadlines. Counters are per process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits with safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Calls per caller (certificate name) per minute; more get `RESOURCE_EXHAUSTED`. A site's
    /// daemon makes a few per round (its task long poll waits 10 s).
    pub requests_per_minute: u32,
    /// Audit rows per minute for refusals before authentication (no, wrong or revoked
    /// certificates), per remote address; the rest are only logged, so that strangers cannot
    /// fill the database.
    pub audits_per_minute_per_address: u32,
    /// Open TLS connections (handshaking or established); further ones wait to be accepted.
    pub max_connections: usize,
    /// Chunks one upload may arrive in.
    pub max_update_chunks: u32,
    /// The largest gRPC message a caller may send, such as one upload chunk (fedlora clients send
    /// 1 MiB chunks); a larger one is refused before it is buffered.
    pub max_message_bytes: usize,
    /// An upload that sends nothing for this long is cut off (`DEADLINE_EXCEEDED`).
    pub upload_idle_timeout: Duration,
    /// An upload must be complete this long after its header.
    pub upload_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_minute: 600,
            audits_per_minute_per_address: 30,
            max_connections: 512,
            max_update_chunks: 4096,
            max_message_bytes: 4 << 20,
            upload_idle_timeout: Duration::from_secs(60),
            upload_timeout: Duration::from_secs(600),
        }
    }
}

/// A limit that would refuse every honest caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid limit: {0}")]
pub struct InvalidLimit(String);

impl Limits {
    /// Refuses limits that no honest federation could work under: a message limit below one
    /// upload chunk (`fedlora_proto::CHUNK_BYTES`) and its framing, or zero counts and durations.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        let least_message = fedlora_proto::CHUNK_BYTES + (64 << 10);
        if self.max_message_bytes < least_message {
            return Err(InvalidLimit(format!(
                "max_message_bytes {} is below one upload chunk and its framing ({least_message} bytes)",
                self.max_message_bytes
            )));
        }
        let zero = [
            ("requests_per_minute", self.requests_per_minute == 0),
            ("max_connections", self.max_connections == 0),
            ("max_update_chunks", self.max_update_chunks == 0),
            ("upload_idle_timeout", self.upload_idle_timeout.is_zero()),
            ("upload_timeout", self.upload_timeout.is_zero()),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(InvalidLimit(format!("{name} must be above zero")));
        }
        Ok(())
    }
}

/// The outcome of counting one event against a [`WindowCounter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Allowed,
    /// The first event over the limit in this window (worth one audit row).
    FirstRefusal,
    Refused,
}

/// Fixed-window counters per key.
#[derive(Debug)]
pub struct WindowCounter {
    limit: u32,
    window: Duration,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Keys kept before old windows are swept out.
const SWEEP_AT: usize = 4096;

impl WindowCounter {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key` now.
    pub fn hit(&self, key: &str) -> Hit {
        self.hit_at(key, Instant::now())
    }

    fn hit_at(&self, key: &str, now: Instant) -> Hit {
        let mut counts = match self.counts.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        if counts.len() >= SWEEP_AT {
            let window = self.window;
            counts.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = counts.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        match entry.1.checked_sub(self.limit) {
            None | Some(0) => Hit::Allowed,
            Some(1) => Hit::FirstRefusal,
            Some(_) => Hit::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn limits_that_refuse_every_honest_caller_are_invalid() {
        Limits::default().validate().unwrap();
        let small = Limits {
            max_message_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("below one upload chunk")
        );
        let zero = Limits {
            max_update_chunks: 0,
            ..Limits::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("max_update_chunks must be above zero")
        );
    }

    #[test]
    fn counts_per_key_and_window() {
        let counter = WindowCounter::new(2, Duration::from_secs(60));
        let start = Instant::now();
        let hits: Vec<Hit> = (0..4).map(|_| counter.hit_at("a", start)).collect();
        assert_eq!(
            hits,
            [Hit::Allowed, Hit::Allowed, Hit::FirstRefusal, Hit::Refused]
        );
        assert_eq!(counter.hit_at("b", start), Hit::Allowed);
        let later = start + Duration::from_secs(61);
        assert_eq!(counter.hit_at("a", later), Hit::Allowed);
    }
}
