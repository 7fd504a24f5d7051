//! Enrollment of agents, API tokens with scopes and rate limits, input limits and the
//! measurement policy.
//!
//! Secrets are 256-bit random tokens, shown once when created or rotated. The store
//! keeps only their SHA-256 (and, for agents, the message key the bridge verifies
//! signatures with: see `imn_proto::auth`). Every change to an agent's credentials is
//! pushed to the bridge's [`AgentCredentials`], which disconnects a revoked or rotated
//! agent at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use imn_cloud::{AgentCredential, AgentCredentials};
use imn_proto::auth as wauth;
use imn_proto::now_ms;
pub use imn_proto::policy::Cidr;
use imn_proto::policy::{Demand, Rule, TargetPolicy};
use imn_proto::wire;
use rand::RngCore;
use serde::{Deserialize, Serialize};

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
    /// Most recurring measurements one agent runs (whoever made them).
    pub max_schedules_per_agent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_targets: 10_000,
            max_count: 100,
            max_rate: 10_000.0,
            max_queued_per_agent: 1_000,
            max_schedules_per_agent: 100,
        }
    }
}

/// One rule of the measurement policy. It applies to the agents it names and to agents
/// enrolled with any of its tags; a rule naming neither applies to every agent.
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
    /// `tags`: the agent's tags as an admin enrolled it. What an agent says of itself
    /// never decides which rules bind it.
    fn applies(&self, agent: &str, tags: &[String]) -> bool {
        (self.agents.is_empty() && self.tags.is_empty())
            || self.agents.iter().any(|a| a == agent)
            || self.tags.iter().any(|t| tags.contains(t))
    }
}

/// The measurement policy: a TOML file of `[[rule]]` tables, the switch of the built-in
/// rule, and the default budget of API tokens.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "rule")]
    pub rules: Vec<PolicyRule>,
    /// The built-in rule ([`imn_proto::policy::BUILTIN_DENY`]): on by default with
    /// `--auth` or when the backend listens beyond loopback; `false` turns it off,
    /// `true` turns it on everywhere.
    pub builtin_deny: Option<bool>,
    /// The budget of API tokens that were given none of their own.
    #[serde(default)]
    pub budget: Option<Budget>,
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
        let policy = TargetPolicy {
            rules: p.rules.iter().map(|r| r.target_rule()).collect(),
            builtin: true,
        };
        if !policy.within_limits() {
            return Err(format!(
                "{}: at most {} rules and {} networks in all (agents refuse larger policies)",
                path.display(),
                imn_proto::policy::MAX_RULES,
                imn_proto::policy::MAX_NETWORKS
            ));
        }
        if let Some(b) = &p.budget {
            b.check("budget")
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(p)
    }
}

impl PolicyRule {
    fn target_rule(&self) -> Rule {
        Rule {
            name: self.name.clone(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }
}

/// What an API token may spend. Absent fields are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Probes per UTC day across the fleet: count × targets × agents of every one-off
    /// measurement, charged when it is made, plus the daily probes of every recurring
    /// one it keeps running (its whole life when that is shorter than a day).
    pub probes_per_day: Option<u64>,
    /// Recurring measurements running at once.
    pub max_schedules: Option<u64>,
    /// Shortest interval of a recurring measurement, in seconds, per module; `"*"`
    /// for every module not named.
    #[serde(default)]
    pub min_interval_s: std::collections::BTreeMap<String, f64>,
}

impl Budget {
    /// The budget of a token with the `measure` scope when neither it nor the policy
    /// file sets one: a million probes a day, 100 recurring measurements, none more
    /// often than once a minute (as RIPE Atlas's defaults).
    pub fn default_measure() -> Budget {
        Budget {
            probes_per_day: Some(1_000_000),
            max_schedules: Some(100),
            min_interval_s: [("*".to_string(), 60.0)].into_iter().collect(),
        }
    }

    /// The shortest interval allowed for `module`'s recurring measurements.
    pub fn min_interval(&self, module: &str) -> Option<f64> {
        self.min_interval_s
            .get(module)
            .or_else(|| self.min_interval_s.get("*"))
            .copied()
    }

