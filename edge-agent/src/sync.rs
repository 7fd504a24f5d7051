//! The agent's sync as a state machine with no I/O and no clock of its own: what to
//! send next, what is in flight, when to start again from the oldest record. The
//! agent's main loop ([`crate::agent`]) does the I/O around it (flushing the outbox
//! before a send, publishing, subscribing), the way rumqttc keeps its `MqttState`
//! apart from its event loop; the time is passed in.
//!
//! The states:
//! - `Offline`: not connected; records pile up in the outbox.
//! - `CatchingUp`: connected with a backlog; sends from the oldest record (with
//!   `live_first`, records made since the connection came up go first).
//! - `Online`: connected and caught up; new records go out as they are made.
//!
//! Each pump of the main loop reads the outbox's lowest seq once, then asks
//! [`SyncCore::next_batch`] for batches while it gives them, and reports each one
//! published with [`SyncCore::sent`]. A batch that could not be published is simply not
//! reported: the next pump plans it again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use imn_proto::wire::{Ack, Record};

/// Where sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Offline,
    CatchingUp,
    Online,
}

/// What the sync reads of the outbox.
pub trait OutboxView {
    /// The lowest unacked seq, if any.
    fn first_seq(&self) -> Option<u64>;
    /// Records with seq >= `from`, in order, up to `max_bytes` (at least one record).
    fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record>;
}

impl OutboxView for crate::outbox::SledOutbox {
    fn first_seq(&self) -> Option<u64> {
        crate::outbox::Outbox::first_seq(self)
    }

    fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record> {
        crate::outbox::Outbox::read_from(self, from, max_bytes)
    }
}

/// A batch on the wire, waiting for its ack.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    last_seq: u64,
    sent_at: Instant,
}

/// A batch to publish: its records, in seq order, and whether they are live ones (made
/// since the connection came up, sent ahead of the backlog).
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub records: Vec<Record>,
    pub live: bool,
}

impl Planned {
    /// The seq of the batch's last record (a planned batch is never empty).
    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }
}

/// The sync's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSettings {
    /// Batches sent but not yet acked before sending waits.
    pub window: usize,
    /// Live records go ahead of the backlog while catching up.
    pub live_first: bool,
    /// After this long with no ack, everything unacked is sent again.
    pub resend_timeout: Duration,
    /// Largest batch, in bytes of records.
    pub batch_max_bytes: usize,
}

/// The sync's state: where it stands, what was sent this connection, what is in flight.
#[derive(Debug, Clone)]
pub struct SyncCore {
    settings: SyncSettings,
    state: SyncState,
    /// The next seq to send; everything below it was sent at least once this connection.
    send_from: u64,
    inflight: VecDeque<InFlight>,
    last_ack: Instant,
    /// Records from this seq on were made after the connection came up (live).
    live_mark: u64,
    /// The next live seq to send (with `live_first`).
    live_sent: u64,
}

impl SyncCore {
    /// Offline, nothing sent; `now` counts as the last ack.
    pub fn new(settings: SyncSettings, now: Instant) -> SyncCore {
        SyncCore {
            settings,
            state: SyncState::Offline,
            send_from: 0,
            inflight: VecDeque::new(),
            last_ack: now,
            live_mark: 0,
            live_sent: 0,
        }
    }

    pub fn state(&self) -> SyncState {
        self.state
    }

    pub fn is_connected(&self) -> bool {
        self.state != SyncState::Offline
    }

    /// No batch waits for its ack.
    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Batches waiting for their ack.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The connection came up; `next_seq` is the seq the outbox gives its next record.
    /// Everything unacked goes again after every reconnect: the broker kept nothing.
    pub fn on_connected(&mut self, next_seq: u64, now: Instant) {
        self.state = SyncState::CatchingUp;
        self.send_from = 0;
        self.live_mark = next_seq;
        self.live_sent = next_seq;
        self.inflight.clear();
        self.last_ack = now;
    }

