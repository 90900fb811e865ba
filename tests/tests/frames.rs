//! Garbage, oversized and out-of-order frames get a clear error and a clean close; the server
//! keeps serving everyone else.

use futures_util::{SinkExt, StreamExt};
use peersync_core::protocol::{self, ErrorCode, MAX_FRAME_BYTES, ServerMsg};
use peersync_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// Send `msg` and expect an Error frame with `code`, then the close.
async fn expect_error(server: &TestServer, device: &peersync_core::Device, msg: Message, code: ErrorCode) {
    let mut ws = raw(server, device).await;
    ws.send(msg).await.unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("an answer").expect("a frame").unwrap();
    let Message::Binary(b) = reply else { panic!("expected a binary error frame, got {reply:?}") };
    match protocol::decode::<ServerMsg>(&b).unwrap() {
        ServerMsg::Error { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // Then a clean close.
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("close arrives");
    assert!(matches!(next, Some(Ok(Message::Close(_))) | None), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_error_and_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (raw_phone, _) = server.phone(dir.path(), "w-004").await;

    expect_error(&server, &raw_phone, Message::Binary(vec![protocol::PROTOCOL_VERSION, 0, 0xff, 0xff, 0xff].into()), ErrorCode::BadFrame).await;
    expect_error(&server, &raw_phone, Message::Binary(vec![].into()), ErrorCode::BadFrame).await;
    expect_error(&server, &raw_phone, Message::Binary(vec![77, 0, 1].into()), ErrorCode::UnsupportedVersion).await;
    // A phone of protocol version 1 (person documents before `original`) is told to update.
    expect_error(&server, &raw_phone, Message::Binary(vec![1, 0, 1].into()), ErrorCode::UnsupportedVersion).await;
    expect_error(&server, &raw_phone, Message::Text("hello".into()), ErrorCode::BadFrame).await;
    let push = protocol::encode(&protocol::ClientMsg::Push { docs: vec![], more: false }).unwrap();
    expect_error(&server, &raw_phone, Message::Binary(push.into()), ErrorCode::Unexpected).await;
    // Just over the protocol's frame limit: refused with TooLarge.
    let mut big = vec![protocol::PROTOCOL_VERSION, 0];
    big.resize(MAX_FRAME_BYTES + 10, 7);
    expect_error(&server, &raw_phone, Message::Binary(big.into()), ErrorCode::TooLarge).await;
    // Far over the websocket limit: the connection is dropped, the server lives on.
    {
        let mut ws = raw(&server, &raw_phone).await;
        let _ = ws.send(Message::Binary(vec![1u8; MAX_FRAME_BYTES + (4 << 20)].into())).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("server answers or closes");
    }
    // An unauthenticated upgrade is refused before any frame.
    let refused = tokio_tungstenite::connect_async(format!("{}/v1/sync", server.url)).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 401), "{refused:?}");
    // ... and so is a replayed one.
    let token = raw_phone.connection_token().await.unwrap().unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("{}/v1/sync", server.url)).unwrap();
    req.headers_mut().insert("authorization", token.parse().unwrap());
    let first = tokio_tungstenite::connect_async(req.clone()).await;
    assert!(first.is_ok());
    let replay = tokio_tungstenite::connect_async(req).await;
    assert!(matches!(replay, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 401), "{replay:?}");

    // Sync health records the last error of the misbehaving device.
    let (_, devices) = server.admin("GET", &format!("/v1/devices?org={ORG}"), None).await;
    let raw_id = raw_phone.device_id().await.unwrap();
    let entry = devices.as_array().unwrap().iter().find(|x| x["id"] == raw_id.as_str()).unwrap().clone();
    assert!(entry["sync"]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{entry}");

    // Everyone else is still served.
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    let r = sync(&a, &server).await;
    assert_eq!(r.docs_sent, 1);
    let (b, _) = server.phone(dir.path(), "w-002").await;
    assert_eq!(sync(&b, &server).await.docs_received, 1);

    // A garbled document inside a well-formed push is refused for that document only.
    let mut ws = raw(&server, &raw_phone).await;
    let hello = protocol::encode(&protocol::ClientMsg::Hello {
        cursor: protocol::Cursor::START,
        live: false,
        docs: vec![protocol::DocPush { doc: "p-x".into(), heads: vec![], data: b"not automerge".to_vec() }],
        more: false,
    })
    .unwrap();
    ws.send(Message::Binary(hello.into())).await.unwrap();
    let Some(Ok(Message::Binary(b))) = ws.next().await else { panic!("acks expected") };
    match protocol::decode::<ServerMsg>(&b).unwrap() {
        ServerMsg::Acks { acks } => assert!(matches!(&acks[0].status, protocol::AckStatus::Refused { code: ErrorCode::InvalidDocument, .. })),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

/// A `Sync` frame naming more documents than one may is refused before any is looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_frame_naming_too_many_documents_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (phone, _) = server.phone(dir.path(), "w-004").await;
    let mut ws = raw(&server, &phone).await;
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| {
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("an answer").expect("a frame").unwrap();
        let Message::Binary(b) = reply else { panic!("expected a binary frame, got {reply:?}") };
        protocol::decode::<ServerMsg>(&b).unwrap()
    };
    let hello = protocol::ClientMsg::Hello { cursor: protocol::Cursor::START, live: false, docs: vec![], more: false };
    ws.send(Message::Binary(protocol::encode(&hello).unwrap().into())).await.unwrap();
    assert!(matches!(next(&mut ws).await, ServerMsg::Docs { done: true, .. }));
    let msgs = (0..=protocol::MAX_SYNC_DOCS).map(|i| protocol::DocSync { doc: format!("p-{i}"), msg: vec![] }).collect();
    ws.send(Message::Binary(protocol::encode(&protocol::ClientMsg::Sync { msgs }).unwrap().into())).await.unwrap();
    match next(&mut ws).await {
        ServerMsg::Error { code, message } => assert_eq!(code, ErrorCode::TooLarge, "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    sync(&a, &server).await;
    assert_eq!(http(server.addr, "GET", "/healthz", &[], None).await.0, 200);
    assert_eq!(http(server.addr, "GET", "/metrics", &[], None).await.0, 401, "metrics need the admin token");
    let (status, m) = server.admin("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("peersync_connections_total 1"), "{m}");
    assert!(m.contains("peersync_docs_received_total 1"), "{m}");
    assert!(m.contains("peersync_sync_duration_seconds_count 1"), "{m}");
    for figure in ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "peersync_peak_resident_memory_bytes "] {
        assert!(m.lines().any(|l| l.starts_with(figure)), "{figure}missing: {m}");
    }
    server.stop().await;
}
