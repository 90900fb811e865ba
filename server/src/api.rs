//! The HTTP API: enrollment, coordinator sessions, the coordinator and admin actions, metrics.
//! JSON in and out; errors are `{"error": "..."}` with a status that says what went wrong.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{AppState, SESSION_TTL};
use crate::directory::DirectoryError;

pub const SESSION_COOKIE: &str = "peersync_session";

/// A failed request: the status and a message for the person using the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
    fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "log in first (coordinator session) or send the admin token")
    }

    /// Unauthorized, saying what was wrong with what the request did send.
    pub(crate) fn unauthorized_for(state: &AppState, headers: &HeaderMap) -> Self {
        if headers.contains_key(header::AUTHORIZATION) {
            let why = if state.admin_token.is_none() {
                "this server has no admin token (start it with --admin-token or PEERSYNC_ADMIN_TOKEN)"
            } else {
                "the admin token given (Authorization: Bearer ...) is not this server's"
            };
            return Self::new(StatusCode::UNAUTHORIZED, why);
        }
        if cookie(headers, SESSION_COOKIE).is_some() {
            return Self::new(StatusCode::UNAUTHORIZED, "your session has ended (it expires after a while, or you logged out): log in again");
        }
        Self::unauthorized()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<peersync_core::StoreError> for ApiError {
    fn from(e: peersync_core::StoreError) -> Self {
        tracing::error!(error = %e, "storage failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "the server could not read or write its data; try again later")
    }
}

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> Self {
        let status = match &e {
            DirectoryError::Store(_) => return ApiError::from(match e { DirectoryError::Store(s) => s, _ => unreachable!() }),
            DirectoryError::Invalid(_) => StatusCode::BAD_REQUEST,
            DirectoryError::Exists { .. } | DirectoryError::DeviceTaken(_) => StatusCode::CONFLICT,
            DirectoryError::NoOrg(_) | DirectoryError::NoWorker { .. } | DirectoryError::NoDevice(_) => StatusCode::NOT_FOUND,
            DirectoryError::BadCode => StatusCode::UNAUTHORIZED,
            DirectoryError::Erased(_) => StatusCode::GONE,
        };
        Self::new(status, e.to_string())
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

struct Session {
    org: String,
    username: String,
    expires: Instant,
}

/// Coordinator sessions, in memory (a restart asks coordinators to log in again).
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn create(&self, org: &str, username: &str) -> String {
        let mut b = [0u8; 32];
        SystemRandom::new().fill(&mut b).expect("system randomness");
        let token = B64.encode(b);
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, s| s.expires > Instant::now());
        m.insert(token.clone(), Session { org: org.into(), username: username.into(), expires: Instant::now() + SESSION_TTL });
        token
    }

    fn get(&self, token: &str) -> Option<(String, String)> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.get(token).filter(|s| s.expires > Instant::now()).map(|s| (s.org.clone(), s.username.clone()))
    }

    fn end(&self, token: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    Coordinator { org: String, username: String },
    Admin,
}

impl Principal {
    pub fn actor(&self) -> String {
        match self {
            Principal::Coordinator { username, .. } => format!("coordinator:{username}"),
            Principal::Admin => "admin".into(),
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn digest(s: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref().to_vec()
}

pub fn principal(state: &AppState, headers: &HeaderMap) -> Option<Principal> {
    if let (Some(expected), Some(auth)) = (&state.admin_token, headers.get(header::AUTHORIZATION))
        && let Some(given) = auth.to_str().ok().and_then(|a| a.strip_prefix("Bearer "))
        // Compare digests: equal-length inputs, so the comparison time says nothing useful.
        && digest(given) == digest(expected)
    {
        return Some(Principal::Admin);
    }
    let token = cookie(headers, SESSION_COOKIE)?;
    let (org, username) = state.sessions.get(token)?;
    Some(Principal::Coordinator { org, username })
}

#[derive(Deserialize, Default)]
pub struct OrgQuery {
    pub org: Option<String>,
}

/// The organisation a request acts on: the coordinator's own, or the admin's `org` parameter.
pub fn org_for(state: &AppState, who: &Principal, q: &OrgQuery) -> Result<String, ApiError> {
    match who {
        Principal::Coordinator { org, .. } => match &q.org {
            Some(other) if other != org => Err(ApiError::new(StatusCode::FORBIDDEN, "coordinators act only on their own organisation")),
            _ => Ok(org.clone()),
        },
        Principal::Admin => {
            let org = q.org.clone().ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "the admin token needs an `org` parameter"))?;
            if state.dir.org(&org)?.is_none() {
                return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no organisation {org:?}")));
            }
            Ok(org)
        }
    }
}

/// The caller and the organisation it acts on, or 401.
pub fn authorize(state: &AppState, headers: &HeaderMap, q: &OrgQuery) -> Result<(Principal, String), ApiError> {
    let who = principal(state, headers).ok_or_else(|| ApiError::unauthorized_for(state, headers))?;
    let org = org_for(state, &who, q)?;
    Ok((who, org))
}

/// The client's address: the socket's peer or, when the server trusts a proxy on the same host
/// (`--trust-forwarded-for`) and the connection comes from loopback, the last address in
/// `X-Forwarded-For` (the one that proxy appended; earlier ones are the client's to invent).
fn client_ip(state: &AppState, headers: &HeaderMap, info: Option<&ConnectInfo<crate::app::Peer>>) -> String {
    let peer = info.map(|c| c.0.0.ip());
    let forwarded = || {
        let all = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
        all.rsplit(',').next()?.trim().parse::<std::net::IpAddr>().ok()
    };
    let ip = match peer {
        Some(p) if state.trust_forwarded_for && p.is_loopback() => forwarded().or(peer),
        _ => peer,
    };
    ip.map_or_else(|| "unknown".into(), |ip| ip.to_string())
}

/// The throttles' key for an address: an IPv6 client by its /64, since one host usually holds
/// a whole /64 and could otherwise guess from each of its addresses in turn.
fn address_key(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => format!("ip:{ip}"),
    }
}

/// Audit a coordinator's access to records before the records are sent: if the entry cannot be
/// written, nothing is sent, since an access the log does not show must not happen.
fn audit_access(state: &AppState, org: &str, who: &Principal, action: &str, people: Vec<String>, detail: impl Into<String>) -> Result<(), ApiError> {
    state.audit.record(org, &who.actor(), action, people, true, detail).map_err(|e| {
        tracing::error!(error = %e, "audit log write failed; the records were not sent");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the access could not be written to the audit log, so nothing was sent ({e}); try again later"))
    })
}

fn audit(state: &AppState, org: &str, who: &Principal, action: &str, people: Vec<String>, ok: bool, detail: impl Into<String>) {
    if let Err(e) = state.audit.record(org, &who.actor(), action, people, ok, detail) {
        tracing::error!(error = %e, "audit log write failed");
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/me", get(me))
        .route("/v1/workers", get(list_workers).post(add_worker))
        .route("/v1/workers/{id}/enrollment", post(issue_code))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/people", get(list_people))
        .route("/v1/people/{id}", get(read_person))
        .route("/v1/people/{id}/assign", post(assign))
        .route("/v1/people/{id}/unassign", post(unassign))
        .route("/v1/people/{id}/erase", post(erase))
        .route("/v1/audit", get(read_audit))
        .route("/v1/report", get(report))
        .route("/v1/report/weekly", get(report_weekly))
        .route("/v1/export", get(export))
        .route("/v1/admin/orgs", post(create_org))
        .route("/v1/admin/orgs/{org}/coordinators", post(create_coordinator))
        .route("/v1/admin/orgs/{org}/documents", get(documents))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard))
}

