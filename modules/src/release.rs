//! Signed agent releases: what an operator signs, what the backend stores and serves,
//! and what an agent checks before it runs a new binary. Both ends call the same code.
//!
//! A signed release file (`FILE.signed`, made by `imn releases sign`) is:
//!
//! ```text
//! IMN-RELEASE 1\n
//! {"name":"imn-agent","version":"0.2.0","arch":"aarch64",...}\n   (the manifest, one line)
//! <128 hex digits: the Ed25519 signature>\n
//! <the binary, `size` bytes>
//! ```
//!
//! The signature covers [`SIGNING_CONTEXT`] followed by the manifest line exactly as
//! stored, so the manifest's name, version, architecture, size, SHA-256, expiry,
//! rollback flag and signing key are all signed, and nothing has to be re-encoded
//! the same way to verify. The operator's private key never reaches the backend; an
//! agent trusts the public keys in its configuration, nothing the backend says.
//!
//! Everything here is bounded: the header is at most [`MAX_HEADER`] bytes, every text
//! field has a length and alphabet, a release is at most [`MAX_SIZE`] bytes.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first line of a signed release file.
pub const MAGIC: &[u8] = b"IMN-RELEASE 1\n";
/// What the signature covers, before the manifest line: a signature made for
/// anything else never verifies as a release.
pub const SIGNING_CONTEXT: &[u8] = b"imn release manifest v1\n";
/// The header (magic, manifest line, signature line) is at most this long.
pub const MAX_HEADER: usize = 4096;
/// A release binary is at most 64 MiB.
pub const MAX_SIZE: u64 = 64 << 20;
/// How far a verifier's clock may be behind a release's signing time (clocks differ).
pub const CLOCK_SLACK_MS: i64 = 10 * 60_000;
/// The only name a release has today: the agent binary.
pub const AGENT: &str = "imn-agent";

/// What is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// `std::env::consts::ARCH` of the binary: `aarch64`, `arm`, `x86_64`, ...
    pub arch: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the binary.
    pub sha256: String,
    /// When the signature was made and when it stops being valid (ms since the epoch).
    pub signed_ms: i64,
    pub expires_ms: i64,
    /// Signed as a rollback: an agent on a newer version may install it.
    #[serde(default)]
    pub rollback: bool,
    /// The signer's Ed25519 public key, hex: which trusted key to check it with.
    pub key: String,
}

/// A manifest line with its signature, as carried in a command and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest line exactly as signed (no newline).
    pub manifest: String,
    /// Hex Ed25519 signature.
    pub signature: String,
}

/// Why a release is refused. Each names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a signed IMN release: {0}")]
    Format(String),
    #[error("manifest field `{field}`: {rule}")]
    Field { field: &'static str, rule: String },
    #[error("signature: made by key {key}, which is not trusted here")]
    UntrustedKey { key: String },
    #[error(
        "signature: does not verify against key {key} (the manifest or the signature was altered)"
    )]
    BadSignature { key: String },
    #[error("signed_ms: the release was signed at {signed_ms}, after this device's clock ({now_ms}): is its clock set?")]
    Clock { signed_ms: i64, now_ms: i64 },
    #[error("expires_ms: the release expired at {expires_ms} (now {now_ms})")]
    Expired { expires_ms: i64, now_ms: i64 },
    #[error("size: the file has {actual} bytes, the manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error(
        "sha256: the file's is {actual}, the manifest says {expected} (the binary was altered)"
    )]
    Hash { expected: String, actual: String },
    #[error(
        "version: {version} is older than {current}, and the release is not signed as a rollback"
    )]
    Downgrade { version: String, current: String },
    #[error("version: {version} is what runs already")]
    Same { version: String },
    #[error("arch: the release is for {release}, this agent is {agent}")]
    Arch { release: String, agent: String },
}

fn field(field: &'static str, rule: impl Into<String>) -> Refused {
    Refused::Field {
        field,
        rule: rule.into(),
    }
}

