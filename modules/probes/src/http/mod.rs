//! Runs `http` and `tls_cert`: our own name resolution, TCP connect and rustls
//! handshake, then hyper's client connection (HTTP/1.1 or HTTP/2) on that stream, so each
//! phase has its own clock reading. Failures after the parameters are checked are
//! results with `error` and the phase, carrying whatever was measured up to then (a
//! certificate error keeps the chain).
//!
//! Every address is checked against the run's policy right before it is connected to
//! (`connect_any`, the only place either module connects): the asked host's, the
//! `resolve` parameter's, and each redirect's after its name is resolved. A refusal is
//! no result: the run ends with `Err("policy_denied: …")`.

mod cert;
mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::Context;
use imn_proto::kinds::http::{
    check_header, parse_url, resolve_location, HttpHeader, HttpParams, HttpPhase, HttpRedirect,
    HttpResponse, HttpResult, HttpTiming, HttpVersionPref, TlsCertParams, TlsCertResult, TlsInfo,
    TlsVersionPref, Url,
};

/// Most response headers reported.
const HEADERS_MAX: usize = 100;
/// Longest response header value reported, in bytes.
const HEADER_VALUE_MAX: usize = 1024;
/// Body bytes kept as a preview.
const PREVIEW_BYTES: usize = 256;
/// Most bytes of `max_body_bytes` honoured, whatever the parameters say.
const BODY_MAX: u64 = imn_proto::kinds::http::BODY_MAX_BYTES as u64;

/// A failure: where, and what.
type Failure = (HttpPhase, String);

/// Why a request stopped.
enum Stop {
    /// A failure the result reports.
    Failed(Failure),
    /// The policy refused an address (`policy_denied: …`): nothing was sent to it, and
    /// the run ends with this error.
    Denied(String),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Failed(f)
    }
}

/// What the stream under hyper needs to be.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub async fn run(p: HttpParams, ctx: &Context) -> Result<HttpResult, String> {
    let url = parse_url(&p.url).map_err(|e| format!("url: {e}"))?;
    for (name, value) in &p.headers {
        check_header(name, value).map_err(|e| format!("headers/{name}: {e}"))?;
    }
    if let Some(name) = &p.server_name {
        tls::server_name(name)?;
    }
    let forced = match &p.resolve {
        Some(a) => Some(
            a.parse::<IpAddr>()
                .map_err(|_| format!("resolve: {a:?} is not an IP address"))?,
        ),
        None => None,
    };
    // Read before the clock starts: loading the system bundle is not the server's time.
    let roots = if url.tls || p.follow_redirects {
        Some(tls::trust_anchors(p.ca_pem.as_deref())?)
    } else {
        None
    };
    let start = Instant::now();
    let clock = Clock {
        start,
        deadline: start + Duration::from_millis(p.timeout_ms),
        timeout_ms: p.timeout_ms,
    };
    let mut redirects = Vec::new();
    let (mut current, mut current_url) = (url.clone(), p.url.clone());
    loop {
        let mut r = HttpResult {
            url: current_url.clone(),
            method: p.method,
            addr: None,
            af: None,
            local_addr: None,
            timing: HttpTiming::default(),
            response: None,
            tls: None,
            error: None,
            error_phase: None,
            redirects: Vec::new(),
        };
        // resolve and server_name are about the asked host; a redirect elsewhere goes
        // where the name leads.
        let same = current.host == url.host && current.port == url.port && current.tls == url.tls;
        let (forced, name) = if same {
            (forced, p.server_name.as_deref())
        } else {
            (None, None)
        };
        let roots = roots.clone().filter(|_| current.tls);
        match request(ctx, &p, &current, forced, name, roots, &clock, &mut r).await {
            Ok(()) => {}
            Err(Stop::Failed((phase, msg))) => {
                r.error = Some(msg);
                r.error_phase = Some(phase);
            }
            Err(Stop::Denied(e)) if redirects.is_empty() => return Err(e),
            // Each redirect's host is resolved and checked like the first one.
            Err(Stop::Denied(e)) => {
                return Err(format!(
                    "{e}, at redirect {} (to {current_url})",
                    redirects.len()
                ))
            }
        }
        r.timing.total_ms = clock.ms();
        let next = match (&r.response, &r.error) {
            (Some(resp), None) if p.follow_redirects => resp.location.clone(),
            _ => None,
        };
        if let Some(location) = next {
            if redirects.len() >= usize::from(p.max_redirects) {
                r.error = Some(format!("more than {} redirects", p.max_redirects));
                r.error_phase = Some(HttpPhase::Response);
            } else {
                let target = resolve_location(&current, &location);
                match parse_url(&target) {
                    Ok(u) => {
                        redirects.push(HttpRedirect {
                            url: current_url,
                            addr: r.addr,
                            status: r.response.as_ref().map_or(0, |x| x.status),
                            location,
                            ttfb_ms: r.timing.ttfb_ms,
                        });
                        (current, current_url) = (u, target);
                        continue;
                    }
                    Err(e) => {
                        r.error = Some(format!("redirect to {location:?}: {e}"));
                        r.error_phase = Some(HttpPhase::Response);
                    }
                }
            }
        }
        r.redirects = redirects;
        return Ok(r);
    }
}

