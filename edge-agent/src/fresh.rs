//! Fresh, unrepeated commands. Every command a version 2 backend sends carries the time
//! it was issued; the agent refuses:
//!
//! - any command with no issue time (`issued_ms` 0: a version 1 backend; backends are
//!   upgraded before agents, so a new agent never needs to obey one);
//! - a control command (load, unload, configure, cancel, schedules) issued more than
//!   [`WINDOW_MS`] before the newest command the agent has accepted, and one whose id
//!   it has seen: the ids of recent control commands are kept (at most [`MAX_IDS`],
//!   each until its issue time leaves the window, and stored beside the outbox so a
//!   restart keeps them), so a captured command cannot be played again, now or later.
//!   Time here is the backend's, as the commands' issue times tell it, never the
//!   agent's own clock: a router without a real-time clock boots with any time;
//! - a command whose id is empty or longer than [`MAX_ID_BYTES`] (ids are kept);
//! - a run issued before what the agent's command log still remembers (see
//!   [`crate::outbox::SledOutbox::forgotten_before_ms`]). Runs are de-duplicated by
//!   that log and bounded by their deadline, not by this window: a run queued on the
//!   backend for days is sent with a new issue time, and keeps its id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How long before the newest command the agent accepted a control command may have
/// been issued (commands may arrive out of order, and a backend's clocks differ).
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