    /// The connection went down (or could not come up): what was in flight is lost.
    pub fn on_disconnected(&mut self) {
        self.state = SyncState::Offline;
        self.inflight.clear();
    }

    /// The next batch to send, or None: offline, the window full, or nothing left to
    /// send (then sync is `Online`). `first` is the outbox's lowest seq (`u64::MAX`
    /// when it is empty), read once per pump. Nothing changes until [`Self::sent`]
    /// reports the batch published.
    pub fn next_batch(&mut self, view: &mut impl OutboxView, first: u64) -> Option<Planned> {
        if self.state == SyncState::Offline || self.inflight.len() >= self.settings.window {
            return None;
        }
        let max_bytes = self.settings.batch_max_bytes;
        let catching_up = self.settings.live_first && self.state == SyncState::CatchingUp;
        if catching_up {
            let records = view.read_from(self.live_sent.max(first), max_bytes);
            if !records.is_empty() {
                return Some(Planned {
                    records,
                    live: true,
                });
            }
        }
        let upto = if catching_up {
            self.live_mark
        } else {
            u64::MAX
        };
        let mut records = view.read_from(self.send_from.max(first), max_bytes);
        records.retain(|r| r.seq < upto);
        if records.is_empty() {
            self.state = SyncState::Online;
            self.send_from = self.send_from.max(self.live_sent);
            return None;
        }
        Some(Planned {
            records,
            live: false,
        })
    }

    /// A batch from [`Self::next_batch`] (its last seq, whether live) was published at
    /// `now`.
    pub fn sent(&mut self, last: u64, live: bool, now: Instant) {
        if live {
            self.live_sent = last + 1;
        } else {
            self.send_from = last + 1;
        }
        self.inflight.push_back(InFlight {
            last_seq: last,
            sent_at: now,
        });
    }

    /// The backend acked `ack` at `now` (whatever its epoch: the outbox checks that).
    /// A batch leaves the window when its last seq is acked; any ack counts as news
    /// from the backend. Nothing is skipped: what to send next does not move.
    pub fn on_ack(&mut self, ack: &Ack, now: Instant) {
        self.inflight.retain(|b| !ack.contains(b.last_seq));
        self.last_ack = now;
    }

    /// With no ack for a whole resend timeout (and the oldest batch in flight that
    /// old), starts again from the oldest record, and from the first live one; true
    /// when it did.
    pub fn check_resend(&mut self, now: Instant) -> bool {
        let timeout = self.settings.resend_timeout;
        if self.state != SyncState::Offline
            && self
                .inflight
                .front()
                .is_some_and(|b| now.saturating_duration_since(b.sent_at) > timeout)
            && now.saturating_duration_since(self.last_ack) > timeout
        {
            self.send_from = 0;
            // Live records sent while catching up may have been lost too: without this
            // the backlog would end at `live_sent` and skip them until a reconnect.
            self.live_sent = self.live_mark;
            self.inflight.clear();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::wire::{AgentEvent, RecordBody};
    use std::collections::{BTreeMap, BTreeSet};

    /// Each record costs this many bytes in [`Fake::read_from`].
    const REC: usize = 100;

    /// The outbox as the sync sees it: records by seq, an ack deletes what it names
    /// (only seqs handed out, as [`crate::outbox::SledOutbox`] does), and what it
    /// deleted is remembered.
    #[derive(Default)]
    struct Fake {
        records: BTreeMap<u64, Record>,
        next_seq: u64,
        deleted: BTreeSet<u64>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                next_seq: 1,
                ..Fake::default()
            }
        }

        fn append(&mut self, n: u64) -> Vec<u64> {
            (0..n)
                .map(|_| {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let body = RecordBody::Event(AgentEvent {
                        kind: "test".into(),
                        message: seq.to_string(),
                    });
                    self.records.insert(
                        seq,
                        Record {
                            seq,
                            at_ms: seq as i64,
                            body,
                        },
                    );
                    seq
                })
                .collect()
        }

        fn ack(&mut self, ack: &Ack) {
            for &(lo, hi) in &ack.ranges {
                let hi = hi.min(self.next_seq.saturating_sub(1));
                if hi < lo {
                    continue;
                }
                let gone: Vec<u64> = self.records.range(lo..=hi).map(|(s, _)| *s).collect();
                for s in gone {
                    self.records.remove(&s);
                    self.deleted.insert(s);
                }
            }
        }

        fn first(&self) -> u64 {
            self.first_seq().unwrap_or(u64::MAX)
        }
    }

