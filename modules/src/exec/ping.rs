//! A simple, correct ICMP echo: one probe at a time, paced against absolute deadlines,
//! send time read before `sendto`, replies matched by source, identifier and sequence.
//! The measurement-modules work replaces it with a shared high-rate engine.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::params::PingParams;
use crate::results::{PingOutput, PingResult};

pub async fn run(p: PingParams) -> Result<PingOutput, String> {
    let mut targets = Vec::new();
    for host in p.target_list() {
        let addr = resolve(&host).await?;
        let p2 = p.clone();
        targets.push(
            tokio::task::spawn_blocking(move || probe(&p2, &host, addr))
                .await
                .map_err(|e| format!("ping task failed: {e}"))??,
        );
    }
    Ok(PingOutput {
        socket: "raw".into(),
        src_addr: None,
        targets,
    })
}

async fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let mut addrs = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| format!("{host:?} has no address"))
}

/// An ICMP socket: raw (needs CAP_NET_RAW) or unprivileged datagram (needs
/// `net.ipv4.ping_group_range` to include the agent's group).
struct IcmpSocket {
    sock: Socket,
    /// Raw IPv4 sockets deliver the IP header too; datagram sockets rewrite the id.
    raw: bool,
    v6: bool,
}

fn open(v6: bool) -> Result<IcmpSocket, String> {
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    match Socket::new(domain, Type::RAW, Some(proto)) {
        Ok(sock) => {
            return Ok(IcmpSocket {
                sock,
                raw: true,
                v6,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(format!("cannot open raw ICMP socket: {e}")),
    }
    match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(sock) => Ok(IcmpSocket {
            sock,
            raw: false,
            v6,
        }),
        Err(e) => Err(format!(
            "cannot open an ICMP socket ({e}): give the agent CAP_NET_RAW \
             (setcap cap_net_raw+ep imn-agent, or AmbientCapabilities=CAP_NET_RAW), \
             or allow unprivileged ICMP with sysctl net.ipv4.ping_group_range=\"0 2147483647\""
        )),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(v6: bool, id: u16, seq: u16, size: usize) -> Vec<u8> {
    let mut pkt = vec![0u8; 8 + size];
    pkt[0] = if v6 { 128 } else { 8 };
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in pkt[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    if !v6 {
        // The kernel fills in the ICMPv6 checksum (it covers a pseudo-header).
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    pkt
}

/// Returns (id, seq) if `buf` is an echo reply.
fn parse_reply(s: &IcmpSocket, buf: &[u8]) -> Option<(u16, u16)> {
    let icmp = if s.raw && !s.v6 {
        let ihl = usize::from(buf.first()? & 0x0f) * 4;
        buf.get(ihl..)?
    } else {
        buf
    };
    let reply_type = if s.v6 { 129 } else { 0 };
    if icmp.len() < 8 || icmp[0] != reply_type || icmp[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

fn probe(p: &PingParams, host: &str, addr: IpAddr) -> Result<PingResult, String> {
    let s = open(addr.is_ipv6())?;
    let dest = SockAddr::from(SocketAddr::new(addr, 0));
    let id: u16 = rand_id();
    let timeout = Duration::from_millis(p.timeout_ms.max(1));
    let interval = Duration::from_millis(p.interval_ms);
    let mut rtts = Vec::with_capacity(p.count as usize);
    let start = Instant::now();
    let mut buf = [MaybeUninit::<u8>::uninit(); 65_536];
    for i in 0..p.count {
        // Absolute deadlines: probe i leaves at start + i * interval, whatever came before.
        let due = start + interval * i;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let seq = i as u16;
        let pkt = echo_request(s.v6, id, seq, p.size as usize);
        // Send time is read before sendto, never after, so no RTT is under-reported.
        let sent_at = Instant::now();
        s.sock
            .send_to(&pkt, &dest)
            .map_err(|e| format!("sendto {addr}: {e}"))?;
        let mut rtt = None;
        loop {
            let left = timeout.saturating_sub(sent_at.elapsed());
            if left.is_zero() {
                break;
            }
            s.sock
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let (n, from) = match s.sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("recvfrom: {e}")),
            };
            let elapsed = sent_at.elapsed();
            // SAFETY: recv_from initialised the first n bytes.
            let data: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
            if from.as_socket().map(|a| a.ip()) != Some(addr) {
                continue;
            }
            match parse_reply(&s, data) {
                // Datagram sockets rewrite the identifier, so only raw sockets check it.
                Some((rid, rseq)) if rseq == seq && (!s.raw || rid == id) => {
                    // A reply can never take zero time; clamp to the clock's resolution.
                    let us = elapsed.as_nanos().max(1) as f64 / 1e6;
                    rtt = Some(us);
                    break;
                }
                _ => continue,
            }
        }
        rtts.push(rtt);
    }
    let mut r = PingResult::new(host, &addr.to_string(), p.size);
    r.rtts_ms = rtts;
    r.summarise();
    Ok(r)
}

fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (std::process::id() as u16) ^ (nanos as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_packet() {
        let pkt = echo_request(false, 0x1234, 1, 0);
        assert_eq!(checksum(&pkt), 0, "a packet with its checksum sums to zero");
    }

    #[tokio::test]
    async fn pings_loopback() {
        let p = PingParams {
            host: Some("127.0.0.1".into()),
            targets: None,
            count: 3,
            interval_ms: 20,
            timeout_ms: 1000,
            size: 56,
            ttl: None,
            rate: None,
        };
        let root = unsafe { libc::geteuid() } == 0;
        match run(p).await {
            Ok(out) => {
                let r = &out.targets[0];
                assert_eq!((r.sent, r.received), (3, 3), "{r:?}");
                assert!(r.rtts_ms.iter().flatten().all(|&rtt| rtt > 0.0));
            }
            // Without root or ping_group_range there is no ICMP socket; the error must
            // name both remedies.
            // name both remedies. Root always has a raw socket, so there it must work.
            Err(e) => {
                assert!(!root, "root could not ping loopback: {e}");
                assert!(
                    e.contains("CAP_NET_RAW") && e.contains("ping_group_range"),
                    "{e}"
                )
            }
        }
    }
}
