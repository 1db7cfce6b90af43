//! `svd` (FlexLoRA/HLoRA-style): the exact product Σ pₖ Bₖ Aₖ, re-factorised to the federation's
//! rank without forming any `[out, in]` matrix.
//!
//! Per module, with R = Σ rₖ: B_cat = [p₁B₁ | … | pₙBₙ] `[out, R]` and A_cat = [A₁; …; Aₙ]
//! `[R, in]`, so Σ pₖ Bₖ Aₖ = B_cat·A_cat. Thin QR of both sides, B_cat = Q_B·R_B and
//! A_catᵀ = Q_A·R_A, leaves a small core C = R_B·R_Aᵀ (at most R×R); its SVD C = U·Σ·Vᵀ gives
//! B_cat·A_cat = (Q_B·U)·Σ·(Q_A·V)ᵀ. The global factors keep the top singular directions with the
//! singular values split evenly: B = Q_B·U_r·√Σ_r, A = √Σ_r·(Q_A·V_r)ᵀ. A client of lower rank
//! receives the prefix, which is the best approximation at its rank (Eckart–Young).
//!
//! Exact when the federation's rank reaches the rank of the product (for example identical A's);
//! otherwise the best rank-r approximation. Not linear in the updates, so it cannot run under
//! secure aggregation. It holds every update until [`SvdAggregate::finish`]: memory O(Σ updates),
//! work O(out·R² + in·R²) per module. DoRA magnitudes are weighted means.

use std::collections::BTreeMap;

use faer::Mat;
use fedlora_proto::adapter::{Adapter, AdapterTensor, Factor, TensorSpec};
use rayon::prelude::*;

use super::{AggregateError, Result, Slotted, check_update, check_weight};

/// Collects updates for the `svd` strategy.
#[derive(Debug, Clone)]
pub struct SvdAggregate {
    layout: Vec<Slotted>,
    updates: Vec<(f64, Adapter)>,
}

impl SvdAggregate {
    pub fn new(spec: &[TensorSpec]) -> Result<Self> {
        Ok(Self {
            layout: Slotted::layout(spec)?,
            updates: Vec::new(),
        })
    }

    /// Keeps `update` with `weight`; on error nothing is kept.
    pub fn add(&mut self, update: Adapter, weight: f64) -> Result<()> {
        check_weight(weight)?;
        check_update(&self.layout, &update)?;
        if weight > 0.0 {
            self.updates.push((weight, update));
        }
        Ok(())
    }

    pub fn updates(&self) -> usize {
        self.updates.len()
    }

