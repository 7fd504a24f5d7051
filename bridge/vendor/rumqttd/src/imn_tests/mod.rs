//! IMN-PATCH: tests of the IMN patches (IMN-PATCH.md, sections 1 and 3 to 12; section 1
//! also has a test in `router/logs.rs`, section 2 next to each buffer it changed).
//!
//! Each test starts a `Broker` on a free 127.0.0.1 port (its own threads), with the
//! bridge's local link ("imn-bridge"), and talks MQTT 3.1.1 to it through raw sockets
//! and the crate's own v4 codec. Waits poll with deadlines; the only fixed waits are the
//! short quiet periods that check that something did NOT arrive.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::local::{LinkRx, LinkTx};
use crate::protocol::v4::V4;
use crate::protocol::Protocol as _;
use crate::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, Filter, LastWill, Packet, PubAck, Publish, QoS,
    RetainForwardRule, Subscribe, SubscribeReasonCode,
};
use crate::{
    Access, AclHandler, Broker, Config, ConnectionSettings, Notification, RouterConfig,
    ServerSettings, TlsConfig,
};

/// Deadline for anything that should happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that should NOT happen.
const QUIET: Duration = Duration::from_millis(300);
const LOCAL_ID: &str = "imn-bridge";

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn server_settings(listen: SocketAddr, tls: Option<TlsConfig>) -> ServerSettings {
    ServerSettings {
        name: "imn-test".into(),
        listen,
        tls,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
            max_inbound_bytes_per_s: None,
        },
        max_pending_connections: None,
    }
}

/// `crate::open_connections()` counts the network clients of every broker in the
/// process: its test holds this for writing, every other broker for reading.
static CONNECTION_COUNT: RwLock<()> = RwLock::new(());

fn shared_count() -> RwLockReadGuard<'static, ()> {
    CONNECTION_COUNT
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct TestBroker {
    addr: SocketAddr,
    tx: LinkTx,
    rx: LinkRx,
    _count: Option<RwLockReadGuard<'static, ()>>,
}

fn start_broker(acl: Option<AclHandler>, tls: Option<TlsConfig>) -> TestBroker {
    start_broker_with(acl, tls, |_| {})
}

/// `start_broker`, after `settings` has changed the listener's connection settings.
fn start_broker_with(
    acl: Option<AclHandler>,
    tls: Option<TlsConfig>,
    settings: impl FnOnce(&mut ConnectionSettings),
) -> TestBroker {
    let count = shared_count();
    let mut server = server_settings(free_addr(), tls);
    settings(&mut server.connections);
    let mut b = launch(acl, server);
    b._count = Some(count);
    b
}

/// Starts a broker with this listener, and the local link.
fn launch(acl: Option<AclHandler>, server: ServerSettings) -> TestBroker {
    let addr = server.listen;
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 << 20,
            max_segment_count: 8,
            acl,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    let (tx, rx) = broker.link(LOCAL_ID).unwrap();
    std::thread::spawn(move || {
        let _ = broker.start();
    });
    // The listener is up once a connection is accepted (this probe is then dropped).
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "broker never listened on {addr}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(crate::listening(addr), "listening() does not know {addr}");
    TestBroker {
        addr,
        tx,
        rx,
        _count: None,
    }
}

// ---------------------------------------------------------------- raw MQTT client

#[derive(Debug)]
enum Recv {
    Packet(Packet),
    Timeout,
    Closed,
}

struct Client {
    stream: TcpStream,
    read: BytesMut,
}

