//! `imn-guest`: write an IMN measurement module in Rust.
//!
//! A module is a `cdylib` built for `wasm32-unknown-unknown` that the agent runs in its
//! wasmi interpreter. It imports the agent's host interface (module `"imn"`, ABI
//! version 1, raw in [`sys`]) and exports `memory` and `run() -> i32` (0 = success).
//! This crate wraps every import in a safe function, turns the host's negative return
//! codes into [`Error`]s (with the host's message from `last_error`), and provides the
//! [`entry!`] macro that exports `run`.
//!
//! ```no_run
//! use imn_guest::json::{ObjectWriter, Params};
//!
//! fn measure() -> Result<(), String> {
//!     let p = Params::load()?;
//!     p.only(&["host", "port"])?;
//!     let host = p.required_string("host", 253)?;
//!     let port = p.required_integer("port", 1, 65535)? as u16;
//!     let start = imn_guest::now_ns();
//!     let conn = imn_guest::TcpStream::connect(host, port, 3000)?;
//!     let mut w = ObjectWriter::new();
//!     w.ms_from_ns("connect_ms", imn_guest::now_ns() - start);
//!     drop(conn);
//!     imn_guest::emit(&w.finish())?;
//!     Ok(())
//! }
//!
//! imn_guest::entry!(measure);
//! ```
//!
//! # Limits and the deadline
//!
//! Every run has limits (fuel, memory pages, bytes and packets sent, sockets open, a
//! deadline). A host call that would pass one does not return: the host ends the run
//! as failed, naming the limit. To fail with its own message instead of being cut off
//! at the deadline, this crate clamps every timeout it passes to the host (connect and
//! receive) to the time left before the deadline less [`DEADLINE_RESERVE_MS`], and
//! answers [`TIMEOUT`] without calling the host when no time is left.
//!
//! # How this crate reads the ABI where it leaves room
//!
//! - `port` and `timeout_ms` arguments are i32, like pointers and lengths.
//! - `last_error(ptr, cap)`: whether the host cuts a long message to the buffer
//!   (returning what it wrote) or writes nothing and returns the full length, the
//!   wrapper asks again with more room, up to 64 KiB.
//! - `resolve`'s TOO_SMALL: the wrapper retries with the size in "needs N bytes" if
//!   the message has one, else with 8 times the buffer (1 KiB first, 64 KiB at most).
//! - `ping` / `http`: 64 KiB first; on TOO_SMALL once more with the size the message
//!   names (at most 16 MiB); any other outcome is returned as it is.
//! - `send` takes at most [`MAX_IO`] bytes a call; on TCP it sends all of them or
//!   fails. [`TcpStream::send_all`] sends longer buffers in pieces of that size
//!   (each a send call, so each a packet for the `packets_sent` limit).
//! - `tcp_connect` counts as one packet (the SYN) for `packets_sent`.
//! - `ping` / `http` parameters are at most 16 KiB.
//! - `recv` with a buffer larger than a UDP datagram returns the datagram; a longer
//!   one is cut to the buffer (the modules treat a cut message as malformed).
//! - A negative `params` return is an error (reported by [`try_params`]).
//! - `result` is called by [`emit`] at most once; the crate refuses a second call
//!   itself and results over 65536 bytes without calling the host.
//!
//! Memory the crate allocates for a host's answer (the `ping` and `http` results, the
//! addresses of a name) is asked for with `try_reserve`, so a module at its memory
//! limit gets an `Err` rather than a trap.

pub mod json;
pub mod sys;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// The host interface version this crate is written against.
pub const ABI_VERSION: u32 = 1;

/// The policy does not allow this destination (or this call).
pub const POLICY_DENIED: i32 = -1;
/// No answer in time (or the run's deadline is near, see the crate docs).
pub const TIMEOUT: i32 = -2;
/// Refused, reset, unreachable.
pub const IO: i32 = -3;
/// A bad argument, a bad handle, text that is not UTF-8.
pub const INVALID: i32 = -4;
/// The output did not fit (the host's message says how many bytes it needs).
pub const TOO_SMALL: i32 = -5;
/// Not in this agent build.
pub const UNAVAILABLE: i32 = -6;
/// The name has no address.
pub const NOT_FOUND: i32 = -7;

