//! Local training and evaluation: causal-LM cross-entropy on packed windows, AdamW on the LoRA
//! factors only, a fixed number of steps.

pub mod data;
pub mod local;
pub mod loss;
pub mod machine;
pub mod optim;

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use fedlora_proto::adapter::Factor;
use rand::Rng;

use crate::error::{ClientError, Result};
use crate::model::lora::seeded_rng;
use crate::model::{DocumentStarts, Llama};
use data::Window;
use optim::AdamW;

/// Hyper-parameters of one local training run (they come with the coordinator's task).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub local_steps: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Steps of linear warm-up from 0 to `learning_rate`.
    pub warmup_steps: usize,
    /// After warm-up, decay the learning rate to 0 along a half cosine (else keep it constant).
    pub cosine_decay: bool,
    /// Clip the global L2 norm of the LoRA gradients to this value.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches of `batch_size` accumulated into each optimizer step.
    pub grad_accumulation: usize,
    /// Which LoRA factors train; the other keeps its value exactly.
    pub trained: TrainedFactors,
}

/// Which LoRA factors a run trains (the coordinator's strategy decides; DoRA magnitudes always
/// train): the type the coordinator uses, from `fedlora_proto`.
pub use fedlora_proto::factors::Trained as TrainedFactors;

impl TrainConfig {
    /// A constant learning rate, no clipping, no accumulation.
    pub fn simple(
        local_steps: usize,
        learning_rate: f64,
        batch_size: usize,
        seq_len: usize,
        seed: u64,
    ) -> Self {
        Self {
            local_steps,
            learning_rate,
            batch_size,
            seq_len,
            seed,
            warmup_steps: 0,
            cosine_decay: false,
            max_grad_norm: None,
            grad_accumulation: 1,
            trained: TrainedFactors::Both,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if !self.cosine_decay {
            return self.learning_rate;
        }
        let decay_steps = self.local_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = (step - self.warmup_steps) as f64 / decay_steps as f64;
        self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

/// What a training run reports: aggregates only, never per-example values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainReport {
    pub steps: usize,
    pub tokens: u64,
    /// Mean of the per-step batch losses.
    pub mean_loss: f32,
    pub seconds: f32,
}

/// Mean held-out loss and the number of target tokens it was measured on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    pub loss: f32,
    pub tokens: u64,
}

impl EvalReport {
    /// Perplexity: `exp` of the mean loss per target token (the loss is in nats).
    pub fn perplexity(&self) -> f32 {
        perplexity(self.loss)
    }
}

/// `exp(loss)`: the perplexity of a mean cross-entropy in nats (infinite past f32's range).
pub fn perplexity(loss: f32) -> f32 {
    loss.exp()
}

/// Mean cross-entropy over the counted targets of a batch of windows (see [`data::Window`]):
/// predicting `tokens[i + 1]` from `tokens[start..=i]` (`start` the first token of `i`'s own
/// document) for each `i` that [`Window::counts`].
pub fn batch_loss(model: &Llama, windows: &[&Window]) -> Result<Tensor> {
    batch_loss_train(model, windows, None)
}

/// As [`batch_loss`], with LoRA dropout drawn from `dropout_seed` when given (training).
fn batch_loss_train(
    model: &Llama,
    windows: &[&Window],
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    batch_loss_with(model, windows, dropout_seed, true)
}

/// The mean loss of a batch; `need_grad` false skips the work only a backward pass needs.
fn batch_loss_with(
    model: &Llama,
    windows: &[&Window],
    dropout_seed: Option<u64>,
    need_grad: bool,
) -> Result<Tensor> {
    let batch = Batch::new(windows, model.device())?;
    let hidden = model.hidden_train(&batch.inputs, batch.documents.as_ref(), dropout_seed)?;
    let (rows, seq_len, width) = hidden.dims3()?;
    let hidden = hidden.reshape((rows * seq_len, width))?;
    let losses =
        loss::head_cross_entropy_rows(&hidden, &model.head_weight(), &batch.targets, need_grad)?;
    match &batch.mask {
        None => Ok(losses.mean_all()?),
        Some((mask, count)) => Ok(((losses * mask)?.sum_all()? / *count)?),
    }
}

/// Token tensors of a batch, right-padded to its longest window.
struct Batch {
    /// `[rows, seq_len]`.
    inputs: Tensor,
    /// `[rows · seq_len]`.
    targets: Tensor,
    /// 1 where a target counts, and how many do; `None` when all do.
    mask: Option<(Tensor, f64)>,
    /// Where packed documents start; `None` when every row holds one.
    documents: Option<DocumentStarts>,
}

impl Batch {
    fn new(windows: &[&Window], device: &Device) -> Result<Self> {
        let seq_len = windows
            .iter()
            .map(|window| window.input_len())
            .max()
            .unwrap_or(0);
        if seq_len == 0 || windows.iter().any(|window| window.num_targets() == 0) {
            return Err(ClientError::NotEnoughData(
                "a batch needs windows with at least one target".into(),
            ));
        }
        let mut inputs = Vec::with_capacity(windows.len() * seq_len);
        let mut targets = Vec::with_capacity(windows.len() * seq_len);
        let mut mask = Vec::with_capacity(windows.len() * seq_len);
        let mut starts = Vec::with_capacity(windows.len() * seq_len);
        for window in windows {
            let tokens = &window.tokens;
            for position in 0..seq_len {
                let real = position + 1 < tokens.len();
                // Padding (token 0) sits right of every real token: causal attention never reads
                // it, and the mask drops its targets. It continues the last document.
                inputs.push(if real { tokens[position] } else { 0 });
                targets.push(if real { tokens[position + 1] } else { 0 });
                mask.push(f32::from(u8::from(real && window.counts(position))));
                starts.push(window.document_start(position) as u32);
            }
        }
        let count: f64 = mask.iter().map(|value| f64::from(*value)).sum();
        let all_count = count as usize == mask.len();
        let packed = windows.iter().any(|window| window.is_packed());
        Ok(Self {
            documents: packed
                .then(|| DocumentStarts::new(starts, windows.len(), seq_len))
                .transpose()?,
            inputs: Tensor::from_vec(inputs, (windows.len(), seq_len), device)?,
            targets: Tensor::from_vec(targets, windows.len() * seq_len, device)?,
            mask: if all_count {
                None
            } else {
                Some((
                    Tensor::from_vec(mask, windows.len() * seq_len, device)?,
                    count,
                ))
            },
        })
    }
}

/// Trains the attached LoRA factors for `config.local_steps` AdamW steps on batches drawn (with a
/// seeded generator) from `windows`. `on_step(step, loss)` is called after every step.
pub fn train(
    model: &Llama,
    windows: &[Window],
    config: &TrainConfig,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<TrainReport> {
    train_with(model, windows, config, &mut |step, loss| {
        on_step(step, loss);
        Ok(())
    })
}

/// As [`train`], where `on_step` may end the run: its error is returned as it is, after the step
/// it was called for (the factors hold that step's values).
pub fn train_with(
    model: &Llama,
    windows: &[Window],
    config: &TrainConfig,
    on_step: &mut dyn FnMut(usize, f32) -> Result<()>,
) -> Result<TrainReport> {
    train_resumable(model, windows, config, None, &mut |step, loss, _| {
        on_step(step, loss)
    })
}

/// As [`train_with`], continuing a run where `resume` (the bytes of [`AdamW::state_bytes`] after
/// step `s`, with the model holding that step's factors) leaves it: steps `s + 1` to
/// `config.local_steps` run as they would have in the uninterrupted run, to the last bit (the
/// batches drawn, dropout masks and learning rates depend on the seed and the step alone, and
/// the moments are restored). `on_step` also gets the optimizer, to save its state. The report
/// counts the steps run in this call.
pub fn train_resumable(
    model: &Llama,
    windows: &[Window],
    config: &TrainConfig,
    resume: Option<&[u8]>,
    on_step: &mut dyn FnMut(usize, f32, &AdamW) -> Result<()>,
) -> Result<TrainReport> {
    if windows.is_empty() {
        return Err(ClientError::NotEnoughData(format!(
            "no training window of {} tokens: the local data is too short, or every \
             instruction example's prompt fills the window",
            config.seq_len + 1
        )));
    }
    let vars: Vec<(String, Var)> = model
        .named_lora_vars()?
        .into_iter()
        .filter(|(name, _)| {
            Factor::of_name(name).is_some_and(|factor| config.trained.includes(factor))
        })
        .collect();
    if vars.is_empty() {
        return Err(ClientError::Protocol(
            "no lora factors attached to train".into(),
        ));
    }
    let trained: Vec<Var> = vars.iter().map(|(_, var)| var.clone()).collect();
    let mut optimizer = AdamW::new(vars, config.learning_rate)?;
    if let Some(state) = resume {
        optimizer.restore(state)?;
    }
    let first_step = optimizer.steps();
    if first_step > config.local_steps {
        return Err(ClientError::InvalidArgument(format!(
            "the optimizer state is of step {first_step}, past the run's {} steps",
            config.local_steps
        )));
    }
    let micro_batches = config.grad_accumulation.max(1);
    let batch_size = config.batch_size.max(1);
    let mut rng = seeded_rng(config.seed);
    // The draws of the steps already run, so that the next ones are the uninterrupted run's.
    for _ in 0..first_step * micro_batches * batch_size {
        rng.random_range(0..windows.len());
    }
    let started = Instant::now();
    let mut loss_sum = 0.0f64;
    let mut tokens = 0u64;
    for step in first_step..config.local_steps {
        optimizer.set_learning_rate(config.learning_rate_at(step));
        // Drawn one micro-batch after another, as before accumulation weighed them.
        let batches: Vec<Vec<&Window>> = (0..micro_batches)
            .map(|_| {
                (0..batch_size)
                    .map(|_| &windows[rng.random_range(0..windows.len())])
                    .collect()
            })
            .collect();
        tokens += batches
            .iter()
            .flatten()
            .map(|window| window.input_len() as u64)
            .sum::<u64>();
        // A fresh dropout mask stream per micro-batch, reproducible from the task's seed.
        let dropout_seeds =
            |micro_batch: usize| config.seed ^ ((step * micro_batches + micro_batch) as u64) << 20;
        let (mut gradients, step_loss) =
            accumulate_gradients(model, &trained, &batches, step, dropout_seeds)?;
        if let Some(max_norm) = config.max_grad_norm {
            clip_gradients(&mut gradients, &trained, max_norm)?;
        }
        optimizer.step(&gradients)?;
        loss_sum += step_loss;
        on_step(step + 1, step_loss as f32, &optimizer)?;
    }
    let steps = config.local_steps - first_step;
    Ok(TrainReport {
        steps,
        tokens,
        mean_loss: (loss_sum / steps.max(1) as f64) as f32,
        seconds: started.elapsed().as_secs_f32(),
    })
}

/// The summed gradients of one optimizer step over `batches` (micro-batches), each weighted by
/// its share of the step's counted targets, and the step's loss: the mean over every counted
/// target of the step, as one batch of all the windows would give it (and as transformers
/// accumulates since 4.46). Weighing micro-batches equally would let one with 3 response tokens
/// count as much as one with 300. Only detached gradients are kept: a `Var`'s gradient links
/// back to its micro-batch's activations, which must be freed before the next one runs. A
/// non-finite loss is an error naming `step`.
fn accumulate_gradients(
    model: &Llama,
    vars: &[Var],
    batches: &[Vec<&Window>],
    step: usize,
    dropout_seed: impl Fn(usize) -> u64,
) -> Result<(GradStore, f64)> {
    let targets: Vec<usize> = batches
        .iter()
        .map(|batch| batch.iter().map(|window| window.num_targets()).sum())
        .collect();
    let step_targets = targets.iter().sum::<usize>().max(1) as f64;
    let mut gradients = GradStore::default();
    let mut step_loss = 0.0f64;
    for (micro_batch, (batch, &count)) in batches.iter().zip(&targets).enumerate() {
        let share = count as f64 / step_targets;
        let loss = batch_loss_train(model, batch, Some(dropout_seed(micro_batch)))?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(ClientError::Diverged(format!(
                "the training loss at step {step} is {value} (try a lower learning rate, or \
                 --max-grad-norm)"
            )));
        }
        step_loss += f64::from(value) * share;
        let micro = (loss * share)?.backward()?;
        for var in vars {
            if let Some(gradient) = micro.get(var.as_tensor()) {
                let gradient = gradient.detach();
                let total = match gradients.get(var.as_tensor()) {
                    Some(previous) => (previous + gradient)?,
                    None => gradient,
                };
                gradients.insert(var.as_tensor(), total);
            }
        }
    }
    Ok((gradients, step_loss))
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm`.
fn clip_gradients(gradients: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<()> {
    let mut squared = 0.0f64;
    for var in vars {
        if let Some(gradient) = gradients.get(var.as_tensor()) {
            squared += f64::from(gradient.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = squared.sqrt();
    if norm > max_norm && norm.is_finite() {
        let factor = max_norm / norm;
        for var in vars {
            if let Some(gradient) = gradients.remove(var.as_tensor()) {
                gradients.insert(var.as_tensor(), (gradient * factor)?);
            }
        }
    }
    Ok(())
}

/// Token-weighted mean loss over at most `max_windows` held-out windows, in batches of `batch_size`.
/// Where there are more, `max_windows` of them spread evenly over the list are taken (the same
/// ones every round, so losses compare across rounds): in a file mixing documents and
/// instruction examples, whose windows [`make_windows`](data::make_windows) lists kind by kind,
/// both kinds are evaluated in proportion, not only the first.
pub fn evaluate(
    model: &Llama,
    windows: &[Window],
    batch_size: usize,
    max_windows: usize,
) -> Result<EvalReport> {
    if max_windows == 0 {
        return Err(ClientError::NotEnoughData(
            "evaluation needs at least one window (max_eval_windows is 0)".into(),
        ));
    }
    let windows: Vec<&Window> = evenly_spaced(windows.len(), max_windows)
        .map(|index| &windows[index])
        .collect();
    if windows.is_empty() {
        return Err(ClientError::NotEnoughData(
            "no held-out window to evaluate: the held-out documents (every tenth) are empty, or \
             every held-out instruction example's prompt fills the task's sequence length"
                .into(),
        ));
    }
    let mut loss_sum = 0.0f64;
    let mut tokens = 0u64;
    for batch in windows.chunks(batch_size.max(1)) {
        let batch_tokens: u64 = batch.iter().map(|window| window.num_targets() as u64).sum();
        let loss = batch_loss_with(model, batch, None, false)?.to_scalar::<f32>()?;
        loss_sum += f64::from(loss) * batch_tokens as f64;
        tokens += batch_tokens;
    }
    Ok(EvalReport {
        loss: (loss_sum / tokens as f64) as f32,
        tokens,
    })
}

/// The held-out loss, or `None` where the held-out data has no window at the task's sequence
/// length (every held-out instruction example's prompt fills it): a fact about the site's data
/// and the task, reported as no measurement rather than failing a task that can still train.
pub fn evaluate_heldout(
    model: &Llama,
    heldout: &[Window],
    batch_size: usize,
    max_windows: usize,
) -> Result<Option<EvalReport>> {
    if heldout.is_empty() {
        return Ok(None);
    }
    evaluate(model, heldout, batch_size, max_windows).map(Some)
}

/// `min(len, max)` indices into a list of `len`, ascending and spread evenly over it: all of
/// them when `len <= max`, else `⌊i·len/max⌋` for `i` in `0..max` (distinct, as `len > max`).
fn evenly_spaced(len: usize, max: usize) -> impl Iterator<Item = usize> {
    let count = len.min(max);
    (0..count).map(move |i| i * len / count)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use candle_core::{D, DType};
    use fedlora_proto::adapter::{Adapter, LORA_MODULES, LoraSpec};

    use super::*;
    use crate::model::BaseModel;
    use crate::testing::{flat, logits, max_abs_difference};
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    use crate::testing::tiny_base as tiny;

    fn all_modules() -> LoraSpec {
        LoraSpec::new(4, 8.0, &LORA_MODULES)
    }

    fn sample_windows(seq_len: usize) -> Vec<Window> {
        (0..6u32)
            .map(|row| {
                Window::full(
                    (0..=seq_len as u32)
                        .map(|col| 3 + (row * 7 + col * 3) % 200)
                        .collect(),
                )
            })
            .collect()
    }

    /// Every A and B of every layer gets a non-zero gradient. B starts at zero (PEFT init), which
    /// makes ∂L/∂A exactly zero at step 0, so B is first set to small random values.
    #[test]
    fn every_lora_var_gets_a_gradient() {
        let (_dir, mut base) = tiny();
        base.model.attach_lora(&all_modules(), 7).unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.1, 3);
        let windows = sample_windows(16);
        let batch: Vec<&Window> = windows.iter().collect();
        let loss = batch_loss(&base.model, &batch).unwrap();
        let gradients = loss.backward().unwrap();
        let named = base.model.named_lora_vars().unwrap();
        assert_eq!(named.len(), 2 * 7 * 2, "2 layers x 7 modules x (A, B)");
        for (name, var) in named {
            let norm = crate::testing::gradient_norm_squared(&gradients, &var, &name);
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }

    #[test]
    fn fresh_adapter_leaves_the_base_unchanged_and_training_lowers_the_loss() {
        let (_dir, mut base) = tiny();
        let windows = sample_windows(32);
        let batch: Vec<&Window> = windows.iter().collect();
        let before = batch_loss(&base.model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lora = LoraSpec::new(8, 16.0, &["q_proj", "v_proj"]);
        base.model.attach_lora(&lora, 1).unwrap();
        let attached = batch_loss(&base.model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(before, attached, "B = 0 means the adapter is a no-op");

        let config = TrainConfig::simple(30, 1e-2, 4, 32, 5);
        let mut steps_seen = 0;
        let report = train(&base.model, &windows, &config, &mut |step, _| {
            steps_seen = step
        })
        .unwrap();
        assert_eq!((report.steps, steps_seen), (30, 30));
        assert_eq!(report.tokens, 30 * 4 * 32);
        let after = evaluate(&base.model, &windows, 3, 100).unwrap();
        assert_eq!(after.tokens, 6 * 32);
        assert!(after.loss < before - 0.5, "loss {before} -> {}", after.loss);
        // Perplexity is the loss in tokens: the untrained model is nearly uniform over its
        // vocabulary, and training lowered it by the same factor as e^(loss drop).
        let vocab = base.model.config().vocab_size as f32;
        let untrained = perplexity(before);
        assert!(
            (0.5 * vocab..2.0 * vocab).contains(&untrained),
            "untrained perplexity {untrained}, vocabulary {vocab}"
        );
        let drop = untrained / after.perplexity();
        assert!(
            (drop - (before - after.loss).exp()).abs() < 1e-3 * drop,
            "{drop}"
        );
        assert!(
            drop > 1.6,
            "perplexity {untrained} -> {}",
            after.perplexity()
        );
    }

    #[test]
    fn exported_adapter_loads_back_into_a_fresh_model() {
        let (_dir, mut base) = tiny();
        let lora = LoraSpec::new(2, 4.0, &["v_proj", "down_proj"]);
        base.model.attach_lora(&lora, 11).unwrap();
        let windows = sample_windows(8);
        let config = TrainConfig::simple(3, 1e-2, 2, 8, 1);
        train(&base.model, &windows, &config, &mut |_, _| {}).unwrap();
        let adapter = base.model.export_adapter().unwrap();
        let spec =
            fedlora_proto::adapter::adapter_spec(&base.model.config().dims(), &lora).unwrap();
        adapter.validate(&spec).unwrap();

        let mut other = base.model.clone();
        other.attach_lora(&lora, 99).unwrap();
        other.load_adapter(&adapter).unwrap();
        assert_eq!(other.export_adapter().unwrap(), adapter);
        let batch: Vec<&Window> = windows.iter().collect();
        let ours = batch_loss(&base.model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let theirs = batch_loss(&other, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(ours, theirs);

        // A bad file changes nothing: every tensor is checked before the first is set.
        let before = other.export_adapter().unwrap();
        let doubled = |adapter: &Adapter| {
            let mut doubled = adapter.clone();
            for tensor in doubled.tensors.values_mut() {
                tensor.data.iter_mut().for_each(|value| *value *= 2.0);
            }
            doubled
        };
        let mut corrupt = doubled(&adapter);
        let last = corrupt.tensors.values_mut().last().unwrap();
        last.data[0] = f32::NAN;
        let error = other.load_adapter(&corrupt).unwrap_err();
        assert!(
            matches!(
                &error,
                ClientError::Adapter(fedlora_proto::adapter::AdapterError::NonFinite { .. })
            ),
            "{error}"
        );
        assert_eq!(other.export_adapter().unwrap(), before);
        let mut wrong_shape = doubled(&adapter);
        let last = wrong_shape.tensors.values_mut().last().unwrap();
        last.shape.reverse();
        assert!(other.load_adapter(&wrong_shape).is_err());
        assert_eq!(other.export_adapter().unwrap(), before);
    }

    /// Same seed, same adapter: sequentially and with several trainings running at once (as in
    /// the demo), so runs and their aggregates are reproducible.
    #[test]
    fn training_is_reproducible_even_concurrently() {
        let (_dir, base) = tiny();
        let windows = sample_windows(32);
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]);
        let config = TrainConfig::simple(8, 1e-2, 4, 32, 5);
        let run = |model: &Llama| {
            let mut model = model.clone();
            model.attach_lora(&lora, 1).unwrap();
            train(&model, &windows, &config, &mut |_, _| {}).unwrap();
            model.export_adapter().unwrap()
        };
        let reference = run(&base.model);
        assert_eq!(run(&base.model), reference);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3).map(|_| scope.spawn(|| run(&base.model))).collect();
            for handle in handles {
                assert_eq!(handle.join().unwrap(), reference);
            }
        });
    }

    #[test]
    fn warmup_then_cosine_schedule() {
        let config = TrainConfig {
            warmup_steps: 2,
            cosine_decay: true,
            ..TrainConfig::simple(6, 1.0, 1, 8, 0)
        };
        let rates: Vec<f64> = (0..6).map(|step| config.learning_rate_at(step)).collect();
        assert_eq!(rates[0], 0.5);
        assert_eq!(rates[1], 1.0);
        assert!((rates[2] - 1.0).abs() < 1e-12, "decay starts at the peak");
        assert!(
            (rates[4] - 0.5).abs() < 1e-12,
            "half way down at the middle of the decay"
        );
        assert!(rates.windows(2).skip(1).all(|pair| pair[1] <= pair[0]));
        let constant = TrainConfig::simple(6, 0.3, 1, 8, 0);
        assert!((0..6).all(|step| constant.learning_rate_at(step) == 0.3));
    }

    #[test]
    fn clipping_bounds_the_global_gradient_norm() {
        let (_dir, mut base) = tiny();
        let lora = LoraSpec::new(2, 4.0, &["v_proj"]);
        base.model.attach_lora(&lora, 3).unwrap();
        let vars = base.model.lora_vars();
        let windows = sample_windows(16);
        let batch: Vec<&Window> = windows.iter().collect();
        let mut gradients = batch_loss(&base.model, &batch).unwrap().backward().unwrap();
        let norm = |gradients: &GradStore| -> f64 {
            vars.iter()
                .filter_map(|var| gradients.get(var.as_tensor()))
                .map(|g| {
                    f64::from(
                        g.sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                    )
                })
                .sum::<f64>()
                .sqrt()
        };
        let before = norm(&gradients);
        assert!(before > 1e-3);
        clip_gradients(&mut gradients, &vars, before / 4.0).unwrap();
        assert!((norm(&gradients) - before / 4.0).abs() < 1e-4 * before);
        clip_gradients(&mut gradients, &vars, before).unwrap();
        assert!(
            (norm(&gradients) - before / 4.0).abs() < 1e-4 * before,
            "below the bound: unchanged"
        );
    }

    #[test]
    fn accumulation_and_clipping_train_and_count_every_micro_batch() {
        let (_dir, mut base) = tiny();
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]);
        base.model.attach_lora(&lora, 1).unwrap();
        let windows = sample_windows(32);
        let batch: Vec<&Window> = windows.iter().collect();
        let before = batch_loss(&base.model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let config = TrainConfig {
            warmup_steps: 3,
            cosine_decay: true,
            max_grad_norm: Some(1.0),
            grad_accumulation: 2,
            ..TrainConfig::simple(20, 1e-2, 2, 32, 5)
        };
        let report = train(&base.model, &windows, &config, &mut |_, _| {}).unwrap();
        assert_eq!(report.tokens, 20 * 2 * 2 * 32);
        let after = batch_loss(&base.model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(after < before - 0.3, "loss {before} -> {after}");
    }

    /// Accumulation weighs each micro-batch by its counted targets: two micro-batches give the
    /// gradients and loss of one batch of both windows, even when one has 4 response targets
    /// and the other 32 (weighing them equally would not).
    #[test]
    fn accumulated_micro_batches_equal_one_batch_of_their_windows() {
        let (_dir, mut base) = tiny();
        base.model
            .attach_lora(&LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]), 1)
            .unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.1, 2);
        let vars = base.model.lora_vars();
        let windows = sample_windows(32);
        let response_only = Window {
            targets: 28..32,
            ..windows[0].clone()
        };
        let (short, long) = (&response_only, &windows[1]);
        assert_eq!((short.num_targets(), long.num_targets()), (4, 32));
        let run = |batches: &[Vec<&Window>]| {
            let (gradients, loss) =
                accumulate_gradients(&base.model, &vars, batches, 0, |_| 0).unwrap();
            let flat: Vec<f32> = vars
                .iter()
                .flat_map(|var| crate::testing::flat(gradients.get(var.as_tensor()).unwrap()))
                .collect();
            (flat, loss)
        };
        let (accumulated, accumulated_loss) = run(&[vec![short], vec![long]]);
        let (together, together_loss) = run(&[vec![short, long]]);
        let scale = together.iter().fold(0f32, |max, g| max.max(g.abs()));
        let difference = crate::testing::max_abs_difference(&together, &accumulated);
        assert!(difference < 1e-4 * scale, "{difference} of {scale}");
        assert!((accumulated_loss - together_loss).abs() < 1e-5 * together_loss);
        // The old rule, each micro-batch's mean loss halved, is measurably different here.
        let (first, _) = run(&[vec![short]]);
        let (second, _) = run(&[vec![long]]);
        let halved: Vec<f32> = first
            .iter()
            .zip(&second)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        let difference = crate::testing::max_abs_difference(&together, &halved);
        assert!(difference > 0.05 * scale, "{difference} of {scale}");
    }

    /// Loss and LoRA gradients of the tiny model with its frozen base changed by `reduce` (to a
    /// quantized or bf16 base) against the f32 base: every factor still gets a gradient, and
    /// loss and gradients agree within `loss_tolerance` and `gradient_tolerance` (relative).
    fn assert_reduced_base_trains_like_f32(
        what: &str,
        spec: &TinyModelSpec,
        reduce: impl Fn(&mut Llama),
        loss_tolerance: f32,
        gradient_tolerance: f32,
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), spec).unwrap();
        let mut dense = BaseModel::load(dir.path(), &Device::Cpu).unwrap().model;
        let mut reduced = dense.clone();
        reduce(&mut reduced);
        let lora = all_modules();
        dense.attach_lora(&lora, 7).unwrap();
        reduced.attach_lora(&lora, 7).unwrap();
        crate::testing::randomize_lora_b(&dense, 0.1, 3);
        crate::testing::randomize_lora_b(&reduced, 0.1, 3);
        let windows = sample_windows(16);
        let batch: Vec<&Window> = windows.iter().collect();
        let dense_loss = batch_loss(&dense, &batch).unwrap();
        let reduced_loss = batch_loss(&reduced, &batch).unwrap();
        let (l1, l2) = (
            dense_loss.to_scalar::<f32>().unwrap(),
            reduced_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (l1 - l2).abs() < loss_tolerance * l1,
            "loss {l1} (f32) vs {l2} ({what})"
        );
        let dense_grads = dense_loss.backward().unwrap();
        let reduced_grads = reduced_loss.backward().unwrap();
        for ((name, a), (_, b)) in dense
            .named_lora_vars()
            .unwrap()
            .into_iter()
            .zip(reduced.named_lora_vars().unwrap())
        {
            let ga = dense_grads.get(a.as_tensor()).unwrap();
            let gb = reduced_grads
                .get(b.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient through the {what} base"));
            let norm = crate::testing::squared_norm(ga).sqrt();
            let error = crate::testing::squared_norm(&(ga - gb).unwrap()).sqrt();
            assert!(
                norm > 0.0 && error < gradient_tolerance * norm,
                "{name}: gradient error {error} vs norm {norm} ({what})"
            );
        }
    }

    /// QLoRA: with the base quantized to Q8_0, gradients match the f32 model's within
    /// quantization error.
    #[test]
    fn quantized_base_passes_gradients_close_to_the_f32_model() {
        assert_reduced_base_trains_like_f32(
            "q8_0",
            &TinyModelSpec {
                intermediate_size: 192,
                ..TinyModelSpec::default()
            },
            |model| {
                model
                    .quantize_base(candle_core::quantized::GgmlDType::Q8_0)
                    .unwrap();
            },
            0.01,
            0.05,
        );
    }

    /// A bf16 base (projections and head, bf16 products with f32 accumulation) trains like the
    /// f32 one within bf16's rounding (8 bits of mantissa).
    #[test]
    fn bf16_base_passes_gradients_close_to_the_f32_model() {
        assert_reduced_base_trains_like_f32(
            "bf16",
            &TinyModelSpec::default(),
            |model| model.pack_base_bf16().unwrap(),
            0.01,
            0.05,
        );
    }

    /// The device-generic bf16 base (what `--bf16-base` runs on a GPU: candle's bf16 matmuls
    /// with casts) trains like the f32 one within bf16's rounding; checked here on the CPU,
    /// where candle runs the same ops.
    #[test]
    fn cast_bf16_base_passes_gradients_close_to_the_f32_model() {
        assert_reduced_base_trains_like_f32(
            "cast bf16",
            &TinyModelSpec::default(),
            |model| {
                model.cast_base(DType::BF16).unwrap();
                for (path, kind) in model.frozen_kinds() {
                    assert_eq!(kind, "dense-bf16", "{path}");
                }
            },
            0.01,
            0.05,
        );
    }

    /// The f32-packed base computes the same function in the same precision: loss and
    /// gradients agree to f32 rounding (only the order of the sums differs), and every
    /// projection and the untied head really are packed where the CPU runs the kernel.
    #[test]
    fn f32_packed_base_trains_exactly_like_the_dense_one() {
        assert_reduced_base_trains_like_f32(
            "packed f32",
            &TinyModelSpec::default(),
            |model| {
                model.pack_base_f32().unwrap();
                if crate::model::packed_gemm::f32_simd_available() {
                    let kinds = model.frozen_kinds();
                    assert_eq!(kinds.len(), 2 * 7 + 1);
                    for (path, kind) in kinds {
                        assert_eq!(kind, "packed-f32", "{path}");
                    }
                }
            },
            1e-5,
            1e-4,
        );
    }

    /// A tied head is packed too wherever the f32 kernels run (its own packings beside the
    /// embedding table the lookup keeps), and trains as the dense one does; elsewhere it stays
    /// the embedding. Its logits (the forward pass generation uses) are the dense model's, and an
    /// export still writes no `lm_head` for a tied model.
    #[test]
    fn f32_packed_base_with_a_tied_head_trains_exactly_like_the_dense_one() {
        let spec = TinyModelSpec {
            tie_word_embeddings: true,
            ..TinyModelSpec::default()
        };
        assert_reduced_base_trains_like_f32(
            "packed f32, tied head",
            &spec,
            |model| {
                let input = Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
                let dense_logits = logits(model, &input);
                model.pack_base_f32().unwrap();
                let packed_logits = logits(model, &input);
                let scale = dense_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    max_abs_difference(&dense_logits, &packed_logits) <= 1e-5 * scale,
                    "logits moved by packing the tied head"
                );
                assert!(
                    !model
                        .merged_weights()
                        .unwrap()
                        .contains_key("lm_head.weight"),
                    "a tied model exports no lm_head"
                );
                let head = model.frozen_kinds().pop().unwrap();
                assert_eq!(head.0, "lm_head");
                let expected = if crate::model::packed_gemm::f32_simd_available() {
                    "packed-f32"
                } else {
                    "dense"
                };
                assert_eq!(head.1, expected);
            },
            1e-5,
            1e-4,
        );
    }

    /// Q4K (4.5 bits per weight) on load: every projection whose rows fit its 256-value blocks
    /// gets it, the others fall back to Q8_0, and training still sees gradients close to f32's.
    #[test]
    fn q4k_base_falls_back_to_q8_0_where_rows_do_not_fit_and_trains_like_f32() {
        use candle_core::quantized::GgmlDType;
        let spec = TinyModelSpec {
            hidden_size: 256,
            intermediate_size: 160,
            ..TinyModelSpec::default()
        };
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &spec).unwrap();
        let base =
            BaseModel::load_quantized(dir.path(), &Device::Cpu, crate::model::QuantType::Q4K)
                .unwrap();
        for (path, dtype) in base.model.projection_dtypes() {
            // down_proj reads the 160-wide intermediate: not a Q4K block, a whole number of Q8_0's.
            let expected = if path.ends_with("down_proj") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4K
            };
            assert_eq!(dtype, Some(expected), "{path}");
        }
        assert_reduced_base_trains_like_f32(
            "q4k",
            &spec,
            |model| model.quantize_base(GgmlDType::Q4K).unwrap(),
            // Q4K rounds a Gaussian weight with 7.5% relative error (Q8_0: 0.5%); through the
            // 14 quantized projections above layer 0 its LoRA gradients move by up to about a
            // quarter. A lost or wrong gradient would be off by its whole norm.
            0.03,
            0.4,
        );
    }

    /// Packing the base in bf16 rounds the projections and the head and nothing else, tied or
    /// untied; an exported model carries the same tensors.
    #[test]
    fn bf16_base_rounds_projections_and_head_only() {
        for tie_word_embeddings in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let spec = TinyModelSpec {
                tie_word_embeddings,
                ..TinyModelSpec::default()
            };
            write_tiny_model(dir.path(), &spec).unwrap();
            let dense = BaseModel::load(dir.path(), &Device::Cpu).unwrap().model;
            let mut packed = dense.clone();
            packed.pack_base_bf16().unwrap();
            let (before, after) = (
                dense.merged_weights().unwrap(),
                packed.merged_weights().unwrap(),
            );
            let mut names: Vec<_> = before.keys().collect();
            names.sort();
            let mut after_names: Vec<_> = after.keys().collect();
            after_names.sort();
            assert_eq!(names, after_names);
            assert_eq!(
                names.contains(&&"lm_head.weight".to_string()),
                !tie_word_embeddings
            );
            for name in names {
                let original = &before[name];
                let expected = if name.contains("proj") || name == "lm_head.weight" {
                    original
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                } else {
                    original.clone()
                };
                assert_eq!(flat(&expected), flat(&after[name]), "{name}");
            }
            // The head of a tied model is the rounded embedding table: logits close to f32's.
            let input = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
            let (a, b) = (logits(&dense, &input), logits(&packed, &input));
            let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(
                max_abs_difference(&a, &b) < 0.02 * scale,
                "tied {tie_word_embeddings}"
            );
        }
    }

    #[test]
    fn dora_dropout_and_rank_pattern_train_every_tensor_and_reproducibly() {
        let lora = LoraSpec {
            use_dora: true,
            dropout: 0.1,
            rank_pattern: vec![("v_proj".into(), 2)],
            ..LoraSpec::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
        };
        let windows = sample_windows(32);
        let batch: Vec<&Window> = windows.iter().collect();
        let config = TrainConfig::simple(12, 1e-2, 2, 32, 5);
        let run = || {
            let (_dir, mut base) = tiny();
            base.model.attach_lora(&lora, 1).unwrap();
            let initial: Vec<Vec<f32>> = base
                .model
                .lora_vars()
                .iter()
                .map(|var| crate::testing::flat(var.as_tensor()))
                .collect();
            let before = batch_loss(&base.model, &batch)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            train(&base.model, &windows, &config, &mut |_, _| {}).unwrap();
            let after = batch_loss(&base.model, &batch)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(after < before - 0.1, "loss {before} -> {after}");
            let vars = base.model.lora_vars();
            // A, B and the magnitude of 3 modules in 2 layers; every one of them moved.
            assert_eq!(vars.len(), 18);
            for (var, initial) in vars.iter().zip(&initial) {
                assert_ne!(&crate::testing::flat(var.as_tensor()), initial);
            }
            base.model.export_adapter().unwrap()
        };
        let first = run();
        assert_eq!(
            first.tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape,
            [2, 64]
        );
        assert_eq!(first, run(), "dropout masks come from the task seed");
    }

    #[test]
    fn padding_and_response_masks_change_nothing_but_the_counted_targets() {
        let (_dir, mut base) = tiny();
        base.model
            .attach_lora(&LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]), 1)
            .unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.2, 3);
        let model = &base.model;
        let long = Window::full((0..20u32).map(|t| 3 + t * 11 % 250).collect());
        let short = Window::full(vec![5, 9, 14, 200, 17, 33]);
        let loss = |windows: &[&Window]| {
            batch_loss(model, windows)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // The short window, padded to the long one's length in a batch, has the loss it has alone:
        // right padding needs no attention mask.
        let alone = loss(&[&short]);
        let long_alone = loss(&[&long]);
        let together = loss(&[&long, &short]);
        let weighted = (long_alone * 19.0 + alone * 5.0) / 24.0;
        assert!(
            (together - weighted).abs() < 1e-5,
            "{together} vs {weighted}"
        );
        // A response-only window counts only its targets: equal to the mean of those positions.
        let response = Window {
            tokens: short.tokens.clone(),
            targets: 3..5,
            starts: Vec::new(),
        };
        let logits = model
            .forward(
                &Tensor::new(&short.tokens[..5], model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let manual = -(3..5)
            .map(|position| {
                log_probs
                    .get(position)
                    .unwrap()
                    .get(short.tokens[position + 1] as usize)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
            / 2.0;
        assert!((loss(&[&response]) - manual).abs() < 1e-5);
        // Evaluation weights by counted targets.
        let report = evaluate(model, &[response.clone(), short.clone()], 2, 8).unwrap();
        assert_eq!(report.tokens, 2 + 5);
        // Capped at two windows of four listed kind by kind, one of each kind is evaluated
        // (the first two would be `response` twice: 4 tokens).
        let mixed = [response.clone(), response, short.clone(), short];
        assert_eq!(evaluate(model, &mixed, 2, 2).unwrap().tokens, 2 + 5);
        // No window at all (every held-out prompt too long), or none allowed: errors that say
        // which.
        let error = evaluate(model, &[], 2, 8).unwrap_err();
        assert!(
            matches!(&error, ClientError::NotEnoughData(message) if message.contains("prompt fills")),
            "{error}"
        );
        let error = evaluate(model, &[], 2, 0).unwrap_err();
        assert!(
            error.to_string().contains("max_eval_windows is 0"),
            "{error}"
        );
    }

    #[test]
    fn evaluation_subsets_spread_over_the_whole_list() {
        let spaced = |len, max| evenly_spaced(len, max).collect::<Vec<_>>();
        assert_eq!(spaced(6, 2), [0, 3]);
        assert_eq!(spaced(10, 3), [0, 3, 6]);
        assert_eq!(spaced(5, 5), [0, 1, 2, 3, 4]);
        assert_eq!(spaced(3, 8), [0, 1, 2]);
        assert!(spaced(0, 4).is_empty());
        assert!(spaced(4, 0).is_empty());
        for (len, max) in [(1000, 64), (65, 64), (64, 63), (7, 3)] {
            let indices = spaced(len, max);
            assert_eq!(indices.len(), max);
            assert!(indices.windows(2).all(|pair| pair[0] < pair[1]));
            assert!(*indices.last().unwrap() < len);
            // The last index lies in the last stretch of len/max: the list's end is reached.
            assert!(*indices.last().unwrap() >= len - len.div_ceil(max));
        }
    }

    /// A packed window trains as its documents would alone: its loss is their losses weighted
    /// by their targets, and so are the LoRA gradients (the backward pass keeps documents apart
    /// too), also beside another, padded row.
    #[test]
    fn packed_documents_train_as_if_each_stood_alone() {
        let (_dir, mut base) = tiny();
        base.model.attach_lora(&all_modules(), 5).unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.2, 6);
        let model = &base.model;
        let eos = 2;
        let documents = vec![
            vec![1, 40, 41, 42, 43],
            vec![1, 7, 99, 150],
            vec![1, 12, 13],
        ];
        let packed = data::pack_windows(&documents, eos, 64);
        assert_eq!(packed.len(), 1);
        assert_eq!(packed[0].starts, [6, 11]);
        let alone: Vec<Window> = documents
            .iter()
            .map(|document| Window::full([&document[..], &[eos]].concat()))
            .collect();
        // Each document alone has as many targets as it has tokens; packed, the same ones count.
        assert_eq!(packed[0].num_targets(), 5 + 4 + 3);
        let gradients_of = |windows: &[&Window]| {
            let loss = batch_loss(model, windows).unwrap();
            let gradients = loss.backward().unwrap();
            let vars: Vec<Vec<f32>> = model
                .lora_vars()
                .iter()
                .map(|var| flat(gradients.get(var.as_tensor()).unwrap()))
                .collect();
            (loss.to_scalar::<f32>().unwrap(), vars)
        };
        let mut expected_loss = 0.0f32;
        let mut expected: Vec<Vec<f32>> = vec![Vec::new(); model.lora_vars().len()];
        for (window, targets) in alone.iter().zip([5.0f32, 4.0, 3.0]) {
            let (loss, gradients) = gradients_of(&[window]);
            let weight = targets / 12.0;
            expected_loss += loss * weight;
            for (sum, gradient) in expected.iter_mut().zip(gradients) {
                sum.resize(gradient.len(), 0.0);
                sum.iter_mut()
                    .zip(gradient)
                    .for_each(|(sum, value)| *sum += value * weight);
            }
        }
        let (loss, gradients) = gradients_of(&[&packed[0]]);
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
        for (expected, got) in expected.iter().zip(&gradients) {
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max_abs_difference(expected, got) <= 1e-4 * scale.max(1e-3));
        }
        // Beside a longer, unpacked row, the packed one (now padded) still keeps them apart.
        let long = Window::full((0..20u32).map(|t| 3 + t * 11 % 250).collect());
        let (long_loss, _) = gradients_of(&[&long]);
        let (together, _) = gradients_of(&[&long, &packed[0]]);
        let weighted = (long_loss * 19.0 + expected_loss * 12.0) / 31.0;
        assert!(
            (together - weighted).abs() < 1e-5,
            "{together} vs {weighted}"
        );
    }

    /// The coordinator computes each fresh round's start with `initial_factors`; the client's
    /// own initialisation must be the same numbers.
    #[test]
    fn fresh_factors_are_the_coordinators() {
        let (_dir, mut base) = tiny();
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "down_proj"]);
        base.model.attach_lora(&lora, 77).unwrap();
        let ours = base.model.export_adapter().unwrap();
        let theirs =
            fedlora_proto::factors::initial_factors(&base.model.config().dims(), &lora, 77)
                .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_frozen_factor_does_not_move() {
        let (_dir, mut base) = tiny();
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]);
        base.model.attach_lora(&lora, 3).unwrap();
        let windows = sample_windows(16);
        for (trained, frozen_suffix) in [
            (TrainedFactors::B, "lora_A.weight"),
            (TrainedFactors::A, "lora_B.weight"),
        ] {
            let mut model = base.model.clone();
            // Start from non-zero B so that A's gradient is not zero.
            let mut start = model.export_adapter().unwrap();
            for (name, tensor) in &mut start.tensors {
                if name.ends_with("lora_B.weight") {
                    tensor
                        .data
                        .iter_mut()
                        .enumerate()
                        .for_each(|(index, value)| {
                            *value = 0.01 * ((index % 7) as f32 - 3.0);
                        });
                }
            }
            model.load_adapter(&start).unwrap();
            let config = TrainConfig {
                trained,
                ..TrainConfig::simple(3, 1e-2, 2, 16, 9)
            };
            train(&model, &windows, &config, &mut |_, _| {}).unwrap();
            let after = model.export_adapter().unwrap();
            for (name, tensor) in &after.tensors {
                if name.ends_with(frozen_suffix) {
                    assert_eq!(tensor, &start.tensors[name], "{name} moved");
                } else {
                    assert_ne!(tensor, &start.tensors[name], "{name} did not train");
                }
            }
        }
    }
}
