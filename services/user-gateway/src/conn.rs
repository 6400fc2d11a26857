//! One external connection: the TLS handshake, then either an enrollment
//! (no client certificate) or a session (a client certificate).

use std::{net::SocketAddr, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::{PublishedTicket, TicketKind as Kind};
use chipsite_proto::status::{ErrorCode as SiteCode, code_of};
use chipsite_proto::{
    admin::v1 as ad,
    events::v1 as ev,
    keyvault::v1 as kv,
    ticket::v1::{self as tk, TicketKind},
};
use chipsite_wire::{
    ErrorCode, FrameError, FrameReader, Incoming, Limits, Notification, Response, RpcError, close, rpc,
    write_frame,
};
use rustls::ServerConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use chipsite_telemetry::metrics::{OutcomeLabels, metrics};
use chipsite_tls::{ConnPermit, Shed};
use std::time::Duration;

use crate::{AppCertificate, CloseReason, Inner, source_of};

/// One open session in the `chipsite_gateway_sessions` gauge, for as long as it lives.
struct OpenSession;

impl OpenSession {
    fn count() -> Self {
        metrics().gateway_sessions.inc();
        Self
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        metrics().gateway_sessions.dec();
    }
}

type Stream = TlsStream<TcpStream>;

fn count_handshake(outcome: &'static str) {
    let labels = OutcomeLabels { outcome };
    metrics().gateway_handshakes.get_or_create(&labels).inc();
}

/// A connection over one of the caps: closed at once, before any TLS byte.
pub(crate) fn shed(peer: SocketAddr, why: Shed) {
    count_handshake("shed");
    tracing::debug!(%peer, cap = why.label(), "connection shed");
}

/// One connection, from its accept to its end; `permit` holds its place
/// (and its handshake slot until the handshake ends) for its whole life.
pub(crate) async fn handle(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    mut permit: ConnPermit,
    accepted_at: Instant,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(
        inner.settings.handshake_timeout,
        TlsAcceptor::from(config).accept(tcp),
    )
    .await;
    permit.handshake_done();
    let counted = count_handshake;
    let stream = match handshake {
        Ok(Ok(s)) => {
            counted("ok");
            chipsite_tls::ack_now(s.get_ref().0);
            s
        }
        Ok(Err(e)) => {
            counted("failed");
            tracing::debug!(%peer, error = %e, "app TLS handshake failed");
            return;
        }
        Err(_) => {
            counted("timeout");
            tracing::debug!(%peer, "app TLS handshake timed out");
            return;
        }
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| AppCertificate::parse(c));
    match cert {
        None => enroll(&inner, stream, peer, accepted_at + inner.settings.enroll_timeout).await,
        Some(Ok(app)) => session(&inner, stream, app, peer).await,
        // The verifier accepted only parseable certificates.
        Some(Err(_)) => {}
    }
    drop(permit);
}

// ---------------------------------------------------------------- enrollment

#[derive(Deserialize)]
struct EnrollParams {
    chip_id: String,
    public_key: String,
}

/// Read one `enroll` request. Valid: answer, close. Anything else: close
/// without sending a byte (the stream is dropped without a TLS close_notify).
/// The request must have arrived by `deadline` (the enrollment timeout
/// counted from the TCP accept, the handshake included).
async fn enroll(inner: &Inner, stream: Stream, peer: SocketAddr, deadline: Instant) {
    let limits = Limits {
        idle: inner.settings.enroll_timeout,
        frame: inner.settings.enroll_timeout,
        ..inner.settings.limits
    };
    let mut reader = FrameReader::new(stream, limits);
    let enrollments = &metrics().gateway_enrollments;
    let Ok(Ok(Some(frame))) = tokio::time::timeout_at(deadline, reader.next_frame()).await else {
        enrollments
            .get_or_create(&OutcomeLabels {
                outcome: "no_request",
            })
            .inc();
        return;
    };
    let span = tracing::info_span!("enroll", otel.name = "user-gateway enroll", otel.kind = "server");
    let outcome = tracing::Instrument::instrument(enroll_request(inner, &frame, peer), span).await;
    let labels = OutcomeLabels {
        outcome: if outcome.is_ok() { "enrolled" } else { "refused" },
    };
    enrollments.get_or_create(&labels).inc();
    match outcome {
        Ok((id, chip_id)) => {
            tracing::info!(chip_id, "app key enrolled");
            let reply = Response::result(id, json!({"enrolled": true, "chip_id": chip_id}));
            let stream = reader.get_mut();
            let within = inner.settings.write_timeout;
            if write_frame(stream, &reply.to_frame(), within).await.is_ok() {
                close(stream, within).await;
            }
        }
        Err(why) => tracing::info!(%peer, why, "enrollment refused (closed without a word)"),
    }
}

async fn enroll_request(
    inner: &Inner,
    frame: &str,
    peer: SocketAddr,
) -> Result<(Value, String), &'static str> {
    let Ok(Incoming::Request(req)) = rpc::parse(frame) else {
        return Err("not a JSON-RPC request");
    };
    // A request without a token spends nothing and is not an attempt; one
    // with a token burns it, whatever else is wrong with the request.
    let Some(token) = req.params.get("token").and_then(Value::as_str) else {
        return Err("no token");
    };
    let source = source_of(peer);
    // Failed attempts from one source are throttled here, before any
    // internal call; a throttled attempt spends nothing (the ticket stays
    // good for its owner, whoever else shares the address).
    let Some(attempt) = inner.enroll_throttle.begin(&source) else {
        return Err("too many failed attempts from this source");
    };
    let result = enroll_checked(inner, &req, token, &source).await;
    if result.is_ok() {
        attempt.succeeded();
    }
    result
}

