//! Agent configuration: defaults, then a TOML file, then `IMN_…` environment variables,
//! then command-line flags, each overriding the one before.
//!
//! Each setting is defined once, in the `settings!` list below: its field, default,
//! flag, environment variable, help line and how its text is read. The TOML and UCI
//! keys are the field names; the flag is the key with `-` for `_`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How a setting's text (a flag, a variable, a UCI option) is read.
mod read {
    use super::ConfigError;
    use std::path::PathBuf;

    pub fn text(_: &'static str, s: String) -> Result<String, ConfigError> {
        Ok(s)
    }

    pub fn path(_: &'static str, s: String) -> Result<PathBuf, ConfigError> {
        Ok(s.into())
    }

    /// Comma-separated, trimmed, empty entries left out.
    pub fn list(_: &'static str, s: String) -> Result<Vec<String>, ConfigError> {
        Ok(s.split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect())
    }

    pub fn whole<T: std::str::FromStr>(field: &'static str, s: String) -> Result<T, ConfigError> {
        s.trim().parse::<T>().map_err(|_| ConfigError::Invalid {
            field,
            rule: format!("must be a whole number (got {s:?})"),
        })
    }

    pub fn number(field: &'static str, s: String) -> Result<f64, ConfigError> {
        s.trim().parse::<f64>().map_err(|_| ConfigError::Invalid {
            field,
            rule: format!("must be a number (got {s:?})"),
        })
    }

    pub fn degrees(field: &'static str, s: String) -> Result<f64, ConfigError> {
        s.trim().parse().map_err(|_| ConfigError::Invalid {
            field,
            rule: format!("must be a number of degrees (got {s:?})"),
        })
    }

    pub fn boolean(field: &'static str, s: String) -> Result<bool, ConfigError> {
        match s.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(ConfigError::Invalid {
                field,
                rule: format!("must be true or false (got {s:?})"),
            }),
        }
    }

    pub fn addr(field: &'static str, s: String) -> Result<std::net::SocketAddr, ConfigError> {
        s.trim().parse().map_err(|_| ConfigError::Invalid {
            field,
            rule: format!("must be ADDR:PORT, like 127.0.0.1:9101 (got {s:?})"),
        })
    }
}

/// How a UCI option's string becomes a TOML value for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UciKind {
    /// Kept a string.
    Text,
    /// A float when it parses as one.
    Float,
    /// `1`, `true`, `yes`, `on` are true, anything else false.
    Bool,
    /// An integer when it parses as one, else a string.
    Auto,
}

/// The UCI kind of a setting read by `read::$how`.
macro_rules! uci_kind {
    (text) => {
        UciKind::Text
    };
    (path) => {
        UciKind::Text
    };
    (number) => {
        UciKind::Float
    };
    (degrees) => {
        UciKind::Float
    };
    (boolean) => {
        UciKind::Bool
    };
    ($other:ident) => {
        UciKind::Auto
    };
}

/// A setting's field in [`AgentConfig`]: `val` the type itself, `opt` an `Option`.
macro_rules! config_ty {
    (val, $ty:ty) => { $ty };
    (opt, $ty:ty) => { Option<$ty> };
}

/// A setting's default: `opt` ones have none.
macro_rules! config_default {
    (val, $default:expr) => {
        $default
    };
    (opt) => {
        None
    };
}

/// A value from the flags or environment, put into the config: lists without empty
/// entries.
macro_rules! merge {
    (val, list, $cfg:expr, $v:expr) => {
        $cfg = $v.into_iter().filter(|t: &String| !t.is_empty()).collect()
    };
    (val, $how:ident, $cfg:expr, $v:expr) => {
        $cfg = $v
    };
    (opt, $how:ident, $cfg:expr, $v:expr) => {
        $cfg = Some($v)
    };
}

/// The flag of a setting, if it has one.
macro_rules! flag_of {
    () => {
        None
    };
    ($flag:literal, $env:literal, $help:literal) => {
        Some(Opt {
            flag: $flag,
            env: $env,
            help: $help,
        })
    };
}

