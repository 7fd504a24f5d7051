//! The IMN edge agent: runs measurement modules, keeps every result in a durable
//! outbox, and syncs it over MQTT until the backend acks it. It links the contract
//! (`imn-proto`), the probes (`imn-probes`) and nothing of the cloud, and builds with
//! rustc 1.85 for the firmware.
//!
//! Where to look:
//! - [`agent`]: the main loop; it owns the transport and the outbox, and is the only
//!   place that sends (hello, heartbeats, batches).
//! - [`sync`]: what to send when (the window, resends, live first), a state machine
//!   with no I/O that the main loop drives.
//! - [`outbox`]: the durable outbox and command log in sled: records on disk before
//!   they are sent, seqs never repeated, bounded by bytes, a full disk survived.
//! - [`supervisor`], [`runqueue`], [`schedule`]: how runs are started, bounded and
//!   scheduled offline; [`fresh`]: which commands are refused as stale or replayed.
//! - [`transport`]: rumqttc behind embedded-svc's MQTT traits; [`config`]: settings
//!   from defaults, TOML or UCI, environment and flags.
//! - [`launcher`]: the supervisor that runs the agent, tries a new release or new
//!   remote settings on trial and rolls them back; [`update`]: the running agent's
//!   side (the download over MQTT, the files it shares with the supervisor).
//! - [`wasm`] (feature `wasm`): signed WebAssembly modules kept on disk and
//!   registered for runs; the sandbox itself is `imn_probes::wasm`.

pub mod agent;
pub mod config;
pub mod crash;
pub mod events;
pub mod flat_toml;
pub mod fresh;
pub mod launcher;
pub mod log;
pub mod metrics;
pub mod modules;
pub mod outbox;
pub mod runqueue;
pub mod schedule;
pub mod supervisor;
pub mod sync;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
pub mod update;
#[cfg(feature = "wasm")]
pub mod wasm;

pub use agent::{Agent, AgentError};
pub use config::AgentConfig;

/// A random u64 from the OS's random source (getrandom(2)), for the outbox epoch, the
/// agent's generated id and reconnect jitter. Falls back to the clock only on a system
/// with no random source at all.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .rotate_left(29),
    }
}

/// A fresh directory under the system temp dir, for unit tests (the caller removes it).
#[cfg(test)]
pub(crate) fn test_dir(label: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "imn-{label}-{}-{}",
        std::process::id(),
        random_u64()
    ));
    std::fs::create_dir_all(&d).expect("a test directory");
    d
}
