//! Sync as the apps see it: where the server is, what a sync did, and the listener an app
//! implements to follow progress, the connection's state and changed records.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use peersync_core::sync as core;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct SyncConfig {
    /// `wss://host[:port]` (plain `ws://` only for a server on this machine's loopback).
    pub server_url: String,
    /// A CA certificate (PEM) to trust besides the public roots, for a server with a private CA.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// Longest wait for any one message from the server before the sync is abandoned (it
    /// resumes next time). Default 60 s; on 2G links with large caseloads keep it generous.
    #[uniffi(default = None)]
    pub frame_timeout_secs: Option<u32>,
}

impl SyncConfig {
    pub(crate) fn options(&self, listener: Option<Arc<Bridge>>) -> core::SyncOptions {
        let mut o = core::SyncOptions::new(self.server_url.clone());
        if let Some(pem) = &self.ca_pem {
            o = o.trust_ca(pem.clone().into_bytes());
        }
        if let Some(s) = self.frame_timeout_secs {
            o.frame_timeout = Duration::from_secs(u64::from(s.max(1)));
        }
        if let Some(l) = listener {
            o = o.observer(l);
        }
        o
    }
}

/// A document the server would not take; the device keeps its data.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Refusal {
    pub person_id: String,
    /// The server's reason code (`Forbidden`, `Erased`, ...).
    pub code: String,
    pub message: String,
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct SyncReport {
    pub docs_sent: u64,
    pub docs_received: u64,
    pub refused: Vec<Refusal>,
    /// People deleted from this device: erased, or no longer assigned to its worker.
    pub purged: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub round_trips: u64,
    pub duration_ms: u64,
}

impl From<core::SyncReport> for SyncReport {
    fn from(r: core::SyncReport) -> Self {
        Self {
            docs_sent: r.docs_sent,
            docs_received: r.docs_received,
            refused: r
                .refused
                .into_iter()
                .map(|f| Refusal { person_id: f.person, code: format!("{:?}", f.code), message: f.message })
                .collect(),
            purged: r.purged,
            bytes_up: r.bytes_up + r.upgrade_bytes_up,
            bytes_down: r.bytes_down + r.upgrade_bytes_down,
            round_trips: r.round_trips,
            duration_ms: r.duration_ms,
        }
    }
}

/// Where a sync stands, for a progress bar.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum SyncProgress {
    Connected { upgrade_bytes: u64 },
    /// Documents the server has acknowledged, of those this sync sends.
    Sending { done: u64, total: u64 },
    /// Documents received, of those announced so far.
    Receiving { done: u64, total: u64 },
    /// Documents being reconciled (self-healing after a restore).
    Reconciling { documents: u64 },
}

impl From<&core::SyncProgress> for SyncProgress {
    fn from(p: &core::SyncProgress) -> Self {
        match *p {
            core::SyncProgress::Connected { upgrade_bytes } => Self::Connected { upgrade_bytes },
            core::SyncProgress::Sending { done, total } => Self::Sending { done, total },
            core::SyncProgress::Receiving { done, total } => Self::Receiving { done, total },
            core::SyncProgress::Reconciling { documents } => Self::Reconciling { documents },
        }
    }
}

/// Where the device's connection to the server stands, for a sync indicator.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum SyncState {
    Connecting,
    Syncing,
    /// Connected and staying connected (live sync).
    Live,
    Finished { report: SyncReport },
    /// Stopped early; nothing local was lost. Sync again later.
    Failed { message: String },
    /// A coordinator revoked this device; its records have been deleted.
    Wiped { message: String },
}

impl From<&core::SyncState> for SyncState {
    fn from(s: &core::SyncState) -> Self {
        match s {
            core::SyncState::Connecting => Self::Connecting,
            core::SyncState::Syncing => Self::Syncing,
            core::SyncState::Live => Self::Live,
            core::SyncState::Finished { report } => Self::Finished { report: report.clone().into() },
            core::SyncState::Failed { message } => Self::Failed { message: message.clone() },
            core::SyncState::Wiped { message } => Self::Wiped { message: message.clone() },
        }
    }
}

/// What enrollment established.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Enrollment {
    pub org: String,
    pub worker: String,
    pub device: String,
}

impl From<core::Enrollment> for Enrollment {
    fn from(e: core::Enrollment) -> Self {
        Self { org: e.org, worker: e.worker, device: e.device }
    }
}

