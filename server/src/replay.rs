//! `peersync replay`: play a field scenario through real devices and a real server, then check
//! that everything converged and produce the coordinator report.
//!
//! One device per worker, each with its own encrypted store and its clock set to each event's
//! time; a device syncs at each of its `sync` events; erasures go through the coordinator API;
//! at the end every device syncs once more. Then every device's copy of each person it holds
//! must equal the server's, and every worker's device must hold exactly its assigned people.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use peersync_core::protocol::ErrorCode;
use peersync_core::sync::{SyncOptions, http::request};
use peersync_core::{CoreError, Device, ManualClock};
use serde_json::{Value, json};

use crate::scenario::Event;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the server refused {what} ({status}): {message}")]
    Api { what: String, status: u16, message: String },
    #[error(transparent)]
    Sync(#[from] peersync_core::sync::SyncError),
    #[error("line {line}, {worker}'s sync: {source}")]
    SyncAt { line: usize, worker: String, source: peersync_core::sync::SyncError },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("{0}")]
    Other(String),
}

/// What a replay found.
pub struct Outcome {
    pub report: Value,
    /// Anything that did not converge or was refused unexpectedly; empty when all is well.
    pub problems: Vec<String>,
    pub devices: usize,
    pub documents: usize,
    pub syncs: u64,
}

const TIMEOUT: Duration = Duration::from_secs(60);
/// Largest API answer read: the all-time report grows with workers and weeks (a few hundred
/// kilobytes for 50 workers over a year); far beyond that something is wrong.
const MAX_API_RESPONSE: usize = 64 << 20;

