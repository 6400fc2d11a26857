//! The tally ticket dialog between sites (docs/protocol.md section 14),
//! both sides: [`answer`] serves a peer site that introduces one of its users
//! with our user's ticket; [`redeem`] dials the site that issued a ticket our
//! user hands in.

use std::{net::SocketAddr, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::{PublishedTicket, TicketKind, is_chip_id, pin_of_spki};
use chipsite_proto::{
    keyvault::v1 as kv,
    status::{ErrorCode as SiteCode, code_of},
    ticket::v1::{self as tk},
};
use chipsite_tls::ConnPermit;
use chipsite_wire::{FrameReader, Incoming, Limits, Response, close, rpc, write_frame};
use rustls::{
    pki_types::{ServerName, UnixTime},
    server::Acceptor,
};
use sea_orm::{ActiveValue::Set, EntityTrait, sea_query::OnConflict};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::{Inner, PeerError, store::link};

/// The one request of a ticket connection (docs/protocol.md section 14).
// No `Debug`: it holds the token.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IntroduceParams {
    /// The ticket's token.
    token: String,
    /// The user who issued the ticket (the answering site's user).
    user: String,
    /// The introducing site's user.
    chip_id: String,
    /// The introducing site's key (SPKI DER, base64url): the key that
    /// certified the chain it presented.
    site_key: String,
    /// Where the introducing site's peer gateway listens.
    host: String,
    port: u16,
}

fn hostlike(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
}

// ------------------------------------------------------------ answering side

/// One connection on the peer port: the handshake (a client chain certified
/// by a site key is required), then one `introduce` request within the
/// introduction timeout of the accept. Valid: answer and close. Anything
/// else: close without a byte, nothing more read.
pub(crate) async fn answer(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    mut permit: ConnPermit,
    accepted_at: Instant,
) {
    let _ = tcp.set_nodelay(true);
    let deadline = accepted_at + inner.settings.introduce_timeout;
    let Some(certified) = inner.certified.load_full() else {
        return;
    };
    let within = inner.settings.handshake_timeout;
    let handshake_deadline = deadline.min(Instant::now() + within);
    // The ClientHello says which dialog this is: a server name naming a
    // user opens a peer session, anything else is a ticket connection.
    let start = match tokio::time::timeout_at(
        handshake_deadline,
        LazyConfigAcceptor::new(Acceptor::default(), tcp),
    )
    .await
    {
        Ok(Ok(start)) => start,
        _ => return,
    };
    if let Some(name) = start.client_hello().server_name().map(str::to_owned)
        && name.ends_with(crate::session::SUFFIX)
    {
        if let Some(chip_id) = crate::session::chip_id_of(&name) {
            crate::session::answer(inner, start, chip_id, permit, handshake_deadline, peer).await;
        }
        return;
    }
    let tls = tokio::time::timeout_at(
        handshake_deadline,
        start.into_stream(certified.ticket_server.clone()),
    )
    .await;
    permit.handshake_done();
    let tls = match tls {
        Ok(Ok(tls)) => {
            chipsite_tls::ack_now(tls.get_ref().0);
            tls
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "peer handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "peer handshake timed out");
            return;
        }
    };
    // The handshake checked the chain; take the key that certified it.
    let chain_key = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| chipsite_external_tls::site_key_of_chain(c, UnixTime::now()));
    let Some(Ok(chain_key)) = chain_key else {
        return;
    };
    let limits = Limits {
        idle: inner.settings.introduce_timeout,
        frame: inner.settings.introduce_timeout,
        ..inner.settings.limits
    };
    let mut reader = FrameReader::new(tls, limits);
    let Ok(Ok(Some(frame))) = tokio::time::timeout_at(deadline, reader.next_frame()).await else {
        tracing::debug!(%peer, "no introduction");
        return;
    };
    match introduce(&inner, &frame, &chain_key, peer).await {
        Ok((id, result)) => {
            let stream = reader.get_mut();
            let within = inner.settings.write_timeout;
            if write_frame(stream, &Response::result(id, result).to_frame(), within)
                .await
                .is_ok()
            {
                close(stream, within).await;
            }
        }
        Err(why) => tracing::info!(%peer, why, "tally ticket introduction refused (closed without a word)"),
    }
}

