//! The PostgreSQL store: the same [`Store`] as the embedded one, for deployments that
//! outgrow one machine. Several backends share one database.
//!
//! - Records are partitioned by the agent's time (`at_ms`), one partition per month,
//!   made on first use for months near the backend's clock (from 12 months back to 1
//!   ahead, see [`partition_of`]); other times (a device that booted without a clock,
//!   or an agent that lies) go to a default partition, so no agent can make a table
//!   per month of a century. Old months can be detached or dropped whole.
//! - A record's id is (agent, epoch, seq): a unique index (with `at_ms`, which a
//!   partitioned table requires, and which a resend repeats) drops resent records.
//! - Writers run in parallel, and a reader paging by position (the API's cursor) never
//!   skips a record another writer commits late. A record's position is
//!   `base + (xid << 20) + i`: its transaction's id (`pg_current_xact_id`), then its
//!   index in the transaction. Readers read only below
//!   `base + (xmin << 20)`, where xmin is the oldest transaction id still running
//!   (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction below it has ended,
//!   so nothing can appear there later. A record is readable once every transaction
//!   older than its own has ended (a long transaction anywhere in the cluster delays
//!   readers; it never makes them skip). `base` (migration 8) keeps positions of older
//!   versions, drawn from a sequence, below every new one, so old cursors stay valid.
//! - Writers hold the write lock shared; what changes partitions (making one,
//!   detaching one) holds it alone, in a transaction of its own.
//! - A group of batches is one transaction of a few statements over arrays
//!   (`unnest`), not one statement per record.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use imn_proto::wire::{Hello, RequestState};
use tokio_postgres::NoTls;

use super::prelude::*;
use super::{
    checked_release, file_taken, nul_free, release_taken, AgentRow, AgentSchedule, BatchOutcome,
    Created, CredentialRow, DeadLetter, HeartbeatRow, MeasurementRow, NewRequest, PreparedBatch,
    PruneRecords, RecordRow, ReleaseRow, RequestRow, ResultFilter, ResultRow, RollupFilter,
    RollupRow, ScheduleProgress, StoreError, StoreStats, TokenUsage, Transition,
    AGENT_RELEASE_NAME, MAX_SCHEDULE_VERSION,
};

/// Positions of one transaction's records are `start + 1 ..= start + ROWS_PER_TX - 1`
/// (see the module's notes; the shift in migration 8).
const ROWS_PER_TX: usize = 1 << 20;

/// Readers' upper bound on positions, once per statement (see the module's notes).
const BOUND: &str = "(SELECT imn_position_bound())";

/// Whether a store error is a deadlock or a serialization failure: parallel writers
/// storing the same records (a resend reaching two backends) may meet one, and the
/// transaction is simply tried again.
fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(m) if m.ends_with("(40P01)") || m.ends_with("(40001)"))
}

/// Advisory lock keys (any two constants unlikely to clash with an application's).
const WRITE_LOCK: i64 = 0x494d_4e5f_5752; // "IMN_WR"
const MIGRATE_LOCK: i64 = 0x494d_4e5f_4d47; // "IMN_MG"

/// Monthly partitions are made for the months from this many before the backend's
/// clock's month to [`PARTITION_MONTHS_AHEAD`] after it; records of other months go
/// to the default partition.
/// Adds `$3` probes to token `$1`'s spend on day `$2`, in one statement: backends
/// adding at once are serialized on the row, and the sum is taken only when it fits.
const ADD_SPEND: &str = "INSERT INTO token_spend (token, day, probes) VALUES ($1, $2, $3)
     ON CONFLICT (token, day) DO UPDATE SET probes =
         CASE WHEN token_spend.probes > 9223372036854775807 - EXCLUDED.probes
              THEN 9223372036854775807
              ELSE token_spend.probes + EXCLUDED.probes END
     RETURNING probes";
const PARTITION_MONTHS_BACK: i64 = 12;
const PARTITION_MONTHS_AHEAD: i64 = 1;

fn db<E: std::fmt::Display + 'static>(e: E) -> StoreError {
    if unavailable(&e) {
        StoreError::Unavailable(message(&e))
    } else {
        StoreError::Db(message(&e))
    }
}

/// Whether the error is the server's or the connection's state rather than a
/// statement's data: no connection, a conflict with another transaction, resources,
/// an administrator, a system error (SQLSTATE classes 08, 40, 53, 55, 57, 58, F0, XX).
/// Those never make a record a poison record.
fn unavailable<E: 'static>(e: &E) -> bool {
    let any: &dyn std::any::Any = e;
    let Some(e) = any.downcast_ref::<tokio_postgres::Error>() else {
        return false;
    };
    match e.as_db_error() {
        None => true,
        Some(d) => matches!(
            d.code().code().get(..2),
            Some("08" | "40" | "53" | "55" | "57" | "58" | "F0" | "XX")
        ),
    }
}

/// tokio-postgres's errors say only "db error": give the server's message and code.
fn message<E: std::fmt::Display + 'static>(e: &E) -> String {
    let any: &dyn std::any::Any = e;
    match any
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.as_db_error())
    {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// The records table's columns, as a partition made by moving rows takes them.
const RECORD_COLUMNS: &str = "position, agent_id, epoch, seq, kind, request_id, module, measurement_id, scheduled_ms, at_ms, stored_ms, body, body_text";

/// The PostgreSQL store. Cheap to clone; connections come from a pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Monthly partitions known to exist (first ms of the month).
    partitions: std::sync::Arc<Mutex<HashSet<i64>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// The month `at_ms` falls in, counted from year 0 (year * 12 + month - 1); None past
/// the calendar's range.
fn month_index(at_ms: i64) -> Option<i64> {
    let t = time::OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000)).ok()?;
    Some(i64::from(t.year()) * 12 + i64::from(u8::from(t.month())) - 1)
}

/// Month `index` (see [`month_index`]) as [first ms, first ms of the next), and its
/// table's name.
fn month_bounds(index: i64) -> Option<(i64, i64, String)> {
    let date = |i: i64| {
        let month = time::Month::try_from(u8::try_from(i.rem_euclid(12) + 1).ok()?).ok()?;
        time::Date::from_calendar_date(i32::try_from(i.div_euclid(12)).ok()?, month, 1).ok()
    };
    let ms = |d: time::Date| d.midnight().assume_utc().unix_timestamp() * 1000;
    let start = date(index)?;
    let next = date(index + 1)?;
    Some((
        ms(start),
        ms(next),
        format!(
            "records_y{:04}m{:02}",
            start.year(),
            u8::from(start.month())
        ),
    ))
}

/// The month `at_ms` falls in, as [`month_bounds`].
#[cfg(test)]
fn month_of(at_ms: i64) -> Option<(i64, i64, String)> {
    month_bounds(month_index(at_ms)?)
}

/// The monthly partition a record of agent time `at_ms` gets when the backend's clock
/// says `now_ms`: its month's, if that month overlaps [now - 12 months, now + 1 month];
/// else None, and the record goes to the default partition. An agent's clock is its
/// own: one sending times from any year would otherwise make a table for each month.
fn partition_of(at_ms: i64, now_ms: i64) -> Option<(i64, i64, String)> {
    let (month, now) = (month_index(at_ms)?, month_index(now_ms)?);
    (now - PARTITION_MONTHS_BACK..=now + PARTITION_MONTHS_AHEAD)
        .contains(&month)
        .then(|| month_bounds(month))
        .flatten()
}

