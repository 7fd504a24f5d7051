-- PostgreSQL schema 6: hourly rollups of results, kept after the raw results are
-- deleted. One row per (agent, module, target, hour); the body is a mergeable sum
-- (`rollup::Rollup` as JSON). The cursor is the position of the last result added;
-- backends take turns on its row.
CREATE TABLE rollups (
    agent_id TEXT COLLATE "C" NOT NULL,
    module TEXT COLLATE "C" NOT NULL,
    target TEXT NOT NULL,
    hour_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (agent_id, module, target, hour_ms)
);
CREATE INDEX rollups_hour ON rollups (hour_ms);
CREATE TABLE rollup_cursor (
    id INT PRIMARY KEY CHECK (id = 1),
    position BIGINT NOT NULL
);
INSERT INTO rollup_cursor VALUES (1, 0);
