//! Fused CPU kernels, with their backward passes, for the element-wise parts of a Llama block:
//! RMSNorm, rotary embeddings and SwiGLU (attention is one op of its own, `attention.rs`, built
//! on the softmax and reductions here). candle composes each from five to ten tensor ops (each
//! a pass over memory, an allocation and a hand-off to the thread pool) and as many more in the
//! backward pass; candle-nn's own fused versions have no backward pass and would cut the
//! gradient. Here each is one parallel pass forward and one backward. The callers use these on
//! CPU f32 tensors and candle's ops elsewhere.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{ClientError, Result};

/// Defines `$name`, which runs `$portable` compiled for the widest vectors the CPU has: built for
/// baseline x86-64, its loops (exponentials included) run in 128-bit registers. The portable
/// code is inlined into functions compiled with AVX-512F or AVX2, so each lane does the same
/// IEEE operations and the values are the same (as `train::loss` does for its rows). Used here
/// and in `attention.rs`.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* fn $name:ident = $portable:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(
            unsafe_code,
            reason = "calls a build for AVX-512F or AVX2 after the run-time check that the CPU \
                      has it"
        )]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use widest_vectors;

/// `eˣ` for `x ≤ 0` (softmax arguments `x − max`), within 2e-7 relative; NaN stays NaN.
/// Branch-free (Cephes' `expf`: `2ⁿ·p(r)` with `r = x − n·ln 2`), so that loops over slices
/// vectorise, where libm's `expf` is a scalar call.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Written as comparisons, not f32::max, so that a NaN passes through.
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 0.0 { 0.0 } else { x };
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: (y + ROUND) − ROUND rounds y to an integer
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n ∈ [−126, 0]: the biased exponent n + 127 is a normal one. `shifted` lies in
    // [2²³, 2²⁴), where its ulp is 1, so its bits are those of ROUND plus n: the exponent comes
    // from integer ops on those bits, which vectorise, where `n as i32` (saturating, NaN to 0)
    // compiled to a scalar conversion and a NaN check per lane.
    const ROUND_BITS: u32 = 0x4B40_0000; // ROUND.to_bits()
    y * f32::from_bits(shifted.to_bits().wrapping_sub(ROUND_BITS - 127) << 23)
}

/// Lanes of the reductions below: one 512-bit register of f32.
pub(crate) const LANES: usize = 16;

/// Folds `values` into [`LANES`] independent accumulators, then those into one: a loop the
/// compiler vectorises, where a single running `f32` (a chain of dependent additions, which it
/// may not reorder) stays scalar.
#[inline(always)]
fn reduce_lanes(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, value);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(init, |acc, &value| f(acc, value))
}

/// The largest of `values` (−∞ for none; NaNs are passed over).
#[inline(always)]
pub(crate) fn max(values: &[f32]) -> f32 {
    reduce_lanes(values, f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// `Σ values`, summed in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    reduce_lanes(values, 0.0, |total, v| total + v)
}

/// `Σ a⊙b` for `a` and `b` of equal length, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    let rest: f32 = a_rest.iter().zip(b_rest).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + rest
}

/// `Σ a⊙b⊙c` for slices of equal length, in [`LANES`] partial sums.
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    debug_assert!(
        a.len() == b.len() && b.len() == c.len(),
        "dot3 of unequal lengths"
    );
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks, c_chunks) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (a_rest, b_rest, c_rest) = (
        a_chunks.remainder(),
        b_chunks.remainder(),
        c_chunks.remainder(),
    );
    for ((a, b), c) in a_chunks.zip(b_chunks).zip(c_chunks) {
        for (((lane, a), b), c) in lanes.iter_mut().zip(a).zip(b).zip(c) {
            *lane += a * b * c;
        }
    }
    let rest: f32 = a_rest
        .iter()
        .zip(b_rest)
        .zip(c_rest)
        .map(|((a, b), c)| a * b * c)
        .sum();
    lanes.iter().sum::<f32>() + rest
}

