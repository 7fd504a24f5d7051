//! A real OTLP/gRPC receiver for tests: it implements the OpenTelemetry Collector's
//! `TraceService`, `MetricsService` and `LogsService` (the published protobufs of the
//! `opentelemetry-proto` crate) on a free loopback port and keeps everything it receives.
//!
//! The receiver owns its runtime (a current-thread tokio runtime on its own thread), so it
//! works the same from sync code and from `#[tokio::test]`s. [`OtlpReceiver::stop`] (and
//! dropping the receiver) shuts that runtime down, which closes the listener and every
//! open connection at once: a client's next export fails, as with a collector that died.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// One span, as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Resource attribute `service.name` ("" if none).
    pub service: String,
    /// All resource attributes, values stringified.
    pub resource: BTreeMap<String, String>,
    /// Lowercase hex, 32 chars.
    pub trace_id: String,
    /// Lowercase hex, 16 chars.
    pub span_id: String,
    /// Lowercase hex, "" when root.
    pub parent_span_id: String,
    pub name: String,
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, String>,
}

/// One log record, as received.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    pub service: String,
    /// Lowercase hex, "" when absent or all zero.
    pub trace_id: String,
    /// Lowercase hex, "" when absent or all zero.
    pub span_id: String,
    pub severity_text: String,
    pub severity_number: i32,
    /// The body, stringified.
    pub body: String,
    pub attributes: BTreeMap<String, String>,
}

/// The kind of a metric's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Sum,
    Histogram,
    ExponentialHistogram,
    Summary,
}

/// One metric (of one export), with its data points.
#[derive(Debug, Clone)]
pub struct ReceivedMetric {
    pub service: String,
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    pub points: Vec<MetricPoint>,
}

/// One data point of a metric.
#[derive(Debug, Clone)]
pub struct MetricPoint {
    pub attributes: BTreeMap<String, String>,
    /// The gauge or sum value; for histograms and summaries, the sum.
    pub value: f64,
    /// The histogram's (or summary's) count; 1 for a gauge or sum.
    pub count: u64,
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    metrics: Mutex<Vec<ReceivedMetric>>,
    logs: Mutex<Vec<ReceivedLog>>,
    trace_exports: AtomicUsize,
    metric_exports: AtomicUsize,
    log_exports: AtomicUsize,
}

/// Locks, ignoring poisoning (a panicking test thread must not hide what was received).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running OTLP/gRPC receiver on 127.0.0.1. Stops when dropped.
pub struct OtlpReceiver {
    port: u16,
    store: Arc<Store>,
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds 127.0.0.1:0 and serves.
    pub fn start() -> anyhow::Result<OtlpReceiver> {
        Self::start_on(0)
    }

    /// Binds a given port (to restart a stopped receiver at the same endpoint).
    pub fn start_on(port: u16) -> anyhow::Result<OtlpReceiver> {
        let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .with_context(|| format!("binding the OTLP receiver to 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the OTLP receiver's runtime")?;
        let incoming = {
            let _in_rt = rt.enter();
            tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(
                listener,
            )?)
        };
        let store = Arc::new(Store::default());
        let collector = Collector(store.clone());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .add_service(LogsServiceServer::new(collector))
            .serve_with_incoming(incoming);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("otlp-receiver-{port}"))
            .spawn(move || {
                rt.spawn(async move {
                    if let Err(e) = server.await {
                        eprintln!("OTLP receiver on port {port}: {e}");
                    }
                });
                // Serves until stop() (or the receiver is dropped, which drops the sender).
                let _ = rt.block_on(stop_rx);
                // Dropping a current-thread runtime drops every task it owns, here and now:
                // the listener and all connections close before stop() returns.
                drop(rt);
            })
            .context("the OTLP receiver's thread")?;
        Ok(OtlpReceiver {
            port,
            store,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.store.spans).clone()
    }