/// Time kept back before the run's deadline for the module to finish (write its
/// result) after its last wait: timeouts are clamped to the time left less this.
pub const DEADLINE_RESERVE_MS: i64 = 50;

/// Most bytes a run's result may have.
pub const MAX_RESULT: usize = 65_536;

/// Most bytes one `random` host call fills.
const RANDOM_CHUNK: usize = 65_536;
/// Most bytes one `send` or `recv` moves (the host refuses more, or reads less).
pub const MAX_IO: usize = 65_536;
/// The longest error message the crate reads.
const MAX_ERROR: usize = 65_536;

/// The first buffer for a `ping` or `http` result.
const BUILTIN_FIRST: usize = 64 * 1024;
/// The most a `ping` or `http` result may need before the wrapper gives up.
const BUILTIN_MAX: usize = 16 << 20;

/// A host call that failed: its (negative) code and the host's message (from
/// `last_error`), or a message of this crate's for errors it finds itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: i32,
    pub message: String,
}

impl Error {
    /// An error found by the guest itself (no host call involved).
    pub fn new(code: i32, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// The error a host call just returned: `code` and the host's `last_error`.
    pub fn from_host(code: i32) -> Error {
        Error {
            code,
            message: last_error(),
        }
    }

    /// The code's name: "POLICY_DENIED", "TIMEOUT", ... or "ERROR".
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }

    pub fn is_timeout(&self) -> bool {
        self.code == TIMEOUT
    }
}

/// The name of an error code: "POLICY_DENIED", "TIMEOUT", "IO", "INVALID",
/// "TOO_SMALL", "UNAVAILABLE", "NOT_FOUND", or "ERROR" for any other.
pub fn code_name(code: i32) -> &'static str {
    match code {
        POLICY_DENIED => "POLICY_DENIED",
        TIMEOUT => "TIMEOUT",
        IO => "IO",
        INVALID => "INVALID",
        TOO_SMALL => "TOO_SMALL",
        UNAVAILABLE => "UNAVAILABLE",
        NOT_FOUND => "NOT_FOUND",
        _ => "ERROR",
    }
}

impl fmt::Display for Error {
    /// `TIMEOUT: the message` (the code's name and number if the message is empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{} ({})", self.code_name(), self.code)
        } else {
            write!(f, "{}: {}", self.code_name(), self.message)
        }
    }
}

impl std::error::Error for Error {}

/// So that `?` works in a run function returning `Result<(), String>`.
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

/// A host call's return: `Ok` if not negative, else the host's error.
fn check(ret: i32) -> Result<i32, Error> {
    if ret >= 0 {
        Ok(ret)
    } else {
        Err(Error::from_host(ret))
    }
}

/// A length as the ABI's i32.
fn len32(len: usize) -> Result<i32, Error> {
    i32::try_from(len).map_err(|_| Error::new(INVALID, format!("{len} bytes is too long")))
}

/// A zeroed buffer of `len` bytes, or an error if memory cannot grow that far.
fn buffer(len: usize, what: &str) -> Result<Vec<u8>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::new(
            TOO_SMALL,
            format!("cannot allocate {len} bytes for {what} (memory limit)"),
        )
    })?;
    v.resize(len, 0);
    Ok(v)
}

/// The number in a host message like "needs 123456 bytes".
fn needs(message: &str) -> Option<usize> {
    let rest = message.get(message.find("needs ")? + "needs ".len()..)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest.get(..end)?.parse().ok()
}

