//! Status checks: is a measurement's target healthy, as seen from every agent that
//! measures it? One URL per measurement (`GET /v1/measurements/{id}/status-check`)
//! that a monitoring system polls, as RIPE Atlas's status checks are: 200 when
//! healthy, 503 when more agents breach a threshold than may, with a body that names
//! each breaching agent and its value against the threshold, as JSON, as a Nagios
//! plugin's output, or as Prometheus text.
//!
//! What counts, per agent, over the window (see [`Thresholds`]):
//! - an agent with no result in the window breaches (`reported`), and so does one
//!   whose newest run failed or timed out (`run`): with no thresholds given, these are
//!   the only breaches;
//! - loss and RTT (median, percentile) pool every result in the window; HTTP total
//!   time and DNS response time are the median over the window;
//! - HTTP status, DNS rcode, certificate expiry, NTP offset and whether a path reached
//!   its destination are the newest result's.
//!
//! A result with several targets (ping of many hosts) is judged per target; an agent
//! breaches when any of its targets does. [`Thresholds`] is also what an alert rule
//! holds: the same judgement runs for alerts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

use imn_proto::figures::{self, Figures, Provides};
use imn_proto::results::ModuleOutput;

use crate::error::ApiError;
use crate::store::ResultRow;
use imn_proto::wire::RequestState;

/// The longest window a check may look back over.
pub const MAX_WINDOW_S: u64 = 31 * 86_400;
/// The most results per agent a check keeps (the newest).
pub const MAX_RESULTS_PER_AGENT: usize = 500;
/// The most breaches listed in one answer (all are counted).
pub const MAX_LISTED: usize = 1_000;
/// The largest millisecond threshold (an hour).
const MAX_MS: f64 = 3_600_000.0;

/// How the answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Nagios,
    Prometheus,
}

/// Which HTTP statuses are good: codes, or classes such as `2xx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusSet(pub Vec<String>);

impl StatusSet {
    fn parse(field: &str, s: &str) -> Result<StatusSet, ApiError> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let ok = match part.as_bytes() {
                [c, b'x', b'x'] | [c, b'X', b'X'] => (b'1'..=b'5').contains(c),
                _ => part.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)),
            };
            if !ok {
                return Err(bad(
                    field,
                    "format",
                    format!("{field}: {part:?} is not a status code (100 to 599) or a class such as 2xx"),
                ));
            }
            v.push(part.to_ascii_lowercase());
        }
        if v.is_empty() || v.len() > 32 {
            return Err(bad(
                field,
                "count",
                format!("{field}: give 1 to 32 codes or classes"),
            ));
        }
        Ok(StatusSet(v))
    }

    pub fn admits(&self, status: u16) -> bool {
        // An agent's result may carry any u16: 2999 is in no class.
        if !(100..=599).contains(&status) {
            return false;
        }
        let code = status.to_string();
        self.0.iter().any(|p| {
            if p.ends_with("xx") {
                code.as_bytes().first() == p.as_bytes().first()
            } else {
                *p == code
            }
        })
    }
}

/// The thresholds of one check (or alert rule). Every field is optional; with none,
/// only agents that did not report or whose runs failed breach.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Thresholds {
    /// Loss in percent above which an agent breaches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_loss: Option<f64>,
    /// Median RTT in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rtt_median: Option<f64>,
    /// The percentile `max_rtt_percentile` applies to (1 to 100, default 95).
    pub rtt_percentile: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rtt_percentile: Option<f64>,
    /// The HTTP statuses that are good.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<StatusSet>,
    /// HTTP total time in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_http_time: Option<f64>,
    /// The DNS rcodes that are good (names such as NOERROR).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_rcode: Option<Vec<String>>,
    /// DNS response time in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dns_time: Option<f64>,
    /// Days before the certificate expires below which an agent breaches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cert_days: Option<f64>,
    /// Absolute NTP offset in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ntp_offset: Option<f64>,
    /// Whether a path must reach its destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<bool>,
    /// How many agents may breach before the check fails (default 0).
    pub max_breaching: u32,
    /// Seconds back from now (default: one-off measurements, all their results;
    /// schedules, three intervals and at least a minute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
}

fn bad(field: &str, rule: &str, message: String) -> ApiError {
    ApiError::BadQuery {
        field: field.to_string(),
        rule: rule.to_string(),
        message,
    }
}

fn number(field: &str, s: &str, lo: f64, hi: f64) -> Result<f64, ApiError> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (lo..=hi).contains(&v) => Ok(v),
        Ok(v) => Err(bad(
            field,
            "range",
            format!("{field}: must be {lo} to {hi} (got {v})"),
        )),
        Err(_) => Err(bad(
            field,
            "type",
            format!("{field}: must be a number (got {s:?})"),
        )),
    }
}

fn integer(field: &str, s: &str, lo: u64, hi: u64) -> Result<u64, ApiError> {
    match s.trim().parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(v) => Err(bad(
            field,
            "range",
            format!("{field}: must be {lo} to {hi} (got {v})"),
        )),
        Err(_) => Err(bad(
            field,
            "type",
            format!("{field}: must be a whole number (got {s:?})"),
        )),
    }
}

