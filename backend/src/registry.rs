//! Which agents exist and which are alive, fed by hellos, heartbeats and status
//! messages. Kept in memory (heartbeats are the hot path); hellos are also persisted
//! so a restarted backend still knows every agent, and a sample of the heartbeats
//! (one per agent a minute, written by `retention`) so its charts survive.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::RwLock;

use serde::Serialize;

use imn_proto::wire::{self, Heartbeat, Hello};

/// Heartbeats an agent may miss before it counts as dead.
pub const MISSED_HEARTBEATS: i64 = 3;

/// Heartbeats kept per agent in memory for the dashboard's charts (an hour at 5 s;
/// two at the default 10 s).
pub const HEARTBEAT_HISTORY: usize = 720;

/// One heartbeat per agent per this many ms is also stored (see
/// [`Registry::take_to_store`]), so the charts survive a restart: at one a minute,
/// the 720 points a chart holds span 12 hours.
pub const HEARTBEAT_STORE_EVERY_MS: i64 = 60_000;

/// Most points waiting to be stored; past it the newest are dropped (and counted)
/// until the store catches up.
pub const MAX_PENDING_POINTS: usize = 100_000;

/// One heartbeat, reduced to what the charts show.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct HeartbeatPoint {
    pub at_ms: i64,
    pub cpu_pct: f32,
    pub mem_used_kib: u64,
    pub mem_total_kib: u64,
    pub load1: f32,
    /// Bytes received and sent since boot, summed over interfaces but loopback.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub id: String,
    pub hello: Hello,
    pub first_seen_ms: i64,
    /// Last time anything arrived from the agent.
    pub last_seen_ms: i64,
    pub last_heartbeat: Option<Heartbeat>,
    /// From the heartbeat's `sent_at_ms` to its arrival here, in ms (transport delay
    /// plus clock skew).
    pub heartbeat_lag_ms: Option<i64>,
    /// False once the agent said `offline` (or its last will did).
    pub online: bool,
    /// The agent came back (an `online` status after silence) and its hello has not
    /// arrived yet: what the registry holds about its outbox is from before.
    pub hello_pending: bool,
    /// The wire version its last hello came in: what it is written to.
    pub wire_version: u8,
}

/// The wire version of an agent whose hello did not come here (restored from the store,
/// or passed on by another backend): a version 1 agent announces no features.
fn version_of(hello: &Hello) -> u8 {
    if hello.features.is_empty() {
        wire::LEGACY_WIRE_VERSION
    } else {
        wire::WIRE_VERSION
    }
}

impl AgentEntry {
    /// Heard within three heartbeat intervals, and not marked offline.
    pub fn alive(&self, now_ms: i64) -> bool {
        let interval = i64::try_from(self.hello.heartbeat_interval_ms.max(100)).unwrap_or(i64::MAX);
        // Saturating: the interval is the agent's word (bounded by `ingest::check_hello`,
        // but a hello stored before that bound existed is read back at start).
        self.online
            && now_ms.saturating_sub(self.last_seen_ms)
                <= MISSED_HEARTBEATS.saturating_mul(interval)
    }
}

#[derive(Default)]
pub struct Registry {
    /// By id, in order: lists page through it without sorting.
    agents: RwLock<BTreeMap<String, AgentEntry>>,
    history: RwLock<HashMap<String, VecDeque<HeartbeatPoint>>>,
    /// Points to store, with the backend's time they arrived; and, per agent, when
    /// one was last taken for the store.
    to_store: std::sync::Mutex<ToStore>,
}

#[derive(Default)]
struct ToStore {
    points: Vec<(String, i64, HeartbeatPoint)>,
    last_ms: HashMap<String, i64>,
    dropped: u64,
}

