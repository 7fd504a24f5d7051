//! The typed result of every module: compact on the device link, JSON at the API.
//!
//! [`ModuleOutput`] has one variant per module, generated with its conversions from
//! one table (`module_outputs!` below): adding a module adds one line there. Each
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

/// Generates [`ModuleOutput`] (one variant per module, in wire order) and every
/// conversion that dispatches on it, from one line per module: the variant, the
/// module's name, and its result type (which implements [`Summary`]).
macro_rules! module_outputs {
    ($($(#[$doc:meta])* $variant:ident($ty:ty) = $name:literal,)*) => {
        /// One variant per module.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum ModuleOutput {
            $($(#[$doc])* $variant($ty),)*
        }

        impl ModuleOutput {
            /// The module of each variant, in wire order.
            pub const MODULES: &'static [&'static str] = &[$($name),*];

            /// The name of the module that produced this output.
            pub fn module(&self) -> &'static str {
                match self {
                    $(ModuleOutput::$variant(_) => $name,)*
                }
            }

            /// The output as the API shows it: the module's own fields, no enum wrapper.
            pub fn to_json(&self) -> serde_json::Value {
                let v = match self {
                    $(ModuleOutput::$variant(r) => serde_json::to_value(r),)*
                };
                v.unwrap_or(serde_json::Value::Null)
            }

            /// A result as the API shows it (`module` and its `result` object) back as
            /// the typed output; `None` for an unknown module or a result that does not
            /// fit its type (written by another version).
            pub fn from_api_json(module: &str, result: &serde_json::Value) -> Option<ModuleOutput> {
                match module {
                    $($name => serde_json::from_value(result.clone()).ok().map(ModuleOutput::$variant),)*
                    _ => None,
                }
            }

            /// The result as one line, e.g. `127.0.0.1 3/3 received, loss 0%,
            /// min/avg/max 0.031/0.040/0.052 ms` for ping (see [`Summary`]).
            pub fn summary(&self) -> String {
                match self {
                    $(ModuleOutput::$variant(r) => r.summary(),)*
                }
            }
        }

        impl Serialize for OutputJson<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.0 {
                    $(ModuleOutput::$variant(r) => r.serialize(s),)*
                }
            }
        }
    };
}

// New variants go last: postcard numbers variants by position, and the golden bytes
// (`tests/wire_golden.rs`) hold each. Later ones are boxed, so a small result does not
// take the space of the largest (postcard encodes a box as its value).
module_outputs! {
    Echo(EchoResult) = "echo_module",
    Ping(PingOutput) = "ping_module",
    Tcping(TcpingResult) = "tcping",
    Faulty(FaultyResult) = "faulty_module",
    Heartbeat(SystemSnapshot) = "heartbeat",
    Traceroute(Box<kinds::traceroute::TracerouteResult>) = "traceroute",
    Mtr(Box<kinds::traceroute::MtrResult>) = "mtr",
    Dns(Box<kinds::dns::DnsResult>) = "dns",
    Http(Box<kinds::http::HttpResult>) = "http",
    TlsCert(Box<kinds::http::TlsCertResult>) = "tls_cert",
    Ntp(Box<kinds::ntp::NtpResult>) = "ntp",
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

    /// Every catalogued module has an output variant of the same name, and back.
    #[test]
    fn every_module_has_one_output_variant() {
        let mut catalogued: Vec<&str> = crate::catalog::names();
        let mut outputs: Vec<&str> = ModuleOutput::MODULES.to_vec();
        catalogued.sort();
        outputs.sort();
        assert_eq!(catalogued, outputs);
        let echo = ModuleOutput::Echo(EchoResult {
            message: "m".into(),
        });
        assert_eq!(echo.module(), "echo_module");
        assert_eq!(
            ModuleOutput::from_api_json("echo_module", &echo.to_json()),
            Some(echo)
        );
        assert!(ModuleOutput::from_api_json("nope", &serde_json::json!({})).is_none());
    }
}
