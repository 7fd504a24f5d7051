//! Running the pieces: the backend's HTTP server, and `imn up`, which runs backend,
//! bridge (with its embedded broker, on the in-process bus) and local agents in one
//! process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use imn_agent::{Agent, AgentConfig};
use imn_bridge::bus::{Bus, LocalBus};
use imn_bridge::{broker, BrokerConfig};
use tokio::sync::watch;

use crate::service::Backend;
use crate::store::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{flag} {addr}: cannot listen: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--data {path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("{0}")]
    Start(String),
}

/// Binds the API's listener, naming the flag when the address is taken.
pub async fn bind_http(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, UpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| UpError::Bind { flag, addr, source })
}

/// Serves the REST API until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    backend: Arc<Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Nagle plus delayed ACKs would add up to 40 ms to small API answers.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, crate::api::router(backend))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Opens the embedded store under `data` and starts a backend on `bus`.
pub async fn start_backend(
    data: &std::path::Path,
    bus: Arc<dyn Bus>,
    fault_injection: bool,
) -> Result<Arc<Backend>, UpError> {
    std::fs::create_dir_all(data).map_err(|e| UpError::Data {
        path: data.to_path_buf(),
        message: e.to_string(),
    })?;
    let store = SqliteStore::open(&data.join("backend.sqlite")).map_err(|e| UpError::Data {
        path: data.to_path_buf(),
        message: e.to_string(),
    })?;
    let backend = Backend::new(Arc::new(store), bus, fault_injection)
        .await
        .map_err(|e| UpError::Start(e.to_string()))?;
    backend
        .start()
        .await
        .map_err(|e| UpError::Start(e.to_string()))?;
    Ok(backend)
}

/// What `imn up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub data: PathBuf,
    pub agents: usize,
    pub heartbeat_ms: u64,
    pub fault_injection: bool,
}

/// Runs everything until `shutdown` resolves, then stops agents cleanly (they publish
/// `offline`) and the HTTP server.
pub async fn up(opts: UpOptions, shutdown: impl Future<Output = ()>) -> Result<(), UpError> {
    let listener = bind_http("--http", opts.http).await?;
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new(8192));
    let bridge_stats = broker::run(BrokerConfig::new(opts.mqtt), bus.clone())
        .await
        .map_err(|e| match e {
            imn_bridge::BridgeError::Bind { addr, source } => UpError::Bind {
                flag: "--mqtt",
                addr,
                source,
            },
            other => UpError::Start(other.to_string()),
        })?;
    let backend = start_backend(&opts.data.join("backend"), bus, opts.fault_injection).await?;
    let _ = backend.bridge_stats.set(bridge_stats);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(serve_http(listener, backend, async move {
        let _ = http_stop.wait_for(|s| *s).await;
    }));
    let mut agents = Vec::new();
    for i in 1..=opts.agents {
        let cfg = AgentConfig {
            id: format!("agent-{i}"),
            broker: format!("mqtt://{}", opts.mqtt),
            data: opts.data.join(format!("agent-{i}")),
            heartbeat_ms: opts.heartbeat_ms,
            ..AgentConfig::default()
        };
        let mut stop = stop_rx.clone();
        let handle = std::thread::Builder::new()
            .name(cfg.id.clone())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    let agent = Agent::new(cfg).map_err(|e| e.to_string())?;
                    agent
                        .run(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .map_err(|e| UpError::Start(e.to_string()))?;
        agents.push(handle);
    }
    tracing::info!(http = %opts.http, mqtt = %opts.mqtt, agents = opts.agents, data = %opts.data.display(), "imn up: running");
    shutdown.await;
    tracing::info!("imn up: shutting down");
    let _ = stop_tx.send(true);
    for a in agents {
        if let Ok(Err(e)) = a.join() {
            tracing::warn!(error = %e, "agent ended with an error");
        }
    }
    let _ = http.await;
    Ok(())
}
