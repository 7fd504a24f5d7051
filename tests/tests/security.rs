//! Security with real clients: the project's own agent and Debian's mosquitto_pub and
//! mosquitto_sub, against `imn up --auth`, over plain MQTT on loopback and over TLS with
//! certificates from `imn certs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use imn_proto::auth as wauth;
use imn_proto::wire::{self, Envelope};
use imn_tests::{bin, free_port, program, spawn_agent, wait_for, Api, Proc, TempDir, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn mosquitto(name: &str) -> PathBuf {
    program(name).unwrap_or_else(|| panic!("{name} (apt-get install mosquitto-clients)"))
}

/// How a test MQTT client logs in.
#[derive(Clone, Default)]
struct Login<'a> {
    id: &'a str,
    user: Option<&'a str>,
    password: Option<&'a str>,
    /// `--cafile`, and optionally `--cert`/`--key`: TLS to `localhost`.
    tls: Option<(&'a Path, Option<(&'a Path, &'a Path)>)>,
}

impl Login<'_> {
    fn args(&self, port: u16) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-h".into(),
            if self.tls.is_some() {
                "localhost"
            } else {
                "127.0.0.1"
            }
            .into(),
            "-p".into(),
            port.to_string(),
            "-i".into(),
            self.id.into(),
            "-q".into(),
            "1".into(),
        ];
        if let Some(u) = self.user {
            a.extend(["-u".into(), u.into()]);
        }
        if let Some(p) = self.password {
            a.extend(["-P".into(), p.into()]);
        }
        if let Some((ca, client)) = self.tls {
            a.extend(["--cafile".into(), ca.display().to_string()]);
            if let Some((cert, key)) = client {
                a.extend([
                    "--cert".into(),
                    cert.display().to_string(),
                    "--key".into(),
                    key.display().to_string(),
                ]);
            }
        }
        a
    }
}

/// One mosquitto_pub; `Err(its output)` when it could not publish (refused).
fn publish(
    port: u16,
    login: &Login,
    topic: &str,
    payload: &[u8],
    dir: &Path,
) -> Result<(), String> {
    let file = dir.join(format!("payload-{}", rand::random::<u32>()));
    std::fs::write(&file, payload).unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .arg(mosquitto("mosquitto_pub"))
        .args(login.args(port))
        .args(["-t", topic, "-f"])
        .arg(&file)
        .output()
        .expect("run mosquitto_pub");
    let _ = std::fs::remove_file(&file);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Enrolls an agent through the `imn agents add` command; returns its token.
fn enroll_cli(api: &Api, admin_token: &str, id: &str, extra: &[&str]) -> String {
    let out = Command::new(bin("imn"))
        .args([
            "agents",
            "add",
            id,
            "--url",
            &api.base,
            "--token",
            admin_token,
        ])
        .args(extra)
        .output()
        .expect("run imn agents add");
    assert!(
        out.status.success(),
        "imn agents add {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from imn agents add");
    v["token"]
        .as_str()
        .expect("token in the answer")
        .to_string()
}

/// Revokes `id` and waits until its agent process logs the broker's refusal; returns
/// how long that took.
async fn revoke_and_wait_refused(admin: &Api, id: &str, agent: &Proc) -> Duration {
    let revoked_at = std::time::Instant::now();
    let r = admin
        .post(&format!("/admin/agents/{id}/revoke"), "", &[])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_for(
        "the revoked agent to be disconnected and refused",
        Duration::from_secs(10),
        || {
            let log = agent.log_text();
            async move { log.contains("NotAuthorized").then_some(()) }
        },
    )
    .await;
    revoked_at.elapsed()
}

fn admin_token(up: &Up) -> String {
    std::fs::read_to_string(up.dir.path().join("data/admin-token"))
        .unwrap()
        .trim()
        .to_string()
}

async fn health(api: &Api) -> Value {
    api.get("/health").await.body
}

fn agent_flags<'a>(token: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--token",
        token,
        "--heartbeat-ms",
        "500",
        "--resend-timeout-ms",
        "2000",
    ];
    v.extend_from_slice(extra);
    v
}

