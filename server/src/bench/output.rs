//! What each phase prints: one line of text, or one JSON object per line with `--json`.

use std::time::Duration;

use peersync_core::sync::SyncReport;
use serde::{Deserialize, Serialize};

use super::PhoneRun;
use super::link::Profile;
use crate::scenario::Event;

/// Round trips before a sync's own exchange on an emulated link: the TCP handshake and the
/// websocket upgrade.
pub const SETUP_ROUND_TRIPS: u32 = 2;

/// How a phase went, before summing up.
pub struct PhaseRun {
    pub wall: Duration,
    pub runs: Vec<PhoneRun>,
    /// Server peak RSS in bytes, if known.
    pub rss: Option<u64>,
    /// The kernel would not reset the peak: `rss` is the peak since the server started.
    pub rss_since_start: bool,
    /// Server CPU time (user and system) during the phase, if known.
    pub server_cpu: Option<Duration>,
    /// CPU time of the process running the phones and their link proxies during the phase.
    pub client_cpu: Option<Duration>,
}

/// One phase, as printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseLine {
    /// Which sync server: "peersync", or "automerge-repo" in the side-by-side.
    #[serde(default = "peersync")]
    pub system: String,
    pub phase: String,
    pub what: String,
    pub link: String,
    pub phones: usize,
    /// Documents moved, summed over phones (a person two phones hold counts twice).
    pub documents: u64,
    pub wall_ms: u64,
    /// Websocket frames after the upgrade, summed over phones, each way.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The largest per-phone frame bytes, each way.
    pub max_phone_bytes_up: u64,
    pub max_phone_bytes_down: u64,
    /// The largest per-phone frame bytes, both ways together.
    pub max_phone_bytes: u64,
    /// HTTP upgrade request and response, summed over phones.
    pub upgrade_bytes: u64,
    pub round_trips_max: u64,
    pub round_trips_total: u64,
    /// Documents the server refused (access), summed over phones.
    pub refused: u64,
    /// Server peak resident memory during the phase; `None` for a server not started here.
    pub server_peak_rss_bytes: Option<u64>,
    /// The peak could not be reset, so it covers everything since the server started.
    pub rss_since_start: bool,
    /// Server CPU time during the phase (all cores), if known: with every phone in this one
    /// process on the same machine, it tells the server's share of the wall time.
    pub server_cpu_ms: Option<u64>,
    /// CPU time of the phones' process (every phone and its link proxy) during the phase: on
    /// one machine, phones and server share the cores, so both tell where the wall time went.
    /// For automerge-repo, the sum of its phones' processes' CPU time from their release to
    /// synced (the link proxies, in the bench's own process, are not in it).
    #[serde(default)]
    pub client_cpu_ms: Option<u64>,
    /// The phase's reference size: the sum of the automerge `save()` sizes of the documents the
    /// phones hold (P1, P2, P4: before P1; P3: the fresh phones after the restore).
    pub d_bytes: u64,
    /// Frame bytes in the phase's main direction (up for P1, P2, P4; down for P3) over D.
    pub bytes_over_d: f64,
    /// The worst phone's wall time over its link limit: (set-up round trips + 1) x RTT + its
    /// bytes (upgrade included, the larger direction) over the bandwidth. `None` on lan.
    pub wall_over_link_limit: Option<f64>,
    /// The median phone's: with every phone on the same cores, the worst one says when the last
    /// finished, the median what a typical phone saw.
    #[serde(default)]
    pub median_wall_over_link_limit: Option<f64>,
}

