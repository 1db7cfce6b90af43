//! End-to-end federations over real gRPC on TCP loopback, with real client daemons training the
//! tiny Llama. The PostgreSQL tests get a fresh migrated database each from `DATABASE_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedlora::sites::write_site_jsonl;
use fedlora_client::daemon::{
    self, BasePrecision, ClientTransport, DaemonConfig, sent_adapter_dir,
};
use fedlora_client::model::{LlamaConfig, fingerprint};
use fedlora_client::tiny::{TinyModelSpec, write_tiny_model};
use fedlora_coordinator::config::{FederationConfig, TrainingConfig};
use fedlora_coordinator::limits::Limits;
use fedlora_coordinator::pki::{CertificateAuthority, IssueRequest, Role};
use fedlora_coordinator::rounds::Coordinator;
use fedlora_coordinator::rounds::round_seed;
use fedlora_coordinator::server::{self, RunningServer, ServerTransport};
use fedlora_coordinator::store::{PgStore, RevokedRow, RoundRow, SqliteStore, Store};
use fedlora_coordinator::tls::ServerTls;
use fedlora_proto::adapter::{Adapter, Factor, LoraSpec, adapter_spec, sha256_hex};
use fedlora_proto::factors::{client_spec, initial_factors};
use fedlora_proto::tensor_bytes::WireDtype;
use fedlora_proto::tls::ClientTls;
use fedlora_proto::v1::admin_client::AdminClient;
use fedlora_proto::v1::federation_client::FederationClient;
use fedlora_proto::v1::{self as pb, next_task_response, submit_update_request};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

async fn start_coordinator(store: Arc<dyn Store>, config: FederationConfig) -> RunningServer {
    let coordinator = Coordinator::start(store, config).await.unwrap();
    server::spawn(
        coordinator,
        ([127, 0, 0, 1], 0).into(),
        ServerTransport::Insecure,
    )
    .await
    .unwrap()
}

/// The global adapter a round committed.
async fn global_adapter(store: &dyn Store, round_id: i64) -> Adapter {
    let row = store
        .global_adapter(round_id)
        .await
        .unwrap()
        .expect("global adapter stored");
    Adapter::from_safetensors(&row.bytes).unwrap()
}

fn small_config(rounds: u32, clients_per_round: u32) -> FederationConfig {
    FederationConfig {
        name: "test".into(),
        rounds,
        min_clients: 2,
        clients_per_round,
        // DoRA, dropout and a per-module rank: every tensor kind and both ranks go through the
        // wire, the store and the aggregate.
        lora: LoraSpec {
            use_dora: true,
            dropout: 0.05,
            rank_pattern: vec![("layers.1.self_attn.v_proj".into(), 2)],
            ..LoraSpec::new(4, 8.0, &["q_proj", "v_proj"])
        },
        training: TrainingConfig {
            local_steps: 6,
            learning_rate: 1e-2,
            batch_size: 4,
            seq_len: 32,
            ..TrainingConfig::default()
        },
        // The global adapter is checked against the example-weighted means of the updates.
        strategy: "fedavg".into(),
        ..FederationConfig::default()
    }
}

struct Site {
    name: &'static str,
    documents: usize,
    /// The second site trains on a bf16 base: one federation mixes base precisions.
    base: BasePrecision,
    state_dir: PathBuf,
    data: PathBuf,
    max_rank: usize,
}

impl Site {
    /// Training examples: every tenth document is held out.
    fn num_examples(&self) -> u64 {
        (self.documents - self.documents / 10) as u64
    }
}