/// Proof 1 and 5 (for agent tokens): a wrong token, an unknown id, a user name that is
/// not the client id, and a revoked agent are refused; the project's agent with its
/// token connects; revocation disconnects it within seconds; after a rotation the old
/// token is refused and the new one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_logins_need_an_enrolled_unrevoked_agent() {
    let up = Up::start(0, &["--auth"]).await;
    let admin = up.admin();
    let tok_admin = admin_token(&up);
    let dir = up.dir.path();
    let port = up.mqtt_port;
    let probe = enroll_cli(&admin, &tok_admin, "probe", &["--tags", "lab"]);
    let topic = "imn/v1/probe/hb";
    let hb = wire::encode(&Envelope::Heartbeat(Default::default()));
    let login = |id, user, password| Login {
        id,
        user: Some(user),
        password: Some(password),
        tls: None,
    };
    // The right credentials publish (a heartbeat of its own; unsigned, so the bridge
    // drops it, but the broker accepted the login).
    publish(port, &login("probe", "probe", &probe), topic, &hb, dir).expect("valid login");
    let refused = [
        ("wrong token", login("probe", "probe", "imna_wrong")),
        ("unknown id", login("ghost", "ghost", &probe)),
        (
            "user is not the client id",
            login("probe2", "probe", &probe),
        ),
        (
            "no credentials",
            Login {
                id: "probe",
                ..Login::default()
            },
        ),
    ];
    for (what, l) in &refused {
        let e = publish(port, l, topic, &hb, dir).expect_err(what);
        assert!(
            e.contains("not authorised") || e.contains("Connection Refused"),
            "{what}: {e}"
        );
    }
    let h = health(&admin).await;
    assert!(
        h["auth"]["logins_refused"].as_u64().unwrap() >= refused.len() as u64,
        "{h}"
    );

    // The project's own agent, enrolled with the CLI, connects with its token.
    let tok_b = enroll_cli(&admin, &tok_admin, "agent-b", &[]);
    let mut agent = spawn_agent(
        &bin("imn-agent"),
        "agent-b",
        &up.broker_url(),
        &dir.join("agent-b"),
        &agent_flags(&tok_b, &[]),
        dir,
    );
    admin.wait_alive(&["agent-b"], T).await;
    let r = admin
        .post(
            "/agent/agent-b/echo_module?wait=10",
            r#"{"message":"enrolled"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);

    // Revocation disconnects it within seconds, and it cannot log in again.
    let took = revoke_and_wait_refused(&admin, "agent-b", &agent).await;
    println!("revoked agent disconnected and refused in {took:?}");
    let h = health(&admin).await;
    assert_eq!(
        admin.get("/agents/agent-b").await.body["status"],
        "offline",
        "{h}"
    );
    publish(
        port,
        &login("agent-b", "agent-b", &tok_b),
        "imn/v1/agent-b/hb",
        &hb,
        dir,
    )
    .expect_err("a revoked agent's token");
    agent.kill9();

    // Rotation: the old token stops working, the new one works.
    let r = admin.post("/admin/agents/probe/rotate", "", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let new = r.body["token"].as_str().unwrap().to_string();
    assert_ne!(new, probe);
    publish(port, &login("probe", "probe", &probe), topic, &hb, dir)
        .expect_err("the token from before the rotation");
    publish(port, &login("probe", "probe", &new), topic, &hb, dir).expect("the rotated token");
    // Enrolled agents are listed without any secret.
    let list = admin.get("/admin/agents").await.body;
    assert!(!list.to_string().contains(&new[5..]), "{list}");
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

/// The attempts of proof 2: agent A, logged in with its own valid credentials,
/// publishes on agent B's `out`, `hello`, `status` and `cmd` topics (unsigned, and
/// signed with A's key) and subscribes to B's `cmd`.
async fn agent_a_speaks_for_b(broker_acl: bool) {
    let extra: &[&str] = if broker_acl {
        &["--auth"]
    } else {
        &["--auth", "--test-no-broker-acl"]
    };
    let up = Up::start(0, extra).await;
    let admin = up.admin();
    let dir = up.dir.path();
    let port = up.mqtt_port;
    let tok_a = admin.enroll("agent-a").await;
    let tok_b = admin.enroll("agent-b").await;
    let _b = spawn_agent(
        &bin("imn-agent"),
        "agent-b",
        &up.broker_url(),
        &dir.join("agent-b"),
        &agent_flags(&tok_b, &[]),
        dir,
    );
    admin.wait_alive(&["agent-b"], T).await;
    let before = admin.get("/agents/agent-b").await.body;

    let now = imn_proto::now_ms();
    let forged_hello = Envelope::Hello(wire::Hello {
        agent_id: "agent-b".into(),
        version: "6.6.6-forged".into(),
        arch: "forged".into(),
        modules: vec![],
        tags: vec!["forged".into()],
        location: None,
        schedule_version: 0,
        outbox_epoch: 666,
        outbox_depth: 0,
        dropped: 0,
        heartbeat_interval_ms: 500,
        sent_at_ms: now,
        features: Vec::new(),
        limits: Default::default(),
        schedule_policy: 0,
    });
    let forged_out = Envelope::Batch(wire::Batch {
        epoch: 666,
        records: vec![wire::Record {
            seq: 1,
            at_ms: now,
            body: wire::RecordBody::Event(wire::AgentEvent {
                kind: "forged".into(),
                message: "written by agent-a".into(),
            }),
        }],
    });
    let forged_status = Envelope::Status(wire::Status {
        online: false,
        at_ms: now,
    });
    let forged_cmd = Envelope::Command(wire::Command {
        id: "forged-cmd".into(),
        kind: wire::CommandKind::Run {
            module: "echo_module".into(),
            params_json: r#"{"message":"forged"}"#.into(),
            timeout_ms: 1000,
        },
        traceparent: None,
        deadline_ms: None,
        issued_ms: now,
        policy: None,
    });
    let key_a = wauth::message_key(&tok_a);
    let a = Login {
        id: "agent-a",
        user: Some("agent-a"),
        password: Some(&tok_a),
        tls: None,
    };
    let mut attempts = 0u64;
    for (kind, env) in [
        ("hello", &forged_hello),
        ("out", &forged_out),
        ("status", &forged_status),
        ("cmd", &forged_cmd),
    ] {
        let topic = format!("imn/v1/agent-b/{kind}");
        let plain = wire::encode(env);
        let signed_by_a = wauth::sign(&key_a, &topic, &plain);
        for payload in [&plain, &signed_by_a] {
            // The broker accepts the PUBLISH (MQTT 3.1.1 has no way to refuse one);
            // what matters is that it goes nowhere.
            publish(port, &a, &topic, payload, dir).expect("publish as agent-a");
            attempts += 1;
        }
    }

    // A then tries to listen on B's command topic. (Not during the publishes above: the
    // login rule makes A's client id "agent-a" for both, and the newer one would take
    // the older one's session over.)
    let sub = Command::new(mosquitto("mosquitto_sub"))
        .args(
            Login {
                id: "agent-a",
                user: Some("agent-a"),
                password: Some(&tok_a),
                tls: None,
            }
            .args(port),
        )
        .args(["-t", "imn/v1/agent-b/cmd", "-C", "1", "-W", "6", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");

    if broker_acl {
        // The refusal is counted before B's real command goes out, so an empty read
        // below means "refused", not "not yet subscribed".
        wait_for("the broker to refuse agent-a's subscription", T, || {
            let admin = admin.clone();
            async move {
                let h = health(&admin).await;
                (h["auth"]["subscribe_denied"].as_u64() == Some(1)).then_some(())
            }
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // B still works, and runs what the backend sends it.
    let r = admin
        .post(
            "/agent/agent-b/echo_module?wait=10",
            r#"{"message":"real"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);

    let sub = sub.wait_with_output().unwrap();
    let h = health(&admin).await;
    let auth = &h["auth"];
    if broker_acl {
        // Refused by the broker: every publish, and the subscription.
        assert!(
            sub.stdout.is_empty(),
            "agent-a read agent-b's commands: {}",
            String::from_utf8_lossy(&sub.stdout)
        );
        assert_eq!(auth["publish_denied"].as_u64(), Some(attempts), "{h}");
        assert_eq!(auth["subscribe_denied"].as_u64(), Some(1), "{h}");
    } else {
        // Without the broker's ACL the bridge alone stops the uplink ones (6 of 8),
        // and agent-b drops the two commands, which are not signed with its key.
        assert!(
            auth["unsigned_or_forged"].as_u64().unwrap() >= attempts - 2,
            "{h}"
        );
        assert_eq!(auth["publish_denied"].as_u64(), Some(0), "{h}");
    }

    // Nothing of it reached the backend or B.
    let after = admin.get("/agents/agent-b").await.body;
    assert_eq!(after["version"], before["version"], "{after}");
    assert_eq!(after["status"], "online", "{after}");
    assert_eq!(after["tags"], before["tags"], "{after}");
    let events = admin.get("/agents/agent-b/events").await.body;
    assert!(!events.to_string().contains("forged"), "{events}");
    let r = admin.get("/agents/agent-b/results/forged-cmd").await;
    assert_eq!(r.status, 404, "agent-b ran a forged command: {:?}", r.body);
    assert!(admin.get("/agents/agent-a").await.status == 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_speak_for_another() {
    agent_a_speaks_for_b(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_alone_drops_forgeries_when_the_broker_has_no_acl() {
    agent_a_speaks_for_b(false).await;
}

/// Proof 3 and 5 (for API tokens): 401 without a token or with a wrong or revoked one,
/// 403 without the scope, 429 with Retry-After over the rate; rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_have_scopes_rates_and_rotation() {
    let up = Up::start(1, &["--auth"]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1"], T).await;
    let anon = up.api.clone();
    let r = anon.get("/agents").await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.body["error"], "unauthorized");
    assert_eq!(
        anon.with_token("imnt_nope").get("/agents").await.status,
        401
    );
    assert_eq!(anon.get("/livez").await.status, 200, "liveness stays open");

    let mk = |scopes: Value, rate: Option<f64>| {
        let admin = admin.clone();
        let anon = anon.clone();
        async move {
            let r = admin
                .post(
                    "/admin/tokens",
                    &json!({"scopes": scopes, "rate_per_min": rate}).to_string(),
                    &[],
                )
                .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            (
                r.body["id"].as_str().unwrap().to_string(),
                anon.with_token(r.body["token"].as_str().unwrap()),
            )
        }
    };
    let (_, reader) = mk(json!(["read"]), None).await;
    assert_eq!(reader.get("/agents").await.status, 200);
    let r = reader
        .post("/agent/agent-1/echo_module", r#"{"message":"x"}"#, &[])
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.body["rule"], "scope:measure");
    let r = reader.get("/admin/tokens").await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.body["rule"], "scope:admin");

    let (_, measurer) = mk(json!(["read", "measure"]), None).await;
    let r = measurer
        .post(
            "/agent/agent-1/echo_module?wait=10",
            r#"{"message":"x"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);

    // 6 a minute: a burst of one, then 429 with a Retry-After in whole seconds.
    let (_, slow) = mk(json!(["read"]), Some(6.0)).await;
    assert_eq!(slow.get("/agents").await.status, 200);
    let r = slow.get("/agents").await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.body["error"], "rate_limited");

    // Rotation and revocation.
    let (id, rot) = mk(json!(["read"]), None).await;
    let r = admin
        .post(&format!("/admin/tokens/{id}/rotate"), "", &[])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let rotated = anon.with_token(r.body["token"].as_str().unwrap());
    assert_eq!(
        rot.get("/agents").await.status,
        401,
        "old token after rotation"
    );
    assert_eq!(rotated.get("/agents").await.status, 200, "new token");
    let r = admin
        .post(&format!("/admin/tokens/{id}/revoke"), "", &[])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(rotated.get("/agents").await.status, 401, "revoked token");

    // Only hashes are stored.
    let db = rusqlite::Connection::open(up.dir.path().join("data/backend/backend.sqlite")).unwrap();
    let hashes: Vec<String> = db
        .prepare("SELECT secret_hash FROM credentials")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let admin_tok = admin_token(&up);
    assert!(hashes.contains(&wauth::token_hash(&admin_tok)));
    assert!(!hashes.iter().any(|h| h.contains(&admin_tok[5..])));
}

fn count_requests(up: &Up) -> i64 {
    let db = rusqlite::Connection::open(up.dir.path().join("data/backend/backend.sqlite")).unwrap();
    db.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
        .unwrap()
}

/// Proof 4: a request over a limit, or against the policy, gets the documented error
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_policy_refuse_and_store_nothing() {
    let policy_dir = TempDir::new("policy");
    let policy = policy_dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[rule]]
name = "loopback-only"
tags = ["local"]
allow = ["127.0.0.0/8", "::1/128"]
deny = ["127.0.0.66/32"]
max_rate = 50
"#,
    )
    .unwrap();
    let up = Up::start(
        1,
        &[
            "--auth",
            "--policy",
            policy.to_str().unwrap(),
            "--max-targets",
            "3",
            "--max-count",
            "5",
            "--max-body-bytes",
            "2048",
            "--max-queued-per-agent",
            "2",
            "--max-mqtt-payload",
            "4096",
        ],
    )
    .await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1"], T).await;
    let ok = admin
        .post(
            "/agent/agent-1/ping_module?wait=10",
            r#"{"host":"127.0.0.1","count":1,"interval_ms":100,"timeout_ms":500}"#,
            &[],
        )
        .await;
    assert_eq!(ok.body["state"], "succeeded", "{:?}", ok.body);
    let stored = count_requests(&up);

    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "targets",
            json!({"targets": ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]}).to_string(),
            422,
            "limit",
            "max_targets",
        ),
        (
            "count",
            json!({"host": "127.0.0.1", "count": 6}).to_string(),
            422,
            "limit",
            "max_count",
        ),
        (
            "body",
            json!({"targets": vec!["127.0.0.1"; 300]}).to_string(),
            413,
            "limit",
            "max_body_bytes",
        ),
        (
            "deny",
            json!({"host": "127.0.0.66", "count": 1}).to_string(),
            403,
            "rule",
            "loopback-only.deny",
        ),
        (
            "allow",
            json!({"host": "192.0.2.1", "count": 1}).to_string(),
            403,
            "rule",
            "loopback-only.allow",
        ),
        (
            "policy rate",
            json!({"host": "127.0.0.1", "count": 1, "rate": 100.0}).to_string(),
            403,
            "rule",
            "loopback-only.max_rate",
        ),
    ];
    for (what, body, status, key, name) in &cases {
        let r = admin
            .post("/agent/agent-1/ping_module?wait=5", body, &[])
            .await;
        assert_eq!(r.status, *status, "{what}: {:?}", r.body);
        assert_eq!(r.body[*key], *name, "{what}: {:?}", r.body);
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains(name.split('.').next().unwrap()),
            "{what}: the message names the limit or rule: {:?}",
            r.body
        );
    }
    assert_eq!(count_requests(&up), stored, "a refused request was stored");

    // Module defaults are merged by the backend before its checks: a default cannot
    // carry what a request may not ask for.
    let r = admin
        .put_json(
            "/agents/agent-1/modules/ping_module",
            &json!({"defaults": {"rate": 100.0}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_for("ping_module defaults in hello", T, || {
        let admin = admin.clone();
        async move {
            let a = admin.get("/agents/agent-1").await;
            a.body["modules"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == "ping_module" && m["config"]["defaults_json"].is_string())
                .then_some(())
        }
    })
    .await;
    let r = admin
        .post(
            "/agent/agent-1/ping_module?wait=5",
            r#"{"host":"127.0.0.1","count":1}"#,
            &[],
        )
        .await;
    assert_eq!(
        r.status, 403,
        "a default rate over the policy: {:?}",
        r.body
    );
    assert_eq!(r.body["rule"], "loopback-only.max_rate", "{:?}", r.body);
    assert_eq!(count_requests(&up), stored, "a refused request was stored");
    // The request's own value wins over the default.
    let r = admin
        .post(
            "/agent/agent-1/ping_module?wait=10",
            r#"{"host":"127.0.0.1","count":1,"rate":10,"timeout_ms":500}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);
    let stored = count_requests(&up);

    // Commands queued per agent: two slow runs fill the queue, the third is refused.
    for _ in 0..2 {
        let r = admin
            .post(
                "/agent/agent-1/faulty_module",
                r#"{"message":"slow","delay":20}"#,
                &[],
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let r = admin
        .post(
            "/agent/agent-1/faulty_module",
            r#"{"message":"one too many"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["limit"], "max_queued_per_agent");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(count_requests(&up), stored + 2);

    // The MQTT payload limit: agent-1's own login can't be used here (its token lives
    // in imn up), so enroll another agent and send an oversized message as it.
    let tok = admin.enroll("big").await;
    let topic = "imn/v1/big/out";
    let big = wauth::sign(&wauth::message_key(&tok), topic, &vec![1u8; 8192]);
    publish(
        up.mqtt_port,
        &Login {
            id: "big",
            user: Some("big"),
            password: Some(&tok),
            tls: None,
        },
        topic,
        &big,
        up.dir.path(),
    )
    .expect("publish");
    wait_for("the oversized message to be counted", T, || {
        let admin = admin.clone();
        async move { (health(&admin).await["bridge"]["too_large"] == 1).then_some(()) }
    })
    .await;
    assert!(up.proc.log_text().contains("max_mqtt_payload"));
}

/// TLS on every link: `imn certs` makes a CA and certificates; the API answers only
/// over HTTPS; MQTT runs over TLS only, with client certificates required; the
/// project's agent verifies the broker against the CA and connects; clients without
/// TLS, without a client certificate, or not trusting the CA are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_link_with_imn_certs() {
    let dir = TempDir::new("tls");
    let certs = dir.path().join("certs");
    let st = Command::new(bin("imn"))
        .args([
            "certs",
            "--dir",
            certs.to_str().unwrap(),
            "--clients",
            "agent-t,tool",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let ca = certs.join("ca.pem");
    let (http_port, mqtts_port) = (free_port(), free_port());
    let http = format!("127.0.0.1:{http_port}");
    let mqtts = format!("127.0.0.1:{mqtts_port}");
    let data = dir.path().join("data");
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let (cert, key, ca_s) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let up = Proc::spawn(
        "imn-up",
        &bin("imn"),
        &[
            "up",
            "--auth",
            "--http",
            &http,
            "--mqtt",
            "off",
            "--mqtts",
            &mqtts,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--mqtt-client-ca",
            &ca_s,
            "--agents",
            "0",
            "--data",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    let api = Api::https(http_port, &ca);
    wait_for("imn up over HTTPS", T, || {
        let api = api.clone();
        async move { api.try_get("/livez").await.map(|_| ()) }
    })
    .await;
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let admin = api.with_token(&token);
    assert_eq!(admin.get("/agents").await.status, 200);
    // Plain HTTP to the HTTPS port gets no answer.
    assert!(
        Api::new(http_port).try_get("/livez").await.is_none(),
        "plain HTTP answered"
    );

    let tok = admin.enroll("agent-t").await;
    let hb = wire::encode(&Envelope::Heartbeat(Default::default()));
    let topic = "imn/v1/agent-t/hb";
    let signed = wauth::sign(&wauth::message_key(&tok), topic, &hb);
    let (ccert, ckey) = (certs.join("client-tool.pem"), certs.join("client-tool.key"));
    let full = Login {
        id: "agent-t",
        user: Some("agent-t"),
        password: Some(&tok),
        tls: Some((&ca, Some((&ccert, &ckey)))),
    };
    publish(mqtts_port, &full, topic, &signed, dir.path()).expect("TLS with a client cert");
    let refusals = [
        (
            "no TLS",
            Login {
                tls: None,
                ..full.clone()
            },
        ),
        (
            "no client certificate",
            Login {
                tls: Some((&ca, None)),
                ..full.clone()
            },
        ),
        (
            "TLS but the wrong token",
            Login {
                password: Some("imna_wrong"),
                ..full.clone()
            },
        ),
    ];
    for (what, l) in &refusals {
        publish(mqtts_port, l, topic, &signed, dir.path()).expect_err(what);
    }
    // A server certificate from a CA the client does not trust is refused.
    let other = dir.path().join("other");
    assert!(Command::new(bin("imn"))
        .args(["certs", "--dir", other.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let untrusting = Login {
        tls: Some((&other.join("ca.pem"), Some((&ccert, &ckey)))),
        ..full.clone()
    };
    publish(mqtts_port, &untrusting, topic, &signed, dir.path())
        .expect_err("a client that does not trust the server's CA");

    // The project's agent refuses a broker whose certificate its CA did not issue.
    let (acert, akey) = (p("client-agent-t.pem"), p("client-agent-t.key"));
    let other_ca = other.join("ca.pem").display().to_string();
    let mut wary = spawn_agent(
        &bin("imn-agent"),
        "agent-t",
        &format!("mqtts://localhost:{mqtts_port}"),
        &dir.path().join("agent-wary"),
        &agent_flags(
            &tok,
            &[
                "--tls-ca",
                &other_ca,
                "--tls-cert",
                &acert,
                "--tls-key",
                &akey,
            ],
        ),
        dir.path(),
    );
    wait_for("the agent to refuse the broker's certificate", T, || {
        let log = wary.log_text();
        async move { log.contains("invalid peer certificate").then_some(()) }
    })
    .await;
    wary.kill9();

    // The project's agent over mutual TLS, verifying the broker against the CA.
    let _agent = spawn_agent(
        &bin("imn-agent"),
        "agent-t",
        &format!("mqtts://localhost:{mqtts_port}"),
        &dir.path().join("agent-t"),
        &agent_flags(
            &tok,
            &["--tls-ca", &ca_s, "--tls-cert", &acert, "--tls-key", &akey],
        ),
        dir.path(),
    );
    admin.wait_alive(&["agent-t"], T).await;
    let r = admin
        .post(
            "/agent/agent-t/echo_module?wait=10",
            r#"{"message":"over TLS"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);
    drop(up);
}

/// Safe defaults: listening beyond loopback needs auth and TLS, unless told otherwise.
/// (Nothing listens: the check comes before any bind.)
#[test]
fn listening_beyond_loopback_needs_auth_and_tls() {
    let dir = TempDir::new("exposure");
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("20")
            .arg(bin("imn"))
            .arg("up")
            .args(["--data", data.to_str().unwrap(), "--agents", "0"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let any = format!("0.0.0.0:{}", free_port());
    let (ok, err) = run(&["--http", &any]);
    assert!(!ok);
    assert!(
        err.contains("--http") && err.contains("--auth") && err.contains("--insecure-i-know"),
        "{err}"
    );
    let (ok, err) = run(&[
        "--http",
        &format!("127.0.0.1:{}", free_port()),
        "--mqtt",
        &any,
        "--auth",
    ]);
    assert!(!ok);
    assert!(err.contains("--mqtt") && err.contains("TLS"), "{err}");
}

/// Proofs 1 and 2 with backend and bridge as separate processes over NATS: the bridge
/// reads the credentials the backend puts in NATS (those enrolled before it started and
/// those enrolled after), refuses a wrong token, drops another agent's forgery, and a
/// revocation made at the backend disconnects the agent at the bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_bridge_follows_the_backends_credentials_over_nats() {
    let dir = TempDir::new("sec-nats");
    let d = dir.path();
    let nats = imn_tests::Nats::start(d).await;
    let http_port = free_port();
    let data = d.join("backend");
    let _backend = Proc::spawn(
        "imn-backend",
        &bin("imn-backend"),
        &[
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--nats",
            &nats.url(),
            "--data",
            data.to_str().unwrap(),
            "--auth",
        ],
        d,
    );
    let token_file = data.join("admin-token");
    let admin_tok = wait_for("the backend's admin token", T, || {
        let f = token_file.clone();
        async move { std::fs::read_to_string(f).ok() }
    })
    .await;
    let admin = Api::new(http_port).with_token(&admin_tok);
    // Enrolled before the bridge exists: it must find them in NATS.
    let tok_a = admin.enroll("edge-a").await;
    let tok_b = admin.enroll("edge-b").await;

    let mqtt_port = free_port();
    let mqtt = format!("127.0.0.1:{mqtt_port}");
    let bridge = Proc::spawn(
        "imn-bridge",
        &bin("imn-bridge"),
        &[
            "--mqtt",
            &mqtt,
            "--nats",
            &nats.url(),
            "--auth",
            "--metrics",
            "off",
        ],
        d,
    );
    let broker = format!("mqtt://{mqtt}");
    let mut agent_a = spawn_agent(
        &bin("imn-agent"),
        "edge-a",
        &broker,
        &d.join("edge-a"),
        &agent_flags(&tok_a, &[]),
        d,
    );
    admin.wait_alive(&["edge-a"], T).await;
    let r = admin
        .post(
            "/agent/edge-a/echo_module?wait=10",
            r#"{"message":"nats"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);
    let before = admin.get("/agents/edge-a").await.body;

    // A wrong token is refused; edge-b's valid login cannot speak for edge-a.
    let login = |id, password| Login {
        id,
        user: Some(id),
        password: Some(password),
        tls: None,
    };
    let hb = wire::encode(&Envelope::Heartbeat(Default::default()));
    let e = publish(
        mqtt_port,
        &login("edge-a", "imna_wrong"),
        "imn/v1/edge-a/hb",
        &hb,
        d,
    )
    .expect_err("a wrong token must be refused");
    assert!(e.contains("not authorised"), "{e}");
    let forged = Envelope::Hello(wire::Hello {
        agent_id: "edge-a".into(),
        version: "6.6.6-forged".into(),
        arch: "forged".into(),
        modules: vec![],
        tags: vec!["forged".into()],
        location: None,
        schedule_version: 0,
        outbox_epoch: 666,
        outbox_depth: 0,
        dropped: 0,
        heartbeat_interval_ms: 500,
        sent_at_ms: imn_proto::now_ms(),
        features: Vec::new(),
        limits: Default::default(),
        schedule_policy: 0,
    });
    let topic = "imn/v1/edge-a/hello";
    let plain = wire::encode(&forged);
    let signed_by_b = wauth::sign(&wauth::message_key(&tok_b), topic, &plain);
    for payload in [&plain, &signed_by_b] {
        publish(mqtt_port, &login("edge-b", &tok_b), topic, payload, d)
            .expect("edge-b logs in with its own token");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = admin.get("/agents/edge-a").await.body;
    assert_eq!(after["version"], before["version"], "{after}");
    assert_eq!(after["tags"], before["tags"], "{after}");
    assert!(
        bridge.log_text().contains("refused by the topic ACL"),
        "the bridge logs the refused publishes: {}",
        bridge.log_text()
    );

    // Enrolled while the bridge runs: it connects without a bridge restart.
    let tok_c = admin.enroll("edge-c").await;
    let _agent_c = spawn_agent(
        &bin("imn-agent"),
        "edge-c",
        &broker,
        &d.join("edge-c"),
        &agent_flags(&tok_c, &[]),
        d,
    );
    admin.wait_alive(&["edge-c"], T).await;

    // Revoked at the backend: the bridge disconnects edge-a and refuses it after.
    let took = revoke_and_wait_refused(&admin, "edge-a", &agent_a).await;
    println!("over NATS: revoked agent disconnected and refused in {took:?}");
    let e = publish(
        mqtt_port,
        &login("edge-a", &tok_a),
        "imn/v1/edge-a/hb",
        &hb,
        d,
    )
    .expect_err("a revoked agent must be refused");
    assert!(e.contains("not authorised"), "{e}");
    agent_a.kill9();
}

// =====================================================================================
// Issue 23: files and secrets on disk. `imn up` and `imn-backend` keep DATA at mode
// 0700 and create their files 0600 (umask 077); the admin token is written through a
// fresh O_EXCL|O_NOFOLLOW temporary file renamed over the target, so a symlink planted
// in DATA is never followed.
// =====================================================================================

/// Mode bits of a path (not following a symlink).
fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every file and directory under `dir` (symlinks left out) that its group or others
/// may use.
fn not_private(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        if t.is_symlink() {
            continue;
        }
        if mode_of(&p) & 0o077 != 0 {
            out.push(format!("{} {:o}", p.display(), mode_of(&p)));
        }
        if t.is_dir() {
            out.extend(not_private(&p));
        }
    }
    out
}

/// `imn up --auth`: DATA is 0700 once it runs, and the admin token, the store and
/// everything else in it are its owner's only. Then, as someone who can write to DATA:
/// with imn up stopped, DATA made 0755 again and the token file gone (so a new one is
/// written), symlinks are planted at the old fixed temporary path `admin-token.tmp`, at
/// other predictable names and at `admin-token` itself, each to a file outside DATA.
/// After a restart on the same DATA no symlink was followed (the files outside are
/// untouched), DATA is 0700 again, and the new admin token is a regular 0600 file that
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_is_private_and_planted_symlinks_are_not_followed() {
    let mut up = Up::start(0, &["--auth"]).await;
    let data = up.dir.path().join("data");
    let token_file = data.join("admin-token");
    wait_for("the admin token", T, || {
        let f = token_file.clone();
        async move { f.exists().then_some(()) }
    })
    .await;
    assert_eq!(mode_of(&data), 0o700, "DATA after imn up starts");
    assert_eq!(mode_of(&token_file), 0o600, "DATA/admin-token");
    assert!(data.join("backend/backend.sqlite").exists());
    let loose = not_private(&data);
    assert!(loose.is_empty(), "group or others can use: {loose:?}");
    assert_eq!(up.admin().get("/agents").await.status, 200);

    // Stop it, and plant.
    up.proc.kill9();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::remove_file(&token_file).unwrap();
    let outside = up.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let planted = [
        data.join("admin-token.tmp"),
        data.join(".admin-token.tmp"),
        data.join(format!(".admin-token.tmp-{}", std::process::id())),
        token_file.clone(),
    ];
    let mut victims = Vec::new();
    for (i, p) in planted.iter().enumerate() {
        let victim = outside.join(format!("victim-{i}"));
        std::fs::write(&victim, "untouched\n").unwrap();
        std::os::unix::fs::symlink(&victim, p).unwrap();
        victims.push(victim);
    }
    // A dangling one: following it would create a file outside DATA.
    let dangling = outside.join("made-through-a-symlink");
    std::os::unix::fs::symlink(&dangling, data.join("admin-token.new")).unwrap();

    // The same imn up, on the same DATA and ports.
    let http = format!("127.0.0.1:{}", up.http_port);
    let mqtt = format!("127.0.0.1:{}", up.mqtt_port);
    let again = Proc::spawn(
        "imn-up-again",
        &bin("imn"),
        &[
            "up",
            "--http",
            &http,
            "--mqtt",
            &mqtt,
            "--data",
            data.to_str().unwrap(),
            "--agents",
            "0",
            "--auth",
        ],
        up.dir.path(),
    );
    let api = Api::new(up.http_port);
    wait_for("imn up to write a new admin token", T, || {
        let api = api.clone();
        let log = again.log_text();
        async move {
            api.try_get("/health").await?;
            log.contains("the admin token is in this file")
                .then_some(())
        }
    })
    .await;
    for v in &victims {
        assert_eq!(
            std::fs::read_to_string(v).unwrap(),
            "untouched\n",
            "{} was written through a symlink",
            v.display()
        );
    }
    let meta = std::fs::symlink_metadata(&token_file).unwrap();
    assert!(
        meta.file_type().is_file(),
        "DATA/admin-token is a regular file"
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(!dangling.exists(), "a dangling symlink was followed");
    assert_eq!(mode_of(&data), 0o700, "DATA is made private again");
    assert_eq!(mode_of(&token_file), 0o600);
    assert!(token.starts_with("imn"), "{token}");
    assert_eq!(api.with_token(&token).get("/agents").await.status, 200);
    let loose = not_private(&data);
    assert!(loose.is_empty(), "group or others can use: {loose:?}");
}
