//! The agent's durable outbox and command log, in sled.
//!
//! - A record is on disk before it is sent ([`Outbox::flush`] runs before every send),
//!   and leaves only when the backend's ack names it.
//! - Record ids are (agent, epoch, seq). The epoch is random and born with the store;
//!   seqs never repeat within an epoch, even across crashes, because a block of seqs is
//!   reserved on disk before any of them is handed out.
//! - The outbox is bounded by bytes of live records. When full it evicts the oldest
//!   records and counts them; the count is persisted and reported.
//! - It never lets sled reach a full disk (sled then hangs and cannot even reopen; see
//!   ARCHITECTURE.md, "Traps in our dependencies"): before writing it checks free
//!   space (statvfs) against a reserve, and when space is short, or a write fails, it
//!   keeps new records in a bounded memory queue, reports the condition, and moves
//!   them to disk once space returns.
//! - A store that cannot be opened or read at start is moved aside and a new one (with
//!   a new epoch) takes its place; the agent reports it.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use imn_proto::ranges::RangeSet;
use imn_proto::wire::{Ack, Record, RecordBody};
use serde::{Deserialize, Serialize};

const META_EPOCH: &[u8] = b"epoch";
/// Seqs below this value may have been handed out; a restart starts above it.
const META_SEQ_RESERVED: &[u8] = b"seq_reserved";
const META_DROPPED: &[u8] = b"dropped";
/// The receive time of the newest command the command log has let go.
const META_COMMANDS_FORGOTTEN: &[u8] = b"commands_forgotten";
/// How long the command log keeps a finished command's id: the longest deadline a
/// request may have (7 days), and a day for clock differences. A run issued before
/// what the log still holds is refused (see [`SledOutbox::forgotten_before_ms`]).
pub const COMMAND_MEMORY_MS: i64 = 8 * 24 * 3600 * 1000;
/// Commands the log keeps at most. Past it the oldest finished ones go early (with a
/// warning), and runs issued before them are refused.
pub const MAX_COMMANDS: u64 = 100_000;
/// How often the command log is pruned.
/// The file beside the store (in the data directory, not in the store) that names the
/// store's epoch. Written durably once a new store's epoch is synced, so that a start
/// can tell a first start (no file) from a store that was lost or truncated under it
/// (a file naming another epoch).
pub const EPOCH_MARKER: &str = "outbox.epoch";

/// Lazy writes (deletes of acked records) kept for the next sync at most; past this
/// the next flush syncs them, so the journal stays small.
const MAX_LAZY_WRITES: usize = 4096;

/// Command-log keys of scheduled slots' runs start so, apart from one-off request ids.
pub const SLOT_PREFIX: &str = "slot:";

/// The command-log key of a scheduled run (`ScheduledRun::run_id`).
pub fn slot_key(run_id: &str) -> String {
    format!("{SLOT_PREFIX}{run_id}")
}

const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Seqs reserved per meta write.
const SEQ_BLOCK: u64 = 100_000;
/// sled's log segment. Small segments keep its writes (and its jumps in disk use)
/// small next to a router's free space.
const SEGMENT_BYTES: usize = 64 * 1024;
/// sled writes more than the record (log headers, page rewrites, segment cleaning):
/// what a record may cost on disk, as a multiple of its size.
const DISK_FACTOR: u64 = 4;

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Unusable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox store cannot be created: {0}")]
    Store(String),
}

/// Limits of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxLimits {
    /// Live record bytes kept on disk; past it the oldest records are evicted.
    pub max_bytes: u64,
    /// Record bytes kept in memory while the disk cannot take them.
    pub memory_bytes: u64,
    /// Free space the filesystem must keep; below it nothing more is written.
    pub disk_reserve_bytes: u64,
    /// sled's page cache (its 1 GiB default is absurd on a router).
    pub cache_bytes: u64,
    /// Commands the command log keeps at most ([`MAX_COMMANDS`]).
    pub max_commands: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_bytes: 64 * 1024 * 1024,
            memory_bytes: 4 * 1024 * 1024,
            disk_reserve_bytes: 2 * 1024 * 1024,
            cache_bytes: 4 * 1024 * 1024,
            max_commands: MAX_COMMANDS,
        }
    }
}

/// What the outbox can report about its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Ok,
    /// Free space is under the reserve; new records wait in memory.
    DiskFull,
    /// A write failed; new records wait in memory.
    WriteError(String),
}

/// What the agent stores about a command it accepted, so a restart neither runs it
/// again nor forgets to report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandEntry {
    pub module: String,
    pub received_ms: i64,
    pub done: bool,
}

/// The durable queue of records awaiting the backend's ack.
pub trait Outbox {
    /// Random id of this store's life; changes only when the store is recreated.
    fn epoch(&self) -> u64;
    /// Stores a record (on disk if it can, else in memory) and returns it.
    fn append(&mut self, at_ms: i64, body: RecordBody) -> Record;
    /// Makes every appended record durable; called before sending.
    fn flush(&mut self);
    /// Records with seq >= `from`, in order, up to `max_bytes` (at least one record).
    fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record>;
    /// The lowest unacked seq, if any.
    fn first_seq(&self) -> Option<u64>;
    /// Deletes every acked record; returns how many were deleted.
    fn ack(&mut self, ack: &Ack) -> u64;
    /// Records waiting for an ack.
    fn depth(&self) -> u64;
    /// Creation time of the oldest waiting record.
    fn oldest_at_ms(&self) -> Option<i64>;
    /// Records evicted (or lost to corruption) since the store was created.
    fn dropped(&self) -> u64;
    fn condition(&self) -> Condition;
}

/// sled's handles on one open store.
struct Store {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    commands: sled::Tree,
}

