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
    /// The log position the device has caught up to (its cursor in this session): what was
    /// taken from its worker after it is news to the device.
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
    #[error("this token was used already")]
    Replayed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub trait Authenticator: Send + Sync + 'static {
    /// Identify the device from its upgrade request, without an extra round trip.
    fn authenticate(&self, request: &Parts) -> Result<DeviceIdentity, AuthError>;
}

pub trait Access: Send + Sync + 'static {
    /// `Some(granted_seq)` if `who` may read `doc`: the log position from which its worker has
    /// had it (its devices lack everything before, whatever their cursor).
    fn read_since(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError>;
    /// Whether `who` must delete `doc` if it has it: erased, or taken from its worker after `since`.
    fn must_purge(&self, who: &DeviceIdentity, doc: &str, since: u64) -> Result<bool, StoreError>;
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
}

impl<S: LocalStore> SignedDevice<S> {
    pub fn new(dir: Arc<Directory<S>>) -> Self {
        Self { dir, seen: Mutex::new(HashMap::new()) }
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
        if (now - time).abs() > TOKEN_WINDOW_SECS {
            return Err(AuthError::Clock { server_time: now });
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

impl<S: LocalStore> Access for Assignments<S> {
    fn read_since(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<u64>, StoreError> {
        if who.revoked || self.dir.tombstone(&who.org, doc)?.is_some() {
            return Ok(None);
        }
        Ok(self.dir.assignment(&who.org, doc, &who.worker)?.map(|a| a.granted_seq))
    }

    fn must_purge(&self, who: &DeviceIdentity, doc: &str, since: u64) -> Result<bool, StoreError> {
        if let Some(t) = self.dir.tombstone(&who.org, doc)? {
            if t.workers.contains(&who.worker) {
                return Ok(true);
            }
        }
        Ok(self.dir.unassigned_at(&who.org, &who.worker, doc)?.is_some_and(|at| at > since))
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
        if !exists || self.dir.assignment(&who.org, doc, &who.worker)?.is_some() {
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
