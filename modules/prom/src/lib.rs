//! A minimal HTTP/1.1 responder for a Prometheus `/metrics` page, for processes with no
//! HTTP server of their own (the bridge, and the agent built with `metrics`).

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
