//! The measurement policy where the packet leaves (issue 23): every module that sends
//! packets checks each address it is about to send to against the run's policy, after
//! its own name resolution and after every redirect, before the first packet.
//!
//! Real peers on loopback, no mocks. Most tests use the rule "lab": allow 127.0.0.0/8,
//! deny 127.0.0.1/32. For each module a peer on 127.0.0.1 records every connection or
//! datagram that reaches it and must see none, while the same run aimed at 127.0.0.2
//! works and reaches its peer: each test fails if a check is missing, and if it refuses
//! too much. ICMP and raw-socket probes (ping, traceroute, mtr) are watched with a raw
//! socket, which on loopback gets a copy of every packet sent (see `Sniffer`); that
//! needs root, as CI has.
//!
//! All traffic stays on 127.0.0.0/8 and ::1.
#![cfg(all(
    feature = "dns",
    feature = "http",
    feature = "traceroute",
    feature = "ntp"
))]

use std::convert::Infallible;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use imn_probes::{resolver, run, Context};
use imn_proto::kinds::dns::{DnsResult, ServerSource};
use imn_proto::kinds::http::{HttpPhase, HttpResult, TlsCertResult};
use imn_proto::kinds::ntp::NtpResult;
use imn_proto::kinds::traceroute::{MtrResult, TracerouteResult};
use imn_proto::policy::{Cidr, Rule, TargetPolicy};
use imn_proto::results::{ModuleOutput, PingOutput, TcpingResult};
use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

const DENIED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

// ---------------------------------------------------------------------------------
// Policies and runs

fn rule(name: &str, allow: &[&str], deny: &[&str]) -> Rule {
    let nets = |l: &[&str]| l.iter().map(|n| Cidr::parse(n).unwrap()).collect();
    Rule {
        name: name.into(),
        allow: nets(allow),
        deny: nets(deny),
    }
}

fn with_policy(rules: Vec<Rule>, builtin: bool) -> Context {
    Context {
        policy: Arc::new(TargetPolicy { rules, builtin }),
        ..Context::default()
    }
}

/// Loopback may be measured, but not 127.0.0.1.
fn lab() -> Context {
    with_policy(
        vec![rule("lab", &["127.0.0.0/8"], &["127.0.0.1/32"])],
        false,
    )
}

/// No rules: every address passes.
fn open() -> Context {
    Context::default()
}

async fn measure(module: &str, params: &Value, ctx: &Context) -> ModuleOutput {
    run(module, &params.to_string(), ctx)
        .await
        .unwrap_or_else(|e| panic!("{module} {params}: {e}"))
}

/// Runs a module the policy must refuse; returns its error, which must name `rule`.
async fn refused(module: &str, params: &Value, ctx: &Context, rule: &str) -> String {
    match run(module, &params.to_string(), ctx).await {
        Err(e) => {
            assert!(
                e.starts_with(&format!("policy_denied: {rule}: ")),
                "{module} {params}: {e}"
            );
            e
        }
        Ok(out) => panic!("{module} {params} ran under a policy that refuses it: {out:?}"),
    }
}

async fn http(params: &Value, ctx: &Context) -> HttpResult {
    match measure("http", params, ctx).await {
        ModuleOutput::Http(r) => *r,
        other => panic!("{other:?}"),
    }
}

/// The status of an http run that got a response without error.
fn ok_status(r: &HttpResult) -> u16 {
    assert!(r.error.is_none(), "{r:?}");
    r.response.as_ref().map_or(0, |x| x.status)
}

async fn dns(params: &Value, ctx: &Context) -> DnsResult {
    match measure("dns", params, ctx).await {
        ModuleOutput::Dns(r) => *r,
        other => panic!("{other:?}"),
    }
}

/// The A records of an answer, as text.
fn a_records(r: &DnsResult) -> Vec<String> {
    assert!(r.error.is_none(), "{:?}", r.error);
    r.message()
        .unwrap()
        .answer
        .iter()
        .filter(|a| a.rtype == "A")
        .map(|a| a.rdata.clone())
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (raw sockets); run the tests as root, as CI does"
    );
}

// ---------------------------------------------------------------------------------
// Peers that record what reaches them

/// A TCP listener that counts the connections it accepts.
struct Peer {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
}

