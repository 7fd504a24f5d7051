//! Runs the `traceroute` and `mtr` modules: Paris traceroute over raw sockets, IPv4
//! and IPv6.
//!
//! A trace sends whole IP packets through an `IPPROTO_RAW` socket (so it sets the
//! TTL and every header field itself, see `packet`), and reads answers from a raw
//! ICMP / ICMPv6 socket (time exceeded, destination unreachable, parameter problem,
//! echo replies) and, for TCP, a raw TCP socket (SYN-ACK, RST). Hop by hop, it sends all
//! probes of a TTL at once and waits until each is answered or `timeout_ms` has passed
//! since the last one was sent, so a trace through hops that answer takes a few RTTs
//! per hop, and silent hops cost one timeout each, up to `max_gaps` in a row.
//!
//! RTTs: the kernel's receive stamp (`SO_TIMESTAMPNS`, CLOCK_REALTIME) minus
//! CLOCK_REALTIME read just before `sendto`; where the kernel gives no stamp, or the
//! clock was stepped (the realtime RTT is not positive, or longer than the monotonic
//! one), the monotonic clock's measure.
//!
//! The work runs on a blocking thread; dropping the future (a cancelled run) stops it
//! within 100 ms.

mod packet;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::ping::sys;
use super::Context;
use imn_proto::kinds::traceroute::{
    MtrAddr, MtrHop, MtrParams, MtrResult, TraceHop, TraceProtocol, TraceReply, TracerouteParams,
    TracerouteResult, DEFAULT_TCP_PORT, DEFAULT_UDP_PORT, MAX_ROUNDS,
};
use packet::{Answer, AnswerKind, Flow, ID_SPAN};

/// Source ports of UDP and TCP probes are this plus the Paris id.
const SRC_PORT_BASE: u16 = 40_000;
/// ICMP checksums of echo probes are this plus the Paris id.
const ICMP_CHECKSUM_BASE: u16 = 0x1000;
/// Default payload of ICMP and UDP probes, as Atlas.
const DEFAULT_SIZE: u16 = 48;
/// Longest wait in one `poll`, so a cancelled run stops soon.
const POLL_SLICE_MS: u64 = 100;

/// Runs one trace.
pub async fn run(p: TracerouteParams, ctx: &Context) -> Result<TracerouteResult, String> {
    p.validate()?;
    let dst = destination(ctx, &p.host).await?;
    let icmp_id = sys::random_u64() as u16;
    blocking(move |cancel| {
        let socks = Sockets::open(p.protocol, dst.is_ipv6())?;
        trace(&socks, &p, dst, icmp_id, cancel)
    })
    .await
}

/// Runs `count` traces and summarises each hop.
pub async fn run_mtr(p: MtrParams, ctx: &Context) -> Result<MtrResult, String> {
    let tp = p.trace();
    tp.validate()?;
    if !(1..=MAX_ROUNDS).contains(&p.count) {
        return Err(format!("count must be 1..={MAX_ROUNDS}, got {}", p.count));
    }
    if p.interval_ms > 60_000 {
        return Err(format!(
            "interval_ms must be at most 60000, got {}",
            p.interval_ms
        ));
    }
    let dst = destination(ctx, &p.host).await?;
    // One ICMP identifier for every round: the flow stays the same.
    let icmp_id = sys::random_u64() as u16;
    blocking(move |cancel| {
        let socks = Sockets::open(tp.protocol, dst.is_ipv6())?;
        let started = sys::mono_ns();
        let mut rounds = Vec::with_capacity(p.count as usize);
        for i in 0..u64::from(p.count) {
            if i > 0 {
                let next = started + i * p.interval_ms * 1_000_000;
                while sys::mono_ns() < next {
                    if cancel.load(Relaxed) {
                        return Err("mtr cancelled".into());
                    }
                    let left = (next - sys::mono_ns().min(next)) / 1_000_000;
                    std::thread::sleep(std::time::Duration::from_millis(
                        left.clamp(1, POLL_SLICE_MS),
                    ));
                }
            }
            rounds.push(trace(&socks, &tp, dst, icmp_id, cancel)?);
        }
        Ok(summarise(&p, &rounds, ms_since(started)))
    })
    .await
}

/// Resolves the host to one address (an IPv4-mapped IPv6 address is traced over
/// IPv4), checked against the run's policy: every probe of every round is addressed
/// to it, whatever its TTL.
async fn destination(ctx: &Context, host: &str) -> Result<IpAddr, String> {
    Ok(super::resolve_permitted(ctx, host.trim())
        .await?
        .to_canonical())
}

