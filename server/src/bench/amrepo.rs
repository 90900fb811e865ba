//! `peersync bench --compare-automerge-repo`: the same four phases against automerge-repo's
//! sync server (npm `@automerge/automerge-repo` 2.5 with its websocket and nodefs adapters), so
//! that the README can put the two side by side from one run (issue 7).
//!
//! The Node side lives in `bench/automerge-repo/` (see its scripts for the details): the
//! server is `server.mjs`, a child process like the peersync server so that its peak RSS and
//! CPU come from `/proc`; the phones are `client.mjs`, one Node process per phone (each with its
//! own Repo, storage directory and websocket), all of a phase started at once. Each sets up its
//! Repo untimed (and warms its code up, as a fresh Node process runs it cold) and says "ready";
//! once all have, the bench releases them together ("go" on their stdin), and each reports its
//! wall time from there to synced and its CPU time. One process per phone, not one for all, so
//! that no phone's websocket waits on another phone's work in the same Node thread (a busy
//! shared thread missing the server's 5 s keep-alive pings is the likely reason phones'
//! websockets were closed in a 20-phone run).
//!
//! A phase that fails or times out on the automerge-repo side is reported with its name and
//! why (which phones were not done, a phone's exit status and last error line, or the server's
//! exit); the lines of the phases done before it have been printed already.
//!
//! Same data: before P1 the bench exports every peersync phone's documents (automerge `save()`
//! bytes) and the automerge-repo phones import them, one repo document per person with a
//! document id derived from the person id, so two phones' copies of a person are one document.
//! For P4 it exports the five documents each peersync phone changed, after the change; the
//! automerge-repo phone merges them, which brings it exactly the new visit's change (it already
//! has everything else).
//!
//! Same links: every automerge-repo phone's websocket goes through its own [`LinkProxy`], on
//! lan a pass-through one, since the proxy is where its bytes and round trips are counted.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::procstat;
use super::link::{Counts, LinkProxy, Profile};
use super::output::{self, PhaseLine, Printer};
use super::{BenchError, Phone};

/// Where `bench/automerge-repo` is when the bench runs from the source tree it was built in.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/automerge-repo")
}

fn err(m: impl Into<String>) -> BenchError {
    BenchError::Amrepo(m.into())
}

/// A child process killed (and reaped) when dropped, whatever path the bench leaves by.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    /// Wait for the process to end, at most `timeout`; `None` if it has not (it is killed
    /// when dropped).
    async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            match self.0.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return None,
            }
        }
        None
    }
}

