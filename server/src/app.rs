//! The HTTP layer: shared state, routes, the websocket upgrade.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use peersync_core::protocol::MAX_FRAME_BYTES;
use peersync_core::store::{LocalStore, SledStore};
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::auth::{Access, Assignments, Authenticator, DeviceIdentity, SignedDevice};
use crate::directory::Directory;
use crate::docs::DocHub;
use crate::keyring::Keyring;
use crate::metrics::Metrics;
use crate::session::{self, Conn, Incoming};
use crate::store::{KvServerStore, ServerStore};
use crate::throttle::Throttle;

/// Documents whose stored bytes the hub's cache keeps at most.
pub const DEFAULT_CACHE_DOCS: usize = 2_000;
/// Megabytes the hub's cache keeps at most.
pub const DEFAULT_CACHE_MB: usize = 32;
/// The server's sled page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;
/// Download batches produced at once on blocking threads (each reads the store and sends
/// stored bytes as they are: cheap, so a few keep two cores busy).
const DOWNLOAD_BATCHES_AT_ONCE: usize = 4;
/// Pushes prepared or committed at once, across sessions: enough to keep two cores busy
/// loading and merging while one commits, few enough to bound the loaded documents in memory.
const PUSHES_AT_ONCE: usize = 3;
/// Coordinator sessions end after this long.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// The ordered key-value store everything on the server lives in.
pub type Kv = Arc<dyn LocalStore>;

pub struct AppState {
    pub hub: DocHub,
    pub dir: Arc<Directory<Kv>>,
    /// Erasures, kept outside the data directory too (`None`: not kept).
    pub erasures: Option<crate::erasures::ErasureLedger>,
    pub audit: AuditLog<Kv>,
    pub auth: Arc<dyn Authenticator>,
    pub access: Arc<dyn Access>,
    pub metrics: Metrics,
    pub shutdown: watch::Receiver<bool>,
    /// Token for the admin API; `None` disables it.
    pub admin_token: Option<String>,
    pub sessions: crate::api::Sessions,
    /// Failed logins per account and per client address.
    /// Failed logins from one address to any account: higher than per account, so that one
    /// person's mistakes (or a stranger's guesses) do not lock out a whole office behind one
    /// address, while guessing across many accounts is still bounded.
    pub login_ip_throttle: Throttle,
    pub login_throttle: Throttle,
    /// Wrong enrollment codes per client address, and overall.
    pub code_throttle: Throttle,
    /// Whether the server speaks TLS (session cookies are then `Secure`).
    /// See [`Options::trust_forwarded_for`].
    pub trust_forwarded_for: bool,
    pub tls: bool,
    /// Sessions take this before handing a push's commit or a sync round to a blocking thread.
    /// The hub serialises writers anyway; waiting here instead of on its lock keeps one
    /// thread, not one per connected phone, waiting there.
    pub write_gate: tokio::sync::Mutex<()>,
    /// Sessions hold one of these from preparing a push until it is committed (see
    /// `DocHub::prepare_push`): it bounds the batches whose documents are loaded at once
    /// (with glibc's malloc every thread holding them can get an arena of its own that keeps
    /// what it freed).
    pub push_gate: tokio::sync::Semaphore,
    /// Download batches produced at once, across sessions (see `session::send_download`).
    pub download_gate: tokio::sync::Semaphore,
    /// Held while a session reads a device's sync record and writes it back, so that two
    /// connections of one device cannot interleave (one putting back an older record).
    pub device_records: std::sync::Mutex<()>,
    /// Sync connections open per device (`org/device`), bounded by [`MAX_SESSIONS_PER_DEVICE`].
    pub device_sessions: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// Sync connections one device may hold at once. A phone needs one (two while a live session
/// and a sync overlap); a few more cover connections the phone has left behind on a network it
/// lost, until TCP keepalive ends them. Past it, a device (or a stolen key) cannot take the
/// server's connections for itself.
pub const MAX_SESSIONS_PER_DEVICE: usize = 8;

/// One of a device's session slots, given back when dropped (the session ended, or the
/// upgrade never happened).
struct DeviceSlot {
    state: Arc<AppState>,
    key: String,
}

impl DeviceSlot {
    fn take(state: &Arc<AppState>, who: &crate::auth::DeviceIdentity) -> Option<Self> {
        let key = format!("{}/{}", who.org, who.device);
        let mut open = state.device_sessions.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.clone()).or_default();
        if *n >= MAX_SESSIONS_PER_DEVICE {
            return None;
        }
        *n += 1;
        Some(Self { state: state.clone(), key })
    }
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        let mut open = self.state.device_sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub cache_docs: usize,
    pub cache_mb: usize,
    pub admin_token: Option<String>,
    pub tls: bool,
    /// A TLS proxy on the same host forwards the requests: a client's address is the last
    /// `X-Forwarded-For` entry of a connection from loopback (for throttling and the log).
    pub trust_forwarded_for: bool,
    /// Where erasures are also written, outside the data directory (see `erasures`).
    pub erasure_ledger: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self { cache_docs: DEFAULT_CACHE_DOCS, cache_mb: DEFAULT_CACHE_MB, admin_token: None, tls: false, trust_forwarded_for: false, erasure_ledger: None }
    }
}