impl Client {
    fn open(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).unwrap(),
            read: BytesMut::new(),
        }
    }

    /// Opens a connection and sends CONNECT (clean session); returns the CONNACK.
    fn connect(addr: SocketAddr, client_id: &str, will: Option<LastWill>) -> (Client, ConnAck) {
        Client::connect_login(addr, client_id, will, None)
    }

    /// `connect`, with a user name and password.
    fn connect_login(
        addr: SocketAddr,
        client_id: &str,
        will: Option<LastWill>,
        login: Option<protocol::Login>,
    ) -> (Client, ConnAck) {
        let mut c = Client::open(addr);
        let connect = Connect {
            keep_alive: 60,
            client_id: client_id.to_string(),
            clean_session: true,
        };
        c.send(Packet::Connect(connect, None, will, None, login));
        match c.recv(WAIT) {
            Recv::Packet(Packet::ConnAck(ack, _)) => (c, ack),
            other => panic!("{client_id}: expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts success.
    fn connected(addr: SocketAddr, client_id: &str, will: Option<LastWill>) -> Client {
        let (c, ack) = Client::connect(addr, client_id, will);
        assert_eq!(ack.code, ConnectReturnCode::Success, "{client_id}");
        c
    }

    fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        V4.write(packet, &mut buf).unwrap();
        self.stream.write_all(&buf).unwrap();
    }

    fn recv(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match V4.read_mut(&mut self.read, 1 << 20) {
                Ok(p) => return Recv::Packet(p),
                Err(protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from broker: {e:?}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Closed,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Recv::Timeout
                }
                Err(_) => return Recv::Closed,
            }
        }
    }

    /// Next packet, which must come before the deadline.
    fn expect(&mut self, what: &str) -> Packet {
        match self.recv(WAIT) {
            Recv::Packet(p) => p,
            other => panic!("expected {what}, got {other:?}"),
        }
    }

    /// Skips other packets until a PUBLISH.
    fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Recv::Packet(Packet::Publish(p, _)) => return Some(p),
                Recv::Packet(_) => continue,
                Recv::Timeout | Recv::Closed => return None,
            }
        }
    }

    /// Reads (and discards) until the broker closes the connection; false on timeout.
    fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Recv::Closed => return true,
                Recv::Timeout => return false,
                Recv::Packet(_) => continue,
            }
        }
    }

    /// Sends FIN and waits until the broker has closed its side too, i.e. its
    /// connection task has ended.
    fn hang_up(mut self) {
        self.stream.shutdown(Shutdown::Write).unwrap();
        assert!(
            self.closed_within(WAIT),
            "broker did not close after our FIN"
        );
    }

    fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }
}

fn publish(topic: &str, payload: &str, qos: QoS, pkid: u16, retain: bool) -> Packet {
    Packet::Publish(
        Publish {
            dup: false,
            qos,
            pkid,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        },
        None,
    )
}

fn subscribe(pkid: u16, filters: &[(&str, QoS)]) -> Packet {
    let filters = filters
        .iter()
        .map(|(path, qos)| Filter {
            path: path.to_string(),
            qos: *qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters }, None)
}

