//! The round driver against the embedded store, without gRPC or models: task assignment, quorum,
//! aggregation, idempotency, deadlines and resumption after a crash.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use fedlora_coordinator::aggregate::fedavg;
use fedlora_coordinator::config::FederationConfig;
use fedlora_coordinator::rounds::{
    Coordinator, CoordinatorError, HeldFactors, JoinRequest, NextTask, RoundKind, TaskAssignment,
    UpdateMetrics, UpdateSubmission,
};
use fedlora_coordinator::store::{SqliteStore, Store};
use fedlora_proto::adapter::{Adapter, Factor, ModelDims, TensorSpec, adapter_spec, sha256_hex};

const FINGERPRINT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn dims() -> ModelDims {
    ModelDims {
        num_layers: 2,
        hidden_size: 8,
        intermediate_size: 16,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
    }
}

fn config(rounds: u32, clients_per_round: u32) -> FederationConfig {
    FederationConfig {
        name: "unit".into(),
        rounds,
        min_clients: 2,
        clients_per_round,
        // These tests check the plain weighted means; the default strategy is svd.
        strategy: "fedavg".into(),
        ..FederationConfig::default()
    }
}

async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    Arc::new(SqliteStore::connect(&url).await.unwrap())
}

fn join_request(name: &str) -> JoinRequest {
    JoinRequest {
        client_name: name.into(),
        max_rank: 16,
        num_examples: 10,
        base_model_fingerprint: FINGERPRINT.into(),
        model_dims: dims(),
        lora_features: fedlora_proto::adapter::LORA_FEATURES
            .map(String::from)
            .to_vec(),
    }
}

/// A coordinator started on `store` with `config`, and the ids of the sites `names` that joined.
async fn start_with_sites(
    store: &Arc<dyn Store>,
    config: &FederationConfig,
    names: &[&str],
) -> (Arc<Coordinator>, Vec<i64>) {
    let coordinator = Coordinator::start(store.clone(), config.clone())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for name in names {
        ids.push(coordinator.join(&join_request(name)).await.unwrap().id);
    }
    (coordinator, ids)
}

fn spec(config: &FederationConfig) -> Vec<TensorSpec> {
    adapter_spec(&dims(), &config.lora).unwrap()
}

fn adapter(config: &FederationConfig, seed: f32) -> Adapter {
    let mut adapter = Adapter::zeros(&spec(config));
    for (offset, tensor) in adapter.tensors.values_mut().enumerate() {
        for (index, value) in tensor.data.iter_mut().enumerate() {
            *value = seed * ((index + offset) % 5) as f32 - 0.1;
        }
    }
    adapter
}

async fn task(coordinator: &Coordinator, client_id: i64) -> TaskAssignment {
    match coordinator
        .next_task(client_id, Duration::ZERO)
        .await
        .unwrap()
    {
        NextTask::Task(task) => task,
        other => panic!("expected a task, got {other:?}"),
    }
}

/// `client`'s held-out loss over `tokens` for `task`.
async fn report(
    coordinator: &Coordinator,
    client: i64,
    task: &TaskAssignment,
    loss: f32,
    tokens: u64,
) {
    coordinator
        .submit_evaluation(client, &task.task_id, loss, tokens)
        .await
        .unwrap();
}

fn submission(
    client_id: i64,
    task: &TaskAssignment,
    adapter: &Adapter,
    examples: u64,
) -> UpdateSubmission {
    let bytes = adapter.to_safetensors(None).unwrap();
    UpdateSubmission {
        client_id,
        task_id: task.task_id.clone(),
        num_examples: examples,
        claimed_sha256: sha256_hex(&bytes),
        bytes,
        metrics: UpdateMetrics {
            steps: 1,
            tokens: 8,
            train_loss: 2.0,
            eval_loss: 2.5,
            seconds: 0.1,
            eval_tokens: Some(16),
        },
    }
}

