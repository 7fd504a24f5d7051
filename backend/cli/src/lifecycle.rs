//! The `imn` commands for the agents' lifecycle: signed over-the-air releases
//! (`imn releases keygen|sign|add|list`), staged rollouts of a release (`imn rollout
//! start|status|pause|resume|abort`) and remote settings (`imn settings set`).
//!
//! Keys and signatures are made here, on the operator's machine, with
//! [`imn_proto::release`]: the private key never reaches the backend, which only
//! stores signed files and hands them out. Like the other client commands, each prints
//! a table for people, or JSON with `--json` where it lists something.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use imn_proto::release::{self, Refused, SigningKey};
use serde_json::{json, Map, Value};

use crate::cli::{parse_duration, parse_selection, table};
use crate::client::{Client, ClientError};

/// Mode of a signed release file (it holds nothing secret).
const RELEASE_FILE_MODE: u32 = 0o644;

/// A field of an API answer as a table cell: `-` when missing or null.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A percentage as people write it: `10%`, `12.5%`.
fn pct(p: f64) -> String {
    format!("{p}%")
}

/// Bytes as a short size: `812 B`, `4.2 MiB`.
fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = u;
    }
    format!("{x:.1} {unit}")
}

/// Milliseconds since the epoch as UTC, `2026-04-01T12:00:00Z`.
fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
}

/// `PATH` with `suffix` appended to its file name: `key` → `key.pub`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Percent-encodes an id for a URL path segment.
fn path_segment(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// imn releases

/// `imn releases keygen --out KEY`: a new Ed25519 key, its PKCS#8 DER written to KEY
/// (created with mode 0600, never overwritten) and its public key, hex, to `KEY.pub`.
/// Returns what to print: the public key, then where it goes.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    let der = SigningKey::generate().map_err(|e| anyhow!("--out {}: {e}", out.display()))?;
    let key = SigningKey::from_pkcs8(&der).map_err(|e| anyhow!("--out {}: {e}", out.display()))?;
    let public = key.public_hex();
    imn_cloud::files::create_private(out, &der).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!(
                "--out {}: the file exists already; a signing key is never overwritten \
                 (move it away, or choose another path)",
                out.display()
            )
        } else {
            anyhow!("--out {}: {e}", out.display())
        }
    })?;
    let pub_path = with_suffix(out, ".pub");
    // Replaced if there: it has to match the key just made.
    imn_cloud::files::write_with_mode(&pub_path, format!("{public}\n").as_bytes(), 0o644)
        .map_err(|e| anyhow!("{}: {e}", pub_path.display()))?;
    Ok(format!(
        "{public}\nPut this public key (also in {}) in the agents' `update_keys`; keep {} \
         off the backend: whoever holds it can sign releases the agents install.\n",
        pub_path.display(),
        out.display()
    ))
}

/// The architecture of an ELF binary, as `std::env::consts::ARCH` names it (what an
/// agent reports and checks a release against), from its header's `e_machine`.
pub fn elf_arch(head: &[u8]) -> Result<&'static str, String> {
    const ASK: &str = "give --arch (aarch64, arm, x86_64, mips, ...)";
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Err(format!("not an ELF binary; {ASK}"));
    }
    let (class, data) = (head[4], head[5]);
    let machine = match data {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return Err(format!("an ELF header of unknown byte order {data}; {ASK}")),
    };
    match (machine, class) {
        (0xB7, _) => Ok("aarch64"),
        (0x28, _) => Ok("arm"),
        (0x3E, _) => Ok("x86_64"),
        // ELF64 MIPS is what Rust calls mips64: an agent there reports that.
        (0x08, 2) => Ok("mips64"),
        (0x08, _) => Ok("mips"),
        (m, _) => Err(format!("ELF machine {m:#06x} is not one imn knows; {ASK}")),
    }
}

/// `imn releases sign`.
#[derive(Debug, Clone)]
pub struct Sign {
    pub file: PathBuf,
    pub key: PathBuf,
    pub version: String,
    pub arch: Option<String>,
    pub expires: String,
    pub rollback: bool,
    pub out: Option<PathBuf>,
    pub force: bool,
}

