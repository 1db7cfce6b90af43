//! Causal scaled dot-product attention as one CPU op, forward and backward.
//!
//! Composed from candle's ops, attention took three transposing copies of q, k and v into
//! `[batch, heads, seq, head_dim]`, one more of its output back, a `[batch, heads, t, T]` score
//! tensor and its softmax kept for the backward pass, and for each product one small GEMM per
//! `(batch, head)` pair, each split across the threads (candle's batched matmul hands every one
//! of them to the pool). Here the op reads q, k and v where the projections wrote them,
//! `[batch, seq, heads, head_dim]`, writes its output in the same layout (so `o_proj` takes it as
//! it is), and runs one task per `(batch row, key/value head)` on the pool, each with
//! single-threaded GEMMs (the `gemm` crate, which candle uses underneath) over blocks of
//! [`QUERY_BLOCK`] queries and only the keys they can see. Nothing of size `t × T` outlives a
//! block: the backward pass computes the scores and their softmax again (as FlashAttention
//! does), seven products instead of six for attention (a sixth more, a few percent of a step's
//! arithmetic) against no stored scores.
//!
//! Masking is causal: with `t` queries over `T ≥ t` keys (a key/value cache holds the first
//! `T − t` when decoding) query `i` sits at position `T − t + i` and sees keys up to it, or, with
//! [`DocumentStarts`] (then `t = T`), only those of its own document up to itself.
#![allow(
    unsafe_code,
    reason = "the gemm crate's raw-pointer API (strided views into q, k, v), and disjoint writes \
              into one output from several threads"
)]

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::fused::{DocumentStarts, dot, softmax_in_place, values, widest_vectors};
use super::packed_gemm::OutPtr;
use crate::error::Result;

/// Queries per block: a block's scores span only the keys its last query sees, so most of the
/// causal mask's upper triangle is skipped (with 512 positions, 56% of the full product is
/// computed; with 128, 75%). Timing the op alone on two threads: at 512 positions, 16 and 32
/// queries per block were 40% and 15% slower than 64 (the `gemm` crate's fixed cost per call),
/// 128 no faster; at the reference preset's 128 positions, 32, 64 and 128 within noise.
const QUERY_BLOCK: usize = 64;

/// `softmax(scale·q·kᵀ + mask)·v` for `q` `[batch, t, heads, head_dim]` and `k`, `v`
/// `[batch, T, kv_heads, head_dim]` (`heads` a multiple of `kv_heads`: grouped-query attention,
/// query head `h` reading key/value head `h / (heads / kv_heads)`); returns
/// `[batch, t, heads, head_dim]`. CPU f32 only; differentiable in all three. `scale` must be
/// positive (the softmax's exponent takes the row's maximum first).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    documents: Option<&DocumentStarts>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = Attention {
        scale: scale as f32,
        documents: documents.cloned(),
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

struct Attention {
    scale: f32,
    documents: Option<DocumentStarts>,
}

