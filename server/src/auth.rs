//! Who is on the other end of a connection, and what they may do with each document.
//!
//! Sessions ask these two seams and nothing else, so identity (enrollment, signed connections)
//! and access control (assignments, erasure) replace the implementations here without touching
//! the sync code.

use axum::http::request::Parts;
use peersync_core::protocol::AckStatus;
use peersync_core::StoreError;

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub org: String,
    pub device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no device credentials in the request")]
    Missing,
    #[error("invalid device credentials: {0}")]
    Invalid(String),
}

pub trait Authenticator: Send + Sync + 'static {
    /// Identify the device from its upgrade request, without an extra round trip.
    fn authenticate(&self, request: &Parts) -> Result<DeviceIdentity, AuthError>;
}

pub trait Access: Send + Sync + 'static {
    fn can_read(&self, who: &DeviceIdentity, doc: &str) -> Result<bool, StoreError>;
    /// `None` if `who` may change `doc`, else the refusal to send back for that document.
    fn check_write(&self, who: &DeviceIdentity, doc: &str) -> Result<Option<AckStatus>, StoreError>;
}

/// Development identity: the device names itself in the `device` query parameter and belongs
/// to one organisation. Proves nothing; for loopback use until enrollment is in place.
pub struct DeclaredDevice {
    pub org: String,
}

impl Authenticator for DeclaredDevice {
    fn authenticate(&self, request: &Parts) -> Result<DeviceIdentity, AuthError> {
        let query = request.uri.query().ok_or(AuthError::Missing)?;
        let device = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("device="))
            .ok_or(AuthError::Missing)?;
        peersync_core::model::validate_id("device", device).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(DeviceIdentity { org: self.org.clone(), device: device.to_string() })
    }
}

/// Every device may read and write every document of its own organisation.
pub struct SameOrganisation;

impl Access for SameOrganisation {
    fn can_read(&self, _: &DeviceIdentity, _: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    fn check_write(&self, _: &DeviceIdentity, _: &str) -> Result<Option<AckStatus>, StoreError> {
        Ok(None)
    }
}
