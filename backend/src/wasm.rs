//! WebAssembly modules the operator added (`POST /admin/modules`, `imn modules add`):
//! signed packages (`imn_proto::wasm`), checked against the backend's release keys,
//! kept in the store (fleet documents of kind [`DOC_KIND`]) and in memory with their
//! compiled parameter schemas. Requests for such a module are validated against its
//! own schema and checked against the policy for the hosts its manifest's `targets`
//! name, like a built-in module's; the agent checks every address again.
//!
//! With several backends on one store, a backend that does not know a name reads the
//! store before it answers "unknown module", so a module added through one is known
//! to all.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use imn_proto::policy::{Demand, Target};
use imn_proto::release::{hex, unhex};
use imn_proto::wasm::Manifest;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::store::Store;

/// The kind of the store documents that hold packages.
pub const DOC_KIND: &str = "wasm_module";
/// The most modules a backend keeps.
pub const MAX_MODULES: usize = 256;

/// One added module.
pub struct Entry {
    pub manifest: Manifest,
    /// The whole signed package, as agents receive it, and its SHA-256.
    pub package: Vec<u8>,
    package_sha256: String,
    pub added_ms: i64,
    /// Sent to every agent that can run WebAssembly and says hello without it.
    pub load_on_hello: bool,
    validator: jsonschema::Validator,
}

impl Entry {
    /// What a run of this module with `params` asks of the network: the hosts its
    /// manifest's `targets` name, at most its packet limit, and (as HTTP redirects
    /// do) possibly addresses its parameters do not name: the agent checks those.
    pub fn demand(&self, params: &Value) -> Demand {
        let mut targets = Vec::new();
        for field in &self.manifest.source.targets {
            match params.get(field) {
                Some(Value::String(h)) => targets.push(Target::new(field.clone(), h.clone())),
                Some(Value::Array(a)) => targets.extend(
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|h| Target::new(field.clone(), h)),
                ),
                _ => {}
            }
        }
        Demand {
            targets,
            count: None,
            probes: self.manifest.source.limits.capped().packets_sent,
            rate: None,
            redirects: true,
        }
    }

    pub fn validate(&self, params: &Value) -> Result<(), ApiError> {
        crate::validation::check_schema(&self.validator, params)
    }

    /// As `GET /modules` lists it.
    pub fn json(&self) -> Value {
        let s = &self.manifest.source;
        json!({
            "name": s.name,
            "version": s.version,
            "description": s.description,
            "kind": "wasm",
            "schema_hash": self.manifest.schema_hash(),
            "schema": s.params_schema,
            "result_schema": s.result_schema,
            "targets": s.targets,
            "limits": s.limits.capped(),
            "timeout_ms": s.timeout_ms,
            "sha256": self.manifest.sha256,
            "size": self.manifest.size,
            "key": self.manifest.key,
            "signed_ms": self.manifest.signed_ms,
            "added_ms": self.added_ms,
            "load_on_hello": self.load_on_hello,
        })
    }
}

fn compile(
    package: Vec<u8>,
    keys: &[String],
    added_ms: i64,
    load_on_hello: bool,
) -> Result<Entry, ApiError> {
    let refused = |e: String| ApiError::InvalidParams {
        field: "package".into(),
        rule: "signed_module".into(),
        message: format!("module refused: {e}"),
    };
    let (manifest, _) =
        imn_proto::wasm::open(&package, keys).map_err(|e| refused(e.to_string()))?;
    let validator = jsonschema::validator_for(&manifest.source.params_schema).map_err(|e| {
        refused(format!(
            "manifest field `params_schema`: not a JSON Schema: {e}"
        ))
    })?;
    jsonschema::validator_for(&manifest.source.result_schema).map_err(|e| {
        refused(format!(
            "manifest field `result_schema`: not a JSON Schema: {e}"
        ))
    })?;
    Ok(Entry {
        manifest,
        package_sha256: imn_proto::release::sha256_hex(&package),
        package,
        added_ms,
        load_on_hello,
        validator,
    })
}

/// How long a backend trusts its copy of a module (or of its absence) before it
/// reads the store again: another backend on the same store may have replaced or
/// deleted it.
const FRESH: Duration = Duration::from_secs(5);

struct Cached {
    entry: Option<Arc<Entry>>,
    read_at: Instant,
}

/// The modules, by name.
pub struct WasmModules {
    by_name: RwLock<BTreeMap<String, Cached>>,
    fresh: Duration,
}

