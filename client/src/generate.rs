//! Text generation with a base model and optional LoRA adapter: greedy or temperature/top-p
//! sampling, with a key/value cache so each new token costs one position.

use candle_core::{D, Tensor};
use rand::Rng;

use crate::error::Result;
use crate::model::Llama;
use crate::model::lora::seeded_rng;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f32,
    pub seed: u64,
}

/// Continues `prompt` until a token of `stop` or `max_new_tokens`; returns the new tokens.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    stop: &[u32],
    config: &GenerateConfig,
) -> Result<Vec<u32>> {
    let mut rng = seeded_rng(config.seed);
    let mut generated = Vec::new();
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    for _ in 0..config.max_new_tokens {
        if cache.len() + input.len() > model.max_sequence_len() {
            break;
        }
        let tensor = Tensor::from_slice(&input, (1, input.len()), model.device())?;
        let logits = model.last_logits_cached(&tensor, &mut cache)?.squeeze(0)?;
        let next = if config.temperature <= 0.0 {
            logits.argmax(D::Minus1)?.to_scalar::<u32>()?
        } else {
            sample(&logits, config.temperature, config.top_p, &mut rng)?
        };
        if stop.contains(&next) {
            break;
        }
        generated.push(next);
        input = vec![next];
    }
    Ok(generated)
}

fn sample(logits: &Tensor, temperature: f32, top_p: f32, rng: &mut impl Rng) -> Result<u32> {
    let scaled = (logits / f64::from(temperature))?;
    let probabilities = candle_nn::ops::softmax(&scaled, D::Minus1)?.to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|left, right| probabilities[*right].total_cmp(&probabilities[*left]));
    let mut kept = Vec::new();
    let mut mass = 0.0f32;
    for index in order {
        kept.push(index);
        mass += probabilities[index];
        if mass >= top_p {
            break;
        }
    }
    let mut draw = rng.random_range(0.0..mass.max(f32::MIN_POSITIVE));
    for index in &kept {
        draw -= probabilities[*index];
        if draw <= 0.0 {
            return Ok(*index as u32);
        }
    }
    Ok(kept.last().copied().unwrap_or(0) as u32)
}
