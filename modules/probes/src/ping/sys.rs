//! Thin wrappers over the socket calls the engine needs that socket2 does not offer:
//! clocks, `recvmmsg` with ancillary data, `sendmsg` with a per-packet TTL, and the
//! parsing of control messages. Everything that reads kernel data is bounds-checked.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

// Socket options and control messages, as the generic Linux UAPI numbers them
// (x86, arm, aarch64, riscv; the `_OLD` variants carry the platform's `timespec`).
pub const SO_TIMESTAMPNS_OLD: libc::c_int = 35;
pub const SO_TIMESTAMPING_OLD: libc::c_int = 37;
pub const SO_TIMESTAMPNS_NEW: libc::c_int = 64;
pub const SO_TIMESTAMPING_NEW: libc::c_int = 65;
pub const SOF_TIMESTAMPING_TX_SOFTWARE: u32 = 1 << 1;
pub const SOF_TIMESTAMPING_SOFTWARE: u32 = 1 << 4;
pub const SO_EE_ORIGIN_TIMESTAMPING: u8 = 4;
pub const SCM_TSTAMP_SND: u32 = 0;
pub const SOL_RAW: libc::c_int = 255;
pub const ICMP_FILTER: libc::c_int = 1;
pub const ICMP6_FILTER: libc::c_int = 1;
pub const IP_RECVERR: libc::c_int = 11;
pub const IPV6_RECVERR: libc::c_int = 25;
pub const IPV6_RECVHOPLIMIT: libc::c_int = 51;
pub const IPV6_HOPLIMIT: libc::c_int = 52;