    impl OutboxView for Fake {
        fn first_seq(&self) -> Option<u64> {
            self.records.keys().next().copied()
        }

        fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record> {
            let mut out = Vec::new();
            for r in self.records.range(from..).map(|(_, r)| r) {
                if !out.is_empty() && (out.len() + 1) * REC > max_bytes {
                    break;
                }
                out.push(r.clone());
            }
            out
        }
    }

    fn settings(window: usize, live_first: bool, per_batch: usize) -> SyncSettings {
        SyncSettings {
            window,
            live_first,
            resend_timeout: Duration::from_millis(10_000),
            batch_max_bytes: per_batch * REC,
        }
    }

    fn seqs(b: &Planned) -> Vec<u64> {
        b.records.iter().map(|r| r.seq).collect()
    }

    /// What the agent's pump does: flush (nothing to do here), read the first seq once,
    /// send while the core gives batches; returns them.
    fn pump(core: &mut SyncCore, ob: &mut Fake, now: Instant) -> Vec<Planned> {
        let first = ob.first();
        let mut out = Vec::new();
        while let Some(b) = core.next_batch(ob, first) {
            core.sent(b.last_seq(), b.live, now);
            out.push(b);
        }
        out
    }

    fn ack_of(batches: &[Planned]) -> Ack {
        Ack::from_seqs(1, batches.iter().flat_map(seqs))
    }

