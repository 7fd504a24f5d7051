//! What the backend tells operators: its metrics (`/metrics`, and OTLP when on), and the
//! spans of a measurement's trace that only the backend can build.
//!
//! A measurement's trace (every span but the first two joins it through the
//! `traceparent` the step before handed on):
//!
//! ```text
//! POST /agent/{id}/{module}        imn-backend  server    the API request (with ?wait, until the result)
//! └ dispatch {module}              imn-backend  producer  command onto the bus (again on each redelivery)
//!   └ bridge downlink              imn-bridge   consumer  bus → MQTT; the envelope carries this span
//!     ├ agent command {module}     imn-agent    consumer  received → finished, agent clock
//!     │ └ module run {module}      imn-agent    internal  started → finished, agent clock
//!     ├ outbox wait                imn-agent    internal  finished → arrived at the backend
//!     └ store result               imn-backend  consumer  arrived → committed
//! ```
//!
//! The agent does not speak OTLP: it hands back the `traceparent` its command carried
//! with the result ([`wire::RecordBody::TracedResult`]), and the backend reports the
//! agent's spans, from the agent's own timestamps, under the service `imn-agent`.

use std::sync::Mutex;

use imn_cloud::telemetry::prom::{
    CounterVec, Exposition, Family, FamilyKind, GaugeVec, HistogramVec, LAG_SECONDS, SECONDS,
};
use imn_cloud::telemetry::{self, at_ms, Component};
use imn_proto::results::{ModuleOutcome, ModuleOutput};
use imn_proto::wire::{self, RequestState};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use crate::registry::AgentEntry;

