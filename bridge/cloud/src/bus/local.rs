use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use imn_proto::wire::Kind;
use tokio::sync::mpsc;

use super::{Bus, BusError, DownMessage, UpMessage};

/// In-process bus: two bounded channels. A full channel makes the publisher wait,
/// which is the backpressure the MQTT side needs.
pub struct LocalBus {
    up_tx: mpsc::Sender<UpMessage>,
    up_rx: Mutex<Option<mpsc::Receiver<UpMessage>>>,
    down_tx: mpsc::Sender<DownMessage>,
    down_rx: Mutex<Option<mpsc::Receiver<DownMessage>>>,
}

impl LocalBus {
    pub fn new(capacity: usize) -> LocalBus {
        let (up_tx, up_rx) = mpsc::channel(capacity);
        let (down_tx, down_rx) = mpsc::channel(capacity);
        LocalBus {
            up_tx,
            up_rx: Mutex::new(Some(up_rx)),
            down_tx,
            down_rx: Mutex::new(Some(down_rx)),
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>, what: &'static str) -> Result<T, BusError> {
    slot.lock()
        .map_err(|_| BusError::Closed)?
        .take()
        .ok_or(BusError::AlreadySubscribed(what))
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish_up(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError> {
        self.up_tx
            .send(UpMessage::new(kind, agent.to_string(), payload, None))
            .await
            .map_err(|_| BusError::Closed)
    }

    async fn publish_down_traced(
        &self,
        kind: Kind,
        agent: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        self.down_tx
            .send(DownMessage {
                kind,
                agent: agent.to_string(),
                payload,
                traceparent: traceparent.map(str::to_string),
            })
            .await
            .map_err(|_| BusError::Closed)
    }

    async fn subscribe_up(&self) -> Result<mpsc::Receiver<UpMessage>, BusError> {
        take(&self.up_rx, "uplink")
    }

    async fn subscribe_down(&self) -> Result<mpsc::Receiver<DownMessage>, BusError> {
        take(&self.down_rx, "downlink")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn carries_both_ways_once() {
        let bus = LocalBus::new(8);
        let mut up = bus.subscribe_up().await.unwrap();
        assert!(bus.subscribe_up().await.is_err());
        bus.publish_up(Kind::Out, "a", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let m = up.recv().await.unwrap();
        assert_eq!(
            (m.kind, m.agent.as_str(), &m.payload[..]),
            (Kind::Out, "a", &b"x"[..])
        );
        m.ack().await;
        let mut down = bus.subscribe_down().await.unwrap();
        bus.publish_down(Kind::Cmd, "b", Bytes::from_static(b"y"))
            .await
            .unwrap();
        assert_eq!(down.recv().await.unwrap().agent, "b");
    }
}
