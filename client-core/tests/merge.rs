//! Person documents merge without losing anyone's records.

mod common;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ObjType, ROOT, ReadDoc};
use common::*;
use peersync_core::{ConsentChange, CoreError, NewVisit, PersonDoc, VisitEdit};

/// Two phones record different visits for the same person while offline; after exchanging
/// documents both hold both visits.
#[tokio::test]
async fn concurrent_offline_visits_both_survive_the_merge() {
    let (a, _) = device("w-001").await;
    let (b, _) = device("w-002").await;
    // 1. A registers the person; B receives the document (as a sync would deliver it).
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    b.import_document("p-1", a.export_document("p-1").await.unwrap()).await.unwrap();
    // 2. Both go offline and record a visit each.
    a.record_visit("p-1", visit("v-a", "from phone A")).await.unwrap();
    b.record_visit("p-1", visit("v-b", "from phone B")).await.unwrap();
    // 3. They exchange documents both ways.
    assert_eq!(exchange(&a, &b, "p-1").await, (true, true));
    // 4. Both see both visits, and the same record.
    let ra = a.person("p-1").await.unwrap();
    let rb = b.person("p-1").await.unwrap();
    let mut ids: Vec<_> = ra.visits.iter().map(|v| v.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["v-a", "v-b"]);
    assert_eq!(ra, rb);
    assert_eq!(a.people().await.unwrap()[0].visits, 2);
    assert_eq!(b.people().await.unwrap()[0].visits, 2);
    // Only B's own visit is pending on B; what it received is not.
    assert_eq!(b.pending_changes().await.unwrap().changes, 1);
}

/// Two phones edit the same field of one visit at once: every device shows the same winner,
/// and the losing value stays visible as a conflict.
#[tokio::test]
async fn concurrent_edits_of_one_field_keep_one_winner_and_show_the_conflict() {
    let (a, _) = device("w-001").await;
    let (b, _) = device("w-002").await;
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    a.record_visit("p-1", visit("v-1", "original")).await.unwrap();
    b.import_document("p-1", a.export_document("p-1").await.unwrap()).await.unwrap();

    let edit = |n: &str| VisitEdit { notes: Some(n.into()), ..Default::default() };
    a.edit_visit("p-1", "v-1", edit("notes from A")).await.unwrap();
    b.edit_visit("p-1", "v-1", edit("notes from B")).await.unwrap();
    exchange(&a, &b, "p-1").await;

    let ra = a.person("p-1").await.unwrap();
    let rb = b.person("p-1").await.unwrap();
    let winner = &ra.visits[0].notes;
    assert_eq!(winner, &rb.visits[0].notes, "every device shows the same winner");
    assert!(winner == "notes from A" || winner == "notes from B");
    assert_eq!(ra.conflicts, rb.conflicts);
    assert_eq!(ra.conflicts.len(), 1, "{:?}", ra.conflicts);
    let c = &ra.conflicts[0];
    assert_eq!(c.field, "visits/v-1/notes");
    assert_eq!(c.values.len(), 2);
    assert_eq!(c.values[0], serde_json::to_string(winner).unwrap(), "the winner is listed first");
    assert!(c.values.contains(&"\"notes from A\"".to_string()));
    assert!(c.values.contains(&"\"notes from B\"".to_string()));
    assert_eq!(a.people().await.unwrap()[0].conflicts, 1);
}

