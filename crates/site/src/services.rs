//! Starting each service from its `Ctx`, the one shape every service has:
//! open its store, do its first-launch work, add its readiness checks, and
//! hand back the future that serves it (the service crate's own `serve`).

use std::{future::Future, sync::Arc};

use chipsite_admin::Admin;
use chipsite_key_vault::KeyVault;
use chipsite_ticket::Tickets;
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{ReloadableTls, identity as id};
use tokio::net::TcpListener;

use crate::SiteError;

fn served(service: &str) -> impl FnOnce(chipsite_grpc_server::ServeError) -> SiteError + '_ {
    move |e| SiteError::Serve(format!("{service}: {e}"))
}

/// key-vault's server (`chipsite_key_vault::serve`).
pub async fn serve_key_vault(
    vault: Arc<KeyVault>,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    chipsite_key_vault::serve(vault, listener, tls, shutdown)
        .await
        .map_err(served("key-vault"))
}

/// The ticket service's server (`chipsite_ticket::serve`).
pub async fn serve_ticket(
    tickets: Arc<Tickets>,
    key_vault: Channel,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    bench: bool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    chipsite_ticket::serve(tickets, key_vault, listener, tls, bench, shutdown)
        .await
        .map_err(served("ticket"))
}

/// admin's server with its alarm sweeper (`chipsite_admin::serve`).
pub async fn serve_admin(
    admin: Arc<Admin>,
    calls: chipsite_admin::Calls,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    bench: bool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    chipsite_admin::serve(admin, calls, listener, tls, bench, shutdown)
        .await
        .map_err(served("admin"))
}

use chipsite_console::Console;
use chipsite_peer_gateway::{Clients as PeerClients, PeerGateway, Settings as PeerSettings};
use chipsite_user_gateway::{Clients as GatewayClients, Settings as GatewaySettings, UserGateway};
use futures::FutureExt;

use crate::{Ctx, Report, Service, Started};

