//! The `peersync` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::{AppState, Options, serve};

#[derive(Parser, Debug)]
#[command(name = "peersync", version, about = "Offline-first sync backend for peer-support services")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sync server on embedded sled.
    Serve {
        /// Data directory (created if missing).
        #[arg(long, default_value = "./peersync-data", env = "PEERSYNC_DATA")]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", env = "PEERSYNC_LISTEN", value_parser = listen_addr)]
        listen: SocketAddr,
        /// Person documents whose stored bytes are kept in memory at most; others are read
        /// from the store on demand.
        #[arg(long, default_value_t = crate::app::DEFAULT_CACHE_DOCS, env = "PEERSYNC_CACHE_DOCS")]
        cache_docs: usize,
        /// Megabytes of stored document bytes kept in memory at most.
        #[arg(long, default_value_t = crate::app::DEFAULT_CACHE_MB, env = "PEERSYNC_CACHE_MB")]
        cache_mb: usize,
        /// Token for the admin HTTP API (Authorization: Bearer …); without it the API is off.
        #[arg(long, env = "PEERSYNC_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// TLS certificate chain (PEM); with --tls-key the server speaks HTTPS/WSS itself.
        #[arg(long, env = "PEERSYNC_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, env = "PEERSYNC_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address other than loopback. Records would cross the network
        /// unencrypted: only behind a TLS-terminating proxy on the same host.
        #[arg(long)]
        allow_plain_http: bool,
        /// Behind a proxy on the same host: a client's address (for login and enrollment
        /// throttles and the audit log) is the last `X-Forwarded-For` entry of a connection
        /// from loopback. Without it every client behind the proxy is 127.0.0.1.
        #[arg(long, env = "PEERSYNC_TRUST_FORWARDED_FOR")]
        trust_forwarded_for: bool,
        /// Where every erasure is also written, outside the data directory [default: beside
        /// it, `<data>.erasures`]. Keep it out of the data directory's backups: a server
        /// restored from a backup erases again at start everyone it names.
        #[arg(long, env = "PEERSYNC_ERASURE_LEDGER")]
        erasure_ledger: Option<PathBuf>,
        /// Stop when stdin closes: for a server run as a child process (`peersync bench`), so
        /// that it never outlives its parent.
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
    },
    /// Write a synthetic field scenario (JSON Lines) to stdout.
    Simulate {
        #[command(flatten)]
        size: crate::simulate::Params,
    },
    /// The demo: a server on embedded sled with a demo organisation whose small team recorded
    /// offline and synced; prints the dashboard URL and login, serves until Ctrl-C. A second
    /// start reuses the data.
    Demo {
        #[arg(long, default_value = "./peersync-data", env = "PEERSYNC_DATA")]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080", env = "PEERSYNC_LISTEN", value_parser = listen_addr)]
        listen: SocketAddr,
    },
    /// Replay a field scenario (JSON Lines) through real devices and a server; check that all
    /// converged and print the coordinator report. Exit status 1 if anything did not.
    Replay {
        /// The scenario file.
        file: PathBuf,
        /// A running server (`ws://…` on loopback or `wss://…`); without it an embedded server
        /// runs on a temporary directory.
        #[arg(long, requires = "admin_token")]
        server: Option<String>,
        /// The server's admin token.
        #[arg(long, env = "PEERSYNC_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Write the report here instead of stdout.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Organisation to create for the replay (default: a fresh one).
        #[arg(long)]
        org: Option<String>,
    },
    /// Measure sync over emulated links: four phases (first upload, idle re-sync, restore on a
    /// fresh phone, incremental) with every worker's phone at once; one line per phase.
    Bench {
        #[command(flatten)]
        size: crate::simulate::Params,
        /// A scenario file (JSON Lines) instead of a generated one.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// A running server (`ws://…`); without it the server runs as a child process on a
        /// temporary directory, and its peak memory is reported.
        #[arg(long, requires = "admin_token")]
        server: Option<String>,
        /// The server's admin token.
        #[arg(long, env = "PEERSYNC_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Each phone's link: lan (no emulation), 3g (100 ms one way, 1.5 Mbit/s), 2g (300 ms,
        /// 250 kbit/s).
        #[arg(long, value_enum, default_value = "lan")]
        link: crate::bench::link::Profile,
        /// One JSON object per phase.
        #[arg(long)]
        json: bool,
        /// Give up on a phase after this many seconds.
        #[arg(long, default_value_t = 600)]
        phase_timeout: u64,
        /// Also run the same phases, phones, documents and links against automerge-repo's sync
        /// server and print both and the ratios (needs Node 20+ and npm; runs `npm install` in
        /// --automerge-repo-dir if its node_modules is missing).
        #[arg(long)]
        compare_automerge_repo: bool,
        /// Where the Node side of the comparison is (default: bench/automerge-repo in the
        /// source tree this executable was built from).
        #[arg(long, requires = "compare_automerge_repo")]
        automerge_repo_dir: Option<PathBuf>,
        /// Threads the simulated phones share for their blocking work (reading and writing
        /// their stores, loading documents). Each real phone has its own processor; here every
        /// phone shares this machine's with the others and the server, and a thread per busy
        /// phone (tokio's default pool of 512) spends a tenth of the phones' CPU in a restore
        /// switching between them. At least 1.
        #[arg(long, default_value_t = 4)]
        phone_threads: usize,
    },
    /// Administer the data directory directly (while no server runs on it).
    Admin {
        #[arg(long, default_value = "./peersync-data", env = "PEERSYNC_DATA")]
        data: PathBuf,
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminAction {
    /// Create an organisation.
    CreateOrg {
        id: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Create a coordinator account (password from --password, PEERSYNC_PASSWORD, or stdin).
    CreateCoordinator {
        #[arg(long)]
        org: String,
        #[arg(long)]
        username: String,
        #[arg(long, env = "PEERSYNC_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Add a worker with one of the five peer roles.
    AddWorker {
        #[arg(long)]
        org: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Issue a one-time enrollment code for a worker's phone (valid 24 hours).
    EnrollmentCode {
        #[arg(long)]
        org: String,
        #[arg(long)]
        worker: String,
    },
    /// Assign a person to a worker.
    Assign {
        #[arg(long)]
        org: String,
        #[arg(long)]
        person: String,
        #[arg(long)]
        worker: String,
    },
    /// Revoke a device (a lost phone): it is told to wipe when it next connects.
    Revoke {
        #[arg(long)]
        org: String,
        #[arg(long)]
        device: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot open the data directory: {0}")]
    Store(#[from] peersync_core::StoreError),
    #[error("{0}")]
    Directory(#[from] crate::directory::DirectoryError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("bench: {0}")]
    Bench(crate::bench::BenchError),
}

/// The runtime `cli` runs on: tokio's defaults, but for `bench` a blocking pool of
/// `--phone-threads` (see there).
pub fn runtime(cli: &Cli) -> Result<tokio::runtime::Runtime, CliError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Command::Bench { phone_threads, .. } = &cli.command {
        if *phone_threads == 0 {
            return Err(CliError::Usage("--phone-threads must be at least 1".into()));
        }
        builder.max_blocking_threads(*phone_threads);
    }
    builder.build().map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))
}

/// Run the command line; returns when the command is done.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { data, listen, cache_docs, cache_mb, admin_token, tls_cert, tls_key, allow_plain_http, trust_forwarded_for, erasure_ledger, stop_on_stdin_eof } => {
            // It opens every organisation's administration, and guesses at it are not throttled.
            if admin_token.as_ref().is_some_and(|t| t.chars().count() < MIN_ADMIN_TOKEN) {
                return Err(CliError::Usage(format!("--admin-token must have at least {MIN_ADMIN_TOKEN} characters (a random one: `uuidgen`, or `openssl rand -hex 16`)")));
            }
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(crate::tls::acceptor(&c, &k).map_err(|e| CliError::Usage(e.to_string()))?),
                _ => None,
            };
            if tls.is_none() && !listen.ip().is_loopback() && !allow_plain_http {
                return Err(CliError::Usage(format!(
                    "refusing to serve plain HTTP on {listen}: give --tls-cert and --tls-key, listen on loopback, or pass --allow-plain-http behind a TLS proxy"
                )));
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            let erasure_ledger = Some(match erasure_ledger {
                Some(l) => l,
                None => crate::app::default_erasure_ledger(&data)?,
            });
            let opts = Options { cache_docs, cache_mb, admin_token, tls: tls.is_some(), trust_forwarded_for, erasure_ledger };
            // The port first: a server that cannot listen leaves no data directory behind.
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| CliError::Listen { addr: listen, source })?;
            let state = Arc::new(AppState::open(&data, rx, opts)?);
            let addr = listener.local_addr().map_err(CliError::Serve)?;
            tracing::info!(%addr, data = %data.display(), "peersync serving");
            let scheme = if tls.is_some() { "https" } else { "http" };
            say(format_args!("peersync listening on {scheme}://{addr} (data in {})", data.display()));
            let stop = async move {
                if stop_on_stdin_eof {
                    tokio::select! { _ = shutdown_signal() => {}, _ = stdin_eof() => {} }
                } else {
                    shutdown_signal().await
                }
            };
            serve(listener, tls, state, tx, stop).await.map_err(CliError::Serve)?;
            tracing::info!("peersync stopped");
            Ok(())
        }
        Command::Replay { file, server, admin_token, report, org } => replay(file, server, admin_token, report, org).await,
        Command::Simulate { size } => {
            size.check().map_err(CliError::Usage)?;
            let events = crate::simulate::simulate(&size);
            use std::io::Write;
            std::io::stdout().write_all(crate::simulate::to_jsonl(&events).as_bytes()).map_err(CliError::Output)?;
            Ok(())
        }
        Command::Demo { data, listen } => demo(data, listen).await,
        Command::Bench { size, scenario, server, admin_token, link, json, phase_timeout, compare_automerge_repo, automerge_repo_dir, phone_threads: _ } => {
            if phase_timeout == 0 {
                return Err(CliError::Usage("--phase-timeout must be at least 1 second".into()));
            }
            if let Some(url) = &server {
                check_server_url(url)?;
            }
            let phase_timeout = std::time::Duration::from_secs(phase_timeout);
            let compare_automerge_repo = compare_automerge_repo.then(|| automerge_repo_dir.unwrap_or_else(crate::bench::default_automerge_repo_dir));
            let args =
                crate::bench::BenchArgs { size, scenario, server, admin_token, link, json, phase_timeout, compare_automerge_repo };
            // On Ctrl-C or SIGTERM the bench is dropped, which stops the server child and the
            // proxies and removes the temporary stores.
            tokio::select! {
                r = crate::bench::run(args) => r.map_err(CliError::Bench),
                _ = shutdown_signal() => Err(CliError::Usage("interrupted".into())),
            }
        }
        Command::Admin { data, action } => {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let state = AppState::open(&data, rx, Options::default())?;
            tokio::task::spawn_blocking(move || admin(&state, action)).await.map_err(|e| CliError::Usage(e.to_string()))?
        }
    }
}

