//! The `dns` module: one DNS query over UDP or TCP, as dig or RIPE Atlas's tdig send it,
//! and the whole answer parsed: header, flags, rcode, every section with typed record
//! data, the EDNS0 OPT record, and the raw answer.

#[cfg(feature = "atlas")]
pub mod atlas;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{str_param, u64_param, Examples};
use crate::catalog::ModuleSpec;
use crate::params::ParamError;
use crate::policy::{Demand, Target};
use crate::summary::{cap, Summary};

/// The `dns` module's entry in the catalog.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: "dns",
    version: "1.0.0",
    description: "One DNS query over UDP or TCP: rcode, flags, every section, and the raw answer.",
    default_timeout_ms: 60_000,
    schema_hash: "051210d74a005fdd",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: dns_schema,
    #[cfg(feature = "catalog")]
    examples: dns_examples,
    demand: dns_demand,
    #[cfg(feature = "catalog")]
    check: dns_check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::dns),
};

/// Record types the module can ask for, by name and number.
pub const TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DNAME", 39),
    ("DS", 43),
    ("SSHFP", 44),
    ("RRSIG", 46),
    ("NSEC", 47),
    ("DNSKEY", 48),
    ("NSEC3", 50),
    ("NSEC3PARAM", 51),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

/// Classes the module can ask for.
pub const CLASSES: &[(&str, u16)] = &[("IN", 1), ("CH", 3), ("HS", 4), ("ANY", 255)];

/// The number of a type name (case-insensitive), or of `TYPEnnn` (RFC 3597).
pub fn type_code(name: &str) -> Option<u16> {
    let upper = name.to_ascii_uppercase();
    if let Some(n) = upper.strip_prefix("TYPE") {
        return n.parse().ok();
    }
    TYPES.iter().find(|(n, _)| *n == upper).map(|(_, c)| *c)
}

/// The name of a type number: its mnemonic, or `TYPEnnn`.
pub fn type_name(code: u16) -> String {
    match code {
        41 => "OPT".into(),
        _ => TYPES
            .iter()
            .find(|(_, c)| *c == code)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| format!("TYPE{code}")),
    }
}

/// The number of a class name (case-insensitive), or of `CLASSnnn`.
pub fn class_code(name: &str) -> Option<u16> {
    let upper = name.to_ascii_uppercase();
    if let Some(n) = upper.strip_prefix("CLASS") {
        return n.parse().ok();
    }
    CLASSES.iter().find(|(n, _)| *n == upper).map(|(_, c)| *c)
}

/// The name of a class number: its mnemonic, or `CLASSnnn`.
pub fn class_name(code: u16) -> String {
    CLASSES
        .iter()
        .find(|(_, c)| *c == code)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| format!("CLASS{code}"))
}

/// The transport of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsProtocol {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsParams {
    /// The name asked for; with type PTR, an IP address stands for its reverse name.
    pub name: String,
    /// The record type asked for (`A`, `MX`, ..., or `TYPEnnn`).
    #[serde(rename = "type", default = "default_type")]
    pub qtype: String,
    /// The class asked for.
    #[serde(default = "default_class")]
    pub class: String,
    /// The name server: `ADDR`, `ADDR:PORT`, `[V6]:PORT` or a host name (port 53);
    /// absent, the system's first name server.
    pub server: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: DnsProtocol,
    /// Recursion desired.
    #[serde(default = "yes")]
    pub rd: bool,
    /// DNSSEC OK, in the EDNS0 OPT record.
    #[serde(rename = "do", default)]
    pub dnssec_ok: bool,
    /// Checking disabled.
    #[serde(default)]
    pub cd: bool,
    /// The UDP payload size advertised in EDNS0; 0 sends no OPT record.
    #[serde(default = "default_edns_size")]
    pub edns_size: u16,
    /// Asks for the server's NSID (RFC 5001).
    #[serde(default)]
    pub nsid: bool,
    /// How long one attempt waits for its answer.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Further attempts after one that got no answer or was refused.
    #[serde(default)]
    pub retries: u32,
    /// Asks again over TCP when the UDP answer is truncated.
    #[serde(default = "yes")]
    pub use_tcp_on_truncation: bool,
}

