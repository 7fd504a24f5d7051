//! The bus between bridges and backends. Subjects mirror the MQTT topics:
//! `imn.v1.{kind}.{agent}`.
//!
//! - [`LocalBus`]: in-process channels, for `imn up`.
//! - [`NatsBus`]: NATS; uplink in frames of many messages through a JetStream stream
//!   and a shared durable pull consumer, downlink on core subjects.

mod local;
mod nats;

pub use local::LocalBus;
pub use nats::{NatsBus, NatsOptions};

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use imn_proto::wire::Kind;
use tokio::sync::mpsc;

use crate::auth::{AgentCredential, AgentCredentials};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus is closed")]
    Closed,
    #[error("{0} is already subscribed; the in-process bus has one consumer")]
    AlreadySubscribed(&'static str),
    #[error("nats: {0}")]
    Nats(String),
}

/// Settles one uplink message with the bus once the consumer is done with it.
#[async_trait]
pub trait Settle: Send {
    /// Processed (stored, or deliberately dropped): the bus may forget it.
    async fn ack(self: Box<Self>);
    /// Not processed: the bus should deliver it again.
    async fn nak(self: Box<Self>);
}

/// A message from an agent, on its way to a backend.
pub struct UpMessage {
    pub kind: Kind,
    pub agent: String,
    pub payload: Bytes,
    /// W3C `traceparent`, where the transport carried one.
    pub traceparent: Option<String>,
    settle: Option<Box<dyn Settle>>,
}

impl UpMessage {
    pub fn new(kind: Kind, agent: String, payload: Bytes, settle: Option<Box<dyn Settle>>) -> Self {
        UpMessage {
            kind,
            agent,
            payload,
            traceparent: None,
            settle,
        }
    }

    pub async fn ack(mut self) {
        if let Some(s) = self.settle.take() {
            s.ack().await;
        }
    }

    pub async fn nak(mut self) {
        if let Some(s) = self.settle.take() {
            s.nak().await;
        }
    }
}

/// A message for an agent, on its way to the bridge that holds its connection.
#[derive(Debug, Clone)]
pub struct DownMessage {
    pub kind: Kind,
    pub agent: String,
    pub payload: Bytes,
    /// W3C `traceparent` of the span that sent it (a NATS header on NATS).
    pub traceparent: Option<String>,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Bridge → backend. Returns once the bus holds the message.
    async fn publish_up(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError>;
    /// Backend → bridge.
    async fn publish_down(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError> {
        self.publish_down_traced(kind, agent, payload, None).await
    }
    /// Backend → bridge, in a trace: the bus carries `traceparent` beside the payload
    /// (in NATS headers), so the bridge's span joins the sender's trace.
    async fn publish_down_traced(
        &self,
        kind: Kind,
        agent: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<(), BusError>;
    /// The backend's feed of uplink messages; each must be acked or nakked.
    async fn subscribe_up(&self) -> Result<mpsc::Receiver<UpMessage>, BusError>;
    /// The bridge's feed of downlink messages.
    async fn subscribe_down(&self) -> Result<mpsc::Receiver<DownMessage>, BusError>;

    /// Backend → every backend (itself included), at most once, unordered: news
    /// one backend learned from the uplink that the others need (an agent's hello,
    /// heartbeat or status; results stored). The in-process bus has one backend and
    /// does nothing.
    async fn publish_peer(&self, _payload: Bytes) -> Result<(), BusError> {
        Ok(())
    }

    /// Backend: the feed of [`Bus::publish_peer`] messages; None where there are no
    /// peers.
    async fn subscribe_peer(&self) -> Result<Option<mpsc::Receiver<Bytes>>, BusError> {
        Ok(None)
    }

    /// Backend → every bridge: one enrolled agent's credential, after each change.
    /// On NATS it goes into a JetStream key-value bucket, so a bridge that starts later
    /// reads it too. The in-process bus does nothing: its bridge reads the backend's
    /// own table.
    async fn put_credential(&self, _agent: &str, _cred: &AgentCredential) -> Result<(), BusError> {
        Ok(())
    }

    /// Bridge: loads every credential into `table` (returns how many), then keeps the
    /// table current in the background. Revocations and rotations arrive as changes,
    /// so [`AgentCredentials::set`] disconnects the agent. The in-process bus does
    /// nothing.
    async fn follow_credentials(&self, _table: Arc<AgentCredentials>) -> Result<usize, BusError> {
        Ok(0)
    }
}
