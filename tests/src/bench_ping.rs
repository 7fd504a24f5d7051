//! `imn-bench ping`: the ping engine against fping, on loopback and against an ICMP
//! responder with a known delay in a network namespace of the bench's own.
//!
//! Traffic goes only to 127.0.0.0/8 and to the namespace this bench creates, whose
//! address is checked with `ip route get` to be reached through the bench's own veth
//! before anything is sent to it.
//!
//! What is measured:
//! - the paced sweep: `targets` loopback addresses (127.1.x.y), one probe each, at
//!   `rate` probes/s through `imn_probes::run("ping_module", ..)`, in process.
//!   The on-wire rate comes from an observer raw socket that queues every echo
//!   request to those addresses with its kernel receive timestamp, read after the
//!   sweep (so it costs the sweep no CPU);
//! - fping on the same list (`fping -i 0 -e -f FILE`), timed by wall clock and by
//!   the same observer;
//! - RTT accuracy: the median RTT to 127.0.0.1 (probes 10 ms apart), ours and
//!   fping's, alternated (ours, fping, fping, ours). The engine starts an RTT at the
//!   kernel's transmit stamp, fping at a clock read before its sendto, so fping's
//!   median includes the host's send path, which `send_path_us` measures apart;
//! - the error against a responder that answers every echo request exactly 20 ms
//!   after the kernel received it (it starts its sendto early by its own measured
//!   send latency, and reports how late each reply really left: `responder_lateness`;
//!   `error_vs_departure` is our error against the actual departure). fping prints
//!   RTTs over 10 ms to 0.1 ms, so its error there comes in steps of 100 µs;
//! - memory: the peak RSS growth of this process during the sweep;
//! - `cpu_us_per_probe`: CPU time of the process during the sweep per probe, the
//!   pacer's spinning between probes included.

use std::io::Write;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imn_probes::Context;
use imn_proto::results::{ModuleOutput, PingOutput};
use serde_json::{json, Value};

use crate::{program, TempDir};

/// The responder's delay.
pub const RESPONDER_DELAY_NS: u64 = 20_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub targets: usize,
    pub rate: f64,
    /// Probes to 127.0.0.1 for the median comparison.
    pub accuracy_probes: u32,
    /// Probes to the 20 ms responder.
    pub responder_probes: u32,
}

impl Options {
    pub fn full(targets: usize, rate: f64) -> Options {
        Options {
            targets,
            rate,
            accuracy_probes: 20,
            responder_probes: 100,
        }
    }

    pub fn quick() -> Options {
        Options {
            targets: 200,
            rate: 20_000.0,
            accuracy_probes: 20,
            responder_probes: 20,
        }
    }
}

/// The i-th sweep target: 127.1.0.1, ..., 127.1.0.250, 127.1.1.1, ... (only 127/8).
pub fn sweep_target(i: usize) -> Ipv4Addr {
    let b = 1 + i / 62_500;
    let r = i % 62_500;
    Ipv4Addr::new(127, b as u8, (r / 250) as u8, (r % 250 + 1) as u8)
}

