//! WebAssembly modules on the agent (feature `wasm`): each loaded package is kept as
//! `DATA/wasm/NAME.imnmod`, checked against the agent's own trusted keys when it
//! arrives (`CommandKind::LoadWasm`) and again at every start, compiled once, and
//! registered in the [`Registry`] every run's context shares. The runtime and its
//! limits are `imn_probes::wasm`.

use std::path::{Path, PathBuf};

use imn_probes::wasm::{Module, Registry};

use crate::config::AgentConfig;
use crate::modules::LoadedModules;

const EXT: &str = "imnmod";

fn dir(data: &Path) -> PathBuf {
    data.join("wasm")
}

/// Checks, compiles and registers one package; its name.
fn register(
    cfg: &AgentConfig,
    registry: &Registry,
    modules: &mut LoadedModules,
    package: &[u8],
) -> Result<String, String> {
    let keys = cfg.trusted_module_keys();
    if keys.is_empty() {
        return Err("this agent trusts no module keys (module_keys, update_keys)".into());
    }
    let (manifest, wasm) =
        imn_proto::wasm::open(package, keys).map_err(|e| format!("module refused: {e}"))?;
    let name = manifest.name().to_string();
    let (version, hash) = (manifest.source.version.clone(), manifest.schema_hash());
    // Never back to an older version in place (a stale backend's copy): unload first.
    if let Some(loaded) = registry.get(&name) {
        let have = &loaded.manifest().source.version;
        if imn_proto::release::compare_versions(have, &version) == Some(std::cmp::Ordering::Greater)
        {
            return Err(format!(
                "module refused: version: {version} is older than {have}, loaded; unload it first"
            ));
        }
    }
    let module = Module::compile(manifest, wasm).map_err(|e| format!("module refused: {e}"))?;
    registry.insert(module)?;
    modules.add_wasm(&name, &version, &hash);
    Ok(name)
}

/// Loads every stored package (at start).
pub fn load_stored(cfg: &AgentConfig, registry: &Registry, modules: &mut LoadedModules) {
    let Ok(entries) = std::fs::read_dir(dir(&cfg.data)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some(EXT) {
            continue;
        }
        let loaded = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| register(cfg, registry, modules, &bytes));
        // One that does not load now (its key no longer trusted, the registry full)
        // stays on disk: a configuration fixed later brings it back; unloading it
        // deletes it.
        match loaded {
            Ok(name) => tracing::info!(module = %name, "WebAssembly module loaded from disk"),
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "stored WebAssembly module not loaded");
            }
        }
    }
}

/// `CommandKind::LoadWasm`: checks and registers the package, then keeps it on disk.
/// The module's name (or what the package claims, for a refusal's event).
pub fn load(
    cfg: &AgentConfig,
    registry: &Registry,
    modules: &mut LoadedModules,
    package: &[u8],
) -> (String, Result<(), String>) {
    let claimed = imn_proto::wasm::split(package)
        .ok()
        .and_then(|(s, _)| serde_json::from_str::<serde_json::Value>(&s.manifest).ok())
        .and_then(|m| {
            m.get("name")?
                .as_str()
                .map(|n| n.chars().take(32).collect())
        })
        .unwrap_or_else(|| "?".to_string());
    let name = match register(cfg, registry, modules, package) {
        Ok(name) => name,
        Err(e) => return (claimed, Err(e)),
    };
    let d = dir(&cfg.data);
    let stored = std::fs::create_dir_all(&d)
        .and_then(|()| crate::config::write_durably(&d, &format!("{name}.{EXT}"), package));
    if let Err(e) = stored {
        // Runs now, but would be gone after a restart: say so.
        tracing::warn!(module = %name, error = %e, "WebAssembly module loaded but not stored");
    }
    (name, Ok(()))
}

/// Takes a WebAssembly module away, from memory and disk; false if it was not one.
pub fn unload(cfg: &AgentConfig, registry: &Registry, name: &str) -> bool {
    let _ = std::fs::remove_file(dir(&cfg.data).join(format!("{name}.{EXT}")));
    registry.remove(name)
}
