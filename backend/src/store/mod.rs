//! Where the backend keeps agents, requests, their state transitions, and every record
//! agents sent. One [`Store`], made of a trait per aggregate ([`AgentStore`],
//! [`RequestStore`], [`MeasurementStore`], [`CredentialStore`], [`FleetStore`]); the
//! embedded default is [`SqliteStore`] (one file, no setup); [`PostgresStore`] is for
//! deployments where several backends share one database. Both keep their schema with
//! numbered SQL migrations, applied and recorded the same way (`migrate`).
//! [`FleetStore`] keeps signed agent releases (with their files) and the fleet's
//! lifecycle state, as documents.
//!
//! Records are keyed by (agent, epoch, seq), so storing is idempotent: a batch sent
//! twice is stored once, which makes the at-least-once path exactly-once for users.
//!
//! Agents are not trusted to send storable records. A record the database refuses
//! goes to the dead letters instead of failing every group commit it is part of (see
//! [`RequestStore::store_batches`]); text a column cannot hold (NUL) is escaped, not lost (see
//! [`nul_free`]); limits keep one agent from growing the store's structures without
//! bound ([`MAX_SEQ_RANGES`], [`MAX_SCHEDULE_VERSION`]).

#[cfg(test)]
mod conformance;
mod migrate;
pub mod pg_cluster;
mod pg_tls;
mod postgres;
mod sqlite;

pub use postgres::{redact, PostgresStore};
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use imn_proto::results::ModuleOutcome;
use imn_proto::wire::{Batch, Hello, RecordBody, RequestState};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused a statement (a constraint, a value it cannot hold...).
    #[error("store: {0}")]
    Db(String),
    /// The database cannot be reached or cannot write now (connection lost, disk
    /// full, a lock or serialization conflict): nothing is wrong with the data, so
    /// storing records never dead-letters on it; the caller retries later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// An agent the backend has heard a hello from.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: String,
    pub first_seen_ms: i64,
    pub last_hello_ms: i64,
    pub hello: Hello,
}

/// A stored credential: an enrolled agent (`kind` "agent") or an API token ("api").
/// Secrets are never stored, only their hash.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialRow {
    pub kind: String,
    pub id: String,
    pub secret_hash: String,
    /// Agents: the hex message key the bridge verifies signatures with.
    pub message_key: Option<String>,
    /// API tokens: read, measure, admin.
    pub scopes: Vec<String>,
    /// Agents: tags an admin gave at enrollment (the policy's tags).
    pub tags: Vec<String>,
    /// API tokens: requests per minute, when not the default.
    pub rate_per_min: Option<f64>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
    /// API tokens: the token's budget, as JSON text (opaque to the store).
    pub budget_json: Option<String>,
}

/// A signed agent release as the backend stores it. The file's bytes are kept apart,
/// by SHA-256 (`release_bytes`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRow {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Lowercase hex SHA-256 of the binary.
    pub sha256: String,
    pub size: u64,
    /// The signed manifest line, exactly as signed, and its signature (hex).
    pub manifest: String,
    pub signature: String,
    pub rollback: bool,
    pub expires_ms: i64,
    pub added_ms: i64,
}

/// The name [`FleetStore::release`] looks releases up under: the agent's.
pub const AGENT_RELEASE_NAME: &str = "imn-agent";

/// Checks a release before either store writes it, so both refuse the same: its text
/// is kept exactly (a manifest is verified against its signature as stored, so it is
/// never escaped as [`nul_free`] would), and NUL is text PostgreSQL cannot hold;
/// its size must fit the stores' integers. Returns the size as stored.
pub(crate) fn checked_release(row: &ReleaseRow) -> Result<i64, StoreError> {
    for (field, text) in [
        ("name", &row.name),
        ("version", &row.version),
        ("arch", &row.arch),
        ("sha256", &row.sha256),
        ("manifest", &row.manifest),
        ("signature", &row.signature),
    ] {
        if text.contains('\0') {
            return Err(StoreError::Db(format!(
                "release {} {} for {}: its {field} holds a NUL character, which the store cannot keep exactly",
                nul_free(&row.name),
                nul_free(&row.version),
                nul_free(&row.arch)
            )));
        }
    }
    i64::try_from(row.size).map_err(|_| {
        StoreError::Db(format!(
            "release {} {} for {}: size {} is too large to store",
            row.name, row.version, row.arch, row.size
        ))
    })
}

/// Why a release with another file for a (name, version, arch) already stored is
/// refused (both stores say the same).
pub(crate) fn release_taken(row: &ReleaseRow, stored_sha256: &str) -> StoreError {
    StoreError::Db(format!(
        "release {} {} for {} is already stored with another file (sha256 {stored_sha256})",
        row.name, row.version, row.arch
    ))
}