async fn enroll_checked(
    inner: &Inner,
    req: &chipsite_wire::Request,
    token: &str,
    source: &str,
) -> Result<(Value, String), &'static str> {
    let claimed_chip = req.params.get("chip_id").and_then(Value::as_str).unwrap_or("");
    // Judge the request first, so that the ticket's audit record says why
    // it was refused instead of "redeemed".
    let judged: Result<(EnrollParams, Vec<u8>), &'static str> = (|| {
        if req.method != "enroll" {
            return Err("not an enroll request");
        }
        let params: EnrollParams =
            serde_json::from_value(req.params.clone()).map_err(|_| "bad parameters")?;
        let key = URL_SAFE_NO_PAD
            .decode(params.public_key.as_bytes())
            .map_err(|_| "public key not base64url")?;
        {
            use p256::pkcs8::DecodePublicKey;
            p256::PublicKey::from_public_key_der(&key).map_err(|_| "public key not a P-256 SPKI")?;
        }
        Ok((params, key))
    })();
    let locked = match &judged {
        Ok((params, _)) => {
            // The site cannot tell: nothing is spent, the app may retry.
            let generation = inner.cache.known(&params.chip_id).generation;
            let lock = inner
                .admin
                .clone()
                .get_lockdown(ad::GetLockdownRequest {
                    chip_id: params.chip_id.clone(),
                })
                .await
                .map_err(|_| "lockdown state unavailable")?
                .into_inner();
            // The app's first session, which follows at once, asks again
            // only once the admission cache's entry has expired.
            inner
                .cache
                .store_lockdown(generation, &params.chip_id, lock.site_locked, lock.user_locked);
            lock.site_locked || lock.user_locked
        }
        Err(_) => false,
    };
    let refusal = match (&judged, locked) {
        (Err(_), _) => "request",
        (Ok(_), true) => "locked",
        (Ok(_), false) => "",
    };
    let redeemed = inner
        .tickets
        .clone()
        .redeem_ticket(tk::RedeemTicketRequest {
            kind: TicketKind::User as i32,
            token: token.to_owned(),
            chip_id: claimed_chip.to_owned(),
            source: source.to_owned(),
            refusal: refusal.to_owned(),
        })
        .await
        .map_err(|_| "ticket refused")?
        .into_inner();
    let (params, key) = judged?;
    if locked {
        return Err("locked down");
    }
    if redeemed.chip_id != params.chip_id {
        return Err("ticket of another user");
    }
    inner
        .vault
        .clone()
        .register_user_key(kv::RegisterUserKeyRequest {
            chip_id: params.chip_id.clone(),
            public_key: key.clone(),
        })
        .await
        .map_err(|_| "key-vault refused the key")?;
    // Sessions with the old key close here at once, and on every other
    // replica through admin's user events.
    inner.cache.key_changed(&params.chip_id, &key);
    inner
        .registry
        .close_user(&params.chip_id, CloseReason::KeyReplaced, Some(&key));
    tokio::spawn(announce_key_change(
        inner.events.clone(),
        inner.settings.fail_announcements.clone(),
        params.chip_id.clone(),
        key,
    ));
    Ok((req.id.clone(), params.chip_id))
}

