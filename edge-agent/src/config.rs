//! Agent configuration: defaults, then a TOML file, then `IMN_…` environment variables,
//! then command-line flags, each overriding the one before.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the agent can be told. Unknown keys in the file are errors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent's id: 1 to 64 of `A-Z a-z 0-9 _ -`. Also its MQTT client id. Empty: the
    /// agent makes one up once (`imn-` and 12 random hex digits) and keeps it in
    /// `DATA/agent-id`, so a freshly flashed device needs no per-device config.
    pub id: String,
    /// The bridge's broker: `mqtt://HOST[:PORT]` (port 1883), or `mqtts://HOST[:PORT]`
    /// (TLS, port 8883). HOST may be a name: the agent resolves it itself, again on every
    /// reconnect.
    pub broker: String,
    /// PEM file of the CA that signed the broker's certificate (`mqtts://`). Without it,
    /// the system's bundle at `/etc/ssl/certs/ca-certificates.crt` is used.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Name servers (`ADDR` or `ADDR:PORT`) used instead of `/etc/resolv.conf`'s.
    pub nameservers: Vec<String>,
    /// The agent's secret, sent as the MQTT password (the id is the user name). Given
    /// as `--token` it is visible to every user in `ps`: prefer `token_file`.
    pub token: Option<String>,
    /// A file holding the token (mode 0600), read at start; it takes the place of
    /// `token`. A file that does not exist means no token (a package installs the path
    /// before the agent is enrolled); `--print-config` never prints the token itself.
    pub token_file: Option<PathBuf>,
    /// Where the outbox and command log live.
    pub data: PathBuf,
    /// Free-form labels for selecting agents.
    pub tags: Vec<String>,
    /// Heartbeat period in milliseconds.
    pub heartbeat_ms: u64,
    /// MQTT keep-alive in seconds: a link that died silently is noticed within about
    /// twice this (shorter on links that drop without a reset, such as cellular).
    pub keepalive_s: u64,
    /// Largest outbox batch sent in one MQTT message, in bytes.
    pub batch_max_bytes: usize,
    /// Batches sent but not yet acked before the agent waits.
    pub window: usize,
    /// After this long with no ack, everything unacked is sent again.
    pub resend_timeout_ms: u64,
    /// How long one MQTT connection attempt may take (a busy broker is slow to accept).
    pub connect_timeout_s: u64,
    /// Bytes of unacked records the outbox keeps; past it the oldest are evicted.
    pub outbox_max_bytes: u64,
    /// Bytes of records kept in memory while the disk is full or failing.
    pub outbox_memory_bytes: u64,
    /// Free space the outbox leaves on the data filesystem.
    pub disk_reserve_bytes: u64,
    /// Send new results ahead of the backlog when catching up.
    pub live_first: bool,
    /// Serve Prometheus `/metrics` here (e.g. `127.0.0.1:9101`); needs an agent built
    /// with the `metrics` feature.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the agent is, for selecting agents (`GET /agents?country=…`): ISO 3166-1
    /// alpha-2 country code, city, WGS 84 coordinates, and the network's AS number.
    pub country: Option<String>,
    pub city: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub asn: Option<u32>,
    /// Runs at once, from commands and schedules together; more wait in a queue.
    pub max_runs: u32,
    /// Runs waiting at most; past it a new run fails at once.
    pub max_queued_runs: u32,
    /// Probes per second across all running runs (each run's declared rate); a run
    /// that does not fit waits.
    pub max_probe_rate: f64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            id: String::new(),
            broker: "mqtt://127.0.0.1:1883".into(),
            token: None,
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            nameservers: Vec::new(),
            data: PathBuf::from("imn-agent-data"),
            tags: Vec::new(),
            heartbeat_ms: 10_000,
            keepalive_s: 30,
            batch_max_bytes: 256 * 1024,
            window: 8,
            resend_timeout_ms: 10_000,
            connect_timeout_s: 30,
            outbox_max_bytes: 64 * 1024 * 1024,
            outbox_memory_bytes: 4 * 1024 * 1024,
            disk_reserve_bytes: 2 * 1024 * 1024,
            live_first: false,
            metrics_listen: None,
            country: None,
            city: None,
            latitude: None,
            longitude: None,
            asn: None,
            max_runs: 4,
            max_queued_runs: 1000,
            max_probe_rate: 2000.0,
        }
    }
}

/// What `--print-config` shows in place of the token.
pub const REDACTED: &str = "<redacted>";

