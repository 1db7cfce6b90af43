//! The two SQL implementations of [`Store`]: [`PgStore`] (PostgreSQL) and [`SqliteStore`] (embedded
//! SQLite). Only connecting differs; every method body is written once in `impl_store!` and
//! instantiated for both, over the portable SQL subset described in the module docs.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{
    AuditRow, ClientRow, EvaluationRow, FederationRow, GlobalAdapterRow, NewRound, NewUpdate,
    RevokedRow, RoundRow, Store, StoreError, StoreResult, TaskRow, UpdateRow,
};

/// Connections of a PostgreSQL pool.
const PG_MAX_CONNECTIONS: u32 = 16;
/// Connections of a file-backed SQLite pool (WAL: many readers, one writer at a time).
const SQLITE_MAX_CONNECTIONS: u32 = 8;
/// How long a SQLite connection waits for the write lock before failing with "database is locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of [`UpdateRow`]: every column of `updates` except the bytes.
macro_rules! update_columns {
    () => {
        "id, task_id, round_id, client_id, num_examples, sha256, size_bytes, train_loss, \
         local_eval_loss, local_eval_tokens, steps, tokens, train_seconds, received_ms"
    };
}

/// PostgreSQL store (production).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) and runs the migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(PG_MAX_CONNECTIONS)
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// Embedded SQLite store (zero-setup and single-machine use).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens `url` (`sqlite://PATH`, created if missing, or `sqlite::memory:`) and runs the
    /// migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool_options = if in_memory {
            // An in-memory database lives as long as a connection to it: keep exactly one, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            options = options.journal_mode(SqliteJournalMode::Wal);
            SqlitePoolOptions::new().max_connections(SQLITE_MAX_CONNECTIONS)
        };
        let pool = pool_options.connect_with(options).await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// Maps a uniqueness violation to `Conflict(message)` and any other error to `Database`.
fn conflict_if_unique(message: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |error| match &error {
        sqlx::Error::Database(database_error) if database_error.is_unique_violation() => {
            StoreError::Conflict(message.to_string())
        }
        _ => StoreError::Database(error),
    }
}

