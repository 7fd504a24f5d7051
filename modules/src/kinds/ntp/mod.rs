//! The `ntp` module: client exchanges with an NTP server (RFC 5905, client mode), as
//! RIPE Atlas's NTP measurement makes them.

#[cfg(feature = "atlas")]
pub mod atlas;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{rate_of, str_param, u64_param, Examples};
use crate::catalog::ModuleSpec;
use crate::params::ParamError;
use crate::policy::{Demand, Target};
use crate::summary::{ms, Summary};

/// The `ntp` module's entry in the catalog.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: "ntp",
    version: "1.0.0",
    description:
        "NTP client exchanges with a server: offset, delay, stratum, reference id and leap status.",
    default_timeout_ms: 60_000,
    schema_hash: "9feddb29cb123668",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: ntp_schema,
    #[cfg(feature = "catalog")]
    examples: ntp_examples,
    demand: ntp_demand,
    #[cfg(feature = "catalog")]
    check: ntp_check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::ntp),
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtpParams {
    /// Server name or address.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Client packets to send, one after another.
    #[serde(default = "default_packets")]
    pub packets: u32,
    /// Time between two packets.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// How long a packet waits for its reply.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// NTP version in the client packets.
    #[serde(default = "default_version")]
    pub version: u8,
}

fn default_port() -> u16 {
    123
}
fn default_packets() -> u32 {
    3
}
fn default_interval() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    4000
}
fn default_version() -> u8 {
    4
}

/// What the server said, and what the agent measured, for every packet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NtpResult {
    pub host: String,
    pub addr: String,
    pub port: u16,
    /// The local address the packets left from.
    pub src_addr: Option<String>,
    pub version: u8,
    pub packets: Vec<NtpPacket>,
    pub sent: u32,
    pub received: u32,
    /// Offset of the server's clock from ours (positive: the server is ahead), from the
    /// reply with the lowest delay, as NTP's clock filter picks it.
    pub offset_ms: Option<f64>,
    /// That reply's round-trip delay, less the server's processing time.
    pub delay_ms: Option<f64>,
    pub min_delay_ms: Option<f64>,
    pub max_delay_ms: Option<f64>,
    pub median_offset_ms: Option<f64>,
    /// The server's header fields, from its last valid reply.
    pub server: Option<NtpServerInfo>,
    /// Where T4 came from: `kernel` (the socket's receive timestamp) or `clock` (the
    /// agent's monotonic clock after the reply was read).
    pub rx_timestamps: String,
}

/// The header of a server reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NtpServerInfo {
    /// Leap indicator: `no`, `61` (last minute of the day has 61 s), `59`, or
    /// `unknown` (the server's clock is not synchronised).
    pub leap: String,
    pub stratum: u8,
    pub mode: String,
    pub version: u8,
    /// Log2 of the poll interval in seconds, as sent.
    pub poll: i8,
    /// The server clock's precision in seconds (2^precision).
    pub precision_s: f64,
    pub root_delay_ms: f64,
    pub root_dispersion_ms: f64,
    /// Reference id: the clock's four ASCII letters at stratum 1 (`GPS`, `PPS`), the
    /// upstream server's IPv4 address at stratum 2 and above, or a kiss code at 0.
    pub ref_id: String,
    /// When the server's clock was last set, NTP seconds since 1900.
    pub ref_ts: f64,
}

/// One client packet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NtpPacket {
    /// T1: when the request left, our clock, NTP seconds since 1900.
    pub origin_ts: f64,
    /// T2: when the server received it, its clock.
    pub receive_ts: Option<f64>,
    /// T3: when the server sent the reply, its clock.
    pub transmit_ts: Option<f64>,
    /// T4: when the reply arrived, our clock.
    pub final_ts: Option<f64>,
    /// ((T2 - T1) + (T3 - T4)) / 2.
    pub offset_ms: Option<f64>,
    /// (T4 - T1) - (T3 - T2).
    pub delay_ms: Option<f64>,
    /// `timeout`, a kiss-o'-death code (`kiss RATE`), or why the reply was refused.
    pub error: Option<String>,
}

