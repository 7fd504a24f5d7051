//! WebAssembly modules: the signed package an operator adds (`imn modules add`), what
//! the backend stores and validates parameters with, and what an agent checks before
//! it loads the code. Both ends call the same code, as for releases ([`crate::release`]).
//!
//! A package file (`NAME.imnmod`, made by `imn modules sign`) is:
//!
//! ```text
//! IMN-WASM-MODULE 1\n
//! {"name":"stun","version":"1.0.0",...,"params_schema":{...},...}\n   (the manifest, one line)
//! <128 hex digits: the Ed25519 signature>\n
//! <the .wasm, `size` bytes>
//! ```
//!
//! The signature covers [`SIGNING_CONTEXT`] and the manifest line as stored, with the
//! same Ed25519 keys as releases (the agents' `update_keys`, the backend's
//! `--release-keys`): a module key is a release key. The manifest names the module,
//! its parameter and result JSON Schemas, which parameters name hosts it sends to
//! (so the backend checks them against the policy before a run, as it does a built-in
//! module's targets), and the limits every run gets. The agent caps each limit at
//! [`Limits::MAX`] whatever the manifest says.
//!
//! Bounded: the header is at most [`MAX_HEADER`] bytes, the code at most
//! [`MAX_WASM`] (a package travels inline in one MQTT command).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::release::{check_version, sha256_hex, unhex, Refused, SignedManifest};

/// The first line of a package file.
pub const MAGIC: &[u8] = b"IMN-WASM-MODULE 1\n";
/// What a module's signature covers before its manifest line: a release signature
/// never verifies as a module, nor a module's as a release.
pub const SIGNING_CONTEXT: &[u8] = b"imn wasm module manifest v1\n";
/// The manifest line is at most this long (it carries two JSON Schemas).
pub const MAX_HEADER: usize = 64 * 1024;
/// A module's code is at most this long.
pub const MAX_WASM: u64 = 512 * 1024;
/// A result a module emits is at most this long.
pub const MAX_RESULT: usize = 64 * 1024;
/// The version of the host interface (`imn` imports) this build provides.
pub const HOST_ABI: u32 = 1;
/// What an agent's hello says when it can run WebAssembly modules.
pub const FEATURE: &str = "wasm";

/// What every run of a module may use. A run that would pass one ends as `failed`,
/// naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Instructions (wasmi fuel, about one per instruction).
    pub fuel: u64,
    /// Linear memory, in 64 KiB pages.
    pub memory_pages: u32,
    /// Bytes the run may send (TCP and UDP payloads; ICMP and HTTP as their calls
    /// count them).
    pub bytes_sent: u64,
    /// Packets (UDP datagrams, TCP sends, ICMP echoes, HTTP requests) the run may send.
    pub packets_sent: u64,
    /// Sockets open at once.
    pub sockets: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fuel: 100_000_000,
            memory_pages: 32,
            bytes_sent: 64 * 1024,
            packets_sent: 100,
            sockets: 4,
        }
    }
}

impl Limits {
    /// The most any manifest can ask for: an agent caps every run here.
    pub const MAX: Limits = Limits {
        fuel: 5_000_000_000,
        memory_pages: 1024,
        bytes_sent: 16 << 20,
        packets_sent: 10_000,
        sockets: 16,
    };

    /// Each limit at most [`Limits::MAX`]'s.
    pub fn capped(self) -> Limits {
        Limits {
            fuel: self.fuel.min(Limits::MAX.fuel),
            memory_pages: self.memory_pages.min(Limits::MAX.memory_pages),
            bytes_sent: self.bytes_sent.min(Limits::MAX.bytes_sent),
            packets_sent: self.packets_sent.min(Limits::MAX.packets_sent),
            sockets: self.sockets.min(Limits::MAX.sockets),
        }
    }

    fn check(&self) -> Result<(), Refused> {
        let over = |name: &'static str, v: u64, max: u64| {
            if v == 0 || v > max {
                Err(field(name, format!("must be 1 to {max}")))
            } else {
                Ok(())
            }
        };
        over("limits.fuel", self.fuel, Limits::MAX.fuel)?;
        over(
            "limits.memory_pages",
            self.memory_pages.into(),
            Limits::MAX.memory_pages.into(),
        )?;
        over("limits.bytes_sent", self.bytes_sent, Limits::MAX.bytes_sent)?;
        over(
            "limits.packets_sent",
            self.packets_sent,
            Limits::MAX.packets_sent,
        )?;
        over(
            "limits.sockets",
            self.sockets.into(),
            Limits::MAX.sockets.into(),
        )
    }
}

/// What an author writes (`module.json`): the manifest without what signing adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// How long a run may take unless the request says (ms).
    pub timeout_ms: u64,
    /// JSON Schema of the parameters; the backend validates every request with it.
    pub params_schema: Value,
    /// JSON Schema of the result object the module emits.
    pub result_schema: Value,
    /// The parameters that name a host the module sends to (a string, or an array of
    /// strings): the backend checks each against the policy before a run.
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
}

