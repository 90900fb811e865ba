//! Sync benchmark (not a test): one phone holding the 2,000 person documents of a synthetic
//! scenario, against a real server on loopback.
//!
//!     cargo run --release -p peersync-tests --bin sync_bench [-- scenario.jsonl]
//!
//! Without a file it runs `shared/data/generate.py --workers 50 --people 2000 --weeks 12` (beside the checkout).
//! Phases: first upload, idle re-sync, a fresh phone pulling everything, an incremental push of
//! five visits. Each: wall time, bytes each way at the socket, round trips.

use std::sync::Arc;
use std::time::Instant;

use peersync_core::sync::SyncReport;
use peersync_core::{Device, ManualClock};
use peersync_server::scenario::{self, Event};
use peersync_tests::{KEY, TestServer, visit};

fn line(phase: &str, docs: usize, r: &SyncReport, wall_ms: u128) {
    println!(
        "{phase:<22} docs {docs:>5}  wall {wall_ms:>6} ms  up {:>9} B  down {:>9} B  round trips {}  (upgrade {} B up)",
        r.bytes_up, r.bytes_down, r.round_trips, r.upgrade_bytes_up
    );
}

#[tokio::main]
async fn main() {
    let text = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(&path).expect("read the scenario"),
        None => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/generate.py");
            let out = std::process::Command::new("python3")
                .args([script, "--workers", "50", "--people", "2000", "--weeks", "12"])
                .output()
                .expect("run generate.py (pass a scenario file instead)");
            assert!(out.status.success(), "generate.py failed: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).expect("UTF-8")
        }
    };
    let events = scenario::parse(&text).expect("valid scenario");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let clock = ManualClock::new(events[0].at());
    let phone = Device::open(dir.path().join("phone"), &KEY, Arc::new(clock.clone())).await.unwrap();
    // Enrolled as w-001: the server assigns every person this phone creates to w-001.
    phone.enroll(&server.options(), &server.code("w-001"), "bench phone").await.unwrap();
    eprintln!("recording {} events on one phone...", events.len());
    let started = Instant::now();
    let mut worker = String::new();
    for e in &events {
        if let Some(by) = e.phone()
            && by != worker
        {
            phone.set_worker(by).await.unwrap();
            worker = by.to_string();
        }
        clock.set(e.at());
        let r = match e {
            Event::Person { .. } => phone.register_person(e.new_person().unwrap()).await.map(|_| ()),
            Event::Visit { person, .. } => phone.record_visit(person, e.new_visit().unwrap()).await.map(|_| ()),
            Event::Checkin { person, .. } => phone.record_checkin(person, e.new_checkin().unwrap()).await.map(|_| ()),
            Event::Edit { person, visit, .. } => phone.edit_visit(person, visit, e.visit_edit().unwrap().unwrap()).await.map(|_| ()),
            Event::Consent { person, .. } => phone.set_consent(person, e.consent_change().unwrap().unwrap()).await.map(|_| ()),
            _ => Ok(()),
        };
        r.expect("scenario event applies");
    }
    let people = phone.people().await.unwrap();
    let mut d = 0usize;
    for p in &people {
        d += phone.export_document(&p.id).await.unwrap().len();
    }
    eprintln!("recorded in {:.1} s", started.elapsed().as_secs_f64());
    println!("{} person documents; D (sum of automerge save() sizes) = {d} bytes", people.len());

    let t = Instant::now();
    let r = phone.sync(&server.options()).await.unwrap();
    line("P1 first upload", people.len(), &r, t.elapsed().as_millis());
    println!("                       bytes up / D = {:.2}", r.bytes_up as f64 / d as f64);

    let t = Instant::now();
    let r = phone.sync(&server.options()).await.unwrap();
    line("P2 idle re-sync", people.len(), &r, t.elapsed().as_millis());

    let fresh = Device::open(dir.path().join("fresh"), &KEY, Arc::new(clock.clone())).await.unwrap();
    fresh.enroll(&server.options(), &server.code("w-001"), "fresh phone").await.unwrap();
    let t = Instant::now();
    let r = fresh.sync(&server.options()).await.unwrap();
    line("P3 fresh phone pull", r.docs_received as usize, &r, t.elapsed().as_millis());
    println!("                       bytes down / D = {:.2}", r.bytes_down as f64 / d as f64);

    for (i, p) in people.iter().take(5).enumerate() {
        phone.record_visit(&p.id, visit(&format!("bench-{i}"), "one more visit")).await.unwrap();
    }
    let t = Instant::now();
    let r = phone.sync(&server.options()).await.unwrap();
    line("P4 incremental (5)", 5, &r, t.elapsed().as_millis());
    server.stop().await;
}
