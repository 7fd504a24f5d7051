//! The `traceroute` and `mtr` modules: parameters, results and schemas.
//!
//! Both run Paris traceroute (the flow identifiers that load balancers hash stay
//! constant for a whole trace) over ICMP echo, UDP or TCP SYN. `mtr` repeats the trace
//! `count` times and summarises each hop.

#[cfg(feature = "atlas")]
pub mod atlas;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{rate_of, str_param, u64_param, Examples};
use crate::catalog::ModuleSpec;
use crate::params::ParamError;
use crate::policy::{Demand, Target};
use crate::summary::{ms, Summary};

/// The `traceroute` module's entry in the catalog.
pub const TRACEROUTE: ModuleSpec = ModuleSpec {
    name: "traceroute",
    version: "1.0.0",
    description: "Paris traceroute over ICMP, UDP or TCP: every hop's addresses, RTTs, ICMP type and MPLS labels.",
    default_timeout_ms: 300_000,
    schema_hash: "82f0630577d4a34b",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: traceroute_schema,
    #[cfg(feature = "catalog")]
    examples: traceroute_examples,
    demand: traceroute_demand,
    #[cfg(feature = "catalog")]
    check: traceroute_check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::traceroute),
};

/// The `mtr` module's entry in the catalog.
pub const MTR: ModuleSpec = ModuleSpec {
    name: "mtr",
    version: "1.0.0",
    description:
        "Repeated Paris traceroutes: per-hop loss, RTT statistics and jitter, as mtr shows.",
    default_timeout_ms: 600_000,
    schema_hash: "99c65a6844b0cd08",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: mtr_schema,
    #[cfg(feature = "catalog")]
    examples: mtr_examples,
    demand: mtr_demand,
    #[cfg(feature = "catalog")]
    check: mtr_check,
    #[cfg(feature = "atlas")]
    atlas: None,
};

/// Highest TTL a probe may carry.
pub const MAX_TTL: u8 = 255;
/// Most probes per hop.
pub const MAX_PROBES: u8 = 16;
/// Largest probe payload, in bytes.
pub const MAX_SIZE: u16 = 2048;
/// Highest Paris flow id.
pub const MAX_PARIS_ID: u16 = 1023;
/// Most mtr rounds.
pub const MAX_ROUNDS: u32 = 100;
/// Default UDP destination port (traceroute's classic base port).
pub const DEFAULT_UDP_PORT: u16 = 33434;
/// Default TCP destination port.
pub const DEFAULT_TCP_PORT: u16 = 80;

/// The kind of probe a trace sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceProtocol {
    /// ICMP echo requests; the destination answers with echo replies.
    #[default]
    Icmp,
    /// UDP datagrams to a (normally closed) port; the destination answers with ICMP
    /// port unreachable.
    Udp,
    /// TCP SYNs; the destination answers with SYN-ACK (port open) or RST (closed).
    Tcp,
}

impl TraceProtocol {
    /// The name Atlas uses (`ICMP`, `UDP`, `TCP`).
    pub fn upper(self) -> &'static str {
        match self {
            TraceProtocol::Icmp => "ICMP",
            TraceProtocol::Udp => "UDP",
            TraceProtocol::Tcp => "TCP",
        }
    }
}

fn d_first_ttl() -> u8 {
    1
}
fn d_max_ttl() -> u8 {
    30
}
fn d_probes() -> u8 {
    3
}
fn d_mtr_probes() -> u8 {
    1
}
fn d_timeout_ms() -> u64 {
    1000
}
fn d_max_gaps() -> u8 {
    5
}
fn d_count() -> u32 {
    10
}
fn d_interval_ms() -> u64 {
    1000
}

