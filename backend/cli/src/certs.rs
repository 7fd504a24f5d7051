//! Development PKI for `imn certs`: a CA, a server certificate for the REST API and
//! client certificates (for agents or operators), all ECDSA P-256, written as PEM files
//! into one directory.
//!
//! The CA is created once and then reused: a later run with more hosts or clients
//! issues new leaves from the same `ca.pem`/`ca.key`, so certificates already handed out
//! stay valid. Leaf files are replaced; the CA files never are.
//!
//! Files in `dir`:
//!
//! | file                 | content                                                  |
//! |----------------------|----------------------------------------------------------|
//! | `ca.pem`, `ca.key`   | CA (basic constraints CA, path length 0; keyCertSign, cRLSign) |
//! | `server.pem`, `.key` | leaf for `hosts` (DNS and IP SANs, EKU serverAuth), no chain |
//! | `client-<name>.pem`, `.key` | leaf with CN `<name>`, EKU clientAuth             |
//!
//! Keys are PKCS#8 PEM with mode 0600; certificates are valid from one hour ago (clock
//! skew) for `days` days, leaves never beyond their CA.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name in the certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name in the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate's file name in the certificate directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server private key's file name in the certificate directory.
pub const SERVER_KEY_FILE: &str = "server.key";

/// The longest validity `generate` accepts, in days (about 100 years).
pub const MAX_DAYS: u32 = 36_500;

const CA_COMMON_NAME: &str = "IMN development CA";
const ORGANIZATION: &str = "IMN";

/// What `imn certs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsRequest {
    /// Directory for all files; created if missing.
    pub dir: PathBuf,
    /// Subject alternative names of the server certificate: DNS names (`*.` wildcards
    /// allowed) and IP literals, e.g. `["localhost", "127.0.0.1", "::1"]`. Empty: no
    /// server certificate is issued (only the CA and clients).
    pub hosts: Vec<String>,
    /// Common names of client certificates, e.g. agent ids; also part of the file names
    /// (`client-<name>.pem`), so 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not
    /// starting with `.`.
    pub clients: Vec<String>,
    /// Validity in days, 1 to [`MAX_DAYS`].
    pub days: u32,
}

/// What `generate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertsReport {
    /// Files written by this run, in order. `ca.pem` and `ca.key` are listed only when
    /// the CA was created by this run.
    pub files: Vec<PathBuf>,
    /// Whether this run created the CA (`false`: an existing CA in `dir` was reused).
    pub ca_created: bool,
}

/// Why `generate` failed. Every file-related variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("validity of {days} days: must be 1 to {MAX_DAYS} days")]
    InvalidDays { days: u32 },
    #[error("{path}: host {host:?} is neither an IP address nor a valid DNS name")]
    InvalidHost { path: PathBuf, host: String },
    #[error(
        "client name {name:?}: must be 1 to 64 characters of A-Z a-z 0-9 . _ - \
         and must not start with '.'"
    )]
    InvalidClientName { name: String },
    #[error("{path}: cannot create directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{present} exists but {missing} does not: restore {missing}, or remove {present} \
         to create a new CA (certificates issued by the old CA then stop validating)"
    )]
    CaIncomplete { present: PathBuf, missing: PathBuf },
    #[error("{path}: not a usable CA: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("{path}: the CA expired at {not_after}; remove ca.pem and ca.key to create a new CA")]
    CaExpired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error("{path}: cannot generate: {source}")]
    Generate {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path}: the issued certificate does not verify against the CA: {reason}")]
    SelfCheck { path: PathBuf, reason: String },
}

/// The CA that signs this run's leaves.
struct Ca {
    /// For rcgen's `signed_by`: issuer name and key identifier (re-signed from the
    /// parsed parameters when the CA was loaded, so not the bytes of `ca.pem`).
    issuer: Certificate,
    key: KeyPair,
    /// The CA certificate as distributed (the bytes of `ca.pem`).
    der: CertificateDer<'static>,
    not_after: OffsetDateTime,
}

