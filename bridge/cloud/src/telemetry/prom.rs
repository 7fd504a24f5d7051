//! The Prometheus text exposition format (version 0.0.4), and the two instruments
//! that need state between scrapes: labelled counters and histograms. Each also
//! records into an OTel instrument when OTLP export is on, so one call feeds both.
//! Gauges are read at scrape time from the state they describe.

use std::collections::HashMap;
use std::sync::Mutex;

use opentelemetry::KeyValue;

use imn_prom::fmt_value;

use crate::events::{emit, AgentSeriesDropped, SeriesDropped};
/// The one writer of the text format, shared with the agent and the bridge.
pub use imn_prom::{Exposition, CONTENT_TYPE};

/// Label values, in the order of the instrument's label names (each already capped by
/// [`cap_label`]).
type Key = Vec<String>;

/// At most this many label sets per instrument; past it, new ones are counted under
/// `imn_metric_series_dropped_total` instead (a fleet of agents times targets could
/// otherwise grow without bound).
pub const MAX_SERIES: usize = 20_000;

/// Longest label value, in bytes, that an instrument keeps. A longer value (a 10 kB host
/// name from a hostile agent, say) is cut at a character boundary and ends in `~` and
/// 16 hex digits of a hash of the whole value, so distinct long values stay distinct
/// series while no series costs more than this per label.
pub const MAX_LABEL_BYTES: usize = 128;

/// Most label sets one agent may own in one instrument: an instrument with a label
/// named `agent` counts its series per value of that label, and drops (and counts under
/// `imn_metric_series_dropped_total`) an agent's new label sets past this. 64 is far
/// more targets than one agent measures at once; a hostile agent inventing targets
/// stops there, and cannot fill [`MAX_SERIES`] for the rest of the fleet alone.
pub const MAX_SERIES_PER_AGENT: usize = 64;

/// The label that names an instrument's owner for [`MAX_SERIES_PER_AGENT`].
pub const OWNER_LABEL: &str = "agent";

// Counted by the events `SeriesDropped` and `AgentSeriesDropped` (crate::events).
pub(crate) static SERIES_DROPPED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
pub(crate) static SERIES_DROPPED_PER_AGENT: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Label sets refused, across every instrument: for [`MAX_SERIES`] and for
/// [`MAX_SERIES_PER_AGENT`] alike.
pub fn series_dropped() -> u64 {
    SERIES_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The part of [`series_dropped`] refused because one agent had
/// [`MAX_SERIES_PER_AGENT`] series in the instrument.
pub fn series_dropped_per_agent() -> u64 {
    SERIES_DROPPED_PER_AGENT.load(std::sync::atomic::Ordering::Relaxed)
}

/// A 64-bit FNV-1a-style hash over 8-byte words (then the tail bytes and the length):
/// stable across builds and platforms (a label must not change when the backend is
/// upgraded), enough to keep one agent's long values apart, and quick on 10 kB values.
fn label_hash(s: &str) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = s.as_bytes();
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    (h ^ bytes.len() as u64).wrapping_mul(PRIME)
}

/// A label value as instruments keep it: unchanged up to [`MAX_LABEL_BYTES`], else its
/// longest prefix (at a character boundary) that leaves room for `~` and 16 hex digits
/// of a hash of the whole value.
pub fn cap_label(v: &str) -> std::borrow::Cow<'_, str> {
    if v.len() <= MAX_LABEL_BYTES {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut cut = MAX_LABEL_BYTES - 17;
    while !v.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!("{}~{:016x}", &v[..cut], label_hash(v)))
}

fn key_of(values: &[&str]) -> Key {
    values.iter().map(|v| cap_label(v).into_owned()).collect()
}

/// Series an agent owns in one instrument.
#[derive(Default)]
struct Owned {
    series: usize,
    /// Whether its first refused label set was logged.
    warned: bool,
}

/// The label sets of one instrument and their state, within [`MAX_SERIES`] and, per
/// owner, [`MAX_SERIES_PER_AGENT`].
struct Series<T> {
    name: &'static str,
    /// Position of [`OWNER_LABEL`] among the label names, if the instrument has it.
    owner: Option<usize>,
    map: HashMap<Key, T>,
    per_owner: HashMap<String, Owned>,
}

impl<T> Series<T> {
    fn new(name: &'static str, labels: &[&str]) -> Series<T> {
        Series {
            name,
            owner: labels.iter().position(|l| *l == OWNER_LABEL),
            map: HashMap::new(),
            per_owner: HashMap::new(),
        }
    }

