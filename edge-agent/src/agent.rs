//! The agent's main loop. It owns the transport and the outbox; module runs are
//! separate tasks that hand their records back over a channel.
//!
//! Sync is an explicit state machine, [`crate::sync::SyncCore`], with no I/O: this loop
//! flushes and publishes around it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use embedded_svc::mqtt::client::asynch::{Client, Connection, Event, EventPayload, Publish, QoS};
use imn_probes::{system, Context};
use imn_proto::now_ms;
use imn_proto::policy::{TargetPolicy, MAX_NETWORKS, MAX_RULES};
use imn_proto::results::ModuleOutcome;
use imn_proto::wire::{
    self, Ack, AgentEvent, Batch, Command, CommandKind, Envelope, Heartbeat, Hello, Kind,
    ModuleResult, RecordBody, RequestState, ScheduledRun, StateChange, Status, UpdateUp,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::config::AgentConfig;
use crate::events;
use crate::fresh::{self, ControlIds, Refusal, META_CONTROL_IDS};
use crate::modules::LoadedModules;
use crate::outbox::{Condition, Outbox, OutboxError, OutboxLimits, SledOutbox};
use crate::runqueue::{self, Budget, RunQueue, Submitted};
use crate::schedule::{self, Schedules, META_SCHEDULES, META_SCHEDULE_POLICY};
use crate::supervisor::{self, Restarts};
pub use crate::sync::SyncState;
use crate::sync::{SyncCore, SyncSettings};
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
    /// Where sync stands, what is in flight, what goes next.
    sync: SyncCore,
    produced_tx: mpsc::Sender<Produced>,
    produced_rx: mpsc::Receiver<Produced>,
    /// Runs in progress, so a cancel can stop them.
    running: HashMap<String, AbortHandle>,
    /// The agent's budget across runs: which run, and which wait.
    queue: RunQueue<PendingRun>,
    /// Ids of recent control commands (persisted), so none is applied twice.
    control_ids: ControlIds,
    /// The last connection error logged while offline: each new kind of failure is
    /// logged once, not once per retry.
    conn_error: Option<String>,
    cpu: system::CpuSampler,
    /// Loaded modules and their settings (persisted).
    modules: LoadedModules,
    /// The last process left `DATA/running` behind: it died rather than stopped.
    died_last_time: bool,
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
    /// The policy the schedule set came with (persisted beside it): every scheduled
    /// run checks its addresses against it. Open when the set came without one.
    schedule_policy: Arc<TargetPolicy>,
    /// The last schedule set version refused whole, so its resends are not reported
    /// again.
    refused_schedules: Option<u64>,
    /// Over-the-air updates and remote settings: the download, what to report.
    update: crate::update::Updater,
    /// Set when the agent stops to have its supervisor start a staged release or
    /// staged settings.
    restart: Arc<std::sync::atomic::AtomicBool>,
    /// Refusals already reported as events, so the backend's resends are not.
    reported_refusals: Vec<String>,
}

/// A run accepted and not yet started: what it runs, for whom, under which policy.
struct PendingRun {
    id: String,
    module: String,
    params_json: String,
    timeout_ms: u64,
    received_ms: i64,
    traceparent: Option<String>,
    slot: Option<SlotOf>,
    policy: Arc<TargetPolicy>,
    /// Past this the run does not start (a command's deadline).
    deadline_ms: Option<i64>,
}

/// A scheduled run: which measurement and slot its result belongs to.
struct SlotOf {
    measurement_id: String,
    scheduled_ms: i64,
}

/// The record of a run's result: a scheduled run's names its measurement and slot.
fn result_body(
    slot: Option<SlotOf>,
    result: ModuleResult,
    traceparent: Option<String>,
) -> RecordBody {
    match slot {
        Some(slot) => RecordBody::ScheduledResult(ScheduledRun {
            measurement_id: slot.measurement_id,
            scheduled_ms: slot.scheduled_ms,
            result,
        }),
        None => RecordBody::result(result, traceparent),
    }
}

/// How long a state change may wait for the run's result before it is sent alone.
const STATE_DELAY: Duration = Duration::from_millis(2);

/// The longest the schedule timer sleeps; the tick checks the slots anyway.
const MAX_SCHED_SLEEP_MS: i64 = 3_600_000;

