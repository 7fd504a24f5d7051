//! Hourly rollups: per (agent, module, target, hour), what the hour's results came
//! to, kept after the raw results are deleted (and for longer).
//!
//! A rollup is a sum that merges: each stored result is added to its hour's rollup
//! exactly once, as a cursor over the store's positions passes it, and two rollups of
//! the same hour add up. Counts, loss and min/max merge exactly; RTT median and p95
//! come from a log-bucketed histogram ([`Sketch`], as DDSketch does: relative error
//! at most 1 % at any quantile), which merges by adding bucket counts. So a result
//! that arrives a day late still lands in its own hour, with no re-reading of raw
//! results that may be gone.
//!
//! The hour is by the result's time on the agent (`at_ms`): a rollup answers "what
//! was measured then"; a time more than a day from the result's arrival (an agent
//! with no clock, or a lying one) gives way to the arrival's. Everything that grows with input is bounded: histogram
//! buckets by the value range, status counters by [`MAX_STATUS_KEYS`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use imn_proto::figures::Figures;

pub const HOUR_MS: i64 = 3_600_000;

/// Histogram buckets grow by this factor: a value is known to ±1 %.
const GAMMA: f64 = 1.02;
/// Values below this (ms) share bucket [`LOW_BUCKET`].
const MIN_VALUE: f64 = 0.001;
const LOW_BUCKET: i32 = -10_000;
/// Values above this (ms; 100 s) share the top bucket.
const MAX_VALUE: f64 = 100_000.0;
/// The most distinct status keys (HTTP status classes, DNS rcodes) one rollup counts;
/// past it, they count as `other`.
pub const MAX_STATUS_KEYS: usize = 16;

/// A mergeable histogram of positive values (RTTs in ms), by log-spaced buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    /// Bucket index to count.
    #[serde(default)]
    pub buckets: BTreeMap<i32, u64>,
    #[serde(default)]
    pub count: u64,
}

fn bucket_of(v: f64) -> i32 {
    if v.is_nan() || v < MIN_VALUE {
        return LOW_BUCKET;
    }
    let v = v.min(MAX_VALUE);
    (v.ln() / GAMMA.ln()).ceil() as i32
}

/// The value a bucket stands for: the middle of its range, within 1 % of any value in
/// it.
fn value_of(i: i32) -> f64 {
    if i == LOW_BUCKET {
        return 0.0;
    }
    2.0 * GAMMA.powi(i) / (GAMMA + 1.0)
}

impl Sketch {
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let c = self.buckets.entry(bucket_of(v)).or_default();
        *c = c.saturating_add(1);
        self.count = self.count.saturating_add(1);
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (i, c) in &other.buckets {
            let e = self.buckets.entry(*i).or_default();
            *e = e.saturating_add(*c);
        }
        self.count = self.count.saturating_add(other.count);
    }

    /// The `q`th quantile (0 to 1), by rank over the buckets.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = (q * (self.count - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (i, c) in &self.buckets {
            seen = seen.saturating_add(*c);
            if seen > rank {
                return Some(value_of(*i));
            }
        }
        self.buckets.keys().last().map(|i| value_of(*i))
    }
}

/// What an hour of one agent's results toward one target came to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    /// Results, and those whose run failed or timed out.
    pub results: u64,
    pub failed: u64,
    /// Probes sent and answered.
    pub sent: u64,
    pub received: u64,
    pub rtt: Sketch,
    pub rtt_min: Option<f64>,
    pub rtt_max: Option<f64>,
    /// HTTP status classes (`2xx`) or DNS rcodes, counted.
    #[serde(default)]
    pub statuses: BTreeMap<String, u64>,
    /// Path results that reached their destination.
    #[serde(default)]
    pub reached: u64,
    /// NTP offsets: how many, their sum, min and max (ms).
    #[serde(default)]
    pub ntp_offsets: u64,
    #[serde(default)]
    pub ntp_offset_sum: f64,
    #[serde(default)]
    pub ntp_offset_min: Option<f64>,
    #[serde(default)]
    pub ntp_offset_max: Option<f64>,
    /// The earliest certificate expiry seen (ms since the epoch).
    #[serde(default)]
    pub cert_not_after_min: Option<i64>,
}

