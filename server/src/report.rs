//! Reports that fit peer values: contacts made, the kinds of support given, and the outcomes
//! people themselves report, never more about a person than their consent allows.
//!
//! The server keeps a materialised view: one compact row per person (their current consent,
//! visits and check-ins without notes or alias), sealed with the person's key, so erasure
//! removes it with the rest. A write marks its person's row due; due rows are computed from
//! the stored document in the background or, at the latest, when a report asks
//! (`DocHub::refresh_views`). Reports then read the rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::Automerge;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitRow {
    pub id: String,
    pub by: String,
    pub started_at: DateTime<Utc>,
    pub duration_min: u32,
    pub mode: String,
    pub setting: String,
    pub activities: Vec<String>,
    pub goals: Vec<String>,
    pub referrals: Vec<String>,
}

/// Check-ins hold no free text: the view keeps them as recorded.
pub type CheckinRow = peersync_core::Checkin;

/// A person's row in the view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewRow {
    pub share_with_coordinator: bool,
    pub visits: Vec<VisitRow>,
    pub checkins: Vec<CheckinRow>,
}

/// The view row of a document, encoded; `None` if the document has no readable profile yet.
pub fn row_bytes(doc: &str, am: &Automerge) -> Option<Vec<u8>> {
    let r = peersync_core::document::read_record(doc, am).ok()?;
    let row = ViewRow {
        share_with_coordinator: r.consent.share_with_coordinator,
        visits: r
            .visits
            .into_iter()
            .map(|v| VisitRow {
                id: v.id,
                by: v.by,
                started_at: v.started_at,
                duration_min: v.duration_min,
                mode: v.mode,
                setting: v.setting,
                activities: v.activities,
                goals: v.goals,
                referrals: v.referrals,
            })
            .collect(),
        checkins: r.checkins,
    };
    postcard::to_allocvec(&row).ok()
}

pub fn decode_row(bytes: &[u8]) -> Option<ViewRow> {
    postcard::from_bytes(bytes).ok()
}

/// The period a report covers: `[from, to)` by date (UTC); open ends are unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Period {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

impl Period {
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let d = t.date_naive();
        self.from.is_none_or(|f| d >= f) && self.to.is_none_or(|to| d < to)
    }
}

#[derive(Default)]
struct WorkerTotals {
    visits: u64,
    minutes: u64,
    people: BTreeSet<String>,
    checkins: u64,
    by_mode: BTreeMap<String, u64>,
    by_setting: BTreeMap<String, u64>,
    by_activity: BTreeMap<String, u64>,
}

const DOMAINS: [&str; 5] = ["distress", "coping", "social_support", "self_efficacy", "quality_of_life"];

/// A person's change from their first to their last check-in: the total, then each of [`DOMAINS`].
type WellbeingChange = (i64, [i64; 5]);

