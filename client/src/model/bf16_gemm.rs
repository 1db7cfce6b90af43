//! `C = A·B` with bf16 inputs and f32 accumulation, for frozen weights.
//!
//! A frozen weight is packed once (both for `x·Wᵀ` in the forward pass and for `g·W` in the
//! backward pass), activations are rounded to bf16 on each call, and products accumulate in f32:
//! the arithmetic of PyTorch's bf16 autocast. On x86-64 CPUs with AVX-512 BF16 (AMD Zen 4 and
//! later, Intel Cooper Lake and Sapphire Rapids and later) the inner loop is `vdpbf16ps`, which
//! does twice the multiply-adds per cycle of an f32 FMA and reads half the bytes; elsewhere a
//! portable loop computes the same products.
//!
//! Layout: `B` (`k × n`) is cut into panels of [`NR`] columns. Inside a panel, rows come in pairs
//! (`2p`, `2p + 1`), and for each pair the panel's columns are stored as 32-bit words holding
//! `B[2p][j]` in the low half and `B[2p + 1][j]` in the high half: one 64-byte line per 16
//! columns, which is what `vdpbf16ps` multiplies against a broadcast pair `A[i][2p], A[i][2p + 1]`.
//! An odd `k` is padded with a zero row; the last panel is padded with zero columns.
//!
//! The driver blocks `k` so that a panel's slice stays in L1 while it sweeps tiles of [`MR`] rows
//! of `A` (kept in L2), and splits rows (or, for few rows, panels) across rayon's threads.
#![allow(
    unsafe_code,
    reason = "AVX-512 BF16 intrinsics, and disjoint writes into one output from several threads"
)]

use rayon::prelude::*;

/// Columns per panel: four 16-lane f32 registers.
pub const NR: usize = 64;
/// Rows of `A` per micro-kernel call: 6 × 4 accumulators, 4 panel registers, 1 broadcast.
const MR: usize = 6;
/// Row pairs of `B` per block, at most: 256 pairs × 64 columns × 4 bytes = 64 KiB of a panel,
/// read from L2 (4 lines per pair against 24 multiply-adds). Measured against 96 pairs (a slice
/// inside L1): as fast for k = 1408, and for k = 512 it writes C once instead of three times.
const KC_PAIRS: usize = 256;
/// Rows of A per block: 96 rows × 256 pairs × 4 bytes = 96 KiB of A, in L2.
const MC: usize = 96;
/// Panels of B per block: 16 × 64 KiB, in L2.
const NC_PANELS: usize = 16;

/// One cache line of packed words.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Round-to-nearest-even f32 → bf16 bits (NaN stays NaN).
pub fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

fn pair(low: f32, high: f32) -> u32 {
    u32::from(to_bf16(low)) | (u32::from(to_bf16(high)) << 16)
}

/// A `k × n` matrix in the panel layout above.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    pairs: usize,
    lines: Vec<Line>,
}

impl PackedB {
    /// Packs `B[row][col] = value(row, col)`.
    pub fn pack(k: usize, n: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let lines_per_panel = pairs * NR / 16;
        let mut lines = vec![Line::default(); panels * lines_per_panel];
        let get = |row: usize, col: usize| {
            if row < k && col < n {
                value(row, col)
            } else {
                0.0
            }
        };
        lines
            .par_chunks_mut(lines_per_panel.max(1))
            .enumerate()
            .for_each(|(panel, panel_lines)| {
                for (index, line) in panel_lines.iter_mut().enumerate() {
                    let word = index * 16;
                    let (p, first_col) = (word / NR, panel * NR + word % NR);
                    for (lane, slot) in line.0.iter_mut().enumerate() {
                        let col = first_col + lane;
                        *slot = pair(get(2 * p, col), get(2 * p + 1, col));
                    }
                }
            });
        Self { k, n, pairs, lines }
    }

    /// `B` = `Wᵀ` for a row-major `[rows, cols]` weight `w` (the forward pass's `x·Wᵀ`).
    pub fn transposed_of(w: &[f32], rows: usize, cols: usize) -> Self {
        Self::pack(cols, rows, |k, n| w[n * cols + k])
    }

    /// `B` = `W` for a row-major `[rows, cols]` weight `w` (the backward pass's `g·W`).
    pub fn of(w: &[f32], rows: usize, cols: usize) -> Self {
        Self::pack(rows, cols, |k, n| w[k * cols + n])
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `B[row][col]` as stored (bf16, widened to f32).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let (panel, within) = (col / NR, col % NR);
        let word = (panel * self.pairs + row / 2) * NR + within;
        let bits = self.lines[word / 16].0[word % 16];
        from_bf16(if row.is_multiple_of(2) {
            bits as u16
        } else {
            (bits >> 16) as u16
        })
    }

