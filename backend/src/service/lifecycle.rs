//! The fleet's lifecycle: signed releases, rollouts in waves, each agent's reported
//! version and update state, and remote settings as desired state.
//!
//! - **Releases** are uploaded signed (`imn releases add`); the backend checks the
//!   signature against `--release-keys`, the expiry and the hash, and refuses an older
//!   version than one it has for the same architecture unless it is signed as a
//!   rollback. It never signs anything: the key stays with the operator, and each agent
//!   checks again against its own trusted keys.
//! - **Chunks**: an agent downloads a release by asking for one chunk at a time on
//!   `upd`; the answer goes on `cmd`. A release's bytes are cached here (the last
//!   [`CACHED_RELEASES`]), and each agent may take at most [`FETCH_BYTES_PER_S`].
//! - **Rollouts**: the selected agents are split into waves (a canary first). Each
//!   agent in a started wave is offered the release (an `Update` command, again after
//!   [`REOFFER_MS`] and whenever it reports in); it is `healthy` once it reports the
//!   version, `failed` once it reports a failure of that version. A wave ends when each
//!   of its agents that is online is healthy or failed (the canary wave needs one
//!   healthy); more failures than `max_failures_pct` of the started agents halt the
//!   rollout. Agents offline when their wave ran are offered the release when they come
//!   back, until the rollout is aborted.
//! - **Settings**: per agent, a version and `key = value` pairs, sent like schedules
//!   until the agent reports the version (or reports that it failed it).
//!
//! Rollouts, agents' lifecycle reports and desired settings are JSON documents in the
//! store (`FleetStore`); one backend at a time changes a rollout (a lock here; with
//! several backends on one database the last write wins, which at worst offers a
//! release twice).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use imn_proto::now_ms;
use imn_proto::release::{self, Manifest};
use imn_proto::wire::{
    self, Chunk, Command, CommandKind, Envelope, Kind, LifecycleStatus, UpdateUp,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::fleet::Selection;
use crate::store::ReleaseRow;

use super::Backend;

/// Releases whose bytes stay in memory.
pub const CACHED_RELEASES: usize = 4;
/// Release bytes one agent may fetch a second (a hostile agent asking faster is not
/// answered; an honest one asks again after its timeout).
pub const FETCH_BYTES_PER_S: u64 = 8 << 20;
/// An offer not taken up (no download, no new version) is made again after this.
pub const REOFFER_MS: i64 = 30_000;
/// An agent that reported since its offer without working on it (it was offline, or
/// restarted) is offered again, but not more often than this.
pub const MIN_REOFFER_MS: i64 = 5_000;
/// The largest settings version (as schedule versions: far beyond any real count, and
/// exact in a JSON number).
pub const MAX_SETTINGS_VERSION: u64 = 1 << 53;
/// Most rollouts kept running at once.
pub const MAX_ACTIVE_ROLLOUTS: usize = 16;
/// Most agents in one rollout.
pub const MAX_ROLLOUT_AGENTS: usize = 100_000;

const KIND_ROLLOUT: &str = "rollout";
const KIND_AGENT: &str = "agent";
const KIND_SETTINGS: &str = "settings";

/// In-memory parts: cache, fetch budgets, the rollout lock.
#[derive(Default)]
pub struct Lifecycle {
    cache: Mutex<Vec<(String, Arc<Vec<u8>>)>>,
    /// SHA-256s asked for that no release has, and when (the last 64, for 10 s): a
    /// hostile agent's made-up names cost no store read each.
    unknown: Mutex<Vec<(String, i64)>>,
    /// Per agent: (second, bytes served in it). Bounded: cleared past 100,000 agents.
    fetched: Mutex<HashMap<String, (i64, u64)>>,
    rollouts: tokio::sync::Mutex<()>,
    /// Per agent: when settings were last pushed.
    settings_pushed: Turns,
    /// Per agent: when its last lifecycle report was stored.
    reported: Turns,
    /// Per agent: the newest report that came too soon after the last stored one.
    /// It is stored when its turn comes (the sweep), never dropped: it may be the
    /// one that says a new release runs. Bounded: cleared past 100,000 agents.
    held: Mutex<HashMap<String, LifecycleStatus>>,
    /// When rollouts last moved on: reports move them at most once a second (each
    /// move reads every rollout and every agent's report; the sweep catches up).
    advanced_ms: std::sync::atomic::AtomicI64,
}

/// Per agent, when something last happened: whether it may happen again. Bounded:
/// forgotten whole past 100,000 agents (at worst, one more turn each).
#[derive(Default)]
struct Turns(Mutex<HashMap<String, i64>>);

impl Turns {
    /// Takes `agent`'s turn if its last was at least `every_ms` ago.
    fn take(&self, agent: &str, now: i64, every_ms: i64) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.clear();
        }
        if m.get(agent).is_some_and(|&t| now - t < every_ms) {
            return false;
        }
        m.insert(agent.to_string(), now);
        true
    }

    /// Records a turn taken now, whatever the last.
    fn set(&self, agent: &str, now: i64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.clear();
        }
        m.insert(agent.to_string(), now);
    }
}

