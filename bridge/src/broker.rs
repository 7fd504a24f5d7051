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
use imn_proto::wire::{self, Kind};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{
    Access, AclHandler, Broker, Config, ConnectionSettings, Notification, RouterConfig,
    ServerSettings, TlsConfig,
};

use imn_cloud::auth::{AclAccess, AgentCredentials};
use imn_cloud::bus::{Bus, DownMessage};
use imn_cloud::events::{emit, InternalEvent};
use imn_cloud::telemetry::prom::{Family, FamilyKind};
use imn_cloud::BridgeReport;

/// The broker's TLS listener (MQTT over TLS, by convention on port 8883).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    pub listen: SocketAddr,
    /// PEM server certificate chain and private key.
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// With a CA: clients must present a certificate signed by it (mutual TLS).
    pub client_ca: Option<std::path::PathBuf>,
}

/// What one client may publish a second by default: 8 MiB, some 80,000 small results a
/// second, far more than an agent's uplink carries; a thousand agents at it would still
/// be more than a backend stores.
pub const DEFAULT_CLIENT_BYTES_PER_S: u64 = 8 * 1024 * 1024;

/// Listeners, limits and credentials of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Plain MQTT (TCP), if any.
    pub listen: Option<SocketAddr>,
    /// MQTT over TLS, if any.
    pub tls: Option<BrokerTls>,
    /// Enrolled agents; [`AgentCredentials::disabled`] lets anyone in.
    pub credentials: Arc<AgentCredentials>,
    /// The broker's own topic ACL (with auth on). Turned off only by a test that shows
    /// the bridge's signature check holds without it.
    pub broker_acl: bool,
    /// Agents (plus a few tools) connected at once.
    pub max_connections: usize,
    /// Largest MQTT payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Unacked QoS 1 publishes per connection.
    pub max_inflight: usize,
    /// Messages queued towards one subscriber before it is paused.
    pub max_outgoing_packets: u64,
    /// Uplink messages larger than this are dropped and counted by the bridge (the
    /// broker itself closes connections past `max_payload_bytes`, uncounted).
    pub max_message_bytes: usize,
    /// The most bytes a second one client may publish (0: no cap). Past it the broker
    /// stops reading that client's socket until the rate allows, so one client sending
    /// as fast as it can is slowed by TCP, and the others' messages keep flowing.
    pub max_client_bytes_per_s: u64,
}

impl BrokerConfig {
    /// A plain listener on `listen`, auth off, default limits.
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen: Some(listen),
            ..BrokerConfig::default()
        }
    }
}

impl Default for BrokerConfig {
    /// No listener yet, auth off, default limits.
    fn default() -> BrokerConfig {
        BrokerConfig {
            listen: None,
            tls: None,
            credentials: Arc::new(AgentCredentials::disabled()),
            broker_acl: true,
            max_connections: 50_000,
            max_payload_bytes: 1024 * 1024,
            max_inflight: 200,
            max_outgoing_packets: 1_000,
            max_message_bytes: 512 * 1024,
            max_client_bytes_per_s: DEFAULT_CLIENT_BYTES_PER_S,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("the broker has no listener: give a plain or a TLS address")]
    NoListener,
    #[error("TLS file {path}: {message}")]
    TlsFile { path: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(String),
    #[error(transparent)]
    Bus(#[from] imn_cloud::bus::BusError),
}

/// Counters the bridge keeps, for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub up_messages: AtomicU64,
    pub down_messages: AtomicU64,
    /// By kind, in the order of [`Kind::UPLINK`] and [`Kind::DOWNLINK`].
    pub up_by_kind: [AtomicU64; Kind::UPLINK.len()],
    pub down_by_kind: [AtomicU64; Kind::DOWNLINK.len()],
    pub up_errors: AtomicU64,
    pub bad_topics: AtomicU64,
    pub too_large: AtomicU64,
}

/// [`BridgeStats`] with the credentials' counters, for the backend of `imn up`.
struct Report {
    stats: Arc<BridgeStats>,
    credentials: Arc<AgentCredentials>,
}

impl BridgeReport for Report {
    fn health(&self) -> serde_json::Value {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "up_messages": load(&s.up_messages),
            "down_messages": load(&s.down_messages),
            "up_errors": load(&s.up_errors),
            "bad_topics": load(&s.bad_topics),
            "too_large": load(&s.too_large),
        })
    }

    fn families(&self) -> Vec<Family> {
        self.stats.families(&self.credentials.stats)
    }
}