/// The ledger's usual place: beside the data directory, not in it, so that a copy of the data
/// directory (a backup) does not take it along. `--data .` or `..` are resolved first (their
/// "file name" would otherwise put the ledger inside).
pub fn default_erasure_ledger(data_dir: &Path) -> Result<std::path::PathBuf, peersync_core::StoreError> {
    let absolute = std::path::absolute(data_dir).map_err(|e| peersync_core::StoreError::Io(format!("cannot resolve {}: {e}", data_dir.display())))?;
    let mut resolved = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                resolved.pop();
            }
            std::path::Component::CurDir => {}
            other => resolved.push(other),
        }
    }
    let Some(name) = resolved.file_name() else {
        return Err(peersync_core::StoreError::Io("the data directory is the filesystem's root: give the erasure ledger a place (--erasure-ledger)".into()));
    };
    let mut name = name.to_os_string();
    name.push(".erasures");
    Ok(resolved.with_file_name(name))
}

impl AppState {
    pub fn new(kv: Kv, keyring: Keyring, shutdown: watch::Receiver<bool>, opts: Options) -> Self {
        let erasures = opts.erasure_ledger.clone().map(crate::erasures::ErasureLedger::new);
        let dir = Arc::new(Directory::new(kv.clone()));
        let store: Arc<dyn ServerStore> = Arc::new(KvServerStore::with_keyring(kv.clone(), keyring));
        Self {
            hub: DocHub::new(store, opts.cache_docs, opts.cache_mb << 20),
            auth: Arc::new(SignedDevice::new(dir.clone())),
            access: Arc::new(Assignments { dir: dir.clone() }),
            audit: AuditLog::new(kv),
            dir,
            erasures,
            metrics: Metrics::default(),
            shutdown,
            admin_token: opts.admin_token.filter(|t| !t.is_empty()),
            sessions: crate::api::Sessions::default(),
            login_throttle: Throttle::new(5, Duration::from_secs(15 * 60)),
            login_ip_throttle: Throttle::new(50, Duration::from_secs(15 * 60)),
            code_throttle: Throttle::new(10, Duration::from_secs(10 * 60)),
            tls: opts.tls,
            trust_forwarded_for: opts.trust_forwarded_for,
            write_gate: tokio::sync::Mutex::new(()),
            device_records: std::sync::Mutex::new(()),
            device_sessions: std::sync::Mutex::new(std::collections::HashMap::new()),
            push_gate: tokio::sync::Semaphore::new(PUSHES_AT_ONCE),
            download_gate: tokio::sync::Semaphore::new(DOWNLOAD_BATCHES_AT_ONCE),
        }
    }

