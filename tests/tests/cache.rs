//! The server keeps a bounded number of documents in memory and loads the rest on demand;
//! sync stays correct when documents are evicted between a push and a download.

use peersync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_cache_still_converges() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("server"), "127.0.0.1:0", 4).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    for i in 0..40 {
        a.register_person(person(&format!("p-{i:02}"), "AB")).await.unwrap();
    }
    sync(&a, &server).await;
    sync(&b, &server).await;
    for i in 0..40 {
        let p = format!("p-{i:02}");
        a.record_visit(&p, visit(&format!("va-{i}"), "")).await.unwrap();
        b.record_visit(&p, visit(&format!("vb-{i}"), "")).await.unwrap();
    }
    sync(&a, &server).await;
    sync(&b, &server).await;
    sync(&a, &server).await;
    for i in 0..40 {
        let p = format!("p-{i:02}");
        let want = [format!("va-{i}"), format!("vb-{i}")];
        assert_eq!(visit_ids(&a, &p).await, want);
        assert_eq!(visit_ids(&b, &p).await, want);
    }
    assert!(server.state.hub.cached_docs() <= 4);
    server.stop().await;
}
