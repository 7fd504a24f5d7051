//! Helpers of the wire-compatibility suite (`tests/tests/wire_compat.rs`): a tap on the
//! bridge's MQTT broker that keeps every message between agents and the cloud as
//! bytes, the split deployment (nats-server, `imn-backend`, `imn-bridge`) with a
//! bridge that can be killed and started again, small loopback peers (HTTP with
//! redirects and broken answers, a silent UDP port and a DNS responder whose answers are cut short, an open TCP port, DNS
//! records in wire format for dnsmasq), and the writer of the golden files that
//! `modules/tests/wire_golden.rs` checks.
//!
//! Everything listens on 127.0.0.1 and talks to 127.0.0.0/8 only.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imn_proto::wire::{self, Envelope};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;

use crate::{bin, free_port, wait_for, Api, Nats, Proc};

// ---------------------------------------------------------------------------------
// The MQTT tap.

/// One message the tap saw: its topic and its payload as it crossed the broker.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub topic: String,
    pub payload: Vec<u8>,
    /// A retained copy delivered on subscribe (its bytes were also seen live).
    pub retained: bool,
}

/// An MQTT client subscribed to `imn/v1/+/+` on the bridge's broker: it sees every
/// uplink message (hello, heartbeat, batches, status, the broker's copy of a last
/// will) and every downlink one (commands, acks) exactly as the agent sends or gets
/// them. Without `--auth` the broker has no topic ACL, so it may subscribe to them.
pub struct MqttTap {
    seen: Arc<Mutex<Vec<Tapped>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttTap {
    /// Connects to `127.0.0.1:port` and returns once the subscription is acked.
    pub async fn start(port: u16) -> MqttTap {
        let id = format!("wire-tap-{}", std::process::id());
        let mut mo = MqttOptions::new(id, "127.0.0.1", port);
        mo.set_max_packet_size(8 << 20, 1 << 16);
        mo.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(mo, 256);
        let seen: Arc<Mutex<Vec<Tapped>>> = Arc::default();
        let subscribed = Arc::new(AtomicBool::new(false));
        let (seen2, subscribed2) = (seen.clone(), subscribed.clone());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("imn/v1/+/+", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed2.store(true, Ordering::SeqCst)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => seen2.lock().unwrap().push(Tapped {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    }),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let s = subscribed.clone();
        wait_for("the MQTT tap to subscribe", Duration::from_secs(20), || {
            let s = s.clone();
            async move { s.load(Ordering::SeqCst).then_some(()) }
        })
        .await;
        MqttTap { seen, task }
    }

    /// Everything seen so far, in the order it arrived.
    pub fn messages(&self) -> Vec<Tapped> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MqttTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------
// The split deployment.

/// nats-server, `imn-backend` and `imn-bridge` as separate processes (as in
/// production), on free loopback ports. The backend keeps its SQLite store in
/// `backend_data`; the bridge can be killed and started again.
pub struct Stack {
    pub nats: Nats,
    pub backend: Option<Proc>,
    pub bridge: Option<Proc>,
    pub api: Api,
    pub http_port: u16,
    pub mqtt_port: u16,
    log_dir: PathBuf,
    backend_args: Vec<String>,
}

impl Stack {
    /// Starts the three, logs in `log_dir`, and waits for the API. `backend_extra`
    /// are further `imn-backend` flags (`--policy FILE`, ...).
    pub async fn start(log_dir: &Path, backend_data: &Path, backend_extra: &[&str]) -> Stack {
        let nats = Nats::start(log_dir).await;
        let http_port = free_port();
        let mqtt_port = free_port();
        let mut backend_args: Vec<String> = vec![
            "--http".into(),
            format!("127.0.0.1:{http_port}"),
            "--nats".into(),
            nats.url(),
            "--data".into(),
            backend_data.to_str().expect("utf-8 path").into(),
        ];
        backend_args.extend(backend_extra.iter().map(|s| s.to_string()));
        let mut s = Stack {
            nats,
            backend: None,
            bridge: None,
            api: Api::new(http_port),
            http_port,
            mqtt_port,
            log_dir: log_dir.to_path_buf(),
            backend_args,
        };
        s.start_backend().await;
        s.start_bridge().await;
        s
    }

    pub async fn start_backend(&mut self) {
        let args: Vec<&str> = self.backend_args.iter().map(String::as_str).collect();
        self.backend = Some(Proc::spawn(
            "imn-backend",
            &bin("imn-backend"),
            &args,
            &self.log_dir,
        ));
        let api = self.api.clone();
        wait_for(
            "the backend to answer /health",
            Duration::from_secs(60),
            || {
                let api = api.clone();
                async move { api.try_get("/health").await.map(|_| ()) }
            },
        )
        .await;
    }

    pub async fn start_bridge(&mut self) {
        let mqtt = format!("127.0.0.1:{}", self.mqtt_port);
        let nats = self.nats.url();
        self.bridge = Some(Proc::spawn(
            "imn-bridge",
            &bin("imn-bridge"),
            &["--mqtt", &mqtt, "--nats", &nats, "--metrics", "off"],
            &self.log_dir,
        ));
        let port = self.mqtt_port;
        wait_for(
            "the bridge's broker to listen",
            Duration::from_secs(30),
            || async move { TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()) },
        )
        .await;
    }

    /// SIGKILL the bridge: the agents lose their broker at once.
    pub fn kill_bridge(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            b.kill9();
        }
    }

    /// SIGINT the backend (its graceful stop) and wait for it to exit.
    pub fn stop_backend(&mut self) {
        if let Some(mut b) = self.backend.take() {
            let st = b.signal_and_wait(libc::SIGINT, Duration::from_secs(30));
            assert!(st.is_some(), "the backend did not exit on SIGINT");
        }
    }

    pub fn broker(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }
}

// ---------------------------------------------------------------------------------
// Peers on loopback.

/// An HTTP/1.1 server on 127.0.0.1 for the `http` module, one thread per connection:
///
/// - `/start`: 302 to `/next`; `/next`: 301 to `redirect_to` (another server).
/// - `/page`: 200 with a few headers and a 1 KiB HTML body (HEAD: no body; OPTIONS:
///   204 with `Allow`).
/// - `/no-answer`: reads the request and closes the connection.
/// - `/short-body`: says 4096 bytes of body, sends 100 and closes.
pub struct WebPeer {
    pub port: u16,
}

impl WebPeer {
    pub fn start(redirect_to: &str) -> WebPeer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().unwrap().port();
        let redirect_to = redirect_to.to_string();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let redirect_to = redirect_to.clone();
                std::thread::spawn(move || web_conn(conn, &redirect_to));
            }
        });
        WebPeer { port }
    }
}

