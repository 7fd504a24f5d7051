//! `imn-bench ingest` and `imn-bench fleet`: simulated agents (see [`crate::sim`])
//! against the real system, embedded (`imn up`) or split over NATS (`imn-bridge`,
//! `nats-server`, `imn-backend`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::bench_drain::rss_kib;
use crate::sim::{self, Control, SimConfig, SimStats};
use crate::{bin, free_port, Api, Nats, Proc, TempDir, Up};

/// The system under test.
pub enum System {
    Up {
        up: Up,
        /// With the admin token when auth is on.
        api: Api,
    },
    Split {
        dir: TempDir,
        _nats: Nats,
        backend: Proc,
        /// More backends on the same store (PostgreSQL).
        more_backends: Vec<Proc>,
        /// The PostgreSQL cluster and database URL, when the store is PostgreSQL.
        pg: Option<(imn_backend::store::pg_cluster::TempCluster, String)>,
        /// Bridges, each with its own MQTT port; agents may use any.
        bridges: Vec<(Proc, u16)>,
        api: Api,
    },
}

impl System {
    /// `imn up`, or with `nats` nats-server, imn-backend and `bridges` imn-bridges;
    /// with `auth`, all of them with `--auth`.
    pub async fn start(nats: bool, bridges: usize, auth: bool) -> System {
        System::start_with(nats, bridges, auth, 0).await
    }

    /// [`System::start`]; with `pg_backends` > 0, over NATS with that many backends
    /// sharing a PostgreSQL database (a durable cluster made for the run).
    pub async fn start_with(nats: bool, bridges: usize, auth: bool, pg_backends: usize) -> System {
        let auth_flag: &[&str] = if auth { &["--auth"] } else { &[] };
        if !nats {
            let up = Up::start(0, auth_flag).await;
            let api = if auth { up.admin() } else { up.api.clone() };
            return System::Up { up, api };
        }
        let dir = TempDir::new("bench-split");
        let n = Nats::start(dir.path()).await;
        let http_port = free_port();
        let mqtt_port = free_port();
        let data = dir.path().join("backend");
        let http = format!("127.0.0.1:{http_port}");
        let pg = if pg_backends > 0 {
            let cluster = tokio::task::spawn_blocking(|| {
                imn_backend::store::pg_cluster::TempCluster::start(true)
            })
            .await
            .expect("join")
            .expect("a PostgreSQL cluster for the benchmark");
            imn_backend::store::pg_cluster::create_database(&cluster.url("postgres"), "imn")
                .await
                .expect("CREATE DATABASE imn");
            let url = cluster.url("imn");
            Some((cluster, url))
        } else {
            None
        };
        let store_flag: Vec<&str> = match &pg {
            Some((_, url)) => vec!["--store", url.as_str()],
            None => vec![],
        };
        let backend = Proc::spawn(
            "imn-backend",
            &bin("imn-backend"),
            &[
                &[
                    "--http",
                    &http,
                    "--nats",
                    &n.url(),
                    "--data",
                    data.to_str().unwrap(),
                ],
                auth_flag,
                &store_flag,
            ]
            .concat(),
            dir.path(),
        );
        let mut more_backends = Vec::new();
        for b in 1..pg_backends {
            let data = dir.path().join(format!("backend-{b}"));
            more_backends.push(Proc::spawn(
                &format!("imn-backend-{b}"),
                &bin("imn-backend"),
                &[
                    &[
                        "--http",
                        &format!("127.0.0.1:{}", free_port()),
                        "--nats",
                        &n.url(),
                        "--data",
                        data.to_str().unwrap(),
                    ],
                    auth_flag,
                    &store_flag,
                ]
                .concat(),
                dir.path(),
            ));
        }
        let mut started = Vec::new();
        for b in 0..bridges.max(1) {
            let port = if b == 0 { mqtt_port } else { free_port() };
            let mqtt = format!("127.0.0.1:{port}");
            let p = Proc::spawn(
                &format!("imn-bridge-{b}"),
                &bin("imn-bridge"),
                &[
                    &["--mqtt", &mqtt, "--nats", &n.url(), "--metrics", "off"],
                    auth_flag,
                ]
                .concat(),
                dir.path(),
            );
            started.push((p, port));
        }
        let mut api = Api::new(http_port);
        if auth {
            let file = data.join("admin-token");
            let token = crate::wait_for("the admin token", Duration::from_secs(30), || {
                let file = file.clone();
                async move { std::fs::read_to_string(file).ok() }
            })
            .await;
            api = api.with_token(&token);
        }
        let a2 = api.clone();
        crate::wait_for("imn-backend to answer", Duration::from_secs(30), || {
            let a2 = a2.clone();
            async move {
                a2.try_get("/health")
                    .await
                    .filter(|r| r.status == 200)
                    .map(|_| ())
            }
        })
        .await;
        // A bridge listens once it has NATS.
        for &(_, port) in &started {
            crate::wait_for(
                "imn-bridge to listen",
                Duration::from_secs(30),
                || async move {
                    std::net::TcpStream::connect(("127.0.0.1", port))
                        .ok()
                        .map(|_| ())
                },
            )
            .await;
        }
        System::Split {
            dir,
            _nats: n,
            backend,
            more_backends,
            pg,
            bridges: started,
            api,
        }
    }

