//! A stub DNS resolver of the agent's own: `/etc/hosts`, then the name servers of
//! `/etc/resolv.conf` (or those the agent is configured with), over UDP with a TCP retry
//! for truncated answers.
//!
//! The firmware is a static glibc binary. glibc's `getaddrinfo` loads its NSS modules
//! from shared libraries at run time, which a static binary cannot do on a musl-based
//! OpenWrt, so the agent never calls it: every name the agent looks up (its broker and
//! every measurement target) goes through here, on every build, so the code that runs on
//! a router is the code the tests run.
//!
//! Answers are parsed defensively: a reply from the network never panics the agent, and
//! a reply whose id, question or flags do not match the query is ignored. The DNS codec,
//! [`wire`], is also the `dns` measurement module's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::RwLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub mod wire;

use wire::{Header, NameRules, Query, Question, Reader, Record};
use wire::{CLASS_IN, FLAG_TC, TYPE_A, TYPE_AAAA, TYPE_CNAME};

/// Name servers set by the agent's config; when empty, `/etc/resolv.conf` decides.
static NAMESERVERS: RwLock<Vec<SocketAddr>> = RwLock::new(Vec::new());

/// Uses these name servers instead of `/etc/resolv.conf`'s (empty: back to the file).
pub fn set_nameservers(servers: Vec<SocketAddr>) {
    if let Ok(mut s) = NAMESERVERS.write() {
        *s = servers;
    }
}

/// Parses `ADDR` or `ADDR:PORT` (IPv6 with a port as `[ADDR]:PORT`); port 53 by default.
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address or ADDR:PORT"))
}

/// What `/etc/resolv.conf` says, as far as a stub resolver needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
    pub timeout: Duration,
    pub attempts: usize,
}

impl Default for ResolvConf {
    fn default() -> Self {
        ResolvConf {
            nameservers: Vec::new(),
            search: Vec::new(),
            ndots: 1,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut rc = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A zone index (fe80::1%eth0) is dropped: the OS picks the interface.
                    if let Some(ip) = words.next().and_then(|w| w.split('%').next()) {
                        if let Ok(ip) = ip.parse::<IpAddr>() {
                            rc.nameservers.push(SocketAddr::new(ip, 53));
                        }
                    }
                }
                Some("search") | Some("domain") => {
                    rc.search = words.map(|w| w.trim_end_matches('.').to_string()).collect();
                }
                Some("options") => {
                    for opt in words {
                        let (k, v) = opt.split_once(':').unwrap_or((opt, ""));
                        let n = v.parse::<u64>().ok();
                        match (k, n) {
                            ("ndots", Some(n)) => rc.ndots = n.min(15) as usize,
                            ("timeout", Some(n)) => {
                                rc.timeout = Duration::from_secs(n.clamp(1, 30))
                            }
                            ("attempts", Some(n)) => rc.attempts = n.clamp(1, 5) as usize,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        rc
    }

    pub fn load() -> ResolvConf {
        let mut rc = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| ResolvConf::parse(&t))
            .unwrap_or_default();
        if let Ok(s) = NAMESERVERS.read() {
            if !s.is_empty() {
                rc.nameservers = s.clone();
            }
        }
        rc
    }
}

/// The addresses `/etc/hosts`-style text gives `name` (case-insensitive), in file order.
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        if words.any(|w| w.eq_ignore_ascii_case(name)) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Resolves a host name or address literal to its addresses: IPv4 first, then IPv6.
pub async fn lookup(host: &str) -> Result<Vec<IpAddr>, String> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    check_name(host).map_err(|rule| format!("cannot resolve {host:?}: {rule}"))?;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let found = hosts_lookup(&hosts, host);
    if !found.is_empty() {
        return Ok(found);
    }
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    // RFC 6761: these never go to a name server.
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Ok(vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
    }
    if lower == "invalid" || lower.ends_with(".invalid") {
        return Err(format!("cannot resolve {host:?}: no such name"));
    }
    let rc = ResolvConf::load();
    if rc.nameservers.is_empty() {
        return Err(format!(
            "cannot resolve {host:?}: no name server (none in /etc/resolv.conf or the config)"
        ));
    }
    let mut last = String::from("no answer");
    for candidate in candidates(host, &rc) {
        match query_both(&candidate, &rc).await {
            Ok(ips) if !ips.is_empty() => return Ok(ips),
            Ok(_) => last = "no address records".into(),
            Err(e) => last = e,
        }
    }
    Err(format!("cannot resolve {host:?}: {last}"))
}

/// The names to try, in order, after the search list and `ndots`.
fn candidates(host: &str, rc: &ResolvConf) -> Vec<String> {
    if host.ends_with('.') {
        return vec![host.trim_end_matches('.').to_string()];
    }
    let searched = rc.search.iter().map(|d| format!("{host}.{d}"));
    if host.matches('.').count() >= rc.ndots {
        std::iter::once(host.to_string()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(host.to_string())).collect()
    }
}

/// A host name as DNS allows it: labels of 1 to 63 bytes, 253 in all.
fn check_name(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("empty host name".into());
    }
    if name.len() > 253 {
        return Err("names are at most 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label is 1 to 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("labels hold letters, digits, '-' and '_' only".into());
        }
    }
    Ok(())
}

