//! Who is on the other end of a connection, and what they may do with each document.
//!
//! Sessions ask these two seams and nothing else: [`Authenticator`] turns an upgrade request
//! into a device identity, [`Access`] answers per document.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use peersync_core::protocol::{AckStatus, ErrorCode};
use peersync_core::store::LocalStore;
use peersync_core::StoreError;

use crate::directory::{ConsentState, Directory};

/// Signed tokens older or newer than this (seconds) are refused: clocks on phones drift, but
/// not by more.
pub const TOKEN_WINDOW_SECS: i64 = 300;
/// What the device signs, before its fields.
pub const TOKEN_CONTEXT: &str = "peersync-sync-v1";

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub org: String,
    pub device: String,
    pub worker: String,
    /// Revoked devices are told to wipe and nothing else.
    pub revoked: bool,
    /// The log position the device is known to have caught up to: the later of the cursor it
    /// presents in this session and the one the server recorded for it (at its last sync, or
    /// the log's head when it enrolled). What was taken from its worker after it is news to
    /// the device, so what the phone recorded offline for such a person is still taken in.
    pub since: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no device credentials in the request (Authorization: PeerSync …)")]
    Missing,
    #[error("invalid device credentials: {0}")]
    Invalid(String),
    #[error("the device's clock is off by more than {TOKEN_WINDOW_SECS} s; the server's time is {server_time}")]
    Clock { server_time: i64 },
    #[error("the token is dated before the server last started, so it may have been used already; make a new one with the server's time, {server_time}")]
    BeforeStart { server_time: i64 },
    #[error("this token was used already")]
    Replayed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub trait Authenticator: Send + Sync + 'static {
    /// Identify the device from its upgrade request, without an extra round trip.
    fn authenticate(&self, request: &Parts) -> Result<DeviceIdentity, AuthError>;
}

/// What a device may do with one document in a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it: the device's worker has had it from log position `granted`.
    Read { granted: u64 },
    /// The device must delete its copy, if it has one.
    Purge,
    /// Neither: not the device's to see, and nothing to delete.
    Nothing,
}

/// What `read_since` and `must_purge` of `access` say of one document.
fn verdict<A: Access + ?Sized>(access: &A, who: &DeviceIdentity, doc: &str, since: u64) -> Result<Verdict, StoreError> {
    Ok(match access.read_since(who, doc)? {
        Some(granted) => Verdict::Read { granted },
        None if access.must_purge(who, doc, since)? => Verdict::Purge,
        None => Verdict::Nothing,
    })
}

pub trait Access: Send + Sync + 'static {
    /// `Some(granted_seq)` if `who` may read `doc`: the log position from which its worker has
    /// had it (its devices lack everything before, whatever their cursor).
    fn read_since(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError>;
    /// Whether `who` must delete `doc` if it has it: erased, or taken from its worker after `since`.
    fn must_purge(&self, who: &DeviceIdentity, doc: &str, since: u64) -> Result<bool, StoreError>;
    /// What `read_since` and `must_purge` say of each of `docs` (one download batch), with
    /// `since` the device's cursor. An implementation may read what it needs once for the whole
    /// batch instead of once per document.
    fn verdicts(&self, who: &DeviceIdentity, docs: &[&str], since: u64) -> Result<Vec<Verdict>, StoreError> {
        docs.iter().map(|doc| verdict(self, who, doc, since)).collect()
    }
    /// Every document of which `verdicts` could say anything but `Nothing` to `who` with cursor
    /// `since` (more is allowed, none may be missing), if the implementation can list them
    /// without reading the whole organisation. A download then reads the log entries of these
    /// instead of walking the log: a fresh phone's first download costs its caseload, not its
    /// organisation. `None` (the default) walks the log.
    fn candidates(&self, _who: &DeviceIdentity, _since: u64) -> Result<Option<Vec<String>>, StoreError> {
        Ok(None)
    }
    /// `None` if `who` may change `doc` (`exists`: the server holds it already), else the
    /// refusal to send back for that document.
    fn check_write(&self, who: &DeviceIdentity, doc: &str, exists: bool) -> Result<Option<AckStatus>, StoreError>;
    /// A device created `doc`: its worker and the teammates the profile names get it.
    fn created(&self, who: &DeviceIdentity, doc: &str, teammates: &[String], seq: u64) -> Result<(), StoreError>;
    /// `doc` changed: keep what the server knows of its consent current. Like `created`, this
    /// may be deferred: the caller's next durable write makes it durable.
    fn changed(&self, org: &str, doc: &str, consent: Option<&peersync_core::Consent>) -> Result<(), StoreError>;
}