impl Default for WasmModules {
    fn default() -> Self {
        WasmModules {
            by_name: RwLock::default(),
            fresh: FRESH,
        }
    }
}

impl WasmModules {
    fn insert(&self, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        self.remember(e.manifest.name(), Some(e.clone()));
        e
    }

    fn remember(&self, name: &str, entry: Option<Arc<Entry>>) {
        if let Ok(mut m) = self.by_name.write() {
            // Misses are remembered too (bounded: only names a module could have).
            if entry.is_none() && !m.contains_key(name) && m.len() >= 4 * MAX_MODULES {
                m.retain(|_, c| c.entry.is_some());
            }
            m.insert(
                name.to_string(),
                Cached {
                    entry,
                    read_at: Instant::now(),
                },
            );
        }
    }

    /// Reads every stored package (at start); one that no longer verifies (the keys
    /// changed) is skipped with a warning.
    pub async fn load(&self, store: &dyn Store, keys: &[String]) {
        let Ok(docs) = store.docs(DOC_KIND).await else {
            return;
        };
        for (name, doc) in docs {
            match Self::from_doc(&doc, keys) {
                Ok(e) => {
                    self.insert(e);
                }
                Err(e) => {
                    tracing::warn!(module = %name, error = %e, "stored WebAssembly module skipped")
                }
            }
        }
    }

    fn from_doc(doc: &str, keys: &[String]) -> Result<Entry, ApiError> {
        let v: Value = serde_json::from_str(doc).map_err(|e| ApiError::Internal(e.to_string()))?;
        let package = v
            .get("package")
            .and_then(Value::as_str)
            .and_then(unhex)
            .ok_or_else(|| ApiError::Internal("stored module without its package".into()))?;
        let added = v.get("added_ms").and_then(Value::as_i64).unwrap_or(0);
        let on_hello = v
            .get("load_on_hello")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        compile(package, keys, added, on_hello)
    }

    /// The module named `name`: this backend's copy if it read it in the last
    /// [`FRESH`], else the store's (another backend may have replaced or deleted it).
    pub async fn get(&self, store: &dyn Store, keys: &[String], name: &str) -> Option<Arc<Entry>> {
        if imn_proto::wasm::check_name(name).is_err() {
            return None;
        }
        let held = self
            .by_name
            .read()
            .ok()?
            .get(name)
            .map(|c| (c.entry.clone(), c.read_at.elapsed() < self.fresh));
        if let Some((entry, true)) = held.clone() {
            return entry;
        }
        let doc = match store.doc(DOC_KIND, name).await {
            Ok(doc) => doc,
            // The store is away: what this backend had, if it had it.
            Err(_) => return held.and_then(|(e, _)| e),
        };
        let Some(doc) = doc else {
            self.remember(name, None);
            return None;
        };
        // The same package as held: no need to check and compile it again.
        let same = held.as_ref().and_then(|(e, _)| e.as_ref()).filter(|e| {
            serde_json::from_str::<Value>(&doc)
                .ok()
                .and_then(|v| v.get("package_sha256")?.as_str().map(str::to_string))
                .is_some_and(|sha| sha == e.package_sha256)
        });
        if let Some(e) = same.cloned() {
            self.remember(name, Some(e.clone()));
            return Some(e);
        }
        match Self::from_doc(&doc, keys) {
            Ok(e) => Some(self.insert(e)),
            Err(error) => {
                tracing::warn!(module = %name, %error, "stored WebAssembly module does not verify");
                self.remember(name, None);
                None
            }
        }
    }

    /// Only what this backend holds in memory (no store read).
    pub fn cached(&self, name: &str) -> Option<Arc<Entry>> {
        self.by_name.read().ok()?.get(name)?.entry.clone()
    }

    pub fn all(&self) -> Vec<Arc<Entry>> {
        self.by_name
            .read()
            .map(|m| m.values().filter_map(|c| c.entry.clone()).collect())
            .unwrap_or_default()
    }

