//! This CPU's peak multiply-add rates, measured rather than looked up: independent chains of
//! f32 FMAs (`vfmadd…ps`, 512-bit with AVX-512F, else 256-bit with AVX2 and FMA) and of bf16
//! pair dot products (`vdpbf16ps`) on every rayon thread.
//!
//! Two uses. `bench-train` states its throughput as a share of the peak of the base's products,
//! so a figure from one machine can be read on another. And the bf16 base is only worth its
//! rounding where `vdpbf16ps` outruns f32 FMAs. On the AMD EPYC Zen 4 and Zen 5 these machines
//! had, the bf16 base trained 1.6× and 1.5× as fast as f32 (this probe: 993 against 545 GFLOP/s
//! on the Zen 5), which `Llama::pack_base_f32` says in a log line; on the Intel Xeon (family 6,
//! model 207) it measured `vdpbf16ps` at half the f32 FMA's flop rate (170 against 345 GFLOP/s
//! on 2 cores), which `Llama::pack_base_bf16` warns about.
#![allow(
    unsafe_code,
    reason = "calls into AVX-512 and AVX2 functions after checking at run time that the CPU has them"
)]

use std::hint::black_box;
use std::time::Instant;

/// Peak rates in GFLOP/s (a multiply-add counts two), over all of rayon's threads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub threads: usize,
    /// f32 FMAs, in the widest registers the CPU has (512 or 256 bits).
    pub f32_gflops: f64,
    /// `vdpbf16ps` (bf16 pairs into f32); `None` without AVX-512 BF16.
    pub bf16_gflops: Option<f64>,
}

/// Iterations per thread per timing: 12 chains × 4 M at one FMA a cycle per chain is a few
/// milliseconds.
const ITERATIONS: usize = 4_000_000;

/// Both peaks (best of three timings each, a few tens of milliseconds in all), measured once per
/// process; `None` on CPUs with neither AVX-512F nor AVX2 and FMA.
pub fn measure() -> Option<Peak> {
    static PEAK: std::sync::OnceLock<Option<Peak>> = std::sync::OnceLock::new();
    *PEAK.get_or_init(|| measure_with(ITERATIONS))
}

fn measure_with(iterations: usize) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let threads = rayon::current_num_threads().max(1);
        // SAFETY: the CPU has AVX-512F (checked just above).
        let f32_gflops = best_rate(threads, iterations, x86::FLOP_PER_FMA, |n| unsafe {
            x86::fma_chains(n)
        });
        let bf16_gflops = std::arch::is_x86_feature_detected!("avx512bf16").then(|| {
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above).
            best_rate(threads, iterations, x86::FLOP_PER_DOT, |n| unsafe {
                x86::dot_chains(n)
            })
        });
        return Some(Peak {
            threads,
            f32_gflops,
            bf16_gflops,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let threads = rayon::current_num_threads().max(1);
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        let f32_gflops = best_rate(threads, iterations, x86::FLOP_PER_FMA_256, |n| unsafe {
            x86::fma_chains_256(n)
        });
        return Some(Peak {
            threads,
            f32_gflops,
            bf16_gflops: None,
        });
    }
    let _ = iterations;
    None
}

/// GFLOP/s of `run` on every thread at once, best of three.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn best_rate(
    threads: usize,
    iterations: usize,
    flop_per_iteration: f64,
    run: impl Fn(usize) -> f32 + Sync,
) -> f64 {
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let sums = rayon::broadcast(|_| run(black_box(iterations)));
            black_box(sums);
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            threads as f64 * iterations as f64 * flop_per_iteration / seconds / 1e9
        })
        .fold(0.0, f64::max)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// Independent accumulators: enough to cover the FMA latency on two ports.
    const CHAINS: usize = 12;
    /// 16 lanes × 2 flop per chain and iteration.
    pub(super) const FLOP_PER_FMA: f64 = (CHAINS * 16 * 2) as f64;
    /// 8 lanes × 2 flop per chain and iteration.
    pub(super) const FLOP_PER_FMA_256: f64 = (CHAINS * 8 * 2) as f64;
    /// 16 lanes × 2 pairs × 2 flop.
    pub(super) const FLOP_PER_DOT: f64 = (CHAINS * 16 * 2 * 2) as f64;

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_chains(iterations: usize) -> f32 {
        let factor = _mm512_set1_ps(black_box(0.999_9));
        let term = _mm512_set1_ps(black_box(1e-4));
        let mut acc = [_mm512_set1_ps(black_box(0.5)); CHAINS];
        for _ in 0..iterations {
            for chain in &mut acc {
                *chain = _mm512_fmadd_ps(*chain, factor, term);
            }
        }
        acc.iter().map(|&chain| _mm512_reduce_add_ps(chain)).sum()
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_chains_256(iterations: usize) -> f32 {
        let factor = _mm256_set1_ps(black_box(0.999_9));
        let term = _mm256_set1_ps(black_box(1e-4));
        let mut acc = [_mm256_set1_ps(black_box(0.5)); CHAINS];
        for _ in 0..iterations {
            for chain in &mut acc {
                *chain = _mm256_fmadd_ps(*chain, factor, term);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = 0.0;
        for chain in acc {
            // SAFETY: `lanes` holds 8 values.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), chain) };
            sum += lanes.iter().sum::<f32>();
        }
        sum
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_chains(iterations: usize) -> f32 {
        let ones = _mm512_set1_ps(black_box(1.0));
        let small = _mm512_set1_ps(black_box(1e-4));
        let (left, right) = (
            _mm512_cvtne2ps_pbh(ones, ones),
            _mm512_cvtne2ps_pbh(small, small),
        );
        let mut acc = [_mm512_set1_ps(black_box(0.5)); CHAINS];
        for _ in 0..iterations {
            for chain in &mut acc {
                *chain = _mm512_dpbf16_ps(*chain, left, right);
            }
        }
        acc.iter().map(|&chain| _mm512_reduce_add_ps(chain)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_are_positive_where_measured() {
        // Fewer iterations than `measure`: this build is not optimised.
        let Some(peak) = measure_with(100_000) else {
            return;
        };
        assert!(peak.threads >= 1);
        // Even a debug build on one slow core does more than 0.1 GFLOP/s.
        assert!(peak.f32_gflops > 0.1, "{peak:?}");
        if let Some(bf16) = peak.bf16_gflops {
            assert!(bf16 > 0.1, "{peak:?}");
        }
    }
}