/// The query parameters a check takes, for documentation and the CLI.
pub const PARAMS: &[(&str, &str)] = &[
    ("max_loss", "loss in percent (0 to 100) above which an agent breaches"),
    ("max_rtt_median", "median RTT in ms above which an agent breaches"),
    ("rtt_percentile", "the percentile max_rtt_percentile applies to (1 to 100, default 95)"),
    ("max_rtt_percentile", "RTT at rtt_percentile in ms above which an agent breaches"),
    ("http_status", "good HTTP statuses, comma separated: codes or classes such as 2xx"),
    ("max_http_time", "median HTTP total time in ms above which an agent breaches"),
    ("dns_rcode", "good DNS rcodes, comma separated (e.g. NOERROR)"),
    ("max_dns_time", "median DNS response time in ms above which an agent breaches"),
    ("min_cert_days", "days to the certificate's expiry below which an agent breaches"),
    ("max_ntp_offset", "absolute NTP offset in ms above which an agent breaches"),
    ("reached", "true: a path that did not reach its destination breaches"),
    ("max_breaching", "how many agents may breach before the check fails (default 0)"),
    ("window_s", "seconds back from now to judge (default: a one-off measurement's whole run; a schedule's last three intervals, at least 60)"),
    ("format", "json (default), nagios or prometheus"),
];

impl Thresholds {
    /// Thresholds from query pairs, for a measurement of `module`. Unknown names,
    /// values out of range, repeated names and thresholds the module's results do not
    /// carry are refused, naming the parameter.
    pub fn parse(
        pairs: &[(String, String)],
        module: &str,
    ) -> Result<(Thresholds, Format), ApiError> {
        let mut t = Thresholds {
            rtt_percentile: 95.0,
            ..Thresholds::default()
        };
        let mut format = Format::Json;
        let mut seen: Vec<&str> = Vec::new();
        let p = figures::provides(module);
        for (k, v) in pairs {
            let k = k.as_str();
            if seen.contains(&k) {
                return Err(bad(k, "repeated", format!("{k}: given more than once")));
            }
            let Some((name, _)) = PARAMS.iter().find(|(n, _)| *n == k) else {
                let known: Vec<&str> = PARAMS.iter().map(|(n, _)| *n).collect();
                return Err(bad(
                    k,
                    "unknown",
                    format!(
                        "{k}: not a status-check parameter; known: {}",
                        known.join(", ")
                    ),
                ));
            };
            seen.push(name);
            let needs = |ok: bool, what: &str| -> Result<(), ApiError> {
                if ok {
                    Ok(())
                } else {
                    Err(bad(
                        k,
                        "applies",
                        format!("{k}: {module} results carry no {what}; {}", carried(p)),
                    ))
                }
            };
            match k {
                "max_loss" => {
                    needs(p.loss, "loss")?;
                    t.max_loss = Some(number(k, v, 0.0, 100.0)?);
                }
                "max_rtt_median" => {
                    needs(p.rtt, "RTT")?;
                    t.max_rtt_median = Some(number(k, v, 0.0, MAX_MS)?);
                }
                "rtt_percentile" => t.rtt_percentile = number(k, v, 1.0, 100.0)?,
                "max_rtt_percentile" => {
                    needs(p.rtt, "RTT")?;
                    t.max_rtt_percentile = Some(number(k, v, 0.0, MAX_MS)?);
                }
                "http_status" => {
                    needs(p.http, "HTTP status")?;
                    t.http_status = Some(StatusSet::parse(k, v)?);
                }
                "max_http_time" => {
                    needs(p.http, "HTTP time")?;
                    t.max_http_time = Some(number(k, v, 0.0, MAX_MS)?);
                }
                "dns_rcode" => {
                    needs(p.dns, "DNS rcode")?;
                    let codes: Vec<String> = v
                        .split(',')
                        .map(|c| c.trim().to_ascii_uppercase())
                        .filter(|c| !c.is_empty())
                        .collect();
                    if codes.is_empty()
                        || codes.len() > 16
                        || codes
                            .iter()
                            .any(|c| c.len() > 16 || !c.bytes().all(|b| b.is_ascii_alphanumeric()))
                    {
                        return Err(bad(
                            k,
                            "format",
                            format!("{k}: give 1 to 16 rcode names such as NOERROR, NXDOMAIN (got {v:?})"),
                        ));
                    }
                    t.dns_rcode = Some(codes);
                }
                "max_dns_time" => {
                    needs(p.dns, "DNS response time")?;
                    t.max_dns_time = Some(number(k, v, 0.0, MAX_MS)?);
                }
                "min_cert_days" => {
                    needs(p.cert, "certificate")?;
                    t.min_cert_days = Some(number(k, v, -36_500.0, 36_500.0)?);
                }
                "max_ntp_offset" => {
                    needs(p.ntp, "NTP offset")?;
                    t.max_ntp_offset = Some(number(k, v, 0.0, MAX_MS)?);
                }
                "reached" => {
                    needs(p.path, "path")?;
                    // Only `true` judges anything; `false` would be a no-op.
                    if !matches!(v.as_str(), "true" | "1") {
                        return Err(bad(
                            k,
                            "enum",
                            format!("{k}: must be true: a path that does not reach its destination breaches (got {v:?})"),
                        ));
                    }
                    t.reached = Some(true);
                }
                "max_breaching" => {
                    t.max_breaching = integer(k, v, 0, 1_000_000)? as u32;
                }
                "window_s" => t.window_s = Some(integer(k, v, 1, MAX_WINDOW_S)?),
                "format" => {
                    format = match v.as_str() {
                        "json" => Format::Json,
                        "nagios" => Format::Nagios,
                        "prometheus" => Format::Prometheus,
                        _ => {
                            return Err(bad(
                                k,
                                "enum",
                                format!("{k}: must be json, nagios or prometheus (got {v:?})"),
                            ))
                        }
                    }
                }
                _ => unreachable!("every name in PARAMS has an arm"),
            }
        }
        if seen.contains(&"rtt_percentile") && t.max_rtt_percentile.is_none() {
            return Err(bad(
                "rtt_percentile",
                "requires",
                "rtt_percentile: only with max_rtt_percentile".to_string(),
            ));
        }
        Ok((t, format))
    }
}

