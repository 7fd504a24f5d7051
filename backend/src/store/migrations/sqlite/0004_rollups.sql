-- SQLite schema 4: hourly rollups of results, kept after the raw results are
-- deleted. One row per (agent, module, target, hour); the body is a mergeable sum
-- (`rollup::Rollup` as JSON). The cursor is the position of the last result added.
CREATE TABLE rollups (
    agent_id TEXT NOT NULL,
    module TEXT NOT NULL,
    target TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (agent_id, module, target, hour_ms)
) WITHOUT ROWID;
CREATE INDEX rollups_hour ON rollups(hour_ms);
CREATE TABLE rollup_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL
);
INSERT INTO rollup_cursor VALUES (1, 0);