    /// Every metric received so far (one entry per metric per export), in arrival order.
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        lock(&self.store.metrics).clone()
    }

    /// Every log record received so far, in arrival order.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        lock(&self.store.logs).clone()
    }

    /// Number of Export calls received per signal: (traces, metrics, logs).
    pub fn exports(&self) -> (usize, usize, usize) {
        (
            self.store.trace_exports.load(Ordering::SeqCst),
            self.store.metric_exports.load(Ordering::SeqCst),
            self.store.log_exports.load(Ordering::SeqCst),
        )
    }

    /// Polls `f` every 100 ms until it returns Some, or fails after `timeout`.
    ///
    /// This blocks the calling thread (the receiver has its own runtime, so it keeps
    /// serving). Async tests should prefer [`OtlpReceiver::wait_until_async`], which
    /// sleeps with `tokio::time::sleep` and so does not hold up a runtime worker.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&OtlpReceiver) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(what, timeout));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// As [`OtlpReceiver::wait_until`], sleeping with `tokio::time::sleep` between polls.
    pub async fn wait_until_async<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&OtlpReceiver) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(what, timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn timed_out(&self, what: &str, timeout: Duration) -> anyhow::Error {
        let (t, m, l) = self.exports();
        anyhow::anyhow!(
            "timed out after {timeout:?} waiting for {what} (OTLP receiver on port {}: \
             {t} trace, {m} metric and {l} log exports; {} spans, {} metrics, {} logs)",
            self.port,
            lock(&self.store.spans).len(),
            lock(&self.store.metrics).len(),
            lock(&self.store.logs).len(),
        )
    }

    /// Stops serving and drops every open connection at once (a client's next export
    /// fails). Returns once the port is closed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The three collector services, over one store.
#[derive(Clone)]
struct Collector(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let (service, resource) = resource_attrs(rs.resource.as_ref());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        resource: resource.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex_id(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        attributes: attrs(&s.attributes),
                    });
                }
            }
        }
        lock(&self.0.spans).extend(got);
        self.0.trace_exports.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let mut got = Vec::new();
        for rl in request.into_inner().resource_logs {
            let (service, _) = resource_attrs(rl.resource.as_ref());
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    got.push(ReceivedLog {
                        service: service.clone(),
                        trace_id: hex_id(&r.trace_id),
                        span_id: hex_id(&r.span_id),
                        severity_text: r.severity_text,
                        severity_number: r.severity_number,
                        body: r.body.as_ref().map(any_to_string).unwrap_or_default(),
                        attributes: attrs(&r.attributes),
                    });
                }
            }
        }
        lock(&self.0.logs).extend(got);
        self.0.log_exports.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut got = Vec::new();
        for rm in request.into_inner().resource_metrics {
            let (service, _) = resource_attrs(rm.resource.as_ref());
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let Some(data) = m.data else { continue };
                    let (kind, points) = metric_points(data);
                    got.push(ReceivedMetric {
                        service: service.clone(),
                        name: m.name,
                        unit: m.unit,
                        kind,
                        points,
                    });
                }
            }
        }
        lock(&self.0.metrics).extend(got);
        self.0.metric_exports.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn metric_points(data: metric::Data) -> (MetricKind, Vec<MetricPoint>) {
    fn number(p: &NumberDataPoint) -> MetricPoint {
        let value = match p.value {
            Some(number_data_point::Value::AsDouble(v)) => v,
            Some(number_data_point::Value::AsInt(v)) => v as f64,
            None => f64::NAN,
        };
        MetricPoint {
            attributes: attrs(&p.attributes),
            value,
            count: 1,
        }
    }
    match data {
        metric::Data::Gauge(g) => (
            MetricKind::Gauge,
            g.data_points.iter().map(number).collect(),
        ),
        metric::Data::Sum(s) => (MetricKind::Sum, s.data_points.iter().map(number).collect()),
        metric::Data::Histogram(h) => (
            MetricKind::Histogram,
            h.data_points
                .iter()
                .map(|p| MetricPoint {
                    attributes: attrs(&p.attributes),
                    value: p.sum.unwrap_or(0.0),
                    count: p.count,
                })
                .collect(),
        ),
        metric::Data::ExponentialHistogram(h) => (
            MetricKind::ExponentialHistogram,
            h.data_points
                .iter()
                .map(|p| MetricPoint {
                    attributes: attrs(&p.attributes),
                    value: p.sum.unwrap_or(0.0),
                    count: p.count,
                })
                .collect(),
        ),
        metric::Data::Summary(s) => (
            MetricKind::Summary,
            s.data_points
                .iter()
                .map(|p| MetricPoint {
                    attributes: attrs(&p.attributes),
                    value: p.sum,
                    count: p.count,
                })
                .collect(),
        ),
    }
}

