//! [`Device`]: the device core's public API, as an app (through the bindings) sees it.
//!
//! Every write is validated first, then applied to the person's automerge document as one
//! change, then committed to the sealed store together with the person's caseload summary and
//! sync bookkeeping in one atomic, durable batch. A call returns only after that commit; if the
//! commit fails the in-memory copy is dropped so memory never runs ahead of disk.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::ActorId;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::caseload::{FollowUp, PersonSummary};
use crate::clock::Clock;
use crate::document::{PersonDoc, PersonRecord};
use crate::error::{CoreError, ValidationError};
use crate::protocol::MAX_DOC_BYTES;
use crate::listeners::{Fanout, Listeners, Subscription};
use crate::model::{
    Checkin, Consent, ConsentChange, NewCheckin, NewPerson, NewVisit, Person, Visit, VisitEdit, validate_id,
};
use crate::store::{LocalStore, MemoryStore, SealedStore, SledStore, StoredWrite};

/// Appended change chunks are folded into a new snapshot once they hold more than this share
/// of the snapshot's size (or this floor, for small documents). Chunks repeat what a snapshot
/// stores once (actor ids, dependency hashes), so a long tail of them costs flash; compacting
/// in proportion to the snapshot keeps the store near the size of the documents themselves
/// while each write still costs, amortised, a constant multiple of its own size.
const COMPACT_RATIO: f64 = 0.5;
const COMPACT_FLOOR: u64 = 1024;

const META_WORKER: &str = "worker";
const DOC_SUMMARY: &str = "summary";
const DOC_SYNC: &str = "sync";

/// Per-document sync bookkeeping, persisted beside the document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSyncState {
    /// Heads the server is known to hold (hex change hashes).
    pub server_heads: Vec<String>,
    /// Local changes made since the server last acknowledged this document.
    pub pending: u64,
}

/// What this device holds that the server has not acknowledged yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChanges {
    pub documents: u64,
    pub changes: u64,
}

/// How large a record may grow with new entries (visits, check-ins, edits): below the most
/// one record may hold ([`MAX_DOC_BYTES`], what fits a frame), so that a full record still
/// takes the person's changes of consent, and a teammate's entries merged in still fit.
pub(crate) const RECORD_WRITE_LIMIT: usize = MAX_DOC_BYTES - (256 << 10);

/// What a write is, for [`Inner::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Recorded on this phone: pending until the server has it, and bounded in size.
    Record,
    /// The person's word on consent: pending like a record, and taken however full it is.
    Consent,
    /// From another phone (an imported document): not pending.
    Import,
}

/// Where a change to a document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Made on this device: pending until the server acknowledges it.
    Local,
    /// Received from the server.
    Server,
    /// Received some other way (an exported document).
    Peer,
}

/// A change applied in memory whose store writes are ready to commit.
pub(crate) struct Staged {
    id: String,
    pub(crate) writes: Vec<StoredWrite>,
    new_chunks: u64,
    new_bytes: u64,
    /// The new snapshot's size, if this change compacted the document.
    compacted: Option<u64>,
    summary: Option<PersonSummary>,
    sync: DocSyncState,
}

pub(crate) fn hex_heads(heads: &[automerge::ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

impl Loaded {
    pub(crate) fn new(doc: PersonDoc) -> Self {
        Self { doc, next_seq: 0, appended: 0, snapshot: 0 }
    }
}

pub(crate) struct Loaded {
    pub(crate) doc: PersonDoc,
    next_seq: u64,
    /// Bytes of the chunks appended since the last snapshot.
    appended: u64,
    /// Bytes of the last snapshot.
    snapshot: u64,
}

pub(crate) struct State {
    pub(crate) worker: Option<String>,
    pub(crate) docs: HashMap<String, Loaded>,
    pub(crate) summaries: BTreeMap<String, PersonSummary>,
    pub(crate) sync: HashMap<String, DocSyncState>,
    /// Set once the device has been wiped: every call fails from then on.
    pub(crate) wiped: bool,
}

pub(crate) struct Inner {
    pub(crate) store: SealedStore,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) actor: ActorId,
    /// Seconds to add to the phone's clock for signed tokens (learned from the server).
    pub(crate) clock_offset: std::sync::atomic::AtomicI64,
    /// Woken by every local change, for live sync.
    pub(crate) local_changes: Arc<tokio::sync::Notify>,
    /// The app's subscribers (see [`Device::subscribe`]).
    pub(crate) listeners: Arc<Listeners>,
    // A std Mutex: held only for short, synchronous work inside spawn_blocking, never across
    // an await.
    state: Mutex<State>,
}

/// A worker's phone: its encrypted store of person documents and the calls an app makes.
/// Cheap to clone; every clone is the same device. Safe to call from any thread.
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<Inner>,
    sync_lock: Arc<tokio::sync::Mutex<()>>,
    /// Enrollment attempts, one at a time (not the sync lock: a live sync holds that).
    enroll_lock: Arc<tokio::sync::Mutex<()>>,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data types always serialize")
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, CoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        CoreError::Store(crate::error::StoreError::Corrupt { key: what.to_string(), reason: e.to_string() })
    })
}