fn make_sites(dir: &Path, specs: &[(&'static str, usize)]) -> Vec<Site> {
    specs
        .iter()
        .enumerate()
        .map(|(index, (name, documents))| {
            let data = dir.join(format!("{name}.jsonl"));
            write_site_jsonl(&data, index, *documents, 3).unwrap();
            Site {
                name,
                documents: *documents,
                base: if index == 1 {
                    BasePrecision::Bf16
                } else {
                    BasePrecision::F32
                },
                state_dir: dir.join("state").join(name),
                data,
                max_rank: 16,
            }
        })
        .collect()
}

fn spawn_daemon(
    url: &str,
    model_dir: &Path,
    site: &Site,
) -> JoinHandle<fedlora_client::error::Result<daemon::DaemonSummary>> {
    spawn_daemon_over(url, model_dir, site, ClientTransport::Insecure)
}

/// A daemon's settings for `site` over plaintext.
fn daemon_config(url: &str, model_dir: &Path, site: &Site) -> DaemonConfig {
    DaemonConfig {
        coordinator: url.to_string(),
        transport: ClientTransport::Insecure,
        client_name: site.name.to_string(),
        model_dir: model_dir.to_path_buf(),
        data_path: site.data.clone(),
        text_column: "text".into(),
        state_dir: site.state_dir.clone(),
        max_rank: site.max_rank,
        max_eval_windows: 16,
        base: site.base,
    }
}

fn spawn_daemon_over(
    url: &str,
    model_dir: &Path,
    site: &Site,
    transport: ClientTransport,
) -> JoinHandle<fedlora_client::error::Result<daemon::DaemonSummary>> {
    let config = DaemonConfig {
        transport,
        ..daemon_config(url, model_dir, site)
    };
    tokio::spawn(daemon::run(
        config,
        Arc::new(|_: &daemon::DaemonEvent| {}),
        std::future::pending(),
    ))
}

/// Runs a federation to its end on a plaintext loopback coordinator, one daemon per site;
/// returns the daemons' summaries in site order.
async fn run_federation(
    store: Arc<dyn Store>,
    config: FederationConfig,
    model_dir: &Path,
    sites: &[Site],
) -> Vec<daemon::DaemonSummary> {
    let running = start_coordinator(store, config).await;
    let daemons = sites
        .iter()
        .map(|site| spawn_daemon(&running.url(), model_dir, site))
        .collect();
    let summaries = wait_all(daemons).await;
    running.stop().await.unwrap();
    summaries
}

async fn wait_all(
    daemons: Vec<JoinHandle<fedlora_client::error::Result<daemon::DaemonSummary>>>,
) -> Vec<daemon::DaemonSummary> {
    let mut summaries = Vec::new();
    for daemon in daemons {
        summaries.push(
            tokio::time::timeout(Duration::from_secs(300), daemon)
                .await
                .expect("daemon finished in time")
                .unwrap()
                .unwrap(),
        );
    }
    summaries
}

fn read_adapter(path: &Path) -> (Adapter, String) {
    let bytes = std::fs::read(path).unwrap();
    (
        Adapter::from_safetensors(&bytes).unwrap(),
        sha256_hex(&bytes),
    )
}

/// Asserts `global` equals Σ wₖ·adapterₖ / Σ wₖ, tensor by tensor, element by element.
fn assert_weighted_mean(global: &Adapter, parts: &[(f64, &Adapter)]) {
    let total: f64 = parts.iter().map(|(weight, _)| weight).sum();
    assert_eq!(global.tensors.len(), parts[0].1.tensors.len());
    for (name, tensor) in &global.tensors {
        for (index, value) in tensor.data.iter().enumerate() {
            let expected: f64 = parts
                .iter()
                .map(|(weight, adapter)| weight * f64::from(adapter.tensors[name].data[index]))
                .sum::<f64>()
                / total;
            let tolerance = 1e-6 * expected.abs().max(1e-3);
            assert!(
                (f64::from(*value) - expected).abs() <= tolerance,
                "{name}[{index}]: global {value} vs recomputed {expected}"
            );
        }
    }
}

async fn rounds_oldest_first(store: &dyn Store, federation_id: i64) -> Vec<RoundRow> {
    let mut rounds = store.list_rounds(federation_id, 100).await.unwrap();
    rounds.reverse();
    rounds
}

#[sqlx::test(migrations = "./migrations")]
async fn two_clients_two_rounds_on_postgres(pool: sqlx::PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let sites = make_sites(dir.path(), &[("clinic", 150), ("bank", 250)]);
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool));
    let summaries = run_federation(store.clone(), small_config(2, 2), &model_dir, &sites).await;
    // fedavg moves both factors every round: every download is whole.
    for summary in &summaries {
        assert_eq!(summary.factors_reused, 0, "{summary:?}");
        assert!(summary.downloaded_bytes > 0);
    }

    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    assert_eq!(federation.state, "finished");
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    let kinds: Vec<(&str, &str)> = rounds
        .iter()
        .map(|round| (round.kind.as_str(), round.state.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("train", "closed"),
            ("train", "closed"),
            ("evaluate", "closed")
        ]
    );
    assert_eq!(rounds[1].base_round_id, Some(rounds[0].id));

    for round in &rounds[..2] {
        let global_row = store
            .global_adapter(round.id)
            .await
            .unwrap()
            .expect("global adapter stored");
        let global = Adapter::from_safetensors(&global_row.bytes).unwrap();
        assert_eq!(global_row.sha256, sha256_hex(&global_row.bytes));
        assert_eq!(global_row.num_updates, 2);
        let updates = store.list_updates(round.id).await.unwrap();
        let mut parts = Vec::new();
        for site in &sites {
            let path = sent_adapter_dir(&site.state_dir, round.id as u64)
                .join("adapter_model.safetensors");
            let (adapter, sha256) = read_adapter(&path);
            let update = updates
                .iter()
                .find(|update| update.sha256 == sha256)
                .expect("stored update is the site's copy");
            assert_eq!(update.num_examples as u64, site.num_examples());
            assert!(
                store.update_bytes(update.id).await.unwrap().is_none(),
                "update bytes deleted after aggregation"
            );
            parts.push((site.num_examples() as f64, adapter));
        }
        let parts: Vec<(f64, &Adapter)> = parts
            .iter()
            .map(|(weight, adapter)| (*weight, adapter))
            .collect();
        assert_weighted_mean(&global, &parts);
        let config: LlamaConfig =
            serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
                .unwrap();
        global
            .validate(&adapter_spec(&config.dims(), &small_config(2, 2).lora).unwrap())
            .unwrap();
    }
    // The second round started from the first round's global adapter: its B factors are non-zero.
    let first = global_adapter(store.as_ref(), rounds[0].id).await;
    assert_eq!(
        first.tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape,
        [2, 64]
    );
    assert_eq!(
        first.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
            .shape,
        [64]
    );
    assert!(
        first
            .tensors
            .iter()
            .any(|(name, t)| name.contains("lora_B") && t.data.iter().any(|v| *v != 0.0))
    );
}

/// Joins as `name` on an open connection; returns the client id.
async fn join_as(
    client: &mut FederationClient<tonic::transport::Channel>,
    name: &str,
    model_dir: &Path,
) -> Result<String, tonic::Status> {
    let config = LlamaConfig::from_file(&model_dir.join("config.json")).unwrap();
    let dims = config.dims();
    let joined = client
        .join(pb::JoinRequest {
            client_name: name.into(),
            max_rank: 16,
            num_examples: 50,
            base_model_fingerprint: fingerprint(model_dir).unwrap(),
            model_shape: Some(dims.into()),
            client_version: "test".into(),
            device: "cpu".into(),
            lora_features: fedlora_proto::adapter::LORA_FEATURES
                .map(String::from)
                .to_vec(),
        })
        .await?
        .into_inner();
    Ok(joined.client_id)
}