/// `service.name` and all the resource's attributes.
fn resource_attrs(resource: Option<&Resource>) -> (String, BTreeMap<String, String>) {
    let all = resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
    let service = all.get("service.name").cloned().unwrap_or_default();
    (service, all)
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(any_to_string).unwrap_or_default(),
            )
        })
        .collect()
}

fn any_to_string(v: &AnyValue) -> String {
    match &v.value {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(other) => format!("{other:?}"),
    }
}

/// Lowercase hex of the bytes.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Lowercase hex of an id, "" when absent or all zero (an invalid id means "none").
fn hex_id(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| *b == 0) {
        String::new()
    } else {
        hex(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    };
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    const TRACE_ID: [u8; 16] = [
        0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7, 0xe8,
        0xf9,
    ];
    const TRACE_HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    const SPAN_ID: [u8; 8] = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03];
    const PARENT_ID: [u8; 8] = [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80];

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    fn resource(service: &str) -> Option<Resource> {
        Some(Resource {
            attributes: vec![kv("service.name", s(service)), kv("host.name", s("box-1"))],
            ..Default::default()
        })
    }

    fn trace_request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: resource("svc-a"),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: TRACE_ID.to_vec(),
                        span_id: SPAN_ID.to_vec(),
                        parent_span_id: PARENT_ID.to_vec(),
                        name: "handle request".into(),
                        kind: 2,
                        start_time_unix_nano: 1_000,
                        end_time_unix_nano: 2_500,
                        attributes: vec![
                            kv("http.status", any_value::Value::IntValue(200)),
                            kv("retry", any_value::Value::BoolValue(false)),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn receives_spans_logs_and_metrics_from_a_real_client() {
        let rx = OtlpReceiver::start().expect("receiver");
        assert_eq!(rx.endpoint(), format!("http://127.0.0.1:{}", rx.port()));

        let mut traces = TraceServiceClient::connect(rx.endpoint()).await.unwrap();
        traces.export(trace_request()).await.expect("trace export");

        let mut logs = LogsServiceClient::connect(rx.endpoint()).await.unwrap();
        logs.export(ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource("svc-b"),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![LogRecord {
                        trace_id: TRACE_ID.to_vec(),
                        span_id: SPAN_ID.to_vec(),
                        severity_text: "WARN".into(),
                        severity_number: 13,
                        body: Some(AnyValue {
                            value: Some(s("disk almost full")),
                        }),
                        attributes: vec![kv("free", any_value::Value::DoubleValue(0.5))],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .await
        .expect("log export");

        let mut metrics = MetricsServiceClient::connect(rx.endpoint()).await.unwrap();
        metrics
            .export(ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: resource("svc-c"),
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![Metric {
                            name: "request.duration".into(),
                            unit: "ms".into(),
                            data: Some(metric::Data::Histogram(Histogram {
                                data_points: vec![HistogramDataPoint {
                                    attributes: vec![kv("route", s("/x"))],
                                    count: 3,
                                    sum: Some(6.5),
                                    bucket_counts: vec![1, 2],
                                    explicit_bounds: vec![2.0],
                                    ..Default::default()
                                }],
                                aggregation_temporality: 2,
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            })
            .await
            .expect("metric export");

        let spans = rx
            .wait_until_async("one span", Duration::from_secs(5), |r| {
                let s = r.spans();
                (!s.is_empty()).then_some(s)
            })
            .await
            .unwrap();
        assert_eq!(spans.len(), 1);
        let sp = &spans[0];
        assert_eq!(sp.service, "svc-a");
        assert_eq!(sp.resource["host.name"], "box-1");
        assert_eq!(sp.trace_id, TRACE_HEX);
        assert_eq!(sp.span_id, "deadbeef00010203");
        assert_eq!(sp.parent_span_id, "1020304050607080");
        assert_eq!(sp.name, "handle request");
        assert_eq!(sp.kind, 2);
        assert_eq!((sp.start_ns, sp.end_ns), (1_000, 2_500));
        assert_eq!(sp.attributes["http.status"], "200");
        assert_eq!(sp.attributes["retry"], "false");

        let logs = rx.logs();
        assert_eq!(logs.len(), 1);
        let l = &logs[0];
        assert_eq!(l.service, "svc-b");
        assert_eq!(l.trace_id, TRACE_HEX);
        assert_eq!(l.span_id, "deadbeef00010203");
        assert_eq!(l.severity_text, "WARN");
        assert_eq!(l.severity_number, 13);
        assert_eq!(l.body, "disk almost full");
        assert_eq!(l.attributes["free"], "0.5");

        let metrics = rx.metrics();
        assert_eq!(metrics.len(), 1);
        let m = &metrics[0];
        assert_eq!(m.service, "svc-c");
        assert_eq!(m.name, "request.duration");
        assert_eq!(m.unit, "ms");
        assert_eq!(m.kind, MetricKind::Histogram);
        assert_eq!(m.points.len(), 1);
        assert_eq!(m.points[0].count, 3);
        assert_eq!(m.points[0].value, 6.5);
        assert_eq!(m.points[0].attributes["route"], "/x");

        assert_eq!(rx.exports(), (1, 1, 1));
        rx.stop();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn after_stop_exports_fail_and_start_on_restarts_the_endpoint() {
        let rx = OtlpReceiver::start().expect("receiver");
        let port = rx.port();
        let endpoint = rx.endpoint();
        let mut client = TraceServiceClient::connect(endpoint.clone()).await.unwrap();
        client.export(trace_request()).await.expect("first export");
        assert_eq!(rx.exports().0, 1);

        rx.stop();
        // The port is closed: a new connection is refused.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(TraceServiceClient::connect(endpoint.clone()).await.is_err());
        // And the open connection was dropped: the old client's next export fails.
        assert!(client.export(trace_request()).await.is_err());

        // A receiver on the same port serves again, with an empty store.
        let rx = OtlpReceiver::start_on(port).expect("restart on the same port");
        assert_eq!(rx.endpoint(), endpoint);
        let mut client = TraceServiceClient::connect(endpoint).await.unwrap();
        client
            .export(trace_request())
            .await
            .expect("export after restart");
        assert_eq!(rx.exports(), (1, 0, 0));
        assert_eq!(rx.spans().len(), 1);
    }

    #[test]
    fn works_from_sync_code_and_wait_until_times_out() {
        let rx = OtlpReceiver::start().expect("receiver");
        let port = rx.port();
        let err = rx
            .wait_until("a span that never comes", Duration::from_millis(250), |r| {
                r.spans().first().cloned()
            })
            .unwrap_err();
        assert!(err.to_string().contains("a span that never comes"), "{err}");

        // A client on its own runtime, as a sync test would use one.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = TraceServiceClient::connect(rx.endpoint()).await.unwrap();
            c.export(trace_request()).await.unwrap();
        });
        let n = rx
            .wait_until("one span", Duration::from_secs(5), |r| {
                let n = r.spans().len();
                (n == 1).then_some(n)
            })
            .unwrap();
        assert_eq!(n, 1);
        drop(rx);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn ids_are_hex_and_zero_ids_are_empty() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
        assert_eq!(hex_id(&[0; 8]), "");
        assert_eq!(hex_id(&[]), "");
        assert_eq!(hex_id(&[0, 1]), "0001");
    }
}
