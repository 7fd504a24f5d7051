//! Real sockets on loopback only (127.0.0.0/8 and ::1).

use std::sync::Mutex;
use std::time::Instant;

use super::engine::SocketPref;
use super::*;

/// Tests that read or change net.ipv4.ping_group_range run one at a time.
static SYSCTL: Mutex<()> = Mutex::new(());
const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn params(targets: Vec<String>, count: u32, interval_ms: u64) -> PingParams {
    PingParams {
        host: None,
        targets: Some(targets),
        count,
        interval_ms,
        timeout_ms: 1000,
        size: 56,
        ttl: None,
        rate: None,
    }
}

fn host(h: &str, count: u32) -> PingParams {
    PingParams {
        host: Some(h.into()),
        targets: None,
        ..params(Vec::new(), count, 20)
    }
}

/// 127.1.x.y, n of them (loopback: the kernel answers every one).
fn loopback_targets(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("127.1.{}.{}", i / 250, i % 250 + 1))
        .collect()
}

/// Runs a ping; None (after checking the error names both remedies) if this process
/// may not open ICMP sockets at all, which only happens without root.
async fn ping(p: PingParams) -> Option<PingOutput> {
    match run(p, &Context::default()).await {
        Ok(o) => Some(o),
        Err(e) => {
            assert!(!root(), "root could not ping loopback: {e}");
            assert!(
                e.contains("CAP_NET_RAW") && e.contains("ping_group_range"),
                "{e}"
            );
            None
        }
    }
}

fn assert_all_replied(out: &PingOutput, count: u32) {
    for r in &out.targets {
        assert_eq!((r.sent, r.received), (count, count), "{r:?}");
        assert_eq!(r.duplicates, 0, "{r:?}");
        assert!(r.error.is_none(), "{r:?}");
        for rtt in r.rtts_ms.iter().flatten() {
            assert!(*rtt > 0.0, "zero or negative RTT in {r:?}");
            assert!(*rtt < 1000.0, "{r:?}");
        }
    }
}

#[tokio::test]
async fn pings_ipv4_loopback() {
    let Some(out) = ping(host("127.0.0.1", 3)).await else {
        return;
    };
    assert_eq!(out.targets.len(), 1);
    assert_all_replied(&out, 3);
    let r = &out.targets[0];
    assert_eq!(
        (r.host.as_str(), r.addr.as_str()),
        ("127.0.0.1", "127.0.0.1")
    );
    assert_eq!(r.reply_ttl, Some(64), "{r:?}");
    assert!(r.median_ms.unwrap() > 0.0);
    assert_eq!(out.src_addr.as_deref(), Some("127.0.0.1"));
    if root() {
        assert_eq!(out.socket, "raw");
    }
}

#[tokio::test]
async fn pings_ipv6_loopback() {
    let Some(out) = ping(host("::1", 3)).await else {
        return;
    };
    assert_all_replied(&out, 3);
    let r = &out.targets[0];
    assert_eq!(r.addr, "::1");
    assert_eq!(r.reply_ttl, Some(64), "{r:?}");
}

#[tokio::test]
async fn resolves_names_and_reports_both() {
    let Some(out) = ping(host("localhost", 1)).await else {
        return;
    };
    let r = &out.targets[0];
    assert_eq!(r.host, "localhost");
    assert!(r.addr == "127.0.0.1" || r.addr == "::1", "{r:?}");
    assert_all_replied(&out, 1);
}

#[tokio::test]
async fn thousand_targets_at_high_rate() {
    let mut p = params(loopback_targets(1000), 1, 1000);
    p.rate = Some(50_000.0);
    let t0 = Instant::now();
    let Some(out) = ping(p).await else { return };
    let took = t0.elapsed();
    assert_eq!(out.targets.len(), 1000);
    assert_all_replied(&out, 1);
    // 1000 probes at 50,000/s take 20 ms to send; replies end the run early.
    assert!(took.as_millis() < 900, "took {took:?}");
    assert_eq!(out.targets[999].addr, "127.1.3.250");
}

#[tokio::test]
async fn paces_at_the_requested_rate() {
    let mut p = params(loopback_targets(500), 2, 0);
    p.rate = Some(10_000.0);
    let t0 = Instant::now();
    let Some(out) = ping(p).await else { return };
    let took = t0.elapsed().as_secs_f64();
    assert_all_replied(&out, 2);
    // 1000 probes at 10,000/s: the last leaves after 99.9 ms.
    assert!(took >= 0.099, "too fast: {took}");
    assert!(took < 0.5, "too slow: {took}");
}