/// `imn releases sign FILE`: writes the signed release file and returns what to print
/// about it. `now_ms` is when it is signed.
pub fn sign(s: &Sign, now_ms: i64) -> anyhow::Result<String> {
    release::check_version(&s.version).map_err(|r| anyhow!("--version {:?}: {r}", s.version))?;
    let secs = parse_duration(&s.expires).map_err(|e| anyhow!("--expires {e}"))?;
    let out = s
        .out
        .clone()
        .unwrap_or_else(|| with_suffix(&s.file, ".signed"));
    if !s.force && std::fs::symlink_metadata(&out).is_ok() {
        bail!(
            "--out {}: the file exists already (--force replaces it)",
            out.display()
        );
    }
    let too_big = |size: u64| {
        anyhow!(
            "{}: the binary has {size} bytes; a release has 1 to {} bytes",
            s.file.display(),
            release::MAX_SIZE
        )
    };
    // Not read whole when it cannot be a release anyway.
    let len = std::fs::metadata(&s.file)
        .with_context(|| format!("{}", s.file.display()))?
        .len();
    if len > release::MAX_SIZE {
        return Err(too_big(len));
    }
    let binary = std::fs::read(&s.file).with_context(|| format!("{}", s.file.display()))?;
    let (arch, detected) = match &s.arch {
        Some(a) => (a.clone(), false),
        None => (
            elf_arch(&binary)
                .map_err(|e| anyhow!("{}: {e}", s.file.display()))?
                .to_string(),
            true,
        ),
    };
    let der = std::fs::read(&s.key).with_context(|| format!("--key {}", s.key.display()))?;
    let key =
        SigningKey::from_pkcs8(&der).map_err(|e| anyhow!("--key {}: {e}", s.key.display()))?;
    // At least a millisecond, at most as far as an i64 goes.
    let expires_ms = now_ms.saturating_add((secs * 1000.0).ceil().min(i64::MAX as f64) as i64);
    let signed = key
        .sign(&binary, &s.version, &arch, now_ms, expires_ms, s.rollback)
        .map_err(|e| match e {
            Refused::Field {
                field: "arch",
                rule,
            } => anyhow!("--arch {arch:?}: {rule}"),
            Refused::Field {
                field: "version",
                rule,
            } => anyhow!("--version {:?}: {rule}", s.version),
            Refused::Field { field: "size", .. } => too_big(binary.len() as u64),
            Refused::Field {
                field: "expires_ms",
                rule,
            } => anyhow!("--expires {:?}: the expiry {rule}", s.expires),
            other => anyhow!("{}: {other}", s.file.display()),
        })?;
    let written = if s.force {
        imn_cloud::files::write_with_mode(&out, &signed, RELEASE_FILE_MODE)
    } else {
        imn_cloud::files::create_with_mode(&out, &signed, RELEASE_FILE_MODE)
    };
    written.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!(
                "--out {}: the file exists already (--force replaces it)",
                out.display()
            )
        } else {
            anyhow!("--out {}: {e}", out.display())
        }
    })?;
    Ok(format!(
        "signed {}\n  version   {}\n  arch      {arch}{}\n  size      {} bytes\n  sha256    {}\n  \
         expires   {}\n  rollback  {}\n  key       {}\nUpload it with `imn releases add {}`.\n",
        out.display(),
        s.version,
        if detected {
            " (from the ELF header)"
        } else {
            ""
        },
        binary.len(),
        release::sha256_hex(&binary),
        utc(expires_ms),
        if s.rollback { "yes" } else { "no" },
        key.public_hex(),
        out.display(),
    ))
}

