//! Stores made before numbered migrations: the SQLite store used to create its tables
//! with `CREATE TABLE IF NOT EXISTS` and bring older files up to date by introspection
//! (which columns and tables exist). Such a file has tables but no `schema_version`;
//! [`upgrade`] runs that code once, unchanged, which brings every shape it handled to
//! the layout of migration 1 (`migrations/sqlite/0001_init.sql`), and the caller records
//! version [`VERSION`]. Frozen: later schema changes are numbered migrations, never
//! edits here.

use rusqlite::{params, Connection, OptionalExtension};

use super::{db, SeqRanges};
use crate::store::StoreError;

/// The version a store made before numbered migrations is at once [`upgrade`] ran.
pub(super) const VERSION: i64 = 1;

/// Whether the file holds a store made before numbered migrations: tables, but no
/// recorded version (the caller found none).
pub(super) fn made_before_versions(tx: &Connection) -> Result<bool, StoreError> {
    tx.prepare(
        "SELECT 1 FROM sqlite_master WHERE type = 'table'
         AND name NOT LIKE 'sqlite_%' AND name <> 'schema_version'",
    )
    .and_then(|mut st| st.exists([]))
    .map_err(db)
}

/// Brings a store made before numbered migrations, of any shape the introspection
/// handled, to the layout of version [`VERSION`], in the caller's transaction: the
/// tables it lacks are made as that code made them, then [`introspect`] runs.
pub(super) fn upgrade(tx: &Connection) -> Result<(), StoreError> {
    tx.execute_batch(TABLES).map_err(db)?;
    introspect(tx)
}

