//! The contract between IMN agents and the cloud.
//!
//! - [`wire`]: envelopes, topic and subject names, and the versioned postcard codec.
//! - [`catalog`]: every module's name, version and JSON Schema of its parameters.
//! - [`results`]: the typed result each module produces.
//! - [`policy`]: which addresses a run may send to, and what each run asks of the
//!   network; the backend and the agent apply the same code.
//! - `exec` (cargo feature `exec`): the code that runs modules on a device. The backend
//!   leaves it out, so it links only specs and types.

pub mod auth;
pub mod catalog;
pub mod kinds;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;
pub mod params;
pub mod policy;
pub mod results;
pub mod wire;

#[cfg(feature = "exec")]
pub mod exec;

/// The agent's own stub resolver (`/etc/hosts`, then name servers over UDP and TCP,
/// no blocking threads). The backend uses it too, for its policy checks (feature
/// `resolver`), so both ends resolve with the same code.
#[cfg(any(feature = "exec", feature = "resolver"))]
#[path = "exec/resolver.rs"]
pub mod resolver;

#[cfg(feature = "tls")]
pub mod tls;

/// Milliseconds since the Unix epoch, UTC: the one wall-clock unit on the wire.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
