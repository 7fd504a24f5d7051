//! The `http` and `tls_cert` modules: parameters, results and schemas.
//!
//! `http` makes one HTTP/1.1 or HTTP/2 request (over TLS or not) and times each phase;
//! `tls_cert` only connects and completes a TLS handshake, to report the server's
//! certificate chain as Atlas's sslcert does. Both record the chain the server presented
//! and the outcome of verifying it, so a certificate error is reported with the chain
//! that caused it rather than hidden behind a failed handshake.

#[cfg(feature = "atlas")]
pub mod atlas;

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{str_param, u64_param, Examples};
use crate::catalog::ModuleSpec;
use crate::params::ParamError;
use crate::policy::{Demand, Target};
use crate::summary::Summary;

/// The `http` module's entry in the catalog.
pub const HTTP: ModuleSpec = ModuleSpec {
    name: "http",
    version: "1.0.0",
    description: "One HTTP/1.1 or HTTP/2 request, with DNS, connect, TLS and first-byte timings and the TLS details.",
    default_timeout_ms: 60_000,
    schema_hash: "9d48031d825c6e56",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: http_schema,
    #[cfg(feature = "catalog")]
    examples: http_examples,
    demand: http_demand,
    #[cfg(feature = "catalog")]
    check: http_check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::http),
};

/// The `tls_cert` module's entry in the catalog.
pub const TLS_CERT: ModuleSpec = ModuleSpec {
    name: "tls_cert",
    version: "1.0.0",
    description:
        "A TLS handshake: the server's certificate chain, version and cipher, as Atlas's sslcert.",
    default_timeout_ms: 60_000,
    schema_hash: "a520bfdf9d355e8d",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema: tls_cert_schema,
    #[cfg(feature = "catalog")]
    examples: tls_cert_examples,
    demand: tls_cert_demand,
    #[cfg(feature = "catalog")]
    check: tls_cert_check,
    #[cfg(feature = "atlas")]
    atlas: Some(atlas::sslcert),
};

/// Longest URL accepted, in bytes.
pub const URL_MAX_BYTES: usize = 2048;
/// Most bytes of a response body `max_body_bytes` may ask for.
pub const BODY_MAX_BYTES: u32 = 1 << 20;
/// Most extra request headers.
pub const HEADERS_MAX: usize = 32;
/// Longest value of an extra request header, in bytes.
pub const HEADER_VALUE_MAX_BYTES: usize = 4096;
/// Longest `ca_pem`, in bytes.
pub const CA_PEM_MAX_BYTES: usize = 256 * 1024;
/// Request headers the agent sets itself or that are connection-specific (RFC 9110
/// §7.6.1, RFC 9113 §8.2.2): refused in `headers`.
pub const REFUSED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
];

/// The request method. Only methods without a request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Get,
    Head,
    Options,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Options => "OPTIONS",
        }
    }
}

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum HttpVersionPref {
    /// Over TLS, offer h2 and http/1.1 by ALPN and speak what the server picks; in
    /// plain text, HTTP/1.1.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// HTTP/1.1 only.
    #[serde(rename = "1.1")]
    Http11,
    /// HTTP/2 only: h2 over TLS, or h2c with prior knowledge in plain text.
    #[serde(rename = "2")]
    Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    /// `http://` or `https://` URL; its host is a name or an address literal.
    pub url: String,
    #[serde(default)]
    pub method: HttpMethod,
    #[serde(default)]
    pub version: HttpVersionPref,
    /// Extra request headers, name to value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The whole request, from name resolution to the last body byte read.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most body bytes read; the rest is not read.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u32,
    /// Follow redirects (a 3xx with Location), each reported; otherwise a redirect is
    /// the result.
    #[serde(default)]
    pub follow_redirects: bool,
    /// Most redirects followed.
    #[serde(default = "default_max_redirects")]
    pub max_redirects: u8,
    /// Go on despite a certificate that does not verify (still reported).
    #[serde(default)]
    pub insecure: bool,
    /// Extra trust anchors, PEM, besides the system's.
    pub ca_pem: Option<String>,
    /// The name sent as SNI and Host, and verified against the certificate, instead of
    /// the URL's host.
    pub server_name: Option<String>,
    /// Connect to this address instead of resolving the URL's host (curl's --resolve).
    pub resolve: Option<String>,
    /// Use only IPv4 (4) or IPv6 (6) addresses of the host.
    pub family: Option<u8>,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_body_bytes() -> u32 {
    4096
}
fn default_max_redirects() -> u8 {
    5
}
fn default_tls_port() -> u16 {
    443
}

/// A URL split into what the request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`.
    pub tls: bool,
    /// Host name, or address literal without brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`; the fragment is dropped.
    pub path: String,
}

