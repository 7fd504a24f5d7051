//! The agent's own budget across all its runs (`max_runs`, `max_queued_runs`,
//! `max_probe_rate`): however many commands and scheduled slots arrive, at most
//! `max_runs` run at once and their declared rates add up to at most `max_probe_rate`.
//! A run that does not fit waits in a FIFO queue and starts when it does; a full queue
//! fails the new run at once.
//!
//! Strict FIFO: a waiting run that does not fit yet holds back the runs behind it, so a
//! run with a large rate is not starved by a stream of small ones.
//!
//! Pure and time-free: the agent tells it what arrived, finished or was cancelled, and
//! starts what it hands back.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

/// The budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub max_runs: usize,
    pub max_queued: usize,
    /// Probes per second across all running runs.
    pub max_rate: f64,
}

/// What [`RunQueue::submit`] did with a run.
#[derive(Debug, PartialEq)]
pub enum Submitted<T> {
    /// It fits: start it now (it counts as running).
    Start(T),
    /// It waits; [`RunQueue::finish`] hands it back when it fits.
    Queued,
    /// The queue is full: fail it.
    Full(T),
}

struct Waiting<T> {
    id: String,
    rate: f64,
    item: T,
}

pub struct RunQueue<T> {
    budget: Budget,
    /// Running runs and the rate each is charged.
    running: HashMap<String, f64>,
    waiting: VecDeque<Waiting<T>>,
}

/// A rate as the budget counts it: absent, negative or not a number is 0, and
/// infinity stays infinite (it fits only alone).
fn charge(rate: Option<f64>) -> f64 {
    match rate {
        Some(r) if r > 0.0 => r,
        _ => 0.0,
    }
}

