//! WebAssembly modules (feature `wasm`): other people's measurement code, run inside a
//! sandbox the agent controls completely.
//!
//! - **The interpreter** is wasmi: no JIT, no code generated at run time, no unsafe
//!   code in the guest's path. A module is compiled (validated) once when loaded
//!   ([`Module::compile`]) and instantiated fresh for every run: nothing survives from
//!   one run to the next.
//! - **A run** executes on a blocking thread of the runtime ([`run`]). The guest gets
//!   the host interface of [`host`] (import module `imn`, version
//!   [`imn_proto::wasm::HOST_ABI`]) and nothing else: no files, no environment, no
//!   raw sockets, no WASI.
//! - **Limits** ([`imn_proto::wasm::Limits`], from the signed manifest, capped at
//!   `Limits::MAX`): instructions (fuel, given a slice at a time so the deadline and a
//!   cancel are seen between slices), memory pages (a growth past them is refused and
//!   remembered), bytes and packets sent, sockets open at once, and the run's
//!   deadline. A run that passes one ends as `failed` with `limit NAME: …`; the agent
//!   and its other runs go on.
//! - **Every address** a module sends to passes [`crate::Context::permit`], the check
//!   every built-in module makes, after the agent's own resolution.

mod host;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use imn_proto::results::ModuleOutput;
use imn_proto::wasm::{Limits, Manifest, WasmOutput};
use wasmi::{Config, Engine, Linker, Store, TypedResumableCall};

use crate::Context;

pub use host::FUNCTIONS;

/// Fuel given to a run at a time: between slices the run checks its deadline and
/// whether it was cancelled (about 10 to 50 ms of interpretation).
const FUEL_SLICE: u64 = 5_000_000;
/// The most modules an agent keeps loaded.
pub const MAX_MODULES: usize = 32;

/// A module compiled and ready to run.
pub struct Module {
    manifest: Manifest,
    limits: Limits,
    engine: Engine,
    module: wasmi::Module,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.manifest.name())
            .field("version", &self.manifest.source.version)
            .finish()
    }
}

impl Module {
    /// Validates the code and checks its shape: imports only from `imn` and only
    /// what the host provides, exports `run() -> i32` and `memory`, no start
    /// function. Errors name what is wrong.
    pub fn compile(manifest: Manifest, wasm: &[u8]) -> Result<Module, String> {
        let mut config = Config::default();
        config.consume_fuel(true);
        let engine = Engine::new(&config);
        let module = wasmi::Module::new(&engine, wasm)
            .map_err(|e| format!("not a valid WebAssembly module: {e}"))?;
        for import in module.imports() {
            let known = import.module() == "imn"
                && FUNCTIONS.iter().any(|(name, _)| *name == import.name());
            if !known {
                return Err(format!(
                    "imports {}.{}, which the host interface (version {}) does not have",
                    import.module(),
                    import.name(),
                    imn_proto::wasm::HOST_ABI
                ));
            }
        }
        let mut run = false;
        let mut memory = false;
        for export in module.exports() {
            match (export.name(), export.ty()) {
                ("run", wasmi::ExternType::Func(f)) => {
                    run = f.params().is_empty() && f.results() == [wasmi::core::ValType::I32];
                }
                ("memory", wasmi::ExternType::Memory(_)) => memory = true,
                _ => {}
            }
        }
        if !run {
            return Err("it must export `run`, a function of no parameters returning i32".into());
        }
        if !memory {
            return Err("it must export its memory as `memory`".into());
        }
        let limits = manifest.source.limits.capped();
        Ok(Module {
            manifest,
            limits,
            engine,
            module,
        })
    }