async fn introduce(
    inner: &Inner,
    frame: &str,
    chain_key: &[u8],
    peer: SocketAddr,
) -> Result<(Value, Value), &'static str> {
    let Ok(Incoming::Request(req)) = rpc::parse(frame) else {
        return Err("not a JSON-RPC request");
    };
    // A request without a token spends nothing and is not an attempt; one
    // with a token burns it, whatever else is wrong with the request.
    let Some(token) = req.params.get("token").and_then(Value::as_str) else {
        return Err("no token");
    };
    let source = peer.ip().to_string();
    let Some(attempt) = inner.throttle.begin(&source) else {
        return Err("too many failed attempts from this source");
    };
    let result = introduce_checked(inner, &req, token, chain_key, &source).await;
    if result.is_ok() {
        attempt.succeeded();
    }
    result
}

async fn introduce_checked(
    inner: &Inner,
    req: &chipsite_wire::Request,
    token: &str,
    chain_key: &[u8],
    source: &str,
) -> Result<(Value, Value), &'static str> {
    let claimed_user = req.params.get("user").and_then(Value::as_str).unwrap_or("");
    // Judge the request first, so that the ticket's audit says why it was
    // refused.
    let judged: Result<(IntroduceParams, Vec<u8>), &'static str> = (|| {
        if req.method != "introduce" {
            return Err("not an introduce request");
        }
        let p: IntroduceParams = serde_json::from_value(req.params.clone()).map_err(|_| "bad parameters")?;
        if !is_chip_id(&p.user) || !is_chip_id(&p.chip_id) {
            return Err("not a CHIP ID");
        }
        if !hostlike(&p.host) || p.port == 0 {
            return Err("bad host or port");
        }
        let key = URL_SAFE_NO_PAD
            .decode(p.site_key.as_bytes())
            .map_err(|_| "site key not base64url")?;
        if key != chain_key {
            return Err("the site key is not the one that certified the presented chain");
        }
        Ok((p, key))
    })();
    // What this site says of it (a failure to find out spends nothing).
    let refusal = match &judged {
        Err(_) => "request",
        Ok((p, key)) => {
            // A lockdown (the user's or the site's) first, so the audit
            // says "locked" for both.
            if inner
                .locked(&p.user)
                .await
                .map_err(|_| "lockdown state unavailable")?
            {
                "locked"
            } else if inner
                .refuses_peers(true)
                .await
                .map_err(|_| "state unavailable")?
                .is_some()
            {
                "stopped"
            } else if known_with_another_key(inner, &p.chip_id, &p.host, key)
                .await
                .map_err(|_| "peer keys unavailable")?
            {
                "key_conflict"
            } else {
                ""
            }
        }
    };
    let redeemed = inner
        .tickets
        .clone()
        .redeem_ticket(tk::RedeemTicketRequest {
            kind: tk::TicketKind::Tally as i32,
            token: token.to_owned(),
            chip_id: claimed_user.to_owned(),
            source: source.to_owned(),
            refusal: refusal.to_owned(),
        })
        .await
        .map_err(|_| "ticket refused")?
        .into_inner();
    let (p, key) = judged?;
    if !refusal.is_empty() {
        return Err("refused by this site (stopped, sealed, locked down, or another key known)");
    }
    if redeemed.chip_id != p.user {
        return Err("ticket of another user");
    }
    inner
        .vault
        .clone()
        .register_peer_key(kv::RegisterPeerKeyRequest {
            peer_chip_id: p.chip_id.clone(),
            peer_host: p.host.clone(),
            public_key: key.clone(),
        })
        .await
        .map_err(|_| "key-vault refused the peer key")?;
    // Sessions naming this user see the new key at once on this replica.
    if let Ok(mut cache) = inner.session_configs.lock() {
        cache.remove(&p.chip_id);
    }
    record_link(inner, &p.user, &p.chip_id, &p.host, p.port, &key, "issued")
        .await
        .map_err(|_| "the link was not recorded")?;
    inner.contact(&key, "ok");
    tracing::info!(
        user = p.user,
        peer = p.chip_id,
        host = p.host,
        "tally ticket redeemed by a peer site"
    );
    inner
        .alarm(
            &p.user,
            format!(
                "{} at {}:{} redeemed your tally ticket: you can now keep a tally with them",
                p.chip_id, p.host, p.port
            ),
        )
        .await;
    Ok((
        req.id.clone(),
        json!({"introduced": true, "user": p.user, "chip_id": p.chip_id}),
    ))
}

