//! console: the admin web console. An HTTP front that turns pages and forms
//! into AdminService calls over internal mutual TLS (identity `console`),
//! owning no data of its own. Pages are rendered on the server (maud,
//! which escapes everything it prints); there is no JavaScript.
//!
//! Sign-in: a one-time console ticket (`chipsctl console link`, or the link
//! `chipsite dev` prints) is redeemed through the ticket service, like every
//! ticket: once, throttled per source. It opens a session: a random id in a
//! `__Host-` cookie (HttpOnly, Secure, SameSite=Strict), kept here only as
//! its SHA-256, with a CSRF token every form carries and every POST checks.
//! Or the admin client certificate, on the HTTPS port ([`serve_https`]).
//! Sign-in attempts are limited per source address. Every response carries
//! a strict Content-Security-Policy.

mod conn;
mod https;
mod pages;
mod plain;
mod site;
mod upload;
mod users;

pub use https::{CertListener, CertPeer, serve_https};

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Extension, Form, Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    ticket::v1::{self as tk, tickets_client::TicketsClient},
};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::InternalChannel as Channel;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The session cookie. `__Host-`: only over a secure origin, no Domain, Path=/.
pub const COOKIE: &str = "__Host-chipsite_console";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions held at most (the oldest go first).
const MAX_SESSIONS: usize = 1000;
/// Sign-in attempts one source address may make at once before the console
/// answers 429 without asking the ticket service; then one more every
/// [`SIGNIN_REFILL`]. The same token bucket (and numbers) as the ticket
/// service's throttle, which refuses throttled attempts without spending
/// the ticket they name.
pub const SIGNIN_ATTEMPTS: u32 = 10;
pub const SIGNIN_REFILL: Duration = Duration::from_secs(6);
/// Source addresses the sign-in limiter remembers at most (past it, those
/// that have refilled are forgotten, or all of them).
const MAX_SOURCES: usize = 10_000;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

struct Session {
    csrf: String,
    expires: Instant,
    /// Who signed in (see [`Operator::name`]).
    operator: String,
}

tokio::task_local! {
    /// The operator the request being answered acts for: every AdminService
    /// call made while answering it names them (`chipsite-operator`), so
    /// admin's audit says `console (alice)`.
    static OPERATOR: String;
}

/// The AdminService channel, naming the current request's operator on
/// every call (gRPC metadata is an HTTP/2 header).
#[derive(Clone)]
pub(crate) struct NamesOperator<S>(S);

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for NamesOperator<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> S::Future {
        if let Ok(Ok(v)) = OPERATOR.try_with(|name| HeaderValue::from_str(name)) {
            req.headers_mut().insert(chipsite_model::operator::METADATA, v);
        }
        self.0.call(req)
    }
}

type AdminClient = AdminServiceClient<NamesOperator<TracedChannel>>;
type EventsClient =
    chipsite_proto::events::v1::user_events_client::UserEventsClient<NamesOperator<TracedChannel>>;

/// How the health page checks one service.
pub enum Check {
    /// `grpc.health.v1.Health/Check` over internal mutual TLS.
    Grpc(Channel),
    /// A TCP connection (an external port: it only has to accept).
    Accepts,
    /// The console itself: it is answering.
    ThisConsole,
}

/// One service on the health page: its name, where it listens, how to check it.
pub struct Probe {
    pub name: &'static str,
    pub addr: String,
    pub check: Check,
}

pub struct Console {
    admin: AdminClient,
    /// UserEvents, on admin's port: users' alarms (list, raise).
    events: EventsClient,
    tickets: TicketsClient<TracedChannel>,
    /// By SHA-256 of the cookie value.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// Sign-in attempts by source (every attempt counts, either kind).
    attempts: chipsite_tls::Throttle,
    probes: Vec<Probe>,
    options: Options,
}