fn is_sweep_target(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && (1..=2).contains(&o[1])
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

async fn ping(params: &str) -> Result<PingOutput, String> {
    ping_with(params, &Context::default()).await
}

async fn ping_with(params: &str, ctx: &Context) -> Result<PingOutput, String> {
    match imn_probes::run("ping_module", params, ctx).await? {
        ModuleOutput::Ping(p) => Ok(p),
        other => Err(format!("unexpected output {other:?}")),
    }
}

/// A policy as heavy as an operator's is likely to be: the built-in rule, a lab rule
/// that opens loopback, and `deny` networks (none of them the sweep's) in one more rule,
/// so every address is checked against all of them.
fn heavy_policy(deny: usize) -> imn_proto::policy::TargetPolicy {
    use imn_proto::policy::{Cidr, Rule, TargetPolicy};
    let nets = (0..deny)
        .map(|i| Cidr::parse(&format!("198.{}.{}.0/24", 18 + (i / 256) % 2, i % 256)).unwrap())
        .collect();
    TargetPolicy {
        rules: vec![
            Rule {
                name: "lab".into(),
                allow: vec![Cidr::parse("127.0.0.0/8").unwrap()],
                deny: vec![],
            },
            Rule {
                name: "blocklist".into(),
                allow: vec![],
                deny: nets,
            },
        ],
        builtin: true,
    }
}

/// The cost of the agent's policy check on the paced sweep: the same sweep open and
/// under [`heavy_policy`], in the order open, policy, policy, open; CPU per probe of
/// each and their ratio.
async fn policy_cost(params: &str, targets: usize) -> Result<Value, String> {
    let open = Context::default();
    let checked = Context {
        policy: std::sync::Arc::new(heavy_policy(512)),
        ..Context::default()
    };
    let (mut open_us, mut policy_us) = (0.0, 0.0);
    for with_policy in [false, true, true, false] {
        let cpu0 = cpu_us();
        let out = ping_with(params, if with_policy { &checked } else { &open }).await?;
        let used = cpu_us() - cpu0;
        if let Some(t) = out.targets.iter().find(|t| t.error.is_some()) {
            return Err(format!("a sweep target was refused: {:?}", t.error));
        }
        if with_policy {
            policy_us += used;
        } else {
            open_us += used;
        }
    }
    let per = |us: f64| (us / (2.0 * targets.max(1) as f64) * 100.0).round() / 100.0;
    Ok(json!({
        "rules": 3,
        "networks_checked": 512 + 1 + imn_proto::policy::BUILTIN_DENY.len(),
        "cpu_us_per_probe_open": per(open_us),
        "cpu_us_per_probe_policy": per(policy_us),
        "ratio": if open_us > 0.0 { json!((policy_us / open_us * 1000.0).round() / 1000.0) } else { Value::Null },
    }))
}

/// Every RTT of a ping output, in µs (None = lost).
fn rtts_us(out: &PingOutput) -> Vec<Option<f64>> {
    out.targets
        .iter()
        .flat_map(|t| t.rtts_ms.iter().map(|r| r.map(|ms| ms * 1000.0)))
        .collect()
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the peak RSS (VmHWM) to the current RSS; false if the kernel refused.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time (user + system) of this process so far, in µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn opt_round(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(round1(x)))
}

// ---------------------------------------------------------------------------------
// Raw sockets of the bench itself (observer and responder), with libc.

const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const SO_TIMESTAMPNS: libc::c_int = 35;
const SO_TIMESTAMPING: libc::c_int = 37;
/// SOF_TIMESTAMPING_TX_SOFTWARE | SOFTWARE | OPT_TSONLY.
const TX_STAMP_FLAGS: libc::c_int = (1 << 1) | (1 << 4) | (1 << 11);

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> std::io::Result<()> {
    // SAFETY: v is a live T of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A raw ICMPv4 socket that only sees the given ICMP type, with kernel timestamps.
fn raw_icmp_socket(only_type: u8, rcvbuf: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask: u32 = !(1u32 << only_type);
    setsockopt(fd.as_raw_fd(), SOL_RAW, ICMP_FILTER, &mask)?;
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_TIMESTAMPNS, &1i32)?;
    if setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &rcvbuf,
    )
    .is_err()
    {
        let _ = setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
    }
    Ok(fd)
}

