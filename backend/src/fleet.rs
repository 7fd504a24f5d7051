//! Fleet measurements: one module run on many agents, chosen like RIPE Atlas chooses
//! probes (ids, tags, country, AS number, or all, with a limit).
//!
//! A one-off measurement is one request per agent, with progress while they report,
//! and completion once every agent has reported or passed its deadline, so one
//! missing agent never holds a measurement open for ever.
//!
//! A recurring measurement (`schedule`) is desired state: each selected agent's set of
//! schedules gets a new version, which the agent receives, stores and runs from its own
//! copy, connected or not. The agent reports its version in every hello; when it
//! differs from the backend's, the backend sends the set again (on the hello, and from
//! the sweep while the agent stays connected).

use std::time::Duration;

use imn_proto::now_ms;
use imn_proto::wire::RequestState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::AgentEntry;
use crate::service::{Backend, SubmitOptions};
use crate::store::{AgentSchedule, MeasurementRow, RequestRow, ResultRow};

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
        for t in self.security.enrolled_tags(&a.id) {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        tags
    }

    /// A page of the agents a selection matches, by id, after `after` (its `limit`
    /// is not used: the page has `limit`): (page, matching in all, more follow).
    pub fn agents_page(
        &self,
        sel: &Selection,
        after: Option<&str>,
        limit: usize,
        now: i64,
    ) -> (Vec<AgentEntry>, usize, bool) {
        let no_tags: Vec<String> = Vec::new();
        self.registry.page(after, limit, |a| {
            // Enrolled tags are looked up only when the selection names tags.
            if sel.tags.is_empty() {
                sel.matches(a, &no_tags, now)
            } else {
                sel.matches(a, &self.agent_tags(a), now)
            }
        })
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

/// `schedule` in `POST /v1/measurements`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    pub interval_s: f64,
    /// RFC 3339, or seconds since the epoch; default now.
    #[serde(default)]
    pub start: Option<Value>,
    /// RFC 3339, or seconds since the epoch; default never (until `DELETE`).
    #[serde(default)]
    pub stop: Option<Value>,
    /// Each run starts up to this many seconds after its slot, the same delay every
    /// time for one agent and slot; default 10 % of the interval, at most 60 s.
    #[serde(default)]
    pub jitter_s: Option<f64>,
}

/// A schedule as stored and as agents get it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub interval_ms: u64,
    pub start_ms: i64,
    pub stop_ms: Option<i64>,
    pub jitter_ms: u64,
}

/// The shortest interval between runs of a schedule.
pub const MIN_INTERVAL_S: f64 = 1.0;
/// The longest: 30 days.
pub const MAX_INTERVAL_S: f64 = 30.0 * 86_400.0;

fn invalid(field: &str, rule: &str, message: String) -> ApiError {
    ApiError::InvalidParams {
        field: field.into(),
        rule: rule.into(),
        message: format!("{field}: {message}"),
    }
}

/// A time given as RFC 3339 or seconds since the epoch, in ms.
fn time_field(field: &str, v: &Value) -> Result<i64, ApiError> {
    if let Some(secs) = v.as_f64() {
        if secs.is_finite() && (0.0..4e11).contains(&secs) {
            return Ok((secs * 1000.0).round() as i64);
        }
    } else if let Some(text) = v.as_str() {
        if let Ok(t) =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        {
            return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
        }
    }
    Err(invalid(
        field,
        "format",
        format!("must be an RFC 3339 time or seconds since the epoch (got {v})"),
    ))
}

