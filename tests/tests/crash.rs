//! A phone dies mid-write (flat battery, OS kill): every visit whose save returned is still
//! there after restart, and the store opens cleanly. Bounded: a fixed number of kills.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peersync_core::{Device, SystemClock};
use rand::{Rng, SeedableRng};

const KEY: [u8; 32] = [5; 32];
const KILLS: usize = 25;

#[tokio::test]
async fn sigkill_at_random_moments_loses_no_acknowledged_visit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut acknowledged: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for run in 0..KILLS {
        assert!(Instant::now() < deadline, "crash loop took too long");
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(dir.path())
            .arg(run.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("ok ").map(str::to_string))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        acknowledged.extend(reader.join().unwrap());

        let device = Device::open(dir.path(), &KEY, Arc::new(SystemClock)).await.expect("store opens after a kill");
        if device.people().await.unwrap().is_empty() {
            assert!(acknowledged.is_empty(), "a visit was acknowledged before its person existed");
            continue;
        }
        let record = device.person("p-crash").await.unwrap();
        let present: std::collections::HashSet<_> = record.visits.iter().map(|v| v.id.clone()).collect();
        for id in &acknowledged {
            assert!(present.contains(id), "run {run}: acknowledged visit {id} lost");
        }
    }
    assert!(acknowledged.len() > 50, "the writer made progress ({} visits)", acknowledged.len());
}