/// `POST /admin/rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRollout {
    pub version: String,
    pub agents: Selection,
    #[serde(default = "default_canary")]
    pub canary_pct: f64,
    #[serde(default = "default_waves")]
    pub waves: Vec<f64>,
    #[serde(default)]
    pub max_failures_pct: f64,
}

fn default_canary() -> f64 {
    10.0
}

fn default_waves() -> Vec<f64> {
    vec![100.0]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutAgent {
    pub id: String,
    pub wave: usize,
    /// waiting, offered, downloading, healthy, failed, skipped
    pub state: String,
    pub version: String,
    pub detail: Option<String>,
    pub updated_ms: i64,
    #[serde(default)]
    pub offered_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub version: String,
    /// running, paused, halted, aborted, done
    pub state: String,
    pub reason: Option<String>,
    pub created_ms: i64,
    pub canary_pct: f64,
    pub waves: Vec<f64>,
    pub max_failures_pct: f64,
    pub current_wave: usize,
    pub wave_count: usize,
    pub agents: Vec<RolloutAgent>,
    /// Failures an operator accepted by resuming a halted rollout: the limit counts
    /// only failures past them.
    #[serde(default)]
    pub accepted_failures: usize,
}

impl Rollout {
    fn to_json(&self) -> Value {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for s in ["healthy", "failed", "pending", "skipped"] {
            counts.insert(s, 0);
        }
        for a in &self.agents {
            let k = match a.state.as_str() {
                "healthy" => "healthy",
                "failed" => "failed",
                "skipped" => "skipped",
                _ => "pending",
            };
            *counts.entry(k).or_default() += 1;
        }
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        v["counts"] = json!(counts);
        v
    }

    fn terminal(&self) -> bool {
        matches!(self.state.as_str(), "aborted" | "done" | "halted")
    }
}

/// A rollout's or settings' field out of its rule: 400, naming the field (a JSON
/// pointer into the body) and the rule in words.
fn bad(field: &str, rule: impl std::fmt::Display) -> ApiError {
    ApiError::BadQuery {
        message: format!("{field}: {rule}"),
        field: format!("/{field}"),
        rule: "value".into(),
    }
}

fn pct(field: &str, v: f64) -> Result<f64, ApiError> {
    if !(0.0..=100.0).contains(&v) {
        return Err(bad(field, "must be 0 to 100 (percent)"));
    }
    Ok(v)
}

/// Agents' reports kept per agent: what they last said on `upd`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentLifecycle {
    pub status: LifecycleStatus,
    pub received_ms: i64,
}

/// Desired settings of one agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DesiredSettings {
    pub version: u64,
    pub settings: BTreeMap<String, String>,
    pub set_ms: i64,
}

/// Most settings one agent has, and their lengths (the agent has the same bounds).
pub const MAX_SETTINGS: usize = 64;
pub const MAX_SETTING_LEN: usize = 1024;

