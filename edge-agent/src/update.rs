//! Over-the-air updates and remote settings, as the running agent sees them: the
//! files it shares with its supervisor ([`crate::launcher`]) in `DATA/update/`, and
//! the download of a release over the MQTT link it already has.
//!
//! Why MQTT and not HTTP: a router behind NAT on a flaky cellular link already keeps
//! this one connection up, authenticated, through its NAT and its TLS; a second
//! endpoint would need its own credentials, firewall rule and TLS trust. The agent
//! pulls the release one chunk at a time (`UpdateUp::Fetch`, answered by a `Chunk`),
//! so a download is resumable at any byte (the partial file's length is where it
//! stands, across reconnects and restarts), throttled by pacing the requests
//! (`update_rate`), and never more than one chunk in flight.
//!
//! The files, all in `DATA/update/`:
//! - `partial-<sha>`: a download in progress, appended as chunks arrive.
//! - `bin/imn-agent-<version>`: a verified release, renamed there from its partial
//!   file once its size and SHA-256 match the signed manifest, after an fsync.
//! - `staged.json`: the release the supervisor should try next (written last, durably).
//! - `settings.next.json`: remote settings the supervisor should try next;
//!   `settings.json`: the ones that passed their trial.
//! - `state.json`: the supervisor's: what runs, what ran before, what is on trial.
//! - `healthy`: written by a child that connected and said hello: its version and
//!   settings version. The supervisor ends a trial on it.
//! - `failure.json`: written by the supervisor when it rolled something back; the
//!   child reports it (an `update_failed` or `settings_failed` event) once.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imn_proto::release::{self, Manifest, SignedManifest};
use imn_proto::wire::{Chunk, LifecycleStatus, UpdateUp, MAX_CHUNK};
use serde::{Deserialize, Serialize};

use crate::config::{write_durably, RemoteSettings};

/// The agent's version: the package's, or `IMN_AGENT_VERSION` at build time (how a
/// release build is stamped).
pub const VERSION: &str = match option_env!("IMN_AGENT_VERSION") {
    Some(v) if !v.is_empty() => v,
    _ => env!("CARGO_PKG_VERSION"),
};

/// The exit status with which the agent asks its supervisor to start it again (a
/// release is staged, or new settings are).
pub const EXIT_RESTART: i32 = 75;

/// The environment variable the supervisor sets in its child.
pub const CHILD_ENV: &str = "IMN_SUPERVISED_CHILD";

/// Bytes asked for in one fetch: a quarter of a second at the rate, from 4 KiB to
/// the largest chunk the backend sends. One fetch is in flight at a time, so a
/// bigger chunk is what lets a fast link go fast; a small one keeps a slow link's
/// other traffic (results, heartbeats) from queueing behind a long message.
pub fn chunk_len(rate: u64) -> u32 {
    (rate / 4).clamp(4096, MAX_CHUNK as u64) as u32
}
/// A fetch with no answer for this long is asked again (a partition, a lost message).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// `DATA/update`.
pub fn dir(data: &Path) -> PathBuf {
    data.join("update")
}

pub const STAGED: &str = "staged.json";
pub const SETTINGS: &str = "settings.json";
pub const SETTINGS_NEXT: &str = "settings.next.json";
pub const STATE: &str = "state.json";
pub const HEALTHY: &str = "healthy";
pub const FAILURE: &str = "failure.json";
pub const FAILURE_REPORTED: &str = "failure.reported.json";

/// A release staged or installed: its signed manifest and its file in `bin/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub version: String,
    pub file: String,
    pub manifest: SignedManifest,
    /// The rollout that offered it.
    #[serde(default)]
    pub rollout: String,
}

/// Something the supervisor rolled back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// `update_failed` or `settings_failed`.
    pub kind: String,
    pub version: String,
    pub reason: String,
    pub at_ms: i64,
    /// The rollout that offered the release (empty for settings).
    #[serde(default)]
    pub rollout: String,
}

/// Reads a small JSON file of the update directory; None if missing or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Option<T> {
    let f = std::fs::File::open(dir.join(name)).ok()?;
    let mut text = String::new();
    use std::io::Read;
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_json<T: Serialize>(dir: &Path, name: &str, v: &T) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_durably(
        dir,
        name,
        &serde_json::to_vec(v).map_err(std::io::Error::other)?,
    )
}