impl Peer {
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far, once `want` have come (within 3 s) or, for 0, after
    /// a moment for a late one.
    async fn connections(&self, want: usize) -> usize {
        let wait = Duration::from_millis(if want == 0 { 200 } else { 3000 });
        let t0 = Instant::now();
        loop {
            let n = self.conns.load(Ordering::SeqCst);
            if (want > 0 && n >= want) || t0.elapsed() > wait {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Counts connections on `listener` and closes each at once.
fn tcp_peer_on(listener: TcpListener) -> Peer {
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    Peer { addr, conns }
}

async fn tcp_peer(bind: &str) -> Peer {
    tcp_peer_on(TcpListener::bind(bind).await.unwrap())
}

/// An HTTP/1.1 server that counts its connections: a path in `redirects` answers 302
/// with that Location, any other 200 "hello".
async fn http_peer(bind: &str, redirects: Vec<(&'static str, String)>) -> Peer {
    let listener = TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {bind}: {e}"));
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let (count, redirects) = (conns.clone(), Arc::new(redirects));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let redirects = redirects.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let to = redirects
                    .iter()
                    .find(|(path, _)| *path == req.uri().path())
                    .map(|(_, location)| location.clone());
                async move {
                    let b = Response::builder();
                    let resp = match to {
                        Some(l) => b
                            .status(302)
                            .header("location", l)
                            .body(Full::new(Bytes::new())),
                        None => b.body(Full::new(Bytes::from_static(b"hello"))),
                    };
                    Ok::<_, Infallible>(resp.unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Peer { addr, conns }
}

/// A UDP socket that records the datagrams it gets, and answers none.
struct UdpRecorder(StdUdp);

impl UdpRecorder {
    fn bind(addr: &str) -> UdpRecorder {
        UdpRecorder(StdUdp::bind(addr).unwrap())
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    /// Datagrams received so far (waiting a moment for a late one).
    fn received(&self) -> usize {
        self.0
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while self.0.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// A UDP recorder and a counting TCP listener on the same port of 127.0.0.1.
async fn udp_and_tcp_on_denied() -> (UdpRecorder, Peer) {
    loop {
        let udp = UdpRecorder::bind("127.0.0.1:0");
        if let Ok(l) = TcpListener::bind(("127.0.0.1", udp.port())).await {
            return (udp, tcp_peer_on(l));
        }
    }
}

/// Seconds since 1900 as an NTP timestamp.
fn ntp_now() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    ((d.as_secs() + 2_208_988_800) << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// A stratum-2 NTP server on `bind` that answers every request with our clock.
fn ntp_responder(bind: &str) -> u16 {
    let sock = StdUdp::bind(bind).unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut req = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut req) {
            if n < 48 {
                continue;
            }
            let mut reply = [0u8; 48];
            reply[0] = (4 << 3) | 4; // no leap warning, version 4, server
            reply[1] = 2;
            reply[2] = 6;
            reply[3] = (-23i8) as u8;
            reply[12..16].copy_from_slice(&[127, 0, 0, 53]);
            let now = ntp_now().to_be_bytes();
            reply[16..24].copy_from_slice(&now);
            // The origin echoes the request's transmit timestamp.
            reply[24..32].copy_from_slice(&req[40..48]);
            reply[32..40].copy_from_slice(&now);
            reply[40..48].copy_from_slice(&ntp_now().to_be_bytes());
            let _ = sock.send_to(&reply, from);
        }
    });
    port
}

/// A dnsmasq on `addr` (a free port) answering for the test names; killed when
/// dropped. evil.test is 127.0.0.1 (refused by "lab"), good.test 127.0.0.2.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dnsmasq(addr: Ipv4Addr) -> Dnsmasq {
    for _ in 0..5 {
        let port = loop {
            let u = StdUdp::bind((addr, 0)).unwrap();
            let port = u.local_addr().unwrap().port();
            if std::net::TcpListener::bind((addr, port)).is_ok() {
                break port;
            }
        };
        let mut args: Vec<String> = [
            "-k",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-facility=-",
            "--host-record=evil.test,127.0.0.1",
            "--host-record=good.test,127.0.0.2",
            "--host-record=a.test,192.0.2.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={addr}"));
        args.push(format!("--port={port}"));
        if is_root() {
            args.push("--user=root".into());
        }
        let child = Command::new("dnsmasq")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base) must be installed");
        let mut d = Dnsmasq { child, port };
        if dnsmasq_ready(&mut d, addr) {
            return d;
        }
    }
    panic!("dnsmasq did not start on {addr}");
}

/// Asks for a.test until dnsmasq answers.
fn dnsmasq_ready(d: &mut Dnsmasq, addr: Ipv4Addr) -> bool {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01";
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = d.child.try_wait() {
            return false; // exited: the port was taken
        }
        let _ = sock.send_to(q, (addr, d.port));
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            if n > 2 && buf[..2] == [0x12, 0x34] {
                return true;
            }
        }
    }
    false
}

/// The agent's configured name servers for the life of the guard (they are
/// process-wide: only one test function of this file sets them).
struct NameServers;

impl NameServers {
    fn set(ns: SocketAddr) -> NameServers {
        resolver::set_nameservers(vec![ns]);
        NameServers
    }
}

impl Drop for NameServers {
    fn drop(&mut self) {
        resolver::set_nameservers(Vec::new());
    }
}

/// Copies of the IPv4 packets of one protocol that reach this host's stack while it
/// runs. A raw socket gets every incoming packet of its protocol before the protocol's
/// own handler (and whether or not a socket wants it); on loopback every packet sent
/// is received, so this sees every probe a run sends to 127.0.0.0/8, its IP header
/// included. Other processes' packets are seen too: the tests pick out their own by
/// what is unique to the run (a payload size, a session token, a port).
struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Packet>>,
}

struct Packet {
    dst: Ipv4Addr,
    /// What follows the IP header.
    payload: Vec<u8>,
}

impl Sniffer {
    fn start(proto: libc::c_int) -> Sniffer {
        require_root("watching the probes");
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(proto)))
            .unwrap_or_else(|e| panic!("cannot open a raw socket (protocol {proto}): {e}"));
        let _ = sock.set_recv_buffer_size(4 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The socket is open before the run starts: every packet from now on is queued.
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                match (&sock).read(&mut buf) {
                    Ok(n) => seen.extend(parse_v4(&buf[..n])),
                    // Nothing for 20 ms: done if asked to stop (the queue is drained).
                    Err(_) if flag.load(Ordering::SeqCst) => break,
                    Err(_) => {}
                }
            }
            seen
        });
        Sniffer { stop, thread }
    }

    /// Everything seen, a moment after the run.
    fn stop(self) -> Vec<Packet> {
        std::thread::sleep(Duration::from_millis(100));
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn parse_v4(p: &[u8]) -> Option<Packet> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let dst = Ipv4Addr::new(*p.get(16)?, *p.get(17)?, *p.get(18)?, *p.get(19)?);
    Some(Packet {
        dst,
        payload: p.get(ihl..)?.to_vec(),
    })
}

