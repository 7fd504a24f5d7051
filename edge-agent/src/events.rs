//! The agent's operational events, one type each (after vector's `internal_events`).
//! Something an operator must see (a refused command, a lost outbox, a panicking
//! module) is both a log line on the device and an event record in the outbox, which
//! reaches the backend (`/agents/{id}/events`) even from an agent that was offline
//! when it happened. [`AgentEvent`] gives both from one value, and
//! [`crate::agent::Agent::emit`] writes both, so neither can be added or changed at a
//! call site without the other. Kinds and messages are what the backend, its tests
//! and operators' queries read: keep them stable.

use std::time::Duration;

use crate::fresh::Refusal;
use crate::schedule::Missed;

/// One operational event of the agent.
pub trait AgentEvent {
    /// Writes the event's log line.
    fn log(&self);
    /// The event record for the backend: its kind and message; `None` for an event
    /// that is only logged this time (a repeat the backend already has).
    fn record(&self) -> Option<(&str, String)>;
}

/// The outbox could not be read at start; it was moved aside and a new epoch begun.
/// (The outbox logged the failure when it opened.)
pub struct OutboxCorrupt<'a> {
    pub why: &'a str,
    pub aside: &'a std::path::Path,
    /// ` {old}, replaced by {new}`, or empty.
    pub replaced: &'a str,
}

impl AgentEvent for OutboxCorrupt<'_> {
    fn log(&self) {}
    fn record(&self) -> Option<(&str, String)> {
        Some((
            "outbox_corrupt",
            format!(
                "the outbox could not be read ({}); moved to {} and started a new epoch{}",
                self.why,
                self.aside.display(),
                self.replaced
            ),
        ))
    }
}

/// The outbox of the last run is gone (power loss, a full or failing disk, removed).
pub struct OutboxLost {
    pub lost_epoch: u64,
    pub epoch: u64,
}

impl AgentEvent for OutboxLost {
    fn log(&self) {
        tracing::error!(
            lost_epoch = self.lost_epoch,
            epoch = self.epoch,
            "the outbox was lost or truncated since the last start"
        );
    }
    fn record(&self) -> Option<(&str, String)> {
        Some((
            "outbox_lost",
            format!(
                "the outbox of epoch {:016x} was lost or truncated (power loss, a full or failing disk, or removed); its unsent records are gone; new epoch {:016x}",
                self.lost_epoch, self.epoch
            ),
        ))
    }
}

/// A run that was in progress when the agent stopped; reported failed, never rerun.
pub enum RunInterrupted<'a> {
    Slot {
        run_id: &'a str,
        measurement: &'a str,
        slot_ms: i64,
        cause: &'a str,
    },
    Request {
        id: &'a str,
        cause: &'a str,
    },
}

impl AgentEvent for RunInterrupted<'_> {
    fn log(&self) {
        match self {
            RunInterrupted::Slot { run_id, .. } => {
                tracing::warn!(run = %run_id, "scheduled run interrupted by an agent restart")
            }
            RunInterrupted::Request { id, .. } => {
                tracing::warn!(request = %id, "command interrupted by an agent restart")
            }
        }
    }
    fn record(&self) -> Option<(&str, String)> {
        let message = match self {
            RunInterrupted::Slot {
                measurement,
                slot_ms,
                cause,
                ..
            } => format!("measurement {measurement} slot {slot_ms}: {cause}"),
            RunInterrupted::Request { id, cause } => format!("request {id}: {cause}"),
        };
        Some(("run_interrupted", message))
    }
}

/// A command refused before it ran: stale, repeated, a flood, or forgotten.
pub struct CommandRefused<'a> {
    /// The command's id, clipped.
    pub id: &'a str,
    pub kind: &'static str,
    pub issued_ms: i64,
    pub refusal: &'a Refusal,
}