impl ScheduleSpec {
    /// Checks a schedule as the API got it; every error names its field.
    pub fn parse(v: Value, now: i64) -> Result<ScheduleSpec, ApiError> {
        let r: ScheduleRequest =
            serde_json::from_value(v).map_err(|e| invalid("/schedule", "schema", e.to_string()))?;
        if !r.interval_s.is_finite() || !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&r.interval_s) {
            return Err(invalid(
                "/schedule/interval_s",
                "range",
                format!("must be {MIN_INTERVAL_S} to {MAX_INTERVAL_S} seconds"),
            ));
        }
        let interval_ms = (r.interval_s * 1000.0).round() as u64;
        // Compared in ms, as agents check it: 0.9996 s of jitter on a 1 s interval
        // rounds to the interval itself, which an agent refuses.
        let jitter_ms = match r.jitter_s {
            None => (interval_ms / 10).min(60_000),
            Some(j) if j.is_finite() && j >= 0.0 && ((j * 1000.0).round() as u64) < interval_ms => {
                (j * 1000.0).round() as u64
            }
            Some(_) => {
                return Err(invalid(
                    "/schedule/jitter_s",
                    "range",
                    "must be at least 0 and less than interval_s".into(),
                ))
            }
        };
        let start_ms = match &r.start {
            None => now,
            Some(v) => time_field("/schedule/start", v)?,
        };
        let stop_ms = match &r.stop {
            None => None,
            Some(v) => Some(time_field("/schedule/stop", v)?),
        };
        if let Some(stop) = stop_ms {
            if stop <= start_ms.max(now) {
                return Err(invalid(
                    "/schedule/stop",
                    "after_start",
                    "must be after start and in the future".into(),
                ));
            }
        }
        Ok(ScheduleSpec {
            interval_ms,
            start_ms,
            stop_ms,
            jitter_ms,
        })
    }
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
    caller: crate::security::Caller,
) -> Result<Created, ApiError> {
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
    let schedule = m
        .schedule
        .clone()
        .map(|v| ScheduleSpec::parse(v, now))
        .transpose()?;
    if schedule.is_some() && m.deadline_s.is_some() {
        return Err(invalid(
            "/deadline_s",
            "one_off_only",
            "a deadline is for one-off measurements; a recurring one runs until its schedule's stop or DELETE".into(),
        ));
    }
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
    let params = m.params.clone().unwrap_or_else(|| json!({}));
    let body = serde_json::to_vec(&params).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(spec) = schedule {
        return create_schedule(b, id, m, params, picked, spec, caller).await;
    }
    let mut agents = Vec::new();
    let mut refused = Vec::new();
    let names = std::sync::Arc::new(crate::security::Resolutions::default());
    // The whole measurement against the token's budget at once: count × targets ×
    // every agent it would run on (a fleet measurement is not one request's worth).
    let mut probes = std::collections::HashMap::new();
    let _turn = b.budget_turn(&caller).await;
    if caller.budget.is_some() {
        for a in &picked {
            if let Ok(c) = b.checked_params(&a.id, &m.module, &body, &names).await {
                probes.insert(a.id.clone(), c.demand.probes);
            }
        }
        let cost = crate::budget::Cost {
            one_off: probes.values().fold(0u64, |s, p| s.saturating_add(*p)),
            ..Default::default()
        };
        crate::budget::check(b, &caller, &cost).await?;
    }
    let mut spent = 0u64;
    for a in picked {
        let opts = SubmitOptions {
            idempotency_key: None,
            deadline,
            waiter: false,
            traceparent: traceparent.clone(),
            measurement_id: Some(id.clone()),
            names: Some(names.clone()),
            caller: caller.clone(),
            prepaid: true,
        };
        match b.submit(&a.id, &m.module, &body, opts).await {
            Ok(_) => {
                spent = spent.saturating_add(probes.get(&a.id).copied().unwrap_or(0));
                agents.push(a.id)
            }
            // Internal and store errors are the caller's to see, not an agent's.
            Err(e @ (ApiError::Internal(_) | ApiError::Unavailable(_))) => return Err(e),
            Err(e) => refused.push((a.id, e)),
        }
    }
    crate::budget::charge(b, &caller, spent).await;
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
            schedule_json: None,
            stopped_ms: None,
            owner: caller.token_id.clone(),
            daily_probes: 0,
        })
        .await?;
    Ok(Created {
        id,
        agents,
        refused,
    })
}

