//! Aggregation math: pure, synchronous and deterministic. No I/O, no gRPC, no database: the round
//! driver (`rounds.rs`) reads updates from the store and feeds them here one at a time.
//!
//! Notation (DESIGN.md, "Aggregation"): client k has weight pₖ (Σpₖ = 1), factors Bₖ `[out, rₖ]`
//! and Aₖ `[rₖ, in]`, and every client's scale is the federation's `s` (a lower-rank client trains
//! with a proportionally lower alpha, see `fedlora_proto::factors`). The ideal update is
//! ΔW* = s·Σ pₖ Bₖ Aₖ.
//!
//! - [`mean`]: streaming per-slot weighted means (fedavg, ffa, alternating), O(one adapter) memory.
//! - [`svd`]: the exact product re-factorised without forming any `[out, in]` matrix.
//! - [`robust`]: per-update L2 bounds and the coordinate-wise trimmed mean.
//! - [`optimizer`]: server optimizers (FedAvgM, FedAdam, FedYogi) on the aggregated change.
//! - [`strategy`]: the Flower-shaped [`Strategy`] interface and [`RoundAggregation`], the pipeline
//!   the round driver runs.

pub mod mean;
pub mod optimizer;
pub mod robust;
pub mod strategy;
pub mod svd;

use std::collections::BTreeMap;

use fedlora_proto::adapter::{Adapter, AdapterError, AdapterTensor, Factor, TensorSpec};
use fedlora_proto::tensor_bytes::TensorBytes;

pub use mean::{SlotMean, fedavg};
pub use optimizer::{OptimizerState, ServerOptimizer};
pub use robust::{NormAction, Robustness};
pub use strategy::{
    Admission, FitPlan, RoundAggregation, Strategy, StrategyKind, Trained, strategy,
};

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum AggregateError {
    #[error("update does not match the round's adapter layout: {0}")]
    Layout(#[from] AdapterError),
    #[error("weight {0} is not a finite non-negative number")]
    InvalidWeight(f64),
    #[error("no update with positive weight to aggregate")]
    NothingToAggregate,
    #[error(
        "tensor {name:?} has rank {rank}, but its lora_A and lora_B ranks must agree and be at most {max}"
    )]
    Rank {
        name: String,
        rank: usize,
        max: usize,
    },
    #[error("the round's starting adapter lacks tensor {0:?}")]
    MissingStart(String),
    #[error("linear algebra failed on {name:?}: {message}")]
    Linalg { name: String, message: String },
    #[error("invalid aggregation settings: {0}")]
    Config(String),
    #[error("the aggregate of {0:?} is not finite (updates or server optimizer overflowed)")]
    NonFiniteResult(String),
}

pub type Result<T, E = AggregateError> = std::result::Result<T, E>;

/// One tensor of the federation's layout (at the federation's rank) and the factor it holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slotted {
    pub name: String,
    pub shape: Vec<usize>,
    pub factor: Factor,
}

impl Slotted {
    pub fn layout(spec: &[TensorSpec]) -> Result<Vec<Self>> {
        spec.iter()
            .map(|tensor| {
                let factor = Factor::of_name(&tensor.name)
                    .ok_or_else(|| AdapterError::UnexpectedTensor(tensor.name.clone()))?;
                let expected_dims = if factor == Factor::Magnitude { 1 } else { 2 };
                if tensor.shape.len() != expected_dims {
                    return Err(AdapterError::ShapeMismatch {
                        name: tensor.name.clone(),
                        expected: tensor.shape.clone(),
                        got: tensor.shape.clone(),
                    }
                    .into());
                }
                Ok(Self {
                    name: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                    factor,
                })
            })
            .collect()
    }

    /// The federation's rank of this tensor (slots along the rank axis); 1 for a magnitude.
    pub fn rank(&self) -> usize {
        match self.factor.rank_axis() {
            Some(axis) => self.shape[axis],
            None => 1,
        }
    }

    /// The layer-module prefix shared by a module's A, B and magnitude.
    pub fn module(&self) -> &str {
        module_of(&self.name)
    }