#[tokio::test]
async fn join_pins_the_base_model_and_checks_requests() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(store(&dir).await, config(1, 2))
        .await
        .unwrap();
    let first = coordinator.join(&join_request("site-a")).await.unwrap();
    let again = coordinator.join(&join_request("site-a")).await.unwrap();
    assert_eq!(first.id, again.id, "a returning site keeps its id");

    let other_model = JoinRequest {
        base_model_fingerprint: "f".repeat(64),
        ..join_request("site-b")
    };
    assert!(matches!(
        coordinator.join(&other_model).await,
        Err(CoordinatorError::ModelMismatch(_))
    ));
    let other_dims = JoinRequest {
        model_dims: ModelDims {
            hidden_size: 16,
            ..dims()
        },
        ..join_request("site-b")
    };
    assert!(matches!(
        coordinator.join(&other_dims).await,
        Err(CoordinatorError::ModelMismatch(_))
    ));
    let bad_name = join_request("site b; drop table");
    assert!(matches!(
        coordinator.join(&bad_name).await,
        Err(CoordinatorError::InvalidJoin(_))
    ));
    let low_rank = JoinRequest {
        max_rank: 2,
        ..join_request("site-c")
    };
    assert!(matches!(
        coordinator.join(&low_rank).await,
        Err(CoordinatorError::InvalidJoin(_))
    ));
    assert!(matches!(
        coordinator.next_task(999, Duration::ZERO).await,
        Err(CoordinatorError::UnknownClient(999))
    ));
}

#[tokio::test]
async fn join_refuses_clients_that_cannot_train_the_federations_lora() {
    let dir = tempfile::tempdir().unwrap();
    let mut federation = config(1, 2);
    federation.lora.use_dora = true;
    federation.lora.rank_pattern = vec![("q_proj".into(), 24)];
    let coordinator = Coordinator::start(store(&dir).await, federation)
        .await
        .unwrap();
    // An older client that announces no LoRA options.
    let old_client = JoinRequest {
        lora_features: Vec::new(),
        ..join_request("site-a")
    };
    let error = coordinator.join(&old_client).await.unwrap_err();
    assert!(
        matches!(&error, CoordinatorError::MissingFeatures(missing) if missing == "dora, rank_pattern")
    );
    assert_eq!(
        fedlora_coordinator::grpc::to_status(&error).code(),
        tonic::Code::FailedPrecondition
    );
    // max rank 16 is enough for the default rank 8, not for q_proj's 24.
    assert!(matches!(
        coordinator.join(&join_request("site-b")).await,
        Err(CoordinatorError::InvalidJoin(message)) if message.contains("24")
    ));
    let able = JoinRequest {
        max_rank: 32,
        ..join_request("site-c")
    };
    coordinator.join(&able).await.unwrap();
}

#[tokio::test]
async fn a_full_federation_aggregates_each_round_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = config(2, 2);
    let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    let mut base = None;
    for (round_index, seed) in [(0, 1.0f32), (1, -0.5)] {
        let task_a = task(&coordinator, a).await;
        assert_eq!(task_a.kind, RoundKind::Train);
        assert_eq!(task_a.base_round_id, base);
        let task_b = task(&coordinator, b).await;
        assert_eq!(task_b.round_id, task_a.round_id);
        assert!(
            matches!(
                coordinator.next_task(c, Duration::ZERO).await.unwrap(),
                NextTask::Wait { .. }
            ),
            "the round is full"
        );
        // Asking again returns the same unfinished task.
        assert_eq!(task(&coordinator, a).await, task_a);

        let (update_a, update_b) = (adapter(&config, seed), adapter(&config, seed * 3.0));
        let receipt = coordinator
            .submit_update(submission(a, &task_a, &update_a, 30))
            .await
            .unwrap();
        let retry = coordinator
            .submit_update(submission(a, &task_a, &update_a, 30))
            .await
            .unwrap();
        assert_eq!(
            receipt, retry,
            "a retry of the same bytes gets the same receipt"
        );
        assert!(matches!(
            coordinator
                .submit_update(submission(a, &task_a, &update_b, 30))
                .await,
            Err(CoordinatorError::AlreadySubmitted(_))
        ));
        assert!(matches!(
            coordinator
                .submit_update(submission(a, &task_b, &update_a, 30))
                .await,
            Err(CoordinatorError::NotYourTask(_))
        ));
        coordinator
            .submit_update(submission(b, &task_b, &update_b, 10))
            .await
            .unwrap();

        let round = store.get_round(task_a.round_id).await.unwrap().unwrap();
        assert_eq!(round.state, "closed", "round {round_index}");
        let global = store.global_adapter(round.id).await.unwrap().unwrap();
        let expected = fedavg(&spec(&config), &[(30.0, &update_a), (10.0, &update_b)]).unwrap();
        assert_eq!(Adapter::from_safetensors(&global.bytes).unwrap(), expected);
        for update in store.list_updates(round.id).await.unwrap() {
            assert_eq!(
                store.update_bytes(update.id).await.unwrap(),
                None,
                "retention deletes update bytes"
            );
        }
        base = Some(round.id);
    }

    let eval_a = task(&coordinator, a).await;
    assert_eq!(
        (eval_a.kind, eval_a.base_round_id),
        (RoundKind::Evaluate, base)
    );
    let eval_b = task(&coordinator, b).await;
    assert!(matches!(
        coordinator
            .submit_update(submission(a, &eval_a, &adapter(&config, 1.0), 1))
            .await,
        Err(CoordinatorError::WrongTaskKind { .. })
    ));
    report(&coordinator, a, &eval_a, 1.5, 100).await;
    report(&coordinator, b, &eval_b, 2.5, 300).await;
    assert!(matches!(
        coordinator.next_task(a, Duration::ZERO).await.unwrap(),
        NextTask::Finished { .. }
    ));
    let summaries = coordinator.rounds(10).await.unwrap();
    assert_eq!(summaries.len(), 3);
    assert!(
        (summaries[0].mean_eval_loss - 2.25).abs() < 1e-9,
        "token-weighted mean"
    );
    assert_eq!(summaries[1].updates, 2);
    assert_eq!(summaries[1].examples, 40);
    let status = coordinator.status().await.unwrap();
    assert_eq!(
        (status.federation.state.as_str(), status.rounds_closed),
        ("finished", 2)
    );
}

