//! Internal events: one type per operational event, after vector's `internal_events`.
//!
//! Something that happens to a cloud process and that an operator must be able to see
//! (a refused login, a dropped message, a bus error) is a struct holding what describes
//! it, and [`InternalEvent::emit`] does everything the event means: it increments the
//! event's counter (read by `/health` and `/metrics`) and writes its log line. A call
//! site only builds the event and emits it, so a counter and its log line cannot drift
//! apart: neither can be added, removed or changed at one site and not the other.
//!
//! An event names its counter (a field of a stats struct, or a process-wide static)
//! and keeps its metric's name, labels, log level, message and fields exactly as they
//! were before events existed: tests and dashboards read them. The events here are the
//! ones of this crate's code (credentials, the NATS bus, the Prometheus instruments);
//! a process that links this crate defines its own events with the same trait (the
//! bridge's are in `imn-bridge`'s `broker` module).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::AuthStats;

/// An operational event: [`emit`](InternalEvent::emit) counts it and logs it.
pub trait InternalEvent {
    /// Counts the event and writes its log line, if it has one.
    fn emit(self);
}

/// Emits `event`: `emit(LoginRefused { .. })` reads as what happened.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

// ---------------------------------------------------------------- credentials (auth)

/// An MQTT login was refused: unknown id, wrong token, revoked, or an id and user name
/// that differ. `imn_bridge_refused_total{reason="login"}`, warn.
pub struct LoginRefused<'a> {
    pub stats: &'a AuthStats,
    pub client_id: &'a str,
    pub username: &'a str,
}

impl InternalEvent for LoginRefused<'_> {
    fn emit(self) {
        count(&self.stats.logins_refused, 1);
        let (client_id, username) = (self.client_id, self.username);
        tracing::warn!(client_id, username, "MQTT login refused");
    }
}

/// What a client asked the topic ACL for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclAccess {
    Publish,
    Subscribe,
    /// A last will, published for the client when it goes.
    Will,
}

/// The topic ACL refused a client's publish, subscription or will.
/// `imn_bridge_refused_total{reason="publish_acl" | "subscribe_acl" | "will_acl"}`,
/// warn (a will is logged with `access = "publish"`).
pub struct AclDenied<'a> {
    pub stats: &'a AuthStats,
    pub client_id: &'a str,
    pub topic: &'a str,
    pub access: AclAccess,
}

impl InternalEvent for AclDenied<'_> {
    fn emit(self) {
        let counter = match self.access {
            AclAccess::Publish => &self.stats.publish_denied,
            AclAccess::Subscribe => &self.stats.subscribe_denied,
            AclAccess::Will => &self.stats.will_denied,
        };
        count(counter, 1);
        let (client_id, topic) = (self.client_id, self.topic);
        tracing::warn!(
            client_id,
            topic,
            access = if self.access == AclAccess::Subscribe {
                "subscribe"
            } else {
                "publish"
            },
            "refused by the topic ACL"
        );
    }
}

/// An uplink message was dropped: not signed by the agent its topic names, or that
/// agent is not enrolled or is revoked. `imn_bridge_refused_total{reason="signature"}`,
/// warn.
pub struct UplinkNotSigned<'a> {
    pub stats: &'a AuthStats,
    pub topic: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for UplinkNotSigned<'_> {
    fn emit(self) {
        count(&self.stats.unsigned_or_forged, 1);
        let (topic, reason) = (self.topic, self.reason);
        tracing::warn!(%topic, reason, "dropping an uplink message that is not signed by the topic's agent");
    }
}

// ---------------------------------------------------------------- NATS bus

/// An uplink frame went to JetStream (its ack is awaited apart): counts the frame and
/// its messages. No log line.
pub struct UplinkFramePublished<'a> {
    pub frames: &'a AtomicU64,
    pub framed_messages: &'a AtomicU64,
    pub messages: u64,
}

impl InternalEvent for UplinkFramePublished<'_> {
    fn emit(self) {
        count(self.frames, 1);
        count(self.framed_messages, self.messages);
    }
}

/// Why an uplink frame failed; its agents get no backend ack and resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFailure {
    /// The publish itself failed.
    Publish,
    /// JetStream did not ack the frame.
    Ack,
}

/// An uplink frame of `messages` messages was not stored: counts its messages as
/// publish failures, warn.
pub struct UplinkFrameFailed<'a, E: std::fmt::Display> {
    pub failures: &'a AtomicU64,
    pub messages: u64,
    pub failure: FrameFailure,
    pub error: E,
}

impl<E: std::fmt::Display> InternalEvent for UplinkFrameFailed<'_, E> {
    fn emit(self) {
        count(self.failures, self.messages);
        let (e, n) = (self.error, self.messages);
        match self.failure {
            FrameFailure::Publish => {
                tracing::warn!(error = %e, messages = n, "cannot publish an uplink frame; its agents will resend")
            }
            FrameFailure::Ack => {
                tracing::warn!(error = %e, messages = n, "jetstream did not ack an uplink frame; its agents will resend")
            }
        }
    }
}

// ---------------------------------------------------------------- Prometheus instruments

/// A label set was not recorded: its instrument had [`crate::telemetry::prom::MAX_SERIES`]
/// already. `imn_metric_series_dropped_total`. No log line (it would be one per sample).
pub struct SeriesDropped;

impl InternalEvent for SeriesDropped {
    fn emit(self) {
        count(&crate::telemetry::prom::SERIES_DROPPED, 1);
    }
}

/// A label set was not recorded because its agent had its
/// [`crate::telemetry::prom::MAX_SERIES_PER_AGENT`] in the instrument already.
/// `imn_metric_series_dropped_total` and the per-agent part of it; warn, only the
/// `first` time for that agent and instrument.
pub struct AgentSeriesDropped<'a> {
    pub agent: &'a str,
    pub metric: &'static str,
    pub first: bool,
}

impl InternalEvent for AgentSeriesDropped<'_> {
    fn emit(self) {
        use crate::telemetry::prom::{
            MAX_SERIES_PER_AGENT, SERIES_DROPPED, SERIES_DROPPED_PER_AGENT,
        };
        count(&SERIES_DROPPED, 1);
        count(&SERIES_DROPPED_PER_AGENT, 1);
        if self.first {
            tracing::warn!(
                agent = %self.agent,
                metric = self.metric,
                cap = MAX_SERIES_PER_AGENT,
                "an agent reached its series cap in a metric: its new label sets are dropped (imn_metric_series_dropped_total)"
            );
        }
    }
}
