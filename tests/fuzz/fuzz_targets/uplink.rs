//! Arbitrary signed uplink messages through the bridge's signature check, decoding,
//! the backend's bounds, and the store, to the end (`Backend::handle_one`), over the
//! store `IMN_FUZZ_POSTGRES` names (a PostgreSQL server URL: a new database is made
//! in it) or, by default, SQLite in a temporary file.
//!
//! One backend for the whole run, with a few enrolled agents that said hello,
//! requests and a recurring measurement in the store. Each input becomes 1 to 4
//! messages, each from one agent on one topic: raw bytes as the payload, or (mostly)
//! an envelope made by [`gen`] from the bytes, well typed with hostile values, in
//! wire version 2 or 1, sometimes damaged after encoding. Each is signed with its
//! agent's key, or not, or with another's key or for another topic, passed through
//! the bridge's own check (`AgentCredentials::open_uplink`: what fails is dropped, as
//! the bridge drops it) and handed to `handle_one` with a time limit.
//!
//! After each message, any of these is a finding (the target panics):
//! - `handle_one` panics, or does not return within `IMN_FUZZ_TIMEOUT_MS` (10 s);
//! - the message is not settled exactly once with an ack (a nak means the store failed);
//! - the backend logs an error, or a warning carrying a store error (a store error
//!   that is not a dead letter), or counts a store error;
//! - the store's counts disagree with what the backend says it did: records stored
//!   (in all and for the agent) and dead letters;
//! - a batch that passed the bounds is not accounted for record by record (stored,
//!   duplicate, dead letter or refused), or its ack names another epoch, a seq it did
//!   not carry, or too few or too many seqs; anything else is acked to the agent;
//! - a downlink message does not decode;
//! - an agent's record moves another agent's request, or a request's state moves back;
//! - an accepted hello is not what the registry holds;
//! - the registry holds more agents than are enrolled, or more heartbeats than its cap;
//! - every 512 inputs, a read of the store fails (results, events, dead letters,
//!   sessions, schedules, a page of results, request counts), or /metrics passes 16 MiB.
//!
//! Figures (messages by path, stored, duplicates, dead letters and their reasons,
//! time in `handle_one`) go to stderr every 60 s and at exit.
#![no_main]

#[path = "uplink/gen.rs"]
mod gen;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imn_backend::security::{Limits, Policy, Security};
use imn_backend::store::{
    AgentSchedule, MeasurementRow, NewRequest, PostgresStore, ResultFilter, SqliteStore, Store,
};
use imn_backend::{ingest, Backend};
use imn_cloud::bus::{Bus, DownMessage, LocalBus, Settle, UpMessage};
use imn_cloud::{AgentCredential, AgentCredentials};
use imn_proto::auth::{self, MessageKey};
use imn_proto::wire::{self, Envelope, Kind, RequestState};
use imn_proto::{catalog, now_ms};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Enrolled agents: the first five say hello at start (two of them in wire version 1);
/// `late` is enrolled but silent until the fuzzer makes it speak.
const AGENTS: [&str; 6] = ["a0", "a1", "a2", "a3", "a4", "late"];
const HELLO_AT_START: usize = 5;
/// Not enrolled: the bridge drops whatever comes on its topics.
const GHOST: &str = "ghost";
/// The bridge's default `max_mqtt_payload`.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;
const REQUESTS_PER_AGENT: usize = 3;
/// Inputs between reads of the whole store, and between new requests.
const READ_EVERY: u64 = 512;
const NEW_REQUESTS_EVERY: u64 = 4096;
const MAX_METRICS_BYTES: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    harness().one_input(data);
});

// ---------------------------------------------------------------------------------
// What the backend logs: warnings and errors, kept for the checks.

#[derive(Debug, Clone)]
struct Logged {
    level: Level,
    message: String,
    error: Option<String>,
    reason: Option<String>,
}

static LOGGED: Mutex<Vec<Logged>> = Mutex::new(Vec::new());

/// The last messages handed to the backend, printed if the target panics: a finding
/// may need the messages before the one that shows it (the backend keeps state
/// between inputs). Formatted only then.
struct Recent {
    kind: Kind,
    agent: String,
    payload: Bytes,
    at_ms: i64,
}

static RECENT: Mutex<std::collections::VecDeque<Recent>> =
    Mutex::new(std::collections::VecDeque::new());
const RECENT_KEPT: usize = 16;

fn remember(r: Recent) {
    let mut q = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    if q.len() == RECENT_KEPT {
        q.pop_front();
    }
    q.push_back(r);
}

/// One message as text: its topic, size, time, and envelope (cut at 3000 bytes).
fn describe(r: &Recent) -> String {
    let what = match wire::decode_versioned(&r.payload) {
        Ok((v, env)) => {
            let mut t = format!("v{v} {env:?}");
            if t.len() > 3000 {
                let mut end = 3000;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                t.truncate(end);
                t.push_str(" …");
            }
            t
        }
        Err(e) => format!("undecodable ({e})"),
    };
    format!(
        "{} from {}, {} bytes, at {} ms: {what}",
        r.kind.as_str(),
        r.agent,
        r.payload.len(),
        r.at_ms
    )
}

