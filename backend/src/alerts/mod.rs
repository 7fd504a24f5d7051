//! Alerts: rules on measurements that fire and resolve, and the anomaly detector
//! running over results as they are stored.
//!
//! - A **rule** watches one measurement, either with status-check thresholds
//!   ([`crate::checks`]: the same parameters as `GET …/status-check`) or for anomalies
//!   of chosen kinds ([`crate::anomaly`]). Its condition must hold for `for_s` before it
//!   fires, and be gone for `recovery_s` before it resolves. Firing and resolving are
//!   **alert events**.
//! - The **follower** reads results after a position, as rollups do, feeds each one's
//!   figures to the detector per (agent, target, module), and records each anomaly as
//!   an **anomaly event** with its evidence and the results that confirmed it.
//! - Events are numbered in one sequence (`e{seq}`), kept in two bounded rings (alerts
//!   and anomalies, so a flood of anomalies cannot push out alerts not yet delivered),
//!   stored as documents so they survive restarts, listed by the API, and streamed as
//!   Server-Sent Events. A rule's webhook gets its alerts in order, signed, retried
//!   with backoff ([`webhook`]).
//!
//! Nothing here runs on the ingest path: the follower and the evaluator are tasks of
//! their own that read the store, and each webhook is a task of its own, so a hanging
//! receiver holds up only its own rule's deliveries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imn_proto::now_ms;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::anomaly::{Anomaly, Detector, Kind};
use crate::error::ApiError;
use crate::service::Backend;

pub mod webhook;

/// The most rules a backend holds, and one API token may own.
pub const MAX_RULES: usize = 1_000;
pub const MAX_RULES_PER_OWNER: usize = 100;
/// The longest `window_s` a threshold rule judges over: each turn reads it back.
pub const MAX_RULE_WINDOW_S: u64 = 3_600;
/// Anomalies all rules together keep open.
pub const MAX_OPEN_TOTAL: usize = 50_000;
/// How long an anomaly reopened from the stored ones after a restart or a change of
/// leader counts, unless the detector confirms its end sooner.
pub const RESTORED_HOLD_S: i64 = 3_600;
/// Event numbers reserved in the store at a time: a backend that leads numbers only
/// within what it reserved, so no number is ever given out twice.
const SEQ_BLOCK: u64 = 100_000;
/// Events of each kind kept (in memory and in the store); the oldest go first.
pub const RING: usize = 10_000;
/// The longest `for_s` and `recovery_s`: a day.
pub const MAX_HOLD_S: u32 = 86_400;
/// How long a path change keeps an anomaly rule's condition true.
pub const PATH_HOLD_S: i64 = 300;
/// Anomalies (and breaching agents) an alert event lists.
pub const MAX_LISTED: usize = 20;
/// Results the follower reads per page, and pages per turn.
const PAGE: u32 = 500;
const PAGES_PER_TURN: usize = 20;

const KIND_RULE: &str = "alert_rule";
const KIND_ALERT: &str = "alert_event";
const KIND_ANOMALY: &str = "anomaly_event";
const KIND_DELIVERED: &str = "alert_delivered";
const KIND_PHASE: &str = "alert_phase";
const KIND_SEQ: &str = "alert_seq";

/// Alert settings, shared by `imn up` and `imn-backend`.
#[derive(Debug, Clone, clap::Args)]
pub struct AlertFlags {
    /// How often threshold rules are judged (1s to 1h).
    #[arg(long, env = "IMN_ALERT_EVERY", default_value = "10s", value_parser = crate::retention::parse_every)]
    pub alert_every: Duration,
    /// Networks webhooks may be sent to besides public addresses (CIDR, repeatable):
    /// loopback, private, link-local and other special networks are refused unless
    /// named here (e.g. 10.0.0.0/8 for a receiver on the LAN).
    #[arg(long, env = "IMN_WEBHOOK_ALLOW", value_delimiter = ',', value_parser = imn_proto::policy::Cidr::parse)]
    pub webhook_allow: Vec<imn_proto::policy::Cidr>,
    /// How long one webhook call may take before it counts as failed (1s to 1h).
    #[arg(long, env = "IMN_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = crate::retention::parse_every)]
    pub webhook_timeout: Duration,
    /// The longest wait between retries of a failing webhook (1s to 1h); waits
    /// start at 1 s and double.
    #[arg(long, env = "IMN_WEBHOOK_MAX_BACKOFF", default_value = "60s", value_parser = crate::retention::parse_every)]
    pub webhook_max_backoff: Duration,
}

impl AlertFlags {
    pub fn settings(&self) -> Settings {
        Settings {
            every: self.alert_every,
            webhook_allow: self.webhook_allow.clone(),
            webhook_timeout: self.webhook_timeout,
            max_backoff: self.webhook_max_backoff,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub every: Duration,
    pub webhook_allow: Vec<imn_proto::policy::Cidr>,
    pub webhook_timeout: Duration,
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            every: Duration::from_secs(10),
            webhook_allow: Vec::new(),
            webhook_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// A rule as a client sends it (`POST /v1/alert-rules`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleInput {
    pub name: String,
    pub measurement_id: String,
    /// Status-check parameters (`max_loss`, `max_rtt_median`, …) as strings or numbers.
    #[serde(default)]
    pub thresholds: BTreeMap<String, Value>,
    /// Anomaly kinds; given (even empty: the default kinds), the rule is an anomaly
    /// rule.
    #[serde(default)]
    pub anomalies: Option<Vec<String>>,
    #[serde(default)]
    pub for_s: u32,
    #[serde(default)]
    pub recovery_s: u32,
    #[serde(default)]
    pub webhook: Option<WebhookInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookInput {
    pub url: String,
    /// The HMAC-SHA256 key signatures are made with: 16 to 256 bytes.
    pub secret: String,
}

/// What a rule watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Threshold,
    Anomaly,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

/// A rule as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub measurement_id: String,
    pub module: String,
    pub kind: RuleKind,
    /// Status-check parameters, checked when the rule was made.
    pub thresholds: Vec<(String, String)>,
    /// Anomaly kinds that make the condition true.
    pub anomalies: Vec<String>,
    pub for_s: u32,
    pub recovery_s: u32,
    pub webhook: Option<Webhook>,
    pub owner: Option<String>,
    pub created_ms: i64,
}

impl Rule {
    /// The rule as the API shows it: the webhook's secret is never shown, and its URL
    /// (which often holds a receiver's own credential) only to the rule's owner and
    /// admins (`full`); others see its scheme and host.
    pub fn view(&self, phase: &Phase, full: bool) -> Value {
        let url = |u: &str| {
            if full {
                return u.to_string();
            }
            reqwest::Url::parse(u)
                .ok()
                .and_then(|p| {
                    let host = p.host_str()?.to_string();
                    Some(match p.port() {
                        Some(port) => format!("{}://{host}:{port}/…", p.scheme()),
                        None => format!("{}://{host}/…", p.scheme()),
                    })
                })
                .unwrap_or_else(|| "…".into())
        };
        json!({
            "id": self.id,
            "name": self.name,
            "measurement_id": self.measurement_id,
            "module": self.module,
            "kind": self.kind,
            "thresholds": self.thresholds.iter().cloned().collect::<BTreeMap<_, _>>(),
            "anomalies": self.anomalies,
            "for_s": self.for_s,
            "recovery_s": self.recovery_s,
            "webhook": self.webhook.as_ref().map(|w| json!({"url": url(&w.url), "secret_set": true})),
            "created": crate::api::rfc3339(self.created_ms),
            "state": phase.word(),
            "since": phase.since().map(crate::api::rfc3339),
        })
    }
}

/// Anomaly kinds a rule watches when it names none.
pub const DEFAULT_ANOMALIES: [&str; 3] = ["rtt_shift_up", "loss_burst", "path_change"];

fn invalid(field: &str, rule: &str, message: String) -> ApiError {
    ApiError::InvalidParams {
        field: field.into(),
        rule: rule.into(),
        message,
    }
}

/// Checks a rule as a client sent it, against its measurement's module.
pub fn check_input(input: RuleInput, module: &str, settings: &Settings) -> Result<Rule, ApiError> {
    let name = input.name.trim().to_string();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            "length",
            "name: 1 to 128 bytes, no control characters".into(),
        ));
    }
    for (field, v) in [("for_s", input.for_s), ("recovery_s", input.recovery_s)] {
        if v > MAX_HOLD_S {
            return Err(invalid(
                field,
                "range",
                format!("{field}: 0 to {MAX_HOLD_S} seconds (got {v})"),
            ));
        }
    }
    if input.thresholds.len() > 32 {
        return Err(invalid(
            "thresholds",
            "count",
            "thresholds: at most 32 parameters".into(),
        ));
    }
    let mut pairs = Vec::new();
    for (k, v) in &input.thresholds {
        let field = format!("thresholds.{k}");
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(invalid(
                    &field,
                    "type",
                    format!("{field}: a string or a number"),
                ))
            }
        };
        if k == "format" {
            return Err(invalid(
                &field,
                "unsupported",
                format!("{field}: alerts have no output format"),
            ));
        }
        pairs.push((k.clone(), text));
    }
    if let Some((_, w)) = pairs.iter().find(|(k, _)| k == "window_s") {
        if w.parse::<u64>().is_ok_and(|w| w > MAX_RULE_WINDOW_S) {
            return Err(invalid(
                "thresholds.window_s",
                "range",
                format!(
                    "thresholds.window_s: at most {MAX_RULE_WINDOW_S} for an alert rule (got {w})"
                ),
            ));
        }
    }
    crate::checks::Thresholds::parse(&pairs, module).map_err(|e| match e {
        ApiError::BadQuery {
            field,
            rule,
            message,
        } => invalid(
            &format!("thresholds.{field}"),
            &rule,
            format!("thresholds.{message}"),
        ),
        other => other,
    })?;
    let (kind, anomalies) = match input.anomalies {
        None => (RuleKind::Threshold, Vec::new()),
        Some(list) => {
            if !pairs.is_empty() {
                return Err(invalid(
                    "anomalies",
                    "exclusive",
                    "anomalies: a rule watches thresholds or anomalies, not both".into(),
                ));
            }
            if list.len() > Kind::ALL.len() {
                return Err(invalid(
                    "anomalies",
                    "count",
                    format!("anomalies: at most {} kinds", Kind::ALL.len()),
                ));
            }
            let mut kinds = Vec::new();
            for (i, k) in list.iter().enumerate() {
                if !Kind::ALL.iter().any(|x| x.as_str() == k) {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err(invalid(
                        &format!("anomalies[{i}]"),
                        "enum",
                        format!(
                            "anomalies[{i}]: {k:?} is not an anomaly kind; kinds: {}",
                            known.join(", ")
                        ),
                    ));
                }
                if !kinds.contains(k) {
                    kinds.push(k.clone());
                }
            }
            if kinds.is_empty() {
                kinds = DEFAULT_ANOMALIES.iter().map(|s| s.to_string()).collect();
            }
            (RuleKind::Anomaly, kinds)
        }
    };
    let webhook = match input.webhook {
        None => None,
        Some(w) => {
            webhook::check_url(&w.url, settings)
                .map_err(|m| invalid("webhook.url", "address", format!("webhook.url: {m}")))?;
            if !(16..=256).contains(&w.secret.len()) {
                return Err(invalid(
                    "webhook.secret",
                    "length",
                    "webhook.secret: 16 to 256 bytes".into(),
                ));
            }
            Some(Webhook {
                url: w.url,
                secret: w.secret,
            })
        }
    };
    Ok(Rule {
        id: format!("ar-{}", uuid::Uuid::new_v4().simple()),
        name,
        measurement_id: String::new(),
        module: module.to_string(),
        kind,
        thresholds: pairs,
        anomalies,
        for_s: input.for_s,
        recovery_s: input.recovery_s,
        webhook,
        owner: None,
        created_ms: now_ms(),
    })
}

