//! Server optimizers on the aggregated change (Reddi et al., "Adaptive Federated Optimization",
//! ICLR 2021). With xₜ the round's starting factors and x̄ the strategy's aggregate, the
//! pseudo-gradient is Δ = x̄ − xₜ and:
//!
//! - FedAvgM: m ← β·m + Δ;                    x ← xₜ + η·m
//! - FedAdam: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²;                 x ← xₜ + η·m/(√v + τ)
//! - FedYogi: m as Adam; v ← v − (1−β₂)Δ²·sign(v − Δ²);              x ← xₜ + η·m/(√v + τ)
//!
//! with m₀ = 0 and v₀ = τ² (the paper's v₋₁ ≥ τ²), no bias correction. Only the factors trained in
//! the round move (an `alternating` round must leave the frozen factor exactly as the clients had
//! it); DoRA magnitudes take the strategy's mean. The state (m, v) is kept per global adapter, so
//! a restarted coordinator continues where it stopped.

use std::collections::{BTreeMap, HashMap};

use fedlora_proto::adapter::{Adapter, AdapterTensor, Factor};
use serde::{Deserialize, Serialize};

use super::strategy::Trained;
use super::{AggregateError, Result};

/// A federation's server optimizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// The aggregate is the next global adapter.
    #[default]
    None,
    /// FedAvgM.
    Momentum {
        #[serde(default = "one")]
        learning_rate: f64,
        #[serde(default = "point_nine")]
        momentum: f64,
    },
    /// FedAdam.
    Adam {
        #[serde(default = "adaptive_rate")]
        learning_rate: f64,
        #[serde(default = "point_nine")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
    /// FedYogi.
    Yogi {
        #[serde(default = "adaptive_rate")]
        learning_rate: f64,
        #[serde(default = "point_nine")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
}

fn one() -> f64 {
    1.0
}
fn point_nine() -> f64 {
    0.9
}
fn adaptive_rate() -> f64 {
    1e-3
}
fn beta2() -> f64 {
    0.99
}
fn tau() -> f64 {
    1e-3
}

impl ServerOptimizer {
    /// `name` (`none`, `fedavgm`, `fedadam`, `fedyogi`) with its defaults, each overridden where
    /// given: `beta1` is FedAvgM's momentum.
    pub fn from_name(
        name: &str,
        learning_rate: Option<f64>,
        beta1: Option<f64>,
        beta2: Option<f64>,
        tau: Option<f64>,
    ) -> Result<Self> {
        let adaptive = |yogi: bool| {
            let (learning_rate, beta1, beta2, tau) = (
                learning_rate.unwrap_or_else(adaptive_rate),
                beta1.unwrap_or_else(point_nine),
                beta2.unwrap_or_else(self::beta2),
                tau.unwrap_or_else(self::tau),
            );
            if yogi {
                Self::Yogi {
                    learning_rate,
                    beta1,
                    beta2,
                    tau,
                }
            } else {
                Self::Adam {
                    learning_rate,
                    beta1,
                    beta2,
                    tau,
                }
            }
        };
        let optimizer = match name {
            "none" => Self::None,
            "fedavgm" => Self::Momentum {
                learning_rate: learning_rate.unwrap_or_else(one),
                momentum: beta1.unwrap_or_else(point_nine),
            },
            "fedadam" => adaptive(false),
            "fedyogi" => adaptive(true),
            other => {
                return Err(AggregateError::Config(format!(
                    "unknown server optimizer {other:?} (expected none, fedavgm, fedadam or fedyogi)"
                )));
            }
        };
        optimizer.validate()?;
        Ok(optimizer)
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Momentum { .. } => "fedavgm",
            Self::Adam { .. } => "fedadam",
            Self::Yogi { .. } => "fedyogi",
        }
    }

    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, value: f64| {
            if (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(AggregateError::Config(format!(
                    "{name} must be in [0, 1), got {value}"
                )))
            }
        };
        let positive = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(AggregateError::Config(format!(
                    "{name} must be a positive number, got {value}"
                )))
            }
        };
        match *self {
            Self::None => Ok(()),
            Self::Momentum {
                learning_rate,
                momentum,
            } => {
                positive("learning_rate", learning_rate)?;
                unit("momentum", momentum)
            }
            Self::Adam {
                learning_rate,
                beta1,
                beta2,
                tau,
            }
            | Self::Yogi {
                learning_rate,
                beta1,
                beta2,
                tau,
            } => {
                positive("learning_rate", learning_rate)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("tau", tau)
            }
        }
    }

    /// The next global adapter from the round's `start` and the strategy's `aggregate`, and the
    /// optimizer's new state. `state` is the previous round's (`None` in the first round).
    pub fn step(
        &self,
        start: &Adapter,
        aggregate: Adapter,
        state: Option<OptimizerState>,
        trained: Trained,
    ) -> Result<(Adapter, Option<OptimizerState>)> {
        if self.is_none() {
            return Ok((aggregate, None));
        }
        let mut state = state.unwrap_or_default();
        state.step += 1;
        let mut next = aggregate;
        for (name, tensor) in &mut next.tensors {
            let factor = Factor::of_name(name);
            if factor == Some(Factor::Magnitude) || !factor.is_some_and(|f| trained.includes(f)) {
                continue;
            }
            let origin = start
                .tensors
                .get(name)
                .filter(|origin| origin.shape == tensor.shape)
                .ok_or_else(|| AggregateError::MissingStart(name.clone()))?;
            let size = tensor.data.len();
            let m = state
                .m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; size]);
            let initial_v = match *self {
                Self::Adam { tau, .. } | Self::Yogi { tau, .. } => (tau * tau) as f32,
                _ => 0.0,
            };
            let v = state
                .v
                .entry(name.clone())
                .or_insert_with(|| vec![initial_v; size]);
            if m.len() != size || v.len() != size {
                return Err(AggregateError::Config(format!(
                    "optimizer state of {name:?} has the wrong size"
                )));
            }
            for index in 0..size {
                let x = f64::from(origin.data[index]);
                let delta = f64::from(tensor.data[index]) - x;
                let (mut mi, mut vi) = (f64::from(m[index]), f64::from(v[index]));
                let moved = match *self {
                    Self::None => delta,
                    Self::Momentum {
                        learning_rate,
                        momentum,
                    } => {
                        mi = momentum * mi + delta;
                        learning_rate * mi
                    }
                    Self::Adam {
                        learning_rate,
                        beta1,
                        beta2,
                        tau,
                    } => {
                        mi = beta1 * mi + (1.0 - beta1) * delta;
                        vi = beta2 * vi + (1.0 - beta2) * delta * delta;
                        learning_rate * mi / (vi.sqrt() + tau)
                    }
                    Self::Yogi {
                        learning_rate,
                        beta1,
                        beta2,
                        tau,
                    } => {
                        mi = beta1 * mi + (1.0 - beta1) * delta;
                        let squared = delta * delta;
                        vi -= (1.0 - beta2) * squared * (vi - squared).signum();
                        learning_rate * mi / (vi.sqrt() + tau)
                    }
                };
                m[index] = mi as f32;
                v[index] = vi as f32;
                tensor.data[index] = (x + moved) as f32;
            }
        }
        Ok((next, Some(state)))
    }
}

