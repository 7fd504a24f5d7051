//! A disk with a volatile write cache, served over NBD, for power-cut tests.
//!
//! [`VolatileDisk`] exports an image file over the Network Block Device protocol (what
//! qemu's `nbd://` drives speak) and behaves like a drive whose write cache is lost when
//! the power goes: a write lands in memory and reaches the file only when the client
//! flushes (`NBD_CMD_FLUSH`), or, for that one write alone, when it carries FUA. Reads
//! see the cache first, then the file. [`VolatileDisk::power_cut`] throws the cache
//! away and drops the client; the server keeps listening, so the next qemu boots from
//! what was flushed and nothing else.
//!
//! It is a stand-in: no real device with a volatile cache can be attached here, and
//! with a plain image file a killed qemu loses nothing it had written (its writes sit
//! in the host's page cache, flushed or not). The model is the worst case of such a
//! drive: it never writes back on its own, so a cut loses everything not flushed,
//! where a real drive may have kept any part of it.
//!
//! The server runs on its own threads with blocking sockets, so it works the same
//! from sync code and from any tokio runtime. One export (any name is accepted),
//! fixed newstyle negotiation, simple replies only; trim is accepted and ignored.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest READ or WRITE payload served (advertised as the maximum block size);
/// a larger READ gets `EINVAL`, a larger WRITE `EINVAL` and a hard disconnect.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Granularity of the cache.
const BS: usize = 4096;
const BLOCK: u64 = BS as u64;
/// Largest option payload during negotiation (names are at most 4096 bytes).
const MAX_OPTION: u32 = 64 << 10;
/// WRITE_ZEROES is applied in pieces of at most this size.
const ZERO_CHUNK: u64 = 1 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TX_HAS_FLAGS: u16 = 1 << 0;
const TX_SEND_FLUSH: u16 = 1 << 2;
const TX_SEND_FUA: u16 = 1 << 3;
const TX_SEND_TRIM: u16 = 1 << 5;
const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TX_FLAGS: u16 =
    TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What the disk has been through since it started (all cumulative but `dirty_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Clients that got through negotiation.
    pub connections: u64,
    pub reads: u64,
    pub bytes_read: u64,
    /// WRITE and WRITE_ZEROES commands applied, and the bytes they covered.
    pub writes: u64,
    pub bytes_written: u64,
    /// Of those, the ones with FUA (durable before their reply).
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    /// Bytes written to the image file by flushes and FUA writes. A flush writes each
    /// cached 4 KiB block's dirty span (from its first to its last written byte).
    pub bytes_durable: u64,
    /// Bytes in the cache now that a power cut would lose (same spans).
    pub dirty_bytes: u64,
    pub power_cuts: u64,
    /// Dirty bytes thrown away by power cuts.
    pub bytes_discarded: u64,
    /// Requests answered with an error (bad range, flags or command; I/O error).
    pub error_replies: u64,
}

/// What one [`VolatileDisk::power_cut`] threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Unflushed bytes lost, and the 4 KiB blocks they were in.
    pub bytes_discarded: u64,
    pub blocks_discarded: u64,
    /// Client connections closed.
    pub connections_closed: usize,
}

/// An NBD server on 127.0.0.1 exporting an image file through a volatile write cache.
/// Dropping it stops the server and closes its clients; unflushed writes are lost.
pub struct VolatileDisk {
    shared: Arc<Shared>,
    addr: SocketAddr,
    image: PathBuf,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    file: File,
    size: u64,
    /// Cached blocks by index: the block's current contents (the file's, overlaid
    /// with the writes not yet durable) and its dirty span `lo..hi`.
    cache: BTreeMap<u64, Block>,
    /// Bumped by each power cut; a connection from before a cut applies nothing more.
    generation: u64,
    /// The open client connections, to close them on a cut.
    conns: HashMap<u64, TcpStream>,
    next_conn: u64,
    stats: DiskStats,
}

struct Block {
    data: Box<[u8]>,
    lo: usize,
    hi: usize,
}

impl VolatileDisk {
    /// Serves `image` (opened read-write; its current length is the disk's size) on a
    /// free port of 127.0.0.1. Nothing here waits: the server runs on its own threads.
    pub async fn start(image: &Path) -> io::Result<VolatileDisk> {
        let file = OpenOptions::new().read(true).write(true).open(image)?;
        let size = file.metadata()?.len();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                file,
                size,
                cache: BTreeMap::new(),
                generation: 0,
                conns: HashMap::new(),
                next_conn: 0,
                stats: DiskStats::default(),
            }),
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(VolatileDisk {
            shared,
            addr,
            image: image.to_path_buf(),
            accept: Some(accept),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nbd://127.0.0.1:PORT`, for qemu's `-drive file=...,format=raw`.
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port())
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Loses every write not yet flushed and closes the client connections at once
    /// (a request already read but not yet applied is dropped, as the power took it).
    /// The server keeps listening; a new client sees the image file as flushed.
    ///
    /// A clean qemu shutdown flushes its disks, so cut before (or instead of) one:
    /// cut, then kill qemu.
    pub fn power_cut(&self) -> CutStats {
        let mut st = self.shared.lock();
        let bytes = st.dirty_bytes();
        let blocks = st.cache.len() as u64;
        st.cache.clear();
        st.generation += 1;
        st.stats.power_cuts += 1;
        st.stats.bytes_discarded += bytes;
        let conns: Vec<TcpStream> = st.conns.drain().map(|(_, c)| c).collect();
        for c in &conns {
            let _ = c.shutdown(Shutdown::Both);
        }
        CutStats {
            bytes_discarded: bytes,
            blocks_discarded: blocks,
            connections_closed: conns.len(),
        }
    }

    pub fn stats(&self) -> DiskStats {
        let st = self.shared.lock();
        DiskStats {
            dirty_bytes: st.dirty_bytes(),
            ..st.stats
        }
    }
}

