//! The domain model: what a peer worker records about a person, and the rules every write obeys.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::vocab;

/// A person supported by the team, as registered on a worker's phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub id: String,
    /// What the team calls the person; never their legal name.
    pub alias: String,
    pub year_of_birth: i32,
    /// Worker ids the registering worker assigned (itself and teammates).
    pub workers: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// The person's consent, which governs who sees their record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// The person agrees to a record being kept at all.
    pub record: bool,
    /// Coordinators may see this person's contacts and outcomes in reports.
    pub share_with_coordinator: bool,
    /// De-identified use for research.
    pub research: bool,
    pub updated_at: DateTime<Utc>,
}

/// A contact between a peer worker and a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    pub id: String,
    /// Worker who recorded it.
    pub by: String,
    pub started_at: DateTime<Utc>,
    pub duration_min: u32,
    pub mode: String,
    pub setting: String,
    pub activities: Vec<String>,
    pub goals: Vec<String>,
    pub referrals: Vec<String>,
    pub notes: String,
    pub follow_up: Option<NaiveDate>,
    pub recorded_at: DateTime<Utc>,
}

/// A wellbeing check-in: outcomes as the person reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkin {
    pub id: String,
    pub by: String,
    pub taken_at: DateTime<Utc>,
    /// Seven items, each 1..5 (higher is better).
    pub wellbeing: Vec<u8>,
    pub distress: u8,
    pub coping: u8,
    pub social_support: u8,
    pub self_efficacy: u8,
    pub quality_of_life: u8,
    pub housing: String,
    pub employment: String,
    pub hospital_nights_28d: u32,
    pub substance_use_days_28d: Option<u32>,
}

/// What a worker enters to register a person. `id` is generated when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPerson {
    pub id: Option<String>,
    pub alias: String,
    pub year_of_birth: i32,
    /// Workers to assign besides the registering one.
    pub workers: Vec<String>,
    pub record: bool,
    pub share_with_coordinator: bool,
    pub research: bool,
}

/// What a worker enters to record a visit. `id` is generated when absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVisit {
    pub id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_min: u32,
    pub mode: String,
    pub setting: String,
    pub activities: Vec<String>,
    pub goals: Vec<String>,
    pub referrals: Vec<String>,
    pub notes: String,
    pub follow_up: Option<NaiveDate>,
}

/// What a worker enters for a check-in; `taken_at` defaults to the device clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCheckin {
    pub id: Option<String>,
    pub taken_at: Option<DateTime<Utc>>,
    pub wellbeing: Vec<u8>,
    pub distress: u8,
    pub coping: u8,
    pub social_support: u8,
    pub self_efficacy: u8,
    pub quality_of_life: u8,
    pub housing: String,
    pub employment: String,
    pub hospital_nights_28d: u32,
    pub substance_use_days_28d: Option<u32>,
}

/// An amendment of a visit: only the fields that are `Some` change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitEdit {
    pub started_at: Option<DateTime<Utc>>,
    pub duration_min: Option<u32>,
    pub mode: Option<String>,
    pub setting: Option<String>,
    pub activities: Option<Vec<String>>,
    pub goals: Option<Vec<String>>,
    pub referrals: Option<Vec<String>>,
    pub notes: Option<String>,
    /// `Some(None)` clears the follow-up date.
    pub follow_up: Option<Option<NaiveDate>>,
}

/// A change of consent: only the fields that are `Some` change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentChange {
    pub record: Option<bool>,
    pub share_with_coordinator: Option<bool>,
    pub research: Option<bool>,
}

pub(crate) const MAX_ID_LEN: usize = 64;
pub(crate) const MAX_ALIAS_LEN: usize = 80;
pub(crate) const MAX_NOTES_LEN: usize = 20_000;
pub(crate) const MAX_DURATION_MIN: u32 = 24 * 60;
pub(crate) const MAX_DAYS_28D: u32 = 28;

