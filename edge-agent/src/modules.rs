//! Which modules the agent has loaded, and their runtime settings. Changed by
//! commands with no restart, and kept in the agent's store so a restart keeps them.

use std::collections::BTreeMap;

use imn_proto::catalog;
use imn_proto::wire::{ModuleConfig, ModuleInfo};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadedModules {
    /// Loaded module name → its settings.
    loaded: BTreeMap<String, ModuleConfig>,
    /// WebAssembly modules among them: name → (version, schema hash). Not stored
    /// here: the packages on disk are (`crate::wasm`), loaded again at start.
    #[serde(skip)]
    wasm: BTreeMap<String, (String, String)>,
}

impl Default for LoadedModules {
    /// Every module built into the agent, with default settings.
    fn default() -> Self {
        LoadedModules {
            loaded: imn_probes::built_in_names()
                .into_iter()
                .map(|m| (m.to_string(), ModuleConfig::default()))
                .collect(),
            wasm: BTreeMap::new(),
        }
    }
}

impl LoadedModules {
    /// Drops what this build cannot run: a store written by a build with more modules
    /// (a full build replaced by a router build) keeps their names.
    pub fn retain_built_in(mut self) -> Self {
        self.loaded.retain(|m, _| imn_probes::built_in(m));
        self
    }

    /// Adds a WebAssembly module (its settings, if stored, are kept).
    pub fn add_wasm(&mut self, name: &str, version: &str, schema_hash: &str) {
        self.wasm.insert(
            name.to_string(),
            (version.to_string(), schema_hash.to_string()),
        );
        self.loaded.entry(name.to_string()).or_default();
    }

    /// Takes the settings `stored` had for each WebAssembly module loaded here.
    pub fn keep_settings_of_wasm(&mut self, stored: &LoadedModules) {
        for name in self.wasm.keys() {
            if let (Some(cfg), Some(mine)) = (stored.loaded.get(name), self.loaded.get_mut(name)) {
                *mine = cfg.clone();
            }
        }
    }

    pub fn is_loaded(&self, module: &str) -> bool {
        self.loaded.contains_key(module)
    }

    pub fn names(&self) -> Vec<String> {
        self.loaded.keys().cloned().collect()
    }

    /// Why a run of `module` is refused when it is not loaded: a module this build
    /// does not have is named as such, with the modules it has.
    pub fn not_loaded(&self, module: &str) -> String {
        if imn_probes::built_in(module) {
            format!(
                "module {module:?} is not loaded on this agent (loaded: {})",
                self.names().join(", ")
            )
        } else {
            format!(
                "module {module:?} is not built into this agent (built in: {}), and no WebAssembly module of that name is loaded",
                imn_probes::built_in_names().join(", ")
            )
        }
    }

    /// Loads a module built into the agent. Errors name the modules that exist.
    pub fn load(&mut self, module: &str) -> Result<(), String> {
        if !imn_probes::built_in(module) {
            return Err(format!(
                "module {module:?} is not built into this agent (built in: {})",
                imn_probes::built_in_names().join(", ")
            ));
        }
        self.loaded.entry(module.to_string()).or_default();
        Ok(())
    }

    pub fn unload(&mut self, module: &str) -> bool {
        self.wasm.remove(module);
        self.loaded.remove(module).is_some()
    }

    pub fn configure(&mut self, module: &str, config: ModuleConfig) -> Result<(), String> {
        if let Some(d) = &config.defaults_json {
            match serde_json::from_str::<Value>(d) {
                Ok(Value::Object(_)) => {}
                _ => return Err("defaults must be a JSON object".into()),
            }
        }
        match self.loaded.get_mut(module) {
            Some(c) => {
                *c = config;
                Ok(())
            }
            None => Err(format!("module {module:?} is not loaded")),
        }
    }

    /// What hello reports: each loaded module with its version and schema hash.
    pub fn info(&self) -> Vec<ModuleInfo> {
        self.loaded
            .iter()
            .filter_map(|(name, cfg)| {
                let (version, schema_hash) = match catalog::find(name) {
                    Some(spec) => (spec.version.to_string(), spec.schema_hash()),
                    None => self.wasm.get(name)?.clone(),
                };
                Some(ModuleInfo {
                    name: name.clone(),
                    version,
                    schema_hash,
                    config: (cfg != &ModuleConfig::default()).then(|| cfg.clone()),
                })
            })
            .collect()
    }

