//! `imn-backend`: the backend as its own process, reading the bus from NATS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use imn_backend::serve::{
    bind_http, ensure_admin_token, security, serve_http, start_backend, SecurityFlags,
};
use imn_cloud::bus::{NatsBus, NatsOptions};

#[derive(Debug, Parser)]
#[command(
    name = "imn-backend",
    version,
    about = "IMN backend: registry, storage, REST API"
)]
struct Flags {
    /// REST API address.
    #[arg(long, env = "IMN_HTTP", default_value = "127.0.0.1:8000")]
    http: SocketAddr,
    /// The NATS server shared with the bridges; several (a cluster's nodes) separated
    /// by commas.
    #[arg(long, env = "IMN_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Directory of the backend's files (the embedded store, the admin token).
    #[arg(long, env = "IMN_DATA", default_value = "./imn-data/backend")]
    data: PathBuf,
    /// Where results are kept: `postgres://USER:PASSWORD@HOST:PORT/DB` (several
    /// backends may share it), or a file for the embedded store. Default:
    /// DATA/backend.sqlite.
    #[arg(long, env = "IMN_STORE")]
    store: Option<String>,
    /// PEM CA that signed PostgreSQL's certificate: connect over TLS and check the
    /// certificate and host name (as `sslmode=require` in the URL does, against the
    /// system's bundle).
    #[arg(long, env = "IMN_STORE_CA", requires = "store")]
    store_ca: Option<PathBuf>,
    /// Replicas of the JetStream stream and credentials bucket (3 on a 3-node NATS
    /// cluster). Default: leave them as they are (1 when new).
    #[arg(long, env = "IMN_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_replicas: Option<u8>,
    /// Enable fault-injection routes (/debug/…) for tests.
    #[arg(long, hide = true)]
    fault_injection: bool,
    /// OTLP/gRPC collector for traces, metrics and logs (`http://host:4317`). Without
    /// it, OTEL_EXPORTER_OTLP_ENDPOINT decides; without that, nothing is exported.
    #[arg(long, env = "IMN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The gRPC API (imn.v1.Imn; the original used 127.0.0.1:50051), or `off`.
    #[arg(long, env = "IMN_GRPC", default_value = "off", value_parser = imn_cloud::addr_or_off)]
    grpc: ::std::option::Option<SocketAddr>,
    #[command(flatten)]
    security: SecurityFlags,
    #[command(flatten)]
    retention: imn_backend::retention::RetentionFlags,
    #[command(flatten)]
    alerts: imn_backend::alerts::AlertFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Everything the backend creates (the admin token, the embedded store) is its
    // owner's only; --data itself is made 0700.
    imn_cloud::files::private_umask();
    let flags = Flags::parse();
    use imn_cloud::telemetry::{self, Component};
    let _telemetry = telemetry::init(
        &[Component::Backend, Component::Agent],
        &telemetry::OtlpConfig {
            endpoint: flags.otlp_endpoint.clone(),
        },
        "info,rumqttd=warn",
    )?;
    let tls = flags.security.http_tls()?;
    flags
        .security
        .check_exposure("--http", flags.http, tls.is_some())?;
    let security = security(&flags.security)?.exposed(!flags.http.ip().is_loopback());
    let listener = bind_http("--http", flags.http).await?;
    let mut nats = NatsOptions::new(&flags.nats);
    nats.replicas = flags.nats_replicas.map(usize::from);
    let bus = NatsBus::connect(nats)
        .await
        .map_err(|e| anyhow::anyhow!("--nats {}: {e}", flags.nats))?;
    let backend = start_backend(
        &flags.data,
        flags
            .store
            .as_deref()
            .map(|s| (s, flags.store_ca.as_deref())),
        Arc::new(bus),
        flags.fault_injection,
        security,
        flags.retention.settings(),
        flags.alerts.settings(),
    )
    .await?;
    backend.observe_metrics();
    if flags.security.auth {
        let path = flags.data.join("admin-token");
        let shared = flags
            .store
            .as_deref()
            .is_some_and(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"));
        ensure_admin_token(&backend, &path, shared).await?;
        if path.exists() {
            tracing::info!(path = %path.display(), "auth is on: the admin token is in this file");
        }
    }
    if let Some(addr) = flags.grpc {
        let listener = imn_backend::serve::bind_grpc(addr, flags.security.insecure_i_know).await?;
        tokio::spawn(imn_backend::grpc::serve(
            listener,
            backend.clone(),
            std::future::pending(),
        ));
        tracing::info!(%addr, "gRPC API (imn.v1.Imn) listening");
    }
    tracing::info!(http = %flags.http, nats = %flags.nats, "imn-backend running");
    serve_http(listener, backend, tls, imn_cloud::shutdown_signal()).await?;
    Ok(())
}
