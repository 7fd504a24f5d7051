//! `http` and `tls_cert` against real servers on loopback: an HTTPS server (hyper, HTTP/1.1
//! and h2 by ALPN, rustls) presenting a leaf and an intermediate from a CA generated
//! here, and a plain HTTP server (HTTP/1.1, and h2c with prior knowledge). Every run
//! goes through the agent's dispatcher, from JSON parameters.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use imn_probes::{run, Context};
use imn_proto::kinds::http::{HttpMethod, HttpPhase, HttpResponse, HttpResult, TlsCertResult};
use imn_proto::results::ModuleOutput;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A root CA, an intermediate it signed, and a leaf for `localhost` and 127.0.0.1 the
/// intermediate signed.
struct Pki {
    root_pem: String,
    inter_der: CertificateDer<'static>,
    inter_pem: String,
    leaf_der: CertificateDer<'static>,
    leaf_pem: String,
    leaf_key: Vec<u8>,
}

fn pki() -> Pki {
    let ca = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name
            .push(DnType::OrganizationName, "IMN tests");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root = ca("IMN Test Root").self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate().unwrap();
    let inter = ca("IMN Test Intermediate")
        .signed_by(&inter_key, &root, &root_key)
        .unwrap();
    let mut lp =
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]).unwrap();
    lp.distinguished_name = rcgen::DistinguishedName::new();
    lp.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = lp.signed_by(&leaf_key, &inter, &inter_key).unwrap();
    Pki {
        root_pem: root.pem(),
        inter_der: inter.der().clone(),
        inter_pem: inter.pem(),
        leaf_der: leaf.der().clone(),
        leaf_pem: leaf.pem(),
        leaf_key: leaf_key.serialize_der(),
    }
}

/// The test server's pages.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let version = format!("{:?}", req.version());
    let mut b = Response::builder()
        .header("x-version", version)
        .header("x-method", req.method().as_str())
        .header(
            "x-probe-echo",
            req.headers()
                .get("x-probe")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default(),
        );
    if req.method() == hyper::Method::OPTIONS {
        b = b.status(204).header("allow", "GET, HEAD, OPTIONS");
        return Ok(b.body(Full::new(Bytes::new())).unwrap());
    }
    // hyper's h2 server would send a HEAD response's body (a protocol error the client
    // reports); real servers send none.
    let hello: &'static [u8] = if req.method() == hyper::Method::HEAD {
        b""
    } else {
        b"hello"
    };
    let resp = match req.uri().path() {
        "/" => b
            .header("x-test", "yes")
            .header("content-length", "5")
            .body(Full::new(Bytes::from_static(hello))),
        "/big" => b.body(Full::new(Bytes::from(vec![b'a'; 10_000]))),
        "/redirect" => b
            .status(302)
            .header("location", "/target")
            .body(Full::new(Bytes::new())),
        "/target" => b.body(Full::new(Bytes::from_static(b"arrived"))),
        "/loop" => b
            .status(301)
            .header("location", "loop")
            .body(Full::new(Bytes::new())),
        "/away" => b
            .status(307)
            .header("location", "https://[::1]:1/")
            .body(Full::new(Bytes::new())),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            b.body(Full::new(Bytes::from_static(b"late")))
        }
        _ => b.status(404).body(Full::new(Bytes::new())),
    };
    Ok(resp.unwrap())
}

/// Serves `handle` over HTTPS (h2 and http/1.1 by ALPN) on a free port of 127.0.0.1.
async fn https_server(pki: &Pki) -> SocketAddr {
    https_server_on(pki, "127.0.0.1:0").await
}

/// Serves `handle` over HTTPS on a free port of `bind`.
async fn https_server_on(pki: &Pki, bind: &str) -> SocketAddr {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone()));
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![pki.leaf_der.clone(), pki.inter_der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses our certificate ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(handle))
                    .await;
            });
        }
    });
    addr
}

/// Serves `handle` in plain text: HTTP/1.1, or h2c when the client starts with the
/// HTTP/2 preface.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle))
                    .await;
            });
        }
    });
    addr
}

async fn http(params: Value) -> HttpResult {
    match run("http", &params.to_string(), &Context::default()).await {
        Ok(ModuleOutput::Http(r)) => *r,
        other => panic!("{params}: {other:?}"),
    }
}

