//! Callers waiting for a request to finish (`?wait`).
//!
//! [`Waiters`] holds a one-shot sender per waiting caller, by request id. Invariants:
//! - a caller registers before the request's command goes out (see
//!   [`super::Submitted::done`]), so a result that comes back at once still wakes it;
//! - waking a request removes every waiter of it; a waiter that gave up (its timeout
//!   passed) is removed when it does, and the request's entry with its last waiter, so
//!   the map holds only requests someone is waiting for.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::Backend;

/// Callers of `?wait`, by the request they wait for.
#[derive(Default)]
pub(crate) struct Waiters {
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    fn waiting(&self) -> MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that fires when the request is woken.
    pub(crate) fn register(&self, request_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting()
            .entry(request_id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Waits on a receiver from [`Self::register`] until it fires or `timeout`; then
    /// removes the waiters of the request that gave up.
    pub(crate) async fn wait_on(
        &self,
        request_id: &str,
        rx: oneshot::Receiver<()>,
        timeout: Duration,
    ) {
        let _ = tokio::time::timeout(timeout, rx).await;
        let mut w = self.waiting();
        if let Some(list) = w.get_mut(request_id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(request_id);
            }
        }
    }

    /// Drops every waiter of the request without waking it (their receivers see the
    /// sender gone).
    pub(crate) fn forget(&self, request_id: &str) {
        self.waiting().remove(request_id);
    }

    /// Wakes every waiter of the request.
    pub(crate) fn wake(&self, request_id: &str) {
        let list = self.waiting().remove(request_id);
        for tx in list.into_iter().flatten() {
            let _ = tx.send(());
        }
    }

    /// Requests with someone waiting.
    #[cfg(test)]
    fn requests(&self) -> usize {
        self.waiting().len()
    }
}

impl Backend {
    /// Waits until the request is terminal or `timeout` passes.
    pub async fn wait(&self, request_id: &str, timeout: Duration) {
        let rx = self.waiters.register(request_id);
        // It may have finished before we registered.
        if let Ok(Some(r)) = self.store.request(request_id).await {
            if r.state.is_terminal() {
                self.waiters.forget(request_id);
                return;
            }
        }
        self.waiters.wait_on(request_id, rx, timeout).await;
    }

    /// Waits on a receiver from [`super::Submitted::done`] until it fires or `timeout`.
    pub async fn wait_on(&self, request_id: &str, rx: oneshot::Receiver<()>, timeout: Duration) {
        self.waiters.wait_on(request_id, rx, timeout).await;
    }

    /// A request reached a terminal state outside ingest: wakes its `?wait` callers.
    pub fn finished(&self, request_id: &str) {
        self.waiters.wake(request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_every_waiter_of_its_request_only() {
        let w = Waiters::default();
        let a1 = w.register("a");
        let a2 = w.register("a");
        let mut b = w.register("b");
        assert_eq!(w.requests(), 2);
        w.wake("a");
        assert!(a1.await.is_ok() && a2.await.is_ok());
        assert!(b.try_recv().is_err(), "b is still waiting");
        assert_eq!(w.requests(), 1);
        // Woken twice: nothing left to wake, nothing fails.
        w.wake("a");
        w.wake("b");
        assert!(b.await.is_ok());
        assert_eq!(w.requests(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_removed() {
        let w = Waiters::default();
        let staying = w.register("r");
        let leaving = w.register("r");
        w.wait_on("r", leaving, Duration::from_millis(1)).await;
        // The waiter that timed out is gone; the other still waits.
        assert_eq!(w.requests(), 1);
        w.wait_on("r", staying, Duration::from_millis(1)).await;
        assert_eq!(w.requests(), 0, "the last one takes the entry with it");
        let woken = w.register("r");
        let waited = std::time::Instant::now();
        w.wake("r");
        w.wait_on("r", woken, Duration::from_secs(30)).await;
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "woken, not timed out"
        );
        assert_eq!(w.requests(), 0);
    }

    #[tokio::test]
    async fn forgotten_waiters_stop_waiting() {
        let w = Waiters::default();
        let rx = w.register("r");
        w.forget("r");
        assert!(rx.await.is_err(), "the sender is gone");
        assert_eq!(w.requests(), 0);
    }
}