/// The largest token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Every flag, its environment variable and its help line. A flag given on the command
/// line overrides its variable. (A table, not clap: clap is 200 KiB of firmware.)
const OPTIONS: &[(&str, &str, &str)] = &[
    ("config", "IMN_CONFIG", "TOML config file"),
    (
        "uci",
        "IMN_UCI",
        "OpenWrt UCI config file (its `agent` section; same keys as the TOML)",
    ),
    (
        "id",
        "IMN_ID",
        "agent id (empty: made up once, kept in DATA/agent-id)",
    ),
    (
        "broker",
        "IMN_BROKER",
        "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; several separated by commas",
    ),
    (
        "token",
        "IMN_AGENT_TOKEN",
        "the agent's secret (MQTT password); on the command line every user sees it in `ps`: use --token-file",
    ),
    (
        "token-file",
        "IMN_AGENT_TOKEN_FILE",
        "file holding the agent's secret (mode 0600); replaces --token",
    ),
    ("tls-ca", "IMN_TLS_CA", "PEM CA certificate for mqtts://"),
    (
        "tls-cert",
        "IMN_TLS_CERT",
        "PEM client certificate chain (mutual TLS)",
    ),
    ("tls-key", "IMN_TLS_KEY", "PEM client key (mutual TLS)"),
    (
        "nameservers",
        "IMN_NAMESERVERS",
        "comma-separated ADDR or ADDR:PORT (default: /etc/resolv.conf's)",
    ),
    (
        "data",
        "IMN_DATA",
        "data directory (outbox and command log)",
    ),
    ("tags", "IMN_TAGS", "comma-separated tags"),
    ("heartbeat-ms", "IMN_HEARTBEAT_MS", "heartbeat period"),
    (
        "keepalive-s",
        "IMN_KEEPALIVE_S",
        "MQTT keep-alive: a silently dead link is noticed within about twice this (5 to 3600, default 30)",
    ),
    (
        "resend-timeout-ms",
        "IMN_RESEND_TIMEOUT_MS",
        "resend unacked batches after this long",
    ),
    (
        "outbox-max-bytes",
        "IMN_OUTBOX_MAX_BYTES",
        "bytes of unacked records kept on disk before the oldest are evicted",
    ),
    (
        "outbox-memory-bytes",
        "IMN_OUTBOX_MEMORY_BYTES",
        "bytes kept in memory while the disk is full or failing",
    ),
    (
        "disk-reserve-bytes",
        "IMN_DISK_RESERVE_BYTES",
        "free space left on the data filesystem",
    ),
    (
        "live-first",
        "IMN_LIVE_FIRST",
        "true: send new results ahead of the backlog",
    ),
    (
        "window",
        "IMN_WINDOW",
        "batches sent and not yet acked, at most",
    ),
    (
        "batch-max-bytes",
        "IMN_BATCH_MAX_BYTES",
        "largest batch, in bytes of records",
    ),
    (
        "country",
        "IMN_COUNTRY",
        "ISO 3166-1 alpha-2 country code of the agent's location (DE, NL, …)",
    ),
    ("city", "IMN_CITY", "city of the agent's location"),
    (
        "latitude",
        "IMN_LATITUDE",
        "latitude of the agent's location, -90 to 90",
    ),
    (
        "longitude",
        "IMN_LONGITUDE",
        "longitude of the agent's location, -180 to 180",
    ),
    ("asn", "IMN_ASN", "AS number of the agent's network"),
    (
        "metrics-listen",
        "IMN_METRICS_LISTEN",
        "ADDR:PORT of a Prometheus /metrics listener (builds with the `metrics` feature)",
    ),
    (
        "max-runs",
        "IMN_MAX_RUNS",
        "runs at once, commands and schedules together; more wait (1 to 1024, default 4)",
    ),
    (
        "max-queued-runs",
        "IMN_MAX_QUEUED_RUNS",
        "runs waiting at most; past it a new run fails at once (0 to 100000, default 1000)",
    ),
    (
        "max-probe-rate",
        "IMN_MAX_PROBE_RATE",
        "probes per second across all running runs (default 2000)",
    ),
];

/// Command-line flags and their `IMN_…` environment variables, before the config file.
#[derive(Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub uci: Option<PathBuf>,
    pub print_config: bool,
    pub id: Option<String>,
    pub broker: Option<String>,
    /// At most one of `token` and `token_file`: a flag beats its environment variable,
    /// and both given at the same level is an error.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub nameservers: Option<Vec<String>>,
    pub data: Option<PathBuf>,
    pub tags: Option<Vec<String>>,
    pub heartbeat_ms: Option<u64>,
    pub keepalive_s: Option<u64>,
    pub resend_timeout_ms: Option<u64>,
    pub outbox_max_bytes: Option<u64>,
    pub outbox_memory_bytes: Option<u64>,
    pub disk_reserve_bytes: Option<u64>,
    pub live_first: Option<bool>,
    pub window: Option<usize>,
    pub batch_max_bytes: Option<usize>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub country: Option<String>,
    pub city: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub asn: Option<u32>,
    pub max_runs: Option<u32>,
    pub max_queued_runs: Option<u32>,
    pub max_probe_rate: Option<f64>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Flags>),
    Help(String),
    Version(String),
}

impl Flags {
    /// Parses the process's arguments and environment.
    pub fn from_env() -> Result<Command, ConfigError> {
        if std::env::var_os("IMN_TOKEN").is_some() && std::env::var_os("IMN_AGENT_TOKEN").is_none()
        {
            // IMN_TOKEN is the `imn` command's API token: never an agent's password.
            tracing::warn!("IMN_TOKEN is set and ignored: the agent reads its token from IMN_AGENT_TOKEN, --token-file or the config file");
        }
        Flags::parse(std::env::args().skip(1), |k| std::env::var(k).ok())
    }

