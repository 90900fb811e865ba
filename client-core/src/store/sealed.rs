//! The sealed layer: every value written through it is encrypted and authenticated, and it
//! lays out per-document data (snapshot, appended changes, metadata) over a [`LocalStore`].
//!
//! Key layout (keys are not secret: they hold only pseudonymous document ids):
//! - `k`          key check, proves the store key is right
//! - `g/<name>`   device-wide metadata (actor id, worker, sync cursor)
//! - `p/<doc>`    the document: its compacted automerge snapshot and the changes appended since
//! - `m/<doc>`    the document's metadata (caseload summary, sync bookkeeping), by name
//!
//! Two values per document, rewritten whole on each change: a key-value engine stores many
//! small values at a large multiple of their size (sled: node headers, per-entry overhead,
//! log segments cleaned only below half use), and one person's document is a few kilobytes.
//! Stores written by the first layout (`d/`, `s/`, `c/<doc>\0<seq>`, `m/<doc>\0<name>`) are
//! converted on open, in one atomic batch.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{LocalStore, Write};
use crate::crypto::Cipher;
use crate::error::StoreError;

const KEY_CHECK: &[u8] = b"k";
const KEY_CHECK_PLAIN: &[u8] = b"peersync local store v1";

/// What the store holds for one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocData {
    pub snapshot: Option<Vec<u8>>,
    /// Appended change chunks, oldest first.
    pub changes: Vec<Vec<u8>>,
    /// Sequence number the next appended chunk must use.
    pub next_seq: u64,
}

/// One write of an atomic, durable commit.
#[derive(Debug, Clone)]
pub enum StoredWrite {
    AppendChange { doc: String, seq: u64, bytes: Vec<u8> },
    /// Replace the snapshot and drop the appended chunks with `seq < upto_seq`.
    Compact { doc: String, snapshot: Vec<u8>, upto_seq: u64 },
    DocMeta { doc: String, name: String, value: Vec<u8> },
    Meta { name: String, value: Vec<u8> },
    /// Remove the document and all its metadata.
    DeleteDoc { doc: String },
}

/// The stored form of `p/<doc>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DocBlob {
    snapshot: Option<Vec<u8>>,
    /// (sequence number, change chunk), oldest first.
    changes: Vec<(u64, Vec<u8>)>,
    next_seq: u64,
}

/// The stored form of `m/<doc>`.
type DocMetas = BTreeMap<String, Vec<u8>>;