/// Why a release whose file is already stored as another release is refused: a file is
/// kept once, by its SHA-256, under the one release it was stored as.
pub(crate) fn file_taken(row: &ReleaseRow, stored: &ReleaseRow) -> StoreError {
    StoreError::Db(format!(
        "release {} {} for {}: its file (sha256 {}) is already stored as release {} {} for {}",
        row.name, row.version, row.arch, row.sha256, stored.name, stored.version, stored.arch
    ))
}

/// A request as the API accepted it.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: String,
    pub agent_id: String,
    pub module: String,
    pub params_json: String,
    pub created_ms: i64,
    pub deadline_ms: i64,
    pub timeout_ms: u64,
    pub idempotency_key: Option<String>,
    /// A hash of what the idempotency key was first used for (the request's body), so
    /// a replay of the key with another body can be told from a true replay.
    pub idempotency_hash: Option<String>,
    /// W3C trace context of the API request that created it: every dispatch, however
    /// late, and every result join that trace.
    pub traceparent: Option<String>,
    /// The fleet measurement it is part of (`POST /v1/measurements`), if any.
    pub measurement_id: Option<String>,
    /// The agent is online: store the request as dispatched at `created_ms`, in the
    /// same transaction, because its command goes out right after.
    pub dispatch: bool,
    /// Probes to charge to an API token's spend for a day, in the same transaction
    /// (only when the request is new: a replayed idempotency key charges nothing).
    pub charge: Option<Charge>,
}

/// What a new request adds to a token's spend (see `CredentialStore::add_spend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub token: String,
    /// UTC days since the epoch.
    pub day: i64,
    pub probes: u64,
}

/// Which results a page of `GET /v1/results` holds.
#[derive(Debug, Clone, Default)]
pub struct ResultFilter {
    pub agent: Option<String>,
    pub module: Option<String>,
    pub measurement: Option<String>,
    /// The agent's time of the result (ms since the epoch), inclusive.
    pub since_ms: Option<i64>,
    /// Exclusive.
    pub until_ms: Option<i64>,
    /// Results stored after this position (arrival order), exclusive.
    pub after: i64,
    pub limit: u32,
}

/// A fleet measurement: one module run on many agents, one request per agent.
#[derive(Debug, Clone, Serialize)]
pub struct MeasurementRow {
    pub id: String,
    pub module: String,
    pub params_json: String,
    /// The selection as the caller gave it (JSON).
    pub selection_json: String,
    pub description: Option<String>,
    pub created_ms: i64,
    pub deadline_ms: i64,
    /// A recurring measurement's schedule (JSON of `fleet::ScheduleSpec`).
    pub schedule_json: Option<String>,
    /// When a recurring measurement was stopped (`DELETE`).
    pub stopped_ms: Option<i64>,
    /// The API token (its id) that created it; None without authentication.
    pub owner: Option<String>,
    /// A recurring measurement's standing charge against its owner's budget, probes
    /// per day; 0 for a one-off.
    pub daily_probes: u64,
}

/// A recurring measurement as one agent runs it: its parameters are checked for that
/// agent (with the agent's module defaults) when the measurement is made.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSchedule {
    pub measurement_id: String,
    pub module: String,
    pub params_json: String,
    pub timeout_ms: u64,
    pub schedule_json: String,
}

/// One agent's part in a recurring measurement.
#[derive(Debug, Clone)]
pub struct ScheduleProgress {
    pub agent_id: String,
    /// The agent's schedule version that first carried the measurement.
    pub added_version: u64,
    /// Runs stored, and the newest run's slot time.
    pub runs: u64,
    pub last_scheduled_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestRow {
    pub id: String,
    pub agent_id: String,
    pub module: String,
    pub params_json: String,
    pub state: RequestState,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub deadline_ms: i64,
    pub timeout_ms: u64,
    /// W3C trace context of the request's trace (`00-{trace id}-{span id}-{flags}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// What [`NewRequest::idempotency_hash`] stored; internal, never shown.
    #[serde(skip)]
    pub idempotency_hash: Option<String>,
}

/// Whether a create made a new request or found the one with the same idempotency key.
#[derive(Debug, Clone)]
pub enum Created {
    New(RequestRow),
    Existing(RequestRow),
}

#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub state: RequestState,
    pub at_ms: i64,
    /// `backend` or `agent`.
    pub observer: String,
    pub detail: Option<String>,
}

