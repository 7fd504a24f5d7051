//! A report of one certificate: the fields people look at (names, validity, SANs, key,
//! fingerprint), parsed with x509-parser. Verification is rustls's; this only describes.

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use imn_proto::kinds::http::CertInfo;

/// Describes a DER certificate; with `pem`, the PEM too. A certificate that does not
/// parse still gets its fingerprint (and PEM), with `parse_error` saying why.
pub fn summarize(der: &[u8], pem: bool) -> CertInfo {
    let mut info = CertInfo {
        subject: String::new(),
        issuer: String::new(),
        subject_cn: None,
        issuer_cn: None,
        serial: String::new(),
        not_before: String::new(),
        not_after: String::new(),
        not_before_unix: 0,
        not_after_unix: 0,
        dns_names: Vec::new(),
        ip_addrs: Vec::new(),
        is_ca: false,
        sha256: colon_hex(&Sha256::digest(der)),
        key_algorithm: String::new(),
        key_bits: None,
        signature_algorithm: String::new(),
        pem: pem.then(|| to_pem(der)),
        parse_error: None,
    };
    let cert = match X509Certificate::from_der(der) {
        Ok((_, c)) => c,
        Err(e) => {
            info.parse_error = Some(format!("certificate does not parse: {e}"));
            return info;
        }
    };
    info.subject = cert.subject().to_string();
    info.issuer = cert.issuer().to_string();
    let cn = |name: &x509_parser::x509::X509Name| {
        name.iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
    };
    info.subject_cn = cn(cert.subject());
    info.issuer_cn = cn(cert.issuer());
    info.serial = cert.raw_serial_as_string().to_ascii_uppercase();
    let validity = cert.validity();
    info.not_before_unix = validity.not_before.timestamp();
    info.not_after_unix = validity.not_after.timestamp();
    info.not_before = rfc3339(info.not_before_unix);
    info.not_after = rfc3339(info.not_after_unix);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_of(b) {
                        info.ip_addrs.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    info.is_ca = cert.is_ca();
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    info.key_algorithm = match alg.as_str() {
        "1.2.840.113549.1.1.1" => "RSA".to_string(),
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "EC P-256".to_string(),
                Some("1.3.132.0.34") => "EC P-384".to_string(),
                Some("1.3.132.0.35") => "EC P-521".to_string(),
                Some(other) => format!("EC {other}"),
                None => "EC".to_string(),
            }
        }
        "1.3.101.112" => "Ed25519".to_string(),
        "1.3.101.113" => "Ed448".to_string(),
        _ => alg,
    };
    info.key_bits = match spki.parsed() {
        Ok(PublicKey::RSA(k)) => Some(k.key_size() as u32),
        Ok(PublicKey::EC(k)) => Some(k.key_size() as u32),
        _ if info.key_algorithm == "Ed25519" => Some(256),
        _ => None,
    }
    .filter(|b| *b > 0);
    let sig = cert.signature_algorithm.algorithm.to_id_string();
    info.signature_algorithm = match sig.as_str() {
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.3.101.112" => "Ed25519",
        _ => sig.as_str(),
    }
    .to_string();
    info
}

fn ip_of(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(<[u8; 4]>::try_from(b).ok()?.into()),
        16 => Some(<[u8; 16]>::try_from(b).ok()?.into()),
        _ => None,
    }
}

/// Upper-case hex, bytes separated by colons.
pub fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A certificate as PEM, base64 in lines of 64.
pub fn to_pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut s = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    s.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 is ASCII, so any chunk is UTF-8.
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Unix seconds as RFC 3339 UTC (`2026-11-27T12:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = crate::calendar::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_dates() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(colon_hex(&[0xab, 1]), "AB:01");
    }

    #[test]
    fn garbage_is_described_not_panicked_on() {
        let c = summarize(&[0x30, 0x03, 0x02, 0x01], true);
        assert!(c.parse_error.is_some());
        assert_eq!(c.sha256.len(), 32 * 3 - 1);
        assert!(c
            .pem
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\nMAMCAQ==\n"));
    }
}
