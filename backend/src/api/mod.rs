//! The REST API, with the original system's routes: the router and the guard every
//! request passes (scopes, browser checks, tracing) here, the handlers in one file per
//! resource.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imn_proto::{catalog, now_ms};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::AgentEntry;
use crate::security::Scope;
use crate::service::Backend;
use crate::store::{RequestRow, ResultRow};

mod admin;
mod agents;
mod alerts;
mod extract;
mod info;
mod lifecycle;
mod measurements;
mod requests;
mod results;
use admin::*;
use agents::*;
use alerts::*;
use info::*;
use lifecycle::*;
use measurements::*;
use requests::*;
use results::*;

pub(crate) use extract::{Path, Query};
pub(crate) use results::parse_cursor;

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
        .route(
            "/admin/modules",
            post(add_module).layer(axum::extract::DefaultBodyLimit::max(MAX_MODULE_BODY)),
        )
        .route(
            "/admin/modules/{name}",
            axum::routing::delete(delete_module),
        )
        .route("/v1/measurements", post(create_measurement))
        .route(
            "/v1/measurements/{id}",
            get(measurement).delete(stop_measurement),
        )
        .route("/v1/results", get(results_v1))
        .route("/v1/results/stream", get(results_stream))
        .route("/v1/rollups", get(rollups))
        .route("/v1/measurements/{id}/stream", get(measurement_stream))
        .route("/v1/measurements/{id}/status-check", get(status_check))
        .route("/v1/alert-rules", get(alert_rules).post(create_alert_rule))
        .route(
            "/v1/alert-rules/{id}",
            get(alert_rule).delete(delete_alert_rule),
        )
        .route("/v1/alerts", get(alert_events))
        .route("/v1/alerts/stream", get(alert_stream))
        .route("/v1/anomalies", get(anomaly_events))
        .route("/modules/states/{request_id}", get(states))
        .route("/admin/agents", get(enrolled_agents).post(enroll_agent))
        .route("/admin/agents/{id}/rotate", post(rotate_agent))
        .route("/admin/agents/{id}/revoke", post(revoke_agent))
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/tokens", get(tokens).post(create_token))
        .route("/admin/tokens/{id}/rotate", post(rotate_token))
        .route("/admin/tokens/{id}/revoke", post(revoke_token))
        .route(
            "/admin/releases",
            post(add_release).layer(axum::extract::DefaultBodyLimit::max(MAX_RELEASE_BODY)),
        )
        .route("/releases", get(releases))
        .route("/admin/rollouts", post(start_rollout))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{id}", get(rollout))
        .route("/admin/rollouts/{id}/{action}", post(rollout_action))
        .route("/admin/settings", post(set_settings));
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

/// Authentication, scopes and rate limits (when auth is on), and the body limit: a
/// body over `max_body_bytes` gets a JSON 413 naming the limit, whether the client
/// declared its length or not.
async fn guard(
    State(b): State<Arc<Backend>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A release file is bigger than any JSON body: that one route has its own limit.
    let limit = if req.uri().path() == "/admin/releases" {
        MAX_RELEASE_BODY
    } else if req.uri().path() == "/admin/modules" {
        MAX_MODULE_BODY
    } else {
        b.security.limits.max_body_bytes
    };
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
    let req = match checked_body(req, limit).await {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string());
    let resp = next.run(req).await;
    framework_refusal(resp, &method, route.as_deref(), limit).await
}

