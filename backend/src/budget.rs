//! What an API token may spend across the fleet, beyond what one request may ask
//! (`security::Limits`): probes per UTC day, recurring measurements at once, and the
//! shortest interval of a recurring measurement per module. Each token's budget is its
//! own, the policy file's `[budget]`, or [`Budget::default_measure`]; admin tokens have
//! none unless given one.
//!
//! A one-off measurement costs count × targets × agents (each module's
//! `Demand::probes`), charged when it is made. A recurring one reserves its daily
//! probes (runs a day × probes a run × agents) every day it runs, and one shorter than a
//! day is charged its whole life when it is made. Stopping a recurring one charges what
//! it reserved for the part of today it ran, so creating and deleting schedules does
//! not make probes free. Spend is kept in the store, so every backend sharing it sees
//! the same figures; two backends checking at the same instant may each let one
//! request through past the budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use imn_proto::now_ms;

use crate::error::ApiError;
use crate::fleet::ScheduleSpec;
pub use crate::security::Budget;
use crate::security::Caller;
use crate::service::Backend;

/// A UTC day, in ms.
pub const DAY_MS: i64 = 86_400_000;

/// Days since the Unix epoch (UTC) of a time in ms.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// Seconds from `now` to the next UTC midnight, when a day's budget starts afresh.
pub fn to_midnight_s(now: i64) -> u64 {
    let next = (day_of(now) + 1) * DAY_MS;
    ((next - now).max(0) as u64).div_ceil(1000)
}

/// What a measurement would add to its token's spend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cost {
    /// Probes charged once, today.
    pub one_off: u64,
    /// Probes reserved every day a recurring measurement runs.
    pub daily: u64,
    /// A recurring measurement: its module and interval.
    pub schedule: Option<(String, f64)>,
}

impl Cost {
    /// A recurring measurement of `probes_per_run` (summed over its agents): its whole
    /// life when that is shorter than a day, charged now; else a daily reservation.
    pub fn schedule(module: &str, probes_per_run: u64, spec: &ScheduleSpec, now: i64) -> Cost {
        let interval = spec.interval_ms.max(1);
        let per_day = (DAY_MS as u64).div_ceil(interval);
        let lifetime = spec.stop_ms.map(|stop| {
            let from = spec.start_ms.max(now);
            ((stop.saturating_sub(from)).max(0) as u64).div_ceil(interval)
        });
        let schedule = Some((module.to_string(), interval as f64 / 1000.0));
        match lifetime {
            Some(runs) if runs <= per_day => Cost {
                one_off: probes_per_run.saturating_mul(runs),
                daily: 0,
                schedule,
            },
            _ => Cost {
                one_off: 0,
                daily: probes_per_run.saturating_mul(per_day),
                schedule,
            },
        }
    }
}

/// Refuses a measurement `caller`'s budget cannot pay for: 429 naming the budget
/// (`probes_per_day`, `max_schedules`), or 422 for an interval under the module's
/// `min_interval_s`. Without a budget (no auth, an admin token) everything passes.
pub async fn check(b: &Backend, caller: &Caller, cost: &Cost) -> Result<(), ApiError> {
    let (Some(budget), Some(token)) = (&caller.budget, &caller.token_id) else {
        return Ok(());
    };
    if let Some((module, interval_s)) = &cost.schedule {
        if let Some(min) = budget.min_interval(module) {
            if *interval_s < min {
                return Err(ApiError::OverLimit {
                    limit: "min_interval_s",
                    field: "/schedule/interval_s".into(),
                    message: format!(
                        "/schedule/interval_s: token {token:?} may run {module} at most every {min} s (asked {interval_s} s)"
                    ),
                });
            }
        }
    }
    let now = now_ms();
    // What this backend's requests of the token reserved and have not charged yet,
    // read before the store: a reservation ends only after its charge is committed, so
    // a request is counted here, in the store, or in both (refusing, at worst, one
    // that would fit), never in neither.
    let pending = b.budgets.pending(token);
    let mut usage = b.store.token_usage(token, day_of(now), now).await?;
    usage.one_off_probes = usage.one_off_probes.saturating_add(pending);
    if cost.schedule.is_some() {
        if let Some(max) = budget.max_schedules {
            if usage.schedules >= max {
                return Err(ApiError::OverBudget {
                    budget: "max_schedules",
                    retry_after_s: 60,
                    message: format!(
                        "token {token:?} runs {} recurring measurements, its budget max_schedules = {max}: stop one first",
                        usage.schedules
                    ),
                });
            }
        }
    }
    if let Some(max) = budget.probes_per_day {
        let spent = usage
            .one_off_probes
            .saturating_add(usage.schedule_daily_probes);
        let asked = cost.one_off.saturating_add(cost.daily);
        if spent.saturating_add(asked) > max {
            return Err(ApiError::OverBudget {
                budget: "probes_per_day",
                retry_after_s: to_midnight_s(now),
                message: format!(
                    "token {token:?} has spent {spent} of its {max} probes today (its recurring measurements reserve {}); this measurement needs {asked}{}",
                    usage.schedule_daily_probes,
                    if cost.daily > 0 { " a day" } else { "" }
                ),
            });
        }
    }
    Ok(())
}