impl BridgeStats {
    pub(crate) fn count(&self, kind: Kind) {
        let (total, by_kind, kinds) = if kind.is_uplink() {
            (&self.up_messages, &self.up_by_kind[..], &Kind::UPLINK[..])
        } else {
            (
                &self.down_messages,
                &self.down_by_kind[..],
                &Kind::DOWNLINK[..],
            )
        };
        total.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = kinds.iter().position(|k| *k == kind) {
            by_kind[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What this bridge reports through a backend in the same process, with the
    /// counters of the credentials it checks.
    pub fn report(self: Arc<Self>, credentials: Arc<AgentCredentials>) -> Arc<dyn BridgeReport> {
        Arc::new(Report {
            stats: self,
            credentials,
        })
    }

    /// The bridge's metric families, read now.
    pub fn families(&self, auth: &imn_cloud::auth::AuthStats) -> Vec<Family> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut messages = Family::new(
            "imn_bridge_messages_total",
            "imn.bridge.messages",
            "{message}",
            FamilyKind::Counter,
            "Messages the bridge forwarded, agents to bus (up) and bus to agents (down).",
        );
        for (k, n) in Kind::UPLINK.iter().zip(&self.up_by_kind) {
            messages.push(
                vec![("direction", "up".into()), ("kind", k.as_str().into())],
                load(n),
            );
        }
        for (k, n) in Kind::DOWNLINK.iter().zip(&self.down_by_kind) {
            messages.push(
                vec![("direction", "down".into()), ("kind", k.as_str().into())],
                load(n),
            );
        }
        let mut refused = Family::new(
            "imn_bridge_refused_total",
            "imn.bridge.refused",
            "{message}",
            FamilyKind::Counter,
            "Logins, messages and subscriptions the bridge refused, by reason.",
        );
        for (reason, n) in [
            ("login", &auth.logins_refused),
            ("publish_acl", &auth.publish_denied),
            ("subscribe_acl", &auth.subscribe_denied),
            ("will_acl", &auth.will_denied),
            ("signature", &auth.unsigned_or_forged),
            ("bad_topic", &self.bad_topics),
            ("too_large", &self.too_large),
        ] {
            refused.push(vec![("reason", reason.into())], load(n));
        }
        vec![
            Family::new(
                "imn_bridge_connections",
                "imn.bridge.connections",
                "{connection}",
                FamilyKind::Gauge,
                "MQTT clients connected to the embedded broker now.",
            )
            .value(rumqttd::open_connections() as f64),
            messages,
            refused,
            Family::new(
                "imn_bridge_bus_errors_total",
                "imn.bridge.bus_errors",
                "{message}",
                FamilyKind::Counter,
                "Uplink messages the bus refused (the agent sends them again).",
            )
            .value(load(&self.up_errors)),
            Family::new(
                "imn_metric_series_dropped_total",
                "imn.metric.series_dropped",
                "{series}",
                FamilyKind::Counter,
                "Label sets not recorded because an instrument had too many.",
            )
            .value(imn_cloud::telemetry::prom::series_dropped() as f64),
        ]
    }
}

/// With tracing on, a command joins its request's trace: a `bridge downlink` span,
/// child of the sender's span (from the bus, else from the envelope), and the
/// envelope carries this span on to the agent, which hands it back with the result.
/// Returns the span (ended by the caller once the command is with the broker) and the
/// re-encoded payload.
fn trace_command(m: &DownMessage) -> Option<(opentelemetry::Context, Bytes)> {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
    use opentelemetry::KeyValue;
    let tracer = imn_cloud::telemetry::tracer(imn_cloud::telemetry::Component::Bridge)?;
    // Re-encoded in the version it came in: the backend chose the agent's.
    let Ok((version, wire::Envelope::Command(mut cmd))) = wire::decode_versioned(&m.payload) else {
        return None;
    };
    let parent = m
        .traceparent
        .as_deref()
        .or(cmd.traceparent.as_deref())
        .and_then(imn_cloud::telemetry::context_from)?;
    let span = tracer
        .span_builder("bridge downlink")
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "mqtt"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", wire::topic(&m.agent, m.kind)),
            KeyValue::new("imn.agent.id", m.agent.clone()),
            KeyValue::new("imn.request.id", cmd.id.clone()),
        ])
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    cmd.traceparent = imn_cloud::telemetry::traceparent(&cx);
    Some((
        cx,
        Bytes::from(wire::encode_for(version, &wire::Envelope::Command(cmd))),
    ))
}

fn connection_settings(cfg: &BrokerConfig) -> ConnectionSettings {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: cfg.max_payload_bytes,
        max_inflight_count: cfg.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        max_inbound_bytes_per_s: (cfg.max_client_bytes_per_s > 0)
            .then_some(cfg.max_client_bytes_per_s),
    };
    if cfg.credentials.is_enabled() {
        let creds = cfg.credentials.clone();
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = creds.login(&client_id, &user, &pass);
            async move { ok }
        });
    }
    connections
}

