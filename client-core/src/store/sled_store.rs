//! sled backend: the store on a phone's flash.

use std::path::Path;

use super::{LocalStore, Write};
use crate::error::StoreError;

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledStore {
    /// Open with settings for a phone: a small cache (the hot set of a caseload is small).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, 16 * 1024 * 1024)
    }

    /// Open with a page cache of `cache_bytes` (a server wants more than a phone).
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // sled writes any page larger than a quarter of a log segment to a file of its own
        // (create, write, sync, later delete). With the 64 KiB segments phones used at first,
        // that was every leaf over 16 KiB: a restore spent more on creating files than on
        // anything else. 256 KiB segments keep pages in the log. (sled 0.34 records the mode
        // but does not act on it.)
        let segment_size = existing_segment_size(path).unwrap_or(PHONE_SEGMENT_BYTES);
        let config = sled::Config::new().path(path).cache_capacity(cache_bytes).mode(sled::Mode::LowSpace).segment_size(segment_size);
        Self::open_config(config, path)
    }

    /// Open, waiting briefly while the store's file lock is still held by a handle being
    /// closed (sled releases it from a background thread after the last handle is dropped), so
    /// that close-then-reopen works at once.
    fn open_config(config: sled::Config, path: &Path) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                // sled reports the held lock only in its message (ErrorKind::Other).
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Io(format!("the store at {} is in use by another process (another peersync on the same data?)", path.display())));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                // sled's own checksums failed: the file is damaged (a failing flash chip, an
                // interrupted copy). Say what can be done, not sled's debug text.
                Err(sled::Error::Corruption { .. }) => {
                    return Err(StoreError::Corrupt {
                        key: path.display().to_string(),
                        reason: "the store's files are damaged. Move the directory aside (keep it: records not yet synced are \
                                 only there) and open a fresh store: on a phone, enroll it again and everything that had synced \
                                 comes back from the server; on a server, restore the data directory from a backup"
                            .into(),
                    });
                }
                // A damaged `conf` file, or a store of another sled version: either way not
                // to be thrown away.
                Err(sled::Error::Unsupported(reason)) => {
                    return Err(StoreError::Io(format!(
                        "the store at {} cannot be opened ({reason}): its settings file is damaged or it was made by another \
                         version. Keep the directory: records not yet synced are only there",
                        path.display()
                    )));
                }
                Err(e) => return Err(StoreError::Io(format!("cannot open store at {}: {e}", path.display()))),
            }
        };
        let tree = db.open_tree("peersync")?;
        Ok(Self { db, tree })
    }

    /// Open with settings for a server: a page cache of `cache_bytes` and sled's default 512 KiB
    /// log segments. The phone's 64 KiB segments cost the server a write and a sync_file_range
    /// per segment of log. A store created with other segments keeps them: sled refuses to open a store
    /// with a different segment size than it was created with.
    pub fn open_for_server(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let segment_size = existing_segment_size(path).unwrap_or(512 * 1024);
        let config =
            sled::Config::new().path(path).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).segment_size(segment_size);
        Self::open_config(config, path)
    }

    /// The sled database, for callers that need sled-specific operations (size on disk).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// Log segment size of stores phones create (see [`SledStore::open_with_cache`]).
const PHONE_SEGMENT_BYTES: usize = 256 * 1024;

/// The segment size of the store at `path`, if one exists there: sled refuses to open a store
/// with another segment size than it was created with.
fn existing_segment_size(path: &Path) -> Option<usize> {
    // sled's `conf`: text lines, then a checksum.
    let conf = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&conf).lines().find_map(|l| l.strip_prefix("segment_size:")?.trim().parse().ok())
}