/// Parameters of `traceroute`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerouteParams {
    /// Host name or address literal of the destination.
    pub host: String,
    /// Kind of probe (default ICMP echo).
    #[serde(default)]
    pub protocol: TraceProtocol,
    /// Destination port for UDP (default 33434) and TCP (default 80), the same for
    /// every probe; not allowed with ICMP.
    #[serde(default)]
    pub port: Option<u16>,
    /// TTL of the first hop probed (default 1).
    #[serde(default = "d_first_ttl")]
    pub first_ttl: u8,
    /// TTL of the last hop probed (default 30).
    #[serde(default = "d_max_ttl")]
    pub max_ttl: u8,
    /// Probes per hop (default 3).
    #[serde(default = "d_probes")]
    pub probes: u8,
    /// How long to wait for the answer to a probe (default 1000 ms).
    #[serde(default = "d_timeout_ms")]
    pub timeout_ms: u64,
    /// Payload bytes after the ICMP/UDP/TCP header (default 48 for ICMP and UDP, as
    /// Atlas, 0 for TCP). At least 2 for ICMP and UDP: two bytes keep the checksum
    /// where Paris traceroute wants it.
    #[serde(default)]
    pub size: Option<u16>,
    /// Paris flow id (default 0): picks the source port (UDP, TCP) or the ICMP
    /// checksum; a trace keeps one flow, another id tries another flow.
    #[serde(default)]
    pub paris_id: u16,
    /// Stop after this many consecutive hops without any answer (default 5).
    #[serde(default = "d_max_gaps")]
    pub max_gaps: u8,
}

/// An MPLS label stack entry quoted in an ICMP extension (RFC 4950).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MplsLabel {
    /// Label (20 bits).
    pub label: u32,
    /// Traffic class, once "experimental" (3 bits).
    pub exp: u8,
    /// Bottom of stack.
    pub s: bool,
    /// TTL of the label.
    pub ttl: u8,
}

/// The ICMP extension structure of a reply (RFC 4884, version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IcmpExtension {
    /// The reply set RFC 4884's length field; false: the extension was found at the
    /// fixed offset 128 that pre-RFC 4884 routers use.
    pub rfc4884: bool,
    /// MPLS label stack entries (objects of class 1, c-type 1), in order.
    pub mpls: Vec<MplsLabel>,
}

/// The answer to one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceReply {
    /// Address that answered.
    pub from: String,
    /// Round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// TTL of the reply as received.
    pub ttl: u8,
    /// Bytes of the reply after its IP header (ICMP message or TCP segment).
    pub size: u32,
    /// ICMP type and code of the reply; None for a TCP reply.
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// TCP flags of a TCP reply, as Atlas writes them (`SA`, `R`, `RA`...).
    pub tcp_flags: Option<String>,
    /// Atlas error code: `N` network, `H` host, `P` protocol, `p` port unreachable,
    /// `A` administratively prohibited, or the number of another unreachable code or
    /// of another ICMP type; None for time exceeded, echo replies, TCP replies and
    /// the destination's port unreachable.
    pub err: Option<String>,
    /// TTL of our probe as quoted in an ICMP error (1 when the hop is where it
    /// expired).
    pub quoted_ttl: Option<u8>,
    /// ICMP extensions (MPLS labels), when present.
    pub icmp_ext: Option<IcmpExtension>,
}

/// One hop: the TTL and what came back for each probe (None: no answer, `*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceHop {
    pub ttl: u8,
    pub probes: Vec<Option<TraceReply>>,
}

/// Result of `traceroute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracerouteResult {
    /// The host as asked.
    pub host: String,
    /// The address traced.
    pub dst_addr: String,
    /// Our source address towards it.
    pub src_addr: String,
    /// Address family: 4 or 6.
    pub af: u8,
    pub protocol: TraceProtocol,
    /// Destination port (0 for ICMP).
    pub port: u16,
    /// Source port of every probe (0 for ICMP).
    pub src_port: u16,
    /// ICMP checksum of every probe (0 for UDP and TCP).
    pub icmp_checksum: u16,
    pub paris_id: u16,
    /// Payload bytes of each probe.
    pub size: u16,
    pub first_ttl: u8,
    pub max_ttl: u8,
    /// Probes sent per hop.
    pub probes_per_hop: u8,
    pub timeout_ms: u64,
    /// The destination itself answered.
    pub destination_reached: bool,
    /// Why the trace ended: `destination`, `unreachable` (a router said so),
    /// `gaps` (max_gaps silent hops in a row) or `max_ttl`.
    pub stop_reason: String,
    /// Hops in TTL order.
    pub hops: Vec<TraceHop>,
    /// Wall-clock start (Unix ms) and duration of the trace.
    pub started_ms: u64,
    pub duration_ms: f64,
}