/// The dashboard: one self-contained page (styles, script and charts inline; no CDN). Without a
/// session it is served with status 401 and shows the login form.
async fn dashboard(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    const PAGE: &str = include_str!("dashboard/index.html");
    let status = if principal(&state, &headers).is_some() { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}

// Enrollment ----------------------------------------------------------------------------

#[derive(Deserialize)]
struct EnrollBody {
    code: String,
    device: String,
    /// Ed25519 public key, base64url without padding.
    public_key: String,
    #[serde(default)]
    name: String,
}

/// A small JSON body read whole (whatever its content type: phones and the dashboard send
/// JSON): 413 past `limit` bytes, 400 naming the `shape` expected if it does not parse.
async fn small_json<T: serde::de::DeserializeOwned>(req: axum::extract::Request, limit: usize, shape: &str) -> Result<T, ApiError> {
    // A declared length over the limit is refused at once, not waited for.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {} KiB", limit >> 10)));
    }
    // A body that cannot be read whole within the limit (or a client gone mid-body).
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {} KiB", limit >> 10)))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("expected JSON {shape}: {e}")))
}

async fn enroll(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let ip = client_ip(&state, req.headers(), req.extensions().get::<ConnectInfo<crate::app::Peer>>());
    let body: EnrollBody = match small_json(req, 64 << 10, "{code, device, public_key, name}").await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Guessing is throttled per client address (codes carry 60 bits: a global lockout would
    // only let anyone block every enrollment).
    // Counted before the code is checked (see `Throttle::attempt`); taken back unless wrong.
    let key = address_key(&ip);
    if let Err(wait) = state.code_throttle.attempt(&key) {
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, format!("too many wrong codes; try again in {} s", wait.as_secs() + 1)).into_response();
    }
    // A malformed key is reported once the code is known good (a wrong code is always 401).
    let public_key = B64.decode(body.public_key.trim()).unwrap_or_default();
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let d = st.dir.enroll(&body.code, &body.device, &public_key, &body.name)?;
        crate::session::start_record(&st, &d.org, &d.id).map_err(DirectoryError::Store)?;
        Ok::<_, DirectoryError>(d)
    })
    .await;
    match result {
        Ok(Ok(d)) => {
            // Only this attempt is taken back: wrong codes sent alongside still count.
            state.code_throttle.forgive(&key);
            let _ = state.audit.record(&d.org, &format!("device:{} (worker {})", d.id, d.worker), "enroll", vec![], true, format!("device {:?} enrolled", d.name));
            Json(json!({ "org": d.org, "worker": d.worker, "device": d.id })).into_response()
        }
        Ok(Err(e)) => {
            if !matches!(e, DirectoryError::BadCode) {
                state.code_throttle.forgive(&key);
            }
            // A wrong code names no organisation, so the server's log keeps it, not an audit log.
            tracing::warn!(client = %ip, error = %e, "enrollment refused");
            ApiError::from(e).into_response()
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

// Coordinator sessions --------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginBody {
    org: String,
    username: String,
    password: String,
}

async fn login(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let ip = client_ip(&state, req.headers(), req.extensions().get::<ConnectInfo<crate::app::Peer>>());
    // Behind a TLS-terminating proxy the browser speaks HTTPS even though this server does not:
    // the cookie is then marked Secure too. (Trusting the header can only make it stricter.)
    let via_https = req.headers().get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    let body: LoginBody = match small_json(req, 16 << 10, "{org, username, password}").await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Names that are not ids are refused before they reach the throttle's keys or the log.
    for (what, v) in [("org", &body.org), ("username", &body.username)] {
        if let Err(e) = peersync_core::model::validate_id(what, v) {
            return ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    }
    // Per account and address (5), and per address (50): a stranger elsewhere cannot lock a
    // coordinator out, nor one coordinator's typing their colleagues.
    let from = address_key(&ip);
    let account = format!("acct:{}/{}@{from}", body.org, body.username);
    // Each attempt counts before the password is checked (see `Throttle::attempt`) and is
    // taken back if it succeeds.
    if let Err(wait) = state.login_ip_throttle.attempt(&from) {
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, format!("too many failed logins; try again in {} s", wait.as_secs() + 1)).into_response();
    }
    if let Err(wait) = state.login_throttle.attempt(&account) {
        state.login_ip_throttle.forgive(&from);
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, format!("too many failed logins; try again in {} s", wait.as_secs() + 1)).into_response();
    }
    let st = state.clone();
    let (org, user, pass) = (body.org.clone(), body.username.clone(), body.password);
    let ok = tokio::task::spawn_blocking(move || st.dir.check_password(&org, &user, &pass)).await;
    let ok = match ok {
        Ok(Ok(ok)) => ok,
        // The server's trouble, not a wrong guess: the attempt is taken back.
        Ok(Err(e)) => {
            state.login_throttle.forgive(&account);
            state.login_ip_throttle.forgive(&from);
            return ApiError::from(e).into_response();
        }
        Err(e) => {
            state.login_throttle.forgive(&account);
            state.login_ip_throttle.forgive(&from);
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    let known_org = state.dir.org(&body.org).ok().flatten().is_some();
    let who = Principal::Coordinator { org: body.org.clone(), username: body.username.clone() };
    if !ok {
        if known_org {
            audit(&state, &body.org, &who, "login", vec![], false, format!("wrong username or password from {ip}"));
            // Attempts refused during a lockout test no password and are not logged one by
            // one (a flood would bury the log); the lockout itself is.
            if state.login_throttle.locked(&account) {
                audit(&state, &body.org, &who, "login-locked", vec![], false, format!("too many failed logins for this account from {ip}: refused for up to 15 minutes"));
            } else if state.login_ip_throttle.locked(&from) {
                audit(&state, &body.org, &who, "login-locked", vec![], false, format!("too many failed logins from {ip}: every account refused from there for up to 15 minutes"));
            }
        }
        return ApiError::new(StatusCode::UNAUTHORIZED, "wrong organisation, username or password").into_response();
    }
    state.login_throttle.succeed(&account);
    state.login_ip_throttle.forgive(&from);
    audit(&state, &body.org, &who, "login", vec![], true, format!("from {ip}"));
    let token = state.sessions.create(&body.org, &body.username);
    let secure = if state.tls || via_https { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}", SESSION_TTL.as_secs());
    ([(header::SET_COOKIE, cookie)], Json(json!({ "org": body.org, "username": body.username }))).into_response()
}

async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let Some((token, (org, username))) = cookie(&headers, SESSION_COOKIE).and_then(|t| Some((t, state.sessions.get(t)?))) else {
        return ApiError::unauthorized().into_response();
    };
    audit(&state, &org, &Principal::Coordinator { org: org.clone(), username }, "logout", vec![], true, "");
    state.sessions.end(token);
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Json(json!({ "ok": true }))).into_response()
}

