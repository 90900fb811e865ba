//! Per-person data keys, for erasure by crypto-shredding.
//!
//! Every person document is sealed on the server under its own random key. Erasing the person
//! destroys the key, so whatever sled still holds of the document in old log segments can no
//! longer be read. The keys live in one small file, `keys`. New keys are appended to it and
//! synced (a first sync of many people adds thousands, a batch at a time); destroying a key
//! rewrites it whole (temporary file, fsync, rename, fsync of the directory), so a destroyed key
//! leaves no copy in any file of the data directory. (Blocks the filesystem freed may still hold it until reused:
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
    // std Mutex: held only for short in-memory work and one file write, never across await.
    keys: Mutex<Keys>,
    rng: SystemRandom,
}

struct Keys {
    map: BTreeMap<(String, String), [u8; 32]>,
    /// The file may end in a torn append: the next change rewrites it whole rather than
    /// appending after the tear.
    rewrite: bool,
}

/// A person's key, by (organisation, document).
type Entry = ((String, String), [u8; 32]);

/// One entry at the start of `bytes`, and the bytes after it; `None` if `bytes` ends inside it.
fn parse_entry(bytes: &[u8]) -> Option<(Entry, &[u8])> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (a, b) = rest.split_at_checked(n)?;
        *rest = b;
        Some(a)
    }
    let mut rest = bytes;
    let len = take(&mut rest, 2)?;
    let org = String::from_utf8_lossy(take(&mut rest, u16::from_be_bytes([len[0], len[1]]) as usize)?).into_owned();
    let len = take(&mut rest, 2)?;
    let doc = String::from_utf8_lossy(take(&mut rest, u16::from_be_bytes([len[0], len[1]]) as usize)?).into_owned();
    let key: [u8; 32] = take(&mut rest, 32)?.try_into().ok()?;
    Some((((org, doc), key), rest))
}

