//! Migrations of the SQLite store: a new file gets every numbered migration; a file
//! made before numbered migrations, in each shape the old introspection handled, is
//! brought to migration 1's layout with its rows, recorded at version 1, and given the
//! later migrations; a file of a newer version is refused; migrating again changes
//! nothing.

use rusqlite::{params, Connection, OptionalExtension};

use super::*;
use crate::store::conformance::{batch, result_seqs};
use crate::store::migrate::{latest, SQLITE};
use crate::store::prepare;

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("imn-migrate-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The version the file records, if any.
fn version(path: &Path) -> Option<i64> {
    let c = Connection::open(path).unwrap();
    let has_table = c
        .prepare("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'")
        .and_then(|mut st| st.exists([]))
        .unwrap();
    if !has_table {
        return None;
    }
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert!(rows <= 1, "one version row, not {rows}");
    c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()
        .unwrap()
}

/// The file's layout, as far as the store depends on it: each table (and whether it is
/// WITHOUT ROWID) with its columns, sorted (ALTER TABLE appends where the first layout
/// had them elsewhere), and each index with its columns, uniqueness and definition.
fn layout(path: &Path) -> Vec<String> {
    let c = Connection::open(path).unwrap();
    let mut out = Vec::new();
    let tables: Vec<(String, Option<String>)> = {
        let mut st = c
            .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    };
    for (table, sql) in tables {
        let rowid = if sql.unwrap_or_default().contains("WITHOUT ROWID") {
            " without rowid"
        } else {
            ""
        };
        out.push(format!("table {table}{rowid}"));
        let mut st = c
            .prepare(&format!(
                "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info('{table}')"
            ))
            .unwrap();
        let mut cols = st
            .query_map([], |r| {
                Ok(format!(
                    "  column {table}.{} {} notnull={} default={:?} pk={}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?
                ))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        cols.sort();
        out.extend(cols);
        let mut st = c
            .prepare(&format!(
                "SELECT il.name, il.\"unique\", il.partial,
                        (SELECT group_concat(name, ',') FROM pragma_index_info(il.name)),
                        (SELECT sql FROM sqlite_master WHERE type = 'index' AND name = il.name)
                 FROM pragma_index_list('{table}') il ORDER BY il.name"
            ))
            .unwrap();
        let indexes = st
            .query_map([], |r| {
                // The definition, spelled the same whatever made it.
                let sql = r.get::<_, Option<String>>(4)?.map(|s| {
                    s.replace("IF NOT EXISTS ", "")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                });
                Ok(format!(
                    "  index {} unique={} partial={} on ({}) {:?}",
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    sql
                ))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        out.extend(indexes);
    }
    out
}

/// The layout of a new store: every numbered migration applied.
fn fresh_layout() -> Vec<String> {
    let dir = temp_dir();
    let path = dir.join("fresh.sqlite");
    drop(SqliteStore::open(&path).unwrap());
    let l = layout(&path);
    let _ = std::fs::remove_dir_all(&dir);
    l
}

/// A file as the last version before numbered migrations left it on open: its
/// settings, then its tables and introspection (`legacy::upgrade`), no version.
fn made_before_versions(path: &Path) -> Connection {
    let mut c = Connection::open(path).unwrap();
    c.execute_batch(PRAGMAS).unwrap();
    let tx = c.transaction().unwrap();
    legacy::upgrade(&tx).unwrap();
    tx.commit().unwrap();
    c
}

/// `layout` without the version table, which files made before it lack.
fn without_version(mut l: Vec<String>) -> Vec<String> {
    l.retain(|l| !l.contains("schema_version"));
    l
}

#[tokio::test]
async fn a_new_store_gets_every_migration_and_the_layout_stores_had_before() {
    let dir = temp_dir();
    let path = dir.join("new.sqlite");
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&path), Some(latest(SQLITE)));
    // Each migration applied in order to an empty file, by hand, makes the same layout.
    let by_hand = dir.join("by-hand.sqlite");
    {
        let c = Connection::open(&by_hand).unwrap();
        c.execute_batch(PRAGMAS).unwrap();
        c.execute_batch(crate::store::migrate::VERSION_TABLE)
            .unwrap();
        for m in SQLITE {
            c.execute_batch(m.sql).unwrap();
        }
    }
    assert_eq!(layout(&path), layout(&by_hand));
    // Migration 1 is the layout the store had when numbered migrations began.
    let first = dir.join("first.sqlite");
    {
        let c = Connection::open(&first).unwrap();
        c.execute_batch(PRAGMAS).unwrap();
        c.execute_batch(SQLITE[0].sql).unwrap();
    }
    drop(made_before_versions(&dir.join("before.sqlite")));
    let before = layout(&dir.join("before.sqlite"));
    assert!(before.contains(&"table records".to_string()), "{before:?}");
    assert_eq!(without_version(layout(&first)), before);
    // And it works.
    s.create_request(crate::store::conformance::new_request("r1", None))
        .await
        .unwrap();
    assert!(s.request("r1").await.unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store the last version before numbered migrations made (the current layout, no
/// version) is recorded at version 1 as it is: migration 1 is not run on it (it would
/// fail on tables that exist), and nothing is lost.
#[tokio::test]
async fn a_store_made_just_before_numbered_migrations_is_baselined_with_its_rows() {
    let dir = temp_dir();
    let path = dir.join("before.sqlite");
    {
        let c = made_before_versions(&path);
        c.execute_batch(
            r#"INSERT INTO agents VALUES ('a', 1, 2, '{}');
            INSERT INTO requests (id, agent_id, module, params_json, state, created_ms, updated_ms,
                deadline_ms, timeout_ms, idempotency_key, traceparent, measurement_id, idempotency_hash)
                VALUES ('r1', 'a', 'echo_module', '{}', 'pending', 1, 1, 9, 9, 'k1', NULL, 'm1', 'h1');
            INSERT INTO measurements (id, module, params_json, selection_json, description, created_ms,
                deadline_ms, schedule_json, stopped_ms, owner, daily_probes)
                VALUES ('m1', 'echo_module', '{}', '{}', 'before', 1, 9, NULL, NULL, 't1', 0);
            INSERT INTO credentials VALUES ('api', 't1', 'h', NULL, 'read', '', NULL, 1, NULL, '{"probes_per_day":5}');
            INSERT INTO token_spend VALUES ('t1', 1, 4);"#,
        )
        .unwrap();
    }
    assert_eq!(version(&path), None);
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&path), Some(latest(SQLITE)));
    assert_eq!(layout(&path), fresh_layout());
    let r = s.request_by_key("k1").await.unwrap().unwrap();
    assert_eq!(
        (r.id.as_str(), r.idempotency_hash.as_deref()),
        ("r1", Some("h1"))
    );
    assert_eq!(
        s.measurement("m1").await.unwrap().unwrap().owner.as_deref(),
        Some("t1")
    );
    assert_eq!(
        s.credentials().await.unwrap()[0].budget_json.as_deref(),
        Some(r#"{"probes_per_day":5}"#)
    );
    assert_eq!(s.add_spend("t1", 1, 1).await.unwrap(), 5);
    let agent: String = Connection::open(&path)
        .unwrap()
        .query_row("SELECT id FROM agents", [], |r| r.get(0))
        .unwrap();
    assert_eq!(agent, "a");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Between the two older shapes below: records already in arrival order (with their
/// seqs in `record_seqs`) but without `measurement_id`, requests with `result_id` and
/// `traceparent` only, measurements without a schedule, and none of the tables added
/// later (run results, per-agent counts, credentials, dead letters, spend).
const ARRIVAL_ORDER: &str = "
    CREATE TABLE agents (id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL,
        last_hello_ms INTEGER NOT NULL, hello_json TEXT NOT NULL);
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, module TEXT NOT NULL,
        params_json TEXT NOT NULL, state TEXT NOT NULL, created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
        timeout_ms INTEGER NOT NULL, idempotency_key TEXT UNIQUE, result_id INTEGER,
        traceparent TEXT
    );
    CREATE INDEX requests_agent_state ON requests(agent_id, state);
    CREATE TABLE measurements (
        id TEXT PRIMARY KEY, module TEXT NOT NULL, params_json TEXT NOT NULL,
        selection_json TEXT NOT NULL, description TEXT, created_ms INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL
    );
    CREATE TABLE records (
        id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL, kind TEXT NOT NULL, request_id TEXT, module TEXT,
        at_ms INTEGER NOT NULL, stored_ms INTEGER NOT NULL, body_json TEXT NOT NULL
    );
    CREATE INDEX records_agent ON records(agent_id, kind, id);
    CREATE TABLE record_seqs (
        agent_id TEXT NOT NULL, epoch INTEGER NOT NULL, ranges BLOB NOT NULL,
        PRIMARY KEY (agent_id, epoch)
    ) WITHOUT ROWID;";

#[tokio::test]
async fn a_store_with_records_in_arrival_order_but_older_columns_is_migrated_without_loss() {
    let dir = temp_dir();
    let path = dir.join("arrival.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(ARRIVAL_ORDER).unwrap();
        c.execute_batch(
            r#"INSERT INTO agents VALUES ('a', 1, 2, '{}');
            INSERT INTO requests VALUES ('r1', 'a', 'echo_module', '{}', 'succeeded', 1, 2, 9, 9, 'k1', 2, '00-t-s-01');
            INSERT INTO measurements VALUES ('m1', 'echo_module', '{}', '{}', 'old', 1, 9);
            INSERT INTO records VALUES (1, 'a', 7, 1, 'state', 'r1', NULL, 11, 100, '{"state":"running","detail":null}');
            INSERT INTO records VALUES (2, 'a', 7, 2, 'result', 'r1', 'echo_module', 12, 100,
                '{"state":"succeeded","result":{"message":"m"}}');
            INSERT INTO records VALUES (3, 'a', 7, 3, 'event', NULL, NULL, 13, 101, '{"kind":"boot","message":"hi"}');"#,
        )
        .unwrap();
        c.execute(
            "INSERT INTO record_seqs VALUES ('a', 7, ?1)",
            params![SeqRanges::from_ranges(&[(1, 3)])],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&path), Some(latest(SQLITE)));
    assert_eq!(layout(&path), fresh_layout());
    assert_eq!(s.record_count().await.unwrap(), 3);
    // Counted once from the records (agent_counts did not exist).
    assert_eq!(s.agent_record_count("a").await.unwrap(), 3);
    let r = s.request("r1").await.unwrap().unwrap();
    assert_eq!(r.traceparent.as_deref(), Some("00-t-s-01"));
    assert_eq!(s.result("a", "r1").await.unwrap().unwrap().seq, 2);
    let m = s.measurement("m1").await.unwrap().unwrap();
    assert_eq!(
        (m.description.as_deref(), m.schedule_json, m.daily_probes),
        (Some("old"), None, 0)
    );
    // The stored seqs are still known: 1 to 3 are duplicates, 4 to 6 new.
    let out = s
        .store_batch("a", prepare(&batch(7, &[1, 2, 3, 4, 5, 6])), 200)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (3, 3));
    // r1's run has its result (run_results was filled from the records): a second
    // result for it, under another record id, is a run duplicate.
    let out = s
        .store_batch("a", prepare(&batch(8, &[2])), 201)
        .await
        .unwrap();
    assert_eq!((out.stored, out.run_duplicates), (0, 1));
    assert_eq!(s.agent_record_count("a").await.unwrap(), 6);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_store_of_a_newer_version_is_refused_and_left_alone() {
    let dir = temp_dir();
    let path = dir.join("newer.sqlite");
    drop(SqliteStore::open(&path).unwrap());
    let newer = latest(SQLITE) + 1;
    Connection::open(&path)
        .unwrap()
        .execute_batch(&crate::store::migrate::set_version(newer))
        .unwrap();
    let e = SqliteStore::open(&path).err().expect("refused").to_string();
    assert!(
        e.contains(&format!("schema version {newer}"))
            && e.contains(&format!("this backend's {}", latest(SQLITE))),
        "{e}"
    );
    assert_eq!(version(&path), Some(newer));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn migrating_again_changes_nothing() {
    let dir = temp_dir();
    let path = dir.join("again.sqlite");
    let s = SqliteStore::open(&path).unwrap();
    s.create_request(crate::store::conformance::new_request("r1", Some("k1")))
        .await
        .unwrap();
    drop(s);
    let schema = |path: &Path| -> Vec<(String, Option<String>)> {
        let c = Connection::open(path).unwrap();
        let mut st = c
            .prepare("SELECT name, sql FROM sqlite_master ORDER BY name")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    };
    let before = schema(&path);
    assert!(!before.is_empty());
    {
        let mut c = Connection::open(&path).unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(schema(&path), before);
    assert_eq!(version(&path), Some(latest(SQLITE)));
    assert_eq!(s.request_by_key("k1").await.unwrap().unwrap().id, "r1");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The layout before records were kept in arrival order.
const OLD_RECORDS: &str = "
    CREATE TABLE records (
        agent_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
        kind TEXT NOT NULL, request_id TEXT, module TEXT, at_ms INTEGER NOT NULL,
        stored_ms INTEGER NOT NULL, body_json TEXT NOT NULL,
        PRIMARY KEY (agent_id, epoch, seq)
    ) WITHOUT ROWID;
    CREATE INDEX records_results ON records(agent_id, kind, stored_ms);
    CREATE INDEX records_request ON records(request_id);
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, module TEXT NOT NULL,
        params_json TEXT NOT NULL, state TEXT NOT NULL, created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
        timeout_ms INTEGER NOT NULL, idempotency_key TEXT UNIQUE
    );";

#[tokio::test]
async fn a_store_in_the_old_layout_is_migrated_without_loss() {
    let dir = std::env::temp_dir().join(format!("imn-migrate-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("old.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(OLD_RECORDS).unwrap();
        c.execute(
            "INSERT INTO requests VALUES ('r1', 'a', 'echo_module', '{}', 'succeeded', 1, 2, 9, 9, NULL)",
            [],
        )
        .unwrap();
        let rows = [
            ("a", 7, 1, "state", 100),
            ("a", 7, 2, "result", 100),
            ("a", 7, 3, "event", 101),
            ("a", 7, 5, "result", 102),
            ("b", 4, 1, "result", 100),
        ];
        for (agent, epoch, seq, kind, stored) in rows {
            let body = if kind == "result" {
                r#"{"state":"succeeded","result":{"message":"m"}}"#
            } else {
                r#"{"kind":"boot","message":"hi"}"#
            };
            c.execute(
                "INSERT INTO records VALUES (?1, ?2, ?3, ?4, ?5, 'echo_module', 1, ?6, ?7)",
                params![
                    agent,
                    epoch,
                    seq,
                    kind,
                    (agent == "a").then_some("r1"),
                    stored,
                    body
                ],
            )
            .unwrap();
        }
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&path), Some(latest(SQLITE)));
    assert_eq!(layout(&path), fresh_layout());
    assert_eq!(s.record_count().await.unwrap(), 5);
    assert_eq!(s.agent_record_count("a").await.unwrap(), 4);
    assert_eq!(result_seqs(&s, "a").await, vec![5, 2], "newest first");
    let r = s
        .result("a", "r1")
        .await
        .unwrap()
        .expect("first result of r1");
    assert_eq!((r.epoch, r.seq), (7, 2));
    assert!(
        s.result("b", "r1").await.unwrap().is_none(),
        "another agent's request"
    );
    assert_eq!(s.events("a", 10).await.unwrap().len(), 1);
    // The old record ids are still known: a resend stores only what is new.
    let out = s
        .store_batch("a", prepare(&batch(7, &[1, 2, 3, 4, 5, 6])), 200)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (2, 4));
    drop(s);
    // Opening again changes nothing.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.record_count().await.unwrap(), 7);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tables this version changed, as the previous version made them.
const PREVIOUS_TABLES: &str = "
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, module TEXT NOT NULL,
        params_json TEXT NOT NULL, state TEXT NOT NULL, created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
        timeout_ms INTEGER NOT NULL, idempotency_key TEXT UNIQUE, traceparent TEXT,
        measurement_id TEXT, result_id INTEGER
    );
    CREATE TABLE measurements (
        id TEXT PRIMARY KEY, module TEXT NOT NULL, params_json TEXT NOT NULL,
        selection_json TEXT NOT NULL, description TEXT, created_ms INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL, schedule_json TEXT, stopped_ms INTEGER
    );
    CREATE TABLE credentials (
        kind TEXT NOT NULL, id TEXT NOT NULL, secret_hash TEXT NOT NULL,
        message_key TEXT, scopes TEXT NOT NULL, tags TEXT NOT NULL, rate_per_min REAL,
        created_ms INTEGER NOT NULL, revoked_ms INTEGER, PRIMARY KEY (kind, id)
    );
    INSERT INTO requests VALUES ('r1', 'a', 'echo_module', '{}', 'pending', 1, 1, 9, 9, 'k1', NULL, 'm1', NULL);
    INSERT INTO measurements VALUES ('m1', 'echo_module', '{}', '{}', 'old', 1, 9, NULL, NULL);
    INSERT INTO measurements VALUES ('s1', 'echo_module', '{}', '{}', NULL, 1, 9000, '{}', NULL);
    INSERT INTO credentials VALUES ('api', 't1', 'h', NULL, 'read', '', NULL, 1, NULL);";

#[tokio::test]
async fn a_store_of_the_previous_version_opens_with_its_data() {
    let dir = std::env::temp_dir().join(format!("imn-migrate-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("previous.sqlite");
    Connection::open(&path)
        .unwrap()
        .execute_batch(PREVIOUS_TABLES)
        .unwrap();
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&path), Some(latest(SQLITE)));
    assert_eq!(layout(&path), fresh_layout());
    let m = s.measurement("m1").await.unwrap().unwrap();
    assert_eq!(
        (m.description.as_deref(), m.owner, m.daily_probes),
        (Some("old"), None, 0)
    );
    let r = s.request("r1").await.unwrap().unwrap();
    assert_eq!((r.agent_id.as_str(), r.idempotency_hash), ("a", None));
    let creds = s.credentials().await.unwrap();
    assert_eq!((creds.len(), creds[0].budget_json.clone()), (1, None));
    assert_eq!(s.dead_letter_count().await.unwrap(), 0);
    assert_eq!(s.add_spend("t1", 1, 3).await.unwrap(), 3);
    assert_eq!(s.token_usage("t1", 1, 0).await.unwrap().one_off_probes, 3);
    // The new columns take values.
    let mut req = crate::store::conformance::new_request("r2", Some("k2"));
    req.idempotency_hash = Some("h".into());
    s.create_request(req).await.unwrap();
    assert_eq!(
        s.request("r2")
            .await
            .unwrap()
            .unwrap()
            .idempotency_hash
            .as_deref(),
        Some("h")
    );
    drop(s);
    // Opening again changes nothing.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.measurement("s1").await.unwrap().unwrap().daily_probes, 0);
    assert_eq!(s.token_usage("t1", 1, 0).await.unwrap().one_off_probes, 3);
    let _ = std::fs::remove_dir_all(&dir);
}
