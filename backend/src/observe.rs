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

use std::collections::HashMap;
use std::sync::Mutex;

use imn_bridge::telemetry::prom::{
    CounterVec, Exposition, Family, FamilyKind, HistogramVec, LAG_SECONDS, SECONDS,
};
use imn_bridge::telemetry::{self, at_ms, Component};
use imn_modules::results::{ModuleOutcome, ModuleOutput};
use imn_modules::wire::{self, RequestState};
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
    ping_loss: Mutex<HashMap<(String, String), f64>>,
    /// Last NTP offset (seconds, server ahead is positive) per (agent, server).
    ntp_offset: Mutex<HashMap<(String, String), f64>>,
    /// Hops of the last traceroute per (agent, target), and whether it arrived.
    trace_hops: Mutex<HashMap<(String, String), f64>>,
    trace_reached: Mutex<HashMap<(String, String), f64>>,
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
            ping_loss: Mutex::new(HashMap::new()),
            ntp_offset: Mutex::new(HashMap::new()),
            trace_hops: Mutex::new(HashMap::new()),
            trace_reached: Mutex::new(HashMap::new()),
            request_states: Mutex::new(Vec::new()),
        }
    }

    /// Metrics of one stored result.
    pub fn result(&self, agent: &str, r: &wire::ModuleResult, stored_ms: i64) {
        self.results_ingested.inc(&[&r.module]);
        self.ingest_lag
            .observe(&[], (stored_ms - r.finished_ms).max(0) as f64 / 1000.0);
        match &r.outcome {
            ModuleOutcome::Ok(ModuleOutput::Ping(p)) => {
                let mut loss = self.ping_loss.lock().unwrap_or_else(|e| e.into_inner());
                for t in &p.targets {
                    for ms in t.rtts_ms.iter().flatten() {
                        self.ping_rtt.observe(&[agent, &t.host], ms / 1000.0);
                    }
                    if t.sent > 0 {
                        remember(&mut loss, agent, &t.host, t.loss_pct / 100.0);
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
                        .observe(&[agent, &h.url], h.timing.total_ms / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Ntp(n)) => {
                if let Some(offset) = n.offset_ms {
                    let mut m = self.ntp_offset.lock().unwrap_or_else(|e| e.into_inner());
                    remember(&mut m, agent, &n.host, offset / 1000.0);
                }
            }
            ModuleOutcome::Ok(ModuleOutput::Traceroute(t)) => {
                let mut hops = self.trace_hops.lock().unwrap_or_else(|e| e.into_inner());
                remember(&mut hops, agent, &t.host, t.hops.len() as f64);
                let mut reached = self.trace_reached.lock().unwrap_or_else(|e| e.into_inner());
                let v = if t.destination_reached { 1.0 } else { 0.0 };
                remember(&mut reached, agent, &t.host, v);
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
        let per_target = |name, otel, unit, help, map: &Mutex<HashMap<(String, String), f64>>| {
            let mut f = g(name, otel, unit, help);
            let m = map.lock().unwrap_or_else(|e| e.into_inner());
            let mut rows: Vec<_> = m.iter().collect();
            rows.sort_by(|a, b| a.0.cmp(b.0));
            for ((agent, target), v) in rows {
                f.push(
                    vec![("agent", agent.clone()), ("target", target.clone())],
                    *v,
                );
            }
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

/// Sets the last value of an (agent, target) series, within the series cap.
fn remember(m: &mut HashMap<(String, String), f64>, agent: &str, target: &str, v: f64) {
    let key = (agent.to_string(), target.to_string());
    if m.len() < imn_bridge::telemetry::prom::MAX_SERIES || m.contains_key(&key) {
        m.insert(key, v);
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