/// A recurring measurement: parameters checked for each agent, stored with a new
/// schedule version per agent, and sent to those connected now (the rest get it at
/// their next hello).
async fn create_schedule(
    b: &Backend,
    id: String,
    m: NewMeasurement,
    params: Value,
    picked: Vec<AgentEntry>,
    spec: ScheduleSpec,
    caller: crate::security::Caller,
) -> Result<Created, ApiError> {
    let now = now_ms();
    let body = serde_json::to_vec(&params).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let schedule_json = serde_json::to_string(&spec).unwrap_or_default();
    let names = crate::security::Resolutions::default();
    let mut parts = Vec::new();
    let mut refused = Vec::new();
    let mut probes_per_run = 0u64;
    let max_per_agent = b.security.limits.max_schedules_per_agent;
    for a in picked {
        // An agent runs at most so many recurring measurements, whoever made them
        // (one-off requests have max_queued_per_agent).
        let running = b.store.agent_schedules(&a.id).await?.1.len() as u64;
        if running >= max_per_agent {
            refused.push((
                a.id.clone(),
                ApiError::OverLimit {
                    limit: "max_schedules_per_agent",
                    field: "/agents".into(),
                    message: format!(
                        "agent {} runs {running} recurring measurements, the limit max_schedules_per_agent = {max_per_agent}",
                        a.id
                    ),
                },
            ));
            continue;
        }
        match b.checked_params(&a.id, &m.module, &body, &names).await {
            Ok(crate::service::Checked {
                params,
                timeout_ms,
                demand,
                ..
            }) => {
                probes_per_run = probes_per_run.saturating_add(demand.probes);
                parts.push((
                    a.id,
                    AgentSchedule {
                        measurement_id: id.clone(),
                        module: m.module.clone(),
                        params_json: params.to_string(),
                        timeout_ms,
                        schedule_json: schedule_json.clone(),
                    },
                ))
            }
            Err(e @ (ApiError::Internal(_) | ApiError::Unavailable(_))) => return Err(e),
            Err(e) => refused.push((a.id, e)),
        }
    }
    if parts.is_empty() {
        return Err(refused.swap_remove(0).1);
    }
    let cost = crate::budget::Cost::schedule(&m.module, probes_per_run, &spec, now);
    let _turn = b.budget_turn(&caller).await;
    crate::budget::check(b, &caller, &cost).await?;
    let versions = b
        .store
        .create_schedule(
            MeasurementRow {
                id: id.clone(),
                module: m.module.clone(),
                params_json: params.to_string(),
                selection_json: serde_json::to_string(&m.agents).unwrap_or_default(),
                description: m.description,
                created_ms: now,
                deadline_ms: spec.stop_ms.unwrap_or(i64::MAX),
                schedule_json: Some(schedule_json),
                stopped_ms: None,
                owner: caller.token_id.clone(),
                daily_probes: cost.daily,
            },
            parts,
        )
        .await?;
    crate::budget::charge(b, &caller, cost.one_off).await;
    let agents = versions.iter().map(|(a, _)| a.clone()).collect();
    for (agent, version) in versions {
        b.schedules_changed(&agent, version).await;
    }
    Ok(Created {
        id,
        agents,
        refused,
    })
}

/// Each agent's schedule version as the store has it, for agents whose schedules
/// changed or that said hello: what the sweep compares agents' hellos against.
#[derive(Default)]
pub struct ScheduleVersions(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl ScheduleVersions {
    /// The store has the agent's set at `version`.
    pub fn set(&self, agent: &str, version: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(agent.to_string(), version);
    }

    /// Every agent's version, copied (the lock is not held while sets are sent).
    pub fn all(&self) -> Vec<(String, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, v)| (a.clone(), *v))
            .collect()
    }
}

impl Backend {
    /// The agent's schedule set is now at `version`: sends it if the agent is
    /// connected (if not, its next hello brings it up to date).
    pub async fn schedules_changed(&self, agent: &str, version: u64) {
        self.schedule_versions.set(agent, version);
        if self.registry.get(agent).is_some_and(|a| a.alive(now_ms())) {
            self.send_schedules(agent).await;
        }
    }