fn probe_properties(probes_default: u8) -> Value {
    json!({
        "host": {"type": "string", "minLength": 1, "maxLength": 253,
                 "description": "Host name or IP address literal of the destination."},
        "protocol": {"enum": ["icmp", "udp", "tcp"], "default": "icmp",
                     "description": "Probe kind: ICMP echo, UDP to a closed port, or TCP SYN."},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                 "description": "Destination port, constant for the whole trace: UDP default 33434, TCP default 80. Not allowed with ICMP."},
        "first_ttl": {"type": "integer", "minimum": 1, "maximum": MAX_TTL, "default": 1,
                      "description": "TTL of the first hop probed; at most max_ttl."},
        "max_ttl": {"type": "integer", "minimum": 1, "maximum": MAX_TTL, "default": 30,
                    "description": "TTL of the last hop probed."},
        "probes": {"type": "integer", "minimum": 1, "maximum": MAX_PROBES, "default": probes_default,
                   "description": "Probes per hop."},
        "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 60000, "default": 1000,
                       "description": "How long to wait for the answer to a probe, in milliseconds."},
        "size": {"type": "integer", "minimum": 0, "maximum": MAX_SIZE,
                 "description": "Payload bytes after the ICMP/UDP/TCP header: default 48 for ICMP and UDP (at least 2, which carry the Paris checksum), 0 for TCP."},
        "paris_id": {"type": "integer", "minimum": 0, "maximum": MAX_PARIS_ID, "default": 0,
                     "description": "Paris flow id: picks the source port (UDP, TCP) or ICMP checksum, constant for the trace."},
        "max_gaps": {"type": "integer", "minimum": 1, "maximum": MAX_TTL, "default": 5,
                     "description": "Stop after this many consecutive hops without any answer."}
    })
}

pub fn traceroute_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "traceroute parameters",
        "description": "Paris traceroute over ICMP, UDP or TCP (needs raw sockets: root or CAP_NET_RAW), IPv4 and IPv6.",
        "type": "object",
        "properties": probe_properties(3),
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn traceroute_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"host": "localhost", "protocol": "udp", "port": 33434, "probes": 1}),
            json!({"host": "127.0.0.1", "protocol": "tcp", "port": 443, "first_ttl": 2,
                   "max_ttl": 20, "timeout_ms": 500, "size": 0, "paris_id": 7, "max_gaps": 3}),
        ],
        invalid: vec![
            (json!({}), "/host"),
            (
                json!({"host": "127.0.0.1", "protocol": "sctp"}),
                "/protocol",
            ),
            (json!({"host": "127.0.0.1", "max_ttl": 256}), "/max_ttl"),
            (json!({"host": "127.0.0.1", "probes": 17}), "/probes"),
            (json!({"host": "127.0.0.1", "timeout_ms": 0}), "/timeout_ms"),
            (json!({"host": "127.0.0.1", "paris_id": 5000}), "/paris_id"),
            (
                json!({"host": "127.0.0.1", "first_ttl": 9, "max_ttl": 5}),
                "/first_ttl",
            ),
            (json!({"host": "127.0.0.1", "port": 80}), "/port"),
            (
                json!({"host": "127.0.0.1", "protocol": "udp", "size": 1}),
                "/size",
            ),
            (json!({"host": "127.0.0.1", "hops": 3}), "/hops"),
        ],
    }
}

/// The rules shared by `traceroute` and `mtr` that the schema cannot express.
fn check_trace(
    protocol: TraceProtocol,
    port: Option<u16>,
    first_ttl: u8,
    max_ttl: u8,
    size: Option<u16>,
) -> Result<(), ParamError> {
    if first_ttl > max_ttl {
        return Err(ParamError {
            field: "/first_ttl".into(),
            rule: "maximum",
            message: format!("first_ttl {first_ttl} is above max_ttl {max_ttl}"),
        });
    }
    if protocol == TraceProtocol::Icmp && port.is_some() {
        return Err(ParamError {
            field: "/port".into(),
            rule: "port",
            message: "ICMP probes have no port; give port only with udp or tcp".into(),
        });
    }
    if protocol != TraceProtocol::Tcp && matches!(size, Some(s) if s < 2) {
        return Err(ParamError {
            field: "/size".into(),
            rule: "minimum",
            message:
                "ICMP and UDP probes need at least 2 payload bytes (they carry the Paris checksum)"
                    .into(),
        });
    }
    Ok(())
}

