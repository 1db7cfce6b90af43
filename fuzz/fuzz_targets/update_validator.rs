//! The coordinator's upload validator on arbitrary bytes: it must never panic, and must accept
//! exactly what decoding plus `Adapter::validate` accepts.
#![no_main]

use fedlora_proto::adapter::{Adapter, LoraSpec, ModelDims, adapter_spec};
use fedlora_proto::tensor_bytes::validate_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let dims = ModelDims::toy();
    let Ok(spec) = adapter_spec(&dims, &LoraSpec::new(2, 4.0, &["q_proj", "v_proj"])) else {
        return;
    };
    let fast = validate_bytes(bytes, &spec).is_ok();
    let decoded = Adapter::from_safetensors(bytes)
        .and_then(|adapter| adapter.validate(&spec))
        .is_ok();
    assert_eq!(fast, decoded);
});