fn default_type() -> String {
    "A".into()
}
fn default_class() -> String {
    "IN".into()
}
fn default_protocol() -> DnsProtocol {
    DnsProtocol::Udp
}
fn yes() -> bool {
    true
}
fn default_edns_size() -> u16 {
    1232
}
fn default_timeout() -> u64 {
    5000
}

/// Where the name server came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerSource {
    /// The `server` parameter.
    Params,
    /// The system's resolver configuration (`/etc/resolv.conf` or the agent's config).
    System,
}

/// Why a query got no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsErrorKind {
    /// No answer within `timeout_ms`, on every attempt.
    Timeout,
    /// The network refused: ICMP unreachable, TCP reset, connection closed early.
    Network,
    /// An answer came, but it is not a well-formed DNS message (see `abuf`).
    Malformed,
}

/// A failure after the query was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsError {
    pub kind: DnsErrorKind,
    pub message: String,
}

/// One query and what came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsResult {
    /// The name server's address and port.
    pub server: String,
    pub port: u16,
    pub server_source: ServerSource,
    /// Our address on the socket of the final exchange.
    pub src_addr: Option<String>,
    /// The transport of the final exchange.
    pub protocol: DnsProtocol,
    /// The UDP answer was truncated (TC) and the query was asked again over TCP.
    pub tcp_after_truncation: bool,
    /// The name asked, in presentation format with a final dot.
    pub qname: String,
    pub qtype: String,
    pub qclass: String,
    /// The query as sent (the last one, if several), base64.
    pub qbuf: String,
    /// Attempts made over the final transport.
    pub attempts: u32,
    /// The timeout of each attempt, ms.
    pub timeout_ms: u32,
    /// Set when no usable answer came.
    pub error: Option<DnsError>,
    /// The answer, when one came (also when it is malformed).
    pub reply: Option<Box<DnsReply>>,
}

impl DnsResult {
    /// The parsed answer, if one came and it is well-formed.
    pub fn message(&self) -> Option<&DnsMessage> {
        self.reply.as_ref().and_then(|r| r.message.as_ref())
    }
}

/// The answer to the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsReply {
    /// From sending the query to receiving the whole answer (monotonic clock), ms.
    pub rt_ms: f64,
    /// The TCP handshake's duration, when the final exchange used TCP, ms.
    pub tcp_connect_ms: Option<f64>,
    /// The answer's size in bytes.
    pub size: u32,
    /// The raw answer, base64 (as Atlas's `abuf`).
    pub abuf: String,
    /// The answer, parsed; None when it is malformed (then `error` says why).
    pub message: Option<DnsMessage>,
}

/// A parsed DNS message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsMessage {
    pub id: u16,
    pub opcode: u8,
    /// The full rcode: the header's 4 bits plus the OPT record's extended bits.
    pub rcode: u16,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ..., or `RCODEnnn`.
    pub rcode_name: String,
    pub flags: DnsFlags,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    pub question: Vec<DnsQuestion>,
    pub answer: Vec<DnsRecord>,
    pub authority: Vec<DnsRecord>,
    /// The additional section without the OPT record (that is `edns`).
    pub additional: Vec<DnsRecord>,
    pub edns: Option<EdnsInfo>,
}

/// Header flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsFlags {
    pub qr: bool,
    pub aa: bool,
    pub tc: bool,
    pub rd: bool,
    pub ra: bool,
    /// The reserved bit.
    pub z: bool,
    pub ad: bool,
    pub cd: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsQuestion {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
    pub class: String,
}