/// Prints [`RECENT`] before the panic hook libFuzzer's runtime set (which aborts).
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(q) = RECENT.try_lock() {
            eprintln!(
                "== uplink: the last {} messages handed to the backend, oldest first:",
                q.len()
            );
            for (i, m) in q.iter().enumerate() {
                eprintln!("[{i}] {}", describe(m));
            }
        }
        previous(info);
    }));
}

struct Capture;

#[derive(Default)]
struct Fields {
    message: String,
    error: Option<String>,
    reason: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        match field.name() {
            "message" => self.message = v,
            "error" => self.error = Some(v),
            "reason" => self.reason = Some(v),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "error" => self.error = Some(value.to_string()),
            "reason" => self.reason = Some(value.to_string()),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        LOGGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Logged {
                level: *event.metadata().level(),
                message: f.message,
                error: f.error,
                reason: f.reason,
            });
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::LevelFilter;
    // IMN_FUZZ_LOG=info|debug|...: the backend's log on stderr too (for reproducers).
    let shown = std::env::var("IMN_FUZZ_LOG")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::OFF);
    let subscriber = tracing_subscriber::registry()
        .with(Capture.with_filter(LevelFilter::WARN))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(shown),
        );
    let _ = tracing::subscriber::set_global_default(subscriber);
}

// ---------------------------------------------------------------------------------
// Settling: how the backend answered the bus for one message.

struct Recorder(Arc<Mutex<Vec<bool>>>);

#[async_trait::async_trait]
impl Settle for Recorder {
    async fn ack(self: Box<Self>) {
        self.0.lock().unwrap().push(true);
    }
    async fn nak(self: Box<Self>) {
        self.0.lock().unwrap().push(false);
    }
}

// ---------------------------------------------------------------------------------
// Figures.

#[derive(Default)]
struct Figures {
    inputs: u64,
    messages: u64,
    raw: u64,
    generated: u64,
    generator_failed: u64,
    damaged: u64,
    too_large: u64,
    /// Dropped by the bridge's signature check, by the way they were signed.
    refused_by_bridge: BTreeMap<&'static str, u64>,
    handled: BTreeMap<&'static str, u64>,
    /// Batches that passed the bounds, and those whose records were all stored new.
    batches_taken: u64,
    acks: u64,
    commands: u64,
    hellos_accepted: u64,
    dead_letter_reasons: BTreeMap<String, u64>,
    group_commits_refused: u64,
    cross_agent_attempts: u64,
    /// Messages held back because they would hit a known bug ([`known_bug`]).
    held_back: BTreeMap<&'static str, u64>,
    handle_total: Duration,
    handle_max: Duration,
    store_reads: u64,
    metrics_bytes: usize,
    started: Option<Instant>,
}

// ---------------------------------------------------------------------------------
// The harness.

struct Agent {
    id: String,
    key: MessageKey,
}

struct State {
    figures: Figures,
    /// Requests in the store: (id, owner).
    requests: Vec<(String, String)>,
    request_generation: u64,
    measurements: Vec<String>,
    /// Each agent's outbox epochs in use, and where their seqs continue (a few).
    epochs: HashMap<String, Vec<(u64, u64)>>,
    last_report: Instant,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    backend: Arc<Backend>,
    /// The bridge's table: auth on, every agent of [`AGENTS`] enrolled.
    bridge: AgentCredentials,
    agents: Vec<Agent>,
    down: Mutex<mpsc::Receiver<DownMessage>>,
    timeout: Duration,
    /// `IMN_FUZZ_KNOWN=allow` (all) or `=ID,ID`: messages that hit these known bugs go
    /// through.
    allow_known: Vec<String>,
    /// `IMN_FUZZ_SHOW=1`: each message handled, on stderr (to read a reproducer).
    show: bool,
    sqlite_dir: Option<std::path::PathBuf>,
    state: Mutex<State>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let h = Harness::start();
        extern "C" fn at_exit() {
            if let Some(h) = HARNESS.get() {
                if let Ok(st) = h.state.try_lock() {
                    eprintln!("{}", h.report(&st, "final"));
                }
                if let Some(d) = &h.sqlite_dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
        // SAFETY: registers a plain function to run at exit.
        unsafe {
            libc::atexit(at_exit);
        }
        h
    })
}

fn token(agent: &str) -> String {
    format!("fuzz-token-of-{agent}")
}

fn setup_hello(agent: &str) -> wire::Hello {
    wire::Hello {
        agent_id: agent.to_string(),
        version: "0.1.0".into(),
        arch: "x86_64".into(),
        modules: catalog::catalog()
            .iter()
            .map(|m| wire::ModuleInfo {
                name: m.name.to_string(),
                version: m.version.to_string(),
                schema_hash: "0".repeat(16),
                config: None,
            })
            .collect(),
        tags: vec!["fuzz".into()],
        location: None,
        schedule_version: 0,
        outbox_epoch: 7,
        outbox_depth: 0,
        dropped: 0,
        // Long: agents stay alive for the whole run (commands go out to them).
        heartbeat_interval_ms: 3_600_000,
        sent_at_ms: now_ms(),
        features: vec![wire::features::POLICY.into()],
        limits: wire::AgentLimits {
            max_runs: 4,
            max_queued_runs: 100,
            max_probe_rate: 100.0,
        },
        schedule_policy: 0,
    }
}