impl LocalStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<super::Pairs, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .keys()
            .map(|r| r.map(|k| k.to_vec()).map_err(StoreError::from))
            .collect()
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.tree
            .range(from..to)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    fn scan_range_first(&self, from: &[u8], to: &[u8], limit: usize) -> Result<super::Pairs, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.tree
            .range(from..to)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    fn apply(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.apply_deferred(batch)?;
        // A write returns only once durable: the worker may drop the phone right after saving.
        self.tree.flush()?;
        Ok(())
    }

    fn apply_deferred(&self, mut batch: Vec<Write>) -> Result<(), StoreError> {
        // A sled batch writes a manifest and seals the log buffer, each seal a synchronous
        // write of the log (`sync_file_range`): a server applying thousands of one-key writes
        // spent more on those than on anything else. One write is atomic on its own.
        if batch.len() <= 1 {
            match batch.pop() {
                Some(Write::Put(k, v)) => drop(self.tree.insert(k, v)?),
                Some(Write::Delete(k)) => drop(self.tree.remove(k)?),
                None => {}
            }
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for w in batch {
            match w {
                Write::Put(k, v) => b.insert(k, v),
                Write::Delete(k) => b.remove(k),
            }
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    fn wipe(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        self.tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod suite {
    use super::SledStore;

    /// A sled store in a temporary directory that is removed once the store is dropped.
    struct TempSled {
        store: SledStore,
        _dir: tempfile::TempDir,
    }

    impl crate::store::LocalStore for TempSled {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, crate::error::StoreError> {
            self.store.get(key)
        }
        fn scan_prefix(&self, p: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, crate::error::StoreError> {
            self.store.scan_prefix(p)
        }
        fn scan_range(&self, a: &[u8], b: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, crate::error::StoreError> {
            self.store.scan_range(a, b)
        }
        // Sled's own versions of the methods with defaults: the suite must run those.
        fn keys_with_prefix(&self, p: &[u8]) -> Result<Vec<Vec<u8>>, crate::error::StoreError> {
            self.store.keys_with_prefix(p)
        }
        fn scan_prefix_first(&self, p: &[u8], limit: usize) -> Result<super::super::Pairs, crate::error::StoreError> {
            self.store.scan_prefix_first(p, limit)
        }
        fn scan_range_first(&self, a: &[u8], b: &[u8], limit: usize) -> Result<super::super::Pairs, crate::error::StoreError> {
            self.store.scan_range_first(a, b, limit)
        }
        fn apply_deferred(&self, batch: Vec<Write>) -> Result<(), crate::error::StoreError> {
            self.store.apply_deferred(batch)
        }
        fn flush(&self) -> Result<(), crate::error::StoreError> {
            self.store.flush()
        }
        fn apply(&self, batch: Vec<Write>) -> Result<(), crate::error::StoreError> {
            self.store.apply(batch)
        }
        fn wipe(&self) -> Result<(), crate::error::StoreError> {
            self.store.wipe()
        }
    }

    fn make() -> TempSled {
        let dir = tempfile::tempdir().unwrap();
        TempSled { store: SledStore::open(dir.path()).unwrap(), _dir: dir }
    }
    super::super::local_store_suite!(make);

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.apply(vec![Write::Put(b"k".to_vec(), b"v".to_vec())]).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// A store whose files were damaged is refused with what to do, not sled's debug text;
    /// whatever the damage, opening it does not panic. (Damage to a value in the log is
    /// caught when it is read, by the sealed store's integrity check.)
    #[test]
    fn a_damaged_store_says_so_and_what_to_do() {
        let mut saw_corrupt = false;
        for file in ["db", "conf"] {
            for at in [0usize, 8, 30, 100, 1000, 20_000] {
                let dir = tempfile::tempdir().unwrap();
                {
                    let s = SledStore::open(dir.path()).unwrap();
                    for i in 0..200u32 {
                        s.apply(vec![Write::Put(i.to_be_bytes().to_vec(), vec![i as u8; 500])]).unwrap();
                    }
                    s.db.flush().unwrap();
                }
                let Some(path) = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(file)) else { continue };
                let mut bytes = std::fs::read(&path).unwrap();
                let i = at.min(bytes.len() - 1);
                bytes[i] ^= 0xff;
                std::fs::write(&path, bytes).unwrap();
                let opened = SledStore::open(dir.path());
                if let Err(e) = opened {
                    assert!(e.to_string().contains("not yet synced are only there"), "{e}");
                    assert!(!e.to_string().contains("backtrace"), "{e}");
                    saw_corrupt = true;
                }
            }
        }
        assert!(saw_corrupt, "damage to the store's configuration is detected at open");
    }

    /// Phones created their stores with 64 KiB log segments before; sled refuses to open a
    /// store with another segment size, so those must open with theirs and keep their records.
    #[test]
    fn a_store_made_with_the_old_segment_size_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).segment_size(1 << 16).open().unwrap();
            let tree = db.open_tree("peersync").unwrap();
            tree.insert(b"k", b"v".to_vec()).unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"v".to_vec()));
        s.apply(vec![Write::Put(b"k2".to_vec(), vec![7; 100_000])]).unwrap();
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k2").unwrap(), Some(vec![7; 100_000]));
        assert_eq!(super::existing_segment_size(dir.path()), Some(1 << 16));
    }
}
