//! Measurements (`/v1/measurements`): one-offs to many agents and schedules, and the
//! stream of one measurement's results.

use super::*;

/// `POST /v1/measurements`: 202 with the agents chosen, and `Location`.
pub(super) async fn create_measurement(
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

pub(super) async fn stop_measurement(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    caller: CallerExt,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::fleet::stop(&b, &id, &caller_of(caller)).await?))
}

pub(super) async fn measurement(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::fleet::status(&b, &id).await?))
}

/// `GET /v1/measurements/{id}/stream`: the measurement's results, from the first.
pub(super) async fn measurement_stream(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
    caller: CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let limit = stream_limit(q.max_s)?;
    if b.measurement(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no measurement {id}")));
    }
    let filter = crate::store::ResultFilter {
        measurement: Some(id),
        after: stream_start(&headers, None, 0)?,
        limit: 500,
        ..Default::default()
    };
    let slot = b.feed.admit(&caller_of(caller))?;
    Ok(sse_results(b, filter, slot, limit).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    max_s: Option<f64>,
}

/// `GET /v1/measurements/{id}/status-check?max_loss=…`: 200 when healthy (no more
/// agents breach than `max_breaching`), 503 when not; the body names each breaching
/// agent and its value against the threshold, as JSON, Nagios plugin output or
/// Prometheus text (`format`; always 200, as scrapers need). `X-IMN-Check` says ok,
/// warning or critical.
pub(super) async fn status_check(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .take(64)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let (report, format) = crate::checks::run(&b, &id, &pairs).await?;
    // Prometheus drops a scrape that is not a 200: its text always comes with 200,
    // the status being in `imn_check_status`.
    let status = if report.healthy || format == crate::checks::Format::Prometheus {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = match report.status {
        crate::checks::Status::Ok => "ok",
        crate::checks::Status::Warning => "warning",
        crate::checks::Status::Critical => "critical",
    };
    let headers = [
        ("x-imn-check", word.to_string()),
        ("cache-control", "no-cache".to_string()),
    ];
    Ok(match format {
        crate::checks::Format::Json => (status, headers, Json(json!(report))).into_response(),
        crate::checks::Format::Nagios => (
            status,
            headers,
            [("content-type", "text/plain; charset=utf-8")],
            crate::checks::nagios(&report),
        )
            .into_response(),
        crate::checks::Format::Prometheus => (
            status,
            headers,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            crate::checks::prometheus(&report),
        )
            .into_response(),
    })
}
