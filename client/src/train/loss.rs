//! Fused cross-entropy: per-row `logsumexp(x) − x[target]` in one pass over the logits, and its
//! gradient `g·(softmax(x) − onehot(target))` in one more, instead of candle's chain of
//! log-softmax, gather and their backward passes over the `[rows, vocab]` logits (the largest
//! tensor of a training step). [`head_cross_entropy_rows`] goes further and fuses the output
//! head in, chunk by chunk, so that the whole logits never exist. CPU only; other devices use
//! the unfused ops.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::frozen::{FrozenWeight, frozen_matmul_t};
use crate::model::fused::{LANES, exp, max};

/// Rows of logits computed at a time by [`head_cross_entropy_rows`]: 128 × a 32k vocabulary is
/// 16 MB, which stays in a large L3 between its three passes.
const HEAD_CHUNK_ROWS: usize = 128;

/// Per-row cross-entropy of the logits `hidden·headᵀ` (`hidden` `[rows, hidden]`, `head`
/// `[vocab, hidden]`), differentiable in `hidden`, without ever holding all `[rows, vocab]`
/// logits: rows go through in chunks, each chunk's logits become its loss and, in place, its
/// gradient `softmax − onehot`, which the head turns into the chunk's `∂loss/∂hidden` right away.
/// The backward pass only scales those rows by the incoming gradients. Saves the two largest
/// tensors of a step (logits and their gradient) and four passes over them. With `need_grad`
/// false (evaluation) the gradient work is skipped. CPU f32 with a dense or bf16 head; otherwise
/// the logits are computed whole and go through [`cross_entropy_rows`].
pub fn head_cross_entropy_rows(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    need_grad: bool,
) -> Result<Tensor> {
    let fusable = matches!(
        head,
        FrozenWeight::Dense(_) | FrozenWeight::PackedF32(_) | FrozenWeight::Bf16(_)
    );
    if !fusable || !hidden.device().is_cpu() || hidden.dtype() != candle_core::DType::F32 {
        return cross_entropy_rows(&frozen_matmul_t(hidden, head)?, targets);
    }
    let op = HeadCrossEntropy {
        head: match head {
            FrozenWeight::Dense(weight) => FrozenWeight::Dense(weight.detach()),
            other => other.clone(),
        },
        need_grad: need_grad && hidden.track_op(),
        unit_gradient: Mutex::new(None),
    };
    let (hidden, targets) = (hidden.contiguous()?, targets.contiguous()?);
    Ok(if op.need_grad {
        hidden.apply_op2(&targets, op)?
    } else {
        hidden.apply_op2_no_bwd(&targets, &op)?
    })
}

struct HeadCrossEntropy {
    head: FrozenWeight,
    need_grad: bool,
    /// `(softmax − onehot)·head` per row, `[rows, hidden]`, set by the forward pass.
    unit_gradient: Mutex<Option<Tensor>>,
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let error = |error: crate::error::ClientError| candle_core::Error::Msg(error.to_string());
        let (vocab, head_width) = self.head.dims2().map_err(error)?;
        let (hidden, targets, width) =
            slices(hidden, hidden_layout, targets, targets_layout, Some(vocab))?;
        if head_width != width {
            candle_core::bail!(
                "head-cross-entropy: hidden width {width}, head {vocab}x{head_width}"
            );
        }
        let rows = targets.len();
        let mut losses = Vec::with_capacity(rows);
        let mut unit_gradient = Vec::with_capacity(if self.need_grad { rows * width } else { 0 });
        for first in (0..rows).step_by(HEAD_CHUNK_ROWS) {
            let count = HEAD_CHUNK_ROWS.min(rows - first);
            let chunk = &hidden[first * width..(first + count) * width];
            let mut logits = self.head.product_t(chunk, count).map_err(error)?;
            let chunk_targets = &targets[first..first + count];
            let need_grad = self.need_grad;
            let chunk_losses: Vec<f32> = logits
                .par_chunks_mut(vocab)
                .zip(chunk_targets.par_iter())
                .map(|(row, &target)| row_loss(row, target as usize, need_grad))
                .collect();
            losses.extend(chunk_losses);
            if need_grad {
                unit_gradient.extend(self.head.product(&logits, count).map_err(error)?);
            }
        }
        if self.need_grad {
            let tensor = Tensor::from_vec(unit_gradient, (rows, width), &candle_core::Device::Cpu)?;
            if let Ok(mut slot) = self.unit_gradient.lock() {
                *slot = Some(tensor);
            }
        }
        Ok((CpuStorage::F32(losses), Shape::from(rows)))
    }

    fn bwd(
        &self,
        _hidden: &Tensor,
        _targets: &Tensor,
        _losses: &Tensor,
        grad_losses: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let unit = self.unit_gradient.lock().ok().and_then(|slot| slot.clone());
        let Some(unit) = unit else {
            candle_core::bail!(
                "head-cross-entropy: backward without a forward pass that kept its gradient"
            );
        };
        Ok((Some(unit.broadcast_mul(&grad_losses.unsqueeze(1)?)?), None))
    }
}

