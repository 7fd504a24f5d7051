use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use imn_bridge::{broker, BrokerConfig, BrokerTls};
use imn_cloud::bus::{Bus, NatsBus, NatsOptions};
use imn_cloud::{telemetry, AgentCredentials};

/// IMN bridge: embedded MQTT broker for agents, forwarding to and from NATS.
#[derive(Debug, Parser)]
#[command(name = "imn-bridge", version)]
struct Flags {
    /// Plain MQTT (3.1.1) address for agents, or `off`.
    #[arg(long, env = "IMN_MQTT", default_value = "127.0.0.1:1883", value_parser = imn_cloud::addr_or_off)]
    // Fully qualified: clap then takes the parser's Option as the value, not as "optional".
    mqtt: ::std::option::Option<SocketAddr>,
    /// MQTT over TLS (8883 by convention), with --tls-cert and --tls-key.
    #[arg(long, env = "IMN_MQTTS")]
    mqtts: Option<SocketAddr>,
    /// PEM certificate chain of the MQTT over TLS listener.
    #[arg(long, env = "IMN_TLS_CERT", requires = "mqtts")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the MQTT over TLS listener.
    #[arg(long, env = "IMN_TLS_KEY", requires = "mqtts")]
    tls_key: Option<PathBuf>,
    /// Require MQTT clients over TLS to show a certificate signed by this CA.
    #[arg(long, env = "IMN_MQTT_CLIENT_CA", requires = "mqtts")]
    mqtt_client_ca: Option<PathBuf>,
    /// Only enrolled agents connect, each only as itself. The credentials come from the
    /// backend over NATS (run the backend with --auth too).
    #[arg(long, env = "IMN_AUTH")]
    auth: bool,
    /// The NATS server shared with the backends; several (a cluster's nodes) separated
    /// by commas.
    #[arg(long, env = "IMN_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Replicas of the JetStream stream and credentials bucket (3 on a 3-node NATS
    /// cluster). Default: leave them as they are (1 when new).
    #[arg(long, env = "IMN_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_replicas: Option<u8>,
    /// Largest MQTT payload accepted, in bytes (limit max_mqtt_payload).
    #[arg(long, env = "IMN_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    max_payload: usize,
    /// Most agents connected at once.
    #[arg(long, env = "IMN_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Most bytes a second one agent may publish; past it the broker reads its socket
    /// only as fast (0: no cap).
    #[arg(long, env = "IMN_MAX_CLIENT_BYTES_PER_S", default_value_t = imn_bridge::broker::DEFAULT_CLIENT_BYTES_PER_S)]
    max_client_bytes_per_s: u64,
    /// Listen beyond loopback without auth or without TLS: anyone who reaches the port
    /// can connect (as any agent, without auth), and traffic can be read on the way.
    #[arg(long)]
    insecure_i_know: bool,
    /// Prometheus `/metrics` listener, or `off`.
    #[arg(long, env = "IMN_METRICS", default_value = "127.0.0.1:9102", value_parser = imn_cloud::addr_or_off)]
    metrics: ::std::option::Option<SocketAddr>,
    /// OTLP/gRPC collector for traces, metrics and logs (`http://host:4317`). Without
    /// it, OTEL_EXPORTER_OTLP_ENDPOINT decides; without that, nothing is exported.
    #[arg(long, env = "IMN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// External broker mode: be an MQTT client of this broker (`mqtt://HOST[:PORT]`,
    /// or `mqtts://HOST[:PORT]` for TLS, port 8883 by default; e.g. Mosquitto) instead
    /// of running one; agents connect to it. Several bridges split the uplink through a
    /// shared subscription.
    #[arg(long, env = "IMN_EXTERNAL_BROKER")]
    external_broker: Option<String>,
    /// With `mqtts://`: PEM file of the CA the broker's certificate must chain to (it
    /// must also name the URL's host). Default: the system's CA bundle.
    #[arg(long, env = "IMN_EXTERNAL_CA", requires = "external_broker")]
    external_ca: Option<PathBuf>,
    /// User name on the external broker.
    #[arg(
        long,
        env = "IMN_EXTERNAL_USER",
        default_value = "imn-bridge",
        requires = "external_broker"
    )]
    external_user: String,
    /// File holding the password on the external broker (one line).
    #[arg(long, env = "IMN_EXTERNAL_PASSWORD_FILE", requires = "external_broker")]
    external_password_file: Option<PathBuf>,
    /// The shared subscription group of the deployment's bridges.
    #[arg(
        long,
        env = "IMN_SHARE_GROUP",
        default_value = "imn-bridges",
        requires = "external_broker"
    )]
    share_group: String,
    /// This bridge's MQTT client id on the external broker (unique per bridge). Default:
    /// `imn-bridge-` and 32 random hex digits, new at each start: a client that guessed
    /// the id could take the bridge's session over on a broker that does not tie client
    /// ids to user names (Mosquitto does with `use_username_as_clientid true`).
    #[arg(long, env = "IMN_BRIDGE_ID", requires = "external_broker")]
    bridge_id: Option<String>,
}

