//! Helpers shared by the crate's unit tests.
#![allow(clippy::unwrap_used, reason = "tests")]

use candle_core::{Device, Tensor, Var};
use rand::Rng;

use crate::model::lora::seeded_rng;
use crate::model::{BaseModel, Llama};

/// All logits of `model` for `input`, flattened.
pub fn logits(model: &Llama, input: &Tensor) -> Vec<f32> {
    flat(&model.forward(input).unwrap())
}

/// `len` values spread evenly over `[offset, offset + (modulus − 1)/divisor]`, scrambled by a
/// multiplicative hash of the index (`seed` shifts it): every kind of mantissa, reproducible.
pub fn hashed_values(len: usize, seed: u32, modulus: u32, divisor: f32, offset: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (x % modulus) as f32 / divisor + offset
        })
        .collect()
}

/// A tensor's values, flattened to f32.
pub fn flat(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest element-wise absolute difference.
pub fn max_abs_difference(expected: &[f32], got: &[f32]) -> f32 {
    assert_eq!(expected.len(), got.len());
    expected
        .iter()
        .zip(got)
        .map(|(e, g)| (e - g).abs())
        .fold(0.0f32, f32::max)
}

/// Sets every attached `lora_B` to U(−bound, bound): PEFT's B = 0 makes the adapter a no-op and
/// ∂L/∂A exactly zero, which tests of adapted models must avoid.
pub fn randomize_lora_b(model: &Llama, bound: f32, seed: u64) {
    let mut rng = seeded_rng(seed);
    for (name, var) in model.named_lora_vars().unwrap() {
        if name.contains("lora_B") {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Squared L2 norm of a tensor.
pub fn squared_norm(tensor: &Tensor) -> f32 {
    tensor
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Squared L2 norm of `var`'s gradient; panics if it has none.
pub fn gradient_norm_squared(
    gradients: &candle_core::backprop::GradStore,
    var: &candle_core::Var,
    name: &str,
) -> f32 {
    squared_norm(
        gradients
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient")),
    )
}

/// The tiny test model (`crate::tiny`), written to a temporary directory and loaded on the CPU.
pub fn tiny_base() -> (tempfile::TempDir, BaseModel) {
    let dir = tempfile::tempdir().unwrap();
    crate::tiny::write_tiny_model(dir.path(), &crate::tiny::TinyModelSpec::default()).unwrap();
    let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
    (dir, base)
}

/// Values and input gradients of `fused(x)` against `composed(x)` (candle's ops), under a
/// random linear loss.
pub fn assert_same_as_composed(
    shape: &[usize],
    fused: impl Fn(&Tensor) -> Tensor,
    composed: impl Fn(&Tensor) -> Tensor,
) {
    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device).unwrap()).unwrap();
    let target = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
    let expected = composed(x.as_tensor());
    let got = fused(x.as_tensor());
    assert!(max_abs_difference(&flat(&expected), &flat(&got)) < 1e-5);
    let loss = |y: &Tensor| (y * &target).unwrap().sum_all().unwrap();
    let expected = loss(&expected).backward().unwrap();
    let got = loss(&got).backward().unwrap();
    let (expected, got) = (
        flat(expected.get(x.as_tensor()).unwrap()),
        flat(got.get(x.as_tensor()).unwrap()),
    );
    let error = max_abs_difference(&expected, &got);
    assert!(error < 1e-4, "gradient differs by {error}");
    assert!(
        expected.iter().any(|g| g.abs() > 1e-3),
        "a gradient to compare"
    );
}

/// One file the `corrupted_*_never_panic` tests corrupt: where, its good bytes, and how long a
/// prefix of them to corrupt (a header, or the whole file).
pub struct Corruptible {
    pub path: std::path::PathBuf,
    pub bytes: Vec<u8>,
    pub prefix: usize,
}

/// Randomized corruption: `cases` times (the environment variable `variable`, else `default`),
/// writes one of `files` with 1–3 bytes of its prefix replaced (by one of `specials`, a flipped
/// bit or a random byte), calls `load`, and writes the file back. Panics, naming the case and
/// the file, where `load` panics, and where (from 20 cases) none loaded or none was refused;
/// returns how many cases loaded and how many were refused.
pub fn corruption_never_panics<T>(
    variable: &str,
    default: usize,
    seed: u64,
    files: &[Corruptible],
    specials: &[u8],
    mut load: impl FnMut() -> crate::error::Result<T>,
) -> (usize, usize) {
    let cases = std::env::var(variable)
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default);
    let mut rng = seeded_rng(seed);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases {
        let file = &files[rng.random_range(0..files.len())];
        let mut corrupt = file.bytes.clone();
        for _ in 0..rng.random_range(1..=3) {
            let at = rng.random_range(0..file.prefix);
            let choice = rng.random_range(0..specials.len() + 2);
            corrupt[at] = match specials.get(choice) {
                Some(&special) => special,
                None if choice == specials.len() => corrupt[at] ^ (1 << rng.random_range(0..8)),
                None => rng.random(),
            };
        }
        std::fs::write(&file.path, &corrupt).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut load));
        std::fs::write(&file.path, &file.bytes).unwrap();
        match result {
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("case {case} panicked ({})", file.path.display()),
        }
    }
    eprintln!("{loaded} loaded, {refused} refused");
    // Corruptions that were all refused, or all loaded, would test less than they seem to.
    assert!(
        cases < 20 || (loaded > 0 && refused > 0),
        "{loaded} loaded, {refused} refused"
    );
    (loaded, refused)
}
