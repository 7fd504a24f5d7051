//! The code that runs modules on a device: sockets, timers, the ping engine, and one
//! file or folder per module kind. Only the agent links it (and the tests); the
//! backend checks a run's targets with the same policy code (`imn-proto`) but never
//! sends a probe. Each run takes its parameters as validated JSON and returns the
//! typed result of `imn_proto::results`.

pub mod calendar;
#[cfg(feature = "dns")]
mod dns;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "ntp")]
mod ntp;
mod ping;
pub use imn_resolver as resolver;
pub mod system;
mod tcping;
#[cfg(feature = "traceroute")]
mod traceroute;
#[cfg(feature = "wasm")]
pub mod wasm;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use imn_proto::params::{EchoParams, FaultyParams, PingParams, TcpingParams};
use imn_proto::policy::TargetPolicy;
use imn_proto::results::{EchoResult, FaultyResult, ModuleOutput};

/// What a module may need to know about the agent running it.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The agent's data directory (the heartbeat reports its filesystem).
    pub data_dir: PathBuf,
    /// The rules every address this run sends to must pass: what the backend checked
    /// the request against, carried by its command or schedule set. Open by default.
    pub policy: Arc<TargetPolicy>,
    /// When the run must be over (the supervisor cancels it then): a WebAssembly
    /// run's deadline. `None` outside a supervised run.
    pub deadline: Option<std::time::Instant>,
    /// The WebAssembly modules the agent has loaded.
    #[cfg(feature = "wasm")]
    pub wasm: Arc<wasm::Registry>,
}

impl Context {
    /// Checks an address the run is about to send a packet to (`target` is the host as
    /// the parameters named it). Every module calls this on every address, after its
    /// own resolution and after each redirect, before the first packet; the error is
    /// the run's (or the target's) error text, `policy_denied: …`.
    pub fn permit(&self, target: &str, ip: IpAddr) -> Result<(), String> {
        self.policy.check(ip).map_err(|d| d.error_text(target))
    }
}

/// Whether this build can run `module`: the module families are cargo features, so a
/// router build can leave out http and tls_cert (hyper, h2, x509-parser) and others.
/// The agent loads only these, and its hello names them, so the backend refuses a
/// request for any other with 409 before it reaches the device.
pub fn built_in(module: &str) -> bool {
    const FAMILIES: &[(&[&str], bool)] = &[
        (
            &[
                "echo_module",
                "ping_module",
                "tcping",
                "faulty_module",
                "heartbeat",
            ],
            true,
        ),
        (&["traceroute", "mtr"], cfg!(feature = "traceroute")),
        (&["dns"], cfg!(feature = "dns")),
        (&["http", "tls_cert"], cfg!(feature = "http")),
        (&["ntp"], cfg!(feature = "ntp")),
    ];
    FAMILIES
        .iter()
        .any(|(names, on)| *on && names.contains(&module))
}

/// The modules of the catalog this build can run, in catalog order.
pub fn built_in_names() -> Vec<&'static str> {
    imn_proto::catalog::names()
        .into_iter()
        .filter(|m| built_in(m))
        .collect()
}

/// Runs one module to completion. Errors are the module's own failures, in words.
pub async fn run(module: &str, params_json: &str, ctx: &Context) -> Result<ModuleOutput, String> {
    let params: Value =
        serde_json::from_str(params_json).map_err(|e| format!("parameters are not JSON: {e}"))?;
    match module {
        "echo_module" => {
            let p: EchoParams = from_value(params)?;
            Ok(ModuleOutput::Echo(EchoResult { message: p.message }))
        }
        "ping_module" => {
            let p: PingParams = from_value(params)?;
            ping::run(p, ctx).await.map(ModuleOutput::Ping)
        }
        "tcping" => {
            let p: TcpingParams = from_value(params)?;
            tcping::run(p, ctx).await.map(ModuleOutput::Tcping)
        }
        #[cfg(feature = "traceroute")]
        "traceroute" => traceroute::run(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::Traceroute(Box::new(r))),
        #[cfg(feature = "traceroute")]
        "mtr" => traceroute::run_mtr(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::Mtr(Box::new(r))),
        #[cfg(feature = "dns")]
        "dns" => dns::run(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::Dns(Box::new(r))),
        #[cfg(feature = "http")]
        "http" => http::run(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::Http(Box::new(r))),
        #[cfg(feature = "http")]
        "tls_cert" => http::run_tls_cert(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::TlsCert(Box::new(r))),
        #[cfg(feature = "ntp")]
        "ntp" => ntp::run(from_value(params)?, ctx)
            .await
            .map(|r| ModuleOutput::Ntp(Box::new(r))),
        "faulty_module" => faulty(from_value(params)?).await.map(ModuleOutput::Faulty),
        "heartbeat" => {
            let mut cpu = system::CpuSampler::new();
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok(ModuleOutput::Heartbeat(system::snapshot(
                &mut cpu,
                &ctx.data_dir,
            )))
        }
        #[cfg(feature = "wasm")]
        other if ctx.wasm.get(other).is_some() => {
            let m = ctx.wasm.get(other).ok_or("the module was unloaded")?;
            wasm::run(m, params_json, ctx).await
        }
        other => Err(format!("module {other:?} is not built into this agent")),
    }
}

