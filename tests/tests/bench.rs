//! `peersync bench` on a small generated scenario, on lan and on the emulated 3G link: four
//! phases, each with what issue 7 asks of it.

use std::process::Command;

use peersync_server::bench::PhaseLine;

const BIN: &str = env!("CARGO_BIN_EXE_server_process");

fn bench(link: &str, server: &[&str]) -> Vec<PhaseLine> {
    let out = Command::new(BIN)
        .args(["bench", "--workers", "3", "--people", "24", "--weeks", "3", "--seed", "7", "--json", "--phase-timeout", "60", "--link", link])
        .args(server)
        .env("PEERSYNC_LOG", "warn")
        .output()
        .expect("peersync bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench on {link} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a phase line: {l:?}: {e}"))).collect()
}

fn check(link: &str, server: &[&str]) -> Vec<PhaseLine> {
    let lines = bench(link, server);
    let phases: Vec<&str> = lines.iter().map(|l| l.phase.as_str()).collect();
    assert_eq!(phases, ["P1", "P2", "P3", "P4"], "{lines:?}");
    for l in &lines {
        assert_eq!(l.link, link);
        assert_eq!(l.phones, 3, "{l:?}");
        assert!(l.server_peak_rss_bytes.is_some_and(|b| b > 1 << 20), "server RSS missing: {l:?}");
        assert!(l.d_bytes > 0);
        assert_eq!(l.refused, 0, "{l:?}");
        assert_eq!(l.wall_over_link_limit.is_some(), link != "lan", "{l:?}");
        assert_eq!(l.median_wall_over_link_limit.is_some(), link != "lan", "{l:?}");
        if let (Some(worst), Some(median)) = (l.wall_over_link_limit, l.median_wall_over_link_limit) {
            assert!(0.0 < median && median <= worst, "{l:?}");
        }
    }
    let [p1, p2, p3, p4] = &lines[..] else { unreachable!() };
    // P1: every person was uploaded (people two workers share by both phones), compressed.
    assert!(p1.documents >= 24, "{p1:?}");
    assert!(p1.bytes_over_d <= 1.0, "{p1:?}");
    // P2: nothing new, one round trip and under 512 bytes per phone.
    assert_eq!(p2.documents, 0, "{p2:?}");
    assert_eq!(p2.round_trips_max, 1, "{p2:?}");
    assert!(p2.max_phone_bytes < 512, "{p2:?}");
    // P3: each fresh phone restores its whole caseload.
    assert!(p3.documents >= 24, "{p3:?}");
    assert!(p3.bytes_over_d <= 1.0, "{p3:?}");
    // P4: five visits per phone, at most two round trips.
    assert_eq!(p4.documents, 15, "{p4:?}");
    assert!(p4.round_trips_max <= 2, "{p4:?}");
    lines
}

#[test]
fn bench_on_lan() {
    let lines = check("lan", &[]);
    // Its own server: memory per phase (the peak reset before each), CPU time.
    assert!(lines.iter().all(|l| !l.rss_since_start && l.server_cpu_ms.is_some()), "{lines:?}");
}

#[test]
fn bench_on_3g() {
    check("3g", &[]);
}

/// Against a server it did not start, the bench reads the server's figures from its
/// `/metrics`: the peak memory is then the server's since it started.
#[test]
fn bench_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = peersync_tests::ServerProcess::start(BIN, &dir.path().join("server"));
    let lines = check("lan", &["--server", &server.url, "--admin-token", peersync_tests::ADMIN_TOKEN]);
    assert!(lines.iter().all(|l| l.rss_since_start && l.server_cpu_ms.is_some()), "{lines:?}");
    let peaks: Vec<u64> = lines.iter().filter_map(|l| l.server_peak_rss_bytes).collect();
    assert!(peaks.is_sorted(), "a peak since start never falls: {peaks:?}");
}
