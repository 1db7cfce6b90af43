//! `x·Wᵀ` for a frozen weight W whose backward pass computes only ∂L/∂x. W is dense (a candle
//! tensor), quantized (QLoRA: GGUF block types such as Q8_0, dequantized for the backward pass
//! and for the forward pass of many rows; candle's own quantized matmul, used for a few rows,
//! passes no gradient to its input at all), or packed for `packed_gemm`: in f32 (exact products,
//! on CPUs with AVX-512F or with AVX2 and FMA), or in bf16 (both products in bf16 with f32
//! accumulation, as PyTorch's bf16 autocast).
//!
//! candle's released matmul backward always computes the gradients of both operands, so every
//! frozen projection (and the vocabulary-sized `lm_head`) would cost a full weight-gradient
//! product per step that nobody reads (the vendored copy skips a side that tracks no op, so the
//! paths below that use the plain matmul keep no such gradient: vendor/README.md). Here the
//! product is computed without a graph and passed through a custom op whose backward is
//! `∂L/∂x = ∂L/∂y · W`. On devices other than the CPU, and when `x` needs no gradient, the plain
//! matmul is used, except for a few rows (decoding) on the CPU in f32, whose dot products are
//! split over the pool by output (`few_rows_matmul_t`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

use rayon::prelude::*;

use super::packed_gemm::{self, Bf16Pair, PackedB, Word};
use crate::error::Result;

/// A frozen `[out, in]` weight.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    PackedF32(Arc<PackedWeight<f32>>),
    Bf16(Arc<PackedWeight<Bf16Pair>>),
}

/// A frozen `[out, in]` weight packed twice: as `Wᵀ` for the forward product `x·Wᵀ` and as `W`
/// for the input gradient `g·W`. In bf16 that is the f32 weight's memory, in f32 twice it.
#[derive(Debug)]
pub struct PackedWeight<W> {
    forward: PackedB<W>,
    backward: PackedB<W>,
}

