//! `peersync bench`: what a deployment costs, in time, bytes and server memory, over the links
//! workers actually have (issue 7).
//!
//! A generated (or given) field scenario is recorded offline on one phone per worker, each on
//! its own encrypted sled store; then four phases run, every phone of a phase at once, each
//! through its own emulated link ([`link`]) to a server running as a child process ([`child`])
//! whose CPU time and peak memory are read from `/proc` (or, for a server given with
//! `--server`, from its `/metrics`: [`probe`]):
//!
//! - **P1 first upload**: every phone, holding all it recorded offline, syncs to the fresh server.
//! - **P2 idle re-sync**: every phone again, nothing new (after one untimed round that brings
//!   each phone what its teammate pushed in P1 after it had finished).
//! - **P3 restore**: a fresh phone per worker, enrolled for the same worker, pulls its caseload.
//! - **P4 incremental**: every P1 phone adds one visit to five of its people and syncs.
//!
//! How the offline recording treats people shared by two workers: the scenario lets a teammate
//! record for a person only after its phone could have received them at a sync. No phone syncs
//! before P1 here, so before such an event the teammate's phone merges in the other phone's
//! current copy of the person (as if it had received it at its last sync, perhaps with a few
//! later changes). In P1 both phones then push that person; the server keeps each change once.
//! Erasures and `sync` events are not replayed (the server must be fresh for P1).

mod amrepo;
pub mod child;
pub mod link;
mod output;
mod prepare;
mod probe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use peersync_core::sync::{SyncOptions, SyncReport};
use peersync_core::{Device, ManualClock, NewVisit};

use crate::procstat;

pub use amrepo::default_dir as default_automerge_repo_dir;
use child::ServerChild;
use link::{LinkProxy, Profile};
pub use output::PhaseLine;
use probe::ServerProbe;

