//! Text generation with a base model and optional LoRA adapter: greedy or temperature/top-p
//! sampling, with a key/value cache so each new token costs one position.

use candle_core::{D, Tensor};
use rand::Rng;

use crate::error::{ClientError, Result};
use crate::model::Llama;
use crate::model::lora::seeded_rng;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1] (1.0 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl GenerateConfig {
    /// Refuses settings that would sample from nothing or from NaNs.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ClientError::InvalidArgument(format!(
                "temperature {} (0 decodes greedily; sampling needs a finite positive value)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ClientError::InvalidArgument(format!(
                "top-p {} (the nucleus's probability mass must be in (0, 1]; 1 samples from the \
                 whole distribution)",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced a stop token (not included in the output).
    Stop,
    /// `max_new_tokens` were produced.
    Length,
    /// The model's context (its position limit) is full.
    Context,
}

/// The new tokens and why they end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Continues `prompt` until a token of `stop`, `max_new_tokens`, or the end of the model's
/// context (a prompt filling it gets one token). An empty prompt, or one longer than the
/// context, is refused.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    stop: &[u32],
    config: &GenerateConfig,
) -> Result<Generated> {
    config.validate()?;
    let limit = model.max_sequence_len();
    if prompt.is_empty() || prompt.len() > limit {
        return Err(ClientError::InvalidArgument(format!(
            "a prompt of {} tokens (the model's context holds {limit} positions; a prompt takes 1 \
             to {limit} of them, and the answer the rest)",
            prompt.len(),
        )));
    }
    let mut rng = seeded_rng(config.seed);
    let mut tokens = Vec::new();
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let finish = loop {
        if tokens.len() == config.max_new_tokens {
            break Finish::Length;
        }
        if cache.len() + input.len() > limit {
            break Finish::Context;
        }
        let tensor = Tensor::from_slice(&input, (1, input.len()), model.device())?;
        let logits = model.last_logits_cached(&tensor, &mut cache)?.squeeze(0)?;
        let greedy =
            |logits: &Tensor| -> Result<u32> { Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?) };
        let next = if config.temperature == 0.0 {
            greedy(&logits)?
        } else {
            let scaled = (&logits / f64::from(config.temperature))?;
            let probabilities = candle_nn::ops::softmax(&scaled, D::Minus1)?.to_vec1::<f32>()?;
            // A temperature so small that the scaled logits overflow is greedy decoding.
            if probabilities.iter().all(|p| p.is_finite()) {
                nucleus_sample(&probabilities, config.top_p, rng.random::<f32>())
            } else {
                greedy(&logits)?
            }
        };
        if stop.contains(&next) {
            break Finish::Stop;
        }
        tokens.push(next);
        input = vec![next];
    };
    Ok(Generated { tokens, finish })
}