    /// State over the data directory: sled in `store/`, person keys in `keys`.
    pub fn open(data_dir: &Path, shutdown: watch::Receiver<bool>, opts: Options) -> Result<Self, peersync_core::StoreError> {
        if data_dir.exists() && !data_dir.is_dir() {
            return Err(peersync_core::StoreError::Io(format!("{} is not a directory: give a directory for the server's data", data_dir.display())));
        }
        private_dir(data_dir)?;
        let kv = SledStore::open_for_server(&data_dir.join("store"), SLED_CACHE_BYTES)?;
        if let Some(ledger) = &opts.erasure_ledger {
            crate::erasures::ErasureLedger::new(ledger).check_place(data_dir).map_err(|e| peersync_core::StoreError::Io(e.to_string()))?;
        }
        let keyring = Keyring::open(&data_dir.join("keys"))?;
        let state = Self::new(Arc::new(kv), keyring, shutdown, opts);
        let indexed = state.dir.index_caseloads()?;
        if indexed > 0 {
            tracing::info!(assignments = indexed, "indexed assignments by worker that an earlier version wrote");
        }
        state.reapply_erasures()?;
        Ok(state)
    }

    /// Erase again everyone the erasure ledger names whom the store still holds: a data
    /// directory restored from a backup made before their erasure. Returns how many.
    pub fn reapply_erasures(&self) -> Result<usize, peersync_core::StoreError> {
        let Some(ledger) = &self.erasures else { return Ok(0) };
        let entries = ledger.entries().map_err(|e| peersync_core::StoreError::Io(e.to_string()))?;
        let instance = self.dir.instance()?;
        let mut again = 0;
        for e in entries {
            let other_store = e.store.as_ref().is_some_and(|s| *s != instance);
            if other_store || self.dir.org(&e.org)?.is_none() || self.dir.tombstone(&e.org, &e.person)?.is_some() {
                continue;
            }
            let by = format!("{} (again from the erasure ledger, after a restore)", e.by);
            self.hub.erase(&e.org, &e.person, || self.dir.bury(&e.org, &e.person, &by))?;
            let _ = self.audit.record(&e.org, "server", "erase", vec![e.person.clone()], true, format!("erased on {} by {}; erased again at start: the data directory did not know it (restored from an earlier backup?)", e.at, e.by));
            again += 1;
        }
        if again > 0 {
            tracing::warn!(count = again, ledger = %ledger.path().display(), "erased again people the erasure ledger names: the data directory predates their erasure");
        }
        Ok(again)
    }

    /// Audit a device's action; a failure to audit is logged, never fatal to the sync.
    pub fn audit_device(&self, who: &DeviceIdentity, action: &str, people: Vec<String>, ok: bool, detail: impl Into<String>) {
        let actor = format!("device:{} (worker {})", who.device, who.worker);
        if let Err(e) = self.audit.record(&who.org, &actor, action, people, ok, detail) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// Keep the data directory to its owner: it holds the person keys (`keys`), and whoever can
/// read them and the store can read every record. New directories are made so; an existing one
/// open to its group or to others is closed (and said so in the log).
fn private_dir(dir: &Path) -> Result<(), peersync_core::StoreError> {
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        return b.create(dir).map_err(|e| peersync_core::StoreError::Io(format!("cannot create {}: {e}", dir.display())));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let io = |e: std::io::Error| peersync_core::StoreError::Io(format!("cannot restrict {} to its owner: {e}", dir.display()));
        let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700)).map_err(io)?;
            tracing::warn!(dir = %dir.display(), from = format!("{:o}", mode & 0o777), to = format!("{:o}", mode & 0o700), "the data directory was open to other users; now its owner's only");
        }
    }
    Ok(())
}

