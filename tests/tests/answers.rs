//! From results to answers: status checks over real measurements.
//!
//! Two agents measure the same name, `svc.imn.test`, and each resolves it with its own
//! dnsmasq to a host of its own in a network namespace (as GeoDNS or anycast would
//! give each vantage point its own server). Each host's kernel ignores echo requests;
//! a responder of the test answers them after a delay it can change while the
//! measurement runs, so a path's latency shifts by a known amount at a known time.
//! Before anything is sent, `Netns::create` checks that the route to each host uses
//! the test's own veth.

use std::time::Duration;

use imn_tests::netns::SlowHost;
use imn_tests::peers::Dnsmasq;
use imn_tests::{bin, wait_for, Up};
use serde_json::json;

/// Runs `imn check` against `up`; returns its exit code and output.
async fn imn_check(up: &Up, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(bin("imn"))
        .arg("check")
        .args(args)
        .args(["--url", &format!("http://127.0.0.1:{}", up.http_port)])
        .output()
        .await
        .expect("imn check");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (out.status.code().unwrap_or(-1), text)
}

/// A Nagios plugin's output, parsed as Nagios reads it: the status word, the text,
/// and the performance data of the first line (`label=value[uom];warn;crit;min;max`);
/// then the long output.
#[derive(Debug)]
struct Plugin {
    status: String,
    text: String,
    perf: Vec<(String, f64)>,
    long: Vec<String>,
}

fn parse_plugin(out: &str) -> Plugin {
    let mut lines = out.lines();
    let first = lines.next().expect("a status line");
    let (text, perf) = first.split_once(" | ").unwrap_or((first, ""));
    let rest = text
        .strip_prefix("IMN ")
        .unwrap_or_else(|| panic!("not IMN's plugin line: {first}"));
    let (status, text) = rest.split_once(" - ").expect("STATUS - text");
    assert!(
        ["OK", "WARNING", "CRITICAL", "UNKNOWN"].contains(&status),
        "{first}"
    );
    let perf = perf
        .split_whitespace()
        .map(|p| {
            let (label, v) = p.split_once('=').unwrap_or_else(|| panic!("perfdata {p}"));
            let value = v.split(';').next().unwrap();
            let num: String = value
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
                .collect();
            (
                label.to_string(),
                num.parse().unwrap_or_else(|_| panic!("perfdata {p}")),
            )
        })
        .collect();
    Plugin {
        status: status.to_string(),
        text: text.to_string(),
        perf,
        long: lines.map(str::to_string).collect(),
    }
}