async fn tls_cert(params: Value) -> TlsCertResult {
    match run("tls_cert", &params.to_string(), &Context::default()).await {
        Ok(ModuleOutput::TlsCert(r)) => *r,
        other => panic!("{params}: {other:?}"),
    }
}

/// The response part of a result that has one.
fn resp(r: &HttpResult) -> &HttpResponse {
    r.response
        .as_deref()
        .unwrap_or_else(|| panic!("no response: {r:?}"))
}

fn status(r: &HttpResult) -> Option<u16> {
    r.response.as_ref().map(|x| x.status)
}

fn header<'a>(r: &'a HttpResult, name: &str) -> Option<&'a str> {
    resp(r)
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Every phase reached has a time, each no earlier than the one before, all within the
/// timeout.
fn assert_timings(r: &HttpResult, tls: bool, timeout_ms: f64) {
    let t = &r.timing;
    let dns = t.dns_ms.expect("dns time");
    let connect = t.connect_ms.expect("connect time");
    let ttfb = t.ttfb_ms.expect("ttfb");
    let after_connect = if tls {
        let hs = t.tls_ms.expect("tls time");
        assert!(connect <= hs, "{t:?}");
        hs
    } else {
        assert_eq!(t.tls_ms, None);
        connect
    };
    assert!(dns > 0.0 && dns <= connect, "{t:?}");
    assert!(after_connect <= ttfb && ttfb <= t.total_ms, "{t:?}");
    assert!(t.total_ms < timeout_ms, "{t:?}");
}

#[tokio::test]
async fn https_get_over_http1_and_h2() {
    let pki = pki();
    let addr = https_server(&pki).await;
    for (version, want, alpn) in [
        ("1.1", "HTTP/1.1", "http/1.1"),
        ("auto", "HTTP/2", "h2"),
        ("2", "HTTP/2", "h2"),
    ] {
        let r = http(json!({
            "url": format!("https://localhost:{}/", addr.port()),
            "version": version, "ca_pem": pki.root_pem, "headers": {"X-Probe": "imn"},
        }))
        .await;
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(status(&r), Some(200));
        assert_eq!(resp(&r).reason.as_deref(), Some("OK"));
        assert_eq!(resp(&r).http_version, want);
        // The server saw the version we report, and our extra header.
        let seen = if want == "HTTP/2" {
            "HTTP/2.0"
        } else {
            "HTTP/1.1"
        };
        assert_eq!(header(&r, "x-version"), Some(seen));
        assert_eq!(header(&r, "x-probe-echo"), Some("imn"));
        assert_eq!(header(&r, "x-test"), Some("yes"));
        assert_eq!(resp(&r).content_length, Some(5));
        assert_eq!((resp(&r).body_bytes, resp(&r).body_truncated), (5, false));
        assert_eq!(resp(&r).body_preview.as_deref(), Some("hello"));
        assert!(resp(&r).header_bytes > 20);
        assert_eq!(r.addr.as_deref(), Some("127.0.0.1"));
        assert_eq!(r.af, Some(4));
        assert!(r.local_addr.as_deref().unwrap().starts_with("127.0.0.1:"));
        assert_timings(&r, true, 10_000.0);

        let tls = r.tls.as_ref().unwrap();
        assert_eq!(tls.alpn.as_deref(), Some(alpn));
        assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
        let cipher = tls.cipher.as_deref().unwrap();
        assert!(
            cipher.starts_with("TLS_") && !cipher.starts_with("TLS13"),
            "{cipher}"
        );
        assert_eq!(tls.verify_error, None);
        assert_eq!(tls.server_name.as_deref(), Some("localhost"));
        assert_eq!(tls.chain.len(), 2);
        let (leaf, inter) = (&tls.chain[0], &tls.chain[1]);
        assert_eq!(leaf.subject, "CN=localhost");
        assert_eq!(leaf.issuer, "CN=IMN Test Intermediate, O=IMN tests");
        assert_eq!(leaf.dns_names, ["localhost"]);
        assert_eq!(leaf.ip_addrs, ["127.0.0.1", "::1"]);
        assert_eq!(inter.subject, "CN=IMN Test Intermediate, O=IMN tests");
        assert_eq!(inter.issuer_cn.as_deref(), Some("IMN Test Root"));
        assert!(inter.is_ca && !leaf.is_ca);
        assert_eq!(leaf.pem, None, "http results leave PEM out");
        assert_eq!(leaf.sha256.len(), 95);
    }
}

