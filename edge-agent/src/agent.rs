//! The agent's main loop. It owns the transport and the outbox; module runs are
//! separate tasks that hand their records back over a channel.
//!
//! Sync is an explicit state machine:
//! - `Offline`: not connected; records pile up in the outbox.
//! - `CatchingUp`: connected with a backlog; sends from the oldest record.
//! - `Online`: connected and caught up; new records go out as they are made.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use embedded_svc::mqtt::client::asynch::{Client, Connection, Event, EventPayload, Publish, QoS};
use imn_modules::exec::{system, Context};
use imn_modules::now_ms;
use imn_modules::results::ModuleOutcome;
use imn_modules::wire::{
    self, Ack, AgentEvent, Batch, Command, CommandKind, Envelope, Heartbeat, Hello, Kind,
    ModuleResult, RecordBody, RequestState, ScheduledRun, StateChange, Status,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::config::AgentConfig;
use crate::modules::LoadedModules;
use crate::outbox::{Condition, Outbox, OutboxError, OutboxLimits, SledOutbox};
use crate::schedule::{Schedules, META_SCHEDULES};
use crate::supervisor::{self, Restarts};
use crate::transport::{self, ConnectOptions, MqttClient, MqttConnection};

/// Where the loaded-module set is kept in the store.
const META_MODULES: &[u8] = b"modules";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Metrics(String),
}

/// Where sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Offline,
    CatchingUp,
    Online,
}

/// A batch on the wire, waiting for its ack.
struct InFlight {
    last_seq: u64,
    sent_at: Instant,
}

/// What a module task hands back to the main loop.
enum Produced {
    Record(Box<RecordBody>),
    /// The run finished; its result is the preceding record.
    Finished {
        id: String,
        module: String,
        panicked: bool,
    },
}

pub struct Agent {
    cfg: AgentConfig,
    outbox: SledOutbox,
    client: MqttClient,
    conn: Option<MqttConnection>,
    state: SyncState,
    /// The next seq to send; everything below it was sent at least once this connection.
    send_from: u64,
    inflight: VecDeque<InFlight>,
    last_ack: Instant,
    /// Records from this seq on were made after the connection came up (live).
    live_mark: u64,
    /// The next live seq to send (with `live_first`).
    live_sent: u64,
    produced_tx: mpsc::Sender<Produced>,
    produced_rx: mpsc::Receiver<Produced>,
    /// Runs in progress, so a cancel can stop them.
    running: HashMap<String, AbortHandle>,
    /// The last connection error logged while offline: each new kind of failure is
    /// logged once, not once per retry.
    conn_error: Option<String>,
    cpu: system::CpuSampler,
    /// Loaded modules and their settings (persisted).
    modules: LoadedModules,
    /// Backoff of modules that panicked.
    restarts: Restarts,
    ctx: Context,
    /// State changes (received, running) wait at most [`STATE_DELAY`] for a result
    /// to go with them: a fast module's run then costs one flush and one batch, not
    /// three.
    pump_at: Option<tokio::time::Instant>,
    /// Outbox and link figures for `/metrics` (the `metrics` feature).
    gauges: std::sync::Arc<crate::metrics::Gauges>,
    /// Recurring measurements (persisted), and when the next slot runs.
    schedules: Schedules,
    sched_at: Option<tokio::time::Instant>,
}

/// A scheduled run: which measurement and slot its result belongs to.
struct SlotOf {
    measurement_id: String,
    scheduled_ms: i64,
}

/// How long a state change may wait for the run's result before it is sent alone.
const STATE_DELAY: Duration = Duration::from_millis(2);

