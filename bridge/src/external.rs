//! External broker mode: instead of running its own broker, the bridge is an MQTT
//! client of a broker the deployment already runs (Mosquitto, EMQX, a cluster of
//! them). Agents connect to that broker; the broker checks their passwords and topic
//! rules (`deploy/mosquitto/`), and the bridge still checks every message's signature
//! when `--auth` is on.
//!
//! - Uplink: the bridge subscribes to `$share/{group}/imn/v1/+/{kind}` for each uplink
//!   kind, so the broker hands each message to one bridge of the group, and several
//!   bridges split the load. Messages go on to the bus as from the embedded broker.
//! - Downlink: the bridges take commands and acks from NATS in one queue group (see
//!   `NatsOptions::downlink_queue`), so exactly one of them publishes each through the
//!   broker, which delivers it to the agent wherever it is connected.
//!
//! Nothing is lost when a bridge goes away: an agent keeps every record until the
//! backend acks it, and resends what is not acked; the backend drops duplicates.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imn_modules::wire::{self, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::auth::AgentCredentials;
use crate::broker::{BridgeError, BridgeStats};
use crate::bus::Bus;

/// How to reach the external broker.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// `mqtt://HOST[:PORT]`.
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The shared subscription group every bridge of the deployment joins.
    pub share_group: String,
    /// The bridge's MQTT client id (unique per bridge).
    pub client_id: String,
    pub max_message_bytes: usize,
    pub credentials: Arc<AgentCredentials>,
}

/// Host and port of `mqtt://HOST[:PORT]`.
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
        format!("{url:?}: must be mqtt://HOST[:PORT] (TLS to the broker is not supported yet)")
    })?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{url:?}: port must be a number from 1 to 65535"))?,
        ),
        _ => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?}: must be mqtt://HOST[:PORT]"));
    }
    Ok((host.to_string(), port))
}

/// The topic filters the bridge subscribes to.
pub fn filters(group: &str) -> Vec<String> {
    Kind::UPLINK
        .iter()
        .map(|k| format!("$share/{group}/{}", wire::topic_filter(*k)))
        .collect()
}

/// Connects to the broker and forwards both ways, reconnecting for ever. Returns once
/// the first connection is up (or fails with the broker's answer).
pub async fn run(cfg: ExternalConfig, bus: Arc<dyn Bus>) -> Result<Arc<BridgeStats>, BridgeError> {
    let (host, port) = parse_url(&cfg.url).map_err(BridgeError::Broker)?;
    let stats = Arc::new(BridgeStats::default());
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let client = connect_loop(cfg.clone(), host, port, bus.clone(), stats.clone(), up_tx);
    tokio::spawn(downlink(
        client,
        bus,
        stats.clone(),
        cfg.credentials.clone(),
    ));
    match tokio::time::timeout(Duration::from_secs(30), up_rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(BridgeError::Broker(format!("{}: {e}", cfg.url))),
        Ok(Err(_)) | Err(_) => {
            return Err(BridgeError::Broker(format!(
                "{}: no connection within 30 s",
                cfg.url
            )))
        }
    }
    tracing::info!(broker = %cfg.url, group = %cfg.share_group, client_id = %cfg.client_id, "bridge: client of an external broker");
    Ok(stats)
}

