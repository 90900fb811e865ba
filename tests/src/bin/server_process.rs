//! The `peersync` command, built into this package so that tests can run the server as a
//! separate process (and kill it with SIGKILL).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    peersync_server::cli::init_tracing();
    match peersync_server::cli::run(peersync_server::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peersync: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
