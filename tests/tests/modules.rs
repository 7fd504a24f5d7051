//! End-to-end tests of the measurement modules, the supervisor and runtime module
//! control, through `imn up` and real peers on loopback or in a network namespace
//! the test creates.

use imn_tests::netns::Netns;
use std::time::Duration;

use imn_tests::{wait_for, Api, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

async fn run(api: &Api, agent: &str, module: &str, params: Value) -> Value {
    let r = api
        .post(
            &format!("/agent/{agent}/{module}?wait=25"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{module} {params}: {:?}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcping_open_closed_and_silent_ports() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let b = run(
        &up.api,
        "agent-1",
        "tcping",
        json!({"host": "127.0.0.1", "port": open_port, "count": 3, "interval_ms": 20}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(b["state"], "succeeded");
    assert_eq!((r["sent"].as_u64(), r["open"].as_u64()), (Some(3), Some(3)));
    assert_eq!(r["availability_pct"], 100.0);
    for a in r["attempts"].as_array().unwrap() {
        assert_eq!(a["outcome"], "open");
        assert!(a["connect_ms"].as_f64().unwrap() > 0.0);
        assert!(a["tcpi_rtt_us"].as_u64().is_some());
    }

    let b = run(
        &up.api,
        "agent-1",
        "tcping",
        json!({"host": "127.0.0.1", "port": closed_port, "count": 2, "interval_ms": 20}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(r["open"], 0);
    assert!(
        r["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["outcome"] == "refused"),
        "{r}"
    );

    let bh = Netns::create("bh", 18);
    bh.drop_all_input();
    let b = run(
        &up.api,
        "agent-1",
        "tcping",
        json!({"host": bh.peer_ip, "port": 80, "count": 2, "timeout_ms": 300, "interval_ms": 10}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(r["open"], 0);
    assert!(
        r["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["outcome"] == "timeout"),
        "{r}"
    );
    assert_eq!(r["availability_pct"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_is_failed_and_the_agent_keeps_serving() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let b = run(
        &up.api,
        "agent-1",
        "faulty_module",
        json!({"message": "kaboom", "crash": true}),
    )
    .await;
    assert_eq!(b["state"], "failed", "{b}");
    let err = b["error"].as_str().unwrap();
    assert!(err.contains("panicked") && err.contains("kaboom"), "{err}");
    let rid = b["request_id"].as_str().unwrap();
    assert_eq!(
        up.api.get(&format!("/modules/states/{rid}")).await.body["state"],
        "failed"
    );
    // The agent is still up and serving other modules.
    let e = run(
        &up.api,
        "agent-1",
        "echo_module",
        json!({"message": "still here"}),
    )
    .await;
    assert_eq!(e["result"]["message"], "still here");
    // The crashed module itself comes back after its backoff.
    let f = run(
        &up.api,
        "agent-1",
        "faulty_module",
        json!({"message": "ok now"}),
    )
    .await;
    assert_eq!(f["state"], "succeeded");
    let err = run(
        &up.api,
        "agent-1",
        "faulty_module",
        json!({"message": "m", "error": true}),
    )
    .await;
    assert_eq!(err["state"], "failed");
    assert!(err["error"].as_str().unwrap().contains("error requested"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_ends_in_timeout() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    // Configure a short deadline for the module at runtime, then hang it.
    let r = up
        .api
        .put_json(
            "/agents/agent-1/modules/faulty_module",
            &json!({"timeout_ms": 400}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_for("faulty_module config in hello", T, || {
        let api = up.api.clone();
        async move {
            let a = api.get("/agents/agent-1").await;
            a.body["modules"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == "faulty_module" && m["config"]["timeout_ms"] == 400)
                .then_some(())
        }
    })
    .await;
    let t0 = std::time::Instant::now();
    let b = run(
        &up.api,
        "agent-1",
        "faulty_module",
        json!({"message": "zzz", "hang": true}),
    )
    .await;
    assert_eq!(b["state"], "timeout", "{b}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let e = run(
        &up.api,
        "agent-1",
        "echo_module",
        json!({"message": "after hang"}),
    )
    .await;
    assert_eq!(e["state"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_and_load_change_hello_and_answers() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let has = |body: &Value, m: &str| {
        body["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == m)
    };
    assert!(has(&up.api.get("/agents/agent-1").await.body, "tcping"));
    let r = up.api.delete("/agents/agent-1/modules/tcping").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_for("tcping gone from hello", T, || {
        let api = up.api.clone();
        async move { (!has(&api.get("/agents/agent-1").await.body, "tcping")).then_some(()) }
    })
    .await;
    let r = up
        .api
        .post(
            "/agent/agent-1/tcping",
            r#"{"host":"127.0.0.1","port":1}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["error"], "module_not_loaded");
    let loaded: Vec<&str> = r.body["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        loaded.contains(&"echo_module") && !loaded.contains(&"tcping"),
        "{loaded:?}"
    );

    let r = up
        .api
        .put_json("/agents/agent-1/modules/tcping", &json!({}))
        .await;
    assert_eq!(r.status, 202);
    wait_for("tcping back in hello", T, || {
        let api = up.api.clone();
        async move { has(&api.get("/agents/agent-1").await.body, "tcping").then_some(()) }
    })
    .await;
    let b = run(
        &up.api,
        "agent-1",
        "tcping",
        json!({"host": "127.0.0.1", "port": 1, "count": 1}),
    )
    .await;
    assert_eq!(b["state"], "succeeded");

    let r = up
        .api
        .put_json("/agents/agent-1/modules/warp_drive", &json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("unknown_module"))
    );
    let r = up
        .api
        .put_json(
            "/agents/agent-1/modules/ping_module",
            &json!({"defaults": [1]}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (422, Some("/defaults"))
    );
    // max_rate caps a `rate` parameter: refused for a module that has none.
    let r = up
        .api
        .put_json("/agents/agent-1/modules/tcping", &json!({"max_rate": 5}))
        .await;
    assert_eq!(
        (r.status, r.body["field"].as_str(), r.body["rule"].as_str()),
        (422, Some("/max_rate"), Some("rate")),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_module_on_demand_and_in_heartbeats() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let b = run(&up.api, "agent-1", "heartbeat", json!({})).await;
    let s = &b["result"];
    assert!(s["mem_total_kib"].as_u64().unwrap() > 0);
    assert!(s["disk_total_kib"].as_u64().unwrap() > 0);
    assert!(!s["cpu_per_core_pct"].as_array().unwrap().is_empty());
    assert!(s["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "lo"));
    let a = up.api.get("/agents/agent-1").await;
    assert!(
        a.body["heartbeat"]["system"]["load"].as_array().is_some(),
        "{:?}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atlas_format_parses_and_matches_native() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let b = run(
        &up.api,
        "agent-1",
        "ping_module",
        json!({"host": "127.0.0.1", "count": 3, "interval_ms": 20}),
    )
    .await;
    assert_eq!(b["state"], "succeeded", "{b}");
    let rid = b["request_id"].as_str().unwrap();
    let native = up
        .api
        .get(&format!("/agents/agent-1/results/{rid}"))
        .await
        .body;
    let atlas = up
        .api
        .get(&format!("/agents/agent-1/results/{rid}?format=atlas"))
        .await;
    assert_eq!(atlas.status, 200, "{:?}", atlas.body);
    let a = &atlas.body[0];
    let t = &native["result"]["targets"][0];
    assert_eq!(a["dst_addr"], t["addr"]);
    assert_eq!(a["sent"], t["sent"]);
    assert_eq!(a["rcvd"], t["received"]);
    assert_eq!(
        a["result"].as_array().unwrap().len(),
        t["rtts_ms"].as_array().unwrap().len()
    );
    // The list route gives the same objects.
    let list = up
        .api
        .get("/agents/agent-1/results?format=atlas")
        .await
        .body;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["msm_id"] == a["msm_id"]));
    let e = run(&up.api, "agent-1", "echo_module", json!({"message": "x"})).await;
    let r = up
        .api
        .get(&format!(
            "/agents/agent-1/results/{}?format=atlas",
            e["request_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, 400, "Atlas defines no echo format: {:?}", r.body);

    // Existing Atlas tooling must read it: RIPE's own parser, ripe.atlas.sagan.
    let script = r#"
import json, sys
from ripe.atlas.sagan import PingResult
for raw in json.load(sys.stdin)[:1]:
    r = PingResult(raw, on_error=PingResult.ACTION_FAIL)
    print(json.dumps({"af": r.af, "dst": r.destination_address, "sent": r.packets_sent,
        "rcvd": r.packets_received, "min": r.rtt_min, "median": r.rtt_median,
        "rtts": [p.rtt for p in r.packets], "msm": r.measurement_id, "prb": r.probe_id}))
"#;
    let parsed = imn_tests::peers::sagan(script, &atlas.body);
    assert_eq!(parsed["af"], 4);
    assert_eq!(parsed["dst"], "127.0.0.1");
    assert_eq!(parsed["sent"], t["sent"]);
    assert_eq!(parsed["rcvd"], t["received"]);
    assert_eq!(parsed["msm"], a["msm_id"]);
    assert_eq!(parsed["prb"], a["prb_id"]);
    let native_min = t["min_ms"].as_f64().unwrap();
    assert!((parsed["min"].as_f64().unwrap() - native_min).abs() < 0.001);
    assert_eq!(parsed["rtts"].as_array().unwrap().len(), 3);
}
