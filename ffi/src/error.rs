//! The one error type apps see. Flat: each case carries the core's readable message (what went
//! wrong and what to do), so an app can switch on the case and show the message as it is.

use peersync_core::sync::SyncError;
use peersync_core::{CoreError, StoreError};

#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum PeersyncError {
    /// A value the domain model does not allow (the message names the field and the allowed
    /// values). Nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// The key does not open this store: it was created with another key.
    #[error("{0}")]
    WrongKey(String),
    /// The store on disk is damaged, altered, or could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// No such person or visit on this device.
    #[error("{0}")]
    NotFound(String),
    /// A person or record with this id already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The person withdrew consent to a record being kept.
    #[error("{0}")]
    NoConsent(String),
    /// The device needs a worker identity: enroll it first.
    #[error("{0}")]
    NotEnrolled(String),
    /// A coordinator revoked this device and its records were deleted.
    #[error("{0}")]
    Wiped(String),
    /// The server could not be reached, or the connection dropped or timed out. Nothing was
    /// lost; sync again later.
    #[error("{0}")]
    Network(String),
    /// The phone's clock is too far from the server's.
    #[error("{0}")]
    ClockSkew(String),
    /// The server sent something this version of the app cannot read: update the app.
    #[error("{0}")]
    Incompatible(String),
    /// The server refused the connection, the enrollment code, or ended the sync.
    #[error("{0}")]
    Refused(String),
    /// Something inside the library failed; the message says what.
    #[error("{0}")]
    Internal(String),
}

impl From<CoreError> for PeersyncError {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        match e {
            CoreError::Invalid(_) | CoreError::RecordFull { .. } => Self::Invalid(message),
            CoreError::Store(StoreError::WrongKey) => Self::WrongKey(message),
            CoreError::Store(StoreError::BadKeyLength(_)) => Self::Invalid(message),
            CoreError::Store(_) | CoreError::Document { .. } => Self::Storage(message),
            CoreError::UnknownPerson(_) | CoreError::UnknownVisit { .. } => Self::NotFound(message),
            CoreError::PersonExists(_) | CoreError::RecordExists(_) => Self::AlreadyExists(message),
            CoreError::NoConsentToRecord(_) => Self::NoConsent(message),
            CoreError::Wiped => Self::Wiped(message),
            CoreError::NoWorker => Self::NotEnrolled(message),
            CoreError::Task(_) => Self::Internal(message),
        }
    }
}

impl From<SyncError> for PeersyncError {
    fn from(e: SyncError) -> Self {
        let message = e.to_string();
        match e {
            SyncError::Local(core) => core.into(),
            SyncError::Connect { .. } | SyncError::Dropped | SyncError::Timeout(_) => Self::Network(message),
            SyncError::ClockSkew { .. } => Self::ClockSkew(message),
            SyncError::NotEnrolled => Self::NotEnrolled(message),
            SyncError::Wiped { .. } => Self::Wiped(message),
            SyncError::BadUrl { .. } => Self::Invalid(message),
            SyncError::Rejected { .. } | SyncError::Enrollment { .. } | SyncError::AlreadyEnrolled { .. } | SyncError::Untrusted { .. } | SyncError::Server { .. } => {
                Self::Refused(message)
            }
            SyncError::Protocol(_) => Self::Incompatible(message),
        }
    }
}