impl NtpResult {
    /// Fills the summary fields from the packets.
    pub fn summarise(&mut self) {
        let good: Vec<&NtpPacket> = self
            .packets
            .iter()
            .filter(|p| p.error.is_none() && p.offset_ms.is_some() && p.delay_ms.is_some())
            .collect();
        self.sent = self.packets.len() as u32;
        self.received = good.len() as u32;
        let best = good.iter().min_by(|a, b| {
            a.delay_ms
                .unwrap_or(f64::MAX)
                .total_cmp(&b.delay_ms.unwrap_or(f64::MAX))
        });
        self.offset_ms = best.and_then(|p| p.offset_ms);
        self.delay_ms = best.and_then(|p| p.delay_ms);
        let mut delays: Vec<f64> = good.iter().filter_map(|p| p.delay_ms).collect();
        delays.sort_by(f64::total_cmp);
        self.min_delay_ms = delays.first().copied();
        self.max_delay_ms = delays.last().copied();
        let mut offsets: Vec<f64> = good.iter().filter_map(|p| p.offset_ms).collect();
        offsets.sort_by(f64::total_cmp);
        self.median_offset_ms = match offsets.len() {
            0 => None,
            n if n % 2 == 1 => Some(offsets[n / 2]),
            n => Some((offsets[n / 2 - 1] + offsets[n / 2]) / 2.0),
        };
    }
}

pub fn ntp_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "ntp parameters",
        "description": "NTP client exchanges (RFC 5905 client mode) with one server.",
        "type": "object",
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": 253,
                "description": "Server name or IPv4/IPv6 address; the agent resolves names itself."},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 123},
            "packets": {"type": "integer", "minimum": 1, "maximum": 16, "default": 3,
                "description": "Client packets to send, one after another."},
            "interval_ms": {"type": "integer", "minimum": 0, "maximum": 60000, "default": 1000,
                "description": "Time between two packets."},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 4000,
                "description": "How long each packet waits for its reply."},
            "version": {"type": "integer", "minimum": 3, "maximum": 4, "default": 4,
                "description": "NTP version of the client packets."}
        },
        "required": ["host"],
        "additionalProperties": false
    })
}

/// Where an ntp run sends: `host`; `packets` probes, one every `interval_ms`.
pub fn ntp_demand(params: &Value) -> Demand {
    let packets = u64_param(params, "packets", u64::from(default_packets()));
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: None,
        probes: packets,
        rate: Some(rate_of(
            1,
            u64_param(params, "interval_ms", default_interval()),
        )),
        redirects: false,
    }
}

pub fn ntp_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"host": "::1", "port": 12300, "packets": 5, "interval_ms": 0, "timeout_ms": 500, "version": 3}),
        ],
        invalid: vec![
            (json!({"port": 123}), "/host"),
            (json!({"host": "127.0.0.1", "packets": 0}), "/packets"),
            (json!({"host": "127.0.0.1", "version": 5}), "/version"),
            (json!({"host": "127.0.0.1", "port": 0}), "/port"),
            (json!({"host": "127.0.0.1", "offset": 1}), "/offset"),
        ],
    }
}

/// Rules the schema cannot express.
pub fn ntp_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<NtpParams>(params).map(|_| ())
}

impl Summary for NtpResult {
    fn summary(&self) -> String {
        let r = self;
        format!(
            "{}:{} {}/{} replies, offset {} ms, delay {} ms",
            r.addr,
            r.port,
            r.received,
            r.sent,
            ms(r.offset_ms),
            ms(r.delay_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips_through_postcard_and_json() {
        let mut r = NtpResult {
            host: "ntp.test".into(),
            addr: "127.0.0.1".into(),
            port: 123,
            src_addr: Some("127.0.0.1".into()),
            version: 4,
            packets: vec![
                NtpPacket {
                    origin_ts: 3_970_000_000.25,
                    receive_ts: Some(3_970_000_001.75),
                    transmit_ts: Some(3_970_000_001.750_1),
                    final_ts: Some(3_970_000_000.250_3),
                    offset_ms: Some(1500.0),
                    delay_ms: Some(0.2),
                    error: None,
                },
                NtpPacket {
                    origin_ts: 3_970_000_001.25,
                    receive_ts: None,
                    transmit_ts: None,
                    final_ts: None,
                    offset_ms: None,
                    delay_ms: None,
                    error: Some("timeout".into()),
                },
            ],
            sent: 0,
            received: 0,
            offset_ms: None,
            delay_ms: None,
            min_delay_ms: None,
            max_delay_ms: None,
            median_offset_ms: None,
            server: Some(NtpServerInfo {
                leap: "no".into(),
                stratum: 2,
                mode: "server".into(),
                version: 4,
                poll: 3,
                precision_s: 2f64.powi(-20),
                root_delay_ms: 1.5,
                root_dispersion_ms: 0.25,
                ref_id: "192.0.2.1".into(),
                ref_ts: 3_970_000_000.0,
            }),
            rx_timestamps: "kernel".into(),
        };
        r.summarise();
        assert_eq!((r.sent, r.received), (2, 1));
        assert_eq!(r.offset_ms, Some(1500.0));
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<NtpResult>(&bytes).unwrap(), r);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<NtpResult>(&json).unwrap(), r);
    }
}
