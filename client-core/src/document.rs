//! One automerge document per person: how the domain model maps onto it.
//!
//! Layout of a person document:
//! ```text
//! { profile:  { id, alias, year_of_birth, workers: "[..]", created_by, created_at },
//!   consent:  { record, share_with_coordinator, research, updated_at,
//!               set:<random>: { at, by, record?, share_with_coordinator?, research? } },
//!   visits:   { <visit id>:   { original: "{ by, started_at, duration_min, mode, setting,
//!                                activities: [..], goals: [..], referrals: [..], notes,
//!                                follow_up, recorded_at }", <edited field>: value, .. } },
//!   checkins: { <checkin id>: { original: "{ by, taken_at, wellbeing: [7 x 1..5], distress,
//!                                coping, social_support, self_efficacy, quality_of_life,
//!                                housing, employment, hospital_nights_28d,
//!                                substance_use_days_28d }" } } }
//! ```
//! Every scalar field is a last-writer-wins register: concurrent edits keep one winner on
//! every device and the other values stay readable through `get_all` (reported as conflicts).
//! Lists are replaced whole, never edited in place, so they are registers too, held as JSON
//! text (`["listening","advocacy"]`).
//!
//! A visit or check-in is written as recorded in one JSON text, `original`, and an edit puts
//! the fields it changes beside it, each its own register, which the reader takes over the
//! original's. A field is thus a register as it always was, but a new visit is two automerge
//! operations instead of about twenty: loading a document costs automerge time in proportion
//! to its operations (a twelve-week record loaded 4–5 times faster), and loading is most of
//! what a server checking a first upload and a phone restoring its caseload spend their CPU
//! on. Documents written before this layout (every field its own key, lists as automerge
//! lists) read the same, through the same code: a field missing from the map is looked up in
//! `original`, and a list may be an automerge list or JSON text.
//!
//! Consent is the exception: it is the person's word, and the latest word counts. Registration
//! writes it into the `consent` map's own fields; each later change is a statement under a key
//! of its own (`set:<random>`), holding its time and only the fields it sets. For each field
//! the statement with the latest time wins, on every device alike, whichever phone made it and
//! whatever automerge's order of concurrent writes; at the same time, `false` (the narrower
//! consent) wins. A phone dates its change after every statement it already holds (see
//! `Device::set_consent`), so a change made knowing another always comes after it. As
//! registers, a withdrawal told to one worker offline could lose to an earlier change on
//! another phone that happened to have written more.
//!
//! The skeleton pitfall: if two devices each created `visits` in their own change, the two
//! maps would compete for the key and one device's visits would vanish from view. The skeleton
//! (the four top-level maps) is therefore made by one deterministic change — fixed actor, fixed
//! time, no dependencies — so it has the same hash everywhere and automerge treats every
//! device's copy as the same change.

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ScalarValueRef, Value, ValueRef};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::caseload::PersonSummary;
use crate::error::CoreError;
use crate::model::{Checkin, Consent, ConsentChange, Person, Visit, VisitEdit};
use crate::store::DocData;

/// Actor of the skeleton change. Never used for anything else.
const SKELETON_ACTOR: &[u8; 16] = b"peersync:skel:v1";
const SECTIONS: [&str; 4] = ["profile", "consent", "visits", "checkins"];
/// Key prefix of a consent statement in the `consent` map.
const CONSENT_STATEMENT: &str = "set:";

/// Two or more values written concurrently to one field; the first is the one shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldConflict {
    /// Path of the field: `profile/alias`, `visits/<id>/notes`. (Consent has none: it resolves
    /// by rule, see the module's documentation.)
    pub field: String,
    /// Every concurrent value as JSON text, the winner first.
    pub values: Vec<String>,
}

/// Everything the device holds about one person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRecord {
    pub person: Person,
    pub consent: Consent,
    /// Visits, most recent `started_at` first.
    pub visits: Vec<Visit>,
    /// Check-ins, most recent first.
    pub checkins: Vec<Checkin>,
    /// Fields edited concurrently on two phones.
    pub conflicts: Vec<FieldConflict>,
}

pub struct PersonDoc {
    id: String,
    doc: Automerge,
}

fn ts(t: DateTime<Utc>) -> ScalarValue {
    ScalarValue::Timestamp(t.timestamp_millis())
}

fn date(d: Option<NaiveDate>) -> ScalarValue {
    match d {
        Some(d) => ScalarValue::Str(d.format(DAY).to_string().into()),
        None => ScalarValue::Null,
    }
}

