//! The host interface, version 1: what a WebAssembly module may ask of the agent.
//! Every function is in import module `imn`. Pointers and lengths are i32 offsets into
//! the guest's memory; text is UTF-8. A negative return is an error code
//! (`last_error` has its message); a call that would pass one of the run's limits
//! does not return: the run ends as `failed`, naming the limit.
//!
//! Everything a guest passes is bounded before it is used: names at [`MAX_NAME`]
//! bytes, one send or receive at [`MAX_IO`], log lines at [`MAX_LOG`], parameters of
//! a built-in call at [`MAX_CALL`], the result at `imn_proto::wasm::MAX_RESULT`.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imn_proto::wasm::Limits;
use serde_json::Value;
use wasmi::core::{LimiterError, ResourceLimiter};
use wasmi::{Caller, Error, Linker, Memory};

use super::Stop;
use crate::Context;

pub const POLICY_DENIED: i32 = -1;
pub const TIMEOUT: i32 = -2;
pub const IO: i32 = -3;
pub const INVALID: i32 = -4;
pub const TOO_SMALL: i32 = -5;
pub const UNAVAILABLE: i32 = -6;
pub const NOT_FOUND: i32 = -7;

/// A host name or address, at most.
const MAX_NAME: usize = 253;
/// One send or receive, at most.
const MAX_IO: usize = 64 * 1024;
/// One log line, at most (longer ones are cut).
const MAX_LOG: usize = 1024;
/// Log lines a run may write; later ones are counted, not written.
const MAX_LOG_LINES: u32 = 100;
/// Parameters of a `ping` or `http` call, at most.
const MAX_CALL: usize = 16 * 1024;
/// Random bytes per call, at most.
const MAX_RANDOM: usize = 64 * 1024;
/// Refused addresses a run logs; later refusals are counted and summed up at its end.
pub(crate) const MAX_LOGGED_REFUSALS: u32 = 5;
/// A `ping` call's probes per second, at most (and when it names no rate).
const MAX_PING_RATE: f64 = 1000.0;
/// How often a blocking call looks at the run's cancel flag.
const SLICE: Duration = Duration::from_millis(100);
/// Fuel every host call costs, and per byte it copies (1 per 16): a loop of cheap
/// calls still runs out of fuel, and meets its deadline at the next slice.
const CALL_FUEL: u64 = 1_000;

/// Every function of the interface with its signature, as documented in
/// `docs/wasm-modules.md`; a module importing anything else is refused when loaded.
pub const FUNCTIONS: &[(&str, &str)] = &[
    ("params", "(ptr, cap) -> len"),
    ("deadline_ms", "() -> i64 ms left"),
    ("clock_mono_ns", "() -> i64"),
    ("clock_wall_ms", "() -> i64"),
    ("random", "(ptr, len) -> 0 | error"),
    ("log", "(level, ptr, len) -> 0"),
    (
        "resolve",
        "(name_ptr, name_len, out_ptr, out_cap) -> len | error",
    ),
    (
        "tcp_connect",
        "(host_ptr, host_len, port, timeout_ms) -> handle | error",
    ),
    ("udp_open", "(host_ptr, host_len, port) -> handle | error"),
    ("send", "(handle, ptr, len) -> sent | error"),
    ("recv", "(handle, ptr, cap, timeout_ms) -> received | error"),
    ("close", "(handle) -> 0 | error"),
    (
        "ping",
        "(params_ptr, params_len, out_ptr, out_cap) -> len | error",
    ),
    (
        "http",
        "(params_ptr, params_len, out_ptr, out_cap) -> len | error",
    ),
    ("result", "(ptr, len) -> 0 | error"),
    (
        "last_error",
        "(ptr, cap) -> the message's length (as much as fits is written)",
    ),
];

