//! The ICMP engine: one socket per address family, shared by every ping of the
//! process, and a receiver thread that matches replies to the probes in flight.
//!
//! A ping run ("session") registers with the engine of each family it uses and gets
//! an ICMP identifier (raw sockets) or a block of sequence numbers (datagram sockets,
//! whose identifier the kernel rewrites to the socket's port). The receiver finds the
//! session of a reply by identifier or sequence block, the target by source address,
//! and the probe by sequence; the cookie at the end of the payload confirms it.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::packet::{self, COOKIE};
use super::session::Session;
use super::sys::{self, RecvBatch, BATCH};

/// Which kind of ICMP socket to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPref {
    /// Raw with CAP_NET_RAW, else an unprivileged datagram socket.
    Auto,
    /// Only an unprivileged datagram socket (for tests of that path).
    #[cfg_attr(not(test), allow(dead_code))]
    Dgram,
}

/// Receive buffer asked for: bursts of 100,000 replies/s must not overflow it.
pub const RCVBUF: usize = 4 << 20;

/// While runs are registered, the receiver reads the socket this often, sleeping on
/// a timer in between rather than on the socket (see `receive_loop`).
const ACTIVE_POLL: std::time::Duration = std::time::Duration::from_micros(500);

/// A shared ICMP socket for one address family, with its receiver thread.
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

/// A session's place in an engine.
#[derive(Clone)]
pub(crate) struct Reg {
    pub id: u16,
    pub seq_base: u16,
    pub span: u32,
    pub sess: Arc<Session>,
}

pub(crate) struct Inner {
    sock: Socket,
    pub v6: bool,
    pub raw: bool,
    /// Transmit timestamps (SOF_TIMESTAMPING_TX_SOFTWARE) were enabled.
    pub tx_stamps: bool,
    /// Effective receive buffer, as the kernel reports it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub rcvbuf: usize,
    regs: RwLock<Vec<Reg>>,
    /// Per-packet TTL control messages work (else the TTL is set per socket, serialised).
    ttl_cmsg: AtomicBool,
    ttl_lock: Mutex<i32>,
    stop: AtomicBool,
    /// Runs registered (mirrors `regs.len()` for the receiver).
    active: AtomicUsize,
    /// Wakes the receiver out of `poll` when a run registers.
    wake: OwnedFd,
}

static GLOBAL: [Mutex<Option<Arc<Engine>>>; 2] = [Mutex::new(None), Mutex::new(None)];

fn no_socket_error(v6: bool, raw_err: Option<&io::Error>, dgram_err: &io::Error) -> String {
    let raw = raw_err.map_or_else(|| "not tried".to_string(), |e| e.to_string());
    format!(
        "cannot open an ICMP{} socket: a raw socket needs CAP_NET_RAW ({raw}), and \
         unprivileged ICMP datagram sockets are not allowed for this group ({dgram_err}). \
         Either give the agent CAP_NET_RAW (setcap cap_net_raw+ep /path/to/imn-agent, or \
         AmbientCapabilities=CAP_NET_RAW in its systemd unit), or allow unprivileged ICMP \
         with sysctl -w net.ipv4.ping_group_range=\"0 2147483647\" (covering the agent's group)",
        if v6 { "v6" } else { "" }
    )
}

