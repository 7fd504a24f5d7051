//! Hostile API clients with measure-only tokens against `imn up --auth`, and the policy
//! followed to the packet: issue 23's proofs 1 (every module, agent-side checks), 4
//! (budgets) and 5 (the smaller holes of the API). The hostile *agent* attacks are in
//! `hostile.rs`.
//!
//! Real parts only: `imn up`, the project's agent as a separate process with its own
//! name server, Debian's dnsmasq (one for the agent, one for the backend: a name that
//! answers differently to each), and listeners of the test's own on 127.0.0.1 that
//! record every connection and datagram.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imn_tests::peers::Dnsmasq;
use imn_tests::{bin, spawn_agent, wait_for, Api, Proc, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// A TCP listener and a UDP socket on 127.0.0.1, one port, counting every connection
/// and datagram they get: the address the policy denies must see none.
struct Recorder {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Recorder {
    fn start() -> Recorder {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in tcp.incoming() {
                h.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let h = hits.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while udp.recv_from(&mut buf).is_ok() {
                h.fetch_add(1, Ordering::SeqCst);
            }
        });
        Recorder { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An HTTP server on `addr` answering every request with a 302 to `location`.
fn redirector(addr: &str, location: String) -> u16 {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    port
}

/// `imn up --auth` with no local agents and these extra flags, and an enrolled agent
/// `edge-1` as a separate process with its own name servers and flags.
async fn up_with_agent(extra: &[&str], agent_flags: &[&str]) -> (Up, Proc) {
    let mut args = vec!["--auth"];
    args.extend_from_slice(extra);
    let up = Up::start(0, &args).await;
    let admin = up.admin();
    let token = admin.enroll("edge-1").await;
    let mut flags = vec![
        "--token",
        token.as_str(),
        "--heartbeat-ms",
        "500",
        "--resend-timeout-ms",
        "2000",
    ];
    flags.extend_from_slice(agent_flags);
    let agent = spawn_agent(
        &bin("imn-agent"),
        "edge-1",
        &up.broker_url(),
        &up.dir.path().join("edge-1"),
        &flags,
        up.dir.path(),
    );
    admin.wait_alive(&["edge-1"], T).await;
    (up, agent)
}

/// A token with the read and measure scopes (and an optional budget), at a rate no
/// test reaches.
async fn measure_token(admin: &Api, id: &str, budget: Option<Value>) -> Api {
    let mut body = json!({"id": id, "scopes": ["read", "measure"], "rate_per_min": 600000});
    if let Some(b) = budget {
        body["budget"] = b;
    }
    let r = admin.post("/admin/tokens", &body.to_string(), &[]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    admin.with_token(r.body["token"].as_str().unwrap())
}

/// A token with the read scope only; returns its secret.
async fn read_token(admin: &Api, id: &str) -> String {
    let r = admin
        .post(
            "/admin/tokens",
            &json!({"id": id, "scopes": ["read"]}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["token"].as_str().unwrap().to_string()
}

/// Waits for the request's result; returns (state, error).
async fn outcome(api: &Api, request: &str) -> (String, String) {
    let st = wait_for("the request to finish", T, || {
        let api = api.clone();
        let request = request.to_string();
        async move {
            let r = api.try_get(&format!("/modules/states/{request}")).await?;
            let s = r.body["state"].as_str()?.to_string();
            ["succeeded", "failed", "timeout", "expired", "cancelled"]
                .contains(&s.as_str())
                .then_some(s)
        }
    })
    .await;
    let r = api
        .get(&format!("/agents/edge-1/results/{request}"))
        .await
        .body;
    (st, r["error"].as_str().unwrap_or("").to_string())
}

/// Proof 1. A policy that allows 127.0.0.0/8 but denies 127.0.0.1/32, against a
/// measure-only token: http by URL, by `resolve`, and by a redirect from 127.0.0.2 to
/// 127.0.0.1; dns with `server` 127.0.0.1; and http to a name that resolves to
/// 127.0.0.2 for the backend and to 127.0.0.1 for the agent (each has its own
/// dnsmasq). The first, second and fourth are refused at submit (403 naming the rule,
/// nothing stored); the redirect and the name get past the backend, and the agent
/// refuses them with `policy_denied`. The recorder on 127.0.0.1 sees nothing, then
/// sees the test's own connection (so it would have seen a leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_follows_every_module_to_the_packet() {
    let for_agent = Dnsmasq::start(&["--host-record=rebind.imn.test,127.0.0.1"]);
    let for_backend = Dnsmasq::start(&["--host-record=rebind.imn.test,127.0.0.2"]);
    let rec = Recorder::start();
    let dir = imn_tests::TempDir::new("trust-policy");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.1/32\"]\n",
    )
    .unwrap();
    let backend_ns = format!("127.0.0.1:{}", for_backend.port);
    let agent_ns = format!("127.0.0.1:{}", for_agent.port);
    let (up, _agent) = up_with_agent(
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--nameserver",
            &backend_ns,
        ],
        &["--nameservers", &agent_ns],
    )
    .await;
    let user = measure_token(&up.admin(), "user", None).await;
    let denied = format!("http://127.0.0.1:{}/", rec.port);

    let submit = |module: &str, params: Value| {
        let user = user.clone();
        let path = format!("/agent/edge-1/{module}");
        async move { user.post(&path, &params.to_string(), &[]).await }
    };
    // Refused at submit, naming the rule and the field.
    for (module, params, field) in [
        ("http", json!({"url": denied}), "/url"),
        (
            "http",
            json!({"url": "http://allowed.imn.test/", "resolve": "127.0.0.1"}),
            "/resolve",
        ),
        (
            "dns",
            json!({"name": "a.imn.test", "server": format!("127.0.0.1:{}", rec.port)}),
            "/server",
        ),
        (
            "dns",
            json!({"name": "a.imn.test", "server": format!("127.0.0.1:{}", rec.port), "protocol": "tcp"}),
            "/server",
        ),
        (
            "tcping",
            json!({"host": "127.0.0.1", "port": rec.port}),
            "/host",
        ),
        (
            "ntp",
            json!({"host": "127.0.0.1", "port": rec.port}),
            "/host",
        ),
        (
            "tls_cert",
            json!({"host": "127.0.0.1", "port": rec.port}),
            "/host",
        ),
    ] {
        let r = submit(module, params.clone()).await;
        assert_eq!(r.status, 403, "{module} {params}: {}", r.body);
        assert_eq!(r.body["error"], "policy_denied", "{}", r.body);
        assert_eq!(r.body["rule"], "lab.deny", "{}", r.body);
        assert!(
            r.body["message"].as_str().unwrap().contains(field),
            "the refusal names {field}: {}",
            r.body
        );
    }
    // Past the backend, refused by the agent: a redirect to the denied address...
    let hop = redirector("127.0.0.2", denied.clone());
    let r = submit(
        "http",
        json!({"url": format!("http://127.0.0.2:{hop}/"), "follow_redirects": true}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let (state, error) = outcome(&user, r.body["request_id"].as_str().unwrap()).await;
    assert_eq!(state, "failed");
    assert!(
        error.starts_with("policy_denied: lab.deny") && error.contains("redirect"),
        "{error}"
    );
    // ...and a name that answers 127.0.0.2 to the backend and 127.0.0.1 to the agent.
    let r = submit(
        "http",
        json!({"url": format!("http://rebind.imn.test:{}/", rec.port)}),
    )
    .await;
    assert_eq!(
        r.status, 202,
        "the backend sees 127.0.0.2, allowed: {}",
        r.body
    );
    let (state, error) = outcome(&user, r.body["request_id"].as_str().unwrap()).await;
    assert_eq!(state, "failed");
    assert!(error.starts_with("policy_denied: lab.deny"), "{error}");
    assert!(error.contains("rebind.imn.test"), "{error}");
    // The same through a recurring measurement, which the agent checks at every run.
    let r = user
        .post(
            "/v1/measurements",
            &json!({"module": "tcping", "params": {"host": "rebind.imn.test", "port": rec.port, "count": 1},
                    "agents": {"ids": ["edge-1"]}, "schedule": {"interval_s": 60}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = r.body["id"].as_str().unwrap().to_string();
    let run = wait_for("the scheduled run", T, || {
        let user = user.clone();
        let m = m.clone();
        async move {
            let page = user.get(&format!("/v1/results?measurement={m}")).await.body;
            page["results"].as_array()?.first().cloned()
        }
    })
    .await;
    assert!(
        run["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("policy_denied"),
        "{run}"
    );
    assert_eq!(
        user.delete(&format!("/v1/measurements/{m}")).await.status,
        200
    );
    assert_eq!(rec.hits(), 0, "a packet reached the denied address");
    // The recorder would have counted one.
    drop(std::net::TcpStream::connect(("127.0.0.1", rec.port)).unwrap());
    wait_for("the recorder to count the test's connection", T, || {
        let n = rec.hits();
        async move { (n == 1).then_some(()) }
    })
    .await;
}

/// The safe default: with `--auth` and no policy, the built-in rule refuses loopback,
/// private and link-local targets (the cloud metadata address among them), for every
/// module, and leaves the rest alone; a policy file can turn it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_the_builtin_rule_keeps_the_fleet_off_internal_networks() {
    let up = Up::start(1, &["--auth"]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1"], T).await;
    let user = measure_token(&admin, "user", None).await;
    for (module, params) in [
        ("ping_module", json!({"host": "127.0.0.1", "count": 1})),
        (
            "http",
            json!({"url": "http://169.254.169.254/latest/meta-data/"}),
        ),
        ("http", json!({"url": "http://[::1]:8000/"})),
        ("dns", json!({"name": "x.imn.test", "server": "10.0.0.1"})),
        ("tcping", json!({"host": "192.168.1.1", "port": 80})),
        ("ntp", json!({"host": "100.64.0.1"})),
        ("traceroute", json!({"host": "fd00::1"})),
    ] {
        let r = user
            .post(
                &format!("/agent/agent-1/{module}"),
                &params.to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, 403, "{module} {params}: {}", r.body);
        assert_eq!(r.body["rule"], "builtin.deny", "{}", r.body);
    }
    drop(up);
    let dir = imn_tests::TempDir::new("trust-builtin");
    let open = dir.path().join("policy.toml");
    std::fs::write(&open, "builtin_deny = false\n").unwrap();
    let open = open.to_str().unwrap().to_string();
    let up = Up::start(1, &["--auth", "--policy", &open]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1"], T).await;
    let r = admin
        .post(
            "/agent/agent-1/ping_module?wait=10",
            &json!({"host": "127.0.0.1", "count": 1}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{}", r.body);
}

/// Spend of one token, from `GET /admin/tokens`.
/// One request of the flood: true if it was taken (202), false if over budget (429).
async fn flood_once(api: &Api, body: &str) -> bool {
    let r = api.post("/agent/agent-1/ping_module", body, &[]).await;
    match r.status {
        202 => true,
        429 => {
            assert_eq!(r.body["budget"], "probes_per_day", "{}", r.body);
            false
        }
        s => panic!("{s}: {}", r.body),
    }
}

async fn spend(admin: &Api, token: &str) -> Value {
    let all = admin.get("/admin/tokens").await.body;
    all.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == token)
        .map(|t| t["spend_today"].clone())
        .unwrap_or_else(|| panic!("no token {token}: {all}"))
}

/// Proof 4. Budgets, not only per-request limits: a flood of requests that are each
/// within every limit is stopped at the token's daily probes with 429 naming the
/// budget; a fleet measurement is charged count × agents and refused whole when over;
/// a recurring measurement reserves its daily probes, so one-off requests past the
/// rest of the day's budget get 429; at most `max_schedules`, none more often than
/// `min_interval_s`. (That an agent never runs more than its `max_runs` at once is in
/// `agent_guard.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_bound_what_a_token_spends_across_the_fleet() {
    let dir = imn_tests::TempDir::new("trust-budget");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let up = Up::start(2, &["--auth", "--policy", policy.to_str().unwrap()]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1", "agent-2"], T).await;

    // The flood: count 100 at rate 10,000, within every per-request limit; a budget of
    // 2,000 probes a day lets exactly 20 through.
    let flood = measure_token(&admin, "flood", Some(json!({"probes_per_day": 2000}))).await;
    let ping = json!({"host": "127.0.0.2", "count": 100, "rate": 10000}).to_string();
    let (mut accepted, mut refused) = (0, None);
    for _ in 0..1000 {
        let r = flood.post("/agent/agent-1/ping_module", &ping, &[]).await;
        match r.status {
            202 => accepted += 1,
            429 => {
                refused = Some(r);
                break;
            }
            s => panic!("{s}: {}", r.body),
        }
    }
    assert_eq!(accepted, 20, "2,000 probes / 100 a request");
    let r = refused.expect("the flood was refused");
    assert_eq!(r.body["error"], "over_budget", "{}", r.body);
    assert_eq!(r.body["budget"], "probes_per_day", "{}", r.body);
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(spend(&admin, "flood").await["one_off_probes"], 2000);

    // The same in parallel: 60 requests at once. Checks are one at a time per token
    // and each holds its probes until its request is stored and charged, so none
    // passes a check it would fail alone: at most 20 pass. (A check in the instant
    // between a charge's commit and the end of its reservation counts both, and may
    // refuse one that fits: the requests after the burst, one at a time, take exactly
    // what is left.)
    let wide = measure_token(&admin, "wide", Some(json!({"probes_per_day": 2000}))).await;
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let (wide, ping) = (wide.clone(), ping.clone());
            tokio::spawn(async move {
                wide.post("/agent/agent-1/ping_module", &ping, &[])
                    .await
                    .status
            })
        })
        .collect();
    let mut burst = 0;
    for t in tasks {
        match t.await.unwrap() {
            202 => burst += 1,
            429 => {}
            s => panic!("a parallel request got {s}"),
        }
    }
    assert!(
        burst <= 20,
        "{burst} of 60 parallel requests passed a budget for 20"
    );
    assert_eq!(
        spend(&admin, "wide").await["one_off_probes"],
        100 * burst,
        "charged what passed"
    );
    let mut after = 0;
    while flood_once(&wide, &ping).await {
        after += 1;
        assert!(burst + after <= 20, "past the budget");
    }
    assert_eq!(burst + after, 20, "{burst} in the burst, {after} after it");
    assert_eq!(spend(&admin, "wide").await["one_off_probes"], 2000);

    // A fleet measurement is count × targets × agents: 100 × 2 = 200 > 150.
    let fleet = measure_token(&admin, "fleet", Some(json!({"probes_per_day": 150}))).await;
    let body = json!({"module": "ping_module", "params": {"host": "127.0.0.2", "count": 100},
                      "agents": {"all": true}})
    .to_string();
    let r = fleet.post("/v1/measurements", &body, &[]).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["budget"], "probes_per_day");
    assert_eq!(spend(&admin, "fleet").await["probes"], 0, "nothing charged");
    let one = json!({"module": "ping_module", "params": {"host": "127.0.0.2", "count": 70},
                     "agents": {"all": true}})
    .to_string();
    assert_eq!(fleet.post("/v1/measurements", &one, &[]).await.status, 202);
    assert_eq!(spend(&admin, "fleet").await["one_off_probes"], 140);

    // A recurring measurement reserves its daily probes: 1 probe × 2 agents × 1,440
    // runs a day = 2,880 of 3,000; one request of 100 more fits, a second does not.
    let sched = measure_token(
        &admin,
        "sched",
        Some(json!({"probes_per_day": 3000, "max_schedules": 1, "min_interval_s": {"*": 60}})),
    )
    .await;
    let every = |interval: f64| {
        json!({"module": "ping_module", "params": {"host": "127.0.0.2", "count": 1},
               "agents": {"all": true}, "schedule": {"interval_s": interval}})
        .to_string()
    };
    let r = sched.post("/v1/measurements", &every(30.0), &[]).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["limit"], "min_interval_s", "{}", r.body);
    let r = sched.post("/v1/measurements", &every(60.0), &[]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = r.body["id"].as_str().unwrap().to_string();
    let s = spend(&admin, "sched").await;
    assert_eq!(
        (s["schedule_daily_probes"].as_u64(), s["schedules"].as_u64()),
        (Some(2880), Some(1)),
        "{s}"
    );
    let r = sched.post("/v1/measurements", &every(60.0), &[]).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["budget"], "max_schedules");
    let hundred = json!({"host": "127.0.0.2", "count": 100}).to_string();
    assert_eq!(
        sched
            .post("/agent/agent-1/ping_module", &hundred, &[])
            .await
            .status,
        202
    );
    let r = sched
        .post("/agent/agent-1/ping_module", &hundred, &[])
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["budget"], "probes_per_day");

    // Another measure token cannot stop it; its own token and an admin can.
    let other = measure_token(&admin, "other", None).await;
    let r = other.delete(&format!("/v1/measurements/{m}")).await;
    assert_eq!(
        (r.status, r.body["rule"].as_str()),
        (403, Some("owner")),
        "{}",
        r.body
    );
    assert_eq!(
        sched.delete(&format!("/v1/measurements/{m}")).await.status,
        200
    );
    let s = spend(&admin, "sched").await;
    assert_eq!(s["schedules"], 0, "{s}");
    assert_eq!(s["schedule_daily_probes"], 0, "{s}");
    // Admin tokens have no budget unless given one.
    assert_eq!(
        admin
            .post("/agent/agent-1/ping_module", &hundred, &[])
            .await
            .status,
        202
    );
}

/// Proof 5, for the API: module settings need admin; idempotency keys belong to their
/// token and to one request; result streams are capped per token, and any number of
/// them cost one shared store read per commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_smaller_holes_are_closed() {
    let up = Up::start(1, &["--auth"]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1"], T).await;
    let a = measure_token(&admin, "tok-a", None).await;
    let b = measure_token(&admin, "tok-b", None).await;

    // Operator settings of a module (its max_rate, defaults) are not a measurement.
    let r = a
        .put_json(
            "/agents/agent-1/modules/ping_module",
            &json!({"max_rate": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["rule"].as_str()),
        (403, Some("scope:admin")),
        "{}",
        r.body
    );
    let r = a.delete("/agents/agent-1/modules/ping_module").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        admin
            .put_json("/agents/agent-1/modules/echo_module", &json!({}))
            .await
            .status,
        202
    );

    // Idempotency keys: another token's same key is its own request; the same token's
    // key with another body is refused; the same body replays the first.
    let key = [("idempotency-key", "k-1")];
    let first = a
        .post("/agent/agent-1/echo_module", r#"{"message":"one"}"#, &key)
        .await;
    assert_eq!(first.status, 202, "{}", first.body);
    let theirs = b
        .post("/agent/agent-1/echo_module", r#"{"message":"one"}"#, &key)
        .await;
    assert_eq!(theirs.status, 202);
    assert_ne!(theirs.body["request_id"], first.body["request_id"]);
    assert_eq!(theirs.body["idempotent_replay"], Value::Null);
    let other = a
        .post("/agent/agent-1/echo_module", r#"{"message":"two"}"#, &key)
        .await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(other.body["error"], "idempotency_key_reused");
    let again = a
        .post("/agent/agent-1/echo_module", r#"{"message":"one"}"#, &key)
        .await;
    assert_eq!(again.body["request_id"], first.body["request_id"]);
    assert_eq!(again.body["idempotent_replay"], true);

    // Streams: 8 per token; the 9th is refused until one closes.
    let url = |tok: &Api| format!("{}/v1/results/stream?agent=agent-1", tok.base);
    let client = reqwest::Client::new();
    let reader = read_token(&admin, "reader").await;
    let second = read_token(&admin, "reader-2").await;
    let mut open = Vec::new();
    for _ in 0..8 {
        let r = client
            .get(url(&a))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    let r = client
        .get(url(&a))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "max_streams_per_token", "{body}");
    for _ in 0..4 {
        let r = client
            .get(url(&a))
            .bearer_auth(&second)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "another token has its own share");
        open.push(r);
    }
    wait_for("12 streams open", T, || {
        let admin = admin.clone();
        async move {
            let h = admin.get("/health").await.body;
            (h["streams"]["open"] == 12).then_some(())
        }
    })
    .await;
    // Twelve streams, ten results: the store is read once per commit for all of them.
    let before = admin.get("/health").await.body["streams"].clone();
    for i in 0..10 {
        let r = admin
            .post(
                "/agent/agent-1/echo_module?wait=10",
                &json!({"message": format!("m{i}")}).to_string(),
                &[],
            )
            .await;
        assert_eq!(r.body["state"], "succeeded");
    }
    let mut got = 0;
    for resp in open.iter_mut() {
        let mut text = String::new();
        while text.matches("event: result").count() < 10 {
            let chunk = tokio::time::timeout(T, resp.chunk())
                .await
                .expect("the stream delivers")
                .unwrap()
                .expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        got += 1;
    }
    assert_eq!(got, 12, "every stream got all ten results");
    let after = admin.get("/health").await.body["streams"].clone();
    let shared = after["shared_reads"].as_u64().unwrap() - before["shared_reads"].as_u64().unwrap();
    let own =
        after["catch_up_reads"].as_u64().unwrap() - before["catch_up_reads"].as_u64().unwrap();
    // Each commit of a result may wake the reader a second time (a state change and
    // its result can commit apart), and it polls every 5 s.
    assert!(
        shared <= 40,
        "{shared} shared reads for 10 results and 12 streams"
    );
    assert_eq!(own, 0, "streams that keep up read nothing themselves");
    drop(open);
    wait_for("streams to close", T, || {
        let admin = admin.clone();
        async move {
            let h = admin.get("/health").await.body;
            (h["streams"]["open"] == 0).then_some(())
        }
    })
    .await;
}

/// `imn up --auth` on fixed ports and a data directory that outlive it, with a policy.
fn up_at(dir: &std::path::Path, http: u16, mqtt: u16, policy: &std::path::Path) -> Proc {
    Proc::spawn(
        "imn-up",
        &bin("imn"),
        &[
            "up",
            "--auth",
            "--http",
            &format!("127.0.0.1:{http}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
            "--data",
            dir.join("data").to_str().unwrap(),
            "--agents",
            "0",
            "--heartbeat-ms",
            "500",
            "--policy",
            policy.to_str().unwrap(),
        ],
        dir,
    )
}

/// A schedule runs on the agent for as long as it lives, from the rules its set
/// carries: when the operator's policy changes (a new file, a restarted backend), the
/// agent's hello shows rules that are no longer the agent's, the backend sends the set
/// again, and the next runs obey the new rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_follows_a_new_policy_file() {
    let dir = imn_tests::TempDir::new("trust-repolicy");
    let (http, mqtt) = (imn_tests::free_port(), imn_tests::free_port());
    let open = dir.path().join("open.toml");
    std::fs::write(
        &open,
        "[[rule]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let closed = dir.path().join("closed.toml");
    std::fs::write(
        &closed,
        "[[rule]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.2/32\"]\n",
    )
    .unwrap();
    let target = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in target.incoming() {
            h.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let mut up = up_at(dir.path(), http, mqtt, &open);
    let api = Api::new(http);
    wait_for("imn up", T, || {
        let api = api.clone();
        async move { api.try_get("/livez").await.map(|_| ()) }
    })
    .await;
    let token = wait_for("the admin token", T, || {
        let f = dir.path().join("data/admin-token");
        async move { std::fs::read_to_string(f).ok() }
    })
    .await;
    let admin = api.with_token(&token);
    let agent_token = admin.enroll("edge-1").await;
    let _agent = spawn_agent(
        &bin("imn-agent"),
        "edge-1",
        &format!("mqtt://127.0.0.1:{mqtt}"),
        &dir.path().join("edge-1"),
        &[
            "--token",
            &agent_token,
            "--heartbeat-ms",
            "500",
            "--resend-timeout-ms",
            "2000",
        ],
        dir.path(),
    );
    admin.wait_alive(&["edge-1"], T).await;
    let r = admin
        .post(
            "/v1/measurements",
            &json!({"module": "tcping", "params": {"host": "127.0.0.2", "port": port, "count": 1},
                    "agents": {"ids": ["edge-1"]}, "schedule": {"interval_s": 1, "jitter_s": 0}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    wait_for("runs that reach the target", T, || {
        let n = hits.load(Ordering::SeqCst);
        async move { (n >= 2).then_some(()) }
    })
    .await;
    // The operator closes 127.0.0.2 and restarts the backend with the new file.
    up.signal_and_wait(libc_sigterm(), Duration::from_secs(10));
    let mut up = up_at(dir.path(), http, mqtt, &closed);
    let admin = Api::new(http).with_token(&token);
    let m = r.body["id"].as_str().unwrap().to_string();
    let denied = wait_for(
        "a run refused under the new rules",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            let m = m.clone();
            async move {
                let page = admin
                    .try_get(&format!("/v1/results?measurement={m}&limit=1000"))
                    .await?
                    .body;
                page["results"]
                    .as_array()?
                    .iter()
                    .find(|r| {
                        r["error"]
                            .as_str()
                            .is_some_and(|e| e.starts_with("policy_denied: lab.deny"))
                    })
                    .cloned()
            }
        },
    )
    .await;
    assert!(
        denied["error"].as_str().unwrap().contains("127.0.0.2"),
        "{denied}"
    );
    let at_switch = hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        at_switch,
        "runs under the new rules reached the target"
    );
    up.signal_and_wait(libc_sigterm(), Duration::from_secs(10));
}

fn libc_sigterm() -> i32 {
    15
}