/// Negative log-likelihood of `targets` `[rows]` (u32) under `logits` `[rows, vocab]` (f32), per
/// row: `[rows]`, differentiable in the logits.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return Ok(log_probs
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()?);
    }
    Ok(logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropyRows)?)
}

struct CrossEntropyRows;

/// The rows `[rows, width]` (f32) and their targets (u32, one per row, each below `classes`,
/// or below `width` when `None`), checked; returns them with `width`.
fn slices<'a>(
    logits: &'a CpuStorage,
    logits_layout: &Layout,
    targets: &'a CpuStorage,
    targets_layout: &Layout,
    classes: Option<usize>,
) -> candle_core::Result<(&'a [f32], &'a [u32], usize)> {
    let (CpuStorage::F32(logits), CpuStorage::U32(targets)) = (logits, targets) else {
        candle_core::bail!("cross-entropy expects f32 rows and u32 targets");
    };
    let (Some((logit_start, logit_end)), Some((target_start, target_end))) = (
        logits_layout.contiguous_offsets(),
        targets_layout.contiguous_offsets(),
    ) else {
        candle_core::bail!("cross-entropy expects contiguous inputs");
    };
    let (rows, width) = logits_layout.shape().dims2()?;
    if target_end - target_start != rows {
        candle_core::bail!(
            "cross-entropy: {rows} rows, {} targets",
            target_end - target_start
        );
    }
    let targets = &targets[target_start..target_end];
    let vocab = classes.unwrap_or(width);
    if let Some(target) = targets.iter().find(|target| **target as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {target} outside the vocabulary of {vocab}");
    }
    Ok((&logits[logit_start..logit_end], targets, width))
}

/// `(max, Σ exp(x − max))` of a row, in partial sums of [`LANES`], so that the loop vectorises.
#[inline(always)]
fn row_normaliser(row: &[f32]) -> (f32, f32) {
    let max = max(row);
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += exp(value - max);
        }
    }
    let tail: f32 = tail.iter().map(|&value| exp(value - max)).sum();
    (max, lanes.iter().sum::<f32>() + tail)
}

/// One row's loss `log Σ eˣ − x[target]`, and with `need_grad` its unit gradient
/// `softmax − onehot` written over the logits. Compiled for the widest vectors the CPU has
/// (`x86::row_loss`): built for baseline x86-64, the loop of exponentials ran in 128-bit
/// registers. The same IEEE operations per lane in every version, so the same values.
fn row_loss(row: &mut [f32], target: usize, need_grad: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(loss) = x86::row_loss(row, target, need_grad) {
        return loss;
    }
    row_loss_portable(row, target, need_grad)
}

#[inline(always)]
fn row_loss_portable(row: &mut [f32], target: usize, need_grad: bool) -> f32 {
    let (max, sum) = row_normaliser(row);
    let log_sum = sum.ln() + max;
    let loss = log_sum - row[target];
    if need_grad {
        row.iter_mut()
            .for_each(|value| *value = exp(*value - log_sum));
        row[target] -= 1.0;
    }
    loss
}