/// First and second moments per tensor, and the number of optimizer steps taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl OptimizerState {
    /// Encodes as safetensors: tensors `m/<name>` and `v/<name>` (flat), the step in metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut adapter = Adapter::default();
        for (prefix, moments) in [("m/", &self.m), ("v/", &self.v)] {
            for (name, values) in moments {
                adapter.tensors.insert(
                    format!("{prefix}{name}"),
                    AdapterTensor {
                        shape: vec![values.len()],
                        data: values.clone(),
                    },
                );
            }
        }
        let metadata =
            HashMap::from([("fedlora.optimizer_step".to_string(), self.step.to_string())]);
        Ok(adapter.to_safetensors(Some(metadata))?)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let step = Adapter::safetensors_metadata(bytes)?
            .get("fedlora.optimizer_step")
            .and_then(|step| step.parse().ok())
            .ok_or_else(|| AggregateError::Config("optimizer state without a step".into()))?;
        let adapter = Adapter::from_safetensors(bytes)?;
        let mut state = Self {
            step,
            ..Self::default()
        };
        for (name, tensor) in adapter.tensors {
            if let Some(name) = name.strip_prefix("m/") {
                state.m.insert(name.to_string(), tensor.data);
            } else if let Some(name) = name.strip_prefix("v/") {
                state.v.insert(name.to_string(), tensor.data);
            }
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn single(name: &str, values: &[f32]) -> Adapter {
        let mut adapter = Adapter::default();
        adapter.tensors.insert(
            name.to_string(),
            AdapterTensor {
                shape: vec![1, values.len()],
                data: values.to_vec(),
            },
        );
        adapter
    }

    const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    const A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

    #[test]
    fn momentum_accumulates_the_pseudo_gradient() {
        let optimizer = ServerOptimizer::Momentum {
            learning_rate: 1.0,
            momentum: 0.5,
        };
        let (first, state) = optimizer
            .step(&single(B, &[0.0]), single(B, &[1.0]), None, Trained::Both)
            .unwrap();
        assert_eq!(first.tensors[B].data, vec![1.0]);
        // Second round: Δ = 1 again; m = 0.5·1 + 1 = 1.5.
        let (second, state) = optimizer
            .step(&first, single(B, &[2.0]), state, Trained::Both)
            .unwrap();
        assert_eq!(second.tensors[B].data, vec![2.5]);
        assert_eq!(state.unwrap().step, 2);
    }

    #[test]
    fn adam_and_yogi_follow_the_paper() {
        let (learning_rate, beta1, beta2, tau) = (0.1, 0.9, 0.99, 1e-3);
        let delta = 0.5f64;
        let m = (1.0 - beta1) * delta;
        let adam_v = beta2 * tau * tau + (1.0 - beta2) * delta * delta;
        let yogi_v = tau * tau + (1.0 - beta2) * delta * delta; // sign(τ² − Δ²) = −1
        for (optimizer, v) in [
            (
                ServerOptimizer::Adam {
                    learning_rate,
                    beta1,
                    beta2,
                    tau,
                },
                adam_v,
            ),
            (
                ServerOptimizer::Yogi {
                    learning_rate,
                    beta1,
                    beta2,
                    tau,
                },
                yogi_v,
            ),
        ] {
            let (next, _) = optimizer
                .step(&single(B, &[1.0]), single(B, &[1.5]), None, Trained::Both)
                .unwrap();
            let expected = 1.0 + learning_rate * m / (v.sqrt() + tau);
            assert!(
                (f64::from(next.tensors[B].data[0]) - expected).abs() < 1e-6,
                "{}: {} vs {expected}",
                optimizer.name(),
                next.tensors[B].data[0]
            );
        }
    }

    #[test]
    fn frozen_factors_do_not_move_and_state_round_trips() {
        let optimizer = ServerOptimizer::Momentum {
            learning_rate: 1.0,
            momentum: 0.9,
        };
        let mut start = single(B, &[0.0, 0.0]);
        start.tensors.extend(single(A, &[1.0, 1.0]).tensors);
        let mut aggregate = single(B, &[1.0, -1.0]);
        aggregate.tensors.extend(single(A, &[1.0, 1.0]).tensors);
        let (next, state) = optimizer.step(&start, aggregate, None, Trained::B).unwrap();
        assert_eq!(next.tensors[A].data, vec![1.0, 1.0]);
        let state = state.unwrap();
        assert!(!state.m.contains_key(A));
        let decoded = OptimizerState::from_bytes(&state.to_bytes().unwrap()).unwrap();
        assert_eq!(decoded, state);
    }

    #[test]
    fn settings_are_checked_and_parsed() {
        let parsed: ServerOptimizer =
            serde_json::from_str(r#"{"kind": "adam", "learning_rate": 0.01}"#).unwrap();
        assert_eq!(
            parsed,
            ServerOptimizer::Adam {
                learning_rate: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        assert!(parsed.validate().is_ok());
        assert_eq!(
            ServerOptimizer::from_name("fedadam", Some(0.01), None, None, None).unwrap(),
            parsed
        );
        assert!(ServerOptimizer::from_name("sgd", None, None, None, None).is_err());
        assert!(ServerOptimizer::from_name("fedavgm", None, Some(1.5), None, None).is_err());
        let bad = ServerOptimizer::Momentum {
            learning_rate: 1.0,
            momentum: 1.0,
        };
        assert!(bad.validate().is_err());
    }
}
