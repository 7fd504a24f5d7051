//! `stun`: one STUN Binding Request (RFC 5389) over UDP, retransmitted on timeout; the
//! address and port the server saw the request come from (XOR-MAPPED-ADDRESS, else
//! MAPPED-ADDRESS, IPv4 or IPv6), the round trip, and the server's SOFTWARE.
//!
//! Parameters: `server` (required), `port` (3478), `timeout_ms` (2000, per attempt),
//! `attempts` (3). Each attempt sends a new request with its own random transaction id;
//! an answer to any of them counts, its round trip timed from that request.
//!
//! Every datagram is treated as hostile: one that is not a STUN message for one of our
//! transactions is ignored (counted, and named if nothing better arrives); one for our
//! transaction that is malformed, or a Binding error response, fails the run with a
//! message saying what is wrong.

use std::net::{Ipv4Addr, Ipv6Addr};

use imn_guest::json::{ObjectWriter, Params};
use imn_guest::{now_ns, UdpSocket};

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER: usize = 20;

const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_SOFTWARE: u16 = 0x8022;

/// Largest datagram read; a longer one is cut, fails the length check and is reported.
const MAX_DATAGRAM: usize = 2048;
/// SOFTWARE is at most 763 bytes (RFC 5389 15.10); anything longer is cut, control
/// characters become '?'.
const MAX_SOFTWARE: usize = 763;

/// A transaction id.
type TxId = [u8; 12];

/// A Binding Request with no attributes.
pub fn request(txid: &TxId) -> [u8; HEADER] {
    let mut m = [0u8; HEADER];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    // m[2..4]: message length 0.
    m[4..8].copy_from_slice(&MAGIC_COOKIE);
    m[8..20].copy_from_slice(txid);
    m
}

/// A Binding success response, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Which of the transaction ids it answers.
    pub index: usize,
    pub address: String,
    pub port: u16,
    pub software: Option<String>,
}

/// Why a datagram was not a good answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reject {
    /// Not a STUN message for any of our transactions: ignore it and wait on.
    Foreign(String),
    /// An answer to our transaction that is wrong: the run fails with this message.
    Bad(String),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Parses `msg` as an answer to one of `txids`.