/// Rules the schema cannot express.
/// Where a traceroute sends: `host` (every probe is addressed to it; routers on the
/// way answer). Probes per hop for every TTL probed; a hop's probes go out together,
/// one hop per timeout at most.
pub fn traceroute_demand(params: &Value) -> Demand {
    let probes = u64_param(params, "probes", u64::from(d_probes()));
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: None,
        probes: hops(params).saturating_mul(probes),
        rate: Some(rate_of(
            probes,
            u64_param(params, "timeout_ms", d_timeout_ms()),
        )),
        redirects: false,
    }
}

/// TTLs a trace probes at most.
fn hops(params: &Value) -> u64 {
    let first = u64_param(params, "first_ttl", u64::from(d_first_ttl()));
    let max = u64_param(params, "max_ttl", u64::from(d_max_ttl()));
    max.saturating_sub(first).saturating_add(1)
}

pub fn traceroute_check(params: &Value) -> Result<(), ParamError> {
    let p = crate::params::parse::<TracerouteParams>(params)?;
    check_trace(p.protocol, p.port, p.first_ttl, p.max_ttl, p.size)
}

impl TracerouteParams {
    /// The parameter rules, for a run that did not come through the backend.
    pub fn validate(&self) -> Result<(), String> {
        check_trace(
            self.protocol,
            self.port,
            self.first_ttl,
            self.max_ttl,
            self.size,
        )
        .map_err(|e| format!("{}: {}", e.field, e.message))?;
        let bad = |f: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{f} must be {lo}..={hi}, got {v}"))
            }
        };
        bad("first_ttl", self.first_ttl.into(), 1, MAX_TTL.into())?;
        bad("max_ttl", self.max_ttl.into(), 1, MAX_TTL.into())?;
        bad("probes", self.probes.into(), 1, MAX_PROBES.into())?;
        bad("timeout_ms", self.timeout_ms, 1, 60_000)?;
        bad("paris_id", self.paris_id.into(), 0, MAX_PARIS_ID.into())?;
        bad("max_gaps", self.max_gaps.into(), 1, MAX_TTL.into())?;
        if let Some(s) = self.size {
            bad("size", s.into(), 0, MAX_SIZE.into())?;
        }
        if self.host.trim().is_empty() {
            return Err("host is empty".into());
        }
        Ok(())
    }
}

/// Parameters of `mtr`: those of `traceroute`, plus rounds and their interval.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtrParams {
    pub host: String,
    #[serde(default)]
    pub protocol: TraceProtocol,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "d_first_ttl")]
    pub first_ttl: u8,
    #[serde(default = "d_max_ttl")]
    pub max_ttl: u8,
    /// Probes per hop per round (default 1, as mtr).
    #[serde(default = "d_mtr_probes")]
    pub probes: u8,
    #[serde(default = "d_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub size: Option<u16>,
    #[serde(default)]
    pub paris_id: u16,
    #[serde(default = "d_max_gaps")]
    pub max_gaps: u8,
    /// Rounds (traces) to run (default 10).
    #[serde(default = "d_count")]
    pub count: u32,
    /// Time from the start of one round to the start of the next (default 1000 ms).
    #[serde(default = "d_interval_ms")]
    pub interval_ms: u64,
}

impl MtrParams {
    /// The parameters of one round.
    pub fn trace(&self) -> TracerouteParams {
        TracerouteParams {
            host: self.host.clone(),
            protocol: self.protocol,
            port: self.port,
            first_ttl: self.first_ttl,
            max_ttl: self.max_ttl,
            probes: self.probes,
            timeout_ms: self.timeout_ms,
            size: self.size,
            paris_id: self.paris_id,
            max_gaps: self.max_gaps,
        }
    }
}

/// An address seen at a hop, with how many probes it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtrAddr {
    pub addr: String,
    pub count: u32,
}

