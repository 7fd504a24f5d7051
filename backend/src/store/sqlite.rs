use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use imn_proto::ranges::{Insert as SeqInsert, RangeSet};
use imn_proto::wire::{Hello, RequestState};
use rusqlite::{params, Connection, OptionalExtension};

use super::prelude::*;
use super::{
    checked_release, file_taken, nul_free, release_taken, AgentRow, AgentSchedule, BatchOutcome,
    Created, CredentialRow, DeadLetter, HeartbeatRow, MeasurementRow, NewRequest, PreparedBatch,
    PruneRecords, RecordRow, ReleaseRow, RequestRow, ResultFilter, ResultRow, RollupFilter,
    RollupRow, ScheduleProgress, StoreError, StoreStats, TokenUsage, Transition,
    AGENT_RELEASE_NAME, MAX_SCHEDULE_VERSION, MAX_SEQ_RANGES,
};

mod legacy;
#[cfg(test)]
mod migration_tests;

/// The background thread checkpoints the WAL after this long with writes, or once
/// about [`CHECKPOINT_BYTES`] were written, whichever comes first. Each checkpoint
/// syncs the WAL and the database to disk; every 500 ms, those syncs stalled the
/// flushes of agents on the same disk (an `imn up`), and the API round trip's p99 was
/// 15 ms; every 5 s it is under 5 ms.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;

/// The embedded store: one SQLite file in WAL mode.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The database file (tests open a second connection to it).
    #[cfg_attr(not(test), allow(dead_code))]
    path: std::path::PathBuf,
    /// Bytes written since the last checkpoint, roughly (records and requests).
    written: Arc<std::sync::atomic::AtomicU64>,
}

/// The store's error; [`StoreError::Unavailable`] when SQLite could not read or write
/// the file at all (then no record is to blame, and none is dead-lettered).
fn db(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    let unavailable = matches!(
        e.sqlite_error_code(),
        Some(
            DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | SystemIoFailure
                | DatabaseCorrupt
                | DiskFull
                | CannotOpen
                | FileLockingProtocolFailed
                | ReadOnly
                | NotADatabase
                | OperationInterrupted
                | PermissionDenied
                | NoLargeFileSupport
        )
    );
    if unavailable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Db(e.to_string())
    }
}

/// Connection settings, set on every open before the migrations.
const PRAGMAS: &str = "
-- Free pages go back to the file system in small steps after retention deletes
-- (`incremental_vacuum`). Takes effect only in a new file (before its first table);
-- an older store keeps its free pages for new rows.
PRAGMA auto_vacuum = INCREMENTAL;
-- 4 KiB pages (a new file only; set before WAL). A transaction writes every page it
-- touches to the WAL: an API request touches about ten, and with 16 KiB pages each
-- round trip wrote 150 kB, the checkpoints' syncs stalled, and its p99 was 60 ms. Bulk
-- ingest, appended in arrival order, is within 10 % either way.
PRAGMA page_size = 4096;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
-- The records table and its indexes are hot during a drain: keep 64 MiB of pages in
-- memory (the default 2 MB sends inserts to the OS for index pages).
PRAGMA cache_size = -65536;
PRAGMA temp_store = MEMORY;
-- Checkpoints run on their own thread (see checkpoint_in_background); the writer
-- checkpoints only if the WAL passes 64 MiB.
PRAGMA wal_autocheckpoint = 16384;
";

/// Brings the store to the newest schema (see [`super::migrate`]). A store made before
/// numbered migrations (tables, no version) is first brought to version 1 by
/// [`legacy::upgrade`]. Each step is one IMMEDIATE transaction: two processes opening
/// the file at once take turns, and the second finds the work done.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    use super::migrate::{failed, next, set_version, READ_VERSION, SQLITE, VERSION_TABLE};
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute_batch(VERSION_TABLE).map_err(db)?;
        let recorded: Option<i64> = tx
            .query_row(READ_VERSION, [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        let version = match recorded {
            Some(v) => v,
            None if legacy::made_before_versions(&tx)? => {
                legacy::upgrade(&tx)?;
                tx.execute_batch(&set_version(legacy::VERSION))
                    .map_err(db)?;
                tx.commit().map_err(db)?;
                continue;
            }
            None => 0,
        };
        let Some(m) = next("SQLite", SQLITE, version)? else {
            return tx.commit().map_err(db);
        };
        tx.execute_batch(m.sql).map_err(|e| failed(m, e))?;
        tx.execute_batch(&set_version(m.version)).map_err(db)?;
        tx.commit().map_err(db)?;
    }
}

/// The seqs of one outbox epoch this store has taken ([`RangeSet`]), kept in
/// `record_seqs` as little-endian (lo, hi) pairs. Growth is bounded by a cap on the
/// number of ranges ([`MAX_SEQ_RANGES`] for records).
#[derive(Debug, Default, Clone, PartialEq)]
struct SeqRanges(RangeSet);

impl SeqRanges {
    #[cfg(test)]
    fn contains(&self, seq: u64) -> bool {
        self.0.contains(seq)
    }

    /// Adds `seq`, unless it is there or it would make more than `cap` ranges.
    fn insert(&mut self, seq: u64, cap: usize) -> SeqInsert {
        self.0.insert_capped(seq, cap)
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.range_count() * 16);
        for (lo, hi) in self.0.iter() {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
        out
    }

    /// Reads what `to_bytes` wrote; None if it is not such a list.
    fn from_bytes(b: &[u8]) -> Option<SeqRanges> {
        if !b.len().is_multiple_of(16) {
            return None;
        }
        let ranges = b.chunks_exact(16).map(|c| {
            let (lo, hi) = c.split_at(8);
            (
                u64::from_le_bytes(lo.try_into().unwrap_or_default()),
                u64::from_le_bytes(hi.try_into().unwrap_or_default()),
            )
        });
        RangeSet::from_sorted(ranges).map(SeqRanges)
    }

    #[cfg(test)]
    fn from_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
        ranges
            .iter()
            .flat_map(|&(lo, hi)| lo.to_le_bytes().into_iter().chain(hi.to_le_bytes()))
            .collect()
    }
}

/// The seq sets a group commit reads and changes, written back once at its end.
#[derive(Default)]
struct SeenSeqs {
    sets: HashMap<(String, u64), (SeqRanges, bool)>,
}

impl SeenSeqs {
    fn get(
        &mut self,
        tx: &Connection,
        agent: &str,
        epoch: u64,
    ) -> Result<&mut (SeqRanges, bool), StoreError> {
        let key = (agent.to_string(), epoch);
        if !self.sets.contains_key(&key) {
            let bytes: Option<Vec<u8>> = tx
                .prepare_cached("SELECT ranges FROM record_seqs WHERE agent_id = ?1 AND epoch = ?2")
                .map_err(db)?
                .query_row(params![agent, epoch as i64], |r| r.get(0))
                .optional()
                .map_err(db)?;
            let set = match bytes {
                None => SeqRanges::default(),
                Some(b) => SeqRanges::from_bytes(&b).ok_or_else(|| {
                    StoreError::Db(format!(
                        "record_seqs for agent {agent} epoch {epoch}: not a list of seq ranges"
                    ))
                })?,
            };
            self.sets.insert(key.clone(), (set, false));
        }
        Ok(self.sets.get_mut(&key).expect("inserted above"))
    }

    fn write(self, tx: &Connection) -> Result<(), StoreError> {
        let mut put = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO record_seqs (agent_id, epoch, ranges) VALUES (?1, ?2, ?3)",
            )
            .map_err(db)?;
        for ((agent, epoch), (set, dirty)) in self.sets {
            if dirty {
                put.execute(params![agent, epoch as i64, set.to_bytes()])
                    .map_err(db)?;
            }
        }
        Ok(())
    }
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(PRAGMAS).map_err(db)?;
        migrate(&mut conn)?;
        // Every hot statement stays prepared (the default keeps 16).
        conn.set_prepared_statement_cache_capacity(64);
        let conn = Arc::new(Mutex::new(conn));
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Self::checkpoint_in_background(path, Arc::downgrade(&conn), written.clone())?;
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            written,
        })
    }

    /// Copies the WAL into the database from a connection of its own, so the writer
    /// does not: an automatic checkpoint inside a commit made one batch in twelve take
    /// five times as long during a drain. PASSIVE never blocks the writer. The thread
    /// ends with the store.
    fn checkpoint_in_background(
        path: &Path,
        store: std::sync::Weak<Mutex<Connection>>,
        written: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let conn = Connection::open(path).map_err(db)?;
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while store.strong_count() > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    let bytes = written.load(Relaxed);
                    if bytes == 0 || (bytes < CHECKPOINT_BYTES && last.elapsed() < CHECKPOINT_EVERY)
                    {
                        continue;
                    }
                    written.fetch_sub(bytes, Relaxed);
                    last = std::time::Instant::now();
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("checkpoint thread: {e}")))?;
        Ok(())
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn state_of(s: String) -> RequestState {
    RequestState::parse(&s).unwrap_or(RequestState::Pending)
}

