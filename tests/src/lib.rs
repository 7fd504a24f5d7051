//! Harness for IMN's end-to-end tests: start the project's real binaries and real
//! peers (nats-server) on free loopback ports, in throwaway directories, and kill
//! them when the test ends.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the
//! README's test command does).

pub mod bench_drain;
pub mod bench_firmware;
pub mod bench_ingest;
pub mod bench_ping;
pub mod bench_wasm;
pub mod hostile;
pub mod mosquitto;
pub mod nbd;
pub mod netns;
pub mod otlp;
pub mod packages;
pub mod peers;
pub mod proxy;
pub mod sim;
pub mod wasm;
pub mod webdriver;
pub mod wire_compat;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of one of the workspace's binaries, next to the test executable's folder.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/debug/deps/, imn-bench from target/debug/.
    let here = exe.parent().expect("exe dir");
    let p = [here, here.parent().unwrap_or(here)]
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Finds a program on PATH or in the sbin folders Debian installs servers to.
pub fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    found
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A directory removed when dropped (kept if the test failed, for its logs).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "imn-test-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process, killed when dropped. Its output goes to `log`.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str], log_dir: &Path) -> Proc {
        Proc::spawn_env(name, program, args, &[], log_dir)
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("IMN_TEST_LOG").unwrap_or_else(|_| "info,rumqttd=warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no chance to clean up, as in a power cut of the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal and waits up to `timeout` for the exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small JSON client for the REST API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: reqwest::Client,
    /// Sent as `Authorization: Bearer …` when set.
    token: Option<String>,
}

/// Status and parsed JSON body of a response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Api {
    pub fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            token: None,
        }
    }

    /// The API over HTTPS at `https://localhost:{port}`, trusting the CA in `ca_pem`.
    pub fn https(port: u16, ca_pem: &Path) -> Api {
        let pem = std::fs::read(ca_pem).expect("CA file");
        let ca = reqwest::Certificate::from_pem(&pem).expect("CA PEM");
        Api {
            base: format!("https://localhost:{port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .add_root_certificate(ca)
                .build()
                .expect("https client"),
            token: None,
        }
    }

    /// The same API, sending this bearer token.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.trim().to_string()),
            ..self.clone()
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn reply(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        let r = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        Self::reply(r).await
    }

    /// GET that returns None on a connection error (the server is not up yet).
    pub async fn try_get(&self, path: &str) -> Option<Reply> {
        let r = self.request(reqwest::Method::GET, path).send().await.ok()?;
        Some(Self::reply(r).await)
    }

    pub async fn post(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::reply(req.send().await.expect("POST")).await
    }

    /// POST of raw bytes (`application/octet-stream`).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Reply {
        let req = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/octet-stream")
            .body(body);
        Self::reply(req.send().await.expect("POST")).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Reply {
        self.put_raw(path, &body.to_string()).await
    }

    /// PUT of a raw body, as given.
    pub async fn put_raw(&self, path: &str, body: &str) -> Reply {
        let r = self
            .request(reqwest::Method::PUT, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("PUT");
        Self::reply(r).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        let r = self
            .request(reqwest::Method::DELETE, path)
            .send()
            .await
            .expect("DELETE");
        Self::reply(r).await
    }

    /// Waits until `/agents/alive` lists exactly these agents (at least).
    /// Enrolls agent `id` (admin token needed) and returns its token. Over the token's
    /// rate it waits as the 429 says, as any client should.
    pub async fn enroll(&self, id: &str) -> String {
        let body = serde_json::json!({ "id": id }).to_string();
        let mut r = self.post("/admin/agents", &body, &[]).await;
        while r.status == 429 {
            let s = r.body["retry_after_s"].as_u64().unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(s)).await;
            r = self.post("/admin/agents", &body, &[]).await;
        }
        assert_eq!(r.status, 201, "enrolling {id}: {:?}", r.body);
        r.body["token"]
            .as_str()
            .expect("the token, in the enrollment's answer")
            .to_string()
    }

    pub async fn wait_alive(&self, ids: &[&str], timeout: Duration) {
        let api = self.clone();
        let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        wait_for(&format!("agents {ids:?} alive"), timeout, || {
            let api = api.clone();
            let want = want.clone();
            async move {
                let r = api.try_get("/agents/alive").await?;
                let alive: Vec<String> = r
                    .body
                    .as_array()?
                    .iter()
                    .filter_map(|a| a["id"].as_str().map(str::to_string))
                    .collect();
                want.iter().all(|w| alive.contains(w)).then_some(())
            }
        })
        .await
    }

    /// Waits until the agent is no longer listed alive.
    pub async fn wait_not_alive(&self, id: &str, timeout: Duration) {
        let api = self.clone();
        let id = id.to_string();
        wait_for(&format!("agent {id} not alive"), timeout, || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let r = api.try_get(&format!("/agents/{id}")).await?;
                (r.body["alive"] == Value::Bool(false)).then_some(())
            }
        })
        .await
    }

    /// Waits until a request reaches the given state.
    pub async fn wait_state(&self, request_id: &str, state: &str, timeout: Duration) -> Value {
        let api = self.clone();
        let (rid, st) = (request_id.to_string(), state.to_string());
        wait_for(&format!("request {request_id} {state}"), timeout, || {
            let api = api.clone();
            let (rid, st) = (rid.clone(), st.clone());
            async move {
                let r = api.try_get(&format!("/modules/states/{rid}")).await?;
                (r.body["state"] == Value::String(st)).then_some(r.body)
            }
        })
        .await
    }
}