/// Memory growth within the run's pages; the first refusal is remembered so the
/// run's error names the limit, whatever the guest does after.
pub(crate) struct Limiter {
    pub max_pages: u32,
    pub denied_pages: Option<u64>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        let pages = (desired / 65536) as u64;
        if pages > u64::from(self.max_pages) {
            self.denied_pages.get_or_insert(pages);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        Ok(desired <= 10_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

enum Socket {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

/// One run's state, owned by its wasmi store.
pub(crate) struct State {
    limits: Limits,
    params: String,
    pub deadline: Instant,
    started: Instant,
    pub cancel: Arc<AtomicBool>,
    rt: tokio::runtime::Handle,
    ctx: Context,
    module: String,
    pub memory: Option<Memory>,
    pub limiter: Limiter,
    sockets: Vec<Option<Socket>>,
    open: u32,
    bytes_sent: u64,
    packets_sent: u64,
    pub result: Option<String>,
    /// The output of the last `ping` or `http` call that did not fit the guest's
    /// buffer, with its call and parameters: the same call again gets it, not a new run.
    pending: Option<(&'static str, String, String)>,
    /// Addresses refused by the policy in this run.
    pub refusals: u32,
    last_error: String,
    last_log: String,
    log_lines: u32,
}

impl State {
    pub fn new(
        limits: Limits,
        params: String,
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        rt: tokio::runtime::Handle,
        ctx: Context,
        module: String,
    ) -> State {
        State {
            limiter: Limiter {
                max_pages: limits.memory_pages,
                denied_pages: None,
            },
            limits,
            params,
            deadline,
            started: Instant::now(),
            cancel,
            rt,
            ctx,
            module,
            memory: None,
            sockets: Vec::new(),
            open: 0,
            bytes_sent: 0,
            packets_sent: 0,
            result: None,
            pending: None,
            refusals: 0,
            last_error: String::new(),
            last_log: String::new(),
            log_lines: 0,
        }
    }

    /// The run's last log line and last host error, for a failed run's message.
    pub fn last_words(&self) -> String {
        let mut s = String::new();
        if !self.last_log.is_empty() {
            s.push_str(&format!(" (last log: {})", self.last_log));
        }
        if !self.last_error.is_empty() {
            s.push_str(&format!(" (last host error: {})", self.last_error));
        }
        s
    }

    pub fn past_deadline(&self) -> String {
        format!(
            "limit deadline: the run passed its deadline after {} ms",
            self.started.elapsed().as_millis()
        )
    }

    /// Time left before the deadline; a run cancelled or past it stops here.
    fn left(&self) -> Result<Duration, Error> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(stop("cancelled".into()));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(stop(self.past_deadline()));
        }
        Ok(left)
    }

    fn fail(&mut self, code: i32, message: impl Into<String>) -> i32 {
        self.last_error = message.into();
        code
    }

    /// Counts what a call is about to send; past a limit the run ends.
    fn spend(&mut self, packets: u64, bytes: u64) -> Result<(), Error> {
        let p = self.packets_sent.saturating_add(packets);
        if p > self.limits.packets_sent {
            return Err(stop(format!(
                "limit packets_sent: the run would send more than {} packets",
                self.limits.packets_sent
            )));
        }
        let b = self.bytes_sent.saturating_add(bytes);
        if b > self.limits.bytes_sent {
            return Err(stop(format!(
                "limit bytes_sent: the run would send more than {} bytes",
                self.limits.bytes_sent
            )));
        }
        self.packets_sent = p;
        self.bytes_sent = b;
        Ok(())
    }

    /// Runs a future on the agent's runtime and waits for it, at most until the
    /// deadline (`None` then).
    fn block<F>(&self, fut: F) -> Result<Option<F::Output>, Error>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let left = self.left()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cancel = self.cancel.clone();
        self.rt.spawn(async move {
            // A cancelled run stops waiting (and drops the call) within a slice.
            let cancelled = async {
                while !cancel.load(Ordering::SeqCst) {
                    tokio::time::sleep(SLICE).await;
                }
            };
            let out = tokio::select! {
                out = tokio::time::timeout(left, fut) => out.ok(),
                () = cancelled => None,
            };
            let _ = tx.send(out);
        });
        let out = rx.blocking_recv().ok().flatten();
        self.left()?;
        Ok(out)
    }

    /// The address a run sends to: a literal, or the first address of a name as the
    /// agent's resolver gives it; then the policy's check.
    fn destination(&mut self, host: &str) -> Result<Result<IpAddr, i32>, Error> {
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                // The lookup's queries count as the run's packets.
                self.spend(2, 2 * (host.len() as u64 + 40))?;
                let name = host.to_string();
                match self.block(async move { crate::resolve(&name).await })? {
                    Some(Ok(ip)) => ip,
                    Some(Err(e)) => return Ok(Err(self.fail(NOT_FOUND, e))),
                    None => return Ok(Err(self.fail(TIMEOUT, "name resolution timed out"))),
                }
            }
        };
        // 0.0.0.0 and :: connect to the device itself: never a destination, whatever
        // the policy says of loopback.
        let unspecified = match ip {
            IpAddr::V4(v4) => v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_unspecified() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
            }
        };
        let denied = if unspecified {
            Err(format!(
                "{}: the unspecified address {ip} is not a destination",
                imn_proto::policy::DENIED_PREFIX
            ))
        } else {
            self.ctx.permit(host, ip)
        };
        if let Err(denied) = denied {
            self.refusals = self.refusals.saturating_add(1);
            if self.refusals <= MAX_LOGGED_REFUSALS {
                tracing::warn!(module = %self.module, %host, %ip, "WebAssembly module refused an address: {denied}");
            }
            return Ok(Err(self.fail(POLICY_DENIED, denied)));
        }
        Ok(Ok(ip))
    }

    fn add_socket(&mut self, s: Socket) -> Result<i32, Error> {
        if self.open >= self.limits.sockets {
            return Err(stop(format!(
                "limit sockets: the run would hold more than {} sockets",
                self.limits.sockets
            )));
        }
        self.open += 1;
        let slot = match self.sockets.iter().position(Option::is_none) {
            Some(i) => {
                self.sockets[i] = Some(s);
                i
            }
            None => {
                self.sockets.push(Some(s));
                self.sockets.len() - 1
            }
        };
        Ok(slot as i32)
    }

    fn socket(&mut self, handle: i32) -> Option<&mut Socket> {
        usize::try_from(handle)
            .ok()
            .and_then(|h| self.sockets.get_mut(h))
            .and_then(Option::as_mut)
    }

    /// Runs a built-in module for the guest (`ping`, `http`) with the run's policy.
    fn builtin(
        &mut self,
        module: &'static str,
        params: &str,
    ) -> Result<Result<String, i32>, Error> {
        let v: Value = match serde_json::from_str(params) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Ok(Err(self.fail(
                    INVALID,
                    format!("{module}: parameters must be a JSON object"),
                )))
            }
        };
        // What the call sends, counted before it runs, from the parameters as the
        // module will read them.
        let mut v = v;
        let (packets, bytes) = match module {
            "ping_module" => {
                let p: imn_proto::params::PingParams = match serde_json::from_value(v.clone()) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(self.fail(INVALID, format!("ping: {e}")))),
                };
                if p.host.is_some() && p.targets.is_some() {
                    return Ok(Err(
                        self.fail(INVALID, "ping: give host or targets, not both")
                    ));
                }
                let packets = (p.target_list().len() as u64).saturating_mul(u64::from(p.count));
                let rate = p.rate.unwrap_or(MAX_PING_RATE).min(MAX_PING_RATE);
                v["rate"] = Value::from(rate);
                (
                    packets,
                    packets.saturating_mul(u64::from(p.size).saturating_add(28)),
                )
            }
            _ => {
                let p: imn_proto::kinds::http::HttpParams = match serde_json::from_value(v.clone())
                {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(self.fail(INVALID, format!("http: {e}")))),
                };
                // Each request (the first and every redirect it may follow): its line
                // and headers.
                let requests = 1 + if p.follow_redirects {
                    u64::from(p.max_redirects)
                } else {
                    0
                };
                let head = p
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
                    .saturating_add(p.url.len() + 512) as u64;
                (requests, requests.saturating_mul(head))
            }
        };
        self.spend(packets, bytes)?;
        let ctx = self.ctx.clone();
        let params = v.to_string();
        match self.block(async move { crate::run(module, &params, &ctx).await })? {
            Some(Ok(out)) => Ok(Ok(out.to_json().to_string())),
            Some(Err(e)) => Ok(Err(self.fail(IO, e))),
            None => Ok(Err(
                self.fail(TIMEOUT, format!("{module}: the run's deadline came first"))
            )),
        }
    }
}