fn perf(p: &Plugin, label: &str) -> f64 {
    p.perf
        .iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("no {label} in {p:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_checks_name_exactly_the_agents_whose_path_got_slow() {
    let near = SlowHost::start("sca", 2);
    let far = SlowHost::start("scbbb", 2);
    let dns_near = Dnsmasq::start(&[&format!("--host-record=svc.imn.test,{}", near.ns.peer_ip)]);
    let dns_far = Dnsmasq::start(&[&format!("--host-record=svc.imn.test,{}", far.ns.peer_ip)]);
    let up = Up::start(
        0,
        &["--nameserver", &format!("127.0.0.1:{}", dns_near.port)],
    )
    .await;
    let broker = up.broker_url();
    let mut agents = Vec::new();
    for (id, dns) in [("sc-near", &dns_near), ("sc-far", &dns_far)] {
        let data = up.dir.path().join(id);
        let proc = imn_tests::spawn_agent(
            &bin("imn-agent"),
            id,
            &broker,
            &data,
            &[
                "--heartbeat-ms",
                "500",
                "--nameservers",
                &format!("127.0.0.1:{}", dns.port),
            ],
            up.dir.path(),
        );
        agents.push(proc);
    }
    up.api
        .wait_alive(&["sc-near", "sc-far"], Duration::from_secs(30))
        .await;

    // Five pings every two seconds from both agents.
    let r = up
        .api
        .post(
            "/v1/measurements",
            &json!({"module": "ping_module",
                    "params": {"host": "svc.imn.test", "count": 5, "interval_ms": 100, "timeout_ms": 1000},
                    "agents": {"ids": ["sc-near", "sc-far"]},
                    "schedule": {"interval_s": 2, "jitter_s": 0}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let check = |q: &str| {
        let api = up.api.clone();
        let path = format!("/v1/measurements/{id}/status-check?{q}");
        async move { api.get(&path).await }
    };

    // Healthy: both agents report RTTs near 2 ms, under 50 ms.
    let healthy = wait_for("a healthy check", Duration::from_secs(30), || {
        let c = check("max_rtt_median=50&max_loss=20&window_s=6");
        async move {
            let r = c.await;
            (r.status == 200
                && r.body["per_agent"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|v| v["results"].as_u64() >= Some(2))))
            .then_some(r)
        }
    })
    .await;
    assert_eq!(healthy.body["status"], json!("ok"), "{}", healthy.body);
    assert_eq!(healthy.body["breaching_agents"], json!(0));
    assert_eq!(healthy.body["agents"], json!(2));
    for v in healthy.body["per_agent"].as_array().unwrap() {
        let m = v["targets"]["svc.imn.test"]["rtt_median_ms"]
            .as_f64()
            .unwrap();
        // The responder's delay (2 ms, timed from the kernel's receive stamp, and
        // sent up to 0.5 ms early to make up for its own send path), plus the
        // path's own (a veth: well under a ms). CI saw 1.927 ms.
        assert!((1.4..20.0).contains(&m), "{v}");
    }
    let (code, out) = imn_check(&up, &[&id, "--max-rtt-median", "50", "--window-s", "6"]).await;
    let p = parse_plugin(&out);
    assert_eq!((code, p.status.as_str()), (0, "OK"), "{out}");
    assert_eq!(perf(&p, "agents"), 2.0);
    assert_eq!(perf(&p, "breaching"), 0.0);

    // The far host's path gets 100 ms slower.
    far.set_delay_ms(100);
    let shifted = std::time::Instant::now();
    // Once the window holds only slow results from the far agent, the check fails
    // naming it, and only it.
    let bad = wait_for("the check to fail", Duration::from_secs(30), || {
        let c = check("max_rtt_median=50&max_loss=20&window_s=6");
        async move {
            let r = c.await;
            (r.status == 503).then_some(r)
        }
    })
    .await;
    let failed_after = shifted.elapsed();
    assert_eq!(bad.body["status"], json!("critical"), "{}", bad.body);
    assert_eq!(bad.body["healthy"], json!(false));
    let breaches = bad.body["breaches"].as_array().unwrap();
    let who: Vec<(&str, &str)> = breaches
        .iter()
        .map(|b| {
            (
                b["agent_id"].as_str().unwrap(),
                b["check"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(who, vec![("sc-far", "max_rtt_median")], "{}", bad.body);
    let b = &breaches[0];
    assert_eq!(b["target"], json!("svc.imn.test"));
    assert_eq!(b["threshold"], json!(50.0));
    let v = b["value"].as_f64().unwrap();
    assert!(v > 50.0 && v < 150.0, "{b}");
    assert!(
        b["message"].as_str().unwrap().starts_with("rtt median "),
        "{b}"
    );
    // The window is 6 s and runs are every 2 s: it fails within a window and a run.
    assert!(failed_after < Duration::from_secs(12), "{failed_after:?}");

    // The same as a Nagios plugin: CRITICAL (2), naming sc-far and its value.
    let (code, out) = imn_check(&up, &[&id, "--max-rtt-median", "50", "--window-s", "6"]).await;
    let p = parse_plugin(&out);
    assert_eq!((code, p.status.as_str()), (2, "CRITICAL"), "{out}");
    assert!(
        p.text.contains("1 of 2 agents breaching (0 allowed)"),
        "{out}"
    );
    assert!(p.text.contains("sc-far svc.imn.test rtt median"), "{out}");
    assert!(!p.text.contains("sc-near"), "{out}");
    assert_eq!(perf(&p, "breaching"), 1.0);
    assert_eq!(p.long.len(), 1, "{out}");
    assert!(
        p.long[0].starts_with("sc-far svc.imn.test: rtt median "),
        "{out}"
    );
    // One agent may breach: WARNING (1), and the API says 200.
    let (code, out) = imn_check(
        &up,
        &[
            &id,
            "--max-rtt-median",
            "50",
            "--window-s",
            "6",
            "--max-breaching",
            "1",
        ],
    )
    .await;
    assert_eq!(
        (code, parse_plugin(&out).status.as_str()),
        (1, "WARNING"),
        "{out}"
    );
    let r = check("max_rtt_median=50&window_s=6&max_breaching=1").await;
    assert_eq!(
        (r.status, r.body["status"].clone()),
        (200, json!("warning"))
    );
    // No thresholds: both agents report and their runs succeed, so it is healthy.
    let (code, out) = imn_check(&up, &[&id, "--window-s", "6"]).await;
    assert_eq!(
        (code, parse_plugin(&out).status.as_str()),
        (0, "OK"),
        "{out}"
    );
    // UNKNOWN (3): a measurement that does not exist, a threshold the module does not
    // carry, an API that is not there.
    let (code, out) = imn_check(&up, &["m-nope"]).await;
    assert_eq!(
        (code, parse_plugin(&out).status.as_str()),
        (3, "UNKNOWN"),
        "{out}"
    );
    assert!(out.contains("404"), "{out}");
    let (code, out) = imn_check(&up, &[&id, "--http-status", "200"]).await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("http_status: ping_module results carry no HTTP status"),
        "{out}"
    );
    let r = check("http_status=200").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["field"], json!("http_status"), "{}", r.body);
    assert_eq!(r.body["rule"], json!("applies"));
    let (code, out) = imn_check(&up, &[&id, "--max-loss", "ten"]).await;
    assert_eq!(
        (code, parse_plugin(&out).status.as_str()),
        (3, "UNKNOWN"),
        "{out}"
    );
    let dead = tokio::process::Command::new(bin("imn"))
        .args(["check", &id, "--url", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert_eq!(dead.status.code(), Some(3));

    // Prometheus text, as a scraper reads it.
    // (Always 200: Prometheus drops any other scrape; the status is in the text.)
    let r = check("max_rtt_median=50&window_s=6&format=prometheus").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-imn-check"], "critical");
    let text = r.body.as_str().expect("text").to_string();
    assert!(
        text.contains(&format!("imn_check_status{{measurement=\"{id}\"}} 2")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "imn_check_breach{{measurement=\"{id}\",agent=\"sc-far\",target=\"svc.imn.test\",check=\"max_rtt_median\"}} 1"
        )),
        "{text}"
    );
    assert!(
        !text.contains("agent=\"sc-near\",target=\"svc.imn.test\",check="),
        "{text}"
    );

    // The far agent goes away: with no thresholds, silence alone breaches.
    drop(agents.pop());
    far.set_delay_ms(2);
    let silent = wait_for(
        "the silent agent to breach",
        Duration::from_secs(30),
        || {
            let c = check("window_s=6");
            async move {
                let r = c.await;
                (r.status == 503).then_some(r)
            }
        },
    )
    .await;
    let who: Vec<(&str, &str)> = silent.body["breaches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["agent_id"].as_str().unwrap(),
                b["check"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(who, vec![("sc-far", "reported")], "{}", silent.body);
    eprintln!("status check: failed {failed_after:?} after the far path got 100 ms slower");
}

/// The dashboard's heartbeat charts survive a backend restart: one point per agent a
/// minute is stored (the first at once), and read back when the backend starts,
/// before the agents are heard again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_charts_survive_a_backend_restart() {
    let dir = imn_tests::TempDir::new("hb-restart");
    let data = dir.path().join("data");
    let (http, mqtt) = (imn_tests::free_port(), imn_tests::free_port());
    let (http_a, mqtt_a) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{mqtt}"));
    let start = |tag: &str| {
        imn_tests::Proc::spawn(
            tag,
            &bin("imn"),
            &[
                "up",
                "--http",
                &http_a,
                "--mqtt",
                &mqtt_a,
                "--data",
                data.to_str().unwrap(),
                "--agents",
                "1",
                "--heartbeat-ms",
                "500",
            ],
            dir.path(),
        )
    };
    let api = imn_tests::Api::new(http);
    let health = || {
        let api = api.clone();
        async move { api.try_get("/health").await.map(|_| ()) }
    };
    let mut first = start("imn-up-1");
    wait_for("imn up", Duration::from_secs(30), health).await;
    api.wait_alive(&["agent-1"], Duration::from_secs(30)).await;
    let points = |api: imn_tests::Api| async move {
        api.get("/agents/agent-1/heartbeats")
            .await
            .body
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let before = wait_for("heartbeats", Duration::from_secs(10), || {
        let api = api.clone();
        async move { Some(points(api).await).filter(|p| !p.is_empty()) }
    })
    .await;
    let kept = before[0].clone();
    // The store is written every 10 s.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let in_memory = points(api.clone()).await.len();
    assert!(in_memory > 10, "{in_memory} points at 500 ms");
    first.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));

    let _second = start("imn-up-2");
    wait_for("imn up again", Duration::from_secs(30), health).await;
    let after = points(api.clone()).await;
    // The stored point is back (one a minute: the first), ahead of anything new.
    assert_eq!(after.first(), Some(&kept), "{after:?}");
    assert!(
        after.len() < in_memory,
        "only the stored sample survives, not every point in memory: {}",
        after.len()
    );
}

/// A store filled past its size cap settles under it while results keep arriving:
/// the oldest raw results go, a bounded batch at a time, and the hourly rollups still
/// count every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_past_its_size_cap_settles_under_it_and_rollups_keep_the_counts() {
    use imn_tests::sim::{Control, SimConfig, SimStats};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    const CAP: u64 = 4 << 20;
    const AGENTS: usize = 8;
    const EACH: u64 = 1_000;
    let up = Up::start(0, &["--max-store-size", "4M", "--retention-every", "1s"]).await;
    let cfg = Arc::new(SimConfig {
        host: "127.0.0.1".into(),
        port: up.mqtt_port,
        heartbeat: Duration::from_secs(1),
        results: EACH,
        per_message: 10,
        window: 2,
        // 2 kB a result: 8,000 of them are 16 MB, four times the cap.
        message: "r".repeat(2_000),
        resend_after: Duration::from_secs(5),
        tokens: None,
        wire_version: imn_proto::wire::WIRE_VERSION,
    });
    let stats = Arc::new(SimStats::default());
    let mut controls = Vec::new();
    for i in 0..AGENTS {
        let ctl = Arc::new(Control::default());
        tokio::spawn(imn_tests::sim::run(
            format!("cap-{i}"),
            cfg.clone(),
            stats.clone(),
            ctl.clone(),
        ));
        controls.push(ctl);
    }
    wait_for(
        "the simulated agents to connect",
        Duration::from_secs(30),
        || {
            let n = stats.connected.load(Ordering::SeqCst);
            async move { (n == AGENTS as u64).then_some(()) }
        },
    )
    .await;
    // One agent starts sending every second; /health is read as they go.
    let mut sizes: Vec<(u64, u64)> = Vec::new();
    let health = |api: imn_tests::Api| async move { api.get("/health").await.body };
    for ctl in &controls {
        ctl.start_results();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let h = health(up.api.clone()).await;
            if let Some(b) = h["store"]["bytes"].as_u64() {
                sizes.push((stats.results_acked.load(Ordering::SeqCst), b));
            }
        }
    }
    wait_for("every result acked", Duration::from_secs(120), || {
        let n = stats.results_acked.load(Ordering::SeqCst);
        async move { (n == AGENTS as u64 * EACH).then_some(()) }
    })
    .await;
    // Settled: under the cap, after at least one pass since the last result.
    let settled = wait_for("the store under its cap", Duration::from_secs(30), || {
        let api = up.api.clone();
        async move {
            let h = health(api).await;
            let b = h["store"]["bytes"].as_u64()?;
            (b <= CAP).then_some(h)
        }
    })
    .await;
    let peak = sizes.iter().map(|(_, b)| *b).max().unwrap_or(0);
    eprintln!(
        "size cap {CAP} B: peak seen {peak} B while {} results (16 MB) arrived; settled at {} B; samples (acked, bytes): {sizes:?}",
        AGENTS as u64 * EACH,
        settled["store"]["bytes"]
    );
    // Filled past the cap between passes (every 3 s), then back under it while
    // results were still arriving.
    let over = sizes
        .iter()
        .position(|(_, b)| *b > CAP)
        .unwrap_or_else(|| panic!("never past the cap: {sizes:?}"));
    let total = AGENTS as u64 * EACH;
    assert!(
        sizes[over..]
            .iter()
            .any(|(acked, b)| *b <= CAP && *acked < total),
        "not back under the cap while results arrived: {sizes:?}"
    );
    // Settled near 90 % of the cap, not far below it.
    let settled_b = settled["store"]["bytes"].as_u64().unwrap();
    assert!(settled_b > CAP / 2, "{settled_b} B");
    // Old raw results are gone...
    let kept = results_where(&up.api, "module=echo_module").await;
    assert!(
        kept.len() < (AGENTS as u64 * EACH / 2) as usize,
        "{} raw results kept",
        kept.len()
    );
    // ...and the rollups count every one of them, per agent.
    let r = up
        .api
        .get("/v1/rollups?module=echo_module&limit=10000")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut per_agent = std::collections::BTreeMap::<String, u64>::new();
    for row in r.body["rollups"].as_array().unwrap() {
        *per_agent
            .entry(row["agent_id"].as_str().unwrap().to_string())
            .or_default() += row["results"].as_u64().unwrap();
    }
    assert_eq!(per_agent.len(), AGENTS, "{per_agent:?}");
    for (agent, n) in &per_agent {
        assert_eq!(*n, EACH, "{agent}: {per_agent:?}");
    }
    assert!(settled["store"]["oldest_result"].is_string(), "{settled}");
    let bad = up.api.get("/v1/rollups?limit=0").await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("limit"))
    );
    let bad = up.api.get("/v1/rollups?agnt=x").await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("agnt"))
    );
    for c in &controls {
        c.stop.store(true, Ordering::SeqCst);
    }
}

/// Every stored result matching `filter` (a query string), paging by cursor.
async fn results_where(api: &imn_tests::Api, filter: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = api
            .get(&format!("/v1/results?{filter}&limit=1000&cursor={cursor}"))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        out.extend(page.body["results"].as_array().unwrap().iter().cloned());
        cursor = page.body["next_cursor"].as_str().unwrap().to_string();
        if page.body["more"] != json!(true) {
            return out;
        }
    }
}
