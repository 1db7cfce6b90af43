//! Streaming per-slot weighted means: `fedavg` (FedIT) and the exact single-factor strategies.
//!
//! `fedavg` takes example-weighted means of A and B separately: Ā = Σ pₖ Aₖ, B̄ = Σ pₖ Bₖ. It is
//! linear in the updates (so it composes with secure aggregation) but not exact: B̄Ā differs from
//! Σ pₖ Bₖ Aₖ by Σ pₖ (Bₖ−B̄)(Aₖ−Ā). When only one factor was trained (`ffa`, `alternating`) the
//! other is the same at every client, the mean of the trained one is exact, and the untrained one
//! is taken from the round's start, whatever a client sent for it.
//!
//! Heterogeneous ranks: an update of rank rₖ covers the first rₖ slots (rows of A, columns of B).
//! Slot j is divided by the weight of the clients whose rank reaches it (Σ_{k: rₖ > j} pₖ), so a
//! high slot trained by few clients is not shrunk towards zero; a slot no client reached keeps its
//! starting value. Memory stays at one adapter (in f64) however many updates are added.

use std::collections::BTreeMap;

use fedlora_proto::adapter::{Adapter, AdapterTensor, Factor, TensorSpec};
use fedlora_proto::tensor_bytes::{TensorBytes, tensor_views};

use rayon::prelude::*;

use super::strategy::Trained;
use super::{AggregateError, Result, Slotted, check_layout, check_update, check_weight};

/// Sums per block in [`SlotMean::add_many_bytes`] (32 KiB of f64; for B a whole number of rows).
const BLOCK: usize = 4096;

/// Streaming per-slot weighted mean of the trained factors.
#[derive(Debug, Clone)]
pub struct SlotMean {
    layout: Vec<Slotted>,
    trained: Trained,
    /// Weighted sums, per tensor in layout order; empty for factors not trained this round.
    sums: Vec<Vec<f64>>,
    /// Sum of weights that reached each slot, per tensor.
    slot_weights: Vec<Vec<f64>>,
    updates: usize,
}

impl SlotMean {
    /// An empty mean over the federation's layout `spec`, averaging the factors in `trained`
    /// (DoRA magnitudes always).
    pub fn new(spec: &[TensorSpec], trained: Trained) -> Result<Self> {
        let layout = Slotted::layout(spec)?;
        let sums = layout
            .iter()
            .map(|slot| {
                if trained.includes(slot.factor) {
                    vec![0.0; slot.shape.iter().product()]
                } else {
                    Vec::new()
                }
            })
            .collect();
        let slot_weights = layout.iter().map(|slot| vec![0.0; slot.rank()]).collect();
        Ok(Self {
            layout,
            trained,
            sums,
            slot_weights,
            updates: 0,
        })
    }

    /// Adds `weight · update`. The update must fit the layout (see [`check_update`]); on error
    /// nothing is added.
    pub fn add(&mut self, update: &Adapter, weight: f64) -> Result<()> {
        check_weight(weight)?;
        let ranks = check_update(&self.layout, update)?;
        for (index, slot) in self.layout.iter().enumerate() {
            if !self.trained.includes(slot.factor) {
                continue;
            }
            let Some(tensor) = update.tensors.get(&slot.name) else {
                continue;
            };
            let rank = ranks[index];
            let sum = &mut self.sums[index];
            for (position, value) in tensor.data.iter().enumerate() {
                sum[slot.full_index(rank, position)] += weight * f64::from(*value);
            }
            for reached in &mut self.slot_weights[index][..rank.min(slot.rank())] {
                *reached += weight;
            }
        }
        self.updates += 1;
        Ok(())
    }

    /// As [`SlotMean::add`] for an update still in its safetensors bytes (f32, bf16 or f16): the
    /// values go straight from the bytes into the sums, with the same checks first.
    pub fn add_bytes(&mut self, bytes: &[u8], weight: f64) -> Result<()> {
        self.add_many_bytes(&[(bytes, weight)])
            .pop()
            .unwrap_or(Err(AggregateError::NothingToAggregate))
    }

