//! The document hub: applies pushes, computes what a device lacks, and runs automerge's sync
//! protocol for the fallback. The store holds the truth.
//!
//! Memory: a loaded automerge document takes tens of times its saved size, so the hub keeps
//! no loaded documents between requests. A push (or sync round) loads the documents it touches,
//! applies the changes, stores the batch and drops them. Between requests a bounded cache keeps,
//! for recently written documents, what the store holds — the saved bytes, the heads and the
//! number of increments — so that a push loads without reading the store and a download can
//! tell from the heads alone that a device already has everything it pushed.
//!
//! Pushes go in three steps. *Prepare* (load, merge, encode: the costly part) runs outside the
//! writers' lock, several sessions at once. *Commit* takes the lock, applies again the pushes of
//! any document another writer changed meanwhile (or whose access changed), and writes. *Flush*
//! makes the writes durable outside the lock, where sessions that committed meanwhile share one
//! disk flush. A device hears that a push is stored only after the flush.
//!
//! Reporting rows are not computed on the sync path: a write marks its document's row due (in
//! the same atomic batch), and [`DocHub::refresh_views`] computes due rows later — when a
//! report is asked for, and in the background while sync is quiet (`crate::app::serve`). A
//! phone on a short network window waits only for what it needs: its data stored.
//!
//! Cache rules: an entry always equals what the store holds. A writer takes a document's entry
//! out before the append that changes it and puts the new one in after (holding the writers'
//! lock throughout; or, for a document loaded but
//! left unchanged, straight from the store under that lock). Readers use an entry when there is
//! one and otherwise read the store without caching what they read, so an older copy can never
//! take the place of a newer one. As with the store's own reads, a reader may see a write a
//! moment before it is durable; a device that got it so and outlives a server crash is caught by
//! the log's tags (its cursor is then unknown, and it reconciles).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc, SaveOptions};
use lru::LruCache;
use peersync_core::protocol::{AckStatus, Cursor, DocAck, DocDown, DocPush, DocSync, ErrorCode, Hash, MAX_DOC_BYTES};
use peersync_core::StoreError;
use tokio::sync::broadcast;

use crate::auth::{Access, DeviceIdentity, Verdict};
use crate::store::{Append, DocWrite, ServerStore, StoredDoc};

/// Increments a stored document may collect; the write that would exceed this stores a
/// snapshot of the whole document instead.
const COMPACT_AFTER: usize = 16;
/// Download entries whose access is read at once: large enough that a fresh phone's walk of
/// the whole log reads each tombstone and unassignment once per few hundred entries.
const VERDICT_CHUNK: usize = 256;
/// A download over fewer log positions than this walks them: asking access for candidates
/// (the worker's caseload, unassignments, the organisation's tombstones) would cost more.
const CANDIDATES_FROM: u64 = 64;

/// What the store holds of a document, as the cache keeps it.
struct CachedDoc {
    /// The stored data (snapshot, then increments): input to automerge's `load_incremental`.
    data: Vec<u8>,
    heads: Vec<ChangeHash>,
    /// Increments stored after the snapshot.
    increments: usize,
}

type CacheKey = (String, String);

/// Bytes an entry costs, bookkeeping included.
fn weight(key: &CacheKey, e: &CachedDoc) -> usize {
    e.data.len() + e.heads.len() * 32 + key.0.len() + key.1.len() + 128
}

/// A least-recently-used cache bounded in entries and in bytes.
struct DocCache {
    lru: LruCache<CacheKey, Arc<CachedDoc>>,
    bytes: usize,
    max_docs: usize,
    max_bytes: usize,
}

impl DocCache {
    fn get(&mut self, key: &CacheKey) -> Option<Arc<CachedDoc>> {
        self.lru.get(key).cloned()
    }

    fn put(&mut self, key: CacheKey, entry: CachedDoc) {
        self.pop(&key);
        let w = weight(&key, &entry);
        if w > self.max_bytes {
            return;
        }
        self.bytes += w;
        self.lru.put(key, Arc::new(entry));
        while self.lru.len() > self.max_docs || self.bytes > self.max_bytes {
            match self.lru.pop_lru() {
                Some((k, e)) => self.bytes -= weight(&k, &e),
                None => break,
            }
        }
    }

    fn pop(&mut self, key: &CacheKey) {
        if let Some(e) = self.lru.pop(key) {
            self.bytes -= weight(key, &e);
        }
    }
}

/// A document being written by one batch: loaded from the cache or the store, dropped with the
/// batch.
struct Working {
    doc: Automerge,
    /// Whether the store held anything of it before this batch.
    stored: bool,
    /// What the store holds once this batch's appends for it are durable.
    data: Vec<u8>,
    increments: usize,
    /// An append for it is part of this batch.
    written: bool,
    /// What the store held when it was loaded (`None`: nothing): a push prepared outside the
    /// writers' lock is committed only if this is still what the store holds.
    base: Option<Vec<u8>>,
    /// What the device's access allowed when the batch applied its push.
    refusal: Option<AckStatus>,
}

impl Working {
    /// Back to exactly what `data` holds (after data that failed to load, or changes left
    /// waiting in automerge's queue for dependencies the server lacks).
    fn reset(&mut self, org: &str, doc: &str) -> Result<(), StoreError> {
        self.doc = load(org, doc, &self.data)?;
        Ok(())
    }

    /// Record that the document changed from `before`: the write that stores it. `as_pushed`:
    /// a document new to the store whose push loaded completely into the empty document is
    /// stored as pushed, since those bytes load into exactly this document and re-encoding it
    /// (automerge deflates every column afresh) costs more than loading it did.
    ///
    /// Nothing is recorded if the stored document would exceed [`MAX_DOC_BYTES`]: the error is
    /// the size it would have had, and the caller resets the loaded document. Stored, such a
    /// document could not be sent in one frame, and every fresh phone of the team would fail
    /// its restore on it.
    fn write(&mut self, before: &[ChangeHash], as_pushed: Option<&[u8]>) -> Result<DocWrite, usize> {
        if let Some(data) = as_pushed {
            if data.len() > MAX_DOC_BYTES {
                return Err(data.len());
            }
            self.hold_snapshot(data.to_vec());
            return Ok(DocWrite::Snapshot(data.to_vec()));
        }
        if self.stored && self.increments < COMPACT_AFTER {
            let inc = self.doc.save_after(before);
            // Past the limit as increments, a snapshot (which folds them in) may still fit.
            if self.data.len() + inc.len() <= MAX_DOC_BYTES {
                self.data.extend_from_slice(&inc);
                self.written = true;
                self.increments += 1;
                return Ok(DocWrite::Increment(inc));
            }
        }
        // New to the store, or enough increments: the whole document, replacing them. Without
        // changes still waiting for dependencies: those are a session's to keep (see
        // `SyncRounds`), and once applied they come in an increment.
        let snapshot = self.doc.save_with_options(SaveOptions { deflate: true, retain_orphans: false });
        if snapshot.len() > MAX_DOC_BYTES {
            return Err(snapshot.len());
        }
        self.hold_snapshot(snapshot.clone());
        Ok(DocWrite::Snapshot(snapshot))
    }

    /// The stored bytes are now `data`, a snapshot.
    fn hold_snapshot(&mut self, data: Vec<u8>) {
        self.written = true;
        self.data = data;
        self.increments = 0;
    }
}

/// What one session's reconciliation keeps between rounds, per document.
#[derive(Default)]
pub struct SyncRounds {
    states: HashMap<String, SyncState>,
    /// Changes a device sent in a round whose dependencies the server lacked. A phone sends a
    /// change without the one before it when automerge's Bloom filter wrongly counts the
    /// earlier one as held here. Automerge queues such a change in the loaded document, but
    /// each round loads the document afresh, which drops the queue; and the device, having
    /// sent the change once, never sends it again, so the sync would go round in circles
    /// until it gave up. They are applied again from here each round until their
    /// dependencies arrive: per document, what automerge's queue held after the last round.
    waiting: HashMap<String, Vec<u8>>,
    /// Bytes in `waiting`, bounded by [`MAX_WAITING_BYTES`].
    waiting_bytes: usize,
}

/// Bytes of changes one session holds back for dependencies the server lacks. A device that
/// sends more, or never the dependencies, gets asked for those changes again instead
/// (automerge's `need`), so the bound costs round trips, never data.
const MAX_WAITING_BYTES: usize = MAX_DOC_BYTES;

impl SyncRounds {
    fn state(&mut self, doc: &str) -> &mut SyncState {
        self.states.entry(doc.to_string()).or_default()
    }

    /// The changes held back for `doc`, no longer held.
    fn take_waiting(&mut self, doc: &str) -> Vec<u8> {
        let bytes = self.waiting.remove(doc).unwrap_or_default();
        self.waiting_bytes -= bytes.len();
        bytes
    }

    /// Hold `changes` back for `doc`, unless that would go over the session's bound.
    fn hold(&mut self, doc: &str, changes: Vec<u8>) {
        if self.waiting_bytes + changes.len() <= MAX_WAITING_BYTES {
            self.waiting_bytes += changes.len();
            self.waiting.insert(doc.to_string(), changes);
        }
    }
}

/// The changes automerge keeps in `doc`'s queue for dependencies it lacks, as stored bytes
/// (`save` writes them after the document). Only called when there are some, which is rare:
/// it encodes the document twice.
fn queued(doc: &Automerge) -> Vec<u8> {
    let with = doc.save_with_options(SaveOptions { deflate: false, retain_orphans: true });
    let without = doc.save_with_options(SaveOptions { deflate: false, retain_orphans: false });
    with.strip_prefix(without.as_slice()).map(<[u8]>::to_vec).unwrap_or_default()
}

