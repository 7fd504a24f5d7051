//! The `traceroute` and `mtr` modules through a chain of network namespaces the test
//! builds: host → r1 → r2 → r3 → destination (see `imn_tests::netns::Chain`), with real
//! Linux routers answering time exceeded. The tests call the modules directly and
//! check the typed results. They need root (namespaces, raw sockets).
//!
//! Each test has its own chain on its own 198.19.{third}.0/24, so they run in
//! parallel.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use imn_probes::{run, Context};
use imn_proto::kinds::traceroute::{MtrResult, TraceProtocol, TraceReply, TracerouteResult};
use imn_proto::results::ModuleOutput;
use imn_tests::netns::{sh, Chain};
use serde_json::{json, Value};

/// Most time a module run may take here.
const MODULE_TIMEOUT: Duration = Duration::from_secs(120);

async fn traceroute(params: Value) -> TracerouteResult {
    let out = tokio::time::timeout(
        MODULE_TIMEOUT,
        run("traceroute", &params.to_string(), &Context::default()),
    )
    .await
    .expect("traceroute finishes within the module timeout");
    match out {
        Ok(ModuleOutput::Traceroute(r)) => *r,
        other => panic!("traceroute {params}: {other:?}"),
    }
}

async fn mtr(params: Value) -> MtrResult {
    let out = tokio::time::timeout(
        MODULE_TIMEOUT,
        run("mtr", &params.to_string(), &Context::default()),
    )
    .await
    .expect("mtr finishes within the module timeout");
    match out {
        Ok(ModuleOutput::Mtr(r)) => *r,
        other => panic!("mtr {params}: {other:?}"),
    }
}

/// Prints a trace as traceroute(8) would, for the test log.
fn show(r: &TracerouteResult) {
    println!(
        "{} to {} ({}) from {}, stop: {}",
        r.protocol.upper(),
        r.host,
        r.dst_addr,
        r.src_addr,
        r.stop_reason
    );
    for h in &r.hops {
        let probes: Vec<String> = h
            .probes
            .iter()
            .map(|p| match p {
                Some(p) => format!(
                    "{} {:.3} ms ttl {} {}",
                    p.from,
                    p.rtt_ms,
                    p.ttl,
                    p.err
                        .as_deref()
                        .map(|e| format!("!{e}"))
                        .or(p.tcp_flags.clone())
                        .unwrap_or_default()
                ),
                None => "*".into(),
            })
            .collect();
        println!("{:3}  {}", h.ttl, probes.join("  "));
    }
}

/// A plausible answer from `from`: an RTT above 0 and below the probe timeout.
fn answered<'a>(p: &'a Option<TraceReply>, from: &str, timeout_ms: u64) -> &'a TraceReply {
    let p = p
        .as_ref()
        .unwrap_or_else(|| panic!("no answer where {from} should be"));
    assert_eq!(p.from, from);
    assert!(
        p.rtt_ms > 0.0 && p.rtt_ms < timeout_ms as f64,
        "rtt {}",
        p.rtt_ms
    );
    assert!(p.size >= 8 && p.ttl > 0, "{p:?}");
    p
}

/// Checks a complete IPv4 trace: every router in order, then the destination.
fn check_full_trace(chain: &Chain, r: &TracerouteResult, probes: usize, timeout_ms: u64) {
    check_full_trace_with(chain, r, probes, timeout_ms, 11);
}