async fn blocking<T, F>(f: F) -> Result<T, CoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| CoreError::Task(e.to_string()))?
}

impl Device {
    /// Open (or create) the store at `path`, sealed with the app's 32-byte `key`.
    pub async fn open(path: impl AsRef<Path>, key: &[u8], clock: Arc<dyn Clock>) -> Result<Device, CoreError> {
        // A wrong-sized key, or no path at all (which would put the store in the process's
        // working directory), is refused before anything is created on disk.
        crate::crypto::Cipher::new(key)?;
        if path.as_ref().as_os_str().is_empty() {
            return Err(ValidationError::new("path", "is empty: give the directory the store lives in").into());
        }
        let path = path.as_ref().to_path_buf();
        let key = key.to_vec();
        blocking(move || {
            let backend = SledStore::open(&path)?;
            Self::with_store(Box::new(backend), &key, clock)
        })
        .await
    }

    /// A device whose store lives in memory only (tests, previews).
    pub fn in_memory(key: &[u8], clock: Arc<dyn Clock>) -> Result<Device, CoreError> {
        Self::with_store(Box::new(MemoryStore::new()), key, clock)
    }

    /// A device over any [`LocalStore`] backend.
    pub fn with_store(backend: Box<dyn LocalStore>, key: &[u8], clock: Arc<dyn Clock>) -> Result<Device, CoreError> {
        let store = SealedStore::open(backend, key)?;
        // A fresh automerge actor for every open: a store restored from a backup must never
        // reuse (actor, seq) pairs it already sent to the server with other content.
        let actor = ActorId::random();
        let worker = match store.meta(META_WORKER)? {
            Some(b) => Some(String::from_utf8(b).map_err(|_| CoreError::document("worker", "not UTF-8"))?),
            None => None,
        };
        let mut summaries = BTreeMap::new();
        for (id, bytes) in store.doc_meta_all(DOC_SUMMARY)? {
            summaries.insert(id, from_json::<PersonSummary>("summary", &bytes)?);
        }
        let mut sync = HashMap::new();
        for (id, bytes) in store.doc_meta_all(DOC_SYNC)? {
            sync.insert(id, from_json::<DocSyncState>("sync", &bytes)?);
        }
        Ok(Device {
            sync_lock: Arc::new(tokio::sync::Mutex::new(())),
            enroll_lock: Arc::new(tokio::sync::Mutex::new(())),
            inner: Arc::new(Inner {
                store,
                clock,
                actor,
                local_changes: Arc::new(tokio::sync::Notify::new()),
                listeners: Arc::new(Listeners::default()),
                clock_offset: std::sync::atomic::AtomicI64::new(0),
                state: Mutex::new(State { worker, docs: HashMap::new(), summaries, sync, wiped: false }),
            }),
        })
    }

    /// The worker this phone records for, once enrolled.
    pub fn worker(&self) -> Option<String> {
        self.inner.lock().worker.clone()
    }

    /// Set the worker this phone records for (enrollment does this).
    pub async fn set_worker(&self, worker_id: &str) -> Result<(), CoreError> {
        validate_id("worker", worker_id)?;
        let inner = self.inner.clone();
        let worker = worker_id.to_string();
        blocking(move || {
            inner.store.commit(vec![StoredWrite::Meta { name: META_WORKER.into(), value: worker.clone().into_bytes() }])?;
            inner.lock().worker = Some(worker);
            Ok(())
        })
        .await
    }