/// What `peersync bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// The generated scenario's size (unless `scenario` is given).
    pub size: crate::simulate::Params,
    pub scenario: Option<PathBuf>,
    pub server: Option<String>,
    pub admin_token: Option<String>,
    pub link: Profile,
    pub json: bool,
    pub phase_timeout: Duration,
    /// Also run the phases against automerge-repo, with the Node side in this directory.
    pub compare_automerge_repo: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("server: {0}")]
    Server(String),
    #[error("setting up the organisation: {0}")]
    Setup(#[from] crate::replay::ReplayError),
    #[error("{worker}'s phone: {source}")]
    Phone { worker: String, source: peersync_core::CoreError },
    #[error("{phase}: {worker}'s phone could not sync: {source}")]
    Sync { phase: &'static str, worker: String, source: peersync_core::sync::SyncError },
    #[error("{phase} did not finish within {0:?}", .timeout)]
    Timeout { phase: &'static str, timeout: Duration },
    #[error("automerge-repo comparison: {0}")]
    Amrepo(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot write the results to standard output: {0}")]
    Output(std::io::Error),
}

/// A worker's phone.
pub(crate) struct Phone {
    pub worker: String,
    pub device: Arc<Device>,
    pub clock: ManualClock,
    /// Its own link to the server (none on lan).
    pub opts: SyncOptions,
}

/// How one phone's sync went.
pub(crate) struct PhoneRun {
    pub report: SyncReport,
    pub wall: Duration,
}

/// Longest wait for any one frame: generous, since 50 phones share 2 cores with the server.
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let events = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| BenchError::Usage(format!("cannot read {}: {e}", path.display())))?;
            crate::scenario::parse(&text).map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))?
        }
        None => {
            args.size.check().map_err(BenchError::Usage)?;
            crate::simulate::simulate(&args.size)
        }
    };
    // Before the long part: a missing Node or npm should not cost a whole peersync run.
    let amrepo_version = match &args.compare_automerge_repo {
        Some(dir) => Some(amrepo::ensure_installed(dir).await?),
        None => None,
    };
    let work = tempfile::tempdir()?;

    // The server: a child process on a fresh directory, or the one given.
    let (server, url, token) = match (&args.server, &args.admin_token) {
        (Some(url), Some(token)) => (None, url.trim_end_matches('/').to_string(), token.clone()),
        (Some(_), None) => return Err(BenchError::Usage("--server needs --admin-token".into())),
        _ => {
            let child = ServerChild::start(&work.path().join("server")).await?;
            let url = format!("ws://{}", child.addr);
            let token = child.admin_token.clone();
            (Some(child), url, token)
        }
    };
    let pid = server.as_ref().map(ServerChild::pid);
    let direct = SyncOptions::new(url.clone());
    let probe = match pid {
        Some(pid) => ServerProbe::Child(pid),
        None => ServerProbe::Metrics { opts: direct.clone(), token: token.clone() },
    };
    let upstream = match args.link.link() {
        None => None,
        Some(_) => Some(upstream_of(&url).await?),
    };
    let org = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    eprintln!("bench: {} events, link {}, server {url}{}", events.len(), args.link.name(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default());

    let started = Instant::now();
    let workers = prepare::create_team(&events, &direct, &token, &org).await?;
    // Said once here (the token is known good by now) rather than as "unknown" on every line.
    if probe.read().await == probe::Reading::default() {
        eprintln!("bench: the server tells neither its CPU time nor its peak memory (no process figures on its /metrics): both show as unknown");
    }
    let mut proxies = Vec::new();
    let mut phones = Vec::new();
    for (worker, code) in &workers {
        let (opts, proxy) = phone_link(&url, upstream, args.link).await?;
        proxies.extend(proxy);
        phones.push(prepare::enrolled_phone(&work.path().join("phones"), worker, code, &direct, opts).await?);
    }
    let recorded = prepare::record_offline(&events, &phones).await?;
    eprintln!("bench: {} phones recorded {recorded} events offline in {:.1} s", phones.len(), started.elapsed().as_secs_f64());

    // What the automerge-repo phones start from: the same documents.
    let mut am_phones = match &args.compare_automerge_repo {
        Some(_) => Some(amrepo::export_docs(&phones, &work.path().join("amrepo/docs")).await?),
        None => None,
    };
    let out = output::Printer { json: args.json, link: args.link };
    let d_p1 = held_bytes(&phones).await?;
    out.header(phones.len(), &events, d_p1).map_err(BenchError::Output)?;

    let mut lines = Vec::new();
    let p1 = phase("P1", &phones, Some(&probe), args.phase_timeout).await?;
    lines.push(output::summarise("P1", "first upload", &p1, d_p1, args.link, |r| r.docs_sent));
    out.line(&lines[0]).map_err(BenchError::Output)?;
    // People two workers share were pushed by both phones at once in P1, so one phone may
    // have finished before its teammate's changes arrived. One untimed round brings everyone
    // up to date, so that P2 measures the idle case it is meant to.
    let settle = phase("settling", &phones, None, args.phase_timeout).await?;
    let late: u64 = settle.runs.iter().map(|r| r.report.docs_received).sum();
    eprintln!("bench: after P1, {late} documents reached a phone from its teammate's P1 push (untimed)");
    let p2 = phase("P2", &phones, Some(&probe), args.phase_timeout).await?;
    lines.push(output::summarise("P2", "idle re-sync", &p2, d_p1, args.link, |r| r.docs_sent + r.docs_received));
    out.line(&lines[1]).map_err(BenchError::Output)?;

    let mut fresh = Vec::new();
    for (worker, _) in &workers {
        let code = prepare::enrollment_code(&direct, &token, &org, worker).await?;
        let (opts, proxy) = phone_link(&url, upstream, args.link).await?;
        proxies.extend(proxy);
        fresh.push(prepare::enrolled_phone(&work.path().join("fresh"), worker, &code, &direct, opts).await?);
    }
    let p3 = phase("P3", &fresh, Some(&probe), args.phase_timeout).await?;
    let d_p3 = held_bytes(&fresh).await?;
    lines.push(output::summarise("P3", "restore on a fresh phone", &p3, d_p3, args.link, |r| r.docs_received));
    out.line(&lines[2]).map_err(BenchError::Output)?;

    let d_am_p3 = match &am_phones {
        Some(am) => amrepo::restored_bytes(&phones, am).await?,
        None => 0,
    };
    for (i, p) in phones.iter().enumerate() {
        // With the comparison, five people both systems' phones hold (see `AmPhone::holds`).
        let touched = add_five_visits(p, |person| am_phones.as_ref().is_none_or(|am| am[i].holds(person))).await?;
        if let Some(am) = am_phones.as_mut() {
            amrepo::export_changes(p, &touched, &mut am[i], &work.path().join("amrepo/changes")).await?;
        }
    }
    let p4 = phase("P4", &phones, Some(&probe), args.phase_timeout).await?;
    lines.push(output::summarise("P4", "incremental (one visit to five people)", &p4, d_p1, args.link, |r| r.docs_sent));
    out.line(&lines[3]).map_err(BenchError::Output)?;
    // The peersync side is done: stop its server so that it takes no memory or CPU from the
    // automerge-repo run.
    drop(proxies);
    drop(server);
    drop(fresh);

    if let (Some(dir), Some(am), Some(version)) = (&args.compare_automerge_repo, am_phones, amrepo_version) {
        let reference = amrepo::Reference { d_p1, d_p3: d_am_p3 };
        out.comparison_header(&version).map_err(BenchError::Output)?;
        let mut shown = amrepo::Shown { out: &out, lines: Vec::new() };
        let result = amrepo::run(dir, &work.path().join("amrepo"), &am, args.link, args.phase_timeout, reference, &mut shown).await;
        // The ratios of the phases that were done, even if a later one failed.
        for (ours, theirs) in lines.iter().zip(&shown.lines) {
            out.ratio(&output::ratio(ours, theirs)).map_err(BenchError::Output)?;
        }
        result?;
    }
    Ok(())
}

