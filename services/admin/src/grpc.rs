//! AdminService gRPC: mapping to and from protobuf, orchestration of
//! key-vault and ticket calls, the audit record of every command, and who
//! may call what.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::{PublishedTicket, TicketKind as Kind};
use chipsite_proto::status::{ErrorCode, code_of, status};
use chipsite_proto::{
    admin::v1::{self as pb, admin_service_server::AdminService},
    keyvault::v1::{self as kv, key_vault_client::KeyVaultClient},
    ticket::v1::{self as tk, tickets_client::TicketsClient},
};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::{Caller, Policy, identity as id};
use tonic::{Code, Request, Response, Status};

use crate::{Admin, UserChanges, UserData, store::user};

/// Which internal identities may call which AdminService RPC: the operator
/// and console everything; gateways may read users and lockdown state.
/// UserEvents (served beside it): gateways watch events and handle their
/// users' alarms; the operator, console and benchmark raise alarms.
///
/// The `bench` identity may raise alarms only when `bench` is set (a dev
/// site); the console reads events by listing, it does not `Watch`.
pub fn policy(bench: bool) -> Policy {
    const S: &str = "/chipsite.admin.v1.AdminService/";
    const E: &str = "/chipsite.events.v1.UserEvents/";
    // The peer gateway tells users what peer sites did (a tally ticket
    // redeemed, a step of the other side).
    let mut raisers = vec![id::ADMIN_CLIENT, id::CONSOLE, id::PEER_GATEWAY];
    raisers.extend(bench.then_some(id::BENCH));
    Policy::new()
        .allow(S, &[id::ADMIN_CLIENT, id::CONSOLE])
        .allow(
            &format!("{S}GetUserStatus"),
            &[id::USER_GATEWAY, id::PEER_GATEWAY],
        )
        .allow(&format!("{S}GetLockdown"), &[id::USER_GATEWAY, id::PEER_GATEWAY])
        .allow(
            &format!("{S}GetSiteConfig"),
            &[id::USER_GATEWAY, id::PEER_GATEWAY],
        )
        .allow(&format!("{S}GetPeerServer"), &[id::PEER_GATEWAY])
        .allow(&format!("{E}Watch"), &[id::USER_GATEWAY, id::PEER_GATEWAY])
        .allow(&format!("{E}RaiseAlarms"), &raisers)
        .allow(
            &format!("{E}ListAlarms"),
            &[id::USER_GATEWAY, id::ADMIN_CLIENT, id::CONSOLE],
        )
        .allow(&format!("{E}AckAlarm"), &[id::USER_GATEWAY])
        .allow(&format!("{E}AlarmsDelivered"), &[id::USER_GATEWAY])
        .allow(&format!("{E}KeyChanged"), &[id::USER_GATEWAY])
}

/// Who an audit row names: the caller's identity and, for the operators'
/// identities, the operator it acts for (`console (alice)`).
pub(crate) fn actor<T>(req: &Request<T>) -> Result<String, Status> {
    let caller = Caller::of(req);
    if caller != id::ADMIN_CLIENT && caller != id::CONSOLE {
        return Ok(caller);
    }
    let Some(value) = req.metadata().get(chipsite_model::operator::METADATA) else {
        return Ok(caller);
    };
    match value.to_str() {
        Ok(name) if chipsite_model::operator::valid(name) => Ok(format!("{caller} ({name})")),
        _ => Err(status(
            ErrorCode::InvalidArgument,
            "the operator's name (chipsite-operator) must be 1-48 of letters, digits and . _ @ + -",
        )),
    }
}

#[derive(Debug, Clone)]
pub struct AdminGrpc {
    admin: Arc<Admin>,
    vault: KeyVaultClient<TracedChannel>,
    tickets: TicketsClient<TracedChannel>,
    peers: chipsite_proto::peer::v1::peer_gateway_client::PeerGatewayClient<TracedChannel>,
    tallies: chipsite_proto::tally::v1::tallies_client::TalliesClient<TracedChannel>,
}

impl AdminGrpc {
    pub fn new(admin: Arc<Admin>, calls: crate::Calls) -> Self {
        let crate::Calls {
            key_vault,
            tickets,
            peer_gateway,
            tally,
        } = calls;
        Self {
            admin,
            vault: KeyVaultClient::new(traced(key_vault)),
            tickets: TicketsClient::new(traced(tickets)),
            peers: chipsite_proto::peer::v1::peer_gateway_client::PeerGatewayClient::new(traced(
                peer_gateway,
            )),
            tallies: chipsite_proto::tally::v1::tallies_client::TalliesClient::new(traced(tally)),
        }
    }

