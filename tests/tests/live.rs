//! While a phone stays connected, the server forwards teammates' changes to it, and what it
//! records goes out at once.

use std::sync::{Arc, Mutex};

use peersync_core::sync::SyncObserver;
use peersync_tests::*;

#[derive(Default)]
struct Changed(Mutex<Vec<String>>);

impl SyncObserver for Changed {
    fn records_changed(&self, people: &[String]) {
        self.0.lock().unwrap().extend(people.iter().cloned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_phones_receive_changes_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-1", "AB")).await.unwrap();
    sync(&a, &server).await;

    // B connects live and gets the person in its first exchange.
    let seen = Arc::new(Changed::default());
    let live = b.sync_live(&server.options().observer(seen.clone())).await.unwrap();
    eventually("B holds p-1", async || b.people().await.unwrap().len() == 1).await;

    // A syncs a new visit: B receives it without syncing, and its app is told.
    a.record_visit("p-1", visit("v-a", "")).await.unwrap();
    sync(&a, &server).await;
    eventually("B receives v-a", async || visit_ids(&b, "p-1").await == ["v-a"]).await;
    assert!(seen.0.lock().unwrap().contains(&"p-1".to_string()));
    // The audit log shows p-1 sent to B twice: in its first exchange, and forwarded.
    eventually("the forwarded record is audited", async || {
        let (_, audit) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
        let sent_to_b = |e: &&serde_json::Value| e["action"] == "read" && e["actor"].as_str().is_some_and(|a| a.contains("w-002")) && e["people"].as_array().is_some_and(|p| p.iter().any(|p| p == "p-1"));
        audit.as_array().unwrap().iter().filter(sent_to_b).count() == 2
    })
    .await;

    // B records while connected: it goes out at once, and A gets it at its next sync.
    b.record_visit("p-1", visit("v-b", "")).await.unwrap();
    eventually("B's visit is acknowledged", async || b.pending_changes().await.unwrap().changes == 0).await;
    sync(&a, &server).await;
    assert_eq!(visit_ids(&a, "p-1").await, ["v-a", "v-b"]);

    assert!(!live.is_finished());
    let report = live.stop().await.unwrap();
    assert!(report.docs_received >= 2 && report.docs_sent >= 1, "{report:?}");
    server.stop().await;
}
