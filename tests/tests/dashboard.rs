//! The coordinator dashboard in a real headless Chromium: log in, read the team numbers, open
//! a chart, download a CSV and check its rows. Screenshots at 1280x800 go to
//! `target/screenshots/`.

use std::time::{Duration, Instant};

use peersync_tests::webdriver::Browser;
use peersync_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_uses_the_dashboard_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let pw = "dashboard password";
    server.admin("POST", &format!("/v1/admin/orgs/{ORG}/coordinators"), Some(json!({ "username": "maya", "password": pw }))).await;
    // Some field data: two workers, visits and check-ins.
    let (a, _) = server.phone(dir.path(), "w-001").await;
    let (b, _) = server.phone(dir.path(), "w-002").await;
    for i in 0..6 {
        let p = format!("p-{i}");
        a.register_person(person(&p, &format!("alias {i}"))).await.unwrap();
        let mut v = visit(&format!("va-{i}"), "");
        v.started_at = t(2 + i as u32, 10);
        v.mode = ["in_person", "phone", "video"][i % 3].into();
        a.record_visit(&p, v).await.unwrap();
        a.record_checkin(&p, checkin(&format!("c1-{i}"))).await.unwrap();
        // A later check-in: most people report feeling better, one worse.
        let mut later = checkin(&format!("c2-{i}"));
        later.taken_at = Some(t(20, 9));
        later.wellbeing = if i == 5 { vec![1; 7] } else { vec![3 + (i % 3) as u8; 7] };
        later.coping = 4;
        a.record_checkin(&p, later).await.unwrap();
    }
    sync(&a, &server).await;
    sync(&b, &server).await;
    for i in 0..3 {
        b.record_visit(&format!("p-{i}"), visit(&format!("vb-{i}"), "")).await.unwrap();
    }
    sync(&b, &server).await;
    let (_, report) = server.admin("GET", &format!("/v1/report?org={ORG}"), None).await;
    assert_eq!(report["totals"]["visits"], 9);

    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let browser = Browser::start(&dir.path().join("profile"), &downloads).await;
    let base = format!("http://{}", server.addr);

    // 1. Log in.
    browser.goto(&format!("{base}/")).await;
    browser.wait_for("the login form shows", "!document.querySelector('#login').classList.contains('hidden')").await;
    browser.screenshot(&shots.join("login.png")).await;
    browser.type_into("#login-org", ORG).await;
    browser.type_into("#login-username", "maya").await;
    browser.type_into("#login-password", pw).await;
    browser.click("#login-submit").await;

    // 2. The team numbers match the report.
    browser.wait_for("the team numbers show", "document.querySelector('#kpi-visits') && document.querySelector('#kpi-visits').textContent === '9'").await;
    browser.wait_for("the weekly table fills", "document.querySelectorAll('#weekly-table tbody tr').length > 0").await;
    let row = browser.text("#team-table tr[data-worker='w-001']").await;
    assert!(row.starts_with("w-001 6 6 270 12"), "{row:?}");
    let row = browser.text("#team-table tr[data-worker='w-002']").await;
    assert!(row.starts_with("w-002 3 3 135 0"), "{row:?}");
    // Week by week: every visit falls in the twelve weeks shown; the metric and the kind of
    // support can be chosen.
    let week_sum = "return Array.from(Array.from(document.querySelectorAll('#weekly-table tbody tr')).find((r) => r.querySelector('th').textContent === 'w-001')
        .querySelectorAll('td')).reduce((a, td) => a + Number(td.textContent), 0)";
    assert_eq!(browser.script(week_sum).await, json!(6));
    browser.script("const s = document.querySelector('#weekly-metric'); s.value = 'minutes'; s.dispatchEvent(new Event('change'))").await;
    assert_eq!(browser.script(week_sum).await, json!(270));
    browser.script("const s = document.querySelector('#weekly-kind'); s.value = 'by_setting'; s.dispatchEvent(new Event('change'))").await;
    let kinds = browser.text("#weekly-kinds").await;
    assert!(kinds.contains("Team visits by setting per week") && kinds.contains("community"), "{kinds:?}");
    browser.script("document.querySelector('#weekly-table').scrollIntoView()").await;
    browser.screenshot(&shots.join("weekly.png")).await;
    browser.script("window.scrollTo(0, 0)").await;
    // Looking is not exporting: the dashboard's load wrote no export to the audit log.
    let (_, audit) = server.admin("GET", &format!("/v1/audit?org={ORG}"), None).await;
    assert!(!audit.to_string().contains("export"), "{audit}");
    browser.screenshot(&shots.join("team.png")).await;

    // 3. Open a chart.
    browser.click("button.open-chart[data-worker='w-001']").await;
    browser.wait_for("the worker's charts show", "!document.querySelector('#worker-chart-card').hidden && document.querySelectorAll('#worker-charts svg').length === 3").await;
    let label = browser.script("return document.querySelector('#worker-charts svg').getAttribute('aria-label')").await;
    assert!(label.as_str().unwrap().contains("in person 2"), "{label}");
    browser.script("document.querySelector('#worker-chart-card').scrollIntoView()").await;
    browser.screenshot(&shots.join("worker-chart.png")).await;
    browser.click("#t-outcomes").await;
    browser.screenshot(&shots.join("outcomes.png")).await;
    browser.click("#t-devices").await;
    browser.wait_for("devices listed", "document.querySelectorAll('#devices-table .revoke').length === 2").await;
    browser.screenshot(&shots.join("devices.png")).await;
    browser.click("#t-admin").await;
    browser.click("#code-form button").await;
    browser.wait_for("an enrollment code and its QR code show", "!document.querySelector('#code-out').hidden && document.querySelector('#code-qr svg')").await;
    browser.screenshot(&shots.join("enrollment.png")).await;

    // 4. Download the visits CSV and check its rows.
    browser.click("#t-team").await;
    browser.click("#csv-visits").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let csv = loop {
        let done: Vec<_> = std::fs::read_dir(&downloads).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "csv")).collect();
        if let Some(p) = done.first() {
            break std::fs::read_to_string(p).unwrap();
        }
        assert!(Instant::now() < deadline, "the CSV download did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "person,visit,worker,started_at,duration_min,mode,setting,activities,goals,referrals");
    assert_eq!(lines.len(), 1 + 9);
    assert_eq!(lines.iter().filter(|l| l.contains(",w-002,")).count(), 3);
    assert!(lines.iter().any(|l| l.starts_with("p-0,va-0,w-001,2026-03-02T10:00:00+00:00,45,in_person,community,support,housing,")), "{csv}");

    // 5. Sync health: B's sync broke off once and then went through; A's latest broke off.
    let proxy = CuttingProxy::start(server.addr).await;
    for (phone, worker) in [(&b, "w-002"), (&a, "w-001")] {
        // A note that does not compress away: the phone's first frame outlasts the cut.
        let note: String = (0..2_000u64).map(|j| format!("{} ", (j * 104_729).pow(2) % 1_000_003)).collect();
        phone.record_visit("p-0", visit(&format!("late-{worker}"), &note)).await.unwrap();
        proxy.cut_after(Some(3_000));
        assert!(phone.sync(&proxy.options()).await.is_err());
        eventually("the broken sync is recorded", async || {
            let (_, devices) = server.admin("GET", &format!("/v1/devices?org={ORG}"), None).await;
            devices.as_array().unwrap().iter().any(|d| d["worker"] == worker && d["sync"]["last_error"].is_string())
        })
        .await;
    }
    proxy.cut_after(None);
    b.sync(&proxy.options()).await.unwrap();
    browser.click("#t-team").await;
    browser.click("#t-devices").await;
    let rows = "Array.from(document.querySelectorAll('#devices-table tbody tr')).map((r) => r.textContent)";
    browser.wait_for("the errors show", &format!("{rows}.some((t) => t.includes('w-001') && t.includes('before the sync finished') && !t.includes('synced fine since')) && {rows}.some((t) => t.includes('w-002') && t.includes('synced fine since'))")).await;
    browser.quit().await;
    server.stop().await;
}