    /// Whether key-vault holds a key for `chip_id`.
    async fn has_key(&self, chip_id: &str) -> Result<bool, Status> {
        match self
            .vault
            .clone()
            .get_user_key(kv::GetUserKeyRequest {
                chip_id: chip_id.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if code_of(&s) == ErrorCode::NotFound => Ok(false),
            Err(s) => Err(s),
        }
    }

    /// Have key-vault forget the key of `chip_id`, if it holds one.
    async fn forget_key(&self, chip_id: &str) -> Result<(), Status> {
        self.vault
            .clone()
            .delete_user_key(kv::GetUserKeyRequest {
                chip_id: chip_id.to_owned(),
            })
            .await
            .map(|_| ())
    }

    /// Run one command and leave one audit record of it.
    async fn audited<T, F>(
        &self,
        caller: &str,
        action: &str,
        subject: &str,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Status>>,
    {
        let result = f.await;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(s) => outcome_of(s),
        };
        if let Err(e) = self.admin.audit(caller, action, subject, &outcome).await {
            tracing::error!(error = %e, action, "could not write the admin audit record");
            return Err(status(ErrorCode::Internal, "internal error"));
        }
        result.map(Response::new)
    }

    async fn user_pb(&self, u: user::Model) -> Result<pb::User, Status> {
        let has_key = self.has_key(&u.chip_id).await?;
        Ok(user_view(u, has_key))
    }

    async fn vault_view(&self, s: kv::VaultStatus) -> pb::VaultStatusView {
        pb::VaultStatusView {
            has_key: s.has_key,
            sealed: s.sealed,
            site_key_pin: s.site_key_pin,
            key_created_at_ms: s.key_created_at_ms,
        }
    }
}

fn ticket_pb(t: tk::TicketInfo) -> pb::TicketInfo {
    let kind = match tk::TicketKind::try_from(t.kind) {
        Ok(tk::TicketKind::User) => "user",
        Ok(tk::TicketKind::Tally) => "tally",
        Ok(tk::TicketKind::Console) => "console",
        _ => "unknown",
    };
    pb::TicketInfo {
        id: t.id,
        kind: kind.to_owned(),
        // A console sign-in is for an operator, not a user.
        chip_id: if kind == "console" {
            String::new()
        } else {
            t.chip_id
        },
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        state: t.state,
        issued_by: t.issued_by,
    }
}

type R<T> = Result<Response<T>, Status>;

/// A refused command's audit outcome: its gRPC code and message.
fn outcome_of(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> R<pb::User> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        let contact = r.contact.unwrap_or_default();
        let data = UserData {
            name: r.name,
            address: r.address,
            email: contact.email,
            phone: contact.phone,
        };
        // The user and its audit record commit together; a refusal is
        // audited on its own.
        let (u, audit_id) = match self.admin.create_user(&caller, &r.chip_id, data).await {
            Ok(created) => created,
            Err(e) => {
                let refused = Status::from(e);
                return self
                    .audited(&caller, "create_user", &r.chip_id, async { Err(refused) })
                    .await;
            }
        };
        // A key key-vault still holds for this CHIP ID belongs to no
        // one (a load that did not finish): it must not pass to the new
        // user. If it cannot be checked, nothing is created.
        if let Err(s) = self.forget_key(&u.chip_id).await {
            let undone = self.admin.unload_user(&u.chip_id).await;
            let refused = match undone {
                Ok(()) => status(
                    code_of(&s),
                    format!("key-vault: {}; nothing was created", s.message()),
                ),
                Err(e) => Status::from(e),
            };
            if let Err(e) = self
                .admin
                .set_audit_outcome(audit_id, &outcome_of(&refused))
                .await
            {
                tracing::error!(error = %e, "could not correct the admin audit record of create_user");
                return Err(status(ErrorCode::Internal, "internal error"));
            }
            return Err(refused);
        }
        // Just created, its key just forgotten: it has none.
        Ok(Response::new(user_view(u, false)))
    }

    async fn get_user(&self, req: Request<pb::GetUserRequest>) -> R<pb::User> {
        let u = self.admin.user(&req.into_inner().chip_id).await?;
        Ok(Response::new(self.user_pb(u).await?))
    }

