//! The wire protocol between agents and the cloud. Every payload is one version byte
//! followed by a postcard-encoded [`Envelope`]. Topics and subjects keep `v1`: they
//! name the protocol family, the byte names the encoding.
//!
//! Postcard is not self-describing, so a struct cannot gain a field without a new
//! encoding. Version 2 added the agent's features and budgets to [`Hello`] and an issue
//! time and the measurement policy to [`Command`]. Both ends still read version 1
//! ([`legacy`]), and the backend answers each agent in the version of its last hello, so
//! a fleet is upgraded backend first, agents after, with every agent reachable
//! throughout (an over-the-air update needs the old agent to hear its command).
//! Enum variants are only ever appended, so records stored by older agents decode.

use serde::{Deserialize, Serialize};

use crate::policy::TargetPolicy;
use crate::results::{ModuleOutcome, SystemSnapshot};

/// The version byte this build writes.
pub const WIRE_VERSION: u8 = 2;
/// The oldest version byte this build still reads and can write.
pub const LEGACY_WIRE_VERSION: u8 = 1;

/// The longest agent id. Ids become MQTT topic levels and NATS subject tokens.
pub const MAX_AGENT_ID_LEN: usize = 64;

/// The kinds of message, one per MQTT topic suffix and NATS subject prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Up: identity and capabilities, sent on every connect.
    Hello,
    /// Up: periodic health (QoS 0).
    Heartbeat,
    /// Up: a batch of outbox records.
    Out,
    /// Up: `online` / `offline`, retained; `offline` is the last will.
    Status,
    /// Down: which records the backend has stored.
    Ack,
    /// Down: run, cancel, and other commands.
    Cmd,
    /// Up: what the agent runs (version, settings version, update state), after every
    /// hello; and requests for a release's bytes.
    Update,
}

impl Kind {
    pub const UPLINK: [Kind; 5] = [
        Kind::Hello,
        Kind::Heartbeat,
        Kind::Out,
        Kind::Status,
        Kind::Update,
    ];
    pub const DOWNLINK: [Kind; 2] = [Kind::Ack, Kind::Cmd];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Heartbeat => "hb",
            Kind::Out => "out",
            Kind::Status => "status",
            Kind::Ack => "ack",
            Kind::Cmd => "cmd",
            Kind::Update => "upd",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "hello" => Kind::Hello,
            "hb" => Kind::Heartbeat,
            "out" => Kind::Out,
            "status" => Kind::Status,
            "ack" => Kind::Ack,
            "cmd" => Kind::Cmd,
            "upd" => Kind::Update,
            _ => return None,
        })
    }

    pub fn is_uplink(self) -> bool {
        Kind::UPLINK.contains(&self)
    }
}

/// `imn/v1/{agent}/{kind}`
pub fn topic(agent: &str, kind: Kind) -> String {
    format!("imn/v1/{agent}/{}", kind.as_str())
}

/// The filter matching one kind of topic for every agent: `imn/v1/+/{kind}`.
pub fn topic_filter(kind: Kind) -> String {
    format!("imn/v1/+/{}", kind.as_str())
}

/// Splits `imn/v1/{agent}/{kind}` into its agent id and kind.
pub fn parse_topic(topic: &str) -> Option<(&str, Kind)> {
    let rest = topic.strip_prefix("imn/v1/")?;
    let (agent, kind) = rest.split_once('/')?;
    if !valid_agent_id(agent) {
        return None;
    }
    Some((agent, Kind::parse(kind)?))
}

/// `imn.v1.{kind}.{agent}`
pub fn subject(kind: Kind, agent: &str) -> String {
    format!("imn.v1.{}.{agent}", kind.as_str())
}

/// Splits `imn.v1.{kind}.{agent}` into its kind and agent id.
pub fn parse_subject(subject: &str) -> Option<(Kind, &str)> {
    let rest = subject.strip_prefix("imn.v1.")?;
    let (kind, agent) = rest.split_once('.')?;
    if !valid_agent_id(agent) {
        return None;
    }
    Some((Kind::parse(kind)?, agent))
}

