//! Harness for end-to-end tests: a real server on a loopback port, real devices on real sled
//! files, and the records they exchange.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peersync_core::sync::{SyncOptions, SyncReport};
use peersync_core::{Device, ManualClock, NewPerson};
use peersync_server::app::{AppState, Options, serve};
use tokio::task::JoinHandle;

#[path = "../../client-core/tests/common/fixtures.rs"]
mod fixtures;
pub use fixtures::{KEY, checkin, person_with, t, visit};

/// The organisation every test server holds, and its admin token.
pub const ORG: &str = "org1";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// Workers every test organisation has; `person()` names them all as teammates.
pub const WORKERS: [&str; 4] = ["w-001", "w-002", "w-003", "w-004"];

/// Create the test organisation, its workers and a coordinator in `state`, if missing.
pub fn seed(state: &AppState) {
    if state.dir.org(ORG).unwrap().is_none() {
        state.dir.create_org(ORG, "Test Org").unwrap();
        for w in WORKERS {
            state.dir.add_worker(ORG, w, w, "peer_support_worker").unwrap();
        }
    }
}

/// Prepare a data directory (organisation, workers) and return one enrollment code per worker
/// asked for; for servers started as separate processes.
pub fn prepare(data: &Path, workers: &[&str]) -> Vec<String> {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let state = AppState::open(data, rx, Options::default()).expect("data directory opens");
    seed(&state);
    workers.iter().map(|w| state.dir.issue_code(ORG, w).unwrap().0).collect()
}

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
        Self::start_with(data, addr, peersync_server::app::DEFAULT_CACHE_DOCS).await
    }

    /// Start with a document cache of `cache_docs` entries.
    pub async fn start_with(data: &Path, addr: &str, cache_docs: usize) -> TestServer {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let erasure_ledger = Some(peersync_server::app::default_erasure_ledger(data).expect("a place for the erasure ledger"));
        let opts = Options { cache_docs, admin_token: Some(ADMIN_TOKEN.into()), tls: false, erasure_ledger, ..Options::default() };
        let state = Arc::new(AppState::open(data, rx, opts).expect("server store opens"));
        seed(&state);
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            serve(listener, None, st, tx, async move {
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
        // Connection tasks still winding down hold the state, and with it the store's file
        // lock: wait (bounded) until they let go, so the same data can be opened again at once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.state) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn options(&self) -> SyncOptions {
        SyncOptions::new(self.url.clone())
    }

    /// A one-time enrollment code for `worker`.
    pub fn code(&self, worker: &str) -> String {
        self.state.dir.issue_code(ORG, worker).unwrap().0
    }

    /// A worker's phone on its own sled store under `dir`, enrolled with this server.
    pub async fn phone(&self, dir: &Path, worker: &str) -> (Device, ManualClock) {
        let (d, clock) = open_phone(dir, worker).await;
        d.enroll(&self.options(), &self.code(worker), worker).await.expect("enrollment");
        (d, clock)
    }

    /// `GET`/`POST` on the HTTP API with the admin token; returns status and JSON.
    pub async fn admin(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        http(self.addr, method, path, &[("Authorization", format!("Bearer {ADMIN_TOKEN}"))], body).await
    }
}

/// A plain HTTP/1.1 request on loopback; returns the status, headers and body (JSON if any).
pub async fn http_full(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<serde_json::Value>,
) -> (u16, String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let payload = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", payload.len());
    if !payload.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&payload).await.unwrap();
    // Read the head, then exactly Content-Length bytes (some servers keep the connection open).
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let body_start = loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break None;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i + 4);
        }
    };
    if let Some(start) = body_start {
        let head = String::from_utf8_lossy(&out[..start]).to_ascii_lowercase();
        let length = head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
        match length {
            Some(len) => {
                while out.len() < start + len {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            }
            None => {
                s.read_to_end(&mut out).await.unwrap();
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
    (status, head.to_string(), json)
}

pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let (s, _, j) = http_full(addr, method, path, headers, body).await;
    (s, j)
}

/// A worker's phone with its own sled store under `dir`, not enrolled yet.
pub async fn open_phone(dir: &Path, name: &str) -> (Device, ManualClock) {
    let clock = ManualClock::new(t(1, 9));
    let d = Device::open(dir.join(name), &KEY, Arc::new(clock.clone())).await.expect("device store opens");
    (d, clock)
}

/// A person with every test worker as a teammate.
pub fn person(id: &str, alias: &str) -> NewPerson {
    person_with(id, alias, &WORKERS)
}

/// Sync, panicking with the error if it fails.
pub async fn sync(d: &Device, server: &TestServer) -> SyncReport {
    d.sync(&server.options()).await.expect("sync succeeds")
}

/// Wait until `check` holds, polling for up to 15 s; panics naming `what` otherwise.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    // Generous: it returns as soon as `check` holds, and background work (the reporting rows
    // wait for a second of quiet) can be slow on a busy 2-core CI machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out after 15 s waiting until {what}");
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
    /// on `data`, on a free loopback port, its admin API on [`ADMIN_TOKEN`]; waits until it
    /// listens.
    pub fn start(bin: &str, data: &Path) -> ServerProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("PEERSYNC_LOG", "warn")
            .env("PEERSYNC_ADMIN_TOKEN", ADMIN_TOKEN)
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

/// A loopback TCP proxy that cuts each connection once `limit` bytes (both directions
/// together) have crossed it. `None`: no limit.
pub struct CuttingProxy {
    pub url: String,
    limit: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> CuttingProxy {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let lim = limit.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let limit = lim.load(Relaxed);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let used = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, used.clone(), limit);
                    let down = pump(sr, cw, used, limit);
                    // Either direction hitting the limit (or closing) ends both.
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        CuttingProxy { url: format!("ws://{addr}"), limit, task }
    }

    /// Cut connections opened from now on after `bytes` bytes; `None` lifts the limit.
    pub fn cut_after(&self, bytes: Option<u64>) {
        self.limit.store(bytes.unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn options(&self) -> SyncOptions {
        let mut o = SyncOptions::new(self.url.clone());
        o.frame_timeout = std::time::Duration::from_secs(10);
        o
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    used: Arc<std::sync::atomic::AtomicU64>,
    limit: u64,
) {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let before = used.fetch_add(n as u64, Relaxed);
        let allowed = limit.saturating_sub(before).min(n as u64) as usize;
        if to.write_all(&buf[..allowed]).await.is_err() || allowed < n {
            return;
        }
    }
}

/// Copy a directory tree (a backup of a stopped server's or device's store).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

pub mod webdriver;

/// A sync socket for `device`, signed as the device would sign it, for sending hand-made frames.
pub async fn raw(server: &TestServer, device: &Device) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut url = format!("{}/v1/sync", server.url).into_client_request().unwrap();
    url.headers_mut().insert("authorization", device.connection_token().await.unwrap().unwrap().parse().unwrap());
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    tokio_tungstenite::connect_async_with_config(url, Some(config), false).await.expect("upgrade").0
}