    pub fn api(&self) -> &Api {
        match self {
            System::Up { api, .. } => api,
            System::Split { api, .. } => api,
        }
    }

    /// Enrolls the simulated agents `sim-000000` … (auth on); returns their tokens.
    pub async fn enroll(&self, n: usize) -> Arc<std::collections::HashMap<String, String>> {
        let mut tokens = std::collections::HashMap::new();
        for i in 0..n {
            let id = sim_id(i);
            let token = self.api().enroll(&id).await;
            tokens.insert(id, token);
        }
        Arc::new(tokens)
    }

    /// The MQTT ports agents may connect to.
    pub fn mqtt_ports(&self) -> Vec<u16> {
        match self {
            System::Up { up, .. } => vec![up.mqtt_port],
            System::Split { bridges, .. } => bridges.iter().map(|b| b.1).collect(),
        }
    }

    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_ports()[0]
    }

    fn db_path(&self) -> PathBuf {
        match self {
            System::Up { up, .. } => up.dir.path().join("data/backend/backend.sqlite"),
            System::Split { dir, .. } => dir.path().join("backend/backend.sqlite"),
        }
    }

    /// RSS of the processes that serve agents: `imn up`, or bridge and backend.
    pub fn rss_mib(&self) -> Value {
        let mib = |pid: i32| rss_kib(pid) as f64 / 1024.0;
        match self {
            System::Up { up, .. } => json!({"imn_up_rss_mib": mib(up.proc.pid())}),
            System::Split {
                backend,
                more_backends,
                bridges,
                ..
            } => {
                let bridge: f64 = bridges.iter().map(|b| mib(b.0.pid())).sum();
                let backends: f64 = std::iter::once(backend)
                    .chain(more_backends)
                    .map(|b| mib(b.pid()))
                    .sum();
                json!({
                    "bridges": bridges.len(),
                    "backends": 1 + more_backends.len(),
                    "bridge_rss_mib": bridge,
                    "backend_rss_mib": backends,
                    "bridge_plus_backend_rss_mib": bridge + backends,
                })
            }
        }
    }

    /// CPU seconds used so far by each part of the system: backends, bridges, NATS and
    /// PostgreSQL (the postmaster and every process it started).
    pub fn cpu_s(&self) -> Value {
        let System::Split {
            _nats,
            backend,
            more_backends,
            bridges,
            pg,
            ..
        } = self
        else {
            return json!({});
        };
        let backends: f64 = std::iter::once(backend)
            .chain(more_backends)
            .map(|b| cpu_s(b.pid()))
            .sum();
        let bridges: f64 = bridges.iter().map(|b| cpu_s(b.0.pid())).sum();
        let postgres = pg.as_ref().map(|(c, _)| {
            let root = c.pid() as i32;
            cpu_s(root) + children_of(root).into_iter().map(cpu_s).sum::<f64>()
        });
        json!({
            "backends": backends,
            "bridges": bridges,
            "nats": cpu_s(_nats.proc.pid()),
            "postgres": postgres,
            "bench": cpu_s(std::process::id() as i32),
        })
    }

    /// PostgreSQL's write-ahead log so far: (bytes, syncs to disk).
    async fn wal(&self) -> Option<(i64, i64)> {
        let System::Split {
            pg: Some((_, url)), ..
        } = self
        else {
            return None;
        };
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT wal_bytes::BIGINT, wal_sync FROM pg_stat_wal", &[])
            .await
            .ok()?;
        Some((row.get(0), row.get(1)))
    }

    /// (result rows, distinct request ids) of simulated agents in the backend's store,
    /// and the bytes the store takes on disk for its records (SQLite: the database
    /// file and its WAL; PostgreSQL: the records table's partitions with indexes).
    async fn stored(&self) -> (u64, u64, u64) {
        if let System::Split {
            pg: Some((_, url)), ..
        } = self
        {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to the benchmark's PostgreSQL");
            tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records WHERE kind = 'result' AND agent_id LIKE 'sim-%'",
                    &[],
                )
                .await
                .expect("count results");
            let store = imn_backend::store::PostgresStore::connect(url)
                .await
                .expect("the store");
            let (records_bytes, _) = store.sizes().await.expect("sizes");
            return (
                row.get::<_, i64>(0) as u64,
                row.get::<_, i64>(1) as u64,
                records_bytes as u64,
            );
        }
        let (rows, distinct) = self.stored_results();
        let db = self.db_path();
        let bytes: u64 = ["", "-wal"]
            .iter()
            .filter_map(|x| std::fs::metadata(format!("{}{x}", db.display())).ok())
            .map(|m| m.len())
            .sum();
        (rows, distinct, bytes)
    }

    /// (result rows, distinct request ids) of simulated agents in the backend's store.
    fn stored_results(&self) -> (u64, u64) {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("backend store");
        conn.query_row(
            "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records WHERE kind = 'result' AND agent_id LIKE 'sim-%'",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
        .expect("count results")
    }
}