/// A site with no held-out window at the task's sequence length reports 0 tokens: its report
/// completes an evaluation round like any other, but its loss is stored as 0, shows as none and
/// counts in no mean; an update's local evaluation of 0 tokens is kept as such.
#[tokio::test]
async fn a_report_of_no_heldout_tokens_counts_as_a_report_without_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = config(1, 2);
    let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b"]).await;
    let (a, b) = (ids[0], ids[1]);
    let (task_a, task_b) = (task(&coordinator, a).await, task(&coordinator, b).await);
    report(&coordinator, a, &task_a, 0.0, 0).await;
    report(&coordinator, b, &task_b, 3.0, 64).await;
    // A loss over no tokens is no measurement: stored as 0.
    let mut unmeasured = submission(a, &task_a, &adapter(&config, 1.0), 20);
    unmeasured.metrics.eval_tokens = Some(0);
    coordinator.submit_update(unmeasured).await.unwrap();
    coordinator
        .submit_update(submission(b, &task_b, &adapter(&config, 2.0), 20))
        .await
        .unwrap();
    let updates = store.list_updates(task_a.round_id).await.unwrap();
    let local = |client| {
        let update = updates
            .iter()
            .find(|update| update.client_id == client)
            .unwrap();
        (update.local_eval_loss, update.local_eval_tokens)
    };
    assert_eq!(local(a), (0.0, Some(0)));
    assert_eq!(local(b), (2.5, Some(16)));

    // The evaluation round: a's report, with a loss that is no measurement, still closes it.
    let (eval_a, eval_b) = (task(&coordinator, a).await, task(&coordinator, b).await);
    assert_eq!(eval_a.kind, RoundKind::Evaluate);
    report(&coordinator, a, &eval_a, 7.0, 0).await;
    report(&coordinator, b, &eval_b, 2.0, 300).await;
    assert!(matches!(
        coordinator.next_task(a, Duration::ZERO).await.unwrap(),
        NextTask::Finished { .. }
    ));
    let stored = store.list_evaluations(eval_a.round_id).await.unwrap();
    let stored_a = stored.iter().find(|row| row.client_id == a).unwrap();
    assert_eq!((stored_a.eval_loss, stored_a.num_tokens), (0.0, 0));
    let summaries = coordinator.rounds(10).await.unwrap();
    for (summary, b_loss) in [(&summaries[0], 2.0), (&summaries[1], 3.0)] {
        assert_eq!(summary.mean_eval_loss, b_loss, "b's loss alone");
        assert!(summary.eval_loss_of("a").is_nan());
        assert_eq!(summary.eval_loss_of("b"), b_loss);
    }
    assert_eq!(summaries[0].round.state, "closed");
}