fn will(topic: &str, message: &str) -> LastWill {
    LastWill {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        message: Bytes::copy_from_slice(message.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: true,
    }
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Next message the local link gets, as (topic, payload).
fn local_next(rx: &mut LinkRx, timeout: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(Notification::Forward(f))) => {
                return Some((text(&f.publish.topic), text(&f.publish.payload)))
            }
            Ok(Some(Notification::Unschedule)) => rx.ready().unwrap(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

fn pair(topic: &str, payload: &str) -> Option<(String, String)> {
    Some((topic.to_string(), payload.to_string()))
}

type Calls = Arc<Mutex<Vec<(String, String, Access)>>>;

/// The ACL IMN uses, in short: a client may publish, subscribe and leave a will only
/// under `imn/v1/{its id}/`; "watcher" may subscribe to anything. Records every call.
fn agent_acl() -> (AclHandler, Calls) {
    let calls: Calls = Arc::default();
    let log = calls.clone();
    let acl: AclHandler = Arc::new(move |client_id: &str, topic: &str, access: Access| {
        log.lock()
            .unwrap()
            .push((client_id.to_string(), topic.to_string(), access));
        (client_id == "watcher" && access == Access::Subscribe)
            || topic.starts_with(&format!("imn/v1/{client_id}/"))
    });
    (acl, calls)
}

fn assert_local_never_checked(calls: &Calls) {
    let calls = calls.lock().unwrap();
    assert!(
        calls.iter().all(|(id, _, _)| id != LOCAL_ID),
        "the ACL was asked about the local link: {calls:?}"
    );
}

// ---------------------------------------------------------------- 3. ACL

#[test]
fn acl_denied_publish_is_acked_but_not_delivered_nor_retained() {
    let (acl, calls) = agent_acl();
    let mut b = start_broker(Some(acl), None);
    b.tx.subscribe("imn/v1/+/out").unwrap();

    let mut a = Client::connected(b.addr, "agent-a", None);
    a.send(publish(
        "imn/v1/agent-b/out",
        "forged",
        QoS::AtLeastOnce,
        1,
        true,
    ));
    a.send(publish(
        "imn/v1/agent-a/out",
        "mine",
        QoS::AtLeastOnce,
        2,
        true,
    ));
    // Both are acked: a denied QoS 1 publish still gets its PUBACK.
    for pkid in [1, 2] {
        match a.expect("PUBACK") {
            Packet::PubAck(PubAck { pkid: got, .. }, _) => assert_eq!(got, pkid),
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }
    // Both topics match the local link's one wildcard filter, whose log keeps the order
    // of appends: had the denied publish been appended, it would come first.
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/agent-a/out", "mine")
    );

    // Nothing was retained on the denied topic: a new subscriber's first message is one
    // published after it subscribed (retained messages are sent first).
    let mut w = Client::connected(b.addr, "watcher", None);
    w.send(subscribe(1, &[("imn/v1/agent-b/out", QoS::AtMostOnce)]));
    assert!(matches!(w.expect("SUBACK"), Packet::SubAck(..)));
    b.tx.publish("imn/v1/agent-b/out", "sentinel").unwrap();
    let first = w.next_publish(WAIT).expect("sentinel");
    assert_eq!(text(&first.payload), "sentinel");
    // ... while the allowed one was retained.
    w.send(subscribe(2, &[("imn/v1/agent-a/out", QoS::AtMostOnce)]));
    let retained = w.next_publish(WAIT).expect("retained message");
    assert_eq!(text(&retained.topic), "imn/v1/agent-a/out");
    assert_eq!(text(&retained.payload), "mine");
    assert!(retained.retain);

    let calls_now = calls.lock().unwrap().clone();
    assert!(calls_now.contains(&(
        "agent-a".into(),
        "imn/v1/agent-b/out".into(),
        Access::Publish
    )));
    assert_local_never_checked(&calls);
}

#[test]
fn acl_denied_qos2_publish_is_not_delivered() {
    let (acl, calls) = agent_acl();
    let mut b = start_broker(Some(acl), None);
    b.tx.subscribe("imn/v1/+/out").unwrap();

    let mut a = Client::connected(b.addr, "agent-a", None);
    for (pkid, topic, payload) in [
        (1, "imn/v1/agent-b/out", "forged"),
        (2, "imn/v1/agent-a/out", "mine"),
    ] {
        a.send(publish(topic, payload, QoS::ExactlyOnce, pkid, false));
        assert!(matches!(a.expect("PUBREC"), Packet::PubRec(..)));
        a.send(Packet::PubRel(
            protocol::PubRel {
                pkid,
                reason: protocol::PubRelReason::Success,
            },
            None,
        ));
        assert!(matches!(a.expect("PUBCOMP"), Packet::PubComp(..)));
    }
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/agent-a/out", "mine")
    );
    assert_local_never_checked(&calls);
}

#[test]
fn acl_denied_filter_gets_0x80_and_no_subscription() {
    let (acl, calls) = agent_acl();
    let mut b = start_broker(Some(acl), None);

    // The local link subscribes to wildcards: never checked.
    b.tx.subscribe("imn/v1/+/cmd").unwrap();

    let mut a = Client::connected(b.addr, "agent-a", None);
    a.send(subscribe(
        7,
        &[
            ("imn/v1/agent-a/cmd", QoS::AtLeastOnce),
            ("imn/v1/+/cmd", QoS::AtMostOnce),
            ("imn/v1/agent-a/ack", QoS::AtMostOnce),
        ],
    ));
    match a.expect("SUBACK") {
        Packet::SubAck(ack, _) => {
            assert_eq!(ack.pkid, 7);
            // The v4 decoder reads only 0x80 as Failure.
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // The denied wildcard made no subscription: only agent-a's own command arrives.
    b.tx.publish("imn/v1/agent-b/cmd", "theirs").unwrap();
    b.tx.publish("imn/v1/agent-a/cmd", "own").unwrap();
    let p = a.next_publish(WAIT).expect("own command");
    assert_eq!(text(&p.topic), "imn/v1/agent-a/cmd");
    assert_eq!(text(&p.payload), "own");
    assert!(
        a.next_publish(QUIET).is_none(),
        "got a message through the denied filter"
    );

    let calls_now = calls.lock().unwrap().clone();
    assert!(calls_now.contains(&("agent-a".into(), "imn/v1/+/cmd".into(), Access::Subscribe)));
    assert_local_never_checked(&calls);
}

#[test]
fn acl_denied_will_is_discarded_and_allowed_one_published() {
    let (acl, calls) = agent_acl();
    let mut b = start_broker(Some(acl), None);
    b.tx.subscribe("imn/v1/+/status").unwrap();

    // agent-c's will is on agent-a's topic: denied, but agent-c still connects.
    let c = Client::connected(
        b.addr,
        "agent-c",
        Some(will("imn/v1/agent-a/status", "forged-offline")),
    );
    let a = Client::connected(
        b.addr,
        "agent-a",
        Some(will("imn/v1/agent-a/status", "offline")),
    );

    // Both drop without DISCONNECT, agent-c first.
    c.hang_up();
    a.hang_up();
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/agent-a/status", "offline")
    );
    assert_eq!(
        local_next(&mut b.rx, QUIET),
        None,
        "the denied will was published"
    );

    let calls_now = calls.lock().unwrap().clone();
    assert!(calls_now.contains(&(
        "agent-c".into(),
        "imn/v1/agent-a/status".into(),
        Access::Will
    )));
    assert!(calls_now.contains(&(
        "agent-a".into(),
        "imn/v1/agent-a/status".into(),
        Access::Will
    )));
    assert_local_never_checked(&calls);
}

// ---------------------------------------------------------------- 4. kick

#[test]
fn disconnect_client_closes_the_socket_and_publishes_the_will() {
    let mut b = start_broker(None, None);
    b.tx.subscribe("imn/v1/+/status").unwrap();

    let mut k = Client::connected(
        b.addr,
        "agent-k",
        Some(will("imn/v1/agent-k/status", "offline")),
    );

    let kicked = Instant::now();
    b.tx.disconnect_client("agent-k").unwrap();
    assert!(
        k.closed_within(Duration::from_secs(2)),
        "kicked client saw no EOF within 2 s"
    );
    assert!(kicked.elapsed() < Duration::from_secs(2));
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/agent-k/status", "offline")
    );
    // Published once (the network task's own will event then finds nothing).
    assert_eq!(local_next(&mut b.rx, QUIET), None);

    // Unknown ids and the local link itself are no-ops, not errors.
    b.tx.disconnect_client("nobody").unwrap();
    b.tx.disconnect_client(LOCAL_ID).unwrap();
    b.tx.publish("imn/v1/bridge/status", "still here").unwrap();
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/bridge/status", "still here")
    );

    // The kicked agent can come back.
    let _k = Client::connected(b.addr, "agent-k", None);
}

/// The server-side state of the broker's socket for the client at `client_port`, from
/// /proc/net/tcp: (state, send queue bytes). None if not found (or not Linux).
fn server_socket(broker_port: u16, client_port: u16) -> Option<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        if port(f[1]) == Some(broker_port) && port(f[2]) == Some(client_port) {
            let state = u8::from_str_radix(f[3], 16).ok()?;
            let tx_queue = u64::from_str_radix(f[4].split(':').next()?, 16).ok()?;
            return Some((state, tx_queue));
        }
    }
    None
}

