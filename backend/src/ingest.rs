//! What the backend takes from an agent before it costs anything. An enrolled agent
//! decides alone what it sends, and an agent on someone else's router may be hostile:
//! every field it controls is bounded here, before the store, the registry or the
//! metrics spend anything on it, and each agent gets a fair share of the store's time.
//!
//! - [`check_hello`], [`check_heartbeat`] and [`check_batch`] refuse messages whose
//!   fields break a bound, naming the field and the rule (logged and counted; a refused
//!   batch is not acked, so an honest agent that hit a bound by mistake loses nothing).
//! - [`defer_events`] stores at most [`MAX_EVENTS_PER_BATCH`] events of one batch; the
//!   rest are not acked, so the agent sends them again in its next batches.
//! - [`FairQueue`] forms group commits round-robin over agents, and [`Shares`] caps the
//!   bytes one agent may have waiting: past it, its messages are dropped unacked (the
//!   agent resends them), so a flood from one agent never holds up the others.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use imn_proto::wire::{Batch, Heartbeat, Hello, RecordBody};

/// Most records in one batch (an honest agent's 256 KiB batch holds a few thousand).
pub const MAX_BATCH_RECORDS: usize = 16_384;
/// Most seqs one batch may span: `last - first` (an outbox sends its seqs nearly in
/// order; gaps come only from records already acked).
pub const MAX_SEQ_SPREAD: u64 = 1 << 24;
/// Events of one batch stored at once; the rest wait for the agent's next batches.
pub const MAX_EVENTS_PER_BATCH: usize = 1_000;
/// Bytes of one agent's messages waiting for the store at most; past it they are shed.
pub const AGENT_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Messages of one agent waiting at most, whatever their size (a flood of small
/// statuses costs a store write each); past it they are shed.
pub const AGENT_QUEUED_MESSAGES: usize = 1024;
/// Hellos of one agent handled at most this often (each reads and writes the store).
pub const HELLO_MIN_INTERVAL_MS: i64 = 1_000;

/// Bounds of what an agent declares about itself.
pub const MAX_SHORT_TEXT: usize = 64;
pub const MAX_TAGS: usize = 32;
pub const MAX_MODULES: usize = 64;
pub const MAX_FEATURES: usize = 32;
pub const MAX_DEFAULTS_JSON: usize = 64 * 1024;
pub const MAX_INTERFACES: usize = 256;
pub const MAX_CORES: usize = 1024;
pub const MAX_CONDITION_TEXT: usize = 512;
/// The longest id a record carries (request, measurement): the backend's are UUIDs, a
/// scheduled run's `{measurement}@{slot}`.
pub const MAX_ID: usize = 256;
/// The longest state detail or event message.
pub const MAX_DETAIL: usize = 16 * 1024;
/// The longest heartbeat period an agent may announce (it is counted dead after three).
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 86_400_000;

/// Why a message was refused: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Where in the message (`/tags/3`, `/records/17/seq`).
    pub field: String,
    /// The rule (`maxLength`, `maxItems`, `increasing`, `range`).
    pub rule: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.field, self.message, self.rule)
    }
}

fn refuse(field: impl Into<String>, rule: &'static str, message: String) -> Refusal {
    Refusal {
        field: field.into(),
        rule,
        message,
    }
}

fn text(field: &str, v: &str, max: usize) -> Result<(), Refusal> {
    if v.len() > max {
        return Err(refuse(
            field,
            "maxLength",
            format!("{} bytes, at most {max}", v.len()),
        ));
    }
    Ok(())
}

fn items<T>(field: &str, v: &[T], max: usize) -> Result<(), Refusal> {
    if v.len() > max {
        return Err(refuse(
            field,
            "maxItems",
            format!("{} items, at most {max}", v.len()),
        ));
    }
    Ok(())
}

