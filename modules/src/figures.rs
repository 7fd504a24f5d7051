//! What a result measured, as numbers: one [`Figures`] per target a result covers.
//! Status checks, rollups and the anomaly detector all read results through this, so
//! "loss" or "RTT" means the same thing to each of them, module by module:
//!
//! | module | sent/received | RTT samples | other figures |
//! |---|---|---|---|
//! | ping_module | echo requests and replies | each reply's RTT | |
//! | tcping | connects tried and opened | each connect time | |
//! | traceroute | the destination's probes | the destination's replies | reached, path |
//! | mtr | the destination hop's probes | its replies | reached, path |
//! | dns | one query, answered or not | the response time | rcode, response time |
//! | http | one request, answered or not | the total time | status, total time, certificate expiry |
//! | tls_cert | one handshake | the handshake time | certificate expiry |
//! | ntp | packets sent and answered | each packet's delay | offset |
//!
//! echo_module, faulty_module and heartbeat measure nothing a threshold applies to: a check on them
//! counts only runs that failed and agents that did not report.
//!
//! Results come from agents: every figure is taken as given but bounded here (sample
//! counts, path length, text lengths), and non-finite numbers are dropped.

use serde::Serialize;

use crate::results::ModuleOutput;

/// The most RTT samples kept from one result (a ping of 10,000 probes keeps an even
/// spread of them).
pub const MAX_SAMPLES: usize = 1_000;
/// The most hops of a path, and addresses per hop, kept from one result.
pub const MAX_HOPS: usize = 64;
pub const MAX_ADDRS_PER_HOP: usize = 8;
/// The most targets of one result that get figures (a ping of many targets).
pub const MAX_TARGETS: usize = 256;
/// The longest target or address text kept.
const MAX_TEXT: usize = 256;

/// What one result measured toward one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// The target as the result names it (host, `host:port`, URL).
    pub target: String,
    /// Probes sent and answered; both 0 when the module sends no probes of its own.
    pub sent: u32,
    pub received: u32,
    /// Round-trip samples in ms (see the module table above).
    pub rtts_ms: Vec<f64>,
    pub http_status: Option<u16>,
    pub http_total_ms: Option<f64>,
    pub dns_rcode: Option<String>,
    pub dns_time_ms: Option<f64>,
    /// When the server's certificate expires (ms since the epoch).
    pub cert_not_after_ms: Option<i64>,
    pub ntp_offset_ms: Option<f64>,
    /// Whether a path measurement reached its destination.
    pub reached: Option<bool>,
    /// For traceroute and mtr: per TTL from the first, the addresses that answered
    /// (sorted, deduplicated; empty where nothing answered).
    pub path: Option<Vec<Vec<String>>>,
}

impl Figures {
    fn new(target: &str) -> Figures {
        Figures {
            target: bounded(target),
            ..Figures::default()
        }
    }

    /// Loss in percent, when probes were sent.
    pub fn loss_pct(&self) -> Option<f64> {
        (self.sent > 0).then(|| {
            let lost = self.sent.saturating_sub(self.received.min(self.sent));
            lost as f64 * 100.0 / self.sent as f64
        })
    }

    fn push_rtt(&mut self, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite() && *v >= 0.0) {
            if self.rtts_ms.len() < MAX_SAMPLES {
                self.rtts_ms.push(v);
            }
        }
    }
}

/// Which figures a module's results carry: what a threshold can apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Provides {
    pub loss: bool,
    pub rtt: bool,
    pub http: bool,
    pub dns: bool,
    pub cert: bool,
    pub ntp: bool,
    pub path: bool,
}