fn rumqttd_config(cfg: &BrokerConfig) -> Config {
    let mut servers = HashMap::new();
    if let Some(listen) = cfg.listen {
        servers.insert(
            "1".to_string(),
            ServerSettings {
                name: "imn-v4".into(),
                listen,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connection_settings(cfg),
            },
        );
    }
    if let Some(tls) = &cfg.tls {
        servers.insert(
            "2".to_string(),
            ServerSettings {
                name: "imn-v4-tls".into(),
                listen: tls.listen,
                tls: Some(TlsConfig::Rustls {
                    capath: tls.client_ca.as_ref().map(|p| p.display().to_string()),
                    certpath: tls.cert.display().to_string(),
                    keypath: tls.key.display().to_string(),
                }),
                next_connection_delay_ms: 0,
                connections: connection_settings(cfg),
            },
        );
    }
    let acl: Option<AclHandler> = (cfg.credentials.is_enabled() && cfg.broker_acl).then(|| {
        let creds = cfg.credentials.clone();
        Arc::new(move |client_id: &str, topic: &str, access: Access| {
            // A refusal is counted and logged by the credentials (event AclDenied).
            let access = match access {
                Access::Publish => AclAccess::Publish,
                Access::Subscribe => AclAccess::Subscribe,
                Access::Will => AclAccess::Will,
            };
            creds.allowed(client_id, topic, access)
        }) as AclHandler
    });
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: cfg.max_outgoing_packets,
            max_segment_size: 4 * cfg.max_payload_bytes.max(256 * 1024),
            max_segment_count: 4,
            acl,
            ..Default::default()
        },
        v4: Some(servers),
        ..Default::default()
    }
}

/// Checks that a TLS file can be read, so a typo is an error at start and not a log
/// line from the broker's thread.
fn readable(path: &std::path::Path) -> Result<(), BridgeError> {
    std::fs::read(path)
        .map(drop)
        .map_err(|e| BridgeError::TlsFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Starts the broker on its own threads and returns the bridge's local link.
pub fn start_broker(cfg: &BrokerConfig) -> Result<(LinkTx, LinkRx), BridgeError> {
    // rumqttd only logs a failed bind from its thread; check first, so a taken port is
    // an error the caller can show.
    let mut listens: Vec<SocketAddr> = cfg.listen.into_iter().collect();
    if let Some(tls) = &cfg.tls {
        readable(&tls.cert)?;
        readable(&tls.key)?;
        if let Some(ca) = &tls.client_ca {
            readable(ca)?;
        }
        listens.push(tls.listen);
    }
    if listens.is_empty() {
        return Err(BridgeError::NoListener);
    }
    for addr in &listens {
        drop(
            std::net::TcpListener::bind(addr).map_err(|source| BridgeError::Bind {
                addr: *addr,
                source,
            })?,
        );
    }
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
    // rumqttd binds on its own thread: return once its listeners are up (at most 5 s),
    // so that a client may connect as soon as the broker is reported listening.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !listens.iter().all(|a| rumqttd::listening(*a)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for listen in listens.iter().filter(|a| !rumqttd::listening(**a)) {
        tracing::warn!(%listen, "the embedded broker is not listening yet");
    }
    Ok((link_tx, link_rx))
}

/// Forwards agents' messages from the broker to the bus, until the link closes.
pub async fn uplink(
    mut link_rx: LinkRx,
    bus: Arc<dyn Bus>,
    stats: Arc<BridgeStats>,
    credentials: Arc<AgentCredentials>,
    max_message_bytes: usize,
) {
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
                    emit(UplinkBadTopic {
                        stats: &stats,
                        topic: &topic,
                    });
                    continue;
                };
                let payload: Bytes = f.publish.payload;
                if payload.len() > max_message_bytes {
                    emit(UplinkTooLarge {
                        stats: &stats,
                        agent,
                        kind,
                        bytes: payload.len(),
                        max: Some(max_message_bytes),
                    });
                    continue;
                }
                let payload = match credentials.open_uplink(agent, kind, &payload) {
                    Some(inner) => payload.slice_ref(inner),
                    None => continue,
                };
                match bus.publish_up(kind, agent, payload).await {
                    Ok(()) => {
                        stats.count(kind);
                    }
                    Err(e) => {
                        // The agent resends after its resend timeout: nothing is lost.
                        emit(BusPublishFailed {
                            stats: &stats,
                            agent,
                            kind,
                            error: e,
                        });
                    }
                }
            }
            // The local link's buffer filled and the router paused it; it stays paused
            // for good until woken (in one test, after 300 of 20,000 messages).
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

