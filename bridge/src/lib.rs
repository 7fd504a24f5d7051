//! The IMN bridge: an embedded MQTT broker for agents, forwarding between MQTT and the
//! bus. Stateless apart from connections.

pub mod auth;
pub mod broker;
pub mod bus;
pub mod external;
pub mod files;
pub mod telemetry;

pub use auth::{AgentCredential, AgentCredentials};
pub use broker::{BridgeError, BrokerConfig, BrokerTls};

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
