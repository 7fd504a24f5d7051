//! Runs the `dns` module: builds the query, sends it over UDP (a connected socket,
//! answers that are not ours ignored) or TCP (two-byte length prefix), times it with the
//! monotonic clock from send to receive, and parses the whole answer.
//!
//! Failures after the query has left (no answer, the network refused it, an answer that
//! is not a DNS message) are results with an `error`, as Atlas reports them; only what
//! stops the query from being sent at all is an `Err`.

mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

use super::Context;
use imn_proto::kinds::dns::{
    class_code, class_name, parse_server, query_name, type_code, type_name, DnsError, DnsErrorKind,
    DnsParams, DnsProtocol, DnsReply, DnsResult, ServerSource, ServerSpec,
};
use imn_resolver::wire::Query;

pub async fn run(p: DnsParams, ctx: &Context) -> Result<DnsResult, String> {
    let qtype = type_code(&p.qtype).ok_or_else(|| format!("unknown record type {:?}", p.qtype))?;
    let qclass = class_code(&p.class).ok_or_else(|| format!("unknown class {:?}", p.class))?;
    let name =
        query_name(&p.name, qtype == 12).map_err(|e| format!("invalid name {:?}: {e}", p.name))?;
    if p.edns_size > 0 && p.edns_size < 512 {
        return Err("edns_size is 0 (no EDNS) or at least 512".into());
    }
    if p.edns_size == 0 && (p.dnssec_ok || p.nsid) {
        return Err("do and nsid need EDNS: set edns_size > 0".into());
    }
    let (server, source) = server(&p, ctx).await?;
    let q = Query {
        name,
        qtype,
        qclass,
        rd: p.rd,
        cd: p.cd,
        dnssec_ok: p.dnssec_ok,
        edns_size: p.edns_size,
        nsid: p.nsid,
    };
    let timeout = Duration::from_millis(p.timeout_ms);
    let tries = p.retries.saturating_add(1);
    let mut ex = exchange(p.protocol, server, &q, timeout, tries).await?;
    let mut protocol = p.protocol;
    let mut tcp_after_truncation = false;
    if protocol == DnsProtocol::Udp && p.use_tcp_on_truncation {
        if let Outcome::Answer { buf, .. } = &ex.outcome {
            // The TC bit: byte 2, bit 1.
            if buf.len() >= 12 && buf[2] & 0x02 != 0 {
                ex = exchange(DnsProtocol::Tcp, server, &q, timeout, tries).await?;
                protocol = DnsProtocol::Tcp;
                tcp_after_truncation = true;
            }
        }
    }
    let mut r = DnsResult {
        server: server.ip().to_string(),
        port: server.port(),
        server_source: source,
        src_addr: ex.src.map(|a| a.ip().to_string()),
        protocol,
        tcp_after_truncation,
        qname: wire::name_text(&q.name),
        qtype: type_name(qtype),
        qclass: class_name(qclass),
        qbuf: wire::base64(&ex.qbuf),
        attempts: ex.attempts,
        timeout_ms: u32::try_from(p.timeout_ms).unwrap_or(u32::MAX),
        error: None,
        reply: None,
    };
    match ex.outcome {
        Outcome::Answer { buf, rt } => {
            let message = match wire::parse_message(&buf) {
                Ok(m) => Some(m),
                Err(e) => {
                    r.error = Some(DnsError {
                        kind: DnsErrorKind::Malformed,
                        message: format!("malformed answer from {server}: {e}"),
                    });
                    None
                }
            };
            r.reply = Some(Box::new(DnsReply {
                rt_ms: ms(rt),
                tcp_connect_ms: ex.connect.map(ms),
                size: buf.len() as u32,
                abuf: wire::base64(&buf),
                message,
            }));
        }
        Outcome::Timeout => {
            r.error = Some(DnsError {
                kind: DnsErrorKind::Timeout,
                message: format!(
                    "no answer from {server} over {} within {} ms ({} attempt{})",
                    proto_name(protocol),
                    p.timeout_ms,
                    ex.attempts,
                    if ex.attempts == 1 { "" } else { "s" }
                ),
            })
        }
        Outcome::Network(e) => {
            r.error = Some(DnsError {
                kind: DnsErrorKind::Network,
                message: format!("{server} over {}: {e}", proto_name(protocol)),
            })
        }
    }
    Ok(r)
}

/// The one address every attempt of the run goes to (the TCP retry after a truncated
/// answer too), and where it came from. A `server` the parameters give is a target
/// like any other: its address (a name's, after the agent resolved it) must pass the
/// policy. The agent's own name servers (no `server`) are the device's infrastructure,
/// which it queries for its own lookups anyway: not checked.
async fn server(p: &DnsParams, ctx: &Context) -> Result<(SocketAddr, ServerSource), String> {
    let Some(s) = &p.server else {
        let rc = imn_resolver::ResolvConf::load();
        let first = rc.nameservers.first().copied().ok_or(
            "no server given and no system name server (none in /etc/resolv.conf or the config)",
        )?;
        return Ok((first, ServerSource::System));
    };
    let addr = match parse_server(s).map_err(|e| format!("server: {e}"))? {
        ServerSpec::Addr(a) => {
            ctx.permit("", a.ip())?;
            a
        }
        ServerSpec::Name(host, port) => {
            SocketAddr::new(super::resolve_permitted(ctx, &host).await?, port)
        }
    };
    Ok((addr, ServerSource::Params))
}

