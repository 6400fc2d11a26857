//! Tickets gRPC: mapping to and from protobuf, and who may call what.

use std::{sync::Arc, time::Duration};

use chipsite_proto::status::{ErrorCode, status};
use chipsite_proto::{
    keyvault::v1::{GetStatusRequest, VaultStatus, key_vault_client::KeyVaultClient},
    ticket::v1::{self as pb, tickets_server::Tickets as TicketsRpc},
};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{Caller, Policy, identity as id};
use tonic::{Request, Response, Status};

use crate::{Kind, TicketError, Tickets, store, visible_state};

/// Which internal identities may call which Tickets RPC. The `bench`
/// identity (the benchmark driver, which issues and redeems user tickets
/// directly) is allowed only when `bench` is set: on a dev site.
pub fn policy(bench: bool) -> Policy {
    const S: &str = "/chipsite.ticket.v1.Tickets/";
    let m = |name: &str| format!("{S}{name}");
    let and_bench = |ids: &[&'static str]| {
        let mut ids = ids.to_vec();
        ids.extend(bench.then_some(id::BENCH));
        ids
    };
    Policy::new()
        .allow(&m("IssueTicket"), &and_bench(&[id::ADMIN, id::USER_GATEWAY]))
        .allow(
            &m("RedeemTicket"),
            &and_bench(&[id::USER_GATEWAY, id::PEER_GATEWAY, id::CONSOLE]),
        )
        .allow(&m("ListTickets"), &[id::ADMIN])
        .allow(&m("RevokeTicket"), &[id::ADMIN])
        .allow(&m("ListAudit"), &[id::ADMIN])
}

/// How long the site key read from key-vault is reused when issuing. A key
/// replaced within this window may still be pinned by tickets issued in it;
/// clients then refuse the new key and the ticket must be issued again.
const VAULT_STATUS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

type CachedStatus = Option<(std::time::Instant, VaultStatus)>;

#[derive(Debug, Clone)]
pub struct TicketsGrpc {
    tickets: Arc<Tickets>,
    key_vault: KeyVaultClient<TracedChannel>,
    vault_status: Arc<std::sync::Mutex<CachedStatus>>,
    /// Whether the `bench` identity has its rights (a dev site only).
    bench: bool,
}

impl TicketsGrpc {
    pub fn new(tickets: Arc<Tickets>, key_vault: Channel, bench: bool) -> Self {
        Self {
            tickets,
            key_vault: KeyVaultClient::new(traced(key_vault)),
            vault_status: Default::default(),
            bench,
        }
    }

    /// Whether `caller` is one of `allowed`, or the benchmark driver where
    /// it has rights.
    fn may(&self, caller: &str, allowed: &[&str], bench: bool) -> bool {
        allowed.contains(&caller) || (bench && self.bench && caller == id::BENCH)
    }

    async fn vault_status(&self) -> Result<VaultStatus, Status> {
        if let Some((at, status)) = self
            .vault_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && at.elapsed() < VAULT_STATUS_TTL
        {
            return Ok(status.clone());
        }
        // Not holding the lock across the call: a slow key-vault delays
        // only the calls that need a fresh status.
        let status = self
            .key_vault
            .clone()
            .get_status(GetStatusRequest {})
            .await?
            .into_inner();
        *self.vault_status.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), status.clone()));
        Ok(status)
    }
}

fn kind_of(k: i32) -> Result<Kind, Status> {
    match pb::TicketKind::try_from(k) {
        Ok(pb::TicketKind::User) => Ok(Kind::User),
        Ok(pb::TicketKind::Tally) => Ok(Kind::Tally),
        Ok(pb::TicketKind::Console) => Ok(Kind::Console),
        _ => Err(status(
            ErrorCode::InvalidArgument,
            "kind must be USER, TALLY or CONSOLE",
        )),
    }
}

fn kind_pb(k: &str) -> pb::TicketKind {
    match Kind::parse(k) {
        Some(Kind::User) => pb::TicketKind::User,
        Some(Kind::Tally) => pb::TicketKind::Tally,
        Some(Kind::Console) => pb::TicketKind::Console,
        None => pb::TicketKind::Unspecified,
    }
}

