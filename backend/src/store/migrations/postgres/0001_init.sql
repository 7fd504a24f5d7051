-- 1: the first layout.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    first_seen_ms BIGINT NOT NULL,
    last_hello_ms BIGINT NOT NULL,
    hello_json TEXT NOT NULL
);
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    module TEXT NOT NULL,
    params_json TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    timeout_ms BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    traceparent TEXT,
    measurement_id TEXT,
    -- The request's first result: its position and agent time (which names its
    -- partition, so the lookup touches one).
    result_pos BIGINT,
    result_at_ms BIGINT
);
CREATE INDEX requests_agent_state ON requests (agent_id, state);
CREATE INDEX requests_measurement ON requests (measurement_id) WHERE measurement_id IS NOT NULL;
CREATE INDEX requests_open_deadline ON requests (deadline_ms)
    WHERE state IN ('pending', 'dispatched', 'received', 'running');
CREATE TABLE agent_sessions (
    id BIGSERIAL PRIMARY KEY,
    agent_id TEXT NOT NULL,
    connected_ms BIGINT NOT NULL,
    disconnected_ms BIGINT
);
CREATE INDEX agent_sessions_agent ON agent_sessions (agent_id, connected_ms);
CREATE TABLE measurements (
    id TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    params_json TEXT NOT NULL,
    selection_json TEXT NOT NULL,
    description TEXT,
    created_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    schedule_json TEXT,
    stopped_ms BIGINT
);
CREATE TABLE schedule_agents (
    measurement_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    params_json TEXT NOT NULL,
    timeout_ms BIGINT NOT NULL,
    added_version BIGINT NOT NULL,
    PRIMARY KEY (measurement_id, agent_id)
);
CREATE INDEX schedule_agents_agent ON schedule_agents (agent_id);
CREATE TABLE schedule_versions (
    agent_id TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);
CREATE TABLE transitions (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    observer TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX transitions_request ON transitions (request_id);
CREATE TABLE agent_counts (
    agent_id TEXT PRIMARY KEY,
    records BIGINT NOT NULL
);
CREATE TABLE credentials (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    message_key TEXT,
    scopes TEXT NOT NULL,
    tags TEXT NOT NULL,
    rate_per_min DOUBLE PRECISION,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    PRIMARY KEY (kind, id)
);
CREATE SEQUENCE records_position;
-- Ids compare byte-wise (COLLATE "C"): they are ASCII, and the indexes on them are
-- the hot part of every insert.
CREATE TABLE records (
    position BIGINT NOT NULL DEFAULT nextval('records_position'),
    agent_id TEXT COLLATE "C" NOT NULL,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    request_id TEXT,
    module TEXT,
    measurement_id TEXT,
    scheduled_ms BIGINT,
    at_ms BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    body JSONB NOT NULL
) PARTITION BY RANGE (at_ms);
CREATE UNIQUE INDEX records_id ON records (agent_id, epoch, seq, at_ms);
CREATE INDEX records_position_idx ON records (position);
CREATE INDEX records_agent ON records (agent_id, kind, position);
CREATE INDEX records_measurement ON records (measurement_id, agent_id, position)
    WHERE measurement_id IS NOT NULL;
CREATE TABLE records_default PARTITION OF records DEFAULT;
