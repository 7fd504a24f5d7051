//! Issue 23: the Mosquitto that `deploy/mosquitto/` ships, with real clients. An agent
//! logged in as itself cannot take another agent's client id (and so its session), and
//! the bridge reaches the broker over TLS, checking its certificate and name.
//!
//! Needs Debian's `mosquitto`, `mosquitto-clients` and `nats-server`, and the
//! workspace's binaries (`cargo build --workspace --bins`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use imn_tests::mosquitto::{Mosquitto, Setup};
use imn_tests::{
    bin, free_port, http_get_text, program, prom_value, spawn_agent, wait_for, Nats, Proc, TempDir,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const T: Duration = Duration::from_secs(30);
const BRIDGE_USER: &str = "imn.bridge-1";

fn setup(agents: &[(&str, &str)]) -> Setup {
    Setup {
        agents: agents
            .iter()
            .map(|(a, t)| (a.to_string(), t.to_string()))
            .collect(),
        bridge_users: vec![BRIDGE_USER.to_string()],
        ..Setup::default()
    }
}

/// One mosquitto_pub on the plain listener; whether the broker took it.
fn publish(port: u16, client_id: &str, user: &str, password: &str, topic: &str) -> bool {
    let exe = program("mosquitto_pub").expect("mosquitto_pub (apt-get install mosquitto-clients)");
    Command::new("timeout")
        .arg("20")
        .arg(exe)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-i", client_id, "-u", user, "-P", password])
        .args(["-t", topic, "-m", "x"])
        .status()
        .expect("mosquitto_pub")
        .success()
}

/// What agent B's connection saw.
#[derive(Debug, Default)]
struct Seen {
    /// The connection failed (the broker closed it), with the error.
    dropped: Option<String>,
    /// Commands received (payloads).
    commands: Vec<String>,
}

/// Agent B's client id `agent-b`, logged in as agent-b, subscribed to its `cmd` topic.
/// Returns once subscribed; the task records what happens until `until`.
async fn connect_b(port: u16, token: &str, until: Instant) -> tokio::task::JoinHandle<Seen> {
    let mut mo = MqttOptions::new("agent-b", "127.0.0.1", port);
    mo.set_credentials("agent-b", token)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(mo, 16);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut subscribed = Some(subscribed_tx);
        let mut seen = Seen::default();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, eventloop.poll()).await {
                Err(_) => return seen,
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    client
                        .subscribe("imn/v1/agent-b/cmd", QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    seen.commands
                        .push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    seen.dropped = Some(e.to_string());
                    return seen;
                }
            }
        }
    });
    tokio::time::timeout(T, subscribed_rx)
        .await
        .expect("agent-b subscribed")
        .expect("agent-b's task ended early");
    task
}

/// Agent A logs in with its own valid credentials but MQTT client id `agent-b`. With
/// the shipped configuration (`use_username_as_clientid true`) the broker calls it
/// `agent-a`, and agent B's connection survives and still gets its commands. The same
/// broker without that line (the configuration before issue 23) drops agent B: the
/// attack is real, and this test would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_take_another_agents_client_id() {
    for binding in [true, false] {
        let dir = TempDir::new("mq-clientid");
        let (tok_a, tok_b) = ("token-of-a-1f2e", "token-of-b-9c8d");
        let mut s = setup(&[("agent-a", tok_a), ("agent-b", tok_b)]);
        s.without_clientid_binding = !binding;
        let mq = Mosquitto::start(dir.path(), &s).await;
        let port = mq.port;

        let until = Instant::now() + Duration::from_secs(4);
        let b = connect_b(port, tok_b, until).await;
        // The attack: a valid login as agent-a, with agent-b's client id.
        let took = tokio::task::spawn_blocking(move || {
            publish(port, "agent-b", "agent-a", tok_a, "imn/v1/agent-a/out")
        })
        .await
        .unwrap();
        assert!(took, "agent-a's own login was refused");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A command for agent-b, through the bridge's account.
        let pass = mq.bridge_password.clone();
        let sent = tokio::task::spawn_blocking(move || {
            publish(
                port,
                "bridge-test",
                BRIDGE_USER,
                &pass,
                "imn/v1/agent-b/cmd",
            )
        })
        .await
        .unwrap();
        assert!(sent, "the bridge user could not publish a command");
        let seen = b.await.unwrap();
        let log = std::fs::read_to_string(&mq.proc.log).unwrap_or_default();
        let kicked = log.contains("Client agent-b already connected, closing old connection");
        if binding {
            assert!(
                seen.dropped.is_none() && !kicked,
                "agent-b was knocked off by agent-a: {seen:?}\n{log}"
            );
            assert_eq!(seen.commands, ["x"], "agent-b's command: {seen:?}");
            assert!(
                log.contains("as agent-a (") && log.contains("u'agent-a'"),
                "the broker named agent-a's connection after its user: {log}"
            );
        } else {
            assert!(
                seen.dropped.is_some() && kicked,
                "without use_username_as_clientid, agent-a pushes agent-b off: {seen:?}\n{log}"
            );
        }
    }
}

