//! The round driver: assigns tasks, accepts updates and evaluations, closes rounds by quorum or
//! deadline, aggregates, and starts the next round. All durable state lives in the [`Store`];
//! this type holds only the configuration and an in-process lock, so a restarted coordinator
//! resumes from the store (a round caught in `aggregating` is aggregated again: aggregation is a
//! deterministic function of the stored updates).
//!
//! Round states: `open` (taking participants) → `collecting` (participants fixed, waiting for
//! their reports) → `aggregating` → `closed`; or `failed` at the deadline without a quorum, after
//! which a new round starts from the same global adapter. After `rounds` training rounds one
//! `evaluate` round lets every participant measure the final global adapter; then the federation
//! is `finished`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedlora_proto::adapter::{
    Adapter, AdapterError, Factor, LoraSpec, ModelDims, TensorSpec, adapter_spec, sha256_hex,
};
use fedlora_proto::factors::{SINGLE_FACTOR, client_spec, initial_factors};
use fedlora_proto::tensor_bytes::{check_header_size, max_update_len, validate_bytes};
use tokio::sync::{Mutex, Notify};
use tracing::{info, instrument, warn};

use crate::aggregate::{
    Admission, AggregateError, OptimizerState, RoundAggregation, Strategy, Trained, strategy,
};
use crate::config::{FederationConfig, TrainingConfig};
use crate::limits::{Hit, Limits, WindowCounter};
use crate::store::{
    ClientRow, EvaluationRow, FederationRow, GlobalAdapterRow, NewRound, NewUpdate, RoundRow,
    Store, StoreError, TaskRow,
};

/// Everything that can refuse or break a coordinator call. The gRPC layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    #[error("invalid join request: {0}")]
    InvalidJoin(String),
    #[error("unknown client {0}")]
    UnknownClient(i64),
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    #[error("task {0:?} belongs to another client")]
    NotYourTask(String),
    /// No usable certificate: none, unreadable, expired or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid certificate that may not do this: the wrong role, or another site's client.
    #[error("{0}")]
    Forbidden(String),
    /// A caller over its calls-per-minute limit.
    #[error("rate limit: {0}")]
    RateLimited(String),
    #[error("base model mismatch: {0}")]
    ModelMismatch(String),
    #[error("this client cannot train the federation's lora options: {0} (upgrade the client)")]
    MissingFeatures(String),
    #[error("round {round_id} is {state}: it takes no more reports")]
    StaleRound { round_id: i64, state: String },
    #[error("task {task_id:?} is a {kind} task: {message}")]
    WrongTaskKind {
        task_id: String,
        kind: String,
        message: &'static str,
    },
    #[error("task {0:?} already has a different update")]
    AlreadySubmitted(String),
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    #[error("update of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("no global adapter for round {0}")]
    NoSuchAdapter(i64),
    #[error(
        "federation {name:?} already exists with a different configuration; keep its settings or choose another federation name"
    )]
    ConfigChanged { name: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("aggregation failed: {0}")]
    Aggregate(#[from] AggregateError),
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// What a client says about itself when it joins (counts and shapes, never data).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    pub client_name: String,
    pub max_rank: usize,
    pub num_examples: u64,
    pub base_model_fingerprint: String,
    pub model_dims: ModelDims,
    /// LoRA options the client can train (`fedlora_proto::adapter::LORA_FEATURES` names).
    pub lora_features: Vec<String>,
}

/// Kind of a round and of its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundKind {
    Train,
    Evaluate,
}

impl RoundKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Evaluate => "evaluate",
        }
    }
}

/// One client's work in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAssignment {
    pub task_id: String,
    pub round_id: i64,
    pub kind: RoundKind,
    /// The LoRA configuration at this client's rank (its alpha keeps the federation's scale).
    pub lora: LoraSpec,
    /// Which factors to train (the other stays as downloaded).
    pub trained: Trained,
    pub training: TrainingConfig,
    /// Round whose global adapter to start from; `None` = fresh initialisation.
    pub base_round_id: Option<i64>,
    pub seed: u64,
    pub deadline_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NextTask {
    Task(TaskAssignment),
    Wait { retry_after_ms: u32 },
    Finished { reason: String },
}

/// Training metrics reported with an update.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UpdateMetrics {
    pub steps: u32,
    pub tokens: u64,
    pub train_loss: f32,
    /// Held-out loss of the locally trained adapter, over `eval_tokens` target tokens (0: no
    /// loss was measured, since the site had no held-out window at the task's sequence length
    /// or its loss was not a finite number; `None`: a client that predates the count, whose
    /// loss stands).
    pub eval_loss: f32,
    pub seconds: f32,
    pub eval_tokens: Option<u64>,
}

/// A complete uploaded update: the header's claims and the received bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateSubmission {
    pub client_id: i64,
    pub task_id: String,
    pub num_examples: u64,
    pub claimed_sha256: String,
    pub bytes: Vec<u8>,
    pub metrics: UpdateMetrics,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub update_id: i64,
    pub round_id: i64,
    pub sha256: String,
}

/// The federation at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub federation: FederationRow,
    pub config: FederationConfig,
    pub rounds_closed: u32,
    pub current_round: Option<RoundRow>,
    pub clients_joined: u32,
}

/// One client's numbers in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRoundMetric {
    pub client_name: String,
    /// Held-out loss of the global adapter the round started from; NaN if not reported, or
    /// reported over no tokens (no held-out window at the task's sequence length, or a loss
    /// that was not a finite number).
    pub eval_loss: f64,
    /// Mean local training loss; NaN if no update.
    pub train_loss: f64,
    pub num_examples: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    pub round: RoundRow,
    pub tasks: u32,
    pub updates: u32,
    pub examples: u64,
    pub mean_train_loss: f64,
    pub mean_eval_loss: f64,
    pub clients: Vec<ClientRoundMetric>,
}

impl RoundSummary {
    /// The held-out loss `client_name` reported in this round: NaN where it reported nothing,
    /// reported over no tokens, or took no part.
    pub fn eval_loss_of(&self, client_name: &str) -> f64 {
        self.clients
            .iter()
            .find(|client| client.client_name == client_name)
            .map_or(f64::NAN, |client| client.eval_loss)
    }
}