/// Where a rule is between firing and resolving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Ok,
    /// The condition holds since then, not yet for `for_s`.
    Pending { since: i64 },
    /// Fired; the condition started then.
    Firing { since: i64 },
    /// Fired (since `fired`); the condition is gone since `since`, not yet for
    /// `recovery_s`.
    Recovering { fired: i64, since: i64 },
}

impl Phase {
    pub fn word(&self) -> &'static str {
        match self {
            Phase::Ok => "ok",
            Phase::Pending { .. } => "pending",
            Phase::Firing { .. } => "firing",
            Phase::Recovering { .. } => "recovering",
        }
    }

    fn since(&self) -> Option<i64> {
        match *self {
            Phase::Ok => None,
            Phase::Pending { since } | Phase::Firing { since } => Some(since),
            Phase::Recovering { fired, .. } => Some(fired),
        }
    }

    /// The next phase, given whether the condition holds `now`, and what changed:
    /// `Some(true)` fired, `Some(false)` resolved.
    pub fn step(self, holds: bool, now: i64, for_s: u32, recovery_s: u32) -> (Phase, Option<bool>) {
        let for_ms = i64::from(for_s) * 1000;
        let rec_ms = i64::from(recovery_s) * 1000;
        match (self, holds) {
            (Phase::Ok, false) => (Phase::Ok, None),
            (Phase::Ok, true) if for_ms == 0 => (Phase::Firing { since: now }, Some(true)),
            (Phase::Ok, true) => (Phase::Pending { since: now }, None),
            (Phase::Pending { .. }, false) => (Phase::Ok, None),
            (Phase::Pending { since }, true) => {
                if now.saturating_sub(since) >= for_ms {
                    (Phase::Firing { since }, Some(true))
                } else {
                    (self, None)
                }
            }
            (Phase::Firing { .. }, true) => (self, None),
            (Phase::Firing { .. }, false) if rec_ms == 0 => (Phase::Ok, Some(false)),
            (Phase::Firing { since }, false) => (
                Phase::Recovering {
                    fired: since,
                    since: now,
                },
                None,
            ),
            (Phase::Recovering { fired, .. }, true) => (Phase::Firing { since: fired }, None),
            (Phase::Recovering { since, .. }, false) => {
                if now.saturating_sub(since) >= rec_ms {
                    (Phase::Ok, Some(false))
                } else {
                    (self, None)
                }
            }
        }
    }
}

/// One event: an alert (a rule fired or resolved) or an anomaly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Place in the one sequence of both kinds; the API's id is `e{seq}`.
    pub seq: u64,
    /// `alert` or `anomaly`.
    pub kind: String,
    /// Place in its own kind's ring (its document key is `n % RING`).
    pub n: u64,
    pub at_ms: i64,
    pub body: Value,
}

impl Event {
    /// The event as the API, the stream and webhooks show it.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "id": format!("e{}", self.seq),
            "type": self.kind,
            "at": crate::api::rfc3339(self.at_ms),
        });
        if let (Some(o), Some(b)) = (v.as_object_mut(), self.body.as_object()) {
            for (k, x) in b {
                o.insert(k.clone(), x.clone());
            }
        }
        v
    }

    fn rule_id(&self) -> Option<&str> {
        self.body.get("rule_id").and_then(Value::as_str)
    }
}

/// An anomaly a rule's condition holds for, in short (its event has the evidence),
/// and when it stops counting (path changes, and anomalies restored from the store).
#[derive(Debug, Clone)]
struct Open {
    event: u64,
    anomaly: &'static str,
    agent: String,
    target: String,
    message: String,
    until_ms: Option<i64>,
}

impl Open {
    fn to_json(&self) -> Value {
        json!({
            "event": format!("e{}", self.event),
            "anomaly": self.anomaly,
            "agent": self.agent,
            "target": self.target,
            "message": self.message,
        })
    }
}

#[derive(Default)]
struct Inner {
    rules: BTreeMap<String, Rule>,
    phases: HashMap<String, Phase>,
    /// Per anomaly rule: the anomalies its condition holds for, by (agent, target,
    /// family), at most [`MAX_OPEN`] each and [`MAX_OPEN_TOTAL`] in all.
    open: HashMap<String, BTreeMap<(String, String, &'static str), Open>>,
    open_total: usize,
    /// Event numbers up to this one are reserved in the store for this backend.
    seq_limit: u64,
    /// The highest number reserved by any backend, as last read: ids up to it may
    /// exist (see `check_after`).
    known_limit: u64,
    /// Raised by every local change of rules, so a read of the store that began
    /// before it does not undo it.
    rules_gen: u64,
    alerts: VecDeque<Event>,
    anomalies: VecDeque<Event>,
    next_seq: u64,
    n_alert: u64,
    n_anomaly: u64,
    /// Webhook tasks by rule id.
    deliverers: HashMap<String, tokio::task::JoinHandle<()>>,
}

/// The most anomalies one rule keeps open.
const MAX_OPEN: usize = 10_000;

/// The alert engine's state, one per backend.
pub struct Alerts {
    inner: Mutex<Inner>,
    /// The newest event's sequence number: streams and webhooks wait on it.
    newest: tokio::sync::watch::Sender<u64>,
    settings: std::sync::OnceLock<Settings>,
    /// Until when (ms, this host's clock) this backend may act as the engine: its
    /// lease's end less a margin (see [`Lease`]); 0 when it does not hold it.
    leading_until: std::sync::atomic::AtomicI64,
    /// Raised each time this backend takes the lease (not when it renews it): an
    /// engine started under another epoch starts again.
    lease_epoch: std::sync::atomic::AtomicU64,
    /// When the engine last showed it runs (ms): the lease is renewed only while it
    /// does, so an engine that died or hangs lets another backend lead.
    engine_beat: std::sync::atomic::AtomicI64,
    pub counters: Counters,
}

#[derive(Default)]
pub struct Counters {
    pub delivered: std::sync::atomic::AtomicU64,
    pub failed_attempts: std::sync::atomic::AtomicU64,
    /// Times a webhook found alerts gone from the ring before it sent them.
    pub gaps: std::sync::atomic::AtomicU64,
    pub anomalies: std::sync::atomic::AtomicU64,
    pub results_judged: std::sync::atomic::AtomicU64,
}

impl Default for Alerts {
    fn default() -> Alerts {
        Alerts {
            inner: Mutex::new(Inner::default()),
            newest: tokio::sync::watch::channel(0).0,
            settings: std::sync::OnceLock::new(),
            leading_until: std::sync::atomic::AtomicI64::new(0),
            lease_epoch: std::sync::atomic::AtomicU64::new(0),
            engine_beat: std::sync::atomic::AtomicI64::new(0),
            counters: Counters::default(),
        }
    }
}

/// Which family of the open set an anomaly kind opens and which kind closes it.
fn family(k: &str) -> (&'static str, Option<&'static str>) {
    match k {
        "rtt_shift_up" => ("rtt", Some("rtt_shift_down")),
        "rtt_shift_down" => ("rtt", Some("rtt_shift_up")),
        "loss_burst" => ("loss", Some("loss_recovered")),
        "loss_recovered" => ("loss", Some("loss_burst")),
        _ => ("path", None),
    }
}

impl Alerts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the settings; only before the engine starts (later calls are ignored).
    pub fn set_settings(&self, s: Settings) {
        let _ = self.settings.set(s);
    }

