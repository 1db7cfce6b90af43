//! Robust aggregation for federations that do not trust every site.
//!
//! - A per-update L2 bound on the change an update makes to the round's starting factors
//!   (‖update − start‖₂ over the trained A and B): `clip` scales the change down to the bound,
//!   `reject` leaves the update out of the round. (DoRA magnitudes are not bounded: their starting
//!   point in a fresh round is the base model's row norms, which only clients hold.)
//! - The coordinate-wise trimmed mean: per coordinate, the largest and smallest `trim_fraction`
//!   of the values are dropped and the rest averaged (unweighted, as in Yin et al., 2018). It needs
//!   every update at once (memory O(updates)) and is not linear, so it cannot run under secure
//!   aggregation.

use fedlora_proto::adapter::{Adapter, AdapterTensor, Factor, TensorSpec};
use serde::{Deserialize, Serialize};

use super::strategy::Trained;
use super::{AggregateError, Result, Slotted, check_update};

/// What to do with an update whose change exceeds the bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormAction {
    /// Scale the change down to the bound (the update still counts).
    #[default]
    Clip,
    /// Leave the update out of the round (audited).
    Reject,
}

/// Robustness settings of a federation (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Robustness {
    /// Bound on ‖update − start‖₂ over the trained factors; `None` = unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_update_norm: Option<f64>,
    #[serde(default)]
    pub norm_action: NormAction,
    /// Fraction of values trimmed at each end of every coordinate (0 = plain mean; below 0.5).
    #[serde(default)]
    pub trim_fraction: f64,
}

impl Robustness {
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(bound) = self.max_update_norm
            && !(bound.is_finite() && bound > 0.0)
        {
            return Err(AggregateError::Config(format!(
                "max_update_norm must be a positive number, got {bound}"
            )));
        }
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return Err(AggregateError::Config(format!(
                "trim_fraction must be in [0, 0.5), got {}",
                self.trim_fraction
            )));
        }
        Ok(())
    }
}

/// ‖update − start‖₂ over the factors in `trained`, comparing a rank-rₖ update with the first
/// rₖ slots of `start` (which has the federation's layout). The update must have passed
/// [`check_update`], whose ranks are passed in.
pub(crate) fn change_norm(
    layout: &[Slotted],
    ranks: &[usize],
    update: &Adapter,
    start: &Adapter,
    trained: Trained,
) -> Result<f64> {
    let mut squares = 0.0f64;
    for (slot, rank) in layout.iter().zip(ranks) {
        if slot.factor == Factor::Magnitude || !trained.includes(slot.factor) {
            continue;
        }
        let (tensor, origin) = pair(slot, update, start)?;
        for (index, value) in tensor.data.iter().enumerate() {
            let change = f64::from(*value) - f64::from(origin.data[slot.full_index(*rank, index)]);
            squares += change * change;
        }
    }
    Ok(squares.sqrt())
}

/// Scales the change of `update` from `start` by `factor` (in place), for the trained factors.
pub(crate) fn scale_change(
    layout: &[Slotted],
    ranks: &[usize],
    update: &mut Adapter,
    start: &Adapter,
    trained: Trained,
    factor: f64,
) -> Result<()> {
    for (slot, rank) in layout.iter().zip(ranks) {
        if slot.factor == Factor::Magnitude || !trained.includes(slot.factor) {
            continue;
        }
        let origin = start
            .tensors
            .get(&slot.name)
            .ok_or_else(|| AggregateError::MissingStart(slot.name.clone()))?;
        if let Some(tensor) = update.tensors.get_mut(&slot.name) {
            for (index, value) in tensor.data.iter_mut().enumerate() {
                let base = f64::from(origin.data[slot.full_index(*rank, index)]);
                *value = (base + (f64::from(*value) - base) * factor) as f32;
            }
        }
    }
    Ok(())
}

fn pair<'a>(
    slot: &Slotted,
    update: &'a Adapter,
    start: &'a Adapter,
) -> Result<(&'a AdapterTensor, &'a AdapterTensor)> {
    let origin = start
        .tensors
        .get(&slot.name)
        .filter(|tensor| tensor.shape == slot.shape)
        .ok_or_else(|| AggregateError::MissingStart(slot.name.clone()))?;
    let tensor = update
        .tensors
        .get(&slot.name)
        .ok_or_else(|| AggregateError::MissingStart(slot.name.clone()))?;
    Ok((tensor, origin))
}

/// Coordinate-wise trimmed mean. Holds every update until [`TrimmedMean::finish`].
#[derive(Debug, Clone)]
pub struct TrimmedMean {
    layout: Vec<Slotted>,
    trained: Trained,
    trim_fraction: f64,
    updates: Vec<(Vec<usize>, Adapter)>,
}

impl TrimmedMean {
    pub fn new(spec: &[TensorSpec], trained: Trained, trim_fraction: f64) -> Result<Self> {
        Ok(Self {
            layout: Slotted::layout(spec)?,
            trained,
            trim_fraction,
            updates: Vec::new(),
        })
    }

