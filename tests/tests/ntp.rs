//! The `ntp` module against the NTP responder of `imn_tests::peers`, on loopback: a
//! stratum-2 server whose clock is a known offset from ours, and servers that send a
//! kiss-o'-death, an unsynchronised header, replies that do not echo the request, or
//! nothing.

use std::net::UdpSocket;
use std::time::Duration;

use imn_probes::{run, Context};
use imn_proto::kinds::ntp::NtpResult;
use imn_proto::results::ModuleOutput;
use imn_tests::peers::{ntp_responder as responder, NtpBehaviour as Behaviour};

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
        assert_eq!(r.rx_timestamps, "kernel");
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
