//! The ingest pipeline's operational events, one type each (the trait is
//! `imn_cloud::events::InternalEvent`, after vector's `internal_events`). An event's
//! `emit` does all it means: the counters `/health` reads ([`Stats`]), the error
//! metric `/metrics` exports (`imn_errors_total{kind}`), and the log line, so a call
//! site cannot count an event and forget its log line or metric, or the reverse. (Some
//! events are only counted, as before: a throttled hello, deferred events, a group
//! commit, an ack sent.)

use std::sync::atomic::{AtomicU64, Ordering};

use imn_cloud::events::InternalEvent;

use super::Stats;
use crate::observe::Metrics;
use crate::store::BatchOutcome;

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Counts a dropped uplink message under `reason`: in `undecodable`, the per-reason
/// map `/health` shows, and `imn_errors_total{kind="uplink_<reason>"}`.
fn count_dropped(stats: &Stats, metrics: &Metrics, reason: &'static str) {
    count(&stats.undecodable, 1);
    metrics.errors.inc(&[&format!("uplink_{reason}")]);
    *stats
        .rejected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(reason)
        .or_default() += 1;
}

/// An uplink message that cannot be taken (undecodable, or past a bound); dropped and
/// acked on the bus. Warn.
pub(super) struct UplinkRefused<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub agent: &'a str,
    pub kind: &'a str,
    pub reason: &'static str,
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for UplinkRefused<'_> {
    fn emit(self) {
        count_dropped(self.stats, self.metrics, self.reason);
        let (agent, kind, reason, error) = (self.agent, self.kind, self.reason, self.error);
        tracing::warn!(%agent, kind, reason, %error, "dropping an uplink message");
    }
}

/// A hello of an older wire version than the agent's last, and no later by its clock:
/// a replay, dropped (`reason="stale_hello"`). Warn.
pub(super) struct StaleHello<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub agent: &'a str,
    pub version: u8,
}

impl InternalEvent for StaleHello<'_> {
    fn emit(self) {
        count_dropped(self.stats, self.metrics, "stale_hello");
        let (agent, version) = (self.agent, self.version);
        tracing::warn!(%agent, version, "a version {version} hello older than the agent's last; dropped");
    }
}

/// An envelope whose kind does not match its topic, or a hello naming another agent
/// (`reason="mismatch"`). Warn.
pub(super) struct EnvelopeMismatch<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub agent: &'a str,
    pub kind: &'a str,
}

impl InternalEvent for EnvelopeMismatch<'_> {
    fn emit(self) {
        count_dropped(self.stats, self.metrics, "mismatch");
        let (agent, kind) = (self.agent, self.kind);
        tracing::warn!(%agent, kind, "envelope does not match its topic or agent; dropped");
    }
}

/// A message dropped unacked because its agent holds its whole share of the ingest
/// queue; the agent sends it again. `imn_errors_total{kind="uplink_shed"}`, debug.
pub(super) struct UplinkShed<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub agent: &'a str,
}

impl InternalEvent for UplinkShed<'_> {
    fn emit(self) {
        count(&self.stats.shed, 1);
        self.metrics.errors.inc(&["uplink_shed"]);
        let agent = self.agent;
        tracing::debug!(%agent, "agent over its share of the ingest queue; message dropped for the agent to resend");
    }
}

/// A hello that came less than a second after the agent's last: deferred. Counted.
pub(super) struct HelloThrottled<'a> {
    pub stats: &'a Stats,
}

impl InternalEvent for HelloThrottled<'_> {
    fn emit(self) {
        count(&self.stats.hellos_throttled, 1);
    }
}

/// Events of a batch held back past the per-batch cap (the agent sends them again).
pub(super) struct EventsDeferred<'a> {
    pub stats: &'a Stats,
    pub held: u64,
}

impl InternalEvent for EventsDeferred<'_> {
    fn emit(self) {
        count(&self.stats.events_deferred, self.held);
    }
}

/// One group commit of outbox batches, and the time the store spent in it.
pub(super) struct GroupCommitted<'a> {
    pub stats: &'a Stats,
    pub busy: std::time::Duration,
}

impl InternalEvent for GroupCommitted<'_> {
    fn emit(self) {
        count(&self.stats.store_groups, 1);
        count(
            &self.stats.store_busy_us,
            u64::try_from(self.busy.as_micros()).unwrap_or(u64::MAX),
        );
    }
}

/// What the store did with one batch of a commit: records stored, duplicates dropped,
/// second results for a run (warn, `kind="run_duplicate"`), records sent to the dead
/// letters (warn, `kind="dead_letter"`), records refused (left unacked).
pub(super) struct BatchStored<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub agent: &'a str,
    pub outcome: &'a BatchOutcome,
}

