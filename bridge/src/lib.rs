//! The IMN bridge: an embedded MQTT broker for agents (or a client of an external
//! one), forwarding between MQTT and the bus. Stateless apart from connections. What
//! it shares with the backend (the bus, agents' credentials, telemetry) is in
//! `imn-cloud`.

pub mod broker;
pub mod external;

pub use broker::{BridgeError, BrokerConfig, BrokerTls};
