//! Field scenarios: the JSON Lines event stream peer workers' phones produce (the format of
//! the product lead's `generate.py`: workers, people, visits, check-ins, edits, consent changes,
//! erasures and syncs), and how each event becomes a call on a device.

use chrono::{DateTime, NaiveDate, Utc};
use peersync_core::{ConsentChange, NewCheckin, NewPerson, NewVisit, VisitEdit};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentSet {
    pub record: bool,
    pub share_with_coordinator: bool,
    pub research: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Worker { #[serde(deserialize_with = "time")] at: DateTime<Utc>, worker: String, name: String, role: String },
    Person {
        #[serde(deserialize_with = "time")]
        at: DateTime<Utc>,
        by: String,
        person: String,
        alias: String,
        year_of_birth: i32,
        workers: Vec<String>,
        consent: ConsentSet,
    },
    Visit {
        #[serde(deserialize_with = "time")]
        at: DateTime<Utc>,
        by: String,
        person: String,
        visit: String,
        #[serde(deserialize_with = "time")]
        started_at: DateTime<Utc>,
        duration_min: u32,
        mode: String,
        setting: String,
        activities: Vec<String>,
        goals: Vec<String>,
        referrals: Vec<String>,
        notes: String,
        #[serde(default, deserialize_with = "date_or_null")]
        follow_up: Option<NaiveDate>,
    },
    Checkin {
        #[serde(deserialize_with = "time")]
        at: DateTime<Utc>,
        by: String,
        person: String,
        checkin: String,
        wellbeing: Vec<u8>,
        distress: u8,
        coping: u8,
        social_support: u8,
        self_efficacy: u8,
        quality_of_life: u8,
        housing: String,
        employment: String,
        hospital_nights_28d: u32,
        substance_use_days_28d: Option<u32>,
    },
    Edit { #[serde(deserialize_with = "time")] at: DateTime<Utc>, by: String, person: String, visit: String, set: serde_json::Map<String, serde_json::Value> },
    Consent { #[serde(deserialize_with = "time")] at: DateTime<Utc>, by: String, person: String, set: serde_json::Map<String, serde_json::Value> },
    Erase { #[serde(deserialize_with = "time")] at: DateTime<Utc>, by: String, person: String },
    Sync { #[serde(deserialize_with = "time")] at: DateTime<Utc>, by: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("cannot read the scenario: {0}")]
    Io(#[from] std::io::Error),
}

impl Event {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Event::Worker { at, .. }
            | Event::Person { at, .. }
            | Event::Visit { at, .. }
            | Event::Checkin { at, .. }
            | Event::Edit { at, .. }
            | Event::Consent { at, .. }
            | Event::Erase { at, .. }
            | Event::Sync { at, .. } => *at,
        }
    }

    /// The worker whose phone the event happens on (`None` for workers joining and erasures,
    /// which happen on the server).
    pub fn phone(&self) -> Option<&str> {
        match self {
            Event::Person { by, .. } | Event::Visit { by, .. } | Event::Checkin { by, .. } | Event::Edit { by, .. } | Event::Consent { by, .. } | Event::Sync { by, .. } => Some(by),
            Event::Worker { .. } | Event::Erase { .. } => None,
        }
    }

    /// The person a phone event is about.
    pub fn person(&self) -> Option<&str> {
        match self {
            Event::Person { person, .. } | Event::Visit { person, .. } | Event::Checkin { person, .. } | Event::Edit { person, .. } | Event::Consent { person, .. } => Some(person),
            Event::Worker { .. } | Event::Erase { .. } | Event::Sync { .. } => None,
        }
    }

    pub fn new_person(&self) -> Option<NewPerson> {
        let Event::Person { person, alias, year_of_birth, workers, consent, by, .. } = self else { return None };
        Some(NewPerson {
            id: Some(person.clone()),
            alias: alias.clone(),
            year_of_birth: *year_of_birth,
            workers: workers.iter().filter(|w| *w != by).cloned().collect(),
            record: consent.record,
            share_with_coordinator: consent.share_with_coordinator,
            research: consent.research,
        })
    }

    pub fn new_visit(&self) -> Option<NewVisit> {
        let Event::Visit { visit, started_at, duration_min, mode, setting, activities, goals, referrals, notes, follow_up, .. } = self else { return None };
        Some(NewVisit {
            id: Some(visit.clone()),
            started_at: *started_at,
            duration_min: *duration_min,
            mode: mode.clone(),
            setting: setting.clone(),
            activities: activities.clone(),
            goals: goals.clone(),
            referrals: referrals.clone(),
            notes: notes.clone(),
            follow_up: *follow_up,
        })
    }

    pub fn new_checkin(&self) -> Option<NewCheckin> {
        let Event::Checkin { at, checkin, wellbeing, distress, coping, social_support, self_efficacy, quality_of_life, housing, employment, hospital_nights_28d, substance_use_days_28d, .. } = self else { return None };
        Some(NewCheckin {
            id: Some(checkin.clone()),
            taken_at: Some(*at),
            wellbeing: wellbeing.clone(),
            distress: *distress,
            coping: *coping,
            social_support: *social_support,
            self_efficacy: *self_efficacy,
            quality_of_life: *quality_of_life,
            housing: housing.clone(),
            employment: employment.clone(),
            hospital_nights_28d: *hospital_nights_28d,
            substance_use_days_28d: *substance_use_days_28d,
        })
    }

    /// The amendment an `edit` event makes. Unknown fields are an error, not ignored.
    pub fn visit_edit(&self) -> Option<Result<VisitEdit, String>> {
        let Event::Edit { set, .. } = self else { return None };
        Some(edit_from(set))
    }

    pub fn consent_change(&self) -> Option<Result<ConsentChange, String>> {
        let Event::Consent { set, .. } = self else { return None };
        let mut c = ConsentChange::default();
        for (k, v) in set {
            let Some(b) = v.as_bool() else { return Some(Err(format!("consent {k} must be true or false"))) };
            match k.as_str() {
                "record" => c.record = Some(b),
                "share_with_coordinator" => c.share_with_coordinator = Some(b),
                "research" => c.research = Some(b),
                other => return Some(Err(format!("unknown consent field {other:?}"))),
            }
        }
        Some(Ok(c))
    }
}

fn edit_from(set: &serde_json::Map<String, serde_json::Value>) -> Result<VisitEdit, String> {
    let mut e = VisitEdit::default();
    for (k, v) in set {
        let bad = || format!("edit sets {k} to {v}, which is not valid");
        let text = || v.as_str().map(str::to_string).ok_or_else(bad);
        let list = || -> Result<Vec<String>, String> { v.as_array().ok_or_else(bad)?.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(bad)).collect() };
        match k.as_str() {
            "notes" => e.notes = Some(text()?),
            "started_at" => e.started_at = Some(DateTime::parse_from_rfc3339(&text()?).map_err(|_| bad())?.with_timezone(&Utc)),
            "activities" => e.activities = Some(list()?),
            "goals" => e.goals = Some(list()?),
            "referrals" => e.referrals = Some(list()?),
            "mode" => e.mode = Some(text()?),
            "setting" => e.setting = Some(text()?),
            "duration_min" => e.duration_min = Some(v.as_u64().and_then(|d| u32::try_from(d).ok()).ok_or_else(bad)?),
            "follow_up" => {
                e.follow_up = Some(match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad())?),
                    _ => return Err(bad()),
                })
            }
            other => return Err(format!("edit of unknown field {other:?}")),
        }
    }
    Ok(e)
}

