//! `imn`: the all-in-one `imn up`, development certificates, and the admin client.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imn_backend::serve::SecurityFlags;
use serde_json::json;

use crate::client::{Client, ClientFlags};
use crate::up::{up, UpOptions};

mod certs;
mod check;
mod cli;
mod client;
mod lifecycle;
mod modules;
#[cfg(test)]
mod test_util;
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
        #[command(flatten)]
        retention: imn_backend::retention::RetentionFlags,
        #[command(flatten)]
        alerts: imn_backend::alerts::AlertFlags,
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
    /// A measurement's status check as a Nagios plugin: prints the plugin output
    /// and exits 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN. With no thresholds, only
    /// agents that did not report or whose runs failed breach.
    Check {
        /// The measurement id.
        id: String,
        #[command(flatten)]
        thresholds: check::CheckArgs,
        /// The backend's JSON report instead of the plugin output (same exit codes).
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
    /// Signed agent releases: make a signing key and sign a binary (here, offline),
    /// upload the signed file and list what the backend serves.
    Releases {
        #[command(subcommand)]
        cmd: ReleasesCmd,
    },
    /// WebAssembly modules: sign a `.wasm` with its module.json (offline, with a
    /// release key), add the package (admin scope), list, delete, and load or unload
    /// it on agents.
    Modules {
        #[command(subcommand)]
        cmd: ModulesCmd,
    },
    /// Roll a release out in waves (a canary first), halting on failures; watch,
    /// pause, resume or abort it (admin scope to change).
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Change agents' settings remotely (admin scope).
    Settings {
        #[command(subcommand)]
        cmd: SettingsCmd,
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

#[derive(Debug, Subcommand)]
enum ModulesCmd {
    /// Sign a WebAssembly module with its manifest into a package (NAME.imnmod beside
    /// the .wasm) for `imn modules add`. Offline: only the key file is needed.
    Sign {
        /// The module's code.
        wasm: PathBuf,
        /// Its module.json: name, version, description, timeout_ms, params_schema,
        /// result_schema, targets, limits (see docs/wasm-modules.md).
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// A private key from `imn releases keygen` (agents trust it in `update_keys`
        /// or `module_keys`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Upload a package (admin scope); the backend checks its signature against its
    /// release keys and its schemas.
    Add {
        file: PathBuf,
        /// Also load it on every agent that can run it: those connected now, the
        /// others when they say hello.
        #[arg(long)]
        load_on_hello: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Every module: built in and added.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Forget an added module (admin scope).
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Load a module on agents (admin scope).
    Load {
        name: String,
        /// Comma-separated agent ids.
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<String>,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Unload a module from agents (admin scope).
    Unload {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<String>,
        #[command(flatten)]
        client: ClientFlags,
    },
}

#[derive(Debug, Subcommand)]
enum ReleasesCmd {
    /// Make an Ed25519 signing key: KEY (PKCS#8 DER, mode 0600, never overwritten)
    /// and KEY.pub (the public key, hex, for the agents' `update_keys`).
    Keygen {
        /// Where to write the private key. Keep it off the backend.
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Sign an agent binary as a release, into OUT (FILE.signed) for `imn releases
    /// add`. Offline: only the key file is needed.
    Sign {
        /// The agent binary.
        file: PathBuf,
        /// The private key from `imn releases keygen`.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The release's version, like 0.2.0 or 0.2.0-rc1; agents install only a newer
        /// one (unless --rollback).
        #[arg(long, value_name = "V")]
        version: String,
        /// The binary's architecture as agents report it (aarch64, arm, x86_64, mips,
        /// ...); by default read from its ELF header.
        #[arg(long, value_name = "A")]
        arch: Option<String>,
        /// How long the signature is valid (30d, 12h, ...); agents refuse it after.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// Sign as a rollback: agents on a newer version may install it.
        #[arg(long)]
        rollback: bool,
        /// The signed file (default FILE.signed).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Upload a signed release file (admin scope); the backend checks its signature
    /// against its trusted keys.
    Add {
        /// The file from `imn releases sign`.
        file: PathBuf,
        /// JSON instead of a line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// The releases the backend serves.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCmd {
    /// Start rolling VERSION out: to the canary share of the agents first, then to
    /// each wave's share, while failures stay within --max-failures.
    Start {
        /// A release uploaded with `imn releases add`.
        version: String,
        /// Which agents: tag:T, id:ID, country:CC, asn:N, limit:N (comma-separated),
        /// or all.
        #[arg(long)]
        agents: String,
        /// Share of the agents updated first, 0 to 100 (10% or 10).
        #[arg(long, default_value = "10%")]
        canary: String,
        /// Cumulative shares after the canary, increasing, the last 100%
        /// (e.g. 50%,100%).
        #[arg(long, default_value = "100%")]
        waves: String,
        /// Share of a wave's agents that may fail before the rollout halts, 0 to 100.
        #[arg(long, default_value = "0%")]
        max_failures: String,
    },
    /// All rollouts, or one with each agent's state. Waves are numbered from 0 (the
    /// canary, when there is one).
    Status {
        /// A rollout id; without it, all rollouts.
        id: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a rollout: no new agent is offered the release.
    Pause {
        /// The rollout id.
        id: String,
    },
    /// Resume a paused or halted rollout.
    Resume {
        /// The rollout id.
        id: String,
    },
    /// Abort a rollout for good.
    Abort {
        /// The rollout id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SettingsCmd {
    /// Set settings on agents: `imn settings set --agents tag:lte heartbeat_ms=30000`.
    /// Prints each agent's new settings version.
    Set {
        /// Which agents: tag:T, id:ID, country:CC, asn:N, limit:N (comma-separated),
        /// or all.
        #[arg(long)]
        agents: String,
        /// Settings, KEY=VALUE (split at the first `=`; values are sent as strings).
        #[arg(value_name = "KEY=VALUE", required = true)]
        settings: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `imn check` is a Nagios plugin: a usage error is UNKNOWN (3), not
            // clap's 2 (CRITICAL).
            let is_check = std::env::args().nth(1).as_deref() == Some("check");
            let _ = e.print();
            return if is_check && e.use_stderr() {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or("usage error");
                println!("IMN UNKNOWN - {}", first.trim_start_matches("error: "));
                std::process::ExitCode::from(check::UNKNOWN)
            } else {
                std::process::ExitCode::from(e.exit_code() as u8)
            };
        }
    };
    let unknown_on_failure = matches!(cli.cmd, Cmd::Check { .. });
    let failure = || {
        if unknown_on_failure {
            std::process::ExitCode::from(check::UNKNOWN)
        } else {
            std::process::ExitCode::FAILURE
        }
    };
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
            return failure();
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imn: {e:#}");
            failure()
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
            retention,
            alerts,
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
                retention: retention.settings(),
                alerts: alerts.settings(),
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
        Cmd::Check {
            id,
            thresholds,
            json,
            client,
        } => {
            // Every failure, even a bad --ca, is the plugin's UNKNOWN (3), not 1.
            let (out, code) = match Client::new(&client) {
                Ok(c) => check::check(&c, &id, &thresholds, json).await,
                Err(e) => (format!("IMN UNKNOWN - {e}\n"), check::UNKNOWN),
            };
            print!("{out}");
            return Ok(std::process::ExitCode::from(code));
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
        Cmd::Modules { cmd } => match cmd {
            ModulesCmd::Sign {
                wasm,
                manifest,
                key,
                out,
                force,
            } => print!(
                "{}",
                modules::sign(&wasm, &manifest, &key, out, force, imn_proto::now_ms())?
            ),
            ModulesCmd::Add {
                file,
                load_on_hello,
                json,
                client,
            } => print!(
                "{}",
                modules::add(&Client::new(&client)?, &file, load_on_hello, json).await?
            ),
            ModulesCmd::List { json, client } => {
                print!("{}", modules::list(&Client::new(&client)?, json).await?)
            }
            ModulesCmd::Delete { name, client } => {
                let v = Client::new(&client)?
                    .delete(&format!("/admin/modules/{name}"))
                    .await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            ModulesCmd::Load {
                name,
                agents,
                client,
            } => print!(
                "{}",
                modules::load(&Client::new(&client)?, &name, &agents, true).await?
            ),
            ModulesCmd::Unload {
                name,
                agents,
                client,
            } => print!(
                "{}",
                modules::load(&Client::new(&client)?, &name, &agents, false).await?
            ),
        },
        Cmd::Releases { cmd } => match cmd {
            ReleasesCmd::Keygen { out } => print!("{}", lifecycle::keygen(&out)?),
            ReleasesCmd::Sign {
                file,
                key,
                version,
                arch,
                expires,
                rollback,
                out,
                force,
            } => {
                let s = lifecycle::Sign {
                    file,
                    key,
                    version,
                    arch,
                    expires,
                    rollback,
                    out,
                    force,
                };
                print!("{}", lifecycle::sign(&s, imn_proto::now_ms())?);
            }
            ReleasesCmd::Add { file, json, client } => {
                let c = Client::new(&client)?;
                print!("{}", lifecycle::add(&c, &file, json).await?);
            }
            ReleasesCmd::List { json, client } => {
                let c = Client::new(&client)?;
                print!("{}", lifecycle::list(&c, json).await?);
            }
        },
        Cmd::Rollout { cmd, client } => {
            use lifecycle::RolloutAction;
            let c = Client::new(&client)?;
            let out = match cmd {
                RolloutCmd::Start {
                    version,
                    agents,
                    canary,
                    waves,
                    max_failures,
                } => {
                    let start = lifecycle::RolloutStart {
                        version,
                        agents,
                        canary,
                        waves,
                        max_failures,
                    };
                    lifecycle::rollout_start(&c, &start).await?
                }
                RolloutCmd::Status { id, json } => {
                    lifecycle::rollout_status(&c, id.as_deref(), json).await?
                }
                RolloutCmd::Pause { id } => {
                    lifecycle::rollout_action(&c, &id, RolloutAction::Pause).await?
                }
                RolloutCmd::Resume { id } => {
                    lifecycle::rollout_action(&c, &id, RolloutAction::Resume).await?
                }
                RolloutCmd::Abort { id } => {
                    lifecycle::rollout_action(&c, &id, RolloutAction::Abort).await?
                }
            };
            print!("{out}");
        }
        Cmd::Settings {
            cmd: SettingsCmd::Set { agents, settings },
            client,
        } => {
            let c = Client::new(&client)?;
            print!("{}", lifecycle::settings_set(&c, &agents, &settings).await?);
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

    #[test]
    fn the_release_rollout_and_settings_commands_parse() {
        let cmd = |args: &[&str]| Cli::try_parse_from(args).unwrap().cmd;
        match cmd(&["imn", "releases", "keygen", "--out", "k"]) {
            Cmd::Releases {
                cmd: ReleasesCmd::Keygen { out },
            } => assert_eq!(out, PathBuf::from("k")),
            other => panic!("{other:?}"),
        }
        match cmd(&[
            "imn",
            "releases",
            "sign",
            "bin",
            "--key",
            "k",
            "--version",
            "0.2.0",
        ]) {
            Cmd::Releases {
                cmd:
                    ReleasesCmd::Sign {
                        file,
                        version,
                        arch,
                        expires,
                        rollback,
                        out,
                        force,
                        ..
                    },
            } => {
                assert_eq!(file, PathBuf::from("bin"));
                assert_eq!(version, "0.2.0");
                assert_eq!((arch, expires.as_str()), (None, "90d"));
                assert!(!rollback && !force && out.is_none());
            }
            other => panic!("{other:?}"),
        }
        match cmd(&[
            "imn",
            "releases",
            "sign",
            "bin",
            "--key",
            "k",
            "--version",
            "0.1.0",
            "--arch",
            "arm",
            "--expires",
            "7d",
            "--rollback",
            "--out",
            "o",
            "--force",
        ]) {
            Cmd::Releases {
                cmd:
                    ReleasesCmd::Sign {
                        arch,
                        expires,
                        rollback,
                        out,
                        force,
                        ..
                    },
            } => {
                assert_eq!((arch.as_deref(), expires.as_str()), (Some("arm"), "7d"));
                assert!(rollback && force);
                assert_eq!(out, Some(PathBuf::from("o")));
            }
            other => panic!("{other:?}"),
        }
        // Signing needs its key and version.
        assert!(Cli::try_parse_from(["imn", "releases", "sign", "bin", "--key", "k"]).is_err());
        match cmd(&["imn", "releases", "add", "f.signed", "--url", "https://h:1"]) {
            Cmd::Releases {
                cmd: ReleasesCmd::Add { file, client, .. },
            } => {
                assert_eq!(file, PathBuf::from("f.signed"));
                assert_eq!(client.url, "https://h:1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cmd(&["imn", "releases", "list", "--json"]),
            Cmd::Releases {
                cmd: ReleasesCmd::List { json: true, .. }
            }
        ));
        match cmd(&["imn", "rollout", "start", "0.2.0", "--agents", "tag:lte"]) {
            Cmd::Rollout {
                cmd:
                    RolloutCmd::Start {
                        version,
                        agents,
                        canary,
                        waves,
                        max_failures,
                    },
                ..
            } => {
                assert_eq!(
                    [version, agents, canary, waves, max_failures],
                    ["0.2.0", "tag:lte", "10%", "100%", "0%"]
                );
            }
            other => panic!("{other:?}"),
        }
        // A rollout names its agents.
        assert!(Cli::try_parse_from(["imn", "rollout", "start", "0.2.0"]).is_err());
        match cmd(&[
            "imn",
            "rollout",
            "start",
            "0.2.0",
            "--agents",
            "all",
            "--canary",
            "5",
            "--waves",
            "50%,100%",
            "--max-failures",
            "10%",
            "--token",
            "t",
        ]) {
            Cmd::Rollout {
                cmd:
                    RolloutCmd::Start {
                        canary,
                        waves,
                        max_failures,
                        ..
                    },
                client,
            } => {
                assert_eq!([canary, waves, max_failures], ["5", "50%,100%", "10%"]);
                assert_eq!(client.token.as_deref(), Some("t"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cmd(&["imn", "rollout", "status"]),
            Cmd::Rollout {
                cmd: RolloutCmd::Status {
                    id: None,
                    json: false
                },
                ..
            }
        ));
        match cmd(&[
            "imn",
            "rollout",
            "--url",
            "https://h:1",
            "status",
            "r-1",
            "--json",
        ]) {
            Cmd::Rollout {
                cmd: RolloutCmd::Status { id, json },
                client,
            } => {
                assert_eq!((id.as_deref(), json), (Some("r-1"), true));
                assert_eq!(client.url, "https://h:1");
            }
            other => panic!("{other:?}"),
        }
        for (action, id) in [("pause", "r-1"), ("resume", "r-2"), ("abort", "r-3")] {
            match (action, cmd(&["imn", "rollout", action, id])) {
                (
                    "pause",
                    Cmd::Rollout {
                        cmd: RolloutCmd::Pause { id: got },
                        ..
                    },
                )
                | (
                    "resume",
                    Cmd::Rollout {
                        cmd: RolloutCmd::Resume { id: got },
                        ..
                    },
                )
                | (
                    "abort",
                    Cmd::Rollout {
                        cmd: RolloutCmd::Abort { id: got },
                        ..
                    },
                ) => assert_eq!(got, id),
                (_, other) => panic!("{action}: {other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["imn", "rollout", "pause"]).is_err());
        match cmd(&[
            "imn",
            "settings",
            "set",
            "--agents",
            "id:edge-1",
            "a=1",
            "b=x=y",
        ]) {
            Cmd::Settings {
                cmd: SettingsCmd::Set { agents, settings },
                ..
            } => {
                assert_eq!(agents, "id:edge-1");
                assert_eq!(settings, ["a=1", "b=x=y"]);
            }
            other => panic!("{other:?}"),
        }
        // At least one KEY=VALUE, and the agents.
        assert!(Cli::try_parse_from(["imn", "settings", "set", "--agents", "all"]).is_err());
        assert!(Cli::try_parse_from(["imn", "settings", "set", "a=1"]).is_err());
    }
}