/// What the results of `module` carry (nothing for an unknown module).
pub fn provides(module: &str) -> Provides {
    use crate::kinds::{dns, http, ntp, ping, tcping, traceroute};
    let p = Provides {
        loss: true,
        rtt: true,
        ..Provides::default()
    };
    if module == ping::SPEC.name || module == tcping::SPEC.name {
        p
    } else if module == traceroute::TRACEROUTE.name || module == traceroute::MTR.name {
        Provides { path: true, ..p }
    } else if module == dns::SPEC.name {
        Provides { dns: true, ..p }
    } else if module == http::HTTP.name {
        Provides {
            http: true,
            cert: true,
            ..p
        }
    } else if module == http::TLS_CERT.name {
        Provides { cert: true, ..p }
    } else if module == ntp::SPEC.name {
        Provides { ntp: true, ..p }
    } else {
        Provides::default()
    }
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Up to [`MAX_SAMPLES`] of `all`, evenly spread.
fn spread(all: impl ExactSizeIterator<Item = Option<f64>>, f: &mut Figures) {
    let n = all.len();
    let step = n.div_ceil(MAX_SAMPLES).max(1);
    for (i, v) in all.enumerate() {
        if i % step == 0 {
            f.push_rtt(v);
        }
    }
}

fn path_of<'a>(hops: impl Iterator<Item = (u8, Vec<&'a str>)>) -> Vec<Vec<String>> {
    let mut path: Vec<Vec<String>> = Vec::new();
    for (_, addrs) in hops.take(MAX_HOPS) {
        let mut v: Vec<String> = addrs.into_iter().map(bounded).collect();
        v.sort();
        v.dedup();
        v.truncate(MAX_ADDRS_PER_HOP);
        path.push(v);
    }
    path
}

impl ModuleOutput {
    /// The result's figures, one per target (at most [`MAX_TARGETS`]).
    pub fn figures(&self) -> Vec<Figures> {
        match self {
            // A WebAssembly module's numbers are its own: no threshold knows them.
            ModuleOutput::Echo(_)
            | ModuleOutput::Faulty(_)
            | ModuleOutput::Heartbeat(_)
            | ModuleOutput::Wasm(_) => Vec::new(),
            ModuleOutput::Ping(p) => p
                .targets
                .iter()
                .take(MAX_TARGETS)
                .map(|t| {
                    let mut f = Figures::new(&t.host);
                    f.sent = t.sent;
                    f.received = t.received;
                    spread(t.rtts_ms.iter().copied(), &mut f);
                    f
                })
                .collect(),
            ModuleOutput::Tcping(t) => {
                let mut f = Figures::new(&format!("{}:{}", t.host, t.port));
                f.sent = t.sent;
                f.received = t.open;
                spread(t.attempts.iter().map(|a| a.connect_ms), &mut f);
                vec![f]
            }
            ModuleOutput::Traceroute(t) => {
                let mut f = Figures::new(&t.host);
                f.reached = Some(t.destination_reached);
                let dst = t.dst_addr.as_str();
                if let Some(last) = t.hops.last() {
                    // The destination's probes: what the last hop sent, when it is the
                    // destination that answered.
                    let from_dst = last.probes.iter().flatten().any(|r| r.from == dst);
                    if from_dst || t.destination_reached {
                        f.sent = u32::try_from(last.probes.len()).unwrap_or(u32::MAX);
                        for r in last.probes.iter().flatten() {
                            if r.from == dst {
                                f.received = f.received.saturating_add(1);
                                f.push_rtt(Some(r.rtt_ms));
                            }
                        }
                    }
                }
                f.path = Some(path_of(t.hops.iter().map(|h| {
                    (
                        h.ttl,
                        h.probes.iter().flatten().map(|r| r.from.as_str()).collect(),
                    )
                })));
                vec![f]
            }
            ModuleOutput::Mtr(m) => {
                let mut f = Figures::new(&m.host);
                f.reached = Some(m.destination_reached);
                if let Some(last) = m
                    .hops
                    .last()
                    .filter(|h| h.addrs.iter().any(|a| a.addr == m.dst_addr))
                {
                    f.sent = last.sent;
                    f.received = last.received;
                    spread(last.rtts_ms.iter().copied(), &mut f);
                }
                f.path =
                    Some(path_of(m.hops.iter().map(|h| {
                        (h.ttl, h.addrs.iter().map(|a| a.addr.as_str()).collect())
                    })));
                vec![f]
            }
            ModuleOutput::Dns(d) => {
                let mut f = Figures::new(&format!("{} {}@{}", d.qname, d.qtype, d.server));
                f.sent = 1;
                if let Some(reply) = &d.reply {
                    f.received = 1;
                    f.push_rtt(Some(reply.rt_ms));
                    f.dns_time_ms = f.rtts_ms.first().copied();
                    f.dns_rcode = reply.message.as_ref().map(|m| bounded(&m.rcode_name));
                }
                vec![f]
            }
            ModuleOutput::Http(h) => {
                let mut f = Figures::new(&h.url);
                f.sent = 1;
                if let Some(resp) = &h.response {
                    f.received = 1;
                    f.http_status = Some(resp.status);
                    f.push_rtt(Some(h.timing.total_ms));
                    f.http_total_ms = f.rtts_ms.first().copied();
                }
                f.cert_not_after_ms = h
                    .tls
                    .as_ref()
                    .and_then(|t| t.chain.first())
                    .map(|c| c.not_after_unix.saturating_mul(1000));
                vec![f]
            }
            ModuleOutput::TlsCert(t) => {
                let mut f = Figures::new(&format!("{}:{}", t.host, t.port));
                f.sent = 1;
                if let Some(leaf) = t.tls.chain.first() {
                    f.received = 1;
                    f.push_rtt(t.handshake_ms);
                    f.cert_not_after_ms = Some(leaf.not_after_unix.saturating_mul(1000));
                }
                vec![f]
            }
            ModuleOutput::Ntp(n) => {
                let mut f = Figures::new(&n.host);
                f.sent = n.sent;
                f.received = n.received;
                spread(n.packets.iter().map(|p| p.delay_ms), &mut f);
                f.ntp_offset_ms = n.offset_ms.or(n.median_offset_ms).filter(|v| v.is_finite());
                vec![f]
            }
        }
    }
}

