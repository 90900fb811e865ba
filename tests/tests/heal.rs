//! Self-healing: when a device's idea of what the server holds is wrong, sync falls back to
//! automerge's own sync protocol for the documents concerned and still converges.

use std::sync::Arc;

use peersync_core::{Device, ManualClock};
use peersync_tests::*;

/// Stop the server, copy its data directory to `backup`, start it again.
async fn backed_up(server: TestServer, backup: &std::path::Path) -> TestServer {
    let data = server.data.clone();
    server.stop().await;
    copy_dir(&data, backup);
    TestServer::start(&data).await
}

/// Stop the server, put `backup` in place of its data directory, start it again.
async fn restored(server: TestServer, backup: &std::path::Path) -> TestServer {
    let data = server.data.clone();
    server.stop().await;
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(backup, &data);
    TestServer::start(&data).await
}

/// The server is restored from an old backup: it lost changes that devices believe it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restored_from_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let backup = dir.path().join("backup");
    let server = TestServer::start(&data).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    for i in 0..5 {
        a.register_person(person(&format!("p-{i}"), "AB")).await.unwrap();
    }
    sync(&a, &server).await;
    sync(&b, &server).await;
    // 1. Back up, then carry on: both phones add visits and sync them.
    let server = backed_up(server, &backup).await;
    a.record_visit("p-1", visit("v-a1", "")).await.unwrap();
    b.record_visit("p-2", visit("v-b1", "")).await.unwrap();
    b.register_person(person("p-9", "NEW")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    sync(&a, &server).await;
    // 2. Disaster: the server comes back from the backup, without those changes. A has also
    //    recorded something new meanwhile (its base is gone on the server).
    let server = restored(server, &backup).await;
    a.record_visit("p-1", visit("v-a2", "")).await.unwrap();
    // 3. Each phone's next sync notices and reconciles.
    let ra = sync(&a, &server).await;
    assert!(ra.reconciled > 0, "A fell back to automerge sync: {ra:?}");
    let rb = sync(&b, &server).await;
    assert!(rb.reconciled > 0, "{rb:?}");
    // Sync health agrees: what the phones reconciled is no longer pending on them.
    let pending = async |d: &peersync_core::Device| {
        let (_, devices) = server.admin("GET", &format!("/v1/devices?org={ORG}"), None).await;
        let id = d.device_id().await.unwrap();
        devices.as_array().unwrap().iter().find(|x| x["id"] == id.as_str()).unwrap()["sync"]["pending"].clone()
    };
    assert_eq!((pending(&a).await, pending(&b).await), (serde_json::json!(0), serde_json::json!(0)));
    sync(&a, &server).await;
    // 4. A fresh phone sees everything again.
    let (c, _) = server.phone(dir.path(), "w-003").await;
    sync(&c, &server).await;
    assert_eq!(visit_ids(&c, "p-1").await, ["v-a1", "v-a2"]);
    assert_eq!(visit_ids(&c, "p-2").await, ["v-b1"]);
    assert_eq!(c.people().await.unwrap().len(), 6);
    for d in [&a, &b] {
        assert_eq!(d.pending_changes().await.unwrap().changes, 0);
    }
    // 5. And idle is idle again.
    let idle = sync(&a, &server).await;
    assert_eq!((idle.round_trips, idle.reconciled, idle.docs_received), (1, 0, 0));
    server.stop().await;
}

/// A phone's store is restored from an old backup: it lost records the server has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_restored_from_backup() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let store = dir.path().join("phone");
    let backup = dir.path().join("phone-backup");
    let clock = ManualClock::new(t(1, 9));
    let open = || Device::open(&store, &KEY, Arc::new(clock.clone()));
    let a = open().await.unwrap();
    a.enroll(&server.options(), &server.code("w-001"), "phone").await.unwrap();
    a.register_person(person("p-1", "AB")).await.unwrap();
    sync(&a, &server).await;
    drop(a);
    copy_dir(&store, &backup);
    let a = open().await.unwrap();
    a.record_visit("p-1", visit("v-1", "")).await.unwrap();
    sync(&a, &server).await;
    drop(a);
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&backup, &store);
    // The restored phone records again, then syncs: it gets its lost visit back and the new one
    // reaches the server.
    let a = open().await.unwrap();
    assert!(visit_ids(&a, "p-1").await.is_empty());
    a.record_visit("p-1", visit("v-2", "")).await.unwrap();
    sync(&a, &server).await;
    assert_eq!(visit_ids(&a, "p-1").await, ["v-1", "v-2"]);
    let (b, _) = server.phone(dir.path(), "w-002").await;
    sync(&b, &server).await;
    assert_eq!(visit_ids(&b, "p-1").await, ["v-1", "v-2"]);
    server.stop().await;
}