pub fn parse_response(msg: &[u8], txids: &[TxId]) -> Result<Response, Reject> {
    use Reject::{Bad, Foreign};
    if msg.len() < HEADER {
        return Err(Foreign(format!(
            "a {}-byte datagram, shorter than a STUN header",
            msg.len()
        )));
    }
    if msg[0] & 0xC0 != 0 || msg[4..8] != MAGIC_COOKIE {
        return Err(Foreign(
            "a datagram that is not a STUN message (no magic cookie)".into(),
        ));
    }
    let Some(index) = txids.iter().position(|t| msg[8..20] == t[..]) else {
        return Err(Foreign(
            "a STUN message for an unknown transaction id".into(),
        ));
    };
    let txid = &txids[index];
    let kind = be16(msg, 0).unwrap_or(0);
    let length = usize::from(be16(msg, 2).unwrap_or(0));
    if HEADER + length != msg.len() {
        return Err(Bad(format!(
            "the response's header says {length} bytes of attributes, the datagram has {}",
            msg.len() - HEADER
        )));
    }
    if length % 4 != 0 {
        return Err(Bad(format!(
            "the response's length {length} is not a multiple of 4"
        )));
    }

    let mut xor_mapped: Option<&[u8]> = None;
    let mut mapped: Option<&[u8]> = None;
    let mut software: Option<&[u8]> = None;
    let mut error_code: Option<&[u8]> = None;
    let mut pos = HEADER;
    while pos < msg.len() {
        let (Some(t), Some(l)) = (be16(msg, pos), be16(msg, pos + 2)) else {
            return Err(Bad(format!("a truncated attribute header at byte {pos}")));
        };
        let start = pos + 4;
        let Some(value) = msg.get(start..start + usize::from(l)) else {
            return Err(Bad(format!(
                "attribute 0x{t:04x} at byte {pos} says {l} bytes, past the end of the message"
            )));
        };
        let slot = match t {
            ATTR_XOR_MAPPED_ADDRESS => Some(&mut xor_mapped),
            ATTR_MAPPED_ADDRESS => Some(&mut mapped),
            ATTR_SOFTWARE => Some(&mut software),
            ATTR_ERROR_CODE => Some(&mut error_code),
            _ => None,
        };
        // The first of each counts (RFC 5389 15: later duplicates are ignored).
        if let Some(slot @ None) = slot {
            *slot = Some(value);
        }
        // Values are padded to 4 bytes.
        pos = start + usize::from(l).div_ceil(4) * 4;
    }

    if kind == BINDING_ERROR {
        return Err(Bad(match error_code {
            Some(v) if v.len() >= 4 => {
                let code = u16::from(v[2] & 0x07) * 100 + u16::from(v[3]);
                let reason = printable(&String::from_utf8_lossy(&v[4..]), 128);
                format!("the server answered a Binding error response: {code} {reason}")
                    .trim_end()
                    .to_string()
            }
            _ => "the server answered a Binding error response (no valid ERROR-CODE)".into(),
        }));
    }
    if kind != BINDING_SUCCESS {
        return Err(Bad(format!(
            "message type 0x{kind:04x} for our transaction, not a Binding success response (0x0101)"
        )));
    }

    let xor_key = {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&MAGIC_COOKIE);
        k[4..].copy_from_slice(txid);
        k
    };
    let from_xor = xor_mapped.map(|v| address(v, Some(&xor_key)));
    let (address, port) = match (from_xor, mapped.map(|v| address(v, None))) {
        (Some(Ok(a)), _) | (None | Some(Err(_)), Some(Ok(a))) => a,
        (Some(Err(e)), None) => return Err(Bad(format!("XOR-MAPPED-ADDRESS: {e}"))),
        (Some(Err(e)), Some(Err(f))) => {
            return Err(Bad(format!("XOR-MAPPED-ADDRESS: {e}; MAPPED-ADDRESS: {f}")))
        }
        (None, Some(Err(e))) => return Err(Bad(format!("MAPPED-ADDRESS: {e}"))),
        (None, None) => {
            return Err(Bad(
                "the response has neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS".into(),
            ))
        }
    };
    let software = software.map(|v| {
        let v = &v[..v.len().min(MAX_SOFTWARE)];
        printable(
            String::from_utf8_lossy(v).trim_end_matches('\0'),
            MAX_SOFTWARE,
        )
    });
    Ok(Response {
        index,
        address,
        port,
        software,
    })
}

/// A (XOR-)MAPPED-ADDRESS value: reserved, family, port, address. `xor`: the magic
/// cookie then the transaction id, to undo XOR-MAPPED-ADDRESS's masking.
fn address(v: &[u8], xor: Option<&[u8; 16]>) -> Result<(String, u16), String> {
    let key = |i: usize| xor.map_or(0, |k| k[i]);
    let family = *v.get(1).ok_or("too short")?;
    let port = be16(v, 2).ok_or("too short")? ^ u16::from_be_bytes([key(0), key(1)]);
    match (family, v.len()) {
        (0x01, 8) => {
            let mut a = [0u8; 4];
            for (i, b) in a.iter_mut().enumerate() {
                *b = v[4 + i] ^ key(i);
            }
            Ok((Ipv4Addr::from(a).to_string(), port))
        }
        (0x02, 20) => {
            let mut a = [0u8; 16];
            for (i, b) in a.iter_mut().enumerate() {
                *b = v[4 + i] ^ key(i);
            }
            Ok((Ipv6Addr::from(a).to_string(), port))
        }
        (0x01 | 0x02, n) => Err(format!(
            "{n} bytes for an IPv{} address",
            if family == 1 { 4 } else { 6 }
        )),
        (f, _) => Err(format!("unknown address family {f}")),
    }
}