impl AgentEvent for CommandRefused<'_> {
    fn log(&self) {
        let (id, kind, r) = (self.id, self.kind, self.refusal);
        match r.skew_ms {
            Some(skew_ms) => tracing::warn!(
                command = %id,
                kind,
                reason = r.reason,
                issued_ms = self.issued_ms,
                skew_ms,
                "command refused: issued {skew_ms} ms from the newest command this agent accepted (a replay, or a backend clock that went back)"
            ),
            None => {
                tracing::warn!(command = %id, kind, reason = r.reason, "command refused: {}", r.message)
            }
        }
    }
    fn record(&self) -> Option<(&str, String)> {
        let r = self.refusal;
        Some((
            "command_refused",
            format!(
                "{} command refused ({}): {}",
                self.kind, r.reason, r.message
            ),
        ))
    }
}

/// A whole schedule set refused; the set already running stays. Recorded once per
/// version (the backend resends a set until the agent's hello shows it).
pub struct SchedulesRefused<'a> {
    pub version: u64,
    pub why: &'a str,
    /// False for a resend of a version already reported.
    pub first: bool,
}

impl AgentEvent for SchedulesRefused<'_> {
    fn log(&self) {
        let (version, why) = (self.version, self.why);
        tracing::warn!(version, %why, "schedule set refused");
    }
    fn record(&self) -> Option<(&str, String)> {
        self.first.then(|| {
            (
                "schedules_refused",
                format!("version {} refused: {}", self.version, self.why),
            )
        })
    }
}

/// One schedule of a set refused; the others are kept.
pub struct ScheduleRefused<'a> {
    /// The measurement id, clipped.
    pub measurement: &'a str,
    pub field: &'a str,
    pub rule: &'a str,
}

impl AgentEvent for ScheduleRefused<'_> {
    fn log(&self) {
        let (measurement, field, rule) = (self.measurement, self.field, self.rule);
        tracing::warn!(%measurement, field, %rule, "schedule refused");
    }
    fn record(&self) -> Option<(&str, String)> {
        Some((
            "schedule_refused",
            format!(
                "measurement {:?}: {}: {}",
                self.measurement, self.field, self.rule
            ),
        ))
    }
}

/// A new schedule set is in force.
pub struct SchedulesUpdated {
    pub version: u64,
    pub schedules: usize,
}

impl AgentEvent for SchedulesUpdated {
    fn log(&self) {
        let (version, schedules) = (self.version, self.schedules);
        tracing::info!(version, schedules, "schedules updated");
    }
    fn record(&self) -> Option<(&str, String)> {
        Some((
            "schedules_updated",
            format!(
                "version {}: {} recurring measurements",
                self.version, self.schedules
            ),
        ))
    }
}

/// Slots of a measurement that were too late to start (the agent was down or busy);
/// named, so each gap in its results is explained.
pub struct ScheduleMissed<'a> {
    pub missed: &'a Missed,
}

impl AgentEvent for ScheduleMissed<'_> {
    fn log(&self) {
        let m = self.missed;
        tracing::warn!(measurement = %m.measurement_id, missed = m.count, "scheduled runs missed");
    }
    fn record(&self) -> Option<(&str, String)> {
        let m = self.missed;
        Some((
            "schedule_missed",
            format!(
                "measurement {}: {} runs were too late to start (slots {} to {})",
                m.measurement_id, m.count, m.first_ms, m.last_ms
            ),
        ))
    }
}

/// A module was loaded, unloaded or configured (`kind` says which).
pub struct ModulesChanged<'a> {
    pub kind: &'a str,
    pub module: &'a str,
}

impl AgentEvent for ModulesChanged<'_> {
    fn log(&self) {
        let (module, kind) = (self.module, self.kind);
        tracing::info!(%module, kind, "modules changed");
    }
    fn record(&self) -> Option<(&str, String)> {
        Some((self.kind, self.module.to_string()))
    }
}

/// A module command (load, unload, configure) refused.
pub struct ModuleCommandRefused<'a> {
    pub kind: &'a str,
    pub module: &'a str,
    pub message: &'a str,
}

