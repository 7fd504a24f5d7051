//! The `dns` module against a real, independent DNS server: dnsmasq (Debian's
//! `dnsmasq-base`), authoritative for a test zone on a free loopback port, over UDP and
//! TCP. dnsmasq encodes the records (names, compression, TXT, CAA, SOA, ...); the test
//! checks that what the module parsed is what the zone holds. Tiny responders of the
//! test's own stand in for a server that never answers and one that sends junk.
//!
//! All traffic stays on 127.0.0.1.
#![cfg(feature = "dns")]

use std::net::UdpSocket as StdUdp;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imn_probes::{run, Context};
use imn_proto::kinds::dns::{DnsErrorKind, DnsProtocol, DnsRecord, DnsResult, RData, ServerSource};
use imn_proto::results::ModuleOutput;
use serde_json::{json, Value};

/// Eight TXT strings of 200 bytes: more than fits in 512 bytes.
const BIG_STRINGS: usize = 8;

/// HTTPS 1 . alpn=h2,h3 port=8443 ipv4hint=192.0.2.1 ech=AQID ipv6hint=2001:db8::1,
/// in wire format (RFC 9460), for dnsmasq's `--dns-rr`.
fn https_rdata() -> Vec<u8> {
    let mut d = vec![0, 1, 0]; // priority 1, target "."
    d.extend_from_slice(&[0, 1, 0, 6, 2, b'h', b'2', 2, b'h', b'3']);
    d.extend_from_slice(&[0, 3, 0, 2, 0x20, 0xFB]);
    d.extend_from_slice(&[0, 4, 0, 4, 192, 0, 2, 1]);
    d.extend_from_slice(&[0, 5, 0, 3, 1, 2, 3]);
    d.extend_from_slice(&[
        0, 6, 0, 16, 0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ]);
    d
}

/// SVCB 0 a.test. (AliasMode).
fn svcb_rdata() -> Vec<u8> {
    b"\x00\x00\x01a\x04test\x00".to_vec()
}

/// DS 12345 8 2 <32 bytes>.
fn ds_rdata() -> Vec<u8> {
    let mut d = vec![0x30, 0x39, 8, 2];
    d.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    d
}

/// DNSKEY 257 3 8 <key>.
fn dnskey_rdata() -> Vec<u8> {
    let mut d = vec![0x01, 0x01, 3, 8];
    d.extend((0..64u8).map(|i| i.wrapping_mul(13).wrapping_add(1)));
    d
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A dnsmasq serving the test zone; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1, right now.
fn free_port() -> u16 {
    loop {
        let u = StdUdp::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn start_dnsmasq() -> Server {
    let big = "y".repeat(200);
    for _ in 0..5 {
        let port = free_port();
        let mut args: Vec<String> = [
            "-k",
            "--conf-file=/dev/null",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-facility=-",
            "--auth-server=ns.test,127.0.0.1",
            "--auth-zone=test,192.0.2.0/24,2001:db8::/64",
            "--auth-soa=2024010101,hostmaster.test,1200,120,604800",
            "--auth-ttl=300",
            "--host-record=a.test,192.0.2.1,2001:db8::1",
            "--cname=www.test,a.test",
            "--mx-host=test,mail.test,10",
            "--txt-record=test,hello world,second",
            "--host-record=host.test,192.0.2.53",
            "--srv-host=_sip._tcp.test,sip.test,5060,10,20",
            "--caa-record=test,0,issue,ca.example",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--port={port}"));
        args.push(format!("--dns-rr=test,65,{}", hex(&https_rdata())));
        args.push(format!("--dns-rr=svc.test,64,{}", hex(&svcb_rdata())));
        args.push(format!("--dns-rr=test,43,{}", hex(&ds_rdata())));
        args.push(format!("--dns-rr=test,48,{}", hex(&dnskey_rdata())));
        args.push("--dns-rr=test,65280,dead".into());
        for _ in 0..BIG_STRINGS {
            args.push(format!("--txt-record=big.test,{big}"));
        }
        if is_root() {
            args.push("--user=root".into());
        }
        let child = Command::new("dnsmasq")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base) must be installed");
        let mut server = Server { child, port };
        if wait_ready(&mut server) {
            return server;
        }
    }
    panic!("dnsmasq did not start");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Polls with a plain UDP query (the root SOA... any answer will do) until it answers.
fn wait_ready(s: &mut Server) -> bool {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let q = b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01";
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = s.child.try_wait() {
            return false; // exited: the port was taken
        }
        let _ = sock.send_to(q, ("127.0.0.1", s.port));
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            if n > 2 && buf[..2] == [0x12, 0x34] {
                return true;
            }
        }
    }
    false
}

async fn ask(params: Value) -> DnsResult {
    match run("dns", &params.to_string(), &Context::default()).await {
        Ok(ModuleOutput::Dns(r)) => *r,
        other => panic!("{params}: {other:?}"),
    }
}

async fn query(port: u16, name: &str, qtype: &str, protocol: &str) -> DnsResult {
    let r = ask(
        json!({"name": name, "type": qtype, "server": format!("127.0.0.1:{port}"),
                       "protocol": protocol, "timeout_ms": 3000, "retries": 1}),
    )
    .await;
    assert!(r.error.is_none(), "{name} {qtype}: {:?}", r.error);
    r
}

/// The answer records of the type asked.
fn answers<'a>(r: &'a DnsResult, rtype: &str) -> Vec<&'a DnsRecord> {
    r.message()
        .unwrap()
        .answer
        .iter()
        .filter(|a| a.rtype == rtype)
        .collect()
}