/// A phone loses its cursor and acknowledgements: the next sync still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-1", "AB")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    b.record_visit("p-1", visit("v-b", "")).await.unwrap();
    sync(&b, &server).await;
    a.record_visit("p-1", visit("v-a", "")).await.unwrap();
    a.forget_sync_state().await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    assert_eq!(visit_ids(&a, "p-1").await, ["v-a", "v-b"]);
    assert_eq!(visit_ids(&b, "p-1").await, ["v-a", "v-b"]);
    server.stop().await;
}

/// An erasure outlives the backups made before it: the server restored from one erases the
/// person again at start (from the erasure ledger beside the data directory), so no phone
/// gets them back and no report counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_outlives_a_backup_made_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let backup = dir.path().join("backup");
    let server = TestServer::start(&data).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "KEEP")).await.unwrap();
    a.register_person(person("p-9", "GHOST")).await.unwrap();
    a.record_visit("p-9", visit("v-9", "GHOSTNOTE")).await.unwrap();
    sync(&a, &server).await;
    let server = backed_up(server, &backup).await;
    let (status, body) = server.admin("POST", &format!("/v1/people/p-9/erase?org={ORG}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sync(&a, &server).await.purged, 1);
    // Disaster recovery from the backup, which still holds p-9 and p-9's key.
    let server = restored(server, &backup).await;
    assert!(server.state.dir.tombstone(ORG, "p-9").unwrap().is_some(), "erased again at start");
    assert_eq!(server.state.hub.heads(ORG, "p-9").unwrap(), None);
    sync(&a, &server).await;
    assert!(a.person("p-9").await.is_err(), "the phone does not get p-9 back");
    let (b, _) = server.phone(dir.path(), "w-002").await;
    sync(&b, &server).await;
    assert!(b.person("p-9").await.is_err() && b.person("p-1").await.is_ok(), "nor does a fresh phone");
    let (_, report) = server.admin("GET", &format!("/v1/report?org={ORG}"), None).await;
    assert_eq!(report["totals"]["visits"], 0, "{report}");
    // A data directory made afresh (not a backup) is not held to the old store's erasures,
    // though its ids repeat.
    server.stop().await;
    std::fs::remove_dir_all(&data).unwrap();
    let server = TestServer::start(&data).await;
    let (c, _) = server.phone(dir.path(), "w-003").await;
    c.register_person(person("p-9", "ANOTHER")).await.unwrap();
    sync(&c, &server).await;
    server.stop().await;
    let server = TestServer::start(&data).await;
    assert!(server.state.dir.tombstone(ORG, "p-9").unwrap().is_none(), "a new store's p-9 is not erased");
    assert!(server.state.hub.heads(ORG, "p-9").unwrap().is_some());
    server.stop().await;
}

/// The same restore, with a phone that still holds the person erased after the backup (it did
/// not sync since): its next sync, reconciling with the restored server, purges them and
/// finishes, and what it recorded after the backup reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_holding_a_person_erased_after_the_backup_purges_them_after_the_restore() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let backup = dir.path().join("backup");
    let server = TestServer::start(&data).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "KEEP")).await.unwrap();
    a.register_person(person("p-2", "GHOST")).await.unwrap();
    sync(&a, &server).await;
    let server = backed_up(server, &backup).await;
    a.register_person(person("p-3", "LATER")).await.unwrap();
    sync(&a, &server).await;
    // Erased while the phone is offline; then the server comes back from the backup.
    assert_eq!(server.admin("POST", &format!("/v1/people/p-2/erase?org={ORG}"), None).await.0, 200);
    let server = restored(server, &backup).await;
    let r = a.sync(&server.options()).await.expect("the sync finishes");
    assert_eq!(r.purged, 1, "{r:?}");
    assert!(a.person("p-2").await.is_err(), "the phone purged the erased person");
    assert!(a.person("p-1").await.is_ok() && a.person("p-3").await.is_ok());
    assert!(server.state.hub.heads(ORG, "p-3").unwrap().is_some(), "what the phone recorded after the backup is back on the server");
    assert!(server.state.hub.heads(ORG, "p-2").unwrap().is_none());
    assert!(sync(&a, &server).await.refused.is_empty());
    server.stop().await;
}
