//! One ping run: its targets, the compact per-probe state the receiver fills in, and
//! the pacer that sends every probe at its absolute deadline.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use socket2::SockAddr;

use super::engine::Engine;
use super::packet;
use super::sys;

/// The smallest RTT ever reported, in ns: a reply cannot take zero time.
pub const MIN_RTT_NS: u64 = 1;

/// A transmit timestamp refines the send time only if it is this close to it.
const MAX_TX_LAG_NS: u64 = 100_000_000;

/// Per probe: 24 bytes.
#[derive(Default)]
pub(crate) struct Probe {
    /// CLOCK_REALTIME ns just before sendmsg, replaced by the kernel's transmit stamp.
    pub send_rt: AtomicU64,
    /// CLOCK_MONOTONIC ns just before sendmsg, even; odd once a transmit stamp was
    /// applied; 0 if the probe was not sent.
    pub send_mono: AtomicU64,
    /// Round-trip time in ns; 0 = no reply (yet).
    pub rtt: AtomicU64,
}

pub(crate) const ACTIVE: u8 = 1;
pub(crate) const SEND_ERROR: u8 = 2;

/// Per target: 32 bytes.
pub(crate) struct Target {
    pub addr: IpAddr,
    pub flags: AtomicU8,
    /// TTL of the first reply + 1; 0 = none yet.
    pub reply_ttl: AtomicU16,
    /// Sequence offset of this target (a second listing of the same address gets the
    /// next block of `count` sequence numbers).
    pub seq_off: u16,
    pub dups: AtomicU32,
    /// IPv6 scope (interface) for link-local addresses.
    pub scope: u32,
}

pub(crate) struct Session {
    /// Identifies the run in the payload cookie.
    pub token: u32,
    pub count: u32,
    pub size: u32,
    pub timeout_ns: u64,
    pub ttl: Option<u8>,
    pub targets: Vec<Target>,
    /// `targets.len() * count`, target-major.
    pub probes: Vec<Probe>,
    /// (address, listing number, target index), sorted.
    pub index: Vec<(IpAddr, u16, u32)>,
    /// Probes sent and not yet answered.
    pub outstanding: AtomicI64,
    pub all_sent: AtomicBool,
    pub cancel: AtomicBool,
    pub waiter: OnceLock<Thread>,
    /// First send error per target.
    pub errors: Mutex<Vec<(u32, String)>>,
}

/// The RTT from a kernel realtime measurement and a monotonic one. The realtime one
/// (kernel stamps) is the accurate one; a clock step between send and receive makes it
/// non-positive or longer than the monotonic bound, and then the monotonic one counts.
pub(crate) fn choose_rtt(rt: i64, mono: i64) -> u64 {
    let plausible = rt > 0 && (mono <= 0 || rt <= mono + mono / 1000 + 1_000_000);
    let v = if plausible { rt } else { mono };
    (v.max(0) as u64).max(MIN_RTT_NS)
}

