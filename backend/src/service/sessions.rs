//! Agents' connection sessions and their hellos.
//!
//! - [`Sessions`]: which agents have a connection session open in the store. A sign of
//!   life opens one for an agent that has none (closing one a backend restart left open,
//!   where the agent was last seen); an `offline` status, or silence past three
//!   heartbeats, closes it. Other backends sharing the store tell this one of the
//!   sessions they open and close ([`crate::peers`]), so one session is open per agent.
//! - [`Hellos`]: at most one hello per agent is handled a second
//!   ([`crate::ingest::HELLO_MIN_INTERVAL_MS`]); each reads and writes the store and
//!   redelivers the agent's commands. One that comes too soon waits as the agent's
//!   deferred hello (only the newest: a flood of hellos holds one) until its turn.
//! - [`Backend::take_hello`]: what a hello does once its turn has come.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use imn_proto::now_ms;
use imn_proto::wire::{self, Hello};

use super::Backend;
use crate::ingest;
use crate::store::Store;

/// Agents with a connection session open in the store.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<HashSet<String>>,
}

impl Sessions {
    fn open(&self) -> MutexGuard<'_, HashSet<String>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sign of life at `now`: opens a session for `agent` unless one is open, closing
    /// one left open in the store at `prev_end` (read only when a session is opened).
    pub(crate) async fn touch(
        &self,
        store: &dyn Store,
        agent: &str,
        now: i64,
        prev_end: impl FnOnce() -> i64,
    ) {
        if self.open().contains(agent) {
            return;
        }
        match store.session_open(agent, now, prev_end()).await {
            Ok(()) => {
                self.open().insert(agent.to_string());
            }
            Err(e) => tracing::warn!(error = %e, %agent, "cannot record the agent's connection"),
        }
    }

    /// Another backend opened (or closed) the agent's session in the shared store.
    pub(crate) fn known(&self, agent: &str, open: bool) {
        let mut s = self.open();
        if open {
            s.insert(agent.to_string());
        } else {
            s.remove(agent);
        }
    }

    /// The agent left: closes its session at `at_ms`, if this backend has one open.
    pub(crate) async fn close(&self, store: &dyn Store, agent: &str, at_ms: i64) {
        let was_open = self.open().remove(agent);
        if was_open {
            if let Err(e) = store.session_close(agent, at_ms).await {
                tracing::warn!(error = %e, %agent, "cannot record the agent's disconnection");
            }
        }
    }
}

/// When each agent's last hello was handled, and the newest hello of each agent that
/// came too soon after it.
#[derive(Default)]
pub(crate) struct Hellos {
    turns: Mutex<HelloTurns>,
}

#[derive(Default)]
struct HelloTurns {
    /// When each agent's last hello was handled (ms since the epoch).
    last: HashMap<String, i64>,
    /// The newest hello of each agent that came too soon, and its wire version.
    deferred: HashMap<String, (Hello, u8)>,
}

impl HelloTurns {
    /// When the next hello of `agent` may be handled (None: now).
    fn due_at(&self, agent: &str) -> Option<i64> {
        self.last
            .get(agent)
            .map(|t| t.saturating_add(ingest::HELLO_MIN_INTERVAL_MS))
    }
}

impl Hellos {
    fn turns(&self) -> MutexGuard<'_, HelloTurns> {
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a hello from `agent` is handled now (and if so, its turn is taken): at
    /// most one a second per agent. A clock that went back lets it through.
    pub(crate) fn due(&self, agent: &str, now: i64) -> bool {
        let mut t = self.turns();
        match t.last.get(agent) {
            Some(&last)
                if now.saturating_sub(last) < ingest::HELLO_MIN_INTERVAL_MS && now >= last =>
            {
                false
            }
            _ => {
                t.last.insert(agent.to_string(), now);
                true
            }
        }
    }

    /// Keeps `hello` as the agent's deferred one, replacing any older.
    pub(crate) fn defer(&self, agent: String, hello: Hello, version: u8) {
        self.turns().deferred.insert(agent, (hello, version));
    }

    /// Drops the agent's deferred hello (a newer one is being handled).
    pub(crate) fn forget_deferred(&self, agent: &str) {
        self.turns().deferred.remove(agent);
    }

    /// Takes the deferred hellos whose turn has come at `now`.
    pub(crate) fn take_due(&self, now: i64) -> Vec<(String, (Hello, u8))> {
        let mut t = self.turns();
        let agents: Vec<String> = t
            .deferred
            .keys()
            .filter(|a| t.due_at(a).is_none_or(|at| at <= now))
            .cloned()
            .collect();
        agents
            .into_iter()
            .filter_map(|a| t.deferred.remove(&a).map(|h| (a, h)))
            .collect()
    }

    /// When the earliest deferred hello is due (ms since the epoch).
    fn next_due_ms(&self) -> Option<i64> {
        let t = self.turns();
        t.deferred.keys().filter_map(|a| t.due_at(a)).min()
    }

    /// When the earliest deferred hello is due, at most a hello interval from now.
    pub(crate) fn next_due(&self) -> Option<tokio::time::Instant> {
        let at = self.next_due_ms()?;
        let wait = (at - now_ms()).clamp(0, ingest::HELLO_MIN_INTERVAL_MS) as u64;
        Some(tokio::time::Instant::now() + Duration::from_millis(wait))
    }
}