fn domain(c: &CheckinRow, name: &str) -> i64 {
    (match name {
        "distress" => c.distress,
        "coping" => c.coping,
        "social_support" => c.social_support,
        "self_efficacy" => c.self_efficacy,
        _ => c.quality_of_life,
    }) as i64
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The last `weeks` weeks (Monday to Monday, UTC) up to the week of the latest visit, or of
/// `now` if there is none or the latest lies in the future (a mistyped year would otherwise
/// show only empty weeks): each week's report.
pub fn weekly(workers: &[String], rows: &[(String, ViewRow)], weeks: u32, now: DateTime<Utc>) -> Value {
    let latest = rows.iter().flat_map(|(_, r)| r.visits.iter().map(|v| v.started_at)).filter(|t| *t <= now).max().unwrap_or(now);
    let day = latest.date_naive();
    let next_monday = day + chrono::Days::new(7 - u64::from(day.weekday().num_days_from_monday()));
    let out: Vec<Value> = (1..=u64::from(weeks))
        .rev()
        .map(|i| {
            let from = next_monday - chrono::Days::new(7 * i);
            let to = from + chrono::Days::new(7);
            json!({ "from": from, "to": to, "report": report(workers, rows, Period { from: Some(from), to: Some(to) }) })
        })
        .collect();
    json!({ "weeks": out })
}

/// The coordinator report over `rows` (erased people have no row), for every worker in
/// `workers` (and anyone else who recorded something), in `period`.
pub fn report(workers: &[String], rows: &[(String, ViewRow)], period: Period) -> Value {
    let mut per: BTreeMap<String, WorkerTotals> = workers.iter().map(|w| (w.clone(), WorkerTotals::default())).collect();
    let mut all_people = BTreeSet::new();
    let mut changes: Vec<WellbeingChange> = Vec::new();
    for (person, row) in rows {
        for v in row.visits.iter().filter(|v| period.contains(v.started_at)) {
            let w = per.entry(v.by.clone()).or_default();
            w.visits += 1;
            w.minutes += v.duration_min as u64;
            *w.by_mode.entry(v.mode.clone()).or_default() += 1;
            *w.by_setting.entry(v.setting.clone()).or_default() += 1;
            for a in &v.activities {
                *w.by_activity.entry(a.clone()).or_default() += 1;
            }
            if row.share_with_coordinator {
                w.people.insert(person.clone());
                all_people.insert(person.clone());
            }
        }
        let mut cs: Vec<&CheckinRow> = row.checkins.iter().filter(|c| period.contains(c.taken_at)).collect();
        for c in &cs {
            per.entry(c.by.clone()).or_default().checkins += 1;
        }
        if row.share_with_coordinator && cs.len() >= 2 {
            cs.sort_by(|a, b| a.taken_at.cmp(&b.taken_at).then_with(|| a.id.cmp(&b.id)));
            let (first, last) = (cs[0], cs[cs.len() - 1]);
            let sum = |c: &CheckinRow| c.wellbeing.iter().map(|x| *x as i64).sum::<i64>();
            let mut d = [0i64; 5];
            for (i, name) in DOMAINS.iter().enumerate() {
                d[i] = domain(last, name) - domain(first, name);
            }
            changes.push((sum(last) - sum(first), d));
        }
    }
    let mut totals = json!({ "visits": 0, "minutes": 0, "people": all_people.len(), "checkins": 0 });
    let mut workers_json = serde_json::Map::new();
    for (id, w) in per {
        totals["visits"] = json!(totals["visits"].as_u64().unwrap_or(0) + w.visits);
        totals["minutes"] = json!(totals["minutes"].as_u64().unwrap_or(0) + w.minutes);
        totals["checkins"] = json!(totals["checkins"].as_u64().unwrap_or(0) + w.checkins);
        workers_json.insert(
            id,
            json!({ "visits": w.visits, "minutes": w.minutes, "people": w.people.len(), "checkins": w.checkins,
                    "by_mode": w.by_mode, "by_setting": w.by_setting, "by_activity": w.by_activity }),
        );
    }
    let n = changes.len();
    let mean = |f: &dyn Fn(&WellbeingChange) -> i64| -> Value {
        if n == 0 { Value::Null } else { json!(round2(changes.iter().map(f).sum::<i64>() as f64 / n as f64)) }
    };
    let mut domains = serde_json::Map::new();
    for (i, name) in DOMAINS.iter().enumerate() {
        domains.insert(name.to_string(), mean(&|c| c.1[i]));
    }
    json!({
        "workers": workers_json,
        "totals": totals,
        "outcomes": {
            "people": n,
            "wellbeing_mean_change": mean(&|c| c.0),
            "improved": changes.iter().filter(|c| c.0 >= 3).count(),
            "no_change": changes.iter().filter(|c| c.0 > -3 && c.0 < 3).count(),
            "worse": changes.iter().filter(|c| c.0 <= -3).count(),
            "domains": domains,
        }
    })
}

/// A CSV cell. Quoted where needed, and a cell a spreadsheet would take for a formula (from
/// `=`, `+`, `-`, `@`: a phone's data is untrusted) is prefixed with `'` so it stays text.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

/// A visit or check-in as exports list it.
struct Listed<'a, T> {
    /// `None` for a person who does not consent to share with coordinators.
    person: Option<&'a str>,
    item: &'a T,
}