impl PostgresStore {
    /// Connects (`postgres://user:password@host:port/database`, or key=value form),
    /// runs the migrations this version needs, and makes this month's and next
    /// month's partitions.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_tls(url, None).await
    }

    /// [`Self::connect`], over TLS when the URL says `sslmode=require` or `ca` is
    /// given: the server's certificate must chain to `ca` (PEM; default the system's
    /// bundle) and name the URL's host.
    pub async fn connect_tls(
        url: &str,
        ca: Option<&std::path::Path>,
    ) -> Result<PostgresStore, StoreError> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Db(format!("--store {}: {e}", redact(url))))?;
        // Notices ("relation already exists, skipping") are not news.
        let options = cfg.get_options().unwrap_or_default().to_string();
        cfg.options(format!("{options} -c client_min_messages=warning").trim());
        let manager = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = ca.is_some() || cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        let mgr = if tls {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let make = super::pg_tls::MakeRustls::new(ca)
                .map_err(|e| StoreError::Db(format!("--store-ca {e}")))?;
            Manager::from_config(cfg, make, manager)
        } else {
            Manager::from_config(cfg, NoTls, manager)
        };
        let pool = Pool::builder(mgr)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Db(format!("connection pool: {e}")))?;
        let store = PostgresStore {
            pool,
            partitions: Default::default(),
        };
        store.migrate().await?;
        store.check_position_base().await?;
        store.prepare_months().await?;
        // This month's and next month's partitions are made ahead of the writes that
        // need them, off the ingest path: making one (and moving what the default
        // partition holds of its month) locks the table, and a group commit should not
        // wait for that. The writers still make one they find missing.
        let ahead = store.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = ahead.prepare_months().await {
                    tracing::warn!(error = %e, "cannot make the coming month's partitions; the writers will");
                }
            }
        });
        Ok(store)
    }

    /// Keeps every new position above every stored one. Transaction ids restart when a
    /// database is dumped and restored into another cluster (or copied by logical
    /// replication): then `base` is raised past the highest stored position, with
    /// the write lock held alone, so no writer runs meanwhile.
    async fn check_position_base(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
            .await
            .map_err(db)?;
        let raised = tx
            .execute(
                "UPDATE position_base SET base = m.max + 1 - (pg_current_xact_id()::TEXT::BIGINT << 20)
                 FROM (SELECT COALESCE(MAX(position), 0) AS max FROM records) m
                 WHERE base + (pg_current_xact_id()::TEXT::BIGINT << 20) <= m.max",
                &[],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        if raised > 0 {
            tracing::warn!("stored positions were above this cluster's transaction ids (a restored or copied database): positions now continue above them");
        }
        Ok(())
    }

    /// Makes this month's and next month's partitions, if missing.
    async fn prepare_months(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
            .await
            .map_err(db)?;
        let made = self
            .ensure_partitions(&tx, [now, now + 31 * 86_400_000], now)
            .await?;
        tx.commit().await.map_err(db)?;
        self.remember_partitions(made);
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| {
            // The pool's message hides the cause (such as a refused certificate).
            let mut msg = format!("postgres connection: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            StoreError::Unavailable(msg)
        })
    }

    /// Brings the database to the newest schema (see [`super::migrate`]), one
    /// migration per transaction. Each transaction holds the migration lock: backends
    /// starting together take turns, and the later ones find the work done.
    async fn migrate(&self) -> Result<(), StoreError> {
        use super::migrate::{failed, next, set_version, POSTGRES, READ_VERSION, VERSION_TABLE};
        let mut c = self.client().await?;
        loop {
            let tx = c.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                .await
                .map_err(db)?;
            tx.batch_execute(VERSION_TABLE).await.map_err(db)?;
            let version: i32 = tx
                .query_opt(READ_VERSION, &[])
                .await
                .map_err(db)?
                .map(|r| r.get(0))
                .unwrap_or(0);
            let Some(m) = next("PostgreSQL", POSTGRES, version.into())? else {
                return tx.commit().await.map_err(db);
            };
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| failed(m, message(&e)))?;
            tx.batch_execute(&set_version(m.version))
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
        }
    }

    /// Makes the monthly partitions these agent times need (see [`partition_of`]) in
    /// the caller's transaction, which holds the write lock, so two backends never make
    /// the same one at once. Returns the months now known to have one (or a table of
    /// that name), for [`Self::remember_partitions`] once the transaction commits.
    ///
    /// A month gets its partition when it is near the clock. Rows of it stored earlier,
    /// when it was not (a record from the future, or partitions made after a pause),
    /// are in the default partition, and PostgreSQL refuses a partition whose rows the
    /// default partition holds: those rows move, in this transaction, into a new table
    /// that is then attached as the month's partition.
    async fn ensure_partitions(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        times: impl IntoIterator<Item = i64>,
        now_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let mut need: Vec<(i64, i64, String)> = Vec::new();
        {
            let known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            for t in times {
                if let Some(m) = partition_of(t, now_ms) {
                    if !known.contains(&m.0) && !need.iter().any(|n| n.0 == m.0) {
                        need.push(m);
                    }
                }
            }
        }
        let mut made = Vec::with_capacity(need.len());
        for (from, until, name) in need {
            // Failing to make a partition is the database's state, not a record's:
            // never a reason to dead-letter the records that needed it.
            let fail = |e: tokio_postgres::Error| {
                StoreError::Unavailable(format!("partition {name}: {}", message(&e)))
            };
            let found = tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL,
                            EXISTS (SELECT 1 FROM pg_inherits
                                    WHERE inhrelid = to_regclass($1) AND inhparent = 'records'::regclass),
                            EXISTS (SELECT 1 FROM records_default WHERE at_ms >= $2 AND at_ms < $3)",
                    &[&name, &from, &until],
                )
                .await
                .map_err(fail)?;
            let (exists, attached, in_default): (bool, bool, bool) =
                (found.get(0), found.get(1), found.get(2));
            if exists {
                if !attached {
                    // Detached by an administrator, say: its month stays in the default
                    // partition.
                    tracing::warn!(table = %name, "a table has the partition's name but is not a partition of records; its month's records go to the default partition");
                }
            } else if in_default {
                tx.batch_execute(&format!(
                    "CREATE TABLE {name} (LIKE records INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
                     WITH moved AS (
                         DELETE FROM records_default WHERE at_ms >= {from} AND at_ms < {until}
                         RETURNING {RECORD_COLUMNS})
                     INSERT INTO {name} ({RECORD_COLUMNS}) SELECT {RECORD_COLUMNS} FROM moved;
                     ALTER TABLE records ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({until});"
                ))
                .await
                .map_err(fail)?;
                tracing::info!(table = %name, "partition made; its month's records moved from the default partition");
            } else {
                tx.batch_execute(&format!(
                    "CREATE TABLE {name} PARTITION OF records FOR VALUES FROM ({from}) TO ({until})"
                ))
                .await
                .map_err(fail)?;
            }
            made.push(from);
        }
        Ok(made)
    }

    /// Whether any of these agent times needs a monthly partition not known to exist.
    fn missing_partitions(&self, times: impl IntoIterator<Item = i64>, now_ms: i64) -> bool {
        let known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        times
            .into_iter()
            .filter_map(|t| partition_of(t, now_ms))
            .any(|m| !known.contains(&m.0))
    }

    /// Months whose partition exists, once the transaction that made them committed
    /// (a rolled-back one made none).
    fn remember_partitions(&self, made: Vec<i64>) {
        if !made.is_empty() {
            self.partitions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(made);
        }
    }

    /// One transaction: the records of `group` not stored yet, their requests' moves
    /// and the agents' counts. One outcome per part.
    async fn store_group(
        &self,
        c: &mut deadpool_postgres::Client,
        group: &[Part<'_>],
        now_ms: i64,
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        let rows: usize = group.iter().map(|p| p.2.len()).sum();
        if rows >= ROWS_PER_TX {
            return Err(StoreError::Db(format!(
                "a group commit of {rows} records: at most {} fit one transaction's positions",
                ROWS_PER_TX - 1
            )));
        }
        // Partitions are made (rarely) in a transaction of their own, holding the write
        // lock alone; writers hold it shared, so they run side by side.
        let times = group.iter().flat_map(|p| p.2.iter()).map(|r| r.at_ms);
        if self.missing_partitions(times.clone(), now_ms) {
            let tx = c.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await
                .map_err(db)?;
            let made = self.ensure_partitions(&tx, times, now_ms).await?;
            tx.commit().await.map_err(db)?;
            self.remember_partitions(made);
        }
        let tx = c.transaction().await.map_err(db)?;
        // This transaction's positions start past base + (its xid << 20).
        let start: i64 = tx
            .query_one(
                "SELECT imn_position_start() FROM (SELECT pg_advisory_xact_lock_shared($1)) l",
                &[&WRITE_LOCK],
            )
            .await
            .map_err(db)?
            .get(0);
        // Rows to insert: each record id once per group (a window resent inside one
        // group is a duplicate here already).
        #[derive(Default)]
        struct Cols<'a> {
            agent: Vec<&'a str>,
            epoch: Vec<i64>,
            seq: Vec<i64>,
            kind: Vec<&'a str>,
            request: Vec<Option<&'a str>>,
            module: Vec<Option<&'a str>>,
            measurement: Vec<Option<&'a str>>,
            scheduled: Vec<Option<i64>>,
            at: Vec<i64>,
            body: Vec<&'a str>,
            body_text: Vec<Option<&'a str>>,
        }
        // Bodies JSONB cannot hold (see migration 2), made storable.
        let jsonb_copies: Vec<Option<String>> = group
            .iter()
            .flat_map(|p| p.2.iter())
            .map(|r| {
                r.body_json
                    .contains("\\u0000")
                    .then(|| jsonb_safe(&r.body_json))
            })
            .collect();
        let mut jsonb_copy = jsonb_copies.iter();
        let mut cols = Cols::default();
        let mut first_in_group: HashSet<(&str, u64, u64)> = HashSet::new();
        for &(agent, epoch, rows) in group {
            for r in rows {
                let copy = jsonb_copy.next().and_then(Option::as_deref);
                if !first_in_group.insert((agent, epoch, r.seq)) {
                    continue;
                }
                cols.agent.push(agent);
                cols.epoch.push(epoch as i64);
                cols.seq.push(r.seq as i64);
                cols.kind.push(r.kind);
                cols.request.push(r.request_id.as_deref());
                cols.module.push(r.module.as_deref());
                cols.measurement.push(r.measurement_id.as_deref());
                cols.scheduled.push(r.scheduled_ms);
                cols.at.push(r.at_ms);
                cols.body.push(copy.unwrap_or(&r.body_json));
                cols.body_text.push(copy.map(|_| r.body_json.as_str()));
            }
        }
        let insert = tx
            .prepare_cached(
                "INSERT INTO records (agent_id, epoch, seq, kind, request_id, module, measurement_id, scheduled_ms, at_ms, stored_ms, body, body_text, position)
                 SELECT u.agent, u.epoch, u.seq, u.kind, u.request, u.module,
                     -- A scheduled result counts toward its measurement only from an
                     -- agent the measurement runs on (else it is the agent's own).
                     CASE WHEN EXISTS (SELECT 1 FROM schedule_agents s
                                       WHERE s.measurement_id = u.measurement AND s.agent_id = u.agent)
                          THEN u.measurement END,
                     u.scheduled, u.at, $11, u.body::JSONB, u.body_text, $13 + u.ord
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::BIGINT[], $10::TEXT[], $12::TEXT[])
                     WITH ORDINALITY AS u(agent, epoch, seq, kind, request, module, measurement, scheduled, at, body, body_text, ord)
                 -- Positions follow the group's order; rows go in by their id, so
                 -- writers storing the same records (a resend on two backends) take
                 -- the unique index's entries in one order and do not deadlock.
                 ORDER BY u.agent, u.epoch, u.seq
                 ON CONFLICT (agent_id, epoch, seq, at_ms) DO NOTHING
                 RETURNING agent_id, epoch, seq, position",
            )
            .await
            .map_err(db)?;
        let inserted = tx
            .query(
                &insert,
                &[
                    &cols.agent,
                    &cols.epoch,
                    &cols.seq,
                    &cols.kind,
                    &cols.request,
                    &cols.module,
                    &cols.measurement,
                    &cols.scheduled,
                    &cols.at,
                    &cols.body,
                    &now_ms,
                    &cols.body_text,
                    &start,
                ],
            )
            .await
            .map_err(db)?;
        let positions: HashMap<(String, u64, u64), i64> = inserted
            .iter()
            .map(|r| {
                (
                    (
                        r.get::<_, String>(0),
                        r.get::<_, i64>(1) as u64,
                        r.get::<_, i64>(2) as u64,
                    ),
                    r.get::<_, i64>(3),
                )
            })
            .collect();
        // One result per run: claim the runs of the results stored now; a result whose
        // run another result holds (stored before, or earlier in this group) goes again.
        let mut run_dups: HashSet<(String, u64, u64)> = HashSet::new();
        {
            let mut claim_agent: Vec<&str> = Vec::new();
            let mut claim_key: Vec<String> = Vec::new();
            let mut claim_at: Vec<i64> = Vec::new();
            let mut claim_id: Vec<(&str, u64, &RecordRow)> = Vec::new();
            let mut claimed_here: HashSet<(&str, String)> = HashSet::new();
            let mut claimed_ids: HashSet<(&str, u64, u64)> = HashSet::new();
            for &(agent, epoch, rows) in group {
                for r in rows {
                    let Some(run) = r.run_key() else { continue };
                    // Stored now, and its first copy in the group (a record resent
                    // within the group is a duplicate by its id, counted below).
                    if !positions.contains_key(&(agent.to_string(), epoch, r.seq))
                        || !claimed_ids.insert((agent, epoch, r.seq))
                    {
                        continue;
                    }
                    if !claimed_here.insert((agent, run.clone())) {
                        run_dups.insert((agent.to_string(), epoch, r.seq));
                        continue;
                    }
                    claim_agent.push(agent);
                    claim_key.push(run);
                    claim_at.push(r.at_ms);
                    claim_id.push((agent, epoch, r));
                }
            }
            if !claim_agent.is_empty() {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO run_results (agent_id, run_key, at_ms)
                         SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[])
                         ON CONFLICT DO NOTHING
                         RETURNING agent_id, run_key",
                    )
                    .await
                    .map_err(db)?;
                let won: HashSet<(String, String)> = tx
                    .query(&st, &[&claim_agent, &claim_key, &claim_at])
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect();
                for (i, (agent, epoch, r)) in claim_id.iter().enumerate() {
                    if !won.contains(&(agent.to_string(), claim_key[i].clone())) {
                        run_dups.insert((agent.to_string(), *epoch, r.seq));
                    }
                }
            }
            if !run_dups.is_empty() {
                // Exactly the rows this statement inserted (by their position).
                let gone: Vec<i64> = run_dups
                    .iter()
                    .filter_map(|id| positions.get(id).copied())
                    .collect();
                let st = tx
                    .prepare_cached("DELETE FROM records WHERE position = ANY($1)")
                    .await
                    .map_err(db)?;
                tx.execute(&st, &[&gone]).await.map_err(db)?;
                tracing::warn!(
                    results = run_dups.len(),
                    "second results for runs that have one; dropped as duplicates"
                );
            }
        }
        // Transitions of the records stored now, in record order.
        let ids: Vec<String> = group
            .iter()
            .flat_map(|p| p.2.iter())
            .filter_map(|r| r.transition.as_ref().map(|t| t.request_id.clone()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut reqs = if ids.is_empty() {
            HashMap::new()
        } else {
            lock_requests(&tx, &ids).await?
        };
        let mut obs = TransitionRows::default();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut counts: HashMap<&str, i64> = HashMap::new();
        let mut seen: HashSet<(&str, u64, u64)> = HashSet::new();
        for &(agent, epoch, rows) in group {
            let mut out = BatchOutcome::default();
            for r in rows {
                let key = (agent.to_string(), epoch, r.seq);
                if run_dups.contains(&key) && seen.insert((agent, epoch, r.seq)) {
                    out.duplicates += 1;
                    out.run_duplicates += 1;
                    continue;
                }
                let pos = match positions.get(&key) {
                    Some(&p) if seen.insert((agent, epoch, r.seq)) => p,
                    _ => {
                        out.duplicates += 1;
                        continue;
                    }
                };
                out.stored += 1;
                *counts.entry(agent).or_default() += 1;
                let Some(t) = &r.transition else { continue };
                let Some(cur) = reqs.get_mut(&t.request_id) else {
                    continue;
                };
                // An agent moves only its own requests.
                if cur.agent != agent {
                    continue;
                }
                let result = (r.kind == "result").then_some((pos, r.at_ms));
                obs.push(
                    &t.request_id,
                    t.state,
                    r.at_ms,
                    "agent",
                    t.detail.as_deref(),
                );
                if step(cur, t.state, r.at_ms, result) && t.state.is_terminal() {
                    out.finished.push(t.request_id.clone());
                }
            }
            outcomes.push(out);
        }
        write_transitions(&tx, &reqs, &obs).await?;
        if !counts.is_empty() {
            let (agents, ns): (Vec<&str>, Vec<i64>) = counts.into_iter().unzip();
            let st = tx
                .prepare_cached(
                    // The shard is the connection's (see migration 8): writers on other
                    // connections add to other rows.
                    "INSERT INTO agent_counts (agent_id, records, shard)
                     SELECT u.*, pg_backend_pid() % 64 FROM unnest($1::TEXT[], $2::BIGINT[]) u ORDER BY 1
                     ON CONFLICT (agent_id, shard) DO UPDATE SET records = agent_counts.records + EXCLUDED.records",
                )
                .await
                .map_err(db)?;
            tx.execute(&st, &[&agents, &ns]).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(outcomes)
    }

    /// Bytes on disk of the records table (all partitions, indexes and TOAST
    /// included) and of the whole database.
    pub async fn sizes(&self) -> Result<(i64, i64), StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)::BIGINT,
                        pg_database_size(current_database())
                 FROM pg_inherits WHERE inhparent = 'records'::regclass",
                &[],
            )
            .await
            .map_err(db)?;
        Ok((row.get(0), row.get(1)))
    }

    /// Whether this store's connections are encrypted (PostgreSQL's own view).
    pub async fn uses_tls(&self) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    /// The monthly partitions that exist, oldest first.
    pub async fn partition_names(&self) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'records'::regclass ORDER BY 1",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    if !url.contains("://") {
        // key=value form: hide the password's value.
        return url
            .split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some(("password", _)) => "password=***",
                _ => kv,
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn state_of(s: &str) -> RequestState {
    RequestState::parse(s).unwrap_or(RequestState::Pending)
}

