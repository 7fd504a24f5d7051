//! Results as they are stored, for every open stream (SSE `/v1/results/stream`,
//! `/v1/measurements/{id}/stream`, gRPC `StreamResults`).
//!
//! One task reads what each commit stored, once, and hands the page to every stream
//! (a broadcast channel): a thousand open streams cost one store read per commit, not
//! a thousand. A stream first catches up from its cursor with reads of its own, then
//! follows the shared pages, filtering them in memory; one that falls behind the
//! channel catches up from the store again, so it never skips a result. Streams are
//! capped per token and in all ([`MAX_STREAMS_PER_TOKEN`], [`MAX_STREAMS`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::security::Caller;
use crate::service::Backend;
use crate::store::{ResultFilter, ResultRow};

/// Streams one token may hold open at once.
pub const MAX_STREAMS_PER_TOKEN: usize = 8;
/// Streams open at once, across every caller.
pub const MAX_STREAMS: usize = 512;
/// Results per read, for the shared reader and for a stream catching up.
const PAGE: u32 = 500;
/// Pages the channel keeps for streams that are slow to take them.
const PAGES_KEPT: usize = 64;
/// The shared reader also looks every so often (another backend's commits do not wake
/// this one).
const POLL: Duration = Duration::from_secs(5);

/// A result as streams see it: its position (the cursor), the row and its measurement.
pub type FeedRow = (i64, ResultRow, Option<String>);

/// The shared reader's channel, and who holds streams open.
pub struct Feed {
    pages: broadcast::Sender<Arc<Vec<FeedRow>>>,
    open: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    /// Store reads by the shared reader, and by streams catching up.
    pub shared_reads: AtomicU64,
    pub catch_up_reads: AtomicU64,
    /// Woken after each commit of outbox batches (here, or on another backend): the
    /// shared reader reads what is new.
    stored: tokio::sync::Notify,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            pages: broadcast::channel(PAGES_KEPT).0,
            open: Default::default(),
            total: Default::default(),
            shared_reads: AtomicU64::new(0),
            catch_up_reads: AtomicU64::new(0),
            stored: tokio::sync::Notify::new(),
        }
    }
}

/// One open stream's place under the caps; given back when the stream ends.
pub struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    token: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        if let Some(t) = &self.token {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(t);
                }
            }
        }
    }
}

impl Feed {
    /// A place for one more stream of `caller`'s, or 429 naming the cap it hit.
    pub fn admit(&self, caller: &Caller) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::SeqCst) >= MAX_STREAMS {
            return Err(ApiError::Busy {
                limit: "max_streams",
                retry_after_s: 10,
                message: format!(
                    "{MAX_STREAMS} result streams are open, the most this backend serves"
                ),
            });
        }
        if let Some(t) = &caller.token_id {
            let n = open.get(t).copied().unwrap_or(0);
            if n >= MAX_STREAMS_PER_TOKEN {
                return Err(ApiError::Busy {
                    limit: "max_streams_per_token",
                    retry_after_s: 10,
                    message: format!(
                        "token {t:?} has {n} result streams open, the limit max_streams_per_token = {MAX_STREAMS_PER_TOKEN}: close one first"
                    ),
                });
            }
            open.insert(t.clone(), n + 1);
        }
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            open: self.open.clone(),
            total: self.total.clone(),
            token: caller.token_id.clone(),
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Records were stored: wakes the shared reader.
    pub fn records_stored(&self) {
        self.stored.notify_waiters();
    }

    /// The shared reader: after each commit (or every [`POLL`]), reads what was stored
    /// since its last read, a page at a time, and hands each page to every stream. With
    /// no stream open it only keeps its place.
    pub async fn run(b: Arc<Backend>) {
        let mut pos = b.store.latest_position().await.unwrap_or(0);
        loop {
            let stored = b.feed.stored.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            if b.feed.pages.receiver_count() == 0 {
                // Kept only if still nobody listens: a stream that subscribed during the
                // read may have caught up to a point before `p`, and must get what
                // lies between.
                if let Ok(p) = b.store.latest_position().await {
                    if b.feed.pages.receiver_count() == 0 {
                        pos = p;
                    }
                }
            } else {
                loop {
                    let filter = ResultFilter {
                        after: pos,
                        limit: PAGE,
                        ..Default::default()
                    };
                    b.feed.shared_reads.fetch_add(1, Ordering::Relaxed);
                    match b.store.results_page(filter).await {
                        Ok(rows) if !rows.is_empty() => {
                            pos = rows.last().map_or(pos, |r| r.0);
                            let full = rows.len() == PAGE as usize;
                            let _ = b.feed.pages.send(Arc::new(rows));
                            if !full {
                                break;
                            }
                        }
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "result feed: store read failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    }
                }
            }
            let _ = tokio::time::timeout(POLL, stored).await;
        }
    }
}

/// Whether a row passes a stream's filter (the same rules as the store's query).
fn matches(f: &ResultFilter, (_, r, m): &FeedRow) -> bool {
    f.agent.as_ref().is_none_or(|a| *a == r.agent_id)
        && f.module.as_ref().is_none_or(|x| *x == r.module)
        && f.measurement.as_ref().is_none_or(|x| Some(x) == m.as_ref())
        && f.since_ms.is_none_or(|t| r.at_ms >= t)
        && f.until_ms.is_none_or(|t| r.at_ms < t)
}

/// Where one stream is.
struct Cursor {
    b: Arc<Backend>,
    filter: ResultFilter,
    pages: broadcast::Receiver<Arc<Vec<FeedRow>>>,
    buf: VecDeque<FeedRow>,
    /// Reading the store itself (from the start, or after falling behind).
    catching_up: bool,
    _slot: Slot,
}

/// Results after `filter.after`, for ever, each with its position and measurement:
/// the stream every result API serves. Holds `slot` until it ends.
pub fn stream(
    b: Arc<Backend>,
    mut filter: ResultFilter,
    slot: Slot,
) -> impl futures::Stream<Item = FeedRow> + Send {
    filter.limit = PAGE;
    // Subscribed before the first read: nothing stored after that read is missed.
    let pages = b.feed.pages.subscribe();
    let cursor = Cursor {
        b,
        filter,
        pages,
        buf: VecDeque::new(),
        catching_up: true,
        _slot: slot,
    };
    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(row) = c.buf.pop_front() {
                return Some((row, c));
            }
            if c.catching_up {
                c.b.feed.catch_up_reads.fetch_add(1, Ordering::Relaxed);
                match c.b.store.results_page(c.filter.clone()).await {
                    Ok(rows) => {
                        c.catching_up = rows.len() == PAGE as usize;
                        c.filter.after = rows.last().map_or(c.filter.after, |r| r.0);
                        c.buf.extend(rows);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "result stream: store read failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            match c.pages.recv().await {
                Ok(page) => {
                    for row in page.iter() {
                        if row.0 > c.filter.after && matches(&c.filter, row) {
                            c.buf.push_back(row.clone());
                        }
                    }
                    if let Some(last) = page.last() {
                        c.filter.after = c.filter.after.max(last.0);
                    }
                }
                // Fell behind the channel: read the store from where it was.
                Err(broadcast::error::RecvError::Lagged(_)) => c.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