/// One release as a line: `imn-agent 0.2.0 aarch64, 4.2 MiB, sha256 …`.
fn release_line(r: &Value) -> String {
    format!(
        "{} {} {}, {}, sha256 {}, expires {}{}",
        cell(&r["name"]),
        cell(&r["version"]),
        cell(&r["arch"]),
        r["size"].as_u64().map_or_else(|| "-".into(), human_size),
        cell(&r["sha256"]),
        r["expires_ms"].as_i64().map_or_else(|| "-".into(), utc),
        if r["rollback"] == json!(true) {
            ", rollback"
        } else {
            ""
        }
    )
}

/// `imn releases add FILE.signed`: checks the layout here (the backend checks
/// everything, signature included), then uploads the file as it is.
pub async fn add(c: &Client, file: &Path, json_out: bool) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    release::split(&bytes).map_err(|e| {
        anyhow!(
            "{}: {e} (sign the binary first: `imn releases sign`)",
            file.display()
        )
    })?;
    let resp = c.post_bytes("/admin/releases", bytes).await?;
    if json_out {
        return Ok(serde_json::to_string_pretty(&resp)? + "\n");
    }
    let r = resp.get("release").unwrap_or(&resp);
    let verb = if resp["stored"] == json!(false) {
        "already stored"
    } else {
        "stored"
    };
    Ok(format!("{verb}: {}\n", release_line(r)))
}

/// The releases of a `GET /releases` answer as a table.
pub fn releases_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list["releases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                cell(&r["version"]),
                cell(&r["arch"]),
                r["size"].as_u64().map_or_else(|| "-".into(), human_size),
                r["sha256"]
                    .as_str()
                    .map_or_else(|| "-".into(), |h| h.chars().take(12).collect()),
                r["expires_ms"].as_i64().map_or_else(|| "-".into(), utc),
                match r["rollback"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    table(
        &["VERSION", "ARCH", "SIZE", "SHA256", "EXPIRES", "ROLLBACK"],
        &rows,
    )
}

/// `imn releases list`.
pub async fn list(c: &Client, json_out: bool) -> Result<String, ClientError> {
    let list = c.get("/releases").await?;
    if json_out {
        return Ok(serde_json::to_string_pretty(&list).unwrap_or_default() + "\n");
    }
    Ok(releases_table(&list))
}

// ---------------------------------------------------------------------------------
// imn rollout

/// A percentage from `10%` or `10`, 0 to 100; errors name `flag`.
pub fn parse_pct(flag: &str, s: &str) -> Result<f64, String> {
    let t = s.trim();
    let num = t.strip_suffix('%').unwrap_or(t).trim();
    match num.parse::<f64>() {
        Ok(p) if p.is_finite() && (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{flag} {s:?}: not a percentage from 0 to 100, like 10% or 10"
        )),
    }
}

/// The waves of a rollout after its canary, `50%,100%`: each larger than the one
/// before, the last 100% (every agent).
pub fn parse_waves(s: &str) -> Result<Vec<f64>, String> {
    let waves = s
        .split(',')
        .map(|w| parse_pct("--waves", w))
        .collect::<Result<Vec<f64>, String>>()?;
    for w in waves.windows(2) {
        if w[1] <= w[0] {
            return Err(format!(
                "--waves {s:?}: each wave must be larger than the one before ({} then {})",
                pct(w[0]),
                pct(w[1])
            ));
        }
    }
    if waves.last() != Some(&100.0) {
        return Err(format!(
            "--waves {s:?}: the last wave must be 100% (every agent), like 50%,100%"
        ));
    }
    Ok(waves)
}

/// `imn rollout start`.
#[derive(Debug, Clone)]
pub struct RolloutStart {
    pub version: String,
    pub agents: String,
    pub canary: String,
    pub waves: String,
    pub max_failures: String,
}

/// The body of `POST /admin/rollouts`.
pub fn rollout_body(r: &RolloutStart) -> Result<Value, String> {
    release::check_version(&r.version).map_err(|e| format!("VERSION {:?}: {e}", r.version))?;
    Ok(json!({
        "version": r.version,
        "agents": parse_selection(&r.agents)?,
        "canary_pct": parse_pct("--canary", &r.canary)?,
        "waves": parse_waves(&r.waves)?,
        "max_failures_pct": parse_pct("--max-failures", &r.max_failures)?,
    }))
}

