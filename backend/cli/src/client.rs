//! The `imn` command's HTTP client: where the API is, the token, and the CA to trust.

use std::path::PathBuf;

use serde_json::Value;

/// How the `imn` client reaches the API.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientFlags {
    /// The API's base URL.
    #[arg(
        long,
        global = true,
        env = "IMN_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,
    /// API token (or --token-file).
    #[arg(long, global = true, env = "IMN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API token, e.g. DATA/admin-token of `imn up --auth`.
    #[arg(long, global = true, env = "IMN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https URL (e.g. from `imn certs`).
    #[arg(long, global = true, env = "IMN_CA")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--token-file {path}: {message}")]
    TokenFile { path: String, message: String },
    #[error("--ca {path}: {message}")]
    Ca { path: String, message: String },
    #[error("--url {url}: {message}")]
    Http { url: String, message: String },
    /// The API answered with an error; `body` is its JSON.
    #[error("{status}: {message}")]
    Api {
        status: u16,
        message: String,
        body: Value,
    },
}

pub struct Client {
    /// No overall timeout (streams stay open); each plain request has its own.
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(flags: &ClientFlags) -> Result<Client, ClientError> {
        let token = match (&flags.token, &flags.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ClientError::TokenFile {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &flags.ca {
            let ca_err = |message: String| ClientError::Ca {
                path: ca.display().to_string(),
                message,
            };
            let pem = std::fs::read(ca).map_err(|e| ca_err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no certificate in the file".into()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let build_err = |e: reqwest::Error| ClientError::Http {
            url: flags.url.clone(),
            message: e.to_string(),
        };
        let http = b.build().map_err(build_err)?;
        Ok(Client {
            http,
            base: flags.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Value, ClientError> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// GETs `path` and returns the status, the named header and the body as text,
    /// whatever the status: for answers where an error status is an answer too (a
    /// status check's 503). Only a failure to reach the API is an error.
    pub async fn get_text(
        &self,
        path: &str,
        header: &str,
    ) -> Result<(u16, Option<String>, String), ClientError> {
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(std::time::Duration::from_secs(60));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let fail = |e: reqwest::Error| ClientError::Http {
            url: self.base.clone(),
            message: error_chain(&e),
        };
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status().as_u16();
        let h = resp
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.text().await.map_err(fail)?;
        Ok((status, h, body))
    }

    /// POSTs raw bytes (`Content-Type: application/octet-stream`), e.g. a signed
    /// release file; the answer is JSON, as for [`Client::post`]. Up to 64 MiB may
    /// take a while on a slow link: ten minutes rather than one.
    pub async fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Value, ClientError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .timeout(std::time::Duration::from_secs(600));
        let resp = self.open(req).await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// Opens a Server-Sent Events stream, resuming after `last_event_id`. The
    /// response is read with `chunk()`; it has no overall timeout.
    pub async fn stream(
        &self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        self.open(req).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = self
            .open(req.timeout(std::time::Duration::from_secs(60)))
            .await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// Sends with the token; an error status becomes [`ClientError::Api`] with the
    /// API's JSON error.
    async fn open(
        &self,
        mut req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| ClientError::Http {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Err(ClientError::Api {
            status: status.as_u16(),
            message: body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_string(),
            body,
        })
    }
}

/// An error and its causes, so "error sending request" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
