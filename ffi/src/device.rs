//! `Device`: one worker's phone, wrapping `peersync_core::Device`. Every method is safe to call
//! from any thread, and at the same time from several.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use peersync_core as core;

use crate::error::PeersyncError;
use crate::runtime::run;
use crate::sync::{Bridge, DeviceListener, Enrollment, SyncConfig, SyncReport};
use crate::types::{
    Checkin, Consent, ConsentChange, FollowUp, NewCheckin, NewPerson, NewVisit, PendingChanges, Person, PersonRecord,
    PersonSummary, Visit, VisitEdit, parse_date,
};

/// The time source for recorded timestamps. Apps use the phone's clock (the default); tests and
/// replays of recorded field data supply their own.
#[uniffi::export(with_foreign)]
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

struct ForeignClock(Arc<dyn Clock>);

impl core::Clock for ForeignClock {
    fn now(&self) -> DateTime<Utc> {
        // A clock outside the representable range is a bug in the app's clock; the phone's
        // own time is the safest stand-in.
        crate::types::utc("clock", self.0.now()).unwrap_or_else(|_| Utc::now())
    }
}

/// A worker's phone: its encrypted store of person records, and sync with the server.
#[derive(uniffi::Object)]
pub struct Device {
    core: core::Device,
}

#[uniffi::export]
impl Device {
    /// Open (or create) the encrypted store in the directory `path` with the app's 32-byte
    /// `key`. A different key than the store was made with gives `WrongKey`.
    #[uniffi::constructor]
    pub async fn open(path: String, key: Vec<u8>) -> Result<Arc<Self>, PeersyncError> {
        Self::open_with_clock(path, key, None).await
    }

    /// As `open`, with timestamps taken from `clock` instead of the phone's clock.
    #[uniffi::constructor]
    pub async fn open_with_clock(
        path: String,
        key: Vec<u8>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Arc<Self>, PeersyncError> {
        let clock: Arc<dyn core::Clock> = match clock {
            Some(c) => Arc::new(ForeignClock(c)),
            None => Arc::new(core::SystemClock),
        };
        let core = run(async move { Ok(core::Device::open(path, &key, clock).await?) }).await?;
        Ok(Arc::new(Self { core }))
    }

    /// The worker this phone records for, once enrolled.
    pub fn worker(&self) -> Option<String> {
        self.core.worker()
    }

    /// This install's device id, as the server knows it.
    pub async fn device_id(&self) -> Result<String, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.device_id().await?) }).await
    }

    /// Enroll with a one-time code from a coordinator. The phone makes its own key pair; the
    /// private key never leaves the encrypted store.
    pub async fn enroll(&self, config: SyncConfig, code: String, device_name: String) -> Result<Enrollment, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.enroll(&config.options(None), &code, &device_name).await?.into()) }).await
    }

    pub async fn register_person(&self, person: NewPerson) -> Result<Person, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.register_person(person.into()).await?.into()) }).await
    }

    pub async fn record_visit(&self, person_id: String, visit: NewVisit) -> Result<Visit, PeersyncError> {
        let d = self.core.clone();
        let visit = visit.try_into()?;
        run(async move { Ok(d.record_visit(&person_id, visit).await?.into()) }).await
    }

    pub async fn record_checkin(&self, person_id: String, checkin: NewCheckin) -> Result<Checkin, PeersyncError> {
        let d = self.core.clone();
        let checkin = checkin.try_into()?;
        run(async move { Ok(d.record_checkin(&person_id, checkin).await?.into()) }).await
    }

    /// Amend a visit; returns the visit as it now reads on this device.
    pub async fn edit_visit(&self, person_id: String, visit_id: String, edit: VisitEdit) -> Result<Visit, PeersyncError> {
        let d = self.core.clone();
        let edit = edit.try_into()?;
        run(async move { Ok(d.edit_visit(&person_id, &visit_id, edit).await?.into()) }).await
    }

    /// Record a change of consent the person gave now; returns the consent that holds with it
    /// (the latest word by time wins, also against changes made on other phones).
    pub async fn set_consent(&self, person_id: String, change: ConsentChange) -> Result<Consent, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.set_consent(&person_id, change.into()).await?.into()) }).await
    }

    /// The caseload: one summary per person on this device, ordered by person id.
    pub async fn people(&self) -> Result<Vec<PersonSummary>, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.people().await?.into_iter().map(Into::into).collect()) }).await
    }

    /// Everything this device holds about one person.
    pub async fn person(&self, person_id: String) -> Result<PersonRecord, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.person(&person_id).await?.into()) }).await
    }

    /// People whose follow-up is due on or before `on` (`YYYY-MM-DD`), earliest first.
    pub async fn follow_ups_due(&self, on: String) -> Result<Vec<FollowUp>, PeersyncError> {
        let d = self.core.clone();
        let on = parse_date("on", &on)?;
        run(async move { Ok(d.follow_ups_due(on).await?.into_iter().map(Into::into).collect()) }).await
    }

    /// Local changes the server has not acknowledged yet.
    pub async fn pending_changes(&self) -> Result<PendingChanges, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.pending_changes().await?.into()) }).await
    }

    /// Sync once: send what the server lacks, receive what this phone lacks. `listener`, if
    /// given, hears this sync's progress and state, all of it before this call returns
    /// (and so have the device's subscribers, on their own threads).
    pub async fn sync(
        &self,
        config: SyncConfig,
        listener: Option<Arc<dyn DeviceListener>>,
    ) -> Result<SyncReport, PeersyncError> {
        let d = self.core.clone();
        let bridge = listener.map(|l| Arc::new(Bridge::new(l)));
        // Called from inside a subscriber's callback (Kotlin `runBlocking` polls this future on
        // the calling thread): waiting for subscribers would be waiting on that callback.
        let from_listener = std::thread::current().name() == Some(crate::sync::LISTENER_THREAD);
        run(async move {
            let mut options = config.options(bridge.clone());
            options.wait_for_subscribers = !from_listener;
            let result = d.sync(&options).await;
            // The options hold the bridge too: let go of them, or it is never ours alone to close.
            drop(options);
            // When `sync` returns, its listener has heard everything about it, the final state
            // included, and the library holds it no more. A listener stuck for longer than
            // this does not hold the caller.
            let limit = std::time::Duration::from_secs(5);
            match bridge.map(Arc::try_unwrap) {
                Some(Ok(b)) => b.close(limit).await,
                // Still shared (not expected): at least everything has been heard.
                Some(Err(b)) => {
                    let _ = tokio::time::timeout(limit, b.flushed()).await;
                }
                None => {}
            }
            Ok(result?.into())
        })
        .await
    }

    /// Sync, then stay connected: teammates' changes arrive as they sync, and what is recorded
    /// here is sent at once. Stop with `LiveSync.stop()`.
    pub async fn start_live_sync(&self, config: SyncConfig) -> Result<Arc<LiveSync>, PeersyncError> {
        let d = self.core.clone();
        let live = run(async move { Ok(d.sync_live(&config.options(None)).await?) }).await?;
        Ok(Arc::new(LiveSync { live: Mutex::new(Some(live)) }))
    }

    /// Hear every change of records on this device and every sync's progress and state, until
    /// the returned subscription is cancelled.
    pub fn subscribe(&self, listener: Arc<dyn DeviceListener>) -> Arc<Subscription> {
        // The subscription keeps its own hold on the listener, so that the app's listener is
        // released on the thread that cancels (an app thread), never last on the listener
        // thread: a Python interpreter shutting down aborts when another thread enters it.
        let bridge = Bridge::new(listener.clone());
        let released = bridge.take_released();
        let cancelled = bridge.cancelled();
        let inner = self.core.subscribe(Arc::new(bridge));
        Arc::new(Subscription { inner, cancelled, held: Mutex::new(Some((listener, released))) })
    }

    /// Whether a coordinator revoked this device and its records were deleted. The app should
    /// then also delete the store key from the Keystore/Keychain.
    pub fn is_wiped(&self) -> bool {
        self.core.is_wiped()
    }

    /// The heads of a person's document (hex change hashes, sorted): two copies with the same
    /// heads hold the same record.
    pub async fn heads(&self, person_id: String) -> Result<Vec<String>, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.heads(&person_id).await?) }).await
    }

    /// The person's whole document (automerge bytes), e.g. to hand to another phone directly.
    pub async fn export_document(&self, person_id: String) -> Result<Vec<u8>, PeersyncError> {
        let d = self.core.clone();
        run(async move { Ok(d.export_document(&person_id).await?) }).await
    }

    /// Merge a document exported by another phone. Returns whether anything new arrived.
    /// Bytes that are not an automerge document give `Invalid`.
    pub async fn import_document(&self, person_id: String, data: Vec<u8>) -> Result<bool, PeersyncError> {
        let d = self.core.clone();
        run(async move {
            d.import_document(&person_id, data).await.map_err(|e| match e {
                core::CoreError::Document { .. } => PeersyncError::Invalid(e.to_string()),
                e => e.into(),
            })
        })
        .await
    }
}