impl Engine {
    /// The process-wide engine of a family, opened on first use.
    pub fn global(v6: bool) -> Result<Arc<Engine>, String> {
        let mut g = GLOBAL[usize::from(v6)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.as_ref() {
            return Ok(e.clone());
        }
        let e = Arc::new(Engine::open(v6, SocketPref::Auto)?);
        *g = Some(e.clone());
        Ok(e)
    }

    /// Opens a new engine (tests and tools; the agent shares `global`).
    pub fn open(v6: bool, pref: SocketPref) -> Result<Engine, String> {
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let mut raw_err = None;
        let mut sock = None;
        if pref == SocketPref::Auto {
            match Socket::new(domain, Type::RAW, Some(proto)) {
                Ok(s) => sock = Some((s, true)),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                    raw_err = Some(e)
                }
                Err(e) => return Err(format!("cannot open a raw ICMP socket: {e}")),
            }
        }
        let (sock, raw) = match sock {
            Some(s) => s,
            None => match Socket::new(domain, Type::DGRAM, Some(proto)) {
                Ok(s) => (s, false),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                    return Err(no_socket_error(v6, raw_err.as_ref(), &e))
                }
                Err(e) => return Err(format!("cannot open an ICMP datagram socket: {e}")),
            },
        };
        let fd = sock.as_raw_fd();
        let opt = |what: &str, r: io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
        if raw && !v6 {
            // Only echo replies reach the socket: the kernel drops the rest (including
            // the echo requests every raw socket would otherwise see on loopback).
            let mask: u32 = !(1u32 << packet::ECHO_REPLY_V4);
            opt(
                "ICMP_FILTER",
                sys::setsockopt(fd, sys::SOL_RAW, sys::ICMP_FILTER, &mask),
            )?;
        }
        if raw && v6 {
            let mut filter = [u32::MAX; 8];
            let t = usize::from(packet::ECHO_REPLY_V6);
            filter[t >> 5] &= !(1u32 << (t & 31));
            opt(
                "ICMP6_FILTER",
                sys::setsockopt(fd, libc::IPPROTO_ICMPV6, sys::ICMP6_FILTER, &filter),
            )?;
        }
        let on: libc::c_int = 1;
        if v6 {
            opt(
                "IPV6_RECVHOPLIMIT",
                sys::setsockopt(fd, libc::IPPROTO_IPV6, sys::IPV6_RECVHOPLIMIT, &on),
            )?;
        } else if !raw {
            opt(
                "IP_RECVTTL",
                sys::setsockopt(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, &on),
            )?;
        }
        // Kernel receive timestamps. 32-bit platforms prefer the y2038-safe option.
        // Optional: where the option is missing (qemu-user does not translate it) the
        // receive time is the clock read right after recvmsg, a few µs later.
        let _rx_stamps = (cfg!(target_pointer_width = "32")
            && sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_NEW, &on).is_ok())
            || sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPNS_OLD, &on).is_ok();
        // Transmit timestamps on the error queue, with the packet looped back so the
        // probe can be recognised by its cookie. Optional: without them the send
        // time is the clock read just before sendmsg.
        let flags: libc::c_int =
            (sys::SOF_TIMESTAMPING_TX_SOFTWARE | sys::SOF_TIMESTAMPING_SOFTWARE) as libc::c_int;
        let tx_stamps = (cfg!(target_pointer_width = "32")
            && sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPING_NEW, &flags).is_ok())
            || sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_TIMESTAMPING_OLD, &flags).is_ok();
        // The receive buffer: the normal option is capped by net.core.rmem_max; root
        // may force it past that.
        let _ = sock.set_recv_buffer_size(RCVBUF);
        if sock.recv_buffer_size().unwrap_or(0) < 2 * RCVBUF {
            let want = RCVBUF as libc::c_int;
            let _ = sys::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &want);
        }
        let rcvbuf = sock.recv_buffer_size().unwrap_or(0);
        let _ = sock.set_send_buffer_size(1 << 20);
        // SAFETY: eventfd with plain flags; the descriptor is owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let inner = Arc::new(Inner {
            sock,
            v6,
            raw,
            tx_stamps,
            rcvbuf,
            regs: RwLock::new(Vec::new()),
            ttl_cmsg: AtomicBool::new(true),
            ttl_lock: Mutex::new(-1),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            wake,
        });
        let rx = inner.clone();
        std::thread::Builder::new()
            .name(format!("imn-ping-rx{}", if v6 { 6 } else { 4 }))
            .spawn(move || {
                // A bug must not silence the engine for good: start over.
                while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rx.clone().receive_loop()
                }))
                .is_err()
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("cannot start the ping receiver thread: {e}"))?;
        Ok(Engine { inner })
    }

    /// `raw` or `dgram`.
    pub fn kind(&self) -> &'static str {
        if self.inner.raw {
            "raw"
        } else {
            "dgram"
        }
    }

    /// Effective receive buffer in bytes (as the kernel reports it: twice what was set).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn rcvbuf(&self) -> usize {
        self.inner.rcvbuf
    }

    /// Whether transmit timestamps are in use.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn tx_stamps(&self) -> bool {
        self.inner.tx_stamps
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.wake_receiver();
    }
}

