//! Scale-out (issue 11): several backends sharing PostgreSQL and a JetStream durable
//! consumer, several bridges, a 3-node NATS cluster with the stream at 3 replicas, and
//! external broker mode with Mosquitto. Every part is a real process: the project's
//! binaries, `nats-server`, `postgres` (a cluster made with `initdb` for the test)
//! and `mosquitto`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use imn_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// A schedule every second on every agent; returns its id once each agent has it.
async fn every_second(api: &Api, agents: usize) -> String {
    let r = api
        .post(
            "/v1/measurements",
            &json!({
                "module": "echo_module", "params": {"message": "scale"},
                "agents": {"all": true},
                "schedule": {"interval_s": 1, "jitter_s": 0},
            })
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let want = format!("{agents}/{agents} agents have the schedule");
    let deadline = Instant::now() + T;
    loop {
        let s = api.get(&format!("/v1/measurements/{id}")).await.body;
        if s["progress"]["summary"]
            .as_str()
            .is_some_and(|t| t.starts_with(&want))
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "not every agent has the schedule after {T:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every agent's slots arrive exactly once, one second apart, from the first to the
/// stop; returns the number of runs.
fn check_slots(results: &[Value], agents: &[&str], stopped_at: i64) -> usize {
    let mut per: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in results {
        per.entry(r["agent_id"].as_str().unwrap().to_string())
            .or_default()
            .push(ms_of(&r["scheduled_at"]));
        assert_eq!(r["state"], json!("succeeded"), "{r}");
    }
    let mut total = 0;
    for agent in agents {
        let mut slots = per.remove(*agent).unwrap_or_default();
        assert!(!slots.is_empty(), "{agent}: no runs at all");
        slots.sort_unstable();
        let n = slots.len();
        slots.dedup();
        assert_eq!(slots.len(), n, "{agent}: a slot was stored twice");
        for w in slots.windows(2) {
            assert_eq!(
                w[1] - w[0],
                1000,
                "{agent}: slots missing between {} and {}",
                w[0],
                w[1]
            );
        }
        let last = *slots.last().unwrap();
        assert!(
            last >= stopped_at - 2500,
            "{agent}: the last slot {last} is long before the stop at {stopped_at}"
        );
        eprintln!("{agent}: {n} runs, none missing, none twice");
        total += n;
    }
    total
}

fn metric(port: u16, series: &str) -> f64 {
    prom_value(&http_get_text(port, "/metrics").unwrap_or_default(), series)
}

/// Issue 11, test 1: two backends, two bridges, a 3-node NATS cluster (stream at 3
/// replicas) and PostgreSQL. Four agents run a schedule every second while one
/// backend, then one bridge, then one NATS node is killed (SIGKILL). Afterwards every
/// slot of every agent is stored exactly once, and the API answered all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_backend_a_bridge_and_a_nats_node_loses_and_duplicates_nothing() {
    let dir = TempDir::new("scale");
    let (_pg, store) = imn_backend::store::pg_cluster::fresh_database()
        .await
        .expect("PostgreSQL for the test");
    let mut nats = NatsCluster::start(dir.path(), 3).await;

    let mqtt = [free_port(), free_port()];
    let bridge_metrics = [free_port(), free_port()];
    let mut bridges: Vec<Option<Proc>> = (0..2)
        .map(|i| {
            Some(Proc::spawn(
                &format!("bridge-{}", i + 1),
                &bin("imn-bridge"),
                &[
                    "--mqtt",
                    &format!("127.0.0.1:{}", mqtt[i]),
                    "--nats",
                    &nats.urls_from(i),
                    "--nats-replicas",
                    "3",
                    "--metrics",
                    &format!("127.0.0.1:{}", bridge_metrics[i]),
                ],
                dir.path(),
            ))
        })
        .collect();
    let http = [free_port(), free_port()];
    let mut backends: Vec<Option<Proc>> = (0..2)
        .map(|i| {
            Some(Proc::spawn(
                &format!("backend-{}", i + 1),
                &bin("imn-backend"),
                &[
                    "--http",
                    &format!("127.0.0.1:{}", http[i]),
                    "--nats",
                    &nats.urls_from(i + 1),
                    "--nats-replicas",
                    "3",
                    "--store",
                    &store,
                    "--data",
                    dir.path()
                        .join(format!("backend-{}", i + 1))
                        .to_str()
                        .unwrap(),
                ],
                dir.path(),
            ))
        })
        .collect();
    let api = [Api::new(http[0]), Api::new(http[1])];
    for a in &api {
        wait_for("the backend to answer", T, || {
            let a = a.clone();
            async move { a.try_get("/livez").await.map(|_| ()) }
        })
        .await;
    }
    for port in mqtt {
        wait_for("the bridge to listen", T, || async move {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await;
    }
    let brokers = format!("mqtt://127.0.0.1:{},mqtt://127.0.0.1:{}", mqtt[0], mqtt[1]);
    let ids = ["s1", "s2", "s3", "s4"];
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| {
            spawn_agent(
                &bin("imn-agent"),
                id,
                &brokers,
                &dir.path().join(id),
                &[
                    "--heartbeat-ms",
                    "500",
                    "--resend-timeout-ms",
                    "2000",
                    "--keepalive-s",
                    "5",
                ],
                dir.path(),
            )
        })
        .collect();
    // Each hello reaches one backend; both know every agent is alive.
    api[0].wait_alive(&ids, T).await;
    api[1].wait_alive(&ids, T).await;
    // The agents spread over both bridges.
    let conns: Vec<f64> = bridge_metrics
        .iter()
        .map(|&p| metric(p, "imn_bridge_connections"))
        .collect();
    assert!(
        conns.iter().all(|&c| c >= 1.0) && conns.iter().sum::<f64>() == 4.0,
        "connections per bridge: {conns:?}"
    );
    assert_eq!(nats.stream_replicas("IMN_UPLINK"), Some(3));

    let id = every_second(&api[0], ids.len()).await;
    let start = Instant::now();

    // The API keeps answering throughout: a poller counts failures of the backend
    // that stays up.
    let stop_poll = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (api, stop, id) = (api[1].clone(), stop_poll.clone(), id.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match api.try_get(&format!("/v1/measurements/{id}")).await {
                    Some(r) if r.status == 200 => ok += 1,
                    other => failed.push(format!("{:?}", other.map(|r| r.status))),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (ok, failed)
        })
    };

    // A result stream on backend 2 sees results whichever backend stored them.
    let client = reqwest::Client::new();
    let mut sse = client
        .get(format!(
            "http://127.0.0.1:{}/v1/measurements/{id}/stream",
            http[1]
        ))
        .send()
        .await
        .unwrap();
    // Both backends take frames from the shared consumer.
    let stored = wait_for("both backends to store records", T, || async {
        let stored: Vec<f64> = http
            .iter()
            .map(|&p| metric(p, "imn_records_stored_total"))
            .collect();
        stored.iter().all(|&n| n > 0.0).then_some(stored)
    })
    .await;
    let so_far = all_results(&api[0], &id).await;
    let want: BTreeSet<String> = so_far
        .iter()
        .map(|r| format!("{}@{}", r["agent_id"], r["scheduled_at"]))
        .collect();
    let mut seen = BTreeSet::new();
    let mut buf = String::new();
    while !want.is_subset(&seen) {
        let chunk = tokio::time::timeout(T, sse.chunk())
            .await
            .expect("an event within 30 s")
            .expect("stream read")
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                if let Ok(r) = serde_json::from_str::<Value>(data.trim()) {
                    seen.insert(format!("{}@{}", r["agent_id"], r["scheduled_at"]));
                }
            }
        }
    }
    eprintln!(
        "the stream on backend 2 had all {} results so far; records stored per backend: {stored:?}",
        want.len()
    );
    drop(sse);

    // `?wait` on backend 2 wakes whichever backend stores the result, and commands
    // reach agents on either bridge.
    for agent in ids {
        let t0 = Instant::now();
        let r = api[1]
            .post(
                &format!("/agent/{agent}/echo_module?wait=20"),
                r#"{"message":"via backend 2"}"#,
                &[],
            )
            .await;
        assert_eq!(r.body["state"], "succeeded", "{agent}: {}", r.body);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{agent}: ?wait took {:?}",
            t0.elapsed()
        );
    }

    // 1. A backend dies. Its unacked messages go to the other one (after JetStream's
    //    ack wait); the store drops what was stored but not acked.
    backends[0].take().unwrap().kill9();
    eprintln!("killed backend-1 at {:?}", start.elapsed());
    tokio::time::sleep(Duration::from_secs(8)).await;

    // 2. A bridge dies. Its agents move to the other bridge of their list.
    bridges[0].take().unwrap().kill9();
    eprintln!("killed bridge-1 at {:?}", start.elapsed());
    wait_for("every agent on bridge 2", T, || async {
        (metric(bridge_metrics[1], "imn_bridge_connections") == 4.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 3. A NATS node dies; the stream keeps two of its three replicas.
    nats.kill(0);
    eprintln!("killed nats node 1 at {:?}", start.elapsed());
    tokio::time::sleep(Duration::from_secs(8)).await;

    let r = api[1].delete(&format!("/v1/measurements/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stopped_at = imn_proto::now_ms();
    stop_poll.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = poller.await.unwrap();
    assert!(
        failed.is_empty(),
        "backend 2 failed {} of {} requests: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );

    // Everything comes in: the runs the killed backend held unacked come back after
    // JetStream's 30 s ack wait.
    let results = wait_for("every slot up to the stop", Duration::from_secs(90), || {
        let (api, id) = (api[1].clone(), id.clone());
        async move {
            let results = all_results(&api, &id).await;
            let complete = ids.iter().all(|a| {
                let mut slots: Vec<i64> = results
                    .iter()
                    .filter(|r| r["agent_id"] == json!(a))
                    .map(|r| ms_of(&r["scheduled_at"]))
                    .collect();
                slots.sort_unstable();
                slots.dedup();
                slots.windows(2).all(|w| w[1] - w[0] == 1000)
                    && slots.last().is_some_and(|&l| l >= stopped_at - 2500)
            });
            complete.then_some(results)
        }
    })
    .await;
    drop(results);
    // Runs started before each agent heard of the stop still come in: wait until two
    // reads 3 s apart agree, then check.
    let mut results = all_results(&api[1], &id).await;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = all_results(&api[1], &id).await;
        if again.len() == results.len() {
            break;
        }
        results = again;
    }
    let total = check_slots(&results, &ids, stopped_at);
    eprintln!(
        "{total} runs stored exactly once across the three kills; the API answered {ok} of {ok} polls"
    );
    // The store's own count per agent agrees.
    let status = api[1].get(&format!("/v1/measurements/{id}")).await.body;
    let runs: u64 = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["runs"].as_u64().unwrap())
        .sum();
    assert_eq!(runs as usize, total, "{status}");
}

/// Issue 11, test 2: external broker mode. Mosquitto (Debian's) holds the agents'
/// connections, with the password file and ACL that `deploy/mosquitto/` generates;
/// two bridges join it as clients and split the uplink through a shared
/// subscription. Each result is stored exactly once, commands reach every agent, and
/// Mosquitto's rules stop an agent publishing as another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_on_mosquitto_store_each_result_once_and_commands_arrive() {
    let mosquitto_pub = program("mosquitto_pub").expect("mosquitto-clients is not installed");
    let dir = TempDir::new("external");
    let nats = Nats::start(dir.path()).await;
    let http = free_port();
    let data = dir.path().join("backend");
    let _backend = Proc::spawn(
        "backend",
        &bin("imn-backend"),
        &[
            "--http",
            &format!("127.0.0.1:{http}"),
            "--nats",
            &nats.url(),
            "--data",
            data.to_str().unwrap(),
            "--auth",
        ],
        dir.path(),
    );
    let token_file = data.join("admin-token");
    let admin_token = wait_for("the admin token", T, || {
        let f = token_file.clone();
        async move { std::fs::read_to_string(&f).ok().filter(|t| !t.is_empty()) }
    })
    .await;
    let api = Api::new(http).with_token(admin_token.trim());
    wait_for("the backend to answer", T, || {
        let a = api.clone();
        async move { a.try_get("/livez").await.map(|_| ()) }
    })
    .await;

    // Enroll the agents, then generate Mosquitto's files from their tokens: each
    // bridge has a user of its own (the broker takes the user name as the client id).
    let ids = ["e1", "e2", "e3"];
    let mut tokens = BTreeMap::new();
    for id in ids {
        tokens.insert(id, api.enroll(id).await);
    }
    let bridge_users = ["imn.bridge-1", "imn.bridge-2"];
    let mq = imn_tests::mosquitto::Mosquitto::start(
        &dir.path().join("mosquitto"),
        &imn_tests::mosquitto::Setup {
            agents: tokens
                .iter()
                .map(|(id, t)| (id.to_string(), t.clone()))
                .collect(),
            bridge_users: bridge_users.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        },
    )
    .await;
    let acl = std::fs::read_to_string(mq.dir.join("acl")).unwrap();
    assert!(acl.contains("pattern write imn/v1/%u/out"), "{acl}");
    let port = mq.port;
    let bridge_pass = mq.bridge_password_file.clone();

    let metrics = [free_port(), free_port()];
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let _bridges: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &format!("bridge-{}", i + 1),
                &bin("imn-bridge"),
                &[
                    "--external-broker",
                    &broker_url,
                    "--external-user",
                    bridge_users[i],
                    "--external-password-file",
                    bridge_pass.to_str().unwrap(),
                    "--bridge-id",
                    &format!("bridge-{}", i + 1),
                    "--auth",
                    "--nats",
                    &nats.url(),
                    "--metrics",
                    &format!("127.0.0.1:{}", metrics[i]),
                ],
                dir.path(),
            )
        })
        .collect();
    for m in metrics {
        wait_for("the bridge to run", T, || async move {
            http_get_text(m, "/metrics").map(|_| ())
        })
        .await;
    }
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| {
            spawn_agent(
                &bin("imn-agent"),
                id,
                &broker_url,
                &dir.path().join(id),
                &[
                    "--token",
                    &tokens[id],
                    "--heartbeat-ms",
                    "500",
                    "--resend-timeout-ms",
                    "2000",
                ],
                dir.path(),
            )
        })
        .collect();
    api.wait_alive(&ids, T).await;

    let id = every_second(&api, ids.len()).await;
    // Commands reach each agent through the broker: one-off requests come back.
    for agent in ids {
        let r = api
            .post(
                &format!("/agent/{agent}/echo_module?wait=20"),
                r#"{"message":"through mosquitto"}"#,
                &[],
            )
            .await;
        assert_eq!(r.body["state"], "succeeded", "{agent}: {}", r.body);
    }

    // Mosquitto's rules: a wrong password is refused; an agent cannot publish on
    // another agent's topic (the message never reaches a bridge), while on its own
    // topic an unsigned message reaches a bridge, which refuses it.
    let publish = |user: &str, pass: &str, topic: &str| {
        std::process::Command::new(&mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["-u", user, "-P", pass, "-t", topic, "-m", "forged"])
            .output()
            .expect("mosquitto_pub")
    };
    assert!(
        !publish("e1", "not-the-token", "imn/v1/e1/out")
            .status
            .success(),
        "a wrong password was accepted"
    );
    let refused = || {
        metrics
            .iter()
            .map(|&m| {
                let page = http_get_text(m, "/metrics").unwrap_or_default();
                prom_value(&page, r#"imn_bridge_refused_total{reason="signature"}"#)
                    + prom_value(&page, r#"imn_bridge_refused_total{reason="bad_topic"}"#)
            })
            .sum::<f64>()
    };
    let before = refused();
    // With e1's login the broker calls this client e1 too (use_username_as_clientid):
    // the real e1 is dropped for a moment and reconnects; it resends what was not acked.
    assert!(publish("e1", &tokens["e1"], "imn/v1/e2/out")
        .status
        .success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        refused(),
        before,
        "a message on another agent's topic reached a bridge"
    );
    assert!(publish("e1", &tokens["e1"], "imn/v1/e1/out")
        .status
        .success());
    wait_for("the bridge to refuse the unsigned message", T, || async {
        (refused() > before).then_some(())
    })
    .await;

    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = api.delete(&format!("/v1/measurements/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stopped_at = imn_proto::now_ms();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut results = all_results(&api, &id).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = all_results(&api, &id).await;
        if again.len() == results.len() {
            break;
        }
        results = again;
    }
    let total = check_slots(&results, &ids, stopped_at);
    // Both bridges carried results: the shared subscription split the uplink.
    let outs: Vec<f64> = metrics
        .iter()
        .map(|&m| {
            let page = http_get_text(m, "/metrics").unwrap_or_default();
            prom_value(
                &page,
                r#"imn_bridge_messages_total{direction="up",kind="out"}"#,
            )
        })
        .collect();
    assert!(
        outs.iter().all(|&n| n > 0.0),
        "each bridge forwards part of the uplink: {outs:?}"
    );
    eprintln!("{total} runs stored once through Mosquitto; outbox messages per bridge: {outs:?}");
}