/// Nanoseconds on a clock (`CLOCK_REALTIME` is the clock of kernel timestamps).
#[allow(clippy::useless_conversion)] // not useless where time_t and long are 32 bits
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    // i64::from: time_t and long are 32 bits wide on some targets.
    i64::from(ts.tv_sec)
        .max(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.tv_nsec)) as u64
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` is a live value of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a `timespec` of the given layout at the start of `data`.
fn read_timespec(data: &[u8], wide: bool) -> Option<u64> {
    let (sec, nsec) = if wide {
        let s = i64::from_ne_bytes(data.get(0..8)?.try_into().ok()?);
        let n = i64::from_ne_bytes(data.get(8..16)?.try_into().ok()?);
        (s, n)
    } else {
        let s = i32::from_ne_bytes(data.get(0..4)?.try_into().ok()?);
        let n = i32::from_ne_bytes(data.get(4..8)?.try_into().ok()?);
        (i64::from(s), i64::from(n))
    };
    if sec <= 0 || !(0..1_000_000_000).contains(&nsec) {
        return None;
    }
    (sec as u64)
        .checked_mul(1_000_000_000)?
        .checked_add(nsec as u64)
}

/// Whether the `_OLD` control messages carry a 64-bit `timespec` on this platform.
const NATIVE_WIDE: bool = size_of::<libc::timespec>() >= 16;

/// What the control messages of one received datagram said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ancillary {
    /// `SCM_TIMESTAMPNS`: the kernel's receive time (CLOCK_REALTIME).
    pub rx_ns: Option<u64>,
    /// `SCM_TIMESTAMPING` software stamp (`ts[0]`).
    pub stamping_ns: Option<u64>,
    /// `IP_TTL` / `IPV6_HOPLIMIT` of the datagram.
    pub ttl: Option<u8>,
    /// `IP_RECVERR` / `IPV6_RECVERR`: (origin, info) of a `sock_extended_err`.
    pub ee: Option<(u8, u32)>,
}

/// Parses the control messages of a `msghdr` filled in by the kernel.
///
/// # Safety
/// `hdr` must come from a successful `recvmsg`/`recvmmsg`, with `msg_control`
/// pointing to a live buffer of at least `msg_controllen` bytes.
#[allow(clippy::useless_conversion)] // not useless with musl, where the lengths are u32
pub unsafe fn parse_cmsgs(hdr: &libc::msghdr) -> Ancillary {
    let mut a = Ancillary::default();
    // usize::try_from: msg_controllen is a u32 with musl.
    let clen_total = usize::try_from(hdr.msg_controllen).unwrap_or(0);
    if hdr.msg_control.is_null() || clen_total < size_of::<libc::cmsghdr>() {
        return a;
    }
    let start = hdr.msg_control as usize;
    let end = start + clen_total;
    let mut c = libc::CMSG_FIRSTHDR(hdr);
    while !c.is_null() {
        let cmsg = &*c;
        let data_ptr = libc::CMSG_DATA(c) as usize;
        let clen = usize::try_from(cmsg.cmsg_len).unwrap_or(0);
        if clen < libc::CMSG_LEN(0) as usize || (c as usize) + clen > end || data_ptr > end {
            break;
        }
        let dlen = (c as usize + clen).saturating_sub(data_ptr);
        let data = std::slice::from_raw_parts(data_ptr as *const u8, dlen);
        match (cmsg.cmsg_level, cmsg.cmsg_type) {
            (libc::SOL_SOCKET, SO_TIMESTAMPNS_OLD) => a.rx_ns = read_timespec(data, NATIVE_WIDE),
            (libc::SOL_SOCKET, SO_TIMESTAMPNS_NEW) => a.rx_ns = read_timespec(data, true),
            (libc::SOL_SOCKET, SO_TIMESTAMPING_OLD) => {
                a.stamping_ns = read_timespec(data, NATIVE_WIDE)
            }
            (libc::SOL_SOCKET, SO_TIMESTAMPING_NEW) => a.stamping_ns = read_timespec(data, true),
            (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, IPV6_HOPLIMIT) => {
                if let Some(b) = data.get(0..4) {
                    let v = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                    a.ttl = u8::try_from(v).ok();
                }
            }
            (libc::IPPROTO_IP, IP_RECVERR) | (libc::IPPROTO_IPV6, IPV6_RECVERR) => {
                // struct sock_extended_err { u32 errno; u8 origin, type, code, pad; u32 info; u32 data; }
                if let (Some(&origin), Some(info)) = (data.get(4), data.get(8..12)) {
                    a.ee = Some((
                        origin,
                        u32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
                    ));
                }
            }
            _ => {}
        }
        c = libc::CMSG_NXTHDR(hdr, c);
        if !c.is_null() && (c as usize) < start {
            break;
        }
    }
    a
}

/// The address in a `sockaddr_storage` filled in by the kernel.
pub fn sockaddr_ip(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<IpAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, and storage is large enough.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Batch size of one `recvmmsg`.
pub const BATCH: usize = 64;
/// Bytes kept of each datagram (longer ones are truncated, flagged `MSG_TRUNC`).
pub const BUF: usize = 2048;
/// Control buffer per datagram, in u64 words (for alignment).
const CTRL_WORDS: usize = 32;

/// Buffers for one `recvmmsg` call, allocated once per receiver thread.
pub struct RecvBatch {
    data: Vec<u8>,
    ctrl: Vec<u64>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into the heap buffers of
// this same struct (`data`, `ctrl`, `names`, `iovs`), which never move or resize, and
// they are only used through `&mut self`; sending the whole to another thread keeps
// them valid.
unsafe impl Send for RecvBatch {}

/// One received datagram.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub truncated: bool,
    pub src: Option<IpAddr>,
    pub anc: Ancillary,
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            data: vec![0u8; BATCH * BUF],
            ctrl: vec![0u64; BATCH * CTRL_WORDS],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            names: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// Receives up to BATCH datagrams without blocking; returns how many (0 if none).
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.data[i * BUF..].as_mut_ptr().cast(),
                iov_len: BUF,
            };
            // SAFETY: all-zero is a valid msghdr; the pointers set below stay valid
            // for the call, as the Vecs are not resized.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i * CTRL_WORDS..].as_mut_ptr().cast();
            h.msg_controllen = (CTRL_WORDS * 8) as _;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        loop {
            // SAFETY: the headers point into our own buffers, sized as declared.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    BATCH as _,
                    (flags | libc::MSG_DONTWAIT) as _,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// The i-th datagram of the last `recv`.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let h = &self.hdrs[i];
        let n = (h.msg_len as usize).min(BUF);
        let hdr = &h.msg_hdr;
        Datagram {
            data: &self.data[i * BUF..i * BUF + n],
            truncated: hdr.msg_flags & libc::MSG_TRUNC != 0,
            src: sockaddr_ip(&self.names[i], hdr.msg_namelen),
            // SAFETY: the header was filled by a successful recvmmsg into our buffers.
            anc: unsafe { parse_cmsgs(hdr) },
        }
    }
}

/// `sendmsg` of one datagram, with an optional TTL / hop limit control message.
pub fn send_to(
    fd: RawFd,
    dst: &socket2::SockAddr,
    pkt: &[u8],
    ttl: Option<(libc::c_int, libc::c_int, u8)>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: pkt.as_ptr() as *mut libc::c_void,
        iov_len: pkt.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = dst.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dst.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let mut cbuf = [0u64; 4];
    if let Some((level, kind, value)) = ttl {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE/LEN are pure; the buffer (32 bytes) holds one int cmsg.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), value.into());
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let r = unsafe { libc::sendmsg(fd, &msg, 0) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A pseudo-random u64 (splitmix64 over the clock, the pid and a counter): for ICMP
/// identifiers and session cookies, where unpredictability is not a security matter.
pub fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut z = realtime_ns()
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespec_layouts() {
        let mut wide = Vec::new();
        wide.extend_from_slice(&5i64.to_ne_bytes());
        wide.extend_from_slice(&7i64.to_ne_bytes());
        assert_eq!(read_timespec(&wide, true), Some(5_000_000_007));
        let mut narrow = Vec::new();
        narrow.extend_from_slice(&5i32.to_ne_bytes());
        narrow.extend_from_slice(&7i32.to_ne_bytes());
        assert_eq!(read_timespec(&narrow, false), Some(5_000_000_007));
        assert_eq!(read_timespec(&narrow[..6], false), None);
        assert_eq!(read_timespec(&[], true), None);
    }

    #[test]
    fn clocks_advance() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
        assert!(realtime_ns() > 1_500_000_000_000_000_000);
        assert_ne!(random_u64(), random_u64());
    }
}