#[tokio::test]
async fn a_round_without_quorum_fails_at_its_deadline_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = FederationConfig {
        round_timeout_secs: 1,
        ..config(1, 2)
    };
    let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b"]).await;
    let (a, b) = (ids[0], ids[1]);
    let task_a = task(&coordinator, a).await;
    let _task_b = task(&coordinator, b).await;
    coordinator
        .submit_update(submission(a, &task_a, &adapter(&config, 1.0), 5))
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(1100)).await;
    coordinator.tick().await.unwrap();
    let failed = store.get_round(task_a.round_id).await.unwrap().unwrap();
    assert_eq!(failed.state, "failed");
    assert!(failed.failure.unwrap().contains("1 of 2"));
    let retry = task(&coordinator, a).await;
    assert_ne!(retry.round_id, task_a.round_id);
    assert_eq!((retry.kind, retry.base_round_id), (RoundKind::Train, None));
    // A late update for the failed round is refused.
    let late = coordinator
        .submit_update(submission(b, &_task_b, &adapter(&config, 1.0), 5))
        .await;
    assert!(
        matches!(late, Err(CoordinatorError::StaleRound { .. })),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_restarted_coordinator_finishes_an_interrupted_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = config(1, 2);
    let (task_a, task_b, update_a, update_b);
    {
        let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b"]).await;
        let (a, b) = (ids[0], ids[1]);
        task_a = task(&coordinator, a).await;
        task_b = task(&coordinator, b).await;
        update_a = adapter(&config, 0.25);
        update_b = adapter(&config, 4.0);
        coordinator
            .submit_update(submission(a, &task_a, &update_a, 3))
            .await
            .unwrap();
        // The coordinator "crashes" after moving the round to aggregating with both updates durable.
        assert!(
            store
                .transition_round(task_a.round_id, "collecting", "aggregating", None, 0)
                .await
                .unwrap()
        );
        let bytes = update_b.to_safetensors(None).unwrap();
        store
            .insert_update(&fedlora_coordinator::store::NewUpdate {
                task_id: task_b.task_id.clone(),
                round_id: task_b.round_id,
                client_id: b,
                num_examples: 1,
                sha256: sha256_hex(&bytes),
                bytes,
                train_loss: 1.0,
                local_eval_loss: 1.0,
                local_eval_tokens: None,
                steps: 1,
                tokens: 1,
                train_seconds: 0.0,
                now_ms: 0,
            })
            .await
            .unwrap();
    }
    let restarted = Coordinator::start(store.clone(), config.clone())
        .await
        .unwrap();
    let round = store.get_round(task_a.round_id).await.unwrap().unwrap();
    assert_eq!(round.state, "closed");
    let global =
        Adapter::from_safetensors(&store.global_adapter(round.id).await.unwrap().unwrap().bytes)
            .unwrap();
    assert_eq!(
        global,
        fedavg(&spec(&config), &[(3.0, &update_a), (1.0, &update_b)]).unwrap()
    );
    let status = restarted.status().await.unwrap();
    assert_eq!(status.current_round.unwrap().kind, "evaluate");

    let changed = FederationConfig {
        rounds: 5,
        ..config
    };
    assert!(matches!(
        Coordinator::start(store, changed).await,
        Err(CoordinatorError::ConfigChanged { .. })
    ));
}

/// FedAvgM through the driver: round 1 starts from the seeded initialisation (which the
/// coordinator computes as clients do), round 2 from round 1's global adapter and the momentum
/// stored with it.
#[tokio::test]
async fn server_momentum_carries_over_between_rounds() {
    use fedlora_coordinator::aggregate::ServerOptimizer;
    use fedlora_coordinator::rounds::round_seed;
    use fedlora_proto::factors::initial_factors;

    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = FederationConfig {
        server_optimizer: ServerOptimizer::Momentum {
            learning_rate: 1.0,
            momentum: 0.5,
        },
        ..config(2, 2)
    };
    let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b"]).await;
    let (a, b) = (ids[0], ids[1]);
    let mut globals = Vec::new();
    let mut first_round = 0;
    for seed in [1.0f32, -0.5] {
        let (task_a, task_b) = (task(&coordinator, a).await, task(&coordinator, b).await);
        if globals.is_empty() {
            first_round = task_a.round_id;
        }
        // Both sites send the same adapter, so the plain aggregate is that adapter.
        let update = adapter(&config, seed);
        for (client, task) in [(a, &task_a), (b, &task_b)] {
            coordinator
                .submit_update(submission(client, task, &update, 10))
                .await
                .unwrap();
        }
        let row = store
            .global_adapter(task_a.round_id)
            .await
            .unwrap()
            .unwrap();
        assert!(
            row.optimizer_state.is_some(),
            "momentum stored with the adapter"
        );
        globals.push((update, Adapter::from_safetensors(&row.bytes).unwrap()));
    }
    let start = initial_factors(&dims(), &config.lora, round_seed(first_round)).unwrap();
    // Round 1: m = Δ₁ = x̄₁ − x₀, so the global adapter is x̄₁ itself.
    assert_eq!(globals[0].1, globals[0].0);
    // Round 2: m = 0.5·Δ₁ + Δ₂, global = x₁ + m = x̄₂ + 0.5·(x̄₁ − x₀).
    for (name, tensor) in &globals[1].1.tensors {
        for (index, value) in tensor.data.iter().enumerate() {
            let expected = globals[1].0.tensors[name].data[index]
                + 0.5 * (globals[0].0.tensors[name].data[index] - start.tensors[name].data[index]);
            assert!(
                (value - expected).abs() < 1e-5,
                "{name}[{index}]: {value} vs {expected}"
            );
        }
    }
}

