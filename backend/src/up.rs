//! Running the pieces: the backend's HTTP server, and `imn up`, which runs backend,
//! bridge (with its embedded broker, on the in-process bus) and local agents in one
//! process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use imn_agent::{Agent, AgentConfig};
use imn_bridge::bus::{Bus, LocalBus};
use imn_bridge::{broker, AgentCredentials, BrokerConfig, BrokerTls};
use tokio::sync::watch;

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
        .map(|s| imn_modules::resolver::parse_nameserver(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|message| UpError::Flag {
            flag: "--nameserver",
            message,
        })?;
    if !servers.is_empty() {
        imn_modules::resolver::set_nameservers(servers);
    }
    let creds = Arc::new(if flags.auth {
        AgentCredentials::enabled()
    } else {
        AgentCredentials::disabled()
    });
    Ok(Security::new(creds, flags.limits(), flags.load_policy()?))
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
    let current = imn_bridge::files::read_private(path).ok();
    if current
        .as_deref()
        .is_some_and(|t| backend.security.token_is_live(t.trim()))
    {
        return Ok(());
    }
    let store = backend.store.as_ref();
    let token = match backend
        .security
        // 1,000 requests a second: the operator's own token, used to provision fleets
        // (enrolling a thousand agents should not take minutes); the limit is only
        // there to stop a runaway script.
        .create_token(
            store,
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
            .security
            .rotate_token(store, "admin")
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
    imn_bridge::files::write_private(path, format!("{secret}\n").as_bytes())
}

/// Creates the data directory with mode 0700, or sets an existing one to it.
pub fn private_data_dir(data: &std::path::Path) -> Result<(), UpError> {
    imn_bridge::files::private_dir(data).map_err(|e| UpError::Data {
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
) -> Result<Arc<Backend>, UpError> {
    private_data_dir(data)?;
    let store = match store {
        Some((spec, ca)) => open_store(data, Some(spec), ca).await?,
        None => open_store(data, None, None).await?,
    };
    let backend = Backend::new(store, bus, fault_injection, security)
        .await
        .map_err(|e| UpError::Start(e.to_string()))?;
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

/// What `imn up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub http: SocketAddr,
    /// Plain MQTT, if any.
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS (with the API's --tls-cert and --tls-key), if any.
    pub mqtts: Option<SocketAddr>,
    /// With MQTT over TLS: clients must show a certificate signed by this CA.
    pub mqtt_client_ca: Option<PathBuf>,
    /// The CA local agents trust when they connect over TLS.
    pub ca: Option<PathBuf>,
    /// Largest MQTT message from an agent, in bytes.
    pub max_mqtt_payload: usize,
    /// Most bytes a second one MQTT client may publish (0: no cap).
    pub max_client_bytes_per_s: u64,
    pub data: PathBuf,
    pub agents: usize,
    pub heartbeat_ms: u64,
    pub fault_injection: bool,
    /// Test only: turn the broker's topic ACL off, to show the bridge's signature
    /// check alone stops a forged message.
    pub no_broker_acl: bool,
    /// The gRPC API (plain HTTP/2: loopback unless --insecure-i-know), if any.
    pub grpc: Option<SocketAddr>,
    pub security: SecurityFlags,
}

/// Where local agents connect: the plain listener if there is one, else TLS.
fn local_broker(opts: &UpOptions) -> Result<(String, Option<PathBuf>), UpError> {
    if let Some(m) = opts.mqtt {
        return Ok((format!("mqtt://{m}"), None));
    }
    match (opts.mqtts, &opts.ca) {
        (Some(_), _) if opts.agents == 0 => Ok((String::new(), None)),
        (Some(_), _) if opts.mqtt_client_ca.is_some() => Err(UpError::Flag {
            flag: "--agents",
            message: "local agents have no client certificate for --mqtt-client-ca; give a plain --mqtt on loopback, or --agents 0".into(),
        }),
        (Some(s), Some(ca)) => Ok((format!("mqtts://localhost:{}", s.port()), Some(ca.clone()))),
        (Some(_), None) => Err(UpError::Flag {
            flag: "--ca",
            message: "local agents connect over TLS (--mqtt off) and need the CA that signed --tls-cert".into(),
        }),
        (None, _) => Err(UpError::Flag {
            flag: "--mqtt",
            message: "no MQTT listener: give --mqtt or --mqtts".into(),
        }),
    }
}

/// Runs everything until `shutdown` resolves, then stops agents cleanly (they publish
/// `offline`) and the HTTP server.
pub async fn up(opts: UpOptions, shutdown: impl Future<Output = ()>) -> Result<(), UpError> {
    let sec = &opts.security;
    // DATA holds the admin token, the store and the local agents' outboxes.
    private_data_dir(&opts.data)?;
    let http_tls = sec.http_tls()?;
    sec.check_exposure("--http", opts.http, http_tls.is_some())?;
    if let Some(m) = opts.mqtt {
        sec.check_exposure("--mqtt", m, false)?;
    }
    let mqtt_tls = match opts.mqtts {
        Some(listen) => {
            sec.check_exposure("--mqtts", listen, true)?;
            let (Some(cert), Some(key)) = (&sec.tls_cert, &sec.tls_key) else {
                return Err(UpError::Flag {
                    flag: "--mqtts",
                    message: "MQTT over TLS needs --tls-cert and --tls-key".into(),
                });
            };
            Some(BrokerTls {
                listen,
                cert: cert.clone(),
                key: key.clone(),
                client_ca: opts.mqtt_client_ca.clone(),
            })
        }
        None => None,
    };
    let (agent_broker, agent_ca) = local_broker(&opts)?;
    let exposed = !opts.http.ip().is_loopback()
        || opts.mqtt.is_some_and(|m| !m.ip().is_loopback())
        || opts.mqtts.is_some_and(|m| !m.ip().is_loopback());
    let security = security(sec)?.exposed(exposed);
    if !sec.auth {
        tracing::warn!(
            http = %opts.http,
            mqtt = ?opts.mqtt,
            "auth is off: anyone who can reach these ports can run measurements and connect agents; \
             that is fine on loopback, and --auth turns it on"
        );
    }
    let listener = bind_http("--http", opts.http).await?;
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new(8192));
    let defaults = BrokerConfig::default();
    let broker_cfg = BrokerConfig {
        listen: opts.mqtt,
        tls: mqtt_tls,
        credentials: security.bridge().clone(),
        broker_acl: !opts.no_broker_acl,
        max_message_bytes: opts.max_mqtt_payload,
        max_client_bytes_per_s: opts.max_client_bytes_per_s,
        // The broker closes a connection past this; the bridge counts and drops
        // messages past max_message_bytes before that.
        max_payload_bytes: defaults.max_payload_bytes.max(opts.max_mqtt_payload * 2),
        ..defaults
    };
    let bridge_stats = broker::run(broker_cfg, bus.clone())
        .await
        .map_err(|e| match e {
            imn_bridge::BridgeError::Bind { addr, source } => UpError::Bind {
                flag: if Some(addr) == opts.mqtt {
                    "--mqtt"
                } else {
                    "--mqtts"
                },
                addr,
                source,
            },
            other => UpError::Start(other.to_string()),
        })?;
    let backend = start_backend(
        &opts.data.join("backend"),
        None,
        bus,
        opts.fault_injection,
        security,
    )
    .await?;
    let _ = backend.bridge_stats.set(bridge_stats);
    backend.observe_metrics();
    let mut tokens = Vec::new();
    for i in 1..=opts.agents {
        tokens.push(if sec.auth {
            Some(local_agent_token(&backend, &format!("agent-{i}")).await?)
        } else {
            None
        });
    }
    if sec.auth {
        let path = opts.data.join("admin-token");
        ensure_admin_token(&backend, &path, false).await?;
        tracing::info!(path = %path.display(), "auth is on: the admin token is in this file");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = opts.grpc {
        let listener = bind_grpc(addr, sec.insecure_i_know).await?;
        let mut grpc_stop = stop_rx.clone();
        tokio::spawn(crate::grpc::serve(listener, backend.clone(), async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        }));
        tracing::info!(%addr, "gRPC API (imn.v1.Imn) listening");
    }
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(serve_http(listener, backend, http_tls, async move {
        let _ = http_stop.wait_for(|s| *s).await;
    }));
    let mut agents = Vec::new();
    for (i, token) in (1..=opts.agents).zip(tokens) {
        let cfg = AgentConfig {
            id: format!("agent-{i}"),
            broker: agent_broker.clone(),
            tls_ca: agent_ca.clone(),
            token,
            data: opts.data.join(format!("agent-{i}")),
            heartbeat_ms: opts.heartbeat_ms,
            // One resolver in the process: the agents' and the policy checks'.
            nameservers: opts.security.nameserver.clone(),
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
    tracing::info!(http = %opts.http, https = sec.tls_cert.is_some(), mqtt = ?opts.mqtt, mqtts = ?opts.mqtts, auth = sec.auth, agents = opts.agents, data = %opts.data.display(), "imn up: running");
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

/// A fresh token for a local agent of `imn up --auth`: enrolled the first time,
/// rotated on every later start (the token lives only in this process).
async fn local_agent_token(backend: &Backend, id: &str) -> Result<String, UpError> {
    let store = backend.store.as_ref();
    let enrolled = backend
        .security
        .enrolled_agents()
        .iter()
        .any(|a| a.id == id);
    let token = if enrolled {
        backend.security.rotate_agent(store, id).await
    } else {
        backend
            .security
            .enroll(store, id, vec!["local".to_string()])
            .await
    };
    let token = token.map_err(|e| UpError::Start(format!("enrolling local agent {id}: {e}")))?;
    backend
        .share_credential(id)
        .await
        .map_err(|e| UpError::Start(format!("enrolling local agent {id}: {e}")))?;
    Ok(token)
}