const DEMO_ORG: &str = "demo";
/// Shortest admin token `serve` accepts.
const MIN_ADMIN_TOKEN: usize = 16;

async fn demo(data: PathBuf, listen: SocketAddr) -> Result<(), CliError> {
    let token = uuid::Uuid::new_v4().to_string();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let opts = Options { admin_token: Some(token.clone()), erasure_ledger: Some(crate::app::default_erasure_ledger(&data)?), ..Options::default() };
    let state = Arc::new(AppState::open(&data, rx, opts)?);
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| CliError::Listen { addr: listen, source })?;
    let addr = listener.local_addr().map_err(CliError::Serve)?;
    let fresh = state.dir.org(DEMO_ORG)?.is_none();
    let login_file = data.join("demo-login.txt");
    if !fresh && state.dir.coordinator(DEMO_ORG, "coordinator")?.is_none() {
        // The coordinator is made last: an organisation without one is a setup that was
        // stopped part-way (Ctrl-C, a crash), with part of the team's data.
        return Err(CliError::Usage(format!(
            "the demo in {} was not set up completely (its first start was stopped part-way), so it has no coordinator login; delete {} and run `peersync demo` again",
            data.display(),
            data.display()
        )));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, None, state.clone(), tx, async move {
        tokio::select! { _ = shutdown_signal() => {}, _ = stop_rx => {} }
    }));
    if fresh {
        say(format_args!("setting up the demo organisation: a small team records offline for 8 weeks and syncs..."));
        let events = crate::simulate::simulate(&crate::simulate::Params { workers: 6, people: 60, weeks: 8, seed: 1 });
        let opts = peersync_core::sync::SyncOptions::new(format!("ws://{addr}"));
        let started = std::time::Instant::now();
        let bar = crate::progress::Progress::new("  replaying ");
        let progress = |done: usize, total: usize| bar.update(crate::replay::progress_line(done, total, started.elapsed()));
        let phones = data.join("demo-phones");
        let outcome = crate::replay::replay(&events, &opts, &token, DEMO_ORG, &phones, &progress).await;
        bar.done();
        // The simulated phones' stores are sealed with keys that lived only in this process:
        // nothing could open them again, so they are not left behind.
        if let Err(e) = std::fs::remove_dir_all(&phones) {
            tell(format_args!("  note: could not remove {}: {e}\n", phones.display()));
        }
        let outcome = outcome.map_err(|e| CliError::Usage(format!("demo setup failed: {e}; delete {} and run `peersync demo` again", data.display())))?;
        for p in &outcome.problems {
            tell(format_args!("  problem: {p}\n"));
        }
        let password = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let st = state.clone();
        let pw = password.clone();
        tokio::task::spawn_blocking(move || st.dir.create_coordinator(DEMO_ORG, "coordinator", &pw))
            .await
            .map_err(|e| CliError::Usage(e.to_string()))??;
        write_private(&login_file, format!("organisation: {DEMO_ORG}\nusername: coordinator\npassword: {password}\n").as_bytes())
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", login_file.display())))?;
        say(format_args!(
            "  {} phones, {} people, {} syncs; everything converged: {}",
            outcome.devices,
            outcome.documents,
            outcome.syncs,
            if outcome.problems.is_empty() { "yes" } else { "NO" }
        ));
    }
    let login = std::fs::read_to_string(&login_file).unwrap_or_else(|_| {
        format!(
            "(the login file {} is gone; with the demo stopped, `peersync admin --data {} create-coordinator --org {DEMO_ORG} --username NAME` makes another login)\n",
            login_file.display(),
            data.display()
        )
    });
    say(format_args!("\npeersync demo is running. Dashboard: http://{addr}/\n{login}Data: {} (a second start reuses it). Ctrl-C to stop.", data.display()));
    let _ = &stop_tx;
    server.await.map_err(|e| CliError::Usage(e.to_string()))?.map_err(CliError::Serve)
}