/// Ids of recent control commands, with their issue times, and the newest issue time
/// of any command accepted: the backend's time as far as the agent knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlIds {
    seen: HashMap<String, i64>,
    newest: i64,
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

    /// The newest issue time of any command accepted (0: none yet).
    pub fn newest(&self) -> i64 {
        self.newest
    }

    /// A command was accepted (a run too): its issue time moves the agent's idea of
    /// the backend's time forward, and ids that left the window are forgotten (a replay
    /// of them is stale).
    pub fn saw(&mut self, issued_ms: i64) {
        self.newest = self.newest.max(issued_ms);
        let newest = self.newest;
        self.seen
            .retain(|_, &mut issued| issued.saturating_add(WINDOW_MS) >= newest);
    }

    /// Checks a control command; accepted ones are remembered (the caller stores the
    /// set afterwards).
    pub fn check(&mut self, id: &str, issued_ms: i64) -> Result<(), Refusal> {
        if let Some(r) = id_too_long(id) {
            return Err(r);
        }
        if issued_ms == 0 {
            return Err(no_issue_time(id));
        }
        if self.newest > 0 && issued_ms.saturating_add(WINDOW_MS) < self.newest {
            let behind = self.newest.saturating_sub(issued_ms);
            return Err(Refusal {
                reason: "stale",
                message: format!(
                    "command {id} was issued {behind} ms before the newest command this agent accepted; control commands must be within {WINDOW_MS} ms of it (a replayed command)"
                ),
                skew_ms: Some(issued_ms.saturating_sub(self.newest)),
            });
        }
        if self.seen.contains_key(id) {
            return Err(Refusal {
                reason: "repeated",
                message: format!("command {id} was received before; not applied again"),
                skew_ms: None,
            });
        }
        self.saw(issued_ms);
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
/// let go, on the agent's clock), less the window for clock differences. `newest`: the
/// backend's time as the agent knows it ([`ControlIds::newest`]); when the agent's
/// clock is ahead of it (a wrong real-time clock), the log's times cannot be compared
/// with issue times, and the log's own de-duplication is all there is.
pub fn check_run(
    id: &str,
    issued_ms: i64,
    forgotten_before_ms: i64,
    newest: i64,
) -> Result<(), Refusal> {
    if let Some(r) = id_too_long(id) {
        return Err(r);
    }
    if issued_ms == 0 {
        return Err(no_issue_time(id));
    }
    let comparable = newest == 0 || forgotten_before_ms <= newest.saturating_add(WINDOW_MS);
    if comparable
        && forgotten_before_ms > 0
        && issued_ms <= forgotten_before_ms.saturating_add(WINDOW_MS)
    {
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
        assert_eq!(ids.check("a", 0).unwrap_err().reason, "no_issue_time");
        // With nothing seen yet, any issue time is taken (whatever the agent's clock).
        ids.check("first", NOW).unwrap();
        assert_eq!(ids.newest(), NOW);
        let old = ids.check("b", NOW - 3_600_000).unwrap_err();
        assert_eq!((old.reason, old.skew_ms), ("stale", Some(-3_600_000)));
        assert!(old.message.contains("3600000 ms before"), "{}", old.message);
        // Out of order within the window is fine; later ones move the reference.
        ids.check("d", NOW - WINDOW_MS).unwrap();
        ids.check("e", NOW + 5_000).unwrap();
        assert_eq!(ids.check("e", NOW + 5_000).unwrap_err().reason, "repeated");
        // A refused command is not remembered: the same id in time is taken.
        ids.check("b", NOW).unwrap();
        // Extremes do not overflow.
        assert_eq!(ids.check("x", i64::MIN).unwrap_err().reason, "stale");
        ids.check("y", i64::MAX).unwrap();
        assert_eq!(ids.check("z", NOW).unwrap_err().reason, "stale");
    }

    /// A router that boots with its clock in 1970 or 2099 still takes its commands:
    /// only the backend's own issue times are compared.
    #[test]
    fn the_agents_own_clock_plays_no_part() {
        let mut ids = ControlIds::default();
        ids.check("a", NOW).unwrap();
        ids.check("b", NOW + 60_000).unwrap();
        check_run("r", NOW + 61_000, 0, ids.newest()).unwrap();
    }

    #[test]
    fn ids_are_kept_across_a_restart_and_pruned_past_the_window() {
        let mut ids = ControlIds::default();
        ids.check("a", NOW).unwrap();
        let mut back = ControlIds::from_bytes(&ids.to_bytes());
        assert_eq!(back, ids);
        assert_eq!(back.check("a", NOW).unwrap_err().reason, "repeated");
        // Once a later command is seen past the window, the id is forgotten, and a
        // replay is stale anyway.
        back.saw(NOW + WINDOW_MS + 1);
        assert!(back.is_empty());
        assert_eq!(back.check("a", NOW).unwrap_err().reason, "stale");
        assert_eq!(
            ControlIds::from_bytes(b"garbage\xff"),
            ControlIds::default()
        );
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut ids = ControlIds::default();
        for i in 0..MAX_IDS {
            ids.check(&format!("c{i}"), NOW).unwrap();
        }
        assert_eq!(ids.check("one-more", NOW).unwrap_err().reason, "flood");
        assert_eq!(ids.len(), MAX_IDS);
        // Once the old ones leave the window, new commands are taken again.
        let later = NOW + WINDOW_MS + 1;
        ids.check("one-more", later).unwrap();
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn runs_need_an_issue_time_the_log_still_covers() {
        assert_eq!(check_run("r", 0, 0, 0).unwrap_err().reason, "no_issue_time");
        check_run("r", NOW, 0, 0).unwrap();
        check_run("r", NOW, NOW - 8 * 86_400_000, NOW).unwrap();
        let f = check_run("r", NOW - 8 * 86_400_000, NOW - 8 * 86_400_000 + 1, NOW).unwrap_err();
        assert_eq!(f.reason, "forgotten");
        check_run("r", NOW, NOW - WINDOW_MS - 1, NOW).unwrap();
        assert!(check_run("r", NOW, NOW - WINDOW_MS, NOW).is_err());
        assert!(check_run("r", i64::MIN + 1, i64::MAX, 0).is_err());
        // The log's clock (the agent's) far ahead of the backend's: not comparable.
        check_run("r", NOW, NOW + 365 * 86_400_000, NOW).unwrap();
    }

    #[test]
    fn ids_must_be_of_a_sane_length() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let r = check_run(&long, NOW, 0, 0).unwrap_err();
        assert_eq!(r.reason, "bad_id");
        assert!(!r.message.contains(&long));
        assert_eq!(check_run("", NOW, 0, 0).unwrap_err().reason, "bad_id");
        check_run(&"x".repeat(MAX_ID_BYTES), NOW, 0, 0).unwrap();
        let mut ids = ControlIds::default();
        assert_eq!(ids.check(&long, NOW).unwrap_err().reason, "bad_id");
        assert!(ids.is_empty());
    }
}