/// Agent ids are 1 to 64 characters of `A-Z a-z 0-9 _ -`: safe as an MQTT topic level,
/// a NATS subject token and a directory name.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Every message between agent and cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    Hello(Hello),
    Heartbeat(Heartbeat),
    Batch(Batch),
    Ack(Ack),
    Command(Command),
    Status(Status),
    /// Up, on `upd`: the agent's lifecycle state, or a request for release bytes.
    /// Appended last: every older envelope keeps its encoding.
    Update(UpdateUp),
    /// Down, on `cmd`: bytes of a release an agent asked for. Not a command: it is
    /// not logged or deduplicated, and a lost one is asked for again.
    Chunk(Chunk),
}

/// What an agent says on `upd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UpdateUp {
    /// After every hello, and when its update state changes.
    Status(LifecycleStatus),
    /// `len` bytes of the release with this SHA-256 from `offset`. The backend answers
    /// with one [`Chunk`] of at most [`MAX_CHUNK`] bytes.
    Fetch {
        sha256: String,
        offset: u64,
        len: u32,
    },
}

/// The agent settings an operator may change remotely (`CommandKind::Settings`), by
/// their TOML names: how the agent talks, buffers and describes itself. Identity,
/// token, TLS files, the data directory and the update keys stay local. The agent and
/// the backend both refuse any other key.
pub const REMOTE_SETTINGS: &[&str] = &[
    "broker",
    "nameservers",
    "tags",
    "heartbeat_ms",
    "keepalive_s",
    "batch_max_bytes",
    "window",
    "resend_timeout_ms",
    "outbox_max_bytes",
    "outbox_memory_bytes",
    "disk_reserve_bytes",
    "live_first",
    "max_runs",
    "max_queued_runs",
    "max_probe_rate",
    "country",
    "city",
    "latitude",
    "longitude",
    "asn",
    "update_rate",
];

/// The most release bytes one chunk carries.
pub const MAX_CHUNK: u32 = 64 * 1024;

/// What an agent runs, and where its update and settings stand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LifecycleStatus {
    pub version: String,
    pub arch: String,
    /// The version of the remote settings it runs (0: none).
    pub settings_version: u64,
    /// `idle`, `downloading`, `staged`, `trial`, `unsupervised`.
    pub phase: String,
    /// The release version it is moving to, while it is.
    pub target: Option<String>,
    /// Bytes of the target downloaded so far, and its size.
    pub downloaded: u64,
    pub size: u64,
    /// The last update or settings change that failed or was refused, with why
    /// (`update_failed: …`, `update_refused: …`, `settings_failed: …`), until the
    /// next one succeeds.
    pub last_failure: Option<String>,
    /// The version (release or settings) that failed, and the rollout that offered
    /// it, so a rollout knows the failure is its own.
    pub failed_version: Option<String>,
    pub failed_rollout: Option<String>,
    pub sent_at_ms: i64,
}

/// Bytes of a release, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub sha256: String,
    pub offset: u64,
    /// The release's size.
    pub total: u64,
    pub data: Vec<u8>,
    /// Set when the backend has no such release or range.
    pub error: Option<String>,
}

/// A module as the agent has it loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    pub version: String,
    /// Hash of the module's parameter schema, so the backend can tell a stale agent.
    pub schema_hash: String,
    /// The module's runtime settings, if an operator changed them.
    pub config: Option<ModuleConfig>,
}

/// Where an agent is, when its operator configured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Location {
    pub country: Option<String>,
    pub city: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub asn: Option<u32>,
}

/// What an agent says it does, in its hello (version 2 on). Unknown features are
/// ignored, so a feature can be announced before the backend reads it.
pub mod features {
    /// Checks every address against the policy its commands and schedules carry.
    pub const POLICY: &str = "policy";
    /// Enforces its [`super::AgentLimits`]: runs beyond them wait.
    pub const BUDGETS: &str = "budgets";
    /// Refuses commands that are stale (issued too long ago) or repeated.
    pub const FRESH_COMMANDS: &str = "fresh_commands";
}