fn release_json(r: &ReleaseRow) -> Value {
    let key = serde_json::from_str::<Manifest>(&r.manifest)
        .map(|m| m.key)
        .unwrap_or_default();
    json!({
        "name": r.name, "version": r.version, "arch": r.arch, "size": r.size,
        "sha256": r.sha256, "expires_ms": r.expires_ms, "rollback": r.rollback,
        "key": key, "added_ms": r.added_ms,
    })
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Backend {
    fn store_err(e: crate::store::StoreError) -> ApiError {
        ApiError::Unavailable(format!("store: {e}"))
    }

    /// `POST /admin/releases`: checks and stores a signed release file. Returns the
    /// release and whether it is new.
    pub async fn add_release(&self, file: &[u8]) -> Result<(Value, bool), ApiError> {
        let keys = self.security.release_keys.clone();
        if keys.is_empty() {
            return Err(ApiError::refused(
                "body",
                "release_keys",
                "release: this backend trusts no release keys (start it with --release-keys)"
                    .into(),
            ));
        }
        let (signed, m, binary) = release::open(file, &keys, now_ms()).map_err(|e| {
            ApiError::refused("body", "signed_release", format!("release refused: {e}"))
        })?;
        let existing = self.store.releases().await.map_err(Self::store_err)?;
        if !m.rollback {
            if let Some(newer) = existing.iter().find(|r| {
                r.arch == m.arch
                    && release::compare_versions(&r.version, &m.version)
                        == Some(std::cmp::Ordering::Greater)
            }) {
                return Err(ApiError::refused(
                    "version",
                    "rollback",
                    format!(
                        "release refused: version: {} is older than {} already released for {}, and it is not signed as a rollback",
                        m.version, newer.version, m.arch
                    ),
                ));
            }
        }
        let row = ReleaseRow {
            name: m.name.clone(),
            version: m.version.clone(),
            arch: m.arch.clone(),
            sha256: m.sha256.clone(),
            size: m.size,
            manifest: signed.manifest,
            signature: signed.signature,
            rollback: m.rollback,
            expires_ms: m.expires_ms,
            added_ms: now_ms(),
        };
        let stored = self
            .store
            .put_release(row.clone(), binary.to_vec())
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Db(m) => {
                    ApiError::refused("body", "stored", format!("release refused: {m}"))
                }
                e => Self::store_err(e),
            })?;
        tracing::info!(version = %m.version, arch = %m.arch, size = m.size, stored, "release added");
        Ok((release_json(&row), stored))
    }

    /// `GET /releases`.
    pub async fn releases_json(&self) -> Result<Value, ApiError> {
        let rows = self.store.releases().await.map_err(Self::store_err)?;
        Ok(json!({"releases": rows.iter().map(release_json).collect::<Vec<_>>()}))
    }

    /// A release's bytes: from the cache (least recently used out), else the store.
    async fn release_bytes(&self, sha: &str) -> Option<Arc<Vec<u8>>> {
        let now = now_ms();
        {
            let mut cache = self
                .lifecycle
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(s, _)| s == sha) {
                let hit = cache.remove(i);
                let bytes = hit.1.clone();
                cache.push(hit);
                return Some(bytes);
            }
            let unknown = self
                .lifecycle
                .unknown
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if unknown.iter().any(|(s, at)| s == sha && now - at < 10_000) {
                return None;
            }
        }
        let Some(bytes) = self.store.release_bytes(sha).await.ok().flatten() else {
            let mut unknown = self
                .lifecycle
                .unknown
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            unknown.retain(|(s, at)| s != sha && now - at < 10_000);
            if unknown.len() >= 64 {
                unknown.remove(0);
            }
            unknown.push((sha.to_string(), now));
            return None;
        };
        let bytes = Arc::new(bytes);
        let mut cache = self
            .lifecycle
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_RELEASES {
            cache.remove(0);
        }
        cache.push((sha.to_string(), bytes.clone()));
        Some(bytes)
    }

    /// Whether `agent` may be sent `n` more release bytes this second.
    fn fetch_allowed(&self, agent: &str, n: u64) -> bool {
        let sec = now_ms() / 1000;
        let mut f = self
            .lifecycle
            .fetched
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if f.len() > 100_000 {
            f.clear();
        }
        let e = f.entry(agent.to_string()).or_insert((sec, 0));
        if e.0 != sec {
            *e = (sec, 0);
        }
        if e.1.saturating_add(n) > FETCH_BYTES_PER_S {
            return false;
        }
        e.1 += n;
        true
    }

    async fn send(&self, agent: &str, env: &Envelope) {
        if let Err(e) = self
            .bus
            .publish_down(Kind::Cmd, agent, self.encode_for(agent, env))
            .await
        {
            tracing::warn!(error = %e, agent, "cannot send a lifecycle message");
        }
    }

    async fn send_command(&self, agent: &str, kind: CommandKind) {
        let cmd = Envelope::Command(Command {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            traceparent: None,
            deadline_ms: None,
            issued_ms: now_ms(),
            policy: None,
        });
        self.send(agent, &cmd).await;
    }

    /// An agent's message on `upd`.
    pub(super) async fn on_update_up(&self, agent: &str, up: UpdateUp) {
        match up {
            UpdateUp::Fetch {
                sha256,
                offset,
                len,
            } => {
                if !valid_sha(&sha256) {
                    tracing::warn!(agent, "fetch of a malformed sha256; dropped");
                    return;
                }
                // Charged before anything is read: the bytes asked for (at least a
                // small chunk's worth for an empty or failing request).
                let len = len.min(wire::MAX_CHUNK) as u64;
                if !self.fetch_allowed(agent, len.max(4096)) {
                    return;
                }
                let Some(bytes) = self.release_bytes(&sha256).await else {
                    let chunk = Chunk {
                        sha256,
                        offset,
                        total: 0,
                        data: Vec::new(),
                        error: Some("no release with this sha256 is stored".into()),
                    };
                    self.send(agent, &Envelope::Chunk(chunk)).await;
                    return;
                };
                let total = bytes.len() as u64;
                let (data, error) = match offset.checked_add(len) {
                    Some(_) if offset < total => {
                        let end = (offset + len).min(total);
                        (bytes[offset as usize..end as usize].to_vec(), None)
                    }
                    _ => (
                        Vec::new(),
                        Some(format!(
                            "offset {offset} is past the release's {total} bytes"
                        )),
                    ),
                };
                let chunk = Chunk {
                    sha256,
                    offset,
                    total,
                    data,
                    error,
                };
                self.send(agent, &Envelope::Chunk(chunk)).await;
            }
            UpdateUp::Status(status) => {
                // An agent reports after each hello and each change of its update: a
                // flood of reports is stored at most five times a second. One too
                // soon waits for its turn (the newest of them; see `held`).
                if !self.lifecycle.reported.take(agent, now_ms(), 200) {
                    let mut held = self
                        .lifecycle
                        .held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if held.len() > 100_000 {
                        held.clear();
                    }
                    held.insert(agent.to_string(), clip_status(status));
                    return;
                }
                // Newer than any held one, which must not overwrite it later.
                self.lifecycle
                    .held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(agent);
                self.store_report(agent, clip_status(status)).await;
            }
        }
    }

    /// Stores the reports that came too soon, now that their turn has come (called
    /// by the sweep).
    pub(super) async fn store_held_reports(&self) {
        let held = std::mem::take(
            &mut *self
                .lifecycle
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (agent, status) in held {
            if self.lifecycle.reported.take(&agent, now_ms(), 200) {
                self.store_report(&agent, status).await;
            } else {
                // A newer report may have come meanwhile: it wins.
                self.lifecycle
                    .held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(agent)
                    .or_insert(status);
            }
        }
    }

    /// Stores an agent's lifecycle report and acts on it: settings to send, rollouts
    /// to move on.
    async fn store_report(&self, agent: &str, status: LifecycleStatus) {
        let doc = AgentLifecycle {
            status: status.clone(),
            received_ms: now_ms(),
        };
        if let Ok(text) = serde_json::to_string(&doc) {
            if let Err(e) = self.store.put_doc(KIND_AGENT, agent, &text, now_ms()).await {
                tracing::warn!(error = %e, agent, "cannot store the agent's lifecycle report");
            }
        }
        self.reconcile_settings(agent, &status).await;
        let now = now_ms();
        let last = self
            .lifecycle
            .advanced_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= 1000 {
            self.advance_rollouts().await;
        }
    }

    /// The agent's lifecycle report, as stored.
    pub async fn agent_lifecycle(&self, agent: &str) -> Option<AgentLifecycle> {
        let text = self.store.doc(KIND_AGENT, agent).await.ok()??;
        serde_json::from_str(&text).ok()
    }

    /// These agents' lifecycle reports, by agent, in one read.
    pub async fn lifecycle_reports_of(&self, agents: &[String]) -> HashMap<String, AgentLifecycle> {
        reports(self.store.docs_of(KIND_AGENT, agents).await)
    }

    /// Every agent's lifecycle report, by agent.
    pub async fn lifecycle_reports(&self) -> HashMap<String, AgentLifecycle> {
        reports(self.store.docs(KIND_AGENT).await)
    }

    pub async fn desired_settings(&self, agent: &str) -> Option<DesiredSettings> {
        let text = self.store.doc(KIND_SETTINGS, agent).await.ok()??;
        serde_json::from_str(&text).ok()
    }

    /// What `GET /agents/{id}` adds: versions, update state, the last failure.
    pub async fn lifecycle_json(&self, agent: &str) -> Value {
        let l = self.agent_lifecycle(agent).await;
        let desired = self.desired_settings(agent).await;
        let s = l.as_ref().map(|l| &l.status);
        json!({
            "config_version": s.map_or(0, |s| s.settings_version),
            "desired_config_version": desired.map_or(0, |d| d.version),
            "update": s.map(|s| json!({
                "phase": s.phase, "target": s.target, "downloaded": s.downloaded,
                "size": s.size, "last_failure": s.last_failure,
                "failed_version": s.failed_version,
            })),
            "lifecycle_reported_ms": l.as_ref().map(|l| l.received_ms),
        })
    }

    /// Sends an agent its desired settings when it runs an older version of them
    /// (at most every 30 s), unless it reported that version failed.
    async fn reconcile_settings(&self, agent: &str, status: &LifecycleStatus) {
        let Some(mut d) = self.desired_settings(agent).await else {
            return;
        };
        if status.settings_version == d.version {
            return;
        }
        if status.settings_version > d.version {
            // The agent runs a version this store never gave (a store replaced, or an
            // agent that lies): the desired settings go out again past it, if they can.
            let Some(v) = status
                .settings_version
                .checked_add(1)
                .filter(|v| *v <= MAX_SETTINGS_VERSION)
            else {
                tracing::warn!(
                    agent,
                    version = status.settings_version,
                    "agent reports a settings version past the largest; not sending settings"
                );
                return;
            };
            d.version = v;
            d.set_ms = now_ms();
            let Ok(text) = serde_json::to_string(&d) else {
                return;
            };
            if let Err(e) = self
                .store
                .put_doc(KIND_SETTINGS, agent, &text, now_ms())
                .await
            {
                tracing::warn!(error = %e, agent, "cannot store desired settings");
                return;
            }
        }
        let failed = status
            .last_failure
            .as_deref()
            .is_some_and(|f| f.starts_with("settings_failed"))
            && status.failed_version.as_deref() == Some(d.version.to_string().as_str());
        if failed {
            return;
        }
        if !self.lifecycle.settings_pushed.take(agent, now_ms(), 30_000) {
            return;
        }
        self.send_command(
            agent,
            CommandKind::Settings {
                version: d.version,
                settings: d.settings.into_iter().collect(),
            },
        )
        .await;
    }

    /// `POST /admin/settings`: merges `settings` into each selected agent's desired
    /// settings (an empty value removes a key), with a new version, and sends them.
    pub async fn set_settings(
        &self,
        sel: &Selection,
        settings: BTreeMap<String, String>,
    ) -> Result<Value, ApiError> {
        if !sel.has_criteria() {
            return Err(bad(
                "agents",
                "name some agents (ids, tags, country, asn or all)",
            ));
        }
        if settings.is_empty() || settings.len() > MAX_SETTINGS {
            return Err(bad(
                "settings",
                format!("give 1 to {MAX_SETTINGS} settings"),
            ));
        }
        for (k, v) in &settings {
            if !wire::REMOTE_SETTINGS.contains(&k.as_str()) {
                return Err(bad(
                    "settings",
                    format!(
                        "{:?} cannot be set remotely (these can: {})",
                        k.chars().take(64).collect::<String>(),
                        wire::REMOTE_SETTINGS.join(", ")
                    ),
                ));
            }
            if v.len() > MAX_SETTING_LEN {
                return Err(bad(
                    "settings",
                    format!("the value of {k} is longer than {MAX_SETTING_LEN} bytes"),
                ));
            }
        }
        let now = now_ms();
        let agents = self.select(sel, now);
        let mut out = Vec::new();
        for a in agents {
            let mut d = self.desired_settings(&a.id).await.unwrap_or_default();
            for (k, v) in &settings {
                if v.is_empty() {
                    d.settings.remove(k);
                } else {
                    d.settings.insert(k.clone(), v.clone());
                }
            }
            if d.settings.len() > MAX_SETTINGS {
                return Err(bad(
                    "settings",
                    format!(
                        "agent {} would have more than {MAX_SETTINGS} settings",
                        a.id
                    ),
                ));
            }
            d.version = d
                .version
                .checked_add(1)
                .filter(|v| *v <= MAX_SETTINGS_VERSION)
                .ok_or_else(|| bad("settings", "the version is at its largest"))?;
            d.set_ms = now;
            let text = serde_json::to_string(&d).map_err(|e| ApiError::Internal(e.to_string()))?;
            self.store
                .put_doc(KIND_SETTINGS, &a.id, &text, now)
                .await
                .map_err(Self::store_err)?;
            if a.alive(now) {
                self.lifecycle.settings_pushed.set(&a.id, now);
                self.send_command(
                    &a.id,
                    CommandKind::Settings {
                        version: d.version,
                        settings: d.settings.clone().into_iter().collect(),
                    },
                )
                .await;
            }
            out.push(json!({"id": a.id, "settings_version": d.version}));
        }
        Ok(json!({ "agents": out }))
    }

    async fn load_rollouts(&self) -> Result<Vec<Rollout>, ApiError> {
        let docs = self
            .store
            .docs(KIND_ROLLOUT)
            .await
            .map_err(Self::store_err)?;
        Ok(docs
            .into_iter()
            .filter_map(|(_, d)| serde_json::from_str(&d).ok())
            .collect())
    }

    async fn save_rollout(&self, r: &Rollout) -> Result<(), ApiError> {
        let text = serde_json::to_string(r).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.store
            .put_doc(KIND_ROLLOUT, &r.id, &text, now_ms())
            .await
            .map_err(Self::store_err)
    }

    /// `POST /admin/rollouts`.
    pub async fn start_rollout(&self, req: NewRollout) -> Result<Value, ApiError> {
        release::check_version(&req.version).map_err(|r| bad("version", r))?;
        if !req.agents.has_criteria() {
            return Err(bad(
                "agents",
                "name some agents (ids, tags, country, asn or all)",
            ));
        }
        let canary = pct("canary_pct", req.canary_pct)?;
        let max_failures = pct("max_failures_pct", req.max_failures_pct)?;
        if req.waves.is_empty() || req.waves.len() > 20 {
            return Err(bad("waves", "give 1 to 20 waves"));
        }
        let mut last = 0.0;
        for w in &req.waves {
            pct("waves", *w)?;
            if *w <= last {
                return Err(bad(
                    "waves",
                    "each wave's percentage must be above the one before",
                ));
            }
            last = *w;
        }
        if last != 100.0 {
            return Err(bad("waves", "the last wave must be 100 (every agent)"));
        }
        let releases = self.store.releases().await.map_err(Self::store_err)?;
        if !releases.iter().any(|r| r.version == req.version) {
            return Err(bad(
                "version",
                format!("no release {} is stored (imn releases add)", req.version),
            ));
        }
        let _turn = self.lifecycle.rollouts.lock().await;
        let existing = self.load_rollouts().await?;
        if existing.iter().filter(|r| !r.terminal()).count() >= MAX_ACTIVE_ROLLOUTS {
            return Err(bad(
                "rollout",
                format!("{MAX_ACTIVE_ROLLOUTS} rollouts are active; abort or finish one first"),
            ));
        }
        let now = now_ms();
        let picked = self.select(&req.agents, now);
        if picked.is_empty() {
            return Err(bad("agents", "the selection matches no agent"));
        }
        if picked.len() > MAX_ROLLOUT_AGENTS {
            return Err(bad(
                "agents",
                format!("at most {MAX_ROLLOUT_AGENTS} agents in one rollout"),
            ));
        }
        // An agent is in one active rollout at a time: two would offer it two
        // releases in turn, and neither download would finish.
        for other in existing.iter().filter(|r| !r.terminal()) {
            if let Some(a) = other
                .agents
                .iter()
                .find(|a| picked.iter().any(|p| p.id == a.id))
            {
                return Err(ApiError::Conflict(format!(
                    "agents: {} is in rollout {} ({}, version {}); abort it or wait for it to finish",
                    a.id, other.id, other.state, other.version
                )));
            }
        }
        let id = format!("ro-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let reports = self.lifecycle_reports().await;
        // Why an agent cannot take this release, if it cannot.
        let skip = |a: &crate::registry::AgentEntry| -> Option<String> {
            let Some(rel) = releases
                .iter()
                .find(|r| r.version == req.version && r.arch == a.hello.arch)
            else {
                return Some(format!("no release {} for {}", req.version, a.hello.arch));
            };
            if rel.expires_ms <= now {
                return Some(format!("the release for {} has expired", a.hello.arch));
            }
            reports
                .get(&a.id)
                .filter(|l| l.status.phase == "unsupervised")
                .map(|_| "it runs without its supervisor (no update_keys)".to_string())
        };
        // Waves over the agents that can update, in an order the agents cannot choose
        // (a hash of the rollout and agent ids): no agent picks its way into a canary.
        let order = |a: &str| {
            use sha2::Digest;
            sha2::Sha256::digest(format!("{id}/{a}").as_bytes()).to_vec()
        };
        let (mut eligible, skipped): (Vec<_>, Vec<_>) =
            picked.into_iter().partition(|a| skip(a).is_none());
        if eligible.is_empty() {
            return Err(bad(
                "agents",
                format!(
                    "no selected agent can take release {} (each lacks a release for its architecture, or its supervisor)",
                    req.version
                ),
            ));
        }
        eligible.sort_by_cached_key(|a| order(&a.id));
        let n = eligible.len();
        let count = |p: f64| ((n as f64) * p / 100.0).ceil() as usize;
        // Wave boundaries: the canary (at least one agent when asked for), then each
        // wave's share of all agents.
        let mut bounds = Vec::new();
        if canary > 0.0 {
            bounds.push(count(canary).clamp(1, n));
        }
        for w in &req.waves {
            let b = count(*w).min(n);
            if bounds.last().is_none_or(|&l| b > l) {
                bounds.push(b);
            }
        }
        let wave_of = |i: usize| {
            bounds
                .iter()
                .position(|&b| i < b)
                .unwrap_or(bounds.len() - 1)
        };
        let mut agents: Vec<RolloutAgent> = eligible
            .iter()
            .enumerate()
            .map(|(i, a)| RolloutAgent {
                id: a.id.clone(),
                wave: wave_of(i),
                state: "waiting".into(),
                version: a.hello.version.clone(),
                detail: None,
                updated_ms: now,
                offered_ms: 0,
            })
            .collect();
        agents.extend(skipped.iter().map(|a| RolloutAgent {
            id: a.id.clone(),
            wave: 0,
            state: "skipped".into(),
            version: a.hello.version.clone(),
            detail: skip(a),
            updated_ms: now,
            offered_ms: 0,
        }));
        let r = Rollout {
            id,
            version: req.version,
            state: "running".into(),
            reason: None,
            created_ms: now,
            canary_pct: canary,
            waves: req.waves,
            max_failures_pct: max_failures,
            current_wave: 0,
            wave_count: bounds.len(),
            agents,
            accepted_failures: 0,
        };
        self.save_rollout(&r).await?;
        drop(_turn);
        tracing::info!(rollout = %r.id, version = %r.version, agents = n, skipped = skipped.len(), waves = r.wave_count, "rollout started");
        self.advance_rollouts().await;
        self.rollout_json(&r.id).await
    }

    pub async fn rollouts_json(&self) -> Result<Value, ApiError> {
        let mut rs = self.load_rollouts().await?;
        rs.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        Ok(json!({"rollouts": rs.iter().map(Rollout::to_json).collect::<Vec<_>>()}))
    }

    pub async fn rollout_json(&self, id: &str) -> Result<Value, ApiError> {
        Ok(self.load_rollout(id).await?.to_json())
    }

    /// One rollout, as stored.
    async fn load_rollout(&self, id: &str) -> Result<Rollout, ApiError> {
        let text = self
            .store
            .doc(KIND_ROLLOUT, id)
            .await
            .map_err(Self::store_err)?
            .ok_or_else(|| ApiError::NotFound(format!("no rollout {id}")))?;
        serde_json::from_str(&text)
            .map_err(|e| ApiError::Unavailable(format!("rollout {id} unreadable: {e}")))
    }

    /// `pause`, `resume` or `abort`.
    pub async fn rollout_action(&self, id: &str, action: &str) -> Result<Value, ApiError> {
        {
            let _turn = self.lifecycle.rollouts.lock().await;
            let mut r = self.load_rollout(id).await?;
            let next = match (action, r.state.as_str()) {
                ("pause", "running") => "paused",
                ("resume", "paused" | "halted") => "running",
                ("abort", "running" | "paused" | "halted") => "aborted",
                _ => {
                    return Err(ApiError::Conflict(format!(
                        "cannot {action} a rollout that is {}",
                        r.state
                    )))
                }
            };
            if r.state == "halted" && next == "running" {
                r.accepted_failures = r.agents.iter().filter(|a| a.state == "failed").count();
            }
            r.state = next.into();
            if next == "running" {
                r.reason = None;
            }
            if next == "aborted" {
                r.reason = Some("aborted by an operator".into());
            }
            self.save_rollout(&r).await?;
        }
        self.advance_rollouts().await;
        self.rollout_json(id).await
    }

    /// Moves every running rollout on: offers, health, failures, waves. Called on
    /// every lifecycle report and from the sweep.
    pub(crate) async fn advance_rollouts(&self) {
        let _turn = self.lifecycle.rollouts.lock().await;
        self.lifecycle
            .advanced_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        let Ok(rollouts) = self.load_rollouts().await else {
            return;
        };
        if !rollouts.iter().any(|r| r.state == "running") {
            return;
        }
        let reports = self.lifecycle_reports().await;
        let releases = self.store.releases().await.unwrap_or_default();
        for mut r in rollouts.into_iter().filter(|r| r.state == "running") {
            let before = serde_json::to_string(&r).unwrap_or_default();
            let offers = self.step(&mut r, &reports);
            for agent in offers {
                let arch = self
                    .registry
                    .get(&agent)
                    .map(|a| a.hello.arch)
                    .unwrap_or_default();
                let Some(rel) = releases
                    .iter()
                    .find(|x| x.version == r.version && x.arch == arch)
                else {
                    continue;
                };
                self.send_command(
                    &agent,
                    CommandKind::Update {
                        rollout: r.id.clone(),
                        manifest: release::SignedManifest {
                            manifest: rel.manifest.clone(),
                            signature: rel.signature.clone(),
                        },
                    },
                )
                .await;
            }
            if serde_json::to_string(&r).unwrap_or_default() != before {
                if let Err(e) = self.save_rollout(&r).await {
                    tracing::warn!(error = %e, rollout = %r.id, "cannot save the rollout");
                }
            }
        }
    }

    /// One step of a rollout; returns the agents to offer the release to now.
    fn step(&self, r: &mut Rollout, reports: &HashMap<String, AgentLifecycle>) -> Vec<String> {
        let now = now_ms();
        let mut offers = Vec::new();
        for a in r.agents.iter_mut() {
            if a.wave > r.current_wave
                || matches!(a.state.as_str(), "healthy" | "failed" | "skipped")
            {
                continue;
            }
            let entry = self.registry.get(&a.id);
            let report = reports.get(&a.id).map(|l| &l.status);
            let version = report
                .map(|s| s.version.clone())
                .or_else(|| entry.as_ref().map(|e| e.hello.version.clone()))
                .unwrap_or_default();
            a.version = version.clone();
            if version == r.version {
                a.state = "healthy".into();
                a.detail = None;
                a.updated_ms = now;
                continue;
            }
            if let Some(s) = report {
                // Only a failure of this rollout's offer (an agent may have refused
                // the same version pushed by another, or failed it in one before).
                let failed_this = s.failed_version.as_deref() == Some(r.version.as_str())
                    && s.failed_rollout.as_deref() == Some(r.id.as_str())
                    && s.last_failure
                        .as_deref()
                        .is_some_and(|f| f.starts_with("update_"));
                if failed_this {
                    a.state = "failed".into();
                    a.detail = s.last_failure.clone();
                    a.updated_ms = now;
                    continue;
                }
                if s.phase == "downloading" && s.target.as_deref() == Some(r.version.as_str()) {
                    a.state = "downloading".into();
                    a.detail = Some(format!("{} of {} bytes", s.downloaded, s.size));
                } else if s.phase == "staged" && s.target.as_deref() == Some(r.version.as_str()) {
                    a.state = "installing".into();
                    a.detail = None;
                }
            }
            let alive = entry.as_ref().is_some_and(|e| e.alive(now));
            let stale = now - a.offered_ms >= REOFFER_MS;
            // A report since the offer that shows no work on it: the offer was lost
            // (the agent was offline), or the agent restarted; offer again.
            let working = report.is_some_and(|s| {
                s.target.as_deref() == Some(r.version.as_str())
                    && matches!(s.phase.as_str(), "downloading" | "staged")
            });
            let unheard = reports.get(&a.id).is_some_and(|l| {
                l.received_ms > a.offered_ms && !working && now - a.offered_ms >= MIN_REOFFER_MS
            });
            if alive && (a.offered_ms == 0 || unheard || (stale && a.state != "downloading")) {
                if a.offered_ms == 0 {
                    a.state = "offered".into();
                }
                a.offered_ms = now;
                a.updated_ms = now;
                offers.push(a.id.clone());
            }
        }
        // Failures against the limit, over the agents of the waves started so far.
        let started: Vec<&RolloutAgent> = r
            .agents
            .iter()
            .filter(|a| a.wave <= r.current_wave && a.state != "skipped")
            .collect();
        let failed: Vec<&&RolloutAgent> = started.iter().filter(|a| a.state == "failed").collect();
        let counted = failed.len().saturating_sub(r.accepted_failures);
        if !started.is_empty()
            && counted > 0
            && (counted as f64) * 100.0 > r.max_failures_pct * started.len() as f64
        {
            let first = failed.first().map(|a| {
                format!(
                    "; {}: {}",
                    a.id,
                    a.detail
                        .as_deref()
                        .unwrap_or("failed")
                        .chars()
                        .take(300)
                        .collect::<String>()
                )
            });
            r.state = "halted".into();
            r.reason = Some(format!(
                "{} of {} agents failed in wave {} (max {}%){}",
                failed.len(),
                started.len(),
                r.current_wave,
                r.max_failures_pct,
                first.unwrap_or_default()
            ));
            tracing::warn!(rollout = %r.id, reason = ?r.reason, "rollout halted");
            return offers;
        }
        // The wave is over when each of its online agents is healthy or failed; the
        // canary wave needs a healthy one.
        let wave: Vec<&RolloutAgent> = r
            .agents
            .iter()
            .filter(|a| a.wave == r.current_wave && a.state != "skipped")
            .collect();
        let settled = wave.iter().all(|a| {
            matches!(a.state.as_str(), "healthy" | "failed")
                || !self.registry.get(&a.id).is_some_and(|e| e.alive(now))
        });
        let canary = r.canary_pct > 0.0 && r.current_wave == 0;
        let healthy = wave.iter().any(|a| a.state == "healthy");
        if settled && (healthy || !canary) {
            if r.current_wave + 1 < r.wave_count {
                r.current_wave += 1;
                tracing::info!(rollout = %r.id, wave = r.current_wave, "rollout: next wave");
            } else if r
                .agents
                .iter()
                .all(|a| matches!(a.state.as_str(), "healthy" | "failed" | "skipped"))
            {
                // Agents offline until now keep it running: they update when back.
                r.state = "done".into();
                tracing::info!(rollout = %r.id, "rollout done");
            }
        }
        offers
    }
}

/// Bounds what an agent's report may hold before it is stored.
fn clip_status(mut s: LifecycleStatus) -> LifecycleStatus {
    fn clip(s: &mut String, n: usize) {
        if s.len() > n {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    }
    clip(&mut s.version, 64);
    clip(&mut s.arch, 32);
    clip(&mut s.phase, 32);
    if let Some(t) = s.target.as_mut() {
        clip(t, 64);
    }
    if let Some(f) = s.last_failure.as_mut() {
        clip(f, 1024);
    }
    if let Some(v) = s.failed_version.as_mut() {
        clip(v, 64);
    }
    if let Some(v) = s.failed_rollout.as_mut() {
        clip(v, 64);
    }
    s
}

/// Lifecycle documents read as reports, by agent; one that does not parse is left
/// out, and a store that cannot be read gives none (logged).
fn reports(
    docs: Result<Vec<(String, String)>, crate::store::StoreError>,
) -> HashMap<String, AgentLifecycle> {
    match docs {
        Ok(d) => d
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read agents' lifecycle reports");
            HashMap::new()
        }
    }
}