    pub fn settings(&self) -> Settings {
        self.settings.get().cloned().unwrap_or_default()
    }

    /// A receiver of the newest event's sequence number.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// Whether this backend runs the engine now.
    pub fn is_leading(&self) -> bool {
        now_ms() < self.leading_until.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The engine shows it runs.
    fn beat(&self) {
        self.engine_beat
            .store(now_ms(), std::sync::atomic::Ordering::SeqCst);
    }

    /// The highest event id that may exist: what was announced, or reserved.
    pub fn highest_possible(&self) -> u64 {
        let g = self.lock();
        self.newest().max(g.known_limit).max(g.seq_limit)
    }

    /// Every rule with its phase, as `caller` may see it.
    pub fn rules(&self, caller: &crate::security::Caller) -> Vec<Value> {
        let g = self.lock();
        g.rules
            .values()
            .map(|r| {
                r.view(
                    g.phases.get(&r.id).unwrap_or(&Phase::Ok),
                    caller.may_act_for(r.owner.as_deref()),
                )
            })
            .collect()
    }

    pub fn rule(&self, id: &str, caller: &crate::security::Caller) -> Option<Value> {
        let g = self.lock();
        g.rules.get(id).map(|r| {
            r.view(
                g.phases.get(id).unwrap_or(&Phase::Ok),
                caller.may_act_for(r.owner.as_deref()),
            )
        })
    }

    /// The newest event's number.
    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    fn rule_of(&self, id: &str) -> Option<Rule> {
        self.lock().rules.get(id).cloned()
    }

    /// How many rules fire now.
    pub fn firing(&self) -> usize {
        let g = self.lock();
        g.phases
            .iter()
            .filter(|(id, p)| {
                g.rules.contains_key(*id)
                    && matches!(p, Phase::Firing { .. } | Phase::Recovering { .. })
            })
            .count()
    }

    /// Events after `after` (a sequence number), oldest first, at most `limit` (the
    /// oldest ones, or with `newest` the newest ones), of `kind` (None: both), passing
    /// `keep`.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        newest: bool,
        kind: Option<&str>,
        keep: impl Fn(&Event) -> bool,
    ) -> Vec<Event> {
        // Only what was announced (stored, or its store write over): an event in the
        // ring a moment before is not shown yet.
        let announced = self.newest();
        let g = self.lock();
        let mut out: Vec<Event> = Vec::new();
        for (k, ring) in [("alert", &g.alerts), ("anomaly", &g.anomalies)] {
            if kind.is_some_and(|x| x != k) {
                continue;
            }
            let start = ring.partition_point(|e| e.seq <= after);
            let range = ring
                .range(start..)
                .filter(|e| e.seq <= announced && keep(e));
            if newest {
                out.extend(range.rev().take(limit).cloned());
            } else {
                out.extend(range.take(limit).cloned());
            }
        }
        out.sort_by_key(|e| e.seq);
        if newest {
            let cut = out.len().saturating_sub(limit);
            out.drain(..cut);
        } else {
            out.truncate(limit);
        }
        out
    }

    /// The oldest announced alert event of `rule` after `after`.
    fn next_alert(&self, rule: &str, after: u64) -> Option<Event> {
        let announced = self.newest();
        let g = self.lock();
        let start = g.alerts.partition_point(|e| e.seq <= after);
        g.alerts
            .range(start..)
            .take_while(|e| e.seq <= announced)
            .find(|e| e.rule_id() == Some(rule))
            .cloned()
    }

    /// When alerts after `after` have left the ring (it is full and its oldest is
    /// newer): the oldest it holds.
    fn ring_passed(&self, after: u64) -> Option<u64> {
        let g = self.lock();
        let front = g.alerts.front()?.seq;
        (g.alerts.len() >= RING && front > after.saturating_add(1)).then_some(front)
    }

    /// Appends an event to its ring if this backend leads; returns it for storing.
    fn push_leading(&self, g: &mut Inner, kind: &str, at_ms: i64, body: Value) -> Option<Event> {
        if !self.is_leading() {
            return None;
        }
        Alerts::push(g, kind, at_ms, body)
    }

    /// Appends an event to its ring; returns it for storing. None when no number is
    /// reserved for it (this backend does not lead, or its block is used up).
    fn push(g: &mut Inner, kind: &str, at_ms: i64, body: Value) -> Option<Event> {
        if g.next_seq >= g.seq_limit {
            return None;
        }
        g.next_seq += 1;
        let (ring, n) = if kind == "alert" {
            g.n_alert = g.n_alert.saturating_add(1);
            (&mut g.alerts, g.n_alert)
        } else {
            g.n_anomaly = g.n_anomaly.saturating_add(1);
            (&mut g.anomalies, g.n_anomaly)
        };
        let e = Event {
            seq: g.next_seq,
            kind: kind.to_string(),
            n,
            at_ms,
            body,
        };
        ring.push_back(e.clone());
        while ring.len() > RING {
            ring.pop_front();
        }
        Some(e)
    }
}

async fn store_event(b: &Backend, e: &Event) {
    let kind = if e.kind == "alert" {
        KIND_ALERT
    } else {
        KIND_ANOMALY
    };
    let key = format!("{:05}", e.n % RING as u64);
    let text = serde_json::to_string(e).unwrap_or_default();
    if let Err(err) = b.store.put_doc(kind, &key, &text, now_ms()).await {
        tracing::warn!(error = %err, event = e.seq, "alert event not stored; kept in memory");
    }
}

/// Reads rules back from the store: new ones (made through another backend) are
/// added, deleted ones dropped with their state and webhook task. A local change
/// made while the store was read wins (the next read catches up).
pub async fn sync_rules(b: &Backend) -> Result<(), crate::store::StoreError> {
    let gen = b.alerts.lock().rules_gen;
    let docs = b.store.docs(KIND_RULE).await?;
    let mut rules = BTreeMap::new();
    for (_, text) in docs {
        match serde_json::from_str::<Rule>(&text) {
            Ok(r) => {
                rules.insert(r.id.clone(), r);
            }
            Err(e) => {
                tracing::warn!(error = %e, "an alert rule in the store is unreadable; skipped")
            }
        }
    }
    let mut g = b.alerts.lock();
    if g.rules_gen != gen {
        return Ok(());
    }
    let gone: Vec<String> = g
        .rules
        .keys()
        .filter(|id| !rules.contains_key(*id))
        .cloned()
        .collect();
    for id in gone {
        forget_rule(&mut g, &id);
    }
    g.rules = rules;
    Ok(())
}

fn forget_rule(g: &mut Inner, id: &str) {
    g.phases.remove(id);
    if let Some(open) = g.open.remove(id) {
        g.open_total = g.open_total.saturating_sub(open.len());
    }
    if let Some(h) = g.deliverers.remove(id) {
        h.abort();
    }
}

/// A rule's phase as stored when it fired or resolved.
#[derive(Serialize, Deserialize)]
struct PhaseDoc {
    firing: bool,
    since_ms: i64,
}

