#![allow(dead_code)]
use std::sync::Arc;

use peersync_core::{Device, ManualClock, NewPerson};

mod fixtures;
pub use fixtures::*;

pub async fn device(worker: &str) -> (Device, ManualClock) {
    let clock = ManualClock::new(t(1, 9));
    let d = Device::in_memory(&KEY, Arc::new(clock.clone())).unwrap();
    d.set_worker(worker).await.unwrap();
    (d, clock)
}

/// Two phones exchange their copies of `id` both ways, as a sync through the server would;
/// returns whether each one's record changed (`a`'s, `b`'s).
pub async fn exchange(a: &Device, b: &Device, id: &str) -> (bool, bool) {
    let (from_a, from_b) = (a.export_document(id).await.unwrap(), b.export_document(id).await.unwrap());
    (a.import_document(id, from_b).await.unwrap(), b.import_document(id, from_a).await.unwrap())
}

/// A person with no teammates.
pub fn person(id: &str, alias: &str) -> NewPerson {
    person_with(id, alias, &[])
}
