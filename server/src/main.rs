use clap::Parser;

fn main() -> std::process::ExitCode {
    peersync_server::cli::init_tracing();
    let cli = peersync_server::cli::Cli::parse();
    let result = peersync_server::cli::runtime(&cli).and_then(|rt| rt.block_on(peersync_server::cli::run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peersync: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