/// What exports need to place a visit or check-in.
trait Entry {
    fn at(&self) -> DateTime<Utc>;
    fn by(&self) -> &str;
    fn id(&self) -> &str;
    /// What an unnamed row shows besides its day and worker, to order such rows by.
    fn shown(&self) -> String;
}

impl Entry for VisitRow {
    fn at(&self) -> DateTime<Utc> {
        self.started_at
    }
    fn by(&self) -> &str {
        &self.by
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn shown(&self) -> String {
        format!("{:05}|{}|{}|{}", self.duration_min, self.mode, self.setting, self.activities.join(";"))
    }
}

impl Entry for CheckinRow {
    fn at(&self) -> DateTime<Utc> {
        self.taken_at
    }
    fn by(&self) -> &str {
        &self.by
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn shown(&self) -> String {
        String::new()
    }
}

/// When an exported row says it happened: the time, or for a person who does not share with
/// coordinators only the day (all the report goes by). Exact times would let their visits be
/// told apart and followed from week to week, as a calendar of one unnamed person.
fn shown_at(at: DateTime<Utc>, named: bool) -> String {
    if named { at.to_rfc3339() } else { at.date_naive().to_string() }
}

/// The visits (or check-ins: `items` picks) in `period`, in the order exports list them: by
/// time, then worker, then person and id. Not by person id first: the unnamed rows of people
/// who do not share would sit in the gaps between the named ids, and so name them. Unnamed
/// rows go by their day (their exact time would show in their place among named rows).
fn listed<'a, T: Entry>(rows: &'a [(String, ViewRow)], period: Period, items: impl Fn(&'a ViewRow) -> &'a [T]) -> Vec<Listed<'a, T>> {
    let mut out: Vec<Listed<'a, T>> = rows
        .iter()
        .flat_map(|(person, row)| {
            let person = row.share_with_coordinator.then_some(person.as_str());
            items(row).iter().filter(move |i| period.contains(i.at())).map(move |item| Listed { person, item })
        })
        .collect();
    let when = |l: &Listed<'a, T>| match l.person {
        Some(_) => l.item.at(),
        None => l.item.at().date_naive().and_time(chrono::NaiveTime::MIN).and_utc(),
    };
    // Unnamed rows of one day and worker go by what they show: in the order they were read
    // (by person id), the same person would come first every day, and could be followed.
    let key = |l: &Listed<'a, T>| {
        let tie = match l.person {
            Some(_) => l.item.id().to_string(),
            None => l.item.shown(),
        };
        (when(l), l.item.by().to_string(), l.person.is_none(), l.person, tie)
    };
    out.sort_by_cached_key(key);
    out
}

