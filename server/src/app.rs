//! The HTTP layer: routes, shared state, the websocket upgrade.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use peersync_core::protocol::MAX_FRAME_BYTES;
use peersync_core::store::SledStore;
use tokio::sync::watch;

use crate::auth::{Access, Authenticator, DeclaredDevice, SameOrganisation};
use crate::docs::DocHub;
use crate::metrics::Metrics;
use crate::session::{self, Conn, Incoming};
use crate::store::{KvServerStore, ServerStore};

/// Documents kept in memory at most; the rest are loaded on demand.
pub const DEFAULT_CACHE_DOCS: usize = 2_000;
/// The server's sled page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;

pub struct AppState {
    pub hub: DocHub,
    pub auth: Arc<dyn Authenticator>,
    pub access: Arc<dyn Access>,
    pub metrics: Metrics,
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    pub fn new(store: Arc<dyn ServerStore>, shutdown: watch::Receiver<bool>, cache_docs: usize) -> Self {
        Self {
            hub: DocHub::new(store, cache_docs),
            auth: Arc::new(DeclaredDevice { org: "default".into() }),
            access: Arc::new(SameOrganisation),
            metrics: Metrics::default(),
            shutdown,
        }
    }

    /// State over the sled store in `data_dir`.
    pub fn open(data_dir: &Path, shutdown: watch::Receiver<bool>) -> Result<Self, peersync_core::StoreError> {
        Self::open_with(data_dir, shutdown, DEFAULT_CACHE_DOCS)
    }

    pub fn open_with(data_dir: &Path, shutdown: watch::Receiver<bool>, cache_docs: usize) -> Result<Self, peersync_core::StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| peersync_core::StoreError::Io(format!("cannot create {}: {e}", data_dir.display())))?;
        let kv = SledStore::open_with_cache(&data_dir.join("store"), SLED_CACHE_BYTES)?;
        Ok(Self::new(Arc::new(KvServerStore::new(kv)), shutdown, cache_docs))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/sync", get(sync))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.hub.cached_docs()),
    )
}

async fn sync(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let who = match state.auth.authenticate(&parts) {
        Ok(who) => who,
        Err(e) => {
            state.metrics.auth_failures.fetch_add(1, Relaxed);
            return (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response();
        }
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let shutdown = state.shutdown.clone();
    // Frames a little over the protocol limit still reach the session, which answers them with
    // a clear error; beyond this the websocket layer drops the connection.
    ws.max_message_size(MAX_FRAME_BYTES + (1 << 20))
        .max_frame_size(MAX_FRAME_BYTES + (1 << 20))
        .on_upgrade(move |socket| session::run(AxumConn(socket), state, who, shutdown))
}

struct AxumConn(WebSocket);

impl Conn for AxumConn {
    async fn recv(&mut self) -> Incoming {
        loop {
            return match self.0.next().await {
                Some(Ok(Message::Binary(b))) => Incoming::Frame(b.to_vec()),
                Some(Ok(Message::Text(_))) => Incoming::Text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => Incoming::Closed,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    // An oversized or malformed websocket frame: answer with a protocol error
                    // if the socket still takes it.
                    let _ = self.0.send(Message::Binary(
                        peersync_core::protocol::encode(&peersync_core::protocol::ServerMsg::Error {
                            code: peersync_core::protocol::ErrorCode::BadFrame,
                            message: format!("unreadable websocket frame: {e}"),
                        })
                        .unwrap_or_default()
                        .into(),
                    )).await;
                    Incoming::Closed
                }
            };
        }
    }

    async fn send(&mut self, frame: Vec<u8>) -> bool {
        self.0.send(Message::Binary(frame.into())).await.is_ok()
    }

    async fn close(&mut self) {
        let _ = self.0.send(Message::Close(None)).await;
        // Let the device read the close; then drop.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(m)) = self.0.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Serve on `listener` until `shutdown` resolves; open sync sessions are told to close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = shutdown_tx.send(true);
        })
        .await
}