/// `s` with control characters replaced by '?', cut to `max` characters.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn measure() -> Result<(), String> {
    let p = Params::load()?;
    p.only(&["server", "port", "timeout_ms", "attempts"])?;
    let server = p.required_string("server", 253)?;
    let port = p.integer("port", 3478, 1, 65535)? as u16;
    let timeout_ms = p.integer("timeout_ms", 2000, 1, 60000)?;
    let attempts = p.integer("attempts", 3, 1, 10)? as usize;

    let sock = UdpSocket::open(server, port).map_err(|e| format!("{server} port {port}: {e}"))?;
    let mut txids: Vec<TxId> = Vec::with_capacity(attempts);
    let mut sent_ns: Vec<i64> = Vec::with_capacity(attempts);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut ignored = 0usize;
    let mut last_ignored = String::new();

    for attempt in 1..=attempts {
        if imn_guest::deadline_reached() {
            return Err(format!(
                "the run's deadline came after {} attempts with no answer from {server} port {port}",
                attempt - 1
            ));
        }
        let mut txid = [0u8; 12];
        imn_guest::random(&mut txid).map_err(|e| format!("random: {e}"))?;
        let start = now_ns();
        sock.send(&request(&txid))
            .map_err(|e| format!("sending to {server} port {port}: {e}"))?;
        txids.push(txid);
        sent_ns.push(start);
        let until = start.saturating_add(timeout_ms * 1_000_000);
        loop {
            // Whole milliseconds left in this attempt, rounded up.
            let left = (until.saturating_sub(now_ns()) + 999_999) / 1_000_000;
            if left <= 0 {
                break;
            }
            let n = match sock.recv(&mut buf, left as u32) {
                Ok(n) => n,
                Err(e) if e.is_timeout() => break,
                Err(e) => return Err(format!("receiving from {server} port {port}: {e}")),
            };
            let got = now_ns();
            match parse_response(&buf[..n], &txids) {
                Ok(r) => {
                    let mut w = ObjectWriter::new();
                    w.string("server", server)
                        .uint("port", port.into())
                        .string("mapped_address", &r.address)
                        .uint("mapped_port", r.port.into())
                        .ms_from_ns("rtt_ms", got.saturating_sub(sent_ns[r.index]))
                        .uint("attempts", attempt as u64);
                    if let Some(s) = &r.software {
                        w.string("software", s);
                    }
                    imn_guest::emit(&w.finish())?;
                    return Ok(());
                }
                Err(Reject::Bad(e)) => return Err(format!("{server} port {port}: {e}")),
                Err(Reject::Foreign(e)) => {
                    ignored += 1;
                    last_ignored = e;
                }
            }
        }
    }
    let mut msg = format!(
        "no answer from {server} port {port} to {attempts} Binding Request{} ({timeout_ms} ms each)",
        if attempts == 1 { "" } else { "s" }
    );
    if ignored > 0 {
        msg += &format!("; ignored {ignored} other datagram(s), the last {last_ignored}");
    }
    if imn_guest::deadline_reached() {
        msg += "; the run's deadline cut the last wait short";
    }
    Err(msg)
}