/// The body of an operation the document gives a body schema, checked against that
/// very schema before the handler runs ([`crate::openapi::body_validator`]): not JSON
/// is 400 `malformed_json`, outside the schema 422 `invalid_params` naming the field
/// (a JSON pointer) and the rule. What the handler then parses is what the document
/// promised it takes, and the two cannot drift apart.
async fn checked_body(
    req: axum::extract::Request,
    limit: usize,
) -> Result<axum::extract::Request, ApiError> {
    let Some(route) = req.extensions().get::<axum::extract::MatchedPath>() else {
        return Ok(req);
    };
    let Some((validator, optional)) =
        crate::openapi::body_validator(req.method().as_str(), route.as_str())
    else {
        return Ok(req);
    };
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::Refused {
                status: 400,
                message: format!("the request body could not be read: {e}"),
            }
        }
    })?;
    if *optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ));
    }
    let mut value: Value = json_body(&bytes)?;
    // Checked on a blocking thread: a large body costs milliseconds of CPU, which must
    // not hold up the other requests of this worker.
    let value = tokio::task::spawn_blocking(move || {
        crate::validation::check_schema(validator, &value).map(|()| {
            // JSON Schema's `integer` takes 5.0; the handlers' integer fields then do too.
            integral(&mut value);
            value
        })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("body check: {e}")))??;
    // The handler parses exactly what was checked: re-written from the checked value,
    // so a key given twice means its last value everywhere.
    let bytes =
        Bytes::from(serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?);
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
}

/// Writes every number with no fraction that JSON spelled as a float (`5.0`, `1e3`)
/// as the integer it is, below 2^53 in size; returns whether it changed any. (The
/// depth is bounded by serde_json's nesting limit.)
fn integral(v: &mut Value) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < EXACT => {
                *v = json!(f as i64);
                true
            }
            _ => false,
        },
        Value::Array(a) => a.iter_mut().fold(false, |c, x| integral(x) | c),
        Value::Object(o) => o.values_mut().fold(false, |c, x| integral(x) | c),
        _ => false,
    }
}

/// A refusal made by the HTTP layer rather than a handler (every handler answers
/// errors as [`ApiError`]): a client error that is not JSON. It becomes the API's
/// error with its status kept: 413 names `max_body_bytes`, 405 the methods allowed
/// (and keeps `Allow`), any other keeps the layer's words. Handlers' own text answers
/// (a status check in nagios format) are not client errors, and pass.
async fn framework_refusal(
    resp: Response,
    method: &axum::http::Method,
    route: Option<&str>,
    limit: usize,
) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !status.is_client_error() {
        return resp;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge { limit }.into_response(),
        StatusCode::METHOD_NOT_ALLOWED => {
            // axum adds its Allow header outside this layer; the document knows them.
            let allowed = route.map(crate::openapi::methods_of).unwrap_or_default();
            ApiError::MethodNotAllowed {
                method: method.to_string(),
                allowed,
            }
            .into_response()
        }
        _ => {
            // The layer's own words, at most a few KiB of them.
            let body = axum::body::to_bytes(resp.into_body(), 4096)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body).trim().to_string();
            ApiError::Refused {
                status: status.as_u16(),
                message: if text.is_empty() {
                    status.canonical_reason().unwrap_or("refused").to_string()
                } else {
                    text
                },
            }
            .into_response()
        }
    }
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

/// The caller the guard authenticated (without auth: an anonymous admin).
type CallerExt = Option<axum::Extension<crate::security::Caller>>;

fn caller_of(c: CallerExt) -> crate::security::Caller {
    c.map(|axum::Extension(c)| c).unwrap_or_default()
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))
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

    /// A layering check, not a behaviour test: the REST handlers (`api/`) and the gRPC
    /// service (`grpc/mod.rs`) reach the store only through `Backend`'s methods
    /// (`service/reads.rs` and the rest), never through its `store` field. It reads
    /// their sources and fails on any code line that reads that field (names that
    /// only start with it, such as `stored_ms`, and `crate::store::` paths pass).
    #[test]
    fn handlers_never_touch_the_store() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(src.join("api"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        files.push(src.join("grpc").join("mod.rs"));
        assert!(files.len() > 2, "{files:?}");
        // Spelled in two parts so that this line does not find itself.
        let needle = concat!(".", "store");
        let mut found = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let hits = line.match_indices(needle).any(|(i, m)| {
                    !line[i + m.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if hits {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "handlers reach into the store; add a method to the service instead:\n{}",
            found.join("\n")
        );
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
