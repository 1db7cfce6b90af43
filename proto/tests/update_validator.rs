//! The upload validator against hostile bytes: `validate_bytes` (what the coordinator runs on
//! every upload) never panics, and accepts exactly what decoding and `Adapter::validate` accept.
//! Inputs are valid updates in every wire dtype, then mutated: bytes flipped in the header and in
//! the data, truncated, extended, NaN/Inf written into values, header lengths forged. The same
//! check is the `cargo fuzz` target in `fuzz/` (`scripts/fuzz.sh`), whose seed corpus
//! (`fuzz/seeds/update_validator/`) is checked here to be current valid updates.
#![allow(clippy::unwrap_used, reason = "tests")]

use fedlora_proto::adapter::{Adapter, ModelDims, TensorSpec};
use fedlora_proto::tensor_bytes::{WireDtype, validate_bytes};
use proptest::prelude::*;

fn spec() -> Vec<TensorSpec> {
    ModelDims::toy_update_spec().unwrap()
}

fn valid_update(seed: u64, dtype: WireDtype) -> Vec<u8> {
    let mut adapter = Adapter::zeros(&spec());
    for (offset, tensor) in adapter.tensors.values_mut().enumerate() {
        for (index, value) in tensor.data.iter_mut().enumerate() {
            *value = ((seed as usize + index * 7 + offset * 13) % 19) as f32 * 0.25 - 2.0;
        }
    }
    adapter.to_safetensors_as(dtype, None).unwrap()
}

/// Both validators' verdicts on `bytes`.
fn verdicts(bytes: &[u8], spec: &[TensorSpec]) -> (bool, bool) {
    let fast = validate_bytes(bytes, spec).is_ok();
    let decoded = Adapter::from_safetensors(bytes).and_then(|adapter| adapter.validate(spec));
    (fast, decoded.is_ok())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { keep: usize },
    Append { extra: Vec<u8> },
    HeaderLength { value: u64 },
    NonFinite { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(|extra| Mutation::Append { extra }),
        any::<u64>().prop_map(|value| Mutation::HeaderLength { value }),
        any::<usize>().prop_map(|at| Mutation::NonFinite { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len().max(1);
    match mutation {
        Mutation::Flip { at, xor } => {
            // Half the flips land in the header, where the structure is.
            let header = bytes
                .get(..8)
                .map(|prefix| u64::from_le_bytes(prefix.try_into().unwrap_or([0; 8])) as usize)
                .unwrap_or(0)
                .saturating_add(8)
                .min(len);
            let index = if at % 2 == 0 { at % header } else { at % len };
            if let Some(byte) = bytes.get_mut(index) {
                *byte ^= xor;
            }
        }
        Mutation::Truncate { keep } => bytes.truncate(keep % len),
        Mutation::Append { extra } => bytes.extend_from_slice(extra),
        Mutation::HeaderLength { value } => {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::NonFinite { at } => {
            // All-ones exponent bits in a data byte pair: NaN or Inf in bf16/f16, often in f32.
            let start = bytes.len().saturating_sub(64);
            let index = start + at % 63.min(bytes.len().saturating_sub(start + 1)).max(1);
            if index + 1 < bytes.len() {
                bytes[index] = 0xFF;
                bytes[index + 1] = 0x7F;
            }
        }
    }
}

proptest! {
    // 2000 cases in the test suite; PROPTEST_CASES=N for a longer campaign.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(2000)
    ))]

    #[test]
    fn bytes_validator_agrees_with_the_decoder(
        seed in any::<u64>(),
        dtype in prop_oneof![Just(WireDtype::F32), Just(WireDtype::Bf16), Just(WireDtype::F16)],
        mutations in proptest::collection::vec(mutation(), 0..4),
    ) {
        let spec = spec();
        let mut bytes = valid_update(seed, dtype);
        prop_assert_eq!(verdicts(&bytes, &spec), (true, true));
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        let (fast, decoded) = verdicts(&bytes, &spec);
        prop_assert_eq!(fast, decoded, "mutations {:?}", mutations);
    }

    #[test]
    fn arbitrary_bytes_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (fast, decoded) = verdicts(&bytes, &spec());
        prop_assert!(!fast && !decoded);
    }
}

/// The fuzz target's seed corpus is one valid update per wire dtype, made by `valid_update`.
/// `FEDLORA_WRITE_FUZZ_SEEDS=1` rewrites it after a format change.
#[test]
fn fuzz_seed_corpus_is_current() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/update_validator");
    let write = std::env::var_os("FEDLORA_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, dtype) in [
        ("f32", WireDtype::F32),
        ("bf16", WireDtype::Bf16),
        ("f16", WireDtype::F16),
    ] {
        let path = dir.join(format!("valid-{name}.safetensors"));
        let expected = valid_update(7, dtype);
        if write {
            std::fs::write(&path, &expected).unwrap();
        }
        let seed =
            std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert_eq!(
            seed,
            expected,
            "{} is stale: run with FEDLORA_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
        assert_eq!(verdicts(&seed, &spec()), (true, true));
    }
}