    async fn get_user_status(&self, req: Request<pb::GetUserRequest>) -> R<pb::UserStatus> {
        let (chip_id, name, status, locked, pending) =
            self.admin.user_status(&req.into_inner().chip_id).await?;
        Ok(Response::new(pb::UserStatus {
            chip_id,
            name,
            status,
            locked,
            alarms_pending: u64::try_from(pending).unwrap_or(0),
        }))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        let r = req.into_inner();
        let size = if r.page_size == 0 {
            50
        } else {
            r.page_size.min(1000)
        };
        let page = self
            .admin
            .list_users(
                &crate::UserList {
                    query: &r.query,
                    status: &r.status,
                    locked: r.locked,
                    sort: &r.sort,
                    page_token: &r.page_token,
                },
                u64::from(size),
            )
            .await?;
        let (users, next_page_token, total) = (page.users, page.next_page_token, page.total);
        // Which have keys: one call for the page.
        let with_keys: std::collections::HashSet<String> = self
            .vault
            .clone()
            .users_with_keys(kv::UsersWithKeysRequest {
                chip_ids: users.iter().map(|u| u.chip_id.clone()).collect(),
            })
            .await?
            .into_inner()
            .chip_ids
            .into_iter()
            .collect();
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            let has_key = with_keys.contains(&u.chip_id);
            out.push(user_view(u, has_key));
        }
        Ok(Response::new(pb::ListUsersResponse {
            users: out,
            next_page_token,
            total,
        }))
    }

    async fn update_user(&self, req: Request<pb::UpdateUserRequest>) -> R<pb::User> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "update_user", &r.chip_id.clone(), async {
            let changes = UserChanges {
                name: r.name,
                address: r.address,
                email: r.email,
                phone: r.phone,
                status: r.status,
            };
            let u = self.admin.update_user(&r.chip_id, changes).await?;
            self.user_pb(u).await
        })
        .await
    }

    async fn dump_user(&self, req: Request<pb::DumpUserRequest>) -> R<pb::DumpUserResponse> {
        let caller = actor(&req)?;
        let chip_id = req.into_inner().chip_id;
        self.audited(&caller, "dump_user", &chip_id, async {
            let u = self.admin.user(&chip_id).await?;
            let key = match self
                .vault
                .clone()
                .get_user_key(kv::GetUserKeyRequest {
                    chip_id: chip_id.clone(),
                })
                .await
            {
                Ok(k) => Some(URL_SAFE_NO_PAD.encode(k.into_inner().public_key)),
                Err(s) if s.code() == Code::NotFound => None,
                Err(s) => return Err(s),
            };
            let dump = Admin::dump_of(&u, key);
            let json =
                serde_json::to_string_pretty(&dump).map_err(|e| chipsite_proto::status::internal(&e))?;
            Ok(pb::DumpUserResponse { json })
        })
        .await
    }

    async fn load_user(&self, req: Request<pb::LoadUserRequest>) -> R<pb::User> {
        let caller = actor(&req)?;
        let json = req.into_inner().json;
        let dump = match Admin::parse_dump(&json) {
            Ok(d) => d,
            Err(e) => {
                return self
                    .audited(&caller, "load_user", "", async { Err(e.into()) })
                    .await;
            }
        };
        self.audited(&caller, "load_user", &dump.chip_id.clone(), async {
            // All or nothing, from the operator's side: loading the same dump
            // again after any failure finishes the job (the user found as
            // dumped counts as loaded), and a failure here takes back what
            // this call wrote.
            let (u, inserted) = self.admin.load_user(&dump).await?;
            let key = dump
                .public_key
                .as_ref()
                .map(|k| URL_SAFE_NO_PAD.decode(k).unwrap_or_default());
            if !inserted && self.has_key(&u.chip_id).await? {
                // The user was loaded before and holds a key (perhaps enrolled
                // since): a repeated load never replaces or removes it.
                return self.user_pb(u).await;
            }
            let stored = match &key {
                Some(public_key) => self
                    .vault
                    .clone()
                    .register_user_key(kv::RegisterUserKeyRequest {
                        chip_id: u.chip_id.clone(),
                        public_key: public_key.clone(),
                    })
                    .await
                    .map(|_| ()),
                // A dump without a key: no key may stay behind from before.
                None => self.forget_key(&u.chip_id).await,
            };
            if let Err(s) = stored {
                if inserted {
                    // A registration that timed out may still have
                    // committed: forget it too (best effort; a later
                    // CreateUser forgets it anyway).
                    let _ = self.forget_key(&u.chip_id).await;
                    self.admin.unload_user(&u.chip_id).await?;
                }
                return Err(match code_of(&s) {
                    ErrorCode::InvalidArgument => status(
                        ErrorCode::InvalidArgument,
                        format!("bad user dump: public_key: {}", s.message()),
                    ),
                    code => status(
                        code,
                        format!("key-vault: {}; nothing was loaded (loading it again is safe)", s.message()),
                    ),
                });
            }
            if let Some(public_key) = key {
                // Gateways that remember keys learn of it; retried until
                // admin's hub takes it (their caches expire meanwhile).
                let admin = self.admin.clone();
                let chip_id = u.chip_id.clone();
                tokio::spawn(async move {
                    let mut wait = std::time::Duration::from_millis(100);
                    for _ in 0..100 {
                        match admin.publish_key_changed(&chip_id, public_key.clone()).await {
                            Ok(()) => return,
                            Err(e) => tracing::warn!(chip_id, error = %e, "could not announce a loaded key yet; retrying"),
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                });
            }
            self.user_pb(u).await
        })
        .await
    }

    async fn issue_user_ticket(&self, req: Request<pb::IssueUserTicketRequest>) -> R<pb::IssuedTicketView> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "issue_user_ticket", &r.chip_id.clone(), async {
            let u = self.admin.user(&r.chip_id).await?;
            if u.status != "active" {
                return Err(status(
                    ErrorCode::FailedPrecondition,
                    format!("user {:?} is {}", u.chip_id, u.status),
                ));
            }
            if u.locked {
                return Err(status(
                    ErrorCode::LockedDown,
                    format!("user {:?} is locked down: lift the lockdown first", u.chip_id),
                ));
            }
            let config = self.admin.config().await?;
            let get = |k: &str| config.get(k).cloned().unwrap_or_default();
            let ttl = if r.ttl_seconds == 0 {
                get("ticket.ttl_seconds").parse().unwrap_or(86400)
            } else {
                r.ttl_seconds
            };
            let host = get("user_gateway.host");
            let port: u16 = get("user_gateway.port").parse().unwrap_or(0);
            let issued = self
                .tickets
                .clone()
                .issue_ticket(tk::IssueTicketRequest {
                    kind: tk::TicketKind::User as i32,
                    chip_id: u.chip_id.clone(),
                    ttl_seconds: ttl,
                    host: host.clone(),
                    port: u32::from(port),
                    issuer: caller.clone(),
                })
                .await?
                .into_inner();
            let info = issued.info.unwrap_or_default();
            let published = PublishedTicket::new(
                Kind::User,
                &u.chip_id,
                &host,
                port,
                &issued.token,
                &issued.site_public_key,
                info.expires_at_ms,
            );
            Ok(pb::IssuedTicketView {
                ticket_id: info.id,
                chip_id: u.chip_id,
                expires_at_ms: info.expires_at_ms,
                json: published.to_json(),
                uri: published.to_uri(),
                site_key_pin: published.pin.clone(),
            })
        })
        .await
    }

    async fn issue_console_ticket(
        &self,
        req: Request<pb::IssueConsoleTicketRequest>,
    ) -> R<pb::ConsoleTicket> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "issue_console_ticket", "console", async {
            let ttl = match r.ttl_seconds {
                0 => 600,
                t if t <= 3600 => t,
                _ => {
                    return Err(status(
                        ErrorCode::InvalidArgument,
                        "a console ticket lives at most 3600 s",
                    ));
                }
            };
            let base = self
                .admin
                .config()
                .await?
                .get("console.url")
                .cloned()
                .unwrap_or_default();
            let (host, port) = crate::parse_http_url(&base).ok_or_else(|| {
                status(
                    ErrorCode::FailedPrecondition,
                    "console.url is not http(s)://host:port",
                )
            })?;
            let issued = self
                .tickets
                .clone()
                .issue_ticket(tk::IssueTicketRequest {
                    kind: tk::TicketKind::Console as i32,
                    chip_id: chipsite_model::ticket::CONSOLE_SUBJECT.to_owned(),
                    ttl_seconds: ttl,
                    host,
                    port: u32::from(port),
                    issuer: caller.clone(),
                })
                .await?
                .into_inner();
            let info = issued.info.unwrap_or_default();
            Ok(pb::ConsoleTicket {
                ticket_id: info.id,
                expires_at_ms: info.expires_at_ms,
                url: format!("{}/signin?t={}", base.trim_end_matches('/'), issued.token),
            })
        })
        .await
    }

    async fn list_tickets(&self, req: Request<pb::ListTicketsRequest>) -> R<pb::ListTicketsResponse> {
        let r = req.into_inner();
        let list = self
            .tickets
            .clone()
            .list_tickets(tk::ListTicketsRequest {
                chip_id: r.chip_id,
                include_closed: r.include_closed,
                limit: 1000,
            })
            .await?
            .into_inner();
        Ok(Response::new(pb::ListTicketsResponse {
            tickets: list.tickets.into_iter().map(ticket_pb).collect(),
        }))
    }

    async fn revoke_ticket(&self, req: Request<pb::RevokeTicketRequest>) -> R<pb::RevokeTicketResponse> {
        let caller = actor(&req)?;
        let id = req.into_inner().id;
        self.audited(&caller, "revoke_ticket", &id.clone(), async {
            let t = self
                .tickets
                .clone()
                .revoke_ticket(tk::RevokeTicketRequest { id })
                .await?
                .into_inner();
            Ok(pb::RevokeTicketResponse {
                ticket: Some(ticket_pb(t)),
            })
        })
        .await
    }

    async fn get_vault_status(&self, _: Request<pb::GetVaultStatusRequest>) -> R<pb::VaultStatusView> {
        let s = self
            .vault
            .clone()
            .get_status(kv::GetStatusRequest {})
            .await?
            .into_inner();
        Ok(Response::new(self.vault_view(s).await))
    }

    async fn unseal_vault(&self, req: Request<pb::UnsealVaultRequest>) -> R<pb::VaultStatusView> {
        let caller = actor(&req)?;
        let passphrase = req.into_inner().passphrase;
        self.audited(&caller, "unseal_vault", "site key", async {
            let s = self
                .vault
                .clone()
                .unseal(kv::UnsealRequest { passphrase })
                .await?
                .into_inner();
            Ok(self.vault_view(s).await)
        })
        .await
    }

    async fn seal_vault(&self, req: Request<pb::SealVaultRequest>) -> R<pb::VaultStatusView> {
        let caller = actor(&req)?;
        self.audited(&caller, "seal_vault", "site key", async {
            let s = self.vault.clone().seal(kv::SealRequest {}).await?.into_inner();
            Ok(self.vault_view(s).await)
        })
        .await
    }

    async fn create_site_key(&self, req: Request<pb::CreateSiteKeyRequest>) -> R<pb::VaultStatusView> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "create_site_key", "site key", async {
            let s = self
                .vault
                .clone()
                .create_site_key(kv::CreateSiteKeyRequest {
                    passphrase: r.passphrase,
                    current_passphrase: r.current_passphrase,
                })
                .await?
                .into_inner();
            Ok(self.vault_view(s).await)
        })
        .await
    }

    async fn change_passphrase(&self, req: Request<pb::ChangePassphraseRequest>) -> R<pb::VaultStatusView> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "change_passphrase", "site key", async {
            let s = self
                .vault
                .clone()
                .change_passphrase(kv::ChangePassphraseRequest {
                    old_passphrase: r.old_passphrase,
                    new_passphrase: r.new_passphrase,
                })
                .await?
                .into_inner();
            Ok(self.vault_view(s).await)
        })
        .await
    }

    async fn import_site_key(&self, req: Request<pb::ImportSiteKeyRequest>) -> R<pb::VaultStatusView> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        self.audited(&caller, "import_site_key", "site key", async {
            let s = self
                .vault
                .clone()
                .import_site_key(kv::ImportSiteKeyRequest {
                    encrypted_pem: r.encrypted_pem,
                    passphrase: r.passphrase,
                    current_passphrase: r.current_passphrase,
                })
                .await?
                .into_inner();
            Ok(self.vault_view(s).await)
        })
        .await
    }

    async fn export_site_key(&self, req: Request<pb::ExportSiteKeyRequest>) -> R<pb::ExportSiteKeyResponse> {
        let caller = actor(&req)?;
        let passphrase = req.into_inner().passphrase;
        self.audited(&caller, "export_site_key", "site key", async {
            let k = self
                .vault
                .clone()
                .export_site_key(kv::ExportSiteKeyRequest { passphrase })
                .await?
                .into_inner();
            Ok(pb::ExportSiteKeyResponse {
                encrypted_pem: k.encrypted_pem,
            })
        })
        .await
    }

    async fn get_peer_server(&self, _: Request<pb::GetPeerServerRequest>) -> R<pb::PeerServerState> {
        let (desired, changed_at_ms) = self.admin.peer_server().await?;
        Ok(Response::new(pb::PeerServerState {
            desired,
            changed_at_ms,
        }))
    }

    async fn start_peer_server(&self, req: Request<pb::StartPeerServerRequest>) -> R<pb::PeerServerState> {
        let caller = actor(&req)?;
        let passphrase = req.into_inner().passphrase;
        self.audited(&caller, "start_peer_server", "peer server", async {
            // The pass phrase proves the operator holds the site key, and
            // unseals the vault the peer server needs.
            self.vault
                .clone()
                .unseal(kv::UnsealRequest { passphrase })
                .await?;
            let (desired, changed_at_ms) = self.admin.set_peer_server(true).await?;
            Ok(pb::PeerServerState {
                desired,
                changed_at_ms,
            })
        })
        .await
    }

    async fn list_peers(
        &self,
        req: Request<chipsite_proto::peer::v1::ListPeersRequest>,
    ) -> R<chipsite_proto::peer::v1::ListPeersResponse> {
        // A read: not audited.
        self.peers.clone().list_peers(req.into_inner()).await
    }

    async fn list_tallies(
        &self,
        req: Request<chipsite_proto::tally::v1::ListTalliesRequest>,
    ) -> R<chipsite_proto::tally::v1::ListTalliesResponse> {
        // A read: not audited.
        self.tallies.clone().list_tallies(req.into_inner()).await
    }

    async fn stop_peer_server(&self, req: Request<pb::StopPeerServerRequest>) -> R<pb::PeerServerState> {
        let caller = actor(&req)?;
        self.audited(&caller, "stop_peer_server", "peer server", async {
            let (desired, changed_at_ms) = self.admin.set_peer_server(false).await?;
            Ok(pb::PeerServerState {
                desired,
                changed_at_ms,
            })
        })
        .await
    }

    async fn set_lockdown(&self, req: Request<pb::SetLockdownRequest>) -> R<pb::LockdownState> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        let action = if r.locked { "lockdown" } else { "lift_lockdown" };
        let subject = if r.chip_id.is_empty() {
            "site".to_owned()
        } else {
            r.chip_id.clone()
        };
        self.audited(&caller, action, &subject, async {
            if r.chip_id.is_empty() {
                self.admin.set_site_locked(r.locked).await?;
                Ok(pb::LockdownState {
                    site_locked: r.locked,
                    chip_id: String::new(),
                    user_locked: false,
                })
            } else {
                let u = self.admin.set_user_locked(&r.chip_id, r.locked).await?;
                let site_locked = self.admin.site_locked().await?;
                Ok(pb::LockdownState {
                    site_locked,
                    chip_id: u.chip_id,
                    user_locked: u.locked,
                })
            }
        })
        .await
    }

    async fn get_lockdown(&self, req: Request<pb::GetLockdownRequest>) -> R<pb::LockdownState> {
        let chip_id = req.into_inner().chip_id;
        // Not active (suspended, closed) counts as locked down for the gateways.
        let (user_locked, site_locked) = if chip_id.is_empty() {
            (false, self.admin.site_locked().await?)
        } else {
            self.admin.lockdown(&chip_id).await?
        };
        Ok(Response::new(pb::LockdownState {
            site_locked,
            chip_id,
            user_locked,
        }))
    }

    async fn get_site_config(&self, _: Request<pb::GetSiteConfigRequest>) -> R<pb::SiteConfig> {
        Ok(Response::new(site_config(self.admin.config().await?)))
    }

    async fn update_site_config(&self, req: Request<pb::UpdateSiteConfigRequest>) -> R<pb::SiteConfig> {
        let caller = actor(&req)?;
        let r = req.into_inner();
        let mut keys: Vec<&str> = r
            .set
            .keys()
            .map(String::as_str)
            .chain(r.reset.iter().map(String::as_str))
            .collect();
        keys.sort_unstable();
        let subject = keys.join(",");
        self.audited(&caller, "update_site_config", &subject, async {
            let set: BTreeMap<String, String> = r.set.clone().into_iter().collect();
            Ok(site_config(self.admin.update_config(&set, &r.reset).await?))
        })
        .await
    }

    async fn record_console_sign_in(
        &self,
        req: Request<pb::RecordConsoleSignInRequest>,
    ) -> R<pb::RecordConsoleSignInResponse> {
        if Caller::of(&req) != id::CONSOLE {
            return Err(status(
                ErrorCode::Forbidden,
                "only the console records its sign-ins",
            ));
        }
        let caller = actor(&req)?;
        let r = req.into_inner();
        if !matches!(r.method.as_str(), "ticket" | "certificate") {
            return Err(status(
                ErrorCode::InvalidArgument,
                "method is ticket or certificate",
            ));
        }
        let source: String = r.source.chars().filter(|c| !c.is_control()).take(64).collect();
        self.admin
            .audit(
                &caller,
                "console_sign_in",
                &r.method,
                &format!("ok from {source}"),
            )
            .await?;
        Ok(Response::new(pb::RecordConsoleSignInResponse {}))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) };
        let cursor = AuditCursor::parse(&r.page_token)?;
        // One more than a page from each source: whether more follow.
        let fetch = limit + 1;
        let mut admin_rows = vec![];
        if r.source.is_empty() || r.source == "admin" {
            for a in self
                .admin
                .audit_log(u64::from(fetch), &r.contains, cursor.admin)
                .await?
            {
                admin_rows.push(pb::AuditEntry {
                    at_ms: a.at_ms,
                    source: "admin".into(),
                    actor: a.actor,
                    action: a.action,
                    subject: a.subject,
                    outcome: a.outcome,
                    count: 1,
                    id: a.id,
                });
            }
        }
        let mut ticket_rows = vec![];
        if r.source.is_empty() || r.source == "ticket" {
            let records = self
                .tickets
                .clone()
                .list_audit(tk::ListAuditRequest {
                    ticket_id: String::new(),
                    limit: fetch,
                    contains: r.contains.clone(),
                    before_id: cursor.ticket,
                })
                .await?
                .into_inner()
                .records;
            for t in records {
                ticket_rows.push(pb::AuditEntry {
                    at_ms: t.at_ms,
                    source: "ticket".into(),
                    actor: t.source,
                    action: "ticket".into(),
                    subject: t.ticket_id,
                    outcome: t.outcome,
                    count: t.count,
                    id: t.id,
                });
            }
        }
        let (entries, next) = merge_audit(admin_rows, ticket_rows, limit as usize, cursor);
        Ok(Response::new(pb::ListAuditResponse {
            entries,
            next_page_token: next.map(|c| c.token()).unwrap_or_default(),
        }))
    }
}