/// Records of one agent's outbox epoch, as a group commit takes them: a whole batch,
/// or one record of it when a batch is stored record by record.
type Part<'a> = (&'a str, u64, &'a [RecordRow]);

/// `json` with each `\u0000` escape (NUL) made `\u2400` (the symbol for NUL), which
/// JSONB takes; every other escape is copied as it is. Only the JSONB copy is changed:
/// the exact text goes to `body_text` (see migration 2).
fn jsonb_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let escape = &rest[i..];
        let len = if escape.starts_with("\\u0000") {
            out.push_str("\\u2400");
            6
        } else {
            // The backslash and the character it escapes (`\\` included).
            let len = 1 + escape[1..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&escape[..len]);
            len
        };
        rest = &escape[len..];
    }
    out.push_str(rest);
    out
}

/// Keeps a record the database refused; false if it is kept already (a resend).
async fn dead_letter(
    c: &deadpool_postgres::Client,
    (agent, epoch): (&str, u64),
    row: &RecordRow,
    reason: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let st = c
        .prepare_cached(
            "INSERT INTO dead_letters (agent_id, epoch, seq, at_ms, kind, reason, body, stored_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (agent_id, epoch, seq) DO NOTHING",
        )
        .await
        .map_err(db)?;
    let n = c
        .execute(
            &st,
            &[
                &nul_free(agent),
                &(epoch as i64),
                &(row.seq as i64),
                &row.at_ms,
                &row.kind,
                &nul_free(reason),
                &row.body_json.as_bytes(),
                &now_ms,
            ],
        )
        .await
        .map_err(db)?;
    Ok(n == 1)
}

const REQUEST_COLS: &str =
    "id, agent_id, module, params_json, state, created_ms, updated_ms, deadline_ms, timeout_ms, traceparent, idempotency_hash";

fn request_row(r: &tokio_postgres::Row) -> RequestRow {
    RequestRow {
        id: r.get(0),
        agent_id: r.get(1),
        module: r.get(2),
        params_json: r.get(3),
        state: state_of(r.get(4)),
        created_ms: r.get(5),
        updated_ms: r.get(6),
        deadline_ms: r.get(7),
        timeout_ms: r.get::<_, i64>(8) as u64,
        traceparent: r.get(9),
        idempotency_hash: r.get(10),
    }
}

/// The body as the agent's JSON: `body_text` where JSONB could not hold it.
const RESULT_COLS: &str =
    "r.agent_id, r.epoch, r.seq, r.request_id, r.module, r.stored_ms, COALESCE(r.body_text, r.body::TEXT), r.scheduled_ms, r.at_ms";

fn result_row(r: &tokio_postgres::Row) -> ResultRow {
    let key = super::ResultKey {
        agent_id: r.get(0),
        epoch: r.get::<_, i64>(1) as u64,
        seq: r.get::<_, i64>(2) as u64,
        request_id: r.get(3),
        module: r.get(4),
        stored_ms: r.get(5),
        at_ms: r.get(8),
    };
    ResultRow::from_body(key, r.get(6), r.get(7))
}

async fn get_request(
    c: &impl GenericClient,
    id: &str,
    lock: bool,
) -> Result<Option<RequestRow>, StoreError> {
    let sql = format!(
        "SELECT {REQUEST_COLS} FROM requests WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let st = c.prepare_cached(&sql).await.map_err(db)?;
    Ok(c.query_opt(&st, &[&id])
        .await
        .map_err(db)?
        .map(|r| request_row(&r)))
}

/// A request as a transition sees it.
struct Current {
    state: RequestState,
    has_result: bool,
    agent: String,
    updated_ms: i64,
    result: Option<(i64, i64)>,
    dirty: bool,
}

/// One observed transition, applied in memory: moves the request forward (never
/// back, never out of a terminal state). Returns whether the state changed.
fn step(cur: &mut Current, state: RequestState, at_ms: i64, result: Option<(i64, i64)>) -> bool {
    if let (Some(r), false) = (result, cur.has_result) {
        cur.has_result = true;
        cur.result = Some(r);
        cur.dirty = true;
    }
    if state == cur.state && !cur.state.is_terminal() {
        cur.updated_ms = at_ms;
        cur.dirty = true;
    }
    if cur.state.is_terminal() || state.rank() <= cur.state.rank() {
        return false;
    }
    cur.state = state;
    cur.updated_ms = at_ms;
    cur.dirty = true;
    true
}

/// Locks the named requests (in id order, so writers never deadlock) and reads them.
async fn lock_requests(
    tx: &deadpool_postgres::Transaction<'_>,
    ids: &[String],
) -> Result<HashMap<String, Current>, StoreError> {
    let st = tx
        .prepare_cached(
            "SELECT id, state, result_pos IS NOT NULL, agent_id, updated_ms FROM requests
             WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .await
        .map_err(db)?;
    let rows = tx.query(&st, &[&ids]).await.map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                Current {
                    state: state_of(r.get(1)),
                    has_result: r.get(2),
                    agent: r.get(3),
                    updated_ms: r.get(4),
                    result: None,
                    dirty: false,
                },
            )
        })
        .collect())
}

/// Writes back what [`step`] changed, and the observations, in two statements.
async fn write_transitions(
    tx: &deadpool_postgres::Transaction<'_>,
    reqs: &HashMap<String, Current>,
    obs: &TransitionRows,
) -> Result<(), StoreError> {
    if !obs.request.is_empty() {
        let st = tx
            .prepare_cached(
                "INSERT INTO transitions (request_id, state, at_ms, observer, detail)
                 SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[])",
            )
            .await
            .map_err(db)?;
        tx.execute(
            &st,
            &[
                &obs.request,
                &obs.state,
                &obs.at_ms,
                &obs.observer,
                &obs.detail,
            ],
        )
        .await
        .map_err(db)?;
    }
    let (mut ids, mut states, mut updated, mut pos, mut at) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (id, c) in reqs.iter().filter(|(_, c)| c.dirty) {
        ids.push(id.as_str());
        states.push(c.state.as_str());
        updated.push(c.updated_ms);
        pos.push(c.result.map(|r| r.0));
        at.push(c.result.map(|r| r.1));
    }
    if !ids.is_empty() {
        let st = tx
            .prepare_cached(
                "UPDATE requests q SET state = u.state, updated_ms = u.updated,
                     result_pos = COALESCE(q.result_pos, u.pos),
                     result_at_ms = COALESCE(q.result_at_ms, u.at)
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
                     AS u(id, state, updated, pos, at)
                 WHERE q.id = u.id",
            )
            .await
            .map_err(db)?;
        tx.execute(&st, &[&ids, &states, &updated, &pos, &at])
            .await
            .map_err(db)?;
    }
    Ok(())
}

#[derive(Default)]
struct TransitionRows {
    request: Vec<String>,
    state: Vec<&'static str>,
    at_ms: Vec<i64>,
    observer: Vec<String>,
    detail: Vec<Option<String>>,
}

impl TransitionRows {
    fn push(
        &mut self,
        id: &str,
        state: RequestState,
        at_ms: i64,
        observer: &str,
        detail: Option<&str>,
    ) {
        self.request.push(id.to_string());
        self.state.push(state.as_str());
        self.at_ms.push(at_ms);
        self.observer.push(observer.to_string());
        self.detail.push(detail.map(|d| nul_free(d).into_owned()));
    }
}

/// Raises the agent's schedule version by one; returns the new version. One UPSERT,
/// so backends changing the same agent's set at once get different versions. The
/// `+ 1` runs only below [`MAX_SCHEDULE_VERSION`], so it never overflows; a stored
/// version at or past it (or negative) came from an agent that claimed it before such
/// claims were refused: that agent was broken or hostile, honest agents never report
/// such versions, so it starts again at 1 rather than fail every change to the agent's
/// schedules (stopping a measurement included).
async fn bump_version(
    tx: &deadpool_postgres::Transaction<'_>,
    agent: &str,
) -> Result<u64, StoreError> {
    let row = tx
        .query_one(
            "INSERT INTO schedule_versions (agent_id, version) VALUES ($1, 1)
             ON CONFLICT (agent_id) DO UPDATE SET version =
                 CASE WHEN schedule_versions.version < 0 OR schedule_versions.version >= $2 THEN 1
                      ELSE schedule_versions.version + 1 END
             RETURNING version",
            &[&agent, &(MAX_SCHEDULE_VERSION as i64)],
        )
        .await
        .map_err(db)?;
    let v: i64 = row.get(0);
    u64::try_from(v).map_err(|_| StoreError::Db(format!("schedule version {v} of agent {agent}")))
}