async fn replay(file: PathBuf, server: Option<String>, admin_token: Option<String>, report: Option<PathBuf>, org: Option<String>) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&file).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let numbered = crate::scenario::parse_numbered(&text).map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let (lines, events): (Vec<usize>, Vec<crate::scenario::Event>) = numbered.into_iter().unzip();
    if events.is_empty() {
        return Err(CliError::Usage(format!("{} holds no events", file.display())));
    }
    // The format is sorted by time, and each phone's clock follows its events: one out of
    // order sets a phone's clock back. Replayed all the same, in the file's order.
    let behind: Vec<usize> = events.windows(2).zip(&lines[1..]).filter(|(w, _)| w[1].at() < w[0].at()).map(|(_, line)| *line).collect();
    if let Some(first) = behind.first() {
        eprintln!("warning: {} not in time order (the first at line {first}); replayed in the file's order", count(behind.len(), "event"));
    }
    if let Some(url) = &server {
        check_server_url(url)?;
    }
    // Found out now, not after a replay of many minutes.
    if let Some(path) = &report {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(CliError::Usage(format!("--report {}: {} is not a directory", path.display(), dir.display())));
        }
    }
    let work = tempfile::tempdir().map_err(|e| CliError::Usage(e.to_string()))?;
    let mut embedded = None;
    let (url, token) = match (server, admin_token) {
        (Some(url), Some(token)) => (url, token),
        _ => {
            let token = uuid::Uuid::new_v4().to_string();
            let (tx, rx) = tokio::sync::watch::channel(false);
            let opts = Options { admin_token: Some(token.clone()), ..Options::default() };
            let state = Arc::new(AppState::open(&work.path().join("server"), rx, opts)?);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(CliError::Serve)?;
            let addr = listener.local_addr().map_err(CliError::Serve)?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, None, state, tx, async move {
                let _ = stop_rx.await;
            }));
            embedded = Some((stop_tx, task));
            eprintln!("embedded server on ws://{addr}");
            (format!("ws://{addr}"), token)
        }
    };
    let org = org.unwrap_or_else(|| format!("replay-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    if embedded.is_none() {
        eprintln!("replaying into organisation {org} on {url}");
    }
    let opts = peersync_core::sync::SyncOptions::new(url);
    let started = std::time::Instant::now();
    let bar = crate::progress::Progress::new("replaying: ");
    let progress = |done: usize, total: usize| bar.update(crate::replay::progress_line(done, total, started.elapsed()));
    let outcome = crate::replay::replay_lines(&events, &lines, &opts, &token, &org, work.path(), &progress).await;
    bar.done();
    if let Some((stop, task)) = embedded {
        let _ = stop.send(());
        let _ = task.await;
    }
    let outcome = outcome.map_err(|e| CliError::Usage(format!("replay failed: {e}")))?;
    eprintln!(
        "replayed {} in {:.1} s: {} on {}, {}",
        count(events.len(), "event"),
        started.elapsed().as_secs_f64(),
        count(outcome.syncs as usize, "sync"),
        count(outcome.devices, "device"),
        count(outcome.documents, "person document")
    );
    let json = serde_json::to_string_pretty(&outcome.report).expect("JSON serializes");
    match report {
        Some(path) => std::fs::write(&path, json + "\n").map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?,
        None => out(format_args!("{json}"))?,
    }
    if outcome.problems.is_empty() {
        eprintln!("all devices converged with the server");
        Ok(())
    } else {
        for p in outcome.problems.iter().take(50) {
            eprintln!("problem: {p}");
        }
        Err(CliError::Usage(format!("{}: the replay did not converge cleanly", count(outcome.problems.len(), "problem"))))
    }
}

