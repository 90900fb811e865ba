//! Prometheus-format counters. Plain atomics: a handful of numbers needs no metrics crate.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the sync duration histogram.
const BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub docs_received: AtomicU64,
    pub docs_sent: AtomicU64,
    pub errors: AtomicU64,
    pub auth_failures: AtomicU64,
    sync_buckets: [AtomicU64; BUCKETS.len()],
    sync_count: AtomicU64,
    sync_micros: AtomicU64,
}

impl Metrics {
    pub fn observe_sync(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.sync_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.sync_count.fetch_add(1, Relaxed);
        self.sync_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn render(&self, cached_docs: usize) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, kind: &str, v: &dyn std::fmt::Display| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| metric(&format!("peersync_{name}"), help, kind, &v);
        counter("connections_total", "Sync connections accepted.", "counter", self.connections_total.load(Relaxed));
        counter("connections_active", "Sync connections open now.", "gauge", self.connections_active.load(Relaxed));
        counter("frames_received_total", "Websocket frames received.", "counter", self.frames_in.load(Relaxed));
        counter("frames_sent_total", "Websocket frames sent.", "counter", self.frames_out.load(Relaxed));
        counter("bytes_received_total", "Frame payload bytes received.", "counter", self.bytes_in.load(Relaxed));
        counter("bytes_sent_total", "Frame payload bytes sent.", "counter", self.bytes_out.load(Relaxed));
        counter("docs_received_total", "Documents pushed by devices.", "counter", self.docs_received.load(Relaxed));
        counter("docs_sent_total", "Documents sent to devices.", "counter", self.docs_sent.load(Relaxed));
        counter("errors_total", "Sync sessions ended by an error.", "counter", self.errors.load(Relaxed));
        counter("auth_failures_total", "Refused connection attempts.", "counter", self.auth_failures.load(Relaxed));
        counter("cached_documents", "Documents held in the server's cache.", "gauge", cached_docs as u64);
        // The usual process figures, by their usual names, where the system tells them; the
        // peak lets `peersync bench --server` show a server's memory it did not start.
        if let Some(u) = crate::procstat::usage(std::process::id()) {
            counter("peak_resident_memory_bytes", "The most memory resident at once since the server started.", "gauge", u.peak_resident_bytes);
            metric("process_resident_memory_bytes", "Memory resident now.", "gauge", &u.resident_bytes);
            metric("process_cpu_seconds_total", "CPU time used, user and system.", "counter", &u.cpu.as_secs_f64());
        }
        let _ = writeln!(out, "# HELP peersync_sync_duration_seconds Duration of sync exchanges.\n# TYPE peersync_sync_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "peersync_sync_duration_seconds_bucket{{le=\"{b}\"}} {}", self.sync_buckets[i].load(Relaxed));
        }
        let count = self.sync_count.load(Relaxed);
        let _ = writeln!(out, "peersync_sync_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "peersync_sync_duration_seconds_sum {}", self.sync_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "peersync_sync_duration_seconds_count {count}");
        out
    }
}