/// A and AAAA for one name, asked at once: IPv4 addresses first.
async fn query_both(name: &str, rc: &ResolvConf) -> Result<Vec<IpAddr>, String> {
    let (a, aaaa) = tokio::join!(query(name, TYPE_A, rc), query(name, TYPE_AAAA, rc));
    match (a, aaaa) {
        (Ok(mut v4), Ok(v6)) => {
            v4.extend(v6);
            Ok(v4)
        }
        (Ok(v), Err(_)) | (Err(_), Ok(v)) => Ok(v),
        (Err(e), Err(_)) => Err(e),
    }
}

/// One question, to each name server in turn, `attempts` rounds.
async fn query(name: &str, qtype: u16, rc: &ResolvConf) -> Result<Vec<IpAddr>, String> {
    let mut last = String::from("no name server answered");
    for _ in 0..rc.attempts {
        for &server in &rc.nameservers {
            let id: u16 = rand_id();
            let msg = encode_query(id, name, qtype);
            match tokio::time::timeout(rc.timeout, exchange(server, &msg, id, name, qtype)).await {
                Ok(Ok(Answer::Addrs(ips))) => return Ok(ips),
                // A name server's definite "no" is the answer; don't ask the next one.
                Ok(Ok(Answer::NoName)) => return Err("no such name".into()),
                Ok(Err(e)) => last = format!("{server}: {e}"),
                Err(_) => last = format!("{server}: no answer in {:?}", rc.timeout),
            }
        }
    }
    Err(last)
}

/// A DNS transaction id from the OS's random source: an off-path attacker must not
/// guess it.
pub fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // getrandom fails only without any OS source (no getrandom(2) and no /dev/urandom);
    // zero is then as good as anything the process could make up.
    let _ = getrandom::getrandom(&mut b);
    u16::from_ne_bytes(b)
}

async fn exchange(
    server: SocketAddr,
    msg: &[u8],
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<Answer, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
        match parse_response(&buf[..n], id, name, qtype) {
            Ok(Parsed::Truncated) => return exchange_tcp(server, msg, id, name, qtype).await,
            Ok(Parsed::Done(a)) => return Ok(a),
            // Not our reply (a late one, or spoofed): keep waiting until the timeout.
            Err(ParseError::NotOurs) => continue,
            Err(ParseError::Bad(e)) => return Err(e),
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    msg: &[u8],
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<Answer, String> {
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).await.map_err(|e| e.to_string())?;
    let len = s.read_u16().await.map_err(|e| e.to_string())? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    match parse_response(&buf, id, name, qtype) {
        Ok(Parsed::Done(a)) => Ok(a),
        Ok(Parsed::Truncated) => Err("truncated answer over TCP".into()),
        Err(ParseError::NotOurs) => Err("mismatched answer over TCP".into()),
        Err(ParseError::Bad(e)) => Err(e),
    }
}

/// A query with recursion desired.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    Query::recursive(name, qtype).encode(id)
}

#[derive(Debug, PartialEq)]
pub enum Answer {
    Addrs(Vec<IpAddr>),
    NoName,
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Done(Answer),
    Truncated,
}

#[derive(Debug, PartialEq)]
pub enum ParseError {
    /// Not a reply to this query.
    NotOurs,
    /// A reply, but malformed or an error.
    Bad(String),
}

/// The resolver's bounds on names: 128 labels and pointers, and at most 255
/// characters as [`lower_text`] spells the name. They are the resolver's own from before
/// its codec was shared with the `dns` module, kept so that it takes and refuses the
/// answers it did; [`NameRules::RFC`] would refuse a few longer names and allow longer
/// pointer chains.
const NAMES: NameRules = NameRules {
    steps: 128,
    too_long: |wire| lower_text(wire).len() > 255,
};