    /// Applies the module's settings to a request: the rate capped at `max_rate`, and
    /// the deadline. Defaults are not merged here: the backend merged them before it
    /// checked the request against its limits and policy, and a default merged after
    /// that check could carry what the check refused.
    pub fn prepare(&self, module: &str, params_json: &str, timeout_ms: u64) -> (String, u64) {
        let Some(cfg) = self.loaded.get(module) else {
            return (params_json.to_string(), timeout_ms);
        };
        let mut params: Value = serde_json::from_str(params_json).unwrap_or(Value::Null);
        // Only a module that takes a `rate` gets one: any other (echo, faulty) refuses
        // a parameter it does not know, and would fail every run.
        let takes_rate = imn_proto::catalog::find(module).is_some_and(|spec| spec.takes_rate);
        if let (Some(max), Value::Object(p), true) = (cfg.max_rate, &mut params, takes_rate) {
            let rate = p
                .get("rate")
                .and_then(Value::as_f64)
                .unwrap_or(f64::INFINITY);
            if rate > max {
                p.insert("rate".into(), Value::from(max));
            }
        }
        (params.to_string(), cfg.timeout_ms.unwrap_or(timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default set and hello name exactly the modules this build has; a stored set
    /// from a build with more (http in a full build, then a router build) loses them.
    #[test]
    fn loaded_is_what_this_build_has() {
        let m = LoadedModules::default();
        let names: Vec<String> = m.info().into_iter().map(|i| i.name).collect();
        assert_eq!(names.len(), imn_probes::built_in_names().len());
        assert!(names.iter().all(|n| imn_probes::built_in(n)));
        assert_eq!(
            names.iter().any(|n| n == "http"),
            cfg!(feature = "http"),
            "{names:?}"
        );
        let mut stored = m.clone();
        stored
            .loaded
            .insert("not_in_this_build".into(), ModuleConfig::default());
        assert!(stored.is_loaded("not_in_this_build"));
        let kept = stored.retain_built_in();
        assert!(!kept.is_loaded("not_in_this_build"));
        assert_eq!(kept, m);
        let why = kept.not_loaded("not_in_this_build");
        assert!(
            why.contains("not built into this agent (built in: "),
            "{why}"
        );
        assert!(why.contains("echo_module"), "{why}");
        let mut fewer = kept.clone();
        fewer.unload("tcping");
        let why = fewer.not_loaded("tcping");
        assert!(why.contains("not loaded on this agent (loaded: "), "{why}");
    }

    #[test]
    fn load_unload_configure() {
        let mut m = LoadedModules::default();
        assert!(m.is_loaded("echo_module") && m.is_loaded("ping_module"));
        assert!(m.unload("ping_module"));
        assert!(!m.is_loaded("ping_module"));
        assert!(!m.info().iter().any(|i| i.name == "ping_module"));
        assert!(m.load("warp").unwrap_err().contains("echo_module"));
        m.load("ping_module").unwrap();
        m.configure(
            "ping_module",
            ModuleConfig {
                defaults_json: Some(r#"{"count": 7, "size": 100}"#.into()),
                max_rate: Some(50.0),
                timeout_ms: Some(1234),
            },
        )
        .unwrap();
        let (p, t) = m.prepare(
            "ping_module",
            r#"{"host":"127.0.0.1","size":8,"rate":1000}"#,
            99,
        );
        let p: Value = serde_json::from_str(&p).unwrap();
        // The rate is capped; defaults are the backend's to merge (before its checks).
        assert_eq!(
            (p["count"].as_u64(), p["size"].as_u64(), p["rate"].as_f64()),
            (None, Some(8), Some(50.0))
        );
        assert_eq!(t, 1234);
        assert!(m
            .info()
            .iter()
            .any(|i| i.name == "ping_module" && i.config.is_some()));
        assert!(m
            .configure(
                "echo_module",
                ModuleConfig {
                    defaults_json: Some("[1]".into()),
                    ..Default::default()
                }
            )
            .is_err());
        // A module with no `rate` parameter gets none, whatever its max_rate.
        m.configure(
            "faulty_module",
            ModuleConfig {
                max_rate: Some(5.0),
                ..Default::default()
            },
        )
        .unwrap();
        let (p, _) = m.prepare("faulty_module", r#"{"message":"x"}"#, 99);
        assert_eq!(p, r#"{"message":"x"}"#);
    }
}