pub(crate) fn info_pb(t: &store::ticket::Model, now_ms: i64) -> pb::TicketInfo {
    pb::TicketInfo {
        id: t.id.clone(),
        kind: kind_pb(&t.kind) as i32,
        chip_id: t.chip_id.clone(),
        host: t.host.clone(),
        port: u32::try_from(t.port).unwrap_or(0),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        state: visible_state(t, now_ms).to_owned(),
        issued_by: t.issued_by.clone(),
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl TicketsRpc for TicketsGrpc {
    async fn issue_ticket(&self, req: Request<pb::IssueTicketRequest>) -> R<pb::IssuedTicket> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let kind = kind_of(req.kind)?;
        // A user's connection ticket is the operator's to issue (admin checks
        // the user first); a gateway issues only tally tickets, for its users.
        let (allowed, bench): (&[&str], bool) = match kind {
            Kind::User => (&[id::ADMIN], true),
            Kind::Tally => (&[id::ADMIN, id::USER_GATEWAY], false),
            Kind::Console => (&[id::ADMIN], false),
        };
        if !self.may(&caller, allowed, bench) {
            return Err(status(
                ErrorCode::Forbidden,
                format!("{caller} may not issue {} tickets", kind.as_str()),
            ));
        }
        let port =
            u16::try_from(req.port).map_err(|_| status(ErrorCode::InvalidArgument, "port out of range"))?;
        let vault = self.vault_status().await?;
        if !vault.has_key {
            return Err(TicketError::FailedPrecondition("the site has no key yet".into()).into());
        }
        let issued = self
            .tickets
            .issue(
                kind,
                &req.chip_id,
                Duration::from_secs(u64::from(req.ttl_seconds)),
                &req.host,
                port,
                // admin issues on an operator's behalf and names them; any
                // other caller is the issuer itself.
                if caller == id::ADMIN && !req.issuer.is_empty() {
                    &req.issuer
                } else {
                    &caller
                },
            )
            .await?;
        Ok(Response::new(pb::IssuedTicket {
            info: Some(info_pb(&issued.ticket, self.tickets.now_ms())),
            token: issued.token,
            site_public_key: vault.site_public_key,
            site_key_pin: vault.site_key_pin,
        }))
    }

    async fn redeem_ticket(&self, req: Request<pb::RedeemTicketRequest>) -> R<pb::RedeemTicketResponse> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        // A malformed kind is refused before anything is claimed: no caller
        // of the site sends one, and honouring it would let any redeemer
        // burn a ticket of any kind.
        let kind = kind_of(req.kind)?;
        // Each redeemer redeems only its own kind: the console cannot spend a
        // user's ticket, nor a gateway an operator's sign-in.
        let (redeemers, bench): (&[&str], bool) = match kind {
            Kind::Console => (&[id::CONSOLE], false),
            Kind::User => (&[id::USER_GATEWAY], true),
            Kind::Tally => (&[id::PEER_GATEWAY, id::USER_GATEWAY], true),
        };
        if !self.may(&caller, redeemers, bench) {
            return Err(status(
                ErrorCode::Forbidden,
                format!("{caller} may not redeem this kind of ticket"),
            ));
        }
        let t = self
            .tickets
            .redeem(
                kind,
                &req.token,
                &req.chip_id,
                &req.source,
                (!req.refusal.is_empty()).then_some(req.refusal.as_str()),
            )
            .await?;
        Ok(Response::new(pb::RedeemTicketResponse {
            ticket_id: t.id,
            chip_id: t.chip_id,
            issued_by: t.issued_by,
        }))
    }

    async fn list_tickets(&self, req: Request<pb::ListTicketsRequest>) -> R<pb::ListTicketsResponse> {
        let req = req.into_inner();
        let chip = (!req.chip_id.is_empty()).then_some(req.chip_id.as_str());
        let limit = if req.limit == 0 { 100 } else { u64::from(req.limit) };
        let list = self.tickets.list(chip, req.include_closed, limit).await?;
        Ok(Response::new(pb::ListTicketsResponse {
            tickets: list.iter().map(|t| info_pb(t, self.tickets.now_ms())).collect(),
        }))
    }

    async fn revoke_ticket(&self, req: Request<pb::RevokeTicketRequest>) -> R<pb::TicketInfo> {
        let revoked = self.tickets.revoke(&req.into_inner().id).await?;
        Ok(Response::new(info_pb(&revoked, self.tickets.now_ms())))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        let req = req.into_inner();
        let ticket = (!req.ticket_id.is_empty()).then_some(req.ticket_id.as_str());
        let limit = if req.limit == 0 { 100 } else { u64::from(req.limit) };
        let records = self
            .tickets
            .audit_log(ticket, limit, &req.contains, req.before_id)
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: records
                .into_iter()
                .map(|r| pb::AuditRecord {
                    id: r.id,
                    ticket_id: r.ticket_id.unwrap_or_default(),
                    outcome: r.outcome,
                    source: r.source,
                    at_ms: r.at_ms,
                    count: r.count,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark driver's rights exist only on a dev site.
    #[test]
    fn the_bench_identity_has_rights_only_on_a_dev_site() {
        for method in ["IssueTicket", "RedeemTicket"] {
            let path = format!("/chipsite.ticket.v1.Tickets/{method}");
            assert!(policy(true).permits(&path, id::BENCH), "{method}");
            assert!(!policy(false).permits(&path, id::BENCH), "{method}");
            assert!(policy(false).permits(&path, id::USER_GATEWAY), "{method}");
        }
    }
}