impl Url {
    /// `host[:port]` as the Host header or `:authority` carries it (port only when not
    /// the scheme's default; IPv6 in brackets).
    pub fn authority(&self, host: &str) -> String {
        let h = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// Parses an `http://` or `https://` URL. No user info; the host is a DNS name or an
/// address literal (IPv6 in brackets); the path and query are printable ASCII.
pub fn parse_url(s: &str) -> Result<Url, String> {
    if s.len() > URL_MAX_BYTES {
        return Err(format!("longer than {URL_MAX_BYTES} bytes"));
    }
    let (scheme, rest) = s
        .split_once("://")
        .ok_or("must start with http:// or https://")?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(format!("scheme {scheme:?} is not http or https")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err("user info (user@host) is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{h:?} in brackets is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        (h.to_string(), port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if !host.contains(':') && host.parse::<IpAddr>().is_err() {
        check_dns_name(&host)?;
    }
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("port {p:?} is not 1 to 65535")),
        },
    };
    let tail = tail.split('#').next().unwrap_or("");
    if let Some(c) = tail.chars().find(|c| !('!'..='~').contains(c)) {
        return Err(format!(
            "path holds {c:?}: percent-encode spaces and non-ASCII"
        ));
    }
    let path = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    Ok(Url {
        tls,
        host,
        port,
        path,
    })
}

/// The absolute URL a Location header points to, from the URL that answered with it
/// (RFC 3986 §5.2, without removing dot segments).
pub fn resolve_location(base: &Url, location: &str) -> String {
    let scheme = if base.tls { "https" } else { "http" };
    let has_scheme = location
        .split_once("://")
        .is_some_and(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic()));
    if has_scheme {
        return location.to_string();
    }
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    let origin = format!("{scheme}://{}", base.authority(&base.host));
    let base_path = base.path.split('?').next().unwrap_or("/");
    if location.starts_with('/') {
        format!("{origin}{location}")
    } else if location.starts_with('?') {
        format!("{origin}{base_path}{location}")
    } else {
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{origin}{dir}{location}")
    }
}

/// A DNS host name: labels of letters, digits, `-` and `_`, 1 to 63 bytes each, at most
/// 253 bytes, an optional final dot.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() || n.len() > 253 {
        return Err(format!("{name:?} is not 1 to 253 bytes"));
    }
    for label in n.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{name:?} is not a host name (letters, digits, '-', '_' and dots)"
            ));
        }
    }
    Ok(())
}

/// An HTTP field name (RFC 9110 token), not one the agent refuses.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b))
    {
        return Err(format!("{name:?} is not a valid header name"));
    }
    if REFUSED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{name:?} is connection-specific or set by the agent (use server_name for Host)"
        ));
    }
    if value.len() > HEADER_VALUE_MAX_BYTES {
        return Err(format!(
            "value is longer than {HEADER_VALUE_MAX_BYTES} bytes"
        ));
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("value holds a control character (CR, LF, NUL...)".into());
    }
    Ok(())
}

/// A JSON pointer token (RFC 6901).
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn refuse(field: impl Into<String>, rule: &'static str, message: String) -> ParamError {
    ParamError {
        field: field.into(),
        rule,
        message,
    }
}

fn check_server_name(field: &str, name: &str) -> Result<(), ParamError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    check_dns_name(name).map_err(|m| refuse(field, "format", m))
}

