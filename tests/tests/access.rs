//! Who may see what, tested against a real server over sockets: organisations, assignments,
//! revocation and wipe, signatures, replay, enrollment codes, throttling, erasure, consent,
//! the audit log, and 401 for the unauthenticated.

use peersync_core::sync::SyncError;
use peersync_core::{ConsentChange, CoreError, NewPerson};
use peersync_tests::*;
use serde_json::json;

async fn login(server: &TestServer, org: &str, user: &str, password: &str) -> (u16, String) {
    let (status, head, _) = http_full(server.addr, "POST", "/v1/login", &[], Some(json!({ "org": org, "username": user, "password": password }))).await;
    let cookie = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l.split_once(':').unwrap().1.trim().to_string()))
        .unwrap_or_default();
    (status, cookie)
}

async fn as_coordinator(server: &TestServer, cookie: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let session = cookie.split(';').next().unwrap().to_string();
    http(server.addr, method, path, &[("Cookie", session)], body).await
}

fn only(id: &str, alias: &str, workers: &[&str]) -> NewPerson {
    NewPerson { workers: workers.iter().map(|w| w.to_string()).collect(), ..person(id, alias) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_and_assignments_bound_what_a_device_sees() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // A second organisation on the same server, with a worker of its own.
    assert_eq!(server.admin("POST", "/v1/admin/orgs", Some(json!({ "id": "org2", "name": "Other" }))).await.0, 201);
    assert_eq!(server.admin("POST", "/v1/workers?org=org2", Some(json!({ "id": "x-001", "name": "X", "role": "peer_navigator" }))).await.0, 201);
    let (_, code) = server.admin("POST", "/v1/workers/x-001/enrollment?org=org2", None).await;
    let (x, _) = open_phone(dir.path(), "x-001").await;
    x.enroll(&server.options(), code["code"].as_str().unwrap(), "x").await.unwrap();

    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (d, _) = server.phone(dir.path(), "w-004").await;
    a.register_person(only("p-1", "AB-1", &["w-001"])).await.unwrap();
    a.register_person(only("p-2", "AB-2", &["w-001"])).await.unwrap();
    sync(&a, &server).await;

    // 1. Another organisation sees nothing, and its same-named record stays its own.
    x.register_person(only("p-1", "OTHER-ORG", &["x-001"])).await.unwrap();
    let rx = sync(&x, &server).await;
    assert_eq!((rx.docs_received, rx.refused.len()), (0, 0));
    sync(&a, &server).await;
    assert_eq!(a.person("p-1").await.unwrap().person.alias, "AB-1");
    assert_eq!(x.person("p-1").await.unwrap().person.alias, "OTHER-ORG");

    // 2. An unassigned worker receives nothing, and its push to the person is refused for that
    //    person only: its other records sync, its local data is kept.
    let rd = sync(&d, &server).await;
    assert_eq!(rd.docs_received, 0);
    d.register_person(only("p-1", "INTRUDER", &["w-004"])).await.unwrap();
    d.register_person(only("p-9", "MINE", &["w-004"])).await.unwrap();
    let rd = sync(&d, &server).await;
    assert_eq!(rd.refused.len(), 1, "{rd:?}");
    assert_eq!(rd.refused[0].person, "p-1");
    assert_eq!(rd.refused[0].code, peersync_core::protocol::ErrorCode::Forbidden);
    assert_eq!(rd.docs_sent, 1);
    assert_eq!(d.person("p-1").await.unwrap().person.alias, "INTRUDER", "local data kept");
    // Sync health shows the refused document as still pending on that phone.
    let (_, devices) = server.admin("GET", &format!("/v1/devices?org={ORG}"), None).await;
    let d_id = d.device_id().await.unwrap();
    let entry = devices.as_array().unwrap().iter().find(|x| x["id"] == d_id.as_str()).unwrap().clone();
    assert_eq!(entry["sync"]["pending"], 1, "{entry}");
    sync(&a, &server).await;
    assert_eq!(a.person("p-1").await.unwrap().person.alias, "AB-1", "nothing of the intruder reached p-1");
    assert!(a.person("p-9").await.is_err());

    // 3. A coordinator's assignment gives the worker the whole record at its next sync...
    assert_eq!(server.admin("POST", &format!("/v1/people/p-2/assign?org={ORG}"), Some(json!({ "worker": "w-004" }))).await.0, 200);
    sync(&d, &server).await;
    assert_eq!(d.person("p-2").await.unwrap().person.alias, "AB-2");
    // ... and unassigning purges it from the worker's phones, after taking in what the phone
    // recorded offline while it still had the person.
    d.record_visit("p-2", visit("v-before-unassign", "")).await.unwrap();
    assert_eq!(server.admin("POST", &format!("/v1/people/p-2/unassign?org={ORG}"), Some(json!({ "worker": "w-004" }))).await.0, 200);
    let rd = sync(&d, &server).await;
    assert_eq!(rd.purged, 1);
    assert!(!rd.refused.iter().any(|r| r.person == "p-2"), "{rd:?}");
    assert!(matches!(d.person("p-2").await, Err(CoreError::UnknownPerson(_))));
    sync(&a, &server).await;
    assert_eq!(visit_ids(&a, "p-2").await, ["v-before-unassign"]);
    // Once the phone knows, it can no longer write to the person.
    d.register_person(only("p-2", "AGAIN", &["w-004"])).await.unwrap();
    let rd = sync(&d, &server).await;
    assert!(rd.refused.iter().any(|r| r.person == "p-2" && r.code == peersync_core::protocol::ErrorCode::Forbidden), "{rd:?}");

    // 4. Coordinators act only on their own organisation.
    let (_, _) = server.admin("POST", "/v1/admin/orgs/org2/coordinators", Some(json!({ "username": "xc", "password": "another long password" }))).await;
    let (status, cookie) = login(&server, "org2", "xc", "another long password").await;
    assert_eq!(status, 200);
    assert_eq!(as_coordinator(&server, &cookie, "GET", "/v1/people/p-2?org=org1", None).await.0, 403);
    assert_eq!(as_coordinator(&server, &cookie, "GET", "/v1/people/p-2", None).await.0, 404);
    server.stop().await;
}

/// A person a coordinator assigned before anyone recorded them (the README's set-up does this)
/// is created by the workers given them, not by whichever phone pushes the id first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_given_to_a_worker_cannot_be_taken_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    assert_eq!(server.admin("POST", &format!("/v1/people/p-00042/assign?org={ORG}"), Some(json!({ "worker": "w-001" }))).await.0, 200);
    b.register_person(only("p-00042", "TAKEN", &["w-002"])).await.unwrap();
    let rb = sync(&b, &server).await;
    assert!(matches!(&rb.refused[..], [r] if r.person == "p-00042" && r.code == peersync_core::protocol::ErrorCode::Forbidden), "{rb:?}");
    a.register_person(only("p-00042", "KM-42", &["w-001"])).await.unwrap();
    let ra = sync(&a, &server).await;
    assert_eq!((ra.docs_sent, ra.refused.len()), (1, 0), "{ra:?}");
    let (_, people) = server.admin("GET", &format!("/v1/people?org={ORG}"), None).await;
    let entry = people.as_array().unwrap().iter().find(|p| p["id"] == "p-00042").cloned().unwrap_or_default();
    assert_eq!(entry["workers"], json!(["w-001"]), "{people}");
    server.stop().await;
}

