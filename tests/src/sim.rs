//! Simulated agents for `imn-bench`: light tasks that speak the real wire protocol over
//! real MQTT connections (hello, status, heartbeats, outbox batches, the backend's
//! acks, resends), many in one process. They are not the full agent (no outbox on
//! disk, no modules), but they obey the same protocol rules: a record is resent until
//! an ack names it, and record ids are (agent, epoch, seq).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imn_proto::auth as wauth;
use imn_proto::results::{EchoResult, ModuleOutcome, ModuleOutput};
use imn_proto::wire::{
    self, Batch, Envelope, Heartbeat, Hello, Kind, ModuleResult, Record, RecordBody, Status,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::Notify;

/// What every simulated agent of a run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    /// Heartbeat period (also announced in the hello).
    pub heartbeat: Duration,
    /// Results each agent sends once `go` is signalled.
    pub results: u64,
    /// Records per MQTT message.
    pub per_message: usize,
    /// Messages sent and not yet acked, at most.
    pub window: usize,
    /// Text of each echo result (sets the payload size).
    pub message: String,
    /// Unacked messages are sent again after this.
    pub resend_after: Duration,
    /// Enrolled agents' tokens (auth on): each agent logs in with its own and signs
    /// every message, as the real agent does, and checks the signature of each ack.
    pub tokens: Option<Arc<std::collections::HashMap<String, String>>>,
    /// The wire version the agents write (an older backend reads only version 1).
    pub wire_version: u8,
}

/// Counters shared by every simulated agent of a run.
#[derive(Debug, Default)]
pub struct SimStats {
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub messages_sent: AtomicU64,
    pub resent: AtomicU64,
    pub results_acked: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Agents that have every result acked.
    pub done: AtomicU64,
    /// When the last result was acked.
    pub last_ack: Mutex<Option<Instant>>,
}

/// Starts signal for the results, and stop for everything.
#[derive(Debug, Default)]
pub struct Control {
    pub go: Notify,
    pub going: AtomicBool,
    pub stop: AtomicBool,
}

impl Control {
    pub fn start_results(&self) {
        self.going.store(true, Ordering::SeqCst);
        self.go.notify_waiters();
    }
}

/// A finished echo result, as an agent's outbox holds it.
pub fn echo_result(request_id: String, message: &str) -> RecordBody {
    RecordBody::Result(ModuleResult {
        request_id,
        module: "echo_module".into(),
        received_ms: 1,
        started_ms: 2,
        finished_ms: 3,
        outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
            message: message.to_string(),
        })),
    })
}

fn result_record(agent: &str, seq: u64, message: &str) -> Record {
    Record {
        seq,
        at_ms: imn_proto::now_ms(),
        body: echo_result(format!("{agent}-{seq}"), message),
    }
}

/// Bytes of one result message as a simulated agent sends it (for raw comparisons).
pub fn message_bytes(cfg: &SimConfig) -> usize {
    let records = (1..=cfg.per_message as u64)
        .map(|s| result_record("sim-000000", s, &cfg.message))
        .collect();
    wire::encode_for(
        cfg.wire_version,
        &Envelope::Batch(Batch { epoch: 1, records }),
    )
    .len()
}

