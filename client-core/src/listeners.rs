//! Listeners an app subscribes to on a device, so a screen refreshes when records change and a
//! sync indicator follows every sync, whichever thread or connection caused it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::sync::{SyncObserver, SyncProgress, SyncState};

/// The device's subscribers. Listeners are called outside the registry's lock, so a listener
/// may subscribe or cancel from inside a callback.
#[derive(Default)]
pub(crate) struct Listeners {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<dyn SyncObserver>>>,
}

impl Listeners {
    pub(crate) fn add(self: &Arc<Self>, listener: Arc<dyn SyncObserver>) -> Subscription {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id, listener);
        Subscription { id, listeners: Arc::downgrade(self) }
    }

    fn snapshot(&self) -> Vec<Arc<dyn SyncObserver>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub(crate) fn records_changed(&self, people: &[String]) {
        if people.is_empty() {
            return;
        }
        for l in self.snapshot() {
            l.records_changed(people);
        }
    }

    pub(crate) fn state(&self, state: &SyncState) {
        for l in self.snapshot() {
            l.state(state);
        }
    }

    /// Wait, at most `limit` in all, until every subscriber has been delivered what it was told.
    pub(crate) async fn delivered(&self, limit: std::time::Duration) {
        let waits: Vec<_> = self.snapshot().iter().filter_map(|l| l.delivered()).collect();
        let _ = tokio::time::timeout(limit, futures_util::future::join_all(waits)).await;
    }
}

/// A subscription to a device's changes. Cancelled by [`Subscription::cancel`] or when dropped.
pub struct Subscription {
    id: u64,
    listeners: Weak<Listeners>,
}

impl Subscription {
    /// Stop calling the listener. Calls already running finish; no new ones start.
    pub fn cancel(&self) {
        if let Some(l) = self.listeners.upgrade() {
            l.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// What one sync reports to: the observer the caller passed for this sync, and every
/// subscriber of the device.
pub(crate) struct Fanout {
    pub(crate) explicit: Option<Arc<dyn SyncObserver>>,
    pub(crate) listeners: Arc<Listeners>,
}

impl SyncObserver for Fanout {
    fn progress(&self, progress: &SyncProgress) {
        if let Some(o) = &self.explicit {
            o.progress(progress);
        }
        for l in self.listeners.snapshot() {
            l.progress(progress);
        }
    }

    fn records_changed(&self, people: &[String]) {
        if let Some(o) = &self.explicit {
            o.records_changed(people);
        }
        self.listeners.records_changed(people);
    }

    fn state(&self, state: &SyncState) {
        if let Some(o) = &self.explicit {
            o.state(state);
        }
        self.listeners.state(state);
    }
}
