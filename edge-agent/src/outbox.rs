//! The agent's durable outbox and command log, in sled.
//!
//! - A record is on disk before it is sent ([`Outbox::flush`] runs before every send),
//!   and leaves only when the backend's ack names it.
//! - Record ids are (agent, epoch, seq). The epoch is random and born with the store;
//!   seqs never repeat within an epoch, even across crashes, because a block of seqs is
//!   reserved on disk before any of them is handed out.
//! - The outbox is bounded by bytes of live records. When full it evicts the oldest
//!   records and counts them; the count is persisted and reported.
//! - It never lets sled reach a full disk (sled then hangs and cannot even reopen, see
//!   PITFALLS.md): before writing it checks free space (statvfs) against a reserve, and
//!   when space is short, or a write fails, it keeps new records in a bounded memory
//!   queue, reports the condition, and moves them to disk once space returns.
//! - A store that cannot be opened or read at start is moved aside and a new one (with
//!   a new epoch) takes its place; the agent reports it.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use imn_modules::wire::{Ack, Record, RecordBody};
use serde::{Deserialize, Serialize};

const META_EPOCH: &[u8] = b"epoch";
/// Seqs below this value may have been handed out; a restart starts above it.
const META_SEQ_RESERVED: &[u8] = b"seq_reserved";
const META_DROPPED: &[u8] = b"dropped";
/// Seqs reserved per meta write.
const SEQ_BLOCK: u64 = 100_000;
/// sled's log segment. Small segments keep its writes (and its jumps in disk use)
/// small next to a router's free space.
const SEGMENT_BYTES: usize = 64 * 1024;
/// sled writes more than the record (log headers, page rewrites, segment cleaning):
/// what a record may cost on disk, as a multiple of its size.
const DISK_FACTOR: u64 = 4;

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
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_bytes: 64 * 1024 * 1024,
            memory_bytes: 4 * 1024 * 1024,
            disk_reserve_bytes: 2 * 1024 * 1024,
            cache_bytes: 4 * 1024 * 1024,
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

pub struct SledOutbox {
    dir: PathBuf,
    limits: OutboxLimits,
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    commands: sled::Tree,
    epoch: u64,
    next_seq: u64,
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
    dirty: bool,
    /// Bytes written to sled since the last flush (still in its buffers, not yet
    /// visible to statvfs).
    unflushed: u64,
    /// Acked records the disk could not delete yet (it was full); never sent again,
    /// deleted once space returns.
    tombstones: BTreeSet<u64>,
    /// Commands seen while the disk could not record them.
    memory_commands: HashSet<String>,
    /// Set when the store found at start was unusable and moved aside.
    pub recovered_from: Option<(PathBuf, String)>,
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
    imn_modules::exec::system::disk_kib(path).1 * 1024
}