/// The grace for what a phone recorded offline before learning that a person was taken from
/// its worker is judged from the position the server recorded for the device: a phone that
/// presents an older cursor, or a device enrolled after the person was taken that presents the
/// start of the log, cannot write to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewound_cursor_does_not_give_back_a_person_taken_from_the_worker() {
    use futures_util::{SinkExt, StreamExt};
    use peersync_core::protocol::{self, AckStatus, ClientMsg, Cursor, DocPush, ErrorCode, ServerMsg};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(only("p-x", "KM-1", &["w-001"])).await.unwrap();
    sync(&a, &server).await;
    let held = a.export_document("p-x").await.unwrap();
    assert_eq!(server.admin("POST", &format!("/v1/people/p-x/assign?org={ORG}"), Some(json!({ "worker": "w-002" }))).await.0, 200);
    assert_eq!(server.admin("POST", &format!("/v1/people/p-x/unassign?org={ORG}"), Some(json!({ "worker": "w-001" }))).await.0, 200);
    assert_eq!(sync(&a, &server).await.purged, 1);

    // A change to the record the phone held, pushed with a rewound cursor by that phone and by
    // a device of the same worker enrolled only now.
    let mut doc = automerge::AutoCommit::load(&held).unwrap().with_actor(automerge::ActorId::random());
    let Some((_, profile)) = automerge::ReadDoc::get(&doc, automerge::ROOT, "profile").unwrap() else { panic!("no profile") };
    automerge::transaction::Transactable::put(&mut doc, &profile, "alias", "INTRUDER").unwrap();
    let heads = doc.get_heads().iter().map(|h| h.0).collect();
    let push = DocPush { doc: "p-x".into(), heads, data: doc.save() };
    let (late, _) = open_phone(dir.path(), "w-001-late").await;
    late.enroll(&server.options(), &server.code("w-001"), "late").await.unwrap();
    for (who, phone) in [("the purged phone", &a), ("the device enrolled since", &late)] {
        let mut ws = raw(&server, phone).await;
        let hello = ClientMsg::Hello { cursor: Cursor::START, live: false, docs: vec![push.clone()], more: false };
        ws.send(Message::Binary(protocol::encode(&hello).unwrap().into())).await.unwrap();
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("an answer").expect("a frame").unwrap();
        let Message::Binary(bytes) = reply else { panic!("{who}: expected acknowledgements, got {reply:?}") };
        match protocol::decode::<ServerMsg>(&bytes).unwrap() {
            ServerMsg::Acks { acks } => {
                assert!(matches!(&acks[..], [ack] if matches!(ack.status, AckStatus::Refused { code: ErrorCode::Forbidden, .. })), "{who}: {acks:?}")
            }
            other => panic!("{who}: expected acknowledgements, got {other:?}"),
        }
    }
    // Nothing of the intruder reached the person's record.
    sync(&b, &server).await;
    assert_eq!(b.person("p-x").await.unwrap().person.alias, "KM-1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_refused_and_wipes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    a.register_person(person("p-1", "Lost-Phone-Alias")).await.unwrap();
    sync(&a, &server).await;
    let device = a.device_id().await.unwrap();
    let (status, _) = server.admin("POST", &format!("/v1/devices/{device}/revoke?org={ORG}"), None).await;
    assert_eq!(status, 200);
    // The phone records more offline, then connects: it is told to wipe, and does.
    a.record_visit("p-1", visit("v-1", "offline")).await.unwrap();
    let err = a.sync(&server.options()).await.unwrap_err();
    assert!(matches!(err, SyncError::Wiped { .. }), "{err:?}");
    assert!(a.is_wiped());
    assert!(matches!(a.person("p-1").await, Err(CoreError::Wiped)));
    assert!(matches!(a.people().await, Err(CoreError::Wiped)));
    // It cannot sync or enroll again in this process: it says it was wiped.
    assert!(matches!(a.sync(&server.options()).await, Err(SyncError::Local(CoreError::Wiped))));
    assert!(matches!(a.enroll(&server.options(), &server.code("w-001"), "again").await, Err(SyncError::Local(CoreError::Wiped))));
    // The offline visit never reached the server.
    let (b, _) = server.phone(dir.path(), "w-002").await;
    sync(&b, &server).await;
    assert!(visit_ids(&b, "p-1").await.is_empty());
    server.stop().await;
}

