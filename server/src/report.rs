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
use chrono::{DateTime, NaiveDate, Utc};
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// One row per visit in `period`. People who do not consent to share with coordinators are
/// counted, as in the report, but not identified: their person column is empty.
pub fn visits_csv(rows: &[(String, ViewRow)], period: Period) -> String {
    let mut out = String::from("person,visit,worker,started_at,duration_min,mode,setting,activities,goals,referrals\n");
    for (person, row) in rows {
        let who = if row.share_with_coordinator { person.as_str() } else { "" };
        for v in row.visits.iter().filter(|v| period.contains(v.started_at)) {
            let fields = [
                who.to_string(),
                if row.share_with_coordinator { v.id.clone() } else { String::new() },
                v.by.clone(),
                v.started_at.to_rfc3339(),
                v.duration_min.to_string(),
                v.mode.clone(),
                v.setting.clone(),
                v.activities.join(";"),
                v.goals.join(";"),
                v.referrals.join(";"),
            ];
            out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
    }
    out
}

/// One row per check-in in `period`; outcome fields only for people who consent to share.
pub fn checkins_csv(rows: &[(String, ViewRow)], period: Period) -> String {
    let mut out = String::from(
        "person,checkin,worker,taken_at,wellbeing_sum,distress,coping,social_support,self_efficacy,quality_of_life,housing,employment,hospital_nights_28d,substance_use_days_28d\n",
    );
    for (person, row) in rows {
        for c in row.checkins.iter().filter(|c| period.contains(c.taken_at)) {
            let fields: Vec<String> = if row.share_with_coordinator {
                vec![
                    person.clone(),
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
                ]
            } else {
                let mut f = vec![String::new(), String::new(), c.by.clone(), c.taken_at.to_rfc3339()];
                f.resize(14, String::new());
                f
            };
            out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
    }
    out
}

/// The same rows as JSON: `{ "visits": [...], "checkins": [...] }`, consent honoured as in the CSV.
pub fn export_json(rows: &[(String, ViewRow)], period: Period) -> Value {
    let mut visits = Vec::new();
    let mut checkins = Vec::new();
    for (person, row) in rows {
        let share = row.share_with_coordinator;
        for v in row.visits.iter().filter(|v| period.contains(v.started_at)) {
            visits.push(json!({
                "person": share.then_some(person), "visit": share.then_some(&v.id), "worker": v.by,
                "started_at": v.started_at, "duration_min": v.duration_min, "mode": v.mode, "setting": v.setting,
                "activities": v.activities, "goals": v.goals, "referrals": v.referrals,
            }));
        }
        for c in row.checkins.iter().filter(|c| period.contains(c.taken_at)) {
            checkins.push(if share {
                json!({ "person": person, "checkin": c.id, "worker": c.by, "taken_at": c.taken_at,
                        "wellbeing": c.wellbeing, "distress": c.distress, "coping": c.coping,
                        "social_support": c.social_support, "self_efficacy": c.self_efficacy,
                        "quality_of_life": c.quality_of_life, "housing": c.housing, "employment": c.employment,
                        "hospital_nights_28d": c.hospital_nights_28d, "substance_use_days_28d": c.substance_use_days_28d })
            } else {
                json!({ "person": null, "checkin": null, "worker": c.by, "taken_at": c.taken_at })
            });
        }
    }
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