fn carried(p: Provides) -> String {
    let mut v = Vec::new();
    for (on, what) in [
        (p.loss, "max_loss"),
        (p.rtt, "max_rtt_median, max_rtt_percentile"),
        (p.http, "http_status, max_http_time"),
        (p.dns, "dns_rcode, max_dns_time"),
        (p.cert, "min_cert_days"),
        (p.ntp, "max_ntp_offset"),
        (p.path, "reached"),
    ] {
        if on {
            v.push(what);
        }
    }
    if v.is_empty() {
        "it takes no thresholds, only max_breaching and window_s".to_string()
    } else {
        format!("it takes {}", v.join(", "))
    }
}

/// One agent (and target) over one threshold.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breach {
    pub agent_id: String,
    /// The target the value is about; none for `reported` and `run`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The parameter that was breached, or `reported` / `run`.
    pub check: String,
    pub value: Value,
    pub threshold: Value,
    /// For people: `rtt median 153.2 ms > 100 ms`.
    pub message: String,
}

/// What one agent's results came to.
#[derive(Debug, Clone, Serialize)]
pub struct AgentVerdict {
    pub agent_id: String,
    pub results: usize,
    pub breaching: bool,
    /// Per target, the figures the check judged.
    pub targets: BTreeMap<String, BTreeMap<&'static str, Value>>,
}

/// OK, WARNING (some breach, no more than may), CRITICAL; as Nagios numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Critical,
}

impl Status {
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
        }
    }
}

/// A check's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub measurement_id: String,
    pub module: String,
    pub status: Status,
    pub healthy: bool,
    pub window: Value,
    pub thresholds: Thresholds,
    pub agents: usize,
    pub breaching_agents: usize,
    pub max_breaching: u32,
    pub results: usize,
    /// More results were in the window than a check reads ([`MAX_RESULTS`]).
    pub truncated: bool,
    pub breaches: Vec<Breach>,
    pub breaches_listed: usize,
    pub per_agent: Vec<AgentVerdict>,
    pub summary: String,
}