#[tokio::test]
async fn head_options_redirect_and_body_cap() {
    let pki = pki();
    let addr = https_server(&pki).await;
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", addr.port());

    let r = http(json!({"url": url("/"), "method": "HEAD", "ca_pem": pki.root_pem})).await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None));
    assert_eq!(r.method, HttpMethod::Head);
    assert_eq!(header(&r, "x-method"), Some("HEAD"));
    assert_eq!((resp(&r).body_bytes, resp(&r).body_truncated), (0, false));
    // An address in the URL: no SNI, verified against the certificate's IP SAN.
    let tls = r.tls.as_ref().unwrap();
    assert_eq!(
        (tls.server_name.as_deref(), tls.verify_error.as_deref()),
        (None, None)
    );

    let r = http(json!({"url": url("/"), "method": "OPTIONS", "ca_pem": pki.root_pem})).await;
    assert_eq!(status(&r), Some(204));
    assert_eq!(header(&r, "allow"), Some("GET, HEAD, OPTIONS"));
    assert_eq!(header(&r, "x-method"), Some("OPTIONS"));

    let r = http(
        json!({"url": url("/big"), "max_body_bytes": 1000, "ca_pem": pki.root_pem,
        "version": "1.1"}),
    )
    .await;
    assert_eq!(r.error, None);
    assert_eq!(resp(&r).content_length, Some(10_000));
    assert_eq!((resp(&r).body_bytes, resp(&r).body_truncated), (1000, true));
    assert_eq!(resp(&r).body_preview.as_deref().map(str::len), Some(256));
    let r =
        http(json!({"url": url("/big"), "max_body_bytes": 20000, "ca_pem": pki.root_pem})).await;
    assert_eq!(
        (resp(&r).body_bytes, resp(&r).body_truncated),
        (10_000, false)
    );
    let r = http(json!({"url": url("/big"), "max_body_bytes": 0, "ca_pem": pki.root_pem})).await;
    assert_eq!((resp(&r).body_bytes, resp(&r).body_truncated), (0, true));

    let r = http(json!({"url": url("/redirect?x=1"), "ca_pem": pki.root_pem})).await;
    assert_eq!(status(&r), Some(302), "not followed");
    assert_eq!(resp(&r).location.as_deref(), Some("/target"));
    assert_eq!(r.error, None);

    assert!(r.redirects.is_empty());

    let r = http(json!({"url": url("/nothing"), "ca_pem": pki.root_pem})).await;
    assert_eq!(
        (status(&r), resp(&r).location.as_deref()),
        (Some(404), None)
    );
}

#[tokio::test]
async fn slow_server_times_out_naming_the_phase() {
    let pki = pki();
    let addr = https_server(&pki).await;
    let t0 = std::time::Instant::now();
    let r = http(
        json!({"url": format!("https://localhost:{}/slow", addr.port()),
        "timeout_ms": 400, "ca_pem": pki.root_pem}),
    )
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(r.error_phase, Some(HttpPhase::Response));
    let err = r.error.as_deref().unwrap();
    assert!(
        err.contains("timed out after 400 ms") && err.contains("response head"),
        "{err}"
    );
    assert_eq!((status(&r), r.timing.ttfb_ms), (None, None));
    assert!(r.timing.tls_ms.is_some(), "the handshake was done before");
    assert!(r.timing.total_ms >= 400.0);
}