fn stop(why: String) -> Error {
    Error::host(Stop(why))
}

/// What every host call does first: stop a run that was cancelled or passed its
/// deadline, and charge its fuel ([`CALL_FUEL`], and 1 per 16 bytes it copies).
fn enter(c: &mut Caller<'_, State>, bytes: usize) -> Result<(), Error> {
    c.data().left()?;
    let cost = CALL_FUEL.saturating_add(bytes as u64 / 16);
    if let Ok(fuel) = c.get_fuel() {
        // Past the slice's fuel, the next instruction stops and the run loop looks
        // at the deadline and the limit.
        c.set_fuel(fuel.saturating_sub(cost))?;
    }
    Ok(())
}

fn cancelled() -> std::io::Error {
    std::io::Error::new(ErrorKind::Interrupted, "the run was cancelled")
}

/// A TCP connection within `wait`, looking at `cancel` every [`SLICE`].
fn connect(addr: SocketAddr, wait: Duration, cancel: &AtomicBool) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::AsRawFd;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == ErrorKind::WouldBlock =>
        {
            let until = Instant::now() + wait;
            loop {
                if cancel.load(Ordering::SeqCst) {
                    return Err(cancelled());
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                let mut pfd = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = left.min(SLICE).as_millis().clamp(1, 1000) as libc::c_int;
                // SAFETY: one pollfd of ours, alive for the call.
                let n = unsafe { libc::poll(&mut pfd, 1, ms) };
                if n > 0 {
                    break;
                }
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            if let Some(e) = sock.take_error()? {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    sock.set_nonblocking(false)?;
    Ok(sock.into())
}

/// Repeats `op` (a read or write with the socket's timeout set to at most a slice)
/// until it does something, `wait` passes, or the run is cancelled.
fn sliced<T>(
    wait: Duration,
    cancel: &AtomicBool,
    mut op: impl FnMut(Duration) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let until = Instant::now() + wait;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(cancelled());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        match op(left.min(SLICE).max(Duration::from_millis(1))) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            r => return r,
        }
    }
}

/// Reads `len` bytes at `ptr` of the guest's memory, at most `max`.
fn read(caller: &Caller<'_, State>, ptr: i32, len: i32, max: usize) -> Option<Vec<u8>> {
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    if len > max {
        return None;
    }
    let mem = caller.data().memory?;
    let mut buf = vec![0; len];
    mem.read(caller, ptr, &mut buf).ok()?;
    Some(buf)
}

fn read_str(caller: &Caller<'_, State>, ptr: i32, len: i32, max: usize) -> Option<String> {
    String::from_utf8(read(caller, ptr, len, max)?).ok()
}

/// Writes `bytes` at `ptr` if they fit in `cap`: their length, or an error code.
fn write_out(caller: &mut Caller<'_, State>, ptr: i32, cap: i32, bytes: &[u8]) -> i32 {
    let Ok(ptr) = usize::try_from(ptr) else {
        return caller.data_mut().fail(INVALID, "negative pointer");
    };
    if bytes.len() > usize::try_from(cap).unwrap_or(0) {
        let n = bytes.len();
        return caller
            .data_mut()
            .fail(TOO_SMALL, format!("needs {n} bytes"));
    }
    let Some(mem) = caller.data().memory else {
        return INVALID;
    };
    match mem.write(&mut *caller, ptr, bytes) {
        Ok(()) => i32::try_from(bytes.len()).unwrap_or(i32::MAX),
        Err(_) => caller
            .data_mut()
            .fail(INVALID, "the buffer is outside the module's memory"),
    }
}

fn invalid(caller: &mut Caller<'_, State>, what: &str) -> i32 {
    caller.data_mut().fail(INVALID, what.to_string())
}

fn io_code(e: &std::io::Error) -> i32 {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => TIMEOUT,
        _ => IO,
    }
}