/// One row per visit in `period`. People who do not consent to share with coordinators are
/// counted, as in the report, but not identified: no person or visit id, and no goals or
/// referrals (which the report does not show either).
pub fn visits_csv(rows: &[(String, ViewRow)], period: Period) -> String {
    let mut out = String::from("person,visit,worker,started_at,duration_min,mode,setting,activities,goals,referrals\n");
    for Listed { person, item: v } in listed(rows, period, |r| &r.visits) {
        let shared = |s: String| if person.is_some() { s } else { String::new() };
        let fields = [
            person.unwrap_or_default().to_string(),
            shared(v.id.clone()),
            v.by.clone(),
            shown_at(v.started_at, person.is_some()),
            v.duration_min.to_string(),
            v.mode.clone(),
            v.setting.clone(),
            v.activities.join(";"),
            shared(v.goals.join(";")),
            shared(v.referrals.join(";")),
        ];
        out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// One row per check-in in `period`; outcome fields only for people who consent to share.
pub fn checkins_csv(rows: &[(String, ViewRow)], period: Period) -> String {
    let mut out = String::from(
        "person,checkin,worker,taken_at,wellbeing_sum,distress,coping,social_support,self_efficacy,quality_of_life,housing,employment,hospital_nights_28d,substance_use_days_28d\n",
    );
    for Listed { person, item: c } in listed(rows, period, |r| &r.checkins) {
        let fields: Vec<String> = match person {
            Some(person) => vec![
                person.to_string(),
                c.id.clone(),
                c.by.clone(),
                c.taken_at.to_rfc3339(),
                c.wellbeing.iter().map(|x| *x as u32).sum::<u32>().to_string(),
                c.distress.to_string(),
                c.coping.to_string(),
                c.social_support.to_string(),
                c.self_efficacy.to_string(),
                c.quality_of_life.to_string(),
                c.housing.clone(),
                c.employment.clone(),
                c.hospital_nights_28d.to_string(),
                c.substance_use_days_28d.map(|d| d.to_string()).unwrap_or_default(),
            ],
            None => {
                let mut f = vec![String::new(), String::new(), c.by.clone(), shown_at(c.taken_at, false)];
                f.resize(14, String::new());
                f
            }
        };
        out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// The same rows as JSON: `{ "visits": [...], "checkins": [...] }`, consent honoured and rows
/// ordered as in the CSV.
pub fn export_json(rows: &[(String, ViewRow)], period: Period) -> Value {
    let visits: Vec<Value> = listed(rows, period, |r| &r.visits)
        .into_iter()
        .map(|Listed { person, item: v }| {
            let shared = person.is_some();
            json!({
                "person": person, "visit": shared.then_some(&v.id), "worker": v.by,
                "started_at": if shared { json!(v.started_at) } else { json!(shown_at(v.started_at, false)) }, "duration_min": v.duration_min, "mode": v.mode, "setting": v.setting,
                "activities": v.activities, "goals": shared.then_some(&v.goals), "referrals": shared.then_some(&v.referrals),
            })
        })
        .collect();
    let checkins: Vec<Value> = listed(rows, period, |r| &r.checkins)
        .into_iter()
        .map(|Listed { person, item: c }| match person {
            Some(person) => json!({ "person": person, "checkin": c.id, "worker": c.by, "taken_at": c.taken_at,
                    "wellbeing": c.wellbeing, "distress": c.distress, "coping": c.coping,
                    "social_support": c.social_support, "self_efficacy": c.self_efficacy,
                    "quality_of_life": c.quality_of_life, "housing": c.housing, "employment": c.employment,
                    "hospital_nights_28d": c.hospital_nights_28d, "substance_use_days_28d": c.substance_use_days_28d }),
            None => json!({ "person": null, "checkin": null, "worker": c.by, "taken_at": shown_at(c.taken_at, false) }),
        })
        .collect();
    json!({ "visits": visits, "checkins": checkins })
}

/// Decode an organisation's rows, skipping any that do not decode.
pub fn decode_rows(raw: Vec<(String, Vec<u8>)>) -> Vec<(String, ViewRow)> {
    let mut bad = HashMap::<(), usize>::new();
    let rows: Vec<_> = raw
        .into_iter()
        .filter_map(|(d, b)| match decode_row(&b) {
            Some(r) => Some((d, r)),
            None => {
                *bad.entry(()).or_default() += 1;
                None
            }
        })
        .collect();
    if let Some(n) = bad.get(&()) {
        tracing::warn!(rows = n, "reporting-view rows that do not decode were skipped");
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn visit(id: &str, by: &str, hour: u32) -> VisitRow {
        VisitRow {
            id: id.into(),
            by: by.into(),
            started_at: Utc.with_ymd_and_hms(2026, 3, 1, hour, 0, 0).unwrap(),
            duration_min: 30,
            mode: "phone".into(),
            setting: "home".into(),
            activities: vec!["support".into()],
            goals: vec!["housing".into()],
            referrals: vec!["crisis_team".into()],
        }
    }

    fn row(share: bool, visits: Vec<VisitRow>) -> ViewRow {
        ViewRow { share_with_coordinator: share, visits, checkins: vec![] }
    }

    /// Rows of people who do not share are not identified, and their place in the export does
    /// not name them either: sorted by person id, an unnamed row between p-1 and p-3 is p-2.
    #[test]
    fn exports_order_by_time_and_leave_non_sharing_people_unnamed() {
        let rows = vec![
            ("p-1".to_string(), row(true, vec![visit("v1", "w-1", 9)])),
            ("p-2".to_string(), row(false, vec![visit("v2", "w-1", 11)])),
            ("p-3".to_string(), row(true, vec![visit("v3", "w-1", 10)])),
        ];
        let all = Period { from: None, to: None };
        let csv = visits_csv(&rows, all);
        let lines: Vec<&str> = csv.lines().skip(1).collect();
        // The unnamed row says only its day, and goes by it: first of that day.
        assert_eq!(lines[0], ",,w-1,2026-03-01,30,phone,home,support,,", "no ids, goals, referrals or time of day");
        assert!(lines[1].starts_with("p-1,v1,") && lines[2].starts_with("p-3,v3,"), "{csv}");
        assert!(lines[1].contains(&visit("", "", 9).started_at.to_rfc3339()), "named rows keep their time: {csv}");
        let json = export_json(&rows, all);
        let people: Vec<&Value> = json["visits"].as_array().unwrap().iter().map(|v| &v["person"]).collect();
        assert_eq!(people, [&Value::Null, &json!("p-1"), &json!("p-3")]);
        assert_eq!(json["visits"][0]["started_at"], json!("2026-03-01"));
        assert_eq!(json["visits"][0]["goals"], Value::Null);
        assert_eq!(json["visits"][0]["referrals"], Value::Null);
        assert_eq!(json["visits"][1]["referrals"], json!(["crisis_team"]));
        // Two unnamed people seen by one worker on one day: ordered by what the rows show,
        // not by person id (which would put the same person first every day).
        let mut long = visit("v4", "w-1", 8);
        long.duration_min = 90;
        let rows = vec![("p-4".to_string(), row(false, vec![long])), ("p-5".to_string(), row(false, vec![visit("v5", "w-1", 15)]))];
        let csv = visits_csv(&rows, all);
        let durations: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').nth(4).unwrap()).collect();
        assert_eq!(durations, ["30", "90"], "{csv}");
    }

    /// Weeks run Monday to Monday up to the latest visit's week; a visit dated in the future
    /// (a mistyped year) does not push the weeks past today.
    #[test]
    fn weekly_reports_end_with_the_latest_visit_and_not_in_the_future() {
        // 2026-03-01 is a Sunday: its week began on Monday 2026-02-23.
        let mut late = visit("v9", "w-1", 9);
        late.started_at = Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap();
        let rows = vec![("p-1".to_string(), row(true, vec![visit("v1", "w-1", 9), late]))];
        let now = Utc.with_ymd_and_hms(2026, 3, 4, 12, 0, 0).unwrap();
        let w = weekly(&["w-1".to_string()], &rows, 3, now);
        let weeks = w["weeks"].as_array().unwrap();
        let spans: Vec<(&str, &str)> = weeks.iter().map(|x| (x["from"].as_str().unwrap(), x["to"].as_str().unwrap())).collect();
        assert_eq!(spans, [("2026-02-09", "2026-02-16"), ("2026-02-16", "2026-02-23"), ("2026-02-23", "2026-03-02")]);
        assert_eq!(weeks[2]["report"]["workers"]["w-1"]["visits"], json!(1));
        assert_eq!(weeks[0]["report"]["totals"]["visits"], json!(0));
        // Nothing recorded: the weeks up to today's.
        let w = weekly(&["w-1".to_string()], &[], 1, now);
        assert_eq!(w["weeks"][0]["from"], json!("2026-03-02"));
    }

    /// A phone's data is untrusted: text a spreadsheet would run as a formula stays text.
    #[test]
    fn csv_cells_never_start_a_formula() {
        assert_eq!(csv_field("=HYPERLINK(\"http://x\",\"y\")"), "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("in_person"), "in_person");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