#[tokio::test]
async fn interval_between_probes_to_one_target() {
    let mut p = host("127.0.0.1", 4);
    p.interval_ms = 50;
    let t0 = Instant::now();
    let Some(out) = ping(p).await else { return };
    let took = t0.elapsed().as_secs_f64();
    assert_all_replied(&out, 4);
    assert!((0.150..0.6).contains(&took), "took {took}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_share_the_engine_without_stealing() {
    let Some(_) = ping(host("127.0.0.1", 1)).await else {
        return;
    };
    let mut runs = Vec::new();
    for i in 0..6 {
        // Overlapping target sets: every run pings 127.0.0.1 and ::1 too.
        let mut t = vec!["127.0.0.1".to_string(), "::1".to_string()];
        t.extend((0..50).map(|k| format!("127.3.{i}.{}", k + 1)));
        t.extend((0..50).map(|k| format!("127.3.9.{}", k + 1)));
        let mut p = params(t, 5, 10);
        p.rate = Some(20_000.0);
        runs.push(tokio::spawn(
            async move { run(p, &Context::default()).await },
        ));
    }
    for r in runs {
        let out = r.await.unwrap().unwrap();
        assert_eq!(out.targets.len(), 102);
        assert_all_replied(&out, 5);
    }
}

#[tokio::test]
async fn unresolvable_target_fails_alone() {
    let t = vec![
        "no-such-host.invalid".to_string(),
        "127.0.0.1".to_string(),
        "".to_string(),
    ];
    let Some(out) = ping(params(t, 2, 10)).await else {
        return;
    };
    let bad = &out.targets[0];
    assert_eq!(bad.host, "no-such-host.invalid");
    assert_eq!(bad.addr, "");
    assert!(bad.error.as_deref().unwrap().contains("resolve"), "{bad:?}");
    assert_eq!(bad.sent, 0);
    assert!(out.targets[2].error.is_some());
    let good = &out.targets[1];
    assert_eq!((good.sent, good.received), (2, 2), "{good:?}");
    assert!(good.error.is_none());
}

#[tokio::test]
async fn only_unresolvable_targets_is_not_a_module_failure() {
    let Some(out) = ping(host("no-such-host.invalid", 1)).await else {
        return;
    };
    assert!(out.targets[0].error.is_some());
}

#[tokio::test]
async fn ipv4_mapped_addresses_go_over_ipv4() {
    let Some(out) = ping(host("::ffff:127.0.0.1", 2)).await else {
        return;
    };
    assert_all_replied(&out, 2);
    assert_eq!(out.targets[0].addr, "127.0.0.1");
    assert_eq!(out.targets[0].host, "::ffff:127.0.0.1");
}

#[tokio::test]
async fn extreme_rates_are_bounded() {
    let mut p = host("127.0.0.1", 1);
    p.rate = Some(1e300);
    let Some(out) = ping(p).await else { return };
    assert_all_replied(&out, 1);
    let mut p = params(loopback_targets(3), 1, 1000);
    p.rate = Some(1e-300);
    // The first probe leaves at once, the next ones a very long time later: cancel.
    let r = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        run(p, &Context::default()),
    )
    .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn same_address_listed_twice() {
    let t = vec!["127.0.0.1".into(), "127.0.0.1".into(), "127.0.0.2".into()];
    let Some(out) = ping(params(t, 3, 5)).await else {
        return;
    };
    assert_all_replied(&out, 3);
}

#[tokio::test]
async fn ttl_and_payload_size() {
    let mut p = host("127.0.0.1", 2);
    p.ttl = Some(3);
    p.size = 0;
    let Some(out) = ping(p).await else { return };
    assert_all_replied(&out, 2);
    let mut p = host("::1", 2);
    p.ttl = Some(7);
    p.size = 1400;
    let Some(out) = ping(p).await else { return };
    assert_all_replied(&out, 2);
    let mut p = host("127.0.0.1", 1);
    p.size = 5000;
    let Some(out) = ping(p).await else { return };
    assert_all_replied(&out, 1);
}

#[tokio::test]
async fn rejects_bad_parameters() {
    assert!(run(host("127.0.0.1", 0), &Context::default())
        .await
        .is_err());
    assert!(run(host("127.0.0.1", 101), &Context::default())
        .await
        .is_err());
    assert!(run(params(Vec::new(), 1, 10), &Context::default())
        .await
        .is_err());
    let mut p = host("127.0.0.1", 1);
    p.ttl = Some(0);
    assert!(run(p, &Context::default()).await.is_err());
}

#[tokio::test]
async fn cancelled_run_stops_and_leaves_the_engine() {
    let Some(_) = ping(host("127.0.0.1", 1)).await else {
        return;
    };
    let mut p = host("127.0.0.1", 100);
    p.interval_ms = 1000;
    let r = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        run(p, &Context::default()),
    )
    .await;
    assert!(r.is_err(), "a 100 s run finished in 100 ms");
    let engine = Engine::global(false).unwrap();
    let t0 = Instant::now();
    loop {
        // Other tests may be running on the engine: wait for ours to leave.
        let ours = engine
            .inner
            .regs_snapshot()
            .iter()
            .any(|(count, _)| *count == 100);
        if !ours {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 5,
            "the cancelled run is still registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn default_rate_spreads_the_interval() {
    assert_eq!(default_rate(1, 1000), 1.0);
    assert_eq!(default_rate(500, 1000), 500.0);
    assert_eq!(default_rate(65_536, 1000), 10_000.0);
    assert_eq!(default_rate(10, 0), 10_000.0);
}

fn test_session(count: u32, addrs: &[&str]) -> Session {
    let targets = addrs
        .iter()
        .map(|a| Target {
            addr: a.parse().unwrap(),
            flags: AtomicU8::new(ACTIVE),
            reply_ttl: AtomicU16::new(0),
            seq_off: 0,
            dups: AtomicU32::new(0),
            scope: 0,
        })
        .collect();
    let mut s = Session::new(77, count, 56, 1_000_000_000, None, targets);
    s.build_index();
    s
}

#[test]
fn duplicates_are_counted_per_target() {
    let s = test_session(2, &["127.0.0.1", "127.0.0.2", "127.0.0.1"]);
    // The second listing of 127.0.0.1 gets the next block of sequence numbers.
    assert_eq!(s.lookup("127.0.0.1".parse().unwrap(), 0), Some(0));
    assert_eq!(s.lookup("127.0.0.1".parse().unwrap(), 3), Some(5));
    assert_eq!(s.lookup("127.0.0.2".parse().unwrap(), 1), Some(3));
    assert_eq!(s.lookup("127.0.0.2".parse().unwrap(), 2), None);
    assert_eq!(s.lookup("127.0.0.9".parse().unwrap(), 0), None);
    assert_eq!(s.seq_rel(5), Some(3));
    let now_rt = sys::realtime_ns();
    let now_mono = sys::mono_ns();
    s.probes[3].send_rt.store(now_rt, Relaxed);
    s.probes[3].send_mono.store(now_mono & !1, Relaxed);
    s.outstanding.store(1, Relaxed);
    s.on_reply(3, now_rt + 30_000, now_mono + 50_000, Some(60));
    s.on_reply(3, now_rt + 40_000, now_mono + 60_000, Some(60));
    s.on_reply(3, now_rt + 40_000, now_mono + 60_000, Some(60));
    assert_eq!(s.rtt_ns(3), Some(30_000));
    assert_eq!(s.targets[1].dups.load(Relaxed), 2);
    assert_eq!(s.targets[0].dups.load(Relaxed), 0);
    assert_eq!(s.targets[1].reply_ttl.load(Relaxed), 61);
    // A reply to a probe never sent is ignored.
    s.on_reply(0, now_rt, now_mono, None);
    assert_eq!(s.rtt_ns(0), None);
    // A transmit stamp that arrives after the reply moves the start.
    s.on_tx(3, now_rt + 2_000);
    assert_eq!(s.rtt_ns(3), Some(28_000));
    // Only once.
    s.on_tx(3, now_rt + 5_000);
    assert_eq!(s.rtt_ns(3), Some(28_000));
    // A clock step back: realtime RTT negative, the monotonic one counts.
    s.probes[1].send_rt.store(now_rt, Relaxed);
    s.probes[1].send_mono.store(now_mono & !1, Relaxed);
    s.on_reply(1, now_rt - 5_000_000_000, (now_mono & !1) + 45_000, None);
    assert_eq!(s.rtt_ns(1), Some(45_000));
}

#[test]
fn too_many_listings_of_one_address() {
    let addrs = vec!["127.0.0.1"; 700];
    let mut s = test_session(100, &[]);
    s.targets = addrs
        .iter()
        .map(|a| Target {
            addr: a.parse().unwrap(),
            flags: AtomicU8::new(ACTIVE),
            reply_ttl: AtomicU16::new(0),
            seq_off: 0,
            dups: AtomicU32::new(0),
            scope: 0,
        })
        .collect();
    let dropped = s.build_index();
    assert_eq!(dropped.len(), 700 - 655);
    assert_eq!(s.span(false), 65_500);
}

#[test]
fn foreign_packets_never_panic_the_receiver() {
    let Ok(engine) = Engine::global(false) else {
        return;
    };
    let s = Arc::new(test_session(3, &["127.0.0.1"]));
    let (id, base) = engine.inner.register(&s, s.span(false)).unwrap();
    let regs = engine.inner.regs_snapshot_full();
    let mut x: u64 = 99;
    for len in 0..120usize {
        for _ in 0..300 {
            let mut data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // Make many of them look like our replies.
            if len >= 28 && x % 2 == 0 {
                data[0] = 0x45;
                data[20] = 0;
                data[21] = 0;
                data[24..26].copy_from_slice(&id.to_be_bytes());
                data[26..28].copy_from_slice(&base.wrapping_add((x % 5) as u16).to_be_bytes());
            }
            for truncated in [false, true] {
                engine.inner.on_reply(
                    &regs,
                    "127.0.0.1".parse().unwrap(),
                    &data,
                    truncated,
                    None,
                    x,
                    x >> 3,
                );
            }
        }
    }
    engine.inner.deregister(s.token);
}

/// Sets ping_group_range for the life of the guard, then restores it (also on panic).
struct GroupRange(String);

impl GroupRange {
    fn set(v: &str) -> Option<GroupRange> {
        let old = std::fs::read_to_string(PING_GROUP_RANGE).ok()?;
        std::fs::write(PING_GROUP_RANGE, v).ok()?;
        Some(GroupRange(old))
    }
}

impl Drop for GroupRange {
    fn drop(&mut self) {
        let _ = std::fs::write(PING_GROUP_RANGE, self.0.trim());
    }
}

fn dgram_allowed_for_us() -> bool {
    let Ok(s) = std::fs::read_to_string(PING_GROUP_RANGE) else {
        return false;
    };
    let v: Vec<i64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: getegid has no preconditions.
    let gid = i64::from(unsafe { libc::getegid() });
    v.len() == 2 && v[0] <= gid && gid <= v[1]
}

#[test]
fn no_icmp_socket_error_names_both_remedies() {
    let _g = SYSCTL.lock().unwrap_or_else(|e| e.into_inner());
    if dgram_allowed_for_us() {
        return;
    }
    for v6 in [false, true] {
        let e = Engine::open(v6, SocketPref::Dgram)
            .err()
            .expect("dgram socket opened");
        assert!(e.contains("CAP_NET_RAW"), "{e}");
        assert!(e.contains("setcap"), "{e}");
        assert!(e.contains("ping_group_range"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_sockets_work_too() {
    // Open the datagram engines with ping_group_range widened for an instant (root
    // only), then put it back: open sockets keep working.
    let engines = {
        let _g = SYSCTL.lock().unwrap_or_else(|e| e.into_inner());
        let _range = if dgram_allowed_for_us() {
            None
        } else if root() {
            match GroupRange::set("0 0") {
                Some(r) => Some(r),
                None => return,
            }
        } else {
            return;
        };
        let v4 = Engine::open(false, SocketPref::Dgram).map(Arc::new);
        let v6 = Engine::open(true, SocketPref::Dgram).map(Arc::new);
        (v4.unwrap(), v6.unwrap())
    };
    assert_eq!(engines.0.kind(), "dgram");
    let open = Context::default();
    let pick = |v6: bool| {
        Ok(if v6 {
            engines.1.clone()
        } else {
            engines.0.clone()
        })
    };
    let out = run_with(host("127.0.0.1", 3), &open, pick).await.unwrap();
    assert_eq!(out.socket, "dgram");
    assert_all_replied(&out, 3);
    assert_eq!(out.targets[0].reply_ttl, Some(64));
    let out = run_with(host("::1", 3), &open, pick).await.unwrap();
    assert_all_replied(&out, 3);
    // Concurrent runs on one datagram socket: the kernel gives them one identifier,
    // so they are told apart by sequence blocks.
    let mut t = loopback_targets(300);
    t.push("::1".into());
    let mut p = params(t, 3, 10);
    p.rate = Some(20_000.0);
    let (a, b) = tokio::join!(run_with(p.clone(), &open, pick), run_with(p, &open, pick));
    for out in [a.unwrap(), b.unwrap()] {
        assert_all_replied(&out, 3);
    }
}

#[test]
fn engine_has_a_large_receive_buffer_and_tx_stamps() {
    let Ok(e) = Engine::global(false) else { return };
    assert!(e.rcvbuf() >= engine::RCVBUF, "SO_RCVBUF {}", e.rcvbuf());
    if root() {
        assert!(e.tx_stamps());
    }
}