    /// Call `listener` for every change of records on this device (local writes and what sync
    /// brings) and for the progress and state of every sync, until the returned subscription
    /// is cancelled or dropped.
    pub fn subscribe(&self, listener: Arc<dyn crate::sync::SyncObserver>) -> Subscription {
        self.inner.listeners.add(listener)
    }

    /// Tell subscribers that these people's records changed, once the write is durable.
    fn changed<T>(&self, person: &str, result: Result<T, CoreError>) -> Result<T, CoreError> {
        if result.is_ok() {
            self.inner.listeners.records_changed(&[person.to_string()]);
        }
        result
    }

    pub async fn register_person(&self, p: NewPerson) -> Result<Person, CoreError> {
        let inner = self.inner.clone();
        let person = blocking(move || inner.register_person(p)).await?;
        self.inner.listeners.records_changed(std::slice::from_ref(&person.id));
        Ok(person)
    }

    pub async fn record_visit(&self, person: &str, v: NewVisit) -> Result<Visit, CoreError> {
        let inner = self.inner.clone();
        let id = person.to_string();
        self.changed(person, blocking(move || inner.record_visit(&id, v)).await)
    }

    pub async fn record_checkin(&self, person: &str, c: NewCheckin) -> Result<Checkin, CoreError> {
        let inner = self.inner.clone();
        let id = person.to_string();
        self.changed(person, blocking(move || inner.record_checkin(&id, c)).await)
    }

    /// Amend a visit; returns the visit as it now reads on this device.
    pub async fn edit_visit(&self, person: &str, visit: &str, edit: VisitEdit) -> Result<Visit, CoreError> {
        let inner = self.inner.clone();
        let (id, visit) = (person.to_string(), visit.to_string());
        self.changed(person, blocking(move || inner.edit_visit(&id, &visit, edit)).await)
    }

    /// Record a change of consent the person gave now: the fields `change` sets, as a statement
    /// of its own (see `document`). Returns the consent that holds with it: changes resolve by
    /// time, also against those made on other phones.
    pub async fn set_consent(&self, person: &str, change: ConsentChange) -> Result<Consent, CoreError> {
        let inner = self.inner.clone();
        let id = person.to_string();
        self.changed(person, blocking(move || inner.set_consent(&id, change)).await)
    }

    /// The caseload: one summary per person on this device, ordered by person id.
    pub async fn people(&self) -> Result<Vec<PersonSummary>, CoreError> {
        let st = self.inner.lock();
        self.inner.check_not_wiped(&st)?;
        Ok(st.summaries.values().cloned().collect())
    }

    /// Everything this device holds about one person.
    pub async fn person(&self, id: &str) -> Result<PersonRecord, CoreError> {
        let inner = self.inner.clone();
        let id = id.to_string();
        blocking(move || {
            let mut st = inner.lock();
            inner.loaded(&mut st, &id)?.doc.record()
        })
        .await
    }

    /// People whose follow-up date (set at their most recent visit) is on or before `on`,
    /// earliest first.
    pub async fn follow_ups_due(&self, on: NaiveDate) -> Result<Vec<FollowUp>, CoreError> {
        let st = self.inner.lock();
        self.inner.check_not_wiped(&st)?;
        let mut due: Vec<_> = st.summaries.values().filter_map(|s| s.follow_up_due(on)).collect();
        drop(st);
        due.sort_by(|a, b| a.due.cmp(&b.due).then_with(|| a.person_id.cmp(&b.person_id)));
        Ok(due)
    }

    /// Local changes the server has not acknowledged yet.
    pub async fn pending_changes(&self) -> Result<PendingChanges, CoreError> {
        let st = self.inner.lock();
        self.inner.check_not_wiped(&st)?;
        let mut p = PendingChanges::default();
        for s in st.sync.values().filter(|s| s.pending > 0) {
            p.documents += 1;
            p.changes += s.pending;
        }
        Ok(p)
    }

    /// Merge automerge data received from elsewhere (a document `save()`, or changes from
    /// `save_after`) into the person's document, creating it if this device has none.
    /// Returns whether anything new arrived. These changes are not pending: they came from
    /// outside.
    pub async fn import_document(&self, person: &str, data: Vec<u8>) -> Result<bool, CoreError> {
        validate_id("person", person)?;
        let inner = self.inner.clone();
        let id = person.to_string();
        let arrived = blocking(move || inner.import(&id, &data)).await?;
        if arrived {
            self.inner.listeners.records_changed(&[person.to_string()]);
        }
        Ok(arrived)
    }

