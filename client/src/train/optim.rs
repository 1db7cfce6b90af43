//! AdamW over the LoRA factors, with moments that can be saved and restored: candle-nn's
//! `AdamW` keeps them private, so a run stopped and resumed from a checkpoint would restart its
//! moments from zero. The arithmetic is candle-nn 0.11's, operation for operation (a test
//! checks the factors agree to the last bit), so training gives the same numbers as before.
//! Pure tensor math and byte encoding; no I/O.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::{ClientError, Result};

/// AdamW's constants: PyTorch's defaults, and no weight decay (LoRA factors start at or near
/// zero; PEFT's examples train them without it).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const WEIGHT_DECAY: f64 = 0.0;

/// Name of the first and second moment of factor `name` in [`AdamW::state_bytes`] (PyTorch's
/// names for them).
const FIRST: &str = "exp_avg";
const SECOND: &str = "exp_avg_sq";
/// Metadata key of the optimizer steps taken.
const STEPS: &str = "steps";

/// One trained factor and its moments.
struct Slot {
    name: String,
    var: Var,
    first: Tensor,
    second: Tensor,
}

/// AdamW (decoupled weight decay, bias-corrected moments) over named variables.
pub struct AdamW {
    slots: Vec<Slot>,
    steps: usize,
    learning_rate: f64,
}

impl AdamW {
    /// Zero moments for each `(name, variable)`.
    pub fn new(vars: Vec<(String, Var)>, learning_rate: f64) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Slot {
                    name,
                    first: zeros.clone(),
                    second: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            steps: 0,
            learning_rate,
        })
    }

    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
    }

    /// Optimizer steps taken (restored ones included).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One step on `gradients`; a variable without a gradient keeps its value and moments.
    pub fn step(&mut self, gradients: &GradStore) -> Result<()> {
        self.steps += 1;
        let lr = self.learning_rate;
        let exponent = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let scale_first = 1.0 / (1.0 - BETA1.powi(exponent));
        let scale_second = 1.0 / (1.0 - BETA2.powi(exponent));
        for slot in &mut self.slots {
            let Some(gradient) = gradients.get(slot.var.as_tensor()) else {
                continue;
            };
            let first = ((&slot.first * BETA1)? + (gradient * (1.0 - BETA1))?)?;
            let second = ((&slot.second * BETA2)? + (gradient.sqr()? * (1.0 - BETA2))?)?;
            let first_hat = (&first * scale_first)?;
            let second_hat = (&second * scale_second)?;
            let decayed = (slot.var.as_tensor() * (1.0 - lr * WEIGHT_DECAY))?;
            let update = (first_hat / (second_hat.sqrt()? + EPS)?)?;
            slot.var.set(&(decayed - (update * lr)?)?)?;
            slot.first = first;
            slot.second = second;
        }
        Ok(())
    }

    /// The moments and step count as safetensors bytes: `NAME.exp_avg` and `NAME.exp_avg_sq`
    /// for each variable, the steps in the metadata.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            tensors.push((format!("{}.{FIRST}", slot.name), &slot.first));
            tensors.push((format!("{}.{SECOND}", slot.name), &slot.second));
        }
        let metadata = HashMap::from([(STEPS.to_string(), self.steps.to_string())]);
        safetensors::serialize(tensors, Some(metadata)).map_err(|error| {
            ClientError::Protocol(format!("cannot encode optimizer state: {error}"))
        })
    }

    /// Restores what [`AdamW::state_bytes`] wrote for the same variables. Every moment is
    /// checked (present, same shape, finite, second moments not negative) before any changes,
    /// so a bad file leaves the optimizer as it was.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let invalid = |message: String| ClientError::InvalidArgument(message);
        let steps = saved_steps(bytes)?;
        let device = self
            .slots
            .first()
            .map_or(Device::Cpu, |slot| slot.var.device().clone());
        let mut tensors = candle_core::safetensors::load_buffer(bytes, &device)
            .map_err(|error| invalid(format!("optimizer state cannot be read: {error}")))?;
        if tensors.len() != 2 * self.slots.len() {
            return Err(invalid(format!(
                "optimizer state holds {} moments, the run trains {} factors (two moments each)",
                tensors.len(),
                self.slots.len()
            )));
        }
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let mut take = |moment: &str| {
                let key = format!("{}.{moment}", slot.name);
                let tensor = tensors
                    .remove(&key)
                    .ok_or_else(|| invalid(format!("optimizer state has no {key}")))?;
                if tensor.dims() != slot.var.dims() || tensor.dtype() != slot.var.dtype() {
                    return Err(invalid(format!(
                        "optimizer state's {key} is {:?} {:?}, the factor {:?} {:?}",
                        tensor.dtype(),
                        tensor.dims(),
                        slot.var.dtype(),
                        slot.var.dims()
                    )));
                }
                let values = tensor.flatten_all()?.to_dtype(candle_core::DType::F32)?;
                let values = values.to_vec1::<f32>()?;
                let bad = if moment == SECOND {
                    values
                        .iter()
                        .any(|value| !(value.is_finite() && *value >= 0.0))
                } else {
                    values.iter().any(|value| !value.is_finite())
                };
                if bad {
                    return Err(invalid(format!(
                        "optimizer state's {key} holds a value no run could reach"
                    )));
                }
                Ok(tensor)
            };
            restored.push((take(FIRST)?, take(SECOND)?));
        }
        for (slot, (first, second)) in self.slots.iter_mut().zip(restored) {
            slot.first = first;
            slot.second = second;
        }
        self.steps = steps;
        Ok(())
    }
}