/// Adds `?3` probes to token `?1`'s spend on day `?2`, saturating: the sum is taken
/// only when it fits.
const ADD_SPEND: &str = "INSERT INTO token_spend (token, day, probes) VALUES (?1, ?2, ?3)
     ON CONFLICT (token, day) DO UPDATE SET probes =
         CASE WHEN probes > 9223372036854775807 - excluded.probes THEN 9223372036854775807
              ELSE probes + excluded.probes END
     RETURNING probes";

const REQUEST_COLS: &str =
    "id, agent_id, module, params_json, state, created_ms, updated_ms, deadline_ms, timeout_ms, traceparent, idempotency_hash";

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    Ok(RequestRow {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        module: r.get(2)?,
        params_json: r.get(3)?,
        state: state_of(r.get(4)?),
        created_ms: r.get(5)?,
        updated_ms: r.get(6)?,
        deadline_ms: r.get(7)?,
        timeout_ms: r.get::<_, i64>(8)? as u64,
        traceparent: r.get(9)?,
        idempotency_hash: r.get(10)?,
    })
}

fn get_request(c: &Connection, id: &str) -> Result<Option<RequestRow>, StoreError> {
    // Cached: the API reads a request two or three times per round trip.
    c.prepare_cached(&format!(
        "SELECT {REQUEST_COLS} FROM requests WHERE id = ?1"
    ))
    .map_err(db)?
    .query_row([id], request_row)
    .optional()
    .map_err(db)
}

/// Records of one agent's outbox epoch, as a group commit takes them: a whole batch,
/// or one record of it when a batch is stored record by record.
type Part<'a> = (&'a str, u64, &'a [RecordRow]);

/// Inserts one batch's records inside the caller's transaction.
fn insert_batch(
    tx: &Connection,
    seen: &mut SeenSeqs,
    (agent, epoch, rows): Part<'_>,
    now_ms: i64,
) -> Result<BatchOutcome, StoreError> {
    let mut out = BatchOutcome::default();
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO records (agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body_json, measurement_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db)?;
    let mut claim = tx
        .prepare_cached(
            "INSERT INTO run_results (agent_id, run_key, at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )
        .map_err(db)?;
    // A scheduled result counts toward its measurement only from an agent the
    // measurement runs on: an agent naming another's measurement keeps its record,
    // as its own, and adds nothing to that measurement (as with a request).
    let mut member = tx
        .prepare_cached("SELECT 1 FROM schedule_agents WHERE measurement_id = ?1 AND agent_id = ?2")
        .map_err(db)?;
    let seqs = seen.get(tx, agent, epoch)?;
    for row in rows {
        match seqs.0.insert(row.seq, MAX_SEQ_RANGES) {
            SeqInsert::New => {}
            SeqInsert::Duplicate => {
                out.duplicates += 1;
                continue;
            }
            SeqInsert::Refused => {
                out.refused.push(row.seq);
                continue;
            }
        }
        seqs.1 = true;
        if let Some(run) = row.run_key() {
            if claim.execute(params![agent, run, row.at_ms]).map_err(db)? == 0 {
                tracing::warn!(%agent, epoch, seq = row.seq, %run, "a second result for one run; dropped as a duplicate");
                out.duplicates += 1;
                out.run_duplicates += 1;
                continue;
            }
        }
        let measurement = match &row.measurement_id {
            Some(m) if !member.exists(params![m, agent]).map_err(db)? => {
                tracing::warn!(%agent, measurement = %m, seq = row.seq, "a scheduled result for a measurement the agent does not run: kept as its own, not the measurement's");
                None
            }
            other => other.as_deref(),
        };
        insert
            .execute(params![
                agent,
                epoch as i64,
                row.seq as i64,
                row.kind,
                row.request_id,
                row.module,
                row.at_ms,
                now_ms,
                row.body_json,
                measurement
            ])
            .map_err(db)?;
        out.stored += 1;
        if let Some(t) = &row.transition {
            let result_id = (row.kind == "result").then(|| tx.last_insert_rowid());
            let changed = apply_transition(
                tx,
                &t.request_id,
                Some(agent),
                t.state,
                row.at_ms,
                "agent",
                t.detail.as_deref(),
                result_id,
            )?;
            if changed && t.state.is_terminal() {
                out.finished.push(t.request_id.clone());
            }
        }
    }
    Ok(out)
}

/// `owner`: the agent that reported it (from its batch), which must be the request's
/// agent; `None` for the backend's own transitions.
#[allow(clippy::too_many_arguments)]
fn apply_transition(
    c: &Connection,
    id: &str,
    owner: Option<&str>,
    state: RequestState,
    at_ms: i64,
    observer: &str,
    detail: Option<&str>,
    result_id: Option<i64>,
) -> Result<bool, StoreError> {
    // Cached statements: during a drain this runs once per record.
    let Some((current, has_result, agent)) = c
        .prepare_cached("SELECT state, result_id IS NOT NULL, agent_id FROM requests WHERE id = ?1")
        .map_err(db)?
        .query_row([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()
        .map_err(db)?
        .map(|(s, has, agent)| (state_of(s), has, agent))
    else {
        return Ok(false);
    };
    // An agent moves only its own requests: another's request id in its batch is
    // stored as its own record and changes nothing.
    if owner.is_some_and(|o| o != agent) {
        return Ok(false);
    }
    if let (Some(rid), false) = (result_id, has_result) {
        c.prepare_cached("UPDATE requests SET result_id = ?2 WHERE id = ?1")
            .map_err(db)?
            .execute(params![id, rid])
            .map_err(db)?;
    }
    c.prepare_cached(
        "INSERT INTO transitions (request_id, state, at_ms, observer, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![
        id,
        state.as_str(),
        at_ms,
        observer,
        detail.map(nul_free)
    ])
    .map_err(db)?;
    if state == current && !current.is_terminal() {
        // A repeat (such as a re-dispatch) refreshes the time, not the state.
        c.prepare_cached("UPDATE requests SET updated_ms = ?2 WHERE id = ?1")
            .map_err(db)?
            .execute(params![id, at_ms])
            .map_err(db)?;
    }
    if current.is_terminal() || state.rank() <= current.rank() {
        return Ok(false);
    }
    c.prepare_cached("UPDATE requests SET state = ?2, updated_ms = ?3 WHERE id = ?1")
        .map_err(db)?
        .execute(params![id, state.as_str(), at_ms])
        .map_err(db)?;
    Ok(true)
}

fn insert_measurement(c: &Connection, m: &MeasurementRow) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO measurements (id, module, params_json, selection_json, description, created_ms, deadline_ms, schedule_json, stopped_ms, owner, daily_probes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            m.id,
            m.module,
            m.params_json,
            m.selection_json,
            m.description,
            m.created_ms,
            m.deadline_ms,
            m.schedule_json,
            m.stopped_ms,
            m.owner,
            clamp(m.daily_probes)
        ],
    )
    .map(|_| ())
    .map_err(db)
}

/// A count as SQLite's integer: counts past its range are kept at its end.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const MEASUREMENT_COLS: &str = "id, module, params_json, selection_json, description, created_ms, deadline_ms, schedule_json, stopped_ms, owner, daily_probes";

fn measurement_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MeasurementRow> {
    Ok(MeasurementRow {
        id: r.get(0)?,
        module: r.get(1)?,
        params_json: r.get(2)?,
        selection_json: r.get(3)?,
        description: r.get(4)?,
        created_ms: r.get(5)?,
        deadline_ms: r.get(6)?,
        schedule_json: r.get(7)?,
        stopped_ms: r.get(8)?,
        owner: r.get(9)?,
        daily_probes: r.get::<_, i64>(10)?.max(0) as u64,
    })
}

