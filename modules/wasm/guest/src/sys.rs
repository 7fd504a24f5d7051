//! The raw host interface: the `imn` imports of ABI version 1, exactly as the agent
//! provides them. Every pointer and length is an i32 into the guest's memory.
//!
//! Off wasm32 (unit tests on the build machine) the same functions exist as stubs that
//! answer [`UNAVAILABLE`](crate::UNAVAILABLE) (or nothing), so the pure parts of the
//! library and of modules can be tested natively.

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "imn")]
extern "C" {
    /// Writes the params JSON if it fits in `cap`; returns its length.
    pub fn params(ptr: *mut u8, cap: i32) -> i32;
    /// Milliseconds left before the run's deadline (0 if passed).
    pub fn deadline_ms() -> i64;
    /// Monotonic clock, ns.
    pub fn clock_mono_ns() -> i64;
    /// Wall clock, ms since the Unix epoch.
    pub fn clock_wall_ms() -> i64;
    /// Fills `len` (at most 65536) bytes with random bytes; 0 or an error.
    pub fn random(ptr: *mut u8, len: i32) -> i32;
    /// One log line at `level` (0 debug, 1 info, 2 warn, 3 error).
    pub fn log(level: i32, ptr: *const u8, len: i32) -> i32;
    /// The addresses of a name, "\n"-separated; bytes written or an error.
    pub fn resolve(name_ptr: *const u8, name_len: i32, out_ptr: *mut u8, out_cap: i32) -> i32;
    /// A TCP connection's handle, or an error.
    pub fn tcp_connect(host_ptr: *const u8, host_len: i32, port: i32, timeout_ms: i32) -> i32;
    /// A connected UDP socket's handle, or an error.
    pub fn udp_open(host_ptr: *const u8, host_len: i32, port: i32) -> i32;
    /// Bytes sent, or an error.
    pub fn send(handle: i32, ptr: *const u8, len: i32) -> i32;
    /// Bytes received (TCP: 0 = peer closed), or an error.
    pub fn recv(handle: i32, ptr: *mut u8, cap: i32, timeout_ms: i32) -> i32;
    /// Closes a handle.
    pub fn close(handle: i32) -> i32;
    /// The agent's built-in ping; its result JSON's length, or an error.
    pub fn ping(params_ptr: *const u8, params_len: i32, out_ptr: *mut u8, out_cap: i32) -> i32;
    /// The agent's built-in http module; its result JSON's length, or an error.
    pub fn http(params_ptr: *const u8, params_len: i32, out_ptr: *mut u8, out_cap: i32) -> i32;
    /// The run's result (a JSON object, at most 65536 bytes). Once.
    pub fn result(ptr: *const u8, len: i32) -> i32;
    /// The message of the last error a call returned; its length.
    pub fn last_error(ptr: *mut u8, cap: i32) -> i32;
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    //! Stand-ins off wasm32: nothing is reachable.
    #![allow(clippy::missing_safety_doc)]
    const UNAVAILABLE: i32 = -6;
    pub unsafe fn params(ptr: *mut u8, cap: i32) -> i32 {
        // "{}": no parameters.
        if cap >= 2 {
            *ptr = b'{';
            *ptr.add(1) = b'}';
        }
        2
    }
    pub unsafe fn deadline_ms() -> i64 {
        60_000
    }
    pub unsafe fn clock_mono_ns() -> i64 {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as i64
    }
    pub unsafe fn clock_wall_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
    pub unsafe fn random(_: *mut u8, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn log(_: i32, _: *const u8, _: i32) -> i32 {
        0
    }
    pub unsafe fn resolve(_: *const u8, _: i32, _: *mut u8, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn tcp_connect(_: *const u8, _: i32, _: i32, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn udp_open(_: *const u8, _: i32, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn send(_: i32, _: *const u8, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn recv(_: i32, _: *mut u8, _: i32, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn close(_: i32) -> i32 {
        0
    }
    pub unsafe fn ping(_: *const u8, _: i32, _: *mut u8, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn http(_: *const u8, _: i32, _: *mut u8, _: i32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn result(_: *const u8, _: i32) -> i32 {
        0
    }
    std::thread_local! {
        static LAST_ERROR: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        static CUTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    /// What the stand-in `last_error` answers (for tests of the wrappers).
    pub fn set_last_error(message: &str) {
        LAST_ERROR.with(|l| *l.borrow_mut() = message.to_string());
    }
    /// Whether the stand-in `last_error` cuts a long message to the buffer (and
    /// returns what it wrote) or writes nothing and returns the full length.
    pub fn set_last_error_cuts(cuts: bool) {
        CUTS.with(|c| c.set(cuts));
    }
    pub unsafe fn last_error(ptr: *mut u8, cap: i32) -> i32 {
        LAST_ERROR.with(|l| {
            let l = l.borrow();
            let cap = cap as usize;
            if CUTS.with(|c| c.get()) {
                let n = l.len().min(cap);
                std::ptr::copy_nonoverlapping(l.as_ptr(), ptr, n);
                n as i32
            } else {
                if l.len() <= cap {
                    std::ptr::copy_nonoverlapping(l.as_ptr(), ptr, l.len());
                }
                l.len() as i32
            }
        })
    }
}
#[cfg(not(target_arch = "wasm32"))]
pub use native::*;
