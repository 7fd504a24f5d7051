//! Enrollment of agents, API tokens with scopes and rate limits, input limits and the
//! measurement policy.
//!
//! Secrets are 256-bit random tokens, shown once when created or rotated. The store
//! keeps only their SHA-256 (and, for agents, the message key the bridge verifies
//! signatures with: see `imn_modules::auth`). Every change to an agent's credentials is
//! pushed to the bridge's [`AgentCredentials`], which disconnects a revoked or rotated
//! agent at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use imn_bridge::{AgentCredential, AgentCredentials};
use imn_modules::auth as wauth;
use imn_modules::now_ms;
use imn_modules::wire;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::store::{CredentialRow, Store};

/// What an API token may do. `admin` includes the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every `GET`: agents, results, states, modules, health.
    Read,
    /// Submitting measurements and loading modules on agents.
    Measure,
    /// Enrollment, tokens, and fault injection.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Measure => "measure",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "measure" => Some(Scope::Measure),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Limits on what one API request may ask for. Each rejection names its limit.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most targets in one measurement.
    pub max_targets: usize,
    /// Largest `count` (probes per target).
    pub max_count: u64,
    /// Highest probe rate one request may ask for, in probes per second: its `rate`, or
    /// targets × 1000 / `interval_ms` when it gives none.
    pub max_rate: f64,
    /// Most requests not yet finished for one agent.
    pub max_queued_per_agent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_targets: 10_000,
            max_count: 100,
            max_rate: 10_000.0,
            max_queued_per_agent: 1_000,
        }
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (like 192.0.2.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.addr.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            ip => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One rule of the measurement policy. It applies to the agents it names and to agents
/// with any of its tags; a rule naming neither applies to every agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub name: String,
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// When not empty, every target must be inside one of these networks.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// No target may be inside any of these networks.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// Highest probe rate, in probes per second.
    pub max_rate: Option<f64>,
}

impl PolicyRule {
    fn applies(&self, agent: &str, tags: &[String]) -> bool {
        (self.agents.is_empty() && self.tags.is_empty())
            || self.agents.iter().any(|a| a == agent)
            || self.tags.iter().any(|t| tags.contains(t))
    }
}

/// The measurement policy: a TOML file of `[[rule]]` tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "rule")]
    pub rules: Vec<PolicyRule>,
}

impl Policy {
    pub fn load(path: &std::path::Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let p: Policy = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for r in &p.rules {
            if r.max_rate.is_some_and(|m| m.is_nan() || m <= 0.0) {
                return Err(format!(
                    "{}: rule {:?}: max_rate must be greater than 0",
                    path.display(),
                    r.name
                ));
            }
        }
        Ok(p)
    }
}

/// What a measurement asks for, as far as limits and policy care.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub targets: Vec<String>,
    pub count: Option<u64>,
    /// Probes per second.
    pub rate: Option<f64>,
}

impl Demand {
    /// Reads targets, count and rate from a module's (validated) parameters.
    pub fn of(params: &Value) -> Demand {
        let mut targets: Vec<String> = Vec::new();
        if let Some(h) = params.get("host").and_then(Value::as_str) {
            targets.push(h.to_string());
        }
        if let Some(list) = params.get("targets").and_then(Value::as_array) {
            targets.extend(list.iter().filter_map(Value::as_str).map(str::to_string));
        }
        let count = params.get("count").and_then(Value::as_u64);
        let rate = params.get("rate").and_then(Value::as_f64).or_else(|| {
            if targets.is_empty() {
                return None;
            }
            let interval = params
                .get("interval_ms")
                .and_then(Value::as_u64)
                .unwrap_or(1000)
                .max(1);
            Some(targets.len() as f64 * 1000.0 / interval as f64)
        });
        Demand {
            targets,
            count,
            rate,
        }
    }
}

/// An enrolled agent (never its token).
#[derive(Debug, Clone, Serialize)]
pub struct EnrolledAgent {
    pub id: String,
    pub tags: Vec<String>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// An API token (never its secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub scopes: Vec<Scope>,
    pub rate_per_min: f64,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

struct TokenEntry {
    info: TokenInfo,
    hash: String,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A caller that passed authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: Option<String>,
}

/// A fresh secret: 32 random bytes, hex.
fn new_secret(prefix: &str) -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", wauth::to_hex(&b))
}