/// What the OPT pseudo-record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdnsInfo {
    pub udp_size: u16,
    pub version: u8,
    /// The upper 8 bits of the rcode.
    pub ext_rcode: u8,
    #[serde(rename = "do")]
    pub dnssec_ok: bool,
    /// The NSID option's bytes, hex.
    pub nsid_hex: Option<String>,
    /// The NSID as text, when it is printable ASCII.
    pub nsid: Option<String>,
    /// Every option, with its data in hex.
    pub options: Vec<EdnsOption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdnsOption {
    pub code: u16,
    /// `NSID`, `COOKIE`, `EDE`, ... or `OPTnnn`.
    pub name: String,
    pub data_hex: String,
}

/// One resource record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub type_code: u16,
    pub class: String,
    pub ttl: u32,
    pub rdlength: u16,
    /// The data in presentation format, as dig prints it.
    pub rdata: String,
    /// The data as typed fields.
    pub data: RData,
}

/// Record data by type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RData {
    A {
        address: String,
    },
    Aaaa {
        address: String,
    },
    /// CNAME, NS, PTR and DNAME: one name.
    Name {
        target: String,
    },
    Mx {
        preference: u16,
        exchange: String,
    },
    Soa {
        mname: String,
        rname: String,
        serial: u32,
        refresh: u32,
        retry: u32,
        expire: u32,
        minimum: u32,
    },
    Txt {
        strings: Vec<String>,
    },
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Caa {
        flags: u8,
        tag: String,
        value: String,
    },
    /// SVCB and HTTPS.
    Svcb(SvcbData),
    Ds {
        key_tag: u16,
        algorithm: u8,
        digest_type: u8,
        digest_hex: String,
    },
    Dnskey {
        flags: u16,
        protocol: u8,
        algorithm: u8,
        public_key_base64: String,
        key_tag: u16,
    },
    /// Any other type: only the presentation string says what it holds.
    Other,
}

/// SVCB/HTTPS data (RFC 9460).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvcbData {
    pub priority: u16,
    pub target: String,
    /// Every parameter in wire order, in presentation format.
    pub params: Vec<SvcParam>,
    pub mandatory: Vec<String>,
    pub alpn: Vec<String>,
    pub no_default_alpn: bool,
    pub port: Option<u16>,
    pub ipv4hint: Vec<String>,
    pub ipv6hint: Vec<String>,
    /// The ECHConfigList, base64.
    pub ech: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcParam {
    pub key: String,
    pub value: String,
}

pub fn dns_schema() -> Value {
    let types: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "dns parameters",
        "description": "One DNS query to one name server, over UDP (with a TCP retry when truncated) or TCP.",
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 1024,
                "description": "The name asked, in presentation format (`\\.` and `\\DDD` escapes allowed; `.` is the root). With type PTR an IPv4 or IPv6 address is turned into its in-addr.arpa or ip6.arpa name."},
            "type": {"type": "string", "default": "A",
                "pattern": "^([A-Za-z][A-Za-z0-9]{0,9}|TYPE[0-9]{1,5})$",
                "description": format!("The record type, case-insensitive: one of {} or TYPEnnn (RFC 3597). Default A.", types.join(", "))},
            "class": {"type": "string", "default": "IN", "enum": ["IN", "CH", "HS", "ANY", "in", "ch", "hs", "any"],
                "description": "The class asked. Default IN."},
            "server": {"type": "string", "minLength": 1, "maxLength": 262,
                "description": "The name server: ADDR, ADDR:PORT, [IPv6]:PORT, or a host name (optionally NAME:PORT) that the agent resolves. Absent: the agent's first system name server. Port 53 by default."},
            "protocol": {"type": "string", "enum": ["udp", "tcp"], "default": "udp",
                "description": "The transport. Default udp."},
            "rd": {"type": "boolean", "default": true, "description": "Recursion desired. Default true."},
            "do": {"type": "boolean", "default": false, "description": "DNSSEC OK, in the EDNS0 OPT record (needs edns_size > 0). Default false."},
            "cd": {"type": "boolean", "default": false, "description": "Checking disabled. Default false."},
            "edns_size": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 1232,
                "description": "The UDP payload size advertised in an EDNS0 OPT record; 0 sends no OPT record (then answers over UDP are at most 512 bytes). Values 1 to 511 are refused. Default 1232."},
            "nsid": {"type": "boolean", "default": false, "description": "Ask for the server's NSID (RFC 5001; needs edns_size > 0). Default false."},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 5000,
                "description": "How long each attempt waits for its answer. Default 5000."},
            "retries": {"type": "integer", "minimum": 0, "maximum": 10, "default": 0,
                "description": "Further attempts (each with a new id and socket) after one that got no answer or was refused. Default 0."},
            "use_tcp_on_truncation": {"type": "boolean", "default": true,
                "description": "Ask again over TCP when the UDP answer is truncated (TC). Default true."}
        },
        "required": ["name"],
        "additionalProperties": false
    })
}

