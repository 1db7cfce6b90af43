//! Training on this machine alone (`fedlora train`): the engine a site's daemon runs for each
//! round, driven by a command line instead of a coordinator, with held-out evaluation before,
//! during and after, checkpoints, and a PEFT adapter at the end. For trying a model, data and
//! hyper-parameters before a federation starts, or for a site that trains on its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fedlora_proto::adapter::LoraSpec;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{SiteData, Window, cut_examples, make_windows, trained_examples};
use super::machine::Machine;
use super::optim::{AdamW, saved_steps};
use super::{EvalReport, TrainConfig, TrainReport, evaluate_heldout, train_resumable};
use crate::error::{ClientError, Result};
use crate::model::peft::{
    peft_weights, read_peft_adapter, read_peft_adapter_fingerprinted, sync_dir, write_peft_adapter,
    write_whole,
};
use crate::model::{BaseModel, BasePrecision, Llama, fingerprint};

/// Where the LoRA factors start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Fresh factors of this spec, initialised as PEFT does (seeded by the run's seed).
    Fresh(LoraSpec),
    /// A PEFT adapter directory (a checkpoint of an earlier run, a federation's global adapter):
    /// its own config gives the spec. The optimizer starts afresh.
    Adapter(PathBuf),
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Length {
    Steps(usize),
    /// As many windows as the training data has, times this: batches are drawn at random with
    /// replacement, so an epoch is a count of windows, not a pass over each.
    Epochs(f64),
}

/// One local training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Write a checkpoint (`checkpoint-STEP/`, a PEFT adapter and the optimizer's state) every
    /// this many steps (0: none).
    pub save_every: usize,
    /// At most this many held-out windows per evaluation, spread evenly over them.
    pub max_eval_windows: usize,
    /// The output directory: the final adapter, and the checkpoints beneath it.
    pub out: PathBuf,
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum LocalEvent<'a> {
    /// The model and data are loaded: the windows of each split, the training examples that
    /// teach nothing at the sequence length (instruction examples whose prompt fills it,
    /// documents wholly in the packed stream's tail), the steps of the run, and the step it
    /// starts after (0, or a resumed checkpoint's).
    Ready {
        train_windows: usize,
        heldout_windows: usize,
        skipped_examples: usize,
        /// Training instruction examples whose response is cut at the sequence length (with
        /// its end-of-sequence token: the model does not learn where those answers end).
        cut_examples: usize,
        steps: usize,
        first_step: usize,
        seq_len: usize,
        template: &'static str,
    },
    Step {
        step: usize,
        loss: f32,
        /// Tokens per second so far in this process, nominal (`batch_size × seq_len ×
        /// grad_accumulation` a step, padding included), evaluations and saves left out.
        tokens_per_second: f32,
    },
    /// The held-out loss after `step` steps (`None` where no held-out window fits).
    Evaluated {
        step: usize,
        eval: Option<EvalReport>,
    },
    /// A checkpoint, or (at the last step) the final adapter, was written.
    Saved { step: usize, dir: &'a Path },
    /// A resumed run: steps before it ran on another machine or build, or with another thread
    /// count (what differs here, one phrase each). The run continues, but its adapter can differ
    /// in the last bits from an uninterrupted run's. Comes before the model loads.
    ResumedElsewhere { differences: &'a [String] },
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReport {
    /// The step this process started after (0, or the resumed checkpoint's).
    pub first_step: usize,
    /// The steps run by this process; `seconds` counts training only (evaluations and saves
    /// left out).
    pub train: TrainReport,
    /// The held-out loss at `first_step`, and at the end.
    pub before: Option<EvalReport>,
    pub after: Option<EvalReport>,
}

/// The steps `epochs` epochs take: windows drawn per step are `batch_size × grad_accumulation`.
pub fn steps_for_epochs(windows: usize, config: &TrainConfig, epochs: f64) -> usize {
    let per_step = (config.batch_size.max(1) * config.grad_accumulation.max(1)) as f64;
    ((epochs * windows as f64 / per_step).ceil() as usize).max(1)
}

/// The run's settings, written to `OUT/training_args.json` once the model and data are loaded.
const RUN_FILE: &str = "training_args.json";
/// A checkpoint's optimizer state ([`AdamW::state_bytes`](super::optim::AdamW::state_bytes)).
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A checkpoint's [`CheckpointState`], written last: a checkpoint without it is incomplete.
const STATE_FILE: &str = "training_state.json";
/// Written and removed to check that the output directory is writable.
const PROBE_FILE: &str = ".fedlora-write-probe";
/// Version of [`RUN_FILE`]'s and [`STATE_FILE`]'s layout.
const FORMAT: u32 = 2;

/// What `OUT/training_args.json` holds: the job, with absolute paths, and fingerprints of what
/// it trains from (a resumed run must train the same model, from the same adapter, on the same
/// data).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    format: u32,
    job: LocalTraining,
    model_sha256: String,
    /// Of the `--init-adapter` files (empty for fresh factors).
    init_adapter_sha256: String,
    /// Filled in once the data is read, before the file is written.
    data: Option<TrainedOn>,
    /// Where the run started (filled in with `data`; absent in files of earlier releases). A
    /// record: resuming compares the machines of the checkpoint it continues from.
    #[serde(default)]
    machine: Option<Machine>,
}

/// What a run trains on: its training windows and the steps they make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainedOn {
    steps: usize,
    train_windows: usize,
    train_windows_sha256: String,
}