pub struct SealedStore {
    backend: Box<dyn LocalStore>,
    cipher: Cipher,
    /// Commits read, change and rewrite whole values: one at a time.
    commit_lock: Mutex<()>,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn doc_key(doc: &str) -> Vec<u8> {
    key(&[b"p/", doc.as_bytes()])
}

fn meta_key(doc: &str) -> Vec<u8> {
    key(&[b"m/", doc.as_bytes()])
}

fn printable(k: &[u8]) -> String {
    String::from_utf8_lossy(k).replace('\0', "/")
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("plain data types always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(k: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { key: printable(k), reason: e.to_string() })
}

/// First byte of a zstd-compressed `p/` value. A plain postcard `DocBlob` starts with its
/// snapshot's `Option` tag (0 or 1), so the two never mix up.
const ZSTD_BLOB: u8 = b'Z';
/// Largest `p/` value once decompressed: far above any real document (pushes are capped at
/// 2 MiB), low enough that a damaged value cannot exhaust memory.
const MAX_BLOB_BYTES: usize = 64 << 20;

/// A document's stored form, compressed as a whole. Automerge data is kept uncompressed
/// (automerge's own per-column deflate costs more CPU than anything else in a write or a
/// restore), and zstd over the whole value packs it tighter than that deflate does. Smaller
/// values also keep sled's pages under its blob-file threshold.
fn encode_blob(b: &DocBlob) -> Vec<u8> {
    let plain = encode(b);
    match crate::packing::compress(&plain, 3) {
        Ok(packed) if packed.len() + 1 < plain.len() => [&[ZSTD_BLOB][..], &packed].concat(),
        _ => plain,
    }
}

fn decode_blob(k: &[u8], bytes: &[u8]) -> Result<DocBlob, StoreError> {
    match bytes.split_first() {
        Some((&ZSTD_BLOB, packed)) => {
            let plain = crate::packing::decompress(packed, MAX_BLOB_BYTES)
                .map_err(|e| StoreError::Corrupt { key: printable(k), reason: format!("cannot decompress: {e}") })?;
            decode(k, &plain)
        }
        _ => decode(k, bytes),
    }
}

impl SealedStore {
    /// Open over `backend` with the app's 32-byte key. A store made with another key is refused
    /// with [`StoreError::WrongKey`]; nothing is read or written then.
    pub fn open(backend: Box<dyn LocalStore>, key: &[u8]) -> Result<Self, StoreError> {
        let cipher = Cipher::new(key)?;
        let store = Self { backend, cipher, commit_lock: Mutex::new(()) };
        match store.backend.get(KEY_CHECK)? {
            Some(sealed) => match store.cipher.open(KEY_CHECK, &sealed) {
                Some(plain) if plain == KEY_CHECK_PLAIN => store.upgrade_layout()?,
                _ => return Err(StoreError::WrongKey),
            },
            None => {
                let sealed = store.cipher.seal(KEY_CHECK, KEY_CHECK_PLAIN)?;
                store.backend.apply(vec![Write::Put(KEY_CHECK.to_vec(), sealed)])?;
            }
        }
        Ok(store)
    }

    fn unseal(&self, k: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.cipher
            .open(k, sealed)
            .ok_or_else(|| StoreError::Tampered { key: printable(k) })
    }

    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.backend.get(k)? {
            Some(v) => self.unseal(k, &v).map(Some),
            None => Ok(None),
        }
    }

    fn put(&self, out: &mut Vec<Write>, k: Vec<u8>, plain: &[u8]) -> Result<(), StoreError> {
        let sealed = self.cipher.seal(&k, plain)?;
        out.push(Write::Put(k, sealed));
        Ok(())
    }

    fn blob(&self, doc: &str) -> Result<Option<DocBlob>, StoreError> {
        let k = doc_key(doc);
        self.get(&k)?.map(|b| decode_blob(&k, &b)).transpose()
    }

    fn metas(&self, doc: &str) -> Result<Option<DocMetas>, StoreError> {
        let k = meta_key(doc);
        self.get(&k)?.map(|b| decode(&k, &b)).transpose()
    }

    /// Ids of every document in the store, in order.
    pub fn doc_ids(&self) -> Result<Vec<String>, StoreError> {
        self.backend
            .keys_with_prefix(b"p/")?
            .into_iter()
            .map(|k| {
                String::from_utf8(k[2..].to_vec()).map_err(|_| StoreError::Corrupt {
                    key: printable(&k),
                    reason: "document id is not UTF-8".into(),
                })
            })
            .collect()
    }

    pub fn load_doc(&self, doc: &str) -> Result<Option<DocData>, StoreError> {
        Ok(self.blob(doc)?.map(|b| DocData {
            snapshot: b.snapshot,
            changes: b.changes.into_iter().map(|(_, c)| c).collect(),
            next_seq: b.next_seq,
        }))
    }

    pub fn doc_meta(&self, doc: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.metas(doc)?.and_then(|mut m| m.remove(name)))
    }