const TCP_ESTABLISHED: u8 = 1;

#[test]
fn disconnect_client_closes_a_client_that_does_not_read() {
    if std::fs::metadata("/proc/net/tcp").is_err() {
        eprintln!("no /proc/net/tcp: skipped");
        return;
    }
    let mut b = start_broker(None, None);
    let mut s = Client::connected(b.addr, "agent-slow", None);
    s.send(subscribe(1, &[("imn/v1/agent-slow/cmd", QoS::AtMostOnce)]));
    assert!(matches!(s.expect("SUBACK"), Packet::SubAck(..)));

    // 24 MiB towards a client that reads nothing: far more than the loopback socket
    // buffers hold, so the broker's connection task ends up blocked in a write.
    let chunk = "x".repeat(64 * 1024);
    for _ in 0..384 {
        b.tx.publish("imn/v1/agent-slow/cmd", chunk.clone())
            .unwrap();
    }
    let (broker_port, client_port) = (b.addr.port(), s.local_port());
    let deadline = Instant::now() + WAIT;
    let mut last = (0, Instant::now());
    loop {
        let (state, queued) = server_socket(broker_port, client_port).expect("server socket");
        assert_eq!(state, TCP_ESTABLISHED);
        if queued != last.0 {
            last = (queued, Instant::now());
        } else if queued > 0 && last.1.elapsed() > Duration::from_millis(200) {
            break; // send queue full and not moving: the writer is stuck
        }
        assert!(
            Instant::now() < deadline,
            "the broker's send queue never filled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    b.tx.disconnect_client("agent-slow").unwrap();
    // Without reading anything, the broker's socket must be closed (FIN queued behind
    // the unsent data: FIN_WAIT1, or gone) within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match server_socket(broker_port, client_port) {
            Some((TCP_ESTABLISHED, _)) => {}
            _ => break,
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not close the socket of a kicked client that does not read"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(s.closed_within(WAIT), "no EOF after the queued data");
}

// ---------------------------------------------------------------- 8. refused logins

#[test]
fn refused_login_gets_connack_not_authorized_then_close() {
    let b = start_broker_with(None, None, |c| {
        c.set_auth_handler(|_id, user, pass| async move { user == "probe" && pass == "right" })
    });
    let login = |user: &str, pass: &str| {
        Some(protocol::Login {
            username: user.into(),
            password: pass.into(),
        })
    };
    for (what, l) in [
        ("wrong password", login("probe", "wrong")),
        ("unknown user", login("ghost", "right")),
        ("no credentials", None),
    ] {
        let (mut c, ack) = Client::connect_login(b.addr, "probe", None, l);
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{what}");
        assert!(
            c.closed_within(WAIT),
            "{what}: refused connection left open"
        );
    }
    let (_c, ack) = Client::connect_login(b.addr, "probe", None, login("probe", "right"));
    assert_eq!(ack.code, ConnectReturnCode::Success);
}

// ---------------------------------------------------------------- 5. local client ids

#[test]
fn remote_client_cannot_take_the_local_links_client_id() {
    let mut b = start_broker(None, None);
    b.tx.subscribe("imn/v1/+/out").unwrap();

    // Twice: a refused connection must leave nothing behind that breaks the next one.
    for _ in 0..2 {
        let (mut c, ack) = Client::connect(b.addr, LOCAL_ID, None);
        assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
        assert!(c.closed_within(WAIT), "refused connection left open");
    }

    // The local link is untouched, and other clients still connect.
    let mut a = Client::connected(b.addr, "agent-a", None);
    a.send(publish(
        "imn/v1/agent-a/out",
        "hello",
        QoS::AtMostOnce,
        0,
        false,
    ));
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/agent-a/out", "hello")
    );
    b.tx.publish("imn/v1/bridge/out", "local").unwrap();
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/bridge/out", "local")
    );

    // Remote-vs-remote takeover is unchanged: the newer connection wins.
    let _a2 = Client::connected(b.addr, "agent-a", None);
    assert!(
        a.closed_within(WAIT),
        "old connection not dropped on takeover"
    );
}

