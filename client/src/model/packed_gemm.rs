//! `C = A·B` for frozen weights packed once, in two precisions.
//!
//! A frozen weight is packed twice when it is loaded: as `Wᵀ` for the forward product `x·Wᵀ`
//! and as `W` for the input gradient `g·W`. Packing it once, instead of on every call as a
//! general-purpose GEMM must, is the point: the packing of the weight side was 11% of the f32
//! step in candle's GEMM.
//!
//! - [`Bf16Pair`]: the weight rounded to bf16, activations rounded to bf16 on each call, products
//!   accumulated in f32 (the arithmetic of PyTorch's bf16 autocast). On x86-64 CPUs with AMX
//!   (Intel Xeon from Sapphire Rapids on, where the kernel grants the tile state) the inner loop is
//!   `tdpbf16ps` on 16 × 16 tiles; with AVX-512 BF16 it is `vdpbf16ps`; elsewhere a portable loop
//!   computes the same products.
//! - `f32`: exact f32 products. On CPUs with AVX-512F the inner loop is 512-bit `vfmadd231ps`
//!   and reads the activations where they are; on CPUs with AVX2 and FMA (AMD Zen 1–3, Intel
//!   before Skylake-SP, many client chips) the same in 256 bits, on blocks of the activations
//!   copied per call (below); elsewhere the weight should stay with candle's GEMM
//!   (`f32_simd_available` says which).
//!
//! Layout: `B` (`k × n`) is cut into panels of [`NR`] columns. Inside a panel, `k` runs in steps
//! of one word: for f32 one row, for bf16 a pair of rows (`2p`, `2p + 1`) stored as 32-bit words
//! holding `B[2p][j]` in the low half and `B[2p + 1][j]` in the high half, which is what
//! `vdpbf16ps` multiplies against a broadcast pair `A[i][2p], A[i][2p + 1]`, and what AMX's
//! `tdpbf16ps` reads as a B tile: 16 word steps × 16 columns, one 64-byte line each, 256 bytes
//! apart. Either way a word step of a panel is one 64-byte line per 16 columns. An odd `k`
//! (bf16) is padded with a zero row; the last panel is padded with zero columns. That is
//! [`Layout::Rows`]. Where the fastest kernel is the AVX2 one (f32 on CPUs without AVX-512),
//! the weight is packed in [`Layout::Strips`] instead: each panel as four strips of 16 columns,
//! a strip's word steps one line after another.
//!
//! The driver blocks `k` so that a panel's slice (64–128 KiB) stays in L2 while it sweeps tiles
//! of [`MR`] rows of `A` (also in L2; the micro-kernel streams both through L1), and splits rows
//! (or, for few rows, panels) across rayon's threads. The AVX2 kernel, with half the registers,
//! is fed differently: tiles of `A`, copied into steps of [`MR`] values side by side
//! (`interleave_rows`), sweep one strip's k-block (up to 512 steps, 32 KiB, in L1 and L2) after
//! another, and while they sweep one strip they fetch the next into L2.
#![allow(
    unsafe_code,
    reason = "AVX-512 and AVX2 intrinsics, and disjoint writes into one output from several threads"
)]

use std::borrow::Cow;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Columns per panel: four 16-lane f32 registers.
pub const NR: usize = 64;
/// Rows of `A` per micro-kernel call: 6 × 4 accumulators, 4 panel registers, 1 broadcast
/// (AVX-512); 6 × 2 accumulators, 2 strip registers, 1 broadcast (AVX2).
const MR: usize = 6;
/// Rows of A per block: 96 rows × 512 words × 4 bytes = 192 KiB of A at most, in L2 (AVX2:
/// 96 rows × up to 512 steps = 192 KiB, copied).
const MC: usize = 96;
/// Panels of B per block: 16 panel slices (1–2 MiB), in L2/L3.
const NC_PANELS: usize = 16;

/// Calls `$kernel::<rows>` for a run-time tile height `1..=MR`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_height {
    ($rows:expr, $module:ident::$kernel:ident, $($arg:expr),*) => {
        match $rows {
            6 => $module::$kernel::<6>($($arg),*),
            5 => $module::$kernel::<5>($($arg),*),
            4 => $module::$kernel::<4>($($arg),*),
            3 => $module::$kernel::<3>($($arg),*),
            2 => $module::$kernel::<2>($($arg),*),
            1 => $module::$kernel::<1>($($arg),*),
            _ => unreachable!("tile heights are 1..=MR, asserted by the driver"),
        }
    };
}

/// Which micro-kernel multiplies a tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust loops: any CPU, slow.
    Portable,
    /// 256-bit FMA (f32 only): x86-64 CPUs with AVX2 and FMA.
    Avx2,
    /// 512-bit FMA (f32) or `vdpbf16ps` (bf16): x86-64 CPUs with AVX-512F (and AVX-512 BF16).
    Avx512,
    /// AMX tiles (bf16 only): `tdpbf16ps`, a call taking [`AMX_ROWS`] (or 16) rows × a panel's
    /// 64 columns in two halves of 2 × 2 C tiles; rows left over (under 16) and a depth's last
    /// word steps (under 16) go to the `Avx512` kernel.
    Amx,
}

/// Rows of `A` per AMX call: two tiles of 16.
const AMX_ROWS: usize = 32;

/// Fewest rows of `A` worth a thread of their own; with fewer, threads split the panels. Two
/// threads each streaming every panel of the output head (`[128 rows, 32000 columns]` at a time)
/// cost more than splitting them: with AMX 317 → 394 GFLOP/s on that product; with the AVX-512
/// f32 kernel 170 → 185 on its two products (probes timing `matmul` and `product`, not shipped;
/// the layers' products, 1024 rows, unchanged). The bf16 `vdpbf16ps` kernel measured the same
/// either way (`bench-train --bf16-base`, alternating runs).
fn min_rows_per_block(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Amx | Kernel::Avx512 => 256,
        Kernel::Avx2 | Kernel::Portable => MR * 4,
    }
}

/// Rows of `A` the next micro-kernel call takes with `kernel`, `left` rows still to do.
fn tile_rows(kernel: Kernel, left: usize) -> usize {
    match kernel {
        Kernel::Amx if left >= 16 => left.min(AMX_ROWS) / 16 * 16,
        _ => MR.min(left),
    }
}

/// One cache line of packed words.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line<W>([W; 16]);

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

/// Two bf16 values along `k` in one word: the even row in the low half.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(transparent)]
pub struct Bf16Pair(u32);

mod sealed {
    /// Only this module's 4-byte words implement [`super::Word`]: `PackedB::words` relies on it.
    pub trait Sealed {}
    impl Sealed for super::Bf16Pair {}
    impl Sealed for f32 {}
}

/// A word of the packed layout: what one step along `k` holds for one column. Sealed: the
/// layout's reinterpretation of 64-byte lines as words needs 4-byte words.
pub trait Word: sealed::Sealed + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Rows of `k` per word.
    const DEPTH: usize;
    /// Word steps of `B` per block, at most: a panel slice of `KC_WORDS` × 64 columns × 4 bytes
    /// read from L2 (4 lines per step against 24 multiply-adds), and C written once per block.
    /// The AVX2 kernel takes blocks of its own size (`kc_words`).
    const KC_WORDS: usize;
    /// Packs `values` (`DEPTH` of them) into a word, rounding as the precision does.
    fn pack(values: [f32; 2]) -> Self;
    /// Value `index < DEPTH` of the word, widened to f32.
    fn value(self, index: usize) -> f32;
    /// The kernels this CPU runs, slowest first: [`Kernel::Portable`] always. Detected once.
    fn kernels() -> &'static [Kernel];
    /// The fastest kernel this CPU runs.
    fn best_kernel() -> Kernel {
        Self::kernels().last().copied().unwrap_or(Kernel::Portable)
    }
    /// `rows` rows of `x` (`k` wide) as the `A` operand: bf16 packs them, f32 reads them as
    /// they are.
    fn a_operand(x: &[f32], rows: usize, k: usize) -> AOperand<'_, Self>;
    /// A vectorised micro-kernel for one tile (see [`Word::run`]).
    ///
    /// # Safety
    /// As [`Word::run`]; `kernel` is not [`Kernel::Portable`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_tile(tile: &Tile<'_, Self>, c: *mut f32, ldc: usize, kernel: Kernel);

    /// Writes (or, with `tile.accumulate`, adds to) the tile's `rows × cols` of C at `c`, row
    /// stride `ldc`, with `kernel`.
    ///
    /// # Safety
    /// `c` must be valid for those writes and not written by anyone else meanwhile; `kernel` is
    /// one of [`Word::kernels`]; the tile's slices cover what it reads (`Tile::check`).
    unsafe fn run(tile: &Tile<'_, Self>, c: *mut f32, ldc: usize, kernel: Kernel) {
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable {
            // SAFETY: as the caller vouches.
            unsafe { Self::simd_tile(tile, c, ldc, kernel) };
            return;
        }
        // SAFETY: as the caller vouches.
        unsafe { portable(tile, c, ldc) }
    }
}

