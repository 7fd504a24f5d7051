//! Requests and their dispatch: making a request (checks, budget, queue limit, the
//! store), sending commands to agents, and the sweep that expires and redelivers.
//!
//! Invariants:
//! - a request is checked as its agent would run it ([`Backend::checked_params`]): the
//!   module loaded, its defaults merged before validation, the limits and the policy;
//! - a request made for an alive agent is stored as `dispatched` in the same write that
//!   makes it; a command the bus refused, or an agent did not confirm within
//!   [`REDISPATCH_AFTER`], is sent again by the sweep, and all of an agent's
//!   undelivered commands after its hello;
//! - an idempotency key is its caller's own and names one request: a retry finds that
//!   request before anything is checked again, the same key with another request is
//!   refused;
//! - a request past its deadline is expired by the sweep, and its waiters woken.

use std::sync::Arc;
use std::time::Duration;

use imn_proto::now_ms;
use imn_proto::wire::{self, Command, CommandKind, Envelope, Kind, RequestState};
use serde_json::Value;

use super::{Backend, Checked, SubmitOptions, Submitted, REDISPATCH_AFTER};
use crate::error::ApiError;
use crate::observe;
use crate::store::{Created, NewRequest, RequestRow};

impl Backend {
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
                let done = waiter.then(|| self.waiters.register(&request.id));
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
        let kind = self.module_kind(module).await?;
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
        // The agent must run the version whose schema this backend checked against.
        if let (super::wasm::ModuleKind::Wasm(e), Some(a)) = (&kind, &entry) {
            let want = e.manifest.schema_hash();
            if let Some(m) = a.hello.modules.iter().find(|m| m.name == module) {
                if m.schema_hash != want {
                    return Err(ApiError::Conflict(format!(
                        "agent {agent:?} runs {module} {} (schema {}), not the added {} (schema {want}): load it on the agent again",
                        m.version, m.schema_hash, e.manifest.source.version
                    )));
                }
            }
        }
        let demand = kind.demand(&params);
        let enforcing = entry
            .as_ref()
            .is_some_and(|a| a.hello.has(wire::features::POLICY));
        let policy = self
            .security
            .check_measurement(agent, &demand, enforcing, names)
            .await?;
        Ok(Checked {
            params,
            timeout_ms: kind.default_timeout_ms(),
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

    /// Sends an agent its undelivered commands: all of them after a hello, or only
    /// those dispatched too long ago otherwise.
    pub(super) async fn redeliver(&self, agent: &str, all: bool) {
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
    pub(super) async fn sweep(self: Arc<Self>) {
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
                        self.waiters.wake(&r.id);
                    }
                }
            }
            self.store_held_reports().await;
            self.advance_rollouts().await;
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
}
