//! Weighted combination of LoRA adapters into one, exactly: ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ for every adapted
//! layer, by concatenating the factors (PEFT's `add_weighted_adapter` with `combination_type="cat"`).
//! The combined rank is the sum of the parts' ranks; nothing is approximated.
//!
//! Averaging A and B separately (PEFT's "linear") is not offered: it is not the weighted sum of
//! the updates. DoRA adapters are refused: their row normalisation is not linear.

use std::collections::BTreeMap;

use fedlora_proto::adapter::{
    Adapter, AdapterError, AdapterTensor, Factor, LORA_MODULES, LoraSpec, module_path, peft_key,
};

use crate::error::{ClientError, Result};

/// `(layer, module)`.
type ModuleKey = (usize, &'static str);
/// The A parts and the weighted B parts of one module.
type Factors = (Vec<AdapterTensor>, Vec<AdapterTensor>);

/// Combines `(spec, adapter, weight)` parts into one adapter with scale 1 (α = r per module).
pub fn combine_adapters(parts: &[(&LoraSpec, &Adapter, f64)]) -> Result<(LoraSpec, Adapter)> {
    if parts.is_empty() {
        return Err(ClientError::Unsupported("no adapters to combine".into()));
    }
    if parts.iter().any(|(spec, _, _)| spec.use_dora) {
        return Err(ClientError::Unsupported(
            "DoRA adapters cannot be combined or weighted (their row normalisation is not linear); \
             use one at a time, at weight 1"
                .into(),
        ));
    }
    if let Some((_, _, weight)) = parts.iter().find(|(_, _, weight)| !weight.is_finite()) {
        return Err(ClientError::Unsupported(format!(
            "adapter weight {weight} is not finite"
        )));
    }
    // Every (layer, module) adapted by any part, with the concatenated factors.
    let mut modules: BTreeMap<ModuleKey, Factors> = BTreeMap::new();
    for (spec, adapter, weight) in parts {
        let patterns = spec.patterns()?;
        let adapted = adapted_modules(adapter)?;
        // Only factor pairs: a lora_B without its lora_A, or a DoRA magnitude in a file whose
        // config says LoRA, would otherwise be dropped without a word.
        let mut pairs = std::collections::HashSet::new();
        for &(layer, module) in &adapted {
            pairs.insert(peft_key(layer, module, Factor::A)?);
            pairs.insert(peft_key(layer, module, Factor::B)?);
        }
        if let Some(stray) = adapter.tensors.keys().find(|name| !pairs.contains(*name)) {
            return Err(AdapterError::UnexpectedTensor(stray.clone()).into());
        }
        for (layer, module) in adapted {
            let a = tensor(adapter, layer, module, Factor::A)?;
            let b = tensor(adapter, layer, module, Factor::B)?;
            // The scale comes from the config: it must describe these tensors.
            if !spec.target_modules.iter().any(|target| target == module) {
                return Err(ClientError::Unsupported(format!(
                    "the adapter has factors for {} but its adapter_config.json does not list \
                     {module} in target_modules",
                    module_path(layer, module)
                )));
            }
            let config_rank = patterns.rank_for(layer, module);
            if a.shape[0] != config_rank {
                return Err(ClientError::Unsupported(format!(
                    "{} has factors of rank {} but its adapter_config.json says rank {config_rank}: \
                     its scale would be wrong",
                    module_path(layer, module),
                    a.shape[0]
                )));
            }
            if a.shape[0] != b.shape[1] || a.data.len() != a.shape.iter().product::<usize>() {
                return Err(ClientError::Unsupported(format!(
                    "{} has lora_A of shape {:?} and lora_B of shape {:?}: the ranks differ",
                    module_path(layer, module),
                    a.shape,
                    b.shape
                )));
            }
            let scale = (weight * patterns.scale_for(layer, module)) as f32;
            let scaled_b = AdapterTensor {
                shape: b.shape.clone(),
                data: b.data.iter().map(|value| value * scale).collect(),
            };
            let entry = modules.entry((layer, module)).or_default();
            entry.0.push(a.clone());
            entry.1.push(scaled_b);
        }
    }
    let mut combined = Adapter::default();
    let mut ranks: BTreeMap<(usize, &'static str), usize> = BTreeMap::new();
    for ((layer, module), (a_parts, b_parts)) in &modules {
        let in_features = a_parts[0].shape[1];
        let out_features = b_parts[0].shape[0];
        let rank: usize = a_parts.iter().map(|a| a.shape[0]).sum();
        // A: the parts' rows stacked, [Σr, in].
        let mut a = Vec::with_capacity(rank * in_features);
        for part in a_parts {
            if part.shape[1] != in_features {
                return Err(mismatch(
                    *layer,
                    module,
                    Factor::A,
                    &part.shape,
                    in_features,
                ));
            }
            a.extend_from_slice(&part.data);
        }
        // B: the parts' (scaled) columns side by side, [out, Σr].
        let mut b = Vec::with_capacity(out_features * rank);
        for row in 0..out_features {
            for part in b_parts {
                if part.shape[0] != out_features {
                    return Err(mismatch(
                        *layer,
                        module,
                        Factor::B,
                        &part.shape,
                        out_features,
                    ));
                }
                let part_rank = part.shape[1];
                b.extend_from_slice(&part.data[row * part_rank..(row + 1) * part_rank]);
            }
        }
        combined.tensors.insert(
            peft_key(*layer, module, Factor::A)?,
            AdapterTensor {
                shape: vec![rank, in_features],
                data: a,
            },
        );
        combined.tensors.insert(
            peft_key(*layer, module, Factor::B)?,
            AdapterTensor {
                shape: vec![out_features, rank],
                data: b,
            },
        );
        ranks.insert((*layer, module), rank);
    }
    let max_rank = ranks.values().copied().max().unwrap_or(1);
    let target_modules: Vec<&str> = LORA_MODULES
        .iter()
        .copied()
        .filter(|module| ranks.keys().any(|(_, adapted)| adapted == module))
        .collect();
    // Each module's own rank, and α = r so that every scale is 1 (the weights sit in B).
    let overrides: Vec<((usize, &str), usize)> = ranks
        .iter()
        .filter(|(_, rank)| **rank != max_rank)
        .map(|(key, rank)| (*key, *rank))
        .collect();
    let spec = LoraSpec {
        rank_pattern: overrides
            .iter()
            .map(|((layer, module), rank)| (pattern_key(*layer, module), *rank))
            .collect(),
        alpha_pattern: overrides
            .iter()
            .map(|((layer, module), rank)| (pattern_key(*layer, module), *rank as f32))
            .collect(),
        ..LoraSpec::new(max_rank, max_rank as f32, &target_modules)
    };
    spec.validate()?;
    Ok((spec, combined))
}

/// The `rank_pattern`/`alpha_pattern` key of one module: `layers\.N\.self_attn\.q_proj`, without
/// the leading `model.`, so that older PEFT releases, which match a key only as `.*\.{key}$` or
/// as the whole name (`model.layers.N...`), find it as PEFT 0.21 does (`(.*\.)?({key})$`).
fn pattern_key(layer: usize, module: &str) -> String {
    let path = module_path(layer, module);
    regex::escape(path.strip_prefix("model.").unwrap_or(&path))
}

/// `(layer, module)` of every `lora_A` tensor in `adapter`.
fn adapted_modules(adapter: &Adapter) -> Result<Vec<(usize, &'static str)>> {
    let mut found = Vec::new();
    for name in adapter.tensors.keys() {
        let Some(rest) = name.strip_prefix("base_model.model.model.layers.") else {
            return Err(AdapterError::UnexpectedTensor(name.clone()).into());
        };
        if !rest.ends_with(".lora_A.weight") {
            continue;
        }
        let layer = rest
            .split('.')
            .next()
            .and_then(|layer| layer.parse().ok())
            .ok_or_else(|| AdapterError::UnexpectedTensor(name.clone()))?;
        let module = LORA_MODULES
            .iter()
            .copied()
            .find(|module| rest.ends_with(&format!(".{module}.lora_A.weight")))
            .ok_or_else(|| AdapterError::UnexpectedTensor(name.clone()))?;
        found.push((layer, module));
    }
    Ok(found)
}

fn tensor<'a>(
    adapter: &'a Adapter,
    layer: usize,
    module: &str,
    factor: Factor,
) -> Result<&'a AdapterTensor> {
    let name = peft_key(layer, module, factor)?;
    let tensor = adapter
        .tensors
        .get(&name)
        .ok_or_else(|| AdapterError::MissingTensor(name.clone()))?;
    if tensor.shape.len() != 2 {
        return Err(AdapterError::ShapeMismatch {
            name,
            expected: vec![0, 0],
            got: tensor.shape.clone(),
        }
        .into());
    }
    Ok(tensor)
}