    /// Flat index in the full-rank tensor of element `index` of a rank-`rank` prefix.
    pub fn full_index(&self, rank: usize, index: usize) -> usize {
        match self.factor {
            Factor::B => {
                let (row, column) = (index / rank, index % rank);
                row * self.shape[1] + column
            }
            Factor::A | Factor::Magnitude => index,
        }
    }

    /// The slot (rank index) of element `index` of a rank-`rank` prefix.
    pub fn slot(&self, rank: usize, index: usize) -> usize {
        match self.factor {
            Factor::A => index / self.shape[1],
            Factor::B => index % rank,
            Factor::Magnitude => 0,
        }
    }
}

fn module_of(name: &str) -> &str {
    name.rsplit_once(".lora_")
        .map_or(name, |(module, _)| module)
}

/// What [`check_layout`] needs to know of one tensor of an update, decoded or still in its
/// wire bytes.
pub(crate) trait TensorInfo {
    fn shape(&self) -> &[usize];
    fn values(&self) -> usize;
    fn first_non_finite(&self) -> Option<usize>;
}

impl TensorInfo for AdapterTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn values(&self) -> usize {
        self.data.len()
    }
    fn first_non_finite(&self) -> Option<usize> {
        self.data.iter().position(|value| !value.is_finite())
    }
}

impl TensorInfo for TensorBytes<'_> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn values(&self) -> usize {
        self.len()
    }
    fn first_non_finite(&self) -> Option<usize> {
        TensorBytes::first_non_finite(self)
    }
}

/// Checks an update against the federation's layout: the same tensor names, each A `[r, in]` and
/// B `[out, r]` with one rank `r` per module no larger than the federation's, magnitudes whole, and
/// only finite values. Returns each tensor's rank, in layout order (1 for magnitudes).
pub(crate) fn check_update(layout: &[Slotted], update: &Adapter) -> Result<Vec<usize>> {
    let tensors: BTreeMap<&str, &AdapterTensor> = update
        .tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), tensor))
        .collect();
    check_layout(layout, &tensors)
}

/// [`check_update`] over any tensor representation.
pub(crate) fn check_layout<T: TensorInfo>(
    layout: &[Slotted],
    tensors: &BTreeMap<&str, &T>,
) -> Result<Vec<usize>> {
    if tensors.len() != layout.len()
        && let Some(name) = tensors
            .keys()
            .find(|name| !layout.iter().any(|slot| slot.name == **name))
    {
        return Err(AdapterError::UnexpectedTensor(name.to_string()).into());
    }
    let mut ranks = Vec::with_capacity(layout.len());
    let mut module_ranks: BTreeMap<&str, usize> = BTreeMap::new();
    for slot in layout {
        let tensor = tensors
            .get(slot.name.as_str())
            .ok_or_else(|| AdapterError::MissingTensor(slot.name.clone()))?;
        let shape = tensor.shape();
        let rank = match slot.factor.rank_axis() {
            Some(axis) => shape.get(axis).copied().unwrap_or(0),
            None => 1,
        };
        let mut expected = slot.shape.clone();
        if let Some(axis) = slot.factor.rank_axis() {
            expected[axis] = rank;
        }
        if shape != expected.as_slice() || tensor.values() != expected.iter().product::<usize>() {
            return Err(AdapterError::ShapeMismatch {
                name: slot.name.clone(),
                expected: slot.shape.clone(),
                got: shape.to_vec(),
            }
            .into());
        }
        if slot.factor != Factor::Magnitude {
            let agreed = *module_ranks.entry(slot.module()).or_insert(rank);
            if rank == 0 || rank > slot.rank() || rank != agreed {
                return Err(AggregateError::Rank {
                    name: slot.name.clone(),
                    rank,
                    max: slot.rank(),
                });
            }
        }
        if let Some(index) = tensor.first_non_finite() {
            return Err(AdapterError::NonFinite {
                name: slot.name.clone(),
                index,
            }
            .into());
        }
        ranks.push(rank);
    }
    Ok(ranks)
}

fn check_weight(weight: f64) -> Result<()> {
    if weight.is_finite() && weight >= 0.0 {
        Ok(())
    } else {
        Err(AggregateError::InvalidWeight(weight))
    }
}
