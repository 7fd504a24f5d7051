//! The REST API, with the original system's routes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imn_modules::{catalog, now_ms};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::AgentEntry;
use crate::security::Scope;
use crate::service::Backend;
use crate::store::{RequestRow, ResultRow};

/// The longest `?wait` honoured, in seconds.
pub const MAX_WAIT_S: f64 = 300.0;

pub fn router(backend: Arc<Backend>) -> Router {
    let mut r = Router::new()
        .route("/", get(crate::ui::dashboard))
        .route("/ui/{file}", get(crate::ui::asset))
        .route("/docs", get(crate::ui::docs))
        .route("/openapi.json", get(openapi))
        .route("/health", get(health))
        .route("/livez", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/agents", get(agents))
        .route("/agents/alive", get(agents_alive))
        .route("/agents/{id}", get(agent))
        .route("/agents/{id}/results", get(results))
        .route("/agents/{id}/status", get(status_history))
        .route("/agents/{id}/events", get(events))
        .route("/agents/{id}/heartbeats", get(heartbeats))
        .route("/agents/{id}/results/{request_id}", get(result))
        .route(
            "/agents/{id}/modules/{module}",
            axum::routing::put(load_module).delete(unload_module),
        )
        .route("/agent/{id}/{module}", post(submit))
        .route("/modules", get(modules))
        .route("/v1/measurements", post(create_measurement))
        .route(
            "/v1/measurements/{id}",
            get(measurement).delete(stop_measurement),
        )
        .route("/v1/results", get(results_v1))
        .route("/v1/results/stream", get(results_stream))
        .route("/v1/measurements/{id}/stream", get(measurement_stream))
        .route("/modules/states/{request_id}", get(states))
        .route("/admin/agents", get(enrolled_agents).post(enroll_agent))
        .route("/admin/agents/{id}/rotate", post(rotate_agent))
        .route("/admin/agents/{id}/revoke", post(revoke_agent))
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/tokens", get(tokens).post(create_token))
        .route("/admin/tokens/{id}/rotate", post(rotate_token))
        .route("/admin/tokens/{id}/revoke", post(revoke_token));
    if backend.fault_injection {
        r = r.route("/debug/hold-acks", post(hold_acks));
    }
    let limit = backend.security.limits.max_body_bytes;
    r.fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(backend.clone(), guard))
        .layer(axum::middleware::from_fn(trace_request))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(backend)
}

/// The scope a route needs: `admin` for /admin and /debug, `measure` for every other
/// change, `read` for the rest. `/livez` is open, for load balancers.
fn required_scope(method: &axum::http::Method, path: &str) -> Option<Scope> {
    // The dashboard's page and assets, and the API's description, hold no data: a
    // browser loads them before the user enters a token. Every call they make is
    // checked as usual.
    let public =
        matches!(path, "/livez" | "/" | "/docs" | "/openapi.json") || path.starts_with("/ui/");
    if public && (method == axum::http::Method::GET || method == axum::http::Method::HEAD) {
        return None;
    }
    if path.starts_with("/admin/") || path == "/admin" || path.starts_with("/debug/") {
        return Some(Scope::Admin);
    }
    // Loading, unloading and configuring modules on an agent are an operator's
    // settings (a module's max_rate, its defaults), not a measurement.
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method != axum::http::Method::GET
        && method != axum::http::Method::HEAD
        && matches!(segments.as_slice(), ["agents", _, "modules", _])
    {
        return Some(Scope::Admin);
    }
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        Some(Scope::Read)
    } else {
        Some(Scope::Measure)
    }
}

/// Authentication, scopes and rate limits (when auth is on), and the body limit: a
/// body over `max_body_bytes` gets a JSON 413 naming the limit, whether the client
/// declared its length or not.
/// The trace context of an API request: its server span when tracing is on, else the
/// caller's `traceparent` (so components that do record still join the caller's trace).
#[derive(Clone)]
pub struct RequestTrace(pub opentelemetry::Context);

/// Starts the trace of every API request but the probes and scrapes: a server span,
/// child of the caller's `traceparent` if it sent one. Handlers read it as
/// [`RequestTrace`]; the span ends when the response is ready (with `?wait`, after the
/// result came back).
async fn trace_request(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use imn_cloud::telemetry::{self, Component};
    use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
    use opentelemetry::KeyValue;
    let path = req.uri().path().to_string();
    if matches!(path.as_str(), "/metrics" | "/livez" | "/health") {
        return next.run(req).await;
    }
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(telemetry::context_from)
        .unwrap_or_default();
    let Some(tracer) = telemetry::tracer(Component::Backend) else {
        req.extensions_mut().insert(RequestTrace(parent));
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let method = req.method().to_string();
    let span = tracer
        .span_builder(format!("{method} {route}"))
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("http.request.method", method.clone()),
            KeyValue::new("http.route", route.clone()),
            KeyValue::new("url.path", path),
        ])
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    req.extensions_mut().insert(RequestTrace(cx.clone()));
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let span = cx.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if status >= 500 {
        span.set_status(Status::error(format!("HTTP {status}")));
    }
    {
        let _attached = cx.clone().attach();
        tracing::debug!(%method, %route, status, "api request");
    }
    span.end();
    resp
}

