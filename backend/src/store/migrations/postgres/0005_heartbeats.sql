-- PostgreSQL schema 5: heartbeat history, so the dashboard's charts survive a
-- restart. One point per agent a minute at most (by the receiving backend's clock,
-- which `at_ms` is), pruned by age (--heartbeat-retention).
CREATE TABLE heartbeats (
    agent_id TEXT COLLATE "C" NOT NULL,
    at_ms BIGINT NOT NULL,
    point TEXT NOT NULL,
    PRIMARY KEY (at_ms, agent_id)
);