/// The optimizer steps a state of [`AdamW::state_bytes`] was saved after.
pub fn saved_steps(bytes: &[u8]) -> Result<usize> {
    let invalid = |message: String| ClientError::InvalidArgument(message);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|error| invalid(format!("optimizer state is not safetensors: {error}")))?;
    metadata
        .metadata()
        .as_ref()
        .and_then(|metadata| metadata.get(STEPS))
        .and_then(|steps| steps.parse().ok())
        .ok_or_else(|| invalid("optimizer state without its step count".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::DType;
    use candle_nn::Optimizer;

    use super::*;

    fn vars(seed: u64) -> Vec<(String, Var)> {
        let device = Device::Cpu;
        let values = |len: usize, offset: u64| -> Vec<f32> {
            (0..len)
                .map(|i| (((i as u64 * 2654435761 + seed + offset) % 1000) as f32 - 500.0) / 700.0)
                .collect()
        };
        vec![
            (
                "a".into(),
                Var::from_tensor(&Tensor::from_vec(values(12, 1), (3, 4), &device).unwrap())
                    .unwrap(),
            ),
            (
                "b".into(),
                Var::from_tensor(&Tensor::from_vec(values(8, 2), (4, 2), &device).unwrap())
                    .unwrap(),
            ),
        ]
    }

    /// Gradients of `Σ sin(k·x)` for step `k`: different at every step.
    fn gradients(vars: &[(String, Var)], k: usize) -> GradStore {
        let loss = vars
            .iter()
            .map(|(_, var)| (var.as_tensor() * (k as f64 + 0.5)).unwrap().sin().unwrap())
            .map(|tensor| tensor.sum_all().unwrap())
            .reduce(|sum, term| (sum + term).unwrap())
            .unwrap();
        loss.backward().unwrap()
    }

    /// New variables holding the values of `vars` (as a new process reads them back).
    fn copies(vars: &[(String, Var)]) -> Vec<(String, Var)> {
        vars.iter()
            .map(|(name, var)| {
                let copy = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
                (name.clone(), copy)
            })
            .collect()
    }

    fn bits(vars: &[(String, Var)]) -> Vec<u32> {
        vars.iter()
            .flat_map(|(_, var)| var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn steps_as_candle_nn_adamw_does_to_the_last_bit() {
        let (ours, theirs) = (vars(7), vars(7));
        let mut adam = AdamW::new(ours.clone(), 1e-2).unwrap();
        let mut reference = candle_nn::AdamW::new(
            theirs.iter().map(|(_, var)| var.clone()).collect(),
            candle_nn::ParamsAdamW {
                lr: 1e-2,
                weight_decay: 0.0,
                ..candle_nn::ParamsAdamW::default()
            },
        )
        .unwrap();
        let start = bits(&ours);
        for k in 0..6 {
            let lr = 1e-2 / (k + 1) as f64;
            adam.set_learning_rate(lr);
            reference.set_learning_rate(lr);
            adam.step(&gradients(&ours, k)).unwrap();
            reference.step(&gradients(&theirs, k)).unwrap();
            assert_eq!(bits(&ours), bits(&theirs), "step {k}");
        }
        assert_ne!(bits(&ours), start, "the factors moved");
    }

    #[test]
    fn a_restored_optimizer_continues_as_the_uninterrupted_one() {
        let straight = vars(3);
        let mut adam = AdamW::new(straight.clone(), 5e-3).unwrap();
        for k in 0..6 {
            adam.step(&gradients(&straight, k)).unwrap();
        }

        let first = vars(3);
        let mut before = AdamW::new(first.clone(), 5e-3).unwrap();
        for k in 0..3 {
            before.step(&gradients(&first, k)).unwrap();
        }
        let saved = before.state_bytes().unwrap();
        // A new process: the factors as a checkpoint restores them, fresh moments, then the file.
        let resumed = copies(&first);
        let mut after = AdamW::new(resumed.clone(), 5e-3).unwrap();
        after.restore(&saved).unwrap();
        assert_eq!(after.steps(), 3);
        for k in 3..6 {
            after.step(&gradients(&resumed, k)).unwrap();
        }
        assert_eq!(bits(&resumed), bits(&straight));

        // Fresh moments instead: not the same run (the check above can fail).
        let fresh = copies(&first);
        let mut restarted = AdamW::new(fresh.clone(), 5e-3).unwrap();
        for k in 3..6 {
            restarted.step(&gradients(&fresh, k)).unwrap();
        }
        assert_ne!(bits(&fresh), bits(&straight));
    }

    #[test]
    fn refuses_state_of_other_factors_or_impossible_moments() {
        let trained = vars(1);
        let mut adam = AdamW::new(trained.clone(), 1e-3).unwrap();
        adam.step(&gradients(&trained, 0)).unwrap();
        let good = adam.state_bytes().unwrap();

        let other = |vars: Vec<(String, Var)>| AdamW::new(vars, 1e-3).unwrap();
        // Another factor set: one factor fewer, a renamed one, another shape.
        let mut fewer = other(trained[..1].to_vec());
        let error = fewer.restore(&good).unwrap_err().to_string();
        assert!(error.contains("4 moments"), "{error}");
        let mut renamed = other(vec![trained[0].clone(), ("c".into(), trained[1].1.clone())]);
        let error = renamed.restore(&good).unwrap_err().to_string();
        assert!(error.contains("no c.exp_avg"), "{error}");
        let reshaped = Var::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let mut reshaped = other(vec![trained[0].clone(), ("b".into(), reshaped)]);
        let error = reshaped.restore(&good).unwrap_err().to_string();
        assert!(
            error.contains("[4, 2]") && error.contains("[2, 4]"),
            "{error}"
        );

        // A negative second moment, a NaN first one, no step count, not safetensors.
        let tensors = candle_core::safetensors::load_buffer(&good, &Device::Cpu).unwrap();
        let tampered = |key: &str, value: f32, metadata: bool| {
            let mut tensors = tensors.clone();
            let shape = tensors[key].shape().clone();
            tensors.insert(
                key.into(),
                Tensor::full(value, shape, &Device::Cpu).unwrap(),
            );
            let metadata = metadata.then(|| HashMap::from([(STEPS.into(), "1".into())]));
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), metadata).unwrap()
        };
        for (bytes, expected) in [
            (
                tampered("a.exp_avg_sq", -1.0, true),
                "a.exp_avg_sq holds a value",
            ),
            (
                tampered("b.exp_avg", f32::NAN, true),
                "b.exp_avg holds a value",
            ),
            (tampered("a.exp_avg", 0.0, false), "without its step count"),
            (b"not a file".to_vec(), "not safetensors"),
        ] {
            let mut fresh = other(trained.clone());
            let error = fresh.restore(&bytes).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(fresh.steps(), 0, "nothing restored from a bad file");
        }
    }
}