/// The server's next sync message for `doc`, if it has something to say.
fn reply_for(w: &Working, doc: &str, rounds: &mut SyncRounds, out: &mut RoundOutcome) {
    if let Some(reply) = w.doc.generate_sync_message(rounds.state(doc)) {
        if !reply.changes.is_empty() {
            out.sent.push(doc.to_string());
        }
        out.replies.push(DocSync { doc: doc.to_string(), msg: reply.encode() });
    }
}

/// What one sync round did.
#[derive(Debug, Default)]
pub struct RoundOutcome {
    /// The server's answers, to send to the device.
    pub replies: Vec<DocSync>,
    /// Documents the device's changes were stored in, and documents whose answer carries
    /// changes to the device (for the audit log).
    pub stored: Vec<String>,
    pub sent: Vec<String>,
    /// Documents of which the server now holds everything the device has.
    pub caught_up: Vec<String>,
    /// A document whose changes would make it larger than one record may be, and the size:
    /// the session ends the sync saying so (reconciling it again would only repeat this).
    pub too_large: Option<(String, usize)>,
    /// Documents erased: the device is to purge them (a device that held a person the server
    /// erased while it restored from a backup reconciles them; they cannot converge).
    pub erased: Vec<String>,
}

/// Documents loaded by one batch, by id.
type Batch = HashMap<String, Working>;

fn load(org: &str, doc: &str, data: &[u8]) -> Result<Automerge, StoreError> {
    let mut am = Automerge::new();
    if data.is_empty() {
        // A document the server has not seen: every push of a first upload.
        return Ok(am);
    }
    am.load_incremental(data).map_err(|e| StoreError::Corrupt { key: format!("{org}/{doc}"), reason: e.to_string() })?;
    Ok(am)
}

/// A change in an organisation's log, announced to live sessions.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub org: String,
    pub seq: u64,
    /// A device revoked: its live sessions end with `Wipe` at once (others ignore this).
    pub revoked: Option<String>,
}

pub struct DocHub {
    store: Arc<dyn ServerStore>,
    // std Mutexes: held for short synchronous work on blocking threads, never across an await.
    cache: Mutex<DocCache>,
    /// Serialises writers so that each increment is computed against what the store holds.
    write_lock: Mutex<()>,
    announce: broadcast::Sender<Announcement>,
    /// Commits that wrote something, for telling when sync is quiet.
    writes: std::sync::atomic::AtomicU64,
}

/// What a device is known to hold of documents it pushed in this session: their heads.
pub type Pushed = HashMap<String, Vec<ChangeHash>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn too_large(size: usize) -> String {
    format!("the record would grow to {size} bytes, over the {MAX_DOC_BYTES} one record may hold; it stays on the phone")
}

fn to_hash(h: &Hash) -> ChangeHash {
    ChangeHash(*h)
}

fn refused(code: ErrorCode, message: impl Into<String>) -> AckStatus {
    AckStatus::Refused { code, message: message.into() }
}

/// What the server learnt from a document it is about to store.
struct Applied {
    doc: String,
    /// The store held nothing of it before: its creator's worker and teammates get it.
    created: bool,
    teammates: Vec<String>,
    consent: Option<peersync_core::Consent>,
}

fn applied(doc: &str, w: &Working) -> Applied {
    let (teammates, consent) = peersync_core::document::profile_and_consent(&w.doc);
    Applied { doc: doc.to_string(), created: !w.stored, teammates, consent }
}

/// A batch of pushes applied outside the writers' lock (see [`DocHub::prepare_push`]).
pub struct PreparedPush {
    pushes: Vec<DocPush>,
    /// Each push's outcome, in order.
    statuses: Vec<AckStatus>,
    appends: Vec<(Append, Applied)>,
    batch: Batch,
}

/// A push once committed (see [`DocHub::commit_push`]).
pub struct Committed {
    /// Each push's outcome, in order.
    pub acks: Vec<DocAck>,
    /// The documents the push changed in the store, each once.
    pub written: Vec<String>,
}

/// A download in progress (see [`DocHub::start_download`]).
pub struct Download {
    entries: std::vec::IntoIter<(u64, String)>,
    /// Entries taken from `entries`, with their access, which the last batch had no room
    /// for: the next batch starts with them. (An access change meanwhile moves the document's
    /// log entry past this download, so the device's next sync sees it.)
    held: Vec<((u64, String), Verdict)>,
    since: Cursor,
    /// Where the device stands once it has stored the batches produced so far.
    cursor: Cursor,
    /// Where it stands after the last batch, when `entries` are only some of the log's, read
    /// at this head (see [`DocHub::start_download`]); else after the last entry. The device's
    /// cursor never passes it.
    end: Option<Cursor>,
    finished: bool,
}

/// One batch of a download.
pub struct DocsBatch {
    pub docs: Vec<DocDown>,
    pub purge: Vec<String>,
    pub cursor: Cursor,
    pub remaining: u32,
}

