//! `dns_tcp`: one DNS query over TCP (RFC 1035 4.2.2, RFC 7766), written against the
//! host's TCP calls rather than the agent's built-in `dns` module.
//!
//! Parameters: `server` (required), `port` (53), `name` (required), `type` (A, AAAA,
//! TXT or MX; A), `timeout_ms` (3000: for the connect, then again for the answer).
//!
//! The query has a random id and asks for recursion; the answer is read length prefix
//! first, however the bytes arrive. The answer must carry the query's id, the QR bit,
//! opcode QUERY and (if it has one) the query's question. Names may be compressed:
//! pointers are followed at most [`MAX_JUMPS`] times per name and names are at most 255
//! bytes. Every read is bounds-checked: a malformed answer fails the run with a message
//! saying what and where, never a panic.
//!
//! The result lists the answer section's records of the asked type (class IN):
//! addresses for A and AAAA, the text for TXT (its strings joined), "preference
//! exchange" for MX. Should they not fit in a result (64 KiB), the last ones are left
//! out and `"truncated": true` says so.

use std::net::Ipv6Addr;

use imn_guest::json::{self, ObjectWriter, Params, Quoted};
use imn_guest::{now_ns, TcpStream};

/// Compression pointers followed at most, per name.
pub const MAX_JUMPS: usize = 32;
/// A name's wire form is at most this long (RFC 1035 3.1).
const MAX_NAME: usize = 255;
const HEADER: usize = 12;
const CLASS_IN: u16 = 1;
/// What the answers may take of a result (64 KiB) after the other fields.
const ANSWERS_BUDGET: usize = imn_guest::MAX_RESULT - 2048;

/// The record types this module asks for.
pub const TYPES: [(&str, u16); 4] = [("A", 1), ("AAAA", 28), ("TXT", 16), ("MX", 15)];

/// A name's wire form (uncompressed): labels of 1 to 63 bytes, at most 255 bytes in
/// all. "." and "" are the root; one trailing dot is allowed.
pub fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(name.len() + 2);
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() {
                return Err(format!("name {} has an empty label", Quoted(name)));
            }
            if label.len() > 63 {
                return Err(format!(
                    "name {} has a label longer than 63 bytes",
                    Quoted(name)
                ));
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() > MAX_NAME {
        return Err(format!(
            "name {} is longer than 255 bytes on the wire",
            Quoted(name)
        ));
    }
    Ok(out)
}

/// The query as sent over TCP: the 2-byte length, then a header (this id, RD set, one
/// question) and the question (name, type, class IN).
pub fn query(id: u16, qname: &[u8], qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(2 + HEADER + qname.len() + 4);
    let len = (HEADER + qname.len() + 4) as u16;
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00]); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD 1, AN 0, NS 0, AR 0
    m.extend_from_slice(qname);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

fn u16_at(msg: &[u8], pos: usize, what: &str) -> Result<u16, String> {
    match msg.get(pos..pos.saturating_add(2)) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(format!(
            "{what} at byte {pos} runs past the end of the answer"
        )),
    }
}

/// A name read from a message: its labels (slices of the message).
#[derive(Debug, Clone, PartialEq)]
pub struct Name<'a> {
    pub labels: Vec<&'a [u8]>,
}

impl Name<'_> {
    /// Presentation form without the final dot ("." for the root): '.' and '\' in a
    /// label escaped with '\', other bytes outside printable ASCII as \DDD.
    pub fn text(&self) -> String {
        if self.labels.is_empty() {
            return ".".into();
        }
        let mut s = String::new();
        for (i, label) in self.labels.iter().enumerate() {
            if i > 0 {
                s.push('.');
            }
            for &b in label.iter() {
                match b {
                    b'.' | b'\\' => {
                        s.push('\\');
                        s.push(b as char);
                    }
                    0x21..=0x7e => s.push(b as char),
                    _ => {
                        s.push('\\');
                        push_decimal(&mut s, b, 3);
                    }
                }
            }
        }
        s
    }

    /// Whether it is the name of this wire form (ASCII case ignored).
    fn is(&self, wire: &[u8]) -> bool {
        let mut pos = 0;
        for label in &self.labels {
            match wire.get(pos) {
                Some(&n) if usize::from(n) == label.len() => {}
                _ => return false,
            }
            match wire.get(pos + 1..pos + 1 + label.len()) {
                Some(w) if w.eq_ignore_ascii_case(label) => {}
                _ => return false,
            }
            pos += 1 + label.len();
        }
        wire.get(pos..) == Some(&[0][..])
    }
}

