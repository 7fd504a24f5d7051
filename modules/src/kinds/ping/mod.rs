//! `ping_module`: ICMP echo to one host or many, probed concurrently by one engine:
//! per-probe RTTs, loss and jitter. Atlas format: `ping` (see `atlas`).

#[cfg(feature = "atlas")]
pub mod atlas;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ms, parse, rate_of, str_param, u64_param, Examples, Summary};
use crate::catalog::{ModuleSpec, DRAFT};
use crate::params::ParamError;
use crate::policy::{Demand, Target};

pub const SPEC: ModuleSpec = ModuleSpec {
    name: "ping_module",
    version: "0.1.0",
    description: "ICMP echo to one host or many: per-probe RTTs, loss and jitter.",
    default_timeout_ms: 300_000,
    schema_hash: "73724701bf80f3c6",
    takes_rate: true,
    #[cfg(feature = "catalog")]
    schema,
    #[cfg(feature = "catalog")]
    examples,
    demand,
    #[cfg(feature = "catalog")]
    check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::ping),
};

/// Most targets one ping request may name.
pub const PING_MAX_TARGETS: usize = 65_536;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingParams {
    /// One host (name or address). Either this or `targets`.
    pub host: Option<String>,
    /// Many hosts, probed concurrently by one engine.
    pub targets: Option<Vec<String>>,
    /// Probes per target.
    #[serde(default = "default_count")]
    pub count: u32,
    /// Time between two probes to the same target.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// How long a probe waits for its reply.
    #[serde(default = "default_interval")]
    pub timeout_ms: u64,
    /// ICMP payload bytes.
    #[serde(default = "default_size")]
    pub size: u32,
    /// TTL / hop limit of the probes.
    pub ttl: Option<u8>,
    /// Probes per second across all targets; unset means one target's interval
    /// spread over all targets, capped at 10,000/s.
    pub rate: Option<f64>,
}

impl PingParams {
    /// The targets in request order: `host`, or `targets`.
    pub fn target_list(&self) -> Vec<String> {
        match (&self.host, &self.targets) {
            (Some(h), _) => vec![h.clone()],
            (None, Some(t)) => t.clone(),
            (None, None) => Vec::new(),
        }
    }
}

fn default_count() -> u32 {
    4
}
fn default_interval() -> u64 {
    1000
}
fn default_size() -> u32 {
    56
}

/// What one ping run produced: a result per target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingOutput {
    /// `raw` (CAP_NET_RAW) or `dgram` (unprivileged ICMP socket).
    pub socket: String,
    /// Source address the probes left from, where known (Atlas `src_addr`).
    pub src_addr: Option<String>,
    pub targets: Vec<PingResult>,
}

/// Ping statistics for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    /// The host as the request named it.
    pub host: String,
    /// The address the agent resolved and probed ("" if resolution failed).
    pub addr: String,
    /// ICMP payload bytes per probe.
    pub size: u32,
    /// TTL (hop limit) of the first reply, as received.
    pub reply_ttl: Option<u8>,
    pub sent: u32,
    pub received: u32,
    /// Replies that arrived for a probe that already had one.
    pub duplicates: u32,
    /// Per probe, in order: the round-trip time in ms, or `None` for a timeout.
    pub rtts_ms: Vec<Option<f64>>,
    pub min_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub median_ms: Option<f64>,
    /// Mean deviation of the RTTs (jitter), as ping(8) reports it.
    pub mdev_ms: Option<f64>,
    pub loss_pct: f64,
    /// Why this target could not be probed at all (for example, resolution failed).
    pub error: Option<String>,
}

impl PingResult {
    /// An empty result for `host`, to be filled by the engine.
    pub fn new(host: &str, addr: &str, size: u32) -> PingResult {
        PingResult {
            host: host.to_string(),
            addr: addr.to_string(),
            size,
            reply_ttl: None,
            sent: 0,
            received: 0,
            duplicates: 0,
            rtts_ms: Vec::new(),
            min_ms: None,
            avg_ms: None,
            max_ms: None,
            median_ms: None,
            mdev_ms: None,
            loss_pct: 0.0,
            error: None,
        }
    }

    /// Fills `sent`, `received`, loss and the summary statistics from `rtts_ms`.
    pub fn summarise(&mut self) {
        let mut got: Vec<f64> = self.rtts_ms.iter().flatten().copied().collect();
        self.sent = self.rtts_ms.len() as u32;
        self.received = got.len() as u32;
        self.loss_pct = if self.sent == 0 {
            0.0
        } else {
            100.0 * f64::from(self.sent - self.received) / f64::from(self.sent)
        };
        if got.is_empty() {
            (
                self.min_ms,
                self.avg_ms,
                self.max_ms,
                self.median_ms,
                self.mdev_ms,
            ) = (None, None, None, None, None);
            return;
        }
        got.sort_by(f64::total_cmp);
        let n = got.len() as f64;
        let avg = got.iter().sum::<f64>() / n;
        self.min_ms = got.first().copied();
        self.max_ms = got.last().copied();
        self.avg_ms = Some(avg);
        let mid = got.len() / 2;
        self.median_ms = Some(if got.len() % 2 == 0 {
            (got[mid - 1] + got[mid]) / 2.0
        } else {
            got[mid]
        });
        self.mdev_ms = Some(got.iter().map(|r| (r - avg).abs()).sum::<f64>() / n);
    }
}