    /// The person's whole document, as automerge `save()` bytes.
    pub async fn export_document(&self, person: &str) -> Result<Vec<u8>, CoreError> {
        let inner = self.inner.clone();
        let person = person.to_string();
        blocking(move || {
            let mut st = inner.lock();
            Ok(inner.loaded(&mut st, &person)?.doc.save())
        })
        .await
    }

    /// Enroll this phone with a one-time code from a coordinator: the phone makes its key pair,
    /// keeps the private key in the sealed store and registers the public key.
    pub async fn enroll(&self, options: &crate::sync::SyncOptions, code: &str, device_name: &str) -> Result<crate::sync::Enrollment, crate::sync::SyncError> {
        self.check_not_wiped()?;
        // One at a time (a double tap): two attempts could each make a pending key, and the
        // one left on the phone might not be the one the server took.
        let _one_at_a_time = self.enroll_lock.lock().await;
        crate::sync::enroll(&self.inner, options, code, device_name).await
    }

    /// Open a signed connection; retries once with the server's time if the phone's clock is
    /// off (phones offline for weeks drift).
    async fn connect(&self, options: &crate::sync::SyncOptions) -> Result<crate::sync::WsConn, crate::sync::SyncError> {
        use crate::sync::SyncError;
        self.check_not_wiped()?;
        for attempt in 0..2 {
            let inner = self.inner.clone();
            let header = blocking(move || inner.auth_header()).await?.ok_or(SyncError::NotEnrolled)?;
            match crate::sync::WsConn::connect(options, &header).await {
                Err(SyncError::ClockSkew { server_time }) if attempt == 0 => {
                    let offset = server_time - chrono::Utc::now().timestamp();
                    self.inner.clock_offset.store(offset, std::sync::atomic::Ordering::Relaxed);
                }
                other => return other,
            }
        }
        Err(SyncError::NotEnrolled)
    }

    /// Sync with the server: send what it lacks, receive what this device lacks. One sync at a
    /// time per device; a failed sync keeps local data and resumes where it stopped.
    pub async fn sync(&self, options: &crate::sync::SyncOptions) -> Result<crate::sync::SyncReport, crate::sync::SyncError> {
        use crate::sync::{SyncObserver, SyncProgress, SyncReport, SyncState};
        let one_at_a_time = self.sync_lock.lock().await;
        let (options, observer) = self.observed(options);
        observer.state(&SyncState::Connecting);
        let result = async {
            // What to send first is prepared while the connection is set up; a failed connect
            // (the usual case offline) is reported at once.
            let (mut conn, opening) = tokio::try_join!(self.connect(&options), crate::sync::open(&self.inner, false))?;
            let mut r = SyncReport::default();
            crate::sync::FrameConn::account(&conn, &mut r);
            observer.progress(&SyncProgress::Connected { upgrade_bytes: r.upgrade_bytes_up + r.upgrade_bytes_down });
            observer.state(&SyncState::Syncing);
            crate::sync::run_until(&self.inner, &mut conn, &options, None, Some(opening)).await
        }
        .await;
        observer.state(&end_state(&result));
        // When a sync returns, its subscribers have heard all of it: nothing is still being
        // delivered (an app that exits right after a sync is not called back while it ends).
        // Waited for after the sync lock is let go, so that the next sync does not wait too.
        drop(one_at_a_time);
        if options.wait_for_subscribers {
            self.inner.listeners.delivered(std::time::Duration::from_secs(5)).await;
        }
        result
    }

