//! Observability against a real OTLP/gRPC receiver (`imn_tests::otlp`, the collector's
//! trace, metrics and logs services from the published protobufs): one trace per
//! measurement across separate processes over NATS, the agent's timings in it,
//! measurement metrics, logs with trace ids; `/metrics` pages checked by `promtool`;
//! and a collector that dies or hangs mid-run costs the data path nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use imn_tests::otlp::{OtlpReceiver, ReceivedSpan};
use imn_tests::*;

const T: Duration = Duration::from_secs(30);

/// Fast batches, so the test does not wait on the SDK's default 5 s and 60 s delays.
const FAST_EXPORT: [(&str, &str); 3] = [
    ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ("OTEL_BLRP_SCHEDULE_DELAY", "200"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
];

async fn text(url: &str) -> String {
    let r = reqwest::get(url).await.expect("GET");
    assert_eq!(r.status(), 200, "{url}");
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "{url}: {ctype}"
    );
    r.text().await.expect("body")
}

/// `promtool check metrics` on a page: the format parses and passes the lint.
fn promtool_check(name: &str, page: &str) {
    use std::io::Write;
    let promtool = program("promtool").expect("promtool (Debian's prometheus package)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {name}: {said}\n---\n{page}"
    );
}

/// The value of a sample line `name{labels} value` whose text starts with `prefix`.
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_measurement_across_processes_over_nats() {
    let otlp = OtlpReceiver::start().unwrap();
    let dir = TempDir::new("otel");
    let nats = Nats::start(dir.path()).await;
    let (http_port, mqtt_port, metrics_port) = (free_port(), free_port(), free_port());
    let http = format!("127.0.0.1:{http_port}");
    let mqtt = format!("127.0.0.1:{mqtt_port}");
    let bridge_metrics = format!("127.0.0.1:{metrics_port}");
    let data = dir.path().join("backend");
    let endpoint = otlp.endpoint();
    // The backend is configured by the standard variable, the bridge by its flag.
    let mut env = FAST_EXPORT.to_vec();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
    let _backend = Proc::spawn_env(
        "imn-backend",
        &bin("imn-backend"),
        &[
            "--http",
            &http,
            "--nats",
            &nats.url(),
            "--data",
            data.to_str().unwrap(),
        ],
        &env,
        dir.path(),
    );
    let _bridge = Proc::spawn_env(
        "imn-bridge",
        &bin("imn-bridge"),
        &[
            "--mqtt",
            &mqtt,
            "--nats",
            &nats.url(),
            "--metrics",
            &bridge_metrics,
            "--otlp-endpoint",
            &endpoint,
        ],
        &FAST_EXPORT,
        dir.path(),
    );
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let _agent = spawn_agent(
        &bin("imn-agent"),
        "edge-1",
        &format!("mqtt://{mqtt}"),
        &dir.path().join("edge-1"),
        &["--heartbeat-ms", "500", "--metrics-listen", &agent_metrics],
        dir.path(),
    );
    let api = Api::new(http_port);
    api.wait_alive(&["edge-1"], T).await;

    let r = api
        .post(
            "/agent/edge-1/ping_module?wait=30",
            r#"{"host": "127.0.0.1", "count": 3, "interval_ms": 50}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["state"], "succeeded", "{}", r.body);
    let trace_id = r.body["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no trace_id in {}", r.body))
        .to_string();
    assert_eq!(trace_id.len(), 32);

    let wanted = [
        "POST /agent/{id}/{module}",
        "dispatch ping_module",
        "bridge downlink",
        "agent command ping_module",
        "module run ping_module",
        "outbox wait",
        "store result",
    ];
    let spans: HashMap<String, ReceivedSpan> = otlp
        .wait_until_async("every span of the measurement", T, |o| {
            let spans: Vec<ReceivedSpan> = o
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            let by_name: HashMap<String, ReceivedSpan> =
                spans.iter().map(|s| (s.name.clone(), s.clone())).collect();
            wanted
                .iter()
                .all(|w| by_name.contains_key(*w))
                .then_some(by_name)
        })
        .await
        .unwrap();
    for (name, s) in &spans {
        println!(
            "span {name:28} {:12} {:>9.3} ms .. {:>9.3} ms  parent {}",
            s.service,
            ms(s.start_ns - spans[wanted[0]].start_ns),
            ms(s.end_ns - spans[wanted[0]].start_ns),
            s.parent_span_id
        );
    }
    // Every span of the trace is one of these: a measurement is one trace.
    let names: Vec<String> = otlp
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), wanted.len(), "{names:?}");

    let s = |n: &str| &spans[n];
    let root = s("POST /agent/{id}/{module}");
    let dispatch = s("dispatch ping_module");
    let bridge = s("bridge downlink");
    let command = s("agent command ping_module");
    let run = s("module run ping_module");
    let outbox = s("outbox wait");
    let store = s("store result");
    // Which process reported each span.
    for (span, service) in [
        (root, "imn-backend"),
        (dispatch, "imn-backend"),
        (bridge, "imn-bridge"),
        (command, "imn-agent"),
        (run, "imn-agent"),
        (outbox, "imn-agent"),
        (store, "imn-backend"),
    ] {
        assert_eq!(span.service, service, "{}", span.name);
        for key in ["service.version", "service.instance.id"] {
            assert!(
                span.resource.contains_key(key),
                "{}: {key} missing",
                span.name
            );
        }
    }
    assert_ne!(
        root.resource["service.instance.id"],
        bridge.resource["service.instance.id"]
    );
    assert_eq!(command.attributes["imn.agent.id"], "edge-1");
    // Parent links: API request → dispatch → bridge → agent, outbox, store.
    assert_eq!(root.parent_span_id, "", "the API request starts the trace");
    assert_eq!(dispatch.parent_span_id, root.span_id);
    assert_eq!(bridge.parent_span_id, dispatch.span_id);
    assert_eq!(command.parent_span_id, bridge.span_id);
    assert_eq!(run.parent_span_id, command.span_id);
    assert_eq!(outbox.parent_span_id, bridge.span_id);
    assert_eq!(store.parent_span_id, bridge.span_id);
    // The agent's timings (ms, agent clock; same machine here) sit inside the windows
    // of the spans around them: run within command, command within the API request
    // (which waited for the result), and after the bridge handed the command on.
    const MS: u64 = 1_000_000;
    assert!(run.start_ns >= command.start_ns && run.end_ns <= command.end_ns);
    assert!(
        command.start_ns + MS >= bridge.start_ns,
        "command before bridge"
    );
    assert!(command.start_ns + MS >= root.start_ns && command.end_ns <= root.end_ns);
    assert!(run.end_ns > run.start_ns, "a 3-probe ping takes time");
    assert!(outbox.start_ns == run.end_ns && outbox.end_ns <= store.start_ns + MS);
    assert!(store.end_ns <= root.end_ns, "stored before ?wait answered");
    assert!(dispatch.start_ns >= root.start_ns && dispatch.end_ns <= root.end_ns);

    // Measurement metrics over OTLP: the ping's RTTs, labelled by agent and target.
    let rtt = otlp
        .wait_until_async("imn.ping.rtt over OTLP", T, |o| {
            o.metrics()
                .into_iter()
                .filter(|m| m.name == "imn.ping.rtt" && m.service == "imn-backend")
                .flat_map(|m| m.points)
                .find(|p| {
                    p.attributes.get("agent").map(String::as_str) == Some("edge-1")
                        && p.attributes.get("target").map(String::as_str) == Some("127.0.0.1")
                        && p.count >= 3
                })
        })
        .await
        .unwrap();
    assert!(
        rtt.value > 0.0 && rtt.value < 3.0,
        "sum of 3 RTTs: {} s",
        rtt.value
    );
    otlp.wait_until_async("operational metrics over OTLP", T, |o| {
        let names: Vec<String> = o.metrics().into_iter().map(|m| m.name).collect();
        [
            "imn.agents.alive",
            "imn.results.ingested",
            "imn.ingest.lag",
            "imn.requests",
            "imn.agent.outbox.depth",
            "imn.bridge.messages",
            "imn.bridge.connections",
        ]
        .iter()
        .all(|n| names.iter().any(|m| m == n))
        .then_some(())
    })
    .await
    .unwrap();
    // Logs with the measurement's trace id, from the backend.
    let log = otlp
        .wait_until_async("a log line in the measurement's trace", T, |o| {
            o.logs().into_iter().find(|l| {
                l.trace_id == trace_id && l.service == "imn-backend" && l.body == "result stored"
            })
        })
        .await
        .unwrap();
    assert_eq!(log.span_id, store.span_id);
    assert!(otlp.logs().iter().all(|l| !l.body.is_empty()));

    // /metrics of the backend and of the bridge: promtool accepts them, and they say
    // what happened.
    let backend_page = text(&format!("http://{http}/metrics")).await;
    let bridge_page = text(&format!("http://{bridge_metrics}/metrics")).await;
    let agent_page = text(&format!("http://{agent_metrics}/metrics")).await;
    promtool_check("backend /metrics", &backend_page);
    promtool_check("bridge /metrics", &bridge_page);
    promtool_check("agent /metrics", &agent_page);
    assert_eq!(
        sample(&agent_page, "imn_agent_mqtt_connected{agent=\"edge-1\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&agent_page, "imn_agent_results_total{agent=\"edge-1\"}"),
        Some(1.0)
    );
    // The deployed dashboard and alert rules chart only metrics that exist.
    let exposed: Vec<&str> = [&backend_page, &bridge_page, &agent_page]
        .iter()
        .flat_map(|p| p.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "deploy/grafana/imn-fleet.json",
        "deploy/prometheus/rules.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used: Vec<String> = Vec::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("imn_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.push(name);
        }
        assert!(!used.is_empty(), "{file} uses no imn_ metric");
        for name in used {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| exposed.contains(b))
                .unwrap_or(&name);
            assert!(
                exposed.contains(&base),
                "{file} uses {name}, which nothing exposes"
            );
        }
    }
    assert_eq!(sample(&backend_page, "imn_agents_known "), Some(1.0));
    assert_eq!(sample(&backend_page, "imn_agents_alive "), Some(1.0));
    assert_eq!(
        sample(&backend_page, "imn_requests{state=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &backend_page,
            "imn_ping_rtt_seconds_count{agent=\"edge-1\",target=\"127.0.0.1\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &backend_page,
            "imn_ping_loss_ratio{agent=\"edge-1\",target=\"127.0.0.1\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &backend_page,
            "imn_results_ingested_total{module=\"ping_module\"}"
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &backend_page,
            "imn_agent_memory_total_bytes{agent=\"edge-1\"}"
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(sample(&bridge_page, "imn_bridge_connections "), Some(1.0));
    assert!(
        sample(
            &bridge_page,
            "imn_bridge_messages_total{direction=\"down\",kind=\"cmd\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        sample(
            &bridge_page,
            "imn_bridge_messages_total{direction=\"up\",kind=\"out\"}"
        )
        .unwrap()
            >= 1.0
    );
}

/// Runs `n` echo measurements one after another; returns each one's time in ms.
async fn echo_times(api: &Api, n: usize, label: &str) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let r = api
            .post(
                "/agent/agent-1/echo_module?wait=20",
                &format!(r#"{{"message": "{label} {i}"}}"#),
                &[],
            )
            .await;
        assert_eq!(r.body["state"], "succeeded", "{label}: {}", r.body);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times
}

/// A collector that goes away (refused connections), then hangs (accepts, never
/// answers), then comes back: measurements keep their speed throughout, and export
/// resumes once the collector is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_collector_never_slows_measurements() {
    let otlp = OtlpReceiver::start().unwrap();
    let port = otlp.port();
    let endpoint = otlp.endpoint();
    let mut env = FAST_EXPORT.to_vec();
    // Long enough that an export blocking the data path would show in every request.
    env.push(("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"));
    let up = Up::start_env(1, &["--otlp-endpoint", &endpoint], &env).await;
    up.api.wait_alive(&["agent-1"], T).await;
    const N: usize = 15;
    let before = echo_times(&up.api, N, "collector up").await;
    otlp.wait_until_async("spans from the first measurements", T, |o| {
        (o.spans()
            .iter()
            .any(|s| s.name == "agent command echo_module"))
        .then_some(())
    })
    .await
    .unwrap();
    otlp.stop();
    let dead = echo_times(&up.api, N, "collector dead").await;
    // A black hole: connections are accepted (by the kernel's backlog) and nothing is
    // ever answered.
    let hole = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let hung = echo_times(&up.api, N, "collector hung").await;
    drop(hole);
    let median = |t: &[f64]| percentile(t, 50.0);
    println!(
        "echo round trip, ms (median / max of {N}): collector up {:.1} / {:.1}, dead {:.1} / {:.1}, hung {:.1} / {:.1}",
        median(&before),
        before[N - 1],
        median(&dead),
        dead[N - 1],
        median(&hung),
        hung[N - 1]
    );
    // Normal speed: a blocked data path would cost each request up to the 5 s export
    // timeout; the bound leaves room for a busy 2-core machine, not for that.
    let bound = 3.0 * median(&before) + 250.0;
    for (label, t) in [("dead", &dead), ("hung", &hung)] {
        assert!(
            median(t) <= bound,
            "collector {label}: median {:.1} ms, collector up {:.1} ms",
            median(t),
            median(&before)
        );
        assert!(
            t[N - 1] < 2000.0,
            "collector {label}: slowest {:.1} ms",
            t[N - 1]
        );
    }
    // The collector comes back on its address: spans of new measurements arrive.
    let back = OtlpReceiver::start_on(port).unwrap();
    let again = echo_times(&up.api, 3, "collector back").await;
    assert!(median(&again) <= bound);
    back.wait_until_async("spans after the collector came back", T, |o| {
        o.spans()
            .iter()
            .any(|s| s.name == "agent command echo_module")
            .then_some(())
    })
    .await
    .unwrap();
}

