//! Fresh, unrepeated commands. Every command a version 2 backend sends carries the time
//! it was issued; the agent refuses:
//!
//! - any command with no issue time (`issued_ms` 0: a version 1 backend; backends are
//!   upgraded before agents, so a new agent never needs to obey one);
//! - a control command (load, unload, configure, cancel, schedules) issued more than
//!   [`WINDOW_MS`] away from the agent's clock, and one whose id it has seen: the ids
//!   of recent control commands are kept (at most [`MAX_IDS`], each until its issue
//!   time leaves the window, and stored beside the outbox so a restart keeps them), so
//!   a captured command cannot be played again, now or later;
//! - a command whose id is empty or longer than [`MAX_ID_BYTES`] (ids are kept);
//! - a run issued before what the agent's command log still remembers (see
//!   [`crate::outbox::SledOutbox::forgotten_before_ms`]). Runs are de-duplicated by
//!   that log and bounded by their deadline, not by this window: a run queued on the
//!   backend for days is sent with a new issue time, and keeps its id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How far a control command's issue time may be from the agent's clock.
pub const WINDOW_MS: i64 = 10 * 60 * 1000;
/// Control command ids remembered at most. More than this within the window is a
/// flood: new control commands are refused until old ids leave the window.
pub const MAX_IDS: usize = 10_000;

/// The longest command id taken (the backend's are UUIDs): the agent keeps ids, so it
/// does not keep arbitrary amounts of them.
pub const MAX_ID_BYTES: usize = 128;

/// Where the remembered ids are kept in the outbox's meta tree.
pub const META_CONTROL_IDS: &[u8] = b"control_ids";

/// Why a command was refused, for the log and the `command_refused` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// A short word: `no_issue_time`, `stale`, `repeated`, `flood`, `forgotten`.
    pub reason: &'static str,
    pub message: String,
    /// The issue time minus the agent's clock, when the refusal is about time.
    pub skew_ms: Option<i64>,
}

/// Ids of recent control commands, with their issue times.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlIds {
    seen: HashMap<String, i64>,
}

/// Refuses an id too long to keep (it is not repeated in the message).
fn id_too_long(id: &str) -> Option<Refusal> {
    (id.len() > MAX_ID_BYTES || id.is_empty()).then(|| Refusal {
        reason: "bad_id",
        message: format!(
            "a command id must be 1 to {MAX_ID_BYTES} bytes (got {})",
            id.len()
        ),
        skew_ms: None,
    })
}

fn no_issue_time(id: &str) -> Refusal {
    Refusal {
        reason: "no_issue_time",
        message: format!(
            "command {id} has no issue time (issued_ms 0: a version 1 backend); upgrade the backend"
        ),
        skew_ms: None,
    }
}