/// A norm bound that rejects: the far update is left out and audited, the round closes with the
/// honest one; a round where every update is left out fails and is retried.
#[tokio::test]
async fn updates_over_the_norm_bound_are_left_out_and_audited() {
    use fedlora_coordinator::aggregate::{NormAction, Robustness};
    use fedlora_coordinator::rounds::round_seed;
    use fedlora_proto::factors::initial_factors;

    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let config = FederationConfig {
        min_clients: 1,
        robustness: Robustness {
            max_update_norm: Some(0.5),
            norm_action: NormAction::Reject,
            trim_fraction: 0.0,
        },
        ..config(2, 2)
    };
    let (coordinator, ids) = start_with_sites(&store, &config, &["a", "b"]).await;
    let (a, b) = (ids[0], ids[1]);
    let (task_a, task_b) = (task(&coordinator, a).await, task(&coordinator, b).await);
    let start = initial_factors(&dims(), &config.lora, round_seed(task_a.round_id)).unwrap();
    let mut honest = start.clone();
    honest.tensors.values_mut().next().unwrap().data[0] += 0.1;
    coordinator
        .submit_update(submission(a, &task_a, &adapter(&config, 5.0), 10))
        .await
        .unwrap();
    coordinator
        .submit_update(submission(b, &task_b, &honest, 10))
        .await
        .unwrap();
    let round = store.get_round(task_a.round_id).await.unwrap().unwrap();
    assert_eq!(round.state, "closed");
    let global = store.global_adapter(round.id).await.unwrap().unwrap();
    assert_eq!(global.num_updates, 1);
    assert_eq!(Adapter::from_safetensors(&global.bytes).unwrap(), honest);
    let audit = store.list_audit(10).await.unwrap();
    assert!(audit.iter().any(|event| event.kind == "update_left_out"
        && event.client_id == Some(a)
        && event.detail.contains("above the bound 0.5")));

    // Round 2: both far away; nothing left to aggregate, so the round fails and is retried.
    let (task_a, task_b) = (task(&coordinator, a).await, task(&coordinator, b).await);
    for (client, task) in [(a, &task_a), (b, &task_b)] {
        coordinator
            .submit_update(submission(client, task, &adapter(&config, 9.0), 10))
            .await
            .unwrap();
    }
    let failed = store.get_round(task_a.round_id).await.unwrap().unwrap();
    assert_eq!(failed.state, "failed");
    assert!(failed.failure.unwrap().contains("none of the 2 updates"));
    let retry = task(&coordinator, a).await;
    assert_eq!(retry.base_round_id, Some(round.id));
    assert_ne!(retry.round_id, failed.id);
}