/// A list as the register it is stored as: JSON text.
fn list_text<T: Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("a list of strings or numbers always serialises")
}

/// How a day (a follow-up date) is written, in a field and in `original` alike.
const DAY: &str = "%Y-%m-%d";

/// The key of a visit's or check-in's fields as recorded (see the module's documentation).
const ORIGINAL: &str = "original";

/// Fields that hold lists; their conflicting values are shown as the lists they hold.
const LIST_FIELDS: [&str; 5] = ["workers", "activities", "goals", "referrals", "wellbeing"];

/// The skeleton change, identical on every device.
fn skeleton() -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(&SKELETON_ACTOR[..]));
    let mut tx = doc.transaction();
    for s in SECTIONS {
        tx.put_object(ROOT, s, ObjType::Map).expect("putting a map on a new document cannot fail");
    }
    tx.commit_with(CommitOptions::default().with_time(0));
    doc
}

impl PersonDoc {
    /// A new document for `id` holding only the skeleton, and the skeleton's change bytes.
    pub fn create(id: &str, actor: ActorId) -> (Self, Vec<u8>) {
        let mut doc = skeleton();
        let bytes = doc.save_after(&[]);
        doc.set_actor(actor);
        (Self { id: id.to_string(), doc }, bytes)
    }

    /// Rebuild from what the store holds.
    pub fn load(id: &str, data: &DocData, actor: ActorId) -> Result<Self, CoreError> {
        let mut doc = match &data.snapshot {
            Some(s) => Automerge::load(s).map_err(|e| CoreError::document(id, e))?,
            None => Automerge::new(),
        };
        for chunk in &data.changes {
            doc.load_incremental(chunk).map_err(|e| CoreError::document(id, e))?;
        }
        doc.set_actor(actor);
        Ok(Self { id: id.to_string(), doc })
    }

    /// Wrap automerge data received from elsewhere (the server reads records this way).
    pub fn from_automerge(id: &str, doc: Automerge) -> Self {
        Self { id: id.to_string(), doc }
    }

    /// An empty document (no skeleton), to receive a peer's data into.
    pub fn empty(id: &str, actor: ActorId) -> Self {
        Self { id: id.to_string(), doc: Automerge::new().with_actor(actor) }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    pub fn automerge_mut(&mut self) -> &mut Automerge {
        &mut self.doc
    }

    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    fn section(&self, name: &str) -> Result<ObjId, CoreError> {
        match self.doc.get(ROOT, name) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Ok(id),
            _ => Err(CoreError::document(&self.id, format!("the `{name}` map is missing"))),
        }
    }

