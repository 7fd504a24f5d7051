//! The backend's core, shared by every front end (REST and gRPC): validation, request
//! creation and dispatch, ingest of everything agents send, and acks. The front ends
//! reach the store only through [`Backend`]'s methods.
//!
//! [`Backend`] is one object with a file per job:
//! - `uplink.rs`: ingest, from the bus to the store, and acks;
//! - `dispatch.rs`: making requests, sending commands, the sweep;
//! - `waiters.rs`: callers waiting for a request to finish (the `Waiters` part);
//! - `sessions.rs`: agents' connection sessions and hello turns (the `Sessions` and
//!   `Hellos` parts);
//! - `reads.rs`: what the front ends read and change in the store;
//! - `metrics.rs`: `/metrics` and OTLP;
//! - `lifecycle.rs`: releases, rollouts, agents' update reports and remote settings;
//! - fleet measurements and schedules are in [`crate::fleet`], budgets in
//!   [`crate::budget`], news between backends in [`crate::peers`].
//!
//! This file holds the object, its parts, its start, and what every job uses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use imn_cloud::bus::Bus;
use imn_proto::wire::{self, Envelope};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::observe;
use crate::registry::Registry;
use crate::store::{RequestRow, Store};
use crate::validation::Validators;

mod dispatch;
mod events;
pub mod lifecycle;
mod metrics;
mod reads;
mod sessions;
mod uplink;
mod waiters;
mod wasm;

use sessions::{Hellos, Sessions};
use waiters::Waiters;

/// How long an undelivered request waits for its agent by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// A command dispatched but not confirmed by the agent within this is sent again.
pub const REDISPATCH_AFTER: Duration = Duration::from_secs(10);

/// Counters, for `/health` now and metrics later.
#[derive(Debug, Default)]
pub struct Stats {
    pub records_stored: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    /// Of those, second results for a run (a request or a scheduled slot) that has one.
    pub run_duplicates_dropped: AtomicU64,
    pub undecodable: AtomicU64,
    /// Dropped uplink messages by reason: empty, version, malformed, mismatch.
    pub rejected: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub store_errors: AtomicU64,
    pub acks_sent: AtomicU64,
    /// Group commits of outbox batches, and the time the store spent in them.
    pub store_groups: AtomicU64,
    pub store_busy_us: AtomicU64,
    /// Messages dropped unacked because their agent had its share waiting already
    /// (the agent sends them again).
    pub shed: AtomicU64,
    /// Hellos dropped for coming faster than one a second from one agent.
    pub hellos_throttled: AtomicU64,
    /// Events held back past the per-batch cap (sent again by the agent).
    pub events_deferred: AtomicU64,
    /// Records the store could not take, isolated with their reason.
    pub dead_lettered: AtomicU64,
    /// Records the store refused (too many seq ranges), left unacked.
    pub records_refused: AtomicU64,
}

pub struct Backend {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub registry: Registry,
    pub stats: Stats,
    /// Metrics with state between scrapes (see [`observe`]).
    pub metrics: observe::Metrics,
    /// Each module's compiled schema; compiled once at start.
    validators: Validators,
    /// Callers of `?wait` waiting for a request to finish.
    waiters: Waiters,
    /// Agents with a connection session open in the store.
    sessions: Sessions,
    /// Each agent's turn for its next hello, and its deferred hello.
    hellos: Hellos,
    /// Fault injection for tests: store batches but send no acks.
    hold_acks: AtomicBool,
    pub fault_injection: bool,
    /// Enrollment, API tokens, limits and policy.
    pub security: crate::security::Security,
    /// Serialises credential puts to the bus (see [`Self::share_credential`]).
    share_turn: tokio::sync::Mutex<()>,
    /// Each agent's schedule version as the store has it, for agents whose schedules
    /// changed or that said hello (see `fleet`): the sweep resends stale sets.
    pub(crate) schedule_versions: crate::fleet::ScheduleVersions,
    /// The in-process bridge's counters, under `imn up`.
    pub bridge_stats: std::sync::OnceLock<Arc<dyn imn_cloud::BridgeReport>>,
    /// This process among backends sharing the bus (see [`crate::peers`]).
    pub instance: u64,
    /// Result streams: one store read per commit for all of them (woken by ingest
    /// after each commit), and their caps.
    pub feed: crate::feed::Feed,
    /// Per API token with a budget: its turn to check and charge, and what its
    /// requests in flight reserved (see [`crate::budget::Ledger`]).
    pub(crate) budgets: crate::budget::Ledger,
    /// Releases' bytes, fetch budgets and the rollout lock (see [`lifecycle`]).
    pub(crate) lifecycle: lifecycle::Lifecycle,
    /// What the store keeps and for how long (set once before [`Backend::start`]).
    retention: std::sync::OnceLock<crate::retention::Settings>,
    /// The store's size and oldest result, from the last retention pass.
    store_stats: std::sync::Mutex<Option<crate::store::StoreStats>>,
    /// Alert rules, their events and the anomaly detector's (see [`crate::alerts`]).
    pub alerts: crate::alerts::Alerts,
    /// The WebAssembly modules an operator added (see [`crate::wasm`]).
    pub(crate) wasm: crate::wasm::WasmModules,
}

