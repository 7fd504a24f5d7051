//! What the cloud's processes share: the bridge (MQTT side) and the backend (store and
//! APIs) talk over a [`bus`], trust agents through the same [`auth`] credentials,
//! write secrets with [`files`], and report through the same [`telemetry`]. Agents
//! never link this crate: everything an agent and the cloud share is the contract in
//! `imn-proto`.
//!
//! - [`bus`]: the uplink (agents to backend) and downlink (commands), in-process
//!   ([`bus::LocalBus`], for `imn up`) or over NATS JetStream ([`bus::NatsBus`]), where
//!   uplink messages travel in frames of many.
//! - [`auth`]: each agent's credential (login secret and message-signing key), and the
//!   counters of what was refused.
//! - [`files`]: private directories and files (mode 0700/0600), written atomically.
//! - [`events`]: internal events, one type per operational event, whose `emit` both
//!   counts and logs it.
//! - [`telemetry`]: logging, OTLP export of traces, metrics and logs, and the
//!   Prometheus text exposition ([`telemetry::prom`]).

pub mod auth;
pub mod bus;
pub mod events;
pub mod files;
pub mod telemetry;

pub use auth::{AgentCredential, AgentCredentials};

/// Reads a listen address flag: `off`, or ADDR:PORT.
pub fn addr_or_off(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{s:?}: {e} (give ADDR:PORT or off)"))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,rumqttd=warn`). rumqttd opens
/// an error-level span per publish with its topic formatted by `Debug`; the fmt layer
/// then formats every topic, which cost the router thread a tenth of its time in
/// `imn-bench ingest`. Spans from rumqttd are turned off (its events still pass).
/// Logging to stderr only (no OTLP), for commands that are not services.
pub fn init_logging() {
    let _ = telemetry::init(&[], &telemetry::OtlpConfig::default(), "info,rumqttd=warn");
}

/// Resolves when the process is asked to stop: SIGINT (Ctrl-C) or SIGTERM (systemd,
/// procd and container runtimes stop services with it). Without a handler SIGTERM
/// would end the process at once, skipping the clean shutdown.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What a bridge running in the backend's process (`imn up`) reports through the
/// backend's `/health` and `/metrics`.
pub trait BridgeReport: Send + Sync {
    /// Its counters, as `/health` → `bridge` shows them.
    fn health(&self) -> serde_json::Value;
    /// Its metric families, read now.
    fn families(&self) -> Vec<telemetry::prom::Family>;
}
