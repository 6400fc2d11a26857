//! user-gateway: the external port mobile apps connect to (dialogs 3 and 4
//! of the product brief; the wire protocol is `docs/protocol.md`).
//!
//! * **Enrollment:** a connection without a client certificate may send one
//!   `enroll` request (user ticket token, CHIP ID, the app's public key). The
//!   ticket service burns the token; if it was valid the key is registered
//!   in key-vault and the gateway answers and closes. Anything else: closed
//!   without a byte, nothing more read.
//! * **Session:** a connection whose client certificate carries the key
//!   registered for the CHIP ID in its common name gets the command
//!   interpreter (`status`, `tally_ticket`, alarms).
//!
//! The gateway owns nothing durable: its TLS key lives in memory and is
//! certified by the site key through key-vault; users, lockdown and alarms
//! belong to admin, keys to key-vault, tickets to the ticket service.

mod cache;
mod conn;
mod events;
mod registry;
mod tallies;
mod tls;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use chipsite_proto::{
    admin::v1::admin_service_client::AdminServiceClient, events::v1::user_events_client::UserEventsClient,
    keyvault::v1::key_vault_client::KeyVaultClient, peer::v1::peer_gateway_client::PeerGatewayClient,
    tally::v1::tallies_client::TalliesClient, ticket::v1::tickets_client::TicketsClient,
};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{Admission, AdmissionLimits, Throttle};
use chipsite_wire::Limits;
use rustls::ServerConfig;
use tokio::net::TcpListener;

pub use registry::{CloseReason, Registry};
pub use tls::{AppCertificate, server_config};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("key-vault did not certify the gateway: {0}")]
    Certify(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// One of the gateway's own background tasks ended, which it never
    /// does by itself: the gateway stops rather than serve half-working.
    #[error("the gateway's {0} task ended unexpectedly")]
    TaskEnded(&'static str),
}

/// Limits and lifetimes; the defaults are what `docs/protocol.md` states.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Frames and timeouts of a session.
    pub limits: Limits,
    /// How long an enrollment connection may take to send its request.
    pub enroll_timeout: Duration,
    /// Lifetime requested for the gateway's certificate.
    pub cert_ttl: Duration,
    /// Caps on connections and handshakes, in total and per source.
    pub admission: AdmissionLimits,
    /// Sessions one user may hold open on one replica at most.
    pub max_sessions_per_user: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long one write to an app may wait for the app to read.
    pub write_timeout: Duration,
    /// How long the admission cache trusts what it learned (a lost
    /// announcement is healed by then).
    pub admission_cache_ttl: Duration,
    /// Test hook: this many of the next key-change announcements fail as if
    /// admin had refused them (they are retried until one goes through).
    #[doc(hidden)]
    pub fail_announcements: Arc<std::sync::atomic::AtomicU32>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            enroll_timeout: Duration::from_secs(10),
            cert_ttl: Duration::from_secs(24 * 3600),
            admission: AdmissionLimits {
                max_connections: 4096,
                max_connections_per_source: 64,
                max_handshakes: 512,
                max_handshakes_per_source: 16,
            },
            max_sessions_per_user: 8,
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            admission_cache_ttl: Duration::from_secs(30),
            fail_announcements: Arc::default(),
        }
    }
}

/// The internal services the gateway calls.
#[derive(Debug, Clone)]
pub struct Clients {
    pub key_vault: Channel,
    pub tickets: Channel,
    pub admin: Channel,
    /// The peer gateway, which redeems other sites' tally tickets.
    pub peer_gateway: Channel,
    /// The tally service: the user's tallies and signed steps.
    pub tally: Channel,
}

pub(crate) struct Inner {
    pub(crate) vault: KeyVaultClient<TracedChannel>,
    pub(crate) tickets: TicketsClient<TracedChannel>,
    pub(crate) admin: AdminServiceClient<TracedChannel>,
    pub(crate) events: UserEventsClient<TracedChannel>,
    pub(crate) peer: PeerGatewayClient<TracedChannel>,
    pub(crate) tally: TalliesClient<TracedChannel>,
    pub(crate) registry: Registry,
    pub(crate) cache: cache::AdmissionCache,
    pub(crate) settings: Settings,
    admission: Arc<Admission>,
    /// Failed enrollments and session admissions per source (burst 10,
    /// then one every 6 s), checked before any internal call.
    pub(crate) enroll_throttle: Throttle,
    pub(crate) session_throttle: Throttle,
    tls: ArcSwapOption<ServerConfig>,
    not_after_ms: AtomicI64,
}

/// One gateway replica.
#[derive(Clone)]
pub struct UserGateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UserGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserGateway")
            .field("sessions", &self.inner.registry.len())
            .finish_non_exhaustive()
    }
}

