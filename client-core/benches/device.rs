//! Device core benchmark (`cargo bench -p peersync-core --bench device`): record_visit latency
//! with durability, opening a store of 2,000 people and 20,000 visits, bytes on disk against
//! the records' JSON. Prints medians and p99; not a test.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use peersync_core::{Device, ManualClock, NewCheckin, NewPerson, NewVisit, vocab};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const PEOPLE: usize = 2_000;
const VISITS_PER_PERSON: usize = 10;
const CHECKINS_PER_PERSON: usize = 3;
const KEY: [u8; 32] = [3; 32];
const PHRASES: &[&str] = &[
    "Talked through the week and what felt hard.",
    "We made a plan for the housing appointment on Thursday.",
    "Felt more settled than last time, sleeping a bit better.",
    "Wants to try the Tuesday peer group before deciding.",
    "Set a small goal: a walk twice this week.",
    "Reviewed the crisis plan and who to call at night.",
];

fn pick(rng: &mut impl Rng, from: &[&str], n: usize) -> Vec<String> {
    let mut v: Vec<String> = from.choose_multiple(rng, n).map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn new_visit(rng: &mut impl Rng, day: i64) -> NewVisit {
    let n = rng.gen_range(1..4);
    let (na, ng, nr) = (rng.gen_range(1..3), rng.gen_range(0..3), rng.gen_range(0..2));
    NewVisit {
        id: None,
        started_at: Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap() + chrono::Duration::days(day),
        duration_min: *[30, 45, 60, 90].choose(rng).unwrap(),
        mode: vocab::MODES.choose(rng).unwrap().to_string(),
        setting: vocab::SETTINGS.choose(rng).unwrap().to_string(),
        activities: pick(rng, vocab::ACTIVITIES, na),
        goals: pick(rng, vocab::GOALS, ng),
        referrals: pick(rng, vocab::REFERRALS, nr),
        notes: (0..n).map(|_| *PHRASES.choose(rng).unwrap()).collect::<Vec<_>>().join(" "),
        follow_up: None,
    }
}

fn new_checkin(rng: &mut impl Rng) -> NewCheckin {
    NewCheckin {
        id: None,
        taken_at: None,
        wellbeing: (0..7).map(|_| rng.gen_range(1..=5)).collect(),
        distress: rng.gen_range(1..=5),
        coping: rng.gen_range(1..=5),
        social_support: rng.gen_range(1..=5),
        self_efficacy: rng.gen_range(1..=5),
        quality_of_life: rng.gen_range(1..=5),
        housing: vocab::HOUSING.choose(rng).unwrap().to_string(),
        employment: vocab::EMPLOYMENT.choose(rng).unwrap().to_string(),
        hospital_nights_28d: 0,
        substance_use_days_28d: Some(rng.gen_range(0..=28)),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            // Blocks actually allocated, not apparent length.
            if m.is_dir() { dir_size(&e.path()) } else { std::os::unix::fs::MetadataExt::blocks(&m) * 512 }
        })
        .sum()
}

/// Every file under `p`.
fn walk(p: &Path) -> Vec<std::fs::DirEntry> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.metadata().unwrap().is_dir() { out.extend(walk(&e.path())) } else { out.push(e) }
    }
    out
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 5, 8, 0, 0).unwrap());
    let device = Device::open(dir.path(), &KEY, Arc::new(clock.clone())).await.unwrap();
    device.set_worker("w-001").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);

    eprintln!("building {PEOPLE} people x {VISITS_PER_PERSON} visits through the public API...");
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    let started = Instant::now();
    for p in 0..PEOPLE {
        let person = device
            .register_person(NewPerson {
                id: None,
                alias: format!("AB-{p:05}"),
                year_of_birth: rng.gen_range(1950..2007),
                workers: vec![],
                record: true,
                share_with_coordinator: true,
                research: false,
            })
            .await
            .unwrap();
        ids.push(person.id);
    }
    for round in 0..VISITS_PER_PERSON {
        for id in &ids {
            let v = new_visit(&mut rng, round as i64 * 7);
            let t = Instant::now();
            device.record_visit(id, v).await.unwrap();
            latencies.push(t.elapsed());
        }
    }
    for _ in 0..CHECKINS_PER_PERSON {
        for id in &ids {
            device.record_checkin(id, new_checkin(&mut rng)).await.unwrap();
        }
    }
    eprintln!("built in {:.1} s", started.elapsed().as_secs_f64());
    latencies.sort();
    println!(
        "record_visit (durable, {} calls): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        pct(&latencies, 0.5).as_secs_f64() * 1e3,
        pct(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );

    // Raw JSON of the same records, the reference for bytes on disk.
    let mut json_bytes = 0usize;
    for id in &ids {
        let r = device.person(id).await.unwrap();
        json_bytes += serde_json::to_vec(&(&r.person, &r.consent, &r.visits, &r.checkins)).unwrap().len();
    }
    drop(device);

    let mut opens = Vec::new();
    let mut loads = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let d = Device::open(dir.path(), &KEY, Arc::new(clock.clone())).await.unwrap();
        let people = d.people().await.unwrap();
        opens.push(t.elapsed());
        assert_eq!(people.len(), PEOPLE);
        let t = Instant::now();
        for id in &ids {
            d.person(id).await.unwrap();
        }
        loads.push(t.elapsed());
    }
    opens.sort();
    loads.sort();
    println!(
        "open store + caseload ({PEOPLE} people, {} visits): median {:.1} ms; then reading every full record: median {:.0} ms",
        PEOPLE * VISITS_PER_PERSON,
        pct(&opens, 0.5).as_secs_f64() * 1e3,
        pct(&loads, 0.5).as_secs_f64() * 1e3
    );
    let live: usize = {
        use peersync_core::store::{LocalStore, SledStore};
        let raw = SledStore::open(dir.path()).unwrap();
        raw.scan_prefix(b"").unwrap().iter().map(|(k, v)| k.len() + v.len()).sum()
    };
    println!("live keys+values in the store: {live} bytes ({:.2}x JSON)", live as f64 / json_bytes as f64);
    for e in walk(dir.path()) {
        let m = e.metadata().unwrap();
        println!("  {:>10} B  {}", std::os::unix::fs::MetadataExt::blocks(&m) * 512, e.path().strip_prefix(dir.path()).unwrap().display());
    }
    let disk = dir_size(dir.path());
    if let Some(to) = std::env::var_os("PEERSYNC_BENCH_KEEP") {
        // For storage experiments on the same data.
        std::fs::rename(dir.keep(), &to).unwrap();
        eprintln!("store kept at {}", Path::new(&to).display());
    }
    println!(
        "bytes on disk {} vs raw JSON {} of the same records: {:.2}x",
        disk,
        json_bytes,
        disk as f64 / json_bytes as f64
    );
}
