use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use imn_modules::wire::{Hello, RequestState};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    AgentRow, BatchOutcome, Created, NewRequest, PreparedBatch, RequestRow, ResultRow, Store,
    StoreError, Transition,
};

/// How often the background thread checkpoints the WAL.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The embedded store: one SQLite file in WAL mode.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

const SCHEMA: &str = "
-- 16 KiB pages (a new file only; set before WAL): inserting into the records table
-- and its two indexes measured 6.8 us per record against 9.8 us with 4 KiB pages.
PRAGMA page_size = 16384;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
-- The records table and its indexes are hot during a drain: keep 64 MiB of pages in
-- memory (the default 2 MB sends inserts to the OS for index pages).
PRAGMA cache_size = -65536;
PRAGMA temp_store = MEMORY;
-- Checkpoints run on their own thread (see checkpoint_in_background); the writer
-- checkpoints only if the WAL passes 64 MiB.
PRAGMA wal_autocheckpoint = 4096;
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
    idempotency_key TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS requests_agent_state ON requests(agent_id, state);
CREATE TABLE IF NOT EXISTS transitions (
    request_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    observer TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_request ON transitions(request_id);
CREATE TABLE IF NOT EXISTS records (
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    module TEXT,
    at_ms INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    body_json TEXT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
) WITHOUT ROWID;
-- Records stored per agent, kept in the batch's transaction: a COUNT(*) over records
-- is a scan, and dashboards ask often.
CREATE TABLE IF NOT EXISTS agent_counts (
    agent_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_results ON records(agent_id, kind, stored_ms);
CREATE INDEX IF NOT EXISTS records_request ON records(request_id);
";

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        // A store from before agent_counts existed: count once.
        conn.execute_batch(
            "INSERT INTO agent_counts (agent_id, records)
             SELECT agent_id, COUNT(*) FROM records
             WHERE NOT EXISTS (SELECT 1 FROM agent_counts) GROUP BY agent_id",
        )
        .map_err(db)?;
        let conn = Arc::new(Mutex::new(conn));
        Self::checkpoint_in_background(path, Arc::downgrade(&conn))?;
        Ok(SqliteStore { conn })
    }

    /// Copies the WAL into the database from a connection of its own, so the writer
    /// does not: an automatic checkpoint inside a commit made one batch in twelve take
    /// five times as long during a drain. PASSIVE never blocks the writer. The thread
    /// ends with the store.
    fn checkpoint_in_background(
        path: &Path,
        store: std::sync::Weak<Mutex<Connection>>,
    ) -> Result<(), StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while store.strong_count() > 0 {
                    std::thread::sleep(CHECKPOINT_EVERY);
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

const REQUEST_COLS: &str =
    "id, agent_id, module, params_json, state, created_ms, updated_ms, deadline_ms, timeout_ms";

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
    })
}

fn get_request(c: &Connection, id: &str) -> Result<Option<RequestRow>, StoreError> {
    c.query_row(
        &format!("SELECT {REQUEST_COLS} FROM requests WHERE id = ?1"),
        [id],
        request_row,
    )
    .optional()
    .map_err(db)
}