    fn check(&self, field: &str) -> Result<(), String> {
        for (m, s) in &self.min_interval_s {
            if !s.is_finite() || *s < 0.0 {
                return Err(format!(
                    "{field}.min_interval_s.{m}: must be 0 or more seconds"
                ));
            }
            if m != "*" && imn_proto::catalog::find(m).is_none() {
                return Err(format!(
                    "{field}.min_interval_s.{m}: no such module (modules: {})",
                    imn_proto::catalog::names().join(", ")
                ));
            }
        }
        Ok(())
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
    /// Its own budget, when it was given one (else see [`Security::budget_of`]).
    pub budget: Option<Budget>,
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
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// None without auth.
    pub token_id: Option<String>,
    /// The token has the admin scope (without auth, everyone is).
    pub admin: bool,
    /// What the token may spend (None: unlimited).
    pub budget: Option<Budget>,
}

impl Caller {
    /// Whether this caller may act on something `owner` made: its own token, an admin,
    /// or anyone when neither has a token (no auth, or made before auth was on).
    pub fn may_act_for(&self, owner: Option<&str>) -> bool {
        self.admin || owner.is_none() || owner == self.token_id.as_deref()
    }
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
    /// The built-in rule binds every agent (see [`Policy::builtin_deny`]).
    builtin_deny: bool,
    /// Ed25519 public keys (hex) whose signed releases the backend accepts.
    pub release_keys: Vec<String>,
}

impl Security {
    /// `bridge` is the in-process bridge's credential table (or one nobody reads);
    /// auth is on when it is.
    pub fn new(bridge: Arc<AgentCredentials>, limits: Limits, policy: Policy) -> Security {
        // With auth the fleet is lent to token holders: the built-in rule is on unless
        // the policy file turns it off.
        let builtin_deny = policy.builtin_deny.unwrap_or(bridge.is_enabled());
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
            builtin_deny,
            release_keys: Vec::new(),
        }
    }

    /// Turns the built-in rule on when the backend is exposed (listens beyond loopback)
    /// and the policy file does not say otherwise. It is on with auth already.
    pub fn exposed(mut self, exposed: bool) -> Security {
        if exposed && self.policy.builtin_deny.is_none() {
            self.builtin_deny = true;
        }
        self
    }