/// The remote settings this process runs (version 0: none).
pub fn running_settings() -> u64 {
    std::env::var_os(crate::config::REMOTE_SETTINGS_ENV)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<RemoteSettings>(&t).ok())
        .map_or(0, |s| s.version)
}

/// A release being downloaded.
struct Download {
    manifest: Manifest,
    signed: SignedManifest,
    rollout: String,
    file: std::fs::File,
    path: PathBuf,
    offset: u64,
    /// When the next fetch goes out; None while one is in flight.
    fetch_at: Option<Instant>,
    /// When the fetch in flight went out.
    asked_at: Option<Instant>,
}

/// The last update or settings change that failed: why (`kind: reason`), which
/// version, and which rollout offered it.
#[derive(Debug, Clone, PartialEq)]
pub struct LastFailure {
    pub reason: String,
    pub version: String,
    pub rollout: Option<String>,
}

/// What a chunk did.
pub enum Progress {
    /// Nothing (not ours, or a repeat).
    None,
    /// More to come.
    More,
    /// The release is verified and staged: restart into it.
    Staged(String),
    /// The download failed; the reason.
    Failed { version: String, reason: String },
}

/// The running agent's side of updates.
pub struct Updater {
    dir: PathBuf,
    keys: Vec<String>,
    supervised: bool,
    rate: u64,
    dl: Option<Download>,
    staged: Option<String>,
    pub settings_version: u64,
    /// The last failure or refusal, until one succeeds.
    pub last_failure: Option<LastFailure>,
    /// Bytes of release data received (this process), for the report.
    pub received: u64,
    /// Offline: no fetch is due until the link is back.
    paused: bool,
    /// Free space a download leaves on the data filesystem (`disk_reserve_bytes`).
    reserve: u64,
}

impl Updater {
    pub fn new(
        data: &Path,
        keys: Vec<String>,
        supervised: bool,
        rate: u64,
        reserve: u64,
    ) -> Updater {
        let dir = dir(data);
        let last_failure = read_json::<Failure>(&dir, FAILURE)
            .or_else(|| read_json::<Failure>(&dir, FAILURE_REPORTED))
            .map(|f| LastFailure {
                reason: format!("{}: {}", f.kind, f.reason),
                version: f.version,
                rollout: Some(f.rollout).filter(|r| !r.is_empty()),
            });
        Updater {
            dir,
            keys,
            supervised,
            rate: rate.max(1024),
            dl: None,
            staged: None,
            settings_version: running_settings(),
            last_failure,
            received: 0,
            paused: false,
            reserve,
        }
    }

    /// A failure the supervisor left that is not reported yet; marks it reported.
    pub fn take_unreported_failure(&mut self) -> Option<Failure> {
        let f: Failure = read_json(&self.dir, FAILURE)?;
        if let Err(e) = std::fs::rename(self.dir.join(FAILURE), self.dir.join(FAILURE_REPORTED)) {
            tracing::warn!(error = %e, "cannot mark the update failure reported");
        }
        Some(f)
    }

    /// Tells the supervisor this process connected and said hello.
    pub fn mark_healthy(&self) {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let text = format!("{VERSION}\n{}\n", self.settings_version);
        if let Err(e) = std::fs::create_dir_all(&self.dir)
            .and_then(|()| write_durably(&self.dir, HEALTHY, text.as_bytes()))
        {
            tracing::warn!(error = %e, "cannot tell the supervisor this agent is healthy");
        }
    }

    pub fn status(&self) -> LifecycleStatus {
        let (phase, target, downloaded, size) = match (&self.dl, &self.staged) {
            (_, Some(v)) => ("staged", Some(v.clone()), 0, 0),
            (Some(d), None) => (
                "downloading",
                Some(d.manifest.version.clone()),
                d.offset,
                d.manifest.size,
            ),
            (None, None) if !self.supervised => ("unsupervised", None, 0, 0),
            (None, None) if std::env::var_os(CHILD_ENV).is_some() && self.on_trial() => {
                ("trial", None, 0, 0)
            }
            (None, None) => ("idle", None, 0, 0),
        };
        LifecycleStatus {
            version: VERSION.into(),
            arch: std::env::consts::ARCH.into(),
            settings_version: self.settings_version,
            phase: phase.into(),
            target,
            downloaded,
            size,
            last_failure: self.last_failure.as_ref().map(|f| f.reason.clone()),
            failed_version: self.last_failure.as_ref().map(|f| f.version.clone()),
            failed_rollout: self.last_failure.as_ref().and_then(|f| f.rollout.clone()),
            sent_at_ms: imn_proto::now_ms(),
        }
    }