/// Digests ([`Adapter::factor_digest`]) of the factors a client already holds at its task's rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldFactors {
    pub a: Option<String>,
    pub b: Option<String>,
}

impl HeldFactors {
    pub fn is_empty(&self) -> bool {
        self.a.is_none() && self.b.is_none()
    }
}

/// A global adapter as one client downloads it.
#[derive(Debug, Clone)]
pub struct AdapterDownload {
    pub round_id: i64,
    /// Safetensors bytes at the client's rank, without the factors in `omitted`.
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Factors left out because the client holds them already.
    pub omitted: Vec<Factor>,
}

/// The coordinator of one federation.
pub struct Coordinator {
    store: Arc<dyn Store>,
    config: FederationConfig,
    strategy: Box<dyn Strategy>,
    federation_id: i64,
    /// Serialises task assignment and round transitions within this process.
    lock: Mutex<()>,
    /// Woken on every round transition, for long-polling `next_task` callers.
    changed: Notify,
    limits: Limits,
    /// Calls per caller per minute.
    requests: WindowCounter,
    /// Audit rows of refusals before authentication, per remote address per minute.
    stranger_audits: WindowCounter,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

const WAIT_RETRY_MS: u32 = 1_000;
/// Updates read from the store and aggregated together: the mean strategies sweep their sums
/// once per batch, so memory is this many updates plus one adapter of f64 sums.
pub const AGGREGATION_BATCH: usize = 8;
const MAX_CLIENT_NAME: usize = 64;
const MAX_TASK_ID: usize = 96;
const MAX_AUDIT_DETAIL: usize = 512;

impl Coordinator {
    /// Opens (or creates) the federation in `store` and resumes it: a round caught in
    /// `aggregating` is aggregated, a finished round is followed by the next, an empty federation
    /// gets its first round.
    pub async fn start(store: Arc<dyn Store>, config: FederationConfig) -> Result<Arc<Self>> {
        Self::start_with_limits(store, config, Limits::default()).await
    }

    /// [`Coordinator::start`] with operational limits other than the defaults.
    pub async fn start_with_limits(
        store: Arc<dyn Store>,
        config: FederationConfig,
        limits: Limits,
    ) -> Result<Arc<Self>> {
        config
            .validate()
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
        limits
            .validate()
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
        let config_json = serde_json::to_string(&config)
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
        let federation = store
            .create_or_get_federation(&config.name, &config_json, now_ms())
            .await?;
        let stored: FederationConfig =
            serde_json::from_str(&federation.config_json).map_err(|error| {
                CoordinatorError::Corrupt(format!("stored federation config: {error}"))
            })?;
        if stored != config {
            return Err(CoordinatorError::ConfigChanged { name: config.name });
        }
        let strategy = strategy(&config.strategy)
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
        let coordinator = Arc::new(Self {
            store,
            strategy,
            config,
            federation_id: federation.id,
            lock: Mutex::new(()),
            changed: Notify::new(),
            requests: WindowCounter::new(limits.requests_per_minute, Duration::from_secs(60)),
            stranger_audits: WindowCounter::new(
                limits.audits_per_minute_per_address,
                Duration::from_secs(60),
            ),
            limits,
        });
        coordinator.resume().await?;
        Ok(coordinator)
    }

    async fn resume(&self) -> Result<()> {
        let _guard = self.lock.lock().await;
        self.repair().await
    }