impl Inner {
    /// Registers a session needing `span` consecutive sequence numbers per identifier.
    /// Returns (identifier, first sequence number).
    pub fn register(&self, sess: &Arc<Session>, span: u32) -> Result<(u16, u16), String> {
        let mut regs = self.regs.write().unwrap_or_else(|e| e.into_inner());
        let (id, seq_base) = if self.raw {
            // A fresh identifier per session; sequences start anywhere.
            let mut r = sys::random_u64();
            let id = loop {
                let id = r as u16;
                if id != 0 && regs.iter().all(|g| g.id != id) {
                    break id;
                }
                r = sys::random_u64();
            };
            (id, (r >> 16) as u16)
        } else {
            // The kernel owns the identifier: sessions share it and get disjoint
            // sequence blocks.
            let mut used: Vec<(u32, u32)> = regs
                .iter()
                .map(|g| (u32::from(g.seq_base), u32::from(g.seq_base) + g.span))
                .collect();
            used.sort_unstable();
            let mut base = 0u32;
            for (s, e) in used {
                if base + span <= s {
                    break;
                }
                base = base.max(e);
            }
            if base + span > 1 << 16 {
                return Err("too many concurrent pings share the ICMP datagram socket; \
                     retry later"
                    .into());
            }
            (0, base as u16)
        };
        regs.push(Reg {
            id,
            seq_base,
            span,
            sess: sess.clone(),
        });
        self.active.store(regs.len(), Ordering::SeqCst);
        // Get the receiver off the socket's wait queue before the first probe.
        self.wake_receiver();
        Ok((id, seq_base))
    }

    fn wake_receiver(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn deregister(&self, token: u32) {
        let mut regs = self.regs.write().unwrap_or_else(|e| e.into_inner());
        regs.retain(|r| r.sess.token != token);
        self.active.store(regs.len(), Ordering::SeqCst);
    }

    /// Sends one datagram, with the TTL / hop limit if asked.
    pub fn send(&self, dst: &SockAddr, pkt: &[u8], ttl: Option<u8>) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let (level, cmsg_type, sockopt) = if self.v6 {
            (
                libc::IPPROTO_IPV6,
                sys::IPV6_HOPLIMIT,
                libc::IPV6_UNICAST_HOPS,
            )
        } else {
            (libc::IPPROTO_IP, libc::IP_TTL, libc::IP_TTL)
        };
        if self.ttl_cmsg.load(Ordering::Relaxed) {
            match sys::send_to(fd, dst, pkt, ttl.map(|t| (level, cmsg_type, t))) {
                Err(e) if ttl.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                    // An old kernel without IP_TTL control messages: set it per socket.
                    self.ttl_cmsg.store(false, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        let mut cur = self.ttl_lock.lock().unwrap_or_else(|e| e.into_inner());
        let want = ttl.map_or(-1, libc::c_int::from);
        if *cur != want {
            sys::setsockopt(fd, level, sockopt, &want)?;
            *cur = want;
        }
        sys::send_to(fd, dst, pkt, None)
    }

    #[cfg(test)]
    pub fn regs_snapshot(&self) -> Vec<(u32, u32)> {
        let regs = self.regs.read().unwrap_or_else(|e| e.into_inner());
        regs.iter().map(|r| (r.sess.count, r.sess.token)).collect()
    }

    #[cfg(test)]
    pub fn regs_snapshot_full(&self) -> Vec<Reg> {
        self.regs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Reads replies and transmit stamps until the engine is dropped.
    ///
    /// While no run is registered, it blocks in `poll` (on the socket, for stray
    /// packets, and on an eventfd that wakes it for a new run). While runs are registered, it
    /// reads the socket every ACTIVE_POLL and sleeps on a timer in between, never on
    /// the socket: a thread waiting on the socket is woken by every packet queued to
    /// it, the transmit stamp of a probe included, and on loopback that wakeup (an
    /// inter-processor interrupt) would run between the probe's transmit stamp and its
    /// reply's receive stamp, inside the RTT. Reading later changes no RTT: the times
    /// are the kernel's.
    fn receive_loop(self: Arc<Self>) {
        let fd = self.fd();
        let mut replies = RecvBatch::new();
        let mut errs = RecvBatch::new();
        while !self.stop.load(Ordering::Relaxed) {
            if self.active.load(Ordering::SeqCst) > 0 {
                self.drain(fd, &mut replies, &mut errs);
                std::thread::sleep(ACTIVE_POLL);
                continue;
            }
            let mut pfds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // No timeout: registering a run or dropping the engine writes to `wake`.
            // SAFETY: two pollfds we own.
            if unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) } <= 0 {
                continue;
            }
            if pfds[1].revents != 0 {
                let mut v: u64 = 0;
                // SAFETY: an 8-byte read from our eventfd into v.
                unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            }
            self.drain(fd, &mut replies, &mut errs);
        }
    }

    /// Reads everything queued; returns how many datagrams there were.
    fn drain(&self, fd: RawFd, replies: &mut RecvBatch, errs: &mut RecvBatch) -> usize {
        let mut total = 0;
        loop {
            let n = match replies.recv(fd, 0) {
                Ok(n) => n,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    0
                }
            };
            let rx_mono = sys::mono_ns();
            let rx_rt = sys::realtime_ns();
            // Transmit timestamps are queued before the replies they precede, so
            // draining them now gives every reply in hand its kernel send time.
            loop {
                let m = errs.recv(fd, libc::MSG_ERRQUEUE).unwrap_or(0);
                total += m;
                if m == 0 {
                    break;
                }
                self.on_tx_batch(errs, m);
                if m < BATCH {
                    break;
                }
            }
            total += n;
            if n > 0 {
                self.on_reply_batch(replies, n, rx_rt, rx_mono);
            }
            if n < BATCH {
                return total;
            }
        }
    }

    fn on_reply_batch(&self, b: &RecvBatch, n: usize, rx_rt: u64, rx_mono: u64) {
        let regs = self.regs.read().unwrap_or_else(|e| e.into_inner());
        if regs.is_empty() {
            return;
        }
        for i in 0..n {
            let d = b.get(i);
            let Some(src) = d.src else { continue };
            let stamp = d.anc.rx_ns.or(d.anc.stamping_ns).unwrap_or(rx_rt);
            self.on_reply(&regs, src, d.data, d.truncated, d.anc.ttl, stamp, rx_mono);
        }
    }

    /// One received datagram: attribute it to a probe, if it answers one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_reply(
        &self,
        regs: &[Reg],
        src: IpAddr,
        data: &[u8],
        truncated: bool,
        cmsg_ttl: Option<u8>,
        rx_rt: u64,
        rx_mono: u64,
    ) {
        let Some(rep) = packet::parse_reply(data, self.v6, self.raw && !self.v6) else {
            return;
        };
        let rel_of = |r: &Reg| u32::from(rep.seq.wrapping_sub(r.seq_base));
        let reg = if self.raw {
            regs.iter().find(|r| r.id == rep.id)
        } else {
            regs.iter().find(|r| rel_of(r) < r.span)
        };
        let Some(reg) = reg else { return };
        let rel = rel_of(reg);
        if rel >= reg.span {
            return;
        }
        let sess = &reg.sess;
        let Some(j) = sess.lookup(src, rel) else {
            return;
        };
        let size = sess.size as usize;
        if !truncated && size >= COOKIE && rep.icmp.len() == 8 + size {
            // Same identifier, sequence and source, but another run's packet.
            if packet::cookie_of(rep.icmp, size) != Some((sess.token, j as u32)) {
                return;
            }
        }
        sess.on_reply(j, rx_rt, rx_mono, rep.ttl.or(cmsg_ttl));
    }