    fn on_trial(&self) -> bool {
        read_json::<crate::launcher::State>(&self.dir, STATE).is_some_and(|s| s.trial.is_some())
    }

    fn fail(&mut self, reason: String, version: &str, rollout: Option<&str>) -> String {
        self.last_failure = Some(LastFailure {
            reason: reason.clone(),
            version: version.into(),
            rollout: rollout.map(str::to_string),
        });
        reason
    }

    /// A rollout asks for this release. Err: refused (the reason, for the event).
    pub fn offer(&mut self, rollout: String, signed: SignedManifest) -> Result<bool, String> {
        // The rollout id is echoed in reports and kept in the supervisor's state: a
        // backend's id, short and plain, or not at all.
        let rollout = if rollout.len() <= 64
            && rollout
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            rollout
        } else {
            String::new()
        };
        // The version it claims, for the report (checked below).
        let version: String = serde_json::from_str::<Manifest>(&signed.manifest)
            .map(|m| m.version.chars().take(64).collect())
            .unwrap_or_default();
        let r = Some(rollout.as_str());
        if !self.supervised {
            let why = "update_refused: this agent runs without its supervisor (no update_keys, supervise = false)";
            return Err(self.fail(why.into(), &version, r));
        }
        let m = match release::verify_manifest(&signed, &self.keys, imn_proto::now_ms())
            .and_then(|m| release::check_install(&m, VERSION, std::env::consts::ARCH).map(|()| m))
        {
            Ok(m) => m,
            Err(e) => return Err(self.fail(format!("update_refused: {e}"), &version, r)),
        };
        if self.staged.as_deref() == Some(m.version.as_str()) {
            return Ok(false);
        }
        if let Some(d) = &self.dl {
            // One download at a time: an offer of the same release, or of an older
            // one while a newer downloads, changes nothing (two rollouts offering in
            // turn would otherwise restart each other's download for ever).
            let newer = release::compare_versions(&m.version, &d.manifest.version)
                == Some(std::cmp::Ordering::Greater);
            if d.manifest.sha256 == m.sha256 || !newer {
                return Ok(false);
            }
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            return Err(self.fail(format!("update_failed: {e}"), &version, r));
        }
        // One download at a time: a newer offer replaces an older one's partial file.
        self.clear_partials(&m.sha256);
        let path = self.dir.join(format!("partial-{}", &m.sha256[..16]));
        let mut file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                let why = format!("update_failed: cannot open {}: {e}", path.display());
                return Err(self.fail(why, &version, r));
            }
        };
        let mut offset = file.seek(SeekFrom::End(0)).unwrap_or(0);
        // Room for the rest of it, and the outbox's reserve left over (a release never
        // fills the flash the outbox needs).
        let (total_kib, free_kib) = imn_probes::system::disk_kib(&self.dir);
        let need = m.size.saturating_sub(offset.min(m.size)) + self.reserve;
        if total_kib > 0 && free_kib.saturating_mul(1024) < need {
            let _ = std::fs::remove_file(&path);
            let why = format!(
                "update_failed: not enough space for {} ({} bytes and the {} byte reserve; {} KiB free)",
                m.version, m.size, self.reserve, free_kib
            );
            return Err(self.fail(why, &m.version, r));
        }
        // A whole file left by a power cut before it was staged: fetched again, rather
        // than asked for past its end.
        if offset >= m.size {
            let _ = file.set_len(0);
            let _ = file.seek(SeekFrom::Start(0));
            offset = 0;
        }
        tracing::info!(version = %m.version, size = m.size, resume_at = offset, %rollout, "downloading a release");
        self.dl = Some(Download {
            manifest: m,
            signed,
            rollout,
            file,
            path,
            offset,
            fetch_at: Some(Instant::now()),
            asked_at: None,
        });
        Ok(true)
    }

    fn clear_partials(&self, keep_sha: &str) {
        let keep = format!("partial-{}", &keep_sha[..16.min(keep_sha.len())]);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("partial-") && name != keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// When the next fetch is due, if a download runs.
    pub fn fetch_at(&self) -> Option<Instant> {
        if self.paused {
            return None;
        }
        let d = self.dl.as_ref()?;
        match (d.fetch_at, d.asked_at) {
            (Some(at), _) => Some(at),
            (None, Some(asked)) => Some(asked + FETCH_TIMEOUT),
            (None, None) => None,
        }
    }

    /// The link is down: nothing is asked for until [`Updater::on_connected`].
    pub fn on_disconnected(&mut self) {
        self.paused = true;
    }

    /// The fetch to send now (the next chunk, or the same again after a timeout).
    pub fn fetch(&mut self, now: Instant) -> Option<UpdateUp> {
        let d = self.dl.as_mut()?;
        if d.asked_at.is_some_and(|a| now < a + FETCH_TIMEOUT) && d.fetch_at.is_none() {
            return None;
        }
        if d.fetch_at.is_some_and(|at| now < at) {
            return None;
        }
        d.fetch_at = None;
        d.asked_at = Some(now);
        let len = (d.manifest.size - d.offset).min(chunk_len(self.rate) as u64) as u32;
        Some(UpdateUp::Fetch {
            sha256: d.manifest.sha256.clone(),
            offset: d.offset,
            len,
        })
    }

    /// After a reconnect: ask again at once rather than wait out the timeout.
    pub fn on_connected(&mut self) {
        self.paused = false;
        if let Some(d) = self.dl.as_mut() {
            d.fetch_at = Some(Instant::now());
        }
    }

    /// A chunk arrived.
    pub fn on_chunk(&mut self, c: Chunk) -> Progress {
        let Some(d) = self.dl.as_mut() else {
            return Progress::None;
        };
        if c.sha256 != d.manifest.sha256 || c.offset != d.offset {
            // A late answer to a fetch asked again: the one in flight is still coming.
            return Progress::None;
        }
        if let Some(e) = c.error {
            let (version, rollout) = (d.manifest.version.clone(), d.rollout.clone());
            let _ = std::fs::remove_file(&d.path);
            self.dl = None;
            let reason = format!(
                "update_failed: the backend cannot serve {version}: {}",
                e.chars().take(200).collect::<String>()
            );
            self.fail(reason.clone(), &version, Some(&rollout));
            return Progress::Failed { version, reason };
        }
        let room = d.manifest.size - d.offset;
        if c.data.is_empty() || c.data.len() as u64 > room || c.data.len() > MAX_CHUNK as usize {
            // Ask again.
            d.fetch_at = Some(Instant::now() + Duration::from_secs(1));
            return Progress::None;
        }
        if let Err(e) = d.file.write_all(&c.data) {
            let (version, rollout) = (d.manifest.version.clone(), d.rollout.clone());
            let reason = format!("update_failed: cannot write the download: {e}");
            let _ = std::fs::remove_file(&d.path);
            self.dl = None;
            self.fail(reason.clone(), &version, Some(&rollout));
            return Progress::Failed { version, reason };
        }
        d.offset += c.data.len() as u64;
        self.received += c.data.len() as u64;
        d.asked_at = None;
        // Paced: the next chunk when this one's bytes have had their time at the rate.
        d.fetch_at = Some(
            Instant::now() + Duration::from_micros(c.data.len() as u64 * 1_000_000 / self.rate),
        );
        if d.offset < d.manifest.size {
            return Progress::More;
        }
        let Some(d) = self.dl.take() else {
            return Progress::None;
        };
        let rollout = d.rollout.clone();
        match self.stage(d) {
            Ok(version) => {
                self.staged = Some(version.clone());
                Progress::Staged(version)
            }
            Err((version, why)) => {
                let reason = format!("update_failed: {why}");
                self.fail(reason.clone(), &version, Some(&rollout));
                Progress::Failed { version, reason }
            }
        }
    }

    /// Checks the whole download against its manifest, moves it into `bin/` and
    /// stages it for the supervisor.
    fn stage(&self, d: Download) -> Result<String, (String, String)> {
        let version = d.manifest.version.clone();
        let fail = |why: String| (version.clone(), why);
        let Download {
            file,
            path,
            manifest,
            signed,
            rollout,
            ..
        } = d;
        file.sync_all()
            .map_err(|e| fail(format!("cannot sync the download: {e}")))?;
        drop(file);
        let bytes =
            std::fs::read(&path).map_err(|e| fail(format!("cannot read the download: {e}")))?;
        if let Err(e) = release::verify_binary(&manifest, &bytes) {
            let _ = std::fs::remove_file(&path);
            return Err(fail(e.to_string()));
        }
        drop(bytes);
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| fail(format!("{}: {e}", bin.display())))?;
        let name = format!("imn-agent-{version}");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(format!("cannot make the release executable: {e}")))?;
        }
        std::fs::rename(&path, bin.join(&name))
            .map_err(|e| fail(format!("cannot move the release into bin/: {e}")))?;
        for d in [&bin, &self.dir] {
            if let Ok(f) = std::fs::File::open(d) {
                let _ = f.sync_all();
            }
        }
        let staged = Installed {
            version: version.clone(),
            file: name,
            manifest: signed,
            rollout: rollout.clone(),
        };
        write_json(&self.dir, STAGED, &staged)
            .map_err(|e| fail(format!("cannot stage the release: {e}")))?;
        tracing::info!(%version, %rollout, "release verified and staged; restarting into it");
        Ok(version)
    }

    /// New remote settings: checked over `base`, then staged for the supervisor.
    /// Ok(false): already running them.
    pub fn offer_settings(
        &mut self,
        s: RemoteSettings,
        base: &crate::AgentConfig,
    ) -> Result<bool, String> {
        if s.version <= self.settings_version {
            return Ok(false);
        }
        let version = s.version.to_string();
        if !self.supervised {
            let why = "settings_failed: this agent runs without its supervisor (no update_keys, supervise = false), so it cannot try settings and revert them";
            return Err(self.fail(why.into(), &version, None));
        }
        if let Err(e) = s.check_over(base) {
            return Err(self.fail(format!("settings_failed: {e}"), &version, None));
        }
        if let Some(bad) = read_json::<Failure>(&self.dir, FAILURE_REPORTED)
            .filter(|f| f.kind == "settings_failed" && f.version == version)
        {
            // This version was tried and reverted: not again (a new version may be).
            self.fail(format!("settings_failed: {}", bad.reason), &version, None);
            return Ok(false);
        }
        if let Err(e) = write_json(&self.dir, SETTINGS_NEXT, &s) {
            return Err(self.fail(format!("settings_failed: {e}"), &version, None));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(label: &str) -> PathBuf {
        crate::test_dir(&format!("update-{label}"))
    }

    /// A signed release of `body` as `version` for this machine.
    fn signed(version: &str, body: &[u8]) -> (Vec<String>, SignedManifest) {
        let k = release::SigningKey::from_pkcs8(&release::SigningKey::generate().unwrap()).unwrap();
        let now = imn_proto::now_ms();
        let file = k
            .sign(
                body,
                version,
                std::env::consts::ARCH,
                now,
                now + 60_000,
                false,
            )
            .unwrap();
        (vec![k.public_hex()], release::split(&file).unwrap().0)
    }

    fn chunk(m: &SignedManifest, offset: u64, data: &[u8]) -> Chunk {
        let m: Manifest = serde_json::from_str(&m.manifest).unwrap();
        Chunk {
            sha256: m.sha256,
            offset,
            total: m.size,
            data: data.to_vec(),
            error: None,
        }
    }

    #[test]
    fn a_download_is_paced_paused_offline_resumed_and_staged_once_it_checks() {
        let data = temp("dl");
        let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (keys, m) = signed("99.0.0", &body);
        let mut u = Updater::new(&data, keys.clone(), true, 8192, 0);
        assert!(u.offer("ro-1".into(), m.clone()).unwrap());
        assert!(
            !u.offer("ro-1".into(), m.clone()).unwrap(),
            "the same again changes nothing"
        );
        let now = Instant::now();
        let Some(UpdateUp::Fetch { offset: 0, len, .. }) = u.fetch(now) else {
            panic!("a first fetch")
        };
        assert_eq!(len, 4096, "a quarter second at 8 KiB/s, at least 4 KiB");
        assert!(u.fetch(now).is_none(), "one fetch in flight");
        // Offline: nothing is due (no busy loop) until the link is back.
        u.on_disconnected();
        assert_eq!(u.fetch_at(), None);
        u.on_connected();
        assert!(u.fetch_at().is_some_and(|at| at <= Instant::now()));
        // A chunk for another offset (a late answer) is ignored.
        assert!(matches!(
            u.on_chunk(chunk(&m, 4096, &body[4096..8192])),
            Progress::None
        ));
        assert!(matches!(
            u.on_chunk(chunk(&m, 0, &body[..4096])),
            Progress::More
        ));
        // Paced: the next fetch waits the chunk's time at the rate (about 0.5 s).
        assert!(u.fetch_at().unwrap() > Instant::now() + Duration::from_millis(300));
        // A restart: a new updater resumes at the partial file's length.
        drop(u);
        let mut u = Updater::new(&data, keys.clone(), true, 1 << 20, 0);
        assert!(u.offer("ro-1".into(), m.clone()).unwrap());
        let Some(UpdateUp::Fetch { offset, .. }) = u.fetch(Instant::now()) else {
            panic!("a fetch")
        };
        assert_eq!(offset, 4096, "resumed where it stopped");
        match u.on_chunk(chunk(&m, 4096, &body[4096..])) {
            Progress::Staged(v) => assert_eq!(v, "99.0.0"),
            _ => panic!("staged"),
        }
        let staged: Installed = read_json(&dir(&data), STAGED).unwrap();
        assert_eq!(staged.rollout, "ro-1");
        assert_eq!(
            std::fs::read(dir(&data).join("bin/imn-agent-99.0.0")).unwrap(),
            body
        );
        let _ = std::fs::remove_dir_all(&data);
    }

    #[test]
    fn a_download_that_does_not_match_its_manifest_is_not_staged() {
        let data = temp("bad");
        let body = vec![7u8; 5000];
        let (keys, m) = signed("99.0.0", &body);
        let mut u = Updater::new(&data, keys, true, 1 << 20, 0);
        u.offer("ro-2".into(), m.clone()).unwrap();
        let mut altered = body.clone();
        altered[100] ^= 1;
        match u.on_chunk(chunk(&m, 0, &altered)) {
            Progress::Failed { reason, .. } => {
                assert!(reason.starts_with("update_failed: sha256:"), "{reason}")
            }
            _ => panic!("failed"),
        }
        let st = u.status();
        assert_eq!(st.failed_rollout.as_deref(), Some("ro-2"));
        assert!(!dir(&data).join(STAGED).exists());
        assert!(!dir(&data).join("bin/imn-agent-99.0.0").exists());
        // Unsupervised, or a key it does not trust: refused before any download.
        let (_, other) = signed("99.1.0", &body);
        let e = u.offer("ro-3".into(), other).unwrap_err();
        assert!(e.contains("not trusted"), "{e}");
        // No room for it and the outbox's reserve: refused before anything is written.
        let (keys, m2) = signed("99.2.0", &body);
        let mut full = Updater::new(&data, keys, true, 1 << 20, u64::MAX / 4);
        let e = full.offer("ro-5".into(), m2).unwrap_err();
        assert!(
            e.starts_with("update_failed: not enough space for 99.2.0"),
            "{e}"
        );
        assert!(!std::fs::read_dir(dir(&data)).unwrap().flatten().any(|e| e
            .file_name()
            .to_string_lossy()
            .contains("partial")
            && e.metadata().unwrap().len() > 0));
        let mut alone = Updater::new(&data, vec![], false, 1 << 20, 0);
        assert!(alone
            .offer("ro-4".into(), m)
            .unwrap_err()
            .contains("without its supervisor"));
        let _ = std::fs::remove_dir_all(&data);
    }

    #[test]
    fn chunks_follow_the_rate_within_bounds() {
        assert_eq!(chunk_len(32 * 1024), 8 * 1024);
        assert_eq!(chunk_len(1024), 4096);
        assert_eq!(chunk_len(100 << 20), MAX_CHUNK);
    }

    #[test]
    fn the_version_is_the_package_s_unless_stamped() {
        match option_env!("IMN_AGENT_VERSION") {
            Some(v) if !v.is_empty() => assert_eq!(VERSION, v),
            _ => assert_eq!(VERSION, env!("CARGO_PKG_VERSION")),
        }
        assert!(release::check_version(VERSION).is_ok());
    }
}