pub(crate) async fn api(opts: &SyncOptions, token: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, ReplayError> {
    let (status, v) = request(opts, method, path, Some(token), body.as_ref(), TIMEOUT, MAX_API_RESPONSE).await.map_err(|e| match e {
        // The phone's wording ("nothing was lost, sync again later") does not fit a replay.
        peersync_core::sync::SyncError::Connect { url, reason } => ReplayError::Other(format!("cannot reach the server's API at {url} ({method} {path}): {reason}")),
        e => ReplayError::Sync(e),
    })?;
    if !(200..300).contains(&status) {
        let message = v.get("error").and_then(|m| m.as_str()).unwrap_or("").to_string();
        return Err(ReplayError::Api { what: format!("{method} {path}"), status, message });
    }
    Ok(v)
}

/// The error of the earliest event that failed, when events run on several tasks at once: the
/// one a one-at-a-time run would have stopped at, if it had got that far.
pub(crate) struct Earliest<E>(Mutex<Option<(usize, E)>>);

impl<E> Default for Earliest<E> {
    fn default() -> Self {
        Earliest(Mutex::new(None))
    }
}

impl<E> Earliest<E> {
    /// Event `n` failed with `e`.
    pub(crate) fn set(&self, n: usize, e: E) {
        let mut first = self.0.lock().expect("error lock");
        if first.as_ref().is_none_or(|(m, _)| n < *m) {
            *first = Some((n, e));
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.lock().expect("error lock").is_some()
    }

    pub(crate) fn take(&self) -> Option<E> {
        self.0.lock().expect("error lock").take().map(|(_, e)| e)
    }
}

/// What the phones' tasks share with the loop that feeds them.
struct Shared {
    /// Each event's line in the scenario file, for naming it (empty: one event per line).
    lines: Vec<usize>,
    erased: Mutex<HashSet<String>>,
    /// (event index, what went wrong): sorted by index at the end, so the order is the scenario's.
    problems: Mutex<Vec<(usize, String)>>,
    /// What stops the replay.
    fatal: Earliest<ReplayError>,
    /// Events done, for progress.
    done: AtomicUsize,
    /// Phones recording at once: one per core. Syncs are the replay's critical path (each waits
    /// for the one before); with every phone recording at once they waited behind the others'
    /// work for the CPU (50/2000/12: 34.1-34.7 s unbounded, 32.5-32.8 s with two).
    recording: tokio::sync::Semaphore,
}

impl Shared {
    fn new(lines: &[usize]) -> Self {
        Shared {
            lines: lines.to_vec(),
            erased: Mutex::default(),
            problems: Mutex::default(),
            fatal: Earliest::default(),
            done: AtomicUsize::new(0),
            recording: one_per_core(),
        }
    }

    /// The line of the scenario file event `i` came from.
    fn line(&self, i: usize) -> usize {
        self.lines.get(i).copied().unwrap_or(i + 1)
    }

    fn problem(&self, i: usize, p: String) {
        self.problems.lock().expect("problems lock").push((i, p));
    }

    fn erased(&self, person: &str) -> bool {
        self.erased.lock().expect("erased lock").contains(person)
    }
}

/// Work for one phone's task, in the scenario's order.
enum Job {
    /// Record event `i` on the phone.
    Record(usize, Box<Event>),
    /// Sync at event `i`, once the scenario's previous sync (`after`) has finished; say so on
    /// `finished`. A sync that fails drops `finished`, and every later sync then stops.
    Sync { i: usize, at: chrono::DateTime<chrono::Utc>, after: Option<oneshot::Receiver<()>>, finished: oneshot::Sender<()> },
    /// Answer once everything sent before is done.
    Idle(oneshot::Sender<()>),
}

struct Phone {
    device: Device,
    jobs: mpsc::UnboundedSender<Job>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Phone {
    /// A replay that stops early leaves no phone working on behind it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replay `events` against the server at `opts.server` (admin `token`), in organisation `org`,
/// with device stores under `dir`. `progress` is told how far it got.
///
/// Each phone runs on a task of its own, in the scenario's order for that phone. What one phone
/// records cannot affect another until it syncs, so phones record side by side; syncs keep the
/// scenario's order among themselves (each waits for the one before it), and joining workers
/// and erasures wait until every phone has done everything before them. The server therefore
/// sees exactly the sequence a one-at-a-time replay gives it.
pub async fn replay(
    events: &[Event],
    opts: &SyncOptions,
    token: &str,
    org: &str,
    dir: &std::path::Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Outcome, ReplayError> {
    replay_lines(events, &[], opts, token, org, dir, progress).await
}

/// [`replay`], naming events by `lines` (each event's line in the scenario file, as
/// [`crate::scenario::parse_numbered`] gives them) in problems and errors.
#[allow(clippy::too_many_arguments)]
pub async fn replay_lines(
    events: &[Event],
    lines: &[usize],
    opts: &SyncOptions,
    token: &str,
    org: &str,
    dir: &std::path::Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Outcome, ReplayError> {
    api(opts, token, "POST", "/v1/admin/orgs", Some(json!({ "id": org, "name": "Replayed field scenario" }))).await?;
    let shared = Arc::new(Shared::new(lines));
    let mut phones: BTreeMap<String, Phone> = BTreeMap::new();
    let mut last_sync: Option<oneshot::Receiver<()>> = None;
    let mut syncs = 0u64;
    let q = format!("?org={org}");
    let total = events.len();
    progress(0, total);
    for (i, e) in events.iter().enumerate() {
        if let Event::Worker { worker, name, role, at } = e {
            settle(&phones, &shared, total, progress).await?;
            api(opts, token, "POST", &format!("/v1/workers{q}"), Some(json!({ "id": worker, "name": name, "role": role }))).await?;
            let code = api(opts, token, "POST", &format!("/v1/workers/{worker}/enrollment{q}"), None).await?;
            let code = code["code"].as_str().ok_or_else(|| ReplayError::Other("no enrollment code".into()))?.to_string();
            let clock = ManualClock::new(*at);
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).map_err(|_| ReplayError::Other("no randomness".into()))?;
            let device = Device::open(dir.join(worker), &key, Arc::new(clock.clone())).await?;
            device.enroll(opts, &code, &format!("{name}'s phone")).await?;
            let (jobs, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(run_phone(worker.clone(), device.clone(), clock, opts.clone(), shared.clone(), rx));
            phones.insert(worker.clone(), Phone { device, jobs, task });
            shared.done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if let Event::Erase { person, .. } = e {
            settle(&phones, &shared, total, progress).await?;
            api(opts, token, "POST", &format!("/v1/people/{person}/erase{q}"), None).await?;
            shared.erased.lock().expect("erased lock").insert(person.clone());
            shared.done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let phone = e.phone().map(|by| (by, phones.get(by)));
        let Some((by, Some(phone))) = phone else {
            if let Some((by, None)) = phone {
                shared.problem(i, format!("line {}: no worker {by:?} joined before it", shared.line(i)));
            }
            shared.done.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let job = if let Event::Sync { .. } = e {
            syncs += 1;
            let (finished, next) = oneshot::channel();
            Job::Sync { i, at: e.at(), after: last_sync.replace(next), finished }
        } else {
            Job::Record(i, Box::new(e.clone()))
        };
        if phone.jobs.send(job).is_err() {
            // Its task is gone (it panicked): wait for the others, and report what stopped the
            // replay first if that was something else.
            settle(&phones, &shared, total, progress).await?;
            return Err(ReplayError::Other(format!("{by}'s phone stopped before line {}", shared.line(i))));
        }
    }
    settle(&phones, &shared, total, progress).await?;
    progress(total, total);
    let devices: BTreeMap<String, Device> = phones.iter().map(|(w, p)| (w.clone(), p.device.clone())).collect();
    drop(phones);
    let mut problems = std::mem::take(&mut *shared.problems.lock().expect("problems lock"));
    problems.sort_by_key(|(i, _)| *i);
    let mut problems: Vec<String> = problems.into_iter().map(|(_, p)| p).collect();
    // Everyone syncs once more, so that all converge.
    for device in devices.values() {
        device.sync(opts).await?;
        syncs += 1;
    }
    // Converged: every worker's device holds exactly its people, each equal to the server's.
    let docs = api(opts, token, "GET", &format!("/v1/admin/orgs/{org}/documents"), None).await?;
    let docs = docs.as_array().cloned().unwrap_or_default();
    let mut expected: HashMap<String, Vec<(String, Vec<String>)>> = HashMap::new();
    for d in &docs {
        let id = d["id"].as_str().unwrap_or_default().to_string();
        let heads: Vec<String> = d["heads"].as_array().map(|a| a.iter().filter_map(|h| h.as_str().map(String::from)).collect()).unwrap_or_default();
        for w in d["workers"].as_array().into_iter().flatten().filter_map(|w| w.as_str()) {
            expected.entry(w.to_string()).or_default().push((id.clone(), heads.clone()));
        }
    }
    for (worker, device) in &devices {
        let held: std::collections::BTreeSet<String> = device.people().await?.into_iter().map(|p| p.id).collect();
        let want = expected.remove(worker).unwrap_or_default();
        for (id, heads) in &want {
            if !held.contains(id) {
                problems.push(format!("{worker}'s phone lacks {id}"));
            } else if &device.heads(id).await? != heads {
                problems.push(format!("{worker}'s copy of {id} differs from the server's"));
            }
        }
        let want_ids: std::collections::BTreeSet<&String> = want.iter().map(|(id, _)| id).collect();
        for id in held.iter().filter(|id| !want_ids.contains(id)) {
            problems.push(format!("{worker}'s phone holds {id}, which is not assigned to it"));
        }
    }
    let report = api(opts, token, "GET", &format!("/v1/report{q}"), None).await?;
    Ok(Outcome { report, problems, devices: devices.len(), documents: docs.len(), syncs })
}

/// Wait until every phone has done all it was given, telling `progress` meanwhile; then stop if
/// anything failed.
async fn settle(phones: &BTreeMap<String, Phone>, shared: &Shared, total: usize, progress: &dyn Fn(usize, usize)) -> Result<(), ReplayError> {
    let idle = futures_util::future::join_all(phones.iter().map(|(worker, p)| {
        let (tx, rx) = oneshot::channel();
        let _ = p.jobs.send(Job::Idle(tx));
        async move { rx.await.map_err(|_| worker) }
    }));
    let answers = ticking(idle, || progress(shared.done.load(Ordering::Relaxed), total)).await;
    // A phone's task only ends early by panicking: name it, rather than what that stopped.
    if let Some(Err(worker)) = answers.into_iter().find(Result::is_err) {
        return Err(ReplayError::Other(format!("{worker}'s phone stopped unexpectedly (see the panic message above)")));
    }
    match shared.fatal.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Permits for work that should take no more than one core each (phones recording).
pub(crate) fn one_per_core() -> tokio::sync::Semaphore {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Wait for `work`, calling `tick` every half second meanwhile (for progress lines).
pub(crate) async fn ticking<T>(work: impl std::future::Future<Output = T>, tick: impl Fn()) -> T {
    tokio::pin!(work);
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = every.tick() => tick(),
        }
    }
}

/// One phone: its jobs in order, until the replay drops its queue. After a failure anywhere it
/// only answers `Idle`, so that the replay can stop.
async fn run_phone(worker: String, device: Device, clock: ManualClock, opts: SyncOptions, shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Idle(tx) => {
                let _ = tx.send(());
                continue;
            }
            Job::Sync { i, at, after, finished } => {
                let ready = match after {
                    Some(before) => before.await.is_ok(),
                    None => true,
                };
                // The sync before failed (the replay is stopping already) or its phone's task
                // panicked: nothing after it can be replayed as the scenario says.
                if !ready && !shared.fatal.is_set() {
                    shared.fatal.set(i, ReplayError::Other("a phone's task stopped unexpectedly before this sync (see the panic message above)".into()));
                }
                if ready && !shared.fatal.is_set() {
                    clock.set(at);
                    match device.sync(&opts).await {
                        Ok(r) => {
                            for refusal in r.refused {
                                if !(refusal.code == ErrorCode::Erased && shared.erased(&refusal.person)) {
                                    shared.problem(i, format!("line {} ({worker}'s sync): push of {} refused: {}", shared.line(i), refusal.person, refusal.message));
                                }
                            }
                            let _ = finished.send(());
                        }
                        Err(source) => shared.fatal.set(i, ReplayError::SyncAt { line: shared.line(i), worker: worker.clone(), source }),
                    }
                }
            }
            Job::Record(i, e) => {
                if !shared.fatal.is_set() {
                    let _permit = shared.recording.acquire().await.expect("never closed");
                    clock.set(e.at());
                    record(&worker, &device, &shared, i, &e).await;
                }
            }
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Record event `i` (not a sync) on `device`; what fails is a problem unless the phone had learnt
/// that the person was erased.
async fn record(worker: &str, device: &Device, shared: &Shared, i: usize, e: &Event) {
    match apply(device, e).await {
        Ok(()) => {}
        Err(NotRecorded::Scenario(m)) => shared.problem(i, format!("line {}: {m}", shared.line(i))),
        Err(NotRecorded::Device(err)) => {
            if !(matches!(err, CoreError::UnknownPerson(_)) && e.person().is_some_and(|p| shared.erased(p))) {
                shared.problem(i, format!("line {} ({worker}): {err}", shared.line(i)));
            }
        }
    }
}

/// Why a scenario event was not recorded on its phone.
#[derive(Debug, thiserror::Error)]
pub enum NotRecorded {
    /// The event itself cannot be applied (a field the product does not know, a wrong type).
    #[error("{0}")]
    Scenario(String),
    #[error(transparent)]
    Device(#[from] CoreError),
}

/// One scenario event as the call a worker's app makes on the phone (nothing for syncs, joins
/// and erasures, which are not phone calls).
pub(crate) async fn apply(d: &Device, e: &Event) -> Result<(), NotRecorded> {
    let not = |what: &str| NotRecorded::Scenario(format!("not {what}"));
    match e {
        Event::Person { .. } => {
            d.register_person(e.new_person().ok_or_else(|| not("a person"))?).await?;
        }
        Event::Visit { person, .. } => {
            d.record_visit(person, e.new_visit().ok_or_else(|| not("a visit"))?).await?;
        }
        Event::Checkin { person, .. } => {
            d.record_checkin(person, e.new_checkin().ok_or_else(|| not("a check-in"))?).await?;
        }
        Event::Edit { person, visit, .. } => {
            let edit = e.visit_edit().ok_or_else(|| not("an edit"))?.map_err(NotRecorded::Scenario)?;
            d.edit_visit(person, visit, edit).await?;
        }
        Event::Consent { person, .. } => {
            let change = e.consent_change().ok_or_else(|| not("a consent change"))?.map_err(NotRecorded::Scenario)?;
            d.set_consent(person, change).await?;
        }
        Event::Worker { .. } | Event::Erase { .. } | Event::Sync { .. } => {}
    }
    Ok(())
}

/// A progress line for a replay `elapsed` into it: events done and, once enough is done to
/// judge, about how long is left (a large scenario takes minutes).
pub fn progress_line(done: usize, total: usize, elapsed: Duration) -> String {
    let mut line = format!("{done} of {total} events");
    if done >= total.div_ceil(20).max(1) && done < total && elapsed >= Duration::from_secs(5) {
        let left = elapsed.as_secs_f64() * (total - done) as f64 / done as f64;
        if left >= 90.0 {
            line += &format!(", about {} min left", (left / 60.0).round());
        } else {
            line += &format!(", about {} s left", left.ceil());
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::progress_line;

    #[test]
    fn progress_tells_the_time_left_once_it_can_judge() {
        assert_eq!(progress_line(0, 1000, Duration::from_secs(0)), "0 of 1000 events");
        // Too early to judge: under a twentieth done, or under five seconds in.
        assert_eq!(progress_line(40, 1000, Duration::from_secs(10)), "40 of 1000 events");
        assert_eq!(progress_line(500, 1000, Duration::from_secs(4)), "500 of 1000 events");
        assert_eq!(progress_line(500, 1000, Duration::from_secs(30)), "500 of 1000 events, about 30 s left");
        assert_eq!(progress_line(250, 1000, Duration::from_secs(60)), "250 of 1000 events, about 3 min left");
        assert_eq!(progress_line(1000, 1000, Duration::from_secs(60)), "1000 of 1000 events");
    }
}