/// The message of the last error a host call returned ("" if none). Called by the
/// wrappers; call it yourself only after a raw [`sys`] call.
///
/// A host may cut the message to the buffer (and return what it wrote) or write
/// nothing and return the full length: either way a full buffer, or a length beyond
/// it, is asked for again with more room (up to 64 KiB).
pub fn last_error() -> String {
    let mut cap = 1024usize;
    loop {
        let Ok(mut buf) = buffer(cap, "an error message") else {
            return String::new();
        };
        // SAFETY: the host writes at most `cap` bytes into `buf`.
        let n = unsafe { sys::last_error(buf.as_mut_ptr(), cap as i32) };
        if n <= 0 {
            return String::new();
        }
        let n = n as usize;
        if n < cap || (n == cap && cap >= MAX_ERROR) {
            buf.truncate(n);
            return String::from_utf8_lossy(&buf).into_owned();
        }
        if cap >= MAX_ERROR {
            // Longer than any buffer we make: what the host wrote, if anything.
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return String::from_utf8_lossy(&buf).into_owned();
        }
        cap = if n > cap { n } else { cap * 8 }.min(MAX_ERROR);
    }
}

/// The run's parameters, the JSON text the host gives, or "{}" (logging a warning)
/// should reading them fail. [`json::Params::load`] parses them (and fails instead).
pub fn params() -> String {
    try_params().unwrap_or_else(|e| {
        log_at(Level::Warn, &format!("params: {e}"));
        String::from("{}")
    })
}

/// The run's parameters, the JSON text the host gives.
pub fn try_params() -> Result<String, Error> {
    let mut buf = buffer(4096, "the parameters")?;
    for _ in 0..3 {
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = check(unsafe { sys::params(buf.as_mut_ptr(), buf.len() as i32) })? as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf)
                .map_err(|_| Error::new(INVALID, "the parameters are not UTF-8"));
        }
        // Longer than the buffer (the host wrote nothing): again with room for them.
        buf = buffer(n, "the parameters")?;
    }
    Err(Error::new(INVALID, "the parameters keep growing"))
}

/// Milliseconds left before the run's deadline (0 if passed).
pub fn deadline_ms() -> i64 {
    // SAFETY: no pointers.
    unsafe { sys::deadline_ms() }
}

/// Monotonic clock, nanoseconds (for durations).
pub fn now_ns() -> i64 {
    // SAFETY: no pointers.
    unsafe { sys::clock_mono_ns() }
}

/// Wall clock, milliseconds since the Unix epoch (for timestamps).
pub fn wall_ms() -> i64 {
    // SAFETY: no pointers.
    unsafe { sys::clock_wall_ms() }
}

/// Milliseconds (with fractions) since `start_ns`, a [`now_ns`] reading.
pub fn ms_since(start_ns: i64) -> f64 {
    now_ns().saturating_sub(start_ns) as f64 / 1e6
}

/// Fills `buf` with random bytes from the host (for transaction ids: never use
/// predictable ones, hence an `Err` rather than a fallback).
pub fn random(buf: &mut [u8]) -> Result<(), Error> {
    for chunk in buf.chunks_mut(RANDOM_CHUNK) {
        // SAFETY: the host writes `chunk.len()` (<= 65536) bytes into `chunk`.
        check(unsafe { sys::random(chunk.as_mut_ptr(), chunk.len() as i32) })?;
    }
    Ok(())
}

/// A log line's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// Logs one line at `level` (the host cuts lines over 1024 bytes). Errors are ignored.
pub fn log_at(level: Level, message: &str) {
    let len = message.len().min(i32::MAX as usize) as i32;
    // SAFETY: the host reads `len` bytes of `message`.
    unsafe { sys::log(level as i32, message.as_ptr(), len) };
}

/// Logs one line at level info.
pub fn log(message: &str) {
    log_at(Level::Info, message)
}