    /// Parses `args` (without the program name), with `env` for the variables.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, ConfigError> {
        let mut values: Vec<Option<String>> = OPTIONS.iter().map(|o| env(o.1)).collect();
        // Which values came from the command line (the others from the environment).
        let mut from_args = vec![false; OPTIONS.len()];
        let mut print_config = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help(help())),
                "-V" | "--version" => {
                    return Ok(Command::Version(format!(
                        "imn-agent {}",
                        env!("CARGO_PKG_VERSION")
                    )))
                }
                "--print-config" => {
                    print_config = true;
                    continue;
                }
                _ => {}
            }
            let bad = || ConfigError::Invalid {
                field: "arguments",
                rule: format!("unknown argument {arg:?} (see --help)"),
            };
            let body = arg.strip_prefix("--").ok_or_else(bad)?;
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let i = OPTIONS.iter().position(|o| o.0 == name).ok_or_else(bad)?;
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| ConfigError::Invalid {
                    field: OPTIONS[i].1,
                    rule: format!("--{name} needs a value"),
                })?,
            };
            values[i] = Some(value);
            from_args[i] = true;
        }
        let get = |name: &str| -> Option<(&'static str, String)> {
            let i = OPTIONS.iter().position(|o| o.0 == name)?;
            values[i].clone().map(|v| (OPTIONS[i].1, v))
        };
        fn num<T: std::str::FromStr>(
            v: Option<(&'static str, String)>,
        ) -> Result<Option<T>, ConfigError> {
            v.map(|(field, s)| {
                s.trim().parse::<T>().map_err(|_| ConfigError::Invalid {
                    field,
                    rule: format!("must be a whole number (got {s:?})"),
                })
            })
            .transpose()
        }
        let list = |v: Option<(&'static str, String)>| {
            v.map(|(_, s)| {
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
            })
        };
        let live_first = get("live-first")
            .map(|(field, s)| match s.as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(ConfigError::Invalid {
                    field,
                    rule: format!("must be true or false (got {s:?})"),
                }),
            })
            .transpose()?;
        // The token and its file are one setting: the command line beats the
        // environment, and both at the same level is an error.
        let (ti, fi) = (
            OPTIONS.iter().position(|o| o.0 == "token").expect("token"),
            OPTIONS
                .iter()
                .position(|o| o.0 == "token-file")
                .expect("token-file"),
        );
        let (token, token_file) = match (from_args[ti], from_args[fi]) {
            (true, true) => {
                return Err(ConfigError::Invalid {
                    field: "token/token-file",
                    rule: "give --token or --token-file, not both".into(),
                })
            }
            (true, false) => (values[ti].clone(), None),
            (false, true) => (None, values[fi].clone()),
            (false, false) if values[ti].is_some() && values[fi].is_some() => {
                return Err(ConfigError::Invalid {
                    field: "IMN_AGENT_TOKEN/IMN_AGENT_TOKEN_FILE",
                    rule: "set one of them, not both".into(),
                })
            }
            (false, false) => (values[ti].clone(), values[fi].clone()),
        };
        let float = |v: Option<(&'static str, String)>| -> Result<Option<f64>, ConfigError> {
            v.map(|(field, s)| {
                s.trim().parse::<f64>().map_err(|_| ConfigError::Invalid {
                    field,
                    rule: format!("must be a number (got {s:?})"),
                })
            })
            .transpose()
        };
        let flags = Flags {
            config: get("config").map(|v| v.1.into()),
            uci: get("uci").map(|v| v.1.into()),
            print_config,
            id: get("id").map(|v| v.1),
            broker: get("broker").map(|v| v.1),
            token,
            token_file: token_file.map(PathBuf::from),
            tls_ca: get("tls-ca").map(|v| v.1.into()),
            tls_cert: get("tls-cert").map(|v| v.1.into()),
            tls_key: get("tls-key").map(|v| v.1.into()),
            nameservers: list(get("nameservers")),
            data: get("data").map(|v| v.1.into()),
            tags: list(get("tags")),
            heartbeat_ms: num(get("heartbeat-ms"))?,
            keepalive_s: num(get("keepalive-s"))?,
            resend_timeout_ms: num(get("resend-timeout-ms"))?,
            outbox_max_bytes: num(get("outbox-max-bytes"))?,
            outbox_memory_bytes: num(get("outbox-memory-bytes"))?,
            disk_reserve_bytes: num(get("disk-reserve-bytes"))?,
            live_first,
            window: num(get("window"))?,
            batch_max_bytes: num(get("batch-max-bytes"))?,
            country: get("country").map(|v| v.1),
            city: get("city").map(|v| v.1),
            latitude: get("latitude")
                .map(|(field, s)| {
                    s.trim().parse().map_err(|_| ConfigError::Invalid {
                        field,
                        rule: format!("must be a number of degrees (got {s:?})"),
                    })
                })
                .transpose()?,
            longitude: get("longitude")
                .map(|(field, s)| {
                    s.trim().parse().map_err(|_| ConfigError::Invalid {
                        field,
                        rule: format!("must be a number of degrees (got {s:?})"),
                    })
                })
                .transpose()?,
            asn: num(get("asn"))?,
            max_runs: num(get("max-runs"))?,
            max_queued_runs: num(get("max-queued-runs"))?,
            max_probe_rate: float(get("max-probe-rate"))?,
            metrics_listen: get("metrics-listen")
                .map(|(field, s)| {
                    s.trim().parse().map_err(|_| ConfigError::Invalid {
                        field,
                        rule: format!("must be ADDR:PORT, like 127.0.0.1:9101 (got {s:?})"),
                    })
                })
                .transpose()?,
        };
        if flags.config.is_some() && flags.uci.is_some() {
            return Err(ConfigError::Invalid {
                field: "config/uci",
                rule: "give a TOML config or a UCI config, not both".into(),
            });
        }
        Ok(Command::Run(Box::new(flags)))
    }
}