/// What a checkpoint's `training_state.json` holds: its step, and what the run trains on.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    format: u32,
    step: usize,
    #[serde(flatten)]
    data: TrainedOn,
    /// The machines the steps up to this one ran on (one, unless the run was resumed
    /// elsewhere; absent in files of earlier releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    machines: Vec<Machine>,
}

/// Runs `job`: loads the model (with `job.base`'s precision) and data (every tenth document held
/// out, as a site's daemon does), evaluates, trains, and writes the adapter to `job.out`.
/// When `stop` is set (Ctrl-C), the run ends after the current step and writes what it has
/// trained as a checkpoint, then returns [`ClientError::Interrupted`] naming it (set before
/// the first step, the run ends with nothing trained, and nothing written when set before its
/// data was read). [`resume_locally`] continues a run that stopped, by `stop` or a crash, from
/// its last checkpoint. The output directory is locked for the call.
pub fn train_locally(
    job: &LocalTraining,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(LocalEvent<'_>),
) -> Result<LocalReport> {
    check(job)?;
    let _lock = prepare_output(&job.out)?;
    let absolute = |path: &Path| std::fs::canonicalize(path).map_err(ClientError::io(path));
    let record = RunRecord {
        format: FORMAT,
        job: LocalTraining {
            model: absolute(&job.model)?,
            data: absolute(&job.data)?,
            start: match &job.start {
                Start::Adapter(dir) => Start::Adapter(absolute(dir)?),
                fresh => fresh.clone(),
            },
            out: absolute(&job.out)?,
            ..job.clone()
        },
        model_sha256: fingerprint(&job.model)?,
        init_adapter_sha256: String::new(),
        data: None,
        machine: None,
    };
    run(&record, &job.out, Resume::No, stop, observe)
}

/// Continues the run whose output directory is `out` from its last complete checkpoint (or
/// from the start, where it wrote none), with the settings it was started with: the steps it
/// runs are those the uninterrupted run would have run, to the last bit, so its adapter is the
/// uninterrupted run's on the same machine and build. Refuses a finished run, a model or
/// training data that changed, an `--init-adapter` that changed (resuming from the start), and
/// a directory another process holds.
pub fn resume_locally(
    out: &Path,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(LocalEvent<'_>),
) -> Result<LocalReport> {
    let run_file = out.join(RUN_FILE);
    let record: RunRecord = match std::fs::read(&run_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| {
            ClientError::InvalidArgument(format!("{} cannot be read: {error}", run_file.display()))
        })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::InvalidArgument(format!(
                "{} holds no run of `fedlora train` to resume (no {RUN_FILE}; a run writes it \
                 once its model and data are loaded)",
                out.display()
            )));
        }
        Err(error) => return Err(ClientError::io(&run_file)(error)),
    };
    if record.format != FORMAT {
        return Err(ClientError::Unsupported(format!(
            "{} is of format {}, this fedlora reads {FORMAT}",
            run_file.display(),
            record.format
        )));
    }
    let _lock = lock_output(out)?;
    // The final adapter's config is written after its weights: with it, the run is done.
    if out.join("adapter_config.json").exists() {
        return Err(ClientError::InvalidArgument(format!(
            "the run in {} has finished: its adapter is there",
            out.display()
        )));
    }
    check(&record.job)?;
    probe_writable(out)?;
    let checkpoint = last_checkpoint(out)?;
    if fingerprint(&record.job.model)? != record.model_sha256 {
        return Err(ClientError::InvalidArgument(format!(
            "the base model {} is not the one the run in {} started with (its files changed)",
            record.job.model.display(),
            out.display()
        )));
    }
    let resume = match checkpoint {
        Some(checkpoint) => Resume::From(checkpoint),
        None => Resume::FromStart,
    };
    run(&record, out, resume, stop, observe)
}

/// How the run in `out` holds its base model, as its `training_args.json` says (`None` where
/// that cannot be read: [`resume_locally`] then says why).
pub fn recorded_precision(out: &Path) -> Option<BasePrecision> {
    let bytes = std::fs::read(out.join(RUN_FILE)).ok()?;
    serde_json::from_slice::<RunRecord>(&bytes)
        .ok()
        .map(|record| record.job.base)
}

/// Where [`run`] starts.
enum Resume {
    /// A new run.
    No,
    /// A run resumed that wrote no checkpoint.
    FromStart,
    From(Checkpoint),
}

/// A checkpoint to resume from: its directory and state.
struct Checkpoint {
    dir: PathBuf,
    state: CheckpointState,
}

/// The complete checkpoint of the highest step in `out` (one whose state file was written; a
/// checkpoint without one was being written when the run died).
fn last_checkpoint(out: &Path) -> Result<Option<Checkpoint>> {
    let mut candidates = Vec::new();
    for entry in std::fs::read_dir(out).map_err(ClientError::io(out))? {
        let dir = entry.map_err(ClientError::io(out))?.path();
        let step = dir
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix("checkpoint-"))
            .and_then(|step| step.parse::<usize>().ok());
        if let Some(step) = step {
            candidates.push((step, dir));
        }
    }
    candidates.sort_unstable_by_key(|(step, _)| std::cmp::Reverse(*step));
    for (step, dir) in candidates {
        let state_file = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&state_file) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(ClientError::io(&state_file)(error)),
        };
        let state: CheckpointState = serde_json::from_slice(&bytes).map_err(|error| {
            ClientError::InvalidArgument(format!(
                "{} cannot be read: {error}",
                state_file.display()
            ))
        })?;
        if state.format != FORMAT || state.step != step {
            return Err(ClientError::InvalidArgument(format!(
                "{} is not the state of step {step} in format {FORMAT}",
                state_file.display()
            )));
        }
        return Ok(Some(Checkpoint { dir, state }));
    }
    Ok(None)
}