/// Moves a request forward; never back, never out of a terminal state.
/// Inserts one batch's records inside the caller's transaction.
fn insert_batch(
    tx: &Connection,
    agent: &str,
    batch: &PreparedBatch,
    now_ms: i64,
) -> Result<BatchOutcome, StoreError> {
    let mut out = BatchOutcome::default();
    let mut insert = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO records (agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(db)?;
    for row in &batch.rows {
        let n = insert
            .execute(params![
                agent,
                batch.epoch as i64,
                row.seq as i64,
                row.kind,
                row.request_id,
                row.module,
                row.at_ms,
                now_ms,
                row.body_json
            ])
            .map_err(db)?;
        if n == 0 {
            out.duplicates += 1;
            continue;
        }
        out.stored += 1;
        if let Some(t) = &row.transition {
            let changed = apply_transition(
                tx,
                &t.request_id,
                t.state,
                row.at_ms,
                "agent",
                t.detail.as_deref(),
            )?;
            if changed && t.state.is_terminal() {
                out.finished.push(t.request_id.clone());
            }
        }
    }
    Ok(out)
}

fn apply_transition(
    c: &Connection,
    id: &str,
    state: RequestState,
    at_ms: i64,
    observer: &str,
    detail: Option<&str>,
) -> Result<bool, StoreError> {
    // Cached statements: during a drain this runs once per record.
    let Some(current) = c
        .prepare_cached("SELECT state FROM requests WHERE id = ?1")
        .map_err(db)?
        .query_row([id], |r| r.get::<_, String>(0))
        .optional()
        .map_err(db)?
        .map(state_of)
    else {
        return Ok(false);
    };
    c.prepare_cached(
        "INSERT INTO transitions (request_id, state, at_ms, observer, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![id, state.as_str(), at_ms, observer, detail])
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

fn result_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ResultRow> {
    let body: String = r.get(6)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let ms = |k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(0);
    Ok(ResultRow {
        agent_id: r.get(0)?,
        epoch: r.get::<_, i64>(1)? as u64,
        seq: r.get::<_, i64>(2)? as u64,
        request_id: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        module: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
        stored_ms: r.get(5)?,
        state: v
            .get("state")
            .and_then(|s| s.as_str())
            .and_then(RequestState::parse)
            .unwrap_or(RequestState::Failed),
        result: v.get("result").cloned().unwrap_or_default(),
        error: v.get("error").and_then(|e| e.as_str()).map(str::to_string),
        received_ms: ms("received_ms"),
        started_ms: ms("started_ms"),
        finished_ms: ms("finished_ms"),
    })
}

const RESULT_COLS: &str = "agent_id, epoch, seq, request_id, module, stored_ms, body_json";

#[async_trait]
impl Store for SqliteStore {
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

    async fn create_request(&self, req: NewRequest) -> Result<Created, StoreError> {
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
            tx.execute(
                &format!("INSERT INTO requests ({REQUEST_COLS}, idempotency_key) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?6, ?7, ?8)"),
                params![
                    req.id,
                    req.agent_id,
                    req.module,
                    req.params_json,
                    req.created_ms,
                    req.deadline_ms,
                    req.timeout_ms as i64,
                    req.idempotency_key
                ],
            )
            .map_err(db)?;
            tx.execute(
                "INSERT INTO transitions (request_id, state, at_ms, observer) VALUES (?1, 'pending', ?2, 'backend')",
                params![req.id, req.created_ms],
            )
            .map_err(db)?;
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
        self.with(move |c| apply_transition(c, &id, state, at_ms, &observer, detail.as_deref()))
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
        self.with(move |c| {
            let tx = c.transaction().map_err(db)?;
            let mut outcomes = Vec::with_capacity(batches.len());
            // One counter update per agent per transaction, not per batch.
            let mut counts: HashMap<&str, u64> = HashMap::new();
            for (agent, batch) in &batches {
                let out = insert_batch(&tx, agent, batch, now_ms)?;
                *counts.entry(agent.as_str()).or_default() += out.stored;
                outcomes.push(out);
            }
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
        })
        .await
    }

    async fn results(&self, agent: &str, limit: u32) -> Result<Vec<ResultRow>, StoreError> {
        let agent = agent.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare(&format!("SELECT {RESULT_COLS} FROM records WHERE agent_id = ?1 AND kind = 'result' ORDER BY stored_ms DESC, seq DESC LIMIT ?2"))
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
                &format!("SELECT {RESULT_COLS} FROM records WHERE agent_id = ?1 AND request_id = ?2 AND kind = 'result' ORDER BY stored_ms LIMIT 1"),
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
                .prepare("SELECT at_ms, body_json FROM records WHERE agent_id = ?1 AND kind = 'event' ORDER BY stored_ms DESC, seq DESC LIMIT ?2")
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prepare;
    use imn_modules::results::{EchoResult, ModuleOutcome, ModuleOutput};
    use imn_modules::wire::{Batch, ModuleResult, Record, RecordBody, StateChange};

    fn store() -> SqliteStore {
        let dir = std::env::temp_dir().join(format!(
            "imn-store-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        SqliteStore::open(&dir.join("s.sqlite")).unwrap()
    }

    fn new_request(id: &str, key: Option<&str>) -> NewRequest {
        NewRequest {
            id: id.into(),
            agent_id: "a".into(),
            module: "echo_module".into(),
            params_json: r#"{"message":"m"}"#.into(),
            created_ms: 1,
            deadline_ms: 1_000,
            timeout_ms: 5_000,
            idempotency_key: key.map(str::to_string),
        }
    }

    fn batch(epoch: u64, seqs: &[u64]) -> Batch {
        Batch {
            epoch,
            records: seqs
                .iter()
                .map(|&seq| Record {
                    seq,
                    at_ms: 10 + seq as i64,
                    body: if seq % 2 == 1 {
                        RecordBody::State(StateChange {
                            request_id: "r1".into(),
                            state: RequestState::Running,
                            detail: None,
                        })
                    } else {
                        RecordBody::Result(ModuleResult {
                            request_id: "r1".into(),
                            module: "echo_module".into(),
                            received_ms: 5,
                            started_ms: 6,
                            finished_ms: 7,
                            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                                message: "m".into(),
                            })),
                        })
                    },
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn batches_are_stored_once_per_record_id() {
        let s = store();
        s.create_request(new_request("r1", None)).await.unwrap();
        let first = s
            .store_batch("a", prepare(&batch(7, &[1, 2])), 100)
            .await
            .unwrap();
        assert_eq!((first.stored, first.duplicates), (2, 0));
        assert_eq!(first.finished, vec!["r1".to_string()]);
        // The same batch again, and an overlapping one: only seq 3 is new.
        let again = s
            .store_batch("a", prepare(&batch(7, &[1, 2, 3])), 101)
            .await;
        let again = again.unwrap();
        assert_eq!((again.stored, again.duplicates), (1, 2));
        assert!(
            again.finished.is_empty(),
            "a finished request does not finish twice"
        );
        // Another epoch is another set of ids.
        assert_eq!(
            s.store_batch("a", prepare(&batch(8, &[1])), 102)
                .await
                .unwrap()
                .stored,
            1
        );
        assert_eq!(s.record_count().await.unwrap(), 4);
        assert_eq!(s.agent_record_count("a").await.unwrap(), 4);
        assert_eq!(s.agent_record_count("b").await.unwrap(), 0);
        assert_eq!(s.results("a", 10).await.unwrap().len(), 1);
        let r = s.result("a", "r1").await.unwrap().unwrap();
        assert_eq!((r.state, r.epoch, r.seq), (RequestState::Succeeded, 7, 2));
        assert_eq!(r.result["message"], "m");
    }

    #[tokio::test]
    async fn states_only_move_forward() {
        let s = store();
        s.create_request(new_request("r1", None)).await.unwrap();
        assert!(s
            .transition("r1", RequestState::Running, 2, "agent", None)
            .await
            .unwrap());
        assert!(!s
            .transition("r1", RequestState::Received, 3, "agent", None)
            .await
            .unwrap());
        assert!(s
            .transition("r1", RequestState::Failed, 4, "agent", Some("boom"))
            .await
            .unwrap());
        assert!(!s
            .transition("r1", RequestState::Expired, 5, "backend", None)
            .await
            .unwrap());
        assert_eq!(
            s.request("r1").await.unwrap().unwrap().state,
            RequestState::Failed
        );
        // Every observation is kept in the history, even those that changed nothing.
        assert_eq!(s.transitions("r1").await.unwrap().len(), 5);
        assert!(
            s.overdue(10_000).await.unwrap().is_empty(),
            "terminal requests never expire"
        );
    }

    #[tokio::test]
    async fn idempotency_key_returns_the_first_request() {
        let s = store();
        assert!(matches!(
            s.create_request(new_request("r1", Some("k")))
                .await
                .unwrap(),
            Created::New(_)
        ));
        match s
            .create_request(new_request("r2", Some("k")))
            .await
            .unwrap()
        {
            Created::Existing(r) => assert_eq!(r.id, "r1"),
            Created::New(_) => panic!("same key made a second request"),
        }
        assert!(s.request("r2").await.unwrap().is_none());
        assert_eq!(s.undelivered("a").await.unwrap().len(), 1);
        assert_eq!(s.overdue(2_000).await.unwrap().len(), 1);
    }
}
