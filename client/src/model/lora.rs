//! The LoRA linear layer: a frozen weight W₀ plus trainable low-rank factors,
//! `y = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ` with s = α/r.

use candle_core::{DType, Device, Tensor, Var};
use fedlora_proto::adapter::AdapterTensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use candle_core::quantized::GgmlDType;

use super::frozen::FrozenWeight;
use crate::error::Result;

/// Trainable factors of one adapted layer. Only these are `Var`s: the base stays frozen.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `[r, in]`, PEFT's `lora_A.weight`.
    pub a: Var,
    /// `[out, r]`, PEFT's `lora_B.weight`.
    pub b: Var,
    pub scale: f64,
}

impl LoraFactors {
    /// PEFT's initialisation: A kaiming-uniform (a = √5, so U(−1/√in, 1/√in)), B zero, so the
    /// adapted model starts equal to the base.
    pub fn peft_init(
        rank: usize,
        in_features: usize,
        out_features: usize,
        scale: f64,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f32).sqrt();
        let values: Vec<f32> = (0..rank * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(values, (rank, in_features), device)?)?;
        let b = Var::zeros((out_features, rank), DType::F32, device)?;
        Ok(Self { a, b, scale })
    }
}

/// A linear layer whose weight (and optional bias) is frozen, optionally with LoRA factors.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `[out, in]`, as stored by Hugging Face (dense or quantized).
    weight: FrozenWeight,
    /// `[out]` (Qwen2's q/k/v projections have one).
    bias: Option<Tensor>,
    pub lora: Option<LoraFactors>,
}

impl LoraLinear {
    pub fn new(weight: impl Into<FrozenWeight>, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.into(),
            bias,
            lora: None,
        }
    }

    pub fn in_out(&self) -> (usize, usize) {
        let (out_features, in_features) = self.weight.dims2().unwrap_or((0, 0));
        (in_features, out_features)
    }

    /// The frozen weight with the LoRA update folded in, W₀ + s·B·A (W₀ without factors).
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => self.weight.dequantize(),
            Some(lora) => {
                let update = lora.b.as_tensor().matmul(lora.a.as_tensor())?;
                Ok((self.weight.dequantize()? + (update * lora.scale)?)?)
            }
        }
    }

    /// Keeps the frozen weight quantized to `dtype` from now on (QLoRA).
    pub fn quantize_weight(&mut self, dtype: GgmlDType) -> Result<()> {
        self.weight = self.weight.quantized(dtype)?;
        Ok(())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x` is `[..., in]`; returns `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut base = super::frozen::frozen_matmul_t(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            base = base.broadcast_add(bias)?;
        }
        match &self.lora {
            None => Ok(base),
            Some(lora) => {
                let down = x.broadcast_matmul(&lora.a.as_tensor().t()?)?;
                let up = down.broadcast_matmul(&lora.b.as_tensor().t()?)?;
                Ok((base + (up * lora.scale)?)?)
            }
        }
    }
}

/// Copies a candle tensor into the wire type.
pub(crate) fn to_adapter_tensor(tensor: &Tensor) -> Result<AdapterTensor> {
    Ok(AdapterTensor {
        shape: tensor.dims().to_vec(),
        data: tensor
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?,
    })
}

/// A seeded generator for reproducible initialisation.
pub(crate) fn seeded_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn forward_is_base_plus_bias_plus_scaled_low_rank_update() {
        let device = Device::Cpu;
        let weight = Tensor::new(&[[1f32, 2.0], [0.0, -1.0], [3.0, 1.0]], &device).unwrap();
        let bias = Tensor::new(&[0.5f32, -0.5, 1.0], &device).unwrap();
        let mut linear = LoraLinear::new(weight, Some(bias));
        let a = Var::from_tensor(&Tensor::new(&[[1f32, 1.0]], &device).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[1f32], [0.0], [2.0]], &device).unwrap()).unwrap();
        linear.lora = Some(LoraFactors { a, b, scale: 0.5 });
        let x = Tensor::new(&[[[1f32, 3.0]]], &device).unwrap();
        // W0·x = [7, -3, 6]; + bias = [7.5, -3.5, 7]; A·x = 4; 0.5·B·4 = [2, 0, 4].
        let y = linear
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![9.5, -3.5, 11.0]);
    }
}