/// Writes the CA (unless one exists in `req.dir`), the server certificate (unless
/// `req.hosts` is empty) and one client certificate per name in `req.clients`.
///
/// Inputs are checked before anything is written. Leaf files are replaced atomically;
/// an existing `ca.pem` + `ca.key` is reused and never modified, and only one of the
/// two existing is an error. Every issued leaf is verified against the CA (with rustls'
/// WebPKI verifiers) before it is written.
pub fn generate(req: &CertsRequest) -> Result<CertsReport, CertsError> {
    if req.days == 0 || req.days > MAX_DAYS {
        return Err(CertsError::InvalidDays { days: req.days });
    }
    let dir = req.dir.as_path();
    let server_sans = req
        .hosts
        .iter()
        .map(|host| {
            san(host).ok_or_else(|| CertsError::InvalidHost {
                path: dir.join(SERVER_CERT_FILE),
                host: host.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut clients: Vec<&str> = Vec::new();
    for name in &req.clients {
        if !valid_client_name(name) {
            return Err(CertsError::InvalidClientName { name: name.clone() });
        }
        if !clients.contains(&name.as_str()) {
            clients.push(name);
        }
    }

    fs::create_dir_all(dir).map_err(|source| CertsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let not_after = now + Duration::days(i64::from(req.days));
    let mut report = CertsReport::default();

    let ca = match load_ca(dir, now)? {
        Some(ca) => {
            tracing::info!(dir = %dir.display(), "reusing the existing CA");
            ca
        }
        None => {
            let ca = create_ca(dir, not_before, not_after, &mut report.files)?;
            report.ca_created = true;
            tracing::info!(dir = %dir.display(), "created a new CA");
            ca
        }
    };

    let leaf_not_after = if not_after > ca.not_after {
        tracing::warn!(
            ca_not_after = %ca.not_after,
            requested_not_after = %not_after,
            "the CA expires before the requested validity; leaf certificates end with the CA"
        );
        ca.not_after
    } else {
        not_after
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.der.clone())
        .map_err(|e| CertsError::InvalidCa {
            path: dir.join(CA_CERT_FILE),
            reason: e.to_string(),
        })?;
    let roots = Arc::new(roots);

    if !server_sans.is_empty() {
        let cert_path = dir.join(SERVER_CERT_FILE);
        let mut params = leaf_params(not_before, leaf_not_after);
        // RFC 5280 caps a common name at 64 characters; clients match the SANs anyway.
        let common_name = match req.hosts[0].as_str() {
            host if host.len() <= 64 => host,
            _ => "IMN server",
        };
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = server_sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (cert, key) = issue(&ca, params, &cert_path)?;
        check_server(&roots, &provider, &cert, &req.hosts, &cert_path)?;
        write_leaf(
            dir,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE,
            &cert,
            &key,
            &mut report,
        )?;
    }

    for name in clients {
        let cert_file = format!("client-{name}.pem");
        let key_file = format!("client-{name}.key");
        let cert_path = dir.join(&cert_file);
        let mut params = leaf_params(not_before, leaf_not_after);
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert, key) = issue(&ca, params, &cert_path)?;
        check_client(&roots, &provider, &cert, &cert_path)?;
        write_leaf(dir, &cert_file, &key_file, &cert, &key, &mut report)?;
    }

    Ok(report)
}

/// A server SAN from a host: an IP literal, a DNS name, or a `*.` wildcard DNS name.
fn san(host: &str) -> Option<SanType> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(SanType::IpAddress(ip));
    }
    let base = host.strip_prefix("*.").unwrap_or(host);
    // DnsName accepts a trailing dot; certificates carry names without it.
    if base.is_empty() || base.ends_with('.') || DnsName::try_from(base).is_err() {
        return None;
    }
    host.to_string().try_into().ok().map(SanType::DnsName)
}

fn valid_client_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Loads `ca.pem` + `ca.key` from `dir`; `None` if neither exists.
fn load_ca(dir: &Path, now: OffsetDateTime) -> Result<Option<Ca>, CertsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_optional(&cert_path)?;
    let key_pem = read_optional(&key_path)?;
    let (cert_pem, key_pem) = match (cert_pem, key_pem) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(CertsError::CaIncomplete {
                present: cert_path,
                missing: key_path,
            })
        }
        (None, Some(_)) => {
            return Err(CertsError::CaIncomplete {
                present: key_path,
                missing: cert_path,
            })
        }
        (Some(cert), Some(key)) => (cert, key),
    };

    let invalid = |path: &Path, reason: String| CertsError::InvalidCa {
        path: path.to_path_buf(),
        reason,
    };
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| invalid(&cert_path, format!("no PEM certificate: {e}")))?;
    let params = CertificateParams::from_ca_cert_der(&der)
        .map_err(|e| invalid(&cert_path, e.to_string()))?;
    if !matches!(params.is_ca, IsCa::Ca(_)) {
        return Err(invalid(
            &cert_path,
            "not a CA certificate (basic constraints CA is not set)".to_string(),
        ));
    }
    if params.not_after <= now {
        return Err(CertsError::CaExpired {
            path: cert_path,
            not_after: params.not_after,
        });
    }
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        invalid(
            &key_path,
            format!("{e} (a PKCS#8 \"PRIVATE KEY\" PEM is required)"),
        )
    })?;
    // The key must belong to the certificate, or every leaf would fail to verify.
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid(&key_path, format!("no PEM private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(vec![der.clone()], key_der, &provider)
        .map_err(|e| invalid(&key_path, format!("does not match {CA_CERT_FILE}: {e}")))?;

    let not_after = params.not_after;
    let issuer = params
        .self_signed(&key)
        .map_err(|e| invalid(&cert_path, e.to_string()))?;
    Ok(Some(Ca {
        issuer,
        key,
        der,
        not_after,
    }))
}

fn create_ca(
    dir: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    files: &mut Vec<PathBuf>,
) -> Result<Ca, CertsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertsError::Generate {
            path: key_path.clone(),
            source,
        })?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = params
        .self_signed(&key)
        .map_err(|source| CertsError::Generate {
            path: cert_path.clone(),
            source,
        })?;

    // The key first: an interrupted run leaves ca.key alone, which the next run
    // reports instead of silently creating a second CA.
    write_file(&key_path, key.serialize_pem().as_bytes(), FileKind::NewKey)?;
    files.push(key_path);
    write_file(&cert_path, issuer.pem().as_bytes(), FileKind::NewCert)?;
    files.push(cert_path);

    Ok(Ca {
        der: issuer.der().clone(),
        issuer,
        key,
        not_after,
    })
}