impl Drop for VolatileDisk {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, c) in self.shared.lock().conns.drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop, which then sees `stopping` (if that fails, the
        // thread is left behind rather than waited for).
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let (true, Some(t)) = (woken, self.accept.take()) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let s = shared.clone();
        let _ = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || serve(s, stream));
    }
}

/// One client, from negotiation to disconnect.
fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (Ok(ctl), Ok(wr)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let (id, generation, size) = {
        let mut st = shared.lock();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        st.next_conn += 1;
        let id = st.next_conn;
        st.conns.insert(id, ctl);
        (id, st.generation, st.size)
    };
    let mut conn = Conn {
        shared: shared.clone(),
        rd: BufReader::new(stream),
        wr,
        size,
        generation,
    };
    if let Ok(true) = conn.negotiate() {
        let current = match conn.lock() {
            Some(mut st) => {
                st.stats.connections += 1;
                true
            }
            None => false,
        };
        if current {
            let _ = conn.transmit();
        }
    }
    let _ = conn.wr.shutdown(Shutdown::Both);
    shared.lock().conns.remove(&id);
}

struct Conn {
    shared: Arc<Shared>,
    rd: BufReader<TcpStream>,
    wr: TcpStream,
    size: u64,
    generation: u64,
}

impl Conn {
    /// The disk's state, or `None` if a power cut came since this client connected.
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        let st = self.shared.lock();
        (st.generation == self.generation).then_some(st)
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.rd.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.rd.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn opt_reply(&mut self, opt: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(20 + data.len());
        m.extend(OPT_REPLY_MAGIC.to_be_bytes());
        m.extend(opt.to_be_bytes());
        m.extend(reply.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        self.wr.write_all(&m)
    }

    /// Fixed newstyle handshake and option haggling: `Ok(true)` once the client has
    /// entered transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
    fn negotiate(&mut self) -> io::Result<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend(NBDMAGIC.to_be_bytes());
        hello.extend(IHAVEOPT.to_be_bytes());
        hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.wr.write_all(&hello)?;
        let client = self.read_u32()?;
        if client & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
            return Ok(false);
        }
        let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
        loop {
            if self.read_u64()? != IHAVEOPT {
                return Ok(false);
            }
            let opt = self.read_u32()?;
            let len = self.read_u32()?;
            if len > MAX_OPTION {
                return Ok(false);
            }
            let mut data = vec![0; len as usize];
            self.rd.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let mut m = Vec::with_capacity(134);
                    m.extend(self.size.to_be_bytes());
                    m.extend(TX_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        m.extend([0; 124]);
                    }
                    self.wr.write_all(&m)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    let _ = self.opt_reply(opt, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_INFO | OPT_GO => {
                    if info_request(&data).is_none() {
                        self.opt_reply(opt, REP_ERR_INVALID, &[])?;
                        continue;
                    }
                    let mut export = Vec::with_capacity(12);
                    export.extend(INFO_EXPORT.to_be_bytes());
                    export.extend(self.size.to_be_bytes());
                    export.extend(TX_FLAGS.to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &export)?;
                    // Any alignment works (minimum 1); 4 KiB is the cache's block.
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend(INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend(1u32.to_be_bytes());
                    sizes.extend((BS as u32).to_be_bytes());
                    sizes.extend(MAX_PAYLOAD.to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &sizes)?;
                    self.opt_reply(opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(true);
                    }
                }
                // STRUCTURED_REPLY, LIST, STARTTLS, meta contexts, extended headers...
                _ => self.opt_reply(opt, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    fn reply(&mut self, handle: u64, error: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend(SIMPLE_REPLY_MAGIC.to_be_bytes());
        m.extend(error.to_be_bytes());
        m.extend(handle.to_be_bytes());
        m.extend(data);
        self.wr.write_all(&m)
    }

    /// Requests, one at a time, until the client disconnects, breaks the protocol or
    /// a power cut comes. Returns `Ok` where the connection is to be closed.
    fn transmit(&mut self) -> io::Result<()> {
        loop {
            let mut h = [0u8; 28];
            self.rd.read_exact(&mut h)?;
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let typ = u16::from_be_bytes([h[6], h[7]]);
            let handle = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let offset =
                u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]);
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
            if magic != REQUEST_MAGIC {
                return Ok(());
            }
            let fua = flags & CMD_FLAG_FUA != 0;
            let allowed = match typ {
                CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                _ => CMD_FLAG_FUA,
            };
            let bad_flags = flags & !allowed != 0;
            let in_range = offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= self.size);
            let (error, data) = match typ {
                CMD_DISC => return Ok(()),
                CMD_READ => {
                    if bad_flags || len > MAX_PAYLOAD || !in_range {
                        (EINVAL, Vec::new())
                    } else {
                        let Some(mut st) = self.lock() else {
                            return Ok(());
                        };
                        match st.read(offset, len as usize) {
                            Ok(data) => {
                                st.stats.reads += 1;
                                st.stats.bytes_read += u64::from(len);
                                (0, data)
                            }
                            Err(_) => (EIO, Vec::new()),
                        }
                    }
                }
                CMD_WRITE => {
                    if len > MAX_PAYLOAD {
                        // Too much to skip: answer, then hang up.
                        self.count_error();
                        self.reply(handle, EINVAL, &[])?;
                        return Ok(());
                    }
                    let mut payload = vec![0; len as usize];
                    self.rd.read_exact(&mut payload)?;
                    if bad_flags {
                        (EINVAL, Vec::new())
                    } else if !in_range {
                        (ENOSPC, Vec::new())
                    } else {
                        let Some(mut st) = self.lock() else {
                            return Ok(());
                        };
                        (st.write_command(offset, &payload, fua), Vec::new())
                    }
                }
                CMD_WRITE_ZEROES => {
                    if bad_flags {
                        (EINVAL, Vec::new())
                    } else if !in_range {
                        (ENOSPC, Vec::new())
                    } else {
                        let Some(mut st) = self.lock() else {
                            return Ok(());
                        };
                        (st.write_zeroes_command(offset, len, fua), Vec::new())
                    }
                }
                CMD_FLUSH => {
                    let Some(mut st) = self.lock() else {
                        return Ok(());
                    };
                    st.stats.flushes += 1;
                    (errno(st.flush()), Vec::new())
                }
                CMD_TRIM => {
                    if bad_flags || !in_range {
                        (EINVAL, Vec::new())
                    } else {
                        let Some(mut st) = self.lock() else {
                            return Ok(());
                        };
                        // Allowed to do nothing: the data stays readable.
                        st.stats.trims += 1;
                        (0, Vec::new())
                    }
                }
                _ => (EINVAL, Vec::new()),
            };
            if error != 0 {
                self.count_error();
            }
            self.reply(handle, error, &data)?;
        }
    }

    fn count_error(&self) {
        self.shared.lock().stats.error_replies += 1;
    }
}

/// Checks the payload of `NBD_OPT_INFO`/`NBD_OPT_GO`: name length, name, number of
/// information requests, the requests. The name and the requests are not used.
fn info_request(data: &[u8]) -> Option<()> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let rest = data.get(4usize.checked_add(name_len)?..)?;
    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    (rest.len() == 2 + 2 * n).then_some(())
}