/// The run's start and its deadline.
struct Clock {
    start: Instant,
    deadline: Instant,
    timeout_ms: u64,
}

impl Clock {
    /// ms since the start.
    fn ms(&self) -> f64 {
        self.start.elapsed().as_nanos().max(1) as f64 / 1e6
    }

    /// Runs one phase within the run's deadline.
    async fn phase<T>(
        &self,
        phase: HttpPhase,
        fut: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout_at(self.deadline, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err((phase, e)),
            Err(_) => Err((
                phase,
                format!(
                    "timed out after {} ms during {}",
                    self.timeout_ms,
                    phase_words(phase)
                ),
            )),
        }
    }
}

fn phase_words(p: HttpPhase) -> &'static str {
    match p {
        HttpPhase::Dns => "name resolution",
        HttpPhase::Connect => "the TCP connect",
        HttpPhase::Tls => "the TLS handshake",
        HttpPhase::Response => "the wait for the response head",
        HttpPhase::Body => "the body",
    }
}

/// The host's addresses of the wanted family, in the resolver's order.
async fn addresses(host: &str, family: Option<u8>) -> Result<Vec<IpAddr>, String> {
    let all = imn_resolver::lookup(host).await?;
    let found: Vec<IpAddr> = all
        .into_iter()
        .filter(|ip| match family {
            Some(4) => ip.is_ipv4(),
            Some(6) => ip.is_ipv6(),
            _ => true,
        })
        .collect();
    if found.is_empty() {
        return Err(match family {
            Some(f) => format!("{host:?} has no IPv{f} address"),
            None => format!("{host:?} has no address"),
        });
    }
    Ok(found)
}

/// Connects to each address of `host` in turn until one answers: the only way http
/// and tls_cert open a connection. Each address is checked against the run's policy
/// right before its connect; a refused one ends the run (the addresses after it are not
/// tried). Returns the stream, or the last error; `tried` is the last address tried
/// either way.
async fn connect_any(
    ctx: &Context,
    host: &str,
    addrs: &[IpAddr],
    port: u16,
    tried: &mut Option<IpAddr>,
) -> Result<TcpStream, Stop> {
    let mut last = String::from("no address to connect to");
    for ip in addrs {
        ctx.permit(host, *ip).map_err(Stop::Denied)?;
        *tried = Some(*ip);
        let sa = SocketAddr::new(*ip, port);
        let sock = match ip {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| (HttpPhase::Connect, format!("socket: {e}")))?;
        match sock.connect(sa).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connect to {sa}: {e}"),
        }
    }
    Err(Stop::Failed((HttpPhase::Connect, last)))
}