fn check_ca_pem(pem: &str) -> Result<(), ParamError> {
    if pem.len() > CA_PEM_MAX_BYTES {
        return Err(refuse(
            "/ca_pem",
            "maxBytes",
            format!("must be at most {CA_PEM_MAX_BYTES} bytes"),
        ));
    }
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(refuse(
            "/ca_pem",
            "format",
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(())
}

/// One response or request header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// Where a request or handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpPhase {
    /// Resolving the host name.
    Dns,
    /// The TCP connect.
    Connect,
    /// The TLS handshake, certificate verification included.
    Tls,
    /// Sending the request and waiting for the response head.
    Response,
    /// Reading the body.
    Body,
}

/// Times of one request in ms, each counted from the start of the run (as curl's
/// `time_namelookup`, `time_connect`, `time_appconnect`, `time_starttransfer` and
/// `time_total`), so `dns_ms <= connect_ms <= tls_ms <= ttfb_ms <= total_ms`. A phase
/// not reached is None; `tls_ms` is None without TLS. After redirects they are the last
/// request's, still counted from the start of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpTiming {
    /// The address is known (name resolved, or a literal).
    pub dns_ms: Option<f64>,
    /// TCP connected.
    pub connect_ms: Option<f64>,
    /// TLS handshake done.
    pub tls_ms: Option<f64>,
    /// Response head received (status line and headers).
    pub ttfb_ms: Option<f64>,
    /// Body read (up to `max_body_bytes`), or the failure.
    pub total_ms: f64,
}

/// One certificate as the server presented it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Distinguished name, RFC 4514 style (`CN=leaf, O=Org`).
    pub subject: String,
    pub issuer: String,
    /// The subject's common name, if any.
    pub subject_cn: Option<String>,
    pub issuer_cn: Option<String>,
    /// Serial number, hex, colon-separated.
    pub serial: String,
    /// Validity, RFC 3339 UTC.
    pub not_before: String,
    pub not_after: String,
    /// Validity, Unix seconds.
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// DNS names of the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// IP addresses of the subjectAltName extension.
    pub ip_addrs: Vec<String>,
    /// Basic constraints say this is a CA.
    pub is_ca: bool,
    /// SHA-256 of the DER, upper-case hex, colon-separated (as Atlas's sagan prints it).
    pub sha256: String,
    /// `RSA`, `EC P-256`, `Ed25519`... or the algorithm's OID.
    pub key_algorithm: String,
    /// Key size in bits, when known.
    pub key_bits: Option<u32>,
    /// Signature algorithm, by name or OID.
    pub signature_algorithm: String,
    /// The certificate, PEM (`tls_cert` only; None in `http` results).
    pub pem: Option<String>,
    /// Why the certificate could not be parsed (then the other fields are empty).
    pub parse_error: Option<String>,
}

/// What a TLS handshake negotiated, and the chain it presented.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// The name sent as SNI and verified (None for an address: then the certificate is
    /// verified against its IP addresses and no SNI is sent).
    pub server_name: Option<String>,
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: Option<String>,
    /// IANA name of the cipher suite (`TLS_AES_128_GCM_SHA256`).
    pub cipher: Option<String>,
    /// The cipher suite's code point (0x1301 for TLS_AES_128_GCM_SHA256).
    pub cipher_code: Option<u16>,
    /// Key exchange group (`X25519`).
    pub kx_group: Option<String>,
    /// The ALPN protocol the server chose.
    pub alpn: Option<String>,
    /// The certificates the server sent, in its order (leaf first).
    pub chain: Vec<CertInfo>,
    /// Why the chain did not verify against the trust anchors and the server name;
    /// None when it verified. Set even when `insecure` let the handshake go on.
    pub verify_error: Option<String>,
    /// How many trust anchors the chain was verified against.
    pub trust_anchors: u32,
}

