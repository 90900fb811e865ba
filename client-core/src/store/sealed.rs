//! The sealed layer: every value written through it is encrypted and authenticated, and it
//! lays out per-document data (snapshot, appended changes, metadata) over a [`LocalStore`].
//!
//! Key layout (keys are not secret: they hold only pseudonymous document ids):
//! - `k`                      key check, proves the store key is right
//! - `g/<name>`               device-wide metadata (actor id, worker, sync cursor)
//! - `d/<doc>`                the document exists
//! - `s/<doc>`                compacted automerge snapshot
//! - `c/<doc>\0<seq:u64 BE>`  automerge changes appended since the snapshot
//! - `m/<doc>\0<name>`        per-document metadata (caseload summary, sync bookkeeping)

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

pub struct SealedStore {
    backend: Box<dyn LocalStore>,
    cipher: Cipher,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn change_prefix(doc: &str) -> Vec<u8> {
    key(&[b"c/", doc.as_bytes(), b"\0"])
}

fn change_key(doc: &str, seq: u64) -> Vec<u8> {
    key(&[&change_prefix(doc), &seq.to_be_bytes()])
}

fn meta_prefix(doc: &str) -> Vec<u8> {
    key(&[b"m/", doc.as_bytes(), b"\0"])
}

fn printable(k: &[u8]) -> String {
    String::from_utf8_lossy(k).replace('\0', "/")
}

impl SealedStore {
    /// Open over `backend` with the app's 32-byte key. A store made with another key is refused
    /// with [`StoreError::WrongKey`]; nothing is read or written then.
    pub fn open(backend: Box<dyn LocalStore>, key: &[u8]) -> Result<Self, StoreError> {
        let cipher = Cipher::new(key)?;
        match backend.get(KEY_CHECK)? {
            Some(sealed) => match cipher.open(KEY_CHECK, &sealed) {
                Some(plain) if plain == KEY_CHECK_PLAIN => {}
                _ => return Err(StoreError::WrongKey),
            },
            None => {
                let sealed = cipher.seal(KEY_CHECK, KEY_CHECK_PLAIN)?;
                backend.apply(vec![Write::Put(KEY_CHECK.to_vec(), sealed)])?;
            }
        }
        Ok(Self { backend, cipher })
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

    /// Ids of every document in the store, in order.
    pub fn doc_ids(&self) -> Result<Vec<String>, StoreError> {
        self.backend
            .keys_with_prefix(b"d/")?
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
        if self.backend.get(&key(&[b"d/", doc.as_bytes()]))?.is_none() {
            return Ok(None);
        }
        let snapshot = self.get(&key(&[b"s/", doc.as_bytes()]))?;
        let prefix = change_prefix(doc);
        let mut changes = Vec::new();
        let mut next_seq = 0;
        for (k, v) in self.backend.scan_prefix(&prefix)? {
            let seq_bytes: [u8; 8] = k[prefix.len()..].try_into().map_err(|_| StoreError::Corrupt {
                key: printable(&k),
                reason: "change key has no sequence number".into(),
            })?;
            next_seq = u64::from_be_bytes(seq_bytes) + 1;
            changes.push(self.unseal(&k, &v)?);
        }
        if let Some(seq) = self.meta_u64(doc, "next_seq")? {
            next_seq = next_seq.max(seq);
        }
        Ok(Some(DocData { snapshot, changes, next_seq }))
    }

    fn meta_u64(&self, doc: &str, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.doc_meta(doc, name)?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes))
    }

    pub fn doc_meta(&self, doc: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(&key(&[&meta_prefix(doc), name.as_bytes()]))
    }

    /// The metadata `name` of every document that has it, by document id.
    pub fn doc_meta_all(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.backend.scan_prefix(b"m/")? {
            let rest = &k[2..];
            let Some(split) = rest.iter().position(|b| *b == 0) else { continue };
            if &rest[split + 1..] == name.as_bytes() {
                let doc = String::from_utf8_lossy(&rest[..split]).into_owned();
                out.push((doc, self.unseal(&k, &v)?));
            }
        }
        Ok(out)
    }

    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(&key(&[b"g/", name.as_bytes()]))
    }

    /// Apply `writes` atomically; returns once they are durable.
    pub fn commit(&self, writes: Vec<StoredWrite>) -> Result<(), StoreError> {
        let mut out = Vec::with_capacity(writes.len() + 1);
        for w in writes {
            match w {
                StoredWrite::AppendChange { doc, seq, bytes } => {
                    out.push(Write::Put(key(&[b"d/", doc.as_bytes()]), Vec::new()));
                    self.put(&mut out, change_key(&doc, seq), &bytes)?;
                }
                StoredWrite::Compact { doc, snapshot, upto_seq } => {
                    out.push(Write::Put(key(&[b"d/", doc.as_bytes()]), Vec::new()));
                    self.put(&mut out, key(&[b"s/", doc.as_bytes()]), &snapshot)?;
                    let prefix = change_prefix(&doc);
                    for k in self.backend.keys_with_prefix(&prefix)? {
                        if let Ok(seq) = <[u8; 8]>::try_from(&k[prefix.len()..]) {
                            if u64::from_be_bytes(seq) < upto_seq {
                                out.push(Write::Delete(k));
                            }
                        }
                    }
                    // Remember where sequence numbers stand once no chunk is left to tell.
                    self.put(
                        &mut out,
                        key(&[&meta_prefix(&doc), b"next_seq"]),
                        &upto_seq.to_be_bytes(),
                    )?;
                }
                StoredWrite::DocMeta { doc, name, value } => {
                    self.put(&mut out, key(&[&meta_prefix(&doc), name.as_bytes()]), &value)?;
                }
                StoredWrite::Meta { name, value } => {
                    self.put(&mut out, key(&[b"g/", name.as_bytes()]), &value)?;
                }
                StoredWrite::DeleteDoc { doc } => {
                    out.push(Write::Delete(key(&[b"d/", doc.as_bytes()])));
                    out.push(Write::Delete(key(&[b"s/", doc.as_bytes()])));
                    for k in self.backend.keys_with_prefix(&change_prefix(&doc))? {
                        out.push(Write::Delete(k));
                    }
                    for k in self.backend.keys_with_prefix(&meta_prefix(&doc))? {
                        out.push(Write::Delete(k));
                    }
                }
            }
        }
        self.backend.apply(out)
    }

    /// Remove everything, including the key check.
    pub fn wipe(&self) -> Result<(), StoreError> {
        self.backend.wipe()
    }
}
