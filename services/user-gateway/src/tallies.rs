//! The user's tallies (docs/protocol.md section 9): listing them, and the
//! user's signed steps, which the tally service checks and records.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::tally::Kind;
use chipsite_proto::status::{ErrorCode as SiteCode, code_of};
use chipsite_proto::{peer::v1 as pr, tally::v1 as tl};
use chipsite_wire::{ErrorCode, RpcError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Inner, conn::params};

/// The most tallies `tally.list` returns.
const LIST_MAX: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepParams {
    step: Value,
}

fn step_json(s: &tl::Step) -> Value {
    json!({
        "seq": s.seq,
        "kind": s.kind,
        "signer": {"chip_id": s.signer_chip_id, "site_pin": s.signer_site_pin},
        "doc": serde_json::from_str::<Value>(&s.doc).unwrap_or(Value::Null),
        "sig": s.sig,
        "signer_key": URL_SAFE_NO_PAD.encode(&s.signer_key),
        "hash": s.hash,
        "state": s.state,
        "recorded_at_ms": s.recorded_at_ms,
    })
}

/// A tally as the user sees it: with its steps, or (`status`) without.
pub(crate) fn tally_json(t: &tl::Tally, with_steps: bool) -> Value {
    let mut v = json!({
        "id": t.id,
        "peer": {"chip_id": t.peer_chip_id, "site_pin": t.peer_site_pin},
        "role": t.role,
        "state": t.state,
        "terms": serde_json::from_str::<Value>(&t.terms).unwrap_or(Value::Null),
        "delivery": t.delivery,
        "created_at_ms": t.created_at_ms,
        "updated_at_ms": t.updated_at_ms,
    });
    if with_steps {
        v["steps"] = t.steps.iter().map(step_json).collect();
    }
    v
}

/// What the tally service's refusal means to the user: its own words,
/// which name what is wrong with the step and hold no secret.
fn step_error(s: &tonic::Status) -> RpcError {
    let code = match code_of(s) {
        SiteCode::InvalidArgument => ErrorCode::InvalidParams,
        SiteCode::Forbidden => ErrorCode::Unauthorized,
        SiteCode::NotFound => ErrorCode::NotFound,
        SiteCode::FailedPrecondition => ErrorCode::Conflict,
        SiteCode::LockedDown => ErrorCode::LockedDown,
        SiteCode::Unavailable | SiteCode::Sealed | SiteCode::NoSiteKey => {
            return RpcError::new(
                ErrorCode::Unavailable,
                "the site cannot take tally steps now; try again later",
            );
        }
        _ => return RpcError::new(ErrorCode::Internal, "internal error"),
    };
    RpcError::new(code, s.message())
}

/// The user's tallies, newest first (for `status`, without their steps).
pub(crate) async fn list(inner: &Inner, chip_id: &str, limit: u32) -> Result<Vec<tl::Tally>, tonic::Status> {
    Ok(inner
        .tally
        .clone()
        .list_tallies(tl::ListTalliesRequest {
            chip_id: chip_id.to_owned(),
            limit,
        })
        .await?
        .into_inner()
        .tallies)
}

/// `tally.list`.
pub(crate) async fn list_method(inner: &Inner, chip_id: &str, p: Value) -> Result<Value, RpcError> {
    let ListParams { limit } = params(p)?;
    if let Some(l) = limit
        && !(1..=LIST_MAX).contains(&l)
    {
        return Err(RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params: limit must be 1 to {LIST_MAX}"),
        ));
    }
    let tallies = list(inner, chip_id, limit.unwrap_or(100))
        .await
        .map_err(|s| step_error(&s))?;
    Ok(json!({"tallies": tallies.iter().map(|t| tally_json(t, true)).collect::<Vec<_>>()}))
}

/// `tally.offer`, `tally.accept`, `tally.reject`, `tally.close`: the
/// user's signed step, whose type must be the method's.
pub(crate) async fn step_method(
    inner: &Inner,
    chip_id: &str,
    kind: Kind,
    p: Value,
) -> Result<Value, RpcError> {
    let StepParams { step } = params(p)?;
    if step.pointer("/doc/type").and_then(Value::as_str) != Some(kind.doc_type()) {
        return Err(RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params: step.doc.type must be {}", kind.doc_type()),
        ));
    }
    if kind == Kind::Offer {
        // An offer goes to a user this user is linked with (a redeemed
        // tally ticket, either way).
        let (to, site) = (
            step.pointer("/doc/to/chip_id")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            step.pointer("/doc/to/site")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let links = inner
            .peer
            .clone()
            .list_links(pr::ListLinksRequest {
                chip_id: chip_id.to_owned(),
                limit: 1000,
            })
            .await
            .map_err(|s| step_error(&s))?
            .into_inner()
            .links;
        if !links
            .iter()
            .any(|l| l.peer_chip_id == to && l.peer_site_pin == site)
        {
            return Err(RpcError::new(
                ErrorCode::NotFound,
                "no link with that user on that site: redeem their tally ticket first (tally.redeem)",
            ));
        }
    }
    let tally = inner
        .tally
        .clone()
        .submit(tl::SubmitRequest {
            chip_id: chip_id.to_owned(),
            step: step.to_string(),
        })
        .await
        .map_err(|s| step_error(&s))?
        .into_inner();
    Ok(json!({"tally": tally_json(&tally, true)}))
}