/// One hop's summary over all rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtrHop {
    pub ttl: u8,
    /// Addresses that answered, most frequent first.
    pub addrs: Vec<MtrAddr>,
    pub sent: u32,
    pub received: u32,
    /// Percentage of probes without an answer.
    pub loss_pct: f64,
    /// RTTs in milliseconds: the last answer's, the lowest, mean, highest, and their
    /// (population) standard deviation; None when nothing answered.
    pub last_ms: Option<f64>,
    pub best_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    pub worst_ms: Option<f64>,
    pub stdev_ms: Option<f64>,
    /// Jitter: mean and largest absolute difference of consecutive RTTs; None with
    /// fewer than two answers.
    pub jitter_ms: Option<f64>,
    pub jitter_max_ms: Option<f64>,
    /// Atlas error codes seen at this hop (see `TraceReply::err`), once each.
    pub errors: Vec<String>,
    /// Every probe's RTT in sending order; None: no answer.
    pub rtts_ms: Vec<Option<f64>>,
}

/// Result of `mtr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtrResult {
    pub host: String,
    pub dst_addr: String,
    pub src_addr: String,
    pub af: u8,
    pub protocol: TraceProtocol,
    pub port: u16,
    pub paris_id: u16,
    pub size: u16,
    /// Rounds run.
    pub rounds: u32,
    pub probes_per_hop: u8,
    /// The destination answered in at least one round.
    pub destination_reached: bool,
    /// Hops in TTL order, up to the first where the destination answered.
    pub hops: Vec<MtrHop>,
    pub started_ms: u64,
    pub duration_ms: f64,
}

pub fn mtr_schema() -> Value {
    let mut props = probe_properties(1);
    if let Some(o) = props.as_object_mut() {
        o.insert(
            "count".into(),
            json!({"type": "integer", "minimum": 1, "maximum": MAX_ROUNDS, "default": 10,
                   "description": "Rounds: how many times the whole path is traced."}),
        );
        o.insert(
            "interval_ms".into(),
            json!({"type": "integer", "minimum": 0, "maximum": 60000, "default": 1000,
                   "description": "Time from the start of one round to the start of the next, in milliseconds."}),
        );
    }
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "mtr parameters",
        "description": "Repeated Paris traceroutes (needs raw sockets: root or CAP_NET_RAW), IPv4 and IPv6.",
        "type": "object",
        "properties": props,
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn mtr_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"host": "127.0.0.1", "count": 3, "interval_ms": 0, "protocol": "udp"}),
            json!({"host": "localhost", "protocol": "tcp", "port": 22, "count": 100, "probes": 2}),
        ],
        invalid: vec![
            (json!({}), "/host"),
            (json!({"host": "127.0.0.1", "count": 0}), "/count"),
            (json!({"host": "127.0.0.1", "count": 101}), "/count"),
            (
                json!({"host": "127.0.0.1", "interval_ms": -1}),
                "/interval_ms",
            ),
            (
                json!({"host": "127.0.0.1", "first_ttl": 3, "max_ttl": 2}),
                "/first_ttl",
            ),
            (json!({"host": "127.0.0.1", "port": 53}), "/port"),
        ],
    }
}

/// Rules the schema cannot express.
/// Where an mtr sends: `host`; `count` rounds of a trace, one round per interval.
pub fn mtr_demand(params: &Value) -> Demand {
    let per_round =
        hops(params).saturating_mul(u64_param(params, "probes", u64::from(d_mtr_probes())));
    let count = u64_param(params, "count", u64::from(d_count()));
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: Some(count),
        probes: per_round.saturating_mul(count),
        rate: Some(rate_of(
            per_round,
            u64_param(params, "interval_ms", d_interval_ms()),
        )),
        redirects: false,
    }
}

pub fn mtr_check(params: &Value) -> Result<(), ParamError> {
    let p = crate::params::parse::<MtrParams>(params)?;
    check_trace(p.protocol, p.port, p.first_ttl, p.max_ttl, p.size)
}

impl Summary for TracerouteResult {
    fn summary(&self) -> String {
        let r = self;
        let reached = if r.destination_reached {
            "reached"
        } else {
            "not reached"
        };
        let last = r
            .hops
            .iter()
            .rev()
            .find_map(|h| h.probes.iter().flatten().next().map(|p| (h.ttl, p)));
        match last {
            Some((ttl, p)) => format!(
                "{} {reached} ({}), last reply at hop {ttl} from {} in {:.3} ms",
                r.dst_addr, r.stop_reason, p.from, p.rtt_ms
            ),
            None => format!(
                "{} {reached} ({}), no reply in {} hops",
                r.dst_addr,
                r.stop_reason,
                r.hops.len()
            ),
        }
    }
}