/// The response, as far as it was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// `HTTP/1.1` or `HTTP/2`, as spoken.
    pub http_version: String,
    pub status: u16,
    /// The reason phrase (HTTP/1.1), else the status's canonical reason.
    pub reason: Option<String>,
    /// Response headers, at most 100, values cut at 1024 bytes.
    pub headers: Vec<HttpHeader>,
    /// Some headers or values were left out or cut.
    pub headers_truncated: bool,
    /// Size of the response head: status line and headers as HTTP/1.1 would send
    /// them.
    pub header_bytes: u32,
    /// The Content-Length header, if any.
    pub content_length: Option<u64>,
    /// Body bytes read (at most `max_body_bytes`).
    pub body_bytes: u64,
    /// The body was longer than `max_body_bytes` and was not read to its end.
    pub body_truncated: bool,
    /// The first bytes of the body (at most 256), as lossy UTF-8.
    pub body_preview: Option<String>,
    /// The Location header of a redirect (3xx); redirects are not followed.
    pub location: Option<String>,
}

/// A redirect that was followed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRedirect {
    /// The URL requested.
    pub url: String,
    /// The address that answered.
    pub addr: Option<String>,
    pub status: u16,
    /// Its Location header, as sent.
    pub location: String,
    /// When its response head came, ms from the start of the run.
    pub ttfb_ms: Option<f64>,
}

/// One request (the last one, when redirects were followed). The parts are boxed to
/// keep the result enum small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResult {
    /// The URL requested: the one asked, or the last one redirects led to.
    pub url: String,
    pub method: HttpMethod,
    /// The address connected to (or last tried).
    pub addr: Option<String>,
    /// 4 or 6.
    pub af: Option<u8>,
    /// The local end of the connection, `addr:port`.
    pub local_addr: Option<String>,
    pub timing: HttpTiming,
    /// The response head and what was read of the body; None when no head came.
    pub response: Option<Box<HttpResponse>>,
    /// TLS details for https, even when the handshake failed on the certificate.
    pub tls: Option<Box<TlsInfo>>,
    /// What failed, in words; None when the response was read (to `max_body_bytes`).
    pub error: Option<String>,
    /// Where it failed.
    pub error_phase: Option<HttpPhase>,
    /// Redirects followed before this request, in order (`follow_redirects`).
    pub redirects: Vec<HttpRedirect>,
}

pub fn http_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "http parameters",
        "description": "One HTTP request with per-phase timings; redirects are reported, not followed.",
        "type": "object",
        "properties": {
            "url": {"type": "string", "minLength": 8, "maxLength": URL_MAX_BYTES,
                "pattern": "^[hH][tT][tT][pP][sS]?://",
                "description": "http:// or https:// URL; its host is a name (resolved by the agent) or an address literal, IPv6 in brackets."},
            "method": {"enum": ["GET", "HEAD", "OPTIONS"], "default": "GET",
                "description": "Request method; none of them sends a body."},
            "version": {"enum": ["auto", "1.1", "2"], "default": "auto",
                "description": "auto: h2 or http/1.1 by ALPN over TLS, HTTP/1.1 in plain text; 1.1; 2: h2 over TLS, h2c with prior knowledge in plain text."},
            "headers": {"type": "object", "maxProperties": HEADERS_MAX,
                "additionalProperties": {"type": "string", "maxLength": HEADER_VALUE_MAX_BYTES},
                "description": "Extra request headers, name to value. Connection-specific ones and Host (see server_name) are refused."},
            "timeout_ms": {"type": "integer", "minimum": 100, "maximum": 60000, "default": 10000,
                "description": "Time allowed for the whole request, from name resolution to the body."},
            "max_body_bytes": {"type": "integer", "minimum": 0, "maximum": BODY_MAX_BYTES, "default": 4096,
                "description": "Most body bytes read; a longer body is reported as truncated."},
            "follow_redirects": {"type": "boolean", "default": false,
                "description": "Follow redirects (3xx with Location), reporting each; by default a redirect is the result."},
            "max_redirects": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5,
                "description": "Most redirects followed; one more is an error."},
            "insecure": {"type": "boolean", "default": false,
                "description": "Go on when the certificate does not verify; the error is still reported."},
            "ca_pem": {"type": "string", "maxLength": CA_PEM_MAX_BYTES,
                "description": "Extra trust anchors (PEM certificates) besides the system's, for private CAs."},
            "server_name": {"type": "string", "minLength": 1, "maxLength": 253,
                "description": "Name sent as SNI and Host and verified against the certificate, instead of the URL's host."},
            "resolve": {"type": "string", "minLength": 2, "maxLength": 45,
                "description": "IPv4 or IPv6 address to connect to instead of resolving the URL's host (as curl --resolve)."},
            "family": {"enum": [4, 6],
                "description": "Use only the host's IPv4 (4) or IPv6 (6) addresses."}
        },
        "required": ["url"],
        "additionalProperties": false
    })
}

