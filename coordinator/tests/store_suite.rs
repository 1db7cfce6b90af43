//! The store test suite: every test is written once against `&dyn Store` and run on PostgreSQL
//! (`#[sqlx::test]`, a fresh migrated database per test, from `DATABASE_URL`) and on SQLite (a fresh
//! file in a temporary directory).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use fedlora_coordinator::store::{
    ClientRow, EvaluationRow, FederationRow, GlobalAdapterRow, NewRound, NewUpdate, RevokedRow,
    RoundRow, Store, StoreError, TaskRow,
};

const CONFIG_JSON: &str = r#"{"min_clients":2}"#;

/// A federation with one client, ready for rounds.
async fn federation_and_client(store: &dyn Store) -> (FederationRow, ClientRow) {
    let federation = store
        .create_or_get_federation("fed", CONFIG_JSON, 1_000)
        .await
        .unwrap();
    let client = store
        .upsert_client(federation.id, "alice", 8, 100, 1_000)
        .await
        .unwrap();
    (federation, client)
}

fn new_round(federation_id: i64, base_round_id: Option<i64>, now_ms: i64) -> NewRound {
    NewRound {
        federation_id,
        kind: "train".to_string(),
        base_round_id,
        lora_json: r#"{"rank":8}"#.to_string(),
        training_json: r#"{"steps":10}"#.to_string(),
        strategy: "fedavg".to_string(),
        trained: "both".to_string(),
        deadline_ms: now_ms + 60_000,
        now_ms,
    }
}

fn task(id: &str, round: &RoundRow, client: &ClientRow, created_ms: i64) -> TaskRow {
    TaskRow {
        id: id.to_string(),
        round_id: round.id,
        client_id: client.id,
        rank: 8,
        created_ms,
    }
}

fn new_update(task: &TaskRow, bytes: Vec<u8>) -> NewUpdate {
    NewUpdate {
        task_id: task.id.clone(),
        round_id: task.round_id,
        client_id: task.client_id,
        num_examples: 100,
        sha256: format!("sha-{}", task.id),
        bytes,
        train_loss: 1.25,
        local_eval_loss: 1.5,
        local_eval_tokens: Some(640),
        steps: 10,
        tokens: 4_096,
        train_seconds: 2.5,
        now_ms: 5_000,
    }
}

fn adapter(round_id: i64) -> GlobalAdapterRow {
    GlobalAdapterRow {
        round_id,
        sha256: "global-sha".to_string(),
        bytes: vec![9, 8, 7, 6],
        num_updates: 2,
        num_examples: 250,
        created_ms: 9_000,
        optimizer_state: None,
    }
}