/// Signed connections: `Authorization: PeerSync <device>.<unix time>.<nonce>.<signature>`, the
/// Ed25519 signature (base64url) over `peersync-sync-v1\n<device>\n<time>\n<nonce>` with the key
/// the device registered at enrollment. Each nonce is accepted once within the time window.
pub struct SignedDevice<S: LocalStore> {
    pub dir: Arc<Directory<S>>,
    seen: Mutex<HashMap<String, VecDeque<(i64, String)>>>,
    /// When this process began to take tokens. The nonces seen before it are gone, so a token
    /// dated earlier may have been used already: it is refused as if the device's clock were
    /// off, and a phone retries at once with the server's time (one more round trip, only for
    /// a connection in the seconds around a restart). A captured token cannot be replayed by
    /// restarting the server, and cannot be re-dated without the device's key.
    started_at: i64,
}

impl<S: LocalStore> SignedDevice<S> {
    pub fn new(dir: Arc<Directory<S>>) -> Self {
        Self { dir, seen: Mutex::new(HashMap::new()), started_at: chrono::Utc::now().timestamp() }
    }
}

/// The message a device signs.
pub fn token_message(device: &str, time: i64, nonce: &str) -> String {
    format!("{TOKEN_CONTEXT}\n{device}\n{time}\n{nonce}")
}

impl<S: LocalStore> Authenticator for SignedDevice<S> {
    fn authenticate(&self, request: &Parts) -> Result<DeviceIdentity, AuthError> {
        let header = request.headers.get(axum::http::header::AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = header.to_str().map_err(|_| AuthError::Invalid("not ASCII".into()))?;
        let token = value.strip_prefix("PeerSync ").ok_or(AuthError::Missing)?;
        let parts: Vec<&str> = token.split('.').collect();
        let [device, time, nonce, sig] = parts[..] else {
            return Err(AuthError::Invalid("expected device.time.nonce.signature".into()));
        };
        let time: i64 = time.parse().map_err(|_| AuthError::Invalid("bad time".into()))?;
        if nonce.len() < 16 || nonce.len() > 64 {
            return Err(AuthError::Invalid("bad nonce".into()));
        }
        let now = chrono::Utc::now().timestamp();
        // Checked: a forged time near i64::MIN must not wrap into the window.
        if now.checked_sub(time).is_none_or(|d| d.checked_abs().is_none_or(|d| d > TOKEN_WINDOW_SECS)) {
            return Err(AuthError::Clock { server_time: now });
        }
        if time < self.started_at {
            return Err(AuthError::BeforeStart { server_time: now });
        }
        let record = self.dir.device(device)?.ok_or_else(|| AuthError::Invalid("unknown device".into()))?;
        let sig = B64.decode(sig).map_err(|_| AuthError::Invalid("bad signature encoding".into()))?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &record.public_key)
            .verify(token_message(device, time, nonce).as_bytes(), &sig)
            .map_err(|_| AuthError::Invalid("signature does not verify".into()))?;
        // Replay protection: remember nonces while their tokens are within the window.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let list = seen.entry(device.to_string()).or_default();
        while list.front().is_some_and(|(t, _)| now - t > 2 * TOKEN_WINDOW_SECS) {
            list.pop_front();
        }
        if list.iter().any(|(_, n)| n == nonce) {
            return Err(AuthError::Replayed);
        }
        list.push_back((time, nonce.to_string()));
        Ok(DeviceIdentity { org: record.org, device: record.id, worker: record.worker, revoked: record.revoked_at.is_some(), since: 0 })
    }
}

/// Access by assignment: a worker's devices read and change only the people assigned to that
/// worker; nothing crosses organisations; erased people are closed to everyone.
pub struct Assignments<S: LocalStore> {
    pub dir: Arc<Directory<S>>,
}

/// Batches of at least this many documents read tombstones and unassignments in one scan each.
const VERDICT_PRELOAD_FROM: usize = 32;