impl SledOutbox {
    /// Opens the store in `dir`/outbox; an unusable one is moved aside and replaced.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<SledOutbox, OutboxError> {
        let path = dir.join("outbox");
        match Self::open_at(dir, &path, limits.clone()) {
            Ok(ob) => Ok(ob),
            Err(e) => {
                let aside = dir.join(format!("outbox.corrupt-{}", imn_modules::now_ms()));
                tracing::error!(error = %e, aside = %aside.display(), "outbox unusable; moving it aside and starting a new epoch");
                if std::fs::rename(&path, &aside).is_err() {
                    let _ = std::fs::remove_dir_all(&path);
                }
                let mut ob = Self::open_at(dir, &path, limits).map_err(OutboxError::Store)?;
                ob.recovered_from = Some((aside, e));
                Ok(ob)
            }
        }
    }

    fn open_at(dir: &Path, path: &Path, limits: OutboxLimits) -> Result<SledOutbox, String> {
        let e = |e: sled::Error| e.to_string();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(limits.cache_bytes)
            .segment_size(SEGMENT_BYTES)
            .open()
            .map_err(e)?;
        let records = db.open_tree("records").map_err(e)?;
        let meta = db.open_tree("meta").map_err(e)?;
        let commands = db.open_tree("commands").map_err(e)?;
        let epoch = match meta_u64(&meta, META_EPOCH).map_err(e)? {
            Some(epoch) => epoch,
            None => {
                let epoch = rand::random::<u64>() | 1;
                meta.insert(META_EPOCH, &epoch.to_be_bytes()).map_err(e)?;
                epoch
            }
        };
        // Read every record once: proves the store is readable, and sizes it.
        let (mut bytes, mut count, mut last) = (0u64, 0u64, 0u64);
        for item in records.iter() {
            let (k, v) = item.map_err(e)?;
            postcard::from_bytes::<Record>(&v)
                .map_err(|err| format!("record {} is undecodable: {err}", key_seq(&k)))?;
            bytes += v.len() as u64;
            count += 1;
            last = key_seq(&k);
        }
        let reserved = meta_u64(&meta, META_SEQ_RESERVED).map_err(e)?.unwrap_or(1);
        let next_seq = reserved.max(last + 1);
        let dropped = meta_u64(&meta, META_DROPPED).map_err(e)?.unwrap_or(0);
        let mut ob = SledOutbox {
            dir: dir.to_path_buf(),
            limits,
            db,
            records,
            meta,
            commands,
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
            unflushed: 0,
            tombstones: BTreeSet::new(),
            memory_commands: HashSet::new(),
            recovered_from: None,
        };
        // Keep sled well clear of a full disk: it needs about twice the live data, and
        // never gives back its high-water mark.
        let room = (free_bytes(dir) + ob.db.size_on_disk().unwrap_or(0))
            .saturating_sub(ob.limits.disk_reserve_bytes)
            / (DISK_FACTOR - 1);
        if room < ob.limits.max_bytes {
            tracing::warn!(
                configured = ob.limits.max_bytes,
                room,
                "outbox capped by the free space of its filesystem"
            );
            ob.limits.max_bytes = room.max(64 * 1024);
        }
        ob.reserve_seqs().map_err(e)?;
        ob.db.flush().map_err(e)?;
        Ok(ob)
    }

    /// Persists a new block of seqs before handing any of them out.
    fn reserve_seqs(&mut self) -> Result<(), sled::Error> {
        if self.next_seq + 1 >= self.seq_reserved {
            let upto = self.next_seq + SEQ_BLOCK;
            self.meta.insert(META_SEQ_RESERVED, &upto.to_be_bytes())?;
            self.seq_reserved = upto;
            self.dirty = true;
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

    /// Evicts the oldest records until `incoming` more bytes fit: the live total under
    /// `max_bytes`, and, for a record bound for memory, memory under `memory_bytes`.
    /// Disk records are older than memory ones, so the disk goes first.
    fn evict_for(&mut self, incoming: u64, to_memory: bool) {
        loop {
            let over_total = self.disk_bytes + self.memory_bytes + incoming > self.limits.max_bytes;
            let over_memory = to_memory && self.memory_bytes + incoming > self.limits.memory_bytes;
            if !over_total && !over_memory {
                return;
            }
            if over_total
                && self.disk_count > 0
                && !matches!(self.condition, Condition::WriteError(_))
            {
                match self.records.pop_min() {
                    Ok(Some((_, v))) => {
                        self.disk_bytes = self.disk_bytes.saturating_sub(v.len() as u64);
                        self.disk_count -= 1;
                        self.dropped += 1;
                        self.dirty = true;
                        continue;
                    }
                    Ok(None) => {
                        self.disk_bytes = 0;
                        self.disk_count = 0;
                        continue;
                    }
                    Err(e) => self.set_condition(Condition::WriteError(e.to_string())),
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

    /// Moves records waiting in memory to disk, if there is room now.
    fn drain_memory_to_disk(&mut self) {
        if self.memory.is_empty() && self.condition == Condition::Ok {
            return;
        }
        if !self.disk_has_room(self.memory_bytes) {
            self.set_condition(Condition::DiskFull);
            return;
        }
        self.set_condition(Condition::Ok);
        while let Some((rec, n)) = self.memory.pop_front() {
            let bytes = postcard::to_stdvec(&rec).unwrap_or_default();
            if let Err(e) = self.records.insert(rec.seq.to_be_bytes(), bytes) {
                self.memory.push_front((rec, n));
                self.set_condition(Condition::WriteError(e.to_string()));
                return;
            }
            self.memory_bytes -= n as u64;
            self.disk_bytes += n as u64;
            self.disk_count += 1;
            self.unflushed += n as u64;
            self.dirty = true;
        }
        self.retry_tombstones();
    }

    /// Deletes acked records the full disk kept.
    fn retry_tombstones(&mut self) {
        while let Some(&seq) = self.tombstones.first() {
            match self.records.remove(seq.to_be_bytes()) {
                Ok(_) => {
                    self.tombstones.remove(&seq);
                    self.dirty = true;
                }
                Err(_) => return,
            }
        }
    }

    /// Records a command before it runs. Returns false if the id was seen before.
    pub fn accept_command(&mut self, id: &str, module: &str, at_ms: i64) -> bool {
        if self.memory_commands.contains(id) {
            return false;
        }
        let entry = CommandEntry {
            module: module.to_string(),
            received_ms: at_ms,
            done: false,
        };
        let bytes = postcard::to_stdvec(&entry).unwrap_or_default();
        if self.condition == Condition::Ok && self.disk_has_room(bytes.len() as u64) {
            match self
                .commands
                .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(bytes))
            {
                Ok(Ok(())) => {
                    if let Err(e) = self.db.flush() {
                        self.set_condition(Condition::WriteError(e.to_string()));
                    }
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(e) => self.set_condition(Condition::WriteError(e.to_string())),
            }
        } else if let Ok(Some(_)) = self.commands.get(id.as_bytes()) {
            return false;
        }
        // The disk cannot record it: remember it in memory (a crash now could run it
        // again; the backend's record-id dedup still stores its result once).
        self.memory_commands.insert(id.to_string());
        true
    }

    /// Marks a command finished (its result is in the outbox).
    pub fn finish_command(&mut self, id: &str) {
        if self.memory_commands.remove(id) {
            return;
        }
        if let Ok(Some(v)) = self.commands.get(id.as_bytes()) {
            if let Ok(mut entry) = postcard::from_bytes::<CommandEntry>(&v) {
                entry.done = true;
                let _ = self.commands.insert(
                    id.as_bytes(),
                    postcard::to_stdvec(&entry).unwrap_or_default(),
                );
                self.dirty = true;
            }
        }
    }

    /// Commands accepted but never finished: the agent died while they ran.
    pub fn unfinished_commands(&self) -> Vec<(String, CommandEntry)> {
        self.commands
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
        self.meta.get(key).ok().flatten().map(|v| v.to_vec())
    }

    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) {
        if self.meta.insert(key, value).is_ok() {
            self.dirty = true;
            self.flush();
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
        self.db.size_on_disk().unwrap_or(0)
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
                let written = self
                    .reserve_seqs()
                    .and_then(|_| self.records.insert(record.seq.to_be_bytes(), bytes));
                match written {
                    Ok(_) => {
                        self.disk_bytes += n;
                        self.disk_count += 1;
                        self.unflushed += n;
                        self.dirty = true;
                        return record;
                    }
                    Err(e) => self.set_condition(Condition::WriteError(e.to_string())),
                }
            }
        }
        self.evict_for(n, true);
        self.memory.push_back((record.clone(), n as usize));
        self.memory_bytes += n;
        record
    }

    fn flush(&mut self) {
        // Also the moment to notice that space ran out, or came back.
        if self.condition == Condition::Ok && !self.disk_has_room(0) {
            self.set_condition(Condition::DiskFull);
        }
        if self.condition != Condition::Ok || !self.memory.is_empty() || !self.tombstones.is_empty()
        {
            self.drain_memory_to_disk();
        }
        if self.dropped != self.dropped_persisted
            && self.condition == Condition::Ok
            && self
                .meta
                .insert(META_DROPPED, &self.dropped.to_be_bytes())
                .is_ok()
        {
            self.dropped_persisted = self.dropped;
            self.dirty = true;
        }
        if self.dirty {
            match self.db.flush() {
                Ok(_) => {
                    self.dirty = false;
                    self.unflushed = 0;
                }
                Err(e) => self.set_condition(Condition::WriteError(e.to_string())),
            }
        }
    }

    fn read_from(&mut self, from: u64, max_bytes: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut corrupt = Vec::new();
        for item in self.records.range(from.to_be_bytes()..) {
            let Ok((k, v)) = item else { break };
            if self.tombstones.contains(&key_seq(&k)) {
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
                    corrupt.push((k, v.len()));
                }
            }
        }
        for (k, n) in corrupt {
            if self.records.remove(&k).is_ok() {
                self.disk_bytes = self.disk_bytes.saturating_sub(n as u64);
                self.disk_count = self.disk_count.saturating_sub(1);
                self.dropped += 1;
            }
        }
        for (r, n) in &self.memory {
            if r.seq < from {
                continue;
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
        self.records
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| key_seq(&k))
            .find(|s| !self.tombstones.contains(s))
            .or_else(|| self.memory.front().map(|(r, _)| r.seq))
    }

    fn ack(&mut self, ack: &Ack) -> u64 {
        if ack.epoch != self.epoch {
            return 0;
        }
        let mut deleted = 0;
        for &(lo, hi) in &ack.ranges {
            if hi < lo {
                continue;
            }
            let keys: Vec<_> = self
                .records
                .range(lo.to_be_bytes()..=hi.to_be_bytes())
                .filter_map(|r| r.ok())
                .map(|(k, v)| (k, v.len()))
                .collect();
            for (k, n) in keys {
                let seq = key_seq(&k);
                if self.tombstones.contains(&seq) {
                    continue;
                }
                let removed: Result<bool, sled::Error> = if self.condition == Condition::Ok {
                    self.records.remove(k).map(|o| o.is_some())
                } else {
                    // A delete writes too; on a full disk, remember it instead.
                    self.tombstones.insert(seq);
                    Ok(true)
                };
                match removed {
                    Ok(true) => {
                        self.disk_bytes = self.disk_bytes.saturating_sub(n as u64);
                        self.disk_count = self.disk_count.saturating_sub(1);
                        deleted += 1;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.set_condition(Condition::WriteError(e.to_string()));
                        self.tombstones.insert(seq);
                        self.disk_bytes = self.disk_bytes.saturating_sub(n as u64);
                        self.disk_count = self.disk_count.saturating_sub(1);
                        deleted += 1;
                    }
                }
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
        if deleted > 0 {
            // Flushed with the next tick, not now: a delete lost to a crash only means
            // the record is sent again and the backend drops it as a duplicate.
            self.dirty = true;
        }
        deleted
    }

    fn depth(&self) -> u64 {
        self.disk_count + self.memory.len() as u64
    }

    fn oldest_at_ms(&self) -> Option<i64> {
        let disk = self
            .records
            .first()
            .ok()
            .flatten()
            .and_then(|(_, v)| postcard::from_bytes::<Record>(&v).ok())
            .map(|r| r.at_ms);
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
    use imn_modules::wire::{AgentEvent, RecordBody};

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
        }
        let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).unwrap();
        assert_eq!(ob.epoch(), epoch, "epoch survives a restart");
        assert_eq!(ob.depth(), 6);
        ob.ack(&Ack::from_seqs(epoch, 5..=10));
        assert_eq!(ob.depth(), 0);
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
        assert_eq!(ob.append(2, event(2)).seq, 1);
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
