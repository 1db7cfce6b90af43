//! The strategy interface, shaped like Flower's (`configure_fit` / `aggregate_fit` /
//! `configure_evaluate` / `aggregate_evaluate`), and the per-round aggregation pipeline.
//!
//! A strategy decides which clients train what (factor and rank) and how stored updates become the
//! next global adapter. It is pure and synchronous: the round driver does every read and write and
//! feeds updates in one at a time. The strategy is chosen per federation and recorded per round.
//!
//! | strategy      | trains                         | aggregate                       | exact | linear |
//! |---------------|--------------------------------|---------------------------------|-------|--------|
//! | `fedavg`      | A and B                        | per-slot means of A and B       | no    | yes    |
//! | `ffa`         | B (A frozen at its seeded init) | per-slot mean of B             | yes   | yes    |
//! | `alternating` | B in even rounds, A in odd     | per-slot mean of the trained one | yes  | yes    |
//! | `svd`         | A and B                        | re-factorised Σ pₖ Bₖ Aₖ          | yes*  | no     |
//!
//! (*) up to truncation to the federation's rank. Exactness of the linear strategies holds for
//! clients of one rank; with heterogeneous ranks each slot is normalised by the weight that
//! reached it (see [`super::mean`]).

use std::fmt;

use fedlora_proto::adapter::{Adapter, TensorSpec};
pub use fedlora_proto::factors::Trained;

use super::mean::SlotMean;
use super::optimizer::{OptimizerState, ServerOptimizer};
use super::robust::{NormAction, Robustness, TrimmedMean, change_norm, scale_change};
use super::svd::SvdAggregate;
use super::{AggregateError, Result, Slotted, check_update};

/// The built-in strategies, by their configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    FedAvg,
    Ffa,
    Alternating,
    Svd,
}

impl StrategyKind {
    pub const NAMES: [&str; 4] = ["fedavg", "ffa", "alternating", "svd"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "fedavg" => Ok(Self::FedAvg),
            "ffa" => Ok(Self::Ffa),
            "alternating" => Ok(Self::Alternating),
            "svd" => Ok(Self::Svd),
            other => Err(AggregateError::Config(format!(
                "unknown strategy {other:?} (expected one of {})",
                Self::NAMES.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::Ffa => "ffa",
            Self::Alternating => "alternating",
            Self::Svd => "svd",
        }
    }
}

/// What one client is asked to train in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitPlan {
    pub rank: usize,
    pub trained: Trained,
}

/// Collects a round's updates; made by [`Strategy::aggregate_fit`].
#[derive(Debug, Clone)]
pub enum Accumulator {
    Mean(SlotMean),
    Trimmed(TrimmedMean),
    Svd(SvdAggregate),
}

impl Accumulator {
    pub fn add(&mut self, update: Adapter, weight: f64) -> Result<()> {
        match self {
            Self::Mean(mean) => mean.add(&update, weight),
            Self::Trimmed(trimmed) => trimmed.add(update, weight),
            Self::Svd(svd) => svd.add(update, weight),
        }
    }

    pub fn updates(&self) -> usize {
        match self {
            Self::Mean(mean) => mean.updates(),
            Self::Trimmed(trimmed) => trimmed.updates(),
            Self::Svd(svd) => svd.updates(),
        }
    }

    /// The aggregate; `start` supplies untrained factors and unreached slots.
    pub fn finish(self, start: Option<&Adapter>) -> Result<Adapter> {
        match self {
            Self::Mean(mean) => mean.finish(start),
            Self::Trimmed(trimmed) => trimmed.finish(start),
            Self::Svd(svd) => svd.finish(start),
        }
    }
}

/// A federation's aggregation strategy (pure; no I/O).
pub trait Strategy: fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether the aggregate is a linear function of the updates (required by secure
    /// aggregation, where the coordinator only ever sees sums).
    fn is_linear(&self) -> bool;

    /// Which factors the `round_index`-th training round trains (0-based over closed rounds).
    fn trained(&self, round_index: u32) -> Trained;

    /// `configure_fit`: the task of a client that can train up to `client_max_rank`, in a
    /// federation of rank `federation_rank`.
    fn configure_fit(
        &self,
        round_index: u32,
        client_max_rank: usize,
        federation_rank: usize,
    ) -> FitPlan {
        FitPlan {
            rank: client_max_rank.min(federation_rank),
            trained: self.trained(round_index),
        }
    }

    /// `aggregate_fit`: an empty accumulator for a round over the federation's layout `spec`.
    fn aggregate_fit(
        &self,
        spec: &[TensorSpec],
        trained: Trained,
        robustness: &Robustness,
    ) -> Result<Accumulator>;

    /// `configure_evaluate`: the rank at which a client evaluates the global adapter.
    fn configure_evaluate(&self, client_max_rank: usize, federation_rank: usize) -> usize {
        client_max_rank.min(federation_rank)
    }

    /// `aggregate_evaluate`: the token-weighted mean of `(loss, tokens)` reports.
    fn aggregate_evaluate(&self, results: &[(f64, u64)]) -> Option<f64> {
        let tokens: f64 = results.iter().map(|(_, tokens)| *tokens as f64).sum();
        (tokens > 0.0).then(|| {
            results
                .iter()
                .map(|(loss, tokens)| loss * *tokens as f64)
                .sum::<f64>()
                / tokens
        })
    }
}

/// The built-in strategies.
#[derive(Debug, Clone, Copy)]
struct Builtin(StrategyKind);

impl Strategy for Builtin {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn is_linear(&self) -> bool {
        self.0 != StrategyKind::Svd
    }

