//! The records tests write, with fixed values: shared by this crate's tests and the end-to-end
//! tests (`tests/src/lib.rs` includes this file), so that both describe the same person, visit
//! and check-in.

use chrono::{DateTime, TimeZone, Utc};
use peersync_core::{NewCheckin, NewPerson, NewVisit};

/// The store key every test device uses.
pub const KEY: [u8; 32] = [42; 32];

pub fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
}

/// A person who consents to a record and to the coordinator seeing it, with `workers` as
/// teammates.
pub fn person_with(id: &str, alias: &str, workers: &[&str]) -> NewPerson {
    NewPerson {
        id: Some(id.into()),
        alias: alias.into(),
        year_of_birth: 1984,
        workers: workers.iter().map(|w| w.to_string()).collect(),
        record: true,
        share_with_coordinator: true,
        research: false,
    }
}

pub fn visit(id: &str, notes: &str) -> NewVisit {
    NewVisit {
        id: Some(id.into()),
        started_at: t(2, 10),
        duration_min: 45,
        mode: "in_person".into(),
        setting: "community".into(),
        activities: vec!["support".into()],
        goals: vec!["housing".into()],
        referrals: vec![],
        notes: notes.into(),
        follow_up: None,
    }
}

pub fn checkin(id: &str) -> NewCheckin {
    NewCheckin {
        id: Some(id.into()),
        taken_at: None,
        wellbeing: vec![3, 3, 2, 4, 3, 3, 3],
        distress: 3,
        coping: 3,
        social_support: 2,
        self_efficacy: 3,
        quality_of_life: 3,
        housing: "temporary".into(),
        employment: "unemployed".into(),
        hospital_nights_28d: 0,
        substance_use_days_28d: Some(4),
    }
}