/// CPU seconds (user and system) a process has used, 0 if it is gone.
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields counted from the state (index 0 = field 3).
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |r| r.1);
        if rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Differences of two [`System::cpu_s`] readings, per part.
fn cpu_delta(before: &Value, after: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(a) = after.as_object() {
        for (k, v) in a {
            if let (Some(x), Some(y)) = (v.as_f64(), before[k].as_f64()) {
                out.insert(k.clone(), json!(((x - y) * 100.0).round() / 100.0));
            }
        }
    }
    Value::Object(out)
}

/// A client paging `GET /v1/results` by cursor while the agents send: every result
/// it reads, and how many it read more than once.
struct Reader {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, u64, u64)>,
}

impl Reader {
    fn start(api: Api) -> Reader {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let (mut twice, mut pages) = (0u64, 0u64);
            let mut cursor = String::new();
            loop {
                // Stopped only after a page that came back short, once told to.
                let stopping = done.load(Ordering::SeqCst);
                let r = api
                    .get(&format!("/v1/results?limit=1000&cursor={cursor}"))
                    .await;
                if r.status != 200 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                pages += 1;
                let results = r.body["results"].as_array().cloned().unwrap_or_default();
                for x in &results {
                    let key = (
                        x["agent_id"].as_str().unwrap_or("").to_string(),
                        x["request_id"].as_str().unwrap_or("").to_string(),
                    );
                    if !seen.insert(key) {
                        twice += 1;
                    }
                }
                if let Some(c) = r.body["next_cursor"].as_str() {
                    cursor = c.to_string();
                }
                if results.len() < 1000 {
                    if stopping {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (seen.len(), twice, pages)
        });
        Reader { stop, task }
    }

    /// Reads to the end of what is stored now: (distinct results, read twice, pages).
    async fn finish(self) -> (usize, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("reader")
    }
}

/// The id of the `i`th simulated agent.
fn sim_id(i: usize) -> String {
    format!("sim-{i:06}")
}

/// Simulated agents of one run.
struct Fleet {
    stats: Arc<SimStats>,
    ctl: Arc<Control>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts `n` agents, `per_second` at a time, and waits until all connected.
    async fn start(n: usize, cfg: SimConfig, per_second: f64, timeout: Duration) -> (Fleet, f64) {
        let cfg = Arc::new(cfg);
        let stats = Arc::new(SimStats::default());
        let ctl = Arc::new(Control::default());
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let due = t0 + Duration::from_secs_f64(i as f64 / per_second);
            tokio::time::sleep_until(due.into()).await;
            tasks.push(tokio::spawn(sim::run(
                sim_id(i),
                cfg.clone(),
                stats.clone(),
                ctl.clone(),
            )));
        }
        let deadline = t0 + timeout;
        while stats.connected.load(Ordering::Relaxed) < n as u64 {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} simulated agents connected",
                stats.connected.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connect_s = t0.elapsed().as_secs_f64();
        (Fleet { stats, ctl, tasks }, connect_s)
    }