    fn trained(&self, round_index: u32) -> Trained {
        match self.0 {
            StrategyKind::FedAvg | StrategyKind::Svd => Trained::Both,
            StrategyKind::Ffa => Trained::B,
            // Round 0 trains B: A starts random and B at zero, so training A first would
            // learn nothing through B = 0.
            StrategyKind::Alternating if round_index.is_multiple_of(2) => Trained::B,
            StrategyKind::Alternating => Trained::A,
        }
    }

    fn aggregate_fit(
        &self,
        spec: &[TensorSpec],
        trained: Trained,
        robustness: &Robustness,
    ) -> Result<Accumulator> {
        Ok(match self.0 {
            StrategyKind::Svd => Accumulator::Svd(SvdAggregate::new(spec)?),
            _ if robustness.trim_fraction > 0.0 => {
                Accumulator::Trimmed(TrimmedMean::new(spec, trained, robustness.trim_fraction)?)
            }
            _ => Accumulator::Mean(SlotMean::new(spec, trained)?),
        })
    }
}

/// The strategy named `name`.
pub fn strategy(name: &str) -> Result<Box<dyn Strategy>> {
    Ok(Box::new(Builtin(StrategyKind::parse(name)?)))
}

/// Refuses combinations that cannot work: the svd strategy re-factorises every round, so neither
/// a server optimizer's moments nor a coordinate-wise trimmed mean mean anything there.
pub fn check_settings(
    name: &str,
    optimizer: &ServerOptimizer,
    robustness: &Robustness,
) -> Result<()> {
    let kind = StrategyKind::parse(name)?;
    optimizer.validate()?;
    robustness.validate()?;
    if kind == StrategyKind::Svd && !optimizer.is_none() {
        return Err(AggregateError::Config(format!(
            "server optimizer {} cannot follow the svd strategy (its factor basis changes every round)",
            optimizer.name()
        )));
    }
    if kind == StrategyKind::Svd && robustness.trim_fraction > 0.0 {
        return Err(AggregateError::Config(
            "trim_fraction cannot be used with the svd strategy".into(),
        ));
    }
    Ok(())
}

/// How an update fared in [`RoundAggregation::add`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Counted; `clipped` when its change was scaled down to the bound. `change_norm` is NaN when
    /// no bound asked for it.
    Accepted { change_norm: f64, clipped: bool },
    /// Left out: its change exceeded the bound and the federation rejects such updates.
    Rejected { change_norm: f64, bound: f64 },
}

/// One round's aggregation: per-update checks and bounds, the strategy's accumulator, then the
/// server optimizer.
#[derive(Debug)]
pub struct RoundAggregation {
    layout: Vec<Slotted>,
    start: Adapter,
    trained: Trained,
    robustness: Robustness,
    optimizer: ServerOptimizer,
    accumulator: Accumulator,
}

impl RoundAggregation {
    /// `spec` is the federation's layout; `start` the factors every client started the round from
    /// (the previous global adapter, or the seeded initialisation of a fresh round).
    pub fn new(
        strategy: &dyn Strategy,
        spec: &[TensorSpec],
        start: Adapter,
        trained: Trained,
        robustness: &Robustness,
        optimizer: &ServerOptimizer,
    ) -> Result<Self> {
        Ok(Self {
            layout: Slotted::layout(spec)?,
            accumulator: strategy.aggregate_fit(spec, trained, robustness)?,
            start,
            trained,
            robustness: robustness.clone(),
            optimizer: *optimizer,
        })
    }

