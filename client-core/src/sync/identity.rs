//! The device's identity: its Ed25519 key (made on the phone, kept in the sealed store) and the
//! signed token that proves it on every connection without an extra round trip.

use std::sync::atomic::Ordering::Relaxed;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::{Enrollment, SyncError};
use crate::device::Inner;
use crate::error::CoreError;
use crate::store::StoredWrite;

const META_SIGNING_KEY: &str = "signing_key";
const META_ORG: &str = "org";
const META_WORKER: &str = "worker";
/// The key of an enrollment the server has not confirmed yet.
const META_PENDING_KEY: &str = "pending_signing_key";
/// Must match the server's `auth::TOKEN_CONTEXT`.
const TOKEN_CONTEXT: &str = "peersync-sync-v1";

impl Inner {
    fn signing_key(&self) -> Result<Option<Ed25519KeyPair>, CoreError> {
        match self.store.meta(META_SIGNING_KEY)? {
            Some(pkcs8) => Ed25519KeyPair::from_pkcs8(&pkcs8).map(Some).map_err(|e| CoreError::document("signing key", e)),
            None => Ok(None),
        }
    }

    /// `Authorization` header value for a sync connection: device id, time (corrected by the
    /// offset the server taught us), a fresh nonce, and the signature over them.
    pub(crate) fn auth_header(&self) -> Result<Option<String>, CoreError> {
        // A signing key without an organisation is an unconfirmed enrollment by an older
        // version: not enrolled.
        if self.store.meta(META_ORG)?.is_none_or(|o| o.is_empty()) {
            return Ok(None);
        }
        let Some(key) = self.signing_key()? else { return Ok(None) };
        let device = self.device_id()?;
        let time = chrono::Utc::now().timestamp() + self.clock_offset.load(Relaxed);
        let mut n = [0u8; 16];
        SystemRandom::new().fill(&mut n).map_err(|_| CoreError::Task("random generator failed".into()))?;
        let nonce = B64.encode(n);
        let msg = format!("{TOKEN_CONTEXT}\n{device}\n{time}\n{nonce}");
        let sig = B64.encode(key.sign(msg.as_bytes()).as_ref());
        Ok(Some(format!("PeerSync {device}.{time}.{nonce}.{sig}")))
    }
}

/// Enroll with a one-time code: make the key pair on the phone, keep the private key in the
/// sealed store, register the public key with the server.
///
/// The key becomes the device's signing key only once the server has accepted it, in the same
/// write as the organisation and worker: a failed attempt (a mistyped code, no network)
/// changes nothing a sync uses. Until then it waits as the pending key, and a later attempt
/// reuses it, so that a phone whose answer was lost on the way back asks again with the key the
/// server may already hold (the server answers such a repeat as it did the first time).
pub(crate) async fn enroll(inner: &std::sync::Arc<Inner>, opts: &super::SyncOptions, code: &str, name: &str) -> Result<Enrollment, SyncError> {
    let i = inner.clone();
    let (device, pkcs8, public_key) = tokio::task::spawn_blocking(move || -> Result<(String, Vec<u8>, Vec<u8>), SyncError> {
        let meta = |name: &str| i.store.meta(name).map_err(CoreError::from);
        if let Some(org) = meta(META_ORG)?.filter(|o| !o.is_empty()) {
            let worker = meta(META_WORKER)?.unwrap_or_default();
            return Err(SyncError::AlreadyEnrolled { org: String::from_utf8_lossy(&org).into_owned(), worker: String::from_utf8_lossy(&worker).into_owned() });
        }
        // A key from an earlier attempt; from versions before pending keys, an attempt's key
        // was stored as the signing key itself.
        let earlier = match meta(META_PENDING_KEY)?.filter(|k| !k.is_empty()) {
            Some(k) => Some(k),
            None => meta(META_SIGNING_KEY)?.filter(|k| !k.is_empty()),
        };
        let pkcs8 = match earlier {
            Some(k) => k,
            None => {
                let fresh = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| CoreError::Task("key generation failed".into()))?;
                let fresh = fresh.as_ref().to_vec();
                i.store.commit(vec![StoredWrite::Meta { name: META_PENDING_KEY.into(), value: fresh.clone() }]).map_err(CoreError::from)?;
                fresh
            }
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| CoreError::document("signing key", e))?;
        Ok((i.device_id()?, pkcs8, pair.public_key().as_ref().to_vec()))
    })
    .await
    .map_err(|e| CoreError::Task(e.to_string()))??;
    let body = serde_json::json!({ "code": code, "device": device, "public_key": B64.encode(public_key), "name": name });
    let (status, reply) = super::http::post_json(opts, "/v1/enroll", &body, opts.frame_timeout).await?;
    if status != 200 {
        let message = reply.get("error").and_then(|m| m.as_str()).unwrap_or("refused").to_string();
        return Err(SyncError::Enrollment { status, message });
    }
    let field = |k: &str| reply.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (Some(org), Some(worker)) = (field("org"), field("worker")) else {
        return Err(SyncError::Enrollment { status, message: "the server's reply lacks org and worker".into() });
    };
    let i = inner.clone();
    let (o, w) = (org.clone(), worker.clone());
    tokio::task::spawn_blocking(move || -> Result<(), CoreError> {
        i.store.commit(vec![
            StoredWrite::Meta { name: META_SIGNING_KEY.into(), value: pkcs8 },
            StoredWrite::Meta { name: META_PENDING_KEY.into(), value: Vec::new() },
            StoredWrite::Meta { name: META_ORG.into(), value: o.into_bytes() },
            StoredWrite::Meta { name: META_WORKER.into(), value: w.clone().into_bytes() },
        ])?;
        i.lock().worker = Some(w);
        Ok(())
    })
    .await
    .map_err(|e| CoreError::Task(e.to_string()))??;
    Ok(Enrollment { org, worker, device })
}