    #[test]
    fn offline_sends_nothing() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(8, false, 4), t);
        let mut ob = Fake::new();
        ob.append(10);
        assert_eq!(core.state(), SyncState::Offline);
        assert!(pump(&mut core, &mut ob, t).is_empty());
        assert!(!core.check_resend(t + Duration::from_secs(3600)));
        assert_eq!(core.state(), SyncState::Offline);
    }

    /// Batches go out in seq order until the window is full; each ack opens it by one
    /// batch; once all is sent the sync is online, and new records go out as made.
    #[test]
    fn normal_flow_respects_the_window() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(2, false, 3), t);
        let mut ob = Fake::new();
        ob.append(10);
        core.on_connected(ob.next_seq, t);
        assert_eq!(core.state(), SyncState::CatchingUp);
        let sent = pump(&mut core, &mut ob, t);
        assert_eq!(
            sent.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![1, 2, 3], vec![4, 5, 6]],
            "two batches: the window"
        );
        assert_eq!(core.inflight(), 2);
        assert!(pump(&mut core, &mut ob, t).is_empty(), "window full");
        // The first batch's ack lets one more out.
        let a = ack_of(&sent[..1]);
        ob.ack(&a);
        core.on_ack(&a, t);
        let more = pump(&mut core, &mut ob, t);
        assert_eq!(
            more.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![7, 8, 9]]
        );
        assert_eq!(core.state(), SyncState::CatchingUp);
        let a = ack_of(&sent[1..]);
        ob.ack(&a);
        core.on_ack(&a, t);
        let last = pump(&mut core, &mut ob, t);
        assert_eq!(last.iter().map(seqs).collect::<Vec<_>>(), vec![vec![10]]);
        assert_eq!(core.inflight(), 2);
        assert_eq!(
            core.state(),
            SyncState::CatchingUp,
            "the window was full: not yet seen that nothing is left"
        );
        let a = ack_of(&more);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert!(pump(&mut core, &mut ob, t).is_empty());
        assert_eq!(core.state(), SyncState::Online, "nothing left to send");
        // New records while online go at once (within the window).
        ob.append(2);
        let live = pump(&mut core, &mut ob, t);
        assert_eq!(
            live.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![11, 12]]
        );
        assert!(live.iter().all(|b| !b.live), "live only while catching up");
        let a = ack_of(&live);
        ob.ack(&a);
        core.on_ack(&a, t);
        let a = ack_of(&last);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert!(core.is_idle());
        assert!(ob.records.is_empty());
        assert_eq!(ob.deleted, (1..=12).collect());
    }

    /// A batch the backend never acks is sent again once a whole resend timeout passed
    /// with no ack at all; not before, and an ack in the meantime postpones it.
    #[test]
    fn a_lost_batch_is_resent_after_the_timeout_and_nothing_is_skipped() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(10_000);
        let mut core = SyncCore::new(settings(4, false, 2), t0);
        let mut ob = Fake::new();
        ob.append(6);
        core.on_connected(ob.next_seq, t0);
        let sent = pump(&mut core, &mut ob, t0);
        assert_eq!(sent.len(), 3);
        // The middle batch is lost; the others are acked a little later.
        let t1 = t0 + Duration::from_secs(1);
        let a = Ack::from_seqs(1, [1, 2, 5, 6]);
        ob.ack(&a);
        core.on_ack(&a, t1);
        assert_eq!(core.inflight(), 1);
        assert!(pump(&mut core, &mut ob, t1).is_empty(), "nothing new");
        assert!(
            !core.check_resend(t0 + timeout),
            "the batch is not yet a whole timeout old"
        );
        assert!(
            !core.check_resend(t1 + timeout),
            "an ack came within the timeout"
        );
        assert!(core.check_resend(t1 + timeout + Duration::from_millis(1)));
        assert!(core.is_idle(), "the window is cleared");
        assert!(!core.check_resend(t1 + timeout * 3), "only once");
        let again = pump(&mut core, &mut ob, t1 + timeout * 3);
        assert_eq!(
            again.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![3, 4]],
            "from the oldest unacked record, the acked ones not again"
        );
        let a = ack_of(&again);
        ob.ack(&a);
        core.on_ack(&a, t1 + timeout * 3);
        assert!(ob.records.is_empty());
        assert_eq!(ob.deleted.len(), 6);
    }

    /// With nothing in flight there is nothing to resend, however long since an ack.
    #[test]
    fn no_resend_without_a_batch_in_flight() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(4, false, 2), t);
        let mut ob = Fake::new();
        core.on_connected(ob.next_seq, t);
        assert!(pump(&mut core, &mut ob, t).is_empty());
        assert_eq!(core.state(), SyncState::Online);
        assert!(!core.check_resend(t + Duration::from_secs(3600)));
    }

    /// Acks out of order, twice, for seqs never sent or never made, or of another
    /// epoch: each counts as news from the backend; a batch leaves the window only when
    /// its last seq is named; what to send next never moves, so nothing unsent is
    /// skipped. (The outbox deletes what an ack of its epoch names among the records it
    /// holds, sent or not: the backend says it has them.)
    #[test]
    fn hostile_acks_skip_nothing() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(3, false, 2), t);
        let mut ob = Fake::new();
        ob.append(10);
        core.on_connected(ob.next_seq, t);
        let sent = pump(&mut core, &mut ob, t);
        assert_eq!(
            sent.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![1, 2], vec![3, 4], vec![5, 6]]
        );
        // The third batch first, then the first; the second twice; none of them is
        // reopened by its duplicate.
        for a in [
            Ack::from_seqs(1, [5, 6]),
            Ack::from_seqs(1, [1, 2]),
            Ack::from_seqs(1, [5, 6]),
        ] {
            ob.ack(&a);
            core.on_ack(&a, t);
        }
        assert_eq!(core.inflight(), 1, "the second batch waits");
        // Part of a batch, not its last seq: the batch stays in flight.
        let a = Ack::from_seqs(1, [3]);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert_eq!(core.inflight(), 1);
        // Seqs never made: nothing deleted, nothing skipped. A later ack for the
        // second batch's last seq lets it go.
        let a = Ack::from_seqs(1, 1000..=2000);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert_eq!(core.inflight(), 1);
        assert_eq!(ob.records.len(), 5, "4 and 7..=10 remain");
        // Another epoch's ack: the outbox ignores it, but the core counts it as an ack
        // (as the agent did before the core) and takes a batch off by its last seq.
        let t1 = t + Duration::from_secs(9);
        core.on_ack(&Ack::from_seqs(99, [4]), t1);
        assert!(core.is_idle());
        assert!(
            !core.check_resend(t + Duration::from_secs(15)),
            "any ack postpones the resend"
        );
        // An ack beyond what was sent, naming records the outbox holds: the outbox lets
        // them go; the core still sends every record not named, in order.
        let a = Ack::from_seqs(1, [8, 9]);
        ob.ack(&a);
        core.on_ack(&a, t1);
        let next = pump(&mut core, &mut ob, t1);
        assert_eq!(
            next.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![7, 10]],
            "7 and 10 are sent; 4 was sent already this connection"
        );
        // New records made after a bogus ack of seqs not yet handed out are sent.
        let made = ob.append(3);
        assert_eq!(made, vec![11, 12, 13]);
        let after = pump(&mut core, &mut ob, t1);
        assert_eq!(
            after.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![11, 12], vec![13]]
        );
        // The record 4, acked only by another epoch's ack, goes again on resend.
        assert!(core.check_resend(t1 + Duration::from_secs(11)));
        let again = pump(&mut core, &mut ob, t1 + Duration::from_secs(11));
        assert_eq!(again.first().map(seqs), Some(vec![4, 7]));
    }

    /// A reconnect mid-flight forgets the window and sends from the oldest unacked
    /// record again; records made while offline are part of the backlog.
    #[test]
    fn reconnect_mid_flight_resends_from_the_oldest_unacked() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(2, false, 2), t);
        let mut ob = Fake::new();
        ob.append(8);
        core.on_connected(ob.next_seq, t);
        let sent = pump(&mut core, &mut ob, t);
        assert_eq!(sent.len(), 2);
        let a = ack_of(&sent[..1]);
        ob.ack(&a);
        core.on_ack(&a, t);
        let sent2 = pump(&mut core, &mut ob, t);
        assert_eq!(sent2.iter().map(seqs).collect::<Vec<_>>(), vec![vec![5, 6]]);
        core.on_disconnected();
        assert_eq!(core.state(), SyncState::Offline);
        assert!(core.is_idle(), "in flight is cleared");
        assert!(pump(&mut core, &mut ob, t).is_empty());
        // The ack for 3..=4 arrives late, over the old session (or not at all).
        ob.append(2);
        core.on_connected(ob.next_seq, t);
        assert_eq!(core.state(), SyncState::CatchingUp);
        let again = pump(&mut core, &mut ob, t);
        assert_eq!(
            again.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![3, 4], vec![5, 6]],
            "from the oldest unacked"
        );
        for b in &again {
            let a = ack_of(std::slice::from_ref(b));
            ob.ack(&a);
            core.on_ack(&a, t);
        }
        let rest = pump(&mut core, &mut ob, t);
        assert_eq!(
            rest.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![7, 8], vec![9, 10]]
        );
        let a = ack_of(&rest);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert!(pump(&mut core, &mut ob, t).is_empty());
        assert_eq!(core.state(), SyncState::Online);
        assert!(ob.records.is_empty());
        assert_eq!(ob.deleted.len(), 10);
    }

    /// With `live_first`, records made after the connection came up go ahead of the
    /// backlog while catching up; then the backlog; then online from past the live
    /// ones. Nothing lost, nothing sent twice.
    #[test]
    fn live_records_go_first_while_catching_up() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(2, true, 3), t);
        let mut ob = Fake::new();
        ob.append(9);
        core.on_connected(ob.next_seq, t);
        // One backlog batch goes before any live record exists.
        let mut sent = pump(&mut core, &mut ob, t);
        assert_eq!(
            sent.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![1, 2, 3], false), (vec![4, 5, 6], false)]
        );
        ob.append(2); // 10, 11: live
        let a = ack_of(&sent);
        ob.ack(&a);
        core.on_ack(&a, t);
        let b = pump(&mut core, &mut ob, t);
        assert_eq!(
            b.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![10, 11], true), (vec![7, 8, 9], false)],
            "the live ones first, then the backlog (never past the live mark)"
        );
        assert_eq!(core.state(), SyncState::CatchingUp);
        sent.extend(b.clone());
        ob.append(1); // 12: live, waits for the window
        let a = ack_of(&b[..1]);
        ob.ack(&a);
        core.on_ack(&a, t);
        let c = pump(&mut core, &mut ob, t);
        assert_eq!(
            c.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![12], true)]
        );
        sent.extend(c.clone());
        let a = ack_of(&b[1..]);
        ob.ack(&a);
        core.on_ack(&a, t);
        let a = ack_of(&c);
        ob.ack(&a);
        core.on_ack(&a, t);
        assert!(pump(&mut core, &mut ob, t).is_empty());
        assert_eq!(core.state(), SyncState::Online);
        // Online: new records from past the live ones, once.
        ob.append(2);
        let d = pump(&mut core, &mut ob, t);
        assert_eq!(
            d.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![13, 14], false)]
        );
        sent.extend(d.clone());
        let all: Vec<u64> = sent.iter().flat_map(seqs).collect();
        let unique: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "none sent twice");
        assert_eq!(unique, (1..=14).collect(), "none lost");
    }

    /// A resend while catching up with `live_first` sends the live records again too:
    /// one lost before the resend is not skipped when the backlog is done.
    #[test]
    fn a_resend_while_catching_up_resends_the_live_records_too() {
        let t = Instant::now();
        let timeout = Duration::from_millis(10_000);
        let mut core = SyncCore::new(settings(2, true, 2), t);
        let mut ob = Fake::new();
        ob.append(4);
        core.on_connected(ob.next_seq, t);
        let a = pump(&mut core, &mut ob, t);
        assert_eq!(
            a.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![1, 2], vec![3, 4]]
        );
        ob.append(2); // 5, 6: live
        let ack = ack_of(&a[..1]);
        ob.ack(&ack);
        core.on_ack(&ack, t);
        let b = pump(&mut core, &mut ob, t);
        assert_eq!(
            b.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![5, 6], true)]
        );
        // Both batches in flight are lost; the resend comes while catching up.
        let t1 = t + timeout + Duration::from_millis(1);
        assert!(core.check_resend(t1));
        assert_eq!(core.state(), SyncState::CatchingUp);
        let again = pump(&mut core, &mut ob, t1);
        assert_eq!(
            again.iter().map(|b| (seqs(b), b.live)).collect::<Vec<_>>(),
            vec![(vec![5, 6], true), (vec![3, 4], false)],
            "the live ones again first, then the backlog"
        );
        let ack = ack_of(&again);
        ob.ack(&ack);
        core.on_ack(&ack, t1);
        assert!(pump(&mut core, &mut ob, t1).is_empty());
        assert_eq!(core.state(), SyncState::Online);
        assert!(ob.records.is_empty(), "nothing stranded");
    }

    /// Without `live_first` the backlog goes strictly in seq order, live records after.
    #[test]
    fn without_live_first_the_order_is_by_seq() {
        let t = Instant::now();
        let mut core = SyncCore::new(settings(1, false, 2), t);
        let mut ob = Fake::new();
        ob.append(3);
        core.on_connected(ob.next_seq, t);
        let a = pump(&mut core, &mut ob, t);
        ob.append(2);
        let ack = ack_of(&a);
        ob.ack(&ack);
        core.on_ack(&ack, t);
        let b = pump(&mut core, &mut ob, t);
        assert_eq!(
            a.iter()
                .chain(&b)
                .map(|b| (seqs(b), b.live))
                .collect::<Vec<_>>(),
            vec![(vec![1, 2], false), (vec![3, 4], false)]
        );
    }

    /// A small xorshift generator: the same seed, the same run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// Random records, losses, reorders, duplicates, reconnects and time: every record
    /// made reaches the backend and leaves the outbox by an ack; none is sent twice
    /// between two reconnects or resends (live-first included); the window is never
    /// overfilled; and everything drains once the network behaves.
    #[test]
    fn random_loss_reorder_and_reconnects_lose_nothing() {
        for seed in 1..=200u64 {
            run_random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        }
    }

    fn run_random(seed: u64) {
        let mut rng = Rng(seed);
        let window = 1 + rng.below(4) as usize;
        let live_first = rng.chance(50);
        let per_batch = 1 + rng.below(4) as usize;
        let s = settings(window, live_first, per_batch);
        let t0 = Instant::now();
        let mut now = t0;
        let mut core = SyncCore::new(s, now);
        let mut ob = Fake::new();
        // Batches on the way to the backend, and acks on the way back.
        let mut up: Vec<Vec<u64>> = Vec::new();
        let mut down: Vec<Ack> = Vec::new();
        let mut stored: BTreeSet<u64> = BTreeSet::new();
        let mut made = 0u64;
        // Seqs sent since the last reconnect or resend: none goes twice in between.
        let mut sent_since_reset: BTreeSet<u64> = BTreeSet::new();
        let steps = 400;
        for step in 0..steps + 2000 {
            let chaos = step < steps;
            if chaos && rng.chance(30) {
                made += ob.append(1 + rng.below(3)).len() as u64;
            }
            if chaos && rng.chance(3) {
                core.on_disconnected();
                up.clear();
                down.clear();
            }
            if !core.is_connected() && (!chaos || rng.chance(30)) {
                core.on_connected(ob.next_seq, now);
                sent_since_reset.clear();
            }
            // The pump: the outbox's first seq once, then batches while given.
            let first = ob.first();
            while let Some(b) = core.next_batch(&mut ob, first) {
                for r in &b.records {
                    assert!(
                        sent_since_reset.insert(r.seq),
                        "seed {seed}: {} sent twice without a reconnect or resend",
                        r.seq
                    );
                }
                core.sent(b.last_seq(), b.live, now);
                assert!(core.inflight() <= window, "seed {seed}: window overfilled");
                if !(chaos && rng.chance(15)) {
                    up.push(seqs(&b));
                }
            }
            // The network delivers some, in any order, some twice.
            if !up.is_empty() && (!chaos || rng.chance(60)) {
                let i = if chaos {
                    rng.below(up.len() as u64) as usize
                } else {
                    0
                };
                let batch = if chaos && rng.chance(10) {
                    up[i].clone()
                } else {
                    up.remove(i)
                };
                stored.extend(&batch);
                if !(chaos && rng.chance(15)) {
                    down.push(Ack::from_seqs(1, batch));
                }
            }
            if !down.is_empty() && (!chaos || rng.chance(60)) {
                let i = if chaos {
                    rng.below(down.len() as u64) as usize
                } else {
                    0
                };
                let ack = if chaos && rng.chance(10) {
                    down[i].clone()
                } else {
                    down.remove(i)
                };
                ob.ack(&ack);
                core.on_ack(&ack, now);
            }
            now += Duration::from_millis(if chaos { rng.below(2_000) } else { 1_000 });
            if core.check_resend(now) {
                sent_since_reset.clear();
            }
            if !chaos && ob.records.is_empty() && up.is_empty() && down.is_empty() {
                break;
            }
        }
        assert!(
            ob.records.is_empty(),
            "seed {seed}: left in the outbox: {:?}; {core:?}",
            ob.records.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            ob.deleted,
            (1..=made).collect::<BTreeSet<u64>>(),
            "seed {seed}: every record acked"
        );
        assert_eq!(
            stored,
            (1..=made).collect::<BTreeSet<u64>>(),
            "seed {seed}: the backend has every record"
        );
    }
}