fn proto_name(p: DnsProtocol) -> &'static str {
    match p {
        DnsProtocol::Udp => "UDP",
        DnsProtocol::Tcp => "TCP",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_nanos().max(1) as f64 / 1e6
}

enum Outcome {
    Answer { buf: Vec<u8>, rt: Duration },
    Timeout,
    Network(String),
}

/// The last attempt of an exchange.
struct Exchange {
    qbuf: Vec<u8>,
    attempts: u32,
    src: Option<SocketAddr>,
    connect: Option<Duration>,
    outcome: Outcome,
}

/// Up to `tries` attempts, each with a fresh socket and id, until one gets an answer.
async fn exchange(
    proto: DnsProtocol,
    server: SocketAddr,
    q: &Query,
    timeout: Duration,
    tries: u32,
) -> Result<Exchange, String> {
    let mut ex = None;
    for attempt in 1..=tries {
        let id = imn_resolver::rand_id();
        let msg = q.encode(id);
        let mut e = match proto {
            DnsProtocol::Udp => udp(server, q, id, msg, timeout).await?,
            DnsProtocol::Tcp => tcp(server, q, id, msg, timeout).await?,
        };
        e.attempts = attempt;
        let done = matches!(e.outcome, Outcome::Answer { .. });
        ex = Some(e);
        if done {
            break;
        }
    }
    ex.ok_or_else(|| "no attempt made".into())
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// One UDP attempt. Datagrams that do not answer this query are ignored.
async fn udp(
    server: SocketAddr,
    q: &Query,
    id: u16,
    msg: Vec<u8>,
    timeout: Duration,
) -> Result<Exchange, String> {
    let sock = UdpSocket::bind(unspecified(server))
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    sock.connect(server)
        .await
        .map_err(|e| format!("UDP connect to {server}: {e}"))?;
    let src = sock.local_addr().ok();
    let mut ex = Exchange {
        qbuf: msg,
        attempts: 1,
        src,
        connect: None,
        outcome: Outcome::Timeout,
    };
    let mut buf = vec![0u8; 65535];
    let t0 = Instant::now();
    if let Err(e) = sock.send(&ex.qbuf).await {
        ex.outcome = Outcome::Network(format!("send: {e}"));
        return Ok(ex);
    }
    let deadline = tokio::time::Instant::from_std(t0 + timeout);
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => break,
            Ok(Err(e)) => {
                ex.outcome = Outcome::Network(describe(&e));
                break;
            }
            Ok(Ok(n)) => {
                let rt = t0.elapsed();
                let got = &buf[..n];
                if q.is_answer(got, id) {
                    ex.outcome = Outcome::Answer {
                        buf: got.to_vec(),
                        rt,
                    };
                    break;
                }
            }
        }
    }
    Ok(ex)
}

/// One TCP attempt: connect, send, and read messages until the one answering ours;
/// all within `timeout`.
async fn tcp(
    server: SocketAddr,
    q: &Query,
    id: u16,
    msg: Vec<u8>,
    timeout: Duration,
) -> Result<Exchange, String> {
    let sock = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("TCP socket: {e}"))?;
    let mut ex = Exchange {
        qbuf: msg,
        attempts: 1,
        src: None,
        connect: None,
        outcome: Outcome::Timeout,
    };
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let mut stream = match tokio::time::timeout_at(deadline, sock.connect(server)).await {
        Err(_) => return Ok(ex),
        Ok(Err(e)) => {
            ex.outcome = Outcome::Network(format!("connect: {}", describe(&e)));
            return Ok(ex);
        }
        Ok(Ok(s)) => s,
    };
    ex.connect = Some(start.elapsed());
    ex.src = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let mut framed = Vec::with_capacity(ex.qbuf.len() + 2);
    framed.extend_from_slice(&(ex.qbuf.len() as u16).to_be_bytes());
    framed.extend_from_slice(&ex.qbuf);
    let t0 = Instant::now();
    let read = async {
        stream.write_all(&framed).await?;
        loop {
            let len = usize::from(stream.read_u16().await?);
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await?;
            let rt = t0.elapsed();
            // A message that does not answer ours (another id) is skipped; a short
            // one with our id is taken, and reported malformed.
            if q.is_answer(&buf, id) {
                return Ok::<_, io::Error>((buf, rt));
            }
        }
    };
    ex.outcome = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Outcome::Network("the server closed the connection without an answer".into())
        }
        Ok(Err(e)) => Outcome::Network(describe(&e)),
        Ok(Ok((buf, rt))) => Outcome::Answer { buf, rt },
    };
    Ok(ex)
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => format!("refused (port unreachable or reset): {e}"),
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => format!("unreachable: {e}"),
        _ => e.to_string(),
    }
}
