//! peersync-core: the device core shared by the Android and iOS apps.
//!
//! - [`model`], [`vocab`]: what a peer worker records, and the rules every write obeys.
//! - [`document`]: one automerge document per person.
//! - [`store`]: the encrypted local store (sled on a phone, memory in tests).
//! - [`device`]: the API an app calls.
//!
//! No network I/O happens in this crate's model, document and store modules.

pub mod caseload;
pub mod clock;
pub mod crypto;
pub mod device;
pub mod document;
pub mod error;
mod listeners;
pub mod model;
mod packing;
pub mod protocol;
pub mod store;
pub mod sync;
pub mod vocab;

pub use caseload::{FollowUp, PersonSummary};
pub use clock::{Clock, ManualClock, SystemClock};
pub use device::{Device, DocSyncState, PendingChanges};
pub use document::{FieldConflict, PersonDoc, PersonRecord};
pub use listeners::Subscription;
pub use error::{CoreError, StoreError, ValidationError};
pub use model::{Checkin, Consent, ConsentChange, NewCheckin, NewPerson, NewVisit, Person, Visit, VisitEdit};
