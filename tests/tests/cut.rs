//! A link that drops mid-sync, at many different points: the next sync completes, nothing is
//! duplicated, nothing is lost.

use std::collections::BTreeMap;

use peersync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_stream_after_k_bytes_never_loses_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let proxy = CuttingProxy::start(server.addr).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();

    // Shared people so that downloads are cut too, not only uploads.
    for i in 0..30 {
        let p = format!("p-{i:03}");
        a.register_person(person(&p, &format!("AB-{i:03}"))).await.unwrap();
        expected.insert(p, vec![]);
    }
    sync(&a, &server).await;
    sync(&b, &server).await;

    let note = "Practised what to say to the ward doctor about medication. ".repeat(8);
    let cuts: Vec<u64> = vec![0, 1, 30, 80, 150, 250, 400, 600, 900, 1_400, 2_000, 3_000, 4_500, 6_500, 9_000, 12_000, 16_000, 22_000, 30_000, 45_000];
    let mut failed = 0;
    for (round, k) in cuts.iter().enumerate() {
        // Both phones record offline: A's uploads and B's downloads cross the cut.
        for j in 0..6 {
            let p = format!("p-{:03}", (round * 7 + j * 5) % 30);
            let (dev, tag) = if j % 2 == 0 { (&a, "a") } else { (&b, "b") };
            let v = format!("v-{tag}-{round}-{j}");
            dev.record_visit(&p, visit(&v, &format!("{round} {note}"))).await.unwrap();
            expected.get_mut(&p).unwrap().push(v);
        }
        proxy.cut_after(Some(*k));
        for dev in [&a, &b] {
            if dev.sync(&proxy.options()).await.is_err() {
                failed += 1;
            }
        }
        proxy.cut_after(None);
        for dev in [&a, &b] {
            dev.sync(&proxy.options()).await.unwrap_or_else(|e| panic!("round {round} (cut at {k}): the next sync must complete: {e}"));
        }
    }
    assert!(failed >= cuts.len(), "the cuts really interrupted syncs ({failed})");

    // A fresh phone pulls everything: exactly the expected visits, each once.
    let (c, _) = server.phone(dir.path(), "w-003").await;
    sync(&a, &server).await;
    sync(&b, &server).await;
    sync(&c, &server).await;
    for (p, visits) in &expected {
        let mut want = visits.clone();
        want.sort();
        for dev in [&a, &b, &c] {
            let rec = dev.person(p).await.unwrap();
            let got: Vec<String> = rec.visits.iter().map(|v| v.id.clone()).collect();
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(sorted, want, "{p}");
        }
    }
    for dev in [&a, &b] {
        assert_eq!(dev.pending_changes().await.unwrap().changes, 0);
    }
    server.stop().await;
}

/// A coordinator sees a phone whose syncs break off part-way (a weak signal) in sync health,
/// and sees it recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_cut_part_way_shows_in_sync_health() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let proxy = CuttingProxy::start(server.addr).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let health = async || {
        let (_, devices) = server.admin("GET", &format!("/v1/devices?org={ORG}"), None).await;
        let id = a.device_id().await.unwrap();
        devices.as_array().unwrap().iter().find(|x| x["id"] == id.as_str()).unwrap()["sync"].clone()
    };
    // Once the server has seen the connection close: a sync's end is not taken for an error.
    let closed = async || {
        eventually("the server has closed the session", async || server.state.metrics.connections_active.load(std::sync::atomic::Ordering::Relaxed) == 0).await
    };
    a.sync(&proxy.options()).await.unwrap();
    closed().await;
    let h = health().await;
    assert!(h["last_error"].is_null() && h["last_sync_at"].is_string(), "a finished sync is no error: {h}");
    for i in 0..20u64 {
        let p = format!("p-{i:03}");
        a.register_person(person(&p, &format!("AB-{i:03}"))).await.unwrap();
        // Notes that do not compress away: the first frame must outlast the cut.
        let note: String = (0..150u64).map(|j| format!("{} ", (i * 7_919 + j * 104_729).pow(2) % 1_000_003)).collect();
        a.record_visit(&p, visit(&format!("v-{i}"), &note)).await.unwrap();
    }
    let first = h["last_sync_at"].clone();
    // Past the websocket upgrade, inside the phone's first frame.
    proxy.cut_after(Some(3_000));
    assert!(a.sync(&proxy.options()).await.is_err());
    eventually("sync health shows the broken sync", async || {
        let h = health().await;
        h["last_error"].as_str().is_some_and(|e| e.contains("before the sync finished")) && h["last_sync_at"] == first
    })
    .await;
    proxy.cut_after(None);
    a.sync(&proxy.options()).await.unwrap();
    closed().await;
    let h = health().await;
    let (synced, failed) = (h["last_sync_at"].as_str().unwrap(), h["last_error_at"].as_str().unwrap());
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    assert!(parse(synced) > parse(failed), "the later sync shows as the latest: {h}");
    assert_eq!(h["pending"], 0, "{h}");
    server.stop().await;
}