fn admin(state: &AppState, action: AdminAction) -> Result<(), CliError> {
    let dir = &state.dir;
    match action {
        AdminAction::CreateOrg { id, name } => {
            let o = dir.create_org(&id, &name)?;
            let _ = state.audit.record(&o.id, "admin", "create-org", vec![], true, "via peersync admin");
            out(format_args!("created organisation {}", o.id))?;
        }
        AdminAction::CreateCoordinator { org, username, password } => {
            let password = match password {
                Some(p) => p,
                None => {
                    eprintln!("password for {username}:");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map_err(|e| CliError::Usage(e.to_string()))?;
                    line.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            dir.create_coordinator(&org, &username, &password)?;
            let _ = state.audit.record(&org, "admin", "create-coordinator", vec![], true, format!("coordinator {username}"));
            out(format_args!("created coordinator {username} in {org}"))?;
        }
        AdminAction::AddWorker { org, id, role, name } => {
            let w = dir.add_worker(&org, &id, &name, &role)?;
            let _ = state.audit.record(&org, "admin", "create-worker", vec![], true, format!("worker {} ({})", w.id, w.role));
            out(format_args!("added worker {} ({})", w.id, w.role))?;
        }
        AdminAction::EnrollmentCode { org, worker } => {
            let (code, expires) = dir.issue_code(&org, &worker)?;
            let _ = state.audit.record(&org, "admin", "issue-code", vec![], true, format!("enrollment code for worker {worker}"));
            out(format_args!("{code}  (for {worker}; single use; expires {expires})"))?;
        }
        AdminAction::Assign { org, person, worker } => {
            dir.assignable(&org, &person, &worker)?;
            state.hub.touch(&org, &person, |seq| {
                dir.assign(&org, &person, std::slice::from_ref(&worker), seq, "admin").map(|_| ()).map_err(|e| peersync_core::StoreError::Io(e.to_string()))
            })?;
            let _ = state.audit.record(&org, "admin", "assign", vec![person.clone()], true, format!("to worker {worker}"));
            out(format_args!("assigned {person} to {worker}"))?;
        }
        AdminAction::Revoke { org, device } => {
            dir.revoke(&org, &device, "admin")?;
            let _ = state.audit.record(&org, "admin", "revoke", vec![], true, format!("device {device}"));
            out(format_args!("revoked {device}"))?;
        }
    }
    Ok(())
}

/// A line of a command's output on stdout. Unlike `println!`, a closed pipe or a full disk is
/// an error the command reports (and exits non-zero for), not a panic.
fn out(text: std::fmt::Arguments) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(format!("{text}\n").as_bytes()).and_then(|()| stdout.flush()).map_err(CliError::Output)
}

/// Write a file only its owner may read (the demo's password).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    crate::keyring::owner_only().open(path)?.write_all(bytes)
}