/// A count as a BIGINT: counts past its range are kept at its end.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const MEASUREMENT_COLS: &str = "id, module, params_json, selection_json, description, created_ms, deadline_ms, schedule_json, stopped_ms, owner, daily_probes";

fn measurement_row(r: &tokio_postgres::Row) -> MeasurementRow {
    MeasurementRow {
        id: r.get(0),
        module: r.get(1),
        params_json: r.get(2),
        selection_json: r.get(3),
        description: r.get(4),
        created_ms: r.get(5),
        deadline_ms: r.get(6),
        schedule_json: r.get(7),
        stopped_ms: r.get(8),
        owner: r.get(9),
        daily_probes: r.get::<_, i64>(10).max(0) as u64,
    }
}

async fn insert_measurement(c: &impl GenericClient, m: &MeasurementRow) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO measurements (id, module, params_json, selection_json, description, created_ms, deadline_ms, schedule_json, stopped_ms, owner, daily_probes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &m.id,
            &m.module,
            &m.params_json,
            &m.selection_json,
            &m.description,
            &m.created_ms,
            &m.deadline_ms,
            &m.schedule_json,
            &m.stopped_ms,
            &m.owner,
            &clamp(m.daily_probes),
        ],
    )
    .await
    .map(|_| ())
    .map_err(db)
}

#[async_trait]
impl AgentStore for PostgresStore {
    async fn upsert_agent(&self, id: &str, hello: &Hello, now_ms: i64) -> Result<(), StoreError> {
        let hello = serde_json::to_string(hello).map_err(db)?;
        let c = self.client().await?;
        c.execute(
            "INSERT INTO agents (id, first_seen_ms, last_hello_ms, hello_json) VALUES ($1, $2, $2, $3)
             ON CONFLICT (id) DO UPDATE SET last_hello_ms = $2, hello_json = $3",
            &[&id, &now_ms, &hello],
        )
        .await
        .map_err(db)?;
        Ok(())
    }
    async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, first_seen_ms, last_hello_ms, hello_json FROM agents ORDER BY id",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let hello = serde_json::from_str(r.get::<_, &str>(3)).ok()?;
                Some(AgentRow {
                    id: r.get(0),
                    first_seen_ms: r.get(1),
                    last_hello_ms: r.get(2),
                    hello,
                })
            })
            .collect())
    }
    async fn session_open(
        &self,
        agent: &str,
        at_ms: i64,
        prev_end_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute(
            "UPDATE agent_sessions SET disconnected_ms = GREATEST(connected_ms, $2)
             WHERE agent_id = $1 AND disconnected_ms IS NULL",
            &[&agent, &prev_end_ms],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "INSERT INTO agent_sessions (agent_id, connected_ms) VALUES ($1, $2)",
            &[&agent, &at_ms],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }
    async fn session_close(&self, agent: &str, at_ms: i64) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE agent_sessions SET disconnected_ms = GREATEST(connected_ms, $2)
             WHERE agent_id = $1 AND disconnected_ms IS NULL",
            &[&agent, &at_ms],
        )
        .await
        .map(|_| ())
        .map_err(db)
    }
    async fn sessions(
        &self,
        agent: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, Option<i64>)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT connected_ms, disconnected_ms FROM agent_sessions
                 WHERE agent_id = $1 AND (disconnected_ms IS NULL OR disconnected_ms > $2)
                 ORDER BY connected_ms, id",
                &[&agent, &since_ms],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
    async fn first_connected(&self, agent: &str) -> Result<Option<i64>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one(
            "SELECT MIN(connected_ms) FROM agent_sessions WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .map_err(db)?
        .get(0))
    }
    async fn put_heartbeats(&self, rows: Vec<HeartbeatRow>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let st = tx
            .prepare_cached(
                "INSERT INTO heartbeats (agent_id, at_ms, point) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db)?;
        for r in &rows {
            tx.execute(&st, &[&r.agent_id, &r.at_ms, &nul_free(&r.point_json)])
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
    async fn heartbeats_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT agent_id, at_ms, point FROM heartbeats WHERE at_ms >= $1
                 ORDER BY at_ms, agent_id LIMIT $2",
                &[&since_ms, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| HeartbeatRow {
                agent_id: r.get(0),
                at_ms: r.get(1),
                point_json: r.get(2),
            })
            .collect())
    }
    async fn prune_heartbeats(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM heartbeats WHERE (agent_id, at_ms) IN (
               SELECT agent_id, at_ms FROM heartbeats WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
            &[&before_ms, &i64::from(limit)],
        )
        .await
        .map_err(db)
    }
}

