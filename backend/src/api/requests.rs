//! Requests to one agent (`POST /agent/{id}/{module}`), their states, and the dead
//! letters ingest kept aside.

use super::*;

pub(super) fn request_json(r: &RequestRow) -> Value {
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
#[serde(deny_unknown_fields)]
pub(super) struct SubmitQuery {
    /// Seconds to wait for a terminal state before answering.
    wait: Option<f64>,
    /// Seconds from now after which the request expires if no result came back
    /// (default 24 h); an agent that gets the command later does not run it.
    deadline: Option<f64>,
}

/// The longest deadline a request may have, in seconds (7 days).
pub(super) const MAX_DEADLINE_S: f64 = 7.0 * 24.0 * 3600.0;

pub(super) fn seconds_in(
    field: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if x.is_nan() || x < lo || x > hi => Err(ApiError::BadQuery {
            field: field.to_string(),
            rule: "range".to_string(),
            message: format!("{field} must be between {lo} and {hi} seconds, got {x}"),
        }),
        v => Ok(v),
    }
}

pub(super) async fn submit(
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
                .ok_or_else(|| ApiError::BadQuery {
                    field: "Idempotency-Key".into(),
                    rule: "visible_ascii".into(),
                    message: "Idempotency-Key must be 1 to 256 visible ASCII characters".into(),
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
        if let Some((now, r)) = b.request_and_result(&req.id).await? {
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

pub(super) async fn states(
    State(b): State<Arc<Backend>>,
    Path(request_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = b
        .request(&request_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no request {request_id}")))?;
    let transitions = b.transitions_of(&request_id).await?;
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
#[serde(deny_unknown_fields)]
pub(super) struct DeadLetterQuery {
    agent: Option<String>,
    limit: Option<u32>,
}

/// `GET /admin/dead-letters?agent=&limit=`: records the store could not take, newest
/// first, each with the database's reason and its body as the agent sent it.
pub(super) async fn dead_letters(
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
    let rows = b.dead_letters(q.agent.as_deref(), limit).await?;
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
