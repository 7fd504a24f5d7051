//! Machine health for heartbeats, read straight from procfs and statvfs: no dependency,
//! and nothing a small router lacks.

use std::path::Path;

/// CPU counters from `/proc/stat`: (busy, total) jiffies.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    busy: u64,
    total: u64,
}

pub fn cpu_sample() -> CpuSample {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return CpuSample::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    CpuSample {
        busy: total.saturating_sub(idle),
        total,
    }
}

/// CPU use between two samples, 0..=100.
pub fn cpu_pct(prev: CpuSample, now: CpuSample) -> f32 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    (100.0 * now.busy.saturating_sub(prev.busy) as f64 / total as f64) as f32
}

pub fn uptime_s() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s as u64)
        .unwrap_or(0)
}

pub fn load() -> [f32; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|x| x.parse::<f32>().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// (total, available) memory in KiB.
pub fn memory_kib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// (total, free to unprivileged users) KiB of the filesystem holding `path`.
pub fn disk_kib(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize as u64;
    (
        st.f_blocks as u64 * frsize / 1024,
        st.f_bavail as u64 * frsize / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let (total, avail) = memory_kib();
        assert!(total > 0 && avail <= total);
        assert!(uptime_s() > 0);
        let (dt, df) = disk_kib(Path::new("/"));
        assert!(dt > 0 && df <= dt);
        let a = cpu_sample();
        let b = cpu_sample();
        assert!((0.0..=100.0).contains(&cpu_pct(a, b)));
    }
}