pub fn http_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"url": "http://127.0.0.1:8080/"}),
            json!({"url": "http://127.0.0.1:8080/a", "follow_redirects": true, "max_redirects": 3}),
            json!({"url": "https://localhost:8443/index.html?x=1", "method": "HEAD", "version": "2",
                "timeout_ms": 5000, "max_body_bytes": 0, "family": 4}),
            json!({"url": "https://[::1]/", "version": "1.1", "headers": {"Accept": "text/html", "X-Probe": "imn"},
                "insecure": true, "server_name": "www.example.org", "resolve": "::1"}),
            json!({"url": "https://test.invalid/", "method": "OPTIONS",
                "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}),
        ],
        invalid: vec![
            (json!({}), "/url"),
            (json!({"url": "ftp://127.0.0.1/"}), "/url"),
            (json!({"url": "http://user@127.0.0.1/"}), "/url"),
            (json!({"url": "http://127.0.0.1:0/"}), "/url"),
            (
                json!({"url": "http://127.0.0.1/", "method": "POST"}),
                "/method",
            ),
            (
                json!({"url": "http://127.0.0.1/", "version": "3"}),
                "/version",
            ),
            (
                json!({"url": "http://127.0.0.1/", "timeout_ms": 10}),
                "/timeout_ms",
            ),
            (
                json!({"url": "http://127.0.0.1/", "max_body_bytes": 2_000_000}),
                "/max_body_bytes",
            ),
            (
                json!({"url": "http://127.0.0.1/", "headers": {"Connection": "close"}}),
                "/headers/Connection",
            ),
            (
                json!({"url": "http://127.0.0.1/", "headers": {"Bad Name": "x"}}),
                "/headers/Bad Name",
            ),
            (
                json!({"url": "http://127.0.0.1/", "headers": {"X-A": "a\r\nInjected: 1"}}),
                "/headers/X-A",
            ),
            (
                json!({"url": "http://127.0.0.1/", "ca_pem": "not a certificate"}),
                "/ca_pem",
            ),
            (
                json!({"url": "http://127.0.0.1/", "resolve": "localhost"}),
                "/resolve",
            ),
            (
                json!({"url": "http://127.0.0.1/", "resolve": "::1", "family": 4}),
                "/family",
            ),
            (
                json!({"url": "http://127.0.0.1/", "server_name": "bad name"}),
                "/server_name",
            ),
            (
                json!({"url": "http://127.0.0.1/", "max_redirects": 0}),
                "/max_redirects",
            ),
            (
                json!({"url": "http://127.0.0.1/", "follow": true}),
                "/follow",
            ),
        ],
    }
}

/// Rules the schema cannot express.
/// Where an http run connects: `resolve` when given (the URL's host is then only a
/// name in the request), else the URL's host. Redirects are checked by the agent as it
/// follows them. One request, plus each redirect followed.
pub fn http_demand(params: &Value) -> Demand {
    let targets = match (str_param(params, "resolve"), str_param(params, "url")) {
        (Some(addr), _) => vec![Target::new("/resolve", addr)],
        (None, Some(url)) => vec![Target::new(
            "/url",
            parse_url(url)
                .map(|u| u.host)
                .unwrap_or_else(|_| url.to_string()),
        )],
        (None, None) => vec![],
    };
    let follow = params
        .get("follow_redirects")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let redirects = if follow {
        u64_param(params, "max_redirects", u64::from(default_max_redirects()))
    } else {
        0
    };
    Demand {
        targets,
        count: None,
        probes: 1 + redirects,
        rate: None,
        redirects: follow,
    }
}