/// The user gateway's settings from the configuration's (validated) limits.
fn gateway_settings(l: &crate::config::GatewayLimits) -> GatewaySettings {
    use std::time::Duration;
    let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    GatewaySettings {
        limits: chipsite_wire::Limits {
            max_frame: usize::try_from(l.max_frame_bytes).unwrap_or(usize::MAX),
            idle: Duration::from_secs(l.session_idle_s),
            frame: Duration::from_millis(l.frame_timeout_ms),
        },
        enroll_timeout: Duration::from_millis(l.enroll_timeout_ms),
        cert_ttl: Duration::from_secs(l.cert_ttl_s),
        admission: chipsite_tls::AdmissionLimits {
            max_connections: size(l.max_connections),
            max_connections_per_source: size(l.max_connections_per_source),
            max_handshakes: size(l.max_handshakes),
            max_handshakes_per_source: size(l.max_handshakes_per_source),
        },
        max_sessions_per_user: size(l.max_sessions_per_user),
        handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
        write_timeout: Duration::from_millis(l.write_timeout_ms),
        ..GatewaySettings::default()
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
    let tickets = Arc::new(
        Tickets::open(db)
            .await?
            .with_clock(ctx.clock.clone())
            .with_retention(std::time::Duration::from_secs(
                ctx.config.ticket_retention_days.saturating_mul(86_400),
            )),
    );
    let key_vault = ctx.channel_to(Service::KeyVault)?;
    tracing::info!(service = "ticket", addr = ?listener.local_addr().ok(), "serving");
    Ok(Started {
        report: Report::default(),
        serving: serve_ticket(
            tickets,
            key_vault,
            listener,
            ctx.tls,
            ctx.dev,
            ctx.shutdown.wait(),
        )
        .boxed(),
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
        let peer: std::net::SocketAddr = a
            .peer
            .parse()
            .map_err(|e| SiteError::Config(format!("addresses.peer {:?}: {e}", a.peer)))?;
        admin
            .update_config(
                &[
                    ("user_gateway.host".to_owned(), gateway.ip().to_string()),
                    ("user_gateway.port".to_owned(), gateway.port().to_string()),
                    ("peer_gateway.host".to_owned(), peer.ip().to_string()),
                    ("peer_gateway.port".to_owned(), peer.port().to_string()),
                    ("console.url".to_owned(), format!("http://{}", a.console)),
                ]
                .into(),
                &[],
            )
            .await?;
        // A dev site holds its pass phrase, which starting the peer server
        // asks for: it starts running on the first launch (an operator's
        // later stop is kept).
        if admin.peer_server().await?.1 == 0 {
            admin.set_peer_server(true).await?;
        }
    }
    let calls = chipsite_admin::Calls {
        key_vault: ctx.channel_to(Service::KeyVault)?,
        tickets: ctx.channel_to(Service::Ticket)?,
        peer_gateway: ctx.channel_to(Service::PeerGateway)?,
        tally: ctx.channel_to(Service::Tally)?,
    };
    tracing::info!(service = "admin", addr = ?listener.local_addr().ok(), "serving");
    Ok(Started {
        report: Report {
            init_scripts_ran,
            ..Report::default()
        },
        serving: serve_admin(admin, calls, listener, ctx.tls, ctx.dev, ctx.shutdown.wait()).boxed(),
    })
}

pub(crate) async fn start_user_gateway(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listen = main_listener(&mut ctx, Service::UserGateway)?;
    let gateway = UserGateway::new(
        GatewayClients {
            key_vault: ctx.channel_to(Service::KeyVault)?,
            tickets: ctx.channel_to(Service::Ticket)?,
            admin: ctx.channel_to(Service::Admin)?,
            peer_gateway: ctx.channel_to(Service::PeerGateway)?,
            tally: ctx.channel_to(Service::Tally)?,
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

pub(crate) async fn start_peer_gateway(mut ctx: Ctx) -> Result<Started, SiteError> {
    let grpc = main_listener(&mut ctx, Service::PeerGateway)?.bind().await?;
    let peer = ctx
        .listener("peer")
        .ok_or_else(|| SiteError::Config("peer-gateway: no peer port (addresses.peer)".into()))?;
    let (bound, addr) = match peer {
        crate::Listen::Bound(l) => {
            let addr = crate::local_addr(&l)?;
            (Some(l), addr)
        }
        crate::Listen::At(a) => (
            None,
            a.parse()
                .map_err(|e| SiteError::Config(format!("addresses.peer {a:?}: {e}")))?,
        ),
    };
    let db = chipsite_store::connect(&ctx.config.database_url_for(Service::PeerGateway)).await?;
    store_ready(&ctx, "peer-gateway", &db);
    let gateway = Arc::new(
        PeerGateway::open(
            db,
            PeerClients {
                key_vault: ctx.channel_to(Service::KeyVault)?,
                tickets: ctx.channel_to(Service::Ticket)?,
                admin: ctx.channel_to(Service::Admin)?,
                tally: ctx.channel_to(Service::Tally)?,
            },
            {
                let defaults = PeerSettings::default();
                PeerSettings {
                    session_idle: std::time::Duration::from_secs(ctx.config.peer.session_idle_s),
                    limits: chipsite_wire::Limits {
                        idle: std::time::Duration::from_secs(ctx.config.peer.idle_s),
                        ..defaults.limits
                    },
                    ..defaults
                }
            },
        )
        .await
        .map_err(|e| SiteError::Serve(format!("peer-gateway: {e}")))?,
    );
    let certified = gateway.clone();
    ctx.ready.add("peer-gateway certified by the site key", move || {
        let ok = certified.is_certified();
        async move {
            ok.then_some(())
                .ok_or_else(|| "key-vault has not certified it (is the vault sealed?)".to_owned())
        }
    });
    tracing::info!(service = "peer-gateway", addr = ?grpc.local_addr().ok(), peer_port = %addr, "serving");
    let shutdown = ctx.shutdown.wait().shared();
    let tls = ctx.tls;
    let serving = async move {
        let internal = async {
            chipsite_peer_gateway::serve_grpc(gateway.clone(), grpc, tls, shutdown.clone())
                .await
                .map_err(|e| SiteError::Serve(format!("peer-gateway: {e}")))
        };
        let external = async {
            PeerGateway::clone(&gateway)
                .serve(bound, addr, shutdown.clone())
                .await
                .map_err(|e| SiteError::Serve(format!("peer-gateway: {e}")))
        };
        tokio::try_join!(internal, external).map(|_| ())
    };
    Ok(Started {
        report: Report::default(),
        serving: serving.boxed(),
    })
}

pub(crate) async fn start_tally(mut ctx: Ctx) -> Result<Started, SiteError> {
    let listener = main_listener(&mut ctx, Service::Tally)?.bind().await?;
    let db = chipsite_store::connect(&ctx.config.database_url_for(Service::Tally)).await?;
    store_ready(&ctx, "tally", &db);
    let tallies = Arc::new(
        chipsite_tally::Tallies::open(db, ctx.channel_to(Service::KeyVault)?)
            .await
            .map_err(|e| SiteError::Serve(format!("tally: {e}")))?,
    );
    tracing::info!(service = "tally", addr = ?listener.local_addr().ok(), "serving");
    let serving = async move {
        chipsite_tally::serve(tallies, listener, ctx.tls, ctx.shutdown.wait())
            .await
            .map_err(served("tally"))
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
    if let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
        && !ctx.config.console.plain_remote
    {
        return Err(SiteError::Config(format!(
            "addresses.console is {addr}: the console's plain-HTTP port listens on loopback only \
             (sign-in links and cookies would cross the network in the clear); use \
             addresses.console_https, or set console.plain_remote = true behind a TLS proxy"
        )));
    }
    let console = console(&ctx.config, &ctx.tls)?;
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
fn console(config: &crate::Config, tls: &Arc<ReloadableTls>) -> Result<Arc<Console>, SiteError> {
    use chipsite_console::{Check, Probe};
    let at = &config.addresses;
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
        grpc("peer-gateway", &at.peer_gateway, id::PEER_GATEWAY)?,
        grpc("tally", &at.tally, id::TALLY)?,
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
    Ok(Console::with_options(
        crate::channel(&at.admin, id::ADMIN, tls)?,
        crate::channel(&at.ticket, id::TICKET, tls)?,
        probes,
        chipsite_console::Options {
            hosts: config.console.host_names(),
            idle: std::time::Duration::from_secs(config.console.idle_s),
            ..Default::default()
        },
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
