//! `imn`: the all-in-one `imn up`, development certificates, and the admin client.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imn_backend::serve::SecurityFlags;
use serde_json::json;

use crate::client::{Client, ClientFlags};
use crate::up::{up, UpOptions};

mod certs;
mod cli;
mod client;
mod up;

#[derive(Debug, Parser)]
#[command(name = "imn", version, about = "IMN: the Internet Measurement Network")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the `up` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run backend, bridge (with its own MQTT broker) and local agents in one process.
    Up {
        /// REST API address.
        #[arg(long, default_value = "127.0.0.1:8000")]
        http: SocketAddr,
        /// Plain MQTT address for agents, or `off`. Plain MQTT beyond loopback needs
        /// --insecure-i-know.
        #[arg(long, default_value = "127.0.0.1:1883", value_parser = imn_cloud::addr_or_off)]
        // Fully qualified: clap then takes the parser's Option as the value, not as "optional".
        mqtt: ::std::option::Option<SocketAddr>,
        /// MQTT over TLS (8883 by convention), with --tls-cert and --tls-key.
        #[arg(long)]
        mqtts: Option<SocketAddr>,
        /// Require MQTT clients over TLS to show a certificate signed by this CA.
        #[arg(long, requires = "mqtts")]
        mqtt_client_ca: Option<PathBuf>,
        /// CA the local agents trust, when they connect over TLS (--mqtt off).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Largest MQTT message from an agent, in bytes (limit max_mqtt_payload).
        #[arg(long, default_value_t = 512 * 1024)]
        max_mqtt_payload: usize,
        /// Most bytes a second one MQTT client may publish; past it the broker reads
        /// its socket only as fast (0: no cap).
        #[arg(long, env = "IMN_MAX_CLIENT_BYTES_PER_S", default_value_t = imn_bridge::broker::DEFAULT_CLIENT_BYTES_PER_S)]
        max_client_bytes_per_s: u64,
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
        /// Test only: no topic ACL in the broker (the bridge's signature check stays).
        #[arg(long, hide = true)]
        test_no_broker_acl: bool,
        /// OTLP/gRPC collector for traces, metrics and logs (`http://host:4317`).
        /// Without it, OTEL_EXPORTER_OTLP_ENDPOINT decides; without that, nothing is
        /// exported.
        #[arg(long, env = "IMN_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// The gRPC API (imn.v1.Imn; the original used 127.0.0.1:50051), or `off`.
        #[arg(long, env = "IMN_GRPC", default_value = "off", value_parser = imn_cloud::addr_or_off)]
        grpc: ::std::option::Option<SocketAddr>,
        #[command(flatten)]
        security: SecurityFlags,
    },
    /// Write a development CA, a server certificate and client certificates.
    Certs {
        /// Directory for the PEM files; an existing CA there is reused.
        #[arg(long, default_value = "./imn-certs")]
        dir: PathBuf,
        /// Names and addresses the server certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
        hosts: Vec<String>,
        /// Client certificates to make (common names, e.g. agent ids).
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// List the fleet (`imn agents --alive --tag lte`), or enroll, rotate and revoke
    /// agents (admin scope).
    Agents {
        #[command(subcommand)]
        cmd: Option<AgentsCmd>,
        /// Only agents alive now.
        #[arg(long)]
        alive: bool,
        /// Only agents with this tag (repeat, or comma-separate, for all of several).
        #[arg(long, value_delimiter = ',')]
        tag: Vec<String>,
        /// JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Run a module on agents and show their results: `imn measure ping_module
    /// 127.0.0.1 --agents tag:lte,country:DE --count 3`. Exits 1 if some agent did not
    /// report.
    Measure {
        /// ping_module, tcping, echo_module, …
        module: String,
        /// The module's target: host for ping_module and tcping, message for
        /// echo_module.
        target: Option<String>,
        /// Which agents: tag:T, id:ID, country:CC, asn:N, limit:N (comma-separated),
        /// or all.
        #[arg(long, default_value = "all")]
        agents: String,
        /// Probes per run (count).
        #[arg(long)]
        count: Option<u32>,
        /// Other parameters, KEY=VALUE (VALUE as JSON when it parses), e.g.
        /// --param port=443.
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// Recurring: run every this long (30s, 5m, 1h) on each agent, from its own
        /// stored schedule, until deleted.
        #[arg(long)]
        every: Option<String>,
        /// How long agents have to report (one-off); those that do not are expired.
        #[arg(long, default_value = "60s")]
        timeout: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Stored results, oldest first, with the API's filters.
    Results {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Results as they are stored (a measurement's from its start); resumes after a
    /// dropped connection without missing any.
    Watch {
        #[command(flatten)]
        filter: FilterArgs,
        /// Stop after this many results.
        #[arg(long)]
        count: Option<usize>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// A request's state and transitions, or a measurement's progress.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Create, rotate and revoke API tokens (admin scope).
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
        #[command(flatten)]
        client: ClientFlags,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct FilterArgs {
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    module: Option<String>,
    #[arg(long)]
    measurement: Option<String>,
    /// RFC 3339 or ms since the epoch.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
}

impl From<FilterArgs> for cli::Filter {
    fn from(f: FilterArgs) -> Self {
        cli::Filter {
            agent: f.agent,
            module: f.module,
            measurement: f.measurement,
            since: f.since,
            until: f.until,
        }
    }
}

#[derive(Debug, Subcommand)]
enum AgentsCmd {
    /// Enroll an agent; prints its token, which is shown only once.
    Add {
        id: String,
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Give an agent a new token; the old one stops working and its connection closes.
    Rotate { id: String },
    /// Revoke an agent: it is disconnected and cannot log in again.
    Revoke { id: String },
    /// List enrolled agents.
    List,
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Create an API token; prints it, once.
    Add {
        /// A name for the token.
        id: Option<String>,
        /// Any of read, measure, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Requests per minute (default 600).
        #[arg(long)]
        rate_per_min: Option<f64>,
    },
    Rotate {
        id: String,
    },
    Revoke {
        id: String,
    },
    List,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Up { .. }) {
        // Everything `imn up` creates in DATA (the admin token, the store, the agents'
        // outboxes) is its owner's only; the directory itself is made 0700.
        imn_cloud::files::private_umask();
    }
    // `imn up` sets up its telemetry inside the runtime (the OTLP channels live there).
    if !matches!(cli.cmd, Cmd::Up { .. }) {
        imn_cloud::init_logging();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imn: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<std::process::ExitCode> {
    use crate::cli;
    use std::io::Write;
    match cmd {
        Cmd::Up {
            http,
            mqtt,
            mqtts,
            mqtt_client_ca,
            ca,
            max_mqtt_payload,
            max_client_bytes_per_s,
            data,
            agents,
            heartbeat_ms,
            fault_injection,
            test_no_broker_acl,
            otlp_endpoint,
            grpc,
            security,
        } => {
            use imn_cloud::telemetry::{self, Component};
            let _telemetry = telemetry::init(
                &[Component::Backend, Component::Bridge, Component::Agent],
                &telemetry::OtlpConfig {
                    endpoint: otlp_endpoint,
                },
                "info,rumqttd=warn",
            )?;
            let opts = UpOptions {
                http,
                mqtt,
                mqtts,
                mqtt_client_ca,
                ca,
                max_mqtt_payload,
                max_client_bytes_per_s,
                data,
                agents,
                heartbeat_ms,
                fault_injection,
                no_broker_acl: test_no_broker_acl,
                grpc,
                security,
            };
            up(opts, imn_cloud::shutdown_signal()).await?;
        }
        Cmd::Certs {
            dir,
            hosts,
            clients,
            days,
        } => {
            let report = crate::certs::generate(&crate::certs::CertsRequest {
                dir,
                hosts,
                clients,
                days,
            })?;
            for f in report.files {
                println!("{}", f.display());
            }
        }
        Cmd::Agents {
            cmd: None,
            alive,
            tag,
            json,
            client,
        } => {
            let c = Client::new(&client)?;
            print!("{}", cli::agents(&c, alive, &tag, json).await?);
        }
        Cmd::Measure {
            module,
            target,
            agents,
            count,
            params,
            every,
            timeout,
            json,
            client,
        } => {
            let c = Client::new(&client)?;
            let m = cli::measure(
                &c,
                &cli::Measure {
                    module,
                    target,
                    agents,
                    count,
                    every,
                    params,
                    timeout,
                    json,
                },
            )
            .await?;
            print!("{}", m.output);
            if !m.complete {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Cmd::Results {
            filter,
            limit,
            json,
            client,
        } => {
            let c = Client::new(&client)?;
            print!("{}", cli::results(&c, &filter.into(), limit, json).await?);
        }
        Cmd::Watch {
            filter,
            count,
            json,
            client,
        } => {
            let c = Client::new(&client)?;
            let mut out = std::io::stdout();
            cli::watch(&c, &filter.into(), count, json, |s| {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            })
            .await?;
        }
        Cmd::Status { id, json, client } => {
            let c = Client::new(&client)?;
            print!("{}", cli::status(&c, &id, json).await?);
        }
        Cmd::Agents {
            cmd: Some(cmd),
            client,
            ..
        } => {
            let c = Client::new(&client)?;
            let out = match cmd {
                AgentsCmd::Add { id, tags } => {
                    c.post("/admin/agents", json!({"id": id, "tags": tags}))
                        .await?
                }
                AgentsCmd::Rotate { id } => {
                    c.post(&format!("/admin/agents/{id}/rotate"), json!({}))
                        .await?
                }
                AgentsCmd::Revoke { id } => {
                    c.post(&format!("/admin/agents/{id}/revoke"), json!({}))
                        .await?
                }
                AgentsCmd::List => c.get("/admin/agents").await?,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Tokens { cmd, client } => {
            let c = Client::new(&client)?;
            let out = match cmd {
                TokensCmd::Add {
                    id,
                    scopes,
                    rate_per_min,
                } => {
                    c.post(
                        "/admin/tokens",
                        json!({"id": id, "scopes": scopes, "rate_per_min": rate_per_min}),
                    )
                    .await?
                }
                TokensCmd::Rotate { id } => {
                    c.post(&format!("/admin/tokens/{id}/rotate"), json!({}))
                        .await?
                }
                TokensCmd::Revoke { id } => {
                    c.post(&format!("/admin/tokens/{id}/revoke"), json!({}))
                        .await?
                }
                TokensCmd::List => c.get("/admin/tokens").await?,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed_and_parses() {
        Cli::command().debug_assert();
        let mqtt = |args: &[&str]| match Cli::try_parse_from(args).unwrap().cmd {
            Cmd::Up { mqtt, .. } => mqtt,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            mqtt(&["imn", "up"]),
            Some("127.0.0.1:1883".parse().unwrap())
        );
        assert_eq!(mqtt(&["imn", "up", "--mqtt", "off"]), None);
        let e = Cli::try_parse_from(["imn", "up", "--mqtt", "nowhere"]).unwrap_err();
        assert!(e.to_string().contains("give ADDR:PORT or off"), "{e}");
        // Client flags go before or after the subcommand's own arguments.
        for args in [
            ["imn", "agents", "--url", "https://h:1", "add", "x"],
            ["imn", "agents", "add", "x", "--url", "https://h:1"],
        ] {
            match Cli::try_parse_from(args).unwrap().cmd {
                Cmd::Agents { client, .. } => assert_eq!(client.url, "https://h:1"),
                other => panic!("{other:?}"),
            }
        }
    }
}