async fn next_task(
    client: &mut FederationClient<tonic::transport::Channel>,
    client_id: &str,
) -> Option<pb::Task> {
    let response = client
        .next_task(pb::NextTaskRequest {
            client_id: client_id.into(),
            wait_ms: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    match response.kind {
        Some(next_task_response::Kind::Task(task)) => Some(task),
        _ => None,
    }
}

async fn upload(
    client: &mut FederationClient<tonic::transport::Channel>,
    client_id: &str,
    task_id: &str,
    bytes: &[u8],
    claimed_sha256: &str,
) -> Result<pb::SubmitReceipt, tonic::Status> {
    upload_parts(
        client,
        client_id,
        task_id,
        bytes.len() as u64,
        claimed_sha256,
        &[bytes],
    )
    .await
}

/// A hostile upload and the status it must get.
struct Hostile<'a> {
    case: &'static str,
    /// What the header announces.
    total: u64,
    claimed: String,
    chunks: Vec<&'a [u8]>,
    code: Code,
}

/// An upload whose header announces `total_bytes`, sent as the given chunks.
async fn upload_parts(
    client: &mut FederationClient<tonic::transport::Channel>,
    client_id: &str,
    task_id: &str,
    total_bytes: u64,
    claimed_sha256: &str,
    chunks: &[&[u8]],
) -> Result<pb::SubmitReceipt, tonic::Status> {
    let header = pb::UpdateHeader {
        client_id: client_id.into(),
        task_id: task_id.into(),
        num_examples: 50,
        total_bytes,
        sha256: claimed_sha256.into(),
        metrics: Some(pb::TrainMetrics {
            steps: 1,
            tokens: 10,
            train_loss: 1.0,
            eval_loss: 1.0,
            seconds: 0.1,
            eval_tokens: Some(10),
        }),
    };
    let mut messages = vec![pb::SubmitUpdateRequest {
        part: Some(submit_update_request::Part::Header(header)),
    }];
    messages.extend(chunks.iter().map(|chunk| pb::SubmitUpdateRequest {
        part: Some(submit_update_request::Part::Chunk(chunk.to_vec())),
    }));
    client
        .submit_update(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// A participant with a valid certificate sends malformed updates over mutual TLS; each is
/// refused with its own status (INVALID_ARGUMENT, NOT_FOUND for an unknown task,
/// RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, PERMISSION_DENIED, ALREADY_EXISTS) and audited, and the
/// round still closes with the exact weighted mean of the accepted updates.
#[sqlx::test(migrations = "./migrations")]
async fn malformed_updates_are_refused_and_the_round_goes_on(pool: sqlx::PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let sites = make_sites(dir.path(), &[("clinic", 120), ("bank", 160)]);
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool));
    let config = small_config(1, 3);
    let limits = Limits {
        max_update_chunks: 8,
        upload_idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let pki = TestPki::new();
    let (running, url) = start_over_tls(store.clone(), config.clone(), limits, &pki).await;

    let mallory_tls = pki.issue("mallory", Role::Client);
    let mut mallory = FederationClient::new(tls_channel(&url, &mallory_tls).await.unwrap());
    let mallory_id = join_as(&mut mallory, "mallory", &model_dir).await.unwrap();
    let task = next_task(&mut mallory, &mallory_id)
        .await
        .expect("a task for mallory");
    let model_config = LlamaConfig::from_file(&model_dir.join("config.json")).unwrap();
    let spec = adapter_spec(&model_config.dims(), &config.lora).unwrap();
    let mut good = Adapter::zeros(&spec);
    for (offset, tensor) in good.tensors.values_mut().enumerate() {
        for (index, value) in tensor.data.iter_mut().enumerate() {
            *value = ((index + offset) % 7) as f32 * 0.01;
        }
    }

    let mut renamed = good.clone();
    let first = renamed.tensors.keys().next().unwrap().clone();
    let tensor = renamed.tensors.remove(&first).unwrap();
    renamed
        .tensors
        .insert(first.replace("q_proj", "k_proj"), tensor);
    let mut reshaped = good.clone();
    let tensor = reshaped.tensors.values_mut().next().unwrap();
    tensor.shape = vec![tensor.shape[1], tensor.shape[0]];
    let mut poisoned = good.clone();
    poisoned.tensors.values_mut().last().unwrap().data[0] = f32::NAN;

    for (case, adapter) in [
        ("renamed tensor", &renamed),
        ("wrong shape", &reshaped),
        ("nan value", &poisoned),
    ] {
        let bytes = adapter.to_safetensors(None).unwrap();
        let status = upload(
            &mut mallory,
            &mallory_id,
            &task.task_id,
            &bytes,
            &sha256_hex(&bytes),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    }
    let bytes = good.to_safetensors(None).unwrap();
    let status = upload(
        &mut mallory,
        &mallory_id,
        &task.task_id,
        &bytes,
        &sha256_hex(b"other"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "sha256 mismatch: {status:?}"
    );
    assert!(status.message().contains("sha256"), "{}", status.message());
    let status = upload(
        &mut mallory,
        &mallory_id,
        "r1-c1-forged",
        &bytes,
        &sha256_hex(&bytes),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "unknown task: {status:?}");

    let refused = store.list_audit(100).await.unwrap();
    assert_eq!(
        refused
            .iter()
            .filter(|event| event.kind == "request_refused")
            .count(),
        5,
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|event| event.detail.contains("non-finite"))
    );

    // More hostile uploads, each refused with its own status while the round stays open.
    let sha = sha256_hex(&bytes);
    let len = bytes.len() as u64;
    let halves: [&[u8]; 2] = [&bytes[..bytes.len() / 2], &bytes[bytes.len() / 2..]];
    let mut higher_rank = good.clone();
    let a_name = higher_rank
        .tensors
        .keys()
        .find(|name| name.ends_with("lora_A.weight"))
        .unwrap()
        .clone();
    let a = higher_rank.tensors.get_mut(&a_name).unwrap();
    a.shape[0] += 1;
    a.data.extend(vec![0.0; a.shape[1]]);
    let higher_rank = higher_rank.to_safetensors(None).unwrap();
    // The first tensor's dtype rewritten from F32 to I32 (same width, same header length).
    let mut integer = bytes.clone();
    let at = integer
        .windows(5)
        .position(|window| window == b"\"F32\"")
        .unwrap();
    integer[at + 1] = b'I';
    let many: Vec<&[u8]> = bytes.chunks(bytes.len().div_ceil(16)).collect();
    let huge_chunk = vec![0u8; 5 << 20];
    let largest = fedlora_proto::tensor_bytes::max_update_len(&spec);
    // A valid bf16 update whose header is padded (with spaces, as safetensors allows) past the
    // task's header limit: refused from the header's length prefix, before it is parsed. (Extra
    // tensors would be refused even earlier: their bytes exceed the largest valid update.)
    let header_limit = fedlora_proto::tensor_bytes::header_limit(&spec);
    let crowded = {
        let compact = good.to_safetensors_as(WireDtype::Bf16, None).unwrap();
        let header_len = u64::from_le_bytes(compact[..8].try_into().unwrap()) as usize;
        let mut padded = (header_limit + 1).to_le_bytes().to_vec();
        padded.extend_from_slice(&compact[8..8 + header_len]);
        padded.resize(8 + header_limit as usize + 1, b' ');
        padded.extend_from_slice(&compact[8 + header_len..]);
        padded
    };
    assert!((crowded.len() as u64) < largest);
    let cases = [
        Hostile {
            case: "oversized",
            total: config.max_update_bytes + 1,
            claimed: sha.clone(),
            chunks: vec![&bytes[..]],
            code: Code::ResourceExhausted,
        },
        Hostile {
            case: "truncated stream",
            total: len + 10,
            claimed: sha.clone(),
            chunks: vec![&bytes[..]],
            code: Code::InvalidArgument,
        },
        Hostile {
            case: "overlong stream",
            total: len - 10,
            claimed: sha.clone(),
            chunks: vec![&bytes[..]],
            code: Code::InvalidArgument,
        },
        Hostile {
            case: "16 chunks over a limit of 8",
            total: len,
            claimed: sha.clone(),
            chunks: many,
            code: Code::ResourceExhausted,
        },
        Hostile {
            case: "higher rank than the task's",
            total: higher_rank.len() as u64,
            claimed: sha256_hex(&higher_rank),
            chunks: vec![&higher_rank[..]],
            code: Code::InvalidArgument,
        },
        Hostile {
            case: "integer dtype",
            total: len,
            claimed: sha256_hex(&integer),
            chunks: vec![&integer[..]],
            code: Code::InvalidArgument,
        },
        Hostile {
            case: "a 5 MiB chunk over the 4 MiB message limit",
            total: len,
            claimed: sha.clone(),
            chunks: vec![&huge_chunk[..]],
            code: Code::ResourceExhausted,
        },
        Hostile {
            case: "more bytes than any valid update for the task",
            total: largest + 1,
            claimed: sha.clone(),
            chunks: vec![&bytes[..]],
            code: Code::ResourceExhausted,
        },
        Hostile {
            case: "a header longer than the task's tensors need",
            total: crowded.len() as u64,
            claimed: sha256_hex(&crowded),
            chunks: vec![&crowded[..]],
            code: Code::InvalidArgument,
        },
        Hostile {
            case: "sha256 mismatch, in two chunks",
            total: len,
            claimed: sha256_hex(b"not it"),
            chunks: halves.to_vec(),
            code: Code::InvalidArgument,
        },
    ];
    for hostile in cases {
        let status = upload_parts(
            &mut mallory,
            &mallory_id,
            &task.task_id,
            hostile.total,
            &hostile.claimed,
            &hostile.chunks,
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), hostile.code, "{}: {status:?}", hostile.case);
    }
    // A stream that sends its header and then nothing: cut off at the idle deadline.
    let header = pb::SubmitUpdateRequest {
        part: Some(submit_update_request::Part::Header(pb::UpdateHeader {
            client_id: mallory_id.clone(),
            task_id: task.task_id.clone(),
            num_examples: 50,
            total_bytes: len,
            sha256: sha.clone(),
            metrics: None,
        })),
    };
    let never_ends =
        tokio_stream::StreamExt::chain(tokio_stream::iter(vec![header]), tokio_stream::pending());
    let status = mallory.submit_update(never_ends).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // A client id that is not mallory's (here: no client at all) is refused as another's.
    let status = upload(&mut mallory, "999999", &task.task_id, &bytes, &sha)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "unknown client: {status:?}"
    );
    let refused = store.list_audit(100).await.unwrap();
    for needle in [
        &format!(
            "update of {} bytes exceeds the limit of {} bytes",
            config.max_update_bytes + 1,
            config.max_update_bytes
        ),
        &format!(
            "update of {} bytes exceeds the limit of {largest} bytes",
            largest + 1
        ),
        "truncated",
        "longer than",
        "more than 8 chunks",
        "upload message larger than the limit of 4194304 bytes",
        "shape",
        "dtype",
        &format!(
            "header of {} bytes exceeds the limit of {header_limit} for the task's {} tensors",
            header_limit + 1,
            spec.len()
        ),
        "client 999999 is not the client of certificate \"mallory\"",
        "stalled",
    ] {
        assert!(
            refused.iter().any(|event| event.detail.contains(needle)),
            "no audit row for {needle:?}: {refused:#?}"
        );
    }

    // The round went on: mallory's valid update is accepted, twice with the same receipt.
    let receipt = upload(
        &mut mallory,
        &mallory_id,
        &task.task_id,
        &bytes,
        &sha256_hex(&bytes),
    )
    .await
    .unwrap();
    let again = upload(
        &mut mallory,
        &mallory_id,
        &task.task_id,
        &bytes,
        &sha256_hex(&bytes),
    )
    .await
    .unwrap();
    assert_eq!(receipt, again);
    // A replay with other bytes for the same task: ALREADY_EXISTS.
    let other = good.to_safetensors_as(WireDtype::Bf16, None).unwrap();
    let status = upload(
        &mut mallory,
        &mallory_id,
        &task.task_id,
        &other,
        &sha256_hex(&other),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let daemons = sites
        .iter()
        .map(|site| {
            let tls = pki.issue(site.name, Role::Client);
            spawn_daemon_over(&url, &model_dir, site, ClientTransport::MutualTls(tls))
        })
        .collect();
    // Mallory also answers the final evaluation round so that it can close.
    let evaluation = loop {
        if let Some(task) = next_task(&mut mallory, &mallory_id).await {
            assert_eq!(task.kind, pb::TaskKind::Evaluate as i32);
            let evaluation = pb::SubmitEvaluationRequest {
                client_id: mallory_id.clone(),
                task_id: task.task_id,
                eval_loss: 5.0,
                num_eval_tokens: 10,
            };
            mallory.submit_evaluation(evaluation.clone()).await.unwrap();
            break evaluation;
        }
    };
    wait_all(daemons).await;

    // Late and early: an evaluation for the closed round, a download of a round that never was.
    let status = mallory.submit_evaluation(evaluation).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "stale round: {status:?}"
    );
    let status = mallory
        .download_adapter(pb::DownloadAdapterRequest {
            client_id: mallory_id.clone(),
            round_id: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "future round: {status:?}");
    running.stop().await.unwrap();
    let refused = store.list_audit(200).await.unwrap();
    for needle in ["is closed", "1000000"] {
        assert!(
            refused
                .iter()
                .any(|event| event.kind == "request_refused" && event.detail.contains(needle)),
            "no audit row for {needle:?}: {refused:#?}"
        );
    }

    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    assert_eq!(rounds[0].state, "closed");
    let global = global_adapter(store.as_ref(), rounds[0].id).await;
    let honest: Vec<(f64, Adapter)> = sites
        .iter()
        .map(|site| {
            let path = sent_adapter_dir(&site.state_dir, rounds[0].id as u64)
                .join("adapter_model.safetensors");
            (site.num_examples() as f64, read_adapter(&path).0)
        })
        .collect();
    let mut parts: Vec<(f64, &Adapter)> = honest
        .iter()
        .map(|(weight, adapter)| (*weight, adapter))
        .collect();
    parts.push((50.0, &good));
    assert_weighted_mean(&global, &parts);
}

/// The demo's federation (embedded SQLite store): after two rounds every site's held-out loss is
/// below the untrained base model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_site_beats_the_base_model_after_two_rounds() {
    let options = fedlora::demo::DemoOptions {
        rounds: 2,
        documents_per_site: 200,
        model: TinyModelSpec::default(),
        training: TrainingConfig {
            local_steps: 15,
            learning_rate: 1e-2,
            batch_size: 8,
            seq_len: 48,
            ..TrainingConfig::default()
        },
        show_progress: false,
        ..fedlora::demo::DemoOptions::default()
    };
    let report = fedlora::demo::run(options).await.unwrap();
    let base = report
        .rounds
        .iter()
        .find(|round| round.kind == "train" && round.base_round_id == 0)
        .unwrap();
    let last = report
        .rounds
        .iter()
        .find(|round| round.kind == "evaluate")
        .unwrap();
    assert_eq!(last.state, "closed");
    assert_eq!(
        report
            .rounds
            .iter()
            .filter(|round| round.kind == "train" && round.state == "closed")
            .count(),
        2
    );
    assert_eq!(base.clients.len(), 3);
    for site in &base.clients {
        let after = last
            .clients
            .iter()
            .find(|client| client.client_name == site.client_name)
            .unwrap();
        assert!(
            after.eval_loss < site.eval_loss - 0.2,
            "{}: held-out loss {} with the base model, {} after round 2",
            site.client_name,
            site.eval_loss,
            after.eval_loss
        );
    }
}

/// A site whose held-out examples (every tenth) all have prompts that fill the task's sequence
/// length trains as usual and reports "no held-out tokens": the federation finishes, its loss
/// shows as none in the round summaries, and the other site's loss is the round's mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_without_heldout_windows_trains_and_reports_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    // A short template, so that a short example's prompt leaves room for its answer (a byte is
    // a token here; Alpaca's preamble alone would fill the window).
    std::fs::write(
        model_dir.join("chat_template.jinja"),
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}\
         {% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    .unwrap();
    let mut sites = make_sites(dir.path(), &[("clinic", 60)]);
    let long_prompt = "summarise this note please ".repeat(40);
    let lines: Vec<String> = (0..40)
        .map(|index| {
            let instruction = if index % 10 == 9 {
                long_prompt.as_str()
            } else {
                "say hi"
            };
            serde_json::json!({ "instruction": instruction, "output": "hi there" }).to_string()
        })
        .collect();
    let data = dir.path().join("helpdesk.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    sites.push(Site {
        name: "helpdesk",
        documents: 40,
        base: BasePrecision::F32,
        state_dir: dir.path().join("state").join("helpdesk"),
        data,
        max_rank: 16,
    });
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    let mut config = small_config(1, 2);
    config.training.seq_len = 64;
    let summaries = run_federation(store.clone(), config.clone(), &model_dir, &sites).await;
    assert!(summaries[0].last_eval_loss.is_some());
    assert_eq!(summaries[1].last_eval_loss, None, "{:?}", summaries[1]);
    assert_eq!(summaries[1].rounds_trained, 1);

    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    assert_eq!(federation.state, "finished");
    let clients = store.list_clients(federation.id).await.unwrap();
    let id = |name| {
        clients
            .iter()
            .find(|client| client.name == name)
            .unwrap()
            .id
    };
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    assert_eq!(rounds.len(), 2, "a train round and the final evaluation");
    for round in &rounds {
        let evaluations = store.list_evaluations(round.id).await.unwrap();
        assert_eq!(evaluations.len(), 2, "both sites reported");
        for evaluation in evaluations {
            let measured = evaluation.client_id == id("clinic");
            assert_eq!(evaluation.num_tokens > 0, measured, "{evaluation:?}");
            assert_eq!(evaluation.eval_loss > 0.0, measured, "{evaluation:?}");
        }
    }
    let updates = store.list_updates(rounds[0].id).await.unwrap();
    assert_eq!(updates.len(), 2, "both sites trained");
    for update in updates {
        let measured = update.client_id == id("clinic");
        assert_eq!(
            update.local_eval_tokens.unwrap() > 0,
            measured,
            "{update:?}"
        );
        assert_eq!(update.local_eval_loss > 0.0, measured, "{update:?}");
    }
    let coordinator = Coordinator::start(store.clone(), config).await.unwrap();
    for summary in coordinator.rounds(10).await.unwrap() {
        assert!(summary.eval_loss_of("helpdesk").is_nan());
        assert!(summary.eval_loss_of("clinic") > 0.0);
        assert_eq!(summary.mean_eval_loss, summary.eval_loss_of("clinic"));
    }
}

