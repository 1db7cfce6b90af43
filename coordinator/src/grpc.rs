//! The gRPC boundary: the `Federation` and `Admin` services. This is the only module that touches
//! generated proto types; it converts them to domain types, calls the [`Coordinator`], and maps
//! every [`CoordinatorError`] to a specific status with [`to_status`]. Every refused client call is
//! also written to the audit log.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fedlora_proto::CHUNK_BYTES;
use fedlora_proto::adapter::{Factor, ModelDims};
use fedlora_proto::v1::admin_server::Admin;
use fedlora_proto::v1::federation_server::Federation;
use fedlora_proto::v1::{self as pb, next_task_response, submit_update_request};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::error;

use crate::aggregate::Trained;
use crate::limits::{Hit, Limits};
use crate::pki::{self, PeerIdentity, Role};
use crate::rounds::{
    Coordinator, CoordinatorError, HeldFactors, JoinRequest, NextTask, RoundKind, RoundSummary,
    UpdateMetrics, UpdateSubmission,
};
use crate::tls::PeerInfo;

/// Longest a `NextTask` long poll is held open, whatever the client asks.
const MAX_LONG_POLL: Duration = Duration::from_secs(30);

/// Maps a coordinator error to the gRPC status a client sees. Internal failures are not described
/// to the caller (they are logged here).
pub fn to_status(error: &CoordinatorError) -> Status {
    use CoordinatorError as E;
    let code = match error {
        E::InvalidJoin(_) | E::InvalidUpdate(_) => Code::InvalidArgument,
        E::UnknownClient(_) | E::UnknownTask(_) | E::NoSuchAdapter(_) => Code::NotFound,
        E::NotYourTask(_) | E::Forbidden(_) => Code::PermissionDenied,
        E::Unauthenticated(_) => Code::Unauthenticated,
        E::ModelMismatch(_)
        | E::MissingFeatures(_)
        | E::StaleRound { .. }
        | E::WrongTaskKind { .. }
        | E::ConfigChanged { .. } => Code::FailedPrecondition,
        E::AlreadySubmitted(_) => Code::AlreadyExists,
        E::TooLarge { .. } | E::RateLimited(_) => Code::ResourceExhausted,
        E::Store(_) | E::Aggregate(_) | E::Corrupt(_) => {
            error!(%error, "internal error");
            return Status::internal("internal error; see the coordinator's log");
        }
    };
    Status::new(code, error.to_string())
}

fn is_refusal(error: &CoordinatorError) -> bool {
    !matches!(
        error,
        CoordinatorError::Store(_) | CoordinatorError::Aggregate(_) | CoordinatorError::Corrupt(_)
    )
}

/// How the services know their callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication {
    /// Every call must come over a mutual-TLS connection ([`PeerInfo`] with a certificate of
    /// the federation's CA); anything else is refused.
    MutualTls,
    /// Plaintext on loopback (`--insecure`): callers have no identity and nothing is checked.
    /// Only `server::serve` chooses it, and only on a loopback address.
    InsecureLoopback,
}

