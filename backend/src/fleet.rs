//! Fleet measurements: one module run on many agents, chosen like RIPE Atlas chooses
//! probes (ids, tags, country, AS number, or all, with a limit); one request per agent,
//! progress while they report, and completion once every agent has reported or passed
//! its deadline, so one missing agent never holds a measurement open for ever.

use std::time::Duration;

use imn_modules::now_ms;
use imn_modules::wire::RequestState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::AgentEntry;
use crate::service::{Backend, SubmitOptions};
use crate::store::{MeasurementRow, RequestRow, ResultRow};

/// Which agents. Every criterion given must match; `all` matches every agent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// The agent has every one of these tags (its own or given at enrollment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// ISO 3166-1 alpha-2, any case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Only agents that are (or are not) alive now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alive: Option<bool>,
    /// At most this many, alive agents first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Selection {
    /// Whether it names any agents at all (a measurement must say which).
    pub fn has_criteria(&self) -> bool {
        self.all
            || !self.ids.is_empty()
            || !self.tags.is_empty()
            || self.country.is_some()
            || self.asn.is_some()
    }

    fn matches(&self, a: &AgentEntry, tags: &[String], now: i64) -> bool {
        let loc = a.hello.location.as_ref();
        (self.ids.is_empty() || self.ids.contains(&a.id))
            && self.tags.iter().all(|t| tags.contains(t))
            && self.country.as_ref().is_none_or(|c| {
                loc.and_then(|l| l.country.as_deref())
                    .is_some_and(|have| have.eq_ignore_ascii_case(c))
            })
            && self.asn.is_none_or(|n| loc.and_then(|l| l.asn) == Some(n))
            && self.alive.is_none_or(|want| a.alive(now) == want)
    }

    /// Why nothing matched, for the 422.
    fn describe(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Backend {
    /// The agent's tags: those it declares and those given at enrollment.
    pub fn agent_tags(&self, a: &AgentEntry) -> Vec<String> {
        let mut tags = a.hello.tags.clone();
        for t in self.security.policy_tags(&a.id, &a.hello.tags) {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        tags
    }

    /// The agents a selection picks: alive ones first, then by id; at most `limit`.
    pub fn select(&self, sel: &Selection, now: i64) -> Vec<AgentEntry> {
        let mut picked: Vec<AgentEntry> = self
            .registry
            .all()
            .into_iter()
            .filter(|a| sel.matches(a, &self.agent_tags(a), now))
            .collect();
        picked.sort_by(|a, b| b.alive(now).cmp(&a.alive(now)).then(a.id.cmp(&b.id)));
        if let Some(n) = sel.limit {
            picked.truncate(n);
        }
        picked
    }
}

/// `POST /v1/measurements`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMeasurement {
    pub module: String,
    #[serde(default)]
    pub params: Option<Value>,
    pub agents: Selection,
    #[serde(default)]
    pub schedule: Option<Value>,
    #[serde(default)]
    pub description: Option<String>,
    /// Seconds each agent's request may wait for its agent (default 24 h).
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

/// What `POST /v1/measurements` made.
pub struct Created {
    pub id: String,
    pub agents: Vec<String>,
    /// Agents selected whose request was refused, with why.
    pub refused: Vec<(String, ApiError)>,
}

/// Creates a one-off fleet measurement: a request per selected agent.
pub async fn create(
    b: &Backend,
    m: NewMeasurement,
    traceparent: Option<String>,
) -> Result<Created, ApiError> {
    if m.schedule.is_some() {
        return Err(ApiError::InvalidParams {
            field: "/schedule".into(),
            rule: "unsupported".into(),
            message: "/schedule: recurring measurements are not available yet; leave it out for a one-off measurement".into(),
        });
    }
    if !m.agents.has_criteria() {
        return Err(ApiError::InvalidParams {
            field: "/agents".into(),
            rule: "required".into(),
            message: "/agents: name the agents: ids, tags, country, asn, or all: true".into(),
        });
    }
    let deadline = match m.deadline_s {
        None => crate::service::DEFAULT_DEADLINE,
        Some(s) if s.is_finite() && (0.001..=7.0 * 86_400.0).contains(&s) => {
            Duration::from_secs_f64(s)
        }
        Some(_) => {
            return Err(ApiError::InvalidParams {
                field: "/deadline_s".into(),
                rule: "range".into(),
                message: "/deadline_s: must be 0.001 to 604800 seconds".into(),
            })
        }
    };
    let now = now_ms();
    if m.agents.limit == Some(0) {
        return Err(ApiError::InvalidParams {
            field: "/agents/limit".into(),
            rule: "minimum".into(),
            message: "/agents/limit: must be at least 1".into(),
        });
    }
    let picked = b.select(&m.agents, now);
    if picked.is_empty() {
        return Err(ApiError::InvalidParams {
            field: "/agents".into(),
            rule: "no_match".into(),
            message: format!(
                "/agents: no agent matches {} ({} agents known)",
                m.agents.describe(),
                b.registry.all().len()
            ),
        });
    }
    let params = m.params.unwrap_or_else(|| json!({}));
    let body = serde_json::to_vec(&params).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut agents = Vec::new();
    let mut refused = Vec::new();
    for a in picked {
        let opts = SubmitOptions {
            idempotency_key: None,
            deadline,
            waiter: false,
            traceparent: traceparent.clone(),
            measurement_id: Some(id.clone()),
        };
        match b.submit(&a.id, &m.module, &body, opts).await {
            Ok(_) => agents.push(a.id),
            // Internal and store errors are the caller's to see, not an agent's.
            Err(e @ (ApiError::Internal(_) | ApiError::Unavailable(_))) => return Err(e),
            Err(e) => refused.push((a.id, e)),
        }
    }
    if agents.is_empty() && !refused.is_empty() {
        // Every agent refused it: the first reason is the answer (an invalid
        // parameter is invalid for all of them).
        return Err(refused.swap_remove(0).1);
    }
    // Stored once some agent took it: a measurement no agent accepted is not kept.
    b.store
        .create_measurement(MeasurementRow {
            id: id.clone(),
            module: m.module.clone(),
            params_json: params.to_string(),
            selection_json: serde_json::to_string(&m.agents).unwrap_or_default(),
            description: m.description,
            created_ms: now,
            deadline_ms: now + deadline.as_millis() as i64,
        })
        .await?;
    Ok(Created {
        id,
        agents,
        refused,
    })
}

/// `GET /v1/measurements/{id}`: the measurement, each agent's state and result, and
/// progress.
pub async fn status(b: &Backend, id: &str) -> Result<Value, ApiError> {
    let m = b
        .store
        .measurement(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no measurement {id}")))?;
    let rows = b.store.measurement_requests(id).await?;
    let now = now_ms();
    let (mut reported, mut offline, mut running, mut queued, mut unanswered) = (0, 0, 0, 0, 0);
    let agents: Vec<Value> = rows
        .iter()
        .map(|(req, res): &(RequestRow, Option<ResultRow>)| {
            let alive = b.registry.get(&req.agent_id).is_some_and(|a| a.alive(now));
            match req.state {
                s if s.is_terminal() && res.is_some() => reported += 1,
                s if s.is_terminal() => unanswered += 1,
                RequestState::Received | RequestState::Running => running += 1,
                _ if !alive => offline += 1,
                _ => queued += 1,
            }
            json!({
                "agent_id": req.agent_id,
                "request_id": req.id,
                "state": req.state.as_str(),
                "alive": alive,
                "result": res.as_ref().map(|r| r.result.clone()),
                "error": res.as_ref().and_then(|r| r.error.clone()),
                "finished": res.as_ref().map(|r| crate::api::rfc3339(r.finished_ms)),
            })
        })
        .collect();
    let total = rows.len();
    let pending = offline + running + queued;
    let mut summary = format!("{reported}/{total} agents reported");
    if unanswered > 0 {
        summary.push_str(&format!(", {unanswered} expired or cancelled"));
    }
    if pending > 0 {
        let parts: Vec<String> = [
            (offline, "offline"),
            (running, "running"),
            (queued, "queued"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        summary.push_str(&format!(", {pending} pending: {}", parts.join(", ")));
    }
    Ok(json!({
        "id": m.id,
        "module": m.module,
        "params": serde_json::from_str::<Value>(&m.params_json).unwrap_or(Value::Null),
        "agents_selection": serde_json::from_str::<Value>(&m.selection_json).unwrap_or(Value::Null),
        "description": m.description,
        "created": crate::api::rfc3339(m.created_ms),
        "deadline": crate::api::rfc3339(m.deadline_ms),
        "state": if pending == 0 { "complete" } else { "running" },
        "progress": {
            "agents": total,
            "reported": reported,
            "expired_or_cancelled": unanswered,
            "pending": pending,
            "offline": offline,
            "running": running,
            "queued": queued,
            "summary": summary,
        },
        "agents": agents,
    }))
}

/// `DELETE /v1/measurements/{id}`: every request of the measurement that has not
/// finished is cancelled; agents running one are told to stop it (an agent that is
/// offline drops it: a cancelled request is never delivered again).
pub async fn stop(b: &Backend, id: &str) -> Result<Value, ApiError> {
    if b.store.measurement(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no measurement {id}")));
    }
    let now = now_ms();
    let mut cancelled = 0;
    for (req, _) in b.store.measurement_requests(id).await? {
        if req.state.is_terminal() {
            continue;
        }
        let changed = b
            .store
            .transition(
                &req.id,
                RequestState::Cancelled,
                now,
                "backend",
                Some("the measurement was stopped"),
            )
            .await?;
        if changed {
            cancelled += 1;
            b.finished(&req.id);
            if req.state.rank() >= RequestState::Dispatched.rank() {
                // Best effort: an agent that is offline never gets it again anyway.
                let _ = b
                    .control(
                        &req.agent_id,
                        imn_modules::wire::CommandKind::Cancel {
                            request_id: req.id.clone(),
                        },
                    )
                    .await;
            }
        }
    }
    Ok(json!({"id": id, "cancelled": cancelled}))
}