/// A stored module result.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub agent_id: String,
    pub request_id: String,
    pub module: String,
    pub epoch: u64,
    pub seq: u64,
    pub state: RequestState,
    pub result: serde_json::Value,
    pub error: Option<String>,
    pub received_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub stored_ms: i64,
    /// A scheduled run's slot time.
    pub scheduled_ms: Option<i64>,
    /// The record's time on the agent's clock (what `since` and `until` filter on).
    pub at_ms: i64,
}

/// Where a stored result came from: its record id, request, module and store time.
pub(crate) struct ResultKey {
    pub agent_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub request_id: Option<String>,
    pub module: Option<String>,
    pub stored_ms: i64,
    /// The record's time on the agent's clock.
    pub at_ms: i64,
}

impl ResultRow {
    /// A result row from its stored body (what [`prepare`] wrote); `scheduled_ms` from
    /// a column where the store has one, else from the body.
    pub(crate) fn from_body(k: ResultKey, body: &str, scheduled_ms: Option<i64>) -> ResultRow {
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let ms = |k: &str| v.get(k).and_then(|x| x.as_i64());
        ResultRow {
            agent_id: k.agent_id,
            epoch: k.epoch,
            seq: k.seq,
            request_id: k.request_id.unwrap_or_default(),
            module: k.module.unwrap_or_default(),
            stored_ms: k.stored_ms,
            state: v
                .get("state")
                .and_then(|s| s.as_str())
                .and_then(RequestState::parse)
                .unwrap_or(RequestState::Failed),
            result: v.get("result").cloned().unwrap_or_default(),
            error: v.get("error").and_then(|e| e.as_str()).map(str::to_string),
            received_ms: ms("received_ms").unwrap_or(0),
            started_ms: ms("started_ms").unwrap_or(0),
            finished_ms: ms("finished_ms").unwrap_or(0),
            scheduled_ms: scheduled_ms.or_else(|| ms("scheduled_ms")),
            at_ms: k.at_ms,
        }
    }
}

/// A batch turned into rows, ready for any store. Preparing (JSON bodies) is apart
/// from storing so the backend can prepare one batch while the store writes another.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    pub epoch: u64,
    pub rows: Vec<RecordRow>,
}

/// One record as stored.
#[derive(Debug, Clone)]
pub struct RecordRow {
    pub seq: u64,
    pub at_ms: i64,
    /// `state`, `result` or `event`.
    pub kind: &'static str,
    pub request_id: Option<String>,
    pub module: Option<String>,
    /// A scheduled run's measurement and slot time.
    pub measurement_id: Option<String>,
    pub scheduled_ms: Option<i64>,
    pub body_json: String,
    /// The request state this record moves its request to.
    pub transition: Option<RowTransition>,
}

