//! Fleet measurements against `imn up` and five real agent processes with tags and
//! locations: selection like RIPE Atlas's, and a one-off measurement that completes at
//! its deadline when one agent stays offline.

use std::collections::BTreeSet;
use std::time::Duration;

use imn_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn ids(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|a| {
            a.get("id")
                .unwrap_or(a)
                .as_str()
                .expect("an id")
                .to_string()
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_and_a_one_off_measurement_with_an_agent_offline() {
    let up = Up::start(0, &[]).await;
    let fleet: [(&str, &str, &str, Option<&str>); 5] = [
        ("f1", "lte", "DE", Some("3320")),
        ("f2", "lte", "de", None),
        ("f3", "lab", "NL", Some("1136")),
        ("f4", "lte,lab", "NL", None),
        ("f5", "lab", "DE", None),
    ];
    let mut procs = Vec::new();
    for (id, tags, country, asn) in fleet {
        let mut flags = vec![
            "--heartbeat-ms",
            "500",
            "--tags",
            tags,
            "--country",
            country,
        ];
        if let Some(a) = asn {
            flags.extend(["--asn", a]);
        }
        procs.push(spawn_agent(
            &bin("imn-agent"),
            id,
            &up.broker_url(),
            &up.dir.path().join(id),
            &flags,
            up.dir.path(),
        ));
    }
    up.api.wait_alive(&["f1", "f2", "f3", "f4", "f5"], T).await;

    // Searchable metadata.
    let get = |q: &'static str| {
        let api = up.api.clone();
        async move {
            let r = api.get(&format!("/agents{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            ids(&r.body)
        }
    };
    assert_eq!(get("?tag=lte").await, set(&["f1", "f2", "f4"]));
    assert_eq!(get("?tag=lte,lab").await, set(&["f4"]));
    assert_eq!(get("?country=de").await, set(&["f1", "f2", "f5"]));
    assert_eq!(get("?country=DE&tag=lab").await, set(&["f5"]));
    assert_eq!(get("?asn=1136").await, set(&["f3"]));
    assert_eq!(get("?alive=true").await.len(), 5);

    // Pages by id: X-Total-Count on each, a Link to the next until the last.
    let page = |q: String| {
        let api = up.api.clone();
        async move {
            let r = api.get(&q).await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            let header = |h: &str| r.headers.get(h).map(|v| v.to_str().unwrap().to_string());
            let order: Vec<String> = r
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string())
                .collect();
            (order, header("x-total-count"), header("link"))
        }
    };
    let (p1, total, link) = page("/agents?limit=2".into()).await;
    assert_eq!(
        (p1, total.as_deref()),
        (vec!["f1".to_string(), "f2".into()], Some("5"))
    );
    let link = link.expect("a Link to the next page");
    assert_eq!(link, "</agents?limit=2&after=f2>; rel=\"next\"");
    let next = link[1..link.find('>').unwrap()].to_string();
    let (p2, _, link) = page(next).await;
    assert_eq!(p2, vec!["f3".to_string(), "f4".into()]);
    let next = link.expect("a third page");
    let (p3, total, link) = page(next[1..next.find('>').unwrap()].to_string()).await;
    assert_eq!(
        (p3, total.as_deref(), link),
        (vec!["f5".to_string()], Some("5"), None)
    );
    // Filters stay in the Link; the total counts what they match.
    let (p, total, link) = page("/agents?tag=lab&limit=1".into()).await;
    assert_eq!((p, total.as_deref()), (vec!["f3".to_string()], Some("3")));
    assert_eq!(
        link.as_deref(),
        Some("</agents?tag=lab&limit=1&after=f3>; rel=\"next\"")
    );
    let (p, total, link) = page("/agents/alive?limit=2&after=f4".into()).await;
    assert_eq!(
        (p, total.as_deref(), link),
        (vec!["f5".to_string()], Some("5"), None)
    );
    for q in [
        "/agents?limit=0",
        "/agents?limit=10001",
        "/agents/alive?limit=0",
    ] {
        let r = up.api.get(q).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["field"], "limit", "{q}: {}", r.body);
    }
    let one = up.api.get("/agents?asn=3320").await;
    assert_eq!(one.body[0]["location"]["country"], "DE");
    assert_eq!(one.body[0]["location"]["asn"], 3320);
    assert_eq!(one.body[0]["arch"], std::env::consts::ARCH);

    // Selection for a measurement: by tag with a limit, by country.
    let create = |body: Value| {
        let api = up.api.clone();
        async move { api.post("/v1/measurements", &body.to_string(), &[]).await }
    };
    let r = create(json!({
        "module": "echo_module", "params": {"message": "lab"},
        "agents": {"tags": ["lab"], "limit": 2},
    }))
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let chosen = ids(&r.body["agents"]);
    assert_eq!(chosen.len(), 2);
    assert!(chosen.is_subset(&set(&["f3", "f4", "f5"])), "{chosen:?}");
    assert_eq!(
        r.headers["location"].to_str().unwrap(),
        format!("/v1/measurements/{}", r.body["id"].as_str().unwrap())
    );
    let r = create(json!({
        "module": "echo_module", "params": {"message": "de"},
        "agents": {"country": "DE"},
    }))
    .await;
    assert_eq!(ids(&r.body["agents"]), set(&["f1", "f2", "f5"]));
    // Nothing matches: 422 with the reason.
    let r = create(json!({
        "module": "echo_module", "params": {"message": "x"},
        "agents": {"country": "FR", "tags": ["lte"]},
    }))
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["rule"], "no_match", "{}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("FR"));
    // Bad parameters are refused once, naming the field.
    let r = create(json!({
        "module": "echo_module", "params": {"message": 5}, "agents": {"all": true},
    }))
    .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (422, Some("/message"))
    );

    // A one-off measurement to all five, f5 offline: 4 results, then complete at the
    // deadline with f5 expired.
    procs[4].kill9();
    up.api.wait_not_alive("f5", T).await;
    let r = create(json!({
        "module": "echo_module", "params": {"message": "fleet"},
        "agents": {"ids": ["f1", "f2", "f3", "f4", "f5"]},
        "deadline_s": 5, "description": "one offline",
    }))
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["agents"].as_array().unwrap().len(), 5);
    let path = r.headers["location"].to_str().unwrap().to_string();
    let m = wait_for("4 of 5 agents to report", T, || {
        let (api, path) = (up.api.clone(), path.clone());
        async move {
            let m = api.get(&path).await.body;
            (m["progress"]["reported"] == 4).then_some(m)
        }
    })
    .await;
    assert_eq!(m["state"], "running", "{m}");
    assert_eq!(
        m["progress"]["summary"], "4/5 agents reported, 1 pending: 1 offline",
        "{m}"
    );
    let started = std::time::Instant::now();
    let m = wait_for("the measurement to complete at its deadline", T, || {
        let (api, path) = (up.api.clone(), path.clone());
        async move {
            let m = api.get(&path).await.body;
            (m["state"] == "complete").then_some(m)
        }
    })
    .await;
    println!(
        "complete {:.1} s after 4/5 reported: {}",
        started.elapsed().as_secs_f64(),
        m["progress"]["summary"]
    );
    assert_eq!(m["progress"]["reported"], 4, "{m}");
    assert_eq!(m["progress"]["expired_or_cancelled"], 1, "{m}");
    assert_eq!(m["description"], "one offline");
    for a in m["agents"].as_array().unwrap() {
        if a["agent_id"] == "f5" {
            assert_eq!(a["state"], "expired", "{a}");
            assert!(a["result"].is_null());
        } else {
            assert_eq!(a["state"], "succeeded", "{a}");
            assert_eq!(a["result"]["message"], "fleet", "{a}");
        }
    }
    let missing = up.api.get("/v1/measurements/nope").await;
    assert_eq!(missing.status, 404);

    // DELETE stops what has not finished: f5's request, still waiting, is cancelled.
    let r = create(json!({
        "module": "echo_module", "params": {"message": "never"},
        "agents": {"ids": ["f5"]}, "deadline_s": 3600,
    }))
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let path = r.headers["location"].to_str().unwrap().to_string();
    let d = up.api.delete(&path).await;
    assert_eq!(
        (d.status, d.body["cancelled"].as_u64()),
        (200, Some(1)),
        "{}",
        d.body
    );
    let m = up.api.get(&path).await.body;
    assert_eq!(m["state"], "complete", "{m}");
    assert_eq!(m["agents"][0]["state"], "cancelled", "{m}");
    assert_eq!(up.api.delete("/v1/measurements/nope").await.status, 404);
}

