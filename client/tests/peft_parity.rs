//! Parity with Hugging Face transformers + PEFT, on fixtures made by `scripts/peft_parity.py`
//! (tiny random Llama, Qwen2 and Mistral checkpoints; PEFT adapters; the logits PEFT computed).
//! Both directions: adapters PEFT wrote are loaded here, and an adapter written here was loaded
//! by PEFT. Logits must agree within 1e-4.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fedlora_client::model::peft::{read_peft_adapter, write_peft_adapter};
use fedlora_client::model::{
    BaseModel, ExportOptions, Llama, WeightDtype, export_merged, load_llama,
};
use fedlora_proto::adapter::{LORA_MODULES, LoraSpec};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn load_fixture_tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(file), &Device::Cpu).unwrap()
}

fn input_ids() -> Tensor {
    load_fixture_tensors("expected.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
}

fn model(name: &str) -> Llama {
    load_llama(&fixtures().join(name), &Device::Cpu).unwrap()
}

/// Largest element-wise difference of two tensors of one shape.
fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_logits(model: &Llama, expected: &Tensor, case: &str) {
    let ours = model.forward(&input_ids()).unwrap();
    assert_eq!(ours.dims(), expected.dims(), "{case}: logits shape");
    let difference = max_difference(&ours, expected);
    assert!(
        difference < TOLERANCE,
        "{case}: logits differ from PEFT's by up to {difference}"
    );
}

/// Loads a PEFT adapter directory onto `model` and returns its spec.
fn apply(model: &mut Llama, adapter_dir: &Path) -> LoraSpec {
    let (spec, adapter) = read_peft_adapter(adapter_dir).unwrap();
    model.attach_lora(&spec, 0).unwrap();
    model.load_adapter(&adapter).unwrap();
    spec
}

#[test]
fn base_models_match_transformers() {
    let expected = load_fixture_tensors("expected.safetensors");
    // f32 Llama, f16 Qwen2 with attention biases, bf16 Mistral, all as transformers 5 writes them.
    for name in ["llama", "qwen2", "mistral"] {
        assert_logits(&model(name), &expected[name], name);
    }
    // Llama 3 rope scaling: the Llama weights with the scaling of llama3_rope.json.
    let patch: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama3_rope.json")).unwrap(),
    )
    .unwrap();
    assert_logits(
        &llama_with_config(&patch),
        &expected["llama3_rope"],
        "llama3_rope",
    );
}

/// Linear and YaRN rope scalings (with transformers' defaults, and with every option set: a
/// fractional ramp, mscale ratio, no truncation) on the Llama weights, against transformers.
#[test]
fn rope_scalings_match_transformers() {
    let expected = load_fixture_tensors("rope_scalings.safetensors");
    let cases: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("rope_scalings.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 3);
    for (name, patch) in &cases {
        let scaled = llama_with_config(patch);
        assert_logits(&scaled, &expected[name.as_str()], name);
        // The scaling changes the logits (against the same theta unscaled): the case tests
        // something.
        let mut unscaled = patch.clone();
        unscaled["rope_scaling"] = serde_json::json!({"rope_type": "default"});
        let plain = llama_with_config(&unscaled);
        let moved = max_difference(
            &plain.forward(&input_ids()).unwrap(),
            &scaled.forward(&input_ids()).unwrap(),
        );
        assert!(moved > 1e-3, "{name}: the scaling moved no logit ({moved})");
    }
}

/// The Llama fixture (config and weights) with `patch`'s keys replacing the config's.
fn llama_with_config(patch: &serde_json::Value) -> Llama {
    let scratch = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("llama").join(file),
            scratch.path().join(file),
        )
        .unwrap();
    }
    let config_path = scratch.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    for (key, value) in patch.as_object().unwrap() {
        config[key] = value.clone();
    }
    std::fs::write(&config_path, config.to_string()).unwrap();
    load_llama(scratch.path(), &Device::Cpu).unwrap()
}

