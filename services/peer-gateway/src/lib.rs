//! peer-gateway: the port peer sites connect to, and the site's dialer of
//! peer sites (dialogs 5 and 6 of the product brief; the wire protocol is
//! `docs/protocol.md` section 14; the design is ADR 0010).
//!
//! * **Tally tickets between sites.** A local user (bob) hands in a tally
//!   ticket another site issued to its user (alice): this gateway dials that
//!   site over TLS pinned to the ticket's site key, presenting its own chain
//!   certified by this site's key, and sends one `introduce` (token, both
//!   users, this site's key, where this gateway listens). The other site
//!   answers OK and closes, or closes without a byte. On OK both sites have
//!   learned each other's key for the two users (key-vault's peer keys) and
//!   recorded the link (`peer_links`); each user gets an alarm.
//! * **The peer port** follows admin's desired state (`StartPeerServer`,
//!   `StopPeerServer`): it is bound while "running" and closed while
//!   "stopped", and outbound work waits while stopped. A sealed vault or a
//!   site lockdown refuses every peer; a user lockdown that user's.
//!
//! The gateway's TLS key lives in memory and is certified by the site key
//! through key-vault, like the user gateway's.

mod grpc;
mod outbox;
mod session;
pub mod store;
mod ticket;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use chipsite_model::ErrorCode;
use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    events::v1::{self as ev, user_events_client::UserEventsClient},
    keyvault::v1::{self as kv, key_vault_client::KeyVaultClient},
    tally::v1::tallies_client::TalliesClient,
    ticket::v1::tickets_client::TicketsClient,
};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{Admission, AdmissionLimits, Throttle};
use chipsite_wire::Limits;
use sea_orm::DatabaseConnection;
use tokio::{net::TcpListener, sync::watch};

pub use chipsite_model::chip_id::session_name;
pub use grpc::{PeerGatewayGrpc, policy, serve_grpc};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("key-vault did not certify the peer gateway: {0}")]
    Certify(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The other site closed without an answer: it refused the ticket (it
    /// never says why), or it is not the site the ticket names.
    #[error("the other site refused the ticket")]
    Refused,
    #[error("{0}")]
    AlreadyExists(String),
    #[error("the other site cannot be reached: {0}")]
    Unreachable(String),
    /// This site's peer server is stopped, its vault sealed or it is locked down.
    #[error("{0}")]
    NotNow(String),
    #[error("{0}")]
    LockedDown(String),
    #[error("an internal service failed: {0}")]
    Upstream(String),
    /// The other site answered a request with this error.
    #[error("the other site: {message}")]
    Answered { code: i64, message: String },
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
    /// One of the gateway's own background tasks ended, which it never
    /// does by itself: the gateway stops rather than serve half-working.
    #[error("the peer gateway's {0} task ended unexpectedly")]
    TaskEnded(&'static str),
}

impl PeerError {
    /// The site-wide code of this error (carried across gRPC).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Refused => ErrorCode::Refused,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Unreachable(_) | Self::NotNow(_) | Self::Certify(_) => ErrorCode::Unavailable,
            Self::LockedDown(_) => ErrorCode::LockedDown,
            Self::Answered { .. } => ErrorCode::FailedPrecondition,
            Self::Upstream(_) | Self::Store(_) | Self::TaskEnded(_) => ErrorCode::Internal,
        }
    }
}

impl From<PeerError> for tonic::Status {
    fn from(e: PeerError) -> Self {
        match e.code() {
            ErrorCode::Internal => chipsite_proto::status::internal(&e),
            code => chipsite_proto::status::status(code, e.to_string()),
        }
    }
}