/// The skeleton pitfall. First shown to be real with naive documents, then shown not to bite
/// person documents: each phone creates the document on its own, yet no visit vanishes.
#[test]
fn independently_created_documents_do_not_hide_each_others_visits() {
    // The pitfall, naively: each device makes its own `visits` map.
    let naive = |actor: u8, visit: &str| {
        let mut d = Automerge::new().with_actor(ActorId::from(vec![actor; 16]));
        let mut tx = d.transaction();
        let visits = tx.put_object(ROOT, "visits", ObjType::Map).unwrap();
        tx.put_object(&visits, visit, ObjType::Map).unwrap();
        tx.commit_with(CommitOptions::default());
        d
    };
    let mut x = naive(1, "v-x");
    let mut y = naive(2, "v-y");
    x.merge(&mut y).unwrap();
    let (_, visits) = x.get(ROOT, "visits").unwrap().unwrap();
    assert_eq!(x.keys(&visits).count(), 1, "naive documents lose one side's visits");

    // Person documents: the skeleton is one deterministic change.
    let (mut a, _) = PersonDoc::create("p-1", ActorId::from(vec![1; 16]));
    let (mut b, _) = PersonDoc::create("p-1", ActorId::from(vec![2; 16]));
    assert_eq!(a.heads(), b.heads(), "the skeleton has the same hash on every device");
    let mk = |id: &str| peersync_core::Visit {
        id: id.into(),
        by: "w".into(),
        started_at: t(2, 10),
        duration_min: 30,
        mode: "phone".into(),
        setting: "home".into(),
        activities: vec!["support".into()],
        goals: vec![],
        referrals: vec![],
        notes: String::new(),
        follow_up: None,
        recorded_at: t(2, 11),
    };
    a.add_visit(&mk("v-a")).unwrap();
    b.add_visit(&mk("v-b")).unwrap();
    let bytes_b = b.save();
    a.automerge_mut().load_incremental(&bytes_b).unwrap();
    let (_, visits) = a.automerge().get(ROOT, "visits").unwrap().unwrap();
    let mut keys: Vec<_> = a.automerge().keys(&visits).collect();
    keys.sort();
    assert_eq!(keys, ["v-a", "v-b"]);
}

/// Two phones that both register the same person id offline (the pitfall through the public
/// API): after the merge, both phones' visits are there.
#[tokio::test]
async fn same_person_registered_on_two_phones_keeps_both_visit_sets() {
    let (a, _) = device("w-001").await;
    let (b, _) = device("w-002").await;
    a.register_person(person("p-9", "AB-9")).await.unwrap();
    b.register_person(person("p-9", "AB-9")).await.unwrap();
    a.record_visit("p-9", visit("v-a", "")).await.unwrap();
    b.record_visit("p-9", visit("v-b", "")).await.unwrap();
    a.import_document("p-9", b.export_document("p-9").await.unwrap()).await.unwrap();
    let r = a.person("p-9").await.unwrap();
    assert_eq!(r.visits.len(), 2);
}

/// The caseload line is read without the visits' lists and notes; it must say exactly what
/// the full record says, for merged records with ties, conflicts and damaged entries too.
#[tokio::test]
async fn the_caseload_line_matches_the_full_record() {
    use peersync_core::caseload::PersonSummary;
    let (a, clock) = device("w-001").await;
    let (b, clock_b) = device("w-002").await;
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    // Two visits starting at the same moment (the smaller id counts as the latest), an older
    // one, and a newer one with a follow-up date on the other phone.
    a.record_visit("p-1", visit("v-b", "")).await.unwrap();
    a.record_visit("p-1", visit("v-a", "")).await.unwrap();
    a.record_visit("p-1", NewVisit { started_at: t(1, 8), ..visit("v-old", "") }).await.unwrap();
    a.record_checkin("p-1", checkin("c-1")).await.unwrap();
    b.import_document("p-1", a.export_document("p-1").await.unwrap()).await.unwrap();
    let line = |d: &peersync_core::Device| {
        let d = d.clone();
        async move {
            let caseload = d.people().await.unwrap();
            let record = d.person("p-1").await.unwrap();
            let line = caseload.into_iter().find(|p| p.id == "p-1").unwrap();
            assert_eq!(line, PersonSummary::of(&record));
            line
        }
    };
    let first = line(&a).await;
    assert_eq!((first.visits, first.checkins, first.last_visit_id.as_deref()), (3, 1, Some("v-a")));
    assert_eq!(first.conflicts, 0);

    // Concurrent edits of one field (a conflict) and of consent (another), a later visit
    // with a follow-up on B.
    let edit = |n: &str| VisitEdit { mode: Some(n.into()), ..Default::default() };
    a.edit_visit("p-1", "v-b", edit("phone")).await.unwrap();
    b.edit_visit("p-1", "v-b", edit("video")).await.unwrap();
    clock.set(t(1, 10));
    clock_b.set(t(1, 10));
    a.set_consent("p-1", ConsentChange { share_with_coordinator: Some(false), ..Default::default() }).await.unwrap();
    b.set_consent("p-1", ConsentChange { share_with_coordinator: Some(false), research: Some(true), ..Default::default() }).await.unwrap();
    let follow = chrono::NaiveDate::from_ymd_opt(2026, 3, 20).unwrap();
    b.record_visit("p-1", NewVisit { started_at: t(3, 9), follow_up: Some(follow), ..visit("v-new", "") }).await.unwrap();
    exchange(&a, &b, "p-1").await;
    let merged = line(&a).await;
    assert_eq!(merged, line(&b).await);
    assert_eq!((merged.visits, merged.last_visit_id.as_deref(), merged.next_follow_up), (4, Some("v-new"), Some(follow)));
    assert_eq!(merged.conflicts, 1, "the visit's mode was edited at once; consent changes are statements, not a conflict: {merged:?}");
    let consent = a.person("p-1").await.unwrap().consent;
    assert_eq!((consent.share_with_coordinator, consent.research, consent.updated_at), (false, true, t(1, 10)));

    // A damaged visit (no mode) and a damaged check-in (a wellbeing score out of range), as a
    // buggy peer could write them: both are left out of the line as of the record.
    let doc = a.export_document("p-1").await.unwrap();
    let mut am = Automerge::load(&doc).unwrap().with_actor(ActorId::from(vec![9; 16]));
    let mut tx = am.transaction();
    let (_, visits) = tx.get(ROOT, "visits").unwrap().unwrap();
    let v = tx.put_object(&visits, "v-zz", ObjType::Map).unwrap();
    tx.put(&v, "by", "w-009").unwrap();
    tx.put(&v, "started_at", automerge::ScalarValue::Timestamp(t(4, 9).timestamp_millis())).unwrap();
    let (_, checkins) = tx.get(ROOT, "checkins").unwrap().unwrap();
    let c = tx.put_object(&checkins, "c-zz", ObjType::Map).unwrap();
    let w = tx.put_object(&c, "wellbeing", ObjType::List).unwrap();
    tx.insert(&w, 0, 900i64).unwrap();
    tx.commit_with(CommitOptions::default());
    a.import_document("p-1", am.save()).await.unwrap();
    let damaged = line(&a).await;
    assert_eq!((damaged.visits, damaged.checkins, damaged.last_visit_id.as_deref()), (4, 1, Some("v-new")));
}

