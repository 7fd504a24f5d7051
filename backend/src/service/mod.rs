//! The backend's core, shared by every front end (REST today): validation, request
//! creation and dispatch, ingest of everything agents send, and acks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use imn_cloud::bus::{Bus, UpMessage};
use imn_proto::wire::{self, Ack, Command, CommandKind, Envelope, Hello, Kind, RequestState};
use imn_proto::{catalog, now_ms};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::ingest;
use crate::observe;
use crate::registry::Registry;
use crate::store::{self, Created, NewRequest, RequestRow, Store};
use crate::validation::Validators;

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

/// An uplink message, decoded, with a batch's rows prepared.
struct Decoded {
    msg: UpMessage,
    /// The envelope and the wire version it came in, or why it cannot be taken.
    env: Result<(u8, Envelope), Rejected>,
    rows: Option<store::PreparedBatch>,
    /// When it came off the bus (ms since the epoch).
    arrived_ms: i64,
    /// Its share of the bytes prepared messages may hold; released when handled.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Its share of its agent's waiting bytes ([`ingest::Shares`]).
    _share: ingest::Share,
}

/// Why an uplink message is dropped unstored.
enum Rejected {
    Decode(wire::DecodeError),
    /// A field past its bound ([`ingest`]).
    Bounds(ingest::Refusal),
}

impl Rejected {
    /// A short stable label for counters.
    fn reason(&self) -> &'static str {
        match self {
            Rejected::Decode(e) => e.reason(),
            Rejected::Bounds(_) => "bounds",
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Decode(e) => e.fmt(f),
            Rejected::Bounds(r) => r.fmt(f),
        }
    }
}

impl Decoded {
    /// An outbox batch on its own topic: it can join a group commit.
    fn is_batch(&self) -> bool {
        self.msg.kind == Kind::Out && matches!(self.env, Ok((_, Envelope::Batch(_))))
    }
}

/// At most this many uplink messages wait prepared, and go into one transaction.
const GROUP_MESSAGES: usize = 8192;
/// Payload bytes of prepared messages waiting for the store, at most.
const PREPARED_BYTES: usize = 16 * 1024 * 1024;
/// A group commit stops adding batches past this many records.
const GROUP_ROWS: usize = 16384;

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
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    /// Fault injection for tests: store batches but send no acks.
    hold_acks: AtomicBool,
    pub fault_injection: bool,
    /// Enrollment, API tokens, limits and policy.
    pub security: crate::security::Security,
    /// Agents with a connection session open in the store (see [`Self::touch_session`]).
    open_sessions: Mutex<std::collections::HashSet<String>>,
    /// Woken after each commit of outbox batches: result streams read what is new.
    pub records_stored: tokio::sync::Notify,
    /// Serialises credential puts to the bus (see [`Self::share_credential`]).
    share_turn: tokio::sync::Mutex<()>,
    /// Each agent's schedule version as the store has it, for agents whose schedules
    /// changed or that said hello (see `fleet`): the sweep resends stale sets.
    pub schedule_versions: Mutex<HashMap<String, u64>>,
    /// The in-process bridge's counters, under `imn up`.
    pub bridge_stats: std::sync::OnceLock<Arc<dyn imn_cloud::BridgeReport>>,
    /// This process among backends sharing the bus (see [`crate::peers`]).
    pub instance: u64,
    /// When each agent's last hello was handled (see [`ingest::HELLO_MIN_INTERVAL_MS`]).
    last_hello: Mutex<HashMap<String, i64>>,
    /// The newest hello of each agent that came too soon after its last; handled when
    /// its turn comes (one per agent: a flood of hellos holds one).
    deferred_hellos: Mutex<HashMap<String, (Hello, u8)>>,
    /// Result streams: one store read per commit for all of them, and their caps.
    pub feed: crate::feed::Feed,
    /// Per API token with a budget: the turn to check it and charge it (see
    /// [`Self::budget_turn`]). One entry per token that measured (tokens are an admin's).
    budget_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per API token: probes of requests that passed their budget check and are not
    /// charged yet (see [`crate::budget::Reservation`]). An entry lives only while a
    /// request of that token is being made.
    pub(crate) budget_pending: Mutex<HashMap<String, u64>>,
}

/// Non-batch messages handled between two group commits, at most (one per agent).
const OTHERS_PER_ROUND: usize = 1024;

/// A batch joins its agent's queue for group commits; anything else its agent's queue of
/// other messages.
fn queue(
    d: Decoded,
    batches: &mut ingest::FairQueue<Decoded>,
    others: &mut ingest::FairQueue<Decoded>,
) {
    let agent = d.msg.agent.clone();
    if d.is_batch() {
        let rows = d.rows.as_ref().map_or(0, |r| r.rows.len());
        batches.push(&agent, d, rows);
    } else {
        others.push(&agent, d, 1);
    }
}