/// Everything about who may do what.
pub struct Security {
    enabled: bool,
    pub limits: Limits,
    pub policy: Policy,
    /// Default rate of a token that sets none, per minute.
    pub default_rate_per_min: f64,
    bridge: Arc<AgentCredentials>,
    agents: RwLock<HashMap<String, EnrolledAgent>>,
    /// By token hash.
    tokens: RwLock<HashMap<String, TokenEntry>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Called after every credential change this backend makes (other backends
    /// sharing the store then reload).
    changed: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Security {
    /// `bridge` is the in-process bridge's credential table (or one nobody reads);
    /// auth is on when it is.
    pub fn new(bridge: Arc<AgentCredentials>, limits: Limits, policy: Policy) -> Security {
        Security {
            enabled: bridge.is_enabled(),
            limits,
            policy,
            default_rate_per_min: 600.0,
            bridge,
            agents: RwLock::new(HashMap::new()),
            tokens: RwLock::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            changed: std::sync::OnceLock::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn bridge(&self) -> &Arc<AgentCredentials> {
        &self.bridge
    }

    /// Loads credentials from the store into memory and the bridge.
    pub async fn load(&self, store: &dyn Store) -> Result<(), ApiError> {
        for row in store.credentials().await? {
            self.apply(&row);
        }
        Ok(())
    }

    fn apply(&self, row: &CredentialRow) {
        match row.kind.as_str() {
            "agent" => {
                if let Some(key) = row.message_key.as_deref().and_then(wauth::key_from_hex) {
                    self.bridge.set(
                        &row.id,
                        AgentCredential {
                            token_hash: row.secret_hash.clone(),
                            message_key: key,
                            revoked: row.revoked_ms.is_some(),
                        },
                    );
                }
                self.agents
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        row.id.clone(),
                        EnrolledAgent {
                            id: row.id.clone(),
                            tags: row.tags.clone(),
                            created_ms: row.created_ms,
                            revoked_ms: row.revoked_ms,
                        },
                    );
            }
            _ => {
                let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
                tokens.retain(|_, t| t.info.id != row.id);
                tokens.insert(
                    row.secret_hash.clone(),
                    TokenEntry {
                        info: TokenInfo {
                            id: row.id.clone(),
                            scopes: row.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                            rate_per_min: row.rate_per_min.unwrap_or(self.default_rate_per_min),
                            created_ms: row.created_ms,
                            revoked_ms: row.revoked_ms,
                        },
                        hash: row.secret_hash.clone(),
                    },
                );
            }
        }
    }

    async fn save(&self, store: &dyn Store, row: CredentialRow) -> Result<(), ApiError> {
        store.put_credential(row.clone()).await?;
        self.apply(&row);
        if let Some(f) = self.changed.get() {
            f();
        }
        Ok(())
    }

    /// Runs `f` after every credential change made here.
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.changed.set(Box::new(f));
    }

    /// Reads every credential again: another backend changed one. Tokens are rebuilt
    /// (a rotated token's old hash goes); agents are updated in place.
    pub async fn reload(&self, store: &dyn Store) -> Result<(), ApiError> {
        let rows = store.credentials().await?;
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|hash, _| {
                rows.iter()
                    .any(|r| r.kind == "api" && r.secret_hash == *hash)
            });
        for row in &rows {
            self.apply(row);
        }
        Ok(())
    }

    /// Enrolls an agent; returns its token, which is not kept.
    pub async fn enroll(
        &self,
        store: &dyn Store,
        id: &str,
        tags: Vec<String>,
    ) -> Result<String, ApiError> {
        if !wire::valid_agent_id(id) {
            return Err(ApiError::InvalidParams {
                field: "/id".into(),
                rule: "pattern".into(),
                message: format!(
                    "/id: {id:?} must be 1 to {} letters, digits, '-' or '_'",
                    wire::MAX_AGENT_ID_LEN
                ),
            });
        }
        if id.starts_with("imn-") {
            return Err(ApiError::InvalidParams {
                field: "/id".into(),
                rule: "reserved".into(),
                message: format!("/id: {id:?}: ids starting with imn- are reserved"),
            });
        }
        if let Some(t) = tags
            .iter()
            .find(|t| t.is_empty() || t.len() > 64 || t.contains(','))
        {
            return Err(ApiError::InvalidParams {
                field: "/tags".into(),
                rule: "pattern".into(),
                message: format!("/tags: {t:?} must be 1 to 64 characters, without commas"),
            });
        }
        if self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|a| a.revoked_ms.is_none())
        {
            return Err(ApiError::Conflict(format!(
                "agent {id:?} is already enrolled; rotate or revoke it"
            )));
        }
        self.issue_agent(store, id, tags, now_ms()).await
    }