impl<T> RunQueue<T> {
    pub fn new(budget: Budget) -> RunQueue<T> {
        RunQueue {
            budget,
            running: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    /// Probes per second of the running runs.
    pub fn running_rate(&self) -> f64 {
        self.running.values().sum()
    }

    /// Whether a run charged `rate` may start now: a free slot, and its rate fits
    /// beside the running runs' (a rate over the whole budget fits only alone).
    fn fits(&self, rate: f64) -> bool {
        if self.running.len() >= self.budget.max_runs {
            return false;
        }
        self.running.is_empty() || self.running_rate() + rate <= self.budget.max_rate
    }

    /// A new run with its declared rate (probes per second, if it paces them).
    pub fn submit(&mut self, id: String, rate: Option<f64>, item: T) -> Submitted<T> {
        let rate = charge(rate);
        // Nothing overtakes a run that already waits.
        if self.waiting.is_empty() && self.fits(rate) {
            self.running.insert(id, rate);
            return Submitted::Start(item);
        }
        if self.waiting.len() >= self.budget.max_queued {
            return Submitted::Full(item);
        }
        self.waiting.push_back(Waiting { id, rate, item });
        Submitted::Queued
    }

    /// A running run ended (or was stopped); returns the waiting runs that start now,
    /// in order (they count as running).
    pub fn finish(&mut self, id: &str) -> Vec<(String, T)> {
        self.running.remove(id);
        self.ready()
    }

    /// Takes a waiting run out of the queue (a cancel); None if it is not waiting.
    pub fn cancel(&mut self, id: &str) -> Option<T> {
        let i = self.waiting.iter().position(|w| w.id == id)?;
        let w = self.waiting.remove(i)?;
        // The head may have changed.
        Some(w.item)
    }

    /// The waiting runs that fit now, from the head of the queue (see
    /// [`RunQueue::finish`]; also after a cancel).
    pub fn ready(&mut self) -> Vec<(String, T)> {
        let mut out = Vec::new();
        while let Some(head) = self.waiting.front() {
            if !self.fits(head.rate) {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.running.insert(w.id.clone(), w.rate);
            out.push((w.id, w.item));
        }
        out
    }
}

/// The rate a run of `module` with `params_json` declares (its demand), and, when that
/// alone is over `max_rate` and the module takes a `rate` parameter (ping), the
/// parameters with `rate` set to `max_rate` (whether the request gave one or not: a
/// ping without `rate` paces by its interval, which may well be faster). Unknown
/// modules and unreadable parameters declare nothing (the module then fails on its own).
pub fn declared_rate(
    module: &str,
    params_json: &str,
    max_rate: f64,
) -> (Option<f64>, Option<String>) {
    let Some(spec) = imn_proto::catalog::find(module) else {
        return (None, None);
    };
    let Ok(mut params) = serde_json::from_str::<Value>(params_json) else {
        return (None, None);
    };
    let rate = spec.demand(&params).rate;
    let over = rate.is_some_and(|r| r > max_rate);
    if over {
        let takes_rate = spec.takes_rate;
        if let Some(p) = params.as_object_mut().filter(|_| takes_rate) {
            p.insert("rate".into(), Value::from(max_rate));
            return (Some(max_rate), Some(params.to_string()));
        }
    }
    (rate, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(max_runs: usize, max_queued: usize, max_rate: f64) -> RunQueue<u32> {
        RunQueue::new(Budget {
            max_runs,
            max_queued,
            max_rate,
        })
    }

    fn ids(v: Vec<(String, u32)>) -> Vec<u32> {
        v.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn admission_by_count_is_fifo() {
        let mut q = q(2, 10, 1000.0);
        assert_eq!(q.submit("a".into(), None, 1), Submitted::Start(1));
        assert_eq!(q.submit("b".into(), None, 2), Submitted::Start(2));
        for (i, id) in ["c", "d", "e"].iter().enumerate() {
            assert_eq!(
                q.submit(id.to_string(), None, 3 + i as u32),
                Submitted::Queued
            );
        }
        assert_eq!((q.running(), q.queued()), (2, 3));
        assert_eq!(ids(q.finish("a")), vec![3]);
        assert_eq!(ids(q.finish("unknown")), Vec::<u32>::new());
        assert_eq!(ids(q.finish("b")), vec![4]);
        assert_eq!(ids(q.finish("c")), vec![5]);
        assert_eq!(ids(q.finish("d")), Vec::<u32>::new());
        assert_eq!(ids(q.finish("e")), Vec::<u32>::new());
        assert_eq!((q.running(), q.queued()), (0, 0));
    }

    #[test]
    fn admission_by_rate() {
        let mut q = q(10, 10, 100.0);
        assert_eq!(q.submit("a".into(), Some(60.0), 1), Submitted::Start(1));
        assert_eq!(q.submit("b".into(), Some(40.0), 2), Submitted::Start(2));
        assert_eq!(q.running_rate(), 100.0);
        // Over the budget: waits, and holds back what comes after it (FIFO).
        assert_eq!(q.submit("c".into(), Some(50.0), 3), Submitted::Queued);
        assert_eq!(q.submit("d".into(), None, 4), Submitted::Queued);
        assert_eq!(ids(q.finish("b")), Vec::<u32>::new(), "10 free, 50 asked");
        assert_eq!(ids(q.finish("a")), vec![3, 4]);
        assert_eq!(q.running_rate(), 50.0);
        // Nonsense rates count as nothing.
        assert_eq!(q.submit("e".into(), Some(-5.0), 5), Submitted::Start(5));
        assert_eq!(q.submit("f".into(), Some(f64::NAN), 6), Submitted::Start(6));
        assert_eq!(q.running_rate(), 50.0);
    }

    #[test]
    fn a_rate_over_the_whole_budget_runs_alone() {
        let mut q = q(4, 10, 100.0);
        assert_eq!(q.submit("a".into(), Some(10.0), 1), Submitted::Start(1));
        assert_eq!(q.submit("big".into(), Some(500.0), 2), Submitted::Queued);
        assert_eq!(q.submit("c".into(), None, 3), Submitted::Queued);
        // Starts once nothing else runs, and nothing starts beside it.
        assert_eq!(ids(q.finish("a")), vec![2]);
        assert_eq!(q.submit("d".into(), None, 4), Submitted::Queued);
        assert_eq!(ids(q.finish("big")), vec![3, 4]);
        let mut alone = super::tests::q(4, 10, 100.0);
        assert_eq!(
            alone.submit("inf".into(), Some(f64::INFINITY), 9),
            Submitted::Start(9)
        );
        assert_eq!(alone.submit("z".into(), Some(0.0), 1), Submitted::Queued);
    }

    #[test]
    fn cancel_takes_a_waiting_run_out() {
        let mut q = q(1, 10, 100.0);
        assert_eq!(q.submit("a".into(), None, 1), Submitted::Start(1));
        assert_eq!(q.submit("b".into(), Some(500.0), 2), Submitted::Queued);
        assert_eq!(q.submit("c".into(), None, 3), Submitted::Queued);
        assert_eq!(q.cancel("b"), Some(2));
        assert_eq!(q.cancel("b"), None);
        assert_eq!(q.cancel("a"), None, "a runs; the agent stops it");
        assert_eq!(q.queued(), 1);
        assert_eq!(ids(q.finish("a")), vec![3]);
        assert!(q.is_running("c") && !q.is_running("a"));
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let mut q = q(1, 2, 100.0);
        assert_eq!(q.submit("a".into(), None, 1), Submitted::Start(1));
        assert_eq!(q.submit("b".into(), None, 2), Submitted::Queued);
        assert_eq!(q.submit("c".into(), None, 3), Submitted::Queued);
        assert_eq!(q.submit("d".into(), None, 4), Submitted::Full(4));
        assert_eq!((q.running(), q.queued()), (1, 2));
        let mut none = super::tests::q(1, 0, 100.0);
        assert_eq!(none.submit("a".into(), None, 1), Submitted::Start(1));
        assert_eq!(none.submit("b".into(), None, 2), Submitted::Full(2));
    }

    /// 1,000 runs arrive at once: never more than `max_runs` run, all of them run, in
    /// the order they came.
    #[test]
    fn a_flood_runs_max_runs_at_a_time() {
        let mut q = q(3, 1000, 2000.0);
        let mut running = Vec::new();
        let mut order = Vec::new();
        for n in 0..1000u32 {
            if let Submitted::Start(n) = q.submit(format!("r{n}"), Some(1.0), n) {
                running.push(n);
            }
        }
        assert_eq!(running.len(), 3);
        while let Some(n) = running.first().copied() {
            running.remove(0);
            order.push(n);
            for (_, m) in q.finish(&format!("r{n}")) {
                running.push(m);
            }
            assert!(q.running() <= 3);
        }
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn rates_are_declared_and_clamped() {
        let ping = r#"{"host":"127.0.0.1","count":3,"rate":5000}"#;
        let (rate, params) = declared_rate("ping_module", ping, 2000.0);
        assert_eq!(rate, Some(2000.0));
        let p: Value = serde_json::from_str(&params.expect("clamped")).unwrap();
        assert_eq!(
            (p["rate"].as_f64(), p["count"].as_u64()),
            (Some(2000.0), Some(3))
        );
        let (rate, params) = declared_rate("ping_module", r#"{"host":"h","rate":10}"#, 2000.0);
        assert_eq!((rate, params), (Some(10.0), None));
        // A ping without `rate` paces by its interval: 10,000 targets a second apart
        // each is 10,000 probes/s, and gets a `rate` of the budget.
        let many: Vec<String> = (0..10_000).map(|i| format!("h{i}")).collect();
        let wide = serde_json::json!({"targets": many, "interval_ms": 1000}).to_string();
        let (rate, params) = declared_rate("ping_module", &wide, 2000.0);
        assert_eq!(rate, Some(2000.0));
        let p: Value = serde_json::from_str(&params.expect("a rate added")).unwrap();
        assert_eq!(p["rate"].as_f64(), Some(2000.0));
        // tcping paces by its interval and has no rate to lower: it runs alone.
        let (rate, params) = declared_rate("tcping", r#"{"host":"h","interval_ms":0}"#, 5.0);
        assert!(
            rate.is_some_and(|r| r > 5.0) && params.is_none(),
            "{rate:?}"
        );
        assert_eq!(
            declared_rate("echo_module", r#"{"message":"m"}"#, 1.0),
            (None, None)
        );
        assert_eq!(declared_rate("nope", "{}", 1.0), (None, None));
        assert_eq!(declared_rate("ping_module", "{", 1.0), (None, None));
    }
}