/// `softmax(scale·row)` in place, for `scale > 0`: the exponentials in one vectorised pass, the
/// maximum and sum in lanes.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32], scale: f32) {
    let max = max(row);
    row.iter_mut().for_each(|v| *v = exp(scale * (*v - max)));
    let inverse = 1.0 / sum(row);
    row.iter_mut().for_each(|v| *v *= inverse);
}

/// The contiguous f32 values of a CPU tensor argument.
pub(super) fn values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op} expects f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous tensor");
    };
    Ok(&values[start..end])
}

/// Rows per parallel task: enough work to cover a task's hand-off.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// A new `[.., row_len]` buffer whose rows are computed in parallel: `f(row, out, a, b)` fills
/// row `row` of the output from the same rows of `a` and `b` (`b` empty when not given).
fn map_rows(
    a: &[f32],
    b: Option<&[f32]>,
    row_len: usize,
    f: impl Fn(usize, &mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let rows = rows_per_task(row_len);
    let chunk = rows * row_len.max(1);
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .enumerate()
        .for_each(|(task, (out, a))| {
            let b = b.map_or(&[][..], |b| {
                &b[task * chunk..(task * chunk + a.len()).min(b.len())]
            });
            for (index, (out, a_row)) in out.chunks_mut(row_len).zip(a.chunks(row_len)).enumerate()
            {
                let b_row = b.get(index * row_len..(index + 1) * row_len).unwrap_or(&[]);
                f(task * rows + index, out, a_row, b_row);
            }
        });
    out
}

/// `op(x)`, recorded for the backward pass when `x` is part of a graph.
fn apply1(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    })
}

/// `x / √(mean(x²) + ε) · w` over the last dimension; `w` is frozen (no gradient).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm {
        weight: weight.flatten_all()?.to_vec1::<f32>()?,
        eps: eps as f32,
    };
    apply1(x, op)
}

struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

/// `1/√(mean(row²) + ε)`, the sum of squares in [`LANES`] partial sums.
#[inline(always)]
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt()
}

widest_vectors! {
    /// One row of RMSNorm: `out = row·r⊙w`.
    fn rms_norm_row = rms_norm_row_portable(out: &mut [f32], row: &[f32], weight: &[f32], eps: f32)
}

#[inline(always)]
fn rms_norm_row_portable(out: &mut [f32], row: &[f32], weight: &[f32], eps: f32) {
    let r = inverse_rms(row, eps);
    for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
        *o = v * r * w;
    }
}

widest_vectors! {
    /// One row of RMSNorm's input gradient ([`RmsNormBackward`]).
    fn rms_norm_backward_row = rms_norm_backward_row_portable(
        dx: &mut [f32],
        row: &[f32],
        dy: &[f32],
        weight: &[f32],
        eps: f32,
    )
}

#[inline(always)]
fn rms_norm_backward_row_portable(
    dx: &mut [f32],
    row: &[f32],
    dy: &[f32],
    weight: &[f32],
    eps: f32,
) {
    let r = inverse_rms(row, eps);
    let correction = r * r * r * dot3(row, dy, weight) / row.len() as f32;
    for (((d, x), g), w) in dx.iter_mut().zip(row).zip(dy).zip(weight) {
        *d = r * w * g - x * correction;
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(storage, layout, self.name())?;
        let hidden = self.weight.len();
        if layout.shape().dims().last() != Some(&hidden) {
            candle_core::bail!("rms-norm: last dimension is not the weight's {hidden}");
        }
        let out = map_rows(x, None, hidden, |_, out, row, _| {
            rms_norm_row(out, row, &self.weight, self.eps);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = RmsNormBackward {
            forward: RmsNorm {
                weight: self.weight.clone(),
                eps: self.eps,
            },
        };
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &op)?))
    }
}

/// `∂L/∂x = r·w⊙dy − x·r³·mean(w⊙dy⊙x)` with `r = 1/√(mean(x²) + ε)`.
struct RmsNormBackward {
    forward: RmsNorm,
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(x, x_layout, self.name())?;
        let dy = values(dy, dy_layout, self.name())?;
        let weight = &self.forward.weight;
        let hidden = weight.len();
        if x.len() != dy.len() || x.len() % hidden.max(1) != 0 {
            candle_core::bail!("rms-norm-backward: shapes differ");
        }
        let dx = map_rows(x, Some(dy), hidden, |_, dx, row, dy| {
            rms_norm_backward_row(dx, row, dy, weight, self.forward.eps);
        });
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }
}