/// A site none of whose examples fits the federation's sequence length cannot train: its daemon
/// stops at join, before it takes a task, with an error that says who sets the length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_no_training_window_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let line = serde_json::json!({
        "instruction": "summarise this note please ".repeat(10),
        "output": "ok",
    })
    .to_string();
    let data = dir.path().join("long.jsonl");
    std::fs::write(&data, vec![line; 20].join("\n")).unwrap();
    let site = Site {
        name: "long",
        documents: 20,
        base: BasePrecision::F32,
        state_dir: dir.path().join("state"),
        data,
        max_rank: 16,
    };
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    let mut config = small_config(1, 1);
    config.min_clients = 1;
    let running = start_coordinator(store.clone(), config).await;
    let daemon = spawn_daemon(&running.url(), &model_dir, &site);
    let error = tokio::time::timeout(Duration::from_secs(300), daemon)
        .await
        .expect("daemon stopped in time")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("sequence length of 32 tokens") && error.contains("fedlora serve --seq-len"),
        "{error}"
    );
    // The daemon found out at join, before taking a task: no round waits for it.
    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    for round in store.list_rounds(federation.id, 10).await.unwrap() {
        assert!(
            store.list_tasks(round.id).await.unwrap().is_empty(),
            "{round:?}"
        );
    }
    running.stop().await.unwrap();
}

