#![allow(dead_code)]
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use peersync_core::{Device, ManualClock, NewCheckin, NewPerson, NewVisit};

pub const KEY: [u8; 32] = [42; 32];

pub fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
}

pub async fn device(worker: &str) -> (Device, ManualClock) {
    let clock = ManualClock::new(t(1, 9));
    let d = Device::in_memory(&KEY, Arc::new(clock.clone())).unwrap();
    d.set_worker(worker).await.unwrap();
    (d, clock)
}

/// Two phones exchange their copies of `id` both ways, as a sync through the server would;
/// returns whether each one's record changed (`a`'s, `b`'s).
pub async fn exchange(a: &Device, b: &Device, id: &str) -> (bool, bool) {
    let (from_a, from_b) = (a.export_document(id).await.unwrap(), b.export_document(id).await.unwrap());
    (a.import_document(id, from_b).await.unwrap(), b.import_document(id, from_a).await.unwrap())
}

pub fn person(id: &str, alias: &str) -> NewPerson {
    NewPerson {
        id: Some(id.into()),
        alias: alias.into(),
        year_of_birth: 1984,
        workers: vec![],
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