// ---------------------------------------------------------------- 6. TLS

#[cfg(all(feature = "use-rustls", not(feature = "verify-client-cert")))]
mod tls {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    fn cert_path(name: &str) -> String {
        format!("{}/src/imn_tests/certs/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn tls_config(capath: Option<&str>) -> TlsConfig {
        TlsConfig::Rustls {
            capath: capath.map(cert_path),
            certpath: cert_path("server.pem"),
            keypath: cert_path("server.key"),
        }
    }

    fn certs(name: &str) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(cert_path(name)).unwrap();
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn key(name: &str) -> PrivateKeyDer<'static> {
        let pem = std::fs::read(cert_path(name)).unwrap();
        rustls_pemfile::private_key(&mut pem.as_slice())
            .unwrap()
            .unwrap()
    }

    /// TLS handshake (with the client certificate `identity`, e.g. "client"), CONNECT,
    /// and the CONNACK; Err on any failure.
    async fn tls_connect(
        addr: SocketAddr,
        identity: Option<&str>,
        client_id: &str,
    ) -> Result<ConnAck, String> {
        let mut roots = RootCertStore::empty();
        for c in certs("ca.pem") {
            roots.add(c).unwrap();
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match identity {
            Some(name) => builder
                .with_client_auth_cert(certs(&format!("{name}.pem")), key(&format!("{name}.key")))
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let run = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let mut buf = BytesMut::new();
            let connect = Connect {
                keep_alive: 60,
                client_id: client_id.to_string(),
                clean_session: true,
            };
            V4.write(Packet::Connect(connect, None, None, None, None), &mut buf)
                .unwrap();
            tls.write_all(&buf).await.map_err(|e| e.to_string())?;
            let mut read = BytesMut::new();
            loop {
                match V4.read_mut(&mut read, 1 << 20) {
                    Ok(Packet::ConnAck(ack, _)) => return Ok(ack),
                    Ok(other) => return Err(format!("unexpected {other:?}")),
                    Err(protocol::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(format!("{e:?}")),
                }
                let n = tls.read_buf(&mut read).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed before CONNACK".into());
                }
            }
        };
        tokio::time::timeout(WAIT, run)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    fn success(r: Result<ConnAck, String>) -> bool {
        r.is_ok_and(|ack| ack.code == ConnectReturnCode::Success)
    }

    #[tokio::test]
    async fn mutual_tls_requires_a_certificate_from_the_ca() {
        let b = start_broker(None, Some(tls_config(Some("ca.pem"))));
        assert!(success(
            tls_connect(b.addr, Some("client"), "agent-1").await
        ));
        let no_cert = tls_connect(b.addr, None, "agent-2").await;
        assert!(no_cert.is_err(), "{no_cert:?}");
        let other_ca = tls_connect(b.addr, Some("rogue"), "agent-3").await;
        assert!(other_ca.is_err(), "{other_ca:?}");
    }

    #[tokio::test]
    async fn mutual_tls_trusts_every_ca_in_the_file() {
        // bundle.pem: the other CA first, then ours (rumqttd read only the first).
        let b = start_broker(None, Some(tls_config(Some("bundle.pem"))));
        assert!(success(
            tls_connect(b.addr, Some("client"), "agent-1").await
        ));
        assert!(success(tls_connect(b.addr, Some("rogue"), "agent-2").await));
        assert!(tls_connect(b.addr, None, "agent-3").await.is_err());
    }

    #[tokio::test]
    async fn tls_without_capath_asks_for_no_client_certificate() {
        let b = start_broker(None, Some(tls_config(None)));
        assert!(success(tls_connect(b.addr, None, "agent-1").await));
    }

    #[tokio::test]
    async fn a_silent_client_does_not_stall_other_tls_handshakes() {
        let b = start_broker(None, Some(tls_config(Some("ca.pem"))));
        // Opens a socket and never sends a ClientHello (the handshake timeout, the
        // connection timeout, is 5 s).
        let _silent = TcpStream::connect(b.addr).unwrap();
        let started = Instant::now();
        assert!(success(
            tls_connect(b.addr, Some("client"), "agent-1").await
        ));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "handshake took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_bad_ca_file_is_an_error_of_server_start() {
        use crate::server::{LinkType, Server};
        for capath in ["does-not-exist.pem", "server.key"] {
            let (router_tx, _router_rx) = flume::bounded(10);
            let mut server = Server::new(
                server_settings(free_addr(), Some(tls_config(Some(capath)))),
                router_tx,
                V4,
            );
            let r = tokio::time::timeout(WAIT, server.start(LinkType::Remote)).await;
            assert!(matches!(r, Ok(Err(_))), "{capath}: {r:?}");
        }
    }
}

// ---------------------------------------------------------------- 1. exact filters

/// Subscribes `c` to `filter` (QoS 0) and waits for the SUBACK.
fn subscribed(c: &mut Client, pkid: u16, filter: &str) {
    c.send(subscribe(pkid, &[(filter, QoS::AtMostOnce)]));
    match c.expect("SUBACK") {
        Packet::SubAck(ack, _) => assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
            "{filter}"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[test]
fn exact_filters_get_their_topic_whenever_it_was_first_seen() {
    let mut b = start_broker(None, None);
    // A wildcard, so that a topic published before its exact subscriber exists is in
    // the router's topic -> filters map already.
    b.tx.subscribe("imn/v1/+/cmd").unwrap();
    b.tx.publish("imn/v1/early/cmd", "before").unwrap();
    assert_eq!(
        local_next(&mut b.rx, WAIT),
        pair("imn/v1/early/cmd", "before")
    );

    let mut early = Client::connected(b.addr, "early", None);
    subscribed(&mut early, 1, "imn/v1/early/cmd");
    let mut late = Client::connected(b.addr, "late", None);
    subscribed(&mut late, 1, "imn/v1/late/cmd");
    // A filter that is a prefix of a topic is not that topic.
    let mut prefix = Client::connected(b.addr, "prefix", None);
    subscribed(&mut prefix, 1, "imn/v1/early");

    for (topic, payload) in [
        ("imn/v1/other/cmd", "nobody's"),
        ("imn/v1/late/cmd", "to late"),
        ("imn/v1/early/cmd", "to early"),
    ] {
        b.tx.publish(topic, payload).unwrap();
        // The wildcard still gets every topic, in order.
        assert_eq!(local_next(&mut b.rx, WAIT), pair(topic, payload));
    }
    for (c, topic, payload) in [
        (&mut early, "imn/v1/early/cmd", "to early"),
        (&mut late, "imn/v1/late/cmd", "to late"),
    ] {
        let p = c.next_publish(WAIT).expect(topic);
        assert_eq!(
            (text(&p.topic), text(&p.payload)),
            (topic.into(), payload.into())
        );
    }
    for (name, c) in [
        ("early", &mut early),
        ("late", &mut late),
        ("prefix", &mut prefix),
    ] {
        if let Some(p) = c.next_publish(QUIET) {
            panic!("{name} got {}", text(&p.topic));
        }
    }
}

// ---------------------------------------------------------------- 9. open connections

/// Waits until `crate::open_connections()` is `n`.
fn open_connections_reach(n: usize, what: &str) {
    let deadline = Instant::now() + WAIT;
    while crate::open_connections() != n {
        assert!(
            Instant::now() < deadline,
            "{what}: open_connections() is {}, expected {n}",
            crate::open_connections()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn open_connections_counts_logged_in_network_clients() {
    // Alone: every other test's broker holds the read side.
    let _alone = CONNECTION_COUNT
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let b = launch(None, server_settings(free_addr(), None));
    // The other tests' clients are gone by now, and the local link is not counted.
    open_connections_reach(0, "local link only");

    // A socket that has not sent CONNECT is not counted, nor a refused CONNECT.
    let _silent = Client::open(b.addr);
    let (mut refused, ack) = Client::connect(b.addr, LOCAL_ID, None);
    assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
    assert!(refused.closed_within(WAIT));

    let a = Client::connected(b.addr, "agent-a", None);
    open_connections_reach(1, "one client");
    let c = Client::connected(b.addr, "agent-c", None);
    open_connections_reach(2, "two clients");
    std::thread::sleep(QUIET);
    assert_eq!(
        crate::open_connections(),
        2,
        "silent or refused one counted"
    );

    a.hang_up();
    open_connections_reach(1, "one left");
    // A client that just goes away (no FIN first: dropped) is not counted either.
    drop(c);
    open_connections_reach(0, "both left");
}

// ---------------------------------------------------------------- 10. handshake cap

#[test]
fn connections_past_the_handshake_cap_are_closed_at_once() {
    let _count = shared_count();
    let mut server = server_settings(free_addr(), None);
    server.connections.connection_timeout_ms = 2_000;
    server.max_pending_connections = Some(3);
    let b = launch(None, server);
    // The startup probe of `launch` held a permit until the broker read its EOF; a
    // client that completes CONNECT and hangs up comes after it.
    Client::connected(b.addr, "first", None).hang_up();

    let mut silent: Vec<Client> = (0..3).map(|_| Client::open(b.addr)).collect();
    let opened = Instant::now();
    let mut extra = Client::open(b.addr);
    assert!(
        extra.closed_within(Duration::from_millis(1_000)),
        "a connection past the cap was not closed at once"
    );
    assert!(opened.elapsed() < Duration::from_millis(1_000));
    // A real client is refused too while the cap is full...
    let mut refused = Client::open(b.addr);
    refused.send(Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: "refused".into(),
            clean_session: true,
        },
        None,
        None,
        None,
        None,
    ));
    assert!(matches!(refused.recv(WAIT), Recv::Closed));
    // ... while the silent ones are still open, until their connection timeout.
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            matches!(s.recv(Duration::from_millis(100)), Recv::Timeout),
            "silent connection {i} was closed before its timeout"
        );
    }
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            s.closed_within(WAIT),
            "silent connection {i} never timed out"
        );
    }
    // Their permits are back: a client connects.
    let _c = Client::connected(b.addr, "after", None);
}

// ---------------------------------------------------------------- 11. inbound byte cap

#[test]
fn a_client_over_its_byte_rate_is_slowed_and_others_still_flow() {
    const CAP: u64 = 200 * 1024;
    const PAYLOAD: usize = 10 * 1024;
    const RUN: Duration = Duration::from_secs(2);
    let mut b = start_broker_with(None, None, |c| c.max_inbound_bytes_per_s = Some(CAP));
    b.tx.subscribe("imn/v1/+/out").unwrap();

    let mut flood = Client::connected(b.addr, "flood", None);
    let mut other = Client::connected(b.addr, "other", None);
    let started = Instant::now();
    let flooder = std::thread::spawn(move || {
        let payload = "f".repeat(PAYLOAD);
        let mut buf = BytesMut::new();
        V4.write(
            publish("imn/v1/flood/out", &payload, QoS::AtMostOnce, 0, false),
            &mut buf,
        )
        .unwrap();
        // Writes block once the broker stops reading; the timeout ends the thread.
        flood
            .stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut sent = 0u64;
        while started.elapsed() < RUN {
            if flood.stream.write_all(&buf).is_ok() {
                sent += buf.len() as u64;
            }
        }
        (flood, sent)
    });
    // The other client publishes every 250 ms meanwhile.
    let sender = std::thread::spawn(move || {
        for i in 0..6u32 {
            std::thread::sleep(Duration::from_millis(250));
            other.send(publish(
                "imn/v1/other/out",
                &i.to_string(),
                QoS::AtMostOnce,
                0,
                false,
            ));
        }
        other
    });

    let mut flooded = 0u64;
    let mut others = Vec::new();
    while started.elapsed() < RUN + Duration::from_millis(500) {
        let Some((topic, payload)) = local_next(&mut b.rx, Duration::from_millis(50)) else {
            continue;
        };
        let at = started.elapsed();
        match topic.as_str() {
            "imn/v1/flood/out" if at <= RUN => flooded += (topic.len() + payload.len()) as u64,
            "imn/v1/flood/out" => {}
            "imn/v1/other/out" => others.push((payload, at)),
            _ => panic!("unexpected topic {topic}"),
        }
    }
    let (_flood, sent) = flooder.join().unwrap();
    let _other = sender.join().unwrap();
    // The broker would read what the socket buffers hold at the capped rate for many
    // seconds after a hang-up, and count the connection meanwhile (see
    // `open_connections_counts_logged_in_network_clients`): cut it now.
    b.tx.disconnect_client("flood").unwrap();

    // A second's burst plus two seconds at the cap, about 3 * CAP; without the cap
    // loopback carries hundreds of times that.
    assert!(
        flooded >= CAP,
        "the capped client was stopped: {flooded} bytes"
    );
    assert!(
        flooded <= 4 * CAP,
        "the capped client got {flooded} bytes through in {RUN:?} (cap {CAP}/s)"
    );
    assert!(
        sent > flooded,
        "the flooder did not try to send more than it got through"
    );
    let payloads: Vec<&str> = others.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(payloads, ["0", "1", "2", "3", "4", "5"], "{others:?}");
    for (i, (_, at)) in others.iter().enumerate() {
        // Published at (i + 1) * 250 ms; through in well under a second.
        let due = Duration::from_millis(250 * (i as u64 + 1)) + Duration::from_millis(750);
        assert!(
            *at < due,
            "message {i} of the other client arrived at {at:?}"
        );
    }
}

// ---------------------------------------------------------------- 12. TCP_NODELAY, backlog

/// The broker's own socket for the client connected from `client`: found among this
/// process's file descriptors (the broker runs in it) by its address and its peer's.
fn accepted_socket(broker: SocketAddr, client: SocketAddr) -> Option<TcpStream> {
    use std::os::fd::BorrowedFd;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: only duplicated (F_DUPFD_CLOEXEC); an fd closed meanwhile makes that
        // fail with EBADF, and one reused is only looked at. The copy is closed on drop.
        let Ok(owned) = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() else {
            continue;
        };
        let s = TcpStream::from(owned);
        if s.local_addr().ok() == Some(broker) && s.peer_addr().ok() == Some(client) {
            return Some(s);
        }
    }
    None
}