/// Consent is the person's word, and the latest word counts: changes of consent told to two
/// workers whose phones were offline resolve by when they were made, on every device alike,
/// not by which phone happened to write more.
#[tokio::test]
async fn concurrent_consent_changes_resolve_to_the_latest_by_time() {
    let off = |field: &str, value: bool| match field {
        "share" => ConsentChange { share_with_coordinator: Some(value), ..Default::default() },
        "research" => ConsentChange { research: Some(value), ..Default::default() },
        _ => ConsentChange { record: Some(value), ..Default::default() },
    };
    let pair = || async {
        let (a, ca) = device("w-001").await;
        let (b, cb) = device("w-002").await;
        a.register_person(person("p-1", "KM-1")).await.unwrap();
        b.import_document("p-1", a.export_document("p-1").await.unwrap()).await.unwrap();
        assert!(a.person("p-1").await.unwrap().consent.share_with_coordinator, "registered sharing");
        (a, ca, b, cb)
    };
    let consent = |d: peersync_core::Device| async move { d.person("p-1").await.unwrap().consent };

    // B's phone turns sharing off and on again (9:00, 9:30), more writes than A's; A's phone
    // is told of a withdrawal at 10:00. The withdrawal is the latest word.
    let (a, ca, b, cb) = pair().await;
    cb.set(t(2, 9));
    b.set_consent("p-1", off("share", false)).await.unwrap();
    cb.set(t(2, 9) + chrono::Duration::minutes(30));
    b.set_consent("p-1", off("share", true)).await.unwrap();
    ca.set(t(2, 10));
    a.set_consent("p-1", off("share", false)).await.unwrap();
    exchange(&a, &b, "p-1").await;
    let (on_a, on_b) = (consent(a.clone()).await, consent(b.clone()).await);
    assert_eq!(on_a, on_b, "every device reads the same consent");
    assert!(!on_a.share_with_coordinator, "the 10:00 withdrawal stands: {on_a:?}");
    assert_eq!(on_a.updated_at, t(2, 10));
    let line = a.people().await.unwrap().into_iter().find(|p| p.id == "p-1").unwrap();
    assert!(!line.share_with_coordinator, "the caseload line agrees");
    assert!(a.person("p-1").await.unwrap().conflicts.is_empty(), "nothing to resolve by hand");

    // A withdrawal at 10:00 on A, then at 11:00 the person tells B's worker they are happy to
    // share (B's phone shows sharing on already): the later word wins.
    let (a, ca, b, cb) = pair().await;
    ca.set(t(2, 10));
    a.set_consent("p-1", off("share", false)).await.unwrap();
    cb.set(t(2, 11));
    b.set_consent("p-1", off("share", true)).await.unwrap();
    exchange(&a, &b, "p-1").await;
    assert!(consent(a.clone()).await.share_with_coordinator);
    assert!(consent(b.clone()).await.share_with_coordinator);

    // At the same moment, the narrower consent wins; fields changed apart do not interfere.
    let (a, ca, b, cb) = pair().await;
    ca.set(t(2, 10));
    cb.set(t(2, 10));
    b.set_consent("p-1", off("share", true)).await.unwrap();
    a.set_consent("p-1", off("share", false)).await.unwrap();
    cb.set(t(2, 8));
    b.set_consent("p-1", off("research", true)).await.unwrap();
    exchange(&a, &b, "p-1").await;
    for d in [a.clone(), b.clone()] {
        let c = consent(d).await;
        assert_eq!((c.share_with_coordinator, c.research, c.record), (false, true, true), "{c:?}");
    }

    // A phone whose clock is behind a change it already holds (12:00, with its clock at
    // 11:00) dates its own change just after that one: the person said it later, whatever the
    // clock says. Likewise a change in the millisecond of registration.
    let (a, ca, b, cb) = pair().await;
    cb.set(t(2, 12));
    b.set_consent("p-1", off("share", false)).await.unwrap();
    exchange(&a, &b, "p-1").await;
    ca.set(t(2, 11));
    let now = a.set_consent("p-1", off("share", true)).await.unwrap();
    assert!(now.share_with_coordinator, "{now:?}");
    assert_eq!(now.updated_at, t(2, 12) + chrono::Duration::milliseconds(1));
    exchange(&a, &b, "p-1").await;
    assert_eq!(consent(b.clone()).await, now);
    let (c, _) = device("w-003").await;
    c.register_person(person_with("p-2", "KM-2", &[])).await.unwrap();
    let said = c.set_consent("p-2", off("research", true)).await.unwrap();
    assert!(said.research, "a change right after registration, on the same clock reading, stands: {said:?}");
}