/// `ffa` needs clients that can freeze a factor; lower ranks need `min_rank`; tasks carry the
/// client's rank with the alpha that keeps the federation's scale.
#[tokio::test]
async fn strategies_gate_joins_and_shape_tasks() {
    use fedlora_coordinator::aggregate::Trained;

    let dir = tempfile::tempdir().unwrap();
    let config = FederationConfig {
        strategy: "ffa".into(),
        min_rank: Some(2),
        ..config(1, 2)
    };
    let coordinator = Coordinator::start(store(&dir).await, config.clone())
        .await
        .unwrap();
    let error = coordinator.join(&join_request("old")).await.unwrap_err();
    assert!(
        matches!(&error, CoordinatorError::MissingFeatures(missing) if missing.contains("single_factor"))
    );
    let able = |name: &str, max_rank: usize| JoinRequest {
        max_rank,
        lora_features: fedlora_proto::adapter::LORA_FEATURES
            .iter()
            .chain(&[fedlora_proto::factors::SINGLE_FACTOR])
            .map(|feature| feature.to_string())
            .collect(),
        ..join_request(name)
    };
    assert!(matches!(
        coordinator.join(&able("tiny", 1)).await,
        Err(CoordinatorError::InvalidJoin(_))
    ));
    let low = coordinator.join(&able("low", 2)).await.unwrap().id;
    let high = coordinator.join(&able("high", 64)).await.unwrap().id;
    let low_task = task(&coordinator, low).await;
    let high_task = task(&coordinator, high).await;
    assert_eq!(low_task.trained, Trained::B);
    assert_eq!((low_task.lora.rank, low_task.lora.alpha), (2, 4.0));
    assert_eq!((high_task.lora.rank, high_task.lora.alpha), (8, 16.0));
    // An update at the federation's rank does not fit the rank-2 task.
    let error = coordinator
        .submit_update(submission(low, &low_task, &adapter(&config, 1.0), 10))
        .await
        .unwrap_err();
    assert!(matches!(error, CoordinatorError::InvalidUpdate(_)));
}

/// A lower-rank site downloads global adapters cut to its task's rank, even after it rejoins
/// announcing a larger max rank mid-round.
#[tokio::test]
async fn downloads_are_cut_to_the_tasks_rank() {
    use fedlora_proto::factors::client_spec;

    let dir = tempfile::tempdir().unwrap();
    let config = FederationConfig {
        min_rank: Some(2),
        ..config(2, 2)
    };
    let coordinator = Coordinator::start(store(&dir).await, config.clone())
        .await
        .unwrap();
    let with_rank = |name: &str, max_rank: usize| JoinRequest {
        max_rank,
        ..join_request(name)
    };
    let low = coordinator.join(&with_rank("low", 2)).await.unwrap().id;
    let high = coordinator.join(&with_rank("high", 8)).await.unwrap().id;
    let (low_task, high_task) = (
        task(&coordinator, low).await,
        task(&coordinator, high).await,
    );
    let low_spec = client_spec(&dims(), &config.lora, 2).unwrap();
    let mut low_update = Adapter::zeros(&low_spec);
    for tensor in low_update.tensors.values_mut() {
        tensor.data.fill(0.25);
    }
    coordinator
        .submit_update(submission(low, &low_task, &low_update, 10))
        .await
        .unwrap();
    coordinator
        .submit_update(submission(high, &high_task, &adapter(&config, 1.0), 10))
        .await
        .unwrap();
    let first_round = low_task.round_id;
    // Round 2: the low site holds a rank-2 task, then rejoins claiming rank 8.
    let second = task(&coordinator, low).await;
    assert_eq!(second.lora.rank, 2);
    coordinator.join(&with_rank("low", 8)).await.unwrap();
    let row = coordinator
        .global_adapter(low, first_round, &HeldFactors::default())
        .await
        .unwrap();
    let downloaded = Adapter::from_safetensors(&row.bytes).unwrap();
    downloaded.validate(&low_spec).unwrap();
    assert_eq!(row.sha256, sha256_hex(&row.bytes));
    assert!(row.omitted.is_empty());
    // A client that holds A at its rank gets only B, and fills A back from what it holds.
    let held = HeldFactors {
        a: Some(downloaded.factor_digest(Factor::A)),
        b: Some("0".repeat(64)),
    };
    let lean = coordinator
        .global_adapter(low, first_round, &held)
        .await
        .unwrap();
    assert_eq!(lean.omitted, [Factor::A]);
    assert_eq!(lean.sha256, sha256_hex(&lean.bytes));
    assert!(lean.bytes.len() < row.bytes.len());
    let mut filled = Adapter::from_safetensors(&lean.bytes).unwrap();
    assert!(
        filled
            .tensors
            .keys()
            .all(|name| Factor::of_name(name) != Some(Factor::A))
    );
    filled.fill_factor(&downloaded, Factor::A);
    assert_eq!(filled, downloaded);
    // The high site gets the full rank.
    let full = coordinator
        .global_adapter(high, first_round, &HeldFactors::default())
        .await
        .unwrap();
    Adapter::from_safetensors(&full.bytes)
        .unwrap()
        .validate(&spec(&config))
        .unwrap();
}