impl Backend {
    /// An agent's hello: its session, the store, the registry, the peers; then its
    /// undelivered commands and its schedules. Err when the store did not take it.
    pub(super) async fn take_hello(
        &self,
        agent: &str,
        hello: Hello,
        version: u8,
        now: i64,
    ) -> Result<(), ()> {
        self.touch_session(agent, now).await;
        let schedule_version = hello.schedule_version;
        let schedule_rules = hello
            .has(wire::features::POLICY)
            .then_some(hello.schedule_policy);
        if let Err(e) = self.store.upsert_agent(agent, &hello, now).await {
            tracing::warn!(error = %e, "cannot store hello");
            return Err(());
        }
        self.registry
            .hello(agent, hello.clone(), Some(version), now);
        self.tell_peers(crate::peers::PeerEvent::Hello {
            agent: agent.to_string(),
            at_ms: now,
            hello: Box::new(hello.clone()),
        })
        .await;
        tracing::info!(%agent, "agent hello");
        self.redeliver(agent, true).await;
        self.reconcile_schedules(agent, schedule_version, schedule_rules)
            .await;
        self.load_on_hello(agent, &hello).await;
        Ok(())
    }

    /// Handles the deferred hellos whose turn has come.
    pub(super) async fn take_deferred_hellos(&self) {
        let now = now_ms();
        for (agent, (hello, version)) in self.hellos.take_due(now) {
            if self.hellos.due(&agent, now)
                && self.take_hello(&agent, hello, version, now).await.is_err()
            {
                tracing::warn!(%agent, "a deferred hello was not stored; the agent's next one will be");
            }
        }
    }

    /// A sign of life: opens a connection session for an agent that has none open
    /// (closing one left open in the store, by a backend restart, where the agent was
    /// last seen).
    pub(super) async fn touch_session(&self, agent: &str, now: i64) {
        self.sessions
            .touch(self.store.as_ref(), agent, now, || {
                self.registry.get(agent).map_or(now, |a| a.last_seen_ms)
            })
            .await;
    }

    /// Another backend opened (or closed) the agent's session in the shared store.
    pub(crate) fn session_known(&self, agent: &str, open: bool) {
        self.sessions.known(agent, open);
    }

    /// The agent left (its `offline` status, or silence): closes its session at `at_ms`.
    pub(super) async fn close_session(&self, agent: &str, at_ms: i64) {
        self.sessions.close(self.store.as_ref(), agent, at_ms).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn hello() -> Hello {
        Hello {
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
        }
    }

    #[test]
    fn one_hello_a_second_per_agent() {
        let h = Hellos::default();
        assert!(h.due("a", 10_000));
        assert!(!h.due("a", 10_500), "within the interval");
        assert!(h.due("b", 10_500), "another agent has its own turn");
        assert!(h.due("a", 11_000), "the interval passed");
        // A clock that went back does not hold the agent's hellos up.
        assert!(h.due("a", 5_000));
    }

    #[test]
    fn the_newest_deferred_hello_waits_for_its_turn() {
        let h = Hellos::default();
        assert!(h.due("a", 10_000));
        assert_eq!(h.next_due_ms(), None, "nothing deferred");
        let mut first = hello();
        first.sent_at_ms = 1;
        h.defer("a".into(), first, 2);
        let mut second = hello();
        second.sent_at_ms = 2;
        h.defer("a".into(), second, 3);
        // Never seen: due at once.
        h.defer("new".into(), hello(), 2);
        assert_eq!(h.next_due_ms(), Some(11_000));
        let now = h.take_due(10_500);
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].0, "new");
        assert!(h.take_due(10_999).is_empty(), "not its turn yet");
        let due = h.take_due(11_000);
        assert_eq!(due.len(), 1, "one per agent: the newest");
        let (agent, (hello, version)) = &due[0];
        assert_eq!((agent.as_str(), hello.sent_at_ms, *version), ("a", 2, 3));
        assert!(h.take_due(20_000).is_empty(), "taken once");
        assert!(h.next_due().is_none());
        // A newer hello handled meanwhile drops the deferred one.
        h.defer("a".into(), self::hello(), 2);
        h.forget_deferred("a");
        assert!(h.take_due(20_000).is_empty());
    }

    #[tokio::test]
    async fn a_session_opens_once_and_closes_once() {
        let dir = std::env::temp_dir().join(format!(
            "imn-sessions-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store: std::sync::Arc<dyn Store> =
            std::sync::Arc::new(SqliteStore::open(&dir.join("s.sqlite")).unwrap());
        let s = Sessions::default();
        let mut asked = 0;
        s.touch(store.as_ref(), "a", 1_000, || {
            asked += 1;
            500
        })
        .await;
        // Open already: the store is not asked again, nor the last sighting read.
        s.touch(store.as_ref(), "a", 2_000, || {
            asked += 1;
            1_500
        })
        .await;
        assert_eq!(asked, 1);
        assert_eq!(store.sessions("a", 0).await.unwrap(), vec![(1_000, None)]);
        s.close(store.as_ref(), "a", 3_000).await;
        s.close(store.as_ref(), "a", 4_000).await;
        assert_eq!(
            store.sessions("a", 0).await.unwrap(),
            vec![(1_000, Some(3_000))]
        );
        // Another backend opened it: this one does not open a second.
        s.known("a", true);
        s.touch(store.as_ref(), "a", 5_000, || 5_000).await;
        assert_eq!(store.sessions("a", 0).await.unwrap().len(), 1);
        // Another backend closed it: this one does not close it again.
        s.known("a", false);
        s.close(store.as_ref(), "a", 6_000).await;
        assert_eq!(
            store.sessions("a", 0).await.unwrap(),
            vec![(1_000, Some(3_000))]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