impl UserGateway {
    pub fn new(clients: Clients, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                vault: KeyVaultClient::new(traced(clients.key_vault)),
                tickets: TicketsClient::new(traced(clients.tickets)),
                admin: AdminServiceClient::new(traced(clients.admin.clone())),
                events: UserEventsClient::new(traced(clients.admin)),
                peer: PeerGatewayClient::new(traced(clients.peer_gateway)),
                tally: TalliesClient::new(traced(clients.tally)),
                registry: Registry::default(),
                cache: cache::AdmissionCache::new(settings.admission_cache_ttl),
                admission: Admission::new(settings.admission),
                enroll_throttle: Throttle::default(),
                session_throttle: Throttle::default(),
                settings,
                tls: ArcSwapOption::empty(),
                not_after_ms: AtomicI64::new(0),
            }),
        }
    }

    /// Get a fresh certificate from key-vault for a new in-memory key, for
    /// the host name apps are told to connect to (`user_gateway.host` of the
    /// site configuration). Returns the certificate's expiry (Unix ms).
    pub async fn certify(&self) -> Result<i64, GatewayError> {
        let host = chipsite_gateway_cert::site_setting(&self.inner.admin, "user_gateway.host", "127.0.0.1")
            .await
            .map_err(|e| GatewayError::Certify(e.message().to_owned()))?;
        let issued = chipsite_gateway_cert::certify(&self.inner.vault, host, self.inner.settings.cert_ttl)
            .await
            .map_err(GatewayError::Certify)?;
        let config = server_config(issued.chain, issued.pkcs8)?;
        self.inner.tls.store(Some(Arc::new(config)));
        self.inner
            .not_after_ms
            .store(issued.not_after_ms, Ordering::Relaxed);
        Ok(issued.not_after_ms)
    }

    /// Retry [`Self::certify`] until it succeeds: key-vault may not be up
    /// yet, or sealed.
    pub async fn certify_first(&self) {
        chipsite_gateway_cert::until_certified("user gateway", || self.certify()).await;
    }

    /// Renew the certificate at two thirds of its remaining life.
    async fn keep_certified(self) {
        chipsite_gateway_cert::keep_certified("user gateway", &self.inner.not_after_ms, || self.certify())
            .await;
    }

    /// Serve apps on `listener` until `shutdown`: first wait for key-vault to
    /// certify the gateway (nothing is accepted before), then accept.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        tokio::pin!(shutdown);
        if self.inner.tls.load().is_none() {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = self.certify_first() => {}
            }
        }
        let mut renewing = AbortOnDrop(tokio::spawn(self.clone().keep_certified()));
        let (delivered, to_report) = tokio::sync::mpsc::channel(events::DELIVERED_QUEUE);
        let mut following = AbortOnDrop(tokio::spawn(events::follow(self.inner.clone(), delivered)));
        let mut reporting = AbortOnDrop(tokio::spawn(events::report_delivered(
            self.inner.clone(),
            to_report,
        )));
        // None of them ends by itself; if one does (a panic), say so and stop.
        let ended = async {
            tokio::select! {
                _ = &mut renewing.0 => "certificate renewal",
                _ = &mut following.0 => "user events",
                _ = &mut reporting.0 => "delivery reports",
            }
        };
        tokio::pin!(ended);
        tracing::info!(addr = ?listener.local_addr().ok(), "user gateway certified by the site key; accepting apps");
        // Never waits for a slot: a connection over a cap is closed at once
        // (shed) and the loop goes on accepting.
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                task = &mut ended => return self.task_ended(task),
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let accepted_at = tokio::time::Instant::now();
            let permit = match self.inner.admission.admit(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    conn::shed(peer, why);
                    continue;
                }
            };
            let Some(config) = self.inner.tls.load_full() else {
                continue;
            };
            tokio::spawn(conn::handle(
                self.inner.clone(),
                tcp,
                peer,
                config,
                permit,
                accepted_at,
            ));
        }
        self.inner.registry.close_all(CloseReason::ShuttingDown);
        Ok(())
    }
}

impl UserGateway {
    /// Whether key-vault has certified the gateway (it accepts nothing before).
    pub fn is_certified(&self) -> bool {
        self.inner.tls.load().is_some()
    }

    fn task_ended(&self, task: &'static str) -> Result<(), GatewayError> {
        tracing::error!(
            task,
            "a user gateway task ended unexpectedly; closing every session"
        );
        self.inner.registry.close_all(CloseReason::ShuttingDown);
        Err(GatewayError::TaskEnded(task))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a connection came from, for the ticket service's throttle and audit.
pub(crate) fn source_of(peer: SocketAddr) -> String {
    peer.ip().to_string()
}
