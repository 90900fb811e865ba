//! The device side of the protocol, independent of the socket: it talks to a [`FrameConn`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use automerge::sync::State as SyncState;

use super::state::PreparedPush;
use super::{Refusal, SyncError, SyncOptions, SyncProgress, SyncReport};
use crate::device::Inner;
use crate::error::CoreError;
use crate::protocol::{self, AckStatus, ClientMsg, DocAck, DocPush, ErrorCode, ServerMsg, TARGET_BATCH_BYTES};

/// Push frames sent ahead of their acknowledgements. Bounds what the server buffers and what a
/// dropped link wastes, while keeping the link busy.
const WINDOW: usize = 4;
/// Reconciliation rounds before giving up (automerge needs two or three).
const MAX_SYNC_ROUNDS: usize = 24;

/// A framed connection to the server, counting what crosses the socket.
pub trait FrameConn: Send {
    fn send(&mut self, frame: Vec<u8>) -> impl Future<Output = Result<(), SyncError>> + Send;
    fn recv(&mut self) -> impl Future<Output = Result<Vec<u8>, SyncError>> + Send;
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// Fill in the byte and frame counts of `report`.
    fn account(&self, report: &mut SyncReport);
}

async fn blocking<T, F>(inner: &Arc<Inner>, f: F) -> Result<T, SyncError>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> Result<T, CoreError> + Send + 'static,
{
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|e| SyncError::Local(CoreError::Task(e.to_string())))?
        .map_err(SyncError::from)
}

struct Engine<'a, C: FrameConn> {
    inner: &'a Arc<Inner>,
    conn: &'a mut C,
    opts: &'a SyncOptions,
    report: SyncReport,
    /// People purged in this sync: one refused push and the server's purge of the same
    /// person are one purge.
    purged: std::collections::HashSet<String>,
}

/// Run one sync exchange over `conn`. Every acknowledged batch and every received batch is
/// durable on the device before the next is handled, so an interrupted sync resumes where it
/// stopped.
pub(crate) async fn run<C: FrameConn>(inner: &Arc<Inner>, conn: &mut C, opts: &SyncOptions) -> Result<SyncReport, SyncError> {
    run_until(inner, conn, opts, None, None).await
}

/// The start of an exchange: what the device will say first, as frames ready to send. It
/// needs no connection, so the device prepares it while the connection is being set up (two
/// round trips, 1.2 s on 2G): the phone's CPU, compression included, works while its radio
/// waits, and the first bytes go out the moment the socket opens.
pub(crate) struct Opening {
    /// The `Hello`, then the `Push` frames after it, each with what it carries: at most
    /// [`WINDOW`] of them.
    frames: Vec<(Vec<u8>, Vec<Sent>)>,
    /// Documents to push after those frames.
    queue: VecDeque<String>,
    /// Documents to push in all.
    total: u64,
}

/// What a push frame carried, per document: id, heads, and the pending mark to clear once the
/// server acknowledges it.
type Sent = (String, Vec<[u8; 32]>, u64);

/// Prepare an exchange's [`Opening`], for a live session or not.
pub(crate) async fn open(inner: &Arc<Inner>, live: bool) -> Result<Opening, SyncError> {
    // Encoding fails with a protocol error, not a store error: it travels inside the result.
    let opening = blocking(inner, move |i| {
        let cursor = i.cursor()?;
        let mut queue: VecDeque<String> = i.to_push()?.into();
        let total = queue.len() as u64;
        let mut batches = Vec::new();
        loop {
            let (batch, rest) = prepare_batch(i, queue)?;
            queue = rest;
            batches.push(batch);
            if queue.is_empty() || batches.len() == WINDOW {
                break;
            }
        }
        let last = batches.len() - 1;
        let frames = batches
            .into_iter()
            .enumerate()
            .map(|(n, batch)| {
                let more = n < last || !queue.is_empty();
                let (docs, sent) = split(batch);
                let msg = if n == 0 { ClientMsg::Hello { cursor, live, docs, more } } else { ClientMsg::Push { docs, more } };
                protocol::encode(&msg).map(|frame| (frame, sent))
            })
            .collect::<Result<Vec<_>, _>>();
        Ok(frames.map(|frames| Opening { frames, queue, total }))
    })
    .await??;
    Ok(opening)
}