/// Removes the temporary directories of earlier runs whose process is gone.
fn sweep_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("imn-fuzz-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Harness {
    fn start() -> Harness {
        init_tracing();
        install_panic_hook();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let timeout = Duration::from_millis(
            std::env::var("IMN_FUZZ_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000),
        );
        let (store, sqlite_dir, what): (Arc<dyn Store>, _, String) =
            match std::env::var("IMN_FUZZ_POSTGRES") {
                Ok(admin) => {
                    let name = format!("imn_fuzz_{}_{:08x}", std::process::id(), rand_u32());
                    let url = rt.block_on(async {
                        imn_backend::store::pg_cluster::create_database(&admin, &name)
                            .await
                            .expect("IMN_FUZZ_POSTGRES: cannot make a database");
                        let base = admin
                            .rsplit_once('/')
                            .map(|(b, _)| b.to_string())
                            .expect("IMN_FUZZ_POSTGRES: postgres://USER@HOST:PORT/DB");
                        format!("{base}/{name}")
                    });
                    let s = rt
                        .block_on(PostgresStore::connect(&url))
                        .expect("connect to the fuzz database");
                    (Arc::new(s), None, format!("PostgreSQL, database {name}"))
                }
                Err(_) => {
                    sweep_stale_dirs();
                    let dir = std::env::temp_dir().join(format!(
                        "imn-fuzz-{}-{:08x}",
                        std::process::id(),
                        rand_u32()
                    ));
                    std::fs::create_dir_all(&dir).expect("a temporary directory");
                    let path = dir.join("s.sqlite");
                    let s = SqliteStore::open(&path).expect("open the SQLite store");
                    (
                        Arc::new(s),
                        Some(dir),
                        format!("SQLite, {}", path.display()),
                    )
                }
            };
        let bus = Arc::new(LocalBus::new(4096));
        let down = rt
            .block_on(bus.subscribe_down())
            .expect("the downlink feed");
        let backend = rt
            .block_on(Backend::new(
                store,
                bus,
                false,
                Security::new(
                    Arc::new(AgentCredentials::disabled()),
                    Limits::default(),
                    Policy::default(),
                ),
            ))
            .expect("a backend");
        let bridge = AgentCredentials::enabled();
        let agents: Vec<Agent> = AGENTS
            .iter()
            .map(|id| {
                let t = token(id);
                bridge.set(
                    id,
                    AgentCredential {
                        token_hash: auth::token_hash(&t),
                        message_key: auth::message_key(&t),
                        revoked: false,
                    },
                );
                Agent {
                    id: id.to_string(),
                    key: auth::message_key(&t),
                }
            })
            .collect();
        let h = Harness {
            rt,
            backend,
            bridge,
            agents,
            down: Mutex::new(down),
            timeout,
            allow_known: std::env::var("IMN_FUZZ_KNOWN")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            show: std::env::var_os("IMN_FUZZ_SHOW").is_some(),
            sqlite_dir,
            state: Mutex::new(State {
                figures: Figures {
                    started: Some(Instant::now()),
                    ..Figures::default()
                },
                requests: Vec::new(),
                request_generation: 0,
                measurements: Vec::new(),
                epochs: HashMap::new(),
                last_report: Instant::now(),
            }),
        };
        {
            let mut st = h.state.lock().unwrap();
            // Hellos, signed and checked as any message.
            for (i, a) in AGENTS.iter().take(HELLO_AT_START).enumerate() {
                let version = if i % 2 == 0 {
                    wire::WIRE_VERSION
                } else {
                    wire::LEGACY_WIRE_VERSION
                };
                let payload = wire::encode_for(version, &Envelope::Hello(setup_hello(a)));
                let signed = auth::sign(&h.agents[i].key, &wire::topic(a, Kind::Hello), &payload);
                h.deliver(i, Kind::Hello, &signed, &mut st);
            }
            assert_eq!(
                st.figures.hellos_accepted,
                HELLO_AT_START as u64,
                "the start hellos must be taken: {:?}",
                LOGGED.lock().unwrap()
            );
            h.new_requests(&mut st);
            h.measurements(&mut st);
            h.read_everything(&mut st);
            // Past the backend's one hello a second per agent: a reproducer's hello is
            // taken as it was when the fuzzer found it.
            std::thread::sleep(Duration::from_millis(1100));
            eprintln!(
                "uplink: store {what}; {} agents enrolled ({} said hello), {} requests, handle_one limit {:?}",
                AGENTS.len(),
                HELLO_AT_START,
                st.requests.len(),
                h.timeout
            );
        }
        h
    }

    fn store(&self) -> &dyn Store {
        self.backend.store.as_ref()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A new generation of requests, pending, for every agent.
    fn new_requests(&self, st: &mut State) {
        st.request_generation += 1;
        let g = st.request_generation;
        let now = now_ms();
        let mut made = Vec::new();
        for a in &self.agents {
            for i in 0..REQUESTS_PER_AGENT {
                let id = format!("r-{}-{g}-{i}", a.id);
                self.block_on(self.store().create_request(NewRequest {
                    id: id.clone(),
                    agent_id: a.id.clone(),
                    module: "echo_module".into(),
                    params_json: r#"{"message":"fuzz"}"#.into(),
                    created_ms: now,
                    deadline_ms: now + 86_400_000,
                    timeout_ms: 5_000,
                    idempotency_key: None,
                    idempotency_hash: None,
                    traceparent: None,
                    measurement_id: None,
                    dispatch: false,
                    charge: None,
                }))
                .unwrap_or_else(|e| panic!("create request {id}: {e}"));
                made.push((id, a.id.clone()));
            }
        }
        // The two newest generations stay in the pool.
        let keep = 2 * self.agents.len() * REQUESTS_PER_AGENT;
        st.requests.extend(made);
        let extra = st.requests.len().saturating_sub(keep);
        st.requests.drain(..extra);
    }

    /// A recurring measurement on the agents that said hello, and a one-off one.
    fn measurements(&self, st: &mut State) {
        let now = now_ms();
        let spec =
            format!(r#"{{"interval_ms":60000,"start_ms":{now},"stop_ms":null,"jitter_ms":0}}"#);
        let row = |id: &str, schedule: Option<String>| MeasurementRow {
            id: id.into(),
            module: "echo_module".into(),
            params_json: r#"{"message":"m"}"#.into(),
            selection_json: "{}".into(),
            description: None,
            created_ms: now,
            deadline_ms: now + 86_400_000,
            schedule_json: schedule,
            stopped_ms: None,
            owner: None,
            daily_probes: 1440,
        };
        let agents = AGENTS
            .iter()
            .take(HELLO_AT_START)
            .map(|a| {
                (
                    a.to_string(),
                    AgentSchedule {
                        measurement_id: "m-sched".into(),
                        module: "echo_module".into(),
                        params_json: r#"{"message":"m"}"#.into(),
                        timeout_ms: 5_000,
                        schedule_json: spec.clone(),
                    },
                )
            })
            .collect();
        self.block_on(
            self.store()
                .create_schedule(row("m-sched", Some(spec.clone())), agents),
        )
        .expect("create a schedule");
        self.block_on(self.store().create_measurement(row("m-once", None)))
            .expect("create a measurement");
        st.measurements = vec!["m-sched".into(), "m-once".into(), "m-none".into()];
    }

    fn one_input(&self, data: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.figures.inputs += 1;
        let mut u = Unstructured::new(data);
        let n = 1 + usize::from(u.arbitrary::<u8>().unwrap_or(0) % 4);
        for i in 0..n {
            if i > 0 && u.is_empty() {
                break;
            }
            self.one_message(&mut u, &mut st);
        }
        let inputs = st.figures.inputs;
        if inputs.is_multiple_of(READ_EVERY) {
            self.read_everything(&mut st);
        }
        if inputs.is_multiple_of(NEW_REQUESTS_EVERY) {
            self.new_requests(&mut st);
        }
        if st.last_report.elapsed() > Duration::from_secs(60) {
            st.last_report = Instant::now();
            eprintln!("{}", self.report(&st, "progress"));
        }
    }

    /// Makes one message from the bytes, signs it, and delivers it.
    fn one_message(&self, u: &mut Unstructured<'_>, st: &mut State) {
        let b = |u: &mut Unstructured<'_>| u.arbitrary::<u8>().unwrap_or(0);
        // An enrolled agent, or (rarely) one the bridge does not know.
        let w = b(u);
        let who = if w >= 248 {
            self.agents.len()
        } else {
            usize::from(w) % self.agents.len()
        };
        let kind = [
            Kind::Out,
            Kind::Out,
            Kind::Out,
            Kind::Hello,
            Kind::Heartbeat,
            Kind::Heartbeat,
            Kind::Status,
            Kind::Out,
            // Lifecycle reports and release fetches (answered by chunks on `cmd`).
            Kind::Update,
        ][usize::from(b(u) % 9)];
        let agent = if who == self.agents.len() {
            GHOST.to_string()
        } else {
            self.agents[who].id.clone()
        };
        // This message's bytes: a length, then that many (or what is left).
        let len = usize::from(u.arbitrary::<u16>().unwrap_or(0));
        let chunk = u.bytes(len.min(u.len())).unwrap_or(&[]);
        let mode = b(u);
        let sign = b(u);
        // (Bytes run out as zeros: zero picks the common case everywhere.)
        let mut payload = if mode >= 160 {
            st.figures.raw += 1;
            let mut p = Vec::with_capacity(chunk.len() + 2);
            // Half of them start as the topic's envelope would (version and variant).
            if mode < 208 {
                p.push(if mode & 1 == 0 {
                    wire::WIRE_VERSION
                } else {
                    wire::LEGACY_WIRE_VERSION
                });
                p.push(envelope_variant(kind) as u8);
            }
            p.extend_from_slice(chunk);
            p
        } else {
            match self.generate(&agent, kind, chunk, st) {
                Some(env) => {
                    st.figures.generated += 1;
                    let version = if mode & 3 == 3 {
                        wire::LEGACY_WIRE_VERSION
                    } else {
                        wire::WIRE_VERSION
                    };
                    wire::encode_for(version, &env)
                }
                None => {
                    st.figures.generator_failed += 1;
                    chunk.to_vec()
                }
            }
        };
        // Damage after encoding, sometimes: a flipped byte, a cut, a trailing byte.
        let damage = b(u);
        if damage >= 244 && !payload.is_empty() {
            st.figures.damaged += 1;
            let at = usize::from(b(u)) * 257 % payload.len();
            match damage % 3 {
                0 => payload[at] ^= 1 << (b(u) % 8),
                1 => payload.truncate(at),
                _ => payload.push(b(u)),
            }
        }
        let topic = wire::topic(&agent, kind);
        let own = (who < self.agents.len()).then(|| self.agents[who].key);
        let other = self.agents[(who + 1) % self.agents.len()].key;
        let key = own.unwrap_or(other);
        let (how, signed): (&'static str, Vec<u8>) = match sign {
            0..=209 => ("own key", auth::sign(&key, &topic, &payload)),
            210..=219 => ("unsigned", payload),
            220..=229 => ("another agent's key", auth::sign(&other, &topic, &payload)),
            230..=239 => {
                let k = [
                    Kind::Out,
                    Kind::Hello,
                    Kind::Heartbeat,
                    Kind::Status,
                    Kind::Ack,
                ][usize::from(sign % 5)];
                (
                    "another topic",
                    auth::sign(&key, &wire::topic(&agent, k), &payload),
                )
            }
            240..=249 => {
                let mut s = auth::sign(&key, &topic, &payload);
                let i = 1 + usize::from(sign) % auth::TAG_LEN;
                s[i] ^= 0x80;
                ("damaged tag", s)
            }
            _ => {
                let once = auth::sign(&key, &topic, &payload);
                ("signed twice", auth::sign(&key, &topic, &once))
            }
        };
        if who == self.agents.len() {
            // The ghost: the bridge has no key for it.
            st.figures.messages += 1;
            assert!(
                self.bridge.open_uplink(&agent, kind, &signed).is_none(),
                "the bridge let a message of an agent that is not enrolled through"
            );
            *st.figures
                .refused_by_bridge
                .entry("not enrolled")
                .or_default() += 1;
            return;
        }
        if self.deliver(who, kind, &signed, st) == Delivered::Refused {
            *st.figures.refused_by_bridge.entry(how).or_default() += 1;
        }
    }

    fn generate(&self, agent: &str, kind: Kind, bytes: &[u8], st: &State) -> Option<Envelope> {
        let own: Vec<String> = st
            .requests
            .iter()
            .filter(|(_, o)| o == agent)
            .map(|(id, _)| id.clone())
            .collect();
        let other: Vec<String> = st
            .requests
            .iter()
            .filter(|(_, o)| o != agent)
            .map(|(id, _)| id.clone())
            .collect();
        let world = gen::World {
            agent: agent.to_string(),
            others: AGENTS
                .iter()
                .chain([&GHOST])
                .filter(|a| **a != agent)
                .map(|a| a.to_string())
                .collect(),
            envelope_variant: envelope_variant(kind),
            own_requests: own,
            other_requests: other,
            measurements: st.measurements.clone(),
            modules: catalog::names(),
            epochs: st.epochs.get(agent).cloned().unwrap_or_default(),
            now_ms: now_ms(),
        };
        let mut ctx = gen::Ctx::new(Unstructured::new(bytes), world, 20_000);
        Envelope::deserialize(gen::Gen::new(&mut ctx)).ok()
    }

    /// The bridge, then the backend, then every check.
    fn deliver(&self, i: usize, kind: Kind, signed: &[u8], st: &mut State) -> Delivered {
        let agent = self.agents[i].id.clone();
        st.figures.messages += 1;
        if signed.len() > MAX_MESSAGE_BYTES {
            st.figures.too_large += 1;
            return Delivered::TooLarge;
        }
        let Some(inner) = self.bridge.open_uplink(&agent, kind, signed) else {
            return Delivered::Refused;
        };
        let payload = Bytes::copy_from_slice(inner);
        LOGGED.lock().unwrap().clear();

        // What the backend should do with it, from the same decoding and bounds.
        let decoded = wire::decode_versioned(&payload);
        let batch = match (&decoded, kind) {
            (Ok((_, Envelope::Batch(b))), Kind::Out) if ingest::check_batch(b).is_ok() => {
                let mut b = b.clone();
                ingest::defer_events(&mut b);
                Some(b)
            }
            _ => None,
        };
        let hello = match (&decoded, kind) {
            (Ok((v, Envelope::Hello(h))), Kind::Hello)
                if h.agent_id == agent && ingest::check_hello(h).is_ok() =>
            {
                Some((*v, h.clone()))
            }
            _ => None,
        };
        if let Some(bug) = known_bug(kind, &decoded) {
            if !self.allow_known.iter().any(|a| a == "allow" || a == bug) {
                *st.figures.held_back.entry(bug).or_default() += 1;
                return Delivered::HeldBack;
            }
        }
        let recent = Recent {
            kind,
            agent: agent.clone(),
            payload: payload.clone(),
            at_ms: now_ms(),
        };
        if self.show {
            eprintln!("uplink: {}", describe(&recent));
        }
        remember(recent);
        // Requests named by the batch: their state before (another agent's must not
        // move; none moves back).
        let named: Vec<(String, bool)> = batch
            .iter()
            .flat_map(|b| &b.records)
            .filter_map(|r| match &r.body {
                wire::RecordBody::State(s) => Some(s.request_id.clone()),
                wire::RecordBody::Result(r) | wire::RecordBody::TracedResult(r, _) => {
                    Some(r.request_id.clone())
                }
                _ => None,
            })
            .filter_map(|id| {
                let owner = st.requests.iter().find(|(r, _)| *r == id)?.1.clone();
                Some((id, owner != agent))
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut before_requests = HashMap::new();
        for (id, foreign) in &named {
            before_requests.insert(id.clone(), self.request_snapshot(id, *foreign));
            if *foreign {
                st.figures.cross_agent_attempts += 1;
            }
        }
        let stats = &self.backend.stats;
        let snap = |s: &imn_backend::service::Stats| {
            (
                s.records_stored.load(Ordering::SeqCst),
                s.duplicates_dropped.load(Ordering::SeqCst),
                s.dead_lettered.load(Ordering::SeqCst),
                s.records_refused.load(Ordering::SeqCst),
                s.store_errors.load(Ordering::SeqCst),
                s.hellos_throttled.load(Ordering::SeqCst),
            )
        };
        let before = snap(stats);
        let counts_before = self.counts(&agent);
        // Hellos dropped as replays (an older wire version than the agent's last, and
        // no later by its clock), and what the registry held before this one.
        let stale_hellos = |s: &imn_backend::service::Stats| {
            s.rejected
                .lock()
                .unwrap()
                .get("stale_hello")
                .copied()
                .unwrap_or(0)
        };
        let stale_before = stale_hellos(stats);
        let registered = self.backend.registry.get(&agent).map(|e| {
            (
                e.wire_version,
                e.hello.sent_at_ms,
                wire::encode(&Envelope::Hello(e.hello.clone())),
            )
        });

        let settled = Arc::new(Mutex::new(Vec::new()));
        let msg = UpMessage::new(
            kind,
            agent.clone(),
            payload.clone(),
            Some(Box::new(Recorder(settled.clone()))),
        );
        let started = Instant::now();
        let done = self.block_on(async {
            tokio::time::timeout(self.timeout, self.backend.handle_one(msg)).await
        });
        let took = started.elapsed();
        if done.is_err() {
            panic!(
                "hang: handle_one did not return within {:?} ({} from {agent}, {} bytes)",
                self.timeout,
                kind.as_str(),
                payload.len()
            );
        }
        st.figures.handle_total += took;
        st.figures.handle_max = st.figures.handle_max.max(took);
        *st.figures.handled.entry(kind.as_str()).or_default() += 1;

        // Settled once, with an ack.
        let settled = settled.lock().unwrap().clone();
        let logged: Vec<Logged> = std::mem::take(&mut *LOGGED.lock().unwrap());
        assert!(
            settled == [true],
            "the message was settled {settled:?} (true: ack, false: nak), not acked once; log: {logged:#?}"
        );
        // No store error, logged or counted, but dead letters: a group commit the
        // database refused is the way to them (each batch, then each record alone),
        // and what it came to is checked below (every record accounted for, acked).
        for l in &logged {
            let isolating = l.message.starts_with("group commit refused");
            let store_error =
                !isolating && l.error.as_deref().is_some_and(|e| e.starts_with("store"));
            assert!(
                l.level != Level::ERROR && !store_error,
                "the backend logged a failure: {l:#?}"
            );
            if l.message.starts_with("record refused by the store") {
                *st.figures
                    .dead_letter_reasons
                    .entry(reason_class(l.reason.as_deref().unwrap_or("")))
                    .or_default() += 1;
            }
            if isolating {
                st.figures.group_commits_refused += 1;
            }
        }
        let after = snap(stats);
        assert_eq!(
            after.4, before.4,
            "the backend counted a store error; log: {logged:#?}"
        );
        let stored = after.0 - before.0;
        let duplicates = after.1 - before.1;
        let dead = after.2 - before.2;
        let refused = after.3 - before.3;

        // The store agrees with what the backend says it stored.
        let counts_after = self.counts(&agent);
        assert_eq!(
            counts_after.0 - counts_before.0,
            stored,
            "records in the store vs records the backend stored"
        );
        assert_eq!(
            counts_after.1 - counts_before.1,
            stored,
            "the agent's records in the store vs records the backend stored"
        );
        assert_eq!(
            counts_after.2 - counts_before.2,
            dead,
            "dead letters in the store vs records the backend dead-lettered"
        );

        // Downlink: everything decodes; acks only for a batch taken, and right.
        let downs = self.drain_down();
        let mut acks = Vec::new();
        for d in &downs {
            let env = match wire::decode_versioned(&d.payload) {
                Ok((_, env)) => env,
                Err(e) => panic!(
                    "a downlink {} for {} does not decode: {e}",
                    d.kind.as_str(),
                    d.agent
                ),
            };
            match (d.kind, env) {
                (Kind::Ack, Envelope::Ack(a)) => {
                    assert_eq!(d.agent, agent, "an ack went to another agent");
                    acks.push(a);
                }
                (Kind::Cmd, Envelope::Command(_)) => st.figures.commands += 1,
                // The answer to a fetch: a release's bytes, or why there are none.
                (Kind::Cmd, Envelope::Chunk(_)) => {}
                (k, env) => panic!("downlink {} carries {env:?}", k.as_str()),
            }
        }
        st.figures.acks += acks.len() as u64;
        match &batch {
            Some(b) => {
                st.figures.batches_taken += 1;
                let n = b.records.len() as u64;
                assert_eq!(
                    stored + duplicates + dead + refused,
                    n,
                    "a batch of {n} records: {stored} stored, {duplicates} duplicates, {dead} dead letters, {refused} refused"
                );
                assert_eq!(acks.len(), 1, "one ack per batch taken, got {acks:?}");
                let ack = &acks[0];
                assert_eq!(ack.epoch, b.epoch, "the ack names another epoch");
                let seqs: HashSet<u64> = b.records.iter().map(|r| r.seq).collect();
                let mut acked: u128 = 0;
                for &(lo, hi) in &ack.ranges {
                    assert!(lo <= hi, "ack range {lo}..={hi}");
                    acked += u128::from(hi - lo) + 1;
                    assert!(
                        acked <= u128::from(n),
                        "the ack names more seqs than the batch had: {:?}",
                        ack.ranges
                    );
                    for s in lo..=hi {
                        assert!(seqs.contains(&s), "the ack names seq {s}, not in the batch");
                    }
                }
                assert_eq!(
                    acked,
                    u128::from(n - refused),
                    "acked seqs vs records taken ({refused} refused)"
                );
                // Where this epoch's seqs go on (for the next batches made).
                if let Some(last) = b.records.last() {
                    let e = st.epochs.entry(agent.clone()).or_default();
                    e.retain(|(x, _)| *x != b.epoch);
                    e.push((b.epoch, last.seq.wrapping_add(1)));
                    if e.len() > 4 {
                        e.remove(0);
                    }
                }
            }
            None => {
                assert!(
                    acks.is_empty(),
                    "an ack for a message that is not a batch taken: {acks:?}"
                );
                assert_eq!(
                    (stored, duplicates, dead, refused),
                    (0, 0, 0, 0),
                    "records counted for a message that is not a batch taken"
                );
            }
        }

        // Requests: another agent's never moves; none moves back.
        for (id, was) in before_requests {
            let foreign = named.iter().any(|(n, f)| *n == id && *f);
            let now = self.request_snapshot(&id, foreign);
            if foreign {
                assert_eq!(
                    now, was,
                    "{agent}'s batch changed another agent's request {id}"
                );
            } else {
                assert!(
                    now.0.rank() >= was.0.rank(),
                    "request {id} moved back from {:?} to {:?}",
                    was.0,
                    now.0
                );
            }
        }

        // An accepted hello is what the registry holds.
        let throttled = after.5 - before.5;
        let replayed = stale_hellos(stats) - stale_before;
        if let Some((version, h)) = hello {
            if replayed > 0 {
                // Only a hello the rule names is dropped, and the registry keeps the
                // one it had.
                let (was_version, was_sent, was_hello) = registered
                    .clone()
                    .expect("a hello dropped as a replay of one the registry never had");
                assert!(
                    version < was_version && h.sent_at_ms <= was_sent,
                    "a version {version} hello sent at {} dropped as a replay of a version {was_version} one sent at {was_sent}",
                    h.sent_at_ms
                );
                let e = self.backend.registry.get(&agent).expect("still registered");
                assert_eq!(
                    wire::encode(&Envelope::Hello(e.hello.clone())),
                    was_hello,
                    "a dropped hello changed the registry"
                );
            } else if throttled == 0 {
                st.figures.hellos_accepted += 1;
                let e = self
                    .backend
                    .registry
                    .get(&agent)
                    .expect("an agent that said hello is in the registry");
                // Compared encoded: a NaN from the agent never equals itself.
                assert_eq!(
                    wire::encode(&Envelope::Hello(e.hello.clone())),
                    wire::encode(&Envelope::Hello(h)),
                    "the registry's hello differs from the one taken"
                );
                assert_eq!(e.wire_version, version, "the registry's wire version");
            }
        }

        // Nothing grows past its bound.
        let all = self.backend.registry.all();
        assert!(
            all.len() <= AGENTS.len(),
            "{} agents in the registry",
            all.len()
        );
        assert!(
            all.iter().all(|a| AGENTS.contains(&a.id.as_str())),
            "an agent that is not enrolled is in the registry"
        );
        let history = self.backend.registry.heartbeats(&agent).len();
        assert!(
            history <= imn_backend::registry::HEARTBEAT_HISTORY,
            "{history} heartbeats kept"
        );
        let reasons = stats.rejected.lock().unwrap().len();
        assert!(reasons <= 8, "{reasons} rejection reasons");
        Delivered::Handled
    }

    /// (records in all, the agent's records, dead letters), as the store counts them.
    fn counts(&self, agent: &str) -> (u64, u64, u64) {
        self.block_on(async {
            let s = self.store();
            let all = s.record_count().await.expect("record_count");
            let mine = s
                .agent_record_count(agent)
                .await
                .expect("agent_record_count");
            let dead = s.dead_letter_count().await.expect("dead_letter_count");
            (all, mine, dead)
        })
    }

    /// A request's state, and (for another agent's) its transitions and result.
    fn request_snapshot(&self, id: &str, full: bool) -> (RequestState, usize, Option<u64>) {
        self.block_on(async {
            let s = self.store();
            let r = s
                .request(id)
                .await
                .expect("read a request")
                .expect("a request of the pool exists");
            if !full {
                return (r.state, 0, None);
            }
            let t = s.transitions(id).await.expect("read transitions").len();
            let res = s
                .result(&r.agent_id, id)
                .await
                .expect("read a result")
                .map(|x| x.seq);
            (r.state, t, res)
        })
    }

    fn drain_down(&self) -> Vec<DownMessage> {
        let mut rx = self.down.lock().unwrap();
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            v.push(m);
        }
        v
    }

    /// Every read the API makes of what agents sent: each must succeed.
    fn read_everything(&self, st: &mut State) {
        st.figures.store_reads += 1;
        let sample = st.requests.clone();
        let f = self.block_on(async {
            let s = self.store();
            for a in AGENTS {
                s.results(a, 20).await.expect("results");
                s.events(a, 20).await.expect("events");
                s.sessions(a, 0).await.expect("sessions");
                s.first_connected(a).await.expect("first_connected");
                s.agent_schedules(a).await.expect("agent_schedules");
                s.open_requests(a).await.expect("open_requests");
                s.undelivered(a).await.expect("undelivered");
            }
            s.agents().await.expect("agents");
            s.dead_letters(None, 20).await.expect("dead_letters");
            let latest = s.latest_position().await.expect("latest_position");
            s.results_page(ResultFilter {
                after: (latest - 100).max(0),
                limit: 100,
                ..ResultFilter::default()
            })
            .await
            .expect("results_page");
            s.request_state_counts()
                .await
                .expect("request_state_counts");
            s.schedule_progress("m-sched")
                .await
                .expect("schedule_progress");
            s.measurement_requests("m-once")
                .await
                .expect("measurement_requests");
            for (id, owner) in &sample {
                s.request_and_result(id).await.expect("request_and_result");
                s.result(owner, id).await.expect("result");
            }
            self.backend.prometheus().await
        });
        st.figures.metrics_bytes = f.len();
        assert!(
            f.len() <= MAX_METRICS_BYTES,
            "/metrics is {} bytes",
            f.len()
        );
        // Whatever the reads sent (none expected) is not news for the next message.
        self.drain_down();
        LOGGED.lock().unwrap().clear();
    }

    fn report(&self, st: &State, when: &str) -> String {
        let f = &st.figures;
        let secs = f.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let s = &self.backend.stats;
        let handled: u64 = f.handled.values().sum();
        let mut out = String::new();
        let _ = writeln!(out, "== uplink figures ({when}, {secs:.0} s)");
        let _ = writeln!(
            out,
            "inputs {} | messages {} (generated {}, raw {}, generator gave up {}, damaged {}) | too large {}",
            f.inputs, f.messages, f.generated, f.raw, f.generator_failed, f.damaged, f.too_large
        );
        let _ = writeln!(out, "refused by the bridge: {:?}", f.refused_by_bridge);
        let _ = writeln!(
            out,
            "handled by the backend {handled}: {:?}; mean {:.3} ms, max {:.1} ms",
            f.handled,
            f.handle_total.as_secs_f64() * 1000.0 / handled.max(1) as f64,
            f.handle_max.as_secs_f64() * 1000.0
        );
        let _ = writeln!(
            out,
            "rejected (undecodable {}): {:?}",
            s.undecodable.load(Ordering::Relaxed),
            s.rejected.lock().unwrap()
        );
        let _ = writeln!(
            out,
            "batches taken {} | records stored {}, duplicates {}, dead letters {}, refused {}, events deferred {} | group commits refused {}",
            f.batches_taken,
            s.records_stored.load(Ordering::Relaxed),
            s.duplicates_dropped.load(Ordering::Relaxed),
            s.dead_lettered.load(Ordering::Relaxed),
            s.records_refused.load(Ordering::Relaxed),
            s.events_deferred.load(Ordering::Relaxed),
            f.group_commits_refused
        );
        let _ = writeln!(
            out,
            "hellos accepted {}, throttled {} | acks {} | commands {} | another agent's request named {} times | store reads {} | /metrics {} bytes",
            f.hellos_accepted,
            s.hellos_throttled.load(Ordering::Relaxed),
            f.acks,
            f.commands,
            f.cross_agent_attempts,
            f.store_reads,
            f.metrics_bytes
        );
        let _ = writeln!(out, "held back (known bugs): {:?}", f.held_back);
        let _ = write!(out, "dead-letter reasons: {:?}", f.dead_letter_reasons);
        out
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    Handled,
    Refused,
    TooLarge,
    /// It would hit a bug already found (see [`known_bug`]).
    HeldBack,
}

/// Bugs this target found, and that are not fixed yet: a message that would hit one is
/// held back (counted in the figures), so that a run goes on past them and looks for
/// others. `IMN_FUZZ_KNOWN=allow` lets them all through (to reproduce, or once fixed),
/// `IMN_FUZZ_KNOWN=ID,ID` those named. Each predicate is the bug's condition, from the
/// decoded message, and returns the bug's ID.
///
/// None now: the five overflows it found (`regressions/uplink/`) are fixed, and their
/// inputs run clean.
fn known_bug(
    _kind: Kind,
    _decoded: &Result<(u8, Envelope), wire::DecodeError>,
) -> Option<&'static str> {
    None
}

/// The index in `Envelope` of the variant a topic carries.
fn envelope_variant(kind: Kind) -> u32 {
    match kind {
        Kind::Hello => 0,
        Kind::Heartbeat => 1,
        Kind::Out => 2,
        Kind::Ack => 3,
        Kind::Cmd => 4,
        Kind::Status => 5,
        Kind::Update => 6,
    }
}

/// A dead letter's reason without its numbers and quoted values, to count by kind.
fn reason_class(r: &str) -> String {
    let mut out: String = r
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    out.truncate(80);
    out
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}