/// One simulated agent; runs until `ctl.stop`.
pub async fn run(id: String, cfg: Arc<SimConfig>, stats: Arc<SimStats>, ctl: Arc<Control>) {
    let epoch = rand::random::<u64>() | 1;
    let mut mo = MqttOptions::new(id.clone(), cfg.host.clone(), cfg.port);
    let token = cfg.tokens.as_ref().and_then(|t| t.get(&id).cloned());
    let key = token.as_deref().map(wauth::message_key);
    if let Some(t) = &token {
        mo.set_credentials(id.clone(), t.clone());
    }
    // Signed with the agent's key when auth is on, as the real agent does.
    let seal = |topic: &str, payload: Vec<u8>| match &key {
        Some(k) => wauth::sign(k, topic, &payload),
        None => payload,
    };
    let offline = seal(
        &wire::topic(&id, Kind::Status),
        wire::encode_for(
            cfg.wire_version,
            &Envelope::Status(Status {
                online: false,
                at_ms: 0,
            }),
        ),
    );
    mo.set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight((cfg.window as u16).saturating_add(8))
        .set_last_will(LastWill::new(
            wire::topic(&id, Kind::Status),
            offline,
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = AsyncClient::new(mo, cfg.window + 32);
    let mut net = eventloop.network_options();
    // The broker's listen backlog is 128: a fleet connecting at once waits for SYN
    // retransmits, so allow a long connect.
    net.set_connection_timeout(120);
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);

    let mut connected = false;
    let mut ever_connected = false;
    let mut next_seq = 1u64;
    // last seq of a message -> (first seq, sent at)
    let mut inflight: BTreeMap<u64, (u64, Instant)> = BTreeMap::new();
    let mut acked = 0u64;
    let mut hb = tokio::time::interval(cfg.heartbeat);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Resends are checked a few times per resend period, not on a fast tick: a
    // thousand agents waking every 20 ms cost the load generator a tenth of a core.
    let mut tick = tokio::time::interval(
        (cfg.resend_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ack_topic = wire::topic(&id, Kind::Ack);
    let out_topic = wire::topic(&id, Kind::Out);
    let total = cfg.results;

    let send = |first: u64, last: u64| -> bool {
        let records = (first..=last)
            .map(|s| result_record(&id, s, &cfg.message))
            .collect();
        let payload = seal(
            &out_topic,
            wire::encode_for(cfg.wire_version, &Envelope::Batch(Batch { epoch, records })),
        );
        client
            .try_publish(&out_topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
    };

    while !ctl.stop.load(Ordering::Relaxed) {
        let going = ctl.going.load(Ordering::Relaxed);
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    if !ever_connected {
                        ever_connected = true;
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                    let status_topic = wire::topic(&id, Kind::Status);
                    let online = seal(&status_topic, wire::encode_for(cfg.wire_version, &Envelope::Status(Status { online: true, at_ms: imn_proto::now_ms() })));
                    let _ = client.try_publish(status_topic, QoS::AtLeastOnce, true, online);
                    let hello = Envelope::Hello(Hello {
                        agent_id: id.clone(),
                        version: "sim".into(),
                        arch: std::env::consts::ARCH.into(),
                        modules: Vec::new(),
                        tags: vec!["sim".into()],
                        location: None,
                        schedule_version: 0,
                        outbox_epoch: epoch,
                        outbox_depth: total.saturating_sub(acked),
                        dropped: 0,
                        heartbeat_interval_ms: cfg.heartbeat.as_millis() as u64,
                        sent_at_ms: imn_proto::now_ms(),
                        features: Vec::new(),
                        limits: Default::default(),
                        schedule_policy: 0,
                    });
                    let hello_topic = wire::topic(&id, Kind::Hello);
                    let hello = seal(&hello_topic, wire::encode_for(cfg.wire_version, &hello));
                    let _ = client.try_publish(hello_topic, QoS::AtLeastOnce, false, hello);
                    // A new session: whatever was in flight goes again.
                    let again: Vec<(u64, u64)> = inflight.iter().map(|(&l, &(f, _))| (f, l)).collect();
                    for (f, l) in again {
                        if send(f, l) {
                            inflight.insert(l, (f, Instant::now()));
                            stats.resent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    let body = match &key {
                        Some(k) => wauth::verify(k, &p.topic, &p.payload).ok(),
                        None => Some(&p.payload[..]),
                    };
                    if let Some(Ok(Envelope::Ack(ack))) = body.map(wire::decode) {
                        if ack.epoch == epoch {
                            let done: Vec<u64> = inflight.keys().copied().filter(|&l| ack.contains(l)).collect();
                            for l in done {
                                if let Some((f, _)) = inflight.remove(&l) {
                                    let n = l - f + 1;
                                    acked += n;
                                    stats.results_acked.fetch_add(n, Ordering::Relaxed);
                                }
                            }
                            if acked == total && total > 0 {
                                stats.done.fetch_add(1, Ordering::Relaxed);
                                *stats.last_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    if connected || !ever_connected {
                        stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    connected = false;
                    let jitter = Duration::from_millis(200 + rand::random::<u64>() % 800);
                    tokio::time::sleep(jitter).await;
                }
            },
            _ = hb.tick(), if connected => {
                let h = Envelope::Heartbeat(Heartbeat {
                    sent_at_ms: imn_proto::now_ms(),
                    outbox_depth: total.saturating_sub(acked),
                    ..Default::default()
                });
                let hb_topic = wire::topic(&id, Kind::Heartbeat);
                let h = seal(&hb_topic, wire::encode_for(cfg.wire_version, &h));
                if client.try_publish(hb_topic, QoS::AtLeastOnce, false, h).is_ok() {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tick.tick(), if connected && going => {
                let now = Instant::now();
                let stale: Vec<(u64, u64)> = inflight
                    .iter()
                    .filter(|(_, (_, at))| now.duration_since(*at) > cfg.resend_after)
                    .map(|(&l, &(f, _))| (f, l))
                    .collect();
                for (f, l) in stale {
                    if send(f, l) {
                        inflight.insert(l, (f, now));
                        stats.resent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = ctl.go.notified(), if !going => {}
        }
        // Fill the window.
        if connected && ctl.going.load(Ordering::Relaxed) {
            while inflight.len() < cfg.window && next_seq <= total {
                let last = (next_seq + cfg.per_message as u64 - 1).min(total);
                if !send(next_seq, last) {
                    break;
                }
                stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                inflight.insert(last, (next_seq, Instant::now()));
                next_seq = last + 1;
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        // Root may also raise the hard limit (a 20,000-agent fleet needs more than
        // 20,000 descriptors in this process and in the broker's).
        let want = r.rlim_max.max(200_000);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}