/// Makes the data directory the agent's own: the directory and what is in it (the
/// outbox's files, the id) readable by its user only. Files created later are so by the
/// umask the agent sets at start; this fixes what an older agent left. A directory the
/// agent cannot change is reported, not fatal.
fn restrict_data_dir(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    fn walk(p: &std::path::Path, depth: u32) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() {
            0o700
        } else if meta.is_file() {
            mode & 0o700
        } else {
            // Symlinks and the rest are left alone.
            return;
        };
        if mode != want {
            if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(want)) {
                tracing::warn!(path = %p.display(), error = %e, "cannot restrict permissions to the agent's user");
            }
        }
        if meta.is_dir() && depth > 0 {
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    walk(&e.path(), depth - 1);
                }
            }
        }
    }
    walk(dir, 0);
    // Only what the agent makes: the directory may hold other things (`--data .`).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name == "outbox"
                || name.starts_with("outbox.corrupt-")
                || name.starts_with("agent-id")
                || name == crate::crash::FILE
                || name == crate::crash::RUNNING
            {
                walk(&e.path(), 3);
            }
        }
    }
}

/// Why a command's policy is refused: more than the agent will hold.
fn policy_too_large(p: &TargetPolicy) -> Option<String> {
    (!p.within_limits()).then(|| {
        let networks: usize = p.rules.iter().map(|r| r.allow.len() + r.deny.len()).sum();
        format!(
            "its policy has {} rules and {networks} networks; the agent takes at most {MAX_RULES} rules and {MAX_NETWORKS} networks",
            p.rules.len()
        )
    })
}

