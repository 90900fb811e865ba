//! `peersync simulate`: synthetic field scenarios in the format of the product lead's
//! `generate.py` (same event types, fields and rules; a separate implementation, so the product
//! never needs `shared/` at run time). Deterministic for a seed. Every name and note is invented.
//!
//! The rules kept: a phone learns of others' records only at its own syncs; a teammate records
//! for a person only after its phone could have received them, and edits a visit only after it
//! could have received that visit; concurrent edits touch only notes and follow-up dates; after
//! an erasure a phone that has not synced may still record for the person (the server refuses
//! it), and once it has synced it records nothing more for them; everyone syncs at the end.

use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};
use peersync_core::vocab;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::scenario::{ConsentSet, Event};

const PHRASES: &[&str] = &[
    "Talked through the week and what felt hard.",
    "Shared some of my own experience of getting back to work.",
    "We made a plan for the housing appointment on Thursday.",
    "Felt more settled than last time, sleeping a bit better.",
    "Went together to the benefits office; the form is now in.",
    "Wants to try the Tuesday peer group before deciding.",
    "Not much energy today, so we kept it short and easy.",
    "Practised what to say to the ward doctor about medication.",
    "Spoke about family contact and what would feel safe.",
    "Set a small goal: a walk twice this week.",
    "Celebrated two weeks without using; talked about triggers.",
    "Reviewed the crisis plan and who to call at night.",
];

/// A scenario's size and seed; also the size options of `peersync simulate` and `bench`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Params {
    #[arg(long, default_value_t = 12)]
    pub workers: usize,
    #[arg(long, default_value_t = 200)]
    pub people: usize,
    #[arg(long, default_value_t = 12)]
    pub weeks: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Bounds on a scenario's size (see [`Params::check`]).
pub const MAX_WORKERS: usize = 10_000;
pub const MAX_WEEKS: u32 = 520;
pub const MAX_PERSON_WEEKS: u64 = 1_000_000;

impl Params {
    /// A scenario needs at least one worker, person and week, and must fit in memory: it is
    /// built whole (events are sorted by time), about 1.6 KB per person-week.
    pub fn check(&self) -> Result<(), String> {
        if self.workers == 0 || self.people == 0 || self.weeks == 0 {
            return Err("--workers, --people and --weeks must be at least 1".into());
        }
        if self.workers > MAX_WORKERS || self.weeks > MAX_WEEKS || self.people as u64 * self.weeks as u64 > MAX_PERSON_WEEKS {
            return Err(format!(
                "a scenario is built in memory: at most {MAX_WORKERS} workers, {MAX_WEEKS} weeks and {MAX_PERSON_WEEKS} person-weeks (--people x --weeks; about 1.6 GB at that size)"
            ));
        }
        Ok(())
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 8, 0, 0).unwrap()
}

fn days(d: f64) -> Duration {
    Duration::seconds((d * 86_400.0) as i64)
}