/// Reads events back from the store, replacing both rings, and each rule's phase
/// (firing stays firing).
pub async fn sync_events(b: &Backend) -> Result<(), crate::store::StoreError> {
    let mut alerts: Vec<Event> = Vec::new();
    let mut anomalies: Vec<Event> = Vec::new();
    for (kind, out) in [(KIND_ALERT, &mut alerts), (KIND_ANOMALY, &mut anomalies)] {
        for (_, text) in b.store.docs(kind).await? {
            if let Ok(e) = serde_json::from_str::<Event>(&text) {
                out.push(e);
            }
        }
        out.sort_by_key(|e| e.seq);
    }
    let phases = b.store.docs(KIND_PHASE).await?;
    let known_limit: u64 = b
        .store
        .doc(KIND_SEQ, "limit")
        .await?
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let mut g = b.alerts.lock();
    g.known_limit = known_limit;
    g.next_seq = alerts
        .last()
        .map(|e| e.seq)
        .max(anomalies.last().map(|e| e.seq))
        .unwrap_or(0);
    g.n_alert = alerts.iter().map(|e| e.n).max().unwrap_or(0);
    g.n_anomaly = anomalies.iter().map(|e| e.n).max().unwrap_or(0);
    g.phases.clear();
    for (id, text) in phases {
        if !g.rules.contains_key(&id) {
            continue;
        }
        if let Ok(p) = serde_json::from_str::<PhaseDoc>(&text) {
            let phase = if p.firing {
                Phase::Firing { since: p.since_ms }
            } else {
                Phase::Ok
            };
            g.phases.insert(id, phase);
        }
    }
    g.alerts = alerts.into();
    g.anomalies = anomalies.into();
    let newest = g.next_seq;
    drop(g);
    b.alerts.newest.send_replace(newest);
    Ok(())
}

/// Reads rules and events back from the store.
pub async fn load(b: &Backend) -> Result<(), crate::store::StoreError> {
    sync_rules(b).await?;
    sync_events(b).await
}

/// Adds a rule (checked against its measurement, which the caller must be allowed to
/// act for), stores it and starts its webhook.
pub async fn add_rule(
    b: &Arc<Backend>,
    input: RuleInput,
    caller: &crate::security::Caller,
) -> Result<Value, ApiError> {
    if input.measurement_id.is_empty() || input.measurement_id.len() > 128 {
        return Err(invalid(
            "measurement_id",
            "length",
            "measurement_id: 1 to 128 bytes".into(),
        ));
    }
    let id = input.measurement_id.clone();
    let Some(m) = b.store.measurement(&id).await? else {
        return Err(invalid(
            "measurement_id",
            "exists",
            format!("measurement_id: no measurement {id}"),
        ));
    };
    if !caller.may_act_for(m.owner.as_deref()) {
        return Err(ApiError::Forbidden {
            rule: "owner".into(),
            message: format!(
                "measurement {id} was made by another token: only it, or an admin, may put alert rules on it"
            ),
        });
    }
    let mut rule = check_input(input, &m.module, &b.alerts.settings())?;
    rule.measurement_id = id;
    rule.owner = caller.token_id.clone();
    let text = serde_json::to_string(&rule).map_err(|e| ApiError::Internal(e.to_string()))?;
    {
        // Counted and taken in one step: racing requests cannot pass the limits.
        let mut g = b.alerts.lock();
        if g.rules.len() >= MAX_RULES {
            return Err(ApiError::OverLimit {
                limit: "max_alert_rules",
                field: "name".into(),
                message: format!(
                    "a backend holds at most {MAX_RULES} alert rules; delete one first"
                ),
            });
        }
        let owned = g.rules.values().filter(|r| r.owner == rule.owner).count();
        if rule.owner.is_some() && owned >= MAX_RULES_PER_OWNER {
            return Err(ApiError::OverLimit {
                limit: "max_alert_rules_per_token",
                field: "name".into(),
                message: format!(
                    "a token may own at most {MAX_RULES_PER_OWNER} alert rules; delete one first"
                ),
            });
        }
        g.rules_gen += 1;
        g.rules.insert(rule.id.clone(), rule.clone());
    }
    if rule.webhook.is_some() {
        // Its webhook starts at the newest event: it hears only its own alerts,
        // and it has none yet.
        let start = b.alerts.newest();
        let stored = b
            .store
            .put_doc(KIND_DELIVERED, &rule.id, &start.to_string(), now_ms())
            .await;
        if let Err(e) = stored {
            let mut g = b.alerts.lock();
            g.rules_gen += 1;
            g.rules.remove(&rule.id);
            return Err(e.into());
        }
    }
    if let Err(e) = b.store.put_doc(KIND_RULE, &rule.id, &text, now_ms()).await {
        let mut g = b.alerts.lock();
        g.rules_gen += 1;
        g.rules.remove(&rule.id);
        return Err(e.into());
    }
    // A read of the store that began before the write must not drop it.
    b.alerts.lock().rules_gen += 1;
    if rule.webhook.is_some() && b.alerts.is_leading() {
        ensure_deliverer(b, &rule.id);
    }
    Ok(rule.view(&Phase::Ok, true))
}

/// Deletes a rule (its maker or an admin); its events stay.
pub async fn delete_rule(
    b: &Backend,
    id: &str,
    caller: &crate::security::Caller,
) -> Result<Value, ApiError> {
    let Some(rule) = b.alerts.rule_of(id) else {
        return Err(ApiError::NotFound(format!("no alert rule {id}")));
    };
    if !caller.may_act_for(rule.owner.as_deref()) {
        return Err(ApiError::Forbidden {
            rule: "owner".into(),
            message: format!(
                "alert rule {id} was made by another token: only it, or an admin, may delete it"
            ),
        });
    }
    {
        // Its webhook stops first, so it cannot write its position back.
        let mut g = b.alerts.lock();
        g.rules_gen += 1;
        g.rules.remove(id);
        forget_rule(&mut g, id);
    }
    let deleted = b.store.delete_doc(KIND_RULE, id).await;
    // A read of the store that began before the delete must not bring it back.
    b.alerts.lock().rules_gen += 1;
    deleted?;
    let _ = b.store.delete_doc(KIND_DELIVERED, id).await;
    let _ = b.store.delete_doc(KIND_PHASE, id).await;
    Ok(json!({"deleted": id}))
}

/// Starts the webhook task of rule `id` unless it runs.
fn ensure_deliverer(b: &Arc<Backend>, id: &str) {
    let mut g = b.alerts.lock();
    if g.deliverers.get(id).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let h = tokio::spawn(deliver(b.clone(), id.to_string()));
    g.deliverers.insert(id.to_string(), h);
}

/// One rule's webhook: its alerts in order, each until the receiver takes it
/// (a 2xx), waiting 1 s, 2 s, 4 s … up to the maximum between tries. The position
/// is stored after each delivery, so a restart resends at most the one in flight.
/// Only while this backend leads: it checks before every call.
async fn deliver(b: Arc<Backend>, id: String) {
    let settings = b.alerts.settings();
    let client = match webhook::client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, rule = %id, "webhook client not built");
            return;
        }
    };
    let mut after: u64 = match b.store.doc(KIND_DELIVERED, &id).await {
        Ok(Some(t)) => t.trim().parse().unwrap_or(0),
        Ok(None) => b.alerts.newest(),
        Err(e) => {
            tracing::warn!(error = %e, rule = %id, "webhook position not read; next turn");
            return;
        }
    };
    let mut newest = b.alerts.watch();
    loop {
        let Some(rule) = b.alerts.rule_of(&id) else {
            return;
        };
        let Some(hook) = rule.webhook else {
            return;
        };
        if !b.alerts.is_leading() {
            return;
        }
        if let Some(front) = b.alerts.ring_passed(after) {
            // The receiver was away for longer than the ring holds: alerts between
            // `after` and the ring's oldest are gone (counted; the gap is logged).
            b.alerts
                .counters
                .gaps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(rule = %id, after, front, "alerts left the ring before delivery");
            after = front.saturating_sub(1);
        }
        let Some(ev) = b.alerts.next_alert(&id, after) else {
            // Nothing to send: wait for a new event (or look again in a while).
            let _ = tokio::time::timeout(Duration::from_secs(5), newest.changed()).await;
            continue;
        };
        let body = serde_json::to_vec(&ev.to_json()).unwrap_or_default();
        let mut wait = Duration::from_secs(1);
        loop {
            if !b.alerts.is_leading() || b.alerts.rule_of(&id).is_none() {
                return;
            }
            // A call may not outlive this backend's lead: another would send the
            // same alert meanwhile.
            let left = b
                .alerts
                .leading_until
                .load(std::sync::atomic::Ordering::SeqCst)
                .saturating_sub(now_ms());
            let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
            let event_id = format!("e{}", ev.seq);
            let call = webhook::send(&client, &hook, &settings, &event_id, &body);
            let sent = match tokio::time::timeout(left, call).await {
                Ok(r) => r,
                Err(_) => return,
            };
            match sent {
                Ok(()) => {
                    b.alerts
                        .counters
                        .delivered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    b.alerts
                        .counters
                        .failed_attempts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(rule = %id, event = ev.seq, error = %e, retry_in_ms = wait.as_millis() as u64, "webhook failed; will retry");
                    tokio::time::sleep(webhook::jitter(wait)).await;
                    wait = (wait * 2).min(settings.max_backoff);
                }
            }
        }
        after = ev.seq;
        if b.alerts.rule_of(&id).is_none() || !b.alerts.is_leading() {
            return;
        }
        // Only forward: a position another leader stored further on stays.
        let stored = b.store.doc(KIND_DELIVERED, &id).await;
        let ahead =
            matches!(&stored, Ok(Some(t)) if t.trim().parse::<u64>().is_ok_and(|s| s >= after));
        if !ahead {
            let written = b
                .store
                .swap_doc(
                    KIND_DELIVERED,
                    &id,
                    stored.ok().flatten().as_deref(),
                    &after.to_string(),
                    now_ms(),
                )
                .await;
            if let Err(e) = written {
                tracing::warn!(error = %e, rule = %id, "webhook position not stored");
            }
        }
    }
}