/// `imn certs` for `localhost` in `dir`; returns (ca.pem, server.pem, server.key).
fn certs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let st = Command::new(bin("imn"))
        .args([
            "certs",
            "--dir",
            dir.to_str().unwrap(),
            "--hosts",
            "localhost",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "imn certs");
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

fn bridge(name: &str, url: &str, ca: &Path, mq: &Mosquitto, nats: &Nats, metrics: u16) -> Proc {
    Proc::spawn(
        name,
        &bin("imn-bridge"),
        &[
            "--external-broker",
            url,
            "--external-ca",
            ca.to_str().unwrap(),
            "--external-user",
            BRIDGE_USER,
            "--external-password-file",
            mq.bridge_password_file.to_str().unwrap(),
            "--nats",
            &nats.url(),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ],
        &mq.dir,
    )
}

/// The bridge reaches Mosquitto's TLS listener (the shipped TLS block, turned on) with
/// `mqtts://` and `--external-ca`, and an agent's messages (the real agent, over TLS
/// too) flow through it to NATS. A CA that did not sign the broker's certificate, or a
/// name the certificate does not carry, stops the bridge at start with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_tls_to_mosquitto_and_checks_the_certificate() {
    let dir = TempDir::new("mq-tls");
    let mqdir = dir.path().join("mosquitto");
    let (ca, cert, key) = certs(&mqdir.join("certs"));
    let (other_ca, _, _) = certs(&dir.path().join("other-ca"));
    let token = "token-of-agent-t-5e6f";
    let mut s = setup(&[("agent-t", token)]);
    s.tls = Some((cert, key));
    let mq = Mosquitto::start(&mqdir, &s).await;
    let tls_port = mq.tls_port.unwrap();
    let nats = Nats::start(dir.path()).await;

    let metrics = free_port();
    let url = format!("mqtts://localhost:{tls_port}");
    let _bridge = bridge("bridge-tls", &url, &ca, &mq, &nats, metrics);
    wait_for("the bridge on TLS", T, || async move {
        http_get_text(metrics, "/metrics").map(|_| ())
    })
    .await;
    let log = std::fs::read_to_string(&mq.proc.log).unwrap_or_default();
    assert!(
        log.contains(&format!("u'{BRIDGE_USER}'")),
        "the bridge logged in: {log}"
    );
    let _agent = spawn_agent(
        &bin("imn-agent"),
        "agent-t",
        &url,
        &dir.path().join("agent-t"),
        &[
            "--token",
            token,
            "--tls-ca",
            ca.to_str().unwrap(),
            "--heartbeat-ms",
            "500",
        ],
        dir.path(),
    );
    let counted = |kind: &str| {
        let page = http_get_text(metrics, "/metrics").unwrap_or_default();
        prom_value(
            &page,
            &format!(r#"imn_bridge_messages_total{{direction="up",kind="{kind}"}}"#),
        )
    };
    wait_for(
        "the agent's hello and heartbeats through the bridge",
        T,
        || async { (counted("hello") >= 1.0 && counted("hb") >= 2.0).then_some(()) },
    )
    .await;

    // A CA that did not sign the broker's certificate.
    let mut wrong_ca = bridge("bridge-wrong-ca", &url, &other_ca, &mq, &nats, free_port());
    let st = wrong_ca
        .wait_exit(T)
        .expect("the bridge with a wrong CA exits");
    assert!(!st.success());
    let log = wrong_ca.log_text();
    assert!(
        log.contains("TLS to localhost:")
            && log.contains("refused")
            && log.contains(&format!("--external-ca {}", other_ca.display()))
            // Both development CAs have the same name: the signature does not verify.
            && (log.contains("UnknownIssuer") || log.contains("BadSignature")),
        "{log}"
    );
    // The right CA, but a name the certificate does not carry.
    let by_address = format!("mqtts://127.0.0.1:{tls_port}");
    let mut wrong_name = bridge(
        "bridge-wrong-name",
        &by_address,
        &ca,
        &mq,
        &nats,
        free_port(),
    );
    let st = wrong_name
        .wait_exit(T)
        .expect("the bridge with a wrong name exits");
    assert!(!st.success());
    let log = wrong_name.log_text();
    assert!(
        log.contains("NotValidForName") || log.contains("not valid for name"),
        "{log}"
    );
}
