//! Per-person data keys, for erasure by crypto-shredding.
//!
//! Every person document is sealed on the server under its own random key. Erasing the person
//! destroys the key, so whatever sled still holds of the document in old log segments can no
//! longer be read. The keys live in one small file, `keys`, rewritten whole (temporary file,
//! fsync, rename, fsync of the directory) on every change: a destroyed key leaves no copy in any
//! file of the data directory. (Blocks the filesystem freed may still hold it until reused:
//! deployments keep the data directory on an encrypted disk.)

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use peersync_core::StoreError;
use ring::rand::{SecureRandom, SystemRandom};

const MAGIC: &[u8; 8] = b"PSKEYS01";

pub struct Keyring {
    path: Option<PathBuf>,
    // std Mutex: held only for short in-memory work and one file rewrite, never across await.
    keys: Mutex<BTreeMap<(String, String), [u8; 32]>>,
    rng: SystemRandom,
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

impl Keyring {
    /// Keys held in memory only (tests).
    pub fn in_memory() -> Self {
        Self { path: None, keys: Mutex::new(BTreeMap::new()), rng: SystemRandom::new() }
    }

    /// Open (or create) the keyring file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut keys = BTreeMap::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                let corrupt = |r: &str| StoreError::Corrupt { key: path.display().to_string(), reason: r.into() };
                if bytes.len() < 8 || &bytes[..8] != MAGIC {
                    return Err(corrupt("not a peersync keyring"));
                }
                let mut rest = &bytes[8..];
                let mut take = |n: usize| -> Result<&[u8], StoreError> {
                    if rest.len() < n {
                        return Err(corrupt("truncated"));
                    }
                    let (a, b) = rest.split_at(n);
                    rest = b;
                    Ok(a)
                };
                loop {
                    let Ok(len) = take(2) else { break };
                    let org_len = u16::from_be_bytes([len[0], len[1]]) as usize;
                    let org = String::from_utf8_lossy(take(org_len)?).into_owned();
                    let len = take(2)?;
                    let doc_len = u16::from_be_bytes([len[0], len[1]]) as usize;
                    let doc = String::from_utf8_lossy(take(doc_len)?).into_owned();
                    let key: [u8; 32] = take(32)?.try_into().expect("32 bytes taken");
                    keys.insert((org, doc), key);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot read the keyring", e)),
        }
        Ok(Self { path: Some(path.to_path_buf()), keys: Mutex::new(keys), rng: SystemRandom::new() })
    }

    fn persist(&self, keys: &BTreeMap<(String, String), [u8; 32]>) -> Result<(), StoreError> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut out = Vec::with_capacity(8 + keys.len() * 56);
        out.extend_from_slice(MAGIC);
        for ((org, doc), key) in keys {
            out.extend_from_slice(&(org.len() as u16).to_be_bytes());
            out.extend_from_slice(org.as_bytes());
            out.extend_from_slice(&(doc.len() as u16).to_be_bytes());
            out.extend_from_slice(doc.as_bytes());
            out.extend_from_slice(key);
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write the keyring", e))?;
        f.write_all(&out).and_then(|_| f.sync_all()).map_err(|e| io("cannot write the keyring", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("cannot replace the keyring", e))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync the data directory", e))?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), [u8; 32]>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, org: &str, doc: &str) -> Option<[u8; 32]> {
        self.lock().get(&(org.to_string(), doc.to_string())).copied()
    }

    /// Make sure each of `docs` has a key; new keys are durable before this returns.
    pub fn ensure(&self, org: &str, docs: &[&str]) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let before = keys.clone();
        let mut added = false;
        for doc in docs {
            let k = (org.to_string(), doc.to_string());
            if !keys.contains_key(&k) {
                let mut key = [0u8; 32];
                self.rng.fill(&mut key).map_err(|_| StoreError::Io("random generator failed".into()))?;
                keys.insert(k, key);
                added = true;
            }
        }
        if added {
            if let Err(e) = self.persist(&keys) {
                // Keep memory in line with the file: forget the keys that were not written.
                *keys = before;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Destroy the key of `doc`: its sealed data becomes unreadable for good.
    pub fn destroy(&self, org: &str, doc: &str) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let k = (org.to_string(), doc.to_string());
        if keys.contains_key(&k) {
            // Persist the map without the key first: memory and file never disagree, and a
            // failed write leaves the key in place for the retry.
            let mut without = keys.clone();
            without.remove(&k);
            self.persist(&without)?;
            *keys = without;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_destroyed_keys_leave_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let k = Keyring::open(&path).unwrap();
        k.ensure("o", &["a", "b"]).unwrap();
        let a = k.get("o", "a").unwrap();
        let k2 = Keyring::open(&path).unwrap();
        assert_eq!(k2.get("o", "a"), Some(a));
        k2.destroy("o", "a").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(32).any(|w| w == a), "the destroyed key is gone from the file");
        assert!(Keyring::open(&path).unwrap().get("o", "a").is_none());
        assert!(Keyring::open(&path).unwrap().get("o", "b").is_some());
    }
}
