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
//!
//! `mqtts://HOST[:PORT]` (8883 by default) speaks TLS to the broker (rustls with ring):
//! the broker's certificate must chain to the CA file given (`--external-ca`), or to
//! the system's CA bundle without one, and name HOST. The bridge resolves HOST itself
//! and connects to the address, but checks the certificate against HOST.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imn_proto::wire::{self, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::broker::{BridgeError, BridgeStats, BusPublishFailed, UplinkBadTopic, UplinkTooLarge};
use imn_cloud::auth::AgentCredentials;
use imn_cloud::bus::Bus;
use imn_cloud::events::emit;

/// How to reach the external broker.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// `mqtt://HOST[:PORT]`, or `mqtts://HOST[:PORT]` for TLS.
    pub url: String,
    /// With `mqtts://`: the PEM CA file the broker's certificate must chain to. `None`:
    /// the system's CA bundle ([`SYSTEM_CA_BUNDLE`]).
    pub ca: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The shared subscription group every bridge of the deployment joins.
    pub share_group: String,
    /// The bridge's MQTT client id: unique per bridge, and not guessable (a client that
    /// connects with the same id takes the session over, on a broker that does not tie
    /// client ids to user names).
    pub client_id: String,
    pub max_message_bytes: usize,
    pub credentials: Arc<AgentCredentials>,
}

/// Where Debian keeps the system's CA bundle (package ca-certificates): the roots of
/// `mqtts://` without `--external-ca`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The broker's URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