/// At most `max` bytes of `s` (cut at a character), for logs and events.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The name of a command's kind, for logs and events.
fn kind_name(k: &CommandKind) -> &'static str {
    match k {
        CommandKind::Run { .. } => "run",
        CommandKind::Cancel { .. } => "cancel",
        CommandKind::Load { .. } => "load",
        CommandKind::Unload { .. } => "unload",
        CommandKind::Configure { .. } => "configure",
        CommandKind::Schedules { .. } => "schedules",
        CommandKind::Update { .. } => "update",
        CommandKind::Settings { .. } => "settings",
        CommandKind::LoadWasm { .. } => "load_wasm",
    }
}

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
        restrict_data_dir(&cfg.data);
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
        imn_resolver::set_nameservers(cfg.nameserver_addrs()?);
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
        let stored_modules = outbox
            .get_meta(META_MODULES)
            .and_then(|b| postcard::from_bytes::<LoadedModules>(&b).ok());
        #[allow(unused_mut)]
        let mut modules = stored_modules
            .clone()
            .map(LoadedModules::retain_built_in)
            .unwrap_or_default();
        let ctx = Context {
            data_dir: cfg.data.clone(),
            ..Context::default()
        };
        // WebAssembly modules come back from their packages on disk, with the settings
        // the stored set kept for them.
        #[cfg(feature = "wasm")]
        {
            crate::wasm::load_stored(&cfg, &ctx.wasm, &mut modules);
            if let Some(stored) = &stored_modules {
                modules.keep_settings_of_wasm(stored);
            }
        }
        let _ = &stored_modules;
        let mut schedules: Schedules = outbox
            .get_meta(META_SCHEDULES)
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        // A set stored without a policy (by an agent before policies, or from a version
        // 1 backend) runs open; one whose policy cannot be read does not run at all:
        // version 0 makes the backend send it again, with its policy.
        let schedule_policy = match outbox.get_meta(META_SCHEDULE_POLICY) {
            None => None,
            Some(b) => match postcard::from_bytes::<Option<TargetPolicy>>(&b) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "the schedule set's stored policy is unreadable; dropping the set until the backend sends it again");
                    schedules = Schedules::default();
                    None
                }
            },
        };
        // Sets stored by older agents were never checked here, and a set stored by a
        // build with more modules (full, then router) may name one this build lacks.
        let stored = schedules.entries.len();
        schedules.entries.retain(|e| match schedule::check(&e.schedule) {
            Ok(()) => true,
            Err(r) => {
                tracing::warn!(measurement = %e.schedule.measurement_id, refused = %r, "stored schedule refused");
                false
            }
        });
        if schedules.entries.len() != stored {
            // The hello then names no set, so the backend sends it again, and the
            // check of a set that arrives reports each refusal to it.
            schedules.version = 0;
        }
        let control_ids = outbox
            .get_meta(META_CONTROL_IDS)
            .map(|b| ControlIds::from_bytes(&b))
            .unwrap_or_default();
        let queue = RunQueue::new(Budget {
            max_runs: cfg.max_runs as usize,
            max_queued: cfg.max_queued_runs as usize,
            max_rate: cfg.max_probe_rate,
        });
        let (cfg_data, cfg_keys, cfg_supervised, cfg_rate, cfg_reserve) = (
            cfg.data.clone(),
            cfg.update_keys.clone(),
            cfg.supervised(),
            cfg.update_rate,
            cfg.disk_reserve_bytes,
        );
        let sync = SyncCore::new(
            SyncSettings {
                window: cfg.window,
                live_first: cfg.live_first,
                resend_timeout: Duration::from_millis(cfg.resend_timeout_ms),
                batch_max_bytes: cfg.batch_max_bytes,
            },
            Instant::now(),
        );
        Ok(Agent {
            cfg,
            outbox,
            client,
            conn: Some(conn),
            sync,
            produced_tx,
            produced_rx,
            running: HashMap::new(),
            queue,
            control_ids,
            conn_error: None,
            cpu: system::CpuSampler::new(),
            modules,
            died_last_time: false,
            restarts: Restarts::default(),
            ctx,
            pump_at: None,
            gauges: Default::default(),
            schedules,
            sched_at: None,
            schedule_policy: Arc::new(schedule_policy.unwrap_or_default()),
            refused_schedules: None,
            update: crate::update::Updater::new(
                &cfg_data,
                cfg_keys,
                cfg_supervised,
                cfg_rate,
                cfg_reserve,
            ),
            restart: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            reported_refusals: Vec::new(),
        })
    }

    /// Set (once `run` returns) when the agent stopped so that its supervisor starts
    /// a staged release or staged settings: exit with [`crate::update::EXIT_RESTART`].
    pub fn restart_requested(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.restart.clone()
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tracing::info!(agent = %self.cfg.id, epoch = self.outbox.epoch(), depth = self.outbox.depth(), "agent starting");
        let replaced = match self.outbox.replaced_epoch {
            Some(old) => format!(" {old:016x}, replaced by {:016x}", self.outbox.epoch()),
            None => String::new(),
        };
        if let Some((aside, why)) = self.outbox.recovered_from.clone() {
            self.emit(events::OutboxCorrupt {
                why: &why,
                aside: &aside,
                replaced: &replaced,
            });
        } else if let Some(old) = self.outbox.replaced_epoch {
            let epoch = self.outbox.epoch();
            self.emit(events::OutboxLost {
                lost_epoch: old,
                epoch,
            });
        }
        // Here, not in `new`: a start that fails (a bad TLS key, say) must not leave a
        // marker that makes the last clean stop read as a death. The outbox's lock
        // means no other agent runs on this directory.
        self.died_last_time = crate::crash::mark_running(&self.cfg.data);
        self.recover_interrupted()?;
        if let Some(f) = self.update.take_unreported_failure() {
            self.emit(events::LifecycleFailed {
                kind: &f.kind,
                version: &f.version,
                reason: &f.reason,
            });
        }
        // The reports above are durable before the marker names the new epoch.
        self.flush().await;
        self.outbox.commit_marker();
        self.run_due_slots().await?;
        self.update_gauges();
        #[cfg(feature = "metrics")]
        if let Some(listen) = self.cfg.metrics_listen {
            let (gauges, id) = (self.gauges.clone(), self.cfg.id.clone());
            let at =
                imn_prom::serve_metrics(listen, std::sync::Arc::new(move || gauges.render(&id)))
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
                    let mut result = self.on_produced(p).await?;
                    // Drain whatever else is ready before sending, to fill batches.
                    while let Ok(p) = self.produced_rx.try_recv() {
                        result |= self.on_produced(p).await?;
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
                    self.run_due_slots().await?;
                }
                _ = hb.tick() => self.heartbeat().await,
                _ = sleep_until_some(self.update.fetch_at().map(tokio::time::Instant::from_std)),
                    if self.update.fetch_at().is_some() => {
                    self.update_fetch().await;
                }
                _ = tick.tick() => {
                    // Also here, in case the wall clock moved under the timer.
                    self.run_due_slots().await?;
                    // Durable within a tick even while offline.
                    self.flush().await;
                    self.check_resend();
                    self.pump().await?;
                    // Acked records are deleted here, a little at a time while batches
                    // are in flight and more when idle: a drain does not wait for them.
                    let idle = self.sync.is_idle();
                    if self.outbox.compact(if idle { 4096 } else { 512 }) {
                        tick.reset_after(Duration::from_millis(if idle { 10 } else { 250 }));
                    }
                }
                _ = &mut shutdown => break,
            }
            if self.restart.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
        }
        // Leave fewer acked records behind (a restart would send them again).
        self.outbox.compact(50_000);
        self.flush_with(true).await;
        crate::crash::mark_stopped(&self.cfg.data);
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

    /// Runs the command log holds as started but without a result: the agent stopped
    /// (crash, kill or power loss) while they ran or waited. Each is reported once, as a
    /// `run_interrupted` event naming the request or slot, and as a failed result with
    /// that reason, so the backend marks it failed and the slot is accounted for.
    fn recover_interrupted(&mut self) -> Result<(), AgentError> {
        let cause = crate::crash::interrupted_cause(
            crate::crash::take_last_panic(&self.cfg.data),
            self.died_last_time,
        );
        let why = format!("run_interrupted: {cause}");
        let now = now_ms();
        for (key, entry) in self.outbox.unfinished_commands() {
            let slot = key
                .strip_prefix(crate::outbox::SLOT_PREFIX)
                .and_then(|run_id| run_id.rsplit_once('@'))
                .and_then(|(m, at)| {
                    Some(SlotOf {
                        measurement_id: m.to_string(),
                        scheduled_ms: at.parse().ok()?,
                    })
                });
            let result = |id: String| ModuleResult {
                request_id: id,
                module: entry.module.clone(),
                received_ms: entry.received_ms,
                started_ms: entry.received_ms,
                finished_ms: now,
                outcome: ModuleOutcome::Failed(why.clone()),
            };
            match slot {
                Some(slot) => {
                    let run_id = ScheduledRun::run_id(&slot.measurement_id, slot.scheduled_ms);
                    self.emit(events::RunInterrupted::Slot {
                        run_id: &run_id,
                        measurement: &slot.measurement_id,
                        slot_ms: slot.scheduled_ms,
                        cause: &cause,
                    });
                    // Whatever the stored progress says, this slot does not run again.
                    if self.schedules.ran(&slot.measurement_id, slot.scheduled_ms) {
                        self.save_schedules();
                    }
                    self.outbox
                        .append(now, result_body(Some(slot), result(run_id.clone()), None));
                    self.outbox.finish_slot(&run_id);
                }
                None => {
                    self.emit(events::RunInterrupted::Request {
                        id: &key,
                        cause: &cause,
                    });
                    self.outbox
                        .append(now, RecordBody::Result(result(key.clone())));
                    self.outbox.finish_command(&key);
                }
            }
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
                    if self.sync.is_connected() {
                        tracing::warn!(error = %e, "disconnected");
                    } else if self.conn_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(error = %e, broker = %self.cfg.broker, "cannot connect; retrying");
                    }
                    self.conn_error = Some(e);
                }
                self.sync.on_disconnected();
                self.update.on_disconnected();
            }
            EventPayload::Received { topic, data, .. } => {
                let runs = self.running.len();
                match topic.and_then(wire::parse_topic) {
                    Some((agent, kind)) if agent == self.cfg.id => {
                        if self.on_message(kind, data).await? {
                            // The schedule set or modules it announces are durable first.
                            self.flush().await;
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
        // Everything unacked goes again after every reconnect: the broker kept nothing.
        self.sync
            .on_connected(self.outbox.next_seq(), Instant::now());
        self.send_hello().await;
        self.heartbeat().await;
        self.update.on_connected();
        self.update.mark_healthy();
        self.send_lifecycle().await;
    }

    /// What the agent runs and where its update stands, on `upd`.
    async fn send_lifecycle(&mut self) {
        if !self.sync.is_connected() {
            return;
        }
        let env = Envelope::Update(UpdateUp::Status(self.update.status()));
        let _ = self
            .client
            .publish(
                &wire::topic(&self.cfg.id, Kind::Update),
                QoS::AtLeastOnce,
                false,
                &wire::encode(&env),
            )
            .await;
    }

    /// Asks for the next chunk of the release being downloaded, if it is time.
    async fn update_fetch(&mut self) {
        if !self.sync.is_connected() {
            // Asked again on the next connect.
            self.update.on_disconnected();
            return;
        }
        if let Some(fetch) = self.update.fetch(std::time::Instant::now()) {
            let _ = self
                .client
                .publish(
                    &wire::topic(&self.cfg.id, Kind::Update),
                    QoS::AtMostOnce,
                    false,
                    &wire::encode(&Envelope::Update(fetch)),
                )
                .await;
        }
    }

    /// A refused or failed update or settings change: an event once per reason, and
    /// the status, so a rollout sees it.
    async fn lifecycle_refused(&mut self, kind: &str, reason: String) {
        if !self.reported_refusals.contains(&reason) {
            if self.reported_refusals.len() >= 16 {
                self.reported_refusals.remove(0);
            }
            self.reported_refusals.push(reason.clone());
            self.emit(events::LifecycleFailed {
                kind,
                version: "",
                reason: &reason,
            });
        }
        self.send_lifecycle().await;
    }

    async fn on_chunk(&mut self, c: wire::Chunk) {
        match self.update.on_chunk(c) {
            crate::update::Progress::None | crate::update::Progress::More => {
                self.update_fetch().await
            }
            crate::update::Progress::Staged(version) => {
                tracing::info!(%version, received = self.update.received, "release staged; stopping for the supervisor to start it");
                self.send_lifecycle().await;
                self.restart
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            crate::update::Progress::Failed { reason, .. } => {
                self.lifecycle_refused("update_failed", reason).await;
            }
        }
    }

    /// Identity and capabilities: sent on connect and whenever the modules change.
    async fn send_hello(&mut self) {
        if !self.sync.is_connected() {
            return;
        }
        let hello = Envelope::Hello(Hello {
            agent_id: self.cfg.id.clone(),
            version: crate::update::VERSION.into(),
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
            features: vec![
                wire::features::POLICY.into(),
                wire::features::BUDGETS.into(),
                wire::features::FRESH_COMMANDS.into(),
                #[cfg(feature = "wasm")]
                imn_proto::wasm::FEATURE.into(),
            ],
            limits: self.cfg.limits(),
            schedule_policy: TargetPolicy::digest(Some(&self.schedule_policy)),
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
    async fn on_message(&mut self, kind: Kind, data: &[u8]) -> Result<bool, AgentError> {
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
            (Kind::Cmd, Envelope::Command(cmd)) => self.on_command(cmd).await,
            (Kind::Cmd, Envelope::Chunk(c)) => {
                self.on_chunk(c).await;
                Ok(false)
            }
            (kind, _) => {
                tracing::warn!(kind = kind.as_str(), "envelope does not match its topic");
                Ok(false)
            }
        }
    }

    fn on_ack(&mut self, ack: &Ack) -> Result<(), AgentError> {
        let deleted = self.outbox.ack(ack);
        self.sync.on_ack(ack, Instant::now());
        tracing::debug!(deleted, depth = self.outbox.depth(), "ack");
        Ok(())
    }

    /// Logs and reports a command the agent will not obey.
    fn refuse_command(&mut self, cmd: &Command, r: &Refusal) -> Result<(), AgentError> {
        let kind = kind_name(&cmd.kind);
        let id = clip(&cmd.id, fresh::MAX_ID_BYTES);
        self.emit(events::CommandRefused {
            id,
            kind,
            issued_ms: cmd.issued_ms,
            refusal: r,
        });
        Ok(())
    }

    /// Returns true when the loaded modules changed (hello must go out again).
    async fn on_command(&mut self, cmd: Command) -> Result<bool, AgentError> {
        let now = now_ms();
        // Fresh and unrepeated, or not at all.
        if matches!(cmd.kind, CommandKind::Run { .. }) {
            if cmd.id.starts_with(crate::outbox::SLOT_PREFIX) {
                let r = fresh::Refusal {
                    reason: "reserved_id",
                    message: format!(
                        "a run's id may not start with {:?}: the command log keeps that for scheduled slots",
                        crate::outbox::SLOT_PREFIX
                    ),
                    skew_ms: None,
                };
                self.refuse_command(&cmd, &r)?;
                return Ok(false);
            }
            if let Err(r) = fresh::check_run(
                &cmd.id,
                cmd.issued_ms,
                self.outbox.forgotten_before_ms(),
                self.control_ids.newest(),
            ) {
                self.refuse_command(&cmd, &r)?;
                return Ok(false);
            }
            self.control_ids.saw(cmd.issued_ms);
        } else if let Err(r) = self.control_ids.check(&cmd.id, cmd.issued_ms) {
            self.refuse_command(&cmd, &r)?;
            return Ok(false);
        }
        let bytes = self.control_ids.to_bytes();
        self.outbox.put_meta(META_CONTROL_IDS, &bytes);
        let policy = cmd.policy;
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
                let refused = if !self.modules.is_loaded(&module) {
                    Some(self.modules.not_loaded(&module))
                } else {
                    policy
                        .as_ref()
                        .and_then(policy_too_large)
                        .map(|why| format!("command refused: {why}"))
                };
                if let Some(message) = refused {
                    tracing::warn!(request = %cmd.id, %message, "run refused");
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
                self.submit_run(PendingRun {
                    id: cmd.id,
                    module,
                    params_json,
                    timeout_ms,
                    received_ms: now,
                    traceparent: cmd.traceparent,
                    slot: None,
                    policy: Arc::new(policy.unwrap_or_default()),
                    deadline_ms: cmd.deadline_ms,
                })
                .await;
                Ok(false)
            }
            CommandKind::Cancel { request_id } => {
                if let Some(task) = self.running.remove(&request_id) {
                    task.abort();
                    self.append_state(&request_id, RequestState::Cancelled, None)?;
                    self.outbox.finish_command(&request_id);
                    let ready = self.queue.finish(&request_id);
                    self.start_runs(ready).await?;
                } else if let Some(run) = self.queue.cancel(&request_id) {
                    tracing::info!(request = %request_id, "queued run cancelled");
                    match run.slot {
                        None => {
                            self.append_state(&request_id, RequestState::Cancelled, None)?;
                            self.outbox.finish_command(&request_id);
                        }
                        // A slot has a result, even cancelled: its gap is explained.
                        Some(slot) => self.append_failed(
                            &run.id,
                            &run.module,
                            run.received_ms,
                            Some(slot),
                            None,
                            "cancelled".to_string(),
                        ),
                    }
                    let ready = self.queue.ready();
                    self.start_runs(ready).await?;
                }
                Ok(false)
            }
            CommandKind::Load { module } => {
                let r = self.modules.load(&module);
                self.module_changed("module_loaded", &module, r)
            }
            CommandKind::LoadWasm { package } => {
                #[cfg(feature = "wasm")]
                let (module, r) =
                    crate::wasm::load(&self.cfg, &self.ctx.wasm, &mut self.modules, &package);
                #[cfg(not(feature = "wasm"))]
                let (module, r) = {
                    let _ = package;
                    (
                        "?".to_string(),
                        Err(
                            "this agent's build has no WebAssembly runtime (feature wasm)"
                                .to_string(),
                        ),
                    )
                };
                self.module_changed("module_loaded", &module, r)
            }
            CommandKind::Unload { module } => {
                // A WebAssembly module's package goes too, also one kept on disk that
                // did not load (the name is checked before it names a file).
                #[cfg(feature = "wasm")]
                if imn_proto::wasm::check_name(&module).is_ok() {
                    crate::wasm::unload(&self.cfg, &self.ctx.wasm, &module);
                }
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
            CommandKind::Update { rollout, manifest } => {
                match self.update.offer(rollout, manifest) {
                    Ok(started) => {
                        // Also for an offer already in hand: the backend sees it is.
                        self.send_lifecycle().await;
                        if started {
                            self.update_fetch().await;
                        }
                    }
                    Err(reason) => self.lifecycle_refused("update_refused", reason).await,
                }
                Ok(false)
            }
            CommandKind::Settings { version, settings } => {
                let s = crate::config::RemoteSettings { version, settings };
                match self.update.offer_settings(s, &self.cfg) {
                    Ok(true) => {
                        tracing::info!(
                            version,
                            "new settings staged; stopping for the supervisor to try them"
                        );
                        self.restart
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(false) => self.send_lifecycle().await,
                    Err(reason) => self.lifecycle_refused("settings_failed", reason).await,
                }
                Ok(false)
            }
            CommandKind::Schedules { version, schedules } => {
                let had = self.schedules.version;
                if version <= had {
                    // Not newer: the backend has not seen the hello with this agent's
                    // version (or lost track of it, with a new store). The hello
                    // tells it, and stops its resends.
                    tracing::debug!(version, had, "schedule set not newer; hello again");
                    return Ok(true);
                }
                let whole = if schedules.len() > schedule::MAX_SCHEDULES {
                    Some(format!(
                        "{} schedules; the agent takes at most {}",
                        schedules.len(),
                        schedule::MAX_SCHEDULES
                    ))
                } else {
                    policy.as_ref().and_then(policy_too_large)
                };
                if let Some(why) = whole {
                    // The set already running stays; the backend's resends of this
                    // version are refused quietly.
                    let first = self.refused_schedules != Some(version);
                    self.refused_schedules = Some(version);
                    self.emit(events::SchedulesRefused {
                        version,
                        why: &why,
                        first,
                    });
                    return Ok(false);
                }
                let mut kept = Vec::with_capacity(schedules.len());
                for s in schedules {
                    match schedule::check(&s) {
                        Ok(()) => kept.push(s),
                        Err(r) => {
                            let measurement = clip(&s.measurement_id, 128);
                            self.emit(events::ScheduleRefused {
                                measurement,
                                field: r.field,
                                rule: &r.rule.to_string(),
                            });
                        }
                    }
                }
                self.schedules.apply(&self.cfg.id, version, kept, now);
                // The policy first: a crash between the two writes leaves the old set
                // under the new rules, never the new set under the old ones.
                let bytes = postcard::to_stdvec(&policy).unwrap_or_default();
                self.outbox.put_meta(META_SCHEDULE_POLICY, &bytes);
                self.schedule_policy = Arc::new(policy.unwrap_or_default());
                self.save_schedules();
                let n = self.schedules.entries.len();
                self.emit(events::SchedulesUpdated {
                    version,
                    schedules: n,
                });
                self.run_due_slots().await?;
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
    async fn run_due_slots(&mut self) -> Result<(), AgentError> {
        let now = now_ms();
        let due = self.schedules.take_due(&self.cfg.id, now);
        if !due.runs.is_empty() || !due.missed.is_empty() {
            self.save_schedules();
        }
        for m in due.missed {
            self.emit(events::ScheduleMissed { missed: &m });
        }
        for run in due.runs {
            let s = run.schedule;
            let id = ScheduledRun::run_id(&s.measurement_id, run.scheduled_ms);
            // Logged as started (durable with the schedule's progress, before it runs):
            // a restart before its result reports it interrupted, not missed.
            if !self.outbox.accept_slot(&id, &s.module, now) {
                tracing::warn!(run = %id, "slot started before; not run again");
                continue;
            }
            let slot = SlotOf {
                measurement_id: s.measurement_id,
                scheduled_ms: run.scheduled_ms,
            };
            if !self.modules.is_loaded(&s.module) {
                let message = self.modules.not_loaded(&s.module);
                self.append_failed(&id, &s.module, now, Some(slot), None, message);
                continue;
            }
            let (params_json, timeout_ms) =
                self.modules
                    .prepare(&s.module, &s.params_json, s.timeout_ms);
            self.submit_run(PendingRun {
                id,
                module: s.module,
                params_json,
                timeout_ms,
                received_ms: now,
                traceparent: None,
                slot: Some(slot),
                policy: self.schedule_policy.clone(),
                deadline_ms: None,
            })
            .await;
        }
        self.sched_at = self.schedules.next_run_ms(&self.cfg.id).map(|at| {
            let wait = at.saturating_sub(now_ms()).clamp(0, MAX_SCHED_SLEEP_MS);
            tokio::time::Instant::now() + Duration::from_millis(wait as u64)
        });
        Ok(())
    }

    /// Appends a run's failed result: a request's (and its command is done), or a
    /// scheduled slot's.
    fn append_failed(
        &mut self,
        id: &str,
        module: &str,
        received_ms: i64,
        slot: Option<SlotOf>,
        traceparent: Option<String>,
        message: String,
    ) {
        let now = now_ms();
        let result = ModuleResult {
            request_id: id.to_string(),
            module: module.to_string(),
            received_ms,
            started_ms: now,
            finished_ms: now,
            outcome: ModuleOutcome::Failed(message),
        };
        let scheduled = slot.is_some();
        self.outbox
            .append(now, result_body(slot, result, traceparent));
        if scheduled {
            self.outbox.finish_slot(id);
        } else {
            self.outbox.finish_command(id);
        }
    }

    /// Hands a run to the budget: it starts now, waits its turn, or (the queue full)
    /// fails at once. A run whose declared rate alone is over `max_probe_rate` has its
    /// `rate` lowered to it when it has one; otherwise it runs alone.
    async fn submit_run(&mut self, mut run: PendingRun) {
        let (rate, clamped) =
            runqueue::declared_rate(&run.module, &run.params_json, self.cfg.max_probe_rate);
        if let Some(params) = clamped {
            tracing::info!(run = %run.id, module = %run.module, max_probe_rate = self.cfg.max_probe_rate, "rate lowered to the agent's max_probe_rate");
            run.params_json = params;
        }
        let id = run.id.clone();
        match self.queue.submit(id.clone(), rate, run) {
            Submitted::Start(run) => {
                if let Err(e) = self.start_runs(vec![(id, run)]).await {
                    tracing::error!(error = %e, "cannot start a run");
                }
            }
            Submitted::Queued => {
                tracing::debug!(run = %id, running = self.queue.running(), queued = self.queue.queued(), "run waits for the budget");
            }
            Submitted::Full(run) => {
                let message = format!(
                    "agent queue full (max_queued_runs = {})",
                    self.cfg.max_queued_runs
                );
                tracing::warn!(run = %id, module = %run.module, "{message}");
                self.append_failed(
                    &run.id,
                    &run.module,
                    run.received_ms,
                    run.slot,
                    run.traceparent,
                    message,
                );
            }
        }
    }

    /// Starts runs the budget let through. One whose deadline passed while it waited
    /// expires instead, and frees its place for the next.
    async fn start_runs(&mut self, mut ready: Vec<(String, PendingRun)>) -> Result<(), AgentError> {
        // Group commit: one sync makes durable everything the runs depend on (the
        // command log, the schedule's progress, the control ids) before any starts.
        if !ready.is_empty() {
            self.flush().await;
        }
        while !ready.is_empty() {
            let mut next = Vec::new();
            for (id, run) in ready {
                if run.deadline_ms.is_some_and(|d| d < now_ms()) {
                    self.append_state(
                        &id,
                        RequestState::Expired,
                        Some("deadline passed while the run waited for the agent's budget"),
                    )?;
                    self.outbox.finish_command(&id);
                    next.extend(self.queue.finish(&id));
                    continue;
                }
                self.spawn_run(run);
            }
            ready = next;
        }
        Ok(())
    }

    /// Runs a module in its own task; its records come back over `produced_tx`. A
    /// request's run reports `running` and then its result; a scheduled run (`slot`)
    /// has no request on the backend and reports only its result.
    fn spawn_run(&mut self, run: PendingRun) {
        let PendingRun {
            id,
            module,
            params_json,
            timeout_ms,
            received_ms,
            traceparent,
            slot,
            policy,
            deadline_ms: _,
        } = run;
        // A module that panicked recently waits out its backoff first.
        let backoff = self.restarts.delay(&module);
        let tx = self.produced_tx.clone();
        let ctx = Context {
            policy,
            ..self.ctx.clone()
        };
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
            let body = result_body(slot, result, traceparent);
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
                self.emit(events::ModulesChanged { kind, module });
                Ok(true)
            }
            Err(message) => {
                self.emit(events::ModuleCommandRefused {
                    kind,
                    module,
                    message: &message,
                });
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
    async fn on_produced(&mut self, p: Produced) -> Result<bool, AgentError> {
        match p {
            Produced::Record(body) => {
                let finished = body.as_result().map(|r| r.request_id.clone());
                let scheduled = matches!(*body, RecordBody::ScheduledResult(_));
                let is_result = finished.is_some();
                if is_result {
                    self.gauges
                        .results
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.outbox.append(now_ms(), *body);
                // Marked done in the same flush as the result, so a crash cannot leave
                // a stored result plus an "interrupted" one for the same request.
                match finished {
                    Some(id) if scheduled => self.outbox.finish_slot(&id),
                    Some(id) => self.outbox.finish_command(&id),
                    None => {}
                }
                Ok(is_result)
            }
            Produced::Finished {
                id,
                module,
                panicked,
            } => {
                // A cancelled run was taken off already (its task may still have
                // finished first).
                if self.running.remove(&id).is_some() {
                    let ready = self.queue.finish(&id);
                    self.start_runs(ready).await?;
                }
                if let Some(backoff) = self.restarts.record(&module, panicked) {
                    self.emit(events::ModuleRestarting {
                        module: &module,
                        backoff,
                    });
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Makes every write since the last flush durable (see [`Outbox::flush`]). The
    /// writes are made here; the disk sync (fdatasync, which can take long on flash)
    /// runs on a blocking thread, so module tasks on this runtime (ping's timing) go on
    /// meanwhile. Returns once the sync did: nothing is sent before.
    async fn flush(&mut self) {
        self.flush_with(false).await
    }

    /// [`Self::flush`]; `all`: the lazy deletes of acked records too (at shutdown).
    async fn flush_with(&mut self, all: bool) {
        let Some(sync) = self.outbox.begin_flush(all) else {
            return;
        };
        let result = match tokio::task::spawn_blocking(move || sync.run()).await {
            Ok(r) => r,
            // A panic in sled stays a panic, as it was on this thread.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(format!("the flush did not run: {e}")),
        };
        self.outbox.end_flush(result);
    }

    /// With no ack for a whole resend timeout, start again from the oldest record.
    fn check_resend(&mut self) {
        if self.sync.check_resend(Instant::now()) {
            tracing::info!(
                depth = self.outbox.depth(),
                "no ack within the resend timeout; resending"
            );
        }
    }

    /// Sends batches while the window allows. With `live_first`, records made since
    /// the connection came up go ahead of the backlog while catching up.
    async fn pump(&mut self) -> Result<(), AgentError> {
        if !self.sync.is_connected() {
            return Ok(());
        }
        // Durable before sent: one flush covers every record appended since the last.
        self.flush().await;
        let first = self.outbox.first_seq().unwrap_or(u64::MAX);
        while let Some(planned) = self.sync.next_batch(&mut self.outbox, first) {
            let (last, live) = (planned.last_seq(), planned.live);
            let batch = Envelope::Batch(Batch {
                epoch: self.outbox.epoch(),
                records: planned.records,
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
            self.sync.sent(last, live, Instant::now());
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
        g.connected.store(self.sync.is_connected(), Relaxed);
    }

    async fn heartbeat(&mut self) {
        // Offline too: that is when the outbox grows.
        self.update_gauges();
        if !self.sync.is_connected() {
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

    /// Logs an operational event and appends its record to the outbox (see
    /// [`events`]).
    pub(crate) fn emit(&mut self, event: impl events::AgentEvent) {
        event.log();
        if let Some((kind, message)) = event.record() {
            self.outbox.append(
                now_ms(),
                RecordBody::Event(AgentEvent {
                    kind: kind.into(),
                    message,
                }),
            );
        }
    }
}