/// `imn up` on free ports with fast heartbeats.
pub struct Up {
    pub proc: Proc,
    pub api: Api,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub dir: TempDir,
}

impl Up {
    pub async fn start(agents: usize, extra: &[&str]) -> Up {
        Up::start_env(agents, extra, &[]).await
    }

    /// [`Up::start`] with extra environment variables.
    pub async fn start_env(agents: usize, extra: &[&str], env: &[(&str, &str)]) -> Up {
        Up::start_program(&bin("imn"), agents, extra, env).await
    }

    /// [`Up::start_env`] with another `imn` binary (an earlier build, for comparisons).
    pub async fn start_program(
        program: &Path,
        agents: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Up {
        let dir = TempDir::new("up");
        let http_port = free_port();
        let mqtt_port = free_port();
        let http = format!("127.0.0.1:{http_port}");
        let mqtt = format!("127.0.0.1:{mqtt_port}");
        let data = dir.path().join("data");
        let agents_s = agents.to_string();
        let mut args = vec![
            "up",
            "--http",
            &http,
            "--mqtt",
            &mqtt,
            "--data",
            data.to_str().unwrap(),
            "--agents",
            &agents_s,
            "--heartbeat-ms",
            "500",
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn_env("imn-up", program, &args, env, dir.path());
        let api = Api::new(http_port);
        let a2 = api.clone();
        wait_for("imn up to answer /health", Duration::from_secs(30), || {
            let a2 = a2.clone();
            async move { a2.try_get("/health").await.map(|_| ()) }
        })
        .await;
        Up {
            proc,
            api,
            mqtt_port,
            http_port,
            dir,
        }
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// The API with the admin token `imn up --auth` wrote to DATA/admin-token.
    pub fn admin(&self) -> Api {
        let token = std::fs::read_to_string(self.dir.path().join("data/admin-token"))
            .expect("DATA/admin-token (is imn up running with --auth?)");
        self.api.with_token(&token)
    }
}

/// Starts a separate `imn-agent` process.
pub fn start_agent(id: &str, broker: &str, data: &Path, log_dir: &Path) -> Proc {
    spawn_agent(
        &bin("imn-agent"),
        id,
        broker,
        data,
        &["--heartbeat-ms", "500", "--resend-timeout-ms", "2000"],
        log_dir,
    )
}

/// Starts an agent binary (the host build, or a firmware build) with an id, a broker
/// and a data directory, and `extra` flags.
pub fn spawn_agent(
    program: &Path,
    id: &str,
    broker: &str,
    data: &Path,
    extra: &[&str],
    log_dir: &Path,
) -> Proc {
    let data = data.to_str().expect("utf-8 path");
    let mut args = vec!["--id", id, "--broker", broker, "--data", data];
    args.extend_from_slice(extra);
    Proc::spawn(id, program, &args, log_dir)
}

/// A real `nats-server` with JetStream, on a free port.
pub struct Nats {
    pub proc: Proc,
    pub port: u16,
}

impl Nats {
    pub async fn start(dir: &Path) -> Nats {
        let exe = program("nats-server")
            .expect("nats-server is not installed (apt-get install nats-server)");
        let port = free_port();
        let store = dir.join("nats");
        let port_s = port.to_string();
        let proc = Proc::spawn(
            "nats-server",
            &exe,
            &[
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port_s,
                "-sd",
                store.to_str().unwrap(),
            ],
            dir,
        );
        wait_for(
            "nats-server to listen",
            Duration::from_secs(20),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Nats { proc, port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// The `p`th percentile (nearest rank) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Three `nats-server` processes clustered on loopback, with JetStream.
pub struct NatsCluster {
    pub nodes: Vec<Option<Proc>>,
    pub ports: Vec<u16>,
    http: Vec<u16>,
}

impl NatsCluster {
    pub async fn start(dir: &Path, n: usize) -> NatsCluster {
        let exe = program("nats-server")
            .expect("nats-server is not installed (apt-get install nats-server)");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let http: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let routes: Vec<String> = (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("nats://127.0.0.1:{}", cluster[j]))
                .collect();
            let store = dir.join(format!("nats-{}", i + 1));
            let conf = format!(
                "server_name: n{}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: imn\n listen: 127.0.0.1:{}\n routes: [{}] }}\n",
                i + 1,
                ports[i],
                http[i],
                store.display(),
                cluster[i],
                routes.join(", ")
            );
            let path = dir.join(format!("nats-{}.conf", i + 1));
            std::fs::write(&path, conf).expect("nats config");
            nodes.push(Some(Proc::spawn(
                &format!("nats-{}", i + 1),
                &exe,
                &["-c", path.to_str().unwrap()],
                dir,
            )));
        }
        let c = NatsCluster { nodes, ports, http };
        // JetStream answers once the nodes have elected a meta leader.
        let http0 = c.http.clone();
        wait_for(
            "the NATS cluster to elect a JetStream leader",
            Duration::from_secs(60),
            || {
                let http = http0.clone();
                async move {
                    http.iter()
                        .all(|&p| {
                            http_get_json(p, "/jsz")
                                .and_then(|v| {
                                    v["meta_cluster"]["leader"].as_str().map(str::to_string)
                                })
                                .is_some_and(|l| !l.is_empty())
                        })
                        .then_some(())
                }
            },
        )
        .await;
        c
    }

    /// Every node, starting with node `first` (clients fail over along the list).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.ports.len();
        (0..n)
            .map(|k| format!("nats://127.0.0.1:{}", self.ports[(first + k) % n]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// The JetStream stream's info from a live node's monitoring port.
    pub fn stream_replicas(&self, stream: &str) -> Option<usize> {
        self.http.iter().zip(&self.nodes).find_map(|(&p, n)| {
            n.as_ref()?;
            let v = http_get_json(p, "/jsz?streams=true&config=true")?;
            v["account_details"]
                .as_array()?
                .iter()
                .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                .find(|s| s["name"] == stream)
                .and_then(|s| s["config"]["num_replicas"].as_u64())
                .map(|n| n as usize)
        })
    }
}

/// GET `path` from 127.0.0.1:`port` over plain HTTP/1.0, parsed as JSON.
pub fn http_get_json(port: u16, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (_, json) = body.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}

/// The value of one Prometheus sample (`name{labels}` exactly as exposed) on a
/// `/metrics` page, or 0 when absent.
pub fn prom_value(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// GET a text page (`/metrics`) from 127.0.0.1:`port`.
pub fn http_get_text(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Milliseconds since the epoch of an RFC 3339 time in a result.
pub fn ms_of(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Every result of a measurement, a page at a time.
pub async fn all_results(api: &Api, measurement: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = api
            .get(&format!(
                "/v1/results?measurement={measurement}&limit=1000&cursor={cursor}"
            ))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.body;
        out.extend(page["results"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_str().unwrap().to_string();
        if page["more"] != serde_json::json!(true) {
            return out;
        }
    }
}

/// What [`audit_slots`] found for a scheduled measurement.
#[derive(Debug, Default)]
pub struct SlotAudit {
    /// Slots due from the first stored one to the end of the window.
    pub slots: usize,
    /// Slots with exactly one stored result.
    pub stored: usize,
    /// Extra results of slots stored more than once.
    pub duplicates: usize,
    /// Slots without a result that a `schedule_missed` event names.
    pub missed_explained: usize,
    /// Slots whose one result is the failure `run_interrupted`.
    pub interrupted: usize,
    /// Slots without a result that no event explains.
    pub unexplained: Vec<String>,
}

impl SlotAudit {
    pub fn add(&mut self, a: SlotAudit) {
        self.slots += a.slots;
        self.stored += a.stored;
        self.duplicates += a.duplicates;
        self.missed_explained += a.missed_explained;
        self.interrupted += a.interrupted;
        self.unexplained.extend(a.unexplained);
    }
}

/// Per slot of a measurement with a fixed interval (no stop): how many results each
/// slot has, from its first stored slot to `end_ms`, and whether each gap is one a
/// `schedule_missed` event in `events` (the agent's, from `/agents/{id}/events`) names
/// by its slots. Adds the outbox epochs the results came from to `epochs`.
pub async fn audit_slots(
    api: &Api,
    measurement: &str,
    interval_ms: i64,
    events: &[serde_json::Value],
    end_ms: i64,
    epochs: &mut std::collections::BTreeSet<u64>,
) -> SlotAudit {
    let results = all_results(api, measurement).await;
    let mut per_slot: std::collections::BTreeMap<i64, Vec<&serde_json::Value>> = Default::default();
    for r in &results {
        per_slot
            .entry(ms_of(&r["scheduled_at"]))
            .or_default()
            .push(r);
        if let Some(e) = r["record"]["epoch"].as_u64() {
            epochs.insert(e);
        }
    }
    let mut missed: Vec<(i64, i64)> = Vec::new();
    for e in events {
        let msg = e["message"].as_str().unwrap_or_default();
        if e["kind"] == "schedule_missed" && msg.starts_with(&format!("measurement {measurement}:"))
        {
            let span = msg
                .rsplit_once("(slots ")
                .and_then(|(_, s)| s.strip_suffix(')'))
                .and_then(|s| s.split_once(" to "))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            missed.push(span.unwrap_or_else(|| panic!("a missed event without its slots: {msg}")));
        }
    }
    let mut a = SlotAudit::default();
    let Some((&first, _)) = per_slot.iter().next() else {
        return a;
    };
    let mut slot = first;
    while slot <= end_ms {
        a.slots += 1;
        match per_slot.get(&slot).map(Vec::len) {
            Some(1) => {
                a.stored += 1;
                let err = per_slot[&slot][0]["error"].as_str().unwrap_or_default();
                if err.starts_with("run_interrupted") {
                    a.interrupted += 1;
                }
            }
            Some(n) => a.duplicates += n - 1,
            None if missed.iter().any(|&(lo, hi)| lo <= slot && slot <= hi) => {
                a.missed_explained += 1
            }
            None => a.unexplained.push(format!("{measurement} slot {slot}")),
        }
        slot += interval_ms;
    }
    a
}
