//! Tallies gRPC: mapping to and from protobuf, and who may call what.

use std::{sync::Arc, time::Duration};

use chipsite_proto::tally::v1::{self as pb, tallies_server::Tallies as TalliesRpc};
use chipsite_tls::{Policy, identity as id};
use tonic::{Request, Response, Status};

use crate::{Outcome, Tallies, TallyError, TallyView, store};

/// Which internal identities may call which Tallies RPC.
/// Steps in one `ReceiveMany` at most (a peer gateway batches up to 64).
const MAX_RECEIVE: usize = 256;

pub fn policy() -> Policy {
    const S: &str = "/chipsite.tally.v1.Tallies/";
    let m = |name: &str| format!("{S}{name}");
    Policy::new()
        .allow(&m("Submit"), &[id::USER_GATEWAY])
        .allow(&m("ReceiveMany"), &[id::PEER_GATEWAY])
        .allow(&m("ListTallies"), &[id::USER_GATEWAY, id::ADMIN])
        .allow(&m("NextOutgoing"), &[id::PEER_GATEWAY])
        .allow(&m("Settle"), &[id::PEER_GATEWAY])
        .allow(&m("SettleMany"), &[id::PEER_GATEWAY])
        .allow(&m("OutboxDepth"), &[id::PEER_GATEWAY])
}

fn step_pb(s: store::step::Model) -> pb::Step {
    pb::Step {
        seq: u32::try_from(s.seq).unwrap_or(0),
        kind: s.kind,
        signer_chip_id: s.signer_chip_id,
        signer_site_pin: s.signer_site_pin,
        doc: s.doc,
        sig: s.sig,
        signer_key: s.signer_key,
        hash: s.hash,
        recorded_at_ms: s.recorded_at_ms,
        state: s.state_after,
    }
}

pub(crate) fn tally_pb(v: TallyView) -> pb::Tally {
    let t = v.tally;
    pb::Tally {
        id: t.id,
        chip_id: t.chip_id,
        peer_chip_id: t.peer_chip_id,
        peer_site_pin: t.peer_site_pin,
        role: t.role,
        state: t.state,
        terms: t.terms,
        steps: v.steps.into_iter().map(step_pb).collect(),
        created_at_ms: t.created_at_ms,
        updated_at_ms: t.updated_at_ms,
        delivery: t.delivery,
    }
}

fn chip_id(s: &str) -> Result<(), Status> {
    if chipsite_model::is_chip_id(s) {
        Ok(())
    } else {
        Err(TallyError::InvalidArgument("chip_id is not a CHIP ID".into()).into())
    }
}