/// What a buggy or hostile peer, a phone with its clock reset, or two phones registering one
/// person at once can write into consent never outranks the person's own latest word, never
/// panics, and reads the same everywhere.
#[tokio::test]
async fn consent_resists_damaged_statements_bad_clocks_and_double_registration() {
    use automerge::ScalarValue;
    use chrono::TimeZone;
    let share = |on: bool| ConsentChange { share_with_coordinator: Some(on), ..Default::default() };
    let (a, clock) = device("w-001").await;
    a.register_person(person("p-1", "KM-1")).await.unwrap();
    // A peer writes a statement dated 9999 (sharing on), one without a time (research on), one
    // that is not a map, one with a time that is not a time.
    let doc = a.export_document("p-1").await.unwrap();
    let mut am = Automerge::load(&doc).unwrap().with_actor(ActorId::from(vec![9; 16]));
    let mut tx = am.transaction();
    let (_, consent) = tx.get(ROOT, "consent").unwrap().unwrap();
    let future = tx.put_object(&consent, "set:future", ObjType::Map).unwrap();
    tx.put(&future, "at", ScalarValue::Timestamp(253_402_300_799_000)).unwrap();
    tx.put(&future, "share_with_coordinator", true).unwrap();
    let untimed = tx.put_object(&consent, "set:untimed", ObjType::Map).unwrap();
    tx.put(&untimed, "research", true).unwrap();
    tx.put(&consent, "set:scalar", "junk").unwrap();
    let odd = tx.put_object(&consent, "set:odd", ObjType::Map).unwrap();
    tx.put(&odd, "at", "tomorrow").unwrap();
    tx.put(&odd, "record", "no").unwrap();
    tx.commit_with(CommitOptions::default());
    a.import_document("p-1", am.save()).await.unwrap();
    let held = a.person("p-1").await.unwrap().consent;
    assert_eq!((held.record, held.share_with_coordinator, held.research, held.updated_at), (true, true, false, t(1, 9)), "only the registration counts");
    // The person withdraws on a phone whose clock was reset to 1970: the change still counts.
    clock.set(chrono::Utc.timestamp_opt(0, 0).unwrap());
    let now = a.set_consent("p-1", share(false)).await.unwrap();
    assert!(!now.share_with_coordinator, "{now:?}");
    assert_eq!(now.updated_at, t(1, 9) + chrono::Duration::milliseconds(1));
    assert!(a.person("p-1").await.unwrap().conflicts.is_empty());

    // Two phones register one person at once, one sharing and one not: the narrower wins, on both.
    let (b, _) = device("w-002").await;
    let (c, _) = device("w-003").await;
    b.register_person(person_with("p-2", "KM-2", &[])).await.unwrap();
    let mut not_sharing = person_with("p-2", "KM-2", &[]);
    not_sharing.share_with_coordinator = false;
    c.register_person(not_sharing).await.unwrap();
    exchange(&b, &c, "p-2").await;
    for d in [&b, &c] {
        let r = d.person("p-2").await.unwrap();
        assert!(!r.consent.share_with_coordinator, "{:?}", r.consent);
        assert!(r.conflicts.iter().all(|c| !c.field.starts_with("consent/")), "consent is resolved, not a conflict: {:?}", r.conflicts);
    }

    // A peer deletes the registered consent fields: the server reads the narrower defaults
    // (not "no consent", which would leave what it knew before standing).
    let doc = b.export_document("p-2").await.unwrap();
    let mut am = Automerge::load(&doc).unwrap().with_actor(ActorId::from(vec![8; 16]));
    let mut tx = am.transaction();
    let (_, consent) = tx.get(ROOT, "consent").unwrap().unwrap();
    tx.delete(&consent, "share_with_coordinator").unwrap();
    tx.delete(&consent, "record").unwrap();
    tx.commit_with(CommitOptions::default());
    let (_, read) = peersync_core::document::profile_and_consent(&am);
    let read = read.expect("a registered person always has a consent");
    assert!(!read.share_with_coordinator && read.record);
    let (skeleton, _) = PersonDoc::create("p-3", ActorId::random());
    assert!(peersync_core::document::profile_and_consent(skeleton.automerge()).1.is_none(), "before registration, none");
}