#[test]
fn accepted_sockets_have_tcp_nodelay() {
    if std::fs::metadata("/proc/self/fd").is_err() {
        eprintln!("no /proc/self/fd: skipped");
        return;
    }
    let b = start_broker(None, None);
    let c = Client::connected(b.addr, "agent-n", None);
    let ours = c.stream.local_addr().unwrap();
    let theirs = accepted_socket(b.addr, ours).expect("the broker's socket for our client");
    assert!(
        theirs.nodelay().unwrap(),
        "TCP_NODELAY is off on the accepted socket"
    );
    // Our side is the client's, not the broker's: it keeps the default.
    assert!(!c.stream.nodelay().unwrap());
}

/// The listen backlog is not in /proc/net/tcp; `ss` shows it (Send-Q of a listening
/// socket, read through inet_diag). Skipped without `ss`.
#[test]
fn the_listener_has_a_large_backlog() {
    let b = start_broker(None, None);
    let out = match std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", b.addr.port())])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("no ss: skipped");
            return;
        }
    };
    // "LISTEN 0 4096 127.0.0.1:port 0.0.0.0:*": state, Recv-Q, Send-Q (the backlog).
    let backlog: u32 = out
        .split_whitespace()
        .nth(2)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ss output: {out:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX);
    assert_eq!(
        backlog,
        crate::server::LISTEN_BACKLOG.min(somaxconn),
        "ss: {out:?}"
    );
    if somaxconn <= 1024 {
        eprintln!(
            "net.core.somaxconn is {somaxconn}: the backlog cannot exceed tokio's 1,024 here"
        );
    }
}
