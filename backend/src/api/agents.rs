//! Agents: the list and one agent, their status history, heartbeats and events, and
//! loading, unloading and configuring modules on one.

use super::*;

pub(super) fn agent_json(a: &AgentEntry, now: i64) -> Value {
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

/// The filters of `GET /agents`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentQuery {
    /// Comma-separated; the agent has them all.
    tag: Option<String>,
    country: Option<String>,
    asn: Option<u32>,
    alive: Option<bool>,
    /// 1 to [`AGENTS_PAGE_MAX`], default [`AGENTS_PAGE`].
    limit: Option<usize>,
    /// The last id of the page before (what the `Link` header names).
    after: Option<String>,
}

/// The paging of `GET /agents/alive`. Other parameters are ignored, as they were
/// before it had any.
#[derive(Deserialize)]
pub(super) struct PageQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// Agents in one answer of `GET /agents` and `GET /agents/alive` when the client
/// names no `limit`.
pub(crate) const AGENTS_PAGE: usize = 1_000;
/// The most agents one answer holds.
pub(crate) const AGENTS_PAGE_MAX: usize = 10_000;

/// The page size a client asked for: 1 to [`AGENTS_PAGE_MAX`], default [`AGENTS_PAGE`].
fn page_size(limit: Option<usize>) -> Result<usize, ApiError> {
    let n = limit.unwrap_or(AGENTS_PAGE);
    if !(1..=AGENTS_PAGE_MAX).contains(&n) {
        return Err(ApiError::BadQuery {
            field: "limit".into(),
            rule: "range".into(),
            message: format!("limit: must be 1 to {AGENTS_PAGE_MAX} (got {n})"),
        });
    }
    Ok(n)
}

/// A page of agents as a JSON array, with `X-Total-Count` (agents matching in all)
/// and, when more follow, `Link: <…&after=LAST>; rel="next"` (RFC 8288): the same
/// query, continued after the page's last id.
fn agents_page(
    uri: &axum::http::Uri,
    page: Vec<Value>,
    last: Option<&str>,
    total: usize,
    more: bool,
) -> Response {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("x-total-count", total.into());
    if let (true, Some(last)) = (more, last) {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            if k != "after" {
                q.append_pair(&k, &v);
            }
        }
        q.append_pair("after", last);
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), q.finish());
        if let Ok(v) = axum::http::HeaderValue::from_str(&link) {
            headers.insert(axum::http::header::LINK, v);
        }
    }
    (headers, Json(Value::Array(page))).into_response()
}

/// `GET /agents?tag=a,b&country=&asn=&alive=&limit=&after=`: the agents matching, by
/// id, a page at a time (see [`agents_page`]).
pub(super) async fn agents(
    State(b): State<Arc<Backend>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    Query(q): Query<AgentQuery>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let limit = page_size(q.limit)?;
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
        ..Default::default()
    };
    let (page, total, more) = b.agents_page(&sel, q.after.as_deref(), limit, now);
    let last = page.last().map(|a| a.id.clone());
    // Versions and update state of the page's agents only.
    let ids: Vec<String> = page.iter().map(|a| a.id.clone()).collect();
    let lifecycle = b.lifecycle_reports_of(&ids).await;
    let page = page
        .iter()
        .map(|a| {
            let mut v = agent_json(a, now);
            v["tags"] = json!(b.agent_tags(a));
            let l = lifecycle.get(&a.id);
            v["config_version"] = json!(l.map_or(0, |l| l.status.settings_version));
            v["update_phase"] = json!(l.map(|l| l.status.phase.clone()));
            v["update_failure"] = json!(l.and_then(|l| l.status.last_failure.clone()));
            v
        })
        .collect();
    Ok(agents_page(&uri, page, last.as_deref(), total, more))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatusQuery {
    /// Seconds back from now for the intervals and the uptime (default a day).
    window_s: Option<u64>,
}