/// A version: dot-separated numbers, optionally `-prerelease` and `+build`, at most 64
/// characters of `0-9 A-Z a-z . - +`.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'+')
    {
        return Err("may hold only 0-9 A-Z a-z . - +".into());
    }
    parse_version(v)
        .map(|_| ())
        .ok_or_else(|| "must be numbers separated by dots (like 1.4.2 or 1.4.2-rc1)".into())
}

/// (numbers, prerelease) of a version; the build part is ignored.
fn parse_version(v: &str) -> Option<(Vec<u64>, Option<&str>)> {
    let v = v.split_once('+').map_or(v, |(a, _)| a);
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let nums: Option<Vec<u64>> = core
        .split('.')
        .map(|p| {
            if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse().ok()
            }
        })
        .collect();
    let nums = nums?;
    if nums.is_empty() || nums.len() > 4 || pre.is_some_and(str::is_empty) {
        return None;
    }
    Some((nums, pre))
}

/// Orders two versions (semver-like: numbers compared as numbers, missing parts are
/// zero, a prerelease comes before its release). None if either does not parse.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (an, ap) = parse_version(a)?;
    let (bn, bp) = parse_version(b)?;
    for i in 0..an.len().max(bn.len()) {
        let (x, y) = (
            an.get(i).copied().unwrap_or(0),
            bn.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return Some(x.cmp(&y));
        }
    }
    Some(match (ap, bp) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => x.cmp(y),
    })
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// Decodes hex (either case); None if it is not.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl Manifest {
    /// Checks every field's form (not the signature, expiry or file).
    pub fn check(&self) -> Result<(), Refused> {
        if self.name != AGENT {
            return Err(field("name", format!("must be {AGENT:?}")));
        }
        check_version(&self.version).map_err(|r| field("version", r))?;
        if self.arch.is_empty()
            || self.arch.len() > 32
            || !self
                .arch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(field("arch", "must be 1 to 32 characters of A-Z a-z 0-9 _"));
        }
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(field("size", format!("must be 1 to {MAX_SIZE} bytes")));
        }
        if !is_hex(&self.sha256, 64) {
            return Err(field("sha256", "must be 64 lowercase hex digits"));
        }
        if !is_hex(&self.key, 64) {
            return Err(field(
                "key",
                "must be 64 lowercase hex digits (an Ed25519 public key)",
            ));
        }
        if self.expires_ms <= self.signed_ms {
            return Err(field("expires_ms", "must be after signed_ms"));
        }
        Ok(())
    }

    /// The manifest line.
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("a manifest serializes")
    }
}

/// Checks a signed manifest: its form, that its key is one of `trusted` (hex public
/// keys), that the signature verifies, and that it has not expired at `now_ms`.
pub fn verify_manifest(
    signed: &SignedManifest,
    trusted: &[String],
    now_ms: i64,
) -> Result<Manifest, Refused> {
    let m = verify_signature(signed, trusted)?;
    // A device whose clock is behind the signing (a router without a real-time clock,
    // before NTP) cannot tell an expired release from a valid one: it waits.
    if now_ms.saturating_add(CLOCK_SLACK_MS) < m.signed_ms {
        return Err(Refused::Clock {
            signed_ms: m.signed_ms,
            now_ms,
        });
    }
    if now_ms >= m.expires_ms {
        return Err(Refused::Expired {
            expires_ms: m.expires_ms,
            now_ms,
        });
    }
    Ok(m)
}

/// Checks a signed manifest's form, key and signature, but not its expiry: what an
/// installed release is checked against each time it starts (a release installed in
/// time keeps running after its signature's expiry).
pub fn verify_signature(signed: &SignedManifest, trusted: &[String]) -> Result<Manifest, Refused> {
    if signed.manifest.len() > MAX_HEADER {
        return Err(Refused::Format(format!(
            "the manifest is longer than {MAX_HEADER} bytes"
        )));
    }
    let m: Manifest = serde_json::from_str(&signed.manifest)
        .map_err(|e| Refused::Format(format!("manifest: {e}")))?;
    m.check()?;
    if !trusted.iter().any(|k| k.eq_ignore_ascii_case(&m.key)) {
        return Err(Refused::UntrustedKey { key: m.key });
    }
    if !signature_verifies(SIGNING_CONTEXT, &signed.manifest, &signed.signature, &m.key) {
        return Err(Refused::BadSignature { key: m.key });
    }
    Ok(m)
}