#[tokio::test]
async fn certificate_errors_are_reported_with_the_chain() {
    let pki = pki();
    let addr = https_server(&pki).await;
    let port = addr.port();

    // (a) The CA is not trusted (system anchors only).
    let r = http(json!({"url": format!("https://localhost:{port}/")})).await;
    assert_eq!(r.error_phase, Some(HttpPhase::Tls));
    let err = r.error.as_deref().unwrap();
    assert!(
        err.contains("certificate verify failed") && err.contains("UnknownIssuer"),
        "{err}"
    );
    assert_eq!(status(&r), None);
    assert_eq!(r.timing.tls_ms, None);
    let tls = r.tls.as_ref().unwrap();
    assert_eq!(tls.verify_error.as_deref(), Some("UnknownIssuer"));
    assert_eq!(tls.chain.len(), 2);
    assert_eq!(tls.chain[0].subject, "CN=localhost");
    assert_eq!(
        tls.chain[1].subject_cn.as_deref(),
        Some("IMN Test Intermediate")
    );

    // (b) Trusted CA, wrong name: by server_name, and by a URL host forced to our address.
    for params in [
        json!({"url": format!("https://127.0.0.1:{port}/"), "server_name": "wrong.test",
            "ca_pem": pki.root_pem}),
        json!({"url": format!("https://wrong.test:{port}/"), "resolve": "127.0.0.1",
            "ca_pem": pki.root_pem}),
    ] {
        let r = http(params.clone()).await;
        let err = r.error.as_deref().unwrap();
        assert!(err.contains("certificate verify failed"), "{err}");
        let tls = r.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("wrong.test"));
        let ve = tls.verify_error.as_deref().unwrap();
        assert!(ve.contains("not valid for name \"wrong.test\""), "{ve}");
        assert_eq!(tls.chain.len(), 2, "{params}");
        assert_eq!(r.addr.as_deref(), Some("127.0.0.1"));
    }

    // insecure: the request goes on; the error is still there.
    let r = http(json!({"url": format!("https://localhost:{port}/"), "insecure": true})).await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None));
    let tls = r.tls.as_ref().unwrap();
    assert_eq!(tls.verify_error.as_deref(), Some("UnknownIssuer"));
    assert_eq!(tls.chain.len(), 2);
    assert_timings(&r, true, 10_000.0);
}

#[tokio::test]
async fn plain_http_and_h2c() {
    let addr = http_server().await;
    let url = format!("http://localhost:{}/", addr.port());
    let r = http(json!({"url": url, "family": 4})).await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None));
    assert_eq!(resp(&r).http_version, "HTTP/1.1");
    assert!(r.tls.is_none());
    assert_timings(&r, false, 10_000.0);

    let r = http(json!({"url": url, "version": "2"})).await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None), "{r:?}");
    assert_eq!(resp(&r).http_version, "HTTP/2");
    assert_eq!(header(&r, "x-version"), Some("HTTP/2.0"));

    // Nothing listens: a connect failure, after name resolution.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = http(json!({"url": format!("http://127.0.0.1:{closed}/")})).await;
    assert_eq!(r.error_phase, Some(HttpPhase::Connect));
    assert!(r.error.as_deref().unwrap().contains("refused"), "{r:?}");
    assert!(r.timing.dns_ms.is_some() && r.timing.connect_ms.is_none());

    // A family the host lacks: a resolution failure.
    let r = http(json!({"url": "http://127.0.0.1:1/", "family": 6})).await;
    assert_eq!(r.error_phase, Some(HttpPhase::Dns));

    // Parameters the run refuses before sending anything.
    for bad in [
        json!({"url": "ftp://127.0.0.1/"}),
        json!({"url": url, "headers": {"Connection": "close"}}),
        json!({"url": url, "resolve": "localhost"}),
        json!({"url": "https://127.0.0.1:1/", "ca_pem": "junk"}),
    ] {
        let out = run("http", &bad.to_string(), &Context::default()).await;
        assert!(out.is_err(), "{bad}: {out:?}");
    }
}

#[tokio::test]
async fn tls_cert_reports_the_chain_in_order_with_pem() {
    let pki = pki();
    let addr = https_server(&pki).await;
    let port = addr.port();

    let r = tls_cert(
        json!({"host": "127.0.0.1", "port": port, "server_name": "localhost",
        "ca_pem": pki.root_pem, "alpn": ["h2"]}),
    )
    .await;
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.tls.verify_error, None);
    assert_eq!(r.tls.version.as_deref(), Some("TLSv1.3"));
    assert_eq!(r.tls.alpn.as_deref(), Some("h2"));
    assert!(r.tls.cipher.is_some() && r.tls.kx_group.is_some());
    assert!(r.connect_ms.unwrap() > 0.0 && r.handshake_ms.unwrap() > 0.0);
    assert_eq!(r.addr.as_deref(), Some("127.0.0.1"));
    let pems: Vec<String> = r.tls.chain.iter().map(|c| c.pem.clone().unwrap()).collect();
    let norm = |s: &str| s.replace("\r\n", "\n").trim().to_string();
    assert_eq!(pems.len(), 2);
    assert_eq!(norm(&pems[0]), norm(&pki.leaf_pem));
    assert_eq!(norm(&pems[1]), norm(&pki.inter_pem));
    assert_eq!(r.tls.chain[0].issuer, r.tls.chain[1].subject);

    // Untrusted, and only TLS 1.2: the handshake completes, the chain is there, and
    // verify_error says why it would not be trusted.
    let r =
        tls_cert(json!({"host": "localhost", "port": port, "version": "1.2", "family": 4})).await;
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.tls.version.as_deref(), Some("TLSv1.2"));
    let cipher = r.tls.cipher.as_deref().unwrap();
    assert!(cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"), "{cipher}");
    // ECDHE-ECDSA suites are 0xC0xx or 0xCCA9.
    assert!(
        r.tls.cipher_code.unwrap() >> 8 == 0xC0 || r.tls.cipher_code == Some(0xCCA9),
        "{r:?}"
    );
    assert_eq!(r.tls.verify_error.as_deref(), Some("UnknownIssuer"));
    assert_eq!(r.tls.chain.len(), 2);
    assert_eq!(r.tls.chain[0].subject_cn.as_deref(), Some("localhost"));

    // A server that is not TLS: the handshake fails, named.
    let plain = http_server().await;
    let r = tls_cert(json!({"host": "127.0.0.1", "port": plain.port(), "timeout_ms": 2000})).await;
    assert_eq!(r.error_phase, Some(HttpPhase::Tls));
    assert!(
        r.error.as_deref().unwrap().contains("TLS handshake"),
        "{r:?}"
    );
    assert!(r.tls.chain.is_empty());
}