impl RecordRow {
    /// The run a result belongs to, of which the store keeps one result per agent: a
    /// scheduled slot (`slot:{measurement}@{scheduled_ms}`) or a one-off request
    /// (`req:{request id}`). None for states and events.
    pub fn run_key(&self) -> Option<String> {
        if self.kind != "result" {
            return None;
        }
        match (&self.measurement_id, self.scheduled_ms, &self.request_id) {
            (Some(m), Some(at), _) => Some(format!("slot:{m}@{at}")),
            (_, _, Some(r)) => Some(format!("req:{r}")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RowTransition {
    pub request_id: String,
    pub state: RequestState,
    pub detail: Option<String>,
}

/// A result's body in the records table (what the API returns).
#[derive(Serialize)]
struct StoredResult<'a> {
    state: &'a str,
    result: Option<imn_proto::results::OutputJson<'a>>,
    error: Option<&'a str>,
    received_ms: i64,
    started_ms: i64,
    finished_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_ms: Option<i64>,
}

/// A result's state, stored body and error.
fn result_body(
    r: &imn_proto::wire::ModuleResult,
    scheduled_ms: Option<i64>,
) -> (RequestState, String, Option<String>) {
    let (state, result, error) = match &r.outcome {
        ModuleOutcome::Ok(o) => (RequestState::Succeeded, Some(o.as_serialize()), None),
        ModuleOutcome::Failed(e) => (RequestState::Failed, None, Some(e.clone())),
        ModuleOutcome::Timeout => (
            RequestState::Timeout,
            None,
            Some("the module passed its deadline and was cancelled".to_string()),
        ),
    };
    let body = serde_json::to_string(&StoredResult {
        state: state.as_str(),
        result,
        error: error.as_deref(),
        received_ms: r.received_ms,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        scheduled_ms,
    })
    .unwrap_or_else(|e| {
        serde_json::json!({"state": state.as_str(), "error": format!("result not serializable: {e}")})
            .to_string()
    });
    (state, body, error)
}

/// What a NUL character in agent text becomes in a column of its own: U+2400 SYMBOL
/// FOR NULL. PostgreSQL's text columns refuse NUL outright (and a refused record would
/// be dead-lettered for a byte the agent may not control, such as one in a server's
/// error text). Both stores escape the same way, so they answer the same. The escape
/// is lossy only in that a `␀` sent as such reads the same; the record's JSON body
/// keeps the exact text, NUL included.
pub const NUL_ESCAPE: char = '\u{2400}';

/// `s` with every NUL replaced by [`NUL_ESCAPE`]; borrowed when there is none.
pub fn nul_free(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', NUL_ESCAPE.encode_utf8(&mut [0; 4])))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn nul_free_owned(s: &str) -> String {
    nul_free(s).into_owned()
}

/// Turns a batch into rows: one JSON body per record, serialized straight from the
/// typed record (a drain prepares one per result). The columns made of agent text
/// (request id, module, measurement, a state's detail) are [`nul_free`]; the bodies
/// are JSON, where NUL is the escape `\u0000`.
pub fn prepare(batch: &Batch) -> PreparedBatch {
    let rows = batch
        .records
        .iter()
        .map(|rec| {
            let mut measurement_id = None;
            let mut scheduled_ms = None;
            let (kind, request_id, module, body_json, transition) = match &rec.body {
                RecordBody::State(s) => (
                    "state",
                    Some(nul_free_owned(&s.request_id)),
                    None,
                    serde_json::json!({"state": s.state.as_str(), "detail": s.detail}).to_string(),
                    Some(RowTransition {
                        request_id: nul_free_owned(&s.request_id),
                        state: s.state,
                        detail: s.detail.as_deref().map(nul_free_owned),
                    }),
                ),
                RecordBody::Result(r) | RecordBody::TracedResult(r, _) => {
                    let (state, body, error) = result_body(r, None);
                    (
                        "result",
                        Some(nul_free_owned(&r.request_id)),
                        Some(nul_free_owned(&r.module)),
                        body,
                        Some(RowTransition {
                            request_id: nul_free_owned(&r.request_id),
                            state,
                            detail: error.as_deref().map(nul_free_owned),
                        }),
                    )
                }
                // A scheduled run has no request to move: only its measurement.
                RecordBody::ScheduledResult(run) => {
                    let r = &run.result;
                    measurement_id = Some(nul_free_owned(&run.measurement_id));
                    scheduled_ms = Some(run.scheduled_ms);
                    let (_, body, _) = result_body(r, Some(run.scheduled_ms));
                    (
                        "result",
                        Some(nul_free_owned(&r.request_id)),
                        Some(nul_free_owned(&r.module)),
                        body,
                        None,
                    )
                }
                RecordBody::Event(e) => (
                    "event",
                    None,
                    None,
                    serde_json::json!({"kind": e.kind, "message": e.message}).to_string(),
                    None,
                ),
            };
            RecordRow {
                seq: rec.seq,
                at_ms: rec.at_ms,
                kind,
                request_id,
                module,
                measurement_id,
                scheduled_ms,
                body_json,
                transition,
            }
        })
        .collect();
    PreparedBatch {
        epoch: batch.epoch,
        rows,
    }
}

/// What storing one batch did. Every record of the batch is counted in exactly one of
/// `stored`, `duplicates`, `dead_lettered` and `refused`; all but `refused` are
/// handled (the caller acks them).
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    pub stored: u64,
    /// Records dropped as already stored: a resent record id, or (counted in
    /// `run_duplicates` too) a second result for a run that has one.
    pub duplicates: u64,
    /// Results dropped because their run (a request, or a scheduled slot) already has
    /// a stored result from this agent, whatever their record id: an agent that lost
    /// its outbox's progress and ran a slot again. Part of `duplicates`.
    pub run_duplicates: u64,
    /// Records the database refused, kept in the dead letters instead (see
    /// [`RequestStore::dead_letters`]).
    pub dead_lettered: u64,
    /// Seqs not stored because the agent's epoch already has [`MAX_SEQ_RANGES`] gaps
    /// (SQLite only). Not handled: the caller must not ack them, so the agent keeps
    /// them and sends them again once its earlier seqs have closed the gaps.
    pub refused: Vec<u64>,
    /// Requests that reached a terminal state with this batch.
    pub finished: Vec<String>,
}

impl BatchOutcome {
    /// Adds what storing part of the same batch did.
    pub(crate) fn merge(&mut self, other: BatchOutcome) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.run_duplicates += other.run_duplicates;
        self.dead_lettered += other.dead_lettered;
        self.refused.extend(other.refused);
        self.finished.extend(other.finished);
    }
}

/// The most disjoint ranges of stored seqs the embedded store keeps per agent and
/// outbox epoch. An outbox sends its seqs nearly in order, so an honest agent has one
/// range, or a few while a window fills; a hostile one sending far-apart seqs in
/// descending order would otherwise make every insert shift a list that grows with
/// each record, under the store's one lock. A record that would open a range past
/// this is refused ([`BatchOutcome::refused`]).
pub const MAX_SEQ_RANGES: usize = 1024;

/// The highest schedule version an agent may report. Versions count changes to one
/// agent's schedule set, one at a time: no honest agent gets near 2^40. A version
/// reported above it is refused by [`MeasurementStore::raise_schedule_version`], so no agent can
/// push the store's counter to the end of its range (where every later change would
/// overflow, and stopping a schedule would fail).
pub const MAX_SCHEDULE_VERSION: u64 = 1 << 40;

/// A record the database refused, kept with the reason so it can be looked at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub agent_id: String,
    pub epoch: u64,
    pub seq: u64,
    /// The agent's time of the record.
    pub at_ms: i64,
    /// `state`, `result` or `event`.
    pub kind: String,
    /// The database's error when the record was stored alone.
    pub reason: String,
    /// The record's body as prepared (JSON); kept as bytes, which any database takes.
    pub body: String,
    pub stored_ms: i64,
}