/// Pushes from the front of `queue` up to the batch size, in one trip to a blocking thread;
/// returns them and what is left.
fn prepare_batch(inner: &Inner, mut queue: VecDeque<String>) -> Result<(Vec<PreparedPush>, VecDeque<String>), CoreError> {
    let mut batch = Vec::new();
    let mut size = 0;
    while size < TARGET_BATCH_BYTES {
        let Some(id) = queue.pop_front() else { break };
        if let Some(p) = inner.prepare_push(&id)? {
            size += p.push.data.len();
            batch.push(p);
        }
    }
    Ok((batch, queue))
}

/// As [`run`]; with `live` set, stay connected after the exchange: receive what the server
/// forwards and push local changes as they are made, until `live` resolves. `opening`, if
/// given, was prepared while connecting (see [`open`]).
pub(crate) async fn run_until<C: FrameConn>(
    inner: &Arc<Inner>,
    conn: &mut C,
    opts: &SyncOptions,
    live: Option<tokio::sync::oneshot::Receiver<()>>,
    opening: Option<Opening>,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let mut e = Engine { inner, conn, opts, report: SyncReport::default(), purged: Default::default() };
    let result = match live {
        None => e.exchange(false, opening).await,
        Some(stop) => match e.exchange(true, opening).await {
            Ok(()) => e.live(stop).await,
            Err(err) => Err(err),
        },
    };
    e.conn.close().await;
    e.conn.account(&mut e.report);
    e.report.duration_ms = started.elapsed().as_millis() as u64;
    result.map(|()| e.report)
}