    /// The state of `key`, created with `new` if the caps allow; `None` (counted) if not.
    fn entry(&mut self, key: Key, new: impl FnOnce() -> T) -> Option<&mut T> {
        if self.map.contains_key(&key) {
            return self.map.get_mut(&key);
        }
        if self.map.len() >= MAX_SERIES {
            emit(SeriesDropped);
            return None;
        }
        if let Some(owner) = self.owner.and_then(|i| key.get(i)) {
            let o = self.per_owner.entry(owner.clone()).or_default();
            if o.series >= MAX_SERIES_PER_AGENT {
                emit(AgentSeriesDropped {
                    agent: owner,
                    metric: self.name,
                    first: !std::mem::replace(&mut o.warned, true),
                });
                return None;
            }
            o.series += 1;
        }
        Some(self.map.entry(key).or_insert_with(new))
    }

    fn get(&self, values: &[&str]) -> Option<&T> {
        self.map.get(&key_of(values))
    }

    /// Every series, sorted by its label values.
    fn rows(&self) -> Vec<(&Key, &T)> {
        let mut rows: Vec<(&Key, &T)> = self.map.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows
    }
}

fn otel_attrs(names: &[&'static str], values: &[String]) -> Vec<KeyValue> {
    names
        .iter()
        .zip(values)
        .map(|(k, v)| KeyValue::new(*k, v.clone()))
        .collect()
}

fn with_labels<'a>(names: &[&'static str], key: &'a Key) -> Vec<(&'static str, &'a str)> {
    names
        .iter()
        .zip(key)
        .map(|(k, v)| (*k, v.as_str()))
        .collect()
}

/// A counter with labels.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<Series<f64>>,
    otel: Option<opentelemetry::metrics::Counter<f64>>,
}

