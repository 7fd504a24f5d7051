//! The agent's durable outbox and command log, in sled.
//!
//! A record is on disk (flushed) before it is sent, and leaves only when the backend's
//! ack names it. Record ids are (agent, epoch, seq): the epoch is random and born with
//! the store, and `seq` never repeats within an epoch, even after every record was
//! acked and deleted, because the high-water mark is persisted before deletes.

use std::path::Path;

use imn_modules::wire::{Ack, Record, RecordBody};
use serde::{Deserialize, Serialize};

/// sled's page cache; its 1 GiB default is absurd on a router.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;
const META_EPOCH: &[u8] = b"epoch";
const META_NEXT_SEQ: &[u8] = b"next_seq";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox store: {0}")]
    Store(#[from] sled::Error),
    #[error("outbox record {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
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
    /// Stores a record durably and returns it with its sequence number.
    fn append(&mut self, at_ms: i64, body: RecordBody) -> Result<Record, OutboxError>;
    /// Records with seq >= `from`, in order, up to `max_bytes` (at least one record).
    fn read_from(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, OutboxError>;
    /// The lowest unacked seq, if any.
    fn first_seq(&self) -> Option<u64>;
    /// Deletes every acked record; returns how many were deleted.
    fn ack(&mut self, ack: &Ack) -> Result<u64, OutboxError>;
    /// Records waiting for an ack.
    fn depth(&self) -> u64;
    /// Creation time of the oldest waiting record.
    fn oldest_at_ms(&self) -> Option<i64>;
}

pub struct SledOutbox {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    commands: sled::Tree,
    epoch: u64,
    next_seq: u64,
}

impl SledOutbox {
    pub fn open(dir: &Path) -> Result<SledOutbox, OutboxError> {
        let db = sled::Config::new()
            .path(dir.join("outbox"))
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let records = db.open_tree("records")?;
        let meta = db.open_tree("meta")?;
        let commands = db.open_tree("commands")?;
        let epoch = match meta.get(META_EPOCH)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => {
                let epoch = rand::random::<u64>() | 1;
                meta.insert(META_EPOCH, &epoch.to_be_bytes())?;
                db.flush()?;
                epoch
            }
        };
        let stored_next = meta
            .get(META_NEXT_SEQ)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1);
        let after_last = records.last()?.map(|(k, _)| key_seq(&k) + 1).unwrap_or(1);
        Ok(SledOutbox {
            db,
            records,
            meta,
            commands,
            epoch,
            next_seq: stored_next.max(after_last),
        })
    }

    /// Records a command before it runs. Returns false if the id was seen before.
    pub fn accept_command(&self, id: &str, module: &str, at_ms: i64) -> Result<bool, OutboxError> {
        let entry = CommandEntry {
            module: module.to_string(),
            received_ms: at_ms,
            done: false,
        };
        let bytes = postcard::to_stdvec(&entry).unwrap_or_default();
        let prev =
            self.commands
                .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(bytes))?;
        if prev.is_err() {
            return Ok(false);
        }
        self.db.flush()?;
        Ok(true)
    }

    /// Marks a command finished (its result is in the outbox).
    pub fn finish_command(&self, id: &str) -> Result<(), OutboxError> {
        if let Some(v) = self.commands.get(id.as_bytes())? {
            if let Ok(mut entry) = postcard::from_bytes::<CommandEntry>(&v) {
                entry.done = true;
                self.commands.insert(
                    id.as_bytes(),
                    postcard::to_stdvec(&entry).unwrap_or_default(),
                )?;
            }
        }
        Ok(())
    }

    /// A small value the agent keeps beside the outbox (such as its loaded modules).
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<(), OutboxError> {
        self.meta.insert(key, value)?;
        self.db.flush()?;
        Ok(())
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
}