fn af(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// Aborts a spawned task when dropped: hyper's connection task ends with the request.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request to `url`: to `forced` if given, verifying `server_name` if given.
#[allow(clippy::too_many_arguments)]
async fn request(
    ctx: &Context,
    p: &HttpParams,
    url: &Url,
    forced: Option<IpAddr>,
    server_name: Option<&str>,
    roots: Option<rustls::RootCertStore>,
    clock: &Clock,
    r: &mut HttpResult,
) -> Result<(), Stop> {
    let addrs = match forced {
        Some(ip) => vec![ip],
        None => {
            clock
                .phase(HttpPhase::Dns, addresses(&url.host, p.family))
                .await?
        }
    };
    r.timing.dns_ms = Some(clock.ms());

    let mut tried = None;
    let tcp = clock
        .phase(HttpPhase::Connect, async {
            Ok(connect_any(ctx, &url.host, &addrs, url.port, &mut tried).await)
        })
        .await;
    r.addr = tried.map(|ip| ip.to_string());
    r.af = tried.map(af);
    // The deadline, then the connect itself (or the policy's refusal).
    let tcp = tcp??;
    r.timing.connect_ms = Some(clock.ms());
    r.local_addr = tcp.local_addr().ok().map(|a| a.to_string());

    let name = server_name.unwrap_or(&url.host);
    let (io, alpn): (Box<dyn Io>, Option<String>) = match roots {
        None => (Box::new(tcp), None),
        Some(roots) => {
            let alpn = match p.version {
                HttpVersionPref::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                HttpVersionPref::Http11 => vec![b"http/1.1".to_vec()],
                HttpVersionPref::Http2 => vec![b"h2".to_vec()],
            };
            let versions = rustls::DEFAULT_VERSIONS;
            let hs = handshake(tcp, roots, p.insecure, versions, alpn, name, clock, false).await;
            let alpn = hs.info.alpn.clone();
            r.tls = Some(Box::new(hs.info));
            let stream = hs.stream?;
            r.timing.tls_ms = Some(clock.ms());
            (Box::new(stream), alpn)
        }
    };

    let h2 = match p.version {
        HttpVersionPref::Http2 => true,
        HttpVersionPref::Http11 => false,
        HttpVersionPref::Auto => alpn.as_deref() == Some("h2"),
    };
    let authority = url.authority(name);
    let mut b = Request::builder().method(p.method.as_str());
    if h2 {
        let scheme = if url.tls { "https" } else { "http" };
        b = b
            .uri(format!("{scheme}://{authority}{}", url.path))
            .version(hyper::Version::HTTP_2);
    } else {
        b = b.uri(url.path.as_str()).header("host", authority.as_str());
    }
    let has = |n: &str| p.headers.keys().any(|k| k.eq_ignore_ascii_case(n));
    if !has("user-agent") {
        b = b.header(
            "user-agent",
            concat!("imn-agent/", env!("CARGO_PKG_VERSION")),
        );
    }
    if !has("accept") {
        b = b.header("accept", "*/*");
    }
    for (n, v) in &p.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    let req = b
        .body(Empty::<Bytes>::new())
        .map_err(|e| (HttpPhase::Response, format!("request: {e}")))?;

    let io = TokioIo::new(io);
    let (resp, _conn) = clock
        .phase(HttpPhase::Response, async {
            if h2 {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                let task = AbortOnDrop(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("HTTP/2 request: {}", error_chain(&e)))?;
                Ok((resp, task))
            } else {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                let task = AbortOnDrop(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("HTTP/1.1 request: {}", error_chain(&e)))?;
                Ok((resp, task))
            }
        })
        .await?;
    r.timing.ttfb_ms = Some(clock.ms());
    let head = r.response.insert(Box::new(describe_head(&resp)));

    let limit = u64::from(p.max_body_bytes).min(BODY_MAX);
    let mut body = resp.into_body();
    let mut preview = Vec::new();
    let read = clock
        .phase(HttpPhase::Body, async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("body: {}", error_chain(&e)))?;
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                let room = limit - head.body_bytes;
                let take = (data.len() as u64).min(room);
                let keep = PREVIEW_BYTES
                    .saturating_sub(preview.len())
                    .min(take as usize);
                preview.extend_from_slice(&data[..keep]);
                head.body_bytes += take;
                if (data.len() as u64) > room {
                    head.body_truncated = true;
                    break;
                }
            }
            Ok(())
        })
        .await;
    // What was read before a failure is reported too.
    if !preview.is_empty() {
        head.body_preview = Some(String::from_utf8_lossy(&preview).into_owned());
    }
    read.map_err(Stop::from)
}