async fn me(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    match principal(&state, &headers).ok_or_else(ApiError::unauthorized)? {
        Principal::Coordinator { org, username } => Ok(Json(json!({ "org": org, "username": username }))),
        Principal::Admin => Ok(Json(json!({ "admin": true }))),
    }
}

// Workers and devices ---------------------------------------------------------------------

#[derive(Deserialize)]
struct WorkerBody {
    id: String,
    #[serde(default)]
    name: String,
    role: String,
}

async fn list_workers(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>) -> ApiResult {
    let (_, org) = authorize(&state, &headers, &q)?;
    Ok(Json(json!(state.dir.workers(&org)?)))
}

async fn add_worker(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Json(b): Json<WorkerBody>) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (who, org) = authorize(&state, &headers, &q)?;
    let w = state.dir.add_worker(&org, &b.id, &b.name, &b.role)?;
    audit(&state, &org, &who, "create-worker", vec![], true, format!("worker {} ({})", w.id, w.role));
    Ok((StatusCode::CREATED, Json(json!(w))))
}

async fn issue_code(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(worker): Path<String>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    let (code, expires_at) = state.dir.issue_code(&org, &worker)?;
    audit(&state, &org, &who, "issue-code", vec![], true, format!("enrollment code for worker {worker}"));
    let qr_svg = qrcode::QrCode::new(code.as_bytes())
        .map(|q| q.render::<qrcode::render::svg::Color<'_>>().min_dimensions(180, 180).build())
        .unwrap_or_default();
    Ok(Json(json!({ "worker": worker, "code": code, "expires_at": expires_at, "qr_svg": qr_svg })))
}

async fn list_devices(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>) -> ApiResult {
    let (_, org) = authorize(&state, &headers, &q)?;
    let syncs: HashMap<String, crate::store::DeviceSync> = state.hub.store().devices(&org)?.into_iter().collect();
    let list: Vec<Value> = state
        .dir
        .devices(&org)?
        .into_iter()
        .map(|d| {
            json!({ "id": d.id, "worker": d.worker, "name": d.name, "enrolled_at": d.enrolled_at,
                    "revoked_at": d.revoked_at, "sync": syncs.get(&d.id) })
        })
        .collect();
    Ok(Json(json!(list)))
}

async fn revoke(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(device): Path<String>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    let d = state.dir.revoke(&org, &device, &who.actor())?;
    state.hub.announce_revoked(&org, &d.id);
    audit(&state, &org, &who, "revoke", vec![], true, format!("device {device} of worker {}", d.worker));
    Ok(Json(json!({ "device": d.id, "revoked_at": d.revoked_at })))
}

// People ----------------------------------------------------------------------------------

async fn list_people(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>) -> ApiResult {
    let (_, org) = authorize(&state, &headers, &q)?;
    // Only people who consent to share with coordinators appear in any coordinator view.
    let mut out = Vec::new();
    for (id, consent) in state.dir.people(&org)? {
        if consent.share_with_coordinator && state.dir.tombstone(&org, &id)?.is_none() {
            out.push(json!({ "id": id, "workers": state.dir.assigned_workers(&org, &id)? }));
        }
    }
    Ok(Json(json!(out)))
}

async fn read_person(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(id): Path<String>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    let not_visible = || ApiError::new(StatusCode::NOT_FOUND, "no such person visible to coordinators (erased, unknown, or not consenting to share)");
    let visible = state.dir.consent(&org, &id)?.is_some_and(|c| c.share_with_coordinator) && state.dir.tombstone(&org, &id)?.is_none();
    if !visible {
        return Err(not_visible());
    }
    let st = state.clone();
    let (o, i) = (org.clone(), id.clone());
    let record = tokio::task::spawn_blocking(move || st.hub.record(&o, &i))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
        .ok_or_else(not_visible)?;
    audit_access(&state, &org, &who, "read", vec![id], "coordinator read the record")?;
    Ok(Json(json!(record)))
}

#[derive(Deserialize)]
struct AssignBody {
    worker: String,
}

async fn assign(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(id): Path<String>, Json(b): Json<AssignBody>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    peersync_core::model::validate_id("person", &id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    coordinator_may_assign(&state, &who, &org, &id)?;
    state.dir.assignable(&org, &id, &b.worker)?;
    let (st, o, i, w, actor) = (state.clone(), org.clone(), id.clone(), b.worker.clone(), who.actor());
    tokio::task::spawn_blocking(move || {
        st.hub.touch(&o, &i, |seq| match st.dir.assign(&o, &i, std::slice::from_ref(&w), seq, &actor) {
            Ok(_) => Ok(()),
            Err(DirectoryError::Store(e)) => Err(e),
            Err(e) => Err(peersync_core::StoreError::Io(e.to_string())),
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    audit(&state, &org, &who, "assign", vec![id.clone()], true, format!("to worker {}", b.worker));
    Ok(Json(json!({ "person": id, "worker": b.worker, "assigned": true })))
}

async fn unassign(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(id): Path<String>, Json(b): Json<AssignBody>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    peersync_core::model::validate_id("person", &id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    coordinator_may_assign(&state, &who, &org, &id)?;
    if state.dir.assignment(&org, &id, &b.worker)?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "that worker is not assigned this person"));
    }
    let (st, o, i, w) = (state.clone(), org.clone(), id.clone(), b.worker.clone());
    tokio::task::spawn_blocking(move || st.hub.touch(&o, &i, |seq| st.dir.unassign(&o, &i, &w, seq)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    audit(&state, &org, &who, "unassign", vec![id.clone()], true, format!("from worker {}", b.worker));
    Ok(Json(json!({ "person": id, "worker": b.worker, "assigned": false })))
}

async fn erase(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<OrgQuery>, Path(id): Path<String>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &q)?;
    peersync_core::model::validate_id("person", &id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if state.dir.tombstone(&org, &id)?.is_some() {
        return Ok(Json(json!({ "person": id, "erased": true, "already": true })));
    }
    // Written ahead: if the ledger cannot keep it, nothing is erased and the coordinator is
    // told; an erasure cut short after this is finished at the next start.
    if let Some(ledger) = &state.erasures {
        let entry = crate::erasures::Erasure { org: org.clone(), person: id.clone(), at: chrono::Utc::now(), by: who.actor(), store: Some(state.dir.instance()?) };
        let l = ledger.path().to_path_buf();
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.erasures.as_ref().map(|ledger| ledger.record(&entry)).unwrap_or(Ok(())))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("nothing was erased: {e} (the server's operator must make {} writable)", l.display())))?;
    }
    let (st, o, i, actor) = (state.clone(), org.clone(), id.clone(), who.actor());
    // A person registered on a phone that has not synced since is unknown here, and erasing
    // them is still right: the tombstone refuses what that phone sends and has it purge them.
    let known = tokio::task::spawn_blocking(move || st.hub.erase(&o, &i, || st.dir.bury(&o, &i, &actor)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let detail = if known {
        "person erased; devices purge at their next sync"
    } else {
        "person erased before any record of them reached the server; what a phone sends for them is refused and purged"
    };
    audit(&state, &org, &who, "erase", vec![id.clone()], true, detail);
    Ok(Json(json!({ "person": id, "erased": true, "known": known })))
}

// Audit, admin, metrics -------------------------------------------------------------------

#[derive(Deserialize)]
struct AuditQuery {
    org: Option<String>,
    from: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<usize>,
}

/// Coordinators assign and unassign only people they may see. For anyone else, answers (or
/// the audit entries an unassignment leaves) would tell who holds them, and assigning them to
/// a worker would hand their record to that worker's phones. The administrator (admin token,
/// `peersync admin assign`) can.
fn coordinator_may_assign(state: &AppState, who: &Principal, org: &str, person: &str) -> Result<(), ApiError> {
    if matches!(who, Principal::Coordinator { .. }) && !shared_with_coordinators(state, org, person)? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this person does not share their record with coordinators (or no record of them has reached the server yet): their assignments are changed by the server's administrator",
        ));
    }
    Ok(())
}

/// Whether coordinators may know of `person`: they share with coordinators now, or did when
/// they were erased.
fn shared_with_coordinators(state: &AppState, org: &str, person: &str) -> Result<bool, ApiError> {
    Ok(match state.dir.tombstone(org, person)? {
        Some(t) => t.shared,
        None => state.dir.consent(org, person)?.is_some_and(|c| c.share_with_coordinator),
    })
}

/// What a coordinator's audit view shows in place of the id of a person who does not share
/// with coordinators.
const NOT_SHARED: &str = "(a person not shared with coordinators)";

async fn read_audit(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<AuditQuery>) -> ApiResult {
    let (who, org) = authorize(&state, &headers, &OrgQuery { org: q.org.clone() })?;
    let mut entries = state.audit.list(&org, q.from, q.limit.unwrap_or(1000).min(10_000))?;
    if matches!(who, Principal::Coordinator { .. }) {
        // The log names everyone whose record was read or written; a coordinator sees the ids
        // of people they may see, not when and by whom the record of someone who does not
        // share with them was synced. An erased person stays as they were (named if they
        // shared); the erasure itself, a coordinator's act, names them.
        let mut visible: HashMap<String, bool> = HashMap::new();
        for e in &mut entries {
            let mut hidden = false;
            let mut people = Vec::with_capacity(e.people.len());
            for p in e.people.drain(..) {
                let shown = e.action == "erase"
                    || match visible.get(&p) {
                        Some(v) => *v,
                        None => {
                            let v = shared_with_coordinators(&state, &org, &p)?;
                            visible.insert(p.clone(), v);
                            v
                        }
                    };
                if shown {
                    people.push(p);
                } else {
                    hidden = true;
                }
            }
            if hidden {
                people.push(NOT_SHARED.to_string());
                // "11 person documents stored" beside nine names would count the others.
                if let Some((n, rest)) = e.detail.split_once(' ')
                    && n.parse::<u64>().is_ok()
                {
                    e.detail = rest.to_string();
                }
            }
            e.people = people;
        }
    }
    Ok(Json(json!(entries)))
}

fn admin_only(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match principal(state, headers) {
        Some(Principal::Admin) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "this needs the admin token")),
        None => Err(ApiError::unauthorized_for(state, headers)),
    }
}

