//! Training-throughput benchmark: LoRA steps per second on a random Llama of given dimensions.
//! Used by `fedlora bench-train`; numbers go in the README with the command that made them.

use std::time::Instant;

use candle_core::Device;
use fedlora_proto::adapter::LoraSpec;
use rand::Rng;

use crate::error::Result;
use crate::model::lora::seeded_rng;
use crate::model::{BasePrecision, Llama, LlamaConfig};
use crate::tiny::random_weights;
use crate::train::data::Window;
use crate::train::{TrainConfig, train};

/// A benchmark configuration: model dimensions, LoRA and batch shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBench {
    pub name: &'static str,
    pub config: LlamaConfig,
    pub lora: LoraSpec,
    pub batch_size: usize,
    pub seq_len: usize,
}

fn llama(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    tied: bool,
) -> LlamaConfig {
    LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_parameters: None,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        sliding_window: None,
        use_sliding_window: None,
        mlp_bias: false,
        max_position_embeddings: 2048,
        tie_word_embeddings: tied,
        hidden_act: "silu".into(),
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(serde_json::json!(2)),
        dtype: None,
        torch_dtype: None,
        quantization_config: None,
    }
}

impl TrainBench {
    /// The engine issue's reference: Llama hidden 512, 8 layers, 8 heads, intermediate 1408,
    /// vocab 32000 untied; LoRA r=16 α=32 on q,k,v,o; batch 8 × 128.
    pub fn reference() -> Self {
        Self {
            name: "reference",
            config: llama(512, 8, 8, 8, 1408, 32_000, false),
            lora: LoraSpec::new(16, 32.0, &["q_proj", "k_proj", "v_proj", "o_proj"]),
            batch_size: 8,
            seq_len: 128,
        }
    }

    /// SmolLM2-135M dimensions (30 layers, hidden 576, 9/3 heads, vocab 49152, tied); LoRA r=8 on
    /// q,v; batch 4 × 64.
    pub fn smollm2() -> Self {
        Self {
            name: "smollm2",
            config: llama(576, 30, 9, 3, 1536, 49_152, true),
            lora: LoraSpec::new(8, 16.0, &["q_proj", "v_proj"]),
            batch_size: 4,
            seq_len: 64,
        }
    }
}

impl TrainBench {
    /// Arithmetic of one training step per token, in flop (a multiply-add is two), counting every
    /// product as dense: the frozen base's forward pass and input gradients (projections,
    /// attention's two batched products forward and four backward, the output head), and the
    /// LoRA factors' two products forward and four backward. Layer 0's q/k/v take their input from
    /// the frozen embedding, so their input gradient is not computed. Norms, softmax, RoPE and
    /// the loss's exponentials are left out: what is left is what a GEMM peak can be held
    /// against. Shapes come from `ModelDims::module_in_out`; an unknown module is an error.
    pub fn flop_per_token(&self) -> Result<f64> {
        let dims = self.config.dims();
        // 2·in·out per token for a product through `module`.
        let product = |module: &str| -> Result<f64> {
            let (inputs, outputs) = dims.module_in_out(module)?;
            Ok(2.0 * inputs as f64 * outputs as f64)
        };
        let attention_inputs = product("q_proj")? + product("k_proj")? + product("v_proj")?;
        let rest_of_layer = product("o_proj")?
            + product("gate_proj")?
            + product("up_proj")?
            + product("down_proj")?;
        let q_out = (dims.num_attention_heads * dims.head_dim) as f64;
        let attention = 4.0 * q_out * self.seq_len as f64;
        let layers = dims.num_layers as f64;
        let forward = layers * (attention_inputs + rest_of_layer + attention);
        let backward =
            layers * (rest_of_layer + 2.0 * attention) + (layers - 1.0) * attention_inputs;
        let head = 2.0 * dims.hidden_size as f64 * self.config.vocab_size as f64;
        let patterns = self.lora.patterns()?;
        let mut lora = 0.0;
        for layer in 0..dims.num_layers {
            for module in &self.lora.target_modules {
                let (inputs, outputs) = dims.module_in_out(module)?;
                let rank = patterns.rank_for(layer, module) as f64;
                lora += 6.0 * rank * (inputs + outputs) as f64;
            }
        }
        Ok(forward + backward + 2.0 * head + lora)
    }
}

/// What a benchmark run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchReport {
    pub steps: usize,
    pub tokens_per_second: f64,
    pub seconds_per_step: f64,
    /// Peak resident memory of the process, when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Arithmetic done per second ([`TrainBench::flop_per_token`] × tokens/s), in GFLOP/s.
    pub gflops: f64,
    /// This CPU's measured multiply-add peaks (before the run), where it has AVX-512 or AVX2.
    pub peak: Option<crate::model::cpu_peak::Peak>,
}

/// Runs `warmup` untimed then `steps` timed AdamW steps on random tokens, with the frozen base
/// held as a client daemon holds it with the same `base` (`Llama::apply_base_precision`).
pub fn run_train_bench(
    bench: &TrainBench,
    warmup: usize,
    steps: usize,
    base: BasePrecision,
) -> Result<BenchReport> {
    let device = Device::Cpu;
    let peak = crate::model::cpu_peak::measure();
    let weights = random_weights(&bench.config, 1)?;
    let mut model = Llama::from_weights(bench.config.clone(), weights, &device)?;
    model.apply_base_precision(base)?;
    model.attach_lora(&bench.lora, 2)?;
    let mut rng = seeded_rng(3);
    let vocab = bench.config.vocab_size as u32;
    let windows: Vec<Window> = (0..bench.batch_size * 4)
        .map(|_| {
            Window::full(
                (0..=bench.seq_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect(),
            )
        })
        .collect();
    let config =
        |local_steps| TrainConfig::simple(local_steps, 1e-4, bench.batch_size, bench.seq_len, 4);
    if warmup > 0 {
        train(&model, &windows, &config(warmup), &mut |_, _| {})?;
    }
    let started = Instant::now();
    let report = train(&model, &windows, &config(steps.max(1)), &mut |_, _| {})?;
    let seconds = started.elapsed().as_secs_f64();
    let tokens_per_second = report.tokens as f64 / seconds;
    Ok(BenchReport {
        steps: report.steps,
        tokens_per_second,
        gflops: tokens_per_second * bench.flop_per_token()? / 1e9,
        peak,
        seconds_per_step: seconds / report.steps as f64,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `VmHWM` from `/proc/self/status` (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn reference_step_arithmetic_matches_a_hand_count() {
        // Per layer: q,k,v 2·512·1536 = 1.57 M, o + MLP 2·512² + 6·512·1408 = 4.85 M, attention
        // 4·512·128 = 0.26 M forward (twice that backward). 8 layers forward 53.48 M; backward
        // 8·(4.85 + 0.52) + 7·1.57 = 54.00 M (layer 0's q/k/v input gradient is not needed);
        // head 2 × 2·512·32000 = 65.54 M; LoRA 32 modules × 6·16·1024 = 3.15 M. Without
        // attention and LoRA this is the engine issue's "about 168 MFLOP per token".
        assert_eq!(
            TrainBench::reference().flop_per_token().unwrap(),
            176_160_768.0
        );
        // Grouped kv heads (9 q, 3 kv of 64), 30 layers, vocab 49152, LoRA r=8 on q,v only.
        assert_eq!(
            TrainBench::smollm2().flop_per_token().unwrap(),
            552_849_408.0
        );
    }
}