/// A hello's fields within their bounds. Its schedule version too: the store's
/// version follows an agent's that is higher (a store that was replaced), so a version
/// near the end of its range would push the store's there.
pub fn check_hello(h: &Hello) -> Result<(), Refusal> {
    text("/version", &h.version, MAX_SHORT_TEXT)?;
    text("/arch", &h.arch, MAX_SHORT_TEXT)?;
    items("/tags", &h.tags, MAX_TAGS)?;
    for (i, t) in h.tags.iter().enumerate() {
        text(&format!("/tags/{i}"), t, MAX_SHORT_TEXT)?;
    }
    items("/features", &h.features, MAX_FEATURES)?;
    for (i, f) in h.features.iter().enumerate() {
        text(&format!("/features/{i}"), f, MAX_SHORT_TEXT)?;
    }
    items("/modules", &h.modules, MAX_MODULES)?;
    for (i, m) in h.modules.iter().enumerate() {
        text(&format!("/modules/{i}/name"), &m.name, MAX_SHORT_TEXT)?;
        text(&format!("/modules/{i}/version"), &m.version, MAX_SHORT_TEXT)?;
        text(
            &format!("/modules/{i}/schema_hash"),
            &m.schema_hash,
            MAX_SHORT_TEXT,
        )?;
        if let Some(d) = m.config.as_ref().and_then(|c| c.defaults_json.as_ref()) {
            text(
                &format!("/modules/{i}/config/defaults_json"),
                d,
                MAX_DEFAULTS_JSON,
            )?;
        }
    }
    if let Some(l) = &h.location {
        for (field, v) in [
            ("/location/country", &l.country),
            ("/location/city", &l.city),
        ] {
            if let Some(v) = v {
                text(field, v, MAX_SHORT_TEXT)?;
            }
        }
        for (field, v, max) in [
            ("/location/latitude", l.latitude, 90.0),
            ("/location/longitude", l.longitude, 180.0),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v.abs() > max) {
                return Err(refuse(
                    field,
                    "range",
                    format!("must be a number from -{max} to {max}"),
                ));
            }
        }
    }
    if h.schedule_version > crate::store::MAX_SCHEDULE_VERSION {
        return Err(refuse(
            "/schedule_version",
            "maximum",
            format!(
                "{} is past the largest schedule version a backend gives out ({})",
                h.schedule_version,
                crate::store::MAX_SCHEDULE_VERSION
            ),
        ));
    }
    if h.heartbeat_interval_ms > MAX_HEARTBEAT_INTERVAL_MS {
        return Err(refuse(
            "/heartbeat_interval_ms",
            "maximum",
            format!(
                "{} ms, at most {MAX_HEARTBEAT_INTERVAL_MS} (a day)",
                h.heartbeat_interval_ms
            ),
        ));
    }
    let l = &h.limits;
    if !l.max_probe_rate.is_finite() || l.max_probe_rate < 0.0 {
        return Err(refuse(
            "/limits/max_probe_rate",
            "range",
            "must be a finite number, 0 or more".into(),
        ));
    }
    Ok(())
}

/// A heartbeat's lists and texts within their bounds (the registry keeps the last
/// one of every agent, and 720 points of history).
pub fn check_heartbeat(hb: &Heartbeat) -> Result<(), Refusal> {
    items("/system/interfaces", &hb.system.interfaces, MAX_INTERFACES)?;
    for (i, n) in hb.system.interfaces.iter().enumerate() {
        text(
            &format!("/system/interfaces/{i}/name"),
            &n.name,
            MAX_SHORT_TEXT,
        )?;
    }
    items(
        "/system/cpu_per_core_pct",
        &hb.system.cpu_per_core_pct,
        MAX_CORES,
    )?;
    if let Some(c) = &hb.outbox_condition {
        text("/outbox_condition", c, MAX_CONDITION_TEXT)?;
    }
    Ok(())
}

