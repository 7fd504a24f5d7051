//! Running the backend: its flags for auth, TLS and limits, the admin token, the
//! store, and the HTTP and gRPC listeners. `imn-backend` and `imn up` (in the `imn`
//! binary, `imn-cli`) both start the backend through these.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use imn_cloud::bus::Bus;
use imn_cloud::AgentCredentials;

use crate::security::{Limits, Policy, Scope, Security};
use crate::service::Backend;
use crate::store::SqliteStore;

/// Auth, TLS and input limits: the flags `imn up` and `imn-backend` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityFlags {
    /// Require credentials: a bearer token with the right scope on every API call, and
    /// an enrolled agent's id and token on every MQTT login.
    #[arg(long, env = "IMN_AUTH")]
    pub auth: bool,
    /// PEM certificate chain: the API is served over HTTPS (and MQTT over TLS, where
    /// there is a TLS listener).
    #[arg(long, env = "IMN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "IMN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Listen beyond loopback without auth or without TLS. Anyone who reaches the
    /// port can then run measurements, or read what travels.
    #[arg(long)]
    pub insecure_i_know: bool,
    /// Largest API request body, in bytes.
    #[arg(long, env = "IMN_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Most targets in one measurement.
    #[arg(long, env = "IMN_MAX_TARGETS", default_value_t = Limits::default().max_targets)]
    pub max_targets: usize,
    /// Largest `count` in one measurement.
    #[arg(long, env = "IMN_MAX_COUNT", default_value_t = Limits::default().max_count)]
    pub max_count: u64,
    /// Highest probe rate one measurement may ask for, in probes per second.
    #[arg(long, env = "IMN_MAX_RATE", default_value_t = Limits::default().max_rate)]
    pub max_rate: f64,
    /// Most unfinished requests per agent.
    #[arg(long, env = "IMN_MAX_QUEUED_PER_AGENT", default_value_t = Limits::default().max_queued_per_agent)]
    pub max_queued_per_agent: u64,
    /// Most recurring measurements one agent runs.
    #[arg(long, env = "IMN_MAX_SCHEDULES_PER_AGENT", default_value_t = Limits::default().max_schedules_per_agent)]
    pub max_schedules_per_agent: u64,
    /// Measurement policy: a TOML file of [[rule]] tables (name, agents, tags, allow,
    /// deny, max_rate), `builtin_deny`, and the tokens' default [budget].
    #[arg(long, env = "IMN_POLICY")]
    pub policy: Option<PathBuf>,
    /// Name servers the backend asks when it checks host names against the policy
    /// (ADDR or ADDR:PORT, comma-separated; default those of /etc/resolv.conf). Under
    /// `imn up` the local agents use them too.
    #[arg(long, env = "IMN_NAMESERVER", value_delimiter = ',')]
    pub nameserver: Vec<String>,
    /// Ed25519 public keys (hex, comma-separated) whose signed agent releases the
    /// backend accepts (`imn releases keygen` prints one). None: releases are refused.
    #[arg(long, env = "IMN_RELEASE_KEYS", value_delimiter = ',')]
    pub release_keys: Vec<String>,
}