fn web_conn(mut c: TcpStream, redirect_to: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match c.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let mut first = text.lines().next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let path = first.next().unwrap_or_default().to_string();
        let date = "Date: Fri, 27 Nov 2026 10:00:00 GMT\r\nServer: imn-wire-peer/1.0\r\n";
        let reply = match path.as_str() {
            "/start" => format!(
                "HTTP/1.1 302 Found\r\n{date}Location: /next\r\nContent-Length: 0\r\n\r\n"
            ),
            "/next" => format!(
                "HTTP/1.1 301 Moved Permanently\r\n{date}Location: {redirect_to}\r\nContent-Length: 0\r\n\r\n"
            ),
            "/no-answer" => return,
            "/short-body" => {
                let _ = c.write_all(
                    format!("HTTP/1.1 200 OK\r\n{date}Content-Type: application/octet-stream\r\nContent-Length: 4096\r\n\r\n")
                        .as_bytes(),
                );
                let _ = c.write_all(&[b'x'; 100]);
                return;
            }
            _ if method == "OPTIONS" => format!(
                "HTTP/1.1 204 No Content\r\n{date}Allow: GET, HEAD, OPTIONS\r\nAccess-Control-Max-Age: 600\r\n\r\n"
            ),
            _ => {
                let mut body = String::from(
                    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>IMN wire peer</title></head>\n<body>\n",
                );
                while body.len() < 1000 {
                    body.push_str("<p>Measured from the lab, over loopback.</p>\n");
                }
                body.push_str("</body></html>\n");
                let head = format!(
                    "HTTP/1.1 200 OK\r\n{date}Content-Type: text/html; charset=utf-8\r\nCache-Control: max-age=60\r\nETag: \"imn-1\"\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if method == "HEAD" {
                    head
                } else {
                    head + &body
                }
            }
        };
        if c.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// A UDP socket on 127.0.0.1 that never answers (kept open while the value lives).
pub struct SilentUdp {
    _sock: UdpSocket,
    pub port: u16,
}

impl SilentUdp {
    pub fn start() -> SilentUdp {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().unwrap().port();
        SilentUdp { _sock: s, port }
    }
}

/// A UDP responder on 127.0.0.1 that answers every DNS query with a reply that is
/// cut short: the query's id, flags and question, one answer announced and only the
/// first bytes of it sent. Returns its port.
pub fn malformed_dns_udp() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            // The end of the question: its name's labels, then type and class.
            let mut at = 12;
            while at < q.len() && q[at] != 0 {
                at += 1 + q[at] as usize;
            }
            let end = (at + 5).min(q.len());
            let mut reply = q[..end].to_vec();
            if reply.len() < 12 {
                continue;
            }
            reply[2] |= 0x80; // QR
            reply[3] = 0x80; // RA, NOERROR
            reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // 1 answer, no others
            reply.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00]);
            let _ = s.send_to(&reply, from);
        }
    });
    port
}

