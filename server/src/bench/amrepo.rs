//! `peersync bench --compare-automerge-repo`: the same four phases against automerge-repo's
//! sync server (npm `@automerge/automerge-repo` 2.5 with its websocket and nodefs adapters), so
//! that the README can put the two side by side from one run (issue 7).
//!
//! The Node side lives in `bench/automerge-repo/` (see its scripts for the details): the
//! server is `server.mjs`, a child process like the peersync server so that its peak RSS and
//! CPU come from `/proc`; the phones are `client.mjs`, one Node process per phase simulating
//! every phone, each with its own Repo, storage directory and websocket.
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
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::link::{Counts, LinkProxy, Profile};
use super::output::{self, PhaseLine};
use super::{BenchError, Phone, child};

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
    /// Wait for the process to end, at most `timeout` (then it is killed).
    async fn wait(mut self, timeout: Duration) -> Option<ExitStatus> {
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
            Ok(Ok(Err(e))) => return Err(err(format!("cannot read the automerge-repo server's output: {e}"))),
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

/// A phone's line from `client.mjs`.
#[derive(Deserialize)]
struct PhoneOut {
    worker: String,
    wall_ms: u64,
    docs: u64,
    docs_changed: u64,
}

/// The phase's last line from `client.mjs`.
#[derive(Deserialize)]
struct PhaseOut {
    phase_wall_ms: u64,
    client_cpu_ms: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Out {
    Phone(PhoneOut),
    Phase(PhaseOut),
}

/// Run `client.mjs MODE MANIFEST` to the end, at most `timeout`; progress on stderr.
async fn client(dir: &Path, name: &'static str, mode: &str, manifest: &Path, phones: usize, timeout: Duration) -> Result<(Vec<PhoneOut>, Option<PhaseOut>), BenchError> {
    let mut child = Command::new("node")
        .arg(dir.join("client.mjs"))
        .arg(mode)
        .arg(manifest)
        .current_dir(dir)
        // Kept open while the phase runs: the client stops if the bench dies without killing it.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| err(format!("cannot start the automerge-repo phones: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| err("no output from the automerge-repo phones"))?;
    let guard = Killed(child);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Blocking reads on their own thread; they end when the process does (or is killed).
    tokio::task::spawn_blocking(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let collect = async {
        let (mut runs, mut phase) = (Vec::new(), None);
        let started = Instant::now();
        while let Some(line) = rx.recv().await {
            let line = line?;
            match serde_json::from_str::<Out>(&line) {
                Ok(Out::Phone(p)) => {
                    runs.push(p);
                    if started.elapsed() > Duration::from_secs(2) || runs.len() == phones {
                        eprint!("\r{name}: {} of {phones} phones synced ", runs.len());
                    }
                }
                Ok(Out::Phase(p)) => phase = Some(p),
                Err(_) => eprintln!("\n{name}: {line}"),
            }
        }
        if !runs.is_empty() {
            eprintln!();
        }
        Ok::<_, BenchError>((runs, phase))
    };
    let out = tokio::time::timeout(timeout, collect).await.map_err(|_| BenchError::Timeout { phase: name, timeout })??;
    match guard.wait(Duration::from_secs(60)).await {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(err(format!("{name}: the automerge-repo phones failed ({s}); see above"))),
        None => Err(err(format!("{name}: the automerge-repo phones did not exit"))),
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

struct Rig<'a> {
    dir: &'a Path,
    pid: u32,
    timeout: Duration,
}

impl Rig<'_> {
    async fn phase(&self, name: &'static str, mode: &str, manifest: &Path, proxies: &[(String, LinkProxy)]) -> Result<AmRun, BenchError> {
        let before: Vec<Counts> = proxies.iter().map(|(_, p)| p.counts()).collect();
        let rss_reset = child::reset_peak_rss(self.pid);
        let cpu_before = child::cpu_time(self.pid);
        let (runs, phase) = client(self.dir, name, mode, manifest, proxies.len(), self.timeout).await?;
        let rss = child::peak_rss(self.pid);
        let server_cpu = cpu_before.zip(child::cpu_time(self.pid)).map(|(a, b)| b.saturating_sub(a));
        let phase = phase.ok_or_else(|| err(format!("{name}: the automerge-repo phones did not report the phase")))?;
        if runs.len() != proxies.len() {
            return Err(err(format!("{name}: {} of {} automerge-repo phones reported", runs.len(), proxies.len())));
        }
        let index: HashMap<&str, usize> = proxies.iter().enumerate().map(|(i, (w, _))| (w.as_str(), i)).collect();
        let mut phones = Vec::new();
        for r in runs {
            let i = *index.get(r.worker.as_str()).ok_or_else(|| err(format!("{name}: unknown phone {}", r.worker)))?;
            phones.push((r, proxies[i].1.counts().since(&before[i])));
        }
        Ok(AmRun { wall: Duration::from_millis(phase.phase_wall_ms), phones, rss, rss_since_start: !rss_reset, server_cpu, client_cpu_ms: phase.client_cpu_ms })
    }
}

/// A manifest for `client.mjs`: each phone's storage directory, its proxy's URL, its documents
/// and P4 changes.
fn manifest(path: &Path, phones: &[AmPhone], stores: &Path, proxies: &[(String, LinkProxy)]) -> Result<(), BenchError> {
    let files = |v: &[(String, PathBuf)]| v.iter().map(|(person, file)| json!({ "person": person, "file": file })).collect::<Vec<_>>();
    let list: Vec<_> = phones
        .iter()
        .zip(proxies)
        .enumerate()
        .map(|(i, (p, (_, proxy)))| {
            json!({
                "worker": p.worker,
                "store": stores.join(i.to_string()),
                "url": format!("ws://{}", proxy.addr),
                "docs": files(&p.docs),
                "changes": files(&p.changes),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_vec(&json!({ "phones": list })).map_err(|e| err(e.to_string()))?)?;
    Ok(())
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

/// Run the four phases against automerge-repo; one line per phase, like peersync's.
pub async fn run(dir: &Path, work: &Path, phones: &[AmPhone], profile: Profile, timeout: Duration, d: Reference) -> Result<Vec<PhaseLine>, BenchError> {
    let server = NodeServer::start(dir, &work.join("server")).await?;
    let rig = Rig { dir, pid: server.pid(), timeout };
    eprintln!("bench: automerge-repo server on {} (pid {})", server.addr, rig.pid);
    let proxies = proxies_for(phones, server.addr, profile).await?;
    let fresh_proxies = proxies_for(phones, server.addr, profile).await?;
    let (m_phones, m_fresh) = (work.join("phones.json"), work.join("fresh.json"));
    manifest(&m_phones, phones, &work.join("phones"), &proxies)?;
    // The fresh phones restore the caseload their worker's first phone holds.
    manifest(&m_fresh, phones, &work.join("fresh"), &fresh_proxies)?;

    client(dir, "automerge-repo import", "prepare", &m_phones, 0, timeout).await?;
    let mut lines = Vec::new();
    let p1 = rig.phase("automerge-repo P1", "sync", &m_phones, &proxies).await?;
    lines.push(summarise("P1", "first upload", &p1, d.d_p1, profile, |r| r.docs));
    // As on the peersync side: one untimed round so that P2 is the idle case.
    rig.phase("automerge-repo settling", "sync", &m_phones, &proxies).await?;
    let p2 = rig.phase("automerge-repo P2", "sync", &m_phones, &proxies).await?;
    lines.push(summarise("P2", "idle re-sync", &p2, d.d_p1, profile, |r| r.docs_changed));
    let p3 = rig.phase("automerge-repo P3", "restore", &m_fresh, &fresh_proxies).await?;
    lines.push(summarise("P3", "restore on a fresh phone", &p3, d.d_p3, profile, |r| r.docs));
    let p4 = rig.phase("automerge-repo P4", "change", &m_phones, &proxies).await?;
    let changes: HashMap<&str, u64> = phones.iter().map(|p| (p.worker.as_str(), p.changes.len() as u64)).collect();
    lines.push(summarise("P4", "incremental (one visit to five people)", &p4, d.d_p1, profile, |r| {
        changes.get(r.worker.as_str()).copied().unwrap_or(0)
    }));
    drop((proxies, fresh_proxies));
    drop(server);
    Ok(lines)
}

fn summarise(phase: &str, what: &str, run: &AmRun, d: u64, profile: Profile, docs: impl Fn(&PhoneOut) -> u64) -> PhaseLine {
    let sum = |f: &dyn Fn(&Counts) -> u64| run.phones.iter().map(|(_, c)| f(c)).sum::<u64>();
    let max = |f: &dyn Fn(&Counts) -> u64| run.phones.iter().map(|(_, c)| f(c)).max().unwrap_or(0);
    let (up, down) = (sum(&|c| c.up), sum(&|c| c.down));
    let main = if phase == "P3" { down } else { up };
    let ratio = profile.link().and_then(|link| {
        run.phones
            .iter()
            .map(|(r, c)| r.wall_ms as f64 / 1000.0 / output::link_limit_bytes(c.up + c.upgrade_up, c.down + c.upgrade_down, link).as_secs_f64())
            .max_by(f64::total_cmp)
    });
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
    }
}