#[derive(Debug, Clone)]
pub struct TalliesGrpc(pub Arc<Tallies>);

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl TalliesRpc for TalliesGrpc {
    async fn submit(&self, req: Request<pb::SubmitRequest>) -> R<pb::Tally> {
        let req = req.into_inner();
        chip_id(&req.chip_id)?;
        let applied = self.0.submit(&req.chip_id, &req.step).await?;
        let view = applied
            .view
            .ok_or_else(|| TallyError::NotFound(format!("no tally {}", applied.tally_id)))?;
        Ok(Response::new(tally_pb(view)))
    }

    async fn receive_many(&self, req: Request<pb::ReceiveManyRequest>) -> R<pb::ReceiveManyResponse> {
        let req = req.into_inner();
        if req.steps.len() > MAX_RECEIVE {
            return Err(
                crate::TallyError::InvalidArgument(format!("at most {MAX_RECEIVE} steps at once")).into(),
            );
        }
        let items: Vec<crate::Received<'_>> = req
            .steps
            .iter()
            .map(|r| crate::Received {
                peer_site_pin: &r.peer_site_pin,
                peer_chip_id: &r.peer_chip_id,
                idempotency_key: &r.idempotency_key,
                step: &r.step,
            })
            .collect();
        let outcomes = self
            .0
            .receive_many(&items)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(applied) => pb::ReceiveOutcome {
                    applied: Some(pb::ReceiveResponse {
                        tally: Some(pb::Tally {
                            id: applied.tally_id,
                            state: applied.state.clone(),
                            ..Default::default()
                        }),
                        fresh: applied.fresh,
                        seq: applied.seq,
                        state: applied.state,
                    }),
                    ..Default::default()
                },
                Err(e) => {
                    let code = e.code();
                    let message = if code == chipsite_model::ErrorCode::Internal {
                        tracing::error!(error = %e, "receiving a tally step");
                        "internal error".to_owned()
                    } else {
                        e.to_string()
                    };
                    pb::ReceiveOutcome {
                        applied: None,
                        code: code.as_str().to_owned(),
                        message,
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::ReceiveManyResponse { outcomes }))
    }

    async fn list_tallies(&self, req: Request<pb::ListTalliesRequest>) -> R<pb::ListTalliesResponse> {
        let req = req.into_inner();
        chip_id(&req.chip_id)?;
        let limit = match req.limit {
            0 => 100,
            n => u64::from(n.min(1000)),
        };
        let list = self.0.list(&req.chip_id, limit).await?;
        Ok(Response::new(pb::ListTalliesResponse {
            tallies: list.into_iter().map(tally_pb).collect(),
        }))
    }

    async fn next_outgoing(&self, req: Request<pb::NextOutgoingRequest>) -> R<pb::NextOutgoingResponse> {
        let req = req.into_inner();
        let max = match req.max {
            0 => 64,
            n => usize::try_from(n.min(1024)).unwrap_or(64),
        };
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(5000)));
        let messages = self.0.next_outgoing(max, wait).await?;
        Ok(Response::new(pb::NextOutgoingResponse {
            messages: messages
                .into_iter()
                .map(|m| pb::Outgoing {
                    id: m.id,
                    idempotency_key: m.idempotency_key,
                    chip_id: m.chip_id,
                    peer_chip_id: m.peer_chip_id,
                    peer_site_pin: m.peer_site_pin,
                    tally_id: m.tally_id,
                    seq: u32::try_from(m.seq).unwrap_or(0),
                    step: m.step,
                    attempts: u32::try_from(m.attempts).unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn settle(&self, req: Request<pb::SettleRequest>) -> R<pb::SettleResponse> {
        let req = req.into_inner();
        self.0
            .settle(&[(req.id, outcome(req.outcome)?, req.error)])
            .await?;
        Ok(Response::new(pb::SettleResponse {}))
    }

    async fn settle_many(&self, req: Request<pb::SettleManyRequest>) -> R<pb::SettleResponse> {
        let many = req
            .into_inner()
            .settlements
            .into_iter()
            .map(|s| Ok((s.id, outcome(s.outcome)?, s.error)))
            .collect::<Result<Vec<_>, Status>>()?;
        if many.len() > 1024 {
            return Err(TallyError::InvalidArgument("at most 1024 settlements at a time".into()).into());
        }
        self.0.settle(&many).await?;
        Ok(Response::new(pb::SettleResponse {}))
    }

    async fn outbox_depth(&self, _: Request<pb::OutboxDepthRequest>) -> R<pb::OutboxDepthResponse> {
        Ok(Response::new(pb::OutboxDepthResponse {
            by_site_pin: self.0.outbox_depth().await?,
        }))
    }
}

fn outcome(o: i32) -> Result<Outcome, Status> {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Delivered) => Ok(Outcome::Delivered),
        Ok(pb::Outcome::Retry) => Ok(Outcome::Retry),
        Ok(pb::Outcome::Refused) => Ok(Outcome::Refused),
        _ => Err(TallyError::InvalidArgument("outcome must be set".into()).into()),
    }
}

/// Serve the Tallies RPCs on `listener` (internal mutual TLS) until `shutdown`.
pub async fn serve(
    tallies: Arc<Tallies>,
    listener: tokio::net::TcpListener,
    tls: Arc<chipsite_tls::ReloadableTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), chipsite_grpc_server::ServeError> {
    type S = pb::tallies_server::TalliesServer<TalliesGrpc>;
    let svc = S::new(TalliesGrpc(tallies));
    chipsite_grpc_server::serve_with!([svc => S], policy(), true, listener, tls, shutdown)
}