fn leaf_params(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

fn issue(
    ca: &Ca,
    params: CertificateParams,
    cert_path: &Path,
) -> Result<(Certificate, KeyPair), CertsError> {
    let generate = |source| CertsError::Generate {
        path: cert_path.to_path_buf(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(generate)?;
    Ok((cert, key))
}

/// A positive, non-zero 128-bit random serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The OS's random source; without it there is no certificate worth issuing.
    getrandom::getrandom(&mut bytes).expect("the OS's random source");
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn check_server(
    roots: &Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    cert: &Certificate,
    hosts: &[String],
    cert_path: &Path,
) -> Result<(), CertsError> {
    let fail = |reason: String| CertsError::SelfCheck {
        path: cert_path.to_path_buf(),
        reason,
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| fail(e.to_string()))?;
    for host in hosts {
        // Wildcard names are not server names; they are checked with one label.
        let name = match host.strip_prefix("*.") {
            Some(base) => format!("imn-check.{base}"),
            None => host.clone(),
        };
        let name = ServerName::try_from(name).map_err(|e| fail(format!("{host}: {e}")))?;
        verifier
            .verify_server_cert(cert.der(), &[], &name, &[], UnixTime::now())
            .map_err(|e| fail(format!("{host}: {e}")))?;
    }
    Ok(())
}

fn check_client(
    roots: &Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    cert: &Certificate,
    cert_path: &Path,
) -> Result<(), CertsError> {
    let fail = |reason: String| CertsError::SelfCheck {
        path: cert_path.to_path_buf(),
        reason,
    };
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| fail(e.to_string()))?
        .verify_client_cert(cert.der(), &[], UnixTime::now())
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

fn write_leaf(
    dir: &Path,
    cert_file: &str,
    key_file: &str,
    cert: &Certificate,
    key: &KeyPair,
    report: &mut CertsReport,
) -> Result<(), CertsError> {
    let key_path = dir.join(key_file);
    write_file(&key_path, key.serialize_pem().as_bytes(), FileKind::Key)?;
    report.files.push(key_path);
    let cert_path = dir.join(cert_file);
    write_file(&cert_path, cert.pem().as_bytes(), FileKind::Cert)?;
    report.files.push(cert_path);
    Ok(())
}

fn read_optional(path: &Path) -> Result<Option<String>, CertsError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    /// A leaf certificate: replaced atomically.
    Cert,
    /// A leaf private key: replaced atomically, mode 0600.
    Key,
    /// A CA certificate: created, never replaced.
    NewCert,
    /// A CA private key: created, never replaced, mode 0600.
    NewKey,
}

/// Every file goes through a fresh temporary file beside it (random name, `O_EXCL |
/// O_NOFOLLOW`, its final mode), synced, then renamed over the target (leaves) or
/// linked to it only if nothing is there (the CA): a symlink planted in the directory
/// is never followed, and keys are 0600 regardless of the umask.
fn write_file(path: &Path, contents: &[u8], kind: FileKind) -> Result<(), CertsError> {
    use imn_cloud::files;
    let result = match kind {
        FileKind::NewKey => files::create_private(path, contents),
        FileKind::NewCert => files::create_with_mode(path, contents, 0o644),
        FileKind::Key => files::write_private(path, contents),
        FileKind::Cert => files::write_with_mode(path, contents, 0o644),
    };
    result.map_err(|source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use crate::test_util::TempDir;

    fn request(dir: &Path) -> CertsRequest {
        CertsRequest {
            dir: dir.to_path_buf(),
            hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            clients: vec!["agent-1".into()],
            days: 30,
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(dir.join(CA_CERT_FILE)).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(roots)
    }

    fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn verify_server(dir: &Path, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        let chain = certs(&dir.join(SERVER_CERT_FILE));
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_client(dir: &Path, file: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        let chain = certs(&dir.join(file));
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn openssl_verify(dir: &Path, purpose: &str, file: &str) -> Option<bool> {
        let output = Command::new("openssl")
            .arg("verify")
            .arg("-purpose")
            .arg(purpose)
            .arg("-CAfile")
            .arg(dir.join(CA_CERT_FILE))
            .arg(dir.join(file))
            .output();
        match output {
            Ok(output) => Some(output.status.success()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => panic!("running openssl: {e}"),
        }
    }

    #[test]
    fn generates_a_ca_server_and_client_that_verify() {
        let tmp = TempDir::new("certs");
        let dir = tmp.0.join("nested");
        let report = generate(&request(&dir)).unwrap();
        assert!(report.ca_created);
        let names: Vec<_> = report
            .files
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "ca.key",
                "ca.pem",
                "server.key",
                "server.pem",
                "client-agent-1.key",
                "client-agent-1.pem"
            ]
        );

        for name in ["localhost", "127.0.0.1", "::1"] {
            verify_server(&dir, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["example.com", "127.0.0.2", "local"] {
            assert!(verify_server(&dir, name).is_err(), "{name} must not verify");
        }
        // server.pem holds the leaf only.
        assert_eq!(certs(&dir.join(SERVER_CERT_FILE)).len(), 1);

        verify_client(&dir, "client-agent-1.pem").unwrap();
        // The server certificate is not a client certificate (EKU serverAuth only).
        assert!(verify_client(&dir, SERVER_CERT_FILE).is_err());
        // Each key belongs to its certificate.
        let provider = provider();
        for (cert, key) in [
            ("server.pem", "server.key"),
            ("client-agent-1.pem", "client-agent-1.key"),
            ("ca.pem", "ca.key"),
        ] {
            let key = PrivateKeyDer::from_pem_file(dir.join(key)).unwrap();
            rustls::sign::CertifiedKey::from_der(certs(&dir.join(cert)), key, &provider)
                .unwrap()
                .keys_match()
                .unwrap();
        }

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in ["ca.key", "server.key", "client-agent-1.key"] {
                let mode = fs::metadata(dir.join(file)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{file}");
            }
        }

        match openssl_verify(&dir, "sslserver", SERVER_CERT_FILE) {
            Some(ok) => {
                assert!(ok, "openssl verify server.pem");
                assert_eq!(
                    openssl_verify(&dir, "sslclient", "client-agent-1.pem"),
                    Some(true),
                    "openssl verify client-agent-1.pem"
                );
                assert_eq!(
                    openssl_verify(&dir, "sslclient", SERVER_CERT_FILE),
                    Some(false),
                    "server.pem is not a client certificate"
                );
            }
            None => println!("note: openssl is not on PATH; skipped `openssl verify`"),
        }
    }

    #[test]
    fn a_second_run_reuses_the_ca_and_keeps_old_leaves_valid() {
        let tmp = TempDir::new("certs");
        let dir = tmp.0.clone();
        generate(&request(&dir)).unwrap();
        let ca_pem = fs::read(dir.join(CA_CERT_FILE)).unwrap();
        let ca_key = fs::read(dir.join(CA_KEY_FILE)).unwrap();
        let server_pem = fs::read(dir.join(SERVER_CERT_FILE)).unwrap();

        let mut second = request(&dir);
        second.hosts = vec!["imn.example".into(), "10.0.0.7".into()];
        second.clients = vec!["agent-2".into(), "agent-2".into()];
        let report = generate(&second).unwrap();
        assert!(!report.ca_created);
        assert!(!report.files.contains(&dir.join(CA_CERT_FILE)));
        assert!(!report.files.contains(&dir.join(CA_KEY_FILE)));
        assert_eq!(report.files.len(), 4, "{:?}", report.files);

        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).unwrap(), ca_pem);
        assert_eq!(fs::read(dir.join(CA_KEY_FILE)).unwrap(), ca_key);
        assert_ne!(fs::read(dir.join(SERVER_CERT_FILE)).unwrap(), server_pem);
        verify_server(&dir, "imn.example").unwrap();
        verify_server(&dir, "10.0.0.7").unwrap();
        assert!(verify_server(&dir, "localhost").is_err());
        // The first run's client certificate still validates; the new one too.
        verify_client(&dir, "client-agent-1.pem").unwrap();
        verify_client(&dir, "client-agent-2.pem").unwrap();
        if openssl_verify(&dir, "sslserver", SERVER_CERT_FILE).is_some() {
            assert_eq!(
                openssl_verify(&dir, "sslclient", "client-agent-2.pem"),
                Some(true)
            );
        }

        // Only clients: no server certificate is touched.
        let server_pem = fs::read(dir.join(SERVER_CERT_FILE)).unwrap();
        let only_clients = CertsRequest {
            hosts: vec![],
            clients: vec!["operator".into()],
            ..request(&dir)
        };
        let report = generate(&only_clients).unwrap();
        assert_eq!(
            report.files,
            [
                dir.join("client-operator.key"),
                dir.join("client-operator.pem")
            ]
        );
        assert_eq!(fs::read(dir.join(SERVER_CERT_FILE)).unwrap(), server_pem);
        verify_client(&dir, "client-operator.pem").unwrap();
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_half_present_or_broken_ca_is_an_error_and_untouched() {
        let tmp = TempDir::new("certs");
        let dir = tmp.0.clone();
        generate(&request(&dir)).unwrap();
        let ca_pem = fs::read(dir.join(CA_CERT_FILE)).unwrap();

        fs::rename(dir.join(CA_KEY_FILE), dir.join("ca.key.bak")).unwrap();
        let err = generate(&request(&dir)).unwrap_err();
        assert!(
            matches!(&err, CertsError::CaIncomplete { present, missing }
                if *present == dir.join(CA_CERT_FILE) && *missing == dir.join(CA_KEY_FILE)),
            "{err}"
        );
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).unwrap(), ca_pem);

        // A key that does not belong to ca.pem.
        fs::copy(dir.join("server.key"), dir.join(CA_KEY_FILE)).unwrap();
        let err = generate(&request(&dir)).unwrap_err();
        assert!(
            matches!(&err, CertsError::InvalidCa { path, .. } if *path == dir.join(CA_KEY_FILE)),
            "{err}"
        );

        // A leaf is not a CA.
        fs::rename(dir.join("ca.key.bak"), dir.join(CA_KEY_FILE)).unwrap();
        fs::copy(dir.join(SERVER_CERT_FILE), dir.join(CA_CERT_FILE)).unwrap();
        let err = generate(&request(&dir)).unwrap_err();
        assert!(
            matches!(&err, CertsError::InvalidCa { path, .. } if *path == dir.join(CA_CERT_FILE)),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_rejected_before_writing() {
        let tmp = TempDir::new("certs");
        let dir = tmp.0.clone();
        for days in [0, MAX_DAYS + 1] {
            let req = CertsRequest {
                days,
                ..request(&dir)
            };
            assert!(matches!(
                generate(&req),
                Err(CertsError::InvalidDays { .. })
            ));
        }
        for host in ["", "bad host", "a..b", "example.com.", "*.", "ex@mple"] {
            let req = CertsRequest {
                hosts: vec![host.into()],
                ..request(&dir)
            };
            assert!(
                matches!(generate(&req), Err(CertsError::InvalidHost { .. })),
                "{host:?}"
            );
        }
        for name in ["", ".", "..", "../x", "a/b", "é", &"a".repeat(65)] {
            let req = CertsRequest {
                clients: vec![name.into()],
                ..request(&dir)
            };
            assert!(
                matches!(generate(&req), Err(CertsError::InvalidClientName { .. })),
                "{name:?}"
            );
        }
        assert!(!dir.exists(), "nothing is written for bad input");

        // Wildcards are accepted and match one label.
        let req = CertsRequest {
            hosts: vec!["*.imn.test".into()],
            clients: vec![],
            ..request(&dir)
        };
        generate(&req).unwrap();
        verify_server(&dir, "api.imn.test").unwrap();
        assert!(verify_server(&dir, "imn.test").is_err());
    }
}