/// A phone revoked while it stays connected is cut off at once, quiet as it is, before any
/// later change could reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_device_revoked_is_cut_off_at_once_and_wipes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (c, _) = server.phone(dir.path(), "w-003").await;
    a.register_person(person("p-1", "AB")).await.unwrap();
    sync(&a, &server).await;
    let live = c.sync_live(&server.options()).await.unwrap();
    eventually("the connected phone holds p-1", async || c.people().await.unwrap().len() == 1).await;
    let device = c.device_id().await.unwrap();
    assert_eq!(server.admin("POST", &format!("/v1/devices/{device}/revoke?org={ORG}"), None).await.0, 200);
    // Nothing else happens: no change to forward, no frame from the phone.
    eventually("the quiet live phone was told to wipe", async || c.is_wiped()).await;
    eventually("the live connection ended", async || live.is_finished()).await;
    let end = live.stop().await;
    assert!(matches!(end, Err(SyncError::Wiped { .. })), "{end:?}");
    // Another live phone of the team is not disturbed.
    let live_a = a.sync_live(&server.options()).await.unwrap();
    let (d, _) = server.phone(dir.path(), "w-002").await;
    let d_id = d.device_id().await.unwrap();
    assert_eq!(server.admin("POST", &format!("/v1/devices/{d_id}/revoke?org={ORG}"), None).await.0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!live_a.is_finished() && !a.is_wiped());
    live_a.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_unsigned_connections_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let upgrade = |token: Option<String>| {
        let url = format!("{}/v1/sync", server.url);
        async move {
            let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
            if let Some(t) = token {
                req.headers_mut().insert("authorization", t.parse().unwrap());
            }
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let good = a.connection_token().await.unwrap().unwrap();
    // A wrong signature.
    let mut forged = good.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(upgrade(Some(forged)).await, 401);
    // Someone else's device id with our signature.
    assert_eq!(upgrade(Some(good.replacen("PeerSync ", "PeerSync someone-else", 1))).await, 401);
    assert_eq!(upgrade(None).await, 401);
    // The real token works once; replayed, it is refused.
    assert_eq!(upgrade(Some(good.clone())).await, 101);
    assert_eq!(upgrade(Some(good)).await, 401);
    // An old token (clock far behind) is refused; the device corrects its clock and syncs.
    let token = a.connection_token().await.unwrap().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let stale = format!("{}.{}.{}.{}", parts[0], parts[1].parse::<i64>().unwrap() - 3600, parts[2], parts[3]);
    assert_eq!(upgrade(Some(stale)).await, 401);
    sync(&a, &server).await;
    // A token used before the server restarted is not taken after it either (the nonces seen
    // were in memory); the phone's own next sync goes through.
    let used = a.connection_token().await.unwrap().unwrap();
    assert_eq!(upgrade(Some(used.clone())).await, 101);
    let (data, addr) = (server.data.clone(), server.addr);
    server.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let server = TestServer::start_on(&data, &addr.to_string()).await;
    let url = format!("{}/v1/sync", server.url);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("authorization", used.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 401),
        other => panic!("a token from before the restart must be refused: {:?}", other.map(|_| ())),
    }
    sync(&a, &server).await;
    server.stop().await;
}

