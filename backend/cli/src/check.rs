//! `imn check`: a measurement's status check as a Nagios/Icinga plugin. It prints the
//! backend's plugin output (`format=nagios`) and exits with the plugin's code: 0 OK,
//! 1 WARNING (some agents breach, no more than `--max-breaching`), 2 CRITICAL, 3
//! UNKNOWN (the API is unreachable, the measurement is unknown, or a threshold is
//! refused; the reason is printed as the plugin's line).

use crate::client::Client;

/// The thresholds, as `imn check` takes them; each becomes the status check's query
/// parameter of the same name (dashes for underscores).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CheckArgs {
    /// Loss in percent (0 to 100) above which an agent breaches.
    #[arg(long)]
    pub max_loss: Option<f64>,
    /// Median RTT in ms above which an agent breaches.
    #[arg(long)]
    pub max_rtt_median: Option<f64>,
    /// The percentile --max-rtt-percentile applies to (default 95).
    #[arg(long)]
    pub rtt_percentile: Option<f64>,
    /// RTT at --rtt-percentile in ms above which an agent breaches.
    #[arg(long)]
    pub max_rtt_percentile: Option<f64>,
    /// Good HTTP statuses: codes or classes, comma separated (e.g. 2xx,301).
    #[arg(long)]
    pub http_status: Option<String>,
    /// Median HTTP total time in ms above which an agent breaches.
    #[arg(long)]
    pub max_http_time: Option<f64>,
    /// Good DNS rcodes, comma separated (e.g. NOERROR).
    #[arg(long)]
    pub dns_rcode: Option<String>,
    /// Median DNS response time in ms above which an agent breaches.
    #[arg(long)]
    pub max_dns_time: Option<f64>,
    /// Days to the certificate's expiry below which an agent breaches.
    #[arg(long)]
    pub min_cert_days: Option<f64>,
    /// Absolute NTP offset in ms above which an agent breaches.
    #[arg(long)]
    pub max_ntp_offset: Option<f64>,
    /// A path that does not reach its destination breaches.
    #[arg(long)]
    pub reached: bool,
    /// How many agents may breach before the check is CRITICAL.
    #[arg(long)]
    pub max_breaching: Option<u32>,
    /// Seconds back from now to judge.
    #[arg(long)]
    pub window_s: Option<u64>,
}

impl CheckArgs {
    /// The query string (without `?`), the format included.
    pub fn query(&self, format: &str) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let mut num = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                q.append_pair(k, &v.to_string());
            }
        };
        num("max_loss", self.max_loss);
        num("max_rtt_median", self.max_rtt_median);
        num("rtt_percentile", self.rtt_percentile);
        num("max_rtt_percentile", self.max_rtt_percentile);
        num("max_http_time", self.max_http_time);
        num("max_dns_time", self.max_dns_time);
        num("min_cert_days", self.min_cert_days);
        num("max_ntp_offset", self.max_ntp_offset);
        if let Some(v) = &self.http_status {
            q.append_pair("http_status", v);
        }
        if let Some(v) = &self.dns_rcode {
            q.append_pair("dns_rcode", v);
        }
        if self.reached {
            q.append_pair("reached", "true");
        }
        if let Some(v) = self.max_breaching {
            q.append_pair("max_breaching", &v.to_string());
        }
        if let Some(v) = self.window_s {
            q.append_pair("window_s", &v.to_string());
        }
        q.append_pair("format", format);
        q.finish()
    }
}

/// Nagios's exit codes.
pub const OK: u8 = 0;
pub const WARNING: u8 = 1;
pub const CRITICAL: u8 = 2;
pub const UNKNOWN: u8 = 3;

/// `s` percent-encoded as one path segment (every byte but unreserved ones).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs the check: what to print and the exit code.
pub async fn check(c: &Client, id: &str, args: &CheckArgs, json: bool) -> (String, u8) {
    let path = format!(
        "/v1/measurements/{}/status-check?{}",
        path_segment(id),
        args.query(if json { "json" } else { "nagios" })
    );
    match c.get_text(&path, "x-imn-check").await {
        Ok((status, word, body)) => {
            let code = match (status, word.as_deref()) {
                (200 | 503, Some("ok")) => OK,
                (200 | 503, Some("warning")) => WARNING,
                (200 | 503, Some("critical")) => CRITICAL,
                _ => UNKNOWN,
            };
            if code == UNKNOWN {
                // The API's error: its message is the reason.
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        v.get("message")
                            .and_then(|m| m.as_str())
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| body.chars().take(200).collect());
                let line = imn_proto::summary::tidy(format!("IMN UNKNOWN - {status}: {msg}"));
                return (format!("{line}\n"), UNKNOWN);
            }
            let mut out = body;
            if !out.ends_with('\n') {
                out.push('\n');
            }
            (out, code)
        }
        Err(e) => (
            format!(
                "{}\n",
                imn_proto::summary::tidy(format!("IMN UNKNOWN - {e}"))
            ),
            UNKNOWN,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_the_query() {
        let a = CheckArgs {
            max_loss: Some(10.0),
            http_status: Some("2xx,301".into()),
            reached: true,
            max_breaching: Some(1),
            ..Default::default()
        };
        assert_eq!(
            a.query("nagios"),
            "max_loss=10&http_status=2xx%2C301&reached=true&max_breaching=1&format=nagios"
        );
        assert_eq!(path_segment("m-1 /?%"), "m-1%20%2F%3F%25");
    }
}
