//! The Prometheus text format (version 0.0.4): the one writer ([`Exposition`]) every
//! IMN process uses, and a minimal HTTP/1.1 responder for a `/metrics` page in
//! processes with no HTTP server of their own (the bridge, and the agent built with
//! `metrics`). Light enough for the agent: no OpenTelemetry here (the cloud's
//! instruments, which also feed OTLP, are in `imn-cloud`).

use std::fmt::Write as _;
use std::time::Duration;

/// The content type of the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the Prometheus text that `render` writes at `GET /metrics` on `listen`, until
/// the process ends: a minimal HTTP/1.1 responder, one request per connection, for a
/// process with no HTTP server of its own.
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let read = async {
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        let n = sock.read(&mut chunk).await?;
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    Ok::<_, std::io::Error>(())
                };
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), read).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
                let line = String::from_utf8_lossy(&buf);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let path = path.split('?').next().unwrap_or("");
                let (status, ctype, body) = match (method, path) {
                    ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, render()),
                    ("GET", "/livez") => ("200 OK", "text/plain", "ok\n".to_string()),
                    ("GET", _) => (
                        "404 Not Found",
                        "text/plain",
                        "not found: try /metrics\n".into(),
                    ),
                    _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// A `/metrics` page being written. Each family is written whole: its `HELP` and
/// `TYPE` lines, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A sample value as the text format writes it (`NaN`, `+Inf`, `-Inf`, or the number).
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: `kind` is `gauge`, `counter` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = writeln!(
            self.out,
            "{name}{} {}",
            labels_text(labels),
            fmt_value(value)
        );
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}
