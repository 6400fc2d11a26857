//! PeerGateway gRPC: mapping to and from protobuf, and who may call what.

use std::sync::Arc;

use chipsite_proto::peer::v1::{self as pb, peer_gateway_server::PeerGateway as PeerGatewayRpc};
use chipsite_tls::{Policy, identity as id};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tonic::{Request, Response, Status};

use crate::{PeerError, PeerGateway, store::link};

/// Which internal identities may call which PeerGateway RPC.
pub fn policy() -> Policy {
    const S: &str = "/chipsite.peer.v1.PeerGateway/";
    Policy::new()
        .allow(&format!("{S}RedeemTallyTicket"), &[id::USER_GATEWAY])
        .allow(&format!("{S}ListLinks"), &[id::ADMIN, id::USER_GATEWAY])
        .allow(&format!("{S}Ping"), &[id::ADMIN])
        .allow(&format!("{S}ListPeers"), &[id::ADMIN])
}

pub(crate) fn link_pb(l: link::Model) -> pb::PeerLink {
    pb::PeerLink {
        chip_id: l.chip_id,
        peer_chip_id: l.peer_chip_id,
        peer_host: l.peer_host,
        peer_port: u32::try_from(l.peer_port).unwrap_or(0),
        peer_site_key: l.peer_site_key,
        peer_site_pin: l.peer_site_pin,
        created_at_ms: l.created_at_ms,
        via: l.via,
    }
}

#[derive(Debug, Clone)]
pub struct PeerGatewayGrpc(pub Arc<PeerGateway>);

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl PeerGatewayRpc for PeerGatewayGrpc {
    async fn redeem_tally_ticket(&self, req: Request<pb::RedeemTallyTicketRequest>) -> R<pb::PeerLink> {
        let req = req.into_inner();
        if !chipsite_model::is_chip_id(&req.chip_id) {
            return Err(PeerError::InvalidArgument("chip_id is not a CHIP ID".into()).into());
        }
        let link = self.0.redeem_tally_ticket(&req.chip_id, &req.ticket).await?;
        Ok(Response::new(link_pb(link)))
    }

    async fn ping(&self, req: Request<pb::PingRequest>) -> R<pb::PingResponse> {
        let req = req.into_inner();
        let (setup, rtt) = self.0.ping(&req.chip_id, &req.peer_chip_id).await?;
        let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Ok(Response::new(pb::PingResponse {
            setup_ms: ms(setup),
            rtt_ms: ms(rtt),
        }))
    }

    async fn list_peers(&self, _: Request<pb::ListPeersRequest>) -> R<pb::ListPeersResponse> {
        let links = link::Entity::find()
            .order_by_desc(link::Column::UpdatedAtMs)
            .all(self.0.db())
            .await
            .map_err(PeerError::from)?;
        // What waits in the tally outbox, per site (none known when the
        // tally service does not answer: the list still shows the sites).
        let depth = self.0.outbox_depth().await.unwrap_or_default();
        let mut sites: Vec<pb::PeerSite> = Vec::new();
        for l in links {
            let at = match sites.iter().position(|s| s.site_pin == l.peer_site_pin) {
                Some(at) => at,
                None => {
                    let (last_contact_ms, last_outcome) = self.0.last_contact(&l.peer_site_pin);
                    let (sessions_out, sessions_in) = self.0.open_sessions(&l.peer_site_pin);
                    sites.push(pb::PeerSite {
                        site_pin: l.peer_site_pin.clone(),
                        site_key: l.peer_site_key.clone(),
                        // The newest link's address is the most recently confirmed.
                        host: l.peer_host.clone(),
                        port: u32::try_from(l.peer_port).unwrap_or(0),
                        links: vec![],
                        last_contact_ms,
                        last_outcome,
                        outbox_depth: depth.get(&l.peer_site_pin).copied().unwrap_or(0),
                        sessions_out,
                        sessions_in,
                    });
                    sites.len() - 1
                }
            };
            sites[at].links.push(link_pb(l));
        }
        sites.sort_by(|a, b| (&a.host, a.port, &a.site_pin).cmp(&(&b.host, b.port, &b.site_pin)));
        Ok(Response::new(pb::ListPeersResponse { sites }))
    }

    async fn list_links(&self, req: Request<pb::ListLinksRequest>) -> R<pb::ListLinksResponse> {
        let req = req.into_inner();
        let limit = match req.limit {
            0 => 100,
            n => u64::from(n.min(1000)),
        };
        let mut q = link::Entity::find();
        if !req.chip_id.is_empty() {
            q = q.filter(link::Column::ChipId.eq(req.chip_id));
        }
        let links = q
            .order_by_asc(link::Column::CreatedAtMs)
            .order_by_asc(link::Column::ChipId)
            .limit(limit)
            .all(self.0.db())
            .await
            .map_err(PeerError::from)?;
        Ok(Response::new(pb::ListLinksResponse {
            links: links.into_iter().map(link_pb).collect(),
        }))
    }
}

/// Serve the PeerGateway RPCs on `listener` (internal mutual TLS) until `shutdown`.
pub async fn serve_grpc(
    gateway: Arc<PeerGateway>,
    listener: tokio::net::TcpListener,
    tls: Arc<chipsite_tls::ReloadableTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), chipsite_grpc_server::ServeError> {
    type S = pb::peer_gateway_server::PeerGatewayServer<PeerGatewayGrpc>;
    let svc = S::new(PeerGatewayGrpc(gateway));
    chipsite_grpc_server::serve_with!([svc => S], policy(), true, listener, tls, shutdown)
}