impl<C: FrameConn> Engine<'_, C> {
    fn progress(&self, p: SyncProgress) {
        if let Some(o) = &self.opts.observer {
            o.progress(&p);
        }
    }

    async fn send(&mut self, msg: &ClientMsg) -> Result<(), SyncError> {
        let frame = protocol::encode(msg)?;
        self.conn.send(frame).await
    }

    async fn recv(&mut self) -> Result<ServerMsg, SyncError> {
        let frame = self.conn.recv().await?;
        match protocol::decode::<ServerMsg>(&frame)? {
            ServerMsg::Error { code, message } => Err(SyncError::Server { code, message }),
            ServerMsg::Wipe { message } => {
                blocking(self.inner, |i| i.wipe()).await?;
                Err(SyncError::Wiped { message })
            }
            m => Ok(m),
        }
    }

    /// Prepare the next batch of pushes from `queue`, up to the batch size.
    async fn next_batch(&mut self, queue: &mut VecDeque<String>) -> Result<Vec<PreparedPush>, SyncError> {
        let q = std::mem::take(queue);
        let (batch, rest) = blocking(self.inner, move |i| prepare_batch(i, q)).await?;
        *queue = rest;
        Ok(batch)
    }

    async fn exchange(&mut self, live: bool, opening: Option<Opening>) -> Result<(), SyncError> {
        let Opening { frames, mut queue, total } = match opening {
            Some(o) => o,
            None => open(self.inner, live).await?,
        };
        let mut acked_docs = 0u64;
        let mut in_flight: VecDeque<Vec<Sent>> = VecDeque::new();
        let mut all_sent = queue.is_empty();
        for (frame, sent) in frames {
            if !sent.is_empty() {
                in_flight.push_back(sent);
            }
            self.conn.send(frame).await?;
        }

        let mut need_sync = Vec::new();
        let mut downloaded = false;
        let mut recovery = false;
        let mut received = 0u64;
        loop {
            while !all_sent && in_flight.len() < WINDOW {
                let batch = self.next_batch(&mut queue).await?;
                let more = !queue.is_empty();
                let (docs, meta) = split(batch);
                if !docs.is_empty() {
                    in_flight.push_back(meta);
                }
                self.send(&ClientMsg::Push { docs, more }).await?;
                all_sent = !more;
            }
            if downloaded && in_flight.is_empty() && all_sent {
                break;
            }
            match self.recv().await? {
                ServerMsg::Acks { acks } => {
                    let sent = in_flight.pop_front().ok_or_else(|| unexpected("acknowledgement without a push"))?;
                    let (stored, more) = self.on_acks(sent, acks).await?;
                    need_sync.extend(more);
                    acked_docs += stored;
                    self.progress(SyncProgress::Sending { done: acked_docs, total });
                }
                ServerMsg::Docs { docs, purge, cursor, remaining, done } => {
                    received += docs.len() as u64;
                    self.report.docs_received += docs.len() as u64;
                    self.count_purged(&purge);
                    let changed = blocking(self.inner, move |i| i.receive_docs(docs, purge, Some(cursor))).await?;
                    if let (Some(o), false) = (&self.opts.observer, changed.is_empty()) {
                        o.records_changed(&changed);
                    }
                    self.progress(SyncProgress::Receiving { done: received, total: received + remaining as u64 });
                    downloaded = done;
                }
                ServerMsg::CursorUnknown => {
                    recovery = true;
                    downloaded = true;
                }
                ServerMsg::Sync { .. } => return Err(unexpected("sync reply outside reconciliation")),
                ServerMsg::Error { .. } | ServerMsg::Wipe { .. } => unreachable!("recv turns these into Err"),
            }
        }
        self.report.round_trips += 1;

        if recovery {
            // The server's history is not the one this device knows (restored from a backup, or
            // this device's state is): reconcile everything held here, then fetch the rest.
            let all = blocking(self.inner, |i| i.all_docs()).await?;
            self.reconcile(all.clone()).await?;
            self.send(&ClientMsg::Fetch { skip: all }).await?;
            self.report.round_trips += 1;
            loop {
                match self.recv().await? {
                    ServerMsg::Docs { docs, purge, cursor, done, .. } => {
                        self.report.docs_received += docs.len() as u64;
                        self.count_purged(&purge);
                        let changed = blocking(self.inner, move |i| i.receive_docs(docs, purge, Some(cursor))).await?;
                        if let (Some(o), false) = (&self.opts.observer, changed.is_empty()) {
                            o.records_changed(&changed);
                        }
                        if done {
                            break;
                        }
                    }
                    _ => return Err(unexpected("expected documents after Fetch")),
                }
            }
        } else if !need_sync.is_empty() {
            self.reconcile(need_sync).await?;
        }
        Ok(())
    }

    fn count_purged(&mut self, people: &[String]) {
        self.purged.extend(people.iter().cloned());
        self.report.purged = self.purged.len() as u64;
    }

    /// Record what the server did with one batch of pushes: acknowledged heads are stored,
    /// erased people purged, refusals reported. Returns how many were stored and the documents
    /// to reconcile.
    async fn on_acks(&mut self, sent: Vec<Sent>, acks: Vec<DocAck>) -> Result<(u64, Vec<String>), SyncError> {
        let by_doc: HashMap<_, _> = sent.into_iter().map(|(d, h, p)| (d.clone(), (d, h, p))).collect();
        let mut stored = Vec::new();
        let mut need_sync = Vec::new();
        let mut erased = Vec::new();
        for ack in acks {
            let Some(entry) = by_doc.get(&ack.doc) else { continue };
            match ack.status {
                AckStatus::Stored => stored.push(entry.clone()),
                AckStatus::NeedSync => need_sync.push(ack.doc),
                // The person was erased while this phone was offline: what it recorded since
                // must not survive here either.
                AckStatus::Refused { code: ErrorCode::Erased, .. } => erased.push(ack.doc),
                AckStatus::Refused { code, message } => self.report.refused.push(Refusal { person: ack.doc, code, message }),
            }
        }
        let n = stored.len() as u64;
        self.report.docs_sent += n;
        self.count_purged(&erased);
        blocking(self.inner, move |i| {
            i.acknowledge(&stored)?;
            if !erased.is_empty() {
                i.receive_docs(vec![], erased, None)?;
            }
            Ok(())
        })
        .await?;
        Ok((n, need_sync))
    }

    /// Stay connected: apply what the server forwards, push what is recorded here.
    async fn live(&mut self, mut stop: tokio::sync::oneshot::Receiver<()>) -> Result<(), SyncError> {
        let changed_here = self.inner.local_changes.clone();
        let mut in_flight: VecDeque<Vec<Sent>> = VecDeque::new();
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = changed_here.notified() => {
                    let mut queue: VecDeque<String> = blocking(self.inner, |i| i.to_push()).await?.into();
                    while !queue.is_empty() {
                        let batch = self.next_batch(&mut queue).await?;
                        let more = !queue.is_empty();
                        let (docs, meta) = split(batch);
                        if docs.is_empty() && more {
                            continue;
                        }
                        if !docs.is_empty() {
                            in_flight.push_back(meta);
                        }
                        self.send(&ClientMsg::Push { docs, more }).await?;
                    }
                }
                msg = self.recv() => match msg {
                    Ok(ServerMsg::Acks { acks }) => {
                        let sent = in_flight.pop_front().ok_or_else(|| unexpected("acknowledgement without a push"))?;
                        let (_, need_sync) = self.on_acks(sent, acks).await?;
                        self.reconcile(need_sync).await?;
                    }
                    Ok(ServerMsg::Docs { docs, purge, cursor, .. }) => {
                        self.report.docs_received += docs.len() as u64;
                        self.count_purged(&purge);
                        let changed = blocking(self.inner, move |i| i.receive_docs(docs, purge, Some(cursor))).await?;
                        if let (Some(o), false) = (&self.opts.observer, changed.is_empty()) {
                            o.records_changed(&changed);
                        }
                    }
                    Ok(_) => return Err(unexpected("unexpected message while live")),
                    // Quiet is normal while live; the socket is still there.
                    Err(SyncError::Timeout(_)) => continue,
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Automerge's sync protocol for `ids`, all documents in each round, until both sides have
    /// nothing more to say. Documents are marked as held by the server only if it answered for
    /// them (it stays silent about documents it may not read).
    async fn reconcile(&mut self, ids: Vec<String>) -> Result<(), SyncError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.progress(SyncProgress::Reconciling { documents: ids.len() as u64 });
        let mut states: HashMap<String, SyncState> = ids.iter().map(|id| (id.clone(), SyncState::new())).collect();
        let mut confirmed: std::collections::HashSet<String> = Default::default();
        for _ in 0..MAX_SYNC_ROUNDS {
            let (ids2, taken, conf) = (ids.clone(), std::mem::take(&mut states), confirmed.clone());
            let (msgs, back) = blocking(self.inner, move |i| {
                let mut taken = taken;
                let msgs = i.sync_step(&ids2, &mut taken, &conf)?;
                Ok((msgs, taken))
            })
            .await?;
            states = back;
            if msgs.is_empty() {
                self.report.reconciled += confirmed.len() as u64;
                return Ok(());
            }
            // Bounded frames; the server answers each with one `Sync`.
            let mut frames = 0;
            let mut batch = Vec::new();
            let mut size = 0;
            for m in msgs {
                size += m.msg.len();
                batch.push(m);
                if size >= TARGET_BATCH_BYTES || batch.len() == protocol::MAX_SYNC_DOCS {
                    self.send(&ClientMsg::Sync { msgs: std::mem::take(&mut batch) }).await?;
                    frames += 1;
                    size = 0;
                }
            }
            if !batch.is_empty() {
                self.send(&ClientMsg::Sync { msgs: batch }).await?;
                frames += 1;
            }
            self.report.round_trips += 1;
            while frames > 0 {
                let msgs = match self.recv().await? {
                    ServerMsg::Sync { msgs } => {
                        frames -= 1;
                        msgs
                    }
                    // A live connection may get forwarded changes in between.
                    ServerMsg::Docs { docs, purge, cursor, .. } => {
                        self.report.docs_received += docs.len() as u64;
                        blocking(self.inner, move |i| i.receive_docs(docs, purge, Some(cursor))).await?;
                        continue;
                    }
                    _ => return Err(unexpected("expected a sync reply")),
                };
                confirmed.extend(msgs.iter().map(|m| m.doc.clone()));
                let taken = std::mem::take(&mut states);
                states = blocking(self.inner, move |i| {
                    let mut taken = taken;
                    for m in msgs {
                        if let Some(st) = taken.get_mut(&m.doc) {
                            i.sync_receive(&m.doc, st, &m.msg)?;
                        }
                    }
                    Ok(taken)
                })
                .await?;
            }
        }
        Err(SyncError::Server { code: ErrorCode::Internal, message: "reconciliation did not converge".into() })
    }
}

fn split(batch: Vec<PreparedPush>) -> (Vec<DocPush>, Vec<Sent>) {
    let meta = batch.iter().map(|p| (p.push.doc.clone(), p.push.heads.clone(), p.pending_at)).collect();
    (batch.into_iter().map(|p| p.push).collect(), meta)
}

fn unexpected(what: &str) -> SyncError {
    SyncError::Server { code: ErrorCode::Unexpected, message: what.to_string() }
}
