//! The `peersync` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::{AppState, serve};

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
        #[arg(long, default_value = "127.0.0.1:8080", env = "PEERSYNC_LISTEN")]
        listen: SocketAddr,
        /// Person documents kept in memory at most; others are loaded on demand.
        #[arg(long, default_value_t = crate::app::DEFAULT_CACHE_DOCS, env = "PEERSYNC_CACHE_DOCS")]
        cache_docs: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot open the data directory: {0}")]
    Store(#[from] peersync_core::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Run the command line; returns when the command is done.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { data, listen, cache_docs } => {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let state = Arc::new(AppState::open_with(&data, rx, cache_docs)?);
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| CliError::Listen { addr: listen, source })?;
            let addr = listener.local_addr().map_err(CliError::Serve)?;
            tracing::info!(%addr, data = %data.display(), "peersync serving");
            println!("peersync listening on http://{addr} (data in {})", data.display());
            serve(listener, state, tx, shutdown_signal()).await.map_err(CliError::Serve)?;
            tracing::info!("peersync stopped");
            Ok(())
        }
    }
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
    let filter = EnvFilter::try_from_env("PEERSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
