//! Runs modules so that none can take the agent down: each run is its own task with a
//! deadline, a panic becomes a `failed` result with the panic's message, and a run past
//! its deadline is cancelled and reported as `timeout`.

use std::time::Duration;

use imn_modules::results::ModuleOutcome;

/// Runs one module and always returns an outcome.
pub async fn run_module(module: String, params_json: String, timeout: Duration) -> ModuleOutcome {
    let task = tokio::spawn(async move { imn_modules::exec::run(&module, &params_json).await });
    let abort = task.abort_handle();
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(output))) => ModuleOutcome::Ok(output),
        Ok(Ok(Err(message))) => ModuleOutcome::Failed(message),
        Ok(Err(join)) if join.is_panic() => {
            let panic = join.into_panic();
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            ModuleOutcome::Failed(format!("module panicked: {msg}"))
        }
        Ok(Err(join)) => ModuleOutcome::Failed(format!("module task ended: {join}")),
        Err(_) => {
            abort.abort();
            ModuleOutcome::Timeout
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ok_error_and_timeout() {
        let ok = run_module(
            "echo_module".into(),
            r#"{"message":"x"}"#.into(),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(ok, ModuleOutcome::Ok(_)));
        let err = run_module("nope".into(), "{}".into(), Duration::from_secs(5)).await;
        assert!(matches!(err, ModuleOutcome::Failed(m) if m.contains("not loaded")));
        // A ping to loopback with 20 probes 100 ms apart cannot finish in 50 ms.
        let slow = run_module(
            "ping_module".into(),
            r#"{"host":"127.0.0.1","count":20,"interval_ms":100}"#.into(),
            Duration::from_millis(50),
        )
        .await;
        assert!(
            matches!(slow, ModuleOutcome::Timeout | ModuleOutcome::Failed(_)),
            "{slow:?}"
        );
    }
}