/// One device cannot take the server's connections for itself: past a few sync connections
/// open at once, the next is refused until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_holds_a_bounded_number_of_sync_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let connect = || async {
        let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("{}/v1/sync", server.url)).unwrap();
        req.headers_mut().insert("authorization", a.connection_token().await.unwrap().unwrap().parse().unwrap());
        tokio_tungstenite::connect_async(req).await
    };
    let mut open = Vec::new();
    for _ in 0..peersync_server::app::MAX_SESSIONS_PER_DEVICE {
        open.push(connect().await.expect("within the bound").0);
    }
    match connect().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 429),
        other => panic!("one past the bound must be refused: {:?}", other.map(|_| ())),
    }
    // Closing one gives its place back once the server has seen the close.
    drop(open.pop());
    eventually("a closed connection's place is given back", async || connect().await.is_ok()).await;
    drop(open);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_codes_are_single_use_expire_and_resist_guessing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let code = server.code("w-001");
    let (a, _) = open_phone(dir.path(), "a").await;
    a.enroll(&server.options(), &code, "a").await.unwrap();
    // Reused.
    let (b, _) = open_phone(dir.path(), "b").await;
    let err = b.enroll(&server.options(), &code, "b").await.unwrap_err();
    assert!(matches!(err, SyncError::Enrollment { status: 401, .. }), "{err:?}");
    // Expired.
    let (old, _) = server.state.dir.issue_code_until(ORG, "w-002", chrono::Utc::now() - chrono::Duration::minutes(1)).unwrap();
    let err = b.enroll(&server.options(), &old, "b").await.unwrap_err();
    assert!(matches!(err, SyncError::Enrollment { status: 401, .. }), "{err:?}");
    // Guessing: after ten wrong codes even a right one is turned away for a while.
    for i in 0..8 {
        let err = b.enroll(&server.options(), &format!("AAAA-BBBB-{i:04}"), "b").await.unwrap_err();
        assert!(matches!(err, SyncError::Enrollment { status: 401, .. }), "{err:?}");
    }
    let fresh = server.code("w-002");
    let err = b.enroll(&server.options(), &fresh, "b").await.unwrap_err();
    assert!(matches!(err, SyncError::Enrollment { status: 429, .. }), "{err:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_enrollment_changes_nothing_and_can_be_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let nowhere = peersync_core::sync::SyncOptions::new("ws://127.0.0.1:1");
    // An enrolled phone that is given a code again (a typo, a second code) keeps its identity.
    let (a, _) = open_phone(dir.path(), "a").await;
    a.enroll(&server.options(), &server.code("w-001"), "a").await.unwrap();
    for code in ["AAAA-BBBB-CCCC".to_string(), server.code("w-002")] {
        let err = a.enroll(&server.options(), &code, "a").await.unwrap_err();
        assert!(matches!(&err, SyncError::AlreadyEnrolled { worker, .. } if worker == "w-001"), "{err:?}");
    }
    a.register_person(person("p-1", "AB")).await.unwrap();
    assert_eq!(sync(&a, &server).await.docs_sent, 1, "the phone still syncs as itself");
    // A new phone whose attempts fail stays simply not enrolled, then enrolls.
    let (b, _) = open_phone(dir.path(), "b").await;
    let err = b.enroll(&server.options(), "AAAA-BBBB-CCCC", "b").await.unwrap_err();
    assert!(matches!(err, SyncError::Enrollment { status: 401, .. }), "{err:?}");
    assert!(b.enroll(&nowhere, &server.code("w-002"), "b").await.is_err());
    assert!(matches!(b.sync(&server.options()).await, Err(SyncError::NotEnrolled)));
    b.enroll(&server.options(), &server.code("w-002"), "b").await.unwrap();
    assert_eq!(sync(&b, &server).await.docs_received, 1);
    // A phone whose answer was lost on the way back (its store as it was before the answer
    // arrived) asks again with the same code and gets in as the same device.
    let (c, _) = open_phone(dir.path(), "c").await;
    assert!(c.enroll(&nowhere, "AAAA-BBBB-CCCC", "c").await.is_err(), "leaves the pending key");
    drop(c);
    copy_dir(&dir.path().join("c"), &dir.path().join("c-before-answer"));
    let code = server.code("w-003");
    let (c, _) = open_phone(dir.path(), "c").await;
    let first = c.enroll(&server.options(), &code, "c").await.unwrap();
    drop(c);
    let (lost, _) = open_phone(dir.path(), "c-before-answer").await;
    assert_eq!(lost.enroll(&server.options(), &code, "c").await.unwrap(), first);
    assert_eq!(sync(&lost, &server).await.docs_received, 1, "the device the server knows, with its key");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sessions_and_failed_logins_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let pw = "a long enough password";
    assert_eq!(server.admin("POST", &format!("/v1/admin/orgs/{ORG}/coordinators"), Some(json!({ "username": "maya", "password": pw }))).await.0, 201);
    let (status, cookie) = login(&server, ORG, "maya", pw).await;
    assert_eq!(status, 200);
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP on loopback: {cookie}");
    // Behind a TLS-terminating proxy, the browser's connection is HTTPS: the cookie says so.
    let creds = json!({ "org": ORG, "username": "maya", "password": pw });
    let (status, head, _) = http_full(server.addr, "POST", "/v1/login", &[("X-Forwarded-Proto", "https".into())], Some(creds)).await;
    assert_eq!(status, 200);
    assert!(head.lines().any(|l| l.to_ascii_lowercase().starts_with("set-cookie:") && l.contains("; Secure")), "{head}");
    assert_eq!(as_coordinator(&server, &cookie, "GET", "/v1/me", None).await.1["username"], "maya");
    assert_eq!(as_coordinator(&server, &cookie, "POST", "/v1/logout", None).await.0, 200);
    assert_eq!(as_coordinator(&server, &cookie, "GET", "/v1/me", None).await.0, 401, "logged out");
    // A refusal says what was wrong with what was sent.
    let (status, body) = as_coordinator(&server, &cookie, "GET", "/v1/workers", None).await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("session has ended"), "{body}");
    let (status, body) = http(server.addr, "GET", &format!("/v1/workers?org={ORG}"), &[("Authorization", "Bearer not-the-token".to_string())], None).await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("not this server's"), "{body}");
    for _ in 0..5 {
        assert_eq!(login(&server, ORG, "maya", "wrong password!!").await.0, 401);
    }
    assert_eq!(login(&server, ORG, "maya", pw).await.0, 429, "throttled even with the right password");
    let (_, audit) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
    let locks = audit.as_array().unwrap().iter().filter(|e| e["action"] == "login-locked").count();
    assert_eq!(locks, 1, "the lockout is in the audit log, once: {audit}");
    // Another coordinator at the same address is not locked out by maya's failures.
    assert_eq!(server.admin("POST", &format!("/v1/admin/orgs/{ORG}/coordinators"), Some(json!({ "username": "sam", "password": pw }))).await.0, 201);
    let (status, sam) = login(&server, ORG, "sam", pw).await;
    assert_eq!(status, 200);
    // A browser's request from another site that would change something is refused, even with
    // the session cookie; the same from the dashboard's own origin goes through.
    let cookie_header = ("Cookie", sam.split(';').next().unwrap().trim().to_string());
    let cross = [cookie_header.clone(), ("Origin", "https://elsewhere.example".to_string())];
    let (status, body) = http(server.addr, "POST", "/v1/people/p-x/erase", &cross, None).await;
    assert_eq!(status, 403, "{body}");
    let fetch_cross = [cookie_header.clone(), ("Sec-Fetch-Site", "cross-site".to_string())];
    assert_eq!(http(server.addr, "POST", "/v1/workers/w-001/enrollment", &fetch_cross, None).await.0, 403);
    let same = [cookie_header.clone(), ("Origin", format!("http://{}", server.addr)), ("Sec-Fetch-Site", "same-origin".to_string())];
    assert_eq!(http(server.addr, "POST", "/v1/workers/w-001/enrollment", &same, None).await.0, 200);
    // API answers are not cached, and every error is JSON.
    let (status, head, body) = http_full(server.addr, "GET", "/v1/people", std::slice::from_ref(&cookie_header), None).await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("cache-control: no-store"), "{head}");
    let (status, body404) = http(server.addr, "GET", "/v1/no-such-thing", std::slice::from_ref(&cookie_header), None).await;
    assert_eq!(status, 404);
    assert!(body404["error"].is_string(), "{body404}");
    let (status, bad_query) = http(server.addr, "GET", "/v1/report?from=notadate", std::slice::from_ref(&cookie_header), None).await;
    assert_eq!(status, 400);
    assert!(bad_query["error"].as_str().unwrap().contains("from"), "{bad_query}");
    let _ = body;
    // A login body past its bound is refused as too large, not as malformed.
    let (status, big) = http(server.addr, "POST", "/v1/login", &[], Some(json!({ "org": ORG, "username": "sam", "password": "x".repeat(20_000) }))).await;
    assert_eq!(status, 413, "{big}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_is_honoured_everywhere_even_by_a_stale_phone() {
    const ALIAS: &str = "Quintessa-Marlowe";
    const NOTE: &str = "Zanzibar lighthouse conversation about the tenancy";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = TestServer::start(&data).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-e", ALIAS)).await.unwrap();
    a.record_visit("p-e", visit("v-1", NOTE)).await.unwrap();
    a.register_person(person("p-keep", "Keeps-Going")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    // B goes offline and records more for the person.
    b.record_visit("p-e", visit("v-offline", NOTE)).await.unwrap();
    // The coordinator erases the person at their request.
    let (status, body) = server.admin("POST", &format!("/v1/people/p-e/erase?org={ORG}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["known"], true, "{body}");
    // Nobody can be given the person again: an assignment would stop stale phones purging them.
    let (status, body) = server.admin("POST", &format!("/v1/people/p-e/assign?org={ORG}"), Some(json!({ "worker": "w-003" }))).await;
    assert_eq!(status, 410, "{body}");
    assert!(body["error"].as_str().unwrap().contains("erased"), "{body}");
    // A purges at its next sync.
    let ra = sync(&a, &server).await;
    assert_eq!(ra.purged, 1);
    assert!(matches!(a.person("p-e").await, Err(CoreError::UnknownPerson(_))));
    // B, stale, pushes its offline visit: refused, not merged; B purges its copy.
    let rb = sync(&b, &server).await;
    assert_eq!(rb.purged, 1, "one person purged once, refused push or not: {rb:?}");
    assert!(matches!(b.person("p-e").await, Err(CoreError::UnknownPerson(_))));
    assert_eq!(visit_ids(&b, "p-keep").await.len(), 0, "other records untouched");
    assert!(b.person("p-keep").await.is_ok());
    // Nothing comes back, for anyone.
    let (c, _) = server.phone(dir.path(), "w-003").await;
    sync(&c, &server).await;
    assert!(c.person("p-e").await.is_err());
    assert_eq!(c.people().await.unwrap().len(), 1);
    sync(&a, &server).await;
    assert!(a.person("p-e").await.is_err());
    // A stale register of the same id is refused too.
    b.register_person(person("p-e", ALIAS)).await.unwrap();
    let rb = sync(&b, &server).await;
    assert_eq!(rb.purged, 1);
    assert!(b.person("p-e").await.is_err());
    // A person erased before any record of them reached the server (their worker's phone has
    // not synced since registering them): the erasure stands, and says so.
    c.register_person(person("p-late", "Late-Arrival")).await.unwrap();
    let (status, body) = server.admin("POST", &format!("/v1/people/p-late/erase?org={ORG}"), None).await;
    assert_eq!((status, &body["known"]), (200, &serde_json::json!(false)), "{body}");
    let rc = sync(&c, &server).await;
    assert_eq!(rc.purged, 1, "{rc:?}");
    assert!(c.person("p-late").await.is_err());
    // The audit log records the erasure, without content.
    let (_, audit) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
    let text = audit.to_string();
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == "erase" && e["people"][0] == "p-e"));
    assert!(!text.contains(ALIAS) && !text.contains("Zanzibar"));
    // No trace of the person's alias or notes anywhere in the server's files.
    server.stop().await;
    let mut files = Vec::new();
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p, out) } else { out.push(p) }
        }
    }
    walk(&data, &mut files);
    assert!(!files.is_empty());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [ALIAS, "Zanzibar", "lighthouse"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} in {}", f.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_withdrawal_hides_a_person_from_coordinators_but_not_from_workers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-1", "Shares")).await.unwrap();
    a.register_person(person("p-2", "Withdraws")).await.unwrap();
    sync(&a, &server).await;
    let (_, people) = server.admin("GET", &format!("/v1/people?org={ORG}"), None).await;
    assert_eq!(people.as_array().unwrap().len(), 2);
    assert_eq!(server.admin("GET", &format!("/v1/people/p-2?org={ORG}"), None).await.0, 200);

    a.set_consent("p-2", ConsentChange { share_with_coordinator: Some(false), ..Default::default() }).await.unwrap();
    sync(&a, &server).await;
    let (_, people) = server.admin("GET", &format!("/v1/people?org={ORG}"), None).await;
    let ids: Vec<_> = people.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["p-1"]);
    assert_eq!(server.admin("GET", &format!("/v1/people/p-2?org={ORG}"), None).await.0, 404);
    // Their workers keep working with them.
    a.record_visit("p-2", visit("v-after", "")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    assert_eq!(visit_ids(&b, "p-2").await, ["v-after"]);
    // A coordinator's audit view does not say when and by whom p-2's record was synced; the
    // admin's names them.
    let pw = "a long enough password";
    server.admin("POST", &format!("/v1/admin/orgs/{ORG}/coordinators"), Some(json!({ "username": "maya", "password": pw }))).await;
    let (_, cookie) = login(&server, ORG, "maya", pw).await;
    let (status, audit) = as_coordinator(&server, &cookie, "GET", "/v1/audit", None).await;
    assert_eq!(status, 200);
    let text = audit.to_string();
    assert!(!text.contains("p-2") && text.contains("p-1"), "{audit}");
    let hiding: Vec<&serde_json::Value> = audit.as_array().unwrap().iter().filter(|e| e["people"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("not shared"))).collect();
    assert!(!hiding.is_empty(), "{audit}");
    assert!(hiding.iter().all(|e| !e["detail"].as_str().unwrap().starts_with(char::is_numeric)), "no count of the hidden: {audit}");
    let (_, admin_view) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
    assert!(admin_view.to_string().contains("p-2"));
    // Nor can the coordinator find out who holds p-2 by trying to unassign each worker, or hand
    // p-2's record to a worker: assignments of people who do not share are the admin's.
    for action in ["unassign", "assign"] {
        let (status, body) = as_coordinator(&server, &cookie, "POST", &format!("/v1/people/p-2/{action}"), Some(json!({ "worker": "w-004" }))).await;
        assert_eq!(status, 403, "{action}: {body}");
    }
    assert_eq!(as_coordinator(&server, &cookie, "POST", "/v1/people/p-1/unassign", Some(json!({ "worker": "w-009" }))).await.0, 404);
    assert_eq!(server.admin("POST", &format!("/v1/people/p-2/unassign?org={ORG}"), Some(json!({ "worker": "w-004" }))).await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_each_event_without_content() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let pw = "a long enough password";
    server.admin("POST", &format!("/v1/admin/orgs/{ORG}/coordinators"), Some(json!({ "username": "maya", "password": pw }))).await;
    login(&server, ORG, "maya", "not the password").await;
    let (_, cookie) = login(&server, ORG, "maya", pw).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    a.register_person(person("p-1", "Secret-Alias")).await.unwrap();
    a.record_visit("p-1", visit("v-1", "secret note text")).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    as_coordinator(&server, &cookie, "GET", "/v1/people/p-1", None).await;
    as_coordinator(&server, &cookie, "POST", &format!("/v1/devices/{}/revoke", b.device_id().await.unwrap()), None).await;
    let _ = b.sync(&server.options()).await;
    as_coordinator(&server, &cookie, "POST", "/v1/people/p-1/erase", None).await;

    let (status, audit) = as_coordinator(&server, &cookie, "GET", "/v1/audit", None).await;
    assert_eq!(status, 200);
    let entries = audit.as_array().unwrap();
    let has = |action: &str, ok: bool| entries.iter().any(|e| e["action"] == action && e["ok"] == ok);
    for action in ["enroll", "write", "read", "revoke", "wipe", "erase", "create-coordinator"] {
        assert!(has(action, true), "no {action} entry: {audit}");
    }
    assert!(has("login", true) && has("login", false));
    assert!(entries.iter().any(|e| e["action"] == "read" && e["actor"] == "coordinator:maya" && e["people"][0] == "p-1"));
    let text = audit.to_string();
    assert!(!text.contains("Secret-Alias") && !text.contains("secret note"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_get_401_everywhere_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    assert_eq!(http(server.addr, "GET", "/healthz", &[], None).await.0, 200);
    let calls: &[(&str, &str, Option<serde_json::Value>)] = &[
        ("GET", "/v1/sync", None),
        ("GET", "/", None),
        ("GET", "/v1/report", None),
        ("GET", "/v1/export", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/me", None),
        ("GET", "/v1/workers", None),
        ("POST", "/v1/workers", Some(json!({ "id": "w-9", "role": "peer_advocate" }))),
        ("POST", "/v1/workers/w-001/enrollment", None),
        ("GET", "/v1/devices", None),
        ("POST", "/v1/devices/x/revoke", None),
        ("GET", "/v1/people", None),
        ("GET", "/v1/people/p-1", None),
        ("POST", "/v1/people/p-1/assign", Some(json!({ "worker": "w-001" }))),
        ("POST", "/v1/people/p-1/unassign", Some(json!({ "worker": "w-001" }))),
        ("POST", "/v1/people/p-1/erase", None),
        ("GET", "/v1/audit", None),
        ("POST", "/v1/logout", None),
        ("POST", "/v1/admin/orgs", Some(json!({ "id": "o" }))),
        ("POST", "/v1/admin/orgs/org1/coordinators", Some(json!({ "username": "u", "password": "pppppppppppppp" }))),
        ("POST", "/v1/enroll", Some(json!({ "code": "WRONG", "device": "d", "public_key": "AAAA" }))),
        ("POST", "/v1/login", Some(json!({ "org": "org1", "username": "u", "password": "p" }))),
    ];
    for (method, path, body) in calls {
        let (status, _) = http(server.addr, method, path, &[("Authorization", "Bearer wrong-token".into())], body.clone()).await;
        assert_eq!(status, 401, "{method} {path}");
    }
    // Without credentials, a bad body or an unknown endpoint is still 401: how a body is
    // judged, or which endpoints exist, is not told to a stranger.
    for (method, path, body) in [
        ("POST", "/v1/admin/orgs", Some(json!({}))),
        ("POST", "/v1/workers", Some(json!("not an object"))),
        ("POST", "/v1/people/p-1/assign", None),
        ("GET", "/v1/report?from=yesterday", None),
        ("GET", "/v1/no-such-endpoint", None),
    ] {
        assert_eq!(http(server.addr, method, path, &[], body).await.0, 401, "{method} {path}");
    }
    server.stop().await;
}