pub fn http_check(params: &Value) -> Result<(), ParamError> {
    let p: HttpParams = crate::params::parse(params)?;
    parse_url(&p.url).map_err(|m| refuse("/url", "format", m))?;
    for (name, value) in &p.headers {
        check_header(name, value)
            .map_err(|m| refuse(format!("/headers/{}", pointer_token(name)), "format", m))?;
    }
    if let Some(pem) = &p.ca_pem {
        check_ca_pem(pem)?;
    }
    if let Some(name) = &p.server_name {
        check_server_name("/server_name", name)?;
    }
    if let Some(addr) = &p.resolve {
        let ip: IpAddr = addr.parse().map_err(|_| {
            refuse(
                "/resolve",
                "format",
                format!("{addr:?} is not an IP address"),
            )
        })?;
        if let Some(f) = p.family {
            if f != if ip.is_ipv4() { 4 } else { 6 } {
                return Err(refuse(
                    "/family",
                    "const",
                    format!("family {f} contradicts resolve {addr}"),
                ));
            }
        }
    }
    Ok(())
}

/// Which TLS versions `tls_cert` offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersionPref {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertParams {
    /// Host name or address literal.
    pub host: String,
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// SNI and the name verified; by default the host when it is a name.
    pub server_name: Option<String>,
    /// Time allowed for resolution, connect and handshake together.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra trust anchors, PEM.
    pub ca_pem: Option<String>,
    /// ALPN protocols offered, in order (none by default).
    #[serde(default)]
    pub alpn: Vec<String>,
    #[serde(default)]
    pub version: TlsVersionPref,
    /// Use only IPv4 (4) or IPv6 (6) addresses of the host.
    pub family: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsCertResult {
    pub host: String,
    pub port: u16,
    /// The address connected to (or tried).
    pub addr: Option<String>,
    pub af: Option<u8>,
    /// The local end of the connection, `addr:port`.
    pub local_addr: Option<String>,
    /// Name resolution, from the start, ms.
    pub dns_ms: Option<f64>,
    /// TCP connect alone, ms.
    pub connect_ms: Option<f64>,
    /// The TLS handshake alone, from the first byte sent to the handshake done, ms.
    pub handshake_ms: Option<f64>,
    /// Handshake details and the chain (present as far as the handshake got).
    pub tls: Box<TlsInfo>,
    /// What failed, in words. A chain that does not verify is not a failure here: the
    /// handshake is completed and `tls.verify_error` says why.
    pub error: Option<String>,
    pub error_phase: Option<HttpPhase>,
    /// The TLS alert the server sent, if the handshake ended with one (its code,
    /// RFC 8446 §6).
    pub alert: Option<u8>,
}

pub fn tls_cert_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "tls_cert parameters",
        "description": "TCP connect and TLS handshake only; the chain is reported even when it does not verify.",
        "type": "object",
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": 253,
                "description": "Host name (resolved by the agent) or IPv4/IPv6 address."},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 443},
            "server_name": {"type": "string", "minLength": 1, "maxLength": 253,
                "description": "SNI and the name the certificate is verified against; by default the host when it is a name (for an address: no SNI, verified against the address)."},
            "timeout_ms": {"type": "integer", "minimum": 100, "maximum": 60000, "default": 10000,
                "description": "Time allowed for resolution, connect and handshake together."},
            "ca_pem": {"type": "string", "maxLength": CA_PEM_MAX_BYTES,
                "description": "Extra trust anchors (PEM certificates) besides the system's."},
            "alpn": {"type": "array", "maxItems": 8,
                "items": {"type": "string", "minLength": 1, "maxLength": 32},
                "description": "ALPN protocols offered, in order; none by default."},
            "version": {"enum": ["auto", "1.2", "1.3"], "default": "auto",
                "description": "TLS versions offered: both, or only 1.2 or 1.3."},
            "family": {"enum": [4, 6],
                "description": "Use only the host's IPv4 (4) or IPv6 (6) addresses."}
        },
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn tls_cert_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"host": "localhost", "port": 8443, "timeout_ms": 3000, "alpn": ["h2", "http/1.1"],
                "version": "1.3", "family": 6}),
            json!({"host": "::1", "server_name": "www.example.org", "version": "1.2",
                "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}),
        ],
        invalid: vec![
            (json!({}), "/host"),
            (json!({"host": "127.0.0.1", "port": 0}), "/port"),
            (json!({"host": "127.0.0.1", "version": "1.1"}), "/version"),
            (json!({"host": "127.0.0.1", "timeout_ms": 0}), "/timeout_ms"),
            (json!({"host": "bad host"}), "/host"),
            (
                json!({"host": "127.0.0.1", "server_name": "a..b"}),
                "/server_name",
            ),
            (json!({"host": "127.0.0.1", "ca_pem": "x"}), "/ca_pem"),
            (json!({"host": "127.0.0.1", "alpn": [""]}), "/alpn/0"),
            (json!({"host": "127.0.0.1", "sni": "x"}), "/sni"),
        ],
    }
}