/// Forwards commands and acks from the bus to agents (signed for their agent when auth
/// is on), and disconnects agents whose credentials were revoked or rotated, until the
/// bus closes.
pub async fn downlink(
    mut link_tx: LinkTx,
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
    let mut kicks = credentials.take_kicks();
    loop {
        let kick = async {
            match kicks.as_mut() {
                Some(k) => k.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return };
                let topic = wire::topic(&m.agent, m.kind);
                let traced = (m.kind == Kind::Cmd).then(|| trace_command(&m)).flatten();
                let (cx, payload) = match traced {
                    Some((cx, payload)) => (Some(cx), payload),
                    None => (None, m.payload),
                };
                let payload = credentials.seal_downlink(&m.agent, m.kind, payload);
                if let Err(e) = link_tx.publish(topic, payload) {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
                if let Some(cx) = cx {
                    use opentelemetry::trace::TraceContextExt;
                    let _attached = cx.clone().attach();
                    tracing::debug!(agent = %m.agent, "command handed to the broker");
                    cx.span().end();
                }
                stats.count(m.kind);
            }
            id = kick => {
                let Some(id) = id else {
                    kicks = None;
                    continue;
                };
                tracing::info!(agent = %id, "disconnecting: credentials revoked or rotated");
                if let Err(e) = link_tx.disconnect_client(&id) {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
        }
    }
}

/// Starts the broker and both forwarding directions.
pub async fn run(cfg: BrokerConfig, bus: Arc<dyn Bus>) -> Result<Arc<BridgeStats>, BridgeError> {
    let (link_tx, link_rx) = start_broker(&cfg)?;
    let stats = Arc::new(BridgeStats::default());
    tokio::spawn(uplink(
        link_rx,
        bus.clone(),
        stats.clone(),
        cfg.credentials.clone(),
        cfg.max_message_bytes,
    ));
    tokio::spawn(downlink(
        link_tx,
        bus,
        stats.clone(),
        cfg.credentials.clone(),
    ));
    tracing::info!(
        listen = ?cfg.listen,
        tls = ?cfg.tls.as_ref().map(|t| t.listen),
        mutual_tls = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        auth = cfg.credentials.is_enabled(),
        "bridge: embedded broker listening"
    );
    Ok(stats)
}

// ---------------------------------------------------------------- internal events

// The bridge's own operational events (see `imn_cloud::events`): each one's `emit`
// counts it in [`BridgeStats`] (`/health`, `/metrics`) and writes its log line.

/// An uplink message on a topic that is not an IMN uplink topic was dropped.
/// `imn_bridge_refused_total{reason="bad_topic"}`, warn.
pub(crate) struct UplinkBadTopic<'a> {
    pub stats: &'a BridgeStats,
    pub topic: &'a str,
}

impl InternalEvent for UplinkBadTopic<'_> {
    fn emit(self) {
        self.stats.bad_topics.fetch_add(1, Ordering::Relaxed);
        let topic = self.topic;
        tracing::warn!(%topic, "message on a topic that is not an IMN uplink topic");
    }
}

/// An uplink message over the bridge's size limit was dropped.
/// `imn_bridge_refused_total{reason="too_large"}`, warn; the embedded broker's bridge
/// logs the limit too (`max`).
pub(crate) struct UplinkTooLarge<'a> {
    pub stats: &'a BridgeStats,
    pub agent: &'a str,
    pub kind: Kind,
    pub bytes: usize,
    pub max: Option<usize>,
}

impl InternalEvent for UplinkTooLarge<'_> {
    fn emit(self) {
        self.stats.too_large.fetch_add(1, Ordering::Relaxed);
        let (agent, kind, bytes) = (self.agent, self.kind, self.bytes);
        match self.max {
            Some(max) => {
                tracing::warn!(%agent, kind = kind.as_str(), bytes, max_mqtt_payload = max, "dropping an uplink message over the limit max_mqtt_payload")
            }
            None => {
                tracing::warn!(%agent, kind = kind.as_str(), bytes, "dropping an uplink message over the limit max_mqtt_payload")
            }
        }
    }
}

/// The bus refused an uplink message (the agent sends it again).
/// `imn_bridge_bus_errors_total`, warn.
pub(crate) struct BusPublishFailed<'a, E: std::fmt::Display> {
    pub stats: &'a BridgeStats,
    pub agent: &'a str,
    pub kind: Kind,
    pub error: E,
}

impl<E: std::fmt::Display> InternalEvent for BusPublishFailed<'_, E> {
    fn emit(self) {
        self.stats.up_errors.fetch_add(1, Ordering::Relaxed);
        let (e, agent, kind) = (self.error, self.agent, self.kind);
        tracing::warn!(error = %e, %agent, kind = kind.as_str(), "bus publish failed");
    }
}
