//! Child process for the crash test: records visits as fast as it can into the store at
//! `argv[1]`, printing `ok <visit id>` after each call returns, until it is killed.

use std::io::Write;
use std::sync::Arc;

use peersync_core::{CoreError, Device, NewPerson, NewVisit, SystemClock};

const KEY: [u8; 32] = [5; 32];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), CoreError> {
    let path = std::env::args().nth(1).expect("usage: crash_writer STORE_DIR RUN");
    let run = std::env::args().nth(2).expect("usage: crash_writer STORE_DIR RUN");
    let device = Device::open(&path, &KEY, Arc::new(SystemClock)).await?;
    device.set_worker("w-crash").await?;
    if device.people().await?.is_empty() {
        device
            .register_person(NewPerson {
                id: Some("p-crash".into()),
                alias: "Crash Test".into(),
                year_of_birth: 1990,
                workers: vec![],
                record: true,
                share_with_coordinator: true,
                research: false,
            })
            .await?;
    }
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let id = format!("v-{run}-{i}");
        device
            .record_visit(
                "p-crash",
                NewVisit {
                    id: Some(id.clone()),
                    started_at: chrono::Utc::now(),
                    duration_min: 30,
                    mode: "phone".into(),
                    setting: "home".into(),
                    activities: vec!["support".into()],
                    goals: vec![],
                    referrals: vec![],
                    notes: "n".repeat(200),
                    follow_up: None,
                },
            )
            .await?;
        writeln!(out, "ok {id}").and_then(|_| out.flush()).expect("parent went away");
    }
    Ok(())
}
