//! The IMN bridge: an embedded MQTT broker for agents, forwarding between MQTT and the
//! bus. Stateless apart from connections.

pub mod broker;
pub mod bus;

pub use broker::{BridgeError, BrokerConfig};
