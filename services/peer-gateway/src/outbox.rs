//! Tally steps between sites (docs/protocol.md section 14.5), both ways.
//!
//! * **Out:** the tally service keeps the outbox; this gateway asks it for
//!   what is due ([`deliver_forever`]), hands each message to a worker per
//!   link (one session per local user and peer, opened on demand, closed
//!   when idle), and tells the tally service how each delivery went. A
//!   message is settled only after the other site answered, so a crash of
//!   either site leaves it pending, and it is sent again; the other site
//!   applies it once.
//! * **In:** `tally.step` on a peer session ([`receive_many`]): the link must
//!   exist, the local user must not be locked down, and the tally service
//!   checks the signature and the tally's state and records the step.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chipsite_model::ErrorCode as SiteCode;
use chipsite_proto::{status::code_of, tally::v1 as tl};
use chipsite_wire::{ErrorCode, RpcError};
use sea_orm::EntityTrait;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Inner, PeerError, session::Caller, session::PeerSession, store::link};

// ------------------------------------------------------------------- in

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepParams {
    idempotency_key: String,
    step: Value,
}

/// What the tally service's code for a step means on the wire.
fn step_error(code: SiteCode, message: &str) -> RpcError {
    let code = match code {
        SiteCode::InvalidArgument => ErrorCode::InvalidParams,
        SiteCode::Forbidden => ErrorCode::Unauthorized,
        SiteCode::NotFound => ErrorCode::NotFound,
        SiteCode::FailedPrecondition => ErrorCode::Conflict,
        SiteCode::Internal => return RpcError::new(ErrorCode::Internal, "internal error"),
        _ => {
            return RpcError::new(
                ErrorCode::Unavailable,
                "the site cannot take steps now; try again later",
            );
        }
    };
    RpcError::new(code, message)
}