impl Word for Bf16Pair {
    const DEPTH: usize = 2;
    /// 64 KiB, k = 512. Measured against 96 (a slice inside L1): as fast for k = 1408, and for
    /// k = 512 it writes C once instead of three times.
    const KC_WORDS: usize = 256;

    fn pack(values: [f32; 2]) -> Self {
        Self(u32::from(to_bf16(values[0])) | (u32::from(to_bf16(values[1])) << 16))
    }

    fn value(self, index: usize) -> f32 {
        from_bf16((self.0 >> (16 * index)) as u16)
    }

    fn kernels() -> &'static [Kernel] {
        static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
        KERNELS.get_or_init(|| {
            let mut kernels = vec![Kernel::Portable];
            if bf16_simd_available() {
                kernels.push(Kernel::Avx512);
                if amx_available() {
                    kernels.push(Kernel::Amx);
                }
            }
            kernels
        })
    }

    fn a_operand(x: &[f32], rows: usize, k: usize) -> AOperand<'_, Self> {
        pack_a(x, rows, k)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_tile(tile: &Tile<'_, Self>, c: *mut f32, ldc: usize, kernel: Kernel) {
        // SAFETY: called only with a kernel of `kernels`, so where the CPU has AVX-512F and
        // AVX-512 BF16, and for `Amx` where the kernel granted this process the tile state; the
        // tile's slices were checked to cover every word the kernel reads; `c` as the caller
        // vouches.
        unsafe {
            match kernel {
                Kernel::Amx if tile.rows.is_multiple_of(16) => x86::amx_bf16_kernel(tile, c, ldc),
                Kernel::Amx | Kernel::Avx512 => {
                    by_height!(tile.rows, x86::bf16_kernel, tile, c, ldc)
                }
                Kernel::Avx2 | Kernel::Portable => unreachable!("{kernel:?} is not a bf16 kernel"),
            }
        }
    }
}

impl Word for f32 {
    const DEPTH: usize = 1;
    /// 128 KiB, k = 512 as for bf16: against 256, 2% faster on the reference step (Intel Xeon,
    /// four alternating runs each).
    const KC_WORDS: usize = 512;

    fn pack(values: [f32; 2]) -> Self {
        values[0]
    }

    fn value(self, _index: usize) -> f32 {
        self
    }

    fn kernels() -> &'static [Kernel] {
        static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
        KERNELS.get_or_init(|| {
            let mut kernels = vec![Kernel::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    kernels.push(Kernel::Avx2);
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    kernels.push(Kernel::Avx512);
                }
            }
            kernels
        })
    }

    fn a_operand(x: &[f32], _rows: usize, k: usize) -> AOperand<'_, Self> {
        AOperand::rows(Cow::Borrowed(x), k)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_tile(tile: &Tile<'_, Self>, c: *mut f32, ldc: usize, kernel: Kernel) {
        // SAFETY: called only with a kernel of `kernels`, so where the CPU has AVX-512F
        // (`Avx512`) or AVX2 and FMA (`Avx2`); the tile's slices were checked to cover every
        // value the kernel reads; `c` as the caller vouches.
        unsafe {
            match kernel {
                Kernel::Avx512 => by_height!(tile.rows, x86::f32_kernel, tile, c, ldc),
                Kernel::Avx2 => by_height!(tile.rows, x86::f32_avx2_kernel, tile, c, ldc),
                Kernel::Amx | Kernel::Portable => unreachable!("{kernel:?} is not an f32 kernel"),
            }
        }
    }
}

/// How a panel's words are ordered (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A word step is the panel's 64 columns, one after another (4 lines): what the AVX-512
    /// and AMX kernels read.
    Rows,
    /// The panel is four strips of 16 columns, each `depth` steps of one line, one strip after
    /// another: what the AVX2 kernel reads. A strip's k-block (up to 512 steps, 32 KiB) is one
    /// contiguous run, in L1 and L2 while the kernel sweeps rows of `A` against it; in
    /// [`Layout::Rows`] the same 16 columns lie 256 bytes apart per step, in a quarter of L1's
    /// sets, and could not.
    Strips,
}

impl Layout {
    /// The layout [`matmul`] reads fastest with `kernel`.
    fn for_kernel(kernel: Kernel) -> Self {
        match kernel {
            Kernel::Avx2 => Layout::Strips,
            Kernel::Portable | Kernel::Avx512 | Kernel::Amx => Layout::Rows,
        }
    }

    /// Whether `kernel` can read this layout (the AVX2 and portable kernels read either).
    fn supports(self, kernel: Kernel) -> bool {
        self == Layout::Rows || matches!(kernel, Kernel::Avx2 | Kernel::Portable)
    }
}

/// A `k × n` matrix in the panel layout above.
#[derive(Debug, Clone)]
pub struct PackedB<W> {
    k: usize,
    n: usize,
    /// Word steps along `k`: `⌈k / DEPTH⌉`.
    depth: usize,
    layout: Layout,
    lines: Vec<Line<W>>,
}

impl<W: Word> PackedB<W> {
    /// Packs `B[row][col] = value(row, col)` in the layout this CPU's fastest kernel reads.
    pub fn pack(k: usize, n: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        Self::pack_in(Layout::for_kernel(W::best_kernel()), k, n, value)
    }

    /// [`PackedB::pack`] in `layout`.
    fn pack_in(
        layout: Layout,
        k: usize,
        n: usize,
        value: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        let depth = k.div_ceil(W::DEPTH);
        let panels = n.div_ceil(NR);
        let lines_per_panel = depth * NR / 16;
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
                    // Line `index` of the panel holds 16 columns of one word step.
                    let (p, first) = match layout {
                        Layout::Rows => (index / (NR / 16), index % (NR / 16) * 16),
                        Layout::Strips => (index % depth, index / depth * 16),
                    };
                    for (lane, slot) in line.0.iter_mut().enumerate() {
                        let col = panel * NR + first + lane;
                        let row = W::DEPTH * p;
                        // f32 words hold one row: reading the next would double the
                        // (strided) reads of packing.
                        let next = if W::DEPTH == 2 {
                            get(row + 1, col)
                        } else {
                            0.0
                        };
                        *slot = W::pack([get(row, col), next]);
                    }
                }
            });
        Self {
            k,
            n,
            depth,
            layout,
            lines,
        }
    }

    /// Index in [`PackedB::words`] of word step `p` of column `col`.
    fn word_index(&self, p: usize, col: usize) -> usize {
        let (panel, within) = (col / NR, col % NR);
        let start = panel * self.depth * NR;
        match self.layout {
            Layout::Rows => start + p * NR + within,
            Layout::Strips => start + (within / 16 * self.depth + p) * 16 + within % 16,
        }
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

    /// `B[row][col]` as stored, widened to f32.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let word = self.word_index(row / W::DEPTH, col);
        self.lines[word / 16].0[word % 16].value(row % W::DEPTH)
    }

    /// Row `row` of B as stored, widened to f32, into `out` (`n` values).
    pub fn row_into(&self, row: usize, out: &mut [f32]) {
        let words = self.words();
        for (strip, out) in out.chunks_mut(16).enumerate() {
            let start = self.word_index(row / W::DEPTH, strip * 16);
            for (value, &word) in out.iter_mut().zip(&words[start..start + 16]) {
                *value = word.value(row % W::DEPTH);
            }
        }
    }

    fn words(&self) -> &[W] {
        const { assert!(std::mem::size_of::<W>() == 4 && std::mem::align_of::<W>() <= 4) };
        // SAFETY: `Line<W>` is `repr(C)` around `[W; 16]`, and a `W` is 4 bytes (u32 or f32)
        // so the 64-byte line has no padding: the lines are a contiguous run of `16 * len`
        // initialised words.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr().cast::<W>(), self.lines.len() * 16)
        }
    }
}