impl ControlIds {
    pub fn from_bytes(bytes: &[u8]) -> ControlIds {
        postcard::from_bytes(bytes).unwrap_or_default()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets ids whose issue time has left the window (a replay of them is stale).
    pub fn prune(&mut self, now: i64) {
        self.seen
            .retain(|_, &mut issued| issued.saturating_add(WINDOW_MS) >= now);
    }

    /// Checks a control command; accepted ones are remembered (the caller stores the
    /// set afterwards).
    pub fn check(&mut self, id: &str, issued_ms: i64, now: i64) -> Result<(), Refusal> {
        if let Some(r) = id_too_long(id) {
            return Err(r);
        }
        if issued_ms == 0 {
            return Err(no_issue_time(id));
        }
        let skew = issued_ms.saturating_sub(now);
        if skew.saturating_abs() > WINDOW_MS {
            let (dir, by) = if skew < 0 {
                ("before", skew.saturating_neg())
            } else {
                ("after", skew)
            };
            return Err(Refusal {
                reason: "stale",
                message: format!(
                    "command {id} was issued {by} ms {dir} the agent's clock; control commands must be within {WINDOW_MS} ms (a replayed command, or a clock that is wrong here or on the backend)"
                ),
                skew_ms: Some(skew),
            });
        }
        if self.seen.contains_key(id) {
            return Err(Refusal {
                reason: "repeated",
                message: format!("command {id} was received before; not applied again"),
                skew_ms: None,
            });
        }
        self.prune(now);
        if self.seen.len() >= MAX_IDS {
            return Err(Refusal {
                reason: "flood",
                message: format!(
                    "more than {MAX_IDS} control commands within {WINDOW_MS} ms; command {id} refused"
                ),
                skew_ms: None,
            });
        }
        self.seen.insert(id.to_string(), issued_ms);
        Ok(())
    }
}

/// Checks a run command's issue time: present, and not before what the command log
/// still remembers (`forgotten_before_ms`, the receive time of the newest entry it has
/// let go), less the window for clock differences.
pub fn check_run(id: &str, issued_ms: i64, forgotten_before_ms: i64) -> Result<(), Refusal> {
    if let Some(r) = id_too_long(id) {
        return Err(r);
    }
    if issued_ms == 0 {
        return Err(no_issue_time(id));
    }
    if forgotten_before_ms > 0 && issued_ms <= forgotten_before_ms.saturating_add(WINDOW_MS) {
        return Err(Refusal {
            reason: "forgotten",
            message: format!(
                "run {id} was issued at {issued_ms}, before what the agent's command log remembers ({forgotten_before_ms}); it could be a replay of a run already done"
            ),
            skew_ms: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn control_commands_must_be_fresh_and_new() {
        let mut ids = ControlIds::default();
        assert_eq!(ids.check("a", 0, NOW).unwrap_err().reason, "no_issue_time");
        let old = ids.check("b", NOW - 3_600_000, NOW).unwrap_err();
        assert_eq!((old.reason, old.skew_ms), ("stale", Some(-3_600_000)));
        assert!(old.message.contains("3600000 ms before"), "{}", old.message);
        let ahead = ids.check("c", NOW + WINDOW_MS + 1, NOW).unwrap_err();
        assert!(ahead.message.contains("after"), "{}", ahead.message);
        ids.check("d", NOW - WINDOW_MS, NOW).unwrap();
        ids.check("e", NOW + 5_000, NOW).unwrap();
        assert_eq!(
            ids.check("e", NOW + 5_000, NOW).unwrap_err().reason,
            "repeated"
        );
        // Refused commands are not remembered.
        assert!(ids.check("b", NOW, NOW).is_ok());
        assert_eq!(ids.len(), 3);
        // Extremes do not overflow.
        assert_eq!(ids.check("x", i64::MIN, NOW).unwrap_err().reason, "stale");
        assert_eq!(
            ids.check("y", i64::MAX, i64::MIN).unwrap_err().reason,
            "stale"
        );
    }

    #[test]
    fn ids_are_kept_across_a_restart_and_pruned_past_the_window() {
        let mut ids = ControlIds::default();
        ids.check("a", NOW, NOW).unwrap();
        let mut back = ControlIds::from_bytes(&ids.to_bytes());
        assert_eq!(back, ids);
        assert_eq!(
            back.check("a", NOW, NOW + 1000).unwrap_err().reason,
            "repeated"
        );
        // Past the window the id is forgotten, and a replay is stale anyway.
        back.prune(NOW + WINDOW_MS + 1);
        assert!(back.is_empty());
        assert_eq!(
            back.check("a", NOW, NOW + WINDOW_MS + 1)
                .unwrap_err()
                .reason,
            "stale"
        );
        assert_eq!(
            ControlIds::from_bytes(b"garbage\xff"),
            ControlIds::default()
        );
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut ids = ControlIds::default();
        for i in 0..MAX_IDS {
            ids.check(&format!("c{i}"), NOW, NOW).unwrap();
        }
        assert_eq!(ids.check("one-more", NOW, NOW).unwrap_err().reason, "flood");
        assert_eq!(ids.len(), MAX_IDS);
        // Once the old ones leave the window, new commands are taken again.
        let later = NOW + WINDOW_MS + 1;
        ids.check("one-more", later, later).unwrap();
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn runs_need_an_issue_time_the_log_still_covers() {
        assert_eq!(check_run("r", 0, 0).unwrap_err().reason, "no_issue_time");
        check_run("r", NOW, 0).unwrap();
        check_run("r", NOW, NOW - 8 * 86_400_000).unwrap();
        let f = check_run("r", NOW - 8 * 86_400_000, NOW - 8 * 86_400_000 + 1).unwrap_err();
        assert_eq!(f.reason, "forgotten");
        check_run("r", NOW, NOW - WINDOW_MS - 1).unwrap();
        assert!(check_run("r", NOW, NOW - WINDOW_MS).is_err());
        assert!(check_run("r", i64::MIN + 1, i64::MAX).is_err());
    }

    #[test]
    fn ids_must_be_of_a_sane_length() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let r = check_run(&long, NOW, 0).unwrap_err();
        assert_eq!(r.reason, "bad_id");
        assert!(!r.message.contains(&long));
        assert_eq!(check_run("", NOW, 0).unwrap_err().reason, "bad_id");
        check_run(&"x".repeat(MAX_ID_BYTES), NOW, 0).unwrap();
        let mut ids = ControlIds::default();
        assert_eq!(ids.check(&long, NOW, NOW).unwrap_err().reason, "bad_id");
        assert!(ids.is_empty());
    }
}