/// `alternating` with clients of two ranks: round 0 trains B only, round 1 A only; the frozen
/// factor comes through bit for bit, the lower-rank site trains and receives a prefix with the
/// alpha that keeps the federation's scale, and each slot is the mean of the sites reaching it.
#[sqlx::test(migrations = "./migrations")]
async fn alternating_rounds_with_mixed_ranks(pool: sqlx::PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let mut sites = make_sites(dir.path(), &[("clinic", 150), ("bank", 250)]);
    sites[0].max_rank = 2;
    let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]);
    let config = FederationConfig {
        strategy: "alternating".into(),
        min_rank: Some(2),
        lora: lora.clone(),
        ..small_config(2, 2)
    };
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool));
    let summaries = run_federation(store.clone(), config, &model_dir, &sites).await;

    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    assert_eq!(federation.state, "finished");
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    let trained: Vec<&str> = rounds.iter().map(|round| round.trained.as_str()).collect();
    assert_eq!(trained, ["b", "a", "both"]);
    // Round 2 starts from round 1's global adapter, whose A is the seeded start every site
    // computed itself; round 3 from round 2's, whose B round 2 froze. Neither is sent again;
    // the evaluation round's download changed both.
    for summary in &summaries {
        assert_eq!(summary.factors_reused, 2, "{summary:?}");
    }
    let model_config: LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let dims = model_config.dims();
    let start = initial_factors(&dims, &lora, round_seed(rounds[0].id)).unwrap();
    let mut previous = start;
    for (round, frozen) in rounds[..2].iter().zip(["lora_A.weight", "lora_B.weight"]) {
        let global = global_adapter(store.as_ref(), round.id).await;
        global
            .validate(&adapter_spec(&dims, &lora).unwrap())
            .unwrap();
        let tasks = store.list_tasks(round.id).await.unwrap();
        let mut ranks: Vec<i64> = tasks.iter().map(|task| task.rank).collect();
        ranks.sort();
        assert_eq!(ranks, [2, 4]);
        let mut sent = Vec::new();
        for site in &sites {
            let dir = sent_adapter_dir(&site.state_dir, round.id as u64);
            let (adapter, _) = read_adapter(&dir.join("adapter_model.safetensors"));
            let peft: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(peft["r"], site.max_rank.min(4));
            assert_eq!(peft["lora_alpha"], 8.0 * site.max_rank.min(4) as f64 / 4.0);
            // The site trained from the previous global adapter's frozen factor at its rank,
            // whether it was downloaded or filled from what the site held.
            let start = previous
                .rank_prefix(&client_spec(&dims, &lora, site.max_rank.min(4)).unwrap())
                .unwrap();
            for (name, tensor) in &adapter.tensors {
                if name.ends_with(frozen) {
                    assert_eq!(tensor, &start.tensors[name], "{}: {name}", site.name);
                }
            }
            sent.push((site.num_examples() as f64, adapter));
        }
        for (name, tensor) in &global.tensors {
            if name.ends_with(frozen) {
                assert_eq!(
                    tensor, &previous.tensors[name],
                    "{name}: the frozen factor moved"
                );
                continue;
            }
            let factor = Factor::of_name(name).unwrap();
            let columns = tensor.shape[1];
            for (index, value) in tensor.data.iter().enumerate() {
                let slot = if factor == Factor::A {
                    index / columns
                } else {
                    index % columns
                };
                let reaching: Vec<(f64, f64)> = sent
                    .iter()
                    .filter_map(|(weight, adapter)| {
                        let part = &adapter.tensors[name];
                        let rank = part.shape[factor.rank_axis().unwrap()];
                        (slot < rank).then(|| {
                            let local = if factor == Factor::A {
                                index
                            } else {
                                (index / columns) * rank + slot
                            };
                            (*weight, f64::from(part.data[local]))
                        })
                    })
                    .collect();
                let total: f64 = reaching.iter().map(|(weight, _)| weight).sum();
                let expected: f64 = reaching
                    .iter()
                    .map(|(weight, value)| weight * value)
                    .sum::<f64>()
                    / total;
                assert!(
                    (f64::from(*value) - expected).abs() <= 1e-6 * expected.abs().max(1e-3),
                    "{name}[{index}]: {value} vs {expected}"
                );
            }
        }
        previous = global;
    }
}