fn help() -> String {
    let mut h = format!(
        "imn-agent {}: IMN measurement agent\n\nUsage: imn-agent [OPTIONS]\n\n\
         Settings come from the config file, then the environment, then the flags.\n\n\
         Options:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (flag, env, text) in OPTIONS {
        h.push_str(&format!("  --{flag} VALUE\n      {text} [env: {env}]\n"));
    }
    h.push_str("  --print-config\n      print the resulting config as TOML (the token as \"<redacted>\") and exit\n");
    h.push_str("  -h, --help\n  -V, --version\n");
    h
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{field}: {rule}")]
    Invalid { field: &'static str, rule: String },
}

impl AgentConfig {
    /// Builds the config from file, environment and flags.
    pub fn load(flags: Flags) -> Result<AgentConfig, ConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })
        };
        let mut cfg = match (&flags.config, &flags.uci) {
            (Some(path), _) => {
                toml::from_str(&read(path)?).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            (None, Some(path)) => from_uci(&read(path)?).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source,
            })?,
            (None, None) => AgentConfig::default(),
        };
        if let Some(v) = flags.id {
            cfg.id = v;
        }
        if let Some(v) = flags.broker {
            cfg.broker = v;
        }
        // A token or token file given on the command line or in the environment
        // replaces both of the file's.
        if let Some(v) = flags.token {
            cfg.token = Some(v);
            cfg.token_file = None;
        } else if let Some(v) = flags.token_file {
            cfg.token_file = Some(v);
            cfg.token = None;
        }
        if let Some(v) = flags.tls_ca {
            cfg.tls_ca = Some(v);
        }
        if let Some(v) = flags.tls_cert {
            cfg.tls_cert = Some(v);
        }
        if let Some(v) = flags.tls_key {
            cfg.tls_key = Some(v);
        }
        if let Some(v) = flags.nameservers {
            cfg.nameservers = v.into_iter().filter(|t| !t.is_empty()).collect();
        }
        if let Some(v) = flags.data {
            cfg.data = v;
        }
        if let Some(v) = flags.tags {
            cfg.tags = v.into_iter().filter(|t| !t.is_empty()).collect();
        }
        if let Some(v) = flags.heartbeat_ms {
            cfg.heartbeat_ms = v;
        }
        if let Some(v) = flags.keepalive_s {
            cfg.keepalive_s = v;
        }
        if let Some(v) = flags.resend_timeout_ms {
            cfg.resend_timeout_ms = v;
        }
        if let Some(v) = flags.outbox_max_bytes {
            cfg.outbox_max_bytes = v;
        }
        if let Some(v) = flags.outbox_memory_bytes {
            cfg.outbox_memory_bytes = v;
        }
        if let Some(v) = flags.disk_reserve_bytes {
            cfg.disk_reserve_bytes = v;
        }
        if let Some(v) = flags.live_first {
            cfg.live_first = v;
        }
        if let Some(v) = flags.window {
            cfg.window = v;
        }
        if let Some(v) = flags.batch_max_bytes {
            cfg.batch_max_bytes = v;
        }
        if let Some(v) = flags.metrics_listen {
            cfg.metrics_listen = Some(v);
        }
        if let Some(v) = flags.country {
            cfg.country = Some(v);
        }
        if let Some(v) = flags.city {
            cfg.city = Some(v);
        }
        if let Some(v) = flags.latitude {
            cfg.latitude = Some(v);
        }
        if let Some(v) = flags.longitude {
            cfg.longitude = Some(v);
        }
        if let Some(v) = flags.asn {
            cfg.asn = Some(v);
        }
        if let Some(v) = flags.max_runs {
            cfg.max_runs = v;
        }
        if let Some(v) = flags.max_queued_runs {
            cfg.max_queued_runs = v;
        }
        if let Some(v) = flags.max_probe_rate {
            cfg.max_probe_rate = v;
        }
        if let Some(path) = cfg.token_file.clone() {
            if cfg.token.is_some() {
                return Err(ConfigError::Invalid {
                    field: "token/token_file",
                    rule: "give token or token_file, not both".into(),
                });
            }
            cfg.token = read_token_file(&path)?;
        }
        if let Some(c) = cfg.country.as_mut() {
            *c = c.trim().to_ascii_uppercase();
        }
        if cfg.id.is_empty() {
            cfg.id = persistent_id(&cfg.data)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The location the agent reports in its hello, if any part is configured.
    pub fn location(&self) -> Option<imn_proto::wire::Location> {
        let l = imn_proto::wire::Location {
            country: self.country.clone(),
            city: self.city.clone(),
            latitude: self.latitude,
            longitude: self.longitude,
            asn: self.asn,
        };
        (l != imn_proto::wire::Location::default()).then_some(l)
    }

    /// The config as `--print-config` shows it: the token as [`REDACTED`].
    pub fn redacted(&self) -> AgentConfig {
        AgentConfig {
            token: self.token.as_ref().map(|_| REDACTED.to_string()),
            ..self.clone()
        }
    }

    /// The budget the agent enforces across its runs, as its hello reports it.
    pub fn limits(&self) -> imn_proto::wire::AgentLimits {
        imn_proto::wire::AgentLimits {
            max_runs: self.max_runs,
            max_queued_runs: self.max_queued_runs,
            max_probe_rate: self.max_probe_rate,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !imn_proto::wire::valid_agent_id(&self.id) {
            return Err(ConfigError::Invalid {
                field: "id",
                rule: format!(
                    "must be 1 to 64 characters of A-Z a-z 0-9 _ - (got {:?})",
                    self.id
                ),
            });
        }
        let broker = self.broker_addr()?;
        if !broker.tls && (self.tls_ca.is_some() || self.tls_cert.is_some()) {
            return Err(ConfigError::Invalid {
                field: "tls_ca/tls_cert",
                rule: "TLS settings need an mqtts:// broker".into(),
            });
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                field: "tls_cert/tls_key",
                rule: "a client certificate needs its key, and a key its certificate".into(),
            });
        }
        if broker.tls && !cfg!(feature = "tls") {
            return Err(ConfigError::Invalid {
                field: "broker",
                rule: "mqtts:// needs an agent built with the `tls` feature".into(),
            });
        }
        self.nameserver_addrs()?;
        if let Some(c) = &self.country {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::Invalid {
                    field: "country",
                    rule: format!("must be an ISO 3166-1 alpha-2 code, like DE (got {c:?})"),
                });
            }
        }
        for (field, v, max) in [
            ("latitude", self.latitude, 90.0),
            ("longitude", self.longitude, 180.0),
        ] {
            if v.is_some_and(|v| !(-max..=max).contains(&v)) {
                return Err(ConfigError::Invalid {
                    field,
                    rule: format!("must be -{max} to {max} degrees"),
                });
            }
        }
        if self.metrics_listen.is_some() && !cfg!(feature = "metrics") {
            return Err(ConfigError::Invalid {
                field: "metrics_listen",
                rule:
                    "needs an agent built with the `metrics` feature (firmware builds leave it out)"
                        .into(),
            });
        }
        if self.heartbeat_ms < 100 {
            return Err(ConfigError::Invalid {
                field: "heartbeat_ms",
                rule: "must be at least 100".into(),
            });
        }
        if !(5..=3600).contains(&self.keepalive_s) {
            return Err(ConfigError::Invalid {
                field: "keepalive_s",
                rule: "must be 5 to 3600 seconds".into(),
            });
        }
        if self.batch_max_bytes < 1024 || self.window == 0 {
            return Err(ConfigError::Invalid {
                field: "batch_max_bytes/window",
                rule: "batch_max_bytes must be at least 1024 and window at least 1".into(),
            });
        }
        if !(1..=1024).contains(&self.max_runs) {
            return Err(ConfigError::Invalid {
                field: "max_runs",
                rule: format!("must be 1 to 1024 (got {})", self.max_runs),
            });
        }
        if self.max_queued_runs > 100_000 {
            return Err(ConfigError::Invalid {
                field: "max_queued_runs",
                rule: format!("must be 0 to 100000 (got {})", self.max_queued_runs),
            });
        }
        if !(self.max_probe_rate.is_finite() && self.max_probe_rate >= 1.0) {
            return Err(ConfigError::Invalid {
                field: "max_probe_rate",
                rule: format!(
                    "must be a number of probes per second, at least 1 (got {})",
                    self.max_probe_rate
                ),
            });
        }
        if self.token.as_deref() == Some(REDACTED) {
            return Err(ConfigError::Invalid {
                field: "token",
                rule: format!(
                    "{REDACTED:?} is what --print-config shows in place of the token, not a token"
                ),
            });
        }
        Ok(())
    }

    /// The first broker of the list (see [`Self::broker_addrs`]).
    pub fn broker_addr(&self) -> Result<BrokerAddr, ConfigError> {
        Ok(self.broker_addrs()?.remove(0))
    }

    /// Host, port and scheme of each broker in `broker`: one `mqtt://HOST[:PORT]` or
    /// `mqtts://HOST[:PORT]`, or several separated by commas (bridges of one
    /// deployment), all with the same scheme.
    pub fn broker_addrs(&self) -> Result<Vec<BrokerAddr>, ConfigError> {
        let list: Vec<BrokerAddr> = self
            .broker
            .split(',')
            .map(|b| Self::parse_broker(b.trim()))
            .collect::<Result<_, _>>()?;
        if list.iter().any(|b| b.tls != list[0].tls) {
            return Err(ConfigError::Invalid {
                field: "broker",
                rule: format!(
                    "every broker of a list must use the same scheme, mqtt:// or mqtts:// (got {:?})",
                    self.broker
                ),
            });
        }
        Ok(list)
    }

    fn parse_broker(broker: &str) -> Result<BrokerAddr, ConfigError> {
        let invalid = |rule: &str| ConfigError::Invalid {
            field: "broker",
            rule: format!("{rule} (got {:?})", broker),
        };
        let (rest, tls) = if let Some(r) = broker.strip_prefix("mqtt://") {
            (r, false)
        } else if let Some(r) = broker.strip_prefix("mqtts://") {
            (r, true)
        } else {
            return Err(invalid("must start with mqtt:// or mqtts://"));
        };
        let default_port = if tls { 8883 } else { 1883 };
        // `[v6]:port`, `[v6]`, `host:port`, `host`; a bare IPv6 address has no port.
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| invalid("an IPv6 address needs its closing ']'"))?;
            match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if tail.is_empty() => (h, None),
                None => return Err(invalid("must be mqtt://HOST[:PORT]")),
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
            (h, Some(p))
        } else {
            (rest, None)
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid("port must be a number from 1 to 65535"))?,
            None => default_port,
        };
        if host.is_empty() || host.contains('/') {
            return Err(invalid("must be mqtt://HOST[:PORT]"));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// The configured name servers as socket addresses.
    pub fn nameserver_addrs(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        self.nameservers
            .iter()
            .map(|s| {
                imn_resolver::parse_nameserver(s).map_err(|rule| ConfigError::Invalid {
                    field: "nameservers",
                    rule,
                })
            })
            .collect()
    }
}

