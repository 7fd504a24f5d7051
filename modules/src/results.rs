//! The typed result of every module: compact on the device link, JSON at the API.

use serde::{Deserialize, Serialize};

use crate::kinds;

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
    Tcping(TcpingResult),
    Faulty(FaultyResult),
    Heartbeat(SystemSnapshot),
    // New variants go last: postcard numbers variants by position. Boxed, so a small
    // result does not take the space of the largest (postcard encodes a box as its value).
    Traceroute(Box<kinds::traceroute::TracerouteResult>),
    Mtr(Box<kinds::traceroute::MtrResult>),
    Dns(Box<kinds::dns::DnsResult>),
    Http(Box<kinds::http::HttpResult>),
    TlsCert(Box<kinds::http::TlsCertResult>),
    Ntp(Box<kinds::ntp::NtpResult>),
}

impl ModuleOutput {
    /// The result as the API shows it: the module's own fields, no enum wrapper.
    /// The output as the API shows it, ready to serialize without building a JSON tree.
    pub fn as_serialize(&self) -> OutputJson<'_> {
        OutputJson(self)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            ModuleOutput::Echo(r) => serde_json::to_value(r),
            ModuleOutput::Ping(r) => serde_json::to_value(r),
            ModuleOutput::Tcping(r) => serde_json::to_value(r),
            ModuleOutput::Faulty(r) => serde_json::to_value(r),
            ModuleOutput::Heartbeat(r) => serde_json::to_value(r),
            ModuleOutput::Traceroute(r) => serde_json::to_value(r),
            ModuleOutput::Mtr(r) => serde_json::to_value(r),
            ModuleOutput::Dns(r) => serde_json::to_value(r),
            ModuleOutput::Http(r) => serde_json::to_value(r),
            ModuleOutput::TlsCert(r) => serde_json::to_value(r),
            ModuleOutput::Ntp(r) => serde_json::to_value(r),
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

/// [`ModuleOutput`] serialized as its inner result (the API's `result` field).
pub struct OutputJson<'a>(&'a ModuleOutput);

impl Serialize for OutputJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ModuleOutput::Echo(r) => r.serialize(s),
            ModuleOutput::Ping(r) => r.serialize(s),
            ModuleOutput::Tcping(r) => r.serialize(s),
            ModuleOutput::Faulty(r) => r.serialize(s),
            ModuleOutput::Heartbeat(r) => r.serialize(s),
            ModuleOutput::Traceroute(r) => r.serialize(s),
            ModuleOutput::Mtr(r) => r.serialize(s),
            ModuleOutput::Dns(r) => r.serialize(s),
            ModuleOutput::Http(r) => r.serialize(s),
            ModuleOutput::TlsCert(r) => r.serialize(s),
            ModuleOutput::Ntp(r) => r.serialize(s),
        }
    }
}

/// The machine's health: sent in every heartbeat, and by the `heartbeat` module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemSnapshot {
    pub uptime_s: u64,
    /// Whole-machine CPU use since the previous sample, 0..=100.
    pub cpu_pct: f32,
    /// The same per core.
    pub cpu_per_core_pct: Vec<f32>,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub swap_total_kib: u64,
    pub swap_free_kib: u64,
    pub load: [f32; 3],
    /// The filesystem holding the agent's data directory.
    pub disk_total_kib: u64,
    pub disk_free_kib: u64,
    pub interfaces: Vec<InterfaceStats>,
}

/// Counters of one network interface since boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
}

/// How one TCP connect attempt ended.
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultyResult {
    pub message: String,
    /// Seconds the module slept before answering.
    pub delayed_s: f64,
}

/// min, avg, max, median and mean deviation of a set of samples.
pub fn stats(samples: &[f64]) -> Option<(f64, f64, f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    let mdev = v.iter().map(|r| (r - avg).abs()).sum::<f64>() / n;
    Some((v[0], avg, v[v.len() - 1], median, mdev))
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
