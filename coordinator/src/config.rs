//! The federation's configuration: what every round asks of its clients.

use fedlora_proto::adapter::LoraSpec;
use serde::{Deserialize, Serialize};

use crate::aggregate::strategy::check_settings;
use crate::aggregate::{Robustness, ServerOptimizer};

/// Hyper-parameters sent with every training task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub local_steps: u32,
    pub learning_rate: f32,
    pub batch_size: u32,
    pub seq_len: u32,
    #[serde(default)]
    pub warmup_steps: u32,
    #[serde(default)]
    pub cosine_decay: bool,
    /// 0 = no gradient clipping.
    #[serde(default)]
    pub max_grad_norm: f32,
    #[serde(default = "one")]
    pub grad_accumulation: u32,
}

fn one() -> u32 {
    1
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_steps: 20,
            learning_rate: 5e-3,
            batch_size: 8,
            seq_len: 64,
            warmup_steps: 0,
            cosine_decay: false,
            max_grad_norm: 0.0,
            grad_accumulation: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    pub name: String,
    /// Training rounds; one evaluation round follows the last.
    pub rounds: u32,
    /// A training round aggregates only with at least this many updates.
    pub min_clients: u32,
    /// At most this many clients get a task in a round; the round stops taking new participants
    /// when it is reached and aggregates as soon as all of them have reported.
    pub clients_per_round: u32,
    /// After this long a round aggregates if `min_clients` updates arrived, else fails and is retried.
    pub round_timeout_secs: u64,
    /// Aggregation strategy: `fedavg`, `ffa`, `alternating` or `svd` (see `aggregate::strategy`).
    pub strategy: String,
    /// Server optimizer applied to each round's aggregate (none by default).
    #[serde(default, skip_serializing_if = "ServerOptimizer::is_none")]
    pub server_optimizer: ServerOptimizer,
    /// Norm bounds and trimmed mean for federations that do not trust every site (off by default).
    #[serde(default, skip_serializing_if = "Robustness::is_default")]
    pub robustness: Robustness,
    /// Lowest rank a client may train. `None`: every client trains `lora.rank`. Below it, a client
    /// announcing a lower max rank gets a rank-rₖ task (rank alignment, see `fedlora_proto::factors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_rank: Option<usize>,
    /// LoRA configuration at the federation's (largest) rank.
    pub lora: LoraSpec,
    pub training: TrainingConfig,
    /// Keep individual updates after their round's aggregate is committed (default: delete them).
    pub keep_updates: bool,
    /// Largest accepted update, in bytes.
    pub max_update_bytes: u64,
    /// Cap on the example count a single update is weighted by.
    pub max_example_weight: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            rounds: 3,
            min_clients: 2,
            clients_per_round: 2,
            round_timeout_secs: 600,
            // The winner of `fedlora bench-quality` (README, "Aggregation").
            strategy: "svd".into(),
            server_optimizer: ServerOptimizer::None,
            robustness: Robustness::default(),
            min_rank: None,
            lora: LoraSpec::new(8, 16.0, &["q_proj", "v_proj"]),
            training: TrainingConfig::default(),
            keep_updates: false,
            max_update_bytes: 256 << 20,
            max_example_weight: 1_000_000,
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid federation config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

impl FederationConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field: &'static str, message: &str| {
            Err(ConfigError {
                field,
                message: message.to_string(),
            })
        };
        if self.name.trim().is_empty() {
            return fail("name", "must not be empty");
        }
        if self.rounds == 0 {
            return fail("rounds", "must be at least 1");
        }
        if self.min_clients == 0 {
            return fail("min_clients", "must be at least 1");
        }
        if self.clients_per_round < self.min_clients {
            return fail("clients_per_round", "must be at least min_clients");
        }
        if self.round_timeout_secs == 0 {
            return fail("round_timeout_secs", "must be at least 1");
        }
        if let Err(error) = check_settings(&self.strategy, &self.server_optimizer, &self.robustness)
        {
            return Err(ConfigError {
                field: "strategy",
                message: error.to_string(),
            });
        }
        if let Err(error) = self.lora.validate() {
            return Err(ConfigError {
                field: "lora",
                message: error.to_string(),
            });
        }
        if let Some(min_rank) = self.min_rank {
            if min_rank == 0 || min_rank > self.lora.rank {
                return fail("min_rank", "must be between 1 and lora.rank");
            }
            if min_rank < self.lora.rank
                && (!self.lora.rank_pattern.is_empty() || !self.lora.alpha_pattern.is_empty())
            {
                return fail(
                    "min_rank",
                    "clients of lower rank cannot train a rank_pattern or alpha_pattern federation",
                );
            }
        }
        let training = &self.training;
        if training.local_steps == 0 || training.batch_size == 0 || training.seq_len < 2 {
            return fail(
                "training",
                "local_steps and batch_size must be at least 1 and seq_len at least 2",
            );
        }
        if training.grad_accumulation == 0 || training.warmup_steps > training.local_steps {
            return fail(
                "training",
                "grad_accumulation must be at least 1 and warmup_steps at most local_steps",
            );
        }
        if !(training.max_grad_norm.is_finite() && training.max_grad_norm >= 0.0) {
            return fail(
                "training.max_grad_norm",
                "must be 0 (off) or a positive number",
            );
        }
        if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
            return fail("training.learning_rate", "must be a positive number");
        }
        if self.max_example_weight == 0 {
            return fail("max_example_weight", "must be at least 1");
        }
        if self.max_update_bytes == 0 {
            return fail("max_update_bytes", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn default_is_valid_and_bad_fields_are_named() {
        assert_eq!(FederationConfig::default().validate(), Ok(()));
        let config = FederationConfig {
            clients_per_round: 1,
            min_clients: 2,
            ..FederationConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("clients_per_round")
        );
        let mut config = FederationConfig::default();
        config.lora.target_modules = vec!["wq".into()];
        assert_eq!(config.validate().map_err(|error| error.field), Err("lora"));
        let config = FederationConfig {
            strategy: "svd".into(),
            server_optimizer: ServerOptimizer::Momentum {
                learning_rate: 1.0,
                momentum: 0.9,
            },
            ..FederationConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("strategy")
        );
        let config = FederationConfig {
            min_rank: Some(9),
            ..FederationConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("min_rank")
        );
    }

    #[test]
    fn configs_without_the_new_fields_still_parse_and_compare_equal() {
        let json = serde_json::to_string(&FederationConfig::default()).unwrap();
        assert!(!json.contains("server_optimizer") && !json.contains("min_rank"));
        let parsed: FederationConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, FederationConfig::default());
    }
}