/// How a request is to be made, beside what it asks for.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// A repeated key finds the request made the first time.
    pub idempotency_key: Option<String>,
    /// How long the request may wait for its agent.
    pub deadline: Duration,
    /// The caller waits for the result (`?wait`): register before dispatch.
    pub waiter: bool,
    /// The W3C trace context of the API request, which the measurement's trace joins.
    pub traceparent: Option<String>,
    /// The fleet measurement this request is part of.
    pub measurement_id: Option<String>,
    /// Host names already resolved for this API call (a fleet measurement resolves
    /// each once for all its agents).
    pub names: Option<Arc<crate::security::Resolutions>>,
    /// Who asks: whose budget pays, whose idempotency keys apply.
    pub caller: crate::security::Caller,
    /// The caller checked and charges the budget itself (a fleet measurement does,
    /// for all its agents at once).
    pub prepaid: bool,
}

/// A run's parameters as [`Backend::checked_params`] passed them.
pub struct Checked {
    pub params: Value,
    /// The module's default deadline for a run.
    pub timeout_ms: u64,
    /// The rules that bound the check, which the agent checks again.
    pub policy: imn_proto::policy::TargetPolicy,
    /// What the run asks of the network.
    pub demand: imn_proto::policy::Demand,
}

/// A request as the caller should see it after creation.
pub struct Submitted {
    pub request: RequestRow,
    /// False when the idempotency key matched an earlier request.
    pub new: bool,
    /// Fires when a new request finishes; registered before its command went out, so
    /// `?wait` needs no read to close the race with a fast agent.
    pub done: Option<oneshot::Receiver<()>>,
}

