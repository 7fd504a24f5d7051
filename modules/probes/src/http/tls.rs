//! TLS for `http` and `tls_cert`: the trust anchors (the system's bundle read at run
//! time, plus the request's `ca_pem`), and a certificate verifier that wraps rustls's
//! WebPKI verifier to record the chain the server presented and why it did not verify,
//! so a failed handshake still reports its chain.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, Error, ProtocolVersion, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};

use imn_proto::kinds::http::TlsInfo;

/// Bundles tried in order, as OpenSSL, Debian, Alpine and OpenWrt lay them out; the first
/// that exists is used. `SSL_CERT_FILE` comes before them.
const BUNDLES: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"];
/// Without a bundle, every `*.crt` here (OpenWrt's ca-certificates package).
const CERT_DIR: &str = "/etc/ssl/certs";

/// The system's trust anchors plus those of `ca_pem`, and how many there are. An
/// unparsable system certificate is skipped; a `ca_pem` with no usable certificate is
/// an error, as it is the caller's.
pub fn trust_anchors(ca_pem: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let bundle = env
        .into_iter()
        .chain(BUNDLES.iter().map(std::path::PathBuf::from))
        .find(|p| p.is_file());
    match bundle {
        Some(path) => add_pem_file(&mut store, &path),
        None => {
            if let Ok(dir) = std::fs::read_dir(CERT_DIR) {
                for entry in dir.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "crt") {
                        add_pem_file(&mut store, &path);
                    }
                }
            }
        }
    }
    if let Some(pem) = ca_pem {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ca_pem: not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("ca_pem: holds no certificate".into());
        }
        let (added, ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "ca_pem: none of its {ignored} certificates is a usable trust anchor"
            ));
        }
    }
    Ok(store)
}

fn add_pem_file(store: &mut RootCertStore, path: &std::path::Path) {
    if let Ok(iter) = CertificateDer::pem_file_iter(path) {
        store.add_parsable_certificates(iter.flatten());
    }
}

/// What the verifier saw in one handshake.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The certificates the server sent, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Why they did not verify; None when they did.
    pub verify_error: Option<String>,
}

/// rustls's WebPKI verifier, recording what it was given and what it decided. With
/// `insecure`, a chain that does not verify is accepted (the error is still recorded);
/// handshake signatures are always checked.
#[derive(Debug)]
pub struct RecordingVerifier {
    /// None without any trust anchor: then every chain fails as UnknownIssuer.
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    insecure: bool,
    seen: Mutex<Option<Seen>>,
}

impl RecordingVerifier {
    pub fn new(roots: RootCertStore, insecure: bool) -> Result<RecordingVerifier, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("certificate verifier: {e}"))?,
            )
        };
        Ok(RecordingVerifier {
            inner,
            provider,
            insecure,
            seen: Mutex::new(None),
        })
    }

    /// What the last handshake presented (None if it never got to the certificate).
    pub fn seen(&self) -> Option<Seen> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }
}

/// A certificate error in words, without rustls's "invalid peer certificate" prefix.
pub fn describe(e: &Error) -> String {
    match e {
        Error::InvalidCertificate(c) => c.to_string(),
        other => other.to_string(),
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let outcome = match &self.inner {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        };
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone().into_owned());
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(Seen {
                chain,
                verify_error: outcome.as_ref().err().map(describe),
            });
        }
        match outcome {
            Err(_) if self.insecure => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that verifies with `verifier` and offers `alpn`.
pub fn client_config(
    verifier: Arc<RecordingVerifier>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, String> {
    let mut cfg = ClientConfig::builder_with_provider(verifier.provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

/// The server name to send and verify: a DNS name, or an address (then no SNI).
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|e| format!("server name {name:?}: {e}"))
}

/// What `conn` negotiated, into `info`.
pub fn negotiated(conn: &ClientConnection, info: &mut TlsInfo) {
    info.version = conn.protocol_version().map(|v| match v {
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        other => format!("{other:?}"),
    });
    info.cipher = conn.negotiated_cipher_suite().map(|s| {
        let suite = s.suite();
        match suite.as_str() {
            // rustls prefixes TLS 1.3 suites TLS13_; IANA names them TLS_.
            Some(n) => n.replacen("TLS13_", "TLS_", 1),
            None => format!("{suite:?}"),
        }
    });
    info.cipher_code = conn.negotiated_cipher_suite().map(|s| u16::from(s.suite()));
    info.kx_group = conn
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()));
    info.alpn = conn
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned());
}