    /// The metadata `name` of every document that has it, by document id.
    pub fn doc_meta_all(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.backend.scan_prefix(b"m/")? {
            let mut metas: DocMetas = decode(&k, &self.unseal(&k, &v)?)?;
            if let Some(value) = metas.remove(name) {
                out.push((String::from_utf8_lossy(&k[2..]).into_owned(), value));
            }
        }
        Ok(out)
    }

    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(&key(&[b"g/", name.as_bytes()]))
    }

    /// Apply `writes` atomically; returns once they are durable.
    pub fn commit(&self, writes: Vec<StoredWrite>) -> Result<(), StoreError> {
        let _one_at_a_time = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Each touched document's values, read once, changed in memory, written once;
        // `None` means deleted.
        let mut blobs: BTreeMap<String, Option<DocBlob>> = BTreeMap::new();
        let mut metas: BTreeMap<String, Option<DocMetas>> = BTreeMap::new();
        let mut out = Vec::new();
        for w in writes {
            match w {
                StoredWrite::AppendChange { doc, seq, bytes } => {
                    let b = self.touched(&mut blobs, &doc, Self::blob)?;
                    b.changes.push((seq, bytes));
                    b.next_seq = b.next_seq.max(seq + 1);
                }
                StoredWrite::Compact { doc, snapshot, upto_seq } => {
                    let b = self.touched(&mut blobs, &doc, Self::blob)?;
                    b.snapshot = Some(snapshot);
                    b.changes.retain(|(seq, _)| *seq >= upto_seq);
                    // Sequence numbers keep rising even once no chunk is left to tell.
                    b.next_seq = b.next_seq.max(upto_seq);
                }
                StoredWrite::DocMeta { doc, name, value } => {
                    self.touched(&mut metas, &doc, Self::metas)?.insert(name, value);
                }
                StoredWrite::Meta { name, value } => {
                    self.put(&mut out, key(&[b"g/", name.as_bytes()]), &value)?;
                }
                StoredWrite::DeleteDoc { doc } => {
                    blobs.insert(doc.clone(), None);
                    metas.insert(doc, None);
                }
            }
        }
        for (doc, b) in blobs {
            match b {
                Some(b) => self.put(&mut out, doc_key(&doc), &encode_blob(&b))?,
                None => out.push(Write::Delete(doc_key(&doc))),
            }
        }
        for (doc, m) in metas {
            match m {
                Some(m) => self.put(&mut out, meta_key(&doc), &encode(&m))?,
                None => out.push(Write::Delete(meta_key(&doc))),
            }
        }
        self.backend.apply(out)
    }

    /// The in-commit copy of one document's value, read from the store on first touch (or
    /// started empty, also after a delete earlier in the same commit).
    fn touched<'a, T: Default>(
        &self,
        map: &'a mut BTreeMap<String, Option<T>>,
        doc: &str,
        read: impl Fn(&Self, &str) -> Result<Option<T>, StoreError>,
    ) -> Result<&'a mut T, StoreError> {
        if !map.contains_key(doc) {
            let current = read(self, doc)?;
            map.insert(doc.to_string(), current);
        }
        Ok(map.get_mut(doc).expect("inserted above").get_or_insert_with(T::default))
    }

    /// Convert a store of the first layout, if this is one: every document's values move to
    /// the current keys in one atomic batch, so a crash leaves either layout whole.
    fn upgrade_layout(&self) -> Result<(), StoreError> {
        let markers = self.backend.keys_with_prefix(b"d/")?;
        // A first-layout store may hold only metadata (sync bookkeeping of purged documents):
        // any of its key shapes means it must be converted.
        let first_layout = !markers.is_empty()
            || !self.backend.keys_with_prefix(b"s/")?.is_empty()
            || !self.backend.keys_with_prefix(b"c/")?.is_empty()
            || self.backend.keys_with_prefix(b"m/")?.iter().any(|k| k.contains(&0));
        if !first_layout {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut blobs: BTreeMap<String, DocBlob> = BTreeMap::new();
        let mut metas: BTreeMap<String, DocMetas> = BTreeMap::new();
        for k in markers {
            blobs.entry(String::from_utf8_lossy(&k[2..]).into_owned()).or_default();
            out.push(Write::Delete(k));
        }
        for (k, v) in self.backend.scan_prefix(b"s/")? {
            let doc = String::from_utf8_lossy(&k[2..]).into_owned();
            blobs.entry(doc).or_default().snapshot = Some(self.unseal(&k, &v)?);
            out.push(Write::Delete(k));
        }
        for (k, v) in self.backend.scan_prefix(b"c/")? {
            // `c/<doc>\0` then the sequence number as 8 big-endian bytes (which may hold NULs).
            let rest = &k[2..];
            let Some(split) = rest.len().checked_sub(9).filter(|&at| rest[at] == 0) else {
                return Err(StoreError::Corrupt { key: printable(&k), reason: "change key has no sequence number".into() });
            };
            let seq = u64::from_be_bytes(rest[split + 1..].try_into().expect("8 bytes by construction"));
            let b = blobs.entry(String::from_utf8_lossy(&rest[..split]).into_owned()).or_default();
            b.changes.push((seq, self.unseal(&k, &v)?));
            b.next_seq = b.next_seq.max(seq + 1);
            out.push(Write::Delete(k));
        }
        for (k, v) in self.backend.scan_prefix(b"m/")? {
            let rest = &k[2..];
            // Current-layout keys hold no NUL; only first-layout metadata keys do.
            let Some(split) = rest.iter().position(|b| *b == 0) else { continue };
            let doc = String::from_utf8_lossy(&rest[..split]).into_owned();
            let name = String::from_utf8_lossy(&rest[split + 1..]).into_owned();
            let value = self.unseal(&k, &v)?;
            if name == "next_seq" {
                if let Ok(seq) = <[u8; 8]>::try_from(value.as_slice()) {
                    let b = blobs.entry(doc).or_default();
                    b.next_seq = b.next_seq.max(u64::from_be_bytes(seq));
                }
            } else {
                metas.entry(doc).or_default().insert(name, value);
            }
            out.push(Write::Delete(k));
        }
        for (doc, b) in &blobs {
            self.put(&mut out, doc_key(doc), &encode_blob(b))?;
        }
        for (doc, m) in &metas {
            self.put(&mut out, meta_key(doc), &encode(m))?;
        }
        self.backend.apply(out)
    }

    pub fn wipe(&self) -> Result<(), StoreError> {
        self.backend.wipe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::MemoryStore;

    /// A store written by the first layout opens with every document, change, sequence number
    /// and metadata value intact, and keeps nothing in the old keys.
    #[test]
    fn a_first_layout_store_is_converted_on_open() {
        let key = [5u8; 32];
        let cipher = Cipher::new(&key).unwrap();
        let raw = Arc::new(MemoryStore::new());
        let sealed = |k: &[u8], v: &[u8]| Write::Put(k.to_vec(), cipher.seal(k, v).unwrap());
        let change = |doc: &str, seq: u64| [b"c/", doc.as_bytes(), b"\0", &seq.to_be_bytes()[..]].concat();
        raw.apply(vec![
            sealed(KEY_CHECK, KEY_CHECK_PLAIN),
            sealed(b"g/worker", b"w-1"),
            Write::Put(b"d/p1".to_vec(), vec![]),
            sealed(b"s/p1", b"snapshot-1"),
            sealed(&change("p1", 4), b"c4"),
            sealed(&change("p1", 5), b"c5"),
            sealed(b"m/p1\0next_seq", &4u64.to_be_bytes()),
            sealed(b"m/p1\0summary", b"{\"a\":1}"),
            sealed(b"m/p1\0sync", b"{}"),
            Write::Put(b"d/p2".to_vec(), vec![]),
            sealed(b"s/p2", b"snapshot-2"),
            sealed(b"m/p2\0next_seq", &9u64.to_be_bytes()),
            // Bookkeeping left by a purged document: metadata only, no marker.
            sealed(b"m/gone\0sync", b"{\"pending\":0}"),
        ])
        .unwrap();

        let s = SealedStore::open(Box::new(raw.clone()), &key).unwrap();
        assert_eq!(s.doc_ids().unwrap(), ["p1", "p2"]);
        let p1 = s.load_doc("p1").unwrap().unwrap();
        assert_eq!(p1.snapshot.as_deref(), Some(&b"snapshot-1"[..]));
        assert_eq!(p1.changes, [b"c4".to_vec(), b"c5".to_vec()]);
        assert_eq!(p1.next_seq, 6);
        assert_eq!(s.load_doc("p2").unwrap().unwrap().next_seq, 9);
        assert_eq!(s.doc_meta("p1", "summary").unwrap().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            s.doc_meta_all("sync").unwrap(),
            [("gone".to_string(), b"{\"pending\":0}".to_vec()), ("p1".to_string(), b"{}".to_vec())]
        );
        assert_eq!(s.meta("worker").unwrap().as_deref(), Some(&b"w-1"[..]));
        for old in [&b"d/"[..], b"s/", b"c/"] {
            assert!(raw.scan_prefix(old).unwrap().is_empty(), "{old:?} keys remain");
        }
        assert!(raw.keys_with_prefix(b"m/").unwrap().iter().all(|k| !k.contains(&0)));
        // Opening again changes nothing.
        drop(s);
        let before = raw.scan_prefix(b"").unwrap();
        drop(SealedStore::open(Box::new(raw.clone()), &key).unwrap());
        assert_eq!(raw.scan_prefix(b"").unwrap(), before);
    }

    /// Document values are stored compressed once that pays; values written plain (before
    /// compression, or too small to gain) still read.
    #[test]
    fn document_values_are_compressed_and_plain_ones_still_read() {
        let key = [7u8; 32];
        let cipher = Cipher::new(&key).unwrap();
        let raw = Arc::new(MemoryStore::new());
        let plain = DocBlob { snapshot: Some(b"old-snapshot".to_vec()), changes: vec![(0, b"c0".to_vec())], next_seq: 1 };
        raw.apply(vec![
            Write::Put(KEY_CHECK.to_vec(), cipher.seal(KEY_CHECK, KEY_CHECK_PLAIN).unwrap()),
            Write::Put(doc_key("old"), cipher.seal(&doc_key("old"), &encode(&plain)).unwrap()),
        ])
        .unwrap();
        let s = SealedStore::open(Box::new(raw.clone()), &key).unwrap();
        let old = s.load_doc("old").unwrap().unwrap();
        assert_eq!((old.snapshot.as_deref(), old.changes.len()), (Some(&b"old-snapshot"[..]), 1));

        let snapshot = b"automerge columns repeat a lot ".repeat(200);
        s.commit(vec![StoredWrite::Compact { doc: "new".into(), snapshot: snapshot.clone(), upto_seq: 0 }]).unwrap();
        assert_eq!(s.load_doc("new").unwrap().unwrap().snapshot, Some(snapshot.clone()));
        let stored = cipher.open(&doc_key("new"), &raw.get(&doc_key("new")).unwrap().unwrap()).unwrap();
        assert_eq!(stored[0], ZSTD_BLOB);
        assert!(stored.len() < snapshot.len() / 4, "compressed: {} bytes for {}", stored.len(), snapshot.len());
    }

    /// A first-layout store holding only metadata (no document markers) is converted too.
    #[test]
    fn a_first_layout_store_of_metadata_only_is_converted() {
        let key = [6u8; 32];
        let cipher = Cipher::new(&key).unwrap();
        let raw = Arc::new(MemoryStore::new());
        raw.apply(vec![
            Write::Put(KEY_CHECK.to_vec(), cipher.seal(KEY_CHECK, KEY_CHECK_PLAIN).unwrap()),
            Write::Put(b"m/gone\0sync".to_vec(), cipher.seal(b"m/gone\0sync", b"{}").unwrap()),
        ])
        .unwrap();
        let s = SealedStore::open(Box::new(raw.clone()), &key).unwrap();
        assert_eq!(s.doc_meta_all("sync").unwrap(), [("gone".to_string(), b"{}".to_vec())]);
        assert!(s.doc_ids().unwrap().is_empty());
    }
}