/// What an API token has spent of its budget, and what it has standing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    /// Probes of one-off measurements charged on the day asked for.
    pub one_off_probes: u64,
    /// Recurring measurements it owns that are running.
    pub schedules: u64,
    /// Their daily probes, summed (saturating).
    pub schedule_daily_probes: u64,
}

/// The version a raise stores: one past what the agent has seen, which must be within
/// [`MAX_SCHEDULE_VERSION`] (see there).
pub(crate) fn raised_version(agent: &str, seen: u64) -> Result<i64, StoreError> {
    if seen > MAX_SCHEDULE_VERSION {
        return Err(StoreError::Db(format!(
            "agent {agent} reported schedule version {seen}, above the largest an agent may have ({MAX_SCHEDULE_VERSION})"
        )));
    }
    Ok(seen as i64 + 1)
}

/// The agent registry: agents by their hello (first seen, last hello) and their
/// connection sessions.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    async fn upsert_agent(&self, id: &str, hello: &Hello, now_ms: i64) -> Result<(), StoreError>;
    async fn agents(&self) -> Result<Vec<AgentRow>, StoreError>;
    /// An agent connected: opens a session (closing an open one at `prev_end_ms`).
    async fn session_open(
        &self,
        agent: &str,
        at_ms: i64,
        prev_end_ms: i64,
    ) -> Result<(), StoreError>;
    /// Closes the agent's open session, if any, at `at_ms`.
    async fn session_close(&self, agent: &str, at_ms: i64) -> Result<(), StoreError>;
    /// The agent's sessions (connected, disconnected or None while open), oldest first,
    /// those ending after `since_ms` (and an open one).
    async fn sessions(
        &self,
        agent: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, Option<i64>)>, StoreError>;
    /// The agent's first connection ever, if any.
    async fn first_connected(&self, agent: &str) -> Result<Option<i64>, StoreError>;
    /// Stores heartbeat points (agent, the backend's time, the point as JSON); a point
    /// already stored for the same agent and time is kept as it was.
    async fn put_heartbeats(&self, rows: Vec<HeartbeatRow>) -> Result<(), StoreError>;
    /// Points stored at or after `since_ms`, oldest first, at most `limit`.
    async fn heartbeats_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError>;
    /// Deletes up to `limit` points stored before `before_ms`, oldest first; returns
    /// how many went.
    async fn prune_heartbeats(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;
}

/// One stored heartbeat point: the agent, when it arrived (the backend's clock) and
/// the point as JSON (`registry::HeartbeatPoint`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatRow {
    pub agent_id: String,
    pub at_ms: i64,
    pub point_json: String,
}