/// Starts the MQTT client; its event loop runs in a task, resolving the broker's name
/// before each attempt. `up` hears the first connection's outcome.
fn connect_loop(
    cfg: ExternalConfig,
    host: String,
    port: u16,
    bus: Arc<dyn Bus>,
    stats: Arc<BridgeStats>,
    up: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(options(&cfg, &host, port), 4096);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(10);
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let sub = client.clone();
    tokio::spawn(async move {
        let mut up = Some(up);
        let mut backoff = Duration::from_millis(200);
        let mut resolved = false;
        loop {
            if !resolved {
                // rumqttc here takes address literals only (the agent's build turns
                // its name lookup off, and features are shared): resolve first.
                match tokio::net::lookup_host((host.as_str(), port)).await {
                    Ok(mut addrs) => match addrs.next() {
                        Some(a) => {
                            eventloop.mqtt_options = options(&cfg, &a.ip().to_string(), port);
                            resolved = true;
                        }
                        None => tracing::warn!(%host, "the broker's name has no address"),
                    },
                    Err(e) => tracing::warn!(%host, error = %e, "cannot resolve the broker"),
                }
                if !resolved {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(200);
                    // A clean session: subscribe on every connection.
                    let filters = filters(&cfg.share_group)
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = sub.subscribe_many(filters).await {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                    tracing::info!(code = ?ack.code, "connected to the external broker");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!("the broker refused a subscription: check the bridge user's ACL (read on imn/v1/+/hello, hb, out, status)");
                    }
                    if let Some(up) = up.take() {
                        let _ = up.send(if refused {
                            Err("subscription refused (ACL)".into())
                        } else {
                            Ok(())
                        });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    forward_up(&p.topic, p.payload, &bus, &stats, &cfg).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "external broker connection; retrying");
                    if let Some(u) = up.take() {
                        if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)) {
                            let _ = u.send(Err(e.to_string()));
                        } else {
                            up = Some(u);
                        }
                    }
                    resolved = false;
                    let jitter = 0.75 + rand_fraction() * 0.5;
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
    client
}

fn options(cfg: &ExternalConfig, addr: &str, port: u16) -> MqttOptions {
    let mut mo = MqttOptions::new(cfg.client_id.clone(), addr, port);
    mo.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(cfg.max_message_bytes + 4096, cfg.max_message_bytes + 4096)
        .set_inflight(1000);
    if let Some(user) = &cfg.user {
        mo.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    mo
}

/// A number in [0, 1) from the clock (jitter only).
fn rand_fraction() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(n % 1000) / 1000.0
}

async fn forward_up(
    topic: &str,
    payload: Bytes,
    bus: &Arc<dyn Bus>,
    stats: &BridgeStats,
    cfg: &ExternalConfig,
) {
    let Some((agent, kind)) = wire::parse_topic(topic).filter(|(_, k)| k.is_uplink()) else {
        stats.bad_topics.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, "message on a topic that is not an IMN uplink topic");
        return;
    };
    if payload.len() > cfg.max_message_bytes {
        stats.too_large.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%agent, kind = kind.as_str(), bytes = payload.len(), "dropping an uplink message over the limit max_mqtt_payload");
        return;
    }
    let payload = match cfg.credentials.open_uplink(agent, kind, &payload) {
        Some(inner) => payload.slice_ref(inner),
        None => return,
    };
    match bus.publish_up(kind, agent, payload).await {
        Ok(()) => stats.count(kind),
        Err(e) => {
            stats.up_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, %agent, kind = kind.as_str(), "bus publish failed");
        }
    }
}

/// Publishes commands and acks from the bus through the broker (signed for their
/// agent when auth is on).
async fn downlink(
    client: AsyncClient,
    bus: Arc<dyn Bus>,
    stats: Arc<BridgeStats>,
    credentials: Arc<AgentCredentials>,
) {
    let mut rx = match bus.subscribe_down().await {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to downlink");
            return;
        }
    };
    while let Some(m) = rx.recv().await {
        let topic = wire::topic(&m.agent, m.kind);
        let payload = credentials.seal_downlink(&m.agent, m.kind, m.payload);
        // While disconnected, rumqttc queues (up to its request capacity); a command
        // lost with the connection goes again when the agent next says hello.
        if let Err(e) = client
            .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(error = %e, agent = %m.agent, "cannot publish downlink");
            continue;
        }
        stats.count(m.kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_filters() {
        assert_eq!(parse_url("mqtt://mq:1884").unwrap(), ("mq".into(), 1884));
        assert_eq!(parse_url("mqtt://mq").unwrap(), ("mq".into(), 1883));
        assert_eq!(
            parse_url("mqtt://[::1]:1885").unwrap(),
            ("::1".into(), 1885)
        );
        assert!(parse_url("mqtts://mq").unwrap_err().contains("mqtt://"));
        assert!(parse_url("mqtt://mq:0").unwrap_err().contains("port"));
        assert!(parse_url("mqtt://").is_err());
        assert_eq!(
            filters("g"),
            [
                "$share/g/imn/v1/+/hello",
                "$share/g/imn/v1/+/hb",
                "$share/g/imn/v1/+/out",
                "$share/g/imn/v1/+/status"
            ]
        );
    }
}