    /// The re-factorised global adapter at the federation's rank. Slots beyond the product's
    /// rank (fewer stacked ranks than the federation's, or singular values that vanish) take A's
    /// rows from `start` (the seeded initialisation in a fresh round) and zero in B: B·A is
    /// unchanged, and a client of the full rank can still train them (with both factors zero,
    /// neither would ever get a gradient).
    pub fn finish(self, start: Option<&Adapter>) -> Result<Adapter> {
        let total: f64 = self.updates.iter().map(|(weight, _)| weight).sum();
        if self.updates.is_empty() || total <= 0.0 {
            return Err(AggregateError::NothingToAggregate);
        }
        let mut modules: BTreeMap<&str, (Option<&Slotted>, Option<&Slotted>)> = BTreeMap::new();
        let mut adapter = Adapter::default();
        for slot in &self.layout {
            match slot.factor {
                Factor::A => modules.entry(slot.module()).or_default().0 = Some(slot),
                Factor::B => modules.entry(slot.module()).or_default().1 = Some(slot),
                Factor::Magnitude => {
                    let mut sum = vec![0.0f64; slot.shape.iter().product()];
                    for (weight, update) in &self.updates {
                        let tensor = &update.tensors[&slot.name];
                        for (acc, value) in sum.iter_mut().zip(&tensor.data) {
                            *acc += weight * f64::from(*value);
                        }
                    }
                    adapter.tensors.insert(
                        slot.name.clone(),
                        AdapterTensor {
                            shape: slot.shape.clone(),
                            data: sum.iter().map(|value| (value / total) as f32).collect(),
                        },
                    );
                }
            }
        }
        let pairs = modules
            .into_iter()
            .map(|(module, pair)| match pair {
                (Some(a_slot), Some(b_slot)) => Ok((a_slot, b_slot)),
                _ => Err(AggregateError::Config(format!(
                    "module {module:?} lacks a lora_A or lora_B tensor"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        // Modules are independent: one per rayon task (faer's own kernels share the same pool).
        let factors = pairs
            .par_iter()
            .map(|(a_slot, b_slot)| {
                let terms: Vec<(f64, &AdapterTensor, &AdapterTensor)> = self
                    .updates
                    .iter()
                    .map(|(weight, update)| {
                        (
                            weight / total,
                            &update.tensors[&a_slot.name],
                            &update.tensors[&b_slot.name],
                        )
                    })
                    .collect();
                let (mut a, b, kept) = refactorise(&terms, a_slot, b_slot)?;
                if let Some(origin) = start
                    .and_then(|start| start.tensors.get(&a_slot.name))
                    .filter(|origin| origin.shape == a_slot.shape)
                {
                    let start_row = kept * a_slot.shape[1];
                    a.data[start_row..].copy_from_slice(&origin.data[start_row..]);
                }
                Ok((a_slot, b_slot, a, b))
            })
            .collect::<Result<Vec<_>>>()?;
        for (a_slot, b_slot, a, b) in factors {
            adapter.tensors.insert(a_slot.name.clone(), a);
            adapter.tensors.insert(b_slot.name.clone(), b);
        }
        Ok(adapter)
    }
}

/// Σ pₖ Bₖ Aₖ for one module, re-factorised to the slots' rank: (A, B, slots filled). Slots
/// from the returned count on are zero.
fn refactorise(
    terms: &[(f64, &AdapterTensor, &AdapterTensor)],
    a_slot: &Slotted,
    b_slot: &Slotted,
) -> Result<(AdapterTensor, AdapterTensor, usize)> {
    let (rank, in_features) = (a_slot.shape[0], a_slot.shape[1]);
    let out_features = b_slot.shape[0];
    let stacked: usize = terms.iter().map(|(_, a, _)| a.shape[0]).sum();
    let mut b_cat = Mat::<f64>::zeros(out_features, stacked);
    let mut a_cat_t = Mat::<f64>::zeros(in_features, stacked);
    let mut offset = 0;
    for (weight, a, b) in terms {
        let r = a.shape[0];
        for row in 0..out_features {
            for column in 0..r {
                b_cat[(row, offset + column)] = weight * f64::from(b.data[row * r + column]);
            }
        }
        for column in 0..r {
            let a_row = &a.data[column * in_features..(column + 1) * in_features];
            for (feature, value) in a_row.iter().enumerate() {
                a_cat_t[(feature, offset + column)] = f64::from(*value);
            }
        }
        offset += r;
    }
    let qr_b = b_cat.qr();
    let (q_b, r_b) = (qr_b.compute_thin_Q(), qr_b.thin_R().to_owned());
    let qr_a = a_cat_t.qr();
    let (q_a, r_a) = (qr_a.compute_thin_Q(), qr_a.thin_R().to_owned());
    let core = &r_b * r_a.transpose();
    let svd = core.thin_svd().map_err(|error| AggregateError::Linalg {
        name: a_slot.module().to_string(),
        message: format!("{error:?}"),
    })?;
    let singular = svd.S().column_vector();
    // Directions whose singular value vanishes next to the largest carry nothing.
    let largest = if singular.nrows() > 0 {
        singular[0]
    } else {
        0.0
    };
    let keep = (0..rank.min(singular.nrows()))
        .take_while(|&slot| singular[slot] > largest * 1e-9 && singular[slot] > 0.0)
        .count();
    let left = &q_b * svd.U().subcols(0, keep);
    let right = &q_a * svd.V().subcols(0, keep);
    let mut a = AdapterTensor::zeros(&a_slot.shape);
    let mut b = AdapterTensor::zeros(&b_slot.shape);
    for slot in 0..keep {
        let root = singular[slot].max(0.0).sqrt();
        for feature in 0..in_features {
            a.data[slot * in_features + feature] = (root * right[(feature, slot)]) as f32;
        }
        for row in 0..out_features {
            b.data[row * rank + slot] = (left[(row, slot)] * root) as f32;
        }
    }
    Ok((a, b, keep))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use fedlora_proto::adapter::{LoraSpec, ModelDims, adapter_spec};
    use fedlora_proto::factors::client_spec;

    use super::*;

    pub(crate) fn dims() -> ModelDims {
        ModelDims {
            num_layers: 2,
            hidden_size: 12,
            intermediate_size: 20,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 6,
        }
    }

    /// A deterministic pseudo-random adapter of `spec`.
    fn filled(spec: &[TensorSpec], seed: u64) -> Adapter {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut adapter = Adapter::zeros(spec);
        for tensor in adapter.tensors.values_mut() {
            for value in &mut tensor.data {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *value = ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
        }
        adapter
    }

    /// Dense Σ wₖ Bₖ Aₖ of one module (test oracle only).
    fn dense(updates: &[(f64, &Adapter)], module: &str) -> Vec<f64> {
        let total: f64 = updates.iter().map(|(weight, _)| weight).sum();
        let mut product: Vec<f64> = Vec::new();
        for (weight, update) in updates {
            let a = &update.tensors[&format!("{module}.lora_A.weight")];
            let b = &update.tensors[&format!("{module}.lora_B.weight")];
            let (r, inputs, outputs) = (a.shape[0], a.shape[1], b.shape[0]);
            product.resize(outputs * inputs, 0.0);
            for row in 0..outputs {
                for column in 0..inputs {
                    let dot: f64 = (0..r)
                        .map(|k| {
                            f64::from(b.data[row * r + k]) * f64::from(a.data[k * inputs + column])
                        })
                        .sum();
                    product[row * inputs + column] += weight / total * dot;
                }
            }
        }
        product
    }

    fn relative_error(got: &[f64], expected: &[f64]) -> f64 {
        let difference: f64 = got
            .iter()
            .zip(expected)
            .map(|(got, expected)| (got - expected).powi(2))
            .sum();
        let norm: f64 = expected.iter().map(|value| value * value).sum();
        (difference / norm).sqrt()
    }

    #[test]
    fn reproduces_the_exact_product_when_the_rank_suffices() {
        // Two rank-2 clients and one rank-4 client: the product has rank ≤ 8, the federation's rank.
        let lora = LoraSpec::new(8, 16.0, &["q_proj", "down_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let low = client_spec(&dims(), &lora, 2).unwrap();
        let mid = client_spec(&dims(), &lora, 4).unwrap();
        let updates = [filled(&low, 1), filled(&low, 2), filled(&mid, 3)];
        let weighted: Vec<(f64, &Adapter)> =
            [3.0, 1.0, 2.0].into_iter().zip(updates.iter()).collect();
        let mut svd = SvdAggregate::new(&spec).unwrap();
        for (weight, update) in &weighted {
            svd.add((*update).clone(), *weight).unwrap();
        }
        let global = svd.finish(None).unwrap();
        global.validate(&spec).unwrap();
        for module in [
            "base_model.model.model.layers.0.self_attn.q_proj",
            "base_model.model.model.layers.1.mlp.down_proj",
        ] {
            let error =
                relative_error(&dense(&[(1.0, &global)], module), &dense(&weighted, module));
            assert!(error < 1e-5, "{module}: relative error {error}");
        }
    }

    #[test]
    fn truncation_keeps_the_largest_directions() {
        // Rank-2 federation, two rank-2 clients: the product has rank 4 and is truncated to the
        // best rank-2 approximation; its error is the tail of the singular values, below the
        // error of keeping either client alone.
        let lora = LoraSpec::new(2, 4.0, &["v_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let updates = [filled(&spec, 5), filled(&spec, 6)];
        let weighted: Vec<(f64, &Adapter)> = updates.iter().map(|update| (1.0, update)).collect();
        let mut svd = SvdAggregate::new(&spec).unwrap();
        for update in &updates {
            svd.add(update.clone(), 1.0).unwrap();
        }
        let global = svd.finish(None).unwrap();
        let module = "base_model.model.model.layers.1.self_attn.v_proj";
        let exact = dense(&weighted, module);
        let error = relative_error(&dense(&[(1.0, &global)], module), &exact);
        let scaled: Vec<f64> = dense(&[(1.0, &updates[0])], module)
            .iter()
            .map(|value| value / 2.0)
            .collect();
        assert!(error < relative_error(&scaled, &exact), "{error}");
        assert!(error > 1e-3, "a rank-4 product cannot be exact at rank 2");
    }

    #[test]
    fn refuses_bad_updates_and_empty_rounds() {
        let lora = LoraSpec::new(4, 8.0, &["q_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let mut svd = SvdAggregate::new(&spec).unwrap();
        let mut poisoned = filled(&spec, 1);
        poisoned.tensors.values_mut().next().unwrap().data[3] = f32::NAN;
        assert!(svd.add(poisoned, 1.0).is_err());
        assert!(svd.add(filled(&spec, 2), f64::INFINITY).is_err());
        assert_eq!(svd.updates(), 0);
        assert_eq!(svd.finish(None), Err(AggregateError::NothingToAggregate));
    }

    #[test]
    fn slots_beyond_the_products_rank_keep_a_trainable_start() {
        // Two rank-2 clients in a rank-8 federation: 4 slots carry the product, the other 4
        // take A from the start and zero in B.
        let lora = LoraSpec::new(8, 16.0, &["q_proj"]);
        let spec = adapter_spec(&dims(), &lora).unwrap();
        let low = client_spec(&dims(), &lora, 2).unwrap();
        let start = filled(&spec, 42);
        let mut svd = SvdAggregate::new(&spec).unwrap();
        let updates = [filled(&low, 1), filled(&low, 2)];
        for update in &updates {
            svd.add(update.clone(), 1.0).unwrap();
        }
        let global = svd.finish(Some(&start)).unwrap();
        let module = "base_model.model.model.layers.0.self_attn.q_proj";
        let a = &global.tensors[&format!("{module}.lora_A.weight")];
        let b = &global.tensors[&format!("{module}.lora_B.weight")];
        let columns = a.shape[1];
        assert_eq!(
            a.data[4 * columns..],
            start.tensors[&format!("{module}.lora_A.weight")].data[4 * columns..]
        );
        assert!(
            b.data
                .chunks(8)
                .all(|row| row[4..].iter().all(|v| *v == 0.0))
        );
        assert!(a.data[..4 * columns].iter().any(|v| *v != 0.0));
        let weighted: Vec<(f64, &Adapter)> = updates.iter().map(|update| (1.0, update)).collect();
        let error = relative_error(&dense(&[(1.0, &global)], module), &dense(&weighted, module));
        assert!(error < 1e-5, "{error}");
    }
}