pub fn router(state: Arc<AppState>) -> Router {
    crate::api::routes()
        .route("/v1/sync", get(sync))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(axum::middleware::from_fn_with_state(state.clone(), signed_in))
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// `/v1` endpoints other than enrollment, login and sync (which prove themselves) answer 401
/// to a request without a valid session or admin token before anything else: a stranger
/// learns nothing from how a body is judged, nor which endpoints exist. Each handler still
/// decides what its caller may do.
async fn signed_in(State(state): State<Arc<AppState>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let open = !path.starts_with("/v1/") || matches!(path, "/v1/enroll" | "/v1/login" | "/v1/sync");
    if open || crate::api::principal(&state, request.headers()).is_some() {
        return next.run(request).await;
    }
    crate::api::ApiError::unauthorized_for(&state, request.headers()).into_response()
}

/// Around every request: a browser's cross-site request that would change something is
/// refused (the session cookie is SameSite=Strict already; this also covers sibling sites and
/// browsers that ignore SameSite); API answers are never cached (they hold people's records);
/// and an API error is JSON `{"error": ...}` whoever produced it (axum's own rejections, an
/// unknown route, a wrong method, are plain text or empty otherwise).
async fn guard(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::{Method, header};
    if !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) && cross_site(request.headers()) {
        return crate::api::ApiError::new(StatusCode::FORBIDDEN, "a request from another site was refused: use the dashboard itself").into_response();
    }
    let api = request.uri().path().starts_with("/v1/");
    let sync = request.uri().path() == "/v1/sync";
    let mut response = next.run(request).await;
    if api {
        response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    }
    let json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !api || sync || json || !(response.status().is_client_error() || response.status().is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if !text.is_empty() {
        text
    } else {
        match parts.status {
            StatusCode::NOT_FOUND => "no such endpoint (see the README's HTTP API)".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "this endpoint does not take that method".to_string(),
            s => s.canonical_reason().unwrap_or("request failed").to_string(),
        }
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(serde_json::json!({ "error": message }).to_string()))
}

/// Whether a browser says this request comes from another site: `Sec-Fetch-Site` other than
/// same-origin (or `none`, typed by the user), or an `Origin` whose host is not the one the
/// request is addressed to. Phones and scripts send neither.
fn cross_site(headers: &axum::http::HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else { return false };
    let origin = origin.to_str().unwrap_or("null");
    let Some(origin_host) = origin.split_once("://").map(|(_, host)| host.trim_end_matches('/')) else { return true };
    let addressed = |name: &str| headers.get(name).and_then(|h| h.to_str().ok()).is_some_and(|h| h.eq_ignore_ascii_case(origin_host));
    !(addressed("host") || addressed("x-forwarded-host"))
}

async fn sync(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let who = match state.auth.authenticate(&parts) {
        Ok(who) => who,
        Err(e) => {
            state.metrics.auth_failures.fetch_add(1, Relaxed);
            let mut resp = (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response();
            if let crate::auth::AuthError::Clock { server_time } | crate::auth::AuthError::BeforeStart { server_time } = e
                && let Ok(v) = server_time.to_string().parse()
            {
                resp.headers_mut().insert("x-peersync-time", v);
            }
            return resp;
        }
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(slot) = DeviceSlot::take(&state, &who) else {
        return crate::api::ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this device has {MAX_SESSIONS_PER_DEVICE} sync connections open already; one is enough (older ones end on their own within minutes)"),
        )
        .into_response();
    };
    let shutdown = state.shutdown.clone();
    // Frames a little over the protocol limit still reach the session, which answers them with
    // a clear error; beyond this the websocket layer drops the connection.
    ws.max_message_size(MAX_FRAME_BYTES + (1 << 20))
        .max_frame_size(MAX_FRAME_BYTES + (1 << 20))
        .on_upgrade(move |socket| async move {
            session::run(AxumConn(socket), state, who, shutdown).await;
            drop(slot);
        })
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
                    let frame = peersync_core::protocol::encode(&peersync_core::protocol::ServerMsg::Error {
                        code: peersync_core::protocol::ErrorCode::BadFrame,
                        message: format!("unreadable websocket frame: {e}"),
                    });
                    let _ = self.0.send(Message::Binary(frame.unwrap_or_default().into())).await;
                    Incoming::Broken(e.to_string())
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
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(m)) = self.0.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The client's address, as handlers see it (whether or not TLS is in front).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// The plain listener as served: every accepted socket without Nagle's algorithm.
pub struct PlainListener(tokio::net::TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (mut tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        no_delay(&mut tcp);
        (tcp, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A sync answer goes out as several websocket frames; with Nagle's algorithm on, a small frame
/// after a large one waits for the device's delayed acknowledgement (40 ms on Linux) before it
/// leaves, so every sync and request would pay that wait.
///
/// TCP keepalive too: a live phone's session may be quiet for hours by design, and a phone that
/// lost its network (a 2G cell dropped, a phone switched off) says nothing. Probes after 60 s of
/// quiet, every 15 s, 4 unanswered: such a session ends about two minutes later instead of
/// holding its connection slot for ever. The probes also keep NAT mappings open.
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not turn Nagle's algorithm off on an accepted socket");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios", target_os = "freebsd", target_os = "netbsd", windows))]
    let keepalive = keepalive.with_interval(Duration::from_secs(15));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios", target_os = "freebsd", target_os = "netbsd"))]
    let keepalive = keepalive.with_retries(4);
    let sock = socket2::SockRef::from(&*tcp);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not turn TCP keepalive on for an accepted socket");
    }
    // Keepalive waits while sent data is unacknowledged (a change just forwarded to a phone
    // that vanished): this ends such a connection after two minutes too, not the kernel's
    // fifteen.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(Duration::from_secs(120))) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT on an accepted socket");
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PlainListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, PlainListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

/// Serve on `listener` (through TLS if `tls` is given) until `shutdown` resolves; open sync
/// sessions are told to close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Ends at the shutdown signal once its current chunk is done (or is aborted below), so
    // that nothing holds the store after serving.
    let mut refresher = tokio::spawn(crate::views::refresh_while_quiet(state.clone()));
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    let signal = async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    };
    use crate::conn::{HTTP_IDLE, Limited, MAX_CONNECTIONS, REQUEST_BUDGET};
    let served = match tls {
        None => axum::serve(Limited::new(PlainListener(listener), MAX_CONNECTIONS, HTTP_IDLE, REQUEST_BUDGET), app).with_graceful_shutdown(signal).await,
        Some(acceptor) => match crate::tls::TlsListener::new(listener, acceptor) {
            Ok(listener) => axum::serve(Limited::new(listener, MAX_CONNECTIONS, HTTP_IDLE, REQUEST_BUDGET), app).with_graceful_shutdown(signal).await,
            Err(e) => Err(e),
        },
    };
    // Serving also ends on an error, without the signal: then stop it here.
    if tokio::time::timeout(Duration::from_secs(5), &mut refresher).await.is_err() {
        refresher.abort();
        let _ = refresher.await;
    }
    served
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    /// Opening a data directory builds the caseload index if it lacks it, so that downloads
    /// read a worker's caseload instead of the organisation's whole log.
    #[test]
    fn a_data_directory_opens_with_its_caseloads_indexed() {
        let tmp = tempfile::tempdir().unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let state = super::AppState::open(&tmp.path().join("d"), rx, super::Options::default()).unwrap();
        assert_eq!(state.dir.caseload("o", "w").unwrap(), Some(Vec::new()));
    }

    /// The data directory holds the person keys: no other user of the machine may read it.
    #[cfg(unix)]
    #[test]
    fn the_data_directory_and_its_keys_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let fresh = tmp.path().join("fresh");
        let state = super::AppState::open(&fresh, rx.clone(), super::Options::default()).unwrap();
        state.hub.store().prepare_keys("o", &["p-1"]).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join("keys")), 0o600);
        drop(state);
        // An existing directory open to others is closed to them.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(super::AppState::open(&open, rx.clone(), super::Options::default()).unwrap());
        assert_eq!(mode(&open), 0o700);
        // A file where the directory should be is named as such.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = super::AppState::open(&file, rx, super::Options::default()).err().unwrap();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }

    #[tokio::test]
    async fn accepted_sockets_send_small_frames_at_once() {
        let mut listener = super::PlainListener(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await;
        assert!(tcp.nodelay().unwrap(), "Nagle's algorithm is still on for an accepted socket");
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap(), "a quiet live phone that lost its network would hold its connection for ever");
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_keepalive_time().unwrap(), std::time::Duration::from_secs(60));
    }
}
