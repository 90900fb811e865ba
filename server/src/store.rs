//! Server storage: person documents, each organisation's change log, device sync records.
//!
//! [`ServerStore`] is shaped for more than one backend: its operations map onto tables
//! (`docs(org, doc, seq, data)`, `log(org, seq, doc, tag)`, `devices(org, device, info)`), so a
//! PostgreSQL backend for several server nodes can implement it directly. [`KvServerStore`]
//! implements it over any ordered key-value store (sled on disk, memory in tests) and every
//! backend runs the same suite ([`server_store_suite!`]).
//!
//! The log holds, per organisation, one entry per document: the sequence number of the
//! document's latest change. A device that asks for "everything since N" gets the documents
//! whose entry is above N. Each document's data is a snapshot plus increments, each keyed by the
//! log sequence number that wrote it, so "what changed since N" is a range read that needs no
//! automerge work.

use std::sync::Mutex;

use peersync_core::crypto::Cipher;
use peersync_core::protocol::Cursor;
use peersync_core::store::{LocalStore, Write};
use peersync_core::StoreError;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// A document as stored: a snapshot covering every change up to its sequence number, and
/// increments written after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub increments: Vec<(u64, Vec<u8>)>,
}

impl StoredDoc {
    /// Sequence number of the latest data.
    pub fn last_seq(&self) -> u64 {
        self.increments.last().map(|(s, _)| *s).or(self.snapshot.as_ref().map(|(s, _)| *s)).unwrap_or(0)
    }

    /// All the data, concatenated: a valid input to automerge's `load_incremental`.
    pub fn concat(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some((_, s)) = &self.snapshot {
            out.extend_from_slice(s);
        }
        for (_, i) in &self.increments {
            out.extend_from_slice(i);
        }
        out
    }

    pub fn bytes(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |(_, s)| s.len()) + self.increments.iter().map(|(_, i)| i.len()).sum::<usize>()
    }
}

/// New data for a document, appended under the next sequence number of the log.
#[derive(Debug, Clone)]
pub enum DocWrite {
    /// Changes since what is stored.
    Increment(Vec<u8>),
    /// The document's whole state; replaces what is stored.
    Snapshot(Vec<u8>),
    /// No new data: only move the document's log entry forward, so devices look at it again
    /// (it was assigned to someone new, or taken away).
    Touch,
    /// Delete the document's data and destroy its key; the log entry moves forward so that
    /// devices learn to purge it.
    Erase,
}

#[derive(Debug, Clone)]
pub struct Append {
    pub doc: String,
    pub write: DocWrite,
}