/// Tell admin (and through it every other replica) of a new key, retrying
/// until admin acknowledges it: 0.1 s, 0.2 s, … then every 5 s, for up to
/// ten minutes. Meanwhile other replicas' caches still expire on their own.
async fn announce_key_change(
    mut events: chipsite_proto::events::v1::user_events_client::UserEventsClient<
        chipsite_telemetry::TracedChannel,
    >,
    fail: Arc<std::sync::atomic::AtomicU32>,
    chip_id: String,
    public_key: Vec<u8>,
) {
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut wait = Duration::from_millis(100);
    loop {
        let injected = fail
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        let sent = if injected {
            Err(tonic::Status::unavailable("injected failure"))
        } else {
            events
                .key_changed(ev::KeyChangedRequest {
                    chip_id: chip_id.clone(),
                    public_key: public_key.clone(),
                })
                .await
                .map(|_| ())
        };
        match sent {
            Ok(()) => return,
            Err(e) if Instant::now() >= give_up => {
                tracing::error!(chip_id, error = %e, "gave up announcing a key change; other replicas learn it when their caches expire");
                return;
            }
            Err(e) => {
                tracing::warn!(chip_id, error = %e, "could not announce a key change yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

// ------------------------------------------------------------------- session

/// A site service's error as the wire error an app sees: decided by the
/// code the service sent (`chipsite-code`), never by its message text.
fn rpc_error(status: &tonic::Status) -> RpcError {
    let (code, message) = match code_of(status) {
        SiteCode::NotFound => (ErrorCode::NotFound, status.message()),
        SiteCode::InvalidArgument => (ErrorCode::InvalidParams, status.message()),
        SiteCode::Throttled => (ErrorCode::RateLimited, "too many requests"),
        SiteCode::Forbidden | SiteCode::Refused | SiteCode::WrongPassphrase => {
            (ErrorCode::Unauthorized, "not allowed")
        }
        SiteCode::LockedDown => (ErrorCode::LockedDown, "locked down"),
        SiteCode::Sealed | SiteCode::NoSiteKey | SiteCode::FailedPrecondition => {
            (ErrorCode::Unavailable, status.message())
        }
        SiteCode::Unavailable => (ErrorCode::Unavailable, "the site is unavailable; try again later"),
        SiteCode::AlreadyExists | SiteCode::Internal => (ErrorCode::Internal, "internal error"),
    };
    RpcError::new(code, message)
}

/// Whether this certificate may open a session: its key is the one
/// registered for its CHIP ID, and neither the user nor the site is locked
/// down. Answers come from the admission cache while the user-event stream
/// is live, else from key-vault and admin.
async fn admit(inner: &Inner, app: &AppCertificate) -> Result<(), RpcError> {
    let unauthorized = || RpcError::new(ErrorCode::Unauthorized, "unknown CHIP ID or key not registered");
    let known = inner.cache.known(&app.chip_id);
    let registered: std::sync::Arc<[u8]> = match known.key {
        Some(Some(k)) => k,
        Some(None) => return Err(unauthorized()),
        None => match inner
            .vault
            .clone()
            .get_user_key(kv::GetUserKeyRequest {
                chip_id: app.chip_id.clone(),
            })
            .await
        {
            Ok(k) => {
                let k = k.into_inner().public_key;
                inner.cache.store_key(known.generation, &app.chip_id, Some(&k));
                k.into()
            }
            Err(s) if code_of(&s) == SiteCode::NotFound => {
                inner.cache.store_key(known.generation, &app.chip_id, None);
                return Err(unauthorized());
            }
            Err(s) => return Err(rpc_error(&s)),
        },
    };
    if !bool::from(registered.ct_eq(&app.spki)) {
        return Err(unauthorized());
    }
    let (site_locked, user_locked) = match known.lockdown {
        Some(l) => l,
        None => {
            let lock = inner
                .admin
                .clone()
                .get_lockdown(ad::GetLockdownRequest {
                    chip_id: app.chip_id.clone(),
                })
                .await
                .map_err(|s| rpc_error(&s))?
                .into_inner();
            inner
                .cache
                .store_lockdown(known.generation, &app.chip_id, lock.site_locked, lock.user_locked);
            (lock.site_locked, lock.user_locked)
        }
    };
    if site_locked || user_locked {
        return Err(RpcError::new(ErrorCode::LockedDown, "locked down"));
    }
    Ok(())
}

async fn session(inner: &Inner, stream: Stream, app: AppCertificate, peer: SocketAddr) {
    let (read, mut write) = tokio::io::split(stream);
    // Registered before the checks, so a lockdown or key change that lands
    // while they run still reaches this session.
    let mut handle = inner.registry.register(&app.chip_id, &app.spki);
    let _registered = Unregister {
        inner,
        chip_id: &app.chip_id,
        id: handle.id,
    };
    let within = inner.settings.write_timeout;
    // Failed admissions from one source are throttled before any internal
    // call, so made-up CHIP IDs cannot turn into key-vault queries.
    let source = source_of(peer);
    let admitted = match inner.session_throttle.begin(&source) {
        Some(attempt) => {
            let admitted = admit(inner, &app).await;
            if admitted.is_ok() {
                attempt.succeeded();
            }
            admitted
        }
        None => Err(RpcError::new(
            ErrorCode::RateLimited,
            "too many failed attempts from this address; try again later",
        )),
    };
    let admitted = admitted.and_then(|()| {
        let max = inner.settings.max_sessions_per_user;
        if inner.registry.admit(&app.chip_id, handle.id, max) {
            Ok(())
        } else {
            Err(RpcError::new(
                ErrorCode::RateLimited,
                format!("too many open sessions for this user (at most {max})"),
            ))
        }
    });
    if let Err(e) = admitted {
        tracing::info!(%peer, chip_id = app.chip_id, error = e.message, "session refused");
        let _ = write_frame(&mut write, &Response::error(Value::Null, e).to_frame(), within).await;
        close(&mut write, within).await;
        return;
    }
    tracing::debug!(%peer, chip_id = app.chip_id, "session open");
    let _open = OpenSession::count();
    let mut reader = FrameReader::new(read, inner.settings.limits);
    let ended = loop {
        tokio::select! {
            biased;
            changed = handle.close.changed() => {
                let reason = if changed.is_ok() { *handle.close.borrow() } else { None };
                let reason = reason.unwrap_or(CloseReason::ShuttingDown);
                let note = Notification {
                    method: "closed".into(),
                    params: json!({"code": reason.code().code(), "message": reason.message()}),
                };
                let _ = write_frame(&mut write, &note.to_frame(), within).await;
                break "closed by the site";
            }
            Some(alarm) = handle.alarms.recv() => {
                if write_frame(&mut write, &alarm, within).await.is_err() {
                    break "the app does not read";
                }
            }
            frame = reader.next_frame() => {
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) => break "closed by the app",
                    Err(e @ (FrameError::TooLong(_) | FrameError::NotUtf8)) => {
                        let code = if matches!(e, FrameError::NotUtf8) { ErrorCode::ParseError } else { ErrorCode::InvalidRequest };
                        let reply = Response::error(Value::Null, RpcError::new(code, e.to_string()));
                        let _ = write_frame(&mut write, &reply.to_frame(), within).await;
                        break "framing error";
                    }
                    Err(_) => break "timed out or broken",
                };
                let reply = match rpc::parse(&frame) {
                    Err(reply) => Some(reply),
                    Ok(Incoming::Notification(_)) => None,
                    Ok(Incoming::Request(req)) => {
                        // A span per request, named for a method of the
                        // protocol's shape only (the app chooses the string).
                        let plain = req.method.len() <= 32
                            && req.method.chars().all(|c| c.is_ascii_lowercase() || matches!(c, '.' | '_' | '-'));
                        let name = format!("user-gateway {}", if plain { req.method.as_str() } else { "other" });
                        let span = tracing::info_span!("app request", otel.name = %name, otel.kind = "server");
                        let outcome = tracing::Instrument::instrument(
                            call(inner, &app.chip_id, handle.id, &req.method, req.params),
                            span,
                        )
                        .await;
                        Some(Response { outcome, id: req.id })
                    }
                };
                if let Some(reply) = reply
                    && write_frame(&mut write, &reply.to_frame(), within).await.is_err()
                {
                    break "the app does not read";
                }
            }
        }
    };
    if ended == "the app does not read" {
        tracing::info!(%peer, chip_id = app.chip_id, "session closed: the app does not read what the site sends");
    } else {
        tracing::debug!(%peer, chip_id = app.chip_id, ended, "session ended");
    }
    close(&mut write, within).await;
}

struct Unregister<'a> {
    inner: &'a Inner,
    chip_id: &'a str,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.inner.registry.unregister(self.chip_id, self.id);
    }
}

/// A method's params: an object, or none (docs/protocol.md section 9); an
/// array is refused, as is any member the method does not know.
pub(crate) fn params<T: serde::de::DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    let p = match p {
        Value::Null => json!({}),
        Value::Object(_) => p,
        _ => {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                "invalid params: params must be an object",
            ));
        }
    };
    serde_json::from_value(p)
        .map_err(|e| RpcError::new(ErrorCode::InvalidParams, format!("invalid params: {e}")))
}

