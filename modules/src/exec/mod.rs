//! The code that runs modules on a device (cargo feature `exec`).

mod ping;

use serde_json::Value;

use crate::params::{EchoParams, PingParams};
use crate::results::{EchoResult, ModuleOutput};

/// Runs one module to completion. Errors are the module's own failures, in words.
pub async fn run(module: &str, params_json: &str) -> Result<ModuleOutput, String> {
    let params: Value =
        serde_json::from_str(params_json).map_err(|e| format!("parameters are not JSON: {e}"))?;
    match module {
        "echo_module" => {
            let p: EchoParams = from_value(params)?;
            Ok(ModuleOutput::Echo(EchoResult { message: p.message }))
        }
        "ping_module" => {
            let p: PingParams = from_value(params)?;
            ping::run(p).await.map(ModuleOutput::Ping)
        }
        other => Err(format!("module {other:?} is not loaded on this agent")),
    }
}

fn from_value<T: for<'de> serde::Deserialize<'de>>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("invalid parameters: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_echoes() {
        let out = run("echo_module", r#"{"message":"hi"}"#).await.unwrap();
        assert_eq!(
            out,
            ModuleOutput::Echo(EchoResult {
                message: "hi".into()
            })
        );
        assert!(run("echo_module", "{").await.is_err());
        assert!(run("nope", "{}").await.is_err());
    }
}