#[async_trait]
impl RequestStore for PostgresStore {
    async fn create_request(&self, req: NewRequest) -> Result<Created, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let st = tx
            .prepare_cached(&format!(
                "INSERT INTO requests ({REQUEST_COLS}, idempotency_key, measurement_id)
                 VALUES ($1, $2, $3, $4, 'pending', $5, $5, $6, $7, $8, $11, $9, $10)
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
            ))
            .await
            .map_err(db)?;
        let inserted = tx
            .query_opt(
                &st,
                &[
                    &req.id,
                    &req.agent_id,
                    &req.module,
                    &req.params_json,
                    &req.created_ms,
                    &req.deadline_ms,
                    &(req.timeout_ms as i64),
                    &req.traceparent,
                    &req.idempotency_key,
                    &req.measurement_id,
                    &req.idempotency_hash,
                ],
            )
            .await
            .map_err(db)?;
        if inserted.is_none() {
            // Another request (perhaps on another backend) has the key.
            let row = tx
                .query_one(
                    &format!("SELECT {REQUEST_COLS} FROM requests WHERE idempotency_key = $1"),
                    &[&req.idempotency_key],
                )
                .await
                .map_err(db)?;
            return Ok(Created::Existing(request_row(&row)));
        }
        let mut obs = TransitionRows::default();
        obs.push(
            &req.id,
            RequestState::Pending,
            req.created_ms,
            "backend",
            None,
        );
        let mut reqs = HashMap::new();
        if req.dispatch {
            obs.push(
                &req.id,
                RequestState::Dispatched,
                req.created_ms,
                "backend",
                None,
            );
            reqs.insert(
                req.id.clone(),
                Current {
                    state: RequestState::Dispatched,
                    has_result: false,
                    agent: req.agent_id.clone(),
                    updated_ms: req.created_ms,
                    result: None,
                    dirty: true,
                },
            );
        }
        write_transitions(&tx, &reqs, &obs).await?;
        if let Some(ch) = req.charge.as_ref().filter(|ch| ch.probes > 0) {
            let st = tx.prepare_cached(ADD_SPEND).await.map_err(db)?;
            tx.query_one(&st, &[&ch.token, &ch.day, &clamp(ch.probes)])
                .await
                .map_err(db)?;
        }
        let row = get_request(&tx, &req.id, false)
            .await?
            .ok_or_else(|| StoreError::Db("request vanished".into()))?;
        tx.commit().await.map_err(db)?;
        Ok(Created::New(row))
    }
    async fn request(&self, id: &str) -> Result<Option<RequestRow>, StoreError> {
        let c = self.client().await?;
        get_request(&c, id, false).await
    }
    async fn request_by_key(&self, key: &str) -> Result<Option<RequestRow>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {REQUEST_COLS} FROM requests WHERE idempotency_key = $1"
            ))
            .await
            .map_err(db)?;
        Ok(c.query_opt(&st, &[&key])
            .await
            .map_err(db)?
            .map(|r| request_row(&r)))
    }
    async fn transition(
        &self,
        id: &str,
        state: RequestState,
        at_ms: i64,
        observer: &str,
        detail: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let mut reqs = lock_requests(&tx, &[id.to_string()]).await?;
        let Some(cur) = reqs.get_mut(id) else {
            return Ok(false);
        };
        let changed = step(cur, state, at_ms, None);
        let mut obs = TransitionRows::default();
        obs.push(id, state, at_ms, observer, detail);
        write_transitions(&tx, &reqs, &obs).await?;
        tx.commit().await.map_err(db)?;
        Ok(changed)
    }
    async fn transitions(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT state, at_ms, observer, detail FROM transitions WHERE request_id = $1 ORDER BY at_ms, id",
                &[&id],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| Transition {
                state: state_of(r.get(0)),
                at_ms: r.get(1),
                observer: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }
    async fn undelivered(&self, agent: &str) -> Result<Vec<RequestRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {REQUEST_COLS} FROM requests WHERE agent_id = $1 AND state IN ('pending', 'dispatched') ORDER BY created_ms"),
                &[&agent],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(request_row).collect())
    }
    async fn overdue(&self, now_ms: i64) -> Result<Vec<RequestRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {REQUEST_COLS} FROM requests WHERE deadline_ms < $1 AND state IN ('pending', 'dispatched', 'received', 'running')"),
                &[&now_ms],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(request_row).collect())
    }
    async fn store_batches(
        &self,
        batches: Vec<(String, PreparedBatch)>,
        now_ms: i64,
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        let group: Vec<Part<'_>> = batches
            .iter()
            .map(|(a, b)| (a.as_str(), b.epoch, b.rows.as_slice()))
            .collect();
        let mut c = self.client().await?;
        let mut tries = 0;
        let first = loop {
            match self.store_group(&mut c, &group, now_ms).await {
                Err(e) if retryable(&e) && tries < 3 => {
                    tries += 1;
                    tracing::info!(error = %e, "group commit met another writer; trying again");
                }
                other => break other,
            }
        };
        let mut failure = match first {
            Ok(out) => return Ok(out),
            Err(e @ (StoreError::Unavailable(_) | StoreError::Task(_))) => return Err(e),
            Err(e) => e,
        };
        // As the embedded store does (see `store_isolating` there): each batch alone,
        // then each record of a refused batch alone; a record refused alone is
        // dead-lettered.
        tracing::warn!(error = %failure, batches = group.len(), "group commit refused; storing its batches one by one");
        let mut outcomes = Vec::with_capacity(group.len());
        for &part in &group {
            if group.len() > 1 {
                match self.store_group(&mut c, &[part], now_ms).await {
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
            let mut todo: Vec<(&[super::RecordRow], Option<StoreError>)> =
                vec![(rows, Some(refused))];
            while let Some((part_rows, known)) = todo.pop() {
                if part_rows.is_empty() {
                    continue;
                }
                let tried = match known {
                    Some(e) => Err(e),
                    None => {
                        self.store_group(&mut c, &[(agent, epoch, part_rows)], now_ms)
                            .await
                    }
                };
                match tried {
                    Ok(mut o) => out.merge(o.pop().unwrap_or_default()),
                    Err(e @ (StoreError::Unavailable(_) | StoreError::Task(_))) => return Err(e),
                    Err(StoreError::Db(reason)) if part_rows.len() == 1 => {
                        let row = &part_rows[0];
                        if dead_letter(&c, (agent, epoch), &part_rows[0], &reason, now_ms).await? {
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
    async fn results(&self, agent: &str, limit: u32) -> Result<Vec<ResultRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {RESULT_COLS} FROM records r WHERE agent_id = $1 AND kind = 'result' ORDER BY position DESC LIMIT $2"),
                &[&agent, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(result_row).collect())
    }
    async fn result(&self, agent: &str, request_id: &str) -> Result<Option<ResultRow>, StoreError> {
        let c = self.client().await?;
        result_of(&c, request_id, agent).await
    }
    async fn agent_record_count(&self, agent: &str) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: Option<i64> = c
            .query_opt(
                "SELECT SUM(records)::BIGINT FROM agent_counts WHERE agent_id = $1",
                &[&agent],
            )
            .await
            .map_err(db)?
            .and_then(|r| r.get::<_, Option<i64>>(0));
        Ok(n.unwrap_or(0) as u64)
    }
    async fn events(
        &self,
        agent: &str,
        limit: u32,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                // The text, not `body->>`: JSONB's copy of a body with NUL has it escaped.
                "SELECT at_ms, COALESCE(body_text, body::TEXT) FROM records
                 WHERE agent_id = $1 AND kind = 'event' ORDER BY position DESC LIMIT $2",
                &[&agent, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_str(r.get::<_, &str>(1)).unwrap_or_default();
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                (r.get(0), text("kind"), text("message"))
            })
            .collect())
    }
    async fn record_count(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one(
                "SELECT COALESCE(SUM(records), 0)::BIGINT FROM agent_counts",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        Ok(n as u64)
    }
    async fn results_page(
        &self,
        f: ResultFilter,
    ) -> Result<Vec<(i64, ResultRow, Option<String>)>, StoreError> {
        use tokio_postgres::types::ToSql;
        let mut sql = format!(
            "SELECT {RESULT_COLS}, r.position, COALESCE(r.measurement_id, q.measurement_id) FROM records r
             LEFT JOIN requests q ON q.id = r.request_id AND q.agent_id = r.agent_id
             WHERE r.kind = 'result' AND r.position > $1 AND r.position < {BOUND}"
        );
        let limit = i64::from(f.limit);
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(f.after)];
        let mut add = |cond: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!(" AND {cond} ${}", args.len()));
        };
        if let Some(a) = f.agent {
            add("r.agent_id =", Box::new(a));
        }
        if let Some(m) = f.module {
            add("r.module =", Box::new(m));
        }
        if let Some(m) = f.measurement {
            add(
                "COALESCE(r.measurement_id, q.measurement_id) =",
                Box::new(m),
            );
        }
        if let Some(t) = f.since_ms {
            add("r.at_ms >=", Box::new(t));
        }
        if let Some(t) = f.until_ms {
            add("r.at_ms <", Box::new(t));
        }
        args.push(Box::new(limit));
        sql.push_str(&format!(" ORDER BY r.position LIMIT ${}", args.len()));
        let c = self.client().await?;
        let st = c.prepare_cached(&sql).await.map_err(db)?;
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&st, &refs).await.map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(9), result_row(r), r.get(10)))
            .collect())
    }
    async fn schedule_results_newest(
        &self,
        measurement: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, ResultRow)>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {RESULT_COLS}, r.position FROM records r
                 WHERE r.measurement_id = $1 AND r.position < LEAST($2, {BOUND}) AND r.kind = 'result'
                 ORDER BY r.position DESC LIMIT $3"
            ))
            .await
            .map_err(db)?;
        let rows = c
            .query(
                &st,
                &[&measurement, &before.unwrap_or(i64::MAX), &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(9), result_row(r)))
            .collect())
    }
    async fn latest_position(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one(
            &format!("SELECT COALESCE(MAX(position), 0) FROM records WHERE position < {BOUND}"),
            &[],
        )
        .await
        .map_err(db)?
        .get(0))
    }
    async fn request_state_counts(&self) -> Result<Vec<(RequestState, u64)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query("SELECT state, COUNT(*) FROM requests GROUP BY state", &[])
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| (state_of(r.get(0)), r.get::<_, i64>(1) as u64))
            .collect())
    }
    async fn open_requests(&self, agent: &str) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM requests WHERE agent_id = $1
                 AND state IN ('pending', 'dispatched', 'received', 'running')",
                &[&agent],
            )
            .await
            .map_err(db)?
            .get(0);
        Ok(n as u64)
    }
    async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT agent_id, epoch, seq, at_ms, kind, reason, body, stored_ms FROM dead_letters
                 WHERE $1::TEXT IS NULL OR agent_id = $1 ORDER BY id DESC LIMIT $2",
                &[&agent, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                agent_id: r.get(0),
                epoch: r.get::<_, i64>(1) as u64,
                seq: r.get::<_, i64>(2) as u64,
                at_ms: r.get(3),
                kind: r.get(4),
                reason: r.get(5),
                body: String::from_utf8_lossy(r.get::<_, &[u8]>(6)).into_owned(),
                stored_ms: r.get(7),
            })
            .collect())
    }
    async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one("SELECT COUNT(*) FROM dead_letters", &[])
            .await
            .map_err(db)?
            .get(0);
        Ok(n as u64)
    }
    async fn rollup_cursor(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(
            c.query_one("SELECT position FROM rollup_cursor WHERE id = 1", &[])
                .await
                .map_err(db)?
                .get(0),
        )
    }
    async fn merge_rollups(
        &self,
        from: i64,
        to: i64,
        rows: Vec<RollupRow>,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        // The cursor's row is the turn: a second backend's pass waits here, then
        // finds the cursor moved and writes nothing.
        let moved = tx
            .execute(
                "UPDATE rollup_cursor SET position = $2 WHERE id = 1 AND position = $1",
                &[&from, &to],
            )
            .await
            .map_err(db)?;
        if moved == 0 {
            return Ok(false);
        }
        let get = tx
            .prepare_cached(
                "SELECT body FROM rollups WHERE agent_id = $1 AND module = $2 AND target = $3 AND hour_ms = $4",
            )
            .await
            .map_err(db)?;
        let put = tx
            .prepare_cached(
                "INSERT INTO rollups (agent_id, module, target, hour_ms, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (agent_id, module, target, hour_ms) DO UPDATE SET body = EXCLUDED.body",
            )
            .await
            .map_err(db)?;
        for r in &rows {
            let target = nul_free(&r.target);
            let old = tx
                .query_opt(&get, &[&r.agent_id, &r.module, &target, &r.hour_ms])
                .await
                .map_err(db)?;
            let body = match old {
                Some(row) => crate::rollup::merge_bodies(row.get::<_, &str>(0), &r.body),
                None => r.body.clone(),
            };
            tx.execute(
                &put,
                &[
                    &r.agent_id,
                    &r.module,
                    &target,
                    &r.hour_ms,
                    &nul_free(&body),
                ],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(true)
    }
    async fn rollups(&self, f: RollupFilter) -> Result<Vec<RollupRow>, StoreError> {
        use tokio_postgres::types::ToSql;
        let mut sql =
            "SELECT agent_id, module, target, hour_ms, body FROM rollups WHERE TRUE".to_string();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut add = |cond: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!(" AND {cond} ${}", args.len()));
        };
        if let Some(a) = f.agent {
            add("agent_id =", Box::new(a));
        }
        if let Some(m) = f.module {
            add("module =", Box::new(m));
        }
        if let Some(t) = f.target {
            add("target =", Box::new(nul_free(&t).into_owned()));
        }
        if let Some(t) = f.since_ms {
            add("hour_ms >=", Box::new(t));
        }
        if let Some(t) = f.until_ms {
            add("hour_ms <", Box::new(t));
        }
        if let Some((h, a, m, t)) = f.after {
            let n = args.len();
            args.push(Box::new(h));
            args.push(Box::new(a));
            args.push(Box::new(m));
            args.push(Box::new(nul_free(&t).into_owned()));
            sql.push_str(&format!(
                " AND (hour_ms, agent_id, module, target) > (${}, ${}, ${}, ${})",
                n + 1,
                n + 2,
                n + 3,
                n + 4
            ));
        }
        args.push(Box::new(i64::from(f.limit)));
        sql.push_str(&format!(
            " ORDER BY hour_ms, agent_id, module, target LIMIT ${}",
            args.len()
        ));
        let c = self.client().await?;
        let st = c.prepare_cached(&sql).await.map_err(db)?;
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&st, &refs).await.map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| RollupRow {
                agent_id: r.get(0),
                module: r.get(1),
                target: r.get(2),
                hour_ms: r.get(3),
                body: r.get(4),
            })
            .collect())
    }
    async fn prune_bookkeeping(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let limit = i64::from(limit);
        let mut n = tx
            .execute(
                "DELETE FROM run_results WHERE (agent_id, run_key) IN (
                   SELECT agent_id, run_key FROM run_results WHERE at_ms < $1
                   ORDER BY at_ms LIMIT $2)",
                &[&before_ms, &limit],
            )
            .await
            .map_err(db)?;
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM requests WHERE updated_ms < $1
                   AND state NOT IN ('pending', 'dispatched', 'received', 'running')
                 ORDER BY updated_ms LIMIT $2",
                &[&before_ms, &limit],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !ids.is_empty() {
            n += tx
                .execute(
                    "DELETE FROM transitions WHERE request_id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(db)?;
            n += tx
                .execute("DELETE FROM requests WHERE id = ANY($1)", &[&ids])
                .await
                .map_err(db)?;
        }
        n += tx
            .execute(
                "DELETE FROM agent_sessions WHERE ctid IN (
                   SELECT ctid FROM agent_sessions WHERE disconnected_ms < $1 LIMIT $2)",
                &[&before_ms, &limit],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(n)
    }
    async fn prune_records(&self, p: PruneRecords) -> Result<(u64, i64), StoreError> {
        use tokio_postgres::types::ToSql;
        let mut cond = "position > $1 AND position <= $2 AND stored_ms < $3".to_string();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = vec![
            Box::new(p.after),
            Box::new(p.up_to),
            Box::new(p.stored_before_ms),
        ];
        match &p.only {
            Some(m) => {
                args.push(Box::new(m.clone()));
                cond.push_str(&format!(" AND module = ${}", args.len()));
            }
            None if !p.except.is_empty() => {
                args.push(Box::new(p.except.clone()));
                cond.push_str(&format!(
                    " AND (module IS NULL OR NOT (module = ANY(${})))",
                    args.len()
                ));
            }
            None => {}
        }
        args.push(Box::new(i64::from(p.limit)));
        let sql = format!(
            "WITH doomed AS (SELECT position FROM records WHERE {cond} ORDER BY position LIMIT ${})
             DELETE FROM records WHERE position IN (SELECT position FROM doomed)
             RETURNING position",
            args.len()
        );
        let c = self.client().await?;
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&sql, &refs).await.map_err(db)?;
        let last = rows.iter().map(|r| r.get::<_, i64>(0)).max();
        Ok((rows.len() as u64, last.unwrap_or(p.after)))
    }
    async fn store_stats(&self) -> Result<StoreStats, StoreError> {
        let c = self.client().await?;
        let bytes: i64 = c
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map_err(db)?
            .get(0);
        let oldest: Option<i64> = c
            .query_opt(
                "SELECT stored_ms FROM records WHERE kind = 'result' ORDER BY position LIMIT 1",
                &[],
            )
            .await
            .map_err(db)?
            .map(|r| r.get(0));
        Ok(StoreStats {
            bytes: u64::try_from(bytes).unwrap_or(0),
            oldest_result_ms: oldest,
            // DELETE leaves the database its size (space is reused, not returned):
            // only dropping partitions shrinks it.
            shrinks_on_delete: false,
        })
    }
    async fn release_space(
        &self,
        _pages: u32,
        before_ms: i64,
        up_to: i64,
    ) -> Result<Vec<String>, StoreError> {
        // Monthly partitions, by the bounds PostgreSQL holds for them.
        let mut c = self.client().await?;
        let parts = c
            .query(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
                 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'records'::regclass AND c.relname LIKE 'records\\_y%'",
                &[],
            )
            .await
            .map_err(db)?;
        let mut done = Vec::new();
        for row in parts {
            let name: String = row.get(0);
            let Some((from, until, _)) = name
                .strip_prefix("records_y")
                .and_then(|r| r.split_once('m'))
                .and_then(|(y, m)| Some((y.parse::<i64>().ok()?, m.parse::<i64>().ok()?)))
                .and_then(|(y, m)| month_bounds(y * 12 + m - 1))
            else {
                continue;
            };
            if until > before_ms {
                continue;
            }
            let tx = c.transaction().await.map_err(db)?;
            // Writers take this lock before they make or fill partitions. DETACH needs
            // the whole table to itself: it waits at most half a second for readers,
            // and writers wait behind it no longer; else it is tried next pass.
            tx.execute("SET LOCAL lock_timeout = '500ms'", &[])
                .await
                .map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await
                .map_err(db)?;
            // Another backend's pass may have dropped it while this one waited.
            let gone: bool = tx
                .query_one("SELECT to_regclass($1) IS NULL", &[&name])
                .await
                .map_err(db)?
                .get(0);
            if gone {
                continue;
            }
            let row = tx
                .query_one(
                    &format!("SELECT MAX(position), MAX(stored_ms) FROM \"{name}\""),
                    &[],
                )
                .await
                .map_err(db)?;
            let (newest, last_stored): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
            // Not rolled up yet, or holding records that arrived recently (a backlog
            // from an agent that was away, whose month is long past): next time.
            if newest.is_some_and(|p| p > up_to) || last_stored.is_some_and(|t| t >= before_ms) {
                continue;
            }
            let detached = tx
                .execute(
                    &format!("ALTER TABLE records DETACH PARTITION \"{name}\""),
                    &[],
                )
                .await;
            if let Err(e) = detached {
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    tracing::info!(table = %name, "partition busy; dropped on a later pass");
                    continue;
                }
                return Err(db(e));
            }
            tx.execute(&format!("DROP TABLE \"{name}\""), &[])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            self.partitions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&from);
            done.push(format!(
                "dropped partition {name} (records of the month from {from} ms)"
            ));
        }
        Ok(done)
    }
    async fn prune_rollups(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM rollups WHERE (agent_id, module, target, hour_ms) IN (
               SELECT agent_id, module, target, hour_ms FROM rollups
               WHERE hour_ms < $1 ORDER BY hour_ms LIMIT $2)",
            &[&before_ms, &i64::from(limit)],
        )
        .await
        .map_err(db)
    }
}