/// The agent's own budget across all its runs, in its hello and `GET /agents/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentLimits {
    /// Runs at once; more wait in its queue.
    pub max_runs: u32,
    /// Runs waiting at most; past it a command's run fails at once.
    pub max_queued_runs: u32,
    /// Probes per second across every run; a run whose rate does not fit waits.
    pub max_probe_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_id: String,
    pub version: String,
    /// `std::env::consts::ARCH` of the agent binary.
    pub arch: String,
    pub modules: Vec<ModuleInfo>,
    pub tags: Vec<String>,
    pub location: Option<Location>,
    /// The version of the schedule set the agent runs (0: none yet); the backend
    /// sends the current set when it differs.
    pub schedule_version: u64,
    /// The outbox's random epoch; record ids are (agent, epoch, seq).
    pub outbox_epoch: u64,
    /// Records still waiting for the backend's ack.
    pub outbox_depth: u64,
    /// Records the outbox had to evict, since it was created.
    pub dropped: u64,
    /// The agent's heartbeat period; the backend counts it dead after three.
    pub heartbeat_interval_ms: u64,
    pub sent_at_ms: i64,
    /// What this agent does beyond version 1 ([`features`]); empty for a version 1 agent.
    /// (`default`: hellos the stores kept as JSON before version 2 lack it.)
    #[serde(default)]
    pub features: Vec<String>,
    /// Its budget across runs (all zero for a version 1 agent: unknown).
    #[serde(default)]
    pub limits: AgentLimits,
    /// [`TargetPolicy::digest`] of the rules its schedule set carries (0: none).
    #[serde(default)]
    pub schedule_policy: u64,
}

impl Hello {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sent_at_ms: i64,
    pub system: SystemSnapshot,
    pub outbox_depth: u64,
    /// Age of the oldest unacked record, in ms (0 when the outbox is empty).
    pub outbox_oldest_age_ms: u64,
    pub dropped: u64,
    /// Why the outbox cannot write to disk (`disk_full`, `write_error: …`), if it can't.
    pub outbox_condition: Option<String>,
}

/// A batch of outbox records, in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub epoch: u64,
    pub records: Vec<Record>,
}

/// One durable outbox record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// When the agent created the record (ms since epoch, agent clock).
    pub at_ms: i64,
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    /// A request moved to a new state on the agent.
    State(StateChange),
    /// A module run finished.
    Result(ModuleResult),
    /// Something the operator should know (corrupt store, dropped records, …).
    Event(AgentEvent),
    /// A module run finished, for a command that carried a W3C trace context: the
    /// agent hands the context back, so the backend places the run, its time in the
    /// outbox and its storage in the request's trace. Appended after `Event`, so every
    /// record written before it existed still decodes.
    TracedResult(ModuleResult, String),
    /// A run of a recurring measurement, made by the agent from its own copy of the
    /// schedule (online or not). Appended after `TracedResult` for the same reason.
    ScheduledResult(ScheduledRun),
}

/// One run of a schedule: which measurement, which slot, and the run's result. The
/// result's `request_id` is [`ScheduledRun::run_id`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledRun {
    pub measurement_id: String,
    /// The slot's time on the schedule (ms since the epoch), before jitter: a run is
    /// identified by its measurement, its agent and this.
    pub scheduled_ms: i64,
    pub result: ModuleResult,
}

impl ScheduledRun {
    /// The id a scheduled run's result carries in place of a request id.
    pub fn run_id(measurement_id: &str, scheduled_ms: i64) -> String {
        format!("{measurement_id}@{scheduled_ms}")
    }
}

/// A recurring measurement as an agent runs it: slots at `start_ms + k × interval_ms`
/// up to `stop_ms`, each delayed by up to `jitter_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub measurement_id: String,
    pub module: String,
    /// Parameters as JSON text, already validated for this agent by the backend.
    pub params_json: String,
    pub timeout_ms: u64,
    pub interval_ms: u64,
    pub start_ms: i64,
    /// The last slot is before this; `None` runs until the schedule is removed.
    pub stop_ms: Option<i64>,
    pub jitter_ms: u64,
}