/// Session tokens of the ICMP echo requests to `dst` with `size` bytes of payload (the
/// ping engine ends the payload with the run's token and the probe's index).
fn echo_tokens(seen: &[Packet], dst: Ipv4Addr, size: usize) -> Vec<u32> {
    seen.iter()
        .filter(|p| p.dst == dst && p.payload.len() == 8 + size && p.payload[0] == 8)
        .map(|p| {
            let t = &p.payload[8 + size - 8..8 + size - 4];
            u32::from_be_bytes([t[0], t[1], t[2], t[3]])
        })
        .collect()
}

/// ICMP echo requests to `dst` with `size` bytes of payload (traceroute's probes).
fn echo_requests(seen: &[Packet], dst: Ipv4Addr, size: usize) -> usize {
    seen.iter()
        .filter(|p| p.dst == dst && p.payload.len() == 8 + size && p.payload[0] == 8)
        .count()
}

/// UDP datagrams to `dst`:`port`.
fn udp_datagrams(seen: &[Packet], dst: Ipv4Addr, port: u16) -> usize {
    seen.iter()
        .filter(|p| p.dst == dst && p.payload.get(2..4) == Some(&port.to_be_bytes()[..]))
        .count()
}

// ---------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn http_never_connects_to_a_refused_address() {
    let denied = http_peer("127.0.0.1:0", vec![]).await;
    let allowed = http_peer("127.0.0.2:0", vec![]).await;
    let to_denied = format!("http://127.0.0.1:{}/", denied.port());
    let jump = http_peer(
        "127.0.0.2:0",
        vec![
            ("/to-denied", to_denied.clone()),
            (
                "/to-allowed",
                format!("http://127.0.0.2:{}/", allowed.port()),
            ),
        ],
    )
    .await;

    // The URL's address.
    let e = refused("http", &json!({ "url": to_denied }), &lab(), "lab.deny").await;
    assert!(e.contains("127.0.0.1"), "{e}");
    // An allowed-looking URL sent to a refused address by `resolve`.
    let url = format!("http://127.0.0.2:{}/", denied.port());
    let e = refused(
        "http",
        &json!({ "url": url, "resolve": "127.0.0.1" }),
        &lab(),
        "lab.deny",
    )
    .await;
    assert!(e.contains("(target \"127.0.0.2\")"), "{e}");
    // A redirect from an allowed server to a refused address: the first hop is made,
    // the second is not, and the error says which hop.
    let jump_url = |path: &str| format!("http://127.0.0.2:{}{path}", jump.port());
    let e = refused(
        "http",
        &json!({ "url": jump_url("/to-denied"), "follow_redirects": true }),
        &lab(),
        "lab.deny",
    )
    .await;
    assert!(
        e.contains(&format!("at redirect 1 (to {to_denied})")),
        "{e}"
    );
    assert_eq!(jump.connections(1).await, 1);
    assert_eq!(
        denied.connections(0).await,
        0,
        "a refused address was connected to"
    );

    // The same runs aimed at allowed addresses work.
    let r = http(
        &json!({ "url": format!("http://127.0.0.2:{}/", allowed.port()) }),
        &lab(),
    )
    .await;
    assert_eq!(ok_status(&r), 200);
    assert_eq!(r.addr.as_deref(), Some("127.0.0.2"));
    let r = http(
        &json!({ "url": jump_url("/to-allowed"), "follow_redirects": true }),
        &lab(),
    )
    .await;
    assert_eq!(ok_status(&r), 200);
    assert_eq!(r.redirects.len(), 1);
    assert_eq!(allowed.connections(2).await, 2);
    // Without the rule, the refused runs reach the peer that recorded nothing.
    let r = http(
        &json!({ "url": jump_url("/to-denied"), "follow_redirects": true }),
        &open(),
    )
    .await;
    assert_eq!((ok_status(&r), r.addr.as_deref()), (200, Some("127.0.0.1")));
    assert_eq!(denied.connections(1).await, 1);
}

