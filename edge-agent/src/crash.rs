//! What a crash leaves behind for the next start.
//!
//! Firmware builds abort on panic (the `firmware` profile), so a module that panics takes
//! the agent down, and procd or systemd starts it again. The panic hook writes the panic
//! message to `DATA/last-panic` first; the restarted agent puts it in the `failed` result
//! of the run that was in progress, so the user sees why, not just that it stopped.
//! Builds that unwind catch a module's panic instead, and the hook only logs.

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