/// A tally ticket's lifetime bounds (docs/protocol.md section 9).
const TALLY_TTL_MIN: u32 = 60;
const TALLY_TTL_MAX: u32 = 30 * 86_400;
/// The most alarms `alarms.list` returns.
const ALARMS_MAX: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TallyRedeemParams {
    /// Another site's tally ticket: its URI or its JSON (as a string).
    ticket: String,
}

/// The answer to `tally.redeem` when the peer gateway says no: what went
/// wrong, in the user's terms (the peer gateway's messages hold no secret).
fn redeem_error(status: &tonic::Status) -> RpcError {
    match code_of(status) {
        SiteCode::InvalidArgument => RpcError::new(ErrorCode::InvalidParams, status.message()),
        SiteCode::Refused => RpcError::new(
            ErrorCode::Unauthorized,
            "the other site refused the ticket (used, expired, revoked, or not this site's)",
        ),
        SiteCode::AlreadyExists => RpcError::new(ErrorCode::Unauthorized, status.message()),
        SiteCode::Unavailable
            if !status.message().is_empty()
                && status.metadata().contains_key(chipsite_model::CODE_METADATA) =>
        {
            RpcError::new(ErrorCode::Unavailable, status.message())
        }
        _ => rpc_error(status),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TallyTicketParams {
    #[serde(default)]
    ttl_seconds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlarmListParams {
    #[serde(default)]
    include_acked: bool,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlarmAckParams {
    id: i64,
}

fn alarm_json(a: &ev::Alarm) -> Value {
    json!({
        "id": a.id,
        "kind": a.kind,
        "text": a.text,
        "created_at_ms": a.created_at_ms,
        "acked": a.acked_at_ms != 0,
        "delivered_by": a.delivered_by,
    })
}

async fn call(inner: &Inner, chip_id: &str, session: u64, method: &str, p: Value) -> Result<Value, RpcError> {
    let grpc = |s: tonic::Status| rpc_error(&s);
    match method {
        "status" => {
            let NoParams {} = params(p)?;
            // The user with its pending alarms (one call, one statement),
            // and the tallies, asked at the same time.
            let mut admin = inner.admin.clone();
            let (user, tallies) = tokio::join!(
                admin.get_user_status(ad::GetUserRequest {
                    chip_id: chip_id.to_owned(),
                }),
                crate::tallies::list(inner, chip_id, 100)
            );
            let user = user.map_err(grpc)?.into_inner();
            let pending = user.alarms_pending;
            Ok(json!({
                "chip_id": user.chip_id,
                "name": user.name,
                "status": user.status,
                "locked": user.locked,
                "alarms_pending": pending,
                "tallies": tallies
                    .map_err(grpc)?
                    .iter()
                    .map(|t| crate::tallies::tally_json(t, false))
                    .collect::<Vec<_>>(),
            }))
        }
        "tally_ticket" => {
            let TallyTicketParams { ttl_seconds } = params(p)?;
            if let Some(t) = ttl_seconds
                && !(TALLY_TTL_MIN..=TALLY_TTL_MAX).contains(&t)
            {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("invalid params: ttl_seconds must be {TALLY_TTL_MIN} to {TALLY_TTL_MAX}"),
                ));
            }
            let config = inner
                .admin
                .clone()
                .get_site_config(ad::GetSiteConfigRequest {})
                .await
                .map_err(grpc)?
                .into_inner()
                .values;
            let host = config.get("peer_gateway.host").cloned().unwrap_or_default();
            let port: u16 = config
                .get("peer_gateway.port")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let ttl = ttl_seconds
                .or_else(|| config.get("ticket.ttl_seconds").and_then(|t| t.parse().ok()))
                .unwrap_or(86_400);
            let issued = inner
                .tickets
                .clone()
                .issue_ticket(tk::IssueTicketRequest {
                    kind: TicketKind::Tally as i32,
                    chip_id: chip_id.to_owned(),
                    ttl_seconds: ttl,
                    host: host.clone(),
                    port: u32::from(port),
                    issuer: String::new(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            let expires = issued.info.as_ref().map_or(0, |i| i.expires_at_ms);
            let ticket = PublishedTicket::new(
                Kind::Tally,
                chip_id,
                &host,
                port,
                &issued.token,
                &issued.site_public_key,
                expires,
            );
            let ticket_json: Value = serde_json::from_str(&ticket.to_json())
                .map_err(|_| RpcError::new(ErrorCode::Internal, "internal error"))?;
            Ok(json!({"ticket": ticket_json, "uri": ticket.to_uri()}))
        }
        "tally.redeem" => {
            let TallyRedeemParams { ticket } = params(p)?;
            if ticket.len() > 8192 {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    "invalid params: ticket is too long",
                ));
            }
            let link = inner
                .peer
                .clone()
                .redeem_tally_ticket(chipsite_proto::peer::v1::RedeemTallyTicketRequest {
                    chip_id: chip_id.to_owned(),
                    ticket,
                    source: String::new(),
                })
                .await
                .map_err(|s| redeem_error(&s))?
                .into_inner();
            Ok(json!({"linked": {
                "chip_id": link.peer_chip_id,
                "host": link.peer_host,
                "port": link.peer_port,
                "site_pin": link.peer_site_pin,
            }}))
        }
        "tally.list" => crate::tallies::list_method(inner, chip_id, p).await,
        "tally.offer" | "tally.accept" | "tally.reject" | "tally.close" => {
            let kind = chipsite_model::tally::Kind::parse(&method["tally.".len()..])
                .ok_or_else(|| RpcError::new(ErrorCode::Internal, "internal error"))?;
            crate::tallies::step_method(inner, chip_id, kind, p).await
        }
        "alarms.list" => {
            let AlarmListParams { include_acked, limit } = params(p)?;
            if let Some(l) = limit
                && !(1..=ALARMS_MAX).contains(&l)
            {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("invalid params: limit must be 1 to {ALARMS_MAX}"),
                ));
            }
            let alarms = inner
                .events
                .clone()
                .list_alarms(ev::ListAlarmsRequest {
                    chip_id: chip_id.to_owned(),
                    include_acked,
                    limit: limit.unwrap_or(100),
                    ..Default::default()
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .alarms;
            Ok(json!({"alarms": alarms.iter().map(alarm_json).collect::<Vec<_>>()}))
        }
        "alarms.ack" => {
            let AlarmAckParams { id } = params(p)?;
            let a = inner
                .events
                .clone()
                .ack_alarm(ev::AckAlarmRequest {
                    chip_id: chip_id.to_owned(),
                    id,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            Ok(alarm_json(&a))
        }
        "ping" => {
            let NoParams {} = params(p)?;
            Ok(json!({"pong": true}))
        }
        "alarms.subscribe" => {
            let NoParams {} = params(p)?;
            inner.registry.subscribe(chip_id, session);
            Ok(json!({"subscribed": true}))
        }
        "enroll" => Err(RpcError::new(
            ErrorCode::MethodNotFound,
            "enroll is only available on a connection without a client certificate",
        )),
        other => Err(RpcError::new(
            ErrorCode::MethodNotFound,
            format!("method not found: {}", other.chars().take(64).collect::<String>()),
        )),
    }
}
