//! The server's CPU time and peak memory over a phase: from `/proc` for the server the bench
//! started, from `/metrics` for one given with `--server`.

use std::time::Duration;

use peersync_core::sync::SyncOptions;
use peersync_core::sync::http::request_bytes;

use crate::procstat;

/// How long a `/metrics` read may take, and how large its answer may be (a few kilobytes).
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_METRICS: usize = 1 << 20;

pub enum ServerProbe {
    /// The bench's own child process.
    Child(u32),
    /// A running server's `/metrics`, read with the admin token. Its peak memory cannot be
    /// reset from outside: it is the peak since that server started.
    Metrics { opts: SyncOptions, token: String },
}

/// The server's figures at one moment; `None` where it does not tell.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Reading {
    pub cpu: Option<Duration>,
    pub peak_rss: Option<u64>,
}

impl ServerProbe {
    /// At a phase's start: resets the peak where possible (returns whether it did) and reads.
    pub async fn begin(&self) -> (bool, Reading) {
        let reset = match self {
            ServerProbe::Child(pid) => procstat::reset_peak(*pid),
            ServerProbe::Metrics { .. } => false,
        };
        (reset, self.read().await)
    }

    pub async fn read(&self) -> Reading {
        match self {
            ServerProbe::Child(pid) => Reading { cpu: procstat::cpu_time(*pid), peak_rss: procstat::peak_rss(*pid) },
            ServerProbe::Metrics { opts, token } => match request_bytes(opts, "GET", "/metrics", Some(token), None, METRICS_TIMEOUT, MAX_METRICS).await {
                Ok((200, body)) => parse_metrics(&String::from_utf8_lossy(&body)),
                // Figures shown as unknown, not a failed bench: they are not what it measures.
                _ => Reading::default(),
            },
        }
    }
}

/// The two figures from Prometheus text (see `crate::metrics`).
fn parse_metrics(text: &str) -> Reading {
    let value = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    Reading {
        cpu: value("process_cpu_seconds_total").map(Duration::from_secs_f64),
        peak_rss: value("peersync_peak_resident_memory_bytes").map(|b| b as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_are_read_from_the_servers_metrics() {
        let m = crate::metrics::Metrics::default().render(0);
        let r = parse_metrics(&m);
        if cfg!(target_os = "linux") {
            assert!(r.cpu.is_some() && r.peak_rss.is_some_and(|b| b > 1 << 20), "{r:?} from {m}");
        }
        let text = "# HELP process_cpu_seconds_total x\nprocess_cpu_seconds_total 1.25\npeersync_peak_resident_memory_bytes_other 9\npeersync_peak_resident_memory_bytes 73400320\n";
        assert_eq!(parse_metrics(text), Reading { cpu: Some(Duration::from_millis(1250)), peak_rss: Some(73_400_320) });
        assert_eq!(parse_metrics("process_cpu_seconds_total NaN\n"), Reading::default());
        assert_eq!(parse_metrics("<html>not metrics</html>"), Reading::default());
    }
}