#[derive(Deserialize)]
struct OrgBody {
    id: String,
    #[serde(default)]
    name: String,
}

async fn create_org(State(state): State<Arc<AppState>>, headers: HeaderMap, Json(b): Json<OrgBody>) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin_only(&state, &headers)?;
    let org = state.dir.create_org(&b.id, &b.name)?;
    audit(&state, &org.id, &Principal::Admin, "create-org", vec![], true, "");
    Ok((StatusCode::CREATED, Json(json!(org))))
}

#[derive(Deserialize)]
struct CoordinatorBody {
    username: String,
    password: String,
}

async fn create_coordinator(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(org): Path<String>, Json(b): Json<CoordinatorBody>) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin_only(&state, &headers)?;
    let st = state.clone();
    let (o, u) = (org.clone(), b.username.clone());
    tokio::task::spawn_blocking(move || st.dir.create_coordinator(&o, &u, &b.password))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    audit(&state, &org, &Principal::Admin, "create-coordinator", vec![], true, format!("coordinator {}", b.username));
    Ok((StatusCode::CREATED, Json(json!({ "org": org, "username": b.username }))))
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin_only(&state, &headers) {
        return e.into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(state.hub.cached_docs())).into_response()
}

// Reports and export --------------------------------------------------------------------

#[derive(Deserialize)]
struct ReportQuery {
    org: Option<String>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    /// `csv` (default) or `json`.
    format: Option<String>,
    /// For CSV: `visits` (default) or `checkins`.
    kind: Option<String>,
}