    /// Checks and stores a package; the entry and whether it replaced another
    /// version. A version older than the one stored is refused.
    pub async fn add(
        &self,
        store: &dyn Store,
        keys: &[String],
        package: Vec<u8>,
        now_ms: i64,
        load_on_hello: bool,
    ) -> Result<(Arc<Entry>, bool), ApiError> {
        if keys.is_empty() {
            return Err(ApiError::refused(
                "body",
                "release_keys",
                "module: this backend trusts no release keys (start it with --release-keys)".into(),
            ));
        }
        let e = compile(package, keys, now_ms, load_on_hello)?;
        let name = e.manifest.name().to_string();
        let old = self.get(store, keys, &name).await;
        if let Some(old) = &old {
            if imn_proto::release::compare_versions(
                &old.manifest.source.version,
                &e.manifest.source.version,
            ) == Some(std::cmp::Ordering::Greater)
            {
                return Err(ApiError::InvalidParams {
                    field: "version".into(),
                    rule: "newer".into(),
                    message: format!(
                        "module refused: version: {} is older than {} already added",
                        e.manifest.source.version, old.manifest.source.version
                    ),
                });
            }
        } else if self.all().len() >= MAX_MODULES {
            return Err(ApiError::Conflict(format!(
                "at most {MAX_MODULES} WebAssembly modules; delete one first"
            )));
        }
        let doc = json!({
            "package": hex(&e.package),
            "added_ms": now_ms,
            "package_sha256": e.package_sha256,
            "version": e.manifest.source.version,
            "load_on_hello": load_on_hello,
        })
        .to_string();
        store
            .put_doc(DOC_KIND, &name, &doc, now_ms)
            .await
            .map_err(|e| ApiError::Unavailable(format!("store: {e}")))?;
        tracing::info!(module = %name, version = %e.manifest.source.version, size = e.manifest.size, "WebAssembly module added");
        Ok((self.insert(e), old.is_some()))
    }

    /// Forgets a module (agents that loaded it keep it until unloaded).
    pub async fn delete(&self, store: &dyn Store, name: &str) -> Result<bool, ApiError> {
        let gone = store
            .delete_doc(DOC_KIND, name)
            .await
            .map_err(|e| ApiError::Unavailable(format!("store: {e}")))?;
        let here = self.cached(name).is_some();
        self.remember(name, None);
        Ok(gone || here)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::release::SigningKey;
    use imn_proto::wasm::{Limits, Source};

    fn package(key: &SigningKey, version: &str) -> Vec<u8> {
        let source = Source {
            name: "probe_x".into(),
            version: version.into(),
            description: String::new(),
            timeout_ms: 1000,
            params_schema: json!({"type": "object", "required": ["host"]}),
            result_schema: json!({"type": "object"}),
            targets: vec!["host".into()],
            limits: Limits::default(),
        };
        imn_proto::wasm::sign(key, source, b"\0asm\x01\0\0\0", 1).unwrap()
    }

    /// Two backends on one store: what one adds, replaces or deletes, the other
    /// sees once its copy is older than `fresh`; an older version is refused.
    #[tokio::test]
    async fn backends_on_one_store_agree_on_modules() {
        let dir = std::env::temp_dir().join(format!("imn-wasm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::SqliteStore::open(&dir.join("s.sqlite")).unwrap();
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let keys = vec![key.public_hex()];
        let (a, b) = (
            WasmModules::default(),
            WasmModules {
                fresh: Duration::ZERO,
                ..WasmModules::default()
            },
        );
        assert!(b.get(&store, &keys, "probe_x").await.is_none());
        let (e, replaced) = a
            .add(&store, &keys, package(&key, "1.0.0"), 1, false)
            .await
            .unwrap();
        assert!(!replaced);
        assert_eq!(
            b.get(&store, &keys, "probe_x")
                .await
                .unwrap()
                .manifest
                .sha256,
            e.manifest.sha256
        );
        a.add(&store, &keys, package(&key, "1.1.0"), 2, false)
            .await
            .unwrap();
        let seen = b.get(&store, &keys, "probe_x").await.unwrap();
        assert_eq!(seen.manifest.source.version, "1.1.0");
        // Parameters are checked against the module's own schema.
        let err = seen.validate(&json!({})).unwrap_err().to_string();
        assert!(err.contains("host"), "{err}");
        assert_eq!(seen.demand(&json!({"host": "192.0.2.1"})).targets.len(), 1);
        let old = b.add(&store, &keys, package(&key, "1.0.5"), 3, false).await;
        assert!(
            matches!(old, Err(ApiError::InvalidParams { ref field, .. }) if field == "version")
        );
        assert!(a.delete(&store, "probe_x").await.unwrap());
        assert!(b.get(&store, &keys, "probe_x").await.is_none());
        // Another key's package is refused, naming the package.
        let other = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let refused = a
            .add(&store, &keys, package(&other, "2.0.0"), 4, false)
            .await;
        assert!(
            matches!(refused, Err(ApiError::InvalidParams { ref field, .. }) if field == "package")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
