//! `tcping`: TCP connect time to host:port, with the kernel's RTT and availability.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ms, parse, rate_of, str_param, u64_param, Examples, Summary};
use crate::catalog::{ModuleSpec, DRAFT};
use crate::params::ParamError;
use crate::policy::{Demand, Target};
use crate::results::stats;

pub const SPEC: ModuleSpec = ModuleSpec {
    name: "tcping",
    version: "1.0.0",
    description: "TCP connect time to host:port, with the kernel's RTT and availability.",
    default_timeout_ms: 300_000,
    schema_hash: "48f403a59347da92",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema,
    #[cfg(feature = "catalog")]
    examples,
    demand,
    #[cfg(feature = "catalog")]
    check,
    #[cfg(feature = "atlas")]
    atlas: None,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpingParams {
    pub host: String,
    pub port: u16,
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default = "default_interval")]
    pub timeout_ms: u64,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
}

fn default_count() -> u32 {
    4
}
fn default_interval() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpOutcome {
    /// Connected: the port is open.
    Open,
    /// RST: the host is there, the port is closed.
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// ICMP unreachable, or no route.
    Unreachable,
    /// Anything else (the text is in `error`).
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcpAttempt {
    pub outcome: TcpOutcome,
    /// Connect time from a monotonic clock read before `connect`, in ms.
    pub connect_ms: Option<f64>,
    /// The kernel's smoothed RTT of the connection (`tcpi_rtt`), in µs.
    pub tcpi_rtt_us: Option<u32>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcpingResult {
    pub host: String,
    pub addr: String,
    pub port: u16,
    pub attempts: Vec<TcpAttempt>,
    pub sent: u32,
    /// Attempts that connected.
    pub open: u32,
    pub min_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub median_ms: Option<f64>,
    pub mdev_ms: Option<f64>,
    pub loss_pct: f64,
    /// Share of attempts that connected, 0..=100.
    pub availability_pct: f64,
}

impl TcpingResult {
    /// Fills the counts and statistics from `attempts`.
    pub fn summarise(&mut self) {
        let times: Vec<f64> = self
            .attempts
            .iter()
            .filter(|a| a.outcome == TcpOutcome::Open)
            .filter_map(|a| a.connect_ms)
            .collect();
        self.sent = self.attempts.len() as u32;
        self.open = self
            .attempts
            .iter()
            .filter(|a| a.outcome == TcpOutcome::Open)
            .count() as u32;
        self.availability_pct = if self.sent == 0 {
            0.0
        } else {
            100.0 * f64::from(self.open) / f64::from(self.sent)
        };
        self.loss_pct = 100.0 - self.availability_pct;
        let s = stats(&times);
        self.min_ms = s.map(|s| s.0);
        self.avg_ms = s.map(|s| s.1);
        self.max_ms = s.map(|s| s.2);
        self.median_ms = s.map(|s| s.3);
        self.mdev_ms = s.map(|s| s.4);
    }
}

impl Summary for TcpingResult {
    fn summary(&self) -> String {
        let r = self;
        let target = if r.addr.is_empty() { &r.host } else { &r.addr };
        let line = format!("{target}:{} {}/{} open", r.port, r.open, r.sent);
        if r.open > 0 {
            return format!("{line}, avg {} ms", ms(r.avg_ms));
        }
        // Nothing open: say how the last attempt ended.
        match r.attempts.last() {
            Some(a) => {
                let how = serde_json::to_value(a.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                match &a.error {
                    Some(e) => format!("{line} ({how}: {e})"),
                    None => format!("{line} ({how})"),
                }
            }
            None => line,
        }
    }
}

fn schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "tcping parameters",
        "type": "object",
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": 253},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 1000},
            "interval_ms": {"type": "integer", "minimum": 0, "maximum": 60000, "default": 1000}
        },
        "required": ["host", "port"],
        "additionalProperties": false
    })
}

fn examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1", "port": 22, "count": 2})],
        invalid: vec![
            (json!({"host": "127.0.0.1"}), "/port"),
            (json!({"host": "127.0.0.1", "port": 70000}), "/port"),
        ],
    }
}

/// Where a tcping run connects: `host`; `count` connects, one per interval.
fn demand(params: &Value) -> Demand {
    let count = u64_param(params, "count", 4);
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: Some(count),
        probes: count,
        rate: Some(rate_of(1, u64_param(params, "interval_ms", 1000))),
        redirects: false,
    }
}

fn check(params: &Value) -> Result<(), ParamError> {
    parse::<TcpingParams>(params).map(|_| ())
}