/// Resolves at `at`; never if `None` (the caller guards the branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data).map_err(|source| AgentError::DataDir {
            path: cfg.data.clone(),
            source,
        })?;
        let outbox = SledOutbox::open(
            &cfg.data,
            OutboxLimits {
                max_bytes: cfg.outbox_max_bytes,
                memory_bytes: cfg.outbox_memory_bytes,
                disk_reserve_bytes: cfg.disk_reserve_bytes,
                ..OutboxLimits::default()
            },
        )?;
        let brokers = cfg.broker_addrs()?;
        imn_modules::exec::resolver::set_nameservers(cfg.nameserver_addrs()?);
        let mut endpoints = Vec::with_capacity(brokers.len());
        for broker in brokers {
            #[cfg(feature = "tls")]
            let tls = match broker.tls {
                true => Some(
                    crate::tls::client_config(
                        &broker.host,
                        cfg.tls_ca.as_deref(),
                        cfg.tls_cert.as_deref(),
                        cfg.tls_key.as_deref(),
                    )
                    .map_err(AgentError::Tls)?,
                ),
                false => None,
            };
            endpoints.push(transport::Endpoint {
                host: broker.host,
                port: broker.port,
                #[cfg(feature = "tls")]
                tls,
            });
        }
        let will = wire::encode(&Envelope::Status(Status {
            online: false,
            at_ms: now_ms(),
        }));
        let (client, conn) = transport::connect(ConnectOptions {
            client_id: cfg.id.clone(),
            brokers: endpoints,
            token: cfg.token.clone(),
            last_will: (wire::topic(&cfg.id, Kind::Status), will),
            connect_timeout_s: cfg.connect_timeout_s,
            keepalive_s: cfg.keepalive_s,
            max_packet_bytes: (cfg.batch_max_bytes * 2).max(1 << 20),
        });
        let (produced_tx, produced_rx) = mpsc::channel(1024);
        let modules = outbox
            .get_meta(META_MODULES)
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let ctx = Context {
            data_dir: cfg.data.clone(),
            ..Context::default()
        };
        let schedules = outbox
            .get_meta(META_SCHEDULES)
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        Ok(Agent {
            cfg,
            outbox,
            client,
            conn: Some(conn),
            state: SyncState::Offline,
            send_from: 0,
            inflight: VecDeque::new(),
            last_ack: Instant::now(),
            live_mark: 0,
            live_sent: 0,
            produced_tx,
            produced_rx,
            running: HashMap::new(),
            conn_error: None,
            cpu: system::CpuSampler::new(),
            modules,
            restarts: Restarts::default(),
            ctx,
            pump_at: None,
            gauges: Default::default(),
            schedules,
            sched_at: None,
        })
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tracing::info!(agent = %self.cfg.id, epoch = self.outbox.epoch(), depth = self.outbox.depth(), "agent starting");
        if let Some((aside, why)) = self.outbox.recovered_from.clone() {
            self.event(
                "outbox_corrupt",
                &format!(
                    "the outbox could not be read ({why}); moved to {} and started a new epoch",
                    aside.display()
                ),
            )?;
        }
        self.recover_interrupted()?;
        self.run_due_slots()?;
        self.update_gauges();
        #[cfg(feature = "metrics")]
        if let Some(listen) = self.cfg.metrics_listen {
            let (gauges, id) = (self.gauges.clone(), self.cfg.id.clone());
            let at = imn_modules::metrics_http::serve_metrics(
                listen,
                std::sync::Arc::new(move || gauges.render(&id)),
            )
            .await
            .map_err(|e| AgentError::Metrics(format!("metrics_listen {listen}: {e}")))?;
            tracing::info!(%at, "metrics at /metrics");
        }
        let mut conn = self.conn.take().expect("connection is taken once");
        let mut hb = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                ev = conn.next() => match ev {
                    Ok(ev) => self.on_event(&ev).await?,
                    Err(_) => break,
                },
                Some(p) = self.produced_rx.recv() => {
                    let mut result = self.on_produced(p)?;
                    // Drain whatever else is ready before sending, to fill batches.
                    while let Ok(p) = self.produced_rx.try_recv() {
                        result |= self.on_produced(p)?;
                    }
                    if result {
                        self.pump_at = None;
                        self.pump().await?;
                    } else {
                        self.pump_soon();
                    }
                }
                _ = sleep_until_some(self.pump_at), if self.pump_at.is_some() => {
                    self.pump_at = None;
                    self.pump().await?;
                }
                _ = sleep_until_some(self.sched_at), if self.sched_at.is_some() => {
                    self.run_due_slots()?;
                }
                _ = hb.tick() => self.heartbeat().await,
                _ = tick.tick() => {
                    // Also here, in case the wall clock moved under the timer.
                    self.run_due_slots()?;
                    // Durable within a tick even while offline.
                    self.outbox.flush();
                    self.check_resend();
                    self.pump().await?;
                    // Acked records are deleted here, a little at a time while batches
                    // are in flight and more when idle: a drain does not wait for them.
                    let idle = self.inflight.is_empty();
                    if self.outbox.compact(if idle { 4096 } else { 512 }) {
                        tick.reset_after(Duration::from_millis(if idle { 10 } else { 250 }));
                    }
                }
                _ = &mut shutdown => break,
            }
        }
        // Leave fewer acked records behind (a restart would send them again).
        self.outbox.compact(50_000);
        self.outbox.flush();
        let offline = wire::encode(&Envelope::Status(Status {
            online: false,
            at_ms: now_ms(),
        }));
        let _ = self
            .client
            .publish(
                &wire::topic(&self.cfg.id, Kind::Status),
                QoS::AtLeastOnce,
                true,
                &offline,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracing::info!(agent = %self.cfg.id, "agent stopped");
        Ok(())
    }

    /// Commands accepted before a crash never finished; say so rather than leave the
    /// request hanging.
    fn recover_interrupted(&mut self) -> Result<(), AgentError> {
        let why = match crate::crash::take_last_panic(&self.cfg.data) {
            Some(msg) => format!("the agent restarted while the module ran: it panicked: {msg}"),
            None => "the agent restarted while the module ran".to_string(),
        };
        for (id, entry) in self.outbox.unfinished_commands() {
            tracing::warn!(request = %id, "command interrupted by an agent restart");
            let now = now_ms();
            self.outbox.append(
                now,
                RecordBody::Result(ModuleResult {
                    request_id: id.clone(),
                    module: entry.module,
                    received_ms: entry.received_ms,
                    started_ms: entry.received_ms,
                    finished_ms: now,
                    outcome: ModuleOutcome::Failed(why.clone()),
                }),
            );
            self.outbox.finish_command(&id);
        }
        Ok(())
    }

    async fn on_event(&mut self, ev: &crate::transport::MqttEvent) -> Result<(), AgentError> {
        match ev.payload() {
            EventPayload::Connected(_) => {
                self.conn_error = None;
                self.on_connected().await
            }
            EventPayload::Disconnected | EventPayload::Error(_) => {
                if let EventPayload::Error(e) = ev.payload() {
                    let e = e.to_string();
                    if self.state != SyncState::Offline {
                        tracing::warn!(error = %e, "disconnected");
                    } else if self.conn_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(error = %e, broker = %self.cfg.broker, "cannot connect; retrying");
                    }
                    self.conn_error = Some(e);
                }
                self.state = SyncState::Offline;
                self.inflight.clear();
            }
            EventPayload::Received { topic, data, .. } => {
                let runs = self.running.len();
                match topic.and_then(wire::parse_topic) {
                    Some((agent, kind)) if agent == self.cfg.id => {
                        if self.on_message(kind, data)? {
                            self.send_hello().await;
                        }
                    }
                    _ => tracing::warn!(?topic, "message on an unexpected topic"),
                }
                if self.running.len() > runs {
                    // A run started: its "received" goes with the result, or shortly.
                    self.pump_soon();
                } else {
                    self.pump().await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_connected(&mut self) {
        tracing::info!(agent = %self.cfg.id, depth = self.outbox.depth(), "connected");
        let id = self.cfg.id.clone();
        let _ = self
            .client
            .subscribe(&wire::topic(&id, Kind::Cmd), QoS::AtLeastOnce)
            .await;
        let _ = self
            .client
            .subscribe(&wire::topic(&id, Kind::Ack), QoS::AtLeastOnce)
            .await;
        let online = Envelope::Status(Status {
            online: true,
            at_ms: now_ms(),
        });
        let _ = self
            .client
            .publish(
                &wire::topic(&id, Kind::Status),
                QoS::AtLeastOnce,
                true,
                &wire::encode(&online),
            )
            .await;
        self.state = SyncState::CatchingUp;
        self.send_hello().await;
        // Everything unacked goes again after every reconnect: the broker kept nothing.
        self.send_from = 0;
        self.live_mark = self.outbox.next_seq();
        self.live_sent = self.live_mark;
        self.inflight.clear();
        self.last_ack = Instant::now();
        self.heartbeat().await;
    }

    /// Identity and capabilities: sent on connect and whenever the modules change.
    async fn send_hello(&mut self) {
        if self.state == SyncState::Offline {
            return;
        }
        let hello = Envelope::Hello(Hello {
            agent_id: self.cfg.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            arch: std::env::consts::ARCH.into(),
            modules: self.modules.info(),
            tags: self.cfg.tags.clone(),
            location: self.cfg.location(),
            schedule_version: self.schedules.version,
            outbox_epoch: self.outbox.epoch(),
            outbox_depth: self.outbox.depth(),
            dropped: self.outbox.dropped(),
            heartbeat_interval_ms: self.cfg.heartbeat_ms,
            sent_at_ms: now_ms(),
            features: Vec::new(),
            limits: Default::default(),
        });
        let _ = self
            .client
            .publish(
                &wire::topic(&self.cfg.id, Kind::Hello),
                QoS::AtLeastOnce,
                false,
                &wire::encode(&hello),
            )
            .await;
    }

    /// Handles one downlink message; returns true if the hello must be sent again.
    fn on_message(&mut self, kind: Kind, data: &[u8]) -> Result<bool, AgentError> {
        let env = match wire::decode(data) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(error = %e, kind = kind.as_str(), "undecodable downlink message");
                return Ok(false);
            }
        };
        match (kind, env) {
            (Kind::Ack, Envelope::Ack(ack)) => {
                self.on_ack(&ack)?;
                Ok(false)
            }
            (Kind::Cmd, Envelope::Command(cmd)) => self.on_command(cmd),
            (kind, _) => {
                tracing::warn!(kind = kind.as_str(), "envelope does not match its topic");
                Ok(false)
            }
        }
    }

    fn on_ack(&mut self, ack: &Ack) -> Result<(), AgentError> {
        let deleted = self.outbox.ack(ack);
        self.inflight.retain(|b| !ack.contains(b.last_seq));
        self.last_ack = Instant::now();
        tracing::debug!(deleted, depth = self.outbox.depth(), "ack");
        Ok(())
    }

    /// Returns true when the loaded modules changed (hello must go out again).
    fn on_command(&mut self, cmd: Command) -> Result<bool, AgentError> {
        let now = now_ms();
        match cmd.kind {
            CommandKind::Run {
                module,
                params_json,
                timeout_ms,
            } => {
                if !self.outbox.accept_command(&cmd.id, &module, now) {
                    tracing::debug!(request = %cmd.id, "command seen before; not run again");
                    return Ok(false);
                }
                if cmd.deadline_ms.is_some_and(|d| d < now) {
                    self.append_state(
                        &cmd.id,
                        RequestState::Expired,
                        Some("deadline passed before the agent received it"),
                    )?;
                    self.outbox.finish_command(&cmd.id);
                    return Ok(false);
                }
                self.append_state(&cmd.id, RequestState::Received, None)?;
                if !self.modules.is_loaded(&module) {
                    let message = format!(
                        "module {module:?} is not loaded on this agent (loaded: {})",
                        self.modules.names().join(", ")
                    );
                    self.outbox.append(
                        now_ms(),
                        RecordBody::result(
                            ModuleResult {
                                request_id: cmd.id.clone(),
                                module,
                                received_ms: now,
                                started_ms: now,
                                finished_ms: now_ms(),
                                outcome: ModuleOutcome::Failed(message),
                            },
                            cmd.traceparent,
                        ),
                    );
                    self.outbox.finish_command(&cmd.id);
                    return Ok(false);
                }
                let (params_json, timeout_ms) =
                    self.modules.prepare(&module, &params_json, timeout_ms);
                // The trace context is handed back with the result: the backend turns
                // the agent's timings into spans of the request's trace.
                self.spawn_run(
                    cmd.id,
                    module,
                    params_json,
                    timeout_ms,
                    now,
                    cmd.traceparent,
                    None,
                );
                Ok(false)
            }
            CommandKind::Cancel { request_id } => {
                if let Some(task) = self.running.remove(&request_id) {
                    task.abort();
                    self.append_state(&request_id, RequestState::Cancelled, None)?;
                    self.outbox.finish_command(&request_id);
                }
                Ok(false)
            }
            CommandKind::Load { module } => {
                let r = self.modules.load(&module);
                self.module_changed("module_loaded", &module, r)
            }
            CommandKind::Unload { module } => {
                let r = if self.modules.unload(&module) {
                    Ok(())
                } else {
                    Err(format!("module {module:?} was not loaded"))
                };
                self.module_changed("module_unloaded", &module, r)
            }
            CommandKind::Configure { module, config } => {
                let r = self.modules.configure(&module, config);
                self.module_changed("module_configured", &module, r)
            }
            CommandKind::Schedules { version, schedules } => {
                let had = self.schedules.version;
                if !self.schedules.apply(&self.cfg.id, version, schedules, now) {
                    // Not newer: the backend has not seen the hello with this agent's
                    // version (or lost track of it, with a new store). The hello
                    // tells it, and stops its resends.
                    tracing::debug!(version, had, "schedule set not newer; hello again");
                    return Ok(true);
                }
                self.save_schedules();
                let n = self.schedules.entries.len();
                tracing::info!(version, schedules = n, "schedules updated");
                self.event(
                    "schedules_updated",
                    &format!("version {version}: {n} recurring measurements"),
                )?;
                self.run_due_slots()?;
                Ok(true)
            }
        }
    }

    fn save_schedules(&mut self) {
        let bytes = postcard::to_stdvec(&self.schedules).unwrap_or_default();
        self.outbox.put_meta(META_SCHEDULES, &bytes);
    }

    /// Starts every scheduled slot that is due, and sets the timer for the next. The
    /// set is stored before the runs start, so no slot runs twice.
    fn run_due_slots(&mut self) -> Result<(), AgentError> {
        let now = now_ms();
        let due = self.schedules.take_due(&self.cfg.id, now);
        if !due.runs.is_empty() || !due.missed.is_empty() {
            self.save_schedules();
        }
        for (measurement, n) in due.missed {
            tracing::warn!(%measurement, missed = n, "scheduled runs missed");
            self.event(
                "schedule_missed",
                &format!("measurement {measurement}: {n} runs were too late to start"),
            )?;
        }
        for run in due.runs {
            let s = run.schedule;
            let id = ScheduledRun::run_id(&s.measurement_id, run.scheduled_ms);
            if !self.modules.is_loaded(&s.module) {
                let message = format!(
                    "module {:?} is not loaded on this agent (loaded: {})",
                    s.module,
                    self.modules.names().join(", ")
                );
                self.outbox.append(
                    now,
                    RecordBody::ScheduledResult(ScheduledRun {
                        measurement_id: s.measurement_id,
                        scheduled_ms: run.scheduled_ms,
                        result: ModuleResult {
                            request_id: id,
                            module: s.module,
                            received_ms: now,
                            started_ms: now,
                            finished_ms: now,
                            outcome: ModuleOutcome::Failed(message),
                        },
                    }),
                );
                continue;
            }
            let (params_json, timeout_ms) =
                self.modules
                    .prepare(&s.module, &s.params_json, s.timeout_ms);
            self.spawn_run(
                id,
                s.module,
                params_json,
                timeout_ms,
                now,
                None,
                Some(SlotOf {
                    measurement_id: s.measurement_id,
                    scheduled_ms: run.scheduled_ms,
                }),
            );
        }
        self.sched_at = self.schedules.next_run_ms(&self.cfg.id).map(|at| {
            tokio::time::Instant::now() + Duration::from_millis((at - now_ms()).max(0) as u64)
        });
        Ok(())
    }

    /// Runs a module in its own task; its records come back over `produced_tx`. A
    /// request's run reports `running` and then its result; a scheduled run (`slot`)
    /// has no request on the backend and reports only its result.
    #[allow(clippy::too_many_arguments)]
    fn spawn_run(
        &mut self,
        id: String,
        module: String,
        params_json: String,
        timeout_ms: u64,
        received_ms: i64,
        traceparent: Option<String>,
        slot: Option<SlotOf>,
    ) {
        // A module that panicked recently waits out its backoff first.
        let backoff = self.restarts.delay(&module);
        let tx = self.produced_tx.clone();
        let ctx = self.ctx.clone();
        let key = id.clone();
        let task = tokio::spawn(async move {
            if !backoff.is_zero() {
                tokio::time::sleep(backoff).await;
            }
            let started_ms = now_ms();
            if slot.is_none() {
                let running = RecordBody::State(StateChange {
                    request_id: id.clone(),
                    state: RequestState::Running,
                    detail: None,
                });
                let _ = tx.send(Produced::Record(Box::new(running))).await;
            }
            let ran = supervisor::run_module(
                module.clone(),
                params_json,
                Duration::from_millis(timeout_ms.max(1)),
                ctx,
            )
            .await;
            let result = ModuleResult {
                request_id: id.clone(),
                module: module.clone(),
                received_ms,
                started_ms,
                finished_ms: now_ms(),
                outcome: ran.outcome,
            };
            let body = match slot {
                Some(slot) => RecordBody::ScheduledResult(ScheduledRun {
                    measurement_id: slot.measurement_id,
                    scheduled_ms: slot.scheduled_ms,
                    result,
                }),
                None => RecordBody::result(result, traceparent),
            };
            let _ = tx.send(Produced::Record(Box::new(body))).await;
            let _ = tx
                .send(Produced::Finished {
                    id,
                    module,
                    panicked: ran.panicked,
                })
                .await;
        });
        self.running.insert(key, task.abort_handle());
    }

    /// Persists the module set and records what happened.
    fn module_changed(
        &mut self,
        kind: &str,
        module: &str,
        r: Result<(), String>,
    ) -> Result<bool, AgentError> {
        match r {
            Ok(()) => {
                let bytes = postcard::to_stdvec(&self.modules).unwrap_or_default();
                self.outbox.put_meta(META_MODULES, &bytes);
                tracing::info!(%module, kind, "modules changed");
                self.event(kind, module)?;
                Ok(true)
            }
            Err(message) => {
                tracing::warn!(%module, kind, %message, "module command refused");
                self.event("module_command_refused", &message)?;
                Ok(false)
            }
        }
    }

    fn append_state(
        &mut self,
        id: &str,
        state: RequestState,
        detail: Option<&str>,
    ) -> Result<(), AgentError> {
        self.outbox.append(
            now_ms(),
            RecordBody::State(StateChange {
                request_id: id.to_string(),
                state,
                detail: detail.map(str::to_string),
            }),
        );
        Ok(())
    }

    /// Sends pending state changes within [`STATE_DELAY`], unless a result comes first.
    fn pump_soon(&mut self) {
        self.pump_at
            .get_or_insert_with(|| tokio::time::Instant::now() + STATE_DELAY);
    }

    /// Takes what a module run produced; true for a result (send it at once).
    fn on_produced(&mut self, p: Produced) -> Result<bool, AgentError> {
        match p {
            Produced::Record(body) => {
                let finished = body.as_result().map(|r| r.request_id.clone());
                let is_result = finished.is_some();
                if is_result {
                    self.gauges
                        .results
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.outbox.append(now_ms(), *body);
                // Marked done in the same flush as the result, so a crash cannot leave
                // a stored result plus an "interrupted" one for the same request.
                if let Some(id) = finished {
                    self.outbox.finish_command(&id);
                }
                Ok(is_result)
            }
            Produced::Finished {
                id,
                module,
                panicked,
            } => {
                self.running.remove(&id);
                if let Some(backoff) = self.restarts.record(&module, panicked) {
                    tracing::warn!(%module, ?backoff, "module panicked; restarting it with backoff");
                    self.event(
                        "module_restarting",
                        &format!("{module} panicked; next run in {} ms", backoff.as_millis()),
                    )?;
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// With no ack for a whole resend timeout, start again from the oldest record.
    fn check_resend(&mut self) {
        let timeout = Duration::from_millis(self.cfg.resend_timeout_ms);
        if self.state != SyncState::Offline
            && self
                .inflight
                .front()
                .is_some_and(|b| b.sent_at.elapsed() > timeout)
            && self.last_ack.elapsed() > timeout
        {
            tracing::info!(
                depth = self.outbox.depth(),
                "no ack within the resend timeout; resending"
            );
            self.send_from = 0;
            self.inflight.clear();
        }
    }

    /// Sends batches while the window allows. With `live_first`, records made since
    /// the connection came up go ahead of the backlog while catching up.
    async fn pump(&mut self) -> Result<(), AgentError> {
        if self.state == SyncState::Offline {
            return Ok(());
        }
        // Durable before sent: one flush covers every record appended since the last.
        self.outbox.flush();
        let first = self.outbox.first_seq().unwrap_or(u64::MAX);
        while self.inflight.len() < self.cfg.window {
            let catching_up = self.cfg.live_first && self.state == SyncState::CatchingUp;
            let mut records = Vec::new();
            let mut live = false;
            if catching_up {
                records = self
                    .outbox
                    .read_from(self.live_sent.max(first), self.cfg.batch_max_bytes);
                live = !records.is_empty();
            }
            if !live {
                let upto = if catching_up {
                    self.live_mark
                } else {
                    u64::MAX
                };
                records = self
                    .outbox
                    .read_from(self.send_from.max(first), self.cfg.batch_max_bytes);
                records.retain(|r| r.seq < upto);
            }
            let Some(last) = records.last().map(|r| r.seq) else {
                self.state = SyncState::Online;
                self.send_from = self.send_from.max(self.live_sent);
                break;
            };
            let batch = Envelope::Batch(Batch {
                epoch: self.outbox.epoch(),
                records,
            });
            let topic = wire::topic(&self.cfg.id, Kind::Out);
            if let Err(e) = self
                .client
                .publish(&topic, QoS::AtLeastOnce, false, &wire::encode(&batch))
                .await
            {
                // The request queue is full; the next tick tries again.
                tracing::debug!(error = %e, "batch not sent; retrying on the next tick");
                break;
            }
            if live {
                self.live_sent = last + 1;
            } else {
                self.send_from = last + 1;
            }
            self.inflight.push_back(InFlight {
                last_seq: last,
                sent_at: Instant::now(),
            });
        }
        Ok(())
    }

    /// Refreshes the `/metrics` gauges from the outbox.
    fn update_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let g = &self.gauges;
        g.outbox_depth.store(self.outbox.depth(), Relaxed);
        g.outbox_oldest_age_ms.store(
            self.outbox
                .oldest_at_ms()
                .map(|t| (now_ms() - t).max(0) as u64)
                .unwrap_or(0),
            Relaxed,
        );
        g.outbox_dropped.store(self.outbox.dropped(), Relaxed);
        g.connected.store(self.state != SyncState::Offline, Relaxed);
    }

    async fn heartbeat(&mut self) {
        // Offline too: that is when the outbox grows.
        self.update_gauges();
        if self.state == SyncState::Offline {
            return;
        }
        let now = now_ms();
        let hb = Envelope::Heartbeat(Heartbeat {
            sent_at_ms: now,
            system: system::snapshot(&mut self.cpu, &self.cfg.data),
            outbox_depth: self.outbox.depth(),
            outbox_oldest_age_ms: self
                .outbox
                .oldest_at_ms()
                .map(|t| (now - t).max(0) as u64)
                .unwrap_or(0),
            dropped: self.outbox.dropped(),
            outbox_condition: match self.outbox.condition() {
                Condition::Ok => None,
                Condition::DiskFull => Some("disk_full".into()),
                Condition::WriteError(e) => Some(format!("write_error: {e}")),
            },
        });
        let _ = self
            .client
            .publish(
                &wire::topic(&self.cfg.id, Kind::Heartbeat),
                QoS::AtMostOnce,
                false,
                &wire::encode(&hb),
            )
            .await;
    }

    /// Records an operator-visible event in the outbox.
    pub fn event(&mut self, kind: &str, message: &str) -> Result<(), AgentError> {
        self.outbox.append(
            now_ms(),
            RecordBody::Event(AgentEvent {
                kind: kind.into(),
                message: message.into(),
            }),
        );
        Ok(())
    }
}
