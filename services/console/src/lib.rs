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
//! Every response carries a strict Content-Security-Policy.

mod pages;
mod users;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Form, Router,
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
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::Channel;

/// The session cookie. `__Host-`: only over a secure origin, no Domain, Path=/.
pub const COOKIE: &str = "__Host-chipsite_console";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions held at most (the oldest go first).
const MAX_SESSIONS: usize = 1000;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

struct Session {
    csrf: String,
    expires: Instant,
}

pub struct Console {
    admin: AdminServiceClient<TracedChannel>,
    tickets: TicketsClient<TracedChannel>,
    /// By SHA-256 of the cookie value.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
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

/// The signed-in operator's session: its CSRF token.
pub(crate) struct Operator {
    pub csrf: String,
}

impl Console {
    /// `admin` and `tickets`: channels presenting the `console` identity.
    pub fn new(admin: Channel, tickets: Channel) -> Arc<Self> {
        Arc::new(Self {
            admin: AdminServiceClient::new(traced(admin)),
            tickets: TicketsClient::new(traced(tickets)),
            sessions: Mutex::new(HashMap::new()),
        })
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
            m.get(&id).map(|s| Operator { csrf: s.csrf.clone() })
        })
    }

    fn open_session(&self) -> Option<String> {
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

    pub(crate) fn admin(&self) -> AdminServiceClient<TracedChannel> {
        self.admin.clone()
    }
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
        .route("/signout", post(signout))
        .route("/", get(home))
        .route("/users", post(users::create))
        .route("/users/{chip_id}", get(users::show))
        .route("/users/{chip_id}/edit", post(users::edit))
        .route("/users/{chip_id}/ticket", post(users::ticket))
        .route(
            "/users/{chip_id}/lockdown",
            get(users::confirm_lockdown).post(users::set_lockdown),
        )
        .route(
            "/lockdown",
            get(users::confirm_lockdown).post(users::set_lockdown),
        )
        .route("/style.css", get(pages::style))
        .fallback(not_found)
        .layer(axum::middleware::map_response(secured))
        .with_state(console)
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    console: Arc<Console>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[derive(Deserialize)]
struct SigninQuery {
    #[serde(default)]
    t: String,
}

async fn signin_page(Query(q): Query<SigninQuery>) -> Response {
    pages::signin(&q.t, None).into_response()
}

#[derive(Deserialize)]
struct SigninForm {
    #[serde(default)]
    t: String,
}

async fn signin(
    State(c): App,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<SigninForm>,
) -> Response {
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
            chip_id: chipsite_ticket::CONSOLE_SUBJECT.to_owned(),
            source: format!("console:{}", peer.ip()),
        })
        .await;
    if redeemed.is_err() {
        tracing::info!(%peer, "console sign-in refused");
        return (
            StatusCode::FORBIDDEN,
            pages::signin(
                "",
                Some("This sign-in link is not valid: it was used, it expired, or it never existed. Ask for a new one (chipsctl console link)."),
            ),
        )
            .into_response();
    }
    let Some(id) = c.open_session() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no randomness").into_response();
    };
    tracing::info!(%peer, "console sign-in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
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
            Self::Forbidden(why) => (StatusCode::FORBIDDEN, why).into_response(),
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
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-chipsite_console=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

#[derive(Deserialize)]
struct HomeQuery {
    #[serde(default)]
    q: String,
}

async fn home(State(c): App, headers: HeaderMap, Query(q): Query<HomeQuery>) -> Response {
    let op = match checked(&c, &headers, None) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let (mut a1, mut a2, mut a3) = (c.admin(), c.admin(), c.admin());
    let (lock, vault, users) = tokio::join!(
        a1.get_lockdown(ad::GetLockdownRequest::default()),
        a2.get_vault_status(ad::GetVaultStatusRequest {}),
        a3.list_users(ad::ListUsersRequest {
            query: q.q.clone(),
            page_size: 50,
            page_token: String::new(),
        })
    );
    match (lock, vault, users) {
        (Ok(l), Ok(v), Ok(u)) => {
            pages::home(&op, &l.into_inner(), &v.into_inner(), &u.into_inner(), &q.q).into_response()
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin service did not answer; try again",
        )
            .into_response(),
    }
}

async fn not_found(State(c): App, headers: HeaderMap) -> Response {
    match checked(&c, &headers, None) {
        Ok(_) => (StatusCode::NOT_FOUND, "not found").into_response(),
        Err(r) => r.into_response(),
    }
}
