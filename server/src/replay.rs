//! `peersync replay`: play a field scenario through real devices and a real server, then check
//! that everything converged and produce the coordinator report.
//!
//! One device per worker, each with its own encrypted store and its clock set to each event's
//! time; a device syncs at each of its `sync` events; erasures go through the coordinator API;
//! at the end every device syncs once more. Then every device's copy of each person it holds
//! must equal the server's, and every worker's device must hold exactly its assigned people.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use peersync_core::protocol::ErrorCode;
use peersync_core::sync::{SyncOptions, http::request};
use peersync_core::{CoreError, Device, ManualClock};
use serde_json::{Value, json};

use crate::scenario::Event;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the server refused {what} ({status}): {message}")]
    Api { what: String, status: u16, message: String },
    #[error(transparent)]
    Sync(#[from] peersync_core::sync::SyncError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("{0}")]
    Other(String),
}

/// What a replay found.
pub struct Outcome {
    pub report: Value,
    /// Anything that did not converge or was refused unexpectedly; empty when all is well.
    pub problems: Vec<String>,
    pub devices: usize,
    pub documents: usize,
    pub syncs: u64,
}

const TIMEOUT: Duration = Duration::from_secs(60);
/// Largest API answer read: the all-time report grows with workers and weeks (a few hundred
/// kilobytes for 50 workers over a year); far beyond that something is wrong.
const MAX_API_RESPONSE: usize = 64 << 20;

pub(crate) async fn api(opts: &SyncOptions, token: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, ReplayError> {
    let (status, v) = request(opts, method, path, Some(token), body.as_ref(), TIMEOUT, MAX_API_RESPONSE).await?;
    if !(200..300).contains(&status) {
        let message = v.get("error").and_then(|m| m.as_str()).unwrap_or("").to_string();
        return Err(ReplayError::Api { what: format!("{method} {path}"), status, message });
    }
    Ok(v)
}

/// Replay `events` against the server at `opts.server` (admin `token`), in organisation `org`,
/// with device stores under `dir`. `progress` is told how far it got.
pub async fn replay(
    events: &[Event],
    opts: &SyncOptions,
    token: &str,
    org: &str,
    dir: &std::path::Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Outcome, ReplayError> {
    api(opts, token, "POST", "/v1/admin/orgs", Some(json!({ "id": org, "name": "Replayed field scenario" }))).await?;
    let mut devices: BTreeMap<String, (Device, ManualClock)> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut erased = std::collections::HashSet::new();
    let mut syncs = 0u64;
    let q = format!("?org={org}");
    for (i, e) in events.iter().enumerate() {
        if i % 500 == 0 {
            progress(i, events.len());
        }
        if let Event::Worker { worker, name, role, at } = e {
            api(opts, token, "POST", &format!("/v1/workers{q}"), Some(json!({ "id": worker, "name": name, "role": role }))).await?;
            let code = api(opts, token, "POST", &format!("/v1/workers/{worker}/enrollment{q}"), None).await?;
            let code = code["code"].as_str().ok_or_else(|| ReplayError::Other("no enrollment code".into()))?.to_string();
            let clock = ManualClock::new(*at);
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).map_err(|_| ReplayError::Other("no randomness".into()))?;
            let device = Device::open(dir.join(worker), &key, Arc::new(clock.clone())).await?;
            device.enroll(opts, &code, &format!("{name}'s phone")).await?;
            devices.insert(worker.clone(), (device, clock));
            continue;
        }
        if let Event::Erase { person, .. } = e {
            api(opts, token, "POST", &format!("/v1/people/{person}/erase{q}"), None).await?;
            erased.insert(person.clone());
            continue;
        }
        let Some(by) = e.phone() else { continue };
        let Some((device, clock)) = devices.get(by) else {
            problems.push(format!("event {i}: no worker {by:?} joined before it"));
            continue;
        };
        clock.set(e.at());
        let result = match e {
            Event::Person { .. } => device.register_person(e.new_person().expect("person")).await.map(|_| ()),
            Event::Visit { person, .. } => device.record_visit(person, e.new_visit().expect("visit")).await.map(|_| ()),
            Event::Checkin { person, .. } => device.record_checkin(person, e.new_checkin().expect("checkin")).await.map(|_| ()),
            Event::Edit { person, visit, .. } => match e.visit_edit().expect("edit") {
                Ok(edit) => device.edit_visit(person, visit, edit).await.map(|_| ()),
                Err(m) => {
                    problems.push(format!("event {i}: {m}"));
                    Ok(())
                }
            },
            Event::Consent { person, .. } => match e.consent_change().expect("consent") {
                Ok(c) => device.set_consent(person, c).await.map(|_| ()),
                Err(m) => {
                    problems.push(format!("event {i}: {m}"));
                    Ok(())
                }
            },
            Event::Sync { .. } => {
                syncs += 1;
                let r = device.sync(opts).await?;
                for refusal in r.refused {
                    if !(refusal.code == ErrorCode::Erased && erased.contains(&refusal.person)) {
                        problems.push(format!("{by}: push of {} refused: {}", refusal.person, refusal.message));
                    }
                }
                Ok(())
            }
            Event::Worker { .. } | Event::Erase { .. } => Ok(()),
        };
        if let Err(err) = result {
            // A phone that learnt of an erasure records nothing more for that person; anything
            // else failing is a problem.
            let person = match e {
                Event::Visit { person, .. } | Event::Checkin { person, .. } | Event::Edit { person, .. } | Event::Consent { person, .. } => Some(person),
                _ => None,
            };
            if !(matches!(err, CoreError::UnknownPerson(_)) && person.is_some_and(|p| erased.contains(p))) {
                problems.push(format!("event {i} ({by}): {err}"));
            }
        }
    }
    progress(events.len(), events.len());
    // Everyone syncs once more, so that all converge.
    for (_, (device, _)) in devices.iter() {
        device.sync(opts).await?;
        syncs += 1;
    }
    // Converged: every worker's device holds exactly its people, each equal to the server's.
    let docs = api(opts, token, "GET", &format!("/v1/admin/orgs/{org}/documents"), None).await?;
    let docs = docs.as_array().cloned().unwrap_or_default();
    let mut expected: HashMap<String, Vec<(String, Vec<String>)>> = HashMap::new();
    for d in &docs {
        let id = d["id"].as_str().unwrap_or_default().to_string();
        let heads: Vec<String> = d["heads"].as_array().map(|a| a.iter().filter_map(|h| h.as_str().map(String::from)).collect()).unwrap_or_default();
        for w in d["workers"].as_array().into_iter().flatten().filter_map(|w| w.as_str()) {
            expected.entry(w.to_string()).or_default().push((id.clone(), heads.clone()));
        }
    }
    for (worker, (device, _)) in &devices {
        let held: std::collections::BTreeSet<String> = device.people().await?.into_iter().map(|p| p.id).collect();
        let want = expected.remove(worker).unwrap_or_default();
        for (id, heads) in &want {
            if !held.contains(id) {
                problems.push(format!("{worker}'s phone lacks {id}"));
            } else if &device.heads(id).await? != heads {
                problems.push(format!("{worker}'s copy of {id} differs from the server's"));
            }
        }
        let want_ids: std::collections::BTreeSet<&String> = want.iter().map(|(id, _)| id).collect();
        for id in held.iter().filter(|id| !want_ids.contains(id)) {
            problems.push(format!("{worker}'s phone holds {id}, which is not assigned to it"));
        }
    }
    let report = api(opts, token, "GET", &format!("/v1/report{q}"), None).await?;
    Ok(Outcome { report, problems, devices: devices.len(), documents: docs.len(), syncs })
}