/// Where the documents packed into a batch's rows start: for each row `b` and position `i` of a
/// `[batch, seq]` batch, the first position of the document holding `i` (0 in a row's first
/// document). Attention is block-diagonal along them, and rotary positions restart at each,
/// as transformers treats packed sequences given `position_ids` (padding-free packing).
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentStarts {
    starts: Arc<Vec<u32>>,
    batch: usize,
    seq_len: usize,
}

impl DocumentStarts {
    /// `starts` is `[batch, seq_len]` row-major; each position starts a document (its own index)
    /// or continues the one before it (that one's start).
    pub fn new(starts: Vec<u32>, batch: usize, seq_len: usize) -> Result<Self> {
        if starts.len() != batch * seq_len {
            return Err(ClientError::InvalidArgument(format!(
                "{} document starts for a [{batch}, {seq_len}] batch",
                starts.len()
            )));
        }
        for (row, row_starts) in starts.chunks(seq_len.max(1)).enumerate() {
            for (position, &start) in row_starts.iter().enumerate() {
                let continues = position > 0 && start == row_starts[position - 1];
                if start as usize != position && !continues {
                    return Err(ClientError::InvalidArgument(format!(
                        "row {row} position {position}: document start {start} neither starts \
                         a document there nor continues the one before"
                    )));
                }
            }
        }
        Ok(Self {
            starts: Arc::new(starts),
            batch,
            seq_len,
        })
    }

    /// `(batch, seq_len)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.seq_len)
    }

    /// The first position of the document holding `position` of row `row`.
    pub fn start(&self, row: usize, position: usize) -> usize {
        self.starts[row * self.seq_len + position] as usize
    }

    /// Every position's place in its own document, `[batch, seq_len]` row-major: the rotary
    /// position it takes.
    pub fn positions(&self) -> Vec<u32> {
        self.starts
            .iter()
            .enumerate()
            .map(|(index, &start)| (index % self.seq_len) as u32 - start)
            .collect()
    }
}

/// Rotary embeddings in Hugging Face's rotate-half layout, applied to `x` `[batch, t, heads, d]`
/// (as the projections write it) at positions `offset..offset + t`: for `j < d/2`,
/// `(x_j, x_{j+d/2})` is rotated by the angle in the tables `cos`/`sin` (`[positions, d]`, each
/// angle twice, as `Rope` builds them).
///
/// With `documents` (then `offset` is 0), position `i` of batch row `b` takes its place in its
/// own document, `i − start`, instead.
pub fn rope(
    x: &Tensor,
    tables: &RopeTables,
    offset: usize,
    documents: Option<&DocumentStarts>,
) -> Result<Tensor> {
    let op = RopeOp {
        tables: tables.clone(),
        offset,
        documents: documents.cloned(),
        inverse: false,
    };
    apply1(x, op)
}

/// `cos` and `sin` of every position's angles, `[positions, d]` row-major.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub head_dim: usize,
}