/// Runs `f` on a blocking thread with a flag that is set when the caller's future is
/// dropped.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce(&AtomicBool) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    struct CancelOnDrop(Arc<AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let flag = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(flag.clone());
    tokio::task::spawn_blocking(move || f(&flag))
        .await
        .map_err(|e| format!("the traceroute thread failed: {e}"))?
}

/// The sockets of a trace.
struct Sockets {
    /// `IPPROTO_RAW`: whole IPv4 packets out (never receives).
    send: Socket,
    /// Raw ICMP or ICMPv6: errors and echo replies in.
    icmp: Socket,
    /// Raw TCP, for TCP traces: SYN-ACK and RST in.
    tcp: Option<Socket>,
}

impl Sockets {
    fn open(proto: TraceProtocol, v6: bool) -> Result<Sockets, String> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let raw = |p: libc::c_int, what: &str| {
            Socket::new(domain, Type::RAW, Some(Protocol::from(p))).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                    format!(
                        "traceroute needs CAP_NET_RAW: cannot open a raw {what} socket ({e}); \
                         run the agent as root, or give it the capability (setcap \
                         cap_net_raw+ep /path/to/imn-agent, or AmbientCapabilities=CAP_NET_RAW \
                         in its systemd unit)"
                    )
                } else {
                    format!("cannot open a raw {what} socket: {e}")
                }
            })
        };
        // IPPROTO_RAW implies IP_HDRINCL / IPV6_HDRINCL: we write the IP header.
        let send = raw(libc::IPPROTO_RAW, "IP")?;
        // Only the ICMP types that answer probes (the filters' bits block). Optional:
        // without a filter, other ICMP is read and ignored.
        let icmp = if v6 {
            let s = raw(libc::IPPROTO_ICMPV6, "ICMPv6")?;
            let mut block = [u32::MAX; 8];
            for t in [1u8, 3, 4, packet::ICMP6_ECHO_REPLY] {
                block[usize::from(t >> 5)] &= !(1 << (t & 31));
            }
            let _ = sys::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_ICMPV6,
                sys::ICMP6_FILTER,
                &block,
            );
            s
        } else {
            let s = raw(libc::IPPROTO_ICMP, "ICMP")?;
            let pass: u32 = (1 << packet::ICMP_ECHO_REPLY)
                | (1 << packet::ICMP_UNREACH)
                | (1 << packet::ICMP_TIME_EXCEEDED)
                | (1 << 12);
            let _ = sys::setsockopt(s.as_raw_fd(), sys::SOL_RAW, sys::ICMP_FILTER, &!pass);
            s
        };
        let tcp = match proto {
            TraceProtocol::Tcp => Some(raw(libc::IPPROTO_TCP, "TCP")?),
            _ => None,
        };
        for s in std::iter::once(&icmp).chain(tcp.as_ref()) {
            let fd = s.as_raw_fd();
            let on: libc::c_int = 1;
            // Optional: without kernel stamps, the receive time is read after recvmmsg.
            let _ = (cfg!(target_pointer_width = "32")
                && sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_NEW, &on).is_ok())
                || sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_OLD, &on).is_ok();
            if v6 {
                // The hop limit of answers (IPv6 raw sockets give no IP header).
                sys::setsockopt(fd, libc::IPPROTO_IPV6, sys::IPV6_RECVHOPLIMIT, &on)
                    .map_err(|e| format!("cannot set IPV6_RECVHOPLIMIT: {e}"))?;
            }
            s.set_nonblocking(true)
                .map_err(|e| format!("cannot make a raw socket non-blocking: {e}"))?;
        }
        Ok(Sockets { send, icmp, tcp })
    }

    /// The receiving sockets, each with the protocol it reads (for IPv6, where the
    /// packets come without their IP header).
    fn receivers(&self, v6: bool) -> Vec<(RawFd, u8)> {
        let icmp = if v6 { 58 } else { 1 };
        std::iter::once((self.icmp.as_raw_fd(), icmp))
            .chain(self.tcp.as_ref().map(|s| (s.as_raw_fd(), 6)))
            .collect()
    }
}