/// A wire-format name as the resolver compares names: ASCII lowercased, dot-joined,
/// without the final dot; a byte above 0x7f as the character of the same number (two
/// bytes in UTF-8).
fn lower_text(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&l) = wire.get(i).filter(|&&l| l != 0) {
        let label = wire.get(i + 1..i + 1 + usize::from(l)).unwrap_or_default();
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
        i += 1 + usize::from(l);
    }
    out
}

/// The resolver's words for a message it cannot read.
fn bad(e: wire::Error) -> ParseError {
    ParseError::Bad(
        match e {
            wire::Error::Short | wire::Error::NameShort => "answer ends early",
            wire::Error::Forward(_) => "name pointer does not point back",
            wire::Error::TooLong => "name longer than 255 bytes",
            wire::Error::LabelType(_) => "unknown label type",
            wire::Error::TooManySteps => "name has too many labels",
        }
        .into(),
    )
}

/// Checks that `buf` answers query `id` for `name`/`qtype`, and takes its addresses.
/// Follows the CNAME chain from `name`, so only addresses of the name asked count.
pub fn parse_response(buf: &[u8], id: u16, name: &str, qtype: u16) -> Result<Parsed, ParseError> {
    if wire::reply_id(buf) != Some(id) {
        return Err(ParseError::NotOurs);
    }
    let mut r = Reader::new(buf).with_rules(NAMES);
    let h = Header::read(&mut r).map_err(bad)?;
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    if h.qdcount != 1 {
        return Err(ParseError::NotOurs);
    }
    let q = Question::read(&mut r).map_err(bad)?;
    if lower_text(&q.name) != want || q.qtype != qtype || q.qclass != CLASS_IN {
        return Err(ParseError::NotOurs);
    }
    if h.has(FLAG_TC) {
        return Ok(Parsed::Truncated);
    }
    match h.rcode() {
        0 => {}
        3 => return Ok(Parsed::Done(Answer::NoName)),
        2 => return Err(ParseError::Bad("server failure (SERVFAIL)".into())),
        5 => return Err(ParseError::Bad("query refused (REFUSED)".into())),
        rc => return Err(ParseError::Bad(format!("error rcode {rc}"))),
    }
    let mut records = Vec::new();
    for _ in 0..h.ancount {
        let rec = Record::read(&mut r).map_err(bad)?;
        let value = match (rec.rtype, rec.class, rec.data) {
            (TYPE_A, CLASS_IN, &[a, b, c, d]) => Some(Rec::Ip(IpAddr::from([a, b, c, d]))),
            (TYPE_AAAA, CLASS_IN, data) if data.len() == 16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(data);
                Some(Rec::Ip(IpAddr::from(a)))
            }
            (TYPE_CNAME, CLASS_IN, _) => {
                let mut sub = Reader::new(buf).with_rules(NAMES).at(rec.data_at);
                Some(Rec::Alias(lower_text(&sub.name().map_err(bad)?)))
            }
            _ => None,
        };
        if let Some(v) = value {
            records.push((lower_text(&rec.name), v));
        }
    }
    // Follow aliases from the name asked, at most 16 deep.
    let mut current = want;
    let mut ips = Vec::new();
    for _ in 0..16 {
        ips.extend(records.iter().filter_map(|(o, v)| match v {
            Rec::Ip(ip) if *o == current => Some(*ip),
            _ => None,
        }));
        if !ips.is_empty() {
            break;
        }
        match records.iter().find_map(|(o, v)| match v {
            Rec::Alias(to) if *o == current => Some(to.clone()),
            _ => None,
        }) {
            Some(next) => current = next,
            None => break,
        }
    }
    Ok(Parsed::Done(Answer::Addrs(ips)))
}