/// The addresses of a name (or of an address literal: itself), as text, as the host
/// resolves them (under its policy).
pub fn resolve(name: &str) -> Result<Vec<String>, Error> {
    let name_len = len32(name.len())?;
    let mut buf = buffer(1024, "the addresses")?;
    let mut tries = 0;
    let n = loop {
        // SAFETY: the host reads `name_len` bytes of `name` and writes at most
        // `buf.len()` bytes into `buf`.
        let n =
            unsafe { sys::resolve(name.as_ptr(), name_len, buf.as_mut_ptr(), buf.len() as i32) };
        if n != TOO_SMALL || tries == 2 {
            break check(n)? as usize;
        }
        tries += 1;
        let e = Error::from_host(n);
        let want = needs(&e.message).unwrap_or(buf.len() * 8);
        if want <= buf.len() || want > MAX_RESULT {
            return Err(e);
        }
        buf = buffer(want, "the addresses")?;
    };
    let text = buf.get(..n).ok_or_else(|| {
        Error::new(
            INVALID,
            format!(
                "resolve: the host says {n} bytes in a buffer of {}",
                buf.len()
            ),
        )
    })?;
    Ok(String::from_utf8_lossy(text)
        .split('\n')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// Whether the run's deadline is so near (within [`DEADLINE_RESERVE_MS`]) that the
/// wrappers no longer wait for anything.
pub fn deadline_reached() -> bool {
    deadline_ms() <= DEADLINE_RESERVE_MS
}

/// `timeout_ms` clamped to the time left before the run's deadline (less
/// [`DEADLINE_RESERVE_MS`]); [`TIMEOUT`] if none is left.
pub fn bounded_timeout(timeout_ms: u32) -> Result<i32, Error> {
    let left = deadline_ms().saturating_sub(DEADLINE_RESERVE_MS);
    if left <= 0 {
        return Err(Error::new(
            TIMEOUT,
            "the run's deadline is reached: no time left to wait",
        ));
    }
    Ok(i64::from(timeout_ms).min(left).min(i64::from(i32::MAX)) as i32)
}

fn send_on(handle: i32, buf: &[u8]) -> Result<usize, Error> {
    let len = len32(buf.len())?;
    // SAFETY: the host reads `len` bytes of `buf`.
    let n = check(unsafe { sys::send(handle, buf.as_ptr(), len) })? as usize;
    if n > buf.len() {
        return Err(Error::new(
            INVALID,
            format!("send: the host says {n} bytes of {}", buf.len()),
        ));
    }
    Ok(n)
}

fn recv_on(handle: i32, buf: &mut [u8], timeout_ms: u32) -> Result<usize, Error> {
    let cap = len32(buf.len())?;
    let timeout = bounded_timeout(timeout_ms)?;
    // SAFETY: the host writes at most `cap` bytes into `buf`.
    let n = check(unsafe { sys::recv(handle, buf.as_mut_ptr(), cap, timeout) })? as usize;
    if n > buf.len() {
        return Err(Error::new(
            INVALID,
            format!("recv: the host says {n} bytes in {}", buf.len()),
        ));
    }
    Ok(n)
}

/// A TCP connection, closed when dropped.
#[derive(Debug)]
pub struct TcpStream {
    handle: i32,
}

impl TcpStream {
    /// Connects to `host` (an address literal or a name the host resolves) within
    /// `timeout_ms` (clamped to the deadline).
    pub fn connect(host: &str, port: u16, timeout_ms: u32) -> Result<TcpStream, Error> {
        let len = len32(host.len())?;
        let timeout = bounded_timeout(timeout_ms)?;
        // SAFETY: the host reads `len` bytes of `host`.
        let handle =
            check(unsafe { sys::tcp_connect(host.as_ptr(), len, i32::from(port), timeout) })?;
        Ok(TcpStream { handle })
    }

    /// Sends `buf` (at most [`MAX_IO`] bytes): the host sends all of it or fails.
    /// Returns the bytes sent.
    pub fn send(&self, buf: &[u8]) -> Result<usize, Error> {
        send_on(self.handle, buf)
    }

    /// Sends all of `buf`, in calls of at most [`MAX_IO`] bytes (and again should the
    /// host ever send less).
    pub fn send_all(&self, mut buf: &[u8]) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = self.send(&buf[..buf.len().min(MAX_IO)])?;
            if n == 0 {
                return Err(Error::new(IO, "send: the host sent nothing"));
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Receives what has arrived (at most `buf.len()` bytes), waiting up to
    /// `timeout_ms` (clamped to the deadline). `Ok(0)`: the peer closed.
    pub fn recv(&self, buf: &mut [u8], timeout_ms: u32) -> Result<usize, Error> {
        recv_on(self.handle, buf, timeout_ms)
    }

    /// Fills all of `buf` (however the bytes arrive), within `timeout_ms` in all. An
    /// [`IO`] error if the peer closes first, [`TIMEOUT`] if time runs out.
    pub fn recv_exact(&self, buf: &mut [u8], timeout_ms: u32) -> Result<(), Error> {
        let start = now_ns();
        let mut got = 0;
        while got < buf.len() {
            let spent = (now_ns().saturating_sub(start) / 1_000_000).max(0) as u64;
            let left = u64::from(timeout_ms).saturating_sub(spent);
            if left == 0 {
                return Err(Error::new(
                    TIMEOUT,
                    format!("{got} of {} bytes within {timeout_ms} ms", buf.len()),
                ));
            }
            let n = self.recv(&mut buf[got..], left as u32)?;
            if n == 0 {
                return Err(Error::new(
                    IO,
                    format!("the peer closed after {got} of {} bytes", buf.len()),
                ));
            }
            got += n;
        }
        Ok(())
    }

    /// Closes the connection now (dropping it does the same, ignoring errors).
    pub fn close(self) -> Result<(), Error> {
        let handle = self.handle;
        std::mem::forget(self);
        // SAFETY: no pointers.
        check(unsafe { sys::close(handle) }).map(drop)
    }

    /// The host's handle.
    pub fn handle(&self) -> i32 {
        self.handle
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // SAFETY: no pointers.
        unsafe { sys::close(self.handle) };
    }
}

/// A connected UDP socket (it sends to and receives from one host and port), closed
/// when dropped.
#[derive(Debug)]
pub struct UdpSocket {
    handle: i32,
}

impl UdpSocket {
    /// Opens a socket connected to `host` (an address literal or a name) and `port`.
    pub fn open(host: &str, port: u16) -> Result<UdpSocket, Error> {
        let len = len32(host.len())?;
        // SAFETY: the host reads `len` bytes of `host`.
        let handle = check(unsafe { sys::udp_open(host.as_ptr(), len, i32::from(port)) })?;
        Ok(UdpSocket { handle })
    }

    /// Sends one datagram (at most [`MAX_IO`] bytes). Returns the bytes sent.
    pub fn send(&self, buf: &[u8]) -> Result<usize, Error> {
        send_on(self.handle, buf)
    }

    /// Receives one datagram (cut to `buf.len()`), waiting up to `timeout_ms`
    /// (clamped to the deadline).
    pub fn recv(&self, buf: &mut [u8], timeout_ms: u32) -> Result<usize, Error> {
        recv_on(self.handle, buf, timeout_ms)
    }

    /// Closes the socket now (dropping it does the same, ignoring errors).
    pub fn close(self) -> Result<(), Error> {
        let handle = self.handle;
        std::mem::forget(self);
        // SAFETY: no pointers.
        check(unsafe { sys::close(handle) }).map(drop)
    }

    /// The host's handle.
    pub fn handle(&self) -> i32 {
        self.handle
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        // SAFETY: no pointers.
        unsafe { sys::close(self.handle) };
    }
}

/// Runs a built-in module through the host: a 64 KiB buffer first; if the host says
/// TOO_SMALL (it did not run the call), once more with the size its message names.
///
/// `call` gets (params_ptr, params_len, out_ptr, out_cap) of live buffers: the host
/// reads `params_len` bytes of the first and writes at most `out_cap` into the second.
fn builtin(
    what: &str,
    call: impl Fn(*const u8, i32, *mut u8, i32) -> i32,
    params_json: &str,
) -> Result<String, Error> {
    let len = len32(params_json.len())?;
    let mut buf = buffer(BUILTIN_FIRST, what)?;
    for attempt in 0..2 {
        let n = call(
            params_json.as_ptr(),
            len,
            buf.as_mut_ptr(),
            buf.len() as i32,
        );
        if n >= 0 {
            let n = n as usize;
            let out = buf.get(..n).ok_or_else(|| {
                Error::new(
                    INVALID,
                    format!("{what}: the host says {n} bytes in {}", buf.len()),
                )
            })?;
            return String::from_utf8(out.to_vec())
                .map_err(|_| Error::new(INVALID, format!("{what}: the result is not UTF-8")));
        }
        let e = Error::from_host(n);
        if n != TOO_SMALL || attempt == 1 {
            return Err(e);
        }
        match needs(&e.message) {
            Some(want) if want > buf.len() && want <= BUILTIN_MAX => {
                buf = buffer(want, what)?;
            }
            _ => return Err(e),
        }
    }
    unreachable!("the loop returns on its second attempt")
}

/// Runs the agent's built-in ping with `params_json` (as the built-in `ping_module`
/// takes them, e.g. `{"targets":["192.0.2.1"],"count":3}`, at most 16 KiB); its
/// result JSON.
pub fn ping(params_json: &str) -> Result<String, Error> {
    // SAFETY: see `builtin`.
    builtin(
        "ping",
        |p, l, o, c| unsafe { sys::ping(p, l, o, c) },
        params_json,
    )
}

/// Runs the agent's built-in http module with `params_json` (as the built-in `http`
/// module takes them, at most 16 KiB); its result JSON.
pub fn http(params_json: &str) -> Result<String, Error> {
    // SAFETY: see `builtin`.
    builtin(
        "http",
        |p, l, o, c| unsafe { sys::http(p, l, o, c) },
        params_json,
    )
}

static EMITTED: AtomicBool = AtomicBool::new(false);

/// Sets the run's result: a JSON object of at most [`MAX_RESULT`] bytes. Once per run
/// (a second call is an error, the host is not asked).
pub fn emit(result_json: &str) -> Result<(), Error> {
    if result_json.len() > MAX_RESULT {
        return Err(Error::new(
            INVALID,
            format!(
                "the result is {} bytes, more than {MAX_RESULT}",
                result_json.len()
            ),
        ));
    }
    if EMITTED.swap(true, Ordering::Relaxed) {
        return Err(Error::new(INVALID, "the result was already emitted"));
    }
    // SAFETY: the host reads `len` bytes of `result_json`.
    check(unsafe { sys::result(result_json.as_ptr(), result_json.len() as i32) }).map(drop)
}

/// What [`entry!`] expands to call: runs `f`, logging a panic's message (before the
/// trap that ends the run) or an `Err`'s at level error. 0 on `Ok`, 1 on `Err` (then
/// no result is emitted by this function).
#[doc(hidden)]
pub fn __run<E: fmt::Display>(f: impl FnOnce() -> Result<(), E>) -> i32 {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("panic: {info}").replace('\n', " ");
        log_at(Level::Error, &msg);
    }));
    match f() {
        Ok(()) => {
            if !EMITTED.load(Ordering::Relaxed) {
                log_at(Level::Warn, "the module returned without emitting a result");
            }
            0
        }
        Err(e) => {
            let msg = e.to_string();
            log_at(
                Level::Error,
                if msg.is_empty() {
                    "the module failed"
                } else {
                    &msg
                },
            );
            1
        }
    }
}

