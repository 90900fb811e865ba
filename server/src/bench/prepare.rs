//! Before the phases: the organisation and its workers on the server, one enrolled phone per
//! worker, and the scenario recorded on the phones offline (see the module above for how
//! people shared by two workers reach the second phone).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use peersync_core::sync::SyncOptions;
use peersync_core::{Device, ManualClock};
use serde_json::json;

use super::{BenchError, Phone};
use crate::replay::{ReplayError, api};
use crate::scenario::Event;

/// Create `org` and the scenario's workers; returns each worker with an enrollment code.
pub async fn create_team(events: &[Event], opts: &SyncOptions, token: &str, org: &str) -> Result<Vec<(String, String)>, BenchError> {
    api(opts, token, "POST", "/v1/admin/orgs", Some(json!({ "id": org, "name": "peersync bench" }))).await?;
    let mut out = Vec::new();
    for e in events {
        if let Event::Worker { worker, name, role, .. } = e {
            api(opts, token, "POST", &format!("/v1/workers?org={org}"), Some(json!({ "id": worker, "name": name, "role": role }))).await?;
            out.push((worker.clone(), enrollment_code(opts, token, org, worker).await?));
        }
    }
    if out.is_empty() {
        return Err(BenchError::Usage("the scenario has no workers".into()));
    }
    Ok(out)
}

pub async fn enrollment_code(opts: &SyncOptions, token: &str, org: &str, worker: &str) -> Result<String, BenchError> {
    let v = api(opts, token, "POST", &format!("/v1/workers/{worker}/enrollment?org={org}"), None).await?;
    v["code"].as_str().map(String::from).ok_or_else(|| BenchError::Setup(ReplayError::Other("no enrollment code in the answer".into())))
}

/// A phone on its own encrypted sled store under `dir`, enrolled for `worker` (straight to the
/// server: enrollment is not part of any phase), syncing through `link`.
pub async fn enrolled_phone(dir: &Path, worker: &str, code: &str, direct: &SyncOptions, link: SyncOptions) -> Result<Phone, BenchError> {
    let clock = ManualClock::new(chrono::Utc::now());
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).map_err(|_| BenchError::Server("no randomness for a store key".into()))?;
    let err = |source| BenchError::Phone { worker: worker.to_string(), source };
    let device = Device::open(dir.join(worker), &key, Arc::new(clock.clone())).await.map_err(err)?;
    device.enroll(direct, code, &format!("{worker}'s bench phone")).await.map_err(|source| BenchError::Sync {
        phase: "enrollment",
        worker: worker.to_string(),
        source,
    })?;
    Ok(Phone { worker: worker.to_string(), device: Arc::new(device), clock, opts: link })
}

/// Record every phone event of the scenario on its phone, without syncing. Returns how many
/// were recorded; events a phone refuses are counted on stderr, not fatal.
pub async fn record_offline(events: &[Event], phones: &[Phone]) -> Result<usize, BenchError> {
    let index: HashMap<&str, usize> = phones.iter().enumerate().map(|(i, p)| (p.worker.as_str(), i)).collect();
    // Which phones hold each person.
    let mut holders: HashMap<String, Vec<usize>> = HashMap::new();
    let (mut recorded, mut refused) = (0usize, 0usize);
    let total = events.len();
    let started = std::time::Instant::now();
    for (n, e) in events.iter().enumerate() {
        if n % 500 == 0 {
            eprint!("\rrecording offline: {:<60}", crate::replay::progress_line(n, total, started.elapsed()));
        }
        let (Some(by), Some(person)) = (e.phone(), e.person()) else {
            continue;
        };
        let Some(&me) = index.get(by) else { continue };
        let phone = &phones[me];
        let err = |source| BenchError::Phone { worker: phone.worker.clone(), source };
        // A teammate's records reach this phone first, as they would have at its last sync.
        if !matches!(e, Event::Person { .. }) {
            for &other in holders.get(person).map(Vec::as_slice).unwrap_or_default() {
                if other != me {
                    let data = phones[other].device.export_document(person).await.map_err(err)?;
                    phone.device.import_document(person, data).await.map_err(err)?;
                }
            }
        }
        phone.clock.set(e.at());
        let result = crate::replay::apply(&phone.device, e).await;
        match result {
            Ok(()) => {
                recorded += 1;
                let h = holders.entry(person.to_string()).or_default();
                if !h.contains(&me) {
                    h.push(me);
                }
            }
            Err(e) => {
                refused += 1;
                if refused <= 5 {
                    eprintln!("\nevent {n} on {by}'s phone not recorded: {e}");
                }
            }
        }
    }
    eprintln!("\rrecording offline: {:<60}", crate::replay::progress_line(total, total, started.elapsed()));
    if refused > 0 {
        eprintln!("{refused} events could not be recorded offline (see above)");
    }
    Ok(recorded)
}