fn only<'a>(r: &'a DnsResult, rtype: &str) -> &'a DnsRecord {
    let a = answers(r, rtype);
    assert_eq!(a.len(), 1, "{rtype}: {:?}", r.reply);
    a[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_over_udp_and_tcp() {
    let s = start_dnsmasq();
    for proto in ["udp", "tcp"] {
        let want_proto = if proto == "udp" {
            DnsProtocol::Udp
        } else {
            DnsProtocol::Tcp
        };
        let r = query(s.port, "a.test", "A", proto).await;
        assert_eq!(r.protocol, want_proto);
        assert_eq!((r.server.as_str(), r.port), ("127.0.0.1", s.port));
        assert_eq!(r.src_addr.as_deref(), Some("127.0.0.1"));
        assert!(!r.tcp_after_truncation);
        let rt = r.reply.as_ref().unwrap().rt_ms;
        assert!(rt > 0.0 && rt < 3000.0, "{rt}");
        let m = r.message().unwrap();
        assert_eq!(m.rcode_name, "NOERROR");
        assert!(m.flags.qr && m.flags.aa && m.flags.rd && !m.flags.tc);
        assert_eq!((m.qdcount, m.ancount), (1, 1));
        assert_eq!(m.question[0].name, "a.test.");
        assert_eq!(m.question[0].qtype, "A");
        assert_eq!(
            r.reply.as_ref().unwrap().size as usize,
            decode64(&r.reply.as_ref().unwrap().abuf).len()
        );
        let a = only(&r, "A");
        assert_eq!(
            a.data,
            RData::A {
                address: "192.0.2.1".into()
            }
        );
        assert_eq!(
            (a.name.as_str(), a.class.as_str(), a.ttl),
            ("a.test.", "IN", 300)
        );
        // Our EDNS0 OPT went out; dnsmasq's came back.
        assert!(m.edns.is_some(), "{m:?}");

        let r = query(s.port, "a.test", "AAAA", proto).await;
        assert_eq!(only(&r, "AAAA").rdata, "2001:db8::1");

        let r = query(s.port, "www.test", "CNAME", proto).await;
        assert_eq!(
            only(&r, "CNAME").data,
            RData::Name {
                target: "a.test.".into()
            }
        );
        // An A query for the alias gets the chain.
        let r = query(s.port, "www.test", "A", proto).await;
        assert_eq!(only(&r, "CNAME").rdata, "a.test.");
        assert_eq!(only(&r, "A").rdata, "192.0.2.1");

        let r = query(s.port, "test", "MX", proto).await;
        let mx = only(&r, "MX");
        assert_eq!(
            mx.data,
            RData::Mx {
                preference: 10,
                exchange: "mail.test.".into()
            }
        );
        assert_eq!(mx.rdata, "10 mail.test.");

        let r = query(s.port, "test", "NS", proto).await;
        assert_eq!(only(&r, "NS").rdata, "ns.test.");

        let r = query(s.port, "test", "TXT", proto).await;
        let txt = only(&r, "TXT");
        assert_eq!(
            txt.data,
            RData::Txt {
                strings: vec!["hello world".into(), "second".into()]
            }
        );
        assert_eq!(txt.rdata, "\"hello world\" \"second\"");

        let r = query(s.port, "test", "SOA", proto).await;
        match &only(&r, "SOA").data {
            RData::Soa {
                mname,
                rname,
                serial,
                refresh,
                retry,
                expire,
                ..
            } => {
                assert_eq!(
                    (mname.as_str(), rname.as_str()),
                    ("ns.test.", "hostmaster.test.")
                );
                assert_eq!(
                    (*serial, *refresh, *retry, *expire),
                    (2024010101, 1200, 120, 604800)
                );
            }
            other => panic!("{other:?}"),
        }

        // PTR from an address: the module builds 53.2.0.192.in-addr.arpa. (dnsmasq answers
        // from its host records.)
        let r = query(s.port, "192.0.2.53", "PTR", proto).await;
        assert_eq!(r.qname, "53.2.0.192.in-addr.arpa.");
        let ptr = only(&r, "PTR");
        assert_eq!(ptr.name, "53.2.0.192.in-addr.arpa.");
        assert_eq!(
            ptr.data,
            RData::Name {
                target: "host.test.".into()
            }
        );

        let r = query(s.port, "_sip._tcp.test", "SRV", proto).await;
        assert_eq!(
            only(&r, "SRV").data,
            RData::Srv {
                priority: 10,
                weight: 20,
                port: 5060,
                target: "sip.test.".into()
            }
        );

        let r = query(s.port, "test", "CAA", proto).await;
        let caa = only(&r, "CAA");
        assert_eq!(
            caa.data,
            RData::Caa {
                flags: 0,
                tag: "issue".into(),
                value: "ca.example".into()
            }
        );
        assert_eq!(caa.rdata, "0 issue \"ca.example\"");

        let r = query(s.port, "test", "HTTPS", proto).await;
        let https = only(&r, "HTTPS");
        assert_eq!(
            https.rdata,
            "1 . alpn=\"h2,h3\" port=8443 ipv4hint=192.0.2.1 ech=AQID ipv6hint=2001:db8::1"
        );
        match &https.data {
            RData::Svcb(d) => {
                assert_eq!((d.priority, d.target.as_str()), (1, "."));
                assert_eq!(d.alpn, vec!["h2", "h3"]);
                assert_eq!(d.port, Some(8443));
                assert_eq!(d.ipv4hint, vec!["192.0.2.1"]);
                assert_eq!(d.ipv6hint, vec!["2001:db8::1"]);
                assert_eq!(d.ech.as_deref(), Some("AQID"));
            }
            other => panic!("{other:?}"),
        }

        let r = query(s.port, "svc.test", "SVCB", proto).await;
        assert_eq!(only(&r, "SVCB").rdata, "0 a.test.");

        let r = query(s.port, "test", "DS", proto).await;
        match &only(&r, "DS").data {
            RData::Ds {
                key_tag,
                algorithm,
                digest_type,
                digest_hex,
            } => {
                assert_eq!((*key_tag, *algorithm, *digest_type), (12345, 8, 2));
                assert_eq!(*digest_hex, hex(&ds_rdata()[4..]));
            }
            other => panic!("{other:?}"),
        }

        let r = query(s.port, "test", "DNSKEY", proto).await;
        match &only(&r, "DNSKEY").data {
            RData::Dnskey {
                flags,
                protocol,
                algorithm,
                public_key_base64,
                ..
            } => {
                assert_eq!((*flags, *protocol, *algorithm), (257, 3, 8));
                assert_eq!(decode64(public_key_base64), dnskey_rdata()[4..]);
            }
            other => panic!("{other:?}"),
        }

        let r = query(s.port, "test", "TYPE65280", proto).await;
        let unknown = only(&r, "TYPE65280");
        assert_eq!(
            (unknown.rdata.as_str(), &unknown.data),
            ("\\# 2 DEAD", &RData::Other)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_has_the_soa_in_authority() {
    let s = start_dnsmasq();
    for proto in ["udp", "tcp"] {
        let r = query(s.port, "nothing.test", "A", proto).await;
        let m = r.message().unwrap().clone();
        assert_eq!((m.rcode, m.rcode_name.as_str()), (3, "NXDOMAIN"));
        assert!(m.answer.is_empty());
        let soa = m.authority.iter().find(|a| a.rtype == "SOA").unwrap();
        assert_eq!(soa.name, "test.");
        assert!(matches!(
            soa.data,
            RData::Soa {
                serial: 2024010101,
                ..
            }
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_udp_is_asked_again_over_tcp() {
    let s = start_dnsmasq();
    let server = format!("127.0.0.1:{}", s.port);
    for edns_size in [0, 512] {
        let r = ask(json!({"name": "big.test", "type": "TXT", "server": server,
                           "edns_size": edns_size}))
        .await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.tcp_after_truncation);
        assert_eq!(r.protocol, DnsProtocol::Tcp);
        assert!(r.reply.as_ref().unwrap().tcp_connect_ms.is_some());
        let m = r.message().unwrap();
        assert!(!m.flags.tc);
        let txt = answers(&r, "TXT");
        assert_eq!(txt.len(), BIG_STRINGS);
        for t in txt {
            assert_eq!(
                t.data,
                RData::Txt {
                    strings: vec!["y".repeat(200)]
                }
            );
        }
        assert!(r.reply.as_ref().unwrap().size > 1600);
    }
    // Without the retry: the truncated UDP answer, as it came.
    let r = ask(json!({"name": "big.test", "type": "TXT", "server": server,
                       "edns_size": 512, "use_tcp_on_truncation": false}))
    .await;
    assert_eq!(r.protocol, DnsProtocol::Udp);
    assert!(!r.tcp_after_truncation);
    let m = r.message().unwrap();
    assert!(m.flags.tc);
    assert!(r.reply.as_ref().unwrap().size <= 512);
    assert!(answers(&r, "TXT").len() < BIG_STRINGS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out() {
    // A bound socket that never answers.
    let silent = StdUdp::bind("127.0.0.1:0").unwrap();
    let server = silent.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    let r = ask(json!({"name": "a.test", "server": server, "timeout_ms": 300, "retries": 1})).await;
    let took = t0.elapsed();
    let e = r.error.unwrap();
    assert_eq!(e.kind, DnsErrorKind::Timeout, "{}", e.message);
    assert!(e.message.contains("300 ms"), "{}", e.message);
    assert_eq!(r.attempts, 2);
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(r.reply.is_none());
    // Both queries reached the socket.
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(silent.recv(&mut buf).is_ok());
    assert!(silent.recv(&mut buf).is_ok());
    // Nothing listens on TCP there: refused, at once.
    let r = ask(json!({"name": "a.test", "server": server, "protocol": "tcp"})).await;
    assert_eq!(r.error.unwrap().kind, DnsErrorKind::Network);
}

/// Answers every query with `reply(query)`, from a task.
fn responder(reply: fn(&[u8]) -> Vec<Vec<u8>>) -> String {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            for d in reply(&buf[..n]) {
                let _ = sock.send_to(&d, from);
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_with_our_id_is_malformed_not_a_panic() {
    // First a datagram with another id (ignored), then junk with ours.
    let server = responder(|q| {
        let mut other = q.to_vec();
        other[0] ^= 0xFF;
        other[2] |= 0x80;
        let mut junk = vec![q[0], q[1], 0x81, 0x80, 0x00, 0x01, 0x00, 0x01];
        junk.extend_from_slice(&[0xC0, 0xFF, 0x3F, 0x01]);
        vec![other, junk]
    });
    let r = ask(json!({"name": "a.test", "server": server, "timeout_ms": 2000})).await;
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.kind, DnsErrorKind::Malformed, "{}", e.message);
    assert!(e.message.contains("ends early"), "{}", e.message);
    let reply = r.reply.as_ref().unwrap();
    assert_eq!(reply.size, 12);
    assert_eq!(
        decode64(&reply.abuf)[2..],
        [0x81, 0x80, 0, 1, 0, 1, 0xC0, 0xFF, 0x3F, 0x01]
    );
    assert!(reply.message.is_none() && reply.rt_ms > 0.0);

    // A header only, with our id and a compression loop in the answer.
    let server = responder(|q| {
        let mut m = q.to_vec();
        m[2] |= 0x80;
        m[7] = 1;
        let at = m.len() as u8;
        m.extend_from_slice(&[0xC0, at, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]);
        vec![m]
    });
    let r = ask(json!({"name": "a.test", "server": server, "edns_size": 0})).await;
    let e = r.error.unwrap();
    assert_eq!(e.kind, DnsErrorKind::Malformed);
    assert!(e.message.contains("backwards"), "{}", e.message);
}

/// Standard base64, for checking.
fn decode64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk.iter().take_while(|&&c| c != b'=').count();
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().take(n).enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..n]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_do_cd_and_nsid_reach_the_server() {
    // Echoes the question as an empty answer, with an OPT record holding the DO bit it
    // got and an NSID; the query's own bytes come back in the result's qbuf.
    let server = responder(|q| {
        let Some(qend) = q.iter().skip(12).position(|&b| b == 0).map(|p| 12 + p + 5) else {
            return vec![];
        };
        let mut m = q[..qend].to_vec();
        m[2] |= 0x80;
        m[3] |= 0x80; // RA
        m[10] = 0;
        m[11] = 1;
        let do_bit = q.get(qend + 7).copied().unwrap_or(0) & 0x80;
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, do_bit, 0, 0, 12, 0, 3, 0, 8]);
        m.extend_from_slice(b"imn-test");
        vec![m]
    });
    let r = ask(
        json!({"name": "a.test", "type": "SOA", "server": server, "rd": false,
                       "cd": true, "do": true, "nsid": true, "edns_size": 4096}),
    )
    .await;
    assert!(r.error.is_none(), "{:?}", r.error);
    let q = decode64(&r.qbuf);
    assert_eq!(q[2] & 0x01, 0, "RD clear");
    assert_eq!(q[3] & 0x10, 0x10, "CD set");
    assert_eq!(
        &q[q.len() - 15..],
        &[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 4, 0, 3, 0, 0]
    );
    let m = r.message().unwrap().clone();
    assert!(m.flags.ra && !m.flags.rd);
    let e = m.edns.unwrap();
    assert!(e.dnssec_ok);
    assert_eq!(e.udp_size, 1232);
    assert_eq!(e.nsid.as_deref(), Some("imn-test"));
    assert_eq!(r.qtype, "SOA");
}

/// Decodes each base64 answer with ripe.atlas.sagan's own DNS parser (`AbufParser`).
const SAGAN_ABUF: &str = r#"
import base64, json, sys
from ripe.atlas.sagan.helpers import abuf
print(json.dumps([abuf.AbufParser.parse(base64.b64decode(b)) for b in json.load(sys.stdin)]))
"#;

fn sagan_decode(abufs: &[String]) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", SAGAN_ABUF])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with ripe.atlas.sagan");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(abufs).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Checks one of our records against sagan's decoding of the same bytes.
fn same_record(ours: &DnsRecord, theirs: &Value) {
    let what = format!("{ours:?} vs {theirs}");
    assert_eq!(theirs["Name"], ours.name, "{what}");
    // sagan names the types it knows and gives the number of the others.
    assert!(
        theirs["Type"] == ours.rtype.as_str() || theirs["Type"] == ours.type_code,
        "{what}"
    );
    assert_eq!(theirs["TTL"], ours.ttl, "{what}");
    assert_eq!(theirs["Class"], ours.class, "{what}");
    assert_eq!(theirs["RDlength"], ours.rdlength, "{what}");
    match &ours.data {
        // sagan writes IPv6 addresses without `::`: compare the addresses.
        RData::A { address } | RData::Aaaa { address } => assert_eq!(
            theirs["Address"]
                .as_str()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok()),
            address.parse().ok(),
            "{what}"
        ),
        RData::Name { target } => assert_eq!(theirs["Target"], *target, "{what}"),
        RData::Mx {
            preference,
            exchange,
        } => {
            assert_eq!(theirs["Preference"], *preference, "{what}");
            assert_eq!(theirs["MailExchanger"], *exchange, "{what}");
        }
        RData::Soa {
            mname,
            rname,
            serial,
            refresh,
            retry,
            expire,
            minimum,
        } => {
            assert_eq!(theirs["MasterServerName"], *mname, "{what}");
            assert_eq!(theirs["MaintainerName"], *rname, "{what}");
            assert_eq!(
                [
                    &theirs["Serial"],
                    &theirs["Refresh"],
                    &theirs["Retry"],
                    &theirs["Expire"],
                    &theirs["NegativeTtl"]
                ],
                [serial, refresh, retry, expire, minimum]
                    .map(|v| json!(v))
                    .each_ref(),
                "{what}"
            );
        }
        RData::Txt { strings } => assert_eq!(theirs["Data"], json!(strings), "{what}"),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            assert_eq!(theirs["Priority"], *priority, "{what}");
            assert_eq!(theirs["Weight"], *weight, "{what}");
            assert_eq!(theirs["Port"], *port, "{what}");
            assert_eq!(theirs["Target"], *target, "{what}");
        }
        RData::Ds {
            key_tag,
            algorithm,
            digest_type,
            digest_hex,
        } => {
            assert_eq!(theirs["Tag"], *key_tag, "{what}");
            assert_eq!(theirs["Algorithm"], *algorithm, "{what}");
            assert_eq!(theirs["DigestType"], *digest_type, "{what}");
            assert_eq!(
                theirs["DelegationKey"]
                    .as_str()
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some(digest_hex.as_str()),
                "{what}"
            );
        }
        RData::Dnskey {
            flags,
            protocol,
            algorithm,
            public_key_base64,
            ..
        } => {
            assert_eq!(theirs["Flags"], *flags, "{what}");
            assert_eq!(theirs["Protocol"], *protocol, "{what}");
            assert_eq!(theirs["Algorithm"], *algorithm, "{what}");
            assert_eq!(theirs["Key"], *public_key_base64, "{what}");
        }
        // sagan does not decode these.
        RData::Caa { .. } | RData::Svcb(_) | RData::Other => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagan_decodes_the_same_records_from_the_same_bytes() {
    let s = start_dnsmasq();
    let mut results = Vec::new();
    for proto in ["udp", "tcp"] {
        for (name, qtype) in [
            ("a.test", "A"),
            ("a.test", "AAAA"),
            ("www.test", "A"),
            ("test", "MX"),
            ("test", "NS"),
            ("test", "TXT"),
            ("test", "SOA"),
            ("192.0.2.53", "PTR"),
            ("_sip._tcp.test", "SRV"),
            ("test", "CAA"),
            ("test", "HTTPS"),
            ("svc.test", "SVCB"),
            ("test", "DS"),
            ("test", "DNSKEY"),
            ("test", "TYPE65280"),
            ("nothing.test", "A"),
            ("big.test", "TXT"),
        ] {
            results.push(query(s.port, name, qtype, proto).await);
        }
    }
    let abufs: Vec<String> = results
        .iter()
        .map(|r| r.reply.as_ref().unwrap().abuf.clone())
        .collect();
    let decoded = sagan_decode(&abufs);
    assert_eq!(decoded.len(), results.len());
    let mut records = 0;
    for (r, d) in results.iter().zip(&decoded) {
        let m = r.message().unwrap();
        assert!(d.get("ERROR").is_none(), "{d}");
        let h = &d["HEADER"];
        assert_eq!(h["ID"], m.id);
        assert_eq!(h["ReturnCode"], m.rcode_name);
        assert_eq!(
            [&h["QR"], &h["AA"], &h["TC"], &h["RD"], &h["RA"], &h["AD"], &h["CD"]],
            [m.flags.qr, m.flags.aa, m.flags.tc, m.flags.rd, m.flags.ra, m.flags.ad, m.flags.cd]
                .map(Value::from)
                .each_ref()
        );
        assert_eq!(
            [&h["QDCOUNT"], &h["ANCOUNT"], &h["NSCOUNT"], &h["ARCOUNT"]],
            [m.qdcount, m.ancount, m.nscount, m.arcount]
                .map(Value::from)
                .each_ref()
        );
        assert_eq!(d["QuestionSection"][0]["Qname"], m.question[0].name);
        for (ours, key) in [
            (&m.answer, "AnswerSection"),
            (&m.authority, "AuthoritySection"),
            (&m.additional, "AdditionalSection"),
        ] {
            let theirs = d
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            assert_eq!(ours.len(), theirs.len(), "{key}: {ours:?} vs {theirs:?}");
            for (o, t) in ours.iter().zip(&theirs) {
                same_record(o, t);
                records += 1;
            }
        }
        match &m.edns {
            Some(e) => {
                assert_eq!(d["EDNS0"]["UDPsize"], e.udp_size);
                let codes: Vec<u16> = e.options.iter().map(|o| o.code).collect();
                let theirs: Vec<u16> = d["EDNS0"]["Option"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o["OptionCode"].as_u64().unwrap() as u16)
                    .collect();
                assert_eq!(codes, theirs);
            }
            None => assert!(d.get("EDNS0").is_none()),
        }
    }
    assert!(records > 60, "{records} records compared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_name_server_and_server_names() {
    let s = start_dnsmasq();
    // The agent's configured name servers stand in for /etc/resolv.conf's (this test
    // binary resolves nothing else through them).
    let ns: std::net::SocketAddr = format!("127.0.0.1:{}", s.port).parse().unwrap();
    imn_resolver::set_nameservers(vec![ns]);
    let r = ask(json!({"name": "test", "type": "MX"})).await;
    imn_resolver::set_nameservers(Vec::new());
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.server_source, ServerSource::System);
    assert_eq!((r.server.as_str(), r.port), ("127.0.0.1", s.port));
    assert_eq!(only(&r, "MX").rdata, "10 mail.test.");
    // A server given by name is resolved by the agent's own resolver (here /etc/hosts).
    let r = ask(json!({"name": "a.test", "server": format!("localhost:{}", s.port)})).await;
    assert_eq!(r.server_source, ServerSource::Params);
    if r.server == "127.0.0.1" {
        assert_eq!(only(&r, "A").rdata, "192.0.2.1");
    } else {
        // localhost came out as ::1, where this dnsmasq does not listen.
        assert_eq!(r.server, "::1");
    }
}
