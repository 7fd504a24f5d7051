//! Machine health, read straight from procfs and statvfs: no dependency, and nothing a
//! small router lacks. Used by the agent's heartbeats and by the `heartbeat` module.

use std::path::Path;

use imn_proto::results::{InterfaceStats, SystemSnapshot};

/// (busy, total) jiffies of one `cpu` line of `/proc/stat`.
type CpuTimes = (u64, u64);

/// Keeps the previous CPU counters, so each sample reports use since the last one.
#[derive(Debug, Default, Clone)]
pub struct CpuSampler {
    prev_all: CpuTimes,
    prev_cores: Vec<CpuTimes>,
}

fn parse_cpu_line(line: &str) -> CpuTimes {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn pct(prev: CpuTimes, now: CpuTimes) -> f32 {
    let total = now.1.saturating_sub(prev.1);
    if total == 0 {
        return 0.0;
    }
    (100.0 * now.0.saturating_sub(prev.0) as f64 / total as f64) as f32
}

impl CpuSampler {
    pub fn new() -> CpuSampler {
        let mut s = CpuSampler::default();
        s.sample();
        s
    }

    /// CPU use since the previous sample: whole machine, and per core.
    pub fn sample(&mut self) -> (f32, Vec<f32>) {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut all = self.prev_all;
        let mut cores = Vec::new();
        for line in text.lines() {
            if line.starts_with("cpu ") {
                all = parse_cpu_line(line);
            } else if line.starts_with("cpu") {
                cores.push(parse_cpu_line(line));
            }
        }
        let all_pct = pct(self.prev_all, all);
        let core_pct = cores
            .iter()
            .enumerate()
            .map(|(i, &c)| pct(self.prev_cores.get(i).copied().unwrap_or((0, 0)), c))
            .collect();
        self.prev_all = all;
        self.prev_cores = cores;
        (all_pct, core_pct)
    }
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

/// `/proc/meminfo` fields in KiB: (MemTotal, MemAvailable, SwapTotal, SwapFree).
pub fn memory_kib() -> (u64, u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (
        field("MemTotal:"),
        field("MemAvailable:"),
        field("SwapTotal:"),
        field("SwapFree:"),
    )
}

/// (total, free to unprivileged users) KiB of the filesystem holding `path`.
pub fn disk_kib(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs is plain data; all-zero is a valid value.
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

/// Per-interface counters from `/proc/net/dev`.
pub fn interfaces() -> Vec<InterfaceStats> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() < 11 {
                return None;
            }
            Some(InterfaceStats {
                name: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
            })
        })
        .collect()
}

/// Everything at once.
pub fn snapshot(cpu: &mut CpuSampler, data_dir: &Path) -> SystemSnapshot {
    let (cpu_pct, cpu_per_core_pct) = cpu.sample();
    let (mem_total_kib, mem_available_kib, swap_total_kib, swap_free_kib) = memory_kib();
    let (disk_total_kib, disk_free_kib) = disk_kib(data_dir);
    SystemSnapshot {
        uptime_s: uptime_s(),
        cpu_pct,
        cpu_per_core_pct,
        mem_total_kib,
        mem_available_kib,
        swap_total_kib,
        swap_free_kib,
        load: load(),
        disk_total_kib,
        disk_free_kib,
        interfaces: interfaces(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let mut cpu = CpuSampler::new();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let s = snapshot(&mut cpu, Path::new("/"));
        assert!(s.mem_total_kib > 0 && s.mem_available_kib <= s.mem_total_kib);
        assert!(s.uptime_s > 0);
        assert!(s.disk_total_kib > 0 && s.disk_free_kib <= s.disk_total_kib);
        assert!((0.0..=100.0).contains(&s.cpu_pct));
        assert!(!s.cpu_per_core_pct.is_empty());
        assert!(s.interfaces.iter().any(|i| i.name == "lo"), "lo is listed");
    }
}
