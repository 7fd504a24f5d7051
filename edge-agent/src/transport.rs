//! The MQTT transport: rumqttc behind embedded-svc's async MQTT client traits, so an
//! ESP-IDF build can swap in esp-idf-svc without touching the sync logic.
//!
//! rumqttc's event loop runs in its own task and hands events over a channel; that
//! makes [`MqttConnection::next`] cancel-safe, and keeps reconnect backoff in one place.

use std::time::Duration;

use embedded_svc::mqtt::client::asynch::{
    Client, Connection, Details, ErrorType, Event, EventPayload, MessageId, Publish, QoS,
};
use imn_proto::auth::{self as wauth, MessageKey};
use rumqttc::{AsyncClient, ConnectReturnCode, EventLoop, LastWill, MqttOptions, Packet};
use tokio::sync::mpsc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("mqtt request queue: {0}")]
    Client(String),
    #[error("mqtt connection: {0}")]
    Connection(String),
    #[error("mqtt event loop stopped")]
    Closed,
}

/// What the agent needs to open a connection.
#[derive(Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    /// The brokers, tried in turn from one picked by the client id (so agents spread
    /// over a deployment's bridges); a failed connection moves to the next.
    pub brokers: Vec<Endpoint>,
    pub token: Option<String>,
    /// Published by the broker if the agent vanishes: `(topic, payload)`, QoS 1, retained.
    pub last_will: (String, Vec<u8>),
    pub connect_timeout_s: u64,
    pub keepalive_s: u64,
    pub max_packet_bytes: usize,
}

/// One broker.
#[derive(Clone)]
pub struct Endpoint {
    /// A name (resolved by the agent before every connection attempt) or an address.
    pub host: String,
    pub port: u16,
    /// TLS settings, for `mqtts://`.
    #[cfg(feature = "tls")]
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Where a client starts in the broker list: the same for the same id, spread over
/// ids (FNV-1a).
fn first_broker(client_id: &str, n: usize) -> usize {
    let h = client_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % n.max(1) as u64) as usize
}

/// The publishing and subscribing half.
#[derive(Clone)]
pub struct MqttClient {
    client: AsyncClient,
    /// With a token: every publish is signed with the agent's message key.
    key: Option<MessageKey>,
}

/// The event half.
pub struct MqttConnection {
    rx: mpsc::Receiver<Result<Packet, TransportError>>,
}

/// One incoming event, owned, so its payload can borrow from it.
pub struct MqttEvent(Result<Packet, TransportError>);