fn ms_json(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

/// The most RTT (and HTTP, DNS time) samples kept per agent and target over a window.
pub const MAX_SAMPLES_PER_TARGET: usize = 10_000;

/// One target's figures over an agent's results in the window.
#[derive(Debug, Default)]
pub struct TargetFigures {
    pub sent: u64,
    pub received: u64,
    pub samples: Vec<f64>,
    pub http_times: Vec<f64>,
    pub dns_times: Vec<f64>,
    /// The newest result's figures for this target (its samples left out).
    pub newest: Option<Figures>,
}

/// What one agent's results in the window came to, gathered newest first: the
/// results themselves are dropped as they are read, so a check holds figures, not
/// bodies.
#[derive(Debug, Default)]
pub struct AgentInput {
    pub results: usize,
    /// The newest run's state and error.
    pub newest: Option<(RequestState, Option<String>)>,
    pub targets: BTreeMap<String, TargetFigures>,
}

fn push_capped(v: &mut Vec<f64>, more: impl IntoIterator<Item = f64>) {
    for x in more {
        if v.len() >= MAX_SAMPLES_PER_TARGET {
            return;
        }
        v.push(x);
    }
}

impl AgentInput {
    /// Adds one result; results must come newest first.
    pub fn add(&mut self, module: &str, row: &ResultRow) {
        self.results += 1;
        if self.newest.is_none() {
            let error = row.error.as_ref().map(|e| e.chars().take(200).collect());
            self.newest = Some((row.state, error));
        }
        if row.state != RequestState::Succeeded {
            return;
        }
        let Some(out) = ModuleOutput::from_api_json(module, &row.result) else {
            return;
        };
        // A result that names a target twice counts it once (the first).
        let mut seen: Vec<String> = Vec::new();
        for mut f in out.figures() {
            if seen.contains(&f.target) {
                continue;
            }
            seen.push(f.target.clone());
            if self.targets.len() >= figures::MAX_TARGETS && !self.targets.contains_key(&f.target) {
                continue;
            }
            let acc = self.targets.entry(f.target.clone()).or_default();
            acc.sent = acc.sent.saturating_add(u64::from(f.sent));
            acc.received = acc
                .received
                .saturating_add(u64::from(f.received.min(f.sent)));
            push_capped(&mut acc.samples, f.rtts_ms.drain(..));
            push_capped(&mut acc.http_times, f.http_total_ms);
            push_capped(&mut acc.dns_times, f.dns_time_ms);
            if acc.newest.is_none() {
                acc.newest = Some(f);
            }
        }
    }
}

/// Judges each agent's results. `inputs` maps each agent the measurement covers to
/// what its results in the window came to.
pub fn evaluate(
    t: &Thresholds,
    inputs: &BTreeMap<String, AgentInput>,
    now_ms: i64,
) -> (Vec<AgentVerdict>, Vec<Breach>) {
    let mut verdicts = Vec::new();
    let mut breaches = Vec::new();
    for (agent, input) in inputs {
        let mut v = AgentVerdict {
            agent_id: agent.clone(),
            results: input.results,
            breaching: false,
            targets: BTreeMap::new(),
        };
        let mut mine = Vec::new();
        let breach = |mine: &mut Vec<Breach>,
                      target: Option<&str>,
                      check: &str,
                      value: Value,
                      threshold: Value,
                      message: String| {
            mine.push(Breach {
                agent_id: agent.clone(),
                target: target.map(str::to_string),
                check: check.to_string(),
                value,
                threshold,
                message,
            });
        };
        let Some((newest_state, newest_error)) = &input.newest else {
            breach(
                &mut mine,
                None,
                "reported",
                Value::Null,
                Value::Null,
                "no result in the window".into(),
            );
            v.breaching = true;
            breaches.extend(mine);
            verdicts.push(v);
            continue;
        };
        if *newest_state != RequestState::Succeeded {
            let why = newest_error.clone().unwrap_or_default();
            breach(
                &mut mine,
                None,
                "run",
                json!(newest_state.as_str()),
                json!("succeeded"),
                format!("newest run {}: {why}", newest_state.as_str()),
            );
        }
        for (target, acc) in &input.targets {
            let mut values: BTreeMap<&'static str, Value> = BTreeMap::new();
            let (sent, received) = (acc.sent, acc.received);
            let samples = &acc.samples;
            let Some(newest) = &acc.newest else {
                continue;
            };
            let tg = Some(target.as_str());
            if sent > 0 {
                let loss = (sent - received) as f64 * 100.0 / sent as f64;
                values.insert("loss_pct", ms_json(loss));
                if let Some(max) = t.max_loss.filter(|m| loss > *m) {
                    breach(
                        &mut mine,
                        tg,
                        "max_loss",
                        ms_json(loss),
                        json!(max),
                        format!("loss {loss:.1}% > {max}%"),
                    );
                }
            }
            let median = figures::median(samples);
            if let Some(m) = median {
                values.insert("rtt_median_ms", ms_json(m));
            }
            if let Some(max) = t.max_rtt_median {
                match median {
                    Some(m) if m > max => breach(
                        &mut mine,
                        tg,
                        "max_rtt_median",
                        ms_json(m),
                        json!(max),
                        format!("rtt median {m:.3} ms > {max} ms"),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "max_rtt_median",
                        Value::Null,
                        json!(max),
                        "no RTT sample".into(),
                    ),
                    _ => {}
                }
            }
            if let Some(max) = t.max_rtt_percentile {
                let p = t.rtt_percentile;
                match figures::percentile(samples, p) {
                    Some(x) => {
                        values.insert("rtt_percentile_ms", ms_json(x));
                        if x > max {
                            breach(
                                &mut mine,
                                tg,
                                "max_rtt_percentile",
                                ms_json(x),
                                json!(max),
                                format!("rtt p{p} {x:.3} ms > {max} ms"),
                            );
                        }
                    }
                    None => breach(
                        &mut mine,
                        tg,
                        "max_rtt_percentile",
                        Value::Null,
                        json!(max),
                        "no RTT sample".into(),
                    ),
                }
            }
            if let Some(s) = newest.http_status {
                values.insert("http_status", json!(s));
            }
            if let Some(good) = &t.http_status {
                match newest.http_status {
                    Some(s) if good.admits(s) => {}
                    Some(s) => breach(
                        &mut mine,
                        tg,
                        "http_status",
                        json!(s),
                        json!(good.0.join(",")),
                        format!("http status {s} not in {}", good.0.join(",")),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "http_status",
                        Value::Null,
                        json!(good.0.join(",")),
                        "no HTTP response".into(),
                    ),
                }
            }
            let http_time = figures::median(&acc.http_times);
            if let Some(x) = http_time {
                values.insert("http_time_ms", ms_json(x));
            }
            if let Some(max) = t.max_http_time {
                match http_time {
                    Some(x) if x > max => breach(
                        &mut mine,
                        tg,
                        "max_http_time",
                        ms_json(x),
                        json!(max),
                        format!("http time {x:.3} ms > {max} ms"),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "max_http_time",
                        Value::Null,
                        json!(max),
                        "no HTTP response".into(),
                    ),
                    _ => {}
                }
            }
            if let Some(rc) = &newest.dns_rcode {
                values.insert("dns_rcode", json!(rc));
            }
            if let Some(good) = &t.dns_rcode {
                match &newest.dns_rcode {
                    Some(rc) if good.iter().any(|g| g.eq_ignore_ascii_case(rc)) => {}
                    Some(rc) => breach(
                        &mut mine,
                        tg,
                        "dns_rcode",
                        json!(rc),
                        json!(good.join(",")),
                        format!("dns rcode {rc} not in {}", good.join(",")),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "dns_rcode",
                        Value::Null,
                        json!(good.join(",")),
                        "no DNS answer".into(),
                    ),
                }
            }
            let dns_time = figures::median(&acc.dns_times);
            if let Some(x) = dns_time {
                values.insert("dns_time_ms", ms_json(x));
            }
            if let Some(max) = t.max_dns_time {
                match dns_time {
                    Some(x) if x > max => breach(
                        &mut mine,
                        tg,
                        "max_dns_time",
                        ms_json(x),
                        json!(max),
                        format!("dns time {x:.3} ms > {max} ms"),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "max_dns_time",
                        Value::Null,
                        json!(max),
                        "no DNS answer".into(),
                    ),
                    _ => {}
                }
            }
            let days = newest
                .cert_not_after_ms
                .map(|at| at.saturating_sub(now_ms) as f64 / 86_400_000.0);
            if let Some(d) = days {
                values.insert("cert_days", json!((d * 10.0).round() / 10.0));
            }
            if let Some(min) = t.min_cert_days {
                match days {
                    Some(d) if d < min => breach(
                        &mut mine,
                        tg,
                        "min_cert_days",
                        json!((d * 10.0).round() / 10.0),
                        json!(min),
                        format!("certificate expires in {d:.1} days < {min}"),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "min_cert_days",
                        Value::Null,
                        json!(min),
                        "no certificate".into(),
                    ),
                    _ => {}
                }
            }
            if let Some(o) = newest.ntp_offset_ms {
                values.insert("ntp_offset_ms", ms_json(o));
            }
            if let Some(max) = t.max_ntp_offset {
                match newest.ntp_offset_ms {
                    Some(o) if o.abs() > max => breach(
                        &mut mine,
                        tg,
                        "max_ntp_offset",
                        ms_json(o),
                        json!(max),
                        format!("ntp offset {o:.3} ms beyond ±{max} ms"),
                    ),
                    None => breach(
                        &mut mine,
                        tg,
                        "max_ntp_offset",
                        Value::Null,
                        json!(max),
                        "no NTP offset".into(),
                    ),
                    _ => {}
                }
            }
            if let Some(r) = newest.reached {
                values.insert("reached", json!(r));
            }
            if t.reached == Some(true) && newest.reached != Some(true) {
                breach(
                    &mut mine,
                    tg,
                    "reached",
                    json!(newest.reached),
                    json!(true),
                    "path did not reach its destination".into(),
                );
            }
            v.targets.insert(target.clone(), values);
        }
        // A threshold with nothing to judge at all (no succeeded result) is a breach:
        // silence is not health.
        if input.targets.is_empty()
            && *newest_state == RequestState::Succeeded
            && has_figure_thresholds(t)
        {
            breach(
                &mut mine,
                None,
                "figures",
                Value::Null,
                Value::Null,
                "no figures in the window's results".into(),
            );
        }
        v.breaching = !mine.is_empty();
        breaches.extend(mine);
        verdicts.push(v);
    }
    (verdicts, breaches)
}

fn has_figure_thresholds(t: &Thresholds) -> bool {
    t.max_loss.is_some()
        || t.max_rtt_median.is_some()
        || t.max_rtt_percentile.is_some()
        || t.http_status.is_some()
        || t.max_http_time.is_some()
        || t.dns_rcode.is_some()
        || t.max_dns_time.is_some()
        || t.min_cert_days.is_some()
        || t.max_ntp_offset.is_some()
        || t.reached.is_some()
}

/// The whole answer from the verdicts.
#[allow(clippy::too_many_arguments)]
pub fn report(
    measurement_id: &str,
    module: &str,
    t: Thresholds,
    window: Value,
    results: usize,
    truncated: bool,
    verdicts: Vec<AgentVerdict>,
    mut breaches: Vec<Breach>,
) -> Report {
    let agents = verdicts.len();
    let breaching_agents = verdicts.iter().filter(|v| v.breaching).count();
    let status = if breaching_agents == 0 {
        Status::Ok
    } else if breaching_agents <= t.max_breaching as usize {
        Status::Warning
    } else {
        Status::Critical
    };
    let listed = breaches.len();
    breaches.truncate(MAX_LISTED);
    let mut summary = format!(
        "{measurement_id}: {breaching_agents} of {agents} agents breaching ({} allowed)",
        t.max_breaching
    );
    if !breaches.is_empty() {
        let first: Vec<String> = breaches
            .iter()
            .take(5)
            .map(|b| match &b.target {
                Some(tg) => format!("{} {tg} {}", b.agent_id, b.message),
                None => format!("{} {}", b.agent_id, b.message),
            })
            .collect();
        summary.push_str(": ");
        summary.push_str(&first.join("; "));
        if listed > 5 {
            let _ = write!(summary, "; and {} more", listed - 5);
        }
    }
    Report {
        measurement_id: measurement_id.to_string(),
        module: module.to_string(),
        status,
        healthy: status != Status::Critical,
        window,
        max_breaching: t.max_breaching,
        thresholds: t,
        agents,
        breaching_agents,
        results,
        truncated,
        breaches,
        breaches_listed: listed,
        per_agent: verdicts,
        summary: imn_proto::summary::tidy(summary),
    }
}

/// Text for a plugin line: one line, and no `|`, which starts performance data (a
/// target or an error text from an agent could otherwise forge figures).
fn plugin_text(s: String) -> String {
    imn_proto::summary::tidy(s.replace('|', "¦"))
}

/// Nagios/Icinga plugin output: a status line with performance data, then one line
/// per breach. Text from agents is made one-line and `|`-free first. The
/// `breaching` figure's warning threshold is 0 and its critical one `max_breaching`.
pub fn nagios(r: &Report) -> String {
    let mut s = format!(
        "IMN {} - {} | agents={};;;0 breaching={};0;{};0;{}\n",
        r.status.word(),
        plugin_text(r.summary.clone()),
        r.agents,
        r.breaching_agents,
        r.max_breaching,
        r.agents
    );
    for b in &r.breaches {
        let line = match &b.target {
            Some(tg) => format!("{} {tg}: {}", b.agent_id, b.message),
            None => format!("{}: {}", b.agent_id, b.message),
        };
        s.push_str(&plugin_text(line));
        s.push('\n');
    }
    s
}

/// Prometheus text: the check's status, counts, and each judged figure per agent and
/// target.
pub fn prometheus(r: &Report) -> String {
    let mut e = imn_cloud::telemetry::prom::Exposition::new();
    let m = r.measurement_id.as_str();
    e.family(
        "imn_check_status",
        "gauge",
        "The status check's result: 0 ok, 1 warning, 2 critical (Nagios numbering).",
    );
    e.sample(
        "imn_check_status",
        &[("measurement", m)],
        f64::from(r.status.code()),
    );
    e.family(
        "imn_check_healthy",
        "gauge",
        "1 when no more agents breach than may.",
    );
    e.sample(
        "imn_check_healthy",
        &[("measurement", m)],
        if r.healthy { 1.0 } else { 0.0 },
    );
    e.family(
        "imn_check_agents",
        "gauge",
        "Agents the measurement covers.",
    );
    e.sample("imn_check_agents", &[("measurement", m)], r.agents as f64);
    e.family(
        "imn_check_breaching_agents",
        "gauge",
        "Agents that breach a threshold.",
    );
    e.sample(
        "imn_check_breaching_agents",
        &[("measurement", m)],
        r.breaching_agents as f64,
    );
    e.family(
        "imn_check_breach",
        "gauge",
        "1 for each agent, target and check that breaches.",
    );
    for b in &r.breaches {
        let target = b.target.as_deref().unwrap_or("");
        e.sample(
            "imn_check_breach",
            &[
                ("measurement", m),
                ("agent", &b.agent_id),
                ("target", target),
                ("check", &b.check),
            ],
            1.0,
        );
    }
    e.family(
        "imn_check_value",
        "gauge",
        "Each numeric figure the check judged, per agent and target.",
    );
    for v in &r.per_agent {
        for (target, values) in &v.targets {
            for (name, value) in values {
                let x = match value {
                    Value::Number(n) => n.as_f64(),
                    Value::Bool(b) => Some(f64::from(u8::from(*b))),
                    _ => None,
                };
                if let Some(x) = x {
                    e.sample(
                        "imn_check_value",
                        &[
                            ("measurement", m),
                            ("agent", &v.agent_id),
                            ("target", target),
                            ("figure", name),
                        ],
                        x,
                    );
                }
            }
        }
    }
    e.finish()
}

/// The most results one check reads back (newest first) from a recurring
/// measurement; past it, the check says it was truncated.
pub const MAX_SCANNED: usize = 50_000;

/// Runs the check of measurement `id` with the query `pairs`: reads the
/// measurement, its agents and their results in the window (bounded), and judges them.
///
/// The window is by the backend's clock: results that arrived within it
/// (`stored_ms`), read newest first, so an agent whose clock is wrong is judged by
/// when its results came. A one-off measurement's results are its requests'.
pub async fn run(
    b: &crate::service::Backend,
    id: &str,
    pairs: &[(String, String)],
) -> Result<(Report, Format), ApiError> {
    let m = b
        .store
        .measurement(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no measurement {id}")))?;
    let (t, format) = Thresholds::parse(pairs, &m.module)?;
    let now = imn_proto::now_ms();
    let spec: Option<crate::fleet::ScheduleSpec> = m
        .schedule_json
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok());
    // The window: given, or a schedule's last three intervals (at least a minute), or
    // a one-off's whole run.
    let window_s = t.window_s.or_else(|| {
        spec.as_ref()
            .map(|s| (s.interval_ms.saturating_mul(3) / 1000).max(60))
    });
    let since_ms = window_s.map(|w| {
        now.saturating_sub(
            i64::try_from(w)
                .unwrap_or(i64::MAX / 2)
                .saturating_mul(1000),
        )
    });
    let in_window = |r: &ResultRow| since_ms.is_none_or(|s| r.stored_ms >= s);
    let mut inputs: BTreeMap<String, AgentInput> = BTreeMap::new();
    let (mut read, mut truncated) = (0usize, false);
    if m.schedule_json.is_some() {
        for p in b.store.schedule_progress(id).await? {
            inputs.insert(p.agent_id, AgentInput::default());
        }
        let mut before = None;
        'pages: loop {
            let page = b.store.schedule_results_newest(id, before, 1_000).await?;
            let n = page.len();
            for (pos, row) in page {
                before = Some(pos);
                if !in_window(&row) {
                    break 'pages;
                }
                if read >= MAX_SCANNED {
                    truncated = true;
                    break 'pages;
                }
                read += 1;
                // Only the measurement's own agents count.
                if let Some(input) = inputs.get_mut(&row.agent_id) {
                    if input.results < MAX_RESULTS_PER_AGENT {
                        input.add(&m.module, &row);
                    }
                }
            }
            if n < 1_000 {
                break;
            }
            tokio::task::yield_now().await;
        }
    } else {
        for (req, res) in b.store.measurement_requests(id).await? {
            let input = inputs.entry(req.agent_id).or_default();
            if let Some(row) = res.filter(|r| in_window(r)) {
                read += 1;
                input.add(&m.module, &row);
            }
        }
    }
    // Judging sorts samples: off the async workers.
    let (verdicts, breaches, t) = tokio::task::spawn_blocking(move || {
        let (v, br) = evaluate(&t, &inputs, now);
        (v, br, t)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("status check: {e}")))?;
    let window = json!({
        "seconds": window_s,
        "from": since_ms.map(crate::api::rfc3339),
        "until": crate::api::rfc3339(now),
    });
    Ok((
        report(
            id, &m.module, t, window, read, truncated, verdicts, breaches,
        ),
        format,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn field_of(e: ApiError) -> (String, String) {
        match e {
            ApiError::BadQuery { field, rule, .. } => (field, rule),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn thresholds_name_the_bad_parameter_and_its_rule() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, (&'a str, &'a str));
        let cases: &[Case] = &[
            (&[("max_loss", "101")], "ping_module", ("max_loss", "range")),
            (&[("max_loss", "x")], "ping_module", ("max_loss", "type")),
            (&[("max_loss", "NaN")], "ping_module", ("max_loss", "range")),
            (&[("nope", "1")], "ping_module", ("nope", "unknown")),
            (
                &[("max_loss", "1"), ("max_loss", "2")],
                "ping_module",
                ("max_loss", "repeated"),
            ),
            (
                &[("http_status", "200")],
                "ping_module",
                ("http_status", "applies"),
            ),
            (
                &[("http_status", "200,7xx")],
                "http",
                ("http_status", "format"),
            ),
            (&[("dns_rcode", "NO ERROR")], "dns", ("dns_rcode", "format")),
            (&[("reached", "yes")], "traceroute", ("reached", "enum")),
            (&[("reached", "false")], "traceroute", ("reached", "enum")),
            (&[("window_s", "0")], "ping_module", ("window_s", "range")),
            (&[("format", "xml")], "ping_module", ("format", "enum")),
            (
                &[("rtt_percentile", "90")],
                "ping_module",
                ("rtt_percentile", "requires"),
            ),
            (&[("max_loss", "1")], "echo_module", ("max_loss", "applies")),
        ];
        for (q, module, (field, rule)) in cases {
            let e = Thresholds::parse(&pairs(q), module).expect_err(&format!("{q:?}"));
            assert_eq!(field_of(e), (field.to_string(), rule.to_string()), "{q:?}");
        }
        let (t, f) = Thresholds::parse(
            &pairs(&[
                ("max_loss", "10"),
                ("http_status", "2xx,301"),
                ("format", "nagios"),
            ]),
            "http",
        )
        .unwrap();
        assert_eq!(t.max_loss, Some(10.0));
        assert!(t.http_status.as_ref().unwrap().admits(204));
        assert!(t.http_status.as_ref().unwrap().admits(301));
        assert!(!t.http_status.as_ref().unwrap().admits(302));
        assert_eq!(f, Format::Nagios);
    }

    fn ping_row(agent: &str, rtts: &[Option<f64>], state: RequestState) -> ResultRow {
        let mut t = imn_proto::results::PingResult::new("h", "127.0.0.1", 56);
        t.sent = rtts.len() as u32;
        t.received = rtts.iter().filter(|r| r.is_some()).count() as u32;
        t.rtts_ms = rtts.to_vec();
        t.summarise();
        let out = ModuleOutput::Ping(imn_proto::results::PingOutput {
            socket: "raw".into(),
            src_addr: None,
            targets: vec![t],
        });
        ResultRow {
            agent_id: agent.into(),
            request_id: "r".into(),
            module: "ping_module".into(),
            epoch: 1,
            seq: 1,
            state,
            result: out.to_json(),
            error: (state != RequestState::Succeeded)
                .then(|| "boom\nline | breaching=0;0;0;0;1".into()),
            received_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            stored_ms: 0,
            scheduled_ms: None,
            at_ms: 0,
        }
    }

    /// Each agent's rows, given oldest first, added newest first as `run` reads them.
    fn inputs(m: &BTreeMap<String, Vec<ResultRow>>) -> BTreeMap<String, AgentInput> {
        m.iter()
            .map(|(a, rows)| {
                let mut input = AgentInput::default();
                for r in rows.iter().rev() {
                    input.add("ping_module", r);
                }
                (a.clone(), input)
            })
            .collect()
    }

    /// A result naming a target twice counts once; samples are capped per target;
    /// the newest result (added first) is the one whose discrete figures count.
    #[test]
    fn inputs_are_bounded_and_newest_first() {
        let mut t = imn_proto::results::PingResult::new("h", "127.0.0.1", 56);
        t.rtts_ms = vec![Some(1.0); 900];
        t.summarise();
        let out = ModuleOutput::Ping(imn_proto::results::PingOutput {
            socket: "raw".into(),
            src_addr: None,
            targets: vec![t; 50],
        });
        let mut row = ping_row("a", &[], RequestState::Succeeded);
        row.result = out.to_json();
        let mut input = AgentInput::default();
        for _ in 0..20 {
            input.add("ping_module", &row);
        }
        let acc = &input.targets["h"];
        assert_eq!(acc.sent, 20 * 900, "one target per result, not 50");
        assert_eq!(acc.samples.len(), MAX_SAMPLES_PER_TARGET);
        assert_eq!(input.results, 20);
    }

    #[test]
    fn agents_breach_by_loss_rtt_silence_and_failure() {
        let mut m = BTreeMap::new();
        m.insert(
            "good".to_string(),
            vec![ping_row(
                "good",
                &[Some(1.0), Some(2.0)],
                RequestState::Succeeded,
            )],
        );
        m.insert(
            "slow".to_string(),
            vec![ping_row(
                "slow",
                &[Some(150.0), Some(160.0)],
                RequestState::Succeeded,
            )],
        );
        m.insert(
            "lossy".to_string(),
            vec![ping_row(
                "lossy",
                &[Some(1.0), None, None, None],
                RequestState::Succeeded,
            )],
        );
        m.insert("silent".to_string(), vec![]);
        m.insert(
            "broken".to_string(),
            vec![ping_row("broken", &[], RequestState::Failed)],
        );
        // No thresholds: only silence and failure.
        let none = Thresholds {
            rtt_percentile: 95.0,
            ..Default::default()
        };
        let (_, b) = evaluate(&none, &inputs(&m), 0);
        let who: Vec<(&str, &str)> = b
            .iter()
            .map(|b| (b.agent_id.as_str(), b.check.as_str()))
            .collect();
        assert_eq!(who, vec![("broken", "run"), ("silent", "reported")]);
        // Thresholds.
        let t = Thresholds {
            max_loss: Some(50.0),
            max_rtt_median: Some(100.0),
            ..none.clone()
        };
        let (v, b) = evaluate(&t, &inputs(&m), 0);
        let who: Vec<(&str, &str)> = b
            .iter()
            .map(|b| (b.agent_id.as_str(), b.check.as_str()))
            .collect();
        assert_eq!(
            who,
            vec![
                ("broken", "run"),
                ("lossy", "max_loss"),
                ("silent", "reported"),
                ("slow", "max_rtt_median")
            ]
        );
        let slow = b.iter().find(|b| b.agent_id == "slow").unwrap();
        assert_eq!(slow.value, json!(155.0));
        assert_eq!(slow.threshold, json!(100.0));
        assert_eq!(slow.message, "rtt median 155.000 ms > 100 ms");
        let r = report("m-1", "ping_module", t.clone(), Value::Null, 4, false, v, b);
        assert_eq!(r.status, Status::Critical);
        assert_eq!(r.breaching_agents, 4);
        let n = nagios(&r);
        assert!(
            n.starts_with("IMN CRITICAL - m-1: 4 of 5 agents breaching (0 allowed): "),
            "{n}"
        );
        assert!(
            n.lines()
                .next()
                .unwrap()
                .contains("| agents=5;;;0 breaching=4;0;0;0;5"),
            "{n}"
        );
        // Agent text stays on its line, and cannot forge performance data.
        assert!(
            n.lines()
                .any(|l| l == "broken: newest run failed: boom line ¦ breaching=0;0;0;0;1"),
            "{n}"
        );
        assert_eq!(n.lines().next().unwrap().matches('|').count(), 1, "{n}");
        let p = prometheus(&r);
        assert!(p.contains("imn_check_status{measurement=\"m-1\"} 2"), "{p}");
        assert!(p.contains("imn_check_breach{measurement=\"m-1\",agent=\"slow\",target=\"h\",check=\"max_rtt_median\"} 1"), "{p}");
        // Four may breach: a warning, still healthy.
        let lenient = Thresholds {
            max_breaching: 4,
            ..t
        };
        let (v, b) = evaluate(&lenient, &inputs(&m), 0);
        let r = report("m-1", "ping_module", lenient, Value::Null, 4, false, v, b);
        assert_eq!((r.status, r.healthy), (Status::Warning, true));
    }
}