fn pick<R: Rng>(rng: &mut R, from: &[&str], n: usize) -> Vec<String> {
    let mut v: Vec<String> = from.choose_multiple(rng, n).map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn notes<R: Rng>(rng: &mut R, n: usize) -> String {
    PHRASES.choose_multiple(rng, n).copied().collect::<Vec<_>>().join(" ")
}

/// Sync times of one worker, sorted, ending at `end`.
fn next_sync(times: &[DateTime<Utc>], t: DateTime<Utc>) -> DateTime<Utc> {
    times[times.partition_point(|s| *s < t).min(times.len() - 1)]
}

fn synced_between(times: &[DateTime<Utc>], a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    let i = times.partition_point(|s| *s < a);
    i < times.len() && times[i] < b
}

/// The scenario's events, sorted by time.
pub fn simulate(p: &Params) -> Vec<Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let start = start();
    let end = start + Duration::weeks(p.weeks as i64);
    let mut events: Vec<(DateTime<Utc>, usize, Event)> = Vec::new();
    let push = |events: &mut Vec<(DateTime<Utc>, usize, Event)>, e: Event| {
        let n = events.len();
        events.push((e.at(), n, e));
    };
    let workers: Vec<String> = (1..=p.workers).map(|i| format!("w-{i:03}")).collect();
    for (i, w) in workers.iter().enumerate() {
        push(&mut events, Event::Worker { at: start - Duration::days(1), worker: w.clone(), name: format!("Worker {}", i + 1), role: vocab::ROLES[i % vocab::ROLES.len()].into() });
    }
    let mut syncs: std::collections::HashMap<String, Vec<DateTime<Utc>>> = Default::default();
    for w in &workers {
        let (lo, hi) = *[(0.5, 1.5), (2.0, 4.0), (6.0, 14.0)].choose(&mut rng).unwrap();
        let mut t = start;
        let mut times = Vec::new();
        loop {
            t += days(rng.gen_range(lo..hi));
            if t >= end {
                break;
            }
            let at = t.with_hour(rng.gen_range(7..=21)).unwrap().with_minute(rng.gen_range(0..60)).unwrap().with_second(0).unwrap();
            times.push(at);
        }
        times.sort();
        times.dedup();
        times.push(end);
        for t in &times {
            push(&mut events, Event::Sync { at: *t, by: w.clone() });
        }
        syncs.insert(w.clone(), times);
    }
    let mut visits = Vec::new(); // (created, uploaded, author, person, visit id, team)
    let mut erased: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
    let id = |rng: &mut rand::rngs::StdRng| uuid::Builder::from_random_bytes(rng.r#gen()).into_uuid().to_string();
    for n in 0..p.people {
        let person = format!("p-{:05}", n + 1);
        let team: Vec<String> = if workers.len() > 1 && rng.gen_bool(0.15) { workers.choose_multiple(&mut rng, 2).cloned().collect() } else { vec![workers.choose(&mut rng).unwrap().clone()] };
        let lead = team[0].clone();
        let joined = start + days(rng.gen_range(0.0..(p.weeks as f64 * 7.0 * 0.6))) + Duration::minutes(rng.gen_range(60..540));
        let letters = b"ABCDEFGHJKLMNPRSTW";
        let alias = format!("{}{}-{:05}", letters[rng.gen_range(0..letters.len())] as char, letters[rng.gen_range(0..letters.len())] as char, n + 1);
        push(&mut events, Event::Person {
            at: joined,
            by: lead.clone(),
            person: person.clone(),
            alias,
            year_of_birth: rng.gen_range(1950..=2007),
            workers: team.clone(),
            consent: ConsentSet { record: true, share_with_coordinator: rng.gen_bool(0.9), research: rng.gen_bool(0.4) },
        });
        if rng.gen_bool(0.01) {
            let at = joined + days(rng.gen_range(7.0..(p.weeks as f64 * 7.0).max(7.5)));
            if at < end {
                erased.insert(person.clone(), at);
            }
        }
        let tracks_use = rng.gen_bool(0.3);
        let mut wellbeing: Vec<i64> = (0..7).map(|_| rng.gen_range(1..=4)).collect();
        let drift: &[i64] = [&[-1, 0, 0, 1, 1][..], &[-1, 0, 0, 0, 1][..], &[-1, -1, 0, 0, 1][..]].choose(&mut rng).unwrap();
        let every = *[4.0, 7.0, 7.0, 7.0, 14.0].choose(&mut rng).unwrap();
        let lead_syncs = &syncs[&lead];
        let mut t = joined + Duration::hours(1);
        loop {
            t += days(every * rng.gen_range(0.7..1.3));
            t = t.with_hour(rng.gen_range(8..=18)).unwrap().with_minute(*[0, 15, 30, 45].choose(&mut rng).unwrap()).unwrap().with_second(0).unwrap();
            if t >= end || erased.get(&person).is_some_and(|e| t >= next_sync(lead_syncs, *e)) {
                break;
            }
            let mate = team.last().unwrap();
            let mate_syncs = &syncs[mate];
            let mate_may = synced_between(mate_syncs, next_sync(lead_syncs, joined), t)
                && !erased.get(&person).is_some_and(|e| synced_between(mate_syncs, *e, t));
            let by = if rng.gen_bool(0.2) && mate_may { mate.clone() } else { lead.clone() };
            let vid = id(&mut rng);
            let started = t - Duration::minutes(rng.gen_range(20..=120));
            let follow = rng.gen_bool(0.6).then(|| (t + days(every)).date_naive());
            let n_notes = rng.gen_range(1..=5);
            push(&mut events, Event::Visit {
                at: t,
                by: by.clone(),
                person: person.clone(),
                visit: vid.clone(),
                started_at: started,
                duration_min: *[15, 20, 30, 45, 45, 60, 60, 90, 120].choose(&mut rng).unwrap(),
                mode: vocab::MODES[[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 4][rng.gen_range(0..12)]].into(),
                setting: vocab::SETTINGS[[0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 5][rng.gen_range(0..15)]].into(),
                activities: { let k = rng.gen_range(1..=2); pick(&mut rng, vocab::ACTIVITIES, k) },
                goals: { let k = rng.gen_range(0..=3); pick(&mut rng, vocab::GOALS, k) },
                referrals: { let k = *[0, 0, 0, 1, 2].choose(&mut rng).unwrap(); pick(&mut rng, vocab::REFERRALS, k) },
                notes: notes(&mut rng, n_notes),
                follow_up: follow,
            });
            visits.push((t, next_sync(&syncs[&by], t), by.clone(), person.clone(), vid, team.clone()));
            if rng.gen_bool(0.35) {
                for x in wellbeing.iter_mut() {
                    *x = (*x + drift.choose(&mut rng).unwrap()).clamp(1, 5);
                }
                let mean = wellbeing.iter().sum::<i64>() as f64 / 7.0;
                let score = |rng: &mut rand::rngs::StdRng| (mean + rng.gen_range(-1.0..1.0)).round().clamp(1.0, 5.0) as u8;
                push(&mut events, Event::Checkin {
                    at: t + Duration::minutes(5),
                    by: by.clone(),
                    person: person.clone(),
                    checkin: id(&mut rng),
                    wellbeing: wellbeing.iter().map(|x| *x as u8).collect(),
                    distress: 6 - score(&mut rng),
                    coping: score(&mut rng),
                    social_support: score(&mut rng),
                    self_efficacy: score(&mut rng),
                    quality_of_life: score(&mut rng),
                    housing: vocab::HOUSING[[0, 0, 0, 0, 0, 0, 0, 1, 1, 2][rng.gen_range(0..10)]].into(),
                    employment: vocab::EMPLOYMENT.choose(&mut rng).unwrap().to_string(),
                    hospital_nights_28d: *[0, 0, 0, 0, 1, 3, 7].choose(&mut rng).unwrap(),
                    substance_use_days_28d: tracks_use.then(|| rng.gen_range(0..=28)),
                });
            }
        }
        if rng.gen_bool(0.05) {
            let at = joined + days(rng.gen_range(3.0..30.0));
            if at < end && erased.get(&person).is_none_or(|e| at < *e) {
                let mut set = serde_json::Map::new();
                set.insert("share_with_coordinator".into(), Value::Bool(false));
                push(&mut events, Event::Consent { at, by: lead.clone(), person: person.clone(), set });
            }
        }
    }
    for (person, at) in &erased {
        push(&mut events, Event::Erase { at: *at, by: "coordinator".into(), person: person.clone() });
    }
    for (created, uploaded, author, person, vid, team) in &visits {
        let gone = |at: DateTime<Utc>| erased.get(person).is_some_and(|e| at >= *e);
        if rng.gen_bool(0.12) {
            let at = *created + Duration::minutes(rng.gen_range(60..72 * 60));
            if at < end && !gone(at) {
                let mut set = serde_json::Map::new();
                match rng.gen_range(0..3) {
                    0 => set.insert("notes".into(), json!(notes(&mut rng, 2))),
                    1 => set.insert("follow_up".into(), json!((at + Duration::days(7)).date_naive().to_string())),
                    _ => set.insert("duration_min".into(), json!([30, 45, 60].choose(&mut rng).unwrap())),
                };
                push(&mut events, Event::Edit { at, by: author.clone(), person: person.clone(), visit: vid.clone(), set });
            }
        }
        if team.len() == 2 && rng.gen_bool(0.3) {
            let other = if *author == team[0] { &team[1] } else { &team[0] };
            let at = *uploaded + days(rng.gen_range(0.5..10.0));
            if at < end && synced_between(&syncs[other], *uploaded, at) && !gone(at) {
                let mut set = serde_json::Map::new();
                if rng.gen_bool(0.5) {
                    set.insert("notes".into(), json!(notes(&mut rng, 1)));
                } else {
                    set.insert("follow_up".into(), json!((at + Duration::days(3)).date_naive().to_string()));
                }
                push(&mut events, Event::Edit { at, by: other.clone(), person: person.clone(), visit: vid.clone(), set });
            }
        }
    }
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    events.into_iter().map(|(_, _, e)| e).collect()
}

/// JSON Lines, one event per line.
pub fn to_jsonl(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str(&serde_json::to_string(e).expect("events serialize"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_out_of_bounds_are_refused_before_anything_is_built() {
        let p = |workers, people, weeks| Params { workers, people, weeks, seed: 1 };
        assert!(p(50, 2000, 12).check().is_ok());
        assert!(p(0, 10, 1).check().is_err());
        let big = p(12, 100_000_000, 12).check().unwrap_err();
        assert!(big.contains("person-weeks"), "{big}");
        assert!(p(12, 200, 100_000).check().is_err());
        assert!(p(20_000, 200, 12).check().is_err());
        assert!(p(100, 80_000, 12).check().is_ok(), "960,000 person-weeks fit");
    }
}