/// How the console guards its ports.
#[derive(Debug, Clone)]
pub struct Options {
    /// Host names (besides IP addresses and `localhost`) the console
    /// answers to; a request naming any other `Host` gets 421, so a page
    /// whose name was rebound to 127.0.0.1 (DNS rebinding) reads nothing.
    pub hosts: Vec<String>,
    /// A connection that moves no byte for this long is closed.
    pub idle: Duration,
    /// Connection caps of each port, in total and per source.
    pub admission: chipsite_tls::AdmissionLimits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hosts: vec![],
            idle: Duration::from_secs(60),
            admission: chipsite_tls::AdmissionLimits {
                max_connections: 512,
                max_connections_per_source: 32,
                max_handshakes: 64,
                max_handshakes_per_source: 16,
            },
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(URL_SAFE_NO_PAD.encode(b))
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The signed-in operator's session: its CSRF token, and who signed in:
/// the operator named when the sign-in ticket was issued (`chipsctl
/// --operator`, else the issuing identity), or `admin-client` for the
/// admin certificate.
#[derive(Clone)]
pub(crate) struct Operator {
    pub csrf: String,
    pub name: String,
}

impl Console {
    /// `admin` and `tickets`: channels presenting the `console` identity.
    pub fn new(admin: Channel, tickets: Channel) -> Arc<Self> {
        Self::with_probes(admin, tickets, vec![])
    }

    /// The same, with the services its health page checks.
    pub fn with_probes(admin: Channel, tickets: Channel, probes: Vec<Probe>) -> Arc<Self> {
        Arc::new(Self {
            admin: AdminServiceClient::new(NamesOperator(traced(admin.clone()))),
            events: chipsite_proto::events::v1::user_events_client::UserEventsClient::new(NamesOperator(
                traced(admin),
            )),
            tickets: TicketsClient::new(traced(tickets)),
            sessions: Mutex::new(HashMap::new()),
            attempts: chipsite_tls::Throttle::new(SIGNIN_ATTEMPTS, SIGNIN_REFILL).with_capacity(MAX_SOURCES),
            probes,
            options: Options::default(),
        })
    }

    /// The same, guarded as `options` say.
    pub fn with_options(admin: Channel, tickets: Channel, probes: Vec<Probe>, options: Options) -> Arc<Self> {
        let mut console = Self::with_probes(admin, tickets, probes);
        if let Some(c) = Arc::get_mut(&mut console) {
            c.options = options;
        }
        console
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Whether a request's `Host` names this console: an IP address (any
    /// port), `localhost`, or one of the configured names.
    fn serves_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => {
                return rest
                    .split(']')
                    .next()
                    .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
            }
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.options.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Whether `ip` may try to sign in now (counts the attempt).
    fn may_sign_in(&self, ip: IpAddr) -> bool {
        self.attempts.try_charge(&ip.to_string())
    }

    /// Each probed service's state, in order: (name, address, healthy, detail).
    pub(crate) async fn health(&self) -> Vec<(&'static str, String, bool, String)> {
        let checks = self.probes.iter().map(|p| async move {
            let (ok, detail) = match &p.check {
                Check::ThisConsole => (true, "serving (this page)".to_owned()),
                Check::Accepts => match tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(&p.addr),
                )
                .await
                {
                    Ok(Ok(_)) => (true, "accepting connections".to_owned()),
                    Ok(Err(e)) => (false, format!("not accepting: {e}")),
                    Err(_) => (false, "no answer in 2 s".to_owned()),
                },
                Check::Grpc(ch) => {
                    let mut client = HealthClient::new(ch.clone());
                    let call = client.check(HealthCheckRequest {
                        service: String::new(),
                    });
                    match tokio::time::timeout(Duration::from_secs(2), call).await {
                        Ok(Ok(r)) => {
                            let s = r.into_inner().status();
                            (s == ServingStatus::Serving, s.as_str_name().to_lowercase())
                        }
                        Ok(Err(s)) => (false, format!("{:?}: {}", s.code(), s.message())),
                        Err(_) => (false, "no answer in 2 s".to_owned()),
                    }
                }
            };
            (p.name, p.addr.clone(), ok, detail)
        });
        futures::future::join_all(checks).await
    }

    fn with_sessions<T>(&self, f: impl FnOnce(&mut HashMap<[u8; 32], Session>) -> T) -> T {
        let mut g = match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    fn cookie_value(headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_owned())
    }

    pub(crate) fn operator(&self, headers: &HeaderMap) -> Option<Operator> {
        let id = digest(&Self::cookie_value(headers)?);
        self.with_sessions(|m| {
            let now = Instant::now();
            m.retain(|_, s| s.expires > now);
            m.get(&id).map(|s| Operator {
                csrf: s.csrf.clone(),
                name: s.operator.clone(),
            })
        })
    }

