//! The LoRA linear layer: a frozen weight W₀ plus trainable low-rank factors,
//! `y = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ` with s = α/r (α/√r with rsLoRA), and DoRA's variant
//! `y = (m / ‖W₀ + s·B·A‖_row) ⊙ (x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ)`, the norm held constant in the backward
//! pass, as PEFT computes both.

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
    /// DoRA's magnitude `[out]`, PEFT's `lora_magnitude_vector`.
    pub magnitude: Option<Var>,
    /// Probability of zeroing an input of the low-rank path in training.
    pub dropout: f32,
}

impl LoraFactors {
    /// PEFT's initialisation: A kaiming-uniform (a = √5, so U(−1/√in, 1/√in)), B zero, so the
    /// adapted model starts equal to the base. A is drawn as the coordinator draws it
    /// ([`fedlora_proto::factors::lora_a_init`], keyed by seed, layer and module), so the
    /// coordinator knows every round's starting point and a lower rank starts from a prefix.
    pub fn peft_init(
        seed: u64,
        layer: usize,
        module: &str,
        (rank, in_features, out_features): (usize, usize, usize),
        scale: f64,
        device: &Device,
    ) -> Result<Self> {
        let values = fedlora_proto::factors::lora_a_init(seed, layer, module, rank, in_features);
        let a = Var::from_tensor(&Tensor::from_vec(values, (rank, in_features), device)?)?;
        let b = Var::zeros((out_features, rank), DType::F32, device)?;
        Ok(Self {
            a,
            b,
            scale,
            magnitude: None,
            dropout: 0.0,
        })
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
    /// Set while the factors are folded into `weight` (see [`LoraLinear::merge`]): DoRA's row
    /// factor at merge time (1 for plain LoRA), needed to unmerge.
    merged: Option<Tensor>,
    /// The weight was f32-packed before [`LoraLinear::merge`] made it dense: unmerging packs it
    /// again.
    repack: bool,
}

impl LoraLinear {
    pub fn new(weight: impl Into<FrozenWeight>, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.into(),
            bias,
            lora: None,
            merged: None,
            repack: false,
        }
    }

    pub fn in_out(&self) -> (usize, usize) {
        let (out_features, in_features) = self.weight.dims2().unwrap_or((0, 0));
        (in_features, out_features)
    }

