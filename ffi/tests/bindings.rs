//! The bindings from real foreign languages: a Python program and a Kotlin program on the JVM
//! each open a store, enroll, record offline, sync with a real server on loopback started here,
//! read back another device's records, hear progress, get typed errors, and (Kotlin) call one
//! device from several threads. Then this test checks, from a Rust device, that what they
//! recorded reached the server, revokes them, and runs them again to see them wiped.
//!
//! Needs python3, and for Kotlin the npm `kotlin-compiler` 2.x and Debian's `libjna-java`:
//! `scripts/test` installs both. Swift cannot be compiled here; its bindings are generated and
//! checked for the API.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peersync_tests::{ORG, TestServer, person, sync, visit, visit_ids};

/// The cdylib cargo built for this test (integration tests are linked beside it).
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    let name = format!("{}peersync_ffi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    for dir in [deps, deps.parent().expect("profile directory")] {
        if dir.join(&name).exists() {
            return dir.join(&name);
        }
    }
    panic!("{name} not found beside {}: build the peersync-ffi crate first", exe.display());
}

/// Run the in-workspace uniffi-bindgen for `language` into `out`.
fn generate(language: &str, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--no-format", "--language", language, "--out-dir"])
        .arg(out)
        .arg("--library")
        .arg(cdylib())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run uniffi-bindgen");
    assert!(status.success(), "uniffi-bindgen failed for {language}");
}

/// Run a foreign program to completion (bounded), failing the test with its output if it fails.
fn run(what: &str, cmd: &mut Command, limit: Duration) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("poll child").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!("{what} did not finish within {limit:?}\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("collect output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    eprintln!("{}", text.trim());
}

/// The server, a teammate's Rust phone that shares a person with the foreign phone, and the
/// environment the foreign programs read.
struct Scene {
    server: TestServer,
    teammate: peersync_core::Device,
    env: Vec<(String, String)>,
    out: PathBuf,
}

const OTHER_NOTES: &str = "recorded on the teammate's phone";

