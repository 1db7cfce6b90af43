//! The site daemon: loads the base model and the local data, joins the federation, and works
//! through tasks until the coordinator says the federation is finished.
//!
//! For each task it downloads the global adapter the round starts from, measures its held-out loss
//! (reported with `SubmitEvaluation`), trains locally (train tasks), keeps a copy of exactly what
//! it sends under `state_dir/round-N/` in PEFT format, and uploads the adapter in chunks.
//!
//! Architecture invariant: the messages built here carry only adapter tensors, counts (examples,
//! tokens, steps) and loss values. Text and token ids never leave [`run`]'s process.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedlora_proto::CHUNK_BYTES;
use fedlora_proto::adapter::{Adapter, Factor, LoraSpec, adapter_spec, sha256_hex};
use fedlora_proto::tensor_bytes::max_update_len;
use fedlora_proto::tls::ClientTls;
use fedlora_proto::v1::federation_client::FederationClient;
use fedlora_proto::v1::{self as pb, next_task_response, submit_update_request};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, instrument, warn};

use crate::compute;
use crate::error::{ClientError, Result};
pub use crate::model::BasePrecision;
use crate::model::peft::{peft_weights, write_peft_adapter};
use crate::model::{BaseModel, Llama, fingerprint};
use crate::train::data::{SiteData, cut_examples, make_windows, trained_examples};
use crate::train::{EvalReport, TrainConfig, TrainedFactors, evaluate_heldout, train};

/// How the daemon reaches the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientTransport {
    /// Plaintext HTTP/2; only when chosen explicitly (`--insecure`), to a loopback coordinator.
    Insecure,
    /// TLS 1.3 with this site's certificate from the federation's CA.
    MutualTls(ClientTls),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// `https://host:port` of the coordinator (`http://` with [`ClientTransport::Insecure`]).
    pub coordinator: String,
    pub transport: ClientTransport,
    pub client_name: String,
    pub model_dir: PathBuf,
    /// Local data: JSONL (`text`, or `instruction`/`input`/`output` per line) or CSV.
    pub data_path: PathBuf,
    /// The CSV column holding the documents.
    pub text_column: String,
    /// Where copies of every uploaded adapter are kept (`round-N/adapter_model.safetensors`).
    pub state_dir: PathBuf,
    /// Largest LoRA rank this site will train.
    pub max_rank: usize,
    /// Held-out windows evaluated per task, at most.
    pub max_eval_windows: usize,
    /// How the frozen base is held while training.
    pub base: BasePrecision,
}

/// Progress the daemon reports to whoever runs it (a progress bar, a log).
#[derive(Debug, Clone, PartialEq)]
pub enum DaemonEvent {
    Joined {
        client_id: String,
        num_examples: usize,
    },
    TaskStarted {
        round_id: u64,
        kind: &'static str,
        local_steps: u32,
    },
    /// Held-out loss of the global adapter of `adapter_round` (0 = the base model).
    Evaluated {
        round_id: u64,
        adapter_round: u64,
        loss: f32,
    },
    /// No held-out window at the task's `seq_len` (every held-out instruction example's prompt
    /// fills it): the task goes on, and the coordinator is told that no loss was measured.
    NotEvaluated {
        round_id: u64,
        seq_len: usize,
    },
    /// The held-out loss of the global adapter of `adapter_round` came out infinite or NaN: the
    /// model overflows on this site's data. The coordinator is told that no loss was measured
    /// (it refuses non-finite numbers); an evaluation task is then done, and a training task
    /// fails with [`ClientError::Diverged`] before its first step (which would fail alike). (An
    /// adapter trained here whose held-out loss is not finite is not sent: `Diverged` too, with
    /// no `NotFinite` event; the error says it.)
    NotFinite {
        round_id: u64,
        adapter_round: u64,
        loss: f32,
    },
    Step {
        round_id: u64,
        step: usize,
        loss: f32,
        /// Training throughput so far in this task.
        tokens_per_second: f32,
    },
    /// A global adapter arrived: `bytes` on the wire, `reused` the factors left out because this
    /// site already held them.
    Downloaded {
        round_id: u64,
        adapter_round: u64,
        bytes: usize,
        reused: Vec<Factor>,
    },
    Uploaded {
        round_id: u64,
        bytes: usize,
        sha256: String,
    },
    Retrying {
        error: String,
        after_ms: u64,
    },
    /// The coordinator refused this site's certificate in the TLS handshake (`alert`), while
    /// this machine's clock says it is valid: retried every 30 s, since only the holder's files or
    /// the coordinator's CA setup can mend it.
    CertificateRefused {
        alert: String,
    },
    Finished {
        reason: String,
    },
}

