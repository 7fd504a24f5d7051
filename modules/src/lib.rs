//! The contract between IMN agents and the cloud: what crosses the device link and
//! what both ends must agree on. No I/O; the agent, the bridge and the backend all
//! link it.
//!
//! - [`wire`]: envelopes, records, commands, topic and subject names, and the
//!   versioned postcard codec. postcard is not self-describing: new variants and
//!   fields go last, and golden bytes (`tests/wire_golden.rs`) hold every variant.
//! - [`auth`]: signing of uplink messages with an agent's key.
//! - [`catalog`]: every module's name, version, JSON Schema of its parameters and
//!   examples; [`params`] and [`kinds`]: the typed parameters; [`results`]: the typed
//!   result each module produces.
//! - [`ranges`]: the one set of seqs kept as ranges (acks, the agent's acked records,
//!   the seqs a store has taken).
//! - [`release`]: signed agent releases (manifest, Ed25519 signature, version
//!   order), checked the same way by the backend on upload and the agent before it
//!   installs.
//! - [`wasm`]: signed WebAssembly module packages (manifest with parameter and
//!   result schemas, targets and limits), checked by the backend when added and by
//!   the agent when loaded; the result type of such a module.
//! - [`policy`]: which addresses a run may send to, and what each run asks of the
//!   network; the backend and the agent apply the same code.
//! - [`atlas`] (feature `atlas`, the backend's): results in RIPE Atlas's format; each
//!   module with an Atlas kind converts in `kinds/<module>/atlas.rs`.
//! - [`tls`] (feature `tls`): how an MQTT client (the agent, or the bridge as a client
//!   of an external broker) verifies the broker by its configured name.
//!
//! - [`figures`] (feature `catalog`): what a result measured, as numbers (loss, RTT
//!   samples, statuses, paths), for status checks, rollups and anomaly detection.
//!
//! The code that runs modules is `imn-probes`; the resolver both ends use is
//! `imn-resolver`.

#[cfg(feature = "atlas")]
pub mod atlas;
pub mod auth;
pub mod catalog;
#[cfg(feature = "catalog")]
pub mod figures;
pub mod kinds;
pub mod params;
pub mod policy;
pub mod ranges;
pub mod release;
pub mod results;
pub mod summary;
pub mod wasm;
pub mod wire;

#[cfg(feature = "tls")]
pub mod tls;

/// Milliseconds since the Unix epoch, UTC: the one wall-clock unit on the wire.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