/// Implements the pool accessors and [`Store`] for `$store`, whose pool is a `$pool`.
macro_rules! impl_store {
    ($store:ty, $pool:ty) => {
        impl $store {
            /// Wraps a pool whose database is already migrated (e.g. a `#[sqlx::test]` pool).
            pub fn from_pool(pool: $pool) -> Self {
                Self { pool }
            }

            pub fn pool(&self) -> &$pool {
                &self.pool
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn create_or_get_federation(
                &self,
                name: &str,
                config_json: &str,
                now_ms: i64,
            ) -> StoreResult<FederationRow> {
                sqlx::query(
                    "INSERT INTO federations (name, config_json, state, created_ms) \
                     VALUES ($1, $2, 'running', $3) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(config_json)
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
                Ok(
                    sqlx::query_as::<_, FederationRow>("SELECT * FROM federations WHERE name = $1")
                        .bind(name)
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            async fn get_federation(
                &self,
                federation_id: i64,
            ) -> StoreResult<Option<FederationRow>> {
                Ok(
                    sqlx::query_as::<_, FederationRow>("SELECT * FROM federations WHERE id = $1")
                        .bind(federation_id)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            async fn pin_base_model(
                &self,
                federation_id: i64,
                fingerprint: &str,
                model_dims_json: &str,
            ) -> StoreResult<FederationRow> {
                // Both values are pinned together, by whoever finds the fingerprint unset.
                sqlx::query_as::<_, FederationRow>(
                    "UPDATE federations SET \
                     base_model_fingerprint = COALESCE(base_model_fingerprint, $2), \
                     model_dims_json = CASE WHEN base_model_fingerprint IS NULL THEN $3 \
                     ELSE model_dims_json END \
                     WHERE id = $1 RETURNING *",
                )
                .bind(federation_id)
                .bind(fingerprint)
                .bind(model_dims_json)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("federation {federation_id}")))
            }

            async fn set_federation_state(
                &self,
                federation_id: i64,
                state: &str,
            ) -> StoreResult<()> {
                let result = sqlx::query("UPDATE federations SET state = $2 WHERE id = $1")
                    .bind(federation_id)
                    .bind(state)
                    .execute(&self.pool)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("federation {federation_id}")));
                }
                Ok(())
            }

            async fn upsert_client(
                &self,
                federation_id: i64,
                name: &str,
                max_rank: i64,
                num_examples: i64,
                now_ms: i64,
            ) -> StoreResult<ClientRow> {
                Ok(sqlx::query_as::<_, ClientRow>(
                    "INSERT INTO clients \
                     (federation_id, name, max_rank, num_examples, joined_ms, last_seen_ms) \
                     VALUES ($1, $2, $3, $4, $5, $5) \
                     ON CONFLICT (federation_id, name) DO UPDATE SET \
                     max_rank = excluded.max_rank, num_examples = excluded.num_examples, \
                     last_seen_ms = excluded.last_seen_ms \
                     RETURNING *",
                )
                .bind(federation_id)
                .bind(name)
                .bind(max_rank)
                .bind(num_examples)
                .bind(now_ms)
                .fetch_one(&self.pool)
                .await?)
            }

            async fn get_client(&self, client_id: i64) -> StoreResult<Option<ClientRow>> {
                Ok(
                    sqlx::query_as::<_, ClientRow>("SELECT * FROM clients WHERE id = $1")
                        .bind(client_id)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            async fn list_clients(&self, federation_id: i64) -> StoreResult<Vec<ClientRow>> {
                Ok(sqlx::query_as::<_, ClientRow>(
                    "SELECT * FROM clients WHERE federation_id = $1 ORDER BY id",
                )
                .bind(federation_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn touch_client(&self, client_id: i64, now_ms: i64) -> StoreResult<()> {
                let result = sqlx::query("UPDATE clients SET last_seen_ms = $2 WHERE id = $1")
                    .bind(client_id)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("client {client_id}")));
                }
                Ok(())
            }

            async fn insert_round(&self, round: &NewRound) -> StoreResult<RoundRow> {
                Ok(sqlx::query_as::<_, RoundRow>(
                    "INSERT INTO rounds (federation_id, kind, state, base_round_id, lora_json, \
                     training_json, strategy, deadline_ms, created_ms, trained) \
                     VALUES ($1, $2, 'open', $3, $4, $5, $6, $7, $8, $9) RETURNING *",
                )
                .bind(round.federation_id)
                .bind(&round.kind)
                .bind(round.base_round_id)
                .bind(&round.lora_json)
                .bind(&round.training_json)
                .bind(&round.strategy)
                .bind(round.deadline_ms)
                .bind(round.now_ms)
                .bind(&round.trained)
                .fetch_one(&self.pool)
                .await?)
            }

            async fn get_round(&self, round_id: i64) -> StoreResult<Option<RoundRow>> {
                Ok(
                    sqlx::query_as::<_, RoundRow>("SELECT * FROM rounds WHERE id = $1")
                        .bind(round_id)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            async fn latest_round(&self, federation_id: i64) -> StoreResult<Option<RoundRow>> {
                Ok(sqlx::query_as::<_, RoundRow>(
                    "SELECT * FROM rounds WHERE federation_id = $1 ORDER BY id DESC LIMIT 1",
                )
                .bind(federation_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_rounds(
                &self,
                federation_id: i64,
                limit: i64,
            ) -> StoreResult<Vec<RoundRow>> {
                Ok(sqlx::query_as::<_, RoundRow>(
                    "SELECT * FROM rounds WHERE federation_id = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(federation_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn transition_round(
                &self,
                round_id: i64,
                from: &str,
                to: &str,
                failure: Option<&str>,
                now_ms: i64,
            ) -> StoreResult<bool> {
                let finishes = to == "closed" || to == "failed";
                let result = sqlx::query(
                    "UPDATE rounds SET state = $3, \
                     closed_ms = CASE WHEN $4 THEN $5 ELSE closed_ms END, \
                     failure = CASE WHEN $4 THEN $6 ELSE failure END \
                     WHERE id = $1 AND state = $2",
                )
                .bind(round_id)
                .bind(from)
                .bind(to)
                .bind(finishes)
                .bind(now_ms)
                .bind(failure)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn insert_task(&self, task: &TaskRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO tasks (id, round_id, client_id, rank, created_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&task.id)
                .bind(task.round_id)
                .bind(task.client_id)
                .bind(task.rank)
                .bind(task.created_ms)
                .execute(&self.pool)
                .await
                .map_err(conflict_if_unique("task already exists for this client and round"))?;
                Ok(())
            }

            async fn get_task(&self, task_id: &str) -> StoreResult<Option<TaskRow>> {
                Ok(sqlx::query_as::<_, TaskRow>("SELECT * FROM tasks WHERE id = $1")
                    .bind(task_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn task_for_client(
                &self,
                round_id: i64,
                client_id: i64,
            ) -> StoreResult<Option<TaskRow>> {
                Ok(sqlx::query_as::<_, TaskRow>(
                    "SELECT * FROM tasks WHERE round_id = $1 AND client_id = $2",
                )
                .bind(round_id)
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_tasks(&self, round_id: i64) -> StoreResult<Vec<TaskRow>> {
                Ok(sqlx::query_as::<_, TaskRow>(
                    "SELECT * FROM tasks WHERE round_id = $1 ORDER BY created_ms, client_id",
                )
                .bind(round_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn insert_update(&self, update: &NewUpdate) -> StoreResult<UpdateRow> {
                // One statement, so metadata and bytes commit together.
                let size_bytes = i64::try_from(update.bytes.len()).unwrap_or(i64::MAX);
                sqlx::query_as::<_, UpdateRow>(concat!(
                    "INSERT INTO updates (task_id, round_id, client_id, num_examples, sha256, \
                     size_bytes, bytes, train_loss, local_eval_loss, local_eval_tokens, steps, \
                     tokens, train_seconds, received_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                     RETURNING ",
                    update_columns!()
                ))
                .bind(&update.task_id)
                .bind(update.round_id)
                .bind(update.client_id)
                .bind(update.num_examples)
                .bind(&update.sha256)
                .bind(size_bytes)
                .bind(&update.bytes)
                .bind(update.train_loss)
                .bind(update.local_eval_loss)
                .bind(update.local_eval_tokens)
                .bind(update.steps)
                .bind(update.tokens)
                .bind(update.train_seconds)
                .bind(update.now_ms)
                .fetch_one(&self.pool)
                .await
                .map_err(conflict_if_unique("update already exists for this task"))
            }

            async fn update_for_task(&self, task_id: &str) -> StoreResult<Option<UpdateRow>> {
                Ok(sqlx::query_as::<_, UpdateRow>(concat!(
                    "SELECT ",
                    update_columns!(),
                    " FROM updates WHERE task_id = $1"
                ))
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_updates(&self, round_id: i64) -> StoreResult<Vec<UpdateRow>> {
                Ok(sqlx::query_as::<_, UpdateRow>(concat!(
                    "SELECT ",
                    update_columns!(),
                    " FROM updates WHERE round_id = $1 ORDER BY id"
                ))
                .bind(round_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn update_bytes(&self, update_id: i64) -> StoreResult<Option<Vec<u8>>> {
                let bytes: Option<Option<Vec<u8>>> =
                    sqlx::query_scalar("SELECT bytes FROM updates WHERE id = $1")
                        .bind(update_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(bytes.flatten())
            }

            async fn commit_aggregate(
                &self,
                adapter: &GlobalAdapterRow,
                keep_updates: bool,
            ) -> StoreResult<()> {
                let mut transaction = self.pool.begin().await?;
                // Compare-and-set first: it takes the round's row lock, so two committers of the
                // same round serialise and the second one finds it closed.
                let closed = sqlx::query(
                    "UPDATE rounds SET state = 'closed', closed_ms = $2 \
                     WHERE id = $1 AND state = 'aggregating'",
                )
                .bind(adapter.round_id)
                .bind(adapter.created_ms)
                .execute(&mut *transaction)
                .await?;
                if closed.rows_affected() == 0 {
                    // Dropping the transaction rolls it back.
                    return Err(StoreError::Conflict(format!(
                        "round {} is not aggregating",
                        adapter.round_id
                    )));
                }
                sqlx::query(
                    "INSERT INTO global_adapters \
                     (round_id, sha256, bytes, num_updates, num_examples, created_ms, \
                     optimizer_state) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(adapter.round_id)
                .bind(&adapter.sha256)
                .bind(&adapter.bytes)
                .bind(adapter.num_updates)
                .bind(adapter.num_examples)
                .bind(adapter.created_ms)
                .bind(&adapter.optimizer_state)
                .execute(&mut *transaction)
                .await
                .map_err(conflict_if_unique("global adapter already exists for this round"))?;
                if !keep_updates {
                    sqlx::query("UPDATE updates SET bytes = NULL WHERE round_id = $1")
                        .bind(adapter.round_id)
                        .execute(&mut *transaction)
                        .await?;
                }
                transaction.commit().await?;
                Ok(())
            }

            async fn global_adapter(
                &self,
                round_id: i64,
            ) -> StoreResult<Option<GlobalAdapterRow>> {
                Ok(sqlx::query_as::<_, GlobalAdapterRow>(
                    "SELECT * FROM global_adapters WHERE round_id = $1",
                )
                .bind(round_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn insert_evaluation(&self, evaluation: &EvaluationRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO evaluations (task_id, round_id, client_id, adapter_round_id, \
                     eval_loss, num_tokens, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&evaluation.task_id)
                .bind(evaluation.round_id)
                .bind(evaluation.client_id)
                .bind(evaluation.adapter_round_id)
                .bind(evaluation.eval_loss)
                .bind(evaluation.num_tokens)
                .bind(evaluation.created_ms)
                .execute(&self.pool)
                .await
                .map_err(conflict_if_unique("evaluation already exists for this task"))?;
                Ok(())
            }

            async fn list_evaluations(&self, round_id: i64) -> StoreResult<Vec<EvaluationRow>> {
                Ok(sqlx::query_as::<_, EvaluationRow>(
                    "SELECT * FROM evaluations WHERE round_id = $1 ORDER BY created_ms, client_id",
                )
                .bind(round_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn record_audit(
                &self,
                federation_id: Option<i64>,
                client_id: Option<i64>,
                kind: &str,
                detail: &str,
                now_ms: i64,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO audit_events (federation_id, client_id, kind, detail, created_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(federation_id)
                .bind(client_id)
                .bind(kind)
                .bind(detail)
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn list_audit(&self, limit: i64) -> StoreResult<Vec<AuditRow>> {
                Ok(sqlx::query_as::<_, AuditRow>(
                    "SELECT * FROM audit_events ORDER BY id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn revoke_certificate(&self, revoked: &RevokedRow) -> StoreResult<bool> {
                let result = sqlx::query(
                    "INSERT INTO revoked_certificates (serial, name, reason, revoked_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (serial) DO NOTHING",
                )
                .bind(&revoked.serial)
                .bind(&revoked.name)
                .bind(&revoked.reason)
                .bind(revoked.revoked_ms)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn is_revoked(&self, serial: &str) -> StoreResult<bool> {
                let found: Option<(String,)> =
                    sqlx::query_as("SELECT serial FROM revoked_certificates WHERE serial = $1")
                        .bind(serial)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(found.is_some())
            }

            async fn list_revoked(&self) -> StoreResult<Vec<RevokedRow>> {
                Ok(sqlx::query_as::<_, RevokedRow>(
                    "SELECT * FROM revoked_certificates ORDER BY revoked_ms, serial",
                )
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}

impl_store!(PgStore, PgPool);
impl_store!(SqliteStore, SqlitePool);