    pub fn name(&self) -> &str {
        self.manifest.name()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// The WebAssembly modules an agent has loaded, by name. Shared by every run's
/// [`Context`]; the agent adds and removes.
#[derive(Debug, Default)]
pub struct Registry {
    modules: RwLock<BTreeMap<String, Arc<Module>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<Module>> {
        self.modules.read().ok()?.get(name).cloned()
    }

    /// Adds or replaces a module; refused past [`MAX_MODULES`].
    pub fn insert(&self, module: Module) -> Result<(), String> {
        let mut m = self.modules.write().map_err(|_| "registry poisoned")?;
        if m.len() >= MAX_MODULES && !m.contains_key(module.name()) {
            return Err(format!(
                "this agent keeps at most {MAX_MODULES} WebAssembly modules"
            ));
        }
        m.insert(module.name().to_string(), Arc::new(module));
        Ok(())
    }

    pub fn remove(&self, name: &str) -> bool {
        self.modules
            .write()
            .map(|mut m| m.remove(name).is_some())
            .unwrap_or(false)
    }

    pub fn all(&self) -> Vec<Arc<Module>> {
        self.modules
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Why a run stopped before `run` returned: a limit, a cancel, or a host failure.
/// Raised by host functions as a wasmi host error; its text is the run's error.
#[derive(Debug)]
pub(crate) struct Stop(pub String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl wasmi::core::HostError for Stop {}

/// Sets the run's cancel flag when the run's future is dropped (the supervisor's
/// deadline, a cancel command): the blocking thread sees it between fuel slices and
/// at every host call.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs a module once with `params_json` (validated by the backend against the
/// module's schema): a fresh instance, the limits of its manifest, until `run`
/// returns, a limit is reached, or the run is cancelled.
pub async fn run(
    module: Arc<Module>,
    params_json: &str,
    ctx: &Context,
) -> Result<ModuleOutput, String> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let timeout = Duration::from_millis(module.manifest.source.timeout_ms);
    let deadline = ctx
        .deadline
        .unwrap_or_else(|| Instant::now() + timeout)
        .min(Instant::now() + Duration::from_millis(3_600_000));
    let state = host::State::new(
        module.limits,
        params_json.to_string(),
        deadline,
        cancel,
        tokio::runtime::Handle::current(),
        ctx.clone(),
        module.name().to_string(),
    );
    let json = tokio::task::spawn_blocking(move || execute(&module, state))
        .await
        .map_err(|e| format!("the WebAssembly run ended abnormally: {e}"))??;
    Ok(ModuleOutput::Wasm(Box::new(WasmOutput { json })))
}

/// The blocking part of a run: instantiate, then call `run` a fuel slice at a time.
fn execute(module: &Module, state: host::State) -> Result<String, String> {
    let mut store = Store::new(&module.engine, state);
    store.limiter(|s| &mut s.limiter);
    let r = drive(module, &mut store);
    let s = store.data();
    if s.refusals > host::MAX_LOGGED_REFUSALS {
        tracing::warn!(
            module = %module.name(),
            refused = s.refusals,
            "WebAssembly module: addresses refused by the policy in one run (the first {} logged)",
            host::MAX_LOGGED_REFUSALS
        );
    }
    r
}

fn drive(module: &Module, store: &mut Store<host::State>) -> Result<String, String> {
    let limits = module.limits;
    let mut linker = Linker::<host::State>::new(&module.engine);
    host::define(&mut linker).map_err(|e| format!("host interface: {e}"))?;
    let mut given = FUEL_SLICE.min(limits.fuel);
    store.set_fuel(given).map_err(|e| format!("fuel: {e}"))?;
    let pre = linker
        .instantiate(&mut *store, &module.module)
        .map_err(|e| stopped(&*store, &e.to_string()))?;
    let instance = pre
        .ensure_no_start(&mut *store)
        .map_err(|_| "it has a start function: a module begins at `run`".to_string())?;
    let memory = instance
        .get_memory(&*store, "memory")
        .ok_or("it must export its memory as `memory`")?;
    store.data_mut().memory = Some(memory);
    let run = instance
        .get_typed_func::<(), i32>(&*store, "run")
        .map_err(|e| format!("`run`: {e}"))?;
    let mut call = run.call_resumable(&mut *store, ());
    let code = loop {
        match call {
            Ok(TypedResumableCall::Finished(code)) => break code,
            Ok(TypedResumableCall::HostTrap(t)) => {
                let why = match t.host_error().downcast_ref::<Stop>() {
                    Some(stop) => stop.0.clone(),
                    None => t.host_error().to_string(),
                };
                return Err(why);
            }
            Ok(TypedResumableCall::OutOfFuel(t)) => {
                let s = store.data();
                if s.cancel.load(Ordering::SeqCst) {
                    return Err("cancelled".into());
                }
                if Instant::now() >= s.deadline {
                    return Err(s.past_deadline());
                }
                if given >= limits.fuel {
                    return Err(format!(
                        "limit fuel: the run used its {} instructions",
                        limits.fuel
                    ));
                }
                let slice = FUEL_SLICE.max(t.required_fuel()).min(limits.fuel - given);
                given += slice;
                store.set_fuel(slice).map_err(|e| format!("fuel: {e}"))?;
                call = t.resume(&mut *store);
            }
            Err(e) => return Err(stopped(&*store, &e.to_string())),
        }
    };
    let s = store.data_mut();
    if code != 0 {
        return Err(format!("the module returned {code}{}", s.last_words()));
    }
    s.result.take().ok_or_else(|| {
        "the module returned 0 without a result (it must call `result` once)".to_string()
    })
}

/// The text of a run that trapped: the limit behind it if one was hit (a refused
/// memory growth is usually followed by the guest's own abort), else the trap.
fn stopped(store: &Store<host::State>, trap: &str) -> String {
    let s = store.data();
    if let Some(pages) = s.limiter.denied_pages {
        return format!(
            "limit memory_pages: the module asked for {pages} pages of 64 KiB, {} allowed ({trap})",
            s.limiter.max_pages
        );
    }
    format!("trap: {trap}{}", s.last_words())
}

#[cfg(test)]
mod tests;