/// Limits and lifetimes; the defaults are what `docs/protocol.md` states.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Frames on the peer port.
    pub limits: Limits,
    /// How long a ticket connection may take, from the TCP accept to its
    /// whole `introduce` request (the handshake included).
    pub introduce_timeout: Duration,
    /// Lifetime requested for the gateway's certificate.
    pub cert_ttl: Duration,
    /// Caps on connections and handshakes, in total and per source.
    pub admission: AdmissionLimits,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long one write to a peer may wait for it to read.
    pub write_timeout: Duration,
    /// How long dialing a peer site (TCP, TLS, the answer) may take.
    pub dial_timeout: Duration,
    /// How often the desired state (running or stopped) is read from admin.
    pub state_poll: Duration,
    /// How long a session this gateway opened stays open with nothing to
    /// send (the other side closes idle sessions after `limits.idle`).
    pub session_idle: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            introduce_timeout: Duration::from_secs(10),
            cert_ttl: Duration::from_secs(24 * 3600),
            admission: AdmissionLimits {
                max_connections: 1024,
                max_connections_per_source: 64,
                max_handshakes: 128,
                max_handshakes_per_source: 16,
            },
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(10),
            state_poll: Duration::from_secs(1),
            session_idle: Duration::from_secs(30),
        }
    }
}

/// How long the peer gateway reuses what key-vault and admin said of the
/// site (sealed, locked down) and the keys learned for a user: a seal, a
/// lockdown or a key learned on another replica reaches new peer
/// connections within this time.
pub const STATE_TTL: Duration = Duration::from_secs(1);

/// The internal services the gateway calls.
#[derive(Debug, Clone)]
pub struct Clients {
    pub key_vault: Channel,
    pub tickets: Channel,
    pub admin: Channel,
    /// The tally service: its outbox, and the steps peers send.
    pub tally: Channel,
}

/// What key-vault certified: the chain `[leaf, site certificate]` and the
/// leaf's key, served to peers and presented to them when dialing.
pub(crate) struct Certified {
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) pkcs8: Vec<u8>,
    /// This site's key (SPKI DER), as the chain's second certificate holds it.
    pub(crate) site_key: Vec<u8>,
    /// The server side of ticket connections: any site chain.
    pub(crate) ticket_server: Arc<rustls::ServerConfig>,
}

impl Certified {
    /// A client configuration for dialing a peer site whose key is
    /// `their_key` (SPKI DER), presenting this site's chain.
    pub(crate) fn dialing(
        &self,
        their_key: &[u8],
    ) -> Result<rustls::ClientConfig, chipsite_external_tls::ExternalTlsError> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let chain = self.chain.iter().cloned().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()));
        chipsite_external_tls::client_config(their_key, Some((chain, key)))
    }
}

pub(crate) struct Inner {
    pub(crate) vault: KeyVaultClient<TracedChannel>,
    pub(crate) tickets: TicketsClient<TracedChannel>,
    pub(crate) admin: AdminServiceClient<TracedChannel>,
    pub(crate) events: UserEventsClient<TracedChannel>,
    pub(crate) tally: TalliesClient<TracedChannel>,
    pub(crate) db: DatabaseConnection,
    pub(crate) settings: Settings,
    admission: Arc<Admission>,
    /// Failed ticket introductions per source (burst 10, then one every 6 s).
    pub(crate) throttle: Throttle,
    pub(crate) certified: ArcSwapOption<Certified>,
    not_after_ms: AtomicI64,
    /// Whether admin wants the peer server running (followed by polling).
    pub(crate) running: watch::Sender<bool>,
    /// What key-vault and admin last said of the whole site (sealed, locked
    /// down), reused for [`STATE_TTL`].
    site_state: std::sync::Mutex<Option<(std::time::Instant, Option<&'static str>)>>,
    /// Session server configurations by the CHIP ID a session names (the
    /// keys learned for that user), reused for [`STATE_TTL`].
    #[allow(clippy::type_complexity)]
    pub(crate) session_configs: std::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, Arc<Certified>, Arc<rustls::ServerConfig>)>,
    >,
    /// The last contact with each peer site (by its key's pin), either way:
    /// when, and "ok" or why it failed. In memory, for operators.
    contacts: std::sync::Mutex<std::collections::HashMap<String, (i64, String)>>,
    /// Alarms about other sites' tally steps, raised in batches.
    step_alarms: tokio::sync::mpsc::UnboundedSender<ev::NewAlarm>,
    /// Peer sessions open now, per peer site's pin: (opened by us, by them).
    sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, (u32, u32)>>>,
}