#[tokio::test]
async fn an_import_that_brings_nothing_leaves_no_empty_person_behind() {
    let (a, _) = device("w-001").await;
    // Damaged bytes, and a document with no changes at all.
    assert!(a.import_document("p-x", b"not automerge".to_vec()).await.is_err());
    assert!(!a.import_document("p-x", automerge::Automerge::new().save()).await.unwrap());
    for read in [a.export_document("p-x").await.err(), a.heads("p-x").await.err(), a.person("p-x").await.err()] {
        assert!(matches!(read, Some(CoreError::UnknownPerson(_))), "{read:?}");
    }
    assert!(a.people().await.unwrap().is_empty());
}

/// Documents written before visits and check-ins were held as `original` JSON text (every
/// field its own key, lists as automerge lists) read exactly as the same records written now,
/// take edits, and merge with edits from phones of either kind.
#[test]
fn records_in_the_earlier_layout_read_the_same_and_take_edits() {
    use automerge::ScalarValue;
    use peersync_core::{Checkin, Consent, Person, Visit};

    let person = Person {
        id: "p-1".into(),
        alias: "KM-1".into(),
        year_of_birth: 1980,
        workers: vec!["w-1".into(), "w-2".into()],
        created_by: "w-1".into(),
        created_at: t(1, 9),
    };
    let consent = Consent { record: true, share_with_coordinator: true, research: false, updated_at: t(1, 9) };
    let visit = Visit {
        id: "v-1".into(),
        by: "w-1".into(),
        started_at: t(2, 10),
        duration_min: 45,
        mode: "in_person".into(),
        setting: "home".into(),
        activities: vec!["support".into(), "advocacy".into()],
        goals: vec!["housing".into()],
        referrals: vec![],
        notes: "went to the housing office together".into(),
        follow_up: Some(t(9, 10).date_naive()),
        recorded_at: t(2, 11),
    };
    let checkin = Checkin {
        id: "c-1".into(),
        by: "w-1".into(),
        taken_at: t(2, 12),
        wellbeing: vec![3, 4, 2, 5, 1, 3, 4],
        distress: 2,
        coping: 4,
        social_support: 3,
        self_efficacy: 3,
        quality_of_life: 4,
        housing: "stable".into(),
        employment: "training".into(),
        hospital_nights_28d: 0,
        substance_use_days_28d: None,
    };

    // Written now.
    let (mut now, _) = PersonDoc::create("p-1", ActorId::from(vec![1; 16]));
    now.write_profile(&person, &consent).unwrap();
    now.add_visit(&visit).unwrap();
    now.add_checkin(&checkin).unwrap();
    // A new visit or check-in is two operations (its map and `original`), which is what
    // makes loading a record cheap.
    for id in ["v-1", "c-1"] {
        let map = ["visits", "checkins"].iter().find_map(|s| {
            let (_, section) = now.automerge().get(ROOT, *s).unwrap()?;
            now.automerge().get(&section, id).unwrap()
        });
        assert!(map.is_some(), "{id} is a map");
    }
    let ops: usize = now.automerge().get_changes(&[]).iter().rev().take(2).map(|c| c.len()).sum();
    assert_eq!(ops, 4, "a visit and a check-in take two operations each");

    // Written the earlier way, by hand.
    let (mut before, _) = PersonDoc::create("p-1", ActorId::from(vec![2; 16]));
    let ms = |t: chrono::DateTime<chrono::Utc>| ScalarValue::Timestamp(t.timestamp_millis());
    let doc = before.automerge_mut();
    let section = |doc: &Automerge, s: &str| doc.get(ROOT, s).unwrap().unwrap().1;
    let (profile, consent_map, visits, checkins) =
        (section(doc, "profile"), section(doc, "consent"), section(doc, "visits"), section(doc, "checkins"));
    let mut tx = doc.transaction();
    let list = |tx: &mut automerge::transaction::Transaction<'_>, obj: &automerge::ObjId, key: &str, items: Vec<ScalarValue>| {
        let l = tx.put_object(obj, key, ObjType::List).unwrap();
        for (i, item) in items.into_iter().enumerate() {
            tx.insert(&l, i, item).unwrap();
        }
    };
    let strs = |v: &[String]| v.iter().map(|s| ScalarValue::from(s.as_str())).collect::<Vec<_>>();
    tx.put(&profile, "id", "p-1").unwrap();
    tx.put(&profile, "alias", "KM-1").unwrap();
    tx.put(&profile, "year_of_birth", 1980i64).unwrap();
    list(&mut tx, &profile, "workers", strs(&person.workers));
    tx.put(&profile, "created_by", "w-1").unwrap();
    tx.put(&profile, "created_at", ms(person.created_at)).unwrap();
    tx.put(&consent_map, "record", true).unwrap();
    tx.put(&consent_map, "share_with_coordinator", true).unwrap();
    tx.put(&consent_map, "research", false).unwrap();
    tx.put(&consent_map, "updated_at", ms(consent.updated_at)).unwrap();
    let v = tx.put_object(&visits, "v-1", ObjType::Map).unwrap();
    tx.put(&v, "by", "w-1").unwrap();
    tx.put(&v, "started_at", ms(visit.started_at)).unwrap();
    tx.put(&v, "duration_min", 45i64).unwrap();
    tx.put(&v, "mode", "in_person").unwrap();
    tx.put(&v, "setting", "home").unwrap();
    list(&mut tx, &v, "activities", strs(&visit.activities));
    list(&mut tx, &v, "goals", strs(&visit.goals));
    list(&mut tx, &v, "referrals", vec![]);
    tx.put(&v, "notes", visit.notes.as_str()).unwrap();
    tx.put(&v, "follow_up", visit.follow_up.unwrap().format("%Y-%m-%d").to_string()).unwrap();
    tx.put(&v, "recorded_at", ms(visit.recorded_at)).unwrap();
    let c = tx.put_object(&checkins, "c-1", ObjType::Map).unwrap();
    tx.put(&c, "by", "w-1").unwrap();
    tx.put(&c, "taken_at", ms(checkin.taken_at)).unwrap();
    list(&mut tx, &c, "wellbeing", checkin.wellbeing.iter().map(|w| ScalarValue::Int(*w as i64)).collect());
    for (k, n) in [("distress", 2i64), ("coping", 4), ("social_support", 3), ("self_efficacy", 3), ("quality_of_life", 4)] {
        tx.put(&c, k, n).unwrap();
    }
    tx.put(&c, "housing", "stable").unwrap();
    tx.put(&c, "employment", "training").unwrap();
    tx.put(&c, "hospital_nights_28d", 0i64).unwrap();
    tx.put(&c, "substance_use_days_28d", ScalarValue::Null).unwrap();
    tx.commit();

    let expected = now.record().unwrap();
    assert_eq!(expected.visits, vec![visit.clone()]);
    assert_eq!(expected.checkins, vec![checkin]);
    assert_eq!(expected.person, person);
    assert_eq!(before.record().unwrap(), expected, "the earlier layout reads as the same record");
    assert_eq!(before.summary().unwrap(), now.summary().unwrap());

    // Edits: the edited fields win over what was recorded, on either layout.
    let edit = VisitEdit { activities: Some(vec!["listening".into()]), duration_min: Some(60), ..Default::default() };
    for doc in [&mut now, &mut before] {
        doc.edit_visit("v-1", &edit, t(3, 9)).unwrap();
        let v = &doc.record().unwrap().visits[0];
        assert_eq!((v.activities.as_slice(), v.duration_min, v.notes.as_str()), (&["listening".to_string()][..], 60, visit.notes.as_str()));
    }

    // A list edited at once on a phone of each kind: one winner everywhere, both shown as lists.
    let (mut new_phone, _) = PersonDoc::create("p-1", ActorId::from(vec![3; 16]));
    new_phone.automerge_mut().merge(&mut before.automerge().clone()).unwrap();
    let v = new_phone.automerge().get(section(new_phone.automerge(), "visits"), "v-1").unwrap().unwrap().1;
    let mut tx = before.automerge_mut().transaction();
    list(&mut tx, &v, "goals", strs(&["employment".to_string()]));
    tx.commit();
    new_phone.edit_visit("v-1", &VisitEdit { goals: Some(vec!["education".into()]), ..Default::default() }, t(3, 10)).unwrap();
    let mut other = new_phone.automerge().clone();
    before.automerge_mut().merge(&mut other).unwrap();
    new_phone.automerge_mut().merge(&mut before.automerge().clone()).unwrap();
    let (ra, rb) = (before.record().unwrap(), new_phone.record().unwrap());
    assert_eq!(ra, rb);
    let conflict = ra.conflicts.iter().find(|c| c.field == "visits/v-1/goals").expect("the goals conflict");
    let mut shown = conflict.values.clone();
    shown.sort();
    assert_eq!(shown, ["[\"education\"]", "[\"employment\"]"]);
    assert_eq!(conflict.values[0], serde_json::to_string(&ra.visits[0].goals).unwrap(), "the winner is listed first");

    // Damage, as a buggy or hostile peer could write it: an earlier-layout list item that is
    // neither text nor a number is dropped as it always was; a visit whose `original` is not a
    // JSON object is skipped, not the record; `original` means nothing outside visits and
    // check-ins (a profile without its id stays damaged).
    let (mut damaged, _) = PersonDoc::create("p-1", ActorId::from(vec![4; 16]));
    damaged.automerge_mut().merge(&mut now.automerge().clone()).unwrap();
    let doc = damaged.automerge_mut();
    let (profile, visits) = (section(doc, "profile"), section(doc, "visits"));
    let v1 = doc.get(&visits, "v-1").unwrap().unwrap().1;
    let mut tx = doc.transaction();
    list(&mut tx, &v1, "referrals", vec![ScalarValue::from("peer_group"), ScalarValue::Timestamp(0), ScalarValue::F64(1.5)]);
    for (id, text) in [("v-2", "[1, 2]"), ("v-3", "{\"by\": "), ("v-4", "7")] {
        let v = tx.put_object(&visits, id, ObjType::Map).unwrap();
        tx.put(&v, "original", text).unwrap();
    }
    tx.commit();
    let record = damaged.record().unwrap();
    assert_eq!(record.visits.len(), 1, "the damaged visits are skipped: {:?}", record.visits);
    assert_eq!(record.visits[0].referrals, ["peer_group"]);
    assert_eq!(damaged.summary().unwrap().visits, 1);
    let mut tx = damaged.automerge_mut().transaction();
    tx.delete(&profile, "id").unwrap();
    tx.put(&profile, "original", r#"{"id": "p-1"}"#).unwrap();
    tx.commit();
    assert!(damaged.record().is_err(), "a profile without its id is damaged, `original` or not");
}