/// Exports the module's entry point, `run() -> i32`, calling `$f`, a
/// `fn() -> Result<(), E>` where `E: Display` (e.g. `String` or [`Error`]).
///
/// `Ok(())`: `run` returns 0 (the function should have called [`emit`]). `Err(e)`:
/// `e` is logged at level error, no result is emitted, and `run` returns 1, which the
/// host reports as a failed run with that last log line. A panic logs its message and
/// traps (panic = abort).
///
/// ```no_run
/// fn my_run() -> Result<(), String> {
///     imn_guest::emit("{}")?;
///     Ok(())
/// }
/// imn_guest::entry!(my_run);
/// ```
#[macro_export]
macro_rules! entry {
    ($f:path) => {
        /// The module's entry point (IMN host ABI 1): 0 on success.
        #[unsafe(no_mangle)]
        pub extern "C" fn run() -> i32 {
            $crate::__run($f)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_reads_the_hosts_size() {
        assert_eq!(needs("needs 123456 bytes"), Some(123456));
        assert_eq!(needs("output too small: needs 70000 bytes"), Some(70000));
        assert_eq!(needs("needs bytes"), None);
        assert_eq!(needs("too small"), None);
    }

    #[test]
    fn errors_read_well() {
        let e = Error::new(TIMEOUT, "no answer within 2000 ms");
        assert_eq!(e.to_string(), "TIMEOUT: no answer within 2000 ms");
        assert_eq!(Error::new(-99, "").to_string(), "ERROR (-99)");
        let s: String = Error::new(IO, "refused").into();
        assert_eq!(s, "IO: refused");
    }

    #[test]
    fn builtin_calls_retry_once_with_the_size_the_host_needs() {
        use std::cell::RefCell;
        let caps = RefCell::new(Vec::new());
        let out = builtin(
            "ping",
            |p, l, o, c| {
                caps.borrow_mut().push(c);
                // SAFETY: the arguments are `builtin`'s live buffers.
                let params = unsafe { std::slice::from_raw_parts(p, l as usize) };
                assert_eq!(params, b"{\"count\":1}");
                let result = vec![b'x'; 100_000];
                if (c as usize) < result.len() {
                    sys::set_last_error("output too small: needs 100000 bytes");
                    return TOO_SMALL;
                }
                unsafe { std::ptr::copy_nonoverlapping(result.as_ptr(), o, result.len()) };
                result.len() as i32
            },
            "{\"count\":1}",
        )
        .unwrap();
        assert_eq!(out.len(), 100_000);
        assert_eq!(*caps.borrow(), vec![65_536, 100_000]);

        // Still too small the second time, or no size named: the host's error.
        for message in ["needs 200000 bytes", "too small"] {
            let tries = RefCell::new(0);
            let e = builtin(
                "http",
                |_, _, _, _| {
                    *tries.borrow_mut() += 1;
                    sys::set_last_error(message);
                    TOO_SMALL
                },
                "{}",
            )
            .unwrap_err();
            assert_eq!((e.code, e.message.as_str()), (TOO_SMALL, message));
            assert!(*tries.borrow() <= 2);
        }
        // Another error: returned at once.
        sys::set_last_error("not in this agent build");
        let e = builtin("ping", |_, _, _, _| UNAVAILABLE, "{}").unwrap_err();
        assert_eq!(e.to_string(), "UNAVAILABLE: not in this agent build");
    }

    #[test]
    fn long_error_messages_are_read_whole() {
        // Hosts that write nothing when it does not fit, and hosts that cut.
        for cut in [false, true] {
            sys::set_last_error_cuts(cut);
            for len in [0, 1, 1023, 1024, 1025, 5000, 65_536] {
                let long = "e".repeat(len);
                sys::set_last_error(&long);
                assert_eq!(last_error(), long, "cut {cut}, {len} bytes");
            }
            sys::set_last_error(&"e".repeat(70_000));
            let got = last_error();
            assert!(got.len() == 65_536 || (got.is_empty() && !cut), "cut {cut}");
        }
        sys::set_last_error_cuts(false);
    }

    #[test]
    fn params_default_to_an_empty_object() {
        assert_eq!(params(), "{}");
        assert!(json::Params::load().unwrap().fields().is_empty());
    }
}