impl<S: LocalStore> Access for Assignments<S> {
    fn read_since(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError> {
        if who.revoked || self.dir.tombstone(&who.org, doc)?.is_some() {
            return Ok(None);
        }
        Ok(self.dir.assignment(&who.org, doc, &who.worker)?.map(|a| a.granted_seq))
    }

    fn must_purge(&self, who: &DeviceIdentity, doc: &str, since: u64) -> Result<bool, StoreError> {
        if let Some(t) = self.dir.tombstone(&who.org, doc)?
            && t.workers.contains(&who.worker)
        {
            return Ok(true);
        }
        Ok(self.dir.unassigned_at(&who.org, &who.worker, doc)?.is_some_and(|at| at > since))
    }

    /// A fresh phone's first download walks the organisation's whole log, and most of it is not
    /// the phone's: four lookups per entry (tombstone, assignment, tombstone, unassignment) were
    /// a sixth of the server's CPU in a first upload. For a large batch the organisation's
    /// tombstones and the worker's unassignments are read once, leaving one lookup per entry.
    fn verdicts(&self, who: &DeviceIdentity, docs: &[&str], since: u64) -> Result<Vec<Verdict>, StoreError> {
        if docs.len() < VERDICT_PRELOAD_FROM {
            return docs.iter().map(|doc| verdict(self, who, doc, since)).collect();
        }
        let tombstones = self.dir.tombstones(&who.org)?;
        let unassigned = self.dir.unassignments(&who.org, &who.worker)?;
        docs.iter()
            .map(|doc| {
                let erased = tombstones.get(*doc);
                if erased.is_some_and(|t| t.workers.contains(&who.worker)) {
                    return Ok(Verdict::Purge);
                }
                // Erased after it was taken from this worker: the tombstone does not name the
                // worker, but its phones may still hold the person if they have not synced since.
                if erased.is_none()
                    && !who.revoked
                    && let Some(a) = self.dir.assignment(&who.org, doc, &who.worker)?
                {
                    return Ok(Verdict::Read { granted: a.granted_seq });
                }
                Ok(if unassigned.get(*doc).is_some_and(|at| *at > since) { Verdict::Purge } else { Verdict::Nothing })
            })
            .collect()
    }

    /// The worker's caseload (nothing if the device was revoked), the people taken from the
    /// worker after `since`, and the erased people the worker had: `verdicts` reads an
    /// assignment, an unassignment or a tombstone naming the worker for anything else.
    fn candidates(&self, who: &DeviceIdentity, since: u64) -> Result<Option<Vec<String>>, StoreError> {
        let mut docs = if who.revoked {
            Vec::new()
        } else {
            match self.dir.caseload(&who.org, &who.worker)? {
                Some(docs) => docs,
                None => return Ok(None),
            }
        };
        docs.extend(self.dir.unassignments(&who.org, &who.worker)?.into_iter().filter(|(_, at)| *at > since).map(|(doc, _)| doc));
        docs.extend(self.dir.tombstones(&who.org)?.into_iter().filter(|(_, t)| t.workers.contains(&who.worker)).map(|(doc, _)| doc));
        docs.sort_unstable();
        docs.dedup();
        Ok(Some(docs))
    }

    fn check_write(&self, who: &DeviceIdentity, doc: &str, exists: bool) -> Result<Option<AckStatus>, StoreError> {
        if who.revoked {
            return Ok(Some(AckStatus::Refused { code: ErrorCode::Forbidden, message: "this device was revoked".into() }));
        }
        if self.dir.tombstone(&who.org, doc)?.is_some() {
            return Ok(Some(AckStatus::Refused {
                code: ErrorCode::Erased,
                message: "this person was erased at their request; delete the local copy".into(),
            }));
        }
        if !exists {
            // A person new to the server is theirs who records them first, unless a coordinator
            // has already given the id to other workers: then only those may create the record.
            let given = self.dir.assigned_workers(&who.org, doc)?;
            if given.is_empty() || given.contains(&who.worker) {
                return Ok(None);
            }
        } else if self.dir.assignment(&who.org, doc, &who.worker)?.is_some() {
            return Ok(None);
        }
        // Taken from this worker after the phone last synced: what it recorded offline, while it
        // still had the person, is kept (the phone purges its copy at the end of this sync).
        if self.dir.unassigned_at(&who.org, &who.worker, doc)?.is_some_and(|at| at > who.since) {
            return Ok(None);
        }
        Ok(Some(AckStatus::Refused {
            code: ErrorCode::Forbidden,
            message: "this person is not assigned to you; ask your coordinator to assign them".into(),
        }))
    }

    fn created(&self, who: &DeviceIdentity, doc: &str, teammates: &[String], seq: u64) -> Result<(), StoreError> {
        let mut workers = vec![who.worker.clone()];
        workers.extend(teammates.iter().filter(|w| **w != who.worker).cloned());
        match self.dir.assign(&who.org, doc, &workers, seq, &format!("device:{}", who.device)) {
            Ok(unknown) if !unknown.is_empty() => {
                tracing::info!(org = %who.org, %doc, ?unknown, "teammates named in a new record are not workers of the organisation");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(crate::directory::DirectoryError::Store(e)) => Err(e),
            Err(e) => Err(StoreError::Io(e.to_string())),
        }
    }

    fn changed(&self, org: &str, doc: &str, consent: Option<&peersync_core::Consent>) -> Result<(), StoreError> {
        if let Some(c) = consent {
            self.dir.set_consent(org, doc, ConsentState { share_with_coordinator: c.share_with_coordinator, research: c.research })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peersync_core::store::MemoryStore;

    /// The batch path (one scan of tombstones and unassignments) must say exactly what asking
    /// document by document says, for every kind of document a download meets.
    #[test]
    fn batch_verdicts_match_per_document_ones() {
        let dir = Arc::new(Directory::new(MemoryStore::new()));
        dir.create_org("org1", "Org One").unwrap();
        dir.add_worker("org1", "w-1", "Asha", "peer_advocate").unwrap();
        dir.add_worker("org1", "w-10", "Bela", "peer_advocate").unwrap();
        let mut docs = Vec::new();
        for i in 0..90 {
            let doc = format!("p-{i:03}");
            match i % 9 {
                // Assigned to w-1 at position i.
                0 | 1 => drop(dir.assign("org1", &doc, &["w-1".into()], i, "test").unwrap()),
                // w-10's, whose id begins with w-1's: a prefix scan must not take it for w-1's.
                2 => drop(dir.assign("org1", &doc, &["w-10".into()], i, "test").unwrap()),
                // Taken from w-1 before and after the cursor (40), and from w-10.
                3 => {
                    dir.assign("org1", &doc, &["w-1".into()], 1, "test").unwrap();
                    dir.unassign("org1", &doc, "w-1", i).unwrap();
                }
                4 => {
                    dir.assign("org1", &doc, &["w-10".into()], 1, "test").unwrap();
                    dir.unassign("org1", &doc, "w-10", i).unwrap();
                }
                // Erased while w-1 had it, and while only w-10 had it.
                5 => {
                    dir.assign("org1", &doc, &["w-1".into()], 1, "test").unwrap();
                    dir.bury("org1", &doc, "coordinator").unwrap();
                }
                6 => {
                    dir.assign("org1", &doc, &["w-10".into()], 1, "test").unwrap();
                    dir.bury("org1", &doc, "coordinator").unwrap();
                }
                // Taken from w-1 (before or after the cursor), then erased: the tombstone does
                // not name w-1, whose phones may still hold the person.
                7 => {
                    dir.assign("org1", &doc, &["w-1".into()], 1, "test").unwrap();
                    dir.unassign("org1", &doc, "w-1", i).unwrap();
                    dir.bury("org1", &doc, "coordinator").unwrap();
                }
                // Never assigned to anyone.
                _ => {}
            }
            docs.push(doc);
        }
        let access = Assignments { dir };
        let ids: Vec<&str> = docs.iter().map(String::as_str).collect();
        assert!(ids.len() >= VERDICT_PRELOAD_FROM);
        for revoked in [false, true] {
            let who = DeviceIdentity { org: "org1".into(), device: "d".into(), worker: "w-1".into(), revoked, since: 0 };
            let batch = access.verdicts(&who, &ids, 40).unwrap();
            let one_by_one: Vec<Verdict> = ids.iter().map(|d| verdict(&access, &who, d, 40).unwrap()).collect();
            assert_eq!(batch, one_by_one, "revoked: {revoked}");
            // The cases are all there: readable, purged (erased and taken after the cursor), nothing.
            let count = |v: Verdict| batch.iter().filter(|b| **b == v).count();
            assert_eq!(count(Verdict::Purge), 10 + 5 + 6, "erased while w-1 had them, taken after the cursor (and then erased); revoked: {revoked}");
            assert_eq!(batch.iter().filter(|b| matches!(b, Verdict::Read { .. })).count(), if revoked { 0 } else { 20 });
        }
    }
}
