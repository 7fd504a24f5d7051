//! End-to-end tests of the skeleton: a measurement from the REST API to an agent and
//! back, with real processes on free loopback ports.

use std::time::Duration;

use imn_tests::{bin, free_port, start_agent, Api, Nats, Proc, TempDir, Up};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

async fn echo_roundtrip(api: &Api, agent: &str, message: &str) -> String {
    let body = serde_json::json!({ "message": message }).to_string();
    let r = api
        .post(&format!("/agent/{agent}/echo_module?wait=20"), &body, &[])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "succeeded");
    assert_eq!(r.body["result"]["message"], message);
    r.body["request_id"].as_str().unwrap().to_string()
}

/// Result is readable through both result routes and the state route says succeeded.
async fn check_result_routes(api: &Api, agent: &str, rid: &str, message: &str) {
    let one = api.get(&format!("/agents/{agent}/results/{rid}")).await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    assert_eq!(one.body["result"]["message"], message);
    assert_eq!(one.body["state"], "succeeded");
    let all = api.get(&format!("/agents/{agent}/results")).await;
    assert_eq!(all.status, 200);
    let matching: Vec<&Value> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["request_id"] == rid)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "exactly one stored result: {:?}",
        all.body
    );
    let st = api.get(&format!("/modules/states/{rid}")).await;
    assert_eq!(st.body["state"], "succeeded");
    let states: Vec<&str> = st.body["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    for s in ["pending", "dispatched", "received", "running", "succeeded"] {
        assert!(states.contains(&s), "transition {s} missing: {states:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imn_up_echo_round_trip() {
    let up = Up::start(2, &[]).await;
    up.api.wait_alive(&["agent-1", "agent-2"], T).await;
    let rid = echo_roundtrip(&up.api, "agent-1", "hello IMN").await;
    check_result_routes(&up.api, "agent-1", &rid, "hello IMN").await;
    // Without ?wait the answer is 202 with the request and a Location.
    let r = up
        .api
        .post("/agent/agent-2/echo_module", r#"{"message":"later"}"#, &[])
        .await;
    assert_eq!(r.status, 202);
    assert!(r.headers.contains_key("location"));
    let rid2 = r.body["request_id"].as_str().unwrap().to_string();
    up.api.wait_state(&rid2, "succeeded", T).await;
    check_result_routes(&up.api, "agent-2", &rid2, "later").await;
    let modules = up.api.get("/modules").await;
    let names: Vec<&str> = modules
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"echo_module") && names.contains(&"ping_module"));
    assert_eq!(up.api.get("/health").await.body["agents_alive"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imn_up_ping_loopback() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let r = up
        .api
        .post(
            "/agent/agent-1/ping_module?wait=20",
            r#"{"host":"127.0.0.1","count":3,"interval_ms":20}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);
    let res = &r.body["result"]["targets"][0];
    assert_eq!(res["sent"], 3);
    assert_eq!(res["received"], 3);
    assert_eq!(res["addr"], "127.0.0.1");
    for rtt in res["rtts_ms"].as_array().unwrap() {
        assert!(rtt.as_f64().unwrap() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_over_nats() {
    let dir = TempDir::new("nats");
    let nats = Nats::start(dir.path()).await;
    let http_port = free_port();
    let mqtt_port = free_port();
    let http = format!("127.0.0.1:{http_port}");
    let mqtt = format!("127.0.0.1:{mqtt_port}");
    let data = dir.path().join("backend");
    let _backend = Proc::spawn(
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
        dir.path(),
    );
    let _bridge = Proc::spawn(
        "imn-bridge",
        &bin("imn-bridge"),
        &["--mqtt", &mqtt, "--nats", &nats.url(), "--metrics", "off"],
        dir.path(),
    );
    let _agent = start_agent(
        "edge-1",
        &format!("mqtt://{mqtt}"),
        &dir.path().join("edge-1"),
        dir.path(),
    );
    let api = Api::new(http_port);
    api.wait_alive(&["edge-1"], T).await;
    let rid = echo_roundtrip(&api, "edge-1", "over nats").await;
    check_result_routes(&api, "edge-1", &rid, "over nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_before_ack_result_stored_once() {
    let up = Up::start(0, &["--fault-injection"]).await;
    let agent_dir = up.dir.path().join("edge-k");
    let mut agent = start_agent("edge-k", &up.broker_url(), &agent_dir, up.dir.path());
    up.api.wait_alive(&["edge-k"], T).await;
    // Hold the backend's acks: the result is stored, but stays in the agent's outbox.
    assert_eq!(
        up.api
            .post("/debug/hold-acks?on=true", "", &[])
            .await
            .status,
        200
    );
    let rid = echo_roundtrip(&up.api, "edge-k", "kill me").await;
    imn_tests::wait_for(
        "the unacked result to show in the agent's outbox depth",
        T,
        || {
            let api = up.api.clone();
            async move {
                let a = api.get("/agents/edge-k").await;
                (a.body["outbox"]["depth"].as_u64()? >= 1).then_some(())
            }
        },
    )
    .await;
    let stored_before = up.api.get("/health").await.body["records_stored"]
        .as_u64()
        .unwrap();
    agent.kill9();
    assert_eq!(
        up.api
            .post("/debug/hold-acks?on=false", "", &[])
            .await
            .status,
        200
    );
    let _agent = start_agent("edge-k", &up.broker_url(), &agent_dir, up.dir.path());
    // After restart the agent resends everything unacked; the backend must see the
    // duplicates, ack them, and store nothing twice.
    imn_tests::wait_for(
        "resent records to be recognised as duplicates and acked",
        T,
        || {
            let api = up.api.clone();
            async move {
                let h = api.get("/health").await;
                let a = api.get("/agents/edge-k").await;
                (h.body["duplicates_dropped"].as_u64()? >= 1 && a.body["outbox"]["depth"] == 0)
                    .then_some(())
            }
        },
    )
    .await;
    let stored_after = up.api.get("/health").await.body["records_stored"]
        .as_u64()
        .unwrap();
    assert_eq!(stored_before, stored_after, "no record stored twice");
    check_result_routes(&up.api, "edge-k", &rid, "kill me").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_to_offline_agent_is_delivered_when_it_starts() {
    let up = Up::start(0, &[]).await;
    let agent_dir = up.dir.path().join("edge-o");
    let mut agent = start_agent("edge-o", &up.broker_url(), &agent_dir, up.dir.path());
    up.api.wait_alive(&["edge-o"], T).await;
    let st = agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "agent stops cleanly on SIGTERM: {st:?}"
    );
    up.api.wait_not_alive("edge-o", T).await;
    let r = up
        .api
        .post(
            "/agent/edge-o/echo_module",
            r#"{"message":"while you were out"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["state"], "pending");
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    // A second request may wait only a second: it expires while the agent is away.
    let r = up
        .api
        .post(
            "/agent/edge-o/echo_module?deadline=1",
            r#"{"message":"too late"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let late = r.body["request_id"].as_str().unwrap().to_string();
    up.api.wait_state(&late, "expired", T).await;
    assert_eq!(
        up.api.get(&format!("/modules/states/{rid}")).await.body["state"],
        "pending",
        "the first request (24 h deadline) still waits"
    );
    let _agent = start_agent("edge-o", &up.broker_url(), &agent_dir, up.dir.path());
    up.api.wait_state(&rid, "succeeded", T).await;
    check_result_routes(&up.api, "edge-o", &rid, "while you were out").await;
    // The expired one was never sent to the agent: no result, still expired.
    let st = up.api.get(&format!("/modules/states/{late}")).await.body;
    assert_eq!(st["state"], "expired", "{st}");
    let r = up.api.get(&format!("/agents/edge-o/results/{late}")).await;
    assert_eq!(
        r.status, 404,
        "an expired request has no result: {:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let api = &up.api;

    let r = api
        .post("/agent/agent-1/echo_module", "{\"message\": ", &[])
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"], "malformed_json");
    assert!(r.body["message"].as_str().unwrap().contains("JSON"));

    let r = api
        .post(
            "/agent/agent-1/ping_module",
            r#"{"host":"127.0.0.1","count":0}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["error"], "invalid_params");
    assert_eq!(r.body["field"], "/count");
    assert_eq!(r.body["rule"], "minimum");

    let r = api
        .post("/agent/agent-1/ping_module", r#"{"count":3}"#, &[])
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["field"], "/host");
    assert_eq!(r.body["rule"], "required");

    let r = api
        .post(
            "/agent/agent-1/ping_module",
            r#"{"host":"x","count":3,"colour":1}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["field"], "/colour");

    let r = api
        .post("/agent/agent-1/echo_module", r#"{"message": 5}"#, &[])
        .await;
    assert_eq!(
        (r.status, r.body["field"].as_str(), r.body["rule"].as_str()),
        (422, Some("/message"), Some("type"))
    );

    let long = serde_json::json!({"message": "é".repeat(2049)}).to_string();
    let r = api.post("/agent/agent-1/echo_module", &long, &[]).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["field"], "/message");
    assert!(r.body["message"].as_str().unwrap().contains("4096 bytes"));

    for (q, field) in [
        ("deadline=0", "deadline"),
        ("deadline=NaN", "deadline"),
        ("deadline=700000", "deadline"),
        ("wait=-1", "wait"),
    ] {
        let r = api
            .post(
                &format!("/agent/agent-1/echo_module?{q}"),
                r#"{"message":"x"}"#,
                &[],
            )
            .await;
        assert_eq!(r.status, 400, "{q}: {:?}", r.body);
        assert_eq!(
            (r.body["field"].as_str(), r.body["rule"].as_str()),
            (Some(field), Some("range")),
            "{q}"
        );
    }

    let r = api
        .post("/agent/nobody/echo_module", r#"{"message":"x"}"#, &[])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"], "unknown_agent");

    let r = api.post("/agent/agent-1/warp_drive", r#"{}"#, &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"], "unknown_module");
    let known: Vec<&str> = r.body["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(known.contains(&"echo_module") && known.contains(&"ping_module"));

    let r = api.get("/agents/nobody").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("unknown_agent"))
    );
    let r = api.get("/modules/states/no-such-request").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("not_found"))
    );

    // Idempotency-Key: the same key returns the first request, not a new one.
    let h = [("Idempotency-Key", "key-123")];
    let a = api
        .post(
            "/agent/agent-1/echo_module?wait=10",
            r#"{"message":"once"}"#,
            &h,
        )
        .await;
    let b = api
        .post(
            "/agent/agent-1/echo_module?wait=10",
            r#"{"message":"once"}"#,
            &h,
        )
        .await;
    assert_eq!(a.body["request_id"], b.body["request_id"]);
    assert_eq!(b.body["idempotent_replay"], true);
    let all = api.get("/agents/agent-1/results").await;
    let once = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"]["message"] == "once")
        .count();
    assert_eq!(once, 1, "an idempotent replay runs nothing");

    // Nothing bad got stored or crashed anything: a good request still works.
    echo_roundtrip(api, "agent-1", "still fine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_port_is_named_and_ctrl_c_stops_cleanly() {
    let dir = TempDir::new("ports");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let http = format!("127.0.0.1:{port}");
    let mqtt = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("d");
    let mut p = Proc::spawn(
        "imn-up-taken",
        &bin("imn"),
        &[
            "up",
            "--http",
            &http,
            "--mqtt",
            &mqtt,
            "--data",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    let st = p.wait_exit(T).expect("imn up exits when its port is taken");
    assert!(!st.success());
    let log = p.log_text();
    assert!(log.contains("--http") && log.contains(&http), "{log}");

    let mut p = Proc::spawn(
        "imn-up-taken-mqtt",
        &bin("imn"),
        &[
            "up",
            "--http",
            &format!("127.0.0.1:{}", free_port()),
            "--mqtt",
            &http,
            "--data",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    let st = p.wait_exit(T).expect("imn up exits when its port is taken");
    assert!(!st.success());
    assert!(p.log_text().contains("--mqtt"), "{}", p.log_text());

    let mut up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let st = up
        .proc
        .signal_and_wait(libc::SIGINT, Duration::from_secs(15));
    assert!(
        st.is_some_and(|s| s.success()),
        "Ctrl-C stops imn up cleanly: {st:?}"
    );
}
