//! The coordinator report and export, checked against every definition on crafted data:
//! attribution, minutes as last edited, maps of non-zero counts, consent, erasure after offline
//! recording, outcomes, and the date range.

use chrono::{TimeZone, Utc};
use peersync_core::{ConsentChange, NewCheckin, NewPerson, VisitEdit};
use peersync_tests::*;
use serde_json::{Value, json};

fn at(day: u32, hour: u32) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
}

fn v(id: &str, day: u32, minutes: u32, mode: &str, setting: &str, activities: &[&str]) -> peersync_core::NewVisit {
    let mut n = visit(id, "private notes never reported");
    n.started_at = at(day, 10);
    n.duration_min = minutes;
    n.mode = mode.into();
    n.setting = setting.into();
    n.activities = activities.iter().map(|a| a.to_string()).collect();
    n
}

fn c(id: &str, day: u32, wellbeing: [u8; 7], d: [u8; 5]) -> NewCheckin {
    NewCheckin {
        taken_at: Some(at(day, 11)),
        wellbeing: wellbeing.to_vec(),
        distress: d[0],
        coping: d[1],
        social_support: d[2],
        self_efficacy: d[3],
        quality_of_life: d[4],
        ..checkin(id)
    }
}

fn sharing(id: &str, share: bool) -> NewPerson {
    NewPerson { share_with_coordinator: share, ..person(id, &format!("alias-{id}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_follows_every_definition() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    let (cc, _) = server.phone(dir.path(), "w-003").await;

    // 1. A's caseload.
    for (id, share) in [("p-1", true), ("p-2", false), ("p-3", true), ("p-4", true)] {
        a.register_person(sharing(id, share)).await.unwrap();
    }
    a.record_visit("p-1", v("v1", 2, 45, "in_person", "community", &["support"])).await.unwrap();
    a.record_visit("p-1", v("v2", 5, 60, "phone", "home", &["support", "advocacy"])).await.unwrap();
    a.record_checkin("p-1", c("c1", 2, [2; 7], [4, 2, 2, 2, 2])).await.unwrap();
    a.record_checkin("p-1", c("c2", 9, [3, 3, 3, 3, 3, 2, 2], [2, 3, 4, 3, 3])).await.unwrap();
    a.record_visit("p-2", v("v4", 3, 30, "in_person", "housing", &["support"])).await.unwrap();
    a.record_visit("p-4", v("v5", 4, 15, "text", "community", &["education"])).await.unwrap();
    a.record_checkin("p-4", c("c5", 4, [4; 7], [1, 5, 5, 5, 5])).await.unwrap();
    a.record_checkin("p-4", c("c6", 7, [1; 7], [5, 1, 1, 1, 1])).await.unwrap();
    a.record_visit("p-3", v("v6", 2, 90, "group", "community", &["support"])).await.unwrap();
    sync(&a, &server).await;

    // 2. B: a visit, an amendment of A's visit (minutes count as last edited), two check-ins
    //    for a person who does not share with coordinators.
    sync(&b, &server).await;
    b.record_visit("p-1", v("v3", 6, 20, "video", "online", &["navigation"])).await.unwrap();
    b.edit_visit("p-1", "v2", VisitEdit { duration_min: Some(30), ..Default::default() }).await.unwrap();
    b.record_checkin("p-2", c("c3", 3, [3; 7], [3; 5])).await.unwrap();
    b.record_checkin("p-2", c("c4", 8, [5; 7], [3; 5])).await.unwrap();
    sync(&b, &server).await;

    // 3. C holds p-3 and goes offline; the coordinator erases p-3; C records for them anyway.
    sync(&cc, &server).await;
    assert_eq!(server.admin("POST", &format!("/v1/people/p-3/erase?org={ORG}"), None).await.0, 200);
    cc.record_visit("p-3", v("v7", 10, 60, "in_person", "home", &["support"])).await.unwrap();
    cc.record_checkin("p-3", c("c7", 10, [5; 7], [1; 5])).await.unwrap();
    // 4. p-4 withdraws consent to share with coordinators.
    a.set_consent("p-4", ConsentChange { share_with_coordinator: Some(false), ..Default::default() }).await.unwrap();
    for d in [&a, &b, &cc, &a, &b] {
        sync(d, &server).await;
    }

    let (status, r) = server.admin("GET", &format!("/v1/report?org={ORG}"), None).await;
    assert_eq!(status, 200, "{r}");
    let zero = json!({ "visits": 0, "minutes": 0, "people": 0, "checkins": 0, "by_mode": {}, "by_setting": {}, "by_activity": {} });
    let expected = json!({
        "workers": {
            "w-001": { "visits": 4, "minutes": 120, "people": 1, "checkins": 4,
                       "by_mode": { "in_person": 2, "phone": 1, "text": 1 },
                       "by_setting": { "community": 2, "home": 1, "housing": 1 },
                       "by_activity": { "support": 3, "advocacy": 1, "education": 1 } },
            "w-002": { "visits": 1, "minutes": 20, "people": 1, "checkins": 2,
                       "by_mode": { "video": 1 }, "by_setting": { "online": 1 }, "by_activity": { "navigation": 1 } },
            "w-003": zero,
            "w-004": zero,
        },
        "totals": { "visits": 5, "minutes": 140, "people": 1, "checkins": 6 },
        "outcomes": { "people": 1, "wellbeing_mean_change": 5.0, "improved": 1, "no_change": 0, "worse": 0,
                      "domains": { "distress": -2.0, "coping": 1.0, "social_support": 2.0, "self_efficacy": 1.0, "quality_of_life": 1.0 } }
    });
    assert_eq!(r, expected);

    // The date range: visits by started_at, check-ins by their time, in [from, to).
    let (_, r) = server.admin("GET", &format!("/v1/report?org={ORG}&from=2026-03-03&to=2026-03-06"), None).await;
    assert_eq!(r["workers"]["w-001"]["visits"], 3);
    assert_eq!(r["workers"]["w-001"]["minutes"], 75);
    assert_eq!(r["workers"]["w-001"]["checkins"], 1);
    assert_eq!(r["workers"]["w-002"]["visits"], 0);
    assert_eq!(r["workers"]["w-002"]["checkins"], 1);
    assert_eq!(r["totals"]["people"], 1);
    assert_eq!(r["outcomes"]["people"], 0);
    assert_eq!(r["outcomes"]["wellbeing_mean_change"], Value::Null);
    assert_eq!(r["outcomes"]["domains"]["coping"], Value::Null);
    // An empty period is refused, not answered with zeros; so is an export of an unknown kind.
    let (status, r) = server.admin("GET", &format!("/v1/report?org={ORG}&from=2026-03-06&to=2026-03-03"), None).await;
    assert_eq!(status, 400, "{r}");
    assert!(r["error"].as_str().unwrap().contains("must be before"), "{r}");
    assert_eq!(server.admin("GET", &format!("/v1/export?org={ORG}&format=json&kind=garbage"), None).await.0, 400);

    // Export: one CSV row per visit, consent honoured, erased people absent; audited.
    let (status, head, body) = http_full(server.addr, "GET", &format!("/v1/export?org={ORG}&format=csv&kind=visits"), &[("Authorization", format!("Bearer {ADMIN_TOKEN}"))], None).await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/csv"));
    let csv = body.as_str().unwrap().to_string();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "person,visit,worker,started_at,duration_min,mode,setting,activities,goals,referrals");
    assert_eq!(lines.len(), 1 + 5);
    assert!(lines.iter().any(|l| l.starts_with("p-1,v2,w-001,") && l.contains(",30,phone,home,support;advocacy,")));
    assert!(lines.iter().any(|l| l.starts_with(",,w-001,") && l.contains(",30,in_person,housing,")), "p-2 counted, not identified");
    assert!(!csv.contains("p-3") && !csv.contains("p-2") && !csv.contains("p-4") && !csv.contains("private notes"));
    let (_, checkins) = http(server.addr, "GET", &format!("/v1/export?org={ORG}&format=csv&kind=checkins"), &[("Authorization", format!("Bearer {ADMIN_TOKEN}"))], None).await;
    assert_eq!(checkins.as_str().unwrap().lines().count(), 1 + 6);
    let (_, json_export) = server.admin("GET", &format!("/v1/export?org={ORG}&format=json"), None).await;
    assert_eq!(json_export["visits"].as_array().unwrap().len(), 5);
    let (_, audit) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
    assert_eq!(audit.as_array().unwrap().iter().filter(|e| e["action"] == "export").count(), 3);
    server.stop().await;
}

/// Two workers' phones, both offline, are told different things about one person's consent.
/// The server, its report and coordinators' views follow the person's latest word by time,
/// whichever phone wrote more and whichever synced first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_consent_changes_follow_the_latest_word() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, clock_a) = server.phone(dir.path(), "w-001").await;
    let (b, clock_b) = server.phone(dir.path(), "w-002").await;
    a.register_person(sharing("p-1", true)).await.unwrap();
    a.record_visit("p-1", v("v1", 2, 45, "in_person", "community", &["support"])).await.unwrap();
    sync(&a, &server).await;
    sync(&b, &server).await;
    let shared = async || {
        let (status, r) = server.admin("GET", &format!("/v1/report?org={ORG}"), None).await;
        assert_eq!(status, 200, "{r}");
        let people = r["totals"]["people"].as_u64().unwrap();
        let (status, _) = server.admin("GET", &format!("/v1/people/p-1?org={ORG}"), None).await;
        assert_eq!(status == 200, people == 1, "the person's record is readable exactly when they count in the report");
        people == 1
    };
    assert!(shared().await);

    // B: off at 9:00, on again at 9:30 (two changes); A: a withdrawal at 10:00. B syncs first.
    let share = |on: bool| ConsentChange { share_with_coordinator: Some(on), ..Default::default() };
    clock_b.set(at(3, 9));
    b.set_consent("p-1", share(false)).await.unwrap();
    clock_b.set(at(3, 9) + chrono::Duration::minutes(30));
    b.set_consent("p-1", share(true)).await.unwrap();
    clock_a.set(at(3, 10));
    a.set_consent("p-1", share(false)).await.unwrap();
    for d in [&b, &a, &b] {
        sync(d, &server).await;
    }
    assert!(!shared().await, "the 10:00 withdrawal is the latest word");
    assert!(!b.person("p-1").await.unwrap().consent.share_with_coordinator, "and B's phone reads it so");

    // At 11:00 the person tells B's worker they are happy to share again.
    clock_b.set(at(3, 11));
    b.set_consent("p-1", share(true)).await.unwrap();
    sync(&b, &server).await;
    assert!(shared().await, "the 11:00 word is the latest");
    server.stop().await;
}

/// Pushes leave reporting rows due; the server computes them in the background once sync is
/// quiet, without anyone asking for a report, and a later edit makes the row due again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_rows_are_computed_in_the_background_once_sync_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (a, _) = server.phone(dir.path(), "w-001").await;
    for id in ["p-1", "p-2"] {
        a.register_person(sharing(id, true)).await.unwrap();
        a.record_visit(id, v(&format!("v-{id}"), 2, 45, "in_person", "community", &["support"])).await.unwrap();
    }
    sync(&a, &server).await;
    let store = server.state.hub.store().clone();
    let rows = |org: &str| store.views(org).unwrap().into_iter().map(|(doc, _)| doc).collect::<Vec<_>>();
    eventually("rows due after the sync are computed without a report", async || {
        store.views_due(None, 1).unwrap().is_empty() && rows(ORG) == ["p-1", "p-2"]
    })
    .await;
    let before = store.views(ORG).unwrap();

    a.record_visit("p-1", v("v-again", 3, 30, "phone", "home", &["advocacy"])).await.unwrap();
    sync(&a, &server).await;
    eventually("the edited person's row is computed again", async || {
        store.views_due(None, 1).unwrap().is_empty() && store.views(ORG).unwrap() != before
    })
    .await;
    let (status, report) = server.admin("GET", &format!("/v1/report?org={ORG}"), None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["totals"]["visits"], 3, "{report}");
}