impl Backend {
    pub async fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        fault_injection: bool,
        security: crate::security::Security,
    ) -> Result<Arc<Backend>, ApiError> {
        let validators = Validators::new()?;
        security.load(store.as_ref()).await?;
        let backend = Arc::new(Backend {
            store,
            bus,
            registry: Registry::default(),
            stats: Stats::default(),
            metrics: observe::Metrics::new(),
            validators,
            waiters: Waiters::default(),
            sessions: Sessions::default(),
            hellos: Hellos::default(),
            hold_acks: AtomicBool::new(false),
            fault_injection,
            security,
            bridge_stats: std::sync::OnceLock::new(),
            share_turn: tokio::sync::Mutex::new(()),
            schedule_versions: Default::default(),
            instance: rand::random(),
            feed: crate::feed::Feed::default(),
            budgets: Default::default(),
            lifecycle: Default::default(),
            retention: std::sync::OnceLock::new(),
            store_stats: std::sync::Mutex::new(None),
            wasm: Default::default(),
            alerts: Default::default(),
        });
        {
            let weak = Arc::downgrade(&backend);
            backend.security.on_change(move || {
                if let Some(b) = weak.upgrade() {
                    tokio::spawn(async move {
                        b.tell_peers(crate::peers::PeerEvent::Credentials).await;
                    });
                }
            });
        }
        for a in backend.store.agents().await? {
            backend
                .registry
                .restore(&a.id, a.hello, a.first_seen_ms, a.last_hello_ms);
        }
        // The charts' history from before the restart (a store that fails here
        // costs the charts, not the start).
        if let Err(e) = crate::retention::restore_heartbeats(&backend).await {
            tracing::warn!(error = %e, "heartbeat history not restored");
        }
        // Bridges in other processes read credentials from the bus: make sure it has
        // every current one (a change made while the bus was away, or a new bucket).
        for a in backend.security.enrolled_agents() {
            backend.share_credential(&a.id).await?;
        }
        Ok(backend)
    }

    /// Hands one agent's current credential to the bridges in other processes (NATS);
    /// the in-process bridge already reads the same table. Called after every
    /// enrollment, rotation and revocation. On failure the change is stored but not
    /// yet in force on those bridges, and the caller hears so.
    pub async fn share_credential(&self, id: &str) -> Result<(), ApiError> {
        // One at a time, each reading the table when its turn comes: a rotation and a
        // revocation racing cannot leave the older of the two in the bucket.
        let _turn = self.share_turn.lock().await;
        let Some(cred) = self.security.bridge().get(id) else {
            return Ok(());
        };
        self.bus.put_credential(id, &cred).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "agent {id}: the change is stored, but bridges in other processes did not receive it ({e}); retry, or restart the backend once the bus is back"
            ))
        })
    }

    /// Starts ingest and the periodic sweep.
    pub async fn start(self: &Arc<Self>) -> Result<(), ApiError> {
        let rx = self
            .bus
            .subscribe_up()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.wasm
            .load(self.store.as_ref(), &self.security.release_keys)
            .await;
        tokio::spawn(self.clone().ingest(rx));
        tokio::spawn(self.clone().sweep());
        tokio::spawn(crate::feed::Feed::run(self.clone()));
        tokio::spawn(crate::retention::keep(self.clone()));
        tokio::spawn(crate::alerts::run(self.clone()));
        if let Some(peers) = self
            .bus
            .subscribe_peer()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
        {
            tokio::spawn(self.clone().follow_peers(peers));
        }
        Ok(())
    }

    /// Sets what the store keeps; only before [`Backend::start`] (later calls are
    /// ignored).
    pub fn set_retention(&self, r: crate::retention::Settings) {
        let _ = self.retention.set(r);
    }

    /// What the store keeps and for how long.
    pub fn retention(&self) -> crate::retention::Settings {
        self.retention.get().cloned().unwrap_or_default()
    }

    /// The store's size and oldest result, as the last retention pass found them.
    pub fn store_stats(&self) -> Option<crate::store::StoreStats> {
        self.store_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_store_stats(&self, s: crate::store::StoreStats) {
        *self.store_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }

    pub fn set_hold_acks(&self, on: bool) {
        self.hold_acks.store(on, Ordering::SeqCst);
    }

    /// Validates parameters (see [`Validators::validate`]).
    /// A WebAssembly module's parameters are checked against its own schema (the
    /// caller looked the module up first, see [`Backend::module_kind`]).
    pub fn validate(&self, module: &str, params: &Value) -> Result<(), ApiError> {
        if imn_proto::catalog::find(module).is_none() {
            if let Some(e) = self.wasm.cached(module) {
                return e.validate(params);
            }
        }
        self.validators.validate(module, params)
    }

    /// An envelope for `agent`, in the wire version of its last hello.
    fn encode_for(&self, agent: &str, env: &Envelope) -> Bytes {
        let version = self
            .registry
            .get(agent)
            .map_or(wire::WIRE_VERSION, |a| a.wire_version);
        Bytes::from(wire::encode_for(version, env))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use imn_cloud::bus::LocalBus;
    use imn_proto::catalog;
    use serde_json::json;

    async fn backend() -> Arc<Backend> {
        let dir = std::env::temp_dir().join(format!(
            "imn-svc-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("s.sqlite")).unwrap();
        Backend::new(
            Arc::new(store),
            Arc::new(LocalBus::new(8)),
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

    /// A lifecycle report that comes too soon after the last is held, not dropped,
    /// and stored on the sweep's turn; a newer one that gets its turn first wins. (In
    /// CI a rollout waited forever when the new release's first report, 200 ms after
    /// the old one's "staged", was dropped.)
    #[tokio::test]
    async fn a_report_too_soon_is_held_and_stored_later_never_dropped() {
        use imn_proto::wire::{LifecycleStatus, UpdateUp};
        let b = backend().await;
        let report = |version: &str, phase: &str| {
            UpdateUp::Status(LifecycleStatus {
                version: version.into(),
                phase: phase.into(),
                ..Default::default()
            })
        };
        b.on_update_up("a", report("1", "staged")).await;
        b.on_update_up("a", report("2", "trial")).await;
        let stored = |b: &Arc<Backend>| {
            let b = b.clone();
            async move { b.agent_lifecycle("a").await.map(|l| l.status.version) }
        };
        assert_eq!(stored(&b).await.as_deref(), Some("1"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.store_held_reports().await;
        assert_eq!(stored(&b).await.as_deref(), Some("2"), "held, then stored");
        // A held report never overwrites a newer one stored meanwhile.
        b.on_update_up("a", report("3", "idle")).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.on_update_up("a", report("4", "idle")).await;
        b.store_held_reports().await;
        assert_eq!(stored(&b).await.as_deref(), Some("4"));
    }

    /// Every module's schema: valid examples are accepted, and invalid ones are refused
    /// with the field (and, for the cases below, the rule) named. The examples come
    /// from the catalog, so a module added without them fails this test.
    #[tokio::test]
    async fn every_schema_accepts_valid_and_names_the_invalid_field() {
        let b = backend().await;
        let cases = [
            (
                "echo_module",
                json!({"message": "hi"}),
                json!({"message": 5}),
                "/message",
                "type",
            ),
            (
                "ping_module",
                json!({"host": "8.8.8.8", "count": 4}),
                json!({"host": "127.0.0.1", "count": 0}),
                "/count",
                "minimum",
            ),
            (
                "ping_module",
                json!({"targets": ["127.0.0.1", "::1"], "count": 1, "rate": 1000, "ttl": 64}),
                json!({"targets": [], "count": 1}),
                "/targets",
                "minItems",
            ),
            (
                "ping_module",
                json!({"host": "::1", "count": 1}),
                json!({"count": 1}),
                "/host",
                "required",
            ),
            (
                "tcping",
                json!({"host": "127.0.0.1", "port": 443, "count": 5}),
                json!({"host": "127.0.0.1", "port": 70000}),
                "/port",
                "maximum",
            ),
            (
                "faulty_module",
                json!({"message": "test", "delay": 5}),
                json!({"message": "test", "crash": "yes"}),
                "/crash",
                "type",
            ),
            (
                "heartbeat",
                json!({}),
                json!({"verbose": true}),
                "/verbose",
                "additionalProperties",
            ),
        ];
        // Every module's own examples (`ModuleSpec::examples`): at least one of each kind,
        // the valid ones accepted, the invalid ones refused naming their field.
        for spec in catalog::catalog() {
            let ex = spec.examples();
            assert!(
                !ex.valid.is_empty() && !ex.invalid.is_empty(),
                "{} needs valid and invalid schema examples",
                spec.name
            );
            for ok in &ex.valid {
                b.validate(spec.name, ok)
                    .unwrap_or_else(|e| panic!("{}: {ok} was refused: {e}", spec.name));
            }
            for (bad, field) in &ex.invalid {
                match b.validate(spec.name, bad) {
                    Err(ApiError::InvalidParams {
                        field: f, message, ..
                    }) => {
                        assert_eq!(
                            &f, field,
                            "{}: {bad} refused for the wrong field",
                            spec.name
                        );
                        assert!(message.contains(field), "{message}");
                    }
                    other => panic!("{}: {bad} was not refused: {other:?}", spec.name),
                }
            }
        }
        for (module, valid, invalid, field, rule) in cases {
            b.validate(module, &valid)
                .unwrap_or_else(|e| panic!("{module} refused {valid}: {e}"));
            match b.validate(module, &invalid) {
                Err(ApiError::InvalidParams {
                    field: f,
                    rule: r,
                    message,
                }) => {
                    assert_eq!(
                        (f.as_str(), r.as_str()),
                        (field, rule),
                        "{module}: {message}"
                    );
                    assert!(message.contains(field), "{message}");
                }
                other => panic!("{module} accepted {invalid}: {other:?}"),
            }
        }
        assert!(matches!(
            b.validate("warp", &json!({})),
            Err(ApiError::UnknownModule { .. })
        ));
    }
}
