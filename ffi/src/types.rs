//! Records for the domain types, as the apps see them, and their conversions to and from the
//! core's. Instants are UniFFI timestamps (Kotlin `Instant`, Swift `Date`, Python `datetime`);
//! calendar dates (follow-ups) are ISO `YYYY-MM-DD` strings, since no binding has a standard
//! date-only type UniFFI maps to.

use std::time::SystemTime;

use chrono::{DateTime, NaiveDate, Utc};
use peersync_core as core;

use crate::error::PeersyncError;

fn instant(t: DateTime<Utc>) -> SystemTime {
    t.into()
}

/// An instant from the app, refused (not a panic) outside the range dates can hold.
pub(crate) fn utc(field: &str, t: SystemTime) -> Result<DateTime<Utc>, PeersyncError> {
    let out_of_range = || PeersyncError::Invalid(format!("invalid `{field}`: the instant is out of range"));
    let (secs, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).map_err(|_| out_of_range())?, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).map_err(|_| out_of_range())?;
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    };
    DateTime::from_timestamp(secs, nanos).ok_or_else(out_of_range)
}

fn iso(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

/// Parse a `YYYY-MM-DD` date given for `field`.
pub(crate) fn parse_date(field: &str, s: &str) -> Result<NaiveDate, PeersyncError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| PeersyncError::Invalid(format!("invalid `{field}`: {s:?} is not a date as YYYY-MM-DD")))
}