    /// Keeps `update` (weights do not enter a trimmed mean; a zero weight leaves it out).
    pub fn add(&mut self, update: Adapter, weight: f64) -> Result<()> {
        super::check_weight(weight)?;
        let ranks = check_update(&self.layout, &update)?;
        if weight > 0.0 {
            self.updates.push((ranks, update));
        }
        Ok(())
    }

    pub fn updates(&self) -> usize {
        self.updates.len()
    }

    /// The trimmed mean of every coordinate the updates reach; other coordinates and untrained
    /// factors from `start`.
    pub fn finish(self, start: Option<&Adapter>) -> Result<Adapter> {
        if self.updates.is_empty() {
            return Err(AggregateError::NothingToAggregate);
        }
        let mut adapter = Adapter::default();
        let mut values = Vec::with_capacity(self.updates.len());
        for (position, slot) in self.layout.iter().enumerate() {
            let start_tensor = start
                .and_then(|start| start.tensors.get(&slot.name))
                .filter(|tensor| tensor.shape == slot.shape);
            if !self.trained.includes(slot.factor) {
                let tensor =
                    start_tensor.ok_or_else(|| AggregateError::MissingStart(slot.name.clone()))?;
                adapter.tensors.insert(slot.name.clone(), tensor.clone());
                continue;
            }
            let size: usize = slot.shape.iter().product();
            let full_rank = slot.rank();
            let mut data = vec![0.0f32; size];
            for (index, out) in data.iter_mut().enumerate() {
                let needed = slot.slot(full_rank, index);
                values.clear();
                for (ranks, update) in &self.updates {
                    let rank = ranks[position];
                    if slot.factor != Factor::Magnitude && needed >= rank {
                        continue;
                    }
                    let local = local_index(slot, rank, index);
                    values.push(f64::from(update.tensors[&slot.name].data[local]));
                }
                *out = match trimmed(&mut values, self.trim_fraction) {
                    Some(mean) => mean as f32,
                    None => start_tensor.map_or(0.0, |tensor| tensor.data[index]),
                };
            }
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

/// Index into a rank-`rank` prefix of the element at full-rank `index` (which must be covered).
fn local_index(slot: &Slotted, rank: usize, index: usize) -> usize {
    match slot.factor {
        Factor::B => {
            let (row, column) = (index / slot.shape[1], index % slot.shape[1]);
            row * rank + column
        }
        Factor::A | Factor::Magnitude => index,
    }
}

/// Mean of `values` without the `fraction` largest and smallest (at least one value kept).
fn trimmed(values: &mut [f64], fraction: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mut cut = (fraction * values.len() as f64).floor() as usize;
    while values.len() <= 2 * cut {
        cut -= 1;
    }
    let kept = &values[cut..values.len() - cut];
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
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
        adapter_spec(&dims, &LoraSpec::new(2, 4.0, &["q_proj"])).unwrap()
    }

    fn constant(value: f32) -> Adapter {
        let mut adapter = Adapter::zeros(&spec());
        for tensor in adapter.tensors.values_mut() {
            tensor.data.fill(value);
        }
        adapter
    }

    #[test]
    fn trimmed_mean_ignores_the_extremes() {
        let mut mean = TrimmedMean::new(&spec(), Trained::Both, 0.25).unwrap();
        for value in [1.0, 2.0, 3.0, 1e6] {
            mean.add(constant(value), 1.0).unwrap();
        }
        let global = mean.finish(None).unwrap();
        for tensor in global.tensors.values() {
            assert!(tensor.data.iter().all(|value| *value == 2.5), "{tensor:?}");
        }
        assert_eq!(trimmed(&mut [5.0, 1.0], 0.49), Some(3.0));
        assert_eq!(trimmed(&mut [], 0.1), None);
    }

    #[test]
    fn change_norm_and_clip() {
        let layout = Slotted::layout(&spec()).unwrap();
        let start = constant(1.0);
        let mut update = constant(3.0);
        let ranks = check_update(&layout, &update).unwrap();
        let elements = update.num_parameters() as f64;
        let norm = change_norm(&layout, &ranks, &update, &start, Trained::Both).unwrap();
        assert!((norm - 2.0 * elements.sqrt()).abs() < 1e-9);
        let only_b = change_norm(&layout, &ranks, &update, &start, Trained::B).unwrap();
        assert!(only_b < norm);
        scale_change(&layout, &ranks, &mut update, &start, Trained::Both, 0.5).unwrap();
        assert_eq!(update, constant(2.0));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Robustness::default().validate().is_ok());
        let bad = Robustness {
            trim_fraction: 0.5,
            ..Robustness::default()
        };
        assert!(bad.validate().is_err());
        let bad = Robustness {
            max_update_norm: Some(f64::NAN),
            ..Robustness::default()
        };
        assert!(bad.validate().is_err());
    }
}