/// The caller of an RPC, from the client certificate its TLS handshake verified: refuses a call
/// without one, with an expired or revoked one, from the wrong role for `service`, or over the
/// caller's rate limit. `None` only under [`Authentication::InsecureLoopback`]. Refusals before
/// the caller is known are audited at a bounded rate per address.
async fn authenticate(
    coordinator: &Coordinator,
    mode: Authentication,
    extensions: &tonic::Extensions,
    service: Role,
    rpc: &str,
) -> Result<Option<PeerIdentity>, Status> {
    if mode == Authentication::InsecureLoopback {
        return Ok(None);
    }
    let peer = extensions.get::<PeerInfo>();
    let checked = async {
        let der = peer
            .and_then(|peer| peer.certificate.as_ref())
            .ok_or_else(|| {
                CoordinatorError::Unauthenticated(
                    "no client certificate: the coordinator accepts only callers with a certificate from the federation's ca".into(),
                )
            })?;
        let identity = pki::identify(der).map_err(|error| {
            CoordinatorError::Unauthenticated(format!("unusable client certificate: {error}"))
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs() as i64);
        if now > identity.not_after_unix {
            return Err(CoordinatorError::Unauthenticated(format!(
                "the certificate of {:?} has expired",
                identity.name
            )));
        }
        let federation = &coordinator.config().name;
        if identity.federation != *federation {
            return Err(CoordinatorError::Forbidden(format!(
                "the certificate of {:?} is for federation {:?}; this coordinator serves {federation:?}",
                identity.name, identity.federation
            )));
        }
        if coordinator.is_revoked(&identity.serial).await? {
            return Err(CoordinatorError::Unauthenticated(format!(
                "the certificate {} of {:?} is revoked",
                identity.serial, identity.name
            )));
        }
        if identity.role != service {
            let allowed = match service {
                Role::Admin => "admin",
                Role::Client | Role::Coordinator => "federation",
            };
            return Err(CoordinatorError::Forbidden(format!(
                "the {} certificate of {:?} may not call the {allowed} service",
                identity.role, identity.name
            )));
        }
        Ok(identity)
    };
    let identity = match checked.await {
        Ok(identity) => identity,
        Err(error) => {
            if is_refusal(&error) {
                coordinator
                    .audit_stranger(peer.and_then(|peer| peer.remote), rpc, &error)
                    .await;
            }
            return Err(to_status(&error));
        }
    };
    match coordinator.admit_request(&identity.name) {
        Hit::Allowed => Ok(Some(identity)),
        hit => {
            let error = CoordinatorError::RateLimited(format!(
                "{:?} made more than {} calls in a minute; slow down",
                identity.name,
                coordinator.limits().requests_per_minute
            ));
            // One audit row per caller and minute, however hard it pushes.
            if hit == Hit::FirstRefusal {
                coordinator.audit_rejection(None, rpc, &error).await;
            }
            Err(to_status(&error))
        }
    }
}

fn parse_client_id(client_id: &str) -> Result<i64, CoordinatorError> {
    client_id
        .parse()
        .map_err(|_| CoordinatorError::UnknownClient(-1))
}

fn lora_to_pb(lora: &fedlora_proto::adapter::LoraSpec) -> pb::LoraConfig {
    lora.into()
}

/// Clients' service.
pub struct FederationService {
    coordinator: Arc<Coordinator>,
    mode: Authentication,
}

impl FederationService {
    pub fn new(coordinator: Arc<Coordinator>, mode: Authentication) -> Self {
        Self { coordinator, mode }
    }

    /// Authenticates a site's call for `client_id` (from the request): its certificate, and that
    /// the client is the certificate's. Returns the parsed client id.
    async fn authorize(
        &self,
        extensions: &tonic::Extensions,
        client_id: &str,
        rpc: &str,
    ) -> Result<i64, Status> {
        let caller =
            authenticate(&self.coordinator, self.mode, extensions, Role::Client, rpc).await?;
        let client_id = parse_client_id(client_id).map_err(|error| to_status(&error))?;
        if let Some(caller) = caller
            && let Err(error) = self
                .coordinator
                .check_client_owner(client_id, &caller.name)
                .await
        {
            // Audited without a client id: the id named belongs to someone else.
            return Err(self.refuse(None, rpc, error).await);
        }
        Ok(client_id)
    }

    /// Audits a refusal and converts it to a status.
    async fn refuse(&self, client_id: Option<i64>, rpc: &str, error: CoordinatorError) -> Status {
        if is_refusal(&error) {
            self.coordinator
                .audit_rejection(client_id, rpc, &error)
                .await;
        }
        to_status(&error)
    }

    /// Reads an upload: the header, early permission checks (the client is the caller's, the task
    /// the client's), then at most `total_bytes` of
    /// chunks within `Limits::upload_timeout`. Refusals come back as `(client_id if known, error)`.
    async fn receive_update(
        &self,
        mut stream: Streaming<pb::SubmitUpdateRequest>,
        caller: Option<PeerIdentity>,
    ) -> Result<UpdateSubmission, (Option<i64>, CoordinatorError, Status)> {
        let limit = self.coordinator.config().max_update_bytes;
        let limits = self.coordinator.limits().clone();
        let max_chunks = limits.max_update_chunks;
        let upload_timeout = limits.upload_timeout;
        let plain = |status: Status| {
            let error = CoordinatorError::InvalidUpdate(status.message().to_string());
            (None, error, status)
        };
        let header = match next_part(&mut stream, &limits).await.map_err(plain)? {
            Some(submit_update_request::Part::Header(header)) => header,
            _ => {
                return Err(plain(Status::invalid_argument(
                    "the first message of an upload must be its header",
                )));
            }
        };
        let client_id = parse_client_id(&header.client_id).map_err(|error| {
            let status = to_status(&error);
            (None, error, status)
        })?;
        let refuse = |error: CoordinatorError| {
            let status = to_status(&error);
            (Some(client_id), error, status)
        };
        if let Some(caller) = &caller
            && let Err(error) = self
                .coordinator
                .check_client_owner(client_id, &caller.name)
                .await
        {
            let status = to_status(&error);
            return Err((None, error, status));
        }
        if header.total_bytes > limit {
            return Err(refuse(CoordinatorError::TooLarge {
                size: header.total_bytes,
                limit,
            }));
        }
        self.coordinator
            .check_upload(client_id, &header.task_id, header.total_bytes)
            .await
            .map_err(refuse)?;
        let total = header.total_bytes;
        let body = async {
            // Grow with the bytes that actually arrive, never with what the header claims.
            let mut bytes = Vec::with_capacity(total.min(4 * CHUNK_BYTES as u64) as usize);
            let mut chunks = 0u32;
            while let Some(part) = next_part(&mut stream, &limits).await? {
                chunks += 1;
                if chunks > max_chunks {
                    return Err(Status::resource_exhausted(format!(
                        "upload in more than {max_chunks} chunks"
                    )));
                }
                let submit_update_request::Part::Chunk(chunk) = part else {
                    return Err(Status::invalid_argument("a second header in one upload"));
                };
                if bytes.len() as u64 + chunk.len() as u64 > total {
                    return Err(Status::invalid_argument(
                        "upload is longer than the total_bytes its header announced",
                    ));
                }
                bytes.extend_from_slice(&chunk);
            }
            if bytes.len() as u64 != total {
                return Err(Status::invalid_argument(format!(
                    "upload truncated: received {} of {total} bytes",
                    bytes.len()
                )));
            }
            Ok(bytes)
        };
        let bytes = match tokio::time::timeout(upload_timeout, body).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(status)) => {
                let error = CoordinatorError::InvalidUpdate(status.message().to_string());
                return Err((Some(client_id), error, status));
            }
            Err(_) => {
                let status =
                    Status::deadline_exceeded("upload did not complete within its deadline");
                let error = CoordinatorError::InvalidUpdate(status.message().to_string());
                return Err((Some(client_id), error, status));
            }
        };
        let metrics = header.metrics.unwrap_or_default();
        Ok(UpdateSubmission {
            client_id,
            task_id: header.task_id,
            num_examples: header.num_examples,
            claimed_sha256: header.sha256,
            bytes,
            metrics: UpdateMetrics {
                steps: metrics.steps,
                tokens: metrics.tokens,
                train_loss: metrics.train_loss,
                eval_loss: metrics.eval_loss,
                seconds: metrics.seconds,
                eval_tokens: metrics.eval_tokens,
            },
        })
    }
}