/// `ffa`: A stays the seeded start every site computes itself, so no download ever carries it.
#[sqlx::test(migrations = "./migrations")]
async fn ffa_never_sends_the_frozen_a(pool: sqlx::PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let sites = make_sites(dir.path(), &[("clinic", 120), ("bank", 160)]);
    let config = FederationConfig {
        strategy: "ffa".into(),
        ..small_config(2, 2)
    };
    let lora = config.lora.clone();
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool));
    let summaries = run_federation(store.clone(), config, &model_dir, &sites).await;

    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    assert_eq!(
        rounds.len(),
        3,
        "two training rounds and the evaluation round"
    );
    let model_config: LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let start = initial_factors(&model_config.dims(), &lora, round_seed(rounds[0].id)).unwrap();
    let mut whole_bytes = 0;
    for round in &rounds[..2] {
        let global = global_adapter(store.as_ref(), round.id).await;
        whole_bytes = global.to_safetensors(None).unwrap().len() as u64;
        assert_eq!(
            global.factor_digest(Factor::A),
            start.factor_digest(Factor::A),
            "round {}: A moved",
            round.id
        );
    }
    for summary in &summaries {
        // Rounds 2 and 3 start from global adapters; both downloads left A out.
        assert_eq!(summary.factors_reused, 2, "{summary:?}");
        assert!(
            summary.downloaded_bytes < 2 * whole_bytes * 3 / 4,
            "{} bytes downloaded; a whole adapter is {whole_bytes}",
            summary.downloaded_bytes
        );
    }
}

/// Certificates of one federation's CA (and of a stranger's) for the security tests.
struct TestPki {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
    ca_pem: String,
}

