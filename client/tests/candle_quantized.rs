//! The vendored candle-core's AVX2 dot product for Q4_1 blocks (vendor/README.md): the release
//! multiplies Q4_1 weights (SmolLM2's GGUF, for one) by a scalar loop when decoding with a
//! quantized base. The AVX2 build must give the scalar loop's value, up to the order of its
//! float sums.
#![allow(clippy::unwrap_used, reason = "tests")]

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};

/// Values spread over several magnitudes and both signs, from a fixed recurrence.
fn spread(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let hashed = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((hashed >> 8) % 20_001) as f32 / 1_000.0 - 10.0
        })
        .collect()
}

#[test]
fn q4_1_dot_products_match_the_scalar_loop() {
    #[cfg(target_arch = "x86_64")]
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    {
        eprintln!("no AVX2 and FMA here: the scalar loop is compared with itself");
    }
    // Whole pairs of blocks: the scalar loop asserts an even count (llama.cpp unrolls by two).
    for (len, seed) in [(64, 1), (128, 2), (576, 3), (1536, 4)] {
        let (x, y) = (spread(len, seed), spread(len, seed + 100));
        let mut weights = vec![BlockQ4_1::zeros(); len / 32];
        let mut activations = vec![BlockQ8_1::zeros(); len / 32];
        BlockQ4_1::from_float(&x, &mut weights);
        BlockQ8_1::from_float(&y, &mut activations);
        let fast = BlockQ4_1::vec_dot(len, &weights, &activations);
        let scalar = BlockQ4_1::vec_dot_unopt(len, &weights, &activations);
        // The sums' rounding grows with the terms' magnitude, not with the result's.
        let exact: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let magnitude: f32 = x.iter().zip(&y).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (fast - scalar).abs() <= 1e-6 * magnitude,
            "{len}: {fast} vs {scalar}"
        );
        // And both are the dot product of the values, within the blocks' rounding.
        assert!(
            (fast - exact).abs() <= 0.05 * magnitude,
            "{len}: {fast} vs {exact}"
        );
    }
}