/// Ids of people, visits, check-ins and workers: short, printable, safe in keys and URLs.
pub fn validate_id(field: &str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(ValidationError::new(
            field,
            format!("{id:?} may hold only letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<(), ValidationError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::not_in(field, value, allowed))
    }
}

fn subset_of(
    field: &str,
    values: &[String],
    allowed: &[&str],
    at_least_one: bool,
) -> Result<(), ValidationError> {
    if at_least_one && values.is_empty() {
        let mut e = ValidationError::new(field, "needs at least one value");
        e.allowed = allowed.iter().map(|s| s.to_string()).collect();
        return Err(e);
    }
    for (i, v) in values.iter().enumerate() {
        one_of(&format!("{field}[{i}]"), v, allowed)?;
        if values[..i].contains(v) {
            return Err(ValidationError::new(
                format!("{field}[{i}]"),
                format!("{v:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

fn score(field: &str, value: u8) -> Result<(), ValidationError> {
    if vocab::SCORE_RANGE.contains(&(value as i64)) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{value} is outside the scale 1..5"),
        ))
    }
}

/// A time a record may carry: from 2000 to before 2200, as consent times go (see
/// `document::plausible`). Outside it is a mistyped year or a broken clock, and one such visit
/// would stretch every report that goes by time.
pub(crate) fn plausible_time(field: &str, t: DateTime<Utc>) -> Result<(), ValidationError> {
    if crate::document::plausible(&t) {
        Ok(())
    } else {
        Err(ValidationError::new(field, format!("{} is not a plausible time: it must fall between 2000 and 2199", t.to_rfc3339())))
    }
}

/// A follow-up date: plausible, and not before the visit it follows (when known).
pub(crate) fn follow_up(d: NaiveDate, visit: Option<DateTime<Utc>>) -> Result<(), ValidationError> {
    if !(2000..2200).contains(&d.year()) {
        return Err(ValidationError::new("follow_up", format!("{d} is not a plausible date: it must fall between 2000 and 2199")));
    }
    match visit {
        Some(v) if d < v.date_naive() => Err(ValidationError::new("follow_up", format!("{d} is before the visit ({})", v.date_naive()))),
        _ => Ok(()),
    }
}

fn duration(value: u32) -> Result<(), ValidationError> {
    if (1..=MAX_DURATION_MIN).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            "duration_min",
            format!("{value} must be 1 to {MAX_DURATION_MIN} minutes"),
        ))
    }
}

fn notes(value: &str) -> Result<(), ValidationError> {
    if value.chars().count() > MAX_NOTES_LEN {
        Err(ValidationError::new(
            "notes",
            format!("longer than {MAX_NOTES_LEN} characters"),
        ))
    } else {
        Ok(())
    }
}

fn days_28(field: &str, value: u32) -> Result<(), ValidationError> {
    if value > MAX_DAYS_28D {
        Err(ValidationError::new(
            field,
            format!("{value} is more than the {MAX_DAYS_28D} days it counts over"),
        ))
    } else {
        Ok(())
    }
}

impl NewPerson {
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), ValidationError> {
        if let Some(id) = &self.id {
            validate_id("id", id)?;
        }
        let alias = self.alias.trim();
        if alias.is_empty() || alias.chars().count() > MAX_ALIAS_LEN {
            return Err(ValidationError::new(
                "alias",
                format!("must be 1 to {MAX_ALIAS_LEN} characters and not blank"),
            ));
        }
        let this_year = now.year();
        if !(1900..=this_year).contains(&self.year_of_birth) {
            return Err(ValidationError::new(
                "year_of_birth",
                format!("{} must be between 1900 and {this_year}", self.year_of_birth),
            ));
        }
        for (i, w) in self.workers.iter().enumerate() {
            validate_id(&format!("workers[{i}]"), w)?;
        }
        Ok(())
    }
}

impl NewVisit {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = &self.id {
            validate_id("id", id)?;
        }
        plausible_time("started_at", self.started_at)?;
        if let Some(d) = self.follow_up {
            follow_up(d, Some(self.started_at))?;
        }
        duration(self.duration_min)?;
        one_of("mode", &self.mode, vocab::MODES)?;
        one_of("setting", &self.setting, vocab::SETTINGS)?;
        subset_of("activities", &self.activities, vocab::ACTIVITIES, true)?;
        subset_of("goals", &self.goals, vocab::GOALS, false)?;
        subset_of("referrals", &self.referrals, vocab::REFERRALS, false)?;
        notes(&self.notes)
    }
}