/// What the server remembers of a device's syncs (for sync health on the dashboard).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSync {
    pub cursor: u64,
    /// When the device last completed a sync.
    pub last_sync_at: Option<chrono::DateTime<chrono::Utc>>,
    pub docs_received: u64,
    pub docs_sent: u64,
    /// Documents the device offered in its last sync that the server did not store (refused,
    /// or left for reconciliation): still pending on the phone.
    #[serde(default)]
    pub pending: u64,
    /// The last error that ended a sync of this device, and when.
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub trait ServerStore: Send + Sync + 'static {
    /// Atomically and durably: give each append the next sequence number of `org`'s log, store
    /// its data and point the document's log entry at it. Returns each append's cursor, in order.
    fn append(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError>;
    /// As [`append`](Self::append), but durable only at the next [`flush`](Self::flush) (or any
    /// durable write): writers commit one after another and flush together. An erasure is
    /// durable at once all the same, since its key is destroyed after.
    fn append_deferred(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError>;
    /// Make every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Make sure each of `docs` has its data key, durably (see [`crate::keyring`]). An append
    /// does this itself, under the store's append lock; writers call this first, before the
    /// writers' lock, so that new people's keys (a file write and sync) are not made one writer
    /// at a time. A key left by a write that then did not happen seals nothing: harmless.
    fn prepare_keys(&self, org: &str, docs: &[&str]) -> Result<(), StoreError>;
    fn load_doc(&self, org: &str, doc: &str) -> Result<Option<StoredDoc>, StoreError>;
    /// Replace the data with sequence numbers up to `upto` by `snapshot` (the log is unchanged).
    fn compact(&self, org: &str, doc: &str, snapshot: Vec<u8>, upto: u64) -> Result<(), StoreError>;
    /// Documents whose latest change is after `after`, as `(seq, doc)` in log order.
    fn changed_since(&self, org: &str, after: u64) -> Result<Vec<(u64, String)>, StoreError>;
    /// The log entries of `docs` (those that have one) after `after`, as `(seq, doc)` in log
    /// order: what [`changed_since`](Self::changed_since) lists of them.
    fn entries_of(&self, org: &str, docs: &[String], after: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let wanted: std::collections::HashSet<&str> = docs.iter().map(String::as_str).collect();
        let mut out = self.changed_since(org, after)?;
        out.retain(|(_, doc)| wanted.contains(doc.as_str()));
        Ok(out)
    }
    /// The newest log position of `org` (`Cursor::START` for an empty log).
    fn head(&self, org: &str) -> Result<Cursor, StoreError>;
    /// The tag drawn for log entry `seq`, if this log has written it.
    fn tag_at(&self, org: &str, seq: u64) -> Result<Option<u32>, StoreError>;
    /// A device's sync record: readers see it at once, it is durable at the next
    /// [`flush`](Self::flush).
    fn put_device(&self, org: &str, device: &str, info: &DeviceSync) -> Result<(), StoreError>;
    fn devices(&self, org: &str) -> Result<Vec<(String, DeviceSync)>, StoreError>;
    /// One device's sync record (every session reads its own at the end: one read, not the
    /// organisation's every device).
    fn device(&self, org: &str, device: &str) -> Result<Option<DeviceSync>, StoreError>;
    /// Every reporting-view row of `org`, by document (erased documents have none). Rows still
    /// due (see [`views_due`](Self::views_due)) are as of an earlier write.
    fn views(&self, org: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Documents whose data changed since their reporting row was computed, as
    /// `(org, doc, seq of the change)`: of `org`, or of every organisation; at most `limit`.
    fn views_due(&self, org: Option<&str>, limit: usize) -> Result<Vec<(String, String, u64)>, StoreError>;
    /// Store `doc`'s row computed from its data as of log position `due`, if that is still the
    /// latest change, and clear the due mark; returns whether it was. `None` clears the mark
    /// and leaves whatever row there is (a document without a readable profile has none yet).
    /// A write since then leaves the row due, for a later call with the newer position.
    fn put_view(&self, org: &str, doc: &str, due: u64, view: Option<Vec<u8>>) -> Result<bool, StoreError>;
}

/// [`ServerStore`] over an ordered key-value store. Key layout (org and doc ids hold no NUL):
/// - `S` org 0 doc            → snapshot seq (8 bytes BE) ++ snapshot
/// - `I` org 0 doc 0 seq(BE)  → increment
/// - `E` org 0 doc            → seq of the document's log entry
/// - `L` org 0 seq(BE)        → doc (one entry per document: its latest change)
/// - `T` org 0 seq(BE)        → tag of entry seq (kept after the entry moves on)
/// - `H` org                  → head seq ++ tag
/// - `V` org 0 device         → DeviceSync as JSON
/// - `R` org 0 doc            → the document's reporting-view row, sealed with its key
/// - `D` org 0 doc            → seq of the change after which the row is due (absent: up to date)
pub struct KvServerStore<S: LocalStore> {
    kv: S,
    /// Per-person keys sealing snapshots and increments (crypto-shredding on erasure).
    keyring: crate::keyring::Keyring,
    rng: SystemRandom,
    // Appends are serialised so that sequence numbers become visible in order: a reader that
    // sees entry N has seen every entry below N.
    append_lock: Mutex<()>,
}

fn k(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![tag];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(p);
    }
    key
}

fn seq_key(tag: u8, org: &str, seq: u64) -> Vec<u8> {
    let mut key = k(tag, &[org.as_bytes(), b""]);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn be64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt { key: what.to_string(), reason: "expected 8-byte sequence number".into() })
}