/// How long the engine's lease lasts, when it is renewed (this much left), and how
/// long before its end a holder stops (so two never run at once, given clocks that
/// agree within the margin).
const LEASE_MS: i64 = 15_000;
const RENEW_MS: i64 = 12_000;
const MARGIN_MS: i64 = 5_000;
const KIND_LEASE: &str = "lease";

/// With several backends on one database, one runs the engine (detector, rules,
/// webhooks): the one holding a lease document, taken and renewed by compare and
/// set in a task of its own (so a long turn of the engine cannot outlive it). A
/// holder that cannot renew stops [`MARGIN_MS`] before its lease ends: every event,
/// rule judgement and webhook call checks first. Another takes it once it has ended.
#[derive(Default)]
struct Lease {
    until_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct LeaseDoc {
    holder: String,
    until_ms: i64,
}

impl Lease {
    /// Takes or renews the lease if it can; whether this backend may run the engine.
    async fn hold(&mut self, b: &Backend) -> bool {
        let me = b.instance.to_string();
        let now = now_ms();
        let mine = |until_ms| {
            serde_json::to_string(&LeaseDoc {
                holder: me.clone(),
                until_ms,
            })
            .unwrap_or_default()
        };
        let cur = match b.store.doc(KIND_LEASE, "alerts").await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "alert lease not read");
                return now < self.until_ms.saturating_sub(MARGIN_MS);
            }
        };
        let parsed = cur
            .as_deref()
            .and_then(|t| serde_json::from_str::<LeaseDoc>(t).ok());
        let take = match &parsed {
            None => true,
            Some(l) if l.holder == me => l.until_ms.saturating_sub(now) < RENEW_MS,
            Some(l) => l.until_ms < now,
        };
        if take {
            let until = now.saturating_add(LEASE_MS);
            match b
                .store
                .swap_doc(KIND_LEASE, "alerts", cur.as_deref(), &mine(until), now)
                .await
            {
                Ok(true) => self.until_ms = until,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "alert lease not written"),
            }
        } else if let Some(l) = parsed.filter(|l| l.holder == me) {
            self.until_ms = l.until_ms;
        } else {
            self.until_ms = 0;
        }
        now < self.until_ms.saturating_sub(MARGIN_MS)
    }
}

/// Keeps the lease: every second, takes or renews it and publishes until when this
/// backend may act (`Alerts::is_leading`).
async fn keep_lease(b: Arc<Backend>) {
    let mut lease = Lease::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        tick.tick().await;
        // An engine that has not shown it runs for a while (it died, or hangs) must
        // not keep the lease from the others.
        let beat = b
            .alerts
            .engine_beat
            .load(std::sync::atomic::Ordering::SeqCst);
        let alive = now_ms().saturating_sub(beat) < ENGINE_STALE_MS;
        let holds = alive && lease.hold(&b).await;
        let until = if holds {
            lease.until_ms.saturating_sub(MARGIN_MS)
        } else {
            0
        };
        if holds && !held {
            b.alerts
                .lease_epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        held = holds;
        b.alerts
            .leading_until
            .store(until, std::sync::atomic::Ordering::SeqCst);
        if !holds {
            b.alerts.lock().seq_limit = 0;
        }
    }
}

/// How long the engine may go without showing it runs before the lease is let go.
const ENGINE_STALE_MS: i64 = 60_000;

/// Reserves event numbers up to `SEQ_BLOCK` past `from` (at least the stored
/// reservation), by compare and set on the stored high-water mark.
async fn reserve_seqs(b: &Backend, from: u64) -> Result<bool, crate::store::StoreError> {
    let cur = b.store.doc(KIND_SEQ, "limit").await?;
    let stored: u64 = cur
        .as_deref()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let base = from.max(stored);
    let limit = base.saturating_add(SEQ_BLOCK);
    if !b
        .store
        .swap_doc(
            KIND_SEQ,
            "limit",
            cur.as_deref(),
            &limit.to_string(),
            now_ms(),
        )
        .await?
    {
        return Ok(false);
    }
    let mut g = b.alerts.lock();
    g.next_seq = g.next_seq.max(base);
    g.seq_limit = limit;
    g.known_limit = limit;
    Ok(true)
}

/// Extends this leader's block past `limit`, its end: only if the stored mark is
/// still that end (anything else means another backend reserved numbers: this one
/// stops numbering until it starts leading again).
async fn extend_seqs(b: &Backend, limit: u64) -> Result<(), crate::store::StoreError> {
    let new = limit.saturating_add(SEQ_BLOCK);
    let ok = b
        .store
        .swap_doc(
            KIND_SEQ,
            "limit",
            Some(&limit.to_string()),
            &new.to_string(),
            now_ms(),
        )
        .await?;
    let mut g = b.alerts.lock();
    if ok && g.seq_limit == limit {
        g.seq_limit = new;
        g.known_limit = new;
    } else if !ok {
        tracing::warn!("alert engine: another backend reserved event numbers; stopping here");
        g.seq_limit = 0;
    }
    Ok(())
}