fn min_opt<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y < x { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y > x { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Rollup {
    /// A run that failed or timed out.
    pub fn add_failure(&mut self) {
        self.results = self.results.saturating_add(1);
        self.failed = self.failed.saturating_add(1);
    }

    /// A succeeded result's figures toward this target.
    pub fn add(&mut self, f: &Figures) {
        self.results = self.results.saturating_add(1);
        self.sent = self.sent.saturating_add(u64::from(f.sent));
        self.received = self
            .received
            .saturating_add(u64::from(f.received.min(f.sent)));
        for v in f.rtts_ms.iter().filter(|v| v.is_finite() && **v >= 0.0) {
            let v = v.min(1e12);
            self.rtt.add(v);
            self.rtt_min = min_opt(self.rtt_min, Some(v));
            self.rtt_max = max_opt(self.rtt_max, Some(v));
        }
        if let Some(s) = f.http_status {
            self.count_status(format!("{}xx", s / 100));
        }
        if let Some(rc) = &f.dns_rcode {
            self.count_status(rc.clone());
        }
        if f.reached == Some(true) {
            self.reached = self.reached.saturating_add(1);
        }
        // Any finite f64 is an agent's word; bounded so that sums stay finite (a
        // non-finite number would not survive JSON).
        if let Some(o) = f
            .ntp_offset_ms
            .filter(|o| o.is_finite())
            .map(|o| o.clamp(-1e12, 1e12))
        {
            self.ntp_offsets = self.ntp_offsets.saturating_add(1);
            self.ntp_offset_sum = (self.ntp_offset_sum + o).clamp(-1e300, 1e300);
            self.ntp_offset_min = min_opt(self.ntp_offset_min, Some(o));
            self.ntp_offset_max = max_opt(self.ntp_offset_max, Some(o));
        }
        self.cert_not_after_min = min_opt(self.cert_not_after_min, f.cert_not_after_ms);
    }

    fn count_status(&mut self, key: String) {
        let one: BTreeMap<String, u64> = [(key, 1)].into();
        self.merge_statuses(&one);
    }

    fn merge_statuses(&mut self, other: &BTreeMap<String, u64>) {
        for (k, c) in other {
            let key = if self.statuses.len() >= MAX_STATUS_KEYS && !self.statuses.contains_key(k) {
                "other".to_string()
            } else {
                k.clone()
            };
            let e = self.statuses.entry(key).or_default();
            *e = e.saturating_add(*c);
        }
    }

    /// Adds another rollup of the same hour.
    pub fn merge(&mut self, o: &Rollup) {
        self.results = self.results.saturating_add(o.results);
        self.failed = self.failed.saturating_add(o.failed);
        self.sent = self.sent.saturating_add(o.sent);
        self.received = self.received.saturating_add(o.received);
        self.rtt.merge(&o.rtt);
        self.rtt_min = min_opt(self.rtt_min, o.rtt_min);
        self.rtt_max = max_opt(self.rtt_max, o.rtt_max);
        self.merge_statuses(&o.statuses);
        self.reached = self.reached.saturating_add(o.reached);
        self.ntp_offsets = self.ntp_offsets.saturating_add(o.ntp_offsets);
        self.ntp_offset_sum = (self.ntp_offset_sum + o.ntp_offset_sum).clamp(-1e300, 1e300);
        self.ntp_offset_min = min_opt(self.ntp_offset_min, o.ntp_offset_min);
        self.ntp_offset_max = max_opt(self.ntp_offset_max, o.ntp_offset_max);
        self.cert_not_after_min = min_opt(self.cert_not_after_min, o.cert_not_after_min);
    }

    /// The rollup as the API shows it: counts, loss and RTT min/median/p95/max, and
    /// the module's own figures where it has them.
    pub fn to_json(&self) -> serde_json::Value {
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let mut v = serde_json::json!({
            "results": self.results,
            "failed": self.failed,
            "sent": self.sent,
            "received": self.received,
            "loss_pct": (self.sent > 0).then(|| r3((self.sent - self.received.min(self.sent)) as f64 * 100.0 / self.sent as f64)),
            "rtt_samples": self.rtt.count,
            "rtt_min_ms": self.rtt_min.map(r3),
            "rtt_median_ms": self.rtt.quantile(0.5).map(r3),
            "rtt_p95_ms": self.rtt.quantile(0.95).map(r3),
            "rtt_max_ms": self.rtt_max.map(r3),
        });
        if !self.statuses.is_empty() {
            v["statuses"] = serde_json::json!(self.statuses);
        }
        if self.reached > 0 {
            v["reached"] = serde_json::json!(self.reached);
        }
        if self.ntp_offsets > 0 {
            v["ntp_offset_mean_ms"] =
                serde_json::json!(r3(self.ntp_offset_sum / self.ntp_offsets as f64));
            v["ntp_offset_min_ms"] = serde_json::json!(self.ntp_offset_min.map(r3));
            v["ntp_offset_max_ms"] = serde_json::json!(self.ntp_offset_max.map(r3));
        }
        if let Some(t) = self.cert_not_after_min {
            v["cert_not_after_ms"] = serde_json::json!(t);
        }
        v
    }
}

/// The start of the hour `at_ms` falls in.
pub fn hour_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(HOUR_MS).saturating_mul(HOUR_MS)
}

/// Merges the stored body `old` with `new` (both a [`Rollup`] as JSON): what a
/// store does when a rollup row already exists. A stored body that does not parse
/// (written by another version) is replaced; a new one that does not parse is
/// dropped, keeping what was stored.
pub fn merge_bodies(old: &str, new: &str) -> String {
    let Ok(mut a) = serde_json::from_str::<Rollup>(old) else {
        return new.to_string();
    };
    match serde_json::from_str::<Rollup>(new) {
        Ok(b) => a.merge(&b),
        Err(e) => {
            tracing::warn!(error = %e, "a rollup that does not read was not merged");
            return old.to_string();
        }
    }
    serde_json::to_string(&a).unwrap_or_else(|_| old.to_string())
}

/// Results read per page by the rollup pass.
const PAGE: u32 = 500;
/// The most rollup rows one page may touch; a page that would touch more is cut
/// there (the rest waits for the next page).
const MAX_KEYS_PER_PAGE: usize = 20_000;

/// Adds the results stored since the cursor to their hours' rollups, a page at a
/// time, at most `max_pages` pages. Returns how many results were added. Another
/// backend's pass that got to the cursor first makes this one stop (nothing is
/// counted twice).
pub async fn roll_up(
    b: &crate::service::Backend,
    max_pages: usize,
) -> Result<usize, crate::store::StoreError> {
    use imn_proto::results::ModuleOutput;
    use imn_proto::wire::RequestState;
    let mut added = 0;
    for _ in 0..max_pages {
        let from = b.store.rollup_cursor().await?;
        let page = b
            .store
            .results_page(crate::store::ResultFilter {
                after: from,
                limit: PAGE,
                ..Default::default()
            })
            .await?;
        let full = page.len() == PAGE as usize;
        let mut to = from;
        let mut acc: BTreeMap<(String, String, String, i64), Rollup> = BTreeMap::new();
        for (pos, row, _) in &page {
            if acc.len() >= MAX_KEYS_PER_PAGE {
                break;
            }
            to = *pos;
            added += 1;
            // The agent's time, unless it is more than a day from when the result
            // arrived (no clock, or a lying one): then the arrival's hour, so no
            // agent can leave rollups in hours retention never reaches.
            let at = if row.at_ms.abs_diff(row.stored_ms) > 86_400_000 {
                row.stored_ms
            } else {
                row.at_ms
            };
            let hour = hour_of(at);
            let key = |target: &str| {
                (
                    row.agent_id.clone(),
                    row.module.clone(),
                    target.to_string(),
                    hour,
                )
            };
            if row.state != RequestState::Succeeded {
                acc.entry(key("")).or_default().add_failure();
                continue;
            }
            let figures = ModuleOutput::from_api_json(&row.module, &row.result)
                .map(|o| o.figures())
                .unwrap_or_default();
            if figures.is_empty() {
                // Nothing measured (echo, or a result of another version): counted.
                let r = acc.entry(key("")).or_default();
                r.results = r.results.saturating_add(1);
                continue;
            }
            let mut seen: Vec<&str> = Vec::new();
            for f in &figures {
                if seen.contains(&f.target.as_str()) {
                    continue;
                }
                seen.push(&f.target);
                acc.entry(key(&f.target)).or_default().add(f);
            }
        }
        if to == from {
            break;
        }
        let rows = acc
            .into_iter()
            .map(
                |((agent_id, module, target, hour_ms), r)| crate::store::RollupRow {
                    agent_id,
                    module,
                    target,
                    hour_ms,
                    body: serde_json::to_string(&r).unwrap_or_default(),
                },
            )
            .collect();
        if !b.store.merge_rollups(from, to, rows).await? {
            break;
        }
        if !full {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut s = Sketch::default();
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 0.37).collect();
        for v in &values {
            s.add(*v);
        }
        for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
            let exact = values[((values.len() - 1) as f64 * q).round() as usize];
            let got = s.quantile(q).unwrap();
            assert!(
                (got - exact).abs() / exact <= 0.0101,
                "q{q}: {got} vs {exact}"
            );
        }
        // Bounded however wide the input: buckets by the value range.
        let mut wide = Sketch::default();
        for i in 0..100_000 {
            wide.add(f64::from(i) * 1e3);
        }
        wide.add(f64::NAN);
        wide.add(-1.0);
        wide.add(1e300);
        assert!(wide.buckets.len() < 1_000, "{}", wide.buckets.len());
        assert_eq!(wide.count, 100_001);
    }

    #[test]
    fn rollups_merge_like_one_rollup_of_everything() {
        let f = |rtts: &[f64], sent: u32| Figures {
            target: "t".into(),
            sent,
            received: rtts.len() as u32,
            rtts_ms: rtts.to_vec(),
            http_status: Some(204),
            ..Default::default()
        };
        let (mut a, mut b, mut all) = (Rollup::default(), Rollup::default(), Rollup::default());
        a.add(&f(&[1.0, 2.0], 3));
        b.add(&f(&[10.0], 2));
        b.add_failure();
        all.add(&f(&[1.0, 2.0], 3));
        all.add(&f(&[10.0], 2));
        all.add_failure();
        let merged = merge_bodies(
            &serde_json::to_string(&a).unwrap(),
            &serde_json::to_string(&b).unwrap(),
        );
        let merged: Rollup = serde_json::from_str(&merged).unwrap();
        assert_eq!(merged, all);
        let j = merged.to_json();
        assert_eq!(j["results"], 3);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["loss_pct"], 40.0);
        assert_eq!(j["rtt_min_ms"], 1.0);
        assert_eq!(j["rtt_max_ms"], 10.0);
        assert_eq!(j["statuses"]["2xx"], 2);
        // A stored body that does not parse is replaced; a new one that does not is
        // dropped.
        assert_eq!(merge_bodies("not json", "{}"), "{}");
        let kept = serde_json::to_string(&a).unwrap();
        assert_eq!(merge_bodies(&kept, "not json"), kept);
        // Huge offsets an agent sends keep the sum finite, so the body still reads.
        let mut n = Rollup::default();
        for _ in 0..3 {
            n.add(&Figures {
                ntp_offset_ms: Some(1e308),
                rtts_ms: vec![1e308],
                ..Default::default()
            });
        }
        let body = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<Rollup>(&body).unwrap(), n);
    }

    #[test]
    fn status_keys_are_bounded() {
        let mut r = Rollup::default();
        for i in 0..100 {
            r.add(&Figures {
                dns_rcode: Some(format!("RC{i}")),
                ..Default::default()
            });
        }
        assert_eq!(r.statuses.len(), MAX_STATUS_KEYS + 1);
        assert_eq!(r.statuses["other"], 100 - MAX_STATUS_KEYS as u64);
    }

    #[test]
    fn hours_start_on_the_hour_even_before_1970() {
        assert_eq!(hour_of(3_600_000 * 5 + 17), 3_600_000 * 5);
        assert_eq!(hour_of(-1), -3_600_000);
        assert_eq!(hour_of(i64::MIN), i64::MIN, "saturates");
        assert_eq!(hour_of(i64::MAX), i64::MAX.div_euclid(HOUR_MS) * HOUR_MS);
    }
}