/// Whether key-vault knows `chip_id@host` with a key other than `key`.
async fn known_with_another_key(
    inner: &Inner,
    chip_id: &str,
    host: &str,
    key: &[u8],
) -> Result<bool, PeerError> {
    match inner
        .vault
        .clone()
        .get_peer_key(kv::GetPeerKeyRequest {
            peer_chip_id: chip_id.to_owned(),
            peer_host: host.to_owned(),
        })
        .await
    {
        Ok(known) => Ok(known.into_inner().public_key != key),
        Err(s) if code_of(&s) == SiteCode::NotFound => Ok(false),
        Err(s) => Err(PeerError::Upstream(s.message().to_owned())),
    }
}

async fn record_link(
    inner: &Inner,
    chip_id: &str,
    peer_chip_id: &str,
    host: &str,
    port: u16,
    key: &[u8],
    via: &str,
) -> Result<link::Model, PeerError> {
    let now = chipsite_store::now_ms();
    let pin = pin_of_spki(key);
    let row = link::ActiveModel {
        chip_id: Set(chip_id.to_owned()),
        peer_chip_id: Set(peer_chip_id.to_owned()),
        peer_host: Set(host.to_owned()),
        peer_port: Set(i32::from(port)),
        peer_site_key: Set(key.to_vec()),
        peer_site_pin: Set(pin.clone()),
        via: Set(via.to_owned()),
        created_at_ms: Set(now),
        updated_at_ms: Set(now),
    };
    link::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                link::Column::ChipId,
                link::Column::PeerChipId,
                link::Column::PeerSitePin,
            ])
            .update_columns([
                link::Column::PeerHost,
                link::Column::PeerPort,
                link::Column::UpdatedAtMs,
            ])
            .to_owned(),
        )
        .exec_without_returning(&inner.db)
        .await?;
    link::Entity::find_by_id((chip_id.to_owned(), peer_chip_id.to_owned(), pin))
        .one(&inner.db)
        .await?
        .ok_or_else(|| PeerError::Upstream("the link just recorded is gone".into()))
}

// ------------------------------------------------------------ redeeming side

