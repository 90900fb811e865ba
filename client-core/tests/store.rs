//! The encrypted store on real sled files: records survive, stay unreadable without the key,
//! and refuse tampering; invalid writes change nothing.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use peersync_core::store::{LocalStore, SledStore, Write};
use peersync_core::{CoreError, Device, ManualClock, StoreError};

const ALIAS: &str = "Zephyrine-Quolloway";
const NOTE: &str = "Discussed the Thursday housing appointment at Marigold Court";

async fn open(dir: &Path, key: &[u8; 32]) -> Result<Device, CoreError> {
    Device::open(dir, key, Arc::new(ManualClock::new(t(1, 9)))).await
}

async fn seeded(dir: &Path) {
    let d = open(dir, &KEY).await.unwrap();
    d.set_worker("w-001").await.unwrap();
    d.register_person(person("p-1", ALIAS)).await.unwrap();
    for i in 0..40 {
        // Enough visits to pass the compaction threshold, so snapshots are scanned too.
        d.record_visit("p-1", visit(&format!("v-{i}"), NOTE)).await.unwrap();
    }
    d.record_checkin("p-1", checkin("c-1")).await.unwrap();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { all_files(&p, out) } else { out.push(p) }
    }
}

#[tokio::test]
async fn records_survive_reopen_and_nothing_readable_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path()).await;
    // Reopen: everything is there.
    let d = open(dir.path(), &KEY).await.unwrap();
    let r = d.person("p-1").await.unwrap();
    assert_eq!(r.person.alias, ALIAS);
    assert_eq!(r.visits.len(), 40);
    assert_eq!(r.checkins.len(), 1);
    assert_eq!(d.people().await.unwrap()[0].visits, 40);
    drop(d);
    // Scan every raw byte sled wrote.
    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    let mut scanned = 0;
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        scanned += bytes.len();
        for needle in [ALIAS, NOTE, "Marigold", "housing_service", "in_person"] {
            assert!(!contains(&bytes, needle.as_bytes()), "{needle:?} readable in {}", f.display());
        }
    }
    assert!(scanned > 10_000, "the scan read the store ({scanned} bytes)");
}

#[tokio::test]
async fn a_wrong_key_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path()).await;
    let err = open(dir.path(), &[7; 32]).await.err().expect("a wrong key must not open the store");
    assert!(matches!(err, CoreError::Store(StoreError::WrongKey)), "{err:?}");
    assert!(err.to_string().contains("another key"));
    let short = Device::open(dir.path(), &[1; 16], Arc::new(ManualClock::new(t(1, 9)))).await.err().unwrap();
    assert!(matches!(short, CoreError::Store(StoreError::BadKeyLength(16))));
    let nowhere = Device::open("", &KEY, Arc::new(ManualClock::new(t(1, 9)))).await.err().unwrap();
    assert!(matches!(&nowhere, CoreError::Invalid(e) if e.field == "path"), "{nowhere:?}");
    // The right key still works afterwards: the refusal changed nothing.
    assert_eq!(open(dir.path(), &KEY).await.unwrap().person("p-1").await.unwrap().visits.len(), 40);
}

#[tokio::test]
async fn a_tampered_value_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path()).await;
    {
        let raw = SledStore::open(dir.path()).unwrap();
        let mut writes = Vec::new();
        for (k, mut v) in raw.scan_prefix(b"p/").unwrap() {
            let last = v.len() - 1;
            v[last] ^= 0x01;
            writes.push(Write::Put(k, v));
        }
        assert!(!writes.is_empty());
        raw.apply(writes).unwrap();
    }
    let d = open(dir.path(), &KEY).await.unwrap();
    let err = d.person("p-1").await.unwrap_err();
    assert!(matches!(err, CoreError::Store(StoreError::Tampered { .. })), "{err:?}");
}

#[tokio::test]
async fn swapping_values_between_keys_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path()).await;
    {
        let raw = SledStore::open(dir.path()).unwrap();
        let metas = raw.scan_prefix(b"m/").unwrap();
        let docs = raw.scan_prefix(b"p/").unwrap();
        // Put a (validly sealed) metadata value under the document's key.
        raw.apply(vec![Write::Put(docs[0].0.clone(), metas[0].1.clone())]).unwrap();
    }
    let d = open(dir.path(), &KEY).await.unwrap();
    assert!(matches!(d.person("p-1").await.unwrap_err(), CoreError::Store(StoreError::Tampered { .. })));
}