/// A callback for [`DaemonEvent`]s; must be cheap.
pub type Observer = Arc<dyn Fn(&DaemonEvent) + Send + Sync>;

/// What a finished daemon did.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSummary {
    pub client_id: String,
    pub rounds_trained: u32,
    /// Held-out loss of the last global adapter evaluated.
    pub last_eval_loss: Option<f32>,
    /// Bytes of global adapters downloaded.
    pub downloaded_bytes: u64,
    /// Factors a download left out because this site held them already.
    pub factors_reused: u32,
}

struct Site {
    model: Llama,
    data: Arc<SiteData>,
    eos: u32,
    fingerprint: String,
    /// The adapter the last task started from (a global adapter is public to the federation), so
    /// that a download can leave out the factors that did not change.
    held: Mutex<Option<Adapter>>,
}

impl Site {
    fn held(&self) -> Option<Adapter> {
        self.held.lock().map_or_else(
            |poisoned| poisoned.into_inner().clone(),
            |held| held.clone(),
        )
    }

    fn hold(&self, adapter: Adapter) {
        match self.held.lock() {
            Ok(mut held) => *held = Some(adapter),
            Err(poisoned) => *poisoned.into_inner() = Some(adapter),
        }
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the daemon until the federation finishes or `shutdown` resolves.
pub async fn run(
    config: DaemonConfig,
    observer: Observer,
    shutdown: impl Future<Output = ()>,
) -> Result<DaemonSummary> {
    tokio::pin!(shutdown);
    let site = {
        let config = config.clone();
        compute::run_async(move || load_site(&config)).await??
    };
    let mut summary = DaemonSummary {
        client_id: String::new(),
        rounds_trained: 0,
        last_eval_loss: None,
        downloaded_bytes: 0,
        factors_reused: 0,
    };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let attempt = session(&config, &site, &observer, &mut summary, &mut backoff);
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            () = &mut shutdown => {
                info!("daemon stopping on request");
                return Ok(summary);
            }
        };
        match outcome {
            Ok(reason) => {
                observer(&DaemonEvent::Finished { reason });
                return Ok(summary);
            }
            Err(error) => {
                let wait = if let Some(alert) = fedlora_proto::tls::refused_certificate(&error) {
                    let alert = format!("{alert:?}");
                    // Stop only when this machine's clock confirms the refusal: an alert alone
                    // may come from a misconfigured coordinator or be forged on the path.
                    if let ClientTransport::MutualTls(tls) = &config.transport
                        && let Some(detail) = tls.lapsed(std::time::SystemTime::now())
                    {
                        return Err(ClientError::CertificateRefused { alert, detail });
                    }
                    error!(
                        %alert,
                        "the coordinator refused this site's certificate; check --cert, --key and --ca-cert, or ask the federation's operator whether the coordinator trusts this federation's ca; retrying every {} s",
                        MAX_BACKOFF.as_secs()
                    );
                    observer(&DaemonEvent::CertificateRefused { alert });
                    MAX_BACKOFF
                } else if is_transient(&error) {
                    observer(&DaemonEvent::Retrying {
                        error: error.to_string(),
                        after_ms: backoff.as_millis() as u64,
                    });
                    warn!(%error, ?backoff, "coordinator call failed; retrying");
                    backoff
                } else {
                    return Err(error);
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut shutdown => return Ok(summary),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Errors worth retrying: the coordinator is away or restarting, or forgot us.
fn is_transient(error: &ClientError) -> bool {
    match error {
        ClientError::Transport(_) => true,
        ClientError::Rpc(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::DeadlineExceeded
                | Code::NotFound
        ),
        _ => false,
    }
}

fn load_site(config: &DaemonConfig) -> Result<Site> {
    let device = crate::model::default_device();
    let base = BaseModel::load_as(&config.model_dir, &device, config.base)?;
    let template = base.prompt_template();
    tracing::info!(template = template.name(), "instruction examples' layout");
    let data = SiteData::load(
        &config.data_path,
        &base.tokenizer,
        &template,
        &config.text_column,
    )?;
    data.check_split(&config.data_path)?;
    data.check_vocab(&config.data_path, base.model.config().vocab_size)?;
    Ok(Site {
        fingerprint: fingerprint(&config.model_dir)?,
        model: base.model,
        data: Arc::new(data),
        eos: base.eos_token_id,
        held: Mutex::new(None),
    })
}

async fn connect(config: &DaemonConfig) -> Result<FederationClient<Channel>> {
    let endpoint = Endpoint::from_shared(config.coordinator.clone())
        .map_err(|error| ClientError::Protocol(format!("coordinator address: {error}")))?
        .connect_timeout(Duration::from_secs(10))
        // Notice a coordinator that vanished without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        // No call may hang forever: long polls last seconds, uploads of large adapters minutes.
        .timeout(Duration::from_secs(600));
    let channel = match &config.transport {
        ClientTransport::Insecure => endpoint.connect().await?,
        ClientTransport::MutualTls(tls) => {
            tls.configure(&config.coordinator, endpoint)
                .map_err(|error| ClientError::Protocol(error.to_string()))?
                .connect()
                .await?
        }
    };
    Ok(FederationClient::new(channel))
}

/// One connected session: join, then tasks until finished. Returns the finish reason.
async fn session(
    config: &DaemonConfig,
    site: &Site,
    observer: &Observer,
    summary: &mut DaemonSummary,
    backoff: &mut Duration,
) -> Result<String> {
    let mut client = connect(config).await?;
    let config_dims = site.model.config().dims();
    let joined = client
        .join(pb::JoinRequest {
            client_name: config.client_name.clone(),
            max_rank: config.max_rank as u32,
            num_examples: site.data.num_examples() as u64,
            base_model_fingerprint: site.fingerprint.clone(),
            model_shape: Some(config_dims.into()),
            client_version: env!("CARGO_PKG_VERSION").into(),
            device: format!("{:?}", site.model.device()),
            lora_features: fedlora_proto::adapter::LORA_FEATURES
                .iter()
                .chain(&[fedlora_proto::factors::SINGLE_FACTOR])
                .map(|feature| feature.to_string())
                .collect(),
        })
        .await?
        .into_inner();
    summary.client_id = joined.client_id.clone();
    // Before taking a task, so that no round waits for a site that cannot train.
    if joined.seq_len > 0 {
        fits_context(&site.model, joined.seq_len as usize)?;
        trainable_examples(site, joined.seq_len as usize)?;
    }
    *backoff = INITIAL_BACKOFF;
    info!(client_id = %joined.client_id, federation = %joined.federation_name, "joined");
    observer(&DaemonEvent::Joined {
        client_id: joined.client_id.clone(),
        num_examples: site.data.num_examples(),
    });
    loop {
        let next = client
            .next_task(pb::NextTaskRequest {
                client_id: joined.client_id.clone(),
                wait_ms: 10_000,
            })
            .await?
            .into_inner();
        match next.kind {
            Some(next_task_response::Kind::Task(task)) => {
                match run_task(
                    config,
                    site,
                    &mut client,
                    &joined.client_id,
                    &task,
                    observer,
                    summary,
                )
                .await
                {
                    Ok(()) => {}
                    Err(ClientError::Rpc(status))
                        if matches!(
                            status.code(),
                            Code::FailedPrecondition | Code::AlreadyExists
                        ) =>
                    {
                        warn!(round_id = task.round_id, %status, "task no longer wanted; moving on");
                    }
                    Err(error) => return Err(error),
                }
            }
            Some(next_task_response::Kind::Wait(wait)) => {
                tokio::time::sleep(retry_delay(&wait)).await;
            }
            Some(next_task_response::Kind::Finished(finished)) => return Ok(finished.reason),
            None => return Err(ClientError::Protocol("empty next_task response".into())),
        }
    }
}

/// How long to wait before asking for work again: what the coordinator says, within 50 ms and
/// 60 s (a coordinator's "retry after 49 days" would stall the site silently, and 0 would spin).
fn retry_delay(wait: &pb::Wait) -> Duration {
    Duration::from_millis(u64::from(wait.retry_after_ms.clamp(50, 60_000)))
}

#[instrument(skip_all, fields(round_id = task.round_id, client_id = %client_id))]
async fn run_task(
    config: &DaemonConfig,
    site: &Site,
    client: &mut FederationClient<Channel>,
    client_id: &str,
    task: &pb::Task,
    observer: &Observer,
    summary: &mut DaemonSummary,
) -> Result<()> {
    let lora_pb = task
        .lora
        .clone()
        .ok_or_else(|| ClientError::Protocol("task without lora config".into()))?;
    let params = task
        .training
        .ok_or_else(|| ClientError::Protocol("task without training parameters".into()))?;
    let lora = LoraSpec::from(lora_pb);
    lora.validate()?;
    if lora.max_rank() > config.max_rank {
        return Err(ClientError::Protocol(format!(
            "task asks for rank {} above this site's max rank {}",
            lora.max_rank(),
            config.max_rank
        )));
    }
    let is_train = match pb::TaskKind::try_from(task.kind) {
        Ok(pb::TaskKind::Train) => true,
        Ok(pb::TaskKind::Evaluate) => false,
        _ => {
            return Err(ClientError::Protocol(format!(
                "task of unknown kind {} (upgrade the client)",
                task.kind
            )));
        }
    };
    check_training(&params, is_train)?;
    fits_context(&site.model, params.seq_len.max(2) as usize)?;
    observer(&DaemonEvent::TaskStarted {
        round_id: task.round_id,
        kind: if is_train { "train" } else { "evaluate" },
        local_steps: if is_train { params.local_steps } else { 0 },
    });
    let spec = adapter_spec(&site.model.config().dims(), &lora)?;
    let global = if task.global_adapter_round > 0 {
        let held = site.held();
        let download = download(
            client,
            client_id,
            task.global_adapter_round,
            held.as_ref(),
            max_update_len(&spec),
            DOWNLOAD_IDLE_TIMEOUT,
        )
        .await?;
        download.adapter.validate(&spec)?;
        summary.downloaded_bytes += download.bytes as u64;
        summary.factors_reused += download.reused.len() as u32;
        observer(&DaemonEvent::Downloaded {
            round_id: task.round_id,
            adapter_round: task.global_adapter_round,
            bytes: download.bytes,
            reused: download.reused,
        });
        Some(download.adapter)
    } else {
        None
    };
    // On the compute thread, not the runtime: attaching DoRA computes every projection's
    // row norms.
    let (model, start) = {
        let (mut model, lora, seed) = (site.model.clone(), lora.clone(), params.seed);
        compute::run_async(move || {
            model.attach_lora(&lora, seed)?;
            let start = match global {
                Some(adapter) => {
                    model.load_adapter(&adapter)?;
                    adapter
                }
                // The seeded start, which the coordinator computes identically.
                None => model.export_adapter()?,
            };
            Ok::<_, ClientError>((model, start))
        })
        .await??
    };
    site.hold(start);

    let seq_len = params.seq_len.max(2) as usize;
    let batch_size = params.batch_size.max(1) as usize;
    let heldout = Arc::new(make_windows(&site.data.heldout, site.eos, seq_len));
    let max_eval_windows = config.max_eval_windows;
    let eval = {
        let model = model.clone();
        let heldout = heldout.clone();
        compute::run_async(move || evaluate_heldout(&model, &heldout, batch_size, max_eval_windows))
            .await??
    };
    match &eval {
        Some(eval) if !eval.loss.is_finite() => {
            warn!(
                loss = eval.loss,
                adapter_round = task.global_adapter_round,
                "the global adapter's held-out loss is not a finite number: the model overflows \
                 on this site's data; reported to the coordinator as not measured"
            );
            observer(&DaemonEvent::NotFinite {
                round_id: task.round_id,
                adapter_round: task.global_adapter_round,
                loss: eval.loss,
            });
        }
        Some(eval) => {
            summary.last_eval_loss = Some(eval.loss);
            observer(&DaemonEvent::Evaluated {
                round_id: task.round_id,
                adapter_round: task.global_adapter_round,
                loss: eval.loss,
            });
        }
        None => {
            // Counts only: the examples themselves stay out of the log.
            warn!(
                seq_len,
                heldout_examples = site.data.heldout.len(),
                "no held-out window at the task's sequence length (every held-out instruction \
                 example's prompt fills it): no held-out loss this round, the task goes on"
            );
            observer(&DaemonEvent::NotEvaluated {
                round_id: task.round_id,
                seq_len,
            });
        }
    }
    let (eval_loss, num_eval_tokens) =
        measured(eval).map_or((0.0, 0), |eval| (eval.loss, eval.tokens));
    client
        .submit_evaluation(pb::SubmitEvaluationRequest {
            client_id: client_id.to_string(),
            task_id: task.task_id.clone(),
            eval_loss,
            num_eval_tokens,
        })
        .await?;
    if !is_train {
        return Ok(());
    }
    if let Some(eval) = eval.filter(|eval| !eval.loss.is_finite()) {
        // Every step would fail the same way: say why, before the first.
        let start = match task.global_adapter_round {
            0 => "the base model".to_string(),
            round => format!("the global adapter of round {round}"),
        };
        return Err(ClientError::Diverged(format!(
            "{start} overflows on this site's data (held-out loss {}): not training from it",
            eval.loss
        )));
    }

    let train_config = TrainConfig {
        local_steps: params.local_steps as usize,
        learning_rate: f64::from(params.learning_rate),
        batch_size,
        seq_len,
        // The task's seed is shared by the round (same LoRA init everywhere); batches differ per site.
        seed: params.seed ^ site_seed(&config.client_name),
        warmup_steps: (params.warmup_steps as usize).min(params.local_steps as usize),
        cosine_decay: params.cosine_decay,
        max_grad_norm: (params.max_grad_norm > 0.0).then_some(f64::from(params.max_grad_norm)),
        grad_accumulation: (params.grad_accumulation as usize).max(1),
        trained: match pb::TrainedFactors::try_from(task.trained) {
            Ok(pb::TrainedFactors::Both) => TrainedFactors::Both,
            Ok(pb::TrainedFactors::A) => TrainedFactors::A,
            Ok(pb::TrainedFactors::B) => TrainedFactors::B,
            Err(_) => {
                return Err(ClientError::Protocol(format!(
                    "task asks to train unknown factors {} (upgrade the client)",
                    task.trained
                )));
            }
        },
    };
    // The update's FedAvg weight: the examples this task's windows actually train on.
    let trained = trainable_examples(site, seq_len)?;
    let windows = make_windows(&site.data.train, site.eos, seq_len);
    let skipped = site.data.train.len() - trained;
    if skipped > 0 {
        // A count, never the examples themselves.
        tracing::warn!(
            skipped,
            seq_len,
            "examples that teach nothing at the task's sequence length are skipped and carry no \
             FedAvg weight: instruction examples whose prompt fills it, documents wholly in the \
             packed stream's tail past the last full window"
        );
    }
    let cut = cut_examples(&site.data.train, site.eos, seq_len);
    if cut > 0 {
        tracing::warn!(
            cut,
            seq_len,
            "instruction examples longer than the task's sequence length are cut: the model does \
             not learn where those answers end (the federation's --seq-len keeps them whole)"
        );
    }
    let round_id = task.round_id;
    let step_observer = observer.clone();
    let tokens_per_step =
        (train_config.batch_size * train_config.seq_len * train_config.grad_accumulation) as f64;
    let (model, report) = compute::run_async(move || {
        let started = std::time::Instant::now();
        let report = train(&model, &windows, &train_config, &mut |step, loss| {
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            step_observer(&DaemonEvent::Step {
                round_id,
                step,
                loss,
                tokens_per_second: (step as f64 * tokens_per_step / seconds) as f32,
            });
        })?;
        Ok::<_, ClientError>((model, report))
    })
    .await??;
    let (adapter, local_eval) = compute::run_async(move || {
        let local_eval = evaluate_heldout(&model, &heldout, batch_size, max_eval_windows)?;
        Ok::<_, ClientError>((model.export_adapter()?, local_eval))
    })
    .await??;
    // The steps' losses were finite, but the last step's update makes the model overflow: its
    // factors are finite (the coordinator would take them) and would spoil the global adapter.
    if let Some(eval) = local_eval.filter(|eval| !eval.loss.is_finite()) {
        return Err(ClientError::Diverged(format!(
            "the adapter trained in round {} overflows on this site's held-out data (held-out \
             loss {}): not sending it (the federation's learning rate, `fedlora serve \
             --learning-rate`, is too high for this site)",
            task.round_id, eval.loss
        )));
    }

    let bytes = peft_weights(&adapter)?;
    save_copy(
        &config.state_dir,
        task.round_id,
        &bytes,
        &lora,
        &config.model_dir,
    )?;
    let sha256 = sha256_hex(&bytes);
    let header = pb::UpdateHeader {
        client_id: client_id.to_string(),
        task_id: task.task_id.clone(),
        num_examples: trained as u64,
        total_bytes: bytes.len() as u64,
        sha256: sha256.clone(),
        metrics: Some(pb::TrainMetrics {
            steps: report.steps as u32,
            tokens: report.tokens,
            train_loss: report.mean_loss,
            eval_loss: local_eval.as_ref().map_or(0.0, |eval| eval.loss),
            seconds: report.seconds,
            eval_tokens: Some(local_eval.as_ref().map_or(0, |eval| eval.tokens)),
        }),
    };
    let mut messages = vec![pb::SubmitUpdateRequest {
        part: Some(submit_update_request::Part::Header(header)),
    }];
    messages.extend(
        bytes
            .chunks(CHUNK_BYTES)
            .map(|chunk| pb::SubmitUpdateRequest {
                part: Some(submit_update_request::Part::Chunk(chunk.to_vec())),
            }),
    );
    let receipt = client
        .submit_update(tokio_stream::iter(messages))
        .await?
        .into_inner();
    if receipt.sha256 != sha256 {
        return Err(ClientError::Protocol(format!(
            "receipt sha256 {} does not match the upload {sha256}",
            receipt.sha256
        )));
    }
    summary.rounds_trained += 1;
    info!(update_id = %receipt.update_id, bytes = bytes.len(), train_loss = report.mean_loss, "update accepted");
    observer(&DaemonEvent::Uploaded {
        round_id: task.round_id,
        bytes: bytes.len(),
        sha256,
    });
    Ok(())
}

/// A held-out loss the coordinator can record: a non-finite one (logged where it arises) is
/// reported as no measurement.
fn measured(eval: Option<EvalReport>) -> Option<EvalReport> {
    eval.filter(|eval| eval.loss.is_finite())
}

/// Refuses training parameters no site should run with: a learning rate that is not a
/// positive number (NaN would upload a NaN adapter, a negative one would train the wrong way),
/// no steps for a training task, a gradient bound that is not a number.
fn check_training(params: &pb::TrainingParams, is_train: bool) -> Result<()> {
    let refuse = |what: String| Err(ClientError::Protocol(format!("task with {what}")));
    if !is_train {
        return Ok(());
    }
    if !(params.learning_rate.is_finite() && params.learning_rate > 0.0) {
        return refuse(format!("learning rate {}", params.learning_rate));
    }
    if params.local_steps == 0 {
        return refuse("0 local steps".into());
    }
    if !(params.max_grad_norm.is_finite() && params.max_grad_norm >= 0.0) {
        return refuse(format!("gradient norm bound {}", params.max_grad_norm));
    }
    Ok(())
}

/// Refuses a federation's sequence length longer than this site's model runs: every window
/// would fail at its first forward pass, after the task was taken.
fn fits_context(model: &Llama, seq_len: usize) -> Result<()> {
    let limit = model.max_sequence_len();
    if seq_len > limit {
        return Err(ClientError::Unsupported(format!(
            "the federation's sequence length of {seq_len} tokens is longer than this site's \
             model runs ({limit}: its max_position_embeddings, or sliding window); the \
             federation's operator sets the length (`fedlora serve --seq-len`)"
        )));
    }
    Ok(())
}

/// How many training examples the windows at `seq_len` teach ([`trained_examples`]: none
/// exactly when there is no window), or the error that says why none does: every instruction
/// prompt fills the window. The federation's settings or the site's data must then change, by
/// hand.
fn trainable_examples(site: &Site, seq_len: usize) -> Result<usize> {
    let trained = trained_examples(&site.data.train, site.eos, seq_len);
    if trained == 0 {
        return Err(ClientError::NotEnoughData(format!(
            "no training window at the federation's sequence length of {seq_len} tokens: none of \
             the {} training examples leaves a token to predict (an instruction example's prompt \
             must leave room for its response); the federation's operator sets the length \
             (`fedlora serve --seq-len`), or shorten the prompts",
            site.data.train.len()
        )));
    }
    Ok(trained)
}

fn site_seed(client_name: &str) -> u64 {
    // FNV-1a of the site name: stable across runs and restarts.
    client_name
        .bytes()
        .fold(0xCBF2_9CE4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3)
        })
}

/// A global adapter as it arrived.
struct Download {
    adapter: Adapter,
    /// Bytes on the wire.
    bytes: usize,
    /// Factors filled from what the site held.
    reused: Vec<Factor>,
}

/// How long a download waits for its next chunk: a coordinator that stalls longer is treated as
/// unreachable (a transient error: the daemon reconnects and asks again), never waited on
/// forever; a slow but steady one finishes.
const DOWNLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Streams a round's global adapter, of at most `limit` bytes (the largest valid adapter for the
/// task's spec: a coordinator that announces or streams more fails the download instead of
/// filling memory), waiting at most `idle` for each chunk, and checks its length and sha256.
/// The digests of `held`'s factors go with the request; the factors the coordinator leaves out
/// are filled from `held`.
async fn download(
    client: &mut FederationClient<Channel>,
    client_id: &str,
    round_id: u64,
    held: Option<&Adapter>,
    limit: u64,
    idle: Duration,
) -> Result<Download> {
    let digest = |factor| {
        held.map(|held| held.factor_digest(factor))
            .unwrap_or_default()
    };
    let mut stream = client
        .download_adapter(pb::DownloadAdapterRequest {
            client_id: client_id.to_string(),
            round_id,
            held_lora_a_digest: digest(Factor::A),
            held_lora_b_digest: digest(Factor::B),
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut first: Option<pb::AdapterChunk> = None;
    let oversized = |bytes: u64| {
        ClientError::Protocol(format!(
            "the global adapter of round {round_id} is larger ({bytes} bytes) than any adapter \
             of this task's spec ({limit})"
        ))
    };
    loop {
        let Ok(message) = tokio::time::timeout(idle, stream.message()).await else {
            return Err(ClientError::Rpc(tonic::Status::deadline_exceeded(format!(
                "no chunk of the global adapter of round {round_id} for {} s",
                idle.as_secs_f64()
            ))));
        };
        let Some(mut chunk) = message? else {
            break;
        };
        let total = first
            .as_ref()
            .map_or(chunk.total_bytes, |first| first.total_bytes);
        if total > limit {
            return Err(oversized(total));
        }
        let received = bytes.len() as u64 + chunk.data.len() as u64;
        if received > total {
            return Err(ClientError::Protocol(format!(
                "the global adapter of round {round_id} streams more bytes ({received}) than the \
                 {total} it announced"
            )));
        }
        if first.is_none() {
            bytes.reserve(total as usize);
            bytes.append(&mut chunk.data);
            first = Some(chunk);
        } else {
            bytes.extend_from_slice(&chunk.data);
        }
    }
    let first = first.ok_or_else(|| {
        ClientError::Protocol(format!("global adapter of round {round_id} is empty"))
    })?;
    if bytes.len() as u64 != first.total_bytes || sha256_hex(&bytes) != first.sha256 {
        return Err(ClientError::Protocol(format!(
            "global adapter of round {round_id} arrived corrupt ({} of {} bytes, sha256 mismatch or truncation)",
            bytes.len(),
            first.total_bytes
        )));
    }
    let mut adapter = Adapter::from_safetensors(&bytes)?;
    let mut reused = Vec::new();
    for (factor, omitted) in [
        (Factor::A, first.omits_lora_a),
        (Factor::B, first.omits_lora_b),
    ] {
        if !omitted {
            continue;
        }
        let held = held.ok_or_else(|| {
            ClientError::Protocol(format!(
                "the global adapter of round {round_id} leaves out {factor}, which this site does not hold"
            ))
        })?;
        adapter.fill_factor(held, factor);
        reused.push(factor);
    }
    Ok(Download {
        adapter,
        bytes: bytes.len(),
        reused,
    })
}

/// Keeps the exact bytes sent for `round_id`, in PEFT layout, so the site can audit what left it.
fn save_copy(
    state_dir: &Path,
    round_id: u64,
    bytes: &[u8],
    lora: &LoraSpec,
    model_dir: &Path,
) -> Result<()> {
    let dir = sent_adapter_dir(state_dir, round_id);
    write_peft_adapter(&dir, lora, &model_dir.display().to_string(), bytes)
}

/// Directory holding the copy of the adapter sent in `round_id`.
pub fn sent_adapter_dir(state_dir: &Path, round_id: u64) -> PathBuf {
    state_dir.join(format!("round-{round_id}"))
}

#[cfg(test)]
mod misbehaving;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    /// Training parameters no site should run with are refused: the learning rate must be a
    /// positive number, a training task needs steps, the gradient bound must be a number.
    #[test]
    fn training_parameters_are_checked() {
        let good = pb::TrainingParams {
            local_steps: 5,
            learning_rate: 1e-3,
            batch_size: 4,
            seq_len: 64,
            ..Default::default()
        };
        check_training(&good, true).unwrap();
        for (params, needle) in [
            (
                pb::TrainingParams {
                    learning_rate: f32::NAN,
                    ..good
                },
                "learning rate NaN",
            ),
            (
                pb::TrainingParams {
                    learning_rate: -1e-3,
                    ..good
                },
                "learning rate -0.001",
            ),
            (
                pb::TrainingParams {
                    local_steps: 0,
                    ..good
                },
                "0 local steps",
            ),
            (
                pb::TrainingParams {
                    max_grad_norm: f32::INFINITY,
                    ..good
                },
                "gradient norm bound inf",
            ),
        ] {
            let error = check_training(&params, true).unwrap_err().to_string();
            assert!(error.contains(needle), "{error}");
            // An evaluation task trains nothing: its training parameters do not matter.
            check_training(&params, false).unwrap();
        }
    }

    /// A federation's sequence length past what the site's model runs stops the daemon with an
    /// error that says who sets it, before it takes a task.
    #[test]
    fn a_sequence_longer_than_the_model_runs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let base = BaseModel::load(dir.path(), &candle_core::Device::Cpu).unwrap();
        fits_context(&base.model, 256).unwrap();
        let error = fits_context(&base.model, 257).unwrap_err().to_string();
        assert!(
            error.contains("257 tokens") && error.contains("(256") && error.contains("--seq-len"),
            "{error}"
        );
    }
}
