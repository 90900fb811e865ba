//! A phone with 2,000 people and nothing new re-syncs in one round trip and under 512 bytes of
//! websocket frames, measured at the socket.

use peersync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_changed_costs_one_round_trip_and_under_512_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    for i in 0..2_000 {
        a.register_person(person(&format!("p-{i:05}"), &format!("AB-{i:05}"))).await.unwrap();
    }
    let first = sync(&a, &server).await;
    assert_eq!(first.docs_sent, 2_000);
    assert!(first.frames_up > 2, "a large backlog goes in several bounded frames ({})", first.frames_up);

    // Another phone's change arrives in the next sync; then nothing is new.
    let (b, _) = server.phone(dir.path(), "w-002").await;
    let pulled = sync(&b, &server).await;
    assert_eq!(pulled.docs_received, 2_000);
    assert_eq!(b.people().await.unwrap().len(), 2_000);

    for _ in 0..3 {
        let idle = sync(&a, &server).await;
        println!(
            "idle re-sync: {} round trip(s), {} bytes up + {} bytes down of frames; upgrade request {} bytes, response {} bytes",
            idle.round_trips, idle.bytes_up, idle.bytes_down, idle.upgrade_bytes_up, idle.upgrade_bytes_down
        );
        assert_eq!(idle.round_trips, 1);
        assert_eq!((idle.docs_sent, idle.docs_received), (0, 0));
        assert!(idle.bytes_up + idle.bytes_down < 512, "{} + {} bytes", idle.bytes_up, idle.bytes_down);
        assert!(idle.upgrade_bytes_up < 400, "lean upgrade request ({} bytes)", idle.upgrade_bytes_up);
    }
    server.stop().await;
}