    /// Checks `update` (layout, ranks, finite values), bounds its change, and adds it with
    /// `weight`. An error adds nothing and leaves the round able to go on.
    pub fn add(&mut self, mut update: Adapter, weight: f64) -> Result<Admission> {
        let ranks = check_update(&self.layout, &update)?;
        let norm = change_norm(&self.layout, &ranks, &update, &self.start, self.trained)?;
        let mut clipped = false;
        if let Some(bound) = self.robustness.max_update_norm
            && norm > bound
        {
            match self.robustness.norm_action {
                NormAction::Reject => {
                    return Ok(Admission::Rejected {
                        change_norm: norm,
                        bound,
                    });
                }
                NormAction::Clip => {
                    scale_change(
                        &self.layout,
                        &ranks,
                        &mut update,
                        &self.start,
                        self.trained,
                        bound / norm,
                    )?;
                    clipped = true;
                }
            }
        }
        self.accumulator.add(update, weight)?;
        Ok(Admission::Accepted {
            change_norm: norm,
            clipped,
        })
    }

    /// As [`RoundAggregation::add`] for an update still in its safetensors bytes. Without a norm
    /// bound the mean strategies read the values straight from the bytes.
    pub fn add_bytes(&mut self, bytes: &[u8], weight: f64) -> Result<Admission> {
        if let (Accumulator::Mean(mean), None) =
            (&mut self.accumulator, self.robustness.max_update_norm)
        {
            mean.add_bytes(bytes, weight)?;
            return Ok(Admission::Accepted {
                change_norm: f64::NAN,
                clipped: false,
            });
        }
        self.add(Adapter::from_safetensors(bytes)?, weight)
    }

    /// [`RoundAggregation::add_bytes`] for a batch, one result per update. The mean strategies
    /// without a norm bound sweep their sums once for the whole batch.
    pub fn add_many_bytes(&mut self, batch: &[(&[u8], f64)]) -> Vec<Result<Admission>> {
        if let (Accumulator::Mean(mean), None) =
            (&mut self.accumulator, self.robustness.max_update_norm)
        {
            return mean
                .add_many_bytes(batch)
                .into_iter()
                .map(|result| {
                    result.map(|()| Admission::Accepted {
                        change_norm: f64::NAN,
                        clipped: false,
                    })
                })
                .collect();
        }
        batch
            .iter()
            .map(|(bytes, weight)| self.add_bytes(bytes, *weight))
            .collect()
    }

    pub fn updates(&self) -> usize {
        self.accumulator.updates()
    }

    /// Whether this round's aggregate is a linear function of the updates: a linear strategy
    /// with no trimmed mean and no norm bound (both need each update on its own).
    pub fn is_linear(&self, strategy: &dyn Strategy) -> bool {
        strategy.is_linear()
            && self.robustness.trim_fraction == 0.0
            && self.robustness.max_update_norm.is_none()
    }