/// The source address the kernel picks towards `dst` (a UDP connect sends nothing).
fn source_for(dst: IpAddr, port: u16) -> Result<IpAddr, String> {
    let any: IpAddr = match dst {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind((any, 0)).map_err(|e| format!("cannot find a source address: {e}"))?;
    s.connect((dst, port.max(1)))
        .map_err(|e| format!("no route to {dst}: {e}"))?;
    s.local_addr()
        .map(|a| a.ip())
        .map_err(|e| format!("no source address towards {dst}: {e}"))
}

fn ms_since(start_mono: u64) -> f64 {
    sys::mono_ns().saturating_sub(start_mono) as f64 / 1e6
}

/// When a probe left.
#[derive(Clone, Copy)]
struct Sent {
    real_ns: u64,
    mono_ns: u64,
}

/// The first wire id of a new trace. Traces that run at once in this process take
/// consecutive slots of `ID_SPAN` ids, so up to `SLOTS` of them (to the same
/// destination, on the same flow) never take each other's answers; the process id
/// spreads agents on one machine over the slots.
fn next_base() -> u16 {
    const SLOTS: u32 = (0xffff - 1) / ID_SPAN as u32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let slot = NEXT.fetch_add(1, Relaxed).wrapping_add(std::process::id()) % SLOTS;
    1 + (slot as u16) * ID_SPAN
}

/// One trace, with open sockets.
fn trace(
    socks: &Sockets,
    p: &TracerouteParams,
    dst: IpAddr,
    icmp_id: u16,
    cancel: &AtomicBool,
) -> Result<TracerouteResult, String> {
    let v6 = dst.is_ipv6();
    let (port, size) = match p.protocol {
        TraceProtocol::Icmp => (0, p.size.unwrap_or(DEFAULT_SIZE)),
        TraceProtocol::Udp => (
            p.port.unwrap_or(DEFAULT_UDP_PORT),
            p.size.unwrap_or(DEFAULT_SIZE),
        ),
        TraceProtocol::Tcp => (p.port.unwrap_or(DEFAULT_TCP_PORT), p.size.unwrap_or(0)),
    };
    let src = source_for(dst, port)?;
    let src_port = match p.protocol {
        TraceProtocol::Icmp => 0,
        _ => SRC_PORT_BASE + p.paris_id,
    };
    let r = sys::random_u64();
    let flow = Flow {
        proto: p.protocol,
        src,
        dst,
        sport: src_port,
        dport: port,
        icmp_id,
        icmp_checksum: ICMP_CHECKSUM_BASE + p.paris_id,
        base: next_base(),
        tcp_seq: (r >> 32) as u32,
        size: usize::from(size),
    };
    let dst_sa = SockAddr::from(SocketAddr::new(dst, 0));
    let timeout_ns = p.timeout_ms.saturating_mul(1_000_000);
    let started_ms = sys::realtime_ns() / 1_000_000;
    let start_mono = sys::mono_ns();
    let fds = socks.receivers(v6);
    let mut batch = sys::RecvBatch::new();
    let probes = usize::from(p.probes);

    let mut hops = Vec::new();
    let mut next_k: u16 = 0;
    let mut gaps = 0u8;
    let mut reached = false;
    let mut stop = "max_ttl";
    for ttl in p.first_ttl..=p.max_ttl {
        if cancel.load(Relaxed) {
            return Err("traceroute cancelled".into());
        }
        let first_k = next_k;
        let mut sent = Vec::with_capacity(probes);
        for _ in 0..probes {
            let pkt = flow.packet(next_k, ttl);
            let at = Sent {
                real_ns: sys::realtime_ns(),
                mono_ns: sys::mono_ns(),
            };
            sys::send_to(socks.send.as_raw_fd(), &dst_sa, &pkt, None).map_err(|e| {
                if e.raw_os_error() == Some(libc::EMSGSIZE) {
                    // Probes are never fragmented by the sender (IP_HDRINCL).
                    format!(
                        "a probe of {} bytes is larger than the MTU towards {dst}: use a \
                         smaller size ({e})",
                        pkt.len()
                    )
                } else {
                    format!("cannot send a probe with TTL {ttl} to {dst}: {e}")
                }
            })?;
            sent.push(at);
            next_k += 1;
        }
        let mut replies: Vec<Option<TraceReply>> = vec![None; probes];
        let deadline = sys::mono_ns() + timeout_ns;
        while replies.iter().any(Option::is_none) {
            let now = sys::mono_ns();
            if now >= deadline || cancel.load(Relaxed) {
                break;
            }
            let poll_fds: Vec<RawFd> = fds.iter().map(|f| f.0).collect();
            wait_readable(
                &poll_fds,
                ((deadline - now) / 1_000_000 + 1).min(POLL_SLICE_MS),
            )?;
            for &(fd, proto) in &fds {
                loop {
                    let n = batch
                        .recv(fd, 0)
                        .map_err(|e| format!("cannot read a raw socket: {e}"))?;
                    for i in 0..n {
                        let d = batch.get(i);
                        let answer = match (v6, d.src) {
                            (false, _) => flow.classify(d.data),
                            (true, Some(IpAddr::V6(from))) => {
                                flow.classify_v6(d.data, proto, from, d.anc.ttl.unwrap_or(0))
                            }
                            (true, _) => None,
                        };
                        let Some(a) = answer else {
                            continue;
                        };
                        let Some(j) = a.k.checked_sub(first_k).map(usize::from) else {
                            continue;
                        };
                        if j >= probes || replies[j].is_some() {
                            continue; // late, or a duplicate
                        }
                        let rtt_ns = rtt(sent[j], d.anc.rx_ns);
                        replies[j] = Some(reply(&flow, a, rtt_ns));
                    }
                    if n < sys::BATCH {
                        break;
                    }
                }
            }
        }
        let dst_s = dst.to_string();
        let hop_reached = replies.iter().flatten().any(|r| r.from == dst_s);
        let unreachable = replies
            .iter()
            .flatten()
            .any(|r| r.from != dst_s && r.icmp_type.is_some_and(|t| packet::is_unreach(v6, t)));
        let silent = replies.iter().all(Option::is_none);
        hops.push(TraceHop {
            ttl,
            probes: replies,
        });
        if hop_reached {
            reached = true;
            stop = "destination";
            break;
        }
        if unreachable {
            stop = "unreachable";
            break;
        }
        if silent {
            gaps += 1;
            if gaps >= p.max_gaps {
                stop = "gaps";
                break;
            }
        } else {
            gaps = 0;
        }
    }
    Ok(TracerouteResult {
        host: p.host.clone(),
        dst_addr: dst.to_string(),
        src_addr: src.to_string(),
        af: if v6 { 6 } else { 4 },
        protocol: p.protocol,
        port,
        src_port,
        icmp_checksum: match p.protocol {
            TraceProtocol::Icmp => flow.icmp_checksum,
            _ => 0,
        },
        paris_id: p.paris_id,
        size,
        first_ttl: p.first_ttl,
        max_ttl: p.max_ttl,
        probes_per_hop: p.probes,
        timeout_ms: p.timeout_ms,
        destination_reached: reached,
        stop_reason: stop.into(),
        hops,
        started_ms,
        duration_ms: ms_since(start_mono),
    })
}

/// Waits until one of `fds` is readable, or `ms` have passed.
fn wait_readable(fds: &[RawFd], ms: u64) -> Result<(), String> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a live array of pollfd of the length given.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms as i32) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll on raw sockets failed: {e}"));
        }
    }
    Ok(())
}

