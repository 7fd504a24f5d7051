//! Alerts end to end: rules on a real measurement fire and resolve as a namespace
//! host's latency is raised and restored, and their webhook, a receiver written in
//! Python that checks every signature with Python's own `hmac` (an implementation
//! independent of the backend's), gets every alert once, in order, although it was
//! down when the first ones fired. The same events arrive on the SSE stream. Then
//! ingest throughput with webhooks that hang, against none, in the same run.
//!
//! The pinged host is in a network namespace of the test's own (`Netns::create`
//! checks that the route uses the test's veth before anything is sent); webhooks go
//! to 127.0.0.1 only, which the backend refuses unless `--webhook-allow` names it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imn_tests::netns::SlowHost;
use imn_tests::{free_port, wait_for, Proc, Up};
use serde_json::{json, Value};

const SECRET: &str = "a-webhook-secret-of-the-test";

/// The webhook receiver: checks `X-IMN-Signature` (`t=T,v1=HEX`, HEX =
/// HMAC-SHA256(secret, "T." + body)) with Python's hmac and a 5-minute clock
/// window, logs every call it gets (duplicates too) as a JSON line, and answers 200
/// for a valid signature, 401 otherwise.
const RECEIVER: &str = r#"
import hashlib, hmac, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, secret, path = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
log = open(path, "a")
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        parts = dict(p.split("=", 1) for p in self.headers.get("x-imn-signature", "").split(",") if "=" in p)
        t = parts.get("t", "0")
        want = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(want, parts.get("v1", "")) and abs(time.time() - int(t)) < 300
        log.write(json.dumps({"event": self.headers.get("x-imn-event"), "valid": valid,
                              "body": json.loads(body)}) + "\n")
        log.flush()
        self.send_response(200 if valid else 401)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

