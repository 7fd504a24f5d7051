//! Runs modules so that none can take the agent down: each run is its own task with a
//! deadline, a panic becomes a `failed` result with the panic's message, and a run past
//! its deadline is cancelled and reported as `timeout`. A module that panicked is
//! restarted with exponential backoff: its next run waits, other modules do not.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use imn_probes::Context;
use imn_proto::results::ModuleOutcome;

/// First wait after a panic; doubles per consecutive panic.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How one run ended.
#[derive(Debug)]
pub struct Ran {
    pub outcome: ModuleOutcome,
    pub panicked: bool,
}

/// Runs one module and always returns an outcome.
pub async fn run_module(
    module: String,
    params_json: String,
    timeout: Duration,
    ctx: Context,
) -> Ran {
    let ctx = Context {
        deadline: Some(Instant::now() + timeout),
        ..ctx
    };
    let task = tokio::spawn(async move { imn_probes::run(&module, &params_json, &ctx).await });
    let abort = task.abort_handle();
    let (outcome, panicked) = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(output))) => (ModuleOutcome::Ok(output), false),
        Ok(Ok(Err(message))) => (ModuleOutcome::Failed(message), false),
        Ok(Err(join)) if join.is_panic() => {
            let msg = crate::crash::panic_message(&*join.into_panic());
            (
                ModuleOutcome::Failed(format!("module panicked: {msg}")),
                true,
            )
        }
        Ok(Err(join)) => (
            ModuleOutcome::Failed(format!("module task ended: {join}")),
            false,
        ),
        Err(_) => {
            abort.abort();
            (ModuleOutcome::Timeout, false)
        }
    };
    Ran { outcome, panicked }
}

/// Per-module restart backoff after panics.
#[derive(Debug, Default)]
pub struct Restarts {
    modules: HashMap<String, (u32, Instant)>,
}

impl Restarts {
    /// How long a new run of `module` must wait before it starts.
    pub fn delay(&self, module: &str) -> Duration {
        self.modules
            .get(module)
            .map(|&(_, until)| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Records how a run ended; returns the backoff now in force after a panic.
    pub fn record(&mut self, module: &str, panicked: bool) -> Option<Duration> {
        if !panicked {
            self.modules.remove(module);
            return None;
        }
        let entry = self
            .modules
            .entry(module.to_string())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        let backoff = BACKOFF_START
            .saturating_mul(1 << (entry.0 - 1).min(16))
            .min(BACKOFF_MAX);
        entry.1 = Instant::now() + backoff;
        Some(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ok_error_panic_and_timeout() {
        let ctx = Context::default();
        let t = Duration::from_secs(5);
        let ok = run_module(
            "echo_module".into(),
            r#"{"message":"x"}"#.into(),
            t,
            ctx.clone(),
        )
        .await;
        assert!(matches!(ok.outcome, ModuleOutcome::Ok(_)) && !ok.panicked);
        let err = run_module("nope".into(), "{}".into(), t, ctx.clone()).await;
        assert!(matches!(err.outcome, ModuleOutcome::Failed(m) if m.contains("not built")));
        let crash = run_module(
            "faulty_module".into(),
            r#"{"message":"boom","crash":true}"#.into(),
            t,
            ctx.clone(),
        )
        .await;
        assert!(crash.panicked);
        assert!(
            matches!(&crash.outcome, ModuleOutcome::Failed(m) if m.contains("panicked") && m.contains("boom")),
            "{:?}",
            crash.outcome
        );
        let hang = run_module(
            "faulty_module".into(),
            r#"{"message":"m","hang":true}"#.into(),
            Duration::from_millis(50),
            ctx,
        )
        .await;
        assert_eq!(hang.outcome, ModuleOutcome::Timeout);
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut r = Restarts::default();
        assert_eq!(r.delay("m"), Duration::ZERO);
        assert_eq!(r.record("m", true), Some(Duration::from_millis(100)));
        assert_eq!(r.record("m", true), Some(Duration::from_millis(200)));
        assert!(r.delay("m") > Duration::from_millis(150));
        assert_eq!(r.delay("other"), Duration::ZERO);
        for _ in 0..20 {
            r.record("m", true);
        }
        assert!(r.delay("m") <= BACKOFF_MAX);
        assert_eq!(r.record("m", false), None);
        assert_eq!(r.delay("m"), Duration::ZERO);
    }
}