/// `n` in decimal, left-padded with zeros to `width` digits (at most 3).
fn push_decimal(s: &mut String, n: u8, width: usize) {
    let digits = [b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10];
    let significant = if n >= 100 {
        3
    } else if n >= 10 {
        2
    } else {
        1
    };
    for &d in &digits[3 - significant.max(width.min(3))..] {
        s.push(d as char);
    }
}

/// An IPv4 address in dotted decimal (cheaper in fuel than `Ipv4Addr`'s `Display`).
pub fn ipv4_text(a: [u8; 4]) -> String {
    let mut s = String::with_capacity(15);
    for (i, &octet) in a.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        push_decimal(&mut s, octet, 1);
    }
    s
}

/// Reads the name at `pos`, following compression pointers (at most [`MAX_JUMPS`]).
/// Returns it and the position after it where it was written (after its first
/// pointer, if it has one).
pub fn read_name(msg: &[u8], pos: usize) -> Result<(Name<'_>, usize), String> {
    let mut labels = Vec::new();
    let mut p = pos;
    let mut end = None;
    let mut jumps = 0;
    let mut wire_len = 1; // the root's zero byte
    loop {
        let Some(&len) = msg.get(p) else {
            return Err(format!(
                "the name at byte {pos} runs past the end of the answer"
            ));
        };
        match len & 0xC0 {
            0xC0 => {
                let Some(&low) = msg.get(p + 1) else {
                    return Err(format!("a compression pointer at byte {p} is cut off"));
                };
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return Err(format!(
                        "the name at byte {pos} has more than {MAX_JUMPS} compression pointers (a loop?)"
                    ));
                }
                end.get_or_insert(p + 2);
                let target = usize::from(len & 0x3F) << 8 | usize::from(low);
                if target >= msg.len() {
                    return Err(format!(
                        "a compression pointer at byte {p} points past the end (to {target})"
                    ));
                }
                p = target;
            }
            0x00 => {
                if len == 0 {
                    return Ok((Name { labels }, end.unwrap_or(p + 1)));
                }
                let n = usize::from(len);
                let Some(label) = msg.get(p + 1..p + 1 + n) else {
                    return Err(format!(
                        "a label at byte {p} runs past the end of the answer"
                    ));
                };
                wire_len += 1 + n;
                if wire_len > MAX_NAME {
                    return Err(format!("the name at byte {pos} is longer than 255 bytes"));
                }
                labels.push(label);
                p += 1 + n;
            }
            _ => {
                return Err(format!(
                    "unknown label type 0x{:02x} at byte {p}",
                    len & 0xC0
                ))
            }
        }
    }
}

/// An answer, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub rcode: u8,
    pub answers: Vec<String>,
    /// Records were left out (and not read further) to keep the answers within the
    /// budget.
    pub truncated: bool,
}

/// The name of a response code: NOERROR, SERVFAIL, NXDOMAIN, REFUSED, or the number.
pub fn rcode_text(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        5 => "REFUSED".into(),
        n => n.to_string(),
    }
}

