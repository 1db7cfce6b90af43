//! The daemon against a scripted coordinator that misbehaves: a real gRPC server on loopback
//! whose answers each test writes (the coordinator's own tests cover the honest one, and every
//! federation test runs the normal path). Each refusal must be the specific one, and a site must
//! never hang on, or fill its memory for, a coordinator's word.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedlora_proto::adapter::{LoraSpec, adapter_spec, sha256_hex};
use fedlora_proto::factors::initial_factors;
use fedlora_proto::tensor_bytes::max_update_len;
use fedlora_proto::v1::federation_client::FederationClient;
use fedlora_proto::v1::federation_server::{Federation, FederationServer};
use fedlora_proto::v1::{self as pb, next_task_response};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{ClientTransport, DaemonConfig, DaemonEvent, download, is_transient, retry_delay, run};
use crate::error::ClientError;
use crate::model::BasePrecision;
use crate::tiny::{TinyModelSpec, write_tiny_model};

/// What one `DownloadAdapter` call streams.
enum Serve {
    Chunks(Vec<pb::AdapterChunk>),
    /// The chunks, then nothing, with the stream held open.
    ChunksThenStall(Vec<pb::AdapterChunk>),
}

/// The coordinator's script, and what the daemon sent it.
#[derive(Default)]
struct Script {
    join_seq_len: u32,
    tasks: Mutex<VecDeque<next_task_response::Kind>>,
    downloads: Mutex<VecDeque<Serve>>,
    calls: Mutex<Vec<&'static str>>,
    evaluations: Mutex<Vec<pb::SubmitEvaluationRequest>>,
}

impl Script {
    fn called(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }
}

#[derive(Clone)]
struct Scripted(Arc<Script>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AdapterChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Scripted {
    async fn join(
        &self,
        _: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.0.called("join");
        Ok(Response::new(pb::JoinResponse {
            client_id: "site-1".into(),
            federation_name: "scripted".into(),
            seq_len: self.0.join_seq_len,
            ..Default::default()
        }))
    }

    async fn next_task(
        &self,
        _: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        self.0.called("next_task");
        let kind =
            self.0
                .tasks
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(next_task_response::Kind::Finished(pb::Finished {
                    reason: "script done".into(),
                }));
        Ok(Response::new(pb::NextTaskResponse { kind: Some(kind) }))
    }

    type DownloadAdapterStream = ChunkStream;

    async fn download_adapter(
        &self,
        _: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.0.called("download_adapter");
        let serve = self.0.downloads.lock().unwrap().pop_front();
        let stream: ChunkStream = match serve {
            Some(Serve::Chunks(chunks)) => Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok))),
            Some(Serve::ChunksThenStall(chunks)) => Box::pin(tokio_stream::StreamExt::chain(
                tokio_stream::iter(chunks.into_iter().map(Ok)),
                tokio_stream::pending(),
            )),
            None => return Err(Status::not_found("no adapter scripted")),
        };
        Ok(Response::new(stream))
    }

    async fn submit_update(
        &self,
        _: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::SubmitReceipt>, Status> {
        self.0.called("submit_update");
        Err(Status::unimplemented("the script takes no updates"))
    }

    async fn submit_evaluation(
        &self,
        request: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
        self.0.called("submit_evaluation");
        self.0
            .evaluations
            .lock()
            .unwrap()
            .push(request.into_inner());
        Ok(Response::new(pb::SubmitEvaluationResponse::default()))
    }
}

/// Serves `script` on a loopback port; returns its `http://` address.
async fn serve(script: Arc<Script>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FederationServer::new(Scripted(script)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{address}")
}

/// A site with the tiny model (context 256) and 30 short documents.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(&dir.path().join("model"), &TinyModelSpec::default()).unwrap();
        let data: String = (0..30)
            .map(|index| format!("{{\"text\": \"note {index}: the patient is well\"}}\n"))
            .collect();
        std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
        Self { dir }
    }

    fn config(&self, coordinator: String) -> DaemonConfig {
        DaemonConfig {
            coordinator,
            transport: ClientTransport::Insecure,
            client_name: "site".into(),
            model_dir: self.dir.path().join("model"),
            data_path: self.dir.path().join("data.jsonl"),
            text_column: "text".into(),
            state_dir: self.dir.path().join("state"),
            max_rank: 8,
            max_eval_windows: 4,
            base: BasePrecision::F32,
        }
    }
}

