//! The agent's supervisor: a small parent process that starts the agent (the newest
//! verified release in `DATA/update/bin/`, or its own binary), tries a new release or
//! new remote settings on trial, and rolls them back when they do not come up.
//!
//! It is the binary the user, systemd or procd started: the packaged one, which a
//! self-update never overwrites (dpkg and opkg keep owning `/usr/bin/imn-agent`;
//! releases live in the data directory). So the judge of a new release is never the
//! new release: one that dies at once, hangs, or cannot reach the broker is stopped
//! and replaced by the one before, by code that did not change. A package upgrade
//! (a new supervisor version) drops what self-update installed and runs the
//! packaged binary again.
//!
//! A trial ends well when the child writes `DATA/update/healthy` naming the version
//! on trial (it does so once it has connected and said hello). It fails when the
//! child exits [`MAX_STARTS`] times, or when `trial_s` passes first; the trial's
//! deadline is wall-clock time kept in `state.json`, so a power cut in the middle of a
//! trial does not restart it. All state changes are written durably before they take
//! effect.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use imn_proto::release;
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, RemoteSettings, REMOTE_SETTINGS_ENV};
use crate::update::{
    self, read_json, write_json, Failure, Installed, CHILD_ENV, EXIT_RESTART, FAILURE, HEALTHY,
    SETTINGS, SETTINGS_NEXT, STAGED, STATE, VERSION,
};

/// A child on trial that exits this many times is rolled back.
pub const MAX_STARTS: u32 = 3;
/// Settings on trial: moved here from `settings.next.json` when their trial begins, so
/// settings staged during the trial wait for their own.
pub const SETTINGS_TRIAL: &str = "settings.trial.json";
/// Settings that crashed the agent after their trial, moved aside.
pub const SETTINGS_FAILED: &str = "settings.failed.json";
/// After its trial, a release or settings with which the agent dies this many times
/// within [`CRASH_WINDOW_MS`] are rolled back too.
pub const MAX_CRASHES: usize = 3;
pub const CRASH_WINDOW_MS: i64 = 10 * 60_000;

/// The supervisor's state (`DATA/update/state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The release that runs; None: the supervisor's own binary.
    pub current: Option<Installed>,
    /// What ran before it (None: the supervisor's own binary): where a failed trial
    /// goes back to.
    pub previous: Option<Installed>,
    pub trial: Option<Trial>,
    /// The supervisor's version when `current` was installed: a different one means
    /// the package was upgraded since, and the packaged binary wins.
    #[serde(default)]
    pub supervisor_version: String,
    /// When the agent died (not on trial, not a clean stop), the last few.
    #[serde(default)]
    pub crashes: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// `release` or `settings`.
    pub what: String,
    /// The release version, or the settings version.
    pub version: String,
    pub deadline_ms: i64,
    pub starts: u32,
    /// The rollout that offered the release (empty for settings).
    #[serde(default)]
    pub rollout: String,
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// In the child: die with the supervisor (a SIGKILLed supervisor must not leave an
/// agent behind that a restarted one would race for the outbox).
pub fn bind_to_supervisor() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only affect this process.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        );
        let want: Option<i32> = std::env::var("IMN_SUPERVISOR_PID")
            .ok()
            .and_then(|p| p.parse().ok());
        if want.is_some_and(|p| p != libc::getppid()) {
            // The supervisor died before the line above took effect.
            std::process::exit(1);
        }
    }
}

fn save(dir: &Path, st: &State) {
    if let Err(e) = write_json(dir, STATE, st) {
        tracing::error!(error = %e, "supervisor: cannot write DATA/update/state.json");
    }
}

fn record_failure(dir: &Path, kind: &str, version: &str, rollout: &str, reason: String) {
    tracing::error!(kind, version, %reason, "supervisor: rolled back");
    let f = Failure {
        kind: kind.into(),
        version: version.into(),
        reason,
        at_ms: imn_proto::now_ms(),
        rollout: rollout.into(),
    };
    if let Err(e) = write_json(dir, FAILURE, &f) {
        tracing::error!(error = %e, "supervisor: cannot record the failure");
    }
}

