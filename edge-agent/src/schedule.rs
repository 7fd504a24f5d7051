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
//!
//! The backend checks every schedule it accepts, and the agent checks them again
//! ([`check`]): a schedule the agent cannot run sanely is refused on its own, and the
//! rest of the set applies. The arithmetic saturates all the same, so even a schedule
//! that got past the checks (one stored by an older agent) cannot hang or panic it.

use imn_proto::wire::Schedule;
use serde::{Deserialize, Serialize};

/// Where the schedule set is kept in the outbox's meta tree.
pub const META_SCHEDULES: &[u8] = b"schedules";
/// Where the policy of the schedule set is kept: a key of its own, so sets stored
/// before policies existed still read.
pub const META_SCHEDULE_POLICY: &[u8] = b"schedule_policy";

/// The shortest and longest interval.
pub const MIN_INTERVAL_MS: u64 = 1_000;
pub const MAX_INTERVAL_MS: u64 = 30 * 24 * 3600 * 1000;
/// The largest parameters, in bytes of JSON.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
/// The longest measurement id, in bytes.
pub const MAX_MEASUREMENT_ID_BYTES: usize = 128;
/// The most schedules in one set.
pub const MAX_SCHEDULES: usize = 1_000;
/// Slots one schedule looks at per call, at most (a schedule the checks refuse could
/// otherwise keep the agent busy).
const MAX_STEPS: usize = 10_000;

/// Why the agent refuses a schedule: the field and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub field: &'static str,
    pub rule: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

/// Checks one schedule of a set before the agent takes it.
pub fn check(s: &Schedule) -> Result<(), Refused> {
    let refuse = |field, rule: String| Err(Refused { field, rule });
    if s.measurement_id.is_empty() || s.measurement_id.len() > MAX_MEASUREMENT_ID_BYTES {
        return refuse(
            "measurement_id",
            format!(
                "must be 1 to {MAX_MEASUREMENT_ID_BYTES} bytes (got {})",
                s.measurement_id.len()
            ),
        );
    }
    // A WebAssembly module's name passes here; whether it is loaded is checked at
    // each slot (a slot of a module not loaded fails, saying so), as for built-ins.
    let wasm_name = cfg!(feature = "wasm") && imn_proto::wasm::check_name(&s.module).is_ok();
    if !imn_probes::built_in(&s.module) && !wasm_name {
        return refuse(
            "module",
            format!(
                "{:?} is not a module this agent has (built in: {})",
                s.module,
                imn_probes::built_in_names().join(", ")
            ),
        );
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&s.interval_ms) {
        return refuse(
            "interval_ms",
            format!(
                "must be {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} (30 days) (got {})",
                s.interval_ms
            ),
        );
    }
    if s.jitter_ms >= s.interval_ms {
        return refuse(
            "jitter_ms",
            format!(
                "must be less than interval_ms {} (got {})",
                s.interval_ms, s.jitter_ms
            ),
        );
    }
    if let Some(stop) = s.stop_ms {
        if stop <= s.start_ms {
            return refuse(
                "stop_ms",
                format!("must be after start_ms {} (got {stop})", s.start_ms),
            );
        }
    }
    if s.params_json.len() > MAX_PARAMS_BYTES {
        return refuse(
            "params_json",
            format!(
                "must be at most {MAX_PARAMS_BYTES} bytes (got {})",
                s.params_json.len()
            ),
        );
    }
    match serde_json::from_str::<serde_json::Value>(&s.params_json) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => return refuse("params_json", "must be a JSON object".into()),
    }
    Ok(())
}

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
    pub missed: Vec<Missed>,
}

/// Slots of one measurement skipped as too late: how many, and the first and last
/// of their times on the schedule (before jitter), so that each gap is accounted for.
#[derive(Debug, Clone, PartialEq)]
pub struct Missed {
    pub measurement_id: String,
    pub count: u64,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// `v` as an i64, saturated.
fn sat_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

impl Entry {
    /// Slot `k`'s time on the schedule (saturated: a slot past the end of time is at
    /// `i64::MAX`, which never comes).
    fn slot_ms(&self, k: u64) -> i64 {
        let s = &self.schedule;
        sat_i64(
            i128::from(s.start_ms)
                .saturating_add(i128::from(k).saturating_mul(i128::from(s.interval_ms))),
        )
    }