#[tokio::test]
async fn over_ipv6_loopback() {
    let pki = pki();
    let addr = https_server_on(&pki, "[::1]:0").await;
    let r = http(json!({"url": format!("https://[::1]:{}/", addr.port()), "ca_pem": pki.root_pem}))
        .await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None), "{r:?}");
    assert_eq!((r.addr.as_deref(), r.af), (Some("::1"), Some(6)));
    assert!(r.local_addr.as_deref().unwrap().starts_with("[::1]:"));
    // Verified against the certificate's IPv6 SAN, without SNI.
    let tls = r.tls.as_ref().unwrap();
    assert_eq!(
        (tls.server_name.as_deref(), tls.verify_error.as_deref()),
        (None, None)
    );

    let t = tls_cert(json!({"host": "::1", "port": addr.port(), "ca_pem": pki.root_pem})).await;
    assert_eq!(
        (t.error.as_deref(), t.tls.verify_error.as_deref()),
        (None, None),
        "{t:?}"
    );
    assert_eq!(t.af, Some(6));
}

#[tokio::test]
async fn redirects_followed_when_asked() {
    let pki = pki();
    let addr = https_server(&pki).await;
    let url = |path: &str| format!("https://localhost:{}{path}", addr.port());

    let r = http(json!({"url": url("/redirect?x=1"), "ca_pem": pki.root_pem,
        "follow_redirects": true}))
    .await;
    assert_eq!((status(&r), r.error.as_deref()), (Some(200), None), "{r:?}");
    assert_eq!(r.url, url("/target"));
    assert_eq!(resp(&r).body_preview.as_deref(), Some("arrived"));
    assert_eq!(r.redirects.len(), 1);
    let hop = &r.redirects[0];
    assert_eq!(
        (hop.url.as_str(), hop.status),
        (url("/redirect?x=1").as_str(), 302)
    );
    assert_eq!(hop.location, "/target");
    // The second request starts after the first answered.
    assert!(hop.ttfb_ms.unwrap() <= r.timing.dns_ms.unwrap(), "{r:?}");

    let r = http(json!({"url": url("/loop"), "ca_pem": pki.root_pem,
        "follow_redirects": true, "max_redirects": 3}))
    .await;
    assert_eq!(r.redirects.len(), 3);
    assert!(r
        .redirects
        .iter()
        .all(|h| h.status == 301 && h.location == "loop"));
    assert_eq!(r.error.as_deref(), Some("more than 3 redirects"));
    assert_eq!(
        (status(&r), r.error_phase),
        (Some(301), Some(HttpPhase::Response))
    );

    // To another host: the asked host's server_name no longer applies; nothing listens
    // on [::1]:1.
    let r = http(
        json!({"url": format!("https://127.0.0.1:{}/away", addr.port()),
        "ca_pem": pki.root_pem, "server_name": "localhost", "follow_redirects": true}),
    )
    .await;
    assert_eq!(r.redirects.len(), 1);
    assert_eq!(r.url, "https://[::1]:1/");
    assert_eq!(
        (r.error_phase, r.addr.as_deref()),
        (Some(HttpPhase::Connect), Some("::1"))
    );
}