pub fn dns_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"name": "example.test"}),
            json!({"name": "example.test", "type": "aaaa", "server": "127.0.0.1:5353"}),
            json!({"name": "127.0.0.1", "type": "PTR", "server": "[::1]:53", "protocol": "tcp"}),
            json!({"name": ".", "type": "SOA", "class": "IN", "rd": false, "do": true, "cd": true,
                   "edns_size": 4096, "nsid": true, "timeout_ms": 2000, "retries": 2,
                   "use_tcp_on_truncation": false}),
            json!({"name": "version.bind", "type": "TXT", "class": "CH", "edns_size": 0}),
            json!({"name": "_443._tcp.example.test", "type": "TYPE65280"}),
        ],
        invalid: vec![
            (json!({}), "/name"),
            (json!({"name": ""}), "/name"),
            (json!({"name": "a.test", "type": "BOGUS"}), "/type"),
            (json!({"name": "a.test", "type": "A-1"}), "/type"),
            (json!({"name": "a.test", "class": "XX"}), "/class"),
            (json!({"name": "a.test", "protocol": "quic"}), "/protocol"),
            (json!({"name": "a.test", "edns_size": 70000}), "/edns_size"),
            (json!({"name": "a.test", "edns_size": 100}), "/edns_size"),
            (json!({"name": "a.test", "edns_size": 0, "do": true}), "/do"),
            (
                json!({"name": "a.test", "edns_size": 0, "nsid": true}),
                "/nsid",
            ),
            (json!({"name": "a.test", "timeout_ms": 5}), "/timeout_ms"),
            (json!({"name": "a.test", "retries": 11}), "/retries"),
            (json!({"name": "a..test"}), "/name"),
            (
                json!({"name": "a.test", "server": "not a server"}),
                "/server",
            ),
            (json!({"name": "a.test", "port": 53}), "/port"),
        ],
    }
}

fn refuse(field: &str, rule: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        field: field.into(),
        rule,
        message: message.into(),
    }
}

/// Rules the schema cannot express.
/// Where a dns run sends: the `server` it names (the agent's own system name servers
/// are its own infrastructure, not a target); one query, plus retries.
pub fn dns_demand(params: &Value) -> Demand {
    let targets = match str_param(params, "server").map(parse_server) {
        Some(Ok(ServerSpec::Addr(sa))) => vec![Target::new("/server", sa.ip().to_string())],
        Some(Ok(ServerSpec::Name(host, _))) => vec![Target::new("/server", host)],
        // Not a server the schema accepts: the raw text, which resolves nowhere.
        Some(Err(_)) => vec![Target::new(
            "/server",
            str_param(params, "server").unwrap_or_default(),
        )],
        None => vec![],
    };
    Demand {
        targets,
        count: None,
        probes: 1 + u64_param(params, "retries", 0),
        rate: None,
        redirects: false,
    }
}