/// `imn rollout start VERSION`.
pub async fn rollout_start(c: &Client, r: &RolloutStart) -> anyhow::Result<String> {
    let body = rollout_body(r).map_err(anyhow::Error::msg)?;
    let ro = c.post("/admin/rollouts", body).await?;
    Ok(format!(
        "rollout {}: {} ({} to {} agents; see `imn rollout status {}`)\n",
        cell(&ro["id"]),
        cell(&ro["state"]),
        cell(&ro["version"]),
        ro["agents"]
            .as_array()
            .map_or_else(|| "-".into(), |a| a.len().to_string()),
        cell(&ro["id"]),
    ))
}

/// The current wave as "N of 0-LAST", numbered from 0 as the API and the backend's
/// reasons number them; None when the rollout does not say.
fn wave_of(ro: &Value) -> Option<String> {
    let cur = ro["current_wave"].as_u64()?;
    let count = ro["wave_count"].as_u64().filter(|&n| n > 0)?;
    Some(format!("{cur} of 0-{}", count - 1))
}

/// Whether the current wave is the canary: the backend makes wave 0 the canary when
/// the rollout has one (a canary share above 0).
fn in_canary(ro: &Value) -> bool {
    ro["current_wave"].as_u64() == Some(0) && ro["canary_pct"].as_f64().is_some_and(|p| p > 0.0)
}

/// The rollouts of a `GET /rollouts` answer as a table.
pub fn rollouts_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list["rollouts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|ro| {
            let wave = wave_of(ro).unwrap_or_else(|| "-".into());
            vec![
                cell(&ro["id"]),
                cell(&ro["version"]),
                cell(&ro["state"]),
                wave,
                cell(&ro["counts"]["healthy"]),
                cell(&ro["counts"]["failed"]),
                cell(&ro["counts"]["pending"]),
            ]
        })
        .collect();
    table(
        &[
            "ID", "VERSION", "STATE", "WAVE", "HEALTHY", "FAILED", "PENDING",
        ],
        &rows,
    )
}

/// One rollout: its header, then each agent.
pub fn rollout_detail(ro: &Value) -> String {
    let mut out = format!(
        "rollout  {}\nversion  {}\nstate    {}\n",
        cell(&ro["id"]),
        cell(&ro["version"]),
        cell(&ro["state"])
    );
    if !ro["reason"].is_null() {
        out.push_str(&format!("reason   {}\n", cell(&ro["reason"])));
    }
    out.push_str(&format!(
        "wave     {}{}\n",
        wave_of(ro).unwrap_or_else(|| "-".into()),
        if in_canary(ro) { " (the canary)" } else { "" }
    ));
    let c = &ro["counts"];
    if c.is_object() {
        out.push_str(&format!(
            "agents   {} healthy, {} failed, {} pending{}\n",
            cell(&c["healthy"]),
            cell(&c["failed"]),
            cell(&c["pending"]),
            // Agents with no release for their architecture.
            match c["skipped"].as_u64() {
                Some(n) if n > 0 => format!(", {n} skipped"),
                _ => String::new(),
            }
        ));
    }
    let rows: Vec<Vec<String>> = ro["agents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                cell(&a["id"]),
                cell(&a["wave"]),
                cell(&a["state"]),
                cell(&a["version"]),
                cell(&a["detail"]),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["AGENT", "WAVE", "STATE", "VERSION", "DETAIL"],
        &rows,
    ));
    out
}

/// `imn rollout status [ID]`.
pub async fn rollout_status(
    c: &Client,
    id: Option<&str>,
    json_out: bool,
) -> Result<String, ClientError> {
    let v = match id {
        Some(id) => c.get(&format!("/rollouts/{}", path_segment(id))).await?,
        None => c.get("/rollouts").await?,
    };
    if json_out {
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
    }
    Ok(match id {
        Some(_) => rollout_detail(&v),
        None => rollouts_table(&v),
    })
}

/// What to do to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    Abort,
}

impl RolloutAction {
    fn path(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
        }
    }
}

