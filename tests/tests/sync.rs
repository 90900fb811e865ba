//! Devices converge through a real server on loopback.

use peersync_core::VisitEdit;
use peersync_tests::*;

/// Three phones record offline, including concurrent edits of one person; after syncing (twice
/// each, so every phone sees what the others sent) all hold the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_records_on_three_devices_converge() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    let (c, _) = server.phone(dir.path(), "w-003").await;

    // 1. A registers two people and syncs; B and C receive them.
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    a.register_person(person("p-2", "RT-2")).await.unwrap();
    a.record_visit("p-1", visit("v-a1", "first")).await.unwrap();
    let r = sync(&a, &server).await;
    assert_eq!(r.docs_sent, 2);
    assert_eq!(r.round_trips, 1);
    let r = sync(&b, &server).await;
    assert_eq!(r.docs_received, 2);
    sync(&c, &server).await;
    assert_eq!(b.people().await.unwrap().len(), 2);
    assert_eq!(visit_ids(&c, "p-1").await, ["v-a1"]);

    // 2. Everyone goes offline and records; A and B edit the same visit's notes.
    a.record_visit("p-1", visit("v-a2", "")).await.unwrap();
    b.record_visit("p-1", visit("v-b1", "")).await.unwrap();
    c.record_visit("p-1", visit("v-c1", "")).await.unwrap();
    c.record_checkin("p-2", checkin("c-c1")).await.unwrap();
    c.register_person(person("p-3", "NW-3")).await.unwrap();
    a.edit_visit("p-1", "v-a1", VisitEdit { notes: Some("A's version".into()), ..Default::default() }).await.unwrap();
    b.edit_visit("p-1", "v-a1", VisitEdit { notes: Some("B's version".into()), ..Default::default() }).await.unwrap();

    // 3. Each syncs twice in turn.
    for _ in 0..2 {
        for d in [&a, &b, &c] {
            sync(d, &server).await;
        }
    }
    // 4. Converged.
    for d in [&a, &b, &c] {
        assert_eq!(visit_ids(d, "p-1").await, ["v-a1", "v-a2", "v-b1", "v-c1"]);
        assert_eq!(d.people().await.unwrap().len(), 3);
        assert_eq!(d.pending_changes().await.unwrap().changes, 0);
    }
    let (ra, rb, rc) = (a.person("p-1").await.unwrap(), b.person("p-1").await.unwrap(), c.person("p-1").await.unwrap());
    assert_eq!(ra, rb);
    assert_eq!(rb, rc);
    assert_eq!(ra.conflicts.len(), 1, "the concurrent edit is visible as a conflict");
    assert_eq!(c.person("p-2").await.unwrap().checkins.len(), 1);
    assert_eq!(a.person("p-2").await.unwrap().checkins.len(), 1);

    // 5. Nothing new: one round trip, a handful of bytes.
    let idle = sync(&a, &server).await;
    assert_eq!((idle.docs_sent, idle.docs_received, idle.round_trips), (0, 0, 1));
    server.stop().await;
}

/// 20,000-character notes from a fixed pseudo-random sequence (xorshift from `seed`):
/// reproducible, and they barely compress.
fn notes_that_barely_compress(mut x: u64) -> impl FnMut() -> String {
    move || {
        (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (b'a' + (x % 26) as u8) as char
            })
            .collect()
    }
}

/// A record filled to the phone's limit between two syncs (megabytes of notes that barely
/// compress) still reaches the server, and so does the person's withdrawal of consent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_filled_between_syncs_still_syncs_and_so_does_consent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "FULL")).await.unwrap();
    sync(&a, &server).await;
    let mut noise = notes_that_barely_compress(0x9e37_79b9_7f4a_7c15);
    let mut n = 0;
    while a.record_visit("p-1", visit(&format!("v-{n}"), &noise())).await.is_ok() {
        n += 1;
        assert!(n < 400);
    }
    a.set_consent("p-1", peersync_core::ConsentChange { share_with_coordinator: Some(false), ..Default::default() }).await.unwrap();
    let r = sync(&a, &server).await;
    assert!(r.refused.is_empty(), "{r:?}");
    assert_eq!(a.pending_changes().await.unwrap().documents, 0);
    let held = server.state.hub.record(ORG, "p-1").unwrap().unwrap();
    assert_eq!(held.visits.len(), n, "every visit the phone took is on the server");
    assert!(!held.consent.share_with_coordinator, "and the withdrawal");
    server.stop().await;
}

/// Two phones that fill one person's record offline can merge past what one record may hold:
/// the second one's push is refused, and its entries stay on it, counted as pending (never
/// taken for synced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_refused_for_size_stay_pending_on_the_phone() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-1", "FULL")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    let mut noise = notes_that_barely_compress(0x2545_f491_4f6c_dd1d);
    for i in 0..30 {
        b.record_visit("p-1", visit(&format!("b-{i}"), &noise())).await.unwrap();
    }
    let mut n = 0;
    while a.record_visit("p-1", visit(&format!("a-{n}"), &noise())).await.is_ok() {
        n += 1;
    }
    assert!(sync(&a, &server).await.refused.is_empty());
    let r = sync(&b, &server).await;
    assert!(r.refused.iter().any(|f| f.person == "p-1"), "{r:?}");
    let pending = b.pending_changes().await.unwrap();
    assert_eq!(pending.documents, 1, "B's entries are not on the server: {pending:?}");
    let again = sync(&b, &server).await;
    assert_eq!(b.pending_changes().await.unwrap().documents, 1, "{again:?}");
    server.stop().await;
}