/// Checks a binary against its (verified) manifest: size, then SHA-256.
pub fn verify_binary(m: &Manifest, binary: &[u8]) -> Result<(), Refused> {
    if binary.len() as u64 != m.size {
        return Err(Refused::Size {
            expected: m.size,
            actual: binary.len() as u64,
        });
    }
    let actual = sha256_hex(binary);
    if actual != m.sha256 {
        return Err(Refused::Hash {
            expected: m.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Whether an agent running `current` on `arch` may install `m`: the same
/// architecture, not the same version, and not older unless signed as a rollback.
pub fn check_install(m: &Manifest, current: &str, arch: &str) -> Result<(), Refused> {
    if m.arch != arch {
        return Err(Refused::Arch {
            release: m.arch.clone(),
            agent: arch.into(),
        });
    }
    match compare_versions(&m.version, current) {
        Some(Ordering::Equal) => Err(Refused::Same {
            version: m.version.clone(),
        }),
        Some(Ordering::Less) if !m.rollback => Err(Refused::Downgrade {
            version: m.version.clone(),
            current: current.into(),
        }),
        // A current version that does not parse (a development build) takes any.
        _ => Ok(()),
    }
}

/// Splits a signed release file into its signed manifest and binary (no checks
/// beyond the layout).
pub fn split(file: &[u8]) -> Result<(SignedManifest, &[u8]), Refused> {
    split_signed(
        file,
        MAGIC,
        "it does not start with \"IMN-RELEASE 1\"",
        MAX_HEADER,
    )
}

/// The layout every signed IMN file shares (releases, WebAssembly module packages):
/// `magic`, a manifest line found within `scan` bytes, a line of 128 hex digits (the
/// signature), and the body. `no_magic` is the refusal when `magic` is missing.
pub(crate) fn split_signed<'a>(
    file: &'a [u8],
    magic: &[u8],
    no_magic: &str,
    scan: usize,
) -> Result<(SignedManifest, &'a [u8]), Refused> {
    let rest = file
        .strip_prefix(magic)
        .ok_or_else(|| Refused::Format(no_magic.into()))?;
    let head = &rest[..rest.len().min(scan)];
    let nl = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| Refused::Format(format!("no manifest line within {scan} bytes")))?;
    let manifest = std::str::from_utf8(&rest[..nl])
        .map_err(|_| Refused::Format("the manifest is not UTF-8".into()))?;
    let rest = &rest[nl + 1..];
    if rest.len() < 129 || rest[128] != b'\n' {
        return Err(Refused::Format(
            "the line after the manifest must be 128 hex digits (the signature)".into(),
        ));
    }
    let signature = std::str::from_utf8(&rest[..128])
        .map_err(|_| Refused::Format("the signature is not hex".into()))?;
    Ok((
        SignedManifest {
            manifest: manifest.into(),
            signature: signature.into(),
        },
        &rest[129..],
    ))
}

/// Whether `signature` (hex) is `key`'s (hex Ed25519 public key) over `context`
/// followed by `line`.
pub(crate) fn signature_verifies(context: &[u8], line: &str, signature: &str, key: &str) -> bool {
    let (Some(sig), Some(key)) = (unhex(signature).filter(|s| s.len() == 64), unhex(key)) else {
        return false;
    };
    let mut msg = Vec::with_capacity(context.len() + line.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(line.as_bytes());
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
        .verify(&msg, &sig)
        .is_ok()
}

/// A signed file: `magic`, `line`, its signature by `key` over `context` and `line`,
/// then `body` (the layout [`split_signed`] reads).
pub(crate) fn signed_file(
    key: &SigningKey,
    magic: &[u8],
    context: &[u8],
    line: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut msg = context.to_vec();
    msg.extend_from_slice(line.as_bytes());
    let sig = hex(key.0.sign(&msg).as_ref());
    let mut out = Vec::with_capacity(magic.len() + line.len() + 130 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(sig.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// Reads and fully checks a signed release file: layout, manifest, key, signature,
/// expiry, size and hash. What the backend does on upload; the agent does the same in
/// two steps (the manifest before it downloads, the bytes after).
pub fn open<'a>(
    file: &'a [u8],
    trusted: &[String],
    now_ms: i64,
) -> Result<(SignedManifest, Manifest, &'a [u8]), Refused> {
    let (signed, binary) = split(file)?;
    let m = verify_manifest(&signed, trusted, now_ms)?;
    verify_binary(&m, binary)?;
    Ok((signed, m, binary))
}

/// An operator's signing key (Ed25519, PKCS#8 as ring makes it).
pub struct SigningKey(ring::signature::Ed25519KeyPair);

impl SigningKey {
    /// A new key: its PKCS#8 bytes, to keep off the backend.
    pub fn generate() -> Result<Vec<u8>, String> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "cannot generate an Ed25519 key".into())
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, String> {
        ring::signature::Ed25519KeyPair::from_pkcs8(der)
            .map(SigningKey)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))
    }

    /// The public key, hex: what agents list in `update_keys`.
    pub fn public_hex(&self) -> String {
        use ring::signature::KeyPair;
        hex(self.0.public_key().as_ref())
    }

    /// Signs `binary` as `version` for `arch`, valid until `expires_ms`: the whole
    /// signed release file.
    pub fn sign(
        &self,
        binary: &[u8],
        version: &str,
        arch: &str,
        now_ms: i64,
        expires_ms: i64,
        rollback: bool,
    ) -> Result<Vec<u8>, Refused> {
        let m = Manifest {
            name: AGENT.into(),
            version: version.into(),
            arch: arch.into(),
            size: binary.len() as u64,
            sha256: sha256_hex(binary),
            signed_ms: now_ms,
            expires_ms,
            rollback,
            key: self.public_hex(),
        };
        m.check()?;
        Ok(signed_file(self, MAGIC, SIGNING_CONTEXT, &m.line(), binary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap()
    }

    #[test]
    fn a_signed_file_opens_with_its_key_only() {
        let k = key();
        let bin = b"\x7fELF pretend binary".repeat(100);
        let file = k
            .sign(&bin, "0.2.0", "aarch64", NOW, NOW + 1000, false)
            .unwrap();
        let (signed, m, body) = open(&file, &[k.public_hex()], NOW).unwrap();
        assert_eq!(body, &bin[..]);
        assert_eq!(m.version, "0.2.0");
        assert_eq!(verify_manifest(&signed, &[k.public_hex()], NOW).unwrap(), m);
        let other = key();
        assert!(matches!(
            open(&file, &[other.public_hex()], NOW),
            Err(Refused::UntrustedKey { .. })
        ));
        assert!(matches!(
            open(&file, &[k.public_hex()], NOW + 1000),
            Err(Refused::Expired { .. })
        ));
        // A clock far behind the signing: not trusted to judge the expiry.
        assert!(matches!(
            open(&file, &[k.public_hex()], 0),
            Err(Refused::Clock { .. })
        ));
        assert!(open(&file, &[k.public_hex()], NOW - CLOCK_SLACK_MS + 1).is_ok());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let k = key();
        let bin = vec![7u8; 300];
        let file = k
            .sign(&bin, "1.0.0", "x86_64", NOW, NOW + 1000, false)
            .unwrap();
        let trusted = [k.public_hex()];
        for i in 0..file.len() {
            let mut f = file.clone();
            f[i] ^= 0x01;
            assert!(
                open(&f, &trusted, NOW).is_err(),
                "byte {i} flipped was accepted"
            );
        }
        // Truncated or extended.
        assert!(matches!(
            open(&file[..file.len() - 1], &trusted, NOW),
            Err(Refused::Size { .. })
        ));
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            open(&longer, &trusted, NOW),
            Err(Refused::Size { .. })
        ));
    }

    #[test]
    fn a_binary_byte_flip_is_a_hash_refusal() {
        let k = key();
        let file = k
            .sign(&[1u8; 64], "1.0.0", "x86_64", NOW, NOW + 1, false)
            .unwrap();
        let mut f = file.clone();
        let last = f.len() - 1;
        f[last] ^= 0x80;
        let e = open(&f, &[k.public_hex()], NOW).unwrap_err();
        assert!(matches!(e, Refused::Hash { .. }), "{e}");
        assert!(e.to_string().starts_with("sha256:"), "{e}");
    }

    #[test]
    fn versions_order_and_downgrades_need_rollback() {
        use Ordering::*;
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Some(Greater));
        assert_eq!(compare_versions("1.0", "1.0.0"), Some(Equal));
        assert_eq!(compare_versions("1.0.0-rc1", "1.0.0"), Some(Less));
        assert_eq!(compare_versions("1.0.0+b2", "1.0.0+b1"), Some(Equal));
        assert_eq!(compare_versions("x", "1.0"), None);
        assert!(check_version("1..0").is_err());
        assert!(check_version("1.0 ").is_err());
        let k = key();
        let file = k
            .sign(&[1], "0.1.0", "x86_64", NOW, NOW + 1, false)
            .unwrap();
        let (_, m, _) = open(&file, &[k.public_hex()], NOW).unwrap();
        assert!(matches!(
            check_install(&m, "0.2.0", "x86_64"),
            Err(Refused::Downgrade { .. })
        ));
        assert!(matches!(
            check_install(&m, "0.1.0", "x86_64"),
            Err(Refused::Same { .. })
        ));
        assert!(matches!(
            check_install(&m, "0.0.9", "aarch64"),
            Err(Refused::Arch { .. })
        ));
        assert!(check_install(&m, "0.0.9", "x86_64").is_ok());
        let file = k.sign(&[1], "0.1.0", "x86_64", NOW, NOW + 1, true).unwrap();
        let (_, m, _) = open(&file, &[k.public_hex()], NOW).unwrap();
        assert!(check_install(&m, "0.2.0", "x86_64").is_ok());
    }

    #[test]
    fn malformed_files_name_what_is_wrong() {
        assert!(matches!(split(b"ELF"), Err(Refused::Format(_))));
        let mut f = MAGIC.to_vec();
        f.extend(std::iter::repeat_n(b'{', MAX_HEADER + 10));
        assert!(matches!(split(&f), Err(Refused::Format(_))));
        let k = key();
        let e = k
            .sign(&[1], "1.0", "x86 64", NOW, NOW + 1, false)
            .unwrap_err();
        assert!(e.to_string().starts_with("manifest field `arch`"), "{e}");
        let e = k
            .sign(&[1], "one", "x86_64", NOW, NOW + 1, false)
            .unwrap_err();
        assert!(e.to_string().starts_with("manifest field `version`"), "{e}");
        // Unknown fields are refused, not ignored (they would be signed but unread).
        let m = Manifest {
            name: AGENT.into(),
            version: "1.0.0".into(),
            arch: "x86_64".into(),
            size: 1,
            sha256: sha256_hex(&[1]),
            signed_ms: NOW,
            expires_ms: NOW + 1,
            rollback: false,
            key: k.public_hex(),
        };
        let line = m.line().replacen('{', "{\"extra\":1,", 1);
        let s = SignedManifest {
            manifest: line,
            signature: "00".repeat(64),
        };
        assert!(matches!(
            verify_manifest(&s, &[k.public_hex()], NOW),
            Err(Refused::Format(_))
        ));
    }
}