enum Rec {
    Ip(IpAddr),
    Alias(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_parsed() {
        let rc = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.53\nnameserver fe80::1%eth0 \nsearch lan corp.\n\
             options ndots:2 timeout:1 attempts:3 rotate\nnameserver bogus\n",
        );
        assert_eq!(
            rc.nameservers,
            vec![
                "10.0.0.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(rc.search, vec!["lan", "corp"]);
        assert_eq!(
            (rc.ndots, rc.timeout, rc.attempts),
            (2, Duration::from_secs(1), 3)
        );
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }

    #[test]
    fn hosts_file_is_parsed() {
        let text = "127.0.0.1 localhost\n::1 localhost ip6-localhost # v6\n\
                    10.1.2.3 Broker.lan broker\n# 10.9.9.9 broker\nbad line\n";
        assert_eq!(
            hosts_lookup(text, "localhost"),
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            hosts_lookup(text, "broker."),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            hosts_lookup(text, "BROKER.LAN"),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert!(hosts_lookup(text, "nothing").is_empty());
    }

    #[test]
    fn search_list_and_ndots() {
        let rc = ResolvConf {
            search: vec!["lan".into()],
            ..ResolvConf::default()
        };
        assert_eq!(candidates("broker", &rc), vec!["broker.lan", "broker"]);
        assert_eq!(candidates("a.b", &rc), vec!["a.b", "a.b.lan"]);
        assert_eq!(candidates("a.b.", &rc), vec!["a.b"]);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("a.example").is_ok());
        assert!(check_name("a..b").unwrap_err().contains("label"));
        assert!(check_name("").unwrap_err().contains("empty"));
        assert!(check_name("a b").unwrap_err().contains("labels hold"));
        assert!(check_name(&"a".repeat(64)).is_err());
    }

    fn reply(q: &[u8], rcode: u8, answers: &[(&[u8], u16, &[u8])]) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] |= 0x80;
        m[3] |= rcode;
        m[7] = answers.len() as u8;
        for (owner, t, data) in answers {
            m.extend_from_slice(owner);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    #[test]
    fn answers_follow_cnames_through_compression() {
        let q = encode_query(7, "www.example.com", TYPE_A);
        // www.example.com CNAME web.example.com (compressed); web.example.com A 192.0.2.9;
        // and an unrelated A that must not be taken.
        let web = [3, b'w', b'e', b'b', 0xC0, 16]; // "web" + pointer to "example.com"
        let mut m = reply(&q, 0, &[(&[0xC0, 12], TYPE_CNAME, &web)]);
        let web_at = m.len() - web.len();
        m[7] = 3;
        m.extend_from_slice(&[0xC0, web_at as u8]);
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 9]);
        m.extend_from_slice(&[1, b'x', 0, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 1]);
        assert_eq!(
            parse_response(&m, 7, "WWW.example.com.", TYPE_A),
            Ok(Parsed::Done(Answer::Addrs(vec!["192.0.2.9"
                .parse()
                .unwrap()])))
        );
    }

    #[test]
    fn mismatches_errors_and_truncation() {
        let q = encode_query(9, "a.test", TYPE_AAAA);
        let ok = reply(&q, 0, &[(&[0xC0, 12], TYPE_AAAA, &[0; 16])]);
        assert_eq!(
            parse_response(&ok, 9, "a.test", TYPE_AAAA),
            Ok(Parsed::Done(Answer::Addrs(vec!["::".parse().unwrap()])))
        );
        assert_eq!(
            parse_response(&ok, 10, "a.test", TYPE_AAAA),
            Err(ParseError::NotOurs)
        );
        assert_eq!(
            parse_response(&ok, 9, "b.test", TYPE_AAAA),
            Err(ParseError::NotOurs)
        );
        assert_eq!(
            parse_response(&q, 9, "a.test", TYPE_AAAA),
            Err(ParseError::NotOurs),
            "a query is not a reply"
        );
        assert_eq!(
            parse_response(&reply(&q, 3, &[]), 9, "a.test", TYPE_AAAA),
            Ok(Parsed::Done(Answer::NoName))
        );
        assert!(matches!(
            parse_response(&reply(&q, 2, &[]), 9, "a.test", TYPE_AAAA),
            Err(ParseError::Bad(e)) if e.contains("SERVFAIL")
        ));
        let mut tc = reply(&q, 0, &[]);
        tc[2] |= 0x02;
        assert_eq!(
            parse_response(&tc, 9, "a.test", TYPE_AAAA),
            Ok(Parsed::Truncated)
        );
        // A pointer to itself is refused, not followed forever.
        let looped = reply(&q, 0, &[(&[0xC0, 30], TYPE_A, &[1, 2, 3, 4])]);
        assert!(parse_response(&looped, 9, "a.test", TYPE_AAAA).is_err());
        assert_eq!(
            parse_response(&looped, 9, "a.test", TYPE_AAAA),
            Err(ParseError::Bad("name pointer does not point back".into()))
        );
    }

