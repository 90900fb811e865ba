//! The caseload: a small summary per person, kept beside each document so that a worker's list
//! of people opens without loading every document.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::document::PersonRecord;

/// One line of a worker's caseload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonSummary {
    pub id: String,
    pub alias: String,
    pub year_of_birth: i32,
    pub visits: u32,
    pub checkins: u32,
    pub last_visit: Option<DateTime<Utc>>,
    /// Id of the most recent visit.
    pub last_visit_id: Option<String>,
    /// The follow-up date set at the most recent visit: outstanding until the next visit.
    pub next_follow_up: Option<NaiveDate>,
    pub share_with_coordinator: bool,
    /// Fields edited on two phones at once.
    pub conflicts: u32,
}

/// A person whose follow-up is due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    pub person_id: String,
    pub alias: String,
    pub due: NaiveDate,
    pub visit_id: String,
    pub last_visit: DateTime<Utc>,
}

impl PersonSummary {
    pub fn of(r: &PersonRecord) -> Self {
        let last = r.visits.first(); // visits are sorted most recent first
        Self {
            id: r.person.id.clone(),
            alias: r.person.alias.clone(),
            year_of_birth: r.person.year_of_birth,
            visits: r.visits.len() as u32,
            checkins: r.checkins.len() as u32,
            last_visit: last.map(|v| v.started_at),
            last_visit_id: last.map(|v| v.id.clone()),
            next_follow_up: last.and_then(|v| v.follow_up),
            share_with_coordinator: r.consent.share_with_coordinator,
            conflicts: r.conflicts.len() as u32,
        }
    }

    pub fn follow_up_due(&self, on: NaiveDate) -> Option<FollowUp> {
        let due = self.next_follow_up.filter(|d| *d <= on)?;
        Some(FollowUp {
            person_id: self.id.clone(),
            alias: self.alias.clone(),
            due,
            visit_id: self.last_visit_id.clone()?,
            last_visit: self.last_visit?,
        })
    }
}
