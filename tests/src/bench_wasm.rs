//! `imn-bench wasm`: what running a measurement as a WebAssembly module costs, against
//! the same measurement built in, in one run on one agent.
//!
//! A real `imn up` (backend and broker) and a real `imn-agent` process. The agent
//! runs, alternately, the built-in `ping_module` and `ping_through`
//! (`modules/wasm/bench/ping_through.wat`), a module that hands the same parameters to
//! the host's ICMP call (the agent's shared ping engine) and emits its result: the
//! difference is what the sandbox adds (instantiating the module, the host call,
//! copying parameters and result through its memory, validating the result JSON).
//! Targets are loopback addresses (127.1.0.x).
//!
//! Measured:
//! - each run's duration on the agent (the result's `finished_at - started_at`),
//!   median over the rounds, and the ratio wasm / built-in;
//! - the agent's CPU time per run (utime + stime of the process, /proc/PID/stat,
//!   over all rounds of a kind, divided by the rounds), and the ratio;
//! - the agent's RSS idle, after the three example modules and `ping_through` are
//!   loaded (compiled), and its peak (VmHWM) after every run.

use std::time::Duration;

use serde_json::{json, Value};

use crate::bench_drain::{peak_rss_kib, rss_kib};
use crate::wasm::{example_manifest, examples, keygen, manifest, sign, sign_code};
use crate::{bin, percentile, spawn_agent, wait_for, Api, Proc, TempDir, Up};

const T: Duration = Duration::from_secs(60);

/// CPU time (user + system) of a process so far, in ms.
fn cpu_ms(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based, with pid and comm first).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz
}

async fn load(api: &Api, agent: &str, module: &str) {
    let r = api
        .put_json(&format!("/agents/{agent}/modules/{module}"), &json!({}))
        .await;
    assert_eq!(r.status, 202, "load {module}: {}", r.body);
    let (api, path, m) = (api.clone(), format!("/agents/{agent}"), module.to_string());
    wait_for(&format!("{agent} to load {module}"), T, || {
        let (api, path, m) = (api.clone(), path.clone(), m.clone());
        async move {
            let v = api.get(&path).await.body;
            v["modules"]
                .as_array()?
                .iter()
                .any(|x| x["name"] == json!(m))
                .then_some(())
        }
    })
    .await;
}

