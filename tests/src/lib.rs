//! Harness for end-to-end tests: a real server on a loopback port, real devices on real sled
//! files, and the records they exchange.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use peersync_core::sync::{SyncOptions, SyncReport};
use peersync_core::{Device, ManualClock, NewCheckin, NewPerson, NewVisit};
use peersync_server::app::{AppState, serve};
use tokio::task::JoinHandle;

pub const KEY: [u8; 32] = [42; 32];

/// A server running in this process on 127.0.0.1, on its own sled directory.
pub struct TestServer {
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub data: PathBuf,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(data: &Path) -> TestServer {
        Self::start_on(data, "127.0.0.1:0").await
    }

    pub async fn start_on(data: &Path, addr: &str) -> TestServer {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(AppState::open(data, rx).expect("server store opens"));
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            serve(listener, st, tx, async move {
                let _ = stop_rx.await;
            })
            .await
            .expect("server runs");
        });
        TestServer { url: format!("ws://{addr}"), addr, data: data.to_path_buf(), state, stop: Some(stop_tx), task: Some(task) }
    }

    /// Stop gracefully and release the store.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
        }
    }

    pub fn options(&self) -> SyncOptions {
        SyncOptions::new(self.url.clone())
    }
}

pub fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
}

/// A worker's phone with its own sled store under `dir`.
pub async fn phone(dir: &Path, worker: &str) -> (Device, ManualClock) {
    let clock = ManualClock::new(t(1, 9));
    let d = Device::open(dir.join(worker), &KEY, Arc::new(clock.clone())).await.expect("device store opens");
    d.set_worker(worker).await.unwrap();
    (d, clock)
}

pub fn person(id: &str, alias: &str) -> NewPerson {
    NewPerson {
        id: Some(id.into()),
        alias: alias.into(),
        year_of_birth: 1984,
        workers: vec![],
        record: true,
        share_with_coordinator: true,
        research: false,
    }
}

pub fn visit(id: &str, notes: &str) -> NewVisit {
    NewVisit {
        id: Some(id.into()),
        started_at: t(2, 10),
        duration_min: 45,
        mode: "in_person".into(),
        setting: "community".into(),
        activities: vec!["support".into()],
        goals: vec!["housing".into()],
        referrals: vec![],
        notes: notes.into(),
        follow_up: None,
    }
}

pub fn checkin(id: &str) -> NewCheckin {
    NewCheckin {
        id: Some(id.into()),
        taken_at: None,
        wellbeing: vec![3, 3, 2, 4, 3, 3, 3],
        distress: 3,
        coping: 3,
        social_support: 2,
        self_efficacy: 3,
        quality_of_life: 3,
        housing: "temporary".into(),
        employment: "unemployed".into(),
        hospital_nights_28d: 0,
        substance_use_days_28d: Some(4),
    }
}

/// Sync, panicking with the error if it fails.
pub async fn sync(d: &Device, server: &TestServer) -> SyncReport {
    d.sync(&server.options()).await.expect("sync succeeds")
}

/// Visit ids of a person on a device, sorted.
pub async fn visit_ids(d: &Device, person: &str) -> Vec<String> {
    let mut v: Vec<_> = d.person(person).await.unwrap().visits.into_iter().map(|v| v.id).collect();
    v.sort();
    v
}

/// The server as a separate OS process (so that it can be killed with SIGKILL).
pub struct ServerProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl ServerProcess {
    /// Start `peersync serve` (the binary `bin`: pass `env!("CARGO_BIN_EXE_server_process")`)
    /// on `data`, on a free loopback port; waits until it listens.
    pub fn start(bin: &str, data: &Path) -> ServerProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("PEERSYNC_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("server process starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("server prints its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        ServerProcess { child, url: format!("ws://{addr}") }
    }

    pub fn options(&self) -> SyncOptions {
        let mut o = SyncOptions::new(self.url.clone());
        o.frame_timeout = std::time::Duration::from_secs(20);
        o
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
