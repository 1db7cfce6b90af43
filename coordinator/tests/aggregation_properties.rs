//! Properties of the aggregation strategies (proptest): what every strategy must satisfy, and
//! the exactness each one promises, against a dense oracle computed here.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use fedlora_coordinator::aggregate::{
    AggregateError, Robustness, RoundAggregation, ServerOptimizer, Trained, strategy,
};
use fedlora_proto::adapter::{
    Adapter, AdapterTensor, LoraSpec, ModelDims, TensorSpec, adapter_spec,
};
use fedlora_proto::factors::{client_spec, initial_factors};
use proptest::prelude::*;

fn dims(layers: usize, hidden: usize) -> ModelDims {
    ModelDims {
        num_layers: layers,
        hidden_size: hidden,
        intermediate_size: hidden + 3,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: hidden / 2,
    }
}

/// A deterministic pseudo-random adapter with the layout `spec`, values in [-1, 1).
fn filled(spec: &[TensorSpec], seed: u64) -> Adapter {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut adapter = Adapter::zeros(spec);
    for tensor in adapter.tensors.values_mut() {
        for value in &mut tensor.data {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *value = ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0;
        }
    }
    adapter
}

fn modules(adapter: &Adapter) -> Vec<String> {
    adapter
        .tensors
        .keys()
        .filter_map(|name| name.strip_suffix(".lora_A.weight").map(String::from))
        .collect()
}

/// Dense B·A of one module of one adapter.
fn product(adapter: &Adapter, module: &str) -> Vec<f64> {
    let a = &adapter.tensors[&format!("{module}.lora_A.weight")];
    let b = &adapter.tensors[&format!("{module}.lora_B.weight")];
    let (rank, inputs, outputs) = (a.shape[0], a.shape[1], b.shape[0]);
    let mut dense = vec![0.0; outputs * inputs];
    for row in 0..outputs {
        for column in 0..inputs {
            dense[row * inputs + column] = (0..rank)
                .map(|k| f64::from(b.data[row * rank + k]) * f64::from(a.data[k * inputs + column]))
                .sum();
        }
    }
    dense
}

/// Σ pₖ Bₖ Aₖ of one module (pₖ = wₖ / Σ w).
fn ideal(updates: &[(f64, Adapter)], module: &str) -> Vec<f64> {
    let total: f64 = updates.iter().map(|(weight, _)| weight).sum();
    let mut sum: Vec<f64> = Vec::new();
    for (weight, update) in updates {
        let dense = product(update, module);
        sum.resize(dense.len(), 0.0);
        for (acc, value) in sum.iter_mut().zip(dense) {
            *acc += weight / total * value;
        }
    }
    sum
}

fn relative(got: &[f64], expected: &[f64]) -> f64 {
    let difference: f64 = got.iter().zip(expected).map(|(g, e)| (g - e).powi(2)).sum();
    let norm: f64 = expected.iter().map(|e| e * e).sum();
    (difference / norm.max(1e-300)).sqrt()
}

fn max_abs_difference(left: &Adapter, right: &Adapter) -> f32 {
    assert_eq!(
        left.tensors.keys().collect::<Vec<_>>(),
        right.tensors.keys().collect::<Vec<_>>()
    );
    left.tensors
        .iter()
        .flat_map(|(name, tensor)| {
            assert_eq!(tensor.shape, right.tensors[name].shape, "{name}");
            tensor
                .data
                .iter()
                .zip(&right.tensors[name].data)
                .map(|(l, r)| (l - r).abs())
        })
        .fold(0.0, f32::max)
}

/// Runs one round of `name` over `(weight, update)` from `start`.
fn aggregate(
    name: &str,
    spec: &[TensorSpec],
    start: &Adapter,
    trained: Trained,
    robustness: &Robustness,
    updates: &[(f64, Adapter)],
) -> Result<Adapter, AggregateError> {
    let strategy = strategy(name).unwrap();
    let mut round = RoundAggregation::new(
        strategy.as_ref(),
        spec,
        start.clone(),
        trained,
        robustness,
        &ServerOptimizer::None,
    )?;
    for (weight, update) in updates {
        round.add(update.clone(), *weight)?;
    }
    Ok(round.finish(None)?.0)
}

