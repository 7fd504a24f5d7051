//! Typed parameters of each module, parsed from the JSON that passed the schema, plus
//! the rules a JSON Schema cannot express (such as a length in bytes).

use serde::Deserialize;
use serde_json::Value;

use crate::kinds;

/// A rule the parameters broke, beyond the schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    /// JSON pointer of the offending field.
    pub field: String,
    /// The rule's name, like a JSON Schema keyword (`required`, `maxBytes`).
    pub rule: &'static str,
    /// The rule, in words.
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoParams {
    pub message: String,
}

pub const ECHO_MAX_BYTES: usize = 4096;

/// Most targets one ping request may name.
pub const PING_MAX_TARGETS: usize = 65_536;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingParams {
    /// One host (name or address). Either this or `targets`.
    pub host: Option<String>,
    /// Many hosts, probed concurrently by one engine.
    pub targets: Option<Vec<String>>,
    /// Probes per target.
    #[serde(default = "default_count")]
    pub count: u32,
    /// Time between two probes to the same target.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// How long a probe waits for its reply.
    #[serde(default = "default_interval")]
    pub timeout_ms: u64,
    /// ICMP payload bytes.
    #[serde(default = "default_size")]
    pub size: u32,
    /// TTL / hop limit of the probes.
    pub ttl: Option<u8>,
    /// Probes per second across all targets; unset means one target's interval
    /// spread over all targets, capped at 10,000/s.
    pub rate: Option<f64>,
}

impl PingParams {
    /// The targets in request order: `host`, or `targets`.
    pub fn target_list(&self) -> Vec<String> {
        match (&self.host, &self.targets) {
            (Some(h), _) => vec![h.clone()],
            (None, Some(t)) => t.clone(),
            (None, None) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpingParams {
    pub host: String,
    pub port: u16,
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default = "default_interval")]
    pub timeout_ms: u64,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultyParams {
    pub message: String,
    /// Seconds to sleep before answering.
    #[serde(default)]
    pub delay: f64,
    #[serde(default)]
    pub crash: bool,
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub error: bool,
}

fn default_count() -> u32 {
    4
}
fn default_interval() -> u64 {
    1000
}
fn default_size() -> u32 {
    56
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(params: &Value) -> Result<T, ParamError> {
    serde_json::from_value(params.clone()).map_err(|e| ParamError {
        field: String::new(),
        rule: "type",
        message: e.to_string(),
    })
}

/// Checks what the schema cannot: called by the backend after schema validation.
pub fn check(module: &str, params: &Value) -> Result<(), ParamError> {
    match module {
        "echo_module" => {
            let p: EchoParams = parse(params)?;
            if p.message.len() > ECHO_MAX_BYTES {
                return Err(ParamError {
                    field: "/message".into(),
                    rule: "maxBytes",
                    message: format!(
                        "must be at most {ECHO_MAX_BYTES} bytes of UTF-8, got {}",
                        p.message.len()
                    ),
                });
            }
            Ok(())
        }
        "ping_module" => {
            let p: PingParams = parse(params)?;
            if p.host.is_some() == p.targets.is_some() {
                return Err(ParamError {
                    field: "/host".into(),
                    rule: "required",
                    message: "give exactly one of host and targets".into(),
                });
            }
            Ok(())
        }
        "tcping" => parse::<TcpingParams>(params).map(|_| ()),
        "faulty_module" => parse::<FaultyParams>(params).map(|_| ()),
        "traceroute" => kinds::traceroute::traceroute_check(params),
        "mtr" => kinds::traceroute::mtr_check(params),
        "dns" => kinds::dns::dns_check(params),
        "http" => kinds::http::http_check(params),
        "tls_cert" => kinds::http::tls_cert_check(params),
        "ntp" => kinds::ntp::ntp_check(params),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn echo_counts_bytes_not_chars() {
        let ok = "é".repeat(2048); // 4096 bytes
        assert!(check("echo_module", &json!({"message": ok})).is_ok());
        let long = "é".repeat(2049);
        let err = check("echo_module", &json!({"message": long})).unwrap_err();
        assert_eq!(err.field, "/message");
    }

    #[test]
    fn ping_defaults() {
        let p: PingParams = parse(&json!({"host": "127.0.0.1", "count": 2})).unwrap();
        assert_eq!((p.count, p.interval_ms, p.size), (2, 1000, 56));
        assert_eq!(p.target_list(), vec!["127.0.0.1"]);
        let both = json!({"host": "a", "targets": ["b"], "count": 1});
        assert_eq!(check("ping_module", &both).unwrap_err().field, "/host");
    }
}
