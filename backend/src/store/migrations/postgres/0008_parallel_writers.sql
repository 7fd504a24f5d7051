-- 8: writers in parallel. A record's position (the API's cursor) is no longer drawn
-- from a sequence under one lock: it is
--     base + (the writing transaction's id << 20) + the record's index in it,
-- so positions sort by transaction, and a reader reads only positions below
--     base + (the oldest transaction id still running << 20),
-- all of whose writers have finished (see `imn_position_bound`). `base` puts every new
-- position above every old one, which keeps old cursors valid. Transaction ids
-- (`xid8`) never wrap; at 2^20 records per transaction they last 2^43 transactions.
CREATE TABLE position_base (
    id INT PRIMARY KEY CHECK (id = 1),
    base BIGINT NOT NULL
);
INSERT INTO position_base
    SELECT 1, GREATEST(0, COALESCE((SELECT MAX(position) FROM records), 0) + 1
                          - (pg_current_xact_id()::TEXT::BIGINT << 20));
-- A writer that names no position (a backend of an older version, still running
-- while a newer one migrated) fails rather than drawing a position that sorts before
-- a running transaction's; with SQLSTATE 55000, which backends count as the
-- database's state, not the record's: they leave the message for the bus to
-- redeliver (to an upgraded backend) and never dead-letter it.
CREATE FUNCTION imn_position_missing() RETURNS BIGINT LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'records take their position from the writer since schema version 8: this backend is older than its database; upgrade it'
        USING ERRCODE = '55000';
END $$;
ALTER TABLE records ALTER COLUMN position SET DEFAULT imn_position_missing();
-- The first position of the calling transaction's records.
CREATE FUNCTION imn_position_start() RETURNS BIGINT LANGUAGE SQL VOLATILE AS
    $$ SELECT base + (pg_current_xact_id()::TEXT::BIGINT << 20) FROM position_base $$;
-- Every position below this, as the calling statement sees the database, belongs to a
-- transaction that has ended: nothing will ever appear below it again.
CREATE FUNCTION imn_position_bound() RETURNS BIGINT LANGUAGE SQL STABLE AS
    $$ SELECT base + (pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT << 20) FROM position_base $$;
-- Each writer adds to its own row of an agent's count (a shard chosen by its
-- connection), so backends storing records of the same agents at once do not queue
-- on one row; a count is the sum of its agent's rows.
ALTER TABLE agent_counts ADD COLUMN shard SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE agent_counts DROP CONSTRAINT agent_counts_pkey;
ALTER TABLE agent_counts ADD PRIMARY KEY (agent_id, shard);