/// Fails on purpose, in the way asked.
async fn faulty(p: FaultyParams) -> Result<FaultyResult, String> {
    if p.delay > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(p.delay)).await;
    }
    if p.crash {
        panic!("faulty_module: crash requested ({})", p.message);
    }
    if p.hang {
        std::future::pending::<()>().await;
    }
    if p.error {
        return Err(format!("faulty_module: error requested ({})", p.message));
    }
    Ok(FaultyResult {
        message: p.message,
        delayed_s: p.delay,
    })
}

/// Resolves a host name or address literal to one address.
pub async fn resolve(host: &str) -> Result<IpAddr, String> {
    resolver::lookup(host)
        .await?
        .first()
        .copied()
        .ok_or_else(|| format!("{host:?} has no address"))
}

/// Resolves the one host a run sends to, as [`resolve`] does, and checks the address
/// against the run's policy: how tcping, ntp, traceroute, mtr and a dns `server` given
/// by name pick their destination, before their first packet.
async fn resolve_permitted(ctx: &Context, host: &str) -> Result<IpAddr, String> {
    let ip = resolve(host).await?;
    ctx.permit(host.trim(), ip)?;
    Ok(ip)
}

fn from_value<T: for<'de> serde::Deserialize<'de>>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("invalid parameters: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module the catalog knows is in a build with every family, and a build
    /// runs exactly what `built_in` claims: a module left out is refused by name.
    #[tokio::test]
    async fn built_in_matches_what_runs() {
        let ctx = Context::default();
        let all = cfg!(all(
            feature = "dns",
            feature = "http",
            feature = "traceroute",
            feature = "ntp"
        ));
        for m in imn_proto::catalog::names() {
            if all {
                assert!(built_in(m), "{m} is in the catalog but not built in");
            }
            let err = run(m, "{", &ctx).await.unwrap_err();
            if built_in(m) {
                assert!(err.contains("parameters are not JSON"), "{m}: {err}");
            }
            // `{}` passes JSON; a module left out says so whatever the parameters.
            if !built_in(m) {
                let e = run(m, "{}", &ctx).await.unwrap_err();
                assert!(e.contains("is not built into this agent"), "{m}: {e}");
            }
        }
        assert!(!built_in("nope"));
        assert_eq!(
            built_in_names().len(),
            imn_proto::catalog::names()
                .iter()
                .filter(|m| built_in(m))
                .count()
        );
    }

    #[tokio::test]
    async fn echo_echoes() {
        let ctx = Context::default();
        let out = run("echo_module", r#"{"message":"hi"}"#, &ctx)
            .await
            .unwrap();
        assert_eq!(
            out,
            ModuleOutput::Echo(EchoResult {
                message: "hi".into()
            })
        );
        assert!(run("echo_module", "{", &ctx).await.is_err());
        assert!(run("nope", "{}", &ctx).await.is_err());
    }

    #[tokio::test]
    async fn faulty_delays_and_errors() {
        let ctx = Context::default();
        let t0 = std::time::Instant::now();
        let out = run("faulty_module", r#"{"message":"m","delay":0.05}"#, &ctx).await;
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(matches!(out, Ok(ModuleOutput::Faulty(r)) if r.message == "m"));
        let err = run("faulty_module", r#"{"message":"m","error":true}"#, &ctx).await;
        assert!(err.unwrap_err().contains("error requested"));
        let hang = tokio::time::timeout(
            Duration::from_millis(50),
            run("faulty_module", r#"{"message":"m","hang":true}"#, &ctx),
        )
        .await;
        assert!(hang.is_err(), "hang never returns");
    }

    #[tokio::test]
    async fn heartbeat_module_reports_the_machine() {
        let ctx = Context {
            data_dir: PathBuf::from("/"),
            ..Context::default()
        };
        match run("heartbeat", "{}", &ctx).await.unwrap() {
            ModuleOutput::Heartbeat(s) => assert!(s.mem_total_kib > 0 && s.disk_total_kib > 0),
            other => panic!("{other:?}"),
        }
    }
}
