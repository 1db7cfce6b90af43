//! Durable coordinator state behind one [`Store`] trait, with a PostgreSQL implementation for
//! production and an embedded SQLite implementation for zero-setup use. Both run the same SQL (a
//! portable subset: `$N` parameters, `RETURNING`, BIGINT/TEXT/DOUBLE/bytes columns, times as unix
//! milliseconds) and pass the same test suite (`tests/store_suite.rs`).
//!
//! Architecture invariant: the store knows nothing of gRPC or of aggregation math; it keeps rows and
//! bytes. State transitions are compare-and-set (`from` → `to`), so a transition happens once.

mod sql;

use async_trait::async_trait;

pub use sql::{PgStore, SqliteStore};

/// Store errors. `Conflict` is a uniqueness violation (a second task for the same client and round,
/// a second update for a task): callers turn it into an idempotent answer or a refusal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unsupported database url {0:?} (expected postgres://… or sqlite://…)")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FederationRow {
    pub id: i64,
    pub name: String,
    /// The federation's configuration as JSON (`rounds::FederationConfig`).
    pub config_json: String,
    /// Pinned by the first client that joins; every later client must match.
    pub base_model_fingerprint: Option<String>,
    /// `fedlora_proto::adapter::ModelDims` as JSON, pinned with the fingerprint.
    pub model_dims_json: Option<String>,
    /// `running` or `finished`.
    pub state: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClientRow {
    pub id: i64,
    pub federation_id: i64,
    pub name: String,
    pub max_rank: i64,
    pub num_examples: i64,
    pub joined_ms: i64,
    pub last_seen_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RoundRow {
    pub id: i64,
    pub federation_id: i64,
    /// `train` or `evaluate`.
    pub kind: String,
    /// `open`, `collecting`, `aggregating`, `closed` or `failed`.
    pub state: String,
    /// Round whose global adapter the clients start from; `None` for a fresh initialisation.
    pub base_round_id: Option<i64>,
    /// The round's LoRA spec as JSON (`fedlora_proto::adapter::LoraSpec`).
    pub lora_json: String,
    /// The round's training parameters as JSON (`rounds::TrainingConfig`).
    pub training_json: String,
    pub strategy: String,
    pub deadline_ms: i64,
    pub created_ms: i64,
    pub closed_ms: Option<i64>,
    pub failure: Option<String>,
    /// Which LoRA factors the round trains: `both`, `a` or `b`.
    pub trained: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewRound {
    pub federation_id: i64,
    pub kind: String,
    pub base_round_id: Option<i64>,
    pub lora_json: String,
    pub training_json: String,
    pub strategy: String,
    pub trained: String,
    pub deadline_ms: i64,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TaskRow {
    /// Opaque random id (the idempotency key of the update for it).
    pub id: String,
    pub round_id: i64,
    pub client_id: i64,
    pub rank: i64,
    pub created_ms: i64,
}

/// Update metadata; the safetensors bytes are fetched separately with [`Store::update_bytes`].
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UpdateRow {
    pub id: i64,
    pub task_id: String,
    pub round_id: i64,
    pub client_id: i64,
    pub num_examples: i64,
    pub sha256: String,
    pub size_bytes: i64,
    pub train_loss: f64,
    pub local_eval_loss: f64,
    /// Held-out target tokens `local_eval_loss` was measured on: 0 where the site had no
    /// held-out window at the task's sequence length (the loss is then 0 and no measurement),
    /// `None` for updates stored before the column existed or sent by a client that predates it.
    pub local_eval_tokens: Option<i64>,
    pub steps: i64,
    pub tokens: i64,
    pub train_seconds: f64,
    pub received_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewUpdate {
    pub task_id: String,
    pub round_id: i64,
    pub client_id: i64,
    pub num_examples: i64,
    pub sha256: String,
    pub bytes: Vec<u8>,
    pub train_loss: f64,
    pub local_eval_loss: f64,
    /// See [`UpdateRow::local_eval_tokens`] (`None`: a client that predates the count).
    pub local_eval_tokens: Option<i64>,
    pub steps: i64,
    pub tokens: i64,
    pub train_seconds: f64,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct GlobalAdapterRow {
    pub round_id: i64,
    pub sha256: String,
    pub bytes: Vec<u8>,
    pub num_updates: i64,
    pub num_examples: i64,
    pub created_ms: i64,
    /// The server optimizer's moments after this round (safetensors), if it has any.
    pub optimizer_state: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EvaluationRow {
    pub task_id: String,
    pub round_id: i64,
    pub client_id: i64,
    /// The round whose global adapter was evaluated (the task round's `base_round_id`); `None` = base model.
    pub adapter_round_id: Option<i64>,
    pub eval_loss: f64,
    /// 0: the site measured no loss (no held-out window at the task's sequence length, or a
    /// loss that was not a finite number); `eval_loss` is then no measurement and counts in no
    /// mean.
    pub num_tokens: i64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub federation_id: Option<i64>,
    pub client_id: Option<i64>,
    /// Short machine-readable kind, e.g. `update_rejected`.
    pub kind: String,
    /// Lowercase human-readable detail (never data, tokens or tensor values).
    pub detail: String,
    pub created_ms: i64,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RevokedRow {
    /// Lowercase hex serial number.
    pub serial: String,
    pub name: String,
    pub reason: String,
    pub revoked_ms: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Returns the federation named `name`, creating it with `config_json` if it does not exist.
    async fn create_or_get_federation(
        &self,
        name: &str,
        config_json: &str,
        now_ms: i64,
    ) -> StoreResult<FederationRow>;
    async fn get_federation(&self, federation_id: i64) -> StoreResult<Option<FederationRow>>;
    /// Sets fingerprint and dims if they are unset; returns the row as it now is (the caller
    /// compares to detect a mismatch).
    async fn pin_base_model(
        &self,
        federation_id: i64,
        fingerprint: &str,
        model_dims_json: &str,
    ) -> StoreResult<FederationRow>;
    async fn set_federation_state(&self, federation_id: i64, state: &str) -> StoreResult<()>;

    /// Inserts the client, or updates `max_rank`, `num_examples` and `last_seen_ms` of the client
    /// with the same name in the federation. Returns the row.
    async fn upsert_client(
        &self,
        federation_id: i64,
        name: &str,
        max_rank: i64,
        num_examples: i64,
        now_ms: i64,
    ) -> StoreResult<ClientRow>;
    async fn get_client(&self, client_id: i64) -> StoreResult<Option<ClientRow>>;
    async fn list_clients(&self, federation_id: i64) -> StoreResult<Vec<ClientRow>>;
    async fn touch_client(&self, client_id: i64, now_ms: i64) -> StoreResult<()>;

    async fn insert_round(&self, round: &NewRound) -> StoreResult<RoundRow>;
    async fn get_round(&self, round_id: i64) -> StoreResult<Option<RoundRow>>;
    /// The most recently created round of the federation.
    async fn latest_round(&self, federation_id: i64) -> StoreResult<Option<RoundRow>>;
    /// The newest rounds first, at most `limit`.
    async fn list_rounds(&self, federation_id: i64, limit: i64) -> StoreResult<Vec<RoundRow>>;
    /// Compare-and-set of the round state; `closed_ms` is set when `to` is `closed` or `failed`.
    /// Returns false (and changes nothing) when the round was not in state `from`.
    async fn transition_round(
        &self,
        round_id: i64,
        from: &str,
        to: &str,
        failure: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<bool>;

    /// Fails with `Conflict` when the client already has a task in the round.
    async fn insert_task(&self, task: &TaskRow) -> StoreResult<()>;
    async fn get_task(&self, task_id: &str) -> StoreResult<Option<TaskRow>>;
    async fn task_for_client(&self, round_id: i64, client_id: i64) -> StoreResult<Option<TaskRow>>;
    async fn list_tasks(&self, round_id: i64) -> StoreResult<Vec<TaskRow>>;

    /// Stores metadata and bytes in one transaction. Fails with `Conflict` when the task already
    /// has an update.
    async fn insert_update(&self, update: &NewUpdate) -> StoreResult<UpdateRow>;
    async fn update_for_task(&self, task_id: &str) -> StoreResult<Option<UpdateRow>>;
    async fn list_updates(&self, round_id: i64) -> StoreResult<Vec<UpdateRow>>;
    /// The stored bytes, or `None` once retention has deleted them.
    async fn update_bytes(&self, update_id: i64) -> StoreResult<Option<Vec<u8>>>;

    /// In one transaction: stores the round's global adapter, moves the round from `aggregating`
    /// to `closed`, and deletes the individual update bytes of the round unless `keep_updates`.
    /// Fails with `Conflict` when the round is not `aggregating`.
    async fn commit_aggregate(
        &self,
        adapter: &GlobalAdapterRow,
        keep_updates: bool,
    ) -> StoreResult<()>;
    async fn global_adapter(&self, round_id: i64) -> StoreResult<Option<GlobalAdapterRow>>;

    /// Fails with `Conflict` when the task already has an evaluation.
    async fn insert_evaluation(&self, evaluation: &EvaluationRow) -> StoreResult<()>;
    async fn list_evaluations(&self, round_id: i64) -> StoreResult<Vec<EvaluationRow>>;

    async fn record_audit(
        &self,
        federation_id: Option<i64>,
        client_id: Option<i64>,
        kind: &str,
        detail: &str,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// The newest audit events first, at most `limit`.
    async fn list_audit(&self, limit: i64) -> StoreResult<Vec<AuditRow>>;

    /// Revokes a certificate; returns false when it was revoked already (the first record stays).
    async fn revoke_certificate(&self, revoked: &RevokedRow) -> StoreResult<bool>;
    async fn is_revoked(&self, serial: &str) -> StoreResult<bool>;
    /// Every revoked certificate, oldest first.
    async fn list_revoked(&self) -> StoreResult<Vec<RevokedRow>>;
}

/// Opens the store named by `url`: `postgres://…`/`postgresql://…` or `sqlite://PATH` (created if
/// missing). Runs the migrations.
pub async fn connect(url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}
