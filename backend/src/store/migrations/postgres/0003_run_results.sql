-- 3: one result per run and agent (see RecordRow::run_key). Not partitioned: a
-- unique key on the partitioned records table must include at_ms, and a second
-- result for a run has another. One small row per result; dropping a month of
-- records should delete its rows here by at_ms. Results stored before keep their
-- runs; a run stored twice already keeps both rows of records.
CREATE TABLE run_results (
    agent_id TEXT COLLATE "C" NOT NULL,
    run_key TEXT COLLATE "C" NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, run_key)
);
INSERT INTO run_results (agent_id, run_key, at_ms)
    SELECT agent_id,
           CASE WHEN measurement_id IS NOT NULL AND scheduled_ms IS NOT NULL
                THEN 'slot:' || measurement_id || '@' || scheduled_ms
                ELSE 'req:' || request_id END,
           at_ms
    FROM records WHERE kind = 'result'
        AND ((measurement_id IS NOT NULL AND scheduled_ms IS NOT NULL) OR request_id IS NOT NULL)
    ON CONFLICT DO NOTHING;