/// Requests and what agents sent about them: creating and moving requests, storing
/// record batches (idempotent by seq), results, events, dead letters and counts.
#[async_trait]
pub trait RequestStore: Send + Sync + 'static {
    /// Creates a request in state `pending`, or returns the one with the same
    /// idempotency key.
    async fn create_request(&self, req: NewRequest) -> Result<Created, StoreError>;
    async fn request(&self, id: &str) -> Result<Option<RequestRow>, StoreError>;
    /// The request an idempotency key (as the caller stores it) made, if any.
    async fn request_by_key(&self, key: &str) -> Result<Option<RequestRow>, StoreError>;
    /// Records a transition; the request's state only moves forward. Returns whether
    /// the request's state changed.
    async fn transition(
        &self,
        id: &str,
        state: RequestState,
        at_ms: i64,
        observer: &str,
        detail: Option<&str>,
    ) -> Result<bool, StoreError>;
    async fn transitions(&self, id: &str) -> Result<Vec<Transition>, StoreError>;
    /// The agent's requests that it has not yet confirmed receiving.
    async fn undelivered(&self, agent: &str) -> Result<Vec<RequestRow>, StoreError>;
    /// Requests not terminal and past their deadline.
    async fn overdue(&self, now_ms: i64) -> Result<Vec<RequestRow>, StoreError>;
    /// Stores batches (of any agents), skipping records already stored; one outcome
    /// per batch, in order. The group is one transaction. If the database refuses it,
    /// each batch is tried in a transaction of its own, and the records of a batch
    /// refused alone one at a time: a record refused alone is a poison record and goes
    /// to the dead letters (a resend of it is a duplicate), so it never blocks other
    /// records. Err only when the store is unavailable, or a dead letter cannot be
    /// written either: then batches stored before the failure stay stored (a resend
    /// finds them duplicates) and the caller retries the rest later.
    async fn store_batches(
        &self,
        batches: Vec<(String, PreparedBatch)>,
        now_ms: i64,
    ) -> Result<Vec<BatchOutcome>, StoreError>;
    /// Stores one batch in one transaction, skipping records already stored.
    async fn store_batch(
        &self,
        agent: &str,
        batch: PreparedBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut out = self
            .store_batches(vec![(agent.to_string(), batch)], now_ms)
            .await?;
        out.pop()
            .ok_or_else(|| StoreError::Db("no outcome for the batch".into()))
    }
    /// Newest first.
    async fn results(&self, agent: &str, limit: u32) -> Result<Vec<ResultRow>, StoreError>;
    async fn result(&self, agent: &str, request_id: &str) -> Result<Option<ResultRow>, StoreError>;
    /// A request and, once it has one, its first result: what `?wait` answers with.
    async fn request_and_result(
        &self,
        id: &str,
    ) -> Result<Option<(RequestRow, Option<ResultRow>)>, StoreError> {
        let Some(req) = self.request(id).await? else {
            return Ok(None);
        };
        let result = self.result(&req.agent_id, id).await?;
        Ok(Some((req, result)))
    }
    /// How many records the agent's outbox delivered, of every kind.
    async fn agent_record_count(&self, agent: &str) -> Result<u64, StoreError>;
    /// The agent's events, newest first: (agent time, kind, message).
    async fn events(
        &self,
        agent: &str,
        limit: u32,
    ) -> Result<Vec<(i64, String, String)>, StoreError>;
    /// How many records are stored, in all.
    async fn record_count(&self) -> Result<u64, StoreError>;
    /// A page of results in arrival order, each with its position (a new result always
    /// comes after every stored one, so paging by position is stable while results
    /// arrive) and its measurement.
    async fn results_page(
        &self,
        f: ResultFilter,
    ) -> Result<Vec<(i64, ResultRow, Option<String>)>, StoreError>;
    /// A recurring measurement's results, newest first by position: those stored
    /// before position `before` (None: from the newest), at most `limit`. For status
    /// checks, which read back from now until their window ends.
    async fn schedule_results_newest(
        &self,
        measurement: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, ResultRow)>, StoreError>;
    /// The position of the newest stored record (0 when there is none).
    async fn latest_position(&self) -> Result<i64, StoreError>;
    /// How many requests are in each state now.
    async fn request_state_counts(&self) -> Result<Vec<(RequestState, u64)>, StoreError>;
    /// How many of the agent's requests are not finished yet.
    async fn open_requests(&self, agent: &str) -> Result<u64, StoreError>;
    /// Dead letters, newest first: of one agent, or of all.
    async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;
    async fn dead_letter_count(&self) -> Result<u64, StoreError>;
    /// Where the rollup pass stands: the position of the last result it added.
    async fn rollup_cursor(&self) -> Result<i64, StoreError>;
    /// Merges `rows` into the stored rollups (`rollup::merge_bodies` where a row
    /// exists) and moves the rollup cursor from `from` to `to`, in one transaction.
    /// False, with nothing written, when the cursor is no longer at `from` (another
    /// backend's pass got there first).
    async fn merge_rollups(
        &self,
        from: i64,
        to: i64,
        rows: Vec<RollupRow>,
    ) -> Result<bool, StoreError>;
    /// Rollups by agent, module, target and hours `[since, until)`, oldest hour
    /// first, at most `limit`.
    async fn rollups(&self, f: RollupFilter) -> Result<Vec<RollupRow>, StoreError>;
    /// Deletes up to `limit` rollups of hours before `before_ms`; how many went.
    async fn prune_rollups(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;
    /// Deletes raw records, oldest first (see [`PruneRecords`]). Returns how many went
    /// and the position of the last one (or `after` when none did).
    async fn prune_records(&self, p: PruneRecords) -> Result<(u64, i64), StoreError>;
    /// Deletes, at most `limit` rows of each, what records leave behind from before
    /// `before_ms`: runs' duplicate guards (`run_results`), finished requests with
    /// their transitions (unfinished ones stay), and closed connection sessions.
    /// Returns the rows deleted.
    async fn prune_bookkeeping(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;
    /// The store's size and its oldest result.
    async fn store_stats(&self) -> Result<StoreStats, StoreError>;
    /// Gives space back: SQLite returns up to `pages` free pages to the file system
    /// (incremental vacuum); PostgreSQL drops whole monthly partitions of `records`
    /// whose month ended before `before_ms` and whose records are all at or below
    /// position `up_to` (rolled up). Says what it did, a line each.
    async fn release_space(
        &self,
        pages: u32,
        before_ms: i64,
        up_to: i64,
    ) -> Result<Vec<String>, StoreError>;
}

/// Which raw records [`RequestStore::prune_records`] deletes: those stored before
/// `stored_before_ms`, at positions in (`after`, `up_to`], of module `only`, or
/// (when `only` is None) of no module in `except` (states and events have no module
/// and go by this rule), at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct PruneRecords {
    pub only: Option<String>,
    pub except: Vec<String>,
    pub stored_before_ms: i64,
    pub after: i64,
    pub up_to: i64,
    pub limit: u32,
}

