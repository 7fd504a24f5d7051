//! The hostile-agent harness (issue 23, "one hostile agent or token cannot stall or
//! flood the system"): a real enrolled agent identity (its own token from the admin
//! API, its own message key, valid signatures) driven step by step by a test, which
//! sends each attack over MQTT to the cloud and reads the backend's signed acks; an
//! honest real `imn-agent` beside it whose echo round trips through the API are
//! timed before and during the attack; and the backend's memory (VmRSS, VmHWM).
//!
//! A test starts a [`Cloud`] (`imn up --auth`, or for PostgreSQL the separate
//! `imn-backend` + `imn-bridge` + `nats-server` deployment: `imn up` has no `--store`),
//! adds an honest agent ([`Cloud::honest`]) and a hostile one ([`Cloud::hostile`]),
//! starts a [`Probe`], attacks, and asserts the attack's outcome and
//! [`RoundTrips::assert_kept_arriving`] and [`Cloud::assert_memory_bounded`].

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imn_proto::auth::{self as wauth, MessageKey};
use imn_proto::results::{EchoResult, ModuleOutcome, ModuleOutput};
use imn_proto::wire::{
    self, AgentEvent, Envelope, Heartbeat, Hello, Kind, ModuleInfo, ModuleResult, Record,
    RecordBody, Status,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::{bin, free_port, spawn_agent, wait_for, Api, Nats, Proc, TempDir, Up};

// ---------------------------------------------------------------------------------
// The bounds every attack test holds the system to. They are meant to catch a stall
// or a flood getting through (round trips of tens of seconds, none at all, hundreds
// of MiB), not to benchmark: the binaries are debug builds and the machine has two
// cores shared with other work.
// ---------------------------------------------------------------------------------

/// Every honest echo round trip (API → backend → MQTT → real agent → result stored →
/// API answer), before and during an attack, completes within this. An idle round
/// trip is ~10 ms here on SQLite, ~25 ms on PostgreSQL; a stalled ingest (the attack
/// holding the store or the ingest loop) makes it take seconds, or time out at the
/// API's `?wait=10`.
pub const ROUND_TRIP_MAX: Duration = Duration::from_secs(5);
/// The median honest round trip during an attack stays under this: the attack may
/// slow the others (a flood the backend sheds queues the others' messages behind its
/// own in the broker for up to a second here), not stop them.
pub const ROUND_TRIP_P50_MAX: Duration = Duration::from_secs(2);
/// Honest results keep arriving: at least one round trip completes per this much
/// attack time (the probe starts the next one 100 ms after each answer).
pub const ONE_ROUND_TRIP_PER: Duration = ROUND_TRIP_MAX;
/// The backend process's peak resident memory (VmHWM) during an attack exceeds its
/// resident memory before it (VmRSS) by less than this. What the backend may hold by
/// design: the per-agent share of the ingest queue (4 MiB) and all prepared messages
/// (16 MiB), the store's page cache (64 MiB), the broker's log of each uplink filter
/// (4 × 16 MiB); floods here peak at ~135 MiB of growth. A flood held in memory
/// instead of shed would pass it within seconds (the floods offer 200 MB and more).
pub const RSS_GROWTH_MAX_MIB: u64 = 256;

/// The API's `?wait` for a probe's round trip, in seconds: long enough that a stall
/// shows as a slow round trip rather than a lost one.
const PROBE_WAIT_S: u64 = 10;

// ---------------------------------------------------------------------------------
// The cloud under attack
// ---------------------------------------------------------------------------------

/// Which store the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `imn up --auth`: broker, bridge and backend in one process, SQLite in DATA.
    Sqlite,
    /// `imn-backend --auth --store postgres://…` + `imn-bridge --auth` over
    /// `nats-server`: `imn up` has no `--store`, so PostgreSQL is only reachable in
    /// the separate deployment.
    Postgres,
}

/// A running cloud with auth on, and the real agents the test started.
pub struct Cloud {
    /// Real `imn-agent` processes (dropped, so killed, first).
    agents: Vec<Proc>,
    pub store: StoreKind,
    /// The API with the admin token.
    pub admin: Api,
    pub http_port: u16,
    pub mqtt_port: u16,
    /// The SQLite file (the default store).
    pub sqlite: Option<PathBuf>,
    /// The PostgreSQL database's URL.
    pub pg_url: Option<String>,
    /// `imn up`, or `imn-backend`.
    backend: Proc,
    bridge: Option<Proc>,
    _nats: Option<Nats>,
    _pg: Option<imn_backend::store::pg_cluster::TempCluster>,
    pub dir: TempDir,
}