/// A small federation: its layout, LoRA spec and seeded start.
fn federation(
    layers: usize,
    hidden: usize,
    rank: usize,
) -> (ModelDims, LoraSpec, Vec<TensorSpec>, Adapter) {
    let dims = dims(layers, hidden);
    let lora = LoraSpec::new(rank, 2.0 * rank as f32, &["q_proj", "v_proj", "down_proj"]);
    let spec = adapter_spec(&dims, &lora).unwrap();
    let start = initial_factors(&dims, &lora, 17).unwrap();
    (dims, lora, spec, start)
}

/// `update` with its A (or B) replaced by `start`'s: what a client that froze that factor sends.
fn with_frozen(update: &Adapter, start: &Adapter, frozen_suffix: &str) -> Adapter {
    let mut update = update.clone();
    for (name, tensor) in &mut update.tensors {
        if name.ends_with(frozen_suffix) {
            *tensor = start.tensors[name].clone();
        }
    }
    update
}

fn weights_and_seeds() -> impl Strategy<Value = Vec<(f64, u64)>> {
    prop::collection::vec((0.1f64..10.0, any::<u64>()), 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn identical_updates_aggregate_to_themselves(
        layers in 1usize..3, rank in 1usize..5, seed in any::<u64>(), weights in prop::collection::vec(0.1f64..10.0, 1..5),
    ) {
        let (_, _, spec, start) = federation(layers, 6, rank);
        let update = filled(&spec, seed);
        let updates: Vec<(f64, Adapter)> = weights.iter().map(|w| (*w, update.clone())).collect();
        for name in ["fedavg", "svd"] {
            let global = aggregate(name, &spec, &start, Trained::Both, &Robustness::default(), &updates).unwrap();
            for module in modules(&update) {
                let error = relative(&product(&global, &module), &product(&update, &module));
                prop_assert!(error < 1e-5, "{name} {module}: {error}");
            }
        }
        let fedavg = aggregate("fedavg", &spec, &start, Trained::Both, &Robustness::default(), &updates).unwrap();
        prop_assert!(max_abs_difference(&fedavg, &update) < 1e-6);
        let trimmed = Robustness { trim_fraction: 0.2, ..Robustness::default() };
        let global = aggregate("fedavg", &spec, &start, Trained::Both, &trimmed, &updates).unwrap();
        prop_assert!(max_abs_difference(&global, &update) < 1e-6);
        let frozen_a = with_frozen(&update, &start, "lora_A.weight");
        let same: Vec<(f64, Adapter)> = weights.iter().map(|w| (*w, frozen_a.clone())).collect();
        let ffa = aggregate("ffa", &spec, &start, Trained::B, &Robustness::default(), &same).unwrap();
        prop_assert!(max_abs_difference(&ffa, &frozen_a) < 1e-6);
    }

    #[test]
    fn client_order_does_not_matter(clients in weights_and_seeds(), rank in 1usize..4, rotate in 0usize..4) {
        let (_, _, spec, start) = federation(1, 6, rank);
        let updates: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&spec, *s))).collect();
        let mut shuffled = updates.clone();
        let shift = rotate % shuffled.len();
        shuffled.rotate_left(shift);
        shuffled.reverse();
        for name in ["fedavg", "svd"] {
            let one = aggregate(name, &spec, &start, Trained::Both, &Robustness::default(), &updates).unwrap();
            let two = aggregate(name, &spec, &start, Trained::Both, &Robustness::default(), &shuffled).unwrap();
            for module in modules(&one) {
                let error = relative(&product(&one, &module), &product(&two, &module));
                prop_assert!(error < 1e-5, "{name} {module}: {error}");
            }
            if name == "fedavg" {
                prop_assert!(max_abs_difference(&one, &two) < 1e-6);
            }
        }
    }

    #[test]
    fn zero_weight_clients_contribute_nothing(clients in weights_and_seeds(), outlier in any::<u64>()) {
        let (_, _, spec, start) = federation(1, 6, 2);
        let mut updates: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&spec, *s))).collect();
        let mut with_zero = updates.clone();
        let mut loud = filled(&spec, outlier);
        for tensor in loud.tensors.values_mut() {
            tensor.data.iter_mut().for_each(|value| *value *= 1e3);
        }
        with_zero.insert(0, (0.0, loud));
        for name in ["fedavg", "svd"] {
            let without = aggregate(name, &spec, &start, Trained::Both, &Robustness::default(), &updates).unwrap();
            let with = aggregate(name, &spec, &start, Trained::Both, &Robustness::default(), &with_zero).unwrap();
            prop_assert_eq!(without, with);
        }
        updates.iter_mut().for_each(|(weight, _)| *weight = 0.0);
        prop_assert_eq!(
            aggregate("fedavg", &spec, &start, Trained::Both, &Robustness::default(), &updates),
            Err(AggregateError::NothingToAggregate)
        );
    }

    #[test]
    fn exact_strategies_reproduce_the_weighted_product(clients in weights_and_seeds(), layers in 1usize..3) {
        let (dims, lora, spec, start) = federation(layers, 6, 8);
        let raw: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&spec, *s))).collect();
        // ffa, and an alternating B round: A frozen at the start's, B averaged.
        let b_only: Vec<(f64, Adapter)> = raw.iter().map(|(w, u)| (*w, with_frozen(u, &start, "lora_A.weight"))).collect();
        // An alternating A round, starting from a global adapter with non-zero B.
        let previous = filled(&spec, 99);
        let a_only: Vec<(f64, Adapter)> = raw.iter().map(|(w, u)| (*w, with_frozen(u, &previous, "lora_B.weight"))).collect();
        // svd without truncation: ranks that sum to at most the federation's 8.
        let rank = (8 / raw.len()).max(1);
        let low = client_spec(&dims, &lora, rank).unwrap();
        let low_updates: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&low, *s))).collect();
        let cases = [
            ("ffa", Trained::B, &start, &b_only),
            ("alternating", Trained::B, &start, &b_only),
            ("alternating", Trained::A, &previous, &a_only),
            ("svd", Trained::Both, &start, &low_updates),
        ];
        for (name, trained, from, updates) in cases {
            let global = aggregate(name, &spec, from, trained, &Robustness::default(), updates).unwrap();
            for module in modules(&global) {
                let error = relative(&product(&global, &module), &ideal(updates, &module));
                prop_assert!(error < 1e-5, "{name}/{trained:?} {module}: relative error {error}");
            }
        }
    }

    #[test]
    fn fedavg_is_off_by_the_documented_cross_term(clients in prop::collection::vec((0.1f64..10.0, any::<u64>()), 2..5)) {
        let (_, _, spec, start) = federation(1, 6, 3);
        let updates: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&spec, *s))).collect();
        let global = aggregate("fedavg", &spec, &start, Trained::Both, &Robustness::default(), &updates).unwrap();
        let total: f64 = updates.iter().map(|(w, _)| w).sum();
        for module in modules(&global) {
            // B̄Ā − Σ pₖBₖAₖ = −Σ pₖ (Bₖ − B̄)(Aₖ − Ā)
            let exact = ideal(&updates, &module);
            let mean = product(&global, &module);
            let mut cross = vec![0.0; exact.len()];
            for (weight, update) in &updates {
                let mut centred = update.clone();
                for (name, tensor) in &mut centred.tensors {
                    for (value, mean) in tensor.data.iter_mut().zip(&global.tensors[name].data) {
                        *value -= mean;
                    }
                }
                for (acc, value) in cross.iter_mut().zip(product(&centred, &module)) {
                    *acc += weight / total * value;
                }
            }
            let predicted: Vec<f64> = exact.iter().zip(&cross).map(|(e, c)| e - c).collect();
            let error = relative(&mean, &predicted);
            prop_assert!(error < 1e-5, "{module}: {error}");
            prop_assert!(relative(&mean, &exact) > 1e-4, "distinct updates: fedavg is not exact");
        }
    }

    #[test]
    fn mismatched_names_and_shapes_are_errors(seed in any::<u64>(), which in 0usize..6, mutation in 0usize..4) {
        let (_, _, spec, start) = federation(1, 6, 2);
        let good = filled(&spec, seed);
        let mut bad = good.clone();
        let name = bad.tensors.keys().nth(which % bad.tensors.len()).unwrap().clone();
        match mutation {
            0 => {
                let tensor = bad.tensors.remove(&name).unwrap();
                bad.tensors.insert(format!("{name}.renamed"), tensor);
            }
            1 => {
                let tensor = bad.tensors.get_mut(&name).unwrap();
                tensor.shape.reverse();
                tensor.shape[0] += 1;
                tensor.data.resize(tensor.shape.iter().product(), 0.5);
            }
            2 => {
                bad.tensors.remove(&name);
            }
            _ => {
                bad.tensors.insert("base_model.model.lm_head.weight".into(), AdapterTensor::zeros(&[2, 2]));
            }
        }
        for name in ["fedavg", "svd", "ffa"] {
            let trained = if name == "ffa" { Trained::B } else { Trained::Both };
            let strategy = strategy(name).unwrap();
            let mut round = RoundAggregation::new(
                strategy.as_ref(), &spec, start.clone(), trained, &Robustness::default(), &ServerOptimizer::None,
            ).unwrap();
            prop_assert!(round.add(bad.clone(), 1.0).is_err());
            prop_assert_eq!(round.updates(), 0);
            round.add(good.clone(), 1.0).unwrap();
            let (global, _) = round.finish(None).unwrap();
            global.validate(&spec).unwrap();
        }
    }

    #[test]
    fn non_finite_values_never_reach_the_global_adapter(
        clients in weights_and_seeds(), poisoned in 0usize..4, position in any::<usize>(), kind in 0usize..3,
    ) {
        let (_, _, spec, start) = federation(1, 6, 2);
        let mut updates: Vec<(f64, Adapter)> = clients.iter().map(|(w, s)| (*w, filled(&spec, *s))).collect();
        let target = poisoned % updates.len();
        let tensors = updates[target].1.tensors.len();
        let tensor = updates[target].1.tensors.values_mut().nth(position % tensors).unwrap();
        let index = position % tensor.data.len();
        tensor.data[index] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind];
        let clip = Robustness { max_update_norm: Some(1.0), ..Robustness::default() };
        for (name, robustness) in [("fedavg", Robustness::default()), ("svd", Robustness::default()), ("fedavg", clip)] {
            let strategy = strategy(name).unwrap();
            let mut round = RoundAggregation::new(
                strategy.as_ref(), &spec, start.clone(), Trained::Both, &robustness, &ServerOptimizer::None,
            ).unwrap();
            let mut accepted = 0;
            for (index, (weight, update)) in updates.iter().enumerate() {
                let outcome = round.add(update.clone(), *weight);
                prop_assert_eq!(outcome.is_err(), index == target);
                accepted += usize::from(outcome.is_ok());
            }
            if accepted == 0 {
                prop_assert_eq!(round.finish(None).map(|_| ()), Err(AggregateError::NothingToAggregate));
                continue;
            }
            let (global, _) = round.finish(None).unwrap();
            prop_assert!(global.tensors.values().all(|t| t.data.iter().all(|v| v.is_finite())));
        }
    }
}