/// Targets a ping summary names; the rest are counted.
const SUMMARY_TARGETS: usize = 8;

impl Summary for PingOutput {
    fn summary(&self) -> String {
        let line = self
            .targets
            .iter()
            .take(SUMMARY_TARGETS)
            .map(|t| match &t.error {
                Some(e) if t.addr.is_empty() => format!("{}: {e}", t.host),
                Some(e) => format!("{} {e}", t.addr),
                None => format!(
                    "{} {}/{} received, loss {}%, min/avg/max {}/{}/{} ms",
                    t.addr,
                    t.received,
                    t.sent,
                    t.loss_pct,
                    ms(t.min_ms),
                    ms(t.avg_ms),
                    ms(t.max_ms)
                ),
            })
            .collect::<Vec<_>>()
            .join("; ");
        match self.targets.len().saturating_sub(SUMMARY_TARGETS) {
            0 => line,
            more => format!("{line}; and {more} more targets"),
        }
    }
}

fn schema() -> Value {
    let host = json!({
        "type": "string", "minLength": 1, "maxLength": 253,
        "description": "Host name or IPv4/IPv6 address; the agent resolves names itself."
    });
    json!({
        "$schema": DRAFT,
        "title": "ping_module parameters",
        "description": "Exactly one of host and targets is required.",
        "type": "object",
        "properties": {
            "host": host,
            "targets": {
                "type": "array", "items": host, "minItems": 1, "maxItems": 65536,
                "description": "Many hosts, probed concurrently by one engine."
            },
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "interval_ms": {"type": "integer", "minimum": 1, "maximum": 60000, "default": 1000,
                "description": "Time between two probes to the same target."},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 1000},
            "size": {"type": "integer", "minimum": 0, "maximum": 65000, "default": 56},
            "ttl": {"type": "integer", "minimum": 1, "maximum": 255},
            "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000,
                "description": "Probes per second across all targets."}
        },
        "additionalProperties": false
    })
}

fn examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"targets": ["127.0.0.1", "::1"], "count": 3, "interval_ms": 10, "rate": 500}),
        ],
        invalid: vec![
            (json!({"host": "127.0.0.1", "count": 0}), "/count"),
            (json!({"host": ""}), "/host"),
            (json!({"host": "127.0.0.1", "size": 70000}), "/size"),
        ],
    }
}

/// Where a ping run sends: `host`, or each of `targets`; `count` probes each, at `rate`
/// or one target's interval spread over all targets.
fn demand(params: &Value) -> Demand {
    let mut targets = Vec::new();
    if let Some(h) = str_param(params, "host") {
        targets.push(Target::new("/host", h));
    }
    if let Some(list) = params.get("targets").and_then(Value::as_array) {
        for (i, t) in list.iter().enumerate() {
            if let Some(h) = t.as_str() {
                targets.push(Target::new(format!("/targets/{i}"), h));
            }
        }
    }
    let count = u64_param(params, "count", 4);
    let n = targets.len() as u64;
    let rate = params
        .get("rate")
        .and_then(Value::as_f64)
        .or_else(|| (n > 0).then(|| rate_of(n, u64_param(params, "interval_ms", 1000))));
    Demand {
        targets,
        count: Some(count),
        probes: count.saturating_mul(n),
        rate,
        redirects: false,
    }
}

/// Exactly one of `host` and `targets` (a schema could say it, less clearly).
fn check(params: &Value) -> Result<(), ParamError> {
    let p: PingParams = parse(params)?;
    if p.host.is_some() == p.targets.is_some() {
        return Err(ParamError {
            field: "/host".into(),
            rule: "required",
            message: "give exactly one of host and targets".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary() {
        let mut r = PingResult::new("h", "127.0.0.1", 56);
        r.rtts_ms = vec![Some(1.0), None, Some(3.0), Some(2.0)];
        r.summarise();
        assert_eq!(r.median_ms, Some(2.0));
        assert_eq!((r.sent, r.received), (4, 3));
        assert_eq!(r.loss_pct, 25.0);
        assert_eq!(
            (r.min_ms, r.avg_ms, r.max_ms),
            (Some(1.0), Some(2.0), Some(3.0))
        );
        assert!((r.mdev_ms.unwrap() - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn ping_defaults() {
        let p: PingParams = parse(&json!({"host": "127.0.0.1", "count": 2})).unwrap();
        assert_eq!((p.count, p.interval_ms, p.size), (2, 1000, 56));
        assert_eq!(p.target_list(), vec!["127.0.0.1"]);
        let both = json!({"host": "a", "targets": ["b"], "count": 1});
        assert_eq!(check(&both).unwrap_err().field, "/host");
    }
}
