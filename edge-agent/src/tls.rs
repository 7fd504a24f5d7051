//! TLS to the broker (`mqtts://`), with rustls and the *ring* provider (it cross-builds
//! for every firmware target; aws-lc does not).
//!
//! The agent connects to an address it resolved itself, so rustls is handed that
//! address; the certificate is still checked against the host name in the config, by a
//! verifier that wraps webpki's and substitutes the configured name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// Where Debian and OpenWrt (package ca-bundle) keep the system's CA bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds the client config for a broker named `host`.
pub fn client_config(
    host: &str,
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_path = ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca_path, "tls_ca")? {
        roots.add(c).map_err(|e| {
            format!(
                "tls_ca: {}: not a usable CA certificate: {e}",
                ca_path.display()
            )
        })?;
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("broker: {host:?} is not a valid TLS server name"))?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("tls_ca: {e}"))?;
    let verifier = Arc::new(imn_proto::tls::NamedVerifier::new(inner, name));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "tls_cert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("tls_key: {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls_cert/tls_key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{field}: {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{field}: {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}