impl Summary for MtrResult {
    fn summary(&self) -> String {
        let r = self;
        let reached = if r.destination_reached {
            "reached"
        } else {
            "not reached"
        };
        match r.hops.last() {
            Some(h) => format!(
                "{} {reached} in {} hops, last hop loss {}%, avg {} ms ({} rounds)",
                r.dst_addr,
                r.hops.len(),
                h.loss_pct,
                ms(h.avg_ms),
                r.rounds
            ),
            None => format!("{} {reached}: no hops ({} rounds)", r.dst_addr, r.rounds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> TracerouteResult {
        let reply = TraceReply {
            from: "198.19.240.2".into(),
            rtt_ms: 0.123,
            ttl: 64,
            size: 76,
            icmp_type: Some(11),
            icmp_code: Some(0),
            tcp_flags: None,
            err: None,
            quoted_ttl: Some(1),
            icmp_ext: Some(IcmpExtension {
                rfc4884: true,
                mpls: vec![MplsLabel {
                    label: 16_005,
                    exp: 0,
                    s: true,
                    ttl: 1,
                }],
            }),
        };
        TracerouteResult {
            host: "h".into(),
            dst_addr: "198.19.240.50".into(),
            src_addr: "198.19.240.1".into(),
            af: 4,
            protocol: TraceProtocol::Udp,
            port: 33434,
            src_port: 40000,
            icmp_checksum: 0,
            paris_id: 0,
            size: 48,
            first_ttl: 1,
            max_ttl: 30,
            probes_per_hop: 2,
            timeout_ms: 1000,
            destination_reached: false,
            stop_reason: "gaps".into(),
            hops: vec![TraceHop {
                ttl: 1,
                probes: vec![Some(reply), None],
            }],
            started_ms: 1_700_000_000_000,
            duration_ms: 12.5,
        }
    }

    #[test]
    fn results_round_trip_through_postcard_and_json() {
        let r = example();
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<TracerouteResult>(&bytes).unwrap(), r);
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<TracerouteResult>(&j).unwrap(), r);
        assert!(j.contains("\"protocol\":\"udp\""));
        let m = MtrResult {
            host: "h".into(),
            dst_addr: "198.19.240.50".into(),
            src_addr: "198.19.240.1".into(),
            af: 4,
            protocol: TraceProtocol::Icmp,
            port: 0,
            paris_id: 3,
            size: 48,
            rounds: 2,
            probes_per_hop: 1,
            destination_reached: true,
            hops: vec![MtrHop {
                ttl: 1,
                addrs: vec![MtrAddr {
                    addr: "198.19.240.2".into(),
                    count: 1,
                }],
                sent: 2,
                received: 1,
                loss_pct: 50.0,
                last_ms: Some(0.2),
                best_ms: Some(0.2),
                avg_ms: Some(0.2),
                worst_ms: Some(0.2),
                stdev_ms: Some(0.0),
                jitter_ms: None,
                jitter_max_ms: None,
                errors: vec![],
                rtts_ms: vec![Some(0.2), None],
            }],
            started_ms: 1,
            duration_ms: 2.0,
        };
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<MtrResult>(&bytes).unwrap(), m);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<MtrResult>(&j).unwrap(), m);
    }

    #[test]
    fn checks_name_the_field() {
        let e = traceroute_check(&json!({"host": "x", "first_ttl": 4, "max_ttl": 3}));
        assert_eq!(e.unwrap_err().field, "/first_ttl");
        let e = mtr_check(&json!({"host": "x", "protocol": "icmp", "port": 3}));
        assert_eq!(e.unwrap_err().field, "/port");
        assert!(traceroute_check(&json!({"host": "x", "protocol": "tcp", "size": 0})).is_ok());
        let p: TracerouteParams = serde_json::from_value(json!({"host": "x"})).unwrap();
        assert_eq!((p.first_ttl, p.max_ttl, p.probes), (1, 30, 3));
        assert!(p.validate().is_ok());
        let m: MtrParams = serde_json::from_value(json!({"host": "x"})).unwrap();
        assert_eq!((m.count, m.probes), (10, 1));
    }
}