fn parse_opt_date(field: &str, s: Option<String>) -> Result<Option<NaiveDate>, PeersyncError> {
    s.map(|s| parse_date(field, &s)).transpose()
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Person {
    pub id: String,
    /// What the team calls the person; never their legal name.
    pub alias: String,
    pub year_of_birth: i32,
    /// Worker ids assigned to the person.
    pub workers: Vec<String>,
    pub created_by: String,
    pub created_at: SystemTime,
}

impl From<core::Person> for Person {
    fn from(p: core::Person) -> Self {
        Self {
            id: p.id,
            alias: p.alias,
            year_of_birth: p.year_of_birth,
            workers: p.workers,
            created_by: p.created_by,
            created_at: instant(p.created_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Consent {
    /// The person agrees to a record being kept at all.
    pub record: bool,
    /// Coordinators may see this person's contacts and outcomes in reports.
    pub share_with_coordinator: bool,
    /// De-identified use for research.
    pub research: bool,
    pub updated_at: SystemTime,
}

impl From<core::Consent> for Consent {
    fn from(c: core::Consent) -> Self {
        Self {
            record: c.record,
            share_with_coordinator: c.share_with_coordinator,
            research: c.research,
            updated_at: instant(c.updated_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Visit {
    pub id: String,
    /// Worker who recorded it.
    pub by: String,
    pub started_at: SystemTime,
    pub duration_min: u32,
    pub mode: String,
    pub setting: String,
    pub activities: Vec<String>,
    pub goals: Vec<String>,
    pub referrals: Vec<String>,
    pub notes: String,
    /// `YYYY-MM-DD`.
    pub follow_up: Option<String>,
    pub recorded_at: SystemTime,
}

impl From<core::Visit> for Visit {
    fn from(v: core::Visit) -> Self {
        Self {
            id: v.id,
            by: v.by,
            started_at: instant(v.started_at),
            duration_min: v.duration_min,
            mode: v.mode,
            setting: v.setting,
            activities: v.activities,
            goals: v.goals,
            referrals: v.referrals,
            notes: v.notes,
            follow_up: v.follow_up.map(iso),
            recorded_at: instant(v.recorded_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Checkin {
    pub id: String,
    pub by: String,
    pub taken_at: SystemTime,
    /// Seven items, each 1..5 (higher is better). Scores are plain integers for the apps'
    /// convenience; the core validates their range.
    pub wellbeing: Vec<i32>,
    pub distress: i32,
    pub coping: i32,
    pub social_support: i32,
    pub self_efficacy: i32,
    pub quality_of_life: i32,
    pub housing: String,
    pub employment: String,
    pub hospital_nights_28d: u32,
    pub substance_use_days_28d: Option<u32>,
}

impl From<core::Checkin> for Checkin {
    fn from(c: core::Checkin) -> Self {
        Self {
            id: c.id,
            by: c.by,
            taken_at: instant(c.taken_at),
            wellbeing: c.wellbeing.into_iter().map(i32::from).collect(),
            distress: c.distress.into(),
            coping: c.coping.into(),
            social_support: c.social_support.into(),
            self_efficacy: c.self_efficacy.into(),
            quality_of_life: c.quality_of_life.into(),
            housing: c.housing,
            employment: c.employment,
            hospital_nights_28d: c.hospital_nights_28d,
            substance_use_days_28d: c.substance_use_days_28d,
        }
    }
}

/// A score as the core stores it; out-of-range values are refused naming the field.
fn score(field: &str, v: i32) -> Result<u8, PeersyncError> {
    u8::try_from(v).map_err(|_| PeersyncError::Invalid(format!("invalid `{field}`: {v} is not a score from 1 to 5")))
}

/// What a worker enters to register a person. `id` is generated when absent.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct NewPerson {
    #[uniffi(default = None)]
    pub id: Option<String>,
    pub alias: String,
    pub year_of_birth: i32,
    /// Workers to assign besides the registering one.
    #[uniffi(default = [])]
    pub workers: Vec<String>,
    pub record: bool,
    pub share_with_coordinator: bool,
    pub research: bool,
}

impl From<NewPerson> for core::NewPerson {
    fn from(p: NewPerson) -> Self {
        Self {
            id: p.id,
            alias: p.alias,
            year_of_birth: p.year_of_birth,
            workers: p.workers,
            record: p.record,
            share_with_coordinator: p.share_with_coordinator,
            research: p.research,
        }
    }
}

/// What a worker enters to record a visit. `id` is generated when absent.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct NewVisit {
    #[uniffi(default = None)]
    pub id: Option<String>,
    pub started_at: SystemTime,
    pub duration_min: u32,
    pub mode: String,
    pub setting: String,
    pub activities: Vec<String>,
    #[uniffi(default = [])]
    pub goals: Vec<String>,
    #[uniffi(default = [])]
    pub referrals: Vec<String>,
    #[uniffi(default = "")]
    pub notes: String,
    /// `YYYY-MM-DD`.
    #[uniffi(default = None)]
    pub follow_up: Option<String>,
}

impl TryFrom<NewVisit> for core::NewVisit {
    type Error = PeersyncError;
    fn try_from(v: NewVisit) -> Result<Self, PeersyncError> {
        Ok(Self {
            id: v.id,
            started_at: utc("started_at", v.started_at)?,
            duration_min: v.duration_min,
            mode: v.mode,
            setting: v.setting,
            activities: v.activities,
            goals: v.goals,
            referrals: v.referrals,
            notes: v.notes,
            follow_up: parse_opt_date("follow_up", v.follow_up)?,
        })
    }
}

/// What a worker enters for a check-in; `taken_at` defaults to the device clock.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct NewCheckin {
    #[uniffi(default = None)]
    pub id: Option<String>,
    #[uniffi(default = None)]
    pub taken_at: Option<SystemTime>,
    pub wellbeing: Vec<i32>,
    pub distress: i32,
    pub coping: i32,
    pub social_support: i32,
    pub self_efficacy: i32,
    pub quality_of_life: i32,
    pub housing: String,
    pub employment: String,
    pub hospital_nights_28d: u32,
    #[uniffi(default = None)]
    pub substance_use_days_28d: Option<u32>,
}

impl TryFrom<NewCheckin> for core::NewCheckin {
    type Error = PeersyncError;
    fn try_from(c: NewCheckin) -> Result<Self, PeersyncError> {
        let wellbeing = c
            .wellbeing
            .iter()
            .enumerate()
            .map(|(i, &v)| score(&format!("wellbeing[{i}]"), v))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id: c.id,
            taken_at: c.taken_at.map(|t| utc("taken_at", t)).transpose()?,
            wellbeing,
            distress: score("distress", c.distress)?,
            coping: score("coping", c.coping)?,
            social_support: score("social_support", c.social_support)?,
            self_efficacy: score("self_efficacy", c.self_efficacy)?,
            quality_of_life: score("quality_of_life", c.quality_of_life)?,
            housing: c.housing,
            employment: c.employment,
            hospital_nights_28d: c.hospital_nights_28d,
            substance_use_days_28d: c.substance_use_days_28d,
        })
    }
}

/// An amendment of a visit: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, uniffi::Record)]
pub struct VisitEdit {
    #[uniffi(default = None)]
    pub started_at: Option<SystemTime>,
    #[uniffi(default = None)]
    pub duration_min: Option<u32>,
    #[uniffi(default = None)]
    pub mode: Option<String>,
    #[uniffi(default = None)]
    pub setting: Option<String>,
    #[uniffi(default = None)]
    pub activities: Option<Vec<String>>,
    #[uniffi(default = None)]
    pub goals: Option<Vec<String>>,
    #[uniffi(default = None)]
    pub referrals: Option<Vec<String>>,
    #[uniffi(default = None)]
    pub notes: Option<String>,
    /// A new follow-up date, `YYYY-MM-DD`.
    #[uniffi(default = None)]
    pub follow_up: Option<String>,
    /// Remove the follow-up date (ignored when `follow_up` is given).
    #[uniffi(default = false)]
    pub clear_follow_up: bool,
}

impl TryFrom<VisitEdit> for core::VisitEdit {
    type Error = PeersyncError;
    fn try_from(e: VisitEdit) -> Result<Self, PeersyncError> {
        let follow_up = match (parse_opt_date("follow_up", e.follow_up)?, e.clear_follow_up) {
            (Some(d), _) => Some(Some(d)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        Ok(Self {
            started_at: e.started_at.map(|t| utc("started_at", t)).transpose()?,
            duration_min: e.duration_min,
            mode: e.mode,
            setting: e.setting,
            activities: e.activities,
            goals: e.goals,
            referrals: e.referrals,
            notes: e.notes,
            follow_up,
        })
    }
}

/// A change of consent: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, uniffi::Record)]
pub struct ConsentChange {
    #[uniffi(default = None)]
    pub record: Option<bool>,
    #[uniffi(default = None)]
    pub share_with_coordinator: Option<bool>,
    #[uniffi(default = None)]
    pub research: Option<bool>,
}

impl From<ConsentChange> for core::ConsentChange {
    fn from(c: ConsentChange) -> Self {
        Self { record: c.record, share_with_coordinator: c.share_with_coordinator, research: c.research }
    }
}

/// A field edited on two phones at once.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FieldConflict {
    /// `profile/alias`, `consent/research`, `visits/<id>/notes`...
    pub field: String,
    /// Every concurrent value as JSON text, the one shown first.
    pub values: Vec<String>,
}

/// Everything the device holds about one person.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PersonRecord {
    pub person: Person,
    pub consent: Consent,
    /// Most recent first.
    pub visits: Vec<Visit>,
    /// Most recent first.
    pub checkins: Vec<Checkin>,
    pub conflicts: Vec<FieldConflict>,
}

impl From<core::PersonRecord> for PersonRecord {
    fn from(r: core::PersonRecord) -> Self {
        Self {
            person: r.person.into(),
            consent: r.consent.into(),
            visits: r.visits.into_iter().map(Into::into).collect(),
            checkins: r.checkins.into_iter().map(Into::into).collect(),
            conflicts: r.conflicts.into_iter().map(|c| FieldConflict { field: c.field, values: c.values }).collect(),
        }
    }
}

/// One line of the caseload.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PersonSummary {
    pub id: String,
    pub alias: String,
    pub year_of_birth: i32,
    pub visits: u32,
    pub checkins: u32,
    pub last_visit: Option<SystemTime>,
    pub last_visit_id: Option<String>,
    /// `YYYY-MM-DD`: set at the most recent visit, outstanding until the next.
    pub next_follow_up: Option<String>,
    pub share_with_coordinator: bool,
    /// Fields edited on two phones at once.
    pub conflicts: u32,
}

impl From<core::PersonSummary> for PersonSummary {
    fn from(s: core::PersonSummary) -> Self {
        Self {
            id: s.id,
            alias: s.alias,
            year_of_birth: s.year_of_birth,
            visits: s.visits,
            checkins: s.checkins,
            last_visit: s.last_visit.map(instant),
            last_visit_id: s.last_visit_id,
            next_follow_up: s.next_follow_up.map(iso),
            share_with_coordinator: s.share_with_coordinator,
            conflicts: s.conflicts,
        }
    }
}

/// A person whose follow-up is due.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FollowUp {
    pub person_id: String,
    pub alias: String,
    /// `YYYY-MM-DD`.
    pub due: String,
    pub visit_id: String,
    pub last_visit: SystemTime,
}

impl From<core::FollowUp> for FollowUp {
    fn from(f: core::FollowUp) -> Self {
        Self {
            person_id: f.person_id,
            alias: f.alias,
            due: iso(f.due),
            visit_id: f.visit_id,
            last_visit: instant(f.last_visit),
        }
    }
}

/// What this device holds that the server has not acknowledged yet.
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Record)]
pub struct PendingChanges {
    pub documents: u64,
    pub changes: u64,
}

impl From<core::PendingChanges> for PendingChanges {
    fn from(p: core::PendingChanges) -> Self {
        Self { documents: p.documents, changes: p.changes }
    }
}
