//! Alert rules, alert and anomaly events, and their stream (see [`crate::alerts`]).

use super::*;

/// `POST /v1/alert-rules`: a rule on a measurement (thresholds or anomalies).
pub(super) async fn create_alert_rule(
    State(b): State<Arc<Backend>>,
    caller: CallerExt,
    body: Bytes,
) -> Result<Response, ApiError> {
    let input: crate::alerts::RuleInput = json_body(&body)?;
    let rule = crate::alerts::add_rule(&b, input, &caller_of(caller)).await?;
    let location = format!(
        "/v1/alert-rules/{}",
        rule["id"].as_str().unwrap_or_default()
    );
    Ok((StatusCode::CREATED, [("location", location)], Json(rule)).into_response())
}

/// `GET /v1/alert-rules`: every rule, with its state.
pub(super) async fn alert_rules(State(b): State<Arc<Backend>>, caller: CallerExt) -> Json<Value> {
    let caller = caller_of(caller);
    Json(json!({ "rules": b.alerts.rules(&caller), "firing": b.alerts.firing() }))
}

pub(super) async fn alert_rule(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    caller: CallerExt,
) -> Result<Json<Value>, ApiError> {
    b.alerts
        .rule(&id, &caller_of(caller))
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no alert rule {id}")))
}

pub(super) async fn delete_alert_rule(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    caller: CallerExt,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        crate::alerts::delete_rule(&b, &id, &caller_of(caller)).await?,
    ))
}

/// An event id this API gave out (`e` and a number), as its sequence number.
fn event_cursor(field: &str, c: &str) -> Result<u64, ApiError> {
    c.strip_prefix('e')
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| ApiError::BadQuery {
            field: field.into(),
            rule: "format".into(),
            message: format!(
                "{field}: not an event id this API gave out (e and a number; got {c:?})"
            ),
        })
}

/// The filters of event lists and the stream.
#[derive(Default)]
struct EventQuery {
    after: u64,
    /// `after` was given.
    after_given: bool,
    limit: usize,
    newest: bool,
    rule: Option<String>,
    measurement: Option<String>,
    agent: Option<String>,
    kind: Option<&'static str>,
    /// The stream's `max_s`.
    max_s: Option<f64>,
}

fn event_query(query: Option<&str>, stream: bool) -> Result<EventQuery, ApiError> {
    let mut q = EventQuery {
        limit: 100,
        ..Default::default()
    };
    let bad = |field: &str, rule: &str, message: String| ApiError::BadQuery {
        field: field.into(),
        rule: rule.into(),
        message,
    };
    let text = |k: &str, v: String| {
        if v.is_empty() || v.len() > 256 {
            Err(bad(k, "length", format!("{k}: 1 to 256 bytes")))
        } else {
            Ok(Some(v))
        }
    };
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()).take(16) {
        let v = v.into_owned();
        if seen.iter().any(|s| *s == k) {
            return Err(bad(&k, "duplicate", format!("{k}: given more than once")));
        }
        seen.push(k.to_string());
        match k.as_ref() {
            "after" => {
                q.after = event_cursor("after", &v)?;
                q.after_given = true;
            }
            "limit" if !stream => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1_000).contains(n))
                    .ok_or_else(|| bad("limit", "range", format!("limit: 1 to 1000 (got {v:?})")))?
            }
            "order" if !stream => {
                q.newest = match v.as_str() {
                    "oldest" => false,
                    "newest" => true,
                    _ => {
                        return Err(bad(
                            "order",
                            "enum",
                            format!("order: oldest (the first `limit` after `after`) or newest (the last `limit`) (got {v:?})"),
                        ))
                    }
                }
            }
            "rule" => q.rule = text("rule", v)?,
            "measurement" => q.measurement = text("measurement", v)?,
            "agent" => q.agent = text("agent", v)?,
            "max_s" if stream => {
                q.max_s = Some(v.parse::<f64>().map_err(|_| {
                    bad("max_s", "type", format!("max_s: a number of seconds (got {v:?})"))
                })?)
            }
            "type" if stream => {
                q.kind = match v.as_str() {
                    "alert" => Some("alert"),
                    "anomaly" => Some("anomaly"),
                    _ => {
                        return Err(bad(
                            "type",
                            "enum",
                            format!("type: alert or anomaly (got {v:?})"),
                        ))
                    }
                }
            }
            other => {
                return Err(bad(
                    other,
                    "unknown",
                    format!(
                        "{other}: not a parameter here; known: {}",
                        if stream {
                            "after, rule, measurement, agent, type, max_s"
                        } else {
                            "after, limit, order, rule, measurement, agent"
                        }
                    ),
                ))
            }
        }
    }
    Ok(q)
}