/// Draws a token from `probabilities` restricted to its nucleus: the fewest most probable tokens
/// whose mass reaches `top_p` (ties by lower id), renormalised. `uniform` is a draw from [0, 1).
pub fn nucleus_sample(probabilities: &[f32], top_p: f32, uniform: f32) -> u32 {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&left, &right| {
        probabilities[right]
            .total_cmp(&probabilities[left])
            .then(left.cmp(&right))
    });
    // Sums in f64: in f32, a large vocabulary's tail stops changing a sum near 1, so a top-p of
    // 1 would cut the least likely tokens, or the draw would under-sample them.
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &index in &order {
        kept += 1;
        mass += f64::from(probabilities[index]);
        if top_p < 1.0 && mass >= f64::from(top_p) {
            break;
        }
    }
    let nucleus = &order[..kept];
    let mut draw = f64::from(uniform.clamp(0.0, 1.0)) * mass;
    for &index in nucleus {
        draw -= f64::from(probabilities[index]);
        if draw < 0.0 {
            return index as u32;
        }
    }
    // Rounding left a sliver of the draw: the nucleus's least likely token that can occur.
    nucleus
        .iter()
        .rev()
        .find(|&&index| probabilities[index] > 0.0)
        .or(nucleus.first())
        .copied()
        .unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_nucleus_is_the_fewest_likeliest_tokens_reaching_top_p() {
        let probabilities = [0.05, 0.5, 0.15, 0.3];
        // Mass order: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05). top_p 0.7 keeps {1, 3}, mass 0.8:
        // draws below 0.5/0.8 give 1, the rest 3.
        assert_eq!(nucleus_sample(&probabilities, 0.7, 0.0), 1);
        assert_eq!(nucleus_sample(&probabilities, 0.7, 0.62), 1);
        assert_eq!(nucleus_sample(&probabilities, 0.7, 0.63), 3);
        assert_eq!(nucleus_sample(&probabilities, 0.7, 0.999_999), 3);
        // A small top_p keeps the likeliest token alone: greedy.
        assert_eq!(nucleus_sample(&probabilities, 0.1, 0.99), 1);
        // top_p 1 keeps every token; the least likely gets the last 5%.
        assert_eq!(nucleus_sample(&probabilities, 1.0, 0.96), 0);
        assert_eq!(nucleus_sample(&probabilities, 1.0, 0.94), 2);
        // Equal probabilities rank by id.
        assert_eq!(nucleus_sample(&[0.25; 4], 0.5, 0.9), 1);
        // A draw past the mass (rounding) never lands on a token of probability 0.
        assert_eq!(nucleus_sample(&[0.0, 0.6, 0.4], 1.0, 1.0), 2);
        // A large vocabulary's tail, each token far below f32's resolution near 1, keeps its
        // share: 1e-4 of the mass, so a draw of 0.99995 lands about halfway into it (summed in
        // f32, the tail added nothing and the draw landed on the likeliest token).
        let tail = 150_000;
        let mut large = vec![1e-4 / tail as f32; tail + 1];
        large[0] = 0.9999;
        let drawn = nucleus_sample(&large, 1.0, 0.999_95) as usize;
        assert!(
            (tail / 2 - 2000..tail / 2 + 2000).contains(&drawn),
            "{drawn}"
        );
    }

    #[test]
    fn sampled_frequencies_follow_the_tempered_distribution() {
        let (_dir, base) = crate::testing::tiny_base();
        let model = &base.model;
        let prompt = [5u32, 17, 42];
        // Sharpened, so that a few tokens carry most of the mass.
        let temperature = 0.25f32;
        let logits = model
            .last_logits(
                &Tensor::new(&prompt[..], model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let expected = candle_nn::ops::softmax(&(logits / f64::from(temperature)).unwrap(), 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut order: Vec<usize> = (0..expected.len()).collect();
        order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
        assert!(
            expected[order[0]] < 0.9 && expected[order[0]] + expected[order[1]] > 0.3,
            "a distribution with several likely tokens: {:?}",
            order[..4].iter().map(|&i| expected[i]).collect::<Vec<_>>()
        );
        let draws = 3000;
        for top_p in [1.0f32, 0.8] {
            // The nucleus's tokens, renormalised: what each draw should follow.
            let mut nucleus = vec![0.0f64; expected.len()];
            let mut mass = 0.0f32;
            for &token in &order {
                nucleus[token] = f64::from(expected[token]);
                mass += expected[token];
                if mass >= top_p {
                    break;
                }
            }
            let total: f64 = nucleus.iter().sum();
            let kept = nucleus.iter().filter(|&&p| p > 0.0).count();
            let left_out: f32 = order[kept..].iter().map(|&token| expected[token]).sum();
            assert!(
                top_p == 1.0 || (kept > 1 && left_out > 0.05),
                "a nucleus of several tokens that leaves some mass out: {kept}, {left_out}"
            );
            let mut counts = vec![0usize; expected.len()];
            for seed in 0..draws {
                let config = GenerateConfig {
                    max_new_tokens: 1,
                    temperature,
                    top_p,
                    seed,
                };
                let generated = generate(model, &prompt, &[], &config).unwrap();
                assert_eq!(generated.finish, Finish::Length);
                counts[generated.tokens[0] as usize] += 1;
            }
            // Each token's frequency within 5 standard deviations of its probability (tokens
            // outside the nucleus: never drawn).
            for (token, (&count, &p)) in counts.iter().zip(&nucleus).enumerate() {
                let (frequency, p) = (count as f64 / draws as f64, p / total);
                let sigma = (p * (1.0 - p) / draws as f64).sqrt();
                assert!(
                    (frequency - p).abs() <= 5.0 * sigma + 1e-3,
                    "top-p {top_p}, token {token}: frequency {frequency} against {p}"
                );
            }
            assert!(counts.iter().filter(|&&count| count > 0).count() > 1);
        }
    }

    /// `fedlora generate` merges an adapter before decoding (unmerged, DoRA rebuilds its row
    /// norms per token): the cached decoding must give the same answer either way.
    #[test]
    fn a_dora_adapter_decodes_alike_merged_or_not() {
        let (_dir, mut base) = crate::testing::tiny_base();
        let prompt = [3u32, 9, 27, 81];
        let greedy = GenerateConfig {
            max_new_tokens: 8,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        let plain = generate(&base.model, &prompt, &[], &greedy).unwrap();
        let lora = fedlora_proto::adapter::LoraSpec {
            use_dora: true,
            ..fedlora_proto::adapter::LoraSpec::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
        };
        base.model.attach_lora(&lora, 11).unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.5, 12);
        let unmerged = generate(&base.model, &prompt, &[], &greedy).unwrap();
        assert_ne!(
            unmerged.tokens, plain.tokens,
            "the adapter changes the answer"
        );
        let cached_logits = |model: &Llama| {
            let mut cache = model.new_cache();
            let mut last = Vec::new();
            for &token in prompt.iter().chain(&unmerged.tokens) {
                let input = Tensor::new(&[token], model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let logits = model.last_logits_cached(&input, &mut cache).unwrap();
                last = crate::testing::flat(&logits);
            }
            last
        };
        let before = cached_logits(&base.model);
        base.model.merge_lora().unwrap();
        let merged = generate(&base.model, &prompt, &[], &greedy).unwrap();
        assert_eq!(merged, unmerged);
        let after = cached_logits(&base.model);
        let difference = crate::testing::max_abs_difference(&before, &after);
        assert!(difference < 1e-4, "{difference}");
    }

    #[test]
    fn greedy_and_seeded_sampling_are_reproducible_and_limits_are_enforced() {
        let (_dir, base) = crate::testing::tiny_base();
        let model = &base.model;
        let prompt = [3u32, 9, 27, 81];
        let greedy = GenerateConfig {
            max_new_tokens: 6,
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
        };
        let first = generate(model, &prompt, &[], &greedy).unwrap();
        assert_eq!(first.finish, Finish::Length);
        assert_eq!(first.tokens.len(), 6);
        // Greedy: each token is the argmax after the prompt and the tokens before it.
        let mut context = prompt.to_vec();
        for &token in &first.tokens {
            let input = Tensor::new(context.as_slice(), model.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.last_logits(&input).unwrap().squeeze(0).unwrap();
            assert_eq!(token, logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
            context.push(token);
        }
        // A stop token ends the answer before it.
        let stopped = generate(model, &prompt, &[first.tokens[2]], &greedy).unwrap();
        assert_eq!(stopped.finish, Finish::Stop);
        assert_eq!(stopped.tokens, first.tokens[..2]);

        let sampled = |seed| {
            let config = GenerateConfig {
                temperature: 2.0,
                top_p: 1.0,
                seed,
                ..greedy.clone()
            };
            generate(model, &prompt, &[], &config).unwrap().tokens
        };
        assert_eq!(sampled(7), sampled(7));
        assert_ne!(sampled(7), sampled(8));

        // Context: the answer stops where the positions run out (the last token is predicted
        // from all of them); an empty prompt, or one longer than the context, is refused.
        let limit = model.max_sequence_len();
        let tokens =
            |count: usize| -> Vec<u32> { (0..count as u32).map(|i| i % 200 + 3).collect() };
        let end = generate(model, &tokens(limit - 2), &[], &greedy).unwrap();
        assert_eq!((end.tokens.len(), end.finish), (3, Finish::Context));
        let end = generate(model, &tokens(limit), &[], &greedy).unwrap();
        assert_eq!((end.tokens.len(), end.finish), (1, Finish::Context));
        for prompt in [vec![], tokens(limit + 1)] {
            let error = generate(model, &prompt, &[], &greedy)
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("{limit} positions")), "{error}");
        }
        for (temperature, top_p) in [(-1.0, 0.9), (f32::NAN, 0.9), (1.0, 0.0), (1.0, 1.5)] {
            let config = GenerateConfig {
                temperature,
                top_p,
                ..greedy.clone()
            };
            assert!(matches!(
                generate(model, &prompt, &[], &config),
                Err(ClientError::InvalidArgument(_))
            ));
        }
    }
}