/// The RTT of a probe answered now, preferring the kernel's receive stamp.
fn rtt(sent: Sent, rx_ns: Option<u64>) -> u64 {
    let mono = sys::mono_ns().saturating_sub(sent.mono_ns);
    match rx_ns.map(|rx| rx as i128 - sent.real_ns as i128) {
        Some(r) if r > 0 && r <= mono as i128 => r as u64,
        _ => mono.max(1),
    }
}

fn reply(flow: &Flow, a: Answer, rtt_ns: u64) -> TraceReply {
    let mut r = TraceReply {
        from: a.from.to_string(),
        rtt_ms: rtt_ns as f64 / 1e6,
        ttl: a.ttl,
        size: a.size,
        icmp_type: None,
        icmp_code: None,
        tcp_flags: None,
        err: None,
        quoted_ttl: None,
        icmp_ext: None,
    };
    match a.kind {
        AnswerKind::IcmpError {
            icmp_type,
            code,
            quoted_ttl,
            ext,
        } => {
            r.icmp_type = Some(icmp_type);
            r.icmp_code = Some(code);
            r.quoted_ttl = Some(quoted_ttl);
            r.icmp_ext = ext;
            // The destination's port unreachable is the answer a UDP trace wants.
            let v6 = flow.dst.is_ipv6();
            let expected = a.from == flow.dst
                && packet::is_port_unreach(v6, icmp_type, code)
                && flow.proto == TraceProtocol::Udp;
            if !expected {
                r.err = packet::atlas_err(v6, icmp_type, code);
            }
        }
        AnswerKind::EchoReply => {
            r.icmp_type = Some(if flow.dst.is_ipv6() {
                packet::ICMP6_ECHO_REPLY
            } else {
                packet::ICMP_ECHO_REPLY
            });
            r.icmp_code = Some(0);
        }
        AnswerKind::Tcp { flags } => r.tcp_flags = Some(packet::tcp_flags_text(flags)),
    }
    r
}

