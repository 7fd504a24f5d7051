//! `imn-bench firmware`: the agent as firmware. Binary size, start to first heartbeat,
//! resident memory idle and with 10,000 results buffered, and the bytes it writes (flash
//! wear), for one agent binary, by default the static x86_64 build of cross/build.sh.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench_drain::{peak_rss_kib, prefill_outbox, rss_kib};
use crate::{free_port, Proc, Up};

/// Bytes the process passed to write(2) and friends (`wchar`): what it asks the file
/// system to write, before the file system's own overhead.
fn written_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:")?.trim().parse().ok())
        .unwrap_or(0)
}

fn spawn(bin: &Path, id: &str, broker: &str, data: &Path, hb_ms: u64, logs: &Path) -> Proc {
    let hb = hb_ms.to_string();
    crate::spawn_agent(bin, id, broker, data, &["--heartbeat-ms", &hb], logs)
}

/// The default binary: cross/build.sh's static x86_64 agent (musl, full profile).
pub fn default_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/firmware/full/x86_64-unknown-linux-musl/imn-agent")
}

/// The figures `against` compares (smaller is better for each).
const COMPARED: &[&str] = &[
    "binary_bytes",
    "first_heartbeat_ms_p50",
    "idle_rss_kib",
    "idle_peak_rss_kib",
    "buffered_rss_kib",
    "buffered_peak_rss_kib",
    "written_bytes_per_heartbeat",
    "written_bytes_per_result",
];

/// `agent` against `baseline` in one run, in the order agent, baseline, baseline,
/// agent (so drift on a shared machine falls on both): each figure is the mean of the
/// two runs, and `ratio` is agent / baseline.
pub async fn against(agent: &Path, baseline: &Path, quick: bool) -> Value {
    let mut runs = Vec::new();
    for bin in [agent, baseline, baseline, agent] {
        runs.push(firmware(bin, quick).await);
    }
    let mean = |a: &Value, b: &Value, k: &str| {
        (a[k].as_f64().unwrap_or(f64::NAN) + b[k].as_f64().unwrap_or(f64::NAN)) / 2.0
    };
    let mut new = serde_json::Map::new();
    let mut old = serde_json::Map::new();
    let mut ratio = serde_json::Map::new();
    for k in COMPARED {
        let n = mean(&runs[0], &runs[3], k);
        let o = mean(&runs[1], &runs[2], k);
        new.insert(k.to_string(), json!(n));
        old.insert(k.to_string(), json!(o));
        ratio.insert(k.to_string(), json!(if o > 0.0 { n / o } else { f64::NAN }));
    }
    json!({
        "scenario": "firmware-against",
        "agent": agent.display().to_string(),
        "baseline": baseline.display().to_string(),
        "agent_figures": new,
        "baseline_figures": old,
        "ratio": ratio,
        "runs": runs,
        "note": "order: agent, baseline, baseline, agent; each figure the mean of its two runs; ratio = agent / baseline (below 1: the agent is smaller or faster)",
    })
}

pub async fn firmware(agent: &Path, quick: bool) -> Value {
    assert!(
        agent.exists(),
        "{} is missing: run `bash cross/build.sh x86_64` first",
        agent.display()
    );
    let size = std::fs::metadata(agent).map(|m| m.len()).unwrap_or(0);
    let up = Up::start(0, &[]).await;
    let api = up.api.clone();
    let logs = up.dir.path();

    // 1. Start to first heartbeat stored by the backend, five starts.
    let mut first_hb_ms = Vec::new();
    let runs = if quick { 1 } else { 5 };
    for run in 0..runs {
        let id = format!("fw-start-{run}");
        let data = logs.join(&id);
        let t0 = Instant::now();
        let proc = spawn(agent, &id, &up.broker_url(), &data, 10_000, logs);
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let hb = api
                .try_get(&format!("/agents/{id}"))
                .await
                .map(|r| r.body["heartbeat"].clone())
                .unwrap_or(Value::Null);
            if !hb.is_null() {
                break;
            }
            assert!(Instant::now() < deadline, "no heartbeat from {id} in 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        first_hb_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(proc);
    }
    first_hb_ms.sort_by(f64::total_cmp);

    // 2. Idle, connected, outbox empty: RSS after it settles; and the bytes written per
    //    heartbeat (a heartbeat a second, so the window holds enough of them).
    let data = logs.join("fw-idle");
    let idle = spawn(agent, "fw-idle", &up.broker_url(), &data, 1_000, logs);
    api.wait_alive(&["fw-idle"], Duration::from_secs(30)).await;
    let settle = if quick { 2 } else { 5 };
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let idle_rss = rss_kib(idle.pid());
    let w0 = written_bytes(idle.pid());
    let window = if quick { 3 } else { 30 };
    tokio::time::sleep(Duration::from_secs(window)).await;
    let per_hb = (written_bytes(idle.pid()) - w0) as f64 / window as f64;
    // Bytes written per result: echo runs, each a result and its state changes.
    let n_results = if quick { 20 } else { 200 };
    let w1 = written_bytes(idle.pid());
    let t_runs = Instant::now();
    for i in 0..n_results {
        let body = json!({ "message": format!("wear {i}") }).to_string();
        let r = api
            .post("/agent/fw-idle/echo_module?wait=10", &body, &[])
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // The heartbeats sent while the runs went on are subtracted.
    let runs_s = t_runs.elapsed().as_secs_f64();
    let per_result =
        ((written_bytes(idle.pid()) - w1) as f64 - per_hb * runs_s).max(0.0) / n_results as f64;
    let idle_hwm = peak_rss_kib(idle.pid());
    drop(idle);

    // 3. 10,000 results in the outbox, the broker unreachable: RSS after opening it.
    let buffered = if quick { 1_000 } else { 10_000 };
    let data = logs.join("fw-buffered");
    prefill_outbox(&data, buffered);
    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let held = spawn(agent, "fw-buffered", &dead, &data, 10_000, logs);
    tokio::time::sleep(Duration::from_secs(if quick { 2 } else { 5 })).await;
    let buffered_rss = rss_kib(held.pid());
    let buffered_hwm = peak_rss_kib(held.pid());
    drop(held);

    let day = 86_400.0;
    json!({
        "scenario": "firmware",
        "agent": agent.display().to_string(),
        "binary_bytes": size,
        "first_heartbeat_ms_p50": first_hb_ms[first_hb_ms.len() / 2],
        "first_heartbeat_ms_max": first_hb_ms[first_hb_ms.len() - 1],
        "idle_rss_kib": idle_rss,
        "idle_peak_rss_kib": idle_hwm,
        "buffered_results": buffered,
        "buffered_rss_kib": buffered_rss,
        "buffered_peak_rss_kib": buffered_hwm,
        "written_bytes_per_heartbeat": per_hb,
        "written_bytes_per_result": per_result,
        "written_mb_per_day_hb60s": per_hb * day / 60.0 / 1e6,
        "written_mb_per_day_hb10s": per_hb * day / 10.0 / 1e6,
        "written_mb_per_1000_results": per_result * 1000.0 / 1e6,
        "note": "first heartbeat: from spawning the process until GET /agents/ID shows a heartbeat (polled every 2 ms), on loopback. RSS: VmRSS idle and connected, and with the outbox holding the buffered results and no broker. Written bytes: /proc/PID/io wchar, what the agent asks the file system to write",
    })
}
