use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use imn_bridge::bus::{NatsBus, NatsOptions};
use imn_bridge::{broker, BrokerConfig};

/// IMN bridge: embedded MQTT broker for agents, forwarding to and from NATS.
#[derive(Debug, Parser)]
#[command(name = "imn-bridge", version)]
struct Flags {
    /// Where agents connect (MQTT 3.1.1).
    #[arg(long, env = "IMN_MQTT", default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// The NATS server shared with the backends.
    #[arg(long, env = "IMN_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Largest MQTT payload accepted, in bytes.
    #[arg(long, env = "IMN_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    max_payload: usize,
    /// Most agents connected at once.
    #[arg(long, env = "IMN_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Listen beyond loopback although this process has no agent credentials (it does
    /// not yet receive them over NATS) and no TLS: anyone who reaches the port can
    /// connect as any agent.
    #[arg(long)]
    insecure_i_know: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    imn_bridge::init_logging();
    let flags = Flags::parse();
    if !flags.mqtt.ip().is_loopback() && !flags.insecure_i_know {
        anyhow::bail!(
            "--mqtt {}: not a loopback address; a separate imn-bridge has no agent credentials \
             yet, so it listens beyond loopback only with --insecure-i-know (use imn up --auth \
             --mqtts for an authenticated broker)",
            flags.mqtt
        );
    }
    let bus = NatsBus::connect(NatsOptions::new(&flags.nats)).await?;
    let mut cfg = BrokerConfig::new(flags.mqtt);
    cfg.max_payload_bytes = flags.max_payload;
    cfg.max_connections = flags.max_connections;
    broker::run(cfg, Arc::new(bus))
        .await
        .map_err(|e| anyhow::anyhow!("--mqtt: {e}"))?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
