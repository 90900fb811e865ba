//! A sync's listener is let go of before `sync` returns: released later, on the library's
//! listener thread, it would call into an app runtime that may be ending (a Python script that
//! exits right after its last sync aborts: "FATAL: exception not rethrown").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use peersync_ffi::{Device, DeviceListener, SyncConfig, SyncProgress, SyncState};

struct Slow(Arc<AtomicBool>);

impl DeviceListener for Slow {
    fn on_progress(&self, _: SyncProgress) {}
    fn on_state(&self, _: SyncState) {}
    fn on_records_changed(&self, _: Vec<String>) {}
}

impl Drop for Slow {
    fn drop(&mut self) {
        // A foreign runtime's release takes its time: sync must wait for it.
        std::thread::sleep(Duration::from_millis(300));
        self.0.store(true, SeqCst);
    }
}

#[tokio::test]
async fn a_syncs_listener_is_released_before_sync_returns() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::open(dir.path().join("phone").display().to_string(), vec![7; 32]).await.unwrap();
    let released = Arc::new(AtomicBool::new(false));
    // Not enrolled: the sync fails at once, and its listener is done with all the same.
    let config = SyncConfig { server_url: "ws://127.0.0.1:9".into(), ca_pem: None, frame_timeout_secs: None };
    let result = device.sync(config, Some(Arc::new(Slow(released.clone())))).await;
    assert!(result.is_err());
    assert!(released.load(SeqCst), "the listener was still held when sync returned");
}