/// How big the store is and how far back it goes.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StoreStats {
    /// Bytes in use (SQLite: pages holding data, not free ones; PostgreSQL: the
    /// database's size).
    pub bytes: u64,
    /// When the oldest stored result arrived (ms since the epoch).
    pub oldest_result_ms: Option<i64>,
    /// Whether deleting records makes `bytes` smaller (SQLite: yes; PostgreSQL: no,
    /// only dropping partitions does).
    #[serde(skip)]
    pub shrinks_on_delete: bool,
}

/// One hour of one agent's results toward one target of one module
/// (`rollup::Rollup` as JSON in `body`).
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub agent_id: String,
    pub module: String,
    pub target: String,
    pub hour_ms: i64,
    pub body: String,
}

/// Which rollups to read.
#[derive(Debug, Clone, Default)]
pub struct RollupFilter {
    pub agent: Option<String>,
    pub module: Option<String>,
    pub target: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only rollups after this one in the listing's order (hour, agent, module,
    /// target): where the last page ended.
    pub after: Option<(i64, String, String, String)>,
    pub limit: u32,
}

/// Fleet measurements and recurring schedules: the measurements, each agent's schedule
/// set and version, and the runs stored per schedule.
#[async_trait]
pub trait MeasurementStore: Send + Sync + 'static {
    async fn create_measurement(&self, m: MeasurementRow) -> Result<(), StoreError>;
    /// Stores a recurring measurement and its agents' parts, and gives each agent a new
    /// schedule version, in one transaction. Returns each agent's new version.
    async fn create_schedule(
        &self,
        m: MeasurementRow,
        agents: Vec<(String, AgentSchedule)>,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Stops a recurring measurement: its agents get a new schedule version without
    /// it. Returns them with their versions (none if it was already stopped).
    async fn stop_schedule(&self, id: &str, at_ms: i64) -> Result<Vec<(String, u64)>, StoreError>;
    /// The agent's current schedule version and the recurring measurements it runs.
    async fn agent_schedules(&self, agent: &str) -> Result<(u64, Vec<AgentSchedule>), StoreError>;
    /// Moves the agent's schedule version past `seen` (an agent reported a version
    /// this store never gave, e.g. after the store was replaced). Returns the version.
    /// Err for `seen` above [`MAX_SCHEDULE_VERSION`]: the agent is broken or hostile.
    async fn raise_schedule_version(&self, agent: &str, seen: u64) -> Result<u64, StoreError>;
    /// Each agent of a recurring measurement, with the runs stored so far.
    async fn schedule_progress(&self, id: &str) -> Result<Vec<ScheduleProgress>, StoreError>;
    async fn measurement(&self, id: &str) -> Result<Option<MeasurementRow>, StoreError>;
    /// The measurement's requests, each with its result if one is stored.
    async fn measurement_requests(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestRow, Option<ResultRow>)>, StoreError>;
}