#[cfg(target_arch = "x86_64")]
#[allow(
    unsafe_code,
    reason = "calls the AVX-512 and AVX2 builds of row_loss where the CPU has them"
)]
mod x86 {
    /// [`super::row_loss_portable`] in AVX-512 or AVX2 registers where the CPU has them.
    pub(super) fn row_loss(row: &mut [f32], target: usize, need_grad: bool) -> Option<f32> {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            Some(unsafe { avx512(row, target, need_grad) })
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            Some(unsafe { avx2(row, target, need_grad) })
        } else {
            None
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512(row: &mut [f32], target: usize, need_grad: bool) -> f32 {
        super::row_loss_portable(row, target, need_grad)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn avx2(row: &mut [f32], target: usize, need_grad: bool) -> f32 {
        super::row_loss_portable(row, target, need_grad)
    }
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, targets, vocab) =
            slices(logits, logits_layout, targets, targets_layout, None)?;
        let losses: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, target)| {
                let (max, sum) = row_normaliser(row);
                sum.ln() + max - row[*target as usize]
            })
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(targets.len())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        losses: &Tensor,
        grad_losses: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gradient = logits.apply_op2_no_bwd(
            &Tensor::stack(
                &[
                    targets.to_dtype(candle_core::DType::F32)?,
                    grad_losses.clone(),
                    losses.clone(),
                ],
                0,
            )?,
            &CrossEntropyGradient,
        )?;
        Ok((Some(gradient), None))
    }
}

/// `∂loss/∂logits = g·(softmax(x) − onehot(target))` per row; the second argument stacks the
/// targets (as f32, exact below 2²⁴), the incoming row gradients `g` and the forward pass's
/// losses, from which `log Σ eˣ = loss + x[target]` comes without another pass over the row.
struct CrossEntropyGradient;

