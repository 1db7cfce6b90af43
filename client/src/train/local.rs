//! Training on this machine alone (`fedlora train`): the engine a site's daemon runs for each
//! round, driven by a command line instead of a coordinator, with held-out evaluation before,
//! during and after, checkpoints, and a PEFT adapter at the end. For trying a model, data and
//! hyper-parameters before a federation starts, or for a site that trains on its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use fedlora_proto::adapter::LoraSpec;

use super::data::{SiteData, Window, make_windows};
use super::{EvalReport, TrainConfig, TrainReport, evaluate, train_with};
use crate::error::{ClientError, Result};
use crate::model::peft::{read_peft_adapter, write_peft_adapter};
use crate::model::{BaseModel, BasePrecision, Llama};

/// Where the LoRA factors start.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Fresh factors of this spec, initialised as PEFT does (seeded by the run's seed).
    Fresh(LoraSpec),
    /// A PEFT adapter directory (a checkpoint of an earlier run, a federation's global adapter):
    /// its own config gives the spec. The optimizer starts afresh.
    Adapter(PathBuf),
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Steps(usize),
    /// As many windows as the training data has, times this: batches are drawn at random with
    /// replacement, so an epoch is a count of windows, not a pass over each.
    Epochs(f64),
}

/// One local training run.
#[derive(Debug, Clone)]
pub struct LocalTraining {
    pub model: PathBuf,
    pub data: PathBuf,
    /// The text column of a CSV file.
    pub text_column: String,
    pub base: BasePrecision,
    pub start: Start,
    pub length: Length,
    /// Hyper-parameters; `local_steps` is set from `length`.
    pub config: TrainConfig,
    /// Evaluate on the held-out tenth every this many steps (0: before and after only).
    pub eval_every: usize,
    /// Write a checkpoint (`checkpoint-STEP/`, a PEFT adapter) every this many steps (0: none).
    pub save_every: usize,
    /// At most this many held-out windows per evaluation, spread evenly over them.
    pub max_eval_windows: usize,
    /// The output directory: the final adapter, and the checkpoints beneath it.
    pub out: PathBuf,
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum LocalEvent<'a> {
    /// The model and data are loaded: the windows of each split and the steps to run.
    Ready {
        train_windows: usize,
        heldout_windows: usize,
        steps: usize,
        template: &'static str,
    },
    Step {
        step: usize,
        loss: f32,
        tokens_per_second: f32,
    },
    /// The held-out loss after `step` steps (`None` where no held-out window fits).
    Evaluated {
        step: usize,
        eval: Option<EvalReport>,
    },
    /// A checkpoint, or (at the last step) the final adapter, was written.
    Saved { step: usize, dir: &'a Path },
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReport {
    pub train: TrainReport,
    pub before: Option<EvalReport>,
    pub after: Option<EvalReport>,
}

/// The steps `epochs` epochs take: windows drawn per step are `batch_size × grad_accumulation`.
pub fn steps_for_epochs(windows: usize, config: &TrainConfig, epochs: f64) -> usize {
    let per_step = (config.batch_size.max(1) * config.grad_accumulation.max(1)) as f64;
    ((epochs * windows as f64 / per_step).ceil() as usize).max(1)
}

/// Runs `job`: loads the model (with `job.base`'s precision) and data (every tenth document held
/// out, as a site's daemon does), evaluates, trains, and writes the adapter to `job.out`.
/// When `stop` is set (Ctrl-C), the run ends after the current step and writes what it has
/// trained as a checkpoint, then returns [`ClientError::Interrupted`] naming it.
pub fn train_locally(
    job: &LocalTraining,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(LocalEvent<'_>),
) -> Result<LocalReport> {
    check(&job.config, job.length)?;
    // Before hours of training: the output must not overwrite an earlier run's adapter.
    if job.out.join("adapter_model.safetensors").exists() {
        return Err(ClientError::InvalidArgument(format!(
            "{} already holds an adapter: choose another output directory, or remove it",
            job.out.display()
        )));
    }
    let device = crate::model::default_device();
    let mut base = BaseModel::load_as(&job.model, &device, job.base)?;
    let template = base.prompt_template();
    let data = SiteData::load(&job.data, &base.tokenizer, &template, &job.text_column)?;
    if data.train.is_empty() || data.heldout.is_empty() {
        return Err(ClientError::NotEnoughData(format!(
            "{} has {} documents; at least 10 are needed (every tenth is held out)",
            job.data.display(),
            data.train.len() + data.heldout.len()
        )));
    }
    let lora = match &job.start {
        Start::Fresh(lora) => {
            base.model.attach_lora(lora, job.config.seed)?;
            lora.clone()
        }
        Start::Adapter(dir) => {
            let (lora, adapter) = read_peft_adapter(dir)?;
            base.model.set_adapter(&lora, &adapter)?;
            lora
        }
    };
    let seq_len = job.config.seq_len;
    let windows = make_windows(&data.train, base.eos_token_id, seq_len);
    let heldout = make_windows(&data.heldout, base.eos_token_id, seq_len);
    let steps = match job.length {
        Length::Steps(steps) => steps,
        Length::Epochs(epochs) => steps_for_epochs(windows.len(), &job.config, epochs),
    };
    let config = TrainConfig {
        local_steps: steps,
        ..job.config.clone()
    };
    if config.warmup_steps > steps {
        return Err(ClientError::InvalidArgument(format!(
            "{} warm-up steps in a run of {steps}",
            config.warmup_steps
        )));
    }
    observe(LocalEvent::Ready {
        train_windows: windows.len(),
        heldout_windows: heldout.len(),
        steps,
        template: template.name(),
    });
    let model = &base.model;
    let eval = |model: &Llama| evaluate_heldout(model, &heldout, &config, job.max_eval_windows);
    let before = eval(model)?;
    observe(LocalEvent::Evaluated {
        step: 0,
        eval: before,
    });
    let model_name = job.model.display().to_string();
    let save = |dir: &Path| save_adapter(model, &lora, &model_name, dir);
    let tokens_per_step = (config.batch_size * config.seq_len * config.grad_accumulation) as f64;
    let started = std::time::Instant::now();
    let mut after = before;
    let train = train_with(model, &windows, &config, &mut |step, loss| {
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        observe(LocalEvent::Step {
            step,
            loss,
            tokens_per_second: (step as f64 * tokens_per_step / seconds) as f32,
        });
        if step == steps || (job.eval_every > 0 && step.is_multiple_of(job.eval_every)) {
            after = eval(model)?;
            observe(LocalEvent::Evaluated { step, eval: after });
        }
        let checkpoint = job.out.join(format!("checkpoint-{step}"));
        if step < steps && job.save_every > 0 && step.is_multiple_of(job.save_every) {
            save(&checkpoint)?;
            observe(LocalEvent::Saved {
                step,
                dir: &checkpoint,
            });
        }
        if step < steps && stop.load(Ordering::Relaxed) {
            save(&checkpoint)?;
            return Err(ClientError::Interrupted(format!(
                "stopped after step {step} of {steps}; the adapter trained so far is in {} \
                 (continue from it with --init-adapter)",
                checkpoint.display()
            )));
        }
        Ok(())
    })?;
    save(&job.out)?;
    observe(LocalEvent::Saved {
        step: steps,
        dir: &job.out,
    });
    Ok(LocalReport {
        train,
        before,
        after,
    })
}

/// Refuses settings no run can train with, before anything is loaded.
fn check(config: &TrainConfig, length: Length) -> Result<()> {
    let invalid = |message: &str| Err(ClientError::InvalidArgument(message.into()));
    if config.batch_size == 0 || config.grad_accumulation == 0 || config.seq_len < 2 {
        return invalid(
            "batch size and gradient accumulation must be at least 1, and the sequence length at least 2",
        );
    }
    if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
        return invalid("the learning rate must be a positive number");
    }
    if config
        .max_grad_norm
        .is_some_and(|norm| !(norm.is_finite() && norm > 0.0))
    {
        return invalid("the gradient norm bound must be a positive number");
    }
    match length {
        Length::Steps(0) => invalid("a run of 0 steps"),
        Length::Epochs(epochs) if !(epochs.is_finite() && epochs > 0.0) => {
            invalid("the number of epochs must be a positive number")
        }
        _ => Ok(()),
    }
}

/// The held-out loss, `None` where no held-out window fits the sequence length.
fn evaluate_heldout(
    model: &Llama,
    heldout: &[Window],
    config: &TrainConfig,
    max_windows: usize,
) -> Result<Option<EvalReport>> {
    if heldout.is_empty() {
        return Ok(None);
    }
    evaluate(model, heldout, config.batch_size, max_windows).map(Some)
}

/// Writes the model's LoRA factors as a PEFT adapter directory.
fn save_adapter(model: &Llama, lora: &LoraSpec, base_model: &str, dir: &Path) -> Result<()> {
    let format = [("format".to_string(), "pt".to_string())];
    let bytes = model
        .export_adapter()?
        .to_safetensors(Some(format.into_iter().collect()))?;
    write_peft_adapter(dir, lora, base_model, &bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    /// A tiny model and 60 documents of a repeated sentence (every tenth held out).
    fn job(dir: &Path) -> LocalTraining {
        let model = dir.join("model");
        write_tiny_model(&model, &TinyModelSpec::default()).unwrap();
        let data = dir.join("data.jsonl");
        let lines: Vec<String> = (0..60)
            .map(|i| {
                let text = format!("patient {i} reports chest pain, triage urgent. ").repeat(3);
                serde_json::json!({ "text": text }).to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        LocalTraining {
            model,
            data,
            text_column: "text".into(),
            base: BasePrecision::F32,
            start: Start::Fresh(LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])),
            length: Length::Steps(20),
            config: TrainConfig::simple(0, 5e-3, 8, 32, 7),
            eval_every: 10,
            save_every: 10,
            max_eval_windows: 64,
            out: dir.join("out"),
        }
    }

    /// The held-out loss falls; evaluations, checkpoints and the final adapter come when asked,
    /// and the written adapter is the trained one (it gives the reported held-out loss again).
    #[test]
    fn a_local_run_trains_evaluates_and_writes_its_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let mut evaluated = Vec::new();
        let mut saved = Vec::new();
        let mut steps = 0;
        let report = train_locally(&job, &AtomicBool::new(false), &mut |event| match event {
            LocalEvent::Ready { steps, .. } => assert_eq!(steps, 20),
            LocalEvent::Step { step, loss, .. } => {
                assert!(loss.is_finite());
                steps = step;
            }
            LocalEvent::Evaluated { step, eval } => evaluated.push((step, eval.unwrap().loss)),
            LocalEvent::Saved { step, dir } => saved.push((step, dir.to_path_buf())),
        })
        .unwrap();
        assert_eq!(steps, 20);
        assert_eq!(report.train.steps, 20);
        let steps_evaluated: Vec<usize> = evaluated.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps_evaluated, [0, 10, 20]);
        let (before, after) = (report.before.unwrap(), report.after.unwrap());
        assert_eq!((evaluated[0].1, evaluated[2].1), (before.loss, after.loss));
        assert!(after.loss < before.loss - 0.5, "{before:?} → {after:?}");
        assert_eq!(
            saved,
            [(10, job.out.join("checkpoint-10")), (20, job.out.clone())]
        );

        // The adapter written gives the held-out loss reported, to the last bit.
        let continued = LocalTraining {
            start: Start::Adapter(job.out.clone()),
            length: Length::Steps(1),
            out: dir.path().join("continued"),
            ..job.clone()
        };
        let mut first = None;
        train_locally(&continued, &AtomicBool::new(false), &mut |event| {
            if let LocalEvent::Evaluated { step: 0, eval } = event {
                first = eval;
            }
        })
        .unwrap();
        assert_eq!(first.unwrap().loss, after.loss);

        // Never over an earlier run's adapter.
        let error = train_locally(&job, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
        assert!(
            error.to_string().contains("already holds an adapter"),
            "{error}"
        );
    }

    /// Stopped (Ctrl-C), a run saves what it trained as a checkpoint, says where, and writes no
    /// final adapter.
    #[test]
    fn a_stopped_run_keeps_what_it_trained() {
        let dir = tempfile::tempdir().unwrap();
        let job = LocalTraining {
            save_every: 0,
            eval_every: 0,
            ..job(dir.path())
        };
        let error = train_locally(&job, &AtomicBool::new(true), &mut |_| {}).unwrap_err();
        let checkpoint = job.out.join("checkpoint-1");
        assert!(
            matches!(&error, ClientError::Interrupted(message) if message.contains(&checkpoint.display().to_string())),
            "{error}"
        );
        assert!(checkpoint.join("adapter_model.safetensors").exists());
        assert!(!job.out.join("adapter_model.safetensors").exists());
    }

    #[test]
    fn epochs_count_windows_and_bad_settings_are_refused_before_loading() {
        let config = TrainConfig {
            grad_accumulation: 2,
            ..TrainConfig::simple(0, 1e-3, 4, 32, 0)
        };
        assert_eq!(steps_for_epochs(80, &config, 1.0), 10);
        assert_eq!(steps_for_epochs(81, &config, 1.0), 11);
        assert_eq!(steps_for_epochs(80, &config, 0.5), 5);
        assert_eq!(steps_for_epochs(3, &config, 0.1), 1);
        let dir = tempfile::tempdir().unwrap();
        let missing = LocalTraining {
            model: dir.path().join("no-such-model"),
            ..job(dir.path())
        };
        for (change, expected) in [
            (
                &(|job: &mut LocalTraining| job.config.seq_len = 1) as &dyn Fn(&mut LocalTraining),
                "sequence length",
            ),
            (&|job| job.config.learning_rate = f64::NAN, "learning rate"),
            (&|job| job.config.max_grad_norm = Some(0.0), "gradient norm"),
            (&|job| job.length = Length::Epochs(0.0), "epochs"),
            (&|job| job.length = Length::Steps(0), "0 steps"),
        ] {
            let mut job = missing.clone();
            change(&mut job);
            let error = train_locally(&job, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        let mut warm = job(dir.path());
        warm.config.warmup_steps = 21;
        let error = train_locally(&warm, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
        assert!(error.to_string().contains("warm-up"), "{error}");
    }
}