/// `n` and `what`, plural when `n` is not 1 ("1 device", "3 devices").
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `--listen`: an address and port, or a host name that resolves to one (`localhost:8080`).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = s.to_socket_addrs().map_err(|e| format!("{s:?} is not an address and port (such as 127.0.0.1:8080): {e}"))?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A `--server` for replay or bench: a websocket URL of a server's root, refused before anything
/// is created on the server.
fn check_server_url(url: &str) -> Result<(), CliError> {
    let bad = |why: &str| Err(CliError::Usage(format!("--server {url:?}: {why}; give the server's address as ws://HOST:PORT (or wss:// with TLS)")));
    let Ok(uri) = url.parse::<axum::http::Uri>() else { return bad("not a URL") };
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return bad("the scheme must be ws or wss");
    }
    if uri.authority().is_none() {
        return bad("no host");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return bad("no path: peersync finds its endpoints itself");
    }
    Ok(())
}

/// A status line of a serving command, on stdout in one write. Write errors are ignored:
/// a closed stdout (`peersync demo | head`, a supervisor that stopped reading) must not take
/// the server down, which `println!` would by panicking on EPIPE.
fn say(text: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(format!("{text}\n").as_bytes());
}

/// Progress of a serving command on stderr; like [`say`], never fatal.
fn tell(text: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("{text}").as_bytes());
}

/// Resolves when stdin reaches its end (or cannot be read): the parent has gone.
async fn stdin_eof() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Blocking reads on a thread of its own: tokio's stdin would hold a blocking-pool thread.
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        while let Ok(n) = std::io::stdin().read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let asked = std::env::var("PEERSYNC_LOG").ok();
    let mut filter = asked.as_deref().and_then(|s| EnvFilter::try_new(s).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    // automerge instruments its loading with INFO spans whose fields include the document's
    // whole change graph, formatted on every load: 4% of the server's CPU in a first upload.
    // Its spans stay off unless PEERSYNC_LOG names automerge itself.
    if !asked.is_some_and(|s| s.contains("automerge"))
        && let Ok(quiet) = "automerge=warn".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init();
}
