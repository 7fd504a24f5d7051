-- SQLite schema 1: the layout when numbered migrations began. Stores made before
-- then (tables, no schema_version) are brought to it by store/sqlite/legacy.rs and
-- recorded at version 1 instead of running this.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_hello_ms INTEGER NOT NULL,
    hello_json TEXT NOT NULL
);
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    module TEXT NOT NULL,
    params_json TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    traceparent TEXT,
    measurement_id TEXT,
    -- The request's first result (records.id): found without an index on records.
    result_id INTEGER,
    idempotency_hash TEXT
);
CREATE INDEX requests_agent_state ON requests(agent_id, state);
CREATE TABLE agent_sessions (
    agent_id TEXT NOT NULL,
    connected_ms INTEGER NOT NULL,
    -- NULL while connected.
    disconnected_ms INTEGER
);
CREATE INDEX agent_sessions_agent ON agent_sessions(agent_id, connected_ms);
CREATE TABLE measurements (
    id TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    params_json TEXT NOT NULL,
    selection_json TEXT NOT NULL,
    description TEXT,
    created_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    schedule_json TEXT,
    stopped_ms INTEGER,
    -- The API token that made it, and a recurring one's probes per day.
    owner TEXT,
    daily_probes INTEGER NOT NULL DEFAULT 0
);
-- Each agent's part in a recurring measurement: its parameters (checked for that
-- agent) and the agent's schedule version that first carried it.
CREATE TABLE schedule_agents (
    measurement_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    params_json TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    added_version INTEGER NOT NULL,
    PRIMARY KEY (measurement_id, agent_id)
) WITHOUT ROWID;
CREATE INDEX schedule_agents_agent ON schedule_agents(agent_id);
-- The version of each agent's schedule set: raised on every change to it.
CREATE TABLE schedule_versions (
    agent_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE transitions (
    request_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    observer TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX transitions_request ON transitions(request_id);
-- One result per run and agent (see RecordRow::run_key): a second result for a
-- request or a scheduled slot is a duplicate whatever its record id. One small row
-- per result; kept as long as the records are.
CREATE TABLE run_results (
    agent_id TEXT NOT NULL,
    run_key TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, run_key)
) WITHOUT ROWID;
-- Records stored per agent, kept in the batch's transaction: a COUNT(*) over records
-- is a scan, and dashboards ask often.
CREATE TABLE agent_counts (
    agent_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL
);
-- Enrolled agents and API tokens: hashes of their secrets, never the secrets.
CREATE TABLE credentials (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    message_key TEXT,
    scopes TEXT NOT NULL,
    tags TEXT NOT NULL,
    rate_per_min REAL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    budget_json TEXT,
    PRIMARY KEY (kind, id)
);
-- The seqs stored of each outbox epoch of each agent, as ranges: the record ids
-- (agent, epoch, seq) seen, so a resent record is dropped. One small row per agent
-- and epoch, rewritten once per group commit.
CREATE TABLE record_seqs (
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    ranges BLOB NOT NULL,
    PRIMARY KEY (agent_id, epoch)
) WITHOUT ROWID;
-- Records the database refused when stored alone (poison records), with the reason.
-- The body is a BLOB: whatever made the record unstorable, its bytes can be kept.
-- Unique by record id, so a resend is a duplicate.
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL,
    stored_ms INTEGER NOT NULL,
    UNIQUE (agent_id, epoch, seq)
);
CREATE INDEX dead_letters_agent ON dead_letters(agent_id, id);
-- Probes each API token spent on one-off measurements, per UTC day.
CREATE TABLE token_spend (
    token TEXT NOT NULL,
    day INTEGER NOT NULL,
    probes INTEGER NOT NULL,
    PRIMARY KEY (token, day)
) WITHOUT ROWID;
-- Records in arrival order. The table used to be clustered by record id (agent, epoch,
-- seq): then every group commit from 1,000 agents dirtied a leaf page per agent in
-- the table and in each of its two indexes, about 15 kB of WAL per record, and the
-- writer waited on the disk. Appended by rowid, a group fills a few pages; only the
-- per-agent index below is still touched once per agent.
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    module TEXT,
    at_ms INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    body_json TEXT NOT NULL,
    -- A scheduled run's measurement (a request's is on the request).
    measurement_id TEXT
);
CREATE INDEX records_agent ON records(agent_id, kind, id);
CREATE INDEX requests_measurement ON requests(measurement_id) WHERE measurement_id IS NOT NULL;
CREATE INDEX records_measurement ON records(measurement_id, id) WHERE measurement_id IS NOT NULL;
-- A token's running schedules (its standing budget charge).
CREATE INDEX measurements_owner ON measurements(owner)
    WHERE owner IS NOT NULL AND schedule_json IS NOT NULL AND stopped_ms IS NULL;
