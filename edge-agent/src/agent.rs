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
use imn_modules::catalog;
use imn_modules::now_ms;
use imn_modules::results::ModuleOutcome;
use imn_modules::wire::{
    self, Ack, AgentEvent, Batch, Command, CommandKind, Envelope, Heartbeat, Hello, Kind,
    ModuleInfo, ModuleResult, RecordBody, RequestState, StateChange, Status,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::config::AgentConfig;
use crate::outbox::{Outbox, OutboxError, SledOutbox};
use crate::supervisor;
use crate::system;
use crate::transport::{self, ConnectOptions, MqttClient, MqttConnection};

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

/// A record made by a module task, for the main loop to store.
enum Produced {
    Record(Box<RecordBody>),
    /// The run finished; its result is the preceding record.
    Finished(String),
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
    produced_tx: mpsc::Sender<Produced>,
    produced_rx: mpsc::Receiver<Produced>,
    running: HashMap<String, AbortHandle>,
    cpu: system::CpuSample,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data).map_err(|source| AgentError::DataDir {
            path: cfg.data.clone(),
            source,
        })?;
        let outbox = SledOutbox::open(&cfg.data)?;
        let (host, port) = cfg.broker_addr()?;
        let will = wire::encode(&Envelope::Status(Status {
            online: false,
            at_ms: now_ms(),
        }));
        let (client, conn) = transport::connect(ConnectOptions {
            client_id: cfg.id.clone(),
            host,
            port,
            token: cfg.token.clone(),
            last_will: (wire::topic(&cfg.id, Kind::Status), will),
            connect_timeout_s: cfg.connect_timeout_s,
            max_packet_bytes: (cfg.batch_max_bytes * 2).max(1 << 20),
        });
        let (produced_tx, produced_rx) = mpsc::channel(1024);
        Ok(Agent {
            cfg,
            outbox,
            client,
            conn: Some(conn),
            state: SyncState::Offline,
            send_from: 0,
            inflight: VecDeque::new(),
            last_ack: Instant::now(),
            produced_tx,
            produced_rx,
            running: HashMap::new(),
            cpu: system::cpu_sample(),
        })
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tracing::info!(agent = %self.cfg.id, epoch = self.outbox.epoch(), depth = self.outbox.depth(), "agent starting");
        self.recover_interrupted()?;
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
                    self.on_produced(p)?;
                    // Drain whatever else is ready before sending, to fill batches.
                    while let Ok(p) = self.produced_rx.try_recv() {
                        self.on_produced(p)?;
                    }
                    self.pump().await?;
                }
                _ = hb.tick() => self.heartbeat().await,
                _ = tick.tick() => {
                    self.check_resend();
                    self.pump().await?;
                }
                _ = &mut shutdown => break,
            }
        }
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
                    outcome: ModuleOutcome::Failed(
                        "the agent restarted while the module ran".into(),
                    ),
                }),
            )?;
            self.outbox.finish_command(&id)?;
        }
        Ok(())
    }

    async fn on_event(&mut self, ev: &crate::transport::MqttEvent) -> Result<(), AgentError> {
        match ev.payload() {
            EventPayload::Connected(_) => self.on_connected().await,
            EventPayload::Disconnected | EventPayload::Error(_) => {
                if self.state != SyncState::Offline {
                    if let EventPayload::Error(e) = ev.payload() {
                        tracing::warn!(error = %e, "disconnected");
                    }
                }
                self.state = SyncState::Offline;
                self.inflight.clear();
            }
            EventPayload::Received { topic, data, .. } => {
                match topic.and_then(wire::parse_topic) {
                    Some((agent, kind)) if agent == self.cfg.id => self.on_message(kind, data)?,
                    _ => tracing::warn!(?topic, "message on an unexpected topic"),
                }
                self.pump().await?;
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
        let hello = Envelope::Hello(Hello {
            agent_id: id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            arch: std::env::consts::ARCH.into(),
            modules: catalog::catalog()
                .iter()
                .map(|m| ModuleInfo {
                    name: m.name.into(),
                    version: m.version.into(),
                    schema_hash: m.schema_hash(),
                })
                .collect(),
            tags: self.cfg.tags.clone(),
            location: None,
            schedule_version: 0,
            outbox_epoch: self.outbox.epoch(),
            outbox_depth: self.outbox.depth(),
            dropped: 0,
            heartbeat_interval_ms: self.cfg.heartbeat_ms,
            sent_at_ms: now_ms(),
        });
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
        let _ = self
            .client
            .publish(
                &wire::topic(&id, Kind::Hello),
                QoS::AtLeastOnce,
                false,
                &wire::encode(&hello),
            )
            .await;
        // Everything unacked goes again after every reconnect: the broker kept nothing.
        self.state = SyncState::CatchingUp;
        self.send_from = 0;
        self.inflight.clear();
        self.last_ack = Instant::now();
        self.heartbeat().await;
    }

    fn on_message(&mut self, kind: Kind, data: &[u8]) -> Result<(), AgentError> {
        let env = match wire::decode(data) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(error = %e, kind = kind.as_str(), "undecodable downlink message");
                return Ok(());
            }
        };
        match (kind, env) {
            (Kind::Ack, Envelope::Ack(ack)) => self.on_ack(&ack)?,
            (Kind::Cmd, Envelope::Command(cmd)) => self.on_command(cmd)?,
            (kind, _) => tracing::warn!(kind = kind.as_str(), "envelope does not match its topic"),
        }
        Ok(())
    }

    fn on_ack(&mut self, ack: &Ack) -> Result<(), AgentError> {
        let deleted = self.outbox.ack(ack)?;
        let top = ack.ranges.iter().map(|r| r.1).max().unwrap_or(0);
        self.inflight.retain(|b| b.last_seq > top);
        self.last_ack = Instant::now();
        tracing::debug!(deleted, depth = self.outbox.depth(), "ack");
        Ok(())
    }

    fn on_command(&mut self, cmd: Command) -> Result<(), AgentError> {
        let now = now_ms();
        match cmd.kind {
            CommandKind::Run {
                module,
                params_json,
                timeout_ms,
            } => {
                if !self.outbox.accept_command(&cmd.id, &module, now)? {
                    tracing::debug!(request = %cmd.id, "command seen before; not run again");
                    return Ok(());
                }
                if cmd.deadline_ms.is_some_and(|d| d < now) {
                    self.append_state(
                        &cmd.id,
                        RequestState::Expired,
                        Some("deadline passed before the agent received it"),
                    )?;
                    self.outbox.finish_command(&cmd.id)?;
                    return Ok(());
                }
                self.append_state(&cmd.id, RequestState::Received, None)?;
                let tx = self.produced_tx.clone();
                let id = cmd.id.clone();
                let task = tokio::spawn(async move {
                    let started_ms = now_ms();
                    let _ = tx
                        .send(Produced::Record(Box::new(RecordBody::State(StateChange {
                            request_id: id.clone(),
                            state: RequestState::Running,
                            detail: None,
                        }))))
                        .await;
                    let outcome = supervisor::run_module(
                        module.clone(),
                        params_json,
                        Duration::from_millis(timeout_ms.max(1)),
                    )
                    .await;
                    let result = ModuleResult {
                        request_id: id.clone(),
                        module,
                        received_ms: now,
                        started_ms,
                        finished_ms: now_ms(),
                        outcome,
                    };
                    let _ = tx
                        .send(Produced::Record(Box::new(RecordBody::Result(result))))
                        .await;
                    let _ = tx.send(Produced::Finished(id)).await;
                });
                self.running.insert(cmd.id, task.abort_handle());
            }
            CommandKind::Cancel { request_id } => {
                if let Some(task) = self.running.remove(&request_id) {
                    task.abort();
                    self.append_state(&request_id, RequestState::Cancelled, None)?;
                    self.outbox.finish_command(&request_id)?;
                }
            }
        }
        Ok(())
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
        )?;
        Ok(())
    }

    fn on_produced(&mut self, p: Produced) -> Result<(), AgentError> {
        match p {
            Produced::Record(body) => {
                self.outbox.append(now_ms(), *body)?;
            }
            Produced::Finished(id) => {
                self.running.remove(&id);
                self.outbox.finish_command(&id)?;
            }
        }
        Ok(())
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

    /// Sends batches while the window allows.
    async fn pump(&mut self) -> Result<(), AgentError> {
        if self.state == SyncState::Offline {
            return Ok(());
        }
        while self.inflight.len() < self.cfg.window {
            let from = self
                .send_from
                .max(self.outbox.first_seq().unwrap_or(u64::MAX));
            let records = self.outbox.read_from(from, self.cfg.batch_max_bytes)?;
            let Some(last) = records.last().map(|r| r.seq) else {
                self.state = SyncState::Online;
                break;
            };
            let batch = Envelope::Batch(Batch {
                epoch: self.outbox.epoch(),
                records,
            });
            let topic = wire::topic(&self.cfg.id, Kind::Out);
            if self
                .client
                .publish(&topic, QoS::AtLeastOnce, false, &wire::encode(&batch))
                .await
                .is_err()
            {
                // The request queue is full; the next tick tries again.
                break;
            }
            self.send_from = last + 1;
            self.inflight.push_back(InFlight {
                last_seq: last,
                sent_at: Instant::now(),
            });
        }
        Ok(())
    }

    async fn heartbeat(&mut self) {
        if self.state == SyncState::Offline {
            return;
        }
        let cpu = system::cpu_sample();
        let (mem_total_kib, mem_available_kib) = system::memory_kib();
        let (disk_total_kib, disk_free_kib) = system::disk_kib(&self.cfg.data);
        let now = now_ms();
        let hb = Envelope::Heartbeat(Heartbeat {
            sent_at_ms: now,
            uptime_s: system::uptime_s(),
            cpu_pct: system::cpu_pct(self.cpu, cpu),
            mem_total_kib,
            mem_available_kib,
            load: system::load(),
            disk_total_kib,
            disk_free_kib,
            outbox_depth: self.outbox.depth(),
            outbox_oldest_age_ms: self
                .outbox
                .oldest_at_ms()
                .map(|t| (now - t).max(0) as u64)
                .unwrap_or(0),
            dropped: 0,
        });
        self.cpu = cpu;
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
        )?;
        Ok(())
    }
}
