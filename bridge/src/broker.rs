//! The embedded MQTT broker (rumqttd) and the forwarding between it and the bus.
//!
//! rumqttd's defaults refuse every client (limits of 0), so every limit is set here.
//! It PUBACKs from memory and persists nothing, which is why nothing in IMN treats an
//! MQTT ack as "stored": the backend's own ack is the only proof.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use imn_modules::wire::{self, Kind};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};

use crate::bus::Bus;

/// Limits of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Agents (plus a few tools) connected at once.
    pub max_connections: usize,
    /// Largest MQTT payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Unacked QoS 1 publishes per connection.
    pub max_inflight: usize,
    /// Messages queued towards one subscriber before it is paused.
    pub max_outgoing_packets: u64,
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            max_connections: 50_000,
            max_payload_bytes: 1024 * 1024,
            max_inflight: 200,
            max_outgoing_packets: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(String),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// Counters the bridge keeps (exported as metrics later).
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub up_messages: AtomicU64,
    pub down_messages: AtomicU64,
    pub up_errors: AtomicU64,
    pub bad_topics: AtomicU64,
}

fn rumqttd_config(cfg: &BrokerConfig) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: cfg.max_payload_bytes,
        max_inflight_count: cfg.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "imn-v4".into(),
        listen: cfg.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: cfg.max_outgoing_packets,
            max_segment_size: 4 * cfg.max_payload_bytes.max(256 * 1024),
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker on its own threads and returns the bridge's local link.
pub fn start_broker(cfg: &BrokerConfig) -> Result<(LinkTx, LinkRx), BridgeError> {
    // rumqttd only logs a failed bind from its thread; check first, so a taken port is
    // an error the caller can show.
    drop(
        std::net::TcpListener::bind(cfg.listen).map_err(|source| BridgeError::Bind {
            addr: cfg.listen,
            source,
        })?,
    );
    let mut broker = Broker::new(rumqttd_config(cfg));
    let (mut link_tx, link_rx) = broker
        .link("imn-bridge")
        .map_err(|e| BridgeError::Broker(e.to_string()))?;
    for kind in Kind::UPLINK {
        link_tx
            .subscribe(wire::topic_filter(kind))
            .map_err(|e| BridgeError::Broker(e.to_string()))?;
    }
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BridgeError::Broker(e.to_string()))?;
    Ok((link_tx, link_rx))
}

/// Forwards agents' messages from the broker to the bus, until the link closes.
pub async fn uplink(mut link_rx: LinkRx, bus: Arc<dyn Bus>, stats: Arc<BridgeStats>) {
    loop {
        let notification = match link_rx.next().await {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "broker link closed");
                return;
            }
        };
        match notification {
            Notification::Forward(f) => {
                let topic = String::from_utf8_lossy(&f.publish.topic);
                let Some((agent, kind)) = wire::parse_topic(&topic).filter(|(_, k)| k.is_uplink())
                else {
                    stats.bad_topics.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%topic, "message on a topic that is not an IMN uplink topic");
                    continue;
                };
                let payload: Bytes = f.publish.payload;
                match bus.publish_up(kind, agent, payload).await {
                    Ok(()) => {
                        stats.up_messages.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // The agent resends after its resend timeout: nothing is lost.
                        stats.up_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, %agent, kind = kind.as_str(), "bus publish failed");
                    }
                }
            }
            // The local link's buffer filled and the router paused it; it stays paused
            // until woken (PITFALLS.md).
            Notification::Unschedule => {
                if let Err(e) = link_rx.wake().await {
                    tracing::error!(error = %e, "cannot wake broker link");
                    return;
                }
            }
            _ => {}
        }
    }
}

/// Forwards commands and acks from the bus to agents, until the bus closes.
pub async fn downlink(mut link_tx: LinkTx, bus: Arc<dyn Bus>, stats: Arc<BridgeStats>) {
    let mut rx = match bus.subscribe_down().await {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to downlink");
            return;
        }
    };
    while let Some(m) = rx.recv().await {
        let topic = wire::topic(&m.agent, m.kind);
        if let Err(e) = link_tx.publish(topic, m.payload) {
            tracing::error!(error = %e, "broker link closed");
            return;
        }
        stats.down_messages.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts the broker and both forwarding directions.
pub async fn run(cfg: BrokerConfig, bus: Arc<dyn Bus>) -> Result<Arc<BridgeStats>, BridgeError> {
    let (link_tx, link_rx) = start_broker(&cfg)?;
    let stats = Arc::new(BridgeStats::default());
    tokio::spawn(uplink(link_rx, bus.clone(), stats.clone()));
    tokio::spawn(downlink(link_tx, bus, stats.clone()));
    tracing::info!(listen = %cfg.listen, "bridge: embedded broker listening");
    Ok(stats)
}