    /// The next global adapter and the server optimizer's state (`state` is the previous one).
    /// A result that is not finite everywhere (finite updates can still overflow f32 in a sum, a
    /// singular value or an optimizer step) is an error, never a global adapter.
    pub fn finish(
        self,
        state: Option<OptimizerState>,
    ) -> Result<(Adapter, Option<OptimizerState>)> {
        let aggregate = self.accumulator.finish(Some(&self.start))?;
        let (global, state) = self
            .optimizer
            .step(&self.start, aggregate, state, self.trained)?;
        let tensors = global
            .tensors
            .iter()
            .map(|(name, tensor)| (name, &tensor.data));
        let moments = state
            .iter()
            .flat_map(|state| state.m.iter().chain(&state.v));
        for (name, values) in tensors.chain(moments) {
            if values.iter().any(|value| !value.is_finite()) {
                return Err(AggregateError::NonFiniteResult(name.clone()));
            }
        }
        Ok((global, state))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::{LoraSpec, ModelDims, adapter_spec};
    use fedlora_proto::factors::initial_factors;

    use super::*;

    fn dims() -> ModelDims {
        ModelDims {
            num_layers: 1,
            hidden_size: 6,
            intermediate_size: 8,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 3,
        }
    }

    #[test]
    fn plans_follow_the_strategy() {
        let alternating = strategy("alternating").unwrap();
        let trained: Vec<Trained> = (0..4).map(|round| alternating.trained(round)).collect();
        assert_eq!(trained, [Trained::B, Trained::A, Trained::B, Trained::A]);
        assert_eq!(strategy("ffa").unwrap().trained(3), Trained::B);
        assert_eq!(
            strategy("fedavg").unwrap().configure_fit(0, 4, 16),
            FitPlan {
                rank: 4,
                trained: Trained::Both
            }
        );
        assert_eq!(strategy("svd").unwrap().configure_fit(0, 64, 16).rank, 16);
        assert!(!strategy("svd").unwrap().is_linear());
        assert!(strategy("fedavg").unwrap().is_linear());
        assert!(strategy("fedprox").is_err());
        assert_eq!(
            strategy("fedavg")
                .unwrap()
                .aggregate_evaluate(&[(2.0, 1), (4.0, 3)]),
            Some(3.5)
        );
    }

    #[test]
    fn incompatible_settings_are_refused() {
        let adam = ServerOptimizer::Adam {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        assert!(check_settings("fedavg", &adam, &Robustness::default()).is_ok());
        assert!(check_settings("svd", &adam, &Robustness::default()).is_err());
        let trimmed = Robustness {
            trim_fraction: 0.1,
            ..Robustness::default()
        };
        assert!(check_settings("svd", &ServerOptimizer::None, &trimmed).is_err());
        assert!(check_settings("nope", &ServerOptimizer::None, &trimmed).is_err());
    }

    #[test]
    fn norm_bound_clips_or_rejects() {
        let lora = LoraSpec::new(2, 4.0, &["q_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let start = initial_factors(&dims(), &lora, 3).unwrap();
        let mut far = start.clone();
        for tensor in far.tensors.values_mut() {
            for value in &mut tensor.data {
                *value += 1.0;
            }
        }
        let elements = far.num_parameters() as f64;
        for (action, expected_updates) in [(NormAction::Clip, 1), (NormAction::Reject, 0)] {
            let robustness = Robustness {
                max_update_norm: Some(1.0),
                norm_action: action,
                trim_fraction: 0.0,
            };
            let fedavg = strategy("fedavg").unwrap();
            let mut round = RoundAggregation::new(
                fedavg.as_ref(),
                &spec,
                start.clone(),
                Trained::Both,
                &robustness,
                &ServerOptimizer::None,
            )
            .unwrap();
            let admission = round.add(far.clone(), 1.0).unwrap();
            assert_eq!(round.updates(), expected_updates);
            match admission {
                Admission::Accepted {
                    change_norm,
                    clipped,
                } => {
                    assert!(clipped);
                    assert!((change_norm - elements.sqrt()).abs() < 1e-6);
                    let (global, _) = round.finish(None).unwrap();
                    let squares: f64 = global
                        .tensors
                        .iter()
                        .flat_map(|(name, tensor)| {
                            tensor
                                .data
                                .iter()
                                .zip(&start.tensors[name].data)
                                .map(|(got, origin)| f64::from(got - origin).powi(2))
                        })
                        .sum();
                    assert!((squares.sqrt() - 1.0).abs() < 1e-5);
                }
                Admission::Rejected { bound, .. } => {
                    assert_eq!(bound, 1.0);
                    assert_eq!(round.finish(None), Err(AggregateError::NothingToAggregate));
                }
            }
        }
    }

    #[test]
    fn an_overflowing_result_is_an_error_not_a_global_adapter() {
        let lora = LoraSpec::new(2, 4.0, &["q_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let start = Adapter::zeros(&spec);
        let mut huge = start.clone();
        for tensor in huge.tensors.values_mut() {
            tensor.data.fill(3e38);
        }
        let fedavg = strategy("fedavg").unwrap();
        let optimizer = ServerOptimizer::Momentum {
            learning_rate: 2.0,
            momentum: 0.0,
        };
        let mut round = RoundAggregation::new(
            fedavg.as_ref(),
            &spec,
            start,
            Trained::Both,
            &Robustness::default(),
            &optimizer,
        )
        .unwrap();
        // A server optimizer acts on the sum, so the round stays linear; a norm bound does not.
        assert!(round.is_linear(fedavg.as_ref()));
        let bounded = RoundAggregation::new(
            fedavg.as_ref(),
            &spec,
            Adapter::zeros(&spec),
            Trained::Both,
            &Robustness {
                max_update_norm: Some(1.0),
                ..Robustness::default()
            },
            &optimizer,
        )
        .unwrap();
        assert!(!bounded.is_linear(fedavg.as_ref()));
        round.add(huge, 1.0).unwrap();
        assert!(matches!(
            round.finish(None),
            Err(AggregateError::NonFiniteResult(_))
        ));
    }
}