/// The run of `record` into `out`, from `resume` or from the start.
fn run(
    record: &RunRecord,
    out: &Path,
    resume: Resume,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(LocalEvent<'_>),
) -> Result<LocalReport> {
    let job = &record.job;
    let (resumed, resume) = match resume {
        Resume::No => (false, None),
        Resume::FromStart => (true, None),
        Resume::From(checkpoint) => (true, Some(checkpoint)),
    };
    // Before the model: an adapter or optimizer state that cannot be read fails at once.
    let mut init_adapter_sha256 = String::new();
    let (lora, adapter, optimizer) = match (&resume, &job.start) {
        (Some(checkpoint), _) => {
            let (lora, adapter) = read_peft_adapter(&checkpoint.dir)?;
            let file = checkpoint.dir.join(OPTIMIZER_FILE);
            let optimizer = std::fs::read(&file).map_err(ClientError::io(&file))?;
            let steps = saved_steps(&optimizer).map_err(|error| {
                ClientError::InvalidArgument(format!("{}: {error}", file.display()))
            })?;
            if steps != checkpoint.state.step {
                return Err(ClientError::InvalidArgument(format!(
                    "{} is the optimizer's state after step {steps}, not {}",
                    file.display(),
                    checkpoint.state.step
                )));
            }
            (
                lora,
                Some((adapter, checkpoint.dir.clone())),
                Some(optimizer),
            )
        }
        (None, Start::Fresh(lora)) => (lora.clone(), None, None),
        (None, Start::Adapter(dir)) => {
            let (lora, adapter, sha256) = read_peft_adapter_fingerprinted(dir)?;
            if resumed && record.init_adapter_sha256 != sha256 {
                return Err(ClientError::InvalidArgument(format!(
                    "the adapter {} the run in {} started from changed since",
                    dir.display(),
                    out.display()
                )));
            }
            init_adapter_sha256 = sha256;
            (lora, Some((adapter, dir.clone())), None)
        }
    };
    let device = crate::model::default_device();
    let here = Machine::current(&device);
    // The machines of the steps this run continues from: a checkpoint's (none where it was
    // written by a release that did not record them). A run resumed from the start reuses
    // nothing computed before.
    let mut machines = resume
        .as_ref()
        .map(|checkpoint| checkpoint.state.machines.clone())
        .unwrap_or_default();
    let mut differences: Vec<String> = Vec::new();
    for earlier in machines.iter().filter(|machine| **machine != here) {
        for difference in here.differences(earlier) {
            if !differences.contains(&difference) {
                differences.push(difference);
            }
        }
    }
    if !differences.is_empty() {
        observe(LocalEvent::ResumedElsewhere {
            differences: &differences,
        });
    }
    if !machines.contains(&here) {
        machines.push(here.clone());
    }
    let mut base = BaseModel::load_as(&job.model, &device, job.base)?;
    let limit = base.model.max_sequence_len();
    if job.config.seq_len > limit {
        return Err(ClientError::InvalidArgument(format!(
            "--seq-len {} is longer than the model runs ({limit} tokens: its \
             max_position_embeddings, or sliding window)",
            job.config.seq_len
        )));
    }
    let template = base.prompt_template();
    let data = SiteData::load(&job.data, &base.tokenizer, &template, &job.text_column)?;
    data.check_split(&job.data)?;
    data.check_vocab(&job.data, base.model.config().vocab_size)?;
    match adapter {
        None => base.model.attach_lora(&lora, job.config.seed)?,
        Some((adapter, dir)) => base.model.set_adapter(&lora, &adapter).map_err(|error| {
            ClientError::InvalidArgument(format!(
                "the adapter in {} does not fit the model: {error}",
                dir.display()
            ))
        })?,
    }
    let stopped_before = || {
        stop.load(Ordering::Relaxed).then(|| {
            ClientError::Interrupted(match &resume {
                Some(checkpoint) => format!(
                    "stopped before training; the run is still at {}",
                    checkpoint.dir.display()
                ),
                None if resumable(out) => "stopped before training; nothing trained yet".into(),
                None => "stopped before training; nothing was written".into(),
            })
        })
    };
    if let Some(stopped) = stopped_before() {
        return Err(stopped);
    }
    let (eos, seq_len) = (base.eos_token_id, job.config.seq_len);
    let windows = make_windows(&data.train, eos, seq_len);
    if windows.is_empty() {
        return Err(ClientError::NotEnoughData(format!(
            "no training window of {} tokens in {}: the data is too short, or every \
             instruction example's prompt fills the sequence length",
            seq_len + 1,
            job.data.display()
        )));
    }
    let heldout = make_windows(&data.heldout, eos, seq_len);
    let steps = match job.length {
        Length::Steps(steps) => steps,
        Length::Epochs(epochs) => steps_for_epochs(windows.len(), &job.config, epochs),
    };
    let config = TrainConfig {
        local_steps: steps,
        ..job.config.clone()
    };
    check_warmup(&config, steps)?;
    let data_now = TrainedOn {
        steps,
        train_windows: windows.len(),
        train_windows_sha256: windows_fingerprint(&windows),
    };
    let changed = |since: &Path| {
        ClientError::InvalidArgument(format!(
            "the training data {} is not what the run in {} trained on (it changed since {})",
            job.data.display(),
            out.display(),
            since.display()
        ))
    };
    let first_step = match &resume {
        Some(checkpoint) if checkpoint.state.data != data_now => {
            return Err(changed(&checkpoint.dir));
        }
        Some(checkpoint) => checkpoint.state.step,
        None if resumed && record.data.as_ref() != Some(&data_now) => {
            return Err(changed(&out.join(RUN_FILE)));
        }
        None if resumed => 0,
        None => {
            let record = RunRecord {
                init_adapter_sha256,
                data: Some(data_now.clone()),
                machine: Some(here.clone()),
                ..record.clone()
            };
            let json = serde_json::to_string_pretty(&record)
                .map_err(|error| ClientError::Protocol(error.to_string()))?;
            write_whole(&out.join(RUN_FILE), (json + "\n").as_bytes())?;
            0
        }
    };
    observe(LocalEvent::Ready {
        train_windows: windows.len(),
        heldout_windows: heldout.len(),
        skipped_examples: data.train.len() - trained_examples(&data.train, eos, seq_len),
        cut_examples: cut_examples(&data.train, eos, seq_len),
        steps,
        first_step,
        seq_len,
        template: template.name(),
    });
    let model = &base.model;
    let eval =
        |model: &Llama| evaluate_heldout(model, &heldout, config.batch_size, job.max_eval_windows);
    let before = eval(model)?;
    observe(LocalEvent::Evaluated {
        step: first_step,
        eval: before,
    });
    if let Some(stopped) = stopped_before() {
        return Err(stopped);
    }
    let model_name = job.model.display().to_string();
    let save = |dir: &Path| save_adapter(model, &lora, &model_name, dir);
    let save_checkpoint = |dir: &Path, step: usize, optimizer: &AdamW| -> Result<()> {
        save(dir)?;
        write_whole(&dir.join(OPTIMIZER_FILE), &optimizer.state_bytes()?)?;
        let state = CheckpointState {
            format: FORMAT,
            step,
            data: data_now.clone(),
            machines: machines.clone(),
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        // Last: it marks the checkpoint complete (and the directory's own entry is synced).
        write_whole(&dir.join(STATE_FILE), (json + "\n").as_bytes())?;
        sync_dir(out);
        Ok(())
    };
    let tokens_per_step = (config.batch_size * config.seq_len * config.grad_accumulation) as f64;
    let started = Instant::now();
    // Time spent evaluating and saving, left out of the training speed.
    let mut aside = Duration::ZERO;
    let optimizer = optimizer.as_deref();
    let mut train = train_resumable(
        model,
        &windows,
        &config,
        optimizer,
        &mut |step, loss, optimizer| {
            let seconds = (started.elapsed() - aside).as_secs_f64().max(1e-9);
            observe(LocalEvent::Step {
                step,
                loss,
                tokens_per_second: ((step - first_step) as f64 * tokens_per_step / seconds) as f32,
            });
            if step == steps {
                // The final adapter is written, then evaluated, after the loop.
                return Ok(());
            }
            let paused = Instant::now();
            let checkpoint = out.join(format!("checkpoint-{step}"));
            let stopping = stop.load(Ordering::Relaxed);
            // Saved before this step's evaluation, which cannot lose it then.
            if stopping || (job.save_every > 0 && step.is_multiple_of(job.save_every)) {
                save_checkpoint(&checkpoint, step, optimizer)?;
                observe(LocalEvent::Saved {
                    step,
                    dir: &checkpoint,
                });
            }
            if stopping {
                return Err(ClientError::Interrupted(format!(
                    "stopped after step {step} of {steps}; the adapter trained so far is in {}, \
                 with the optimizer's state to resume from",
                    checkpoint.display()
                )));
            }
            if job.eval_every > 0 && step.is_multiple_of(job.eval_every) {
                let eval = eval(model)?;
                observe(LocalEvent::Evaluated { step, eval });
            }
            aside += paused.elapsed();
            Ok(())
        },
    )?;
    train.seconds = (Duration::from_secs_f32(train.seconds).saturating_sub(aside)).as_secs_f32();
    save(out)?;
    observe(LocalEvent::Saved {
        step: steps,
        dir: out,
    });
    let after = eval(model)?;
    observe(LocalEvent::Evaluated {
        step: steps,
        eval: after,
    });
    Ok(LocalReport {
        first_step,
        train,
        before,
        after,
    })
}

/// Whether `out` holds a run `resume_locally` can continue (its settings were written).
pub fn resumable(out: &Path) -> bool {
    out.join(RUN_FILE).exists()
}

/// sha256 over the training windows (tokens, counted targets, document starts), in order: the
/// same data, tokenizer and sequence length give the same windows.
fn windows_fingerprint(windows: &[Window]) -> String {
    let mut hasher = Sha256::new();
    for window in windows {
        let numbers = [
            window.tokens.len(),
            window.targets.start,
            window.targets.end,
            window.starts.len(),
        ];
        for number in numbers.into_iter().chain(window.starts.iter().copied()) {
            hasher.update((number as u64).to_le_bytes());
        }
        for token in &window.tokens {
            hasher.update(token.to_le_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// Refuses settings no run can train with, before anything is loaded.
fn check(job: &LocalTraining) -> Result<()> {
    let config = &job.config;
    let invalid = |message: &str| Err(ClientError::InvalidArgument(message.into()));
    if config.batch_size == 0 || config.grad_accumulation == 0 || config.seq_len < 2 {
        return invalid(
            "batch size and gradient accumulation must be at least 1, and the sequence length \
             at least 2",
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
    if job.max_eval_windows == 0 {
        return invalid("evaluation needs at least one held-out window (max_eval_windows is 0)");
    }
    match job.length {
        Length::Steps(0) => invalid("a run of 0 steps"),
        Length::Steps(steps) => check_warmup(config, steps),
        Length::Epochs(epochs) if !(epochs.is_finite() && epochs > 0.0) => {
            invalid("the number of epochs must be a positive number")
        }
        _ => Ok(()),
    }
}

/// Refuses a warm-up longer than the run (before loading for `--steps`, once the data is read
/// for `--epochs`).
fn check_warmup(config: &TrainConfig, steps: usize) -> Result<()> {
    if config.warmup_steps > steps {
        return Err(ClientError::InvalidArgument(format!(
            "{} warm-up steps in a run of {steps}",
            config.warmup_steps
        )));
    }
    Ok(())
}

/// Makes the output directory, before anything is loaded: it must be new or empty (an earlier
/// run's adapter or checkpoints are never overwritten), and writable (else a run would learn it
/// only when saving, its training lost).
fn prepare_output(out: &Path) -> Result<Option<std::fs::File>> {
    if out.exists() && !out.is_dir() {
        return Err(ClientError::InvalidArgument(format!(
            "{} is not a directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(ClientError::io_write(out))?;
    let lock = lock_output(out)?;
    for entry in std::fs::read_dir(out).map_err(ClientError::io(out))? {
        let name = entry.map_err(ClientError::io(out))?.file_name();
        let name = name.to_string_lossy();
        // What a process killed while writing leaves: no run's work.
        if name == PROBE_FILE || name.ends_with(".partial") {
            continue;
        }
        let hint = if resumable(out) {
            ", or continue its stopped run with --resume"
        } else {
            ""
        };
        return Err(ClientError::InvalidArgument(format!(
            "{} is not empty (an earlier run's adapter or checkpoints?): choose a new output \
             directory{hint}",
            out.display()
        )));
    }
    probe_writable(out)?;
    Ok(lock)
}

/// Locks the output directory (an advisory `flock`, released when the returned file is dropped
/// or the process ends): two runs writing checkpoints into one directory would break both.
/// `None`, with a warning, where the file system refuses locks, and off Unix.
fn lock_output(out: &Path) -> Result<Option<std::fs::File>> {
    if cfg!(not(unix)) {
        return Ok(None);
    }
    let dir = std::fs::File::open(out).map_err(ClientError::io(out))?;
    match dir.try_lock() {
        Ok(()) => Ok(Some(dir)),
        Err(std::fs::TryLockError::WouldBlock) => Err(ClientError::InvalidArgument(format!(
            "another `fedlora train` is writing to {}",
            out.display()
        ))),
        Err(std::fs::TryLockError::Error(error)) => {
            tracing::warn!(out = %out.display(), %error, "cannot lock the output directory");
            Ok(None)
        }
    }
}

/// Checks that files can be written in `out` (else a run would learn it only when saving, its
/// training lost).
fn probe_writable(out: &Path) -> Result<()> {
    let probe = out.join(PROBE_FILE);
    std::fs::write(&probe, b"").map_err(ClientError::io_write(&probe))?;
    std::fs::remove_file(&probe).map_err(ClientError::io_write(&probe))?;
    Ok(())
}

/// Writes the model's LoRA factors as a PEFT adapter directory.
fn save_adapter(model: &Llama, lora: &LoraSpec, base_model: &str, dir: &Path) -> Result<()> {
    write_peft_adapter(
        dir,
        lora,
        base_model,
        &peft_weights(&model.export_adapter()?)?,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::tiny::{TinyModelSpec, write_tiny_model};
    use crate::train::TrainedFactors;

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

    fn never(_: LocalEvent<'_>) {}

    /// The held-out loss falls; evaluations, checkpoints and the final adapter come when asked,
    /// and the written adapter is the trained one: continued from, it gives the reported
    /// held-out loss again, and its spec (DoRA, a per-module rank, dropout) is kept.
    #[test]
    fn a_local_run_trains_evaluates_and_writes_its_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LoraSpec {
            use_dora: true,
            dropout: 0.05,
            rank_pattern: vec![("v_proj".into(), 2)],
            ..LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])
        };
        let job = LocalTraining {
            start: Start::Fresh(spec.clone()),
            ..job(dir.path())
        };
        let mut evaluated = Vec::new();
        let mut saved = Vec::new();
        // Evaluations and saves in the order they came: a step's save comes first.
        let mut log = Vec::new();
        let mut steps = 0;
        let report = train_locally(&job, &AtomicBool::new(false), &mut |event| match event {
            LocalEvent::Ready { steps, .. } => assert_eq!(steps, 20),
            LocalEvent::Step { step, loss, .. } => {
                assert!(loss.is_finite());
                steps = step;
            }
            LocalEvent::Evaluated { step, eval } => {
                evaluated.push((step, eval.unwrap().loss));
                log.push(format!("evaluated {step}"));
            }
            LocalEvent::Saved { step, dir } => {
                saved.push((step, dir.to_path_buf()));
                log.push(format!("saved {step}"));
            }
            LocalEvent::ResumedElsewhere { differences } => panic!("{differences:?}"),
        })
        .unwrap();
        assert_eq!(
            log,
            [
                "evaluated 0",
                "saved 10",
                "evaluated 10",
                "saved 20",
                "evaluated 20"
            ]
        );
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
        let (continued_spec, _) = read_peft_adapter(&continued.out).unwrap();
        assert_eq!(continued_spec, spec);

        // Never into a directory an earlier run wrote to: its adapter, or only its checkpoints.
        let error = train_locally(&job, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("not empty"), "{error}");
        let earlier = dir.path().join("earlier");
        std::fs::create_dir_all(earlier.join("checkpoint-10")).unwrap();
        let into_earlier = LocalTraining {
            out: earlier,
            ..job.clone()
        };
        let error = train_locally(&into_earlier, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("not empty"), "{error}");
    }

    /// Stopped (Ctrl-C) during training, a run saves what it trained as a checkpoint, says
    /// where, and writes no final adapter; stopped before, it writes nothing.
    #[test]
    fn a_stopped_run_keeps_what_it_trained() {
        let dir = tempfile::tempdir().unwrap();
        let job = LocalTraining {
            save_every: 0,
            eval_every: 0,
            ..job(dir.path())
        };
        let stop = AtomicBool::new(false);
        let error = train_locally(&job, &stop, &mut |event| {
            if let LocalEvent::Step { step: 2, .. } = event {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
        let checkpoint = job.out.join("checkpoint-2");
        assert!(
            matches!(&error, ClientError::Interrupted(message)
                if message.contains(&checkpoint.display().to_string())),
            "{error}"
        );
        assert!(!job.out.join("adapter_model.safetensors").exists());
        // The checkpoint holds trained factors: B starts at zero (PEFT's initialisation).
        let (_, adapter) = read_peft_adapter(&checkpoint).unwrap();
        let trained_b = adapter
            .tensors
            .iter()
            .filter(|(name, _)| name.contains("lora_B"))
            .any(|(_, tensor)| tensor.data.iter().any(|&value| value != 0.0));
        assert!(trained_b);

        let early = LocalTraining {
            out: dir.path().join("early"),
            ..job.clone()
        };
        let error = train_locally(&early, &AtomicBool::new(true), &mut never).unwrap_err();
        assert!(error.to_string().contains("before training"), "{error}");
        assert_eq!(std::fs::read_dir(&early.out).unwrap().count(), 0);
    }

    /// A run with every source of randomness and state: DoRA, dropout, accumulation, warm-up,
    /// cosine decay and clipping, checkpoints every 3 steps, 8 steps.
    fn stateful(dir: &Path) -> LocalTraining {
        let base = job(dir);
        LocalTraining {
            start: Start::Fresh(LoraSpec {
                use_dora: true,
                dropout: 0.1,
                ..LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])
            }),
            length: Length::Steps(8),
            config: TrainConfig {
                warmup_steps: 2,
                cosine_decay: true,
                max_grad_norm: Some(0.5),
                grad_accumulation: 2,
                ..TrainConfig::simple(0, 5e-3, 4, 32, 11)
            },
            eval_every: 0,
            save_every: 3,
            ..base
        }
    }

    /// `job` into `out`, a directory beside its model.
    fn into(job: &LocalTraining, out: &str) -> LocalTraining {
        LocalTraining {
            out: job.model.with_file_name(out),
            ..job.clone()
        }
    }

    /// Runs `job` until it is stopped after step `at`.
    fn stop_after(job: &LocalTraining, at: usize) {
        let stop = AtomicBool::new(false);
        let error = train_locally(job, &stop, &mut |event| {
            if let LocalEvent::Step { step, .. } = event
                && step == at
            {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
        assert!(matches!(error, ClientError::Interrupted(_)), "{error}");
    }

    /// Resumes the run in `out` (on the machine it ran on); returns the step it started after
    /// and the adapter's bytes.
    fn resume(out: &Path) -> (usize, Vec<u8>) {
        let (mut ready, mut steps) = (None, 0);
        let report = resume_locally(out, &AtomicBool::new(false), &mut |event| match event {
            LocalEvent::Ready {
                first_step,
                steps: planned,
                ..
            } => (ready, steps) = (Some(first_step), planned),
            LocalEvent::ResumedElsewhere { differences } => panic!("{differences:?}"),
            _ => {}
        })
        .unwrap();
        assert_eq!(ready, Some(report.first_step));
        assert_eq!(report.train.steps, steps - report.first_step);
        let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        (report.first_step, adapter)
    }

    /// Stopped (Ctrl-C) or killed, a run resumed from its last complete checkpoint, or from
    /// the start where it has none, writes the uninterrupted run's adapter to the last bit:
    /// factors, optimizer moments, batches drawn, dropout masks and schedule all continue.
    #[test]
    fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let job = stateful(dir.path());
        let straight = into(&job, "straight");
        train_locally(&straight, &AtomicBool::new(false), &mut never).unwrap();
        let expected = std::fs::read(straight.out.join("adapter_model.safetensors")).unwrap();

        // Stopped after step 5: its stop checkpoint, checkpoint-5.
        let stopped = into(&job, "stopped");
        stop_after(&stopped, 5);
        assert_eq!(resume(&stopped.out), (5, expected.clone()));
        // Checkpoints written after the resume are the uninterrupted run's too.
        for file in ["adapter_model.safetensors", OPTIMIZER_FILE, STATE_FILE] {
            let read = |job: &LocalTraining| std::fs::read(job.out.join("checkpoint-6").join(file));
            assert_eq!(read(&stopped).unwrap(), read(&straight).unwrap(), "{file}");
        }
        let error = resume_locally(&stopped.out, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("has finished"), "{error}");

        // Killed while writing checkpoint-5 (no state file yet): from checkpoint-3.
        let killed = into(&job, "killed");
        stop_after(&killed, 5);
        std::fs::remove_file(killed.out.join("checkpoint-5").join(STATE_FILE)).unwrap();
        assert_eq!(resume(&killed.out), (3, expected.clone()));

        // Killed between the final adapter's two files: from checkpoint-6, the last.
        std::fs::remove_file(killed.out.join("adapter_config.json")).unwrap();
        assert_eq!(resume(&killed.out), (6, expected.clone()));

        // Killed before its first checkpoint: from the start.
        let early = into(&job, "early");
        stop_after(&early, 1);
        std::fs::remove_dir_all(early.out.join("checkpoint-1")).unwrap();
        assert_eq!(resume(&early.out), (0, expected.clone()));

        // Stopped after the first evaluation, before any step: nothing trained, resumable.
        let unstarted = into(&job, "unstarted");
        let stop = AtomicBool::new(false);
        let error = train_locally(&unstarted, &stop, &mut |event| {
            if let LocalEvent::Evaluated { .. } = event {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
        assert!(error.to_string().contains("nothing trained yet"), "{error}");
        assert!(resumable(&unstarted.out));
        assert_eq!(resume(&unstarted.out), (0, expected.clone()));

        // The check above can fail: continuing from the checkpoint with fresh moments (what
        // --init-adapter does) is another run.
        let restarted = LocalTraining {
            start: Start::Adapter(stopped.out.join("checkpoint-5")),
            length: Length::Steps(3),
            ..into(&job, "restarted")
        };
        train_locally(&restarted, &AtomicBool::new(false), &mut never).unwrap();
        let other = std::fs::read(restarted.out.join("adapter_model.safetensors")).unwrap();
        assert_ne!(other, expected);
    }

    /// Steps run on another machine are named when the run resumes, and it continues; the
    /// checkpoints it writes then list both machines.
    #[test]
    fn a_run_resumed_on_another_machine_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let job = into(&stateful(dir.path()), "moved");
        stop_after(&job, 4);
        let state_file = job.out.join("checkpoint-4").join(STATE_FILE);
        let mut state: CheckpointState =
            serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
        let here = Machine::current(&crate::model::default_device());
        assert_eq!(state.machines, std::slice::from_ref(&here));
        let elsewhere = Machine {
            cpu: "Another CPU".into(),
            ..here.clone()
        };
        state.machines = vec![elsewhere.clone()];
        std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();

        let mut named = Vec::new();
        let report = resume_locally(&job.out, &AtomicBool::new(false), &mut |event| {
            if let LocalEvent::ResumedElsewhere { differences } = event {
                named.extend_from_slice(differences);
            }
        })
        .unwrap();
        assert_eq!(report.first_step, 4);
        assert_eq!(named, [format!("CPU {}, not Another CPU", here.cpu)]);
        let later = job.out.join("checkpoint-6").join(STATE_FILE);
        let later: CheckpointState =
            serde_json::from_slice(&std::fs::read(later).unwrap()).unwrap();
        assert_eq!(later.machines, [elsewhere, here]);
    }

    /// Training only A, for a length in epochs, with evaluations between checkpoints: the
    /// optimizer's state holds only the trained factors, and the resumed run is still the
    /// uninterrupted one.
    #[test]
    fn a_resumed_run_of_one_factor_and_epochs_is_the_uninterrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let job = stateful(dir.path());
        let job = LocalTraining {
            length: Length::Epochs(0.2),
            eval_every: 2,
            config: TrainConfig {
                trained: TrainedFactors::A,
                ..job.config.clone()
            },
            ..job
        };
        let straight = into(&job, "straight");
        let report = train_locally(&straight, &AtomicBool::new(false), &mut never).unwrap();
        assert!(report.train.steps >= 5, "{}", report.train.steps);
        let expected = std::fs::read(straight.out.join("adapter_model.safetensors")).unwrap();
        let stopped = into(&job, "stopped");
        stop_after(&stopped, 4);
        let state = std::fs::read(stopped.out.join("checkpoint-4").join(OPTIMIZER_FILE)).unwrap();
        let moments =
            candle_core::safetensors::load_buffer(&state, &candle_core::Device::Cpu).unwrap();
        // A and DoRA's magnitudes (which always train), no B.
        assert!(moments.keys().any(|name| name.contains("lora_A")));
        assert!(
            !moments.keys().any(|name| name.contains("lora_B")),
            "{moments:?}"
        );
        assert_eq!(resume(&stopped.out), (4, expected));
    }

    /// One output directory, one run: a second process is refused while the first holds it;
    /// what a killed process leaves half-written does not count as an earlier run.
    #[test]
    fn an_output_directory_takes_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let job = LocalTraining {
            length: Length::Steps(2),
            save_every: 0,
            eval_every: 0,
            ..job(dir.path())
        };
        std::fs::create_dir_all(&job.out).unwrap();
        let held = std::fs::File::open(&job.out).unwrap();
        held.try_lock().unwrap();
        let error = train_locally(&job, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(
            error.to_string().contains("another `fedlora train`"),
            "{error}"
        );
        drop(held);
        std::fs::write(job.out.join("training_args.json.partial"), b"{").unwrap();
        train_locally(&job, &AtomicBool::new(false), &mut never).unwrap();
    }

    /// A run is resumed only where there is one to resume, with the model and data it
    /// started with.
    #[test]
    fn resuming_refuses_what_is_not_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let error = resume_locally(dir.path(), &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(
            error.to_string().contains("no run of `fedlora train`"),
            "{error}"
        );

        // Changed data: after a checkpoint, or before the first (from the start).
        let job = stateful(dir.path());
        let changed_data = into(&job, "data");
        stop_after(&changed_data, 4);
        let from_start = into(&job, "data-from-start");
        stop_after(&from_start, 1);
        std::fs::remove_dir_all(from_start.out.join("checkpoint-1")).unwrap();
        let data = std::fs::read_to_string(&job.data).unwrap();
        let mut text = data.clone();
        text.push_str("\n{\"text\": \"one more document, long enough to make another window.\"}");
        std::fs::write(&changed_data.data, text).unwrap();
        for (run, since) in [
            (&changed_data, "checkpoint-4"),
            (&from_start, "training_args.json"),
        ] {
            let error = resume_locally(&run.out, &AtomicBool::new(false), &mut never).unwrap_err();
            let error = error.to_string();
            assert!(error.contains("is not what the run"), "{error}");
            assert!(error.contains(since), "{error}");
        }

        std::fs::write(&job.data, data).unwrap();
        let changed_model = into(&job, "changed-model");
        stop_after(&changed_model, 4);
        let config = changed_model.model.join("config.json");
        let mut json = std::fs::read_to_string(&config).unwrap();
        json.push('\n');
        std::fs::write(&config, json).unwrap();
        let error =
            resume_locally(&changed_model.out, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("not the one the run"), "{error}");

        // Resumed from the start, a run that began from an adapter needs that adapter as it was.
        let first = into(&job, "first");
        stop_after(&first, 2);
        let from_adapter = LocalTraining {
            start: Start::Adapter(first.out.join("checkpoint-2")),
            ..into(&job, "from-adapter")
        };
        stop_after(&from_adapter, 1);
        std::fs::remove_dir_all(from_adapter.out.join("checkpoint-1")).unwrap();
        let config = first.out.join("checkpoint-2").join("adapter_config.json");
        let mut json = std::fs::read_to_string(&config).unwrap();
        json.push('\n');
        std::fs::write(&config, json).unwrap();
        let error =
            resume_locally(&from_adapter.out, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("changed since"), "{error}");
    }

    /// `--epochs` runs as many steps as draw that many epochs of the training windows.
    #[test]
    fn an_epoch_draws_as_many_windows_as_the_data_has() {
        let config = TrainConfig {
            grad_accumulation: 2,
            ..TrainConfig::simple(0, 1e-3, 4, 32, 0)
        };
        assert_eq!(steps_for_epochs(80, &config, 1.0), 10);
        assert_eq!(steps_for_epochs(81, &config, 1.0), 11);
        assert_eq!(steps_for_epochs(80, &config, 0.5), 5);
        assert_eq!(steps_for_epochs(3, &config, 0.1), 1);
        let dir = tempfile::tempdir().unwrap();
        let job = LocalTraining {
            length: Length::Epochs(0.5),
            eval_every: 0,
            save_every: 0,
            ..job(dir.path())
        };
        let (mut windows, mut steps) = (0, 0);
        let report = train_locally(&job, &AtomicBool::new(false), &mut |event| {
            if let LocalEvent::Ready {
                train_windows,
                steps: planned,
                skipped_examples,
                ..
            } = event
            {
                (windows, steps) = (train_windows, planned);
                assert_eq!(skipped_examples, 0);
            }
        })
        .unwrap();
        assert!(windows > 8, "{windows}");
        assert_eq!(steps, steps_for_epochs(windows, &job.config, 0.5));
        assert_eq!(report.train.steps, steps);
    }

    /// Settings no run can train with are refused before the model is loaded (the job names a
    /// model that does not exist).
    #[test]
    fn bad_settings_are_refused_before_loading() {
        let dir = tempfile::tempdir().unwrap();
        let missing = LocalTraining {
            model: dir.path().join("no-such-model"),
            ..job(dir.path())
        };
        type Change = &'static dyn Fn(&mut LocalTraining);
        let changes: [(Change, &str); 7] = [
            (&|job| job.config.seq_len = 1, "sequence length"),
            (&|job| job.config.learning_rate = f64::NAN, "learning rate"),
            (&|job| job.config.max_grad_norm = Some(0.0), "gradient norm"),
            (&|job| job.length = Length::Epochs(0.0), "epochs"),
            (&|job| job.length = Length::Steps(0), "0 steps"),
            (&|job| job.config.warmup_steps = 21, "warm-up"),
            (&|job| job.max_eval_windows = 0, "max_eval_windows"),
        ];
        for (change, expected) in changes {
            let mut job = missing.clone();
            change(&mut job);
            let error = train_locally(&job, &AtomicBool::new(false), &mut never).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        // An output path that is a file is refused before loading too.
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let into_file = LocalTraining {
            out: file,
            ..missing.clone()
        };
        let error = train_locally(&into_file, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("a-file"), "{error}");
        assert!(!error.to_string().contains("no-such-model"), "{error}");
        // With good settings, the missing model is what fails.
        let error = train_locally(&missing, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(error.to_string().contains("no-such-model"), "{error}");

        // Once the model is loaded: a sequence longer than it runs (the tiny model: 256).
        let long = job(dir.path());
        let long = LocalTraining {
            config: TrainConfig {
                seq_len: 257,
                ..long.config.clone()
            },
            ..long
        };
        let error = train_locally(&long, &AtomicBool::new(false), &mut never).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--seq-len 257 is longer than the model runs (256"),
            "{error}"
        );
    }
}
