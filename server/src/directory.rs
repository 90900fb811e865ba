//! Who exists and who may see what: organisations, coordinators, workers, enrolled devices,
//! enrollment codes, assignments of people to workers, erasure tombstones and each person's
//! current consent. Kept on the server, never in the CRDT documents, so no device can grant
//! itself access.
//!
//! Stored over the same ordered key-value store as the documents, under its own key prefixes:
//! `o` org, `c` coordinator, `w` worker, `x` device, `n` enrollment code, `a` assignment
//! (org, person, worker), `k` the same by worker (org, worker, person: a worker's caseload
//! without reading the whole organisation; `!caseload-index` marks it complete), `u`
//! unassignment, `z` tombstone, `q` consent.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use peersync_core::StoreError;
use peersync_core::model::{validate_id, validate_role};
use peersync_core::store::{LocalStore, Write};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// PBKDF2-HMAC-SHA256 iterations for coordinator passwords.
pub const PBKDF2_ITERATIONS: u32 = 600_000;
/// Enrollment codes expire after this long.
pub const CODE_TTL_HOURS: i64 = 24;
/// Characters of an enrollment code (Crockford base32: no I, L, O, U), grouped by 4 when shown.
const CODE_ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const CODE_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinator {
    pub org: String,
    pub username: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub org: String,
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub org: String,
    pub worker: String,
    /// Ed25519 public key (32 bytes).
    pub public_key: Vec<u8>,
    pub name: String,
    pub enrolled_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Enrollment {
    org: String,
    worker: String,
    expires_at: DateTime<Utc>,
    /// The device that used the code: kept until the code expires, so that a phone that lost
    /// the answer can ask again with the same code and get it.
    #[serde(default)]
    used_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Log position at which the worker was given the person: its devices lack everything
    /// from before, whatever their cursor.
    pub granted_seq: u64,
    pub by: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub erased_at: DateTime<Utc>,
    pub by: String,
    /// Workers who had the person: their devices are told to purge.
    pub workers: Vec<String>,
    /// Whether the person shared with coordinators when erased: a coordinator's audit view
    /// keeps hiding the history of someone who did not (tombstones from before: not).
    #[serde(default)]
    pub shared: bool,
}

/// What the server knows of a person's current consent (from their document).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentState {
    pub share_with_coordinator: bool,
    pub research: bool,
}

/// Longest worker name, in characters: names are shown in lists and sent to the worker's phone.
pub const MAX_WORKER_NAME: usize = 100;
/// Longest organisation name, in characters.
pub const MAX_ORG_NAME: usize = 200;
/// Longest coordinator password, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A name people read (trimmed): at most `max` characters, no control characters.
fn display_name(what: &str, name: &str, max: usize) -> Result<String, DirectoryError> {
    let name = name.trim();
    if name.chars().count() > max || name.chars().any(char::is_control) {
        return Err(DirectoryError::Invalid(format!("{what} is at most {max} characters, without control characters")));
    }
    Ok(name.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("no organisation {0:?}")]
    NoOrg(String),
    #[error("{what} {id:?} already exists")]
    Exists { what: &'static str, id: String },
    #[error("no worker {worker:?} in organisation {org:?}")]
    NoWorker { org: String, worker: String },
    #[error("no device {0:?}")]
    NoDevice(String),
    #[error("the enrollment code is not valid: it is wrong, used already, or expired (ask your coordinator for a new one)")]
    BadCode,
    #[error(
        "this device {0:?} is enrolled already, for another worker or with another key (revoked, perhaps): enroll it with a code \
         for its own worker, or enroll a fresh store"
    )]
    DeviceTaken(String),
    #[error("{0:?} was erased at their request: an erased person cannot be assigned again")]
    Erased(String),
}

impl From<peersync_core::ValidationError> for DirectoryError {
    fn from(e: peersync_core::ValidationError) -> Self {
        DirectoryError::Invalid(e.to_string())
    }
}