impl SecurityFlags {
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_targets: self.max_targets,
            max_count: self.max_count,
            max_rate: self.max_rate,
            max_queued_per_agent: self.max_queued_per_agent,
            max_schedules_per_agent: self.max_schedules_per_agent,
        }
    }

    pub fn load_policy(&self) -> Result<Policy, UpError> {
        match &self.policy {
            None => Ok(Policy::default()),
            Some(p) => Policy::load(p).map_err(|message| UpError::Flag {
                flag: "--policy",
                message,
            }),
        }
    }

    /// The API's TLS configuration, when --tls-cert is given.
    pub fn http_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, UpError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        crate::tls::server_config(&crate::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .map(Some)
        .map_err(|e| UpError::Flag {
            flag: "--tls-cert",
            message: e.to_string(),
        })
    }

    /// Refuses to listen beyond loopback without auth and TLS, unless told to.
    pub fn check_exposure(
        &self,
        flag: &'static str,
        addr: SocketAddr,
        tls: bool,
    ) -> Result<(), UpError> {
        if addr.ip().is_loopback() || self.insecure_i_know {
            return Ok(());
        }
        let mut missing = Vec::new();
        if !self.auth {
            missing.push("--auth");
        }
        if !tls {
            missing.push(if flag.starts_with("--mqtt") {
                "TLS (--mqtts with --tls-cert and --tls-key; plain MQTT stays on loopback)"
            } else {
                "TLS (--tls-cert and --tls-key)"
            });
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(UpError::Flag {
            flag,
            message: format!(
                "{addr} is not a loopback address: listening there needs {}, or --insecure-i-know",
                missing.join(" and ")
            ),
        })
    }
}

/// Opens the backend's security: limits, policy, and (with auth) the credential table
/// shared with the in-process bridge.
pub fn security(flags: &SecurityFlags) -> Result<Security, UpError> {
    let servers = flags
        .nameserver
        .iter()
        .map(|s| imn_resolver::parse_nameserver(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|message| UpError::Flag {
            flag: "--nameserver",
            message,
        })?;
    if !servers.is_empty() {
        imn_resolver::set_nameservers(servers);
    }
    let creds = Arc::new(if flags.auth {
        AgentCredentials::enabled()
    } else {
        AgentCredentials::disabled()
    });
    for k in &flags.release_keys {
        if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UpError::Flag {
                flag: "--release-keys",
                message: format!("each must be 64 hex digits, an Ed25519 public key (got {k:?})"),
            });
        }
    }
    let mut s = Security::new(creds, flags.limits(), flags.load_policy()?);
    s.release_keys = flags
        .release_keys
        .iter()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    Ok(s)
}

/// Keeps `DATA/admin-token` holding a live admin token: the one there if it still
/// works, else a new one (written with mode 0600).
/// The rate of the admin token `--auth` writes to DATA/admin-token, per minute.
pub const ADMIN_RATE_PER_MIN: f64 = 60_000.0;