/// Heterogeneous ranks, fedavg: each slot is the weighted mean over the clients whose rank reaches
/// it, and the global adapter keeps the federation's layout.
#[test]
fn heterogeneous_ranks_align_by_prefix() {
    let (dims, lora, spec, start) = federation(1, 8, 4);
    let ranks = [1usize, 2, 4];
    let updates: Vec<(f64, Adapter)> = ranks
        .iter()
        .enumerate()
        .map(|(index, rank)| {
            let layout = client_spec(&dims, &lora, *rank).unwrap();
            (1.0 + index as f64, filled(&layout, index as u64 + 1))
        })
        .collect();
    let global = aggregate(
        "fedavg",
        &spec,
        &start,
        Trained::Both,
        &Robustness::default(),
        &updates,
    )
    .unwrap();
    global.validate(&spec).unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let columns = global.tensors[name].shape[1];
    for slot in 0..4 {
        let reaching: Vec<&(f64, Adapter)> = updates
            .iter()
            .filter(|(_, update)| update.tensors[name].shape[0] > slot)
            .collect();
        let total: f64 = reaching.iter().map(|(w, _)| w).sum();
        for column in 0..columns {
            let expected: f64 = reaching
                .iter()
                .map(|(w, update)| {
                    w * f64::from(update.tensors[name].data[slot * columns + column])
                })
                .sum::<f64>()
                / total;
            let got = f64::from(global.tensors[name].data[slot * columns + column]);
            assert!(
                (got - expected).abs() < 1e-6,
                "slot {slot}: {got} vs {expected}"
            );
        }
    }
    // A rank-2 client starts from the 2-slot prefix, which the svd strategy makes the best
    // rank-2 approximation.
    let low = client_spec(&dims, &lora, 2).unwrap();
    let svd = aggregate(
        "svd",
        &spec,
        &start,
        Trained::Both,
        &Robustness::default(),
        &updates,
    )
    .unwrap();
    svd.rank_prefix(&low).unwrap().validate(&low).unwrap();
}
