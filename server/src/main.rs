use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    peersync_server::cli::init_tracing();
    let cli = peersync_server::cli::Cli::parse();
    match peersync_server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peersync: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
