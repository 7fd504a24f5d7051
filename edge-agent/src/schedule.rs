//! Recurring measurements, run by the agent from its own stored copy of the schedule
//! set, connected or not (RIPE Atlas runs its recurring measurements on the probe the
//! same way). The backend sends the whole set with a version; the agent keeps the
//! highest version it has seen, stores it beside the outbox, and reports the version in
//! every hello so the backend can send it again when they differ.
//!
//! A schedule's slots are `start_ms + k × interval_ms`, before `stop_ms`. Slot `k` runs
//! at its time plus a jitter that is fixed for (agent, measurement, k), so a restart
//! does not move it and a thousand agents do not fire in the same millisecond. The
//! next slot of each schedule is stored before its run starts: a slot never runs twice,
//! even across a crash. A slot the agent could not start within its late limit (one
//! interval, 5 s to 5 min: the agent was not running, or its clock jumped) is skipped
//! and counted rather than run long after its time.

use imn_modules::wire::Schedule;
use serde::{Deserialize, Serialize};

/// Where the schedule set is kept in the outbox's meta tree.
pub const META_SCHEDULES: &[u8] = b"schedules";

/// The agent's schedules and how far each has run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedules {
    /// The backend's version of this set; 0 before the first.
    pub version: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub schedule: Schedule,
    /// The slot to run next.
    pub next_slot: u64,
}

/// A slot that is due now.
#[derive(Debug, Clone, PartialEq)]
pub struct DueRun {
    pub schedule: Schedule,
    /// The slot's time on the schedule, before jitter.
    pub scheduled_ms: i64,
}

/// What [`Schedules::take_due`] found.
#[derive(Debug, Default)]
pub struct Due {
    pub runs: Vec<DueRun>,
    /// Slots skipped because they were too late to start, per measurement.
    pub missed: Vec<(String, u64)>,
}

impl Entry {
    fn slot_ms(&self, k: u64) -> i64 {
        self.schedule
            .start_ms
            .saturating_add((k as i64).saturating_mul(self.schedule.interval_ms as i64))
    }

    fn in_schedule(&self, k: u64) -> bool {
        self.schedule
            .stop_ms
            .is_none_or(|stop| self.slot_ms(k) < stop)
    }

    /// When slot `k` runs: its time plus its jitter.
    fn run_at(&self, agent: &str, k: u64) -> i64 {
        self.slot_ms(k).saturating_add(jitter(
            agent,
            &self.schedule.measurement_id,
            k,
            self.schedule.jitter_ms,
        ) as i64)
    }

    /// How late a slot may start: a whole interval, at least 5 s, at most 5 min.
    fn late_limit_ms(&self) -> i64 {
        self.schedule.interval_ms.clamp(5_000, 300_000) as i64
    }

    /// The first slot still worth running at `now`.
    fn first_slot(&self, agent: &str, now: i64) -> u64 {
        let s = &self.schedule;
        if now <= s.start_ms || s.interval_ms == 0 {
            return 0;
        }
        // The slot that began most recently still runs, unless it is too late.
        let mut k = ((now - s.start_ms) as u64) / s.interval_ms;
        if self.run_at(agent, k) + self.late_limit_ms() < now {
            k += 1;
        }
        k
    }
}