/// One received IPv4 packet: bytes, kernel receive time (CLOCK_REALTIME ns).
fn recv_packet(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> Option<(usize, u64)> {
    let mut ctrl = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero msghdr is valid; pointers refer to our buffers.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>() as _;
    // SAFETY: as above.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    // (A transmit stamp without the packet has no bytes at all.)
    if n < 0 {
        return None;
    }
    let mut ts = 0u64;
    // SAFETY: msg was filled by a successful recvmsg into our control buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let t = (*c).cmsg_type;
            if (*c).cmsg_level == libc::SOL_SOCKET && (t == SO_TIMESTAMPNS || t == SO_TIMESTAMPING)
            {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                ts = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some((n as usize, ts))
}

fn realtime_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into t.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The host's send path on loopback: the median time from a clock read just before
/// `sendto` (where fping takes its send time) to the kernel's transmit stamp of the
/// packet (the engine's send time), in µs, over `n` probes 10 ms apart.
fn send_path_us(n: u32) -> Result<f64, String> {
    let sock = raw_icmp_socket(0, 1 << 20).map_err(|e| e.to_string())?;
    let fd = sock.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, SO_TIMESTAMPING, &TX_STAMP_FLAGS)
        .map_err(|e| e.to_string())?;
    // SAFETY: all-zero sockaddr_in is valid; fields set below.
    let mut to: libc::sockaddr_in = unsafe { zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut lags = Vec::new();
    let mut eb = [0u8; 64];
    for seq in 0..n as u16 {
        std::thread::sleep(Duration::from_millis(10));
        let mut pkt = [0u8; 64];
        pkt[0] = 8;
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let t0 = realtime_ns();
        // SAFETY: pkt and `to` are live for the call.
        let r = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if let Some((_, tx)) = recv_packet(fd, &mut eb, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) {
            if tx > t0 {
                lags.push((tx - t0) as f64 / 1000.0);
            }
        }
    }
    median(&lags).ok_or_else(|| "no transmit stamps".to_string())
}

/// Queues every echo request on this host with its kernel timestamp; read later.
struct Observer {
    fd: OwnedFd,
}

/// Echo requests the observer saw to sweep targets: count, first and last time.
#[derive(Debug, Default)]
struct Seen {
    count: usize,
    first_ns: u64,
    last_ns: u64,
}

impl Seen {
    fn rate(&self) -> Option<f64> {
        (self.count > 1 && self.last_ns > self.first_ns)
            .then(|| (self.count - 1) as f64 * 1e9 / (self.last_ns - self.first_ns) as f64)
    }
}

impl Observer {
    fn open() -> std::io::Result<Observer> {
        Ok(Observer {
            fd: raw_icmp_socket(8, 256 << 20)?,
        })
    }

    /// Reads everything queued; counts echo requests to sweep targets.
    fn drain(&self) -> Seen {
        let mut buf = [0u8; 256];
        let mut seen = Seen::default();
        while let Some((n, ts)) = recv_packet(self.fd.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT) {
            let p = &buf[..n.min(buf.len())];
            if p.len() < 28 || p[0] >> 4 != 4 {
                continue;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if p.get(ihl) != Some(&8) || !is_sweep_target(dst) {
                continue;
            }
            if seen.count == 0 || ts < seen.first_ns {
                seen.first_ns = ts;
            }
            seen.last_ns = seen.last_ns.max(ts);
            seen.count += 1;
        }
        seen
    }
}

// ---------------------------------------------------------------------------------
// fping.

struct Fping {
    wall_s: f64,
    alive: usize,
}

fn fping_sweep(fping: &std::path::Path, list: &std::path::Path) -> Result<Fping, String> {
    let t0 = Instant::now();
    let out = Command::new(fping)
        .args(["-i", "0", "-e", "-f"])
        .arg(list)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fping: {e}"))?;
    let wall_s = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let alive = text.lines().filter(|l| l.contains(" is alive")).count();
    Ok(Fping { wall_s, alive })
}

/// `fping -C n -p period -t timeout -q addr`: the per-probe RTTs in µs (lost ones,
/// printed "-", are left out).
fn fping_rtts(
    fping: &std::path::Path,
    addr: &str,
    n: u32,
    period_ms: u32,
    timeout_ms: u32,
) -> Result<Vec<f64>, String> {
    let out = Command::new(fping)
        .args(["-C", &n.to_string(), "-p", &period_ms.to_string()])
        .args(["-t", &timeout_ms.to_string(), "-q", addr])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with(addr))
        .ok_or_else(|| format!("no fping result in {text:?}"))?;
    let rtts = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    Ok(rtts)
}

// ---------------------------------------------------------------------------------
// The namespace with the 20 ms responder.

fn ip_program() -> std::path::PathBuf {
    program("ip").unwrap_or_else(|| "ip".into())
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new(ip_program())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace and veth pair of the bench's own; deleted on drop.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl Netns {
    /// Creates `imnbench-PID` with a veth pair on a /30 of 198.18.0.0/15 (the
    /// benchmarking range), and checks that the kernel routes the namespace's address
    /// through our veth.
    pub fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let idx = pid % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + idx * 4;
        let ns = Netns {
            name: format!("imnbench-{pid}"),
            host_if: format!("imnb{pid}h"),
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
        };
        let peer = format!("imnb{pid}n");
        remove_stale_namespaces();
        ip(&["netns", "add", &ns.name])?;
        // From here on, dropping `ns` deletes what was made.
        let host_cidr = format!("{}/30", ns.host_addr);
        let ns_cidr = format!("{}/30", ns.ns_addr);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &ns.name,
        ])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &ns_cidr, "dev", &peer])?;
        ip(&["-n", &ns.name, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        // The kernel of the namespace must not answer: the responder does.
        let st = Command::new(ip_program())
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .arg("net.ipv4.icmp_echo_ignore_all=1")
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("sysctl in {}: {e}", ns.name))?;
        if !st.success() {
            return Err(format!("cannot set icmp_echo_ignore_all in {}", ns.name));
        }
        ns.check_route()?;
        Ok(ns)
    }

    /// Fails unless the route to the namespace's address uses our own veth.
    pub fn check_route(&self) -> Result<(), String> {
        let ns_addr = self.ns_addr.to_string();
        let route = ip(&["route", "get", &ns_addr])?;
        let dev = route
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or("");
        if dev != self.host_if || route.split_whitespace().next() != Some(ns_addr.as_str()) {
            return Err(format!(
                "refusing to send: the route to {ns_addr} is {:?}, not via {}",
                route.trim(),
                self.host_if
            ));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it ours.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Deletes `imnbench-PID` namespaces left by bench runs that were killed (their PID
/// is gone), and with them their veth pairs.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("imnbench-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// A thread inside the namespace answering echo requests from `peer` after exactly
/// `delay_ns` (counted from the kernel's receive timestamp), with a raw socket. The
/// delay can be changed while it runs ([`Responder::set_delay`]): a path whose
/// latency shifts at a known time. The namespace's kernel must not answer echo
/// requests itself (`net.ipv4.icmp_echo_ignore_all=1`, as [`Netns::create`] sets).
pub struct Responder {
    stop: Arc<AtomicBool>,
    delay_ns: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<Answered, String>>>,
}

/// What the responder did.
#[derive(Debug, Default)]
pub struct Answered {
    pub replies: u64,
    /// Per reply: when it left (the kernel's transmit stamp) minus when it was due, in
    /// ns; empty if the kernel gave no transmit stamps.
    pub lateness_ns: Vec<i64>,
}

impl Responder {
    pub fn start(ns: &Netns, delay_ns: u64) -> Result<Responder, String> {
        Responder::start_in(&ns.name, ns.ns_addr, ns.host_addr, delay_ns)
    }

    /// A responder in namespace `ns_name` (under /run/netns) answering requests from
    /// `peer` to `me`.
    pub fn start_in(
        ns_name: &str,
        me: Ipv4Addr,
        peer: Ipv4Addr,
        delay_ns: u64,
    ) -> Result<Responder, String> {
        let path = format!("/run/netns/{ns_name}");
        let nsfile = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let delay = Arc::new(AtomicU64::new(delay_ns));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let stop2 = stop.clone();
        let delay2 = delay.clone();
        let thread = std::thread::Builder::new()
            .name("imn-bench-responder".into())
            .spawn(move || {
                // Only this thread enters the namespace.
                // SAFETY: setns on a descriptor we own.
                if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = format!("setns: {}", std::io::Error::last_os_error());
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
                let sock = match raw_icmp_socket(8, 4 << 20) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("responder socket: {e}")));
                        return Err(e.to_string());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                respond(&sock, me, peer, &delay2, &stop2)
            })
            .map_err(|e| e.to_string())?;
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Responder {
                stop,
                delay_ns: delay,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the responder did not start".into()),
        }
    }

    /// From now on, requests are answered after `delay_ns`.
    pub fn set_delay(&self, delay_ns: u64) {
        self.delay_ns.store(delay_ns, Ordering::SeqCst);
    }

    /// Stops the responder; returns what it did.
    pub fn stop(mut self) -> Result<Answered, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the responder panicked".into()),
            None => Ok(Answered::default()),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn respond(
    sock: &OwnedFd,
    me: Ipv4Addr,
    peer: Ipv4Addr,
    delay_ns: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Answered, String> {
    // The responder is the reference clock of the test: precise sleeps, and a real-time
    // priority (best effort) so that other work on the machine does not delay replies.
    // SAFETY: prctl and sched_setscheduler on the calling thread, plain arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        let param = libc::sched_param { sched_priority: 10 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
    }
    let fd = sock.as_raw_fd();
    // The kernel's transmit stamp of each reply tells when it really left: the
    // responder learns how long its own sendto takes to reach the wire and starts
    // that much early, so that replies leave at the due time.
    let tx_stamps = setsockopt(fd, libc::SOL_SOCKET, SO_TIMESTAMPING, &TX_STAMP_FLAGS).is_ok();
    let mut lead_ns: i64 = 0;
    let mut pending: std::collections::VecDeque<(u64, Vec<u8>)> = Default::default();
    let mut buf = vec![0u8; 65_536];
    let mut done = Answered::default();
    // SAFETY: all-zero sockaddr_in is valid; fields set below.
    let mut to: libc::sockaddr_in = unsafe { zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from(peer).to_be();
    while !stop.load(Ordering::Relaxed) {
        // Wait for a request, or until shortly before the next reply is due.
        let now = realtime_ns();
        let timeout_ms = match pending.front() {
            Some((due, _)) if *due <= now + 2_000_000 => 0,
            Some((due, _)) => ((due - now) / 1_000_000 - 1).min(50) as i32,
            None => 50,
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            while let Some((n, ts)) = recv_packet(fd, &mut buf, libc::MSG_DONTWAIT) {
                let p = &buf[..n.min(buf.len())];
                if p.len() < 28 || p[0] >> 4 != 4 {
                    continue;
                }
                let ihl = usize::from(p[0] & 0x0f) * 4;
                let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
                // Answer only echo requests from the bench's own veth address.
                if src != peer || dst != me || p.len() < ihl + 8 || p[ihl] != 8 || p[ihl + 1] != 0 {
                    continue;
                }
                let mut reply = p[ihl..].to_vec();
                reply[0] = 0;
                reply[2] = 0;
                reply[3] = 0;
                let c = checksum(&reply);
                reply[2..4].copy_from_slice(&c.to_be_bytes());
                let rx = if ts > 0 { ts } else { realtime_ns() };
                // In due order, so a delay lowered mid-run holds nothing back.
                let due = rx + delay_ns.load(Ordering::Relaxed);
                let at = pending.partition_point(|(d, _)| *d <= due);
                pending.insert(at, (due, reply));
            }
        }
        // Send what is due, spinning for the last stretch to hit it exactly.
        while let Some((due, _)) = pending.front() {
            let due = *due;
            let start_at = due.saturating_sub(lead_ns.max(0) as u64);
            let now = realtime_ns();
            if start_at > now + 2_000_000 {
                break;
            }
            if start_at > now + 300_000 {
                std::thread::sleep(Duration::from_nanos(start_at - now - 200_000));
            }
            while realtime_ns() < start_at {}
            let (_, reply) = pending.pop_front().expect("front exists");
            // SAFETY: reply and `to` are live for the call.
            let r = unsafe {
                libc::sendto(
                    fd,
                    reply.as_ptr().cast(),
                    reply.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r < 0 {
                continue;
            }
            done.replies += 1;
            if tx_stamps {
                // veth stamps the packet inside sendto: the stamp is queued already.
                let mut eb = [0u8; 64];
                if let Some((_, tx)) =
                    recv_packet(fd, &mut eb, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
                {
                    if tx > 0 {
                        let late = tx as i64 - due as i64;
                        done.lateness_ns.push(late);
                        lead_ns = (lead_ns + late / 2).clamp(0, 500_000);
                    }
                }
            }
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------
// The scenario.

/// Runs the scenario and returns its JSON summary.
pub async fn run(opts: Options) -> Value {
    let mut notes: Vec<String> = Vec::new();
    let mut zero_rtts = 0usize;
    // Warm up: the engine, its threads and the runtime exist before anything is timed.
    if let Err(e) = ping(r#"{"host": "127.0.0.1", "count": 1, "timeout_ms": 1000}"#).await {
        return json!({"scenario": "ping", "error": e});
    }
    let fping = program("fping");
    if fping.is_none() {
        notes.push("fping is not installed: no comparison".into());
    }

    // ---- The paced sweep.
    let targets: Vec<String> = (0..opts.targets)
        .map(|i| sweep_target(i).to_string())
        .collect();
    let params = json!({
        "targets": targets,
        "count": 1,
        "timeout_ms": 1000,
        "interval_ms": 1000,
        "rate": opts.rate,
    })
    .to_string();
    let observer = Observer::open()
        .map_err(|e| notes.push(format!("no observer socket ({e}): no on-wire rate")))
        .ok();
    if let Some(o) = &observer {
        o.drain();
    }
    let rss_before = status_kib("VmRSS:").unwrap_or(0);
    let peak_reset = reset_peak_rss();
    let cpu0 = cpu_us();
    let t0 = Instant::now();
    let sweep = ping(&params).await;
    let sweep_wall = t0.elapsed().as_secs_f64();
    let sweep_cpu_us = cpu_us() - cpu0;
    let rss_peak = status_kib("VmHWM:").unwrap_or(0);
    let rss_after = status_kib("VmRSS:").unwrap_or(0);
    let seen = observer.as_ref().map(Observer::drain).unwrap_or_default();
    let sweep = match sweep {
        Ok(s) => s,
        Err(e) => return json!({"scenario": "ping", "error": e}),
    };
    // ---- The same sweep under a policy of the agent's (what its check costs).
    let policy = policy_cost(&params, opts.targets)
        .await
        .unwrap_or_else(|e| json!({"error": e}));
    drop(params);
    let rtts = rtts_us(&sweep);
    zero_rtts += rtts.iter().flatten().filter(|r| **r <= 0.0).count();
    let mut got: Vec<f64> = rtts.iter().flatten().copied().collect();
    got.sort_by(f64::total_cmp);
    let replies = got.len();
    let probes_per_s = seen.rate();
    if seen.count != opts.targets && observer.is_some() {
        notes.push(format!(
            "the observer saw {} of {} requests",
            seen.count, opts.targets
        ));
    }
    let rss_kib = if peak_reset {
        rss_peak.saturating_sub(rss_before)
    } else {
        rss_after.saturating_sub(rss_before)
    };
    let our_wall_rate = opts.targets as f64 / sweep_wall;

    // ---- fping on the same list.
    let (mut fping_rate, mut fping_wire, mut fping_alive) = (None, None, None);
    if let Some(f) = &fping {
        let dir = TempDir::new("bench-ping");
        let list = dir.path().join("targets.txt");
        let write = std::fs::File::create(&list).and_then(|mut w| {
            for t in &targets {
                writeln!(w, "{t}")?;
            }
            Ok(())
        });
        if let Some(o) = &observer {
            o.drain();
        }
        match write
            .map_err(|e| e.to_string())
            .and_then(|_| fping_sweep(f, &list))
        {
            Ok(r) => {
                fping_rate = Some(opts.targets as f64 / r.wall_s);
                fping_alive = Some(r.alive);
                fping_wire = observer.as_ref().and_then(|o| o.drain().rate());
            }
            Err(e) => notes.push(e),
        }
    }
    drop(observer);
    drop(targets);

    // ---- Median RTT to 127.0.0.1, ours and fping's, n probes 10 ms apart each, in the
    // order ours, fping, fping, ours so that a drift of the machine's state weighs on
    // both alike. (Not at the same time: fping's raw socket has no ICMP filter, so it
    // would take a copy of each of our requests, and wake up, inside our RTTs.)
    let n = opts.accuracy_probes;
    let acc_params = json!({
        "host": "127.0.0.1", "count": n, "interval_ms": 10, "timeout_ms": 1000,
    })
    .to_string();
    let (mut ours_acc, mut fping_acc) = (Vec::new(), Vec::new());
    for turn in ["ours", "fping", "fping", "ours"] {
        if turn == "ours" {
            match ping(&acc_params).await {
                Ok(o) => {
                    let r = rtts_us(&o);
                    zero_rtts += r.iter().flatten().filter(|x| **x <= 0.0).count();
                    ours_acc.extend(r.into_iter().flatten());
                }
                Err(e) => notes.push(format!("accuracy run: {e}")),
            }
        } else if let Some(f) = &fping {
            match fping_rtts(f, "127.0.0.1", n, 10, 1000) {
                Ok(v) => fping_acc.extend(v),
                Err(e) => notes.push(e),
            }
        }
    }
    let median_rtt = median(&ours_acc);
    let fping_median = median(&fping_acc);

    // Where the engine's median and fping's may differ: the engine starts the clock
    // at the kernel's transmit stamp, fping before its sendto.
    let send_path = send_path_us(n)
        .map_err(|e| notes.push(format!("send path: {e}")))
        .ok();

    // ---- The 20 ms responder in a namespace of our own.
    let mut delay = json!(null);
    let mut delay_p99 = None;
    match responder_run(&opts, fping.as_deref()).await {
        Ok((v, zeros, p99)) => {
            zero_rtts += zeros;
            delay = v;
            delay_p99 = p99;
        }
        Err(e) => notes.push(format!("responder: {e}")),
    }

    let rate_error_pct = probes_per_s.map(|r| (r - opts.rate).abs() / opts.rate * 100.0);
    json!({
        "scenario": "ping",
        "socket": sweep.socket,
        "targets": opts.targets,
        "requested_rate": opts.rate,
        "probes_per_s": opt_round(probes_per_s),
        "rate_error_pct": rate_error_pct.map(|e| (e * 1000.0).round() / 1000.0),
        "replies": replies,
        "lost": opts.targets - replies,
        "rtt_p50_us": opt_round(percentile(&got, 50.0)),
        "rtt_p99_us": opt_round(percentile(&got, 99.0)),
        "sweep_wall_s": (sweep_wall * 1e4).round() / 1e4,
        "cpu_us_per_probe": (sweep_cpu_us / opts.targets.max(1) as f64 * 100.0).round() / 100.0,
        "wall_probes_per_s": round1(our_wall_rate),
        "fping_probes_per_s": opt_round(fping_rate),
        "fping_wire_probes_per_s": opt_round(fping_wire),
        "fping_alive": fping_alive,
        "ratio_vs_fping": fping_rate.map(|f| (our_wall_rate / f * 1000.0).round() / 1000.0),
        "ratio_vs_fping_wire": match (probes_per_s, fping_wire) {
            (Some(a), Some(b)) => json!((a / b * 1000.0).round() / 1000.0),
            _ => Value::Null,
        },
        "median_rtt_us": opt_round(median_rtt),
        "fping_median_rtt_us": opt_round(fping_median),
        "median_diff_us": match (median_rtt, fping_median) {
            (Some(a), Some(b)) => json!(round1(a - b)),
            _ => Value::Null,
        },
        "send_path_us": opt_round(send_path),
        "delay_error_p99_us": opt_round(delay_p99),
        "delay": delay,
        "policy_check": policy,
        "agent_rss_kib": rss_kib,
        "agent_rss_kind": if peak_reset {
            "peak RSS growth during the sweep (VmHWM reset before, minus VmRSS before)"
        } else {
            "RSS growth across the sweep (VmRSS after minus before)"
        },
        "bytes_per_target": (rss_kib as f64 * 1024.0 / opts.targets.max(1) as f64).round(),
        "zero_rtts": zero_rtts,
        "notes": notes,
    })
}

/// Pings the 20 ms responder (ours, and fping's for reference). Returns the JSON
/// details, the number of zero RTTs, and the p99 error in µs.
async fn responder_run(
    opts: &Options,
    fping: Option<&std::path::Path>,
) -> Result<(Value, usize, Option<f64>), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root for a network namespace".into());
    }
    if program("ip").is_none() {
        return Err("iproute2 (ip) is not installed".into());
    }
    let ns = Netns::create()?;
    let responder = Responder::start(&ns, RESPONDER_DELAY_NS)?;
    // Checked again right before sending.
    ns.check_route()?;
    let addr = ns.ns_addr.to_string();
    let n = opts.responder_probes;
    let params = json!({
        "host": addr, "count": n, "interval_ms": 10, "timeout_ms": 1000,
    })
    .to_string();
    let out = ping(&params).await;
    let fping_err = match fping {
        Some(f) => {
            ns.check_route()?;
            fping_rtts(f, &addr, n.min(50), 10, 1000).ok()
        }
        None => None,
    };
    let answered = responder.stop()?;
    drop(ns);
    let out = out?;
    let rtts: Vec<f64> = rtts_us(&out).into_iter().flatten().collect();
    let zeros = rtts.iter().filter(|r| **r <= 0.0).count();
    let target_us = RESPONDER_DELAY_NS as f64 / 1000.0;
    let mut err: Vec<f64> = rtts.iter().map(|r| (r - target_us).abs()).collect();
    err.sort_by(f64::total_cmp);
    let p99 = percentile(&err, 99.0);
    // Our error against when each reply really left the responder (its transmit
    // stamp): the engine's own error, with the responder's lateness taken out. Our
    // probes are the responder's first replies (fping runs after).
    let per_probe = rtts_us(&out);
    let mut vs_departure: Vec<f64> = Vec::new();
    if per_probe.iter().all(Option::is_some) && answered.lateness_ns.len() >= per_probe.len() {
        vs_departure = per_probe
            .iter()
            .flatten()
            .zip(&answered.lateness_ns)
            .map(|(r, l)| (r - target_us - *l as f64 / 1000.0).abs())
            .collect();
        vs_departure.sort_by(f64::total_cmp);
    }
    let fping_p99 = fping_err.map(|v| {
        let mut e: Vec<f64> = v.iter().map(|r| (r - target_us).abs()).collect();
        e.sort_by(f64::total_cmp);
        percentile(&e, 99.0)
    });
    // How exact the reference itself was (|left - due|), first replies excluded while
    // the responder learns its sendto latency.
    let mut late: Vec<f64> = answered
        .lateness_ns
        .iter()
        .skip(5)
        .map(|l| l.unsigned_abs() as f64 / 1000.0)
        .collect();
    late.sort_by(f64::total_cmp);
    let v = json!({
        "probes": n,
        "replies": rtts.len(),
        "responder_replies": answered.replies,
        "responder_lateness_p50_us": opt_round(percentile(&late, 50.0)),
        "responder_lateness_p99_us": opt_round(percentile(&late, 99.0)),
        "rtt_median_us": opt_round(median(&rtts)),
        "error_p50_us": opt_round(percentile(&err, 50.0)),
        "error_p99_us": opt_round(p99),
        "error_max_us": opt_round(err.last().copied()),
        "error_vs_departure_p50_us": opt_round(percentile(&vs_departure, 50.0)),
        "error_vs_departure_p99_us": opt_round(percentile(&vs_departure, 99.0)),
        "fping_error_p99_us": opt_round(fping_p99.flatten()),
    });
    Ok((v, zeros, p99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_targets_stay_in_loopback() {
        for i in [0usize, 1, 249, 250, 9_999, 62_499, 62_500, 65_535] {
            let a = sweep_target(i);
            assert!(a.is_loopback() && is_sweep_target(a), "{a}");
            assert_ne!(a.octets()[3], 0);
        }
        assert_eq!(sweep_target(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(sweep_target(250), Ipv4Addr::new(127, 1, 1, 1));
        let all: std::collections::HashSet<_> = (0..65_536).map(sweep_target).collect();
        assert_eq!(all.len(), 65_536);
    }
}