/// Rules the schema cannot express.
/// Where a tls_cert run connects: `host`; one handshake.
pub fn tls_cert_demand(params: &Value) -> Demand {
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: None,
        probes: 1,
        rate: None,
        redirects: false,
    }
}

pub fn tls_cert_check(params: &Value) -> Result<(), ParamError> {
    let p: TlsCertParams = crate::params::parse(params)?;
    let host = p.host.trim_start_matches('[').trim_end_matches(']');
    check_server_name("/host", host)?;
    if let Some(name) = &p.server_name {
        check_server_name("/server_name", name)?;
    }
    if let Some(pem) = &p.ca_pem {
        check_ca_pem(pem)?;
    }
    Ok(())
}

impl Summary for HttpResult {
    fn summary(&self) -> String {
        let r = self;
        let redirects = match r.redirects.len() {
            0 => String::new(),
            n => format!(" after {n} redirect{}", if n == 1 { "" } else { "s" }),
        };
        match (&r.response, &r.error) {
            (_, Some(e)) => format!("{} {}: {e}{redirects}", r.method.as_str(), r.url),
            (Some(resp), None) => format!(
                "{} {}: {} {}, {} bytes, {:.3} ms{redirects}",
                r.method.as_str(),
                r.url,
                resp.status,
                resp.http_version,
                resp.body_bytes,
                r.timing.total_ms
            ),
            (None, None) => format!("{} {}: no response{redirects}", r.method.as_str(), r.url),
        }
    }
}

impl Summary for TlsCertResult {
    fn summary(&self) -> String {
        let r = self;
        let target = format!("{}:{}", r.host, r.port);
        if let Some(e) = &r.error {
            return format!("{target}: {e}");
        }
        let leaf = r.tls.chain.first();
        let subject = leaf
            .and_then(|c| c.subject_cn.clone())
            .or_else(|| leaf.map(|c| c.subject.clone()))
            .unwrap_or_else(|| "no certificate".to_string());
        let until = leaf.map_or(String::new(), |c| format!(", valid until {}", c.not_after));
        let verified = match &r.tls.verify_error {
            Some(e) => format!(", not verified: {e}"),
            None => String::new(),
        };
        format!(
            "{target} {} {subject}{until}{verified}",
            r.tls.version.as_deref().unwrap_or("TLS")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("https://[::1]:8443/a?b#c").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "::1", 8443, "/a?b")
        );
        assert_eq!(u.authority("::1"), "[::1]:8443");
        let u = parse_url("HTTP://Example.org?q").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/?q"));
        assert_eq!(u.authority("example.org"), "example.org");
        for bad in [
            "http://",
            "http://a:99999/",
            "http://[::1/",
            "http://[zz]/",
            "http://a b/",
            "http://a/ b",
            "https://a:/",
            "gopher://a/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locations() {
        let base = parse_url("https://h:8443/a/b?q").unwrap();
        let cases = [
            ("http://x/y", "http://x/y"),
            ("//x/y", "https://x/y"),
            ("/c", "https://h:8443/c"),
            ("c?d", "https://h:8443/a/c?d"),
            ("?z", "https://h:8443/a/b?z"),
        ];
        for (loc, want) in cases {
            assert_eq!(resolve_location(&base, loc), want, "{loc}");
        }
    }