    fn open_session(&self, operator: &str) -> Option<String> {
        let (id, csrf) = (random_token()?, random_token()?);
        self.with_sessions(|m| {
            if m.len() >= MAX_SESSIONS
                && let Some(oldest) = m.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
            {
                m.remove(&oldest);
            }
            m.insert(
                digest(&id),
                Session {
                    csrf,
                    expires: Instant::now() + SESSION_TTL,
                    operator: operator.to_owned(),
                },
            );
        });
        Some(id)
    }

    fn close_session(&self, headers: &HeaderMap) {
        if let Some(v) = Self::cookie_value(headers) {
            let id = digest(&v);
            self.with_sessions(|m| m.remove(&id));
        }
    }

    pub(crate) fn admin(&self) -> AdminClient {
        self.admin.clone()
    }

    pub(crate) fn events(&self) -> EventsClient {
        self.events.clone()
    }

    /// What every signed-in page shows: the site lockdown banner and the
    /// site key's state (sealed or not) in the header.
    pub(crate) async fn chrome(&self, op: Operator) -> Chrome {
        let (mut a1, mut a2) = (self.admin(), self.admin());
        let (lock, vault) = tokio::join!(
            a1.get_lockdown(ad::GetLockdownRequest::default()),
            a2.get_vault_status(ad::GetVaultStatusRequest {})
        );
        Chrome {
            csrf: op.csrf,
            site_locked: lock.is_ok_and(|l| l.into_inner().site_locked),
            vault: vault.ok().map(tonic::Response::into_inner),
        }
    }
}

/// The frame of every signed-in page.
pub(crate) struct Chrome {
    pub csrf: String,
    pub site_locked: bool,
    /// None: the admin service did not answer.
    pub vault: Option<ad::VaultStatusView>,
}

/// A page or a refusal, with the headers every response carries.
async fn secured(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

type App = State<Arc<Console>>;

/// The routes, each refusing without a session (GET: to the sign-in page;
/// POST: 403) and every POST refusing without the session's CSRF token.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/signin", get(signin_page).post(signin))
        .route("/signin/certificate", post(signin_with_certificate))
        .route("/signout", post(signout))
        .route("/", get(home))
        .route("/users", post(users::create))
        .route("/users/load", post(users::load))
        .route("/users/{chip_id}", get(users::show))
        .route("/users/{chip_id}/dump", post(users::dump))
        .route("/users/{chip_id}/edit", post(users::edit))
        .route("/users/{chip_id}/ticket", post(users::ticket))
        .route("/users/{chip_id}/alarm", post(users::raise_alarm))
        .route(
            "/users/{chip_id}/lockdown",
            get(users::confirm_lockdown).post(users::set_lockdown),
        )
        .route(
            "/lockdown",
            get(users::confirm_lockdown).post(users::set_lockdown),
        )
        .route("/tickets", get(site::tickets))
        .route(
            "/tickets/{id}/revoke",
            get(site::confirm_revoke).post(site::revoke_ticket),
        )
        .route("/key", get(site::key))
        .route("/key/unseal", post(site::unseal))
        .route("/key/seal", get(site::confirm_seal).post(site::seal))
        .route("/key/create", post(site::create_key))
        .route("/key/passphrase", post(site::change_passphrase))
        .route("/key/export", post(site::export_key))
        .route("/key/import", post(site::import_key))
        .route("/peer", get(site::peer))
        .route("/peer/start", post(site::start_peer))
        .route("/peer/stop", post(site::stop_peer))
        .route("/config", get(site::config).post(site::set_config))
        .route("/audit", get(site::audit))
        .route("/health", get(site::health))
        .route("/style.css", get(pages::style))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(console.clone(), as_operator))
        .layer(axum::middleware::from_fn(traced_request))
        .layer(axum::middleware::from_fn_with_state(console.clone(), known_host))
        .layer(axum::middleware::map_response(secured))
        .with_state(console)
}

/// Refuse a request whose `Host` is not this console's (DNS rebinding): 421.
/// A span per request, named for its route (`POST /users/{chip_id}/edit`),
/// never for its path or query, which may hold a sign-in token.
async fn traced_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("(no route)", |p| p.as_str());
    let name = format!("console {} {route}", request.method());
    let span = tracing::info_span!("console request", otel.name = %name, otel.kind = "server");
    tracing::Instrument::instrument(next.run(request), span).await
}

/// Answer the request as its session's operator (see [`OPERATOR`]).
async fn as_operator(
    State(c): App,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match c.operator(request.headers()) {
        Some(op) => OPERATOR.scope(op.name, next.run(request)).await,
        None => next.run(request).await,
    }
}

