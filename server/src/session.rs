//! One device's sync connection: the server side of the protocol in `peersync_core::protocol`.
//!
//! Generic over [`Conn`] so that it runs over an axum websocket in production and over plain
//! channels in tests.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use peersync_core::protocol::{self, ClientMsg, Cursor, ErrorCode, ServerMsg};
use tokio::sync::watch;

use crate::app::AppState;
use crate::auth::DeviceIdentity;
use crate::docs::{Announcement, DocsBatch, Pushed};
use crate::store::DeviceSync;

/// A download's first batch is smaller: the phone stores it while the rest is on its way,
/// instead of waiting for one large frame and only then starting. (A fresh phone's 46-person
/// restore at 50/2000 on 3g: wall over link limit 1.59-1.67 -> 1.48-1.51, for 2.5% more bytes,
/// as a smaller frame compresses less well.)
const FIRST_DOWNLOAD_BATCH_BYTES: usize = 32 << 10;
/// The batches after it: small enough that a phone stores one while the next is on the link,
/// so that little is left to store once the last byte has arrived. (The same restore: 1.47-1.56
/// with 128 KiB batches, 1.37-1.43 with 48 KiB, for 0.55 -> 0.59 bytes over D; 24 KiB cost
/// 0.64 and was no faster.)
const DOWNLOAD_BATCH_BYTES: usize = 48 << 10;

/// A session with no frame from the device for this long is closed (not in live mode), and so
/// is one whose frame cannot be sent for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub enum Incoming {
    Frame(Vec<u8>),
    /// A text frame: not part of the protocol.
    Text,
    Closed,
    /// The connection failed: a frame the websocket layer could not read, or the network.
    Broken(String),
}

/// A framed, bidirectional connection.
pub trait Conn: Send {
    fn recv(&mut self) -> impl Future<Output = Incoming> + Send;
    /// False once the connection is gone.
    fn send(&mut self, frame: Vec<u8>) -> impl Future<Output = bool> + Send;
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("the device was revoked")]
    Revoked,
    #[error("{code}: {message}")]
    Protocol { code: ErrorCode, message: String },
    #[error("connection closed")]
    Gone,
    #[error("connection failed: {0}")]
    Broken(String),
}

impl SessionEnd {
    fn protocol(code: ErrorCode, message: impl Into<String>) -> Self {
        SessionEnd::Protocol { code, message: message.into() }
    }
}

impl From<peersync_core::StoreError> for SessionEnd {
    fn from(e: peersync_core::StoreError) -> Self {
        tracing::error!(error = %e, "storage failed during sync");
        SessionEnd::protocol(ErrorCode::Internal, "the server could not store or read data; try again later")
    }
}

struct Session<C: Conn> {
    conn: C,
    state: Arc<AppState>,
    who: DeviceIdentity,
    cursor: Cursor,
    cursor_known: bool,
    hello_seen: bool,
    live: bool,
    /// An exchange is complete once its download has been sent.
    exchanged: bool,
    /// This connection has completed an exchange (a live one goes on to others).
    synced: bool,
    /// Documents pushed in this connection that the server sent to reconciliation, until the
    /// server holds all the device has of them.
    need_sync: HashSet<String>,
    /// Of those, how many caught up since the last sync record.
    caught_up: u64,
    /// The sync record this session last wrote.
    last_record: Option<DeviceSync>,
    pushed: Pushed,
    sync_rounds: crate::docs::SyncRounds,
    started: Instant,
    /// The newest sync record of this device this session knows of (its own, or none newer than
    /// the connection): a newer one was written by another connection of the device.
    record_seen: chrono::DateTime<chrono::Utc>,
    docs_in: u64,
    docs_out: u64,
    docs_stored: u64,
    /// People written and read during the current exchange, for the audit log.
    written: Vec<String>,
    read: Vec<String>,
}

