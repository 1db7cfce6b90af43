//! Aggregation math: pure, synchronous and deterministic. No I/O, no gRPC, no database.
//!
//! `fedavg` (FedIT) takes example-weighted means of A and B separately:
//! Ā = Σ pₖ Aₖ, B̄ = Σ pₖ Bₖ with pₖ = nₖ / Σ n. It is linear in the updates (so it composes with
//! secure aggregation later) but not exact: B̄Ā differs from Σ pₖ Bₖ Aₖ by Σ pₖ (Bₖ−B̄)(Aₖ−Ā).
//!
//! Accumulation streams: memory stays at one adapter (in f64) however many updates are added.

use std::collections::BTreeMap;

use fedlora_proto::adapter::{Adapter, AdapterError, AdapterTensor, TensorSpec};

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum AggregateError {
    #[error("update does not match the round's adapter layout: {0}")]
    Layout(#[from] AdapterError),
    #[error("weight {0} is not a finite non-negative number")]
    InvalidWeight(f64),
    #[error("no update with positive weight to aggregate")]
    NothingToAggregate,
}

/// Streaming weighted mean of adapters with one fixed layout.
#[derive(Debug, Clone)]
pub struct FedAvg {
    spec: Vec<TensorSpec>,
    sums: BTreeMap<String, Vec<f64>>,
    total_weight: f64,
    updates: usize,
}

impl FedAvg {
    pub fn new(spec: &[TensorSpec]) -> Self {
        let sums = spec
            .iter()
            .map(|tensor| {
                (
                    tensor.name.clone(),
                    vec![0.0; tensor.shape.iter().product()],
                )
            })
            .collect();
        Self {
            spec: spec.to_vec(),
            sums,
            total_weight: 0.0,
            updates: 0,
        }
    }

    /// Adds `weight · adapter`. The adapter must match the layout exactly and be finite; on error
    /// nothing is added.
    pub fn add(&mut self, adapter: &Adapter, weight: f64) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AggregateError::InvalidWeight(weight));
        }
        adapter.validate(&self.spec)?;
        for (name, sum) in &mut self.sums {
            if let Some(tensor) = adapter.tensors.get(name) {
                for (accumulated, value) in sum.iter_mut().zip(&tensor.data) {
                    *accumulated += weight * f64::from(*value);
                }
            }
        }
        self.total_weight += weight;
        self.updates += 1;
        Ok(())
    }

    /// Number of updates added so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The weighted mean of everything added.
    pub fn finish(self) -> Result<Adapter, AggregateError> {
        if self.total_weight <= 0.0 {
            return Err(AggregateError::NothingToAggregate);
        }
        let shapes: BTreeMap<&str, &[usize]> = self
            .spec
            .iter()
            .map(|tensor| (tensor.name.as_str(), tensor.shape.as_slice()))
            .collect();
        let total = self.total_weight;
        let tensors = self
            .sums
            .iter()
            .map(|(name, sum)| {
                let shape = shapes
                    .get(name.as_str())
                    .map_or_else(Vec::new, |shape| shape.to_vec());
                let data = sum.iter().map(|value| (value / total) as f32).collect();
                (name.clone(), AdapterTensor { shape, data })
            })
            .collect();
        Ok(Adapter { tensors })
    }
}

/// Example-weighted FedAvg of `(weight, adapter)` pairs in one call.
pub fn fedavg(spec: &[TensorSpec], updates: &[(f64, &Adapter)]) -> Result<Adapter, AggregateError> {
    let mut accumulator = FedAvg::new(spec);
    for (weight, adapter) in updates {
        accumulator.add(adapter, *weight)?;
    }
    accumulator.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::{LoraSpec, ModelDims, adapter_spec};

    use super::*;

    fn spec() -> Vec<TensorSpec> {
        let dims = ModelDims {
            num_layers: 1,
            hidden_size: 4,
            intermediate_size: 6,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 2,
        };
        let lora = LoraSpec::new(2, 4.0, &["q_proj", "v_proj"]);
        adapter_spec(&dims, &lora).unwrap()
    }

    fn adapter(seed: f32) -> Adapter {
        let mut adapter = Adapter::zeros(&spec());
        for (tensor_index, tensor) in adapter.tensors.values_mut().enumerate() {
            for (index, value) in tensor.data.iter_mut().enumerate() {
                *value = seed * (index as f32 + 1.0) - tensor_index as f32 * 0.5;
            }
        }
        adapter
    }

    #[test]
    fn weighted_mean_of_each_factor() {
        let (first, second) = (adapter(1.0), adapter(-2.0));
        let mean = fedavg(&spec(), &[(3.0, &first), (1.0, &second)]).unwrap();
        for (name, tensor) in &mean.tensors {
            for (index, value) in tensor.data.iter().enumerate() {
                let expected = (3.0 * first.tensors[name].data[index]
                    + second.tensors[name].data[index])
                    / 4.0;
                assert!(
                    (value - expected).abs() < 1e-6,
                    "{name}[{index}]: {value} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn identical_updates_average_to_themselves_in_any_order() {
        let one = adapter(0.7);
        assert_eq!(fedavg(&spec(), &[(5.0, &one), (2.0, &one)]).unwrap(), one);
        let (first, second) = (adapter(1.5), adapter(0.25));
        assert_eq!(
            fedavg(&spec(), &[(2.0, &first), (3.0, &second)]).unwrap(),
            fedavg(&spec(), &[(3.0, &second), (2.0, &first)]).unwrap()
        );
    }

    #[test]
    fn zero_weight_contributes_nothing() {
        let (kept, ignored) = (adapter(1.0), adapter(100.0));
        assert_eq!(
            fedavg(&spec(), &[(4.0, &kept), (0.0, &ignored)]).unwrap(),
            kept
        );
        assert_eq!(
            fedavg(&spec(), &[(0.0, &kept)]),
            Err(AggregateError::NothingToAggregate)
        );
    }

    #[test]
    fn bad_input_is_an_error_and_adds_nothing() {
        let mut accumulator = FedAvg::new(&spec());
        let mut poisoned = adapter(1.0);
        poisoned.tensors.values_mut().next().unwrap().data[0] = f32::INFINITY;
        assert!(matches!(
            accumulator.add(&poisoned, 1.0),
            Err(AggregateError::Layout(_))
        ));
        assert!(matches!(
            accumulator.add(&adapter(1.0), f64::NAN),
            Err(AggregateError::InvalidWeight(weight)) if weight.is_nan()
        ));
        assert!(matches!(
            accumulator.add(&adapter(1.0), -1.0),
            Err(AggregateError::InvalidWeight(_))
        ));
        assert_eq!(accumulator.updates(), 0);
        accumulator.add(&adapter(2.0), 1.0).unwrap();
        assert_eq!(accumulator.finish().unwrap(), adapter(2.0));
    }
}