/// Raises the agent's schedule version by one; returns the new version. The `+ 1`
/// runs only below [`MAX_SCHEDULE_VERSION`], so it never overflows: a stored version
/// at or past it (or negative, as a u64 past i64's range was once stored) could only
/// have come from an agent that claimed it, before such claims were refused, and that
/// agent was broken or hostile; honest agents never report such versions. Such a
/// version starts again at 1 rather than fail every change to the agent's schedules
/// (stopping a measurement included).
fn bump_version(tx: &Connection, agent: &str) -> Result<u64, StoreError> {
    let v = tx
        .query_row(
            "INSERT INTO schedule_versions (agent_id, version) VALUES (?1, 1)
             ON CONFLICT(agent_id) DO UPDATE SET version =
                 CASE WHEN version < 0 OR version >= ?2 THEN 1 ELSE version + 1 END
             RETURNING version",
            params![agent, MAX_SCHEDULE_VERSION as i64],
            |r| r.get::<_, i64>(0),
        )
        .map_err(db)?;
    u64::try_from(v).map_err(|_| StoreError::Db(format!("schedule version {v} of agent {agent}")))
}

/// One transaction: the records of `group` not stored yet, their requests' moves, the
/// seq sets and the agents' counts. One outcome per part.
fn store_group(
    c: &mut Connection,
    group: &[Part<'_>],
    now_ms: i64,
) -> Result<Vec<BatchOutcome>, StoreError> {
    let tx = c.transaction().map_err(db)?;
    let mut outcomes = Vec::with_capacity(group.len());
    // One counter update per agent per transaction, not per batch.
    let mut counts: HashMap<&str, u64> = HashMap::new();
    let mut seen = SeenSeqs::default();
    for &part in group {
        let out = insert_batch(&tx, &mut seen, part, now_ms)?;
        *counts.entry(part.0).or_default() += out.stored;
        outcomes.push(out);
    }
    seen.write(&tx)?;
    for (agent, n) in counts {
        if n > 0 {
            tx.prepare_cached(
                "INSERT INTO agent_counts (agent_id, records) VALUES (?1, ?2)
                 ON CONFLICT(agent_id) DO UPDATE SET records = records + excluded.records",
            )
            .map_err(db)?
            .execute(params![agent, n as i64])
            .map_err(db)?;
        }
    }
    tx.commit().map_err(db)?;
    Ok(outcomes)
}

/// Keeps a record the database refused; false if it is kept already (a resend). Its
/// seq joins the epoch's stored seqs, as a handled record: a resend is dropped as any
/// duplicate is, and the seqs after it still extend the same range (a gap per dead
/// letter would count against [`MAX_SEQ_RANGES`]).
fn dead_letter(
    c: &mut Connection,
    (agent, epoch): (&str, u64),
    row: &RecordRow,
    reason: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let tx = c.transaction().map_err(db)?;
    let n = tx
        .prepare_cached(
            "INSERT INTO dead_letters (agent_id, epoch, seq, at_ms, kind, reason, body, stored_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (agent_id, epoch, seq) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![
            agent,
            epoch as i64,
            row.seq as i64,
            row.at_ms,
            row.kind,
            reason,
            row.body_json.as_bytes(),
            now_ms
        ])
        .map_err(db)?;
    if n == 1 {
        let mut seen = SeenSeqs::default();
        // Unreadable seqs may be why the record was refused: the dead letter is kept
        // all the same.
        if let Ok(set) = seen.get(&tx, agent, epoch) {
            if set.0.insert(row.seq, MAX_SEQ_RANGES) == SeqInsert::New {
                set.1 = true;
            }
        }
        seen.write(&tx)?;
    }
    tx.commit().map_err(db)?;
    Ok(n == 1)
}