/// The period asked for: `[from, to)`, refused when empty (a reversed range would give a
/// report of zeros that looks like a quiet month).
fn period(q: &ReportQuery) -> Result<crate::report::Period, ApiError> {
    if let (Some(from), Some(to)) = (q.from, q.to)
        && from >= to
    {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("from ({from}) must be before to ({to}): the period is [from, to)")));
    }
    Ok(crate::report::Period { from: q.from, to: q.to })
}

fn view_rows(state: &AppState, org: &str) -> Result<Vec<(String, crate::report::ViewRow)>, ApiError> {
    // Rows the background has not reached yet: a report is as of the syncs stored before it
    // (a row that a concurrent sync makes due again shows that person as before that sync).
    state.hub.refresh_views(Some(org), usize::MAX)?;
    let rows = crate::report::decode_rows(state.hub.store().views(org)?);
    // A tombstone without its row removed yet (never expected) still counts nowhere.
    let mut kept = Vec::with_capacity(rows.len());
    for (doc, row) in rows {
        if state.dir.tombstone(org, &doc)?.is_none() {
            kept.push((doc, row));
        }
    }
    Ok(kept)
}

async fn report(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<ReportQuery>) -> ApiResult {
    let (_, org) = authorize(&state, &headers, &OrgQuery { org: q.org.clone() })?;
    let period = period(&q)?;
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let workers: Vec<String> = st.dir.workers(&org)?.into_iter().map(|w| w.id).collect();
        let rows = view_rows(&st, &org)?;
        Ok(Json(crate::report::report(&workers, &rows, period)))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

#[derive(Deserialize)]
struct WeeklyQuery {
    org: Option<String>,
    /// How many weeks, 1 to 52 (default 12).
    weeks: Option<u32>,
}

/// The report week by week, for the dashboard's week-by-week view: one request instead of
/// one per week, and no export to find where the data ends.
async fn report_weekly(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<WeeklyQuery>) -> ApiResult {
    let (_, org) = authorize(&state, &headers, &OrgQuery { org: q.org.clone() })?;
    let weeks = q.weeks.unwrap_or(12);
    if !(1..=52).contains(&weeks) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("weeks is 1 to 52, not {weeks}")));
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let workers: Vec<String> = st.dir.workers(&org)?.into_iter().map(|w| w.id).collect();
        let rows = view_rows(&st, &org)?;
        Ok(Json(crate::report::weekly(&workers, &rows, weeks, chrono::Utc::now())))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn export(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<ReportQuery>) -> Result<Response, ApiError> {
    let (who, org) = authorize(&state, &headers, &OrgQuery { org: q.org.clone() })?;
    let period = period(&q)?;
    let format = q.format.clone().unwrap_or_else(|| "csv".into());
    let kind = q.kind.clone().unwrap_or_else(|| "visits".into());
    if !matches!(format.as_str(), "csv" | "json") || !matches!(kind.as_str(), "visits" | "checkins") {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "format is csv or json; kind is visits or checkins"));
    }
    let st = state.clone();
    let o = org.clone();
    let rows = tokio::task::spawn_blocking(move || view_rows(&st, &o))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    // The people whose rows the export names: those who share and have rows of its kind in
    // the period (JSON holds both kinds).
    let (with_visits, with_checkins) = (format == "json" || kind == "visits", format == "json" || kind == "checkins");
    let in_period = |r: &crate::report::ViewRow| {
        (with_visits && r.visits.iter().any(|v| period.contains(v.started_at))) || (with_checkins && r.checkins.iter().any(|c| period.contains(c.taken_at)))
    };
    let shared: Vec<String> = rows.iter().filter(|(_, r)| r.share_with_coordinator && in_period(r)).map(|(d, _)| d.clone()).collect();
    let what = if format == "json" { "JSON export of visits and check-ins".to_string() } else { format!("CSV export of {kind}") };
    let when = match (q.from, q.to) {
        (None, None) => "all time".to_string(),
        (Some(f), None) => format!("from {f}"),
        (None, Some(t)) => format!("before {t}"),
        (Some(f), Some(t)) => format!("from {f} to {t} (exclusive)"),
    };
    audit_access(&state, &org, &who, "export", shared, format!("{what}, {when}"))?;
    let stamp = chrono::Utc::now().format("%Y%m%d");
    Ok(match format.as_str() {
        "json" => Json(crate::report::export_json(&rows, period)).into_response(),
        _ => {
            let body = if kind == "checkins" { crate::report::checkins_csv(&rows, period) } else { crate::report::visits_csv(&rows, period) };
            let disposition = format!("attachment; filename=\"peersync-{org}-{kind}-{stamp}.csv\"");
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()), (header::CONTENT_DISPOSITION, disposition)], body).into_response()
        }
    })
}

