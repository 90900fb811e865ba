//! Replays of the product lead's field scenarios (`shared/data/generate.py`, several sizes and
//! seeds) converge, and the coordinator report equals one computed independently from the
//! scenario file.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use peersync_server::scenario;
use peersync_tests::*;
use serde_json::{Value, json};

fn generate(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/generate.py");
    let out = std::process::Command::new("python3").arg(script).args(args).output().expect("python3 runs generate.py");
    assert!(out.status.success(), "generate.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The report, straight from the scenario's events (no devices, no server).
fn expected_report(text: &str) -> Value {
    struct V { by: String, minutes: i64, mode: String, setting: String, activities: Vec<String> }
    struct C { by: String, at: String, id: String, wellbeing: i64, d: [i64; 5] }
    let mut workers: BTreeSet<String> = BTreeSet::new();
    let mut share: HashMap<String, bool> = HashMap::new();
    let mut visits: BTreeMap<String, (String, V)> = BTreeMap::new(); // visit id -> (person, visit)
    let mut checkins: Vec<(String, C)> = Vec::new();
    let mut erased: BTreeSet<String> = BTreeSet::new();
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        match e["type"].as_str().unwrap() {
            "worker" => {
                workers.insert(s("worker"));
            }
            "person" => {
                share.insert(s("person"), e["consent"]["share_with_coordinator"].as_bool().unwrap());
            }
            "visit" => {
                let v = V {
                    by: s("by"),
                    minutes: e["duration_min"].as_i64().unwrap(),
                    mode: s("mode"),
                    setting: s("setting"),
                    activities: e["activities"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect(),
                };
                visits.insert(s("visit"), (s("person"), v));
            }
            "edit" => {
                if let Some((_, v)) = visits.get_mut(&s("visit")) {
                    let set = &e["set"];
                    if let Some(m) = set["duration_min"].as_i64() {
                        v.minutes = m;
                    }
                    if let Some(m) = set["mode"].as_str() {
                        v.mode = m.to_string();
                    }
                    if let Some(m) = set["setting"].as_str() {
                        v.setting = m.to_string();
                    }
                    if let Some(a) = set["activities"].as_array() {
                        v.activities = a.iter().map(|a| a.as_str().unwrap().to_string()).collect();
                    }
                }
            }
            "checkin" => {
                let d = ["distress", "coping", "social_support", "self_efficacy", "quality_of_life"].map(|k| e[k].as_i64().unwrap());
                let wellbeing = e["wellbeing"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).sum();
                checkins.push((s("person"), C { by: s("by"), at: s("at"), id: s("checkin"), wellbeing, d }));
            }
            "consent" => {
                if let Some(b) = e["set"]["share_with_coordinator"].as_bool() {
                    share.insert(s("person"), b);
                }
            }
            "erase" => {
                erased.insert(s("person"));
            }
            _ => {}
        }
    }
    #[derive(Default)]
    struct Tally { visits: i64, minutes: i64, people: BTreeSet<String>, checkins: i64, by_mode: BTreeMap<String, i64>, by_setting: BTreeMap<String, i64>, by_activity: BTreeMap<String, i64> }
    let mut per: BTreeMap<String, Tally> = workers.iter().map(|w| (w.clone(), Tally::default())).collect();
    let mut people = BTreeSet::new();
    for (person, v) in visits.values().filter(|(p, _)| !erased.contains(p)) {
        let w = per.entry(v.by.clone()).or_default();
        w.visits += 1;
        w.minutes += v.minutes;
        *w.by_mode.entry(v.mode.clone()).or_default() += 1;
        *w.by_setting.entry(v.setting.clone()).or_default() += 1;
        for a in &v.activities {
            *w.by_activity.entry(a.clone()).or_default() += 1;
        }
        if share[person] {
            w.people.insert(person.clone());
            people.insert(person.clone());
        }
    }
    let mut by_person: BTreeMap<String, Vec<&C>> = BTreeMap::new();
    for (person, c) in checkins.iter().filter(|(p, _)| !erased.contains(p)) {
        per.entry(c.by.clone()).or_default().checkins += 1;
        by_person.entry(person.clone()).or_default().push(c);
    }
    let mut changes = Vec::new();
    for (person, mut cs) in by_person {
        if share[&person] && cs.len() >= 2 {
            cs.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
            let (f, l) = (cs[0], cs[cs.len() - 1]);
            changes.push((l.wellbeing - f.wellbeing, [0, 1, 2, 3, 4].map(|i| l.d[i] - f.d[i])));
        }
    }
    let n = changes.len();
    let mean = |xs: Vec<i64>| if n == 0 { Value::Null } else { json!((xs.iter().sum::<i64>() as f64 / n as f64 * 100.0).round() / 100.0) };
    let mut totals = (0, 0, 0);
    let mut wj = serde_json::Map::new();
    for (id, w) in per {
        totals.0 += w.visits;
        totals.1 += w.minutes;
        totals.2 += w.checkins;
        wj.insert(id, json!({ "visits": w.visits, "minutes": w.minutes, "people": w.people.len(), "checkins": w.checkins, "by_mode": w.by_mode, "by_setting": w.by_setting, "by_activity": w.by_activity }));
    }
    let names = ["distress", "coping", "social_support", "self_efficacy", "quality_of_life"];
    let domains: serde_json::Map<String, Value> = names.iter().enumerate().map(|(i, k)| (k.to_string(), mean(changes.iter().map(|c| c.1[i]).collect()))).collect();
    json!({
        "workers": wj,
        "totals": { "visits": totals.0, "minutes": totals.1, "people": people.len(), "checkins": totals.2 },
        "outcomes": { "people": n, "wellbeing_mean_change": mean(changes.iter().map(|c| c.0).collect()),
                      "improved": changes.iter().filter(|c| c.0 >= 3).count(), "no_change": changes.iter().filter(|c| c.0.abs() < 3).count(),
                      "worse": changes.iter().filter(|c| c.0 <= -3).count(), "domains": domains }
    })
}

async fn replay_and_check(args: &[&str]) {
    let text = generate(args);
    let events = scenario::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let outcome = peersync_server::replay::replay(&events, &server.options(), ADMIN_TOKEN, "field", &dir.path().join("phones"), &|_, _| {}).await.unwrap();
    assert!(outcome.problems.is_empty(), "{args:?}: {:#?}", &outcome.problems[..outcome.problems.len().min(20)]);
    assert_eq!(outcome.report, expected_report(&text), "{args:?}");
    assert!(outcome.report["totals"]["visits"].as_u64().unwrap() > 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_scenario_replays_and_its_report_is_right() {
    replay_and_check(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sizes_and_seeds_replay_and_their_reports_are_right() {
    replay_and_check(&["--workers", "5", "--people", "80", "--weeks", "8", "--seed", "7"]).await;
    replay_and_check(&["--workers", "3", "--people", "150", "--weeks", "4", "--seed", "42"]).await;
}

/// Twenty workers over ten weeks: phones record side by side while their syncs keep the
/// scenario's order, and teammates' edits of what they received still find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_team_replays_and_its_report_is_right() {
    replay_and_check(&["--workers", "20", "--people", "600", "--weeks", "10", "--seed", "7"]).await;
}

/// A replay whose connections are cut part-way stops with the sync's error; it neither hangs
/// nor reports success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_loses_the_server_stops_with_an_error() {
    let text = generate(&[]);
    let events = scenario::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let proxy = CuttingProxy::start(server.addr).await;
    // Every worker joins first; once a tenth of the events are done, connections opened from
    // then on are cut at once, so the next sync fails.
    let cut = |done: usize, total: usize| {
        if done > total / 10 {
            proxy.cut_after(Some(0));
        }
    };
    let replayed = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        peersync_server::replay::replay(&events, &proxy.options(), ADMIN_TOKEN, "field", &dir.path().join("phones"), &cut),
    )
    .await
    .expect("the replay stops within two minutes");
    let err = replayed.err().expect("a replay that lost its server fails");
    // Almost always a phone's sync meets the cut; if every phone happened to be idle before
    // an erasure, the erasure's request does.
    use peersync_server::replay::ReplayError;
    assert!(matches!(err, ReplayError::SyncAt { .. } | ReplayError::Sync(_)), "{err}");
    server.stop().await;
}

/// Events that cannot be recorded are reported, each with its line in the file and in the
/// scenario's order, and the rest of the replay still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_cannot_be_recorded_are_reported_in_order() {
    let text = generate(&["--workers", "5", "--people", "80", "--weeks", "8", "--seed", "7"]);
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let consent = lines.iter().position(|e| e["type"] == "consent").unwrap();
    lines[consent]["set"] = json!({ "colour": true });
    let visit = lines.iter().rposition(|e| e["type"] == "visit").unwrap();
    let mut stranger = lines[visit].clone();
    stranger["by"] = json!("w-999");
    let mut unknown = lines[visit].clone();
    unknown["person"] = json!("p-99999");
    unknown["visit"] = json!("v-unknown");
    lines.insert(visit + 1, unknown);
    lines.insert(visit + 1, stranger);
    let text: String = lines.iter().map(|e| format!("{e}\n")).collect();
    let events = scenario::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let outcome = peersync_server::replay::replay(&events, &server.options(), ADMIN_TOKEN, "field", &dir.path().join("phones"), &|_, _| {}).await.unwrap();
    let by = lines[visit]["by"].as_str().unwrap();
    assert_eq!(
        outcome.problems,
        [
            format!("line {}: unknown consent field \"colour\"", consent + 1),
            format!("line {}: no worker \"w-999\" joined before it", visit + 2),
            format!("line {} ({by}): no person with id \"p-99999\" on this device", visit + 3),
        ],
    );
    server.stop().await;
}

/// Amendments may set any field of a visit, not only those `generate.py` happens to edit:
/// mode, setting, activities, goals, referrals and the start time replay, and the report
/// counts each visit as last edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_any_visit_field_replay_and_count_as_last_edited() {
    let text = generate(&["--workers", "3", "--people", "20", "--weeks", "4", "--seed", "5"]);
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let visits: Vec<usize> = lines.iter().enumerate().filter(|(_, e)| e["type"] == "visit").map(|(i, _)| i).take(4).collect();
    assert_eq!(visits.len(), 4);
    // Each amended by its author right after recording it; later positions first, so the
    // indexes stay valid.
    let sets = [
        json!({ "activities": ["education", "navigation"], "mode": "video" }),
        json!({ "setting": "online", "goals": ["housing"], "referrals": ["food_bank", "legal_aid"] }),
        json!({ "started_at": "2026-01-06T07:15:00Z", "activities": ["advocacy"] }),
        json!({ "duration_min": 5, "mode": "group", "setting": "employment" }),
    ];
    for (i, set) in visits.iter().zip(sets).rev() {
        let v = &lines[*i];
        let edit = json!({ "type": "edit", "at": v["at"], "by": v["by"], "person": v["person"], "visit": v["visit"], "set": set });
        lines.insert(i + 1, edit);
    }
    let text: String = lines.iter().map(|e| format!("{e}\n")).collect();
    let events = scenario::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let outcome = peersync_server::replay::replay(&events, &server.options(), ADMIN_TOKEN, "field", &dir.path().join("phones"), &|_, _| {}).await.unwrap();
    assert!(outcome.problems.is_empty(), "{:#?}", outcome.problems);
    assert_eq!(outcome.report, expected_report(&text));
    let first = &lines[visits[0]];
    let by = first["by"].as_str().unwrap();
    assert!(outcome.report["workers"][by]["by_activity"]["navigation"].as_u64().unwrap() >= 1);
    server.stop().await;
}

/// `peersync simulate` writes scenarios in the same format and by the same rules: they replay
/// cleanly too, and the report matches the independent computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_scenarios_replay_and_their_reports_are_right() {
    for (workers, people, weeks, seed) in [(8, 120, 10, 3), (2, 40, 6, 9)] {
        let events = peersync_server::simulate::simulate(&peersync_server::simulate::Params { workers, people, weeks, seed });
        let text = peersync_server::simulate::to_jsonl(&events);
        // The format is generate.py's: every line parses with the same reader.
        assert_eq!(scenario::parse(&text).unwrap(), events);
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(&dir.path().join("server")).await;
        let outcome = peersync_server::replay::replay(&events, &server.options(), ADMIN_TOKEN, "sim", &dir.path().join("phones"), &|_, _| {}).await.unwrap();
        assert!(outcome.problems.is_empty(), "{:#?}", &outcome.problems[..outcome.problems.len().min(20)]);
        assert_eq!(outcome.report, expected_report(&text));
        assert!(outcome.report["totals"]["visits"].as_u64().unwrap() > 0);
        server.stop().await;
    }
}