impl Registry {
    /// Adds an agent known from the store; it counts as offline until heard from.
    pub fn restore(&self, id: &str, hello: Hello, first_seen_ms: i64, last_seen_ms: i64) {
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_string()).or_insert(AgentEntry {
            id: id.to_string(),
            wire_version: version_of(&hello),
            hello,
            first_seen_ms,
            last_seen_ms,
            last_heartbeat: None,
            heartbeat_lag_ms: None,
            online: false,
            hello_pending: false,
        });
    }

    /// A hello that came in wire `version` (None: passed on by another backend).
    pub fn hello(&self, id: &str, hello: Hello, version: Option<u8>, now_ms: i64) {
        let version = version.unwrap_or_else(|| version_of(&hello));
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(id.to_string()).or_insert_with(|| AgentEntry {
            id: id.to_string(),
            hello: hello.clone(),
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_heartbeat: None,
            heartbeat_lag_ms: None,
            online: true,
            hello_pending: false,
            wire_version: version,
        });
        e.wire_version = version;
        e.hello = hello;
        e.last_seen_ms = now_ms;
        e.online = true;
        e.hello_pending = false;
    }

    pub fn heartbeat(&self, id: &str, hb: Heartbeat, now_ms: i64) {
        let sys = &hb.system;
        let nics = sys.interfaces.iter().filter(|i| i.name != "lo");
        let point = HeartbeatPoint {
            at_ms: hb.sent_at_ms,
            cpu_pct: sys.cpu_pct,
            mem_used_kib: sys.mem_total_kib.saturating_sub(sys.mem_available_kib),
            mem_total_kib: sys.mem_total_kib,
            load1: sys.load[0],
            // The agent's counters: summed without overflowing.
            rx_bytes: nics.clone().fold(0u64, |s, i| s.saturating_add(i.rx_bytes)),
            tx_bytes: nics.fold(0u64, |s, i| s.saturating_add(i.tx_bytes)),
        };
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(id) {
            let mut h = self.history.write().unwrap_or_else(|e| e.into_inner());
            let q = h.entry(id.to_string()).or_default();
            if q.len() == HEARTBEAT_HISTORY {
                q.pop_front();
            }
            q.push_back(point.clone());
            drop(h);
            // The store's copy is sampled by the backend's clock: an agent that sends
            // heartbeats fast, or stamps them with any time it likes, still adds one
            // row a minute.
            let mut st = self.to_store.lock().unwrap_or_else(|e| e.into_inner());
            let due = st
                .last_ms
                .get(id)
                .is_none_or(|last| now_ms.saturating_sub(*last) >= HEARTBEAT_STORE_EVERY_MS);
            if due {
                if st.points.len() < MAX_PENDING_POINTS {
                    st.points.push((id.to_string(), now_ms, point));
                    st.last_ms.insert(id.to_string(), now_ms);
                } else {
                    st.dropped = st.dropped.saturating_add(1);
                }
            }
            drop(st);
            e.last_seen_ms = now_ms;
            // The agent's clock can be anything (no clock at all, or a hostile one).
            e.heartbeat_lag_ms = Some(now_ms.saturating_sub(hb.sent_at_ms));
            e.last_heartbeat = Some(hb);
            e.online = true;
            // Heartbeats go out only while connected: this one is from the new session.
            e.hello_pending = false;
        }
    }

    /// The points due to be stored, and how many were dropped since the last call
    /// because too many were waiting.
    pub fn take_to_store(&self) -> (Vec<(String, i64, HeartbeatPoint)>, u64) {
        let mut st = self.to_store.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut st.dropped);
        (std::mem::take(&mut st.points), dropped)
    }

    /// Puts back points the store did not take (it was unavailable), oldest first and
    /// ahead of newer ones, within the bound.
    pub fn return_to_store(&self, mut points: Vec<(String, i64, HeartbeatPoint)>) {
        let mut st = self.to_store.lock().unwrap_or_else(|e| e.into_inner());
        points.append(&mut st.points);
        let over = points.len().saturating_sub(MAX_PENDING_POINTS);
        if over > 0 {
            points.drain(..over);
            st.dropped = st.dropped.saturating_add(over as u64);
        }
        st.points = points;
    }

    /// History read back from the store at start: points older than what memory
    /// holds go first (memory wins where both have one), at most
    /// [`HEARTBEAT_HISTORY`] per agent, for agents the registry knows.
    pub fn restore_history(&self, id: &str, stored: Vec<HeartbeatPoint>) {
        if !self.knows(id) {
            return;
        }
        let mut h = self.history.write().unwrap_or_else(|e| e.into_inner());
        let q = h.entry(id.to_string()).or_default();
        let first = q.front().map(|p| p.at_ms);
        let mut merged: VecDeque<HeartbeatPoint> = stored
            .into_iter()
            .filter(|p| first.is_none_or(|f| p.at_ms < f))
            .collect();
        merged.extend(q.drain(..));
        while merged.len() > HEARTBEAT_HISTORY {
            merged.pop_front();
        }
        *q = merged;
    }

    /// The agent's recent heartbeats, oldest first.
    pub fn heartbeats(&self, id: &str) -> Vec<HeartbeatPoint> {
        let h = self.history.read().unwrap_or_else(|e| e.into_inner());
        h.get(id)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn status(&self, id: &str, online: bool, now_ms: i64) {
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(id) {
            if online && !e.alive(now_ms) {
                e.hello_pending = true;
            }
            e.online = online;
            if online {
                e.last_seen_ms = now_ms;
            }
        }
    }

    /// Any message counts as a sign of life.
    pub fn seen(&self, id: &str, now_ms: i64) {
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(id) {
            e.last_seen_ms = now_ms;
        }
    }

    pub fn get(&self, id: &str) -> Option<AgentEntry> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn knows(&self, id: &str) -> bool {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    pub fn all(&self) -> Vec<AgentEntry> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// (agents known, agents alive), without copying any.
    pub fn counts(&self, now_ms: i64) -> (usize, usize) {
        let map = self.agents.read().unwrap_or_else(|e| e.into_inner());
        (map.len(), map.values().filter(|a| a.alive(now_ms)).count())
    }

    /// One page of a list by id: the agents `keep` accepts whose id comes after
    /// `after`, at most `limit`, copied; how many it accepts in all; and whether more
    /// follow the page. Only the page
    /// is copied, so a page of a list of 100,000 costs one pass over references.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&AgentEntry) -> bool,
    ) -> (Vec<AgentEntry>, usize, bool) {
        let map = self.agents.read().unwrap_or_else(|e| e.into_inner());
        let mut page = Vec::with_capacity(limit.min(map.len()));
        let (mut total, mut more) = (0, false);
        for a in map.values() {
            if !keep(a) {
                continue;
            }
            total += 1;
            if after.is_none_or(|after| a.id.as_str() > after) {
                if page.len() < limit {
                    page.push(a.clone());
                } else {
                    more = true;
                }
            }
        }
        (page, total, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(hb_ms: u64) -> Hello {
        Hello {
            agent_id: "a".into(),
            version: "0".into(),
            arch: "x86_64".into(),
            modules: vec![],
            tags: vec![],
            location: None,
            schedule_version: 0,
            outbox_epoch: 1,
            outbox_depth: 0,
            dropped: 0,
            heartbeat_interval_ms: hb_ms,
            features: vec![],
            limits: Default::default(),
            schedule_policy: 0,
            sent_at_ms: 0,
        }
    }

    #[test]
    fn alive_means_heard_recently_and_not_offline() {
        let r = Registry::default();
        r.hello("a", hello(1000), None, 10_000);
        assert!(r.get("a").unwrap().alive(12_999));
        assert!(r.get("a").unwrap().alive(13_000));
        assert!(
            !r.get("a").unwrap().alive(13_001),
            "three missed heartbeats"
        );
        r.heartbeat("a", Heartbeat::default(), 13_000);
        assert!(r.get("a").unwrap().alive(15_000));
        r.status("a", false, 15_000);
        assert!(!r.get("a").unwrap().alive(15_000), "last will says offline");
        r.restore("b", hello(1000), 0, 0);
        assert!(
            !r.get("b").unwrap().alive(0),
            "restored agents wait to be heard"
        );
    }

    /// Pages go by id whatever the order agents arrived in; the total counts every
    /// match, and `more` says whether any follow the page.
    #[test]
    fn pages_by_id_count_all_matches_and_say_whether_more_follow() {
        let r = Registry::default();
        for id in ["c", "a", "e", "b", "d"] {
            r.hello(id, hello(1000), None, 10_000);
        }
        r.status("d", false, 10_000);
        let ids = |p: &(Vec<AgentEntry>, usize, bool)| {
            (
                p.0.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
                p.1,
                p.2,
            )
        };
        let all = |_: &AgentEntry| true;
        assert_eq!(
            ids(&r.page(None, 2, all)),
            (vec!["a".into(), "b".into()], 5, true)
        );
        assert_eq!(
            ids(&r.page(Some("b"), 2, all)),
            (vec!["c".into(), "d".into()], 5, true)
        );
        assert_eq!(
            ids(&r.page(Some("d"), 2, all)),
            (vec!["e".into()], 5, false)
        );
        assert_eq!(ids(&r.page(Some("e"), 2, all)), (vec![], 5, false));
        // An id that is not an agent's still places the page.
        assert_eq!(
            ids(&r.page(Some("bb"), 1, all)),
            (vec!["c".into()], 5, true)
        );
        let alive = |a: &AgentEntry| a.alive(10_000);
        assert_eq!(
            ids(&r.page(Some("c"), 1, alive)),
            (vec!["e".into()], 4, false)
        );
        assert_eq!(r.counts(10_000), (5, 4));
    }

    #[test]
    fn a_comeback_hides_stale_outbox_figures_until_hello() {
        let r = Registry::default();
        r.hello("a", hello(1000), None, 10_000);
        r.status("a", true, 10_500);
        assert!(
            !r.get("a").unwrap().hello_pending,
            "still alive: same session"
        );
        // Silence (a broker died, no last will), then the agent is back.
        r.status("a", true, 20_000);
        assert!(r.get("a").unwrap().hello_pending);
        r.hello("a", hello(1000), None, 20_010);
        assert!(!r.get("a").unwrap().hello_pending);
        r.status("a", true, 40_000);
        r.heartbeat("a", Heartbeat::default(), 40_010);
        assert!(
            !r.get("a").unwrap().hello_pending,
            "a heartbeat is from the new session"
        );
    }

    /// Found by the uplink fuzz target: an agent's clock and counters meet the
    /// backend's clock in plain arithmetic, which overflowed (a panic in debug builds,
    /// a wrong value in release). Now saturating.
    #[test]
    fn an_agents_extreme_numbers_do_not_overflow() {
        let r = Registry::default();
        r.hello("a", hello(u64::MAX), None, 10_000);
        assert!(r.get("a").unwrap().alive(i64::MAX));
        let mut hb = Heartbeat {
            sent_at_ms: i64::MIN,
            ..Heartbeat::default()
        };
        let nic = |name: &str| imn_proto::results::InterfaceStats {
            name: name.into(),
            rx_bytes: u64::MAX,
            tx_bytes: u64::MAX,
            ..Default::default()
        };
        hb.system.interfaces = vec![nic("eth0"), nic("eth1")];
        r.heartbeat("a", hb, i64::MAX);
        let e = r.get("a").unwrap();
        assert_eq!(e.heartbeat_lag_ms, Some(i64::MAX));
        let point = r.heartbeats("a").pop().unwrap();
        assert_eq!((point.rx_bytes, point.tx_bytes), (u64::MAX, u64::MAX));
    }
}
