//! The Prometheus text exposition format (version 0.0.4), and the two instruments
//! that need state between scrapes: labelled counters and histograms. Each also
//! records into an OTel instrument when OTLP export is on, so one call feeds both.
//! Gauges are read at scrape time from the state they describe.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use opentelemetry::KeyValue;

/// A `/metrics` page being written. Each family is written whole: its `HELP` and
/// `TYPE` lines, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// The content type of the text format.
pub use imn_modules::metrics_http::CONTENT_TYPE;

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: `kind` is `gauge`, `counter` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = writeln!(
            self.out,
            "{name}{} {}",
            labels_text(labels),
            fmt_value(value)
        );
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Label values, in the order of the instrument's label names.
type Key = Vec<String>;

/// At most this many label sets per instrument; past it, new ones are counted under
/// `imn_metric_series_dropped_total` instead (a fleet of agents times targets could
/// otherwise grow without bound).
pub const MAX_SERIES: usize = 20_000;

static SERIES_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Label sets refused for [`MAX_SERIES`], across every instrument.
pub fn series_dropped() -> u64 {
    SERIES_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

fn otel_attrs(names: &[&'static str], values: &[&str]) -> Vec<KeyValue> {
    names
        .iter()
        .zip(values)
        .map(|(k, v)| KeyValue::new(*k, v.to_string()))
        .collect()
}

/// A counter with labels.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<HashMap<Key, f64>>,
    otel: Option<opentelemetry::metrics::Counter<f64>>,
}

impl CounterVec {
    /// `name` is the Prometheus name (ending `_total`); `otel_name` the OTel one.
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
            series: Mutex::new(HashMap::new()),
            otel,
        }
    }

    pub fn add(&self, values: &[&str], by: f64) {
        {
            let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let key: Key = values.iter().map(|v| v.to_string()).collect();
            let full = s.len() >= MAX_SERIES;
            match s.get_mut(&key) {
                Some(v) => *v += by,
                None if !full => {
                    s.insert(key, by);
                }
                None => {
                    SERIES_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
        if let Some(c) = &self.otel {
            c.add(by, &otel_attrs(self.labels, values));
        }
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    pub fn get(&self, values: &[&str]) -> f64 {
        let key: Key = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied()
            .unwrap_or(0.0)
    }

    pub fn write(&self, e: &mut Exposition) {
        e.family(self.name, "counter", self.help);
        let s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(&Key, &f64)> = s.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        for (key, v) in rows {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .zip(key)
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            e.sample(self.name, &labels, *v);
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
    series: Mutex<HashMap<Key, Buckets>>,
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
            series: Mutex::new(HashMap::new()),
            otel,
        }
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        if !v.is_finite() {
            return;
        }
        {
            let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let key: Key = values.iter().map(|v| v.to_string()).collect();
            if !s.contains_key(&key) && s.len() >= MAX_SERIES {
                SERIES_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            let b = s.entry(key).or_insert_with(|| Buckets {
                counts: vec![0; self.bounds.len()],
                sum: 0.0,
                count: 0,
            });
            if let Some(i) = self.bounds.iter().position(|&ub| v <= ub) {
                b.counts[i] += 1;
            }
            b.sum += v;
            b.count += 1;
        }
        if let Some(h) = &self.otel {
            h.record(v, &otel_attrs(self.labels, values));
        }
    }

    /// Observations so far under one label set.
    pub fn count(&self, values: &[&str]) -> u64 {
        let key: Key = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map_or(0, |b| b.count)
    }

    pub fn write(&self, e: &mut Exposition) {
        e.family(self.name, "histogram", self.help);
        let s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(&Key, &Buckets)> = s.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let bucket = format!("{}_bucket", self.name);
        let sum = format!("{}_sum", self.name);
        let count = format!("{}_count", self.name);
        for (key, b) in rows {
            let mut labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .zip(key)
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
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

    pub fn push(&mut self, labels: Vec<(&'static str, String)>, v: f64) {
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
}
