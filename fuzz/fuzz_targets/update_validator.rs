//! The coordinator's upload validator on arbitrary bytes: it must never panic, and must accept
//! exactly what decoding plus `Adapter::validate` accepts.
#![no_main]

use fedlora_proto::adapter::{Adapter, ModelDims};
use fedlora_proto::tensor_bytes::validate_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(spec) = ModelDims::toy_update_spec() else {
        return;
    };
    let fast = validate_bytes(bytes, &spec).is_ok();
    let decoded = Adapter::from_safetensors(bytes)
        .and_then(|adapter| adapter.validate(&spec))
        .is_ok();
    assert_eq!(fast, decoded);
});