    /// [`SlotMean::add_bytes`] for several updates at once, one result per update (a refused
    /// update adds nothing; the others are added). The sums are swept in cache-sized blocks, each
    /// block taking every update in turn, so the f64 sums cross the memory bus once per batch
    /// rather than once per update; tensors are spread over threads.
    pub fn add_many_bytes(&mut self, batch: &[(&[u8], f64)]) -> Vec<Result<()>> {
        let layout = &self.layout;
        let checked: Vec<Result<(Vec<TensorBytes>, Vec<usize>)>> = batch
            .par_iter()
            .map(|(bytes, weight)| {
                check_weight(*weight)?;
                let views = tensor_views(bytes)?;
                let tensors: BTreeMap<&str, &TensorBytes> = views
                    .iter()
                    .map(|view| (view.name.as_str(), view))
                    .collect();
                let ranks = check_layout(layout, &tensors)?;
                Ok((views, ranks))
            })
            .collect();
        let mut results = Vec::with_capacity(batch.len());
        let mut accepted: Vec<(Vec<TensorBytes>, Vec<usize>, f64)> = Vec::new();
        for (outcome, (_, weight)) in checked.into_iter().zip(batch) {
            results.push(outcome.map(|(views, ranks)| {
                accepted.push((views, ranks, *weight));
            }));
        }
        // Each accepted update's views in layout order.
        let ordered: Vec<(Vec<&TensorBytes>, &[usize], f64)> = accepted
            .iter()
            .map(|(views, ranks, weight)| {
                let by_name: BTreeMap<&str, &TensorBytes> = views
                    .iter()
                    .map(|view| (view.name.as_str(), view))
                    .collect();
                let in_order = self
                    .layout
                    .iter()
                    .filter_map(|slot| by_name.get(slot.name.as_str()).copied())
                    .collect();
                (in_order, ranks.as_slice(), *weight)
            })
            .collect();
        let trained = self.trained;
        self.layout
            .par_iter()
            .zip(self.sums.par_iter_mut())
            .zip(self.slot_weights.par_iter_mut())
            .enumerate()
            .for_each(|(index, ((slot, sum), reached))| {
                if !trained.includes(slot.factor) {
                    return;
                }
                let full = slot.rank();
                let block = if slot.factor == Factor::B {
                    (BLOCK / full).max(1) * full
                } else {
                    BLOCK
                };
                let mut block_start = 0;
                while block_start < sum.len() {
                    let block_end = (block_start + block).min(sum.len());
                    for (views, ranks, weight) in &ordered {
                        let (view, rank) = (views[index], ranks[index]);
                        if slot.factor == Factor::B && rank < full {
                            // Rows of `full` sums, of which the first `rank` are this update's.
                            let first_row = block_start / full;
                            let rows = sum[block_start..block_end].chunks_exact_mut(full);
                            for (row, sums) in rows.enumerate() {
                                view.accumulate(
                                    (first_row + row) * rank,
                                    *weight,
                                    &mut sums[..rank],
                                );
                            }
                        } else {
                            let end = block_end.min(view.len());
                            if end > block_start {
                                view.accumulate(block_start, *weight, &mut sum[block_start..end]);
                            }
                        }
                    }
                    block_start = block_end;
                }
                for (_, ranks, weight) in &ordered {
                    for weight_sum in &mut reached[..ranks[index].min(full)] {
                        *weight_sum += weight;
                    }
                }
            });
        self.updates += ordered.len();
        results
    }

    /// Number of updates added so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The per-slot weighted mean. Factors not trained this round, and slots no update reached,
    /// come from `start` (the adapter the round started from); without one such slots are zero
    /// and untrained factors are an error.
    pub fn finish(self, start: Option<&Adapter>) -> Result<Adapter> {
        if !self
            .slot_weights
            .iter()
            .flatten()
            .any(|weight| *weight > 0.0)
        {
            return Err(AggregateError::NothingToAggregate);
        }
        let mut adapter = Adapter::default();
        for ((slot, sum), weights) in self.layout.iter().zip(self.sums).zip(&self.slot_weights) {
            let start_tensor = start
                .and_then(|start| start.tensors.get(&slot.name))
                .filter(|tensor| tensor.shape == slot.shape);
            let data = if self.trained.includes(slot.factor) {
                let rank = slot.rank();
                sum.iter()
                    .enumerate()
                    .map(|(index, value)| {
                        let weight = weights[slot.slot(rank, index)];
                        if weight > 0.0 {
                            (value / weight) as f32
                        } else {
                            start_tensor.map_or(0.0, |tensor| tensor.data[index])
                        }
                    })
                    .collect()
            } else {
                start_tensor
                    .ok_or_else(|| AggregateError::MissingStart(slot.name.clone()))?
                    .data
                    .clone()
            };
            adapter.tensors.insert(
                slot.name.clone(),
                AdapterTensor {
                    shape: slot.shape.clone(),
                    data,
                },
            );
        }
        Ok(adapter)
    }
}