async fn known_host(
    State(c): App,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    if c.serves_host(host) {
        return next.run(request).await;
    }
    tracing::info!(host = %host.chars().take(100).collect::<String>(), "console request for another host refused");
    (
        StatusCode::MISDIRECTED_REQUEST,
        "This console answers to its own address only (see console.hosts).\n",
    )
        .into_response()
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    console: Arc<Console>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let guarded = plain::GuardedListener::new(listener, &console.options);
    conn::serve(guarded, router(console), shutdown).await
}

#[derive(Deserialize)]
struct SigninQuery {
    #[serde(default)]
    t: String,
}

async fn signin_page(
    cert: Option<Extension<https::ClientIdentity>>,
    PageQuery(q): PageQuery<SigninQuery>,
) -> Response {
    let cert = cert.map(|Extension(https::ClientIdentity(id))| id);
    pages::signin(&q.t, cert.as_deref(), None).into_response()
}

/// Whether a sign-in post came from another web site, by what the browser
/// says of it: `Sec-Fetch-Site` (anything but `same-origin`, or `none` for a
/// link the operator opened), else an `Origin` that is not this console's
/// own. Such posts are refused before they count against the per-address
/// limit, so that a page the operator visits cannot lock them out. Clients
/// that send neither header (curl, scripts) are not browsers and are let
/// through to the limit as before.
fn cross_site(headers: &HeaderMap) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(site) = value("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (value("origin"), value("host")) {
        (None, _) => false,
        (Some(origin), Some(host)) => origin.split_once("://").is_none_or(|(_, o)| o != host),
        // HTTP/2 carries the host elsewhere; browsers that speak it send
        // Sec-Fetch-Site anyway.
        (Some(_), None) => false,
    }
}

/// A sign-in post from another web site: 403, not counted.
fn refused_cross_site(peer: SocketAddr) -> Response {
    tracing::info!(%peer, "console sign-in from another web site refused");
    (
        StatusCode::FORBIDDEN,
        pages::signin(
            "",
            None,
            Some(
                "This sign-in was sent by another web site and was refused. Open the sign-in link yourself.",
            ),
        ),
    )
        .into_response()
}

/// Too many attempts from one address: 429, without asking anyone.
fn rate_limited(peer: SocketAddr) -> Response {
    tracing::warn!(%peer, "console sign-in rate limited");
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, SIGNIN_REFILL.as_secs().to_string())],
        pages::signin(
            "",
            None,
            Some("Too many sign-in attempts from this address: wait a few seconds and try again."),
        ),
    )
        .into_response()
}

/// The session cookie's `Set-Cookie` value (`""` and zero: remove it).
fn session_cookie(id: &str, max_age: Duration) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    )
}

