//! NTP client exchanges (RFC 5905, mode 3). Each request carries a random transmit
//! timestamp, as RFC 9109's data minimisation advises: a reply counts only if its origin
//! timestamp echoes it, so a stale reply or an off-path forgery is ignored. T1 is the
//! wall clock at send; T4 is the kernel's receive timestamp (`SO_TIMESTAMPNS`), so the
//! time the agent took to wake up is not counted as network delay. Where the kernel
//! gives none, T4 is T1 plus the monotonic time the exchange took.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::ping::sys;
use super::Context;

use imn_proto::kinds::ntp::{NtpPacket, NtpParams, NtpResult, NtpServerInfo};

/// Seconds from 1900-01-01 (NTP's era 0) to 1970-01-01.
const NTP_UNIX_OFFSET: f64 = 2_208_988_800.0;
const PACKET_LEN: usize = 48;
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;

pub async fn run(p: NtpParams, ctx: &Context) -> Result<NtpResult, String> {
    // Every request goes to this address (a connected socket): checked once, before the
    // socket is opened.
    let ip = super::resolve_permitted(ctx, &p.host).await?;
    let addr = SocketAddr::new(ip, p.port);
    let bind: SocketAddr = if ip.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("ntp: cannot open a UDP socket: {e}"))?;
    sock.connect(addr)
        .await
        .map_err(|e| format!("ntp: cannot reach {addr}: {e}"))?;
    let on: libc::c_int = 1;
    let fd = sock.as_raw_fd();
    let kernel_stamps = sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_NEW, &on).is_ok()
        || sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_OLD, &on).is_ok();
    let mut batch = sys::RecvBatch::new();
    let mut r = NtpResult {
        host: p.host.clone(),
        addr: ip.to_string(),
        port: p.port,
        src_addr: sock.local_addr().ok().map(|a| a.ip().to_string()),
        version: p.version,
        packets: Vec::with_capacity(p.packets as usize),
        sent: 0,
        received: 0,
        offset_ms: None,
        delay_ms: None,
        min_delay_ms: None,
        max_delay_ms: None,
        median_offset_ms: None,
        server: None,
        rx_timestamps: if kernel_stamps { "kernel" } else { "clock" }.into(),
    };
    let start = tokio::time::Instant::now();
    let interval = Duration::from_millis(p.interval_ms);
    for i in 0..p.packets {
        tokio::time::sleep_until(start + interval * i).await;
        let (packet, server) = exchange(
            &sock,
            &mut batch,
            p.version,
            Duration::from_millis(p.timeout_ms),
        )
        .await;
        if server.is_some() {
            r.server = server;
        }
        r.packets.push(packet);
    }
    r.summarise();
    Ok(r)
}

/// One request and its reply (or its absence).
async fn exchange(
    sock: &UdpSocket,
    batch: &mut sys::RecvBatch,
    version: u8,
    timeout: Duration,
) -> (NtpPacket, Option<NtpServerInfo>) {
    let nonce: u64 = rand_nonce();
    let mut req = [0u8; PACKET_LEN];
    req[0] = (version << 3) | MODE_CLIENT;
    req[40..48].copy_from_slice(&nonce.to_be_bytes());
    let t1 = unix_now() + NTP_UNIX_OFFSET;
    let sent_at = Instant::now();
    let mut packet = NtpPacket {
        origin_ts: t1,
        receive_ts: None,
        transmit_ts: None,
        final_ts: None,
        offset_ms: None,
        delay_ms: None,
        error: None,
    };
    if let Err(e) = sock.send(&req).await {
        packet.error = Some(format!("send failed: {e}"));
        return (packet, None);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Readable or an error queued (ICMP port unreachable on a connected socket).
        // recvmmsg reports "nothing yet" as Ok(0); tokio must see WouldBlock to wait
        // for the next readiness.
        let fd = sock.as_raw_fd();
        let got = tokio::time::timeout_at(
            deadline,
            sock.async_io(Interest::READABLE | Interest::ERROR, || {
                match batch.recv(fd, 0) {
                    Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
                    other => other,
                }
            }),
        )
        .await;
        let n = match got {
            Err(_) => {
                packet.error = Some("timeout".into());
                return (packet, None);
            }
            Ok(Err(e)) => {
                // An ICMP error (port unreachable) arrives here on a connected socket.
                packet.error = Some(format!("receive failed: {e}"));
                return (packet, None);
            }
            Ok(Ok(n)) => n,
        };
        let clock_t4 = t1 + sent_at.elapsed().as_secs_f64();
        // Not an answer to this request (late, forged or garbage): keep waiting.
        let Some((reply, rx_ns)) = (0..n).find_map(|i| {
            let d = batch.get(i);
            Reply::parse(d.data)
                .filter(|r| r.origin == nonce)
                .map(|r| (r, d.anc.rx_ns))
        }) else {
            continue;
        };
        let t4 = rx_ns.map_or(clock_t4, |ns| ns as f64 / 1e9 + NTP_UNIX_OFFSET);
        let info = reply.info();
        packet.final_ts = Some(t4);
        if reply.mode != MODE_SERVER {
            packet.error = Some(format!("reply has mode {}, not server (4)", reply.mode));
            return (packet, None);
        }
        if reply.stratum == 0 {
            packet.error = Some(format!("kiss {}", info.ref_id));
            return (packet, Some(info));
        }
        if reply.transmit == 0 {
            packet.error = Some("reply has no transmit timestamp".into());
            return (packet, Some(info));
        }
        let (t2, t3) = (ntp_secs(reply.receive), ntp_secs(reply.transmit));
        packet.receive_ts = Some(t2);
        packet.transmit_ts = Some(t3);
        packet.offset_ms = Some(((t2 - t1) + (t3 - t4)) / 2.0 * 1000.0);
        packet.delay_ms = Some(((t4 - t1) - (t3 - t2)).max(0.0) * 1000.0);
        if reply.leap == 3 {
            packet.error = Some("server clock is not synchronised (leap indicator 3)".into());
        }
        return (packet, Some(info));
    }
}

