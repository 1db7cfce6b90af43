//! The aggregation benchmark behind `fedlora bench-aggregate`: many synthetic updates of one
//! adapter shape streamed through the federation's aggregation, timed against copying the same
//! bytes (the memory-bandwidth ceiling of any streaming aggregate). No I/O: updates are made in
//! memory, a few distinct ones cycled, so the inputs held stay constant however many clients
//! report and peak memory shows what aggregation itself keeps.

use std::time::Instant;

use fedlora_proto::adapter::{Adapter, LoraSpec, ModelDims, adapter_spec};
use fedlora_proto::factors::{client_spec, initial_factors};
use fedlora_proto::tensor_bytes::WireDtype;

use crate::aggregate::{Result, Robustness, RoundAggregation, ServerOptimizer, strategy};

/// What to aggregate.
#[derive(Debug, Clone)]
pub struct AggregateBench {
    pub dims: ModelDims,
    pub lora: LoraSpec,
    /// Clients' ranks, cycled over the clients (all ≤ `lora.rank`).
    pub ranks: Vec<usize>,
    pub clients: usize,
    pub strategy: String,
    pub dtype: WireDtype,
    /// Distinct updates made per rank and cycled.
    pub distinct: usize,
    /// Updates handed to the aggregation at once (as the round driver does).
    pub batch: usize,
}

impl AggregateBench {
    /// A 7B-shaped adapter: 32 layers, LoRA r=16 on q and v of a 4096-wide model (≈ 8.4 M
    /// parameters; 16.8 MB per update in bf16).
    pub fn llama_7b(clients: usize, strategy: &str, ranks: Vec<usize>) -> Self {
        Self {
            dims: ModelDims {
                num_layers: 32,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_attention_heads: 32,
                num_key_value_heads: 32,
                head_dim: 128,
            },
            lora: LoraSpec::new(16, 32.0, &["q_proj", "v_proj"]),
            ranks,
            clients,
            strategy: strategy.to_string(),
            dtype: WireDtype::Bf16,
            distinct: 4,
            batch: crate::rounds::AGGREGATION_BATCH,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggregateReport {
    /// Parameters of the federation's adapter.
    pub parameters: usize,
    /// Bytes of all updates streamed.
    pub update_bytes: u64,
    pub seconds: f64,
    /// Seconds to copy the same bytes once (the streaming ceiling).
    pub memcpy_seconds: f64,
}

impl AggregateReport {
    pub fn gigabytes_per_second(&self) -> f64 {
        self.update_bytes as f64 / self.seconds / 1e9
    }

    pub fn memcpy_gigabytes_per_second(&self) -> f64 {
        self.update_bytes as f64 / self.memcpy_seconds / 1e9
    }
}

/// Deterministic values in about ±0.05 (the size of trained LoRA factors).
fn synthetic(adapter: &mut Adapter, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for tensor in adapter.tensors.values_mut() {
        for value in &mut tensor.data {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *value = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        }
    }
}

/// Runs the benchmark: `clients` updates through one round's aggregation.
pub fn run(bench: &AggregateBench) -> Result<AggregateReport> {
    let spec = adapter_spec(&bench.dims, &bench.lora)?;
    let mut encoded: Vec<Vec<Vec<u8>>> = Vec::new();
    for (index, rank) in bench.ranks.iter().enumerate() {
        let layout = client_spec(&bench.dims, &bench.lora, *rank)?;
        let mut updates = Vec::new();
        for copy in 0..bench.distinct.max(1) {
            let mut update = Adapter::zeros(&layout);
            synthetic(&mut update, (index * 1000 + copy) as u64 + 1);
            updates.push(update.to_safetensors_as(bench.dtype, None)?);
        }
        encoded.push(updates);
    }
    let pick = |client: usize| {
        let by_rank = &encoded[client % encoded.len()];
        &by_rank[(client / encoded.len()) % by_rank.len()]
    };
    let update_bytes: u64 = (0..bench.clients)
        .map(|client| pick(client).len() as u64)
        .sum();

    let started = Instant::now();
    let mut sink = Vec::new();
    for client in 0..bench.clients {
        let bytes = pick(client);
        sink.clear();
        sink.extend_from_slice(bytes);
        std::hint::black_box(&sink);
    }
    let memcpy_seconds = started.elapsed().as_secs_f64();
    drop(sink);

    let strategy = strategy(&bench.strategy)?;
    let start = initial_factors(&bench.dims, &bench.lora, 1)?;
    let started = Instant::now();
    let mut round = RoundAggregation::new(
        strategy.as_ref(),
        &spec,
        start,
        strategy.trained(0),
        &Robustness::default(),
        &ServerOptimizer::None,
    )?;
    for first in (0..bench.clients).step_by(bench.batch.max(1)) {
        let batch: Vec<(&[u8], f64)> = (first..(first + bench.batch.max(1)).min(bench.clients))
            .map(|client| (pick(client).as_slice(), 1.0 + (client % 7) as f64))
            .collect();
        for outcome in round.add_many_bytes(&batch) {
            outcome?;
        }
    }
    let (global, _) = round.finish(None)?;
    let seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(&global);
    Ok(AggregateReport {
        parameters: spec.iter().map(|t| t.shape.iter().product::<usize>()).sum(),
        update_bytes,
        seconds,
        memcpy_seconds,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn small_bench_runs_every_strategy_and_counts_bytes() {
        let mut bench = AggregateBench::llama_7b(6, "fedavg", vec![4, 8]);
        bench.dims = ModelDims {
            num_layers: 2,
            hidden_size: 64,
            intermediate_size: 96,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
        };
        bench.lora = LoraSpec::new(8, 16.0, &["q_proj", "v_proj"]);
        bench.distinct = 2;
        for name in ["fedavg", "svd", "ffa"] {
            bench.strategy = name.into();
            let report = run(&bench).unwrap();
            assert_eq!(report.parameters, 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8));
            // Three rank-4 and three rank-8 updates in bf16, plus headers.
            let values = 3 * report.parameters / 2 + 3 * report.parameters;
            assert!(report.update_bytes > 2 * values as u64);
            assert!(report.update_bytes < 2 * values as u64 + 6 * 4096);
            assert!(report.gigabytes_per_second() > 0.0);
        }
    }
}