struct RopeOp {
    tables: RopeTables,
    offset: usize,
    documents: Option<DocumentStarts>,
    /// Rotate by the negated angles: the backward pass (a rotation's transpose).
    inverse: bool,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(storage, layout, self.name())?;
        let d = self.tables.head_dim;
        let &[batch, seq_len, heads, last] = layout.shape().dims() else {
            candle_core::bail!("rope expects [batch, seq, heads, head_dim]");
        };
        let half = d / 2;
        if last != d || !d.is_multiple_of(2) || (self.offset + seq_len) * d > self.tables.cos.len()
        {
            candle_core::bail!(
                "rope: [.., {seq_len}, .., {last}] at offset {} outside the tables",
                self.offset
            );
        }
        if let Some(documents) = &self.documents
            && (self.offset != 0 || documents.dims() != (batch, seq_len))
        {
            candle_core::bail!(
                "rope: document starts of a {:?} batch for [{batch}, {seq_len}, ..] at offset {}",
                documents.dims(),
                self.offset
            );
        }
        let documents = self.documents.as_ref();
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let out = map_rows(x, None, d, |row_index, out, x, _| {
            let (row, index) = (row_index / heads / seq_len, row_index / heads % seq_len);
            let start = documents.map_or(0, |documents| documents.start(row, index));
            let position = self.offset + index - start;
            let cos = &self.tables.cos[position * d..position * d + half];
            let sin = &self.tables.sin[position * d..position * d + half];
            rope_row(out, x, cos, sin, sign);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = RopeOp {
            tables: self.tables.clone(),
            offset: self.offset,
            documents: self.documents.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

widest_vectors! {
    /// One row of rotary embedding (rotate-half layout): `y = x·cos + rotate_half(x)·sign·sin`,
    /// `cos` and `sin` half a row long.
    fn rope_row = rope_row_portable(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], sign: f32)
}

#[inline(always)]
fn rope_row_portable(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    debug_assert!(x.len() == 2 * half && y.len() == x.len() && sin.len() == half);
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for ((((y1, y2), (&x1, &x2)), &c), &s) in y1
        .iter_mut()
        .zip(y2.iter_mut())
        .zip(x1.iter().zip(x2))
        .zip(cos)
        .zip(sin)
    {
        let s = sign * s;
        *y1 = x1 * c - x2 * s;
        *y2 = x2 * c + x1 * s;
    }
}

/// `silu(gate)·up` (SwiGLU), differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    Ok(if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, SwiGlu)?
    } else {
        gate.apply_op2_no_bwd(&up, &SwiGlu)?
    })
}

struct SwiGlu;

/// `σ(g)` through `exp(−|g|)`, the range the fast `exp` covers.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    let e = exp(-g.abs());
    let s = 1.0 / (1.0 + e);
    if g >= 0.0 { s } else { e * s }
}

widest_vectors! {
    /// `out = silu(gate)·up`, element by element.
    fn swiglu_values = swiglu_values_portable(out: &mut [f32], gate: &[f32], up: &[f32])
}

