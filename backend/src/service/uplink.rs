//! Ingest: every uplink message from the bus to the store, and the acks back.
//!
//! Two stages. A task takes each message off the bus, bounds it (the checks of
//! [`crate::ingest`]), decodes it and prepares a batch's rows; this stage handles the
//! prepared messages in arrival order: outbox batches go into group commits, formed
//! round-robin over agents; hellos, heartbeats and statuses take their turn between
//! them, one per agent a round.
//!
//! Invariants:
//! - a record is acked (to its agent, and its bus message) only after the commit that
//!   stored it; a refused or unstored record is never acked, so the agent resends it;
//! - each agent holds at most its share of the bytes waiting between the bus and the
//!   store ([`crate::ingest::Shares`]), and all prepared messages at most
//!   [`PREPARED_BYTES`];
//! - a dropped message (undecodable, past a bound, a topic that does not match) is
//!   counted by reason in [`super::Stats::rejected`] and acked on the bus: it will never
//!   be taken.

use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use imn_cloud::bus::UpMessage;
use imn_cloud::events::emit;
use imn_proto::now_ms;
use imn_proto::wire::{self, Ack, Envelope, Kind};

use super::{events, Backend};
use crate::ingest;
use crate::observe;
use crate::store;

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

/// Non-batch messages handled between two group commits, at most (one per agent).
const OTHERS_PER_ROUND: usize = 1024;

/// Messages of one round handled at once (each of another agent).
const OTHERS_AT_ONCE: usize = 64;

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

impl Backend {
    /// Two stages, so decoding and JSON for one batch overlap the store's write of the
    /// one before: a task bounds, decodes, checks and prepares; this one handles in
    /// arrival order, and forms group commits round-robin over agents.
    pub(super) async fn ingest(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<UpMessage>) {
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
                    emit(events::UplinkShed {
                        stats: &me.stats,
                        metrics: &me.metrics,
                        agent: &msg.agent,
                    });
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
            let deferred = self.hellos.next_due();
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
                // A round holds one message per agent, so its hellos, heartbeats and
                // statuses can be handled side by side without reordering any agent's
                // (a large fleet's would wait on the store one at a time otherwise).
                // The rest (update chunks read releases through one cache) go one
                // at a time after them.
                let (light, rest): (Vec<Decoded>, Vec<Decoded>) = others
                    .take_round(OTHERS_PER_ROUND)
                    .into_iter()
                    .partition(|d| {
                        matches!(d.msg.kind, Kind::Hello | Kind::Heartbeat | Kind::Status)
                    });
                futures::stream::iter(light)
                    .for_each_concurrent(OTHERS_AT_ONCE, |d| self.handle_up(d))
                    .await;
                for d in rest {
                    self.handle_up(d).await;
                }
                if !batches.is_empty() {
                    let group = batches.take_group(GROUP_MESSAGES, GROUP_ROWS);
                    self.store_group(group).await;
                }
                if self
                    .hellos
                    .next_due()
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
                    emit(events::EventsDeferred {
                        stats: &self.stats,
                        held: held as u64,
                    });
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
        emit(events::GroupCommitted {
            stats: &self.stats,
            busy: started.elapsed(),
        });
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
                    emit(events::BatchStored {
                        stats: &self.stats,
                        metrics: &self.metrics,
                        agent: &msg.agent,
                        outcome: &outcome,
                    });
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
                self.feed.records_stored();
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
                        self.waiters.wake(&id);
                    }
                }
            }
            Err(e) => {
                emit(events::StoreFailed {
                    stats: &self.stats,
                    metrics: &self.metrics,
                    error: &e,
                    batches: msgs.len(),
                });
                for (msg, _) in msgs {
                    msg.nak().await;
                }
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
            Ok(()) => emit(events::AckSent { stats: &self.stats }),
            Err(e) => emit(events::AckNotSent {
                metrics: &self.metrics,
                error: &e,
            }),
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
                emit(events::UplinkRefused {
                    stats: &self.stats,
                    metrics: &self.metrics,
                    agent: &msg.agent,
                    kind: msg.kind.as_str(),
                    reason: e.reason(),
                    error: &e,
                });
                msg.ack().await;
                return;
            }
        };
        let agent = msg.agent.clone();
        match (msg.kind, env) {
            (Kind::Hello, Envelope::Hello(hello)) if hello.agent_id == agent => {
                if !self.hellos.due(&agent, now) {
                    // Too soon after the last: the newest one waits its turn (a module
                    // load and its configure come as two hellos in a few ms; a flood
                    // of hellos costs one store write a second).
                    emit(events::HelloThrottled { stats: &self.stats });
                    self.hellos.defer(agent, hello, version);
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
                    emit(events::StaleHello {
                        stats: &self.stats,
                        metrics: &self.metrics,
                        agent: &agent,
                        version,
                    });
                    msg.ack().await;
                    return;
                }
                // This one is newer than any deferred one of the agent's.
                self.hellos.forget_deferred(&agent);
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
            (Kind::Update, Envelope::Update(up)) => {
                self.touch_session(&agent, now).await;
                self.on_update_up(&agent, up).await;
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
                emit(events::EnvelopeMismatch {
                    stats: &self.stats,
                    metrics: &self.metrics,
                    agent: &agent,
                    kind: kind.as_str(),
                });
                msg.ack().await;
            }
        }
    }
}