/// Defines every setting once: the [`AgentConfig`] field (its doc, type, default), its
/// flag, environment variable and help line (if it has a flag), and how its text is
/// read (`read::$how`, which also gives its UCI kind). Generates [`AgentConfig`], its
/// `Default`, [`Flags`], the flag table, the merge of flags into a config, and the UCI
/// kinds.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $wrap:ident $field:ident: $ty:ty $(= $default:expr)?, $how:ident
            $(, $flag:literal, $env:literal, $help:literal)?;
    )*) => {
        /// Everything the agent can be told. Unknown keys in the file are errors.
        #[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct AgentConfig {
            $(
                $(#[doc = $doc])*
                pub $field: config_ty!($wrap, $ty),
            )*
        }

        impl Default for AgentConfig {
            fn default() -> Self {
                AgentConfig {
                    $($field: config_default!($wrap $(, $default)?),)*
                }
            }
        }

        /// Command-line flags and their `IMN_…` environment variables, before the
        /// config file: a setting's value, or `None` when it was not given. At most one
        /// of `token` and `token_file`: a flag beats its environment variable, and both
        /// given at the same level is an error.
        #[derive(Debug, Default)]
        pub struct Flags {
            pub config: Option<PathBuf>,
            pub uci: Option<PathBuf>,
            pub print_config: bool,
            $(pub $field: Option<$ty>,)*
        }

        /// Every setting's flag, in the order of [`AgentConfig`]'s fields.
        const SETTINGS: &[Option<Opt>] = &[$(flag_of!($($flag, $env, $help)?),)*];

        /// Every setting's key (TOML and UCI), in the same order.
        #[cfg(test)]
        const KEYS: &[&str] = &[$(stringify!($field),)*];

        impl Flags {
            /// Reads each setting's text: `values` gives it for a flag, with the
            /// field its errors name (`None`: not given).
            fn read_settings(
                mut values: impl FnMut(&str) -> Option<(&'static str, String)>,
            ) -> Result<Flags, ConfigError> {
                Ok(Flags {
                    $($field: match SETTINGS[Setting::$field as usize]
                        .and_then(|o| values(o.flag))
                    {
                        Some((field, s)) => Some(read::$how(field, s)?),
                        None => None,
                    },)*
                    ..Flags::default()
                })
            }

            /// Puts every setting given here into `cfg`.
            fn merge_into(self, cfg: &mut AgentConfig) {
                $(if let Some(v) = self.$field {
                    merge!($wrap, $how, cfg.$field, v);
                })*
            }
        }

        /// Settings by position in [`SETTINGS`].
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        enum Setting {
            $($field,)*
        }

        /// The UCI kind of a key; `None` for a key that is no setting.
        fn uci_kind(key: &str) -> Option<UciKind> {
            match key {
                $(stringify!($field) => Some(uci_kind!($how)),)*
                _ => None,
            }
        }
    };
}

/// A flag, its environment variable and its help line.
#[derive(Debug, Clone, Copy)]
struct Opt {
    flag: &'static str,
    env: &'static str,
    help: &'static str,
}

