//! `kill -9` of the server in the middle of a push: after a restart no acknowledged change is
//! lost and the device's next sync completes.

use std::sync::{Arc, Mutex};

use peersync_core::sync::{SyncObserver, SyncProgress};
use peersync_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_server_process");

struct KillOnFirstAck(Arc<Mutex<Option<ServerProcess>>>);

impl SyncObserver for KillOnFirstAck {
    fn progress(&self, p: &SyncProgress) {
        if let SyncProgress::Sending { done, .. } = p
            && *done > 0
            && let Some(mut s) = self.0.lock().unwrap().take()
        {
            s.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_push_loses_no_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let codes = prepare(&data, &["w-001", "w-002"]);
    let (a, _) = open_phone(dir.path(), "w-001").await;
    // Enough data for many bounded push frames.
    let people = 600;
    let note = "Talked through the week, what felt hard, and a plan for the housing appointment. ".repeat(12);
    // 1. Sync; the server is killed with SIGKILL as soon as the first batch is acknowledged.
    let first = ServerProcess::start(BIN, &data);
    a.enroll(&first.options(), &codes[0], "phone a").await.unwrap();
    for i in 0..people {
        let p = format!("p-{i:04}");
        a.register_person(person(&p, &format!("AB-{i:04}"))).await.unwrap();
        a.record_visit(&p, visit(&format!("v-{i:04}"), &format!("{i} {note}"))).await.unwrap();
    }
    let server = Arc::new(Mutex::new(Some(first)));
    let url = server.lock().unwrap().as_ref().unwrap().options();
    let opts = url.observer(Arc::new(KillOnFirstAck(server.clone())));
    let err = a.sync(&opts).await.expect_err("the server died mid-push");
    println!("sync interrupted: {err}");

    let mut acked = Vec::new();
    for i in 0..people {
        let p = format!("p-{i:04}");
        if a.sync_state(&p).await.is_some_and(|s| !s.server_heads.is_empty()) {
            acked.push(p);
        }
    }
    assert!(!acked.is_empty(), "some batches were acknowledged before the kill");
    assert!(acked.len() < people, "the kill came before the end of the push ({} acked)", acked.len());
    println!("{} of {people} documents acknowledged before the kill", acked.len());

    // 2. Restart on the same data: a fresh phone finds every acknowledged document.
    let server = ServerProcess::start(BIN, &data);
    let (b, _) = open_phone(dir.path(), "w-002").await;
    b.enroll(&server.options(), &codes[1], "phone b").await.unwrap();
    b.sync(&server.options()).await.unwrap();
    for p in &acked {
        let n: String = p.trim_start_matches("p-").to_string();
        assert_eq!(visit_ids(&b, p).await, [format!("v-{n}")], "acknowledged {p} survived");
    }

    // 3. The first phone's next sync completes, and then everything is on the server.
    let r = a.sync(&server.options()).await.expect("the next sync completes");
    assert_eq!(a.pending_changes().await.unwrap().changes, 0, "{r:?}");
    b.sync(&server.options()).await.unwrap();
    assert_eq!(b.people().await.unwrap().len(), people);
}