/// Our user `chip_id` hands in another site's tally ticket: dial that site
/// pinned to the ticket's key, introduce this site and the user, and on OK
/// learn the site's key and record the link.
pub(crate) async fn redeem(inner: &Inner, chip_id: &str, text: &str) -> Result<link::Model, PeerError> {
    let bad = |e: chipsite_model::ParseError| PeerError::InvalidArgument(format!("not a tally ticket: {e}"));
    let text = text.trim();
    let ticket = if text.starts_with('{') {
        PublishedTicket::from_json(text).map_err(bad)?
    } else {
        PublishedTicket::from_uri(text).map_err(bad)?
    };
    ticket.validate().map_err(bad)?;
    if TicketKind::parse(&ticket.kind) != Some(TicketKind::Tally) {
        return Err(PeerError::InvalidArgument(
            "not a tally ticket: a user ticket is for the app".into(),
        ));
    }
    let (Some(user), Some(expires)) = (ticket.chip_id.clone(), ticket.expires) else {
        return Err(PeerError::InvalidArgument(
            "not a tally ticket: it names no user".into(),
        ));
    };
    if expires.saturating_mul(1000) <= chipsite_store::now_ms() {
        return Err(PeerError::InvalidArgument("the tally ticket has expired".into()));
    }
    let their_key = URL_SAFE_NO_PAD
        .decode(ticket.site_key.as_bytes())
        .map_err(|_| PeerError::InvalidArgument("not a tally ticket: bad site key".into()))?;
    if let Some(why) = inner.refuses_peers(true).await? {
        return Err(PeerError::NotNow(format!(
            "this site cannot reach peer sites now: {why}"
        )));
    }
    if inner.locked(chip_id).await? {
        return Err(PeerError::LockedDown("locked down".into()));
    }
    let Some(certified) = inner.certified.load_full() else {
        return Err(PeerError::NotNow("the peer gateway is not certified yet".into()));
    };
    if their_key == certified.site_key {
        return Err(PeerError::InvalidArgument(
            "this is a ticket of this site: tallies are kept with users of other sites".into(),
        ));
    }
    if known_with_another_key(inner, &user, &ticket.host, &their_key).await? {
        return Err(PeerError::AlreadyExists(format!(
            "this site knows {user}@{} with another site key",
            ticket.host
        )));
    }
    let (host, port) = inner.own_address().await?;
    if port == 0 || !hostlike(&host) {
        // The other site would refuse the introduction and the ticket
        // would be spent: say so before dialing.
        return Err(PeerError::NotNow(
            "this site does not say where its peer gateway listens (peer_gateway.host and peer_gateway.port)"
                .into(),
        ));
    }
    let request = rpc_request(&IntroduceParams {
        token: ticket.token.clone(),
        user: user.clone(),
        chip_id: chip_id.to_owned(),
        site_key: URL_SAFE_NO_PAD.encode(&certified.site_key),
        host,
        port,
    });
    let within = inner.settings.dial_timeout;
    let introduced = tokio::time::timeout(
        within,
        introduce_to(&certified, &ticket, &their_key, &request, inner),
    )
    .await
    .map_err(|_| PeerError::Unreachable(format!("no answer within {} s", within.as_secs())))
    .and_then(|r| r);
    inner.contact(
        &their_key,
        &match &introduced {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.to_string(),
        },
    );
    introduced?;
    match inner
        .vault
        .clone()
        .register_peer_key(kv::RegisterPeerKeyRequest {
            peer_chip_id: user.clone(),
            peer_host: ticket.host.clone(),
            public_key: their_key.clone(),
        })
        .await
    {
        Ok(_) => {
            if let Ok(mut cache) = inner.session_configs.lock() {
                cache.remove(&user);
            }
        }
        Err(s) if code_of(&s) == SiteCode::AlreadyExists => {
            return Err(PeerError::AlreadyExists(s.message().to_owned()));
        }
        Err(s) => return Err(PeerError::Upstream(s.message().to_owned())),
    }
    let link = record_link(
        inner,
        chip_id,
        &user,
        &ticket.host,
        ticket.port,
        &their_key,
        "redeemed",
    )
    .await?;
    tracing::info!(
        user = chip_id,
        peer = user,
        host = ticket.host,
        "tally ticket of a peer site redeemed"
    );
    inner
        .alarm(
            chip_id,
            format!(
                "You are linked with {user} at {}:{}: you can now keep a tally with them",
                ticket.host, ticket.port
            ),
        )
        .await;
    Ok(link)
}

fn rpc_request(p: &IntroduceParams) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "introduce", "params": p}).to_string()
}

/// Dial, check the other site's chain against the ticket's key (before a
/// byte of the request is sent), send the introduction, read the answer.
async fn introduce_to(
    certified: &crate::Certified,
    ticket: &PublishedTicket,
    their_key: &[u8],
    request: &str,
    inner: &Inner,
) -> Result<(), PeerError> {
    let config = certified
        .dialing(their_key)
        .map_err(|e| PeerError::InvalidArgument(format!("not a tally ticket: {e}")))?;
    let name = ServerName::try_from(ticket.host.clone())
        .map_err(|_| PeerError::InvalidArgument("not a tally ticket: bad host".into()))?;
    let tcp = TcpStream::connect((ticket.host.as_str(), ticket.port))
        .await
        .map_err(|e| PeerError::Unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        // Another key (a man in the middle, or the wrong site): nothing sent.
        .map_err(|e| PeerError::Unreachable(format!("TLS with the other site failed: {e}")))?;
    let mut reader = FrameReader::new(tls, inner.settings.limits);
    write_frame(reader.get_mut(), request, inner.settings.write_timeout)
        .await
        .map_err(|e| PeerError::Unreachable(e.to_string()))?;
    let frame = match reader.next_frame().await {
        Ok(Some(frame)) => frame,
        // Closed without an answer: refused (section 14 never says why).
        Ok(None) | Err(_) => return Err(PeerError::Refused),
    };
    match rpc::parse_from_server(&frame) {
        Ok(Ok(Response { outcome: Ok(r), .. })) if r.get("introduced") == Some(&Value::Bool(true)) => Ok(()),
        _ => Err(PeerError::Refused),
    }
}