#[inline(always)]
fn swiglu_values_portable(out: &mut [f32], gate: &[f32], up: &[f32]) {
    debug_assert!(out.len() == gate.len() && gate.len() == up.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

widest_vectors! {
    /// SwiGLU's two input gradients, element by element ([`SwiGluBackward`]).
    fn swiglu_backward_values = swiglu_backward_values_portable(
        d_gate: &mut [f32],
        d_up: &mut [f32],
        gate: &[f32],
        up: &[f32],
        dy: &[f32],
    )
}

#[inline(always)]
fn swiglu_backward_values_portable(
    d_gate: &mut [f32],
    d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
) {
    debug_assert!(
        [d_up.len(), gate.len(), up.len(), dy.len()]
            .iter()
            .all(|&len| len == d_gate.len())
    );
    for ((((dg, du), &g), &u), &d) in d_gate
        .iter_mut()
        .zip(d_up.iter_mut())
        .zip(gate)
        .zip(up)
        .zip(dy)
    {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

fn same_len<'a>(
    a: (&'a CpuStorage, &Layout),
    b: (&'a CpuStorage, &Layout),
    op: &str,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (values(a.0, a.1, op)?, values(b.0, b.1, op)?);
    if a.len() != b.len() {
        candle_core::bail!("{op}: shapes differ");
    }
    Ok((a, b))
}

const ELEMENTS_PER_TASK: usize = 16_384;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = same_len((gate, gate_layout), (up, up_layout), self.name())?;
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(
                gate.par_chunks(ELEMENTS_PER_TASK)
                    .zip(up.par_chunks(ELEMENTS_PER_TASK)),
            )
            .for_each(|(out, (gate, up))| swiglu_values(out, gate, up));
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass computes both gradients, stacked: [2, ...]. The inputs go in as they are (a
        // three-input op), not stacked: stacking copied both, on one thread.
        let grads = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &dy.contiguous()?,
            &SwiGluBackward,
        )?;
        Ok((Some(grads.get(0)?), Some(grads.get(1)?)))
    }
}

/// `[∂L/∂gate, ∂L/∂up]`, stacked, from `gate`, `up` and `dy`:
/// `∂L/∂up = dy·silu(g)`, `∂L/∂gate = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = same_len((gate, gate_layout), (up, up_layout), self.name())?;
        let dy = values(dy, dy_layout, self.name())?;
        if gate.len() != dy.len() {
            candle_core::bail!("swiglu-backward: shapes differ");
        }
        let mut grads = vec![0f32; 2 * dy.len()];
        let (d_gate, d_up) = grads.split_at_mut(dy.len());
        d_gate
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(d_up.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(
                gate.par_chunks(ELEMENTS_PER_TASK)
                    .zip(up.par_chunks(ELEMENTS_PER_TASK)),
            )
            .zip(dy.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(((d_gate, d_up), (gate, up)), dy)| {
                swiglu_backward_values(d_gate, d_up, gate, up, dy);
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.dims());
        Ok((CpuStorage::F32(grads), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{D, Device, Var};

    use super::*;
    use crate::testing::{assert_same_as_composed, flat, max_abs_difference};

    /// Values in [−4, 4] with every kind of mantissa.
    fn spread(len: usize, seed: u32) -> Vec<f32> {
        crate::testing::hashed_values(len, seed, 80_001, 10_000.0, -4.0)
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Each `widest_vectors!` function gives its portable code's values bit for bit: the
    /// dispatcher runs the AVX-512 or AVX2 build where the CPU has one, the direct call the
    /// baseline build. Lengths past several 16-lane chunks and not a multiple of 16.
    #[test]
    fn every_widest_vectors_build_agrees_with_the_portable_one_bit_for_bit() {
        for len in [1, 15, 33, 200] {
            let (x, dy, weight) = (spread(len, 1), spread(len, 2), spread(len, 3));
            let (mut fast, mut portable) = (vec![0f32; len], vec![0f32; len]);
            rms_norm_row(&mut fast, &x, &weight, 1e-5);
            rms_norm_row_portable(&mut portable, &x, &weight, 1e-5);
            assert_eq!(bits(&fast), bits(&portable), "rms_norm_row, {len}");
            rms_norm_backward_row(&mut fast, &x, &dy, &weight, 1e-5);
            rms_norm_backward_row_portable(&mut portable, &x, &dy, &weight, 1e-5);
            assert_eq!(bits(&fast), bits(&portable), "rms_norm_backward_row, {len}");
            swiglu_values(&mut fast, &x, &dy);
            swiglu_values_portable(&mut portable, &x, &dy);
            assert_eq!(bits(&fast), bits(&portable), "swiglu_values, {len}");
            let (mut fast_up, mut portable_up) = (vec![0f32; len], vec![0f32; len]);
            swiglu_backward_values(&mut fast, &mut fast_up, &x, &dy, &weight);
            swiglu_backward_values_portable(&mut portable, &mut portable_up, &x, &dy, &weight);
            assert_eq!(
                bits(&fast),
                bits(&portable),
                "swiglu_backward_values, {len}"
            );
            assert_eq!(
                bits(&fast_up),
                bits(&portable_up),
                "swiglu_backward_values, {len}"
            );
        }
        for half in [1, 8, 33, 64] {
            let (x, cos, sin) = (spread(2 * half, 4), spread(half, 5), spread(half, 6));
            let (mut fast, mut portable) = (vec![0f32; 2 * half], vec![0f32; 2 * half]);
            for sign in [1.0, -1.0] {
                rope_row(&mut fast, &x, &cos, &sin, sign);
                rope_row_portable(&mut portable, &x, &cos, &sin, sign);
                assert_eq!(bits(&fast), bits(&portable), "rope_row, {half}");
            }
        }
    }

    #[test]
    fn fast_exp_is_within_two_tenths_of_a_micro_relative_and_keeps_nan() {
        let mut worst = 0f64;
        for step in 0..=870_000 {
            let x = -(step as f32) * 1e-4;
            let expected = f64::from(x).exp();
            let error = (f64::from(exp(x)) - expected).abs() / expected;
            worst = worst.max(error);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1e-37);
    }

    /// The exponent taken from `shifted`'s bits is the one `n as i32` gave: same bits for every
    /// x in the clamped range, at its ends and beyond them.
    #[test]
    fn fast_exp_exponent_from_bits_equals_the_integer_conversion() {
        fn by_conversion(x: f32) -> f32 {
            let x = if x < -87.0 { -87.0 } else { x };
            let x = if x > 0.0 { 0.0 } else { x };
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
            let mut p = 1.987_569_1e-4_f32;
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                p = p * r + c;
            }
            (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let edges = [
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            -86.9,
            -87.0,
            -87.1,
            -1e6,
            f32::MIN,
        ];
        let grid = (0..=2_000_000).map(|step| -(step as f32) * 4.4e-5);
        for x in grid.chain(edges) {
            assert_eq!(exp(x).to_bits(), by_conversion(x).to_bits(), "x = {x}");
        }
    }

    #[test]
    fn rms_norm_matches_candles_ops_in_value_and_gradient() {
        let weight = Tensor::randn(0f32, 1.0, 24, &Device::Cpu).unwrap();
        assert_same_as_composed(
            &[3, 5, 24],
            |x| rms_norm(x, &weight, 1e-5).unwrap(),
            |x| {
                let inverse = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .recip()
                    .unwrap();
                x.broadcast_mul(&inverse)
                    .unwrap()
                    .broadcast_mul(&weight)
                    .unwrap()
            },
        );
    }

    #[test]
    fn rope_matches_rotate_half_in_value_and_gradient() {
        let (positions, d, offset, seq) = (12, 8, 3, 5);
        let angles: Vec<f32> = (0..positions * d)
            .map(|i| (i / d) as f32 * 0.3 / (1 + i % (d / 2)) as f32)
            .collect();
        let table = |f: fn(f32) -> f32| angles.iter().map(|&a| f(a)).collect::<Vec<_>>();
        let tables = RopeTables {
            cos: Arc::new(table(f32::cos)),
            sin: Arc::new(table(f32::sin)),
            head_dim: d,
        };
        let cos = Tensor::from_vec(table(f32::cos), (positions, d), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(table(f32::sin), (positions, d), &Device::Cpu).unwrap();
        let (cos, sin) = (
            cos.narrow(0, offset, seq).unwrap(),
            sin.narrow(0, offset, seq).unwrap(),
        );
        let (cos, sin) = (
            cos.reshape((seq, 1, d)).unwrap(),
            sin.reshape((seq, 1, d)).unwrap(),
        );
        assert_same_as_composed(
            &[2, seq, 3, d],
            |x| rope(x, &tables, offset, None).unwrap(),
            |x| {
                let first = x.narrow(D::Minus1, 0, d / 2).unwrap();
                let second = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
                let rotated = Tensor::cat(&[&second.neg().unwrap(), &first], D::Minus1).unwrap();
                (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn swiglu_matches_silu_times_up_in_value_and_both_gradients() {
        let up =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 9), &Device::Cpu).unwrap()).unwrap();
        assert_same_as_composed(
            &[4, 9],
            |g| swiglu(&(g * 4.0).unwrap(), up.as_tensor()).unwrap(),
            |g| ((g * 4.0).unwrap().silu().unwrap() * up.as_tensor()).unwrap(),
        );
        // ∂L/∂up with L = Σ swiglu(g, up): silu(g).
        let gate = Tensor::new(&[[-30.0f32, -1.0, 0.0, 2.0, 30.0]], &Device::Cpu).unwrap();
        let up =
            Var::from_tensor(&Tensor::ones((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        let grads = swiglu(&gate, up.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let expected = flat(&gate.silu().unwrap());
        let got = flat(grads.get(up.as_tensor()).unwrap());
        assert!(
            max_abs_difference(&expected, &got) < 1e-6,
            "{expected:?} vs {got:?}"
        );
    }
}