/// Check that Node is there and that the npm packages are installed (`npm install` from the
/// lock file if `node_modules` is missing); returns the automerge-repo version. Not `npm ci`:
/// npm 11 rejects this lock file there for lacking the optional per-platform packages of
/// cbor-extract (a dependency of automerge-repo), although `npm install` installs exactly the
/// locked, exact-pinned versions from it.
pub async fn ensure_installed(dir: &Path) -> Result<String, BenchError> {
    if !dir.join("package-lock.json").is_file() || !dir.join("client.mjs").is_file() {
        return Err(err(format!("{} does not hold the automerge-repo bench (give --automerge-repo-dir)", dir.display())));
    }
    let node = Command::new("node").arg("--version").output().map_err(|e| err(format!("node not found ({e}): install Node 20 or later")))?;
    if !node.status.success() {
        return Err(err("node --version failed: install Node 20 or later"));
    }
    if !dir.join("node_modules").is_dir() {
        eprintln!("bench: installing the automerge-repo packages (npm install in {})", dir.display());
        let npm = Command::new("npm")
            .args(["install", "--no-save", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| err(format!("npm not found ({e}): install npm to run the automerge-repo comparison")))?;
        match Killed(npm).wait(Duration::from_secs(600)).await {
            Some(s) if s.success() => {}
            Some(s) => return Err(err(format!("npm install failed ({s})"))),
            None => return Err(err("npm install did not finish within 600 s")),
        }
    }
    let pkg = dir.join("node_modules/@automerge/automerge-repo/package.json");
    let text = std::fs::read_to_string(&pkg).map_err(|e| err(format!("cannot read {}: {e}", pkg.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", pkg.display())))?;
    Ok(v["version"].as_str().unwrap_or("unknown").to_string())
}

/// One phone's documents as files for the automerge-repo side.
pub struct AmPhone {
    pub worker: String,
    docs: Vec<(String, PathBuf)>,
    changes: Vec<(String, PathBuf)>,
}

/// Write each phone's documents (automerge `save()`) under `dir`: what P1 starts from.
pub async fn export_docs(phones: &[Phone], dir: &Path) -> Result<Vec<AmPhone>, BenchError> {
    let mut out = Vec::new();
    for (i, p) in phones.iter().enumerate() {
        let perr = |source| BenchError::Phone { worker: p.worker.clone(), source };
        let pdir = dir.join(i.to_string());
        std::fs::create_dir_all(&pdir)?;
        let mut docs = Vec::new();
        for (j, person) in p.device.people().await.map_err(perr)?.into_iter().enumerate() {
            let file = pdir.join(format!("{j}.automerge"));
            std::fs::write(&file, p.device.export_document(&person.id).await.map_err(perr)?)?;
            docs.push((person.id, file));
        }
        out.push(AmPhone { worker: p.worker.clone(), docs, changes: Vec::new() });
    }
    Ok(out)
}

impl AmPhone {
    /// Whether this phone held `person` before P1 (the automerge-repo phones hold no others:
    /// unlike peersync's, its server does not send a phone the people a teammate shares).
    pub fn holds(&self, person: &str) -> bool {
        self.docs.iter().any(|(p, _)| p == person)
    }
}

/// D for the automerge-repo restore: the current `save()` sizes, on each peersync phone, of the
/// documents its automerge-repo twin held before P1 (the set its fresh phone restores).
pub async fn restored_bytes(phones: &[Phone], am: &[AmPhone]) -> Result<u64, BenchError> {
    let mut d = 0u64;
    for (p, a) in phones.iter().zip(am) {
        for (person, _) in &a.docs {
            d += p.device.export_document(person).await.map_err(|source| BenchError::Phone { worker: p.worker.clone(), source })?.len() as u64;
        }
    }
    Ok(d)
}

/// Write the documents P4 changed on `phone` (after the change) for its automerge-repo twin.
pub async fn export_changes(phone: &Phone, people: &[String], am: &mut AmPhone, dir: &Path) -> Result<(), BenchError> {
    let perr = |source| BenchError::Phone { worker: phone.worker.clone(), source };
    let pdir = dir.join(&am.worker);
    std::fs::create_dir_all(&pdir)?;
    for (j, person) in people.iter().enumerate() {
        let file = pdir.join(format!("{j}.automerge"));
        std::fs::write(&file, phone.device.export_document(person).await.map_err(perr)?)?;
        am.changes.push((person.clone(), file));
    }
    Ok(())
}

/// The automerge-repo sync server as a child process.
struct NodeServer {
    child: Killed,
    addr: SocketAddr,
}

impl NodeServer {
    async fn start(dir: &Path, data: &Path) -> Result<NodeServer, BenchError> {
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg(data)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| err(format!("cannot start the automerge-repo server: {e}")))?;
        let stdout = child.stdout.take();
        // From here on the guard owns the child (and its stdin: closing it stops the server).
        let mut server = NodeServer { child: Killed(child), addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let stdout = stdout.ok_or_else(|| err("no output from the automerge-repo server"))?;
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(e))) => {
                return Err(err(format!("cannot read the automerge-repo server's output: {e}")));
            }
            Ok(Err(e)) => return Err(err(e.to_string())),
            Err(_) => return Err(err("the automerge-repo server did not start within 30 s")),
        };
        let port: u16 = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| err(format!("unexpected automerge-repo server output: {line:?}")))?;
        server.addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// A phone's result line from `client.mjs`.
#[derive(Deserialize)]
struct PhoneOut {
    worker: String,
    wall_ms: u64,
    docs: u64,
    docs_changed: u64,
    /// The process's own CPU time from "go" to synced (`process.cpuUsage()`): the sum over the
    /// phones is the phase's client CPU. Self-reported rather than read from `/proc`, which
    /// would also count Node's start-up and the untimed loading of the Repo.
    cpu_ms: u64,
}

/// What the reader threads pass on from the phones' processes.
enum Msg {
    Line(usize, String),
    /// The process's stdout closed: it has exited, or is about to.
    Eof(usize),
}

/// Call `f` with each line `r` gives (lossily decoded: a stray byte must not stop the reading,
/// or the process would block on a full pipe) until `f` returns false; returns whether the
/// output ended.
fn each_line(r: impl std::io::Read, mut f: impl FnMut(String) -> bool) -> bool {
    let mut r = std::io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if !f(line.trim_end_matches(['\n', '\r']).to_string()) {
                    return false;
                }
            }
        }
    }
}