/// One run through the API; its duration on the agent (ms) and its result.
async fn run(api: &Api, agent: &str, module: &str, params: &Value) -> (f64, Value) {
    let r = api
        .post(
            &format!("/agent/{agent}/{module}?wait=60"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{module}: {}", r.body);
    assert_eq!(r.body["state"], "succeeded", "{module}: {}", r.body);
    // The stored result has the agent's times.
    let rid = r.body["request_id"].as_str().expect("a request id");
    let stored = api
        .get(&format!("/agents/{agent}/results/{rid}"))
        .await
        .body;
    let ms = |k: &str| crate::ms_of(&stored[k]) as f64;
    (
        ms("finished_at") - ms("started_at"),
        r.body["result"].clone(),
    )
}

/// Received replies per target of a ping result, by address.
fn received(result: &Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = result["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| {
            (
                t["addr"].as_str().unwrap_or_default().to_string(),
                t["received"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

pub async fn run_bench(targets: usize, rounds: usize) -> Value {
    let dir = TempDir::new("bench-wasm");
    let (key, public) = keygen(dir.path(), "modules.key");
    let up = Up::start(0, &["--release-keys", &public]).await;
    let api = up.api.clone();
    let agent_id = "bench-wasm";
    let agent: Proc = spawn_agent(
        &bin("imn-agent"),
        agent_id,
        &up.broker_url(),
        &dir.path().join(agent_id),
        &["--heartbeat-ms", "1000", "--module-keys", &public],
        dir.path(),
    );
    let pid = agent.pid();
    api.wait_alive(&[agent_id], T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid);

    // The examples and the ping twin, compiled on the agent.
    let out = examples();
    for name in ["stun", "tcp_banner", "dns_tcp"] {
        let p = sign(
            &out.join(format!("{name}.wasm")),
            &example_manifest(name),
            &key,
            &dir.path().join(format!("{name}.imnmod")),
        );
        let r = api.post_bytes("/admin/modules", p).await;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
        load(&api, agent_id, name).await;
    }
    let twin = crate::wasm::hostile_path("../bench/ping_through");
    let code = wat::parse_file(&twin).unwrap_or_else(|e| panic!("{}: {e}", twin.display()));
    let mut m = manifest(
        "ping_through",
        60_000,
        json!({"packets_sent": 10_000, "bytes_sent": 16 << 20, "memory_pages": 8}),
    );
    m["targets"] = json!(["targets"]);
    let r = api
        .post_bytes("/admin/modules", sign_code(dir.path(), &code, &m, &key))
        .await;
    assert_eq!(r.status, 201, "ping_through: {}", r.body);
    load(&api, agent_id, "ping_through").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_loaded = rss_kib(pid);

    let addrs: Vec<String> = (1..=targets)
        .map(|i| format!("127.1.{}.{}", i / 250, i % 250 + 1))
        .collect();
    // The same rate for both: a module's ping is paced at most 1,000 probes/s.
    let params =
        json!({"targets": addrs, "count": 3, "interval_ms": 10, "timeout_ms": 500, "rate": 1000});
    // Warm both up once (first use of the engine, the sockets).
    run(&api, agent_id, "ping_module", &params).await;
    run(&api, agent_id, "ping_through", &params).await;
    let (mut t_builtin, mut t_wasm) = (Vec::new(), Vec::new());
    let (mut cpu_builtin, mut cpu_wasm) = (0.0, 0.0);
    for i in 0..rounds {
        // Alternated, each kind first in turn.
        let order: [&str; 2] = if i % 2 == 0 {
            ["ping_module", "ping_through"]
        } else {
            ["ping_through", "ping_module"]
        };
        for module in order {
            let before = cpu_ms(pid);
            let (ms, result) = run(&api, agent_id, module, &params).await;
            let cpu = cpu_ms(pid) - before;
            let got = received(&result);
            assert_eq!(got.len(), targets, "{module}: {result}");
            assert!(
                got.iter().all(|(_, n)| *n == 3),
                "{module}: every loopback target answers 3 of 3: {got:?}"
            );
            if module == "ping_module" {
                t_builtin.push(ms);
                cpu_builtin += cpu;
            } else {
                t_wasm.push(ms);
                cpu_wasm += cpu;
            }
        }
    }
    let rss_peak = peak_rss_kib(pid);
    t_builtin.sort_by(f64::total_cmp);
    t_wasm.sort_by(f64::total_cmp);
    let (mb, mw) = (percentile(&t_builtin, 50.0), percentile(&t_wasm, 50.0));
    let n = rounds.max(1) as f64;
    let (cb, cw) = (cpu_builtin / n, cpu_wasm / n);
    drop(agent);
    json!({
        "targets": targets,
        "rounds": rounds,
        "builtin_run_ms_p50": mb,
        "wasm_run_ms_p50": mw,
        "time_ratio": if mb > 0.0 { (mw / mb * 100.0).round() / 100.0 } else { 0.0 },
        "builtin_cpu_ms_per_run": (cb * 10.0).round() / 10.0,
        "wasm_cpu_ms_per_run": (cw * 10.0).round() / 10.0,
        "cpu_extra_ms_per_run": ((cw - cb) * 10.0).round() / 10.0,
        "agent_rss_idle_kib": rss_idle,
        "agent_rss_with_4_modules_kib": rss_loaded,
        "agent_rss_peak_kib": rss_peak,
        "agent": bin("imn-agent").display().to_string(),
        "note": "one agent process; per run: count 3 to each target 10 ms apart; run time on the agent (started_at to finished_at); CPU from /proc/PID/stat (10 ms ticks, summed over the rounds); RSS from /proc/PID/status",
    })
}