/// A time as the format has it (RFC 3339), with an error that says what was expected.
fn time<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        // chrono's own reading takes a few more spellings ("+0530", years past 9999).
        .or_else(|_| s.parse::<DateTime<Utc>>())
        .map_err(|e| D::Error::custom(format!("{s:?} is not a time such as \"2026-01-05T08:00:00Z\" (RFC 3339: {e})")))
}

/// A date (`YYYY-MM-DD`) or null.
fn date_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else { return Ok(None) };
    NaiveDate::parse_from_str(&s, "%Y-%m-%d").map(Some).map_err(|e| D::Error::custom(format!("{s:?} is not a date such as \"2026-01-05\" ({e})")))
}

/// What was wrong with a line, without serde's position inside it (always line 1 of the
/// one-line text); a line that is not JSON at all says so.
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = text.rsplit_once(" at line ").map_or(text.as_str(), |(what, _)| what);
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!("not a JSON object: {what} (column {})", e.column()),
        _ => what.to_string(),
    }
}

/// Parse a scenario, one event per line; blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Event>, ScenarioError> {
    Ok(parse_numbered(text)?.into_iter().map(|(_, e)| e).collect())
}

/// [`parse`], with each event's line number (from 1).
pub fn parse_numbered(text: &str) -> Result<Vec<(usize, Event)>, ScenarioError> {
    // A byte-order mark, as some editors write, is not part of the first event.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map(|e| (i + 1, e)).map_err(|e| ScenarioError::Line { line: i + 1, reason: reason(&e) }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn parses_every_event_type() {
        let text = r#"{"type":"worker","at":"2026-01-04T08:00:00Z","worker":"w-001","name":"Worker 1","role":"peer_support_worker"}
{"type":"person","at":"2026-01-05T10:00:00Z","by":"w-001","person":"p-00001","alias":"KM-00001","year_of_birth":1980,"workers":["w-001","w-002"],"consent":{"record":true,"share_with_coordinator":true,"research":false}}
{"type":"visit","at":"2026-01-06T10:00:00Z","by":"w-001","person":"p-00001","visit":"v1","started_at":"2026-01-06T09:00:00Z","duration_min":45,"mode":"phone","setting":"home","activities":["support"],"goals":[],"referrals":[],"notes":"n","follow_up":null}
{"type":"checkin","at":"2026-01-06T10:05:00Z","by":"w-001","person":"p-00001","checkin":"c1","wellbeing":[1,2,3,4,5,1,2],"distress":3,"coping":3,"social_support":3,"self_efficacy":3,"quality_of_life":3,"housing":"stable","employment":"training","hospital_nights_28d":0,"substance_use_days_28d":null}
{"type":"edit","at":"2026-01-07T10:00:00Z","by":"w-002","person":"p-00001","visit":"v1","set":{"follow_up":"2026-01-10","activities":["support","advocacy"],"started_at":"2026-01-06T08:30:00Z"}}
{"type":"consent","at":"2026-01-08T10:00:00Z","by":"w-001","person":"p-00001","set":{"share_with_coordinator":false}}
{"type":"erase","at":"2026-01-09T10:00:00Z","by":"coordinator","person":"p-00001"}
{"type":"sync","at":"2026-01-09T11:00:00Z","by":"w-001"}
"#;
        let events = parse(text).unwrap();
        assert_eq!(events.len(), 8);
        assert_eq!(events[1].new_person().unwrap().workers, ["w-002"]);
        assert_eq!(events[2].new_visit().unwrap().duration_min, 45);
        assert_eq!(events[3].new_checkin().unwrap().substance_use_days_28d, None);
        let edit = events[4].visit_edit().unwrap().unwrap();
        assert_eq!(edit.follow_up, Some(NaiveDate::from_ymd_opt(2026, 1, 10)));
        assert_eq!(edit.activities.as_deref(), Some(&["support".to_string(), "advocacy".to_string()][..]));
        assert_eq!(edit.started_at, Some(Utc.with_ymd_and_hms(2026, 1, 6, 8, 30, 0).unwrap()));
        let bad: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"goals":"housing"}"#).unwrap();
        assert!(edit_from(&bad).unwrap_err().contains("goals"), "a list field given a string is refused");
        assert_eq!(events[5].consent_change().unwrap().unwrap().share_with_coordinator, Some(false));
        assert_eq!(events[6].phone(), None);
        assert!(matches!(parse("{\"type\":\"visit\"}"), Err(ScenarioError::Line { line: 1, .. })));
        // A byte-order mark is skipped; errors name the line, and what was expected.
        assert_eq!(parse(&format!("\u{feff}{}", text.lines().next().unwrap())).unwrap().len(), 1);
        let err = |t: &str| parse(t).unwrap_err().to_string();
        let yesterday = err(&text.lines().next().unwrap().replace("2026-01-04T08:00:00Z", "yesterday"));
        assert!(yesterday.starts_with("line 1: ") && yesterday.contains("\"yesterday\" is not a time such as"), "{yesterday}");
        let bad_date = err(&format!("\n{}", text.lines().nth(2).unwrap().replace("\"follow_up\":null", "\"follow_up\":\"2026-13-45\"")));
        assert!(bad_date.starts_with("line 2: ") && bad_date.contains("\"2026-13-45\" is not a date"), "{bad_date}");
        let not_json = err(&format!("{}\nnot json", text.lines().last().unwrap()));
        assert!(not_json.starts_with("line 2: not a JSON object: ") && !not_json.contains("at line 1"), "{not_json}");
    }
}