/// The `A` operand: row `r`'s words start at `words[offset + r * stride]`.
#[derive(Debug, Clone)]
pub struct AOperand<'a, W: Clone> {
    words: Cow<'a, [W]>,
    offset: usize,
    stride: usize,
}

impl<'a, W: Word> AOperand<'a, W> {
    /// Rows of `depth` words, one after another.
    pub fn rows(words: Cow<'a, [W]>, depth: usize) -> Self {
        Self {
            words,
            offset: 0,
            stride: depth,
        }
    }

    fn words(&self) -> &[W] {
        &self.words[self.offset..]
    }
}

/// Words between the rows of a packed bf16 `A` of `depth` words: whole 64-byte lines, and an
/// odd number of them. AMX reads a tile's 16 rows as 16 lines `stride` apart; with a stride of
/// 2ⁿ lines (k = 512: 16 lines) they fall into 16 / 2ⁿ of L1's 64 sets and evict each other.
fn a_stride(depth: usize) -> usize {
    let stride = depth.next_multiple_of(16);
    if (stride / 16).is_multiple_of(2) {
        stride + 16
    } else {
        stride
    }
}

/// Rows of `A` rounded to bf16 and packed in pairs along `k`: `m` rows of `⌈k/2⌉` words, each
/// starting on a 64-byte line, [`a_stride`] apart.
pub fn pack_a(a: &[f32], m: usize, k: usize) -> AOperand<'static, Bf16Pair> {
    let pairs = k.div_ceil(2);
    if pairs == 0 || m == 0 {
        return AOperand::rows(Cow::Owned(Vec::new()), pairs);
    }
    let stride = a_stride(pairs);
    // Up to 15 words more, so that the rows can start on a line.
    let mut words = vec![Bf16Pair::default(); m * stride + 15];
    let offset = (words.as_ptr() as usize).wrapping_neg() % 64 / 4;
    words[offset..offset + m * stride]
        .par_chunks_mut(stride * 64)
        .zip(a.par_chunks(k * 64))
        .for_each(|(out, rows)| {
            for (out_row, row) in out.chunks_mut(stride).zip(rows.chunks(k)) {
                let out_row = &mut out_row[..pairs];
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if bf16_simd_available() {
                    // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above).
                    done = unsafe { x86::round_pairs(row, out_row) };
                }
                for (word, values) in out_row[done..].iter_mut().zip(row[2 * done..].chunks(2)) {
                    *word = Bf16Pair::pack([values[0], values.get(1).copied().unwrap_or(0.0)]);
                }
            }
        });
    AOperand {
        words: Cow::Owned(words),
        offset,
        stride,
    }
}

/// `x·B` for `rows` rows of `x` (row-major, `b.k()` wide): `[rows, b.n()]` row-major.
pub fn product<W: Word>(x: &[f32], rows: usize, b: &PackedB<W>) -> Vec<f32> {
    matmul(&W::a_operand(x, rows, b.k()), rows, b)
}

/// `C = A·B` for `A` with `m` rows of `b`'s word depth (for bf16 packed by [`pack_a`], for f32
/// the activations as they are, `k` wide); returns `C` row-major `m × b.n()`.
pub fn matmul<W: Word>(a: &AOperand<'_, W>, m: usize, b: &PackedB<W>) -> Vec<f32> {
    matmul_with(a, m, b, W::best_kernel())
}

