//! The audit log: append-only, per organisation. Who (a device, a coordinator, the admin) read
//! or wrote which person documents, enrollments, revocations, erasures, exports and logins.
//! Entries name people by their pseudonymous id and never hold record content. Nothing deletes
//! entries: they are kept for as long as the data directory is (at least the year the DPDP
//! Rules ask for).

use chrono::{DateTime, Utc};
use peersync_core::StoreError;
use peersync_core::store::{LocalStore, Write};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// `device:<id> (worker <id>)`, `coordinator:<username>`, `admin`, or `anonymous`.
    pub actor: String,
    /// `read`, `write`, `enroll`, `revoke`, `wipe`, `erase`, `assign`, `unassign`, `export`,
    /// `login`, `logout`, `create-worker`, `issue-code`, …
    pub action: String,
    /// Person ids concerned.
    pub people: Vec<String>,
    pub ok: bool,
    /// Short free text without record content (counts, reasons).
    pub detail: String,
}

pub struct AuditLog<S: LocalStore> {
    kv: S,
    rng: SystemRandom,
}

fn prefix(org: &str) -> Vec<u8> {
    let mut k = vec![b'y'];
    k.extend_from_slice(org.as_bytes());
    k.push(0);
    k
}

impl<S: LocalStore> AuditLog<S> {
    pub fn new(kv: S) -> Self {
        Self { kv, rng: SystemRandom::new() }
    }

    /// Record an entry; durable when this returns.
    pub fn record(&self, org: &str, actor: &str, action: &str, people: Vec<String>, ok: bool, detail: impl Into<String>) -> Result<(), StoreError> {
        self.kv.apply(vec![self.entry(org, actor, action, people, ok, detail)])
    }

    /// Record an entry that the caller's next durable write to the same store makes durable
    /// (it must follow before the caller reports the action done).
    pub fn record_deferred(&self, org: &str, actor: &str, action: &str, people: Vec<String>, ok: bool, detail: impl Into<String>) -> Result<(), StoreError> {
        self.kv.apply_deferred(vec![self.entry(org, actor, action, people, ok, detail)])
    }

    fn entry(&self, org: &str, actor: &str, action: &str, people: Vec<String>, ok: bool, detail: impl Into<String>) -> Write {
        let e = AuditEntry { at: Utc::now(), actor: actor.into(), action: action.into(), people, ok, detail: detail.into() };
        let mut k = prefix(org);
        k.extend_from_slice(&(e.at.timestamp_micros() as u64).to_be_bytes());
        let mut r = [0u8; 4];
        let _ = self.rng.fill(&mut r);
        k.extend_from_slice(&r);
        Write::Put(k, serde_json::to_vec(&e).expect("serializes"))
    }

    /// Entries from `from` on, oldest first, at most `limit`.
    pub fn list(&self, org: &str, from: Option<DateTime<Utc>>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let p = prefix(org);
        let mut start = p.clone();
        start.extend_from_slice(&(from.map_or(0, |f| f.timestamp_micros().max(0)) as u64).to_be_bytes());
        let mut end = p.clone();
        end.extend_from_slice(&[0xff; 12]);
        Ok(self.kv.scan_range_first(&start, &end, limit)?.into_iter().filter_map(|(_, v)| serde_json::from_slice(&v).ok()).collect())
    }
}