pub async fn run<C: Conn>(mut conn: C, state: Arc<AppState>, who: DeviceIdentity, mut shutdown: watch::Receiver<bool>) {
    state.metrics.connections_total.fetch_add(1, Relaxed);
    if who.revoked {
        // A lost or stolen phone: tell it to delete everything, and nothing else.
        state.audit_device(&who, "wipe", vec![], true, "revoked device connected and was told to wipe");
        if let Ok(frame) = protocol::encode(&ServerMsg::Wipe { message: "this device was revoked by a coordinator".into() }) {
            conn.send(frame).await;
        }
        conn.close().await;
        return;
    }
    state.metrics.connections_active.fetch_add(1, Relaxed);
    let mut announcements = state.hub.subscribe();
    let mut s = Session {
        conn,
        state: state.clone(),
        who,
        cursor: Cursor::START,
        cursor_known: true,
        hello_seen: false,
        live: false,
        exchanged: false,
        synced: false,
        need_sync: HashSet::new(),
        caught_up: 0,
        last_record: None,
        pushed: Pushed::new(),
        sync_rounds: Default::default(),
        started: Instant::now(),
        record_seen: chrono::Utc::now(),
        docs_in: 0,
        docs_out: 0,
        docs_stored: 0,
        written: Vec::new(),
        read: Vec::new(),
    };
    let end = loop {
        // A device revoked while connected (a phone reported lost mid-session) is cut off at
        // its next frame, or at once if it is live (the revocation is announced).
        let idle = if s.live && s.exchanged { Duration::MAX } else { IDLE_TIMEOUT };
        tokio::select! {
            incoming = tokio::time::timeout(idle, s.conn.recv()) => {
                let step = match incoming {
                    Err(_) => Err(SessionEnd::protocol(ErrorCode::Timeout, "no frame for too long")),
                    Ok(Incoming::Closed) => Err(SessionEnd::Gone),
                    Ok(Incoming::Broken(e)) => Err(SessionEnd::Broken(e)),
                    Ok(Incoming::Text) => Err(SessionEnd::protocol(ErrorCode::BadFrame, "text frames are not part of the protocol; send binary frames")),
                    Ok(Incoming::Frame(bytes)) => match s.still_enrolled() {
                        Ok(()) => s.on_frame(bytes).await,
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = step { break e; }
            }
            note = announcements.recv(), if s.live && s.exchanged => {
                let relevant = match note {
                    Ok(Announcement { revoked: Some(device), .. }) if device == s.who.device => break SessionEnd::Revoked,
                    Ok(Announcement { revoked: Some(_), .. }) => false,
                    Ok(a) => a.org == s.who.org && a.seq > s.cursor.seq,
                    // Missed some: catch up from the cursor all the same.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => false,
                };
                if relevant {
                    if let Err(e) = s.still_enrolled() { break e; }
                    if let Err(e) = s.send_download(s.cursor, HashSet::new(), false).await { break e; }
                }
            }
            _ = shutdown.changed() => {
                break SessionEnd::protocol(ErrorCode::ShuttingDown, "the server is shutting down; sync again shortly");
            }
        }
    };
    // Losing the connection, or its going quiet, is routine once the session has completed a
    // sync (a phone that closes after it, or a live one put away with a push in flight: what
    // it recorded stays pending on it); before that it is what a weak 2G signal looks like, and
    // sync health shows it.
    let unfinished = match &end {
        SessionEnd::Gone if !s.synced => Some("the connection was lost before the sync finished".to_string()),
        SessionEnd::Broken(e) if !s.synced => Some(format!("the connection broke off before the sync finished ({e})")),
        _ => None,
    };
    if let Some(error) = unfinished {
        state.metrics.errors.fetch_add(1, Relaxed);
        tracing::info!(device = %s.who.device, %error, "sync session ended early");
        s.record_error(error).await;
    }
    match &end {
        SessionEnd::Gone | SessionEnd::Broken(_) => {}
        SessionEnd::Revoked => {
            state.audit_device(&s.who, "wipe", vec![], true, "device revoked while connected; told to wipe");
            if let Ok(frame) = protocol::encode(&ServerMsg::Wipe { message: "this device was revoked by a coordinator".into() }) {
                s.send_raw(frame).await;
            }
        }
        SessionEnd::Protocol { code, message } => {
            let routine = *code == ErrorCode::ShuttingDown || (*code == ErrorCode::Timeout && s.synced);
            if !routine {
                state.metrics.errors.fetch_add(1, Relaxed);
                tracing::info!(device = %s.who.device, %code, %message, "sync session ended with an error");
                s.record_error(format!("{code}: {message}")).await;
            }
            let frame = protocol::encode(&ServerMsg::Error { code: *code, message: message.clone() });
            if let Ok(frame) = frame {
                s.send_raw(frame).await;
            }
        }
    }
    // What the session wrote or sent outside a recorded exchange (an exchange cut off
    // part-way, or reconciliation after the download) is audited all the same.
    if !s.written.is_empty() || !s.read.is_empty() {
        s.audit_pending(true).await;
    }
    s.conn.close().await;
    state.metrics.connections_active.fetch_sub(1, Relaxed);
}

impl<C: Conn> Session<C> {
    fn still_enrolled(&self) -> Result<(), SessionEnd> {
        match self.state.dir.device(&self.who.device) {
            Ok(Some(d)) if d.revoked_at.is_none() => Ok(()),
            Ok(_) => Err(SessionEnd::Revoked),
            Err(e) => Err(SessionEnd::from(e)),
        }
    }

    /// False once the connection is gone, or if the frame found no room for as long as a
    /// device may stay silent (a phone that stopped reading, on a link that still holds the
    /// connection open): the session then ends instead of waiting on it for ever.
    async fn send_raw(&mut self, frame: Vec<u8>) -> bool {
        self.state.metrics.frames_out.fetch_add(1, Relaxed);
        self.state.metrics.bytes_out.fetch_add(frame.len() as u64, Relaxed);
        tokio::time::timeout(IDLE_TIMEOUT, self.conn.send(frame)).await.unwrap_or(false)
    }

    async fn send(&mut self, msg: &ServerMsg) -> Result<(), SessionEnd> {
        let frame = protocol::encode(msg).map_err(|e| SessionEnd::protocol(ErrorCode::Internal, e.to_string()))?;
        if self.send_raw(frame).await { Ok(()) } else { Err(SessionEnd::Gone) }
    }

    async fn on_frame(&mut self, bytes: Vec<u8>) -> Result<(), SessionEnd> {
        self.state.metrics.frames_in.fetch_add(1, Relaxed);
        self.state.metrics.bytes_in.fetch_add(bytes.len() as u64, Relaxed);
        let msg: ClientMsg = protocol::decode(&bytes).map_err(|e| SessionEnd::protocol(e.code(), e.to_string()))?;
        match msg {
            ClientMsg::Hello { cursor, live, docs, more } => {
                if self.hello_seen {
                    return Err(SessionEnd::protocol(ErrorCode::Unexpected, "a second Hello on one connection"));
                }
                self.hello_seen = true;
                self.live = live;
                self.cursor = cursor;
                let (state, org, device) = (self.state.clone(), self.who.org.clone(), self.who.device.clone());
                let (known, recorded) = blocking(move || {
                    let known = state.hub.cursor_known(&org, cursor)?;
                    Ok((known, state.hub.store().device(&org, &device)?.map_or(0, |r| r.cursor)))
                })
                .await?;
                self.cursor_known = known;
                // Writes are judged from the later of the cursor the phone presents and the one
                // recorded when it last synced (or enrolled): a phone that presents an older
                // cursor is not given back a person taken from its worker since. Downloads
                // still start from the cursor presented: that is what the phone holds.
                self.who.since = cursor.seq.max(recorded);
                self.push(docs, more).await
            }
            ClientMsg::Push { docs, more } => {
                self.require_hello()?;
                if self.exchanged {
                    // A new exchange on a live connection: what the last one sent to
                    // reconciliation was settled by its own rounds.
                    self.need_sync.clear();
                    self.caught_up = 0;
                }
                self.exchanged = false;
                self.push(docs, more).await
            }
            ClientMsg::Sync { msgs } => {
                self.require_hello()?;
                if msgs.len() > protocol::MAX_SYNC_DOCS {
                    return Err(SessionEnd::protocol(
                        ErrorCode::TooLarge,
                        format!("a Sync frame names {} documents, more than the {} one may", msgs.len(), protocol::MAX_SYNC_DOCS),
                    ));
                }
                // What automerge would inflate is looked at first, outside the writers' lock.
                let (msgs, refused) = blocking(move || {
                    let refused = crate::chunks::check_sync_frame(&msgs);
                    Ok((msgs, refused))
                })
                .await?;
                for (doc, why) in &refused {
                    tracing::warn!(org = %self.who.org, device = %self.who.device, %doc, %why, "a sync message not taken");
                }
                let refused: HashSet<String> = refused.into_iter().map(|(doc, _)| doc).collect();
                let (state, who) = (self.state.clone(), self.who.clone());
                let mut rounds = std::mem::take(&mut self.sync_rounds);
                let gate = self.state.write_gate.lock().await;
                let (outcome, rounds) = blocking(move || {
                    let r = state.hub.sync_round(&who, state.access.as_ref(), msgs, &refused, &mut rounds);
                    r.map(|r| (r, rounds))
                })
                .await?;
                drop(gate);
                self.sync_rounds = rounds;
                self.written.extend(outcome.stored);
                self.read.extend(outcome.sent);
                if let Some((doc, size)) = outcome.too_large {
                    return Err(SessionEnd::protocol(
                        ErrorCode::TooLarge,
                        format!("the record of {doc} would grow to {size} bytes, over the {} one record may hold; it stays on the phone", protocol::MAX_DOC_BYTES),
                    ));
                }
                let reconciled = outcome.caught_up.iter().filter(|d| self.need_sync.remove(*d)).count() as u64;
                if reconciled > 0 {
                    self.reconciled(reconciled).await;
                }
                if !outcome.erased.is_empty() {
                    // Purged now, before the round's answer; the cursor stays where it is.
                    for d in &outcome.erased {
                        self.need_sync.remove(d);
                    }
                    let purge = ServerMsg::Docs { docs: vec![], purge: outcome.erased, cursor: self.cursor, remaining: 0, done: false };
                    self.send(&purge).await?;
                }
                self.send(&ServerMsg::Sync { msgs: outcome.replies }).await
            }
            ClientMsg::Fetch { skip } => {
                self.require_hello()?;
                self.cursor_known = true;
                self.send_download(Cursor::START, skip.into_iter().collect(), true).await
            }
        }
    }

    fn require_hello(&self) -> Result<(), SessionEnd> {
        if self.hello_seen { Ok(()) } else { Err(SessionEnd::protocol(ErrorCode::Unexpected, "the first frame must be Hello")) }
    }

    async fn push(&mut self, docs: Vec<protocol::DocPush>, more: bool) -> Result<(), SessionEnd> {
        if !docs.is_empty() {
            self.docs_in += docs.len() as u64;
            self.state.metrics.docs_received.fetch_add(docs.len() as u64, Relaxed);
            let (state, who) = (self.state.clone(), self.who.clone());
            let mut pushed = std::mem::take(&mut self.pushed);
            // Held until the commit: it bounds the batches whose documents are loaded at once.
            let permit = self.state.push_gate.acquire().await.map_err(|e| SessionEnd::protocol(ErrorCode::Internal, e.to_string()))?;
            let prepared = blocking(move || state.hub.prepare_push(&who, state.access.as_ref(), docs)).await?;
            let gate = self.state.write_gate.lock().await;
            let (state, who) = (self.state.clone(), self.who.clone());
            let (committed, pushed) = blocking(move || {
                let committed = state.hub.commit_push(&who, state.access.as_ref(), prepared, &mut pushed);
                committed.map(|c| (c, pushed))
            })
            .await?;
            drop(gate);
            drop(permit);
            // Outside both gates: sessions that committed meanwhile share this disk flush.
            let state = self.state.clone();
            blocking(move || state.hub.flush()).await?;
            self.pushed = pushed;
            let acks = committed.acks;
            let stored: Vec<String> = acks.iter().filter(|a| a.status == protocol::AckStatus::Stored).map(|a| a.doc.clone()).collect();
            self.docs_stored += stored.len() as u64;
            self.need_sync.extend(acks.iter().filter(|a| a.status == protocol::AckStatus::NeedSync).map(|a| a.doc.clone()));
            // What was acknowledged, and what a push answered `NeedSync` stored before it
            // stopped at a missing change (the audit names each person once).
            self.written.extend(stored);
            self.written.extend(committed.written);
            let refused: Vec<String> = acks.iter().filter(|a| matches!(a.status, protocol::AckStatus::Refused { .. })).map(|a| a.doc.clone()).collect();
            if !refused.is_empty() {
                self.state.audit_device(&self.who, "write", refused, false, "push refused (not assigned, erased or invalid)");
            }
            self.send(&ServerMsg::Acks { acks }).await?;
        }
        if more {
            return Ok(());
        }
        if !self.cursor_known {
            return self.send(&ServerMsg::CursorUnknown).await;
        }
        let since = self.cursor;
        self.send_download(since, HashSet::new(), true).await
    }

    /// Stream what the device lacks since `since` in bounded batches; the last carries `done`.
    /// Each batch is produced on a blocking thread under the download gate, which is released
    /// before the batch is sent: a phone on a slow link holds no thread while it reads.
    async fn send_download(&mut self, since: Cursor, skip: HashSet<String>, record: bool) -> Result<(), SessionEnd> {
        let pushed = Arc::new(std::mem::take(&mut self.pushed));
        let skip = Arc::new(skip);
        let (state, who) = (self.state.clone(), self.who.clone());
        let mut download = blocking(move || state.hub.start_download(&who, state.access.as_ref(), since)).await?;
        // Hold one batch back so the last one can be marked `done`.
        let mut pending: Option<DocsBatch> = None;
        let mut first = true;
        loop {
            let target = if std::mem::take(&mut first) { FIRST_DOWNLOAD_BATCH_BYTES } else { DOWNLOAD_BATCH_BYTES };
            let permit = self.state.download_gate.acquire().await.map_err(|e| SessionEnd::protocol(ErrorCode::Internal, e.to_string()))?;
            let (state, who, pushed, skip) = (self.state.clone(), self.who.clone(), pushed.clone(), skip.clone());
            let (batch, back) = blocking(move || {
                let b = state.hub.next_batch(&mut download, &who, state.access.as_ref(), &pushed, &skip, target);
                b.map(|b| (b, download))
            })
            .await?;
            drop(permit);
            download = back;
            let Some(batch) = batch else { break };
            if let Some(prev) = pending.replace(batch) {
                let msg = self.sending(prev, false);
                self.send(&msg).await?;
            }
        }
        let last = pending.ok_or_else(|| SessionEnd::protocol(ErrorCode::Internal, "a download ended without its last batch"))?;
        let msg = self.sending(last, true);
        // The exchange's sync record goes in before the device gets its `done`: a coordinator
        // who looks at sync health once the phone says it synced sees this sync. It is made
        // durable after sending, so the phone does not wait for the disk.
        let recorded = if record { self.record_device() } else { None };
        if let Err(e) = self.send(&msg).await {
            // Not delivered: the device will fetch the batch again, so the sync did not happen.
            if let Some((previous, written)) = recorded {
                self.undo_record(previous, written).await;
            }
            return Err(e);
        }
        self.exchanged = true;
        self.synced = true;
        // The exchange's audit entries, made durable with its sync record by one flush; reads
        // forwarded to a live phone are audited as they go (not at its next sync), durable at
        // the store's next flush, so a team's change costs no disk sync per connected phone.
        self.audit_pending(record).await;
        Ok(())
    }

    /// Audit what this session wrote and sent since it last did (deferred), then, if
    /// `durable`, flush the store: those entries and any deferred sync record with them.
    async fn audit_pending(&mut self, durable: bool) {
        let (written, read) = (std::mem::take(&mut self.written), std::mem::take(&mut self.read));
        if written.is_empty() && read.is_empty() && !durable {
            return;
        }
        let (state, who) = (self.state.clone(), self.who.clone());
        let r = tokio::task::spawn_blocking(move || {
            audit_exchange(&state, &who, written, read);
            if durable { state.hub.flush() } else { Ok(()) }
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "could not make the exchange's audit entries and sync record durable");
        }
    }

    /// Count batch `b` as sent and make it a message.
    fn sending(&mut self, b: DocsBatch, done: bool) -> ServerMsg {
        self.docs_out += b.docs.len() as u64;
        self.state.metrics.docs_sent.fetch_add(b.docs.len() as u64, Relaxed);
        self.cursor = b.cursor;
        self.who.since = self.who.since.max(b.cursor.seq);
        self.read.extend(b.docs.iter().map(|d| d.doc.clone()));
        ServerMsg::Docs { docs: b.docs, purge: b.purge, cursor: b.cursor, remaining: b.remaining, done }
    }

    /// Put back the sync record `written` replaced (the session's end records why), unless a
    /// later sync of the device, on another connection while this one's last send hung, has
    /// replaced it since.
    async fn undo_record(&mut self, previous: DeviceSync, written: DeviceSync) {
        self.change_record(false, move |current| (current == Some(written)).then_some(previous)).await;
    }

    /// [`update_record`] on a blocking thread, then, if `durable`, a flush.
    async fn change_record(&mut self, durable: bool, change: impl FnOnce(Option<DeviceSync>) -> Option<DeviceSync> + Send + 'static) -> Option<DeviceSync> {
        let (state, who) = (self.state.clone(), self.who.clone());
        let r = tokio::task::spawn_blocking(move || {
            let info = update_record(&state, &who, change)?;
            if durable && info.is_some() {
                state.hub.flush()?;
            }
            Ok::<_, peersync_core::StoreError>(info)
        })
        .await;
        match r {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not update the device's sync record");
                None
            }
            Err(_) => None,
        }
    }

    /// Remember the error that ended this device's sync, for the dashboard's sync health;
    /// not if the device has since completed a sync on another connection.
    async fn record_error(&mut self, error: String) {
        let seen = self.record_seen;
        self.change_record(true, move |current| {
            let info = current.unwrap_or_default();
            if info.last_sync_at.is_some_and(|at| at > seen) {
                return None;
            }
            Some(DeviceSync { last_error: Some(error), last_error_at: Some(chrono::Utc::now()), ..info })
        })
        .await;
    }

    /// Write this exchange's sync record (durable at the next flush); returns the record it
    /// replaced and the one it wrote, if it could. It runs on the session's own task, not a
    /// blocking thread: it is a read and a write of one small key, and it sits between the
    /// phone and its `done`, where a hop to another thread on a busy server can cost more than
    /// the work. The exchange's audit entries wait until after the `done`.
    fn record_device(&mut self) -> Option<(DeviceSync, DeviceSync)> {
        self.state.metrics.observe_sync(self.started.elapsed());
        let pending = self.docs_in.saturating_sub(self.docs_stored + self.caught_up);
        let (cursor, docs_in, docs_out) = (self.cursor.seq, self.docs_in, self.docs_out);
        let mut previous = DeviceSync::default();
        let r = update_record(&self.state, &self.who, |current| {
            previous = current.unwrap_or_default();
            Some(DeviceSync {
                cursor,
                last_sync_at: Some(chrono::Utc::now()),
                docs_received: docs_in,
                docs_sent: docs_out,
                pending,
                // Keep the last error visible until a later one replaces it.
                last_error: previous.last_error.clone(),
                last_error_at: previous.last_error_at,
            })
        });
        let recorded = match r {
            Ok(Some(info)) => {
                self.record_seen = info.last_sync_at.unwrap_or(self.record_seen);
                self.last_record = Some(info.clone());
                Some((previous, info))
            }
            // The change above always writes: no record means the store failed.
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "could not record device sync");
                }
                self.last_record = None;
                None
            }
        };
        self.started = Instant::now();
        self.docs_in = 0;
        self.docs_out = 0;
        self.docs_stored = 0;
        self.caught_up = 0;
        recorded
    }

    /// `n` documents the exchange sent to reconciliation are now held by the server in full:
    /// no longer pending on the phone. Counted into the next sync record, or, once this
    /// exchange's record is written (reconciliation follows the download), taken off it.
    async fn reconciled(&mut self, n: u64) {
        if !self.exchanged {
            self.caught_up += n;
            return;
        }
        // No record of this exchange to correct (writing it failed): nothing to take off.
        let Some(written) = self.last_record.clone().filter(|r| r.pending > 0) else { return };
        // Deferred: durable at the store's next flush, like the record itself.
        let corrected = self
            .change_record(false, move |current| (current.as_ref() == Some(&written)).then(|| DeviceSync { pending: written.pending.saturating_sub(n), ..written.clone() }))
            .await;
        if corrected.is_some() {
            self.last_record = corrected;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, peersync_core::StoreError> + Send + 'static,
) -> Result<T, SessionEnd> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(SessionEnd::from),
        Err(e) => Err(SessionEnd::protocol(ErrorCode::Internal, format!("task failed: {e}"))),
    }
}

