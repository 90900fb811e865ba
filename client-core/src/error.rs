//! Errors of the device core. Each says what went wrong and what the caller can do.

use std::fmt;

/// A value that a write was given and that the domain model does not allow.
/// Nothing is written when this is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The field, as named in the domain model (`mode`, `wellbeing[3]`, ...).
    pub field: String,
    /// What is wrong with the value.
    pub problem: String,
    /// The allowed values, for fields with a controlled vocabulary.
    pub allowed: Vec<String>,
}

impl ValidationError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
            allowed: Vec::new(),
        }
    }

    pub(crate) fn not_in(field: impl Into<String>, value: &str, allowed: &[&str]) -> Self {
        Self {
            field: field.into(),
            problem: format!("{value:?} is not an allowed value"),
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.problem)?;
        if !self.allowed.is_empty() {
            write!(f, " (allowed: {})", self.allowed.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Failures of the encrypted local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store key does not open this store: it was created with another key \
         (use the key the app stored in the Keystore/Keychain when the store was made)"
    )]
    WrongKey,
    #[error("a stored value failed its integrity check ({key}): the file was altered or damaged")]
    Tampered { key: String },
    #[error("the store key must be exactly 32 bytes, got {0}")]
    BadKeyLength(usize),
    #[error("stored value for {key} could not be decoded: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("storage I/O failed: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// Errors of [`crate::Device`] calls.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no person with id {0:?} on this device")]
    UnknownPerson(String),
    #[error("person {person:?} has no visit with id {visit:?}")]
    UnknownVisit { person: String, visit: String },
    #[error("a person with id {0:?} is already registered")]
    PersonExists(String),
    #[error("a record with id {0:?} already exists for this person")]
    RecordExists(String),
    #[error("person {0:?} has withdrawn consent to a record being kept: nothing more can be recorded")]
    NoConsentToRecord(String),
    #[error(
        "the record of person {person:?} would grow to {size} bytes, over the {limit} bytes one record may take \
         in entries (a sync carries a record in one piece); nothing was written. Changes of consent are still taken"
    )]
    RecordFull { person: String, size: usize, limit: usize },
    #[error(
        "this device was revoked by a coordinator and its records were deleted; close it, delete its \
         store and store key, and enroll a fresh store with a new code"
    )]
    Wiped,
    #[error("this device has no worker identity yet: enroll it (or call set_worker) before recording")]
    NoWorker,
    #[error("the person document {doc:?} is damaged: {reason}")]
    Document { doc: String, reason: String },
    #[error("internal task failed: {0}")]
    Task(String),
}

impl CoreError {
    pub(crate) fn document(doc: &str, reason: impl fmt::Display) -> Self {
        CoreError::Document {
            doc: doc.to_string(),
            reason: reason.to_string(),
        }
    }
}