/// The `p`th percentile (0 to 100) of `v`, by the nearest-rank method; `v` need not
/// be sorted. None when `v` is empty.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    let p = p.clamp(0.0, 100.0);
    // p·n/100 rather than (p/100)·n: exact for whole p and n (0.07·100 is 7.000…01,
    // whose ceiling is 8).
    let rank = (p * s.len() as f64 / 100.0).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// The median of `v` (the mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    crate::results::stats(v).map(|(_, _, _, median, _)| median)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::PingResult;

    #[test]
    fn ping_figures_are_per_target_with_loss_and_samples() {
        let mut a = PingResult::new("a", "127.0.0.1", 56);
        a.sent = 4;
        a.received = 3;
        a.rtts_ms = vec![Some(1.0), None, Some(3.0), Some(f64::NAN)];
        let out = ModuleOutput::Ping(crate::results::PingOutput {
            socket: "raw".into(),
            src_addr: None,
            targets: vec![a],
        });
        let f = out.figures();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].target, "a");
        assert_eq!(f[0].loss_pct(), Some(25.0));
        // The lost probe and the NaN are not samples.
        assert_eq!(f[0].rtts_ms, vec![1.0, 3.0]);
    }

    #[test]
    fn samples_are_bounded_and_spread() {
        let mut a = PingResult::new("a", "127.0.0.1", 56);
        a.rtts_ms = (0..10_000).map(|i| Some(i as f64)).collect();
        let out = ModuleOutput::Ping(crate::results::PingOutput {
            socket: "raw".into(),
            src_addr: None,
            targets: vec![a; 1000],
        });
        let f = out.figures();
        assert_eq!(f.len(), MAX_TARGETS);
        assert!(f[0].rtts_ms.len() <= MAX_SAMPLES);
        // Spread over the whole run, not its first thousand.
        assert!(*f[0].rtts_ms.last().unwrap() > 9_000.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 95.0), Some(5.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        // Nearest rank over 1..=100 is p itself, for every whole p.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        for p in 1..=100 {
            assert_eq!(
                percentile(&hundred, f64::from(p)),
                Some(f64::from(p)),
                "p{p}"
            );
        }
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
    }

    #[test]
    fn loss_of_nothing_sent_is_none_and_never_negative() {
        let f = Figures {
            sent: 2,
            received: 5,
            ..Figures::default()
        };
        assert_eq!(f.loss_pct(), Some(0.0));
        assert_eq!(Figures::default().loss_pct(), None);
    }
}