pub fn dns_check(params: &Value) -> Result<(), ParamError> {
    let p = crate::params::parse::<DnsParams>(params)?;
    if type_code(&p.qtype).is_none() {
        return Err(refuse(
            "/type",
            "enum",
            format!(
                "{:?} is not a record type this module knows, nor TYPEnnn (0 to 65535)",
                p.qtype
            ),
        ));
    }
    if class_code(&p.class).is_none() {
        return Err(refuse("/class", "enum", "one of IN, CH, HS, ANY"));
    }
    if (1..512).contains(&p.edns_size) {
        return Err(refuse(
            "/edns_size",
            "minimum",
            "0 (no EDNS) or at least 512 (RFC 6891)",
        ));
    }
    if p.edns_size == 0 && p.dnssec_ok {
        return Err(refuse(
            "/do",
            "dependentRequired",
            "the DO bit needs EDNS: set edns_size > 0",
        ));
    }
    if p.edns_size == 0 && p.nsid {
        return Err(refuse(
            "/nsid",
            "dependentRequired",
            "NSID needs EDNS: set edns_size > 0",
        ));
    }
    let ptr = type_code(&p.qtype) == Some(12);
    if let Err(e) = query_name(&p.name, ptr) {
        return Err(refuse("/name", "format", e));
    }
    if let Some(s) = &p.server {
        if let Err(e) = parse_server(s) {
            return Err(refuse("/server", "format", e));
        }
    }
    Ok(())
}

/// A `server` parameter: an address and port, or a host name and port to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSpec {
    Addr(std::net::SocketAddr),
    Name(String, u16),
}

/// Parses `ADDR`, `ADDR:PORT`, `[V6]:PORT`, `[V6]`, `NAME` or `NAME:PORT`; port 53 by default.
pub fn parse_server(s: &str) -> Result<ServerSpec, String> {
    use std::net::{IpAddr, SocketAddr};
    let s = s.trim();
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(ServerSpec::Addr(SocketAddr::new(ip, 53)));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(ServerSpec::Addr(sa));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))?,
        ),
        None => (s, 53),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(format!(
            "{s:?} is not an address, ADDR:PORT, [IPv6]:PORT or a host name"
        ));
    }
    Ok(ServerSpec::Name(host.to_string(), port))
}

/// The wire-format name for the `name` parameter: presentation format with `\.` and
/// `\DDD` escapes; with `ptr`, an IP address becomes its reverse name.
pub fn query_name(name: &str, ptr: bool) -> Result<Vec<u8>, String> {
    if ptr {
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return query_name(&reverse_name(ip), false);
        }
    }
    let mut wire = Vec::with_capacity(name.len() + 2);
    if name == "." {
        wire.push(0);
        return Ok(wire);
    }
    let mut label: Vec<u8> = Vec::new();
    let mut bytes = name.bytes().peekable();
    let mut ended_with_dot = false;
    let push_label = |label: &mut Vec<u8>, wire: &mut Vec<u8>| -> Result<(), String> {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err("a label is at most 63 bytes".into());
        }
        wire.push(label.len() as u8);
        wire.append(label);
        Ok(())
    };
    while let Some(b) = bytes.next() {
        ended_with_dot = false;
        match b {
            b'.' => {
                push_label(&mut label, &mut wire)?;
                ended_with_dot = true;
            }
            b'\\' => {
                let c = bytes.next().ok_or("a backslash ends the name")?;
                if c.is_ascii_digit() {
                    let d2 = bytes.next().filter(u8::is_ascii_digit);
                    let d3 = bytes.next().filter(u8::is_ascii_digit);
                    let (Some(d2), Some(d3)) = (d2, d3) else {
                        return Err("\\DDD needs three decimal digits".into());
                    };
                    let v = u32::from(c - b'0') * 100
                        + u32::from(d2 - b'0') * 10
                        + u32::from(d3 - b'0');
                    label.push(u8::try_from(v).map_err(|_| "\\DDD is at most \\255")?);
                } else {
                    label.push(c);
                }
            }
            _ => label.push(b),
        }
    }
    if !ended_with_dot {
        push_label(&mut label, &mut wire)?;
    }
    wire.push(0);
    if wire.len() > 255 {
        return Err("a name is at most 255 bytes on the wire".into());
    }
    Ok(wire)
}

