//! KeyVault gRPC: mapping to and from protobuf, and who may call what.

use std::{sync::Arc, time::Duration};

use chipsite_proto::keyvault::v1::{self as pb, key_vault_server::KeyVault as KeyVaultRpc};
use chipsite_tls::{Policy, identity as id};
use tonic::{Request, Response, Status};

use crate::KeyVault;

fn peer_key_pb(k: crate::store::peer_key::Model) -> pb::PeerKey {
    pb::PeerKey {
        peer_chip_id: k.peer_chip_id,
        peer_host: k.peer_host,
        public_key: k.public_key,
        registered_at_ms: k.registered_at_ms,
    }
}

/// Which internal identities may call which KeyVault RPC.
pub fn policy() -> Policy {
    const S: &str = "/chipsite.keyvault.v1.KeyVault/";
    let m = |name: &str| format!("{S}{name}");
    Policy::new()
        .allow(
            &m("GetStatus"),
            &[
                id::ADMIN,
                id::TICKET,
                id::USER_GATEWAY,
                id::PEER_GATEWAY,
                id::TALLY,
            ],
        )
        .allow(&m("Unseal"), &[id::ADMIN])
        .allow(&m("Seal"), &[id::ADMIN])
        .allow(&m("CreateSiteKey"), &[id::ADMIN])
        .allow(&m("ChangePassphrase"), &[id::ADMIN])
        .allow(&m("ImportSiteKey"), &[id::ADMIN])
        .allow(&m("ExportSiteKey"), &[id::ADMIN])
        .allow(
            &m("IssueServiceCertificate"),
            &[id::USER_GATEWAY, id::PEER_GATEWAY],
        )
        .allow(&m("RegisterUserKey"), &[id::USER_GATEWAY, id::ADMIN])
        .allow(&m("GetUserKey"), &[id::USER_GATEWAY, id::ADMIN, id::TALLY])
        .allow(&m("DeleteUserKey"), &[id::ADMIN])
        .allow(&m("UsersWithKeys"), &[id::ADMIN])
        .allow(&m("RegisterPeerKey"), &[id::PEER_GATEWAY])
        .allow(&m("GetPeerKey"), &[id::PEER_GATEWAY])
        .allow(&m("ListPeerKeys"), &[id::PEER_GATEWAY])
}

#[derive(Debug, Clone)]
pub struct KeyVaultGrpc(pub Arc<KeyVault>);