/// Example-weighted FedAvg of `(weight, adapter)` pairs in one call (both factors trained).
pub fn fedavg(spec: &[TensorSpec], updates: &[(f64, &Adapter)]) -> Result<Adapter> {
    let mut mean = SlotMean::new(spec, Trained::Both)?;
    for (weight, adapter) in updates {
        mean.add(adapter, *weight)?;
    }
    mean.finish(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::{LoraSpec, ModelDims, adapter_spec};
    use fedlora_proto::tensor_bytes::WireDtype;

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
        let mut accumulator = SlotMean::new(&spec(), Trained::Both).unwrap();
        let mut poisoned = adapter(1.0);
        poisoned.tensors.values_mut().next().unwrap().data[0] = f32::INFINITY;
        assert!(matches!(
            accumulator.add(&poisoned, 1.0),
            Err(AggregateError::Layout(_))
        ));
        let mut wrong_rank = adapter(1.0);
        let b = wrong_rank
            .tensors
            .iter_mut()
            .find(|(name, _)| name.ends_with("lora_B.weight"))
            .unwrap()
            .1;
        *b = AdapterTensor::zeros(&[b.shape[0], 1]);
        assert!(matches!(
            accumulator.add(&wrong_rank, 1.0),
            Err(AggregateError::Rank {
                rank: 1,
                max: 2,
                ..
            })
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
        assert_eq!(accumulator.finish(None).unwrap(), adapter(2.0));
    }

    /// Rank-1 prefix of the test adapter.
    fn low_rank(seed: f32) -> Adapter {
        let mut low = Adapter::default();
        for (name, tensor) in adapter(seed).tensors {
            let factor = Factor::of_name(&name).unwrap();
            low.tensors
                .insert(name, tensor.rank_prefix(factor, 1).unwrap());
        }
        low
    }

    #[test]
    fn slots_are_normalised_by_the_weight_that_reached_them() {
        let (high, low) = (adapter(1.0), low_rank(-3.0));
        let mean = fedavg(&spec(), &[(1.0, &high), (3.0, &low)]).unwrap();
        for (name, tensor) in &mean.tensors {
            let rank2 = &high.tensors[name];
            let rank1 = &low.tensors[name];
            let factor = Factor::of_name(name).unwrap();
            for (index, value) in tensor.data.iter().enumerate() {
                let slot = match factor {
                    Factor::A => index / tensor.shape[1],
                    _ => index % 2,
                };
                let expected = if slot == 0 {
                    let low_index = match factor {
                        Factor::A => index,
                        _ => index / 2,
                    };
                    (rank2.data[index] + 3.0 * rank1.data[low_index]) / 4.0
                } else {
                    rank2.data[index]
                };
                assert!((value - expected).abs() < 1e-6, "{name}[{index}]");
            }
        }
    }

    #[test]
    fn untrained_factor_comes_from_the_start() {
        let start = adapter(0.5);
        let mut mean = SlotMean::new(&spec(), Trained::B).unwrap();
        mean.add(&adapter(2.0), 1.0).unwrap();
        mean.add(&adapter(4.0), 1.0).unwrap();
        let global = mean.clone().finish(Some(&start)).unwrap();
        for (name, tensor) in &global.tensors {
            if name.ends_with("lora_A.weight") {
                assert_eq!(tensor, &start.tensors[name]);
            } else {
                assert_eq!(tensor, &adapter(3.0).tensors[name]);
            }
        }
        assert!(matches!(
            mean.finish(None),
            Err(AggregateError::MissingStart(_))
        ));
    }

    #[test]
    fn bytes_and_decoded_updates_add_the_same() {
        let updates = [adapter(1.0), low_rank(-2.0), adapter(0.25)];
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::F16] {
            let mut decoded = SlotMean::new(&spec(), Trained::Both).unwrap();
            let mut streamed = SlotMean::new(&spec(), Trained::Both).unwrap();
            for (weight, update) in [1.0, 2.0, 0.5].into_iter().zip(&updates) {
                let bytes = update.to_safetensors_as(dtype, None).unwrap();
                decoded
                    .add(&Adapter::from_safetensors(&bytes).unwrap(), weight)
                    .unwrap();
                streamed.add_bytes(&bytes, weight).unwrap();
            }
            assert_eq!(
                decoded.finish(None).unwrap(),
                streamed.finish(None).unwrap(),
                "{dtype:?}"
            );
        }
        let mut poisoned = adapter(1.0);
        poisoned.tensors.values_mut().nth(1).unwrap().data[2] = f32::NAN;
        let mut mean = SlotMean::new(&spec(), Trained::Both).unwrap();
        let bytes = poisoned.to_safetensors_as(WireDtype::Bf16, None).unwrap();
        assert!(matches!(
            mean.add_bytes(&bytes, 1.0),
            Err(AggregateError::Layout(_))
        ));
        assert_eq!(mean.updates(), 0);
        assert!(mean.add_bytes(b"not safetensors", 1.0).is_err());
    }
}