settings! {
    /// The agent's id: 1 to 64 of `A-Z a-z 0-9 _ -`. Also its MQTT client id. Empty: the
    /// agent makes one up once (`imn-` and 12 random hex digits) and keeps it in
    /// `DATA/agent-id`, so a freshly flashed device needs no per-device config.
    val id: String = String::new(), text,
        "id", "IMN_ID", "agent id (empty: made up once, kept in DATA/agent-id)";
    /// The bridge's broker: `mqtt://HOST[:PORT]` (port 1883), or `mqtts://HOST[:PORT]`
    /// (TLS, port 8883). HOST may be a name: the agent resolves it itself, again on every
    /// reconnect.
    val broker: String = "mqtt://127.0.0.1:1883".into(), text,
        "broker", "IMN_BROKER", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; several separated by commas";
    /// PEM file of the CA that signed the broker's certificate (`mqtts://`). Without it,
    /// the system's bundle at `/etc/ssl/certs/ca-certificates.crt` is used.
    opt tls_ca: PathBuf, path,
        "tls-ca", "IMN_TLS_CA", "PEM CA certificate for mqtts://";
    /// PEM client certificate chain and key, for brokers that require mutual TLS.
    opt tls_cert: PathBuf, path,
        "tls-cert", "IMN_TLS_CERT", "PEM client certificate chain (mutual TLS)";
    opt tls_key: PathBuf, path,
        "tls-key", "IMN_TLS_KEY", "PEM client key (mutual TLS)";
    /// Name servers (`ADDR` or `ADDR:PORT`) used instead of `/etc/resolv.conf`'s.
    val nameservers: Vec<String> = Vec::new(), list,
        "nameservers", "IMN_NAMESERVERS", "comma-separated ADDR or ADDR:PORT (default: /etc/resolv.conf's)";
    /// The agent's secret, sent as the MQTT password (the id is the user name). Given
    /// as `--token` it is visible to every user in `ps`: prefer `token_file`.
    opt token: String, text,
        "token", "IMN_AGENT_TOKEN", "the agent's secret (MQTT password); on the command line every user sees it in `ps`: use --token-file";
    /// A file holding the token (mode 0600), read at start; it takes the place of
    /// `token`. A file that does not exist means no token (a package installs the path
    /// before the agent is enrolled); `--print-config` never prints the token itself.
    opt token_file: PathBuf, path,
        "token-file", "IMN_AGENT_TOKEN_FILE", "file holding the agent's secret (mode 0600); replaces --token";
    /// Where the outbox and command log live.
    val data: PathBuf = PathBuf::from("imn-agent-data"), path,
        "data", "IMN_DATA", "data directory (outbox and command log)";
    /// Free-form labels for selecting agents.
    val tags: Vec<String> = Vec::new(), list,
        "tags", "IMN_TAGS", "comma-separated tags";
    /// Heartbeat period in milliseconds.
    val heartbeat_ms: u64 = 10_000, whole,
        "heartbeat-ms", "IMN_HEARTBEAT_MS", "heartbeat period";
    /// MQTT keep-alive in seconds: a link that died silently is noticed within about
    /// twice this (shorter on links that drop without a reset, such as cellular).
    val keepalive_s: u64 = 30, whole,
        "keepalive-s", "IMN_KEEPALIVE_S", "MQTT keep-alive: a silently dead link is noticed within about twice this (5 to 3600, default 30)";
    /// Largest outbox batch sent in one MQTT message, in bytes.
    val batch_max_bytes: usize = 256 * 1024, whole,
        "batch-max-bytes", "IMN_BATCH_MAX_BYTES", "largest batch, in bytes of records";
    /// Batches sent but not yet acked before the agent waits.
    val window: usize = 8, whole,
        "window", "IMN_WINDOW", "batches sent and not yet acked, at most";
    /// After this long with no ack, everything unacked is sent again.
    val resend_timeout_ms: u64 = 10_000, whole,
        "resend-timeout-ms", "IMN_RESEND_TIMEOUT_MS", "resend unacked batches after this long";
    /// How long one MQTT connection attempt may take (a busy broker is slow to accept).
    val connect_timeout_s: u64 = 30, whole;
    /// Bytes of unacked records the outbox keeps; past it the oldest are evicted.
    val outbox_max_bytes: u64 = 64 * 1024 * 1024, whole,
        "outbox-max-bytes", "IMN_OUTBOX_MAX_BYTES", "bytes of unacked records kept on disk before the oldest are evicted";
    /// Bytes of records kept in memory while the disk is full or failing.
    val outbox_memory_bytes: u64 = 4 * 1024 * 1024, whole,
        "outbox-memory-bytes", "IMN_OUTBOX_MEMORY_BYTES", "bytes kept in memory while the disk is full or failing";
    /// Free space the outbox leaves on the data filesystem.
    val disk_reserve_bytes: u64 = 2 * 1024 * 1024, whole,
        "disk-reserve-bytes", "IMN_DISK_RESERVE_BYTES", "free space left on the data filesystem";
    /// Send new results ahead of the backlog when catching up.
    val live_first: bool = false, boolean,
        "live-first", "IMN_LIVE_FIRST", "true: send new results ahead of the backlog";
    /// Serve Prometheus `/metrics` here (e.g. `127.0.0.1:9101`); needs an agent built
    /// with the `metrics` feature.
    opt metrics_listen: std::net::SocketAddr, addr,
        "metrics-listen", "IMN_METRICS_LISTEN", "ADDR:PORT of a Prometheus /metrics listener (builds with the `metrics` feature)";
    /// Where the agent is, for selecting agents (`GET /agents?country=…`): ISO 3166-1
    /// alpha-2 country code, city, WGS 84 coordinates, and the network's AS number.
    opt country: String, text,
        "country", "IMN_COUNTRY", "ISO 3166-1 alpha-2 country code of the agent's location (DE, NL, …)";
    opt city: String, text,
        "city", "IMN_CITY", "city of the agent's location";
    opt latitude: f64, degrees,
        "latitude", "IMN_LATITUDE", "latitude of the agent's location, -90 to 90";
    opt longitude: f64, degrees,
        "longitude", "IMN_LONGITUDE", "longitude of the agent's location, -180 to 180";
    opt asn: u32, whole,
        "asn", "IMN_ASN", "AS number of the agent's network";
    /// Runs at once, from commands and schedules together; more wait in a queue.
    val max_runs: u32 = 4, whole,
        "max-runs", "IMN_MAX_RUNS", "runs at once, commands and schedules together; more wait (1 to 1024, default 4)";
    /// Runs waiting at most; past it a new run fails at once.
    val max_queued_runs: u32 = 1000, whole,
        "max-queued-runs", "IMN_MAX_QUEUED_RUNS", "runs waiting at most; past it a new run fails at once (0 to 100000, default 1000)";
    /// Probes per second across all running runs (each run's declared rate); a run
    /// that does not fit waits.
    val max_probe_rate: f64 = 2000.0, number,
        "max-probe-rate", "IMN_MAX_PROBE_RATE", "probes per second across all running runs (default 2000)";
    /// Ed25519 public keys (hex) whose signed releases this agent installs. Any key
    /// makes the agent run supervised (see `supervise`).
    val update_keys: Vec<String> = Vec::new(), list,
        "update-keys", "IMN_UPDATE_KEYS", "comma-separated hex Ed25519 keys whose signed releases the agent installs (over-the-air updates)";
    /// Ed25519 public keys (hex) whose signed WebAssembly modules this agent loads;
    /// with none, the `update_keys` (a module key is a release key). With neither,
    /// the agent loads no WebAssembly module.
    val module_keys: Vec<String> = Vec::new(), list,
        "module-keys", "IMN_MODULE_KEYS", "comma-separated hex Ed25519 keys whose signed WebAssembly modules the agent loads (default: the update keys)";
    /// Run under the agent's own supervisor: a small parent process that starts the
    /// newest verified binary, tries updates and remote settings on trial, and rolls
    /// them back. On by default when `update_keys` is set.
    val supervise: bool = false, boolean,
        "supervise", "IMN_SUPERVISE", "true: run under the agent's own supervisor (updates and remote settings on trial)";
    /// Bytes a second an update downloads at most, so measurements on the same link
    /// are not disturbed.
    val update_rate: u64 = 32 * 1024, whole,
        "update-rate", "IMN_UPDATE_RATE", "bytes/s an update downloads at most (default 32768)";
    /// How long a new release or new settings have to connect and say hello before
    /// they are rolled back.
    val trial_s: u64 = 120, whole,
        "trial-s", "IMN_TRIAL_S", "seconds a new release or new settings have to connect before they are rolled back (default 120)";
}

