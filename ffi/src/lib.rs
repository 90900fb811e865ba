//! UniFFI bindings of peersync-core for Android (Kotlin) and iOS (Swift), and Python.
//!
//! A thin layer: objects wrapping the core's `Device`, records mirroring its domain types, one
//! flat error enum, and listener interfaces the app implements. Behaviour lives in
//! `peersync-core`; see `ffi/README.md` for how an app builds and uses the library.

mod device;
mod error;
mod runtime;
mod sync;
mod types;

pub use device::{Clock, Device, LiveSync, Subscription};
pub use error::PeersyncError;
pub use sync::{DeviceListener, Enrollment, Refusal, SyncConfig, SyncProgress, SyncReport, SyncState};
pub use types::{
    Checkin, Consent, ConsentChange, FieldConflict, FollowUp, NewCheckin, NewPerson, NewVisit, PendingChanges, Person,
    PersonRecord, PersonSummary, Visit, VisitEdit,
};

uniffi::setup_scaffolding!();
