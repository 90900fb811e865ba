//! The document hub: applies pushes, computes what a device lacks, and runs automerge's sync
//! protocol for the fallback. Documents are loaded on demand into a bounded cache; the store
//! holds the truth.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};
use lru::LruCache;
use peersync_core::protocol::{AckStatus, Cursor, DocAck, DocDown, DocPush, DocSync, ErrorCode, Hash, MAX_DOC_BYTES};
use peersync_core::StoreError;
use tokio::sync::broadcast;

use crate::auth::{Access, DeviceIdentity};
use crate::store::{Append, DocWrite, ServerStore, StoredDoc};

/// Increments a stored document may collect before it is folded into a snapshot.
const COMPACT_AFTER: usize = 16;

struct CachedDoc {
    doc: Automerge,
    /// Increments stored after the snapshot.
    increments: usize,
    /// Whether the store holds anything for it yet.
    stored: bool,
}

/// A change in an organisation's log, announced to live sessions.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub org: String,
    pub seq: u64,
}

pub struct DocHub {
    store: Arc<dyn ServerStore>,
    // std Mutexes: held for short synchronous work on blocking threads, never across an await.
    cache: Mutex<LruCache<(String, String), Arc<Mutex<CachedDoc>>>>,
    /// Serialises writers so that each increment is computed against what the store holds.
    write_lock: Mutex<()>,
    announce: broadcast::Sender<Announcement>,
}

/// What a device is known to hold of documents it pushed in this session: their heads.
pub type Pushed = HashMap<String, Vec<ChangeHash>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    /// The cached copy that holds the change, carried to the commit (not looked up again).
    entry: Arc<Mutex<CachedDoc>>,
    /// The store held nothing of it before: its creator's worker and teammates get it.
    created: bool,
    teammates: Vec<String>,
    consent: Option<peersync_core::Consent>,
}

fn applied(doc: &str, entry: &Arc<Mutex<CachedDoc>>, e: &CachedDoc) -> Applied {
    let (teammates, consent) = peersync_core::document::profile_and_consent(&e.doc);
    Applied { doc: doc.to_string(), entry: entry.clone(), created: !e.stored, teammates, consent }
}

/// One batch of a download.
pub struct DocsBatch {
    pub docs: Vec<DocDown>,
    pub purge: Vec<String>,
    pub cursor: Cursor,
    pub remaining: u32,
}

