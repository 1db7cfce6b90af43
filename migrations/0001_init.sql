-- fedlora coordinator schema (PostgreSQL). Times are unix milliseconds; JSON is stored as TEXT.
-- The SQLite twin lives in sqlite/0001_init.sql and must keep the same tables and columns.

-- A named federation: its configuration and the base model pinned by the first client to join.
CREATE TABLE federations (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    config_json TEXT NOT NULL,
    base_model_fingerprint TEXT,
    model_dims_json TEXT,
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'finished')),
    created_ms BIGINT NOT NULL
);

-- Participants of a federation, one row per client name (re-joining updates the row).
CREATE TABLE clients (
    id BIGSERIAL PRIMARY KEY,
    federation_id BIGINT NOT NULL REFERENCES federations (id),
    name TEXT NOT NULL,
    max_rank BIGINT NOT NULL,
    num_examples BIGINT NOT NULL,
    joined_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    UNIQUE (federation_id, name)
);

-- Training and evaluation rounds; state moves by compare-and-set only.
CREATE TABLE rounds (
    id BIGSERIAL PRIMARY KEY,
    federation_id BIGINT NOT NULL REFERENCES federations (id),
    kind TEXT NOT NULL CHECK (kind IN ('train', 'evaluate')),
    state TEXT NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'collecting', 'aggregating', 'closed', 'failed')),
    base_round_id BIGINT REFERENCES rounds (id),
    lora_json TEXT NOT NULL,
    training_json TEXT NOT NULL,
    strategy TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    closed_ms BIGINT,
    failure TEXT
);
CREATE INDEX rounds_federation_id_idx ON rounds (federation_id, id);

-- One task per client and round; the random task id is the idempotency key of its update.
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    round_id BIGINT NOT NULL REFERENCES rounds (id),
    client_id BIGINT NOT NULL REFERENCES clients (id),
    rank BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (round_id, client_id)
);
CREATE INDEX tasks_client_id_idx ON tasks (client_id);

-- Client updates: metadata plus the safetensors bytes, set to NULL once the round's aggregate is
-- committed (unless updates are kept).
CREATE TABLE updates (
    id BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE REFERENCES tasks (id),
    round_id BIGINT NOT NULL REFERENCES rounds (id),
    client_id BIGINT NOT NULL REFERENCES clients (id),
    num_examples BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL CHECK (size_bytes >= 0),
    bytes BYTEA,
    train_loss DOUBLE PRECISION NOT NULL,
    local_eval_loss DOUBLE PRECISION NOT NULL,
    steps BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    train_seconds DOUBLE PRECISION NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE INDEX updates_round_id_idx ON updates (round_id, id);
CREATE INDEX updates_client_id_idx ON updates (client_id);

-- The aggregated adapter of each closed round (kept for every round).
CREATE TABLE global_adapters (
    round_id BIGINT PRIMARY KEY REFERENCES rounds (id),
    sha256 TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    num_updates BIGINT NOT NULL,
    num_examples BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Evaluation results, one per evaluation task.
CREATE TABLE evaluations (
    task_id TEXT PRIMARY KEY REFERENCES tasks (id),
    round_id BIGINT NOT NULL REFERENCES rounds (id),
    client_id BIGINT NOT NULL REFERENCES clients (id),
    adapter_round_id BIGINT REFERENCES rounds (id),
    eval_loss DOUBLE PRECISION NOT NULL,
    num_tokens BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX evaluations_round_id_idx ON evaluations (round_id);
CREATE INDEX evaluations_client_id_idx ON evaluations (client_id);

-- Security-relevant events (joins, refusals, state changes); details never carry data.
CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY,
    federation_id BIGINT REFERENCES federations (id),
    client_id BIGINT REFERENCES clients (id),
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX audit_events_federation_id_idx ON audit_events (federation_id);
CREATE INDEX audit_events_client_id_idx ON audit_events (client_id);