/// Per API token with a budget, in this backend: the turn to check its budget and
/// charge it, and the probes of its requests that passed their check and are not
/// charged yet. One turn per token that measured (tokens are an admin's); a token's
/// reserved probes only while a request of it is being made.
#[derive(Default)]
pub struct Ledger {
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pending: Mutex<HashMap<String, u64>>,
}

impl Ledger {
    /// Holds `caller`'s turn (None: no budget). See [`Backend::budget_turn`].
    pub async fn turn(&self, caller: &Caller) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let token = caller
            .token_id
            .as_ref()
            .filter(|_| caller.budget.is_some())?;
        let turn = self
            .turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(token.clone())
            .or_default()
            .clone();
        Some(turn.lock_owned().await)
    }

    /// Probes the token's requests in flight reserved.
    fn pending(&self, token: &str) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Reserves `probes` for a request of the token.
    fn hold(&self, token: &str, probes: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = pending.entry(token.to_string()).or_default();
        *p = p.saturating_add(probes);
    }

    /// Gives back a reservation; the token's entry goes with its last.
    fn release(&self, token: &str, probes: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pending.get_mut(token) {
            *p = p.saturating_sub(probes);
            if *p == 0 {
                pending.remove(token);
            }
        }
    }
}

impl Backend {
    /// Holds `caller`'s turn to check its budget (and reserve, or create and charge)
    /// (None: no budget). Per token, in this backend; two backends may still each pass
    /// one request.
    pub async fn budget_turn(&self, caller: &Caller) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.budgets.turn(caller).await
    }
}

/// Probes a request passed its budget check with, held against the token until the
/// request is made and charged (or not made), so that the token's next check counts
/// them without waiting for this request's store write.
#[must_use = "a reservation is held until the request is made, or not"]
pub struct Reservation<'a> {
    b: &'a Backend,
    caller: Caller,
    probes: u64,
    /// Held in the backend's [`Ledger`] (a token with a budget).
    held: bool,
}

/// Checks `cost` against `caller`'s budget in the token's turn, counting what its
/// requests in flight reserved, and reserves it. The turn ends here, so the request is
/// made (and charged, in the same transaction) while the token's next request is
/// checked.
pub async fn reserve<'a>(
    b: &'a Backend,
    caller: &Caller,
    cost: &Cost,
) -> Result<Reservation<'a>, ApiError> {
    let _turn = b.budget_turn(caller).await;
    check(b, caller, cost).await?;
    let held = match (&caller.budget, &caller.token_id) {
        (Some(_), Some(token)) if cost.one_off > 0 => {
            b.budgets.hold(token, cost.one_off);
            true
        }
        _ => false,
    };
    Ok(Reservation {
        b,
        caller: caller.clone(),
        probes: cost.one_off,
        held,
    })
}

impl Reservation<'_> {
    /// What the request adds to its token's spend, in the transaction that makes it
    /// (`NewRequest::charge`): nothing without a token. Once it is committed, the
    /// reservation is dropped; until then a check of the token counts both, and errs
    /// on the side of refusing.
    pub fn charge(&self) -> Option<crate::store::Charge> {
        let token = self.caller.token_id.clone()?;
        (self.probes > 0).then(|| crate::store::Charge {
            token,
            day: day_of(now_ms()),
            probes: self.probes,
        })
    }

    fn release(&self) {
        let (true, Some(token)) = (self.held, &self.caller.token_id) else {
            return;
        };
        self.b.budgets.release(token, self.probes);
    }
}

impl Drop for Reservation<'_> {
    /// The request was made and charged, or not made: the reservation ends.
    fn drop(&mut self) {
        self.release();
    }
}

/// Charges `probes` to `caller`'s token for today (nothing without a token). A store
/// that fails here loses the charge, not the measurement: logged.
pub async fn charge(b: &Backend, caller: &Caller, probes: u64) {
    let Some(token) = &caller.token_id else {
        return;
    };
    if probes == 0 {
        return;
    }
    if let Err(e) = b.store.add_spend(token, day_of(now_ms()), probes).await {
        tracing::warn!(error = %e, %token, probes, "cannot record the token's spend");
    }
}