impl<S: LocalStore> KvServerStore<S> {
    /// Over `kv`, with person keys in memory only (tests).
    pub fn new(kv: S) -> Self {
        Self::with_keyring(kv, crate::keyring::Keyring::in_memory())
    }

    pub fn with_keyring(kv: S, keyring: crate::keyring::Keyring) -> Self {
        Self { kv, keyring, rng: SystemRandom::new(), append_lock: Mutex::new(()) }
    }

    fn cipher(&self, org: &str, doc: &str) -> Result<Option<Cipher>, StoreError> {
        self.keyring.get(org, doc).map(|k| Cipher::new(&k)).transpose()
    }

    fn open_value(&self, cipher: &Cipher, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        cipher.open(key, sealed).ok_or_else(|| StoreError::Tampered { key: String::from_utf8_lossy(key).replace('\0', "/") })
    }

    fn tag(&self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.rng.fill(&mut b).map_err(|_| StoreError::Io("random generator failed".into()))?;
        // Zero is the tag of the start cursor; never draw it.
        Ok(u32::from_be_bytes(b).max(1))
    }

    fn increment_prefix(org: &str, doc: &str) -> Vec<u8> {
        k(b'I', &[org.as_bytes(), doc.as_bytes(), b""])
    }

    /// See [`ServerStore::append`]; durable before returning if `durable`.
    fn append_with(&self, org: &str, appends: Vec<Append>, durable: bool) -> Result<Vec<Cursor>, StoreError> {
        let _serial = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let with_data: Vec<&str> = appends
            .iter()
            .filter(|a| matches!(a.write, DocWrite::Increment(_) | DocWrite::Snapshot(_)))
            .map(|a| a.doc.as_str())
            .collect();
        self.keyring.ensure(org, &with_data)?;
        let mut erased = Vec::new();
        let head = self.head(org)?;
        let mut seq = head.seq;
        let mut batch = Vec::new();
        let mut out = Vec::with_capacity(appends.len());
        // Within one batch a document may appear twice; track its entry as we go.
        let mut entries: std::collections::HashMap<String, Option<u64>> = Default::default();
        for a in appends {
            seq += 1;
            let tag = self.tag()?;
            let (o, d) = (org.as_bytes(), a.doc.as_bytes());
            let previous = match entries.get(&a.doc) {
                Some(p) => *p,
                None => self.kv.get(&k(b'E', &[o, d]))?.map(|v| be64(&v, "E")).transpose()?,
            };
            if let Some(p) = previous {
                batch.push(Write::Delete(seq_key(b'L', org, p)));
            }
            entries.insert(a.doc.clone(), Some(seq));
            batch.push(Write::Put(seq_key(b'L', org, seq), d.to_vec()));
            batch.push(Write::Put(seq_key(b'T', org, seq), tag.to_be_bytes().to_vec()));
            batch.push(Write::Put(k(b'E', &[o, d]), seq.to_be_bytes().to_vec()));
            // New data marks the reporting row due (see `put_view`), in the same batch as the
            // data: a crash cannot leave new data with a row nobody knows to recompute.
            if matches!(a.write, DocWrite::Increment(_) | DocWrite::Snapshot(_)) {
                batch.push(Write::Put(k(b'D', &[o, d]), seq.to_be_bytes().to_vec()));
            }
            match a.write {
                DocWrite::Increment(data) => {
                    let cipher = self.cipher(org, &a.doc)?.expect("ensured above");
                    let mut key = Self::increment_prefix(org, &a.doc);
                    key.extend_from_slice(&seq.to_be_bytes());
                    let sealed = cipher.seal(&key, &data)?;
                    batch.push(Write::Put(key, sealed));
                }
                DocWrite::Snapshot(data) => {
                    let cipher = self.cipher(org, &a.doc)?.expect("ensured above");
                    for key in self.kv.keys_with_prefix(&Self::increment_prefix(org, &a.doc))? {
                        batch.push(Write::Delete(key));
                    }
                    let key = k(b'S', &[o, d]);
                    let mut v = seq.to_be_bytes().to_vec();
                    v.extend_from_slice(&cipher.seal(&key, &data)?);
                    batch.push(Write::Put(key, v));
                }
                DocWrite::Touch => {}
                DocWrite::Erase => {
                    for key in self.kv.keys_with_prefix(&Self::increment_prefix(org, &a.doc))? {
                        batch.push(Write::Delete(key));
                    }
                    batch.push(Write::Delete(k(b'S', &[o, d])));
                    batch.push(Write::Delete(k(b'R', &[o, d])));
                    batch.push(Write::Delete(k(b'D', &[o, d])));
                    erased.push(a.doc.clone());
                }
            }
            out.push(Cursor { seq, tag });
        }
        if let Some(last) = out.last() {
            let mut h = last.seq.to_be_bytes().to_vec();
            h.extend_from_slice(&last.tag.to_be_bytes());
            batch.push(Write::Put(k(b'H', &[org.as_bytes()]), h));
        }
        // Erasures are durable at once whatever was asked: their keys are destroyed next.
        if durable || !erased.is_empty() {
            self.kv.apply(batch)?;
        } else {
            self.kv.apply_deferred(batch)?;
        }
        // Only once the data is durably gone: destroy the keys, which makes any copy sled still
        // holds in old log segments unreadable.
        for doc in erased {
            self.keyring.destroy(org, &doc)?;
        }
        Ok(out)
    }
}