/// Resolves at `at`; never if `None` (the caller guards the branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
            waiters: Mutex::new(HashMap::new()),
            hold_acks: AtomicBool::new(false),
            fault_injection,
            security,
            bridge_stats: std::sync::OnceLock::new(),
            share_turn: tokio::sync::Mutex::new(()),
            records_stored: tokio::sync::Notify::new(),
            open_sessions: Mutex::new(Default::default()),
            schedule_versions: Mutex::new(HashMap::new()),
            instance: rand::random(),
            last_hello: Mutex::new(HashMap::new()),
            deferred_hellos: Mutex::new(HashMap::new()),
            feed: crate::feed::Feed::default(),
            budget_turns: Mutex::new(HashMap::new()),
            budget_pending: Mutex::new(HashMap::new()),
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
        tokio::spawn(self.clone().ingest(rx));
        tokio::spawn(self.clone().sweep());
        tokio::spawn(crate::feed::Feed::run(self.clone()));
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

    pub fn set_hold_acks(&self, on: bool) {
        self.hold_acks.store(on, Ordering::SeqCst);
    }

    /// Validates parameters (see [`Validators::validate`]).
    pub fn validate(&self, module: &str, params: &Value) -> Result<(), ApiError> {
        self.validators.validate(module, params)
    }

    /// Creates (or, with a known idempotency key, finds) a request and dispatches it
    /// if its agent is alive. An offline agent's request waits as `pending`.
    pub async fn submit(
        &self,
        agent: &str,
        module: &str,
        body: &[u8],
        opts: SubmitOptions,
    ) -> Result<Submitted, ApiError> {
        let SubmitOptions {
            idempotency_key,
            deadline,
            waiter,
            traceparent,
            measurement_id,
            names,
            caller,
            prepaid,
        } = opts;
        let names = names.unwrap_or_default();
        // A key is the caller's own (another token's same key finds nothing of it),
        // and it names one request: the same key with another request is refused.
        let idempotency_key =
            idempotency_key.map(|k| format!("{}/{k}", caller.token_id.as_deref().unwrap_or("-")));
        let idempotency_hash = idempotency_key.as_ref().map(|_| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for part in [agent.as_bytes(), module.as_bytes(), body] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.update(deadline.as_millis().to_le_bytes());
            imn_proto::auth::to_hex(&h.finalize())
        });
        // A retry finds its request before anything is checked again: the first one
        // may have used the last of the budget or the agent's queue.
        if let Some(key) = &idempotency_key {
            if let Some(request) = self.store.request_by_key(key).await? {
                return self.replayed(request, &idempotency_hash);
            }
        }
        let Checked {
            params,
            timeout_ms,
            demand,
            ..
        } = self.checked_params(agent, module, body, &names).await?;
        // Checked and reserved one request of a token at a time, so parallel requests
        // cannot all pass the same check; made and charged (one transaction) in
        // parallel.
        let reservation = if prepaid {
            None
        } else {
            let cost = crate::budget::Cost {
                one_off: demand.probes,
                ..Default::default()
            };
            Some(crate::budget::reserve(self, &caller, &cost).await?)
        };
        let queued = self.store.open_requests(agent).await?;
        let max_queued = self.security.limits.max_queued_per_agent;
        if queued >= max_queued {
            return Err(ApiError::QueueFull {
                message: format!(
                    "agent {agent} has {queued} unfinished requests, the limit max_queued_per_agent = {max_queued}"
                ),
            });
        }
        let now = now_ms();
        let alive = self.registry.get(agent).is_some_and(|a| a.alive(now));
        let created = self
            .store
            .create_request(NewRequest {
                id: uuid::Uuid::new_v4().to_string(),
                agent_id: agent.to_string(),
                module: module.to_string(),
                params_json: params.to_string(),
                created_ms: now,
                deadline_ms: now + deadline.as_millis() as i64,
                timeout_ms,
                idempotency_key,
                idempotency_hash: idempotency_hash.clone(),
                traceparent,
                measurement_id,
                dispatch: alive,
                charge: reservation.as_ref().and_then(|r| r.charge()),
            })
            .await?;
        drop(reservation);
        match created {
            // Made meanwhile with the same key (another backend, or a race here).
            Created::Existing(request) => self.replayed(request, &idempotency_hash),
            Created::New(request) => {
                let done = waiter.then(|| self.register_waiter(&request.id));
                // Stored as dispatched in the same transaction (one write, not two);
                // a publish that fails is retried by the sweep.
                if alive {
                    self.publish_command(&request).await;
                }
                Ok(Submitted {
                    request,
                    new: true,
                    done,
                })
            }
        }
    }

    /// The answer to a request whose idempotency key made `request` before: that
    /// request, unless the key came with another request (422).
    fn replayed(&self, request: RequestRow, hash: &Option<String>) -> Result<Submitted, ApiError> {
        if request.idempotency_hash.is_some() && request.idempotency_hash != *hash {
            return Err(ApiError::IdempotencyMismatch(format!(
                "Idempotency-Key: this key made request {} with another agent, module, body or deadline; use a new key for a new request",
                request.id
            )));
        }
        Ok(Submitted {
            request,
            new: false,
            done: None,
        })
    }

    /// Holds `caller`'s turn to check its budget (and reserve, or create and charge)
    /// (None: no budget). Per token, in this backend; two backends may still each pass
    /// one request.
    pub async fn budget_turn(
        &self,
        caller: &crate::security::Caller,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let token = caller
            .token_id
            .as_ref()
            .filter(|_| caller.budget.is_some())?;
        let turn = self
            .budget_turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(token.clone())
            .or_default()
            .clone();
        Some(turn.lock_owned().await)
    }

    /// The parameters of a run of `module` on `agent`, as that agent would run them:
    /// the agent is known and has the module loaded, the body is a JSON object, merged
    /// over the agent's module defaults, valid for the module's schema, and allowed by
    /// the limits and the policy. `names`: the host names of this API call, resolved
    /// once for every agent it asks for.
    pub async fn checked_params(
        &self,
        agent: &str,
        module: &str,
        body: &[u8],
        names: &crate::security::Resolutions,
    ) -> Result<Checked, ApiError> {
        if !self.registry.knows(agent) {
            return Err(ApiError::UnknownAgent(agent.to_string()));
        }
        let spec = catalog::find(module).ok_or_else(|| ApiError::UnknownModule {
            module: module.to_string(),
            known: catalog::names().iter().map(|s| s.to_string()).collect(),
        })?;
        let entry = self.registry.get(agent);
        if let Some(a) = &entry {
            if !a.hello.modules.iter().any(|m| m.name == module) {
                return Err(ApiError::ModuleNotLoaded {
                    agent: agent.to_string(),
                    module: module.to_string(),
                    loaded: a.hello.modules.iter().map(|m| m.name.clone()).collect(),
                });
            }
        }
        let params: Value = if body.iter().all(|b| b.is_ascii_whitespace()) {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?
        };
        let params = self.with_module_defaults(agent, module, params);
        self.validate(module, &params)?;
        let demand = spec.demand(&params);
        let enforcing = entry
            .as_ref()
            .is_some_and(|a| a.hello.has(wire::features::POLICY));
        let policy = self
            .security
            .check_measurement(agent, &demand, enforcing, names)
            .await?;
        Ok(Checked {
            params,
            timeout_ms: spec.default_timeout_ms,
            policy,
            demand,
        })
    }

    /// The request's parameters over the module's defaults on that agent (the request
    /// wins), as the agent's last hello reported them. Merged here, before validation,
    /// the limits and the policy see them: defaults cannot carry what a request may
    /// not ask for. The agent does not merge them again.
    fn with_module_defaults(&self, agent: &str, module: &str, params: Value) -> Value {
        let Value::Object(mut p) = params else {
            return params;
        };
        let defaults = self.registry.get(agent).and_then(|a| {
            a.hello
                .modules
                .into_iter()
                .find(|m| m.name == module)
                .and_then(|m| m.config?.defaults_json)
        });
        if let Some(Ok(Value::Object(d))) = defaults.map(|d| serde_json::from_str::<Value>(&d)) {
            for (k, v) in d {
                p.entry(k).or_insert(v);
            }
        }
        Value::Object(p)
    }

    /// Loads, unloads or configures a module on a connected agent.
    pub async fn control(&self, agent: &str, kind: CommandKind) -> Result<String, ApiError> {
        let a = self
            .registry
            .get(agent)
            .ok_or_else(|| ApiError::UnknownAgent(agent.to_string()))?;
        if !a.alive(now_ms()) {
            return Err(ApiError::AgentOffline(agent.to_string()));
        }
        let id = uuid::Uuid::new_v4().to_string();
        // A schedule set carries the rules its runs are checked against.
        let policy = matches!(kind, CommandKind::Schedules { .. })
            .then(|| self.agent_policy(agent))
            .flatten();
        let cmd = Envelope::Command(Command {
            id: id.clone(),
            kind,
            traceparent: None,
            deadline_ms: None,
            issued_ms: now_ms(),
            policy,
        });
        self.bus
            .publish_down(Kind::Cmd, agent, self.encode_for(agent, &cmd))
            .await
            .map_err(|e| ApiError::Unavailable(format!("bus: {e}")))?;
        Ok(id)
    }

    /// The rules `agent` checks its runs against, as its commands carry them: the
    /// current policy (a policy file changed since a request was made binds its
    /// redelivery too); none when every address passes.
    fn agent_policy(&self, agent: &str) -> Option<imn_proto::policy::TargetPolicy> {
        Some(self.security.target_policy(agent)).filter(|p| !p.is_open())
    }

    /// Sends the request's command to its agent and marks it `dispatched`.
    async fn dispatch(&self, req: &RequestRow) {
        if self.publish_command(req).await {
            if let Err(e) = self
                .store
                .transition(&req.id, RequestState::Dispatched, now_ms(), "backend", None)
                .await
            {
                tracing::warn!(error = %e, request = %req.id, "cannot record dispatch");
            }
        }
    }

    /// Sends a request's command to its agent; false if the bus refused it.
    async fn publish_command(&self, req: &RequestRow) -> bool {
        // A span per dispatch (redeliveries too), in the request's trace; the command
        // carries it in the envelope (MQTT 3.1.1 has no headers) and in a NATS header.
        let cx = observe::dispatch_span(
            req.traceparent.as_deref(),
            &req.agent_id,
            &req.id,
            &req.module,
        );
        let traceparent = cx.as_ref().and_then(imn_cloud::telemetry::traceparent);
        let cmd = Envelope::Command(Command {
            id: req.id.clone(),
            kind: CommandKind::Run {
                module: req.module.clone(),
                params_json: req.params_json.clone(),
                timeout_ms: req.timeout_ms,
            },
            traceparent: traceparent.clone(),
            deadline_ms: Some(req.deadline_ms),
            issued_ms: now_ms(),
            policy: self.agent_policy(&req.agent_id),
        });
        let sent = self
            .bus
            .publish_down_traced(
                Kind::Cmd,
                &req.agent_id,
                self.encode_for(&req.agent_id, &cmd),
                traceparent.as_deref(),
            )
            .await;
        match sent {
            Ok(()) => {
                observe::end_dispatch(cx, None);
                true
            }
            Err(e) => {
                self.metrics.errors.inc(&["bus_publish"]);
                let _attached = cx.clone().map(|cx| cx.attach());
                tracing::warn!(error = %e, request = %req.id, "dispatch failed; will retry");
                drop(_attached);
                observe::end_dispatch(cx, Some(&e.to_string()));
                false
            }
        }
    }

    /// Metrics of a stored batch, and the spans of its traced results.
    fn observe_batch(&self, agent: &str, batch: &wire::Batch, arrived_ms: i64, stored_ms: i64) {
        for rec in &batch.records {
            let Some(r) = rec.body.as_result() else {
                continue;
            };
            self.metrics.result(agent, r, stored_ms);
            if let Some(tp) = rec.body.traceparent() {
                observe::trace_result(agent, r, tp, arrived_ms, stored_ms);
            }
        }
    }

    /// Reads how many requests are in each state, for metrics.
    pub async fn refresh_request_states(&self) {
        match self.store.request_state_counts().await {
            Ok(c) => {
                *self
                    .metrics
                    .request_states
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = c
            }
            Err(e) => tracing::warn!(error = %e, "cannot count requests by state"),
        }
    }

    /// Every metric family read from current state (the in-process bridge's too).
    pub fn metric_families(&self) -> Vec<imn_cloud::telemetry::prom::Family> {
        let mut f = self.metrics.families(&self.registry.all(), now_ms());
        match self.bridge_stats.get() {
            Some(b) => f.extend(b.families()),
            None => f.push(
                imn_cloud::telemetry::prom::Family::new(
                    "imn_metric_series_dropped_total",
                    "imn.metric.series_dropped",
                    "{series}",
                    imn_cloud::telemetry::prom::FamilyKind::Counter,
                    "Label sets not recorded because an instrument had too many.",
                )
                .value(imn_cloud::telemetry::prom::series_dropped() as f64),
            ),
        }
        f.push(
            imn_cloud::telemetry::prom::Family::new(
                "imn_records_stored_total",
                "imn.records.stored",
                "{record}",
                imn_cloud::telemetry::prom::FamilyKind::Counter,
                "Outbox records stored (results, state changes, events), duplicates not counted.",
            )
            .value(self.stats.records_stored.load(Ordering::Relaxed) as f64),
        );
        // What ingest kept out, and why: each is also in /health → ingest.
        for (name, otel, unit, help, v) in [
            (
                "imn_dead_lettered_total",
                "imn.ingest.dead_lettered",
                "{record}",
                "Records the store could not take, kept in the dead letters with the reason (acked).",
                &self.stats.dead_lettered,
            ),
            (
                "imn_ingest_shed_total",
                "imn.ingest.shed",
                "{message}",
                "Uplink messages dropped unacked because their agent had its share of the ingest queue waiting (the agent resends).",
                &self.stats.shed,
            ),
            (
                "imn_ingest_records_refused_total",
                "imn.ingest.records_refused",
                "{record}",
                "Records the store refused (too many seq ranges for one outbox epoch), left unacked.",
                &self.stats.records_refused,
            ),
            (
                "imn_ingest_events_deferred_total",
                "imn.ingest.events_deferred",
                "{record}",
                "Events held back past the per-batch cap (the agent sends them again).",
                &self.stats.events_deferred,
            ),
            (
                "imn_ingest_hellos_throttled_total",
                "imn.ingest.hellos_throttled",
                "{message}",
                "Hellos that came within a second of their agent's last (the newest is handled when its turn comes).",
                &self.stats.hellos_throttled,
            ),
        ] {
            f.push(
                imn_cloud::telemetry::prom::Family::new(
                    name,
                    otel,
                    unit,
                    imn_cloud::telemetry::prom::FamilyKind::Counter,
                    help,
                )
                .value(v.load(Ordering::Relaxed) as f64),
            );
        }
        f
    }

    /// Feeds the families of [`Self::metric_families`] to OTLP (when on). Call once,
    /// after the in-process bridge (if any) is attached.
    pub fn observe_metrics(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        imn_cloud::telemetry::prom::observe(Arc::new(move || {
            weak.upgrade()
                .map(|b| b.metric_families())
                .unwrap_or_default()
        }));
    }

    /// `/metrics`: the Prometheus text format.
    pub async fn prometheus(&self) -> String {
        self.refresh_request_states().await;
        let mut e = imn_cloud::telemetry::prom::Exposition::new();
        for f in self.metric_families() {
            f.write(&mut e);
        }
        self.metrics.write(&mut e);
        e.finish()
    }

    /// Waits until the request is terminal or `timeout` passes.
    pub async fn wait(&self, request_id: &str, timeout: Duration) {
        let rx = self.register_waiter(request_id);
        // It may have finished before we registered.
        if let Ok(Some(r)) = self.store.request(request_id).await {
            if r.state.is_terminal() {
                self.waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(request_id);
                return;
            }
        }
        self.wait_on(request_id, rx, timeout).await;
    }

    /// A receiver that fires when the request reaches a terminal state.
    fn register_waiter(&self, request_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(request_id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Waits on a receiver from [`Self::register_waiter`] until it fires or `timeout`.
    pub async fn wait_on(&self, request_id: &str, rx: oneshot::Receiver<()>, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, rx).await;
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = w.get_mut(request_id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(request_id);
            }
        }
    }

    /// A request reached a terminal state outside ingest: wakes its `?wait` callers.
    pub fn finished(&self, request_id: &str) {
        self.wake(request_id);
    }

    fn wake(&self, request_id: &str) {
        let list = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
        for tx in list.into_iter().flatten() {
            let _ = tx.send(());
        }
    }

    /// Counts an uplink message dropped for `reason`.
    fn reject(&self, reason: &'static str) {
        self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
        self.metrics.errors.inc(&[&format!("uplink_{reason}")]);
        *self
            .stats
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Two stages, so decoding and JSON for one batch overlap the store's write of the
    /// one before: a task bounds, decodes, checks and prepares; this one handles in
    /// arrival order, and forms group commits round-robin over agents.
    async fn ingest(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<UpMessage>) {
        let (tx, mut prepared) = tokio::sync::mpsc::channel::<Decoded>(GROUP_MESSAGES);
        // Prepared messages wait within a byte budget as well as a count: many small
        // ones make a big group commit, a few big ones do not pile up in memory. Each
        // agent may hold only its share of it (`ingest::AGENT_QUEUED_BYTES`): past it
        // its messages are dropped before they are decoded, unacked, and the agent
        // sends them again, so a flood from one agent cannot fill the budget others
        // wait on.
        let budget = Arc::new(tokio::sync::Semaphore::new(PREPARED_BYTES));
        let shares = ingest::Shares::default();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let Some(share) = shares.take(&msg.agent, msg.payload.len()) else {
                    me.stats.shed.fetch_add(1, Ordering::Relaxed);
                    me.metrics.errors.inc(&["uplink_shed"]);
                    tracing::debug!(agent = %msg.agent, "agent over its share of the ingest queue; message dropped for the agent to resend");
                    msg.ack().await;
                    continue;
                };
                let cost = msg.payload.len().clamp(1, PREPARED_BYTES) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    return;
                };
                let (env, rows) = me.take_in(&msg);
                let d = Decoded {
                    msg,
                    env,
                    rows,
                    arrived_ms: now_ms(),
                    _permit: permit,
                    _share: share,
                };
                if tx.send(d).await.is_err() {
                    return;
                }
            }
        });
        // Batches wait for group commits, everything else (hellos, heartbeats,
        // statuses, refusals) for its turn: both round-robin over agents, so a flood
        // of any kind from one agent is served one message a round, between the others'.
        let mut batches: ingest::FairQueue<Decoded> = ingest::FairQueue::default();
        let mut others: ingest::FairQueue<Decoded> = ingest::FairQueue::default();
        loop {
            let deferred = self.next_deferred_hello();
            let d = tokio::select! {
                d = prepared.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
                _ = sleep_until_some(deferred), if deferred.is_some() => {
                    self.take_deferred_hellos().await;
                    continue;
                }
            };
            queue(d, &mut batches, &mut others);
            while !batches.is_empty() || !others.is_empty() {
                // Whatever else is ready joins the queues first (small messages from
                // many agents would otherwise cost a commit each).
                while let Ok(d) = prepared.try_recv() {
                    queue(d, &mut batches, &mut others);
                }
                for d in others.take_round(OTHERS_PER_ROUND) {
                    self.handle_up(d).await;
                }
                if !batches.is_empty() {
                    let group = batches.take_group(GROUP_MESSAGES, GROUP_ROWS);
                    self.store_group(group).await;
                }
                if self
                    .next_deferred_hello()
                    .is_some_and(|t| t <= tokio::time::Instant::now())
                {
                    self.take_deferred_hellos().await;
                }
            }
        }
        tracing::warn!("uplink feed closed");
    }

    /// Takes one uplink message through everything ingest does to it (bounds, decoding,
    /// the store, acks), alone and to the end: for fuzzing and tests, which need each
    /// message handled before the next. Its agent's share is not checked.
    pub async fn handle_one(&self, msg: UpMessage) {
        let Ok(permit) = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_many_owned(1)
            .await
        else {
            return;
        };
        let Some(share) = ingest::Shares::default().take(&msg.agent, 0) else {
            return;
        };
        let (env, rows) = self.take_in(&msg);
        self.handle_up(Decoded {
            msg,
            env,
            rows,
            arrived_ms: now_ms(),
            _permit: permit,
            _share: share,
        })
        .await;
    }

    /// Decodes an uplink message and checks it against the bounds of [`ingest`]; a
    /// batch is prepared for the store, its events past the per-batch cap held back.
    fn take_in(
        &self,
        msg: &UpMessage,
    ) -> (
        Result<(u8, Envelope), Rejected>,
        Option<store::PreparedBatch>,
    ) {
        let (version, mut env) = match wire::decode_versioned(&msg.payload) {
            Ok(v) => v,
            Err(e) => return (Err(Rejected::Decode(e)), None),
        };
        let checked = match &mut env {
            Envelope::Hello(h) => ingest::check_hello(h),
            Envelope::Heartbeat(hb) => ingest::check_heartbeat(hb),
            Envelope::Batch(b) => ingest::check_batch(b).map(|()| {
                let held = ingest::defer_events(b);
                if held > 0 {
                    self.stats
                        .events_deferred
                        .fetch_add(held as u64, Ordering::Relaxed);
                }
            }),
            _ => Ok(()),
        };
        if let Err(r) = checked {
            return (Err(Rejected::Bounds(r)), None);
        }
        let rows = match &env {
            Envelope::Batch(b) if msg.kind == Kind::Out => Some(store::prepare(b)),
            _ => None,
        };
        (Ok((version, env)), rows)
    }

    /// Stores batches in one transaction, then acks each to its agent and to the bus.
    async fn store_group(&self, group: Vec<Decoded>) {
        let now = now_ms();
        let mut items = Vec::with_capacity(group.len());
        let mut msgs = Vec::with_capacity(group.len());
        // The byte budget is released once the group is stored and acked.
        let mut _permits = Vec::with_capacity(group.len());
        let mut arrivals = Vec::with_capacity(group.len());
        for d in group {
            let Decoded {
                msg,
                env,
                rows,
                arrived_ms,
                _permit,
                _share,
            } = d;
            _permits.push((_permit, _share));
            let Ok((_, Envelope::Batch(batch))) = env else {
                continue;
            };
            arrivals.push(arrived_ms);
            self.registry.seen(&msg.agent, now);
            let rows = rows.unwrap_or_else(|| store::prepare(&batch));
            items.push((msg.agent.clone(), rows));
            msgs.push((msg, batch));
        }
        let started = std::time::Instant::now();
        let stored = self.store.store_batches(items, now).await;
        self.stats.store_groups.fetch_add(1, Ordering::Relaxed);
        self.stats
            .store_busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match stored {
            Ok(outcomes) => {
                // One ack per agent and outbox epoch for the whole group: its ranges
                // name every record of that agent's batches in the group (an agent with
                // a window of 8 has several), so the broker carries fewer messages.
                let mut acks: HashMap<(String, u64), Vec<u64>> = HashMap::new();
                let mut settled = Vec::with_capacity(msgs.len());
                let stored_ms = now_ms();
                for (((msg, batch), outcome), arrived_ms) in
                    msgs.into_iter().zip(outcomes).zip(arrivals)
                {
                    self.observe_batch(&msg.agent, &batch, arrived_ms, stored_ms);
                    self.stats
                        .records_stored
                        .fetch_add(outcome.stored, Ordering::Relaxed);
                    self.stats
                        .duplicates_dropped
                        .fetch_add(outcome.duplicates, Ordering::Relaxed);
                    if outcome.run_duplicates > 0 {
                        self.stats
                            .run_duplicates_dropped
                            .fetch_add(outcome.run_duplicates, Ordering::Relaxed);
                        self.metrics.errors.inc(&["run_duplicate"]);
                        tracing::warn!(agent = %msg.agent, results = outcome.run_duplicates, "second results for runs that already have one dropped (an agent ran them again)");
                    }
                    self.stats
                        .dead_lettered
                        .fetch_add(outcome.dead_lettered, Ordering::Relaxed);
                    if outcome.dead_lettered > 0 {
                        self.metrics.errors.inc(&["dead_letter"]);
                        tracing::warn!(agent = %msg.agent, records = outcome.dead_lettered, "records the store could not take went to the dead letters");
                    }
                    self.stats
                        .records_refused
                        .fetch_add(outcome.refused.len() as u64, Ordering::Relaxed);
                    // Every record of the batch is acked but those the store refused:
                    // the agent keeps and resends them. (A set: a hostile batch can
                    // have thousands refused.)
                    let refused: std::collections::HashSet<u64> =
                        outcome.refused.iter().copied().collect();
                    acks.entry((msg.agent.clone(), batch.epoch))
                        .or_default()
                        .extend(
                            batch
                                .records
                                .iter()
                                .map(|r| r.seq)
                                .filter(|s| !refused.contains(s)),
                        );
                    settled.push((msg, outcome.finished));
                }
                self.records_stored.notify_waiters();
                let finished: Vec<String> = settled
                    .iter()
                    .flat_map(|(_, f)| f.iter().cloned())
                    .collect();
                self.tell_peers(crate::peers::PeerEvent::Stored { finished })
                    .await;
                // Acked only after the commit above: the agent may now delete.
                if !self.hold_acks.load(Ordering::SeqCst) {
                    for ((agent, epoch), seqs) in acks {
                        self.send_ack(&agent, Ack::from_seqs(epoch, seqs)).await;
                    }
                }
                for (msg, finished) in settled {
                    msg.ack().await;
                    for id in finished {
                        self.wake(&id);
                    }
                }
            }
            Err(e) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.errors.inc(&["store"]);
                tracing::error!(error = %e, batches = msgs.len(), "cannot store batches; not acking");
                for (msg, _) in msgs {
                    msg.nak().await;
                }
            }
        }
    }

    /// An envelope for `agent`, in the wire version of its last hello.
    fn encode_for(&self, agent: &str, env: &Envelope) -> Bytes {
        let version = self
            .registry
            .get(agent)
            .map_or(wire::WIRE_VERSION, |a| a.wire_version);
        Bytes::from(wire::encode_for(version, env))
    }

    async fn send_ack(&self, agent: &str, ack: Ack) {
        match self
            .bus
            .publish_down(
                Kind::Ack,
                agent,
                self.encode_for(agent, &Envelope::Ack(ack)),
            )
            .await
        {
            Ok(()) => {
                self.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.errors.inc(&["bus_publish"]);
                tracing::warn!(error = %e, "cannot send ack; the agent will resend")
            }
        }
    }

    async fn handle_up(&self, d: Decoded) {
        let Decoded {
            msg,
            env,
            rows,
            arrived_ms,
            _permit,
            _share,
        } = d;
        let now = now_ms();
        let (version, env) = match env {
            Ok(env) => env,
            Err(e) => {
                self.reject(e.reason());
                tracing::warn!(agent = %msg.agent, kind = msg.kind.as_str(), reason = e.reason(), error = %e, "dropping an uplink message");
                msg.ack().await;
                return;
            }
        };
        let agent = msg.agent.clone();
        match (msg.kind, env) {
            (Kind::Hello, Envelope::Hello(hello)) if hello.agent_id == agent => {
                if !self.hello_due(&agent, now) {
                    // Too soon after the last: the newest one waits its turn (a module
                    // load and its configure come as two hellos in a few ms; a flood
                    // of hellos costs one store write a second).
                    self.stats.hellos_throttled.fetch_add(1, Ordering::Relaxed);
                    self.deferred_hellos
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(agent, (hello, version));
                    msg.ack().await;
                    return;
                }
                // An older version's hello after a newer one's, and no later by the
                // agent's own clock, is a replay: it would make the backend write to a
                // newer agent in a version it refuses.
                let replay = self.registry.get(&agent).is_some_and(|a| {
                    version < a.wire_version && hello.sent_at_ms <= a.hello.sent_at_ms
                });
                if replay {
                    self.reject("stale_hello");
                    tracing::warn!(%agent, version, "a version {version} hello older than the agent's last; dropped");
                    msg.ack().await;
                    return;
                }
                // This one is newer than any deferred one of the agent's.
                self.deferred_hellos
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&agent);
                match self.take_hello(&agent, hello, version, now).await {
                    Ok(()) => msg.ack().await,
                    Err(()) => msg.nak().await,
                }
            }
            (Kind::Heartbeat, Envelope::Heartbeat(hb)) => {
                self.touch_session(&agent, now).await;
                self.registry.heartbeat(&agent, hb.clone(), now);
                self.tell_peers(crate::peers::PeerEvent::Heartbeat {
                    agent: agent.clone(),
                    at_ms: now,
                    hb,
                })
                .await;
                msg.ack().await;
            }
            (Kind::Status, Envelope::Status(st)) => {
                if st.online {
                    self.touch_session(&agent, now).await;
                } else {
                    self.close_session(&agent, now).await;
                }
                self.registry.status(&agent, st.online, now);
                self.tell_peers(crate::peers::PeerEvent::Status {
                    agent: agent.clone(),
                    at_ms: now,
                    online: st.online,
                })
                .await;
                msg.ack().await;
            }
            (Kind::Out, Envelope::Batch(batch)) => {
                self.store_group(vec![Decoded {
                    msg,
                    env: Ok((version, Envelope::Batch(batch))),
                    rows,
                    arrived_ms,
                    _permit,
                    _share,
                }])
                .await;
            }
            (kind, _) => {
                self.reject("mismatch");
                tracing::warn!(%agent, kind = kind.as_str(), "envelope does not match its topic or agent; dropped");
                msg.ack().await;
            }
        }
    }

    /// An agent's hello: its session, the store, the registry, the peers; then its
    /// undelivered commands and its schedules. Err when the store did not take it.
    async fn take_hello(&self, agent: &str, hello: Hello, version: u8, now: i64) -> Result<(), ()> {
        self.touch_session(agent, now).await;
        let schedule_version = hello.schedule_version;
        let schedule_rules = hello
            .has(wire::features::POLICY)
            .then_some(hello.schedule_policy);
        if let Err(e) = self.store.upsert_agent(agent, &hello, now).await {
            tracing::warn!(error = %e, "cannot store hello");
            return Err(());
        }
        self.registry
            .hello(agent, hello.clone(), Some(version), now);
        self.tell_peers(crate::peers::PeerEvent::Hello {
            agent: agent.to_string(),
            at_ms: now,
            hello: Box::new(hello),
        })
        .await;
        tracing::info!(%agent, "agent hello");
        self.redeliver(agent, true).await;
        self.reconcile_schedules(agent, schedule_version, schedule_rules)
            .await;
        Ok(())
    }

    /// Handles the deferred hellos whose turn has come.
    async fn take_deferred_hellos(&self) {
        let now = now_ms();
        let due: Vec<(String, (Hello, u8))> = {
            let mut d = self
                .deferred_hellos
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let agents: Vec<String> = d
                .keys()
                .filter(|a| self.hello_due_at(a).is_none_or(|t| t <= now))
                .cloned()
                .collect();
            agents
                .into_iter()
                .filter_map(|a| d.remove(&a).map(|h| (a, h)))
                .collect()
        };
        for (agent, (hello, version)) in due {
            if self.hello_due(&agent, now)
                && self.take_hello(&agent, hello, version, now).await.is_err()
            {
                tracing::warn!(%agent, "a deferred hello was not stored; the agent's next one will be");
            }
        }
    }

    /// When the earliest deferred hello is due.
    fn next_deferred_hello(&self) -> Option<tokio::time::Instant> {
        let d = self
            .deferred_hellos
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let at = d.keys().filter_map(|a| self.hello_due_at(a)).min()?;
        let wait = (at - now_ms()).clamp(0, ingest::HELLO_MIN_INTERVAL_MS) as u64;
        Some(tokio::time::Instant::now() + Duration::from_millis(wait))
    }

    /// When the next hello of `agent` may be handled (None: now).
    fn hello_due_at(&self, agent: &str) -> Option<i64> {
        self.last_hello
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .map(|t| t.saturating_add(ingest::HELLO_MIN_INTERVAL_MS))
    }

    /// Whether a hello from `agent` is handled now: at most one a second per agent
    /// (each reads and writes the store, and redelivers its commands).
    fn hello_due(&self, agent: &str, now: i64) -> bool {
        let mut last = self.last_hello.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(agent) {
            Some(&t) if now.saturating_sub(t) < ingest::HELLO_MIN_INTERVAL_MS && now >= t => false,
            _ => {
                last.insert(agent.to_string(), now);
                true
            }
        }
    }

    /// A sign of life: opens a connection session for an agent that has none open
    /// (closing one left open in the store, by a backend restart, where the agent was
    /// last seen).
    async fn touch_session(&self, agent: &str, now: i64) {
        if self
            .open_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(agent)
        {
            return;
        }
        let prev_end = self.registry.get(agent).map_or(now, |a| a.last_seen_ms);
        match self.store.session_open(agent, now, prev_end).await {
            Ok(()) => {
                self.open_sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(agent.to_string());
            }
            Err(e) => tracing::warn!(error = %e, %agent, "cannot record the agent's connection"),
        }
    }

    /// Another backend opened (or closed) the agent's session in the shared store.
    pub(crate) fn session_known(&self, agent: &str, open: bool) {
        let mut s = self.open_sessions.lock().unwrap_or_else(|e| e.into_inner());
        if open {
            s.insert(agent.to_string());
        } else {
            s.remove(agent);
        }
    }

    /// The agent left (its `offline` status, or silence): closes its session at `at_ms`.
    async fn close_session(&self, agent: &str, at_ms: i64) {
        let was_open = self
            .open_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent);
        if was_open {
            if let Err(e) = self.store.session_close(agent, at_ms).await {
                tracing::warn!(error = %e, %agent, "cannot record the agent's disconnection");
            }
        }
    }

    /// Sends an agent its undelivered commands: all of them after a hello, or only
    /// those dispatched too long ago otherwise.
    async fn redeliver(&self, agent: &str, all: bool) {
        let Ok(reqs) = self.store.undelivered(agent).await else {
            return;
        };
        let now = now_ms();
        for r in reqs {
            // `updated_ms` may be an agent's clock (its state records move it).
            let stale = now.saturating_sub(r.updated_ms) > REDISPATCH_AFTER.as_millis() as i64;
            if all || r.state == RequestState::Pending || stale {
                self.dispatch(&r).await;
            }
        }
    }

    /// Every few seconds: expire requests past their deadline, and redeliver commands
    /// that alive agents have not confirmed.
    async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            // Request states for OTLP metrics (a scrape of /metrics reads them itself).
            if ticks.is_multiple_of(8) && imn_cloud::telemetry::meter().is_some() {
                self.refresh_request_states().await;
            }
            ticks += 1;
            let now = now_ms();
            if let Ok(overdue) = self.store.overdue(now).await {
                for r in overdue {
                    if let Ok(true) = self
                        .store
                        .transition(
                            &r.id,
                            RequestState::Expired,
                            now,
                            "backend",
                            Some("deadline passed"),
                        )
                        .await
                    {
                        self.wake(&r.id);
                    }
                }
            }
            if ticks.is_multiple_of(5) {
                self.resend_stale_schedules(now).await;
            }
            for a in self.registry.all() {
                if a.alive(now) {
                    self.redeliver(&a.id, false).await;
                } else {
                    // Silent past three heartbeats: disconnected since it was last seen.
                    self.close_session(&a.id, a.last_seen_ms).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use imn_cloud::bus::LocalBus;
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