/// The in-addr.arpa or ip6.arpa name of an address.
pub fn reverse_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        std::net::IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

impl Summary for DnsResult {
    fn summary(&self) -> String {
        let r = self;
        let q = format!("{} {}", r.qname, r.qtype);
        if let Some(e) = &r.error {
            return format!("{q} @{}:{}: {}", r.server, r.port, e.message);
        }
        let Some(reply) = &r.reply else {
            return format!("{q} @{}:{}: no reply", r.server, r.port);
        };
        match &reply.message {
            Some(m) => {
                let answers: Vec<&str> = m.answer.iter().map(|a| a.rdata.as_str()).collect();
                let shown = if answers.is_empty() {
                    "no answer".to_string()
                } else {
                    cap(answers.join(", "), 160)
                };
                format!(
                    "{q} @{}:{} {}: {shown} ({:.3} ms)",
                    r.server, r.port, m.rcode_name, reply.rt_ms
                )
            }
            None => format!(
                "{q} @{}:{}: undecodable reply of {} bytes ({:.3} ms)",
                r.server, r.port, reply.size, reply.rt_ms
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_types_and_servers() {
        assert_eq!(type_code("aaaa"), Some(28));
        assert_eq!(type_code("TYPE65280"), Some(65280));
        assert_eq!(type_code("TYPE70000"), None);
        assert_eq!(type_name(257), "CAA");
        assert_eq!(type_name(999), "TYPE999");
        assert_eq!(class_code("ch"), Some(3));
        assert_eq!(
            query_name("a.B.", false).unwrap(),
            vec![1, b'a', 1, b'B', 0]
        );
        assert_eq!(query_name(".", false).unwrap(), vec![0]);
        assert_eq!(
            query_name("a\\.b\\046\\255", false).unwrap(),
            vec![5, b'a', b'.', b'b', b'.', 255, 0]
        );
        assert!(query_name("a..b", false).is_err());
        assert!(query_name(&"x".repeat(64), false).is_err());
        assert!(query_name("\\25", false).is_err());
        assert_eq!(
            reverse_name("192.0.2.1".parse().unwrap()),
            "1.2.0.192.in-addr.arpa."
        );
        assert_eq!(
            reverse_name("2001:db8::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
        );
        assert!(query_name("192.0.2.1", true)
            .unwrap()
            .ends_with(b"\x07in-addr\x04arpa\x00"));
        assert_eq!(
            parse_server("[::1]:5353").unwrap(),
            ServerSpec::Addr("[::1]:5353".parse().unwrap())
        );
        assert_eq!(
            parse_server("::1").unwrap(),
            ServerSpec::Addr("[::1]:53".parse().unwrap())
        );
        assert_eq!(
            parse_server("ns.test:54").unwrap(),
            ServerSpec::Name("ns.test".into(), 54)
        );
        assert!(parse_server("a b").is_err());
        assert!(parse_server("ns:99999").is_err());
    }

    #[test]
    fn defaults() {
        let p: DnsParams = serde_json::from_value(json!({"name": "a.test"})).unwrap();
        assert_eq!(
            (
                p.qtype.as_str(),
                p.class.as_str(),
                p.protocol,
                p.rd,
                p.dnssec_ok,
                p.cd
            ),
            ("A", "IN", DnsProtocol::Udp, true, false, false)
        );
        assert_eq!(
            (
                p.edns_size,
                p.nsid,
                p.timeout_ms,
                p.retries,
                p.use_tcp_on_truncation
            ),
            (1232, false, 5000, 0, true)
        );
        for (bad, field) in dns_examples().invalid {
            // The schema catches some; the rest must be caught here, naming the field.
            if let Err(e) = dns_check(&bad) {
                if !e.field.is_empty() {
                    assert_eq!(e.field, field, "{bad}");
                }
            }
        }
        for ok in dns_examples().valid {
            dns_check(&ok).unwrap();
        }
    }
}