#[async_trait]
impl MeasurementStore for PostgresStore {
    async fn create_measurement(&self, m: MeasurementRow) -> Result<(), StoreError> {
        let c = self.client().await?;
        insert_measurement(&c, &m).await
    }
    async fn create_schedule(
        &self,
        m: MeasurementRow,
        agents: Vec<(String, AgentSchedule)>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        insert_measurement(&tx, &m).await?;
        let mut out = Vec::with_capacity(agents.len());
        for (agent, a) in agents {
            let version = bump_version(&tx, &agent).await?;
            tx.execute(
                "INSERT INTO schedule_agents (measurement_id, agent_id, params_json, timeout_ms, added_version)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&m.id, &agent, &a.params_json, &(a.timeout_ms as i64), &(version as i64)],
            )
            .await
            .map_err(db)?;
            out.push((agent, version));
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }
    async fn stop_schedule(&self, id: &str, at_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let changed = tx
            .execute(
                "UPDATE measurements SET stopped_ms = $2 WHERE id = $1 AND schedule_json IS NOT NULL AND stopped_ms IS NULL",
                &[&id, &at_ms],
            )
            .await
            .map_err(db)?;
        let mut out = Vec::new();
        if changed > 0 {
            let agents: Vec<String> = tx
                .query(
                    "SELECT agent_id FROM schedule_agents WHERE measurement_id = $1 ORDER BY agent_id",
                    &[&id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for agent in agents {
                let v = bump_version(&tx, &agent).await?;
                out.push((agent, v));
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }
    async fn agent_schedules(&self, agent: &str) -> Result<(u64, Vec<AgentSchedule>), StoreError> {
        let c = self.client().await?;
        let version: i64 = c
            .query_opt(
                "SELECT version FROM schedule_versions WHERE agent_id = $1",
                &[&agent],
            )
            .await
            .map_err(db)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let rows = c
            .query(
                "SELECT m.id, m.module, a.params_json, a.timeout_ms, m.schedule_json
                 FROM schedule_agents a JOIN measurements m ON m.id = a.measurement_id
                 WHERE a.agent_id = $1 AND m.stopped_ms IS NULL AND m.schedule_json IS NOT NULL
                 ORDER BY m.created_ms, m.id",
                &[&agent],
            )
            .await
            .map_err(db)?;
        Ok((
            version as u64,
            rows.iter()
                .map(|r| AgentSchedule {
                    measurement_id: r.get(0),
                    module: r.get(1),
                    params_json: r.get(2),
                    timeout_ms: r.get::<_, i64>(3) as u64,
                    schedule_json: r.get(4),
                })
                .collect(),
        ))
    }
    async fn raise_schedule_version(&self, agent: &str, seen: u64) -> Result<u64, StoreError> {
        let next = super::raised_version(agent, seen)?;
        let c = self.client().await?;
        // A stored version past the limit (see `bump_version`) is replaced.
        let v: i64 = c
            .query_one(
                "INSERT INTO schedule_versions (agent_id, version) VALUES ($1, $2)
                 ON CONFLICT (agent_id) DO UPDATE SET version =
                     CASE WHEN schedule_versions.version < 0 OR schedule_versions.version >= $3
                          THEN EXCLUDED.version
                          ELSE GREATEST(schedule_versions.version, EXCLUDED.version) END
                 RETURNING version",
                &[&agent, &next, &(MAX_SCHEDULE_VERSION as i64)],
            )
            .await
            .map_err(db)?
            .get(0);
        u64::try_from(v)
            .map_err(|_| StoreError::Db(format!("schedule version {v} of agent {agent}")))
    }
    async fn schedule_progress(&self, id: &str) -> Result<Vec<ScheduleProgress>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT a.agent_id, a.added_version, COUNT(r.position), MAX(r.scheduled_ms)
                 FROM schedule_agents a
                 LEFT JOIN records r ON r.measurement_id = a.measurement_id AND r.agent_id = a.agent_id
                 WHERE a.measurement_id = $1
                 GROUP BY a.agent_id, a.added_version ORDER BY a.agent_id",
                &[&id],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| ScheduleProgress {
                agent_id: r.get(0),
                added_version: r.get::<_, i64>(1) as u64,
                runs: r.get::<_, i64>(2) as u64,
                last_scheduled_ms: r.get(3),
            })
            .collect())
    }
    async fn measurement(&self, id: &str) -> Result<Option<MeasurementRow>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt(
            &format!("SELECT {MEASUREMENT_COLS} FROM measurements WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(db)?
        .map(|r| measurement_row(&r)))
    }
    async fn measurement_requests(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestRow, Option<ResultRow>)>, StoreError> {
        let c = self.client().await?;
        let reqs: Vec<RequestRow> = c
            .query(
                &format!(
                    "SELECT {REQUEST_COLS} FROM requests WHERE measurement_id = $1 ORDER BY agent_id"
                ),
                &[&id],
            )
            .await
            .map_err(db)?
            .iter()
            .map(request_row)
            .collect();
        let mut out = Vec::with_capacity(reqs.len());
        for req in reqs {
            let result = result_of(&c, &req.id, &req.agent_id).await?;
            out.push((req, result));
        }
        Ok(out)
    }
}

#[async_trait]
impl CredentialStore for PostgresStore {
    async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT kind, id, secret_hash, message_key, scopes, tags, rate_per_min,
                        created_ms, revoked_ms, budget_json FROM credentials ORDER BY kind, id",
                &[],
            )
            .await
            .map_err(db)?;
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        };
        Ok(rows
            .iter()
            .map(|r| CredentialRow {
                kind: r.get(0),
                id: r.get(1),
                secret_hash: r.get(2),
                message_key: r.get(3),
                scopes: split(r.get(4)),
                tags: split(r.get(5)),
                rate_per_min: r.get(6),
                created_ms: r.get(7),
                revoked_ms: r.get(8),
                budget_json: r.get(9),
            })
            .collect())
    }
    async fn put_credential(&self, row: CredentialRow) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO credentials
             (kind, id, secret_hash, message_key, scopes, tags, rate_per_min, created_ms, revoked_ms, budget_json)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (kind, id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,
                 message_key = EXCLUDED.message_key, scopes = EXCLUDED.scopes, tags = EXCLUDED.tags,
                 rate_per_min = EXCLUDED.rate_per_min, created_ms = EXCLUDED.created_ms,
                 revoked_ms = EXCLUDED.revoked_ms, budget_json = EXCLUDED.budget_json",
            &[
                &row.kind,
                &row.id,
                &row.secret_hash,
                &row.message_key,
                &row.scopes.join(","),
                &row.tags.join(","),
                &row.rate_per_min,
                &row.created_ms,
                &row.revoked_ms,
                &row.budget_json,
            ],
        )
        .await
        .map_err(db)?;
        Ok(())
    }
    async fn add_spend(&self, token: &str, day: i64, probes: u64) -> Result<u64, StoreError> {
        let c = self.client().await?;
        // One statement: backends adding at once are serialized on the row, and the
        // sum is taken only when it fits.
        let n: i64 = c
            .query_one(ADD_SPEND, &[&token, &day, &clamp(probes)])
            .await
            .map_err(db)?
            .get(0);
        Ok(n.max(0) as u64)
    }
    async fn token_usage(
        &self,
        token: &str,
        day: i64,
        now_ms: i64,
    ) -> Result<TokenUsage, StoreError> {
        let c = self.client().await?;
        let spent: i64 = c
            .query_opt(
                "SELECT probes FROM token_spend WHERE token = $1 AND day = $2",
                &[&token, &day],
            )
            .await
            .map_err(db)?
            .map_or(0, |r| r.get(0));
        let row = c
            .query_one(
                "SELECT COUNT(*), LEAST(COALESCE(SUM(daily_probes), 0), 9223372036854775807)::BIGINT
                 FROM measurements
                 WHERE owner = $1 AND schedule_json IS NOT NULL AND stopped_ms IS NULL
                     AND deadline_ms > $2",
                &[&token, &now_ms],
            )
            .await
            .map_err(db)?;
        Ok(TokenUsage {
            one_off_probes: spent.max(0) as u64,
            schedules: row.get::<_, i64>(0) as u64,
            schedule_daily_probes: row.get::<_, i64>(1).max(0) as u64,
        })
    }
}

/// A release's columns, without its bytes.
const RELEASE_COLS: &str =
    "name, version, arch, sha256, size, manifest, signature, rollback, expires_ms, added_ms";