    /// Sends the agent its whole current schedule set. Best effort: a lost command is
    /// sent again when the agent's hello shows an older version.
    pub async fn send_schedules(&self, agent: &str) {
        let (version, rows) = match self.store.agent_schedules(agent).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, %agent, "cannot read the agent's schedules");
                return;
            }
        };
        self.schedule_versions.set(agent, version);
        let schedules = rows
            .into_iter()
            .filter_map(|r| {
                let spec: ScheduleSpec = serde_json::from_str(&r.schedule_json).ok()?;
                Some(imn_proto::wire::Schedule {
                    measurement_id: r.measurement_id,
                    module: r.module,
                    params_json: r.params_json,
                    timeout_ms: r.timeout_ms,
                    interval_ms: spec.interval_ms,
                    start_ms: spec.start_ms,
                    stop_ms: spec.stop_ms,
                    jitter_ms: spec.jitter_ms,
                })
            })
            .collect();
        let kind = imn_proto::wire::CommandKind::Schedules { version, schedules };
        if let Err(e) = self.control(agent, kind).await {
            tracing::debug!(error = %e, %agent, "schedules not sent; the next hello retries");
        }
    }

    /// An agent said hello running schedule version `theirs`: sends the current set if
    /// it differs. A version above the store's (the store was replaced) moves the
    /// store's past it, so the agent takes the set the store has. `their_rules`: the
    /// digest of the rules its set carries, from an agent that checks them; when they
    /// are not the rules that bind it now (a new policy file), the set goes again under
    /// a new version.
    pub async fn reconcile_schedules(&self, agent: &str, theirs: u64, their_rules: Option<u64>) {
        let (ours, rows) = match self.store.agent_schedules(agent).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, %agent, "cannot read the agent's schedules");
                return;
            }
        };
        let stale_rules = their_rules.is_some_and(|d| {
            !rows.is_empty()
                && d != imn_proto::policy::TargetPolicy::digest(Some(
                    &self.security.target_policy(agent),
                ))
        });
        if theirs > ours || (theirs == ours && stale_rules) {
            if let Err(e) = self.store.raise_schedule_version(agent, theirs).await {
                tracing::warn!(error = %e, %agent, "cannot raise the schedule version");
                return;
            }
        } else if theirs == ours {
            self.schedule_versions.set(agent, ours);
            return;
        }
        self.send_schedules(agent).await;
    }

    /// Connected agents whose last hello shows an older schedule set than the
    /// backend's (a lost command): sent again, by the sweep.
    pub async fn resend_stale_schedules(&self, now: i64) {
        for (agent, version) in self.schedule_versions.all() {
            let stale = self
                .registry
                .get(&agent)
                .is_some_and(|a| a.alive(now) && a.hello.schedule_version < version);
            if stale {
                self.send_schedules(&agent).await;
            }
        }
    }
}