/// The command itself, as the README runs it: `peersync replay FILE --report OUT` exits 0 and
/// writes the report; a scenario with a problem exits 1 naming its line; a missing file is an
/// error that says so.
#[test]
fn the_replay_command_writes_its_report_and_fails_with_the_line_at_fault() {
    const BIN: &str = env!("CARGO_BIN_EXE_server_process");
    let dir = tempfile::tempdir().unwrap();
    let text = generate(&["--workers", "3", "--people", "20", "--weeks", "2", "--seed", "11"]);
    let file = dir.path().join("field.jsonl");
    std::fs::write(&file, &text).unwrap();
    let report = dir.path().join("report.json");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(BIN).arg("replay").args(args).env("PEERSYNC_LOG", "warn").output().expect("the command runs")
    };
    let out = run(&[file.as_os_str(), "--report".as_ref(), report.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("all devices converged"), "{stderr}");
    let written: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(written, expected_report(&text));

    // A visit by a worker who never joined: reported with its line, exit status 1.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let visit = lines.iter().position(|l| l.starts_with("{\"type\":\"visit\"")).unwrap();
    lines[visit] = lines[visit].replacen("\"by\":\"w-", "\"by\":\"x-", 1);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let out = run(&[bad.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("line {}", visit + 1)), "{stderr}");

    let out = run(&[dir.path().join("missing.jsonl").as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"), "{}", String::from_utf8_lossy(&out.stderr));
}