/// What is signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(flatten)]
    pub source: Source,
    /// The host interface version the module was built for.
    pub abi: u32,
    /// Bytes and lowercase hex SHA-256 of the `.wasm`.
    pub size: u64,
    pub sha256: String,
    pub signed_ms: i64,
    /// The signer's Ed25519 public key, hex.
    pub key: String,
}

fn field(field: &'static str, rule: impl Into<String>) -> Refused {
    Refused::Field {
        field,
        rule: rule.into(),
    }
}

/// A module name: 2 to 32 characters of `a-z 0-9 _`, starting with a letter, and not
/// the name of a built-in module.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (2..=32).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err("must be 2 to 32 characters of a-z 0-9 _, starting with a letter".into());
    }
    if crate::catalog::find(name).is_some() {
        return Err(format!("{name:?} is a built-in module"));
    }
    Ok(())
}

impl Source {
    /// Checks every field's form.
    pub fn check(&self) -> Result<(), Refused> {
        check_name(&self.name).map_err(|r| field("name", r))?;
        check_version(&self.version).map_err(|r| field("version", r))?;
        if self.description.len() > 200 || self.description.chars().any(char::is_control) {
            return Err(field(
                "description",
                "must be at most 200 bytes, no control characters",
            ));
        }
        if !(1..=3_600_000).contains(&self.timeout_ms) {
            return Err(field("timeout_ms", "must be 1 to 3600000"));
        }
        for (name, schema) in [
            ("params_schema", &self.params_schema),
            ("result_schema", &self.result_schema),
        ] {
            if schema.get("type").and_then(Value::as_str) != Some("object") {
                return Err(field(
                    name,
                    "must be a JSON Schema of an object (\"type\": \"object\")",
                ));
            }
        }
        if self.targets.len() > 8
            || self
                .targets
                .iter()
                .any(|t| t.is_empty() || t.len() > 64 || t.contains('/'))
        {
            return Err(field(
                "targets",
                "at most 8 parameter names of 1 to 64 characters",
            ));
        }
        self.limits.check()
    }
}

impl Manifest {
    /// Checks every field's form (not the signature or the code).
    pub fn check(&self) -> Result<(), Refused> {
        self.source.check()?;
        if self.abi != HOST_ABI {
            return Err(field(
                "abi",
                format!(
                    "the module was built for host interface {}, this build has {HOST_ABI}",
                    self.abi
                ),
            ));
        }
        if self.size < 8 || self.size > MAX_WASM {
            return Err(field("size", format!("must be 8 to {MAX_WASM} bytes")));
        }
        if self.sha256.len() != 64 || unhex(&self.sha256).is_none() {
            return Err(field("sha256", "must be 64 hex digits"));
        }
        if self.key.len() != 64 || unhex(&self.key).is_none() {
            return Err(field(
                "key",
                "must be 64 hex digits (an Ed25519 public key)",
            ));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.source.name
    }

    /// What hello reports as the module's schema hash (as built-ins do: the first 16
    /// hex digits of the SHA-256 of the parameter schema's JSON).
    pub fn schema_hash(&self) -> String {
        sha256_hex(self.source.params_schema.to_string().as_bytes())[..16].to_string()
    }

    /// The hosts a run with these parameters sends to, by the manifest's `targets`.
    pub fn targets_of(&self, params: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.source.targets {
            match params.get(t) {
                Some(Value::String(s)) => out.push(s.clone()),
                Some(Value::Array(a)) => {
                    out.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
                }
                _ => {}
            }
        }
        out
    }
}

/// A package split into its parts, nothing checked but the layout.
pub fn split(file: &[u8]) -> Result<(SignedManifest, &[u8]), Refused> {
    crate::release::split_signed(
        file,
        MAGIC,
        "not an IMN module package: it does not start with \"IMN-WASM-MODULE 1\"",
        MAX_HEADER + 1,
    )
}

/// Reads and fully checks a package: layout, manifest, key (one of `trusted`, hex
/// public keys), signature, size, hash and the WebAssembly magic. What the backend
/// does when it is added and the agent when it is loaded (and at every start).
pub fn open<'a>(file: &'a [u8], trusted: &[String]) -> Result<(Manifest, &'a [u8]), Refused> {
    let (signed, wasm) = split(file)?;
    let m: Manifest = serde_json::from_str(&signed.manifest)
        .map_err(|e| Refused::Format(format!("manifest: {e}")))?;
    m.check()?;
    if !trusted.iter().any(|k| k.eq_ignore_ascii_case(&m.key)) {
        return Err(Refused::UntrustedKey { key: m.key });
    }
    if !crate::release::signature_verifies(
        SIGNING_CONTEXT,
        &signed.manifest,
        &signed.signature,
        &m.key,
    ) {
        return Err(Refused::BadSignature { key: m.key });
    }
    if wasm.len() as u64 != m.size {
        return Err(Refused::Size {
            expected: m.size,
            actual: wasm.len() as u64,
        });
    }
    let actual = sha256_hex(wasm);
    if !actual.eq_ignore_ascii_case(&m.sha256) {
        return Err(Refused::Hash {
            expected: m.sha256,
            actual,
        });
    }
    if !wasm.starts_with(b"\0asm") {
        return Err(field("size", "the code is not a WebAssembly module"));
    }
    Ok((m, wasm))
}