    async fn issue_agent(
        &self,
        store: &dyn Store,
        id: &str,
        tags: Vec<String>,
        created_ms: i64,
    ) -> Result<String, ApiError> {
        let token = new_secret("imna_");
        self.save(
            store,
            CredentialRow {
                kind: "agent".into(),
                id: id.to_string(),
                secret_hash: wauth::token_hash(&token),
                message_key: Some(wauth::to_hex(&wauth::message_key(&token))),
                scopes: vec![],
                tags,
                rate_per_min: None,
                created_ms,
                revoked_ms: None,
                budget_json: None,
            },
        )
        .await?;
        Ok(token)
    }

    fn enrolled(&self, id: &str) -> Result<EnrolledAgent, ApiError> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("agent {id:?} is not enrolled")))
    }

    /// A new token for an enrolled agent (also un-revokes it). The old token stops
    /// working and its connection is closed.
    pub async fn rotate_agent(&self, store: &dyn Store, id: &str) -> Result<String, ApiError> {
        let a = self.enrolled(id)?;
        self.issue_agent(store, id, a.tags, a.created_ms).await
    }

    /// Revokes an agent: it is disconnected and cannot log in again.
    pub async fn revoke_agent(&self, store: &dyn Store, id: &str) -> Result<(), ApiError> {
        let a = self.enrolled(id)?;
        self.revoke_row(
            store,
            |r| r.kind == "agent" && r.id == a.id,
            format!("agent {id:?} is not enrolled"),
        )
        .await
    }

    /// Marks the stored credential `which` picks revoked, and applies it.
    async fn revoke_row(
        &self,
        store: &dyn Store,
        which: impl Fn(&CredentialRow) -> bool,
        not_found: String,
    ) -> Result<(), ApiError> {
        let row = store
            .credentials()
            .await?
            .into_iter()
            .find(|r| which(r))
            .ok_or(ApiError::NotFound(not_found))?;
        self.save(
            store,
            CredentialRow {
                revoked_ms: Some(now_ms()),
                ..row
            },
        )
        .await
    }

    pub fn enrolled_agents(&self) -> Vec<EnrolledAgent> {
        let mut v: Vec<_> = self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Tags the policy uses: the enrolled ones (set by an admin) when the agent is
    /// enrolled, else what the agent says of itself.
    pub fn policy_tags(&self, agent: &str, self_declared: &[String]) -> Vec<String> {
        match self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
        {
            Some(a) => a.tags.clone(),
            None => self_declared.to_vec(),
        }
    }

    /// Creates an API token; returns its id and secret (not kept).
    pub async fn create_token(
        &self,
        store: &dyn Store,
        id: Option<String>,
        scopes: Vec<Scope>,
        rate_per_min: Option<f64>,
    ) -> Result<(String, String), ApiError> {
        if scopes.is_empty() {
            return Err(ApiError::InvalidParams {
                field: "/scopes".into(),
                rule: "minItems".into(),
                message: "/scopes: give at least one of read, measure, admin".into(),
            });
        }
        if rate_per_min.is_some_and(|r| !r.is_finite() || r <= 0.0) {
            return Err(ApiError::InvalidParams {
                field: "/rate_per_min".into(),
                rule: "exclusiveMinimum".into(),
                message: "/rate_per_min: must be greater than 0".into(),
            });
        }
        let id = match id {
            Some(id) if !wire::valid_agent_id(&id) => {
                return Err(ApiError::InvalidParams {
                    field: "/id".into(),
                    rule: "pattern".into(),
                    message: format!("/id: {id:?} must be 1 to 64 letters, digits, '-' or '_'"),
                })
            }
            Some(id) => id,
            None => format!("tok-{}", &new_secret("")[..12]),
        };
        if self
            .token_by_id(&id)
            .is_some_and(|t| t.revoked_ms.is_none())
        {
            return Err(ApiError::Conflict(format!(
                "token {id:?} exists; rotate or revoke it"
            )));
        }
        let secret = self
            .issue_token(store, &id, scopes, rate_per_min, now_ms())
            .await?;
        Ok((id, secret))
    }

    async fn issue_token(
        &self,
        store: &dyn Store,
        id: &str,
        scopes: Vec<Scope>,
        rate_per_min: Option<f64>,
        created_ms: i64,
    ) -> Result<String, ApiError> {
        let secret = new_secret("imnt_");
        self.save(
            store,
            CredentialRow {
                kind: "api".into(),
                id: id.to_string(),
                secret_hash: wauth::token_hash(&secret),
                message_key: None,
                scopes: scopes.iter().map(|s| s.as_str().to_string()).collect(),
                tags: vec![],
                rate_per_min,
                created_ms,
                revoked_ms: None,
                budget_json: None,
            },
        )
        .await?;
        Ok(secret)
    }

    fn token_by_id(&self, id: &str) -> Option<TokenInfo> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|t| t.info.id == id)
            .map(|t| t.info.clone())
    }

    pub async fn rotate_token(&self, store: &dyn Store, id: &str) -> Result<String, ApiError> {
        let t = self
            .token_by_id(id)
            .ok_or_else(|| ApiError::NotFound(format!("no token {id:?}")))?;
        self.issue_token(store, id, t.scopes, Some(t.rate_per_min), t.created_ms)
            .await
    }

    pub async fn revoke_token(&self, store: &dyn Store, id: &str) -> Result<(), ApiError> {
        let hash = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|t| t.info.id == id)
            .map(|t| t.hash.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no token {id:?}")))?;
        self.revoke_row(
            store,
            |r| r.kind == "api" && r.secret_hash == hash,
            format!("no token {id:?}"),
        )
        .await
    }

    pub fn tokens(&self) -> Vec<TokenInfo> {
        let mut v: Vec<_> = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|t| t.info.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Whether `secret` is a live token (used to keep `DATA/admin-token` across
    /// restarts).
    pub fn token_is_live(&self, secret: &str) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&wauth::token_hash(secret))
            .is_some_and(|t| t.info.revoked_ms.is_none())
    }

    /// Authenticates a request needing `scope`: 401 without a live token, 403 without
    /// the scope, 429 over the token's rate.
    pub fn authorize(&self, bearer: Option<&str>, scope: Scope) -> Result<Caller, ApiError> {
        if !self.enabled {
            return Ok(Caller { token_id: None });
        }
        let secret = bearer.ok_or_else(|| {
            ApiError::Unauthorized("this API needs a token: Authorization: Bearer <token>".into())
        })?;
        let info = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&wauth::token_hash(secret))
            .map(|t| t.info.clone())
            .filter(|t| t.revoked_ms.is_none())
            .ok_or_else(|| ApiError::Unauthorized("the token is unknown or revoked".into()))?;
        if !info.scopes.contains(&scope) && !info.scopes.contains(&Scope::Admin) {
            return Err(ApiError::Forbidden {
                rule: format!("scope:{}", scope.as_str()),
                message: format!(
                    "token {:?} lacks the {} scope (it has: {})",
                    info.id,
                    scope.as_str(),
                    info.scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        self.take(&info.id, info.rate_per_min)?;
        Ok(Caller {
            token_id: Some(info.id),
        })
    }

    /// One request from a token bucket holding a tenth of a minute's rate (at least 1).
    fn take(&self, id: &str, per_min: f64) -> Result<(), ApiError> {
        let per_s = per_min / 60.0;
        let burst = (per_min / 6.0).max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(id.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_s).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        // At most a year: a tiny rate (1e-300 a minute) must not overflow a Duration.
        const YEAR: Duration = Duration::from_secs(365 * 86_400);
        let wait = Duration::try_from_secs_f64((1.0 - b.tokens) / per_s)
            .unwrap_or(YEAR)
            .min(YEAR);
        Err(ApiError::RateLimited {
            retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            message: format!("token {id:?} is over its rate of {per_min} requests per minute"),
        })
    }

    /// Checks a measurement against the limits (422, naming the limit) and the policy
    /// (403, naming the rule).
    pub async fn check_measurement(
        &self,
        agent: &str,
        tags: &[String],
        demand: &Demand,
    ) -> Result<(), ApiError> {
        let l = &self.limits;
        if demand.targets.len() > l.max_targets {
            return Err(ApiError::OverLimit {
                limit: "max_targets",
                field: "/targets".into(),
                message: format!(
                    "{} targets is over the limit max_targets = {}",
                    demand.targets.len(),
                    l.max_targets
                ),
            });
        }
        if let Some(c) = demand.count.filter(|c| *c > l.max_count) {
            return Err(ApiError::OverLimit {
                limit: "max_count",
                field: "/count".into(),
                message: format!("count {c} is over the limit max_count = {}", l.max_count),
            });
        }
        if let Some(r) = demand.rate.filter(|r| *r > l.max_rate) {
            return Err(ApiError::OverLimit {
                limit: "max_rate",
                field: "/rate".into(),
                message: format!(
                    "a probe rate of {r} per second is over the limit max_rate = {}",
                    l.max_rate
                ),
            });
        }
        let rules: Vec<&PolicyRule> = self
            .policy
            .rules
            .iter()
            .filter(|r| r.applies(agent, tags))
            .collect();
        if rules.is_empty() {
            return Ok(());
        }
        for r in &rules {
            if let (Some(max), Some(rate)) = (r.max_rate, demand.rate) {
                if rate > max {
                    return Err(ApiError::PolicyDenied {
                        rule: format!("{}.max_rate", r.name),
                        message: format!(
                            "policy rule {:?}: a probe rate of {rate} per second is over its max_rate of {max}",
                            r.name
                        ),
                    });
                }
            }
        }
        if !rules
            .iter()
            .any(|r| !r.allow.is_empty() || !r.deny.is_empty())
        {
            return Ok(());
        }
        for target in &demand.targets {
            let addrs = resolve(target).await;
            for r in &rules {
                if r.allow.is_empty() && r.deny.is_empty() {
                    continue;
                }
                let Ok(addrs) = &addrs else {
                    return Err(ApiError::PolicyDenied {
                        rule: format!("{}.resolve", r.name),
                        message: format!(
                            "policy rule {:?}: target {target:?} does not resolve here, so its address cannot be checked",
                            r.name
                        ),
                    });
                };
                for ip in addrs {
                    if let Some(net) = r.deny.iter().find(|n| n.contains(*ip)) {
                        return Err(ApiError::PolicyDenied {
                            rule: format!("{}.deny", r.name),
                            message: format!(
                                "policy rule {:?} denies target {target} ({ip} is in {net})",
                                r.name
                            ),
                        });
                    }
                    if !r.allow.is_empty() && !r.allow.iter().any(|n| n.contains(*ip)) {
                        return Err(ApiError::PolicyDenied {
                            rule: format!("{}.allow", r.name),
                            message: format!(
                                "policy rule {:?} allows only {}; target {target} ({ip}) is outside",
                                r.name,
                                r.allow
                                    .iter()
                                    .map(|n| n.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// A target's addresses: itself when it is an IP literal, else the system resolver's
/// answer (within 2 s).
async fn resolve(target: &str) -> Result<Vec<IpAddr>, ()> {
    let t = target.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host((t, 0))).await {
        Ok(Ok(addrs)) => {
            let v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            if v.is_empty() {
                Err(())
            } else {
                Ok(v)
            }
        }
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_policy_in_deploy_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.example.toml");
        let p = Policy::load(&path).unwrap();
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["no-internal", "lte", "lab"]);
        assert!(p.rules[0].applies("any", &[]));
        assert!(p.rules[1].applies("x", &["lte".into()]) && !p.rules[1].applies("x", &[]));
    }

    /// A bucket with a rate too small (or broken) to refill in any sane time answers
    /// 429 with a bounded Retry-After; it does not panic.
    #[test]
    fn tiny_or_broken_rates_refuse_without_panicking() {
        let s = Security::new(
            Arc::new(imn_bridge::AgentCredentials::disabled()),
            Limits::default(),
            Policy::default(),
        );
        for rate in [1e-300, 0.0, f64::MIN_POSITIVE] {
            let id = format!("t{rate}");
            assert!(
                s.take(&id, rate).is_ok(),
                "the first request uses the burst"
            );
            match s.take(&id, rate) {
                Err(ApiError::RateLimited { retry_after_s, .. }) => {
                    assert!(retry_after_s <= 365 * 86_400, "{rate}: {retry_after_s}")
                }
                other => panic!("{rate}: {other:?}"),
            }
        }
    }

    #[test]
    fn cidrs_parse_and_match() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        let h = Cidr::parse("::1").unwrap();
        assert!(h.contains("::1".parse().unwrap()));
        assert!(!h.contains("::2".parse().unwrap()));
        assert!(!h.contains("127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
    }

    #[test]
    fn demand_reads_targets_count_and_rate() {
        let d =
            Demand::of(&serde_json::json!({"targets": ["a", "b"], "count": 3, "interval_ms": 100}));
        assert_eq!(d.targets, vec!["a", "b"]);
        assert_eq!(d.count, Some(3));
        assert_eq!(d.rate, Some(20.0));
        let d = Demand::of(&serde_json::json!({"host": "a", "rate": 5.0}));
        assert_eq!(d.rate, Some(5.0));
        assert_eq!(Demand::of(&serde_json::json!({"message": "x"})).rate, None);
    }

    #[tokio::test]
    async fn limits_and_policy_name_what_refused() {
        let policy: Policy = toml::from_str(
            r#"
            [[rule]]
            name = "lab"
            tags = ["lab"]
            allow = ["127.0.0.0/8"]
            deny = ["127.0.0.9/32"]
            max_rate = 10
            "#,
        )
        .unwrap();
        let s = Security::new(
            Arc::new(AgentCredentials::disabled()),
            Limits {
                max_targets: 2,
                ..Limits::default()
            },
            policy,
        );
        let lab = vec!["lab".to_string()];
        let demand = |t: &[&str], rate: f64| Demand {
            targets: t.iter().map(|s| s.to_string()).collect(),
            count: Some(1),
            rate: Some(rate),
        };
        let code = |r: Result<(), ApiError>| match r {
            Err(ApiError::PolicyDenied { rule, .. }) => rule,
            Err(ApiError::OverLimit { limit, .. }) => limit.to_string(),
            Err(e) => e.to_string(),
            Ok(()) => "ok".into(),
        };
        assert_eq!(
            code(
                s.check_measurement("a", &lab, &demand(&["127.0.0.1"], 1.0))
                    .await
            ),
            "ok"
        );
        assert_eq!(
            code(
                s.check_measurement("a", &lab, &demand(&["a", "b", "c"], 1.0))
                    .await
            ),
            "max_targets"
        );
        assert_eq!(
            code(
                s.check_measurement("a", &lab, &demand(&["127.0.0.9"], 1.0))
                    .await
            ),
            "lab.deny"
        );
        assert_eq!(
            code(
                s.check_measurement("a", &lab, &demand(&["192.0.2.1"], 1.0))
                    .await
            ),
            "lab.allow"
        );
        assert_eq!(
            code(
                s.check_measurement("a", &lab, &demand(&["127.0.0.1"], 11.0))
                    .await
            ),
            "lab.max_rate"
        );
        // The rule is for tag "lab" only.
        assert_eq!(
            code(
                s.check_measurement("a", &[], &demand(&["192.0.2.1"], 11.0))
                    .await
            ),
            "ok"
        );
    }

    #[test]
    fn rate_limit_answers_with_retry_after() {
        let s = Security::new(
            Arc::new(AgentCredentials::enabled()),
            Limits::default(),
            Policy::default(),
        );
        assert!(s.take("t", 6.0).is_ok(), "a burst of one");
        match s.take("t", 6.0) {
            Err(ApiError::RateLimited { retry_after_s, .. }) => {
                assert!((1..=10).contains(&retry_after_s), "{retry_after_s}")
            }
            other => panic!("expected 429, got {other:?}"),
        }
    }
}