/// The settings an operator may change remotely, across a fleet (`Settings`
/// commands): the contract's list, which the backend checks too.
pub use imn_proto::wire::REMOTE_SETTINGS as REMOTE_KEYS;

/// The environment variable through which the supervisor gives its child the file
/// of remote settings to apply over the local ones.
pub const REMOTE_SETTINGS_ENV: &str = "IMN_REMOTE_SETTINGS";

/// Remote settings as the agent stores them: a version and `key = value` pairs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteSettings {
    pub version: u64,
    pub settings: Vec<(String, String)>,
}

/// At most this many remote settings, each key and value at most 1 KiB.
pub const MAX_REMOTE_SETTINGS: usize = 64;

impl RemoteSettings {
    /// Reads the settings as flags, checking each key is remote-settable and each
    /// value reads as its setting's type.
    pub fn flags(&self) -> Result<Flags, ConfigError> {
        if self.settings.len() > MAX_REMOTE_SETTINGS {
            return Err(ConfigError::Invalid {
                field: "settings",
                rule: format!("at most {MAX_REMOTE_SETTINGS} settings at once"),
            });
        }
        for (i, (k, v)) in self.settings.iter().enumerate() {
            if k.len() > 1024 || v.len() > 1024 {
                return Err(ConfigError::Invalid {
                    field: "settings",
                    rule: "a key or value is longer than 1 KiB".into(),
                });
            }
            if !REMOTE_KEYS.contains(&k.as_str()) {
                return Err(ConfigError::Invalid {
                    field: "settings",
                    rule: format!(
                        "{:?} cannot be set remotely (these can: {})",
                        k.chars().take(64).collect::<String>(),
                        REMOTE_KEYS.join(", ")
                    ),
                });
            }
            if self.settings[..i].iter().any(|(o, _)| o == k) {
                return Err(ConfigError::Invalid {
                    field: "settings",
                    rule: format!("{k:?} is given twice"),
                });
            }
        }
        Flags::read_settings(|flag| {
            let key = flag.replace('-', "_");
            let o = SETTINGS.iter().flatten().find(|o| o.flag == flag)?;
            self.settings
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (o.flag, v.clone()))
        })
    }

    /// Checks the settings as the agent would run them: each readable, and the whole
    /// config valid with them applied over `base`.
    pub fn check_over(&self, base: &AgentConfig) -> Result<AgentConfig, ConfigError> {
        let mut cfg = base.clone();
        self.flags()?.merge_into(&mut cfg);
        cfg.validate()?;
        // Bounds for values that would pass a trial and hurt later (memory, flash, the
        // link), and no step down from TLS: remote settings cannot make the agent
        // send its token in clear text.
        let within = |field: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    rule: format!("set remotely, must be {lo} to {hi} (got {v})"),
                })
            }
        };
        within("heartbeat_ms", cfg.heartbeat_ms, 500, 3_600_000)?;
        within("outbox_max_bytes", cfg.outbox_max_bytes, 1 << 20, 4 << 30)?;
        within(
            "outbox_memory_bytes",
            cfg.outbox_memory_bytes,
            64 << 10,
            64 << 20,
        )?;
        within(
            "disk_reserve_bytes",
            cfg.disk_reserve_bytes,
            1 << 20,
            1 << 30,
        )?;
        within(
            "batch_max_bytes",
            cfg.batch_max_bytes as u64,
            4 << 10,
            1 << 20,
        )?;
        within("window", cfg.window as u64, 1, 64)?;
        within("resend_timeout_ms", cfg.resend_timeout_ms, 1_000, 600_000)?;
        within("update_rate", cfg.update_rate, 1024, 64 << 20)?;
        if !(1.0..=100_000.0).contains(&cfg.max_probe_rate) {
            return Err(ConfigError::Invalid {
                field: "max_probe_rate",
                rule: "set remotely, must be 1 to 100000".into(),
            });
        }
        if base.broker_addr()?.tls && !cfg.broker_addr()?.tls {
            return Err(ConfigError::Invalid {
                field: "broker",
                rule: "set remotely, must stay mqtts:// when the agent's own is (the token would go in clear text)".into(),
            });
        }
        Ok(cfg)
    }
}