/// The Prometheus config and alert rules in deploy/ load in Prometheus's own checker.
#[test]
fn deployed_prometheus_config_and_rules_pass_promtool() {
    let promtool = program("promtool").expect("promtool (Debian's prometheus package)");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "rules.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("../grafana/imn-fleet.json")).unwrap(),
    )
    .expect("the Grafana dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
}

/// A measurement asked of an agent that is offline is still one trace: the API request
/// ends at once, and the dispatch, the bridge, the agent's run, its outbox wait and the
/// store join that trace when the agent comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agent_s_measurement_is_still_one_trace() {
    let otlp = OtlpReceiver::start().unwrap();
    let endpoint = otlp.endpoint();
    let up = Up::start_env(0, &["--otlp-endpoint", &endpoint], &FAST_EXPORT).await;
    let data = up.dir.path().join("edge-9");
    let mut agent = start_agent("edge-9", &up.broker_url(), &data, up.dir.path());
    up.api.wait_alive(&["edge-9"], T).await;
    agent.kill9();
    up.api.wait_not_alive("edge-9", T).await;
    let r = up
        .api
        .post(
            "/agent/edge-9/echo_module",
            r#"{"message": "while you were away"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["state"], "pending", "{}", r.body);
    let trace_id = r.body["trace_id"].as_str().unwrap().to_string();
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _agent = start_agent("edge-9", &up.broker_url(), &data, up.dir.path());
    up.api.wait_state(&rid, "succeeded", T).await;
    let spans = otlp
        .wait_until_async("the late spans of the measurement", T, |o| {
            let spans: Vec<ReceivedSpan> = o
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            // Each service's spans come in their own batches: wait for all of them.
            [
                "POST /agent/{id}/{module}",
                "dispatch echo_module",
                "bridge downlink",
                "agent command echo_module",
                "store result",
            ]
            .iter()
            .all(|n| spans.iter().any(|s| s.name == *n))
            .then_some(spans)
        })
        .await
        .unwrap();
    let find = |n: &str| {
        spans
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("no {n} span in {spans:?}"))
    };
    let root = find("POST /agent/{id}/{module}");
    let dispatch = find("dispatch echo_module");
    let bridge = find("bridge downlink");
    let command = find("agent command echo_module");
    assert_eq!(root.parent_span_id, "");
    assert_eq!(dispatch.parent_span_id, root.span_id);
    assert_eq!(bridge.parent_span_id, dispatch.span_id);
    assert_eq!(command.parent_span_id, bridge.span_id);
    assert_eq!(
        bridge.service, "imn-bridge",
        "imn up reports its bridge as its own service"
    );
    assert!(
        dispatch.start_ns >= root.end_ns + 400_000_000,
        "dispatched when the agent came back, after the request had answered"
    );
    println!(
        "offline agent: request answered at {:.1} ms, dispatched at {:.1} ms, stored at {:.1} ms",
        ms(root.end_ns - root.start_ns),
        ms(dispatch.start_ns - root.start_ns),
        ms(find("store result").end_ns - root.start_ns)
    );
}