    #[test]
    fn header_rules() {
        assert!(check_header("X-Probe", "v a l\tue").is_ok());
        assert!(check_header("HOST", "x").is_err());
        assert!(check_header("x:y", "x").is_err());
        assert!(check_header("x", "a\nb").is_err());
    }

    #[test]
    fn results_round_trip_postcard_and_json() {
        let cert = CertInfo {
            subject: "CN=leaf".into(),
            issuer: "CN=ca".into(),
            subject_cn: Some("leaf".into()),
            issuer_cn: None,
            serial: "01:02".into(),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: "2027-01-01T00:00:00Z".into(),
            not_before_unix: 1_767_225_600,
            not_after_unix: 1_798_761_600,
            dns_names: vec!["localhost".into()],
            ip_addrs: vec!["127.0.0.1".into()],
            is_ca: false,
            sha256: "AB:CD".into(),
            key_algorithm: "EC P-256".into(),
            key_bits: Some(256),
            signature_algorithm: "ecdsa-with-SHA256".into(),
            pem: Some("-----BEGIN CERTIFICATE-----\n".into()),
            parse_error: None,
        };
        let tls = TlsInfo {
            server_name: Some("localhost".into()),
            version: Some("TLSv1.3".into()),
            cipher: Some("TLS_AES_128_GCM_SHA256".into()),
            cipher_code: Some(0x1301),
            kx_group: Some("X25519".into()),
            alpn: Some("h2".into()),
            chain: vec![cert],
            verify_error: Some("UnknownIssuer".into()),
            trust_anchors: 140,
        };
        let r = HttpResult {
            url: "https://localhost/".into(),
            method: HttpMethod::Head,
            addr: Some("127.0.0.1".into()),
            af: Some(4),
            local_addr: Some("127.0.0.1:5555".into()),
            timing: HttpTiming {
                dns_ms: Some(0.01),
                connect_ms: Some(0.1),
                tls_ms: Some(1.0),
                ttfb_ms: Some(2.0),
                total_ms: 2.5,
            },
            response: Some(Box::new(HttpResponse {
                http_version: "HTTP/2".into(),
                status: 302,
                reason: Some("Found".into()),
                headers: vec![HttpHeader {
                    name: "location".into(),
                    value: "/x".into(),
                }],
                headers_truncated: false,
                header_bytes: 40,
                content_length: Some(0),
                body_bytes: 0,
                body_truncated: false,
                body_preview: None,
                location: Some("/x".into()),
            })),
            tls: Some(Box::new(tls.clone())),
            error: None,
            error_phase: Some(HttpPhase::Body),
            redirects: vec![HttpRedirect {
                url: "https://localhost/a".into(),
                addr: None,
                status: 301,
                location: "/".into(),
                ttfb_ms: Some(1.0),
            }],
        };
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<HttpResult>(&bytes).unwrap(), r);
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<HttpResult>(&j).unwrap(), r);
        assert!(j.contains(r#""method":"HEAD""#) && j.contains(r#""error_phase":"body""#));

        let t = TlsCertResult {
            host: "localhost".into(),
            port: 443,
            addr: Some("::1".into()),
            af: Some(6),
            local_addr: None,
            dns_ms: Some(0.0),
            connect_ms: Some(0.1),
            handshake_ms: None,
            tls: Box::new(tls),
            error: Some("TLS handshake failed: alert".into()),
            error_phase: Some(HttpPhase::Tls),
            alert: Some(40),
        };
        let bytes = postcard::to_stdvec(&t).unwrap();
        assert_eq!(postcard::from_bytes::<TlsCertResult>(&bytes).unwrap(), t);
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<TlsCertResult>(&j).unwrap(), t);
    }
}