/// `/metrics`: the Prometheus text format.
async fn metrics(State(b): State<Arc<Backend>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            imn_cloud::telemetry::prom::CONTENT_TYPE,
        )],
        b.prometheus().await,
    )
        .into_response()
}

async fn guard(
    State(b): State<Arc<Backend>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = b.security.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::BodyTooLarge { limit }.into_response();
    }
    if let Err(e) = browser_check(&req, b.security.enabled()) {
        return e.into_response();
    }
    if let Some(scope) = required_scope(req.method(), req.uri().path()) {
        let bearer = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
        match b.security.authorize(bearer, scope) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(e) => return e.into_response(),
        }
    }
    let resp = next.run(req).await;
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE
        && resp.headers().get(axum::http::header::CONTENT_TYPE)
            != Some(&axum::http::HeaderValue::from_static("application/json"))
    {
        return ApiError::BodyTooLarge { limit }.into_response();
    }
    resp
}

/// The host part of a `Host` value or URL authority, without the port or brackets.
fn host_only(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// What a browser could be made to do. A page on another site can have a browser send
/// requests here (cross-site request forgery), and a name that an attacker points at
/// 127.0.0.1 makes them same-origin (DNS rebinding). Tokens stop both when auth is on
/// (a browser does not hold them); in any case:
/// - a change (any method but GET, HEAD, OPTIONS) whose `Origin` is not this server is
///   refused (403, rule `origin`);
/// - without auth, `Host` must be an IP address or `localhost` (403, rule `host`): a
///   name could be rebound.
fn browser_check(req: &axum::extract::Request, auth: bool) -> Result<(), ApiError> {
    use axum::http::Method;
    let headers = req.headers();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let change = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if let (true, Some(origin)) = (change, headers.get(axum::http::header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin.split_once("://").map(|(_, a)| a);
        let same = match (authority, host) {
            (Some(a), Some(h)) => a.eq_ignore_ascii_case(h),
            _ => false,
        };
        if !same {
            return Err(ApiError::Forbidden {
                rule: "origin".into(),
                message: format!(
                    "cross-origin change refused: Origin {origin:?} is not this server ({})",
                    host.unwrap_or("no Host")
                ),
            });
        }
    }
    if !auth {
        if let Some(h) = host {
            let name = host_only(h);
            if name.parse::<std::net::IpAddr>().is_err() && !name.eq_ignore_ascii_case("localhost")
            {
                return Err(ApiError::Forbidden {
                    rule: "host".into(),
                    message: format!(
                        "Host {h:?}: without --auth this API answers only to an IP address or localhost (a name could be rebound to this machine by a web page); use the address, or run with --auth"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// UTC RFC 3339 with milliseconds.
pub fn rfc3339(ms: i64) -> Value {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000);
    match t.ok().and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    }) {
        Some(s) => Value::String(s),
        None => Value::Null,
    }
}

fn agent_json(a: &AgentEntry, now: i64) -> Value {
    // Outbox figures come from whichever the agent sent last: a hello after a
    // reconnect supersedes the heartbeat from before it.
    let hb = a
        .last_heartbeat
        .as_ref()
        .filter(|h| h.sent_at_ms >= a.hello.sent_at_ms);
    json!({
        "id": a.id,
        "alive": a.alive(now),
        "status": if a.online { "online" } else { "offline" },
        "first_seen": rfc3339(a.first_seen_ms),
        "last_seen": rfc3339(a.last_seen_ms),
        "version": a.hello.version,
        "arch": a.hello.arch,
        "tags": a.hello.tags,
        "location": a.hello.location,
        "modules": a.hello.modules,
        "heartbeat_interval_ms": a.hello.heartbeat_interval_ms,
        // The version of the recurring-measurement set the agent runs.
        "schedule_version": a.hello.schedule_version,
        // What the agent does beyond wire version 1 (it checks every address against
        // the policy, enforces its budget, refuses stale commands), and its budget
        // across runs (zeros: an agent too old to say).
        "features": a.hello.features,
        "limits": a.hello.limits,
        "wire_version": a.wire_version,
        // Unknown (null) between a reconnect and the agent's next hello or heartbeat.
        "outbox": if a.hello_pending {
            json!({"epoch": null, "depth": null, "oldest_age_ms": null, "dropped": null, "condition": null})
        } else {
            json!({
                "epoch": a.hello.outbox_epoch,
                "depth": hb.map(|h| h.outbox_depth).unwrap_or(a.hello.outbox_depth),
                "oldest_age_ms": hb.map(|h| h.outbox_oldest_age_ms),
                "dropped": hb.map(|h| h.dropped).unwrap_or(a.hello.dropped),
                "condition": hb.and_then(|h| h.outbox_condition.clone()),
            })
        },
        "heartbeat": a.last_heartbeat,
        "heartbeat_lag_ms": a.heartbeat_lag_ms,
    })
}

async fn health(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = now_ms();
    let all = b.registry.all();
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "agents_known": all.len(),
        "agents_alive": all.iter().filter(|a| a.alive(now)).count(),
        "records_stored": b.store.record_count().await?,
        "duplicates_dropped": b.stats.duplicates_dropped.load(Relaxed),
        "run_duplicates_dropped": b.stats.run_duplicates_dropped.load(Relaxed),
        "undecodable_messages": b.stats.undecodable.load(Relaxed),
        "store_errors": b.stats.store_errors.load(Relaxed),
        "acks_sent": b.stats.acks_sent.load(Relaxed),
        "store_groups": b.stats.store_groups.load(Relaxed),
        "store_busy_ms": b.stats.store_busy_us.load(Relaxed) / 1000,
        // Records the store could not take, kept with their reason
        // (GET /admin/dead-letters); counted over the store's life.
        "dead_letters": b.store.dead_letter_count().await?,
        // Result streams, and the store reads they cost: one shared read per commit
        // however many are open, plus each stream's own while it catches up.
        "streams": {
            "open": b.feed.open_streams(),
            "shared_reads": b.feed.shared_reads.load(Relaxed),
            "catch_up_reads": b.feed.catch_up_reads.load(Relaxed),
        },
        "ingest": {
            "shed": b.stats.shed.load(Relaxed),
            "hellos_throttled": b.stats.hellos_throttled.load(Relaxed),
            "events_deferred": b.stats.events_deferred.load(Relaxed),
            "dead_lettered": b.stats.dead_lettered.load(Relaxed),
            "records_refused": b.stats.records_refused.load(Relaxed),
        },
        "rejected": *b.stats.rejected.lock().unwrap_or_else(|e| e.into_inner()),
        "bridge": b.bridge_stats.get().map(|s| s.health()),
        "auth": ({
            let a = &b.security.bridge().stats;
            json!({
                "enabled": b.security.enabled(),
                "logins_refused": a.logins_refused.load(Relaxed),
                "publish_denied": a.publish_denied.load(Relaxed),
                "subscribe_denied": a.subscribe_denied.load(Relaxed),
                "will_denied": a.will_denied.load(Relaxed),
                "unsigned_or_forged": a.unsigned_or_forged.load(Relaxed),
            })
        }),
    })))
}

/// `GET /agents?tag=a,b&country=&asn=&alive=&limit=`: every agent, or those matching.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    /// Comma-separated; the agent has them all.
    tag: Option<String>,
    country: Option<String>,
    asn: Option<u32>,
    alive: Option<bool>,
    limit: Option<usize>,
}

async fn agents(State(b): State<Arc<Backend>>, Query(q): Query<AgentQuery>) -> Json<Value> {
    let now = now_ms();
    let sel = crate::fleet::Selection {
        tags: q
            .tag
            .map(|t| {
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        country: q.country,
        asn: q.asn,
        alive: q.alive,
        limit: q.limit,
        ..Default::default()
    };
    Json(Value::Array(
        b.select(&sel, now)
            .iter()
            .map(|a| {
                let mut v = agent_json(a, now);
                v["tags"] = json!(b.agent_tags(a));
                v
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    /// Seconds back from now for the intervals and the uptime (default a day).
    window_s: Option<u64>,
}

/// `GET /agents/{id}/status?window_s=`: connection history like a RIPE Atlas probe's:
/// connected and disconnected intervals, first and last connection, the current status
/// and since when, and uptime over the window.
async fn status_history(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Value>, ApiError> {
    let a = b
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::UnknownAgent(id.clone()))?;
    let window_s = q.window_s.unwrap_or(86_400);
    if !(1..=366 * 86_400).contains(&window_s) {
        return Err(ApiError::BadQuery {
            field: "window_s".into(),
            rule: "range".into(),
            message: format!("window_s: must be 1 to {} (got {window_s})", 366 * 86_400),
        });
    }
    let now = now_ms();
    let from = now - window_s as i64 * 1000;
    let sessions = b.store.sessions(&id, from).await?;
    let mut up_ms = 0;
    let mut intervals = Vec::new();
    let mut prev_end = from;
    for (start, end) in &sessions {
        let (s, e) = ((*start).max(from), end.unwrap_or(now).min(now));
        if *start > prev_end {
            intervals.push(json!({"status": "disconnected", "from": rfc3339(prev_end), "until": rfc3339(*start)}));
        }
        up_ms += (e - s).max(0);
        intervals.push(json!({
            "status": "connected",
            "from": rfc3339(*start),
            "until": end.map(rfc3339),
        }));
        prev_end = end.unwrap_or(now);
    }
    let connected = a.alive(now);
    if !connected && prev_end < now {
        intervals.push(json!({"status": "disconnected", "from": rfc3339(prev_end), "until": null}));
    }
    let since = match (connected, sessions.last()) {
        (true, Some((start, None))) => Some(*start),
        (false, Some((_, Some(end)))) => Some(*end),
        _ => None,
    };
    Ok(Json(json!({
        "agent_id": id,
        "status": if connected { "connected" } else { "disconnected" },
        "status_since": since.map(rfc3339),
        "first_connected": b.store.first_connected(&id).await?.map(rfc3339),
        "last_connected": sessions.last().map(|s| rfc3339(s.0)),
        "window_s": window_s,
        "uptime_pct": (up_ms as f64 * 100.0 / (window_s as f64 * 1000.0)).min(100.0),
        "intervals": intervals,
    })))
}

/// `POST /v1/measurements`: 202 with the agents chosen, and `Location`.
async fn create_measurement(
    State(b): State<Arc<Backend>>,
    caller: CallerExt,
    trace: Option<axum::Extension<RequestTrace>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let m: crate::fleet::NewMeasurement =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let tp = trace.and_then(|t| imn_cloud::telemetry::traceparent(&t.0 .0));
    let c = crate::fleet::create(&b, m, tp, caller_of(caller)).await?;
    let location = format!("/v1/measurements/{}", c.id);
    let refused: Vec<Value> = c
        .refused
        .iter()
        .map(|(a, e)| json!({"agent_id": a, "status": e.status().as_u16(), "error": e.to_string()}))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        [("location", location.clone())],
        Json(json!({
            "id": c.id,
            "location": location,
            "agents": c.agents,
            "refused": refused,
        })),
    )
        .into_response())
}

async fn stop_measurement(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    caller: CallerExt,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::fleet::stop(&b, &id, &caller_of(caller)).await?))
}

async fn measurement(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::fleet::status(&b, &id).await?))
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

/// `GET /agents/{id}/heartbeats`: the agent's recent heartbeats, oldest first, for
/// charts (kept in memory, [`crate::registry::HEARTBEAT_HISTORY`] per agent).
async fn heartbeats(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    Ok(Json(json!(b.registry.heartbeats(&id))))
}

async fn agents_alive(State(b): State<Arc<Backend>>) -> Json<Value> {
    let now = now_ms();
    Json(Value::Array(
        b.registry
            .all()
            .iter()
            .filter(|a| a.alive(now))
            .map(|a| agent_json(a, now))
            .collect(),
    ))
}

async fn agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let a = b
        .registry
        .get(&id)
        .ok_or(ApiError::UnknownAgent(id.clone()))?;
    let mut body = agent_json(&a, now_ms());
    body["records_stored"] = json!(b.store.agent_record_count(&id).await?);
    Ok(Json(body))
}

/// Events the agent reported (corrupt store, module restarts, module changes).
async fn events(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let rows = b
        .store
        .events(&id, q.limit.unwrap_or(100).min(10_000))
        .await?;
    Ok(Json(Value::Array(
        rows.into_iter()
            .map(|(at_ms, kind, message)| json!({"at": rfc3339(at_ms), "kind": kind, "message": message}))
            .collect(),
    )))
}

fn result_json(r: &ResultRow) -> Value {
    let mut v = json!({
        "request_id": r.request_id,
        "agent_id": r.agent_id,
        "module": r.module,
        "state": r.state.as_str(),
        "result": r.result,
        "error": r.error,
        "received_at": rfc3339(r.received_ms),
        "started_at": rfc3339(r.started_ms),
        "finished_at": rfc3339(r.finished_ms),
        "stored_at": rfc3339(r.stored_ms),
        "record": {"epoch": r.epoch, "seq": r.seq},
    });
    if let Some(ms) = r.scheduled_ms {
        v["scheduled_at"] = rfc3339(ms);
    }
    v
}

#[derive(Deserialize)]
struct ResultsQuery {
    limit: Option<u32>,
    /// `atlas` for RIPE Atlas's result format (the modules in `atlas::MODULES`).
    format: Option<String>,
}

/// Whether the caller asked for Atlas format; any other value is an error.
fn wants_atlas(format: &Option<String>) -> Result<bool, ApiError> {
    match format.as_deref() {
        None | Some("native") => Ok(false),
        Some("atlas") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "format: must be native or atlas, got {other:?}"
        ))),
    }
}