    /// Row `row` of B (bf16, widened to f32) into `out` (`n` values).
    pub fn row_into(&self, row: usize, out: &mut [f32]) {
        let shift = if row.is_multiple_of(2) { 0 } else { 16 };
        for (panel, out) in out.chunks_mut(NR).enumerate() {
            let start = (panel * self.pairs + row / 2) * NR;
            for (value, &word) in out.iter_mut().zip(&self.words()[start..start + NR]) {
                *value = from_bf16((word >> shift) as u16);
            }
        }
    }

    fn words(&self) -> &[u32] {
        // SAFETY: `Line` is `repr(C)` around `[u32; 16]` with no padding (64 bytes, align 64),
        // so the lines are a contiguous run of `16 * len` initialised u32 words.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr().cast::<u32>(), self.lines.len() * 16)
        }
    }
}

/// Rows of `A` rounded to bf16 and packed in pairs along `k`: `m × ⌈k/2⌉` words.
pub fn pack_a(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut packed = vec![0u32; m * pairs];
    if pairs == 0 {
        return packed;
    }
    packed
        .par_chunks_mut(pairs * 64)
        .zip(a.par_chunks(k * 64))
        .for_each(|(out, rows)| {
            for (out_row, row) in out.chunks_mut(pairs).zip(rows.chunks(k)) {
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if simd_available() {
                    // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above).
                    done = unsafe { x86::round_pairs(row, out_row) };
                }
                for (word, values) in out_row[done..].iter_mut().zip(row[2 * done..].chunks(2)) {
                    *word = pair(values[0], values.get(1).copied().unwrap_or(0.0));
                }
            }
        });
    packed
}

/// `C = A·B` for `A` packed by [`pack_a`] (`m` rows, `b.k()` columns); returns `C` row-major
/// `m × b.n()`.
pub fn matmul(a: &[u32], m: usize, b: &PackedB) -> Vec<f32> {
    matmul_with(a, m, b, simd_available())
}

/// [`matmul`] with the AVX-512 BF16 kernel (`simd`, which the CPU must have) or the portable one.
fn matmul_with(a: &[u32], m: usize, b: &PackedB, simd: bool) -> Vec<f32> {
    let n = b.n;
    if m == 0 || n == 0 || b.pairs == 0 {
        return vec![0f32; m * n];
    }
    // Not zero-filled: the first k-block stores (does not add to) every element of C, which
    // saves a pass over the largest output of a step (the `[tokens, vocab]` logits).
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    assert_eq!(a.len(), m * b.pairs, "A must have m × ⌈k/2⌉ packed words");
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // Rows split into one block per thread keeps each panel read once per thread; with too few
    // rows for that, panels are split instead.
    let row_blocks = threads.min(m.div_ceil(MR * 4)).max(1);
    let rows_per_block = m.div_ceil(row_blocks).div_ceil(MR) * MR;
    let row_blocks = m.div_ceil(rows_per_block);
    let panel_groups = threads.div_ceil(row_blocks).min(panels).max(1);
    let panels_per_group = panels.div_ceil(panel_groups);
    let out = OutPtr(c.as_mut_ptr());
    let k_blocks = b.pairs.div_ceil(KC_PAIRS).max(1);
    let kc_pairs = b.pairs.div_ceil(k_blocks);
    (0..row_blocks * panel_groups)
        .into_par_iter()
        .for_each(|task| {
            let (block, group) = (task / panel_groups, task % panel_groups);
            let rows = block * rows_per_block..((block + 1) * rows_per_block).min(m);
            let panel_range =
                group * panels_per_group..((group + 1) * panels_per_group).min(panels);
            let out = &out;
            // BLIS order: a k-block of B's panels (`NC_PANELS` at a time, in L2/L3) is swept by
            // blocks of `MC` rows of A (in L2); each panel slice (in L1) by tiles of `MR` rows.
            // Row blocks also keep the C rows a sweep writes on few pages.
            for kc0 in (0..b.pairs).step_by(kc_pairs) {
                let kc = kc_pairs.min(b.pairs - kc0);
                for nc0 in panel_range.clone().step_by(NC_PANELS) {
                    let nc_end = (nc0 + NC_PANELS).min(panel_range.end);
                    for mc0 in rows.clone().step_by(MC) {
                        let mc_end = (mc0 + MC).min(rows.end);
                        for panel in nc0..nc_end {
                            let cols = NR.min(n - panel * NR);
                            let b_offset = (panel * b.pairs + kc0) * NR;
                            let mut row = mc0;
                            while row < mc_end {
                                let tile_rows = MR.min(mc_end - row);
                                let tile = Tile {
                                    a: &a[row * b.pairs + kc0..],
                                    lda: b.pairs,
                                    b: &b.words()[b_offset..b_offset + kc * NR],
                                    pairs: kc,
                                    rows: tile_rows,
                                    cols,
                                    accumulate: kc0 > 0,
                                };
                                // SAFETY: tasks own disjoint (row range × panel range)
                                // rectangles of C, and the tile writes rows
                                // `row..row + tile_rows` and columns `panel·NR..panel·NR + cols`
                                // of it, all inside `m × n`.
                                unsafe { tile.run(out.0.add(row * n + panel * NR), n, simd) };
                                row += tile_rows;
                            }
                        }
                    }
                }
            }
        });
    // SAFETY: the tasks cover rows `0..m` × panels `0..panels`, and each tile of the first
    // k-block (`kc0 == 0`, `accumulate == false`) stored every one of its `rows × cols` elements:
    // all `m × n` elements are initialised.
    unsafe { c.set_len(m * n) };
    c
}

