//! The device's identity: its Ed25519 key (made on the phone, kept in the sealed store) and the
//! signed token that proves it on every connection without an extra round trip.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

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
pub(crate) async fn enroll(inner: &std::sync::Arc<Inner>, opts: &super::SyncOptions, code: &str, name: &str) -> Result<Enrollment, SyncError> {
    let i = inner.clone();
    let (device, public_key) = tokio::task::spawn_blocking(move || -> Result<(String, Vec<u8>), CoreError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| CoreError::Task("key generation failed".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| CoreError::document("signing key", e))?;
        let device = i.device_id()?;
        i.store.commit(vec![StoredWrite::Meta { name: META_SIGNING_KEY.into(), value: pkcs8.as_ref().to_vec() }])?;
        Ok((device, pair.public_key().as_ref().to_vec()))
    })
    .await
    .map_err(|e| CoreError::Task(e.to_string()))??;
    let body = serde_json::json!({ "code": code, "device": device, "public_key": B64.encode(public_key), "name": name });
    let (status, reply) = super::http::post_json(opts, "/v1/enroll", &body, Duration::from_secs(30)).await?;
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
            StoredWrite::Meta { name: META_ORG.into(), value: o.into_bytes() },
            StoredWrite::Meta { name: "worker".into(), value: w.clone().into_bytes() },
        ])?;
        i.lock().worker = Some(w);
        Ok(())
    })
    .await
    .map_err(|e| CoreError::Task(e.to_string()))??;
    Ok(Enrollment { org, worker, device })
}