impl<W: Word> PackedWeight<W> {
    /// Packs a dense `[out, in]` weight (any float dtype), rounding it as `W` does.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            forward: PackedB::transposed_of(&values, rows, cols),
            backward: PackedB::of(&values, rows, cols),
        })
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.backward.k(), self.backward.n())
    }

    /// The stored values as an f32 tensor.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = self.dims2();
        let mut values = vec![0f32; rows * cols];
        values
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(row, out)| self.backward.row_into(row, out));
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?.to_device(device)?)
    }
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
            Self::PackedF32(weight) => weight.dims2(),
            Self::Bf16(weight) => weight.dims2(),
        })
    }

    /// How the weight is held: `dense` (f32), `dense-bf16` or `dense-f16` (cast tensors),
    /// `quantized`, `packed-f32` or `bf16` (packed).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(tensor) => match tensor.dtype() {
                DType::BF16 => "dense-bf16",
                DType::F16 => "dense-f16",
                _ => "dense",
            },
            Self::Quantized(_) => "quantized",
            Self::PackedF32(_) => "packed-f32",
            Self::Bf16(_) => "bf16",
        }
    }

    /// The weight as a dense f32 tensor.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(tensor) => tensor.to_dtype(DType::F32)?,
            Self::Quantized(tensor) => tensor.dequantize(&tensor.device())?,
            Self::PackedF32(weight) => weight.to_dense(&Device::Cpu)?,
            Self::Bf16(weight) => weight.to_dense(&Device::Cpu)?,
        })
    }

    /// The weight quantized to `dtype` (a dense or bf16 weight is quantized; a quantized one is
    /// kept).
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        Ok(match self {
            Self::Dense(tensor) => Self::Quantized(Arc::new(QTensor::quantize(
                &tensor.to_dtype(DType::F32)?,
                dtype,
            )?)),
            Self::Bf16(_) | Self::PackedF32(_) => {
                Self::Dense(self.dequantize()?).quantized(dtype)?
            }
            Self::Quantized(_) => self.clone(),
        })
    }

    /// `x·Wᵀ` for `rows` rows of `x` (row-major, `in` wide) on the CPU, without a graph:
    /// `[rows, out]`. Packed weights use `packed_gemm`, others candle's matmul.
    pub fn product_t(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (_, inputs) = self.dims2()?;
        check_rows(x, rows, inputs)?;
        Ok(match self {
            Self::PackedF32(weight) => packed_gemm::product(x, rows, &weight.forward),
            Self::Bf16(weight) => packed_gemm::product(x, rows, &weight.forward),
            _ => {
                let x = Tensor::from_slice(x, (rows, inputs), &Device::Cpu)?;
                let weight = self.dequantize()?.to_device(&Device::Cpu)?;
                x.matmul(&weight.t()?)?.flatten_all()?.to_vec1::<f32>()?
            }
        })
    }

    /// `g·W` for `rows` rows of `g` (row-major, `out` wide) on the CPU, without a graph:
    /// `[rows, in]`.
    pub fn product(&self, g: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (outputs, _) = self.dims2()?;
        check_rows(g, rows, outputs)?;
        Ok(match self {
            Self::PackedF32(weight) => packed_gemm::product(g, rows, &weight.backward),
            Self::Bf16(weight) => packed_gemm::product(g, rows, &weight.backward),
            _ => {
                let g = Tensor::from_slice(g, (rows, outputs), &Device::Cpu)?;
                g.matmul(&self.dequantize()?.to_device(&Device::Cpu)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        })
    }

    /// The weight rounded to bf16 and packed for `packed_gemm` (a dense or f32-packed weight
    /// on the CPU; other weights are kept as they are).
    pub fn packed_bf16(&self) -> Result<Self> {
        Ok(match self {
            Self::Dense(tensor) if tensor.device().is_cpu() => {
                Self::Bf16(Arc::new(PackedWeight::new(tensor)?))
            }
            Self::PackedF32(_) => Self::Dense(self.dequantize()?).packed_bf16()?,
            other => other.clone(),
        })
    }

    /// The weight packed in f32 for `packed_gemm`, where this CPU runs its f32 kernel (a dense
    /// weight on the CPU; other weights, and every weight on CPUs with neither AVX-512F nor AVX2
    /// and FMA, are kept as they are).
    pub fn packed_f32(&self) -> Result<Self> {
        Ok(match self {
            Self::Dense(tensor)
                if tensor.device().is_cpu() && packed_gemm::f32_simd_available() =>
            {
                Self::PackedF32(Arc::new(PackedWeight::new(tensor)?))
            }
            other => other.clone(),
        })
    }
}

/// `values` must be `rows` rows of `width`.
fn check_rows(values: &[f32], rows: usize, width: usize) -> Result<()> {
    if values.len() != rows * width {
        return Err(crate::error::ClientError::Unsupported(format!(
            "{} values are not {rows} rows of {width}",
            values.len()
        )));
    }
    Ok(())
}

/// From this many rows on, a quantized weight's forward product dequantizes it and runs an f32
/// GEMM; below, candle's quantized matmul (decoding one token at a time).
const DEQUANTIZED_FORWARD_ROWS: usize = 16;

/// Below this many rows, a dense f32 weight's product without gradients is
/// [`few_rows_matmul_t`]'s (decoding one token at a time per sequence).
const FEW_ROWS: usize = 16;

/// Rows of the weight (outputs) per task of [`few_rows_matmul_t`]: 64 rows 576 wide (SmolLM2)
/// are 144 KiB, read from memory once and kept in L2 while every input row takes its dot
/// products with them.
const FEW_ROWS_OUTPUTS_PER_TASK: usize = 64;

/// `x·Wᵀ` for a few rows of `x` (`[..., in]`) and a dense CPU f32 `weight` `[out, in]`, split
/// over the pool by output. Decoding is bound by reading the weight from memory once per token;
/// candle's GEMM runs a product this thin on one thread (the `gemm` crate's matrix-vector path),
/// which left the other core idle for most of a decoding step. No graph: a caller that needs
/// the input gradient wraps the product ([`frozen_matmul_t`]).
fn few_rows_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &FewRowsMatmulT)?)
}

struct FewRowsMatmulT;