/// A new session for `operator`, as the redirect that sets its cookie, once
/// admin has recorded the sign-in (`method`: "ticket" or "certificate").
/// If it cannot, no session: who signed in must be on record.
async fn session_response(c: &Console, operator: &str, method: &str, peer: SocketAddr) -> Response {
    let recorded = OPERATOR
        .scope(
            operator.to_owned(),
            c.admin().record_console_sign_in(ad::RecordConsoleSignInRequest {
                method: method.to_owned(),
                source: peer.ip().to_string(),
            }),
        )
        .await;
    if let Err(s) = recorded {
        tracing::error!(%peer, error = %s.message(), "console sign-in not recorded; refused");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            pages::signin(
                "",
                None,
                Some("The sign-in could not be recorded (the admin service did not answer). Try again with a new link."),
            ),
        )
            .into_response();
    }
    let Some(id) = c.open_session(operator) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no randomness").into_response();
    };
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session_cookie(&id, SESSION_TTL)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// Sign in with the admin client certificate the HTTPS port's handshake
/// verified (the plain port never has one).
async fn signin_with_certificate(
    State(c): App,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    cert: Option<Extension<https::ClientIdentity>>,
) -> Response {
    if cross_site(&headers) {
        return refused_cross_site(peer);
    }
    if !c.may_sign_in(peer.ip()) {
        return rate_limited(peer);
    }
    match cert {
        Some(Extension(https::ClientIdentity(id))) if id == chipsite_tls::identity::ADMIN_CLIENT => {
            tracing::info!(%peer, "console sign-in with the admin client certificate");
            session_response(&c, chipsite_tls::identity::ADMIN_CLIENT, "certificate", peer).await
        }
        other => {
            tracing::info!(%peer, identity = ?other.map(|Extension(i)| i.0), "console certificate sign-in refused");
            (
                StatusCode::FORBIDDEN,
                pages::signin(
                    "",
                    None,
                    Some("Only the admin client certificate signs in here (over the console's HTTPS port)."),
                ),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct SigninForm {
    #[serde(default)]
    t: String,
}

async fn signin(
    State(c): App,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<SigninForm>,
) -> Response {
    if cross_site(&headers) {
        return refused_cross_site(peer);
    }
    if !c.may_sign_in(peer.ip()) {
        return rate_limited(peer);
    }
    // A whole link pasted in is fine too.
    let token =
        f.t.rsplit_once("t=")
            .map_or(f.t.as_str(), |(_, t)| t)
            .trim()
            .to_owned();
    let redeemed = c
        .tickets
        .clone()
        .redeem_ticket(tk::RedeemTicketRequest {
            kind: tk::TicketKind::Console as i32,
            token,
            chip_id: chipsite_model::ticket::CONSOLE_SUBJECT.to_owned(),
            source: format!("console:{}", peer.ip()),
            refusal: String::new(),
        })
        .await;
    let Ok(redeemed) = redeemed else {
        tracing::info!(%peer, "console sign-in refused");
        return (
            StatusCode::FORBIDDEN,
            pages::signin(
                "",
                None,
                Some("This sign-in link is not valid: it was used, it expired, or it never existed. Ask for a new one (chipsctl console link)."),
            ),
        )
            .into_response();
    };
    // Who the link was issued for: `alice` of `admin-client (alice)`.
    let operator = chipsite_model::operator::of_actor(&redeemed.into_inner().issued_by).to_owned();
    let operator = if chipsite_model::operator::valid(&operator) {
        operator
    } else {
        "unknown".to_owned()
    };
    tracing::info!(%peer, %operator, "console sign-in");
    session_response(&c, &operator, "ticket", peer).await
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// A page's query parameters. A query string that does not parse (say
/// `/audit?limit=-1`) answers `400` with a page that says which parameter,
/// instead of the framework's plain text.
pub(crate) struct PageQuery<T>(pub T);

impl<T> axum::extract::FromRequestParts<Arc<Console>> for PageQuery<T>
where
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<Console>,
    ) -> Result<Self, Response> {
        let parsed = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| e.body_text());
        match parsed {
            Ok(Query(t)) => Ok(Self(t)),
            Err(why) => {
                let why = why
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&why);
                let text = format!("This page's address has a value it does not take ({why}).");
                // Signed in: the navigation stays, and "Back" is the page
                // without the query. Otherwise the sign-in comes first.
                let page = match state.operator(&parts.headers) {
                    Some(op) => pages::refused(&state.chrome(op).await, &text, parts.uri.path()),
                    None => return Err(Redirect::to("/signin").into_response()),
                };
                Err((StatusCode::BAD_REQUEST, page).into_response())
            }
        }
    }
}

/// Why a request was refused.
pub(crate) enum Refusal {
    /// No session: a page goes to the sign-in page.
    SignIn,
    /// A form without a session or with a wrong CSRF token.
    Forbidden(&'static str),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn => Redirect::to("/signin").into_response(),
            Self::Forbidden(why) => (StatusCode::FORBIDDEN, pages::message("Refused", why)).into_response(),
        }
    }
}

/// The operator, if the request has a session and (for a form) its CSRF token.
pub(crate) fn checked(c: &Console, headers: &HeaderMap, csrf: Option<&str>) -> Result<Operator, Refusal> {
    let Some(op) = c.operator(headers) else {
        return Err(match csrf {
            None => Refusal::SignIn,
            Some(_) => Refusal::Forbidden("sign in first"),
        });
    };
    if let Some(token) = csrf
        && !bool::from(token.as_bytes().ct_eq(op.csrf.as_bytes()))
    {
        return Err(Refusal::Forbidden(
            "the form is stale (CSRF check failed): reload the page",
        ));
    }
    Ok(op)
}