/// A jitter in `0..=max_ms`, the same every time for one agent, measurement and slot
/// (FNV-1a over them, then a splitmix64 finaliser).
fn jitter(agent: &str, measurement: &str, slot: u64, max_ms: u64) -> u64 {
    if max_ms == 0 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent
        .bytes()
        .chain([0])
        .chain(measurement.bytes())
        .chain(slot.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h % (max_ms + 1)
}

impl Schedules {
    /// Takes a newer set from the backend. Schedules it already had (same measurement,
    /// same definition) keep their progress; new ones start at their first slot still
    /// worth running. False, and nothing changes, for a version not newer than ours.
    pub fn apply(&mut self, agent: &str, version: u64, set: Vec<Schedule>, now: i64) -> bool {
        if version <= self.version {
            return false;
        }
        let entries = set
            .into_iter()
            .map(|schedule| {
                let kept = self.entries.iter().find(|e| e.schedule == schedule);
                let mut e = Entry {
                    schedule,
                    next_slot: 0,
                };
                e.next_slot = match kept {
                    Some(old) => old.next_slot,
                    None => e.first_slot(agent, now),
                };
                e
            })
            .collect();
        self.version = version;
        self.entries = entries;
        true
    }

    /// Slots due at `now`, each moved past (the caller stores the set before it starts
    /// them). Slots too late to start are skipped and counted.
    pub fn take_due(&mut self, agent: &str, now: i64) -> Due {
        let mut due = Due::default();
        for e in &mut self.entries {
            let mut missed = 0;
            while e.in_schedule(e.next_slot) && e.run_at(agent, e.next_slot) <= now {
                let k = e.next_slot;
                e.next_slot += 1;
                if e.run_at(agent, k) + e.late_limit_ms() < now {
                    missed += 1;
                } else {
                    due.runs.push(DueRun {
                        schedule: e.schedule.clone(),
                        scheduled_ms: e.slot_ms(k),
                    });
                }
            }
            if missed > 0 {
                due.missed.push((e.schedule.measurement_id.clone(), missed));
            }
        }
        due
    }

    /// When the next slot of any schedule runs (ms since the epoch).
    pub fn next_run_ms(&self, agent: &str) -> Option<i64> {
        self.entries
            .iter()
            .filter(|e| e.in_schedule(e.next_slot))
            .map(|e| e.run_at(agent, e.next_slot))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(id: &str, start: i64, interval: u64, stop: Option<i64>, jitter: u64) -> Schedule {
        Schedule {
            measurement_id: id.into(),
            module: "echo_module".into(),
            params_json: "{}".into(),
            timeout_ms: 1000,
            interval_ms: interval,
            start_ms: start,
            stop_ms: stop,
            jitter_ms: jitter,
        }
    }

    fn slots(due: &Due) -> Vec<i64> {
        due.runs.iter().map(|r| r.scheduled_ms).collect()
    }

    #[test]
    fn every_slot_runs_once_in_order_until_stop() {
        let mut s = Schedules::default();
        assert!(s.apply("a", 1, vec![every("m", 1000, 100, Some(1500), 0)], 1000));
        let mut seen = Vec::new();
        let mut now = 1000;
        while now < 2000 {
            seen.extend(slots(&s.take_due("a", now)));
            now += 7;
        }
        assert_eq!(seen, vec![1000, 1100, 1200, 1300, 1400]);
        assert_eq!(s.next_run_ms("a"), None);
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        let mut spread = std::collections::BTreeSet::new();
        for k in 0..200 {
            let j = jitter("a", "m", k, 50);
            assert!(j <= 50);
            assert_eq!(j, jitter("a", "m", k, 50));
            spread.insert(j);
        }
        assert!(spread.len() > 20, "jitter hardly varies: {spread:?}");
        let mut s = Schedules::default();
        s.apply("a", 1, vec![every("m", 0, 1000, None, 50)], 0);
        let at = s.next_run_ms("a").unwrap();
        assert_eq!(at, jitter("a", "m", 0, 50) as i64);
        assert!(s.take_due("a", at - 1).runs.is_empty());
        assert_eq!(slots(&s.take_due("a", at)), vec![0]);
    }

    #[test]
    fn a_new_set_keeps_progress_of_known_schedules_and_older_versions_are_ignored() {
        let mut s = Schedules::default();
        s.apply("a", 2, vec![every("m", 0, 100, None, 0)], 0);
        s.take_due("a", 250);
        assert_eq!(s.entries[0].next_slot, 3);
        assert!(!s.apply("a", 2, vec![], 300));
        assert!(!s.apply("a", 1, vec![], 300));
        assert_eq!(s.entries.len(), 1);
        assert!(s.apply(
            "a",
            3,
            vec![every("m", 0, 100, None, 0), every("n", 0, 100, None, 0)],
            300
        ));
        assert_eq!(s.entries[0].next_slot, 3, "progress of m kept");
        assert_eq!(s.entries[1].next_slot, 3, "n starts at the current slot");
        assert!(s.apply("a", 4, vec![], 300));
        assert!(s.entries.is_empty() && s.next_run_ms("a").is_none());
    }

    #[test]
    fn slots_too_late_to_start_are_skipped_and_counted() {
        let mut s = Schedules::default();
        s.apply("a", 1, vec![every("m", 0, 1000, None, 0)], 0);
        assert_eq!(slots(&s.take_due("a", 0)), vec![0]);
        // The agent was not running for a minute: the old slots are missed, the
        // recent ones (within 5 s) still run.
        let due = s.take_due("a", 60_500);
        assert_eq!(slots(&due), vec![56_000, 57_000, 58_000, 59_000, 60_000]);
        assert_eq!(due.missed, vec![("m".to_string(), 55)]);
    }
}