async fn results(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let atlas = wants_atlas(&q.format)?;
    let rows = b
        .store
        .results(&id, q.limit.unwrap_or(100).min(10_000))
        .await?;
    if atlas {
        // Atlas defines no format for the other modules; they are left out.
        let all = rows
            .iter()
            .filter_map(crate::atlas::convert)
            .flatten()
            .collect();
        return Ok(Json(Value::Array(all)));
    }
    Ok(Json(Value::Array(rows.iter().map(result_json).collect())))
}

async fn result(
    State(b): State<Arc<Backend>>,
    Path((id, request_id)): Path<(String, String)>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let atlas = wants_atlas(&q.format)?;
    match b.store.result(&id, &request_id).await? {
        Some(r) if atlas => crate::atlas::convert(&r)
            .map(|v| Json(Value::Array(v)))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "format: RIPE Atlas defines no format for {} results; atlas is for {}",
                    r.module,
                    crate::atlas::MODULES.join(", ")
                ))
            }),
        Some(r) => Ok(Json(result_json(&r))),
        None => {
            let state = b
                .store
                .request(&request_id)
                .await?
                .filter(|r| r.agent_id == id);
            Err(ApiError::NotFound(match state {
                Some(r) => format!(
                    "request {request_id} has no result yet (state: {})",
                    r.state.as_str()
                ),
                None => format!("agent {id} has no request {request_id}"),
            }))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsV1Query {
    agent: Option<String>,
    module: Option<String>,
    measurement: Option<String>,
    /// RFC 3339, or ms since the epoch; the agent's time of the result.
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    /// `next_cursor` of the page before.
    cursor: Option<String>,
    format: Option<String>,
}

/// A time in a query: RFC 3339 or ms since the epoch.
fn time_param(field: &'static str, v: Option<String>) -> Result<Option<i64>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    time::OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
        .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|_| ApiError::BadQuery {
            field: field.into(),
            rule: "format".into(),
            message: format!("{field}: must be RFC 3339 or ms since the epoch (got {v:?})"),
        })
}