impl CustomOp2 for FewRowsMatmulT {
    fn name(&self) -> &'static str {
        "few-rows-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (outputs, inputs) = weight_layout.shape().dims2()?;
        let mut shape = x_layout.shape().dims().to_vec();
        if inputs == 0 || shape.last() != Some(&inputs) {
            candle_core::bail!(
                "{}: {shape:?} by a [{outputs}, {inputs}] weight",
                self.name()
            );
        }
        let x = super::fused::values(x, x_layout, self.name())?;
        let weight = super::fused::values(weight, weight_layout, self.name())?;
        let rows = x.len() / inputs;
        // Output-major (`[out, rows]`): each task writes one run of it.
        let mut by_output = vec![0f32; outputs * rows];
        by_output
            .par_chunks_mut(FEW_ROWS_OUTPUTS_PER_TASK * rows.max(1))
            .zip(weight.par_chunks(FEW_ROWS_OUTPUTS_PER_TASK * inputs))
            .for_each(|(out, w)| dot_products(out, x, w, inputs));
        let out = if rows == 1 {
            by_output
        } else {
            (0..rows * outputs)
                .map(|index| by_output[(index % outputs) * rows + index / outputs])
                .collect()
        };
        if let Some(last) = shape.last_mut() {
            *last = outputs;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

super::fused::widest_vectors! {
    /// `out[j·rows + r] = x_r · w_j` for every row `w_j` of `w` and `x_r` of `x` (both `inputs`
    /// wide, `inputs > 0`; `rows` = `x`'s rows).
    fn dot_products = dot_products_portable(out: &mut [f32], x: &[f32], w: &[f32], inputs: usize)
}

#[inline(always)]
fn dot_products_portable(out: &mut [f32], x: &[f32], w: &[f32], inputs: usize) {
    let rows = x.len() / inputs;
    for (out, w) in out.chunks_mut(rows.max(1)).zip(w.chunks(inputs)) {
        for (o, x) in out.iter_mut().zip(x.chunks(inputs)) {
            *o = super::fused::dot(x, w);
        }
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

/// `x·Wᵀ` (or, `transposed`, `x·W`) for a packed W; the backward pass of `x·Wᵀ` is the `x·W`
/// op with the incoming gradient as `x`.
struct PackedMatMul<W> {
    weight: Arc<PackedWeight<W>>,
    transposed: bool,
}

impl<W: Word> CustomOp1 for PackedMatMul<W> {
    fn name(&self) -> &'static str {
        "packed-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("packed-frozen-matmul expects f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-frozen-matmul expects a contiguous input");
        };
        let packed = if self.transposed {
            &self.weight.backward
        } else {
            &self.weight.forward
        };
        let mut dims = layout.shape().dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        if k != packed.k() {
            candle_core::bail!(
                "packed-frozen-matmul: input has {k} features, the weight expects {}",
                packed.k()
            );
        }
        let rows = (end - start).checked_div(k).unwrap_or(0);
        let product = packed_gemm::product(&values[start..end], rows, packed);
        if let Some(last) = dims.last_mut() {
            *last = packed.n();
        }
        Ok((CpuStorage::F32(product), Shape::from(dims)))
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _result: &Tensor,
        grad_result: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.transposed {
            // Only first derivatives are taken: the gradient op itself has no backward.
            return Ok(None);
        }
        let op = Self {
            weight: self.weight.clone(),
            transposed: true,
        };
        Ok(Some(grad_result.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// `x·Wᵀ` through [`PackedMatMul`] (CPU f32 activations; elsewhere the unpacked weight).
fn packed_matmul_t<W: Word>(x: &Tensor, packed: &Arc<PackedWeight<W>>) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        let dense = packed.to_dense(x.device())?.to_dtype(x.dtype())?;
        return Ok(x.broadcast_matmul(&dense.t()?)?);
    }
    let op = PackedMatMul {
        weight: packed.clone(),
        transposed: false,
    };
    let x = x.contiguous()?;
    Ok(if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    })
}

/// `x·Wᵀ` with `x` `[..., in]` and a frozen `weight` `[out, in]`.
pub fn frozen_matmul_t(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let product = match weight {
        FrozenWeight::Bf16(packed) => return packed_matmul_t(x, packed),
        FrozenWeight::PackedF32(packed) => return packed_matmul_t(x, packed),
        FrozenWeight::Dense(dense) if dense.dtype() != x.dtype() => {
            // A cast base (bf16 on a GPU): the product in the weight's type, activations and
            // gradients in theirs; `to_dtype` passes the gradient back through both casts.
            return Ok(x
                .to_dtype(dense.dtype())?
                .broadcast_matmul(&dense.t()?)?
                .to_dtype(x.dtype())?);
        }
        FrozenWeight::Dense(dense) => {
            let cpu_f32 = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
            // Decoding; with an unmerged adapter (`generate --adapter`) the input tracks the
            // LoRA factors, and the product below gets its backward pass as any other.
            let few_rows = cpu_f32 && x.elem_count() < FEW_ROWS * dense.dim(1)?;
            if !x.track_op() && few_rows {
                return few_rows_matmul_t(x, dense);
            }
            if !x.track_op() || !cpu_f32 {
                return Ok(x.broadcast_matmul(&dense.t()?)?);
            }
            if few_rows {
                few_rows_matmul_t(&x.detach(), &dense.detach())?
            } else {
                x.detach().broadcast_matmul(&dense.detach().t()?)?
            }
        }
        FrozenWeight::Quantized(quantized) if !x.device().is_cpu() => {
            // The pass-through op exists for the CPU only: elsewhere use the dequantized weight.
            let dense = quantized.dequantize(x.device())?;
            return Ok(x.broadcast_matmul(&dense.t()?)?);
        }
        FrozenWeight::Quantized(quantized) => {
            let (inputs, rows) = (quantized.shape().dims2()?.1, x.elem_count());
            let rows = rows / inputs.max(1);
            // candle's quantized matmul takes one dot product per output and row (with the row
            // rounded to 8 bits): right for decoding, where reading 4-8x fewer weight bytes is
            // what counts, but several times slower than one f32 GEMM over the dequantized
            // weight for the hundreds of rows of a training step (which the backward pass
            // dequantizes for anyway).
            let product = if rows >= DEQUANTIZED_FORWARD_ROWS {
                x.detach()
                    .broadcast_matmul(&quantized.dequantize(&Device::Cpu)?.t()?)?
            } else {
                x.detach()
                    .contiguous()?
                    .apply_op1_no_bwd(quantized.as_ref())?
            };
            if !x.track_op() {
                return Ok(product);
            }
            product
        }
    };
    let weight = match weight {
        FrozenWeight::Dense(dense) => FrozenWeight::Dense(dense.detach()),
        other => other.clone(),
    };
    Ok(x.apply_op2(&product.contiguous()?, InputGradOnly { weight })?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::Var;

    use super::*;
    use crate::testing::{flat, max_abs_difference};

    /// Decoding's few-row product gives candle's matmul values, for one row and several, batched
    /// or not, with a weight whose outputs are not a multiple of a task's.
    #[test]
    fn few_rows_product_matches_matmul() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (131, 37), &device).unwrap();
        let frozen = FrozenWeight::Dense(weight.clone());
        for shape in [vec![1, 37], vec![1, 1, 37], vec![2, 3, 37], vec![15, 37]] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &device).unwrap();
            let expected = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
            let got = few_rows_matmul_t(&x, &weight).unwrap();
            assert_eq!(got.dims(), expected.dims(), "{shape:?}");
            let difference = max_abs_difference(&flat(&expected), &flat(&got));
            assert!(difference < 1e-5, "{shape:?}: {difference}");
            let routed = frozen_matmul_t(&x, &frozen).unwrap();
            assert_eq!(flat(&routed), flat(&got), "{shape:?}");
        }
        // A tracked input (decoding with an unmerged adapter) takes it too, with the input
        // gradient of the product: ∂Σ(x·Wᵀ)/∂x is the sum of W's rows.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 37), &device).unwrap()).unwrap();
        let product = frozen_matmul_t(x.as_tensor(), &frozen).unwrap();
        let plain = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
        assert!(max_abs_difference(&flat(&plain), &flat(&product)) < 1e-5);
        let grads = product.sum_all().unwrap().backward().unwrap();
        let expected = flat(&weight.sum_keepdim(0).unwrap());
        let difference = max_abs_difference(&expected, &flat(grads.get(x.as_tensor()).unwrap()));
        assert!(difference < 1e-5, "input gradient off by {difference}");
        assert!(few_rows_matmul_t(&x.as_tensor().narrow(1, 0, 36).unwrap(), &weight).is_err());
    }

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
        // Six rows: the few-rows product, in another summation order.
        assert!(max_abs_difference(&flat(&plain), &flat(&frozen)) < 1e-5);

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