/// A round in state `aggregating` with two clients' updates (bytes `[1, 2, 3]` and `[4, 5]`).
async fn aggregating_round_with_updates(store: &dyn Store) -> (RoundRow, Vec<i64>) {
    let (federation, alice) = federation_and_client(store).await;
    let bob = store
        .upsert_client(federation.id, "bob", 4, 150, 1_000)
        .await
        .unwrap();
    let round = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    let mut update_ids = Vec::new();
    for (client, task_id, bytes) in [(&alice, "t-a", vec![1, 2, 3]), (&bob, "t-b", vec![4, 5])] {
        let task = task(task_id, &round, client, 3_000);
        store.insert_task(&task).await.unwrap();
        update_ids.push(
            store
                .insert_update(&new_update(&task, bytes))
                .await
                .unwrap()
                .id,
        );
    }
    assert!(
        store
            .transition_round(round.id, "open", "collecting", None, 4_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .transition_round(round.id, "collecting", "aggregating", None, 5_000)
            .await
            .unwrap()
    );
    (round, update_ids)
}

async fn federation_create_get_and_pin(store: &dyn Store) {
    let created = store
        .create_or_get_federation("fed", CONFIG_JSON, 1_000)
        .await
        .unwrap();
    assert_eq!(created.name, "fed");
    assert_eq!(created.config_json, CONFIG_JSON);
    assert_eq!(created.state, "running");
    assert_eq!(created.created_ms, 1_000);
    assert_eq!(created.base_model_fingerprint, None);
    assert_eq!(created.model_dims_json, None);

    // Idempotent: the second call returns the first row, whatever its arguments.
    let again = store
        .create_or_get_federation("fed", r#"{"other":true}"#, 2_000)
        .await
        .unwrap();
    assert_eq!(again, created);
    let other = store
        .create_or_get_federation("other", CONFIG_JSON, 3_000)
        .await
        .unwrap();
    assert_ne!(other.id, created.id);
    assert_eq!(
        store.get_federation(created.id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        store.get_federation(created.id + 1_000).await.unwrap(),
        None
    );

    // The first pin wins; a second pin with another fingerprint leaves it.
    let pinned = store
        .pin_base_model(created.id, "fp-1", r#"{"layers":2}"#)
        .await
        .unwrap();
    assert_eq!(pinned.base_model_fingerprint.as_deref(), Some("fp-1"));
    assert_eq!(pinned.model_dims_json.as_deref(), Some(r#"{"layers":2}"#));
    let second = store
        .pin_base_model(created.id, "fp-2", r#"{"layers":3}"#)
        .await
        .unwrap();
    assert_eq!(second, pinned);
    assert_eq!(
        store.get_federation(created.id).await.unwrap(),
        Some(pinned)
    );
    // The other federation is untouched.
    assert_eq!(
        store
            .get_federation(other.id)
            .await
            .unwrap()
            .unwrap()
            .base_model_fingerprint,
        None
    );
    assert!(matches!(
        store.pin_base_model(created.id + 1_000, "fp", "{}").await,
        Err(StoreError::NotFound(_))
    ));

    store
        .set_federation_state(created.id, "finished")
        .await
        .unwrap();
    assert_eq!(
        store
            .get_federation(created.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        "finished"
    );
    assert!(matches!(
        store.set_federation_state(created.id, "bogus").await,
        Err(StoreError::Database(_))
    ));
}

async fn client_upsert_keeps_id(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    assert_eq!(alice.federation_id, federation.id);
    assert_eq!(alice.name, "alice");
    assert_eq!(
        (
            alice.max_rank,
            alice.num_examples,
            alice.joined_ms,
            alice.last_seen_ms
        ),
        (8, 100, 1_000, 1_000)
    );

    let rejoined = store
        .upsert_client(federation.id, "alice", 16, 300, 7_000)
        .await
        .unwrap();
    assert_eq!(rejoined.id, alice.id);
    assert_eq!(
        (
            rejoined.max_rank,
            rejoined.num_examples,
            rejoined.joined_ms,
            rejoined.last_seen_ms
        ),
        (16, 300, 1_000, 7_000)
    );
    assert_eq!(
        store.get_client(alice.id).await.unwrap(),
        Some(rejoined.clone())
    );

    let bob = store
        .upsert_client(federation.id, "bob", 4, 50, 8_000)
        .await
        .unwrap();
    assert_ne!(bob.id, alice.id);
    // The same name in another federation is another client.
    let elsewhere = store
        .create_or_get_federation("elsewhere", CONFIG_JSON, 1_000)
        .await
        .unwrap();
    let alice_elsewhere = store
        .upsert_client(elsewhere.id, "alice", 8, 10, 9_000)
        .await
        .unwrap();
    assert_ne!(alice_elsewhere.id, alice.id);

    store.touch_client(bob.id, 10_000).await.unwrap();
    let bob = ClientRow {
        last_seen_ms: 10_000,
        ..bob
    };
    assert_eq!(
        store.list_clients(federation.id).await.unwrap(),
        vec![rejoined, bob]
    );
    assert_eq!(
        store.list_clients(elsewhere.id).await.unwrap(),
        vec![alice_elsewhere]
    );
    assert_eq!(store.get_client(alice.id + 1_000).await.unwrap(), None);
    assert!(matches!(
        store.touch_client(alice.id + 1_000, 1).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn rounds_insert_latest_list(store: &dyn Store) {
    let (federation, _) = federation_and_client(store).await;
    assert_eq!(store.latest_round(federation.id).await.unwrap(), None);
    assert!(
        store
            .list_rounds(federation.id, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let first = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    assert_eq!(first.federation_id, federation.id);
    assert_eq!(first.kind, "train");
    assert_eq!(first.state, "open");
    assert_eq!(first.base_round_id, None);
    assert_eq!(first.lora_json, r#"{"rank":8}"#);
    assert_eq!(first.training_json, r#"{"steps":10}"#);
    assert_eq!(first.strategy, "fedavg");
    assert_eq!(first.deadline_ms, 62_000);
    assert_eq!(first.created_ms, 2_000);
    assert_eq!(first.closed_ms, None);
    assert_eq!(first.failure, None);

    let second = store
        .insert_round(&new_round(federation.id, Some(first.id), 3_000))
        .await
        .unwrap();
    let third = store
        .insert_round(&NewRound {
            kind: "evaluate".to_string(),
            trained: "b".to_string(),
            ..new_round(federation.id, Some(second.id), 4_000)
        })
        .await
        .unwrap();
    assert_eq!(second.base_round_id, Some(first.id));
    assert_eq!(
        (second.trained.as_str(), third.trained.as_str()),
        ("both", "b")
    );
    assert_eq!(third.kind, "evaluate");

    assert_eq!(
        store.latest_round(federation.id).await.unwrap(),
        Some(third.clone())
    );
    assert_eq!(
        store.get_round(second.id).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(store.get_round(third.id + 1_000).await.unwrap(), None);
    assert_eq!(
        store.list_rounds(federation.id, 10).await.unwrap(),
        vec![third.clone(), second.clone(), first]
    );
    assert_eq!(
        store.list_rounds(federation.id, 2).await.unwrap(),
        vec![third, second]
    );

    // Rounds of another federation are not listed.
    let other = store
        .create_or_get_federation("other", CONFIG_JSON, 1_000)
        .await
        .unwrap();
    assert_eq!(store.latest_round(other.id).await.unwrap(), None);
    assert!(store.list_rounds(other.id, 10).await.unwrap().is_empty());

    // The schema refuses unknown kinds and factors.
    assert!(
        store
            .insert_round(&NewRound {
                kind: "bogus".to_string(),
                ..new_round(federation.id, None, 5_000)
            })
            .await
            .is_err()
    );
    assert!(
        store
            .insert_round(&NewRound {
                trained: "c".to_string(),
                ..new_round(federation.id, None, 5_000)
            })
            .await
            .is_err()
    );
}

async fn transition_round_compare_and_set(store: &dyn Store) {
    let (federation, _) = federation_and_client(store).await;
    let round = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();

    // Wrong `from`: nothing changes.
    assert!(
        !store
            .transition_round(round.id, "collecting", "aggregating", None, 3_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_round(round.id).await.unwrap(),
        Some(round.clone())
    );

    // A non-terminal transition leaves closed_ms and failure unset.
    assert!(
        store
            .transition_round(round.id, "open", "collecting", None, 3_000)
            .await
            .unwrap()
    );
    let collecting = store.get_round(round.id).await.unwrap().unwrap();
    assert_eq!(collecting.state, "collecting");
    assert_eq!(collecting.closed_ms, None);
    assert_eq!(collecting.failure, None);
    // The same transition a second time does nothing.
    assert!(
        !store
            .transition_round(round.id, "open", "collecting", None, 3_500)
            .await
            .unwrap()
    );

    assert!(
        store
            .transition_round(round.id, "collecting", "aggregating", None, 4_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .transition_round(round.id, "aggregating", "closed", None, 5_000)
            .await
            .unwrap()
    );
    let closed = store.get_round(round.id).await.unwrap().unwrap();
    assert_eq!(closed.state, "closed");
    assert_eq!(closed.closed_ms, Some(5_000));
    assert_eq!(closed.failure, None);
    assert!(
        !store
            .transition_round(round.id, "aggregating", "failed", Some("late"), 6_000)
            .await
            .unwrap()
    );
    assert_eq!(store.get_round(round.id).await.unwrap(), Some(closed));

    // Failing a round records the reason and the time.
    let second = store
        .insert_round(&new_round(federation.id, None, 7_000))
        .await
        .unwrap();
    assert!(
        store
            .transition_round(second.id, "open", "failed", Some("quorum not met"), 8_000)
            .await
            .unwrap()
    );
    let failed = store.get_round(second.id).await.unwrap().unwrap();
    assert_eq!(failed.state, "failed");
    assert_eq!(failed.closed_ms, Some(8_000));
    assert_eq!(failed.failure.as_deref(), Some("quorum not met"));

    // A missing round is not an error, just no change.
    assert!(
        !store
            .transition_round(second.id + 1_000, "open", "collecting", None, 9_000)
            .await
            .unwrap()
    );
}

async fn tasks_insert_get_and_conflict(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    let bob = store
        .upsert_client(federation.id, "bob", 4, 50, 1_000)
        .await
        .unwrap();
    let round = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    let task_bob = task("task-bob", &round, &bob, 3_000);
    let task_alice = task("task-alice", &round, &alice, 3_000);
    store.insert_task(&task_bob).await.unwrap();
    store.insert_task(&task_alice).await.unwrap();

    assert_eq!(
        store.get_task("task-bob").await.unwrap(),
        Some(task_bob.clone())
    );
    assert_eq!(store.get_task("missing").await.unwrap(), None);
    assert_eq!(
        store.task_for_client(round.id, alice.id).await.unwrap(),
        Some(task_alice.clone())
    );
    // Same creation time: ordered by client.
    assert_eq!(
        store.list_tasks(round.id).await.unwrap(),
        vec![task_alice.clone(), task_bob.clone()]
    );

    // A second task for the same client and round, or a reused task id, is a conflict.
    let duplicate = store
        .insert_task(&task("task-alice-2", &round, &alice, 4_000))
        .await;
    assert!(
        matches!(&duplicate, Err(StoreError::Conflict(message)) if message == &message.to_lowercase()),
        "{duplicate:?}"
    );
    let next_round = store
        .insert_round(&new_round(federation.id, Some(round.id), 5_000))
        .await
        .unwrap();
    assert!(matches!(
        store
            .insert_task(&task("task-alice", &next_round, &alice, 6_000))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_tasks(round.id).await.unwrap().len(), 2);
    assert!(store.list_tasks(next_round.id).await.unwrap().is_empty());
    assert_eq!(
        store
            .task_for_client(next_round.id, alice.id)
            .await
            .unwrap(),
        None
    );
}

async fn updates_insert_bytes_and_conflict(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    let round = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    let task_alice = task("task-1", &round, &alice, 3_000);
    store.insert_task(&task_alice).await.unwrap();

    let bytes: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    let update = store
        .insert_update(&new_update(&task_alice, bytes.clone()))
        .await
        .unwrap();
    assert_eq!(update.task_id, "task-1");
    assert_eq!(update.round_id, round.id);
    assert_eq!(update.client_id, alice.id);
    assert_eq!(update.num_examples, 100);
    assert_eq!(update.sha256, "sha-task-1");
    assert_eq!(update.size_bytes, 70_000);
    assert_eq!(update.train_loss, 1.25);
    assert_eq!(update.local_eval_loss, 1.5);
    assert_eq!(update.local_eval_tokens, Some(640));
    assert_eq!(update.steps, 10);
    assert_eq!(update.tokens, 4_096);
    assert_eq!(update.train_seconds, 2.5);
    assert_eq!(update.received_ms, 5_000);

    assert_eq!(
        store.update_for_task("task-1").await.unwrap(),
        Some(update.clone())
    );
    assert_eq!(store.update_for_task("missing").await.unwrap(), None);
    assert_eq!(
        store.list_updates(round.id).await.unwrap(),
        vec![update.clone()]
    );
    assert_eq!(store.update_bytes(update.id).await.unwrap(), Some(bytes));
    assert_eq!(store.update_bytes(update.id + 1_000).await.unwrap(), None);

    // A second update for the task (a replay) is a conflict and changes nothing.
    let replay = store.insert_update(&new_update(&task_alice, vec![1])).await;
    assert!(
        matches!(&replay, Err(StoreError::Conflict(message)) if message == &message.to_lowercase()),
        "{replay:?}"
    );
    assert_eq!(
        store.list_updates(round.id).await.unwrap(),
        vec![update.clone()]
    );

    // An empty update is stored as empty bytes, not as deleted ones.
    let bob = store
        .upsert_client(federation.id, "bob", 4, 50, 1_000)
        .await
        .unwrap();
    let task_bob = task("task-2", &round, &bob, 3_000);
    store.insert_task(&task_bob).await.unwrap();
    let empty = store
        .insert_update(&new_update(&task_bob, Vec::new()))
        .await
        .unwrap();
    assert_eq!(empty.size_bytes, 0);
    assert_eq!(
        store.update_bytes(empty.id).await.unwrap(),
        Some(Vec::new())
    );
    assert_eq!(
        store.list_updates(round.id).await.unwrap(),
        vec![update, empty]
    );
}

async fn commit_aggregate_closes_and_deletes_bytes(store: &dyn Store) {
    let (round, update_ids) = aggregating_round_with_updates(store).await;
    assert_eq!(store.global_adapter(round.id).await.unwrap(), None);

    let with_state = GlobalAdapterRow {
        optimizer_state: Some(vec![5, 4, 3]),
        ..adapter(round.id)
    };
    store.commit_aggregate(&with_state, false).await.unwrap();
    let closed = store.get_round(round.id).await.unwrap().unwrap();
    assert_eq!(closed.state, "closed");
    assert_eq!(closed.closed_ms, Some(9_000));
    assert_eq!(closed.failure, None);
    assert_eq!(
        store.global_adapter(round.id).await.unwrap(),
        Some(with_state)
    );
    for update_id in &update_ids {
        assert_eq!(store.update_bytes(*update_id).await.unwrap(), None);
    }
    // The metadata stays.
    let updates = store.list_updates(round.id).await.unwrap();
    assert_eq!(
        updates.iter().map(|update| update.id).collect::<Vec<_>>(),
        update_ids
    );
    assert_eq!(
        updates
            .iter()
            .map(|update| update.size_bytes)
            .collect::<Vec<_>>(),
        vec![3, 2]
    );

    // A second commit for the (now closed) round is refused.
    assert!(matches!(
        store.commit_aggregate(&adapter(round.id), false).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn commit_aggregate_keeps_updates(store: &dyn Store) {
    let (round, update_ids) = aggregating_round_with_updates(store).await;
    store
        .commit_aggregate(&adapter(round.id), true)
        .await
        .unwrap();
    assert_eq!(
        store.get_round(round.id).await.unwrap().unwrap().state,
        "closed"
    );
    assert_eq!(
        store.update_bytes(update_ids[0]).await.unwrap(),
        Some(vec![1, 2, 3])
    );
    assert_eq!(
        store.update_bytes(update_ids[1]).await.unwrap(),
        Some(vec![4, 5])
    );
}

async fn commit_aggregate_refuses_round_not_aggregating(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    let round = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    let task = task("task-1", &round, &alice, 3_000);
    store.insert_task(&task).await.unwrap();
    let update = store
        .insert_update(&new_update(&task, vec![1, 2]))
        .await
        .unwrap();
    assert!(
        store
            .transition_round(round.id, "open", "collecting", None, 4_000)
            .await
            .unwrap()
    );

    let refused = store.commit_aggregate(&adapter(round.id), false).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(message)) if message == &message.to_lowercase()),
        "{refused:?}"
    );
    // Nothing of the transaction stays.
    let unchanged = store.get_round(round.id).await.unwrap().unwrap();
    assert_eq!(unchanged.state, "collecting");
    assert_eq!(unchanged.closed_ms, None);
    assert_eq!(store.global_adapter(round.id).await.unwrap(), None);
    assert_eq!(
        store.update_bytes(update.id).await.unwrap(),
        Some(vec![1, 2])
    );

    // A missing round is refused too.
    assert!(matches!(
        store
            .commit_aggregate(&adapter(round.id + 1_000), false)
            .await,
        Err(StoreError::Conflict(_))
    ));
}

async fn evaluations_insert_list_and_conflict(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    let bob = store
        .upsert_client(federation.id, "bob", 4, 50, 1_000)
        .await
        .unwrap();
    let trained = store
        .insert_round(&new_round(federation.id, None, 2_000))
        .await
        .unwrap();
    let evaluate = store
        .insert_round(&NewRound {
            kind: "evaluate".to_string(),
            ..new_round(federation.id, Some(trained.id), 3_000)
        })
        .await
        .unwrap();
    let task_alice = task("eval-alice", &evaluate, &alice, 4_000);
    let task_bob = task("eval-bob", &evaluate, &bob, 4_000);
    store.insert_task(&task_alice).await.unwrap();
    store.insert_task(&task_bob).await.unwrap();

    let evaluation_bob = EvaluationRow {
        task_id: task_bob.id.clone(),
        round_id: evaluate.id,
        client_id: bob.id,
        adapter_round_id: Some(trained.id),
        eval_loss: 0.75,
        num_tokens: 2_048,
        created_ms: 6_000,
    };
    let evaluation_alice = EvaluationRow {
        task_id: task_alice.id.clone(),
        client_id: alice.id,
        adapter_round_id: None,
        eval_loss: 1.125,
        created_ms: 5_000,
        ..evaluation_bob.clone()
    };
    store.insert_evaluation(&evaluation_bob).await.unwrap();
    store.insert_evaluation(&evaluation_alice).await.unwrap();
    assert_eq!(
        store.list_evaluations(evaluate.id).await.unwrap(),
        vec![evaluation_alice.clone(), evaluation_bob]
    );
    assert!(store.list_evaluations(trained.id).await.unwrap().is_empty());

    let duplicate = store
        .insert_evaluation(&EvaluationRow {
            eval_loss: 9.0,
            ..evaluation_alice
        })
        .await;
    assert!(
        matches!(&duplicate, Err(StoreError::Conflict(message)) if message == &message.to_lowercase()),
        "{duplicate:?}"
    );
    assert_eq!(store.list_evaluations(evaluate.id).await.unwrap().len(), 2);
}

async fn audit_newest_first(store: &dyn Store) {
    let (federation, alice) = federation_and_client(store).await;
    assert!(store.list_audit(10).await.unwrap().is_empty());
    store
        .record_audit(None, None, "coordinator_started", "listening", 1_000)
        .await
        .unwrap();
    store
        .record_audit(
            Some(federation.id),
            Some(alice.id),
            "client_joined",
            "rank 8",
            2_000,
        )
        .await
        .unwrap();
    store
        .record_audit(
            Some(federation.id),
            Some(alice.id),
            "update_rejected",
            "sha256 mismatch",
            3_000,
        )
        .await
        .unwrap();

    let events = store.list_audit(10).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|event| event.kind.as_str())
            .collect::<Vec<_>>(),
        vec!["update_rejected", "client_joined", "coordinator_started"]
    );
    assert!(events[0].id > events[1].id && events[1].id > events[2].id);
    assert_eq!(events[0].federation_id, Some(federation.id));
    assert_eq!(events[0].client_id, Some(alice.id));
    assert_eq!(events[0].detail, "sha256 mismatch");
    assert_eq!(events[0].created_ms, 3_000);
    assert_eq!(events[2].federation_id, None);
    assert_eq!(events[2].client_id, None);
    assert_eq!(events[2].detail, "listening");

    let newest_two = store.list_audit(2).await.unwrap();
    assert_eq!(newest_two, events[..2].to_vec());
}

async fn revocations_are_kept_once(store: &dyn Store) {
    let serial = "4f3e2d1c0b0a09080706050403020100";
    assert!(!store.is_revoked(serial).await.unwrap());
    let revoked = RevokedRow {
        serial: serial.into(),
        name: "clinic".into(),
        reason: "laptop stolen".into(),
        revoked_ms: 5_000,
    };
    assert!(store.revoke_certificate(&revoked).await.unwrap());
    // A second revocation changes nothing: the first record stays.
    let again = RevokedRow {
        reason: "again".into(),
        revoked_ms: 6_000,
        ..revoked.clone()
    };
    assert!(!store.revoke_certificate(&again).await.unwrap());
    assert!(store.is_revoked(serial).await.unwrap());
    assert!(
        !store
            .is_revoked("4f3e2d1c0b0a09080706050403020101")
            .await
            .unwrap()
    );
    assert_eq!(store.list_revoked().await.unwrap(), [revoked]);
}

async fn concurrent_create_and_commit_happen_once(store: &dyn Store) {
    // Racing creators of the same federation all get the one row.
    let (first, second, third, fourth) = tokio::join!(
        store.create_or_get_federation("raced", CONFIG_JSON, 1_000),
        store.create_or_get_federation("raced", CONFIG_JSON, 1_001),
        store.create_or_get_federation("raced", CONFIG_JSON, 1_002),
        store.create_or_get_federation("raced", CONFIG_JSON, 1_003),
    );
    let first = first.unwrap();
    for other in [second, third, fourth] {
        assert_eq!(other.unwrap(), first);
    }

    // Racing committers of one round: exactly one wins, the other gets a conflict.
    let (round, _) = aggregating_round_with_updates(store).await;
    let winner = adapter(round.id);
    let rival = GlobalAdapterRow {
        sha256: "other-sha".to_string(),
        ..adapter(round.id)
    };
    let (one, two) = tokio::join!(
        store.commit_aggregate(&winner, false),
        store.commit_aggregate(&rival, false),
    );
    let outcomes = [one, two];
    assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1);
    assert!(
        outcomes
            .iter()
            .any(|outcome| matches!(outcome, Err(StoreError::Conflict(_))))
    );
    assert_eq!(
        store.get_round(round.id).await.unwrap().unwrap().state,
        "closed"
    );
    assert!(store.global_adapter(round.id).await.unwrap().is_some());
}

/// Runs each named test function on both backends.
macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            use fedlora_coordinator::store::PgStore;

            $(
                #[sqlx::test(migrations = "../migrations")]
                async fn $test(pool: sqlx::PgPool) {
                    super::$test(&PgStore::from_pool(pool)).await;
                }
            )*
        }

        mod sqlite {
            use fedlora_coordinator::store::SqliteStore;

            $(
                #[tokio::test]
                async fn $test() {
                    let directory = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", directory.path().join("store.db").display());
                    let store = SqliteStore::connect(&url).await.unwrap();
                    super::$test(&store).await;
                    store.pool().close().await;
                }
            )*
        }
    };
}

store_suite!(
    federation_create_get_and_pin,
    client_upsert_keeps_id,
    rounds_insert_latest_list,
    transition_round_compare_and_set,
    tasks_insert_get_and_conflict,
    updates_insert_bytes_and_conflict,
    commit_aggregate_closes_and_deletes_bytes,
    commit_aggregate_keeps_updates,
    commit_aggregate_refuses_round_not_aggregating,
    evaluations_insert_list_and_conflict,
    audit_newest_first,
    revocations_are_kept_once,
    concurrent_create_and_commit_happen_once,
);

/// `sqlite::memory:` keeps one database across the pool (a single connection).
#[tokio::test]
async fn sqlite_memory_url_keeps_one_database() {
    let store = fedlora_coordinator::store::connect("sqlite::memory:")
        .await
        .unwrap();
    let created = store
        .create_or_get_federation("fed", CONFIG_JSON, 1_000)
        .await
        .unwrap();
    assert_eq!(
        store.get_federation(created.id).await.unwrap(),
        Some(created)
    );
}

#[tokio::test]
async fn unsupported_url_is_refused() {
    assert!(matches!(
        fedlora_coordinator::store::connect("mysql://localhost/fed").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
}