/// `imn rollout pause|resume|abort ID`: the rollout's new state.
pub async fn rollout_action(
    c: &Client,
    id: &str,
    action: RolloutAction,
) -> Result<String, ClientError> {
    let ro = c
        .post(
            &format!("/admin/rollouts/{}/{}", path_segment(id), action.path()),
            json!({}),
        )
        .await?;
    let reason = match &ro["reason"] {
        Value::Null => String::new(),
        r => format!(" ({})", cell(r)),
    };
    Ok(format!(
        "rollout {}: {}{reason}\n",
        ro["id"].as_str().unwrap_or(id),
        cell(&ro["state"])
    ))
}

// ---------------------------------------------------------------------------------
// imn settings

/// `KEY=VALUE` pairs as a settings object (values stay strings): at least one, split
/// at the first `=`, keys not empty and each given once.
pub fn parse_settings(pairs: &[String]) -> Result<Map<String, Value>, String> {
    if pairs.is_empty() {
        return Err("KEY=VALUE: give at least one setting, like heartbeat_ms=30000".into());
    }
    let mut out = Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("KEY=VALUE {p:?}: write KEY=VALUE"))?;
        if k.trim().is_empty() {
            return Err(format!("KEY=VALUE {p:?}: the KEY before `=` is empty"));
        }
        if out.insert(k.to_string(), json!(v)).is_some() {
            return Err(format!("KEY=VALUE {p:?}: {k} is given twice"));
        }
    }
    Ok(out)
}

/// The body of `POST /admin/settings`.
pub fn settings_body(agents: &str, pairs: &[String]) -> Result<Value, String> {
    Ok(json!({
        "agents": parse_selection(agents)?,
        "settings": parse_settings(pairs)?,
    }))
}