/// The chain and verification outcome `verifier` recorded, into `info` (PEM with
/// `pem`).
pub fn record_chain(verifier: &RecordingVerifier, info: &mut TlsInfo, pem: bool) {
    if let Some(seen) = verifier.seen() {
        info.chain = seen
            .chain
            .iter()
            .map(|c| super::cert::summarize(c, pem))
            .collect();
        info.verify_error = seen.verify_error;
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        root: rcgen::Certificate,
        inter: rcgen::Certificate,
        leaf: rcgen::Certificate,
    }

    fn pki() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca("Unit Root").self_signed(&root_key).unwrap();
        let inter_key = KeyPair::generate().unwrap();
        let inter = ca("Unit Intermediate")
            .signed_by(&inter_key, &root, &root_key)
            .unwrap();
        let mut lp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        lp.distinguished_name.push(DnType::CommonName, "unit leaf");
        let leaf = lp
            .signed_by(&KeyPair::generate().unwrap(), &inter, &inter_key)
            .unwrap();
        Pki { root, inter, leaf }
    }

    fn verify(v: &RecordingVerifier, p: &Pki, name: &str) -> Result<ServerCertVerified, Error> {
        v.verify_server_cert(
            p.leaf.der(),
            std::slice::from_ref(p.inter.der()),
            &server_name(name).unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn records_chain_and_outcome() {
        let p = pki();
        let mut roots = RootCertStore::empty();
        roots.add(p.root.der().clone()).unwrap();

        let v = RecordingVerifier::new(roots.clone(), false).unwrap();
        assert!(verify(&v, &p, "localhost").is_ok());
        let seen = v.seen().unwrap();
        assert_eq!(seen.chain.len(), 2);
        assert_eq!(seen.verify_error, None);
        assert!(verify(&v, &p, "127.0.0.1").is_ok());

        // Wrong name: refused, and recorded.
        assert!(verify(&v, &p, "other.test").is_err());
        let err = v.seen().unwrap().verify_error.unwrap();
        assert!(err.contains("not valid for name"), "{err}");

        // Insecure: accepted, still recorded.
        let v = RecordingVerifier::new(roots, true).unwrap();
        assert!(verify(&v, &p, "other.test").is_ok());
        assert!(v.seen().unwrap().verify_error.is_some());

        // No trust anchors at all: UnknownIssuer, with the chain.
        let v = RecordingVerifier::new(RootCertStore::empty(), false).unwrap();
        assert!(verify(&v, &p, "localhost").is_err());
        let seen = v.seen().unwrap();
        assert_eq!(seen.verify_error.as_deref(), Some("UnknownIssuer"));
        assert_eq!(seen.chain[0].as_ref(), p.leaf.der().as_ref());
    }

    #[test]
    fn summary_of_generated_certificates() {
        let p = pki();
        let leaf = super::super::cert::summarize(p.leaf.der(), true);
        assert_eq!(leaf.parse_error, None);
        assert_eq!(leaf.subject, "CN=unit leaf");
        assert_eq!(leaf.issuer_cn.as_deref(), Some("Unit Intermediate"));
        assert_eq!(leaf.dns_names, ["localhost"]);
        assert_eq!(leaf.ip_addrs, ["127.0.0.1"]);
        assert!(!leaf.is_ca);
        assert_eq!(leaf.key_algorithm, "EC P-256");
        assert_eq!(leaf.key_bits, Some(256));
        assert_eq!(leaf.signature_algorithm, "ecdsa-with-SHA256");
        assert!(leaf.not_before_unix < leaf.not_after_unix);
        // Our PEM is rcgen's, up to line endings.
        assert_eq!(
            leaf.pem.as_deref().unwrap().trim(),
            p.leaf.pem().replace("\r\n", "\n").trim()
        );
        let root = super::super::cert::summarize(p.root.der(), false);
        assert!(root.is_ca && root.pem.is_none());
        assert_eq!(root.subject, root.issuer);
    }

    #[test]
    fn ca_pem_must_hold_a_certificate() {
        let p = pki();
        let store = trust_anchors(Some(&p.root.pem())).unwrap();
        assert!(!store.is_empty());
        assert!(trust_anchors(Some("nothing here")).is_err());
    }
}