impl<S: LocalStore> ServerStore for KvServerStore<S> {
    fn append(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError> {
        self.append_with(org, appends, true)
    }

    fn append_deferred(&self, org: &str, appends: Vec<Append>) -> Result<Vec<Cursor>, StoreError> {
        self.append_with(org, appends, false)
    }

    fn prepare_keys(&self, org: &str, docs: &[&str]) -> Result<(), StoreError> {
        self.keyring.ensure(org, docs)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush()
    }

    fn load_doc(&self, org: &str, doc: &str) -> Result<Option<StoredDoc>, StoreError> {
        let skey = k(b'S', &[org.as_bytes(), doc.as_bytes()]);
        let raw_snapshot = self.kv.get(&skey)?;
        let prefix = Self::increment_prefix(org, doc);
        let raw_increments = self.kv.scan_prefix(&prefix)?;
        if raw_snapshot.is_none() && raw_increments.is_empty() {
            return Ok(None);
        }
        let Some(cipher) = self.cipher(org, doc)? else {
            return Err(StoreError::Corrupt { key: format!("{org}/{doc}"), reason: "data without a key".into() });
        };
        let snapshot = match raw_snapshot {
            Some(v) if v.len() >= 8 => Some((be64(&v, "S")?, self.open_value(&cipher, &skey, &v[8..])?)),
            Some(_) => return Err(StoreError::Corrupt { key: format!("{org}/{doc}"), reason: "short snapshot".into() }),
            None => None,
        };
        let mut increments = Vec::new();
        for (key, v) in raw_increments {
            increments.push((be64(&key[prefix.len()..], "I")?, self.open_value(&cipher, &key, &v)?));
        }
        Ok(Some(StoredDoc { snapshot, increments }))
    }

    fn compact(&self, org: &str, doc: &str, snapshot: Vec<u8>, upto: u64) -> Result<(), StoreError> {
        let _serial = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = Self::increment_prefix(org, doc);
        let mut batch = Vec::new();
        for key in self.kv.keys_with_prefix(&prefix)? {
            if be64(&key[prefix.len()..], "I")? <= upto {
                batch.push(Write::Delete(key));
            }
        }
        let Some(cipher) = self.cipher(org, doc)? else { return Ok(()) };
        let skey = k(b'S', &[org.as_bytes(), doc.as_bytes()]);
        let mut v = upto.to_be_bytes().to_vec();
        v.extend_from_slice(&cipher.seal(&skey, &snapshot)?);
        batch.push(Write::Put(skey, v));
        self.kv.apply(batch)
    }

    fn changed_since(&self, org: &str, after: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let from = seq_key(b'L', org, after.saturating_add(1));
        let to = seq_key(b'L', org, u64::MAX);
        let prefix_len = from.len() - 8;
        let mut out = Vec::new();
        for (key, v) in self.kv.scan_range(&from, &to)? {
            let doc = String::from_utf8(v).map_err(|_| StoreError::Corrupt { key: "L".into(), reason: "doc id not UTF-8".into() })?;
            out.push((be64(&key[prefix_len..], "L")?, doc));
        }
        Ok(out)
    }

    fn entries_of(&self, org: &str, docs: &[String], after: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            if let Some(v) = self.kv.get(&k(b'E', &[org.as_bytes(), doc.as_bytes()]))? {
                let seq = be64(&v, "E")?;
                if seq > after {
                    out.push((seq, doc.clone()));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn head(&self, org: &str) -> Result<Cursor, StoreError> {
        Ok(match self.kv.get(&k(b'H', &[org.as_bytes()]))? {
            Some(v) if v.len() == 12 => Cursor { seq: be64(&v, "H")?, tag: u32::from_be_bytes(v[8..12].try_into().expect("length checked")) },
            Some(_) => return Err(StoreError::Corrupt { key: "H".into(), reason: "bad head".into() }),
            None => Cursor::START,
        })
    }

    fn tag_at(&self, org: &str, seq: u64) -> Result<Option<u32>, StoreError> {
        Ok(self.kv.get(&seq_key(b'T', org, seq))?.and_then(|v| v.try_into().ok()).map(u32::from_be_bytes))
    }

    fn put_device(&self, org: &str, device: &str, info: &DeviceSync) -> Result<(), StoreError> {
        let v = serde_json::to_vec(info).expect("plain data serializes");
        self.kv.apply_deferred(vec![Write::Put(k(b'V', &[org.as_bytes(), device.as_bytes()]), v)])
    }

    fn views(&self, org: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = k(b'R', &[org.as_bytes(), b""]);
        let mut out = Vec::new();
        for (key, v) in self.kv.scan_prefix(&prefix)? {
            let doc = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            // A row whose key was destroyed belongs to an erased person: it counts nowhere.
            let Some(cipher) = self.cipher(org, &doc)? else { continue };
            out.push((doc, self.open_value(&cipher, &key, &v)?));
        }
        Ok(out)
    }

    fn views_due(&self, org: Option<&str>, limit: usize) -> Result<Vec<(String, String, u64)>, StoreError> {
        let prefix = match org {
            Some(org) => k(b'D', &[org.as_bytes(), b""]),
            None => vec![b'D'],
        };
        let mut out = Vec::new();
        for (key, v) in self.kv.scan_prefix_first(&prefix, limit)? {
            let mut parts = key[1..].splitn(2, |b| *b == 0);
            let (Some(o), Some(d)) = (parts.next(), parts.next()) else {
                return Err(StoreError::Corrupt { key: String::from_utf8_lossy(&key).into_owned(), reason: "a due-row key without its document".into() });
            };
            out.push((String::from_utf8_lossy(o).into_owned(), String::from_utf8_lossy(d).into_owned(), be64(&v, "D")?));
        }
        Ok(out)
    }

    fn put_view(&self, org: &str, doc: &str, due: u64, view: Option<Vec<u8>>) -> Result<bool, StoreError> {
        // The appends' lock: no write can slip in between the check and the row.
        let _serial = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (o, d) = (org.as_bytes(), doc.as_bytes());
        let due_key = k(b'D', &[o, d]);
        if self.kv.get(&due_key)?.map(|v| be64(&v, "D")).transpose()? != Some(due) {
            return Ok(false);
        }
        let mut batch = vec![Write::Delete(due_key)];
        if let Some(view) = view {
            // No key: erased meanwhile (its due mark went with it, so this is not reached).
            let Some(cipher) = self.cipher(org, doc)? else { return Ok(false) };
            let key = k(b'R', &[o, d]);
            let sealed = cipher.seal(&key, &view)?;
            batch.push(Write::Put(key, sealed));
        }
        // Not flushed: if a crash loses this write, the due mark survives and the row is
        // computed again.
        self.kv.apply_deferred(batch)?;
        Ok(true)
    }

    fn device(&self, org: &str, device: &str) -> Result<Option<DeviceSync>, StoreError> {
        self.kv
            .get(&k(b'V', &[org.as_bytes(), device.as_bytes()]))?
            .map(|v| serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt { key: "V".into(), reason: e.to_string() }))
            .transpose()
    }

    fn devices(&self, org: &str) -> Result<Vec<(String, DeviceSync)>, StoreError> {
        let prefix = k(b'V', &[org.as_bytes(), b""]);
        let mut out = Vec::new();
        for (key, v) in self.kv.scan_prefix(&prefix)? {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let info = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt { key: "V".into(), reason: e.to_string() })?;
            out.push((id, info));
        }
        Ok(out)
    }
}

/// The conformance suite for [`ServerStore`] backends: `server_store_suite!(make)` where
/// `make()` returns a fresh, empty store.
#[cfg(test)]
macro_rules! server_store_suite {
    ($make:expr) => {
        use peersync_core::protocol::Cursor;
        use $crate::store::{Append, DeviceSync, DocWrite, ServerStore};

        fn inc(doc: &str, data: &[u8]) -> Append {
            Append { doc: doc.into(), write: DocWrite::Increment(data.to_vec()) }
        }

        #[test]
        fn appends_get_consecutive_sequence_numbers_and_tags() {
            let s = $make();
            assert_eq!(s.head("o").unwrap(), Cursor::START);
            let c = s.append("o", vec![inc("a", b"1"), inc("b", b"2")]).unwrap();
            assert_eq!(c.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
            assert!(c.iter().all(|c| c.tag != 0));
            let c3 = s.append("o", vec![inc("a", b"3")]).unwrap();
            assert_eq!(c3[0].seq, 3);
            assert_eq!(s.head("o").unwrap(), c3[0]);
            assert_eq!(s.tag_at("o", 1).unwrap(), Some(c[0].tag));
            assert_eq!(s.tag_at("o", 9).unwrap(), None);
            assert_eq!(s.head("other").unwrap(), Cursor::START, "organisations have separate logs");
        }

        #[test]
        fn the_log_keeps_one_entry_per_document() {
            let s = $make();
            s.append("o", vec![inc("a", b"1"), inc("b", b"2"), inc("a", b"3")]).unwrap();
            assert_eq!(s.changed_since("o", 0).unwrap(), vec![(2, "b".to_string()), (3, "a".to_string())]);
            assert_eq!(s.changed_since("o", 2).unwrap(), vec![(3, "a".to_string())]);
            assert!(s.changed_since("o", 3).unwrap().is_empty());
            assert!(s.changed_since("x", 0).unwrap().is_empty());
        }

        #[test]
        fn the_entries_of_some_documents_are_what_the_log_lists_of_them() {
            let s = $make();
            s.append("o", vec![inc("a", b"1"), inc("b", b"2"), inc("c", b"3"), inc("a", b"4"), inc("d", b"5")]).unwrap();
            s.append("p", vec![inc("b", b"1")]).unwrap();
            let docs = |d: &[&str]| d.iter().map(|d| d.to_string()).collect::<Vec<_>>();
            let all = docs(&["a", "b", "c", "d", "e"]);
            for after in 0..=6 {
                assert_eq!(s.entries_of("o", &all, after).unwrap(), s.changed_since("o", after).unwrap(), "after {after}");
            }
            // Only the documents asked for, in log order whatever the order asked, each once.
            assert_eq!(s.entries_of("o", &docs(&["d", "b", "e", "b"]), 0).unwrap(), vec![(2, "b".to_string()), (5, "d".to_string())]);
            assert_eq!(s.entries_of("p", &all, 0).unwrap(), vec![(1, "b".to_string())], "organisations have separate logs");
        }

        #[test]
        fn documents_are_snapshot_plus_increments_by_sequence() {
            let s = $make();
            assert_eq!(s.load_doc("o", "a").unwrap(), None);
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Snapshot(b"S".to_vec()) }]).unwrap();
            s.append("o", vec![inc("a", b"i2"), inc("b", b"x"), inc("a", b"i4")]).unwrap();
            let d = s.load_doc("o", "a").unwrap().unwrap();
            assert_eq!(d.snapshot, Some((1, b"S".to_vec())));
            assert_eq!(d.increments, vec![(2, b"i2".to_vec()), (4, b"i4".to_vec())]);
            assert_eq!(d.last_seq(), 4);
            assert_eq!(d.concat(), b"Si2i4".to_vec());
            s.compact("o", "a", b"S2".to_vec(), 2).unwrap();
            let d = s.load_doc("o", "a").unwrap().unwrap();
            assert_eq!(d.snapshot, Some((2, b"S2".to_vec())));
            assert_eq!(d.increments, vec![(4, b"i4".to_vec())]);
            // A snapshot write replaces everything.
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Snapshot(b"S5".to_vec()) }]).unwrap();
            let d = s.load_doc("o", "a").unwrap().unwrap();
            assert_eq!(d.snapshot, Some((5, b"S5".to_vec())));
            assert!(d.increments.is_empty());
            assert_eq!(s.load_doc("p", "a").unwrap(), None, "documents do not cross organisations");
        }

        #[test]
        fn touch_moves_the_entry_and_erase_removes_the_data() {
            let s = $make();
            s.append("o", vec![inc("a", b"1"), inc("b", b"2")]).unwrap();
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Touch }]).unwrap();
            assert_eq!(s.changed_since("o", 2).unwrap(), vec![(3, "a".to_string())]);
            assert_eq!(s.load_doc("o", "a").unwrap().unwrap().increments, vec![(1, b"1".to_vec())]);
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Erase }]).unwrap();
            assert_eq!(s.load_doc("o", "a").unwrap(), None);
            assert_eq!(s.changed_since("o", 3).unwrap(), vec![(4, "a".to_string())]);
            assert!(s.load_doc("o", "b").unwrap().is_some());
        }

        #[test]
        fn view_rows_are_kept_and_erased_with_the_document() {
            let s = $make();
            // Each write's row, stored as the background would once it is due.
            let write = |doc: &str, w: DocWrite, row: &[u8]| {
                let seq = s.append("o", vec![Append { doc: doc.into(), write: w }]).unwrap()[0].seq;
                assert!(s.put_view("o", doc, seq, Some(row.to_vec())).unwrap());
            };
            write("a", DocWrite::Snapshot(b"S".to_vec()), b"row-a");
            write("b", DocWrite::Snapshot(b"S".to_vec()), b"row-b");
            write("a", DocWrite::Increment(b"i".to_vec()), b"row-a2");
            assert_eq!(s.views("o").unwrap(), vec![("a".to_string(), b"row-a2".to_vec()), ("b".to_string(), b"row-b".to_vec())]);
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Erase }]).unwrap();
            assert_eq!(s.views("o").unwrap(), vec![("b".to_string(), b"row-b".to_vec())]);
            assert!(s.views("p").unwrap().is_empty());
        }

        #[test]
        fn rows_left_due_by_writes_are_filled_in_only_for_the_latest_change() {
            let s = $make();
            let snap = |doc: &str| Append { doc: doc.into(), write: DocWrite::Snapshot(b"S".to_vec()) };
            let c = s.append("o", vec![snap("a"), snap("b")]).unwrap();
            s.append("p", vec![snap("c")]).unwrap();
            // A touch (no new data) leaves nothing due.
            s.append("o", vec![Append { doc: "b".into(), write: DocWrite::Touch }]).unwrap();
            assert_eq!(s.views_due(Some("o"), 10).unwrap(), vec![("o".into(), "a".into(), c[0].seq), ("o".into(), "b".into(), c[1].seq)]);
            assert_eq!(s.views_due(None, 10).unwrap().len(), 3);
            assert_eq!(s.views_due(None, 2).unwrap().len(), 2);
            assert!(s.views("o").unwrap().is_empty());

            assert!(s.put_view("o", "a", c[0].seq, Some(b"row-a".to_vec())).unwrap());
            // A row computed before a newer write is not stored, and the row stays due.
            let later = s.append("o", vec![Append { doc: "b".into(), write: DocWrite::Increment(b"i".to_vec()) }]).unwrap();
            assert!(!s.put_view("o", "b", c[1].seq, Some(b"row-b-old".to_vec())).unwrap());
            assert_eq!(s.views_due(Some("o"), 10).unwrap(), vec![("o".into(), "b".into(), later[0].seq)]);
            assert!(s.put_view("o", "b", later[0].seq, Some(b"row-b".to_vec())).unwrap());
            assert!(s.views_due(Some("o"), 10).unwrap().is_empty());
            assert_eq!(s.views("o").unwrap(), vec![("a".to_string(), b"row-a".to_vec()), ("b".to_string(), b"row-b".to_vec())]);

            // Erasure takes the due mark with it: no row can come back.
            s.append("p", vec![Append { doc: "c".into(), write: DocWrite::Erase }]).unwrap();
            assert!(s.views_due(None, 10).unwrap().is_empty());
            assert!(!s.put_view("p", "c", 1, Some(b"row-c".to_vec())).unwrap());
            assert!(s.views("p").unwrap().is_empty());
        }

        #[test]
        fn keys_made_ahead_serve_the_write_and_an_unused_one_harms_nothing() {
            let s = $make();
            s.prepare_keys("o", &["a", "never"]).unwrap();
            s.append("o", vec![Append { doc: "a".into(), write: DocWrite::Snapshot(b"S".to_vec()) }]).unwrap();
            assert_eq!(s.load_doc("o", "a").unwrap().unwrap().concat(), b"S".to_vec());
            // Made again: the key and what it seals stay as they were.
            s.prepare_keys("o", &["a"]).unwrap();
            s.append("o", vec![inc("a", b"i")]).unwrap();
            assert_eq!(s.load_doc("o", "a").unwrap().unwrap().concat(), b"Si".to_vec());
            // A key whose write never came: nothing to read, and the person can still be erased.
            assert_eq!(s.load_doc("o", "never").unwrap(), None);
            s.append("o", vec![Append { doc: "never".into(), write: DocWrite::Erase }]).unwrap();
            assert_eq!(s.load_doc("o", "never").unwrap(), None);
            assert_eq!(s.load_doc("o", "a").unwrap().unwrap().concat(), b"Si".to_vec());
        }

        #[test]
        fn device_records_round_trip() {
            let s = $make();
            let info = DeviceSync { cursor: 7, docs_received: 3, ..Default::default() };
            s.put_device("o", "d1", &info).unwrap();
            s.put_device("o2", "d2", &DeviceSync::default()).unwrap();
            assert_eq!(s.devices("o").unwrap(), vec![("d1".to_string(), info.clone())]);
            assert_eq!(s.device("o", "d1").unwrap(), Some(info));
            assert_eq!(s.device("o", "d2").unwrap(), None, "another organisation's device");
            assert_eq!(s.device("o2", "d2").unwrap(), Some(DeviceSync::default()));
        }
    };
}

#[cfg(test)]
mod memory_suite {
    server_store_suite!(|| super::KvServerStore::new(peersync_core::store::MemoryStore::new()));
}

#[cfg(test)]
mod sled_suite {
    struct TempStore(super::KvServerStore<peersync_core::store::SledStore>, #[allow(dead_code)] tempfile::TempDir);
    impl std::ops::Deref for TempStore {
        type Target = super::KvServerStore<peersync_core::store::SledStore>;
        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }
    fn make() -> TempStore {
        let dir = tempfile::tempdir().unwrap();
        let kv = peersync_core::store::SledStore::open(dir.path()).unwrap();
        TempStore(super::KvServerStore::new(kv), dir)
    }
    server_store_suite!(make);
}