#[test]
fn peft_adapters_load_and_match_peft() {
    let expected = load_fixture_tensors("expected.safetensors");
    for (case, base) in [
        ("lora", "llama"),
        ("rslora", "llama"),
        ("dora", "llama"),
        ("rank_pattern", "llama"),
        ("qwen2_lora", "qwen2"),
    ] {
        let mut adapted = model(base);
        apply(&mut adapted, &fixtures().join(case));
        assert_logits(&adapted, &expected[case], case);
        // Merging gives the same model without any adapter (DoRA's row rescaling included).
        let merged = Llama::from_weights(
            adapted.config().clone(),
            adapted.merged_weights().unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        assert_logits(&merged, &expected[case], &format!("{case} merged"));
    }
    let (spec, _) = read_peft_adapter(&fixtures().join("rank_pattern")).unwrap();
    assert_eq!(
        spec.rank_pattern,
        [
            ("layers.1.mlp.down_proj".to_string(), 6),
            ("q_proj".to_string(), 2)
        ]
    );
}

/// PEFT's adapters on the same checkpoints as GGUF files (written by llama.cpp's `gguf` library:
/// `scripts/gguf_fixtures.py`) give PEFT's logits, and so does the merged Hugging Face checkpoint
/// `fedlora merge` writes from them (transformers itself loaded the Qwen2 one, `fedlora merge
/// --model qwen2.gguf --adapter qwen2_lora`, to PEFT's logits within 3.1e-6 when this test was
/// written).
#[test]
fn peft_adapters_on_gguf_bases_merge_to_peft_logits() {
    let expected = load_fixture_tensors("expected.safetensors");
    for (case, base) in [
        ("lora", "llama"),
        ("dora", "llama"),
        ("qwen2_lora", "qwen2"),
    ] {
        let gguf = fixtures().join(format!("../gguf/{base}.gguf"));
        let mut model = BaseModel::load(&gguf, &Device::Cpu).unwrap();
        apply(&mut model.model, &fixtures().join(case));
        assert_logits(
            &model.model,
            &expected[case],
            &format!("{base}.gguf + {case}"),
        );
        // In f32: PEFT's logits are an f32 computation. (By default the export keeps the
        // file's own type: f16 for qwen2.gguf, whose weights are f16.)
        let out = tempfile::tempdir().unwrap();
        let f32_export = ExportOptions {
            dtype: Some(WeightDtype::F32),
            ..ExportOptions::default()
        };
        export_merged(&model, out.path(), &f32_export).unwrap();
        let merged = BaseModel::load(out.path(), &Device::Cpu).unwrap();
        assert!(merged.model.lora_vars().is_empty());
        assert_eq!(merged.model.config().model_type, base);
        assert_logits(&merged.model, &expected[case], &format!("{case} merged"));
    }
}

/// The adapter fedlora wrote (see `write_our_adapter`), as PEFT loaded it.
#[test]
fn our_adapter_gives_peft_the_same_logits() {
    let mut adapted = model("llama");
    let spec = apply(&mut adapted, &fixtures().join("ours"));
    assert_eq!(
        spec,
        our_spec(),
        "the committed adapter is the one write_our_adapter makes"
    );
    let expected = load_fixture_tensors("ours.safetensors");
    assert_logits(&adapted, &expected["ours"], "ours in peft");
}

/// DoRA, rsLoRA, per-module rank and alpha, on all seven projections.
fn our_spec() -> LoraSpec {
    LoraSpec {
        use_dora: true,
        use_rslora: true,
        rank_pattern: vec![("layers.0.self_attn.k_proj".into(), 3)],
        alpha_pattern: vec![("o_proj".into(), 5.0)],
        ..LoraSpec::new(4, 8.0, &LORA_MODULES)
    }
}

/// Step 2 of `scripts/peft_parity.py`: writes `ours/` with fedlora's PEFT writer.
#[test]
#[ignore = "writes fixtures; run by scripts/peft_parity.py's procedure"]
fn write_our_adapter() {
    write_ours(&fixtures().join("ours"));
}

/// fedlora's PEFT writer, given the committed adapter's values, writes the committed files byte
/// for byte: the files PEFT read and gave `ours.safetensors`'s logits for. So the fedlora → PEFT
/// direction is checked on every run, not only when the fixtures are made, whatever the random
/// initialisation `write_our_adapter` draws today.
#[test]
fn our_adapter_is_written_back_as_committed() {
    let committed = fixtures().join("ours");
    let mut adapted = model("llama");
    let spec = apply(&mut adapted, &committed);
    let bytes = adapted
        .export_adapter()
        .unwrap()
        .to_safetensors(None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_peft_adapter(dir.path(), &spec, "llama", &bytes).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let written = std::fs::read(dir.path().join(file)).unwrap();
        let expected = std::fs::read(committed.join(file)).unwrap();
        assert!(written == expected, "{file} differs from the committed one");
    }
}

/// The adapter of `our_spec` with random B factors and DoRA magnitudes, written as PEFT's
/// `adapter_config.json` and `adapter_model.safetensors` in `dir`.
fn write_ours(dir: &Path) {
    let mut adapted = model("llama");
    adapted.attach_lora(&our_spec(), 42).unwrap();
    let mut rng = StdRng::seed_from_u64(43);
    for (name, var) in adapted.named_lora_vars().unwrap() {
        let current = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let values: Vec<f32> = current
            .iter()
            .map(|value| {
                if name.contains("lora_B") {
                    rng.random_range(-0.3..0.3)
                } else if name.contains("magnitude") {
                    value * rng.random_range(0.5..1.5)
                } else {
                    *value
                }
            })
            .collect();
        var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let bytes = adapted
        .export_adapter()
        .unwrap()
        .to_safetensors(None)
        .unwrap();
    write_peft_adapter(dir, &our_spec(), "llama", &bytes).unwrap();
}
