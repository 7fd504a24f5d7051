//! Agent configuration: defaults, then a TOML file, then `IMN_…` environment variables,
//! then command-line flags, each overriding the one before.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Everything the agent can be told. Unknown keys in the file are errors.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent's id: 1 to 64 of `A-Z a-z 0-9 _ -`. Also its MQTT client id.
    pub id: String,
    /// The bridge's broker, `mqtt://HOST:PORT`.
    pub broker: String,
    /// The agent's secret, sent as the MQTT password (the id is the user name).
    pub token: Option<String>,
    /// Where the outbox and command log live.
    pub data: PathBuf,
    /// Free-form labels for selecting agents.
    pub tags: Vec<String>,
    /// Heartbeat period in milliseconds.
    pub heartbeat_ms: u64,
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            id: String::new(),
            broker: "mqtt://127.0.0.1:1883".into(),
            token: None,
            data: PathBuf::from("imn-agent-data"),
            tags: Vec::new(),
            heartbeat_ms: 10_000,
            batch_max_bytes: 256 * 1024,
            window: 8,
            resend_timeout_ms: 10_000,
            connect_timeout_s: 30,
            outbox_max_bytes: 64 * 1024 * 1024,
            outbox_memory_bytes: 4 * 1024 * 1024,
            disk_reserve_bytes: 2 * 1024 * 1024,
            live_first: false,
        }
    }
}

/// Command-line flags; each also reads its `IMN_…` environment variable.
#[derive(Debug, Parser)]
#[command(name = "imn-agent", version, about = "IMN measurement agent")]
pub struct Flags {
    /// TOML config file.
    #[arg(long, env = "IMN_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "IMN_ID")]
    pub id: Option<String>,
    /// mqtt://HOST:PORT
    #[arg(long, env = "IMN_BROKER")]
    pub broker: Option<String>,
    #[arg(long, env = "IMN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory (outbox and command log).
    #[arg(long, env = "IMN_DATA")]
    pub data: Option<PathBuf>,
    /// Comma-separated tags.
    #[arg(long, env = "IMN_TAGS", value_delimiter = ',')]
    pub tags: Option<Vec<String>>,
    #[arg(long, env = "IMN_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    #[arg(long, env = "IMN_RESEND_TIMEOUT_MS")]
    pub resend_timeout_ms: Option<u64>,
    /// Bytes of unacked records kept on disk before the oldest are evicted.
    #[arg(long, env = "IMN_OUTBOX_MAX_BYTES")]
    pub outbox_max_bytes: Option<u64>,
    /// Bytes of records kept in memory while the disk is full or failing.
    #[arg(long, env = "IMN_OUTBOX_MEMORY_BYTES")]
    pub outbox_memory_bytes: Option<u64>,
    /// Free space (bytes) the outbox leaves on the data filesystem.
    #[arg(long, env = "IMN_DISK_RESERVE_BYTES")]
    pub disk_reserve_bytes: Option<u64>,
    /// Send new results ahead of the backlog.
    #[arg(long, env = "IMN_LIVE_FIRST")]
    pub live_first: Option<bool>,
    /// Batches sent and not yet acked, at most.
    #[arg(long, env = "IMN_WINDOW")]
    pub window: Option<usize>,
    /// Largest batch, in bytes of records.
    #[arg(long, env = "IMN_BATCH_MAX_BYTES")]
    pub batch_max_bytes: Option<usize>,
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
        let mut cfg = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => AgentConfig::default(),
        };
        if let Some(v) = flags.id {
            cfg.id = v;
        }
        if let Some(v) = flags.broker {
            cfg.broker = v;
        }
        if let Some(v) = flags.token {
            cfg.token = Some(v);
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
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !imn_modules::wire::valid_agent_id(&self.id) {
            return Err(ConfigError::Invalid {
                field: "id",
                rule: format!(
                    "must be 1 to 64 characters of A-Z a-z 0-9 _ - (got {:?})",
                    self.id
                ),
            });
        }
        self.broker_addr()?;
        if self.heartbeat_ms < 100 {
            return Err(ConfigError::Invalid {
                field: "heartbeat_ms",
                rule: "must be at least 100".into(),
            });
        }
        if self.batch_max_bytes < 1024 || self.window == 0 {
            return Err(ConfigError::Invalid {
                field: "batch_max_bytes/window",
                rule: "batch_max_bytes must be at least 1024 and window at least 1".into(),
            });
        }
        Ok(())
    }

    /// Host and port from `mqtt://HOST:PORT`.
    pub fn broker_addr(&self) -> Result<(String, u16), ConfigError> {
        let invalid = |rule: &str| ConfigError::Invalid {
            field: "broker",
            rule: format!("{rule} (got {:?})", self.broker),
        };
        let rest = self
            .broker
            .strip_prefix("mqtt://")
            .ok_or_else(|| invalid("must start with mqtt://"))?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("must be mqtt://HOST:PORT"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| invalid("port must be a number from 1 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(invalid("must be mqtt://HOST:PORT"));
        }
        Ok((host.to_string(), port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["imn-agent"];
        v.extend_from_slice(args);
        Flags::parse_from(v)
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
        let cfg =
            AgentConfig::load(flags(&["--id", "a", "--broker", "mqtt://[::1]:1883"])).unwrap();
        assert_eq!(cfg.broker_addr().unwrap(), ("::1".to_string(), 1883));
    }
}