/// Checks and parses the answer `msg` (without its length prefix) to the query with
/// this id, name (wire form) and type. The answers kept take at most `budget` bytes as
/// a JSON array; the records after the first that does not fit are not read.
pub fn parse_answer(
    msg: &[u8],
    id: u16,
    qname: &[u8],
    qtype: u16,
    budget: usize,
) -> Result<Answer, String> {
    if msg.len() < HEADER {
        return Err(format!(
            "a {}-byte answer, shorter than a DNS header",
            msg.len()
        ));
    }
    let got_id = u16_at(msg, 0, "the id")?;
    if got_id != id {
        return Err(format!(
            "the answer's id 0x{got_id:04x} is not the query's 0x{id:04x}"
        ));
    }
    let flags = u16_at(msg, 2, "the flags")?;
    if flags & 0x8000 == 0 {
        return Err("the answer is not a response (QR bit clear)".into());
    }
    let opcode = (flags >> 11) & 0x0F;
    if opcode != 0 {
        return Err(format!("the answer has opcode {opcode}, not QUERY (0)"));
    }
    let rcode = (flags & 0x000F) as u8;
    let qdcount = u16_at(msg, 4, "the question count")?;
    let ancount = u16_at(msg, 6, "the answer count")?;
    let mut pos = HEADER;

    match qdcount {
        0 => {}
        1 => {
            let (name, next) = read_name(msg, pos).map_err(|e| format!("question: {e}"))?;
            let t = u16_at(msg, next, "the question's type")?;
            let c = u16_at(msg, next + 2, "the question's class")?;
            if !name.is(qname) || t != qtype || c != CLASS_IN {
                return Err(format!(
                    "the answer is for another question ({} type {t} class {c})",
                    name.text()
                ));
            }
            pos = next + 4;
        }
        n => return Err(format!("the answer has {n} questions, the query had 1")),
    }

    let mut answers = Vec::new();
    let mut used = 2; // []
    let mut truncated = false;
    for i in 1..=ancount {
        let ctx = |e: String| format!("answer record {i}: {e}");
        let (_, next) = read_name(msg, pos).map_err(ctx)?;
        let rtype = u16_at(msg, next, "the type").map_err(ctx)?;
        let class = u16_at(msg, next + 2, "the class").map_err(ctx)?;
        // next + 4: the TTL, 4 bytes.
        let rdlen = usize::from(u16_at(msg, next + 8, "the data length").map_err(ctx)?);
        let start = next + 10;
        let Some(rdata) = msg.get(start..start + rdlen) else {
            return Err(ctx(format!(
                "{rdlen} bytes of data at byte {start} run past the end of the answer"
            )));
        };
        pos = start + rdlen;
        if rtype != qtype || class != CLASS_IN {
            continue; // a CNAME on the way, a signature, another class...
        }
        let text = match rtype {
            1 => match <[u8; 4]>::try_from(rdata) {
                Ok(a) => ipv4_text(a),
                Err(_) => return Err(ctx(format!("an A record of {rdlen} bytes, not 4"))),
            },
            28 => match <[u8; 16]>::try_from(rdata) {
                Ok(a) => Ipv6Addr::from(a).to_string(),
                Err(_) => return Err(ctx(format!("an AAAA record of {rdlen} bytes, not 16"))),
            },
            15 => {
                let pref = u16_at(rdata, 0, "the MX preference").map_err(ctx)?;
                let (host, after) = read_name(msg, start + 2).map_err(ctx)?;
                if after != pos {
                    return Err(ctx(format!(
                        "the MX exchange ends at byte {after}, its record at byte {pos}"
                    )));
                }
                format!("{pref} {}", host.text())
            }
            16 => {
                let mut bytes = Vec::with_capacity(rdlen);
                let mut p = 0;
                while p < rdata.len() {
                    let n = usize::from(rdata[p]);
                    let Some(s) = rdata.get(p + 1..p + 1 + n) else {
                        return Err(ctx(format!(
                            "a TXT string of {n} bytes at byte {} runs past its record",
                            start + p
                        )));
                    };
                    bytes.extend_from_slice(s);
                    p += 1 + n;
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            _ => continue,
        };
        used += json::escaped_len(&text) + 1;
        if used > budget {
            truncated = true;
            break;
        }
        answers.push(text);
    }
    Ok(Answer {
        rcode,
        answers,
        truncated,
    })
}

fn measure() -> Result<(), String> {
    let p = Params::load()?;
    p.only(&["server", "port", "name", "type", "timeout_ms"])?;
    let server = p.required_string("server", 253)?;
    let port = p.integer("port", 53, 1, 65535)? as u16;
    let name = p.required_string("name", 254)?;
    let type_name = p.string("type", 4)?.unwrap_or("A");
    let qtype = TYPES
        .iter()
        .find(|(n, _)| *n == type_name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            format!(
                "parameter \"type\" must be one of A, AAAA, TXT, MX, not {}",
                Quoted(type_name)
            )
        })?;
    let timeout_ms = p.integer("timeout_ms", 3000, 1, 60000)? as u32;
    let qname = encode_name(name)?;

    let mut id = [0u8; 2];
    imn_guest::random(&mut id).map_err(|e| format!("random: {e}"))?;
    let id = u16::from_be_bytes(id);

    let start = now_ns();
    let conn = TcpStream::connect(server, port, timeout_ms)
        .map_err(|e| format!("connecting to {server} port {port}: {e}"))?;
    let connected = now_ns();
    conn.send_all(&query(id, &qname, qtype))
        .map_err(|e| format!("sending the query to {server} port {port}: {e}"))?;
    let sent = now_ns();
    let left = |what: &str| -> Result<u32, String> {
        let spent = (now_ns().saturating_sub(sent) / 1_000_000).max(0) as u64;
        match u64::from(timeout_ms).checked_sub(spent) {
            Some(n) if n > 0 => Ok(n as u32),
            _ => Err(format!(
                "no {what} from {server} port {port} within {timeout_ms} ms"
            )),
        }
    };
    let mut len = [0u8; 2];
    conn.recv_exact(&mut len, left("answer")?)
        .map_err(|e| format!("reading the answer's length from {server} port {port}: {e}"))?;
    let len = usize::from(u16::from_be_bytes(len));
    if len < HEADER {
        return Err(format!(
            "{server} port {port} announced a {len}-byte answer, shorter than a DNS header"
        ));
    }
    let mut msg = vec![0u8; len];
    conn.recv_exact(&mut msg, left("complete answer")?)
        .map_err(|e| format!("reading the {len}-byte answer from {server} port {port}: {e}"))?;
    let answered = now_ns();
    drop(conn);

    let answer = parse_answer(&msg, id, &qname, qtype, ANSWERS_BUDGET)
        .map_err(|e| format!("{server} port {port}: {e}"))?;
    let mut w = ObjectWriter::new();
    w.string("server", server)
        .uint("port", port.into())
        .string("name", name)
        .string("type", type_name)
        .string("rcode", &rcode_text(answer.rcode))
        .strings("answers", &answer.answers)
        .ms_from_ns("connect_ms", connected - start)
        .ms_from_ns("response_ms", answered - sent);
    if answer.truncated {
        w.bool("truncated", true);
    }
    imn_guest::emit(&w.finish())?;
    Ok(())
}

imn_guest::entry!(measure);

#[cfg(test)]
mod tests {
    use super::*;

    const ID: u16 = 0xbeef;

    /// A response to `query(ID, name, qtype)` with these answer records (owner: a
    /// pointer to the question's name), `flags` as given.
    fn answer(name: &str, qtype: u16, flags: u16, records: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let q = query(ID, &encode_name(name).unwrap(), qtype);
        let mut m = q[2..].to_vec();
        m[2..4].copy_from_slice(&flags.to_be_bytes());
        m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (t, rdata) in records {
            m.extend_from_slice(&[0xC0, 0x0C]);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0x0e, 0x10]);
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    fn parse(m: &[u8], name: &str, qtype: u16) -> Result<Answer, String> {
        parse_answer(m, ID, &encode_name(name).unwrap(), qtype, ANSWERS_BUDGET)
    }

    #[test]
    fn names_encode_and_read_back() {
        assert_eq!(encode_name("a.bc").unwrap(), b"\x01a\x02bc\x00");
        assert_eq!(encode_name("a.bc.").unwrap(), b"\x01a\x02bc\x00");
        assert_eq!(encode_name(".").unwrap(), b"\x00");
        assert!(encode_name("a..b").is_err());
        assert!(encode_name(&"x".repeat(64)).is_err());
        let long = vec!["x".repeat(63); 4].join(".");
        assert!(encode_name(&long).unwrap_err().contains("255"));
        let wire = encode_name("Www.Example.COM").unwrap();
        let (n, end) = read_name(&wire, 0).unwrap();
        assert_eq!((n.text(), end), ("Www.Example.COM".to_string(), wire.len()));
        assert!(n.is(&encode_name("www.example.com").unwrap()));
        assert!(!n.is(&encode_name("www.example.org").unwrap()));
        assert!(!n.is(&encode_name("example.com").unwrap()));
        let (n, end) = read_name(b"\x03a.\\\x02\xff \x00", 0).unwrap();
        assert_eq!((n.text(), end), ("a\\.\\\\.\\255\\032".to_string(), 8));
        assert_eq!(read_name(b"\x00", 0).unwrap().0.text(), ".");
    }

    #[test]
    fn queries_are_length_prefixed() {
        let q = query(0x1234, &encode_name("example.com").unwrap(), 28);
        assert_eq!(&q[..2], &((q.len() - 2) as u16).to_be_bytes());
        assert_eq!(&q[2..6], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[q.len() - 4..], &[0, 28, 0, 1]);
    }

    #[test]
    fn reads_each_type() {
        let a = answer(
            "example.com",
            1,
            0x8180,
            &[
                (1, vec![192, 0, 2, 1]),
                (5, vec![0xC0, 0x0C]),
                (1, vec![198, 51, 100, 7]),
            ],
        );
        let r = parse(&a, "EXAMPLE.com.", 1).unwrap();
        assert_eq!(
            (r.rcode, r.answers),
            (0, vec!["192.0.2.1".to_string(), "198.51.100.7".into()])
        );

        let mut v6 = vec![0x20, 0x01, 0x0d, 0xb8];
        v6.extend_from_slice(&[0; 11]);
        v6.push(1);
        let r = parse(
            &answer("example.com", 28, 0x8180, &[(28, v6)]),
            "example.com",
            28,
        )
        .unwrap();
        assert_eq!(r.answers, vec!["2001:db8::1"]);

        let txt = b"\x05v=spf\x071 -all\"\x00".to_vec();
        let r = parse(
            &answer("example.com", 16, 0x8180, &[(16, txt)]),
            "example.com",
            16,
        )
        .unwrap();
        assert_eq!(r.answers, vec!["v=spf1 -all\""]);

        // MX: preference, then the exchange "mail" + a pointer to the question name.
        let mx = b"\x00\x0a\x04mail\xc0\x0c".to_vec();
        let r = parse(
            &answer("example.com", 15, 0x8180, &[(15, mx)]),
            "example.com",
            15,
        )
        .unwrap();
        assert_eq!(r.answers, vec!["10 mail.example.com"]);

        let r = parse(&answer("nope.example", 1, 0x8183, &[]), "nope.example", 1).unwrap();
        assert_eq!(
            (rcode_text(r.rcode), r.answers.len()),
            ("NXDOMAIN".to_string(), 0)
        );
        assert_eq!(rcode_text(5), "REFUSED");
        assert_eq!(rcode_text(4), "4");
    }

    #[test]
    fn says_what_is_wrong() {
        let good = answer("example.com", 1, 0x8180, &[(1, vec![192, 0, 2, 1])]);
        let err = |m: &[u8]| parse(m, "example.com", 1).unwrap_err();
        assert!(err(&good[..11]).contains("shorter"));
        let mut m = good.clone();
        m[1] ^= 1;
        assert!(err(&m).contains("id"));
        let mut m = good.clone();
        m[2] &= 0x7f;
        assert!(err(&m).contains("QR"));
        assert!(parse(&good, "example.org", 1)
            .unwrap_err()
            .contains("another question"));
        assert!(parse(&good, "example.com", 28)
            .unwrap_err()
            .contains("another question"));
        assert!(err(&good[..good.len() - 1]).contains("past the end"));
        let bad_a = answer("example.com", 1, 0x8180, &[(1, vec![1, 2, 3])]);
        assert!(err(&bad_a).contains("3 bytes"));
        // A pointer to itself: a loop, cut by the bound on jumps.
        let mut m = good.clone();
        let owner = m.len() - 16;
        m[owner..owner + 2].copy_from_slice(&[0xC0, owner as u8]);
        assert!(err(&m).contains("compression pointers"));
        // A pointer past the end.
        let mut m = good.clone();
        m[owner + 1] = 0xff;
        assert!(err(&m).contains("points past"));
        // Two pointers pointing at each other.
        let mut m = good.clone();
        m.extend_from_slice(&[0xC0, 0x00]);
        let l = m.len();
        m[owner..owner + 2].copy_from_slice(&[0xC0, (l - 2) as u8]);
        m[l - 2..].copy_from_slice(&[0xC0, owner as u8]);
        assert!(err(&m).contains("compression pointers"));
        // MX whose exchange runs past its record.
        let mx = answer(
            "example.com",
            15,
            0x8180,
            &[(15, b"\x00\x0a\x04mail".to_vec())],
        );
        assert!(parse(&mx, "example.com", 15).is_err());
        // TXT whose string runs past its record.
        let txt = answer("example.com", 16, 0x8180, &[(16, b"\x09short".to_vec())]);
        assert!(parse(&txt, "example.com", 16).unwrap_err().contains("TXT"));
    }

    #[test]
    fn hostile_answers_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let goods = [
            (
                answer(
                    "example.com",
                    1,
                    0x8180,
                    &[(1, vec![192, 0, 2, 1]), (5, vec![0xC0, 0x0C])],
                ),
                1,
            ),
            (
                answer(
                    "example.com",
                    15,
                    0x8180,
                    &[(15, b"\x00\x0a\x04mail\xc0\x0c".to_vec())],
                ),
                15,
            ),
            (
                answer("example.com", 16, 0x8180, &[(16, b"\x02ab\x01c".to_vec())]),
                16,
            ),
        ];
        for (m, t) in &goods {
            for i in 0..=m.len() {
                let _ = parse(&m[..i], "example.com", *t);
            }
            for _ in 0..30_000 {
                let mut c = m.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % c.len();
                    c[i] = next() as u8;
                }
                if next() % 2 == 0 {
                    c[..4].copy_from_slice(&m[..4]);
                }
                let _ = parse(&c, "example.com", *t);
            }
        }
    }

    #[test]
    fn answers_are_cut_to_fit_a_result() {
        let records: Vec<(u16, Vec<u8>)> = (0..4000u32)
            .map(|i| (1, vec![10, 0, (i / 256) as u8, i as u8]))
            .collect();
        let m = answer("example.com", 1, 0x8180, &records);
        let all = parse(&m, "example.com", 1).unwrap();
        assert_eq!((all.answers.len(), all.truncated), (4000, false));
        assert_eq!(all.answers[258], "10.0.1.2");
        let cut = parse_answer(&m, ID, &encode_name("example.com").unwrap(), 1, 1000).unwrap();
        assert!(cut.truncated);
        let mut w = ObjectWriter::new();
        w.strings("answers", &cut.answers);
        assert!(w.finish().len() <= 1000 + 14);
        assert_eq!(ipv4_text([0, 9, 10, 255]), "0.9.10.255");
        assert_eq!(ipv4_text([100, 199, 200, 1]), "100.199.200.1");
    }
}