/// Instruments that keep state between scrapes.
pub struct Metrics {
    pub results_ingested: CounterVec,
    pub ingest_lag: HistogramVec,
    pub errors: CounterVec,
    pub ping_rtt: HistogramVec,
    pub tcping_connect: HistogramVec,
    pub dns_rt: HistogramVec,
    pub http_total: HistogramVec,
    /// Last loss ratio per (agent, target).
    ping_loss: GaugeVec,
    /// Last NTP offset (seconds, server ahead is positive) per (agent, server).
    ntp_offset: GaugeVec,
    /// Hops of the last traceroute per (agent, target), and whether it arrived.
    trace_hops: GaugeVec,
    trace_reached: GaugeVec,
    /// Requests per state, as last read from the store.
    pub request_states: Mutex<Vec<(RequestState, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Call after [`telemetry::init`], so the instruments also feed OTLP.
    pub fn new() -> Metrics {
        Metrics {
            results_ingested: CounterVec::new(
                "imn_results_ingested_total",
                "imn.results.ingested",
                "{result}",
                "Module results stored, by module.",
                &["module"],
            ),
            ingest_lag: HistogramVec::new(
                "imn_ingest_lag_seconds",
                "imn.ingest.lag",
                "s",
                "From the agent finishing a run to the backend storing its result (offline time included).",
                &[],
                LAG_SECONDS,
            ),
            errors: CounterVec::new(
                "imn_errors_total",
                "imn.errors",
                "{error}",
                "Errors by kind: undecodable uplink messages (by reason), store and bus failures, failed and timed-out module runs.",
                &["kind"],
            ),
            ping_rtt: HistogramVec::new(
                "imn_ping_rtt_seconds",
                "imn.ping.rtt",
                "s",
                "ICMP echo round-trip times, per agent and target.",
                &["agent", "target"],
                SECONDS,
            ),
            tcping_connect: HistogramVec::new(
                "imn_tcping_connect_time_seconds",
                "imn.tcping.connect_time",
                "s",
                "TCP connect times, per agent and target (host:port).",
                &["agent", "target"],
                SECONDS,
            ),
            dns_rt: HistogramVec::new(
                "imn_dns_response_time_seconds",
                "imn.dns.response_time",
                "s",
                "DNS response times, per agent and name server.",
                &["agent", "server"],
                SECONDS,
            ),
            http_total: HistogramVec::new(
                "imn_http_total_time_seconds",
                "imn.http.total_time",
                "s",
                "HTTP request times from start to the body read, per agent and URL.",
                &["agent", "target"],
                SECONDS,
            ),
            ping_loss: GaugeVec::new("imn_ping_loss_ratio", AGENT_TARGET),
            ntp_offset: GaugeVec::new("imn_ntp_offset_seconds", AGENT_TARGET),
            trace_hops: GaugeVec::new("imn_traceroute_hops", AGENT_TARGET),
            trace_reached: GaugeVec::new("imn_traceroute_destination_reached", AGENT_TARGET),
            request_states: Mutex::new(Vec::new()),
        }
    }

    /// Metrics of one stored result. Every label value an agent chooses (targets,
    /// servers, URLs) is capped in length by the instruments, and each agent owns at most
    /// `MAX_SERIES_PER_AGENT` series per instrument (see `imn_cloud::telemetry::prom`);
    /// the module label is a catalog module's name or `other`.
    pub fn result(&self, agent: &str, r: &wire::ModuleResult, stored_ms: i64) {
        self.results_ingested.inc(&[module_label(&r.module)]);
        self.ingest_lag.observe(
            &[],
            stored_ms.saturating_sub(r.finished_ms).max(0) as f64 / 1000.0,
        );
        match &r.outcome {
            ModuleOutcome::Ok(ModuleOutput::Ping(p)) => {
                for t in &p.targets {
                    for ms in t.rtts_ms.iter().flatten() {
                        self.ping_rtt.observe(&[agent, &t.host], ms / 1000.0);
                    }
                    if t.sent > 0 {
                        self.ping_loss.set(&[agent, &t.host], t.loss_pct / 100.0);
                    }
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Tcping(t)) => {
                let target = format!("{}:{}", t.host, t.port);
                for ms in t.attempts.iter().filter_map(|a| a.connect_ms) {
                    self.tcping_connect.observe(&[agent, &target], ms / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Dns(d)) => {
                if let Some(reply) = &d.reply {
                    let server = format!("{}:{}", d.server, d.port);
                    self.dns_rt.observe(&[agent, &server], reply.rt_ms / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Http(h)) => {
                if h.error.is_none() {
                    self.http_total
                        .observe(&[agent, &url_label(&h.url)], h.timing.total_ms / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Ntp(n)) => {
                if let Some(offset) = n.offset_ms {
                    self.ntp_offset.set(&[agent, &n.host], offset / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Traceroute(t)) => {
                self.trace_hops.set(&[agent, &t.host], t.hops.len() as f64);
                let v = if t.destination_reached { 1.0 } else { 0.0 };
                self.trace_reached.set(&[agent, &t.host], v);
            }
            ModuleOutcome::Ok(_) => {}
            ModuleOutcome::Failed(_) => self.errors.inc(&["module_failed"]),
            ModuleOutcome::Timeout => self.errors.inc(&["module_timeout"]),
        }
    }

    /// Families read from current state: the registry's agents and their last
    /// heartbeats, request states, ping loss.
    pub fn families(&self, agents: &[AgentEntry], now_ms: i64) -> Vec<Family> {
        let g = |name, otel, unit, help| Family::new(name, otel, unit, FamilyKind::Gauge, help);
        let alive = agents.iter().filter(|a| a.alive(now_ms)).count();
        let mut depth = g(
            "imn_agent_outbox_depth",
            "imn.agent.outbox.depth",
            "{record}",
            "Records in the agent's outbox waiting for the backend's ack (last heartbeat).",
        );
        let mut oldest = g(
            "imn_agent_outbox_oldest_age_seconds",
            "imn.agent.outbox.oldest_age",
            "s",
            "Age of the oldest unacked record in the agent's outbox (last heartbeat).",
        );
        let mut dropped = g(
            "imn_agent_outbox_dropped_records",
            "imn.agent.outbox.dropped",
            "{record}",
            "Records the agent's outbox evicted since it was created (last heartbeat).",
        );
        let mut cpu = g(
            "imn_agent_cpu_ratio",
            "imn.agent.cpu.utilization",
            "1",
            "Whole-machine CPU use of the agent's device, 0 to 1 (last heartbeat).",
        );
        let mut mem_used = g(
            "imn_agent_memory_used_bytes",
            "imn.agent.memory.used",
            "By",
            "Memory in use on the agent's device (total minus available; last heartbeat).",
        );
        let mut mem_total = g(
            "imn_agent_memory_total_bytes",
            "imn.agent.memory.total",
            "By",
            "Memory of the agent's device (last heartbeat).",
        );
        let mut load1 = g(
            "imn_agent_load1",
            "imn.agent.load.1m",
            "1",
            "One-minute load average of the agent's device (last heartbeat).",
        );
        let mut up = g(
            "imn_agent_alive",
            "imn.agent.alive",
            "1",
            "1 while the agent is heard from within three heartbeat intervals.",
        );
        for a in agents {
            let l = || vec![("agent", a.id.clone())];
            up.push(l(), if a.alive(now_ms) { 1.0 } else { 0.0 });
            let Some(hb) = &a.last_heartbeat else {
                continue;
            };
            depth.push(l(), hb.outbox_depth as f64);
            oldest.push(l(), hb.outbox_oldest_age_ms as f64 / 1000.0);
            dropped.push(l(), hb.dropped as f64);
            cpu.push(l(), f64::from(hb.system.cpu_pct) / 100.0);
            let total = hb.system.mem_total_kib as f64 * 1024.0;
            let avail = hb.system.mem_available_kib as f64 * 1024.0;
            mem_used.push(l(), (total - avail).max(0.0));
            mem_total.push(l(), total);
            load1.push(l(), f64::from(hb.system.load[0]));
        }
        let mut states = g(
            "imn_requests",
            "imn.requests",
            "{request}",
            "Requests in each state.",
        );
        let counts = self
            .request_states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for st in RequestState::ALL {
            let n = counts.iter().find(|c| c.0 == st).map_or(0, |c| c.1);
            states.push(vec![("state", st.as_str().to_string())], n as f64);
        }
        let per_target = |name, otel, unit, help, values: &GaugeVec| {
            let mut f = g(name, otel, unit, help);
            values.fill(&mut f);
            f
        };
        let loss = per_target(
            "imn_ping_loss_ratio",
            "imn.ping.loss",
            "1",
            "Share of ICMP echo requests unanswered in the last ping, per agent and target.",
            &self.ping_loss,
        );
        let ntp_offset = per_target(
            "imn_ntp_offset_seconds",
            "imn.ntp.offset",
            "s",
            "Offset of the server's clock from the agent's in the last NTP measurement (positive: the server is ahead).",
            &self.ntp_offset,
        );
        let trace_hops = per_target(
            "imn_traceroute_hops",
            "imn.traceroute.hops",
            "{hop}",
            "Hops of the last traceroute, per agent and target.",
            &self.trace_hops,
        );
        let trace_reached = per_target(
            "imn_traceroute_destination_reached",
            "imn.traceroute.destination_reached",
            "1",
            "1 when the last traceroute reached its destination.",
            &self.trace_reached,
        );
        vec![
            g(
                "imn_agents_known",
                "imn.agents.known",
                "{agent}",
                "Agents the backend has heard from.",
            )
            .value(agents.len() as f64),
            g(
                "imn_agents_alive",
                "imn.agents.alive",
                "{agent}",
                "Agents heard from within three heartbeat intervals.",
            )
            .value(alive as f64),
            up,
            depth,
            oldest,
            dropped,
            cpu,
            mem_used,
            mem_total,
            load1,
            states,
            loss,
            ntp_offset,
            trace_hops,
            trace_reached,
        ]
    }

    /// The instruments with state, in the text format.
    pub fn write(&self, e: &mut Exposition) {
        self.results_ingested.write(e);
        self.ingest_lag.write(e);
        self.errors.write(e);
        self.ping_rtt.write(e);
        self.tcping_connect.write(e);
        self.dns_rt.write(e);
        self.http_total.write(e);
    }
}

/// The label names of the last-value gauges.
const AGENT_TARGET: &[&str] = &["agent", "target"];

/// The `module` label of a result: the catalog's name for it, or `other` for a name the
/// catalog does not know (an agent chooses the name it reports).
fn module_label(module: &str) -> &'static str {
    imn_proto::catalog::find(module).map_or("other", |m| m.name)
}

/// The `target` label of an HTTP result: `scheme://host[:port]/path` of its URL, without
/// user information, query or fragment (they can carry secrets and make every request a
/// new series). The instrument caps the length.
fn url_label(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path = if path.is_empty() { "/" } else { path };
    match scheme {
        Some(s) => format!("{}://{host}{path}", s.to_ascii_lowercase()),
        None => format!("{host}{path}"),
    }
}

/// Builds a span that started and ended at given times.
#[allow(clippy::too_many_arguments)]
fn span_at(
    c: Component,
    name: String,
    kind: SpanKind,
    parent: &Context,
    start_ms: i64,
    end_ms: i64,
    attrs: Vec<KeyValue>,
    error: Option<String>,
) -> Option<Context> {
    let tracer = telemetry::tracer(c)?;
    let mut span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(at_ms(start_ms))
        .with_attributes(attrs)
        .start_with_context(tracer, parent);
    if let Some(e) = error {
        span.set_status(Status::error(e));
    }
    span.end_with_timestamp(at_ms(end_ms.max(start_ms)));
    Some(parent.with_remote_span_context(span.span_context().clone()))
}

/// The spans of one stored result that came back with a trace context (see the
/// module doc): the agent's command and module run, the outbox wait, the store. Logs
/// `result stored` in the trace.
pub fn trace_result(
    agent: &str,
    r: &wire::ModuleResult,
    traceparent: &str,
    arrived_ms: i64,
    stored_ms: i64,
) {
    if telemetry::tracer(Component::Backend).is_none() {
        return;
    }
    let Some(parent) = telemetry::context_from(traceparent) else {
        return;
    };
    let error = match &r.outcome {
        ModuleOutcome::Ok(_) => None,
        ModuleOutcome::Failed(e) => Some(e.clone()),
        ModuleOutcome::Timeout => Some("timeout".to_string()),
    };
    let outcome = match &r.outcome {
        ModuleOutcome::Ok(_) => "succeeded",
        ModuleOutcome::Failed(_) => "failed",
        ModuleOutcome::Timeout => "timeout",
    };
    let attrs = || {
        vec![
            KeyValue::new("imn.agent.id", agent.to_string()),
            KeyValue::new("imn.request.id", r.request_id.clone()),
            KeyValue::new("imn.module", r.module.clone()),
        ]
    };
    let mut cmd_attrs = attrs();
    cmd_attrs.push(KeyValue::new("imn.outcome", outcome));
    cmd_attrs.push(KeyValue::new("imn.agent.received_ms", r.received_ms));
    cmd_attrs.push(KeyValue::new("imn.agent.started_ms", r.started_ms));
    cmd_attrs.push(KeyValue::new("imn.agent.finished_ms", r.finished_ms));
    if let Some(cmd) = span_at(
        Component::Agent,
        format!("agent command {}", r.module),
        SpanKind::Consumer,
        &parent,
        r.received_ms,
        r.finished_ms,
        cmd_attrs,
        error.clone(),
    ) {
        span_at(
            Component::Agent,
            format!("module run {}", r.module),
            SpanKind::Internal,
            &cmd,
            r.started_ms,
            r.finished_ms,
            attrs(),
            error,
        );
    }
    span_at(
        Component::Agent,
        "outbox wait".into(),
        SpanKind::Internal,
        &parent,
        r.finished_ms,
        arrived_ms,
        attrs(),
        None,
    );
    if let Some(stored) = span_at(
        Component::Backend,
        "store result".into(),
        SpanKind::Consumer,
        &parent,
        arrived_ms,
        stored_ms,
        attrs(),
        None,
    ) {
        let _attached = stored.attach();
        tracing::info!(
            %agent,
            request = %r.request_id,
            module = %r.module,
            outcome,
            "result stored"
        );
    }
}

/// Starts a `dispatch` span for a request's command under the request's trace. Returns
/// the context to hand on (`None` when the request has no trace).
pub fn dispatch_span(
    req_traceparent: Option<&str>,
    agent: &str,
    request_id: &str,
    module: &str,
) -> Option<Context> {
    let parent = telemetry::context_from(req_traceparent?)?;
    let Some(tracer) = telemetry::tracer(Component::Backend) else {
        // Not recording: hand the request's own context on, so components that do
        // record still join its trace.
        return Some(parent);
    };
    let span = tracer
        .span_builder(format!("dispatch {module}"))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new(
                "messaging.destination.name",
                wire::subject(wire::Kind::Cmd, agent),
            ),
            KeyValue::new("imn.agent.id", agent.to_string()),
            KeyValue::new("imn.request.id", request_id.to_string()),
            KeyValue::new("imn.module", module.to_string()),
        ])
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// Ends a span started by [`dispatch_span`], with an error if the bus refused.
pub fn end_dispatch(cx: Option<Context>, error: Option<&str>) {
    let Some(cx) = cx else { return };
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_cloud::telemetry::prom::{MAX_LABEL_BYTES, MAX_SERIES_PER_AGENT};
    use imn_proto::results::{PingOutput, PingResult};
    use serde_json::json;

    /// What one agent can put into the exposition of one instrument: 64 series of at
    /// most 22 lines (a histogram of 19 buckets: the buckets, `+Inf`, `_sum` and
    /// `_count`) of at most 512 bytes each (a name, a 64-byte agent id, a target capped
    /// at 128 bytes that escaping can double, `le` and a value). 704 KiB; measured under
    /// the bomb: about 300 kB for the ping histogram.
    const BOMB_BOUND_BYTES: usize = MAX_SERIES_PER_AGENT * 22 * 512;

    fn result(module: &str, output: ModuleOutput) -> wire::ModuleResult {
        wire::ModuleResult {
            request_id: "r".into(),
            module: module.into(),
            received_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            outcome: ModuleOutcome::Ok(output),
        }
    }

    fn ping(hosts: &[&str]) -> wire::ModuleResult {
        let targets = hosts
            .iter()
            .map(|h| {
                let mut t = PingResult::new(h, "192.0.2.1", 56);
                t.sent = 2;
                t.received = 1;
                t.rtts_ms = vec![Some(1.5), None];
                t.loss_pct = 50.0;
                t
            })
            .collect();
        result(
            "ping_module",
            ModuleOutput::Ping(PingOutput {
                socket: "dgram".into(),
                src_addr: None,
                targets,
            }),
        )
    }

    fn tcping(host: &str) -> wire::ModuleResult {
        let r = serde_json::from_value(json!({
            "host": host, "addr": "192.0.2.1", "port": 443, "sent": 1, "open": 1,
            "attempts": [{"outcome": "open", "connect_ms": 2.0}],
            "loss_pct": 0.0, "availability_pct": 100.0,
        }))
        .unwrap();
        result("tcping", ModuleOutput::Tcping(r))
    }

    fn dns(server: &str) -> wire::ModuleResult {
        let r = serde_json::from_value(json!({
            "server": server, "port": 53, "server_source": "params", "protocol": "udp",
            "tcp_after_truncation": false, "qname": "example.net.", "qtype": "A",
            "qclass": "IN", "qbuf": "", "attempts": 1, "timeout_ms": 1000,
            "reply": {"rt_ms": 3.0, "size": 40, "abuf": ""},
        }))
        .unwrap();
        result("dns", ModuleOutput::Dns(Box::new(r)))
    }

    fn http(url: &str) -> wire::ModuleResult {
        let r = serde_json::from_value(json!({
            "url": url, "method": "GET", "timing": {"total_ms": 12.0}, "redirects": [],
        }))
        .unwrap();
        result("http", ModuleOutput::Http(Box::new(r)))
    }

    fn ntp(host: &str) -> wire::ModuleResult {
        let r = serde_json::from_value(json!({
            "host": host, "addr": "192.0.2.1", "port": 123, "version": 4, "packets": [],
            "sent": 1, "received": 1, "offset_ms": 1.5, "rx_timestamps": "",
        }))
        .unwrap();
        result("ntp", ModuleOutput::Ntp(Box::new(r)))
    }

    fn traceroute(host: &str) -> wire::ModuleResult {
        let r = serde_json::from_value(json!({
            "host": host, "dst_addr": "192.0.2.1", "src_addr": "192.0.2.2", "af": 4,
            "protocol": "icmp", "port": 0, "src_port": 0, "icmp_checksum": 0,
            "paris_id": 0, "size": 48, "first_ttl": 1, "max_ttl": 30,
            "probes_per_hop": 3, "timeout_ms": 1000, "destination_reached": true,
            "stop_reason": "destination", "hops": [{"ttl": 1, "probes": [null]}],
            "started_ms": 0, "duration_ms": 5.0,
        }))
        .unwrap();
        result("traceroute", ModuleOutput::Traceroute(Box::new(r)))
    }

    /// A 10 kB host name, distinct for each `i`.
    fn long_host(i: usize) -> String {
        format!("{i:08}.{}", "h".repeat(10_000))
    }

    fn text(f: impl FnOnce(&mut Exposition)) -> String {
        let mut e = Exposition::new();
        f(&mut e);
        e.finish()
    }

    /// The bytes of the exposition lines about agent `evil`.
    fn bytes_of_evil(page: &str) -> usize {
        page.lines()
            .filter(|l| l.contains(r#"agent="evil""#))
            .map(|l| l.len() + 1)
            .sum()
    }

    /// The label bomb (issue 23): one enrolled agent reports 100,000 distinct 10 kB ping
    /// hosts. The ping histogram and the loss gauge keep 64 series of capped labels, and
    /// their exposition stays under BOMB_BOUND_BYTES.
    #[test]
    fn a_ping_label_bomb_from_one_agent_stays_bounded() {
        let m = Metrics::new();
        m.result("good", &ping(&["example.net", "192.0.2.7"]), 1);
        for batch in 0..1_000 {
            let hosts: Vec<String> = (0..100).map(|i| long_host(batch * 100 + i)).collect();
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            m.result("evil", &ping(&hosts), 1);
        }
        assert_eq!(m.ping_rtt.len(), MAX_SERIES_PER_AGENT + 2);
        assert_eq!(m.ping_loss.len(), MAX_SERIES_PER_AGENT + 2);
        let hist = text(|e| m.ping_rtt.write(e));
        let loss = m
            .families(&[], 0)
            .into_iter()
            .find(|f| f.name == "imn_ping_loss_ratio")
            .unwrap();
        let loss = text(|e| loss.write(e));
        eprintln!(
            "ping label bomb: imn_ping_rtt_seconds {} bytes ({} from the bomb), \
             imn_ping_loss_ratio {} bytes; bound {BOMB_BOUND_BYTES} per agent and instrument",
            hist.len(),
            bytes_of_evil(&hist),
            loss.len()
        );
        assert!(bytes_of_evil(&hist) <= BOMB_BOUND_BYTES, "{}", hist.len());
        assert!(bytes_of_evil(&loss) <= BOMB_BOUND_BYTES, "{}", loss.len());
        // The good agent's series are there, labels as given.
        assert_eq!(m.ping_rtt.count(&["good", "example.net"]), 1);
        assert!(loss.contains(r#"imn_ping_loss_ratio{agent="good",target="192.0.2.7"} 0.5"#));
        // No line carries a 10 kB label.
        for page in [&hist, &loss] {
            assert!(page.lines().all(|l| l.len() < 512));
        }
    }

    /// The same bomb on every other agent-chosen label: tcping, DNS and HTTP histograms,
    /// the NTP and traceroute gauges.
    #[test]
    fn every_target_label_is_capped_per_agent() {
        let m = Metrics::new();
        for i in 0..500 {
            let h = long_host(i);
            m.result("evil", &tcping(&h), 1);
            m.result("evil", &dns(&h), 1);
            m.result("evil", &http(&format!("https://{h}/x")), 1);
            m.result("evil", &ntp(&h), 1);
            m.result("evil", &traceroute(&h), 1);
        }
        for (name, n) in [
            ("tcping", m.tcping_connect.len()),
            ("dns", m.dns_rt.len()),
            ("http", m.http_total.len()),
            ("ntp", m.ntp_offset.len()),
            ("trace_hops", m.trace_hops.len()),
            ("trace_reached", m.trace_reached.len()),
        ] {
            assert_eq!(n, MAX_SERIES_PER_AGENT, "{name}");
        }
        let mut page = text(|e| m.write(e));
        for f in m.families(&[], 0) {
            page.push_str(&text(|e| f.write(e)));
        }
        eprintln!("every instrument bombed: {} bytes in all", page.len());
        assert!(page.len() <= 7 * BOMB_BOUND_BYTES, "{}", page.len());
        assert!(page.lines().all(|l| l.len() < 512));
    }

    /// Module names come from the catalog, or are `other`.
    #[test]
    fn the_module_label_is_a_catalog_name_or_other() {
        let m = Metrics::new();
        m.result("a", &ping(&["example.net"]), 1);
        for i in 0..1_000 {
            let mut r = ping(&[]);
            r.module = format!("bogus-{i}-{}", "m".repeat(10_000));
            m.result("a", &r, 1);
        }
        let page = text(|e| m.results_ingested.write(e));
        assert!(
            page.contains("imn_results_ingested_total{module=\"ping_module\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("imn_results_ingested_total{module=\"other\"} 1000\n"),
            "{page}"
        );
        assert_eq!(m.results_ingested.len(), 2);
        for spec in imn_proto::catalog::catalog() {
            assert_eq!(module_label(spec.name), spec.name);
        }
    }

    /// The HTTP target label is scheme://host[:port]/path: no user information, query
    /// or fragment; the path is capped with the rest.
    #[test]
    fn url_labels_carry_no_query_fragment_or_userinfo() {
        for (url, label) in [
            ("https://example.net/", "https://example.net/"),
            ("https://example.net", "https://example.net/"),
            (
                "HTTP://user:secret@example.net:8080/a/b?token=x#frag",
                "http://example.net:8080/a/b",
            ),
            ("https://example.net?q=1", "https://example.net/"),
            (
                "https://[2001:db8::1]:443/p#f",
                "https://[2001:db8::1]:443/p",
            ),
            ("https://a@b@example.net/p", "https://example.net/p"),
        ] {
            assert_eq!(url_label(url), label, "{url}");
        }
        let m = Metrics::new();
        m.result(
            "a",
            &http("https://u:pw@example.net/x?session=s3cr3t#top"),
            1,
        );
        let long = format!("https://example.net/{}?q=1", "p".repeat(10_000));
        m.result("a", &http(&long), 1);
        let page = text(|e| m.http_total.write(e));
        assert!(
            page.contains(r#"{agent="a",target="https://example.net/x",le="+Inf"} 1"#),
            "{page}"
        );
        assert!(!page.contains("s3cr3t") && !page.contains("pw@") && !page.contains("#top"));
        assert!(page.lines().all(|l| l.len() < 512), "the path is capped");
        assert_eq!(m.http_total.len(), 2);
        const { assert!(MAX_LABEL_BYTES < 512) };
    }

    /// A normal fleet: 300 agents with a few targets each keep every series, with the
    /// labels as given.
    #[test]
    fn a_normal_fleet_is_unaffected() {
        let m = Metrics::new();
        let hosts = ["example.net", "192.0.2.1", "2001:db8::1", "ntp.example.org"];
        for a in 0..300 {
            let agent = format!("agent-{a}");
            m.result(&agent, &ping(&hosts), 1);
            for h in hosts {
                m.result(&agent, &tcping(h), 1);
                m.result(&agent, &ntp(h), 1);
                m.result(&agent, &traceroute(h), 1);
                m.result(&agent, &http(&format!("https://{h}/health")), 1);
            }
        }
        for n in [
            m.ping_rtt.len(),
            m.ping_loss.len(),
            m.tcping_connect.len(),
            m.ntp_offset.len(),
            m.trace_hops.len(),
            m.http_total.len(),
        ] {
            assert_eq!(n, 300 * hosts.len());
        }
        assert_eq!(m.ping_rtt.count(&["agent-299", "2001:db8::1"]), 1);
        assert_eq!(m.tcping_connect.count(&["agent-0", "example.net:443"]), 1);
        assert_eq!(
            m.http_total
                .count(&["agent-5", "https://ntp.example.org/health"]),
            1
        );
        assert_eq!(m.results_ingested.get(&["ping_module"]), 300.0);
        assert_eq!(m.results_ingested.get(&["tcping"]), 1200.0);
    }
}
