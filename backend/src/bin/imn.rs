//! `imn`: the all-in-one `imn up`, and (later) the command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imn_backend::up::{up, UpOptions};

#[derive(Debug, Parser)]
#[command(name = "imn", version, about = "IMN: the Internet Measurement Network")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run backend, bridge (with its own MQTT broker) and local agents in one process.
    Up {
        /// REST API address.
        #[arg(long, default_value = "127.0.0.1:8000")]
        http: SocketAddr,
        /// MQTT broker address for agents.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: SocketAddr,
        /// Data directory: the backend's store and each local agent's outbox.
        #[arg(long, default_value = "./imn-data")]
        data: PathBuf,
        /// How many local agents to run (agent-1 … agent-N).
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Heartbeat period of the local agents, in ms.
        #[arg(long, default_value_t = 10_000)]
        heartbeat_ms: u64,
        /// Enable fault-injection routes (/debug/…) for tests.
        #[arg(long, hide = true)]
        fault_injection: bool,
    },
}

fn main() -> anyhow::Result<()> {
    imn_bridge::init_logging();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Up {
                http,
                mqtt,
                data,
                agents,
                heartbeat_ms,
                fault_injection,
            } => {
                let opts = UpOptions {
                    http,
                    mqtt,
                    data,
                    agents,
                    heartbeat_ms,
                    fault_injection,
                };
                up(opts, shutdown_signal()).await?;
            }
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
