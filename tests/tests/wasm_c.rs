//! A WebAssembly module written in C, end to end: `modules/wasm/examples-c/tcp_time`
//! built by its `build.sh` (clang and wasm-ld: `apt-get install clang lld`), signed
//! with `imn modules sign`, added to `imn up`'s backend, loaded on its local agent and
//! run one-off against a listener on loopback and against a closed port.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imn_tests::wasm::{keygen, sign};
use imn_tests::{wait_for, Api, TempDir, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const AGENT: &str = "agent-1";

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .join("modules/wasm/examples-c/tcp_time")
}

/// `bash build.sh` (from another directory than its own); the built module.
fn build() -> PathBuf {
    let dir = module_dir();
    let out = Command::new("bash")
        .arg(dir.join("build.sh"))
        .current_dir(std::env::temp_dir())
        .output()
        .expect("bash modules/wasm/examples-c/tcp_time/build.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "modules/wasm/examples-c/tcp_time/build.sh failed (clang and lld installed? apt-get install clang lld):\n{said}"
    );
    eprint!("{said}");
    dir.join("out/tcp_time.wasm")
}

/// A TCP listener on loopback: its port and how many connections it accepted.
fn listener() -> (u16, Arc<AtomicU32>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            if s.is_ok() {
                a.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (port, accepted)
}

/// A port on loopback nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn run(api: &Api, params: Value) -> Value {
    let r = api
        .post(
            &format!("/agent/{AGENT}/tcp_time?wait=30"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "tcp_time {params}: {}", r.body);
    assert_eq!(
        r.body["state"], "succeeded",
        "tcp_time {params}: {}",
        r.body
    );
    eprintln!("tcp_time {params}: {}", r.body["result"]);
    r.body["result"].clone()
}

/// A time in ms, as the module writes it: at least 0, below `below`, 3 decimals.
fn ms(v: &Value, below: f64, r: &Value) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("a time in ms, not {v}: {r}"));
    assert!((0.0..below).contains(&x), "{x} ms: {r}");
    assert!(
        ((x * 1000.0).round() - x * 1000.0).abs() < 1e-6,
        "{x}: 3 decimals at most: {r}"
    );
    x
}

/// The result of `count` connects that all succeeded.
fn all_connected(r: &Value, port: u16, count: u64, timeout_ms: f64) {
    assert_eq!(r["host"], "127.0.0.1", "{r}");
    assert_eq!(r["port"], json!(port), "{r}");
    assert_eq!(r["sent"], json!(count), "{r}");
    assert_eq!(r["connected"], json!(count), "{r}");
    assert_eq!(r["errors"], json!([]), "{r}");
    let times: Vec<f64> = r["times_ms"]
        .as_array()
        .unwrap_or_else(|| panic!("times_ms: {r}"))
        .iter()
        .map(|t| ms(t, timeout_ms, r))
        .collect();
    assert_eq!(times.len() as u64, count, "{r}");
    let (min, avg, max) = (
        ms(&r["min_ms"], timeout_ms, r),
        ms(&r["avg_ms"], timeout_ms, r),
        ms(&r["max_ms"], timeout_ms, r),
    );
    let lo = times.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = times.iter().copied().fold(0.0, f64::max);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    assert_eq!((min, max), (lo, hi), "{r}");
    // The module averages the nanoseconds, then rounds: within a microsecond or two.
    assert!(
        (avg - mean).abs() <= 0.002,
        "avg {avg}, the times' {mean}: {r}"
    );
    assert!(min <= avg && avg <= max, "{r}");
    assert_eq!(r.as_object().unwrap().len(), 9, "no other field: {r}");
}

async fn accepted(n: &Arc<AtomicU32>, want: u32) {
    let n = n.clone();
    wait_for(
        &format!("the listener to accept {want} connections"),
        Duration::from_secs(5),
        || {
            let got = n.load(Ordering::SeqCst);
            async move { (got == want).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_written_in_c_measures_tcp_connect_times() {
    let wasm = build();
    let keys = TempDir::new("wasm-c-keys");
    let (key, public) = keygen(keys.path(), "modules.key");
    let package = sign(
        &wasm,
        &module_dir().join("module.json"),
        &key,
        &keys.path().join("tcp_time.imnmod"),
    );
    // `imn up`'s own agent trusts the backend's release keys for modules.
    let up = Up::start(1, &["--release-keys", &public]).await;
    let api = up.api.clone();
    api.wait_alive(&[AGENT], T).await;

    let r = api.post_bytes("/admin/modules", package).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["module"]["kind"], "wasm", "{}", r.body);
    let r = api
        .put_json(&format!("/agents/{AGENT}/modules/tcp_time"), &json!({}))
        .await;
    assert_eq!(r.status, 202, "load tcp_time: {}", r.body);
    let a = api.clone();
    wait_for(&format!("{AGENT} to load tcp_time"), T, || {
        let a = a.clone();
        async move {
            let v = a.get(&format!("/agents/{AGENT}")).await.body;
            v["modules"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == "tcp_time")
                .then_some(())
        }
    })
    .await;

    // The module's schema checks the parameters, naming the field.
    let r = api
        .post(
            &format!("/agent/{AGENT}/tcp_time?wait=10"),
            &json!({"host": "127.0.0.1", "port": 0}).to_string(),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.body["field"].clone()),
        (422, json!("/port")),
        "{}",
        r.body
    );

    // A listener: the defaults (3 connects, 2000 ms each), then the most (10).
    let (port, n) = listener();
    let r = run(&api, json!({"host": "127.0.0.1", "port": port})).await;
    all_connected(&r, port, 3, 2000.0);
    accepted(&n, 3).await;
    let r = run(
        &api,
        json!({"host": "127.0.0.1", "port": port, "count": 10, "timeout_ms": 1000}),
    )
    .await;
    all_connected(&r, port, 10, 1000.0);
    accepted(&n, 13).await;

    // A closed port: every connect refused, the agent's message for each.
    let closed = closed_port();
    let r = run(
        &api,
        json!({"host": "127.0.0.1", "port": closed, "count": 2}),
    )
    .await;
    assert_eq!(r["port"], json!(closed), "{r}");
    assert_eq!(
        (&r["sent"], &r["connected"], &r["times_ms"]),
        (&json!(2), &json!(0), &json!([])),
        "{r}"
    );
    for f in ["min_ms", "avg_ms", "max_ms"] {
        assert!(r.get(f).is_none(), "no {f} when nothing connected: {r}");
    }
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{r}");
    for e in errors {
        let e = e.as_str().unwrap();
        assert!(
            e.to_lowercase().contains("refused") && e.contains(&format!("127.0.0.1:{closed}")),
            "the refusal named: {e}"
        );
    }
}