/// The sizes of one call, checked against each other and the document starts.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn of(
        q: &Shape,
        k: &Shape,
        v: &Shape,
        documents: Option<&DocumentStarts>,
    ) -> candle_core::Result<Self> {
        let (&[batch, queries, heads, head_dim], &[k_batch, keys, kv_heads, k_dim]) =
            (q.dims(), k.dims())
        else {
            candle_core::bail!(
                "attention expects q [batch, t, heads, head_dim] and k, v [batch, T, kv_heads, \
                 head_dim], got {q:?} and {k:?}"
            );
        };
        if v.dims() != k.dims()
            || k_batch != batch
            || k_dim != head_dim
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || queries > keys
        {
            candle_core::bail!("attention: q {q:?}, k {k:?} and v {v:?} do not fit together");
        }
        if let Some(documents) = documents
            && (documents.dims() != (batch, queries) || keys != queries)
        {
            candle_core::bail!(
                "attention: document starts of a {:?} batch for q {q:?} over {keys} keys",
                documents.dims()
            );
        }
        Ok(Self {
            batch,
            queries,
            keys,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Where `q`, the output and their gradients hold row `b`, position `i`, head `h`.
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.queries + i) * self.heads + h) * self.head_dim
    }

    /// Where `k`, `v` and their gradients hold row `b`, position `j`, head `g`.
    fn kv_at(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.keys + j) * self.kv_heads + g) * self.head_dim
    }

    /// Row strides of the two layouts, as the `gemm` crate takes them.
    fn q_stride(&self) -> isize {
        (self.heads * self.head_dim) as isize
    }

    fn kv_stride(&self) -> isize {
        (self.kv_heads * self.head_dim) as isize
    }

    /// `values` (q's layout) from row `b`, position `i`, head `h` on, one position per row.
    /// Panics (slice index) if that lies outside `values`.
    fn q_rows(&self, values: &[f32], b: usize, i: usize, h: usize) -> View {
        View::rows(values[self.q_at(b, i, h)..].as_ptr(), self.q_stride())
    }

    /// `values` (k's layout) from row `b`, position `j`, head `g` on, one position per row.
    fn kv_rows(&self, values: &[f32], b: usize, j: usize, g: usize) -> View {
        View::rows(values[self.kv_at(b, j, g)..].as_ptr(), self.kv_stride())
    }
}

/// Which keys each query of a batch row sees.
struct Mask<'a> {
    dims: Dims,
    documents: Option<&'a DocumentStarts>,
}

impl Mask<'_> {
    /// The keys query `i` of batch row `b` sees.
    fn visible(&self, b: usize, i: usize) -> std::ops::Range<usize> {
        let first = self.documents.map_or(0, |d| d.start(b, i));
        first..self.dims.keys - self.dims.queries + i + 1
    }

    /// The keys any query of `rows` sees: from the first query's first key (document starts
    /// never decrease along a row) to the last query's last.
    fn block_keys(&self, b: usize, rows: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        self.visible(b, rows.start).start..self.visible(b, rows.end - 1).end
    }
}