/// A batch's shape: not too many records, seqs strictly increasing (an outbox sends
/// them in order) and within [`MAX_SEQ_SPREAD`]. A batch that breaks this costs the
/// store nothing: it is refused whole.
pub fn check_batch(b: &Batch) -> Result<(), Refusal> {
    items("/records", &b.records, MAX_BATCH_RECORDS)?;
    for (i, w) in b.records.windows(2).enumerate() {
        if w[1].seq <= w[0].seq {
            return Err(refuse(
                format!("/records/{}/seq", i + 1),
                "increasing",
                format!(
                    "seq {} follows {}: a batch's seqs must increase",
                    w[1].seq, w[0].seq
                ),
            ));
        }
    }
    // Ids and names a record carries become indexed columns: a 64 KiB id is past what
    // PostgreSQL indexes (2,704 bytes), and nothing an honest agent sends.
    for (n, r) in b.records.iter().enumerate() {
        let field = |f: &str| format!("/records/{n}/{f}");
        match &r.body {
            RecordBody::State(s) => {
                text(&field("request_id"), &s.request_id, MAX_ID)?;
                if let Some(d) = &s.detail {
                    text(&field("detail"), d, MAX_DETAIL)?;
                }
            }
            RecordBody::Event(e) => {
                text(&field("kind"), &e.kind, MAX_SHORT_TEXT)?;
                text(&field("message"), &e.message, MAX_DETAIL)?;
            }
            RecordBody::Result(m) | RecordBody::TracedResult(m, _) => {
                text(&field("request_id"), &m.request_id, MAX_ID)?;
                text(&field("module"), &m.module, MAX_SHORT_TEXT)?;
            }
            RecordBody::ScheduledResult(run) => {
                text(&field("measurement_id"), &run.measurement_id, MAX_ID)?;
                text(&field("request_id"), &run.result.request_id, MAX_ID)?;
                text(&field("module"), &run.result.module, MAX_SHORT_TEXT)?;
            }
        }
        if let RecordBody::TracedResult(_, tp) = &r.body {
            text(&field("traceparent"), tp, MAX_SHORT_TEXT * 2)?;
        }
    }
    if let (Some(first), Some(last)) = (b.records.first(), b.records.last()) {
        if last.seq - first.seq > MAX_SEQ_SPREAD {
            return Err(refuse(
                "/records",
                "seqSpread",
                format!(
                    "seqs {} to {} span more than {MAX_SEQ_SPREAD}",
                    first.seq, last.seq
                ),
            ));
        }
    }
    Ok(())
}

/// Keeps the first [`MAX_EVENTS_PER_BATCH`] events of a batch and every other record;
/// returns how many events were held back (they are not acked: the agent sends them
/// again, first in its next batch).
pub fn defer_events(b: &mut Batch) -> usize {
    let mut events = 0;
    let before = b.records.len();
    b.records.retain(|r| {
        if matches!(r.body, RecordBody::Event(_)) {
            events += 1;
            events <= MAX_EVENTS_PER_BATCH
        } else {
            true
        }
    });
    before - b.records.len()
}

/// Bytes each agent has waiting between the bus and the store.
#[derive(Clone, Default)]
pub struct Shares {
    /// Per agent: (bytes, messages) waiting.
    queued: Arc<Mutex<HashMap<String, (usize, usize)>>>,
}

impl Shares {
    /// Counts one message of `bytes` of `agent`'s waiting, unless that takes it past
    /// [`AGENT_QUEUED_BYTES`] (a message alone may be up to that) or
    /// [`AGENT_QUEUED_MESSAGES`]. The share is given back when the returned guard drops.
    pub fn take(&self, agent: &str, bytes: usize) -> Option<Share> {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let (have, n) = q.get(agent).copied().unwrap_or((0, 0));
        if (have > 0 && have.saturating_add(bytes) > AGENT_QUEUED_BYTES)
            || n >= AGENT_QUEUED_MESSAGES
        {
            return None;
        }
        q.insert(agent.to_string(), (have.saturating_add(bytes), n + 1));
        Some(Share {
            shares: self.clone(),
            agent: agent.to_string(),
            bytes,
        })
    }