/// A TCP port on 127.0.0.1 that accepts connections (and closes them); returns it.
pub fn open_tcp() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    port
}

/// A TCP port on 127.0.0.1 whose server sends `line` and CRLF to each connection (an
/// SMTP server's greeting, for the tcp_banner WebAssembly module).
pub fn greeting_tcp(line: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            use std::io::Write;
            let _ = c.write_all(format!("{line}\r\n").as_bytes());
        }
    });
    port
}

/// A port on 127.0.0.1 that nothing listens on (TCP refused, UDP port unreachable).
pub fn closed_port() -> u16 {
    free_port()
}

/// A domain name in DNS wire format, uncompressed (for dnsmasq's `--dns-rr`).
pub fn dns_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// Bytes as dnsmasq's `--dns-rr` data: hex pairs separated by colons.
pub fn dns_rr_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// dnsmasq options for the zone `imn.test` with a record of (nearly) every type the
/// `dns` module parses into fields, so that every RData variant has a real answer:
/// A, AAAA, CNAME, MX, SOA, TXT (and one long enough to be truncated over UDP without
/// EDNS), SRV, CAA, HTTPS, DS, DNSKEY, and TLSA (kept as presentation text only).
pub fn dnsmasq_records() -> Vec<String> {
    let mut o: Vec<String> = vec![
        "--host-record=www.imn.test,198.18.0.10,2001:2::10".into(),
        "--cname=alias.imn.test,www.imn.test".into(),
        "--mx-host=imn.test,mail.imn.test,10".into(),
        "--txt-record=imn.test,\"v=spf1 -all\",\"imn wire golden\"".into(),
        "--srv-host=_imn._tcp.imn.test,agent.imn.test,8883,10,60".into(),
    ];
    let long: Vec<String> = (0..4)
        .map(|i| format!("\"{}\"", format!("chunk {i} ").repeat(24)))
        .collect();
    o.push(format!("--txt-record=big.imn.test,{}", long.join(",")));
    let rr =
        |name: &str, ty: u16, data: Vec<u8>| format!("--dns-rr={name},{ty},{}", dns_rr_hex(&data));
    // SOA
    let mut soa = dns_name("ns1.imn.test");
    soa.extend(dns_name("hostmaster.imn.test"));
    for v in [2026112701u32, 7200, 3600, 1_209_600, 300] {
        soa.extend(v.to_be_bytes());
    }
    o.push(rr("imn.test", 6, soa));
    // CAA 0 issue "letsencrypt.org"
    let mut caa = vec![0u8, 5];
    caa.extend(b"issue");
    caa.extend(b"letsencrypt.org");
    o.push(rr("imn.test", 257, caa));
    // HTTPS 1 . mandatory=alpn alpn=h2,http/1.1 no-default-alpn port=8443
    //   ipv4hint=198.18.0.10 ech=... ipv6hint=2001:2::10
    let mut https = vec![0u8, 1, 0];
    let mut param = |key: u16, value: &[u8]| {
        https.extend(key.to_be_bytes());
        https.extend((value.len() as u16).to_be_bytes());
        https.extend(value);
    };
    param(0, &[0, 1]);
    param(1, b"\x02h2\x08http/1.1");
    param(2, b"");
    param(3, &8443u16.to_be_bytes());
    param(4, &[198, 18, 0, 10]);
    param(5, b"\x00\x08\xfe\x0d\x00\x04imn!");
    param(
        6,
        &"2001:2::10".parse::<std::net::Ipv6Addr>().unwrap().octets(),
    );
    o.push(rr("www.imn.test", 65, https));
    // DS 12345 13 2 <sha-256>
    let mut ds = 12345u16.to_be_bytes().to_vec();
    ds.extend([13, 2]);
    ds.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
    o.push(rr("imn.test", 43, ds));
    // DNSKEY 257 3 13 <64 bytes of P-256 key>
    let mut key = 257u16.to_be_bytes().to_vec();
    key.extend([3, 13]);
    key.extend((0..64u8).map(|i| i.wrapping_mul(73).wrapping_add(5)));
    o.push(rr("imn.test", 48, key));
    // TLSA 3 1 1 <sha-256>
    let mut tlsa = vec![3u8, 1, 1];
    tlsa.extend((0..32u8).map(|i| i.wrapping_mul(19).wrapping_add(3)));
    o.push(rr("_443._tcp.www.imn.test", 52, tlsa));
    o
}