/// How long a phase waits for a process that closed its output early to report its status.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A process's last line on stderr, and the thread reading (and passing on) its stderr.
struct StderrTail {
    last: Arc<Mutex<Option<String>>>,
    reader: JoinHandle<()>,
}

/// Every phone's `client.mjs` process for one phase (or the import), all started at once.
/// Dropping it kills whichever are still running, whatever path the bench leaves by.
struct PhoneProcs {
    name: &'static str,
    workers: Vec<String>,
    children: Vec<Killed>,
    /// Held open until each process has exited: one whose stdin closes stops (the bench died).
    stdins: Vec<Option<ChildStdin>>,
    /// Each process's stderr, to say why it failed.
    stderr: Vec<StderrTail>,
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl PhoneProcs {
    /// Start `client.mjs MODE MANIFEST` for every `(worker, manifest)`; their stderr is passed
    /// on line by line, each line prefixed with the phase and the worker.
    fn spawn(dir: &Path, name: &'static str, mode: &str, phones: &[(String, PathBuf)]) -> Result<PhoneProcs, BenchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut procs =
            PhoneProcs { name, workers: phones.iter().map(|(w, _)| w.clone()).collect(), children: Vec::new(), stdins: Vec::new(), stderr: Vec::new(), rx };
        for (i, (worker, manifest)) in phones.iter().enumerate() {
            let mut child = Command::new("node")
                .arg(dir.join("client.mjs"))
                .arg(mode)
                .arg(manifest)
                .current_dir(dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| err(format!("{name}: cannot start {worker}'s phone: {e}")))?;
            let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
            procs.children.push(Killed(child));
            procs.stdins.push(stdin);
            let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
                return Err(err(format!("{name}: no output from {worker}'s phone")));
            };
            // Blocking reads on threads of their own, which end when the process does (or is
            // killed); plain threads, so that nothing waits for them when the bench exits.
            let tx = tx.clone();
            std::thread::spawn(move || {
                if each_line(stdout, |line| tx.send(Msg::Line(i, line)).is_ok()) {
                    let _ = tx.send(Msg::Eof(i));
                }
            });
            let prefix = format!("{name}, {worker}'s phone");
            let last = Arc::new(Mutex::new(None));
            let keep = last.clone();
            let reader = std::thread::spawn(move || {
                each_line(stderr, |line| {
                    eprintln!("{prefix}: {line}");
                    if let Ok(mut last) = keep.lock() {
                        *last = Some(line);
                    }
                    true
                });
            });
            procs.stderr.push(StderrTail { last, reader });
        }
        Ok(procs)
    }

