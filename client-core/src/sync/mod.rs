//! The device side of sync: what the app calls, what it gets back, and how it is told of
//! progress. The protocol logic (`engine`) is independent of the socket (`ws`).

mod engine;
pub mod http;
mod identity;
mod state;
mod transport;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::protocol::{ErrorCode, ProtocolError};

pub use engine::FrameConn;
pub use state::send_needed_again;
pub use ws::WsConn;
pub(crate) use engine::{open, run, run_until};
pub(crate) use identity::enroll;

/// How to reach the server.
#[derive(Clone)]
pub struct SyncOptions {
    /// Base URL of the server: `ws://host:port` or `wss://host:port`.
    pub server: String,
    /// Longest wait for any one frame before the sync is abandoned (it resumes next time).
    pub frame_timeout: Duration,
    pub observer: Option<Arc<dyn SyncObserver>>,
    /// A CA certificate (PEM) to trust besides the public roots: for servers with a private CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow plain `ws://` to a server that is not on loopback. Never in production.
    pub allow_insecure: bool,
    /// When the sync ends, wait (a few seconds at most) until the device's subscribers have
    /// been delivered all of it. On by default; off for a sync started from inside a
    /// subscriber's callback, which would be waiting on itself.
    pub wait_for_subscribers: bool,
}

impl SyncOptions {
    pub fn new(server: impl Into<String>) -> Self {
        Self { server: server.into(), frame_timeout: Duration::from_secs(60), observer: None, ca_pem: None, allow_insecure: false, wait_for_subscribers: true }
    }

    pub fn trust_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn observer(mut self, o: Arc<dyn SyncObserver>) -> Self {
        self.observer = Some(o);
        self
    }
}

/// Where a sync stands, for a progress bar ("sending 120 of 1,000").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncProgress {
    Connected { upgrade_bytes: u64 },
    /// Documents the server has acknowledged, of those this sync sends.
    Sending { done: u64, total: u64 },
    /// Documents received, of those announced so far.
    Receiving { done: u64, total: u64 },
    /// Documents being reconciled with automerge's sync protocol.
    Reconciling { documents: u64 },
}

/// Where the device's connection to the server stands, for a sync indicator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    /// Opening the connection.
    Connecting,
    /// Connected; exchanging documents.
    Syncing,
    /// Connected and staying connected: changes flow both ways as they happen.
    Live,
    /// The sync finished; everything pending was acknowledged or refused (see the report).
    Finished { report: SyncReport },
    /// The sync stopped early. Nothing local was lost; sync again later.
    Failed { message: String },
    /// A coordinator revoked this device; its records have been deleted.
    Wiped { message: String },
}

/// Told of progress, of the connection's state, and of records that changed. Called from a
/// background thread; keep it quick.
pub trait SyncObserver: Send + Sync {
    fn progress(&self, _progress: &SyncProgress) {}
    /// People whose records changed on this device: because of what the server sent, or (for
    /// listeners subscribed with [`crate::Device::subscribe`]) because of a write on this device.
    fn records_changed(&self, _people: &[String]) {}
    fn state(&self, _state: &SyncState) {}
    /// For an observer that hands events to a thread of its own: answers once everything it
    /// was told so far has been delivered. A sync waits on its subscribers' before it returns
    /// (a few seconds at most), so that nothing about it is still being delivered after.
    fn delivered(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        None
    }
}

/// A document the server would not take; the device keeps its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub person: String,
    pub code: ErrorCode,
    pub message: String,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub docs_sent: u64,
    pub docs_received: u64,
    pub refused: Vec<Refusal>,
    /// People deleted from this device: erased, or no longer assigned to its worker.
    pub purged: u64,
    /// Documents reconciled with automerge's sync protocol (self-healing).
    pub reconciled: u64,
    /// Websocket frames (headers included) after the upgrade, each way, counted at the socket.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The HTTP upgrade request and response.
    pub upgrade_bytes_up: u64,
    pub upgrade_bytes_down: u64,
    pub frames_up: u64,
    pub frames_down: u64,
    /// Times the device waited on the server with nothing left to send.
    pub round_trips: u64,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the server at {url}: {reason} (check the network; nothing was lost, sync again later)")]
    Connect { url: String, reason: String },
    #[error("the server URL {url:?} cannot be used: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the server at {url} could not be verified ({reason}): check the server URL and the certificate the app trusts; syncing again will not help")]
    Untrusted { url: String, reason: String },
    #[error("the server refused the connection ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("the phone's clock differs too much from the server's ({server_time}); set the clock")]
    ClockSkew { server_time: i64 },
    #[error("this device is not enrolled yet: enroll it with a code from your coordinator")]
    NotEnrolled,
    #[error("enrollment failed ({status}): {message}")]
    Enrollment { status: u16, message: String },
    #[error("this device is enrolled already, for worker {worker} of {org}; nothing was changed (a phone for another worker needs a store of its own)")]
    AlreadyEnrolled { org: String, worker: String },
    #[error("the connection dropped during sync; what was acknowledged is kept, sync again to finish")]
    Dropped,
    #[error("the server did not answer within {0:?}; sync again to finish")]
    Timeout(Duration),
    #[error("the server sent something this device cannot read: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server ended the sync: {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("this device was revoked and its records have been deleted: {message}")]
    Wiped { message: String },
    #[error(transparent)]
    Local(#[from] CoreError),
}

/// A live connection: the device stays connected, receives what teammates sync as it arrives,
/// and pushes what is recorded here at once. Dropping the handle disconnects.
pub struct LiveSync {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<SyncReport, SyncError>>>,
}

impl LiveSync {
    pub(crate) fn new(stop: tokio::sync::oneshot::Sender<()>, task: tokio::task::JoinHandle<Result<SyncReport, SyncError>>) -> Self {
        Self { stop: Some(stop), task: Some(task) }
    }

    /// Disconnect and return what the connection did.
    pub async fn stop(mut self) -> Result<SyncReport, SyncError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await.map_err(|e| SyncError::Local(CoreError::Task(e.to_string())))?,
            None => Ok(SyncReport::default()),
        }
    }

    /// Whether the connection has ended (an error, or the server went away).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for LiveSync {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// What enrollment established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub org: String,
    pub worker: String,
    pub device: String,
}