fn status_pb(s: crate::Status) -> pb::VaultStatus {
    pb::VaultStatus {
        has_key: s.has_key,
        sealed: s.sealed,
        site_public_key: s.site_public_key,
        site_key_pin: s.site_key_pin,
        key_created_at_ms: s.key_created_at_ms,
        site_certificate: s.site_certificate,
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl KeyVaultRpc for KeyVaultGrpc {
    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> R<pb::VaultStatus> {
        Ok(Response::new(status_pb(self.0.status().await?)))
    }

    async fn unseal(&self, req: Request<pb::UnsealRequest>) -> R<pb::VaultStatus> {
        Ok(Response::new(status_pb(
            self.0.unseal(&req.into_inner().passphrase).await?,
        )))
    }

    async fn seal(&self, _: Request<pb::SealRequest>) -> R<pb::VaultStatus> {
        Ok(Response::new(status_pb(self.0.seal().await?)))
    }

    async fn create_site_key(&self, req: Request<pb::CreateSiteKeyRequest>) -> R<pb::VaultStatus> {
        let req = req.into_inner();
        Ok(Response::new(status_pb(
            self.0
                .create_site_key(&req.passphrase, &req.current_passphrase)
                .await?,
        )))
    }

    async fn change_passphrase(&self, req: Request<pb::ChangePassphraseRequest>) -> R<pb::VaultStatus> {
        let req = req.into_inner();
        Ok(Response::new(status_pb(
            self.0
                .change_passphrase(&req.old_passphrase, &req.new_passphrase)
                .await?,
        )))
    }

    async fn import_site_key(&self, req: Request<pb::ImportSiteKeyRequest>) -> R<pb::VaultStatus> {
        let req = req.into_inner();
        Ok(Response::new(status_pb(
            self.0
                .import_site_key(&req.encrypted_pem, &req.passphrase, &req.current_passphrase)
                .await?,
        )))
    }

    async fn export_site_key(&self, req: Request<pb::ExportSiteKeyRequest>) -> R<pb::ExportSiteKeyResponse> {
        Ok(Response::new(pb::ExportSiteKeyResponse {
            encrypted_pem: self.0.export_site_key(&req.into_inner().passphrase).await?,
        }))
    }

    async fn issue_service_certificate(
        &self,
        req: Request<pb::IssueServiceCertificateRequest>,
    ) -> R<pb::IssueServiceCertificateResponse> {
        let req = req.into_inner();
        let ttl = Duration::from_secs(u64::from(req.ttl_seconds));
        let (chain, not_after_ms) = self
            .0
            .issue_service_certificate(&req.public_key, &req.subject_alt_names, ttl)
            .await?;
        Ok(Response::new(pb::IssueServiceCertificateResponse {
            chain,
            not_after_ms,
        }))
    }

    async fn register_user_key(
        &self,
        req: Request<pb::RegisterUserKeyRequest>,
    ) -> R<pb::RegisterUserKeyResponse> {
        let req = req.into_inner();
        let replaced = self.0.register_user_key(&req.chip_id, &req.public_key).await?;
        Ok(Response::new(pb::RegisterUserKeyResponse { replaced }))
    }

    async fn get_user_key(&self, req: Request<pb::GetUserKeyRequest>) -> R<pb::UserKey> {
        let k = self.0.user_key(&req.into_inner().chip_id).await?;
        Ok(Response::new(pb::UserKey {
            chip_id: k.chip_id,
            public_key: k.public_key,
            registered_at_ms: k.registered_at_ms,
        }))
    }

    async fn users_with_keys(&self, req: Request<pb::UsersWithKeysRequest>) -> R<pb::UsersWithKeysResponse> {
        let ids = req.into_inner().chip_ids;
        if ids.len() > 1000 {
            return Err(crate::VaultError::InvalidArgument("at most 1000 users at once".into()).into());
        }
        Ok(Response::new(pb::UsersWithKeysResponse {
            chip_ids: self.0.users_with_keys(&ids).await?,
        }))
    }

    async fn delete_user_key(&self, req: Request<pb::GetUserKeyRequest>) -> R<pb::DeleteUserKeyResponse> {
        Ok(Response::new(pb::DeleteUserKeyResponse {
            deleted: self.0.delete_user_key(&req.into_inner().chip_id).await?,
        }))
    }

    async fn register_peer_key(
        &self,
        req: Request<pb::RegisterPeerKeyRequest>,
    ) -> R<pb::RegisterPeerKeyResponse> {
        let req = req.into_inner();
        self.0
            .register_peer_key(&req.peer_chip_id, &req.peer_host, &req.public_key)
            .await?;
        Ok(Response::new(pb::RegisterPeerKeyResponse {}))
    }

    async fn get_peer_key(&self, req: Request<pb::GetPeerKeyRequest>) -> R<pb::PeerKey> {
        let req = req.into_inner();
        let k = self.0.peer_key(&req.peer_chip_id, &req.peer_host).await?;
        Ok(Response::new(peer_key_pb(k)))
    }

    async fn list_peer_keys(&self, req: Request<pb::ListPeerKeysRequest>) -> R<pb::ListPeerKeysResponse> {
        let keys = self.0.peer_keys(&req.into_inner().peer_chip_id).await?;
        Ok(Response::new(pb::ListPeerKeysResponse {
            keys: keys.into_iter().map(peer_key_pb).collect(),
        }))
    }
}
