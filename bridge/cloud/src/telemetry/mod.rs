//! Traces, metrics and logs.
//!
//! - **OTLP/gRPC export** of all three, only when configured: by `--otlp-endpoint`, or
//!   by the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or a per-signal
//!   `OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT`); `OTEL_SDK_DISABLED=true`
//!   turns it off. The other `OTEL_*` variables (timeouts, headers, batch delays,
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) apply as the SDK defines them.
//!   Spans and logs wait in bounded queues that batch threads drain, and metrics are
//!   read by a periodic thread: a slow or dead collector costs dropped telemetry,
//!   never a blocked or slowed data path.
//! - **Prometheus text format** for `/metrics` ([`prom`]), kept whether or not OTLP is on.
//! - **Logs**: `tracing` to stderr, and over OTLP when configured, with the trace and
//!   span ids of the OTel context current when the event was logged.
//!
//! Each process runs one or more components, each a service of its own: `imn-backend`,
//! `imn-bridge`, and `imn-agent` (spans the backend builds from an agent's timings;
//! agents do not speak OTLP).

pub mod prom;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// A service whose spans this process reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Backend,
    Bridge,
    /// The agents' own timings, turned into spans by the backend.
    Agent,
}

impl Component {
    pub fn service_name(self) -> &'static str {
        match self {
            Component::Backend => "imn-backend",
            Component::Bridge => "imn-bridge",
            Component::Agent => "imn-agent",
        }
    }
}

/// Where telemetry goes.
#[derive(Debug, Clone, Default)]
pub struct OtlpConfig {
    /// `http://collector:4317`. Without it, the `OTEL_EXPORTER_OTLP_*ENDPOINT`
    /// variables decide; without those, nothing is exported.
    pub endpoint: Option<String>,
}

impl OtlpConfig {
    /// Whether anything is to be exported.
    pub fn enabled(&self) -> bool {
        let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
            return false;
        }
        self.endpoint.is_some()
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
    }
}

struct Providers {
    tracers: Vec<(Component, SdkTracerProvider, SdkTracer)>,
    meters: SdkMeterProvider,
    logs: SdkLoggerProvider,
}

static PROVIDERS: OnceLock<Providers> = OnceLock::new();
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// This process's `service.instance.id`: `{host}-{pid}-{random}`.
pub fn instance_id() -> &'static str {
    INSTANCE_ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let rand = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}-{}", std::process::id(), &rand[..8])
    })
}

fn resource(c: Component, main: bool) -> Resource {
    let mut b = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.namespace", "imn"),
    ]);
    // OTEL_SERVICE_NAME names the process's own service; agents stay imn-agent.
    if !main || std::env::var("OTEL_SERVICE_NAME").is_err() {
        b = b.with_service_name(c.service_name());
    }
    if c == Component::Agent {
        // One resource for every agent: each span names its agent in `imn.agent.id`.
        b = b.with_attribute(KeyValue::new(
            "service.instance.id",
            format!("reported-by-{}", instance_id()),
        ));
    } else {
        b = b.with_attribute(KeyValue::new("service.instance.id", instance_id()));
    }
    b.build()
}

/// Keeps the exporters running; on drop, flushes what is queued (bounded in time, so
/// a dead collector cannot hold up an exit).
pub struct Guard {
    _private: (),
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(p) = PROVIDERS.get() else { return };
        let tracers: Vec<SdkTracerProvider> = p.tracers.iter().map(|t| t.1.clone()).collect();
        let meters = p.meters.clone();
        let logs = p.logs.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for t in tracers {
                let _ = t.shutdown();
            }
            let _ = meters.shutdown();
            let _ = logs.shutdown();
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(3));
    }
}

/// Sets up logging, and OTLP export when configured, for a process running
/// `components` (the first is the process's own service). Call once, inside the Tokio
/// runtime (the gRPC channels live on it). `default_filter` applies when `RUST_LOG` is
/// unset.
pub fn init(
    components: &[Component],
    otlp: &OtlpConfig,
    default_filter: &str,
) -> anyhow::Result<Guard> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
    };
    // rumqttd opens a span per connection: noise in every log line after it.
    let no_rumqttd_spans = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter());
    if !otlp.enabled() || components.is_empty() {
        tracing_subscriber::registry()
            .with(no_rumqttd_spans)
            .with(fmt)
            .try_init()?;
        return Ok(Guard { _private: () });
    }
    let main = components.first().copied().unwrap_or(Component::Backend);
    let endpoint = otlp.endpoint.clone();
    let span_exporter = || {
        let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        match &endpoint {
            Some(e) => b.with_endpoint(e.clone()).build(),
            None => b.build(),
        }
    };
    let mut tracers = Vec::new();
    for (i, &c) in components.iter().enumerate() {
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(span_exporter()?)
            .with_resource(resource(c, i == 0))
            .build();
        let tracer = provider.tracer(c.service_name());
        tracers.push((c, provider, tracer));
    }
    let metric_exporter = {
        let b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        match &endpoint {
            Some(e) => b.with_endpoint(e.clone()).build()?,
            None => b.build()?,
        }
    };
    let meters = SdkMeterProvider::builder()
        .with_periodic_exporter(metric_exporter)
        .with_resource(resource(main, true))
        .build();
    let log_exporter = {
        let b = opentelemetry_otlp::LogExporter::builder().with_tonic();
        match &endpoint {
            Some(e) => b.with_endpoint(e.clone()).build()?,
            None => b.build()?,
        }
    };
    let logs = SdkLoggerProvider::builder()
        .with_batch_exporter(log_exporter)
        .with_resource(resource(main, true))
        .build();
    // The SDK and its gRPC stack log through `tracing` too: exporting those events
    // would feed a failing export with news of its own failure.
    let otel_logs = opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&logs)
        .with_filter(filter())
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            let t = m.target();
            !(t.starts_with("opentelemetry")
                || t.starts_with("tonic")
                || t.starts_with("h2")
                || t.starts_with("hyper")
                || t.starts_with("tower"))
        }));
    tracing_subscriber::registry()
        .with(no_rumqttd_spans)
        .with(fmt)
        .with(otel_logs)
        .try_init()?;
    opentelemetry::global::set_meter_provider(meters.clone());
    let _ = PROVIDERS.set(Providers {
        tracers,
        meters,
        logs,
    });
    tracing::info!(
        endpoint = otlp
            .endpoint
            .as_deref()
            .unwrap_or("from OTEL_EXPORTER_OTLP_*"),
        "exporting traces, metrics and logs over OTLP/gRPC"
    );
    Ok(Guard { _private: () })
}

/// The tracer of a component this process runs, if export is on.
pub fn tracer(c: Component) -> Option<&'static SdkTracer> {
    PROVIDERS
        .get()?
        .tracers
        .iter()
        .find(|t| t.0 == c)
        .map(|t| &t.2)
}

/// The meter for IMN's instruments, if export is on.
pub fn meter() -> Option<opentelemetry::metrics::Meter> {
    PROVIDERS.get().map(|_| opentelemetry::global::meter("imn"))
}

/// The W3C `traceparent` of a context's span, if it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The remote context a `traceparent` names; `None` if it is not valid W3C.
pub fn context_from(traceparent: &str) -> Option<Context> {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Milliseconds since the epoch as a span time.
pub fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_garbage_is_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from(tp).expect("valid traceparent");
        assert_eq!(traceparent(&cx).as_deref(), Some(tp));
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(context_from(bad).is_none(), "{bad:?} accepted");
        }
        assert!(traceparent(&Context::new()).is_none());
    }
}