/// The fields of a server packet that the client uses.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    leap: u8,
    version: u8,
    mode: u8,
    stratum: u8,
    poll: i8,
    precision: i8,
    root_delay: u32,
    root_dispersion: u32,
    ref_id: [u8; 4],
    reference: u64,
    origin: u64,
    receive: u64,
    transmit: u64,
}

impl Reply {
    /// Parses the 48-byte header; None when shorter. Extension fields and a MAC after
    /// it are ignored.
    fn parse(b: &[u8]) -> Option<Reply> {
        let b: &[u8; PACKET_LEN] = b.get(..PACKET_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        Some(Reply {
            leap: b[0] >> 6,
            version: (b[0] >> 3) & 7,
            mode: b[0] & 7,
            stratum: b[1],
            poll: b[2] as i8,
            precision: b[3] as i8,
            root_delay: u32_at(4),
            root_dispersion: u32_at(8),
            ref_id: [b[12], b[13], b[14], b[15]],
            reference: u64_at(16),
            origin: u64_at(24),
            receive: u64_at(32),
            transmit: u64_at(40),
        })
    }

    fn info(&self) -> NtpServerInfo {
        NtpServerInfo {
            leap: match self.leap {
                0 => "no",
                1 => "61",
                2 => "59",
                _ => "unknown",
            }
            .into(),
            stratum: self.stratum,
            mode: match self.mode {
                1 => "symmetric active".to_string(),
                2 => "symmetric passive".to_string(),
                4 => "server".to_string(),
                5 => "broadcast".to_string(),
                m => format!("mode {m}"),
            },
            version: self.version,
            poll: self.poll,
            precision_s: 2f64.powi(i32::from(self.precision)),
            root_delay_ms: short_secs(self.root_delay) * 1000.0,
            root_dispersion_ms: short_secs(self.root_dispersion) * 1000.0,
            ref_id: ref_id(self.stratum, self.ref_id),
            ref_ts: ntp_secs(self.reference),
        }
    }
}

/// The reference id as ntpq shows it: four ASCII letters at stratum 0 (kiss codes) and
/// 1 (reference clocks), an IPv4 address above.
fn ref_id(stratum: u8, id: [u8; 4]) -> String {
    if stratum <= 1 {
        id.iter()
            .take_while(|&&c| c != 0)
            .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
            .collect()
    } else {
        std::net::Ipv4Addr::from(id).to_string()
    }
}

/// A 64-bit NTP timestamp (32.32 fixed point) in seconds since 1900.
fn ntp_secs(ts: u64) -> f64 {
    (ts >> 32) as f64 + (ts & 0xffff_ffff) as f64 / 4_294_967_296.0
}

/// A 32-bit NTP short format (16.16 fixed point) in seconds.
fn short_secs(v: u32) -> f64 {
    f64::from(v >> 16) + f64::from(v & 0xffff) / 65_536.0
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rand_nonce() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_ok() {
        u64::from_ne_bytes(b)
    } else {
        // No OS random source at all: the clock's nanoseconds still vary per call.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .rotate_left(17)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_packet() -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (4 << 3) | MODE_SERVER;
        b[1] = 1;
        b[2] = 6;
        b[3] = (-20i8) as u8;
        b[4..8].copy_from_slice(&0x0001_8000u32.to_be_bytes()); // 1.5 s
        b[8..12].copy_from_slice(&0x0000_4000u32.to_be_bytes()); // 0.25 s
        b[12..16].copy_from_slice(b"GPS\0");
        b[24..32].copy_from_slice(&7u64.to_be_bytes());
        b[40..48].copy_from_slice(&((3_900_000_000u64 << 32) | 0x8000_0000).to_be_bytes());
        b
    }

    #[test]
    fn parses_a_server_header() {
        let r = Reply::parse(&server_packet()).unwrap();
        assert_eq!((r.mode, r.version, r.stratum, r.origin), (4, 4, 1, 7));
        assert_eq!(ntp_secs(r.transmit), 3_900_000_000.5);
        let info = r.info();
        assert_eq!(info.ref_id, "GPS");
        assert_eq!(info.leap, "no");
        assert_eq!(info.root_delay_ms, 1500.0);
        assert_eq!(info.root_dispersion_ms, 250.0);
        assert_eq!(info.precision_s, 2f64.powi(-20));
        assert_eq!(ref_id(2, [192, 0, 2, 1]), "192.0.2.1");
        assert_eq!(ref_id(0, *b"RA\x01E"), "RA?E");
    }

    #[test]
    fn short_or_garbage_packets_are_refused_without_panicking() {
        assert!(Reply::parse(&[]).is_none());
        assert!(Reply::parse(&server_packet()[..47]).is_none());
        for len in 48..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = Reply::parse(&junk).map(|r| r.info());
        }
    }
}