/// What a stopped recurring measurement ran today, to be charged: its runs whose slots
/// fell today up to `now` (slot 0 runs as soon as the agents have the set) times what
/// one run costs (its daily reservation over its runs a day). Deleting a schedule right
/// after making it still pays for the run it started.
pub fn ran_today(daily: u64, spec: &ScheduleSpec, now: i64) -> u64 {
    let interval = spec.interval_ms.max(1) as i64;
    let per_day = (DAY_MS as u64).div_ceil(interval as u64);
    let per_run = daily / per_day.max(1);
    let today = day_of(now) * DAY_MS;
    // The first slot today (or the schedule's first, if it began today).
    let first = if spec.start_ms >= today {
        spec.start_ms
    } else {
        let behind = (today - spec.start_ms) as u64;
        let slots = behind.div_ceil(interval as u64) as i64;
        spec.start_ms.saturating_add(slots.saturating_mul(interval))
    };
    let last = spec.stop_ms.map_or(now, |s| s.min(now));
    if first > last {
        return 0;
    }
    let runs = ((last - first) / interval + 1) as u64;
    per_run.saturating_mul(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(interval_ms: u64, start_ms: i64, stop_ms: Option<i64>) -> ScheduleSpec {
        ScheduleSpec {
            interval_ms,
            start_ms,
            stop_ms,
            jitter_ms: 0,
        }
    }

    #[test]
    fn schedules_cost_their_life_or_a_day() {
        let now = 10 * DAY_MS;
        // Every minute for an hour: 60 runs, charged now.
        let c = Cost::schedule(
            "ping_module",
            3,
            &spec(60_000, now, Some(now + 3_600_000)),
            now,
        );
        assert_eq!((c.one_off, c.daily), (180, 0));
        // Every minute for ever: 1,440 runs a day, reserved daily.
        let c = Cost::schedule("ping_module", 3, &spec(60_000, now, None), now);
        assert_eq!((c.one_off, c.daily), (0, 4320));
        assert_eq!(c.schedule, Some(("ping_module".to_string(), 60.0)));
        // A huge run cost saturates rather than overflows.
        let c = Cost::schedule("ping_module", u64::MAX, &spec(1000, now, None), now);
        assert_eq!(c.daily, u64::MAX);
    }

    #[tokio::test]
    async fn the_ledger_holds_reservations_and_one_turn_per_token() {
        let l = Ledger::default();
        l.hold("t", 5);
        l.hold("t", 3);
        assert_eq!((l.pending("t"), l.pending("u")), (8, 0));
        l.release("t", 5);
        assert_eq!(l.pending("t"), 3);
        l.release("t", 3);
        assert!(l.pending.lock().unwrap().is_empty(), "gone with its last");
        // Releasing what was never held changes nothing.
        l.release("u", 1);
        assert_eq!(l.pending("u"), 0);

        let budgeted = Caller {
            token_id: Some("t".into()),
            budget: Some(Budget::default()),
            ..Default::default()
        };
        let unlimited = Caller {
            token_id: Some("t".into()),
            ..Default::default()
        };
        assert!(l.turn(&unlimited).await.is_none(), "no budget, no turn");
        let held = l.turn(&budgeted).await.expect("a turn");
        let waiting = tokio::time::timeout(Duration::from_millis(20), l.turn(&budgeted)).await;
        assert!(waiting.is_err(), "the token's next turn waits");
        drop(held);
        assert!(l.turn(&budgeted).await.is_some());
    }

    #[test]
    fn days_and_midnights_are_utc() {
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(DAY_MS), 1);
        assert_eq!(day_of(-1), -1);
        assert_eq!(to_midnight_s(DAY_MS - 1500), 2);
    }

    #[test]
    fn a_stopped_schedule_pays_for_the_runs_it_started_today() {
        // Every hour, 10 probes a run (240 reserved a day): made at noon today and
        // stopped a second later, it ran one run; stopped at 18:00, seven (12:00 to 18:00).
        let noon = DAY_MS + DAY_MS / 2;
        let hourly = spec(3_600_000, noon, None);
        assert_eq!(ran_today(240, &hourly, noon + 1000), 10);
        assert_eq!(ran_today(240, &hourly, noon + 6 * 3_600_000), 70);
        // Made yesterday at 23:30: today's slots are 00:30, 01:30, ... up to now.
        let late = spec(3_600_000, DAY_MS - 1_800_000, None);
        assert_eq!(ran_today(240, &late, DAY_MS + 1_800_000), 10);
        assert_eq!(ran_today(240, &late, DAY_MS + 1_000), 0);
        // Once a month: its single run costs its whole daily reservation.
        let monthly = spec(30 * DAY_MS as u64, noon, None);
        assert_eq!(ran_today(5, &monthly, noon + 10), 5);
    }
}