    fn child(&self, section: &str, key: &str) -> Result<Option<ObjId>, CoreError> {
        let parent = self.section(section)?;
        Ok(match self.doc.get(&parent, key) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
            _ => None,
        })
    }

    pub fn has_profile(&self) -> bool {
        self.section("profile")
            .map(|p| self.doc.get(&p, "id").ok().flatten().is_some())
            .unwrap_or(false)
    }

    pub fn has_visit(&self, id: &str) -> bool {
        self.child("visits", id).ok().flatten().is_some()
    }

    pub fn has_checkin(&self, id: &str) -> bool {
        self.child("checkins", id).ok().flatten().is_some()
    }

    /// Run `f` as one automerge change and return the change's bytes (empty if `f` wrote nothing).
    fn change<F>(&mut self, at: DateTime<Utc>, f: F) -> Result<Vec<u8>, CoreError>
    where
        F: FnOnce(&mut Transaction<'_>) -> Result<(), AutomergeError>,
    {
        let id = self.id.clone();
        let res = self
            .doc
            .transact_with(|_| CommitOptions::default().with_time(at.timestamp()), f)
            .map_err(|failure| CoreError::document(&id, failure.error))?;
        Ok(match res.hash {
            Some(h) => self
                .doc
                .get_change_by_hash(&h)
                .map(|c| c.raw_bytes().to_vec())
                .unwrap_or_default(),
            None => Vec::new(),
        })
    }

    pub fn write_profile(&mut self, p: &Person, c: &Consent) -> Result<Vec<u8>, CoreError> {
        let profile = self.section("profile")?;
        let consent = self.section("consent")?;
        self.change(p.created_at, |tx| {
            tx.put(&profile, "id", p.id.as_str())?;
            tx.put(&profile, "alias", p.alias.as_str())?;
            tx.put(&profile, "year_of_birth", p.year_of_birth as i64)?;
            tx.put(&profile, "workers", list_text(&p.workers))?;
            tx.put(&profile, "created_by", p.created_by.as_str())?;
            tx.put(&profile, "created_at", ts(p.created_at))?;
            write_consent(tx, &consent, c)
        })
    }

    /// Record a change of consent told to worker `by` at `at`: a statement of the fields it
    /// sets (see the module's documentation).
    pub fn add_consent_statement(&mut self, change: &ConsentChange, at: DateTime<Utc>, by: &str) -> Result<Vec<u8>, CoreError> {
        let consent = self.section("consent")?;
        let key = format!("{CONSENT_STATEMENT}{}", uuid::Uuid::new_v4().simple());
        self.change(at, |tx| {
            let statement = tx.put_object(&consent, key.as_str(), ObjType::Map)?;
            tx.put(&statement, "at", ts(at))?;
            tx.put(&statement, "by", by)?;
            let fields = [("record", change.record), ("share_with_coordinator", change.share_with_coordinator), ("research", change.research)];
            for (field, value) in fields {
                if let Some(value) = value {
                    tx.put(&statement, field, value)?;
                }
            }
            Ok(())
        })
    }

    pub fn add_visit(&mut self, v: &Visit) -> Result<Vec<u8>, CoreError> {
        let visits = self.section("visits")?;
        self.change(v.recorded_at, |tx| {
            let obj = tx.put_object(&visits, v.id.as_str(), ObjType::Map)?;
            let original = serde_json::json!({
                "by": v.by,
                "started_at": v.started_at.timestamp_millis(),
                "duration_min": v.duration_min,
                "mode": v.mode,
                "setting": v.setting,
                "activities": v.activities,
                "goals": v.goals,
                "referrals": v.referrals,
                "notes": v.notes,
                "follow_up": v.follow_up.map(|d| d.format(DAY).to_string()),
                "recorded_at": v.recorded_at.timestamp_millis(),
            });
            tx.put(&obj, ORIGINAL, original.to_string())
        })
    }

    pub fn edit_visit(&mut self, visit: &str, e: &VisitEdit, at: DateTime<Utc>) -> Result<Vec<u8>, CoreError> {
        let obj = self.child("visits", visit)?.ok_or_else(|| CoreError::UnknownVisit {
            person: self.id.clone(),
            visit: visit.to_string(),
        })?;
        self.change(at, |tx| {
            if let Some(t) = e.started_at {
                tx.put(&obj, "started_at", ts(t))?;
            }
            if let Some(d) = e.duration_min {
                tx.put(&obj, "duration_min", d as i64)?;
            }
            if let Some(m) = &e.mode {
                tx.put(&obj, "mode", m.as_str())?;
            }
            if let Some(s) = &e.setting {
                tx.put(&obj, "setting", s.as_str())?;
            }
            for (key, list) in [("activities", &e.activities), ("goals", &e.goals), ("referrals", &e.referrals)] {
                if let Some(list) = list {
                    tx.put(&obj, key, list_text(list))?;
                }
            }
            if let Some(n) = &e.notes {
                tx.put(&obj, "notes", n.as_str())?;
            }
            if let Some(f) = e.follow_up {
                tx.put(&obj, "follow_up", date(f))?;
            }
            Ok(())
        })
    }

    pub fn add_checkin(&mut self, c: &Checkin) -> Result<Vec<u8>, CoreError> {
        let checkins = self.section("checkins")?;
        self.change(c.taken_at, |tx| {
            let obj = tx.put_object(&checkins, c.id.as_str(), ObjType::Map)?;
            let original = serde_json::json!({
                "by": c.by,
                "taken_at": c.taken_at.timestamp_millis(),
                "wellbeing": c.wellbeing,
                "distress": c.distress,
                "coping": c.coping,
                "social_support": c.social_support,
                "self_efficacy": c.self_efficacy,
                "quality_of_life": c.quality_of_life,
                "housing": c.housing,
                "employment": c.employment,
                "hospital_nights_28d": c.hospital_nights_28d,
                "substance_use_days_28d": c.substance_use_days_28d,
            });
            tx.put(&obj, ORIGINAL, original.to_string())
        })
    }

    /// The full record as this device sees it. Fails only if the profile is missing or damaged;
    /// a damaged visit or check-in (from a buggy peer) is skipped rather than hiding the rest.
    pub fn record(&self) -> Result<PersonRecord, CoreError> {
        read_record(&self.id, &self.doc)
    }

    /// `self.record()?.consent`, for less reading.
    pub fn consent(&self) -> Result<Consent, CoreError> {
        RecordReader { id: &self.id, doc: &self.doc }.consent()
    }

    /// The caseload line: what `PersonSummary::of(&self.record()?)` gives, for less reading.
    pub fn summary(&self) -> Result<PersonSummary, CoreError> {
        RecordReader { id: &self.id, doc: &self.doc }.summary()
    }
}