    /// The resolver's words, and its bounds on names (not RFC 1035's: 128 steps, 255
    /// characters as `lower_text` spells the name).
    #[test]
    fn errors_and_name_bounds() {
        let q = encode_query(9, "a.test", TYPE_A);
        let ok = reply(&q, 0, &[(&[0xC0, 12], TYPE_A, &[1, 2, 3, 4])]);
        let bad = |m: &[u8]| match parse_response(m, 9, "a.test", TYPE_A) {
            Err(ParseError::Bad(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(&ok[..ok.len() - 1]), "answer ends early");
        assert_eq!(bad(&ok[..11]), "answer ends early");
        assert_eq!(
            parse_response(&ok[..3], 9, "a.test", TYPE_A),
            Err(ParseError::NotOurs)
        );
        let mut label_type = ok.clone();
        label_type[24] = 0x80;
        assert_eq!(bad(&label_type), "unknown label type");
        assert_eq!(bad(&reply(&q, 5, &[])), "query refused (REFUSED)");
        assert_eq!(bad(&reply(&q, 4, &[])), "error rcode 4");
        // An A record whose owner is a pointer to a chain of `k` more pointers to the
        // question's name (the chain is the data of a record before it): k + 1
        // pointers, two labels and the root label.
        let owned_via = |k: usize| {
            let mut m = reply(&q, 0, &[]);
            m[7] = 2;
            m.extend_from_slice(&[0xC0, 12, 0, 99, 0, 1, 0, 0, 0, 60]);
            m.extend_from_slice(&(2 * k as u16).to_be_bytes());
            let mut at = 12;
            for _ in 0..k {
                let here = m.len();
                m.extend_from_slice(&[0xC0 | (at >> 8) as u8, at as u8]);
                at = here;
            }
            let owner = m.len();
            m.extend_from_slice(&[0xC0 | (at >> 8) as u8, at as u8]);
            m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
            (m, owner)
        };
        let (m, _) = owned_via(124); // 128 steps
        assert_eq!(
            parse_response(&m, 9, "a.test", TYPE_A),
            Ok(Parsed::Done(Answer::Addrs(vec!["1.2.3.4"
                .parse()
                .unwrap()])))
        );
        let (m, owner) = owned_via(125); // 129 steps
        assert_eq!(bad(&m), "name has too many labels");
        assert!(
            Reader::new(&m).at(owner).name().is_ok(),
            "RFC 1035's rules allow 256 steps"
        );
        // Four labels of 63: 257 bytes in wire format, more than RFC 1035 allows, but
        // 255 characters: the resolver reads it (and finds no address of the name asked).
        let long: Vec<u8> = (0..4)
            .flat_map(|_| std::iter::once(63).chain([b'a'; 63]))
            .chain([0])
            .collect();
        let mut m = reply(&q, 0, &[(&long, TYPE_A, &[1, 2, 3, 4])]);
        assert_eq!(
            parse_response(&m, 9, "a.test", TYPE_A),
            Ok(Parsed::Done(Answer::Addrs(Vec::new())))
        );
        assert_eq!(
            Reader::new(&m).at(24).name(),
            Err(wire::Error::TooLong),
            "RFC 1035's rules refuse it"
        );
        // One more label: too long.
        m.splice(24 + 64 * 4..24 + 64 * 4, [1, b'a']);
        assert_eq!(bad(&m), "name longer than 255 bytes");
        // Bytes above 0x7f count twice: three labels of 63 are 191 bytes in wire format,
        // but more than 255 characters.
        let high: Vec<u8> = (0..3)
            .flat_map(|_| std::iter::once(63).chain([0xE9; 63]))
            .chain([0])
            .collect();
        assert_eq!(
            bad(&reply(&q, 0, &[(&high, TYPE_A, &[1, 2, 3, 4])])),
            "name longer than 255 bytes"
        );
        assert_eq!(lower_text(b"\x01A\x02Bc\x00"), "a.bc");
        assert_eq!(lower_text(b"\x00"), "");
    }

    #[test]
    fn no_input_panics() {
        let q = encode_query(1, "a.test", TYPE_A);
        let good = reply(&q, 0, &[(&[0xC0, 12], TYPE_A, &[1, 2, 3, 4])]);
        // Every truncation and every single-byte change of a good reply.
        for n in 0..good.len() {
            let _ = parse_response(&good[..n], 1, "a.test", TYPE_A);
            for v in [0u8, 0x3F, 0xC0, 0xFF] {
                let mut m = good.clone();
                m[n] = v;
                let _ = parse_response(&m, 1, "a.test", TYPE_A);
            }
        }
        let mut x: u32 = 1;
        for _ in 0..20_000 {
            let len = (x % 80) as usize;
            let m: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse_response(&m, 1, "a.test", TYPE_A);
        }
    }

    #[tokio::test]
    async fn literals_localhost_and_invalid_never_query() {
        assert_eq!(
            lookup("[::1]").await.unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            lookup("192.0.2.1").await.unwrap(),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert!(lookup("localhost")
            .await
            .unwrap()
            .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let e = lookup("no-such-host.invalid").await.unwrap_err();
        assert!(e.contains("no such name"), "{e}");
        let e = lookup("bad name").await.unwrap_err();
        assert!(e.contains("labels hold"), "{e}");
    }
}