    fn on_tx_batch(&self, b: &RecvBatch, n: usize) {
        if !self.tx_stamps {
            return;
        }
        let regs = self.regs.read().unwrap_or_else(|e| e.into_inner());
        for i in 0..n {
            let d = b.get(i);
            match d.anc.ee {
                Some((sys::SO_EE_ORIGIN_TIMESTAMPING, sys::SCM_TSTAMP_SND)) => {}
                _ => continue,
            }
            let (Some(ts), false) = (d.anc.stamping_ns, d.truncated) else {
                continue;
            };
            // The cookie's token is the last-but-one word of the looped packet.
            let Some(tok) = d
                .data
                .len()
                .checked_sub(8)
                .and_then(|s| d.data.get(s..s + 4))
            else {
                continue;
            };
            let token = u32::from_be_bytes([tok[0], tok[1], tok[2], tok[3]]);
            let Some(reg) = regs.iter().find(|r| r.sess.token == token) else {
                continue;
            };
            let sess = &reg.sess;
            let Some((seq, (tk, j))) = packet::looped_request(d.data, self.v6, sess.size as usize)
            else {
                continue;
            };
            let j = j as usize;
            match sess.seq_rel(j) {
                Some(rel) if tk == token && seq == reg.seq_base.wrapping_add(rel as u16) => {
                    sess.on_tx(j, ts)
                }
                _ => {}
            }
        }
    }
}