/// Signs `wasm` as the module `source` describes: the whole package file.
pub fn sign(
    key: &crate::release::SigningKey,
    source: Source,
    wasm: &[u8],
    now_ms: i64,
) -> Result<Vec<u8>, Refused> {
    let m = Manifest {
        source,
        abi: HOST_ABI,
        size: wasm.len() as u64,
        sha256: sha256_hex(wasm),
        signed_ms: now_ms,
        key: key.public_hex(),
    };
    m.check()?;
    if !wasm.starts_with(b"\0asm") {
        return Err(field("size", "the code is not a WebAssembly module"));
    }
    let line = serde_json::to_string(&m).map_err(|e| Refused::Format(e.to_string()))?;
    if line.len() > MAX_HEADER {
        return Err(Refused::Format(format!(
            "the manifest is longer than {MAX_HEADER} bytes"
        )));
    }
    Ok(crate::release::signed_file(
        key,
        MAGIC,
        SIGNING_CONTEXT,
        &line,
        wasm,
    ))
}

/// A WebAssembly module's result: the JSON object it emitted, as text (postcard cannot
/// carry a JSON tree). The API shows the object itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WasmOutput {
    pub json: String,
}

impl WasmOutput {
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }
}

impl crate::summary::Summary for WasmOutput {
    /// The module's own `summary` string if it emits one, else its top-level scalar
    /// fields as `key=value` (cut to one line by the caller).
    fn summary(&self) -> String {
        let v = self.value();
        if let Some(s) = v.get("summary").and_then(Value::as_str) {
            return s.to_string();
        }
        let Value::Object(o) = v else {
            return String::new();
        };
        o.iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

// In JSON (the API, the stores) the result is the module's own object; on the wire
// (postcard, not human-readable) it is the text.
impl Serialize for WasmOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.value().serialize(s)
        } else {
            self.json.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for WasmOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = Value::deserialize(d)?;
            Ok(WasmOutput {
                json: v.to_string(),
            })
        } else {
            Ok(WasmOutput {
                json: String::deserialize(d)?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::SigningKey;
    use serde_json::json;

    fn source() -> Source {
        Source {
            name: "stun".into(),
            version: "1.0.0".into(),
            description: "a STUN binding request".into(),
            timeout_ms: 5000,
            params_schema: json!({"type": "object", "properties": {"server": {"type": "string"}}}),
            result_schema: json!({"type": "object"}),
            targets: vec!["server".into()],
            limits: Limits::default(),
        }
    }

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn a_package_opens_only_with_its_key_and_unaltered() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let trusted = vec![key.public_hex()];
        let file = sign(&key, source(), WASM, 1).unwrap();
        let (m, wasm) = open(&file, &trusted).unwrap();
        assert_eq!(m.name(), "stun");
        assert_eq!(wasm, WASM);
        assert_eq!(m.targets_of(&json!({"server": "a"})), vec!["a"]);

        let other = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        assert!(matches!(
            open(&file, &[other.public_hex()]),
            Err(Refused::UntrustedKey { .. })
        ));
        // One byte of the code changed: the hash says so.
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(open(&bad, &trusted), Err(Refused::Hash { .. })));
        // The manifest changed (a bigger limit): the signature says so.
        let text = String::from_utf8_lossy(&file).replace("\"sockets\":4", "\"sockets\":9");
        assert!(matches!(
            open(text.as_bytes(), &trusted),
            Err(Refused::BadSignature { .. })
        ));
        // A release's signature is not a module's.
        assert!(open(b"IMN-RELEASE 1\n{}\n", &trusted).is_err());
    }

    #[test]
    fn manifests_are_checked_field_by_field() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let refused = |s: Source| sign(&key, s, WASM, 1).unwrap_err().to_string();
        let mut s = source();
        s.name = "ping_module".into();
        assert!(refused(s).contains("built-in"));
        let mut s = source();
        s.name = "Bad-Name".into();
        assert!(refused(s).starts_with("manifest field `name`"));
        let mut s = source();
        s.limits.fuel = Limits::MAX.fuel + 1;
        assert!(refused(s).contains("limits.fuel"));
        let mut s = source();
        s.params_schema = json!({"type": "array"});
        assert!(refused(s).contains("params_schema"));
        assert!(sign(&key, source(), b"not wasm", 1).is_err());
    }

    #[test]
    fn output_is_the_object_in_json_and_text_on_the_wire() {
        let out = WasmOutput {
            json: r#"{"a":1}"#.into(),
        };
        assert_eq!(serde_json::to_value(&out).unwrap(), json!({"a": 1}));
        let bytes = postcard::to_allocvec(&out).unwrap();
        let back: WasmOutput = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, out);
    }
}
