//! ICMP / ICMPv6 echo messages: building requests and parsing replies. Parsing never
//! panics: every field is read with a bounds check.

/// Bytes of the cookie at the end of the payload: session token and probe index.
pub const COOKIE: usize = 8;

pub const ECHO_REQUEST_V4: u8 = 8;
pub const ECHO_REPLY_V4: u8 = 0;
pub const ECHO_REQUEST_V6: u8 = 128;
pub const ECHO_REPLY_V6: u8 = 129;

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request of `8 + size` bytes with the payload pattern ping(8) uses.
pub fn template(v6: bool, size: usize) -> Vec<u8> {
    let mut pkt = vec![0u8; 8 + size];
    pkt[0] = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    for (i, b) in pkt[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    pkt
}

/// Fills identifier, sequence and cookie into a template, and the checksum for IPv4
/// (the kernel computes the ICMPv6 one, which covers a pseudo-header).
pub fn stamp(pkt: &mut [u8], v6: bool, id: u16, seq: u16, cookie: Option<(u32, u32)>) {
    pkt[2..4].copy_from_slice(&[0, 0]);
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    let n = pkt.len();
    if let Some((token, index)) = cookie {
        if n >= 8 + COOKIE {
            pkt[n - 8..n - 4].copy_from_slice(&token.to_be_bytes());
            pkt[n - 4..].copy_from_slice(&index.to_be_bytes());
        }
    }
    if !v6 {
        let c = checksum(pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
}

/// An echo reply as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    pub id: u16,
    pub seq: u16,
    /// TTL from the IPv4 header, when the socket delivers it (raw IPv4).
    pub ttl: Option<u8>,
    /// The whole ICMP message (header and payload).
    pub icmp: &'a [u8],
}

/// Parses an echo reply. `with_ip_header`: raw IPv4 sockets deliver the IP header.
pub fn parse_reply(data: &[u8], v6: bool, with_ip_header: bool) -> Option<Reply<'_>> {
    let (icmp, ttl) = if with_ip_header {
        let first = *data.first()?;
        if first >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(first & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        (data.get(ihl..)?, data.get(8).copied())
    } else {
        (data, None)
    };
    let want = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if icmp.len() < 8 || icmp[0] != want || icmp[1] != 0 {
        return None;
    }
    Some(Reply {
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
        ttl,
        icmp,
    })
}

/// The cookie at the end of an ICMP message of `8 + size` bytes, if it has one.
pub fn cookie_of(icmp: &[u8], size: usize) -> Option<(u32, u32)> {
    if size < COOKIE || icmp.len() != 8 + size {
        return None;
    }
    let n = icmp.len();
    let t = icmp.get(n - 8..n - 4)?;
    let i = icmp.get(n - 4..)?;
    Some((
        u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
        u32::from_be_bytes([i[0], i[1], i[2], i[3]]),
    ))
}

/// The echo request at the end of a packet looped back on the error queue with its
/// transmit timestamp (it starts with the link-layer header, of unknown length).
/// Returns (sequence, cookie).
pub fn looped_request(data: &[u8], v6: bool, size: usize) -> Option<(u16, (u32, u32))> {
    let len = 8usize.checked_add(size)?;
    let icmp = data.get(data.len().checked_sub(len)?..)?;
    let want = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    if icmp[0] != want || icmp[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[6], icmp[7]]),
        cookie_of(icmp, size)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_stamped_packet_is_zero() {
        for size in [0usize, 1, 7, 8, 56, 1001] {
            let mut pkt = template(false, size);
            stamp(&mut pkt, false, 0x1234, 7, Some((0xdead_beef, 42)));
            assert_eq!(checksum(&pkt), 0, "size {size}");
        }
    }

    #[test]
    fn reply_round_trip() {
        let mut pkt = template(false, 56);
        stamp(&mut pkt, false, 9, 300, Some((5, 6)));
        pkt[0] = ECHO_REPLY_V4;
        let mut ip = vec![0x45u8, 0, 0, 0, 0, 0, 0, 0, 61, 1];
        ip.resize(20, 0);
        ip.extend_from_slice(&pkt);
        let r = parse_reply(&ip, false, true).unwrap();
        assert_eq!((r.id, r.seq, r.ttl), (9, 300, Some(61)));
        assert_eq!(cookie_of(r.icmp, 56), Some((5, 6)));
        assert_eq!(cookie_of(r.icmp, 57), None);
        let mut looped = vec![0u8; 14];
        looped.extend_from_slice(&ip);
        looped[14 + 20] = ECHO_REQUEST_V4;
        assert_eq!(looped_request(&looped, false, 56), Some((300, (5, 6))));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678;
        for len in 0..200usize {
            for _ in 0..200 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Bias towards the interesting bytes.
                        match x % 5 {
                            0 => 0x45,
                            1 => 0,
                            2 => 129,
                            _ => x as u8,
                        }
                    })
                    .collect();
                for v6 in [false, true] {
                    for hdr in [false, true] {
                        if let Some(r) = parse_reply(&data, v6, hdr) {
                            let _ = cookie_of(r.icmp, len);
                        }
                    }
                    for size in [0usize, 8, 56, usize::MAX] {
                        let _ = looped_request(&data, v6, size);
                    }
                }
            }
        }
    }
}