    /// A quantized weight: many rows (training) multiply the dequantized weight exactly; a few
    /// (decoding) go through candle's quantized matmul, which also rounds the rows to 8 bits and
    /// so lands within that rounding. Either way the input gradient is `g·dequantized(W)`.
    #[test]
    fn quantized_weight_multiplies_its_dequantized_values() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (48, 64), &device).unwrap();
        let frozen = FrozenWeight::Dense(weight)
            .quantized(GgmlDType::Q8_0)
            .unwrap();
        let dequantized = frozen.dequantize().unwrap();
        // Rows counted across the batch: [2, 8, 64] is 16 rows.
        for (batch, per_batch) in [(1, 3), (2, DEQUANTIZED_FORWARD_ROWS / 2), (1, 40)] {
            let rows = batch * per_batch;
            let shape = (batch, per_batch, 64);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device).unwrap()).unwrap();
            let expected = x
                .as_tensor()
                .broadcast_matmul(&dequantized.t().unwrap())
                .unwrap();
            let got = frozen_matmul_t(x.as_tensor(), &frozen).unwrap();
            let error = crate::testing::max_abs_difference(&flat(&expected), &flat(&got));
            let bound = if rows < DEQUANTIZED_FORWARD_ROWS {
                0.5
            } else {
                1e-4
            };
            assert!(error < bound, "{rows} rows: error {error}");
            if rows < DEQUANTIZED_FORWARD_ROWS {
                assert!(
                    error > 1e-4,
                    "{rows} rows: the quantized matmul rounds the rows"
                );
            }
            let target = Tensor::randn(0f32, 1.0, (batch, per_batch, 48), &device).unwrap();
            let grads = (got * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let expected = target.broadcast_matmul(&dequantized).unwrap();
            let error = crate::testing::max_abs_difference(
                &flat(&expected),
                &flat(grads.get(x.as_tensor()).unwrap()),
            );
            assert!(error < 1e-4, "{rows} rows: gradient error {error}");
        }
    }

    /// `x` `[2, 5, 37]` times a `[70, 37]` weight (a partial panel and an odd inner dimension)
    /// packed by `pack`: the product and input gradient agree with candle's matmul of the
    /// original weight within `tolerance` (relative, in norm), and without a graph the op still
    /// computes the product. Returns the original weight, the packed one, `x` and the product.
    fn check_packed(
        pack: impl Fn(&FrozenWeight) -> FrozenWeight,
        tolerance: f32,
    ) -> (Tensor, FrozenWeight, Var, Tensor) {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 37), &device).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (70, 37), &device).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 5, 70), &device).unwrap();
        let packed = pack(&FrozenWeight::Dense(weight.clone()));
        assert_eq!(packed.dims2().unwrap(), (70, 37));
        let reference = x
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap();
        let got = frozen_matmul_t(x.as_tensor(), &packed).unwrap();
        assert_eq!(got.dims(), &[2, 5, 70]);
        let close = |a: &Tensor, b: &Tensor| {
            let scale = crate::testing::squared_norm(a).sqrt();
            let error = crate::testing::squared_norm(&(a - b).unwrap()).sqrt();
            assert!(error < tolerance * scale, "error {error} vs norm {scale}");
        };
        close(&reference, &got);
        let loss = |y: &Tensor| (y * &target).unwrap().sum_all().unwrap();
        let expected = loss(&reference).backward().unwrap();
        let grads = loss(&got).backward().unwrap();
        close(
            expected.get(x.as_tensor()).unwrap(),
            grads.get(x.as_tensor()).unwrap(),
        );
        let plain = frozen_matmul_t(&x.as_tensor().detach(), &packed).unwrap();
        assert_eq!(flat(&plain), flat(&got));
        (weight, packed, x, got)
    }

    #[test]
    fn bf16_weight_gives_rounded_products_and_input_gradient() {
        let (weight, packed, _, _) = check_packed(|w| w.packed_bf16().unwrap(), 1e-2);
        assert!(matches!(packed, FrozenWeight::Bf16(_)));
        // The stored weight is the bf16 rounding of the original.
        let rounded = weight
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(flat(&packed.dequantize().unwrap()), flat(&rounded));
    }

    #[test]
    fn f32_packed_weight_gives_the_dense_products_and_input_gradient() {
        let (weight, packed, x, got) = check_packed(|w| w.packed_f32().unwrap(), 1e-6);
        if !packed_gemm::f32_simd_available() {
            assert_eq!(packed.kind(), "dense", "kept for candle's GEMM");
            return;
        }
        assert_eq!(packed.kind(), "packed-f32");
        assert_eq!(
            flat(&packed.dequantize().unwrap()),
            flat(&weight),
            "unpacking is exact"
        );
        // The slice products agree with the op.
        assert_eq!(
            packed.product_t(&flat(x.as_tensor()), 10).unwrap(),
            flat(&got)
        );
    }
}