/// Checks an installed (or staged) release's file against its signed manifest.
fn check_installed(dir: &Path, i: &Installed, keys: &[String]) -> Result<PathBuf, String> {
    let m = release::verify_signature(&i.manifest, keys).map_err(|e| e.to_string())?;
    if m.version != i.version || i.file != format!("imn-agent-{}", m.version) {
        return Err("the state names another version than its manifest".into());
    }
    let path = dir.join("bin").join(&i.file);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    release::verify_binary(&m, &bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Takes a release the child staged into the state, on trial; or refuses it.
fn adopt_staged(dir: &Path, st: &mut State, keys: &[String], trial_ms: i64) {
    let Some(staged) = read_json::<Installed>(dir, STAGED) else {
        let _ = std::fs::remove_file(dir.join(STAGED));
        return;
    };
    let _ = std::fs::remove_file(dir.join(STAGED));
    if release::check_version(&staged.version).is_err()
        || staged.file != format!("imn-agent-{}", staged.version)
    {
        // Not what the agent writes: no file of it is touched.
        record_failure(
            dir,
            "update_failed",
            "",
            "",
            "the staged release names no valid version and file".into(),
        );
        return;
    }
    let running = st.current.as_ref().map_or(VERSION, |c| c.version.as_str());
    let checked = release::verify_manifest(&staged.manifest, keys, imn_proto::now_ms())
        .map_err(|e| e.to_string())
        .and_then(|m| {
            release::check_install(&m, running, std::env::consts::ARCH).map_err(|e| e.to_string())
        })
        .and_then(|()| check_installed(dir, &staged, keys));
    if let Err(why) = checked {
        let _ = std::fs::remove_file(dir.join("bin").join(&staged.file));
        record_failure(
            dir,
            "update_failed",
            &staged.version,
            &staged.rollout,
            format!("the supervisor refused the staged release: {why}"),
        );
        return;
    }
    tracing::info!(version = %staged.version, from = running, "supervisor: trying a new release");
    st.previous = st.current.take();
    st.trial = Some(Trial {
        what: "release".into(),
        version: staged.version.clone(),
        deadline_ms: imn_proto::now_ms() + trial_ms,
        starts: 0,
        rollout: staged.rollout.clone(),
    });
    st.current = Some(staged);
    st.supervisor_version = VERSION.into();
}

/// A package upgrade (another supervisor version than the one that installed the
/// running release): what self-update installed gives way to the packaged binary.
fn package_upgraded(st: &mut State) {
    if st.current.is_some() && st.supervisor_version != VERSION {
        tracing::info!(
            was = %st.supervisor_version,
            now = VERSION,
            "supervisor: the package was upgraded; running the packaged binary"
        );
        st.current = None;
        st.previous = None;
        if st.trial.as_ref().is_some_and(|t| t.what == "release") {
            st.trial = None;
        }
    }
}

/// Which binary to start, after checking it; drops what does not check.
fn choose(dir: &Path, st: &mut State, keys: &[String], own: &Path) -> PathBuf {
    package_upgraded(st);
    while let Some(c) = st.current.clone() {
        match check_installed(dir, &c, keys) {
            Ok(path) => return path,
            Err(why) => {
                tracing::error!(version = %c.version, %why, "supervisor: the installed release does not check; going back");
                if st.trial.as_ref().is_some_and(|t| t.what == "release") {
                    st.trial = None;
                    record_failure(
                        dir,
                        "update_failed",
                        &c.version,
                        &c.rollout,
                        format!("the installed file does not check: {why}"),
                    );
                }
                st.current = st.previous.take();
            }
        }
    }
    own.to_path_buf()
}

/// Ends a trial badly: goes back to what ran before and records why.
fn fail_trial(dir: &Path, st: &mut State, reason: String) {
    let Some(t) = st.trial.take() else { return };
    if t.what == "release" {
        if let Some(failed) = st.current.take() {
            let _ = std::fs::remove_file(dir.join("bin").join(&failed.file));
        }
        st.current = st.previous.take();
        record_failure(dir, "update_failed", &t.version, &t.rollout, reason);
    } else {
        let _ = std::fs::remove_file(dir.join(SETTINGS_TRIAL));
        record_failure(dir, "settings_failed", &t.version, "", reason);
    }
    save(dir, st);
}

/// Ends a trial well.
fn pass_trial(dir: &Path, st: &mut State) {
    let Some(t) = st.trial.take() else { return };
    tracing::info!(what = %t.what, version = %t.version, "supervisor: trial passed");
    // A success ends the last failure's report.
    let _ = std::fs::remove_file(dir.join(FAILURE));
    let _ = std::fs::remove_file(dir.join(crate::update::FAILURE_REPORTED));
    if t.what == "settings" {
        // Only the settings this trial tried.
        let tried = read_json::<RemoteSettings>(dir, SETTINGS_TRIAL)
            .is_some_and(|s| s.version.to_string() == t.version);
        if !tried {
            tracing::error!(version = %t.version, "supervisor: the settings on trial are not those of the trial; not kept");
            let _ = std::fs::remove_file(dir.join(SETTINGS_TRIAL));
        } else if let Err(e) = std::fs::rename(dir.join(SETTINGS_TRIAL), dir.join(SETTINGS)) {
            tracing::error!(error = %e, "supervisor: cannot keep the new settings");
        }
    } else {
        // Keep the running release and the one before; nothing older.
        let keep: Vec<&str> = [&st.current, &st.previous]
            .into_iter()
            .flatten()
            .map(|i| i.file.as_str())
            .collect();
        if let Ok(entries) = std::fs::read_dir(dir.join("bin")) {
            for e in entries.flatten() {
                if !keep.iter().any(|k| *k == e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    save(dir, st);
}

/// Sleeps, but not past a signal.
fn pause_unless_signalled(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until && SIGNAL.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent keeps dying after a trial passed: the release goes back to the one
/// before, or, with none, the remote settings are moved aside.
fn fall_back(dir: &Path, st: &mut State, last: &std::process::ExitStatus) {
    let why = format!(
        "exited {MAX_CRASHES} times within {} min after its trial (last: {last})",
        CRASH_WINDOW_MS / 60_000
    );
    if let Some(c) = st.current.take() {
        let _ = std::fs::remove_file(dir.join("bin").join(&c.file));
        st.current = st.previous.take();
        record_failure(
            dir,
            "update_failed",
            &c.version,
            &c.rollout,
            format!("release {} {why}", c.version),
        );
    } else if let Some(s) = read_json::<RemoteSettings>(dir, SETTINGS) {
        let _ = std::fs::rename(dir.join(SETTINGS), dir.join(SETTINGS_FAILED));
        record_failure(
            dir,
            "settings_failed",
            &s.version.to_string(),
            "",
            format!("the agent with settings version {} {why}", s.version),
        );
    } else if dir.join(SETTINGS).exists() {
        let _ = std::fs::rename(dir.join(SETTINGS), dir.join(SETTINGS_FAILED));
        record_failure(
            dir,
            "settings_failed",
            "",
            "",
            format!("the agent with unreadable remote settings {why}"),
        );
    }
}

/// How a child's run ended.
enum End {
    Exited(std::process::ExitStatus),
    TrialTimedOut,
    Stopped(i32),
}

fn code_of(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .unwrap_or_else(|| 128 + s.signal().unwrap_or(libc::SIGKILL))
}

fn stop(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Whether the child wrote `healthy` for this trial.
fn healthy_for(dir: &Path, t: &Trial) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(HEALTHY)) else {
        return false;
    };
    let mut lines = text.lines();
    let (version, settings) = (lines.next(), lines.next());
    match t.what.as_str() {
        "release" => version == Some(t.version.as_str()),
        _ => settings == Some(t.version.as_str()),
    }
}

fn watch(dir: &Path, st: &mut State, child: &mut Child) -> End {
    loop {
        let sig = SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            tracing::info!(signal = sig, "supervisor: stopping the agent");
            let s = stop(child, Duration::from_secs(30));
            return End::Stopped(s.map_or(0, code_of));
        }
        match child.try_wait() {
            Ok(Some(s)) => return End::Exited(s),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "supervisor: cannot wait for the agent");
                return End::Stopped(1);
            }
        }
        if let Some(t) = st.trial.clone() {
            if healthy_for(dir, &t) {
                pass_trial(dir, st);
            } else if imn_proto::now_ms() >= t.deadline_ms {
                let _ = stop(child, Duration::from_secs(10));
                return End::TrialTimedOut;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the agent under supervision until it is stopped; returns the exit status.
pub fn run(cfg: &AgentConfig) -> i32 {
    install_signal_handlers();
    let dir = update::dir(&cfg.data);
    if let Err(e) = std::fs::create_dir_all(dir.join("bin")) {
        tracing::error!(error = %e, dir = %dir.display(), "supervisor: cannot create the update directory");
        return 1;
    }
    let own = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "supervisor: cannot find its own binary");
            return 1;
        }
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let keys = cfg.update_keys.clone();
    let trial_ms = cfg.trial_s.saturating_mul(1000) as i64;
    tracing::info!(version = VERSION, data = %cfg.data.display(), "supervisor starting");
    loop {
        if SIGNAL.load(Ordering::SeqCst) != 0 {
            return 0;
        }
        let mut st: State = read_json(&dir, STATE).unwrap_or_default();
        package_upgraded(&mut st);
        if st.trial.is_none() {
            adopt_staged(&dir, &mut st, &keys, trial_ms);
        }
        if st.trial.is_none() {
            if let Some(s) = read_json::<RemoteSettings>(&dir, SETTINGS_NEXT) {
                tracing::info!(version = s.version, "supervisor: trying new settings");
                match std::fs::rename(dir.join(SETTINGS_NEXT), dir.join(SETTINGS_TRIAL)) {
                    Ok(()) => {
                        st.trial = Some(Trial {
                            what: "settings".into(),
                            version: s.version.to_string(),
                            deadline_ms: imn_proto::now_ms() + trial_ms,
                            starts: 0,
                            rollout: String::new(),
                        })
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "supervisor: cannot start the settings' trial");
                        let _ = std::fs::remove_file(dir.join(SETTINGS_NEXT));
                    }
                }
            } else {
                let _ = std::fs::remove_file(dir.join(SETTINGS_NEXT));
            }
        }
        // A trial whose deadline is further than a whole trial away: the clock went
        // back; the trial gets its period from now, not more.
        if let Some(t) = st.trial.as_mut() {
            let now = imn_proto::now_ms();
            if t.deadline_ms - now > trial_ms {
                t.deadline_ms = now + trial_ms;
            }
        }
        let exe = choose(&dir, &mut st, &keys, &own);
        let settings = match &st.trial {
            Some(t) if t.what == "settings" => Some(dir.join(SETTINGS_TRIAL)),
            _ => Some(dir.join(SETTINGS)).filter(|p| p.exists()),
        };
        if let Some(t) = st.trial.as_mut() {
            t.starts += 1;
        }
        save(&dir, &st);
        let _ = std::fs::remove_file(dir.join(HEALTHY));
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env(CHILD_ENV, "1")
            .env("IMN_SUPERVISOR_PID", std::process::id().to_string());
        match &settings {
            Some(p) => cmd.env(REMOTE_SETTINGS_ENV, p),
            None => cmd.env_remove(REMOTE_SETTINGS_ENV),
        };
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot start {}: {e}", exe.display());
                if st.trial.is_some() {
                    fail_trial(&dir, &mut st, why);
                    continue;
                }
                tracing::error!(%why, "supervisor");
                return 1;
            }
        };
        tracing::info!(exe = %exe.display(), pid = child.id(), trial = ?st.trial, "supervisor: agent started");
        match watch(&dir, &mut st, &mut child) {
            End::Stopped(code) => return code,
            End::TrialTimedOut => {
                let what = st.trial.as_ref().map_or("", |t| t.what.as_str());
                let why = if what == "settings" {
                    format!("with the new settings the agent did not connect and say hello within its {} s trial", cfg.trial_s)
                } else {
                    format!(
                        "the new release did not connect and say hello within its {} s trial",
                        cfg.trial_s
                    )
                };
                fail_trial(&dir, &mut st, why);
            }
            End::Exited(s) => {
                // It may have said hello just before it exited.
                if let Some(t) = st.trial.clone() {
                    if healthy_for(&dir, &t) {
                        pass_trial(&dir, &mut st);
                    }
                }
                if code_of(s) == EXIT_RESTART {
                    tracing::info!("supervisor: the agent asked to be restarted");
                    continue;
                }
                let Some(t) = st.trial.clone() else {
                    if code_of(s) == 0 {
                        return 0;
                    }
                    // Died after its trial: again, after a pause; and when it keeps
                    // dying, without what changed last.
                    let now = imn_proto::now_ms();
                    st.crashes
                        .retain(|at| now - at < CRASH_WINDOW_MS && *at <= now);
                    st.crashes.push(now);
                    if st.crashes.len() >= MAX_CRASHES {
                        fall_back(&dir, &mut st, &s);
                        st.crashes.clear();
                    }
                    save(&dir, &st);
                    let pause = Duration::from_secs(1 << st.crashes.len().min(5));
                    tracing::warn!(status = %s, crashes = st.crashes.len(), "supervisor: the agent died; starting it again in {} s", pause.as_secs());
                    pause_unless_signalled(pause);
                    continue;
                };
                if t.starts >= MAX_STARTS {
                    fail_trial(
                        &dir,
                        &mut st,
                        format!(
                            "{} exited {} times within its trial (last: {s}, after {} ms)",
                            if t.what == "settings" {
                                format!("the agent with settings version {}", t.version)
                            } else {
                                format!("release {}", t.version)
                            },
                            t.starts,
                            started.elapsed().as_millis()
                        ),
                    );
                } else {
                    tracing::warn!(status = %s, starts = t.starts, "supervisor: the agent on trial exited; starting it again");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::release::SigningKey;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(label: &str) -> Dir {
        let d = crate::test_dir(&format!("launcher-{label}"));
        std::fs::create_dir_all(d.join("bin")).unwrap();
        Dir(d)
    }

    /// A release of `version` for this machine, staged in `d` as the agent stages one.
    fn stage(d: &Path, key: &SigningKey, version: &str, body: &[u8]) -> Installed {
        let now = imn_proto::now_ms();
        let file = key
            .sign(
                body,
                version,
                std::env::consts::ARCH,
                now,
                now + 60_000,
                false,
            )
            .unwrap();
        let (manifest, bin) = release::split(&file).unwrap();
        let name = format!("imn-agent-{version}");
        std::fs::write(d.join("bin").join(&name), bin).unwrap();
        let i = Installed {
            version: version.into(),
            file: name,
            manifest,
            rollout: "ro-1".into(),
        };
        write_json(d, STAGED, &i).unwrap();
        i
    }

    fn key() -> (SigningKey, Vec<String>) {
        let k = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let keys = vec![k.public_hex()];
        (k, keys)
    }

    #[test]
    fn a_staged_release_goes_on_trial_and_a_failed_trial_goes_back() {
        let d = dir("trial");
        let (k, keys) = key();
        let mut st = State::default();
        stage(&d.0, &k, "99.0.0", b"new binary");
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        assert_eq!(st.current.as_ref().unwrap().version, "99.0.0");
        assert_eq!(st.previous, None, "before it: the supervisor's own binary");
        let t = st.trial.clone().unwrap();
        assert_eq!(
            (t.what.as_str(), t.version.as_str(), t.starts),
            ("release", "99.0.0", 0)
        );
        assert!(!d.0.join(STAGED).exists());
        let own = Path::new("/usr/bin/imn-agent");
        assert_eq!(
            choose(&d.0, &mut st, &keys, own),
            d.0.join("bin/imn-agent-99.0.0")
        );
        fail_trial(&d.0, &mut st, "did not come up".into());
        assert_eq!(st.current, None);
        assert_eq!(st.trial, None);
        assert!(
            !d.0.join("bin/imn-agent-99.0.0").exists(),
            "the failed binary is removed"
        );
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert_eq!(
            (f.kind.as_str(), f.version.as_str(), f.rollout.as_str()),
            ("update_failed", "99.0.0", "ro-1")
        );
        assert_eq!(choose(&d.0, &mut st, &keys, own), own);
        let saved: State = read_json(&d.0, STATE).unwrap();
        assert_eq!(saved, st, "the rollback is durable");
    }

    #[test]
    fn a_staged_release_that_does_not_check_is_refused() {
        let (k, keys) = key();
        // Altered after staging: one byte of the binary.
        let d = dir("altered");
        let i = stage(&d.0, &k, "99.0.0", b"new binary");
        std::fs::write(d.0.join("bin").join(&i.file), b"new binarY").unwrap();
        let mut st = State::default();
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        assert_eq!(st.current, None);
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert!(f.reason.contains("sha256"), "{}", f.reason);
        assert!(!d.0.join("bin").join(&i.file).exists());
        // Signed by a key the supervisor does not trust.
        let d = dir("untrusted");
        let (other, _) = key();
        stage(&d.0, &other, "99.0.0", b"new binary");
        let mut st = State::default();
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        assert_eq!(st.current, None);
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert!(f.reason.contains("not trusted"), "{}", f.reason);
        // Older than what runs.
        let d = dir("older");
        stage(&d.0, &k, "0.0.1", b"old binary");
        let mut st = State::default();
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        assert_eq!(st.current, None);
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert!(f.reason.contains("older"), "{}", f.reason);
    }

    #[test]
    fn an_installed_release_that_no_longer_checks_is_dropped_for_the_previous() {
        let d = dir("corrupt");
        let (k, keys) = key();
        let mut st = State::default();
        stage(&d.0, &k, "99.0.0", b"first");
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        pass_trial(&d.0, &mut st);
        stage(&d.0, &k, "99.1.0", b"second");
        adopt_staged(&d.0, &mut st, &keys, 60_000);
        pass_trial(&d.0, &mut st);
        assert_eq!(st.previous.as_ref().unwrap().version, "99.0.0");
        // Flash corruption of the running release.
        std::fs::write(d.0.join("bin/imn-agent-99.1.0"), b"secont").unwrap();
        let own = Path::new("/usr/bin/imn-agent");
        assert_eq!(
            choose(&d.0, &mut st, &keys, own),
            d.0.join("bin/imn-agent-99.0.0")
        );
        // A package upgrade (another supervisor version) runs the packaged binary.
        st.supervisor_version = "0.0.0-old".into();
        assert_eq!(choose(&d.0, &mut st, &keys, own), own);
        assert_eq!((st.current.as_ref(), st.previous.as_ref()), (None, None));
    }

    #[test]
    fn passing_a_trial_keeps_the_settings_and_two_releases() {
        let d = dir("pass");
        let (k, keys) = key();
        let mut st = State::default();
        for v in ["99.0.0", "99.1.0", "99.2.0"] {
            stage(&d.0, &k, v, v.as_bytes());
            adopt_staged(&d.0, &mut st, &keys, 60_000);
            pass_trial(&d.0, &mut st);
        }
        let mut left: Vec<String> = std::fs::read_dir(d.0.join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["imn-agent-99.1.0", "imn-agent-99.2.0"]);
        write_json(
            &d.0,
            SETTINGS_TRIAL,
            &RemoteSettings {
                version: 3,
                settings: vec![],
            },
        )
        .unwrap();
        st.trial = Some(Trial {
            what: "settings".into(),
            version: "3".into(),
            deadline_ms: i64::MAX,
            starts: 1,
            rollout: String::new(),
        });
        std::fs::write(d.0.join(HEALTHY), format!("{VERSION}\n3\n")).unwrap();
        assert!(healthy_for(&d.0, st.trial.as_ref().unwrap()));
        pass_trial(&d.0, &mut st);
        assert!(d.0.join(SETTINGS).exists() && !d.0.join(SETTINGS_TRIAL).exists());
        // Settings that are not the trial's version are not kept.
        write_json(
            &d.0,
            SETTINGS_TRIAL,
            &RemoteSettings {
                version: 5,
                settings: vec![],
            },
        )
        .unwrap();
        st.trial = Some(Trial {
            what: "settings".into(),
            version: "4".into(),
            deadline_ms: i64::MAX,
            starts: 1,
            rollout: String::new(),
        });
        pass_trial(&d.0, &mut st);
        let kept: RemoteSettings = read_json(&d.0, SETTINGS).unwrap();
        assert_eq!(kept.version, 3);
    }

    #[test]
    fn dying_after_a_trial_falls_back_to_the_release_before_then_without_settings() {
        use std::os::unix::process::ExitStatusExt;
        let d = dir("crash");
        let (k, keys) = key();
        let mut st = State::default();
        for v in ["99.0.0", "99.1.0"] {
            stage(&d.0, &k, v, v.as_bytes());
            adopt_staged(&d.0, &mut st, &keys, 60_000);
            pass_trial(&d.0, &mut st);
        }
        let died = std::process::ExitStatus::from_raw(11);
        fall_back(&d.0, &mut st, &died);
        assert_eq!(st.current.as_ref().unwrap().version, "99.0.0");
        assert!(!d.0.join("bin/imn-agent-99.1.0").exists());
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert_eq!(
            (f.kind.as_str(), f.version.as_str()),
            ("update_failed", "99.1.0")
        );
        assert!(
            f.reason
                .contains("exited 3 times within 10 min after its trial"),
            "{}",
            f.reason
        );
        st.current = None;
        write_json(
            &d.0,
            SETTINGS,
            &RemoteSettings {
                version: 7,
                settings: vec![],
            },
        )
        .unwrap();
        fall_back(&d.0, &mut st, &died);
        assert!(!d.0.join(SETTINGS).exists() && d.0.join(SETTINGS_FAILED).exists());
        let f: Failure = read_json(&d.0, FAILURE).unwrap();
        assert_eq!(
            (f.kind.as_str(), f.version.as_str()),
            ("settings_failed", "7")
        );
    }
}