/// Defines every function of [`FUNCTIONS`] in `linker`.
pub(crate) fn define(linker: &mut Linker<State>) -> Result<(), Error> {
    linker.func_wrap(
        "imn",
        "params",
        |mut c: Caller<'_, State>, ptr: i32, cap: i32| -> Result<i32, Error> {
            let p = c.data().params.clone().into_bytes();
            enter(&mut c, p.len())?;
            let n = i32::try_from(p.len()).unwrap_or(i32::MAX);
            if p.len() > usize::try_from(cap).unwrap_or(0) {
                return Ok(n);
            }
            Ok(write_out(&mut c, ptr, cap, &p))
        },
    )?;
    linker.func_wrap(
        "imn",
        "deadline_ms",
        |mut c: Caller<'_, State>| -> Result<i64, Error> {
            enter(&mut c, 0)?;
            let s = c.data();
            Ok(s.deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as i64)
        },
    )?;
    linker.func_wrap(
        "imn",
        "clock_mono_ns",
        |mut c: Caller<'_, State>| -> Result<i64, Error> {
            enter(&mut c, 0)?;
            Ok(i64::try_from(c.data().started.elapsed().as_nanos()).unwrap_or(i64::MAX))
        },
    )?;
    linker.func_wrap(
        "imn",
        "clock_wall_ms",
        |mut c: Caller<'_, State>| -> Result<i64, Error> {
            enter(&mut c, 0)?;
            Ok(imn_proto::now_ms())
        },
    )?;
    linker.func_wrap(
        "imn",
        "random",
        |mut c: Caller<'_, State>, ptr: i32, len: i32| -> Result<i32, Error> {
            enter(&mut c, len.clamp(0, MAX_RANDOM as i32) as usize)?;
            let Some(n) = usize::try_from(len).ok().filter(|&n| n <= MAX_RANDOM) else {
                return Ok(invalid(&mut c, "random: at most 65536 bytes a call"));
            };
            let mut buf = vec![0; n];
            if getrandom::getrandom(&mut buf).is_err() {
                return Ok(c.data_mut().fail(IO, "no random source"));
            }
            let r = write_out(&mut c, ptr, len, &buf);
            Ok(if r < 0 { r } else { 0 })
        },
    )?;
    linker.func_wrap(
        "imn",
        "log",
        |mut c: Caller<'_, State>, level: i32, ptr: i32, len: i32| -> Result<i32, Error> {
            let cut = len.clamp(0, MAX_LOG as i32);
            enter(&mut c, cut as usize)?;
            let Some(bytes) = read(&c, ptr, cut, MAX_LOG) else {
                return Ok(invalid(
                    &mut c,
                    "log: the line is outside the module's memory",
                ));
            };
            let line: String = String::from_utf8_lossy(&bytes)
                .chars()
                .map(|ch| if ch.is_control() { ' ' } else { ch })
                .collect();
            let s = c.data_mut();
            s.log_lines = s.log_lines.saturating_add(1);
            if s.log_lines <= MAX_LOG_LINES {
                let module = &s.module;
                match level {
                    3 => tracing::error!(%module, "wasm: {line}"),
                    2 => tracing::warn!(%module, "wasm: {line}"),
                    1 => tracing::info!(%module, "wasm: {line}"),
                    _ => tracing::debug!(%module, "wasm: {line}"),
                }
            }
            s.last_log = line;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        "imn",
        "resolve",
        |mut c: Caller<'_, State>, np: i32, nl: i32, op: i32, oc: i32| -> Result<i32, Error> {
            enter(&mut c, 0)?;
            let Some(name) = read_str(&c, np, nl, MAX_NAME) else {
                return Ok(invalid(
                    &mut c,
                    "resolve: the name must be 1 to 253 bytes of UTF-8",
                ));
            };
            // A lookup's queries (A and AAAA) count as the run's packets; a literal
            // sends none.
            if name.parse::<IpAddr>().is_err() {
                c.data_mut().spend(2, 2 * (name.len() as u64 + 40))?;
            }
            let looked = name.clone();
            let r = c
                .data()
                .block(async move { imn_resolver::lookup(&looked).await })?;
            let addrs = match r {
                Some(Ok(a)) if !a.is_empty() => a,
                Some(Ok(_)) => {
                    return Ok(c
                        .data_mut()
                        .fail(NOT_FOUND, format!("{name:?} has no address")))
                }
                Some(Err(e)) => return Ok(c.data_mut().fail(NOT_FOUND, e)),
                None => return Ok(c.data_mut().fail(TIMEOUT, "name resolution timed out")),
            };
            let text = addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            Ok(write_out(&mut c, op, oc, text.as_bytes()))
        },
    )?;
    linker.func_wrap(
        "imn",
        "tcp_connect",
        |mut c: Caller<'_, State>,
         hp: i32,
         hl: i32,
         port: i32,
         timeout_ms: i32|
         -> Result<i32, Error> {
            enter(&mut c, 0)?;
            let Some(host) = read_str(&c, hp, hl, MAX_NAME) else {
                return Ok(invalid(
                    &mut c,
                    "tcp_connect: the host must be 1 to 253 bytes of UTF-8",
                ));
            };
            let Ok(port) = u16::try_from(port) else {
                return Ok(invalid(&mut c, "tcp_connect: the port must be 0 to 65535"));
            };
            let s = c.data_mut();
            if s.open >= s.limits.sockets {
                return Err(stop(format!(
                    "limit sockets: the run would hold more than {} sockets",
                    s.limits.sockets
                )));
            }
            let ip = match s.destination(&host)? {
                Ok(ip) => ip,
                Err(code) => return Ok(code),
            };
            // The SYN is a packet.
            s.spend(1, 0)?;
            let wait = s
                .left()?
                .min(Duration::from_millis(timeout_ms.max(1) as u64));
            match connect(SocketAddr::new(ip, port), wait, &s.cancel) {
                Ok(t) => {
                    let _ = t.set_nodelay(true);
                    s.add_socket(Socket::Tcp(t))
                }
                Err(e) => {
                    s.left()?;
                    Ok(s.fail(io_code(&e), format!("connect to {ip}:{port}: {e}")))
                }
            }
        },
    )?;
    linker.func_wrap(
        "imn",
        "udp_open",
        |mut c: Caller<'_, State>, hp: i32, hl: i32, port: i32| -> Result<i32, Error> {
            enter(&mut c, 0)?;
            let Some(host) = read_str(&c, hp, hl, MAX_NAME) else {
                return Ok(invalid(
                    &mut c,
                    "udp_open: the host must be 1 to 253 bytes of UTF-8",
                ));
            };
            let Ok(port) = u16::try_from(port) else {
                return Ok(invalid(&mut c, "udp_open: the port must be 0 to 65535"));
            };
            let s = c.data_mut();
            if s.open >= s.limits.sockets {
                return Err(stop(format!(
                    "limit sockets: the run would hold more than {} sockets",
                    s.limits.sockets
                )));
            }
            let ip = match s.destination(&host)? {
                Ok(ip) => ip,
                Err(code) => return Ok(code),
            };
            let any: SocketAddr = if ip.is_ipv4() {
                "0.0.0.0:0".parse().expect("an address")
            } else {
                "[::]:0".parse().expect("an address")
            };
            let sock = UdpSocket::bind(any).and_then(|u| {
                u.connect(SocketAddr::new(ip, port))?;
                Ok(u)
            });
            match sock {
                Ok(u) => s.add_socket(Socket::Udp(u)),
                Err(e) => Ok(s.fail(IO, format!("udp to {ip}:{port}: {e}"))),
            }
        },
    )?;
    linker.func_wrap(
        "imn",
        "send",
        |mut c: Caller<'_, State>, h: i32, ptr: i32, len: i32| -> Result<i32, Error> {
            enter(&mut c, len.clamp(0, MAX_IO as i32) as usize)?;
            let Some(buf) = read(&c, ptr, len, MAX_IO) else {
                return Ok(invalid(
                    &mut c,
                    "send: at most 65536 bytes a call, inside the module's memory",
                ));
            };
            let s = c.data_mut();
            let left = s.left()?;
            if s.socket(h).is_none() {
                return Ok(s.fail(INVALID, format!("send: no socket {h}")));
            }
            s.spend(1, buf.len() as u64)?;
            let cancel = s.cancel.clone();
            let r = match s.socket(h) {
                // All of it, a slice at a time.
                Some(Socket::Tcp(t)) => {
                    let mut off = 0;
                    let mut r = Ok(());
                    while off < buf.len() {
                        match sliced(left, &cancel, |w| {
                            t.set_write_timeout(Some(w))?;
                            t.write(&buf[off..])
                        }) {
                            Ok(0) => r = Err(ErrorKind::WriteZero.into()),
                            Ok(n) => off += n,
                            Err(e) => r = Err(e),
                        }
                        if r.is_err() {
                            break;
                        }
                    }
                    r.map(|()| off)
                }
                Some(Socket::Udp(u)) => u.send(&buf),
                None => Err(ErrorKind::NotFound.into()),
            };
            s.left()?;
            Ok(match r {
                Ok(n) => n as i32,
                Err(e) => s.fail(io_code(&e), format!("send: {e}")),
            })
        },
    )?;
    linker.func_wrap(
        "imn",
        "recv",
        |mut c: Caller<'_, State>,
         h: i32,
         ptr: i32,
         cap: i32,
         timeout_ms: i32|
         -> Result<i32, Error> {
            let Some(cap) = usize::try_from(cap).ok().map(|n| n.min(MAX_IO)) else {
                return Ok(invalid(&mut c, "recv: negative capacity"));
            };
            enter(&mut c, cap)?;
            let s = c.data_mut();
            let wait = s
                .left()?
                .min(Duration::from_millis(timeout_ms.max(1) as u64));
            let mut buf = vec![0; cap];
            let cancel = s.cancel.clone();
            let r = match s.socket(h) {
                Some(Socket::Tcp(t)) => sliced(wait, &cancel, |w| {
                    t.set_read_timeout(Some(w))?;
                    t.read(&mut buf)
                }),
                Some(Socket::Udp(u)) => sliced(wait, &cancel, |w| {
                    u.set_read_timeout(Some(w))?;
                    u.recv(&mut buf)
                }),
                None => return Ok(s.fail(INVALID, format!("recv: no socket {h}"))),
            };
            s.left()?;
            match r {
                Ok(n) => Ok(write_out(&mut c, ptr, cap as i32, &buf[..n])),
                Err(e) => Ok(c.data_mut().fail(io_code(&e), format!("recv: {e}"))),
            }
        },
    )?;
    linker.func_wrap(
        "imn",
        "close",
        |mut c: Caller<'_, State>, h: i32| -> Result<i32, Error> {
            enter(&mut c, 0)?;
            let s = c.data_mut();
            let slot = usize::try_from(h).ok().and_then(|h| s.sockets.get_mut(h));
            Ok(match slot.and_then(Option::take) {
                Some(_) => {
                    s.open -= 1;
                    0
                }
                None => s.fail(INVALID, format!("close: no socket {h}")),
            })
        },
    )?;
    for (name, module) in [("ping", "ping_module"), ("http", "http")] {
        linker.func_wrap(
            "imn",
            name,
            move |mut c: Caller<'_, State>,
                  pp: i32,
                  pl: i32,
                  op: i32,
                  oc: i32|
                  -> Result<i32, Error> {
                enter(&mut c, pl.clamp(0, MAX_CALL as i32) as usize)?;
                if module == "http" && !crate::built_in("http") {
                    return Ok(c
                        .data_mut()
                        .fail(UNAVAILABLE, "http: not in this agent's build"));
                }
                let Some(params) = read_str(&c, pp, pl, MAX_CALL) else {
                    return Ok(invalid(
                        &mut c,
                        "parameters: at most 16384 bytes of UTF-8, inside the module's memory",
                    ));
                };
                // The output of this same call that did not fit last time.
                let kept = match c.data_mut().pending.take() {
                    Some((m, p, out)) if m == module && p == params => Some(out),
                    _ => None,
                };
                let json = match kept {
                    Some(out) => out,
                    None => match c.data_mut().builtin(module, &params)? {
                        Ok(json) => json,
                        Err(code) => return Ok(code),
                    },
                };
                let n = write_out(&mut c, op, oc, json.as_bytes());
                if n == TOO_SMALL {
                    c.data_mut().pending = Some((module, params, json));
                }
                Ok(n)
            },
        )?;
    }
    linker.func_wrap(
        "imn",
        "result",
        |mut c: Caller<'_, State>, ptr: i32, len: i32| -> Result<i32, Error> {
            enter(
                &mut c,
                len.clamp(0, imn_proto::wasm::MAX_RESULT as i32) as usize,
            )?;
            if usize::try_from(len).is_ok_and(|n| n > imn_proto::wasm::MAX_RESULT) {
                return Err(stop(format!(
                    "limit result: the result is {len} bytes, at most {} allowed",
                    imn_proto::wasm::MAX_RESULT
                )));
            }
            let Some(text) = read_str(&c, ptr, len, imn_proto::wasm::MAX_RESULT) else {
                return Ok(invalid(
                    &mut c,
                    "result: must be UTF-8 inside the module's memory",
                ));
            };
            let s = c.data_mut();
            if s.result.is_some() {
                return Ok(s.fail(INVALID, "result: a run emits one result"));
            }
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(_)) => {
                    s.result = Some(text);
                    Ok(0)
                }
                Ok(_) => Ok(s.fail(INVALID, "result: must be a JSON object")),
                Err(e) => Ok(s.fail(INVALID, format!("result: not JSON: {e}"))),
            }
        },
    )?;
    linker.func_wrap(
        "imn",
        "last_error",
        |mut c: Caller<'_, State>, ptr: i32, cap: i32| -> Result<i32, Error> {
            // Its length; as much as fits is written.
            let msg = c.data().last_error.clone().into_bytes();
            enter(&mut c, msg.len())?;
            let n = msg.len().min(usize::try_from(cap).unwrap_or(0));
            let Some(mem) = c.data().memory else {
                return Ok(0);
            };
            Ok(match usize::try_from(ptr) {
                Ok(p) if mem.write(&mut c, p, &msg[..n]).is_ok() => {
                    i32::try_from(msg.len()).unwrap_or(i32::MAX)
                }
                _ => INVALID,
            })
        },
    )?;
    Ok(())
}