impl EventQuery {
    fn keeps(&self, e: &crate::alerts::Event) -> bool {
        let s = |k: &str| e.body.get(k).and_then(Value::as_str);
        self.rule.as_deref().is_none_or(|r| s("rule_id") == Some(r))
            && self
                .measurement
                .as_deref()
                .is_none_or(|m| s("measurement_id") == Some(m))
            && self.agent.as_deref().is_none_or(|a| s("agent") == Some(a))
    }
}

/// An event id past the newest was never given out (or comes from another
/// database): refused, rather than waiting for numbers to catch up.
fn check_after(b: &Backend, field: &str, after: u64) -> Result<(), ApiError> {
    // Any id up to the highest number reserved may exist (another backend may have
    // given it out a moment ago): only past it is refused.
    let highest = b.alerts.highest_possible();
    if after > highest {
        return Err(ApiError::BadQuery {
            field: field.into(),
            rule: "range".into(),
            message: format!("{field}: e{after} is past every event id given out (e{highest})"),
        });
    }
    Ok(())
}

fn event_page(b: &Backend, q: &EventQuery, kind: &str) -> Json<Value> {
    let events = b
        .alerts
        .events(q.after, q.limit, q.newest, Some(kind), |e| q.keeps(e));
    let next = events.last().map(|e| format!("e{}", e.seq));
    let list: Vec<Value> = events.iter().map(|e| e.to_json()).collect();
    Json(json!({ "events": list, "next_after": next }))
}

/// `GET /v1/alerts?after=e12&limit=&rule=&measurement=`: alert events (fired,
/// resolved), oldest first after `after`.
pub(super) async fn alert_events(
    State(b): State<Arc<Backend>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = event_query(query.as_deref(), false)?;
    check_after(&b, "after", q.after)?;
    Ok(event_page(&b, &q, "alert"))
}

/// `GET /v1/anomalies?after=&limit=&agent=&measurement=`: anomaly events with their
/// evidence, oldest first after `after`.
pub(super) async fn anomaly_events(
    State(b): State<Arc<Backend>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = event_query(query.as_deref(), false)?;
    check_after(&b, "after", q.after)?;
    Ok(event_page(&b, &q, "anomaly"))
}

/// `GET /v1/alerts/stream`: alert and anomaly events as Server-Sent Events (event
/// `alert` or `anomaly`, id `e{seq}`), from now or after `Last-Event-ID` / `after`.
pub(super) async fn alert_stream(
    State(b): State<Arc<Backend>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    caller: CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let mut q = event_query(query.as_deref(), true)?;
    let limit = stream_limit(q.max_s)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let mut rx = b.alerts.watch();
    q.after = match last {
        Some(id) => {
            let after = event_cursor("Last-Event-ID", id)?;
            check_after(&b, "Last-Event-ID", after)?;
            after
        }
        None if q.after_given => {
            check_after(&b, "after", q.after)?;
            q.after
        }
        None => *rx.borrow_and_update(),
    };
    let slot = b.feed.admit(&caller_of(caller))?;
    let state = (b, q, rx, std::collections::VecDeque::new(), slot);
    let events = futures::stream::unfold(state, |(b, mut q, mut rx, mut buf, slot)| async move {
        loop {
            if let Some(e) = buf.pop_front() {
                let e: crate::alerts::Event = e;
                let ev = Event::default()
                    .event(e.kind.as_str())
                    .id(format!("e{}", e.seq))
                    .data(e.to_json().to_string());
                return Some((Ok::<_, std::convert::Infallible>(ev), (b, q, rx, buf, slot)));
            }
            // What was announced is in the ring before it is announced: read the
            // announcement first, then the ring, so nothing falls between.
            let seen = *rx.borrow_and_update();
            let got = b.alerts.events(q.after, 200, false, q.kind, |e| q.keeps(e));
            if let Some(l) = got.last() {
                q.after = l.seq;
                buf.extend(got);
                continue;
            }
            // Nothing passed the filters up to the newest: wait for more.
            q.after = q.after.max(seen);
            rx.changed().await.ok()?;
        }
    });
    Ok(Sse::new(ending(events, limit))
        .keep_alive(KeepAlive::default())
        .into_response())
}