///
/// `shared`: the store is shared with other backends (PostgreSQL). Then an admin token
/// that exists but is not in this backend's file was made by another backend: it is
/// left alone (rotating it would lock that backend's operators out), and this backend
/// writes no file.
pub async fn ensure_admin_token(
    backend: &Backend,
    path: &std::path::Path,
    shared: bool,
) -> Result<(), UpError> {
    // Not through a symlink: the file is ours, in our private directory.
    let current = imn_cloud::files::read_private(path).ok();
    if current
        .as_deref()
        .is_some_and(|t| backend.security.token_is_live(t.trim()))
    {
        return Ok(());
    }
    let token = match backend
        // 1,000 requests a second: the operator's own token, used to provision fleets
        // (enrolling a thousand agents should not take minutes); the limit is only
        // there to stop a runaway script.
        .create_token(
            Some("admin".into()),
            vec![Scope::Admin],
            Some(ADMIN_RATE_PER_MIN),
            None,
        )
        .await
    {
        Ok((_, t)) => t,
        Err(crate::error::ApiError::Conflict(_)) if shared => {
            tracing::warn!(
                path = %path.display(),
                "an admin token exists in the shared store (made by another backend): copy that backend's admin-token file here, or rotate it with `imn tokens rotate admin`"
            );
            return Ok(());
        }
        Err(crate::error::ApiError::Conflict(_)) => backend
            .rotate_token("admin")
            .await
            .map_err(|e| UpError::Start(e.to_string()))?,
        Err(e) => return Err(UpError::Start(e.to_string())),
    };
    write_secret(path, &token).map_err(|e| UpError::Data {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes a secret to a file only its owner can read: a fresh temporary file beside it
/// (`O_EXCL | O_NOFOLLOW`, mode 0600), synced, then renamed over it. A symlink planted in
/// the directory is never followed.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    imn_cloud::files::write_private(path, format!("{secret}\n").as_bytes())
}

/// Creates the data directory with mode 0700, or sets an existing one to it.
pub fn private_data_dir(data: &std::path::Path) -> Result<(), UpError> {
    imn_cloud::files::private_dir(data).map_err(|e| UpError::Data {
        path: data.to_path_buf(),
        message: format!("cannot make it private (mode 0700): {e}"),
    })
}

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
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
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

/// Binds the gRPC listener. gRPC has no TLS yet, so beyond loopback it needs
/// --insecure-i-know (tokens would cross the network in clear).
pub async fn bind_grpc(
    addr: SocketAddr,
    insecure_i_know: bool,
) -> Result<tokio::net::TcpListener, UpError> {
    if !addr.ip().is_loopback() && !insecure_i_know {
        return Err(UpError::Flag {
            flag: "--grpc",
            message: format!(
                "{addr}: not a loopback address, and the gRPC API has no TLS yet: tokens \
                 would cross the network in clear (--insecure-i-know overrides)"
            ),
        });
    }
    bind_http("--grpc", addr).await
}

/// Serves the REST API (over HTTPS when given a TLS configuration) until `shutdown`
/// resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    backend: Arc<Backend>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let router = crate::api::router(backend);
    if let Some(config) = tls {
        let listener =
            crate::tls::TlsListener::new(listener, config, std::time::Duration::from_secs(10));
        return axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
    }
    // Nagle plus delayed ACKs would add up to 40 ms to small API answers.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Opens the embedded store under `data` and starts a backend on `bus`.
pub async fn start_backend(
    data: &std::path::Path,
    store: Option<(&str, Option<&std::path::Path>)>,
    bus: Arc<dyn Bus>,
    fault_injection: bool,
    security: Security,
    retention: crate::retention::Settings,
    alerts: crate::alerts::Settings,
) -> Result<Arc<Backend>, UpError> {
    private_data_dir(data)?;
    let store = match store {
        Some((spec, ca)) => open_store(data, Some(spec), ca).await?,
        None => open_store(data, None, None).await?,
    };
    let backend = Backend::new(store, bus, fault_injection, security)
        .await
        .map_err(|e| UpError::Start(e.to_string()))?;
    backend.set_retention(retention);
    backend.alerts.set_settings(alerts);
    backend
        .start()
        .await
        .map_err(|e| UpError::Start(e.to_string()))?;
    Ok(backend)
}

/// The store `--store` names: `postgres://…` (or `postgresql://…`) for PostgreSQL,
/// over TLS with `sslmode=require` or a `--store-ca`; a file path for the embedded
/// store there; none: the embedded store in `data`.
pub async fn open_store(
    data: &std::path::Path,
    spec: Option<&str>,
    ca: Option<&std::path::Path>,
) -> Result<Arc<dyn crate::store::Store>, UpError> {
    match spec {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let s = crate::store::PostgresStore::connect_tls(url, ca)
                .await
                .map_err(|e| UpError::Flag {
                    flag: "--store",
                    message: format!("{}: {e}", crate::store::redact(url)),
                })?;
            Ok(Arc::new(s))
        }
        Some(_) if ca.is_some() => Err(UpError::Flag {
            flag: "--store-ca",
            message: "only with a postgres:// store".into(),
        }),
        Some(path) => {
            let path = std::path::Path::new(path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| UpError::Flag {
                    flag: "--store",
                    message: format!("{}: {e}", dir.display()),
                })?;
            }
            let s = SqliteStore::open(path).map_err(|e| UpError::Flag {
                flag: "--store",
                message: format!("{}: {e}", path.display()),
            })?;
            Ok(Arc::new(s))
        }
        None => {
            let s = SqliteStore::open(&data.join("backend.sqlite")).map_err(|e| UpError::Data {
                path: data.to_path_buf(),
                message: e.to_string(),
            })?;
            Ok(Arc::new(s))
        }
    }
}