/// A live connection (see `Device.start_live_sync`).
#[derive(uniffi::Object)]
pub struct LiveSync {
    live: Mutex<Option<core::sync::LiveSync>>,
}

#[uniffi::export]
impl LiveSync {
    /// Disconnect and return what the connection did. Stopping twice returns an empty report.
    pub async fn stop(&self) -> Result<SyncReport, PeersyncError> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).take();
        match live {
            Some(l) => run(async move { Ok(l.stop().await?.into()) }).await,
            None => Ok(core::sync::SyncReport::default().into()),
        }
    }

    /// Whether the connection has ended (stopped, an error, or the server went away).
    pub fn is_finished(&self) -> bool {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|l| l.is_finished())
    }
}

/// What a subscription keeps until it is cancelled: the app's listener, and what answers once
/// the listener thread has let go of it.
type Held = (Arc<dyn DeviceListener>, Option<std::sync::mpsc::Receiver<()>>);

/// A listener's subscription (see `Device.subscribe`).
#[derive(uniffi::Object)]
pub struct Subscription {
    inner: core::Subscription,
    /// Shared with the listener thread: set, it drops what it has not delivered.
    cancelled: Arc<std::sync::atomic::AtomicBool>,
    /// The app's listener and what answers once the listener thread has let go of it.
    held: Mutex<Option<Held>>,
}

#[uniffi::export]
impl Subscription {
    /// Stop calling the listener: events not yet delivered are dropped. Also happens when the
    /// subscription is destroyed.
    pub fn cancel(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.cancelled.store(true, SeqCst);
        self.inner.cancel();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((listener, released)) = held {
            // The listener thread, with nothing more to deliver, ends as soon as any callback in
            // progress returns (at most two seconds are waited); then the app's listener is let
            // go here, on the app's thread. Not from inside a listener cancelling itself.
            let on_listener_thread = std::thread::current().name() == Some(crate::sync::LISTENER_THREAD);
            if let Some(released) = released.filter(|_| !on_listener_thread) {
                let _ = released.recv_timeout(std::time::Duration::from_secs(2));
            }
            drop(listener);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}