impl AgentEvent for ModuleCommandRefused<'_> {
    fn log(&self) {
        let (module, kind, message) = (self.module, self.kind, self.message);
        tracing::warn!(%module, kind, %message, "module command refused");
    }
    fn record(&self) -> Option<(&str, String)> {
        Some(("module_command_refused", self.message.to_string()))
    }
}

/// A module panicked often enough to be held back before its next run.
pub struct ModuleRestarting<'a> {
    pub module: &'a str,
    pub backoff: Duration,
}

impl AgentEvent for ModuleRestarting<'_> {
    fn log(&self) {
        let (module, backoff) = (self.module, self.backoff);
        tracing::warn!(%module, ?backoff, "module panicked; restarting it with backoff");
    }
    fn record(&self) -> Option<(&str, String)> {
        Some((
            "module_restarting",
            format!(
                "{} panicked; next run in {} ms",
                self.module,
                self.backoff.as_millis()
            ),
        ))
    }
}

/// An update or a settings change that failed, was refused, or was rolled back by the
/// supervisor. `kind` is `update_failed`, `update_refused` or `settings_failed`; the
/// message names the version when known and says why.
pub struct LifecycleFailed<'a> {
    pub kind: &'a str,
    /// The release or settings version, or empty when the reason names it.
    pub version: &'a str,
    pub reason: &'a str,
}

impl AgentEvent for LifecycleFailed<'_> {
    fn log(&self) {
        let (kind, version, reason) = (self.kind, self.version, self.reason);
        tracing::error!(kind, version, %reason, "update or settings change failed");
    }
    fn record(&self) -> Option<(&str, String)> {
        // The kind is one of three fixed names; anything else is reported as a failure.
        let kind = match self.kind {
            "update_refused" => "update_refused",
            "settings_failed" => "settings_failed",
            _ => "update_failed",
        };
        let reason = self
            .reason
            .strip_prefix(kind)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(self.reason);
        Some((
            kind,
            if self.version.is_empty() {
                reason.to_string()
            } else {
                format!("version {}: {reason}", self.version)
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records keep the kinds and messages the backend and its tests read.
    #[test]
    fn records_keep_their_kinds_and_messages() {
        let r = Refusal {
            reason: "stale",
            message: "too old".into(),
            skew_ms: Some(-5),
        };
        let refused = CommandRefused {
            id: "c1",
            kind: "run",
            issued_ms: 1,
            refusal: &r,
        };
        assert_eq!(
            refused.record(),
            Some((
                "command_refused",
                "run command refused (stale): too old".into()
            ))
        );
        let again = SchedulesRefused {
            version: 3,
            why: "1001 schedules",
            first: false,
        };
        assert_eq!(again.record(), None, "a repeat is logged, not recorded");
        let first = SchedulesRefused {
            first: true,
            ..again
        };
        assert_eq!(
            first.record(),
            Some((
                "schedules_refused",
                "version 3 refused: 1001 schedules".into()
            ))
        );
        let loaded = ModulesChanged {
            kind: "module_loaded",
            module: "tcping",
        };
        assert_eq!(loaded.record(), Some(("module_loaded", "tcping".into())));
        let restarting = ModuleRestarting {
            module: "faulty_module",
            backoff: Duration::from_millis(1500),
        };
        assert_eq!(
            restarting.record(),
            Some((
                "module_restarting",
                "faulty_module panicked; next run in 1500 ms".into()
            ))
        );
        let missed = Missed {
            measurement_id: "m".into(),
            count: 2,
            first_ms: 10,
            last_ms: 20,
        };
        assert_eq!(
            ScheduleMissed { missed: &missed }.record().unwrap().1,
            "measurement m: 2 runs were too late to start (slots 10 to 20)"
        );
        let lost = OutboxLost {
            lost_epoch: 1,
            epoch: 2,
        };
        assert!(lost
            .record()
            .unwrap()
            .1
            .starts_with("the outbox of epoch 0000000000000001 was lost"));
    }
}