    /// Folds the factors into the frozen weight, W ← m/‖·‖ ⊙ (W + s·B·A), so inference costs
    /// what the base costs; the factors are kept for [`LoraLinear::unmerge`]. Dense weights only.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged.is_some() || self.lora.is_none() {
            return Ok(());
        }
        if let FrozenWeight::PackedF32(_) = &self.weight {
            // Unpacking is exact; the merged weight is dense anyway.
            self.weight = FrozenWeight::Dense(self.weight.dequantize()?);
            self.repack = true;
        }
        let FrozenWeight::Dense(weight) = &self.weight else {
            return Err(crate::error::ClientError::Unsupported(
                "merging into a quantized or bf16 base is not supported; load it in f32".into(),
            ));
        };
        let device = weight.device().clone();
        let factor = match self
            .lora
            .as_ref()
            .and_then(|lora| lora.magnitude.as_ref().map(|m| (lora, m)))
        {
            Some((lora, magnitude)) => (magnitude.as_tensor() / self.row_norms(lora)?)?.detach(),
            None => Tensor::ones(weight.dim(0)?, DType::F32, &device)?,
        };
        self.weight = FrozenWeight::Dense(self.merged_weight()?.detach());
        self.merged = Some(factor);
        Ok(())
    }

    /// Undoes [`LoraLinear::merge`]: W ← W / (m/‖·‖) − s·B·A (exact up to rounding).
    pub fn unmerge(&mut self) -> Result<()> {
        let (Some(factor), Some(lora), FrozenWeight::Dense(weight)) =
            (&self.merged, &self.lora, &self.weight)
        else {
            return Ok(());
        };
        let update = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
        let restored = (weight.broadcast_div(&factor.unsqueeze(1)?)? - update)?;
        self.weight = FrozenWeight::Dense(restored.detach());
        self.merged = None;
        if std::mem::take(&mut self.repack) {
            self.weight = self.weight.packed_f32()?;
        }
        Ok(())
    }

    /// Unmerges and drops the factors.
    pub fn detach(&mut self) -> Result<()> {
        self.unmerge()?;
        self.lora = None;
        Ok(())
    }

    /// Whether [`LoraLinear::merge`] can fold factors into this weight (it must be f32).
    pub fn can_merge(&self) -> bool {
        matches!(
            self.weight,
            FrozenWeight::Dense(_) | FrozenWeight::PackedF32(_)
        )
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Attaches `factors` (unmerging any merged before); with `dora`, adds a magnitude initialised
    /// to the row norms of W₀ + s·B·A, so that the layer starts equal to plain LoRA (PEFT's
    /// initialisation).
    pub fn attach(&mut self, mut factors: LoraFactors, dora: bool) -> Result<()> {
        self.unmerge()?;
        factors.magnitude = None;
        if dora {
            let norm = self.row_norms(&factors)?;
            factors.magnitude = Some(Var::from_tensor(&norm)?);
        }
        self.lora = Some(factors);
        Ok(())
    }

    /// ‖W₀ + s·B·A‖ over each output row, `[out]`, detached from the graph.
    fn row_norms(&self, lora: &LoraFactors) -> Result<Tensor> {
        let update = lora.b.as_tensor().matmul(lora.a.as_tensor())?;
        let weight = (self.weight.dequantize()? + (update * lora.scale)?)?;
        Ok(weight.detach().sqr()?.sum(1)?.sqrt()?)
    }

    /// The frozen weight with the LoRA update folded in, W₀ + s·B·A (W₀ without factors), and
    /// with DoRA each row rescaled to its magnitude.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => self.weight.dequantize(),
            Some(_) if self.merged.is_some() => self.weight.dequantize(),
            Some(lora) => {
                let update = lora.b.as_tensor().matmul(lora.a.as_tensor())?;
                let merged = (self.weight.dequantize()? + (update * lora.scale)?)?;
                match &lora.magnitude {
                    None => Ok(merged),
                    Some(magnitude) => {
                        let factor = (magnitude.as_tensor() / self.row_norms(lora)?)?;
                        Ok(merged.broadcast_mul(&factor.unsqueeze(1)?)?)
                    }
                }
            }
        }
    }

    /// Keeps the frozen weight quantized to `dtype` from now on (QLoRA).
    pub fn quantize_weight(&mut self, dtype: GgmlDType) -> Result<()> {
        self.unmerge()?;
        self.weight = self.weight.quantized(dtype)?;
        Ok(())
    }

    /// Keeps the frozen weight in bf16 from now on, multiplied by `packed_gemm` (dense weights on
    /// the CPU; others are kept).
    pub fn pack_weight_bf16(&mut self) -> Result<()> {
        self.unmerge()?;
        self.weight = self.weight.packed_bf16()?;
        Ok(())
    }

    /// Keeps a dense frozen weight as a `dtype` tensor from now on (see `Llama::cast_base`);
    /// other weights are kept.
    pub fn cast_weight(&mut self, dtype: DType) -> Result<()> {
        self.unmerge()?;
        if let FrozenWeight::Dense(weight) = &self.weight {
            self.weight = FrozenWeight::Dense(weight.to_dtype(dtype)?);
        }
        Ok(())
    }

    /// Keeps the frozen weight packed in f32 from now on, multiplied by `packed_gemm` (dense
    /// weights on CPUs with AVX-512F, or AVX2 and FMA; others are kept).
    pub fn pack_weight_f32(&mut self) -> Result<()> {
        self.unmerge()?;
        self.weight = self.weight.packed_f32()?;
        Ok(())
    }

    pub fn frozen_weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// The frozen weight's reduced-precision type (a GGUF block type, or BF16), `None` when
    /// dense f32.
    pub fn quantized_dtype(&self) -> Option<GgmlDType> {
        match &self.weight {
            FrozenWeight::Dense(_) | FrozenWeight::PackedF32(_) => None,
            FrozenWeight::Quantized(weight) => Some(weight.dtype()),
            FrozenWeight::Bf16(_) => Some(GgmlDType::BF16),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x` is `[..., in]`; returns `[..., out]`. No dropout: inference and evaluation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_train(x, None)
    }

    /// As [`LoraLinear::forward`]; with `dropout_seed`, the low-rank path's input goes through
    /// dropout drawn from that seed (training).
    pub fn forward_train(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let base = super::frozen::frozen_matmul_t(x, &self.weight)?;
        let Some(lora) = self.lora.as_ref().filter(|_| self.merged.is_none()) else {
            return self.add_bias(base);
        };
        let dropped = match dropout_seed {
            Some(seed) if lora.dropout > 0.0 => Some(dropout(x, lora.dropout, seed)?),
            _ => None,
        };
        let lora_input = dropped.as_ref().unwrap_or(x);
        let down = lora_input.broadcast_matmul(&lora.a.as_tensor().t()?)?;
        // s·(x·Aᵀ)·Bᵀ as (x·Aᵀ)·(s·B)ᵀ: the scale touches the [out, r] factor, not the
        // [tokens, out] product, forward and backward.
        let up = down.broadcast_matmul(&(lora.b.as_tensor() * lora.scale)?.t()?)?;
        let out = match &lora.magnitude {
            None => (base + up)?,
            Some(magnitude) => {
                // PEFT: base + (m/‖·‖ − 1)·W₀·x̃ + (m/‖·‖)·s·B·A·x̃, x̃ the dropped-out input.
                let factor = (magnitude.as_tensor() / self.row_norms(lora)?)?;
                match &dropped {
                    None => (base + up)?.broadcast_mul(&factor)?,
                    Some(dropped) => {
                        let dropped_base = super::frozen::frozen_matmul_t(dropped, &self.weight)?;
                        let correction = dropped_base.broadcast_mul(&(&factor - 1.0)?)?;
                        ((base + correction)? + up.broadcast_mul(&factor)?)?
                    }
                }
            }
        };
        self.add_bias(out)
    }

    fn add_bias(&self, out: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) => Ok(out.broadcast_add(bias)?),
            None => Ok(out),
        }
    }
}

/// Inverted dropout: each element of `x` zeroed with probability `p`, the rest scaled by
/// 1/(1−p), the mask drawn from `seed` (reproducible, unlike candle's CPU generator).
fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mut rng = seeded_rng(seed);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
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
        linear.lora = Some(LoraFactors {
            a,
            b,
            scale: 0.5,
            magnitude: None,
            dropout: 0.0,
        });
        let x = Tensor::new(&[[[1f32, 3.0]]], &device).unwrap();
        // W0·x = [7, -3, 6]; + bias = [7.5, -3.5, 7]; A·x = 4; 0.5·B·4 = [2, 0, 4].
        let y = output(&linear, &x);
        assert_eq!(y, vec![9.5, -3.5, 11.0]);
    }

    fn output(linear: &LoraLinear, x: &Tensor) -> Vec<f32> {
        crate::testing::flat(&linear.forward(x).unwrap())
    }

    fn layer_with_factors(device: &Device) -> LoraLinear {
        let weight = Tensor::new(&[[1f32, 2.0], [0.0, -1.0], [3.0, 1.0]], device).unwrap();
        let mut linear = LoraLinear::new(weight, None);
        let a = Var::from_tensor(&Tensor::new(&[[1f32, 1.0]], device).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[1f32], [0.0], [2.0]], device).unwrap()).unwrap();
        let factors = LoraFactors {
            a,
            b,
            scale: 0.5,
            magnitude: None,
            dropout: 0.5,
        };
        linear.attach(factors, true).unwrap();
        linear
    }

    #[test]
    fn dora_rescales_each_row_to_its_magnitude() {
        let device = Device::Cpu;
        let linear = layer_with_factors(&device);
        // W₀ + 0.5·B·A = [[1.5, 2.5], [0, -1], [4, 2]]: rows of norm √8.5, 1, √20.
        let magnitude = linear.lora.as_ref().unwrap().magnitude.clone().unwrap();
        let norms = magnitude.as_tensor().to_vec1::<f32>().unwrap();
        for (got, want) in norms.iter().zip([8.5f32.sqrt(), 1.0, 20f32.sqrt()]) {
            assert!((got - want).abs() < 1e-6);
        }
        // At initialisation DoRA equals plain LoRA; with m = (1, 2, 3) row i scales by m_i/‖row_i‖.
        magnitude
            .set(&Tensor::new(&[1f32, 2.0, 3.0], &device).unwrap())
            .unwrap();
        let x = Tensor::new(&[[1f32, 3.0]], &device).unwrap();
        let y = output(&linear, &x);
        let plain = [9.0f32, -3.0, 10.0];
        let want = [
            plain[0] / 8.5f32.sqrt(),
            plain[1] * 2.0,
            plain[2] * 3.0 / 20f32.sqrt(),
        ];
        for (got, want) in y.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{y:?}");
        }
        // The merged weight gives the same output with no factors at all.
        let merged = LoraLinear::new(linear.merged_weight().unwrap(), None);
        let y_merged = output(&merged, &x);
        assert!(crate::testing::max_abs_difference(&y, &y_merged) < 1e-5);
        // Merged in place and unmerged: the same outputs, then the same base weight.
        let mut in_place = linear.clone();
        in_place.merge().unwrap();
        let y_in_place = output(&in_place, &x);
        assert!(crate::testing::max_abs_difference(&y, &y_in_place) < 1e-5);
        in_place.unmerge().unwrap();
        assert!(!in_place.is_merged());
        let y_unmerged = output(&in_place, &x);
        assert!(crate::testing::max_abs_difference(&y, &y_unmerged) < 1e-5);
        // The same on an f32-packed weight: DoRA reads its row norms from the packing, merging
        // unpacks it, unmerging packs it again.
        let mut packed = linear.clone();
        packed.pack_weight_f32().unwrap();
        let kind = packed.frozen_weight().kind();
        assert!(crate::testing::max_abs_difference(&y, &output(&packed, &x)) < 1e-5);
        packed.merge().unwrap();
        assert_eq!(packed.frozen_weight().kind(), "dense");
        assert!(crate::testing::max_abs_difference(&y, &output(&packed, &x)) < 1e-5);
        packed.unmerge().unwrap();
        assert_eq!(packed.frozen_weight().kind(), kind);
        assert!(crate::testing::max_abs_difference(&y, &output(&packed, &x)) < 1e-5);
        // The magnitude gets a gradient; the norm does not feed one back.
        let gradients = linear
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(gradients.get(magnitude.as_tensor()).is_some());
    }

    #[test]
    fn dropout_is_seeded_training_only_and_unbiased() {
        let device = Device::Cpu;
        let x = Tensor::ones((64, 256), DType::F32, &device).unwrap();
        let dropped = dropout(&x, 0.25, 7).unwrap();
        assert_eq!(
            dropped.to_vec2::<f32>().unwrap(),
            dropout(&x, 0.25, 7).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_ne!(
            dropped.to_vec2::<f32>().unwrap(),
            dropout(&x, 0.25, 8).unwrap().to_vec2::<f32>().unwrap()
        );
        let values = dropped.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = values.iter().filter(|value| **value == 0.0).count() as f32;
        assert!((zeros / values.len() as f32 - 0.25).abs() < 0.02);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(
            (mean - 1.0).abs() < 0.03,
            "inverted dropout keeps the mean: {mean}"
        );

        let linear = layer_with_factors(&device);
        let x = Tensor::new(&[[1f32, 3.0]], &device).unwrap();
        let eval = linear.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            linear
                .forward_train(&x, None)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            eval
        );
        let differs = (0..16).any(|seed| {
            linear
                .forward_train(&x, Some(seed))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                != eval
        });
        assert!(differs, "dropout in training changes the low-rank path");
    }
}