fn errno(r: io::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(_) => EIO,
    }
}

impl State {
    fn dirty_bytes(&self) -> u64 {
        self.cache.values().map(|b| (b.hi - b.lo) as u64).sum()
    }

    /// `len` bytes at `offset` (in range) as the client sees them.
    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        if len == 0 {
            return Ok(buf);
        }
        self.file.read_exact_at(&mut buf, offset)?;
        let end = offset + len as u64;
        for (&b, blk) in self.cache.range(offset / BLOCK..=(end - 1) / BLOCK) {
            let start = b * BLOCK;
            let from = offset.max(start);
            let to = end.min(start + BLOCK);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&blk.data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(buf)
    }

    fn write_command(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        self.stats.fua_writes += u64::from(fua);
        errno(self.write(offset, data, fua))
    }

    fn write_zeroes_command(&mut self, offset: u64, len: u32, fua: bool) -> u32 {
        self.stats.writes += 1;
        self.stats.bytes_written += u64::from(len);
        self.stats.fua_writes += u64::from(fua);
        let zeroes = vec![0; ZERO_CHUNK.min(u64::from(len)) as usize];
        let end = offset + u64::from(len);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK) as usize;
            if self.write(at, &zeroes[..n], fua).is_err() {
                return EIO;
            }
            at += n as u64;
        }
        0
    }

    /// Puts `data` (in range) in the cache and, with `fua`, in the file too.
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let b = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = rest.len().min(BS - within);
            let blk = match self.cache.entry(b) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(load_block(&self.file, self.size, b)?)
                }
            };
            blk.data[within..within + n].copy_from_slice(&rest[..n]);
            blk.lo = blk.lo.min(within);
            blk.hi = blk.hi.max(within + n);
            at += n as u64;
            rest = &rest[n..];
        }
        if fua && !data.is_empty() {
            self.file.write_all_at(data, offset)?;
            self.stats.bytes_durable += data.len() as u64;
            // Blocks with nothing dirty left outside this write are clean now (the
            // rest of a cached block always equals the file).
            let end = offset + data.len() as u64;
            let clean: Vec<u64> = self
                .cache
                .range(offset / BLOCK..=(end - 1) / BLOCK)
                .filter(|(&b, blk)| {
                    b * BLOCK + blk.lo as u64 >= offset && b * BLOCK + blk.hi as u64 <= end
                })
                .map(|(&b, _)| b)
                .collect();
            for b in clean {
                self.cache.remove(&b);
            }
        }
        Ok(())
    }

    /// Writes every dirty span to the file and empties the cache.
    fn flush(&mut self) -> io::Result<()> {
        for (&b, blk) in &self.cache {
            if blk.hi > blk.lo {
                self.file
                    .write_all_at(&blk.data[blk.lo..blk.hi], b * BLOCK + blk.lo as u64)?;
                self.stats.bytes_durable += (blk.hi - blk.lo) as u64;
            }
        }
        self.cache.clear();
        Ok(())
    }
}

