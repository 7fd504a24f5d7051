//! The typed result of every module: compact on the device link, JSON at the API.

use serde::{Deserialize, Serialize};

/// How a module run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModuleOutcome {
    Ok(ModuleOutput),
    /// The module returned an error or panicked; the text says which and why.
    Failed(String),
    /// The module passed its deadline and was cancelled.
    Timeout,
}

/// One variant per module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModuleOutput {
    Echo(EchoResult),
    Ping(PingOutput),
}

impl ModuleOutput {
    /// The result as the API shows it: the module's own fields, no enum wrapper.
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            ModuleOutput::Echo(r) => serde_json::to_value(r),
            ModuleOutput::Ping(r) => serde_json::to_value(r),
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoResult {
    pub message: String,
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
}