impl DocHub {
    pub fn new(store: Arc<dyn ServerStore>, cache_docs: usize) -> Self {
        let (announce, _) = broadcast::channel(1024);
        Self {
            store,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cache_docs.max(1)).expect("max(1)"))),
            write_lock: Mutex::new(()),
            announce,
        }
    }

    pub fn store(&self) -> &Arc<dyn ServerStore> {
        &self.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Announcement> {
        self.announce.subscribe()
    }

    pub fn cached_docs(&self) -> usize {
        lock(&self.cache).len()
    }

    fn cached(&self, org: &str, doc: &str) -> Result<Arc<Mutex<CachedDoc>>, StoreError> {
        let key = (org.to_string(), doc.to_string());
        if let Some(d) = lock(&self.cache).get(&key) {
            return Ok(d.clone());
        }
        let entry = match self.store.load_doc(org, doc)? {
            Some(stored) => {
                let mut am = Automerge::new();
                am.load_incremental(&stored.concat())
                    .map_err(|e| StoreError::Corrupt { key: format!("{org}/{doc}"), reason: e.to_string() })?;
                CachedDoc { doc: am, increments: stored.increments.len(), stored: true }
            }
            None => CachedDoc { doc: Automerge::new(), increments: 0, stored: false },
        };
        let entry = Arc::new(Mutex::new(entry));
        // Another thread may have loaded (and since changed) it meanwhile: theirs wins.
        let mut cache = lock(&self.cache);
        if let Some(existing) = cache.get(&key) {
            return Ok(existing.clone());
        }
        cache.put(key, entry.clone());
        Ok(entry)
    }

    fn evict(&self, org: &str, doc: &str) {
        lock(&self.cache).pop(&(org.to_string(), doc.to_string()));
    }

    /// Apply a batch of pushes; returns once the accepted ones are durable. Documents the
    /// device may not write are refused one by one; the rest are stored.
    pub fn push(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        pushes: Vec<DocPush>,
        pushed: &mut Pushed,
    ) -> Result<Vec<DocAck>, StoreError> {
        let org = who.org.as_str();
        let _w = lock(&self.write_lock);
        let mut acks = Vec::with_capacity(pushes.len());
        let mut appends = Vec::new();
        let mut touched = Vec::new();
        for p in pushes {
            let status = self.apply_one(who, access, &p, &mut appends, &mut touched);
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    for d in &touched {
                        self.evict(org, d);
                    }
                    return Err(e);
                }
            };
            if status == AckStatus::Stored {
                pushed.insert(p.doc.clone(), p.heads.iter().map(to_hash).collect());
            }
            acks.push(DocAck { doc: p.doc, status });
        }
        self.commit(who, access, appends, &touched)?;
        Ok(acks)
    }

    fn apply_one(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        p: &DocPush,
        appends: &mut Vec<(Append, Applied)>,
        touched: &mut Vec<String>,
    ) -> Result<AckStatus, StoreError> {
        if let Err(e) = peersync_core::model::validate_id("doc", &p.doc) {
            return Ok(refused(ErrorCode::InvalidDocument, e.to_string()));
        }
        if p.data.len() > MAX_DOC_BYTES {
            return Ok(refused(ErrorCode::TooLarge, format!("document data of {} bytes exceeds {MAX_DOC_BYTES}", p.data.len())));
        }
        let entry = self.cached(&who.org, &p.doc)?;
        let mut e = lock(&entry);
        if let Some(refusal) = access.check_write(who, &p.doc, e.stored)? {
            return Ok(refusal);
        }
        let before = e.doc.get_heads();
        if let Err(err) = e.doc.load_incremental(&p.data) {
            drop(e);
            self.evict(&who.org, &p.doc);
            return Ok(refused(ErrorCode::InvalidDocument, format!("not automerge data: {err}")));
        }
        let after = e.doc.get_heads();
        let complete = p.heads.iter().all(|h| e.doc.get_change_by_hash(&to_hash(h)).is_some());
        if after != before {
            let write = if e.stored {
                DocWrite::Increment(e.doc.save_after(&before))
            } else {
                DocWrite::Snapshot(e.doc.save())
            };
            appends.push((Append { doc: p.doc.clone(), write, view: crate::report::row_bytes(&p.doc, &e.doc) }, applied(&p.doc, &entry, &e)));
            touched.push(p.doc.clone());
        }
        if !complete {
            // Changes waiting for dependencies sit in automerge's queue: drop them with the
            // cached copy (what did apply is already in `appends`) and let the device reconcile
            // this document with the sync protocol.
            drop(e);
            self.evict(&who.org, &p.doc);
            return Ok(AckStatus::NeedSync);
        }
        Ok(AckStatus::Stored)
    }

    /// Store `appends` durably and bring the cache in line; tell `access` what was created
    /// and changed; announce the new log head.
    fn commit(&self, who: &DeviceIdentity, access: &dyn Access, appends: Vec<(Append, Applied)>, touched: &[String]) -> Result<(), StoreError> {
        let org = who.org.as_str();
        if appends.is_empty() {
            return Ok(());
        }
        let (appends, learnt): (Vec<Append>, Vec<Applied>) = appends.into_iter().unzip();
        let kinds: Vec<bool> = appends.iter().map(|a| matches!(a.write, DocWrite::Snapshot(_))).collect();
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
        let cursors = match self.store.append(org, appends) {
            Ok(c) => c,
            Err(e) => {
                for d in touched {
                    self.evict(org, d);
                }
                return Err(e);
            }
        };
        let mut to_compact = Vec::new();
        for ((a, snapshot), cursor) in learnt.iter().zip(&kinds).zip(&cursors) {
            let mut e = lock(&a.entry);
            e.stored = true;
            e.increments = if *snapshot { 0 } else { e.increments + 1 };
            if e.increments > COMPACT_AFTER {
                to_compact.push((a.doc.clone(), e.doc.save(), cursor.seq));
                e.increments = 0;
            }
        }
        for (doc, snapshot, upto) in to_compact {
            if let Err(err) = self.store.compact(org, &doc, snapshot, upto) {
                // The increments are still there: nothing is lost, compaction retries later.
                tracing::warn!(%org, %doc, error = %err, "compaction failed");
                self.evict(org, &doc);
            }
        }
        if let Some(last) = cursors.last() {
            let _ = self.announce.send(Announcement { org: org.to_string(), seq: last.seq });
        }
        Ok(())
    }

    /// Whether `cursor` belongs to this organisation's log history.
    pub fn cursor_known(&self, org: &str, cursor: Cursor) -> Result<bool, StoreError> {
        if cursor == Cursor::START {
            return Ok(true);
        }
        Ok(self.store.tag_at(org, cursor.seq)? == Some(cursor.tag))
    }

    /// What the device lacks since `since`, in bounded batches handed to `emit` as they are
    /// ready. Documents in `skip` are left out; for documents in `pushed` only the changes
    /// beyond the pushed heads are sent. Returns the cursor the device ends at.
    pub fn download(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        since: Cursor,
        pushed: &Pushed,
        skip: &std::collections::HashSet<String>,
        batch_bytes: usize,
        mut emit: impl FnMut(DocsBatch) -> bool,
    ) -> Result<Cursor, StoreError> {
        let org = who.org.as_str();
        let entries = self.store.changed_since(org, since.seq)?;
        let total = entries.len();
        let mut cursor = since;
        let mut docs = Vec::new();
        let mut purge = Vec::new();
        let mut size = 0usize;
        for (i, (seq, doc)) in entries.into_iter().enumerate() {
            let readable = if skip.contains(&doc) { None } else { access.read_since(who, &doc)? };
            if readable.is_none() && access.must_purge(who, &doc, since.seq)? {
                size += doc.len();
                purge.push(doc.clone());
            }
            if let Some(granted) = readable {
                let data = match pushed.get(&doc) {
                    Some(heads) => {
                        let entry = self.cached(org, &doc)?;
                        let e = lock(&entry);
                        e.doc.get_changes(heads).iter().flat_map(|c| c.raw_bytes().to_vec()).collect()
                    }
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
            cursor = Cursor { seq, tag: 0 };
            if size >= batch_bytes {
                cursor.tag = self.store.tag_at(org, seq)?.unwrap_or(0);
                let batch = DocsBatch { docs: std::mem::take(&mut docs), purge: std::mem::take(&mut purge), cursor, remaining: (total - i - 1) as u32 };
                size = 0;
                if !emit(batch) {
                    return Ok(cursor);
                }
            }
        }
        if cursor.seq != since.seq {
            cursor.tag = self.store.tag_at(org, cursor.seq)?.unwrap_or(0);
        }
        emit(DocsBatch { docs, purge, cursor, remaining: 0 });
        Ok(cursor)
    }

    /// Move `doc`'s log entry forward (after an assignment changed) and return its position.
    /// `before` runs first, under the writers' lock, with the position the entry will take.
    pub fn touch(&self, org: &str, doc: &str, before: impl FnOnce(u64) -> Result<(), StoreError>) -> Result<u64, StoreError> {
        let _w = lock(&self.write_lock);
        before(self.store.head(org)?.seq + 1)?;
        let c = self.store.append(org, vec![Append { doc: doc.to_string(), write: DocWrite::Touch, view: None }])?;
        let seq = c.last().map_or(0, |c| c.seq);
        let _ = self.announce.send(Announcement { org: org.to_string(), seq });
        Ok(seq)
    }

    /// Erase `doc`: `bury` records the tombstone first (pushes are refused from then on), then
    /// the data is deleted and its key destroyed, and the log tells devices to purge.
    pub fn erase(&self, org: &str, doc: &str, bury: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
        let _w = lock(&self.write_lock);
        bury()?;
        self.evict(org, doc);
        let c = self.store.append(org, vec![Append { doc: doc.to_string(), write: DocWrite::Erase, view: None }])?;
        self.evict(org, doc);
        if let Some(c) = c.last() {
            let _ = self.announce.send(Announcement { org: org.to_string(), seq: c.seq });
        }
        Ok(())
    }

    /// A copy of `doc` as the server holds it; `None` if it holds nothing of it.
    fn stored_copy(&self, org: &str, doc: &str) -> Result<Option<Automerge>, StoreError> {
        let entry = self.cached(org, doc)?;
        let e = lock(&entry);
        if e.stored {
            return Ok(Some(e.doc.clone()));
        }
        drop(e);
        // Nothing stored: do not let a probe fill the cache with empty documents.
        self.evict(org, doc);
        Ok(None)
    }

    /// The heads of `doc` as stored (hex, sorted); `None` if the server holds nothing of it.
    pub fn heads(&self, org: &str, doc: &str) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self.stored_copy(org, doc)?.map(|am| {
            let mut h: Vec<String> = am.get_heads().iter().map(|h| h.to_string()).collect();
            h.sort();
            h
        }))
    }

    /// The person's current record as the server holds it (for coordinators' reads).
    pub fn record(&self, org: &str, doc: &str) -> Result<Option<peersync_core::PersonRecord>, StoreError> {
        Ok(self.stored_copy(org, doc)?.and_then(|am| peersync_core::document::read_record(doc, &am).ok()))
    }

    /// One round of automerge's sync protocol for each document in `msgs`, with per-session
    /// state in `states`. Changes received are stored durably before the replies go out.
    pub fn sync_round(
        &self,
        who: &DeviceIdentity,
        access: &dyn Access,
        msgs: Vec<DocSync>,
        states: &mut HashMap<String, SyncState>,
    ) -> Result<Vec<DocSync>, StoreError> {
        let org = who.org.as_str();
        let _w = lock(&self.write_lock);
        let mut appends = Vec::new();
        let mut touched = Vec::new();
        let mut replies = Vec::new();
        for m in msgs {
            if peersync_core::model::validate_id("doc", &m.doc).is_err() {
                continue;
            }
            let entry = self.cached(org, &m.doc)?;
            let mut e = lock(&entry);
            // A document the server has never held may be created through the sync protocol too.
            let may_read = !e.stored || access.read_since(who, &m.doc)?.is_some();
            if !may_read {
                continue;
            }
            let may_write = access.check_write(who, &m.doc, e.stored)?.is_none();
            let state = states.entry(m.doc.clone()).or_default();
            if !m.msg.is_empty() {
                let Ok(msg) = SyncMessage::decode(&m.msg) else { continue };
                let before = e.doc.get_heads();
                if may_write {
                    if e.doc.receive_sync_message(state, msg).is_err() {
                        drop(e);
                        self.evict(org, &m.doc);
                        continue;
                    }
                } else {
                    // Read-only: learn what the device has without taking its changes.
                    let mut scratch = e.doc.fork();
                    let _ = scratch.receive_sync_message(state, msg);
                }
                let after = e.doc.get_heads();
                if after != before {
                    let write = if e.stored { DocWrite::Increment(e.doc.save_after(&before)) } else { DocWrite::Snapshot(e.doc.save()) };
                    appends.push((Append { doc: m.doc.clone(), write, view: crate::report::row_bytes(&m.doc, &e.doc) }, applied(&m.doc, &entry, &e)));
                    touched.push(m.doc.clone());
                }
            }
            if let Some(reply) = e.doc.generate_sync_message(state) {
                replies.push(DocSync { doc: m.doc, msg: reply.encode() });
            }
        }
        self.commit(who, access, appends, &touched)?;
        Ok(replies)
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
