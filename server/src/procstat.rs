//! A process's CPU time and memory, as Linux's `/proc` tells them: the server reports its own
//! on `/metrics`, and the bench reads the server it started. Elsewhere every figure is `None`.

use std::time::Duration;

/// What a process has used so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, user and system, on all cores.
    pub cpu: Duration,
    /// Memory resident now (`VmRSS`).
    pub resident_bytes: u64,
    /// The most resident at once, since start or since the last [`reset_peak`] (`VmHWM`).
    pub peak_resident_bytes: u64,
}

/// `pid`'s usage, if `/proc` tells it.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = status(pid)?;
    Some(Usage { cpu: cpu_time(pid)?, resident_bytes: kb(&status, "VmRSS:")? * 1024, peak_resident_bytes: kb(&status, "VmHWM:")? * 1024 })
}

/// Peak resident memory of `pid` since start or since the last [`reset_peak`] (`VmHWM`).
pub fn peak_rss(pid: u32) -> Option<u64> {
    kb(&status(pid)?, "VmHWM:").map(|kb| kb * 1024)
}

/// Reset `pid`'s peak to its current resident size, so the next reading is a peak since now.
/// Returns false where the kernel does not allow it (the peak is then since start).
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU time (user and system) `pid` has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: state is
    // the first, utime the 12th, stime the 13th.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = rest.next()?.parse::<u64>().ok()? + rest.next()?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// A `kB` line of a `/proc/<pid>/status` text.
fn kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measured() {
        // Work that takes CPU and memory, so neither figure can be a stray zero.
        let v: Vec<u64> = (0..4_000_000u64).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let spent = std::time::Instant::now();
        while spent.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)));
        }
        let u = usage(std::process::id()).expect("/proc tells this process's usage");
        assert!(u.cpu >= Duration::from_millis(10), "{u:?}");
        assert!(u.resident_bytes >= 16 << 20, "the 32 MB vector is resident: {u:?}");
        assert!(u.peak_resident_bytes >= u.resident_bytes, "{u:?}");
        assert_eq!(usage(u32::MAX), None, "no such process");
    }
}