impl Cloud {
    /// A cloud on `store`, with `extra` flags for `imn up` or `imn-backend`.
    pub async fn start(store: StoreKind, extra: &[&str]) -> Cloud {
        match store {
            StoreKind::Sqlite => Cloud::up(extra).await,
            StoreKind::Postgres => Cloud::postgres(extra).await,
        }
    }

    /// `imn up --auth --agents 0` (no in-process agents: the honest agent is a real
    /// `imn-agent` process).
    pub async fn up(extra: &[&str]) -> Cloud {
        let mut args = vec!["--auth"];
        args.extend_from_slice(extra);
        let Up {
            proc,
            api,
            mqtt_port,
            http_port,
            dir,
        } = Up::start(0, &args).await;
        let token =
            std::fs::read_to_string(dir.path().join("data/admin-token")).expect("DATA/admin-token");
        Cloud {
            agents: Vec::new(),
            store: StoreKind::Sqlite,
            admin: api.with_token(&token),
            http_port,
            mqtt_port,
            sqlite: Some(dir.path().join("data/backend/backend.sqlite")),
            pg_url: None,
            backend: proc,
            bridge: None,
            _nats: None,
            _pg: None,
            dir,
        }
    }

    /// PostgreSQL (a fresh database on a cluster of its own): `imn-backend --auth --store URL` and `imn-bridge --auth`, sharing a
    /// `nats-server`.
    pub async fn postgres(extra: &[&str]) -> Cloud {
        let dir = TempDir::new("hostile-pg");
        let d = dir.path();
        let (pg, url) = imn_backend::store::pg_cluster::fresh_database()
            .await
            .expect("PostgreSQL for the test (Debian's postgresql)");
        let nats = Nats::start(d).await;
        let http_port = free_port();
        let data = d.join("backend");
        let http = format!("127.0.0.1:{http_port}");
        let nats_url = nats.url();
        let mut args = vec![
            "--http",
            &http,
            "--nats",
            &nats_url,
            "--store",
            &url,
            "--data",
            data.to_str().unwrap(),
            "--auth",
        ];
        args.extend_from_slice(extra);
        let backend = Proc::spawn("imn-backend", &bin("imn-backend"), &args, d);
        let token_file = data.join("admin-token");
        let token = wait_for("the backend's admin token", Duration::from_secs(60), || {
            let f = token_file.clone();
            async move { std::fs::read_to_string(f).ok().filter(|t| !t.is_empty()) }
        })
        .await;
        let admin = Api::new(http_port).with_token(&token);
        let a2 = admin.clone();
        wait_for(
            "imn-backend to answer /health",
            Duration::from_secs(30),
            || {
                let a2 = a2.clone();
                async move { a2.try_get("/health").await.map(|_| ()) }
            },
        )
        .await;
        let mqtt_port = free_port();
        let bridge = Proc::spawn(
            "imn-bridge",
            &bin("imn-bridge"),
            &[
                "--mqtt",
                &format!("127.0.0.1:{mqtt_port}"),
                "--nats",
                &nats.url(),
                "--auth",
                "--metrics",
                "off",
            ],
            d,
        );
        wait_for(
            "imn-bridge to listen",
            Duration::from_secs(30),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", mqtt_port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Cloud {
            agents: Vec::new(),
            store: StoreKind::Postgres,
            admin,
            http_port,
            mqtt_port,
            sqlite: None,
            pg_url: Some(url),
            backend,
            bridge: Some(bridge),
            _nats: Some(nats),
            _pg: pg,
            dir,
        }
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Enrolls `id` and starts a real `imn-agent` with its token (500 ms heartbeats,
    /// 2 s resends, as the other end-to-end tests); waits until it is alive.
    pub async fn honest(&mut self, id: &str) {
        let token = self.admin.enroll(id).await;
        let d = self.dir.path();
        let agent = spawn_agent(
            &bin("imn-agent"),
            id,
            &self.broker_url(),
            &d.join(id),
            &[
                "--token",
                &token,
                "--heartbeat-ms",
                "500",
                "--resend-timeout-ms",
                "2000",
            ],
            d,
        );
        self.agents.push(agent);
        self.admin.wait_alive(&[id], Duration::from_secs(30)).await;
    }

    /// Enrolls `id` and connects it as a [`HostileAgent`] (status online and a hello
    /// sent, heartbeats every second).
    pub async fn hostile(&self, id: &str) -> HostileAgent {
        let token = self.admin.enroll(id).await;
        let h = HostileAgent::connect(id, &token, self.mqtt_port).await;
        h.online().await;
        h.send(Kind::Hello, &Envelope::Hello(h.hello())).await;
        self.admin.wait_alive(&[id], Duration::from_secs(30)).await;
        h
    }

    /// The process whose memory is the backend's: `imn up` (broker, bridge and
    /// backend), or `imn-backend`.
    pub fn backend_pid(&self) -> i32 {
        self.backend.pid()
    }

    pub fn backend_log(&self) -> String {
        let mut s = self.backend.log_text();
        if let Some(b) = &self.bridge {
            s.push_str(&b.log_text());
        }
        s
    }

    /// The backend process's memory now.
    pub fn memory(&self) -> Memory {
        Memory::of(self.backend_pid())
    }

    /// Asserts that the backend's peak memory since `before` grew by less than
    /// [`RSS_GROWTH_MAX_MIB`]; returns the growth in MiB.
    pub fn assert_memory_bounded(&self, what: &str, before: Memory) -> u64 {
        let after = self.memory();
        let growth = after.peak_kib.saturating_sub(before.rss_kib) / 1024;
        println!(
            "{what}: backend RSS {} MiB before, {} MiB after, peak {} MiB (growth {growth} MiB, bound {RSS_GROWTH_MAX_MIB} MiB)",
            before.rss_kib / 1024,
            after.rss_kib / 1024,
            after.peak_kib / 1024
        );
        assert!(
            growth < RSS_GROWTH_MAX_MIB,
            "{what}: the backend's peak RSS grew by {growth} MiB (bound {RSS_GROWTH_MAX_MIB} MiB): before {before:?}, after {after:?}"
        );
        growth
    }

    /// `/health`.
    pub async fn health(&self) -> Value {
        let r = self.admin.get("/health").await;
        assert_eq!(r.status, 200, "/health: {}", r.body);
        r.body
    }

    /// A counter of `/health` by its JSON pointer (`/ingest/shed`, `/rejected/bounds`);
    /// 0 when absent.
    pub async fn counter(&self, pointer: &str) -> u64 {
        self.health()
            .await
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Waits until the `/health` counter at `pointer` is at least `at_least`; returns it.
    pub async fn wait_counter(&self, pointer: &str, at_least: u64, timeout: Duration) -> u64 {
        let api = self.admin.clone();
        let p = pointer.to_string();
        wait_for(
            &format!("/health {pointer} to reach {at_least}"),
            timeout,
            || {
                let api = api.clone();
                let p = p.clone();
                async move {
                    let h = api.try_get("/health").await?.body;
                    let v = h.pointer(&p).and_then(Value::as_u64).unwrap_or(0);
                    (v >= at_least).then_some(v)
                }
            },
        )
        .await
    }

    /// Records stored of one agent, as `GET /agents/{id}` counts them.
    pub async fn records_of(&self, agent: &str) -> u64 {
        let r = self.admin.get(&format!("/agents/{agent}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["records_stored"]
            .as_u64()
            .unwrap_or_else(|| panic!("records_stored of {agent}: {}", r.body))
    }

    /// `GET /agents/{id}`.
    pub async fn agent(&self, agent: &str) -> Value {
        let r = self.admin.get(&format!("/agents/{agent}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        let r = self.admin.get("/metrics").await;
        assert_eq!(r.status, 200, "/metrics");
        match r.body {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Runs SQL on the store directly, as an operator (or a broken migration) would:
    /// on SQLite through a second connection to the file, on PostgreSQL through
    /// tokio-postgres.
    pub async fn store_sql(&self, sql: &str) {
        match self.store {
            StoreKind::Sqlite => {
                let path = self.sqlite.clone().expect("the SQLite file");
                let sql = sql.to_string();
                tokio::task::spawn_blocking(move || {
                    let c = rusqlite::Connection::open(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    c.busy_timeout(Duration::from_secs(20)).unwrap();
                    c.execute_batch(&sql)
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                })
                .await
                .unwrap();
            }
            StoreKind::Postgres => {
                let url = self.pg_url.clone().expect("the PostgreSQL URL");
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to PostgreSQL");
                let task = tokio::spawn(conn);
                client
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                drop(client);
                let _ = task.await;
            }
        }
    }
}

/// A process's resident memory, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the peak resident size since the process started.
    pub peak_kib: u64,
}

impl Memory {
    pub fn of(pid: i32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        }
    }
}

// ---------------------------------------------------------------------------------
// The hostile agent
// ---------------------------------------------------------------------------------

/// What the hostile agent's event loop saw.
#[derive(Default)]
struct Seen {
    /// Acked seqs per epoch (from verified acks).
    acked: Mutex<HashMap<u64, BTreeSet<u64>>>,
    /// Acks received and verified.
    acks: AtomicU64,
    /// Acks whose signature did not verify, or that did not decode.
    bad_acks: AtomicU64,
    /// Connections made (ConnAck), and subscriptions confirmed.
    connacks: AtomicU64,
    subacks: AtomicU64,
    /// Connection errors.
    errors: AtomicU64,
    /// Heartbeat period in ms; 0: none.
    heartbeat_ms: AtomicU64,
    stop: AtomicBool,
}

/// An enrolled agent identity driven by the test: every message it sends is signed
/// with its own key, as the real agent's are, and so passes the broker's ACL and the
/// bridge's signature check; what it sends is up to the test.
pub struct HostileAgent {
    pub id: String,
    pub token: String,
    key: MessageKey,
    client: AsyncClient,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
    /// The outbox epoch its hello announces.
    pub epoch: u64,
}

impl Drop for HostileAgent {
    fn drop(&mut self) {
        self.seen.stop.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

impl HostileAgent {
    /// Connects as `id` with `token` to the broker on 127.0.0.1:`port`, subscribes to
    /// its acks, and waits for the subscription.
    pub async fn connect(id: &str, token: &str, port: u16) -> HostileAgent {
        let key = wauth::message_key(token);
        let mut mo = MqttOptions::new(id, "127.0.0.1", port);
        mo.set_credentials(id, token)
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            // Attacks send messages up to the broker's limit and past it.
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(mo, 256);
        let seen = Arc::new(Seen::default());
        seen.heartbeat_ms.store(1000, Ordering::SeqCst);
        let ack_topic = wire::topic(id, Kind::Ack);
        let hb_topic = wire::topic(id, Kind::Heartbeat);
        let task = {
            let seen = seen.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let mut connected = false;
                let mut last_hb = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !seen.stop.load(Ordering::Relaxed) {
                    tokio::select! {
                        ev = eventloop.poll() => match ev {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                connected = true;
                                seen.connacks.fetch_add(1, Ordering::SeqCst);
                                let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                seen.subacks.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                                match wauth::verify(&key, &p.topic, &p.payload).map(wire::decode) {
                                    Ok(Ok(Envelope::Ack(ack))) => {
                                        let mut acked = seen.acked.lock().unwrap();
                                        let set = acked.entry(ack.epoch).or_default();
                                        for (lo, hi) in ack.ranges {
                                            set.extend(lo..=hi);
                                        }
                                        seen.acks.fetch_add(1, Ordering::SeqCst);
                                    }
                                    _ => {
                                        seen.bad_acks.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                            }
                            Ok(_) => {}
                            Err(_) => {
                                connected = false;
                                seen.errors.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        },
                        _ = tick.tick() => {
                            let every = seen.heartbeat_ms.load(Ordering::Relaxed);
                            if connected && every > 0 && last_hb.elapsed() >= Duration::from_millis(every) {
                                last_hb = Instant::now();
                                let hb = wire::encode(&Envelope::Heartbeat(Heartbeat {
                                    sent_at_ms: imn_proto::now_ms(),
                                    ..Default::default()
                                }));
                                let _ = client.try_publish(
                                    &hb_topic,
                                    QoS::AtMostOnce,
                                    false,
                                    wauth::sign(&key, &hb_topic, &hb),
                                );
                            }
                        }
                    }
                }
            })
        };
        let h = HostileAgent {
            id: id.to_string(),
            token: token.to_string(),
            key,
            client,
            seen,
            task,
            epoch: rand::random::<u64>() >> 1 | 1,
        };
        let s = h.seen.clone();
        wait_for(
            &format!("{id} to connect and subscribe to its acks"),
            Duration::from_secs(30),
            || {
                let s = s.clone();
                async move { (s.subacks.load(Ordering::SeqCst) > 0).then_some(()) }
            },
        )
        .await;
        h
    }

    pub fn topic(&self, kind: Kind) -> String {
        wire::topic(&self.id, kind)
    }

    /// Heartbeats every `every` (None: none). They keep the agent alive.
    pub fn heartbeats(&self, every: Option<Duration>) {
        self.seen.heartbeat_ms.store(
            every.map_or(0, |d| d.as_millis().max(1) as u64),
            Ordering::SeqCst,
        );
    }

    /// Signs `payload` (any bytes) for `kind`'s topic and publishes it, QoS 1. Waits
    /// only for room in the client's queue, not for the broker.
    pub async fn send_raw(&self, kind: Kind, payload: &[u8]) {
        self.send_signed(kind, self.sign(kind, payload)).await;
    }

    /// `payload` signed with its key for `kind`'s topic (to prepare a flood ahead).
    pub fn sign(&self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        wauth::sign(&self.key, &self.topic(kind), payload)
    }

    /// Publishes a payload as it is (signed by [`Self::sign`], or not at all), QoS 1.
    pub async fn send_signed(&self, kind: Kind, signed: Vec<u8>) {
        self.client
            .publish(self.topic(kind), QoS::AtLeastOnce, false, signed)
            .await
            .expect("the MQTT client's queue is open");
    }

    /// Encodes, signs and publishes an envelope on `kind`'s topic; returns its size.
    pub async fn send(&self, kind: Kind, env: &Envelope) -> usize {
        let bytes = wire::encode(env);
        self.send_raw(kind, &bytes).await;
        bytes.len()
    }

    /// Publishes a batch of `records` in `epoch` on its `out` topic; returns its size.
    pub async fn batch(&self, epoch: u64, records: Vec<Record>) -> usize {
        self.send(Kind::Out, &Envelope::Batch(wire::Batch { epoch, records }))
            .await
    }

    /// Its retained `online` status, as an agent sends on connect.
    pub async fn online(&self) {
        let topic = self.topic(Kind::Status);
        let payload = wire::encode(&Envelope::Status(Status {
            online: true,
            at_ms: imn_proto::now_ms(),
        }));
        self.client
            .publish(
                &topic,
                QoS::AtLeastOnce,
                true,
                wauth::sign(&self.key, &topic, &payload),
            )
            .await
            .expect("publish");
    }

    /// An honest-looking hello: the agent's own id and epoch, echo_module and
    /// ping_module loaded (so the API can address it), 1 s heartbeats.
    pub fn hello(&self) -> Hello {
        Hello {
            agent_id: self.id.clone(),
            version: "0.0.0-hostile".into(),
            arch: std::env::consts::ARCH.into(),
            modules: ["echo_module", "ping_module"]
                .iter()
                .map(|m| ModuleInfo {
                    name: m.to_string(),
                    version: "1".into(),
                    schema_hash: "hostile".into(),
                    config: None,
                })
                .collect(),
            tags: vec!["hostile".into()],
            location: None,
            schedule_version: 0,
            outbox_epoch: self.epoch,
            outbox_depth: 0,
            dropped: 0,
            heartbeat_interval_ms: 1000,
            sent_at_ms: imn_proto::now_ms(),
            features: Vec::new(),
            limits: Default::default(),
            schedule_policy: 0,
        }
    }

    /// Which seqs of `epoch` the backend has acked (in verified acks).
    pub fn acked(&self, epoch: u64) -> BTreeSet<u64> {
        self.seen
            .acked
            .lock()
            .unwrap()
            .get(&epoch)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `seq` of `epoch` was acked.
    pub fn is_acked(&self, epoch: u64, seq: u64) -> bool {
        self.seen
            .acked
            .lock()
            .unwrap()
            .get(&epoch)
            .is_some_and(|s| s.contains(&seq))
    }

    /// Verified acks received.
    pub fn acks_received(&self) -> u64 {
        self.seen.acks.load(Ordering::SeqCst)
    }

    /// Acks that did not verify with its key or did not decode (a bridge signing with
    /// the wrong key, or something else on its ack topic).
    pub fn bad_acks(&self) -> u64 {
        self.seen.bad_acks.load(Ordering::SeqCst)
    }

    /// Times the connection broke (the broker closing it counts).
    pub fn connection_errors(&self) -> u64 {
        self.seen.errors.load(Ordering::SeqCst)
    }

    /// Waits until every seq in `seqs` of `epoch` is acked.
    pub async fn wait_acked(&self, epoch: u64, seqs: &[u64], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let acked = self.acked(epoch);
            let missing: Vec<u64> = seqs
                .iter()
                .copied()
                .filter(|s| !acked.contains(s))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} of {} seqs not acked after {timeout:?} (first: {:?})",
                self.id,
                missing.len(),
                seqs.len(),
                &missing[..missing.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Delivers `batches` of `epoch` as an outbox does: at most `window` unacked at
    /// once, each sent again when not wholly acked within `resend` (a backend that
    /// sheds a message leaves it unacked); panics if they are not all acked within
    /// `timeout`. Returns (messages sent, of which resends, bytes sent).
    pub async fn deliver(
        &self,
        epoch: u64,
        batches: Vec<Vec<Record>>,
        window: usize,
        resend: Duration,
        timeout: Duration,
    ) -> (u64, u64, usize) {
        let started = Instant::now();
        let seqs: Vec<Vec<u64>> = batches
            .iter()
            .map(|b| b.iter().map(|r| r.seq).collect())
            .collect();
        let mut next = 0;
        let mut inflight: Vec<(usize, Instant)> = Vec::new();
        let (mut sent, mut resent, mut bytes) = (0u64, 0u64, 0usize);
        loop {
            let acked = self.acked(epoch);
            inflight.retain(|(i, _)| !seqs[*i].iter().all(|s| acked.contains(s)));
            if next == batches.len() && inflight.is_empty() {
                return (sent, resent, bytes);
            }
            assert!(
                started.elapsed() < timeout,
                "{}: {} of {} batches not acked after {timeout:?} ({sent} sent, {resent} resent)",
                self.id,
                inflight.len() + batches.len() - next,
                batches.len()
            );
            for (i, at) in inflight.iter_mut() {
                if at.elapsed() >= resend {
                    bytes += self.batch(epoch, batches[*i].clone()).await;
                    *at = Instant::now();
                    sent += 1;
                    resent += 1;
                }
            }
            while inflight.len() < window && next < batches.len() {
                bytes += self.batch(epoch, batches[next].clone()).await;
                inflight.push((next, Instant::now()));
                next += 1;
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a one-record batch in a fresh epoch and waits for its ack: everything
    /// this agent sent before it has been through ingest (one agent's messages are
    /// handled in order), so what was not acked by then will not be.
    pub async fn sync(&self, timeout: Duration) {
        let epoch = rand::random::<u64>() >> 1 | 1;
        self.batch(epoch, vec![event(1, "sync", "sync")]).await;
        self.wait_acked(epoch, &[1], timeout).await;
    }
}

// ---------------------------------------------------------------------------------
// Records an attack is made of
// ---------------------------------------------------------------------------------

/// An agent event record.
pub fn event(seq: u64, kind: &str, message: &str) -> Record {
    Record {
        seq,
        at_ms: imn_proto::now_ms(),
        body: RecordBody::Event(AgentEvent {
            kind: kind.into(),
            message: message.into(),
        }),
    }
}

/// A result record of `module` with `output`.
pub fn result(seq: u64, request_id: &str, module: &str, outcome: ModuleOutcome) -> Record {
    let now = imn_proto::now_ms();
    Record {
        seq,
        at_ms: now,
        body: RecordBody::Result(ModuleResult {
            request_id: request_id.into(),
            module: module.into(),
            received_ms: now - 3,
            started_ms: now - 2,
            finished_ms: now - 1,
            outcome,
        }),
    }
}

/// An echo result record.
pub fn echo(seq: u64, request_id: &str, message: &str) -> Record {
    result(
        seq,
        request_id,
        "echo_module",
        ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
            message: message.into(),
        })),
    )
}

/// A ping result with one target named `host`, one reply of 1 ms.
pub fn ping(seq: u64, request_id: &str, host: &str) -> Record {
    let mut t = imn_proto::results::PingResult::new(host, "127.0.0.1", 56);
    t.sent = 1;
    t.received = 1;
    t.rtts_ms = vec![Some(1.0)];
    t.min_ms = Some(1.0);
    t.avg_ms = Some(1.0);
    t.max_ms = Some(1.0);
    result(
        seq,
        request_id,
        "ping_module",
        ModuleOutcome::Ok(ModuleOutput::Ping(imn_proto::results::PingOutput {
            socket: "dgram".into(),
            src_addr: None,
            targets: vec![t],
        })),
    )
}

/// An HTTP result for `url` (status 200, 1 ms), built from its JSON form.
pub fn http(seq: u64, request_id: &str, url: &str) -> Record {
    let h: imn_proto::kinds::http::HttpResult = serde_json::from_value(json!({
        "url": url,
        "method": "GET",
        "addr": "127.0.0.1",
        "af": 4,
        "local_addr": null,
        "timing": {"dns_ms": 0.0, "connect_ms": 0.1, "tls_ms": null, "ttfb_ms": 0.5, "total_ms": 1.0},
        "response": null,
        "tls": null,
        "error": null,
        "error_phase": null,
        "redirects": [],
    }))
    .expect("an HttpResult from JSON");
    result(
        seq,
        request_id,
        "http",
        ModuleOutcome::Ok(ModuleOutput::Http(Box::new(h))),
    )
}

// ---------------------------------------------------------------------------------
// The honest agent's round trips
// ---------------------------------------------------------------------------------

/// One timed echo round trip.
#[derive(Debug, Clone)]
pub struct Sample {
    pub started: Instant,
    pub took: Duration,
    /// Why it failed; None when the echo came back with its message.
    pub failure: Option<String>,
}

#[derive(Default)]
struct ProbeState {
    samples: Mutex<Vec<Sample>>,
    /// The round trip under way, since when.
    inflight: Mutex<Option<Instant>>,
    stop: AtomicBool,
}

/// Echo round trips through the API to a real agent, one after another (100 ms apart),
/// timed, in the background: `POST /agent/{id}/echo_module?wait=10` must answer
/// `succeeded` with the message sent.
pub struct Probe {
    state: Arc<ProbeState>,
    task: tokio::task::JoinHandle<()>,
    pub started: Instant,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

impl Probe {
    pub fn start(api: &Api, agent: &str) -> Probe {
        let state = Arc::new(ProbeState::default());
        let (api, agent) = (api.clone(), agent.to_string());
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !st.stop.load(Ordering::Relaxed) {
                n += 1;
                let message = format!("honest-{n}");
                let started = Instant::now();
                *st.inflight.lock().unwrap() = Some(started);
                let r = api
                    .try_post(
                        &format!("/agent/{agent}/echo_module?wait={PROBE_WAIT_S}"),
                        &json!({ "message": message }).to_string(),
                    )
                    .await;
                let took = started.elapsed();
                let failure = match r {
                    None => Some("the API did not answer".to_string()),
                    Some(r) if r.body["state"] != "succeeded" => {
                        Some(format!("{} {}", r.status, r.body))
                    }
                    Some(r) if r.body["result"]["message"] != json!(message) => {
                        Some(format!("wrong echo: {}", r.body))
                    }
                    Some(_) => None,
                };
                {
                    let mut s = st.samples.lock().unwrap();
                    s.push(Sample {
                        started,
                        took,
                        failure,
                    });
                    *st.inflight.lock().unwrap() = None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Probe {
            state,
            task,
            started: Instant::now(),
        }
    }

    /// The round trips started from `from` on (and one still under way).
    pub fn since(&self, from: Instant) -> RoundTrips {
        let samples: Vec<Sample> = self
            .state
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.started >= from)
            .cloned()
            .collect();
        let inflight = *self.state.inflight.lock().unwrap();
        RoundTrips::of(samples, inflight.map(|t| t.elapsed()), from.elapsed())
    }

    /// The round trips from `from` on, once at least one started then has finished
    /// (or [`ROUND_TRIP_MAX`] and a second passed): for an attack shorter than a round
    /// trip, that the next one still comes back.
    pub async fn after(&self, from: Instant) -> RoundTrips {
        let deadline = Instant::now() + ROUND_TRIP_MAX + Duration::from_secs(1);
        loop {
            let rt = self.since(from);
            if !rt.samples.is_empty() || Instant::now() > deadline {
                return rt;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` round trips from now (a baseline), and returns them.
    pub async fn baseline(&self, n: usize) -> RoundTrips {
        let from = Instant::now();
        let deadline = from + Duration::from_secs(60);
        loop {
            let rt = self.since(from);
            if rt.samples.len() >= n {
                return rt;
            }
            assert!(
                Instant::now() < deadline,
                "no baseline after 60 s: {}",
                rt.describe()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The honest round trips of a time window.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    pub samples: Vec<Sample>,
    /// How long the round trip under way at the window's end had been waiting.
    pub pending: Option<Duration>,
    /// The window's length.
    pub window: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl RoundTrips {
    fn of(samples: Vec<Sample>, pending: Option<Duration>, window: Duration) -> RoundTrips {
        let mut t: Vec<Duration> = samples.iter().map(|s| s.took).collect();
        t.sort();
        let pick = |p: f64| {
            if t.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((p / 100.0) * t.len() as f64).ceil() as usize;
            t[rank.clamp(1, t.len()) - 1]
        };
        RoundTrips {
            p50: pick(50.0),
            p99: pick(99.0),
            max: t.last().copied().unwrap_or_default(),
            samples,
            pending,
            window,
        }
    }

    pub fn failures(&self) -> Vec<&str> {
        self.samples
            .iter()
            .filter_map(|s| s.failure.as_deref())
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} round trips in {:.1} s, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, {} failed{}",
            self.samples.len(),
            self.window.as_secs_f64(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
            self.failures().len(),
            self.pending
                .map(|p| format!(", one waiting for {:.0} ms", p.as_secs_f64() * 1e3))
                .unwrap_or_default()
        )
    }

    /// The honest agent's results kept arriving through the window: none failed,
    /// every one within [`ROUND_TRIP_MAX`] (the one under way too), the median within
    /// [`ROUND_TRIP_P50_MAX`], and at least one per [`ONE_ROUND_TRIP_PER`].
    pub fn assert_kept_arriving(&self, what: &str) {
        println!("{what}: honest {}", self.describe());
        assert!(
            self.failures().is_empty(),
            "{what}: honest round trips failed: {:?} ({})",
            self.failures(),
            self.describe()
        );
        assert!(
            self.max <= ROUND_TRIP_MAX && self.pending.is_none_or(|p| p <= ROUND_TRIP_MAX),
            "{what}: an honest round trip took longer than {ROUND_TRIP_MAX:?} ({})",
            self.describe()
        );
        assert!(
            self.p50 <= ROUND_TRIP_P50_MAX,
            "{what}: honest p50 over {ROUND_TRIP_P50_MAX:?} ({})",
            self.describe()
        );
        let want = (self.window.as_secs_f64() / ONE_ROUND_TRIP_PER.as_secs_f64()).floor() as usize;
        assert!(
            self.samples.len() >= want.max(1),
            "{what}: only {} honest round trips in {:.1} s (want {}) ({})",
            self.samples.len(),
            self.window.as_secs_f64(),
            want.max(1),
            self.describe()
        );
    }
}

impl Api {
    /// POST that returns None on a connection error or timeout.
    pub async fn try_post(&self, path: &str, body: &str) -> Option<crate::Reply> {
        let r = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .ok()?;
        Some(Api::reply(r).await)
    }
}

// ---------------------------------------------------------------------------------
// Peers for the agent's http and dns modules
// ---------------------------------------------------------------------------------

/// An HTTP/1.1 server on loopback answering every request with `body` (any bytes).
/// Returns its port; it runs until the test process ends.
pub fn http_peer(body: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(body);
            });
        }
    });
    port
}

/// A DNS responder on UDP loopback answering every query with one TXT record whose
/// single string is `txt` (any bytes, up to 255). Returns its port.
pub fn dns_txt_peer(txt: &'static [u8]) -> u16 {
    assert!(txt.len() < 256);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // The question: the name's labels up to the root, then type and class.
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += usize::from(q[i]) + 1;
            }
            let end = i + 5;
            if end > n {
                continue;
            }
            let mut r = Vec::with_capacity(64 + txt.len());
            r.extend_from_slice(&q[..2]); // id
            r.extend_from_slice(&[0x81, 0x80]); // QR RD RA, NOERROR
            r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]); // 1 question, 1 answer
            r.extend_from_slice(&q[12..end]);
            r.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 60]); // name, TXT, IN, TTL
            r.extend_from_slice(&((txt.len() + 1) as u16).to_be_bytes());
            r.push(txt.len() as u8);
            r.extend_from_slice(txt);
            let _ = sock.send_to(&r, from);
        }
    });
    port
}

/// The label values of a `/metrics` page: every `name="value"` between braces, with
/// the text format's escapes (`\\`, `\"`, `\n`) undone.
pub fn label_values(page: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some(open) = line.find('{') else {
            continue;
        };
        let mut chars = line[open + 1..].chars();
        let mut name = String::new();
        loop {
            match chars.next() {
                None | Some('}') => break,
                Some(',') => {}
                Some('=') => {
                    if chars.next() != Some('"') {
                        break;
                    }
                    let mut v = String::new();
                    loop {
                        match chars.next() {
                            None | Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some(c) => v.push(c),
                                None => break,
                            },
                            Some(c) => v.push(c),
                        }
                    }
                    out.push((std::mem::take(&mut name), v));
                }
                Some(c) => name.push(c),
            }
        }
    }
    out
}

/// Where the honest agent's last `n` round trips spent their time, from the stored
/// times (one machine, one clock): (command delivery: request created → agent
/// received it; result delivery: run finished → result stored), in ms.
pub async fn stage_times(api: &Api, agent: &str, n: usize) -> Vec<(i64, i64)> {
    let results = api
        .get(&format!("/agents/{agent}/results?limit={n}"))
        .await
        .body;
    let mut out = Vec::new();
    for r in results.as_array().cloned().unwrap_or_default() {
        let rid = r["request_id"].as_str().unwrap_or_default();
        let st = api.get(&format!("/modules/states/{rid}")).await.body;
        let ms = |v: &Value| {
            if v.is_string() {
                crate::ms_of(v)
            } else {
                0
            }
        };
        out.push((
            ms(&r["received_at"]) - ms(&st["created_at"]),
            ms(&r["stored_at"]) - ms(&r["finished_at"]),
        ));
    }
    out
}