impl Store {
    fn open(path: &Path, cache_bytes: u64) -> Result<Store, sled::Error> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .segment_size(SEGMENT_BYTES)
            // The outbox flushes on its own schedule (every tick, and before a send);
            // sled's own flusher would only add a thread and unguarded writes.
            .flush_every_ms(None)
            .open()?;
        Ok(Store {
            records: db.open_tree("records")?,
            meta: db.open_tree("meta")?,
            commands: db.open_tree("commands")?,
            db,
        })
    }

    fn tree(&self, t: TreeId) -> &sled::Tree {
        match t {
            TreeId::Records => &self.records,
            TreeId::Meta => &self.meta,
            TreeId::Commands => &self.commands,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeId {
    Records,
    Meta,
    Commands,
}

/// One insert (`value` set) or delete.
#[derive(Debug, Clone)]
struct Write {
    tree: TreeId,
    key: sled::IVec,
    value: Option<sled::IVec>,
}

impl Write {
    fn apply(&self, st: &Store) -> Result<(), sled::Error> {
        let t = st.tree(self.tree);
        match &self.value {
            Some(v) => t.insert(self.key.clone(), v.clone()).map(drop),
            None => t.remove(self.key.clone()).map(drop),
        }
    }

    fn bytes(&self) -> u64 {
        (self.key.len() + self.value.as_ref().map_or(0, |v| v.len())) as u64
    }
}

/// A sled flush to run, on any thread: its handle on the store (an `Arc` inside) is
/// dropped when it returns, so a store that failed can be reopened afterwards.
pub struct PendingSync {
    db: sled::Db,
}

impl PendingSync {
    /// Writes sled's buffers and syncs them to disk (fdatasync); blocks meanwhile.
    pub fn run(self) -> Result<(), String> {
        self.db.flush().map(drop).map_err(|e| e.to_string())
    }
}

/// How often a store that failed a write is closed and opened again.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct SledOutbox {
    dir: PathBuf,
    limits: OutboxLimits,
    /// None only while a store that failed a write could not be opened again.
    store: Option<Store>,
    epoch: u64,
    next_seq: u64,
    /// Seqs below this are reserved on disk (a restart never hands them out again).
    seq_reserved: u64,
    /// Bytes of live records on disk.
    disk_bytes: u64,
    disk_count: u64,
    /// Records waiting for space, in seq order; all seqs above those on disk.
    memory: VecDeque<(Record, usize)>,
    memory_bytes: u64,
    dropped: u64,
    dropped_persisted: u64,
    condition: Condition,
    /// Writes the protocol relies on (records, commands, schedules, ids) since the
    /// last sync: [`Outbox::flush`] syncs them.
    dirty: bool,
    /// Deletes of acked records since the last sync. Losing them to a power cut only
    /// sends those records again (the backend drops them as duplicates), so they ride
    /// along with the next sync instead of costing one of their own.
    lazy_dirty: bool,
    /// Bytes written to sled since the last flush (still in its buffers, not yet
    /// visible to statvfs).
    unflushed: u64,
    /// Every write since the last successful flush. After a failed write sled refuses
    /// all others until it is reopened, and reopening goes back to the last flush, so
    /// these are written again.
    journal: Vec<Write>,
    journal_bytes: u64,
    /// Writes the full disk could not take (commands finished, module settings), made
    /// once space returns.
    deferred: Vec<Write>,
    next_reopen: std::time::Instant,
    /// A sled write or flush failed: sled refuses every write until reopened.
    broken: bool,
    /// The last write error, as sled put it.
    last_error: String,
    /// Acked (or evicted) records still on disk: never sent again, deleted by
    /// [`SledOutbox::compact`] when the agent has time (a drain does not wait for its
    /// deletes) and the disk can take the writes.
    tombstones: RangeSet,
    /// Commands seen while the disk could not record them.
    memory_commands: HashSet<String>,
    /// Entries in the commands tree.
    command_count: u64,
    /// The receive time of the newest command let go (0: none).
    commands_forgotten_ms: i64,
    next_prune: std::time::Instant,
    /// Set when the store found at start was unusable and moved aside.
    pub recovered_from: Option<(PathBuf, String)>,
    /// The epoch named by [`EPOCH_MARKER`] when the store holds another one (or none):
    /// the store was lost, truncated or moved aside since that epoch was written, and
    /// this one replaces it (`outbox_lost`, or `outbox_corrupt` when moved aside).
    pub replaced_epoch: Option<u64>,
    /// [`EPOCH_MARKER`] names this store's epoch.
    marker_ok: bool,
}

fn key_seq(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn meta_u64(meta: &sled::Tree, key: &[u8]) -> Result<Option<u64>, sled::Error> {
    Ok(meta
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    imn_probes::system::disk_kib(path).1 * 1024
}

/// Live records of a store, leaving out `skip`: (bytes, count, last seq).
fn count_records(records: &sled::Tree, skip: &RangeSet) -> Result<(u64, u64, u64), String> {
    let (mut bytes, mut count, mut last) = (0u64, 0u64, 0u64);
    for item in records.iter() {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let seq = key_seq(&k);
        postcard::from_bytes::<Record>(&v)
            .map_err(|err| format!("record {seq} is undecodable: {err}"))?;
        last = seq;
        if !skip.contains(seq) {
            bytes += v.len() as u64;
            count += 1;
        }
    }
    Ok((bytes, count, last))
}

impl SledOutbox {
    /// Opens the store in `dir`/outbox; an unusable one is moved aside and replaced.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<SledOutbox, OutboxError> {
        let path = dir.join("outbox");
        // sled releases its lock a moment after the last handle drops (its IO threads
        // let go later); a lock held longer belongs to another process, and its store
        // is not ours to move aside.
        let mut tries = 0;
        let first = loop {
            match Self::open_at(dir, &path, limits.clone()) {
                Err(OpenError::Locked(e)) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "outbox locked; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                other => break other,
            }
        };
        let mut ob = match first {
            Ok(ob) => ob,
            Err(OpenError::Locked(e)) => {
                return Err(OutboxError::Store(format!(
                    "{e}: is another agent using {}?",
                    dir.display()
                )))
            }
            Err(OpenError::Unusable(e)) => {
                let aside = dir.join(format!("outbox.corrupt-{}", imn_proto::now_ms()));
                tracing::error!(error = %e, aside = %aside.display(), "outbox unusable; moving it aside and starting a new epoch");
                if std::fs::rename(&path, &aside).is_err() {
                    let _ = std::fs::remove_dir_all(&path);
                }
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                let mut ob = Self::open_at(dir, &path, limits)
                    .map_err(|e| OutboxError::Store(e.to_string()))?;
                ob.recovered_from = Some((aside, e));
                ob
            }
        };
        ob.check_marker();
        Ok(ob)
    }

    /// Compares the store's epoch with [`EPOCH_MARKER`]: `replaced_epoch` is the one it
    /// names when they differ. The marker is rewritten by [`Self::commit_marker`], once
    /// the report of the loss is durable (a second power cut before that must not hide
    /// the first loss).
    fn check_marker(&mut self) {
        let path = self.dir.join(EPOCH_MARKER);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read the outbox's epoch marker");
                return;
            }
        };
        match text.as_deref().map(|t| t.trim().parse::<u64>()) {
            Some(Ok(epoch)) if epoch == self.epoch => self.marker_ok = true,
            Some(Ok(epoch)) => self.replaced_epoch = Some(epoch),
            Some(Err(_)) => {
                tracing::warn!(path = %path.display(), "the outbox's epoch marker is unreadable; rewriting it")
            }
            None => {}
        }
    }

    /// Writes [`EPOCH_MARKER`] with this store's epoch (durably), unless it names it
    /// already. The caller has synced whatever reports `replaced_epoch`.
    pub fn commit_marker(&mut self) {
        if self.marker_ok {
            return;
        }
        let path = self.dir.join(EPOCH_MARKER);
        match crate::config::write_durably(
            &self.dir,
            EPOCH_MARKER,
            format!("{}\n", self.epoch).as_bytes(),
        ) {
            Ok(()) => self.marker_ok = true,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the outbox's epoch marker")
            }
        }
    }

    fn open_at(dir: &Path, path: &Path, limits: OutboxLimits) -> Result<SledOutbox, OpenError> {
        let st = Store::open(path, limits.cache_bytes).map_err(|e| match &e {
            // sled words it so, with kind Other.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                OpenError::Locked(e.to_string())
            }
            _ => OpenError::Unusable(e.to_string()),
        })?;
        Self::load(dir, st, limits).map_err(OpenError::Unusable)
    }

    fn load(dir: &Path, st: Store, limits: OutboxLimits) -> Result<SledOutbox, String> {
        let e = |e: sled::Error| e.to_string();
        let epoch = match meta_u64(&st.meta, META_EPOCH).map_err(e)? {
            Some(epoch) => epoch,
            None => {
                let epoch = crate::random_u64() | 1;
                st.meta
                    .insert(META_EPOCH, &epoch.to_be_bytes())
                    .map_err(e)?;
                epoch
            }
        };
        // Read every record once: proves the store is readable, and sizes it.
        let (bytes, count, last) = count_records(&st.records, &RangeSet::default())?;
        let reserved = meta_u64(&st.meta, META_SEQ_RESERVED)
            .map_err(e)?
            .unwrap_or(1);
        let next_seq = reserved.max(last + 1);
        let dropped = meta_u64(&st.meta, META_DROPPED).map_err(e)?.unwrap_or(0);
        // Slots' entries (a few, while they run) are not commands.
        let command_count = st
            .commands
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !k.starts_with(SLOT_PREFIX.as_bytes()))
            .count() as u64;
        let commands_forgotten_ms = meta_u64(&st.meta, META_COMMANDS_FORGOTTEN)
            .map_err(e)?
            .unwrap_or(0) as i64;
        let size = st.db.size_on_disk().unwrap_or(0);
        let mut ob = SledOutbox {
            dir: dir.to_path_buf(),
            limits,
            store: Some(st),
            epoch,
            next_seq,
            seq_reserved: next_seq,
            disk_bytes: bytes,
            disk_count: count,
            memory: VecDeque::new(),
            memory_bytes: 0,
            dropped,
            dropped_persisted: dropped,
            condition: Condition::Ok,
            dirty: false,
            lazy_dirty: false,
            unflushed: 0,
            journal: Vec::new(),
            journal_bytes: 0,
            deferred: Vec::new(),
            next_reopen: std::time::Instant::now(),
            broken: false,
            last_error: String::new(),
            tombstones: RangeSet::default(),
            memory_commands: HashSet::new(),
            command_count,
            commands_forgotten_ms,
            next_prune: std::time::Instant::now(),
            recovered_from: None,
            replaced_epoch: None,
            marker_ok: false,
        };
        // Keep sled well clear of a full disk: it needs about twice the live data, and
        // never gives back its high-water mark.
        let room = (free_bytes(dir) + size).saturating_sub(ob.limits.disk_reserve_bytes)
            / (DISK_FACTOR - 1);
        if room < ob.limits.max_bytes {
            tracing::warn!(
                configured = ob.limits.max_bytes,
                room,
                "outbox capped by the free space of its filesystem"
            );
            ob.limits.max_bytes = room.max(64 * 1024);
        }
        ob.reserve_seqs()?;
        if !ob.sync() {
            return Err(ob.last_error);
        }
        Ok(ob)
    }

    /// Makes a write through sled and remembers it until the next successful flush.
    /// A failed write sets the condition and returns false.
    fn write(&mut self, tree: TreeId, key: &[u8], value: Option<Vec<u8>>) -> bool {
        self.write_as(tree, key, value, true)
    }

    /// [`Self::write`]; `durable` false for a write that may wait for the next sync
    /// (see `lazy_dirty`).
    fn write_as(
        &mut self,
        tree: TreeId,
        key: &[u8],
        value: Option<Vec<u8>>,
        durable: bool,
    ) -> bool {
        let w = Write {
            tree,
            key: key.into(),
            value: value.map(Into::into),
        };
        let result = match &self.store {
            Some(st) => w.apply(st).map_err(|e| e.to_string()),
            None => Err("the outbox store is closed".into()),
        };
        match result {
            Ok(()) => {
                self.journal_bytes += w.bytes();
                self.journal.push(w);
                // Lazy writes wait for the next sync, but not in unbounded number: the
                // journal keeps each until then (a drain with nothing new to send).
                if durable || self.journal.len() >= MAX_LAZY_WRITES {
                    self.dirty = true;
                } else {
                    self.lazy_dirty = true;
                }
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// A write or flush failed: the store must be reopened before the next write. A
    /// full disk (ENOSPC) is reported as such; anything else as a write error.
    fn fail(&mut self, e: String) {
        self.broken = true;
        let full = e.contains("No space left") || e.contains("StorageFull");
        self.last_error = e.clone();
        self.set_condition(if full {
            Condition::DiskFull
        } else {
            Condition::WriteError(e)
        });
    }

    /// Flushes sled; on success the journal is no longer needed.
    fn sync(&mut self) -> bool {
        let result = match &self.store {
            Some(st) => st.db.flush().map(drop).map_err(|e| e.to_string()),
            None => Err("the outbox store is closed".into()),
        };
        self.synced(result)
    }

    /// Takes the result of a sled flush: on success the journal is no longer needed;
    /// a failure breaks the store until it is reopened.
    fn synced(&mut self, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => {
                self.dirty = false;
                self.lazy_dirty = false;
                self.unflushed = 0;
                self.journal.clear();
                self.journal_bytes = 0;
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// After a failed write sled returns that error for every later write until the
    /// store is opened again (its files hold everything up to the last flush). Closes
    /// and reopens it, and makes again the writes made since that flush. At most once
    /// per [`REOPEN_EVERY`], and only when the disk has room.
    fn reopen(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now < self.next_reopen || !self.disk_has_room(self.memory_bytes + self.journal_bytes) {
            return false;
        }
        self.next_reopen = now + REOPEN_EVERY;
        let path = self.dir.join("outbox");
        // sled holds an exclusive lock on its files while any handle lives.
        self.store = None;
        let st = match Store::open(&path, self.limits.cache_bytes) {
            Ok(st) => st,
            Err(e) => {
                self.fail(format!("reopening: {e}"));
                return false;
            }
        };
        match meta_u64(&st.meta, META_EPOCH) {
            Ok(Some(e)) if e == self.epoch => {}
            other => {
                // Not the store this outbox wrote: leave it alone.
                self.fail(format!("reopened store has another epoch ({other:?})"));
                return false;
            }
        }
        self.store = Some(st);
        self.broken = false;
        let replayed = {
            let st = self.store.as_ref().expect("just set");
            self.journal.iter().try_for_each(|w| w.apply(st))
        };
        if let Err(e) = replayed {
            self.fail(format!("replaying: {e}"));
            return false;
        }
        let counted = count_records(
            &self.store.as_ref().expect("just set").records,
            &self.tombstones,
        );
        match counted {
            Ok((bytes, count, _)) => {
                self.disk_bytes = bytes;
                self.disk_count = count;
            }
            Err(e) => {
                self.fail(format!("recounting: {e}"));
                return false;
            }
        }
        // The seq block and the drop count may have been lost with the failed flush.
        self.seq_reserved = self.next_seq;
        self.dropped_persisted = self.dropped.wrapping_add(1);
        if self.reserve_seqs().is_err() || !self.sync() {
            return false;
        }
        tracing::info!(
            depth = self.disk_count,
            "outbox: store reopened after a failed write"
        );
        self.set_condition(Condition::Ok);
        true
    }

    /// Persists a new block of seqs before handing any of them out.
    fn reserve_seqs(&mut self) -> Result<(), String> {
        if self.next_seq + 1 >= self.seq_reserved {
            let upto = self.next_seq + SEQ_BLOCK;
            if !self.write(
                TreeId::Meta,
                META_SEQ_RESERVED,
                Some(upto.to_be_bytes().into()),
            ) {
                return Err(self.last_error.clone());
            }
            self.seq_reserved = upto;
        }
        Ok(())
    }

    /// Whether the disk may take `extra` more bytes without eating the reserve.
    fn disk_has_room(&self, extra: u64) -> bool {
        free_bytes(&self.dir)
            >= self.limits.disk_reserve_bytes + DISK_FACTOR * (self.unflushed + extra)
    }

    fn set_condition(&mut self, c: Condition) {
        if c != self.condition {
            match &c {
                Condition::Ok => tracing::info!("outbox: disk writable again"),
                Condition::DiskFull => {
                    tracing::warn!("outbox: disk nearly full; keeping new records in memory")
                }
                Condition::WriteError(e) => {
                    tracing::error!(error = %e, "outbox: write failed; keeping new records in memory")
                }
            }
            self.condition = c;
        }
    }

    /// The oldest record on disk that is neither acked nor evicted: (seq, bytes).
    fn oldest_on_disk(&self) -> Option<(u64, usize)> {
        let st = self.store.as_ref()?;
        let mut from = 0u64;
        loop {
            let (k, v) = st.records.range(from.to_be_bytes()..).next()?.ok()?;
            let seq = key_seq(&k);
            match self.tombstones.range_end(seq) {
                // Skip the whole run of acked records at once.
                Some(hi) => from = hi.checked_add(1)?,
                None => return Some((seq, v.len())),
            }
        }
    }

    /// Evicts the oldest records until `incoming` more bytes fit: the live total under
    /// `max_bytes`, and, for a record bound for memory, memory under `memory_bytes`.
    /// Disk records are older than memory ones, so the disk goes first. On a disk that
    /// cannot take a delete, an evicted record becomes a tombstone.
    fn evict_for(&mut self, incoming: u64, to_memory: bool) {
        loop {
            let over_total = self.disk_bytes + self.memory_bytes + incoming > self.limits.max_bytes;
            let over_memory = to_memory && self.memory_bytes + incoming > self.limits.memory_bytes;
            if !over_total && !over_memory {
                return;
            }
            if over_total && self.disk_count > 0 {
                match self.oldest_on_disk() {
                    Some((seq, n)) => {
                        if self.condition != Condition::Ok
                            || !self.write(TreeId::Records, &seq.to_be_bytes(), None)
                        {
                            self.tombstones.insert(seq);
                        }
                        self.disk_bytes = self.disk_bytes.saturating_sub(n as u64);
                        self.disk_count -= 1;
                        self.dropped += 1;
                        continue;
                    }
                    None if self.store.is_some() => {
                        self.disk_bytes = 0;
                        self.disk_count = 0;
                        continue;
                    }
                    None => {}
                }
            }
            match self.memory.pop_front() {
                Some((_, n)) => {
                    self.memory_bytes -= n as u64;
                    self.dropped += 1;
                }
                None => return,
            }
        }
    }

    /// Moves records waiting in memory to disk, and makes the writes that waited, if
    /// there is room now.
    fn drain_memory_to_disk(&mut self) {
        if self.memory.is_empty() && self.condition == Condition::Ok && self.deferred.is_empty() {
            return;
        }
        if self.broken && !self.reopen() {
            return;
        }
        if !self.disk_has_room(self.memory_bytes) {
            self.set_condition(Condition::DiskFull);
            return;
        }
        self.set_condition(Condition::Ok);
        if self.reserve_seqs().is_err() {
            return;
        }
        while let Some((rec, n)) = self.memory.pop_front() {
            let bytes = postcard::to_stdvec(&rec).unwrap_or_default();
            if !self.write(TreeId::Records, &rec.seq.to_be_bytes(), Some(bytes)) {
                self.memory.push_front((rec, n));
                return;
            }
            self.memory_bytes -= n as u64;
            self.disk_bytes += n as u64;
            self.disk_count += 1;
            self.unflushed += n as u64;
        }
        while !self.deferred.is_empty() {
            let w = self.deferred.remove(0);
            if !self.write(w.tree, &w.key, w.value.as_ref().map(|v| v.to_vec())) {
                self.deferred.insert(0, w);
                return;
            }
        }
    }

    /// Deletes up to `budget` acked records from disk, oldest first; returns whether
    /// more wait. Deletes cost as much as inserts in sled, so the agent runs this
    /// when it is idle rather than on every ack. Nothing happens while the disk
    /// cannot take writes.
    pub fn compact(&mut self, budget: usize) -> bool {
        let mut done = 0;
        while done < budget && self.condition == Condition::Ok {
            let Some((lo, hi)) = self.tombstones.first() else {
                break;
            };
            let Some(st) = &self.store else { break };
            let keys: Vec<u64> = st
                .records
                .range(lo.to_be_bytes()..=hi.to_be_bytes())
                .keys()
                .filter_map(|k| k.ok())
                .map(|k| key_seq(&k))
                .take(budget - done)
                .collect();
            let mut upto = hi;
            let full = keys.len() == budget - done;
            for &seq in &keys {
                if !self.write_as(TreeId::Records, &seq.to_be_bytes(), None, false) {
                    return !self.tombstones.is_empty();
                }
                done += 1;
            }
            if full {
                upto = *keys.last().expect("budget > done");
            }
            self.tombstones.trim_first(upto);
        }
        !self.tombstones.is_empty()
    }

    /// A write made now if the disk takes it, else once space returns.
    fn write_or_defer(&mut self, tree: TreeId, key: &[u8], value: Vec<u8>) {
        if self.condition == Condition::Ok
            && self.disk_has_room(value.len() as u64)
            && self.write(tree, key, Some(value.clone()))
        {
            return;
        }
        self.deferred.push(Write {
            tree,
            key: key.into(),
            value: Some(value.into()),
        });
    }

    /// Records a command before it runs. Returns false if the id was seen before. The
    /// entry is durable at the next [`Outbox::flush`], which the agent makes before it
    /// starts any run (one sync for a burst of commands).
    pub fn accept_command(&mut self, id: &str, module: &str, at_ms: i64) -> bool {
        match self.log_start(id, module, at_ms) {
            None => false,
            Some(true) => {
                self.command_count += 1;
                if self.command_count > self.limits.max_commands
                    || std::time::Instant::now() >= self.next_prune
                {
                    self.prune_commands(at_ms);
                }
                true
            }
            Some(false) => true,
        }
    }

    /// The command log's record of a run about to start, under `key`: None if the key
    /// was seen before, else whether the entry is on disk. One the disk cannot take is
    /// remembered in memory (a crash now could run it again; the backend keeps one
    /// result per run, whatever its record id).
    fn log_start(&mut self, key: &str, module: &str, at_ms: i64) -> Option<bool> {
        if self.memory_commands.contains(key) {
            return None;
        }
        if let Some(st) = &self.store {
            if let Ok(Some(_)) = st.commands.get(key.as_bytes()) {
                return None;
            }
        }
        let entry = CommandEntry {
            module: module.to_string(),
            received_ms: at_ms,
            done: false,
        };
        let bytes = postcard::to_stdvec(&entry).unwrap_or_default();
        let on_disk = self.condition == Condition::Ok
            && self.disk_has_room(bytes.len() as u64)
            && self.write(TreeId::Commands, key.as_bytes(), Some(bytes));
        if !on_disk {
            self.memory_commands.insert(key.to_string());
        }
        Some(on_disk)
    }

    /// Commands received at or before this time (the agent's clock, ms) may have been
    /// let go by the command log; 0 when none has. A run issued before it could be a
    /// replay the log no longer recognises.
    pub fn forgotten_before_ms(&self) -> i64 {
        self.commands_forgotten_ms
    }

    /// Entries in the command log.
    pub fn command_count(&self) -> u64 {
        self.command_count
    }

    /// Lets go of finished commands older than [`COMMAND_MEMORY_MS`], and, past
    /// `max_commands`, of the oldest finished ones until a tenth is free. Commands
    /// still running are kept. Returns how many went.
    pub fn prune_commands(&mut self, now: i64) -> u64 {
        self.next_prune = std::time::Instant::now() + PRUNE_EVERY;
        if self.condition != Condition::Ok || self.broken {
            return 0;
        }
        let Some(st) = &self.store else { return 0 };
        let cutoff = now.saturating_sub(COMMAND_MEMORY_MS);
        let mut done: Vec<(i64, sled::IVec)> = Vec::new();
        let mut total = 0u64;
        for (k, v) in st.commands.iter().filter_map(|r| r.ok()) {
            if k.starts_with(SLOT_PREFIX.as_bytes()) {
                continue;
            }
            total += 1;
            match postcard::from_bytes::<CommandEntry>(&v) {
                Ok(e) if e.done => done.push((e.received_ms, k)),
                Ok(_) => {}
                // An entry that cannot be read is of no use.
                Err(_) => done.push((i64::MIN, k)),
            }
        }
        self.command_count = total;
        done.sort_unstable_by_key(|(at, _)| *at);
        let max = self.limits.max_commands;
        let over = total.saturating_sub(max - max / 10);
        let (mut gone, mut early) = (0u64, 0u64);
        let mut newest = self.commands_forgotten_ms;
        for (at, key) in done {
            let full = total > max && gone < over;
            if at >= cutoff && !full {
                break;
            }
            if !self.write(TreeId::Commands, &key, None) {
                break;
            }
            if at >= cutoff {
                early += 1;
            }
            newest = newest.max(at);
            gone += 1;
        }
        if early > 0 {
            tracing::warn!(
                early,
                forgotten_before_ms = newest,
                max,
                "command log full: let go of commands younger than the longest deadline; runs issued before them are refused"
            );
        }
        self.command_count -= gone;
        if newest != self.commands_forgotten_ms {
            self.commands_forgotten_ms = newest;
            self.write(
                TreeId::Meta,
                META_COMMANDS_FORGOTTEN,
                Some((newest as u64).to_be_bytes().into()),
            );
        }
        if gone > 0 {
            tracing::info!(gone, kept = self.command_count, "command log pruned");
            self.flush();
        }
        gone
    }

    /// Marks a command finished (its result is in the outbox).
    pub fn finish_command(&mut self, id: &str) {
        if self.memory_commands.remove(id) {
            return;
        }
        let entry = self
            .store
            .as_ref()
            .and_then(|st| st.commands.get(id.as_bytes()).ok().flatten())
            .and_then(|v| postcard::from_bytes::<CommandEntry>(&v).ok());
        if let Some(mut entry) = entry {
            entry.done = true;
            let bytes = postcard::to_stdvec(&entry).unwrap_or_default();
            self.write_or_defer(TreeId::Commands, id.as_bytes(), bytes);
        }
    }

    /// Commands accepted but never finished: the agent died while they ran.
    pub fn unfinished_commands(&self) -> Vec<(String, CommandEntry)> {
        let Some(st) = &self.store else {
            return Vec::new();
        };
        st.commands
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| {
                let entry: CommandEntry = postcard::from_bytes(&v).ok()?;
                (!entry.done).then(|| (String::from_utf8_lossy(&k).into_owned(), entry))
            })
            .collect()
    }

    /// A small value kept beside the outbox (such as the loaded modules).
    pub fn get_meta(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(w) = self
            .deferred
            .iter()
            .rev()
            .find(|w| w.tree == TreeId::Meta && w.key == key)
        {
            return w.value.as_ref().map(|v| v.to_vec());
        }
        let st = self.store.as_ref()?;
        st.meta.get(key).ok().flatten().map(|v| v.to_vec())
    }

    /// Durable at the next [`Outbox::flush`] (the agent's tick, or before a run starts
    /// or a batch is sent), with whatever else was written since.
    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) {
        self.write_or_defer(TreeId::Meta, key, value.to_vec());
    }

    /// Records a scheduled slot's run before it starts, in the command log under
    /// [`slot_key`]. False if that slot was started before (it never runs twice). The
    /// entry goes when its result is stored ([`Self::finish_slot`]), in the same sync;
    /// one left at start is a run the agent never finished (`run_interrupted`).
    pub fn accept_slot(&mut self, run_id: &str, module: &str, at_ms: i64) -> bool {
        self.log_start(&slot_key(run_id), module, at_ms).is_some()
    }

    /// A slot's result is in the outbox: its entry goes (a slot's progress in the
    /// schedule keeps it from running again).
    pub fn finish_slot(&mut self, run_id: &str) {
        let key = slot_key(run_id);
        if self.memory_commands.remove(&key) {
            return;
        }
        let known = self
            .store
            .as_ref()
            .is_some_and(|st| matches!(st.commands.get(key.as_bytes()), Ok(Some(_))));
        if known
            && !(self.condition == Condition::Ok
                && self.write(TreeId::Commands, key.as_bytes(), None))
        {
            self.deferred.push(Write {
                tree: TreeId::Commands,
                key: key.as_bytes().into(),
                value: None,
            });
        }
    }

    /// Syncs every write, the lazy deletes of acked records too (at shutdown).
    pub fn flush_all(&mut self) {
        if self.lazy_dirty {
            self.dirty = true;
        }
        self.flush();
    }

    /// [`Outbox::flush`] in two halves, so that the disk sync can run on another
    /// thread: this half does the writes a flush makes (records waiting in memory, the
    /// drop count) and returns the sync to run, if one is needed. Run it (it blocks in
    /// fdatasync) and hand its result to [`Self::end_flush`] before the next use of the
    /// outbox; until then nothing appended is durable. `all`: the lazy deletes too, as
    /// [`Self::flush_all`].
    pub fn begin_flush(&mut self, all: bool) -> Option<PendingSync> {
        if all && self.lazy_dirty {
            self.dirty = true;
        }
        self.prepare_flush();
        match &self.store {
            Some(st) if self.dirty && !self.broken => Some(PendingSync { db: st.db.clone() }),
            _ => None,
        }
    }

    /// The second half of a flush begun with [`Self::begin_flush`]: the sync's result.
    pub fn end_flush(&mut self, result: Result<(), String>) {
        self.synced(result);
    }

    /// The writes a flush makes before its sync (see [`Outbox::flush`]).
    fn prepare_flush(&mut self) {
        // Also the moment to notice that space ran out, or came back.
        if self.condition == Condition::Ok && !self.disk_has_room(0) {
            self.set_condition(Condition::DiskFull);
        }
        if self.condition != Condition::Ok || !self.memory.is_empty() || !self.deferred.is_empty() {
            self.drain_memory_to_disk();
        }
        if self.dropped != self.dropped_persisted
            && self.condition == Condition::Ok
            && self.write(
                TreeId::Meta,
                META_DROPPED,
                Some(self.dropped.to_be_bytes().into()),
            )
        {
            self.dropped_persisted = self.dropped;
        }
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes of live records (disk plus memory).
    pub fn live_bytes(&self) -> u64 {
        self.disk_bytes + self.memory_bytes
    }

    /// Size of the store's files on disk.
    pub fn disk_usage(&self) -> u64 {
        self.store
            .as_ref()
            .and_then(|st| st.db.size_on_disk().ok())
            .unwrap_or(0)
    }
}

impl Outbox for SledOutbox {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn append(&mut self, at_ms: i64, body: RecordBody) -> Record {
        let record = Record {
            seq: self.next_seq,
            at_ms,
            body,
        };
        self.next_seq += 1;
        let bytes = postcard::to_stdvec(&record).unwrap_or_default();
        let n = bytes.len() as u64;
        self.drain_memory_to_disk();
        if self.condition == Condition::Ok {
            if !self.disk_has_room(n) {
                self.set_condition(Condition::DiskFull);
            } else {
                self.evict_for(n, false);
                if self.reserve_seqs().is_ok()
                    && self.write(TreeId::Records, &record.seq.to_be_bytes(), Some(bytes))
                {
                    self.disk_bytes += n;
                    self.disk_count += 1;
                    self.unflushed += n;
                    return record;
                }
            }
        }
        self.evict_for(n, true);
        self.memory.push_back((record.clone(), n as usize));
        self.memory_bytes += n;
        record
    }

    fn flush(&mut self) {
        if let Some(sync) = self.begin_flush(false) {
            let result = sync.run();
            self.end_flush(result);
        }
    }

    fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut corrupt = Vec::new();
        if let Some(st) = &self.store {
            let mut iter = st.records.range(from.to_be_bytes()..);
            while let Some(item) = iter.next() {
                let Ok((k, v)) = item else { break };
                if let Some(hi) = self.tombstones.range_end(key_seq(&k)) {
                    // Jump over a run of acked records.
                    match hi.checked_add(1) {
                        Some(next) => iter = st.records.range(next.to_be_bytes()..),
                        None => break,
                    }
                    continue;
                }
                if !out.is_empty() && bytes + v.len() > max_bytes {
                    return out;
                }
                match postcard::from_bytes::<Record>(&v) {
                    Ok(r) => {
                        bytes += v.len();
                        out.push(r);
                    }
                    Err(e) => {
                        tracing::error!(seq = key_seq(&k), error = %e, "dropping undecodable outbox record");
                        corrupt.push((key_seq(&k), v.len()));
                    }
                }
            }
        }
        for (seq, n) in corrupt {
            if self.condition != Condition::Ok
                || !self.write(TreeId::Records, &seq.to_be_bytes(), None)
            {
                self.tombstones.insert(seq);
            }
            self.disk_bytes = self.disk_bytes.saturating_sub(n as u64);
            self.disk_count = self.disk_count.saturating_sub(1);
            self.dropped += 1;
        }
        for (r, n) in &self.memory {
            if r.seq < from {
                continue;
            }
            // A seq the disk has not reserved could be handed out again after a crash,
            // and the backend would take the new record for a duplicate: hold it back.
            if r.seq >= self.seq_reserved {
                break;
            }
            if !out.is_empty() && bytes + n > max_bytes {
                break;
            }
            bytes += n;
            out.push(r.clone());
        }
        out
    }

    fn first_seq(&self) -> Option<u64> {
        self.oldest_on_disk()
            .map(|(s, _)| s)
            .or_else(|| self.memory.front().map(|(r, _)| r.seq))
    }

    fn ack(&mut self, ack: &Ack) -> u64 {
        if ack.epoch != self.epoch {
            return 0;
        }
        let mut deleted = 0;
        for &(lo, hi) in &ack.ranges {
            // Seqs not yet handed out cannot be acked: a bogus range must not cover
            // records made later.
            let hi = hi.min(self.next_seq.saturating_sub(1));
            if hi < lo {
                continue;
            }
            let keys: Vec<(u64, usize)> = match &self.store {
                Some(st) => st
                    .records
                    .range(lo.to_be_bytes()..=hi.to_be_bytes())
                    .filter_map(|r| r.ok())
                    .map(|(k, v)| (key_seq(&k), v.len()))
                    .filter(|(s, _)| !self.tombstones.contains(*s))
                    .collect(),
                None => Vec::new(),
            };
            // The records leave the outbox now; their deletes wait for `compact`.
            for (_, n) in &keys {
                self.disk_bytes = self.disk_bytes.saturating_sub(*n as u64);
                self.disk_count = self.disk_count.saturating_sub(1);
                deleted += 1;
            }
            if !keys.is_empty() {
                self.tombstones.insert_range(lo, hi);
            }
            let before = self.memory.len();
            let mut freed = 0u64;
            self.memory.retain(|(r, n)| {
                let acked = lo <= r.seq && r.seq <= hi;
                if acked {
                    freed += *n as u64;
                }
                !acked
            });
            self.memory_bytes -= freed;
            deleted += (before - self.memory.len()) as u64;
        }
        // A delete lost to a crash only means the record is sent again and the backend
        // drops it as a duplicate.
        deleted
    }

    fn depth(&self) -> u64 {
        self.disk_count + self.memory.len() as u64
    }

    fn oldest_at_ms(&self) -> Option<i64> {
        let disk = self.oldest_on_disk().and_then(|(seq, _)| {
            let v = self.store.as_ref()?.records.get(seq.to_be_bytes()).ok()??;
            postcard::from_bytes::<Record>(&v).ok().map(|r| r.at_ms)
        });
        disk.or_else(|| self.memory.front().map(|(r, _)| r.at_ms))
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn condition(&self) -> Condition {
        self.condition.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::wire::{AgentEvent, RecordBody};

    fn event(n: u32) -> RecordBody {
        RecordBody::Event(AgentEvent {
            kind: "test".into(),
            message: format!("event {n:>20}"),
        })
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("imn-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn append_read_ack_and_reopen() {
        let dir = tmp("basic");
        let epoch;
        {
            let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
            epoch = ob.epoch();
            for i in 0..10 {
                assert_eq!(ob.append(i, event(i as u32)).seq, i as u64 + 1);
            }
            ob.flush();
            let recs = ob.read_from(3, 1 << 20);
            assert_eq!(recs.first().unwrap().seq, 3);
            assert_eq!(recs.len(), 8);
            assert_eq!(ob.read_from(1, 1).len(), 1, "at least one record");
            assert_eq!(ob.ack(&Ack::from_seqs(epoch, 1..=4)), 4);
            assert_eq!(ob.ack(&Ack::from_seqs(epoch + 1, 5..=6)), 0);
            assert_eq!(ob.depth(), 6);
            assert_eq!(ob.first_seq(), Some(5));
            // Acked records leave the disk when compacted; until then a restart sends
            // them again (and the backend drops them as duplicates).
            assert!(ob.compact(2), "two of four deleted, more wait");
            assert_eq!(ob.read_from(0, 1 << 20).first().unwrap().seq, 5);
            assert!(!ob.compact(100));
            ob.flush();
        }
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(ob.epoch(), epoch, "epoch survives a restart");
        assert_eq!(ob.depth(), 6);
        ob.ack(&Ack::from_seqs(epoch, 5..=10));
        assert_eq!(ob.depth(), 0);
        assert_eq!(ob.first_seq(), None);
        assert!(ob.read_from(0, 1 << 20).is_empty());
        ob.compact(usize::MAX);
        ob.flush();
        drop(ob);
        // Everything acked and deleted: seqs must never be reused after a restart.
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert!(ob.append(0, event(0)).seq > 10);
    }

    #[test]
    fn full_outbox_evicts_oldest_and_counts() {
        let dir = tmp("evict");
        let limits = OutboxLimits {
            max_bytes: 2_000,
            ..OutboxLimits::default()
        };
        let mut ob = SledOutbox::open(&dir, limits.clone()).unwrap();
        for i in 0..100 {
            ob.append(i, event(i as u32));
        }
        ob.flush();
        assert!(ob.live_bytes() <= 2_000, "{}", ob.live_bytes());
        assert!(ob.dropped() > 0);
        assert_eq!(ob.dropped() + ob.depth(), 100, "produced = kept + dropped");
        let first = ob.first_seq().unwrap();
        assert_eq!(first, ob.dropped() + 1, "the oldest went first");
        drop(ob);
        let ob = SledOutbox::open(&dir, limits).unwrap();
        assert_eq!(
            ob.dropped() + ob.depth(),
            100,
            "the count survives a restart"
        );
    }

    #[test]
    fn unreadable_store_is_moved_aside() {
        let dir = tmp("corrupt");
        let epoch = {
            let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
            ob.append(1, event(1));
            ob.flush();
            ob.commit_marker();
            ob.epoch()
        };
        // Garble every file of the store.
        for f in std::fs::read_dir(dir.join("outbox")).unwrap().flatten() {
            if f.path().is_file() {
                std::fs::write(f.path(), b"garbage garbage garbage").unwrap();
            }
        }
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        let (aside, _why) = ob.recovered_from.clone().expect("reported");
        assert!(aside.exists());
        assert_ne!(ob.epoch(), epoch, "a new store has a new epoch");
        assert_eq!(
            ob.replaced_epoch,
            Some(epoch),
            "names the epoch it replaces"
        );
        assert_eq!(ob.append(2, event(2)).seq, 1);
    }

    /// A first start writes the marker and reports nothing; a store removed or
    /// truncated under the agent is found by the marker naming another epoch, once.
    #[test]
    fn a_lost_or_truncated_store_is_told_from_a_first_start() {
        let pause = || std::thread::sleep(std::time::Duration::from_millis(200));
        let dir = tmp("lost");
        let first = {
            let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
            assert_eq!(ob.replaced_epoch, None, "a first start is not a loss");
            ob.append(1, event(1));
            ob.flush();
            ob.commit_marker();
            ob.epoch()
        };
        let marker = std::fs::read_to_string(dir.join(EPOCH_MARKER)).unwrap();
        assert_eq!(marker.trim().parse::<u64>().unwrap(), first);
        pause();
        let ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!((ob.epoch(), ob.replaced_epoch), (first, None), "a restart");
        drop(ob);
        pause();
        // Removed whole (as a young store that was never synced comes back).
        std::fs::remove_dir_all(dir.join("outbox")).unwrap();
        let ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(ob.replaced_epoch, Some(first));
        assert_eq!(ob.recovered_from, None, "not moved aside: it was gone");
        // Cut again before the report was synced (no commit_marker): the loss of the
        // first epoch is still found.
        drop(ob);
        pause();
        std::fs::remove_dir_all(dir.join("outbox")).unwrap();
        let second = {
            let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
            assert_eq!(ob.replaced_epoch, Some(first), "not hidden by a second cut");
            ob.flush();
            ob.commit_marker();
            ob.epoch()
        };
        assert_ne!(second, first);
        pause();
        let ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(ob.replaced_epoch, None, "reported once");
        drop(ob);
        pause();
        // Truncated to nothing: sled would start an empty store without a word.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("outbox").join("db"))
            .unwrap()
            .set_len(0)
            .unwrap();
        let ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(ob.replaced_epoch, Some(second));
        assert_eq!(ob.depth(), 0);
    }

    /// A slot is logged before its run, once; its entry goes with its result, and one
    /// left behind is found at the next start.
    #[test]
    fn slots_are_logged_once_and_found_unfinished() {
        let dir = tmp("slots");
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert!(ob.accept_slot("m1@1000", "echo_module", 1));
        assert!(ob.accept_slot("m1@2000", "echo_module", 2));
        assert!(!ob.accept_slot("m1@1000", "echo_module", 3), "never twice");
        ob.finish_slot("m1@2000");
        ob.flush();
        drop(ob);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        let left: Vec<String> = ob
            .unfinished_commands()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, vec![slot_key("m1@1000")]);
        assert!(
            !ob.accept_slot("m1@1000", "echo_module", 4),
            "still known after a restart"
        );
        assert_eq!(
            ob.command_count(),
            0,
            "slots do not count against the command log"
        );
        ob.finish_slot("m1@1000");
        ob.flush();
        assert!(ob.unfinished_commands().is_empty());
    }

    /// Deletes of acked records wait for the next sync; records and commands do not.
    #[test]
    fn compaction_deletes_do_not_ask_for_a_sync() {
        let dir = tmp("lazy");
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        for n in 0..10 {
            ob.append(1, event(n));
        }
        assert!(ob.dirty);
        ob.flush();
        assert!(!ob.dirty);
        let acked = ob.ack(&imn_proto::wire::Ack {
            epoch: ob.epoch(),
            ranges: vec![(1, 10)],
        });
        assert_eq!(acked, 10);
        ob.compact(100);
        assert!(!ob.dirty && ob.lazy_dirty, "deletes are lazy");
        ob.flush();
        assert!(
            ob.lazy_dirty,
            "a flush with nothing durable to sync leaves them"
        );
        assert!(ob.accept_command("c", "echo_module", 1));
        assert!(ob.dirty, "a command must be synced");
        ob.flush();
        assert!(!ob.dirty && !ob.lazy_dirty, "one sync takes both");
    }

    /// A flush split in two, its sync run on another thread: nothing is durable until
    /// its result is taken; the lazy deletes wait unless asked for; and a failed sync
    /// breaks the store as a failed flush does, to be reopened by the next flush with
    /// nothing lost.
    #[test]
    fn a_flush_can_sync_on_another_thread() {
        let dir = tmp("split");
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        let epoch = ob.epoch();
        ob.append(1, event(1));
        let sync = ob.begin_flush(false).expect("a record to sync");
        assert!(ob.dirty, "not durable before the sync returns");
        let result = std::thread::spawn(move || sync.run()).join().unwrap();
        ob.end_flush(result);
        assert!(!ob.dirty && ob.journal.is_empty(), "durable");
        assert!(ob.begin_flush(false).is_none(), "nothing left to sync");
        assert_eq!(ob.ack(&Ack::from_seqs(epoch, [1])), 1);
        ob.compact(10);
        assert!(ob.lazy_dirty);
        assert!(ob.begin_flush(false).is_none(), "deletes alone wait");
        let sync = ob.begin_flush(true).expect("all: the deletes too");
        ob.end_flush(sync.run());
        assert!(!ob.lazy_dirty && !ob.dirty);
        // The sync fails (its handle on the store gone with it).
        ob.append(2, event(2));
        let sync = ob.begin_flush(false).expect("a record to sync");
        drop(sync);
        ob.end_flush(Err("No space left on device".into()));
        assert!(ob.broken && ob.dirty);
        assert_eq!(ob.condition(), Condition::DiskFull);
        // The next flush reopens the store and writes again what the failed sync lost
        // (and the drop count, which may have been lost with it). sled's background
        // flusher can hold the old handle's file lock a moment after the drop: the
        // reopen then fails and is tried again, as the agent does every tick.
        let mut tries = 0;
        let sync = loop {
            if let Some(sync) = ob.begin_flush(false) {
                break sync;
            }
            tries += 1;
            assert!(tries < 100, "the store never reopened: {}", ob.last_error);
            ob.next_reopen = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(!ob.broken, "reopened");
        ob.end_flush(sync.run());
        assert!(!ob.dirty);
        assert_eq!(ob.condition(), Condition::Ok);
        let seqs: Vec<u64> = ob.read_from(0, 1 << 20).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2]);
    }

    #[test]
    fn commands_are_accepted_once() {
        let dir = tmp("cmds");
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert!(ob.accept_command("c1", "echo_module", 1));
        assert!(!ob.accept_command("c1", "echo_module", 2));
        assert_eq!(ob.unfinished_commands().len(), 1);
        ob.finish_command("c1");
        ob.flush();
        drop(ob);
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert!(!ob.accept_command("c1", "echo_module", 3));
        assert!(ob.unfinished_commands().is_empty());
    }
}

#[cfg(test)]
mod command_log {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("imn-cmdlog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const DAY: i64 = 86_400_000;

    /// Finished commands are remembered for the longest deadline and a day more, then
    /// let go; the time of the newest one let go is kept, across a restart.
    #[test]
    fn ids_last_past_the_longest_deadline_then_go() {
        let dir = tmp("age");
        let now = 100 * DAY;
        {
            let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
            assert_eq!(ob.forgotten_before_ms(), 0);
            for (id, age) in [("old", 9 * DAY), ("older", 20 * DAY), ("week", 7 * DAY)] {
                assert!(ob.accept_command(id, "echo_module", now - age));
                ob.finish_command(id);
            }
            // Never finished (interrupted): kept, whatever its age.
            assert!(ob.accept_command("running", "echo_module", now - 30 * DAY));
            ob.flush();
            assert_eq!(ob.prune_commands(now), 2);
            assert_eq!(ob.command_count(), 2);
            assert_eq!(ob.forgotten_before_ms(), now - 9 * DAY);
            assert!(
                !ob.accept_command("week", "echo_module", now),
                "7 days: still known"
            );
            assert!(!ob.accept_command("running", "echo_module", now));
            ob.flush();
        }
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(
            ob.forgotten_before_ms(),
            now - 9 * DAY,
            "kept across a restart"
        );
        assert_eq!(ob.command_count(), 2, "week and running");
        assert_eq!(ob.unfinished_commands().len(), 1);
        // An id let go is accepted again: the caller refuses runs issued before
        // forgotten_before_ms (see fresh::check_run).
        assert!(ob.accept_command("old", "echo_module", now));
    }

    /// Past `max_commands` the oldest finished commands go early, down to nine tenths.
    #[test]
    fn the_log_is_bounded() {
        let dir = tmp("cap");
        let limits = OutboxLimits {
            max_commands: 50,
            ..OutboxLimits::default()
        };
        let mut ob = SledOutbox::open(&dir, limits).unwrap();
        let now = 100 * DAY;
        for i in 0..60 {
            let id = format!("c{i:03}");
            assert!(ob.accept_command(&id, "echo_module", now + i));
            ob.finish_command(&id);
            ob.flush();
            assert!(ob.command_count() <= 51, "{}", ob.command_count());
        }
        assert!(ob.command_count() <= 50);
        // The oldest went; the newest are known.
        assert!(!ob.accept_command("c059", "echo_module", now + 100));
        assert!(ob.accept_command("c000", "echo_module", now + 100));
        assert!(ob.forgotten_before_ms() >= now);
    }
}

/// The outbox on a real full disk: a 2 MiB tmpfs filled by someone else. Needs root
/// (to mount); the test suite runs as root, and says so when it cannot.
#[cfg(test)]
mod full_disk {
    use super::*;
    use imn_proto::wire::{AgentEvent, RecordBody};
    use std::process::Command;

    struct Mount(PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmpfs(name: &str, size: &str) -> Option<Mount> {
        let d = std::env::temp_dir().join(format!("imn-full-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "imn-test"])
            .arg(&d)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot mount a tmpfs; the test suite runs as root"
            );
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Mount(d))
    }

    fn fill(path: &Path) {
        let _ = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", path.display()))
            .arg("bs=4k")
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn event(i: u64) -> RecordBody {
        RecordBody::Event(AgentEvent {
            kind: "test".into(),
            message: format!("{i} {}", "x".repeat(200)),
        })
    }

    /// sled refuses every write after one fails; the outbox must reopen it once space
    /// returns, lose nothing it was given, and count exactly.
    #[test]
    fn write_errors_on_a_full_disk_are_survived() {
        let Some(m) = tmpfs("outbox", "2m") else {
            return;
        };
        let limits = OutboxLimits {
            disk_reserve_bytes: 256 * 1024,
            memory_bytes: 1 << 20,
            ..OutboxLimits::default()
        };
        let data = m.0.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut ob = SledOutbox::open(&data, limits.clone()).unwrap();
        let epoch = ob.epoch();
        let mut made = Vec::new();
        for i in 0..200 {
            made.push(ob.append(i, event(i as u64)).seq);
        }
        ob.flush();
        assert!(ob.accept_command("c1", "echo_module", 1));
        // Someone else takes every byte; sled still has unflushed writes to make.
        for i in 200..260 {
            made.push(ob.append(i, event(i as u64)).seq);
        }
        let filler = m.0.join("filler");
        fill(&filler);
        // Force sled itself to hit ENOSPC, under the outbox's guard: many small writes
        // (its log), then one big value (a blob file of its own; unpatched sled 0.34.7
        // then hangs in every flush).
        for i in 0..2000u32 {
            let _ = ob.write(TreeId::Meta, &i.to_be_bytes(), Some(vec![7u8; 200]));
        }
        let _ = ob.write(TreeId::Meta, b"pad", Some(vec![7u8; 256 * 1024]));
        ob.dirty = true;
        ob.flush();
        assert!(
            ob.broken && ob.condition() == Condition::DiskFull,
            "sled hit the full disk, reported as such: {:?}",
            ob.condition()
        );
        for i in 260..400 {
            made.push(ob.append(i, event(i as u64)).seq);
            ob.flush();
        }
        ob.finish_command("c1");
        assert_eq!(ob.ack(&Ack::from_seqs(epoch, 1..=50)), 50);
        ob.flush();
        assert_eq!(ob.depth(), 350);
        // Space returns: the store is reopened and everything goes to disk.
        std::fs::remove_file(&filler).unwrap();
        std::thread::sleep(REOPEN_EVERY);
        ob.flush();
        assert_eq!(ob.condition(), Condition::Ok);
        assert!(ob.memory.is_empty(), "memory moved to disk");
        assert!(!ob.compact(usize::MAX));
        assert!(ob.tombstones.is_empty(), "acked records deleted");
        let after = ob.append(401, event(401)).seq;
        ob.flush();
        assert_eq!(ob.depth(), 351);
        let seqs: Vec<u64> = ob.read_from(0, 1 << 30).iter().map(|r| r.seq).collect();
        let mut want: Vec<u64> = made[50..].to_vec();
        want.push(after);
        assert_eq!(seqs, want, "every unacked record, once, in order");
        assert_eq!(ob.dropped(), 0);
        drop(ob);
        // And it all survives a restart.
        let mut ob = SledOutbox::open(&data, limits).unwrap();
        assert_eq!(ob.recovered_from, None, "the store reopens");
        assert_eq!(ob.epoch(), epoch);
        let seqs: Vec<u64> = ob.read_from(0, 1 << 30).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, want);
        assert!(ob.unfinished_commands().is_empty(), "the finish was kept");
        assert!(ob.append(0, event(0)).seq > after, "no seq is reused");
    }
}