/// [`matmul`] with `kernel`, which must be one of [`Word::kernels`] and read `b`'s layout.
fn matmul_with<W: Word>(a: &AOperand<'_, W>, m: usize, b: &PackedB<W>, kernel: Kernel) -> Vec<f32> {
    // `Tile::check` vouches for `kernel`'s reads only if `simd_tile` runs that kernel.
    assert!(
        W::kernels().contains(&kernel),
        "{kernel:?} does not run here"
    );
    assert!(
        b.layout.supports(kernel),
        "{kernel:?} cannot read {:?}",
        b.layout
    );
    let n = b.n;
    if m == 0 || n == 0 || b.depth == 0 {
        return vec![0f32; m * n];
    }
    // Not zero-filled: the first k-block stores (does not add to) every element of C, which
    // saves a pass over the largest output of a step (the `[tokens, vocab]` logits).
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let (lda, a) = (a.stride, a.words());
    assert!(
        lda >= b.depth && a.len() >= (m - 1) * lda + b.depth,
        "A must have m rows of the packing's depth"
    );
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // Rows split into one block per thread keeps each panel read once per thread; with too few
    // rows for that, panels are split instead.
    let tile_height = tile_rows(kernel, usize::MAX);
    let row_blocks = threads.min(m.div_ceil(min_rows_per_block(kernel))).max(1);
    let rows_per_block = m.div_ceil(row_blocks).div_ceil(tile_height) * tile_height;
    let row_blocks = m.div_ceil(rows_per_block);
    let panel_groups = threads.div_ceil(row_blocks).min(panels).max(1);
    let panels_per_group = panels.div_ceil(panel_groups);
    let out = OutPtr(c.as_mut_ptr());
    // Balanced k-blocks of at most `max_kc_words` steps.
    let k_blocks = b.depth.div_ceil(max_kc_words::<W>(kernel)).max(1);
    let mut kc_words = b.depth.div_ceil(k_blocks);
    if kernel == Kernel::Amx {
        // Whole tiles of 16 word steps in every block but the last.
        kc_words = kc_words.next_multiple_of(16);
    }
    // The AVX2 kernel takes one strip of 16 columns at a time, so that the strip's k-block
    // stays close (L1 and L2) across a block's tiles of rows, and `A` interleaved (below).
    let strip_cols = if kernel == Kernel::Avx2 || b.layout == Layout::Strips {
        16
    } else {
        NR
    };
    let interleave_a = kernel == Kernel::Avx2;
    (0..row_blocks * panel_groups)
        .into_par_iter()
        .for_each(|task| {
            let (block, group) = (task / panel_groups, task % panel_groups);
            let rows = block * rows_per_block..((block + 1) * rows_per_block).min(m);
            let panel_range =
                group * panels_per_group..((group + 1) * panels_per_group).min(panels);
            let out = &out;
            #[cfg(target_arch = "x86_64")]
            if kernel == Kernel::Amx {
                // SAFETY: `Amx` is one of `kernels` only where the CPU has AMX and the process
                // was granted the tile state. Loaded per task, so that no other AMX code (such
                // as candle's own quantized kernels) can have changed it on this thread since.
                unsafe { x86::load_tile_config() };
            }
            // BLIS order: a k-block of B's panels (`NC_PANELS` at a time, in L2/L3) is swept by
            // blocks of `MC` rows of A (in L2); each panel slice (or strip of it) by tiles of
            // `MR` rows (AMX: 32 or 16). Row blocks also keep the C rows a sweep writes on few
            // pages. With A interleaved, a block of rows is swept by every group of panels in
            // turn instead, so that it is interleaved once per k-block (the output head's
            // 32000 columns are 32 groups).
            let row_starts = rows.clone().step_by(MC);
            let blocks: Vec<(usize, usize)> = if interleave_a {
                row_starts
                    .flat_map(|mc0| {
                        panel_range
                            .clone()
                            .step_by(NC_PANELS)
                            .map(move |nc0| (mc0, nc0))
                    })
                    .collect()
            } else {
                panel_range
                    .clone()
                    .step_by(NC_PANELS)
                    .flat_map(|nc0| row_starts.clone().map(move |mc0| (mc0, nc0)))
                    .collect()
            };
            let mut interleaved = Vec::new();
            for kc0 in (0..b.depth).step_by(kc_words) {
                let kc = kc_words.min(b.depth - kc0);
                let mut interleaved_block = None;
                for &(mc0, nc0) in &blocks {
                    let nc_end = (nc0 + NC_PANELS).min(panel_range.end);
                    let mc_end = (mc0 + MC).min(rows.end);
                    if interleave_a && interleaved_block != Some(mc0) {
                        interleave_rows(a, lda, mc0..mc_end, kc0..kc0 + kc, &mut interleaved);
                        interleaved_block = Some(mc0);
                    }
                    for panel in nc0..nc_end {
                        let cols = NR.min(n - panel * NR);
                        let panel_words =
                            &b.words()[panel * b.depth * NR..(panel + 1) * b.depth * NR];
                        for first in (0..cols).step_by(strip_cols) {
                            let (b_start, b_step) = match b.layout {
                                Layout::Rows => (kc0 * NR + first, NR),
                                Layout::Strips => ((first / 16 * b.depth + kc0) * 16, 16),
                            };
                            let next = match (kernel, b.layout) {
                                (Kernel::Avx2, Layout::Strips) => {
                                    next_strip(b, panel, first, panel_range.end, kc0, kc)
                                }
                                _ => &[],
                            };
                            // Each tile of the sweep fetches its share of the next strip.
                            let share = 16 * kc.div_ceil((mc_end - mc0).div_ceil(MR));
                            let mut row = mc0;
                            while row < mc_end {
                                let from = ((row - mc0) / MR * share).min(next.len());
                                let prefetch = &next[from..(from + share).min(next.len())];
                                let (a_words, a_lda, a_step) = if interleave_a {
                                    (&interleaved[(row - mc0) * kc..], 1, MR)
                                } else {
                                    (&a[row * lda + kc0..], lda, 1)
                                };
                                let tile = Tile {
                                    a: a_words,
                                    lda: a_lda,
                                    a_step,
                                    b: &panel_words[b_start..],
                                    b_step,
                                    depth: kc,
                                    rows: tile_rows(kernel, mc_end - row),
                                    cols: strip_cols.min(cols - first),
                                    accumulate: kc0 > 0,
                                    prefetch,
                                };
                                tile.check(kernel);
                                // SAFETY: tasks own disjoint (row range × panel range)
                                // rectangles of C, and the tile writes rows
                                // `row..row + tile.rows` and columns
                                // `panel·NR + first..panel·NR + first + cols` of it, all
                                // inside `m × n`; `kernel` as the caller vouches.
                                unsafe {
                                    W::run(
                                        &tile,
                                        out.0.add(row * n + panel * NR + first),
                                        n,
                                        kernel,
                                    )
                                };
                                row += tile.rows;
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

/// Word steps of `B` per k-block with `kernel`, at most: for the AVX2 kernel a strip's k-block
/// (512 steps × 16 columns = 32 KiB, read from L1 and L2), the others a panel slice in L2.
///
/// The AVX2 kernel's blocks were 256 steps (16 KiB, to stay in L1 across a sweep) until 512 turned
/// out faster on every product of the reference step: for k = 512 it writes C once instead of
/// storing it, reading it back and storing it again, and the logits of the output head's forward
/// product are 16 MiB per 128-row chunk (a throwaway probe timing `product` on the step's shapes
/// with both sizes alternating in one process, two threads, AMD EPYC Zen 3, paired medians of 15:
/// the head's forward product +9%, its input gradient +5%, the layers' +4–6%).
fn max_kc_words<W: Word>(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Avx2 => 512,
        Kernel::Portable | Kernel::Avx512 | Kernel::Amx => W::KC_WORDS,
    }
}

/// The k-block `kc0..kc0 + kc` of the strip the AVX2 driver sweeps after strip `first / 16` of
/// `panel` (the panel's next strip, else the next panel's first, if it is below `panel_end`), in
/// [`Layout::Strips`]; empty after the last.
///
/// The tiles fetch it into L2 while they sweep the current strip (spread over them, one line per
/// kernel step): its lines otherwise come from L3 or memory as the first tile reaches them, and
/// the output head's 32000 columns are read once for each block of rows, its rows too few for
/// the sweep to hide the wait (the same probe as [`max_kc_words`], prefetch on and off: the
/// head's products +7–11% with blocks of 256 steps, +5–7% with 512; the layers' 0–3%).
fn next_strip<W: Word>(
    b: &PackedB<W>,
    panel: usize,
    first: usize,
    panel_end: usize,
    kc0: usize,
    kc: usize,
) -> &[W] {
    let start = if first + 16 < NR.min(b.n - panel * NR) {
        panel * b.depth * NR + ((first / 16 + 1) * b.depth + kc0) * 16
    } else if panel + 1 < panel_end {
        (panel + 1) * b.depth * NR + kc0 * 16
    } else {
        return &[];
    };
    &b.words()[start..start + kc * 16]
}

/// Copies `rows` × `steps` of the row-major `a` (row stride `lda`) into `out` as tiles of `MR`
/// rows, each `steps.len()` steps of `MR` values (one per row, zero past the last row): the
/// AVX2 kernel's broadcasts then read one sequential stream instead of `MR` rows `lda` apart.
fn interleave_rows<W: Word>(
    a: &[W],
    lda: usize,
    rows: std::ops::Range<usize>,
    steps: std::ops::Range<usize>,
    out: &mut Vec<W>,
) {
    let kc = steps.len();
    // Every value is written below, so the buffer kept from the last call is only grown, never
    // zeroed first (the zeroing was a tenth of this copy's samples).
    let len = rows.len().div_ceil(MR) * MR * kc;
    out.truncate(len);
    out.resize(len, W::default());
    for (tile, tile_out) in out.chunks_mut(MR * kc).enumerate() {
        let first = rows.start + tile * MR;
        let source = |r: usize| &a[(first + r) * lda + steps.start..(first + r) * lda + steps.end];
        if first + MR <= rows.end {
            // Step by step: six reads from six streams, one contiguous write.
            let sources: [&[W]; MR] = std::array::from_fn(source);
            for (p, step) in tile_out.chunks_exact_mut(MR).enumerate() {
                for (slot, row) in step.iter_mut().zip(&sources) {
                    *slot = row[p];
                }
            }
        } else {
            let present = rows.end - first;
            for (p, step) in tile_out.chunks_exact_mut(MR).enumerate() {
                for (r, slot) in step.iter_mut().enumerate() {
                    *slot = if r < present {
                        a[(first + r) * lda + steps.start + p]
                    } else {
                        W::default()
                    };
                }
            }
        }
    }
}

/// An output buffer shared by tasks that write disjoint parts of it (here rectangles of C; in
/// `attention.rs` the rows of a task's own heads).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every user writes through it only where no other task writes (see the writes in
// `matmul` and in `attention.rs`).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// One micro-kernel call: `rows × cols` of C from `depth` word steps.
pub struct Tile<'a, W> {
    /// Row `r`'s word step `p` is `a[r * lda + p * a_step]`: rows as they lie (`a_step` 1), or
    /// interleaved (`lda` 1, `a_step` [`MR`]).
    a: &'a [W],
    lda: usize,
    a_step: usize,
    /// Word step `p` of column `j < cols` is `b[p * b_step + j]`: in [`Layout::Rows`] a panel
    /// slice, or (for the AVX2 kernel) 16 columns of one, `b_step` [`NR`]; in
    /// [`Layout::Strips`] one strip of 16 columns, `b_step` 16.
    b: &'a [W],
    b_step: usize,
    depth: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    /// Lines the AVX2 kernel fetches into L2 while it runs, one per step from its first: a
    /// part of the strip the next tiles read (empty for none). Only prefetched, never read.
    prefetch: &'a [W],
}

impl<W> Tile<'_, W> {
    /// The bounds `kernel` relies on.
    fn check(&self, kernel: Kernel) {
        let max_rows = if kernel == Kernel::Amx { AMX_ROWS } else { MR };
        assert!((1..=max_rows).contains(&self.rows) && self.cols <= NR && self.depth >= 1);
        assert!(self.b_step.is_multiple_of(16));
        // The SIMD kernels read whole 16-column lines; the AVX-512 and AMX ones a panel's 64
        // columns of every step, with A's rows as they lie; the AVX2 one a strip, A interleaved.
        let (width, a_lda, a_step) = match kernel {
            Kernel::Portable => (self.cols, self.lda, self.a_step),
            Kernel::Avx2 => (16, 1, MR),
            Kernel::Avx512 | Kernel::Amx => {
                assert_eq!(self.b_step, NR, "the kernel steps through whole panels");
                (NR, self.lda, 1)
            }
        };
        assert!(self.cols <= width && width <= self.b_step);
        assert!(self.b.len() >= (self.depth - 1) * self.b_step + width);
        assert!((self.lda, self.a_step) == (a_lda, a_step));
        let last_row = if a_step == MR { MR - 1 } else { self.rows - 1 };
        assert!(self.a.len() > last_row * self.lda + (self.depth - 1) * self.a_step);
    }
}

/// The portable micro-kernel.
///
/// # Safety
/// `c` is valid for `tile.rows × tile.cols` writes with row stride `ldc`.
unsafe fn portable<W: Word>(tile: &Tile<'_, W>, c: *mut f32, ldc: usize) {
    let mut acc = [[0f32; NR]; MR];
    for (r, acc_row) in acc.iter_mut().enumerate().take(tile.rows) {
        let a_row = tile.a[r * tile.lda..].iter().step_by(tile.a_step);
        for (p, &a_word) in a_row.take(tile.depth).enumerate() {
            let b_row = &tile.b[p * tile.b_step..p * tile.b_step + tile.cols];
            for (slot, &b_word) in acc_row.iter_mut().zip(b_row) {
                for index in 0..W::DEPTH {
                    *slot += a_word.value(index) * b_word.value(index);
                }
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate().take(tile.rows) {
        for (col, &value) in acc_row.iter().enumerate().take(tile.cols) {
            // SAFETY: inside the `rows × cols` rectangle the caller vouches for.
            unsafe {
                let slot = c.add(r * ldc + col);
                *slot = if tile.accumulate {
                    *slot + value
                } else {
                    value
                };
            }
        }
    }
}

/// Whether the AVX-512 BF16 kernel runs on this CPU.
pub fn bf16_simd_available() -> bool {
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

/// Whether the AMX kernel runs here: the CPU has AMX-TILE and AMX-BF16, and Linux granted this
/// process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            x86::amx_granted()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Whether the CPU reports AMX-TILE and AMX-BF16 (CPUID only: asks Linux for nothing).
pub fn amx_in_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::amx_in_cpuid()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a vectorised f32 kernel (AVX-512F, or AVX2 with FMA) runs on this CPU.
pub fn f32_simd_available() -> bool {
    <f32 as Word>::best_kernel() != Kernel::Portable
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{AMX_ROWS, Bf16Pair, Kernel, MR, NR, Tile};

    /// CPUID leaf 7's AMX-BF16 and AMX-TILE bits.
    pub(super) fn amx_in_cpuid() -> bool {
        let leaf7 = __cpuid_count(7, 0);
        (leaf7.edx >> 22) & 1 == 1 && (leaf7.edx >> 24) & 1 == 1
    }

    /// CPUID leaf 7's AMX bits, then Linux's permission for the tile data (XTILEDATA, state
    /// component 18), which a process must ask for before its first tile instruction.
    #[cfg(target_os = "linux")]
    pub(super) fn amx_granted() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        if !amx_in_cpuid() {
            return false;
        }
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and touches no memory
        // of ours; it fails (non-zero) where the kernel does not support the state.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// The one tile configuration every AMX call uses: palette 1, eight tiles of 16 rows × 64
    /// bytes. `tmm0`–`tmm3` accumulate C (16 × 16 f32 each), `tmm4`/`tmm5` hold A (16 rows × 16
    /// bf16 pairs), `tmm6`/`tmm7` hold B (16 pair steps × 16 columns).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Loads the tile configuration on this thread (per-thread state, kept across context
    /// switches). The driver loads it at the start of each task that runs [`amx_bf16_kernel`].
    ///
    /// # Safety
    /// The CPU has AMX and the process was granted the tile state ([`amx_granted`]).
    pub(super) unsafe fn load_tile_config() {
        let mut config = TileConfig([0; 64]);
        config.0[0] = 1;
        for tile in 0..8 {
            config.0[16 + 2 * tile] = 64;
            config.0[48 + tile] = 16;
        }
        // SAFETY: a valid palette-1 configuration, 64 bytes, 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    }

    /// Runs `$before tmm{$index} $after` for a run-time C tile index `0..4`.
    macro_rules! on_c_tile {
        ($index:expr, $before:literal, $after:literal, $($operands:tt)*) => {
            match $index {
                0 => asm!(concat!($before, "tmm0", $after), $($operands)*),
                1 => asm!(concat!($before, "tmm1", $after), $($operands)*),
                2 => asm!(concat!($before, "tmm2", $after), $($operands)*),
                _ => asm!(concat!($before, "tmm3", $after), $($operands)*),
            }
        };
    }

    /// 64-byte aligned room for one C tile.
    #[repr(C, align(64))]
    struct CTile([[f32; 16]; 16]);

    /// One tile of 16 or 32 rows × up to 64 columns with AMX: each 32-column half of the panel
    /// is four (or, for 16 rows, two) C tiles, fed by two A and two B tiles per 16 word steps.
    /// Full C tiles are loaded from (when accumulating) and stored to C directly; partial ones
    /// go through a scratch tile. The depth's last `depth % 16` word steps are added by the
    /// AVX-512 BF16 kernel.
    ///
    /// # Safety
    /// The CPU has AMX, AVX-512F and AVX-512 BF16, the process was granted the tile state, and
    /// [`load_tile_config`] ran on this thread with no other AMX code since; `tile.rows` is 16
    /// or 32 and its slices cover what it reads (checked by the driver); `c` is valid for
    /// `tile.rows × tile.cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn amx_bf16_kernel(tile: &Tile<'_, Bf16Pair>, c: *mut f32, ldc: usize) {
        let steps = tile.depth / 16;
        let row_tiles = tile.rows / 16;
        let a = tile.a.as_ptr().cast::<u32>();
        let b = tile.b.as_ptr().cast::<u32>();
        let (lda, ldb, ldc_bytes) = (tile.lda * 4, NR * 4, ldc * 4);
        // Partial C tiles are stored here, all of them before any leaves AMX's registers for C,
        // so that no other code runs between the tile instructions.
        let mut scratch: [CTile; 4] = std::array::from_fn(|_| CTile([[0.0; 16]; 16]));
        // The whole tile's lines of C, before the first half's steps: the first half's C tiles
        // are loaded right away (when accumulating) and stored after them, the second half's
        // after its own. On a 2-core Intel Xeon with AMX (family 6 model 167), `bench-train
        // --preset reference --bf16-base`, six alternating pairs with a throwaway switch: 1906–
        // 2119 → 2060–2309 tokens/s, ahead in all six; SmolLM2 dims 512–589 → 558–603, ahead
        // in three pairs of four.
        if row_tiles == 2 {
            prefetch_c::<AMX_ROWS, NR>(c, ldc);
        } else {
            prefetch_c::<16, NR>(c, ldc);
        }
        for first in (0..tile.cols)
            .step_by(32)
            .take(if steps > 0 { 2 } else { 0 })
        {
            // C tile `t` covers rows `16 (t / 2)…` and columns `first + 16 (t % 2)…`.
            let tiles = row_tiles * 2;
            let corner = |t: usize| (16 * (t / 2), first + 16 * (t % 2));
            let full = |t: usize| corner(t).1 + 16 <= tile.cols;
            for t in 0..tiles {
                let (row, col) = corner(t);
                // SAFETY: a full tile's 16 rows × 16 columns lie inside the rectangle the
                // caller vouches for.
                unsafe {
                    if tile.accumulate && full(t) {
                        let at = c.add(row * ldc + col);
                        on_c_tile!(t, "tileloadd ", ", [{0} + {1}*1]", in(reg) at, in(reg) ldc_bytes, options(nostack, readonly));
                    } else {
                        on_c_tile!(t, "tilezero ", "", options(nostack, nomem));
                    }
                }
            }
            for step in 0..steps {
                // SAFETY (all reads): `16 step + 16 <= depth`; rows `r < tile.rows` of A hold
                // `depth` words at `r × lda`, and the panel slice `depth × NR` words, of which
                // the B tiles read columns `first..first + 32 <= NR` of word steps
                // `16 step..16 step + 16`.
                unsafe {
                    let a0 = a.add(step * 16);
                    let b0 = b.add(step * 16 * NR + first);
                    // The next step's B lines (a tile's 16 rows lie 256 bytes apart): 25–30% less
                    // time on the output head's products, whose 32 MB panels come from memory,
                    // 5–10% on the layers' (alternating runs of a throwaway probe timing
                    // `matmul`; two steps ahead was no better). Past the slice it fetches a
                    // neighbour's lines, harmlessly (a prefetch never faults).
                    let ahead = b0.wrapping_add(16 * NR);
                    for row in 0..16 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(row * NR).cast());
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(row * NR + 16).cast());
                    }
                    if row_tiles == 2 {
                        asm!(
                            "tileloadd tmm4, [{a0} + {lda}*1]",
                            "tileloadd tmm6, [{b0} + {ldb}*1]",
                            "tileloadd tmm7, [{b1} + {ldb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm5, [{a1} + {lda}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(16 * tile.lda),
                            b0 = in(reg) b0,
                            b1 = in(reg) b0.add(16),
                            lda = in(reg) lda,
                            ldb = in(reg) ldb,
                            options(nostack, readonly),
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {lda}*1]",
                            "tileloadd tmm6, [{b0} + {ldb}*1]",
                            "tileloadd tmm7, [{b1} + {ldb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            a0 = in(reg) a0,
                            b0 = in(reg) b0,
                            b1 = in(reg) b0.add(16),
                            lda = in(reg) lda,
                            ldb = in(reg) ldb,
                            options(nostack, readonly),
                        );
                    }
                }
            }
            let partial = |t: usize| corner(t).1 < tile.cols && !full(t);
            for (t, scratch) in scratch.iter_mut().enumerate().take(tiles) {
                let (row, col) = corner(t);
                // SAFETY: a full tile's 16 × 16 lie inside the caller's rectangle; a partial
                // one goes to its 1 KiB scratch tile.
                unsafe {
                    if full(t) {
                        let at = c.add(row * ldc + col);
                        on_c_tile!(t, "tilestored [{0} + {1}*1], ", "", in(reg) at, in(reg) ldc_bytes, options(nostack));
                    } else if partial(t) {
                        let into = scratch.0.as_mut_ptr().cast::<f32>();
                        on_c_tile!(t, "tilestored [{0} + {1}*1], ", "", in(reg) into, in(reg) 64usize, options(nostack));
                    }
                }
            }
            for (t, scratch) in scratch.iter().enumerate().take(tiles) {
                if partial(t) {
                    let (row, col) = corner(t);
                    // SAFETY: columns `col..tile.cols` (under 16) of rows `row..row + 16`, inside
                    // the caller's rectangle.
                    unsafe {
                        store_rows(
                            scratch,
                            tile.cols - col,
                            tile.accumulate,
                            c.add(row * ldc + col),
                            ldc,
                        )
                    };
                }
            }
        }
        let rest = tile.depth - 16 * steps;
        if rest == 0 {
            return;
        }
        for first_row in (0..tile.rows).step_by(MR) {
            let part = Tile {
                a: &tile.a[first_row * tile.lda + 16 * steps..],
                lda: tile.lda,
                a_step: 1,
                b: &tile.b[16 * steps * NR..],
                b_step: NR,
                depth: rest,
                rows: MR.min(tile.rows - first_row),
                cols: tile.cols,
                accumulate: tile.accumulate || steps > 0,
                prefetch: &[],
            };
            part.check(Kernel::Avx512);
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16; `part` was checked; its rows lie
            // inside the caller's rectangle.
            unsafe {
                by_height!(
                    part.rows,
                    self::bf16_kernel,
                    &part,
                    c.add(first_row * ldc),
                    ldc
                )
            }
        }
    }

    /// Stores (or adds) a C tile's 16 rows, first `cols` (< 16) columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `c` is valid for `16 × cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rows(tile: &CTile, cols: usize, accumulate: bool, c: *mut f32, ldc: usize) {
        debug_assert!(cols < 16, "full tiles are stored directly");
        let mask: __mmask16 = (1u16 << cols.min(15)) - 1;
        for (r, row) in tile.0.iter().enumerate() {
            // SAFETY: the masked lanes are columns `< cols` of row `r < 16`.
            unsafe {
                let value = _mm512_loadu_ps(row.as_ptr());
                let slot = c.add(r * ldc);
                let value = if accumulate {
                    _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, slot))
                } else {
                    value
                };
                _mm512_mask_storeu_ps(slot, mask, value);
            }
        }
    }

    /// Rounds `values` to bf16 pairs in `words`, 32 values at a time (`vcvtne2ps2bf16`, round
    /// to nearest even); returns how many words it wrote (the rest is left to the caller).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_pairs(values: &[f32], words: &mut [Bf16Pair]) -> usize {
        let chunks = (values.len() / 32).min(words.len() / 16);
        for chunk in 0..chunks {
            // SAFETY: `chunk < chunks`, so 32 values and 16 words are in bounds; a `Bf16Pair`
            // is a transparent u32.
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

    /// Asks for the lines of a tile of C (`ROWS` rows × up to `COLS` columns) before a kernel's
    /// loop: C is read and written (or only written) after the last of up to 256 (AVX-512 bf16
    /// pairs) or 512 (AVX2, AVX-512 f32) word steps, where `perf annotate` found the loads waiting
    /// on L3 or memory. A row's `COLS` values span at most the lines of every 16th column and of
    /// the last one, at any alignment (16 columns: two lines; 64: five). A prefetch never faults;
    /// `wrapping_add` because a narrow tile's last row may end, with C, before column `COLS`.
    ///
    /// Measured with the AVX-512 kernels on a 2-core AMD EPYC Zen 5 (`bench-train --preset
    /// reference`, a throwaway switch, eight alternating pairs each, either one first in half):
    /// medians f32 1911 → 1985 tokens/s, bf16 2828 → 2896, the prefetch ahead in six pairs of
    /// eight for each. With the AVX2 kernel on a 2-core Zen 3, seven alternating pairs: 426–509 →
    /// 485–551 tokens/s.
    #[inline(always)]
    fn prefetch_c<const ROWS: usize, const COLS: usize>(c: *mut f32, ldc: usize) {
        // SAFETY (both prefetches): a prefetch has no architectural effect and never faults, at
        // any address. Counted loops over constants, which the compiler unrolls.
        for r in 0..ROWS {
            let row = c.wrapping_add(r * ldc);
            for line in 0..COLS / 16 {
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16 * line).cast()) };
            }
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(COLS - 1).cast()) };
        }
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `tile`'s slices cover what it reads (checked by
    /// the driver); `c` is valid for `ROWS × tile.cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_kernel<const ROWS: usize>(
        tile: &Tile<'_, Bf16Pair>,
        c: *mut f32,
        ldc: usize,
    ) {
        prefetch_c::<ROWS, NR>(c, ldc);
        let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
        let a = tile.a.as_ptr().cast::<u32>();
        let b = tile.b.as_ptr().cast::<u32>();
        for p in 0..tile.depth {
            // SAFETY (all reads): `p < depth`, the panel slice holds `depth × NR` words and row
            // `r < ROWS` of A holds `depth` words at `r × lda`; a `Bf16Pair` is a transparent
            // u32.
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
        // SAFETY: as this function's caller vouches.
        unsafe { store(&acc, tile.cols, tile.accumulate, c, ldc) }
    }

    /// Word steps ahead of the f32 kernel's loads that it prefetches the panel's lines.
    const PREFETCH_STEPS: usize = 32;

    /// # Safety
    /// The CPU has AVX-512F; `tile`'s slices cover what it reads (checked by the driver); `c` is
    /// valid for `ROWS × tile.cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_kernel<const ROWS: usize>(
        tile: &Tile<'_, f32>,
        c: *mut f32,
        ldc: usize,
    ) {
        prefetch_c::<ROWS, NR>(c, ldc);
        let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
        let a = tile.a.as_ptr();
        let b = tile.b.as_ptr();
        for p in 0..tile.depth {
            // SAFETY (all reads): as in `bf16_kernel`.
            unsafe {
                let line = b.add(p * NR);
                // The panel slice (up to 512 steps × 256 bytes) is read from L2 once per tile;
                // fetching its lines 32 steps (8 KiB) ahead into L1 cut the step's products by
                // 6–12% (a throwaway probe timing `product` on the reference step's shapes, with
                // distances 0, 4, 8, 16, 24 and 32 in alternating rounds; 16–32 alike). Past the
                // slice's end it fetches the next k-block's or panel's lines, which a prefetch
                // may (it never faults).
                let ahead = line.wrapping_add(PREFETCH_STEPS * NR);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(32).cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(48).cast());
                let b0 = _mm512_loadu_ps(line);
                let b1 = _mm512_loadu_ps(line.add(16));
                let b2 = _mm512_loadu_ps(line.add(32));
                let b3 = _mm512_loadu_ps(line.add(48));
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let broadcast = _mm512_set1_ps(*a.add(r * tile.lda + p));
                    acc_row[0] = _mm512_fmadd_ps(broadcast, b0, acc_row[0]);
                    acc_row[1] = _mm512_fmadd_ps(broadcast, b1, acc_row[1]);
                    acc_row[2] = _mm512_fmadd_ps(broadcast, b2, acc_row[2]);
                    acc_row[3] = _mm512_fmadd_ps(broadcast, b3, acc_row[3]);
                }
            }
        }
        // SAFETY: as this function's caller vouches.
        unsafe { store(&acc, tile.cols, tile.accumulate, c, ldc) }
    }

    /// The f32 kernel in 256-bit registers: a 6 × 16 tile (12 accumulators, 2 registers of B,
    /// 1 broadcast of the 16 registers) from one strip of B (`b_step` words per step, usually
    /// the strip's contiguous 16) and `A` interleaved by the driver (`MR` values per step).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `tile`'s slices cover what it reads (checked by the driver:
    /// `cols <= 16`, `a_step == MR`); `c` is valid for `ROWS × tile.cols` writes with row
    /// stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_avx2_kernel<const ROWS: usize>(
        tile: &Tile<'_, f32>,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut a = tile.a.as_ptr();
        let mut b = tile.b.as_ptr();
        // C's lines, up to 512 steps (about 3,000 cycles) before the loads and stores use them.
        prefetch_c::<ROWS, 16>(c, ldc);
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        // One step; a macro rather than a closure, which might not inherit the target features.
        macro_rules! step {
            () => {
                // SAFETY (all reads): at the `p`-th step (`p < depth`) `b` points at the strip's
                // 16 values at `p × b_step` and `a` at A's `MR` values at `p × MR` (`ROWS <= MR`),
                // inside the checked slices. The pointers move by `wrapping_add`: after the last
                // step, in `Layout::Rows`, `b` may point past the slice's end (never read).
                unsafe {
                    let b0 = _mm256_loadu_ps(b);
                    let b1 = _mm256_loadu_ps(b.add(8));
                    for (r, acc_row) in acc.iter_mut().enumerate() {
                        let broadcast = _mm256_broadcast_ss(&*a.add(r));
                        acc_row[0] = _mm256_fmadd_ps(broadcast, b0, acc_row[0]);
                        acc_row[1] = _mm256_fmadd_ps(broadcast, b1, acc_row[1]);
                    }
                }
                a = a.wrapping_add(MR);
                b = b.wrapping_add(tile.b_step);
            };
        }
        let prefetched = tile.prefetch.chunks(16).take(tile.depth);
        let fetching = prefetched.len();
        for line in prefetched {
            _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
            step!();
        }
        for _ in fetching..tile.depth {
            step!();
        }
        // SAFETY: as this function's caller vouches.
        unsafe { store_avx2(&acc, tile.cols, tile.accumulate, c, ldc) }
    }

    /// Stores (or adds) the 256-bit accumulators' first `cols` (≤ 16) columns.
    ///
    /// # Safety
    /// The CPU has AVX2; `c` is valid for `ROWS × cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx2")]
    unsafe fn store_avx2<const ROWS: usize>(
        acc: &[[__m256; 2]; ROWS],
        cols: usize,
        accumulate: bool,
        c: *mut f32,
        ldc: usize,
    ) {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, &value) in acc_row.iter().enumerate() {
                let first = v * 8;
                if first >= cols {
                    break;
                }
                let left = (cols - first).min(8) as i32;
                // SAFETY: full stores write columns `first..first + 8 <= cols` of row
                // `r < ROWS`; masked ones only the lanes `< left`, columns `< cols`.
                unsafe {
                    let slot = c.add(r * ldc + first);
                    if left == 8 {
                        let value = if accumulate {
                            _mm256_add_ps(value, _mm256_loadu_ps(slot))
                        } else {
                            value
                        };
                        _mm256_storeu_ps(slot, value);
                    } else {
                        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
                        let value = if accumulate {
                            _mm256_add_ps(value, _mm256_maskload_ps(slot, mask))
                        } else {
                            value
                        };
                        _mm256_maskstore_ps(slot, mask, value);
                    }
                }
            }
        }
    }

    /// Stores (or adds) the accumulators' first `cols` columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `c` is valid for `ROWS × cols` writes with row stride `ldc`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const ROWS: usize>(
        acc: &[[__m512; 4]; ROWS],
        cols: usize,
        accumulate: bool,
        c: *mut f32,
        ldc: usize,
    ) {
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, &value) in acc_row.iter().enumerate() {
                let first = v * 16;
                if first >= cols {
                    break;
                }
                let left = cols - first;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                // SAFETY: the masked lanes are columns `< cols` of row `r < ROWS`.
                unsafe {
                    let slot = c.add(r * ldc + first);
                    let value = if accumulate {
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
        crate::testing::hashed_values(len, seed, 2001, 1000.0, -1.0)
    }

    /// `A·Wᵀ` in f64 of the inputs as `round` leaves them.
    fn reference(
        a: &[f32],
        w: &[f32],
        (m, k, n): (usize, usize, usize),
        round: impl Fn(f32) -> f32,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| f64::from(round(a[i * k + l])) * f64::from(round(w[j * k + l])))
                    .sum();
            }
        }
        c
    }

    /// Odd k, partial panels (1–15, 20, 40 columns in the last one: partial 8- and 16-lane
    /// registers, partial AVX2 strips), row counts that leave every tile height 1–6, k over
    /// several blocks. For AMX: 32- and 16-row tiles with rows left over, depths under one
    /// tile step (15 word steps), exactly whole steps (32), and with steps left over in one
    /// block and in several; partial C tiles in either half of a panel and in either column of
    /// a half, also accumulated over k-blocks, an empty half, and more rows than one `MC` block.
    /// The tests run them on the global pool and on one thread (where every task holds all
    /// rows and panels: several `MC` blocks and several groups of `NC_PANELS` panels in one).
    const EDGE_SHAPES: [(usize, usize, usize); 18] = [
        (1, 1, 1),
        (2, 9, 24),
        (4, 37, 77),
        (5, 600, 104),
        (7, 5, 3),
        (10, 70, 40),
        (11, 130, 20),
        (13, 130, 70),
        (6, 200, 64),
        (33, 401, 129),
        (25, 600, 65),
        (32, 30, 33),
        (48, 64, 80),
        (64, 1100, 100),
        (130, 70, 120),
        (40, 1100, 50),
        // Over `min_rows_per_block` for every kernel: rows split between threads.
        (300, 40, 130),
        // Over `NC_PANELS` panels, and over `MC` rows on one thread, with k over two blocks.
        (110, 300, 1100),
    ];

    /// Runs `test` on the global pool, then on a pool of one thread.
    fn on_each_pool(test: impl Fn() + Send + Sync) {
        test();
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(test);
    }

    /// Every kernel this CPU runs for `W`, with every layout it reads.
    fn layouts_and_kernels<W: Word>() -> Vec<(Layout, Kernel)> {
        let pairs: Vec<_> = [Layout::Rows, Layout::Strips]
            .into_iter()
            .flat_map(|layout| W::kernels().iter().map(move |&kernel| (layout, kernel)))
            .filter(|(layout, kernel)| layout.supports(*kernel))
            .collect();
        if W::kernels().contains(&Kernel::Avx2) {
            assert!(pairs.contains(&(Layout::Rows, Kernel::Avx2)));
            assert!(pairs.contains(&(Layout::Strips, Kernel::Avx2)));
        }
        pairs
    }

    #[test]
    fn both_layouts_store_the_same_matrix() {
        let (k, n) = (37, 150);
        let w = values(k * n, 5);
        let rows = PackedB::<f32>::pack_in(Layout::Rows, k, n, |l, j| w[l * n + j]);
        let strips = PackedB::<f32>::pack_in(Layout::Strips, k, n, |l, j| w[l * n + j]);
        let (mut from_rows, mut from_strips) = (vec![0f32; n], vec![0f32; n]);
        for l in 0..k {
            rows.row_into(l, &mut from_rows);
            strips.row_into(l, &mut from_strips);
            assert_eq!(from_rows, w[l * n..(l + 1) * n]);
            assert_eq!(from_strips, from_rows);
            for j in 0..n {
                assert_eq!(strips.get(l, j), w[l * n + j]);
            }
        }
        // Strip `s` of panel `p` is `depth` steps of 16 columns, contiguous.
        assert_eq!(strips.words()[strips.word_index(5, 64 + 20)], w[5 * n + 84]);
        assert_eq!(strips.word_index(5, 64 + 20), 64 * k + k * 16 + 5 * 16 + 4);
    }

    /// The AVX2 driver prefetches the k-block of the strip it sweeps next: the panel's next
    /// strip, after a panel's last the next panel's first, after the range's last nothing.
    #[test]
    fn the_next_strip_is_the_k_block_swept_next() {
        let (k, n) = (600, 150);
        let w = values(k * n, 6);
        let b = PackedB::<f32>::pack_in(Layout::Strips, k, n, |l, j| w[l * n + j]);
        let panels = n.div_ceil(NR);
        let block = |col: usize, kc0: usize, kc: usize| -> Vec<f32> {
            (kc0..kc0 + kc)
                .flat_map(|p| (col..col + 16).map(move |j| (p, j)))
                .map(|(p, j)| b.words()[b.word_index(p, j)])
                .collect()
        };
        for (kc0, kc) in [(0, 300), (300, 300)] {
            assert_eq!(next_strip(&b, 0, 0, panels, kc0, kc), block(16, kc0, kc));
            assert_eq!(next_strip(&b, 0, 48, panels, kc0, kc), block(64, kc0, kc));
            // Panel 2 has 22 columns: strips 0 and 1, then no panel after it.
            assert_eq!(next_strip(&b, 2, 0, panels, kc0, kc), block(144, kc0, kc));
            assert!(next_strip(&b, 2, 16, panels, kc0, kc).is_empty());
            // A task's range of panels ends before panel 2.
            assert!(next_strip(&b, 1, 48, 2, kc0, kc).is_empty());
        }
    }

    #[test]
    fn interleaving_puts_each_steps_rows_side_by_side() {
        let (lda, rows) = (10, 2..9);
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        // A reused buffer's stale values (NaN here) are all overwritten.
        let mut out = vec![f32::NAN; 100];
        interleave_rows(&a, lda, rows, 3..7, &mut out);
        // Two tiles of MR = 6 rows × 4 steps; the second has one row, then zeros.
        assert_eq!(out.len(), 2 * MR * 4);
        assert!(out.iter().all(|value| value.is_finite()));
        assert_eq!(&out[..MR], &[23.0, 33.0, 43.0, 53.0, 63.0, 73.0]);
        assert_eq!(&out[3 * MR..4 * MR], &[26.0, 36.0, 46.0, 56.0, 66.0, 76.0]);
        assert_eq!(&out[4 * MR..5 * MR], &[83.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(out[7 * MR], 86.0);
    }

    fn assert_close(expected: &[f64], got: &[f32], k: usize, what: &str) {
        for (index, (&e, &g)) in expected.iter().zip(got).enumerate() {
            let tolerance = 1e-5 * (k as f64).sqrt() * (1.0 + e.abs());
            assert!(
                (e - f64::from(g)).abs() < tolerance,
                "{what} at {index}: {e} vs {g}"
            );
        }
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
    fn bf16_products_match_f64_of_rounded_inputs_for_every_edge_shape() {
        on_each_pool(bf16_edge_shapes);
    }

    fn bf16_edge_shapes() {
        for (m, k, n) in EDGE_SHAPES {
            let (a, w) = (values(m * k, 1), values(n * k, 2));
            let expected = reference(&a, &w, (m, k, n), |x| from_bf16(to_bf16(x)));
            let a = pack_a(&a, m, k);
            for (layout, kernel) in layouts_and_kernels::<Bf16Pair>() {
                let packed = PackedB::<Bf16Pair>::pack_in(layout, k, n, |l, j| w[j * k + l]);
                let got = matmul_with(&a, m, &packed, kernel);
                assert_close(
                    &expected,
                    &got,
                    k,
                    &format!("bf16 {m}x{k}x{n} ({layout:?}, {kernel:?})"),
                );
            }
        }
    }

    #[test]
    fn f32_products_match_f64_for_every_edge_shape() {
        on_each_pool(f32_edge_shapes);
    }

    fn f32_edge_shapes() {
        for (m, k, n) in EDGE_SHAPES {
            let (a, w) = (values(m * k, 3), values(n * k, 4));
            let expected = reference(&a, &w, (m, k, n), |x| x);
            let a = AOperand::rows(Cow::Borrowed(&a[..]), k);
            for (layout, kernel) in layouts_and_kernels::<f32>() {
                let packed = PackedB::<f32>::pack_in(layout, k, n, |l, j| w[j * k + l]);
                let got = matmul_with(&a, m, &packed, kernel);
                assert_close(
                    &expected,
                    &got,
                    k,
                    &format!("f32 {m}x{k}x{n} ({layout:?}, {kernel:?})"),
                );
            }
        }
    }

    /// Both packings of a weight store it as the precision rounds it, and `g·W` with `g` the
    /// identity's first rows gives W's rows back.
    fn both_packings_give_the_two_products<W: Word>(round: impl Fn(f32) -> f32) {
        let (rows, cols) = (70, 37);
        let w = values(rows * cols, 3);
        let forward = PackedB::<W>::transposed_of(&w, rows, cols);
        let backward = PackedB::<W>::of(&w, rows, cols);
        assert_eq!((forward.k(), forward.n()), (cols, rows));
        assert_eq!((backward.k(), backward.n()), (rows, cols));
        for (r, c) in [(0, 0), (69, 36), (5, 20), (64, 1)] {
            let stored = round(w[r * cols + c]);
            assert_eq!(forward.get(c, r), stored);
            assert_eq!(backward.get(r, c), stored);
        }
        let mut row = vec![0f32; cols];
        backward.row_into(69, &mut row);
        assert_eq!(
            row,
            w[69 * cols..].iter().map(|&x| round(x)).collect::<Vec<_>>()
        );
        let g: Vec<f32> = (0..3 * rows)
            .map(|i| f32::from(u8::from(i % (rows + 1) == 0)))
            .collect();
        let rows_back = product(&g, 3, &backward);
        for r in 0..3 {
            for c in 0..cols {
                assert_eq!(rows_back[r * cols + c], round(w[r * cols + c]));
            }
        }
    }

    #[test]
    fn both_packings_of_a_weight_give_its_two_products() {
        both_packings_give_the_two_products::<Bf16Pair>(|x| from_bf16(to_bf16(x)));
        both_packings_give_the_two_products::<f32>(|x| x);
    }
}