impl RecordBody {
    /// A result, under its command's trace context if it had one.
    pub fn result(result: ModuleResult, traceparent: Option<String>) -> RecordBody {
        match traceparent {
            Some(tp) => RecordBody::TracedResult(result, tp),
            None => RecordBody::Result(result),
        }
    }

    /// The module result this record carries, if it is one.
    pub fn as_result(&self) -> Option<&ModuleResult> {
        match self {
            RecordBody::Result(r) | RecordBody::TracedResult(r, _) => Some(r),
            RecordBody::ScheduledResult(run) => Some(&run.result),
            _ => None,
        }
    }

    /// The trace context a result came back with.
    pub fn traceparent(&self) -> Option<&str> {
        match self {
            RecordBody::TracedResult(_, tp) => Some(tp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    pub request_id: String,
    pub state: RequestState,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleResult {
    pub request_id: String,
    pub module: String,
    pub received_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub outcome: ModuleOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub kind: String,
    pub message: String,
}

/// Which records the backend has stored: every seq in the inclusive ranges, for one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub epoch: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl Ack {
    /// Collapses sorted or unsorted seqs into inclusive ranges.
    pub fn from_seqs(epoch: u64, seqs: impl IntoIterator<Item = u64>) -> Ack {
        let set: crate::ranges::RangeSet = seqs.into_iter().collect();
        Ack {
            epoch,
            ranges: set.iter().collect(),
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= seq && seq <= hi)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command; for `Run` it is the request id. An agent never runs an id twice.
    pub id: String,
    pub kind: CommandKind,
    /// W3C trace context of the request that caused the command.
    pub traceparent: Option<String>,
    /// Past this time (ms since epoch) the agent does not start the command.
    pub deadline_ms: Option<i64>,
    /// When the backend issued this sending of the command (ms since the epoch): an
    /// agent refuses a control command issued too long ago, so a captured one cannot
    /// be replayed later. 0 from a version 1 backend.
    pub issued_ms: i64,
    /// The rules the backend checked a `Run` or `Schedules` against, for the agent to
    /// check every address it sends to (after its own resolution, after each redirect).
    pub policy: Option<TargetPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandKind {
    Run {
        module: String,
        /// Parameters as JSON text, already validated against the module's schema.
        params_json: String,
        /// How long the module may run before it is cancelled and reported `timeout`.
        timeout_ms: u64,
    },
    Cancel {
        request_id: String,
    },
    /// Makes a module available on the agent, with no restart.
    Load {
        module: String,
    },
    /// Takes a module away; requests for it then fail until it is loaded again.
    Unload {
        module: String,
    },
    /// Sets a module's default parameters and limits.
    Configure {
        module: String,
        config: ModuleConfig,
    },
    /// The agent's recurring measurements, whole (desired state): the agent keeps the
    /// set with the highest version it has seen, stores it, and runs it from there,
    /// connected or not. Appended last, so older commands keep their encoding.
    Schedules {
        version: u64,
        schedules: Vec<Schedule>,
    },
    /// Run this release (desired state, from a rollout): its signed manifest. The
    /// agent checks it against its own trusted keys, fetches the bytes with
    /// [`UpdateUp::Fetch`], checks them, and installs on trial. Appended last.
    Update {
        rollout: String,
        manifest: crate::release::SignedManifest,
    },
    /// The agent's remote settings (desired state), whole: `key = value` in the
    /// agent's TOML names. The agent tries them and keeps them only if it reconnects.
    Settings {
        version: u64,
        settings: Vec<(String, String)>,
    },
    /// Load this WebAssembly module (`crate::wasm`): the whole signed package file.
    /// The agent checks it against its own trusted keys (`update_keys`), keeps it on
    /// disk, and loads it again at every start. Unloaded with `Unload`. Appended last.
    LoadWasm {
        package: Vec<u8>,
    },
}

/// Per-module settings an operator can change at runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleConfig {
    /// JSON object merged under each request's parameters (the request wins), by the
    /// backend, before it validates the request and checks its limits and policy.
    pub defaults_json: Option<String>,
    /// Upper bound on a run's probe rate (probes/s), for modules that probe.
    pub max_rate: Option<f64>,
    /// Deadline of one run, replacing the catalog's default.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    pub at_ms: i64,
}

/// Request states, in the order a request moves through them (ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestState {
    Pending,
    Dispatched,
    Received,
    Running,
    Succeeded,
    Failed,
    Timeout,
    Expired,
    Cancelled,
}

impl RequestState {
    pub const ALL: [RequestState; 9] = [
        RequestState::Pending,
        RequestState::Dispatched,
        RequestState::Received,
        RequestState::Running,
        RequestState::Succeeded,
        RequestState::Failed,
        RequestState::Timeout,
        RequestState::Expired,
        RequestState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Dispatched => "dispatched",
            RequestState::Received => "received",
            RequestState::Running => "running",
            RequestState::Succeeded => "succeeded",
            RequestState::Failed => "failed",
            RequestState::Timeout => "timeout",
            RequestState::Expired => "expired",
            RequestState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RequestState> {
        RequestState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Position in the lifecycle; a request never moves to a lower rank.
    pub fn rank(self) -> u8 {
        match self {
            RequestState::Pending => 0,
            RequestState::Dispatched => 1,
            RequestState::Received => 2,
            RequestState::Running => 3,
            _ => 4,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 4
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// A short stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Version(_) => "version",
            DecodeError::Malformed(_) => "malformed",
        }
    }
}

/// Encodes an envelope as one version byte plus postcard.
pub fn encode(env: &Envelope) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // Serialising into a Vec only fails on a type postcard cannot express; every wire
    // type is plain data, so this is an invariant, checked by the round-trip tests.
    postcard::to_io(env, &mut out).expect("wire types are always postcard-serialisable");
    out
}

/// Encodes an envelope for a peer that speaks `version` (this build's, or
/// [`LEGACY_WIRE_VERSION`]); what version 1 cannot carry is left out.
pub fn encode_for(version: u8, env: &Envelope) -> Vec<u8> {
    if version != LEGACY_WIRE_VERSION {
        return encode(env);
    }
    // Version 1 has no lifecycle envelopes: a peer that old neither asks for release
    // bytes nor reports its lifecycle, so these go in this build's version (and the
    // old peer refuses them as it refuses any envelope it does not know).
    let Some(old) = legacy::Envelope::from_current(env.clone()) else {
        return encode(env);
    };
    let mut out = vec![LEGACY_WIRE_VERSION];
    postcard::to_io(&old, &mut out).expect("wire types are always postcard-serialisable");
    out
}

/// Decodes a payload. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    decode_versioned(bytes).map(|(_, env)| env)
}

/// Decodes a payload of either version, and says which it was.
pub fn decode_versioned(bytes: &[u8]) -> Result<(u8, Envelope), DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match version {
        WIRE_VERSION => Ok((version, whole::<Envelope>(body)?)),
        LEGACY_WIRE_VERSION => Ok((version, whole::<legacy::Envelope>(body)?.into())),
        v => Err(DecodeError::Version(v)),
    }
}

/// One postcard value that takes the whole of `body`.
fn whole<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (v, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the envelope",
            rest.len()
        )));
    }
    Ok(v)
}

