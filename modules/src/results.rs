//! The typed result of every module: compact on the device link, JSON at the API.
//!
//! [`ModuleOutput`] has one variant per module, generated with its conversions and the
//! catalog's list from one table (`modules!` below): registering a module is one line
//! there. Each
//! result type lives with its module in [`crate::kinds`]; the old paths are kept.

use serde::{Deserialize, Serialize};

use crate::kinds;
use crate::summary::Summary;

pub use crate::kinds::echo::EchoResult;
pub use crate::kinds::faulty::FaultyResult;
pub use crate::kinds::heartbeat::{InterfaceStats, SystemSnapshot};
pub use crate::kinds::ping::{PingOutput, PingResult};
pub use crate::kinds::tcping::{TcpAttempt, TcpOutcome, TcpingResult};

/// How a module run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModuleOutcome {
    Ok(ModuleOutput),
    /// The module returned an error or panicked; the text says which and why.
    Failed(String),
    /// The module passed its deadline and was cancelled.
    Timeout,
}

/// Generates [`ModuleOutput`] (one variant per module, in wire order), every
/// conversion that dispatches on it, and the catalog's list of specs, from one line per
/// module: the variant, its result type (which implements [`Summary`]) and the module's
/// catalog entry.
macro_rules! modules {
    ($($(#[$doc:meta])* $variant:ident($ty:ty) = $spec:path,)*) => {
        /// Every module's catalog entry, in the order the API lists them.
        pub(crate) const SPECS: &[crate::catalog::ModuleSpec] = &[$($spec),*];

        /// One variant per module.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum ModuleOutput {
            $($(#[$doc])* $variant($ty),)*
            /// A WebAssembly module's result (`crate::wasm`): its own JSON object. Not
            /// in the catalog: the module's name is the result's, its schemas are its
            /// package's. Last, so every built-in keeps its encoding.
            Wasm(Box<crate::wasm::WasmOutput>),
        }

        impl ModuleOutput {
            /// The name of the module that produced this output.
            pub fn module(&self) -> &'static str {
                match self {
                    $(ModuleOutput::$variant(_) => $spec.name,)*
                    ModuleOutput::Wasm(_) => "wasm",
                }
            }

            /// The output as the API shows it: the module's own fields, no enum wrapper.
            pub fn to_json(&self) -> serde_json::Value {
                let v = match self {
                    $(ModuleOutput::$variant(r) => serde_json::to_value(r),)*
                    ModuleOutput::Wasm(r) => Ok(r.value()),
                };
                v.unwrap_or(serde_json::Value::Null)
            }

            /// A result as the API shows it (`module` and its `result` object) back as
            /// the typed output; `None` for an unknown module or a result that does not
            /// fit its type (written by another version).
            pub fn from_api_json(module: &str, result: &serde_json::Value) -> Option<ModuleOutput> {
                $(if module == $spec.name {
                    // Read in place: a stored result can be megabytes.
                    return <$ty as Deserialize>::deserialize(result).ok().map(ModuleOutput::$variant);
                })*
                // Any other name a WebAssembly module could have: its object.
                if result.is_object() && crate::wasm::check_name(module).is_ok() {
                    return Some(ModuleOutput::Wasm(Box::new(crate::wasm::WasmOutput {
                        json: result.to_string(),
                    })));
                }
                None
            }

            /// The result as one line, e.g. `127.0.0.1 3/3 received, loss 0%,
            /// min/avg/max 0.031/0.040/0.052 ms` for ping (see [`Summary`]): at most
            /// [`crate::summary::SUMMARY_MAX_CHARS`] characters, no control characters.
            pub fn summary(&self) -> String {
                crate::summary::tidy(match self {
                    $(ModuleOutput::$variant(r) => r.summary(),)*
                    ModuleOutput::Wasm(r) => r.summary(),
                })
            }
        }

        impl Serialize for OutputJson<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.0 {
                    $(ModuleOutput::$variant(r) => r.serialize(s),)*
                    ModuleOutput::Wasm(r) => r.serialize(s),
                }
            }
        }
    };
}

// New variants go last: postcard numbers variants by position, and the golden bytes
// (`tests/wire_golden.rs`) hold each. Later ones are boxed, so a small result does not
// take the space of the largest (postcard encodes a box as its value).
modules! {
    Echo(EchoResult) = kinds::echo::SPEC,
    Ping(PingOutput) = kinds::ping::SPEC,
    Tcping(TcpingResult) = kinds::tcping::SPEC,
    Faulty(FaultyResult) = kinds::faulty::SPEC,
    Heartbeat(SystemSnapshot) = kinds::heartbeat::SPEC,
    Traceroute(Box<kinds::traceroute::TracerouteResult>) = kinds::traceroute::TRACEROUTE,
    Mtr(Box<kinds::traceroute::MtrResult>) = kinds::traceroute::MTR,
    Dns(Box<kinds::dns::DnsResult>) = kinds::dns::SPEC,
    Http(Box<kinds::http::HttpResult>) = kinds::http::HTTP,
    TlsCert(Box<kinds::http::TlsCertResult>) = kinds::http::TLS_CERT,
    Ntp(Box<kinds::ntp::NtpResult>) = kinds::ntp::SPEC,
}

impl ModuleOutput {
    /// The output as the API shows it, ready to serialize without building a JSON tree.
    pub fn as_serialize(&self) -> OutputJson<'_> {
        OutputJson(self)
    }
}

/// [`ModuleOutput`] serialized as its inner result (the API's `result` field).
pub struct OutputJson<'a>(&'a ModuleOutput);

/// min, avg, max, median and mean deviation of a set of samples.
pub fn stats(samples: &[f64]) -> Option<(f64, f64, f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    let mdev = v.iter().map(|r| (r - avg).abs()).sum::<f64>() / n;
    Some((v[0], avg, v[v.len() - 1], median, mdev))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module has one output variant, named after it, and its API JSON reads
    /// back as that variant.
    #[test]
    fn every_module_has_one_output_variant() {
        assert_eq!(
            crate::catalog::names(),
            [
                "echo_module",
                "ping_module",
                "tcping",
                "faulty_module",
                "heartbeat",
                "traceroute",
                "mtr",
                "dns",
                "http",
                "tls_cert",
                "ntp"
            ]
        );
        let echo = ModuleOutput::Echo(EchoResult {
            message: "m".into(),
        });
        assert_eq!(echo.module(), "echo_module");
        assert_eq!(
            ModuleOutput::from_api_json("echo_module", &echo.to_json()),
            Some(echo)
        );
        assert!(ModuleOutput::from_api_json("No such", &serde_json::json!({})).is_none());
        assert!(ModuleOutput::from_api_json("nope", &serde_json::json!([])).is_none());
        // A name no built-in has, with an object: a WebAssembly module's result.
        let w = ModuleOutput::from_api_json("stun", &serde_json::json!({"summary": "ok"}));
        assert_eq!(w.map(|o| o.summary()), Some("ok".to_string()));
    }
}
