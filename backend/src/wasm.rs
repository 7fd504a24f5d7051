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
    /// The whole signed package, as agents receive it.
    pub package: Vec<u8>,
    pub added_ms: i64,
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
        })
    }
}

fn compile(package: Vec<u8>, keys: &[String], added_ms: i64) -> Result<Entry, ApiError> {
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
        package,
        added_ms,
        validator,
    })
}

/// The modules, by name.
#[derive(Default)]
pub struct WasmModules {
    by_name: RwLock<BTreeMap<String, Arc<Entry>>>,
}

impl WasmModules {
    fn insert(&self, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        if let Ok(mut m) = self.by_name.write() {
            m.insert(e.manifest.name().to_string(), e.clone());
        }
        e
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
        compile(package, keys, added)
    }

    /// The module named `name`, reading the store when this backend does not have it.
    pub async fn get(&self, store: &dyn Store, keys: &[String], name: &str) -> Option<Arc<Entry>> {
        if let Some(e) = self.by_name.read().ok()?.get(name).cloned() {
            return Some(e);
        }
        if imn_proto::wasm::check_name(name).is_err() {
            return None;
        }
        let doc = store.doc(DOC_KIND, name).await.ok()??;
        let e = Self::from_doc(&doc, keys).ok()?;
        Some(self.insert(e))
    }

    /// Only what this backend holds in memory (no store read).
    pub fn cached(&self, name: &str) -> Option<Arc<Entry>> {
        self.by_name.read().ok()?.get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Entry>> {
        self.by_name
            .read()
            .map(|m| m.values().cloned().collect())
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
    ) -> Result<(Arc<Entry>, bool), ApiError> {
        if keys.is_empty() {
            return Err(ApiError::BadRequest(
                "module: this backend trusts no release keys (start it with --release-keys)".into(),
            ));
        }
        let e = compile(package, keys, now_ms)?;
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
        let doc = json!({"package": hex(&e.package), "added_ms": now_ms}).to_string();
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
        let here = self
            .by_name
            .write()
            .map(|mut m| m.remove(name).is_some())
            .unwrap_or(false);
        Ok(gone || here)
    }
}