fn mismatch(layer: usize, module: &str, factor: Factor, got: &[usize], want: usize) -> ClientError {
    ClientError::Unsupported(format!(
        "{} of {} has shape {got:?}: the adapters were made for different models (expected {want} features)",
        factor,
        module_path(layer, module)
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::BaseModel;
    use crate::testing::{logits, max_abs_difference, randomize_lora_b};
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    #[test]
    fn combination_is_the_exact_weighted_sum_and_merge_switch_unmerge_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let model = &mut base.model;
        let input = Tensor::new(&[[3u32, 17, 99, 4, 250, 8]], &Device::Cpu).unwrap();
        let base_logits = logits(model, &input);
        let base_weights = model.merged_weights().unwrap();

        let first_spec = LoraSpec::new(2, 4.0, &["q_proj", "v_proj"]);
        model.attach_lora(&first_spec, 1).unwrap();
        randomize_lora_b(model, 0.3, 2);
        let first = model.export_adapter().unwrap();
        let first_weights = model.merged_weights().unwrap();
        let second_spec = LoraSpec {
            use_rslora: true,
            rank_pattern: vec![("layers.1.mlp.down_proj".into(), 5)],
            ..LoraSpec::new(3, 6.0, &["q_proj", "down_proj"])
        };
        model.attach_lora(&second_spec, 3).unwrap();
        randomize_lora_b(model, 0.3, 4);
        let second = model.export_adapter().unwrap();
        let second_weights = model.merged_weights().unwrap();

        let (spec, combined) =
            combine_adapters(&[(&first_spec, &first, 0.7), (&second_spec, &second, -0.4)]).unwrap();
        assert_eq!(spec.target_modules, ["q_proj", "v_proj", "down_proj"]);
        assert_eq!(spec.rank_for(0, "q_proj"), 5);
        assert_eq!(spec.rank_for(1, "down_proj"), 5);
        assert_eq!(spec.rank_for(0, "down_proj"), 3);
        assert_eq!(spec.scale_for(0, "down_proj"), 1.0);
        // Older PEFT releases match a pattern key as `.*\.{key}$` against the module's name
        // (`model.layers.N...`): each key written must find its own module that way too.
        assert!(!spec.rank_pattern.is_empty());
        let layers = model.config().num_hidden_layers;
        for (key, rank) in &spec.rank_pattern {
            let older_peft = regex::Regex::new(&format!(r".*\.{key}$")).unwrap();
            let found: Vec<(usize, &str)> = (0..layers)
                .flat_map(|layer| spec.target_modules.iter().map(move |m| (layer, m.as_str())))
                .filter(|(layer, module)| older_peft.is_match(&module_path(*layer, module)))
                .collect();
            assert_eq!(found.len(), 1, "{key}: {found:?}");
            assert_eq!(spec.rank_for(found[0].0, found[0].1), *rank, "{key}");
        }
        model.set_adapter(&spec, &combined).unwrap();
        let combined_weights = model.merged_weights().unwrap();
        for (name, weight) in &base_weights {
            let delta = |weights: &std::collections::HashMap<String, Tensor>| {
                crate::testing::flat(&(&weights[name] - weight).unwrap())
            };
            let expected: Vec<f32> = delta(&first_weights)
                .iter()
                .zip(delta(&second_weights))
                .map(|(first, second)| 0.7 * first - 0.4 * second)
                .collect();
            assert!(
                max_abs_difference(&expected, &delta(&combined_weights)) < 1e-5,
                "{name}"
            );
        }

        // Switching back and forth, merging in place and unmerging.
        let combined_logits = logits(model, &input);
        model.merge_lora().unwrap();
        assert!(max_abs_difference(&combined_logits, &logits(model, &input)) < 1e-4);
        model.unmerge_lora().unwrap();
        assert!(max_abs_difference(&combined_logits, &logits(model, &input)) < 1e-4);
        model.set_adapter(&first_spec, &first).unwrap();
        let first_logits = logits(model, &input);
        assert!(max_abs_difference(&first_logits, &combined_logits) > 1e-2);
        model.merge_lora().unwrap();
        model.detach_lora().unwrap();
        assert!(max_abs_difference(&base_logits, &logits(model, &input)) < 1e-4);

        let dora = LoraSpec {
            use_dora: true,
            ..first_spec.clone()
        };
        assert!(combine_adapters(&[(&dora, &first, 1.0)]).is_err());

        // A config that does not describe its tensors is refused, not mis-scaled or skipped.
        let wrong_rank = LoraSpec {
            rank_pattern: vec![("layers.0.self_attn.q_proj".into(), 4)],
            ..first_spec.clone()
        };
        let error = combine_adapters(&[(&wrong_rank, &first, 0.5)]).unwrap_err();
        assert!(error.to_string().contains("rank 2 but"), "{error}");
        let fewer_targets = LoraSpec::new(2, 4.0, &["q_proj"]);
        let error = combine_adapters(&[(&fewer_targets, &first, 0.5)]).unwrap_err();
        assert!(error.to_string().contains("target_modules"), "{error}");
        let mut orphan_b = first.clone();
        orphan_b
            .tensors
            .remove(&peft_key(1, "v_proj", Factor::A).unwrap());
        let error = combine_adapters(&[(&first_spec, &orphan_b, 0.5)]).unwrap_err();
        assert!(
            matches!(
                error,
                ClientError::Adapter(AdapterError::UnexpectedTensor(ref name)) if name.contains("v_proj.lora_B")
            ),
            "{error}"
        );
    }
}
