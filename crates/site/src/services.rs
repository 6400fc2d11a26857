//! One function per service: serve it on an already-bound listener over
//! internal mutual TLS until `shutdown` resolves. Each server carries gRPC
//! health, server reflection and its authorization policy.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use chipsite_admin::{Admin, AdminGrpc, Notifier, UserEventsGrpc};
use chipsite_key_vault::{KeyVault, KeyVaultGrpc};
use chipsite_proto::{
    admin::v1::admin_service_server::AdminServiceServer, events::v1::user_events_server::UserEventsServer,
    keyvault::v1::key_vault_server::KeyVaultServer, ticket::v1::tickets_server::TicketsServer,
};
use chipsite_ticket::{Tickets, TicketsGrpc};
use chipsite_tls::{AuthzLayer, Policy, ReloadableTls, identity as id, tls_incoming};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};

use crate::SiteError;

/// How long a stopping server waits for open calls and streams (a health
/// `Watch` never ends by itself) before it stops anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Runs each call's handler on a task of its own, so a caller that goes away
/// mid-call cannot cut a command short between its writes and its audit record.
#[derive(Debug, Clone, Default)]
pub struct RunToCompletionLayer;

impl<S> tower::Layer<S> for RunToCompletionLayer {
    type Service = RunToCompletion<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RunToCompletion { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RunToCompletion<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RunToCompletion<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The task keeps the call's span (and so its trace context).
        let span = tracing::Span::current();
        let call = tokio::spawn(tracing::Instrument::instrument(
            async move { inner.call(request).await },
            span,
        ));
        Box::pin(async move {
            match call.await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(error = %e, "a call handler failed");
                    let status = chipsite_proto::status::status(
                        chipsite_proto::status::ErrorCode::Internal,
                        "internal error",
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Serve until `shutdown`, then drain for at most [`DRAIN_GRACE`].
async fn serve_until<F>(server: F, stopping: tokio::sync::watch::Receiver<bool>) -> Result<(), SiteError>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut stopping = stopping;
    let grace = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::select! {
        result = server => result.map_err(|e| SiteError::Serve(e.to_string())),
        () = grace => {
            tracing::warn!("calls still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Health for every identity; reflection for the operator and console.
fn with_common(p: Policy) -> Policy {
    p.allow("/grpc.health.v1.Health/", id::ALL)
        .allow(
            "/grpc.reflection.v1.ServerReflection/",
            &[id::ADMIN_CLIENT, id::CONSOLE],
        )
        .allow(
            "/grpc.reflection.v1alpha.ServerReflection/",
            &[id::ADMIN_CLIENT, id::CONSOLE],
        )
}

/// Server reflection advertising a server's own services (with health and reflection).
fn reflection(services: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    services
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, s| {
            b.with_service_name(*s)
        })
        .register_encoded_file_descriptor_set(chipsite_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

macro_rules! serve_with {
    ([$($svc:expr => $server_ty:ty),+], $policy:expr, $run_to_completion:expr, $listener:expr, $tls:expr, $shutdown:expr) => {{
        let names = [$(<$server_ty as tonic::server::NamedService>::NAME),+];
        let (reporter, health) = tonic_health::server::health_reporter();
        $(reporter.set_serving::<$server_ty>().await;)+
        let reflection_v1 = reflection(&names)
            .build_v1()
            .map_err(|e| SiteError::Io(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection(&names)
            .build_v1alpha()
            .map_err(|e| SiteError::Io(format!("reflection: {e}")))?;
        chipsite_telemetry::install_propagator();
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            $shutdown.await;
            // Draining: health says so at once, to probes and watchers alike.
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            $(reporter.set_not_serving::<$server_ty>().await;)+
            let _ = stopping_tx.send(true);
        };
        let server = Server::builder()
            .layer(chipsite_telemetry::TraceContextLayer)
            .layer(AuthzLayer::new(with_common($policy)))
            // Inside the policy: only calls it let through are counted, so
            // a caller cannot mint label values with made-up paths.
            .layer(chipsite_telemetry::metrics::RpcMetricsLayer)
            .layer(tower::util::option_layer(
                $run_to_completion.then_some(RunToCompletionLayer),
            ))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            $(.add_service($svc))+
            .serve_with_incoming_shutdown(tls_incoming($listener, $tls), shutdown);
        serve_until(server, stopping).await
    }};
}

pub async fn serve_key_vault(
    vault: Arc<KeyVault>,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = KeyVaultServer<KeyVaultGrpc>;
    let svc = S::new(KeyVaultGrpc(vault));
    serve_with!(
        [svc => S],
        chipsite_key_vault::policy(),
        true,
        listener,
        tls,
        shutdown
    )
}

pub async fn serve_ticket(
    tickets: Arc<Tickets>,
    key_vault: Channel,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = TicketsServer<TicketsGrpc>;
    let svc = S::new(TicketsGrpc::new(tickets, key_vault));
    // Every ticket operation is a single atomic statement (or transaction), so
    // a call cut short leaves nothing half done: no extra task per call on
    // this hot path.
    serve_with!([svc => S], chipsite_ticket::policy(), false, listener, tls, shutdown)
}

pub async fn serve_admin(
    admin: Arc<Admin>,
    key_vault: Channel,
    tickets: Channel,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = AdminServiceServer<AdminGrpc>;
    type E = UserEventsServer<UserEventsGrpc>;
    let notifier = Notifier::new(admin.clone(), chipsite_admin::notify::DELIVERY_WINDOW);
    let mut sweeper = notifier.spawn_sweeper();
    let events = E::new(UserEventsGrpc::new(admin.clone(), notifier));
    let svc = S::new(AdminGrpc::new(admin, key_vault, tickets));
    let served = async {
        serve_with!(
            [svc => S, events => E],
            chipsite_admin::policy(),
            true,
            listener,
            tls,
            shutdown
        )
    };
    // The alarm sweeper never ends by itself: if it does, admin stops
    // rather than leave alarms undelivered unnoticed.
    let result = tokio::select! {
        served = served => served,
        ended = &mut sweeper => Err(SiteError::Serve(format!("admin: the alarm sweeper ended: {ended:?}"))),
    };
    sweeper.abort();
    result
}

// ---------------------------------------------------------------------------
// Starting each service from its `Ctx`: the one shape every service has.

use chipsite_console::Console;
use chipsite_user_gateway::{Clients as GatewayClients, Settings as GatewaySettings, UserGateway};
use futures::FutureExt;

use crate::{Ctx, Report, Service, Started, config::Addresses};

/// The user gateway's settings from the configuration's (validated) limits.
fn gateway_settings(l: &crate::config::GatewayLimits) -> GatewaySettings {
    use std::time::Duration;
    GatewaySettings {
        limits: chipsite_wire::Limits {
            max_frame: usize::try_from(l.max_frame_bytes).unwrap_or(usize::MAX),
            idle: Duration::from_secs(l.session_idle_s),
            frame: Duration::from_millis(l.frame_timeout_ms),
        },
        enroll_timeout: Duration::from_millis(l.enroll_timeout_ms),
        cert_ttl: Duration::from_secs(l.cert_ttl_s),
        max_handshakes: usize::try_from(l.max_handshakes).unwrap_or(usize::MAX),
        handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
    }
}

/// `/readyz` checks that the service's store answers.
fn store_ready(ctx: &Ctx, service: &str, db: &chipsite_store::DatabaseConnection) {
    let db = db.clone();
    ctx.ready.add(format!("{service} store"), move || {
        let db = db.clone();
        async move { db.ping().await.map_err(|e| e.to_string()) }
    });
}

fn main_listener(ctx: &mut Ctx, service: Service) -> Result<crate::Listen, SiteError> {
    let name = service.listeners()[0];
    ctx.listener(name)
        .ok_or_else(|| SiteError::Config(format!("{}: no address to listen on", service.identity())))
}

pub(crate) async fn start_key_vault(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listener = main_listener(&mut ctx, Service::KeyVault)?.bind().await?;
    let db = chipsite_store::connect(&ctx.config.database_url_for(Service::KeyVault)).await?;
    store_ready(&ctx, "key-vault", &db);
    let vault = Arc::new(KeyVault::open(db).await?);
    let mut report = Report::default();
    // The pass phrase, when the site has one (dev's file; an operator's
    // mounted secret for `serve`): create the key on first launch, unseal
    // on every start. A wrong one leaves the vault sealed, not the site down.
    match &ctx.passphrase {
        Some(p) => {
            report.created_site_key = vault.ensure_site_key(p).await?;
            report.unsealed = Some(
                report.created_site_key
                    || match vault.unseal(p).await {
                        Ok(_) => true,
                        Err(e) if !ctx.dev => return Err(e.into()),
                        Err(e) => {
                            tracing::warn!(error = %e, "the pass phrase given does not open the site key; the vault stays sealed (unseal it with chipsctl)");
                            false
                        }
                    },
            );
        }
        None if !vault.status().await?.has_key => {
            tracing::warn!("no site key yet: create one with `chipsctl key create`");
        }
        None => {}
    }
    tracing::info!(service = "key-vault", addr = ?listener.local_addr().ok(), "serving");
    Ok(Started {
        report,
        serving: serve_key_vault(vault, listener, ctx.tls, ctx.shutdown.wait()).boxed(),
    })
}

pub(crate) async fn start_ticket(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listener = main_listener(&mut ctx, Service::Ticket)?.bind().await?;
    let db = chipsite_store::connect(&ctx.config.database_url_for(Service::Ticket)).await?;
    store_ready(&ctx, "ticket", &db);
    let tickets = Arc::new(Tickets::open(db).await?.with_clock(ctx.clock.clone()));
    let key_vault = ctx.channel_to(Service::KeyVault)?;
    tracing::info!(service = "ticket", addr = ?listener.local_addr().ok(), "serving");
    Ok(Started {
        report: Report::default(),
        serving: serve_ticket(tickets, key_vault, listener, ctx.tls, ctx.shutdown.wait()).boxed(),
    })
}

pub(crate) async fn start_admin(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listener = main_listener(&mut ctx, Service::Admin)?.bind().await?;
    let admin = Arc::new(crate::open_admin(&ctx.config).await?);
    store_ready(&ctx, "admin", admin.db());
    let init_scripts_ran = admin.run_init_scripts(&ctx.config.init_dir()).await?;
    if ctx.dev {
        // A dev site knows where its user gateway and console listen:
        // tickets and sign-in links name them.
        let a = &ctx.config.addresses;
        let gateway: std::net::SocketAddr = a
            .user_gateway
            .parse()
            .map_err(|e| SiteError::Config(format!("addresses.user_gateway {:?}: {e}", a.user_gateway)))?;
        admin
            .update_config(
                &[
                    ("user_gateway.host".to_owned(), gateway.ip().to_string()),
                    ("user_gateway.port".to_owned(), gateway.port().to_string()),
                    ("console.url".to_owned(), format!("http://{}", a.console)),
                ]
                .into(),
                &[],
            )
            .await?;
    }
    let key_vault = ctx.channel_to(Service::KeyVault)?;
    let tickets = ctx.channel_to(Service::Ticket)?;
    tracing::info!(service = "admin", addr = ?listener.local_addr().ok(), "serving");
    Ok(Started {
        report: Report {
            init_scripts_ran,
            ..Report::default()
        },
        serving: serve_admin(admin, key_vault, tickets, listener, ctx.tls, ctx.shutdown.wait()).boxed(),
    })
}

pub(crate) async fn start_user_gateway(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listen = main_listener(&mut ctx, Service::UserGateway)?;
    let gateway = UserGateway::new(
        GatewayClients {
            key_vault: ctx.channel_to(Service::KeyVault)?,
            tickets: ctx.channel_to(Service::Ticket)?,
            admin: ctx.channel_to(Service::Admin)?,
        },
        gateway_settings(&ctx.config.gateway),
    );
    let certified = gateway.clone();
    ctx.ready.add("user-gateway certified by the site key", move || {
        let ok = certified.is_certified();
        async move {
            ok.then_some(())
                .ok_or_else(|| "key-vault has not certified it (is the vault sealed?)".to_owned())
        }
    });
    let shutdown = ctx.shutdown;
    let serving = async move {
        // An address not yet bound is bound only once key-vault has
        // certified the gateway: nothing listens before it can serve.
        let listener = match listen {
            crate::Listen::Bound(l) => l,
            crate::Listen::At(addr) => {
                tokio::select! {
                    () = shutdown.clone().wait() => return Ok(()),
                    () = gateway.certify_first() => {}
                }
                crate::bind(&addr).await?
            }
        };
        tracing::info!(service = "user-gateway", addr = ?listener.local_addr().ok(), "serving");
        Ok(gateway.serve(listener, shutdown.wait()).await?)
    };
    Ok(Started {
        report: Report::default(),
        serving: serving.boxed(),
    })
}

pub(crate) async fn start_console(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listener = main_listener(&mut ctx, Service::Console)?.bind().await?;
    let https = match ctx.listener("console-https") {
        Some(l) => Some(l.bind().await?),
        None => None,
    };
    let console = console(&ctx.config.addresses, &ctx.tls)?;
    tracing::info!(service = "console", addr = ?listener.local_addr().ok(), https = ?https.as_ref().and_then(|l| l.local_addr().ok()), "serving");
    let shutdown = ctx.shutdown.wait().shared();
    let tls = ctx.tls;
    let serving = async move {
        let plain = chipsite_console::serve(console.clone(), listener, shutdown.clone());
        let secure = async {
            match https {
                Some(l) => chipsite_console::serve_https(console, l, tls, shutdown).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(plain, secure)
            .map(|_| ())
            .map_err(|e| SiteError::Serve(format!("console: {e}")))
    };
    Ok(Started {
        report: Report::default(),
        serving: serving.boxed(),
    })
}

/// The console, with the services its health page checks and where they listen.
fn console(at: &Addresses, tls: &Arc<ReloadableTls>) -> Result<Arc<Console>, SiteError> {
    use chipsite_console::{Check, Probe};
    let grpc = |name: &'static str, addr: &str, identity: &str| -> Result<Probe, SiteError> {
        Ok(Probe {
            name,
            addr: addr.to_owned(),
            check: Check::Grpc(crate::channel(addr, identity, tls)?),
        })
    };
    let mut probes = vec![
        grpc("admin", &at.admin, id::ADMIN)?,
        grpc("key-vault", &at.key_vault, id::KEY_VAULT)?,
        grpc("ticket", &at.ticket, id::TICKET)?,
        Probe {
            name: "user-gateway",
            addr: at.user_gateway.clone(),
            check: Check::Accepts,
        },
        Probe {
            name: "console",
            addr: at.console.clone(),
            check: Check::ThisConsole,
        },
    ];
    if !at.console_https.is_empty() {
        probes.push(Probe {
            name: "console (HTTPS, admin certificate)",
            addr: at.console_https.clone(),
            check: Check::Accepts,
        });
    }
    Ok(Console::with_probes(
        crate::channel(&at.admin, id::ADMIN, tls)?,
        crate::channel(&at.ticket, id::TICKET, tls)?,
        probes,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The configured defaults are the gateway's own (what docs/protocol.md states).
    #[test]
    fn default_gateway_limits_are_the_documented_ones() {
        let from_config = gateway_settings(&crate::config::GatewayLimits::default());
        let documented = GatewaySettings::default();
        assert_eq!(format!("{from_config:?}"), format!("{documented:?}"));
    }

    #[test]
    fn gateway_limits_out_of_range_are_refused_by_name() {
        let mut l = crate::config::GatewayLimits::default();
        assert_eq!(l.validate(), Ok(()));
        l.max_frame_bytes = 10;
        let e = l.validate().unwrap_err();
        assert!(e.contains("gateway.max_frame_bytes = 10 is out of range"), "{e}");
    }
}