impl VisitEdit {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(t) = self.started_at {
            plausible_time("started_at", t)?;
        }
        if let Some(Some(d)) = self.follow_up {
            follow_up(d, self.started_at)?;
        }
        if let Some(d) = self.duration_min {
            duration(d)?;
        }
        if let Some(m) = &self.mode {
            one_of("mode", m, vocab::MODES)?;
        }
        if let Some(s) = &self.setting {
            one_of("setting", s, vocab::SETTINGS)?;
        }
        if let Some(a) = &self.activities {
            subset_of("activities", a, vocab::ACTIVITIES, true)?;
        }
        if let Some(g) = &self.goals {
            subset_of("goals", g, vocab::GOALS, false)?;
        }
        if let Some(r) = &self.referrals {
            subset_of("referrals", r, vocab::REFERRALS, false)?;
        }
        if let Some(n) = &self.notes {
            notes(n)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == VisitEdit::default()
    }
}

impl NewCheckin {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = &self.id {
            validate_id("id", id)?;
        }
        if let Some(t) = self.taken_at {
            plausible_time("taken_at", t)?;
        }
        if self.wellbeing.len() != vocab::WELLBEING_ITEMS {
            return Err(ValidationError::new(
                "wellbeing",
                format!(
                    "needs exactly {} items, got {}",
                    vocab::WELLBEING_ITEMS,
                    self.wellbeing.len()
                ),
            ));
        }
        for (i, v) in self.wellbeing.iter().enumerate() {
            score(&format!("wellbeing[{i}]"), *v)?;
        }
        score("distress", self.distress)?;
        score("coping", self.coping)?;
        score("social_support", self.social_support)?;
        score("self_efficacy", self.self_efficacy)?;
        score("quality_of_life", self.quality_of_life)?;
        one_of("housing", &self.housing, vocab::HOUSING)?;
        one_of("employment", &self.employment, vocab::EMPLOYMENT)?;
        days_28("hospital_nights_28d", self.hospital_nights_28d)?;
        if let Some(d) = self.substance_use_days_28d {
            days_28("substance_use_days_28d", d)?;
        }
        Ok(())
    }
}

/// A worker's role must be one of the five peer roles.
pub fn validate_role(role: &str) -> Result<(), ValidationError> {
    one_of("role", role, vocab::ROLES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visit() -> NewVisit {
        NewVisit {
            id: None,
            started_at: Utc::now(),
            duration_min: 45,
            mode: "in_person".into(),
            setting: "community".into(),
            activities: vec!["support".into()],
            goals: vec![],
            referrals: vec![],
            notes: String::new(),
            follow_up: None,
        }
    }

    #[test]
    fn unknown_mode_names_field_and_allowed_values() {
        let mut v = visit();
        v.mode = "carrier_pigeon".into();
        let e = v.validate().unwrap_err();
        assert_eq!(e.field, "mode");
        assert_eq!(e.allowed, vocab::MODES);
        assert!(e.to_string().contains("in_person, phone"), "{e}");
    }

    #[test]
    fn activities_must_be_known_distinct_and_present() {
        let mut v = visit();
        v.activities = vec![];
        assert_eq!(v.validate().unwrap_err().field, "activities");
        v.activities = vec!["support".into(), "support".into()];
        assert_eq!(v.validate().unwrap_err().field, "activities[1]");
        v.activities = vec!["juggling".into()];
        assert_eq!(v.validate().unwrap_err().field, "activities[0]");
    }

    #[test]
    fn wellbeing_needs_seven_scores_in_range() {
        let mut c = NewCheckin {
            id: None,
            taken_at: None,
            wellbeing: vec![3; 6],
            distress: 2,
            coping: 3,
            social_support: 3,
            self_efficacy: 3,
            quality_of_life: 3,
            housing: "stable".into(),
            employment: "employed".into(),
            hospital_nights_28d: 0,
            substance_use_days_28d: None,
        };
        assert_eq!(c.validate().unwrap_err().field, "wellbeing");
        c.wellbeing = vec![3, 3, 3, 6, 3, 3, 3];
        assert_eq!(c.validate().unwrap_err().field, "wellbeing[3]");
        c.wellbeing = vec![3; 7];
        c.substance_use_days_28d = Some(29);
        assert_eq!(c.validate().unwrap_err().field, "substance_use_days_28d");
        c.substance_use_days_28d = Some(28);
        c.validate().unwrap();
    }

    #[test]
    fn ids_are_restricted() {
        assert!(validate_id("id", "p-00001").is_ok());
        assert!(validate_id("id", "").is_err());
        assert!(validate_id("id", "a/b").is_err());
        assert!(validate_id("id", &"x".repeat(65)).is_err());
    }
}