/// The full record held in automerge data `doc` of person `id` (see [`PersonDoc::record`]).
pub fn read_record(id: &str, doc: &Automerge) -> Result<PersonRecord, CoreError> {
    RecordReader { id, doc }.record()
}

struct RecordReader<'a> {
    id: &'a str,
    doc: &'a Automerge,
}

impl RecordReader<'_> {
    fn section(&self, name: &str) -> Result<ObjId, CoreError> {
        match self.doc.get(ROOT, name) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Ok(id),
            _ => Err(CoreError::document(self.id, format!("the `{name}` map is missing"))),
        }
    }

    /// `PersonSummary::of(&self.record()?)`, without reading what the caseload line does not
    /// show (the visits' lists and notes, the conflicting values): every stored change of a
    /// person, and every person a restore brings, computes it.
    fn summary(&self) -> Result<PersonSummary, CoreError> {
        let r = Reader { doc: self.doc };
        let profile = r.fields(&self.section("profile")?);
        let consent = r.fields(&self.section("consent")?);
        let bad = |what: &str| CoreError::document(self.id, format!("{what} is missing or damaged"));
        let id = r.str(&profile, "id").ok_or_else(|| bad("profile id"))?;
        let alias = r.str(&profile, "alias").ok_or_else(|| bad("alias"))?;
        let year_of_birth = r.int(&profile, "year_of_birth").ok_or_else(|| bad("year_of_birth"))? as i32;
        let created_at = r.time(&profile, "created_at").ok_or_else(|| bad("created_at"))?;
        // Consent is resolved by rule (see `consent_of`), never left to a person to pick.
        let mut conflicts = r.conflict_count(&profile);

        // The most recent visit: latest start, then (as the record sorts them) the smallest id.
        let mut visits = 0u32;
        let mut last: Option<(DateTime<Utc>, String, Option<NaiveDate>)> = None;
        let vmap = self.section("visits")?;
        for item in self.doc.map_range(&vmap, ..) {
            if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
                continue;
            }
            let obj = r.entry(&item.id());
            let Some(core) = r.visit_core(&obj) else { continue };
            visits += 1;
            conflicts += r.conflict_count(&obj);
            let newer = last.as_ref().is_none_or(|(t, id, _)| core.started_at > *t || (core.started_at == *t && *item.key < **id));
            if newer {
                last = Some((core.started_at, item.key.to_string(), r.date(&obj, "follow_up").flatten()));
            }
        }
        let mut checkins = 0u32;
        let cmap = self.section("checkins")?;
        for item in self.doc.map_range(&cmap, ..) {
            if matches!(item.value, ValueRef::Object(ObjType::Map)) && r.checkin(&r.entry(&item.id()), &item.key).is_some() {
                checkins += 1;
            }
        }
        let (last_visit, last_visit_id, next_follow_up) = match last {
            Some((at, id, follow_up)) => (Some(at), Some(id), follow_up),
            None => (None, None, None),
        };
        Ok(PersonSummary {
            id,
            alias,
            year_of_birth,
            visits,
            checkins,
            last_visit,
            last_visit_id,
            next_follow_up,
            share_with_coordinator: consent_of(&r, &consent, created_at).share_with_coordinator,
            conflicts,
        })
    }

    /// The consent alone, as [`Self::record`] reads it: recording asks for it before every
    /// change, and reading the whole record for that cost a replay 7% of its CPU.
    fn consent(&self) -> Result<Consent, CoreError> {
        let r = Reader { doc: self.doc };
        let profile = r.fields(&self.section("profile")?);
        let consent = r.fields(&self.section("consent")?);
        let created_at = r.time(&profile, "created_at").ok_or_else(|| CoreError::document(self.id, "created_at is missing or damaged"))?;
        Ok(consent_of(&r, &consent, created_at))
    }

    fn record(&self) -> Result<PersonRecord, CoreError> {
        let r = Reader { doc: self.doc };
        let profile = r.fields(&self.section("profile")?);
        let consent = r.fields(&self.section("consent")?);
        let bad = |what: &str| CoreError::document(self.id, format!("{what} is missing or damaged"));
        let person = Person {
            id: r.str(&profile, "id").ok_or_else(|| bad("profile id"))?,
            alias: r.str(&profile, "alias").ok_or_else(|| bad("alias"))?,
            year_of_birth: r.int(&profile, "year_of_birth").ok_or_else(|| bad("year_of_birth"))? as i32,
            workers: r.str_list(&profile, "workers").unwrap_or_default(),
            created_by: r.str(&profile, "created_by").unwrap_or_default(),
            created_at: r.time(&profile, "created_at").ok_or_else(|| bad("created_at"))?,
        };
        let consent_rec = consent_of(&r, &consent, person.created_at);
        let mut conflicts = Vec::new();
        r.conflicts(&profile, "profile", &mut conflicts);

        let mut visits = Vec::new();
        let vmap = self.section("visits")?;
        for item in self.doc.map_range(&vmap, ..) {
            let key = item.key.to_string();
            if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
                continue;
            }
            let obj = r.entry(&item.id());
            if let Some(v) = r.visit(&obj, &key) {
                if !obj.conflicted.is_empty() {
                    r.conflicts(&obj, &format!("visits/{key}"), &mut conflicts);
                }
                visits.push(v);
            }
        }
        visits.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| a.id.cmp(&b.id)));

        let mut checkins = Vec::new();
        let cmap = self.section("checkins")?;
        for item in self.doc.map_range(&cmap, ..) {
            let key = item.key.to_string();
            if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
                continue;
            }
            if let Some(c) = r.checkin(&r.entry(&item.id()), &key) {
                checkins.push(c);
            }
        }
        checkins.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then_with(|| a.id.cmp(&b.id)));
        Ok(PersonRecord { person, consent: consent_rec, visits, checkins, conflicts })
    }
}