/// Parses `mqtt://HOST[:PORT]` (port 1883 by default) or `mqtts://HOST[:PORT]` (8883).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let form = || format!("{url:?}: must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]");
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else {
        return Err(form());
    };
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{url:?}: port must be a number from 1 to 65535"))
    };
    // [IPv6]:PORT, [IPv6], HOST:PORT or HOST.
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(form)?;
        match after {
            "" => (h, default_port),
            _ => (h, port_of(after.strip_prefix(':').ok_or_else(form)?)?),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#', '[', ']']) {
        return Err(form());
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Host and port of `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    parse_broker_url(url).map(|u| (u.host, u.port))
}

/// The TLS client configuration for a broker named `host`: its certificate must chain
/// to a certificate in `ca` (PEM; the system bundle when `None`) and name `host`, whatever
/// address the connection went to.
pub fn tls_config(host: &str, ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (path, flag) = match ca {
        Some(p) => (p, "--external-ca"),
        None => (Path::new(SYSTEM_CA_BUNDLE), "the system CA bundle"),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    let mut roots = RootCertStore::empty();
    if ca.is_some() {
        for c in certs {
            roots.add(c).map_err(|e| {
                format!(
                    "{flag} {}: not a usable CA certificate: {e}",
                    path.display()
                )
            })?;
        }
    } else {
        // The distribution's bundle: one root rustls cannot use is no reason to refuse
        // all the others.
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "{flag} {}: no usable CA certificate",
                path.display()
            ));
        }
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(imn_proto::tls::NamedVerifier::new(inner, name)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls error behind a failed connection, if TLS refused it (a certificate that
/// does not verify, an alert from the broker).
fn tls_error(e: &rumqttc::ConnectionError) -> Option<&rustls::Error> {
    let rumqttc::ConnectionError::Tls(t) = e else {
        return None;
    };
    match t {
        rumqttc::TlsError::TLS(r) => Some(r),
        rumqttc::TlsError::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
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
    let url = parse_broker_url(&cfg.url).map_err(BridgeError::Broker)?;
    let tls = if url.tls {
        Some(tls_config(&url.host, cfg.ca.as_deref()).map_err(BridgeError::Broker)?)
    } else {
        None
    };
    let stats = Arc::new(BridgeStats::default());
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let link = Link {
        host: url.host,
        port: url.port,
        tls,
    };
    let client = connect_loop(cfg.clone(), link, bus.clone(), stats.clone(), up_tx);
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
    tracing::info!(broker = %cfg.url, tls = url.tls, group = %cfg.share_group, client_id = %cfg.client_id, "bridge: client of an external broker");
    Ok(stats)
}

/// Where the connection goes: the broker's name and port, and TLS for `mqtts://`.
struct Link {
    host: String,
    port: u16,
    tls: Option<Arc<ClientConfig>>,
}

/// Starts the MQTT client; its event loop runs in a task, resolving the broker's name
/// before each attempt. `up` hears the first connection's outcome.
fn connect_loop(
    cfg: ExternalConfig,
    link: Link,
    bus: Arc<dyn Bus>,
    stats: Arc<BridgeStats>,
    up: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> AsyncClient {
    let Link { host, port, tls } = link;
    let (client, mut eventloop) = AsyncClient::new(options(&cfg, &host, port, tls.as_ref()), 4096);
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
                            eventloop.mqtt_options =
                                options(&cfg, &a.ip().to_string(), port, tls.as_ref());
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
                    let refused_tls = tls_error(&e).map(|t| {
                        let roots = cfg.ca.as_deref().map_or_else(
                            || format!("the system CA bundle {SYSTEM_CA_BUNDLE}"),
                            |p| format!("--external-ca {}", p.display()),
                        );
                        format!(
                            "TLS to {host}:{port} refused: {t} (the broker's certificate must \
                             chain to {roots} and name {host:?})"
                        )
                    });
                    match &refused_tls {
                        Some(m) => tracing::error!("{m}; retrying"),
                        None => {
                            tracing::warn!(error = %e, "external broker connection; retrying")
                        }
                    }
                    if let Some(u) = up.take() {
                        if let Some(m) = refused_tls {
                            // Does not heal by retrying: fail the start, as for a wrong
                            // password.
                            let _ = u.send(Err(m));
                        } else if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)) {
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

fn options(
    cfg: &ExternalConfig,
    addr: &str,
    port: u16,
    tls: Option<&Arc<ClientConfig>>,
) -> MqttOptions {
    let mut mo = MqttOptions::new(cfg.client_id.clone(), addr, port);
    if let Some(tls) = tls {
        mo.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
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
        emit(UplinkBadTopic { stats, topic });
        return;
    };
    if payload.len() > cfg.max_message_bytes {
        emit(UplinkTooLarge {
            stats,
            agent,
            kind,
            bytes: payload.len(),
            max: None,
        });
        return;
    }
    let payload = match cfg.credentials.open_uplink(agent, kind, &payload) {
        Some(inner) => payload.slice_ref(inner),
        None => return,
    };
    match bus.publish_up(kind, agent, payload).await {
        Ok(()) => stats.count(kind),
        Err(e) => emit(BusPublishFailed {
            stats,
            agent,
            kind,
            error: e,
        }),
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
        assert!(parse_url("tcp://mq").unwrap_err().contains("mqtts://"));
        assert!(parse_url("mqtt://mq:0").unwrap_err().contains("port"));
        assert!(parse_url("mqtt://").is_err());
        assert!(parse_url("mqtts://").is_err());
        assert!(parse_url("mqtt://user@mq").is_err());
        let tls = |host: &str, port| BrokerUrl {
            host: host.into(),
            port,
            tls: true,
        };
        assert_eq!(parse_broker_url("mqtts://mq").unwrap(), tls("mq", 8883));
        assert_eq!(
            parse_broker_url("mqtts://mq:8884").unwrap(),
            tls("mq", 8884)
        );
        assert_eq!(parse_broker_url("mqtts://[::1]").unwrap(), tls("::1", 8883));
        assert!(!parse_broker_url("mqtt://mq").unwrap().tls);
        assert_eq!(
            filters("g"),
            [
                "$share/g/imn/v1/+/hello",
                "$share/g/imn/v1/+/hb",
                "$share/g/imn/v1/+/out",
                "$share/g/imn/v1/+/status",
                "$share/g/imn/v1/+/upd"
            ]
        );
    }

    #[test]
    fn tls_config_needs_a_readable_ca_and_a_valid_name() {
        let missing = Path::new("/nonexistent/imn-ca.pem");
        let e = tls_config("mq", Some(missing)).unwrap_err();
        assert!(e.contains("--external-ca /nonexistent/imn-ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("imn-ext-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls_config("mq", Some(&empty)).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        if Path::new(SYSTEM_CA_BUNDLE).exists() {
            tls_config("mq.example.net", None).unwrap();
            tls_config("192.0.2.1", None).unwrap();
            assert!(tls_config("bad name!", None)
                .unwrap_err()
                .contains("server name"));
        }
    }
}
