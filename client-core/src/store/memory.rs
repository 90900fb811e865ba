//! In-memory backend: for tests and for apps that keep nothing on disk.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{LocalStore, Write};
use crate::error::StoreError;

#[derive(Default)]
pub struct MemoryStore {
    // A std Mutex: every operation is short and never awaits.
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalStore for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map().get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        Ok(self
            .map()
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self.map().range(from.to_vec()..to.to_vec()).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn apply(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        let mut map = self.map();
        for w in batch {
            match w {
                Write::Put(k, v) => {
                    map.insert(k, v);
                }
                Write::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn wipe(&self) -> Result<(), StoreError> {
        self.map().clear();
        Ok(())
    }
}

#[cfg(test)]
mod suite {
    super::super::local_store_suite!(super::MemoryStore::new);
}
