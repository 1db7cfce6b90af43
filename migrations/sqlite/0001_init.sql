-- fedlora coordinator schema (SQLite). Times are unix milliseconds; JSON is stored as TEXT.
-- The PostgreSQL twin lives in ../0001_init.sql and must keep the same tables and columns.
-- Tables are STRICT so that a value of the wrong type is an error, as in PostgreSQL.

-- A named federation: its configuration and the base model pinned by the first client to join.
CREATE TABLE federations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    config_json TEXT NOT NULL,
    base_model_fingerprint TEXT,
    model_dims_json TEXT,
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'finished')),
    created_ms INTEGER NOT NULL
) STRICT;

-- Participants of a federation, one row per client name (re-joining updates the row).
CREATE TABLE clients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    federation_id INTEGER NOT NULL REFERENCES federations (id),
    name TEXT NOT NULL,
    max_rank INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    joined_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    UNIQUE (federation_id, name)
) STRICT;

-- Training and evaluation rounds; state moves by compare-and-set only.
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    federation_id INTEGER NOT NULL REFERENCES federations (id),
    kind TEXT NOT NULL CHECK (kind IN ('train', 'evaluate')),
    state TEXT NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'collecting', 'aggregating', 'closed', 'failed')),
    base_round_id INTEGER REFERENCES rounds (id),
    lora_json TEXT NOT NULL,
    training_json TEXT NOT NULL,
    strategy TEXT NOT NULL,
    deadline_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    closed_ms INTEGER,
    failure TEXT
) STRICT;
CREATE INDEX rounds_federation_id_idx ON rounds (federation_id, id);

-- One task per client and round; the random task id is the idempotency key of its update.
CREATE TABLE tasks (
    id TEXT NOT NULL PRIMARY KEY,
    round_id INTEGER NOT NULL REFERENCES rounds (id),
    client_id INTEGER NOT NULL REFERENCES clients (id),
    rank INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    UNIQUE (round_id, client_id)
) STRICT;
CREATE INDEX tasks_client_id_idx ON tasks (client_id);

-- Client updates: metadata plus the safetensors bytes, set to NULL once the round's aggregate is
-- committed (unless updates are kept).
CREATE TABLE updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE REFERENCES tasks (id),
    round_id INTEGER NOT NULL REFERENCES rounds (id),
    client_id INTEGER NOT NULL REFERENCES clients (id),
    num_examples INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    bytes BLOB,
    train_loss REAL NOT NULL,
    local_eval_loss REAL NOT NULL,
    steps INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    train_seconds REAL NOT NULL,
    received_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX updates_round_id_idx ON updates (round_id, id);
CREATE INDEX updates_client_id_idx ON updates (client_id);

-- The aggregated adapter of each closed round (kept for every round).
CREATE TABLE global_adapters (
    round_id INTEGER NOT NULL PRIMARY KEY REFERENCES rounds (id),
    sha256 TEXT NOT NULL,
    bytes BLOB NOT NULL,
    num_updates INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

-- Evaluation results, one per evaluation task.
CREATE TABLE evaluations (
    task_id TEXT NOT NULL PRIMARY KEY REFERENCES tasks (id),
    round_id INTEGER NOT NULL REFERENCES rounds (id),
    client_id INTEGER NOT NULL REFERENCES clients (id),
    adapter_round_id INTEGER REFERENCES rounds (id),
    eval_loss REAL NOT NULL,
    num_tokens INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX evaluations_round_id_idx ON evaluations (round_id);
CREATE INDEX evaluations_client_id_idx ON evaluations (client_id);

-- Security-relevant events (joins, refusals, state changes); details never carry data.
CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    federation_id INTEGER REFERENCES federations (id),
    client_id INTEGER REFERENCES clients (id),
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX audit_events_federation_id_idx ON audit_events (federation_id);
CREATE INDEX audit_events_client_id_idx ON audit_events (client_id);