impl CounterVec {
    /// `name` is the Prometheus name (ending `_total`); `otel_name` the OTel one.
    /// Label values are capped ([`cap_label`]); with a label named `agent`, each agent
    /// owns at most [`MAX_SERIES_PER_AGENT`] series.
    pub fn new(
        name: &'static str,
        otel_name: &'static str,
        unit: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> CounterVec {
        let otel = super::meter().map(|m| {
            m.f64_counter(otel_name)
                .with_unit(unit)
                .with_description(help)
                .build()
        });
        CounterVec {
            name,
            help,
            labels,
            series: Mutex::new(Series::new(name, labels)),
            otel,
        }
    }

    pub fn add(&self, values: &[&str], by: f64) {
        let key = key_of(values);
        {
            let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
            match s.entry(key.clone(), || 0.0) {
                Some(v) => *v += by,
                None => return,
            }
        }
        if let Some(c) = &self.otel {
            c.add(by, &otel_attrs(self.labels, &key));
        }
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    pub fn get(&self, values: &[&str]) -> f64 {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(values)
            .copied()
            .unwrap_or(0.0)
    }

    /// Label sets held.
    pub fn len(&self) -> usize {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write(&self, e: &mut Exposition) {
        e.family(self.name, "counter", self.help);
        let s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (key, v) in s.rows() {
            e.sample(self.name, &with_labels(self.labels, key), *v);
        }
    }
}

/// A gauge with labels that keeps the last value set, e.g. the loss of an agent's last
/// ping to a target. Capped as [`CounterVec`] is.
pub struct GaugeVec {
    labels: &'static [&'static str],
    series: Mutex<Series<f64>>,
}

impl GaugeVec {
    /// `name` is the Prometheus name, for the log line of a refused label set.
    pub fn new(name: &'static str, labels: &'static [&'static str]) -> GaugeVec {
        GaugeVec {
            labels,
            series: Mutex::new(Series::new(name, labels)),
        }
    }

    pub fn set(&self, values: &[&str], v: f64) {
        let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = s.entry(key_of(values), || v) {
            *x = v;
        }
    }

    pub fn get(&self, values: &[&str]) -> Option<f64> {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(values)
            .copied()
    }

    /// Label sets held.
    pub fn len(&self) -> usize {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds every series to `f` (a gauge family read at scrape time), sorted by labels.
    pub fn fill(&self, f: &mut Family) {
        let s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (key, v) in s.rows() {
            f.push(
                self.labels
                    .iter()
                    .copied()
                    .zip(key.iter().cloned())
                    .collect(),
                *v,
            );
        }
    }
}

#[derive(Clone)]
struct Buckets {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram with labels; bucket bounds are upper bounds, in base units.
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    series: Mutex<Series<Buckets>>,
    otel: Option<opentelemetry::metrics::Histogram<f64>>,
}

/// Seconds, from 100 µs to 5 min: round-trip times to ingest lags.
pub const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Seconds, from 1 ms to a day: how long results take to come home.
pub const LAG_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];

impl HistogramVec {
    pub fn new(
        name: &'static str,
        otel_name: &'static str,
        unit: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> HistogramVec {
        let otel = super::meter().map(|m| {
            m.f64_histogram(otel_name)
                .with_unit(unit)
                .with_description(help)
                .with_boundaries(bounds.to_vec())
                .build()
        });
        HistogramVec {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(Series::new(name, labels)),
            otel,
        }
    }

    /// Label values are capped ([`cap_label`]); with a label named `agent`, each agent
    /// owns at most [`MAX_SERIES_PER_AGENT`] series.
    pub fn observe(&self, values: &[&str], v: f64) {
        if !v.is_finite() {
            return;
        }
        let key = key_of(values);
        {
            let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let n = self.bounds.len();
            let Some(b) = s.entry(key.clone(), || Buckets {
                counts: vec![0; n],
                sum: 0.0,
                count: 0,
            }) else {
                return;
            };
            if let Some(i) = self.bounds.iter().position(|&ub| v <= ub) {
                b.counts[i] += 1;
            }
            b.sum += v;
            b.count += 1;
        }
        if let Some(h) = &self.otel {
            h.record(v, &otel_attrs(self.labels, &key));
        }
    }

    /// Observations so far under one label set.
    pub fn count(&self, values: &[&str]) -> u64 {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(values)
            .map_or(0, |b| b.count)
    }

    /// Label sets held.
    pub fn len(&self) -> usize {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write(&self, e: &mut Exposition) {
        e.family(self.name, "histogram", self.help);
        let s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = format!("{}_bucket", self.name);
        let sum = format!("{}_sum", self.name);
        let count = format!("{}_count", self.name);
        for (key, b) in s.rows() {
            let mut labels = with_labels(self.labels, key);
            let mut cumulative = 0;
            let les: Vec<String> = self.bounds.iter().map(|ub| fmt_value(*ub)).collect();
            for (le, n) in les.iter().zip(&b.counts) {
                cumulative += n;
                labels.push(("le", le));
                e.sample(&bucket, &labels, cumulative as f64);
                labels.pop();
            }
            labels.push(("le", "+Inf"));
            e.sample(&bucket, &labels, b.count as f64);
            labels.pop();
            e.sample(&sum, &labels, b.sum);
            e.sample(&count, &labels, b.count as f64);
        }
    }
}

/// Gauge or counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyKind {
    Gauge,
    /// Monotonic; the Prometheus name ends in `_total`.
    Counter,
}

/// A family read at scrape (or OTLP collection) time from the state it describes.
#[derive(Debug, Clone)]
pub struct Family {
    /// Prometheus name.
    pub name: &'static str,
    /// OTel name (`imn.bridge.connections`).
    pub otel: &'static str,
    pub unit: &'static str,
    pub kind: FamilyKind,
    pub help: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    pub fn new(
        name: &'static str,
        otel: &'static str,
        unit: &'static str,
        kind: FamilyKind,
        help: &'static str,
    ) -> Family {
        Family {
            name,
            otel,
            unit,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    /// With one unlabelled sample.
    pub fn value(mut self, v: f64) -> Family {
        self.samples.push((Vec::new(), v));
        self
    }

    /// Label values longer than [`MAX_LABEL_BYTES`] are capped ([`cap_label`]).
    pub fn push(&mut self, mut labels: Vec<(&'static str, String)>, v: f64) {
        for (_, value) in labels.iter_mut() {
            if let std::borrow::Cow::Owned(c) = cap_label(value) {
                *value = c;
            }
        }
        self.samples.push((labels, v));
    }

    pub fn write(&self, e: &mut Exposition) {
        let kind = match self.kind {
            FamilyKind::Gauge => "gauge",
            FamilyKind::Counter => "counter",
        };
        e.family(self.name, kind, self.help);
        for (labels, v) in &self.samples {
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            e.sample(self.name, &l, *v);
        }
    }
}

type Source = dyn Fn() -> Vec<Family> + Send + Sync;
/// The families last read, and when.
type Cached = Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<Family>>)>>;

/// Registers an observable OTel instrument for each family `source` returns now; each
/// collection reads `source` again (at most once a second, shared by the instruments).
/// Does nothing when OTLP export is off.
pub fn observe(source: std::sync::Arc<Source>) {
    let Some(meter) = super::meter() else { return };
    let cache: std::sync::Arc<Cached> = std::sync::Arc::new(Mutex::new(None));
    let read = {
        let cache = cache.clone();
        let source = source.clone();
        move || -> std::sync::Arc<Vec<Family>> {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, f)) = c.as_ref() {
                if at.elapsed() < std::time::Duration::from_secs(1) {
                    return f.clone();
                }
            }
            let f = std::sync::Arc::new(source());
            *c = Some((std::time::Instant::now(), f.clone()));
            f
        }
    };
    let read: std::sync::Arc<dyn Fn() -> std::sync::Arc<Vec<Family>> + Send + Sync> =
        std::sync::Arc::new(read);
    for fam in source() {
        let name = fam.name;
        let read = read.clone();
        // Reports this family's samples, as read (at most a second ago).
        let callback = move |o: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            for f in read().iter().filter(|f| f.name == name) {
                for (labels, v) in &f.samples {
                    let attrs: Vec<KeyValue> = labels
                        .iter()
                        .map(|(k, v)| KeyValue::new(*k, v.clone()))
                        .collect();
                    o.observe(*v, &attrs);
                }
            }
        };
        match fam.kind {
            FamilyKind::Gauge => {
                meter
                    .f64_observable_gauge(fam.otel)
                    .with_unit(fam.unit)
                    .with_description(fam.help)
                    .with_callback(callback)
                    .build();
            }
            FamilyKind::Counter => {
                meter
                    .f64_observable_counter(fam.otel)
                    .with_unit(fam.unit)
                    .with_description(fam.help)
                    .with_callback(callback)
                    .build();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let h = HistogramVec::new("x_seconds", "x", "s", "An x.", &["who"], &[0.1, 1.0]);
        h.observe(&["a\"b"], 0.05);
        h.observe(&["a\"b"], 0.5);
        h.observe(&["a\"b"], 7.0);
        h.observe(&["a\"b"], f64::NAN);
        let c = CounterVec::new("y_total", "y", "1", "A y.", &["k"]);
        c.inc(&["v"]);
        c.add(&["v"], 2.0);
        let mut e = Exposition::new();
        h.write(&mut e);
        c.write(&mut e);
        let text = e.finish();
        let expected = "# HELP x_seconds An x.\n# TYPE x_seconds histogram\n\
x_seconds_bucket{who=\"a\\\"b\",le=\"0.1\"} 1\n\
x_seconds_bucket{who=\"a\\\"b\",le=\"1\"} 2\n\
x_seconds_bucket{who=\"a\\\"b\",le=\"+Inf\"} 3\n\
x_seconds_sum{who=\"a\\\"b\"} 7.55\n\
x_seconds_count{who=\"a\\\"b\"} 3\n\
# HELP y_total A y.\n# TYPE y_total counter\ny_total{k=\"v\"} 3\n";
        assert_eq!(text, expected);
    }
    /// One exposition line of a histogram series, at most: the name with `_bucket`,
    /// an agent id (64 bytes at most), a capped target (escaping can double it), `le`
    /// and a value, with room to spare.
    const MAX_LINE_BYTES: usize = 512;

    /// What one agent can put into the exposition of one histogram of [`SECONDS`]
    /// buckets (bucket lines, `+Inf`, `_sum` and `_count` per series): 64 series of 22
    /// lines of at most 512 bytes, 704 KiB. Measured under the bomb below: about 300 kB.
    const BOMB_BOUND_BYTES: usize = MAX_SERIES_PER_AGENT * (SECONDS.len() + 3) * MAX_LINE_BYTES;

    /// A 10 kB host name, distinct for each `i`.
    fn long_host(buf: &mut String, i: usize) -> &str {
        if buf.is_empty() {
            *buf = "h".repeat(10_000);
        }
        let tag = format!("{i:08}.");
        buf.replace_range(..tag.len(), &tag);
        buf.as_str()
    }

    #[test]
    fn long_label_values_are_capped_at_a_char_boundary_and_stay_distinct() {
        let short = "a".repeat(MAX_LABEL_BYTES);
        assert_eq!(
            cap_label(&short),
            short.as_str(),
            "a value at the cap is kept"
        );
        let a = format!("{}{}", "é".repeat(200), "a");
        let b = format!("{}{}", "é".repeat(200), "b");
        let (ca, cb) = (cap_label(&a), cap_label(&b));
        assert!(
            ca.len() <= MAX_LABEL_BYTES && cb.len() <= MAX_LABEL_BYTES,
            "{ca}"
        );
        assert_ne!(ca, cb, "distinct long values stay distinct");
        assert!(ca.starts_with("éé") && ca.contains('~'), "{ca}");
        assert_eq!(cap_label(&a), ca, "the same value gives the same label");
        // A counter keeps the capped value, and finds the series by the long one.
        let c = CounterVec::new("z_total", "z", "1", "A z.", &["k"]);
        c.inc(&[&a]);
        c.inc(&[&a]);
        c.inc(&[&b]);
        assert_eq!((c.len(), c.get(&[&a]), c.get(&[&b])), (2, 2.0, 1.0));
        let mut e = Exposition::new();
        c.write(&mut e);
        let text = e.finish();
        assert!(text.lines().all(|l| l.len() < 200), "{text}");
        // Families read at scrape time are capped too.
        let mut f = Family::new("g", "g", "1", FamilyKind::Gauge, "A g.");
        f.push(vec![("k", a.clone())], 1.0);
        assert_eq!(f.samples[0].0[0].1, ca);
    }

    /// The label bomb: one agent makes 100,000 distinct 10 kB hosts label values of one
    /// instrument. It keeps MAX_SERIES_PER_AGENT series of capped labels, the exposition
    /// stays under BOMB_BOUND_BYTES, the rest is counted as dropped, and other agents
    /// still get their series.
    #[test]
    fn a_label_bomb_from_one_agent_stays_bounded() {
        let h = HistogramVec::new(
            "bomb_seconds",
            "bomb",
            "s",
            "B.",
            &["agent", "target"],
            SECONDS,
        );
        let g = GaugeVec::new("bomb_ratio", &["agent", "target"]);
        let dropped = (series_dropped(), series_dropped_per_agent());
        let mut buf = String::new();
        for i in 0..100_000 {
            let host = long_host(&mut buf, i);
            h.observe(&["evil", host], 0.01);
            if i < 1_000 {
                g.set(&["evil", host], 0.5);
            }
        }
        assert_eq!(h.len(), MAX_SERIES_PER_AGENT, "series of the bombing agent");
        assert_eq!(
            g.len(),
            MAX_SERIES_PER_AGENT,
            "last values of the bombing agent"
        );
        // Other tests drop series concurrently: at least this test's drops are counted.
        let refused = 100_000 - MAX_SERIES_PER_AGENT + 1_000 - MAX_SERIES_PER_AGENT;
        assert!(series_dropped() - dropped.0 >= refused as u64);
        assert!(series_dropped_per_agent() - dropped.1 >= refused as u64);
        // A series the agent already has still counts.
        h.observe(&["evil", long_host(&mut buf, 0)], 0.02);
        assert_eq!(h.count(&["evil", long_host(&mut buf, 0)]), 2);
        // Another agent is not affected.
        h.observe(&["good", "example.net"], 0.01);
        assert_eq!(h.count(&["good", "example.net"]), 1);

        let mut e = Exposition::new();
        h.write(&mut e);
        let text = e.finish();
        let mine = text
            .lines()
            .filter(|l| l.contains("agent=\"evil\""))
            .map(|l| l.len() + 1)
            .sum::<usize>();
        eprintln!(
            "label bomb: {} bytes of exposition from the bombing agent ({} in all; bound {BOMB_BOUND_BYTES})",
            mine,
            text.len()
        );
        assert!(mine <= BOMB_BOUND_BYTES, "{mine} bytes");
        assert!(
            text.len() <= BOMB_BOUND_BYTES + 64 * 1024,
            "{} bytes",
            text.len()
        );
        assert!(text.lines().all(|l| l.len() <= MAX_LINE_BYTES));
    }

    /// A normal fleet: 2,000 agents with 5 targets each keep every series, labels as
    /// given.
    #[test]
    fn a_normal_fleet_keeps_every_series() {
        let h = HistogramVec::new(
            "fleet_seconds",
            "fleet",
            "s",
            "F.",
            &["agent", "target"],
            SECONDS,
        );
        let g = GaugeVec::new("fleet_ratio", &["agent", "target"]);
        for a in 0..2_000 {
            for t in 0..5 {
                let (agent, target) = (format!("agent-{a}"), format!("target-{t}.example.net"));
                h.observe(&[&agent, &target], 0.001 * t as f64);
                g.set(&[&agent, &target], t as f64);
            }
        }
        assert_eq!((h.len(), g.len()), (10_000, 10_000));
        assert_eq!(h.count(&["agent-1999", "target-4.example.net"]), 1);
        assert_eq!(g.get(&["agent-7", "target-3.example.net"]), Some(3.0));
        let mut f = Family::new("fleet_ratio", "f", "1", FamilyKind::Gauge, "F.");
        g.fill(&mut f);
        assert_eq!(f.samples.len(), 10_000);
        assert_eq!(
            f.samples[0].0,
            [
                ("agent", "agent-0".to_string()),
                ("target", "target-0.example.net".to_string())
            ]
        );
    }
}
