//! The IMN edge agent: runs measurement modules, keeps every result in a durable
//! outbox, and syncs it over MQTT until the backend acks it.

pub mod agent;
pub mod config;
pub mod crash;
pub mod fresh;
pub mod metrics;
pub mod modules;
pub mod outbox;
pub mod runqueue;
pub mod schedule;
pub mod supervisor;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;

pub use agent::{Agent, AgentError};
pub use config::AgentConfig;
