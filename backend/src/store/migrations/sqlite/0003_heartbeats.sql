-- SQLite schema 3: heartbeat history, so the dashboard's charts survive a restart.
-- One point per agent a minute at most (by the backend's clock, which `at_ms` is),
-- pruned by age (--heartbeat-retention). A rowid table, appended in time order; the
-- unique index drops a point stored twice and serves the range reads.
CREATE TABLE heartbeats (
    agent_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    point TEXT NOT NULL
);
CREATE UNIQUE INDEX heartbeats_at ON heartbeats(at_ms, agent_id);