// ---------------------------------------------------------------------------------
// Golden files.

/// A golden file: `serde_json::to_string_pretty` of this and a newline, exactly as
/// `modules/tests/wire_golden.rs` renders it again to compare.
#[derive(Serialize)]
struct GoldenEntry<'a> {
    name: &'a str,
    wire_version: u8,
    source: &'a str,
    hex: &'a str,
    value: &'a Envelope,
}

/// Writes the golden file `name` (its variant path, `/` written as `.` in the file
/// name) for `bytes`, unless one exists: a golden file is never written twice.
/// Returns whether it wrote.
pub fn write_golden(dir: &Path, name: &str, source: &str, bytes: &[u8]) -> bool {
    let path = dir.join(format!("{}.json", name.replace('/', ".")));
    if path.exists() {
        return false;
    }
    let (version, value) = wire::decode_versioned(bytes)
        .unwrap_or_else(|e| panic!("{name}: the bytes do not decode: {e}"));
    assert_eq!(
        wire::encode_for(version, &value),
        bytes,
        "{name}: the value does not encode back to its bytes"
    );
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let text = serde_json::to_string_pretty(&GoldenEntry {
        name,
        wire_version: version,
        source,
        hex: &hex,
        value: &value,
    })
    .expect("JSON")
        + "\n";
    std::fs::create_dir_all(dir).expect("golden dir");
    std::fs::write(&path, text).expect("write golden file");
    true
}