async fn next_part(
    stream: &mut Streaming<pb::SubmitUpdateRequest>,
    limits: &Limits,
) -> Result<Option<submit_update_request::Part>, Status> {
    let idle = limits.upload_idle_timeout;
    match tokio::time::timeout(idle, stream.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "upload stalled: no data for {} s",
            idle.as_secs_f64()
        ))),
        // tonic refuses a message over `max_decoding_message_size` before buffering it.
        Ok(Err(status)) if status.code() == Code::OutOfRange => {
            Err(Status::resource_exhausted(format!(
                "upload message larger than the limit of {} bytes",
                limits.max_message_bytes
            )))
        }
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(message))) => message
            .part
            .map(Some)
            .ok_or_else(|| Status::invalid_argument("an upload message without header or chunk")),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AdapterChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let caller = authenticate(
            &self.coordinator,
            self.mode,
            request.extensions(),
            Role::Client,
            "join",
        )
        .await?;
        let mut request = request.into_inner();
        if let Some(caller) = caller {
            // The site's name is its certificate's; a different claim is refused.
            if !request.client_name.is_empty() && request.client_name != caller.name {
                let error = CoordinatorError::Forbidden(format!(
                    "client_name {:?} does not match the certificate's name {:?}",
                    request.client_name, caller.name
                ));
                return Err(self.refuse(None, "join", error).await);
            }
            request.client_name = caller.name;
        }
        let shape = request.model_shape.unwrap_or_default();
        let join = JoinRequest {
            client_name: request.client_name,
            max_rank: request.max_rank as usize,
            num_examples: request.num_examples,
            base_model_fingerprint: request.base_model_fingerprint,
            model_dims: ModelDims::from(shape),
            lora_features: request.lora_features,
        };
        let client = match self.coordinator.join(&join).await {
            Ok(client) => client,
            Err(error) => return Err(self.refuse(None, "join", error).await),
        };
        let config = self.coordinator.config();
        Ok(Response::new(pb::JoinResponse {
            client_id: client.id.to_string(),
            federation_name: config.name.clone(),
            lora: Some(lora_to_pb(&config.lora)),
            rounds_total: config.rounds,
            strategy: config.strategy.clone(),
            seq_len: config.training.seq_len,
        }))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let client_id = self
            .authorize(
                request.extensions(),
                &request.get_ref().client_id,
                "next_task",
            )
            .await?;
        let request = request.into_inner();
        let wait = Duration::from_millis(u64::from(request.wait_ms)).min(MAX_LONG_POLL);
        let next = match self.coordinator.next_task(client_id, wait).await {
            Ok(next) => next,
            Err(error) => return Err(self.refuse(Some(client_id), "next_task", error).await),
        };
        let kind = match next {
            NextTask::Task(task) => next_task_response::Kind::Task(pb::Task {
                task_id: task.task_id,
                round_id: task.round_id as u64,
                kind: match task.kind {
                    RoundKind::Train => pb::TaskKind::Train,
                    RoundKind::Evaluate => pb::TaskKind::Evaluate,
                } as i32,
                lora: Some(lora_to_pb(&task.lora)),
                global_adapter_round: task.base_round_id.map_or(0, |round| round as u64),
                training: Some(pb::TrainingParams {
                    local_steps: task.training.local_steps,
                    learning_rate: task.training.learning_rate,
                    batch_size: task.training.batch_size,
                    seq_len: task.training.seq_len,
                    seed: task.seed,
                    warmup_steps: task.training.warmup_steps,
                    cosine_decay: task.training.cosine_decay,
                    max_grad_norm: task.training.max_grad_norm,
                    grad_accumulation: task.training.grad_accumulation,
                }),
                deadline_unix_ms: task.deadline_ms,
                trained: match task.trained {
                    Trained::Both => pb::TrainedFactors::Both,
                    Trained::A => pb::TrainedFactors::A,
                    Trained::B => pb::TrainedFactors::B,
                } as i32,
            }),
            NextTask::Wait { retry_after_ms } => {
                next_task_response::Kind::Wait(pb::Wait { retry_after_ms })
            }
            NextTask::Finished { reason } => {
                next_task_response::Kind::Finished(pb::Finished { reason })
            }
        };
        Ok(Response::new(pb::NextTaskResponse { kind: Some(kind) }))
    }

    type DownloadAdapterStream = ChunkStream;

    async fn download_adapter(
        &self,
        request: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let client_id = self
            .authorize(
                request.extensions(),
                &request.get_ref().client_id,
                "download_adapter",
            )
            .await?;
        let request = request.into_inner();
        let round_id = i64::try_from(request.round_id)
            .map_err(|_| to_status(&CoordinatorError::NoSuchAdapter(-1)))?;
        let held = HeldFactors {
            a: Some(request.held_lora_a_digest).filter(|digest| !digest.is_empty()),
            b: Some(request.held_lora_b_digest).filter(|digest| !digest.is_empty()),
        };
        let adapter = match self
            .coordinator
            .global_adapter(client_id, round_id, &held)
            .await
        {
            Ok(adapter) => adapter,
            Err(error) => {
                return Err(self
                    .refuse(Some(client_id), "download_adapter", error)
                    .await);
            }
        };
        let total_bytes = adapter.bytes.len() as u64;
        let chunks: Vec<Result<pb::AdapterChunk, Status>> = adapter
            .bytes
            .chunks(CHUNK_BYTES)
            .enumerate()
            .map(|(index, chunk)| {
                Ok(pb::AdapterChunk {
                    data: chunk.to_vec(),
                    total_bytes: if index == 0 { total_bytes } else { 0 },
                    sha256: if index == 0 {
                        adapter.sha256.clone()
                    } else {
                        String::new()
                    },
                    omits_lora_a: index == 0 && adapter.omitted.contains(&Factor::A),
                    omits_lora_b: index == 0 && adapter.omitted.contains(&Factor::B),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::SubmitReceipt>, Status> {
        let caller = authenticate(
            &self.coordinator,
            self.mode,
            request.extensions(),
            Role::Client,
            "submit_update",
        )
        .await?;
        let submission = match self.receive_update(request.into_inner(), caller).await {
            Ok(submission) => submission,
            Err((client_id, error, status)) => {
                if is_refusal(&error) {
                    self.coordinator
                        .audit_rejection(client_id, "submit_update", &error)
                        .await;
                }
                return Err(status);
            }
        };
        let client_id = submission.client_id;
        match self.coordinator.submit_update(submission).await {
            Ok(receipt) => Ok(Response::new(pb::SubmitReceipt {
                update_id: receipt.update_id.to_string(),
                round_id: receipt.round_id as u64,
                sha256: receipt.sha256,
            })),
            Err(error) => Err(self.refuse(Some(client_id), "submit_update", error).await),
        }
    }

    async fn submit_evaluation(
        &self,
        request: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
        let client_id = self
            .authorize(
                request.extensions(),
                &request.get_ref().client_id,
                "submit_evaluation",
            )
            .await?;
        let request = request.into_inner();
        match self
            .coordinator
            .submit_evaluation(
                client_id,
                &request.task_id,
                request.eval_loss,
                request.num_eval_tokens,
            )
            .await
        {
            Ok(()) => Ok(Response::new(pb::SubmitEvaluationResponse {})),
            Err(error) => Err(self
                .refuse(Some(client_id), "submit_evaluation", error)
                .await),
        }
    }
}

/// Operators' service.
pub struct AdminService {
    coordinator: Arc<Coordinator>,
    mode: Authentication,
}

impl AdminService {
    pub fn new(coordinator: Arc<Coordinator>, mode: Authentication) -> Self {
        Self { coordinator, mode }
    }
}

fn round_to_pb(summary: RoundSummary) -> pb::RoundInfo {
    let round = summary.round;
    pb::RoundInfo {
        round_id: round.id as u64,
        kind: round.kind,
        state: round.state,
        tasks: summary.tasks,
        updates: summary.updates,
        examples: summary.examples,
        mean_train_loss: summary.mean_train_loss,
        mean_eval_loss: summary.mean_eval_loss,
        created_unix_ms: round.created_ms,
        closed_unix_ms: round.closed_ms.unwrap_or(0),
        failure: round.failure.unwrap_or_default(),
        base_round_id: round.base_round_id.map_or(0, |base| base as u64),
        clients: summary
            .clients
            .into_iter()
            .map(|client| pb::ClientMetric {
                client_name: client.client_name,
                eval_loss: client.eval_loss,
                train_loss: client.train_loss,
                num_examples: client.num_examples,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        authenticate(
            &self.coordinator,
            self.mode,
            request.extensions(),
            Role::Admin,
            "get_status",
        )
        .await?;
        let status = self
            .coordinator
            .status()
            .await
            .map_err(|error| to_status(&error))?;
        let current = status.current_round.as_ref();
        Ok(Response::new(pb::StatusResponse {
            federation_name: status.federation.name,
            state: status.federation.state,
            strategy: status.config.strategy.clone(),
            rounds_total: status.config.rounds,
            rounds_closed: status.rounds_closed,
            current_round: current.map_or(0, |round| round.id as u64),
            current_round_state: current
                .map(|round| format!("{} ({})", round.state, round.kind))
                .unwrap_or_default(),
            clients_joined: status.clients_joined,
            min_clients: status.config.min_clients,
            lora: Some(lora_to_pb(&status.config.lora)),
        }))
    }

    async fn list_rounds(
        &self,
        request: Request<pb::ListRoundsRequest>,
    ) -> Result<Response<pb::ListRoundsResponse>, Status> {
        authenticate(
            &self.coordinator,
            self.mode,
            request.extensions(),
            Role::Admin,
            "list_rounds",
        )
        .await?;
        let limit = match request.into_inner().limit {
            0 => 50,
            limit => limit.min(1000),
        };
        let rounds = self
            .coordinator
            .rounds(limit)
            .await
            .map_err(|error| to_status(&error))?;
        Ok(Response::new(pb::ListRoundsResponse {
            rounds: rounds.into_iter().map(round_to_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::config::FederationConfig;
    use crate::pki::{CertificateAuthority, IssueRequest};
    use crate::store::RevokedRow;

    /// The extensions a call from 10.0.0.7 gets, with `certificate` as its verified leaf.
    fn call_from(certificate: Option<&CertificateDer<'static>>) -> tonic::Extensions {
        let mut extensions = tonic::Extensions::new();
        extensions.insert(PeerInfo {
            remote: Some(([10, 0, 0, 7], 40_000).into()),
            certificate: certificate.map(|der| Arc::new(der.to_vec())),
        });
        extensions
    }

    /// What the handshake cannot see: a certificate that expired on an open connection (or a
    /// resumed session), one revoked since, a missing one, one of the wrong role. Each call
    /// checks them itself, fails closed and audits the refusal.
    #[tokio::test]
    async fn every_call_checks_its_certificate() {
        let store = crate::store::connect("sqlite::memory:").await.unwrap();
        let coordinator = Coordinator::start(store.clone(), FederationConfig::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(&dir.path().join("ca"), "default", 30).unwrap();
        let issue_by = |ca: &CertificateAuthority, request: IssueRequest| {
            let issued = ca.issue(&request).unwrap();
            let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
            (der, issued.record.serial)
        };
        let issue = |request: IssueRequest| issue_by(&ca, request);
        // A CA shared with another federation would pass the handshake; its certificates name
        // their federation.
        let neighbours =
            CertificateAuthority::init(&dir.path().join("other"), "other", 30).unwrap();
        let (neighbour, _) = issue_by(&neighbours, IssueRequest::new("clinic", Role::Client, 5));
        let (site, _) = issue(IssueRequest::new("clinic", Role::Client, 5));
        let (lapsed, _) = issue(IssueRequest {
            valid_from_secs: -3 * 86_400,
            valid_for_secs: 86_400,
            ..IssueRequest::new("lapsed", Role::Client, 1)
        });
        let (operator, _) = issue(IssueRequest::new("ops", Role::Admin, 5));
        let (leaver, leaver_serial) = issue(IssueRequest::new("leaver", Role::Client, 5));
        let check = |extensions: tonic::Extensions, service: Role| {
            let coordinator = coordinator.clone();
            async move {
                authenticate(
                    &coordinator,
                    Authentication::MutualTls,
                    &extensions,
                    service,
                    "join",
                )
                .await
            }
        };

        let caller = check(call_from(Some(&site)), Role::Client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (caller.name.as_str(), caller.role),
            ("clinic", Role::Client)
        );

        let refusals = [
            (
                call_from(Some(&lapsed)),
                Role::Client,
                Code::Unauthenticated,
                "the certificate of \"lapsed\" has expired",
            ),
            (
                call_from(None),
                Role::Client,
                Code::Unauthenticated,
                "no client certificate",
            ),
            (
                tonic::Extensions::new(),
                Role::Client,
                Code::Unauthenticated,
                "no client certificate",
            ),
            (
                call_from(Some(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]))),
                Role::Client,
                Code::Unauthenticated,
                "unusable client certificate",
            ),
            (
                call_from(Some(&operator)),
                Role::Client,
                Code::PermissionDenied,
                "the admin certificate of \"ops\" may not call the federation service",
            ),
            (
                call_from(Some(&site)),
                Role::Admin,
                Code::PermissionDenied,
                "may not call the admin service",
            ),
            (
                call_from(Some(&neighbour)),
                Role::Client,
                Code::PermissionDenied,
                "the certificate of \"clinic\" is for federation \"other\"; this coordinator serves \"default\"",
            ),
        ];
        for (extensions, service, code, message) in refusals {
            let status = check(extensions, service).await.unwrap_err();
            assert_eq!(status.code(), code, "{message}: {status:?}");
            assert!(status.message().contains(message), "{status:?}");
        }

        // Revoked after the handshake: the next call is refused.
        check(call_from(Some(&leaver)), Role::Client).await.unwrap();
        store
            .revoke_certificate(&RevokedRow {
                serial: leaver_serial.clone(),
                name: "leaver".into(),
                reason: "left".into(),
                revoked_ms: 1,
            })
            .await
            .unwrap();
        let status = check(call_from(Some(&leaver)), Role::Client)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("is revoked"), "{status:?}");

        let audit = store.list_audit(50).await.unwrap();
        for needle in [
            "has expired",
            "no client certificate",
            "may not call",
            "is for federation",
            "is revoked",
        ] {
            assert!(
                audit
                    .iter()
                    .any(|row| row.detail.contains(needle) && row.detail.contains("10.0.0.7")),
                "no audit row for {needle:?}: {audit:#?}"
            );
        }
        // Plaintext on loopback has no identities and checks nothing.
        let anyone = authenticate(
            &coordinator,
            Authentication::InsecureLoopback,
            &tonic::Extensions::new(),
            Role::Client,
            "join",
        )
        .await
        .unwrap();
        assert!(anyone.is_none());
    }
}