/// [`Store::store_batches`]: the group in one transaction; if the database refuses
/// it, each batch alone; if it refuses a batch, halves of it until a refused record is
/// alone, and dead-lettered.
fn store_isolating(
    c: &mut Connection,
    batches: &[(String, PreparedBatch)],
    now_ms: i64,
) -> Result<Vec<BatchOutcome>, StoreError> {
    let group: Vec<Part<'_>> = batches
        .iter()
        .map(|(a, b)| (a.as_str(), b.epoch, b.rows.as_slice()))
        .collect();
    let mut failure = match store_group(c, &group, now_ms) {
        Ok(out) => return Ok(out),
        Err(e @ (StoreError::Unavailable(_) | StoreError::Task(_))) => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(error = %failure, batches = group.len(), "group commit refused; storing its batches one by one");
    let mut outcomes = Vec::with_capacity(group.len());
    for &part in &group {
        if group.len() > 1 {
            match store_group(c, &[part], now_ms) {
                Ok(mut out) => {
                    outcomes.extend(out.pop());
                    continue;
                }
                Err(e @ (StoreError::Unavailable(_) | StoreError::Task(_))) => return Err(e),
                Err(e) => failure = e,
            }
        }
        let (agent, epoch, rows) = part;
        let mut out = BatchOutcome::default();
        // What the database refuses is halved, in order, until a refused record is alone:
        // k bad records of n cost about 2k·log2(n) transactions, not n.
        let refused = std::mem::replace(&mut failure, StoreError::Db(String::new()));
        let mut todo: Vec<(&[super::RecordRow], Option<StoreError>)> = vec![(rows, Some(refused))];
        while let Some((part_rows, known)) = todo.pop() {
            if part_rows.is_empty() {
                continue;
            }
            let tried = match known {
                Some(e) => Err(e),
                None => store_group(c, &[(agent, epoch, part_rows)], now_ms),
            };
            match tried {
                Ok(mut o) => out.merge(o.pop().unwrap_or_default()),
                Err(e @ (StoreError::Unavailable(_) | StoreError::Task(_))) => return Err(e),
                Err(StoreError::Db(reason)) if part_rows.len() == 1 => {
                    let row = &part_rows[0];
                    if dead_letter(c, (agent, epoch), &part_rows[0], &reason, now_ms)? {
                        tracing::warn!(%agent, epoch, seq = row.seq, %reason, "record refused by the store; dead-lettered");
                        out.dead_lettered += 1;
                    } else {
                        out.duplicates += 1;
                    }
                }
                Err(_) => {
                    let (first, second) = part_rows.split_at(part_rows.len() / 2);
                    todo.push((second, None));
                    todo.push((first, None));
                }
            }
        }
        outcomes.push(out);
    }
    Ok(outcomes)
}

fn result_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ResultRow> {
    let key = super::ResultKey {
        agent_id: r.get(0)?,
        epoch: r.get::<_, i64>(1)? as u64,
        seq: r.get::<_, i64>(2)? as u64,
        request_id: r.get(3)?,
        module: r.get(4)?,
        stored_ms: r.get(5)?,
        at_ms: r.get(7)?,
    };
    Ok(ResultRow::from_body(key, &r.get::<_, String>(6)?, None))
}

const RESULT_COLS: &str =
    "r.agent_id, r.epoch, r.seq, r.request_id, r.module, r.stored_ms, r.body_json, r.at_ms";

#[async_trait]
impl AgentStore for SqliteStore {
    async fn upsert_agent(&self, id: &str, hello: &Hello, now_ms: i64) -> Result<(), StoreError> {
        let id = id.to_string();
        let hello = serde_json::to_string(hello).map_err(|e| StoreError::Db(e.to_string()))?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO agents (id, first_seen_ms, last_hello_ms, hello_json) VALUES (?1, ?2, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_hello_ms = ?2, hello_json = ?3",
                params![id, now_ms, hello],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }
    async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT id, first_seen_ms, last_hello_ms, hello_json FROM agents ORDER BY id",
                )
                .map_err(db)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, first_seen_ms, last_hello_ms, hello) = row.map_err(db)?;
                if let Ok(hello) = serde_json::from_str(&hello) {
                    out.push(AgentRow {
                        id,
                        first_seen_ms,
                        last_hello_ms,
                        hello,
                    });
                }
            }
            Ok(out)
        })
        .await
    }
    async fn session_open(
        &self,
        agent: &str,
        at_ms: i64,
        prev_end_ms: i64,
    ) -> Result<(), StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            tx.execute(
                "UPDATE agent_sessions SET disconnected_ms = MAX(connected_ms, ?2)
                 WHERE agent_id = ?1 AND disconnected_ms IS NULL",
                params![agent, prev_end_ms],
            )
            .map_err(db)?;
            tx.execute(
                "INSERT INTO agent_sessions (agent_id, connected_ms) VALUES (?1, ?2)",
                params![agent, at_ms],
            )
            .map_err(db)?;
            tx.commit().map_err(db)
        })
        .await
    }
    async fn session_close(&self, agent: &str, at_ms: i64) -> Result<(), StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE agent_sessions SET disconnected_ms = MAX(connected_ms, ?2)
                 WHERE agent_id = ?1 AND disconnected_ms IS NULL",
                params![agent, at_ms],
            )
            .map(|_| ())
            .map_err(db)
        })
        .await
    }
    async fn sessions(
        &self,
        agent: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, Option<i64>)>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT connected_ms, disconnected_ms FROM agent_sessions
                     WHERE agent_id = ?1 AND (disconnected_ms IS NULL OR disconnected_ms > ?2)
                     ORDER BY connected_ms",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![agent, since_ms], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn first_connected(&self, agent: &str) -> Result<Option<i64>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT MIN(connected_ms) FROM agent_sessions WHERE agent_id = ?1",
                [agent],
                |r| r.get(0),
            )
            .map_err(db)
        })
        .await
    }
    async fn put_heartbeats(&self, rows: Vec<HeartbeatRow>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO heartbeats (agent_id, at_ms, point) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(db)?;
                for r in &rows {
                    st.execute(params![r.agent_id, r.at_ms, r.point_json])
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)
        })
        .await
    }
    async fn heartbeats_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT agent_id, at_ms, point FROM heartbeats WHERE at_ms >= ?1
                     ORDER BY at_ms, agent_id LIMIT ?2",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![since_ms, limit], |r| {
                    Ok(HeartbeatRow {
                        agent_id: r.get(0)?,
                        at_ms: r.get(1)?,
                        point_json: r.get(2)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn prune_heartbeats(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(
                    "DELETE FROM heartbeats WHERE rowid IN (
                       SELECT rowid FROM heartbeats WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
                    params![before_ms, limit],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl RequestStore for SqliteStore {
    async fn create_request(&self, req: NewRequest) -> Result<Created, StoreError> {
        self.written
            .fetch_add(24 * 1024, std::sync::atomic::Ordering::Relaxed);
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            if let Some(key) = &req.idempotency_key {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT id FROM requests WHERE idempotency_key = ?1",
                        [key],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(id) = existing {
                    let row = get_request(&tx, &id)?
                        .ok_or_else(|| StoreError::Db("request vanished".into()))?;
                    return Ok(Created::Existing(row));
                }
            }
            tx.prepare_cached(
                &format!("INSERT INTO requests ({REQUEST_COLS}, idempotency_key, measurement_id) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?6, ?7, ?9, ?11, ?8, ?10)"),
            )
            .map_err(db)?
            .execute(
                params![
                    req.id,
                    req.agent_id,
                    req.module,
                    req.params_json,
                    req.created_ms,
                    req.deadline_ms,
                    req.timeout_ms as i64,
                    req.idempotency_key,
                    req.traceparent,
                    req.measurement_id,
                    req.idempotency_hash
                ],
            )
            .map_err(db)?;
            tx.prepare_cached(
                "INSERT INTO transitions (request_id, state, at_ms, observer) VALUES (?1, 'pending', ?2, 'backend')",
            )
            .map_err(db)?
            .execute(params![req.id, req.created_ms])
            .map_err(db)?;
            if req.dispatch {
                apply_transition(
                    &tx,
                    &req.id,
                    None,
                    RequestState::Dispatched,
                    req.created_ms,
                    "backend",
                    None,
                    None,
                )?;
            }
            if let Some(ch) = req.charge.as_ref().filter(|ch| ch.probes > 0) {
                tx.prepare_cached(ADD_SPEND)
                    .map_err(db)?
                    .query_row(params![ch.token, ch.day, clamp(ch.probes)], |_| Ok(()))
                    .map_err(db)?;
            }
            let row = get_request(&tx, &req.id)?
                .ok_or_else(|| StoreError::Db("request vanished".into()))?;
            tx.commit().map_err(db)?;
            Ok(Created::New(row))
        })
        .await
    }
    async fn request(&self, id: &str) -> Result<Option<RequestRow>, StoreError> {
        let id = id.to_string();
        self.with(move |c| get_request(c, &id)).await
    }
    async fn request_by_key(&self, key: &str) -> Result<Option<RequestRow>, StoreError> {
        let key = key.to_string();
        self.with(move |c| {
            c.prepare_cached(&format!(
                "SELECT {REQUEST_COLS} FROM requests WHERE idempotency_key = ?1"
            ))
            .map_err(db)?
            .query_row([key], request_row)
            .optional()
            .map_err(db)
        })
        .await
    }
    async fn request_and_result(
        &self,
        id: &str,
    ) -> Result<Option<(RequestRow, Option<ResultRow>)>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let Some(req) = get_request(c, &id)? else {
                return Ok(None);
            };
            let result = c
                .prepare_cached(&format!(
                    "SELECT {RESULT_COLS} FROM requests q JOIN records r ON r.id = q.result_id WHERE q.id = ?1 AND r.agent_id = q.agent_id"
                ))
                .map_err(db)?
                .query_row([&id], result_row)
                .optional()
                .map_err(db)?;
            Ok(Some((req, result)))
        })
        .await
    }
    async fn transition(
        &self,
        id: &str,
        state: RequestState,
        at_ms: i64,
        observer: &str,
        detail: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (id, observer, detail) = (
            id.to_string(),
            observer.to_string(),
            detail.map(str::to_string),
        );
        self.with(move |c| {
            apply_transition(
                c,
                &id,
                None,
                state,
                at_ms,
                &observer,
                detail.as_deref(),
                None,
            )
        })
        .await
    }
    async fn transitions(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare("SELECT state, at_ms, observer, detail FROM transitions WHERE request_id = ?1 ORDER BY at_ms, rowid")
                .map_err(db)?;
            let rows = st
                .query_map([id], |r| {
                    Ok(Transition {
                        state: state_of(r.get(0)?),
                        at_ms: r.get(1)?,
                        observer: r.get(2)?,
                        detail: r.get(3)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn undelivered(&self, agent: &str) -> Result<Vec<RequestRow>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare(&format!("SELECT {REQUEST_COLS} FROM requests WHERE agent_id = ?1 AND state IN ('pending', 'dispatched') ORDER BY created_ms"))
                .map_err(db)?;
            let rows = st.query_map([agent], request_row).map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn overdue(&self, now_ms: i64) -> Result<Vec<RequestRow>, StoreError> {
        self.with(move |c| {
            let mut st = c
                .prepare(&format!("SELECT {REQUEST_COLS} FROM requests WHERE deadline_ms < ?1 AND state IN ('pending', 'dispatched', 'received', 'running')"))
                .map_err(db)?;
            let rows = st.query_map([now_ms], request_row).map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn store_batches(
        &self,
        batches: Vec<(String, PreparedBatch)>,
        now_ms: i64,
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        // Roughly what the transaction adds to the WAL: the rows, their index
        // entries, and a few pages of counters.
        let bytes: usize = batches
            .iter()
            .flat_map(|(_, b)| &b.rows)
            .map(|r| r.body_json.len() + 128)
            .sum();
        self.written.fetch_add(
            bytes as u64 + 16 * 1024,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.with(move |c| store_isolating(c, &batches, now_ms))
            .await
    }
    async fn results(&self, agent: &str, limit: u32) -> Result<Vec<ResultRow>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare(&format!("SELECT {RESULT_COLS} FROM records r WHERE agent_id = ?1 AND kind = 'result' ORDER BY id DESC LIMIT ?2"))
                .map_err(db)?;
            let rows = st.query_map(params![agent, limit], result_row).map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn result(&self, agent: &str, request_id: &str) -> Result<Option<ResultRow>, StoreError> {
        let (agent, request_id) = (agent.to_string(), request_id.to_string());
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {RESULT_COLS} FROM requests q JOIN records r ON r.id = q.result_id WHERE q.id = ?2 AND r.agent_id = ?1"),
                params![agent, request_id],
                result_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }
    async fn agent_record_count(&self, agent: &str) -> Result<u64, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT records FROM agent_counts WHERE agent_id = ?1",
                [agent],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0) as u64)
            .map_err(db)
        })
        .await
    }
    async fn events(
        &self,
        agent: &str,
        limit: u32,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare("SELECT at_ms, body_json FROM records WHERE agent_id = ?1 AND kind = 'event' ORDER BY id DESC LIMIT ?2")
                .map_err(db)?;
            let rows = st
                .query_map(params![agent, limit], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                let (at, body) = row.map_err(db)?;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                out.push((
                    at,
                    v["kind"].as_str().unwrap_or_default().to_string(),
                    v["message"].as_str().unwrap_or_default().to_string(),
                ));
            }
            Ok(out)
        })
        .await
    }
    async fn results_page(
        &self,
        f: ResultFilter,
    ) -> Result<Vec<(i64, ResultRow, Option<String>)>, StoreError> {
        use rusqlite::types::Value as Sql;
        self.with(move |c| {
            let mut sql = format!(
                "SELECT {RESULT_COLS}, r.id, COALESCE(r.measurement_id, q.measurement_id) FROM records r \
                 LEFT JOIN requests q ON q.id = r.request_id AND q.agent_id = r.agent_id \
                 WHERE r.kind = 'result' AND r.id > ?1"
            );
            let mut args: Vec<Sql> = vec![Sql::Integer(f.after)];
            let mut add = |cond: &str, v: Sql| {
                args.push(v);
                sql.push_str(&format!(" AND {cond} ?{}", args.len()));
            };
            if let Some(a) = f.agent {
                add("r.agent_id =", Sql::Text(a));
            }
            if let Some(m) = f.module {
                add("r.module =", Sql::Text(m));
            }
            if let Some(m) = f.measurement {
                add("COALESCE(r.measurement_id, q.measurement_id) =", Sql::Text(m));
            }
            if let Some(t) = f.since_ms {
                add("r.at_ms >=", Sql::Integer(t));
            }
            if let Some(t) = f.until_ms {
                add("r.at_ms <", Sql::Integer(t));
            }
            args.push(Sql::Integer(i64::from(f.limit)));
            sql.push_str(&format!(" ORDER BY r.id LIMIT ?{}", args.len()));
            let mut st = c.prepare_cached(&sql).map_err(db)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((
                        r.get::<_, i64>(8)?,
                        result_row(r)?,
                        r.get::<_, Option<String>>(9)?,
                    ))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn schedule_results_newest(
        &self,
        measurement: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, ResultRow)>, StoreError> {
        let measurement = measurement.to_string();
        self.with(move |c| {
            // records_measurement (measurement_id, id), read backwards.
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {RESULT_COLS}, r.id FROM records r
                     WHERE r.measurement_id = ?1 AND r.id < ?2 AND r.kind = 'result'
                     ORDER BY r.id DESC LIMIT ?3"
                ))
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![measurement, before.unwrap_or(i64::MAX), limit],
                    |r| Ok((r.get::<_, i64>(8)?, result_row(r)?)),
                )
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn latest_position(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
                .map_err(db)
        })
        .await
    }
    async fn request_state_counts(&self) -> Result<Vec<(RequestState, u64)>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare_cached("SELECT state, COUNT(*) FROM requests GROUP BY state")
                .map_err(db)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                let (state, n) = row.map_err(db)?;
                out.push((state_of(state), n as u64));
            }
            Ok(out)
        })
        .await
    }
    async fn record_count(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(records), 0) FROM agent_counts",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(db)
        })
        .await
    }
    async fn open_requests(&self, agent: &str) -> Result<u64, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            c.prepare_cached(
                "SELECT COUNT(*) FROM requests WHERE agent_id = ?1
                 AND state IN ('pending', 'dispatched', 'received', 'running')",
            )
            .and_then(|mut st| st.query_row(params![agent], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(db)
        })
        .await
    }
    async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let agent = agent.map(str::to_string);
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT agent_id, epoch, seq, at_ms, kind, reason, body, stored_ms FROM dead_letters
                     WHERE ?1 IS NULL OR agent_id = ?1 ORDER BY id DESC LIMIT ?2",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![agent, limit], |r| {
                    Ok(DeadLetter {
                        agent_id: r.get(0)?,
                        epoch: r.get::<_, i64>(1)? as u64,
                        seq: r.get::<_, i64>(2)? as u64,
                        at_ms: r.get(3)?,
                        kind: r.get(4)?,
                        reason: r.get(5)?,
                        body: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(6)?).into_owned(),
                        stored_ms: r.get(7)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(db)
        })
        .await
    }
    async fn rollup_cursor(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT position FROM rollup_cursor WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(db)
        })
        .await
    }
    async fn merge_rollups(
        &self,
        from: i64,
        to: i64,
        rows: Vec<RollupRow>,
    ) -> Result<bool, StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db)?;
            let moved = tx
                .execute(
                    "UPDATE rollup_cursor SET position = ?2 WHERE id = 1 AND position = ?1",
                    params![from, to],
                )
                .map_err(db)?;
            if moved == 0 {
                return Ok(false);
            }
            {
                let mut get = tx
                    .prepare_cached(
                        "SELECT body FROM rollups WHERE agent_id = ?1 AND module = ?2 AND target = ?3 AND hour_ms = ?4",
                    )
                    .map_err(db)?;
                let mut put = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO rollups (agent_id, module, target, hour_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(db)?;
                for r in &rows {
                    let old: Option<String> = get
                        .query_row(params![r.agent_id, r.module, r.target, r.hour_ms], |x| {
                            x.get(0)
                        })
                        .optional()
                        .map_err(db)?;
                    let body = match old {
                        Some(old) => crate::rollup::merge_bodies(&old, &r.body),
                        None => r.body.clone(),
                    };
                    put.execute(params![r.agent_id, r.module, r.target, r.hour_ms, body])
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(true)
        })
        .await
    }
    async fn rollups(&self, f: RollupFilter) -> Result<Vec<RollupRow>, StoreError> {
        use rusqlite::types::Value as Sql;
        self.with(move |c| {
            let mut sql = "SELECT agent_id, module, target, hour_ms, body FROM rollups WHERE 1 = 1"
                .to_string();
            let mut args: Vec<Sql> = Vec::new();
            let mut add = |cond: &str, v: Sql| {
                args.push(v);
                sql.push_str(&format!(" AND {cond} ?{}", args.len()));
            };
            if let Some(a) = f.agent {
                add("agent_id =", Sql::Text(a));
            }
            if let Some(m) = f.module {
                add("module =", Sql::Text(m));
            }
            if let Some(t) = f.target {
                add("target =", Sql::Text(t));
            }
            if let Some(t) = f.since_ms {
                add("hour_ms >=", Sql::Integer(t));
            }
            if let Some(t) = f.until_ms {
                add("hour_ms <", Sql::Integer(t));
            }
            if let Some((h, a, m, t)) = f.after {
                let n = args.len();
                args.extend([Sql::Integer(h), Sql::Text(a), Sql::Text(m), Sql::Text(t)]);
                sql.push_str(&format!(
                    " AND (hour_ms, agent_id, module, target) > (?{}, ?{}, ?{}, ?{})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4
                ));
            }
            args.push(Sql::Integer(i64::from(f.limit)));
            sql.push_str(&format!(
                " ORDER BY hour_ms, agent_id, module, target LIMIT ?{}",
                args.len()
            ));
            let mut st = c.prepare_cached(&sql).map_err(db)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok(RollupRow {
                        agent_id: r.get(0)?,
                        module: r.get(1)?,
                        target: r.get(2)?,
                        hour_ms: r.get(3)?,
                        body: r.get(4)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn prune_bookkeeping(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            let mut n = 0u64;
            n += tx
                .execute(
                    "DELETE FROM run_results WHERE (agent_id, run_key) IN (
                       SELECT agent_id, run_key FROM run_results WHERE at_ms < ?1
                       ORDER BY at_ms LIMIT ?2)",
                    params![before_ms, limit],
                )
                .map_err(db)? as u64;
            tx.execute(
                "CREATE TEMP TABLE IF NOT EXISTS prune_requests (id TEXT PRIMARY KEY)",
                [],
            )
            .map_err(db)?;
            tx.execute("DELETE FROM prune_requests", []).map_err(db)?;
            tx.execute(
                "INSERT INTO prune_requests SELECT id FROM requests
                 WHERE updated_ms < ?1
                   AND state NOT IN ('pending', 'dispatched', 'received', 'running')
                 ORDER BY updated_ms LIMIT ?2",
                params![before_ms, limit],
            )
            .map_err(db)?;
            n += tx
                .execute(
                    "DELETE FROM transitions WHERE request_id IN (SELECT id FROM prune_requests)",
                    [],
                )
                .map_err(db)? as u64;
            n += tx
                .execute(
                    "DELETE FROM requests WHERE id IN (SELECT id FROM prune_requests)",
                    [],
                )
                .map_err(db)? as u64;
            tx.execute("DELETE FROM prune_requests", []).map_err(db)?;
            n += tx
                .execute(
                    "DELETE FROM agent_sessions WHERE rowid IN (
                       SELECT rowid FROM agent_sessions WHERE disconnected_ms < ?1 LIMIT ?2)",
                    params![before_ms, limit],
                )
                .map_err(db)? as u64;
            tx.commit().map_err(db)?;
            Ok(n)
        })
        .await
    }
    async fn prune_records(&self, p: PruneRecords) -> Result<(u64, i64), StoreError> {
        use rusqlite::types::Value as Sql;
        self.with(move |c| {
            // Never the newest row: SQLite gives a new row the largest id in the
            // table plus one, so deleting the newest would hand its id (a position
            // readers and the rollup cursor have passed) to the next record.
            // Rows are appended as they arrive, so `stored_ms` grows with the id: the
            // first row young enough to keep ends the range, and the scan stops there
            // rather than reading the whole retained window.
            let mut cond = "id > ?1 AND id <= ?2 AND stored_ms < ?3 \
                            AND id < (SELECT MAX(id) FROM records) \
                            AND id < COALESCE((SELECT id FROM records WHERE id > ?1 AND stored_ms >= ?3 ORDER BY id LIMIT 1), ?2 + 1)"
                .to_string();
            let mut args: Vec<Sql> = vec![
                Sql::Integer(p.after),
                Sql::Integer(p.up_to),
                Sql::Integer(p.stored_before_ms),
            ];
            match &p.only {
                Some(m) => {
                    args.push(Sql::Text(m.clone()));
                    cond.push_str(&format!(" AND module = ?{}", args.len()));
                }
                None if !p.except.is_empty() => {
                    let mut marks = Vec::new();
                    for m in &p.except {
                        args.push(Sql::Text(m.clone()));
                        marks.push(format!("?{}", args.len()));
                    }
                    cond.push_str(&format!(
                        " AND (module IS NULL OR module NOT IN ({}))",
                        marks.join(", ")
                    ));
                }
                None => {}
            }
            args.push(Sql::Integer(i64::from(p.limit)));
            let limit = args.len();
            let tx = c.transaction().map_err(db)?;
            let last: Option<i64> = tx
                .query_row(
                    &format!(
                        "SELECT MAX(id) FROM (SELECT id FROM records WHERE {cond} ORDER BY id LIMIT ?{limit})"
                    ),
                    rusqlite::params_from_iter(args.clone()),
                    |r| r.get(0),
                )
                .map_err(db)?;
            let Some(last) = last else {
                return Ok((0, p.after));
            };
            let n = tx
                .execute(
                    &format!(
                        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE {cond} ORDER BY id LIMIT ?{limit})"
                    ),
                    rusqlite::params_from_iter(args),
                )
                .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok((n as u64, last))
        })
        .await
    }
    async fn store_stats(&self) -> Result<StoreStats, StoreError> {
        self.with(|c| {
            let pages: i64 = c
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(db)?;
            let free: i64 = c
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .map_err(db)?;
            let size: i64 = c
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(db)?;
            let oldest: Option<i64> = c
                .query_row(
                    "SELECT stored_ms FROM records WHERE kind = 'result' ORDER BY id LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            Ok(StoreStats {
                bytes: u64::try_from(pages.saturating_sub(free).saturating_mul(size)).unwrap_or(0),
                oldest_result_ms: oldest,
                shrinks_on_delete: true,
            })
        })
        .await
    }
    async fn release_space(
        &self,
        pages: u32,
        _before_ms: i64,
        _up_to: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            let mode: i64 = c
                .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
                .map_err(db)?;
            // 2: incremental (stores made since retention existed). A store made
            // before keeps its free pages for new rows: its file stops growing but
            // does not shrink.
            if mode != 2 {
                return Ok(Vec::new());
            }
            let free: i64 = c
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .map_err(db)?;
            if free == 0 {
                return Ok(Vec::new());
            }
            let n = i64::from(pages).min(free);
            c.execute_batch(&format!("PRAGMA incremental_vacuum({n})"))
                .map_err(db)?;
            Ok(vec![format!(
                "returned {n} free pages of {free} to the file system"
            )])
        })
        .await
    }
    async fn prune_rollups(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(
                    "DELETE FROM rollups WHERE (agent_id, module, target, hour_ms) IN (
                       SELECT agent_id, module, target, hour_ms FROM rollups
                       WHERE hour_ms < ?1 ORDER BY hour_ms LIMIT ?2)",
                    params![before_ms, limit],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl MeasurementStore for SqliteStore {
    async fn create_measurement(&self, m: MeasurementRow) -> Result<(), StoreError> {
        self.with(move |c| insert_measurement(c, &m)).await
    }
    async fn create_schedule(
        &self,
        m: MeasurementRow,
        agents: Vec<(String, AgentSchedule)>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            insert_measurement(&tx, &m)?;
            let mut out = Vec::with_capacity(agents.len());
            for (agent, a) in agents {
                let version = bump_version(&tx, &agent)?;
                tx.execute(
                    "INSERT INTO schedule_agents (measurement_id, agent_id, params_json, timeout_ms, added_version)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![m.id, agent, a.params_json, a.timeout_ms as i64, version as i64],
                )
                .map_err(db)?;
                out.push((agent, version));
            }
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }
    async fn stop_schedule(&self, id: &str, at_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            let changed = tx
                .execute(
                    "UPDATE measurements SET stopped_ms = ?2 WHERE id = ?1 AND schedule_json IS NOT NULL AND stopped_ms IS NULL",
                    params![id, at_ms],
                )
                .map_err(db)?;
            let mut out = Vec::new();
            if changed > 0 {
                let agents: Vec<String> = tx
                    .prepare("SELECT agent_id FROM schedule_agents WHERE measurement_id = ?1 ORDER BY agent_id")
                    .and_then(|mut st| st.query_map([&id], |r| r.get(0))?.collect())
                    .map_err(db)?;
                for agent in agents {
                    let v = bump_version(&tx, &agent)?;
                    out.push((agent, v));
                }
            }
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }
    async fn agent_schedules(&self, agent: &str) -> Result<(u64, Vec<AgentSchedule>), StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let version: i64 = c
                .query_row(
                    "SELECT version FROM schedule_versions WHERE agent_id = ?1",
                    [&agent],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?
                .unwrap_or(0);
            let mut st = c
                .prepare_cached(
                    "SELECT m.id, m.module, a.params_json, a.timeout_ms, m.schedule_json
                     FROM schedule_agents a JOIN measurements m ON m.id = a.measurement_id
                     WHERE a.agent_id = ?1 AND m.stopped_ms IS NULL AND m.schedule_json IS NOT NULL
                     ORDER BY m.created_ms, m.id",
                )
                .map_err(db)?;
            let rows = st
                .query_map([&agent], |r| {
                    Ok(AgentSchedule {
                        measurement_id: r.get(0)?,
                        module: r.get(1)?,
                        params_json: r.get(2)?,
                        timeout_ms: r.get::<_, i64>(3)? as u64,
                        schedule_json: r.get(4)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok((version as u64, rows))
        })
        .await
    }
    async fn raise_schedule_version(&self, agent: &str, seen: u64) -> Result<u64, StoreError> {
        let next = super::raised_version(agent, seen)?;
        let agent = agent.to_string();
        self.with(move |c| {
            // A stored version past the limit (see `bump_version`) is replaced.
            let v = c
                .query_row(
                    "INSERT INTO schedule_versions (agent_id, version) VALUES (?1, ?2)
                     ON CONFLICT(agent_id) DO UPDATE SET version =
                         CASE WHEN version < 0 OR version >= ?3 THEN ?2 ELSE MAX(version, ?2) END
                     RETURNING version",
                    params![agent, next, MAX_SCHEDULE_VERSION as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(db)?;
            u64::try_from(v)
                .map_err(|_| StoreError::Db(format!("schedule version {v} of agent {agent}")))
        })
        .await
    }
    async fn schedule_progress(&self, id: &str) -> Result<Vec<ScheduleProgress>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT a.agent_id, a.added_version, COUNT(r.id), MAX(json_extract(r.body_json, '$.scheduled_ms'))
                     FROM schedule_agents a
                     LEFT JOIN records r ON r.measurement_id = a.measurement_id AND r.agent_id = a.agent_id
                     WHERE a.measurement_id = ?1
                     GROUP BY a.agent_id ORDER BY a.agent_id",
                )
                .map_err(db)?;
            let rows = st
                .query_map([&id], |r| {
                    Ok(ScheduleProgress {
                        agent_id: r.get(0)?,
                        added_version: r.get::<_, i64>(1)? as u64,
                        runs: r.get::<_, i64>(2)? as u64,
                        last_scheduled_ms: r.get(3)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }
    async fn measurement(&self, id: &str) -> Result<Option<MeasurementRow>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {MEASUREMENT_COLS} FROM measurements WHERE id = ?1"),
                [&id],
                measurement_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }
    async fn measurement_requests(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestRow, Option<ResultRow>)>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {REQUEST_COLS} FROM requests WHERE measurement_id = ?1 ORDER BY agent_id"
                ))
                .map_err(db)?;
            let reqs: Vec<RequestRow> = st
                .query_map([&id], request_row)
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            let mut res = c
                .prepare_cached(&format!(
                    "SELECT {RESULT_COLS} FROM requests q JOIN records r ON r.id = q.result_id WHERE q.id = ?1 AND r.agent_id = q.agent_id"
                ))
                .map_err(db)?;
            let mut out = Vec::with_capacity(reqs.len());
            for req in reqs {
                let result = res
                    .query_row([&req.id], result_row)
                    .optional()
                    .map_err(db)?;
                out.push((req, result));
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl CredentialStore for SqliteStore {
    async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT kind, id, secret_hash, message_key, scopes, tags, rate_per_min,
                            created_ms, revoked_ms, budget_json FROM credentials ORDER BY kind, id",
                )
                .map_err(db)?;
            let split = |s: String| -> Vec<String> {
                s.split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            let rows = st
                .query_map([], |r| {
                    Ok(CredentialRow {
                        kind: r.get(0)?,
                        id: r.get(1)?,
                        secret_hash: r.get(2)?,
                        message_key: r.get(3)?,
                        scopes: split(r.get(4)?),
                        tags: split(r.get(5)?),
                        rate_per_min: r.get(6)?,
                        created_ms: r.get(7)?,
                        revoked_ms: r.get(8)?,
                        budget_json: r.get(9)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
    async fn put_credential(&self, row: CredentialRow) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO credentials
                 (kind, id, secret_hash, message_key, scopes, tags, rate_per_min, created_ms, revoked_ms, budget_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    row.kind,
                    row.id,
                    row.secret_hash,
                    row.message_key,
                    row.scopes.join(","),
                    row.tags.join(","),
                    row.rate_per_min,
                    row.created_ms,
                    row.revoked_ms,
                    row.budget_json
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }
    async fn add_spend(&self, token: &str, day: i64, probes: u64) -> Result<u64, StoreError> {
        let token = token.to_string();
        self.with(move |c| {
            // Saturating: the sum is taken only when it fits.
            c.prepare_cached(ADD_SPEND)
                .map_err(db)?
                .query_row(params![token, day, clamp(probes)], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(db)
        })
        .await
    }
    async fn token_usage(
        &self,
        token: &str,
        day: i64,
        now_ms: i64,
    ) -> Result<TokenUsage, StoreError> {
        let token = token.to_string();
        self.with(move |c| {
            let spent: i64 = c
                .prepare_cached("SELECT probes FROM token_spend WHERE token = ?1 AND day = ?2")
                .map_err(db)?
                .query_row(params![token, day], |r| r.get(0))
                .optional()
                .map_err(db)?
                .unwrap_or(0);
            let mut st = c
                .prepare_cached(
                    "SELECT daily_probes FROM measurements
                     WHERE owner = ?1 AND schedule_json IS NOT NULL AND stopped_ms IS NULL
                         AND deadline_ms > ?2",
                )
                .map_err(db)?;
            let mut usage = TokenUsage {
                one_off_probes: spent.max(0) as u64,
                ..Default::default()
            };
            let rows = st
                .query_map(params![token, now_ms], |r| r.get::<_, i64>(0))
                .map_err(db)?;
            for daily in rows {
                usage.schedules += 1;
                usage.schedule_daily_probes = usage
                    .schedule_daily_probes
                    .saturating_add(daily.map_err(db)?.max(0) as u64);
            }
            // Saturating at the largest stored integer, as PostgreSQL's sum is.
            usage.schedule_daily_probes = usage.schedule_daily_probes.min(i64::MAX as u64);
            Ok(usage)
        })
        .await
    }
}

/// A release's columns, without its bytes.
const RELEASE_COLS: &str =
    "name, version, arch, sha256, size, manifest, signature, rollback, expires_ms, added_ms";

fn release_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok(ReleaseRow {
        name: r.get(0)?,
        version: r.get(1)?,
        arch: r.get(2)?,
        sha256: r.get(3)?,
        size: r.get::<_, i64>(4)?.max(0) as u64,
        manifest: r.get(5)?,
        signature: r.get(6)?,
        rollback: r.get(7)?,
        expires_ms: r.get(8)?,
        added_ms: r.get(9)?,
    })
}

#[async_trait]
impl FleetStore for SqliteStore {
    async fn put_release(&self, row: ReleaseRow, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let size = checked_release(&row)?;
        // A file of megabytes goes through the WAL: count it toward the next checkpoint.
        self.written.fetch_add(
            bytes.len() as u64 + 16 * 1024,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            let same_file = tx
                .query_row(
                    &format!("SELECT {RELEASE_COLS} FROM releases WHERE sha256 = ?1"),
                    [&row.sha256],
                    release_row,
                )
                .optional()
                .map_err(db)?;
            if let Some(stored) = same_file {
                if (&stored.name, &stored.version, &stored.arch)
                    != (&row.name, &row.version, &row.arch)
                {
                    return Err(file_taken(&row, &stored));
                }
                return Ok(false);
            }
            let other: Option<String> = tx
                .query_row(
                    "SELECT sha256 FROM releases WHERE name = ?1 AND version = ?2 AND arch = ?3",
                    params![row.name, row.version, row.arch],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if let Some(other) = other {
                return Err(release_taken(&row, &other));
            }
            tx.execute(
                "INSERT INTO releases (name, version, arch, sha256, size, manifest, signature,
                     rollback, expires_ms, added_ms, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    row.name,
                    row.version,
                    row.arch,
                    row.sha256,
                    size,
                    row.manifest,
                    row.signature,
                    row.rollback,
                    row.expires_ms,
                    row.added_ms,
                    bytes
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(true)
        })
        .await
    }
    async fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {RELEASE_COLS} FROM releases ORDER BY added_ms DESC, sha256"
                ))
                .map_err(db)?;
            let rows = st.query_map([], release_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
    async fn release(&self, version: &str, arch: &str) -> Result<Option<ReleaseRow>, StoreError> {
        if version.contains('\0') || arch.contains('\0') {
            return Ok(None); // No release has NUL in its text (see checked_release).
        }
        let (version, arch) = (version.to_string(), arch.to_string());
        self.with(move |c| {
            c.query_row(
                &format!(
                    "SELECT {RELEASE_COLS} FROM releases
                     WHERE name = ?1 AND version = ?2 AND arch = ?3"
                ),
                params![AGENT_RELEASE_NAME, version, arch],
                release_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }
    async fn release_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if sha256.contains('\0') {
            return Ok(None);
        }
        let sha256 = sha256.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT bytes FROM releases WHERE sha256 = ?1",
                [sha256],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }
    async fn put_doc(
        &self,
        kind: &str,
        key: &str,
        doc: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (kind, key, doc) = (
            nul_free(kind).into_owned(),
            nul_free(key).into_owned(),
            nul_free(doc).into_owned(),
        );
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO fleet_docs (kind, key, doc, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc,
                     updated_ms = excluded.updated_ms",
            )
            .map_err(db)?
            .execute(params![kind, key, doc, now_ms])
            .map_err(db)?;
            Ok(())
        })
        .await
    }
    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        let (kind, key) = (nul_free(kind).into_owned(), nul_free(key).into_owned());
        self.with(move |c| {
            c.prepare_cached("SELECT doc FROM fleet_docs WHERE kind = ?1 AND key = ?2")
                .map_err(db)?
                .query_row(params![kind, key], |r| r.get(0))
                .optional()
                .map_err(db)
        })
        .await
    }
    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let kind = nul_free(kind).into_owned();
        self.with(move |c| {
            let mut st = c
                .prepare_cached("SELECT key, doc FROM fleet_docs WHERE kind = ?1 ORDER BY key")
                .map_err(db)?;
            let rows = st
                .query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
    async fn docs_of(
        &self,
        kind: &str,
        keys: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let kind = nul_free(kind).into_owned();
        let keys = serde_json::to_string(keys).map_err(|e| StoreError::Db(e.to_string()))?;
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT key, doc FROM fleet_docs
                     WHERE kind = ?1 AND key IN (SELECT value FROM json_each(?2)) ORDER BY key",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![kind, keys], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
    async fn swap_doc(
        &self,
        kind: &str,
        key: &str,
        expect: Option<&str>,
        doc: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (kind, key, doc) = (
            nul_free(kind).into_owned(),
            nul_free(key).into_owned(),
            nul_free(doc).into_owned(),
        );
        let expect = expect.map(|e| nul_free(e).into_owned());
        self.with(move |c| {
            let n = match expect {
                None => c
                    .prepare_cached(
                        "INSERT INTO fleet_docs (kind, key, doc, updated_ms) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (kind, key) DO NOTHING",
                    )
                    .map_err(db)?
                    .execute(params![kind, key, doc, now_ms]),
                Some(e) => c
                    .prepare_cached(
                        "UPDATE fleet_docs SET doc = ?3, updated_ms = ?4
                         WHERE kind = ?1 AND key = ?2 AND doc = ?5",
                    )
                    .map_err(db)?
                    .execute(params![kind, key, doc, now_ms, e]),
            }
            .map_err(db)?;
            Ok(n == 1)
        })
        .await
    }
    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        let (kind, key) = (nul_free(kind).into_owned(), nul_free(key).into_owned());
        self.with(move |c| {
            c.prepare_cached("DELETE FROM fleet_docs WHERE kind = ?1 AND key = ?2")
                .map_err(db)?
                .execute(params![kind, key])
                .map(|n| n > 0)
                .map_err(db)
        })
        .await
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Runs `sql` on a connection of its own to the same file, as another program
    /// would.
    pub(crate) fn execute_elsewhere(&self, sql: &str) -> Result<(), StoreError> {
        Connection::open(&self.path)
            .and_then(|c| c.execute_batch(sql))
            .map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prepare;

    use crate::store::conformance::batch;

    #[test]
    fn seq_ranges_agree_with_a_set_of_seqs() {
        use std::collections::BTreeSet;
        // Seqs in a shuffled-window order, with repeats and gaps, as resends make them.
        let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for round in 0..200 {
            let mut set = SeqRanges::default();
            let mut want = BTreeSet::new();
            let span = 1 + round % 60;
            for _ in 0..300 {
                let seq = next() % span + if round % 3 == 0 { u64::MAX - 70 } else { 1 };
                assert_eq!(
                    set.insert(seq, usize::MAX) == SeqInsert::New,
                    want.insert(seq),
                    "insert {seq}"
                );
                let back = SeqRanges::from_bytes(&set.to_bytes()).expect("round trip");
                assert_eq!(back, set);
            }
            for seq in want.iter().copied() {
                assert!(set.contains(seq));
            }
            let lo = *want.first().unwrap();
            let hi = *want.last().unwrap();
            for seq in lo.saturating_sub(2)..=hi.saturating_add(2).max(hi) {
                assert_eq!(set.contains(seq), want.contains(&seq), "contains {seq}");
            }
            // Sorted, disjoint and not adjacent: the fewest ranges for the set.
            let gaps = want
                .iter()
                .zip(want.iter().skip(1))
                .filter(|(a, b)| **b != **a + 1)
                .count();
            assert_eq!(set.0.range_count(), gaps + 1);
        }
        assert!(
            SeqRanges::from_bytes(&[0; 15]).is_none(),
            "not whole ranges"
        );
        let mut bad = SeqRanges::from_ranges(&[(5, 9), (10, 12)]);
        assert!(SeqRanges::from_bytes(&bad).is_none(), "adjacent ranges");
        bad = SeqRanges::from_ranges(&[(9, 5)]);
        assert!(SeqRanges::from_bytes(&bad).is_none(), "reversed range");
        assert_eq!(
            SeqRanges::from_bytes(&SeqRanges::from_ranges(&[(1, 3), (5, 9)])).map(|s| s
                .0
                .iter()
                .collect::<Vec<_>>(
            )),
            Some(vec![(1, 3), (5, 9)])
        );
    }

    #[test]
    fn seq_ranges_stop_growing_at_the_cap() {
        let mut set = SeqRanges::default();
        let mut refused = 0;
        for seq in (0..10_000u64).rev().map(|i| 2 * i) {
            if set.insert(seq, MAX_SEQ_RANGES) == SeqInsert::Refused {
                refused += 1;
            }
        }
        assert_eq!(set.0.range_count(), MAX_SEQ_RANGES);
        assert_eq!(refused, 10_000 - MAX_SEQ_RANGES);
        // At the cap, a seq that joins or extends a range is still taken, and a
        // duplicate is still a duplicate.
        let (lo, _) = set.0.first().unwrap();
        assert_eq!(set.insert(lo, MAX_SEQ_RANGES), SeqInsert::Duplicate);
        assert_eq!(set.insert(lo + 1, MAX_SEQ_RANGES), SeqInsert::New);
        assert_eq!(set.0.range_count(), MAX_SEQ_RANGES - 1, "two ranges joined");
        assert_eq!(set.insert(1, MAX_SEQ_RANGES), SeqInsert::New);
        assert_eq!(set.insert(3, MAX_SEQ_RANGES), SeqInsert::Refused);
    }

    /// A hostile batch: 50,000 seqs, descending, none adjacent. Each would be a range
    /// of its own, and each insert would shift every range after it; the cap keeps the
    /// set at MAX_SEQ_RANGES ranges, and the rest are refused, unstored.
    #[tokio::test]
    async fn fifty_thousand_far_apart_seqs_in_one_batch_keep_the_ranges_capped() {
        let dir = std::env::temp_dir().join(format!("imn-ranges-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sqlite");
        let s = SqliteStore::open(&path).unwrap();
        const N: u64 = 50_000;
        let records = (0..N)
            .map(|i| imn_proto::wire::Record {
                seq: 2 * (N - i),
                at_ms: 1,
                body: imn_proto::wire::RecordBody::Event(imn_proto::wire::AgentEvent {
                    kind: "k".into(),
                    message: String::new(),
                }),
            })
            .collect();
        let batch = imn_proto::wire::Batch { epoch: 1, records };
        let out = s.store_batch("h", prepare(&batch), 1).await.unwrap();
        assert_eq!(out.stored, MAX_SEQ_RANGES as u64);
        assert_eq!(out.refused.len() as u64, N - MAX_SEQ_RANGES as u64);
        assert_eq!(s.record_count().await.unwrap(), MAX_SEQ_RANGES as u64);
        let ranges: Vec<u8> = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT ranges FROM record_seqs WHERE agent_id = 'h' AND epoch = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let set = SeqRanges::from_bytes(&ranges).unwrap();
        assert_eq!(set.0.range_count(), MAX_SEQ_RANGES);
        assert_eq!(
            set.0.first().unwrap(),
            (
                2 * (N - MAX_SEQ_RANGES as u64 + 1),
                2 * (N - MAX_SEQ_RANGES as u64 + 1)
            )
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What SQLite does with NUL in TEXT: rusqlite binds and reads text with its
    /// length, so it comes back whole. The store never relies on it: bodies are JSON
    /// (NUL is `\u0000` there) and columns of agent text are `nul_free`.
    #[test]
    fn rusqlite_reads_back_text_with_nul_whole() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (v TEXT)").unwrap();
        c.execute("INSERT INTO t VALUES (?1)", ["a\0b"]).unwrap();
        let v: String = c.query_row("SELECT v FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(v, "a\0b");
    }

    /// Dead-lettered seqs count as handled in the epoch's seq set: an agent with more
    /// dead letters than MAX_SEQ_RANGES still has its records after them stored, not
    /// refused as far apart.
    #[tokio::test]
    async fn dead_letters_leave_no_gaps_in_the_seq_ranges() {
        let dir = std::env::temp_dir().join(format!("imn-gaps-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SqliteStore::open(&dir.join("s.sqlite")).unwrap();
        s.execute_elsewhere(
            "CREATE TRIGGER even_seqs BEFORE INSERT ON records WHEN NEW.seq % 2 = 0
             BEGIN SELECT RAISE(ABORT, 'even'); END;",
        )
        .unwrap();
        let n = 2 * (MAX_SEQ_RANGES as u64 + 10);
        let seqs: Vec<u64> = (1..=n).collect();
        let out = s
            .store_batch("q", prepare(&batch(1, &seqs)), 1)
            .await
            .unwrap();
        assert!(out.refused.is_empty(), "{} refused", out.refused.len());
        assert_eq!((out.stored, out.dead_lettered), (n / 2, n / 2));
        let again = s
            .store_batch("q", prepare(&batch(1, &seqs)), 2)
            .await
            .unwrap();
        assert_eq!(again.duplicates, n, "dead letters included");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