/// Status, version, headers and their size, Location and Content-Length.
fn describe_head(resp: &hyper::Response<hyper::body::Incoming>) -> HttpResponse {
    let status = resp.status();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|rp| String::from_utf8_lossy(rp.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_string));
    let mut r = HttpResponse {
        http_version: match resp.version() {
            hyper::Version::HTTP_2 => "HTTP/2",
            hyper::Version::HTTP_10 => "HTTP/1.0",
            hyper::Version::HTTP_11 => "HTTP/1.1",
            _ => "HTTP/?",
        }
        .to_string(),
        status: status.as_u16(),
        header_bytes: 0,
        headers: Vec::new(),
        headers_truncated: false,
        content_length: resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok()),
        body_bytes: 0,
        body_truncated: false,
        body_preview: None,
        location: None,
        reason,
    };
    // "HTTP/1.1 200 OK\r\n", the headers, "\r\n".
    let mut size = 9 + 4 + r.reason.as_deref().map_or(0, str::len) + 2 + 2;
    for (name, value) in resp.headers() {
        size += name.as_str().len() + 2 + value.len() + 2;
        if r.headers.len() >= HEADERS_MAX {
            r.headers_truncated = true;
            continue;
        }
        let bytes = value.as_bytes();
        if bytes.len() > HEADER_VALUE_MAX {
            r.headers_truncated = true;
        }
        r.headers.push(HttpHeader {
            name: name.as_str().to_string(),
            value: String::from_utf8_lossy(&bytes[..bytes.len().min(HEADER_VALUE_MAX)])
                .into_owned(),
        });
    }
    r.header_bytes = u32::try_from(size).unwrap_or(u32::MAX);
    if status.is_redirection() {
        r.location = resp
            .headers()
            .get(hyper::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    r
}

/// An error and its sources, joined: hyper's own messages are terse.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// How a handshake went.
struct Handshake {
    stream: Result<tokio_rustls::client::TlsStream<TcpStream>, Failure>,
    /// What was negotiated and the chain presented, as far as the handshake got.
    info: TlsInfo,
    /// The alert the server ended the handshake with, if any.
    alert: Option<u8>,
}

/// A TLS handshake over `tcp`, verified against `roots` and `name`. The returned
/// `TlsInfo` holds what was negotiated and the chain the server presented, whether or
/// not the handshake completed; the certificates carry PEM with `pem`.
#[allow(clippy::too_many_arguments)]
async fn handshake(
    tcp: TcpStream,
    roots: rustls::RootCertStore,
    insecure: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: Vec<Vec<u8>>,
    name: &str,
    clock: &Clock,
    pem: bool,
) -> Handshake {
    let mut info = TlsInfo {
        trust_anchors: u32::try_from(roots.len()).unwrap_or(u32::MAX),
        ..TlsInfo::default()
    };
    let server_name = match tls::server_name(name) {
        Ok(n) => n,
        Err(e) => return failed(e, info),
    };
    if let rustls::pki_types::ServerName::DnsName(d) = &server_name {
        info.server_name = Some(d.as_ref().to_string());
    }
    let verifier = match tls::RecordingVerifier::new(roots, insecure) {
        Ok(v) => Arc::new(v),
        Err(e) => return failed(e, info),
    };
    let config = match tls::client_config(verifier.clone(), versions, alpn) {
        Ok(c) => c,
        Err(e) => return failed(e, info),
    };
    let connector = TlsConnector::from(config);
    let mut alert = None;
    let out = clock
        .phase(HttpPhase::Tls, async {
            connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| match tls::rustls_error(&e) {
                    Some(rustls::Error::AlertReceived(a)) => {
                        alert = Some(u8::from(*a));
                        format!("TLS handshake failed: server sent alert {a:?}")
                    }
                    Some(rustls::Error::InvalidCertificate(c)) => {
                        format!("certificate verify failed: {c}")
                    }
                    Some(other) => format!("TLS handshake failed: {other}"),
                    None => format!("TLS handshake failed: {e}"),
                })
        })
        .await;
    tls::record_chain(&verifier, &mut info, pem);
    if let Ok(stream) = &out {
        tls::negotiated(stream.get_ref().1, &mut info);
    }
    Handshake {
        stream: out,
        info,
        alert,
    }
}