    /// Agents with bytes waiting (for tests and `/health`).
    pub fn waiting(&self) -> usize {
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One message's share of its agent's waiting bytes.
pub struct Share {
    shares: Shares,
    agent: String,
    bytes: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut q = self.shares.queued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((have, n)) = q.get_mut(&self.agent) {
            *have = have.saturating_sub(self.bytes);
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.remove(&self.agent);
            }
        }
    }
}

/// Batches waiting for the store, one queue per agent, taken round-robin: a group
/// commit takes one batch of each agent in turn, so an agent with a thousand batches
/// waiting gets the same share of each group as an agent with one.
pub struct FairQueue<T> {
    queues: HashMap<String, VecDeque<(T, usize)>>,
    /// Agents with something queued, in turn order.
    turn: VecDeque<String>,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            queues: HashMap::new(),
            turn: VecDeque::new(),
        }
    }
}

impl<T> FairQueue<T> {
    /// Queues an item of `rows` rows for `agent`.
    pub fn push(&mut self, agent: &str, item: T, rows: usize) {
        let q = self.queues.entry(agent.to_string()).or_default();
        if q.is_empty() {
            self.turn.push_back(agent.to_string());
        }
        q.push_back((item, rows));
    }

    pub fn is_empty(&self) -> bool {
        self.turn.is_empty()
    }