impl TestPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "test", 30).unwrap();
        let ca_pem = ca.cert_pem().unwrap();
        Self {
            _dir: dir,
            ca,
            ca_pem,
        }
    }

    fn issue_with(&self, request: IssueRequest) -> (ClientTls, String) {
        let issued = self.ca.issue(&request).unwrap();
        let tls = ClientTls {
            ca_pem: self.ca_pem.clone(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem.unwrap(),
        };
        (tls, issued.record.serial)
    }

    fn issue(&self, name: &str, role: Role) -> ClientTls {
        self.issue_with(IssueRequest::new(name, role, 5)).0
    }

    /// The coordinator's side: a certificate for localhost and 127.0.0.1.
    fn server(&self) -> ServerTransport {
        let request = IssueRequest {
            subject_alt_names: vec!["127.0.0.1".into()],
            ..IssueRequest::new("localhost", Role::Coordinator, 5)
        };
        let issued = self.ca.issue(&request).unwrap();
        ServerTransport::MutualTls(
            ServerTls::from_pem(&self.ca_pem, &issued.cert_pem, &issued.key_pem.unwrap()).unwrap(),
        )
    }
}

/// A coordinator with `limits` serving mutual TLS with `pki`'s certificates on loopback; returns
/// it and its `https://127.0.0.1:PORT` address.
async fn start_over_tls(
    store: Arc<dyn Store>,
    config: FederationConfig,
    limits: Limits,
    pki: &TestPki,
) -> (RunningServer, String) {
    let coordinator = Coordinator::start_with_limits(store, config, limits)
        .await
        .unwrap();
    let running = server::spawn(coordinator, ([127, 0, 0, 1], 0).into(), pki.server())
        .await
        .unwrap();
    let url = running.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    (running, url)
}

/// A connection to `url` presenting `tls`'s certificate; `Err` when the transport fails.
async fn tls_channel(url: &str, tls: &ClientTls) -> Result<Channel, String> {
    let endpoint = tls
        .configure(url, Endpoint::from_shared(url.to_string()).unwrap())
        .map_err(|error| error.to_string())?;
    endpoint.connect().await.map_err(|error| error.to_string())
}

