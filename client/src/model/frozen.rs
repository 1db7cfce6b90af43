//! `x·Wᵀ` for a frozen weight W whose backward pass computes only ∂L/∂x. W is dense f32 or
//! quantized (QLoRA: GGUF block types such as Q8_0, dequantized only inside the backward pass;
//! candle's own quantized matmul passes no gradient to its input at all).
//!
//! candle's matmul backward always computes the gradients of both operands, so every frozen
//! projection (and the vocabulary-sized `lm_head`) would cost a full weight-gradient product per
//! step that nobody reads. Here the product is computed without a graph and passed through a
//! custom op whose backward is `∂L/∂x = ∂L/∂y · W`. On devices other than the CPU, and when `x`
//! needs no gradient, the plain matmul is used.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// A frozen `[out, in]` weight.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl From<Tensor> for FrozenWeight {
    fn from(tensor: Tensor) -> Self {
        Self::Dense(tensor)
    }
}

impl FrozenWeight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(tensor) => tensor.dims2()?,
            Self::Quantized(tensor) => tensor.shape().dims2()?,
        })
    }

    /// The weight as a dense f32 tensor.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(tensor) => tensor.clone(),
            Self::Quantized(tensor) => tensor.dequantize(&tensor.device())?,
        })
    }

    /// The weight quantized to `dtype` (a dense weight is quantized; a quantized one is kept).
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        Ok(match self {
            Self::Dense(tensor) => Self::Quantized(Arc::new(QTensor::quantize(tensor, dtype)?)),
            Self::Quantized(_) => self.clone(),
        })
    }
}

struct InputGradOnly {
    weight: FrozenWeight,
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    /// Passes the precomputed product (the second argument) through.
    fn cpu_fwd(
        &self,
        _input: &CpuStorage,
        _input_layout: &Layout,
        product: &CpuStorage,
        product_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = product else {
            candle_core::bail!("frozen-matmul expects an f32 product");
        };
        let Some((start, end)) = product_layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul expects a contiguous product");
        };
        Ok((
            CpuStorage::F32(values[start..end].to_vec()),
            product_layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _product: &Tensor,
        _result: &Tensor,
        grad_result: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let weight = self
            .weight
            .dequantize()
            .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
        Ok((Some(grad_result.broadcast_matmul(&weight)?), None))
    }
}

/// `x·Wᵀ` with `x` `[..., in]` and a frozen `weight` `[out, in]`.
pub fn frozen_matmul_t(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let product = match weight {
        FrozenWeight::Dense(dense) => {
            if !x.track_op() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
                return Ok(x.broadcast_matmul(&dense.t()?)?);
            }
            x.detach().broadcast_matmul(&dense.detach().t()?)?
        }
        FrozenWeight::Quantized(quantized) if !x.device().is_cpu() => {
            // The pass-through op exists for the CPU only: elsewhere use the dequantized weight.
            let dense = quantized.dequantize(x.device())?;
            return Ok(x.broadcast_matmul(&dense.t()?)?);
        }
        FrozenWeight::Quantized(quantized) => {
            let product = x
                .detach()
                .contiguous()?
                .apply_op1_no_bwd(quantized.as_ref())?;
            if !x.track_op() {
                return Ok(product);
            }
            product
        }
    };
    let weight = match weight {
        FrozenWeight::Dense(dense) => FrozenWeight::Dense(dense.detach()),
        quantized => quantized.clone(),
    };
    Ok(x.apply_op2(&product.contiguous()?, InputGradOnly { weight })?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn same_values_and_input_gradient_as_matmul_and_no_weight_gradient() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5), &device).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &device).unwrap()).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 3, 4), &device).unwrap();

        let plain = x
            .broadcast_matmul(&weight.as_tensor().t().unwrap())
            .unwrap();
        let frozen = frozen_matmul_t(
            x.as_tensor(),
            &FrozenWeight::Dense(weight.as_tensor().clone()),
        )
        .unwrap();
        assert_eq!(
            plain.to_vec3::<f32>().unwrap(),
            frozen.to_vec3::<f32>().unwrap()
        );

        let loss = |y: &Tensor| (y * &target).unwrap().sum_all().unwrap();
        let plain_grads = loss(&plain).backward().unwrap();
        let frozen_grads = loss(&frozen).backward().unwrap();
        let expected = plain_grads
            .get(x.as_tensor())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let got = frozen_grads
            .get(x.as_tensor())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (row_expected, row_got) in expected.iter().flatten().zip(got.iter().flatten()) {
            for (e, g) in row_expected.iter().zip(row_got) {
                assert!((e - g).abs() < 1e-5, "{e} vs {g}");
            }
        }
        assert!(plain_grads.get(weight.as_tensor()).is_some());
        assert!(
            frozen_grads.get(weight.as_tensor()).is_none(),
            "the frozen weight gets no gradient"
        );
    }
}