/// The tables (but `records`) as the last version before numbered migrations made them
/// on every open.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_hello_ms INTEGER NOT NULL,
    hello_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
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
CREATE INDEX IF NOT EXISTS requests_agent_state ON requests(agent_id, state);
CREATE TABLE IF NOT EXISTS agent_sessions (
    agent_id TEXT NOT NULL,
    connected_ms INTEGER NOT NULL,
    -- NULL while connected.
    disconnected_ms INTEGER
);
CREATE INDEX IF NOT EXISTS agent_sessions_agent ON agent_sessions(agent_id, connected_ms);
CREATE TABLE IF NOT EXISTS measurements (
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
CREATE TABLE IF NOT EXISTS schedule_agents (
    measurement_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    params_json TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    added_version INTEGER NOT NULL,
    PRIMARY KEY (measurement_id, agent_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS schedule_agents_agent ON schedule_agents(agent_id);
-- The version of each agent's schedule set: raised on every change to it.
CREATE TABLE IF NOT EXISTS schedule_versions (
    agent_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transitions (
    request_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    observer TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_request ON transitions(request_id);
-- Records stored per agent, kept in the batch's transaction: a COUNT(*) over records
-- is a scan, and dashboards ask often.
-- One result per run and agent (see RecordRow::run_key): a second result for a
-- request or a scheduled slot is a duplicate whatever its record id. One small row
-- per result; kept as long as the records are.
CREATE TABLE IF NOT EXISTS run_results (
    agent_id TEXT NOT NULL,
    run_key TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, run_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agent_counts (
    agent_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL
);
-- The seqs stored of each outbox epoch of each agent, as ranges: the record ids
-- (agent, epoch, seq) seen, so a resent record is dropped. One small row per agent
-- and epoch, rewritten once per group commit.
-- Enrolled agents and API tokens: hashes of their secrets, never the secrets.
CREATE TABLE IF NOT EXISTS credentials (
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
CREATE TABLE IF NOT EXISTS record_seqs (
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    ranges BLOB NOT NULL,
    PRIMARY KEY (agent_id, epoch)
) WITHOUT ROWID;
-- Records the database refused when stored alone (poison records), with the reason.
-- The body is a BLOB: whatever made the record unstorable, its bytes can be kept.
-- Unique by record id, so a resend is a duplicate.
CREATE TABLE IF NOT EXISTS dead_letters (
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
CREATE INDEX IF NOT EXISTS dead_letters_agent ON dead_letters(agent_id, id);
-- Probes each API token spent on one-off measurements, per UTC day.
CREATE TABLE IF NOT EXISTS token_spend (
    token TEXT NOT NULL,
    day INTEGER NOT NULL,
    probes INTEGER NOT NULL,
    PRIMARY KEY (token, day)
) WITHOUT ROWID;
";

/// Records in arrival order. The table used to be clustered by record id (agent, epoch,
/// seq): then every group commit from 1,000 agents dirtied a leaf page per agent in
/// the table and in each of its two indexes, about 15 kB of WAL per record, and the
/// writer waited on the disk. Appended by rowid, a group fills a few pages; only the
/// per-agent index below is still touched once per agent.
const RECORDS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
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
CREATE INDEX IF NOT EXISTS records_agent ON records(agent_id, kind, id);
";

/// Brings a store written by an earlier version to this layout, in the caller's
/// transaction: requests gain `result_id`; records clustered by record id move to the
/// arrival-order table, with their seqs gathered into `record_seqs`.
fn introspect(tx: &Connection) -> Result<(), StoreError> {
    let has_result_id = tx
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'result_id'")
        .and_then(|mut st| st.exists([]))
        .map_err(db)?;
    if !has_result_id {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN result_id INTEGER")
            .map_err(db)?;
    }
    let has_traceparent = tx
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'traceparent'")
        .and_then(|mut st| st.exists([]))
        .map_err(db)?;
    if !has_traceparent {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN traceparent TEXT")
            .map_err(db)?;
    }
    let has_measurement = tx
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'measurement_id'")
        .and_then(|mut st| st.exists([]))
        .map_err(db)?;
    if !has_measurement {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN measurement_id TEXT")
            .map_err(db)?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS requests_measurement ON requests(measurement_id) WHERE measurement_id IS NOT NULL",
    )
    .map_err(db)?;
    let old_sql: Option<String> = tx
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'records'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?;
    let old_layout = old_sql.is_some_and(|sql| sql.contains("WITHOUT ROWID"));
    if old_layout {
        tx.execute_batch(
            "DROP INDEX IF EXISTS records_results;
             DROP INDEX IF EXISTS records_request;
             ALTER TABLE records RENAME TO records_v1;",
        )
        .map_err(db)?;
    }
    tx.execute_batch(RECORDS_SCHEMA).map_err(db)?;
    for (table, column, ty) in [
        ("records", "measurement_id", "TEXT"),
        ("measurements", "schedule_json", "TEXT"),
        ("measurements", "stopped_ms", "INTEGER"),
        ("measurements", "owner", "TEXT"),
        ("measurements", "daily_probes", "INTEGER NOT NULL DEFAULT 0"),
        ("requests", "idempotency_hash", "TEXT"),
        ("credentials", "budget_json", "TEXT"),
    ] {
        let has = tx
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ))
            .and_then(|mut st| st.exists([]))
            .map_err(db)?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
                .map_err(db)?;
        }
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS records_measurement ON records(measurement_id, id) WHERE measurement_id IS NOT NULL;
         -- A token's running schedules (its standing budget charge).
         CREATE INDEX IF NOT EXISTS measurements_owner ON measurements(owner)
             WHERE owner IS NOT NULL AND schedule_json IS NOT NULL AND stopped_ms IS NULL;",
    )
    .map_err(db)?;
    if old_layout {
        tx.execute_batch(
            "INSERT INTO records (agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body_json)
             SELECT agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body_json
             FROM records_v1 ORDER BY stored_ms, seq;
             UPDATE requests SET result_id = (
                 SELECT MIN(r.id) FROM records r
                 WHERE r.request_id = requests.id AND r.agent_id = requests.agent_id AND r.kind = 'result')
             WHERE result_id IS NULL;",
        )
        .map_err(db)?;
        {
            let mut st = tx
                .prepare(
                    "SELECT agent_id, epoch, seq FROM records_v1 ORDER BY agent_id, epoch, seq",
                )
                .map_err(db)?;
            let mut rows = st.query([]).map_err(db)?;
            let mut current: Option<(String, i64, SeqRanges)> = None;
            let mut done = Vec::new();
            while let Some(r) = rows.next().map_err(db)? {
                let (agent, epoch, seq): (String, i64, i64) = (
                    r.get(0).map_err(db)?,
                    r.get(1).map_err(db)?,
                    r.get(2).map_err(db)?,
                );
                match &mut current {
                    // Every stored seq, however many ranges: these records are
                    // stored, and their ids must stay known.
                    Some((a, e, set)) if *a == agent && *e == epoch => {
                        set.insert(seq as u64, usize::MAX);
                    }
                    _ => {
                        let mut set = SeqRanges::default();
                        set.insert(seq as u64, usize::MAX);
                        if let Some(prev) = current.replace((agent, epoch, set)) {
                            done.push(prev);
                        }
                    }
                }
            }
            done.extend(current);
            let mut put = tx
                .prepare("INSERT OR REPLACE INTO record_seqs (agent_id, epoch, ranges) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for (agent, epoch, set) in done {
                put.execute(params![agent, epoch, set.to_bytes()])
                    .map_err(db)?;
            }
        }
        tx.execute_batch("DROP TABLE records_v1").map_err(db)?;
    }
    // A store from before run_results existed: the runs its results belong to, once.
    // A run stored twice already keeps both (nothing is deleted); new ones are dropped.
    let runs_known = tx
        .prepare("SELECT 1 FROM run_results LIMIT 1")
        .and_then(|mut st| st.exists([]))
        .map_err(db)?;
    if !runs_known {
        tx.execute_batch(
            "INSERT OR IGNORE INTO run_results (agent_id, run_key, at_ms)
             SELECT agent_id,
                    -- A scheduled result's request id is its run id, measurement@slot.
                    CASE WHEN measurement_id IS NOT NULL THEN 'slot:' || request_id
                         ELSE 'req:' || request_id END,
                    at_ms
             FROM records WHERE kind = 'result' AND request_id IS NOT NULL",
        )
        .map_err(db)?;
    }
    // A store from before agent_counts existed: count once.
    tx.execute_batch(
        "INSERT INTO agent_counts (agent_id, records)
         SELECT agent_id, COUNT(*) FROM records
         WHERE NOT EXISTS (SELECT 1 FROM agent_counts) GROUP BY agent_id",
    )
    .map_err(db)?;
    Ok(())
}
