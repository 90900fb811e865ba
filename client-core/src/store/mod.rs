//! Local storage of a device: a small key-value contract ([`LocalStore`]) with two backends,
//! and the sealed layer on top of it that every value at rest passes through.
//!
//! The contract is four operations, as in samod-core's storage: get, scan a prefix, apply an
//! atomic batch of writes, wipe. Every backend runs the same test suite ([`local_store_suite!`]).

mod memory;
mod sealed;
mod sled_store;

pub use memory::MemoryStore;
pub use sealed::{DocData, SealedStore, StoredWrite};
pub use sled_store::SledStore;

use crate::error::StoreError;

/// One write of an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Key-value pairs, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A durable, ordered key-value store.
///
/// `apply` is atomic (all writes of a batch or none survive a crash) and returns only once the
/// batch is durable. Keys are compared as bytes; `scan_prefix` returns pairs in key order.
pub trait LocalStore: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, StoreError>;
    /// Only the keys under `prefix`, in order (cheaper than `scan_prefix` where values are big).
    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.scan_prefix(prefix)?.into_iter().map(|(k, _)| k).collect())
    }
    /// The first `limit` pairs under `prefix`, in key order: for work taken a chunk at a time
    /// from the front of a long list.
    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        let mut all = self.scan_prefix(prefix)?;
        all.truncate(limit);
        Ok(all)
    }
    /// Pairs with `from <= key < to`, in key order.
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Pairs, StoreError>;
    /// The first `limit` of those: a page of a long range (the audit log) without reading the
    /// rest.
    fn scan_range_first(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        let mut all = self.scan_range(from, to)?;
        all.truncate(limit);
        Ok(all)
    }
    fn apply(&self, batch: Vec<Write>) -> Result<(), StoreError>;
    /// As `apply`, atomic, but durable only at the next `flush` (or `apply`): for many small
    /// writes that must become durable together.
    fn apply_deferred(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.apply(batch)
    }
    /// Make every deferred write durable.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Remove every key, durably.
    fn wipe(&self) -> Result<(), StoreError>;
}