    /// Takes one item of each agent in turn, at most `max`: a round.
    pub fn take_round(&mut self, max: usize) -> Vec<T> {
        let n = self.turn.len().min(max);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some((item, _)) = self.take_next() else {
                break;
            };
            out.push(item);
        }
        out
    }

    /// Takes items round-robin until `max_items` or `max_rows` is reached (at least
    /// one item when any is queued).
    pub fn take_group(&mut self, max_items: usize, max_rows: usize) -> Vec<T> {
        let mut out = Vec::new();
        let mut rows = 0;
        while out.len() < max_items && (out.is_empty() || rows < max_rows) {
            let Some((item, n)) = self.take_next() else {
                break;
            };
            rows += n;
            out.push(item);
        }
        out
    }

    /// The next agent's oldest item, with its rows; the agent goes to the back of the
    /// turn if it has more.
    fn take_next(&mut self) -> Option<(T, usize)> {
        loop {
            let agent = self.turn.pop_front()?;
            let Some(q) = self.queues.get_mut(&agent) else {
                continue;
            };
            let item = q.pop_front();
            if q.is_empty() {
                self.queues.remove(&agent);
            } else {
                self.turn.push_back(agent);
            }
            if item.is_some() {
                return item;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::wire::{AgentEvent, Record};

    fn event(seq: u64) -> Record {
        Record {
            seq,
            at_ms: 1,
            body: RecordBody::Event(AgentEvent {
                kind: "k".into(),
                message: "m".into(),
            }),
        }
    }

    #[test]
    fn batches_must_increase_and_stay_within_their_spread() {
        let ok = Batch {
            epoch: 1,
            records: vec![event(1), event(2), event(9)],
        };
        assert!(check_batch(&ok).is_ok());
        let down = Batch {
            epoch: 1,
            records: vec![event(5), event(4)],
        };
        let r = check_batch(&down).unwrap_err();
        assert_eq!((r.field.as_str(), r.rule), ("/records/1/seq", "increasing"));
        let same = Batch {
            epoch: 1,
            records: vec![event(5), event(5)],
        };
        assert_eq!(check_batch(&same).unwrap_err().rule, "increasing");
        let wide = Batch {
            epoch: 1,
            records: vec![event(0), event(MAX_SEQ_SPREAD + 1)],
        };
        assert_eq!(check_batch(&wide).unwrap_err().rule, "seqSpread");
        let big = Batch {
            epoch: 1,
            records: (0..=MAX_BATCH_RECORDS as u64).map(event).collect(),
        };
        assert_eq!(check_batch(&big).unwrap_err().rule, "maxItems");
        let mut long_id = event(1);
        long_id.body = RecordBody::State(imn_proto::wire::StateChange {
            request_id: "r".repeat(MAX_ID + 1),
            state: imn_proto::wire::RequestState::Running,
            detail: None,
        });
        let r = check_batch(&Batch {
            epoch: 1,
            records: vec![long_id],
        })
        .unwrap_err();
        assert_eq!(
            (r.field.as_str(), r.rule),
            ("/records/0/request_id", "maxLength")
        );
    }

    #[test]
    fn events_beyond_the_cap_wait_for_the_next_batch() {
        let mut b = Batch {
            epoch: 1,
            records: (0..(MAX_EVENTS_PER_BATCH as u64 + 10)).map(event).collect(),
        };
        assert_eq!(defer_events(&mut b), 10);
        assert_eq!(b.records.len(), MAX_EVENTS_PER_BATCH);
        assert_eq!(
            b.records.last().unwrap().seq,
            MAX_EVENTS_PER_BATCH as u64 - 1
        );
    }

    #[test]
    fn shares_cap_one_agent_and_come_back() {
        let s = Shares::default();
        let a = s.take("a", AGENT_QUEUED_BYTES - 10).unwrap();
        assert!(s.take("a", 11).is_none(), "over its share");
        let b = s.take("b", 11).unwrap();
        assert_eq!(s.waiting(), 2);
        drop(a);
        assert!(s.take("a", 11).is_some(), "given back");
        drop(b);
        // A single message larger than the share still passes when nothing waits.
        assert!(s.take("c", AGENT_QUEUED_BYTES * 2).is_some());
        // Small messages are counted too.
        let held: Vec<Share> = (0..AGENT_QUEUED_MESSAGES)
            .map(|_| s.take("d", 10).unwrap())
            .collect();
        assert!(s.take("d", 10).is_none(), "over its message count");
        drop(held);
        assert!(s.take("d", 10).is_some());
    }

    #[test]
    fn a_round_takes_one_message_of_each_agent() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push("flood", format!("f{i}"), 1);
        }
        q.push("a", "a0".to_string(), 1);
        assert_eq!(q.take_round(100), ["f0", "a0"]);
        assert_eq!(q.take_round(100), ["f1"]);
        assert_eq!(q.take_round(0), Vec::<String>::new());
    }

    #[test]
    fn groups_take_agents_in_turn() {
        let mut q = FairQueue::default();
        for i in 0..100 {
            q.push("flood", format!("f{i}"), 100);
        }
        q.push("a", "a0".to_string(), 1);
        q.push("b", "b0".to_string(), 1);
        q.push("a", "a1".to_string(), 1);
        let g = q.take_group(8192, 250);
        assert_eq!(g, ["f0", "a0", "b0", "f1", "a1", "f2"]);
        let g = q.take_group(2, usize::MAX);
        assert_eq!(g, ["f3", "f4"]);
        let rest = q.take_group(usize::MAX, usize::MAX);
        assert_eq!(rest.len(), 95);
        assert!(q.is_empty());
    }

    #[test]
    fn hello_bounds_name_the_field() {
        let mut h = Hello {
            agent_id: "a".into(),
            version: "1".into(),
            arch: "x".into(),
            modules: vec![],
            tags: vec![],
            location: None,
            schedule_version: 0,
            outbox_epoch: 1,
            outbox_depth: 0,
            dropped: 0,
            heartbeat_interval_ms: 1000,
            sent_at_ms: 0,
            features: vec![],
            limits: Default::default(),
            schedule_policy: 0,
        };
        assert!(check_hello(&h).is_ok());
        h.tags = vec!["x".repeat(65)];
        assert_eq!(check_hello(&h).unwrap_err().field, "/tags/0");
        h.tags = vec![];
        h.schedule_version = u64::MAX - 1;
        assert_eq!(check_hello(&h).unwrap_err().field, "/schedule_version");
        h.schedule_version = 3;
        h.location = Some(imn_proto::wire::Location {
            latitude: Some(f64::NAN),
            ..Default::default()
        });
        assert_eq!(check_hello(&h).unwrap_err().field, "/location/latitude");
    }
}