impl DocHub {
    /// A hub whose cache keeps at most `cache_docs` documents and `cache_bytes` bytes.
    pub fn new(store: Arc<dyn ServerStore>, cache_docs: usize, cache_bytes: usize) -> Self {
        let (announce, _) = broadcast::channel(1024);
        Self {
            store,
            cache: Mutex::new(DocCache { lru: LruCache::unbounded(), bytes: 0, max_docs: cache_docs, max_bytes: cache_bytes }),
            write_lock: Mutex::new(()),
            announce,
            writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<dyn ServerStore> {
        &self.store
    }

    /// Tell the live sessions that `device` was revoked: they end with `Wipe` now rather than
    /// at the device's next frame or forwarded change.
    pub fn announce_revoked(&self, org: &str, device: &str) {
        let _ = self.announce.send(Announcement { org: org.to_string(), seq: 0, revoked: Some(device.to_string()) });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Announcement> {
        self.announce.subscribe()
    }

    pub fn cached_docs(&self) -> usize {
        lock(&self.cache).lru.len()
    }

    /// Bytes the cache holds (its entries' weight).
    pub fn cached_bytes(&self) -> usize {
        lock(&self.cache).bytes
    }

    fn cache_get(&self, org: &str, doc: &str) -> Option<Arc<CachedDoc>> {
        lock(&self.cache).get(&(org.to_string(), doc.to_string()))
    }

    fn evict(&self, org: &str, doc: &str) {
        lock(&self.cache).pop(&(org.to_string(), doc.to_string()));
    }

    /// `doc` in `batch`, loaded (from the cache, else the store) if the batch has not yet.
    /// Writers only: the caller holds the writers' lock.
    fn working<'b>(&self, org: &str, doc: &str, batch: &'b mut Batch) -> Result<&'b mut Working, StoreError> {
        if !batch.contains_key(doc) {
            let (data, increments, stored) = match self.cache_get(org, doc) {
                Some(c) => (c.data.clone(), c.increments, true),
                None => match self.store.load_doc(org, doc)? {
                    Some(s) => (s.concat(), s.increments.len(), true),
                    None => (Vec::new(), 0, false),
                },
            };
            let am = load(org, doc, &data)?;
            let base = stored.then(|| data.clone());
            batch.insert(doc.to_string(), Working { doc: am, stored, data, increments, written: false, base, refusal: None });
        }
        Ok(batch.get_mut(doc).expect("inserted above"))
    }

    /// After the batch's appends are durable: the cache takes what the store now holds of
    /// every document the batch loaded. The caller holds the writers' lock.
    fn cache_batch(&self, org: &str, batch: Batch) {
        let mut cache = lock(&self.cache);
        for (doc, w) in batch {
            if w.stored || w.written {
                let heads = w.doc.get_heads();
                cache.put((org.to_string(), doc), CachedDoc { data: w.data, heads, increments: w.increments });
            }
        }
    }

    /// The document as stored, loaded; `None` if the store holds nothing of it. For readers:
    /// what it reads from the store is not cached.
    fn loaded(&self, org: &str, doc: &str) -> Result<Option<Automerge>, StoreError> {
        let data = match self.cache_get(org, doc) {
            Some(c) => return load(org, doc, &c.data).map(Some),
            None => self.store.load_doc(org, doc)?,
        };
        data.map(|s| load(org, doc, &s.concat())).transpose()
    }

    /// Apply a batch of pushes; returns once the accepted ones are durable. Documents the
    /// device may not write are refused one by one; the rest are stored. (Sessions take the
    /// three steps one by one: [`DocHub::prepare_push`], [`DocHub::commit_push`],
    /// [`DocHub::flush`].)
    pub fn push(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        pushes: Vec<DocPush>,
        pushed: &mut Pushed,
    ) -> Result<Vec<DocAck>, StoreError> {
        let prepared = self.prepare_push(who, access, pushes)?;
        let committed = self.commit_push(who, access, prepared, pushed)?;
        self.flush()?;
        Ok(committed.acks)
    }

    /// A push's costly part — loading the documents, merging the device's changes, encoding
    /// what to store — done on copies, outside the writers' lock, so
    /// that sessions do it side by side. Nothing is stored yet.
    pub fn prepare_push(&self, who: &DeviceIdentity, access: &dyn Access, pushes: Vec<DocPush>) -> Result<PreparedPush, StoreError> {
        let mut p = PreparedPush { pushes, statuses: Vec::new(), appends: Vec::new(), batch: Batch::new() };
        for push in &p.pushes {
            let status = self.apply_one(who, access, push, &mut p.appends, &mut p.batch)?;
            p.statuses.push(status);
        }
        let written: Vec<&str> = p.appends.iter().map(|(a, _)| a.doc.as_str()).collect();
        self.store.prepare_keys(&who.org, &written)?;
        Ok(p)
    }

    /// Store a prepared push, under the writers' lock. If another writer changed one of its
    /// documents meanwhile, or the device's access to one changed, that document's pushes are
    /// applied again here against what the store now holds. Returns the acknowledgements,
    /// which must not reach the device before [`DocHub::flush`] has made the writes durable,
    /// and the documents written.
    pub fn commit_push(&self, who: &DeviceIdentity, access: &dyn Access, mut prepared: PreparedPush, pushed: &mut Pushed) -> Result<Committed, StoreError> {
        let _w = lock(&self.write_lock);
        let stale = self.stale(who, access, &prepared.batch)?;
        if !stale.is_empty() {
            // Apply the pushes of those documents again; what was prepared for the others stands.
            let p = &mut prepared;
            p.appends.retain(|(a, _)| !stale.contains(&a.doc));
            p.batch.retain(|doc, _| !stale.contains(doc));
            for (push, status) in p.pushes.iter().zip(p.statuses.iter_mut()) {
                if stale.contains(&push.doc) {
                    *status = self.apply_one(who, access, push, &mut p.appends, &mut p.batch)?;
                }
            }
        }
        let PreparedPush { pushes, statuses, appends, batch } = prepared;
        let mut acks = Vec::with_capacity(pushes.len());
        for (p, status) in pushes.into_iter().zip(statuses) {
            if status == AckStatus::Stored {
                pushed.insert(p.doc.clone(), p.heads.iter().map(to_hash).collect());
            }
            acks.push(DocAck { doc: p.doc, status });
        }
        // A push answered `NeedSync` may still have stored the changes whose dependencies
        // were there: the audit log names it as written all the same.
        let mut written: Vec<String> = appends.iter().map(|(a, _)| a.doc.clone()).collect();
        written.sort();
        written.dedup();
        self.commit(who, access, appends, batch)?;
        Ok(Committed { acks, written })
    }

    /// Make every committed write durable. Concurrent callers share one disk flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }

    /// The documents of a prepared batch that another writer changed since they were loaded,
    /// or to which the device's access changed. The caller holds the writers' lock.
    fn stale(&self, who: &DeviceIdentity, access: &dyn Access, batch: &Batch) -> Result<HashSet<String>, StoreError> {
        let org = who.org.as_str();
        let mut stale = HashSet::new();
        for (doc, w) in batch {
            let same = match self.cache_get(org, doc) {
                Some(c) => w.base.as_deref() == Some(c.data.as_slice()),
                None => match self.store.load_doc(org, doc)? {
                    Some(stored) => w.base.as_deref() == Some(stored.concat().as_slice()),
                    None => w.base.is_none(),
                },
            };
            if !same || access.check_write(who, doc, w.base.is_some())? != w.refusal {
                stale.insert(doc.clone());
            }
        }
        Ok(stale)
    }

    fn apply_one(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        p: &DocPush,
        appends: &mut Vec<(Append, Applied)>,
        batch: &mut Batch,
    ) -> Result<AckStatus, StoreError> {
        if let Err(e) = peersync_core::model::validate_id("doc", &p.doc) {
            return Ok(refused(ErrorCode::InvalidDocument, e.to_string()));
        }
        if p.data.len() > MAX_DOC_BYTES {
            return Ok(refused(ErrorCode::TooLarge, format!("document data of {} bytes exceeds {MAX_DOC_BYTES}", p.data.len())));
        }
        let org = who.org.as_str();
        let w = self.working(org, &p.doc, batch)?;
        let refusal = access.check_write(who, &p.doc, w.stored)?;
        w.refusal.clone_from(&refusal);
        if let Some(refusal) = refusal {
            return Ok(refusal);
        }
        if let Err(why) = crate::chunks::check_pushed(&p.data) {
            return Ok(refused(ErrorCode::InvalidDocument, format!("not automerge data as phones push it: {why}")));
        }
        let before = w.doc.get_heads();
        if let Err(err) = w.doc.load_incremental(&p.data) {
            w.reset(org, &p.doc)?;
            return Ok(refused(ErrorCode::InvalidDocument, format!("not automerge data: {err}")));
        }
        let after = w.doc.get_heads();
        // Looking a change up by hash decodes the document's columns: the pushed heads are
        // first looked for among the heads, where a first upload's always are.
        let complete = p.heads.iter().all(|h| {
            let h = to_hash(h);
            after.contains(&h) || w.doc.get_change_by_hash(&h).is_some()
        });
        if after != before {
            let as_pushed = (complete && !w.stored && !w.written).then_some(p.data.as_slice());
            match w.write(&before, as_pushed) {
                Ok(write) => appends.push((Append { doc: p.doc.clone(), write }, applied(&p.doc, w))),
                Err(size) => {
                    w.reset(org, &p.doc)?;
                    return Ok(refused(ErrorCode::TooLarge, too_large(size)));
                }
            }
        }
        if !complete {
            // Changes waiting for dependencies sit in automerge's queue: drop them (what did
            // apply is already in `appends`) and let the device reconcile this document with
            // the sync protocol.
            w.reset(org, &p.doc)?;
            return Ok(AckStatus::NeedSync);
        }
        Ok(AckStatus::Stored)
    }

    /// Store `appends` (durable at the next flush) and bring the cache in line with `batch`;
    /// tell `access` what was created and changed; announce the new log head. The caller holds
    /// the writers' lock.
    fn commit(&self, who: &DeviceIdentity, access: &dyn Access, appends: Vec<(Append, Applied)>, batch: Batch) -> Result<(), StoreError> {
        let org = who.org.as_str();
        if appends.is_empty() {
            self.cache_batch(org, batch);
            return Ok(());
        }
        let (appends, learnt): (Vec<Append>, Vec<Applied>) = appends.into_iter().unzip();
        // Assignments of new people and consent go in first, as deferred writes at the
        // positions the appends will take (writers are serialised, so the head cannot move):
        // the append's durable write makes them durable together with the documents.
        let head = self.store.head(org)?.seq;
        for (i, a) in learnt.iter().enumerate() {
            if a.created {
                access.created(who, &a.doc, &a.teammates, head + 1 + i as u64)?;
            }
            access.changed(org, &a.doc, a.consent.as_ref())?;
        }
        // Out of the cache before the append, back in after it: a reader that sees the new log
        // entry must not then find the old data cached (a download would send a device less
        // than the entry it moves the device past).
        for a in &appends {
            self.evict(org, &a.doc);
        }
        let cursors = match self.store.append_deferred(org, appends) {
            Ok(c) => c,
            Err(e) => {
                // Whatever the store kept, the cache must not claim to know it.
                for doc in batch.keys() {
                    self.evict(org, doc);
                }
                return Err(e);
            }
        };
        self.cache_batch(org, batch);
        self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(last) = cursors.last() {
            let _ = self.announce.send(Announcement { org: org.to_string(), seq: last.seq, revoked: None });
        }
        Ok(())
    }

    /// Compute the reporting rows that are due: of `org` (every organisation if `None`), at
    /// most `limit` of them. Runs beside writers: a row computed from data that a write
    /// replaced meanwhile is not stored, and stays due. Returns the rows stored.
    pub fn refresh_views(&self, org: Option<&str>, limit: usize) -> Result<usize, StoreError> {
        let mut stored = 0;
        for (org, doc, due) in self.store.views_due(org, limit)? {
            // At least as new as the due mark just read: the store wrote data and mark in one
            // batch, and a writer takes its cache entry out before the append (cache rules
            // above). Nothing stored: erased meanwhile, and the erasure took the mark with it.
            let row = match self.loaded(&org, &doc) {
                Ok(am) => am.and_then(|am| crate::report::row_bytes(&doc, &am)),
                // Stored data that no longer loads (damaged on disk, or tampered with: sealed
                // values are checked) cannot give a row: its last good row stands, and one
                // damaged person must not stop every report.
                Err(e @ (StoreError::Corrupt { .. } | StoreError::Tampered { .. })) => {
                    tracing::error!(%org, %doc, error = %e, "a stored document does not load; its reporting row is left as it was");
                    None
                }
                Err(e) => return Err(e),
            };
            if self.store.put_view(&org, &doc, due, row)? {
                stored += 1;
            }
        }
        Ok(stored)
    }

    /// Commits that stored data since the hub started.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `cursor` belongs to this organisation's log history.
    pub fn cursor_known(&self, org: &str, cursor: Cursor) -> Result<bool, StoreError> {
        if cursor == Cursor::START {
            return Ok(true);
        }
        Ok(self.store.tag_at(org, cursor.seq)? == Some(cursor.tag))
    }

    /// The changes of `doc` a device that pushed up to `heads` lacks. Usually none: when the
    /// stored heads are the pushed ones nothing is loaded.
    fn beyond(&self, org: &str, doc: &str, heads: &[ChangeHash]) -> Result<Vec<u8>, StoreError> {
        if let Some(c) = self.cache_get(org, doc) {
            let mut stored = c.heads.clone();
            let mut pushed = heads.to_vec();
            stored.sort();
            pushed.sort();
            if stored == pushed {
                return Ok(Vec::new());
            }
        }
        Ok(match self.loaded(org, doc)? {
            Some(am) => am.get_changes(heads).iter().flat_map(|c| c.raw_bytes().to_vec()).collect(),
            None => Vec::new(),
        })
    }

    /// What the device lacks since `since`, in bounded batches handed to `emit` as they are
    /// ready. Documents in `skip` are left out; for documents in `pushed` only the changes
    /// beyond the pushed heads are sent. Returns the cursor the device ends at.
    #[allow(clippy::too_many_arguments)]
    pub fn download(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        since: Cursor,
        pushed: &Pushed,
        skip: &HashSet<String>,
        batch_bytes: usize,
        mut emit: impl FnMut(DocsBatch) -> bool,
    ) -> Result<Cursor, StoreError> {
        let mut dl = self.start_download(who, access, since)?;
        while let Some(batch) = self.next_batch(&mut dl, who, access, pushed, skip, batch_bytes)? {
            if !emit(batch) {
                break;
            }
        }
        Ok(dl.cursor)
    }

    /// A download of what changed since `since`, to be produced with [`DocHub::next_batch`]
    /// one batch at a time (so that no thread waits for the device between batches).
    ///
    /// When more than [`CANDIDATES_FROM`] log positions are to be read and `access` names fewer
    /// candidates than that (a fresh phone: its caseload, not its whole organisation), it reads
    /// those documents' log entries instead of walking the log: the entries it leaves out are
    /// those whose verdict is `Nothing`. The head is read first, and the device ends at it:
    /// an entry that moved past it meanwhile is still sent (its data is loaded when its batch
    /// is made, so it holds everything since `since`), with the device's cursor held at the
    /// head, and the device's next sync sends what moved it again (nothing it lacks is skipped;
    /// what it has twice is merged away). An access change after the head was read moves the
    /// document's entry past the head, to that next sync.
    pub fn start_download(&self, who: &DeviceIdentity, access: &dyn Access, since: Cursor) -> Result<Download, StoreError> {
        let org = who.org.as_str();
        let head = self.store.head(org)?;
        let span = head.seq.saturating_sub(since.seq);
        let candidates = if span > CANDIDATES_FROM { access.candidates(who, since.seq)? } else { None };
        let (entries, end) = match candidates {
            Some(docs) if (docs.len() as u64) < span => (self.store.entries_of(org, &docs, since.seq)?, Some(head)),
            _ => (self.store.changed_since(org, since.seq)?, None),
        };
        Ok(Download { entries: entries.into_iter(), held: Vec::new(), since, cursor: since, end, finished: false })
    }

    /// The next batch of `dl` (see [`DocHub::download`]): bounded by `batch_bytes`; the last
    /// one, possibly empty, has `remaining` 0; then `None`.
    pub fn next_batch(
        &self,
        dl: &mut Download,
        who: &DeviceIdentity,
        access: &dyn Access,
        pushed: &Pushed,
        skip: &HashSet<String>,
        batch_bytes: usize,
    ) -> Result<Option<DocsBatch>, StoreError> {
        if dl.finished {
            return Ok(None);
        }
        let org = who.org.as_str();
        let since = dl.since;
        let mut docs = Vec::new();
        let mut purge = Vec::new();
        let mut size = 0usize;
        loop {
            // Access is read a chunk of entries at a time (see `Access::verdicts`).
            let mut chunk = std::mem::take(&mut dl.held);
            if chunk.is_empty() {
                let entries: Vec<(u64, String)> = dl.entries.by_ref().take(VERDICT_CHUNK).collect();
                if entries.is_empty() {
                    break;
                }
                let ids: Vec<&str> = entries.iter().map(|(_, doc)| doc.as_str()).collect();
                let verdicts = access.verdicts(who, &ids, since.seq)?;
                if verdicts.len() != entries.len() {
                    // Zipping would skip entries and move the cursor past them.
                    return Err(StoreError::Io(format!("access returned {} verdicts for {} documents", verdicts.len(), entries.len())));
                }
                chunk = entries.into_iter().zip(verdicts).collect();
            }
            let mut chunk = chunk.into_iter();
            for ((seq, doc), verdict) in chunk.by_ref() {
                match verdict {
                    // A skipped document (the device has it and asked for the rest) is sent nothing.
                    Verdict::Read { .. } if skip.contains(&doc) => {}
                    Verdict::Read { granted } => {
                        let data = match pushed.get(&doc) {
                            Some(heads) => self.beyond(org, &doc, heads)?,
                            None => match self.store.load_doc(org, &doc)? {
                                // Newly assigned: the device cannot have anything of it yet.
                                Some(stored) if granted > since.seq => stored.concat(),
                                Some(stored) => since_cursor(&stored, since.seq),
                                None => Vec::new(),
                            },
                        };
                        if !data.is_empty() {
                            size += data.len() + doc.len();
                            docs.push(DocDown { doc, data });
                        }
                    }
                    Verdict::Purge => {
                        size += doc.len();
                        purge.push(doc);
                    }
                    Verdict::Nothing => {}
                }
                dl.cursor = match dl.end {
                    // An entry that moved past the head after the download began.
                    Some(end) if seq > end.seq => end,
                    _ => Cursor { seq, tag: 0 },
                };
                if size >= batch_bytes {
                    dl.held = chunk.collect();
                    if dl.cursor.tag == 0 {
                        dl.cursor.tag = self.store.tag_at(org, dl.cursor.seq)?.unwrap_or(0);
                    }
                    let remaining = (dl.held.len() + dl.entries.len()) as u32;
                    return Ok(Some(DocsBatch { docs, purge, cursor: dl.cursor, remaining }));
                }
            }
        }
        if let Some(end) = dl.end
            && end.seq > dl.cursor.seq
        {
            dl.cursor = end;
        }
        if dl.cursor.seq != since.seq && dl.cursor.tag == 0 {
            dl.cursor.tag = self.store.tag_at(org, dl.cursor.seq)?.unwrap_or(0);
        }
        dl.finished = true;
        Ok(Some(DocsBatch { docs, purge, cursor: dl.cursor, remaining: 0 }))
    }

    /// Move `doc`'s log entry forward (after an assignment changed) and return its position.
    /// `before` runs first, under the writers' lock, with the position the entry will take.
    pub fn touch(&self, org: &str, doc: &str, before: impl FnOnce(u64) -> Result<(), StoreError>) -> Result<u64, StoreError> {
        let _w = lock(&self.write_lock);
        before(self.store.head(org)?.seq + 1)?;
        let c = self.store.append(org, vec![Append { doc: doc.to_string(), write: DocWrite::Touch }])?;
        let seq = c.last().map_or(0, |c| c.seq);
        let _ = self.announce.send(Announcement { org: org.to_string(), seq, revoked: None });
        Ok(seq)
    }

    /// Erase `doc`: `bury` records the tombstone first (pushes are refused from then on), then
    /// the data is deleted and its key destroyed, and the log tells devices to purge. Returns
    /// whether the store held anything of it (read under the writers' lock, so no push slips
    /// in between).
    pub fn erase(&self, org: &str, doc: &str, bury: impl FnOnce() -> Result<(), StoreError>) -> Result<bool, StoreError> {
        let _w = lock(&self.write_lock);
        let known = self.cache_get(org, doc).is_some() || self.store.load_doc(org, doc)?.is_some();
        bury()?;
        self.evict(org, doc);
        let c = self.store.append(org, vec![Append { doc: doc.to_string(), write: DocWrite::Erase }])?;
        self.evict(org, doc);
        if let Some(c) = c.last() {
            let _ = self.announce.send(Announcement { org: org.to_string(), seq: c.seq, revoked: None });
        }
        Ok(known)
    }

    /// The heads of `doc` as stored (hex, sorted); `None` if the server holds nothing of it.
    pub fn heads(&self, org: &str, doc: &str) -> Result<Option<Vec<String>>, StoreError> {
        let heads = match self.cache_get(org, doc) {
            Some(c) => Some(c.heads.clone()),
            None => self.loaded(org, doc)?.map(|am| am.get_heads()),
        };
        Ok(heads.map(|heads| {
            let mut h: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
            h.sort();
            h
        }))
    }

    /// The person's current record as the server holds it (for coordinators' reads).
    pub fn record(&self, org: &str, doc: &str) -> Result<Option<peersync_core::PersonRecord>, StoreError> {
        Ok(self.loaded(org, doc)?.and_then(|am| peersync_core::document::read_record(doc, &am).ok()))
    }

    /// One round of automerge's sync protocol for each document in `msgs`, with per-session
    /// state in `rounds`. Changes received are stored durably before the replies go out.
    /// `refused`: documents whose message [`crate::chunks::check_sync_frame`] refused (run by
    /// the caller before the writers' lock); automerge is not given those.
    pub fn sync_round(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        msgs: Vec<DocSync>,
        refused: &HashSet<String>,
        rounds: &mut SyncRounds,
    ) -> Result<RoundOutcome, StoreError> {
        let org = who.org.as_str();
        let _w = lock(&self.write_lock);
        let mut appends = Vec::new();
        let mut batch = Batch::new();
        let mut out = RoundOutcome::default();
        for m in msgs {
            if peersync_core::model::validate_id("doc", &m.doc).is_err() {
                continue;
            }
            // Someone else's record is not loaded at all: a device naming people it may not
            // read costs the server a lookup each, not a load. (An erased person has no stored
            // data and goes on, to be told to purge.)
            if access.read_since(who, &m.doc)?.is_none() && !batch.contains_key(&m.doc) && (self.cache_get(org, &m.doc).is_some() || self.store.load_doc(org, &m.doc)?.is_some()) {
                continue;
            }
            let w = self.working(org, &m.doc, &mut batch)?;
            // A document the server has never held may be created through the sync protocol too.
            let may_read = !w.stored || access.read_since(who, &m.doc)?.is_some();
            if !may_read {
                continue;
            }
            let refusal = access.check_write(who, &m.doc, w.stored)?;
            if let Some(AckStatus::Refused { code: ErrorCode::Erased, .. }) = refusal {
                out.erased.push(m.doc.clone());
                continue;
            }
            let may_write = refusal.is_none();
            if !m.msg.is_empty() {
                let before = w.doc.get_heads();
                let decoded = if refused.contains(&m.doc) { None } else { SyncMessage::decode(&m.msg).ok() };
                let Some(msg) = decoded else {
                    // Answered all the same, from a fresh start, so that the device does not
                    // take the silence for agreement.
                    *rounds.state(&m.doc) = SyncState::new();
                    reply_for(w, &m.doc, rounds, &mut out);
                    continue;
                };
                peersync_core::sync::send_needed_again(rounds.state(&m.doc), &msg);
                let heads = msg.heads.clone();
                if may_write {
                    let held = rounds.take_waiting(&m.doc);
                    // What was held back goes in first: this message may bring what it lacks.
                    let received = if held.is_empty() { Ok(0) } else { w.doc.load_incremental(&held) };
                    if received.and_then(|_| w.doc.receive_sync_message(rounds.state(&m.doc), msg)).is_err() {
                        w.reset(org, &m.doc)?;
                        *rounds.state(&m.doc) = SyncState::new();
                        reply_for(w, &m.doc, rounds, &mut out);
                        continue;
                    }
                    if !w.doc.get_missing_deps(&[]).is_empty() {
                        rounds.hold(&m.doc, queued(&w.doc));
                    }
                    if heads.iter().all(|h| w.doc.get_change_by_hash(h).is_some()) {
                        out.caught_up.push(m.doc.clone());
                    }
                } else {
                    // Read-only: learn what the device has without taking its changes.
                    let mut scratch = w.doc.fork();
                    let _ = scratch.receive_sync_message(rounds.state(&m.doc), msg);
                }
                let after = w.doc.get_heads();
                if after != before {
                    match w.write(&before, None) {
                        Ok(write) => {
                            appends.push((Append { doc: m.doc.clone(), write }, applied(&m.doc, w)));
                            out.stored.push(m.doc.clone());
                        }
                        Err(size) => {
                            // Not taken. Nothing of this round is answered: the session ends
                            // the sync with the reason (what was stored before stays stored).
                            tracing::warn!(org, doc = %m.doc, size, "reconciliation would make a record too large; not stored");
                            w.reset(org, &m.doc)?;
                            out.caught_up.retain(|d| *d != m.doc);
                            out.too_large = Some((m.doc.clone(), size));
                            break;
                        }
                    }
                }
            }
            reply_for(w, &m.doc, rounds, &mut out);
        }
        self.commit(who, access, appends, batch)?;
        self.flush()?;
        Ok(out)
    }
}

/// The stored data a device at `since` lacks: the increments after it, or everything if the
/// snapshot already folds in changes after it.
fn since_cursor(stored: &StoredDoc, since: u64) -> Vec<u8> {
    match &stored.snapshot {
        Some((seq, _)) if *seq <= since => {
            stored.increments.iter().filter(|(s, _)| *s > since).flat_map(|(_, d)| d.iter().copied()).collect()
        }
        _ => stored.concat(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use automerge::transaction::Transactable;
    use automerge::ROOT;
    use peersync_core::store::MemoryStore;

    use super::*;
    use crate::store::{DeviceSync, KvServerStore};

    /// Access that lets the device write everything but the documents in its set (erased).
    #[derive(Default)]
    struct Open(Mutex<HashSet<String>>);

    impl Access for Open {
        fn read_since(&self, _: &DeviceIdentity, _: &str) -> Result<Option<u64>, StoreError> {
            Ok(Some(0))
        }
        fn must_purge(&self, _: &DeviceIdentity, _: &str, _: u64) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn check_write(&self, _: &DeviceIdentity, doc: &str, _: bool) -> Result<Option<AckStatus>, StoreError> {
            Ok(lock(&self.0).contains(doc).then(|| refused(ErrorCode::Erased, "erased")))
        }
        fn created(&self, _: &DeviceIdentity, _: &str, _: &[String], _: u64) -> Result<(), StoreError> {
            Ok(())
        }
        fn changed(&self, _: &str, _: &str, _: Option<&peersync_core::Consent>) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// Work done on the inner store at a chosen moment.
    type Hook = Box<dyn FnOnce(&KvServerStore<MemoryStore>) + Send>;

    /// A store whose next append can be made to fail.
    struct Flaky {
        inner: KvServerStore<MemoryStore>,
        fail: AtomicBool,
        /// Run once, on the inner store, right after the next read of the head: a write landing
        /// while a download begins.
        after_head: Mutex<Option<Hook>>,
    }

    impl ServerStore for Flaky {
        fn append(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Io("disk full".into()));
            }
            self.inner.append(org, appends)
        }
        fn append_deferred(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Io("disk full".into()));
            }
            self.inner.append_deferred(org, appends)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn prepare_keys(&self, org: &str, docs: &[&str]) -> Result<(), StoreError> {
            self.inner.prepare_keys(org, docs)
        }
        fn load_doc(&self, org: &str, doc: &str) -> Result<Option<StoredDoc>, StoreError> {
            self.inner.load_doc(org, doc)
        }
        fn compact(&self, org: &str, doc: &str, snapshot: Vec<u8>, upto: u64) -> Result<(), StoreError> {
            self.inner.compact(org, doc, snapshot, upto)
        }
        fn changed_since(&self, org: &str, after: u64) -> Result<Vec<(u64, String)>, StoreError> {
            self.inner.changed_since(org, after)
        }
        fn entries_of(&self, org: &str, docs: &[String], after: u64) -> Result<Vec<(u64, String)>, StoreError> {
            self.inner.entries_of(org, docs, after)
        }
        fn head(&self, org: &str) -> Result<Cursor, StoreError> {
            let head = self.inner.head(org);
            if let Some(write) = lock(&self.after_head).take() {
                write(&self.inner);
            }
            head
        }
        fn tag_at(&self, org: &str, seq: u64) -> Result<Option<u32>, StoreError> {
            self.inner.tag_at(org, seq)
        }
        fn put_device(&self, org: &str, device: &str, info: &DeviceSync) -> Result<(), StoreError> {
            self.inner.put_device(org, device, info)
        }
        fn devices(&self, org: &str) -> Result<Vec<(String, DeviceSync)>, StoreError> {
            self.inner.devices(org)
        }
        fn device(&self, org: &str, device: &str) -> Result<Option<DeviceSync>, StoreError> {
            self.inner.device(org, device)
        }
        fn views(&self, org: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.views(org)
        }
        fn views_due(&self, org: Option<&str>, limit: usize) -> Result<Vec<(String, String, u64)>, StoreError> {
            self.inner.views_due(org, limit)
        }
        fn put_view(&self, org: &str, doc: &str, due: u64, view: Option<Vec<u8>>) -> Result<bool, StoreError> {
            self.inner.put_view(org, doc, due, view)
        }
    }

    fn hub(cache_docs: usize, cache_bytes: usize) -> (DocHub, Arc<Flaky>) {
        let store = Arc::new(Flaky { inner: KvServerStore::new(MemoryStore::new()), fail: AtomicBool::new(false), after_head: Mutex::new(None) });
        (DocHub::new(store.clone(), cache_docs, cache_bytes), store)
    }

    fn who() -> DeviceIdentity {
        DeviceIdentity { org: "o".into(), device: "d".into(), worker: "w".into(), revoked: false, since: 0 }
    }

    /// A phone's copy of a document: one change per call to `edit`.
    struct Phone(Automerge);

    impl Phone {
        fn edit(&mut self, key: &str) -> Vec<ChangeHash> {
            let before = self.0.get_heads();
            let mut tx = self.0.transaction();
            tx.put(ROOT, key, key).unwrap();
            tx.commit();
            before
        }

        /// Push everything after `acked` (the whole document when nothing was acknowledged).
        fn push(&self, hub: &DocHub, doc: &str, acked: Option<&[ChangeHash]>) -> Result<AckStatus, StoreError> {
            let acks = hub.push(&who(), &Open::default(), vec![push_of(self, doc, acked)], &mut Pushed::new())?;
            Ok(acks.into_iter().next().unwrap().status)
        }
    }

    fn stored_heads(store: &Flaky, doc: &str) -> Vec<String> {
        let am = load("o", doc, &store.load_doc("o", doc).unwrap().unwrap().concat()).unwrap();
        let mut h: Vec<String> = am.get_heads().iter().map(|h| h.to_string()).collect();
        h.sort();
        h
    }

    #[test]
    fn the_cache_holds_what_the_store_holds_and_increments_fold_into_snapshots() {
        let (hub, store) = hub(100, 1 << 20);
        let mut phone = Phone(Automerge::new());
        phone.edit("k0");
        assert_eq!(phone.push(&hub, "p-1", None).unwrap(), AckStatus::Stored);
        for i in 1..=40 {
            let acked = phone.edit(&format!("k{i}"));
            assert_eq!(phone.push(&hub, "p-1", Some(&acked)).unwrap(), AckStatus::Stored);
            assert_eq!(hub.heads("o", "p-1").unwrap().unwrap(), stored_heads(&store, "p-1"));
            let stored = store.load_doc("o", "p-1").unwrap().unwrap();
            assert!(stored.increments.len() <= COMPACT_AFTER);
            let cached = hub.cache_get("o", "p-1").unwrap();
            assert_eq!(cached.data, stored.concat(), "the cache keeps the stored bytes");
            assert_eq!(cached.increments, stored.increments.len());
        }
        let record = load("o", "p-1", &store.load_doc("o", "p-1").unwrap().unwrap().concat()).unwrap();
        assert_eq!(record.get_heads(), phone.0.get_heads());
    }

    #[test]
    fn a_push_that_would_make_a_record_too_large_to_send_is_refused_and_changes_nothing() {
        use rand::RngCore;
        let (hub, store) = hub(100, 4 << 20);
        let noise = |n: usize| {
            let mut b = vec![0u8; n];
            rand::thread_rng().fill_bytes(&mut b);
            automerge::ScalarValue::Bytes(b)
        };
        let mut phone = Phone(Automerge::new());
        let mut tx = phone.0.transaction();
        tx.put(ROOT, "notes-1", noise(1_200_000)).unwrap();
        tx.commit();
        assert_eq!(phone.push(&hub, "p-1", None).unwrap(), AckStatus::Stored);
        let acked = phone.0.get_heads();
        let held = stored_heads(&store, "p-1");
        let mut tx = phone.0.transaction();
        tx.put(ROOT, "notes-2", noise(1_200_000)).unwrap();
        tx.commit();
        match phone.push(&hub, "p-1", Some(&acked)).unwrap() {
            AckStatus::Refused { code: ErrorCode::TooLarge, message } => assert!(message.contains("stays on the phone"), "{message}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(stored_heads(&store, "p-1"), held, "nothing of the refused push is stored");
        assert_eq!(hub.heads("o", "p-1").unwrap().unwrap(), held, "nor cached");
        assert!(store.load_doc("o", "p-1").unwrap().unwrap().concat().len() <= MAX_DOC_BYTES);

        // Through reconciliation (automerge's sync protocol) instead: refused the same way, the
        // round says so (the session ends the sync with it), and nothing counts as caught up.
        let mut state = SyncState::new();
        let mut rounds = SyncRounds::default();
        let mut refused = None;
        for _ in 0..6 {
            let Some(msg) = phone.0.generate_sync_message(&mut state) else { break };
            let msgs = vec![DocSync { doc: "p-1".into(), msg: msg.encode() }];
            let out = hub.sync_round(&who(), &Open::default(), msgs, &HashSet::new(), &mut rounds).unwrap();
            if let Some(too_large) = out.too_large {
                assert!(out.caught_up.is_empty());
                refused = Some(too_large);
                break;
            }
            for r in out.replies {
                phone.0.receive_sync_message(&mut state, SyncMessage::decode(&r.msg).unwrap()).unwrap();
            }
        }
        let (doc, size) = refused.expect("the round refuses the record");
        assert!(doc == "p-1" && size > MAX_DOC_BYTES);
        assert_eq!(stored_heads(&store, "p-1"), held);
    }

    #[test]
    fn a_failed_append_leaves_the_cache_with_the_stored_copy() {
        let (hub, store) = hub(100, 1 << 20);
        let mut phone = Phone(Automerge::new());
        phone.edit("a");
        phone.push(&hub, "p-1", None).unwrap();
        let v1 = hub.heads("o", "p-1").unwrap();
        let acked = phone.edit("b");
        store.fail.store(true, Ordering::SeqCst);
        assert!(phone.push(&hub, "p-1", Some(&acked)).is_err());
        assert_eq!(hub.heads("o", "p-1").unwrap(), v1, "nothing newer than the store");
        assert_eq!(phone.push(&hub, "p-1", Some(&acked)).unwrap(), AckStatus::Stored);
        assert_eq!(hub.heads("o", "p-1").unwrap().unwrap(), stored_heads(&store, "p-1"));
        assert_ne!(hub.heads("o", "p-1").unwrap(), v1);
    }

    #[test]
    fn readers_never_put_a_copy_in_the_cache() {
        let (hub, store) = hub(1, 1 << 20);
        let mut a = Phone(Automerge::new());
        let mut b = Phone(Automerge::new());
        a.edit("a");
        b.edit("b");
        a.push(&hub, "p-a", None).unwrap();
        b.push(&hub, "p-b", None).unwrap();
        assert_eq!(hub.cached_docs(), 1);
        assert!(hub.cache_get("o", "p-a").is_none(), "evicted");
        // A reader loads p-a from the store; it must not cache that copy, which a later write
        // would make stale.
        assert_eq!(hub.heads("o", "p-a").unwrap().unwrap(), stored_heads(&store, "p-a"));
        assert!(hub.cache_get("o", "p-a").is_none());
        let _ = hub.record("o", "p-a").unwrap();
        assert!(hub.cache_get("o", "p-a").is_none());
        let acked = a.edit("a2");
        a.push(&hub, "p-a", Some(&acked)).unwrap();
        assert_eq!(hub.heads("o", "p-a").unwrap().unwrap(), stored_heads(&store, "p-a"));
        assert!(hub.heads("o", "p-none").unwrap().is_none());
    }

    /// Access by document number: every third readable, every third to purge, the rest nothing.
    struct Thirds;

    impl Access for Thirds {
        fn read_since(&self, _: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError> {
            Ok((doc[2..].parse::<u32>().unwrap() % 3 == 0).then_some(0))
        }
        fn must_purge(&self, _: &DeviceIdentity, doc: &str, _: u64) -> Result<bool, StoreError> {
            Ok(doc[2..].parse::<u32>().unwrap() % 3 == 1)
        }
        fn check_write(&self, _: &DeviceIdentity, _: &str, _: bool) -> Result<Option<AckStatus>, StoreError> {
            Ok(None)
        }
        fn created(&self, _: &DeviceIdentity, _: &str, _: &[String], _: u64) -> Result<(), StoreError> {
            Ok(())
        }
        fn changed(&self, _: &str, _: &str, _: Option<&peersync_core::Consent>) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// A download longer than one chunk of access reads, cut into small batches that fill in
    /// the middle of chunks, sends what one big batch sends: the same documents and purges in
    /// log order, each once, with `remaining` and the cursor in step with the log.
    #[test]
    fn small_batches_across_access_chunks_send_what_one_batch_sends() {
        let (hub, store) = hub(10, 1 << 20);
        let n = 2 * VERDICT_CHUNK + 90;
        for i in 0..n {
            let mut phone = Phone(Automerge::new());
            phone.edit(&"x".repeat(i % 50));
            assert_eq!(phone.push(&hub, &format!("p-{i:04}"), None).unwrap(), AckStatus::Stored);
        }
        let whole = hub.download(&who(), &Thirds, Cursor::START, &Pushed::new(), &HashSet::new(), usize::MAX, |_| true).unwrap();
        let mut one = Vec::new();
        hub.download(&who(), &Thirds, Cursor::START, &Pushed::new(), &HashSet::new(), usize::MAX, |b| {
            one.push(b);
            true
        })
        .unwrap();
        assert_eq!(one.len(), 1);
        let ids = |docs: &[DocDown]| docs.iter().map(|d| d.doc.clone()).collect::<Vec<_>>();
        let readable: Vec<String> = (0..n).filter(|i| i % 3 == 0).map(|i| format!("p-{i:04}")).collect();
        let purged: Vec<String> = (0..n).filter(|i| i % 3 == 1).map(|i| format!("p-{i:04}")).collect();
        assert_eq!(ids(&one[0].docs), readable);
        assert_eq!(one[0].purge, purged);
        assert_eq!(whole, store.head("o").unwrap());

        let skip: HashSet<String> = readable.iter().step_by(2).cloned().collect();
        let mut batches = Vec::new();
        let end = hub.download(&who(), &Thirds, Cursor::START, &Pushed::new(), &skip, 300, |b| {
            batches.push(b);
            true
        })
        .unwrap();
        assert!(batches.len() > 20, "small batches: {}", batches.len());
        assert_eq!(end, whole);
        let sent: Vec<String> = batches.iter().flat_map(|b| ids(&b.docs)).collect();
        assert_eq!(sent, readable.iter().filter(|d| !skip.contains(*d)).cloned().collect::<Vec<_>>(), "each once, in log order, none skipped sent");
        assert_eq!(batches.iter().flat_map(|b| b.purge.clone()).collect::<Vec<_>>(), purged);
        for b in &batches {
            // Entries after the batch's cursor: every document was stored once, at seq = its number + 1.
            assert_eq!(b.remaining as u64, n as u64 - b.cursor.seq, "remaining at {:?}", b.cursor);
            assert_eq!(b.cursor.tag, store.tag_at("o", b.cursor.seq).unwrap().unwrap_or(0));
        }
        assert_eq!(batches.last().unwrap().remaining, 0);
    }

    /// Any access, made to walk the log: it names no candidates.
    struct Walking<A>(A);

    impl<A: Access> Access for Walking<A> {
        fn read_since(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError> {
            self.0.read_since(who, doc)
        }
        fn must_purge(&self, who: &DeviceIdentity, doc: &str, since: u64) -> Result<bool, StoreError> {
            self.0.must_purge(who, doc, since)
        }
        fn verdicts(&self, who: &DeviceIdentity, docs: &[&str], since: u64) -> Result<Vec<Verdict>, StoreError> {
            self.0.verdicts(who, docs, since)
        }
        fn check_write(&self, who: &DeviceIdentity, doc: &str, exists: bool) -> Result<Option<AckStatus>, StoreError> {
            self.0.check_write(who, doc, exists)
        }
        fn created(&self, who: &DeviceIdentity, doc: &str, teammates: &[String], seq: u64) -> Result<(), StoreError> {
            self.0.created(who, doc, teammates, seq)
        }
        fn changed(&self, org: &str, doc: &str, consent: Option<&peersync_core::Consent>) -> Result<(), StoreError> {
            self.0.changed(org, doc, consent)
        }
    }

    /// A download that reads only the entries of the worker's caseload (and of the people taken
    /// from it or erased) sends what walking the whole log sends, batch size aside, and leaves
    /// the device at the head, from where there is nothing more to send.
    #[test]
    fn a_download_of_the_caseload_sends_what_walking_the_log_sends() {
        use crate::auth::Assignments;
        use crate::directory::Directory;
        let (hub, store) = hub(50, 1 << 20);
        let dir = Arc::new(Directory::new(MemoryStore::new()));
        dir.create_org("o", "Org").unwrap();
        for w in ["w", "w-10"] {
            dir.add_worker("o", w, "Someone", "peer_advocate").unwrap();
        }
        let access = Assignments { dir: dir.clone() };
        let assert_same = |who: &DeviceIdentity, since: Cursor, label: &str| {
            let run = |access: &dyn Access| {
                let mut docs = Vec::new();
                let mut purge = Vec::new();
                let end = hub
                    .download(who, access, since, &Pushed::new(), &HashSet::new(), 2_000, |b| {
                        docs.extend(b.docs.into_iter().map(|d| (d.doc, d.data)));
                        purge.extend(b.purge);
                        true
                    })
                    .unwrap();
                (docs, purge, end)
            };
            assert!(hub.start_download(who, &access, since).unwrap().end.is_some(), "{label}: the candidates' entries are read");
            let (docs, purge, end) = run(&access);
            let (walked_docs, walked_purge, walked_end) = run(&Walking(Assignments { dir: dir.clone() }));
            assert_eq!(docs.iter().map(|d| &d.0).collect::<Vec<_>>(), walked_docs.iter().map(|d| &d.0).collect::<Vec<_>>(), "{label}: the same people, in log order");
            assert!(docs == walked_docs, "{label}: the same data");
            assert_eq!(purge, walked_purge, "{label}");
            assert!(end.seq >= walked_end.seq, "{label}: {end:?} behind {walked_end:?}");
            let mut rest = Vec::new();
            hub.download(who, &access, end, &Pushed::new(), &HashSet::new(), usize::MAX, |b| {
                rest.extend(b.docs.into_iter().map(|d| d.doc).chain(b.purge));
                true
            })
            .unwrap();
            assert!(rest.is_empty(), "{label}: sent again from where it ended: {rest:?}");
            (docs.len(), purge.len())
        };
        let n = 300;
        for i in 0..n {
            let doc = format!("p-{i:03}");
            let mut phone = Phone(Automerge::new());
            phone.edit(&"x".repeat(i % 40));
            assert_eq!(phone.push(&hub, &doc, None).unwrap(), AckStatus::Stored);
            let workers: &[&str] = match i % 6 {
                0 | 1 => &["w"],
                2 => &["w", "w-10"],
                3 | 4 => &["w-10"],
                _ => &[],
            };
            let workers: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
            assert!(dir.assign("o", &doc, &workers, 0, "test").unwrap().is_empty());
            // Until the index is marked built (at start, by `AppState::open`), caseloads give no
            // answer and downloads walk; the first half is assigned before that.
            if i == n / 2 {
                assert!(dir.caseload("o", "w").unwrap().is_none());
                assert_eq!(dir.index_caseloads().unwrap(), 0, "assignments index themselves");
                // Of p-000 to p-150: 51 of w's alone and 25 shared with w-10.
                assert_eq!(dir.caseload("o", "w").unwrap().unwrap().len(), 51 + 25);
            }
        }
        let middle = store.head("o").unwrap();
        // After the middle: people taken from w, erased while w had them, taken from w and then
        // erased, erased while only w-10 had them, erased while nobody had them, and edited.
        for i in 0..n {
            let doc = format!("p-{i:03}");
            let take = || assert!(hub.touch("o", &doc, |seq| dir.unassign("o", &doc, "w", seq)).unwrap() > 0);
            let erase = || assert!(hub.erase("o", &doc, || dir.bury("o", &doc, "test")).unwrap());
            match i % 30 {
                0 => take(),
                1 | 3 | 5 => erase(),
                2 => {
                    take();
                    erase();
                }
                6..=8 => {
                    let mut phone = Phone(load("o", &doc, &store.load_doc("o", &doc).unwrap().unwrap().concat()).unwrap());
                    let acked = phone.0.get_heads();
                    phone.edit("later");
                    assert_eq!(phone.push(&hub, &doc, Some(&acked)).unwrap(), AckStatus::Stored);
                }
                // Nobody's: changes the walk from the middle reads and the candidates leave out.
                _ if i % 6 == 5 => {
                    for k in 0..3 {
                        let mut phone = Phone(load("o", &doc, &store.load_doc("o", &doc).unwrap().unwrap().concat()).unwrap());
                        let acked = phone.0.get_heads();
                        phone.edit(&format!("nobody's {k}"));
                        assert_eq!(phone.push(&hub, &doc, Some(&acked)).unwrap(), AckStatus::Stored);
                    }
                }
                _ => {}
            }
        }
        for worker in ["w", "w-10"] {
            for revoked in [false, true] {
                let who = DeviceIdentity { org: "o".into(), device: "d".into(), worker: worker.into(), revoked, since: 0 };
                let label = format!("{worker} revoked {revoked}");
                let (sent, purged) = assert_same(&who, Cursor::START, &format!("{label} from the start"));
                if worker == "w" {
                    // w had 150; 10 taken, 10 erased, 10 taken and erased: all 30 purged.
                    assert_eq!((sent, purged), (if revoked { 0 } else { 120 }, 30), "{label}");
                }
                let (sent, purged) = assert_same(&who, middle, &format!("{label} from the middle"));
                if worker == "w" {
                    assert_eq!((sent, purged), (if revoked { 0 } else { 30 }, 30), "{label}: the edits, and the 30 taken or erased");
                }
            }
        }
    }

    /// A person whose log entry moves past the head just as a download reads it (a teammate's
    /// push landing) is still sent, with everything since the device's cursor, and the device
    /// ends at the head the download began at: the change before the head is not skipped.
    #[test]
    fn a_change_landing_as_a_download_begins_skips_nothing() {
        use crate::auth::Assignments;
        use crate::directory::Directory;
        let (hub, store) = hub(50, 1 << 20);
        let dir = Arc::new(Directory::new(MemoryStore::new()));
        dir.create_org("o", "Org").unwrap();
        dir.add_worker("o", "w", "Someone", "peer_advocate").unwrap();
        dir.index_caseloads().unwrap();
        let access = Assignments { dir: dir.clone() };
        let stored = |doc: &str| load("o", doc, &store.load_doc("o", doc).unwrap().unwrap().concat()).unwrap();
        let edit = |doc: &str, key: &str| {
            let mut phone = Phone(stored(doc));
            let acked = phone.0.get_heads();
            phone.edit(key);
            assert_eq!(phone.push(&hub, doc, Some(&acked)).unwrap(), AckStatus::Stored);
        };
        for i in 0..10 {
            let doc = format!("p-{i:03}");
            let mut phone = Phone(Automerge::new());
            phone.edit("first");
            assert_eq!(phone.push(&hub, &doc, None).unwrap(), AckStatus::Stored);
            if i == 0 {
                assert!(dir.assign("o", &doc, &["w".into()], 0, "test").unwrap().is_empty());
            }
        }
        // The device has everything up to here.
        let since = store.head("o").unwrap();
        let held = stored("p-000");
        edit("p-000", "before the head");
        // Others' people change often: the download reads the candidates' entries.
        for round in 0..10 {
            for i in 1..10 {
                edit(&format!("p-{i:03}"), &format!("round {round}"));
            }
        }
        let who = who();
        assert!(hub.start_download(&who, &access, since).unwrap().end.is_some(), "the candidates' entries are read");
        let head = store.head("o").unwrap();
        let mut teammate = Phone(stored("p-000"));
        let acked = teammate.0.get_heads();
        teammate.edit("after the head");
        let landing = teammate.0.save_after(&acked);
        *lock(&store.after_head) = Some(Box::new(move |inner| {
            inner.append("o", vec![Append { doc: "p-000".into(), write: DocWrite::Increment(landing) }]).unwrap();
        }));
        let mut got = held.clone();
        let mut sent = Vec::new();
        let end = hub
            .download(&who, &access, since, &Pushed::new(), &HashSet::new(), 100, |b| {
                sent.push(b.cursor);
                for d in b.docs {
                    assert_eq!(d.doc, "p-000");
                    got.load_incremental(&d.data).unwrap();
                }
                true
            })
            .unwrap();
        assert!(got.get(ROOT, "before the head").unwrap().is_some(), "the change before the head was sent");
        assert!(lock(&store.after_head).is_none(), "the write landed as the download began");
        assert!(got.get(ROOT, "after the head").unwrap().is_some(), "and the one that moved the entry");
        assert_eq!(end, head, "the device ends at the head the download began at");
        assert!(sent.iter().all(|c| c.seq <= head.seq), "no batch moves the device past it: {sent:?}");
        // Its next sync sends the person again: merged away.
        let mut again = Vec::new();
        hub.download(&who, &access, end, &Pushed::new(), &HashSet::new(), usize::MAX, |b| {
            again.extend(b.docs.into_iter().map(|d| d.doc));
            true
        })
        .unwrap();
        assert_eq!(again, ["p-000"]);
    }

    fn push_of(phone: &Phone, doc: &str, acked: Option<&[ChangeHash]>) -> DocPush {
        let data = match acked {
            Some(h) => phone.0.save_after(h),
            None => phone.0.save(),
        };
        DocPush { doc: doc.into(), heads: phone.0.get_heads().iter().map(|h| h.0).collect(), data }
    }

    #[test]
    fn a_push_prepared_before_another_writer_changed_its_document_keeps_both_changes() {
        let (hub, store) = hub(100, 1 << 20);
        let mut a = Phone(Automerge::new());
        a.edit("base");
        a.push(&hub, "p-1", None).unwrap();
        let mut b = Phone(a.0.fork());
        // Phone A's push (to p-1, and to a new p-2) is prepared...
        let acked = a.edit("from-a");
        let mut other = Phone(Automerge::new());
        other.edit("x");
        let prepared = hub.prepare_push(&who(), &Open::default(), vec![push_of(&a, "p-1", Some(&acked)), push_of(&other, "p-2", None)]).unwrap();
        // ...then phone B's change to p-1 is stored before A's is committed.
        let acked_b = b.edit("from-b");
        assert_eq!(b.push(&hub, "p-1", Some(&acked_b)).unwrap(), AckStatus::Stored);
        let committed = hub.commit_push(&who(), &Open::default(), prepared, &mut Pushed::new()).unwrap();
        hub.flush().unwrap();
        let acks = committed.acks;
        assert!(acks.iter().all(|a| a.status == AckStatus::Stored), "{acks:?}");
        assert_eq!(committed.written, ["p-1", "p-2"], "both documents are named as written");
        let mut both = a.0.clone();
        both.merge(&mut b.0.clone()).unwrap();
        let mut expected: Vec<String> = both.get_heads().iter().map(|h| h.to_string()).collect();
        expected.sort();
        assert_eq!(stored_heads(&store, "p-1"), expected, "the store holds A's and B's changes");
        assert_eq!(hub.heads("o", "p-1").unwrap().unwrap(), expected, "and so does the cache");
        assert_eq!(hub.heads("o", "p-2").unwrap().unwrap(), stored_heads(&store, "p-2"));
    }

    #[test]
    fn a_push_missing_a_change_stores_what_it_can_and_names_the_document_written() {
        let (hub, store) = hub(100, 1 << 20);
        let mut a = Phone(Automerge::new());
        a.edit("base");
        let acked = a.0.get_heads();
        a.push(&hub, "p-1", None).unwrap();
        // Three changes after what the server has; the push leaves out the middle one.
        a.edit("one");
        a.edit("two");
        a.edit("three");
        let changes = a.0.get_changes(&acked);
        assert_eq!(changes.len(), 3);
        let data = [changes[0].raw_bytes(), changes[2].raw_bytes()].concat();
        let heads = a.0.get_heads().iter().map(|h| h.0).collect();
        let prepared = hub.prepare_push(&who(), &Open::default(), vec![DocPush { doc: "p-1".into(), heads, data }]).unwrap();
        let committed = hub.commit_push(&who(), &Open::default(), prepared, &mut Pushed::new()).unwrap();
        hub.flush().unwrap();
        assert_eq!(committed.acks[0].status, AckStatus::NeedSync);
        assert_eq!(committed.written, ["p-1"], "the first change was stored, so the audit log must name the document");
        let stored = load("o", "p-1", &store.load_doc("o", "p-1").unwrap().unwrap().concat()).unwrap();
        assert_eq!(stored.get_heads(), vec![changes[0].hash()], "the change whose dependencies were there is stored");
    }

    #[test]
    fn access_taken_away_between_prepare_and_commit_refuses_the_push() {
        let (hub, store) = hub(100, 1 << 20);
        let access = Open::default();
        let mut a = Phone(Automerge::new());
        a.edit("a");
        let prepared = hub.prepare_push(&who(), &access, vec![push_of(&a, "p-1", None)]).unwrap();
        lock(&access.0).insert("p-1".into());
        let committed = hub.commit_push(&who(), &access, prepared, &mut Pushed::new()).unwrap();
        let acks = committed.acks;
        assert!(matches!(acks[0].status, AckStatus::Refused { code: ErrorCode::Erased, .. }), "{acks:?}");
        assert!(committed.written.is_empty(), "nothing written: {:?}", committed.written);
        assert!(store.load_doc("o", "p-1").unwrap().is_none(), "nothing stored");
        assert!(hub.heads("o", "p-1").unwrap().is_none());
    }

    /// A device's sync round that brings a change without the one it builds on (automerge's
    /// Bloom filter wrongly counted that one as held here): the change is kept, and stored as
    /// soon as a later round brings the missing one, though every round loads the document
    /// afresh. The device, having sent the change once, does not send it again.
    #[test]
    fn a_change_synced_before_the_one_it_builds_on_is_stored_when_that_one_arrives() {
        let (hub, store) = hub(100, 1 << 20);
        let mut phone = Phone(Automerge::new());
        phone.edit("base");
        phone.push(&hub, "p-1", None).unwrap();
        let base = phone.edit("second");
        phone.edit("third");
        let changes: Vec<Vec<u8>> = phone.0.get_changes(&base).iter().map(|c| c.raw_bytes().to_vec()).collect();
        let hashes: Vec<ChangeHash> = phone.0.get_changes(&base).iter().map(|c| c.hash()).collect();
        assert_eq!(changes.len(), 2);
        let carrying = |chunk: &Vec<u8>| {
            let mut msg = phone.0.generate_sync_message(&mut SyncState::new()).unwrap();
            msg.changes = automerge::sync::ChunkList::from(vec![chunk.clone()]);
            vec![DocSync { doc: "p-1".into(), msg: msg.encode() }]
        };
        let mut rounds = SyncRounds::default();
        let outcome = hub.sync_round(&who(), &Open::default(), carrying(&changes[1]), &HashSet::new(), &mut rounds).unwrap();
        assert!(outcome.stored.is_empty() && outcome.caught_up.is_empty(), "{outcome:?}");
        let reply = SyncMessage::decode(&outcome.replies[0].msg).unwrap();
        assert_eq!(reply.need, vec![hashes[0]], "the server asks for the change it lacks");
        assert_eq!(stored_heads(&store, "p-1").len(), 1);
        assert_eq!(rounds.waiting_bytes, changes[1].len(), "exactly the waiting change is held");
        let outcome = hub.sync_round(&who(), &Open::default(), carrying(&changes[0]), &HashSet::new(), &mut rounds).unwrap();
        assert_eq!((outcome.stored, outcome.caught_up), (vec!["p-1".to_string()], vec!["p-1".to_string()]), "stored, and the server has all the phone has");
        let mut expected: Vec<String> = phone.0.get_heads().iter().map(|h| h.to_string()).collect();
        expected.sort();
        assert_eq!(stored_heads(&store, "p-1"), expected, "both changes are stored");
        assert_eq!(rounds.waiting_bytes, 0, "nothing is held back any more");
    }

    /// The other way round: the server's change reaches a device without the one it builds on,
    /// and the device, loading its document afresh, asks for it again: the server sends it
    /// again, though it counts it as sent, and the device ends up with everything.
    #[test]
    fn a_change_a_device_asks_for_again_is_sent_again() {
        let (hub, _) = hub(100, 1 << 20);
        let mut writer = Phone(Automerge::new());
        writer.edit("base");
        let mut saved = writer.0.save();
        writer.push(&hub, "p-1", None).unwrap();
        let acked = writer.edit("second");
        let second = writer.0.get_heads();
        writer.push(&hub, "p-1", Some(&acked)).unwrap();
        writer.edit("third");
        writer.push(&hub, "p-1", Some(&second)).unwrap();
        let third = writer.0.get_changes(&second)[0].raw_bytes().to_vec();
        let (mut rounds, mut state) = (SyncRounds::default(), SyncState::new());
        for round in 0..8 {
            let mut reader = Automerge::load(&saved).unwrap();
            let Some(msg) = reader.generate_sync_message(&mut state) else { break };
            let replies = hub.sync_round(&who(), &Open::default(), vec![DocSync { doc: "p-1".into(), msg: msg.encode() }], &HashSet::new(), &mut rounds).unwrap().replies;
            let Some(reply) = replies.first() else { break };
            let mut reply = SyncMessage::decode(&reply.msg).unwrap();
            if round == 0 {
                assert!(!reply.changes.is_empty(), "the first answer carries the changes");
                reply.changes = automerge::sync::ChunkList::from(vec![third.clone()]);
            }
            reader.receive_sync_message(&mut state, reply).unwrap();
            saved = reader.save();
        }
        assert_eq!(Automerge::load(&saved).unwrap().get_heads(), writer.0.get_heads());
    }

    /// A sync message the server cannot read still gets an answer: silence would let the
    /// device take the document for reconciled.
    #[test]
    fn an_unreadable_sync_message_is_answered() {
        let (hub, _) = hub(100, 1 << 20);
        let mut phone = Phone(Automerge::new());
        phone.edit("base");
        phone.push(&hub, "p-1", None).unwrap();
        let mut rounds = SyncRounds::default();
        let first = phone.0.generate_sync_message(&mut SyncState::new()).unwrap();
        let replies = hub.sync_round(&who(), &Open::default(), vec![DocSync { doc: "p-1".into(), msg: first.encode() }], &HashSet::new(), &mut rounds).unwrap().replies;
        assert_eq!(replies.len(), 1);
        let replies = hub.sync_round(&who(), &Open::default(), vec![DocSync { doc: "p-1".into(), msg: b"not a sync message".to_vec() }], &HashSet::new(), &mut rounds).unwrap().replies;
        assert_eq!(replies.len(), 1);
        assert!(SyncMessage::decode(&replies[0].msg).is_ok());
    }

    #[test]
    fn a_session_holds_back_a_bounded_amount() {
        let mut rounds = SyncRounds::default();
        rounds.hold("p-1", vec![0; MAX_WAITING_BYTES - 10]);
        rounds.hold("p-2", vec![0; 11]);
        assert_eq!(rounds.waiting_bytes, MAX_WAITING_BYTES - 10);
        assert!(rounds.take_waiting("p-2").is_empty(), "over the bound: not held");
        assert_eq!(rounds.take_waiting("p-1").len(), MAX_WAITING_BYTES - 10);
        assert_eq!(rounds.waiting_bytes, 0);
        rounds.hold("p-2", vec![0; 11]);
        assert_eq!(rounds.take_waiting("p-2").len(), 11);
    }

    #[test]
    fn a_new_document_is_stored_as_pushed() {
        let (hub, store) = hub(100, 1 << 20);
        let mut a = Phone(Automerge::new());
        a.edit("a");
        let acked = a.edit("b");
        // A phone's first push is its stored bytes: a snapshot and a change after it.
        let mut data = a.0.fork_at(&acked).unwrap().save();
        data.extend(a.0.save_after(&acked));
        let push = DocPush { doc: "p-1".into(), heads: a.0.get_heads().iter().map(|h| h.0).collect(), data: data.clone() };
        let acks = hub.push(&who(), &Open::default(), vec![push], &mut Pushed::new()).unwrap();
        assert_eq!(acks[0].status, AckStatus::Stored);
        assert_eq!(store.load_doc("o", "p-1").unwrap().unwrap().concat(), data);
        let mut expected: Vec<String> = a.0.get_heads().iter().map(|h| h.to_string()).collect();
        expected.sort();
        assert_eq!(stored_heads(&store, "p-1"), expected);
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let (hub, _) = hub(1000, 4096);
        for i in 0..20 {
            let mut p = Phone(Automerge::new());
            for k in 0..20 {
                p.edit(&format!("field-{k}-{}", "x".repeat(40)));
            }
            p.push(&hub, &format!("p-{i}"), None).unwrap();
            assert!(hub.cached_bytes() <= 4096);
        }
        assert!(hub.cached_docs() >= 1 && hub.cached_docs() < 20);
    }
}