impl CustomOp2 for CrossEntropyGradient {
    fn name(&self) -> &'static str {
        "cross-entropy-gradient"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        side: &CpuStorage,
        side_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(logits), CpuStorage::F32(side)) = (logits, side) else {
            candle_core::bail!("cross-entropy gradient expects f32 inputs");
        };
        let (Some((start, end)), Some((side_start, side_end))) = (
            logits_layout.contiguous_offsets(),
            side_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("cross-entropy gradient expects contiguous inputs");
        };
        let (rows, vocab) = logits_layout.shape().dims2()?;
        let side = &side[side_start..side_end];
        if side.len() != 3 * rows {
            candle_core::bail!("cross-entropy gradient: bad side input");
        }
        let (targets, rest) = side.split_at(rows);
        let (grads, losses) = rest.split_at(rows);
        let mut gradient = vec![0f32; rows * vocab];
        gradient
            .par_chunks_mut(vocab)
            .zip(logits[start..end].par_chunks(vocab))
            .zip(
                targets
                    .par_iter()
                    .zip(grads.par_iter().zip(losses.par_iter())),
            )
            .for_each(|((out, row), (target, (grad, loss)))| {
                let target = *target as usize;
                let log_sum = loss + row[target];
                for (out, value) in out.iter_mut().zip(row) {
                    // x − log Σ eˣ ≤ 0 up to rounding; `exp` clamps the rounding away.
                    *out = exp(value - log_sum) * grad;
                }
                out[target] -= grad;
            });
        Ok((CpuStorage::F32(gradient), Shape::from((rows, vocab))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{Device, Var};

    use super::*;
    use crate::testing::{flat, max_abs_difference};

    #[test]
    fn row_normaliser_sums_every_lane_and_propagates_nan() {
        let (max, sum) = row_normaliser(&[0.0; 37]);
        assert_eq!((max, sum), (0.0, 37.0));
        assert!(row_normaliser(&[1.0, f32::NAN, 2.0]).1.is_nan());
    }

    /// Every build of `row_loss` this CPU runs gives the portable build's values, bit for bit.
    #[test]
    fn row_loss_builds_agree_bit_for_bit() {
        let row: Vec<f32> = (0..1003u32)
            .map(|index| (index.wrapping_mul(2_654_435_761) % 20_011) as f32 / 997.0 - 9.0)
            .collect();
        for need_grad in [false, true] {
            let (mut portable, mut dispatched) = (row.clone(), row.clone());
            let expected = row_loss_portable(&mut portable, 17, need_grad);
            let got = row_loss(&mut dispatched, 17, need_grad);
            assert_eq!(expected.to_bits(), got.to_bits());
            assert!(
                portable
                    .iter()
                    .zip(&dispatched)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert_eq!(
                need_grad,
                portable != row,
                "the gradient is written only when asked"
            );
        }
    }

    /// The AVX-512 and AVX2 builds, each where the CPU has it, give the portable build's values
    /// bit for bit (the dispatcher above picks only one of them).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[allow(
        unsafe_code,
        reason = "each build is called only where the CPU has its features"
    )]
    fn every_simd_build_of_row_loss_agrees_bit_for_bit() {
        let row: Vec<f32> = (0..1003u32)
            .map(|index| (index.wrapping_mul(40_503) % 20_011) as f32 / 997.0 - 9.0)
            .collect();
        for need_grad in [false, true] {
            let mut portable = row.clone();
            let expected = row_loss_portable(&mut portable, 17, need_grad);
            let mut builds = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut out = row.clone();
                // SAFETY: the CPU has AVX-512F (checked just above).
                let loss = unsafe { x86::avx512(&mut out, 17, need_grad) };
                builds.push(("avx512", loss, out));
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut out = row.clone();
                // SAFETY: the CPU has AVX2 (checked just above).
                let loss = unsafe { x86::avx2(&mut out, 17, need_grad) };
                builds.push(("avx2", loss, out));
            }
            for (name, loss, out) in builds {
                assert_eq!(loss.to_bits(), expected.to_bits(), "{name}");
                assert!(
                    out.iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}"
                );
            }
        }
    }

    /// The chunked head + loss against the whole logits through `cross_entropy_rows`: same
    /// losses and the same gradient in the hidden states, for a dense and a bf16 head, over more
    /// rows than one chunk and with unequal row weights.
    #[test]
    fn head_cross_entropy_equals_logits_then_loss() {
        let device = Device::Cpu;
        let (rows, width, vocab) = (2 * HEAD_CHUNK_ROWS + 7, 24, 50);
        let hidden =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, width), &device).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 0.5, (vocab, width), &device).unwrap();
        let targets: Vec<u32> = (0..rows as u32)
            .map(|row| (row * 7) % vocab as u32)
            .collect();
        let targets = Tensor::new(targets.as_slice(), &device).unwrap();
        let row_weights = Tensor::rand(0f32, 1.0, rows, &device).unwrap();
        let dense = FrozenWeight::Dense(weight);
        // bf16 rounds the gradient before the row weights scale it here, after there: the two
        // agree to bf16's precision, not to f32's.
        for (head, tolerance) in [(dense.clone(), 1e-4), (dense.packed_bf16().unwrap(), 1e-2)] {
            let expected = cross_entropy_rows(
                &frozen_matmul_t(hidden.as_tensor(), &head).unwrap(),
                &targets,
            )
            .unwrap();
            let got = head_cross_entropy_rows(hidden.as_tensor(), &head, &targets, true).unwrap();
            let no_grad =
                head_cross_entropy_rows(&hidden.as_tensor().detach(), &head, &targets, false)
                    .unwrap();
            assert!(max_abs_difference(&flat(&expected), &flat(&got)) < 1e-4);
            assert_eq!(flat(&got), flat(&no_grad));
            let weighted = |losses: &Tensor| (losses * &row_weights).unwrap().sum_all().unwrap();
            let expected = weighted(&expected).backward().unwrap();
            let got = weighted(&got).backward().unwrap();
            let (expected, got) = (
                flat(expected.get(hidden.as_tensor()).unwrap()),
                flat(got.get(hidden.as_tensor()).unwrap()),
            );
            let norm = expected.iter().map(|g| g * g).sum::<f32>().sqrt();
            let error = expected
                .iter()
                .zip(&got)
                .map(|(e, g)| (e - g).powi(2))
                .sum::<f32>()
                .sqrt();
            assert!(
                norm > 1.0 && error < tolerance * norm,
                "gradient error {error}, norm {norm}"
            );
        }
    }

    #[test]
    fn fused_loss_and_gradient_equal_candles_unfused_ops() {
        let device = Device::Cpu;
        let logits =
            Var::from_tensor(&(Tensor::randn(0f32, 3.0, (6, 50), &device).unwrap())).unwrap();
        let targets = Tensor::new(&[0u32, 49, 7, 7, 23, 1], &device).unwrap();
        let weights = Tensor::new(&[1f32, 0.0, 2.0, 1.0, 0.5, 3.0], &device).unwrap();

        let fused = cross_entropy_rows(logits.as_tensor(), &targets).unwrap();
        let log_probs = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let unfused = log_probs
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_abs_difference(&flat(&unfused), &flat(&fused)) < 1e-5);

        let gradient = |rows: &Tensor| {
            let grads = (rows * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            flat(grads.get(logits.as_tensor()).unwrap())
        };
        assert!(max_abs_difference(&gradient(&unfused), &gradient(&fused)) < 1e-5);
        assert!(
            cross_entropy_rows(
                logits.as_tensor(),
                &Tensor::new(&[50u32; 6], &device).unwrap()
            )
            .is_err()
        );
    }
}