/// `GET /v1/results?agent=&module=&measurement=&since=&until=&limit=&cursor=&format=`:
/// results in the order they were stored, a page at a time. `next_cursor` continues
/// after the last result of the page; results stored meanwhile come after it, so
/// paging returns each result once, and a client at the end can keep asking with the
/// same cursor for new ones.
async fn results_v1(
    State(b): State<Arc<Backend>>,
    Query(q): Query<ResultsV1Query>,
) -> Result<Json<Value>, ApiError> {
    let atlas = wants_atlas(&q.format)?;
    let after = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => parse_cursor(c)?,
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadQuery {
            field: "limit".into(),
            rule: "range".into(),
            message: format!("limit: must be 1 to 1000 (got {limit})"),
        });
    }
    let rows = b
        .store
        .results_page(crate::store::ResultFilter {
            agent: q.agent,
            module: q.module,
            measurement: q.measurement,
            since_ms: time_param("since", q.since)?,
            until_ms: time_param("until", q.until)?,
            after,
            limit,
        })
        .await?;
    let next = rows.last().map_or(after, |r| r.0);
    let results: Vec<Value> = if atlas {
        rows.iter()
            .filter_map(|(_, r, _)| crate::atlas::convert(r))
            .flatten()
            .collect()
    } else {
        rows.iter()
            .map(|(_, r, m)| result_v1_json(r, m.clone()))
            .collect()
    };
    Ok(Json(json!({
        "results": results,
        "next_cursor": format!("c{next}"),
        "more": rows.len() == limit as usize,
    })))
}