/// Per-hop statistics over the rounds of an mtr.
fn summarise(p: &MtrParams, rounds: &[TracerouteResult], duration_ms: f64) -> MtrResult {
    #[derive(Default)]
    struct Acc {
        sent: u32,
        addrs: Vec<(String, u32)>,
        errors: Vec<String>,
        rtts: Vec<Option<f64>>,
    }
    let mut by_ttl: HashMap<u8, Acc> = HashMap::new();
    let mut reached_ttl: Option<u8> = None;
    for round in rounds {
        for hop in &round.hops {
            let acc = by_ttl.entry(hop.ttl).or_default();
            for probe in &hop.probes {
                acc.sent += 1;
                acc.rtts.push(probe.as_ref().map(|r| r.rtt_ms));
                let Some(r) = probe else { continue };
                match acc.addrs.iter_mut().find(|(a, _)| *a == r.from) {
                    Some((_, n)) => *n += 1,
                    None => acc.addrs.push((r.from.clone(), 1)),
                }
                if let Some(e) = &r.err {
                    if !acc.errors.contains(e) {
                        acc.errors.push(e.clone());
                    }
                }
                if r.from == round.dst_addr {
                    reached_ttl = Some(reached_ttl.map_or(hop.ttl, |t| t.min(hop.ttl)));
                }
            }
        }
    }
    let mut ttls: Vec<u8> = by_ttl.keys().copied().collect();
    ttls.sort_unstable();
    if let Some(t) = reached_ttl {
        ttls.retain(|&x| x <= t);
    }
    let hops = ttls
        .into_iter()
        .filter_map(|ttl| by_ttl.remove(&ttl).map(|acc| (ttl, acc)))
        .map(|(ttl, mut acc)| {
            acc.addrs
                .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let got: Vec<f64> = acc.rtts.iter().flatten().copied().collect();
            let received = got.len() as u32;
            let n = got.len() as f64;
            let avg = (!got.is_empty()).then(|| got.iter().sum::<f64>() / n);
            let stdev = avg.map(|m| (got.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt());
            let diffs: Vec<f64> = got.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
            MtrHop {
                ttl,
                addrs: acc
                    .addrs
                    .into_iter()
                    .map(|(addr, count)| MtrAddr { addr, count })
                    .collect(),
                sent: acc.sent,
                received,
                loss_pct: if acc.sent == 0 {
                    0.0
                } else {
                    100.0 * f64::from(acc.sent - received) / f64::from(acc.sent)
                },
                last_ms: got.last().copied(),
                best_ms: got.iter().copied().reduce(f64::min),
                avg_ms: avg,
                worst_ms: got.iter().copied().reduce(f64::max),
                stdev_ms: stdev,
                jitter_ms: (!diffs.is_empty())
                    .then(|| diffs.iter().sum::<f64>() / diffs.len() as f64),
                jitter_max_ms: diffs.iter().copied().reduce(f64::max),
                errors: acc.errors,
                rtts_ms: acc.rtts,
            }
        })
        .collect();
    let first = rounds.first();
    MtrResult {
        host: p.host.clone(),
        dst_addr: first.map(|r| r.dst_addr.clone()).unwrap_or_default(),
        src_addr: first.map(|r| r.src_addr.clone()).unwrap_or_default(),
        af: first.map_or(4, |r| r.af),
        protocol: p.protocol,
        port: first.map_or(0, |r| r.port),
        paris_id: p.paris_id,
        size: first.map_or(0, |r| r.size),
        rounds: rounds.len() as u32,
        probes_per_hop: p.probes,
        destination_reached: reached_ttl.is_some(),
        hops,
        started_ms: first.map_or(0, |r| r.started_ms),
        duration_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_from(from: &str, rtt_ms: f64) -> Option<TraceReply> {
        Some(TraceReply {
            from: from.into(),
            rtt_ms,
            ttl: 64,
            size: 36,
            icmp_type: Some(11),
            icmp_code: Some(0),
            tcp_flags: None,
            err: None,
            quoted_ttl: Some(1),
            icmp_ext: None,
        })
    }

    fn round(hops: Vec<Vec<Option<TraceReply>>>) -> TracerouteResult {
        TracerouteResult {
            host: "d".into(),
            dst_addr: "10.0.0.9".into(),
            src_addr: "10.0.0.1".into(),
            af: 4,
            protocol: TraceProtocol::Icmp,
            port: 0,
            src_port: 0,
            icmp_checksum: 0x1000,
            paris_id: 0,
            size: 48,
            first_ttl: 1,
            max_ttl: 30,
            probes_per_hop: 1,
            timeout_ms: 1000,
            destination_reached: true,
            stop_reason: "destination".into(),
            hops: hops
                .into_iter()
                .enumerate()
                .map(|(i, probes)| TraceHop {
                    ttl: i as u8 + 1,
                    probes,
                })
                .collect(),
            started_ms: 5,
            duration_ms: 1.0,
        }
    }

    #[test]
    fn mtr_statistics() {
        let p: MtrParams = serde_json::from_value(serde_json::json!({"host": "d"})).unwrap();
        let rounds = vec![
            round(vec![
                vec![reply_from("10.0.0.2", 1.0)],
                vec![None],
                vec![reply_from("10.0.0.9", 3.0)],
            ]),
            round(vec![
                vec![reply_from("10.0.0.2", 3.0)],
                vec![None],
                vec![None],
                vec![reply_from("10.0.0.9", 4.0)],
            ]),
            round(vec![
                vec![reply_from("10.0.0.3", 2.0)],
                vec![None],
                vec![reply_from("10.0.0.9", 5.0)],
            ]),
        ];
        let m = summarise(&p, &rounds, 10.0);
        assert_eq!(m.rounds, 3);
        assert!(m.destination_reached);
        // Hops past the first one the destination answered are left out.
        assert_eq!(m.hops.len(), 3);
        let h1 = &m.hops[0];
        assert_eq!((h1.sent, h1.received, h1.loss_pct), (3, 3, 0.0));
        assert_eq!(
            h1.addrs[0],
            MtrAddr {
                addr: "10.0.0.2".into(),
                count: 2
            }
        );
        assert_eq!(h1.addrs[1].count, 1);
        assert_eq!(
            (h1.best_ms, h1.worst_ms, h1.avg_ms, h1.last_ms),
            (Some(1.0), Some(3.0), Some(2.0), Some(2.0))
        );
        assert!((h1.stdev_ms.unwrap() - (2.0f64 / 3.0).sqrt()).abs() < 1e-9);
        // |3-1| and |2-3|.
        assert_eq!((h1.jitter_ms, h1.jitter_max_ms), (Some(1.5), Some(2.0)));
        let h2 = &m.hops[1];
        assert_eq!((h2.sent, h2.received, h2.loss_pct), (3, 0, 100.0));
        assert_eq!((h2.avg_ms, h2.jitter_ms), (None, None));
        let h3 = &m.hops[2];
        assert_eq!((h3.sent, h3.received), (3, 2));
        assert_eq!(h3.rtts_ms, vec![Some(3.0), None, Some(5.0)]);
    }

    #[test]
    fn wire_id_ranges_stay_clear_of_0_and_ffff() {
        let bases: Vec<u16> = (0..40).map(|_| next_base()).collect();
        for &b in &bases {
            assert!(
                b >= 1 && u32::from(b) + u32::from(ID_SPAN) - 1 < 0xffff,
                "{b}"
            );
        }
        // Consecutive traces do not share ids.
        for w in bases.windows(2) {
            assert_ne!(w[0], w[1]);
        }
    }

    #[test]
    fn rtt_prefers_a_plausible_kernel_stamp() {
        let now = Sent {
            real_ns: sys::realtime_ns(),
            mono_ns: sys::mono_ns(),
        };
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = rtt(now, Some(now.real_ns + 1_000_000));
        assert_eq!(r, 1_000_000);
        // A stamp before the send (stepped clock) or none: the monotonic measure.
        assert!(rtt(now, Some(now.real_ns - 5)) >= 2_000_000);
        assert!(rtt(now, None) >= 2_000_000);
    }
}