/// Block `b` as the file has it (zeroes past the end of the disk), with nothing dirty.
fn load_block(file: &File, size: u64, b: u64) -> io::Result<Block> {
    let mut data = vec![0; BS].into_boxed_slice();
    let start = b * BLOCK;
    let n = (size.saturating_sub(start)).min(BLOCK) as usize;
    file.read_exact_at(&mut data[..n], start)?;
    Ok(Block {
        data,
        lo: BS,
        hi: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    const OPT_LIST: u32 = 3;
    const OPT_STRUCTURED_REPLY: u32 = 8;
    const FILL: u8 = 0x11;

    /// An image of `len` bytes of [`FILL`].
    fn image(dir: &TempDir, len: usize) -> PathBuf {
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![FILL; len]).expect("image");
        p
    }

    fn on_disk(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(path)
            .expect("image")
            .read_exact_at(&mut buf, offset)
            .expect("read image");
        buf
    }

    fn u16_of(s: &mut impl Read) -> u16 {
        let mut b = [0; 2];
        s.read_exact(&mut b).expect("read");
        u16::from_be_bytes(b)
    }

    fn u32_of(s: &mut impl Read) -> u32 {
        let mut b = [0; 4];
        s.read_exact(&mut b).expect("read");
        u32::from_be_bytes(b)
    }

    fn u64_of(s: &mut impl Read) -> u64 {
        let mut b = [0; 8];
        s.read_exact(&mut b).expect("read");
        u64::from_be_bytes(b)
    }

    /// A client speaking the protocol the way qemu does: fixed newstyle, structured
    /// replies asked for (and refused), then `NBD_OPT_GO`.
    struct Client {
        s: TcpStream,
        size: u64,
        flags: u16,
        handle: u64,
    }

    /// Connects and reads the server's greeting; returns the handshake flags.
    fn hello(port: u16, client_flags: u16) -> (TcpStream, u16) {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        assert_eq!(u64_of(&mut s), NBDMAGIC);
        assert_eq!(u64_of(&mut s), IHAVEOPT);
        let flags = u16_of(&mut s);
        s.write_all(&u32::from(client_flags).to_be_bytes())
            .expect("client flags");
        (s, flags)
    }

    fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend(IHAVEOPT.to_be_bytes());
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        s.write_all(&m).expect("option");
    }

    /// (option, reply type, data)
    fn opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
        assert_eq!(u64_of(s), OPT_REPLY_MAGIC);
        let opt = u32_of(s);
        let rep = u32_of(s);
        let mut data = vec![0; u32_of(s) as usize];
        s.read_exact(&mut data).expect("reply data");
        (opt, rep, data)
    }

    impl Client {
        fn connect(port: u16) -> Client {
            let (mut s, flags) = hello(port, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            for opt in [OPT_STRUCTURED_REPLY, OPT_LIST] {
                send_opt(&mut s, opt, &[]);
                assert_eq!(opt_reply(&mut s), (opt, REP_ERR_UNSUP, vec![]));
            }
            // A malformed GO is refused, and haggling goes on.
            send_opt(&mut s, OPT_GO, &[0, 0, 0, 9]);
            assert_eq!(opt_reply(&mut s), (OPT_GO, REP_ERR_INVALID, vec![]));
            // Export "", one information request: the block sizes.
            send_opt(&mut s, OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3]);
            let (mut size, mut tx) = (None, None);
            loop {
                let (opt, rep, d) = opt_reply(&mut s);
                assert_eq!(opt, OPT_GO);
                let info = d.get(..2).map(|t| u16::from_be_bytes([t[0], t[1]]));
                match (rep, info) {
                    (REP_ACK, _) => break,
                    (REP_INFO, Some(INFO_EXPORT)) => {
                        assert_eq!(d.len(), 12);
                        size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                        tx = Some(u16::from_be_bytes([d[10], d[11]]));
                    }
                    (REP_INFO, Some(INFO_BLOCK_SIZE)) => {
                        assert_eq!(d.len(), 14);
                        assert_eq!(&d[2..6], &1u32.to_be_bytes());
                        assert_eq!(&d[10..14], &MAX_PAYLOAD.to_be_bytes());
                    }
                    other => panic!("unexpected reply to GO: {other:?}"),
                }
            }
            Client {
                s,
                size: size.expect("NBD_INFO_EXPORT"),
                flags: tx.expect("NBD_INFO_EXPORT"),
                handle: 0,
            }
        }

        fn send(&mut self, typ: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
            self.handle += 1;
            let mut m = Vec::new();
            m.extend(REQUEST_MAGIC.to_be_bytes());
            m.extend(flags.to_be_bytes());
            m.extend(typ.to_be_bytes());
            m.extend(self.handle.to_be_bytes());
            m.extend(offset.to_be_bytes());
            m.extend(len.to_be_bytes());
            m.extend(payload);
            self.s.write_all(&m).expect("request");
            self.handle
        }

        /// The error of the simple reply to `handle`.
        fn reply(&mut self, handle: u64) -> io::Result<u32> {
            let mut r = [0; 16];
            self.s.read_exact(&mut r)?;
            assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(&r[8..], &handle.to_be_bytes());
            Ok(u32::from_be_bytes([r[4], r[5], r[6], r[7]]))
        }

        fn cmd(&mut self, typ: u16, flags: u16, offset: u64, len: u32) -> u32 {
            let h = self.send(typ, flags, offset, len, &[]);
            self.reply(h).expect("reply")
        }

        fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
            let h = self.send(CMD_READ, 0, offset, len as u32, &[]);
            assert_eq!(self.reply(h).expect("reply"), 0);
            let mut data = vec![0; len];
            self.s.read_exact(&mut data).expect("read data");
            data
        }

        fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let h = self.send(CMD_WRITE, flags, offset, data.len() as u32, data);
            self.reply(h).expect("reply")
        }
    }

    #[tokio::test]
    async fn a_power_cut_loses_what_was_not_flushed() {
        let dir = TempDir::new("nbd-cut");
        let size = (1 << 20) + 1000; // the last block is partial
        let img = image(&dir, size);
        let disk = VolatileDisk::start(&img).await.expect("start");
        let mut c = Client::connect(disk.port());
        assert_eq!(c.size, size as u64);
        assert_eq!(c.flags, TX_FLAGS);

        // Flushed: 8 KiB at 4096.
        assert_eq!(c.write(4096, &[0xaa; 8192], false), 0);
        assert_eq!(on_disk(&img, 4096, 8192), vec![FILL; 8192], "cached only");
        assert_eq!(c.cmd(CMD_FLUSH, 0, 0, 0), 0);
        assert_eq!(on_disk(&img, 4096, 8192), vec![0xaa; 8192]);
        let s = disk.stats();
        assert_eq!((s.flushes, s.bytes_durable, s.dirty_bytes), (1, 8192, 0));

        // Not flushed: 200 bytes across a block boundary, over the flushed ones; zeroes
        // at 128 KiB; the partial last block.
        assert_eq!(c.write(4000, &[0xbb; 200], false), 0);
        assert_eq!(
            c.cmd(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 128 << 10, 4096),
            0
        );
        let tail = size as u64 - 300;
        assert_eq!(c.write(tail, &[0xdd; 300], false), 0);
        // FUA: durable at once, alone (the unflushed bytes around it stay volatile).
        assert_eq!(c.write(64 << 10, &[0xcc; 4096], true), 0);
        assert_eq!(c.write((64 << 10) + 4096, &[0xcc; 10], false), 0);
        assert_eq!(c.write((64 << 10) + 8000, &[0xcc; 100], true), 0);
        // Trim is a no-op.
        assert_eq!(c.cmd(CMD_TRIM, 0, 0, 4096), 0);

        // The client sees all of it, cache over file.
        let mut want = vec![FILL; 16384];
        want[4096..12288].fill(0xaa);
        want[4000..4200].fill(0xbb);
        assert_eq!(c.read(0, 16384), want);
        assert_eq!(c.read(128 << 10, 4096), vec![0; 4096]);
        assert_eq!(c.read(tail, 300), vec![0xdd; 300]);
        assert_eq!(c.read(tail - 10, 10), vec![FILL; 10]);
        assert_eq!(c.read(64 << 10, 4096), vec![0xcc; 4096]);
        // The file, only what was flushed or FUA.
        assert_eq!(on_disk(&img, 4000, 96), vec![FILL; 96]);
        assert_eq!(on_disk(&img, 4096, 104), vec![0xaa; 104]);
        assert_eq!(on_disk(&img, 64 << 10, 4096), vec![0xcc; 4096]);
        assert_eq!(on_disk(&img, (64 << 10) + 4096, 10), vec![FILL; 10]);
        assert_eq!(on_disk(&img, (64 << 10) + 8000, 100), vec![0xcc; 100]);
        assert_eq!(on_disk(&img, 128 << 10, 4096), vec![FILL; 4096]);

        let s = disk.stats();
        assert_eq!(s.writes, 7);
        assert_eq!(s.fua_writes, 2);
        assert_eq!(s.bytes_written, 8192 + 200 + 4096 + 300 + 4096 + 10 + 100);
        assert_eq!(s.bytes_durable, 8192 + 4096 + 100);
        assert_eq!(s.trims, 1);
        // Blocks 0 and 1 (the 200 bytes), 17 (its span 0..4004 runs from the 10 bytes
        // to the end of the FUA write; block 16, all FUA, is clean), 32 and the tail.
        assert_eq!(s.dirty_bytes, 96 + 104 + 4004 + 4096 + 300);

        let cut = disk.power_cut();
        assert_eq!(cut.bytes_discarded, s.dirty_bytes);
        assert_eq!(cut.blocks_discarded, 5);
        assert_eq!(cut.connections_closed, 1);
        // The old connection is gone.
        let h = c.send(CMD_READ, 0, 0, 512, &[]);
        assert!(c.reply(h).is_err(), "old connection still served");

        // A new client sees only what was durable.
        let mut c = Client::connect(disk.port());
        let mut want = vec![FILL; 16384];
        want[4096..12288].fill(0xaa);
        assert_eq!(c.read(0, 16384), want);
        assert_eq!(c.read(128 << 10, 4096), vec![FILL; 4096]);
        assert_eq!(c.read(tail, 300), vec![FILL; 300]);
        let mut want = vec![FILL; 8192 + 100];
        want[..4096].fill(0xcc);
        want[8000..8100].fill(0xcc);
        assert_eq!(c.read(64 << 10, 8192 + 100), want);

        // Pipelined requests (qemu sends several before reading replies), answered in
        // order; a flush makes the tail durable.
        let w = c.send(CMD_WRITE, 0, tail, 300, &[0xee; 300]);
        let f = c.send(CMD_FLUSH, 0, 0, 0, &[]);
        let r = c.send(CMD_READ, 0, tail, 300, &[]);
        assert_eq!(c.reply(w).unwrap(), 0);
        assert_eq!(c.reply(f).unwrap(), 0);
        assert_eq!(c.reply(r).unwrap(), 0);
        let mut got = vec![0; 300];
        c.s.read_exact(&mut got).unwrap();
        assert_eq!(got, vec![0xee; 300]);
        assert_eq!(on_disk(&img, tail, 300), vec![0xee; 300]);

        let s = disk.stats();
        assert_eq!((s.power_cuts, s.connections, s.flushes), (1, 2, 2));
        assert_eq!(s.bytes_discarded, cut.bytes_discarded);
        assert_eq!(s.error_replies, 0);
        // Disconnect, cleanly.
        c.send(CMD_DISC, 0, 0, 0, &[]);
        assert_eq!(c.s.read(&mut [0; 1]).unwrap(), 0);
    }

    #[tokio::test]
    async fn bad_requests_get_errors_not_panics() {
        let dir = TempDir::new("nbd-bad");
        let size = 64 << 10;
        let img = image(&dir, size);
        let disk = VolatileDisk::start(&img).await.expect("start");
        let end = size as u64;

        let mut c = Client::connect(disk.port());
        assert_eq!(c.cmd(CMD_READ, 0, end - 10, 11), EINVAL);
        assert_eq!(c.cmd(CMD_READ, 0, u64::MAX, 1), EINVAL);
        assert_eq!(c.cmd(CMD_READ, 0, 0, MAX_PAYLOAD + 1), EINVAL);
        assert_eq!(c.cmd(CMD_READ, 1 << 2, 0, 512), EINVAL, "DF flag");
        assert_eq!(c.cmd(CMD_TRIM, 0, end, 1), EINVAL);
        assert_eq!(c.cmd(CMD_WRITE_ZEROES, 0, end - 1, 2), ENOSPC);
        assert_eq!(c.cmd(42, 0, 0, 0), EINVAL);
        // The payload of a refused write is skipped, and the next request is served.
        assert_eq!(c.write(end - 1, &[1, 2], false), ENOSPC);
        assert_eq!(c.write(u64::MAX, &[1, 2], false), ENOSPC);
        assert_eq!(c.read(end - 4, 4), vec![FILL; 4]);
        assert_eq!(c.cmd(CMD_READ, 0, end, 0), 0, "empty read at the end");
        assert_eq!(disk.stats().error_replies, 9);

        // A write too big to skip: an error, then the server hangs up.
        let h = c.send(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1, &[]);
        assert_eq!(c.reply(h).unwrap(), EINVAL);
        assert_eq!(c.s.read(&mut [0; 1]).unwrap_or(0), 0);

        // Garbage instead of a request: hung up on.
        let mut c = Client::connect(disk.port());
        c.s.write_all(&[0xff; 28]).unwrap();
        assert_eq!(c.s.read(&mut [0; 1]).unwrap_or(0), 0);

        // Unknown client flags, bad option magic, huge option: hung up on.
        let (mut s, _) = hello(disk.port(), 1 << 5);
        assert_eq!(s.read(&mut [0; 1]).unwrap_or(0), 0);
        let (mut s, _) = hello(disk.port(), FLAG_FIXED_NEWSTYLE);
        s.write_all(&[0; 16]).unwrap();
        assert_eq!(s.read(&mut [0; 1]).unwrap_or(0), 0);
        let (mut s, _) = hello(disk.port(), FLAG_FIXED_NEWSTYLE);
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(OPT_GO.to_be_bytes());
        m.extend(u32::MAX.to_be_bytes());
        s.write_all(&m).unwrap();
        assert_eq!(s.read(&mut [0; 1]).unwrap_or(0), 0);
        // A client that goes away mid-handshake.
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, disk.port())).unwrap());

        // NBD_OPT_ABORT is acknowledged.
        let (mut s, _) = hello(disk.port(), FLAG_FIXED_NEWSTYLE);
        send_opt(&mut s, OPT_ABORT, &[]);
        assert_eq!(opt_reply(&mut s), (OPT_ABORT, REP_ACK, vec![]));

        // NBD_OPT_INFO, then the old way in: NBD_OPT_EXPORT_NAME, with the 124 zeroes
        // of a client that did not ask to skip them.
        let (mut s, _) = hello(disk.port(), FLAG_FIXED_NEWSTYLE);
        send_opt(&mut s, OPT_INFO, &[0, 0, 0, 1, b'x', 0, 0]);
        assert_eq!(opt_reply(&mut s).1, REP_INFO);
        assert_eq!(opt_reply(&mut s).1, REP_INFO);
        assert_eq!(opt_reply(&mut s), (OPT_INFO, REP_ACK, vec![]));
        send_opt(&mut s, OPT_EXPORT_NAME, b"any");
        assert_eq!(u64_of(&mut s), end);
        assert_eq!(u16_of(&mut s), TX_FLAGS);
        let mut zeroes = [1; 124];
        s.read_exact(&mut zeroes).unwrap();
        assert_eq!(zeroes, [0; 124]);
        let mut c = Client {
            s,
            size: end,
            flags: TX_FLAGS,
            handle: 0,
        };
        assert_eq!(c.read(0, 4), vec![FILL; 4]);
        assert_eq!(disk.stats().connections, 3);
    }

    /// qemu's own NBD client against the disk, through the monitor's `qemu-io`
    /// command (no guest: `-machine none`); its output, once `info name` has printed
    /// the marker.
    fn qemu_io(qemu: &Path, disk: &VolatileDisk, cmds: &[&str]) -> (std::process::Child, String) {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let marker = "imn-nbd-done";
        // As a VM test attaches it, less the virtio device (no bus here).
        let drive = format!(
            "if=none,id=d0,file={},format=raw,cache=writeback",
            disk.url()
        );
        let mut child = Command::new(qemu)
            .args(["-nodefaults", "-machine", "none", "-display", "none"])
            .args(["-monitor", "stdio", "-name", marker, "-drive", &drive])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu");
        let mut script = String::new();
        for c in cmds {
            script.push_str(&format!("qemu-io d0 \"{c}\"\n"));
        }
        script.push_str("info name\n");
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                // The monitor echoes each command as typed: keep the rest.
                Ok(line) if line.contains("(qemu)") => {}
                Ok(line) if line.trim() == marker => return (child, seen),
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("qemu did not finish:\n{seen}");
    }

    #[tokio::test]
    #[ignore = "starts qemu-system-x86_64; run with --ignored where it is installed"]
    async fn qemu_sees_only_what_it_flushed() {
        let Some(qemu) = crate::program("qemu-system-x86_64") else {
            eprintln!("no qemu-system-x86_64: skipped");
            return;
        };
        let dir = TempDir::new("nbd-qemu");
        let img = image(&dir, 1 << 20);
        let disk = VolatileDisk::start(&img).await.expect("start");

        let (mut q, out) = qemu_io(
            &qemu,
            &disk,
            &[
                "write -P 0xab 0 4k",
                "flush",
                "write -P 0xcd 4k 4k",
                "read -P 0xcd 4k 4k",
            ],
        );
        eprintln!("{out}");
        assert!(!out.contains("failed"), "{out}");
        assert!(out.contains("read 4096/4096 bytes at offset 4096"), "{out}");
        let s = disk.stats();
        assert!(s.flushes >= 1 && s.bytes_durable >= 4096, "{s:?}");
        assert_eq!(s.dirty_bytes, 4096, "{s:?}");
        let cut = disk.power_cut();
        let _ = q.kill();
        let _ = q.wait();
        assert_eq!(cut.bytes_discarded, 4096);
        assert_eq!(on_disk(&img, 0, 8192)[..4096], [0xab; 4096]);

        let (mut q, out) = qemu_io(
            &qemu,
            &disk,
            &["read -P 0xab 0 4k", &format!("read -P {FILL:#x} 4k 4k")],
        );
        eprintln!("{out}");
        let _ = q.kill();
        let _ = q.wait();
        assert!(!out.contains("failed"), "{out}");
        assert!(out.contains("read 4096/4096 bytes at offset 4096"), "{out}");
        eprintln!("{:?}", disk.stats());
    }
}
