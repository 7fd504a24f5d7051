//! Results: of one agent, one request, all of them (`/v1/results`, in Atlas format on
//! request), and their server-sent event streams.

use super::*;

/// A stored result as the API shows it, with `summary`: the module's one line
/// (`imn_proto::summary::Summary`, the same the CLI prints and the dashboard shows), or
/// the error of a failed run; null for a result its module's type does not read (a
/// result stored by another version).
pub(super) fn result_json(r: &ResultRow) -> Value {
    let summary = match &r.error {
        Some(e) => Some(imn_proto::summary::tidy(e.clone())),
        None => imn_proto::results::ModuleOutput::from_api_json(&r.module, &r.result)
            .map(|out| out.summary()),
    };
    let mut v = json!({
        "request_id": r.request_id,
        "agent_id": r.agent_id,
        "module": r.module,
        "state": r.state.as_str(),
        "result": r.result,
        "summary": summary,
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

/// An agent's results or events: `limit` at least 1, default 100; more than 10,000
/// is read as 10,000.
pub(super) fn newest_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(100) {
        0 => Err(ApiError::BadQuery {
            field: "limit".into(),
            rule: "minimum".into(),
            message: "limit: must be at least 1 (got 0)".into(),
        }),
        n => Ok(n.min(10_000)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResultsQuery {
    pub(super) limit: Option<u32>,
    /// `atlas` for RIPE Atlas's result format (the modules `atlas::modules()` lists).
    format: Option<String>,
}

/// Whether the caller asked for Atlas format; any other value is an error.
pub(super) fn wants_atlas(format: &Option<String>) -> Result<bool, ApiError> {
    match format.as_deref() {
        None | Some("native") => Ok(false),
        Some("atlas") => Ok(true),
        Some(other) => Err(ApiError::BadQuery {
            field: "format".into(),
            rule: "enum".into(),
            message: format!("format: must be native or atlas, got {other:?}"),
        }),
    }
}

pub(super) async fn results(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let atlas = wants_atlas(&q.format)?;
    let rows = b.results_of(&id, newest_limit(q.limit)?).await?;
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

pub(super) async fn result(
    State(b): State<Arc<Backend>>,
    Path((id, request_id)): Path<(String, String)>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let atlas = wants_atlas(&q.format)?;
    match b.result_of(&id, &request_id).await? {
        Some(r) if atlas => crate::atlas::convert(&r)
            .map(|v| Json(Value::Array(v)))
            .ok_or_else(|| ApiError::BadQuery {
                field: "format".into(),
                rule: "atlas_module".into(),
                message: format!(
                    "format: RIPE Atlas defines no format for {} results; atlas is for {}",
                    r.module,
                    crate::atlas::modules().join(", ")
                ),
            }),
        Some(r) => Ok(Json(result_json(&r))),
        None => {
            let state = b.request(&request_id).await?.filter(|r| r.agent_id == id);
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
pub(super) struct ResultsV1Query {
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
    /// Streams only: end the stream after this many seconds.
    max_s: Option<f64>,
}

/// The longest `max_s` a stream takes: a day.
pub(super) const MAX_STREAM_S: f64 = 86_400.0;

/// A stream's `max_s`: more than 0, at most a day. The stream ends then (an
/// EventSource reconnects with `Last-Event-ID` and misses nothing); without it, a
/// stream lasts until the client leaves.
pub(super) fn stream_limit(max_s: Option<f64>) -> Result<Option<std::time::Duration>, ApiError> {
    match max_s {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= MAX_STREAM_S => {
            Ok(Some(std::time::Duration::from_secs_f64(s)))
        }
        Some(s) => Err(ApiError::BadQuery {
            field: "max_s".into(),
            rule: "range".into(),
            message: format!("max_s: more than 0 and at most {MAX_STREAM_S} seconds (got {s})"),
        }),
    }
}

/// Ends `events` after `limit`, if given.
pub(super) fn ending<S: futures::Stream>(
    events: S,
    limit: Option<std::time::Duration>,
) -> futures::stream::TakeUntil<S, futures::future::BoxFuture<'static, ()>> {
    use futures::{FutureExt, StreamExt};
    let end = async move {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    events.take_until(end.boxed())
}

/// A time in a query: RFC 3339 or ms since the epoch.
pub(super) fn time_param(field: &'static str, v: Option<String>) -> Result<Option<i64>, ApiError> {
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
pub(super) async fn results_v1(
    State(b): State<Arc<Backend>>,
    Query(q): Query<ResultsV1Query>,
) -> Result<Json<Value>, ApiError> {
    let atlas = wants_atlas(&q.format)?;
    if q.max_s.is_some() {
        return Err(ApiError::BadQuery {
            field: "max_s".into(),
            rule: "unsupported".into(),
            message: "max_s applies to streams, not to pages".into(),
        });
    }
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
pub(super) fn result_v1_json(r: &ResultRow, measurement: Option<String>) -> Value {
    let mut v = result_json(r);
    v["measurement_id"] = json!(measurement);
    v
}

/// Where a stream resumes: `Last-Event-ID` (what an EventSource sends on reconnect),
/// else `?cursor=`, else `default`.
pub(super) fn stream_start(
    headers: &HeaderMap,
    cursor: Option<&str>,
    default: i64,
) -> Result<i64, ApiError> {
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
pub(super) fn sse_results(
    b: Arc<Backend>,
    filter: crate::store::ResultFilter,
    slot: crate::feed::Slot,
    limit: Option<std::time::Duration>,
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
    Sse::new(ending(events, limit)).keep_alive(KeepAlive::default())
}

/// `GET /v1/results/stream?agent=&module=&measurement=&cursor=`: results as they are
/// stored (from now, or after `Last-Event-ID` / `cursor`).
pub(super) async fn results_stream(
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
    let limit = stream_limit(q.max_s)?;
    let now = b.latest_position().await?;
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
    Ok(sse_results(b, filter, slot, limit).into_response())
}

/// `GET /v1/rollups?agent=&module=&target=&since=&until=&limit=`: hourly rollups
/// (count, failures, loss, RTT min/median/p95/max and the module's own figures) per
/// agent, module, target and hour, oldest hour first. Kept after the raw results
/// are deleted, for `--rollup-retention`.
pub(super) async fn rollups(
    State(b): State<Arc<Backend>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut f = crate::store::RollupFilter {
        limit: 1_000,
        ..Default::default()
    };
    let bad = |field: &str, rule: &str, message: String| ApiError::BadQuery {
        field: field.into(),
        rule: rule.into(),
        message,
    };
    let text = |k: &str, v: String| {
        if v.is_empty() || v.len() > 512 {
            Err(bad(k, "length", format!("{k}: 1 to 512 bytes")))
        } else {
            Ok(Some(v))
        }
    };
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).take(32) {
        let v = v.into_owned();
        match k.as_ref() {
            "agent" => f.agent = text("agent", v)?,
            "module" => f.module = text("module", v)?,
            "target" => f.target = text("target", v)?,
            "since" => f.since_ms = time_param("since", Some(v))?.map(crate::rollup::hour_of),
            "until" => f.until_ms = time_param("until", Some(v))?,
            "after" => f.after = Some(parse_rollup_cursor(&v)?),
            "limit" => {
                f.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        bad("limit", "range", format!("limit: 1 to 10000 (got {v:?})"))
                    })?
            }
            other => {
                return Err(bad(
                    other,
                    "unknown",
                    format!(
                    "{other}: not a parameter; known: agent, module, target, since, until, after, limit"
                ),
                ))
            }
        }
    }
    let limit = f.limit as usize;
    let rows = b.rollups(f).await?;
    // A full page may have more after it: where to go on from.
    let next = rows
        .last()
        .filter(|_| rows.len() == limit)
        .map(|r| rollup_cursor(r.hour_ms, &r.agent_id, &r.module, &r.target));
    let out: Vec<Value> = rows
        .iter()
        .map(|r| {
            let rollup: crate::rollup::Rollup = serde_json::from_str(&r.body).unwrap_or_default();
            let mut v = rollup.to_json();
            v["agent_id"] = json!(r.agent_id);
            v["module"] = json!(r.module);
            v["target"] = json!(r.target);
            v["hour"] = rfc3339(r.hour_ms);
            v
        })
        .collect();
    Ok(Json(json!({ "rollups": out, "next_after": next })))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A rollup's place in the listing's order, as `after` takes it: the hour (ms), then
/// agent, module and target in hex, dot-separated.
fn rollup_cursor(hour_ms: i64, agent: &str, module: &str, target: &str) -> String {
    format!("{hour_ms}.{}.{}.{}", hex(agent), hex(module), hex(target))
}

fn parse_rollup_cursor(c: &str) -> Result<(i64, String, String, String), ApiError> {
    let bad = || ApiError::BadQuery {
        field: "after".into(),
        rule: "format".into(),
        message: format!(
            "after: not a rollup cursor this API gave out (next_after; got {:?})",
            c.chars().take(64).collect::<String>()
        ),
    };
    if c.len() > 4_200 {
        return Err(bad());
    }
    let unhex = |h: &str| -> Option<String> {
        if !h.len().is_multiple_of(2) || h.len() > 2_048 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect();
        String::from_utf8(bytes?).ok()
    };
    let mut parts = c.split('.');
    let (Some(h), Some(a), Some(m), Some(t), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    Ok((
        h.parse().map_err(|_| bad())?,
        unhex(a).ok_or_else(bad)?,
        unhex(m).ok_or_else(bad)?,
        unhex(t).ok_or_else(bad)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_cursors_round_trip_and_bad_ones_name_after() {
        let c = rollup_cursor(3_600_000, "agent.1", "ping_module", "h\0ö.x");
        assert_eq!(
            parse_rollup_cursor(&c).unwrap(),
            (
                3_600_000,
                "agent.1".into(),
                "ping_module".into(),
                "h\0ö.x".into()
            )
        );
        for bad in [
            "",
            "1.2.3",
            "x.61.61.61",
            "1.6.61.61",
            "1.zz.61.61",
            "1.61.61.61.61",
            "1.ff.61.61",
        ] {
            match parse_rollup_cursor(bad) {
                Err(ApiError::BadQuery { field, .. }) => assert_eq!(field, "after", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
    use imn_proto::wire::RequestState;

    fn row(module: &str, result: Value, error: Option<&str>) -> ResultRow {
        ResultRow {
            agent_id: "a".into(),
            request_id: "r".into(),
            module: module.into(),
            epoch: 1,
            seq: 0,
            state: RequestState::Succeeded,
            result,
            error: error.map(str::to_string),
            received_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            stored_ms: 0,
            scheduled_ms: None,
            at_ms: 0,
        }
    }

    /// `summary` is the module's own line, the error of a failed run, or null for a
    /// result its module's type does not read.
    #[test]
    fn results_carry_their_modules_summary() {
        let ok = result_json(&row("echo_module", json!({"message": "hi"}), None));
        assert_eq!(ok["summary"], "hi");
        let ntp = json!({"host": "h", "addr": "127.0.0.1", "port": 123, "version": 4,
            "packets": [], "sent": 2, "received": 0, "offset_ms": null, "delay_ms": null,
            "jitter_ms": null, "server": null});
        let failed = result_json(&row("ntp", ntp, Some("boom")));
        assert_eq!(failed["summary"], "boom");
        let odd = result_json(&row("echo_module", json!({"text": 1}), None));
        assert!(odd["summary"].is_null(), "{odd}");
        // No module could have this name: nothing reads its result.
        let unknown = result_json(&row("Gone Module", json!({}), None));
        assert!(unknown["summary"].is_null());
        // Any other name may be a WebAssembly module's: its object's own fields.
        let wasm = result_json(&row("stun", json!({"mapped_address": "192.0.2.1"}), None));
        assert_eq!(wasm["summary"], "mapped_address=192.0.2.1");
    }
}