fn release_row(r: &tokio_postgres::Row) -> ReleaseRow {
    ReleaseRow {
        name: r.get(0),
        version: r.get(1),
        arch: r.get(2),
        sha256: r.get(3),
        size: r.get::<_, i64>(4).max(0) as u64,
        manifest: r.get(5),
        signature: r.get(6),
        rollback: r.get(7),
        expires_ms: r.get(8),
        added_ms: r.get(9),
    }
}

#[async_trait]
impl FleetStore for PostgresStore {
    async fn put_release(&self, row: ReleaseRow, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let size = checked_release(&row)?;
        let c = self.client().await?;
        // One statement, whichever constraint a stored release holds: a backend storing
        // the same release at once waits for the other's transaction, then finds its row.
        let stored = c
            .execute(
                "INSERT INTO releases (name, version, arch, sha256, size, manifest, signature,
                     rollback, expires_ms, added_ms, bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT DO NOTHING",
                &[
                    &row.name,
                    &row.version,
                    &row.arch,
                    &row.sha256,
                    &size,
                    &row.manifest,
                    &row.signature,
                    &row.rollback,
                    &row.expires_ms,
                    &row.added_ms,
                    &bytes,
                ],
            )
            .await
            .map_err(db)?;
        if stored == 1 {
            return Ok(true);
        }
        let same_file = c
            .query_opt(
                &format!("SELECT {RELEASE_COLS} FROM releases WHERE sha256 = $1"),
                &[&row.sha256],
            )
            .await
            .map_err(db)?
            .map(|r| release_row(&r));
        if let Some(stored) = same_file {
            if (&stored.name, &stored.version, &stored.arch) != (&row.name, &row.version, &row.arch)
            {
                return Err(file_taken(&row, &stored));
            }
            return Ok(false);
        }
        let other: Option<String> = c
            .query_opt(
                "SELECT sha256 FROM releases WHERE name = $1 AND version = $2 AND arch = $3",
                &[&row.name, &row.version, &row.arch],
            )
            .await
            .map_err(db)?
            .map(|r| r.get(0));
        match other {
            Some(other) => Err(release_taken(&row, &other)),
            // The conflicting row was deleted since: nothing deletes releases, but say so.
            None => Err(StoreError::Db(format!(
                "release {} {} for {} conflicted with a release no longer stored",
                row.name, row.version, row.arch
            ))),
        }
    }
    async fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {RELEASE_COLS} FROM releases ORDER BY added_ms DESC, sha256"),
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(release_row).collect())
    }
    async fn release(&self, version: &str, arch: &str) -> Result<Option<ReleaseRow>, StoreError> {
        if version.contains('\0') || arch.contains('\0') {
            return Ok(None); // No release has NUL in its text (see checked_release).
        }
        let c = self.client().await?;
        Ok(c.query_opt(
            &format!(
                "SELECT {RELEASE_COLS} FROM releases WHERE name = $1 AND version = $2 AND arch = $3"
            ),
            &[&AGENT_RELEASE_NAME, &version, &arch],
        )
        .await
        .map_err(db)?
        .map(|r| release_row(&r)))
    }
    async fn release_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if sha256.contains('\0') {
            return Ok(None);
        }
        let c = self.client().await?;
        Ok(
            c.query_opt("SELECT bytes FROM releases WHERE sha256 = $1", &[&sha256])
                .await
                .map_err(db)?
                .map(|r| r.get(0)),
        )
    }
    async fn put_doc(
        &self,
        kind: &str,
        key: &str,
        doc: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO fleet_docs (kind, key, doc, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc,
                 updated_ms = EXCLUDED.updated_ms",
            &[&nul_free(kind), &nul_free(key), &nul_free(doc), &now_ms],
        )
        .await
        .map_err(db)?;
        Ok(())
    }
    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt(
            "SELECT doc FROM fleet_docs WHERE kind = $1 AND key = $2",
            &[&nul_free(kind), &nul_free(key)],
        )
        .await
        .map_err(db)?
        .map(|r| r.get(0)))
    }
    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT key, doc FROM fleet_docs WHERE kind = $1 ORDER BY key",
                &[&nul_free(kind)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
    async fn docs_of(
        &self,
        kind: &str,
        keys: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let keys: Vec<String> = keys.iter().map(|k| nul_free(k).into_owned()).collect();
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT key, doc FROM fleet_docs WHERE kind = $1 AND key = ANY($2) ORDER BY key",
                &[&nul_free(kind), &keys],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
    async fn swap_doc(
        &self,
        kind: &str,
        key: &str,
        expect: Option<&str>,
        doc: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let (kind, key, doc) = (nul_free(kind), nul_free(key), nul_free(doc));
        let n = match expect {
            None => {
                c.execute(
                    "INSERT INTO fleet_docs (kind, key, doc, updated_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (kind, key) DO NOTHING",
                    &[&kind, &key, &doc, &now_ms],
                )
                .await
            }
            Some(e) => {
                c.execute(
                    "UPDATE fleet_docs SET doc = $3, updated_ms = $4
                     WHERE kind = $1 AND key = $2 AND doc = $5",
                    &[&kind, &key, &doc, &now_ms, &nul_free(e)],
                )
                .await
            }
        }
        .map_err(db)?;
        Ok(n == 1)
    }
    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM fleet_docs WHERE kind = $1 AND key = $2",
                &[&nul_free(kind), &nul_free(key)],
            )
            .await
            .map_err(db)?;
        Ok(n > 0)
    }
}

/// A request's first result, if the agent that owns it has sent one.
async fn result_of(
    c: &deadpool_postgres::Client,
    request_id: &str,
    agent: &str,
) -> Result<Option<ResultRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {RESULT_COLS} FROM requests q JOIN records r
                 ON r.position = q.result_pos AND r.at_ms = q.result_at_ms
             WHERE q.id = $1 AND q.agent_id = $2 AND r.agent_id = q.agent_id"
        ))
        .await
        .map_err(db)?;
    Ok(c.query_opt(&st, &[&request_id, &agent])
        .await
        .map_err(db)?
        .map(|r| result_row(&r)))
}

#[cfg(test)]
impl PostgresStore {
    /// Runs `sql` on a connection of the store's pool.
    pub(crate) async fn execute_sql(&self, sql: &str) -> Result<(), StoreError> {
        self.client().await?.batch_execute(sql).await.map_err(db)
    }