/// `GET /agents/{id}/status?window_s=`: connection history like a RIPE Atlas probe's:
/// connected and disconnected intervals, first and last connection, the current status
/// and since when, and uptime over the window: the share of the time since the window
/// began, or since the agent first connected if that is later (`observed_from`,
/// `observed_s`), that it was connected; null before it ever connected.
pub(super) async fn status_history(
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
    let sessions = b.sessions_of(&id, from).await?;
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
    // Uptime over the time the agent could have been up: from its first connection
    // (or the window's start, if later) to now. A new agent is not "down" for the
    // part of the window before it existed.
    let first = b.first_connected(&id).await?;
    let observed_from = first.map_or(now, |f| f.clamp(from, now));
    let observed_ms = now - observed_from;
    let uptime_pct =
        (observed_ms > 0).then(|| (up_ms as f64 * 100.0 / observed_ms as f64).min(100.0));
    let since = match (connected, sessions.last()) {
        (true, Some((start, None))) => Some(*start),
        (false, Some((_, Some(end)))) => Some(*end),
        _ => None,
    };
    Ok(Json(json!({
        "agent_id": id,
        "status": if connected { "connected" } else { "disconnected" },
        "status_since": since.map(rfc3339),
        "first_connected": first.map(rfc3339),
        "last_connected": sessions.last().map(|s| rfc3339(s.0)),
        "window_s": window_s,
        "observed_from": (observed_ms > 0).then(|| rfc3339(observed_from)),
        "observed_s": observed_ms as f64 / 1000.0,
        "uptime_pct": uptime_pct,
        "intervals": intervals,
    })))
}

/// `GET /agents/{id}/heartbeats`: the agent's recent heartbeats, oldest first, for
/// charts ([`crate::registry::HEARTBEAT_HISTORY`] per agent in memory; after a
/// restart, the stored samples, one a minute, until new ones arrive).
pub(super) async fn heartbeats(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    Ok(Json(json!(b.registry.heartbeats(&id))))
}

/// `GET /agents/alive?limit=&after=`: the agents alive now, by id, a page at a time.
pub(super) async fn agents_alive(
    State(b): State<Arc<Backend>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let limit = page_size(q.limit)?;
    let sel = crate::fleet::Selection {
        alive: Some(true),
        ..Default::default()
    };
    let (page, total, more) = b.agents_page(&sel, q.after.as_deref(), limit, now);
    let last = page.last().map(|a| a.id.clone());
    let page = page.iter().map(|a| agent_json(a, now)).collect();
    Ok(agents_page(&uri, page, last.as_deref(), total, more))
}

pub(super) async fn agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let a = b
        .registry
        .get(&id)
        .ok_or(ApiError::UnknownAgent(id.clone()))?;
    let mut body = agent_json(&a, now_ms());
    body["records_stored"] = json!(b.agent_record_count(&id).await?);
    // Versions, update state and the last failure (what the agent reports on `upd`).
    if let (Some(o), Value::Object(l)) = (body.as_object_mut(), b.lifecycle_json(&id).await) {
        o.extend(l);
    }
    Ok(Json(body))
}

/// Events the agent reported (corrupt store, module restarts, module changes).
pub(super) async fn events(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    if !b.registry.knows(&id) {
        return Err(ApiError::UnknownAgent(id));
    }
    let rows = b.events_of(&id, newest_limit(q.limit)?).await?;
    Ok(Json(Value::Array(
        rows.into_iter()
            .map(|(at_ms, kind, message)| json!({"at": rfc3339(at_ms), "kind": kind, "message": message}))
            .collect(),
    )))
}

/// Body of `PUT /agents/{id}/modules/{module}`: optional settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ModuleSettings {
    /// Default parameters, merged under each request's own.
    defaults: Option<Value>,
    max_rate: Option<f64>,
    timeout_ms: Option<u64>,
}

/// Loads a module on an agent (and configures it, when the body has settings).
pub(super) async fn load_module(
    State(b): State<Arc<Backend>>,
    Path((id, module)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    use imn_proto::wire::{CommandKind, ModuleConfig};
    let kind = b.module_kind(&module).await?;
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
    // The agent caps a run's `rate` parameter; a module without one has nothing to cap,
    // and a setting that would do nothing is refused rather than ignored.
    let takes_rate = kind.takes_rate();
    if settings.max_rate.is_some() && !takes_rate {
        return Err(ApiError::InvalidParams {
            field: "/max_rate".into(),
            rule: "rate".into(),
            message: format!("/max_rate: {module} has no rate parameter to cap"),
        });
    }
    let load = b.load_command(&id, &module).await?;
    let mut ids = vec![b.control(&id, load).await?];
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
pub(super) async fn unload_module(
    State(b): State<Arc<Backend>>,
    Path((id, module)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let cmd = b
        .control(
            &id,
            imn_proto::wire::CommandKind::Unload {
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
#[derive(Deserialize)]
pub(super) struct OnOff {
    on: bool,
}

/// Fault injection (only with `--fault-injection`): store batches but hold acks back.
pub(super) async fn hold_acks(
    State(b): State<Arc<Backend>>,
    Query(q): Query<OnOff>,
) -> Json<Value> {
    b.set_hold_acks(q.on);
    Json(json!({"hold_acks": q.on}))
}