/// Credentials (enrolled agents and API tokens, by hash) and API tokens' spend against
/// their budgets.
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    /// Every credential, revoked ones included.
    async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError>;
    /// Adds or replaces the credential (kind, id).
    async fn put_credential(&self, row: CredentialRow) -> Result<(), StoreError>;
    /// Adds `probes` to the token's spend on `day` (days since the Unix epoch, UTC)
    /// and returns the day's new total, saturating at the store's largest integer.
    /// Atomic: concurrent adds (several backends) are all counted.
    async fn add_spend(&self, token: &str, day: i64, probes: u64) -> Result<u64, StoreError>;
    /// The token's spend on `day`, and the recurring measurements it owns that are
    /// running at `now_ms` (not stopped, deadline after `now_ms`).
    async fn token_usage(
        &self,
        token: &str,
        day: i64,
        now_ms: i64,
    ) -> Result<TokenUsage, StoreError>;
}

/// Releases (signed agent binaries) and the fleet's lifecycle state: rollouts, each
/// agent's reported update and configuration state, and desired configurations, kept
/// as JSON documents by (kind, key).
///
/// Document kinds, keys and text go through [`nul_free`] on the way in (lookups too),
/// as other columns of their own do: a NUL reads back as [`NUL_ESCAPE`] in both stores.
/// A release's text is kept exactly or refused (see [`ReleaseRow`]'s fields).
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Stores a release and its bytes. Idempotent: the same sha256 again (as the same
    /// (name, version, arch)) returns Ok(false) and changes nothing. Another sha256 for
    /// a (name, version, arch) already stored is refused: Err(StoreError::Db("release
    /// NAME VERSION for ARCH is already stored with another file (sha256 …)")); so is a
    /// file already stored as another (name, version, arch) (one row per sha256), and
    /// text with NUL in it (kept exactly or not at all). Returns Ok(true) when stored.
    async fn put_release(&self, row: ReleaseRow, bytes: Vec<u8>) -> Result<bool, StoreError>;
    /// Every release, newest added first (then by sha256), without their bytes.
    async fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError>;
    /// A release by (version, arch) with name "imn-agent" ([`AGENT_RELEASE_NAME`]), if
    /// stored.
    async fn release(&self, version: &str, arch: &str) -> Result<Option<ReleaseRow>, StoreError>;
    /// A release's file, by its sha256.
    async fn release_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Adds or replaces the document (kind, key).
    async fn put_doc(
        &self,
        kind: &str,
        key: &str,
        doc: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// The document (kind, key), if stored.
    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError>;
    /// Every document of a kind as (key, doc), by key (byte-wise, in both stores).
    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// The documents of a kind with these keys, as (key, doc) by key, in one read (a
    /// page of a list needs its agents' documents, not the fleet's).
    async fn docs_of(
        &self,
        kind: &str,
        keys: &[String],
    ) -> Result<Vec<(String, String)>, StoreError>;
    /// Removes the document (kind, key); whether there was one.
    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError>;
    /// Compare and set: writes `doc` as (kind, key) only if the stored document is
    /// `expect` (None: there is none), in one statement, so of several backends
    /// racing on one database exactly one wins. Whether it was written.
    async fn swap_doc(
        &self,
        kind: &str,
        key: &str,
        expect: Option<&str>,
        doc: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
}

/// Everything a backend keeps: one of each store, behind one object
/// (`Arc<dyn Store>`). Implemented for every type that implements them all.
///
/// A method of a part is called on `dyn Store` (or a `T: Store`) with only `Store` in
/// scope; on a concrete store (e.g. [`SqliteStore`]) the part's trait must be in scope:
/// `use crate::store::prelude::*` brings them all.
pub trait Store:
    AgentStore + RequestStore + MeasurementStore + CredentialStore + FleetStore + Send + Sync + 'static
{
}

impl<T> Store for T where
    T: AgentStore
        + RequestStore
        + MeasurementStore
        + CredentialStore
        + FleetStore
        + Send
        + Sync
        + 'static
{
}

/// The store traits, for `use crate::store::prelude::*`.
pub mod prelude {
    pub use super::{
        AgentStore, CredentialStore, FleetStore, MeasurementStore, RequestStore, Store,
    };
}