    /// How many rows `table` holds.
    pub(crate) async fn rows_in(&self, table: &str) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .await
            .map_err(db)?
            .get(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::migrate::{latest, POSTGRES};

    #[test]
    fn months_and_urls() {
        let (from, until, name) = month_of(1_764_201_600_000).unwrap(); // 2025-11-27
        assert_eq!(name, "records_y2025m11");
        assert_eq!((from, until), (1_761_955_200_000, 1_764_547_200_000));
        let (_, _, dec) = month_of(1_767_139_200_000).unwrap(); // 2025-12-31
        assert_eq!(dec, "records_y2025m12");
        let (jan, _, _) = month_of(1_736_000_000_000).unwrap(); // 2025-01-04
        assert_eq!(month_of(jan - 1).unwrap().2, "records_y2024m12");
        assert!(month_of(i64::MAX).is_none());
        assert!(month_of(i64::MIN).is_none());
        // Partitions only for months near the clock: 12 back, 1 ahead.
        let now = 1_764_201_600_000; // 2025-11-27
        let name = |t: i64| partition_of(t, now).map(|m| m.2);
        assert!(name(0).is_none(), "1970 goes to the default partition");
        assert!(name(i64::MAX).is_none() && name(i64::MIN).is_none());
        assert_eq!(name(now).as_deref(), Some("records_y2025m11"));
        assert_eq!(name(1_764_547_200_000).as_deref(), Some("records_y2025m12"));
        assert!(
            name(1_767_225_600_000).is_none(),
            "2026-01 is two months ahead"
        );
        assert_eq!(name(1_730_419_200_000).as_deref(), Some("records_y2024m11"));
        assert!(
            name(1_730_419_200_000 - 1).is_none(),
            "2024-10 is 13 months back"
        );
        assert!(name(3_786_912_000_000).is_none(), "2090");
        assert_eq!(
            redact("postgres://imn:secret@db:5432/imn"),
            "postgres://imn:***@db:5432/imn"
        );
        assert_eq!(
            redact("host=db user=imn password=pw"),
            "host=db user=imn password=***"
        );
    }

    #[test]
    fn jsonb_safe_changes_only_nul_escapes() {
        assert_eq!(jsonb_safe(r#"{"a":"x\u0000y"}"#), r#"{"a":"x\u2400y"}"#);
        // An escaped backslash before "u0000" is text, not a NUL.
        assert_eq!(jsonb_safe(r#"{"a":"\\u0000"}"#), r#"{"a":"\\u0000"}"#);
        assert_eq!(
            jsonb_safe(r#"{"a":"\\\u0000\"\u0001é\n"}"#),
            r#"{"a":"\\\u2400\"\u0001é\n"}"#
        );
        assert_eq!(jsonb_safe("no escapes"), "no escapes");
        assert_eq!(jsonb_safe("trailing \\"), "trailing \\");
        let v: serde_json::Value =
            serde_json::from_str(&jsonb_safe(&serde_json::json!({"m": "a\0b"}).to_string()))
                .unwrap();
        assert_eq!(v["m"], "a\u{2400}b");
    }

    /// A database made by the previous version (schema version 1), with data, is
    /// migrated on connect: its data stays, and what the migration added works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_of_schema_version_1_is_migrated_with_its_data() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        client
            .batch_execute(crate::store::migrate::POSTGRES[0].sql)
            .await
            .unwrap();
        client
            .batch_execute(
                r#"CREATE TABLE schema_version (version INT NOT NULL);
                INSERT INTO schema_version VALUES (1);
                INSERT INTO requests (id, agent_id, module, params_json, state, created_ms, updated_ms,
                    deadline_ms, timeout_ms, idempotency_key, measurement_id)
                    VALUES ('r1', 'a', 'echo_module', '{}', 'pending', 1, 1, 9, 9, 'k1', 'm1');
                INSERT INTO measurements VALUES ('m1', 'echo_module', '{}', '{}', 'old', 1, 9, NULL, NULL);
                INSERT INTO credentials VALUES ('api', 't1', 'h', NULL, 'read', '', NULL, 1, NULL);
                INSERT INTO records (agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body)
                    VALUES ('a', 1, 1, 'result', 'r1', 'echo_module', 5000, 6,
                            '{"state":"succeeded","result":{"message":"m"}}');
                INSERT INTO agent_counts VALUES ('a', 1);"#,
            )
            .await
            .unwrap();
        drop(client);
        let _ = task.await;
        let s = PostgresStore::connect(&url).await.unwrap();
        let m = s.measurement("m1").await.unwrap().unwrap();
        assert_eq!(
            (m.description.as_deref(), m.owner, m.daily_probes),
            (Some("old"), None, 0)
        );
        let r = s.request("r1").await.unwrap().unwrap();
        assert_eq!(r.idempotency_hash, None);
        assert_eq!(s.credentials().await.unwrap()[0].budget_json, None);
        let results = s.results("a", 10).await.unwrap();
        assert_eq!(results[0].result["message"], "m");
        assert_eq!(s.dead_letter_count().await.unwrap(), 0);
        assert_eq!(s.add_spend("t1", 1, 2).await.unwrap(), 2);
        // A body JSONB cannot hold is stored now; the old record is still a duplicate.
        let batch = imn_proto::wire::Batch {
            epoch: 1,
            records: vec![imn_proto::wire::Record {
                seq: 2,
                at_ms: 5001,
                body: imn_proto::wire::RecordBody::Event(imn_proto::wire::AgentEvent {
                    kind: "log".into(),
                    message: "a\0b".into(),
                }),
            }],
        };
        let out = s
            .store_batch("a", crate::store::prepare(&batch), 7)
            .await
            .unwrap();
        assert_eq!((out.stored, out.dead_lettered), (1, 0));
        assert_eq!(s.events("a", 1).await.unwrap()[0].2, "a\0b");
        drop(s);
        assert_eq!(schema_version(&url).await, vec![latest(POSTGRES) as i32]);
        // Connecting again migrates nothing more.
        let s = PostgresStore::connect(&url).await.unwrap();
        assert_eq!(s.record_count().await.unwrap(), 2);
        assert_eq!(schema_version(&url).await, vec![latest(POSTGRES) as i32]);
    }

    /// The rows of `schema_version` (one, once migrated).
    async fn schema_version(url: &str) -> Vec<i32> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        let rows = client
            .query("SELECT version FROM schema_version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        let _ = task.await;
        rows
    }

    /// What a database looks like to a test: tables and their columns.
    async fn columns(url: &str) -> Vec<(String, String)> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        drop(client);
        let _ = task.await;
        rows
    }

    /// A new database gets every migration, and so the same tables as one migrated
    /// from version 1 (every migration after the first applied to existing data).
    #[tokio::test]
    async fn a_new_database_gets_every_migration() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let s = PostgresStore::connect(&url).await.unwrap();
        assert_eq!(schema_version(&url).await, vec![latest(POSTGRES) as i32]);
        let cols = columns(&url).await;
        for (table, column) in [
            ("records", "body_text"),
            ("dead_letters", "reason"),
            ("token_spend", "probes"),
            ("run_results", "run_key"),
            ("credentials", "budget_json"),
            ("releases", "bytes"),
            ("fleet_docs", "doc"),
        ] {
            assert!(
                cols.contains(&(table.to_string(), column.to_string())),
                "{table}.{column}"
            );
        }
        assert_eq!(s.dead_letter_count().await.unwrap(), 0);
        // The same layout as a database that was at version 1 and migrated.
        let (_c2, old) = crate::store::pg_cluster::fresh_database().await.unwrap();
        {
            let (client, conn) = tokio_postgres::connect(&old, NoTls).await.unwrap();
            let task = tokio::spawn(conn);
            client.batch_execute(POSTGRES[0].sql).await.unwrap();
            client
                .batch_execute(
                    "CREATE TABLE schema_version (version INT NOT NULL);
                     INSERT INTO schema_version VALUES (1);",
                )
                .await
                .unwrap();
            drop(client);
            let _ = task.await;
        }
        drop(PostgresStore::connect(&old).await.unwrap());
        assert_eq!(columns(&old).await, cols);
    }

    #[tokio::test]
    async fn a_database_of_a_newer_version_is_refused_and_left_alone() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        drop(PostgresStore::connect(&url).await.unwrap());
        let newer = latest(POSTGRES) + 1;
        {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let task = tokio::spawn(conn);
            client
                .batch_execute(&crate::store::migrate::set_version(newer))
                .await
                .unwrap();
            drop(client);
            let _ = task.await;
        }
        let e = PostgresStore::connect(&url)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains(&format!("schema version {newer}"))
                && e.contains(&format!("this backend's {}", latest(POSTGRES))),
            "{e}"
        );
        assert_eq!(schema_version(&url).await, vec![newer as i32]);
    }

    /// Backends starting at once on a new database: one migrates (each migration
    /// under the migration lock), the others find the work done; connecting again
    /// changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn backends_migrating_at_once_and_again_apply_each_migration_once() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { PostgresStore::connect(&url).await.map(drop) })
            })
            .collect();
        for s in starts {
            s.await.unwrap().unwrap();
        }
        assert_eq!(schema_version(&url).await, vec![latest(POSTGRES) as i32]);
        let cols = columns(&url).await;
        let s = PostgresStore::connect(&url).await.unwrap();
        s.migrate().await.unwrap();
        assert_eq!(schema_version(&url).await, vec![latest(POSTGRES) as i32]);
        assert_eq!(columns(&url).await, cols);
    }

    fn echo_batch(epoch: u64, seqs: std::ops::RangeInclusive<u64>) -> PreparedBatch {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        super::super::prepare(&imn_proto::wire::Batch {
            epoch,
            records: seqs
                .map(|i| {
                    crate::store::conformance::result_record(i, at, &format!("r{i}"), "echo_module")
                })
                .collect(),
        })
    }

    fn all_after(after: i64) -> ResultFilter {
        ResultFilter {
            after,
            limit: 1000,
            ..Default::default()
        }
    }

    /// A writer whose transaction began first but commits last: a reader paging by
    /// position does not see the later writer's records until the earlier one ends, so
    /// its cursor never passes a position that is then filled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_never_passes_a_record_a_slower_writer_commits_late() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let s = PostgresStore::connect(&url).await.unwrap();
        // One record before anything runs.
        s.store_batches(vec![("a".into(), echo_batch(1, 1..=1))], 1)
            .await
            .unwrap();
        let first = s.results_page(all_after(0)).await.unwrap();
        assert_eq!(first.len(), 1);
        let cursor = first[0].0;
        assert_eq!(s.latest_position().await.unwrap(), cursor);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // The slow writer: a transaction of the same shape as `store_group`'s (shared
        // lock, `imn_position_start`), open with its record inserted.
        // Another backend's store (connected first: connecting makes partitions,
        // which waits for running writers).
        let other = PostgresStore::connect(&url).await.unwrap();
        let (slow, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        slow.batch_execute("BEGIN").await.unwrap();
        let start: i64 = slow
            .query_one(
                "SELECT imn_position_start() FROM (SELECT pg_advisory_xact_lock_shared($1)) l",
                &[&WRITE_LOCK],
            )
            .await
            .unwrap()
            .get(0);
        slow.execute(
            "INSERT INTO records (agent_id, epoch, seq, kind, request_id, module, at_ms, stored_ms, body, position)
             VALUES ('slow', 1, 1, 'result', 'late', 'echo_module', $1, 2,
                     '{\"state\":\"succeeded\",\"result\":{\"message\":\"late\"}}', $2)",
            &[&now, &(start + 1)],
        )
        .await
        .unwrap();
        // A faster writer commits while it is open, without waiting for it.
        let fast = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            other.store_batches(vec![("b".into(), echo_batch(1, 1..=3))], 3),
        )
        .await
        .expect("a writer does not wait for another's transaction")
        .unwrap();
        assert_eq!(fast[0].stored, 3);
        // Committed, but above the slow writer's position: not readable yet, and the
        // latest position (where a stream "from now" starts) stays below both.
        assert!(s.results_page(all_after(cursor)).await.unwrap().is_empty());
        assert_eq!(s.latest_position().await.unwrap(), cursor);
        assert!(s
            .schedule_results_newest("none", None, 10)
            .await
            .unwrap()
            .is_empty());
        slow.batch_execute("COMMIT").await.unwrap();
        // Now both, the late one first: its position is the lower.
        let page = s.results_page(all_after(cursor)).await.unwrap();
        let agents: Vec<&str> = page.iter().map(|r| r.1.agent_id.as_str()).collect();
        assert_eq!(agents, vec!["slow", "b", "b", "b"]);
        assert!(page.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(page[0].0 > cursor);
        assert_eq!(s.latest_position().await.unwrap(), page[3].0);
    }

    /// A database restored into another cluster finds transaction ids that start
    /// again low: at connect, positions are made to continue above the stored ones,
    /// so an old cursor still reaches every new record. A writer of an older version
    /// (no position) is refused as the database's state, not the record's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn positions_continue_above_a_restored_database_and_old_writers_are_refused() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let s = PostgresStore::connect(&url).await.unwrap();
        s.store_batches(vec![("a".into(), echo_batch(1, 1..=2))], 1)
            .await
            .unwrap();
        let old = s.results_page(all_after(0)).await.unwrap();
        let cursor = old.last().unwrap().0;
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        // As if the ids had restarted: new positions would land far below the old.
        c.batch_execute("UPDATE position_base SET base = base - (1::BIGINT << 50)")
            .await
            .unwrap();
        drop(s);
        let s = PostgresStore::connect(&url).await.unwrap();
        s.store_batches(vec![("b".into(), echo_batch(1, 1..=1))], 2)
            .await
            .unwrap();
        let new = s.results_page(all_after(cursor)).await.unwrap();
        assert_eq!(new.len(), 1, "the new record comes after the old cursor");
        assert_eq!(new[0].1.agent_id, "b");
        assert_eq!(s.results_page(all_after(0)).await.unwrap().len(), 3);
        assert_eq!(s.latest_position().await.unwrap(), new[0].0);
        // An older backend's insert, with no position.
        let e = c
            .execute(
                "INSERT INTO records (agent_id, epoch, seq, kind, at_ms, stored_ms, body)
                 VALUES ('old', 1, 1, 'event', 1, 1, '{}')",
                &[],
            )
            .await
            .expect_err("refused");
        assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{e}");
        assert!(matches!(db(e), StoreError::Unavailable(_)));
    }

    /// Three stores (three backends) write at once, with resends of each other's
    /// batches, while a reader pages by cursor: the reader sees every record exactly
    /// once, in increasing positions, and the writers never wait for each other's
    /// whole transactions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_writers_and_a_paging_reader_see_every_record_once() {
        let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
        let reader = PostgresStore::connect(&url).await.unwrap();
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let s = PostgresStore::connect(&url).await.unwrap();
            writers.push(tokio::spawn(async move {
                let mut stored = 0;
                for b in 0..40u64 {
                    // Each writer's own agents, and every fourth batch also a resend
                    // of the previous writer's (the same records reaching two backends).
                    let mut group = vec![(format!("w{w}-a{}", b % 5), echo_batch(b + 1, 1..=25))];
                    if b % 4 == 0 {
                        group.push((
                            format!("w{}-a{}", (w + 2) % 3, b % 5),
                            echo_batch(b + 1, 1..=25),
                        ));
                    }
                    let out = s.store_batches(group, 1).await.unwrap();
                    stored += out.iter().map(|o| o.stored).sum::<u64>();
                }
                stored
            }));
        }
        let mut seen = std::collections::HashSet::new();
        let mut cursor = 0;
        let mut pages = 0;
        let reading = async {
            loop {
                let done = writers.iter().all(|w| w.is_finished());
                let page = reader.results_page(all_after(cursor)).await.unwrap();
                for (pos, r, _) in &page {
                    assert!(*pos > cursor, "positions increase");
                    cursor = *pos;
                    assert!(
                        seen.insert((r.agent_id.clone(), r.epoch, r.seq)),
                        "{} {} {} read twice",
                        r.agent_id,
                        r.epoch,
                        r.seq
                    );
                }
                pages += 1;
                if done && page.is_empty() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        reading.await;
        let mut stored = 0;
        for w in writers {
            stored += w.await.unwrap();
        }
        let rows: i64 = {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            c.query_one("SELECT COUNT(*) FROM records", &[])
                .await
                .unwrap()
                .get(0)
        };
        assert_eq!(stored as i64, rows);
        assert_eq!(seen.len() as i64, rows, "after {pages} pages");
        assert!(pages > 3, "the reader paged while the writers wrote");
    }
}
