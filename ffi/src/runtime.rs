//! The library's own tokio runtime. Calls arrive from foreign threads and foreign async
//! runtimes (Kotlin coroutines, Swift tasks, Python asyncio) that know nothing of tokio, so
//! every call runs as a task on this runtime and the foreign side awaits its handle.

use std::future::Future;
use std::sync::OnceLock;

use crate::error::PeersyncError;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            // Phones have few cores and the work is mostly waiting on disk and network.
            .worker_threads(2)
            .thread_name("peersync")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the peersync runtime (threads or timers unavailable): {e}"))
    })
}

/// Run `fut` on the library's runtime. If the caller stops waiting (a cancelled coroutine),
/// the task still finishes: a write that started is made durable rather than torn.
pub(crate) async fn run<T, F>(fut: F) -> Result<T, PeersyncError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, PeersyncError>> + Send + 'static,
{
    runtime()
        .spawn(fut)
        .await
        .map_err(|e| PeersyncError::Internal(format!("the call's task failed: {e}")))?
}