fn entry(out: &mut Vec<u8>, org: &str, doc: &str, key: &[u8; 32]) {
    out.extend_from_slice(&(org.len() as u16).to_be_bytes());
    out.extend_from_slice(org.as_bytes());
    out.extend_from_slice(&(doc.len() as u16).to_be_bytes());
    out.extend_from_slice(doc.as_bytes());
    out.extend_from_slice(key);
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

impl Keyring {
    /// Keys held in memory only (tests).
    pub fn in_memory() -> Self {
        Self { path: None, keys: Mutex::new(Keys { map: BTreeMap::new(), rewrite: false }), rng: SystemRandom::new() }
    }

    /// Open (or create) the keyring file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut keys = BTreeMap::new();
        let mut torn = false;
        match std::fs::read(path) {
            Ok(bytes) => {
                let corrupt = |r: &str| StoreError::Corrupt { key: path.display().to_string(), reason: r.into() };
                if bytes.len() < 8 || &bytes[..8] != MAGIC {
                    return Err(corrupt("not a peersync keyring"));
                }
                // Written by a version that left it readable to others: its owner's only now.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path).map_err(|e| io("cannot read the keyring", e))?.permissions().mode();
                    if mode & 0o077 != 0 {
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("cannot restrict the keyring to its owner", e))?;
                    }
                }
                let mut rest = &bytes[8..];
                // An append cut short by a crash leaves a partial last entry. Its key was never
                // synced, so no stored data is sealed under it: it is dropped.
                while !rest.is_empty() {
                    match parse_entry(rest) {
                        Some(((k, key), after)) => {
                            keys.insert(k, key);
                            rest = after;
                        }
                        None => {
                            torn = true;
                            break;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot read the keyring", e)),
        }
        let ring = Self { path: Some(path.to_path_buf()), keys: Mutex::new(Keys { map: keys, rewrite: false }), rng: SystemRandom::new() };
        if torn {
            let keys = ring.lock();
            ring.persist(&keys.map)?;
        }
        Ok(ring)
    }

    /// Write the whole file anew (temporary file, fsync, rename, fsync of the directory).
    fn persist(&self, keys: &BTreeMap<(String, String), [u8; 32]>) -> Result<(), StoreError> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut out = Vec::with_capacity(8 + keys.len() * 56);
        out.extend_from_slice(MAGIC);
        for ((org, doc), key) in keys {
            entry(&mut out, org, doc, key);
        }
        let tmp = path.with_extension("tmp");
        // A temporary file left by a crash (perhaps by a version that made it readable to
        // others) is replaced, not reopened with its old mode.
        let _ = std::fs::remove_file(&tmp);
        let mut f = owner_only().open(&tmp).map_err(|e| io("cannot write the keyring", e))?;
        f.write_all(&out).and_then(|_| f.sync_all()).map_err(|e| io("cannot write the keyring", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("cannot replace the keyring", e))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync the data directory", e))?;
        }
        Ok(())
    }

    /// Append `new` keys to the file and sync it.
    fn append(&self, path: &Path, new: &[Entry]) -> Result<(), StoreError> {
        let mut out = Vec::with_capacity(new.len() * 56);
        for ((org, doc), key) in new {
            entry(&mut out, org, doc, key);
        }
        let mut f = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| io("cannot open the keyring", e))?;
        f.write_all(&out).and_then(|_| f.sync_data()).map_err(|e| io("cannot write the keyring", e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, org: &str, doc: &str) -> Option<[u8; 32]> {
        self.lock().map.get(&(org.to_string(), doc.to_string())).copied()
    }

    /// Make sure each of `docs` has a key; new keys are durable before this returns.
    pub fn ensure(&self, org: &str, docs: &[&str]) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let mut added = Vec::new();
        for doc in docs {
            let k = (org.to_string(), doc.to_string());
            if !keys.map.contains_key(&k) && !added.iter().any(|(a, _)| *a == k) {
                let mut key = [0u8; 32];
                self.rng.fill(&mut key).map_err(|_| StoreError::Io("random generator failed".into()))?;
                added.push((k, key));
            }
        }
        let Some(path) = &self.path else {
            keys.map.extend(added);
            return Ok(());
        };
        if added.is_empty() {
            return Ok(());
        }
        if keys.rewrite || !path.exists() {
            let mut all = keys.map.clone();
            all.extend(added.iter().cloned());
            self.persist(&all)?;
            keys.map = all;
            keys.rewrite = false;
            return Ok(());
        }
        if let Err(e) = self.append(path, &added) {
            // The file may now end in part of an entry: the next change rewrites it whole.
            keys.rewrite = true;
            return Err(e);
        }
        keys.map.extend(added);
        Ok(())
    }

    /// Destroy the key of `doc`: its sealed data becomes unreadable for good.
    pub fn destroy(&self, org: &str, doc: &str) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let k = (org.to_string(), doc.to_string());
        if keys.map.contains_key(&k) {
            // Persist the map without the key first: memory and file never disagree, and a
            // failed write leaves the key in place for the retry.
            let mut without = keys.map.clone();
            without.remove(&k);
            self.persist(&without)?;
            keys.map = without;
            keys.rewrite = false;
        }
        Ok(())
    }
}

/// Options for a new file only its owner may read or write (mode 600): the keys
/// destroy-on-erase rests on, the demo's password.
pub(crate) fn owner_only() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
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

    #[cfg(unix)]
    #[test]
    fn the_keyring_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        Keyring::open(&path).unwrap().ensure("o", &["a"]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        // One left readable by an older version is closed when opened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Keyring::open(&path).unwrap().get("o", "a").is_some());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn appended_keys_persist_and_a_torn_append_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let k = Keyring::open(&path).unwrap();
        k.ensure("o", &["a"]).unwrap();
        k.ensure("o", &["b", "c", "b"]).unwrap();
        let (a, b, c) = (k.get("o", "a").unwrap(), k.get("o", "b").unwrap(), k.get("o", "c").unwrap());
        drop(k);
        // A crash in the middle of appending "d".
        let mut bytes = std::fs::read(&path).unwrap();
        let mut partial = Vec::new();
        entry(&mut partial, "o", "d", &[7; 32]);
        bytes.extend_from_slice(&partial[..partial.len() - 5]);
        std::fs::write(&path, &bytes).unwrap();
        let k = Keyring::open(&path).unwrap();
        assert_eq!((k.get("o", "a"), k.get("o", "b"), k.get("o", "c")), (Some(a), Some(b), Some(c)));
        assert_eq!(k.get("o", "d"), None, "the torn entry is dropped");
        // The tear is gone from the file, so later appends read back.
        k.ensure("o", &["e"]).unwrap();
        let e = k.get("o", "e").unwrap();
        let k = Keyring::open(&path).unwrap();
        assert_eq!((k.get("o", "a"), k.get("o", "e")), (Some(a), Some(e)));
    }
}