/// `imn settings set --agents SEL KEY=VALUE...`: each agent's new settings version.
pub async fn settings_set(c: &Client, agents: &str, pairs: &[String]) -> anyhow::Result<String> {
    let body = settings_body(agents, pairs).map_err(anyhow::Error::msg)?;
    let resp = c.post("/admin/settings", body).await?;
    let rows: Vec<Vec<String>> = resp["agents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| vec![cell(&a["id"]), cell(&a["settings_version"])])
        .collect();
    if rows.is_empty() {
        eprintln!("imn settings set: no agent matched --agents {agents}");
    }
    Ok(table(&["AGENT", "SETTINGS_VERSION"], &rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::test_util::TempDir;

    /// An ELF header of `class` (1: 32-bit, 2: 64-bit), byte order `data` (1: little,
    /// 2: big) and `machine`, followed by some code.
    fn elf(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        h[6] = 1;
        let m = if data == 2 {
            machine.to_be_bytes()
        } else {
            machine.to_le_bytes()
        };
        h[18..20].copy_from_slice(&m);
        h.extend(b"pretend machine code".repeat(50));
        h
    }

    #[test]
    fn the_arch_comes_from_the_elf_header_or_must_be_given() {
        assert_eq!(elf_arch(&elf(2, 1, 0xB7)).unwrap(), "aarch64");
        assert_eq!(elf_arch(&elf(1, 1, 0x28)).unwrap(), "arm");
        assert_eq!(elf_arch(&elf(2, 1, 0x3E)).unwrap(), "x86_64");
        // Big-endian MIPS, as most MIPS routers run: the machine read in its order.
        assert_eq!(elf_arch(&elf(1, 2, 0x08)).unwrap(), "mips");
        assert_eq!(elf_arch(&elf(1, 1, 0x08)).unwrap(), "mips");
        assert_eq!(elf_arch(&elf(2, 2, 0x08)).unwrap(), "mips64");
        // Read in the wrong order, big-endian aarch64 would be 0xB700.
        assert_eq!(elf_arch(&elf(2, 2, 0xB7)).unwrap(), "aarch64");
        for refused in [
            elf(1, 1, 0x03), // i386: not known
            elf(2, 1, 0xF3), // riscv
            elf(2, 3, 0xB7), // no such byte order
            b"#!/bin/sh\necho hi\n".to_vec(),
            b"\x7fELF".to_vec(), // too short
            Vec::new(),
        ] {
            let e = elf_arch(&refused).unwrap_err();
            assert!(e.contains("--arch"), "{e}");
        }
        assert!(elf_arch(&elf(1, 1, 0x03)).unwrap_err().contains("0x0003"));
    }

    #[test]
    fn percentages_and_waves_parse_or_say_why_not() {
        assert_eq!(parse_pct("--canary", "10%").unwrap(), 10.0);
        assert_eq!(parse_pct("--canary", "10").unwrap(), 10.0);
        assert_eq!(parse_pct("--canary", " 12.5 % ").unwrap(), 12.5);
        assert_eq!(parse_pct("--canary", "0").unwrap(), 0.0);
        assert_eq!(parse_pct("--canary", "100%").unwrap(), 100.0);
        for bad in ["101", "-1%", "ten", "", "%", "NaN", "inf", "10%%"] {
            let e = parse_pct("--max-failures", bad).unwrap_err();
            assert!(
                e.starts_with("--max-failures") && e.contains("0 to 100"),
                "{bad}: {e}"
            );
        }
        assert_eq!(parse_waves("100%").unwrap(), vec![100.0]);
        assert_eq!(parse_waves("25,50%,100").unwrap(), vec![25.0, 50.0, 100.0]);
        let e = parse_waves("50%,50%,100%").unwrap_err();
        assert!(e.starts_with("--waves") && e.contains("larger"), "{e}");
        let e = parse_waves("60%,30%,100%").unwrap_err();
        assert!(e.contains("larger"), "{e}");
        let e = parse_waves("50%,90%").unwrap_err();
        assert!(
            e.starts_with("--waves") && e.contains("last wave must be 100%"),
            "{e}"
        );
        let e = parse_waves("50%,,100%").unwrap_err();
        assert!(e.starts_with("--waves"), "{e}");
        let e = parse_waves("50%,150%").unwrap_err();
        assert!(e.contains("0 to 100"), "{e}");

        let start = RolloutStart {
            version: "0.2.0".into(),
            agents: "tag:lte,id:edge-1".into(),
            canary: "10%".into(),
            waves: "50%,100%".into(),
            max_failures: "5".into(),
        };
        assert_eq!(
            rollout_body(&start).unwrap(),
            json!({"version": "0.2.0", "agents": {"tags": ["lte"], "ids": ["edge-1"]},
                   "canary_pct": 10.0, "waves": [50.0, 100.0], "max_failures_pct": 5.0})
        );
        let e = rollout_body(&RolloutStart {
            version: "latest".into(),
            ..start.clone()
        })
        .unwrap_err();
        assert!(e.starts_with("VERSION \"latest\""), "{e}");
        let e = rollout_body(&RolloutStart {
            canary: "200%".into(),
            ..start.clone()
        })
        .unwrap_err();
        assert!(e.starts_with("--canary"), "{e}");
        let e = rollout_body(&RolloutStart {
            agents: "colour:red".into(),
            ..start
        })
        .unwrap_err();
        assert!(e.starts_with("--agents"), "{e}");
    }

    #[test]
    fn settings_are_key_value_strings() {
        let pairs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Value::Object(
                parse_settings(&pairs(&["heartbeat_ms=30000", "note=a=b", "empty="])).unwrap()
            ),
            json!({"heartbeat_ms": "30000", "note": "a=b", "empty": ""})
        );
        assert!(parse_settings(&[]).unwrap_err().contains("at least one"));
        let e = parse_settings(&pairs(&["novalue"])).unwrap_err();
        assert!(e.contains("\"novalue\"") && e.contains("KEY=VALUE"), "{e}");
        let e = parse_settings(&pairs(&["=3"])).unwrap_err();
        assert!(e.contains("KEY before `=` is empty"), "{e}");
        let e = parse_settings(&pairs(&["a=1", "a=2"])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert_eq!(
            settings_body("all", &pairs(&["x=1"])).unwrap(),
            json!({"agents": {"all": true}, "settings": {"x": "1"}})
        );
        assert!(settings_body("", &pairs(&["x=1"]))
            .unwrap_err()
            .starts_with("--agents"));
    }

    #[test]
    fn keygen_then_sign_makes_a_release_that_opens_with_the_written_public_key() {
        let tmp = TempDir::new("lifecycle");
        std::fs::create_dir_all(&tmp.0).unwrap();
        let key = tmp.0.join("release.key");
        let printed = keygen(&key).unwrap();
        let public = std::fs::read_to_string(tmp.0.join("release.key.pub")).unwrap();
        assert_eq!(public.len(), 65, "{public:?}");
        assert!(public.ends_with('\n'));
        let public = public.trim_end().to_string();
        let trusted = [public.clone()];
        assert!(printed.starts_with(&format!("{public}\n")), "{printed}");
        assert!(printed.contains("update_keys"), "{printed}");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second keygen to the same path is refused and leaves the key as it was.
        let der = std::fs::read(&key).unwrap();
        let e = keygen(&key).unwrap_err().to_string();
        assert!(e.starts_with("--out") && e.contains("exists"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), der);
        assert_eq!(
            std::fs::read_to_string(tmp.0.join("release.key.pub")).unwrap(),
            format!("{public}\n")
        );

        let bin_path = tmp.0.join("imn-agent");
        let binary = elf(2, 1, 0xB7);
        std::fs::write(&bin_path, &binary).unwrap();
        let now = imn_proto::now_ms();
        let s = Sign {
            file: bin_path.clone(),
            key: key.clone(),
            version: "0.2.0".into(),
            arch: None,
            expires: "90d".into(),
            rollback: false,
            out: None,
            force: false,
        };
        let printed = sign(&s, now).unwrap();
        assert!(
            printed.contains("aarch64 (from the ELF header)"),
            "{printed}"
        );
        assert!(printed.contains(&public), "{printed}");
        let signed_path = tmp.0.join("imn-agent.signed");
        let file = std::fs::read(&signed_path).unwrap();
        let (_, m, body) = release::open(&file, &trusted, now).unwrap();
        assert_eq!(body, &binary[..]);
        assert_eq!(m.version, "0.2.0");
        assert_eq!(m.arch, "aarch64");
        assert_eq!(m.signed_ms, now);
        assert_eq!(m.expires_ms, now + 90 * 86_400_000);
        assert!(!m.rollback);
        // Not with another key.
        let other = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        assert!(release::open(&file, &[other.public_hex()], now).is_err());

        // OUT exists: refused, unless --force.
        let e = sign(&s, now).unwrap_err().to_string();
        assert!(e.starts_with("--out") && e.contains("--force"), "{e}");
        let forced = Sign {
            arch: Some("arm".into()),
            rollback: true,
            force: true,
            ..s.clone()
        };
        sign(&forced, now).unwrap();
        let file = std::fs::read(&signed_path).unwrap();
        let (_, m, _) = release::open(&file, &trusted, now).unwrap();
        assert_eq!((m.arch.as_str(), m.rollback), ("arm", true));

        // Not an ELF binary and no --arch; a bad --version, --arch or --expires.
        let script = tmp.0.join("script.sh");
        std::fs::write(&script, b"#!/bin/sh\n").unwrap();
        let e = sign(
            &Sign {
                file: script,
                ..s.clone()
            },
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not an ELF binary") && e.contains("--arch"),
            "{e}"
        );
        let out = Some(tmp.0.join("other.signed"));
        let empty = tmp.0.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = sign(
            &Sign {
                file: empty,
                arch: Some("arm".into()),
                out: out.clone(),
                ..s.clone()
            },
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("has 0 bytes; a release has 1 to"), "{e}");
        for (bad, flag) in [
            (
                Sign {
                    version: "v2".into(),
                    out: out.clone(),
                    ..s.clone()
                },
                "--version",
            ),
            (
                Sign {
                    arch: Some("x86 64".into()),
                    out: out.clone(),
                    ..s.clone()
                },
                "--arch",
            ),
            (
                Sign {
                    expires: "soon".into(),
                    out: out.clone(),
                    ..s.clone()
                },
                "--expires",
            ),
            (
                Sign {
                    key: bin_path.clone(),
                    out: out.clone(),
                    ..s.clone()
                },
                "--key",
            ),
        ] {
            let e = sign(&bad, now).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{flag}: {e}");
        }
        assert!(!tmp.0.join("other.signed").exists());
    }

    #[test]
    fn tables_are_tolerant_of_missing_fields() {
        let list = json!({"releases": [
            {"name": "imn-agent", "version": "0.2.0", "arch": "aarch64", "size": 5_000_000,
             "sha256": "0123456789abcdef0123", "expires_ms": 1_800_000_000_000i64,
             "rollback": false},
            {"version": "0.1.0"}
        ]});
        let t = releases_table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("VERSION  ARCH"), "{t}");
        assert!(
            lines[1].contains("4.8 MiB")
                && lines[1].contains("0123456789ab ")
                && !lines[1].contains("0123456789abc")
                && lines[1].contains("2027-01-15T08:00:00Z")
                && lines[1].ends_with("no"),
            "{t}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["0.1.0", "-", "-", "-", "-", "-"]
        );

        let ro = json!({"id": "r-1", "version": "0.2.0", "state": "halted",
            "reason": "1 of 1 canary agents failed", "canary_pct": 10.0, "waves": [50.0, 100.0],
            "current_wave": 0, "wave_count": 3,
            "agents": [{"id": "edge-1", "wave": 0, "state": "failed", "version": "0.1.0",
                        "detail": "trial: no heartbeat"}, {"id": "edge-2"}],
            "counts": {"healthy": 0, "failed": 1, "pending": 1}});
        let d = rollout_detail(&ro);
        assert!(d.contains("state    halted\n"), "{d}");
        assert!(d.contains("reason   1 of 1 canary agents failed\n"), "{d}");
        assert!(d.contains("wave     0 of 0-2 (the canary)\n"), "{d}");
        assert!(
            d.contains("agents   0 healthy, 1 failed, 1 pending\n"),
            "{d}"
        );
        assert!(d.contains("AGENT   WAVE  STATE"), "{d}");
        assert!(
            d.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["edge-2", "-", "-", "-", "-"]),
            "{d}"
        );
        // No canary: wave 0 is a plain wave. Agents without a release are skipped.
        let d = rollout_detail(&json!({"id": "r-3", "current_wave": 0, "wave_count": 2,
            "canary_pct": 0.0, "counts": {"healthy": 1, "failed": 0, "pending": 0, "skipped": 2}}));
        assert!(d.contains("wave     0 of 0-1\n"), "{d}");
        assert!(
            d.contains("agents   1 healthy, 0 failed, 0 pending, 2 skipped\n"),
            "{d}"
        );
        let d = rollout_detail(&json!({"id": "r-2"}));
        assert!(
            d.contains("version  -\n") && d.contains("wave     -\n"),
            "{d}"
        );
        assert!(!d.contains("reason"), "{d}");

        let t = rollouts_table(&json!({"rollouts": [ro, {"id": "r-2", "current_wave": 1,
            "wave_count": 2, "state": "running"}]}));
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            rows,
            [
                vec!["ID", "VERSION", "STATE", "WAVE", "HEALTHY", "FAILED", "PENDING"],
                vec!["r-1", "0.2.0", "halted", "0", "of", "0-2", "0", "1", "1"],
                vec!["r-2", "-", "running", "1", "of", "0-1", "-", "-", "-"],
            ]
        );
    }

    #[test]
    fn ids_are_escaped_in_paths_and_sizes_read_well() {
        assert_eq!(path_segment("r-1a_b.c"), "r-1a_b.c");
        assert_eq!(path_segment("../x y"), "..%2Fx%20y");
        assert_eq!(human_size(812), "812 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    }
}