impl InternalEvent for BatchStored<'_> {
    fn emit(self) {
        let (s, o, agent) = (self.stats, self.outcome, self.agent);
        count(&s.records_stored, o.stored);
        count(&s.duplicates_dropped, o.duplicates);
        if o.run_duplicates > 0 {
            count(&s.run_duplicates_dropped, o.run_duplicates);
            self.metrics.errors.inc(&["run_duplicate"]);
            tracing::warn!(%agent, results = o.run_duplicates, "second results for runs that already have one dropped (an agent ran them again)");
        }
        count(&s.dead_lettered, o.dead_lettered);
        if o.dead_lettered > 0 {
            self.metrics.errors.inc(&["dead_letter"]);
            tracing::warn!(%agent, records = o.dead_lettered, "records the store could not take went to the dead letters");
        }
        count(&s.records_refused, o.refused.len() as u64);
    }
}

/// A group commit failed: nothing of it is acked, every message is nacked for the bus
/// to redeliver. `imn_errors_total{kind="store"}`, error.
pub(super) struct StoreFailed<'a> {
    pub stats: &'a Stats,
    pub metrics: &'a Metrics,
    pub error: &'a dyn std::fmt::Display,
    pub batches: usize,
}

impl InternalEvent for StoreFailed<'_> {
    fn emit(self) {
        count(&self.stats.store_errors, 1);
        self.metrics.errors.inc(&["store"]);
        let (error, batches) = (self.error, self.batches);
        tracing::error!(%error, batches, "cannot store batches; not acking");
    }
}

/// An ack went out on the bus.
pub(super) struct AckSent<'a> {
    pub stats: &'a Stats,
}

impl InternalEvent for AckSent<'_> {
    fn emit(self) {
        count(&self.stats.acks_sent, 1);
    }
}

/// An ack could not be published; the agent resends after its timeout.
/// `imn_errors_total{kind="bus_publish"}`, warn.
pub(super) struct AckNotSent<'a> {
    pub metrics: &'a Metrics,
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for AckNotSent<'_> {
    fn emit(self) {
        self.metrics.errors.inc(&["bus_publish"]);
        let error = self.error;
        tracing::warn!(%error, "cannot send ack; the agent will resend");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_cloud::events::emit;

    /// Each event moves exactly the counters it names, and the error metric with its
    /// label; a refused message is counted once, under its reason.
    #[test]
    fn events_count_what_they_say() {
        let (stats, metrics) = (Stats::default(), Metrics::new());
        let error = "bad bytes";
        emit(UplinkRefused {
            stats: &stats,
            metrics: &metrics,
            agent: "a",
            kind: "out",
            reason: "malformed",
            error: &error,
        });
        emit(EnvelopeMismatch {
            stats: &stats,
            metrics: &metrics,
            agent: "a",
            kind: "hello",
        });
        emit(UplinkShed {
            stats: &stats,
            metrics: &metrics,
            agent: "a",
        });
        assert_eq!(stats.undecodable.load(Ordering::Relaxed), 2);
        assert_eq!(stats.shed.load(Ordering::Relaxed), 1);
        let rejected = stats.rejected.lock().unwrap().clone();
        assert_eq!(
            rejected.into_iter().collect::<Vec<_>>(),
            [("malformed", 1), ("mismatch", 1)]
        );
        assert_eq!(metrics.errors.get(&["uplink_malformed"]), 1.0);
        assert_eq!(metrics.errors.get(&["uplink_mismatch"]), 1.0);
        assert_eq!(metrics.errors.get(&["uplink_shed"]), 1.0);

        let outcome = BatchOutcome {
            stored: 5,
            duplicates: 2,
            run_duplicates: 1,
            dead_lettered: 0,
            refused: vec![7, 8, 9],
            finished: Vec::new(),
        };
        emit(BatchStored {
            stats: &stats,
            metrics: &metrics,
            agent: "a",
            outcome: &outcome,
        });
        assert_eq!(stats.records_stored.load(Ordering::Relaxed), 5);
        assert_eq!(stats.duplicates_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(stats.run_duplicates_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(stats.records_refused.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.errors.get(&["run_duplicate"]), 1.0);
        assert_eq!(metrics.errors.get(&["dead_letter"]), 0.0);
        emit(StoreFailed {
            stats: &stats,
            metrics: &metrics,
            error: &error,
            batches: 3,
        });
        assert_eq!(stats.store_errors.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.errors.get(&["store"]), 1.0);
    }
}