/// A result as a stream or a page shows it.
fn result_v1_json(r: &ResultRow, measurement: Option<String>) -> Value {
    let mut v = result_json(r);
    v["measurement_id"] = json!(measurement);
    v
}

/// Where a stream resumes: `Last-Event-ID` (what an EventSource sends on reconnect),
/// else `?cursor=`, else `default`.
fn stream_start(headers: &HeaderMap, cursor: Option<&str>, default: i64) -> Result<i64, ApiError> {
    let given = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(cursor)
        .filter(|c| !c.is_empty());
    match given {
        None => Ok(default),
        Some(c) => parse_cursor(c),
    }
}

/// A result's position from a cursor (or event id) this API gave out: `c` and a number.
pub(crate) fn parse_cursor(c: &str) -> Result<i64, ApiError> {
    c.strip_prefix('c')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::BadQuery {
            field: "cursor".into(),
            rule: "format".into(),
            message: format!("cursor: not a cursor (or event id) this API gave out (got {c:?})"),
        })
}

/// Results as Server-Sent Events: event `result`, id = the result's cursor, data = the
/// result's JSON. A client that reconnects with `Last-Event-ID` gets every result
/// stored after that one: none is missed, none repeated.
fn sse_results(
    b: Arc<Backend>,
    filter: crate::store::ResultFilter,
    slot: crate::feed::Slot,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let events = crate::feed::stream(b, filter, slot).map(|(pos, r, m)| {
        Ok(Event::default()
            .event("result")
            .id(format!("c{pos}"))
            .data(result_v1_json(&r, m).to_string()))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /v1/results/stream?agent=&module=&measurement=&cursor=`: results as they are
/// stored (from now, or after `Last-Event-ID` / `cursor`).
async fn results_stream(
    State(b): State<Arc<Backend>>,
    Query(q): Query<ResultsV1Query>,
    caller: CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if q.format.is_some() || q.limit.is_some() {
        return Err(ApiError::BadQuery {
            field: if q.format.is_some() {
                "format"
            } else {
                "limit"
            }
            .into(),
            rule: "unsupported".into(),
            message: "format and limit apply to pages, not to streams".into(),
        });
    }
    let now = b.store.latest_position().await?;
    let filter = crate::store::ResultFilter {
        agent: q.agent,
        module: q.module,
        measurement: q.measurement,
        since_ms: time_param("since", q.since)?,
        until_ms: time_param("until", q.until)?,
        after: stream_start(&headers, q.cursor.as_deref(), now)?,
        limit: 500,
    };
    let slot = b.feed.admit(&caller_of(caller))?;
    Ok(sse_results(b, filter, slot).into_response())
}

/// `GET /v1/measurements/{id}/stream`: the measurement's results, from the first.
async fn measurement_stream(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    caller: CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if b.store.measurement(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no measurement {id}")));
    }
    let filter = crate::store::ResultFilter {
        measurement: Some(id),
        after: stream_start(&headers, None, 0)?,
        limit: 500,
        ..Default::default()
    };
    let slot = b.feed.admit(&caller_of(caller))?;
    Ok(sse_results(b, filter, slot).into_response())
}

/// Body of `PUT /agents/{id}/modules/{module}`: optional settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ModuleSettings {
    /// Default parameters, merged under each request's own.
    defaults: Option<Value>,
    max_rate: Option<f64>,
    timeout_ms: Option<u64>,
}

/// Loads a module on an agent (and configures it, when the body has settings).
async fn load_module(
    State(b): State<Arc<Backend>>,
    Path((id, module)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    use imn_modules::wire::{CommandKind, ModuleConfig};
    if catalog::find(&module).is_none() {
        return Err(ApiError::UnknownModule {
            module,
            known: catalog::names().iter().map(|s| s.to_string()).collect(),
        });
    }
    let settings: ModuleSettings = if body.iter().all(|c| c.is_ascii_whitespace()) {
        ModuleSettings::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?
    };
    if let Some(d) = &settings.defaults {
        if !d.is_object() {
            return Err(ApiError::InvalidParams {
                field: "/defaults".into(),
                rule: "type".into(),
                message: "/defaults: must be a JSON object of parameters".into(),
            });
        }
    }
    if settings.max_rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(ApiError::InvalidParams {
            field: "/max_rate".into(),
            rule: "exclusiveMinimum".into(),
            message: "/max_rate: must be greater than 0".into(),
        });
    }
    let mut ids = vec![
        b.control(
            &id,
            CommandKind::Load {
                module: module.clone(),
            },
        )
        .await?,
    ];
    let config = ModuleConfig {
        defaults_json: settings.defaults.map(|d| d.to_string()),
        max_rate: settings.max_rate,
        timeout_ms: settings.timeout_ms,
    };
    if config != ModuleConfig::default() {
        ids.push(
            b.control(
                &id,
                CommandKind::Configure {
                    module: module.clone(),
                    config,
                },
            )
            .await?,
        );
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"agent_id": id, "module": module, "action": "load", "commands": ids})),
    )
        .into_response())
}

/// Unloads a module from an agent.
async fn unload_module(
    State(b): State<Arc<Backend>>,
    Path((id, module)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let cmd = b
        .control(
            &id,
            imn_modules::wire::CommandKind::Unload {
                module: module.clone(),
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"agent_id": id, "module": module, "action": "unload", "commands": [cmd]})),
    )
        .into_response())
}
fn request_json(r: &RequestRow) -> Value {
    let mut v = json!({
        "request_id": r.id,
        "agent_id": r.agent_id,
        "module": r.module,
        "state": r.state.as_str(),
    });
    // The trace to look the measurement up by, in any OTLP backend.
    if let Some(trace_id) = r.traceparent.as_deref().and_then(|t| t.split('-').nth(1)) {
        v["trace_id"] = json!(trace_id);
    }
    v
}

#[derive(Deserialize)]
struct SubmitQuery {
    /// Seconds to wait for a terminal state before answering.
    wait: Option<f64>,
    /// Seconds from now after which the request expires if no result came back
    /// (default 24 h); an agent that gets the command later does not run it.
    deadline: Option<f64>,
}

/// The longest deadline a request may have, in seconds (7 days).
const MAX_DEADLINE_S: f64 = 7.0 * 24.0 * 3600.0;

fn seconds_in(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if x.is_nan() || x < lo || x > hi => Err(ApiError::BadQuery {
            field: field.to_string(),
            rule: "range".to_string(),
            message: format!("{field} must be between {lo} and {hi} seconds, got {x}"),
        }),
        v => Ok(v),
    }
}

/// The caller the guard authenticated (without auth: an anonymous admin).
type CallerExt = Option<axum::Extension<crate::security::Caller>>;

fn caller_of(c: CallerExt) -> crate::security::Caller {
    c.map(|axum::Extension(c)| c).unwrap_or_default()
}

async fn submit(
    State(b): State<Arc<Backend>>,
    Path((id, module)): Path<(String, String)>,
    Query(q): Query<SubmitQuery>,
    caller: CallerExt,
    trace: Option<axum::Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 256)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1 to 256 visible ASCII characters".into(),
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    let wait = seconds_in("wait", q.wait, 0.0, MAX_WAIT_S)?;
    let deadline = seconds_in("deadline", q.deadline, 0.001, MAX_DEADLINE_S)?
        .map(Duration::from_secs_f64)
        .unwrap_or(crate::service::DEFAULT_DEADLINE);
    let submitted = b
        .submit(
            &id,
            &module,
            &body,
            crate::service::SubmitOptions {
                idempotency_key: key,
                deadline,
                waiter: wait.is_some(),
                traceparent: trace.and_then(|t| imn_cloud::telemetry::traceparent(&t.0 .0)),
                measurement_id: None,
                names: None,
                caller: caller_of(caller),
                prepaid: false,
            },
        )
        .await?;
    let mut req = submitted.request;
    let mut result = None;
    if let Some(w) = wait {
        let w = Duration::from_secs_f64(w);
        if !req.state.is_terminal() {
            match submitted.done {
                Some(rx) => b.wait_on(&req.id, rx, w).await,
                None => b.wait(&req.id, w).await,
            }
        }
        // One read for both: the state now, and the result if there is one.
        if let Some((now, r)) = b.store.request_and_result(&req.id).await? {
            req = now;
            result = r;
        }
    }
    let mut body = request_json(&req);
    if !submitted.new {
        body["idempotent_replay"] = json!(true);
    }
    if req.state.is_terminal() && wait.is_some() {
        if let Some(r) = result {
            body["result"] = r.result;
            body["error"] = json!(r.error);
        }
        return Ok((StatusCode::OK, Json(body)).into_response());
    }
    let location = format!("/modules/states/{}", req.id);
    Ok((StatusCode::ACCEPTED, [("location", location)], Json(body)).into_response())
}

async fn modules() -> Json<Value> {
    Json(Value::Array(
        catalog::catalog()
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "version": m.version,
                    "description": m.description,
                    "schema_hash": m.schema_hash(),
                    "schema": m.schema(),
                })
            })
            .collect(),
    ))
}

async fn states(
    State(b): State<Arc<Backend>>,
    Path(request_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = b
        .store
        .request(&request_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no request {request_id}")))?;
    let transitions = b.store.transitions(&request_id).await?;
    let mut body = request_json(&r);
    body["created_at"] = rfc3339(r.created_ms);
    body["updated_at"] = rfc3339(r.updated_ms);
    body["deadline"] = rfc3339(r.deadline_ms);
    body["transitions"] = Value::Array(
        transitions
            .iter()
            .map(|t| {
                json!({
                    "state": t.state.as_str(),
                    "at": rfc3339(t.at_ms),
                    "observer": t.observer,
                    "detail": t.detail,
                })
            })
            .collect(),
    );
    Ok(Json(body))
}

#[derive(Deserialize)]
struct OnOff {
    on: bool,
}

/// Fault injection (only with `--fault-injection`): store batches but hold acks back.
async fn hold_acks(State(b): State<Arc<Backend>>, Query(q): Query<OnOff>) -> Json<Value> {
    b.set_hold_acks(q.on);
    Json(json!({"hold_acks": q.on}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    agent: Option<String>,
    limit: Option<u32>,
}

/// `GET /admin/dead-letters?agent=&limit=`: records the store could not take, newest
/// first, each with the database's reason and its body as the agent sent it.
async fn dead_letters(
    State(b): State<Arc<Backend>>,
    Query(q): Query<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadQuery {
            field: "limit".into(),
            rule: "range".into(),
            message: format!("limit: must be 1 to 1000 (got {limit})"),
        });
    }
    let rows = b.store.dead_letters(q.agent.as_deref(), limit).await?;
    Ok(Json(Value::Array(
        rows.into_iter()
            .map(|d| {
                json!({
                    "agent_id": d.agent_id,
                    "record": {"epoch": d.epoch, "seq": d.seq},
                    "at": rfc3339(d.at_ms),
                    "kind": d.kind,
                    "reason": d.reason,
                    "body": d.body,
                    "stored_at": rfc3339(d.stored_ms),
                })
            })
            .collect(),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    id: String,
    #[serde(default)]
    tags: Vec<String>,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

fn enrolled_json(a: &crate::security::EnrolledAgent) -> Value {
    json!({
        "id": a.id,
        "tags": a.tags,
        "created_at": rfc3339(a.created_ms),
        "revoked_at": a.revoked_ms.map(rfc3339),
    })
}

/// `POST /admin/agents {id, tags}`: enrolls an agent. The token is in this answer only.
async fn enroll_agent(State(b): State<Arc<Backend>>, body: Bytes) -> Result<Response, ApiError> {
    let e: EnrollBody = json_body(&body)?;
    let token = b
        .security
        .enroll(b.store.as_ref(), &e.id, e.tags.clone())
        .await?;
    b.share_credential(&e.id).await?;
    tracing::info!(agent = %e.id, "agent enrolled");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": e.id, "tags": e.tags, "token": token})),
    )
        .into_response())
}

async fn enrolled_agents(State(b): State<Arc<Backend>>) -> Json<Value> {
    Json(Value::Array(
        b.security
            .enrolled_agents()
            .iter()
            .map(enrolled_json)
            .collect(),
    ))
}

async fn rotate_agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = b.security.rotate_agent(b.store.as_ref(), &id).await?;
    b.share_credential(&id).await?;
    tracing::info!(agent = %id, "agent token rotated");
    Ok(Json(json!({"id": id, "token": token})))
}

async fn revoke_agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    b.security.revoke_agent(b.store.as_ref(), &id).await?;
    b.share_credential(&id).await?;
    // Its connection is closed by the bridge; its will may not pass the signature check.
    b.registry.status(&id, false, now_ms());
    tracing::info!(agent = %id, "agent revoked");
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    id: Option<String>,
    scopes: Vec<String>,
    rate_per_min: Option<f64>,
    /// Its own budget; without one, the policy file's (or the default) for measure
    /// tokens, none for admin tokens.
    budget: Option<crate::security::Budget>,
}

/// A token, its budget (its own or the one it falls under) and what it spent today.
async fn token_json(b: &Backend, t: &crate::security::TokenInfo) -> Result<Value, ApiError> {
    let budget = b.security.budget_of(t);
    let now = now_ms();
    let usage = b
        .store
        .token_usage(&t.id, crate::budget::day_of(now), now)
        .await?;
    Ok(json!({
        "id": t.id,
        "scopes": t.scopes,
        "rate_per_min": t.rate_per_min,
        "created_at": rfc3339(t.created_ms),
        "revoked_at": t.revoked_ms.map(rfc3339),
        "budget": budget,
        "budget_source": if t.budget.is_some() { "token" } else if budget.is_some() { "policy" } else { "none" },
        "spend_today": {
            "probes": usage.one_off_probes.saturating_add(usage.schedule_daily_probes),
            "one_off_probes": usage.one_off_probes,
            "schedule_daily_probes": usage.schedule_daily_probes,
            "schedules": usage.schedules,
        },
    }))
}

/// `POST /admin/tokens {id?, scopes, rate_per_min?}`: the secret is in this answer only.
async fn create_token(State(b): State<Arc<Backend>>, body: Bytes) -> Result<Response, ApiError> {
    let t: TokenBody = json_body(&body)?;
    let mut scopes = Vec::new();
    for (i, s) in t.scopes.iter().enumerate() {
        scopes.push(Scope::parse(s).ok_or_else(|| ApiError::InvalidParams {
            field: format!("/scopes/{i}"),
            rule: "enum".into(),
            message: format!("/scopes/{i}: {s:?} is not one of read, measure, admin"),
        })?);
    }
    let (id, token) = b
        .security
        .create_token(
            b.store.as_ref(),
            t.id,
            scopes.clone(),
            t.rate_per_min,
            t.budget,
        )
        .await?;
    tracing::info!(token = %id, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "scopes": scopes, "token": token})),
    )
        .into_response())
}

async fn tokens(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for t in b.security.tokens() {
        out.push(token_json(&b, &t).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn rotate_token(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = b.security.rotate_token(b.store.as_ref(), &id).await?;
    tracing::info!(token = %id, "API token rotated");
    Ok(Json(json!({"id": id, "token": token})))
}

async fn revoke_token(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    b.security.revoke_token(b.store.as_ref(), &id).await?;
    tracing::info!(token = %id, "API token revoked");
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> axum::extract::Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri("/agent/a/echo_module");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    fn rule(r: Result<(), ApiError>) -> Option<String> {
        match r {
            Ok(()) => None,
            Err(ApiError::Forbidden { rule, .. }) => Some(rule),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn cross_site_changes_and_rebound_names_are_refused() {
        let local = ("host", "127.0.0.1:8000");
        // Clients that are not browsers send no Origin.
        assert_eq!(rule(browser_check(&req("POST", &[local]), false)), None);
        assert_eq!(
            rule(browser_check(
                &req("POST", &[local, ("origin", "http://127.0.0.1:8000")]),
                false
            )),
            None
        );
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
            for auth in [false, true] {
                assert_eq!(
                    rule(browser_check(
                        &req("POST", &[local, ("origin", origin)]),
                        auth
                    ))
                    .as_deref(),
                    Some("origin"),
                    "{origin}"
                );
            }
        }
        // Reads may come from anywhere (CORS keeps their answers from other sites).
        assert_eq!(
            rule(browser_check(
                &req("GET", &[local, ("origin", "http://evil.example")]),
                false
            )),
            None
        );
        // DNS rebinding: a name in Host, without auth.
        for host in ["rebind.evil.example:8000", "evil"] {
            assert_eq!(
                rule(browser_check(&req("GET", &[("host", host)]), false)).as_deref(),
                Some("host"),
                "{host}"
            );
            assert_eq!(
                rule(browser_check(&req("GET", &[("host", host)]), true)),
                None
            );
        }
        for host in [
            "localhost:8000",
            "127.0.0.1",
            "[::1]:8000",
            "10.1.2.3:80",
            "LOCALHOST",
        ] {
            assert_eq!(
                rule(browser_check(&req("GET", &[("host", host)]), false)),
                None,
                "{host}"
            );
        }
    }
}