#[tokio::test]
async fn http_to_ipv6_loopback_is_refused_by_a_rule_on_it() {
    let peer = http_peer("[::1]:0", vec![]).await;
    let url = json!({ "url": format!("http://[::1]:{}/", peer.port()) });
    let no_v6_loopback = with_policy(vec![rule("lab6", &[], &["::1/128"])], false);
    refused("http", &url, &no_v6_loopback, "lab6.deny").await;
    assert_eq!(peer.connections(0).await, 0);
    // A rule on IPv4 only lets it through.
    let r = http(
        &url,
        &with_policy(vec![rule("v4", &[], &["127.0.0.0/8"])], false),
    )
    .await;
    assert_eq!((ok_status(&r), r.addr.as_deref()), (200, Some("::1")));
    assert_eq!(peer.connections(1).await, 1);
}

#[tokio::test]
async fn the_builtin_rule_refuses_loopback_unless_a_rule_opens_it() {
    let denied = http_peer("127.0.0.1:0", vec![]).await;
    let allowed = http_peer("127.0.0.2:0", vec![]).await;
    let builtin = with_policy(vec![], true);
    let e = refused(
        "http",
        &json!({ "url": format!("http://127.0.0.1:{}/", denied.port()) }),
        &builtin,
        "builtin.deny",
    )
    .await;
    assert!(e.contains("loopback"), "{e}");
    assert_eq!(denied.connections(0).await, 0);
    let opened = with_policy(vec![rule("lab", &["127.0.0.0/8"], &[])], true);
    let r = http(
        &json!({ "url": format!("http://127.0.0.2:{}/", allowed.port()) }),
        &opened,
    )
    .await;
    assert_eq!(ok_status(&r), 200);
    assert_eq!(allowed.connections(1).await, 1);
}