/// One open peer session, counted while it lives (see [`Inner::count_session`]).
pub(crate) struct SessionCount {
    sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, (u32, u32)>>>,
    pin: String,
    outgoing: bool,
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sessions.lock()
            && let Some(n) = s.get_mut(&self.pin)
        {
            let n = if self.outgoing { &mut n.0 } else { &mut n.1 };
            *n = n.saturating_sub(1);
        }
    }
}

/// One peer gateway.
#[derive(Clone)]
pub struct PeerGateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGateway")
            .field("running", &*self.inner.running.borrow())
            .finish_non_exhaustive()
    }
}

impl PeerGateway {
    /// Open the gateway's store (running its migrations).
    pub async fn open(
        db: DatabaseConnection,
        clients: Clients,
        settings: Settings,
    ) -> Result<Self, PeerError> {
        chipsite_store::migrate::<store::Migrator>(&db).await?;
        let (step_alarms, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(raise_in_batches(
            UserEventsClient::new(traced(clients.admin.clone())),
            queued,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                vault: KeyVaultClient::new(traced(clients.key_vault)),
                tickets: TicketsClient::new(traced(clients.tickets)),
                admin: AdminServiceClient::new(traced(clients.admin.clone())),
                events: UserEventsClient::new(traced(clients.admin)),
                tally: TalliesClient::new(traced(clients.tally)),
                db,
                admission: Admission::new(settings.admission),
                throttle: Throttle::default(),
                settings,
                certified: ArcSwapOption::empty(),
                not_after_ms: AtomicI64::new(0),
                running: watch::Sender::new(false),
                contacts: Default::default(),
                sessions: Default::default(),
                step_alarms,
                site_state: Default::default(),
                session_configs: Default::default(),
            }),
        })
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Whether key-vault has certified the gateway.
    pub fn is_certified(&self) -> bool {
        self.inner.certified.load().is_some()
    }

    /// Get a fresh certificate from key-vault for a new in-memory key, for
    /// the host peers are told to connect to (`peer_gateway.host`).
    pub async fn certify(&self) -> Result<i64, PeerError> {
        let host = chipsite_gateway_cert::site_setting(&self.inner.admin, "peer_gateway.host", "127.0.0.1")
            .await
            .map_err(|e| PeerError::Certify(e.message().to_owned()))?;
        let issued = chipsite_gateway_cert::certify(&self.inner.vault, host, self.inner.settings.cert_ttl)
            .await
            .map_err(PeerError::Certify)?;
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> = issued
            .chain
            .iter()
            .map(|c| rustls::pki_types::CertificateDer::from(c.clone()))
            .collect();
        let site_key = chipsite_external_tls::site_key_of_chain(&chain, rustls::pki_types::UnixTime::now())
            .map_err(PeerError::Certify)?;
        let ticket_server = chipsite_external_tls::server_config(
            issued.chain.clone(),
            issued.pkcs8.clone(),
            chipsite_external_tls::SiteChainVerifier::expecting(None),
        )
        .map_err(|e| PeerError::Certify(e.to_string()))?;
        self.inner.certified.store(Some(Arc::new(Certified {
            chain: issued.chain,
            pkcs8: issued.pkcs8,
            site_key,
            ticket_server: Arc::new(ticket_server),
        })));
        self.inner
            .not_after_ms
            .store(issued.not_after_ms, Ordering::Relaxed);
        Ok(issued.not_after_ms)
    }

    /// Retry [`Self::certify`] until it succeeds: key-vault may not be up
    /// yet, or sealed.
    pub async fn certify_first(&self) {
        chipsite_gateway_cert::until_certified("peer gateway", || self.certify()).await;
    }

    /// Renew the certificate at two thirds of its remaining life.
    async fn keep_certified(self) {
        chipsite_gateway_cert::keep_certified("peer gateway", &self.inner.not_after_ms, || self.certify())
            .await;
    }