async fn signout(State(c): App, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Err(r) = checked(&c, &headers, Some(&f.csrf)) {
        return r.into_response();
    }
    c.close_session(&headers);
    let mut r = Redirect::to("/signin").into_response();
    if let Ok(v) = HeaderValue::from_str(&session_cookie("", Duration::ZERO)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The users page's query: the search, the filters, the order and the page.
#[derive(Deserialize, Default)]
pub(crate) struct HomeQuery {
    #[serde(default)]
    pub q: String,
    /// "", "active", "suspended" or "closed".
    #[serde(default)]
    pub status: String,
    /// "", "locked" or "open".
    #[serde(default)]
    pub lock: String,
    /// As `ListUsersRequest.sort`: "chip_id" (or ""), "name", "status" or
    /// "created", "-" first for the other way.
    #[serde(default)]
    pub sort: String,
    /// The previous page's next_page_token.
    #[serde(default)]
    pub after: String,
}

async fn home(
    State(c): App,
    headers: HeaderMap,
    PageQuery(q): PageQuery<HomeQuery>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    let chrome = c.chrome(op).await;
    Ok(users::users_page(&c, &chrome, &q, pages::NewUser::default(), None).await)
}

/// Users per page of the list.
pub const PAGE_SIZE: u32 = 50;

async fn not_found(State(c): App, headers: HeaderMap) -> Response {
    match checked(&c, &headers, None) {
        Ok(op) => (
            StatusCode::NOT_FOUND,
            pages::refused(&c.chrome(op).await, "There is no such page.", "/"),
        )
            .into_response(),
        Err(r) => r.into_response(),
    }
}

/// For the fuzzers (`fuzz/`): decode `body` as the form `which` names, as
/// the console's handlers do, and run the checks that need no site.
#[doc(hidden)]
pub fn decode_form_for_fuzzing(which: u8, body: &[u8]) {
    fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
        serde_urlencoded::from_bytes(body).ok()
    }
    match which % 10 {
        0 => drop(decode::<SigninForm>(body)),
        1 => drop(decode::<CsrfForm>(body)),
        2 => {
            if let Some(f) = decode::<site::SecretForm>(body) {
                let _ = f.confirmed();
            }
        }
        3 => drop(decode::<site::ConfigForm>(body)),
        4 => drop(decode::<users::CreateForm>(body)),
        5 => drop(decode::<users::EditForm>(body)),
        6 => drop(decode::<HomeQuery>(body)),
        7 => drop(decode::<site::TicketsQuery>(body)),
        8 => drop(decode::<site::AuditQuery>(body)),
        _ => drop(decode::<users::LockQuery>(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Arc<Console> {
        let nowhere =
            || Channel::tcp_only(tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy());
        Console::with_probes(nowhere(), nowhere(), vec![])
    }

    /// What a browser says of a sign-in post decides whether it counts.
    #[test]
    fn sign_in_posts_from_other_web_sites_are_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let host = ("host", "127.0.0.1:44303");
        for (headers, cross) in [
            (h(&[host]), false),
            (h(&[host, ("sec-fetch-site", "same-origin")]), false),
            (h(&[host, ("sec-fetch-site", "none")]), false),
            (h(&[host, ("sec-fetch-site", "cross-site")]), true),
            (h(&[host, ("sec-fetch-site", "same-site")]), true),
            (h(&[host, ("origin", "http://127.0.0.1:44303")]), false),
            (h(&[host, ("origin", "http://127.0.0.1:8080")]), true),
            (h(&[host, ("origin", "null")]), true),
            (
                h(&[
                    host,
                    ("origin", "http://evil.example"),
                    ("sec-fetch-site", "same-origin"),
                ]),
                false,
            ),
        ] {
            assert_eq!(cross_site(&headers), cross, "{headers:?}");
        }
    }

    /// The sign-in limit, without a site: per source, and a full table
    /// still admits a new source.
    #[tokio::test]
    async fn sign_in_attempts_are_limited_per_source() {
        let c = console();
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        for _ in 0..SIGNIN_ATTEMPTS {
            assert!(c.may_sign_in(a));
        }
        assert!(!c.may_sign_in(a), "the 11th attempt at once is refused");
        assert!(c.may_sign_in(b), "another source is not affected");
        for i in 0..MAX_SOURCES {
            let octets = u32::try_from(i).unwrap_or(0).to_be_bytes();
            c.may_sign_in(IpAddr::from([10, octets[1], octets[2], octets[3]]));
        }
        assert!(
            c.may_sign_in([203, 0, 113, 9].into()),
            "a full table admits a new source (the operator's)"
        );
        let remembered = c.attempts.sources();
        assert!(remembered <= MAX_SOURCES, "bounded: {remembered}");
    }
}
