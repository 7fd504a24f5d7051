//! Peers the tests start for the measurement modules.
//!
//! The NTP responder is the tests' own: nothing that serves NTP can run here with a
//! clock other than the machine's, and a known offset is what the `ntp` module must
//! measure. It answers as a stratum-2 server whose clock is ahead of ours by a given
//! number of seconds, or misbehaves in a chosen way.

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the NTP responder answers.
#[derive(Clone, Copy)]
pub enum NtpBehaviour {
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

/// Starts an NTP responder on `addr` (a loopback address with port 0); returns the
/// port. It serves until the test process ends.
pub fn ntp_responder(addr: &str, b: NtpBehaviour) -> u16 {
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
                NtpBehaviour::Offset(o) => o,
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
                NtpBehaviour::Offset(_) => {}
                NtpBehaviour::Kiss(code) => {
                    r[1] = 0;
                    r[12..16].copy_from_slice(code);
                }
                NtpBehaviour::Unsynchronised => r[0] |= 3 << 6,
                NtpBehaviour::WrongOrigin => r[24] ^= 0xff,
                NtpBehaviour::Silent => continue,
            }
            // A little processing time, as a real server has.
            std::thread::sleep(Duration::from_micros(200));
            r[40..48].copy_from_slice(&ntp_now(offset).to_be_bytes());
            let _ = sock.send_to(&r, from);
        }
    });
    port
}
