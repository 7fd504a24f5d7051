//! What a crash leaves behind for the next start.
//!
//! Firmware builds abort on panic (the `firmware` profile), so a module that panics takes
//! the agent down, and procd or systemd starts it again. The restarted agent reports
//! each run that was in progress as `failed` (`run_interrupted`), saying why as well as
//! it can tell:
//! - `DATA/running` is written at start and removed when the agent stops cleanly
//!   (SIGTERM, Ctrl-C). Still there at the next start, it means the last process died
//!   (an abort, a kill, a power cut) rather than being stopped.
//! - The panic hook writes the panic's message to `DATA/last-panic`. `cross/build.sh`'s
//!   firmware is built with std's `panic_immediate_abort` (130 KiB smaller), which aborts
//!   before any hook, so there only the marker tells; a `cargo build --profile firmware`
//!   without it, and any build that unwinds, keeps the message. Builds that unwind catch
//!   a module's panic instead, and the hook only logs.

use std::path::{Path, PathBuf};

/// The file in the data directory.
pub const FILE: &str = "last-panic";

/// Installs the hook (once, at start).
pub fn install_hook(data: &Path) {
    let path = data.join(FILE);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if cfg!(panic = "abort") {
            let _ = std::fs::write(&path, describe(info));
        }
        previous(info);
    }));
}

/// The file that is there while the agent runs.
pub const RUNNING: &str = "running";

/// Marks the start of a process, durably (a power cut right after start must still
/// read as a death). Returns whether the previous one did not stop cleanly: its marker
/// is still there. A marker that cannot be written is logged: deaths then read as stops.
pub fn mark_running(data: &Path) -> bool {
    let unclean = std::fs::symlink_metadata(data.join(RUNNING)).is_ok();
    let pid = format!("{}\n", std::process::id());
    // A new file renamed over the old one: a symlink planted at RUNNING is replaced,
    // not followed.
    if let Err(e) = crate::config::write_durably(data, RUNNING, pid.as_bytes()) {
        tracing::warn!(error = %e, "cannot write DATA/running: a later crash would read as a clean stop");
    }
    unclean
}

/// Marks a clean stop, durably.
pub fn mark_stopped(data: &Path) {
    match std::fs::remove_file(data.join(RUNNING)) {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(data) {
                let _ = dir.sync_all();
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove DATA/running: this clean stop will read as a crash")
        }
    }
}

/// Why runs the last process left unfinished did not finish: its panic message if the
/// hook could write one, else whether it died or was stopped.
pub fn interrupted_cause(panic: Option<String>, died: bool) -> String {
    match (panic, died) {
        (Some(msg), _) => format!("the agent panicked while it ran: {msg}"),
        (None, true) => "the agent died while it ran, without stopping cleanly (an abort on a \
             panic or a fault, a kill, or a power cut; firmware aborts on a panic without a \
             message)"
            .to_string(),
        (None, false) => "the agent was stopped (a restart or shutdown) while it ran".to_string(),
    }
}

/// A panic's message, from its payload (`panic!` makes a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

fn describe(info: &std::panic::PanicHookInfo<'_>) -> String {
    let msg = panic_message(info.payload());
    match info.location() {
        Some(l) => format!("{msg} (at {}:{})", l.file(), l.line()),
        None => msg,
    }
}

/// The message of the panic that ended the last run, if one did; removes the file.
pub fn take_last_panic(data: &Path) -> Option<String> {
    let path: PathBuf = data.join(FILE);
    let msg = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    Some(msg.chars().take(1000).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_marker_tells_a_death_from_a_stop() {
        let dir = std::env::temp_dir().join(format!("imn-crash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(RUNNING));
        assert!(!mark_running(&dir), "first start");
        assert!(mark_running(&dir), "started again without a clean stop");
        mark_stopped(&dir);
        assert!(!mark_running(&dir), "after a clean stop");
        mark_stopped(&dir);
        // A symlink planted at the marker is replaced, not written through.
        let target = dir.join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        std::fs::remove_file(dir.join(RUNNING)).ok();
        std::os::unix::fs::symlink(&target, dir.join(RUNNING)).unwrap();
        assert!(mark_running(&dir), "a marker (even a link) means a death");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(dir.join(RUNNING))
            .unwrap()
            .file_type()
            .is_symlink());
        mark_stopped(&dir);
        assert!(interrupted_cause(None, true).contains("without stopping cleanly"));
        assert!(interrupted_cause(None, false).contains("was stopped"));
        assert!(
            interrupted_cause(Some("boom".into()), true).contains("panicked while it ran: boom")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