async fn scene(dir: &Path, worker: &str, teammate: &str, other: &str) -> Scene {
    let server = TestServer::start(&dir.join("server")).await;
    let (phone, _) = server.phone(dir, teammate).await;
    let mut p = person(other, "Shared");
    p.workers = vec![worker.to_string()];
    phone.register_person(p).await.unwrap();
    phone.record_visit(other, visit("v-teammate", OTHER_NOTES)).await.unwrap();
    sync(&phone, &server).await;
    let out = dir.join("foreign-out.json");
    let env = [
        ("PEERSYNC_SERVER", server.url.clone()),
        ("PEERSYNC_STORE", dir.join("foreign-store").display().to_string()),
        ("PEERSYNC_CODE", server.code(worker)),
        ("PEERSYNC_WORKER", worker.to_string()),
        ("PEERSYNC_TEAMMATE", teammate.to_string()),
        ("PEERSYNC_OTHER", other.to_string()),
        ("PEERSYNC_OTHER_NOTES", OTHER_NOTES.to_string()),
        ("PEERSYNC_OUT", out.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Scene { server, teammate: phone, env, out }
}

impl Scene {
    /// Revoke the foreign phone's device, as a coordinator would for a lost phone.
    async fn revoke_foreign(&self) {
        let text = std::fs::read_to_string(&self.out).expect("the foreign program wrote its device id");
        let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["device_id"].as_str().unwrap().to_string();
        let (status, body) = self.server.admin("POST", &format!("/v1/devices/{id}/revoke?org={ORG}"), None).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Run a blocking foreign program without stalling the server on this runtime.
async fn foreign(what: &'static str, mut cmd: Command, limit: Duration) {
    tokio::task::spawn_blocking(move || run(what, &mut cmd, limit)).await.expect("runner thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_app_records_offline_syncs_and_is_wiped() {
    let dir = tempfile::tempdir().unwrap();
    let scene = scene(dir.path(), "w-001", "w-002", "rs-p1").await;
    let module = dir.path().join("python");
    generate("python", &module);
    std::fs::copy(cdylib(), module.join(cdylib().file_name().unwrap())).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/bindings_test.py");

    let python = |phase: &str| {
        let mut c = Command::new("python3");
        c.arg(&script).arg(phase).env("PYTHONPATH", &module).envs(scene.env.iter().map(|(k, v)| (k, v)));
        c
    };
    foreign("python main phase", python("main"), Duration::from_secs(120)).await;

    // What the Python phone recorded offline reached the teammate through the server, as the
    // Python phone last left it.
    sync(&scene.teammate, &scene.server).await;
    assert_eq!(visit_ids(&scene.teammate, "py-p1").await, ["py-v1", "py-v2", "py-v3", "py-v4"]);
    let record = scene.teammate.person("py-p1").await.unwrap();
    let v2 = record.visits.iter().find(|v| v.id == "py-v2").unwrap();
    assert_eq!((v2.notes.as_str(), v2.duration_min), ("amended", 75));
    assert!(record.consent.research);
    assert_eq!(record.checkins.len(), 1);

    scene.revoke_foreign().await;
    foreign("python wiped phase", python("wiped"), Duration::from_secs(60)).await;
    scene.server.stop().await;
}

/// Where `scripts/test` installs the Kotlin compiler and JNA.
fn kotlin_tools() -> (PathBuf, PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kotlin = std::env::var_os("PEERSYNC_KOTLIN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/tools/kotlin/node_modules/kotlin-compiler"));
    let kotlinc = kotlin.join("bin/kotlinc");
    let coroutines = kotlin.join("lib/kotlinx-coroutines-core-jvm.jar");
    let jna = PathBuf::from(std::env::var_os("PEERSYNC_JNA_JAR").unwrap_or_else(|| "/usr/share/java/jna.jar".into()));
    for (path, how) in [(&kotlinc, "npm package kotlin-compiler 2.x"), (&coroutines, "npm package kotlin-compiler 2.x"), (&jna, "Debian package libjna-java")] {
        assert!(path.exists(), "{} is missing: run scripts/test, which installs the {how}", path.display());
    }
    (kotlinc, coroutines, jna)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kotlin_app_records_from_many_threads_syncs_and_is_wiped() {
    let (kotlinc, coroutines, jna) = kotlin_tools();
    let dir = tempfile::tempdir().unwrap();
    let scene = scene(dir.path(), "w-003", "w-004", "rs-p2").await;
    let sources = dir.path().join("kotlin");
    generate("kotlin", &sources);
    let jar = dir.path().join("bindings-test.jar");
    let mut compile = Command::new(&kotlinc);
    compile
        .arg("-nowarn")
        .arg("-include-runtime")
        .arg("-cp")
        .arg(format!("{}:{}", coroutines.display(), jna.display()))
        .arg("-d")
        .arg(&jar)
        .arg(sources.join("org/peersync/peersync_ffi.kt"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kotlin/BindingsTest.kt"));
    foreign("kotlinc", compile, Duration::from_secs(600)).await;

    let lib_dir = cdylib().parent().unwrap().to_path_buf();
    let java = |phase: &str| {
        let mut c = Command::new("java");
        c.arg(format!("-Djna.library.path={}", lib_dir.display()))
            .arg("-cp")
            .arg(format!("{}:{}:{}", jar.display(), coroutines.display(), jna.display()))
            .arg("BindingsTestKt")
            .arg(phase)
            .envs(scene.env.iter().map(|(k, v)| (k, v)));
        c
    };
    foreign("kotlin main phase", java("main"), Duration::from_secs(180)).await;

    // Every visit the eight app threads recorded reached the teammate, once each.
    sync(&scene.teammate, &scene.server).await;
    let ids = visit_ids(&scene.teammate, "kt-p1").await;
    assert_eq!(ids.len(), 8 * 25 + 1, "{ids:?}");
    let record = scene.teammate.person("kt-p1").await.unwrap();
    assert!(record.visits.iter().any(|v| v.notes == "amended in kotlin"));

    scene.revoke_foreign().await;
    foreign("kotlin wiped phase", java("wiped"), Duration::from_secs(60)).await;
    scene.server.stop().await;
}

#[test]
fn swift_bindings_are_generated_with_the_whole_api() {
    let dir = tempfile::tempdir().unwrap();
    generate("swift", dir.path());
    let swift = std::fs::read_to_string(dir.path().join("Peersync.swift")).expect("Peersync.swift generated");
    // Unformatted output breaks lines between modifiers; compare with whitespace collapsed.
    let swift = swift.split_whitespace().collect::<Vec<_>>().join(" ");
    let header = std::fs::read_to_string(dir.path().join("PeersyncFFI.h")).expect("PeersyncFFI.h generated");
    assert!(dir.path().join("PeersyncFFI.modulemap").exists());
    for api in [
        "open class Device", "static func `open`(path: String, key: Data)", "func recordVisit(", "func recordCheckin(", "func editVisit(", "func setConsent(",
        "func people(", "func person(", "func followUpsDue(", "func pendingChanges(", "func sync(", "func startLiveSync(",
        "func subscribe(", "func enroll(", "func isWiped(", "public protocol DeviceListener", "public enum PeersyncError",
    ] {
        assert!(swift.contains(api), "the Swift bindings lack {api:?}");
    }
    assert!(header.contains("uniffi_peersync_ffi_fn_method_device_record_visit"));
}