    /// With the lock held: finishes whatever an interrupted call or a crash left half done. A
    /// round caught in `aggregating` is aggregated again; a closed or failed latest round gets its
    /// successor; an empty federation gets its first round.
    async fn repair(&self) -> Result<()> {
        let federation = self.federation().await?;
        if federation.state == "finished" {
            return Ok(());
        }
        match self.store.latest_round(self.federation_id).await? {
            None => {
                self.insert_round(RoundKind::Train, None).await?;
                self.changed.notify_waiters();
            }
            Some(round) if round.state == "aggregating" => {
                info!(round_id = round.id, "resuming an interrupted aggregation");
                self.aggregate_round(&round).await?;
            }
            Some(round) if round.state == "closed" || round.state == "failed" => {
                self.start_next_round(&round).await?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    pub fn federation_id(&self) -> i64 {
        self.federation_id
    }

    async fn federation(&self) -> Result<FederationRow> {
        self.store
            .get_federation(self.federation_id)
            .await?
            .ok_or_else(|| CoordinatorError::Corrupt("federation row vanished".into()))
    }

    async fn client(&self, client_id: i64) -> Result<ClientRow> {
        let client = self
            .store
            .get_client(client_id)
            .await?
            .filter(|client| client.federation_id == self.federation_id)
            .ok_or(CoordinatorError::UnknownClient(client_id))?;
        self.store.touch_client(client_id, now_ms()).await?;
        Ok(client)
    }

    /// Registers a client (or refreshes a returning one). The first client pins the base model's
    /// fingerprint and dimensions; later clients must match them.
    #[instrument(skip_all, fields(client_name = %request.client_name))]
    pub async fn join(&self, request: &JoinRequest) -> Result<ClientRow> {
        let name = &request.client_name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_CLIENT_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(CoordinatorError::InvalidJoin(format!(
                "client name must be 1-{MAX_CLIENT_NAME} characters of a-z, 0-9, '-', '_', '.'"
            )));
        }
        let missing: Vec<&str> = self
            .config
            .lora
            .features()
            .into_iter()
            .filter(|feature| {
                !request
                    .lora_features
                    .iter()
                    .any(|offered| offered == feature)
            })
            .collect();
        if !missing.is_empty() {
            return Err(CoordinatorError::MissingFeatures(missing.join(", ")));
        }
        if self.trains_single_factors()
            && !request
                .lora_features
                .iter()
                .any(|offered| offered == SINGLE_FACTOR)
        {
            return Err(CoordinatorError::MissingFeatures(format!(
                "{SINGLE_FACTOR} (the {} strategy trains one factor at a time)",
                self.strategy.name()
            )));
        }
        let required_rank = self
            .config
            .min_rank
            .unwrap_or_else(|| self.config.lora.max_rank());
        if request.max_rank < required_rank {
            return Err(CoordinatorError::InvalidJoin(format!(
                "max rank {} is below the federation's minimum rank {required_rank}",
                request.max_rank
            )));
        }
        if request.base_model_fingerprint.len() != 64
            || !request
                .base_model_fingerprint
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        {
            return Err(CoordinatorError::InvalidJoin(
                "base model fingerprint must be a hex sha256".into(),
            ));
        }
        adapter_spec(&request.model_dims, &self.config.lora)
            .map_err(|error| CoordinatorError::InvalidJoin(error.to_string()))?;
        let dims_json = serde_json::to_string(&request.model_dims)
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
        let federation = self
            .store
            .pin_base_model(
                self.federation_id,
                &request.base_model_fingerprint,
                &dims_json,
            )
            .await?;
        if federation.base_model_fingerprint.as_deref() != Some(&request.base_model_fingerprint) {
            return Err(CoordinatorError::ModelMismatch(
                "the client's base model fingerprint differs from the federation's".into(),
            ));
        }
        if federation.model_dims_json.as_deref() != Some(&dims_json) {
            return Err(CoordinatorError::ModelMismatch(
                "the client's model dimensions differ from the federation's".into(),
            ));
        }
        let client = self
            .store
            .upsert_client(
                self.federation_id,
                name,
                request.max_rank as i64,
                request.num_examples.min(i64::MAX as u64) as i64,
                now_ms(),
            )
            .await?;
        info!(client_id = client.id, "client joined");
        Ok(client)
    }

    /// The next piece of work for `client_id`, waiting up to `wait` for one to appear.
    pub async fn next_task(&self, client_id: i64, wait: Duration) -> Result<NextTask> {
        self.client(client_id).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self.try_next_task(client_id).await?;
            if !matches!(next, NextTask::Wait { .. }) {
                return Ok(next);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(next);
            }
        }
    }

    async fn try_next_task(&self, client_id: i64) -> Result<NextTask> {
        let _guard = self.lock.lock().await;
        let federation = self.federation().await?;
        if federation.state == "finished" {
            return Ok(NextTask::Finished {
                reason: format!(
                    "federation {:?} has finished all its rounds",
                    federation.name
                ),
            });
        }
        let wait = NextTask::Wait {
            retry_after_ms: WAIT_RETRY_MS,
        };
        let Some(round) = self.store.latest_round(self.federation_id).await? else {
            return Ok(wait);
        };
        if let Some(task) = self.store.task_for_client(round.id, client_id).await? {
            let reported = match round_kind(&round)? {
                RoundKind::Train => self.store.update_for_task(&task.id).await?.is_some(),
                RoundKind::Evaluate => self
                    .store
                    .list_evaluations(round.id)
                    .await?
                    .iter()
                    .any(|evaluation| evaluation.task_id == task.id),
            };
            if reported || !matches!(round.state.as_str(), "open" | "collecting") {
                return Ok(wait);
            }
            return Ok(NextTask::Task(self.assignment(&round, &task)?));
        }
        if round.state != "open" {
            return Ok(wait);
        }
        let tasks = self.store.list_tasks(round.id).await?;
        if tasks.len() >= self.config.clients_per_round as usize {
            return Ok(wait);
        }
        let client = self.client_row(client_id).await?;
        let task = TaskRow {
            id: new_task_id(round.id, client_id),
            round_id: round.id,
            client_id,
            rank: self.client_rank(&client) as i64,
            created_ms: now_ms(),
        };
        self.store.insert_task(&task).await?;
        info!(round_id = round.id, client_id, task_id = %task.id, "task assigned");
        if tasks.len() + 1 >= self.config.clients_per_round as usize {
            self.store
                .transition_round(round.id, "open", "collecting", None, now_ms())
                .await?;
            self.changed.notify_waiters();
        }
        Ok(NextTask::Task(self.assignment(&round, &task)?))
    }

    fn assignment(&self, round: &RoundRow, task: &TaskRow) -> Result<TaskAssignment> {
        let lora: LoraSpec = parse_json(&round.lora_json, "round lora")?;
        let lora = lora
            .at_rank(task.rank as usize)
            .map_err(|error| CoordinatorError::Corrupt(format!("task {}: {error}", task.id)))?;
        let training: TrainingConfig = parse_json(&round.training_json, "round training")?;
        Ok(TaskAssignment {
            task_id: task.id.clone(),
            round_id: round.id,
            kind: round_kind(round)?,
            lora,
            trained: round_trained(round)?,
            training,
            base_round_id: round.base_round_id,
            seed: round_seed(round.id),
            deadline_ms: round.deadline_ms,
        })
    }

    /// Whether some round of this federation trains only one of the factors.
    fn trains_single_factors(&self) -> bool {
        (0..2).any(|round| self.strategy.trained(round) != Trained::Both)
    }

    /// The rank this client trains and receives adapters at.
    fn client_rank(&self, client: &ClientRow) -> usize {
        if self.config.min_rank.is_none() {
            return self.config.lora.rank;
        }
        self.strategy
            .configure_fit(0, client.max_rank.max(1) as usize, self.config.lora.rank)
            .rank
    }

    async fn client_row(&self, client_id: i64) -> Result<ClientRow> {
        self.store
            .get_client(client_id)
            .await?
            .filter(|client| client.federation_id == self.federation_id)
            .ok_or(CoordinatorError::UnknownClient(client_id))
    }

    async fn model_dims(&self) -> Result<ModelDims> {
        let federation = self.federation().await?;
        parse_json(
            federation
                .model_dims_json
                .as_deref()
                .ok_or_else(|| CoordinatorError::Corrupt("no model dims pinned".into()))?,
            "model dims",
        )
    }

    /// The federation's layout in `round` (at its full rank).
    async fn round_spec(&self, round: &RoundRow) -> Result<Vec<TensorSpec>> {
        let dims = self.model_dims().await?;
        let lora: LoraSpec = parse_json(&round.lora_json, "round lora")?;
        adapter_spec(&dims, &lora).map_err(|error| CoordinatorError::Corrupt(error.to_string()))
    }

    /// The layout a client's update for `task` must have (at the task's rank).
    async fn task_spec(&self, round: &RoundRow, task: &TaskRow) -> Result<Vec<TensorSpec>> {
        let dims = self.model_dims().await?;
        let lora: LoraSpec = parse_json(&round.lora_json, "round lora")?;
        client_spec(&dims, &lora, task.rank as usize)
            .map_err(|error| CoordinatorError::Corrupt(error.to_string()))
    }

    async fn owned_task(&self, client_id: i64, task_id: &str) -> Result<(TaskRow, RoundRow)> {
        if task_id.len() > MAX_TASK_ID {
            return Err(CoordinatorError::InvalidUpdate(format!(
                "task id longer than {MAX_TASK_ID} characters"
            )));
        }
        let task = self
            .store
            .get_task(task_id)
            .await?
            .ok_or_else(|| CoordinatorError::UnknownTask(task_id.to_string()))?;
        if task.client_id != client_id {
            return Err(CoordinatorError::NotYourTask(task_id.to_string()));
        }
        let round = self.store.get_round(task.round_id).await?.ok_or_else(|| {
            CoordinatorError::Corrupt(format!("round of task {task_id} vanished"))
        })?;
        Ok((task, round))
    }

    /// Checks, from an upload's header alone, that the client may upload for this task at all and
    /// that `total_bytes` fits the largest valid update for it, so that a stranger's or an
    /// oversized stream is refused before its bytes are read.
    pub async fn check_upload(
        &self,
        client_id: i64,
        task_id: &str,
        total_bytes: u64,
    ) -> Result<()> {
        self.client(client_id).await?;
        let (task, round) = self.owned_task(client_id, task_id).await?;
        if round_kind(&round)? != RoundKind::Train {
            return Err(CoordinatorError::WrongTaskKind {
                task_id: task.id,
                kind: round.kind,
                message: "it takes an evaluation, not an update",
            });
        }
        // No upload may be larger than the largest valid update for its task.
        let limit = max_update_len(&self.task_spec(&round, &task).await?);
        if total_bytes > limit {
            return Err(CoordinatorError::TooLarge {
                size: total_bytes,
                limit,
            });
        }
        Ok(())
    }

    /// Validates and stores an update, then closes the round if it was the last one awaited.
    /// A retry of the same bytes for the same task gets the same receipt.
    #[instrument(skip_all, fields(client_id = submission.client_id, task_id = %submission.task_id))]
    pub async fn submit_update(&self, submission: UpdateSubmission) -> Result<Receipt> {
        self.client(submission.client_id).await?;
        let (task, round) = self
            .owned_task(submission.client_id, &submission.task_id)
            .await?;
        if round_kind(&round)? != RoundKind::Train {
            return Err(CoordinatorError::WrongTaskKind {
                task_id: task.id,
                kind: round.kind,
                message: "it takes an evaluation, not an update",
            });
        }
        let size = submission.bytes.len() as u64;
        if size > self.config.max_update_bytes {
            return Err(CoordinatorError::TooLarge {
                size,
                limit: self.config.max_update_bytes,
            });
        }
        let sha256 = sha256_hex(&submission.bytes);
        if let Some(existing) = self.store.update_for_task(&task.id).await? {
            return if existing.sha256 == sha256 {
                Ok(receipt(&existing.id, round.id, existing.sha256))
            } else {
                Err(CoordinatorError::AlreadySubmitted(task.id))
            };
        }
        if !matches!(round.state.as_str(), "open" | "collecting") {
            return Err(CoordinatorError::StaleRound {
                round_id: round.id,
                state: round.state,
            });
        }
        if !submission.claimed_sha256.eq_ignore_ascii_case(&sha256) {
            return Err(CoordinatorError::InvalidUpdate(
                "sha256 of the received bytes does not match the header".into(),
            ));
        }
        if submission.num_examples == 0 {
            return Err(CoordinatorError::InvalidUpdate(
                "num_examples must be at least 1".into(),
            ));
        }
        // The aggregation weight is the example count, capped so that no site can outweigh the
        // rest by claiming a huge count.
        let num_examples = submission.num_examples.min(self.config.max_example_weight);
        let metrics = submission.metrics;
        if ![metrics.train_loss, metrics.eval_loss, metrics.seconds]
            .iter()
            .all(|value| value.is_finite())
        {
            return Err(CoordinatorError::InvalidUpdate(
                "metrics must be finite numbers".into(),
            ));
        }
        let spec = self.task_spec(&round, &task).await?;
        let bytes = submission.bytes;
        // Validated on the bytes, without decoding them (fedlora_proto::tensor_bytes).
        let bytes = tokio::task::spawn_blocking(move || {
            check_header_size(&bytes, &spec)?;
            validate_bytes(&bytes, &spec)?;
            Ok::<_, AdapterError>(bytes)
        })
        .await
        .map_err(|error| CoordinatorError::Corrupt(format!("validation task: {error}")))?
        .map_err(|error| CoordinatorError::InvalidUpdate(error.to_string()))?;

        let _guard = self.lock.lock().await;
        let round = self
            .store
            .get_round(round.id)
            .await?
            .ok_or_else(|| CoordinatorError::Corrupt("round vanished".into()))?;
        if !matches!(round.state.as_str(), "open" | "collecting") {
            return Err(CoordinatorError::StaleRound {
                round_id: round.id,
                state: round.state,
            });
        }
        let new_update = NewUpdate {
            task_id: task.id.clone(),
            round_id: round.id,
            client_id: submission.client_id,
            num_examples: num_examples as i64,
            sha256: sha256.clone(),
            bytes,
            train_loss: f64::from(metrics.train_loss),
            local_eval_loss: if metrics.eval_tokens == Some(0) {
                0.0
            } else {
                f64::from(metrics.eval_loss)
            },
            local_eval_tokens: metrics
                .eval_tokens
                .map(|tokens| tokens.min(i64::MAX as u64) as i64),
            steps: i64::from(metrics.steps),
            tokens: metrics.tokens.min(i64::MAX as u64) as i64,
            train_seconds: f64::from(metrics.seconds),
            now_ms: now_ms(),
        };
        let stored = match self.store.insert_update(&new_update).await {
            Ok(stored) => stored,
            Err(StoreError::Conflict(_)) => {
                // A concurrent retry got there first: same bytes, same receipt.
                return match self.store.update_for_task(&task.id).await? {
                    Some(existing) if existing.sha256 == sha256 => {
                        Ok(receipt(&existing.id, round.id, existing.sha256))
                    }
                    _ => Err(CoordinatorError::AlreadySubmitted(task.id)),
                };
            }
            Err(error) => return Err(error.into()),
        };
        info!(
            round_id = round.id,
            update_id = stored.id,
            bytes = stored.size_bytes,
            "update accepted"
        );
        self.complete_if_ready(&round).await?;
        self.changed.notify_waiters();
        Ok(receipt(&stored.id, round.id, sha256))
    }

    /// Records the held-out loss a client measured for the global adapter its task started from.
    /// A report of 0 tokens (the site has no held-out window at the task's sequence length, or
    /// its loss came out infinite or NaN: the model overflows on its data) is recorded as the
    /// site's report, with a loss of 0 that counts in no mean and shows as none.
    #[instrument(skip(self))]
    pub async fn submit_evaluation(
        &self,
        client_id: i64,
        task_id: &str,
        eval_loss: f32,
        num_tokens: u64,
    ) -> Result<()> {
        self.client(client_id).await?;
        let (task, round) = self.owned_task(client_id, task_id).await?;
        if !(eval_loss.is_finite() && eval_loss >= 0.0) {
            return Err(CoordinatorError::InvalidUpdate(
                "eval_loss must be a finite non-negative number".into(),
            ));
        }
        let _guard = self.lock.lock().await;
        let round = self.reload(round.id).await?;
        if !matches!(round.state.as_str(), "open" | "collecting") {
            return Err(CoordinatorError::StaleRound {
                round_id: round.id,
                state: round.state,
            });
        }
        if num_tokens == 0 {
            info!(
                round_id = round.id,
                client_id,
                "the site measured no held-out loss (no held-out window at the task's sequence \
                 length, or a loss that was not a finite number; the site's log says which)"
            );
        }
        let evaluation = EvaluationRow {
            task_id: task.id,
            round_id: round.id,
            client_id,
            adapter_round_id: round.base_round_id,
            eval_loss: if num_tokens == 0 {
                0.0
            } else {
                f64::from(eval_loss)
            },
            num_tokens: num_tokens.min(i64::MAX as u64) as i64,
            created_ms: now_ms(),
        };
        match self.store.insert_evaluation(&evaluation).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(error) => return Err(error.into()),
        }
        if round_kind(&round)? == RoundKind::Evaluate {
            self.complete_if_ready(&round).await?;
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// With the lock held: closes `round` when every participant has reported and no more can join.
    async fn complete_if_ready(&self, round: &RoundRow) -> Result<()> {
        let round = self
            .store
            .get_round(round.id)
            .await?
            .ok_or_else(|| CoordinatorError::Corrupt("round vanished".into()))?;
        if round.state != "collecting" {
            return Ok(());
        }
        let tasks = self.store.list_tasks(round.id).await?.len();
        let reports = self.reports(&round).await?;
        if reports >= tasks {
            self.finish_round(&round).await?;
        }
        Ok(())
    }

    async fn reports(&self, round: &RoundRow) -> Result<usize> {
        Ok(match round_kind(round)? {
            RoundKind::Train => self.store.list_updates(round.id).await?.len(),
            RoundKind::Evaluate => self.store.list_evaluations(round.id).await?.len(),
        })
    }

    async fn finish_round(&self, round: &RoundRow) -> Result<()> {
        match round_kind(round)? {
            RoundKind::Train => self.aggregate_round(round).await,
            RoundKind::Evaluate => {
                if self
                    .store
                    .transition_round(round.id, &round.state, "closed", None, now_ms())
                    .await?
                {
                    info!(round_id = round.id, "evaluation round closed");
                    let closed = self.reload(round.id).await?;
                    self.start_next_round(&closed).await?;
                }
                Ok(())
            }
        }
    }

    async fn reload(&self, round_id: i64) -> Result<RoundRow> {
        self.store
            .get_round(round_id)
            .await?
            .ok_or_else(|| CoordinatorError::Corrupt("round vanished".into()))
    }

    /// With the lock held: `round` → aggregating → closed with its global adapter (the
    /// federation's strategy, robustness bounds and server optimizer), then the next round.
    /// Reads the updates [`AGGREGATION_BATCH`] at a time (memory: that many updates plus one
    /// adapter of f64 sums for the mean strategies).
    /// Updates refused here (a bound, a layout that passed intake but not aggregation) are
    /// audited and left out; a round left with nothing to aggregate fails and is retried.
    #[instrument(skip_all, fields(round_id = round.id, strategy = %round.strategy))]
    async fn aggregate_round(&self, round: &RoundRow) -> Result<()> {
        if round.state != "aggregating"
            && !self
                .store
                .transition_round(round.id, &round.state, "aggregating", None, now_ms())
                .await?
        {
            return Ok(());
        }
        let spec = self.round_spec(round).await?;
        let trained = round_trained(round)?;
        let (start, state) = self.round_start(round).await?;
        let strategy = strategy(&round.strategy)?;
        let mut aggregation = RoundAggregation::new(
            strategy.as_ref(),
            &spec,
            start,
            trained,
            &self.config.robustness,
            &self.config.server_optimizer,
        )?;
        let mut updates = self.store.list_updates(round.id).await?;
        // A canonical order (by client, not by arrival) makes the floating-point sums, and so the
        // global adapter, independent of which update happened to arrive first.
        updates.sort_by_key(|update| update.client_id);
        let (mut counted, mut examples) = (0i64, 0i64);
        for chunk in updates.chunks(AGGREGATION_BATCH) {
            let mut batch = Vec::with_capacity(chunk.len());
            for update in chunk {
                let bytes = self.store.update_bytes(update.id).await?.ok_or_else(|| {
                    CoordinatorError::Corrupt(format!(
                        "bytes of update {} are gone before aggregation",
                        update.id
                    ))
                })?;
                batch.push((bytes, update.num_examples as f64));
            }
            let (returned, outcomes) = tokio::task::spawn_blocking(move || {
                let borrowed: Vec<(&[u8], f64)> = batch
                    .iter()
                    .map(|(bytes, weight)| (bytes.as_slice(), *weight))
                    .collect();
                let outcomes = aggregation.add_many_bytes(&borrowed);
                (aggregation, outcomes)
            })
            .await
            .map_err(|error| CoordinatorError::Corrupt(format!("aggregation task: {error}")))?;
            aggregation = returned;
            for (update, outcome) in chunk.iter().zip(outcomes) {
                let refusal = match outcome {
                    Ok(Admission::Accepted {
                        change_norm,
                        clipped,
                    }) => {
                        counted += 1;
                        examples = examples.saturating_add(update.num_examples);
                        if clipped {
                            info!(
                                update_id = update.id,
                                change_norm, "update clipped to the norm bound"
                            );
                        }
                        None
                    }
                    Ok(Admission::Rejected { change_norm, bound }) => Some(format!(
                        "update {} left out of round {}: its change has norm {change_norm:.4}, above the bound {bound}",
                        update.id, round.id
                    )),
                    Err(error) => Some(format!(
                        "update {} left out of round {}: {error}",
                        update.id, round.id
                    )),
                };
                if let Some(detail) = refusal {
                    warn!(update_id = update.id, client_id = update.client_id, %detail, "update left out");
                    self.record_audit(Some(update.client_id), "update_left_out", &detail)
                        .await;
                }
            }
        }
        let outcome = tokio::task::spawn_blocking(move || aggregation.finish(state))
            .await
            .map_err(|error| CoordinatorError::Corrupt(format!("aggregation task: {error}")))?;
        let (global, state) = match outcome {
            Ok(done) => done,
            // Whatever the updates did to the aggregation (nothing left, a non-finite result, a
            // decomposition that failed), the round fails and is retried from the same base:
            // aggregating the same updates again would only fail again.
            Err(error) => {
                let failure = match error {
                    AggregateError::NothingToAggregate => {
                        format!("none of the {} updates could be aggregated", updates.len())
                    }
                    other => format!("aggregation failed: {other}"),
                };
                warn!(%failure, "round failed");
                self.record_audit(
                    None,
                    "round_failed",
                    &format!("round {}: {failure}", round.id),
                )
                .await;
                if self
                    .store
                    .transition_round(round.id, "aggregating", "failed", Some(&failure), now_ms())
                    .await?
                {
                    let failed = self.reload(round.id).await?;
                    self.start_next_round(&failed).await?;
                }
                return Ok(());
            }
        };
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("fedlora.round_id".to_string(), round.id.to_string()),
            ("fedlora.strategy".to_string(), round.strategy.clone()),
            ("fedlora.trained".to_string(), trained.as_str().to_string()),
        ]);
        let bytes = global
            .to_safetensors(Some(metadata))
            .map_err(AggregateError::Layout)?;
        let row = GlobalAdapterRow {
            round_id: round.id,
            sha256: sha256_hex(&bytes),
            bytes,
            num_updates: counted,
            num_examples: examples,
            created_ms: now_ms(),
            optimizer_state: state.map(|state| state.to_bytes()).transpose()?,
        };
        self.store
            .commit_aggregate(&row, self.config.keep_updates)
            .await?;
        info!(updates = counted, examples, sha256 = %row.sha256, "round aggregated and closed");
        let closed = self.reload(round.id).await?;
        self.start_next_round(&closed).await?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// The factors every client started `round` from (the base round's global adapter, or the
    /// seeded initialisation of a fresh round, which clients compute identically), and the server
    /// optimizer's state after the base round.
    async fn round_start(&self, round: &RoundRow) -> Result<(Adapter, Option<OptimizerState>)> {
        match round.base_round_id {
            Some(base) => {
                let row = self
                    .store
                    .global_adapter(base)
                    .await?
                    .ok_or(CoordinatorError::NoSuchAdapter(base))?;
                let adapter = Adapter::from_safetensors(&row.bytes).map_err(|error| {
                    CoordinatorError::Corrupt(format!("global adapter of round {base}: {error}"))
                })?;
                let state = row
                    .optimizer_state
                    .as_deref()
                    .map(OptimizerState::from_bytes)
                    .transpose()?;
                Ok((adapter, state))
            }
            None => {
                let dims = self.model_dims().await?;
                let lora: LoraSpec = parse_json(&round.lora_json, "round lora")?;
                let start = initial_factors(&dims, &lora, round_seed(round.id))
                    .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?;
                Ok((start, None))
            }
        }
    }

    /// With the lock held: what follows a closed or failed round.
    async fn start_next_round(&self, previous: &RoundRow) -> Result<()> {
        let kind = round_kind(previous)?;
        if previous.state == "failed" {
            self.insert_round(kind, previous.base_round_id).await?;
            self.changed.notify_waiters();
            return Ok(());
        }
        match kind {
            RoundKind::Train => {
                let closed_train = self.closed_train_rounds().await?;
                let next = if closed_train < self.config.rounds {
                    RoundKind::Train
                } else {
                    RoundKind::Evaluate
                };
                self.insert_round(next, Some(previous.id)).await?;
            }
            RoundKind::Evaluate => {
                self.store
                    .set_federation_state(self.federation_id, "finished")
                    .await?;
                info!("federation finished");
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn closed_train_rounds(&self) -> Result<u32> {
        Ok(self
            .store
            .list_rounds(self.federation_id, i64::MAX)
            .await?
            .iter()
            .filter(|round| round.kind == "train" && round.state == "closed")
            .count() as u32)
    }

    async fn insert_round(&self, kind: RoundKind, base_round_id: Option<i64>) -> Result<RoundRow> {
        // Which factors train is decided by how many training rounds have closed: a failed
        // round's retry trains what the failed round would have.
        let trained = match kind {
            RoundKind::Train => self.strategy.trained(self.closed_train_rounds().await?),
            RoundKind::Evaluate => Trained::Both,
        };
        let now = now_ms();
        let round = self
            .store
            .insert_round(&NewRound {
                federation_id: self.federation_id,
                kind: kind.as_str().into(),
                base_round_id,
                lora_json: to_json(&self.config.lora)?,
                training_json: to_json(&self.config.training)?,
                strategy: self.config.strategy.clone(),
                trained: trained.as_str().into(),
                deadline_ms: now + (self.config.round_timeout_secs as i64) * 1000,
                now_ms: now,
            })
            .await?;
        info!(
            round_id = round.id,
            kind = kind.as_str(),
            base_round_id,
            trained = trained.as_str(),
            "round opened"
        );
        Ok(round)
    }

    /// Enforces the current round's deadline: aggregate with a quorum, else fail and retry.
    pub async fn tick(&self) -> Result<()> {
        let _guard = self.lock.lock().await;
        self.repair().await?;
        let Some(round) = self.store.latest_round(self.federation_id).await? else {
            return Ok(());
        };
        if !matches!(round.state.as_str(), "open" | "collecting") || now_ms() < round.deadline_ms {
            return Ok(());
        }
        let reports = self.reports(&round).await?;
        let quorum = match round_kind(&round)? {
            RoundKind::Train => self.config.min_clients as usize,
            RoundKind::Evaluate => 1,
        };
        if reports >= quorum {
            info!(
                round_id = round.id,
                reports, "deadline reached with a quorum"
            );
            self.finish_round(&round).await
        } else {
            let failure = format!("deadline passed with {reports} of {quorum} required reports");
            warn!(round_id = round.id, %failure, "round failed");
            if self
                .store
                .transition_round(round.id, &round.state, "failed", Some(&failure), now_ms())
                .await?
            {
                let failed = self.reload(round.id).await?;
                self.start_next_round(&failed).await?;
            }
            Ok(())
        }
    }

    /// The global adapter produced by `round_id`, for a known client: at the client's rank (the
    /// leading slots of each factor) when that is below the federation's, without the factors
    /// whose digests the client says it already holds.
    pub async fn global_adapter(
        &self,
        client_id: i64,
        round_id: i64,
        held: &HeldFactors,
    ) -> Result<AdapterDownload> {
        let client = self.client(client_id).await?;
        // Only this federation's rounds: a store may hold several federations.
        self.store
            .get_round(round_id)
            .await?
            .filter(|round| round.federation_id == self.federation_id)
            .ok_or(CoordinatorError::NoSuchAdapter(round_id))?;
        let row = self
            .store
            .global_adapter(round_id)
            .await?
            .ok_or(CoordinatorError::NoSuchAdapter(round_id))?;
        // The rank of the client's task in the current round, which its training validates the
        // download against (a client that rejoined with another max rank keeps its task's rank).
        let task = match self.store.latest_round(self.federation_id).await? {
            Some(latest) => self.store.task_for_client(latest.id, client_id).await?,
            None => None,
        };
        let rank = task.map_or_else(|| self.client_rank(&client), |task| task.rank as usize);
        let spec = if rank < self.config.lora.rank {
            Some(
                client_spec(&self.model_dims().await?, &self.config.lora, rank)
                    .map_err(|error| CoordinatorError::Corrupt(error.to_string()))?,
            )
        } else {
            None
        };
        if spec.is_none() && held.is_empty() {
            return Ok(AdapterDownload {
                round_id,
                bytes: row.bytes,
                sha256: row.sha256,
                omitted: Vec::new(),
            });
        }
        let held = held.clone();
        let stored = row.bytes;
        let (bytes, omitted) = tokio::task::spawn_blocking(move || {
            let metadata = Adapter::safetensors_metadata(&stored)?;
            let mut adapter = Adapter::from_safetensors(&stored)?;
            if let Some(spec) = &spec {
                adapter = adapter.rank_prefix(spec)?;
            }
            let mut omitted = Vec::new();
            for (factor, digest) in [(Factor::A, &held.a), (Factor::B, &held.b)] {
                if digest
                    .as_deref()
                    .is_some_and(|digest| digest == adapter.factor_digest(factor))
                {
                    adapter.remove_factor(factor);
                    omitted.push(factor);
                }
            }
            if spec.is_none() && omitted.is_empty() {
                return Ok((stored, omitted));
            }
            Ok::<_, AdapterError>((adapter.to_safetensors(Some(metadata))?, omitted))
        })
        .await
        .map_err(|error| CoordinatorError::Corrupt(format!("download task: {error}")))?
        .map_err(|error| CoordinatorError::Corrupt(format!("global adapter: {error}")))?;
        Ok(AdapterDownload {
            round_id,
            sha256: sha256_hex(&bytes),
            bytes,
            omitted,
        })
    }

    /// Whether the certificate with this serial (lowercase hex) is revoked.
    pub async fn is_revoked(&self, serial: &str) -> Result<bool> {
        Ok(self.store.is_revoked(serial).await?)
    }

    /// Refuses a call for `client_id` from a site whose certificate names another client. An
    /// unknown id is refused the same way, so that ids cannot be probed; nothing is touched.
    pub async fn check_client_owner(&self, client_id: i64, certificate_name: &str) -> Result<()> {
        let owned = self
            .store
            .get_client(client_id)
            .await?
            .is_some_and(|client| {
                client.federation_id == self.federation_id && client.name == certificate_name
            });
        if !owned {
            return Err(CoordinatorError::Forbidden(format!(
                "client {client_id} is not the client of certificate {certificate_name:?}"
            )));
        }
        Ok(())
    }

    /// The operational limits this coordinator runs with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts a call by `caller` (a certificate name) against the per-minute limit.
    pub fn admit_request(&self, caller: &str) -> Hit {
        self.requests.hit(caller)
    }

    /// Records a connection refused during its TLS handshake (best effort, at most
    /// `audits_per_minute_per_address` rows per address).
    pub async fn audit_connection_refused(
        &self,
        remote: Option<std::net::SocketAddr>,
        reason: &str,
    ) {
        let address = remote.map_or_else(
            || "unknown address".to_string(),
            |addr| addr.ip().to_string(),
        );
        if self.stranger_audits.hit(&address) != Hit::Allowed {
            return;
        }
        let remote = remote.map_or_else(|| "unknown address".to_string(), |addr| addr.to_string());
        self.record_audit(None, "connection_refused", &format!("{remote}: {reason}"))
            .await;
    }

    /// Records a call refused before its caller was authenticated (logged always; audited at
    /// most `audits_per_minute_per_address` times per address and minute).
    pub async fn audit_stranger(
        &self,
        remote: Option<std::net::SocketAddr>,
        rpc: &str,
        error: &CoordinatorError,
    ) {
        let address = remote.map_or_else(
            || "unknown address".to_string(),
            |addr| addr.ip().to_string(),
        );
        warn!(%address, rpc, %error, "request refused");
        if self.stranger_audits.hit(&address) != Hit::Allowed {
            return;
        }
        self.record_audit(
            None,
            "request_refused",
            &format!("{rpc}: {error} (from {address})"),
        )
        .await;
    }

    /// Records a refused call in the audit log (best effort: a failing audit write is logged).
    pub async fn audit_rejection(
        &self,
        client_id: Option<i64>,
        rpc: &str,
        error: &CoordinatorError,
    ) {
        warn!(client_id, rpc, %error, "request refused");
        self.record_audit(client_id, "request_refused", &format!("{rpc}: {error}"))
            .await;
    }

    /// Writes an audit row (best effort: a failing write is logged). Long details are cut.
    async fn record_audit(&self, client_id: Option<i64>, kind: &str, detail: &str) {
        let mut detail = detail.to_string();
        if detail.len() > MAX_AUDIT_DETAIL {
            let mut end = MAX_AUDIT_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        let known_client = match client_id {
            Some(id) => self
                .store
                .get_client(id)
                .await
                .ok()
                .flatten()
                .map(|client| client.id),
            None => None,
        };
        if let Err(store_error) = self
            .store
            .record_audit(
                Some(self.federation_id),
                known_client,
                kind,
                &detail,
                now_ms(),
            )
            .await
        {
            warn!(%store_error, "could not record audit event");
        }
    }

    pub async fn status(&self) -> Result<Status> {
        let federation = self.federation().await?;
        Ok(Status {
            rounds_closed: self.closed_train_rounds().await?,
            current_round: self.store.latest_round(self.federation_id).await?,
            clients_joined: self.store.list_clients(self.federation_id).await?.len() as u32,
            federation,
            config: self.config.clone(),
        })
    }

    /// The newest `limit` rounds with their participants' metrics.
    pub async fn rounds(&self, limit: u32) -> Result<Vec<RoundSummary>> {
        let names: HashMap<i64, String> = self
            .store
            .list_clients(self.federation_id)
            .await?
            .into_iter()
            .map(|client| (client.id, client.name))
            .collect();
        let mut summaries = Vec::new();
        for round in self
            .store
            .list_rounds(self.federation_id, i64::from(limit.max(1)))
            .await?
        {
            let tasks = self.store.list_tasks(round.id).await?;
            let updates = self.store.list_updates(round.id).await?;
            let evaluations = self.store.list_evaluations(round.id).await?;
            let examples: i64 = updates.iter().map(|update| update.num_examples).sum();
            let mean_train_loss = weighted_mean(
                updates
                    .iter()
                    .map(|update| (update.train_loss, update.num_examples as f64)),
            );
            // The strategy's `aggregate_evaluate` (token-weighted for the built-in ones), over the
            // reports that measured something.
            let reports: Vec<(f64, u64)> = evaluations
                .iter()
                .filter(|evaluation| evaluation.num_tokens > 0)
                .map(|evaluation| (evaluation.eval_loss, evaluation.num_tokens.max(0) as u64))
                .collect();
            let mean_eval_loss = self
                .strategy
                .aggregate_evaluate(&reports)
                .unwrap_or(f64::NAN);
            let clients = tasks
                .iter()
                .map(|task| {
                    let update = updates.iter().find(|update| update.task_id == task.id);
                    ClientRoundMetric {
                        client_name: names.get(&task.client_id).cloned().unwrap_or_default(),
                        // None reported, or a report of no held-out tokens: no loss.
                        eval_loss: evaluations
                            .iter()
                            .find(|evaluation| evaluation.task_id == task.id)
                            .filter(|evaluation| evaluation.num_tokens > 0)
                            .map_or(f64::NAN, |evaluation| evaluation.eval_loss),
                        train_loss: update.map_or(f64::NAN, |update| update.train_loss),
                        num_examples: update.map_or(0, |update| update.num_examples as u64),
                    }
                })
                .collect();
            summaries.push(RoundSummary {
                tasks: tasks.len() as u32,
                updates: updates.len() as u32,
                examples: examples as u64,
                mean_train_loss,
                mean_eval_loss,
                clients,
                round,
            });
        }
        Ok(summaries)
    }
}

fn receipt(update_id: &i64, round_id: i64, sha256: String) -> Receipt {
    Receipt {
        update_id: *update_id,
        round_id,
        sha256,
    }
}

fn weighted_mean(values: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (sum, weight) = values.fold((0.0, 0.0), |(sum, weight), (value, w)| {
        (sum + value * w, weight + w)
    });
    if weight > 0.0 { sum / weight } else { f64::NAN }
}

fn round_kind(round: &RoundRow) -> Result<RoundKind> {
    match round.kind.as_str() {
        "train" => Ok(RoundKind::Train),
        "evaluate" => Ok(RoundKind::Evaluate),
        other => Err(CoordinatorError::Corrupt(format!(
            "round {} has kind {other:?}",
            round.id
        ))),
    }
}

fn round_trained(round: &RoundRow) -> Result<Trained> {
    Trained::parse(&round.trained).ok_or_else(|| {
        CoordinatorError::Corrupt(format!("round {} trains {:?}", round.id, round.trained))
    })
}

/// One seed per round: every client initialises the same LoRA A in a fresh round (and the
/// coordinator computes the same start), so averaging A and B separately does not mix unrelated
/// subspaces. Clients mix in their own name for batch sampling.
pub fn round_seed(round_id: i64) -> u64 {
    (round_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|error| CoordinatorError::Corrupt(format!("{what}: {error}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| CoordinatorError::Corrupt(error.to_string()))
}

/// A task id that is unique and unguessable enough to be an idempotency key: round, client and
/// 64 bits from the OS-seeded hasher and the clock.
fn new_task_id(round_id: i64, client_id: i64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_i64(now_ms());
    hasher.write_i64(round_id);
    hasher.write_i64(client_id);
    format!("r{round_id}-c{client_id}-{:016x}", hasher.finish())
}