fn qos(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// rumqttc's options for one connection attempt to `addr` (an address literal: rumqttc
/// would otherwise resolve names with the C library, which a static binary cannot).
fn mqtt_options(opts: &ConnectOptions, broker: &Endpoint, addr: &str) -> MqttOptions {
    let mut mo = MqttOptions::new(opts.client_id.clone(), addr, broker.port);
    let (will_topic, will) = &opts.last_will;
    let will = match &opts.token {
        Some(t) => wauth::sign(&wauth::message_key(t), will_topic, will),
        None => will.clone(),
    };
    mo.set_keep_alive(Duration::from_secs(opts.keepalive_s))
        .set_clean_session(true)
        .set_max_packet_size(opts.max_packet_bytes, opts.max_packet_bytes)
        .set_inflight(100)
        .set_last_will(LastWill::new(
            will_topic.clone(),
            will,
            rumqttc::QoS::AtLeastOnce,
            true,
        ));
    if let Some(token) = &opts.token {
        mo.set_credentials(opts.client_id.clone(), token.clone());
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &broker.tls {
        mo.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    mo
}

/// Creates the client and starts the event loop task.
pub fn connect(opts: ConnectOptions) -> (MqttClient, MqttConnection) {
    let first = &opts.brokers[first_broker(&opts.client_id, opts.brokers.len())];
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&opts, first, &first.host), 256);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(opts.connect_timeout_s);
    // Nagle would hold small acks and commands back for tens of ms.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::channel(256);
    let key = opts.token.as_deref().map(wauth::message_key);
    tokio::spawn(pump(eventloop, opts, tx));
    (MqttClient { client, key }, MqttConnection { rx })
}

/// With a key, a received message must carry the cloud's signature for this topic; it
/// is replaced by the payload inside. `false`: drop it (logged).
fn open_received(key: Option<&MessageKey>, p: &mut rumqttc::Publish) -> bool {
    let Some(key) = key else {
        return true;
    };
    match wauth::verify(key, &p.topic, &p.payload) {
        Ok(inner) => {
            p.payload = p.payload.slice_ref(inner);
            true
        }
        Err(e) => {
            tracing::warn!(topic = %p.topic, reason = e.reason(), "dropping a message not signed by the cloud");
            false
        }
    }
}

async fn pump(
    mut eventloop: EventLoop,
    opts: ConnectOptions,
    tx: mpsc::Sender<Result<Packet, TransportError>>,
) {
    let key = opts.token.as_deref().map(wauth::message_key);
    let mut backoff = Duration::from_millis(200);
    // Before every connection attempt the broker's name is looked up again: a broker
    // that moved is found at its new address.
    let mut resolve = true;
    let mut at = first_broker(&opts.client_id, opts.brokers.len());
    // A connection that failed, or ended, moves to the next broker of the list.
    let next = |at: &mut usize| *at = (*at + 1) % opts.brokers.len();
    loop {
        let broker = &opts.brokers[at];
        let step = if resolve {
            imn_resolver::lookup(&broker.host)
                .await
                .and_then(|ips| {
                    ips.first()
                        .copied()
                        .ok_or_else(|| format!("{:?} has no address", broker.host))
                })
                .map(|ip| {
                    eventloop.mqtt_options = mqtt_options(&opts, broker, &ip.to_string());
                    resolve = false;
                    None
                })
                .map_err(|e| {
                    next(&mut at);
                    TransportError::Connection(e)
                })
        } else {
            eventloop.poll().await.map(Some).map_err(|e| {
                resolve = true;
                next(&mut at);
                TransportError::Connection(e.to_string())
            })
        };
        match step {
            Ok(None) => {}
            Ok(Some(rumqttc::Event::Incoming(mut packet))) => {
                if let Packet::Publish(p) = &mut packet {
                    if !open_received(key.as_ref(), p) {
                        continue;
                    }
                }
                if matches!(&packet, Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success)
                {
                    backoff = Duration::from_millis(200);
                }
                let forward = matches!(
                    packet,
                    Packet::ConnAck(_)
                        | Packet::Publish(_)
                        | Packet::Disconnect
                        | Packet::SubAck(_)
                );
                if forward && tx.send(Ok(packet)).await.is_err() {
                    return;
                }
            }
            Ok(Some(rumqttc::Event::Outgoing(_))) => {}
            Err(e) => {
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                // Jittered exponential backoff: a thousand agents that lost the same
                // broker must not all come back in the same millisecond.
                let jitter = (crate::random_u64() >> 11) as f64 / (1u64 << 53) as f64 * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl ErrorType for MqttClient {
    type Error = TransportError;
}
impl ErrorType for MqttConnection {
    type Error = TransportError;
}
impl ErrorType for MqttEvent {
    type Error = TransportError;
}

impl Client for MqttClient {
    async fn subscribe(&mut self, topic: &str, q: QoS) -> Result<MessageId, Self::Error> {
        self.client
            .try_subscribe(topic, qos(q))
            .map_err(|e| TransportError::Client(e.to_string()))?;
        Ok(0)
    }

    async fn unsubscribe(&mut self, topic: &str) -> Result<MessageId, Self::Error> {
        self.client
            .try_unsubscribe(topic)
            .map_err(|e| TransportError::Client(e.to_string()))?;
        Ok(0)
    }
}

impl Publish for MqttClient {
    /// Never waits: a full request queue is an error the caller retries later. (The
    /// caller also drives the event loop's channel, so waiting here could deadlock.)
    async fn publish(
        &mut self,
        topic: &str,
        q: QoS,
        retain: bool,
        payload: &[u8],
    ) -> Result<MessageId, Self::Error> {
        let payload = match &self.key {
            Some(key) => wauth::sign(key, topic, payload),
            None => payload.to_vec(),
        };
        self.client
            .try_publish(topic, qos(q), retain, payload)
            .map_err(|e| TransportError::Client(e.to_string()))?;
        Ok(0)
    }
}

impl Connection for MqttConnection {
    type Event<'a> = MqttEvent;

    async fn next(&mut self) -> Result<Self::Event<'_>, Self::Error> {
        self.rx
            .recv()
            .await
            .map(MqttEvent)
            .ok_or(TransportError::Closed)
    }
}

impl Event for MqttEvent {
    fn payload(&self) -> EventPayload<'_, Self::Error> {
        match &self.0 {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                EventPayload::Connected(ack.session_present)
            }
            Ok(Packet::ConnAck(_)) | Ok(Packet::Disconnect) => EventPayload::Disconnected,
            Ok(Packet::SubAck(s)) => EventPayload::Subscribed(u32::from(s.pkid)),
            Ok(Packet::Publish(p)) => EventPayload::Received {
                id: u32::from(p.pkid),
                topic: Some(p.topic.as_str()),
                data: &p.payload,
                details: Details::Complete,
            },
            Ok(_) => EventPayload::BeforeConnect,
            Err(e) => EventPayload::Error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_broker;

    #[test]
    fn clients_spread_over_the_broker_list() {
        let mut per = [0usize; 2];
        for i in 0..1000 {
            per[first_broker(&format!("agent-{i}"), 2)] += 1;
        }
        assert!(per.iter().all(|&n| n > 400), "{per:?}");
        assert_eq!(first_broker("a", 1), 0);
        assert_eq!(first_broker("a", 3), first_broker("a", 3), "stable");
    }
}