    fn in_schedule(&self, k: u64) -> bool {
        // An interval of 0 has one slot (the agent refuses such a schedule; this keeps
        // one stored before from running in a loop).
        if self.schedule.interval_ms == 0 && k > 0 {
            return false;
        }
        self.schedule
            .stop_ms
            .is_none_or(|stop| self.slot_ms(k) < stop)
    }

    /// When slot `k` runs: its time plus its jitter.
    fn run_at(&self, agent: &str, k: u64) -> i64 {
        let j = jitter(
            agent,
            &self.schedule.measurement_id,
            k,
            self.schedule.jitter_ms,
        );
        self.slot_ms(k)
            .saturating_add(i64::try_from(j).unwrap_or(i64::MAX))
    }

    /// How late a slot may start: a whole interval, at least 5 s, at most 5 min.
    fn late_limit_ms(&self) -> i64 {
        self.schedule.interval_ms.clamp(5_000, 300_000) as i64
    }

    /// Whether slot `k` is too late to start at `now`.
    fn too_late(&self, agent: &str, k: u64, now: i64) -> bool {
        self.run_at(agent, k).saturating_add(self.late_limit_ms()) < now
    }

    /// The first slot still worth running at `now`.
    fn first_slot(&self, agent: &str, now: i64) -> u64 {
        let s = &self.schedule;
        if now <= s.start_ms || s.interval_ms == 0 {
            return 0;
        }
        // The slot that began most recently still runs, unless it is too late.
        let since = (i128::from(now) - i128::from(s.start_ms)) as u128;
        let k = u64::try_from(since / u128::from(s.interval_ms)).unwrap_or(u64::MAX);
        if self.too_late(agent, k, now) {
            k.saturating_add(1)
        } else {
            k
        }
    }

    /// The first slot after `late` (a slot too late to start at `now`) that is not too
    /// late: slots whose time is before `now` less the late limit and the largest
    /// jitter are skipped at once, the few after them one by one.
    fn first_not_late(&self, agent: &str, late: u64, now: i64) -> u64 {
        let s = &self.schedule;
        let next = late.saturating_add(1);
        if s.interval_ms == 0 {
            return next;
        }
        let cutoff = i128::from(now)
            - i128::from(self.late_limit_ms())
            - i128::from(s.jitter_ms)
            - i128::from(s.start_ms);
        let sure = if cutoff <= 0 {
            0
        } else {
            u64::try_from((cutoff as u128).div_ceil(u128::from(s.interval_ms))).unwrap_or(u64::MAX)
        };
        let mut k = next.max(sure);
        let mut steps = 0;
        while k < u64::MAX
            && steps < MAX_STEPS
            && self.in_schedule(k)
            && self.too_late(agent, k, now)
        {
            k += 1;
            steps += 1;
        }
        k
    }

    /// How many slots from `from` up to (not including) `to` are before the stop.
    fn slots_in_schedule(&self, from: u64, to: u64) -> u64 {
        let s = &self.schedule;
        let Some(stop) = s.stop_ms else {
            return to.saturating_sub(from);
        };
        if s.interval_ms == 0 {
            return u64::from(from == 0 && to > 0 && s.start_ms < stop);
        }
        // Slots with start + k × interval < stop: k < ceil((stop - start) / interval).
        let span = i128::from(stop) - i128::from(s.start_ms);
        let end = if span <= 0 {
            0
        } else {
            let n = (span as u128).div_ceil(u128::from(s.interval_ms));
            u64::try_from(n).unwrap_or(u64::MAX)
        };
        to.min(end).saturating_sub(from)
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
    match max_ms.checked_add(1) {
        Some(n) => h % n,
        None => h,
    }
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

    /// Marks the slot of `measurement` at `scheduled_ms` (its time before jitter) as
    /// run: its entry's progress moves past it if it had not. True if it moved (the
    /// caller stores the set).
    pub fn ran(&mut self, measurement: &str, scheduled_ms: i64) -> bool {
        let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.schedule.measurement_id == measurement)
        else {
            return false;
        };
        let s = &e.schedule;
        if s.interval_ms == 0 || scheduled_ms < s.start_ms {
            return false;
        }
        let k = (i128::from(scheduled_ms) - i128::from(s.start_ms)) / i128::from(s.interval_ms);
        let next = u64::try_from(k).unwrap_or(u64::MAX).saturating_add(1);
        if e.slot_ms(next.saturating_sub(1)) != scheduled_ms || e.next_slot >= next {
            return false;
        }
        e.next_slot = next;
        true
    }