impl Flags {
    /// Beyond loopback, plain MQTT is refused, and TLS needs auth, unless
    /// --insecure-i-know.
    fn check_exposure(&self) -> anyhow::Result<()> {
        // With an external broker, nothing listens for agents here.
        if self.insecure_i_know || self.external_broker.is_some() {
            return Ok(());
        }
        if let Some(a) = self.mqtt.filter(|a| !a.ip().is_loopback()) {
            anyhow::bail!(
                "--mqtt {a}: not a loopback address: plain MQTT beyond loopback needs \
                 --insecure-i-know (use --mqtts with --tls-cert, --tls-key and --auth)"
            );
        }
        if let Some(a) = self.mqtts.filter(|a| !a.ip().is_loopback() && !self.auth) {
            anyhow::bail!(
                "--mqtts {a}: not a loopback address: listening there needs --auth, or \
                 --insecure-i-know"
            );
        }
        Ok(())
    }

    fn tls(&self) -> anyhow::Result<Option<BrokerTls>> {
        let Some(listen) = self.mqtts else {
            return Ok(None);
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            anyhow::bail!("--mqtts: MQTT over TLS needs --tls-cert and --tls-key");
        };
        Ok(Some(BrokerTls {
            listen,
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.mqtt_client_ca.clone(),
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let _telemetry = telemetry::init(
        &[telemetry::Component::Bridge],
        &telemetry::OtlpConfig {
            endpoint: flags.otlp_endpoint.clone(),
        },
        "info,rumqttd=warn",
    )?;
    flags.check_exposure()?;
    let tls = flags.tls()?;
    let mut nats = NatsOptions::new(&flags.nats);
    nats.replicas = flags.nats_replicas.map(usize::from);
    if flags.external_broker.is_some() {
        // One bridge of the deployment publishes each command through the broker.
        nats.downlink_queue = Some(format!("{}-downlink", flags.share_group));
    }
    let bus = NatsBus::connect(nats)
        .await
        .map_err(|e| anyhow::anyhow!("--nats {}: {e}", flags.nats))?;
    let credentials = if flags.auth {
        let table = Arc::new(AgentCredentials::enabled());
        // Before the broker listens: an enrolled agent is never refused for want of
        // its credential, and nobody gets in while the table is empty.
        let n = bus
            .follow_credentials(table.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--auth: agent credentials from NATS: {e}"))?;
        tracing::info!(agents = n, "auth is on: agent credentials loaded from NATS");
        table
    } else {
        tracing::warn!("auth is off: any MQTT client can connect as any agent (use --auth)");
        Arc::new(AgentCredentials::disabled())
    };
    let (stats, credentials) = match &flags.external_broker {
        Some(url) => {
            let password = match &flags.external_password_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| {
                            anyhow::anyhow!("--external-password-file {}: {e}", p.display())
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                ),
                None => None,
            };
            if flags.external_ca.is_some() && !url.starts_with("mqtts://") {
                anyhow::bail!("--external-ca: only with an mqtts:// --external-broker");
            }
            let client_id = flags.bridge_id.clone().unwrap_or_else(default_client_id);
            let cfg = imn_bridge::external::ExternalConfig {
                url: url.clone(),
                ca: flags.external_ca.clone(),
                user: Some(flags.external_user.clone()),
                password,
                share_group: flags.share_group.clone(),
                client_id,
                max_message_bytes: flags.max_payload,
                credentials: credentials.clone(),
            };
            let stats = imn_bridge::external::run(cfg, Arc::new(bus))
                .await
                .map_err(|e| anyhow::anyhow!("--external-broker: {e}"))?;
            (stats, credentials)
        }
        None => {
            let cfg = BrokerConfig {
                listen: flags.mqtt,
                tls,
                credentials,
                max_payload_bytes: flags.max_payload,
                max_connections: flags.max_connections,
                max_client_bytes_per_s: flags.max_client_bytes_per_s,
                ..BrokerConfig::default()
            };
            let credentials = cfg.credentials.clone();
            let stats = broker::run(cfg, Arc::new(bus))
                .await
                .map_err(|e| anyhow::anyhow!("broker: {e}"))?;
            (stats, credentials)
        }
    };
    let families = {
        let stats = stats.clone();
        Arc::new(move || stats.families(&credentials.stats))
    };
    telemetry::prom::observe(families.clone());
    if let Some(listen) = flags.metrics {
        let render = Arc::new(move || {
            let mut e = telemetry::prom::Exposition::new();
            for f in families() {
                f.write(&mut e);
            }
            e.finish()
        });
        let at = imn_prom::serve_metrics(listen, render)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics {listen}: {e}"))?;
        tracing::info!(%at, "metrics at /metrics");
    }
    imn_cloud::shutdown_signal().await;
    tracing::info!("imn-bridge stopping");
    Ok(())
}

/// The bridge's client id on an external broker: not guessable (122 random bits).
fn default_client_id() -> String {
    format!("imn-bridge-{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_default_client_id_is_not_guessable() {
        let (a, b) = (default_client_id(), default_client_id());
        assert_ne!(a, b);
        let hex = a.strip_prefix("imn-bridge-").unwrap();
        assert!(
            hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        let f = Flags::try_parse_from([
            "imn-bridge",
            "--external-broker",
            "mqtts://mq.example.net",
            "--external-ca",
            "/etc/imn/ca.pem",
        ])
        .unwrap();
        assert_eq!(
            f.external_ca.as_deref(),
            Some(std::path::Path::new("/etc/imn/ca.pem"))
        );
        assert!(f.bridge_id.is_none());
    }

    #[test]
    fn exposure_needs_tls_and_auth_unless_insecure() {
        Flags::command().debug_assert();
        let check = |args: &[&str]| {
            let mut v = vec!["imn-bridge"];
            v.extend_from_slice(args);
            Flags::try_parse_from(v).unwrap().check_exposure()
        };
        assert!(check(&[]).is_ok());
        let e = check(&["--mqtt", "0.0.0.0:1883"]).unwrap_err().to_string();
        assert!(
            e.contains("--mqtt 0.0.0.0:1883") && e.contains("--insecure-i-know"),
            "{e}"
        );
        let tls = [
            "--mqtt",
            "off",
            "--mqtts",
            "0.0.0.0:8883",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
        ];
        let e = check(&tls).unwrap_err().to_string();
        assert!(e.contains("--mqtts") && e.contains("--auth"), "{e}");
        assert!(check(&[&tls[..], &["--auth"]].concat()).is_ok());
        assert!(check(&["--mqtt", "0.0.0.0:1883", "--insecure-i-know"]).is_ok());
    }
}