    /// Sync, then stay connected (see [`crate::sync::LiveSync`]).
    pub async fn sync_live(&self, options: &crate::sync::SyncOptions) -> Result<crate::sync::LiveSync, crate::sync::SyncError> {
        use crate::sync::{SyncObserver, SyncState};
        let (options, observer) = self.observed(options);
        observer.state(&SyncState::Connecting);
        let mut conn = match self.connect(&options).await {
            Ok(c) => c,
            Err(e) => {
                observer.state(&error_state(&e));
                return Err(e);
            }
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (inner, lock) = (self.inner.clone(), self.sync_lock.clone());
        let task = tokio::spawn(async move {
            let _one_at_a_time = lock.lock().await;
            observer.state(&SyncState::Live);
            // The opening is prepared under the lock: a sync still running may move the cursor.
            let result = crate::sync::run_until(&inner, &mut conn, &options, Some(stop_rx), None).await;
            observer.state(&end_state(&result));
            result
        });
        Ok(crate::sync::LiveSync::new(stop_tx, task))
    }

    /// The options for one sync with its observer replaced by one that also reaches every
    /// subscriber.
    fn observed(&self, options: &crate::sync::SyncOptions) -> (crate::sync::SyncOptions, Arc<Fanout>) {
        let fanout = Arc::new(Fanout { explicit: options.observer.clone(), listeners: self.inner.listeners.clone() });
        let mut options = options.clone();
        options.observer = Some(fanout.clone());
        (options, fanout)
    }

    /// The `Authorization` header value that proves this device on a new connection to the
    /// server (for apps that open the sync socket through their own transport).
    pub async fn connection_token(&self) -> Result<Option<String>, CoreError> {
        self.check_not_wiped()?;
        let inner = self.inner.clone();
        blocking(move || inner.auth_header()).await
    }

    /// Whether a coordinator revoked this device and its records were deleted (in this
    /// process; the store left behind is empty and unenrolled).
    pub fn is_wiped(&self) -> bool {
        self.inner.lock().wiped
    }

    fn check_not_wiped(&self) -> Result<(), CoreError> {
        let st = self.inner.lock();
        self.inner.check_not_wiped(&st)
    }

    /// Sync over an already open connection (tests use an in-memory one).
    pub async fn sync_over<C: crate::sync::FrameConn>(
        &self,
        conn: &mut C,
        options: &crate::sync::SyncOptions,
    ) -> Result<crate::sync::SyncReport, crate::sync::SyncError> {
        crate::sync::run(&self.inner, conn, options).await
    }

    /// This install's id, as the server knows it.
    pub async fn device_id(&self) -> Result<String, CoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.device_id()).await
    }

    /// What this device believes the server holds of one person's document.
    pub async fn sync_state(&self, person: &str) -> Option<DocSyncState> {
        self.inner.lock().sync.get(person).cloned()
    }

    /// Forget what the server is known to hold; the next sync reconciles every document.
    /// Nothing local is lost. For recovery after a server or device restore.
    pub async fn forget_sync_state(&self) -> Result<(), CoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.forget_sync_state()).await
    }

    /// The heads of a person's document (hex change hashes, sorted): two copies with the same
    /// heads hold the same record.
    pub async fn heads(&self, person: &str) -> Result<Vec<String>, CoreError> {
        let inner = self.inner.clone();
        let person = person.to_string();
        blocking(move || {
            let mut st = inner.lock();
            let mut h = hex_heads(&inner.loaded(&mut st, &person)?.doc.heads());
            h.sort();
            Ok(h)
        })
        .await
    }

    /// This device's automerge actor id (hex), for diagnostics.
    pub fn actor_id(&self) -> String {
        self.inner.actor.to_hex_string()
    }
}

/// The state a sync ended in.
fn end_state(result: &Result<crate::sync::SyncReport, crate::sync::SyncError>) -> crate::sync::SyncState {
    match result {
        Ok(report) => crate::sync::SyncState::Finished { report: report.clone() },
        Err(e) => error_state(e),
    }
}