/// A simulated agent (`imn_tests::sim`) that sends `results` echo results, with
/// request ids `{id}-{seq}`, once told to.
fn sim_agent(
    up: &Up,
    id: &str,
    results: u64,
    per_message: usize,
    window: usize,
) -> (
    std::sync::Arc<imn_tests::sim::SimStats>,
    std::sync::Arc<imn_tests::sim::Control>,
) {
    use imn_tests::sim::{Control, SimConfig, SimStats};
    use std::sync::Arc;
    let cfg = Arc::new(SimConfig {
        host: "127.0.0.1".into(),
        port: up.mqtt_port,
        heartbeat: Duration::from_secs(1),
        results,
        per_message,
        window,
        message: "page".into(),
        resend_after: Duration::from_secs(5),
        tokens: None,
        wire_version: imn_proto::wire::WIRE_VERSION,
    });
    let (stats, ctl) = (Arc::new(SimStats::default()), Arc::new(Control::default()));
    tokio::spawn(imn_tests::sim::run(
        id.to_string(),
        cfg,
        stats.clone(),
        ctl.clone(),
    ));
    (stats, ctl)
}

/// 10,000 stored results, then 3,000 more arriving while a client pages through
/// `GET /v1/results` 500 at a time: every result is returned exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_pages_return_each_result_once_while_results_arrive() {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    let up = Up::start(0, &[]).await;
    let (a, a_ctl) = sim_agent(&up, "pg-a", 10_000, 50, 4);
    let (b, b_ctl) = sim_agent(&up, "pg-b", 3_000, 5, 1);
    // pg-b sends slowly (one message of 5 results at a time), so its results are stored
    // while the pages are read.
    wait_for("both simulated agents to connect", T, || {
        let n = a.connected.load(Ordering::SeqCst) + b.connected.load(Ordering::SeqCst);
        async move { (n == 2).then_some(()) }
    })
    .await;
    a_ctl.start_results();
    wait_for("10,000 results stored", Duration::from_secs(120), || {
        let n = a.results_acked.load(Ordering::SeqCst);
        async move { (n == 10_000).then_some(()) }
    })
    .await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut cursor = String::new();
    let mut pages = 0;
    // Pages read while pg-b was storing its results.
    let mut pages_during = 0;
    loop {
        if pages == 3 {
            b_ctl.start_results();
        }
        let b_done = b.results_acked.load(Ordering::SeqCst) == 3_000;
        if pages >= 3 && !b_done {
            pages_during += 1;
        }
        let r = up
            .api
            .get(&format!("/v1/results?limit=200&cursor={cursor}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.body["results"].as_array().unwrap();
        pages += 1;
        for res in page {
            let rid = res["request_id"].as_str().unwrap().to_string();
            *seen.entry(rid).or_default() += 1;
        }
        cursor = r.body["next_cursor"].as_str().unwrap().to_string();
        if page.is_empty() && b_done {
            break;
        }
        assert!(pages < 1_000, "paging does not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pages_during > 0,
        "pg-b's results were not stored while paging"
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "returned more than once: {twice:?}");
    assert_eq!(seen.len(), 13_000, "every result once");
    println!(
        "{pages} pages, {pages_during} of them read while pg-b's 3,000 results were being stored"
    );
    // Filters: one agent, and a bad cursor is refused naming it.
    let mut n = 0;
    let mut cursor = String::new();
    loop {
        let r = up
            .api
            .get(&format!(
                "/v1/results?agent=pg-b&limit=1000&cursor={cursor}"
            ))
            .await;
        let page = r.body["results"].as_array().unwrap();
        assert!(page.iter().all(|x| x["agent_id"] == "pg-b"));
        n += page.len();
        cursor = r.body["next_cursor"].as_str().unwrap().to_string();
        if r.body["more"] == false {
            break;
        }
    }
    assert_eq!(n, 3_000);
    let bad = up.api.get("/v1/results?cursor=zzz").await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("cursor"))
    );
    a_ctl.stop.store(true, Ordering::SeqCst);
    b_ctl.stop.store(true, Ordering::SeqCst);
}

