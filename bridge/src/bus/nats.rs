use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use imn_modules::wire::{self, Kind};
use tokio::sync::mpsc;

use super::{Bus, BusError, DownMessage, Settle, UpMessage};

/// How the NATS bus is set up.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub url: String,
    /// The JetStream stream that holds uplink messages until a backend acks them.
    pub stream: String,
    /// The durable consumer every backend shares.
    pub consumer: String,
    /// Unacked messages the server lets one consumer have out at once.
    pub max_ack_pending: i64,
}

impl NatsOptions {
    pub fn new(url: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_string(),
            stream: "IMN_UPLINK".into(),
            consumer: "imn-backend".into(),
            max_ack_pending: 20_000,
        }
    }
}

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsOptions,
    /// JetStream publishes awaiting the server's ack, at most [`PUBLISH_WINDOW`].
    inflight: Arc<tokio::sync::Semaphore>,
    /// Publishes JetStream did not ack (the agent resends: no backend ack came).
    pub publish_failures: Arc<std::sync::atomic::AtomicU64>,
}

/// JetStream publishes in flight at once: waiting for each ack in turn held the
/// bridge to one publish per round trip (about 2,300 messages/s here).
const PUBLISH_WINDOW: usize = 4096;

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

impl NatsBus {
    /// Connects (retrying in the background until the server is there) and makes sure
    /// the uplink stream exists.
    pub async fn connect(opts: NatsOptions) -> Result<NatsBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(opts.url.as_str())
            .await
            .map_err(nats_err)?;
        let js = jetstream::new(client.clone());
        let bus = NatsBus {
            client,
            js,
            opts,
            inflight: Arc::new(tokio::sync::Semaphore::new(PUBLISH_WINDOW)),
            publish_failures: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        let subjects: Vec<String> = Kind::UPLINK
            .iter()
            .map(|k| format!("imn.v1.{}.*", k.as_str()))
            .collect();
        let mut last = None;
        // The server may still be starting; give it a few seconds.
        for _ in 0..50 {
            match self
                .js
                .get_or_create_stream(stream::Config {
                    name: self.opts.stream.clone(),
                    subjects: subjects.clone(),
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::WorkQueue,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
            {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(nats_err(last.map(|e| e.to_string()).unwrap_or_default()))
    }
}

/// A de-duplication id for an uplink payload: a retransmit of the same bytes by the
/// same agent is stored once by JetStream (and the backend dedups by record id anyway).
fn msg_id(kind: Kind, agent: &str, payload: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    format!(
        "{}.{agent}.{}.{:016x}",
        kind.as_str(),
        payload.len(),
        h.finish()
    )
}

struct NatsSettle(jetstream::Message);

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(self: Box<Self>) {
        if let Err(e) = self.0.ack().await {
            tracing::warn!(error = %e, "jetstream ack failed; the message will come back");
        }
    }

    async fn nak(self: Box<Self>) {
        let _ = self
            .0
            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
            .await;
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish_up(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError> {
        let subject = wire::subject(kind, agent);
        let mut msg = PublishMessage::build().payload(payload.clone());
        if kind == Kind::Out || kind == Kind::Hello {
            msg = msg.message_id(msg_id(kind, agent, &payload));
        }
        let permit = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BusError::Closed)?;
        let ack = self.js.send_publish(subject, msg).await.map_err(nats_err)?;
        // The ack is awaited beside the next publishes. A publish JetStream refuses
        // is counted and logged; its agent gets no backend ack and sends it again.
        let failures = self.publish_failures.clone();
        tokio::spawn(async move {
            if let Err(e) = ack.await {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "jetstream did not ack an uplink publish; the agent will resend");
            }
            drop(permit);
        });
        Ok(())
    }

    async fn publish_down(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(wire::subject(kind, agent), payload)
            .await
            .map_err(nats_err)
    }

    async fn subscribe_up(&self) -> Result<mpsc::Receiver<UpMessage>, BusError> {
        let stream = self.ensure_stream().await?;
        let consumer = stream
            .get_or_create_consumer(
                &self.opts.consumer,
                pull::Config {
                    durable_name: Some(self.opts.consumer.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: self.opts.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_err)?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(async move {
            loop {
                let mut messages = match consumer.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "jetstream consumer; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(item) = messages.next().await {
                    let msg = match item {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "jetstream message error");
                            continue;
                        }
                    };
                    let Some((kind, agent)) =
                        wire::parse_subject(msg.subject.as_str()).map(|(k, a)| (k, a.to_string()))
                    else {
                        let _ = msg.ack().await;
                        continue;
                    };
                    let traceparent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("traceparent"))
                        .map(|v| v.to_string());
                    let payload = msg.payload.clone();
                    let mut up =
                        UpMessage::new(kind, agent, payload, Some(Box::new(NatsSettle(msg))));
                    up.traceparent = traceparent;
                    if tx.send(up).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn subscribe_down(&self) -> Result<mpsc::Receiver<DownMessage>, BusError> {
        let (tx, rx) = mpsc::channel(4096);
        for kind in Kind::DOWNLINK {
            let mut sub = self
                .client
                .subscribe(format!("imn.v1.{}.*", kind.as_str()))
                .await
                .map_err(nats_err)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Some((kind, agent)) = wire::parse_subject(msg.subject.as_str()) {
                        let m = DownMessage {
                            kind,
                            agent: agent.to_string(),
                            payload: msg.payload,
                        };
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(rx)
    }
}