#[tokio::test]
async fn tls_cert_and_tcping_never_connect_to_a_refused_address() {
    let denied = tcp_peer("127.0.0.1:0").await;
    let allowed = tcp_peer("127.0.0.2:0").await;
    let tls = |host: &str, port: u16| json!({ "host": host, "port": port, "timeout_ms": 2000 });
    refused(
        "tls_cert",
        &tls("127.0.0.1", denied.port()),
        &lab(),
        "lab.deny",
    )
    .await;
    // An IPv4-mapped address is the same address.
    refused(
        "tls_cert",
        &tls("::ffff:127.0.0.1", denied.port()),
        &lab(),
        "lab.deny",
    )
    .await;
    let ping = |host: &str, port: u16| json!({ "host": host, "port": port, "count": 2, "interval_ms": 10, "timeout_ms": 1000 });
    refused(
        "tcping",
        &ping("127.0.0.1", denied.port()),
        &lab(),
        "lab.deny",
    )
    .await;
    assert_eq!(
        denied.connections(0).await,
        0,
        "a refused address was connected to"
    );

    // The peer closes at once: the handshake fails, after the connection was made.
    let r: TlsCertResult =
        match measure("tls_cert", &tls("127.0.0.2", allowed.port()), &lab()).await {
            ModuleOutput::TlsCert(r) => *r,
            other => panic!("{other:?}"),
        };
    assert_eq!(r.addr.as_deref(), Some("127.0.0.2"));
    assert_eq!(r.error_phase, Some(HttpPhase::Tls), "{r:?}");
    let r: TcpingResult = match measure("tcping", &ping("127.0.0.2", allowed.port()), &lab()).await
    {
        ModuleOutput::Tcping(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.sent, r.open), (2, 2), "{r:?}");
    assert_eq!(allowed.connections(3).await, 3);
    // Without the rule, the refused runs reach the peer.
    measure("tcping", &ping("127.0.0.1", denied.port()), &open()).await;
    assert_eq!(denied.connections(2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_never_queries_a_refused_server() {
    let (udp, tcp) = udp_and_tcp_on_denied().await;
    let server = dnsmasq(ALLOWED);
    let ask = |server: String, protocol: &str| json!({ "name": "a.test", "server": server, "protocol": protocol, "timeout_ms": 1000 });
    for protocol in ["udp", "tcp"] {
        let at = format!("127.0.0.1:{}", udp.port());
        refused("dns", &ask(at, protocol), &lab(), "lab.deny").await;
        let mapped = format!("[::ffff:127.0.0.1]:{}", udp.port());
        refused("dns", &ask(mapped, protocol), &lab(), "lab.deny").await;
    }
    assert_eq!(udp.received(), 0, "a refused server got a UDP query");
    assert_eq!(
        tcp.connections(0).await,
        0,
        "a refused server got a TCP query"
    );

    for protocol in ["udp", "tcp"] {
        let r = dns(&ask(format!("127.0.0.2:{}", server.port), protocol), &lab()).await;
        assert_eq!(a_records(&r), ["192.0.2.1"], "{protocol}");
        assert_eq!(r.server, "127.0.0.2");
    }
    // Without the rule, the refused queries reach the recorders.
    for protocol in ["udp", "tcp"] {
        let at = format!("127.0.0.1:{}", udp.port());
        measure("dns", &ask(at, protocol), &open()).await;
    }
    assert!(udp.received() >= 1);
    assert_eq!(tcp.connections(1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntp_never_sends_to_a_refused_server() {
    let denied = UdpRecorder::bind("127.0.0.1:0");
    let allowed = ntp_responder("127.0.0.2:0");
    let ask = |host: &str, port: u16| json!({ "host": host, "port": port, "packets": 1, "timeout_ms": 1000 });
    refused("ntp", &ask("127.0.0.1", denied.port()), &lab(), "lab.deny").await;
    assert_eq!(denied.received(), 0, "a refused server got an NTP request");
    let r: NtpResult = match measure("ntp", &ask("127.0.0.2", allowed), &lab()).await {
        ModuleOutput::Ntp(r) => *r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.sent, r.received), (1, 1), "{r:?}");
    // Without the rule, the refused run reaches the recorder.
    measure("ntp", &ask("127.0.0.1", denied.port()), &open()).await;
    assert_eq!(denied.received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_probes_allowed_targets_and_reports_refused_ones() {
    require_root("the ping test");
    // A payload size no other test uses, to tell this run's probes from others'.
    const SIZE: usize = 61;
    let targets = json!({
        "targets": ["127.0.0.2", "127.0.0.1", "localhost"],
        "count": 3, "interval_ms": 20, "timeout_ms": 1000, "size": SIZE
    });
    let ping = |out: ModuleOutput| match out {
        ModuleOutput::Ping(o) => o,
        other => panic!("{other:?}"),
    };
    let sniffer = Sniffer::start(libc::IPPROTO_ICMP);
    let out: PingOutput = ping(measure("ping_module", &targets, &lab()).await);
    let seen = sniffer.stop();
    let [ok, no, by_name] = &out.targets[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (ok.addr.as_str(), ok.sent, ok.received),
        ("127.0.0.2", 3, 3)
    );
    assert!(ok.error.is_none(), "{ok:?}");
    assert_eq!(
        (no.addr.as_str(), no.sent, no.received),
        ("127.0.0.1", 0, 0)
    );
    assert!(no.rtts_ms.is_empty());
    let e = no.error.as_deref().unwrap_or_default();
    assert!(e.starts_with("policy_denied: lab.deny: "), "{no:?}");
    // localhost resolves to 127.0.0.1 or ::1 (outside the allow list): refused either way,
    // after resolution, naming the host.
    let e = by_name.error.as_deref().unwrap_or_default();
    assert!(e.starts_with("policy_denied: lab."), "{by_name:?}");
    assert!(e.contains("(target \"localhost\")"), "{e}");
    assert_eq!(by_name.sent, 0);
    // Our run's probes are seen (three, with one token), and none of them went to
    // 127.0.0.1.
    let ours = echo_tokens(&seen, ALLOWED, SIZE);
    assert_eq!(ours.len(), 3, "the watcher did not see the run's probes");
    let leaked = echo_tokens(&seen, DENIED, SIZE)
        .into_iter()
        .filter(|t| ours.contains(t))
        .count();
    assert_eq!(leaked, 0, "echo requests went to a refused target");

    // Every target refused: still a result, with nothing sent.
    let out = ping(measure("ping_module", &json!({"host": "127.0.0.1"}), &lab()).await);
    assert_eq!(out.targets[0].sent, 0);
    assert!(out.targets[0]
        .error
        .as_deref()
        .unwrap_or_default()
        .starts_with("policy_denied: lab.deny: "));

    // Without the rule the same run probes 127.0.0.1, and the watcher sees it.
    let sniffer = Sniffer::start(libc::IPPROTO_ICMP);
    let out = ping(measure("ping_module", &targets, &open()).await);
    let seen = sniffer.stop();
    assert_eq!((out.targets[1].sent, out.targets[1].received), (3, 3));
    let ours = echo_tokens(&seen, ALLOWED, SIZE);
    let to_denied = echo_tokens(&seen, DENIED, SIZE)
        .into_iter()
        .filter(|t| ours.contains(t))
        .count();
    // localhost too, when it resolved to 127.0.0.1.
    let probed = out.targets.iter().filter(|t| t.addr == "127.0.0.1").count();
    assert_eq!(to_denied, 3 * probed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceroute_and_mtr_never_probe_a_refused_destination() {
    require_root("the traceroute test");
    // A probe size no other test uses, to tell this run's ICMP probes from others'; a
    // UDP port bound on 127.0.0.1 for the UDP ones (127.0.0.2 answers port unreachable).
    const SIZE: usize = 73;
    let recorder = UdpRecorder::bind("127.0.0.1:0");
    let port = recorder.port();
    let trace = |host: &str, protocol: &str| {
        let mut p = json!({ "host": host, "protocol": protocol, "size": SIZE,
                            "max_ttl": 2, "probes": 1, "timeout_ms": 300 });
        if protocol == "udp" {
            p["port"] = port.into();
        }
        p
    };
    let mtr = |host: &str| {
        json!({ "host": host, "size": SIZE, "max_ttl": 2, "probes": 1, "timeout_ms": 300,
                "count": 2, "interval_ms": 10 })
    };
    let icmp = Sniffer::start(libc::IPPROTO_ICMP);
    let udp = Sniffer::start(libc::IPPROTO_UDP);
    for protocol in ["icmp", "udp"] {
        refused(
            "traceroute",
            &trace("127.0.0.1", protocol),
            &lab(),
            "lab.deny",
        )
        .await;
    }
    refused("mtr", &mtr("127.0.0.1"), &lab(), "lab.deny").await;
    for protocol in ["icmp", "udp"] {
        match measure("traceroute", &trace("127.0.0.2", protocol), &lab()).await {
            ModuleOutput::Traceroute(r) => {
                let r: TracerouteResult = *r;
                assert!(r.destination_reached, "{protocol}: {r:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    match measure("mtr", &mtr("127.0.0.2"), &lab()).await {
        ModuleOutput::Mtr(r) => {
            let r: MtrResult = *r;
            assert!(r.destination_reached && r.rounds == 2, "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    let (icmp_seen, udp_seen) = (icmp.stop(), udp.stop());
    assert_eq!(
        echo_requests(&icmp_seen, DENIED, SIZE),
        0,
        "ICMP probes to 127.0.0.1"
    );
    assert_eq!(
        udp_datagrams(&udp_seen, DENIED, port),
        0,
        "UDP probes to 127.0.0.1"
    );
    assert_eq!(recorder.received(), 0);
    // The watchers saw the allowed runs: one ICMP trace and two mtr rounds, one UDP
    // trace.
    assert!(echo_requests(&icmp_seen, ALLOWED, SIZE) >= 3);
    assert!(udp_datagrams(&udp_seen, ALLOWED, port) >= 1);

    // Without the rule the same traces probe 127.0.0.1, and the watchers see them.
    let icmp = Sniffer::start(libc::IPPROTO_ICMP);
    let udp = Sniffer::start(libc::IPPROTO_UDP);
    for protocol in ["icmp", "udp"] {
        measure("traceroute", &trace("127.0.0.1", protocol), &open()).await;
    }
    assert!(echo_requests(&icmp.stop(), DENIED, SIZE) >= 1);
    assert!(udp_datagrams(&udp.stop(), DENIED, port) >= 1);
    assert!(recorder.received() >= 1);
}

/// Names resolved by the agent (redirect targets, a dns `server`, a tcping host) are
/// checked after resolution; the agent's own name server, at an address the policy
/// refuses, is not a target and keeps working. The only test here that sets the
/// process-wide name servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_agent_resolves_are_checked_after_resolution() {
    let ns = dnsmasq(DENIED);
    let _ns = NameServers::set(SocketAddr::new(DENIED.into(), ns.port));
    let denied = http_peer("127.0.0.1:0", vec![]).await;
    let allowed = http_peer("127.0.0.2:0", vec![]).await;
    let evil = format!("http://evil.test:{}/", denied.port());
    let jump = http_peer(
        "127.0.0.2:0",
        vec![
            ("/to-evil", evil.clone()),
            ("/to-good", format!("http://good.test:{}/", allowed.port())),
        ],
    )
    .await;
    let jump_url = |path: &str| format!("http://127.0.0.2:{}{path}", jump.port());

    let e = refused(
        "http",
        &json!({ "url": jump_url("/to-evil"), "follow_redirects": true }),
        &lab(),
        "lab.deny",
    )
    .await;
    assert!(e.contains("(target \"evil.test\")"), "{e}");
    assert!(e.contains(&format!("at redirect 1 (to {evil})")), "{e}");
    refused("http", &json!({ "url": evil }), &lab(), "lab.deny").await;
    let e = refused(
        "tcping",
        &json!({ "host": "evil.test", "port": denied.port(), "count": 1 }),
        &lab(),
        "lab.deny",
    )
    .await;
    assert!(e.contains("(target \"evil.test\")"), "{e}");
    assert_eq!(
        denied.connections(0).await,
        0,
        "a refused address was connected to"
    );

    let recorder = UdpRecorder::bind("127.0.0.1:0");
    let e = refused(
        "dns",
        &json!({ "name": "a.test", "server": format!("evil.test:{}", recorder.port()) }),
        &lab(),
        "lab.deny",
    )
    .await;
    assert!(e.contains("(target \"evil.test\")"), "{e}");
    assert_eq!(recorder.received(), 0, "a refused server got a query");

    // The same through names that resolve to an allowed address.
    let r = http(
        &json!({ "url": jump_url("/to-good"), "follow_redirects": true }),
        &lab(),
    )
    .await;
    assert_eq!((ok_status(&r), r.addr.as_deref()), (200, Some("127.0.0.2")));
    assert_eq!(r.redirects.len(), 1);
    assert_eq!(allowed.connections(1).await, 1);
    // No `server`: the configured name server, on a refused address, answers.
    let r = dns(&json!({ "name": "good.test" }), &lab()).await;
    assert_eq!(r.server_source, ServerSource::System);
    assert_eq!((r.server.as_str(), r.port), ("127.0.0.1", ns.port));
    assert_eq!(a_records(&r), ["127.0.0.2"]);
}