pub struct Directory<S: LocalStore> {
    kv: S,
    rng: SystemRandom,
    /// Enrollment reads a code and then marks it used: two phones sending one code at once
    /// must not both get in.
    enrolling: std::sync::Mutex<()>,
}

/// Present once the caseload index (`k`) holds every assignment.
const CASELOAD_INDEX: &[u8] = b"!caseload-index";

fn key(tag: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![tag];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

fn dec<T: DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(k).into_owned(), reason: e.to_string() })
}

pub fn hash_code(code: &str) -> String {
    let normal: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, normal.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl<S: LocalStore> Directory<S> {
    pub fn new(kv: S) -> Self {
        Self { kv, rng: SystemRandom::new(), enrolling: std::sync::Mutex::new(()) }
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        self.kv.get(k)?.map(|v| dec(k, &v)).transpose()
    }

    fn put<T: Serialize>(&self, k: Vec<u8>, v: &T) -> Result<(), StoreError> {
        self.kv.apply(vec![Write::Put(k, enc(v))])
    }

    fn list<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        self.kv.scan_prefix(prefix)?.iter().map(|(k, v)| dec(k, v)).collect()
    }

    fn random(&self, n: usize) -> Result<Vec<u8>, StoreError> {
        let mut b = vec![0u8; n];
        self.rng.fill(&mut b).map_err(|_| StoreError::Io("random generator failed".into()))?;
        Ok(b)
    }

    /// This store's identity: made when the store is first opened, and carried by its copies
    /// (backups). The erasure ledger names it, so that a store made afresh later is not
    /// held to the erasures of another (ids can repeat across stores: a demo's, a replay's).
    pub fn instance(&self) -> Result<String, StoreError> {
        let k = vec![b'I'];
        if let Some(id) = self.get::<String>(&k)? {
            return Ok(id);
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.put(k, &id)?;
        Ok(id)
    }

    // Organisations ---------------------------------------------------------------------

    pub fn create_org(&self, id: &str, name: &str) -> Result<Org, DirectoryError> {
        validate_id("org", id)?;
        let name = display_name("an organisation's name", name, MAX_ORG_NAME)?;
        if self.org(id)?.is_some() {
            return Err(DirectoryError::Exists { what: "organisation", id: id.into() });
        }
        let org = Org { id: id.into(), name, created_at: Utc::now() };
        self.put(key(b'o', &[id]), &org)?;
        Ok(org)
    }

    pub fn org(&self, id: &str) -> Result<Option<Org>, StoreError> {
        self.get(&key(b'o', &[id]))
    }

    pub fn orgs(&self) -> Result<Vec<Org>, StoreError> {
        self.list(b"o")
    }

    fn require_org(&self, org: &str) -> Result<(), DirectoryError> {
        match self.org(org)? {
            Some(_) => Ok(()),
            None => Err(DirectoryError::NoOrg(org.into())),
        }
    }

    // Coordinators ----------------------------------------------------------------------

    pub fn create_coordinator(&self, org: &str, username: &str, password: &str) -> Result<(), DirectoryError> {
        self.require_org(org)?;
        validate_id("username", username)?;
        if password.chars().count() < 12 {
            return Err(DirectoryError::Invalid("the password must have at least 12 characters".into()));
        }
        // Login reads at most 16 KiB: a longer password could never be typed in.
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(DirectoryError::Invalid(format!("the password must have at most {MAX_PASSWORD_BYTES} bytes")));
        }
        if self.coordinator(org, username)?.is_some() {
            return Err(DirectoryError::Exists { what: "coordinator", id: username.into() });
        }
        let salt = self.random(16)?;
        let mut hash = vec![0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(PBKDF2_ITERATIONS).expect("non-zero"),
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        let c = Coordinator { org: org.into(), username: username.into(), salt, iterations: PBKDF2_ITERATIONS, hash, created_at: Utc::now() };
        self.put(key(b'c', &[org, username]), &c)?;
        Ok(())
    }

    pub fn coordinator(&self, org: &str, username: &str) -> Result<Option<Coordinator>, StoreError> {
        self.get(&key(b'c', &[org, username]))
    }

    /// Whether `password` is the coordinator's. Runs the full PBKDF2 even for unknown users so
    /// that timing does not tell which usernames exist.
    pub fn check_password(&self, org: &str, username: &str, password: &str) -> Result<bool, StoreError> {
        let c = self.coordinator(org, username)?;
        let (salt, iterations, hash) = match &c {
            Some(c) => (c.salt.clone(), c.iterations, c.hash.clone()),
            None => (vec![0u8; 16], PBKDF2_ITERATIONS, vec![0u8; 32]),
        };
        let ok = ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).expect("non-zero"),
            &salt,
            password.as_bytes(),
            &hash,
        )
        .is_ok();
        Ok(ok && c.is_some())
    }

    // Workers ---------------------------------------------------------------------------

    pub fn add_worker(&self, org: &str, id: &str, name: &str, role: &str) -> Result<Worker, DirectoryError> {
        self.require_org(org)?;
        validate_id("worker", id)?;
        validate_role(role)?;
        let name = display_name("a worker's name", name, MAX_WORKER_NAME)?;
        let name = name.as_str();
        if self.worker(org, id)?.is_some() {
            return Err(DirectoryError::Exists { what: "worker", id: id.into() });
        }
        let w = Worker { org: org.into(), id: id.into(), name: name.to_string(), role: role.into(), created_at: Utc::now() };
        self.put(key(b'w', &[org, id]), &w)?;
        Ok(w)
    }

    pub fn worker(&self, org: &str, id: &str) -> Result<Option<Worker>, StoreError> {
        self.get(&key(b'w', &[org, id]))
    }

    pub fn workers(&self, org: &str) -> Result<Vec<Worker>, StoreError> {
        self.list(&key(b'w', &[org, ""]))
    }

    // Enrollment ------------------------------------------------------------------------

    /// A new one-time code for `worker`'s phone, valid for 24 hours. Only its hash is stored.
    pub fn issue_code(&self, org: &str, worker: &str) -> Result<(String, DateTime<Utc>), DirectoryError> {
        self.issue_code_until(org, worker, Utc::now() + Duration::hours(CODE_TTL_HOURS))
    }

    /// A code valid until `expires_at`.
    pub fn issue_code_until(&self, org: &str, worker: &str, expires_at: DateTime<Utc>) -> Result<(String, DateTime<Utc>), DirectoryError> {
        if self.worker(org, worker)?.is_none() {
            return Err(DirectoryError::NoWorker { org: org.into(), worker: worker.into() });
        }
        let raw = self.random(CODE_LEN)?;
        let code: String = raw.iter().map(|b| CODE_ALPHABET[(*b as usize) % CODE_ALPHABET.len()] as char).collect();
        let shown = format!("{}-{}-{}", &code[0..4], &code[4..8], &code[8..12]);
        self.put(key(b'n', &[&hash_code(&code)]), &Enrollment { org: org.into(), worker: worker.into(), expires_at, used_by: None })?;
        Ok((shown, expires_at))
    }

    /// Use a code (once) to register a device's public key.
    pub fn enroll(&self, code: &str, device: &str, public_key: &[u8], name: &str) -> Result<DeviceRecord, DirectoryError> {
        let k = key(b'n', &[&hash_code(code)]);
        let _one_at_a_time = self.enrolling.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(e) = self.get::<Enrollment>(&k)? else { return Err(DirectoryError::BadCode) };
        if e.expires_at < Utc::now() {
            self.kv.apply(vec![Write::Delete(k)])?;
            return Err(DirectoryError::BadCode);
        }
        validate_id("device", device)?;
        if device.contains('.') {
            // The connection token is `device.time.nonce.signature`: such a device could enroll
            // but never connect.
            return Err(DirectoryError::Invalid(format!("device id {device:?} contains '.', which separates a connection token's parts")));
        }
        if public_key.len() != 32 {
            return Err(DirectoryError::Invalid("the public key must be a 32-byte Ed25519 key".into()));
        }
        // Enrollment is idempotent for the phone that made it: its answer can be lost on the
        // way back, and the phone then asks again with the same key, with the same code or a
        // new one for the same worker. Anyone else is refused as before.
        let known = self.device(device)?;
        let again = known.as_ref().filter(|d| d.public_key == public_key && d.revoked_at.is_none() && d.org == e.org && d.worker == e.worker);
        match (&e.used_by, again) {
            (Some(user), Some(d)) if user == device => return Ok(d.clone()),
            (Some(_), _) => return Err(DirectoryError::BadCode),
            (None, Some(d)) => {
                let used = Enrollment { used_by: Some(device.into()), ..e };
                self.kv.apply(vec![Write::Put(k, enc(&used))])?;
                return Ok(d.clone());
            }
            (None, None) if known.is_some() => return Err(DirectoryError::DeviceTaken(device.into())),
            (None, None) => {}
        }
        let d = DeviceRecord {
            id: device.into(),
            org: e.org.clone(),
            worker: e.worker.clone(),
            public_key: public_key.to_vec(),
            name: name.chars().take(80).collect(),
            enrolled_at: Utc::now(),
            revoked_at: None,
            revoked_by: None,
        };
        // Single use: the code is marked used in the same atomic write that registers the device.
        let used = Enrollment { used_by: Some(device.into()), ..e };
        self.kv.apply(vec![Write::Put(k, enc(&used)), Write::Put(key(b'x', &[device]), enc(&d))])?;
        Ok(d)
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(&key(b'x', &[id]))
    }

    pub fn devices(&self, org: &str) -> Result<Vec<DeviceRecord>, StoreError> {
        Ok(self.list::<DeviceRecord>(b"x")?.into_iter().filter(|d| d.org == org).collect())
    }

    pub fn revoke(&self, org: &str, device: &str, by: &str) -> Result<DeviceRecord, DirectoryError> {
        let mut d = match self.device(device)? {
            Some(d) if d.org == org => d,
            _ => return Err(DirectoryError::NoDevice(device.into())),
        };
        if d.revoked_at.is_none() {
            d.revoked_at = Some(Utc::now());
            d.revoked_by = Some(by.into());
            self.put(key(b'x', &[device]), &d)?;
        }
        Ok(d)
    }

    // Assignments -----------------------------------------------------------------------

    pub fn assignment(&self, org: &str, doc: &str, worker: &str) -> Result<Option<Assignment>, StoreError> {
        self.get(&key(b'a', &[org, doc, worker]))
    }

    /// The people assigned to `worker`, if this store has the caseload index (see
    /// [`Self::index_caseloads`]); `None` means it must be found from the assignments.
    pub fn caseload(&self, org: &str, worker: &str) -> Result<Option<Vec<String>>, StoreError> {
        if self.kv.get(CASELOAD_INDEX)?.is_none() {
            return Ok(None);
        }
        self.last_parts(&key(b'k', &[org, worker, ""])).map(Some)
    }

    /// Complete the caseload index (`k`) from the assignments, and mark it built: at every
    /// start, so that a data directory written before the index existed, or by an earlier
    /// version run on it since (which assigns without indexing), is whole again before any
    /// download relies on it. One atomic write of what was missing with the mark; returns how
    /// many assignments it indexed.
    pub fn index_caseloads(&self) -> Result<usize, StoreError> {
        let indexed: std::collections::HashSet<Vec<u8>> = self.kv.keys_with_prefix(b"k")?.into_iter().collect();
        let mut writes = Vec::new();
        for k in self.kv.keys_with_prefix(b"a")? {
            let parts: Vec<&[u8]> = k[1..].split(|b| *b == 0).collect();
            let [org, doc, worker] = parts[..] else {
                return Err(StoreError::Corrupt { key: String::from_utf8_lossy(&k).into_owned(), reason: "an assignment key is org, person, worker".into() });
            };
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let entry = key(b'k', &[&text(org), &text(worker), &text(doc)]);
            if !indexed.contains(&entry) {
                writes.push(Write::Put(entry, Vec::new()));
            }
        }
        let n = writes.len();
        if self.kv.get(CASELOAD_INDEX)?.is_none() {
            writes.push(Write::Put(CASELOAD_INDEX.to_vec(), Vec::new()));
        }
        if !writes.is_empty() {
            self.kv.apply(writes)?;
        }
        Ok(n)
    }

    pub fn assigned_workers(&self, org: &str, doc: &str) -> Result<Vec<String>, StoreError> {
        self.last_parts(&key(b'a', &[org, doc, ""]))
    }

    /// The last part of every key under `prefix` (a key's parts end with it).
    fn last_parts(&self, prefix: &[u8]) -> Result<Vec<String>, StoreError> {
        Ok(self.kv.keys_with_prefix(prefix)?.into_iter().map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned()).collect())
    }

    /// Whether an operator (a coordinator, or the admin command) may assign `doc` to `worker`:
    /// a valid id, not erased, and a worker of the organisation. Checked before the assignment's
    /// log entry is written; the sync path checks erasure itself before [`Self::assign`].
    pub fn assignable(&self, org: &str, doc: &str, worker: &str) -> Result<(), DirectoryError> {
        validate_id("person", doc)?;
        if self.tombstone(org, doc)?.is_some() {
            return Err(DirectoryError::Erased(doc.into()));
        }
        if self.worker(org, worker)?.is_none() {
            return Err(DirectoryError::NoWorker { org: org.into(), worker: worker.into() });
        }
        Ok(())
    }

    /// Assign `doc` to `workers` (unknown workers are skipped and returned). Durable only at
    /// the next [`Self::flush`] or durable write: callers batch many.
    pub fn assign(&self, org: &str, doc: &str, workers: &[String], granted_seq: u64, by: &str) -> Result<Vec<String>, DirectoryError> {
        validate_id("person", doc)?;
        let mut unknown = Vec::new();
        for w in workers {
            if self.worker(org, w)?.is_none() {
                unknown.push(w.clone());
                continue;
            }
            if self.assignment(org, doc, w)?.is_none() {
                // The caseload index first, on its own: after a crash it may name a person the
                // worker lacks (a download then checks the assignment and sends nothing), never
                // miss one the worker has.
                self.kv.apply_deferred(vec![Write::Put(key(b'k', &[org, w, doc]), Vec::new())])?;
                let mut writes = vec![Write::Put(key(b'a', &[org, doc, w]), enc(&Assignment { granted_seq, by: by.into(), at: Utc::now() }))];
                // Only if there is one: a new person's assignment is then a single write.
                let unassigned = key(b'u', &[org, w, doc]);
                if self.kv.get(&unassigned)?.is_some() {
                    writes.push(Write::Delete(unassigned));
                }
                // One apply per write where it can be, not one for all: a one-write apply is a
                // plain insert where a multi-write one is a sled batch that seals and writes the
                // log (a person shared by two workers cost one log write each in a first
                // upload). After a crash the store holds a prefix of these writes; the push they
                // belong to was not acknowledged, and its retry assigns whoever is still missing.
                self.kv.apply_deferred(writes)?;
            }
        }
        Ok(unknown)
    }

    pub fn unassign(&self, org: &str, doc: &str, worker: &str, seq: u64) -> Result<(), StoreError> {
        self.kv.apply(vec![
            Write::Delete(key(b'a', &[org, doc, worker])),
            Write::Delete(key(b'k', &[org, worker, doc])),
            Write::Put(key(b'u', &[org, worker, doc]), enc(&seq)),
        ])
    }

    /// The log position at which `worker` lost `doc`, if it did.
    pub fn unassigned_at(&self, org: &str, worker: &str, doc: &str) -> Result<Option<u64>, StoreError> {
        self.get(&key(b'u', &[org, worker, doc]))
    }

    // Erasure and consent ---------------------------------------------------------------

    /// Every erased person of `org`, by id.
    pub fn tombstones(&self, org: &str) -> Result<HashMap<String, Tombstone>, StoreError> {
        self.by_last_part(&key(b'z', &[org, ""]))
    }

    /// The people taken from `worker`, with the log position at which each was taken.
    pub fn unassignments(&self, org: &str, worker: &str) -> Result<HashMap<String, u64>, StoreError> {
        self.by_last_part(&key(b'u', &[org, worker, ""]))
    }

    fn by_last_part<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<HashMap<String, T>, StoreError> {
        self.kv.scan_prefix(prefix)?.iter().map(|(k, v)| Ok((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), dec(k, v)?))).collect()
    }

    pub fn tombstone(&self, org: &str, doc: &str) -> Result<Option<Tombstone>, StoreError> {
        self.get(&key(b'z', &[org, doc]))
    }

    /// Record the erasure and forget everything the directory knew of the person but its id.
    pub fn bury(&self, org: &str, doc: &str, by: &str) -> Result<(), StoreError> {
        // A second erasure (a retry, a double click) must not overwrite who had the person.
        if self.tombstone(org, doc)?.is_some() {
            return Ok(());
        }
        let workers = self.assigned_workers(org, doc)?;
        let shared = self.consent(org, doc)?.is_some_and(|c| c.share_with_coordinator);
        let mut writes = vec![
            Write::Put(key(b'z', &[org, doc]), enc(&Tombstone { erased_at: Utc::now(), by: by.into(), workers: workers.clone(), shared })),
            Write::Delete(key(b'q', &[org, doc])),
        ];
        for w in &workers {
            writes.push(Write::Delete(key(b'a', &[org, doc, w])));
            writes.push(Write::Delete(key(b'k', &[org, w, doc])));
        }
        self.kv.apply(writes)
    }

    pub fn consent(&self, org: &str, doc: &str) -> Result<Option<ConsentState>, StoreError> {
        self.get(&key(b'q', &[org, doc]))
    }

    /// Durable only at the next [`Self::flush`] or durable write.
    pub fn set_consent(&self, org: &str, doc: &str, c: ConsentState) -> Result<(), StoreError> {
        if self.consent(org, doc)? == Some(c) {
            return Ok(());
        }
        self.kv.apply_deferred(vec![Write::Put(key(b'q', &[org, doc]), enc(&c))])
    }

    /// Every person of `org` the server has heard of, with their consent.
    pub fn people(&self, org: &str) -> Result<Vec<(String, ConsentState)>, StoreError> {
        let prefix = key(b'q', &[org, ""]);
        self.kv
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), dec(&k, &v)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peersync_core::store::MemoryStore;

    fn dir() -> Directory<MemoryStore> {
        let d = Directory::new(MemoryStore::new());
        d.create_org("org1", "Org One").unwrap();
        d.add_worker("org1", "w-001", "Asha", "peer_advocate").unwrap();
        d
    }

    /// What an operator may assign: the admin command and the coordinators' API both ask this
    /// before they write anything.
    #[test]
    fn an_erased_person_an_unknown_worker_or_a_bad_id_cannot_be_assigned() {
        let d = dir();
        assert!(d.assignable("org1", "p-1", "w-001").is_ok());
        assert!(matches!(d.assignable("org1", "p-1", "w-999"), Err(DirectoryError::NoWorker { .. })));
        assert!(matches!(d.assignable("org1", "../p", "w-001"), Err(DirectoryError::Invalid(_))));
        d.bury("org1", "p-1", "c").unwrap();
        let erased = d.assignable("org1", "p-1", "w-001");
        assert!(matches!(&erased, Err(DirectoryError::Erased(p)) if p == "p-1"), "{erased:?}");
        assert!(d.assignable("org2", "p-1", "w-001").is_err(), "another organisation's worker is not this one's");
    }

    /// A worker's caseload, as the index has it: every person assigned, no one else, in
    /// another organisation or another worker's (whose id begins with this one's) included.
    #[test]
    fn the_caseload_index_follows_assignments_and_is_built_for_an_earlier_store() {
        let d = dir();
        d.add_worker("org1", "w-0010", "Bela", "peer_advocate").unwrap();
        d.create_org("org2", "Org Two").unwrap();
        d.add_worker("org2", "w-001", "Chen", "peer_advocate").unwrap();
        // Written the way a store from before the index was: assignments alone.
        d.kv.apply(vec![
            Write::Put(key(b'a', &["org1", "p-1", "w-001"]), enc(&Assignment { granted_seq: 1, by: "c".into(), at: Utc::now() })),
            Write::Put(key(b'a', &["org1", "p-2", "w-0010"]), enc(&Assignment { granted_seq: 2, by: "c".into(), at: Utc::now() })),
            Write::Put(key(b'a', &["org2", "p-3", "w-001"]), enc(&Assignment { granted_seq: 3, by: "c".into(), at: Utc::now() })),
        ])
        .unwrap();
        assert_eq!(d.caseload("org1", "w-001").unwrap(), None, "not built yet: no answer rather than a wrong one");
        assert_eq!(d.index_caseloads().unwrap(), 3);
        assert_eq!(d.index_caseloads().unwrap(), 0);
        // An earlier version run on the store since: it assigned without indexing.
        d.kv.apply(vec![Write::Put(key(b'a', &["org1", "p-9", "w-001"]), enc(&Assignment { granted_seq: 9, by: "c".into(), at: Utc::now() }))]).unwrap();
        assert_eq!(d.index_caseloads().unwrap(), 1, "completed at the next start");
        let caseload = |org: &str, w: &str| d.caseload(org, w).unwrap().unwrap();
        assert_eq!(caseload("org1", "w-001"), ["p-1", "p-9"]);
        d.unassign("org1", "p-9", "w-001", 10).unwrap();
        assert_eq!(caseload("org1", "w-001"), ["p-1"]);
        assert_eq!(caseload("org1", "w-0010"), ["p-2"]);
        assert_eq!(caseload("org2", "w-001"), ["p-3"]);
        d.assign("org1", "p-4", &["w-001".into(), "w-0010".into()], 4, "c").unwrap();
        d.assign("org1", "p-1", &["w-001".into()], 5, "c").unwrap();
        assert_eq!(caseload("org1", "w-001"), ["p-1", "p-4"]);
        d.unassign("org1", "p-1", "w-001", 6).unwrap();
        assert_eq!(caseload("org1", "w-001"), ["p-4"]);
        d.bury("org1", "p-4", "c").unwrap();
        assert!(caseload("org1", "w-001").is_empty());
        assert_eq!(caseload("org1", "w-0010"), ["p-2"]);
        d.assign("org1", "p-1", &["w-001".into()], 7, "c").unwrap();
        assert_eq!(caseload("org1", "w-001"), ["p-1"], "given back");
    }

    #[test]
    fn passwords_are_salted_pbkdf2() {
        let d = dir();
        d.create_coordinator("org1", "maya", "correct horse battery").unwrap();
        let c = d.coordinator("org1", "maya").unwrap().unwrap();
        assert!(c.iterations >= 600_000);
        assert_eq!(c.salt.len(), 16);
        assert!(d.check_password("org1", "maya", "correct horse battery").unwrap());
        assert!(!d.check_password("org1", "maya", "wrong horse battery").unwrap());
        assert!(!d.check_password("org1", "nobody", "correct horse battery").unwrap());
        assert!(matches!(d.create_coordinator("org1", "x", "short"), Err(DirectoryError::Invalid(_))));
    }

    #[test]
    fn roles_are_the_five_peer_roles() {
        let d = dir();
        assert!(matches!(d.add_worker("org1", "w-2", "B", "boss"), Err(DirectoryError::Invalid(_))));
        assert!(matches!(d.add_worker("org1", "w-2", &"x".repeat(101), "peer_advocate"), Err(DirectoryError::Invalid(_))));
        assert!(matches!(d.create_org("org9", &"x".repeat(201)), Err(DirectoryError::Invalid(_))));
        assert!(matches!(d.create_org("org9", "a\u{0}b"), Err(DirectoryError::Invalid(_))));
        assert!(matches!(d.create_coordinator("org1", "long", &"p".repeat(2000)), Err(DirectoryError::Invalid(_))));
        assert!(matches!(d.add_worker("org1", "w-2", "A\nB", "peer_advocate"), Err(DirectoryError::Invalid(_))));
        assert_eq!(d.add_worker("org1", "w-2", "  Ana María  ", "peer_advocate").unwrap().name, "Ana María");
        assert!(matches!(d.add_worker("nope", "w-2", "B", "peer_advocate"), Err(DirectoryError::NoOrg(_))));
    }

    #[test]
    fn codes_are_single_use() {
        let d = dir();
        let (code, _) = d.issue_code("org1", "w-001").unwrap();
        assert_eq!(code.len(), 14);
        let dev = d.enroll(&code.to_lowercase(), "dev-1", &[7; 32], "phone").unwrap();
        assert_eq!((dev.org.as_str(), dev.worker.as_str()), ("org1", "w-001"));
        assert!(matches!(d.enroll(&code, "dev-2", &[7; 32], "phone"), Err(DirectoryError::BadCode)));
        assert!(matches!(d.enroll("AAAA-BBBB-CCCC", "dev-3", &[7; 32], "phone"), Err(DirectoryError::BadCode)));
    }

    #[test]
    fn a_phone_that_lost_the_answer_may_ask_again_and_no_one_else_may() {
        let d = dir();
        let (code, _) = d.issue_code("org1", "w-001").unwrap();
        let first = d.enroll(&code, "dev-1", &[7; 32], "phone").unwrap();
        // The same phone with the same key, the same code: the same answer, nothing new.
        assert_eq!(d.enroll(&code, "dev-1", &[7; 32], "phone").unwrap(), first);
        // The same code with another key or for another device is a used code.
        assert!(matches!(d.enroll(&code, "dev-1", &[8; 32], "phone"), Err(DirectoryError::BadCode)));
        assert!(matches!(d.enroll(&code, "dev-2", &[7; 32], "phone"), Err(DirectoryError::BadCode)));
        // A new code for the same worker, from the phone that is already in: the same answer,
        // and that code is used up too.
        let (second, _) = d.issue_code("org1", "w-001").unwrap();
        assert_eq!(d.enroll(&second, "dev-1", &[7; 32], "phone").unwrap(), first);
        assert!(matches!(d.enroll(&second, "dev-9", &[9; 32], "phone"), Err(DirectoryError::BadCode)));
        // Another key for an existing device, or the device for another worker, is refused.
        let (third, _) = d.issue_code("org1", "w-001").unwrap();
        assert!(matches!(d.enroll(&third, "dev-1", &[8; 32], "phone"), Err(DirectoryError::DeviceTaken(_))));
        d.add_worker("org1", "w-002", "B", "peer_advocate").unwrap();
        let (other, _) = d.issue_code("org1", "w-002").unwrap();
        assert!(matches!(d.enroll(&other, "dev-1", &[7; 32], "phone"), Err(DirectoryError::DeviceTaken(_))));
        // A revoked device does not come back this way.
        d.revoke("org1", "dev-1", "admin").unwrap();
        assert!(matches!(d.enroll(&code, "dev-1", &[7; 32], "phone"), Err(DirectoryError::BadCode)));
        assert!(matches!(d.enroll(&third, "dev-1", &[7; 32], "phone"), Err(DirectoryError::DeviceTaken(_))));
        // A device id that could never connect (a token's parts are separated by '.') is
        // refused, and the code stays good for a proper one.
        let (fourth, _) = d.issue_code("org1", "w-001").unwrap();
        assert!(matches!(d.enroll(&fourth, "dev.2", &[5; 32], "phone"), Err(DirectoryError::Invalid(_))));
        assert!(d.enroll(&fourth, "dev-2", &[5; 32], "phone").is_ok());
    }
}
