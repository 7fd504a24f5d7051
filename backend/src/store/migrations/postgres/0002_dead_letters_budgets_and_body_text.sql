-- 2: the dead letters, token budgets, and bodies JSONB cannot hold.
ALTER TABLE measurements ADD COLUMN owner TEXT,
    ADD COLUMN daily_probes BIGINT NOT NULL DEFAULT 0;
CREATE INDEX measurements_owner ON measurements (owner)
    WHERE owner IS NOT NULL AND schedule_json IS NOT NULL AND stopped_ms IS NULL;
ALTER TABLE requests ADD COLUMN idempotency_hash TEXT;
ALTER TABLE credentials ADD COLUMN budget_json TEXT;
-- JSONB cannot hold the escape \u0000 (NUL), which is valid JSON and which an agent's
-- text can carry (an echo message, an HTTP body's first bytes, a DNS TXT string).
-- Such a record keeps its exact JSON text here, and `body` a copy with each
-- \u0000 escape made \u2400 (the symbol for NUL), which JSONB takes: reads prefer
-- this column, so the API returns what the agent sent, while SQL over `body` still
-- works for every record. A new nullable column: no table is rewritten.
ALTER TABLE records ADD COLUMN body_text TEXT;
-- Finds a month's rows in the default partition when the month gets its partition.
CREATE INDEX records_default_at ON records_default (at_ms);
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY,
    agent_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- Bytes: whatever made the record unstorable, they can be kept.
    body BYTEA NOT NULL,
    stored_ms BIGINT NOT NULL,
    UNIQUE (agent_id, epoch, seq)
);
CREATE INDEX dead_letters_agent ON dead_letters (agent_id, id);
CREATE TABLE token_spend (
    token TEXT NOT NULL,
    day BIGINT NOT NULL,
    probes BIGINT NOT NULL,
    PRIMARY KEY (token, day)
);