    /// Slots due at `now`, each moved past (the caller stores the set before it starts
    /// them). Slots too late to start are skipped and counted.
    pub fn take_due(&mut self, agent: &str, now: i64) -> Due {
        let mut due = Due::default();
        for e in &mut self.entries {
            let mut missed = 0u64;
            let mut span: Option<(i64, i64)> = None;
            let mut steps = 0usize;
            while e.in_schedule(e.next_slot) && e.run_at(agent, e.next_slot) <= now {
                let k = e.next_slot;
                steps += 1;
                if steps > MAX_STEPS {
                    // Only a schedule the checks would refuse gets here; the rest of
                    // its slots wait for the next call.
                    break;
                }
                if e.too_late(agent, k, now) {
                    // Every slot up to the first still worth running is missed: jump
                    // there rather than step through them (a long outage at a short
                    // interval).
                    let to = e.first_not_late(agent, k, now);
                    let n = e.slots_in_schedule(k, to);
                    if n > 0 {
                        let last = e.slot_ms(k.saturating_add(n - 1));
                        span = Some((span.map_or(e.slot_ms(k), |s| s.0), last));
                    }
                    missed = missed.saturating_add(n);
                    e.next_slot = to;
                    if to == u64::MAX {
                        break;
                    }
                    continue;
                }
                e.next_slot = k.saturating_add(1);
                due.runs.push(DueRun {
                    schedule: e.schedule.clone(),
                    scheduled_ms: e.slot_ms(k),
                });
                if k == u64::MAX {
                    break;
                }
            }
            if let (true, Some((first_ms, last_ms))) = (missed > 0, span) {
                due.missed.push(Missed {
                    measurement_id: e.schedule.measurement_id.clone(),
                    count: missed,
                    first_ms,
                    last_ms,
                });
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

    /// What a backend must not send, and the agent must survive anyway: the checks
    /// refuse each (naming the field), and the arithmetic neither hangs, panics nor
    /// overflows when such a schedule is applied regardless.
    #[test]
    fn hostile_schedules_are_refused_and_cannot_hang_or_panic() {
        let ok = every("m", 0, 60_000, None, 1_000);
        check(&ok).unwrap();
        let field = |s: Schedule| check(&s).unwrap_err().field;
        assert_eq!(field(every("m", 0, 0, None, 0)), "interval_ms");
        assert_eq!(field(every("m", 0, 999, None, 0)), "interval_ms");
        assert_eq!(
            field(every("m", 0, MAX_INTERVAL_MS + 1, None, 0)),
            "interval_ms"
        );
        check(&every("m", 0, MAX_INTERVAL_MS, None, 0)).unwrap();
        assert_eq!(field(every("m", 0, 1_000, None, u64::MAX)), "jitter_ms");
        assert_eq!(field(every("m", 0, 1_000, None, 1_000)), "jitter_ms");
        assert_eq!(field(every("m", 5, 1_000, Some(5), 0)), "stop_ms");
        assert_eq!(
            field(every("m", i64::MAX, 1_000, Some(i64::MIN), 0)),
            "stop_ms"
        );
        assert_eq!(field(every("", 0, 1_000, None, 0)), "measurement_id");
        assert_eq!(
            field(every(&"x".repeat(129), 0, 1_000, None, 0)),
            "measurement_id"
        );
        check(&every(&"x".repeat(128), 0, 1_000, None, 0)).unwrap();
        let with = |f: &dyn Fn(&mut Schedule)| {
            let mut s = ok.clone();
            f(&mut s);
            s
        };
        assert_eq!(
            field(with(&|s| s.module = "no/such-module".into())),
            "module"
        );
        assert_eq!(
            field(with(&|s| s.params_json = "[1]".into())),
            "params_json"
        );
        assert_eq!(field(with(&|s| s.params_json = "{".into())), "params_json");
        let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(MAX_PARAMS_BYTES));
        let e = check(&with(&|s| s.params_json = big.clone())).unwrap_err();
        assert_eq!(e.field, "params_json");
        assert!(e.to_string().contains("65536"), "{e}");

        // Applied anyway (as a set stored by an older agent would be), at the edges of
        // time: each call returns, and no slot is due twice.
        let now = 1_800_000_000_000i64;
        let hostile = vec![
            every("interval0", now, 0, None, 0),
            every("interval0-stop", 0, 0, Some(10), 0),
            every("jitter-max", 0, 1_000, None, u64::MAX),
            every("jitter-max-late", now - 1_000_000, 1, None, u64::MAX),
            every("start-min", i64::MIN, 1_000, None, 0),
            every("start-min-int-max", i64::MIN, u64::MAX, None, u64::MAX - 1),
            every("start-max", i64::MAX, 1_000, None, 999),
            every("stop-max", i64::MIN, 1, Some(i64::MAX), 0),
            every("tiny", now - 3_600_000, 1, None, 0),
        ];
        let mut s = Schedules::default();
        assert!(s.apply("a", 1, hostile, now));
        for e in &mut s.entries {
            if e.schedule.measurement_id == "start-max" {
                e.next_slot = u64::MAX - 1;
            }
        }
        let mut all = Vec::new();
        for step in 0..5 {
            let t = now + step * 1_000;
            let due = s.take_due("a", t);
            all.extend(
                due.runs
                    .iter()
                    .map(|r| (r.schedule.measurement_id.clone(), r.scheduled_ms)),
            );
            let _ = s.next_run_ms("a");
        }
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len(), "a slot ran twice");
        // An interval of 0 is one slot, run once.
        assert_eq!(all.iter().filter(|(m, _)| m == "interval0").count(), 1);
        // Huge slot numbers saturate instead of wrapping into the past.
        let e = Entry {
            schedule: every("m", 0, u64::MAX, None, 0),
            next_slot: u64::MAX,
        };
        assert_eq!(e.slot_ms(u64::MAX), i64::MAX);
        assert_eq!(e.run_at("a", u64::MAX), i64::MAX);
        assert_eq!(e.first_slot("a", i64::MAX), 1, "slot 0 is too late");
        let e = Entry {
            schedule: every("m", i64::MIN, 1, None, 0),
            next_slot: 0,
        };
        assert_eq!(e.first_slot("a", i64::MAX), u64::MAX);
        assert!(jitter("a", "m", 7, u64::MAX) > 0 || jitter("a", "m", 8, u64::MAX) > 0);
    }

    /// After a long outage at a short interval the missed slots are counted without
    /// being stepped through one by one, and the recent ones still run.
    #[test]
    fn a_long_outage_is_skipped_at_once() {
        let mut s = Schedules::default();
        s.apply("a", 1, vec![every("m", 0, 1_000, None, 500)], 0);
        assert_eq!(s.take_due("a", 500).runs.len(), 1);
        let year = 365 * 86_400_000i64;
        let t0 = std::time::Instant::now();
        let due = s.take_due("a", year);
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        let (ran, missed) = (due.runs.len() as u64, due.missed[0].count);
        assert!((4..=6).contains(&ran), "{ran}");
        // Every slot up to now ran or was missed (the last one's jitter may not be up).
        let slots = (year / 1_000) as u64;
        assert!(
            (slots - 1..=slots).contains(&(ran + missed)),
            "{ran} + {missed}"
        );
        // With a stop, only slots before it count.
        let mut s = Schedules::default();
        s.apply("a", 1, vec![every("m", 0, 1_000, Some(10_500), 0)], 0);
        s.take_due("a", 0);
        let due = s.take_due("a", year);
        let m = &due.missed[0];
        assert_eq!(
            (
                due.runs.len(),
                due.missed.len(),
                m.count,
                m.first_ms,
                m.last_ms
            ),
            (0, 1, 10, 1_000, 10_000)
        );
        assert_eq!(s.next_run_ms("a"), None);
    }

    #[test]
    fn a_slot_reported_as_run_is_not_run_again() {
        let mut s = Schedules::default();
        s.apply("a", 1, vec![every("m", 0, 1000, None, 0)], 0);
        assert_eq!(slots(&s.take_due("a", 0)), vec![0]);
        // Progress lost: the slot at 1 s was logged as started, and is reported.
        assert!(s.ran("m", 1000));
        assert!(!s.ran("m", 1000), "once");
        assert!(!s.ran("m", 500), "not a slot");
        assert!(!s.ran("other", 1000));
        assert_eq!(slots(&s.take_due("a", 2000)), vec![2000]);
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
        assert_eq!(
            due.missed,
            vec![Missed {
                measurement_id: "m".to_string(),
                count: 55,
                first_ms: 1_000,
                last_ms: 55_000
            }]
        );
    }
}