#[tokio::test]
async fn invalid_writes_name_the_field_and_write_nothing() {
    let (d, _) = device("w-001").await;
    d.register_person(person("p-1", "KM-1")).await.unwrap();
    let before = d.pending_changes().await.unwrap();

    let mut v = visit("v-1", "");
    v.setting = "moon".into();
    match d.record_visit("p-1", v).await.unwrap_err() {
        CoreError::Invalid(e) => {
            assert_eq!(e.field, "setting");
            assert!(e.allowed.contains(&"acute_inpatient".to_string()));
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    let mut v = visit("v-1", "");
    v.duration_min = 0;
    assert!(matches!(d.record_visit("p-1", v).await, Err(CoreError::Invalid(e)) if e.field == "duration_min"));
    let mut c = checkin("c-1");
    c.employment = "astronaut".into();
    assert!(matches!(d.record_checkin("p-1", c).await, Err(CoreError::Invalid(e)) if e.field == "employment"));
    let mut p = person("p-2", " ");
    assert!(matches!(d.register_person(p.clone()).await, Err(CoreError::Invalid(e)) if e.field == "alias"));
    p.alias = "ok".into();
    p.year_of_birth = 1776;
    assert!(matches!(d.register_person(p).await, Err(CoreError::Invalid(e)) if e.field == "year_of_birth"));
    assert!(matches!(d.record_visit("nobody", visit("v-2", "")).await, Err(CoreError::UnknownPerson(_))));
    // Times from a mistyped year or a broken clock.
    let mut v = visit("v-1", "");
    v.started_at = chrono::DateTime::parse_from_rfc3339("9999-03-02T10:00:00Z").unwrap().into();
    assert!(matches!(d.record_visit("p-1", v).await, Err(CoreError::Invalid(e)) if e.field == "started_at"));
    let mut v = visit("v-1", "");
    v.follow_up = Some(v.started_at.date_naive() - chrono::Days::new(1));
    assert!(matches!(d.record_visit("p-1", v).await, Err(CoreError::Invalid(e)) if e.field == "follow_up" && e.problem.contains("before the visit")));
    let mut c = checkin("c-1");
    c.taken_at = Some(chrono::DateTime::from_timestamp(0, 0).unwrap());
    assert!(matches!(d.record_checkin("p-1", c).await, Err(CoreError::Invalid(e)) if e.field == "taken_at"));

    assert_eq!(d.pending_changes().await.unwrap(), before, "nothing was written");
    assert_eq!(d.person("p-1").await.unwrap().visits.len(), 0);
    assert_eq!(d.people().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_device_without_a_worker_refuses_to_record() {
    let d = Device::in_memory(&KEY, Arc::new(ManualClock::new(t(1, 9)))).unwrap();
    assert!(matches!(d.register_person(person("p-1", "A")).await, Err(CoreError::NoWorker)));
}

#[tokio::test]
async fn caseload_follow_ups_and_consent() {
    let (d, clock) = device("w-001").await;
    d.register_person(person("p-1", "AA-1")).await.unwrap();
    d.register_person(person("p-2", "BB-2")).await.unwrap();
    let mut v = visit("v-1", "");
    v.follow_up = Some(chrono::NaiveDate::from_ymd_opt(2026, 3, 9).unwrap());
    clock.set(t(2, 12));
    let rec = d.record_visit("p-1", v).await.unwrap();
    assert_eq!(rec.recorded_at, t(2, 12), "the injected clock sets recorded times");
    let due = d.follow_ups_due(chrono::NaiveDate::from_ymd_opt(2026, 3, 8).unwrap()).await.unwrap();
    assert!(due.is_empty());
    let due = d.follow_ups_due(chrono::NaiveDate::from_ymd_opt(2026, 3, 9).unwrap()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].person_id, "p-1");
    // A later visit without a follow-up closes it.
    let mut v2 = visit("v-2", "");
    v2.started_at = t(10, 10);
    d.record_visit("p-1", v2).await.unwrap();
    assert!(d.follow_ups_due(chrono::NaiveDate::from_ymd_opt(2026, 3, 30).unwrap()).await.unwrap().is_empty());

    let people = d.people().await.unwrap();
    assert_eq!(people.iter().map(|p| (p.id.as_str(), p.visits)).collect::<Vec<_>>(), [("p-1", 2), ("p-2", 0)]);
    assert_eq!(people[0].last_visit, Some(t(10, 10)));

    let c = d
        .set_consent("p-2", peersync_core::ConsentChange { share_with_coordinator: Some(false), ..Default::default() })
        .await
        .unwrap();
    assert!(!c.share_with_coordinator && c.record);
    assert!(!d.people().await.unwrap()[1].share_with_coordinator);
    d.set_consent("p-2", peersync_core::ConsentChange { record: Some(false), ..Default::default() }).await.unwrap();
    assert!(matches!(d.record_visit("p-2", visit("v-3", "")).await, Err(CoreError::NoConsentToRecord(_))));
    assert_eq!(d.pending_changes().await.unwrap().documents, 2);
}

#[tokio::test]
async fn a_record_too_large_to_sync_is_refused_whole_and_the_record_kept() {
    use rand::Rng;
    let (d, _) = device("w-001").await;
    d.register_person(person("p-1", "KM-1")).await.unwrap();
    let limit = peersync_core::protocol::MAX_DOC_BYTES;
    let mut recorded = 0;
    let refusal = loop {
        // Notes that barely compress: the record grows by nearly their size.
        let notes: String = rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(20_000).map(char::from).collect();
        match d.record_visit("p-1", visit(&format!("v-{recorded}"), &notes)).await {
            Ok(_) => recorded += 1,
            Err(e) => break e,
        }
        assert!(recorded < 400, "a record of {recorded} such visits must have been refused");
    };
    assert!(matches!(&refusal, CoreError::RecordFull { person, limit: l, .. } if person == "p-1" && *l < limit), "{refusal:?}");
    assert!(recorded >= 90, "the limit is the deflated size, reached only after {recorded} visits");
    // A full record still takes the person's word: a withdrawal is never refused for size.
    let consent = d.set_consent("p-1", peersync_core::ConsentChange { share_with_coordinator: Some(false), ..Default::default() }).await.unwrap();
    assert!(!consent.share_with_coordinator);
    let record = d.person("p-1").await.unwrap();
    assert_eq!(record.visits.len(), recorded, "the refused visit is not kept, the others are");
    assert!(d.export_document("p-1").await.unwrap().len() <= limit, "what is kept can be sent");
    // Other people are unaffected.
    d.register_person(person("p-2", "KM-2")).await.unwrap();
    d.record_visit("p-2", visit("w-1", NOTE)).await.unwrap();
    assert_eq!(d.person("p-2").await.unwrap().visits.len(), 1);
}

#[tokio::test]
async fn times_are_checked_against_the_visit_and_the_phones_clock() {
    let (d, clock) = device("w-001").await;
    d.register_person(person("p-1", "KM-1")).await.unwrap();
    let v = d.record_visit("p-1", visit("v-1", "")).await.unwrap();
    // A follow-up moved before the visit, or the visit moved after its follow-up.
    let before = v.started_at.date_naive() - chrono::Days::new(1);
    let edit = peersync_core::VisitEdit { follow_up: Some(Some(before)), ..Default::default() };
    assert!(matches!(d.edit_visit("p-1", "v-1", edit).await, Err(CoreError::Invalid(e)) if e.field == "follow_up"));
    let edit = peersync_core::VisitEdit { follow_up: Some(Some(v.started_at.date_naive())), ..Default::default() };
    d.edit_visit("p-1", "v-1", edit).await.unwrap();
    let edit = peersync_core::VisitEdit { started_at: Some(v.started_at + chrono::Duration::days(3)), ..Default::default() };
    assert!(matches!(d.edit_visit("p-1", "v-1", edit).await, Err(CoreError::Invalid(e)) if e.field == "follow_up"));
    let kept = d.person("p-1").await.unwrap().visits.remove(0);
    assert_eq!((kept.started_at, kept.follow_up), (v.started_at, Some(v.started_at.date_naive())), "refused edits change nothing");
    // A check-in, or a registration, dated by a phone whose clock reads 1970.
    clock.set(chrono::DateTime::from_timestamp(0, 0).unwrap());
    let err = d.record_checkin("p-1", checkin("c-1")).await.unwrap_err();
    assert!(matches!(&err, CoreError::Invalid(e) if e.field == "taken_at" && e.problem.contains("clock")), "{err:?}");
    let err = d.register_person(person("p-2", "KM-2")).await.unwrap_err();
    assert!(matches!(&err, CoreError::Invalid(e) if e.field == "created_at"), "{err:?}");
}