/// Checks a complete trace whose routers answer with ICMP type `time_exceeded`.
fn check_full_trace_with(
    chain: &Chain,
    r: &TracerouteResult,
    probes: usize,
    timeout_ms: u64,
    time_exceeded: u8,
) {
    show(r);
    assert!(r.destination_reached, "{r:?}");
    assert_eq!(r.stop_reason, "destination");
    assert_eq!(r.dst_addr, chain.dest_ip);
    assert_eq!(r.src_addr, chain.host_ip);
    assert_eq!(r.hops.len(), chain.hops.len(), "{r:?}");
    let last = chain.hops.len() - 1;
    for (i, (hop, addr)) in r.hops.iter().zip(&chain.hops).enumerate() {
        assert_eq!(usize::from(hop.ttl), i + 1);
        assert_eq!(hop.probes.len(), probes);
        for p in &hop.probes {
            let p = answered(p, addr, timeout_ms);
            if i < last {
                // Time exceeded, our probe quoted as it arrived (TTL 1).
                assert_eq!(
                    (p.icmp_type, p.icmp_code),
                    (Some(time_exceeded), Some(0)),
                    "{p:?}"
                );
                assert_eq!(p.quoted_ttl, Some(1));
                assert_eq!(p.err, None);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_trace_shows_every_hop() {
    let chain = Chain::create(241, 3);
    let r = traceroute(json!({"host": chain.dest_ip, "timeout_ms": 2000, "paris_id": 5})).await;
    check_full_trace(&chain, &r, 3, 2000);
    atlas_parses(&chain, &r);
    assert_eq!(r.protocol, TraceProtocol::Icmp);
    assert_eq!((r.port, r.src_port, r.paris_id), (0, 0, 5));
    for p in r.hops.last().unwrap().probes.iter().flatten() {
        assert_eq!(
            (p.icmp_type, p.icmp_code, p.err.as_deref()),
            (Some(0), Some(0), None)
        );
        // The destination is 4 hops away and starts at TTL 64.
        assert_eq!(p.ttl, 61);
    }
    // first_ttl skips the first hops.
    let r = traceroute(json!({"host": chain.dest_ip, "first_ttl": 3, "probes": 1})).await;
    show(&r);
    assert!(r.destination_reached);
    let hops: Vec<(u8, String)> = r
        .hops
        .iter()
        .map(|h| (h.ttl, h.probes[0].as_ref().unwrap().from.clone()))
        .collect();
    assert_eq!(
        hops,
        vec![(3, chain.hops[2].clone()), (4, chain.dest_ip.clone())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_trace_ends_with_port_unreachable() {
    let chain = Chain::create(242, 3);
    let r = traceroute(json!({"host": chain.dest_ip, "protocol": "udp", "timeout_ms": 2000})).await;
    check_full_trace(&chain, &r, 3, 2000);
    assert_eq!((r.port, r.src_port), (33434, 40_000));
    for p in r.hops.last().unwrap().probes.iter().flatten() {
        // The destination's port unreachable is the expected end, not an error.
        assert_eq!(
            (p.icmp_type, p.icmp_code, p.err.as_deref()),
            (Some(3), Some(3), None)
        );
    }
    atlas_parses(&chain, &r);
    // Another port and flow, one probe per hop.
    let r = traceroute(
        json!({"host": chain.dest_ip, "protocol": "udp", "port": 40_123,
                              "paris_id": 9, "probes": 1, "size": 200}),
    )
    .await;
    check_full_trace(&chain, &r, 1, 1000);
    assert_eq!((r.port, r.src_port, r.size), (40_123, 40_009, 200));
    // Two traces of the same flow at once: each reads only its own answers.
    let p = json!({"host": chain.dest_ip, "protocol": "udp", "probes": 2});
    let (a, b) = tokio::join!(traceroute(p.clone()), traceroute(p));
    check_full_trace(&chain, &a, 2, 1000);
    check_full_trace(&chain, &b, 2, 1000);
}

/// The Atlas form of a real trace reads in ripe.atlas.sagan as the trace was.
fn atlas_parses(chain: &Chain, r: &TracerouteResult) {
    let row = imn_backend::store::ResultRow {
        agent_id: "agent-1".into(),
        request_id: "trace-1".into(),
        module: "traceroute".into(),
        epoch: 1,
        seq: 1,
        state: imn_proto::wire::RequestState::Succeeded,
        result: serde_json::to_value(r).unwrap(),
        error: None,
        received_ms: r.started_ms as i64,
        started_ms: r.started_ms as i64,
        finished_ms: r.started_ms as i64 + 1000,
        stored_ms: r.started_ms as i64 + 1000,
        scheduled_ms: None,
        at_ms: r.started_ms as i64 + 1000,
    };
    let atlas = imn_backend::atlas::convert(&row).expect("an Atlas traceroute");
    assert_eq!(atlas.len(), 1);
    let script = r#"
import json, sys
from ripe.atlas.sagan import TracerouteResult
r = TracerouteResult(sys.stdin.read(), on_error=TracerouteResult.ACTION_FAIL)
print(json.dumps({"total_hops": r.total_hops, "dst": r.destination_address,
                  "success": r.is_success, "responded": r.destination_ip_responded,
                  "ip_path": r.ip_path, "proto": r.protocol}))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        atlas[0].to_string().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sagan failed on {}", atlas[0]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("sagan: {v}");
    assert_eq!(v["total_hops"], chain.hops.len());
    assert_eq!(v["dst"], chain.dest_ip);
    assert_eq!(
        (v["success"].as_bool(), v["responded"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(v["proto"], r.protocol.upper());
    let path: Vec<Vec<String>> = chain
        .hops
        .iter()
        .map(|h| vec![h.clone(); usize::from(r.probes_per_hop)])
        .collect();
    assert_eq!(v["ip_path"], json!(path));
}

/// A TCP listener (IPv4 and IPv6) in the destination's namespace (a child process,
/// killed on drop).
struct Listener(Child);

impl Listener {
    fn start(ns: &str, port: u16) -> Listener {
        let script = format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET6)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
             s.bind(('::', {port}))\n\
             s.listen(64)\n\
             print('listening', flush=True)\n\
             time.sleep(300)\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3 listener");
        let l = Listener(child);
        let t0 = Instant::now();
        loop {
            let (_, out) = sh(&format!("ip netns exec {ns} ss -ltnH 'sport = :{port}'"));
            if out.contains(&format!(":{port}")) {
                return l;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "listener on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_trace_to_open_and_closed_ports() {
    let chain = Chain::create(243, 3);
    let _listener = Listener::start(chain.dest(), 8080);
    // Open port: SYN-ACK.
    let r = traceroute(
        json!({"host": chain.dest_ip, "protocol": "tcp", "port": 8080,
                              "timeout_ms": 2000}),
    )
    .await;
    check_full_trace(&chain, &r, 3, 2000);
    atlas_parses(&chain, &r);
    for p in r.hops.last().unwrap().probes.iter().flatten() {
        assert_eq!(p.tcp_flags.as_deref(), Some("SA"), "{p:?}");
        assert_eq!((p.icmp_type, p.err.as_deref()), (None, None));
    }
    // Closed port: RST.
    let r = traceroute(
        json!({"host": chain.dest_ip, "protocol": "tcp", "port": 8081,
                              "timeout_ms": 2000, "paris_id": 1}),
    )
    .await;
    check_full_trace(&chain, &r, 3, 2000);
    assert_eq!((r.port, r.src_port), (8081, 40_001));
    for p in r.hops.last().unwrap().probes.iter().flatten() {
        assert_eq!(p.tcp_flags.as_deref(), Some("RA"), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_router_shows_as_stars() {
    let chain = Chain::create(244, 3);
    chain.silence_router(2);
    for protocol in ["icmp", "udp"] {
        let r = traceroute(json!({"host": chain.dest_ip, "protocol": protocol,
                                  "timeout_ms": 800}))
        .await;
        show(&r);
        assert!(r.destination_reached, "{r:?}");
        assert_eq!(r.hops.len(), 4);
        assert!(
            r.hops[1].probes.iter().all(Option::is_none),
            "{:?}",
            r.hops[1]
        );
        for i in [0usize, 2, 3] {
            for p in &r.hops[i].probes {
                answered(p, &chain.hops[i], 800);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_ends_at_the_gap_limit() {
    let chain = Chain::create(245, 3);
    let t0 = Instant::now();
    let r = traceroute(
        json!({"host": chain.unused_ip, "max_ttl": 12, "timeout_ms": 400,
                              "probes": 2, "max_gaps": 3}),
    )
    .await;
    let took = t0.elapsed();
    show(&r);
    assert!(!r.destination_reached, "{r:?}");
    assert_ne!(r.stop_reason, "destination");
    assert!(r.hops.len() <= 12);
    // The routers still answer.
    for i in 0..3 {
        for p in &r.hops[i].probes {
            answered(p, &chain.hops[i], 400);
        }
    }
    // Beyond r3 nobody answers in time (r3's ARP for the address fails after
    // seconds, and its host unreachable comes too late), or r3 says unreachable.
    for h in &r.hops[3..] {
        for p in h.probes.iter().flatten() {
            assert_eq!(p.from, chain.hops[2]);
            assert_eq!(p.icmp_type, Some(3));
        }
    }
    match r.stop_reason.as_str() {
        "gaps" => {
            assert_eq!(r.hops.len(), 6, "3 answering hops, then 3 silent ones");
            assert!(r.hops[3..]
                .iter()
                .all(|h| h.probes.iter().all(Option::is_none)));
        }
        "unreachable" => {}
        other => panic!("stopped by {other}"),
    }
    // 3 silent hops at 400 ms each, and the answering hops: far less than max_ttl
    // timeouts would be.
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtr_counts_loss_per_hop() {
    let chain = Chain::create(246, 3);
    chain.silence_router(2);
    let m = mtr(
        json!({"host": chain.dest_ip, "count": 3, "interval_ms": 100,
                       "timeout_ms": 800, "probes": 2}),
    )
    .await;
    for h in &m.hops {
        println!(
            "{:3} {:?} sent {} rcvd {} loss {:.0}% best {:?} avg {:?} worst {:?} stdev {:?} jitter {:?}",
            h.ttl,
            h.addrs,
            h.sent,
            h.received,
            h.loss_pct,
            h.best_ms,
            h.avg_ms,
            h.worst_ms,
            h.stdev_ms,
            h.jitter_ms
        );
    }
    assert_eq!(m.rounds, 3);
    assert!(m.destination_reached);
    assert_eq!(
        (m.dst_addr.as_str(), m.src_addr.as_str()),
        (chain.dest_ip.as_str(), chain.host_ip.as_str())
    );
    assert_eq!(m.hops.len(), 4);
    for (i, h) in m.hops.iter().enumerate() {
        assert_eq!(usize::from(h.ttl), i + 1);
        assert_eq!(h.sent, 6, "3 rounds × 2 probes");
        assert_eq!(h.rtts_ms.len(), 6);
        let by_addr: u32 = h.addrs.iter().map(|a| a.count).sum();
        assert_eq!(by_addr, h.received);
        assert_eq!(h.received as usize, h.rtts_ms.iter().flatten().count());
        if i == 1 {
            assert_eq!((h.received, h.loss_pct), (0, 100.0));
            assert!(h.addrs.is_empty() && h.avg_ms.is_none());
        } else {
            assert_eq!((h.received, h.loss_pct), (6, 0.0), "{h:?}");
            assert_eq!(h.addrs.len(), 1);
            assert_eq!(h.addrs[0].addr, chain.hops[i]);
            let (best, avg, worst) = (h.best_ms.unwrap(), h.avg_ms.unwrap(), h.worst_ms.unwrap());
            assert!(0.0 < best && best <= avg && avg <= worst && worst < 800.0);
            assert!(h.stdev_ms.unwrap() >= 0.0 && h.jitter_ms.unwrap() >= 0.0);
            assert!(h.jitter_max_ms.unwrap() >= h.jitter_ms.unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_traces_over_icmpv6_udp_and_tcp() {
    let chain = Chain::create6(248, 3);
    let _listener = Listener::start(chain.dest(), 8080);
    // The first packets through a fresh IPv6 chain wait about a second for neighbour
    // discovery on the routers: one trace first, so the RTTs below are the path's.
    let warm = traceroute(json!({"host": chain.dest_ip, "probes": 1, "timeout_ms": 3000})).await;
    assert!(warm.destination_reached, "{warm:?}");
    for (protocol, port) in [
        ("icmp", None),
        ("udp", None),
        ("tcp", Some(8080)),
        ("tcp", Some(8081)),
    ] {
        let mut p = json!({"host": chain.dest_ip, "protocol": protocol, "timeout_ms": 2000});
        if let Some(port) = port {
            p["port"] = json!(port);
        }
        let r = traceroute(p).await;
        assert_eq!(r.af, 6);
        check_full_trace_with(&chain, &r, 3, 2000, 3);
        for p in r.hops.last().unwrap().probes.iter().flatten() {
            let want = match (protocol, port) {
                ("icmp", _) => (Some(129), Some(0), None),
                ("udp", _) => (Some(1), Some(4), None),
                (_, Some(8080)) => (None, None, Some("SA")),
                _ => (None, None, Some("RA")),
            };
            assert_eq!(
                (p.icmp_type, p.icmp_code, p.tcp_flags.as_deref()),
                want,
                "{p:?}"
            );
            assert_eq!(p.err, None);
        }
    }
    // The loopback address: one hop.
    let r = traceroute(json!({"host": "::1", "probes": 1})).await;
    assert!(r.destination_reached && r.hops.len() == 1, "{r:?}");
    // A silent IPv6 router.
    drop(_listener);
    let (ok, out) = sh(&format!(
        "ip netns exec {ns} nft add table inet imntr && \
         ip netns exec {ns} nft add chain inet imntr out '{{ type filter hook output priority 0; policy accept; }}' && \
         ip netns exec {ns} nft add rule inet imntr out icmpv6 type time-exceeded drop",
        ns = chain.router(2)
    ));
    assert!(ok, "{out}");
    let r = traceroute(json!({"host": chain.dest_ip, "protocol": "udp", "timeout_ms": 800})).await;
    show(&r);
    assert!(r.destination_reached);
    assert!(r.hops[1].probes.iter().all(Option::is_none));
    answered(&r.hops[2].probes[0], &chain.hops[2], 800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_refused_in_words() {
    let e = run(
        "traceroute",
        r#"{"host": "127.0.0.1", "first_ttl": 5, "max_ttl": 2}"#,
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("first_ttl"), "{e}");
    let e = run(
        "mtr",
        r#"{"host": "127.0.0.1", "count": 0}"#,
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("count"), "{e}");
    // Probes are not fragmented: over a veth (MTU 1500) a 2048-byte payload does
    // not fit, and the error says why.
    let chain = Chain::create(247, 1);
    let e = run(
        "traceroute",
        &json!({"host": chain.dest_ip, "size": 2048}).to_string(),
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("MTU"), "{e}");
}

/// A trace of the loopback address: one hop, the destination itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_one_hop() {
    for protocol in ["icmp", "udp", "tcp"] {
        let r = traceroute(json!({"host": "127.0.0.1", "protocol": protocol, "probes": 2})).await;
        show(&r);
        assert!(r.destination_reached, "{r:?}");
        assert_eq!(r.hops.len(), 1);
        for p in &r.hops[0].probes {
            answered(p, "127.0.0.1", 1000);
        }
    }
}