impl Session {
    pub fn new(
        token: u32,
        count: u32,
        size: u32,
        timeout_ns: u64,
        ttl: Option<u8>,
        targets: Vec<Target>,
    ) -> Session {
        let n = targets.len() * count as usize;
        let mut probes = Vec::with_capacity(n);
        probes.resize_with(n, Probe::default);
        Session {
            token,
            count,
            size,
            timeout_ns,
            ttl,
            targets,
            probes,
            index: Vec::new(),
            outstanding: AtomicI64::new(0),
            all_sent: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            waiter: OnceLock::new(),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Numbers repeated listings of an address and builds the reply index. Returns the
    /// indices of targets listed too often to get sequence numbers (not probed).
    pub fn build_index(&mut self) -> Vec<u32> {
        let mut index: Vec<(IpAddr, u16, u32)> = self
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.flags.load(Relaxed) & ACTIVE != 0)
            .map(|(i, t)| (t.addr, 0, i as u32))
            .collect();
        index.sort_unstable_by_key(|e| (e.0, e.2));
        let count = self.count;
        let mut too_many = Vec::new();
        let mut k = 0;
        while k < index.len() {
            let mut e = k;
            while e < index.len() && index[e].0 == index[k].0 {
                e += 1;
            }
            for (d, entry) in index[k..e].iter_mut().enumerate() {
                if (d as u64 + 1) * u64::from(count) > 1 << 16 {
                    too_many.push(entry.2);
                } else {
                    entry.1 = d as u16;
                    self.targets[entry.2 as usize].seq_off = (d as u32 * count) as u16;
                }
            }
            k = e;
        }
        for &t in &too_many {
            self.targets[t as usize].flags.store(0, Relaxed);
        }
        index.retain(|e| self.targets[e.2 as usize].flags.load(Relaxed) & ACTIVE != 0);
        index.shrink_to_fit();
        self.index = index;
        too_many
    }

    /// Sequence numbers a family's identifier needs: one block of `count` per listing.
    pub fn span(&self, v6: bool) -> u32 {
        let max_off = self
            .targets
            .iter()
            .filter(|t| t.addr.is_ipv6() == v6 && t.flags.load(Relaxed) & ACTIVE != 0)
            .map(|t| u32::from(t.seq_off))
            .max();
        max_off.map_or(0, |m| m + self.count)
    }

    /// The probe answering a reply from `addr` with relative sequence `rel`.
    pub fn lookup(&self, addr: IpAddr, rel: u32) -> Option<usize> {
        let count = self.count.max(1);
        let listing = u16::try_from(rel / count).ok()?;
        let k = (rel % count) as usize;
        let pos = self
            .index
            .binary_search_by(|e| (e.0, e.1).cmp(&(addr, listing)))
            .ok()?;
        let t = self.index.get(pos)?.2 as usize;
        let j = t * count as usize + k;
        (j < self.probes.len()).then_some(j)
    }

    /// Relative sequence number of probe `j`.
    pub fn seq_rel(&self, j: usize) -> Option<u32> {
        let count = self.count.max(1) as usize;
        let t = self.targets.get(j / count)?;
        Some(u32::from(t.seq_off) + (j % count) as u32)
    }

    /// A reply to probe `j`, received at kernel time `rx_rt` (realtime) and seen by the
    /// receiver at `rx_mono` (monotonic).
    pub fn on_reply(&self, j: usize, rx_rt: u64, rx_mono: u64, ttl: Option<u8>) {
        let Some(p) = self.probes.get(j) else { return };
        let send_mono = p.send_mono.load(Acquire);
        if send_mono == 0 {
            return;
        }
        let send_rt = p.send_rt.load(Relaxed);
        let rt = (rx_rt as i64).wrapping_sub(send_rt as i64);
        let mono = (rx_mono as i64).wrapping_sub((send_mono & !1) as i64);
        let rtt = choose_rtt(rt, mono);
        let t = &self.targets[j / self.count as usize];
        if p.rtt.compare_exchange(0, rtt, AcqRel, Relaxed).is_ok() {
            if let Some(ttl) = ttl {
                let _ = t
                    .reply_ttl
                    .compare_exchange(0, u16::from(ttl) + 1, Relaxed, Relaxed);
            }
            if self.outstanding.fetch_sub(1, SeqCst) == 1 && self.all_sent.load(SeqCst) {
                if let Some(w) = self.waiter.get() {
                    w.unpark();
                }
            }
        } else {
            t.dups.fetch_add(1, Relaxed);
        }
    }

    /// The kernel's transmit timestamp of probe `j` (same receiver thread as replies).
    pub fn on_tx(&self, j: usize, tx_rt: u64) {
        let Some(p) = self.probes.get(j) else { return };
        let send_mono = p.send_mono.load(Acquire);
        if send_mono == 0 || send_mono & 1 == 1 {
            return;
        }
        let send_rt = p.send_rt.load(Relaxed);
        let lag = tx_rt.wrapping_sub(send_rt);
        if tx_rt <= send_rt || lag > MAX_TX_LAG_NS {
            return;
        }
        p.send_rt.store(tx_rt, Relaxed);
        p.send_mono.store(send_mono | 1, Relaxed);
        // A reply seen before its transmit stamp: move its start to the stamp.
        let rtt = p.rtt.load(Relaxed);
        if rtt != 0 {
            p.rtt
                .store(rtt.saturating_sub(lag).max(MIN_RTT_NS), Relaxed);
        }
    }

    /// The RTT of probe `j` in ns, if it was answered within the timeout.
    pub fn rtt_ns(&self, j: usize) -> Option<u64> {
        let r = self.probes.get(j)?.rtt.load(Acquire);
        (r != 0 && r <= self.timeout_ns).then_some(r)
    }

    fn record_error(&self, t: usize, msg: String) {
        let target = &self.targets[t];
        if target.flags.fetch_or(SEND_ERROR, Relaxed) & SEND_ERROR == 0 {
            self.errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((t as u32, msg));
        }
    }
}

/// What the pacer needs of an engine: the engine, the session's identifier and
/// sequence base in it.
pub(crate) struct Lane {
    pub engine: Arc<Engine>,
    pub id: u16,
    pub seq_base: u16,
}

/// The pacer sleeps until this long before a deadline, then spins on the clock. A
/// sleeping thread is woken ahead of busy ones on a loaded machine, where a spinning
/// one waits its turn; below this a sleep's wakeup latency is too coarse.
const SPIN_NS: u64 = 40_000;

/// Sleeps, then spins, until the monotonic clock reaches `due`; false if cancelled.
fn wait_until(due: u64, cancel: &AtomicBool) -> bool {
    loop {
        let now = sys::mono_ns();
        if now >= due {
            return true;
        }
        if cancel.load(Relaxed) {
            return false;
        }
        let left = due - now;
        if left > SPIN_NS {
            // Sleep in slices, to notice a cancel, waking a little early. (`sched_yield`
            // is no middle way: it can hand the CPU away for a whole slice.)
            std::thread::sleep(Duration::from_nanos((left - SPIN_NS / 2).min(50_000_000)));
        }
        // Near: spin. Reading the clock paces the loop; no PAUSE hint, which a
        // hypervisor may take for a spinning lock and deschedule the vCPU for.
    }
}

/// Sends every probe at its deadline, then waits for the replies or the timeout.
///
/// Probe `k` of the target at position `i` (of `n` probed targets) is due at
/// `start + k * round + i / rate`, where `round = max(interval, n / rate)`: the rate
/// holds across targets and the interval between two probes of one target.
pub(crate) fn pace(sess: &Session, lanes: &[Option<Lane>; 2], interval_ns: u64, rate: f64) {
    let _ = sess.waiter.set(std::thread::current());
    // Precise sleeps for this thread (the default timer slack is 50 µs).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let count = sess.count as usize;
    let active: Vec<u32> = (0..sess.targets.len() as u32)
        .filter(|&t| sess.targets[t as usize].flags.load(Relaxed) & ACTIVE != 0)
        .collect();
    let ns_per_probe = 1e9 / rate;
    let round = (interval_ns as f64).max(active.len() as f64 * ns_per_probe);
    let mut templates = [
        packet::template(false, sess.size as usize),
        packet::template(true, sess.size as usize),
    ];
    let start = sys::mono_ns();
    let mut last_send = start;
    'rounds: for k in 0..count {
        for (i, &t) in active.iter().enumerate() {
            let due = start.saturating_add((k as f64 * round + i as f64 * ns_per_probe) as u64);
            if !wait_until(due, &sess.cancel) {
                break 'rounds;
            }
            let target = &sess.targets[t as usize];
            let v6 = target.addr.is_ipv6();
            let Some(lane) = &lanes[usize::from(v6)] else {
                continue;
            };
            let j = t as usize * count + k;
            let rel = u32::from(target.seq_off) + k as u32;
            let seq = lane.seq_base.wrapping_add(rel as u16);
            let pkt = &mut templates[usize::from(v6)];
            packet::stamp(pkt, v6, lane.id, seq, Some((sess.token, j as u32)));
            let dst = match target.addr {
                IpAddr::V6(a) if target.scope != 0 => {
                    SockAddr::from(SocketAddrV6::new(a, 0, 0, target.scope))
                }
                a => SockAddr::from(SocketAddr::new(a, 0)),
            };
            let p = &sess.probes[j];
            sess.outstanding.fetch_add(1, SeqCst);
            let mono = (sys::mono_ns() & !1).max(2);
            // The realtime clock is read last, right before sendmsg (never after), to
            // compare with the kernel's receive stamp.
            p.send_rt.store(sys::realtime_ns(), Relaxed);
            p.send_mono.store(mono, Release);
            match lane.engine.inner.send(&dst, pkt, sess.ttl) {
                Ok(()) => last_send = mono,
                Err(e) => {
                    p.send_mono.store(0, Release);
                    sess.outstanding.fetch_sub(1, SeqCst);
                    sess.record_error(t as usize, format!("sendto {}: {e}", target.addr));
                }
            }
        }
    }
    sess.all_sent.store(true, SeqCst);
    let end = last_send.saturating_add(sess.timeout_ns);
    loop {
        if sess.outstanding.load(SeqCst) <= 0 || sess.cancel.load(Relaxed) {
            break;
        }
        let now = sys::mono_ns();
        if now >= end {
            break;
        }
        std::thread::park_timeout(Duration::from_nanos((end - now).min(100_000_000)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_never_zero_or_negative() {
        assert_eq!(choose_rtt(25_000, 40_000), 25_000);
        // Realtime stepped back: the monotonic measure counts.
        assert_eq!(choose_rtt(-5_000_000, 40_000), 40_000);
        assert_eq!(choose_rtt(0, 40_000), 40_000);
        // Realtime stepped forward by a second.
        assert_eq!(choose_rtt(1_000_040_000, 40_000), 40_000);
        // Nothing plausible at all: still positive.
        assert_eq!(choose_rtt(0, 0), MIN_RTT_NS);
        assert_eq!(choose_rtt(-1, -1), MIN_RTT_NS);
        assert!(std::mem::size_of::<Probe>() <= 24);
        assert!(std::mem::size_of::<Target>() <= 32);
    }
}
