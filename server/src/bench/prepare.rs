//! Before the phases: the organisation and its workers on the server, one enrolled phone per
//! worker, and the scenario recorded on the phones offline (see the module above for how
//! people shared by two workers reach the second phone).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use peersync_core::sync::SyncOptions;
use peersync_core::{Device, ManualClock};
use serde_json::json;

use super::{BenchError, Phone};
use crate::replay::{ReplayError, api};
use crate::scenario::Event;

/// Create `org` and the scenario's workers; returns each worker with an enrollment code.
pub async fn create_team(events: &[Event], opts: &SyncOptions, token: &str, org: &str) -> Result<Vec<(String, String)>, BenchError> {
    api(opts, token, "POST", "/v1/admin/orgs", Some(json!({ "id": org, "name": "peersync bench" }))).await?;
    let mut out = Vec::new();
    for e in events {
        if let Event::Worker { worker, name, role, .. } = e {
            api(opts, token, "POST", &format!("/v1/workers?org={org}"), Some(json!({ "id": worker, "name": name, "role": role }))).await?;
            out.push((worker.clone(), enrollment_code(opts, token, org, worker).await?));
        }
    }
    if out.is_empty() {
        return Err(BenchError::Usage("the scenario has no workers".into()));
    }
    Ok(out)
}

pub async fn enrollment_code(opts: &SyncOptions, token: &str, org: &str, worker: &str) -> Result<String, BenchError> {
    let v = api(opts, token, "POST", &format!("/v1/workers/{worker}/enrollment?org={org}"), None).await?;
    v["code"].as_str().map(String::from).ok_or_else(|| BenchError::Setup(ReplayError::Other("no enrollment code in the answer".into())))
}

/// A phone on its own encrypted sled store under `dir`, enrolled for `worker` (straight to the
/// server: enrollment is not part of any phase), syncing through `link`.
pub async fn enrolled_phone(dir: &Path, worker: &str, code: &str, direct: &SyncOptions, link: SyncOptions) -> Result<Phone, BenchError> {
    let clock = ManualClock::new(chrono::Utc::now());
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).map_err(|_| BenchError::Server("no randomness for a store key".into()))?;
    let err = |source| BenchError::Phone { worker: worker.to_string(), source };
    let device = Device::open(dir.join(worker), &key, Arc::new(clock.clone())).await.map_err(err)?;
    device.enroll(direct, code, &format!("{worker}'s bench phone")).await.map_err(|source| BenchError::Sync {
        phase: "enrollment",
        worker: worker.to_string(),
        source,
    })?;
    Ok(Phone { worker: worker.to_string(), device: Arc::new(device), clock, opts: link })
}