/// `tally.step`: the requests that arrived together on one session (one or
/// more), answered in their order. The link must exist, this site must take
/// peer work and the local user must not be locked down (checked once per
/// local user, the site's state once); the steps are then applied in one
/// call to the tally service, in one transaction there.
pub(crate) async fn receive_many(
    inner: &Inner,
    from: &Caller,
    params: Vec<Value>,
) -> Vec<Result<Value, RpcError>> {
    let unavailable = || {
        RpcError::new(
            ErrorCode::Unavailable,
            "the site cannot tell its state; try again later",
        )
    };
    let mut results: Vec<Option<Result<Value, RpcError>>> = vec![None; params.len()];
    let mut steps = Vec::new();
    // Which local user each step is for, and whether that user may take it.
    let mut users: HashMap<String, Result<(), RpcError>> = HashMap::new();
    let mut site: Option<Result<(), RpcError>> = None;
    for (i, params) in params.into_iter().enumerate() {
        let p: StepParams = match serde_json::from_value(params) {
            Ok(p) => p,
            Err(e) => {
                results[i] = Some(Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("invalid params: {e}"),
                )));
                continue;
            }
        };
        let Some(to) = p
            .step
            .pointer("/doc/to/chip_id")
            .and_then(Value::as_str)
            .filter(|c| chipsite_model::is_chip_id(c))
            .map(str::to_owned)
        else {
            results[i] = Some(Err(RpcError::new(
                ErrorCode::InvalidParams,
                "invalid params: step.doc.to.chip_id",
            )));
            continue;
        };
        if !users.contains_key(&to) {
            let verdict = may_receive(inner, from, &to, &mut site).await;
            users.insert(to.clone(), verdict);
        }
        if let Some(Err(e)) = users.get(&to) {
            results[i] = Some(Err(e.clone()));
            continue;
        }
        steps.push((i, to, p));
    }
    if !steps.is_empty() {
        let request = tl::ReceiveManyRequest {
            steps: steps
                .iter()
                .map(|(_, _, p)| tl::ReceiveRequest {
                    peer_site_pin: from.site_pin.clone(),
                    peer_chip_id: from.chip_id.clone(),
                    idempotency_key: p.idempotency_key.clone(),
                    step: p.step.to_string(),
                })
                .collect(),
        };
        match inner.tally.clone().receive_many(request).await {
            Ok(answer) => {
                let outcomes = answer.into_inner().outcomes;
                for ((i, to, _), outcome) in steps
                    .iter()
                    .zip(outcomes.into_iter().map(Some).chain(std::iter::repeat(None)))
                {
                    results[*i] = Some(match outcome {
                        Some(tl::ReceiveOutcome {
                            applied: Some(answer),
                            ..
                        }) => Ok(applied(inner, from, to, answer)),
                        Some(o) => Err(step_error(
                            SiteCode::parse(&o.code).unwrap_or(SiteCode::Internal),
                            &o.message,
                        )),
                        None => Err(RpcError::new(ErrorCode::Internal, "internal error")),
                    });
                }
            }
            Err(s) => {
                let e = step_error(code_of(&s), s.message());
                for (i, _, _) in &steps {
                    results[*i] = Some(Err(e.clone()));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(unavailable())))
        .collect()
}

/// Whether steps from `from` may reach local user `to`: linked, this site
/// taking peer work (asked once per batch, into `site`), `to` not locked down.
async fn may_receive(
    inner: &Inner,
    from: &Caller,
    to: &str,
    site: &mut Option<Result<(), RpcError>>,
) -> Result<(), RpcError> {
    let unavailable = || {
        RpcError::new(
            ErrorCode::Unavailable,
            "the site cannot tell its state; try again later",
        )
    };
    let linked = link::Entity::find_by_id((to.to_owned(), from.chip_id.clone(), from.site_pin.clone()))
        .one(&inner.db)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "reading links");
            RpcError::new(ErrorCode::Internal, "internal error")
        })?;
    if linked.is_none() {
        return Err(RpcError::new(
            ErrorCode::Unauthorized,
            "no link between these users: redeem a tally ticket first",
        ));
    }
    if site.is_none() {
        // An open session outlives a seal or a stop: each batch asks (the
        // answer may be up to a second old, as for new sessions).
        *site = Some(match inner.refuses_peers(false).await {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(RpcError::new(
                ErrorCode::Unavailable,
                format!("{why}; try again later"),
            )),
            Err(_) => Err(unavailable()),
        });
    }
    if let Some(Err(e)) = site {
        return Err(e.clone());
    }
    match inner.locked(to).await {
        Ok(false) => Ok(()),
        Ok(true) => Err(RpcError::new(
            ErrorCode::LockedDown,
            "the user is locked down; try again later",
        )),
        Err(_) => Err(unavailable()),
    }
}

/// The answer to a step the tally service took; a new one is told to its
/// local user (in the background, with the others of the moment).
fn applied(inner: &Inner, from: &Caller, to: &str, answer: tl::ReceiveResponse) -> Value {
    let tally = answer.tally.unwrap_or_default();
    if answer.fresh {
        let what = match answer.state.as_str() {
            "offered" => "offers you a tally",
            "open" => "accepted your tally",
            "rejected" => "rejected your tally",
            _ => "closed your tally",
        };
        inner.alarm_soon(
            to,
            format!("{} (on site {}) {what} {}", from.chip_id, from.site_pin, tally.id),
        );
    }
    json!({
        "tally": tally.id,
        "seq": answer.seq,
        "state": answer.state,
        "duplicate": !answer.fresh,
    })
}

// ------------------------------------------------------------------ out

/// A session is per local user and peer user on one site.
type Link = (String, String, String);

/// A message handed to a worker, holding its place among those in flight.
type Leased = (tl::Outgoing, tokio::sync::OwnedSemaphorePermit);

/// Messages in flight (leased, not yet settled) at most.
const IN_FLIGHT: usize = 1024;