/// Where the proxies forward to: the server URL's address (plain `ws://` only, since the proxy
/// would break a TLS server name check).
async fn upstream_of(url: &str) -> Result<SocketAddr, BenchError> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| BenchError::Usage("link emulation needs a ws:// server URL (on loopback); use --link lan for wss://".into()))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| BenchError::Usage(format!("cannot resolve {hostport}: {e}")))?
        .next()
        .ok_or_else(|| BenchError::Usage(format!("cannot resolve {hostport}")))
}

/// A phone's sync options: through its own emulated link, or straight to the server on lan.
async fn phone_link(url: &str, upstream: Option<SocketAddr>, profile: Profile) -> Result<(SyncOptions, Option<LinkProxy>), BenchError> {
    let (url, proxy) = match (upstream, profile.link()) {
        (Some(up), Some(link)) => {
            let proxy = LinkProxy::start(up, link).await?;
            (format!("ws://{}", proxy.addr), Some(proxy))
        }
        _ => (url.to_string(), None),
    };
    let mut opts = SyncOptions::new(url);
    opts.frame_timeout = FRAME_TIMEOUT;
    Ok((opts, proxy))
}

/// D for a set of phones: the sum of the automerge `save()` sizes of every document each holds.
async fn held_bytes(phones: &[Phone]) -> Result<u64, BenchError> {
    let mut d = 0u64;
    for p in phones {
        let err = |source| BenchError::Phone { worker: p.worker.clone(), source };
        for person in p.device.people().await.map_err(err)? {
            d += p.device.export_document(&person.id).await.map_err(err)?.len() as u64;
        }
    }
    Ok(d)
}

/// Every phone syncs at once; returns the phase's wall time and each phone's run. With `probe`,
/// the server's peak memory is reset before (where it can be) and read after, with the CPU time
/// it spent.
pub(crate) async fn phase(name: &'static str, phones: &[Phone], probe: Option<&ServerProbe>, timeout: Duration) -> Result<output::PhaseRun, BenchError> {
    let (rss_reset, before) = match probe {
        Some(p) => p.begin().await,
        None => (false, probe::Reading::default()),
    };
    let client_before = procstat::cpu_time(std::process::id());
    let now = chrono::Utc::now();
    let mut set = tokio::task::JoinSet::new();
    for p in phones {
        // Signed connection tokens carry the phone's time; the server accepts ±5 minutes.
        p.clock.set(now);
        let (device, opts, worker) = (p.device.clone(), p.opts.clone(), p.worker.clone());
        set.spawn(async move {
            let t = Instant::now();
            let r = device.sync(&opts).await;
            (worker, r, t.elapsed())
        });
    }
    let started = Instant::now();
    let done = AtomicUsize::new(0);
    let total = phones.len();
    let bar = crate::progress::Progress::new(format!("{name}: "));
    let collect = async {
        let mut runs = Vec::with_capacity(total);
        while let Some(joined) = set.join_next().await {
            let (worker, result, wall) = joined.map_err(|e| BenchError::Server(format!("a phone's task failed: {e}")))?;
            let report = result.map_err(|source| BenchError::Sync { phase: name, worker, source })?;
            runs.push(PhoneRun { report, wall });
            let n = done.fetch_add(1, Relaxed) + 1;
            if started.elapsed() > Duration::from_secs(2) || n == total {
                bar.update(format_args!("{n} of {total} phones synced"));
            }
        }
        Ok::<_, BenchError>(runs)
    };
    let runs = tokio::time::timeout(timeout, collect).await;
    bar.done();
    let runs = runs.map_err(|_| BenchError::Timeout { phase: name, timeout })??;
    let wall = started.elapsed();
    let after = match probe {
        Some(p) => p.read().await,
        None => probe::Reading::default(),
    };
    let server_cpu = before.cpu.zip(after.cpu).map(|(a, b)| b.saturating_sub(a));
    let client_cpu = client_before.zip(procstat::cpu_time(std::process::id())).map(|(a, b)| b.saturating_sub(a));
    let rss = after.peak_rss;
    Ok(output::PhaseRun { wall, runs, rss, rss_since_start: !rss_reset, server_cpu, client_cpu })
}

/// P4's change on one phone: one visit to each of five of its people; returns their ids.
async fn add_five_visits(p: &Phone, eligible: impl Fn(&str) -> bool) -> Result<Vec<String>, BenchError> {
    let err = |source| BenchError::Phone { worker: p.worker.clone(), source };
    let now = chrono::Utc::now();
    p.clock.set(now);
    let mut touched = Vec::new();
    for (i, person) in p.device.people().await.map_err(err)?.into_iter().filter(|p| eligible(&p.id)).take(5).enumerate() {
        let visit = NewVisit {
            id: Some(format!("bench-{}-{i}", p.worker)),
            started_at: now - chrono::Duration::minutes(45),
            duration_min: 45,
            mode: "in_person".into(),
            setting: "community".into(),
            activities: vec!["support".into()],
            goals: vec![],
            referrals: vec![],
            notes: "Checked in after the group; talked about the week ahead.".into(),
            follow_up: None,
        };
        p.device.record_visit(&person.id, visit).await.map_err(err)?;
        touched.push(person.id);
    }
    Ok(touched)
}