fn error_state(e: &crate::sync::SyncError) -> crate::sync::SyncState {
    use crate::sync::{SyncError, SyncState};
    match e {
        SyncError::Wiped { message } => SyncState::Wiped { message: message.clone() },
        e => SyncState::Failed { message: e.to_string() },
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self, st: &State) -> Result<String, CoreError> {
        self.check_not_wiped(st)?;
        st.worker.clone().ok_or(CoreError::NoWorker)
    }

    pub(crate) fn check_not_wiped(&self, st: &State) -> Result<(), CoreError> {
        if st.wiped { Err(CoreError::Wiped) } else { Ok(()) }
    }

    /// The person's document, loaded from the store on first use.
    pub(crate) fn loaded<'s>(&self, st: &'s mut State, id: &str) -> Result<&'s mut Loaded, CoreError> {
        self.check_not_wiped(st)?;
        if !st.docs.contains_key(id) {
            let data = self.store.load_doc(id)?.ok_or_else(|| CoreError::UnknownPerson(id.to_string()))?;
            let doc = PersonDoc::load(id, &data, self.actor.clone())?;
            let appended = data.changes.iter().map(|c| c.len() as u64).sum();
            let snapshot = data.snapshot.as_ref().map_or(0, |s| s.len() as u64);
            st.docs.insert(id.to_string(), Loaded { doc, next_seq: data.next_seq, appended, snapshot });
        }
        Ok(st.docs.get_mut(id).expect("inserted above"))
    }

    /// Make one local change to `id` with `f` and commit it durably with the document's summary
    /// and sync bookkeeping. `f` returns the new change chunks and a value for the caller.
    pub(crate) fn write<T>(
        &self,
        st: &mut State,
        id: &str,
        kind: Written,
        f: impl FnOnce(&mut PersonDoc) -> Result<(Vec<Vec<u8>>, T), CoreError>,
    ) -> Result<T, CoreError> {
        let result = self.commit_change(st, id, kind, f);
        if result.is_err() {
            // Memory may hold a change the store refused: reload from disk next time.
            st.docs.remove(id);
        }
        result
    }

    /// Apply `f` to the loaded document and commit what it returns. Changes made here count as
    /// pending until the server acknowledges them; imported ones do not.
    fn commit_change<T>(
        &self,
        st: &mut State,
        id: &str,
        kind: Written,
        f: impl FnOnce(&mut PersonDoc) -> Result<(Vec<Vec<u8>>, T), CoreError>,
    ) -> Result<T, CoreError> {
        let local = kind != Written::Import;
        let limit = (kind == Written::Record).then_some(RECORD_WRITE_LIMIT);
        let (out, staged) = self.stage(st, id, if local { Origin::Local } else { Origin::Peer }, limit, f)?;
        if let Some(staged) = staged {
            self.store.commit(staged.writes.clone())?;
            self.finish(st, staged);
            if local {
                self.local_changes.notify_one();
            }
        }
        Ok(out)
    }

    /// Apply `f` to the loaded document in memory and prepare the store writes that make it
    /// durable (nothing is written yet). `None` if `f` changed nothing.
    /// `limit`: the size the record may not pass with this change (see [`RECORD_WRITE_LIMIT`]).
    pub(crate) fn stage<T>(
        &self,
        st: &mut State,
        id: &str,
        origin: Origin,
        limit: Option<usize>,
        f: impl FnOnce(&mut PersonDoc) -> Result<(Vec<Vec<u8>>, T), CoreError>,
    ) -> Result<(T, Option<Staged>), CoreError> {
        let loaded = self.loaded(st, id)?;
        let (chunks, out) = f(&mut loaded.doc)?;
        let chunks: Vec<_> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        if chunks.is_empty() {
            return Ok((out, None));
        }
        let new_bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if let Some(limit) = limit
            && loaded.snapshot + loaded.appended + new_bytes > limit as u64
        {
            // A record the server cannot take would stay on this phone for ever, re-sent on
            // every sync. The stored sizes overstate it (uncompressed, with history to fold),
            // so only a record already past the limit that way pays for measuring it exactly.
            // The caller (`write`) drops the refused change from memory.
            let size = loaded.doc.automerge().save().len();
            if size > limit {
                return Err(CoreError::RecordFull { person: id.to_string(), size, limit });
            }
        }
        // A document received before its profile has no summary yet.
        let summary = loaded.doc.summary().ok();
        let mut writes = Vec::new();
        let new_chunks = chunks.len() as u64;
        let limit = ((loaded.snapshot as f64 * COMPACT_RATIO) as u64).max(COMPACT_FLOOR);
        let mut compacted = None;
        // A document's first chunks are the whole document: a snapshot would hold the same.
        let first = loaded.snapshot == 0 && loaded.appended == 0;
        if !first && loaded.appended + new_bytes > limit {
            // Uncompressed: the store compresses the whole value (see `store::sealed`).
            let snapshot = loaded.doc.automerge().save_nocompress();
            compacted = Some(snapshot.len() as u64);
            writes.push(StoredWrite::Compact { doc: id.to_string(), snapshot, upto_seq: loaded.next_seq + new_chunks });
        } else {
            for (i, bytes) in chunks.into_iter().enumerate() {
                writes.push(StoredWrite::AppendChange { doc: id.to_string(), seq: loaded.next_seq + i as u64, bytes });
            }
        }
        let heads = loaded.doc.heads();
        let mut sync = st.sync.get(id).cloned().unwrap_or_default();
        match origin {
            Origin::Local => sync.pending += new_chunks,
            Origin::Peer => {}
            // Nothing of ours is waiting: the server holds everything this copy holds.
            Origin::Server if sync.pending == 0 => sync.server_heads = hex_heads(&heads),
            Origin::Server => {}
        }
        if let Some(summary) = &summary {
            writes.push(StoredWrite::DocMeta { doc: id.to_string(), name: DOC_SUMMARY.into(), value: json(summary) });
        }
        writes.push(StoredWrite::DocMeta { doc: id.to_string(), name: DOC_SYNC.into(), value: json(&sync) });
        Ok((out, Some(Staged { id: id.to_string(), writes, new_chunks, new_bytes, compacted, summary, sync })))
    }

    /// Bring memory in line once a staged change is durable.
    pub(crate) fn finish(&self, st: &mut State, staged: Staged) {
        if let Some(loaded) = st.docs.get_mut(&staged.id) {
            loaded.next_seq += staged.new_chunks;
            match staged.compacted {
                Some(size) => (loaded.appended, loaded.snapshot) = (0, size),
                None => loaded.appended += staged.new_bytes,
            }
        }
        if let Some(summary) = staged.summary {
            st.summaries.insert(staged.id.clone(), summary);
        }
        st.sync.insert(staged.id, staged.sync);
    }

    fn import(&self, id: &str, data: &[u8]) -> Result<bool, CoreError> {
        let mut st = self.lock();
        let placeholder = !st.docs.contains_key(id) && self.store.load_doc(id)?.is_none();
        if placeholder {
            st.docs.insert(id.to_string(), Loaded::new(PersonDoc::empty(id, self.actor.clone())));
        }
        let changed = self.import_into(&mut st, id, data);
        // An import that brought nothing leaves no empty document behind for a person this
        // device does not hold: reading them stays `UnknownPerson`.
        if placeholder && !matches!(changed, Ok(true)) {
            st.docs.remove(id);
        }
        changed
    }

    fn import_into(&self, st: &mut State, id: &str, data: &[u8]) -> Result<bool, CoreError> {
        let mut changed = false;
        self.write(st, id, Written::Import, |doc| {
            let before = doc.heads();
            doc.automerge_mut().load_incremental(data).map_err(|e| CoreError::document(id, e))?;
            let after = doc.heads();
            if before == after {
                return Ok((vec![], ()));
            }
            changed = true;
            Ok((vec![doc.automerge().save_after(&before)], ()))
        })?;
        Ok(changed)
    }

    fn register_person(&self, p: NewPerson) -> Result<Person, CoreError> {
        let now = self.clock.now();
        // Registration is dated by the phone's clock, and so is the consent given with it (and
        // the year of birth is judged by it).
        crate::model::plausible_time("created_at", now).map_err(|mut e| {
            e.problem = format!("{} (the phone's clock): set the clock", e.problem);
            e
        })?;
        p.validate(now)?;
        if !p.record {
            return Err(ValidationError::new(
                "record",
                "a person who has not consented to a record being kept cannot be registered",
            )
            .into());
        }
        let mut st = self.lock();
        let me = self.worker(&st)?;
        let id = p.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if st.summaries.contains_key(&id) || self.store.load_doc(&id)?.is_some() {
            return Err(CoreError::PersonExists(id));
        }
        let mut workers = vec![me.clone()];
        for w in &p.workers {
            if !workers.contains(w) {
                workers.push(w.clone());
            }
        }
        let person = Person {
            id: id.clone(),
            alias: p.alias.trim().to_string(),
            year_of_birth: p.year_of_birth,
            workers,
            created_by: me,
            created_at: now,
        };
        let consent = Consent {
            record: p.record,
            share_with_coordinator: p.share_with_coordinator,
            research: p.research,
            updated_at: now,
        };
        let (doc, skeleton) = PersonDoc::create(&id, self.actor.clone());
        st.docs.insert(id.clone(), Loaded::new(doc));
        let result = self.write(&mut st, &id, Written::Record, |doc| {
            let profile = doc.write_profile(&person, &consent)?;
            Ok((vec![skeleton, profile], person.clone()))
        });
        if result.is_err() {
            st.summaries.remove(&id);
        }
        result
    }

    fn check_may_record(&self, st: &mut State, person: &str) -> Result<(), CoreError> {
        if !self.loaded(st, person)?.doc.consent()?.record {
            return Err(CoreError::NoConsentToRecord(person.to_string()));
        }
        Ok(())
    }

    fn record_visit(&self, person: &str, v: NewVisit) -> Result<Visit, CoreError> {
        v.validate()?;
        let mut st = self.lock();
        let me = self.worker(&st)?;
        self.check_may_record(&mut st, person)?;
        let id = v.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let visit = Visit {
            id: id.clone(),
            by: me,
            started_at: v.started_at,
            duration_min: v.duration_min,
            mode: v.mode,
            setting: v.setting,
            activities: v.activities,
            goals: v.goals,
            referrals: v.referrals,
            notes: v.notes,
            follow_up: v.follow_up,
            recorded_at: self.clock.now(),
        };
        self.write(&mut st, person, Written::Record, |doc| {
            if doc.has_visit(&id) {
                return Err(CoreError::RecordExists(id.clone()));
            }
            Ok((vec![doc.add_visit(&visit)?], visit.clone()))
        })
    }

    fn record_checkin(&self, person: &str, c: NewCheckin) -> Result<Checkin, CoreError> {
        c.validate()?;
        let mut st = self.lock();
        let me = self.worker(&st)?;
        self.check_may_record(&mut st, person)?;
        let id = c.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let checkin = Checkin {
            id: id.clone(),
            by: me,
            taken_at: match c.taken_at {
                Some(t) => t,
                // The phone's clock, which may be off as far as 1970.
                None => {
                    let now = self.clock.now();
                    crate::model::plausible_time("taken_at", now).map_err(|mut e| {
                        e.problem = format!("{} (the phone's clock): set the clock, or give the time", e.problem);
                        e
                    })?;
                    now
                }
            },
            wellbeing: c.wellbeing,
            distress: c.distress,
            coping: c.coping,
            social_support: c.social_support,
            self_efficacy: c.self_efficacy,
            quality_of_life: c.quality_of_life,
            housing: c.housing,
            employment: c.employment,
            hospital_nights_28d: c.hospital_nights_28d,
            substance_use_days_28d: c.substance_use_days_28d,
        };
        self.write(&mut st, person, Written::Record, |doc| {
            if doc.has_checkin(&id) {
                return Err(CoreError::RecordExists(id.clone()));
            }
            Ok((vec![doc.add_checkin(&checkin)?], checkin.clone()))
        })
    }

    fn edit_visit(&self, person: &str, visit: &str, edit: VisitEdit) -> Result<Visit, CoreError> {
        edit.validate()?;
        let mut st = self.lock();
        self.worker(&st)?;
        let now = self.clock.now();
        self.write(&mut st, person, Written::Record, |doc| {
            let change = doc.edit_visit(visit, &edit, now)?;
            let current = doc.record()?.visits.into_iter().find(|v| v.id == visit).ok_or_else(|| {
                CoreError::UnknownVisit { person: person.to_string(), visit: visit.to_string() }
            })?;
            // The edit against the visit as it stands: a follow-up may not come before it. (A
            // refusal here drops the edit from memory: `write` reloads the stored document.)
            if let (Some(d), true) = (current.follow_up, edit.started_at.is_some() || matches!(edit.follow_up, Some(Some(_)))) {
                crate::model::follow_up(d, Some(current.started_at))?;
            }
            Ok((vec![change], current))
        })
    }

    fn set_consent(&self, person: &str, change: ConsentChange) -> Result<Consent, CoreError> {
        let mut st = self.lock();
        let by = self.worker(&st)?;
        let now = self.clock.now();
        self.write(&mut st, person, Written::Consent, |doc| {
            // Never dated before a word this phone already holds (its clock may be behind, or
            // the last change came this very millisecond): this change is the latest word. A
            // clock far off (reset to 1970, or centuries ahead) would have it ignored: then it
            // is dated just after the latest word instead.
            let latest = doc.consent()?.updated_at;
            let at = if now > latest && crate::document::plausible(&now) { now } else { latest.checked_add_signed(chrono::Duration::milliseconds(1)).unwrap_or(latest) };
            let change = doc.add_consent_statement(&change, at, &by)?;
            // What holds now: a later statement from another phone may outrank this one.
            Ok((vec![change], doc.consent()?))
        })
    }
}