/// Consent as the person last gave it: the `consent` map's own fields (as registered), then
/// for each field the latest statement that sets it, `false` winning at the same time (see the
/// module's documentation). `created_at` (the profile's) dates consent never changed.
fn consent_of(r: &Reader<'_>, fields: &Fields<'_>, created_at: DateTime<Utc>) -> Consent {
    let registered = r.time(fields, "updated_at").filter(plausible).or(Some(created_at).filter(plausible)).unwrap_or(EARLIEST_CONSENT);
    let mut latest = [
        (registered, registered_bool(r, fields, "record", true)),
        (registered, registered_bool(r, fields, "share_with_coordinator", false)),
        (registered, registered_bool(r, fields, "research", false)),
    ];
    let mut updated_at = registered;
    for f in &fields.items {
        let Some(obj) = f.obj.as_ref().filter(|_| f.key.starts_with(CONSENT_STATEMENT)) else { continue };
        let statement = r.fields(obj);
        // A statement without a plausible time (damaged, or a buggy or hostile peer's: one
        // dated in the year 9999 would outrank every later word) cannot be placed: ignored.
        let Some(at) = r.time(&statement, "at").filter(plausible) else { continue };
        updated_at = updated_at.max(at);
        for (field, (then, value)) in ["record", "share_with_coordinator", "research"].into_iter().zip(latest.iter_mut()) {
            if let Some(said) = r.bool(&statement, field)
                && (at > *then || (at == *then && !said))
            {
                (*then, *value) = (at, said);
            }
        }
    }
    let [(_, record), (_, share_with_coordinator), (_, research)] = latest;
    Consent { record, share_with_coordinator, research, updated_at }
}

/// 2000-01-01: consent times before it are not placed (see [`plausible`]).
const EARLIEST_CONSENT: DateTime<Utc> = DateTime::from_timestamp_millis(946_684_800_000).expect("2000-01-01 is a time");

/// A consent time worth placing: from 2000 to before 2200. A phone's clock reset to 1970, or
/// a hostile peer's year 9999, must not decide whose word is the latest.
pub(crate) fn plausible(t: &DateTime<Utc>) -> bool {
    (946_684_800_000..7_258_118_400_000).contains(&t.timestamp_millis())
}

