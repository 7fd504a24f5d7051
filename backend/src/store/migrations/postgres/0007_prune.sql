-- 7: what retention prunes besides records, by age: runs' duplicate guards, finished
-- requests (with their transitions) and closed connection sessions.
CREATE INDEX IF NOT EXISTS run_results_at ON run_results(at_ms);
CREATE INDEX IF NOT EXISTS requests_updated ON requests(updated_ms);
