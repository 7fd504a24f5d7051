//! WebAssembly modules as the API sees them: adding and deleting packages, looking a
//! module up by name whether it is built in or added, and loading one on an agent.

use std::sync::Arc;

use imn_proto::catalog::{self, ModuleSpec};
use imn_proto::policy::Demand;
use imn_proto::wire::CommandKind;
use serde_json::Value;

use super::Backend;
use crate::error::ApiError;
use crate::wasm::Entry;

/// A module a request names: built in, or added as WebAssembly.
pub enum ModuleKind {
    BuiltIn(&'static ModuleSpec),
    Wasm(Arc<Entry>),
}

impl ModuleKind {
    pub fn demand(&self, params: &Value) -> Demand {
        match self {
            ModuleKind::BuiltIn(spec) => spec.demand(params),
            ModuleKind::Wasm(e) => e.demand(params),
        }
    }

    pub fn default_timeout_ms(&self) -> u64 {
        match self {
            ModuleKind::BuiltIn(spec) => spec.default_timeout_ms,
            ModuleKind::Wasm(e) => e.manifest.source.timeout_ms,
        }
    }

    pub fn takes_rate(&self) -> bool {
        matches!(self, ModuleKind::BuiltIn(spec) if spec.takes_rate)
    }
}

impl Backend {
    /// The module `name`, built in or added; an unknown one names every module.
    pub async fn module_kind(&self, name: &str) -> Result<ModuleKind, ApiError> {
        if let Some(spec) = catalog::find(name) {
            return Ok(ModuleKind::BuiltIn(spec));
        }
        if let Some(e) = self
            .wasm
            .get(self.store.as_ref(), &self.security.release_keys, name)
            .await
        {
            return Ok(ModuleKind::Wasm(e));
        }
        Err(ApiError::UnknownModule {
            module: name.to_string(),
            known: self.module_names(),
        })
    }

    /// Every module's name: the catalog's, then the added ones.
    pub fn module_names(&self) -> Vec<String> {
        catalog::names()
            .iter()
            .map(|s| s.to_string())
            .chain(
                self.wasm
                    .all()
                    .iter()
                    .map(|e| e.manifest.name().to_string()),
            )
            .collect()
    }

    /// `POST /admin/modules`: checks and stores a signed package. The module, and
    /// whether it replaced one.
    pub async fn add_wasm_module(
        &self,
        package: Vec<u8>,
        load_on_hello: bool,
    ) -> Result<(Value, bool), ApiError> {
        let (e, replaced) = self
            .wasm
            .add(
                self.store.as_ref(),
                &self.security.release_keys,
                package,
                imn_proto::now_ms(),
                load_on_hello,
            )
            .await?;
        if load_on_hello {
            // The agents connected now get it at once; the others at their hello.
            let now = imn_proto::now_ms();
            for a in self.registry.all() {
                if a.alive(now) {
                    self.load_wanted(&a.id, &a.hello, std::slice::from_ref(&e))
                        .await;
                }
            }
        }
        Ok((e.json(), replaced))
    }

    /// Sends `LoadWasm` to `agent` for each of `modules` that it can run and does not
    /// have in this version (its hello says).
    async fn load_wanted(
        &self,
        agent: &str,
        hello: &imn_proto::wire::Hello,
        modules: &[Arc<Entry>],
    ) {
        if !hello.has(imn_proto::wasm::FEATURE) {
            return;
        }
        for e in modules {
            let hash = e.manifest.schema_hash();
            let has = hello
                .modules
                .iter()
                .any(|m| m.name == e.manifest.name() && m.schema_hash == hash);
            if has {
                continue;
            }
            let load = CommandKind::LoadWasm {
                package: e.package.clone(),
            };
            match self.control(agent, load).await {
                Ok(_) => {
                    tracing::info!(%agent, module = %e.manifest.name(), "WebAssembly module sent on hello")
                }
                Err(error) => {
                    tracing::warn!(%agent, module = %e.manifest.name(), %error, "cannot send a WebAssembly module")
                }
            }
        }
    }

    /// After an agent's hello: the modules marked `load_on_hello` that it lacks.
    pub(super) async fn load_on_hello(&self, agent: &str, hello: &imn_proto::wire::Hello) {
        let wanted: Vec<Arc<Entry>> = self
            .wasm
            .all()
            .into_iter()
            .filter(|e| e.load_on_hello)
            .collect();
        if !wanted.is_empty() {
            self.load_wanted(agent, hello, &wanted).await;
        }
    }

    /// `DELETE /admin/modules/{name}`.
    pub async fn delete_wasm_module(&self, name: &str) -> Result<bool, ApiError> {
        self.wasm.delete(self.store.as_ref(), name).await
    }

    /// The added modules as `GET /modules` lists them.
    pub fn wasm_modules_json(&self) -> Vec<Value> {
        self.wasm.all().iter().map(|e| e.json()).collect()
    }

    /// The command that loads `module` on `agent`: `Load` for a built-in module,
    /// `LoadWasm` with the package for an added one, refused (409) for an agent whose
    /// build cannot run WebAssembly.
    pub async fn load_command(&self, agent: &str, module: &str) -> Result<CommandKind, ApiError> {
        match self.module_kind(module).await? {
            ModuleKind::BuiltIn(_) => Ok(CommandKind::Load {
                module: module.to_string(),
            }),
            ModuleKind::Wasm(e) => {
                let a = self
                    .registry
                    .get(agent)
                    .ok_or_else(|| ApiError::UnknownAgent(agent.to_string()))?;
                if !a.hello.has(imn_proto::wasm::FEATURE) {
                    return Err(ApiError::Conflict(format!(
                        "agent {agent:?} cannot run WebAssembly modules (its build has no `wasm` feature)"
                    )));
                }
                Ok(CommandKind::LoadWasm {
                    package: e.package.clone(),
                })
            }
        }
    }
}