fn failed(e: String, info: TlsInfo) -> Handshake {
    Handshake {
        stream: Err((HttpPhase::Tls, e)),
        info,
        alert: None,
    }
}

pub async fn run_tls_cert(p: TlsCertParams, ctx: &Context) -> Result<TlsCertResult, String> {
    let host = p
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = p.server_name.clone().unwrap_or_else(|| host.clone());
    tls::server_name(&name)?;
    let roots = tls::trust_anchors(p.ca_pem.as_deref())?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match p.version {
        TlsVersionPref::Auto => rustls::DEFAULT_VERSIONS,
        TlsVersionPref::Tls12 => &[&rustls::version::TLS12],
        TlsVersionPref::Tls13 => &[&rustls::version::TLS13],
    };
    let alpn = p.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let start = Instant::now();
    let clock = Clock {
        start,
        deadline: start + Duration::from_millis(p.timeout_ms),
        timeout_ms: p.timeout_ms,
    };
    let mut r = TlsCertResult {
        host: host.clone(),
        port: p.port,
        addr: None,
        af: None,
        local_addr: None,
        dns_ms: None,
        connect_ms: None,
        handshake_ms: None,
        tls: Box::default(),
        error: None,
        error_phase: None,
        alert: None,
    };
    let outcome: Result<(), Stop> = async {
        let addrs = clock
            .phase(HttpPhase::Dns, addresses(&host, p.family))
            .await?;
        r.dns_ms = Some(clock.ms());
        let mut tried = None;
        let t0 = Instant::now();
        let tcp = clock
            .phase(HttpPhase::Connect, async {
                Ok(connect_any(ctx, &host, &addrs, p.port, &mut tried).await)
            })
            .await;
        r.addr = tried.map(|ip| ip.to_string());
        r.af = tried.map(af);
        let tcp = tcp??;
        r.connect_ms = Some(ms_since(t0));
        r.local_addr = tcp.local_addr().ok().map(|a| a.to_string());
        // The point is the chain: complete the handshake whatever it is, and report
        // whether it verified.
        let t1 = Instant::now();
        let hs = handshake(tcp, roots, true, versions, alpn, &name, &clock, true).await;
        *r.tls = hs.info;
        r.alert = hs.alert;
        let mut stream = hs.stream?;
        r.handshake_ms = Some(ms_since(t1));
        // A polite close_notify; the server's answer does not matter.
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.shutdown()).await;
        Ok(())
    }
    .await;
    match outcome {
        Ok(()) => {}
        Err(Stop::Failed((phase, msg))) => {
            r.error = Some(msg);
            r.error_phase = Some(phase);
        }
        Err(Stop::Denied(e)) => return Err(e),
    }
    Ok(r)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_nanos().max(1) as f64 / 1e6
}