/// Every person document of an organisation the server holds (erased ones excepted), with its
/// heads and assigned workers: for checking that devices converged. Admin only; no content.
async fn documents(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(org): Path<String>) -> ApiResult {
    admin_only(&state, &headers)?;
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (_, doc) in st.hub.store().changed_since(&org, 0)? {
            if st.dir.tombstone(&org, &doc)?.is_some() {
                continue;
            }
            if let Some(heads) = st.hub.heads(&org, &doc)? {
                out.push(json!({ "id": doc, "heads": heads, "workers": st.dir.assigned_workers(&org, &doc)? }));
            }
        }
        Ok(Json(json!(out)))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::{ConnectInfo, HeaderMap, address_key, client_ip};

    /// Behind a trusted proxy on the same host, the client is the address the proxy appended
    /// (not one the client put first); from elsewhere, or untrusted, the socket's peer.
    #[test]
    fn the_client_address_comes_from_the_proxy_only_when_trusted() {
        use crate::app::{AppState, Options, Peer};
        let state = |trust: bool| {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let kv: crate::app::Kv = std::sync::Arc::new(peersync_core::store::MemoryStore::new());
            AppState::new(kv, crate::keyring::Keyring::in_memory(), rx, Options { trust_forwarded_for: trust, ..Options::default() })
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9, 198.51.100.2".parse().unwrap());
        let via = |ip: &str| ConnectInfo(Peer(format!("{ip}:5000").parse().unwrap()));
        assert_eq!(client_ip(&state(true), &headers, Some(&via("127.0.0.1"))), "198.51.100.2");
        assert_eq!(client_ip(&state(true), &headers, Some(&via("192.0.2.1"))), "192.0.2.1", "only a loopback peer is a trusted proxy");
        assert_eq!(client_ip(&state(false), &headers, Some(&via("127.0.0.1"))), "127.0.0.1");
        assert_eq!(client_ip(&state(true), &HeaderMap::new(), Some(&via("127.0.0.1"))), "127.0.0.1");
    }

    #[test]
    fn ipv6_clients_are_throttled_by_their_slash_64() {
        assert_eq!(address_key("192.0.2.7"), "ip:192.0.2.7");
        assert_eq!(address_key("2001:db8:1:2:aaaa::1"), address_key("2001:db8:1:2:bbbb::9"));
        assert_ne!(address_key("2001:db8:1:2::1"), address_key("2001:db8:1:3::1"));
        assert_eq!(address_key("unknown"), "ip:unknown");
    }
}