fn lora() -> LoraSpec {
    LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])
}

fn task(kind: i32, global_adapter_round: u64) -> next_task_response::Kind {
    next_task_response::Kind::Task(pb::Task {
        task_id: "task-1".into(),
        round_id: 1,
        kind,
        lora: Some((&lora()).into()),
        global_adapter_round,
        training: Some(pb::TrainingParams {
            local_steps: 1,
            learning_rate: 1e-3,
            batch_size: 2,
            seq_len: 16,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Runs the daemon against `script` to its end, with every event it reported.
async fn run_against(
    site: &Site,
    script: Arc<Script>,
) -> (Result<super::DaemonSummary, ClientError>, Vec<DaemonEvent>) {
    let url = serve(script).await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        run(
            site.config(url),
            Arc::new(move |event: &DaemonEvent| seen.lock().unwrap().push(event.clone())),
            std::future::pending(),
        ),
    )
    .await
    .expect("the daemon ends by itself");
    let events = events.lock().unwrap().clone();
    (outcome, events)
}

/// A task of a kind this client does not know stops the daemon with an error that says to
/// upgrade; it is not run as something else.
#[tokio::test]
async fn a_task_of_unknown_kind_is_refused() {
    let site = Site::new();
    let script = Arc::new(Script {
        tasks: Mutex::new([task(7, 0)].into()),
        ..Default::default()
    });
    let (outcome, _) = run_against(&site, script.clone()).await;
    let error = outcome.unwrap_err().to_string();
    assert!(
        error.contains("task of unknown kind 7 (upgrade the client)"),
        "{error}"
    );
    assert_eq!(*script.calls.lock().unwrap(), ["join", "next_task"]);
    // The same script with a known kind runs to its end: the refusal was the kind's.
    let script = Arc::new(Script {
        tasks: Mutex::new([task(pb::TaskKind::Evaluate as i32, 0)].into()),
        ..Default::default()
    });
    let (outcome, _) = run_against(&site, script.clone()).await;
    outcome.unwrap();
    assert_eq!(script.evaluations.lock().unwrap().len(), 1);
}

/// A task asking for a rank above the site's `--max-rank` (a pattern's rank counts) is refused
/// before anything is downloaded or trained.
#[tokio::test]
async fn a_rank_above_the_sites_max_is_refused() {
    let site = Site::new();
    let next_task_response::Kind::Task(mut wide) = task(pb::TaskKind::Train as i32, 1) else {
        unreachable!("task() makes a task");
    };
    let spec = LoraSpec {
        rank_pattern: vec![("v_proj".into(), 16)],
        ..lora()
    };
    wide.lora = Some((&spec).into());
    let script = Arc::new(Script {
        tasks: Mutex::new([next_task_response::Kind::Task(wide)].into()),
        ..Default::default()
    });
    let (outcome, _) = run_against(&site, script.clone()).await;
    let error = outcome.unwrap_err().to_string();
    assert!(
        error.contains("task asks for rank 16 above this site's max rank 8"),
        "{error}"
    );
    assert_eq!(*script.calls.lock().unwrap(), ["join", "next_task"]);
}

/// A federation whose sequence length the site's model cannot run is refused at join, before
/// the site asks for a task that it would take and fail.
#[tokio::test]
async fn a_sequence_longer_than_the_model_runs_is_refused_at_join() {
    let site = Site::new();
    let script = Arc::new(Script {
        join_seq_len: 257,
        ..Default::default()
    });
    let (outcome, _) = run_against(&site, script.clone()).await;
    let error = outcome.unwrap_err().to_string();
    assert!(
        error.contains("257 tokens") && error.contains("(256"),
        "{error}"
    );
    assert_eq!(*script.calls.lock().unwrap(), ["join"]);
}

/// A global adapter that makes the model overflow on the site's data (finite factors of 1e38)
/// gives a non-finite held-out loss: the coordinator is told that no loss was measured (it
/// would refuse the number, and the daemon with it), and the event says what happened. An
/// evaluation task is then done and the daemon goes on to the federation's end; a training
/// task stops with an error that names the adapter, before a step that would diverge, and
/// uploads nothing.
#[tokio::test]
async fn a_non_finite_held_out_loss_is_reported_as_not_measured() {
    let site = Site::new();
    let model =
        crate::model::BaseModel::load(&site.dir.path().join("model"), &candle_core::Device::Cpu)
            .unwrap();
    let mut adapter = initial_factors(&model.model.config().dims(), &lora(), 3).unwrap();
    for (name, tensor) in &mut adapter.tensors {
        if name.ends_with("lora_B.weight") {
            tensor.data.fill(1e38);
        }
    }
    let bytes = adapter.to_safetensors(None).unwrap();
    let chunk = pb::AdapterChunk {
        total_bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
        data: bytes,
        ..Default::default()
    };
    for kind in [pb::TaskKind::Evaluate, pb::TaskKind::Train] {
        let script = Arc::new(Script {
            tasks: Mutex::new([task(kind as i32, 1)].into()),
            downloads: Mutex::new([Serve::Chunks(vec![chunk.clone()])].into()),
            ..Default::default()
        });
        let (outcome, events) = run_against(&site, script.clone()).await;
        match kind {
            pb::TaskKind::Evaluate => {
                outcome.unwrap();
            }
            _ => {
                let error = outcome.unwrap_err();
                assert!(
                    matches!(&error, ClientError::Diverged(message)
                        if message.contains("the global adapter of round 1 overflows on this site")),
                    "{error}"
                );
            }
        }
        let evaluations = script.evaluations.lock().unwrap();
        assert_eq!(evaluations.len(), 1, "{kind:?}");
        assert_eq!(
            (evaluations[0].eval_loss, evaluations[0].num_eval_tokens),
            (0.0, 0),
            "{kind:?}"
        );
        assert!(
            !script.calls.lock().unwrap().contains(&"submit_update"),
            "{kind:?}"
        );
        assert!(
            events.iter().any(|event| matches!(
                event,
                DaemonEvent::NotFinite { round_id: 1, adapter_round: 1, loss } if !loss.is_finite()
            )),
            "{kind:?}: {events:?}"
        );
        assert!(
            !events.iter().any(|event| matches!(
                event,
                DaemonEvent::Evaluated { .. } | DaemonEvent::Step { .. }
            )),
            "{kind:?}: {events:?}"
        );
    }
}

/// An update whose last step makes the model overflow (a learning rate of 1e38: the step's
/// loss, computed before the update, is finite, and so are the factors) is not sent: it would
/// spoil the global adapter. The daemon stops with an error that says why, and uploads nothing.
/// (At 1e30 the activations stay finite and RMSNorm zeroes them: the held-out loss is then
/// ln(vocabulary), a finite number, and the update goes; only the coordinator's view of the
/// loss can tell.)
#[tokio::test]
async fn an_update_that_overflows_is_not_sent() {
    let site = Site::new();
    let next_task_response::Kind::Task(mut wild) = task(pb::TaskKind::Train as i32, 0) else {
        unreachable!("task() makes a task");
    };
    if let Some(training) = wild.training.as_mut() {
        training.learning_rate = 1e38;
    }
    let script = Arc::new(Script {
        tasks: Mutex::new([next_task_response::Kind::Task(wild)].into()),
        ..Default::default()
    });
    let (outcome, events) = run_against(&site, script.clone()).await;
    let error = outcome.unwrap_err();
    assert!(
        matches!(&error, ClientError::Diverged(message)
            if message.contains("the adapter trained in round 1 overflows")),
        "{error}"
    );
    // It trained (a finite step), and sent nothing.
    assert!(
        events.iter().any(|event| matches!(
            event,
            DaemonEvent::Step { step: 1, loss, .. } if loss.is_finite()
        )),
        "{events:?}"
    );
    assert_eq!(
        *script.calls.lock().unwrap(),
        ["join", "next_task", "submit_evaluation"]
    );
    assert!(!site.dir.path().join("state/round-1").exists());
}

/// Downloads are bounded: an announced or streamed length past the largest adapter of the
/// task's spec fails (before the bytes are held), so does a length or digest that does not
/// match, and a coordinator that stops sending times out as a transient error (the daemon
/// reconnects) instead of holding the site forever. The honest stream arrives whole.
#[tokio::test]
async fn downloads_are_bounded_in_size_and_time() {
    let dims = fedlora_proto::adapter::ModelDims {
        num_layers: 2,
        hidden_size: 64,
        intermediate_size: 176,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
    };
    let adapter = initial_factors(&dims, &lora(), 3).unwrap();
    let bytes = adapter.to_safetensors(None).unwrap();
    let limit = max_update_len(&adapter_spec(&dims, &lora()).unwrap());
    assert!(bytes.len() as u64 <= limit);
    let first = |data: Vec<u8>, total_bytes: u64, sha256: String| pb::AdapterChunk {
        data,
        total_bytes,
        sha256,
        ..Default::default()
    };
    let more = |data: Vec<u8>| pb::AdapterChunk {
        data,
        ..Default::default()
    };
    let sha = sha256_hex(&bytes);
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    let script = Arc::new(Script {
        downloads: Mutex::new(
            [
                // Honest, in two chunks.
                Serve::Chunks(vec![
                    first(head.to_vec(), bytes.len() as u64, sha.clone()),
                    more(tail.to_vec()),
                ]),
                // Announces more than any adapter of the spec.
                Serve::Chunks(vec![first(vec![0; 8], limit + 1, sha.clone())]),
                // Streams more than it announced.
                Serve::Chunks(vec![
                    first(head.to_vec(), head.len() as u64, sha.clone()),
                    more(tail.to_vec()),
                ]),
                // The right length, another digest.
                Serve::Chunks(vec![first(
                    bytes.clone(),
                    bytes.len() as u64,
                    "0".repeat(64),
                )]),
                // Half, then silence.
                Serve::ChunksThenStall(vec![first(head.to_vec(), bytes.len() as u64, sha)]),
            ]
            .into(),
        ),
        ..Default::default()
    });
    let url = serve(script).await;
    let mut client = FederationClient::connect(url).await.unwrap();
    let idle = Duration::from_secs(2);
    let mut fetch = async || download(&mut client, "site-1", 1, None, limit, idle).await;

    let honest = fetch().await.unwrap();
    assert_eq!(
        (honest.adapter, honest.bytes),
        (adapter.clone(), bytes.len())
    );

    let error = fetch().await.err().unwrap().to_string();
    assert!(
        error.contains(&format!("larger ({} bytes)", limit + 1)),
        "{error}"
    );
    let error = fetch().await.err().unwrap().to_string();
    assert!(
        error.contains(&format!(
            "streams more bytes ({}) than the {} it announced",
            bytes.len(),
            head.len()
        )),
        "{error}"
    );
    let error = fetch().await.err().unwrap().to_string();
    assert!(error.contains("arrived corrupt"), "{error}");

    let started = std::time::Instant::now();
    let stalled = fetch().await.err().unwrap();
    assert!(
        matches!(&stalled, ClientError::Rpc(status) if status.code() == tonic::Code::DeadlineExceeded),
        "{stalled}"
    );
    assert!(is_transient(&stalled), "{stalled}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A coordinator's `Wait` is obeyed within bounds: never a busy loop, never days.
#[test]
fn waits_are_clamped() {
    let delay = |retry_after_ms| retry_delay(&pb::Wait { retry_after_ms });
    assert_eq!(delay(0), Duration::from_millis(50));
    assert_eq!(delay(1_500), Duration::from_millis(1_500));
    assert_eq!(delay(u32::MAX), Duration::from_secs(60));
}