    /// Whether the built-in rule binds every agent.
    pub fn builtin_deny(&self) -> bool {
        self.builtin_deny
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
                            budget: row
                                .budget_json
                                .as_deref()
                                .and_then(|b| serde_json::from_str(b).ok()),
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
            .find(|t| t.is_empty() || t.chars().count() > 64 || t.contains(','))
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

    /// Creates an API token; returns its id and secret (not kept).
    pub async fn create_token(
        &self,
        store: &dyn Store,
        id: Option<String>,
        scopes: Vec<Scope>,
        rate_per_min: Option<f64>,
        budget: Option<Budget>,
    ) -> Result<(String, String), ApiError> {
        if let Some(b) = &budget {
            b.check("/budget")
                .map_err(|message| ApiError::InvalidParams {
                    field: "/budget/min_interval_s".into(),
                    rule: "range".into(),
                    message,
                })?;
        }
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
            .issue_token(store, &id, scopes, rate_per_min, budget, now_ms())
            .await?;
        Ok((id, secret))
    }

    async fn issue_token(
        &self,
        store: &dyn Store,
        id: &str,
        scopes: Vec<Scope>,
        rate_per_min: Option<f64>,
        budget: Option<Budget>,
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
                budget_json: budget.and_then(|b| serde_json::to_string(&b).ok()),
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
        self.issue_token(
            store,
            id,
            t.scopes,
            Some(t.rate_per_min),
            t.budget,
            t.created_ms,
        )
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

    /// What a token may spend: its own budget; else nothing for an admin token (the
    /// operator's); else the policy file's `[budget]`, or [`Budget::default_measure`].
    pub fn budget_of(&self, t: &TokenInfo) -> Option<Budget> {
        if let Some(b) = &t.budget {
            return Some(b.clone());
        }
        if t.scopes.contains(&Scope::Admin) {
            return None;
        }
        Some(
            self.policy
                .budget
                .clone()
                .unwrap_or_else(Budget::default_measure),
        )
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
            return Ok(Caller {
                token_id: None,
                admin: true,
                budget: None,
            });
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
            admin: info.scopes.contains(&Scope::Admin),
            budget: self.budget_of(&info),
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

    /// The rules that bind `agent` (by id, or by the tags an admin enrolled it with),
    /// as its commands carry them to it.
    pub fn target_policy(&self, agent: &str) -> TargetPolicy {
        let tags = self.enrolled_tags(agent);
        TargetPolicy {
            rules: self
                .policy
                .rules
                .iter()
                .filter(|r| r.applies(agent, &tags))
                .map(PolicyRule::target_rule)
                .collect(),
            builtin: self.builtin_deny,
        }
    }

    /// Checks a measurement on one agent against the limits (422, naming the limit)
    /// and the policy (403, naming the rule). `enforcing`: the agent checks every
    /// address itself (it said so in its hello), so a host name the backend cannot
    /// resolve is left to it; an agent that does not is refused such a name. Returns
    /// the rules that bind the agent, for its command.
    pub async fn check_measurement(
        &self,
        agent: &str,
        demand: &Demand,
        enforcing: bool,
        names: &Resolutions,
    ) -> Result<TargetPolicy, ApiError> {
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
        let tags = self.enrolled_tags(agent);
        for r in self.policy.rules.iter().filter(|r| r.applies(agent, &tags)) {
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
        let policy = self.target_policy(agent);
        if policy.is_open() {
            return Ok(policy);
        }
        let first_rule = policy
            .rules
            .first()
            .map_or(imn_proto::policy::BUILTIN_RULE, |r| r.name.as_str());
        if demand.redirects && !enforcing {
            return Err(ApiError::PolicyDenied {
                rule: format!("{first_rule}.redirects"),
                message: "/follow_redirects: this agent does not check the addresses it sends to itself (it is older than wire version 2), so under a policy it may not follow redirects the backend cannot see".into(),
            });
        }
        names.resolve(demand).await;
        for t in &demand.targets {
            let addrs = match t.literal() {
                Some(ip) => vec![ip],
                None => match names.get(&t.host) {
                    Some(addrs) => addrs,
                    None if enforcing => continue,
                    None => {
                        return Err(ApiError::PolicyDenied {
                            rule: format!("{first_rule}.resolve"),
                            message: format!(
                                "{}: {:?} does not resolve here, so its address cannot be checked (this agent does not check addresses itself; give an address)",
                                t.field, t.host
                            ),
                        });
                    }
                },
            };
            for ip in addrs {
                if let Err(d) = policy.check(ip) {
                    return Err(ApiError::PolicyDenied {
                        rule: d.rule.clone(),
                        message: format!("{}: {}", t.field, d.error_text(&t.host)),
                    });
                }
            }
        }
        Ok(policy)
    }

    /// The tags an admin enrolled `agent` with (none for an agent never enrolled).
    pub fn enrolled_tags(&self, agent: &str) -> Vec<String> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .map(|a| a.tags.clone())
            .unwrap_or_default()
    }
}

/// Name lookups in flight at once for policy checks, across every API request.
const LOOKUPS_IN_FLIGHT: usize = 64;
/// How long the names of one API request may take to resolve, all together.
pub const RESOLVE_BUDGET: Duration = Duration::from_secs(5);

fn lookups() -> &'static tokio::sync::Semaphore {
    static S: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LOOKUPS_IN_FLIGHT);
    &S
}

/// The addresses of the host names one API request names, resolved once for every
/// agent it selects, concurrently (at most [`LOOKUPS_IN_FLIGHT`] across the backend)
/// and within [`RESOLVE_BUDGET`] for all of them, with the agent's own stub resolver
/// (async sockets: no blocking threads, none of the store's). A name that did not
/// resolve in time counts as not resolving.
#[derive(Debug, Default)]
pub struct Resolutions {
    done: Mutex<HashMap<String, Option<Vec<IpAddr>>>>,
    started: Mutex<Option<Instant>>,
}

impl Resolutions {
    /// Resolves the names of `demand` not resolved yet.
    pub async fn resolve(&self, demand: &Demand) {
        use futures::StreamExt;
        let todo: Vec<String> = {
            let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<String> = demand
                .targets
                .iter()
                .filter(|t| t.literal().is_none() && !done.contains_key(&t.host))
                .map(|t| t.host.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        if todo.is_empty() {
            return;
        }
        let started = *self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        let left = RESOLVE_BUDGET.saturating_sub(started.elapsed());
        let lookups = futures::stream::iter(todo.clone())
            .map(|name| async move {
                let Ok(_permit) = lookups().acquire().await else {
                    return (name, None);
                };
                let addrs = imn_resolver::lookup(&name)
                    .await
                    .ok()
                    .filter(|a| !a.is_empty());
                (name, addrs)
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>();
        let found = tokio::time::timeout(left, lookups)
            .await
            .unwrap_or_default();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        for name in todo {
            done.insert(name, None);
        }
        for (name, addrs) in found {
            done.insert(name, addrs);
        }
    }

    /// The addresses of `name`, if it resolved.
    pub fn get(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .flatten()
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

    /// The policy file's own settings: the built-in rule's switch and the tokens'
    /// default budget, checked when loaded (a module that does not exist is named).
    #[test]
    fn policy_files_carry_the_builtin_switch_and_a_budget() {
        let dir = std::env::temp_dir().join(format!("imn-policy-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            "builtin_deny = false\n[budget]\nprobes_per_day = 5\nmin_interval_s = { \"*\" = 60, \"ping_module\" = 30 }\n",
        )
        .unwrap();
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.builtin_deny, Some(false));
        let b = p.budget.unwrap();
        assert_eq!(b.probes_per_day, Some(5));
        assert_eq!(b.min_interval("ping_module"), Some(30.0));
        assert_eq!(b.min_interval("dns"), Some(60.0));
        std::fs::write(&path, "[budget]\nmin_interval_s = { \"pong\" = 1 }\n").unwrap();
        let e = Policy::load(&path).unwrap_err();
        assert!(e.contains("pong") && e.contains("no such module"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A bucket with a rate too small (or broken) to refill in any sane time answers
    /// 429 with a bounded Retry-After; it does not panic.
    #[test]
    fn tiny_or_broken_rates_refuse_without_panicking() {
        let s = Security::new(
            Arc::new(imn_cloud::AgentCredentials::disabled()),
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

    /// Enrolls `agent` with `tags` in memory, as a stored credential would.
    fn enrolled(s: &Security, agent: &str, tags: &[&str]) {
        s.agents.write().unwrap().insert(
            agent.into(),
            EnrolledAgent {
                id: agent.into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                created_ms: 0,
                revoked_ms: None,
            },
        );
    }

    fn demand(targets: &[&str], rate: f64) -> Demand {
        Demand {
            targets: targets
                .iter()
                .enumerate()
                .map(|(i, t)| imn_proto::policy::Target::new(format!("/targets/{i}"), *t))
                .collect(),
            count: Some(1),
            probes: targets.len() as u64,
            rate: Some(rate),
            redirects: false,
        }
    }

    fn code(r: Result<TargetPolicy, ApiError>) -> String {
        match r {
            Err(ApiError::PolicyDenied { rule, .. }) => rule,
            Err(ApiError::OverLimit { limit, .. }) => limit.to_string(),
            Err(e) => e.to_string(),
            Ok(_) => "ok".into(),
        }
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
        enrolled(&s, "a", &["lab"]);
        let names = Resolutions::default();
        let check = |d: Demand| {
            let s = &s;
            let names = &names;
            async move { code(s.check_measurement("a", &d, false, names).await) }
        };
        assert_eq!(check(demand(&["127.0.0.1"], 1.0)).await, "ok");
        assert_eq!(check(demand(&["a", "b", "c"], 1.0)).await, "max_targets");
        assert_eq!(check(demand(&["127.0.0.9"], 1.0)).await, "lab.deny");
        assert_eq!(check(demand(&["192.0.2.1"], 1.0)).await, "lab.allow");
        assert_eq!(check(demand(&["127.0.0.1"], 11.0)).await, "lab.max_rate");
        // The rule is for agents enrolled with the tag "lab" only.
        assert_eq!(
            code(
                s.check_measurement("b", &demand(&["192.0.2.1"], 11.0), false, &names)
                    .await
            ),
            "ok"
        );
        // The policy the command carries is the rules that bind the agent.
        let p = s
            .check_measurement("a", &demand(&["127.0.0.2"], 1.0), false, &names)
            .await
            .unwrap();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].name, "lab");
        assert!(!p.builtin, "auth is off and the backend not exposed");
        assert!(s.target_policy("b").is_open());
    }

    /// An agent declares its tags in its hello; only the tags an admin enrolled it with
    /// pick its rules. (Before, an unenrolled agent's own tags chose them: an agent
    /// could claim a tag to fall under a looser rule, or drop one to escape a strict one.)
    #[tokio::test]
    async fn declared_tags_never_choose_rules() {
        let policy: Policy = toml::from_str(
            r#"
            [[rule]]
            name = "strict"
            deny = ["0.0.0.0/0"]
            agents = ["x"]
            [[rule]]
            name = "lab"
            tags = ["lab"]
            allow = ["127.0.0.0/8"]
            "#,
        )
        .unwrap();
        let s = Security::new(
            Arc::new(AgentCredentials::disabled()),
            Limits::default(),
            policy,
        );
        assert!(s.target_policy("y").is_open(), "y is enrolled with no tag");
        enrolled(&s, "y", &["lab"]);
        assert_eq!(s.target_policy("y").rules[0].name, "lab");
        assert_eq!(s.target_policy("x").rules[0].name, "strict");
    }

    /// With auth the built-in rule is on; a policy file can turn it off, and an exposed
    /// backend turns it on.
    #[tokio::test]
    async fn the_builtin_rule_follows_auth_exposure_and_the_policy_file() {
        let names = Resolutions::default();
        let on = Security::new(
            Arc::new(AgentCredentials::enabled()),
            Limits::default(),
            Policy::default(),
        );
        assert!(on.builtin_deny());
        assert_eq!(
            code(
                on.check_measurement("a", &demand(&["169.254.169.254"], 1.0), true, &names)
                    .await
            ),
            "builtin.deny"
        );
        assert_eq!(
            code(
                on.check_measurement("a", &demand(&["192.0.2.1"], 1.0), true, &names)
                    .await
            ),
            "ok"
        );
        let off: Policy = toml::from_str("builtin_deny = false").unwrap();
        let s = Security::new(
            Arc::new(AgentCredentials::enabled()),
            Limits::default(),
            off,
        );
        assert!(!s.builtin_deny());
        let open = Security::new(
            Arc::new(AgentCredentials::disabled()),
            Limits::default(),
            Policy::default(),
        );
        assert!(
            !open.builtin_deny(),
            "open loopback mode measures 127.0.0.1"
        );
        assert!(open.exposed(true).builtin_deny());
    }

    /// Names are resolved once per API call for every agent, concurrently and within
    /// one time budget; a name that does not resolve is refused for an agent that does
    /// not check addresses itself, and left to one that does.
    #[tokio::test]
    async fn unresolved_names_bind_only_agents_that_do_not_check() {
        let s = Security::new(
            Arc::new(AgentCredentials::enabled()),
            Limits::default(),
            Policy::default(),
        );
        // /etc/hosts answers localhost without asking a name server; any other name
        // goes to a closed loopback port, never to the machine's name server.
        imn_resolver::set_nameservers(vec!["127.0.0.1:1".parse().unwrap()]);
        let names = Resolutions::default();
        let d = demand(&["no-such-host.invalid"], 1.0);
        assert_eq!(
            code(s.check_measurement("a", &d, false, &names).await),
            "builtin.resolve"
        );
        assert_eq!(code(s.check_measurement("a", &d, true, &names).await), "ok");
        // Redirects go where the backend cannot see: only for an agent that checks.
        let follow = Demand {
            redirects: true,
            ..demand(&["192.0.2.1"], 1.0)
        };
        assert_eq!(
            code(s.check_measurement("a", &follow, false, &names).await),
            "builtin.redirects"
        );
        assert_eq!(
            code(s.check_measurement("a", &follow, true, &names).await),
            "ok"
        );
        assert_eq!(
            code(
                s.check_measurement("a", &demand(&["localhost"], 1.0), true, &names)
                    .await
            ),
            "builtin.deny"
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