/// Waits (up to 5 s) for an audit row of `kind` whose detail contains `needle`.
async fn await_audit(store: &dyn Store, kind: &str, needle: &str) {
    for _ in 0..50 {
        let rows = store.list_audit(500).await.unwrap();
        if rows
            .iter()
            .any(|row| row.kind == kind && row.detail.contains(needle))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = store.list_audit(500).await.unwrap();
    panic!("no {kind} audit row containing {needle:?}; rows: {rows:#?}");
}

/// Mutual TLS end to end: two sites run a round with their certificates while hostile callers
/// (no certificate, another CA, expired, revoked, the wrong role, another site's client id, a
/// claimed name) are each refused with a specific status and an audit row, and the round still
/// closes with the honest sites' exact weighted mean.
#[sqlx::test(migrations = "./migrations")]
async fn mutual_tls_identities_and_roles(pool: sqlx::PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModelSpec::default()).unwrap();
    let sites = make_sites(dir.path(), &[("clinic", 120), ("bank", 160)]);
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool));
    let pki = TestPki::new();
    let limits = Limits {
        requests_per_minute: 40,
        ..Limits::default()
    };
    let (running, url) = start_over_tls(store.clone(), small_config(1, 2), limits, &pki).await;

    // The clinic joins with its certificate (its daemon joins again below, as the same client).
    let clinic_tls = pki.issue("clinic", Role::Client);
    let mut clinic = FederationClient::new(tls_channel(&url, &clinic_tls).await.unwrap());
    let clinic_id = join_as(&mut clinic, "clinic", &model_dir).await.unwrap();

    // 1. No client certificate: refused in the handshake; the first call fails.
    let channel = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = channel {
        let status = join_as(
            &mut FederationClient::new(channel.clone()),
            "clinic",
            &model_dir,
        )
        .await
        .unwrap_err();
        // tonic reports the server's TLS alert as a transport error.
        assert_eq!(status.code(), Code::Unknown, "{status:?}");
        assert!(
            format!("{status:?}").contains("CertificateRequired"),
            "{status:?}"
        );
        let status = AdminClient::new(channel)
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap_err();
        assert!(
            format!("{status:?}").contains("CertificateRequired"),
            "{status:?}"
        );
    }
    await_audit(store.as_ref(), "connection_refused", "no certificates").await;

    // 2. A certificate from another CA, even with a site's name: refused in the handshake.
    let stranger = TestPki::new().issue("clinic", Role::Client);
    let stranger = ClientTls {
        ca_pem: pki.ca_pem.clone(),
        ..stranger
    };
    let refused = match tls_channel(&url, &stranger).await {
        Ok(channel) => join_as(&mut FederationClient::new(channel), "clinic", &model_dir)
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
        Err(error) => Err(error),
    };
    assert!(refused.is_err(), "a stranger's certificate was accepted");
    // Same CA name, another key: "badsignature" (another name would be "unknownissuer").
    await_audit(
        store.as_ref(),
        "connection_refused",
        "invalid peer certificate",
    )
    .await;

    // 2b. The coordinator's own certificate as a caller: server-only usage, refused.
    let request = IssueRequest {
        subject_alt_names: vec!["127.0.0.1".into()],
        ..IssueRequest::new("impostor", Role::Coordinator, 5)
    };
    let (server_as_client, _) = pki.issue_with(request);
    let refused = match tls_channel(&url, &server_as_client).await {
        Ok(channel) => join_as(&mut FederationClient::new(channel), "impostor", &model_dir)
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
        Err(error) => Err(error),
    };
    assert!(
        refused.is_err(),
        "a server certificate was accepted from a caller"
    );

    // 3. An expired certificate of the federation's CA: refused in the handshake.
    let (expired, _) = pki.issue_with(IssueRequest {
        valid_from_secs: -3 * 86_400,
        valid_for_secs: 86_400,
        ..IssueRequest::new("expired-site", Role::Client, 1)
    });
    let refused = match tls_channel(&url, &expired).await {
        Ok(channel) => join_as(
            &mut FederationClient::new(channel),
            "expired-site",
            &model_dir,
        )
        .await
        .map(|_| ())
        .map_err(|status| status.to_string()),
        Err(error) => Err(error),
    };
    assert!(refused.is_err(), "an expired certificate was accepted");
    await_audit(store.as_ref(), "connection_refused", "expired").await;

    // 3b. A daemon whose own clock confirms the refusal (expired) stops with an error that says
    //     so; one refused for another reason (another CA's certificate) keeps retrying every
    //     30 s, reporting the refusal, since a refusal alone may be the coordinator's fault or a
    //     forged alert.
    std::fs::create_dir_all(dir.path().join("refused")).unwrap();
    let refused_sites = make_sites(&dir.path().join("refused"), &[("expired-site", 20)]);
    let daemon = spawn_daemon_over(
        &url,
        &model_dir,
        &refused_sites[0],
        ClientTransport::MutualTls(expired.clone()),
    );
    let error = tokio::time::timeout(Duration::from_secs(60), daemon)
        .await
        .expect("the daemon with an expired certificate kept retrying")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, fedlora_client::error::ClientError::CertificateRefused { alert, detail }
            if alert == "CertificateExpired" && detail.starts_with("it expired on")),
        "{error}"
    );
    let (events, mut refusals) = tokio::sync::mpsc::unbounded_channel();
    let config = DaemonConfig {
        transport: ClientTransport::MutualTls(stranger.clone()),
        ..daemon_config(&url, &model_dir, &refused_sites[0])
    };
    let daemon = tokio::spawn(daemon::run(
        config,
        Arc::new(move |event: &daemon::DaemonEvent| {
            if let daemon::DaemonEvent::CertificateRefused { alert } = event {
                let _ = events.send(alert.clone());
            }
        }),
        std::future::pending(),
    ));
    let alert = tokio::time::timeout(Duration::from_secs(60), refusals.recv())
        .await
        .expect("the refusal was reported")
        .unwrap();
    assert_eq!(alert, "DecryptError");
    daemon.abort();

    // 4. Revoked: accepted, revoked in the store, refused on its next call on the same
    //    connection, without a restart.
    let (leaver_tls, leaver_serial) = pki.issue_with(IssueRequest::new("leaver", Role::Client, 5));
    let mut leaver = FederationClient::new(tls_channel(&url, &leaver_tls).await.unwrap());
    join_as(&mut leaver, "leaver", &model_dir).await.unwrap();
    store
        .revoke_certificate(&RevokedRow {
            serial: leaver_serial.clone(),
            name: "leaver".into(),
            reason: "left the federation".into(),
            revoked_ms: 1,
        })
        .await
        .unwrap();
    let status = join_as(&mut leaver, "leaver", &model_dir)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    await_audit(store.as_ref(), "request_refused", &leaver_serial).await;

    // 5. Roles: an admin certificate on the Federation service, a client one on Admin.
    let ops_tls = pki.issue("ops", Role::Admin);
    let ops_channel = tls_channel(&url, &ops_tls).await.unwrap();
    let status = join_as(
        &mut FederationClient::new(ops_channel.clone()),
        "ops",
        &model_dir,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    await_audit(
        store.as_ref(),
        "request_refused",
        "join: the admin certificate of \"ops\" may not call the federation service",
    )
    .await;
    let status = AdminClient::new(tls_channel(&url, &clinic_tls).await.unwrap())
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    await_audit(
        store.as_ref(),
        "request_refused",
        "may not call the admin service",
    )
    .await;
    let status = AdminClient::new(ops_channel)
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.federation_name, "test");

    // 6. A valid site acting as another: its name claim, and the clinic's client id on every
    //    client-bound call, are refused.
    let mallory_tls = pki.issue("mallory", Role::Client);
    let mut mallory = FederationClient::new(tls_channel(&url, &mallory_tls).await.unwrap());
    let status = join_as(&mut mallory, "clinic", &model_dir)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = mallory
        .next_task(pb::NextTaskRequest {
            client_id: clinic_id.clone(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = mallory
        .download_adapter(pb::DownloadAdapterRequest {
            client_id: clinic_id.clone(),
            round_id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = mallory
        .submit_evaluation(pb::SubmitEvaluationRequest {
            client_id: clinic_id.clone(),
            task_id: "any".into(),
            eval_loss: 1.0,
            num_eval_tokens: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = upload(&mut mallory, &clinic_id, "any", b"bytes", "0")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    await_audit(store.as_ref(), "request_refused", "submit_update: client").await;

    // 7. A caller over its rate limit (40 calls a minute here): refused, audited once.
    let flooder_tls = pki.issue("flooder", Role::Client);
    let mut flooder = FederationClient::new(tls_channel(&url, &flooder_tls).await.unwrap());
    for _ in 0..40 {
        join_as(&mut flooder, "flooder", &model_dir).await.unwrap();
    }
    for _ in 0..3 {
        let status = join_as(&mut flooder, "flooder", &model_dir)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    await_audit(store.as_ref(), "request_refused", "more than 40 calls").await;
    let rate_rows = store
        .list_audit(500)
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.detail.contains("more than 40 calls"))
        .count();
    assert_eq!(rate_rows, 1, "one audit row per caller and minute");

    // 8. Plaintext against the TLS port fails.
    let plain = format!("http://{}", running.addr);
    assert!(
        match FederationClient::connect(plain).await {
            Ok(mut client) => client.join(pb::JoinRequest::default()).await.is_err(),
            Err(_) => true,
        },
        "plaintext call accepted"
    );

    // The honest sites, over mutual TLS, close the round with the exact weighted mean.
    let daemons = sites
        .iter()
        .map(|site| {
            let tls = if site.name == "clinic" {
                clinic_tls.clone()
            } else {
                pki.issue(site.name, Role::Client)
            };
            spawn_daemon_over(&url, &model_dir, site, ClientTransport::MutualTls(tls))
        })
        .collect();
    let summaries = wait_all(daemons).await;
    running.stop().await.unwrap();
    assert_eq!(summaries[0].client_id, clinic_id);
    let federation = store.create_or_get_federation("test", "", 0).await.unwrap();
    assert_eq!(federation.state, "finished");
    let rounds = rounds_oldest_first(store.as_ref(), federation.id).await;
    let global = global_adapter(store.as_ref(), rounds[0].id).await;
    let mut parts = Vec::new();
    for site in &sites {
        let path = sent_adapter_dir(&site.state_dir, rounds[0].id as u64)
            .join("adapter_model.safetensors");
        parts.push((site.num_examples() as f64, read_adapter(&path).0));
    }
    let parts: Vec<(f64, &Adapter)> = parts
        .iter()
        .map(|(weight, adapter)| (*weight, adapter))
        .collect();
    assert_weighted_mean(&global, &parts);
}