fn key_seq(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl Outbox for SledOutbox {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn append(&mut self, at_ms: i64, body: RecordBody) -> Result<Record, OutboxError> {
        let record = Record {
            seq: self.next_seq,
            at_ms,
            body,
        };
        let bytes = postcard::to_stdvec(&record).map_err(|e| OutboxError::Corrupt {
            seq: record.seq,
            reason: e.to_string(),
        })?;
        self.records.insert(record.seq.to_be_bytes(), bytes)?;
        self.db.flush()?;
        self.next_seq += 1;
        Ok(record)
    }

    fn read_from(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, OutboxError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.records.range(from.to_be_bytes()..) {
            let (k, v) = item?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            let record: Record = postcard::from_bytes(&v).map_err(|e| OutboxError::Corrupt {
                seq: key_seq(&k),
                reason: e.to_string(),
            })?;
            out.push(record);
        }
        Ok(out)
    }

    fn first_seq(&self) -> Option<u64> {
        self.records
            .first()
            .ok()
            .flatten()
            .map(|(k, _)| key_seq(&k))
    }

    fn ack(&mut self, ack: &Ack) -> Result<u64, OutboxError> {
        if ack.epoch != self.epoch {
            return Ok(0);
        }
        // Persist the high-water mark first, so seqs are never reused after deletes.
        self.meta
            .insert(META_NEXT_SEQ, &self.next_seq.to_be_bytes())?;
        let mut deleted = 0;
        for &(lo, hi) in &ack.ranges {
            if hi < lo || hi - lo > 1_000_000 {
                continue;
            }
            let keys: Vec<_> = self
                .records
                .range(lo.to_be_bytes()..=hi.to_be_bytes())
                .keys()
                .collect::<Result<_, _>>()?;
            for k in keys {
                self.records.remove(k)?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            self.db.flush()?;
        }
        Ok(deleted)
    }

    fn depth(&self) -> u64 {
        self.records.len() as u64
    }

    fn oldest_at_ms(&self) -> Option<i64> {
        let (_, v) = self.records.first().ok().flatten()?;
        postcard::from_bytes::<Record>(&v).ok().map(|r| r.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_modules::wire::{AgentEvent, RecordBody};

    fn event(n: u32) -> RecordBody {
        RecordBody::Event(AgentEvent {
            kind: "test".into(),
            message: format!("event {n}"),
        })
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("imn-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn append_read_ack_and_reopen() {
        let dir = tmp("basic");
        let epoch;
        {
            let mut ob = SledOutbox::open(&dir).unwrap();
            epoch = ob.epoch();
            for i in 0..10 {
                assert_eq!(ob.append(i, event(i as u32)).unwrap().seq, i as u64 + 1);
            }
            let recs = ob.read_from(3, 1 << 20).unwrap();
            assert_eq!(recs.first().unwrap().seq, 3);
            assert_eq!(recs.len(), 8);
            assert_eq!(ob.read_from(1, 1).unwrap().len(), 1, "at least one record");
            assert_eq!(ob.ack(&Ack::from_seqs(epoch, 1..=4)).unwrap(), 4);
            assert_eq!(ob.ack(&Ack::from_seqs(epoch + 1, 5..=6)).unwrap(), 0);
            assert_eq!(ob.depth(), 6);
            assert_eq!(ob.first_seq(), Some(5));
        }
        let mut ob = SledOutbox::open(&dir).unwrap();
        assert_eq!(ob.epoch(), epoch, "epoch survives a restart");
        assert_eq!(ob.depth(), 6);
        ob.ack(&Ack::from_seqs(epoch, 5..=10)).unwrap();
        assert_eq!(ob.depth(), 0);
        drop(ob);
        // Everything acked and deleted: the next seq must still be 11, never reused.
        let mut ob = SledOutbox::open(&dir).unwrap();
        assert_eq!(ob.append(0, event(0)).unwrap().seq, 11);
    }

    #[test]
    fn commands_are_accepted_once() {
        let dir = tmp("cmds");
        let ob = SledOutbox::open(&dir).unwrap();
        assert!(ob.accept_command("c1", "echo_module", 1).unwrap());
        assert!(!ob.accept_command("c1", "echo_module", 2).unwrap());
        assert_eq!(ob.unfinished_commands().len(), 1);
        ob.finish_command("c1").unwrap();
        drop(ob);
        let ob = SledOutbox::open(&dir).unwrap();
        assert!(!ob.accept_command("c1", "echo_module", 3).unwrap());
        assert!(ob.unfinished_commands().is_empty());
    }
}