/// The output buffer, shared by tasks that write disjoint rectangles of it.
struct OutPtr(*mut f32);
// SAFETY: see the write in `matmul`: no two tasks touch the same element.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

struct Tile<'a> {
    /// Row `r`'s pairs start at `a[r * lda]`.
    a: &'a [u32],
    lda: usize,
    /// `pairs × NR` words of one panel.
    b: &'a [u32],
    pairs: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// Writes (or, with `accumulate`, adds to) `rows × cols` of C at `c` with row stride `ldc`.
    ///
    /// # Safety
    /// `c` must be valid for those writes and not written by anyone else meanwhile.
    unsafe fn run(&self, c: *mut f32, ldc: usize, simd: bool) {
        assert!((1..=MR).contains(&self.rows) && self.cols <= NR);
        assert!(self.b.len() >= self.pairs * NR);
        assert!(self.a.len() >= (self.rows - 1) * self.lda + self.pairs);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is true only when the CPU has AVX-512F and AVX-512 BF16; the
            // slices were checked above to cover every word the kernel reads.
            unsafe {
                match self.rows {
                    6 => x86::kernel::<6>(self, c, ldc),
                    5 => x86::kernel::<5>(self, c, ldc),
                    4 => x86::kernel::<4>(self, c, ldc),
                    3 => x86::kernel::<3>(self, c, ldc),
                    2 => x86::kernel::<2>(self, c, ldc),
                    1 => x86::kernel::<1>(self, c, ldc),
                    _ => unreachable!("tile heights are 1..=MR, asserted above"),
                }
            }
            return;
        }
        let _ = simd;
        let mut acc = [[0f32; NR]; MR];
        for (r, acc_row) in acc.iter_mut().enumerate().take(self.rows) {
            let a_row = &self.a[r * self.lda..r * self.lda + self.pairs];
            for (p, &a_word) in a_row.iter().enumerate() {
                let (a0, a1) = (from_bf16(a_word as u16), from_bf16((a_word >> 16) as u16));
                let b_row = &self.b[p * NR..(p + 1) * NR];
                for (slot, &b_word) in acc_row.iter_mut().zip(b_row) {
                    *slot += a0 * from_bf16(b_word as u16) + a1 * from_bf16((b_word >> 16) as u16);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(self.rows) {
            for (col, &value) in acc_row.iter().enumerate().take(self.cols) {
                // SAFETY: inside the `rows × cols` rectangle the caller vouches for.
                unsafe {
                    let slot = c.add(r * ldc + col);
                    *slot = if self.accumulate {
                        *slot + value
                    } else {
                        value
                    };
                }
            }
        }
    }
}

/// Whether the AVX-512 BF16 kernel runs on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{NR, Tile};

    /// Rounds `values` to bf16 pairs in `words`, 32 values at a time (`vcvtne2ps2bf16`, round
    /// to nearest even); returns how many words it wrote (the rest is left to the caller).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_pairs(values: &[f32], words: &mut [u32]) -> usize {
        let chunks = (values.len() / 32).min(words.len() / 16);
        for chunk in 0..chunks {
            // SAFETY: `chunk < chunks`, so 32 values and 16 words are in bounds.
            unsafe {
                let source = values.as_ptr().add(chunk * 32);
                let low = _mm512_loadu_ps(source);
                let high = _mm512_loadu_ps(source.add(16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(words.as_mut_ptr().add(chunk * 16).cast(), packed);
            }
        }
        chunks * 16
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `tile`'s slices cover what it reads (checked by
    /// the caller); `c` is valid for `ROWS × tile.cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn kernel<const ROWS: usize>(tile: &Tile<'_>, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
        let a = tile.a.as_ptr();
        let b = tile.b.as_ptr();
        for p in 0..tile.pairs {
            // SAFETY (all reads): `p < pairs`, the panel slice holds `pairs × NR` words and row
            // `r < ROWS` of A holds `pairs` words at `r × lda`.
            unsafe {
                let line = b.add(p * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(line.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(line.add(16).cast()));
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(line.add(32).cast()));
                let b3: __m512bh = std::mem::transmute(_mm512_loadu_si512(line.add(48).cast()));
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let word = *a.add(r * tile.lda + p);
                    let broadcast: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
                    acc_row[0] = _mm512_dpbf16_ps(acc_row[0], broadcast, b0);
                    acc_row[1] = _mm512_dpbf16_ps(acc_row[1], broadcast, b1);
                    acc_row[2] = _mm512_dpbf16_ps(acc_row[2], broadcast, b2);
                    acc_row[3] = _mm512_dpbf16_ps(acc_row[3], broadcast, b3);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, &value) in acc_row.iter().enumerate() {
                let first = v * 16;
                if first >= tile.cols {
                    break;
                }
                let left = tile.cols - first;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                // SAFETY: the masked lanes are columns `< cols` of row `r < ROWS`.
                unsafe {
                    let slot = c.add(r * ldc + first);
                    let value = if tile.accumulate {
                        _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, slot))
                    } else {
                        value
                    };
                    _mm512_mask_storeu_ps(slot, mask, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The product of the bf16-rounded inputs in f64.
    fn reference(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let round = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| round(a[i * k + l]) * round(w[j * k + l]))
                    .sum();
            }
        }
        c
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn products_match_f64_of_rounded_inputs_for_every_edge_shape() {
        // Odd k, partial panels, row counts that leave every tile height, k over several blocks.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 130, 70),
            (6, 200, 64),
            (33, 401, 129),
        ] {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let expected = reference(&a, &w, m, k, n);
            let packed = PackedB::transposed_of(&w, n, k);
            let a = pack_a(&a, m, k);
            let kernels = if simd_available() {
                vec![false, true]
            } else {
                vec![false]
            };
            for simd in kernels {
                let got = matmul_with(&a, m, &packed, simd);
                for (index, (&e, &g)) in expected.iter().zip(&got).enumerate() {
                    let tolerance = 1e-5 * (k as f64).sqrt() * (1.0 + e.abs());
                    assert!(
                        (e - f64::from(g)).abs() < tolerance,
                        "{m}x{k}x{n} (simd {simd}) at {index}: {e} vs {g}"
                    );
                }
            }
        }
    }

    #[test]
    fn both_packings_of_a_weight_give_its_two_products() {
        let (rows, cols) = (70, 37);
        let w = values(rows * cols, 3);
        let forward = PackedB::transposed_of(&w, rows, cols);
        let backward = PackedB::of(&w, rows, cols);
        assert_eq!((forward.k(), forward.n()), (cols, rows));
        assert_eq!((backward.k(), backward.n()), (rows, cols));
        for (r, c) in [(0, 0), (69, 36), (5, 20), (64, 1)] {
            let stored = from_bf16(to_bf16(w[r * cols + c]));
            assert_eq!(forward.get(c, r), stored);
            assert_eq!(backward.get(r, c), stored);
        }
        // g·W with g = the identity's first rows gives W's rows back (rounded).
        let g: Vec<f32> = (0..3 * rows)
            .map(|i| f32::from(u8::from(i % (rows + 1) == 0)))
            .collect();
        let rows_back = matmul(&pack_a(&g, 3, rows), 3, &backward);
        for r in 0..3 {
            for c in 0..cols {
                assert_eq!(rows_back[r * cols + c], from_bf16(to_bf16(w[r * cols + c])));
            }
        }
    }
}