/// Record every phone event of the scenario on its phone, without syncing. Returns how many
/// were recorded; events a phone refuses are counted on stderr, not fatal.
///
/// Each phone works through its own events in order, on a task of its own, at most one phone
/// per core at a time. Events on one person keep the scenario's order across phones (each
/// waits for the one before it), because a phone takes in its teammates' current copy of the
/// person first: every phone then holds exactly what a one-at-a-time recording gives it.
pub async fn record_offline(events: &[Event], phones: &[Phone]) -> Result<usize, BenchError> {
    let index: HashMap<&str, usize> = phones.iter().enumerate().map(|(i, p)| (p.worker.as_str(), i)).collect();
    let devices: Arc<Vec<Arc<Device>>> = Arc::new(phones.iter().map(|p| p.device.clone()).collect());
    let shared = Arc::new(Offline::new());
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    for (me, p) in phones.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        tasks.push(tokio::spawn(offline_phone(me, p.worker.clone(), p.clock.clone(), devices.clone(), shared.clone(), rx)));
    }
    let total = events.len();
    let mut last_on: HashMap<&str, oneshot::Receiver<()>> = HashMap::new();
    for (n, e) in events.iter().enumerate() {
        let job = match (e.phone().and_then(|by| index.get(by)), e.person()) {
            (Some(&me), Some(person)) => {
                let (finished, next) = oneshot::channel();
                Some((me, OfflineJob { n, event: Box::new(e.clone()), after: last_on.insert(person, next), finished }))
            }
            _ => None,
        };
        match job {
            // A phone's task ends early only by panicking, which the end reports.
            Some((me, job)) => {
                let _ = queues[me].send(job);
            }
            None => {
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(queues);
    let started = std::time::Instant::now();
    let line = || crate::replay::progress_line(shared.done.load(Ordering::Relaxed), total, started.elapsed());
    let bar = crate::progress::Progress::new("recording offline: ");
    let ended = crate::replay::ticking(futures_util::future::join_all(tasks), || bar.update(line())).await;
    bar.update(line());
    bar.done();
    let mut refused = std::mem::take(&mut *shared.refused.lock().expect("refused lock"));
    refused.sort_by_key(|(n, _)| *n);
    for (_, message) in refused.iter().take(5) {
        eprintln!("{message}");
    }
    if !refused.is_empty() {
        eprintln!("{} events could not be recorded offline (the first five above)", refused.len());
    }
    if let Some(Err(e)) = ended.into_iter().find(Result::is_err) {
        return Err(BenchError::Server(format!("a phone's offline recording failed: {e}")));
    }
    if let Some(e) = shared.fatal.take() {
        return Err(e);
    }
    Ok(shared.recorded.load(Ordering::Relaxed))
}

/// What the phones' tasks share while recording offline.
struct Offline {
    /// Which phones hold each person, in the order they came to.
    holders: Mutex<HashMap<String, Vec<usize>>>,
    recorded: AtomicUsize,
    /// (event index, message) of events a phone refused.
    refused: Mutex<Vec<(usize, String)>>,
    /// What stops the recording.
    fatal: crate::replay::Earliest<BenchError>,
    done: AtomicUsize,
    /// Phones recording at once: one per core (as in replay).
    recording: tokio::sync::Semaphore,
}

impl Offline {
    fn new() -> Self {
        Offline {
            holders: Mutex::default(),
            recorded: AtomicUsize::new(0),
            refused: Mutex::default(),
            fatal: crate::replay::Earliest::default(),
            done: AtomicUsize::new(0),
            recording: crate::replay::one_per_core(),
        }
    }
}

/// Event `n` for one phone, once the scenario's previous event on the same person (`after`) is
/// done; `finished` says this one is.
struct OfflineJob {
    n: usize,
    event: Box<Event>,
    after: Option<oneshot::Receiver<()>>,
    finished: oneshot::Sender<()>,
}

async fn offline_phone(me: usize, worker: String, clock: ManualClock, devices: Arc<Vec<Arc<Device>>>, shared: Arc<Offline>, mut jobs: mpsc::UnboundedReceiver<OfflineJob>) {
    while let Some(job) = jobs.recv().await {
        // The scenario's previous event on this person is done, or was skipped after a failure
        // (it says so too); a dropped answer means its phone's task panicked: stop everything,
        // since this phone would go on from a copy missing that event.
        if let Some(before) = job.after
            && before.await.is_err()
        {
            shared.fatal.set(job.n, BenchError::Server("another phone's task stopped unexpectedly (see the panic message above)".into()));
        }
        if !shared.fatal.is_set() {
            let _permit = shared.recording.acquire().await.expect("never closed");
            if let Err(e) = offline_event(me, &worker, &clock, &devices, &shared, job.n, &job.event).await {
                shared.fatal.set(job.n, e);
            }
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
        let _ = job.finished.send(());
    }
}

/// Record event `n` on phone `me`, after taking in what its teammates hold of the person.
async fn offline_event(me: usize, worker: &str, clock: &ManualClock, devices: &[Arc<Device>], shared: &Offline, n: usize, e: &Event) -> Result<(), BenchError> {
    let Some(person) = e.person() else { return Ok(()) };
    let err = |source| BenchError::Phone { worker: worker.to_string(), source };
    // A teammate's records reach this phone first, as they would have at its last sync.
    if !matches!(e, Event::Person { .. }) {
        let holders = shared.holders.lock().expect("holders lock").get(person).cloned().unwrap_or_default();
        for other in holders.into_iter().filter(|&o| o != me) {
            let data = devices[other].export_document(person).await.map_err(err)?;
            devices[me].import_document(person, data).await.map_err(err)?;
        }
    }
    clock.set(e.at());
    match crate::replay::apply(&devices[me], e).await {
        Ok(()) => {
            shared.recorded.fetch_add(1, Ordering::Relaxed);
            let mut holders = shared.holders.lock().expect("holders lock");
            let h = holders.entry(person.to_string()).or_default();
            if !h.contains(&me) {
                h.push(me);
            }
        }
        Err(x) => shared.refused.lock().expect("refused lock").push((n, format!("event {n} on {worker}'s phone not recorded: {x}"))),
    }
    Ok(())
}