/// Becomes the engine: reads everything back, numbers events past every number
/// given out before (stored events, webhook positions, the stored reservation), and
/// reopens the anomalies of anomaly rules from the stored anomaly events.
pub async fn start_leading(b: &Backend) -> Result<bool, crate::store::StoreError> {
    load(b).await?;
    let delivered = b
        .store
        .docs(KIND_DELIVERED)
        .await?
        .iter()
        .filter_map(|(_, t)| t.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let from = b.alerts.lock().next_seq.max(delivered);
    if !reserve_seqs(b, from).await? {
        return Ok(false);
    }
    let mut g = b.alerts.lock();
    for open in g.open.values_mut() {
        open.clear();
    }
    g.open_total = 0;
    let events: Vec<Event> = g.anomalies.iter().cloned().collect();
    let now = now_ms();
    for e in events {
        reopen(&mut g, &e, now.saturating_add(RESTORED_HOLD_S * 1000), now);
    }
    let newest = g.next_seq;
    drop(g);
    b.alerts.newest.send_replace(newest);
    Ok(true)
}

/// Opens (or closes) anomaly event `e` on the anomaly rules of its measurement;
/// `hold` is how long an opened one counts (path changes count [`PATH_HOLD_S`]
/// from `now` at most).
fn reopen(g: &mut Inner, e: &Event, hold: i64, now: i64) {
    let s = |k: &str| e.body.get(k).and_then(Value::as_str).unwrap_or_default();
    let Some(kind) = Kind::ALL
        .iter()
        .map(|k| k.as_str())
        .find(|k| *k == s("anomaly"))
    else {
        return;
    };
    let measurement = s("measurement_id").to_string();
    let (fam, closes_with) = family(kind);
    let rules: Vec<(String, bool, bool)> = g
        .rules
        .values()
        .filter(|r| {
            r.kind == RuleKind::Anomaly
                && r.measurement_id == measurement
                // A stored anomaly from before the rule was made does not open it.
                && (hold == i64::MAX || e.at_ms >= r.created_ms.saturating_sub(60_000))
        })
        .map(|r| {
            (
                r.id.clone(),
                r.anomalies.iter().any(|x| x == kind),
                closes_with.is_some_and(|c| r.anomalies.iter().any(|x| x == c)),
            )
        })
        .collect();
    let k = (s("agent").to_string(), s("target").to_string(), fam);
    for (rid, opens, closes) in rules {
        let total = g.open_total;
        let open = g.open.entry(rid).or_default();
        if opens {
            if !open.contains_key(&k) && (open.len() >= MAX_OPEN || total >= MAX_OPEN_TOTAL) {
                continue;
            }
            let until_ms = if fam == "path" {
                // From the change itself (a stored one counts only what is left).
                let at = if hold == i64::MAX {
                    now
                } else {
                    e.at_ms.min(now)
                };
                let until = at.saturating_add(PATH_HOLD_S * 1000);
                if until <= now {
                    continue;
                }
                Some(until)
            } else if hold == i64::MAX {
                None
            } else {
                Some(hold)
            };
            let added = open
                .insert(
                    k.clone(),
                    Open {
                        event: e.seq,
                        anomaly: kind,
                        agent: k.0.clone(),
                        target: k.1.clone(),
                        message: s("message").chars().take(512).collect(),
                        until_ms,
                    },
                )
                .is_none();
            if added {
                g.open_total += 1;
            }
        } else if closes && open.remove(&k).is_some() {
            g.open_total = g.open_total.saturating_sub(1);
        }
    }
}

/// What the engine keeps while this backend leads.
struct Engine {
    /// The lease epoch it started under.
    epoch: u64,
    cursor: i64,
    detector: Detector,
    judged: Option<tokio::time::Instant>,
    /// The last rule judged when a judging turn ran out of time.
    judge_after: Option<String>,
}

/// The engine: a task keeps the lease ([`keep_lease`]); leading, every second this
/// follows stored results for the detector, reads rules back (made through other
/// backends) every 5 s, judges rules every `Settings::every` within a time budget,
/// and runs the webhooks; not leading, it stops them all and reads rules and events
/// back every 5 s so that its API answers as the leader's.
pub async fn run(b: Arc<Backend>) {
    tokio::spawn(keep_lease(b.clone()));
    let every = b.alerts.settings().every;
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut engine: Option<Engine> = None;
    let mut synced: Option<tokio::time::Instant> = None;
    let sync_every = Duration::from_secs(5);
    b.alerts.beat();
    loop {
        tick.tick().await;
        b.alerts.beat();
        let now = tokio::time::Instant::now();
        let epoch = b
            .alerts
            .lease_epoch
            .load(std::sync::atomic::Ordering::SeqCst);
        if engine.as_ref().is_some_and(|e| e.epoch != epoch) {
            // The lease was lost and taken again between two turns: what this
            // engine holds may be older than another leader's; start again.
            engine = None;
            for (_, h) in b.alerts.lock().deliverers.drain() {
                h.abort();
            }
        }
        if !b.alerts.is_leading() {
            if engine.take().is_some() {
                tracing::info!("alert engine: lease lost; stopping here");
            }
            for (_, h) in b.alerts.lock().deliverers.drain() {
                h.abort();
            }
            b.alerts.lock().seq_limit = 0;
            if synced.is_none_or(|t| now.duration_since(t) >= sync_every) {
                synced = Some(now);
                if let Err(e) = load(&b).await {
                    tracing::debug!(error = %e, "alerts not read back");
                }
            }
            continue;
        }
        let e = match engine.as_mut() {
            Some(e) => e,
            None => {
                // Leading from now: the store has what the last leader did. The
                // detector starts at the newest result: its baselines are learnt
                // anew (a few results per key).
                let started = match start_leading(&b).await {
                    Ok(true) => b.store.latest_position().await.map(Some),
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                };
                let cursor = match started {
                    Ok(Some(c)) => c,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "alert engine: store unreadable; next turn");
                        continue;
                    }
                };
                tracing::info!("alert engine: leading");
                start_deliverers(&b);
                synced = Some(now);
                engine.insert(Engine {
                    epoch,
                    cursor,
                    detector: Detector::new(crate::anomaly::Config::default()),
                    judged: None,
                    judge_after: None,
                })
            }
        };
        // Numbers for the next events, well ahead of need.
        let (next, limit) = {
            let g = b.alerts.lock();
            (g.next_seq, g.seq_limit)
        };
        if limit > 0 && limit.saturating_sub(next) < SEQ_BLOCK / 2 {
            if let Err(err) = extend_seqs(&b, limit).await {
                tracing::warn!(error = %err, "alert engine: event numbers not reserved");
            }
        }
        match follow(&b, &mut e.detector, e.cursor).await {
            Ok(c) => e.cursor = c,
            Err(err) => tracing::warn!(error = %err, "alert follower: read failed; next turn"),
        }
        if synced.is_none_or(|t| now.duration_since(t) >= sync_every) {
            synced = Some(now);
            if let Err(err) = sync_rules(&b).await {
                tracing::debug!(error = %err, "alert rules not read back");
            }
            start_deliverers(&b);
        }
        if e.judged.is_none_or(|t| now.duration_since(t) >= every) {
            e.judged = Some(now);
            e.judge_after =
                judge(&b, e.judge_after.take(), every.max(Duration::from_secs(5))).await;
        }
    }
}

/// Starts the webhook task of every rule with a webhook that has none running.
fn start_deliverers(b: &Arc<Backend>) {
    let ids: Vec<String> = b
        .alerts
        .lock()
        .rules
        .values()
        .filter(|r| r.webhook.is_some())
        .map(|r| r.id.clone())
        .collect();
    for id in ids {
        ensure_deliverer(b, &id);
    }
}