/// Ask the tally service for due messages and hand them to the workers of
/// their links, for ever. Paused while this site refuses peer work (peer
/// server stopped, vault sealed, site locked down).
pub(crate) async fn deliver_forever(inner: Arc<Inner>) {
    let mut workers: HashMap<Link, mpsc::UnboundedSender<Leased>> = HashMap::new();
    // Messages handed to workers and not yet settled, at most: more are
    // asked for only as these are settled (their leases must not run out
    // while they wait in a worker's queue).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut warned = false;
    loop {
        let paused = match inner.refuses_peers(false).await {
            Ok(None) => inner.certified.load().is_none(),
            Ok(Some(_)) | Err(_) => true,
        };
        if paused {
            let mut running = inner.running.subscribe();
            tokio::select! {
                _ = running.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        if in_flight.available_permits() == 0 {
            // Wait for a settlement.
            drop(in_flight.acquire().await);
            continue;
        }
        let room = u32::try_from(in_flight.available_permits()).unwrap_or(1);
        let due = inner
            .tally
            .clone()
            .next_outgoing(tl::NextOutgoingRequest {
                max: room,
                wait_ms: 1000,
            })
            .await;
        let due = match due {
            Ok(d) => {
                warned = false;
                d.into_inner().messages
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e.message(), "cannot read the tally outbox; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        workers.retain(|_, w| !w.is_closed());
        for m in due {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // Never more than asked for; left leased if it happens.
                break;
            };
            let key = (m.chip_id.clone(), m.peer_chip_id.clone(), m.peer_site_pin.clone());
            let m = (m, permit);
            let m = match workers.get(&key) {
                Some(w) => match w.send(m) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(m)) => m,
                },
                None => m,
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(m);
            tokio::spawn(work(inner.clone(), key.clone(), rx));
            workers.insert(key, tx);
        }
    }
}

/// One link's deliveries, in the order they come, over one session kept
/// open while there is work and closed after `session_idle` without.
async fn work(inner: Arc<Inner>, key: Link, mut rx: mpsc::UnboundedReceiver<Leased>) {
    let mut session: Option<PeerSession> = None;
    loop {
        let first = match tokio::time::timeout(inner.settings.session_idle, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // Idle: take no more, but deliver what came meanwhile.
            Err(_) => {
                rx.close();
                match rx.recv().await {
                    Some(m) => m,
                    None => break,
                }
            }
        };
        // What is queued already goes after it, checked once: this site
        // takes peer work, and the user is not locked down.
        let mut batch = vec![first];
        while batch.len() < 64
            && let Ok(m) = rx.try_recv()
        {
            batch.push(m);
        }
        let not_now = not_now(&inner, &key.0).await;
        let (messages, places): (Vec<tl::Outgoing>, Vec<_>) = batch.into_iter().unzip();
        let outcomes = match &not_now {
            Some(why) => messages
                .iter()
                .map(|_| (tl::Outcome::Retry, why.clone()))
                .collect(),
            None => deliver(&inner, &key, &mut session, &messages).await,
        };
        let mut settled = Vec::with_capacity(messages.len());
        for (m, (outcome, error)) in messages.iter().zip(outcomes) {
            if outcome != tl::Outcome::Delivered {
                tracing::info!(
                    tally = m.tally_id,
                    seq = m.seq,
                    ?outcome,
                    error,
                    "tally step not delivered"
                );
            }
            settled.push(tl::SettleRequest {
                id: m.id,
                outcome: outcome as i32,
                error,
            });
        }
        // One settlement for the batch; their places are free after it.
        let answer = inner
            .tally
            .clone()
            .settle_many(tl::SettleManyRequest { settlements: settled })
            .await;
        if let Err(e) = answer {
            // Left leased: sent again when the leases end, and the other
            // site answers as the first time.
            tracing::warn!(error = %e.message(), "cannot settle tally steps' delivery");
        }
        drop(places);
    }
    rx.close();
    if let Some(s) = session {
        s.close().await;
    }
}

/// Why this site sends nothing for `chip_id` now, if it does not: taken
/// from the outbox just before the peer server stopped (or the site was
/// sealed or locked down), or the user is locked down.
async fn not_now(inner: &Inner, chip_id: &str) -> Option<String> {
    match inner.refuses_peers(false).await {
        Ok(None) => {}
        Ok(Some(why)) => return Some(why.to_owned()),
        Err(e) => return Some(e.to_string()),
    }
    match inner.locked(chip_id).await {
        Ok(false) => None,
        Ok(true) => Some("the user or the site is locked down".into()),
        Err(e) => Some(e.to_string()),
    }
}

/// Send a link's steps (each the head of its tally's queue, so any order
/// among them will do) at once over the open session, or a new one if there
/// is none or it has ended (the other site closes idle sessions). What the
/// other site answered settles each; what it never answered is tried once
/// more on a new session if the old one had been kept open, else later.
async fn deliver(
    inner: &Inner,
    key: &Link,
    session: &mut Option<PeerSession>,
    messages: &[tl::Outgoing],
) -> Vec<(tl::Outcome, String)> {
    let mut outcomes: Vec<Option<(tl::Outcome, String)>> = vec![None; messages.len()];
    let mut pending: Vec<(usize, Value)> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        match serde_json::from_str::<Value>(&m.step) {
            Ok(step) => pending.push((i, json!({"idempotency_key": m.idempotency_key, "step": step}))),
            Err(_) => outcomes[i] = Some((tl::Outcome::Refused, "the stored step is not JSON".into())),
        }
    }
    let mut why = "the other site closed the session".to_owned();
    for _ in 0..2 {
        if pending.is_empty() {
            break;
        }
        let reused = session.is_some();
        if session.is_none() {
            let opened = match link::Entity::find_by_id(key.clone()).one(&inner.db).await {
                Ok(Some(l)) => crate::session::dial(inner, &l)
                    .await
                    .map_err(|e| (tl::Outcome::Retry, e.to_string())),
                Ok(None) => Err((tl::Outcome::Refused, "no link with that user".to_owned())),
                Err(e) => Err((tl::Outcome::Retry, e.to_string())),
            };
            match opened {
                Ok(s) => *session = Some(s),
                Err((outcome, error)) => {
                    for (i, _) in pending.drain(..) {
                        outcomes[i] = Some((outcome, error.clone()));
                    }
                    break;
                }
            }
        }
        let Some(s) = session.as_mut() else { break };
        let params = pending.iter().map(|(_, p)| p.clone()).collect();
        let answers = s
            .call_many("tally.step", params, inner.settings.dial_timeout)
            .await;
        let mut again = Vec::new();
        let mut broken = false;
        for ((i, params), answer) in pending.drain(..).zip(answers) {
            outcomes[i] = Some(match answer {
                Ok(_) => (tl::Outcome::Delivered, String::new()),
                Err(PeerError::Answered { code, message }) => {
                    let later = matches!(
                        ErrorCode::from_code(code),
                        Some(
                            ErrorCode::Unavailable
                                | ErrorCode::LockedDown
                                | ErrorCode::Internal
                                | ErrorCode::RateLimited
                        )
                    );
                    let outcome = if later {
                        tl::Outcome::Retry
                    } else {
                        tl::Outcome::Refused
                    };
                    (outcome, format!("{message} ({code})"))
                }
                Err(e) => {
                    broken = true;
                    why = e.to_string();
                    again.push((i, params));
                    continue;
                }
            });
        }
        if broken {
            *session = None;
            // A session kept open may have been closed by the other side
            // meanwhile: once more on a new one.
            if !reused {
                for (i, _) in again.drain(..) {
                    outcomes[i] = Some((tl::Outcome::Retry, why.clone()));
                }
            }
        }
        pending = again;
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| (tl::Outcome::Retry, why.clone())))
        .collect()
}