/// `GET /v1/measurements/{id}`: the measurement, each agent's state and result, and
/// progress.
pub async fn status(b: &Backend, id: &str) -> Result<Value, ApiError> {
    let m = b
        .store
        .measurement(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no measurement {id}")))?;
    if m.schedule_json.is_some() {
        return schedule_status(b, m).await;
    }
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

/// A recurring measurement's status: whether each agent has the schedule, and the
/// runs stored so far.
async fn schedule_status(b: &Backend, m: MeasurementRow) -> Result<Value, ApiError> {
    let spec: Option<ScheduleSpec> = m
        .schedule_json
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok());
    let progress = b.store.schedule_progress(&m.id).await?;
    let now = now_ms();
    let (mut acknowledged, mut offline, mut runs) = (0, 0, 0);
    let agents: Vec<Value> = progress
        .iter()
        .map(|p| {
            let entry = b.registry.get(&p.agent_id);
            let alive = entry.as_ref().is_some_and(|a| a.alive(now));
            let has = entry
                .as_ref()
                .is_some_and(|a| a.hello.schedule_version >= p.added_version);
            acknowledged += usize::from(has);
            offline += usize::from(!alive);
            runs += p.runs;
            json!({
                "agent_id": p.agent_id,
                "alive": alive,
                "schedule": if has { "received" } else { "pending" },
                "runs": p.runs,
                "last_run": p.last_scheduled_ms.map(crate::api::rfc3339),
            })
        })
        .collect();
    let total = progress.len();
    let state = match (m.stopped_ms, &spec) {
        (Some(_), _) => "stopped",
        (None, Some(s)) if s.stop_ms.is_some_and(|stop| stop <= now) => "finished",
        (None, Some(s)) if s.start_ms > now => "scheduled",
        _ => "running",
    };
    let mut summary =
        format!("{acknowledged}/{total} agents have the schedule, {runs} runs reported");
    if offline > 0 {
        summary.push_str(&format!(", {offline} offline"));
    }
    Ok(json!({
        "id": m.id,
        "module": m.module,
        "params": serde_json::from_str::<Value>(&m.params_json).unwrap_or(Value::Null),
        "agents_selection": serde_json::from_str::<Value>(&m.selection_json).unwrap_or(Value::Null),
        "description": m.description,
        "created": crate::api::rfc3339(m.created_ms),
        "schedule": spec.map(|s| json!({
            "interval_s": s.interval_ms as f64 / 1000.0,
            "start": crate::api::rfc3339(s.start_ms),
            "stop": s.stop_ms.map(crate::api::rfc3339),
            "jitter_s": s.jitter_ms as f64 / 1000.0,
        })),
        "stopped": m.stopped_ms.map(crate::api::rfc3339),
        "state": state,
        "progress": {
            "agents": total,
            "acknowledged": acknowledged,
            "offline": offline,
            "runs": runs,
            "summary": summary,
        },
        "agents": agents,
    }))
}

/// `DELETE /v1/measurements/{id}`: every request of the measurement that has not
/// finished is cancelled; agents running one are told to stop it (an agent that is
/// offline drops it: a cancelled request is never delivered again).
pub async fn stop(
    b: &Backend,
    id: &str,
    caller: &crate::security::Caller,
) -> Result<Value, ApiError> {
    let Some(m) = b.store.measurement(id).await? else {
        return Err(ApiError::NotFound(format!("no measurement {id}")));
    };
    if !caller.may_act_for(m.owner.as_deref()) {
        return Err(ApiError::Forbidden {
            rule: "owner".into(),
            message: format!(
                "measurement {id} was made by another token: only it, or an admin, may stop it"
            ),
        });
    }
    let now = now_ms();
    if m.schedule_json.is_some() {
        // A new schedule set, without it, for each of its agents.
        let versions = b.store.stop_schedule(id, now).await?;
        let agents = versions.len();
        for (agent, version) in versions {
            b.schedules_changed(&agent, version).await;
        }
        if m.stopped_ms.is_none() && m.daily_probes > 0 {
            // What it ran today is spent: deleting a schedule does not give its probes
            // back, nor does making and deleting it again and again.
            let spec =
                serde_json::from_str::<ScheduleSpec>(m.schedule_json.as_deref().unwrap_or(""));
            if let Ok(spec) = spec {
                let owner = crate::security::Caller {
                    token_id: m.owner.clone(),
                    ..Default::default()
                };
                crate::budget::charge(
                    b,
                    &owner,
                    crate::budget::ran_today(m.daily_probes, &spec, now),
                )
                .await;
            }
        }
        return Ok(json!({"id": id, "stopped": true, "agents_told": agents}));
    }
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
                        imn_proto::wire::CommandKind::Cancel {
                            request_id: req.id.clone(),
                        },
                    )
                    .await;
            }
        }
    }
    Ok(json!({"id": id, "cancelled": cancelled}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jitter is checked in ms, as agents check it (`jitter_ms < interval_ms`): a value
    /// that rounds up to the interval is refused here, not by every agent later.
    #[test]
    fn schedules_are_checked_as_agents_check_them() {
        let jitter = |j: f64| {
            ScheduleSpec::parse(json!({"interval_s": 1, "jitter_s": j}), 0).map(|s| s.jitter_ms)
        };
        assert_eq!(jitter(0.999).unwrap(), 999);
        assert!(matches!(
            jitter(0.9996),
            Err(ApiError::InvalidParams { field, .. }) if field == "/schedule/jitter_s"
        ));
        assert!(jitter(1.0).is_err() && jitter(-0.1).is_err());
    }
}