/// Read `who`'s sync record and, if `change` returns a new one, write it (durable at the
/// store's next flush); returns what was written. Under `AppState::device_records`, so that two
/// connections of one device cannot interleave (one putting back an older record). A poisoned
/// lock only means another session's thread panicked while holding it: the record is whole.
fn update_record(
    state: &AppState,
    who: &DeviceIdentity,
    change: impl FnOnce(Option<DeviceSync>) -> Option<DeviceSync>,
) -> Result<Option<DeviceSync>, peersync_core::StoreError> {
    let _records = state.device_records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let store = state.hub.store();
    let Some(info) = change(store.device(&who.org, &who.device)?) else { return Ok(None) };
    store.put_device(&who.org, &who.device, &info)?;
    Ok(Some(info))
}

/// A newly enrolled device's sync record: nothing synced yet, its cursor at the log's head. A
/// device enrolled now never held anyone taken from its worker before now, so presenting the
/// start of the log does not let it write to them (see `DeviceIdentity::since`). A record that
/// exists (the same phone enrolling again) is left as it is. Durable before it returns.
pub(crate) fn start_record(state: &AppState, org: &str, device: &str) -> Result<(), peersync_core::StoreError> {
    let store = state.hub.store();
    {
        let _records = state.device_records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if store.device(org, device)?.is_some() {
            return Ok(());
        }
        store.put_device(org, device, &DeviceSync { cursor: store.head(org)?.seq, ..DeviceSync::default() })?;
    }
    state.hub.flush()
}

/// The audit entries for people a device's exchange wrote and was sent, deferred: durable at
/// the store's next flush.
fn audit_exchange(state: &AppState, who: &DeviceIdentity, written: Vec<String>, read: Vec<String>) {
    let actor = format!("device:{} (worker {})", who.device, who.worker);
    for (action, mut people, what) in [("write", written, "stored"), ("read", read, "sent")] {
        // A person stored or sent in several batches or rounds is one person.
        people.sort();
        people.dedup();
        if !people.is_empty() {
            let n = people.len();
            if let Err(e) = state.audit.record_deferred(&who.org, &actor, action, people, true, format!("{n} person documents {what}")) {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
    }
}