/// Version 1 of the two envelopes that changed, frozen: read from agents and backends
/// that have not been upgraded, and written to them.
pub mod legacy {
    use serde::{Deserialize, Serialize};

    use super::{Ack, AgentLimits, Batch, CommandKind, Heartbeat, Location, ModuleInfo, Status};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Envelope {
        Hello(Hello),
        Heartbeat(Heartbeat),
        Batch(Batch),
        Ack(Ack),
        Command(Command),
        Status(Status),
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Hello {
        pub agent_id: String,
        pub version: String,
        pub arch: String,
        pub modules: Vec<ModuleInfo>,
        pub tags: Vec<String>,
        pub location: Option<Location>,
        pub schedule_version: u64,
        pub outbox_epoch: u64,
        pub outbox_depth: u64,
        pub dropped: u64,
        pub heartbeat_interval_ms: u64,
        pub sent_at_ms: i64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Command {
        pub id: String,
        pub kind: CommandKind,
        pub traceparent: Option<String>,
        pub deadline_ms: Option<i64>,
    }

    impl From<Envelope> for super::Envelope {
        fn from(e: Envelope) -> super::Envelope {
            match e {
                Envelope::Hello(h) => super::Envelope::Hello(super::Hello {
                    agent_id: h.agent_id,
                    version: h.version,
                    arch: h.arch,
                    modules: h.modules,
                    tags: h.tags,
                    location: h.location,
                    schedule_version: h.schedule_version,
                    outbox_epoch: h.outbox_epoch,
                    outbox_depth: h.outbox_depth,
                    dropped: h.dropped,
                    heartbeat_interval_ms: h.heartbeat_interval_ms,
                    sent_at_ms: h.sent_at_ms,
                    features: Vec::new(),
                    limits: AgentLimits::default(),
                    schedule_policy: 0,
                }),
                Envelope::Heartbeat(h) => super::Envelope::Heartbeat(h),
                Envelope::Batch(b) => super::Envelope::Batch(b),
                Envelope::Ack(a) => super::Envelope::Ack(a),
                Envelope::Command(c) => super::Envelope::Command(super::Command {
                    id: c.id,
                    kind: c.kind,
                    traceparent: c.traceparent,
                    deadline_ms: c.deadline_ms,
                    issued_ms: 0,
                    policy: None,
                }),
                Envelope::Status(s) => super::Envelope::Status(s),
            }
        }
    }

    impl Envelope {
        /// The version 1 form of an envelope; None for the envelopes version 1 lacks.
        pub fn from_current(e: super::Envelope) -> Option<Envelope> {
            Some(match e {
                super::Envelope::Hello(h) => Envelope::Hello(Hello {
                    agent_id: h.agent_id,
                    version: h.version,
                    arch: h.arch,
                    modules: h.modules,
                    tags: h.tags,
                    location: h.location,
                    schedule_version: h.schedule_version,
                    outbox_epoch: h.outbox_epoch,
                    outbox_depth: h.outbox_depth,
                    dropped: h.dropped,
                    heartbeat_interval_ms: h.heartbeat_interval_ms,
                    sent_at_ms: h.sent_at_ms,
                }),
                super::Envelope::Heartbeat(h) => Envelope::Heartbeat(h),
                super::Envelope::Batch(b) => Envelope::Batch(b),
                super::Envelope::Ack(a) => Envelope::Ack(a),
                super::Envelope::Command(c) => Envelope::Command(Command {
                    id: c.id,
                    kind: c.kind,
                    traceparent: c.traceparent,
                    deadline_ms: c.deadline_ms,
                }),
                super::Envelope::Status(s) => Envelope::Status(s),
                super::Envelope::Update(_) | super::Envelope::Chunk(_) => return None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{EchoResult, ModuleOutput};

    fn sample_batch() -> Envelope {
        Envelope::Batch(Batch {
            epoch: 7,
            records: vec![
                Record {
                    seq: 1,
                    at_ms: 10,
                    body: RecordBody::State(StateChange {
                        request_id: "r1".into(),
                        state: RequestState::Running,
                        detail: None,
                    }),
                },
                Record {
                    seq: 2,
                    at_ms: 11,
                    body: RecordBody::Result(ModuleResult {
                        request_id: "r1".into(),
                        module: "echo_module".into(),
                        received_ms: 9,
                        started_ms: 10,
                        finished_ms: 11,
                        outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                            message: "hi".into(),
                        })),
                    }),
                },
            ],
        })
    }

    #[test]
    fn round_trip() {
        let env = sample_batch();
        let bytes = encode(&env);
        assert_eq!(bytes[0], WIRE_VERSION);
        assert_eq!(decode(&bytes).unwrap(), env);
    }

    /// A traced result round-trips; the variants written before it keep their
    /// encoding (an outbox on disk from an older agent still decodes: the bytes of a
    /// plain result are pinned here).
    #[test]
    fn traced_results_round_trip_and_plain_results_keep_their_bytes() {
        let Envelope::Batch(mut batch) = sample_batch() else {
            unreachable!()
        };
        let plain = postcard::to_stdvec(&batch.records[1]).unwrap();
        assert_eq!(
            plain,
            [
                2, 22, 1, 2, b'r', b'1', 11, b'e', b'c', b'h', b'o', b'_', b'm', b'o', b'd', b'u',
                b'l', b'e', 18, 20, 22, 0, 0, 2, b'h', b'i'
            ],
            "the encoding of RecordBody::Result changed: stored outboxes would not decode"
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let result = batch.records[1].body.as_result().unwrap().clone();
        batch.records[1].body = RecordBody::result(result.clone(), Some(tp.into()));
        let env = Envelope::Batch(batch);
        let back = decode(&encode(&env)).unwrap();
        assert_eq!(back, env);
        let Envelope::Batch(b) = back else {
            unreachable!()
        };
        assert_eq!(b.records[1].body.traceparent(), Some(tp));
        assert_eq!(b.records[1].body.as_result(), Some(&result));
        assert_eq!(b.records[0].body.as_result(), None);
        assert_eq!(
            RecordBody::result(result.clone(), None),
            RecordBody::Result(result)
        );
    }

    /// Schedules and scheduled results round-trip; a scheduled result is a result.
    #[test]
    fn schedules_and_scheduled_results_round_trip() {
        let sched = Envelope::Command(Command {
            id: "c".into(),
            kind: CommandKind::Schedules {
                version: 3,
                schedules: vec![Schedule {
                    measurement_id: "m".into(),
                    module: "echo_module".into(),
                    params_json: "{}".into(),
                    timeout_ms: 1000,
                    interval_ms: 2000,
                    start_ms: 5,
                    stop_ms: Some(10_000),
                    jitter_ms: 100,
                }],
            },
            traceparent: None,
            deadline_ms: None,
            issued_ms: 5,
            policy: None,
        });
        assert_eq!(decode(&encode(&sched)).unwrap(), sched);
        let Envelope::Batch(mut batch) = sample_batch() else {
            unreachable!()
        };
        let mut result = batch.records[1].body.as_result().unwrap().clone();
        result.request_id = ScheduledRun::run_id("m", 2005);
        assert_eq!(result.request_id, "m@2005");
        batch.records[1].body = RecordBody::ScheduledResult(ScheduledRun {
            measurement_id: "m".into(),
            scheduled_ms: 2005,
            result: result.clone(),
        });
        let env = Envelope::Batch(batch);
        let back = decode(&encode(&env)).unwrap();
        assert_eq!(back, env);
        let Envelope::Batch(b) = back else {
            unreachable!()
        };
        assert_eq!(b.records[1].body.as_result(), Some(&result));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        let mut bytes = encode(&sample_batch());
        bytes[0] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::Version(9)));
        let good = encode(&sample_batch());
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "truncated at {cut} decoded");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::Malformed(_))));
        // A huge claimed length must not allocate or panic.
        assert!(decode(&[WIRE_VERSION, 2, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    fn hello() -> Hello {
        Hello {
            agent_id: "a-1".into(),
            version: "0.1.0".into(),
            arch: "x86_64".into(),
            modules: vec![],
            tags: vec!["lab".into()],
            location: None,
            schedule_version: 3,
            outbox_epoch: 9,
            outbox_depth: 0,
            dropped: 0,
            heartbeat_interval_ms: 1000,
            sent_at_ms: 77,
            features: vec![features::POLICY.into()],
            limits: AgentLimits {
                max_runs: 4,
                max_queued_runs: 1000,
                max_probe_rate: 1000.0,
            },
            schedule_policy: 7,
        }
    }

    /// Version 1 peers: their hellos and commands decode (the new fields empty), and
    /// what is written for them is what a version 1 build reads. The version 1 bytes
    /// of a command are pinned: an agent in the field must keep understanding them.
    #[test]
    fn version_1_peers_are_read_and_written() {
        let cmd = Envelope::Command(Command {
            id: "c".into(),
            kind: CommandKind::Cancel {
                request_id: "r".into(),
            },
            traceparent: None,
            deadline_ms: Some(5),
            issued_ms: 4,
            policy: Some(TargetPolicy {
                rules: vec![],
                builtin: true,
            }),
        });
        let v1 = encode_for(LEGACY_WIRE_VERSION, &cmd);
        assert_eq!(v1, [1, 4, 1, b'c', 1, 1, b'r', 0, 1, 10]);
        let (version, back) = decode_versioned(&v1).unwrap();
        assert_eq!(version, LEGACY_WIRE_VERSION);
        let Envelope::Command(back) = back else {
            panic!("{back:?}")
        };
        assert_eq!(
            (back.issued_ms, back.policy),
            (0, None),
            "v1 cannot carry them"
        );
        let v2 = encode_for(WIRE_VERSION, &cmd);
        assert_eq!(v2[0], WIRE_VERSION);
        assert_eq!(decode_versioned(&v2).unwrap(), (WIRE_VERSION, cmd));

        let h = hello();
        let old = encode_for(LEGACY_WIRE_VERSION, &Envelope::Hello(h.clone()));
        let Ok((1, Envelope::Hello(read))) = decode_versioned(&old) else {
            panic!("a version 1 hello must decode")
        };
        assert!(read.features.is_empty() && read.limits == AgentLimits::default());
        assert_eq!(
            Hello {
                features: h.features.clone(),
                limits: h.limits.clone(),
                schedule_policy: h.schedule_policy,
                ..read
            },
            h
        );
        assert_eq!(
            decode(&encode(&Envelope::Hello(h.clone()))).unwrap(),
            Envelope::Hello(h.clone())
        );
        assert!(h.has(features::POLICY) && !h.has(features::BUDGETS));
        // A batch is the same in both versions.
        let b = sample_batch();
        assert_eq!(
            encode_for(LEGACY_WIRE_VERSION, &b)[1..],
            encode(&b)[1..],
            "batches did not change"
        );
    }

    #[test]
    fn topics_and_subjects() {
        assert_eq!(topic("a-1", Kind::Out), "imn/v1/a-1/out");
        assert_eq!(parse_topic("imn/v1/a-1/hb"), Some(("a-1", Kind::Heartbeat)));
        assert_eq!(parse_topic("imn/v1/a+1/hb"), None);
        assert_eq!(parse_topic("imn/v1/a/b/hb"), None);
        assert_eq!(parse_topic("imn/v2/a/hb"), None);
        assert_eq!(subject(Kind::Cmd, "x"), "imn.v1.cmd.x");
        assert_eq!(parse_subject("imn.v1.cmd.x"), Some((Kind::Cmd, "x")));
        assert_eq!(parse_subject("imn.v1.cmd.x.y"), None);
        assert!(!valid_agent_id(""));
        assert!(!valid_agent_id(&"a".repeat(65)));
        assert!(!valid_agent_id("a.b"));
    }

    #[test]
    fn ack_ranges() {
        let ack = Ack::from_seqs(3, [5, 1, 2, 3, 7, 6, 9]);
        assert_eq!(ack.ranges, vec![(1, 3), (5, 7), (9, 9)]);
        assert!(ack.contains(6) && !ack.contains(4) && !ack.contains(10));
    }

    #[test]
    fn state_ranks_only_move_forward() {
        assert!(RequestState::Pending.rank() < RequestState::Dispatched.rank());
        assert!(RequestState::Running.rank() < RequestState::Failed.rank());
        for s in RequestState::ALL {
            assert_eq!(RequestState::parse(s.as_str()), Some(s));
        }
    }
}