/// What `--print-config` shows in place of the token.
pub const REDACTED: &str = "<redacted>";

/// The largest token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// The flags that are no setting: which file the settings come from.
const FILE_OPTIONS: [Opt; 2] = [
    Opt {
        flag: "config",
        env: "IMN_CONFIG",
        help: "TOML config file",
    },
    Opt {
        flag: "uci",
        env: "IMN_UCI",
        help: "OpenWrt UCI config file (its `agent` section; same keys as the TOML)",
    },
];

/// Every flag, its environment variable and its help line: the file's, then the
/// settings'. A flag given on the command line overrides its variable. (A table, not
/// clap: clap is 200 KiB of firmware.)
fn options() -> impl Iterator<Item = Opt> {
    FILE_OPTIONS
        .into_iter()
        .chain(SETTINGS.iter().filter_map(|o| *o))
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
        let opts: Vec<Opt> = options().collect();
        let mut values: Vec<Option<String>> = opts.iter().map(|o| env(o.env)).collect();
        // Which values came from the command line (the others from the environment).
        let mut from_args = vec![false; opts.len()];
        let mut print_config = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help(help())),
                "-V" | "--version" => {
                    return Ok(Command::Version(format!(
                        "imn-agent {}",
                        crate::update::VERSION
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
            let i = opts.iter().position(|o| o.flag == name).ok_or_else(bad)?;
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| ConfigError::Invalid {
                    field: opts[i].env,
                    rule: format!("--{name} needs a value"),
                })?,
            };
            values[i] = Some(value);
            from_args[i] = true;
        }
        let position = |name: &str| opts.iter().position(|o| o.flag == name);
        let get = |name: &str| -> Option<(&'static str, String)> {
            let i = position(name)?;
            values[i].clone().map(|v| (opts[i].env, v))
        };
        // The token and its file are one setting: the command line beats the
        // environment, and both at the same level is an error.
        let (ti, fi) = (
            position("token").expect("token"),
            position("token-file").expect("token-file"),
        );
        let keep = match (from_args[ti], from_args[fi]) {
            (true, true) => {
                return Err(ConfigError::Invalid {
                    field: "token/token-file",
                    rule: "give --token or --token-file, not both".into(),
                })
            }
            (true, false) => ti,
            (false, true) => fi,
            (false, false) if values[ti].is_some() && values[fi].is_some() => {
                return Err(ConfigError::Invalid {
                    field: "IMN_AGENT_TOKEN/IMN_AGENT_TOKEN_FILE",
                    rule: "set one of them, not both".into(),
                })
            }
            (false, false) => usize::MAX,
        };
        let mut flags = Flags::read_settings(|name| match position(name) {
            Some(i) if (i == ti || i == fi) && keep != usize::MAX && i != keep => None,
            _ => get(name),
        })?;
        flags.config = get("config").map(|v| v.1.into());
        flags.uci = get("uci").map(|v| v.1.into());
        flags.print_config = print_config;
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
        crate::update::VERSION
    );
    for Opt { flag, env, help } in options() {
        h.push_str(&format!("  --{flag} VALUE\n      {help} [env: {env}]\n"));
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
        source: crate::flat_toml::Error,
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
                crate::flat_toml::from_str(&read(path)?).map_err(|source| ConfigError::Parse {
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
        // A token or token file given on the command line or in the environment
        // replaces both of the file's.
        let (token, token_file) = (flags.token.is_some(), flags.token_file.is_some());
        flags.merge_into(&mut cfg);
        if token {
            cfg.token_file = None;
        } else if token_file {
            cfg.token = None;
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
        // Remote settings (from the supervisor, which tried or is trying them) go over
        // every local source: they are the operator's desired state for the fleet.
        if let Some(path) = std::env::var_os(REMOTE_SETTINGS_ENV) {
            let path = PathBuf::from(path);
            let text = read(&path)?;
            let remote: RemoteSettings =
                serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
                    field: "remote settings",
                    rule: format!("{}: {e}", path.display()),
                })?;
            remote.flags()?.merge_into(&mut cfg);
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

    /// Whether the agent runs under its own supervisor.
    pub fn supervised(&self) -> bool {
        self.supervise || !self.update_keys.is_empty()
    }

    /// The keys whose WebAssembly modules this agent loads.
    pub fn trusted_module_keys(&self) -> &[String] {
        if self.module_keys.is_empty() {
            &self.update_keys
        } else {
            &self.module_keys
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, keys) in [
            ("update_keys", &self.update_keys),
            ("module_keys", &self.module_keys),
        ] {
            for k in keys {
                if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ConfigError::Invalid {
                        field,
                        rule: format!(
                            "each must be 64 hex digits, an Ed25519 public key (got {:?})",
                            k.chars().take(80).collect::<String>()
                        ),
                    });
                }
            }
        }
        if !(10..=86_400).contains(&self.trial_s) {
            return Err(ConfigError::Invalid {
                field: "trial_s",
                rule: "must be 10 to 86400 seconds".into(),
            });
        }
        if self.update_rate < 1024 {
            return Err(ConfigError::Invalid {
                field: "update_rate",
                rule: "must be at least 1024 bytes/s".into(),
            });
        }
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
pub fn from_uci(text: &str) -> Result<AgentConfig, crate::flat_toml::Error> {
    use serde_json::Value;
    // Options the init script reads; not the agent's.
    const INIT_ONLY: &[&str] = &["enabled"];
    let mut entries: Vec<crate::flat_toml::Entry> = Vec::new();
    let mut in_agent = false;
    for (n, line) in text.lines().enumerate() {
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
                let auto = |value: String| match value.parse::<i64>() {
                    Ok(n) => Value::from(n),
                    Err(_) => Value::String(value),
                };
                // Unknown keys are read as any other (and refused by the config's checks).
                let v = match uci_kind(&key).unwrap_or(UciKind::Auto) {
                    UciKind::Bool => {
                        Value::Bool(matches!(value.as_str(), "1" | "true" | "yes" | "on"))
                    }
                    UciKind::Text => Value::String(value),
                    UciKind::Float => match value.parse::<f64>() {
                        Ok(f) if f.is_finite() => Value::from(f),
                        _ => auto(value),
                    },
                    UciKind::Auto => auto(value),
                };
                let existing = entries.iter_mut().find(|e| e.key == key);
                match (kind, existing) {
                    ("list", Some(e)) => {
                        if let Value::Array(a) = &mut e.value {
                            a.push(v);
                        }
                    }
                    ("list", None) => entries.push(crate::flat_toml::Entry {
                        key,
                        value: Value::Array(vec![v]),
                        line: n + 1,
                    }),
                    // A later `option` replaces an earlier one, as UCI does.
                    (_, Some(e)) => {
                        e.value = v;
                        e.line = n + 1;
                    }
                    (_, None) => entries.push(crate::flat_toml::Entry {
                        key,
                        value: v,
                        line: n + 1,
                    }),
                }
            }
            _ => {}
        }
    }
    crate::flat_toml::from_entries(entries)
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
            let printed = crate::flat_toml::to_string(&cfg.redacted()).unwrap();
            assert!(!printed.contains("imna_secret"), "{printed}");
            assert!(printed.contains("token = \"<redacted>\""), "{printed}");
        }
        let none = AgentConfig::load(flags(&["--id", "a"])).unwrap();
        assert!(!crate::flat_toml::to_string(&none.redacted())
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
            crate::flat_toml::from_str("max_runs = 3\nmax_queued_runs = 0\nmax_probe_rate = 100\n")
                .unwrap();
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

    /// Every setting but `connect_timeout_s` has a flag: its key with `-` for `_`, an
    /// `IMN_` variable named after the key (the token's `IMN_AGENT_`), a help line, and
    /// a UCI kind.
    #[test]
    fn every_setting_is_one_key_flag_and_variable() {
        assert_eq!(KEYS.len(), SETTINGS.len());
        let help = help();
        let mut flagged = 0;
        for (key, opt) in KEYS.iter().zip(SETTINGS) {
            assert!(uci_kind(key).is_some(), "{key}");
            let Some(o) = opt else {
                assert_eq!(*key, "connect_timeout_s", "only it has no flag");
                continue;
            };
            flagged += 1;
            assert_eq!(o.flag.replace('-', "_"), *key);
            let want = match *key {
                "token" | "token_file" => format!("IMN_AGENT_{}", key.to_uppercase()),
                _ => format!("IMN_{}", key.to_uppercase()),
            };
            assert_eq!(o.env, want);
            let line = format!("  --{} VALUE\n      {} [env: {}]\n", o.flag, o.help, o.env);
            assert!(help.contains(&line), "{line}");
        }
        assert_eq!(flagged, 33);
        assert_eq!(
            uci_kind("enabled"),
            None,
            "the init script's, not a setting"
        );
        let toml = crate::flat_toml::to_string(&AgentConfig::default()).unwrap();
        for line in toml.lines() {
            let key = line.split(" = ").next().unwrap();
            assert!(KEYS.contains(&key), "{key}");
        }
    }

    /// Flags beat the environment, which beats the file, which beats the default, for
    /// every kind of setting.
    #[test]
    fn flags_then_environment_then_file_then_default() {
        let dir = tmp("precedence");
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "id = \"f\"\nheartbeat_ms = 500\nwindow = 3\nlive_first = true\ncity = \"File\"\n\
             tags = [\"file\"]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap().to_string();
        let env = |k: &str| match k {
            "IMN_CONFIG" => Some(f.clone()),
            "IMN_HEARTBEAT_MS" => Some("600".to_string()),
            "IMN_WINDOW" => Some("4".to_string()),
            "IMN_LIVE_FIRST" => Some("no".to_string()),
            "IMN_TAGS" => Some("env".to_string()),
            _ => None,
        };
        let Command::Run(flags) = Flags::parse(
            ["--window", "5", "--tags=flag,"]
                .iter()
                .map(|s| s.to_string()),
            env,
        )
        .unwrap() else {
            panic!()
        };
        let cfg = AgentConfig::load(*flags).unwrap();
        assert_eq!(cfg.id, "f", "the file's");
        assert_eq!(cfg.heartbeat_ms, 600, "the environment's");
        assert_eq!(cfg.window, 5, "the flag's");
        assert!(!cfg.live_first, "the environment's");
        assert_eq!(cfg.city.as_deref(), Some("File"));
        assert_eq!(cfg.tags, vec!["flag"]);
        assert_eq!(cfg.resend_timeout_ms, 10_000, "the default");
        let _ = std::fs::remove_dir_all(&dir);
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

    #[test]
    fn remote_settings_take_only_remote_keys_each_read_as_its_type() {
        let base = AgentConfig {
            id: "a".into(),
            ..AgentConfig::default()
        };
        // Every remote key is a setting with a flag, so it can be read.
        for k in REMOTE_KEYS {
            assert!(KEYS.contains(k), "{k} is no setting");
            assert!(
                SETTINGS
                    .iter()
                    .flatten()
                    .any(|o| o.flag == k.replace('_', "-")),
                "{k} has no flag"
            );
        }
        let r = |kv: &[(&str, &str)]| RemoteSettings {
            version: 1,
            settings: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let cfg = r(&[
            ("heartbeat_ms", "700"),
            ("tags", "a, b"),
            ("broker", "mqtt://10.0.0.1:1884"),
        ])
        .check_over(&base)
        .unwrap();
        assert_eq!(
            (cfg.heartbeat_ms, cfg.tags.clone()),
            (700, vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(cfg.broker, "mqtt://10.0.0.1:1884");
        let e = r(&[("data", "/tmp/x")])
            .check_over(&base)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("settings: \"data\" cannot be set remotely"),
            "{e}"
        );
        let e = r(&[("update_keys", "00")])
            .check_over(&base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be set remotely"), "{e}");
        let e = r(&[("heartbeat_ms", "soon")])
            .check_over(&base)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("heartbeat-ms: must be a whole number"), "{e}");
        let e = r(&[("heartbeat_ms", "5")])
            .check_over(&base)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("heartbeat_ms: must be at least 100"), "{e}");
        let e = r(&[("tags", "a"), ("tags", "b")])
            .check_over(&base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let many: Vec<(String, String)> = (0..65)
            .map(|i| ("tags".to_string(), i.to_string()))
            .collect();
        let e = RemoteSettings {
            version: 1,
            settings: many,
        }
        .flags()
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most 64"), "{e}");
    }
}