imn_guest::entry!(measure);

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: TxId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 2.2: a sample IPv4 response (the MESSAGE-INTEGRITY bytes made up).
    fn rfc5769_v4() -> Vec<u8> {
        let mut m = vec![0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42];
        m.extend_from_slice(&TXID);
        m.extend_from_slice(&[0x80, 0x22, 0x00, 0x0b]);
        m.extend_from_slice(b"test vector ");
        m.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47]);
        m.extend_from_slice(&[0xe1, 0x12, 0xa6, 0x43]);
        m.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
        m.extend_from_slice(&[0x5a; 20]);
        m.extend_from_slice(&[0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96]);
        m
    }

    /// A response of `kind` with these attributes (padded), for TXID.
    fn response(kind: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in attrs {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = kind.to_be_bytes().to_vec();
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&TXID);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn requests_are_binding_requests() {
        let r = request(&TXID);
        assert_eq!(&r[..8], &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&r[8..], &TXID);
    }

    #[test]
    fn reads_the_rfc5769_vectors() {
        let r = parse_response(&rfc5769_v4(), &[[0; 12], TXID]).unwrap();
        assert_eq!(r.index, 1);
        assert_eq!((r.address.as_str(), r.port), ("192.0.2.1", 32853));
        assert_eq!(r.software.as_deref(), Some("test vector"));

        // RFC 5769 2.3: the IPv6 response's XOR-MAPPED-ADDRESS.
        let v6: &[u8] = &[
            0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25,
            0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        ];
        let r = parse_response(&response(BINDING_SUCCESS, &[(0x0020, v6)]), &[TXID]).unwrap();
        assert_eq!(r.address, "2001:db8:1234:5678:11:2233:4455:6677");
        assert_eq!(r.port, 32853);
        assert_eq!(r.software, None);
    }

    #[test]
    fn falls_back_to_mapped_address() {
        let plain: &[u8] = &[0, 1, 0x0d, 0x96, 203, 0, 113, 7];
        let r = parse_response(&response(BINDING_SUCCESS, &[(0x0001, plain)]), &[TXID]).unwrap();
        assert_eq!((r.address.as_str(), r.port), ("203.0.113.7", 3478));
        // A broken XOR-MAPPED-ADDRESS, then a good MAPPED-ADDRESS.
        let m = response(BINDING_SUCCESS, &[(0x0020, &[0, 1, 0]), (0x0001, plain)]);
        assert_eq!(parse_response(&m, &[TXID]).unwrap().address, "203.0.113.7");
    }

    #[test]
    fn says_what_is_wrong() {
        let bad = |m: &[u8]| match parse_response(m, &[TXID]) {
            Err(Reject::Bad(e)) => e,
            other => panic!("{other:?}"),
        };
        let foreign = |m: &[u8]| match parse_response(m, &[TXID]) {
            Err(Reject::Foreign(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(foreign(&[0; 10]).contains("shorter"));
        let mut m = rfc5769_v4();
        m[4] = 0;
        assert!(foreign(&m).contains("cookie"));
        let mut m = rfc5769_v4();
        m[19] ^= 1;
        assert!(foreign(&m).contains("transaction"));
        let mut m = rfc5769_v4();
        m.push(0);
        assert!(bad(&m).contains("header says"));
        assert!(bad(&response(BINDING_SUCCESS, &[])).contains("neither"));
        assert!(bad(&response(0x0102, &[])).contains("0x0102"));
        let e = bad(&response(
            BINDING_ERROR,
            &[(0x0009, b"\0\0\x04\x01Unauthorized")],
        ));
        assert!(e.contains("401 Unauthorized"), "{e}");
        assert!(bad(&response(
            BINDING_SUCCESS,
            &[(0x0020, &[0, 3, 0, 0, 1, 2, 3, 4])]
        ))
        .contains("family 3"));
        assert!(bad(&response(
            BINDING_SUCCESS,
            &[(0x0020, &[0, 2, 0, 0, 1, 2, 3, 4])]
        ))
        .contains("IPv6"));
        // An attribute whose length runs past the end.
        let mut m = response(BINDING_SUCCESS, &[(0x0020, &[0, 1, 0, 0, 1, 2, 3, 4])]);
        m[23] = 200;
        assert!(bad(&m).contains("past the end"));
    }

    #[test]
    fn hostile_datagrams_never_panic() {
        // Every truncation, and many random corruptions, of good responses.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = [
            rfc5769_v4(),
            response(BINDING_SUCCESS, &[(0x0001, &[0, 1, 0, 1, 1, 2, 3, 4])]),
        ];
        for m in &good {
            for i in 0..=m.len() {
                let _ = parse_response(&m[..i], &[TXID]);
            }
            for _ in 0..20_000 {
                let mut c = m.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % c.len();
                    c[i] = next() as u8;
                }
                // Keep the txid (so the deep parsing is reached) half the time.
                if next() % 2 == 0 {
                    c[8..20].copy_from_slice(&TXID);
                    c[4..8].copy_from_slice(&MAGIC_COOKIE);
                }
                let _ = parse_response(&c, &[TXID]);
            }
        }
    }
}