/// A strided matrix view for [`product`]: the element `(r, c)` at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    fn rows(ptr: *const f32, rs: isize) -> Self {
        Self { ptr, rs, cs: 1 }
    }

    fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m × n, row stride dst_rs) = lhs (m × k) · rhs (k × n)`, added to `dst` with `add`;
/// single-threaded (the caller's task is the unit of parallelism).
///
/// # Safety
/// Every element the views and `dst` address for these sizes lies inside a live buffer, `dst`'s
/// written by no one else meanwhile.
#[allow(
    clippy::too_many_arguments,
    reason = "a GEMM's shape, operands and mode"
)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: View,
    rhs: View,
    add: bool,
) {
    // SAFETY: as the caller vouches; `gemm` computes `dst = 1·dst + 1·lhs·rhs` (`add`) or
    // `dst = lhs·rhs`, reading and writing only the addressed elements.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            add,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

widest_vectors! {
    /// The attention probabilities of one block, in place of its raw scores `s`
    /// (`rows × keys.len()`, row-major): row `r` (query `rows.start + r`) gets `softmax(scale·s)`
    /// over its visible keys and 0 elsewhere.
    fn softmax_rows = softmax_rows_portable(
        s: &mut [f32],
        mask: &Mask<'_>,
        b: usize,
        rows: std::ops::Range<usize>,
        keys: &std::ops::Range<usize>,
        scale: f32,
    )
}

widest_vectors! {
    /// `∂L/∂s = scale·p⊙(∂L/∂p − Σⱼ pⱼ·∂L/∂pⱼ)` in place of `∂L/∂p` in `ds`, row by row (`width`
    /// wide; masked keys have `p = 0`, so get 0).
    fn softmax_backward_rows = softmax_backward_rows_portable(
        ds: &mut [f32],
        p: &[f32],
        width: usize,
        scale: f32,
    )
}

#[inline(always)]
fn softmax_backward_rows_portable(ds: &mut [f32], p: &[f32], width: usize, scale: f32) {
    for (ds, p) in ds.chunks_mut(width).zip(p.chunks(width)) {
        let dot = dot(ds, p);
        for (d, &p) in ds.iter_mut().zip(p) {
            *d = scale * p * (*d - dot);
        }
    }
}

#[inline(always)]
fn softmax_rows_portable(
    s: &mut [f32],
    mask: &Mask<'_>,
    b: usize,
    rows: std::ops::Range<usize>,
    keys: &std::ops::Range<usize>,
    scale: f32,
) {
    let width = keys.len();
    for (row, i) in s.chunks_mut(width).zip(rows) {
        let visible = mask.visible(b, i);
        let (lo, hi) = (visible.start - keys.start, visible.end - keys.start);
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        softmax_in_place(&mut row[lo..hi], scale);
    }
}

/// The three inputs' values and their sizes, checked against each other.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: Dims,
}

impl<'a> Inputs<'a> {
    /// Refuses buffers that do not hold exactly `dims`' elements: every pointer offset below
    /// relies on it.
    fn new(q: &'a [f32], k: &'a [f32], v: &'a [f32], dims: Dims) -> candle_core::Result<Self> {
        let kv_len = dims.batch * dims.keys * dims.kv_heads * dims.head_dim;
        if q.len() != dims.batch * dims.queries * dims.heads * dims.head_dim
            || k.len() != kv_len
            || v.len() != kv_len
        {
            candle_core::bail!("attention: buffers do not match {dims:?}");
        }
        Ok(Self { q, k, v, dims })
    }

    /// One block's attention probabilities into `p` (resized): the scores of queries `rows` of
    /// batch row `b`, head `h`, over the keys `keys` of key/value head `g`, then their softmax.
    #[allow(clippy::too_many_arguments, reason = "one block's coordinates")]
    fn probabilities(
        &self,
        mask: &Mask<'_>,
        scale: f32,
        b: usize,
        h: usize,
        g: usize,
        rows: &std::ops::Range<usize>,
        keys: &std::ops::Range<usize>,
        p: &mut Vec<f32>,
    ) {
        let dims = self.dims;
        p.clear();
        p.resize(rows.len() * keys.len(), 0.0);
        let q = dims.q_rows(self.q, b, rows.start, h);
        let k = dims.kv_rows(self.k, b, keys.start, g);
        // SAFETY: q's rows `rows` of head `h` and k's rows `keys` of head `g` lie inside their
        // slices (`Inputs::new` checked the buffers' sizes against `dims`); `p` holds
        // `rows × keys` values and is this task's own.
        unsafe {
            product(
                rows.len(),
                keys.len(),
                dims.head_dim,
                p.as_mut_ptr(),
                keys.len() as isize,
                q,
                k.transposed(),
                false,
            )
        };
        softmax_rows(p, mask, b, rows.clone(), keys, scale);
    }
}

impl Attention {
    fn mask(&self, dims: Dims) -> Mask<'_> {
        Mask {
            dims,
            documents: self.documents.as_ref(),
        }
    }

    /// Every task's `(batch row, key/value head)`.
    fn tasks(dims: Dims) -> impl IndexedParallelIterator<Item = (usize, usize)> {
        (0..dims.batch * dims.kv_heads)
            .into_par_iter()
            .map(move |task| (task / dims.kv_heads, task % dims.kv_heads))
    }

    fn blocks(dims: Dims) -> impl Iterator<Item = std::ops::Range<usize>> {
        (0..dims.queries)
            .step_by(QUERY_BLOCK)
            .map(move |first| first..(first + QUERY_BLOCK).min(dims.queries))
    }

    fn forward(&self, inputs: &Inputs<'_>) -> Vec<f32> {
        let dims = inputs.dims;
        let mask = self.mask(dims);
        let mut out = vec![0f32; inputs.q.len()];
        let shared = OutPtr(out.as_mut_ptr());
        Self::tasks(dims).for_each(|(b, g)| {
            let out = shared;
            let mut p = Vec::new();
            for h in g * dims.group()..(g + 1) * dims.group() {
                for rows in Self::blocks(dims) {
                    let keys = mask.block_keys(b, &rows);
                    inputs.probabilities(&mask, self.scale, b, h, g, &rows, &keys, &mut p);
                    let v = dims.kv_rows(inputs.v, b, keys.start, g);
                    // SAFETY: the output rows `rows` of head `h` in batch row `b` belong to this
                    // task alone (`h` is one of key/value head `g`'s query heads) and lie inside
                    // `out`, as q's do; v's rows `keys` of head `g` lie inside `v`.
                    unsafe {
                        product(
                            rows.len(),
                            dims.head_dim,
                            keys.len(),
                            out.0.add(dims.q_at(b, rows.start, h)),
                            dims.q_stride(),
                            View::rows(p.as_ptr(), keys.len() as isize),
                            v,
                            false,
                        )
                    };
                }
            }
        });
        out
    }

    /// `(∂L/∂q, ∂L/∂k, ∂L/∂v)` given `dy = ∂L/∂out`.
    fn backward(&self, inputs: &Inputs<'_>, dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let dims = inputs.dims;
        let mask = self.mask(dims);
        let mut dq = vec![0f32; inputs.q.len()];
        // Every block adds to the rows of k and v it saw.
        let mut dk = vec![0f32; inputs.k.len()];
        let mut dv = vec![0f32; inputs.v.len()];
        let (dq_out, dk_out, dv_out) = (
            OutPtr(dq.as_mut_ptr()),
            OutPtr(dk.as_mut_ptr()),
            OutPtr(dv.as_mut_ptr()),
        );
        Self::tasks(dims).for_each(|(b, g)| {
            let (dq_out, dk_out, dv_out) = (dq_out, dk_out, dv_out);
            let (mut p, mut ds) = (Vec::new(), Vec::new());
            for h in g * dims.group()..(g + 1) * dims.group() {
                for rows in Self::blocks(dims) {
                    let keys = mask.block_keys(b, &rows);
                    let width = keys.len();
                    inputs.probabilities(&mask, self.scale, b, h, g, &rows, &keys, &mut p);
                    let at_q = dims.q_at(b, rows.start, h);
                    let at_kv = dims.kv_at(b, keys.start, g);
                    let q = dims.q_rows(inputs.q, b, rows.start, h);
                    let k = dims.kv_rows(inputs.k, b, keys.start, g);
                    let v = dims.kv_rows(inputs.v, b, keys.start, g);
                    let dy = dims.q_rows(dy, b, rows.start, h);
                    ds.clear();
                    ds.resize(rows.len() * width, 0.0);
                    // SAFETY (this block's products): q's and dy's rows `rows` of head `h` and
                    // k's and v's rows `keys` of head `g` lie inside their buffers; `p` and `ds`
                    // hold `rows × keys` values and are this task's own; dq's rows `rows` of
                    // head `h` and dk's and dv's rows `keys` of head `g` are written by this
                    // task alone (`h` is one of `g`'s query heads; tasks differ in `(b, g)`).
                    unsafe {
                        // ∂L/∂p = dy·vᵀ
                        product(
                            rows.len(),
                            width,
                            dims.head_dim,
                            ds.as_mut_ptr(),
                            width as isize,
                            dy,
                            v.transposed(),
                            false,
                        );
                    }
                    softmax_backward_rows(&mut ds, &p, width, self.scale);
                    let ds_view = View::rows(ds.as_ptr(), width as isize);
                    let p_view = View::rows(p.as_ptr(), width as isize);
                    // SAFETY: as above.
                    unsafe {
                        // ∂L/∂q = ∂L/∂s·k
                        product(
                            rows.len(),
                            dims.head_dim,
                            width,
                            dq_out.0.add(at_q),
                            dims.q_stride(),
                            ds_view,
                            k,
                            false,
                        );
                        // ∂L/∂k += ∂L/∂sᵀ·q
                        product(
                            width,
                            dims.head_dim,
                            rows.len(),
                            dk_out.0.add(at_kv),
                            dims.kv_stride(),
                            ds_view.transposed(),
                            q,
                            true,
                        );
                        // ∂L/∂v += pᵀ·dy
                        product(
                            width,
                            dims.head_dim,
                            rows.len(),
                            dv_out.0.add(at_kv),
                            dims.kv_stride(),
                            p_view.transposed(),
                            dy,
                            true,
                        );
                    }
                }
            }
        });
        (dq, dk, dv)
    }
}

/// The contiguous f32 values of a CPU tensor's storage, for the backward pass.
fn cpu_values<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("attention runs on the CPU");
    };
    values(cpu, layout, "attention")
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(
            q_layout.shape(),
            k_layout.shape(),
            v_layout.shape(),
            self.documents.as_ref(),
        )?;
        let inputs = Inputs::new(
            values(q, q_layout, self.name())?,
            values(k, k_layout, self.name())?,
            values(v, v_layout, self.name())?,
            dims,
        )?;
        Ok((
            CpuStorage::F32(self.forward(&inputs)),
            q_layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(q.shape(), k.shape(), v.shape(), self.documents.as_ref())?;
        if dy.shape() != q.shape() {
            candle_core::bail!("attention: gradient {:?} for {:?}", dy.shape(), q.shape());
        }
        let dy = dy.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (dy_storage, dy_layout) = dy.storage_and_layout();
        let inputs = Inputs::new(
            cpu_values(&q_storage, q_layout)?,
            cpu_values(&k_storage, k_layout)?,
            cpu_values(&v_storage, v_layout)?,
            dims,
        )?;
        let dy = cpu_values(&dy_storage, dy_layout)?;
        if dy.len() != inputs.q.len() {
            candle_core::bail!("attention: gradient of {} values for {dims:?}", dy.len());
        }
        let (dq, dk, dv) = self.backward(&inputs, dy);
        let tensor = |grad: Vec<f32>, like: &Tensor| {
            Tensor::from_vec(grad, like.shape().clone(), &Device::Cpu)
        };
        Ok((
            Some(tensor(dq, q)?),
            Some(tensor(dk, k)?),
            Some(tensor(dv, v)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{D, Var};

    use super::*;
    use crate::testing::{flat, max_abs_difference};

    /// Attention composed from candle's ops in `[batch, heads, seq, head_dim]`, as the model
    /// computes it off the CPU or in other dtypes: the reference.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        documents: Option<&DocumentStarts>,
    ) -> Tensor {
        let (batch, queries, heads, head_dim) = q.dims4().unwrap();
        let (_, keys, kv_heads, _) = k.dims4().unwrap();
        let split = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let repeat = |x: Tensor| {
            let n = heads / kv_heads;
            Tensor::cat(&vec![&x; n], 2)
                .unwrap()
                .reshape((batch, heads, keys, head_dim))
                .unwrap()
        };
        let (q, k, v) = (split(q), repeat(split(k)), repeat(split(v)));
        let offset = keys - queries;
        let mask: Vec<f32> = (0..batch * queries * keys)
            .map(|index| {
                let (b, i, j) = (
                    index / (queries * keys),
                    index / keys % queries,
                    index % keys,
                );
                let first = documents.map_or(0, |d| d.start(b, i));
                if (first..=offset + i).contains(&j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (batch, 1, queries, keys), &Device::Cpu).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// The fused op against [`composed`] in value and in the gradients of all three inputs.
    fn assert_matches_composed(
        (batch, queries, keys, heads, kv_heads, head_dim): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        documents: Option<&DocumentStarts>,
    ) {
        let var = |shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
        };
        let q = var((batch, queries, heads, head_dim));
        let k = var((batch, keys, kv_heads, head_dim));
        let v = var((batch, keys, kv_heads, head_dim));
        let scale = 1.0 / (head_dim as f64).sqrt();
        let expected = composed(&q, &k, &v, scale, documents);
        let got = attention(&q, &k, &v, scale, documents).unwrap();
        assert_eq!(got.dims(), expected.dims());
        let error = max_abs_difference(&flat(&expected), &flat(&got));
        assert!(error < 1e-5, "output differs by {error}");
        let target = Tensor::randn(0f32, 1.0, got.shape(), &Device::Cpu).unwrap();
        let loss = |y: &Tensor| (y * &target).unwrap().sum_all().unwrap();
        let expected = loss(&expected).backward().unwrap();
        let got = loss(&got).backward().unwrap();
        for (name, input) in [("q", &q), ("k", &k), ("v", &v)] {
            let expected = flat(expected.get(input.as_tensor()).unwrap());
            let got = flat(got.get(input.as_tensor()).unwrap());
            let error = max_abs_difference(&expected, &got);
            assert!(error < 1e-4, "∂L/∂{name} differs by {error}");
            assert!(
                expected.iter().any(|g| g.abs() > 1e-3),
                "a gradient of {name} to compare"
            );
        }
    }

    #[test]
    fn matches_candles_ops_in_value_and_all_three_gradients() {
        // Blocks of 64 queries: 70 positions end in a partial block.
        assert_matches_composed((2, 70, 70, 4, 4, 8), None);
        // Grouped-query attention: three query heads per key/value head.
        assert_matches_composed((2, 40, 40, 6, 2, 8), None);
        // Fewer queries than keys (a cache's offset): query i at position T − t + i.
        assert_matches_composed((1, 5, 45, 2, 1, 16), None);
        // Fewer queries than keys over more than one block, and grouped-query attention with a
        // partial block.
        assert_matches_composed((1, 70, 100, 2, 1, 8), None);
        assert_matches_composed((1, 80, 80, 4, 2, 8), None);
        // One query over three keys (generation's step after a prompt).
        assert_matches_composed((1, 1, 3, 1, 1, 4), None);
    }

    #[test]
    fn keeps_packed_documents_apart_as_candles_masked_ops_do() {
        // A row of three documents, one whose first block starts mid-document, and a row of one.
        let (batch, seq) = (2, 70);
        let mut starts = Vec::new();
        for position in 0..seq {
            starts.push(match position {
                0..10 => 0,
                10..45 => 10,
                _ => 45,
            });
        }
        starts.extend(std::iter::repeat_n(0, seq));
        let documents = DocumentStarts::new(starts, batch, seq).unwrap();
        assert_matches_composed((batch, seq, seq, 4, 2, 8), Some(&documents));
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let zeros = |shape: (usize, usize, usize, usize)| {
            Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
        };
        let q = zeros((1, 4, 4, 8));
        for (k, v) in [
            (zeros((1, 4, 3, 8)), zeros((1, 4, 3, 8))), // 4 heads over 3
            (zeros((1, 4, 2, 4)), zeros((1, 4, 2, 4))), // head_dim
            (zeros((1, 3, 2, 8)), zeros((1, 3, 2, 8))), // fewer keys than queries
            (zeros((1, 4, 2, 8)), zeros((1, 5, 2, 8))), // k and v differ
        ] {
            assert!(attention(&q, &k, &v, 1.0, None).is_err());
        }
        let documents = DocumentStarts::new(vec![0; 5], 1, 5).unwrap();
        let kv = zeros((1, 4, 2, 8));
        assert!(attention(&q, &kv, &kv, 1.0, Some(&documents)).is_err());
    }
}