/// A field of consent as registered (the map's own field). Values written at once on two phones
/// (a person registered on both, or changes by versions before statements) resolve like
/// statements at the same time: `false`, the narrower consent, wins.
fn registered_bool(r: &Reader<'_>, fields: &Fields<'_>, key: &str, default: bool) -> bool {
    if fields.conflicted.iter().any(|k| k == key)
        && let Ok(all) = r.doc.get_all(&fields.obj, key)
        && all.iter().any(|(v, _)| matches!(v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Boolean(false))))
    {
        return false;
    }
    r.bool(fields, key).unwrap_or(default)
}

/// The workers listed in a document's profile and its consent, read straight from automerge
/// data (the server's view; it never needs the rest of the record).
pub fn profile_and_consent(doc: &Automerge) -> (Vec<String>, Option<Consent>) {
    let r = Reader { doc };
    let map = |name: &str| match doc.get(ROOT, name) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Some(r.fields(&id)),
        _ => None,
    };
    let profile = map("profile");
    let workers = profile.as_ref().and_then(|p| r.str_list(p, "workers")).unwrap_or_default();
    let created_at = profile.as_ref().and_then(|p| r.time(p, "created_at")).unwrap_or_default();
    // No consent before registration has written the profile. After it, always one: fields a
    // buggy or hostile peer removed read as the narrower default, never as "unchanged".
    let registered = profile.as_ref().is_some_and(|p| r.str(p, "id").is_some());
    let consent = map("consent").filter(|_| registered).map(|c| consent_of(&r, &c, created_at));
    (workers, consent)
}

fn write_consent(tx: &mut Transaction<'_>, obj: &ObjId, c: &Consent) -> Result<(), AutomergeError> {
    tx.put(obj, "record", c.record)?;
    tx.put(obj, "share_with_coordinator", c.share_with_coordinator)?;
    tx.put(obj, "research", c.research)?;
    tx.put(obj, "updated_at", ts(c.updated_at))
}

struct VisitCore {
    by: String,
    started_at: DateTime<Utc>,
    duration_min: u32,
    mode: String,
    setting: String,
    recorded_at: DateTime<Utc>,
}

/// Typed reads that treat a missing or mistyped field as absent.
struct Reader<'a> {
    doc: &'a Automerge,
}

/// The fields of one map object, read in a single pass (much cheaper than a `get` per field),
/// borrowed from the document: a record has a dozen fields per visit, and copying each key
/// and value into a map cost more than automerge's reading them.
struct Fields<'a> {
    obj: ObjId,
    items: Vec<Field<'a>>,
    /// Keys holding concurrent values.
    conflicted: Vec<String>,
    /// A visit's or check-in's fields as recorded, under the map's own (edited) fields.
    original: Option<serde_json::Map<String, serde_json::Value>>,
}

struct Field<'a> {
    key: std::borrow::Cow<'a, str>,
    value: ValueRef<'a>,
    /// The object's id, for fields holding one (lists written before lists were JSON text).
    obj: Option<ObjId>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&Field<'a>> {
        self.items.iter().find(|f| f.key == key)
    }
}

/// A field's value, wherever it is held.
enum Val<'f, 'a> {
    Scalar(&'f ScalarValueRef<'a>),
    /// An automerge list.
    List(&'f ObjId),
    /// A field of `original`.
    Json(&'f serde_json::Value),
}

impl<'a> Reader<'a> {
    /// The fields of a map (profile, consent, a consent statement).
    fn fields(&self, obj: &ObjId) -> Fields<'a> {
        self.read_map(obj, false)
    }

    /// The fields of a visit or check-in: its own (edited) fields over `original`'s.
    fn entry(&self, obj: &ObjId) -> Fields<'a> {
        self.read_map(obj, true)
    }