/// The token in `path`, trimmed; `None` for a file that does not exist (with a
/// warning) or holds nothing. A file others may read is used, with a warning.
fn read_token_file(path: &std::path::Path) -> Result<Option<String>, ConfigError> {
    let io = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), "token_file does not exist: connecting without a token");
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    let invalid = |rule: String| ConfigError::Invalid {
        field: "token_file",
        rule,
    };
    if !meta.is_file() {
        return Err(invalid(format!("{} is not a file", path.display())));
    }
    if meta.len() > MAX_TOKEN_FILE_BYTES {
        return Err(invalid(format!(
            "{} is {} bytes; a token file holds one token",
            path.display(),
            meta.len()
        )));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the token file can be read by others: chmod 0600 it");
        }
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let token = text.trim();
    if token.is_empty() {
        tracing::warn!(path = %path.display(), "token_file is empty: connecting without a token");
        return Ok(None);
    }
    if token.contains(['\n', '\r']) {
        return Err(invalid(format!(
            "{} holds more than one line; it must hold only the token",
            path.display()
        )));
    }
    Ok(Some(token.to_string()))
}

/// The id kept in `DATA/agent-id`, made up on first start.
fn persistent_id(data: &std::path::Path) -> Result<String, ConfigError> {
    let path = data.join("agent-id");
    let io = |source| ConfigError::Read {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) => return Ok(id.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(data).map_err(io)?;
    let id = format!("imn-{:012x}", crate::random_u64() >> 16);
    // Written whole and synced, then renamed, and the directory synced: a power cut
    // leaves no file or the whole one, never an empty one.
    write_durably(data, "agent-id", format!("{id}\n").as_bytes()).map_err(io)?;
    Ok(id)
}

/// Writes `DIR/NAME` so that a power cut leaves the old file or the new one, whole: a
/// temporary file is written and synced, renamed over `NAME`, and the directory synced
/// (a rename is a directory entry: without the last sync, the file can come back empty
/// or not at all).
pub fn write_durably(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    match std::fs::File::open(dir)?.sync_all() {
        // A filesystem that cannot fsync a directory (as PostgreSQL's fsync_fname).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOTSUP | libc::EBADF)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The `agent` section of an OpenWrt UCI file, as the agent's config. UCI values are
/// strings; numbers become integers, `'0'`/`'1'` the booleans, and `list` options arrays,
/// so the TOML keys and their checks (unknown keys are errors) apply unchanged.
pub fn from_uci(text: &str) -> Result<AgentConfig, toml::de::Error> {
    const STRINGS: &[&str] = &[
        "id",
        "broker",
        "token",
        "token_file",
        "data",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "country",
        "city",
    ];
    const FLOATS: &[&str] = &["latitude", "longitude", "max_probe_rate"];
    const BOOLS: &[&str] = &["live_first"];
    // Options the init script reads; not the agent's.
    const INIT_ONLY: &[&str] = &["enabled"];
    let mut table = toml::Table::new();
    let mut in_agent = false;
    for line in text.lines() {
        let words = uci_words(line);
        match words.first().map(String::as_str) {
            Some("config") => {
                in_agent = words.get(1).map(String::as_str) == Some("agent");
            }
            Some(kind @ ("option" | "list")) if in_agent && words.len() >= 3 => {
                let (key, value) = (words[1].clone(), words[2].clone());
                if INIT_ONLY.contains(&key.as_str()) {
                    continue;
                }
                let v = if BOOLS.contains(&key.as_str()) {
                    toml::Value::Boolean(matches!(value.as_str(), "1" | "true" | "yes" | "on"))
                } else if STRINGS.contains(&key.as_str()) {
                    toml::Value::String(value)
                } else if let (true, Ok(f)) = (FLOATS.contains(&key.as_str()), value.parse()) {
                    toml::Value::Float(f)
                } else if let Ok(n) = value.parse::<i64>() {
                    toml::Value::Integer(n)
                } else {
                    toml::Value::String(value)
                };
                if kind == "list" {
                    let entry = table
                        .entry(key)
                        .or_insert_with(|| toml::Value::Array(Vec::new()));
                    if let toml::Value::Array(a) = entry {
                        a.push(v);
                    }
                } else {
                    table.insert(key, v);
                }
            }
            _ => {}
        }
    }
    toml::Value::Table(table).try_into()
}

/// Splits one UCI line into words, honouring single and double quotes and comments.
fn uci_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut started = false;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                started = true;
            }
            None if c == '#' => break,
            None if c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            None => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(cur);
    }
    words
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerAddr {
    /// A name or an address literal (without brackets).
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        match Flags::parse(args.iter().map(|s| s.to_string()), |_| None).unwrap() {
            Command::Run(f) => *f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_and_environment() {
        let env = |k: &str| match k {
            "IMN_ID" => Some("from-env".to_string()),
            "IMN_HEARTBEAT_MS" => Some("700".to_string()),
            _ => None,
        };
        let run = |args: &[&str]| Flags::parse(args.iter().map(|s| s.to_string()), env);
        let Command::Run(f) = run(&["--id=flag", "--tags", "a, b,,c"]).unwrap() else {
            panic!()
        };
        assert_eq!(f.id.as_deref(), Some("flag"));
        assert_eq!(f.heartbeat_ms, Some(700));
        assert_eq!(f.tags, Some(vec!["a".into(), "b".into(), "c".into()]));
        let e = run(&["--window", "lots"]).unwrap_err().to_string();
        assert!(e.starts_with("IMN_WINDOW: must be a whole number"), "{e}");
        let e = run(&["--bogus", "1"]).unwrap_err().to_string();
        assert!(e.contains("--bogus"), "{e}");
        let e = run(&["--broker"]).unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
        assert!(matches!(run(&["--help"]).unwrap(), Command::Help(h) if h.contains("IMN_TLS_CA")));
        assert!(matches!(run(&["--print-config"]).unwrap(), Command::Run(f) if f.print_config));
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("imn-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "id = \"from-file\"\nheartbeat_ms = 500\ntags = [\"a\"]\n",
        )
        .unwrap();
        let cfg = AgentConfig::load(flags(&[
            "--config",
            file.to_str().unwrap(),
            "--id",
            "from-flag",
            "--tags",
            "x,y",
        ]))
        .unwrap();
        assert_eq!(cfg.id, "from-flag");
        assert_eq!(cfg.heartbeat_ms, 500);
        assert_eq!(cfg.tags, vec!["x", "y"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("imn-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(&file, "id = \"a\"\nbrokr = \"x\"\n").unwrap();
        let err = AgentConfig::load(flags(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("brokr"), "{err}");
        let err = AgentConfig::load(flags(&["--id", "a", "--broker", "tcp://x:1"])).unwrap_err();
        assert!(err.to_string().starts_with("broker:"), "{err}");
        let err = AgentConfig::load(flags(&["--id", "a/b"])).unwrap_err();
        assert!(err.to_string().starts_with("id:"), "{err}");
        let err = AgentConfig::load(flags(&["--id", "a", "--keepalive-s", "2"])).unwrap_err();
        assert!(err.to_string().starts_with("keepalive_s:"), "{err}");
        let cfg = AgentConfig::load(flags(&["--id", "a", "--keepalive-s", "10"])).unwrap();
        assert_eq!(cfg.keepalive_s, 10);
        let cfg =
            AgentConfig::load(flags(&["--id", "a", "--broker", "mqtt://[::1]:1883"])).unwrap();
        let b = cfg.broker_addr().unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 1883, false));
        let list = AgentConfig {
            broker: "mqtt://b1:1883, mqtt://b2:1884".into(),
            ..AgentConfig::default()
        };
        let got: Vec<(String, u16)> = list
            .broker_addrs()
            .unwrap()
            .into_iter()
            .map(|b| (b.host, b.port))
            .collect();
        assert_eq!(got, [("b1".to_string(), 1883), ("b2".to_string(), 1884)]);
        let mixed = AgentConfig {
            broker: "mqtt://b1,mqtts://b2".into(),
            ..AgentConfig::default()
        };
        let e = mixed.broker_addrs().unwrap_err().to_string();
        assert!(e.starts_with("broker:") && e.contains("same scheme"), "{e}");
        let bad = AgentConfig {
            broker: "mqtt://b1,".into(),
            ..AgentConfig::default()
        };
        assert!(bad.broker_addrs().is_err(), "an empty entry is an error");
        for (url, want) in [
            ("mqtt://broker.lan", ("broker.lan", 1883, false)),
            ("mqtts://broker.lan", ("broker.lan", 8883, true)),
            ("mqtts://10.0.0.1:9883", ("10.0.0.1", 9883, true)),
            ("mqtt://[fe80::1]", ("fe80::1", 1883, false)),
        ] {
            let cfg = AgentConfig {
                broker: url.into(),
                ..AgentConfig::default()
            };
            let b = cfg.broker_addr().unwrap();
            assert_eq!((b.host.as_str(), b.port, b.tls), want, "{url}");
        }
        for bad in [
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://[::1",
            "http://h",
        ] {
            let cfg = AgentConfig {
                broker: bad.into(),
                ..AgentConfig::default()
            };
            let e = cfg.broker_addr().unwrap_err().to_string();
            assert!(e.starts_with("broker:"), "{bad}: {e}");
        }
    }

    #[test]
    fn location_is_checked_and_reported() {
        let mut cfg = AgentConfig {
            id: "a".into(),
            ..AgentConfig::default()
        };
        assert_eq!(cfg.location(), None);
        cfg.country = Some("DEU".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("country") && e.contains("alpha-2"), "{e}");
        cfg.country = Some("NL".into());
        cfg.latitude = Some(91.0);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("latitude") && e.contains("90"), "{e}");
        cfg.latitude = Some(52.0);
        cfg.asn = Some(1136);
        cfg.validate().unwrap();
        let l = cfg.location().unwrap();
        assert_eq!((l.country.as_deref(), l.asn), (Some("NL"), Some(1136)));
        let e = Flags::parse(["--asn".to_string(), "x".into()], |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.to_lowercase().contains("asn"), "{e}");
        let e = Flags::parse(["--latitude".to_string(), "north".into()], |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.to_lowercase().contains("latitude") && e.contains("degrees"),
            "{e}"
        );
    }

    #[test]
    fn uci_is_read_like_toml() {
        let uci = "# /etc/config/imn\n\nconfig agent 'agent'\n\toption enabled '1'\n\
                   \toption id 'router-7'\n\toption broker \"mqtts://bridge.example:8883\"\n\
                   \toption heartbeat_ms '30000'\n\toption live_first '1'\n\
                   \toption country 'de'\n\toption city 'Berlin'\n\toption asn '3320'\n\
                   \toption latitude '52.52'\n\toption longitude '13'\n\
                   \tlist tags 'lte'\n\tlist tags 'home net'\n\
                   \toption data '/usr/lib/imn-agent'  # persistent\n\n\
                   config other 'x'\n\toption id 'ignored'\n";
        let cfg = from_uci(uci).unwrap();
        assert_eq!(cfg.id, "router-7");
        assert_eq!(cfg.broker, "mqtts://bridge.example:8883");
        assert_eq!(cfg.heartbeat_ms, 30_000);
        assert!(cfg.live_first);
        assert_eq!(cfg.tags, vec!["lte", "home net"]);
        assert_eq!(cfg.data, PathBuf::from("/usr/lib/imn-agent"));
        let l = cfg.location().unwrap();
        assert_eq!(
            (l.country.as_deref(), l.city.as_deref(), l.asn),
            (Some("de"), Some("Berlin"), Some(3320))
        );
        assert_eq!((l.latitude, l.longitude), (Some(52.52), Some(13.0)));
        let err = from_uci("config agent 'agent'\n\toption heartbeat 'x'\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat"), "{err}");
        let err = from_uci("config agent 'agent'\n\toption window 'many'\n").unwrap_err();
        assert!(
            err.to_string().contains("window") || err.to_string().contains("integer"),
            "{err}"
        );
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("imn-cfg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_0600(path: &std::path::Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `--print-config` never shows the token, however it was given.
    #[test]
    fn print_config_redacts_the_token() {
        let dir = tmp("redact");
        let file = dir.join("token");
        write_0600(&file, "imna_secret_from_file\n");
        for args in [
            vec!["--id", "a", "--token", "imna_secret_from_flag"],
            vec!["--id", "a", "--token-file", file.to_str().unwrap()],
        ] {
            let cfg = AgentConfig::load(flags(&args)).unwrap();
            assert!(cfg.token.as_deref().unwrap().starts_with("imna_secret"));
            let printed = toml::to_string(&cfg.redacted()).unwrap();
            assert!(!printed.contains("imna_secret"), "{printed}");
            assert!(printed.contains("token = \"<redacted>\""), "{printed}");
        }
        let none = AgentConfig::load(flags(&["--id", "a"])).unwrap();
        assert!(!toml::to_string(&none.redacted())
            .unwrap()
            .contains("token ="));
        // What --print-config shows cannot be taken for the token.
        let e = AgentConfig::load(flags(&["--id", "a", "--token", REDACTED]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("token:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The token comes from the highest level that gives one, as a token or a file:
    /// flags, then the environment, then the config file.
    #[test]
    fn token_sources_and_their_precedence() {
        let dir = tmp("token");
        let (ff, ef, cf) = (dir.join("flag"), dir.join("env"), dir.join("conf"));
        write_0600(&ff, "from-flag-file");
        write_0600(&ef, "  from-env-file\n\n");
        write_0600(&cf, "from-conf-file");
        let conf = dir.join("agent.toml");
        std::fs::write(
            &conf,
            format!("id = \"a\"\ntoken_file = {:?}\n", cf.to_str().unwrap()),
        )
        .unwrap();
        let c = conf.to_str().unwrap().to_string();
        let load = |args: &[&str], env: &[(&str, &str)]| {
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match Flags::parse(args.iter().map(|s| s.to_string()), lookup)? {
                Command::Run(f) => AgentConfig::load(*f),
                other => panic!("{other:?}"),
            }
        };
        let token = |r: Result<AgentConfig, ConfigError>| r.unwrap().token.unwrap();
        assert_eq!(token(load(&["--config", &c], &[])), "from-conf-file");
        let env_file = [("IMN_AGENT_TOKEN_FILE", ef.to_str().unwrap())];
        assert_eq!(token(load(&["--config", &c], &env_file)), "from-env-file");
        let env_token = [("IMN_AGENT_TOKEN", "from-env")];
        assert_eq!(token(load(&["--config", &c], &env_token)), "from-env");
        let flag_file = ["--config", &c, "--token-file", ff.to_str().unwrap()];
        assert_eq!(token(load(&flag_file, &env_token)), "from-flag-file");
        assert_eq!(
            token(load(&["--config", &c, "--token", "from-flag"], &env_file)),
            "from-flag"
        );
        // The `imn` command's API token is not the agent's.
        assert_eq!(
            token(load(&["--config", &c], &[("IMN_TOKEN", "api-token")])),
            "from-conf-file"
        );
        // Two at the same level are an error.
        let both = ["--token", "x", "--token-file", ff.to_str().unwrap()];
        let e = load(&both, &[]).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let both_env = [
            ("IMN_AGENT_TOKEN", "x"),
            ("IMN_AGENT_TOKEN_FILE", ef.to_str().unwrap()),
        ];
        let e = load(&["--id", "a"], &both_env).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        std::fs::write(&conf, "id = \"a\"\ntoken = \"t\"\ntoken_file = \"/x\"\n").unwrap();
        let e = load(&["--config", &c], &[]).unwrap_err().to_string();
        assert!(e.starts_with("token/token_file"), "{e}");
        // A missing file means no token; an empty one too; a directory is an error.
        let missing = dir.join("missing");
        let cfg = load(
            &["--id", "a", "--token-file", missing.to_str().unwrap()],
            &[],
        )
        .unwrap();
        assert_eq!((cfg.token, cfg.token_file), (None, Some(missing)));
        write_0600(&ff, "\n");
        assert_eq!(
            load(&["--id", "a", "--token-file", ff.to_str().unwrap()], &[])
                .unwrap()
                .token,
            None
        );
        let e = load(&["--id", "a", "--token-file", dir.to_str().unwrap()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("token_file:"), "{e}");
        write_0600(&ff, "one\ntwo\n");
        let e = load(&["--id", "a", "--token-file", ff.to_str().unwrap()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one line"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn budgets_are_set_and_checked() {
        let d = AgentConfig::default();
        assert_eq!(
            (d.max_runs, d.max_queued_runs, d.max_probe_rate),
            (4, 1000, 2000.0)
        );
        let env = |k: &str| (k == "IMN_MAX_QUEUED_RUNS").then(|| "7".to_string());
        let Command::Run(f) = Flags::parse(
            ["--id", "a", "--max-runs", "2", "--max-probe-rate", "12.5"]
                .iter()
                .map(|s| s.to_string()),
            env,
        )
        .unwrap() else {
            panic!()
        };
        let cfg = AgentConfig::load(*f).unwrap();
        assert_eq!(
            (cfg.max_runs, cfg.max_queued_runs, cfg.max_probe_rate),
            (2, 7, 12.5)
        );
        let l = cfg.limits();
        assert_eq!(
            (l.max_runs, l.max_queued_runs, l.max_probe_rate),
            (2, 7, 12.5)
        );
        for (args, field) in [
            (["--max-runs", "0"], "max_runs:"),
            (["--max-queued-runs", "100001"], "max_queued_runs:"),
            (["--max-probe-rate", "0"], "max_probe_rate:"),
            (["--max-probe-rate", "inf"], "max_probe_rate:"),
            (["--max-probe-rate", "NaN"], "max_probe_rate:"),
        ] {
            let mut a = vec!["--id", "a"];
            a.extend(args);
            let e = AgentConfig::load(flags(&a)).unwrap_err().to_string();
            assert!(e.starts_with(field), "{args:?}: {e}");
        }
        let e = Flags::parse(["--max-probe-rate".to_string(), "fast".into()], |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("IMN_MAX_PROBE_RATE"), "{e}");
        let cfg: AgentConfig =
            toml::from_str("max_runs = 3\nmax_queued_runs = 0\nmax_probe_rate = 100\n").unwrap();
        assert_eq!(
            (cfg.max_runs, cfg.max_queued_runs, cfg.max_probe_rate),
            (3, 0, 100.0)
        );
        let uci = "config agent 'agent'\n\toption max_runs '8'\n\toption max_probe_rate '500'\n\
                   \toption token_file '/etc/imn/agent.token'\n";
        let cfg = from_uci(uci).unwrap();
        assert_eq!((cfg.max_runs, cfg.max_probe_rate), (8, 500.0));
        assert_eq!(cfg.token_file, Some(PathBuf::from("/etc/imn/agent.token")));
        let help = help();
        for flag in [
            "--token-file",
            "IMN_AGENT_TOKEN",
            "--max-runs",
            "--max-queued-runs",
            "--max-probe-rate",
        ] {
            assert!(help.contains(flag), "{flag} not in --help");
        }
    }

    #[test]
    fn an_empty_id_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("imn-cfg3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.to_str().unwrap();
        let a = AgentConfig::load(flags(&["--data", data])).unwrap();
        assert!(a.id.starts_with("imn-") && a.id.len() == 16, "{}", a.id);
        let b = AgentConfig::load(flags(&["--data", data])).unwrap();
        assert_eq!(a.id, b.id);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
