//! HTTPS for the REST API: a rustls server configuration from PEM files and a listener
//! that `axum::serve` accepts.
//!
//! TLS handshakes run in their own tasks, never in [`axum::serve::Listener::accept`]: a
//! client that connects and stays silent costs one task until the handshake timeout and
//! does not hold up anyone else. Only finished handshakes reach `accept`.
//!
//! ```no_run
//! # async fn run(router: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use imn_backend::tls::{server_config, TlsFiles, TlsListener, DEFAULT_HANDSHAKE_TIMEOUT};
//! let config = server_config(&TlsFiles {
//!     cert: "certs/server.pem".into(),
//!     key: "certs/server.key".into(),
//!     client_ca: None,
//! })?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! axum::serve(TlsListener::new(tcp, config, DEFAULT_HANDSHAKE_TIMEOUT), router).await?;
//! # Ok(()) }
//! ```
//!
//! `ConnectInfo<SocketAddr>` works through [`axum::serve::ListenerExt::tap_io`]:
//! `axum::serve(listener.tap_io(|_| {}), router.into_make_service_with_connect_info::<SocketAddr>())`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A handshake timeout for [`TlsListener::new`] that suits the REST API.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for `accept`.
const ACCEPTED_QUEUE: usize = 64;
/// Retry delays after a failed TCP accept (EMFILE and the like): doubling from the
/// first to the last.
const ACCEPT_RETRY_MIN: Duration = Duration::from_millis(5);
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);

/// The PEM files of the API's TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates for client certificates. Set: every client must present a
    /// certificate issued by one of them. `None`: no client certificates are asked for.
    pub client_ca: Option<PathBuf>,
}

/// Which of the [`TlsFiles`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Cert => "TLS certificate",
            TlsFile::Key => "TLS private key",
            TlsFile::ClientCa => "TLS client CA",
        })
    }
}