    fn read_map(&self, obj: &ObjId, entry: bool) -> Fields<'a> {
        let mut items = Vec::new();
        let mut conflicted = Vec::new();
        let mut original = None;
        for item in self.doc.map_range(obj, ..) {
            if entry && item.key == ORIGINAL {
                // Written once, with its map: two values only from a buggy or hostile peer,
                // not an edit to show as a conflict; the winner is read.
                if let ValueRef::Scalar(ScalarValueRef::Str(text)) = &item.value {
                    original = serde_json::from_str(text).ok();
                }
                continue;
            }
            if item.conflict {
                conflicted.push(item.key.to_string());
            }
            let obj = matches!(item.value, ValueRef::Object(_)).then(|| item.id());
            items.push(Field { key: item.key, value: item.value, obj });
        }
        Fields { obj: obj.clone(), items, conflicted, original }
    }

    /// The value of `key`: the map's own field if it has one (an edit, or a document written
    /// before `original`), else the original's.
    fn val<'f>(&self, f: &'f Fields<'a>, key: &str) -> Option<Val<'f, 'a>> {
        match f.get(key) {
            Some(field) => match (&field.value, &field.obj) {
                (ValueRef::Scalar(s), _) => Some(Val::Scalar(s)),
                (ValueRef::Object(ObjType::List), Some(list)) => Some(Val::List(list)),
                _ => None,
            },
            None => f.original.as_ref()?.get(key).map(Val::Json),
        }
    }

    fn str(&self, obj: &Fields<'a>, key: &str) -> Option<String> {
        match self.val(obj, key)? {
            Val::Scalar(ScalarValueRef::Str(s)) => Some(s.to_string()),
            Val::Json(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn int(&self, obj: &Fields<'a>, key: &str) -> Option<i64> {
        match self.val(obj, key)? {
            Val::Scalar(s) => scalar_int(s),
            Val::Json(j) => j.as_i64(),
            Val::List(_) => None,
        }
    }

    fn bool(&self, obj: &Fields<'a>, key: &str) -> Option<bool> {
        match self.val(obj, key)? {
            Val::Scalar(ScalarValueRef::Boolean(b)) => Some(*b),
            Val::Json(j) => j.as_bool(),
            _ => None,
        }
    }

    fn time(&self, obj: &Fields<'a>, key: &str) -> Option<DateTime<Utc>> {
        let ms = match self.val(obj, key)? {
            Val::Scalar(ScalarValueRef::Timestamp(ms) | ScalarValueRef::Int(ms)) => *ms,
            Val::Json(j) => j.as_i64()?,
            _ => return None,
        };
        Utc.timestamp_millis_opt(ms).single()
    }

    /// `Some(None)` for an explicit null, `None` for a missing or mistyped field.
    fn date(&self, obj: &Fields<'a>, key: &str) -> Option<Option<NaiveDate>> {
        let text = match self.val(obj, key)? {
            Val::Scalar(ScalarValueRef::Null) | Val::Json(serde_json::Value::Null) => return Some(None),
            Val::Scalar(ScalarValueRef::Str(s)) => s.as_ref(),
            Val::Json(serde_json::Value::String(s)) => s.as_str(),
            _ => return None,
        };
        NaiveDate::parse_from_str(text, DAY).ok().map(Some)
    }

    /// A list's items: from JSON text, the original, or (documents written before lists were
    /// JSON text) an automerge list.
    fn list(&self, obj: &Fields<'a>, key: &str) -> Option<Vec<serde_json::Value>> {
        match self.val(obj, key)? {
            Val::Scalar(ScalarValueRef::Str(text)) => serde_json::from_str(text).ok(),
            Val::Json(serde_json::Value::Array(items)) => Some(items.clone()),
            Val::List(list) => Some(
                self.doc
                    .list_range(list, ..)
                    .filter_map(|item| match item.value {
                        // As lists were read before JSON text: strings and integers; any other
                        // item reads as null, which no string list keeps and no score accepts.
                        ValueRef::Scalar(ScalarValueRef::Str(s)) => Some(serde_json::Value::String(s.to_string())),
                        ValueRef::Scalar(s) => Some(scalar_int(&s).map_or(serde_json::Value::Null, serde_json::Value::from)),
                        ValueRef::Object(_) => None,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    fn str_list(&self, obj: &Fields<'a>, key: &str) -> Option<Vec<String>> {
        Some(
            self.list(obj, key)?
                .into_iter()
                .filter_map(|v| match v {
                    serde_json::Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
        )
    }

    /// The fields a visit cannot do without; `None` if one is missing or mistyped (the visit
    /// is then skipped, in the record and in the caseload line alike).
    fn visit_core(&self, obj: &Fields<'a>) -> Option<VisitCore> {
        Some(VisitCore {
            by: self.str(obj, "by")?,
            started_at: self.time(obj, "started_at")?,
            duration_min: u32::try_from(self.int(obj, "duration_min")?).ok()?,
            mode: self.str(obj, "mode")?,
            setting: self.str(obj, "setting")?,
            recorded_at: self.time(obj, "recorded_at")?,
        })
    }

    fn visit(&self, obj: &Fields<'a>, id: &str) -> Option<Visit> {
        let core = self.visit_core(obj)?;
        Some(Visit {
            id: id.to_string(),
            by: core.by,
            started_at: core.started_at,
            duration_min: core.duration_min,
            mode: core.mode,
            setting: core.setting,
            activities: self.str_list(obj, "activities").unwrap_or_default(),
            goals: self.str_list(obj, "goals").unwrap_or_default(),
            referrals: self.str_list(obj, "referrals").unwrap_or_default(),
            notes: self.str(obj, "notes").unwrap_or_default(),
            follow_up: self.date(obj, "follow_up").flatten(),
            recorded_at: core.recorded_at,
        })
    }

    /// How many fields of `f` hold concurrent values (what [`Self::conflicts`] would list).
    fn conflict_count(&self, f: &Fields<'a>) -> u32 {
        f.conflicted.iter().filter(|key| self.doc.get_all(&f.obj, key.as_str()).is_ok_and(|all| all.len() >= 2)).count() as u32
    }

    fn checkin(&self, obj: &Fields<'a>, id: &str) -> Option<Checkin> {
        let small = |k: &str| self.int(obj, k).and_then(|v| u8::try_from(v).ok());
        let wellbeing = self
            .list(obj, "wellbeing")?
            .into_iter()
            .map(|v| v.as_i64().and_then(|i| u8::try_from(i).ok()))
            .collect::<Option<Vec<u8>>>()?;
        Some(Checkin {
            id: id.to_string(),
            by: self.str(obj, "by")?,
            taken_at: self.time(obj, "taken_at")?,
            wellbeing,
            distress: small("distress")?,
            coping: small("coping")?,
            social_support: small("social_support")?,
            self_efficacy: small("self_efficacy")?,
            quality_of_life: small("quality_of_life")?,
            housing: self.str(obj, "housing")?,
            employment: self.str(obj, "employment")?,
            hospital_nights_28d: u32::try_from(self.int(obj, "hospital_nights_28d")?).ok()?,
            substance_use_days_28d: self.int(obj, "substance_use_days_28d").and_then(|v| u32::try_from(v).ok()),
        })
    }

    /// A field's value as JSON text; a list held as JSON text shows as the list.
    fn json(&self, key: &str, value: &Value<'_>, id: &ObjId) -> String {
        let j = match value {
            Value::Scalar(s) => match (s.as_ref(), LIST_FIELDS.contains(&key)) {
                (ScalarValue::Str(text), true) => serde_json::from_str(text).unwrap_or_else(|_| scalar_json(s)),
                _ => scalar_json(s),
            },
            Value::Object(ObjType::List) => serde_json::Value::Array(
                self.doc
                    .list_range(id, ..)
                    .filter_map(|item| match Value::from(item.value) {
                        Value::Scalar(s) => Some(scalar_json(&s)),
                        _ => None,
                    })
                    .collect(),
            ),
            Value::Object(t) => serde_json::Value::String(format!("<{t:?}>")),
        };
        j.to_string()
    }

    /// Record every field of `obj` that holds more than one concurrent value.
    fn conflicts(&self, f: &Fields<'a>, path: &str, out: &mut Vec<FieldConflict>) {
        for key in &f.conflicted {
            let Ok(all) = self.doc.get_all(&f.obj, key.as_str()) else { continue };
            if all.len() < 2 {
                continue;
            }
            // get_all lists values in op order; the winner `get` shows is the last.
            let values = all.iter().rev().map(|(v, id)| self.json(key, v, id)).collect();
            out.push(FieldConflict { field: format!("{path}/{key}"), values });
        }
    }
}

fn scalar_int(s: &ScalarValueRef<'_>) -> Option<i64> {
    match s {
        ScalarValueRef::Int(i) => Some(*i),
        ScalarValueRef::Uint(u) => i64::try_from(*u).ok(),
        _ => None,
    }
}

fn scalar_json(s: &ScalarValue) -> serde_json::Value {
    use serde_json::Value as J;
    match s {
        ScalarValue::Str(s) => J::String(s.to_string()),
        ScalarValue::Int(i) => J::from(*i),
        ScalarValue::Uint(u) => J::from(*u),
        ScalarValue::F64(f) => J::from(*f),
        ScalarValue::Boolean(b) => J::Bool(*b),
        ScalarValue::Timestamp(ms) => Utc
            .timestamp_millis_opt(*ms)
            .single()
            .map(|t| J::String(t.to_rfc3339()))
            .unwrap_or(J::Null),
        ScalarValue::Null => J::Null,
        other => J::String(other.to_string()),
    }
}