    /// The next line or end of output from any phone, or `None` once `until` has passed. Fails
    /// at once if the automerge-repo server exits meanwhile: its phones would otherwise keep
    /// trying to reconnect until the phase times out.
    async fn recv(&mut self, until: Instant, server: &mut Killed) -> Result<Option<Msg>, BenchError> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match tokio::time::timeout(left.min(Duration::from_secs(1)), self.rx.recv()).await {
                Ok(Some(msg)) => return Ok(Some(msg)),
                // Every reader has ended, so every process has sent its Eof already.
                Ok(None) => return Ok(None),
                Err(_) => {
                    if let Ok(Some(status)) = server.0.try_wait() {
                        return Err(err(format!("{}: the automerge-repo server exited ({status}); see its errors above", self.name)));
                    }
                }
            }
        }
    }

    /// The error for phone `i`, which ended early or failed (`what` says which).
    async fn failed(&mut self, i: usize, what: &str) -> BenchError {
        let status = match self.children[i].wait(EXIT_GRACE).await {
            Some(s) => s.to_string(),
            None => "still running".into(),
        };
        // Its stderr reader may not have reached the last line yet.
        let StderrTail { last, reader } = &self.stderr[i];
        let until = Instant::now() + Duration::from_secs(1);
        while !reader.is_finished() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let why = last.lock().ok().and_then(|l| l.clone()).unwrap_or_else(|| "no error output".into());
        err(format!("{}: {}'s phone {what} ({status}): {why}", self.name, self.workers[i]))
    }

    /// The workers of the phones not in `done`, for an error (the first few).
    fn waiting(&self, done: &[bool]) -> String {
        let left: Vec<&str> = self.workers.iter().zip(done).filter(|(_, d)| !**d).map(|(w, _)| w.as_str()).collect();
        let mut s = left.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        if left.len() > 5 {
            s.push_str(&format!(" and {} more", left.len() - 5));
        }
        s
    }

    /// Wait until every phone has set up its Repo and printed "ready", at most `timeout`.
    async fn ready(&mut self, timeout: Duration, server: &mut Killed) -> Result<(), BenchError> {
        let until = Instant::now() + timeout;
        let mut ready = vec![false; self.workers.len()];
        while ready.iter().any(|r| !r) {
            match self.recv(until, server).await? {
                Some(Msg::Line(i, line)) if line.trim() == "ready" => ready[i] = true,
                Some(Msg::Line(i, line)) => {
                    eprintln!("{}, {}'s phone: {line}", self.name, self.workers[i])
                }
                Some(Msg::Eof(i)) => return Err(self.failed(i, "ended before it was ready").await),
                None => {
                    return Err(err(format!(
                        "{}: {} of {} phones were not ready (loading their documents) within {timeout:?}: {}",
                        self.name,
                        ready.iter().filter(|r| !**r).count(),
                        ready.len(),
                        self.waiting(&ready)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Release every phone at once, then collect each one's result, at most `timeout`; returns
    /// them and the wall time from the release to the last one.
    async fn go(&mut self, timeout: Duration, server: &mut Killed) -> Result<(Vec<PhoneOut>, Duration), BenchError> {
        let started = Instant::now();
        for (stdin, worker) in self.stdins.iter_mut().zip(&self.workers) {
            let stdin = stdin.as_mut().ok_or_else(|| err(format!("{}: no input to {worker}'s phone", self.name)))?;
            stdin.write_all(b"go\n").and_then(|()| stdin.flush()).map_err(|e| err(format!("{}: cannot release {worker}'s phone: {e}", self.name)))?;
        }
        let until = started + timeout;
        let total = self.workers.len();
        let mut done = vec![false; total];
        let mut runs = Vec::with_capacity(total);
        let mut wall = Duration::ZERO;
        // Ends its line on every way out of here.
        let bar = crate::progress::Progress::new(format!("{}: ", self.name));
        while runs.len() < total {
            match self.recv(until, server).await? {
                Some(Msg::Line(i, line)) => match serde_json::from_str::<PhoneOut>(&line) {
                    Ok(r) if r.worker != self.workers[i] => {
                        return Err(err(format!("{}: {}'s phone reported as {}", self.name, self.workers[i], r.worker)));
                    }
                    Ok(r) => {
                        done[i] = true;
                        runs.push(r);
                        wall = started.elapsed();
                        if wall > Duration::from_secs(2) || runs.len() == total {
                            bar.update(format_args!("{} of {total} phones synced", runs.len()));
                        }
                    }
                    Err(_) => {
                        bar.done();
                        eprintln!("{}, {}'s phone: {line}", self.name, self.workers[i]);
                    }
                },
                // A phone that has reported exits by itself.
                Some(Msg::Eof(i)) if done[i] => {}
                Some(Msg::Eof(i)) => return Err(self.failed(i, "ended before it synced").await),
                None => {
                    return Err(err(format!(
                        "{} did not finish within {timeout:?}: {} of {total} phones synced; not synced: {}",
                        self.name,
                        runs.len(),
                        self.waiting(&done)
                    )));
                }
            }
        }
        Ok((runs, wall))
    }

    /// Wait for every process to exit successfully (having written its storage for the next
    /// phase), at most `timeout` in all; `doing` says what it is about, for an error.
    async fn exited(&mut self, timeout: Duration, doing: &str) -> Result<(), BenchError> {
        let until = Instant::now() + timeout;
        for i in 0..self.children.len() {
            let left = until.saturating_duration_since(Instant::now());
            match self.children[i].wait(left).await {
                Some(s) if s.success() => {}
                Some(_) => return Err(self.failed(i, &format!("failed to {doing}")).await),
                None => {
                    return Err(err(format!("{}: {}'s phone did not {doing} and exit within {timeout:?}", self.name, self.workers[i])));
                }
            }
        }
        // Every process has exited: nothing reads these any more.
        self.stdins.clear();
        Ok(())
    }
}

/// One timed automerge-repo phase.
struct AmRun {
    wall: Duration,
    /// Per phone: its run and what its proxy carried.
    phones: Vec<(PhoneOut, Counts)>,
    rss: Option<u64>,
    rss_since_start: bool,
    server_cpu: Option<Duration>,
    client_cpu_ms: u64,
}

/// How long the phones' processes get to write their storage and exit after a phase.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

struct Rig<'a> {
    dir: &'a Path,
    server: NodeServer,
    timeout: Duration,
}

impl Rig<'_> {
    /// Import every phone's documents into its storage (untimed, no network).
    async fn import(&mut self, phones: &[(String, PathBuf)]) -> Result<(), BenchError> {
        let mut procs = PhoneProcs::spawn(self.dir, "automerge-repo import", "prepare", phones)?;
        procs.exited(self.timeout, "import its documents").await
    }

    /// One phase: every phone's process started at once and set up, then all released at once.
    async fn phase(&mut self, name: &'static str, mode: &str, phones: &[(String, PathBuf)], proxies: &[(String, LinkProxy)]) -> Result<AmRun, BenchError> {
        let pid = self.server.pid();
        let before: Vec<Counts> = proxies.iter().map(|(_, p)| p.counts()).collect();
        let mut procs = PhoneProcs::spawn(self.dir, name, mode, phones)?;
        procs.ready(self.timeout, &mut self.server.child).await?;
        let rss_reset = procstat::reset_peak(pid);
        let cpu_before = procstat::cpu_time(pid);
        let (runs, wall) = procs.go(self.timeout, &mut self.server.child).await?;
        procs.exited(EXIT_TIMEOUT, "write its storage").await?;
        let rss = procstat::peak_rss(pid);
        let server_cpu = cpu_before.zip(procstat::cpu_time(pid)).map(|(a, b)| b.saturating_sub(a));
        let index: HashMap<&str, usize> = proxies.iter().enumerate().map(|(i, (w, _))| (w.as_str(), i)).collect();
        let client_cpu_ms = runs.iter().map(|r| r.cpu_ms).sum();
        let mut counted = Vec::new();
        for r in runs {
            let i = *index.get(r.worker.as_str()).ok_or_else(|| err(format!("{name}: unknown phone {}", r.worker)))?;
            counted.push((r, proxies[i].1.counts().since(&before[i])));
        }
        Ok(AmRun { wall, phones: counted, rss, rss_since_start: !rss_reset, server_cpu, client_cpu_ms })
    }
}

/// One manifest per phone for `client.mjs`, under `dir`: its storage directory, its proxy's
/// URL, its documents and P4 changes. Returns each phone's worker and manifest.
fn manifests(dir: &Path, phones: &[AmPhone], stores: &Path, proxies: &[(String, LinkProxy)]) -> Result<Vec<(String, PathBuf)>, BenchError> {
    let files = |v: &[(String, PathBuf)]| v.iter().map(|(person, file)| json!({ "person": person, "file": file })).collect::<Vec<_>>();
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (i, (p, (_, proxy))) in phones.iter().zip(proxies).enumerate() {
        let phone = json!({
            "worker": p.worker,
            "store": stores.join(i.to_string()),
            "url": format!("ws://{}", proxy.addr),
            "docs": files(&p.docs),
            "changes": files(&p.changes),
        });
        let path = dir.join(format!("{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&phone).map_err(|e| err(e.to_string()))?)?;
        out.push((p.worker.clone(), path));
    }
    Ok(out)
}

async fn proxies_for(phones: &[AmPhone], server: SocketAddr, profile: Profile) -> Result<Vec<(String, LinkProxy)>, BenchError> {
    let mut out = Vec::new();
    for p in phones {
        let proxy = match profile.link() {
            Some(link) => LinkProxy::start(server, link).await?,
            None => LinkProxy::passthrough(server).await?,
        };
        out.push((p.worker.clone(), proxy));
    }
    Ok(out)
}

/// The reference sizes of the phases, as the peersync side measured them.
pub struct Reference {
    pub d_p1: u64,
    pub d_p3: u64,
}

/// Where the automerge-repo phase lines go: each printed as soon as its phase is done and kept
/// for the ratios, so that a later phase's failure loses none of them.
pub struct Shown<'a> {
    pub out: &'a Printer,
    pub lines: Vec<PhaseLine>,
}

impl Shown<'_> {
    fn add(&mut self, l: PhaseLine) -> Result<(), super::BenchError> {
        self.out.line(&l).map_err(super::BenchError::Output)?;
        self.lines.push(l);
        Ok(())
    }
}

/// Run the four phases against automerge-repo; one line per phase, like peersync's, into
/// `shown`.
pub async fn run(
    dir: &Path,
    work: &Path,
    phones: &[AmPhone],
    profile: Profile,
    timeout: Duration,
    d: Reference,
    shown: &mut Shown<'_>,
) -> Result<(), BenchError> {
    let server = NodeServer::start(dir, &work.join("server")).await?;
    eprintln!("bench: automerge-repo server on {} (pid {})", server.addr, server.pid());
    let proxies = proxies_for(phones, server.addr, profile).await?;
    let fresh_proxies = proxies_for(phones, server.addr, profile).await?;
    let mut rig = Rig { dir, server, timeout };
    let m_phones = manifests(&work.join("manifests/phones"), phones, &work.join("phones"), &proxies)?;
    // The fresh phones restore the caseload their worker's first phone holds.
    let m_fresh = manifests(&work.join("manifests/fresh"), phones, &work.join("fresh"), &fresh_proxies)?;
    rig.import(&m_phones).await?;
    let p1 = rig.phase("automerge-repo P1", "sync", &m_phones, &proxies).await?;
    shown.add(summarise("P1", "first upload", &p1, d.d_p1, profile, |r| r.docs))?;
    // As on the peersync side: one untimed round so that P2 is the idle case.
    rig.phase("automerge-repo settling", "sync", &m_phones, &proxies).await?;
    let p2 = rig.phase("automerge-repo P2", "sync", &m_phones, &proxies).await?;
    shown.add(summarise("P2", "idle re-sync", &p2, d.d_p1, profile, |r| r.docs_changed))?;
    let p3 = rig.phase("automerge-repo P3", "restore", &m_fresh, &fresh_proxies).await?;
    shown.add(summarise("P3", "restore on a fresh phone", &p3, d.d_p3, profile, |r| r.docs))?;
    let p4 = rig.phase("automerge-repo P4", "change", &m_phones, &proxies).await?;
    let changes: HashMap<&str, u64> = phones.iter().map(|p| (p.worker.as_str(), p.changes.len() as u64)).collect();
    shown.add(summarise("P4", "incremental (one visit to five people)", &p4, d.d_p1, profile, |r| changes.get(r.worker.as_str()).copied().unwrap_or(0)))?;
    Ok(())
}

fn summarise(phase: &str, what: &str, run: &AmRun, d: u64, profile: Profile, docs: impl Fn(&PhoneOut) -> u64) -> PhaseLine {
    let sum = |f: &dyn Fn(&Counts) -> u64| run.phones.iter().map(|(_, c)| f(c)).sum::<u64>();
    let max = |f: &dyn Fn(&Counts) -> u64| run.phones.iter().map(|(_, c)| f(c)).max().unwrap_or(0);
    let (up, down) = (sum(&|c| c.up), sum(&|c| c.down));
    let main = if phase == "P3" { down } else { up };
    let ratios = profile.link().map(|link| {
        run.phones
            .iter()
            .map(|(r, c)| r.wall_ms as f64 / 1000.0 / output::link_limit_bytes(c.up + c.upgrade_up, c.down + c.upgrade_down, link).as_secs_f64())
            .collect()
    });
    let (ratio, median) = output::worst_and_median(ratios.unwrap_or_default());
    PhaseLine {
        system: "automerge-repo".into(),
        phase: phase.into(),
        what: what.into(),
        link: profile.name().into(),
        phones: run.phones.len(),
        documents: run.phones.iter().map(|(r, _)| docs(r)).sum(),
        wall_ms: run.wall.as_millis() as u64,
        bytes_up: up,
        bytes_down: down,
        max_phone_bytes_up: max(&|c| c.up),
        max_phone_bytes_down: max(&|c| c.down),
        max_phone_bytes: max(&|c| c.up + c.down),
        upgrade_bytes: sum(&|c| c.upgrade_up + c.upgrade_down),
        round_trips_max: max(&|c| c.turns),
        round_trips_total: sum(&|c| c.turns),
        refused: 0,
        server_peak_rss_bytes: run.rss,
        rss_since_start: run.rss_since_start,
        server_cpu_ms: run.server_cpu.map(|d| d.as_millis() as u64),
        client_cpu_ms: Some(run.client_cpu_ms),
        d_bytes: d,
        bytes_over_d: if d == 0 { 0.0 } else { main as f64 / d as f64 },
        wall_over_link_limit: ratio,
        median_wall_over_link_limit: median,
    }
}
