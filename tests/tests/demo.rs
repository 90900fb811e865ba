//! `peersync demo` — the README's run command — sets up a team that recorded offline and
//! synced, serves the dashboard with a working login, and reuses its data on a second start.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peersync_tests::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_server_process");

/// Start the demo; returns the process, its address and the printed login.
fn start(data: &std::path::Path) -> (std::process::Child, std::net::SocketAddr, String) {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("PEERSYNC_LOG", "warn")
        .stdout(Stdio::piped())
        // Kept beside the data so a failure can say what the demo reported.
        .stderr(Stdio::from(std::fs::File::create(data.with_extension("stderr.log")).unwrap()))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut addr, mut password) = (None, None);
    while addr.is_none() || password.is_none() {
        assert!(Instant::now() < deadline, "the demo did not come up");
        let line = lines.next().expect("demo output").unwrap();
        if let Some(url) = line.split("Dashboard: http://").nth(1) {
            addr = Some(url.trim_end_matches('/').parse().unwrap());
        }
        if let Some(p) = line.strip_prefix("password: ") {
            password = Some(p.trim().to_string());
        }
    }
    (child, addr.unwrap(), password.unwrap())
}

/// Logs the coordinator in; on failure says whether the demo is still running and what it
/// printed on stderr. Returns the response head (with the session cookie).
async fn login(child: &mut std::process::Child, addr: std::net::SocketAddr, password: &str, data: &std::path::Path, when: &str) -> String {
    let (status, head, _) = http_full(addr, "POST", "/v1/login", &[], Some(json!({ "org": "demo", "username": "coordinator", "password": password }))).await;
    if status != 200 {
        let exited = child.try_wait().unwrap();
        let log = std::fs::read_to_string(data.with_extension("stderr.log")).unwrap_or_default();
        panic!("{when}: login answered {status} (demo exited: {exited:?}); its stderr:\n{log}");
    }
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_a_team_and_reuses_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("peersync-data");
    let (mut child, addr, password) = start(&data);
    // start() has closed the demo's stdout by now, as `peersync demo | head` would: it must
    // keep serving regardless.
    let head = login(&mut child, addr, &password, &data, "first start").await;
    let cookie = head.lines().find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l[11..].trim().split(';').next().unwrap().to_string())).unwrap();
    let (status, report) = http(addr, "GET", "/v1/report", &[("Cookie", cookie.clone())], None).await;
    assert_eq!(status, 200);
    assert!(report["totals"]["visits"].as_u64().unwrap() > 50, "{report}");
    assert_eq!(report["workers"].as_object().unwrap().len(), 6);
    assert!(!data.join("demo-phones").exists(), "the simulated phones' stores, which nothing could open again, are gone");
    let _ = child.kill();
    let _ = child.wait();

    // Second start: same data, same login, no second setup.
    let started = Instant::now();
    let (mut child, addr, again) = start(&data);
    assert_eq!(again, password);
    assert!(started.elapsed() < Duration::from_secs(30));
    login(&mut child, addr, &again, &data, "second start").await;
    let _ = child.kill();
    let _ = child.wait();

    // Third start with a stdout whose reader is already gone: every line the demo prints
    // fails with EPIPE, and it must serve anyway (println! would panic and take it down).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
        .env("PEERSYNC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(data.with_extension("stderr.log")).unwrap()))
        .spawn()
        .unwrap();
    // The read end closes here, long before the demo has opened its store and printed.
    drop(child.stdout.take());
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(data.with_extension("stderr.log")).unwrap_or_default();
            panic!("with stdout closed the demo exited ({status}) instead of serving; its stderr:\n{log}");
        }
        assert!(Instant::now() < deadline, "with stdout closed the demo did not start listening within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    login(&mut child, addr, &password, &data, "start with stdout closed").await;
    let _ = child.kill();
    let _ = child.wait();
}

/// A first start stopped before its setup finished (Ctrl-C during the replay) leaves an
/// organisation with part of the team's data and no coordinator. The next start says so and
/// how to recover, instead of serving a dashboard nobody can log into.
#[test]
fn a_demo_whose_setup_was_cut_short_says_how_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("peersync-data");
    // What an interrupted setup leaves: the demo organisation, no coordinator.
    let made = Command::new(BIN).arg("admin").arg("--data").arg(&data).args(["create-org", "demo", "--name", "Demo"]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let out = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("PEERSYNC_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not serve: {stderr}");
    assert!(stderr.contains("was not set up completely") && stderr.contains(&format!("delete {}", data.display())), "{stderr}");
}
