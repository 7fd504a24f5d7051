//! Agent credentials and message authentication, shared by agent, bridge and backend.
//!
//! An enrolled agent holds one random secret, its **token**. From it come:
//! - the MQTT password (the token itself; the user name and client id are the agent id).
//!   The cloud stores only [`token_hash`], so a leaked store does not let anyone log in;
//! - a **message key** ([`message_key`]), with which the agent signs every uplink
//!   message and the bridge signs every downlink one. The cloud stores the key, since it
//!   must verify; a leaked key lets its holder forge messages for that agent but not
//!   connect as it.
//!
//! Signing makes "no agent can speak for another" hold whatever the broker: even
//! through a broker with no topic ACL, a message on agent B's topic must carry a tag
//! made with B's key, which agent A does not have.
//!
//! A signed payload is `[SIGNED][tag: 16 bytes][the payload]`, where the tag is the
//! first 16 bytes of HMAC-SHA256(key, topic ‖ 0x00 ‖ payload). The marker byte differs
//! from every wire version byte, so signed and unsigned payloads cannot be confused.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// First byte of a signed payload.
pub const SIGNED: u8 = 0xA1;
/// Length of the tag in a signed payload.
pub const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + TAG_LEN;

/// A message key: derived from an agent's token, shared by the agent and the cloud.
pub type MessageKey = [u8; 32];

/// Why a signed payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("message is not signed")]
    Unsigned,
    #[error("message signature does not match the topic's agent")]
    BadSignature,
}

impl AuthError {
    /// Short name for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Unsigned => "unsigned",
            AuthError::BadSignature => "bad_signature",
        }
    }
}

/// The hash under which a token is stored: hex SHA-256. Tokens are 256-bit random, so a
/// slow password hash would add nothing but CPU on every connection.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// The message key of a token.
pub fn message_key(token: &str) -> MessageKey {
    let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"imn/v1 message key");
    mac.finalize().into_bytes().into()
}

fn mac_of(key: &MessageKey, topic: &str, payload: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(topic.as_bytes());
    mac.update(&[0]);
    mac.update(payload);
    mac
}

/// Signs `payload` for `topic`.
pub fn sign(key: &MessageKey, topic: &str, payload: &[u8]) -> Vec<u8> {
    let tag = mac_of(key, topic, payload).finalize().into_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(SIGNED);
    out.extend_from_slice(&tag[..TAG_LEN]);
    out.extend_from_slice(payload);
    out
}

/// Checks a signed payload and returns the payload inside it. Constant-time compare.
pub fn verify<'a>(key: &MessageKey, topic: &str, signed: &'a [u8]) -> Result<&'a [u8], AuthError> {
    let (tag, payload) = split(signed).ok_or(AuthError::Unsigned)?;
    mac_of(key, topic, payload)
        .verify_truncated_left(tag)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(payload)
}

/// The payload inside a signed payload, unchecked (for a cloud running without auth);
/// an unsigned payload is returned as it is.
pub fn strip(payload: &[u8]) -> &[u8] {
    split(payload).map(|(_, p)| p).unwrap_or(payload)
}

/// Whether `payload` is in the signed format.
pub fn is_signed(payload: &[u8]) -> bool {
    split(payload).is_some()
}

fn split(signed: &[u8]) -> Option<(&[u8], &[u8])> {
    if signed.len() < HEADER_LEN || signed[0] != SIGNED {
        return None;
    }
    Some((&signed[1..HEADER_LEN], &signed[HEADER_LEN..]))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Lower-case hex, for keys in stores and config files.
pub fn to_hex(bytes: &[u8]) -> String {
    hex(bytes)
}

/// Parses 64 hex digits into a message key.
pub fn key_from_hex(s: &str) -> Option<MessageKey> {
    if s.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        key[i] = (hi * 16 + lo) as u8;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WIRE_VERSION;

    #[test]
    fn signed_round_trip_and_forgeries() {
        let a = message_key("token-of-a");
        let b = message_key("token-of-b");
        assert_ne!(a, b);
        let signed = sign(&a, "imn/v1/a/out", b"\x01hello");
        assert_eq!(verify(&a, "imn/v1/a/out", &signed), Ok(&b"\x01hello"[..]));
        // Another agent's key, another topic, a flipped bit: all refused.
        assert_eq!(
            verify(&b, "imn/v1/a/out", &signed),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&a, "imn/v1/b/out", &signed),
            Err(AuthError::BadSignature)
        );
        let mut flipped = signed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            verify(&a, "imn/v1/a/out", &flipped),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&a, "imn/v1/a/out", b"\x01hello"),
            Err(AuthError::Unsigned)
        );
        assert_eq!(verify(&a, "imn/v1/a/out", b""), Err(AuthError::Unsigned));
        assert_eq!(strip(&signed), b"\x01hello");
        assert_eq!(strip(b"\x01plain"), b"\x01plain");
    }

    #[test]
    fn marker_is_not_a_wire_version() {
        assert_ne!(SIGNED, WIRE_VERSION);
        assert_ne!(SIGNED, crate::wire::LEGACY_WIRE_VERSION);
    }

    #[test]
    fn hashes_and_keys_are_stable_and_hex_round_trips() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let k = message_key("abc");
        assert_eq!(key_from_hex(&to_hex(&k)), Some(k));
        assert_eq!(key_from_hex("zz"), None);
        assert_eq!(key_from_hex(&"g".repeat(64)), None);
    }
}