    async fn stop(self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.ctl.go.notify_waiters();
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn wait_known(api: &Api, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let known = api
            .try_get("/health")
            .await
            .and_then(|r| r.body["agents_known"].as_u64())
            .unwrap_or(0);
        if known >= n as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backend knows {known} of {n} agents"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// QoS1 publishes of `bytes`-sized payloads from `publishers` clients into the broker
/// at `port`, `total` in all, with one QoS0 subscriber counting them: messages/s as
/// the subscriber saw them.
async fn raw_broker(port: u16, publishers: usize, total: u64, bytes: usize) -> f64 {
    let topic = |i: usize| format!("bench/raw/{i}");
    let mut so = MqttOptions::new("bench-raw-sub", "127.0.0.1", port);
    so.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_loop) = AsyncClient::new(so, 64);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let counter = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut n = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    first.get_or_insert_with(Instant::now);
                    n += 1;
                    if n == total {
                        return first.map(|f| f.elapsed()).unwrap_or_default();
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    sub.subscribe("bench/raw/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    let payload = vec![0x5au8; bytes];
    let per = total / publishers as u64;
    let mut pubs = Vec::new();
    for i in 0..publishers {
        let n = if i == 0 {
            total - per * (publishers as u64 - 1)
        } else {
            per
        };
        let payload = payload.clone();
        let t = topic(i);
        pubs.push(tokio::spawn(async move {
            let mut o = MqttOptions::new(format!("bench-raw-{i}"), "127.0.0.1", port);
            o.set_max_packet_size(1 << 20, 1 << 20).set_inflight(64);
            let (c, mut el) = AsyncClient::new(o, 128);
            let sender = tokio::spawn(async move {
                for _ in 0..n {
                    if c.publish(&t, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let mut acked = 0u64;
            while acked < n {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            let _ = sender.await;
        }));
    }
    let elapsed = match tokio::time::timeout(Duration::from_secs(300), counter).await {
        Ok(Ok(d)) => d.as_secs_f64(),
        _ => f64::NAN,
    };
    for p in pubs {
        p.abort();
    }
    total as f64 / elapsed
}

/// `imn-bench ingest`: `agents` simulated agents send `results` results in all, one
/// message of `per_message` results at a time with a window per agent. With `auth`,
/// the same run twice, without and then with auth (enrolled agents, signed messages),
/// and their ratio.
pub async fn ingest(
    agents: usize,
    results: u64,
    nats: bool,
    per_message: usize,
    auth: bool,
) -> Value {
    if !auth {
        return ingest_once(agents, results, nats, per_message, false).await;
    }
    let plain = ingest_once(agents, results, nats, per_message, false).await;
    let with_auth = ingest_once(agents, results, nats, per_message, true).await;
    let rate = |v: &Value| v["results_per_s"].as_f64().unwrap_or(f64::NAN);
    json!({
        "scenario": "ingest-auth",
        "mode": if nats { "nats" } else { "embedded" },
        "note": "the same ingest without and with auth (login check, broker ACL, an HMAC-SHA256 per message each way)",
        "plain": plain,
        "auth": with_auth,
        "ratio_auth_vs_plain": rate(&with_auth) / rate(&plain),
    })
}

async fn ingest_once(
    agents: usize,
    results: u64,
    nats: bool,
    per_message: usize,
    auth: bool,
) -> Value {
    ingest_run(agents, results, nats, per_message, auth, 0, None).await
}

/// `imn-bench ingest --baseline DIR`: the embedded ingest against an earlier build's
/// `imn` (DIR/imn; the simulated agents speak its wire version 1) and against this
/// one, in the order this, baseline, baseline, this; results/s of each and the ratio.
pub async fn ingest_baseline(
    agents: usize,
    results: u64,
    per_message: usize,
    dir: &std::path::Path,
) -> Value {
    let old = dir.join("imn");
    assert!(
        old.exists(),
        "{} is missing: build the baseline first",
        old.display()
    );
    let mut runs = Vec::new();
    for baseline in [false, true, true, false] {
        let program = baseline.then_some(old.as_path());
        runs.push((
            baseline,
            ingest_run(agents, results, false, per_message, false, 0, program).await,
        ));
    }
    let mean = |base: bool, k: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|(b, _)| *b == base)
            .filter_map(|(_, r)| r[k].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    json!({
        "scenario": "ingest-baseline",
        "note": "the same embedded ingest against an earlier build and this one (order: this, baseline, baseline, this); means of two runs each",
        "baseline": dir.display().to_string(),
        "baseline_results_per_s": mean(true, "results_per_s"),
        "results_per_s": mean(false, "results_per_s"),
        "ratio_vs_baseline": mean(false, "results_per_s") / mean(true, "results_per_s"),
        "baseline_ratio_vs_raw": mean(true, "ratio_vs_raw"),
        "ratio_vs_raw": mean(false, "ratio_vs_raw"),
        "runs": runs.into_iter().map(|(b, r)| json!({"baseline": b, "run": r})).collect::<Vec<_>>(),
    })
}

/// `imn-bench ingest --postgres`: over NATS, one backend on the embedded store, then
/// two backends sharing PostgreSQL, in one run.
pub async fn ingest_postgres(agents: usize, results: u64, per_message: usize) -> Value {
    let embedded = ingest_run(agents, results, true, per_message, false, 0, None).await;
    let postgres = ingest_run(agents, results, true, per_message, false, 2, None).await;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    json!({
        "scenario": "ingest-postgres",
        "note": "the same ingest over NATS: one backend on the embedded store (SQLite), then two backends sharing one PostgreSQL (fsync on, like production)",
        "embedded": embedded,
        "postgres_two_backends": postgres,
        "ratio_results_per_s_postgres_vs_embedded": f(&postgres, "results_per_s") / f(&embedded, "results_per_s"),
        "ratio_bytes_per_result_postgres_vs_embedded": f(&postgres, "store_bytes_per_result") / f(&embedded, "store_bytes_per_result"),
    })
}

/// `imn-bench ingest --postgres --backends 1,2,3`: over NATS, PostgreSQL with each
/// number of backends in turn (a new cluster each), while a client pages through the
/// results; the last field is the list of runs.
pub async fn ingest_postgres_backends(
    agents: usize,
    results: u64,
    per_message: usize,
    backends: &[usize],
) -> Value {
    let mut runs = Vec::new();
    for &n in backends {
        let r = ingest_run(agents, results, true, per_message, false, n.max(1), None).await;
        runs.push(json!({
            "backends": n.max(1),
            "results_per_s": r["results_per_s"],
            "lost": r["lost"],
            "duplicates_stored": r["duplicates_stored"],
            "reader_every_result_once": r["reader"]["every_result_once"],
            "cpu_cores_busy": r["cpu_cores_busy"],
            "run": r,
        }));
    }
    let rate = |i: usize| runs.get(i).and_then(|r| r["results_per_s"].as_f64());
    json!({
        "scenario": "ingest-postgres-backends",
        "note": "the same ingest over NATS into one PostgreSQL (fsync on) with each number of backends writing in parallel, a client paging GET /v1/results throughout",
        "ratio_last_vs_first": rate(runs.len().saturating_sub(1)).zip(rate(0)).map(|(a, b)| a / b),
        "runs": runs,
    })
}

async fn ingest_run(
    agents: usize,
    results: u64,
    nats: bool,
    per_message: usize,
    auth: bool,
    pg_backends: usize,
    baseline: Option<&std::path::Path>,
) -> Value {
    let nofile = sim::raise_nofile();
    let sys = match baseline {
        Some(program) => {
            let up = Up::start_program(program, 0, &[], &[]).await;
            let api = up.api.clone();
            System::Up { up, api }
        }
        None => System::start_with(nats, 1, auth, pg_backends).await,
    };
    // An earlier build reads wire version 1 only.
    let wire_version = baseline.map(|_| imn_proto::wire::LEGACY_WIRE_VERSION);
    let tokens = if auth {
        Some(sys.enroll(agents).await)
    } else {
        None
    };
    let per_agent = results.div_ceil(agents as u64);
    let total = per_agent * agents as u64;
    let cfg = SimConfig {
        host: "127.0.0.1".into(),
        port: sys.mqtt_port(),
        heartbeat: Duration::from_secs(10),
        results: per_agent,
        per_message,
        window: 8,
        message: "result of a simulated echo".into(),
        resend_after: Duration::from_secs(20),
        tokens,
        wire_version: wire_version.unwrap_or(imn_proto::wire::WIRE_VERSION),
    };
    let bytes = sim::message_bytes(&cfg);
    let (fleet, connect_s) = Fleet::start(agents, cfg, 2000.0, Duration::from_secs(300)).await;
    wait_known(sys.api(), agents, Duration::from_secs(120)).await;
    // With PostgreSQL, a client pages through the results as they are written.
    let reader = (pg_backends > 0).then(|| Reader::start(sys.api().clone()));
    let cpu_before = sys.cpu_s();
    let wal_before = sys.wal().await;
    let t0 = Instant::now();
    fleet.ctl.start_results();
    let deadline = t0 + Duration::from_secs(900);
    while fleet.stats.done.load(Ordering::Relaxed) < agents as u64 {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked = fleet.stats.results_acked.load(Ordering::Relaxed);
    let last = *fleet
        .stats
        .last_ack
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let elapsed = last
        .map(|l| l.duration_since(t0))
        .unwrap_or_else(|| t0.elapsed())
        .as_secs_f64();
    let resent = fleet.stats.resent.load(Ordering::Relaxed);
    let cpu = cpu_delta(&cpu_before, &sys.cpu_s());
    let wal = sys
        .wal()
        .await
        .zip(wal_before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1));
    let rss = sys.rss_mib();
    // How long the store spent in group commits: the share of the run it was busy.
    let health = sys.api().get("/health").await.body;
    let store_busy_s = health["store_busy_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    let store_groups = health["store_groups"].as_u64().unwrap_or(0);
    fleet.stop().await;
    let (rows, distinct, store_bytes) = sys.stored().await;
    let read = match reader {
        Some(r) => {
            let (read, twice, pages) = r.finish().await;
            json!({
                "distinct_read": read,
                "read_twice": twice,
                "pages": pages,
                "every_result_once": read as u64 == distinct && twice == 0,
            })
        }
        None => Value::Null,
    };
    // The same number of messages, the same size, through the same broker.
    let messages = total.div_ceil(per_message as u64);
    // The raw clients have no credentials: with auth the comparison is against the
    // run without it (see `ingest`).
    let raw = if auth {
        f64::NAN
    } else {
        raw_broker(sys.mqtt_port(), agents.min(100), messages, bytes).await
    };
    let results_per_s = acked as f64 / elapsed;
    let msgs_per_s = results_per_s / per_message as f64;
    json!({
        "scenario": "ingest",
        "mode": if nats { "nats" } else { "embedded" },
        "store": if pg_backends > 0 { "postgres" } else { "embedded" },
        "backends": pg_backends.max(1),
        "auth": auth,
        "agents": agents,
        "results": total,
        "results_per_message": per_message,
        "message_bytes": bytes,
        "connect_s": connect_s,
        "elapsed_s": elapsed,
        "results_acked": acked,
        "results_per_s": results_per_s,
        "lost": total.saturating_sub(distinct),
        "duplicates_stored": rows - distinct,
        "store_bytes": store_bytes,
        "store_bytes_per_result": store_bytes as f64 / rows.max(1) as f64,
        "resent_messages": resent,
        "store_group_commits": store_groups,
        "store_busy_s": store_busy_s,
        "broker_raw_msgs_per_s": (!auth).then_some(raw),
        "ratio_vs_raw": (!auth).then_some(msgs_per_s / raw),
        "rss": rss,
        "cpu_s": cpu,
        "cpu_cores_busy": cpu.as_object().map(|o| o.values().filter_map(Value::as_f64).sum::<f64>() / elapsed),
        "wal_bytes_per_result": wal.map(|(b, _)| b as f64 / rows.max(1) as f64),
        "wal_syncs": wal.map(|w| w.1),
        "reader": read,
        "nofile_limit": nofile,
    })
}

/// Agents per simulated-agent process: each connection costs a descriptor, and this
/// machine's hard limit is 20,000 per process.
const AGENTS_PER_WORKER: usize = 10_000;

/// `imn-bench fleet`: `agents` simulated agents connect and heartbeat every `hb`.
/// With `bridges` > 1 the system is split over NATS and the agents spread over the
/// bridges (one broker process holds at most the descriptor limit in connections).
/// The agents run in worker processes (`imn-bench sim-worker`) of at most
/// [`AGENTS_PER_WORKER`] each.
pub async fn fleet(agents: usize, hb: Duration, hold: Duration, bridges: usize) -> Value {
    let nofile = sim::raise_nofile();
    let split = bridges > 1;
    let sys = System::start(split, bridges, false).await;
    let ports = sys.mqtt_ports();
    // What the processes take before any agent connects.
    let rss_idle = sys.rss_mib();
    let t0 = Instant::now();
    let workers = agents.div_ceil(AGENTS_PER_WORKER);
    let mut procs = Vec::new();
    for w in 0..workers {
        let offset = w * AGENTS_PER_WORKER;
        let n = AGENTS_PER_WORKER.min(agents - offset);
        let port = ports[w % ports.len()];
        let child = tokio::process::Command::new(bin("imn-bench"))
            .args([
                "sim-worker",
                "--port",
                &port.to_string(),
                "--agents",
                &n.to_string(),
                "--offset",
                &offset.to_string(),
                "--hb-interval",
                &hb.as_secs_f64().to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("imn-bench sim-worker");
        procs.push(child);
    }
    // Each worker prints "connected N" as its agents connect.
    let mut counts = vec![0u64; workers];
    let mut readers = Vec::new();
    for p in procs.iter_mut() {
        let out = p.stdout.take().expect("worker stdout");
        readers.push(tokio::io::AsyncBufReadExt::lines(
            tokio::io::BufReader::new(out),
        ));
    }
    let deadline = t0 + Duration::from_secs(600);
    loop {
        for (i, r) in readers.iter_mut().enumerate() {
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(5), r.next_line()).await
            {
                if let Some(n) = line.strip_prefix("connected ").and_then(|n| n.parse().ok()) {
                    counts[i] = n;
                }
            }
        }
        if counts.iter().sum::<u64>() >= agents as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {agents} simulated agents connected",
            counts.iter().sum::<u64>()
        );
    }
    let connect_s = t0.elapsed().as_secs_f64();
    wait_known(sys.api(), agents, Duration::from_secs(300)).await;
    // Every agent heartbeats a few times.
    tokio::time::sleep(hold).await;
    let api = sys.api();
    let total = |r: &crate::Reply| {
        r.headers
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let alive = total(&api.get("/agents/alive?limit=1").await);
    // Every agent's heartbeat lag, a page at a time.
    let mut lags: Vec<f64> = Vec::new();
    let mut after = String::new();
    loop {
        let r = api.get(&format!("/agents?limit=10000&after={after}")).await;
        let page = r.body.as_array().cloned().unwrap_or_default();
        lags.extend(page.iter().filter_map(|x| x["heartbeat_lag_ms"].as_f64()));
        match page.last().and_then(|a| a["id"].as_str()) {
            Some(id) if r.headers.contains_key("link") => after = id.to_string(),
            _ => break,
        }
    }
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| crate::percentile(&lags, p);
    // The API under the fleet: each request 100 times, one after another.
    let mid = sim_id(agents / 2);
    let mut latencies = serde_json::Map::new();
    for path in [
        "/agents?alive=true".to_string(),
        format!("/agents?alive=true&after={mid}"),
        "/agents/alive".to_string(),
        "/agents?tag=none".to_string(),
        format!("/agents/{mid}"),
        "/health".to_string(),
    ] {
        let mut ms = Vec::new();
        let mut status = 0;
        for _ in 0..100 {
            let t = Instant::now();
            status = api.get(&path).await.status;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        latencies.insert(
            path,
            json!({
                "status": status,
                "p50_ms": crate::percentile(&ms, 50.0),
                "p99_ms": crate::percentile(&ms, 99.0),
                "max_ms": ms.last(),
            }),
        );
    }
    let rss = sys.rss_mib();
    let per_agent_kib = |k: &str| {
        let (a, b) = (rss[k].as_f64(), rss_idle[k].as_f64());
        a.zip(b).map(|(a, b)| (a - b) * 1024.0 / agents as f64)
    };
    let memory = json!({
        "bridges_kib_per_agent": per_agent_kib("bridge_rss_mib"),
        "backends_kib_per_agent": per_agent_kib("backend_rss_mib"),
        "imn_up_kib_per_agent": per_agent_kib("imn_up_rss_mib"),
    });
    let worker_rss: f64 = procs
        .iter()
        .filter_map(|p| p.id())
        .map(|pid| rss_kib(pid as i32) as f64 / 1024.0)
        .sum();
    drop(procs);
    json!({
        "scenario": "fleet",
        "mode": if split { "nats" } else { "embedded" },
        "agents": agents,
        "hb_interval_s": hb.as_secs_f64(),
        "connect_s": connect_s,
        "alive_reported": alive,
        "alive_exact": alive == agents,
        "heartbeat_lags_reported": lags.len(),
        "hb_lag_p50_ms": pct(50.0),
        "hb_lag_p99_ms": pct(99.0),
        "hb_lag_max_ms": lags.last().copied().unwrap_or(f64::NAN),
        "rss": rss,
        "rss_idle": rss_idle,
        "memory_per_agent": memory,
        "api_latency": latencies,
        "sim_workers": workers,
        "sim_workers_rss_mib": worker_rss,
        "nofile_limit": nofile,
    })
}

/// `imn-bench sim-worker`: runs `agents` simulated agents against `port` until its
/// stdin closes, printing `connected N` as they connect.
pub async fn sim_worker(port: u16, agents: usize, offset: usize, hb: Duration) {
    sim::raise_nofile();
    let cfg = Arc::new(SimConfig {
        host: "127.0.0.1".into(),
        port,
        heartbeat: hb,
        results: 0,
        per_message: 1,
        window: 1,
        message: String::new(),
        resend_after: Duration::from_secs(60),
        tokens: None,
        wire_version: imn_proto::wire::WIRE_VERSION,
    });
    let stats = Arc::new(SimStats::default());
    let ctl = Arc::new(Control::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let mut last = u64::MAX;
        loop {
            let n = st.connected.load(Ordering::Relaxed);
            if n != last {
                println!("connected {n}");
                last = n;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let t0 = Instant::now();
    for i in 0..agents {
        // 2,000 connects a second: the broker's listen backlog is 128.
        let due = t0 + Duration::from_secs_f64(i as f64 / 2000.0);
        tokio::time::sleep_until(due.into()).await;
        tokio::spawn(sim::run(
            format!("sim-{:06}", offset + i),
            cfg.clone(),
            stats.clone(),
            ctl.clone(),
        ));
    }
    // Until the parent closes stdin (or dies).
    let _ = tokio::task::spawn_blocking(|| {
        let mut buf = String::new();
        let _ = std::io::stdin().read_line(&mut buf);
    })
    .await;
    ctl.stop.store(true, Ordering::SeqCst);
}