/// Why the TLS configuration could not be built. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file} {path}: no such file")]
    Missing { file: TlsFile, path: PathBuf },
    #[error("{file} {path}: cannot read: {source}")]
    Unreadable {
        file: TlsFile,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file} {path}: invalid PEM: {source}")]
    Pem {
        file: TlsFile,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{file} {path}: no PEM certificate (\"BEGIN CERTIFICATE\") in the file")]
    NoCertificate { file: TlsFile, path: PathBuf },
    #[error("{file} {path}: no PEM private key (\"BEGIN PRIVATE KEY\", \"BEGIN EC PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\") in the file")]
    NoPrivateKey { file: TlsFile, path: PathBuf },
    #[error("{file} {path}: {source}")]
    Rustls {
        file: TlsFile,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{file} {path}: {source}")]
    ClientVerifier {
        file: TlsFile,
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// Builds the API's rustls configuration with the ring provider (nothing is installed
/// process-wide): TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, and with
/// [`TlsFiles::client_ca`] set, client certificates required and verified against every
/// certificate in that file.
///
/// Fails when a file is missing or unreadable, holds no certificate or key, or when the
/// key does not belong to the certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs(TlsFile::Cert, &files.cert)?;
    let key = load_key(&files.key)?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            file: TlsFile::Cert,
            path: files.cert.clone(),
            source,
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(TlsFile::ClientCa, path)? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    file: TlsFile::ClientCa,
                    path: path.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    file: TlsFile::ClientCa,
                    path: path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            // A key that does not match the certificate, or one rustls cannot use.
            file: TlsFile::Key,
            path: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing {
            file,
            path: path.to_path_buf(),
        },
        _ => TlsError::Unreadable {
            file,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn load_certs(file: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            file,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            file,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = TlsFile::Key;
    let pem = read(file, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            file,
            path: path.to_path_buf(),
        },
        source => TlsError::Pem {
            file,
            path: path.to_path_buf(),
            source,
        },
    })
}

/// A TLS listener for `axum::serve`.
///
/// A background task accepts TCP connections (with `TCP_NODELAY`), runs each TLS
/// handshake in its own task under the handshake timeout, and queues finished streams
/// for [`accept`](axum::serve::Listener::accept). Failed and timed-out handshakes are
/// logged at debug and dropped; TCP accept errors (such as running out of file
/// descriptors) are logged and retried after a short pause. Dropping the listener stops
/// the background task and closes the socket; handshakes in flight finish or time out
/// on their own.
pub struct TlsListener {
    tcp: Arc<TcpListener>,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Starts accepting on `tcp`. Must be called within a Tokio runtime.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>, handshake_timeout: Duration) -> Self {
        let tcp = Arc::new(tcp);
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(accept_loop(
            tcp.clone(),
            TlsAcceptor::from(config),
            handshake_timeout,
            tx,
        ));
        TlsListener { tcp, accepted }
    }
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            None => {
                // The accept task only ends when this listener is dropped, so this is a
                // panic in that task (or a runtime shutting down).
                tracing::error!(
                    "TLS listener: the accept task ended; accepting no more connections"
                );
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn accept_loop(
    tcp: Arc<TcpListener>,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut retry = ACCEPT_RETRY_MIN;
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            accepted = tcp.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(connection) => {
                retry = ACCEPT_RETRY_MIN;
                connection
            }
            // The peer gave up before we accepted: nothing to do.
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "TLS listener: connection closed before accept");
                continue;
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    retry_in_ms = retry.as_millis() as u64,
                    "TLS listener: accepting a TCP connection failed"
                );
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(ACCEPT_RETRY_MAX);
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TLS listener: cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the listener is gone; the connection is dropped.
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::debug!(
                        %peer,
                        timeout_ms = handshake_timeout.as_millis() as u64,
                        "TLS handshake timed out"
                    );
                }
            }
        });
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use tokio::io::AsyncReadExt;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            TempDir(std::env::temp_dir().join(format!(
                "imn-tls-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Certificates for localhost/127.0.0.1 and a client "agent-1", in a temp dir.
    fn pki() -> TempDir {
        let dir = TempDir::new();
        crate::test_pki::generate(&dir.0, &["localhost", "127.0.0.1"], &["agent-1"]);
        dir
    }

    fn files(dir: &Path, client_ca: bool) -> TlsFiles {
        TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: client_ca.then(|| dir.join("ca.pem")),
        }
    }

    /// Serves a tiny router over HTTPS on 127.0.0.1; returns the port.
    async fn serve(config: Arc<ServerConfig>, handshake_timeout: Duration) -> u16 {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let router = Router::new().route("/hello", get(|| async { "hello over tls" }));
        let listener = TlsListener::new(tcp, config, handshake_timeout);
        tokio::spawn(async move { axum::serve(listener, router).await });
        port
    }

    fn client(dir: &Path) -> reqwest::ClientBuilder {
        let ca = std::fs::read(dir.join("ca.pem")).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(5))
    }

    fn identity(dir: &Path, name: &str) -> reqwest::Identity {
        let mut pem = std::fs::read(dir.join(format!("client-{name}.pem"))).unwrap();
        pem.extend(std::fs::read(dir.join(format!("client-{name}.key"))).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }

    async fn get_hello(client: &reqwest::Client, url: &str) -> reqwest::Result<reqwest::Response> {
        client.get(url).send().await?.error_for_status()
    }

    #[tokio::test]
    async fn serves_https_over_h2_and_http1_for_localhost_and_ip() {
        let dir = pki();
        let config = server_config(&files(&dir.0, false)).unwrap();
        let port = serve(config, DEFAULT_HANDSHAKE_TIMEOUT).await;

        let h2 = client(&dir.0).build().unwrap();
        for host in ["localhost", "127.0.0.1"] {
            let response = get_hello(&h2, &format!("https://{host}:{port}/hello"))
                .await
                .unwrap_or_else(|e| panic!("{host}: {e:?}"));
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.text().await.unwrap(), "hello over tls");
        }

        let http1 = client(&dir.0).http1_only().build().unwrap();
        let response = get_hello(&http1, &format!("https://127.0.0.1:{port}/hello"))
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        assert_eq!(response.text().await.unwrap(), "hello over tls");
    }

    #[tokio::test]
    async fn plain_http_and_untrusting_clients_fail() {
        let dir = pki();
        let config = server_config(&files(&dir.0, false)).unwrap();
        let port = serve(config, DEFAULT_HANDSHAKE_TIMEOUT).await;

        let plain = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let result = get_hello(&plain, &format!("http://127.0.0.1:{port}/hello")).await;
        assert!(result.is_err(), "plain http must fail: {result:?}");

        // A client that trusts only another CA.
        let other = pki();
        let untrusting = client(&other.0).build().unwrap();
        let result = get_hello(&untrusting, &format!("https://localhost:{port}/hello")).await;
        assert!(result.is_err(), "an untrusted server must fail: {result:?}");

        // The server is still fine afterwards.
        let trusting = client(&dir.0).build().unwrap();
        get_hello(&trusting, &format!("https://localhost:{port}/hello"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn client_ca_requires_a_client_certificate_from_that_ca() {
        let dir = pki();
        let config = server_config(&files(&dir.0, true)).unwrap();
        let port = serve(config, DEFAULT_HANDSHAKE_TIMEOUT).await;
        let url = format!("https://localhost:{port}/hello");

        let anonymous = client(&dir.0).build().unwrap();
        let result = get_hello(&anonymous, &url).await;
        assert!(
            result.is_err(),
            "no client certificate must fail: {result:?}"
        );

        let agent = client(&dir.0)
            .identity(identity(&dir.0, "agent-1"))
            .build()
            .unwrap();
        let response = get_hello(&agent, &url).await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello over tls");

        // A client certificate from another CA is refused.
        let other = pki();
        let stranger = client(&dir.0)
            .identity(identity(&other.0, "agent-1"))
            .build()
            .unwrap();
        let result = get_hello(&stranger, &url).await;
        assert!(
            result.is_err(),
            "a foreign client certificate must fail: {result:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_connection_does_not_stall_others() {
        let dir = pki();
        let config = server_config(&files(&dir.0, false)).unwrap();
        // Far longer than the 2 s the real client gets: a handshake in `accept` would
        // hold it up until the silent one timed out.
        let port = serve(config, Duration::from_secs(30)).await;

        let _silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        // Let the listener pick the silent connection up first.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let real = client(&dir.0).build().unwrap();
        let response = tokio::time::timeout(
            Duration::from_secs(2),
            get_hello(&real, &format!("https://localhost:{port}/hello")),
        )
        .await
        .expect("a silent connection stalled the listener")
        .unwrap();
        assert_eq!(response.text().await.unwrap(), "hello over tls");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        let dir = pki();
        let config = server_config(&files(&dir.0, false)).unwrap();
        let port = serve(config, Duration::from_millis(300)).await;

        let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
            .await
            .expect("the silent connection was not closed after the handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // The listener still serves.
        let real = client(&dir.0).build().unwrap();
        get_hello(&real, &format!("https://localhost:{port}/hello"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn dropping_the_listener_closes_the_socket() {
        let dir = pki();
        let config = server_config(&files(&dir.0, false)).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = TlsListener::new(tcp, config, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(axum::serve::Listener::local_addr(&listener).unwrap(), addr);
        drop(listener);
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{addr} still accepts connections after the listener was dropped");
    }

    #[test]
    fn config_errors_name_the_file_and_the_problem() {
        let dir = pki();
        let d = &dir.0;

        let mut f = files(d, false);
        f.cert = d.join("nope.pem");
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(&err, TlsError::Missing { file: TlsFile::Cert, path } if *path == f.cert),
            "{err}"
        );
        assert!(err.to_string().contains("nope.pem"), "{err}");

        // A key file given as the certificate.
        let mut f = files(d, false);
        f.cert = d.join("server.key");
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoCertificate {
                    file: TlsFile::Cert,
                    ..
                }
            ),
            "{err}"
        );

        // A certificate given as the key.
        let mut f = files(d, false);
        f.key = d.join("server.pem");
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoPrivateKey {
                    file: TlsFile::Key,
                    ..
                }
            ),
            "{err}"
        );

        // A key that does not belong to the certificate.
        let mut f = files(d, false);
        f.key = d.join("client-agent-1.key");
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Rustls {
                    file: TlsFile::Key,
                    ..
                }
            ),
            "{err}"
        );

        let mut f = files(d, true);
        f.client_ca = Some(d.join("missing-ca.pem"));
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Missing {
                    file: TlsFile::ClientCa,
                    ..
                }
            ),
            "{err}"
        );

        // Broken PEM.
        std::fs::write(d.join("broken.pem"), "-----BEGIN CERTIFICATE-----\n@@@\n").unwrap();
        let mut f = files(d, false);
        f.cert = d.join("broken.pem");
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Pem {
                    file: TlsFile::Cert,
                    ..
                }
            ),
            "{err}"
        );

        // A directory is unreadable as a file.
        let mut f = files(d, false);
        f.key = d.clone();
        let err = server_config(&f).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Unreadable {
                    file: TlsFile::Key,
                    ..
                }
            ),
            "{err}"
        );

        let config = server_config(&files(d, true)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