struct Receiver {
    proc: Option<Proc>,
    port: u16,
    script: std::path::PathBuf,
    log: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Receiver {
    fn new(dir: &std::path::Path) -> Receiver {
        let script = dir.join("receiver.py");
        std::fs::write(&script, RECEIVER).unwrap();
        Receiver {
            proc: None,
            port: free_port(),
            script,
            log: dir.join("received.jsonl"),
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    async fn up(&mut self) {
        let port = self.port.to_string();
        self.proc = Some(Proc::spawn(
            "webhook-receiver",
            std::path::Path::new("python3"),
            &[
                self.script.to_str().unwrap(),
                &port,
                SECRET,
                self.log.to_str().unwrap(),
            ],
            &self.dir,
        ));
        let port = self.port;
        wait_for(
            "the receiver to listen",
            Duration::from_secs(10),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    fn down(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Every alert event of the backend, oldest first.
async fn alerts(api: &imn_tests::Api) -> Vec<Value> {
    let r = api.get("/v1/alerts?limit=1000").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["events"].as_array().unwrap().clone()
}

fn states_of(events: &[Value], rule: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["rule_id"] == rule)
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect()
}

/// Reads `GET /v1/alerts/stream` into `into` (every event's type, id and data).
fn follow_stream(url: String, into: Arc<Mutex<Vec<(String, String, Value)>>>) {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut resp = client.get(url).send().await.expect("the stream");
        assert_eq!(resp.status(), 200);
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) = (String::new(), String::new(), None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).ok();
                    }
                }
                if let Some(d) = data {
                    into.lock().unwrap().push((kind, id, d));
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_resolve_and_a_webhook_that_was_down_gets_each_once_in_order_signed() {
    // A namespace host whose echo replies come from the test's responder, 2 ms late.
    let host = SlowHost::start("alw", 2);

    let up = Up::start(
        1,
        &[
            "--webhook-allow",
            "127.0.0.0/8",
            "--alert-every",
            "1s",
            "--webhook-max-backoff",
            "2s",
        ],
    )
    .await;
    up.api
        .wait_alive(&["agent-1"], Duration::from_secs(30))
        .await;
    let mut receiver = Receiver::new(up.dir.path());
    let base = format!("http://127.0.0.1:{}", up.http_port);

    // Three pings every second.
    let r = up
        .api
        .post(
            "/v1/measurements",
            &json!({"module": "ping_module",
                    "params": {"host": host.ip(), "count": 3, "interval_ms": 50, "timeout_ms": 1000},
                    "agents": {"ids": ["agent-1"]},
                    "schedule": {"interval_s": 1, "jitter_s": 0}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = r.body["id"].as_str().unwrap().to_string();

    // Refused: a webhook to loopback is only allowed by the flag (which is given
    // here), so try an address the flag does not open, and a bad threshold.
    let bad = up
        .api
        .post(
            "/v1/alert-rules",
            &json!({"name": "x", "measurement_id": m,
                    "webhook": {"url": "http://169.254.169.254/latest", "secret": SECRET}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (422, Some("webhook.url")),
        "{}",
        bad.body
    );
    let bad = up
        .api
        .post(
            "/v1/alert-rules",
            &json!({"name": "x", "measurement_id": m, "thresholds": {"max_http_time": 5}})
                .to_string(),
            &[],
        )
        .await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (422, Some("thresholds.max_http_time")),
        "{}",
        bad.body
    );

    let hook = json!({"url": receiver.url(), "secret": SECRET});
    let slow = up
        .api
        .post(
            "/v1/alert-rules",
            &json!({"name": "slow path", "measurement_id": m,
                    "thresholds": {"max_rtt_median": 30, "window_s": 3},
                    "for_s": 2, "recovery_s": 2, "webhook": hook})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(slow.status, 201, "{}", slow.body);
    assert_eq!(slow.body["webhook"]["secret_set"], json!(true));
    assert!(
        slow.body["webhook"].get("secret").is_none(),
        "{}",
        slow.body
    );
    let slow = slow.body["id"].as_str().unwrap().to_string();
    let shift = up
        .api
        .post(
            "/v1/alert-rules",
            &json!({"name": "latency shift", "measurement_id": m, "anomalies": ["rtt_shift_up"],
                    "webhook": hook})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(shift.status, 201, "{}", shift.body);
    let shift = shift.body["id"].as_str().unwrap().to_string();

    let seen: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    follow_stream(format!("{base}/v1/alerts/stream"), seen.clone());

    // The detector learns the path: a dozen results, and the threshold rule is ok.
    let results = |api: imn_tests::Api, m: String| async move {
        api.get(&format!("/v1/results?measurement={m}&limit=1000"))
            .await
            .body["results"]
            .as_array()
            .map_or(0, Vec::len)
    };
    wait_for("15 results", Duration::from_secs(40), || {
        let f = results(up.api.clone(), m.clone());
        async move { (f.await >= 15).then_some(()) }
    })
    .await;
    let rule = up.api.get(&format!("/v1/alert-rules/{slow}")).await;
    assert_eq!(rule.body["state"], json!("ok"), "{}", rule.body);
    assert!(alerts(&up.api).await.is_empty());

    // The receiver is down (nothing listens on its port) when the path gets slow.
    let raised = Instant::now();
    host.set_delay_ms(80);
    let fired = wait_for("both rules to fire", Duration::from_secs(40), || {
        let api = up.api.clone();
        let (slow, shift) = (slow.clone(), shift.clone());
        async move {
            let a = alerts(&api).await;
            (states_of(&a, &slow) == ["firing"] && states_of(&a, &shift) == ["firing"]).then_some(a)
        }
    })
    .await;
    let fired_after = raised.elapsed();
    let firing = fired.iter().find(|e| e["rule_id"] == slow).unwrap();
    assert_eq!(firing["breaching_agents"], json!(1), "{firing}");
    assert_eq!(
        firing["breaches"][0]["agent_id"],
        json!("agent-1"),
        "{firing}"
    );
    let anomaly = &fired.iter().find(|e| e["rule_id"] == shift).unwrap()["anomalies"][0];
    assert_eq!(anomaly["anomaly"], json!("rtt_shift_up"), "{anomaly}");
    // The alert names the anomaly's event, which has the evidence.
    let all_anomalies = up.api.get("/v1/anomalies?limit=1000").await.body;
    let event = all_anomalies["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == anomaly["event"])
        .unwrap_or_else(|| panic!("{anomaly} not in {all_anomalies}"));
    let shift_ms = event["evidence"]["shift_ms"].as_f64().unwrap();
    assert!((60.0..100.0).contains(&shift_ms), "{event}");
    assert_eq!(event["measurement_id"], json!(m), "{event}");
    assert!(
        !event["result_refs"].as_array().unwrap().is_empty(),
        "{event}"
    );
    // Retried while down (every 1 s, 2 s, 2 s …): a few seconds of refusals.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(receiver.received().is_empty());
    receiver.up().await;
    wait_for(
        "the firing alerts delivered",
        Duration::from_secs(20),
        || {
            let n = receiver.received().len();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;

    // Down again before the path is restored: the resolutions wait for it.
    receiver.down();
    // Restored: both resolve (the threshold after its window and recovery, the
    // anomaly rule when the detector sees the shift back down).
    let restored = Instant::now();
    host.set_delay_ms(2);
    let all = wait_for("both rules to resolve", Duration::from_secs(60), || {
        let api = up.api.clone();
        let (slow, shift) = (slow.clone(), shift.clone());
        async move {
            let a = alerts(&api).await;
            (states_of(&a, &slow) == ["firing", "resolved"]
                && states_of(&a, &shift) == ["firing", "resolved"])
            .then_some(a)
        }
    })
    .await;
    let resolved_after = restored.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.received().len(), 2, "delivered while down?");
    receiver.up().await;
    let got = wait_for("every alert delivered", Duration::from_secs(30), || {
        let r = receiver.received();
        async move { (r.len() >= 4).then_some(r) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_final = receiver.received();
    assert_eq!(got_final.len(), got.len(), "more came: {got_final:?}");

    // Every alert once, each signature valid, each rule's in order, and exactly the
    // backend's alerts.
    let ids: Vec<&str> = got.iter().map(|g| g["event"].as_str().unwrap()).collect();
    let want: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|i| i[1..].parse::<u64>().unwrap());
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a duplicate: {ids:?}");
    let mut want_sorted = want.clone();
    want_sorted.sort_by_key(|i| i[1..].parse::<u64>().unwrap());
    assert_eq!(sorted, want_sorted, "received {ids:?}, backend {want:?}");
    assert!(got.iter().all(|g| g["valid"] == json!(true)), "{got:?}");
    for rule in [&slow, &shift] {
        let order: Vec<(u64, String)> = got
            .iter()
            .filter(|g| g["body"]["rule_id"] == *rule)
            .map(|g| {
                (
                    g["event"].as_str().unwrap()[1..].parse().unwrap(),
                    g["body"]["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(order.len(), 2, "{order:?}");
        assert!(order[0].0 < order[1].0, "{order:?}");
        assert_eq!(
            (order[0].1.as_str(), order[1].1.as_str()),
            ("firing", "resolved")
        );
    }
    // A forged call (wrong secret) is refused by the receiver: the check is real.
    let body = br#"{"id":"e999"}"#;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged = imn_backend::alerts::webhook::signature("not-the-secret-at-all", t, body);
    let r = reqwest::Client::new()
        .post(receiver.url())
        .header("x-imn-signature", forged)
        .header("x-imn-event", "e999")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The stream carried the same alerts, in order, and the anomalies.
    let stream = seen.lock().unwrap().clone();
    let streamed: Vec<&str> = stream
        .iter()
        .filter(|(k, _, _)| k == "alert")
        .map(|(_, id, _)| id.as_str())
        .collect();
    assert_eq!(streamed, want, "stream {stream:?}");
    let kinds: Vec<&str> = stream
        .iter()
        .filter(|(k, _, _)| k == "anomaly")
        .map(|(_, _, d)| d["anomaly"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"rtt_shift_up") && kinds.contains(&"rtt_shift_down"),
        "{kinds:?}"
    );
    let seqs: Vec<u64> = stream
        .iter()
        .map(|(_, id, _)| id[1..].parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Resuming after an id gives what came after it.
    let after = &want[1];
    let page = up.api.get(&format!("/v1/alerts?after={after}")).await;
    let rest: Vec<&str> = page.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, want[2..].to_vec());
    let bad = up.api.get("/v1/alerts?after=12").await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("after"))
    );
    eprintln!(
        "alerts: fired {:.1} s after the delay was raised (for_s 2), resolved {:.1} s after it was restored (window 3 s, recovery_s 2); {} calls received for {} alerts, every signature valid",
        fired_after.as_secs_f64(),
        resolved_after.as_secs_f64(),
        got.len(),
        want.len()
    );

    // The webhook's counters: every alert taken once, the refusals counted.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        metric("imn_alert_webhook_delivered_total"),
        want.len() as f64
    );
    assert!(metric("imn_alert_webhook_failed_total") >= 2.0);
    assert_eq!(metric("imn_alerts_firing"), 0.0);
    assert!(metric("imn_anomalies_total") >= 2.0);
    // Deleting a rule: its events stay.
    let d = up.api.delete(&format!("/v1/alert-rules/{slow}")).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(
        up.api.get(&format!("/v1/alert-rules/{slow}")).await.status,
        404
    );
    assert_eq!(alerts(&up.api).await.len(), want.len());
    receiver.down();
}

/// A listener that accepts every connection and never answers: a webhook that hangs.
fn hanging_listener() -> (u16, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            n.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, accepted)
}

/// Ingest of `agents` simulated agents sending `each` results: results per second.
async fn ingest_rate(up: &Up, tag: &str, agents: usize, each: u64) -> f64 {
    use imn_tests::sim::{Control, SimConfig, SimStats};
    let cfg = Arc::new(SimConfig {
        host: "127.0.0.1".into(),
        port: up.mqtt_port,
        heartbeat: Duration::from_secs(5),
        results: each,
        per_message: 20,
        window: 4,
        message: "r".repeat(200),
        resend_after: Duration::from_secs(10),
        tokens: None,
        wire_version: imn_proto::wire::WIRE_VERSION,
    });
    let stats = Arc::new(SimStats::default());
    let mut controls = Vec::new();
    for i in 0..agents {
        let ctl = Arc::new(Control::default());
        tokio::spawn(imn_tests::sim::run(
            format!("{tag}-{i}"),
            cfg.clone(),
            stats.clone(),
            ctl.clone(),
        ));
        controls.push(ctl);
    }
    wait_for("simulated agents", Duration::from_secs(30), || {
        let n = stats.connected.load(Ordering::SeqCst);
        async move { (n == agents as u64).then_some(()) }
    })
    .await;
    let start = Instant::now();
    for c in &controls {
        c.start_results();
    }
    let total = agents as u64 * each;
    wait_for("every result acked", Duration::from_secs(180), || {
        let n = stats.results_acked.load(Ordering::SeqCst);
        async move { (n >= total).then_some(()) }
    })
    .await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for c in &controls {
        c.stop.store(true, Ordering::SeqCst);
    }
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_webhooks_do_not_slow_ingest() {
    const RULES: usize = 20;
    let up = Up::start(
        1,
        &[
            "--webhook-allow",
            "127.0.0.0/8",
            "--alert-every",
            "1s",
            "--webhook-timeout",
            "3600s",
        ],
    )
    .await;
    up.api
        .wait_alive(&["agent-1"], Duration::from_secs(30))
        .await;
    // A measurement every rule breaches: loopback answers in microseconds, over
    // a 1 µs threshold.
    let r = up
        .api
        .post(
            "/v1/measurements",
            &json!({"module": "ping_module",
                    "params": {"host": "127.0.0.1", "count": 2, "interval_ms": 20, "timeout_ms": 500},
                    "agents": {"ids": ["agent-1"]},
                    "schedule": {"interval_s": 1, "jitter_s": 0}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = r.body["id"].as_str().unwrap().to_string();

    // Warm-up, then without rules.
    ingest_rate(&up, "warm", 2, 1_000).await;
    let none = ingest_rate(&up, "none", 4, 5_000).await;

    let (port, accepted) = hanging_listener();
    let mut ids = Vec::new();
    for i in 0..RULES {
        let r = up
            .api
            .post(
                "/v1/alert-rules",
                &json!({"name": format!("hang {i}"), "measurement_id": m,
                        "thresholds": {"max_rtt_median": 0.001, "window_s": 5},
                        "webhook": {"url": format!("http://127.0.0.1:{port}/"), "secret": SECRET}})
                .to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    // Every rule fired and its webhook call hangs.
    wait_for(
        "every webhook call to hang",
        Duration::from_secs(60),
        || {
            let n = accepted.load(Ordering::SeqCst);
            async move { (n >= RULES as u64).then_some(()) }
        },
    )
    .await;
    let t = Instant::now();
    let rules = up.api.get("/v1/alert-rules").await;
    let answer_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(rules.body["firing"], json!(RULES), "{}", rules.body);
    let hanging = ingest_rate(&up, "hang", 4, 5_000).await;
    // Without rules again: the machine's own drift between runs, apart from ours.
    for id in &ids {
        let d = up.api.delete(&format!("/v1/alert-rules/{id}")).await;
        assert_eq!(d.status, 200, "{}", d.body);
    }
    let after = ingest_rate(&up, "after", 4, 5_000).await;
    let ratio = hanging / ((none + after) / 2.0);
    eprintln!(
        "ingest: {none:.0} then {after:.0} results/s without rules, {hanging:.0} results/s between them with {RULES} firing rules whose webhook calls hang ({} held open); ratio {ratio:.2}; GET /v1/alert-rules answered in {answer_ms:.1} ms meanwhile",
        accepted.load(Ordering::SeqCst)
    );
    // The calls still hang (no answer, an hour's timeout), and ingest did not stop.
    assert!(accepted.load(Ordering::SeqCst) >= RULES as u64);
    assert!(ratio > 0.5, "ingest slowed to {ratio:.2} of its rate");
}
