//! `imn up`: backend, bridge (with its embedded broker, on the in-process bus) and
//! local agents in one process. The only place that links all of them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use imn_agent::{Agent, AgentConfig};
use imn_backend::serve::*;
use imn_backend::Backend;
use imn_bridge::{broker, BrokerConfig, BrokerTls};
use imn_cloud::bus::{Bus, LocalBus};
use tokio::sync::watch;

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
    /// What the store keeps, and for how long.
    pub retention: imn_backend::retention::Settings,
    pub alerts: imn_backend::alerts::Settings,
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
        opts.retention,
        opts.alerts,
    )
    .await?;
    let _ = backend
        .bridge_stats
        .set(bridge_stats.report(backend.security.bridge().clone()));
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
        tokio::spawn(imn_backend::grpc::serve(
            listener,
            backend.clone(),
            async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            },
        ));
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
            // The local agents load the WebAssembly modules the backend accepts.
            module_keys: opts.security.release_keys.clone(),
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