/// Implemented by the app. Called on a library thread, never the UI thread: hop to the main
/// thread before touching views, and return quickly.
#[uniffi::export(with_foreign)]
pub trait DeviceListener: Send + Sync {
    /// Progress of a sync.
    fn on_progress(&self, progress: SyncProgress);
    /// The connection's state changed.
    fn on_state(&self, state: SyncState);
    /// These people's records changed on this device (a write here, or what sync brought):
    /// refresh screens that show them.
    fn on_records_changed(&self, person_ids: Vec<String>);
}

enum Event {
    Progress(SyncProgress),
    State(SyncState),
    Changed(Vec<String>),
    /// Everything before this has been delivered.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The name of every listener thread.
pub(crate) const LISTENER_THREAD: &str = "peersync-listener";

/// Adapts an app's listener to the core's observer. Events go, in order, to one thread of the
/// listener's own: an app that waits on a device call inside a callback (Kotlin `runBlocking`)
/// then blocks only that thread, never the library's runtime or a sync in progress. A listener
/// that throws must not stop a sync or a write that already happened, so its failures are
/// contained here.
pub(crate) struct Bridge {
    events: std::sync::mpsc::Sender<Event>,
    /// Answers once the listener thread has released the app's listener and ended.
    released: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// Set when cancelled: events not yet delivered are dropped.
    cancelled: Arc<AtomicBool>,
}

impl Bridge {
    pub(crate) fn new(listener: Arc<dyn DeviceListener>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Event>();
        let (released_tx, released) = std::sync::mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let dropping = cancelled.clone();
        // The thread ends when the bridge (the subscription or sync holding it) is gone.
        let spawned = std::thread::Builder::new().name(LISTENER_THREAD.into()).spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            for event in rx {
                if let Event::Flush(done) = event {
                    let _ = done.send(());
                    continue;
                }
                if dropping.load(SeqCst) {
                    continue;
                }
                let l = listener.as_ref();
                let call = || match event {
                    Event::Progress(p) => l.on_progress(p),
                    Event::State(s) => l.on_state(s),
                    Event::Changed(people) => l.on_records_changed(people),
                    Event::Flush(_) => {}
                };
                if std::panic::catch_unwind(AssertUnwindSafe(call)).is_err() {
                    tracing::warn!("an app listener failed; the sync goes on");
                }
            }
            // Releasing a foreign listener calls into the app's runtime: see `close`.
            drop(listener);
            let _ = released_tx.send(());
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a listener thread ({e}); the listener will not be called");
        }
        Self { events: tx, released: std::sync::Mutex::new(Some(released)), cancelled }
    }

    /// What a subscription sets to stop delivery (see `Subscription::cancel`).
    pub(crate) fn cancelled(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    /// What answers once the listener thread has ended (taken once: a subscription waits on
    /// it while the bridge itself belongs to the core's registry).
    pub(crate) fn take_released(&self) -> Option<std::sync::mpsc::Receiver<()>> {
        self.released.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Deliver everything sent so far, release the app's listener and end the thread; resolves
    /// when that is done (or after `limit`, for a listener that does not return). A sync's
    /// listener is closed before the sync returns: released later, on the listener thread,
    /// it could call into an app runtime that is shutting down (a Python script that ends
    /// right after its last sync aborts when a thread enters the interpreter at that point).
    pub(crate) async fn close(self, limit: std::time::Duration) {
        let released = self.take_released();
        drop(self);
        if let Some(released) = released {
            let _ = tokio::task::spawn_blocking(move || released.recv_timeout(limit)).await;
        }
    }

    /// Resolves once every event sent before has reached the listener (or its thread is gone).
    pub(crate) fn flushed(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Event::Flush(tx));
        rx
    }

    fn send(&self, event: Event) {
        // A send fails only if the listener thread could not start; nothing else to do then.
        let _ = self.events.send(event);
    }
}

impl core::SyncObserver for Bridge {
    fn progress(&self, progress: &core::SyncProgress) {
        self.send(Event::Progress(progress.into()));
    }

    fn records_changed(&self, people: &[String]) {
        self.send(Event::Changed(people.to_vec()));
    }

    fn state(&self, state: &core::SyncState) {
        self.send(Event::State(state.into()));
    }

    fn delivered(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        Some(self.flushed())
    }
}