/// The worst and the median of the phones' wall/limit ratios (`None`, `None` if there are none).
pub fn worst_and_median(mut ratios: Vec<f64>) -> (Option<f64>, Option<f64>) {
    if ratios.is_empty() {
        return (None, None);
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 { ratios[n / 2] } else { (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0 };
    (ratios.last().copied(), Some(median))
}

/// A phone's physical limit on `link`: connection set-up and one round trip, plus its bytes
/// over the bandwidth (the larger direction: the link carries both at once).
pub fn link_limit(r: &SyncReport, link: super::link::Link) -> Duration {
    link_limit_bytes(r.bytes_up + r.upgrade_bytes_up, r.bytes_down + r.upgrade_bytes_down, link)
}

/// The same limit from a phone's bytes each way, upgrade included.
pub fn link_limit_bytes(up: u64, down: u64, link: super::link::Link) -> Duration {
    link.rtt() * (SETUP_ROUND_TRIPS + 1) + link.serialise(up.max(down))
}

fn peersync() -> String {
    "peersync".into()
}

pub fn summarise(phase: &str, what: &str, run: &PhaseRun, d: u64, profile: Profile, docs: impl Fn(&SyncReport) -> u64) -> PhaseLine {
    let sum = |f: &dyn Fn(&SyncReport) -> u64| run.runs.iter().map(|p| f(&p.report)).sum::<u64>();
    let max = |f: &dyn Fn(&SyncReport) -> u64| run.runs.iter().map(|p| f(&p.report)).max().unwrap_or(0);
    let (up, down) = (sum(&|r| r.bytes_up), sum(&|r| r.bytes_down));
    let main = if phase == "P3" { down } else { up };
    let ratios = profile.link().map(|link| run.runs.iter().map(|p| p.wall.as_secs_f64() / link_limit(&p.report, link).as_secs_f64()).collect());
    let (ratio, median) = worst_and_median(ratios.unwrap_or_default());
    PhaseLine {
        system: peersync(),
        phase: phase.into(),
        what: what.into(),
        link: profile.name().into(),
        phones: run.runs.len(),
        documents: sum(&docs),
        wall_ms: run.wall.as_millis() as u64,
        bytes_up: up,
        bytes_down: down,
        max_phone_bytes_up: max(&|r| r.bytes_up),
        max_phone_bytes_down: max(&|r| r.bytes_down),
        max_phone_bytes: max(&|r| r.bytes_up + r.bytes_down),
        upgrade_bytes: sum(&|r| r.upgrade_bytes_up + r.upgrade_bytes_down),
        round_trips_max: max(&|r| r.round_trips),
        round_trips_total: sum(&|r| r.round_trips),
        refused: sum(&|r| r.refused.len() as u64),
        server_peak_rss_bytes: run.rss,
        rss_since_start: run.rss_since_start,
        server_cpu_ms: run.server_cpu.map(|d| d.as_millis() as u64),
        client_cpu_ms: run.client_cpu.map(|d| d.as_millis() as u64),
        d_bytes: d,
        bytes_over_d: if d == 0 { 0.0 } else { main as f64 / d as f64 },
        wall_over_link_limit: ratio,
        median_wall_over_link_limit: median,
    }
}

/// One line on stdout. An error (a closed pipe, a full disk) is returned rather than
/// panicking: `peersync bench | head -1` ends with a message, and a `--json` run whose output
/// cannot be written does not pass for a finished one.
fn print(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

pub struct Printer {
    pub json: bool,
    pub link: Profile,
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

impl Printer {
    pub fn header(&self, phones: usize, events: &[Event], d: u64) -> std::io::Result<()> {
        if self.json {
            return Ok(());
        }
        let people = events.iter().filter(|e| matches!(e, Event::Person { .. })).count();
        print(&format!("peersync bench: {phones} phones, {people} people, {} events; link {}; D = {d} bytes", events.len(), self.link.name()))
    }

    pub fn line(&self, l: &PhaseLine) -> std::io::Result<()> {
        if self.json {
            return print(&serde_json::to_string(l)?);
        }
        let rss = match l.server_peak_rss_bytes {
            Some(b) => format!("{}{}", mb(b), if l.rss_since_start { " (since start)" } else { "" }),
            None => "unknown".into(),
        };
        let mut cpu = l.server_cpu_ms.map(|ms| format!("  server CPU {ms} ms")).unwrap_or_default();
        if let Some(ms) = l.client_cpu_ms {
            cpu.push_str(&format!("  phones CPU {ms} ms"));
        }
        let limit = match (l.wall_over_link_limit, l.median_wall_over_link_limit) {
            (Some(worst), Some(median)) => format!("  wall/limit {worst:.2} (median phone {median:.2})"),
            (Some(worst), None) => format!("  wall/limit {worst:.2}"),
            _ => String::new(),
        };
        let who = if l.system == "peersync" { String::new() } else { format!("{} ", l.system) };
        print(&format!(
            "{who}{} {:<40} docs {:>5}  wall {:>6} ms  up {:>10} B  down {:>10} B  round trips max {} (total {})  server peak RSS {rss}{cpu}  bytes/D {:.2}{limit}",
            l.phase, l.what, l.documents, l.wall_ms, l.bytes_up, l.bytes_down, l.round_trips_max, l.round_trips_total, l.bytes_over_d
        ))
    }
}

/// automerge-repo's figures over peersync's for one phase (`None` where peersync's is 0 or a
/// figure is unknown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub ratio: String,
    pub phase: String,
    pub link: String,
    pub wall: Option<f64>,
    pub bytes_up: Option<f64>,
    pub bytes_down: Option<f64>,
    pub server_peak_rss: Option<f64>,
}

pub fn ratio(peersync: &PhaseLine, other: &PhaseLine) -> Ratio {
    let r = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    Ratio {
        ratio: format!("{}/peersync", other.system),
        phase: peersync.phase.clone(),
        link: peersync.link.clone(),
        wall: r(other.wall_ms, peersync.wall_ms),
        bytes_up: r(other.bytes_up, peersync.bytes_up),
        bytes_down: r(other.bytes_down, peersync.bytes_down),
        server_peak_rss: other.server_peak_rss_bytes.zip(peersync.server_peak_rss_bytes).and_then(|(a, b)| r(a, b)),
    }
}

impl Printer {
    pub fn comparison_header(&self, version: &str) -> std::io::Result<()> {
        if self.json {
            return Ok(());
        }
        print(&format!("automerge-repo {version} (same phones, documents and links; bytes and round trips counted at each phone's proxy):"))
    }

    pub fn ratio(&self, r: &Ratio) -> std::io::Result<()> {
        if self.json {
            return print(&serde_json::to_string(r)?);
        }
        let x = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}x"));
        print(&format!(
            "{} {}  wall {}  bytes up {}  bytes down {}  server peak RSS {}",
            r.ratio,
            r.phase,
            x(r.wall),
            x(r.bytes_up),
            x(r.bytes_down),
            x(r.server_peak_rss)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::worst_and_median;

    #[test]
    fn worst_and_median_of_the_phones() {
        assert_eq!(worst_and_median(vec![]), (None, None));
        assert_eq!(worst_and_median(vec![1.5]), (Some(1.5), Some(1.5)));
        assert_eq!(worst_and_median(vec![1.9, 1.1, 1.3]), (Some(1.9), Some(1.3)));
        assert_eq!(worst_and_median(vec![1.0, 2.0, 1.25, 1.75]), (Some(2.0), Some(1.5)));
    }
}