/// Feeds results stored after `cursor` to the detector; records anomalies and opens
/// them on the anomaly rules of their measurement. Returns the new cursor.
pub async fn follow(
    b: &Backend,
    detector: &mut Detector,
    mut cursor: i64,
) -> Result<i64, crate::store::StoreError> {
    use imn_proto::results::ModuleOutput;
    use imn_proto::wire::RequestState;
    for _ in 0..PAGES_PER_TURN {
        b.alerts.beat();
        if !b.alerts.is_leading() {
            break;
        }
        let page = b
            .store
            .results_page(crate::store::ResultFilter {
                after: cursor,
                limit: PAGE,
                ..Default::default()
            })
            .await?;
        let full = page.len() == PAGE as usize;
        let mut found: Vec<(Anomaly, Option<String>)> = Vec::new();
        for (pos, row, measurement) in &page {
            cursor = *pos;
            if row.state != RequestState::Succeeded {
                continue;
            }
            let Some(out) = ModuleOutput::from_api_json(&row.module, &row.result) else {
                continue;
            };
            b.alerts
                .counters
                .results_judged
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let at = if row.at_ms.abs_diff(row.stored_ms) > 86_400_000 {
                row.stored_ms
            } else {
                row.at_ms
            };
            let reference = format!("c{pos}");
            for f in out.figures() {
                let key = crate::anomaly::Key::new(&row.agent_id, &f.target, &row.module);
                for a in detector.observe(&key, at, &reference, &f) {
                    found.push((a, measurement.clone()));
                }
            }
        }
        for (a, m) in found {
            record_anomaly(b, a, m).await;
        }
        if !full {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(cursor)
}

/// Records one anomaly as an event and opens (or closes) it on the anomaly rules of
/// its measurement. Only while this backend leads (and has numbers reserved).
pub async fn record_anomaly(b: &Backend, a: Anomaly, measurement: Option<String>) {
    b.alerts
        .counters
        .anomalies
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut body = serde_json::to_value(&a).unwrap_or_default();
    if let Some(o) = body.as_object_mut() {
        o.insert("measurement_id".into(), json!(measurement));
        o.insert("anomaly".into(), json!(a.kind.as_str()));
        o.remove("kind");
        o.remove("at_ms");
    }
    let event = {
        let mut g = b.alerts.lock();
        let Some(e) = b.alerts.push_leading(&mut g, "anomaly", a.at_ms, body) else {
            tracing::debug!("anomaly not recorded: this backend does not lead");
            return;
        };
        reopen(&mut g, &e, i64::MAX, now_ms());
        e
    };
    // Stored, then announced.
    store_event(b, &event).await;
    b.alerts.newest.send_replace(event.seq);
}

/// Judges the rules, starting after rule `after` (by id), until each was judged
/// once or the `budget` is spent; records what fired and resolved. Returns the last
/// rule judged when the time ran out (None: all were).
pub async fn judge(b: &Arc<Backend>, after: Option<String>, budget: Duration) -> Option<String> {
    let started = tokio::time::Instant::now();
    let rules: Vec<Rule> = {
        let g = b.alerts.lock();
        match &after {
            Some(a) => g
                .rules
                .range::<String, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .chain(g.rules.range::<String, _>(..=a))
                .map(|(_, r)| r.clone())
                .collect(),
            None => g.rules.values().cloned().collect(),
        }
    };
    let n = rules.len();
    let mut last: Option<String> = after;
    for (i, rule) in rules.iter().enumerate() {
        b.alerts.beat();
        if started.elapsed() >= budget {
            tracing::warn!(
                judged = i,
                rules = n,
                "alert rules: the turn's time ran out; the rest go first next turn"
            );
            return last;
        }
        if !b.alerts.is_leading() {
            return last;
        }
        last = Some(rule.id.clone());
        let now = now_ms();
        let (holds, details) = match rule.kind {
            RuleKind::Threshold => {
                match crate::checks::run(b, &rule.measurement_id, &rule.thresholds).await {
                    Ok((report, _)) => {
                        let breaches: Vec<Value> = report
                            .breaches
                            .iter()
                            .take(MAX_LISTED)
                            .map(|x| json!(x))
                            .collect();
                        (
                            !report.healthy,
                            json!({
                                "summary": report.summary,
                                "breaching_agents": report.breaching_agents,
                                "agents": report.agents,
                                "breaches": breaches,
                            }),
                        )
                    }
                    Err(ApiError::NotFound(m)) => {
                        // The measurement is gone: nothing breaches any more.
                        (false, json!({"summary": m}))
                    }
                    Err(e) => {
                        tracing::debug!(rule = %rule.id, error = %e, "alert rule not judged");
                        continue;
                    }
                }
            }
            RuleKind::Anomaly => {
                let mut g = b.alerts.lock();
                let removed;
                let (holds, details) = {
                    let open = g.open.entry(rule.id.clone()).or_default();
                    let before = open.len();
                    open.retain(|_, o| o.until_ms.is_none_or(|u| u > now));
                    removed = before - open.len();
                    let listed: Vec<Value> =
                        open.values().take(MAX_LISTED).map(Open::to_json).collect();
                    let n = open.len();
                    let words: Vec<String> = open
                        .values()
                        .take(3)
                        .map(|o| format!("{} {}: {}", o.agent, o.target, o.message))
                        .collect();
                    (
                        n > 0,
                        json!({
                            "summary": if n == 0 {
                                "no anomaly open".to_string()
                            } else {
                                format!("{n} anomal{} open: {}", if n == 1 { "y" } else { "ies" }, words.join("; "))
                            },
                            "open_anomalies": n,
                            "anomalies": listed,
                        }),
                    )
                };
                g.open_total = g.open_total.saturating_sub(removed);
                (holds, details)
            }
        };
        let event = {
            let mut g = b.alerts.lock();
            if !g.rules.contains_key(&rule.id) {
                continue;
            }
            let phase = g.phases.get(&rule.id).copied().unwrap_or_default();
            let (next, changed) = phase.step(holds, now, rule.for_s, rule.recovery_s);
            match changed {
                None => {
                    g.phases.insert(rule.id.clone(), next);
                    None
                }
                Some(fired) => {
                    let since = match (fired, phase) {
                        (true, _) => next.since().unwrap_or(now),
                        (false, p) => p.since().unwrap_or(now),
                    };
                    let mut body = json!({
                        "rule_id": rule.id,
                        "rule_name": rule.name,
                        "measurement_id": rule.measurement_id,
                        "rule_kind": rule.kind,
                        "state": if fired { "firing" } else { "resolved" },
                        "since_ms": since,
                        "since": crate::api::rfc3339(since),
                    });
                    if let (Some(o), Some(d)) = (body.as_object_mut(), details.as_object()) {
                        for (k, v) in d {
                            o.insert(k.clone(), v.clone());
                        }
                    }
                    // No number, no change: judged again next turn.
                    let e = b.alerts.push_leading(&mut g, "alert", now, body);
                    if e.is_some() {
                        g.phases.insert(rule.id.clone(), next);
                    }
                    e.map(|e| (e, fired, since))
                }
            }
        };
        if let Some((e, fired, since)) = event {
            tracing::info!(rule = %rule.id, event = e.seq, state = %e.body["state"], "alert");
            store_event(b, &e).await;
            let phase = serde_json::to_string(&PhaseDoc {
                firing: fired,
                since_ms: since,
            })
            .unwrap_or_default();
            if let Err(err) = b
                .store
                .put_doc(KIND_PHASE, &rule.id, &phase, now_ms())
                .await
            {
                tracing::warn!(error = %err, rule = %rule.id, "alert rule's phase not stored");
            }
            b.alerts.newest.send_replace(e.seq);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_must_hold_for_its_duration_and_be_gone_for_recovery() {
        let (f, r) = (10, 5);
        let mut p = Phase::Ok;
        let mut fired = Vec::new();
        // Holds at 0..=9 s: pending; at 10 s it fires, dated from 0.
        for t in 0..=12 {
            let (n, c) = p.step(true, t * 1000, f, r);
            p = n;
            if let Some(c) = c {
                fired.push((t, c));
            }
        }
        assert_eq!(fired, vec![(10, true)]);
        assert_eq!(p, Phase::Firing { since: 0 });
        // Gone for 3 s, back: still firing, no event.
        for t in 13..16 {
            p = p.step(false, t * 1000, f, r).0;
        }
        assert!(matches!(p, Phase::Recovering { fired: 0, .. }));
        let (n, c) = p.step(true, 16_000, f, r);
        assert_eq!((n, c), (Phase::Firing { since: 0 }, None));
        // Gone for 5 s: resolved.
        p = n;
        let mut resolved = None;
        for t in 17..=30 {
            let (n, c) = p.step(false, t * 1000, f, r);
            p = n;
            if c == Some(false) {
                resolved = Some(t);
                break;
            }
        }
        assert_eq!(resolved, Some(22));
        assert_eq!(p, Phase::Ok);
        // A blip shorter than for_s never fires.
        let mut p = Phase::Ok;
        for t in 0..9 {
            assert_eq!(p.step(true, t * 1000, f, r).1, None);
            p = p.step(true, t * 1000, f, r).0;
        }
        assert_eq!(p.step(false, 9_000, f, r), (Phase::Ok, None));
        // Zero durations: fire and resolve at once.
        assert_eq!(
            Phase::Ok.step(true, 5, 0, 0),
            (Phase::Firing { since: 5 }, Some(true))
        );
        assert_eq!(
            Phase::Firing { since: 5 }.step(false, 6, 0, 0),
            (Phase::Ok, Some(false))
        );
    }

    async fn backend(path: &std::path::Path) -> Arc<Backend> {
        let store = crate::store::SqliteStore::open(path).unwrap();
        Backend::new(
            Arc::new(store),
            Arc::new(imn_cloud::bus::LocalBus::new(8)),
            false,
            crate::security::Security::new(
                Arc::new(imn_cloud::AgentCredentials::disabled()),
                crate::security::Limits::default(),
                crate::security::Policy::default(),
            ),
        )
        .await
        .unwrap()
    }

    fn shift(agent: &str, at_ms: i64, kind: Kind) -> Anomaly {
        Anomaly {
            kind,
            key: crate::anomaly::Key::new(agent, "192.0.2.1", "ping_module"),
            at_ms,
            message: "rtt median 2 ms → 80 ms".into(),
            evidence: crate::anomaly::Evidence::Rtt(crate::anomaly::RttEvidence {
                before_median_ms: 2.0,
                before_mad_ms: 0.1,
                baseline_results: 20,
                after_median_ms: 80.0,
                shift_ms: 78.0,
                threshold_ms: 5.0,
                results: 3,
                reverts: false,
            }),
            result_refs: vec!["c1".into(), "c2".into(), "c3".into()],
        }
    }

    /// Makes `b` the engine, as `run` does once it holds the lease.
    async fn lead(b: &Backend) {
        b.alerts
            .leading_until
            .store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        assert!(start_leading(b).await.unwrap());
    }

    async fn judge_all(b: &Arc<Backend>) {
        assert_eq!(judge(b, None, Duration::from_secs(60)).await, None);
    }

    #[tokio::test]
    async fn rules_events_and_states_survive_a_restart_and_numbers_go_on() {
        let dir = std::env::temp_dir().join(format!(
            "imn-alerts-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sqlite");
        let b = backend(&path).await;
        b.store
            .create_measurement(crate::store::MeasurementRow {
                id: "m1".into(),
                module: "ping_module".into(),
                params_json: "{}".into(),
                selection_json: "{}".into(),
                description: None,
                created_ms: 1,
                deadline_ms: i64::MAX,
                schedule_json: None,
                stopped_ms: None,
                owner: None,
                daily_probes: 0,
            })
            .await
            .unwrap();
        // Not leading: nothing is recorded.
        record_anomaly(
            &b,
            shift("a1", now_ms(), Kind::RttShiftUp),
            Some("m1".into()),
        )
        .await;
        assert!(b.alerts.events(0, 100, false, None, |_| true).is_empty());
        lead(&b).await;
        let input: RuleInput = serde_json::from_value(json!({
            "name": "shift", "measurement_id": "m1", "anomalies": ["rtt_shift_up"]}))
        .unwrap();
        let rule = add_rule(&b, input, &Default::default()).await.unwrap();
        let id = rule["id"].as_str().unwrap().to_string();
        // An anomaly of another measurement does not open it; its own does.
        record_anomaly(
            &b,
            shift("a1", now_ms(), Kind::RttShiftUp),
            Some("m2".into()),
        )
        .await;
        judge_all(&b).await;
        assert_eq!(b.alerts.firing(), 0);
        record_anomaly(
            &b,
            shift("a1", now_ms(), Kind::RttShiftUp),
            Some("m1".into()),
        )
        .await;
        judge_all(&b).await;
        assert_eq!(b.alerts.firing(), 1);
        let before = b.alerts.events(0, 100, false, None, |_| true);
        assert_eq!(
            before.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["anomaly", "anomaly", "alert"]
        );
        assert_eq!(before[2].body["state"], json!("firing"));
        assert_eq!(before[2].body["anomalies"][0]["agent"], json!("a1"));
        assert_eq!(
            before[2].body["anomalies"][0]["event"],
            json!(format!("e{}", before[1].seq))
        );

        // Another backend on the same store: the rule, its firing state and every
        // event are back, and new events are numbered after them.
        let b2 = backend(&path).await;
        load(&b2).await.unwrap();
        let me = crate::security::Caller::default();
        assert_eq!(b2.alerts.rule(&id, &me).unwrap()["state"], json!("firing"));
        let after = b2.alerts.events(0, 100, false, None, |_| true);
        assert_eq!(
            after
                .iter()
                .map(|e| (e.seq, e.to_json()))
                .collect::<Vec<_>>(),
            before
                .iter()
                .map(|e| (e.seq, e.to_json()))
                .collect::<Vec<_>>()
        );
        // Leading, it reopens the stored anomaly: still firing, no false resolve.
        lead(&b2).await;
        judge_all(&b2).await;
        assert_eq!(b2.alerts.firing(), 1);
        // The shift back down closes it; numbers go on past every one the first
        // backend reserved (so none is given out twice, stored or not).
        record_anomaly(
            &b2,
            shift("a1", now_ms(), Kind::RttShiftDown),
            Some("m1".into()),
        )
        .await;
        let newest = b2.alerts.events(0, 1, true, None, |_| true);
        assert_eq!(newest[0].seq, SEQ_BLOCK + 1);
        assert!(newest[0].seq > before[2].seq);
        judge_all(&b2).await;
        judge_all(&b2).await;
        let alerts = b2.alerts.events(0, 100, false, Some("alert"), |_| true);
        assert_eq!(
            alerts
                .iter()
                .map(|e| e.body["state"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["firing", "resolved"]
        );
        // Deleted: gone after a restart too; its events stay.
        delete_rule(&b2, &id, &Default::default()).await.unwrap();
        let b3 = backend(&path).await;
        load(&b3).await.unwrap();
        assert!(b3.alerts.rules(&me).is_empty());
        assert_eq!(b3.alerts.events(0, 100, false, None, |_| true).len(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn one_backend_of_several_holds_the_lease_and_another_takes_it_when_it_ends() {
        let dir = std::env::temp_dir().join(format!(
            "imn-lease-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.join("s.sqlite")).unwrap());
        let on = |store: Arc<dyn crate::store::Store>| async move {
            Backend::new(
                store,
                Arc::new(imn_cloud::bus::LocalBus::new(8)),
                false,
                crate::security::Security::new(
                    Arc::new(imn_cloud::AgentCredentials::disabled()),
                    crate::security::Limits::default(),
                    crate::security::Policy::default(),
                ),
            )
            .await
            .unwrap()
        };
        let (a, b) = (on(store.clone()).await, on(store.clone()).await);
        let (mut la, mut lb) = (Lease::default(), Lease::default());
        assert!(la.hold(&a).await);
        assert!(!lb.hold(&b).await);
        // Renewed by its holder, still refused to the other.
        assert!(la.hold(&a).await);
        assert!(!lb.hold(&b).await);
        // The holder stops renewing and its lease ends: the other takes it, and the
        // first no longer runs.
        let ended = serde_json::to_string(&LeaseDoc {
            holder: a.instance.to_string(),
            until_ms: now_ms() - 1,
        })
        .unwrap();
        store
            .put_doc(KIND_LEASE, "alerts", &ended, 0)
            .await
            .unwrap();
        assert!(lb.hold(&b).await);
        assert!(!la.hold(&a).await);
        // A lease close to its end counts as ended for its holder (the margin), so
        // two never run at once.
        let ending = serde_json::to_string(&LeaseDoc {
            holder: b.instance.to_string(),
            until_ms: now_ms() + MARGIN_MS / 2,
        })
        .unwrap();
        store
            .put_doc(KIND_LEASE, "alerts", &ending, 0)
            .await
            .unwrap();
        store.put_doc(KIND_LEASE, "x", "{}", 0).await.unwrap();
        // (b renews it on its next turn: it is its own.)
        assert!(lb.hold(&b).await);
        assert!(!la.hold(&a).await);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_ring_keeps_its_newest_events() {
        let mut g = Inner {
            seq_limit: 20_000,
            ..Default::default()
        };
        for i in 0..RING + 5 {
            Alerts::push(&mut g, "anomaly", i as i64, json!({}));
        }
        Alerts::push(&mut g, "alert", 0, json!({"rule_id": "r"}));
        assert_eq!(g.anomalies.len(), RING);
        assert_eq!(g.anomalies.front().unwrap().seq, 6);
        // Anomalies never push alerts out.
        assert_eq!(g.alerts.len(), 1);
        assert_eq!(g.alerts[0].seq, RING as u64 + 6);
        assert_eq!(g.alerts[0].n, 1);
        // No number left in the reserved block: nothing is added.
        g.seq_limit = g.next_seq;
        assert!(Alerts::push(&mut g, "alert", 0, json!({})).is_none());
        assert_eq!(g.alerts.len(), 1);
    }

    fn input(v: Value) -> Result<Rule, ApiError> {
        let i: RuleInput =
            serde_json::from_value(v).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        check_input(i, "ping_module", &Settings::default())
    }

    fn field(r: Result<Rule, ApiError>) -> (String, String) {
        match r {
            Err(ApiError::InvalidParams { field, rule, .. }) => (field, rule),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rules_are_checked_field_by_field() {
        let ok = input(json!({"name": "slow", "measurement_id": "m",
            "thresholds": {"max_rtt_median": 5, "max_loss": "10"}, "for_s": 30}))
        .unwrap();
        assert_eq!(ok.kind, RuleKind::Threshold);
        assert!(ok
            .thresholds
            .contains(&("max_rtt_median".into(), "5".into())));
        let a = input(json!({"name": "a", "measurement_id": "m", "anomalies": []})).unwrap();
        assert_eq!(a.kind, RuleKind::Anomaly);
        assert_eq!(a.anomalies, DEFAULT_ANOMALIES.map(String::from).to_vec());
        assert_eq!(
            field(input(json!({"name": "", "measurement_id": "m"}))),
            ("name".into(), "length".into())
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "for_s": 86401})
            )),
            ("for_s".into(), "range".into())
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "thresholds": {"max_lost": 1}})
            ))
            .0,
            "thresholds.max_lost"
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "thresholds": {"http_status": "200"}})
            ))
            .0,
            "thresholds.http_status"
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "thresholds": {"max_loss": [1]}})
            )),
            ("thresholds.max_loss".into(), "type".into())
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "anomalies": ["rtt_up"]})
            )),
            ("anomalies[0]".into(), "enum".into())
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "anomalies": [], "thresholds": {"max_loss": 1}})
            )),
            ("anomalies".into(), "exclusive".into())
        );
        // Webhooks: public addresses only, unless allowed; a secret long enough.
        let hook = |url: &str, secret: &str| {
            input(json!({"name": "x", "measurement_id": "m",
                "webhook": {"url": url, "secret": secret}}))
        };
        assert_eq!(
            field(hook("http://127.0.0.1:9/x", "0123456789abcdef")),
            ("webhook.url".into(), "address".into())
        );
        assert_eq!(
            field(hook("http://169.254.169.254/latest", "0123456789abcdef")),
            ("webhook.url".into(), "address".into())
        );
        assert_eq!(
            field(hook("ftp://example.net/", "0123456789abcdef")),
            ("webhook.url".into(), "address".into())
        );
        assert_eq!(
            field(hook("http://[::ffff:127.0.0.1]/", "0123456789abcdef")),
            ("webhook.url".into(), "address".into())
        );
        assert_eq!(
            field(hook("https://example.net/hook", "short")),
            ("webhook.secret".into(), "length".into())
        );
        assert_eq!(
            field(hook("https://user:pw@example.net/hook", "0123456789abcdef")),
            ("webhook.url".into(), "address".into())
        );
        assert_eq!(
            field(input(
                json!({"name": "x", "measurement_id": "m", "thresholds": {"window_s": 86400}})
            )),
            ("thresholds.window_s".into(), "range".into())
        );
        let ok = hook(
            "https://example.net/hook/T0/B1/secret-part?key=k",
            "0123456789abcdef",
        )
        .unwrap();
        // Its owner sees the URL; others its scheme and host only.
        assert_eq!(
            ok.view(&Phase::Ok, true)["webhook"]["url"],
            json!("https://example.net/hook/T0/B1/secret-part?key=k")
        );
        assert_eq!(
            ok.view(&Phase::Ok, false)["webhook"]["url"],
            json!("https://example.net/…")
        );
    }
}