/// Reads Server-Sent Events from `resp` until `enough` says stop; returns (id, data)
/// of each `result` event.
async fn read_events(
    resp: &mut reqwest::Response,
    buf: &mut String,
    out: &mut Vec<(String, Value)>,
    enough: impl Fn(&[(String, Value)]) -> bool,
) {
    while !enough(out) {
        let chunk = tokio::time::timeout(T, resp.chunk())
            .await
            .expect("an event within 30 s")
            .expect("stream read")
            .expect("stream still open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim().to_string());
                }
            }
            if event.as_deref() == Some("result") {
                let data: Value = serde_json::from_str(&data.expect("data")).unwrap();
                out.push((id.expect("an event id"), data));
            }
        }
    }
}

/// An SSE client that drops mid-stream, while results keep arriving, and reconnects
/// with `Last-Event-ID` gets every result exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stream_resumes_with_last_event_id_and_misses_nothing() {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    let up = Up::start(0, &[]).await;
    let (stats, ctl) = sim_agent(&up, "sse-a", 2_000, 5, 1);
    wait_for("the simulated agent to connect", T, || {
        let n = stats.connected.load(Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
    let url = format!(
        "http://127.0.0.1:{}/v1/results/stream?agent=sse-a",
        up.http_port
    );
    let client = reqwest::Client::new();
    let mut resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    ctl.start_results();
    let (mut buf, mut events) = (String::new(), Vec::new());
    read_events(&mut resp, &mut buf, &mut events, |e| e.len() >= 500).await;
    drop(resp);
    let at_drop = stats.results_acked.load(Ordering::SeqCst);
    assert!(
        at_drop < 2_000,
        "the agent was still sending when the client left"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = events.last().unwrap().0.clone();
    let mut resp = client
        .get(&url)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let before = events.len();
    buf.clear();
    read_events(&mut resp, &mut buf, &mut events, |e| {
        e.iter()
            .map(|(_, d)| d["request_id"].as_str().unwrap().to_string())
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= 2_000
    })
    .await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for (_, d) in &events {
        *seen
            .entry(d["request_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 2_000);
    assert!(seen.values().all(|n| *n == 1), "a result came twice");
    let ids: Vec<&String> = events.iter().map(|e| &e.0).collect();
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "event ids repeat");
    println!(
        "{before} events before the drop (agent had {at_drop} of 2,000 stored), {} after resuming",
        events.len() - before
    );
    ctl.stop.store(true, Ordering::SeqCst);
}

/// Connection history like a RIPE Atlas probe's: an agent that connects, is killed
/// and comes back has two connected intervals with a disconnected one between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_history_records_connections_and_uptime() {
    let up = Up::start(0, &[]).await;
    let data = up.dir.path().join("st-1");
    let mut agent = start_agent("st-1", &up.broker_url(), &data, up.dir.path());
    up.api.wait_alive(&["st-1"], T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill9();
    up.api.wait_not_alive("st-1", T).await;
    let gone = up.api.get("/agents/st-1/status?window_s=600").await.body;
    assert_eq!(gone["status"], "disconnected", "{gone}");
    let _agent = start_agent("st-1", &up.broker_url(), &data, up.dir.path());
    up.api.wait_alive(&["st-1"], T).await;
    let h = up.api.get("/agents/st-1/status?window_s=600").await.body;
    assert_eq!(h["status"], "connected", "{h}");
    let kinds: Vec<&str> = h["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    // Before the first connection (inside the window), the first session, the gap,
    // and the open session.
    assert_eq!(
        kinds,
        ["disconnected", "connected", "disconnected", "connected"],
        "{h}"
    );
    let last = h["intervals"].as_array().unwrap().last().unwrap().clone();
    assert!(last["until"].is_null(), "{h}");
    assert_eq!(h["status_since"], last["from"]);
    assert_eq!(h["last_connected"], last["from"]);
    assert!(h["first_connected"].as_str().unwrap() < h["last_connected"].as_str().unwrap());
    // Uptime counts from the first connection, not from the window's start (the
    // agent did not exist for most of the 600 s): the connected share of that time,
    // below 100 % because of the gap.
    let up_pct = h["uptime_pct"].as_f64().unwrap();
    let observed = h["observed_s"].as_f64().unwrap();
    assert_eq!(h["observed_from"], h["first_connected"], "{h}");
    assert!(observed > 0.5 && observed < 60.0, "{h}");
    let ms = |v: &Value| imn_tests::ms_of(v) as f64;
    let gap = h["intervals"].as_array().unwrap()[2].clone();
    let gap_s = (ms(&gap["until"]) - ms(&gap["from"])) / 1000.0;
    let expected = (observed - gap_s) * 100.0 / observed;
    assert!(
        up_pct > 0.0 && up_pct < 100.0 && (up_pct - expected).abs() < 2.0,
        "{up_pct} %, expected {expected} % ({gap_s} s down of {observed} s): {h}"
    );
    // A window shorter than the agent's life is counted whole.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let short = up.api.get("/agents/st-1/status?window_s=1").await.body;
    assert_eq!(short["observed_s"], json!(1.0), "{short}");
    assert_eq!(short["uptime_pct"], json!(100.0), "{short}");
    let bad = up.api.get("/agents/st-1/status?window_s=0").await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("window_s"))
    );
    let unknown = up.api.get("/agents/nobody/status").await;
    assert_eq!(unknown.status, 404);
}

/// The gRPC API does what REST does: list agents, create a measurement, stream its
/// results as they are stored, and report it complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_creates_a_measurement_and_streams_results() {
    use imn_backend::grpc::pb;
    let grpc = format!("127.0.0.1:{}", free_port());
    let up = Up::start(2, &["--grpc", &grpc]).await;
    up.api.wait_alive(&["agent-1", "agent-2"], T).await;
    let mut client = pb::imn_client::ImnClient::connect(format!("http://{grpc}"))
        .await
        .expect("gRPC connect");
    let all = || {
        Some(pb::Selection {
            all: true,
            ..Default::default()
        })
    };
    let agents = client
        .list_agents(pb::ListAgentsRequest {
            selection: all(),
            alive: Some(true),
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    let names: BTreeSet<String> = agents.iter().map(|a| a.id.clone()).collect();
    assert_eq!(names, set(&["agent-1", "agent-2"]));
    assert!(agents
        .iter()
        .all(|a| a.alive && a.arch == std::env::consts::ARCH));

    // The stream starts now: only what is stored from here on.
    let mut stream = client
        .stream_results(pb::StreamResultsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let c = client
        .create_measurement(pb::CreateMeasurementRequest {
            module: "echo_module".into(),
            params_json: r#"{"message": "over grpc"}"#.into(),
            agents: all(),
            description: "grpc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.agents.len(), 2, "{c:?}");
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = tokio::time::timeout(T, stream.message())
            .await
            .expect("a result within 30 s")
            .expect("stream ok")
            .expect("stream open");
        got.push(r);
    }
    for r in &got {
        assert_eq!(r.measurement_id, c.id);
        assert_eq!(r.state, "succeeded");
        let v: Value = serde_json::from_str(&r.result_json).unwrap();
        assert_eq!(v["message"], "over grpc");
    }
    assert!(got[0].cursor != got[1].cursor);
    let m = client
        .get_measurement(pb::GetMeasurementRequest { id: c.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (m.state.as_str(), m.reported, m.agents),
        ("complete", 2, 2),
        "{m:?}"
    );
    assert_eq!(m.summary, "2/2 agents reported");

    // Errors keep their meaning: a bad parameter names its field; an unknown id is
    // NOT_FOUND.
    let e = client
        .create_measurement(pb::CreateMeasurementRequest {
            module: "echo_module".into(),
            params_json: r#"{"message": 5}"#.into(),
            agents: all(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("/message"), "{}", e.message());
    let e = client
        .get_measurement(pb::GetMeasurementRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // A recurring measurement over gRPC: its runs stream in, one per slot.
    let c = client
        .create_measurement(pb::CreateMeasurementRequest {
            module: "echo_module".into(),
            params_json: r#"{"message": "every second"}"#.into(),
            agents: Some(pb::Selection {
                ids: vec!["agent-1".into()],
                ..Default::default()
            }),
            schedule: Some(pb::Schedule {
                interval_s: 1.0,
                jitter_s: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .stream_results(pb::StreamResultsRequest {
            measurement: c.id.clone(),
            cursor: "c0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut slots = Vec::new();
    while slots.len() < 3 {
        let r = tokio::time::timeout(T, stream.message())
            .await
            .expect("a scheduled run within 30 s")
            .expect("stream ok")
            .expect("stream open");
        assert_eq!(
            (r.agent_id.as_str(), r.state.as_str()),
            ("agent-1", "succeeded")
        );
        slots.push(r.scheduled_ms);
    }
    assert!(
        slots.windows(2).all(|w| w[1] - w[0] == 1000),
        "slots one second apart: {slots:?}"
    );
    let m = client
        .get_measurement(pb::GetMeasurementRequest { id: c.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, "running", "{m:?}");
    assert!(
        m.summary.starts_with("1/1 agents have the schedule"),
        "{m:?}"
    );
    let e = client
        .create_measurement(pb::CreateMeasurementRequest {
            module: "echo_module".into(),
            agents: all(),
            schedule: Some(pb::Schedule {
                interval_s: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("/schedule/interval_s"),
        "{}",
        e.message()
    );
}

/// Issue 9, test 1: a schedule every 2 s on three agents, one of them cut off for
/// 30 s by taking its namespace's link down. The partitioned agent keeps running the
/// schedule from its own stored copy; after it reconnects, every slot arrives once,
/// with the time it really ran. Then `DELETE` stops the schedule on every agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_keeps_running_on_a_partitioned_agent_and_every_run_arrives_once() {
    const INTERVAL_MS: i64 = 2000;
    const JITTER_MS: i64 = 300;
    let part = netns::Netns::create("sc", 18);
    let dir = TempDir::new("schedule");
    let http_port = free_port();
    let mqtt = format!("{}:{}", part.host_ip, free_port());
    let data = dir.path().join("data");
    let lab_policy = dir.path().join("policy.toml");
    std::fs::write(&lab_policy, "builtin_deny = false\n").unwrap();
    let _up = Proc::spawn(
        "imn-up",
        &bin("imn"),
        &[
            "up",
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--mqtt",
            &mqtt,
            "--data",
            data.to_str().unwrap(),
            "--agents",
            "0",
            "--heartbeat-ms",
            "500",
            // The broker listens on the test's own veth, plain and without auth.
            "--insecure-i-know",
            // Listening beyond loopback turns the built-in rule on, which denies the
            // loopback this test measures: the lab's policy turns it off.
            "--policy",
            lab_policy.to_str().unwrap(),
        ],
        dir.path(),
    );
    let api = Api::new(http_port);
    let broker = format!("mqtt://{mqtt}");
    let _a = start_agent("sched-a", &broker, &dir.path().join("sched-a"), dir.path());
    let _b = start_agent("sched-b", &broker, &dir.path().join("sched-b"), dir.path());
    let agent_bin = bin("imn-agent");
    let p_dir = dir.path().join("sched-p");
    let p = Proc::spawn(
        "sched-p",
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &part.ns,
            agent_bin.to_str().unwrap(),
            "--id",
            "sched-p",
            "--broker",
            &broker,
            "--data",
            p_dir.to_str().unwrap(),
            "--heartbeat-ms",
            "500",
            "--resend-timeout-ms",
            "2000",
            // Notices the dead link within ~10 s, so it really is offline (and
            // reconnects) rather than waiting out the partition on one TCP connection.
            "--keepalive-s",
            "5",
        ],
        dir.path(),
    );
    let agents = ["sched-a", "sched-b", "sched-p"];
    api.wait_alive(&agents, T).await;

    // Bad schedules are refused with the field named.
    for (schedule, field) in [
        (json!({"interval_s": 0.1}), "/schedule/interval_s"),
        (
            json!({"interval_s": 2, "jitter_s": 2}),
            "/schedule/jitter_s",
        ),
        (
            json!({"interval_s": 2, "stop": "yesterday"}),
            "/schedule/stop",
        ),
        (json!({"interval_s": 2, "stop": 1000}), "/schedule/stop"),
        // The documented schema names the key at fault (the handler named the schedule).
        (json!({"every": 2}), "/schedule/every"),
    ] {
        let r = api
            .post(
                "/v1/measurements",
                &json!({"module": "echo_module", "params": {"message": "x"}, "agents": {"all": true}, "schedule": schedule}).to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, 422, "{schedule}: {}", r.body);
        assert_eq!(r.body["field"], json!(field), "{schedule}: {}", r.body);
    }
    let r = api
        .post(
            "/v1/measurements",
            &json!({"module": "echo_module", "params": {"message": "x"}, "agents": {"all": true},
                "schedule": {"interval_s": 2}, "deadline_s": 10})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.body["field"].clone()),
        (422, json!("/deadline_s")),
        "{}",
        r.body
    );

    let r = api
        .post(
            "/v1/measurements",
            &json!({
                "module": "ping_module",
                "params": {"host": "127.0.0.1", "count": 1},
                "agents": {"ids": agents},
                "schedule": {"interval_s": INTERVAL_MS as f64 / 1000.0, "jitter_s": JITTER_MS as f64 / 1000.0},
                "description": "every 2 s",
            })
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let status = wait_for("every agent to have the schedule", T, || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let s = api.get(&format!("/v1/measurements/{id}")).await.body;
            (s["progress"]["acknowledged"] == json!(3)).then_some(s)
        }
    })
    .await;
    assert_eq!(status["state"], json!("running"), "{status}");
    let start_ms = ms_of(&status["schedule"]["start"]);

    tokio::time::sleep(Duration::from_secs(5)).await;
    part.link(false);
    let down_at = imn_proto::now_ms();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let up_at = imn_proto::now_ms();
    // Nothing from the partitioned agent got through while its link was down.
    let cut_off: Vec<Value> = all_results(&api, &id)
        .await
        .into_iter()
        .filter(|r| r["agent_id"] == json!("sched-p") && ms_of(&r["started_at"]) > down_at + 1000)
        .collect();
    assert!(
        cut_off.is_empty(),
        "delivered through a downed link: {cut_off:?}"
    );
    part.link(true);
    api.wait_alive(&["sched-p"], T).await;
    // Runs after the reconnection arrive too.
    wait_for("runs of sched-p after the partition", T, || {
        let api = api.clone();
        let id = id.clone();
        async move {
            all_results(&api, &id)
                .await
                .iter()
                .any(|r| {
                    r["agent_id"] == json!("sched-p") && ms_of(&r["scheduled_at"]) > up_at + 3000
                })
                .then_some(())
        }
    })
    .await;

    let r = api.delete(&format!("/v1/measurements/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stopped_at = imn_proto::now_ms();
    // Runs started before the stop still come in; none after it.
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS as u64)).await;
    let status = api.get(&format!("/v1/measurements/{id}")).await.body;
    assert_eq!(status["state"], json!("stopped"), "{status}");

    let results = all_results(&api, &id).await;
    for agent in agents {
        let mine: Vec<&Value> = results
            .iter()
            .filter(|r| r["agent_id"] == json!(agent))
            .collect();
        let mut slots: Vec<i64> = mine.iter().map(|r| ms_of(&r["scheduled_at"])).collect();
        slots.sort_unstable();
        let n = slots.len();
        slots.dedup();
        assert_eq!(slots.len(), n, "{agent}: a slot arrived twice");
        // Every slot from the first to the last, none missing.
        assert_eq!(
            slots[0], start_ms,
            "{agent}: the first slot is the schedule's start"
        );
        for w in slots.windows(2) {
            assert_eq!(
                w[1] - w[0],
                INTERVAL_MS,
                "{agent}: slots missing between {} and {}",
                w[0],
                w[1]
            );
        }
        let last = *slots.last().unwrap();
        assert!(
            last >= stopped_at - 2 * INTERVAL_MS && last <= stopped_at + INTERVAL_MS,
            "{agent}: last slot {last}, stopped at {stopped_at}"
        );
        for r in &mine {
            assert_eq!(r["state"], json!("succeeded"), "{r}");
            assert_eq!(r["measurement_id"], json!(id), "{r}");
            let late = ms_of(&r["started_at"]) - ms_of(&r["scheduled_at"]);
            assert!(
                (0..=JITTER_MS + 1000).contains(&late),
                "{agent}: a run started {late} ms after its slot: {r}"
            );
        }
        eprintln!(
            "{agent}: {} runs, slots {}..={}",
            slots.len(),
            slots[0],
            last
        );
    }
    // The partitioned agent ran through the partition: those runs started while the
    // link was down (their true times) and were stored after it came back.
    let during: Vec<&Value> = results
        .iter()
        .filter(|r| {
            let t = ms_of(&r["started_at"]);
            r["agent_id"] == json!("sched-p") && t > down_at + 500 && t < up_at - 500
        })
        .collect();
    assert!(
        during.len() >= 13,
        "only {} runs during the 30 s partition",
        during.len()
    );
    for r in &during {
        assert!(
            ms_of(&r["stored_at"]) >= up_at,
            "stored during the partition: {r}"
        );
    }
    eprintln!(
        "sched-p: {} runs during the partition, all stored after it",
        during.len()
    );
    // The agent itself lost the connection and made a new one.
    let log = p.log_text();
    let connects = log.lines().filter(|l| l.contains(": connected")).count();
    assert!(connects >= 2, "sched-p never reconnected:\n{log}");
    assert!(
        log.contains("disconnected"),
        "sched-p never noticed the partition:\n{log}"
    );
}

/// Echoes `message` on agent restart-1 every second; returns the measurement's id.
async fn every_second(api: &Api, message: &str) -> String {
    let r = api
        .post(
            "/v1/measurements",
            &json!({
                "module": "echo_module",
                "params": {"message": message},
                "agents": {"ids": ["restart-1"]},
                "schedule": {"interval_s": 1, "jitter_s": 0},
            })
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// The agent keeps its schedules in its own store: restarted with no broker it can
/// reach, it runs them from there, and the runs arrive once it can connect again;
/// restarts neither repeat nor skip a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_survive_agent_restarts_without_a_connection() {
    let up = Up::start(0, &[]).await;
    let data = up.dir.path().join("restart-1");
    let agent_args = |broker: &str| {
        vec![
            "--id".to_string(),
            "restart-1".into(),
            "--broker".into(),
            broker.to_string(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--heartbeat-ms".into(),
            "500".into(),
        ]
    };
    let spawn = |name: &str, broker: &str| {
        let args = agent_args(broker);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(name, &bin("imn-agent"), &args, up.dir.path())
    };
    let mut agent = spawn("restart-1-first", &up.broker_url());
    up.api.wait_alive(&["restart-1"], T).await;
    let id = every_second(&up.api, "tick").await;
    wait_for("the agent to have the schedule", T, || {
        let api = up.api.clone();
        let id = id.clone();
        async move {
            let s = api.get(&format!("/v1/measurements/{id}")).await.body;
            (s["progress"]["acknowledged"] == json!(1)).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.signal_and_wait(libc::SIGTERM, T).is_some());
    // No broker on this port: the agent never connects while it runs.
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port());
    let offline_from = imn_proto::now_ms();
    let mut offline = spawn("restart-1-offline", &nowhere);
    // A second schedule made while the agent is away reaches it with its next hello.
    let second = every_second(&up.api, "made while away").await;
    let s = up.api.get(&format!("/v1/measurements/{second}")).await.body;
    assert_eq!(s["agents"][0]["schedule"], json!("pending"), "{s}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(offline.signal_and_wait(libc::SIGTERM, T).is_some());
    let offline_until = imn_proto::now_ms();
    let _back = spawn("restart-1-back", &up.broker_url());
    up.api.wait_alive(&["restart-1"], T).await;
    let results = wait_for("runs made after the agent is back", T, || {
        let api = up.api.clone();
        let id = id.clone();
        async move {
            let rs = all_results(&api, &id).await;
            rs.iter()
                .any(|r| ms_of(&r["scheduled_at"]) > offline_until + 2000)
                .then_some(rs)
        }
    })
    .await;
    let mut slots: Vec<i64> = results.iter().map(|r| ms_of(&r["scheduled_at"])).collect();
    slots.sort_unstable();
    let n = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), n, "a slot ran twice across restarts");
    assert!(
        slots.windows(2).all(|w| w[1] - w[0] == 1000),
        "a slot was skipped across restarts: {slots:?}"
    );
    let while_offline = results
        .iter()
        .filter(|r| {
            let t = ms_of(&r["started_at"]);
            t > offline_from + 500 && t < offline_until - 500
        })
        .count();
    assert!(
        while_offline >= 4,
        "only {while_offline} runs while the agent had no broker"
    );
    eprintln!("{n} runs, {while_offline} of them made with no connection");
    let s = wait_for("the second schedule to reach the agent", T, || {
        let api = up.api.clone();
        let second = second.clone();
        async move {
            let s = api.get(&format!("/v1/measurements/{second}")).await.body;
            (s["progress"]["runs"].as_u64() >= Some(2)).then_some(s)
        }
    })
    .await;
    assert_eq!(s["agents"][0]["schedule"], json!("received"), "{s}");
}