/// The conformance suite every [`LocalStore`] backend runs: `local_store_suite!(make_store)`
/// where `make_store()` returns a fresh, empty store.
#[cfg(test)]
macro_rules! local_store_suite {
    ($make:expr) => {
        use $crate::store::{LocalStore, Write};

        fn put(k: &str, v: &str) -> Write {
            Write::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())
        }

        #[test]
        fn get_returns_what_was_put() {
            let s = $make();
            assert_eq!(s.get(b"a").unwrap(), None);
            s.apply(vec![put("a", "1")]).unwrap();
            assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
            s.apply(vec![put("a", "2")]).unwrap();
            assert_eq!(s.get(b"a").unwrap(), Some(b"2".to_vec()));
        }

        #[test]
        fn batch_applies_in_order_puts_and_deletes() {
            let s = $make();
            s.apply(vec![put("a", "1"), put("b", "2"), Write::Delete(b"a".to_vec()), put("c", "3")])
                .unwrap();
            assert_eq!(s.get(b"a").unwrap(), None);
            assert_eq!(s.get(b"b").unwrap(), Some(b"2".to_vec()));
            assert_eq!(s.get(b"c").unwrap(), Some(b"3".to_vec()));
            s.apply(vec![Write::Delete(b"zz".to_vec())]).unwrap();
        }

        #[test]
        fn scan_prefix_is_ordered_and_bounded() {
            let s = $make();
            s.apply(vec![put("d/b", "2"), put("d/a", "1"), put("e/a", "x"), put("d", "y"), put("c/z", "z")])
                .unwrap();
            let got: Vec<_> = s
                .scan_prefix(b"d/")
                .unwrap()
                .into_iter()
                .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
                .collect();
            assert_eq!(got, vec![("d/a".into(), "1".into()), ("d/b".into(), "2".into())]);
            assert_eq!(s.keys_with_prefix(b"d/").unwrap(), vec![b"d/a".to_vec(), b"d/b".to_vec()]);
            assert!(s.scan_prefix(b"q").unwrap().is_empty());
            let first: Vec<_> = s.scan_prefix_first(b"d/", 1).unwrap().into_iter().map(|(k, _)| k).collect();
            assert_eq!(first, vec![b"d/a".to_vec()]);
            assert_eq!(s.scan_prefix_first(b"d/", 5).unwrap().len(), 2);
            assert!(s.scan_prefix_first(b"d/", 0).unwrap().is_empty());
        }

        #[test]
        fn binary_keys_sort_bytewise() {
            let s = $make();
            let k = |n: u64| { let mut k = b"c/".to_vec(); k.extend(n.to_be_bytes()); k };
            s.apply(vec![Write::Put(k(256), vec![2]), Write::Put(k(1), vec![1]), Write::Put(k(70000), vec![3])])
                .unwrap();
            let vals: Vec<_> = s.scan_prefix(b"c/").unwrap().into_iter().map(|(_, v)| v[0]).collect();
            assert_eq!(vals, vec![1, 2, 3]);
        }

        #[test]
        fn scan_range_is_half_open() {
            let s = $make();
            s.apply(vec![put("a1", "1"), put("a2", "2"), put("a3", "3"), put("b", "4")]).unwrap();
            let keys: Vec<_> = s.scan_range(b"a2", b"b").unwrap().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, vec![b"a2".to_vec(), b"a3".to_vec()]);
            assert!(s.scan_range(b"c", b"d").unwrap().is_empty());
            let first: Vec<_> = s.scan_range_first(b"a1", b"b", 2).unwrap().into_iter().map(|(k, _)| k).collect();
            assert_eq!(first, vec![b"a1".to_vec(), b"a2".to_vec()]);
            assert_eq!(s.scan_range_first(b"a2", b"z", 10).unwrap().len(), 3);
            assert!(s.scan_range_first(b"a1", b"b", 0).unwrap().is_empty());
            assert!(s.scan_range_first(b"b", b"a", 5).unwrap().is_empty());
        }

        #[test]
        fn wipe_removes_everything() {
            let s = $make();
            s.apply(vec![put("a", "1"), put("b/c", "2")]).unwrap();
            s.wipe().unwrap();
            assert_eq!(s.get(b"a").unwrap(), None);
            assert!(s.scan_prefix(b"").unwrap().is_empty());
            s.apply(vec![put("a", "3")]).unwrap();
            assert_eq!(s.get(b"a").unwrap(), Some(b"3".to_vec()));
        }

        #[test]
        fn sealed_documents_round_trip() {
            use $crate::store::{SealedStore, StoredWrite};
            let s = SealedStore::open(Box::new($make()), &[9u8; 32]).unwrap();
            assert!(s.load_doc("p1").unwrap().is_none());
            s.commit(vec![
                StoredWrite::AppendChange { doc: "p1".into(), seq: 0, bytes: b"c0".to_vec() },
                StoredWrite::AppendChange { doc: "p1".into(), seq: 1, bytes: b"c1".to_vec() },
                StoredWrite::DocMeta { doc: "p1".into(), name: "summary".into(), value: b"{}".to_vec() },
                StoredWrite::Meta { name: "cursor".into(), value: b"7".to_vec() },
            ])
            .unwrap();
            let d = s.load_doc("p1").unwrap().unwrap();
            assert_eq!(d.snapshot, None);
            assert_eq!(d.changes, vec![b"c0".to_vec(), b"c1".to_vec()]);
            assert_eq!(d.next_seq, 2);
            s.commit(vec![StoredWrite::Compact { doc: "p1".into(), snapshot: b"snap".to_vec(), upto_seq: 2 }])
                .unwrap();
            let d = s.load_doc("p1").unwrap().unwrap();
            assert_eq!(d.snapshot.as_deref(), Some(&b"snap"[..]));
            assert!(d.changes.is_empty());
            assert_eq!(d.next_seq, 2, "sequence numbers keep rising after compaction");
            assert_eq!(s.doc_ids().unwrap(), vec!["p1".to_string()]);
            assert_eq!(s.doc_meta_all("summary").unwrap(), vec![("p1".to_string(), b"{}".to_vec())]);
            assert_eq!(s.meta("cursor").unwrap(), Some(b"7".to_vec()));
            s.commit(vec![StoredWrite::DeleteDoc { doc: "p1".into() }]).unwrap();
            assert!(s.load_doc("p1").unwrap().is_none());
            assert!(s.doc_ids().unwrap().is_empty());
            assert!(s.doc_meta("p1", "summary").unwrap().is_none());
        }

        #[test]
        fn sealed_store_refuses_a_wrong_key() {
            use $crate::store::SealedStore;
            let backend = std::sync::Arc::new($make());
            drop(SealedStore::open(Box::new(backend.clone()), &[1u8; 32]).unwrap());
            match SealedStore::open(Box::new(backend), &[2u8; 32]) {
                Err($crate::error::StoreError::WrongKey) => {}
                other => panic!("expected WrongKey, got {:?}", other.map(|_| ())),
            }
        }
    };
}
#[cfg(test)]
pub(crate) use local_store_suite;

impl<S: LocalStore + ?Sized> LocalStore for std::sync::Arc<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        (**self).scan_prefix(prefix)
    }
    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        (**self).keys_with_prefix(prefix)
    }
    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        (**self).scan_prefix_first(prefix, limit)
    }
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        (**self).scan_range(from, to)
    }
    fn scan_range_first(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        (**self).scan_range_first(from, to, limit)
    }
    fn apply(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        (**self).apply(batch)
    }
    fn apply_deferred(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        (**self).apply_deferred(batch)
    }
    fn flush(&self) -> Result<(), StoreError> {
        (**self).flush()
    }
    fn wipe(&self) -> Result<(), StoreError> {
        (**self).wipe()
    }
}