    /// Read admin's desired state now and then; the peer port opens and
    /// closes with it.
    async fn follow_state(self) {
        let mut warned = false;
        loop {
            match self
                .inner
                .admin
                .clone()
                .get_peer_server(ad::GetPeerServerRequest {})
                .await
            {
                Ok(state) => {
                    warned = false;
                    let running = state.into_inner().desired == "running";
                    self.inner
                        .running
                        .send_if_modified(|r| std::mem::replace(r, running) != running);
                }
                Err(e) if !warned => {
                    tracing::warn!(error = %e.message(), "cannot read the peer server's desired state; keeping the last one");
                    warned = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(self.inner.settings.state_poll).await;
        }
    }

    /// Serve peer sites at `addr` until `shutdown`, while admin wants the
    /// peer server running: the port is bound when it is, closed when it is
    /// not. `bound` is a listener already bound there (dev and tests bind
    /// every port first, to resolve port 0); it is closed at once, and the
    /// same address bound again once admin's state is known to be running
    /// and key-vault has certified the gateway: an open peer port always
    /// means a running, certified peer server.
    pub async fn serve(
        self,
        bound: Option<TcpListener>,
        addr: SocketAddr,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), PeerError> {
        tokio::pin!(shutdown);
        drop(bound);
        let mut following = AbortOnDrop(tokio::spawn(self.clone().follow_state()));
        if self.inner.certified.load().is_none() {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = self.certify_first() => {}
            }
        }
        let mut renewing = AbortOnDrop(tokio::spawn(self.clone().keep_certified()));
        let mut delivering = AbortOnDrop(tokio::spawn(outbox::deliver_forever(self.inner.clone())));
        let mut running = self.inner.running.subscribe();
        let mut listener: Option<TcpListener> = None;
        let mut warned_bind = false;
        loop {
            let want = *running.borrow_and_update();
            match (&listener, want) {
                (Some(_), false) => {
                    listener = None;
                    tracing::info!(%addr, "peer server stopped: the peer port is closed");
                }
                (None, true) => match TcpListener::bind(addr).await {
                    Ok(l) => {
                        warned_bind = false;
                        tracing::info!(%addr, "peer server running: accepting peer sites");
                        listener = Some(l);
                    }
                    Err(e) => {
                        if !warned_bind {
                            tracing::warn!(%addr, error = %e, "cannot bind the peer port; retrying");
                            warned_bind = true;
                        }
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
                _ => {}
            }
            let accept = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                _ = &mut following.0 => return Err(PeerError::TaskEnded("desired state")),
                _ = &mut renewing.0 => return Err(PeerError::TaskEnded("certificate renewal")),
                _ = &mut delivering.0 => return Err(PeerError::TaskEnded("outbox delivery")),
                changed = running.changed() => {
                    if changed.is_err() {
                        return Err(PeerError::TaskEnded("desired state"));
                    }
                    continue;
                }
                a = accept => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let accepted_at = tokio::time::Instant::now();
            let permit = match self.inner.admission.admit(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    tracing::debug!(%peer, cap = why.label(), "peer connection shed");
                    continue;
                }
            };
            tokio::spawn(ticket::answer(self.inner.clone(), tcp, peer, permit, accepted_at));
        }
        Ok(())
    }

    /// Open a peer session to the site of `chip_id`'s link with
    /// `peer_chip_id`, acting for `chip_id`, and ping it: how long the setup
    /// and the round trip took.
    pub async fn ping(&self, chip_id: &str, peer_chip_id: &str) -> Result<(Duration, Duration), PeerError> {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        let link = store::link::Entity::find()
            .filter(store::link::Column::ChipId.eq(chip_id))
            .filter(store::link::Column::PeerChipId.eq(peer_chip_id))
            .order_by_desc(store::link::Column::UpdatedAtMs)
            .one(&self.inner.db)
            .await?
            .ok_or_else(|| PeerError::NotFound(format!("no link of {chip_id} with {peer_chip_id}")))?;
        if self.inner.locked(chip_id).await? {
            return Err(PeerError::LockedDown(format!(
                "{chip_id} or the site is locked down"
            )));
        }
        let started = tokio::time::Instant::now();
        let mut session = session::dial(&self.inner, &link).await?;
        let setup = started.elapsed();
        let within = self.inner.settings.dial_timeout;
        session.call("ping", serde_json::json!({}), within).await?;
        let rtt = started.elapsed() - setup;
        session.close().await;
        Ok((setup, rtt))
    }

    /// Messages waiting in the tally outbox, per peer site (its key's pin).
    pub async fn outbox_depth(&self) -> Result<std::collections::HashMap<String, u32>, PeerError> {
        Ok(self
            .inner
            .tally
            .clone()
            .outbox_depth(chipsite_proto::tally::v1::OutboxDepthRequest {})
            .await
            .map_err(|e| PeerError::Upstream(e.message().to_owned()))?
            .into_inner()
            .by_site_pin)
    }

    /// Peer sessions open now with the site of `pin`: (opened by us, by them).
    pub fn open_sessions(&self, pin: &str) -> (u32, u32) {
        self.inner.open_sessions(pin)
    }

    /// The last contact with the peer site whose key's pin is `pin`.
    pub fn last_contact(&self, pin: &str) -> (i64, String) {
        self.inner.last_contact(pin)
    }

    /// Redeem another site's tally ticket for the local user `chip_id`
    /// (what `RedeemTallyTicket` does).
    pub async fn redeem_tally_ticket(
        &self,
        chip_id: &str,
        ticket: &str,
    ) -> Result<store::link::Model, PeerError> {
        ticket::redeem(&self.inner, chip_id, ticket).await
    }
}

impl Inner {
    /// Remember how the last contact with the site of `site_key` went.
    pub(crate) fn contact(&self, site_key: &[u8], outcome: &str) {
        let pin = chipsite_model::pin_of_spki(site_key);
        if let Ok(mut c) = self.contacts.lock() {
            c.insert(
                pin,
                (chipsite_store::now_ms(), outcome.chars().take(200).collect()),
            );
        }
    }

    /// Count a session with the site of `pin` while the returned value lives.
    pub(crate) fn count_session(&self, pin: &str, outgoing: bool) -> SessionCount {
        if let Ok(mut s) = self.sessions.lock() {
            let n = s.entry(pin.to_owned()).or_default();
            if outgoing {
                n.0 += 1;
            } else {
                n.1 += 1;
            }
        }
        SessionCount {
            sessions: self.sessions.clone(),
            pin: pin.to_owned(),
            outgoing,
        }
    }

    /// Sessions open now with the site of `pin`: (opened by us, by them).
    pub(crate) fn open_sessions(&self, pin: &str) -> (u32, u32) {
        self.sessions
            .lock()
            .ok()
            .and_then(|s| s.get(pin).copied())
            .unwrap_or_default()
    }

    pub(crate) fn last_contact(&self, pin: &str) -> (i64, String) {
        self.contacts
            .lock()
            .ok()
            .and_then(|c| c.get(pin).cloned())
            .unwrap_or_default()
    }

    /// Where this site's peer gateway is reached (`peer_gateway.host` and
    /// `peer_gateway.port` of the site configuration).
    pub(crate) async fn own_address(&self) -> Result<(String, u16), PeerError> {
        // One read of the configuration for both values.
        let values = self
            .admin
            .clone()
            .get_site_config(ad::GetSiteConfigRequest {})
            .await
            .map_err(|e| PeerError::Upstream(e.message().to_owned()))?
            .into_inner()
            .values;
        let host = values
            .get("peer_gateway.host")
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let port = values
            .get("peer_gateway.port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok((host, port))
    }

    /// Why this site takes no peer work now, if it does not: the peer
    /// server stopped, the vault sealed, the site locked down (the sealed
    /// vault and the lockdown asked of key-vault and admin each time).
    ///
    /// `fresh`: ask now (the ticket dialog, which spends tickets); else the
    /// answer may be up to [`STATE_TTL`] old (sessions).
    pub(crate) async fn refuses_peers(&self, fresh: bool) -> Result<Option<&'static str>, PeerError> {
        if fresh || !*self.running.borrow() {
            // The polled state may be a second old (or not read yet): ask
            // before refusing, and before anything that must not follow a
            // stop (a ticket sent or redeemed).
            let desired = self
                .admin
                .clone()
                .get_peer_server(ad::GetPeerServerRequest {})
                .await
                .map_err(|e| PeerError::Upstream(e.message().to_owned()))?
                .into_inner()
                .desired;
            if desired != "running" {
                return Ok(Some("the peer server is stopped"));
            }
            self.running.send_if_modified(|r| !std::mem::replace(r, true));
        }
        if let Ok(known) = self.site_state.lock()
            && !fresh
            && let Some((at, why)) = *known
            && at.elapsed() < STATE_TTL
        {
            return Ok(why);
        }
        // Both asked at once.
        let (mut vault, admin) = (self.vault.clone(), self.locked(""));
        let (vault, locked) = tokio::join!(vault.get_status(kv::GetStatusRequest {}), admin);
        let vault = vault
            .map_err(|e| PeerError::Upstream(e.message().to_owned()))?
            .into_inner();
        let why = if vault.sealed {
            Some("the site key is sealed")
        } else if locked? {
            Some("the site is locked down")
        } else {
            None
        };
        if let Ok(mut known) = self.site_state.lock() {
            *known = Some((std::time::Instant::now(), why));
        }
        Ok(why)
    }

    /// Whether the site, or `chip_id`, is locked down.
    pub(crate) async fn locked(&self, chip_id: &str) -> Result<bool, PeerError> {
        let lock = self
            .admin
            .clone()
            .get_lockdown(ad::GetLockdownRequest {
                chip_id: chip_id.to_owned(),
            })
            .await;
        match lock {
            Ok(lock) => {
                let lock = lock.into_inner();
                Ok(lock.site_locked || lock.user_locked)
            }
            // No such user: nothing to lock; the ticket's own check refuses.
            Err(e) if chipsite_proto::status::code_of(&e) == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(PeerError::Upstream(e.message().to_owned())),
        }
    }

    /// [`Self::alarm`] for a tally step: raised with the others queued at
    /// the same moment, in one call (it ends when the gateway is dropped).
    pub(crate) fn alarm_soon(&self, chip_id: &str, text: String) {
        let _ = self.step_alarms.send(ev::NewAlarm {
            chip_id: chip_id.to_owned(),
            kind: "notice".to_owned(),
            text,
        });
    }

    /// Tell a local user what a peer site did (an alarm: pushed to open
    /// sessions, else e-mailed or texted).
    pub(crate) async fn alarm(&self, chip_id: &str, text: String) {
        let raised = self
            .events
            .clone()
            .raise_alarms(ev::RaiseAlarmsRequest {
                alarms: vec![ev::NewAlarm {
                    chip_id: chip_id.to_owned(),
                    kind: "notice".to_owned(),
                    text,
                }],
            })
            .await;
        if let Err(e) = raised {
            tracing::warn!(chip_id, error = %e.message(), "could not raise the user's alarm");
        }
    }
}

/// Raise queued alarms, up to 100 at a time (admin's batch), until the
/// queue's sender is dropped with the gateway.
async fn raise_in_batches(
    events: UserEventsClient<TracedChannel>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<ev::NewAlarm>,
) {
    while let Some(first) = queued.recv().await {
        let mut alarms = vec![first];
        while alarms.len() < 100
            && let Ok(a) = queued.try_recv()
        {
            alarms.push(a);
        }
        let raised = events
            .clone()
            .raise_alarms(ev::RaiseAlarmsRequest { alarms })
            .await;
        if let Err(e) = raised {
            tracing::warn!(error = %e.message(), "could not raise users' alarms about tally steps");
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
