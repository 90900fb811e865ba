//! Keeps the reporting rows current in the background, while sync is quiet.
//!
//! Pushes only mark a document's row due (see [`crate::docs`]); a report computes what is
//! still due when asked. This task does that work beforehand, so reports stay quick, but only
//! when no device has been connected for a second (or nothing was written for ten, when live
//! phones stay connected), in small chunks that give way as soon as a device connects: a
//! phone's short network window is never spent waiting on reporting.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::app::AppState;

/// How often the task looks at whether sync is quiet.
const TICK: Duration = Duration::from_millis(250);
/// No device connected for this long: quiet.
const QUIET_NO_DEVICES: Duration = Duration::from_secs(1);
/// Nothing written for this long, devices connected or not: quiet.
const QUIET_NO_WRITES: Duration = Duration::from_secs(10);
/// Rows computed between two looks at whether sync is still quiet (a few milliseconds each).
const CHUNK: usize = 32;
/// After a failure, wait this long before trying again (reports still compute due rows).
const AFTER_ERROR: Duration = Duration::from_secs(60);

/// When a device was last connected and the hub last wrote, as seen at each look.
struct Activity {
    devices_seen: Instant,
    writes: u64,
    writes_seen: Instant,
}

impl Activity {
    fn new(state: &AppState) -> Self {
        let now = Instant::now();
        Self { devices_seen: now, writes: state.hub.writes(), writes_seen: now }
    }

    /// Look again; whether sync is quiet now.
    fn quiet(&mut self, state: &AppState) -> bool {
        let now = Instant::now();
        if state.metrics.connections_active.load(Relaxed) > 0 {
            self.devices_seen = now;
        }
        let w = state.hub.writes();
        if w != self.writes {
            (self.writes, self.writes_seen) = (w, now);
        }
        now - self.devices_seen >= QUIET_NO_DEVICES || now - self.writes_seen >= QUIET_NO_WRITES
    }
}

/// Run until the server shuts down.
pub async fn refresh_while_quiet(state: Arc<AppState>) {
    let mut shutdown = state.shutdown.clone();
    let mut activity = Activity::new(&state);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let mut failed = false;
        while activity.quiet(&state) && !*shutdown.borrow() {
            let st = state.clone();
            match tokio::task::spawn_blocking(move || st.hub.refresh_views(None, CHUNK)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not refresh reporting rows; reports compute them when asked; trying again in a minute");
                    failed = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the reporting-row refresh task failed; trying again in a minute");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            tokio::select! {
                _ = tokio::time::sleep(AFTER_ERROR) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
