//! The `ntp` module against an NTP responder the test starts on loopback. The responder
//! is the test's own (nothing that serves NTP can run here with a clock other than the
//! machine's): it answers as a stratum-2 server whose clock is a known offset from ours,
//! so the measured offset can be checked. Other responders send a kiss-o'-death, an
//! unsynchronised header, replies that do not echo the request, or nothing.

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use imn_modules::exec::{run, Context};
use imn_modules::kinds::ntp::NtpResult;
use imn_modules::results::ModuleOutput;

#[derive(Clone, Copy)]
enum Behaviour {
    /// A synchronised stratum-2 server whose clock is ahead of ours by this many seconds.
    Offset(f64),
    Kiss(&'static [u8; 4]),
    Unsynchronised,
    /// Replies whose origin timestamp is not the request's transmit timestamp.
    WrongOrigin,
    Silent,
}

fn ntp_now(offset: f64) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2_208_988_800.0
        + offset;
    ((t.trunc() as u64) << 32) | ((t.fract() * 4_294_967_296.0) as u64)
}

/// Starts a responder on a free loopback port; returns the port.
fn responder(addr: &str, b: Behaviour) -> u16 {
    let sock = UdpSocket::bind(addr).unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            if n < 48 {
                continue;
            }
            let offset = match b {
                Behaviour::Offset(o) => o,
                _ => 0.0,
            };
            let t2 = ntp_now(offset);
            let mut r = [0u8; 48];
            let version = (buf[0] >> 3) & 7;
            r[0] = (version << 3) | 4;
            r[1] = 2;
            r[2] = buf[2];
            r[3] = (-23i8) as u8;
            r[4..8].copy_from_slice(&0x0000_0800u32.to_be_bytes());
            r[8..12].copy_from_slice(&0x0000_1000u32.to_be_bytes());
            r[12..16].copy_from_slice(&[127, 0, 0, 53]);
            r[16..24].copy_from_slice(&(t2 - (16u64 << 32)).to_be_bytes());
            r[24..32].copy_from_slice(&buf[40..48]);
            r[32..40].copy_from_slice(&t2.to_be_bytes());
            match b {
                Behaviour::Offset(_) => {}
                Behaviour::Kiss(code) => {
                    r[1] = 0;
                    r[12..16].copy_from_slice(code);
                }
                Behaviour::Unsynchronised => r[0] |= 3 << 6,
                Behaviour::WrongOrigin => r[24] ^= 0xff,
                Behaviour::Silent => continue,
            }
            // A little processing time, as a real server has.
            std::thread::sleep(Duration::from_micros(200));
            r[40..48].copy_from_slice(&ntp_now(offset).to_be_bytes());
            let _ = sock.send_to(&r, from);
        }
    });
    port
}

async fn ntp(params: serde_json::Value) -> NtpResult {
    match run("ntp", &params.to_string(), &Context::default()).await {
        Ok(ModuleOutput::Ntp(r)) => *r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn measures_a_known_offset_ahead_and_behind() {
    for (host, offset) in [("127.0.0.1", 1.5), ("127.0.0.1", -2.25), ("::1", 0.75)] {
        let bind = if host == "::1" {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let Ok(_) = UdpSocket::bind(bind) else {
            eprintln!("no {host} on this machine: skipped");
            continue;
        };
        let port = responder(bind, Behaviour::Offset(offset));
        let r = ntp(serde_json::json!({
            "host": host, "port": port, "packets": 3, "interval_ms": 20, "timeout_ms": 2000
        }))
        .await;
        assert_eq!((r.sent, r.received), (3, 3), "{r:?}");
        let measured = r.offset_ms.unwrap();
        // Loopback is symmetric: the error is the scheduling jitter of two threads.
        assert!(
            (measured - offset * 1000.0).abs() < 50.0,
            "offset {measured} ms, expected {} ms",
            offset * 1000.0
        );
        for p in &r.packets {
            let (t1, t2, t3, t4) = (
                p.origin_ts,
                p.receive_ts.unwrap(),
                p.transmit_ts.unwrap(),
                p.final_ts.unwrap(),
            );
            assert!(t4 >= t1 && t3 >= t2, "{p:?}");
            assert!(p.delay_ms.unwrap() >= 0.0 && p.delay_ms.unwrap() < 2000.0);
        }
        assert_eq!(r.addr, host);
        let s = r.server.unwrap();
        assert_eq!(
            (s.stratum, s.leap.as_str(), s.mode.as_str()),
            (2, "no", "server")
        );
        assert_eq!(s.ref_id, "127.0.0.53");
        assert_eq!(s.precision_s, 2f64.powi(-23));
        assert!((s.root_delay_ms - 2048.0 / 65536.0 * 1000.0).abs() < 1e-9);
        assert!((s.ref_ts - (r.packets[0].receive_ts.unwrap() - 16.0)).abs() < 5.0);
    }
}

#[tokio::test]
async fn kiss_unsynchronised_forged_and_silent_servers_are_reported() {
    let kiss = responder("127.0.0.1:0", Behaviour::Kiss(b"RATE"));
    let r = ntp(serde_json::json!({"host": "127.0.0.1", "port": kiss, "packets": 1})).await;
    assert_eq!(r.packets[0].error.as_deref(), Some("kiss RATE"));
    assert_eq!((r.received, r.offset_ms), (0, None));
    assert_eq!(r.server.unwrap().ref_id, "RATE");

    let unsync = responder("127.0.0.1:0", Behaviour::Unsynchronised);
    let r = ntp(serde_json::json!({"host": "127.0.0.1", "port": unsync, "packets": 1})).await;
    assert!(r.packets[0]
        .error
        .as_deref()
        .unwrap()
        .contains("not synchronised"));
    assert_eq!(r.server.unwrap().leap, "unknown");
    assert_eq!(r.received, 0);

    // A reply that does not echo our transmit timestamp is ignored: the packet times out.
    let forged = responder("127.0.0.1:0", Behaviour::WrongOrigin);
    let silent = responder("127.0.0.1:0", Behaviour::Silent);
    for port in [forged, silent] {
        let t0 = std::time::Instant::now();
        let r = ntp(serde_json::json!({
            "host": "127.0.0.1", "port": port, "packets": 2, "interval_ms": 0, "timeout_ms": 300
        }))
        .await;
        assert!(t0.elapsed() >= Duration::from_millis(600));
        assert_eq!((r.sent, r.received), (2, 0));
        assert!(r
            .packets
            .iter()
            .all(|p| p.error.as_deref() == Some("timeout")));
        assert!(r.server.is_none() && r.offset_ms.is_none());
    }

    // Nobody listening: the kernel's port unreachable ends the wait at once.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = ntp(serde_json::json!({"host": "127.0.0.1", "port": closed, "packets": 1})).await;
    assert!(
        r.packets[0]
            .error
            .as_deref()
            .unwrap()
            .starts_with("receive failed"),
        "{r:?}"
    );
}