/// Where a page of the audit log ends in each source: only rows with a
/// smaller id come next (0: no bound yet; -1: none left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct AuditCursor {
    admin: i64,
    ticket: i64,
}

impl AuditCursor {
    fn parse(token: &str) -> Result<Self, Status> {
        if token.is_empty() {
            return Ok(Self::default());
        }
        let bad = || status(ErrorCode::InvalidArgument, "page_token is not from an audit list");
        let (a, t) = token.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            admin: a.parse().map_err(|_| bad())?,
            ticket: t.parse().map_err(|_| bad())?,
        })
    }

    fn token(self) -> String {
        format!("{}.{}", self.admin, self.ticket)
    }
}

/// The newest `limit` of two sources' rows (each newest first by id), by
/// time, keeping each source's own order so that every page is a prefix of
/// what is left in each; and the cursor of the next page, if any rows are
/// left. Each source was asked for `limit + 1` rows.
fn merge_audit(
    admin: Vec<pb::AuditEntry>,
    ticket: Vec<pb::AuditEntry>,
    limit: usize,
    from: AuditCursor,
) -> (Vec<pb::AuditEntry>, Option<AuditCursor>) {
    let (mut a, mut t) = (admin.into_iter().peekable(), ticket.into_iter().peekable());
    let (first_a, first_t) = (a.peek().map(|e| e.id), t.peek().map(|e| e.id));
    let mut out = Vec::with_capacity(limit);
    let (mut last_a, mut last_t) = (None, None);
    while out.len() < limit {
        let take_admin = match (a.peek(), t.peek()) {
            (Some(x), Some(y)) => x.at_ms >= y.at_ms,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let e = if take_admin { a.next() } else { t.next() };
        let Some(e) = e else { break };
        if take_admin {
            last_a = Some(e.id);
        } else {
            last_t = Some(e.id);
        }
        out.push(e);
    }
    if a.peek().is_none() && t.peek().is_none() {
        return (out, None);
    }
    // A source with rows shown goes on after its last; one with none shown
    // goes on from the first row it had (so rows written since do not slip
    // in), or has none left.
    let bound = |last: Option<i64>, first: Option<i64>, was: i64| match (last, first) {
        (Some(id), _) => id,
        (None, Some(id)) => id.saturating_add(1),
        (None, None) if was == 0 => -1,
        (None, None) => was,
    };
    let next = AuditCursor {
        admin: bound(last_a, first_a, from.admin),
        ticket: bound(last_t, first_t, from.ticket),
    };
    (out, Some(next))
}

/// A user as AdminService shows it.
fn user_view(u: user::Model, has_key: bool) -> pb::User {
    pb::User {
        chip_id: u.chip_id,
        name: u.name,
        address: u.address,
        contact: Some(pb::Contact {
            email: u.email,
            phone: u.phone,
        }),
        status: u.status,
        created_at_ms: u.created_at_ms,
        updated_at_ms: u.updated_at_ms,
        locked: u.locked,
        has_key,
    }
}

/// The configuration as callers see it: secrets in values masked, and which
/// keys differ from their defaults.
fn site_config(values: BTreeMap<String, String>) -> pb::SiteConfig {
    let defaults = crate::config_defaults();
    let changed = values
        .iter()
        .filter(|(k, v)| defaults.get(k.as_str()) != Some(&v.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    pb::SiteConfig {
        values: values
            .iter()
            .map(|(k, v)| (k.clone(), crate::masked(v)))
            .collect(),
        changed,
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn the_bench_identity_raises_alarms_only_on_a_dev_site_and_the_console_does_not_watch() {
        let raise = "/chipsite.events.v1.UserEvents/RaiseAlarms";
        assert!(policy(true).permits(raise, id::BENCH));
        assert!(!policy(false).permits(raise, id::BENCH));
        assert!(policy(false).permits(raise, id::CONSOLE));
        // Gateways read a user's status, not their contact details.
        let get_user = "/chipsite.admin.v1.AdminService/GetUser";
        let get_status = "/chipsite.admin.v1.AdminService/GetUserStatus";
        for gateway in [id::USER_GATEWAY, id::PEER_GATEWAY] {
            assert!(!policy(false).permits(get_user, gateway));
            assert!(policy(false).permits(get_status, gateway));
        }
        let watch = "/chipsite.events.v1.UserEvents/Watch";
        assert!(!policy(true).permits(watch, id::CONSOLE));
        assert!(policy(false).permits(watch, id::USER_GATEWAY));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod audit_paging_tests {
    use super::*;

    fn row(source: &str, id: i64, at_ms: i64) -> pb::AuditEntry {
        pb::AuditEntry {
            at_ms,
            source: source.into(),
            id,
            ..Default::default()
        }
    }

    /// Two sources paged by the merged cursor: every row once, newest
    /// first, each source's order kept even where its times are out of id
    /// order (a collapsed ticket refusal's time moves on).
    #[test]
    fn merged_pages_show_every_row_once_in_order() {
        let admin: Vec<_> = (1..=7).rev().map(|i| row("admin", i, i * 10)).collect();
        // Ticket ids 1..=5; id 2 was touched late (time 65).
        let mut ticket: Vec<_> = (1..=5).rev().map(|i| row("ticket", i, i * 10 + 5)).collect();
        ticket[3].at_ms = 65;
        let fetch = |rows: &[pb::AuditEntry], before: i64, n: usize| -> Vec<pb::AuditEntry> {
            rows.iter()
                .filter(|r| before == 0 || r.id < before)
                .take(n)
                .cloned()
                .collect()
        };
        let mut cursor = AuditCursor::default();
        let mut seen = vec![];
        for page in 0.. {
            assert!(page < 10, "paging ends");
            let (rows, next) = merge_audit(
                fetch(&admin, cursor.admin, 4),
                fetch(&ticket, cursor.ticket, 4),
                3,
                cursor,
            );
            assert!(rows.len() <= 3);
            seen.extend(rows.iter().map(|r| (r.source.clone(), r.id)));
            match next {
                Some(c) => {
                    assert_eq!(AuditCursor::parse(&c.token()).unwrap(), c);
                    cursor = c;
                }
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 12, "every row once: {seen:?}");
        assert_eq!(seen.len(), 12, "no row twice: {seen:?}");
        for source in ["admin", "ticket"] {
            let ids: Vec<i64> = seen
                .iter()
                .filter(|(s, _)| s == source)
                .map(|(_, i)| *i)
                .collect();
            assert!(
                ids.windows(2).all(|w| w[0] > w[1]),
                "{source} newest first: {ids:?}"
            );
        }
    }

    #[test]
    fn a_source_with_nothing_shown_goes_on_from_its_first_row() {
        // Admin rows are all newer: the first page shows none of ticket's.
        let admin: Vec<_> = (1..=5).rev().map(|i| row("admin", i, 100 + i)).collect();
        let ticket = vec![row("ticket", 9, 50), row("ticket", 8, 40)];
        let (rows, next) = merge_audit(admin[..3].to_vec(), ticket, 2, AuditCursor::default());
        assert!(rows.iter().all(|r| r.source == "admin"));
        let next = next.unwrap();
        assert_eq!(next, AuditCursor { admin: 4, ticket: 10 });
        // An empty source has none left; the last page has no cursor.
        let (_, next) = merge_audit(vec![row("admin", 1, 1)], vec![], 2, AuditCursor::default());
        assert_eq!(next, None);
        let (_, next) = merge_audit(admin[..3].to_vec(), vec![], 2, AuditCursor::default());
        assert_eq!(next, Some(AuditCursor { admin: 4, ticket: -1 }));
        for bad in ["x", "1", "1.x", "1.2.3"] {
            assert!(AuditCursor::parse(bad).is_err(), "{bad}");
        }
    }
}
