//! A chipsite site in-process: `chipsite dev` (every service, one process,
//! internal mutual TLS on loopback, SQLite in a data directory) and
//! `chipsite serve <service>` (one service, for containers). Tests use the
//! same entry points.

pub mod config;
pub mod dev;
pub mod ops;
pub mod pki;
pub mod services;

use std::{collections::HashMap, future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use chipsite_admin::Admin;
use chipsite_proto::admin::v1::admin_service_client::AdminServiceClient;
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{CertPaths, ReloadableTls, identity as id};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use zeroize::Zeroizing;

pub use config::{Addresses, Config, Service};

/// How often certificate files are checked for replacement.
const CERT_POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("{0}")]
    Io(String),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error(transparent)]
    Tls(#[from] chipsite_tls::TlsError),
    #[error(transparent)]
    Store(#[from] chipsite_store::StoreError),
    #[error("key-vault: {0}")]
    Vault(#[from] chipsite_key_vault::VaultError),
    #[error("ticket: {0}")]
    Ticket(#[from] chipsite_ticket::TicketError),
    #[error("admin: {0}")]
    Admin(#[from] chipsite_admin::AdminError),
    #[error("user gateway: {0}")]
    Gateway(#[from] chipsite_user_gateway::GatewayError),
    #[error("server: {0}")]
    Serve(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    NoSite(#[from] chipsite_model::endpoints::NoSite),
    #[error("{task} ended: {why}")]
    Ended { task: String, why: String },
}

/// Where a running dev site listens (`endpoints.json`): the shared type.
pub use chipsite_model::endpoints::Endpoints;

/// A mutual-TLS AdminService client presenting `identity`'s certificate.
pub fn admin_client(admin_addr: &str, certs: &CertPaths) -> Result<AdminServiceClient<Channel>, SiteError> {
    Ok(AdminServiceClient::new(admin_channel(admin_addr, certs)?))
}

/// A mutual-TLS channel to the admin service (AdminService and UserEvents)
/// presenting `identity`'s certificate.
pub fn admin_channel(admin_addr: &str, certs: &CertPaths) -> Result<Channel, SiteError> {
    let tls = ReloadableTls::from_files(certs.clone())?;
    chipsite_tls::connect_lazy(admin_addr, id::ADMIN, tls).map_err(|e| SiteError::Config(e.to_string()))
}

pub(crate) async fn bind(addr: &str) -> Result<TcpListener, SiteError> {
    TcpListener::bind(addr).await.map_err(|e| SiteError::Bind {
        addr: addr.to_owned(),
        message: e.to_string(),
    })
}

pub(crate) fn local_addr(l: &TcpListener) -> Result<SocketAddr, SiteError> {
    l.local_addr().map_err(|e| SiteError::Io(e.to_string()))
}

pub(crate) fn channel(addr: &str, identity: &str, tls: &Arc<ReloadableTls>) -> Result<Channel, SiteError> {
    chipsite_tls::connect_lazy(addr, identity, tls.clone()).map_err(|e| SiteError::Config(e.to_string()))
}

/// A shutdown signal shared by every server of a site.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether the site has been asked to stop.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// Where a service serves: a listener already bound (dev and tests bind
/// every port first, so that port 0 is resolved before any service is told
/// where the others are), or an address the service binds when it is ready
/// (`serve`: the user gateway binds only once key-vault has certified it).
#[derive(Debug)]
pub enum Listen {
    Bound(TcpListener),
    At(String),
}

impl Listen {
    pub async fn bind(self) -> Result<TcpListener, SiteError> {
        match self {
            Self::Bound(l) => Ok(l),
            Self::At(addr) => bind(&addr).await,
        }
    }
}

/// What every service starts with, the same shape for each: the site's
/// configuration (with `addresses` saying where every service is reached),
/// its own TLS material, its named listeners ([`Service::listeners`]), the
/// shutdown signal, and the few facts of how the site was launched.
pub struct Ctx {
    pub config: Config,
    pub tls: Arc<ReloadableTls>,
    listeners: HashMap<&'static str, Listen>,
    pub shutdown: Shutdown,
    /// The site key pass phrase, when the site was given one (dev's file,
    /// or `CHIPSITE_SITE_KEY_PASSPHRASE` / `CHIPSITE_SITE_KEY_PASSPHRASE_FILE`
    /// for `serve key-vault`): key-vault creates the key on first launch and
    /// unseals with it.
    pub passphrase: Option<Zeroizing<String>>,
    /// Dev mode: admin records where the user gateway and console listen, so
    /// that tickets and sign-in links name them; a pass phrase that does not
    /// open the site key leaves the vault sealed (`serve` refuses to start).
    pub dev: bool,
    /// The site's clock (the system's; tests move it to expire tickets).
    pub clock: chipsite_store::Clock,
    /// What this process's `/readyz` checks; each service adds its own.
    pub ready: Arc<ops::Readiness>,
}

impl Ctx {
    /// The listener named `name` (one of [`Service::listeners`]); `None` for
    /// an optional one that is switched off (an empty address).
    pub fn listener(&mut self, name: &'static str) -> Option<Listen> {
        self.listeners.remove(name)
    }

    /// A mutual-TLS channel to another service of the site, as this one.
    pub fn channel_to(&self, to: Service) -> Result<Channel, SiteError> {
        channel(self.config.addresses.of(to), to.identity(), &self.tls)
    }
}

/// What starting a service found out (first-launch facts for `chipsite dev`).
#[derive(Debug, Default)]
pub struct Report {
    pub created_site_key: bool,
    pub unsealed: Option<bool>,
    pub init_scripts_ran: Vec<String>,
}

/// A started service: its report, and the future that serves it (with its
/// background tasks) until the shutdown signal.
pub struct Started {
    pub report: Report,
    pub serving: futures::future::BoxFuture<'static, Result<(), SiteError>>,
}

impl Service {
    /// Start this service: open its store, run its first-launch work, and
    /// return the future that serves it. Adding a service is one variant of
    /// [`Service`] (its identity, its listeners) and one arm here.
    pub async fn start(self, ctx: Ctx) -> Result<Started, SiteError> {
        match self {
            Service::KeyVault => services::start_key_vault(ctx).await,
            Service::Ticket => services::start_ticket(ctx).await,
            Service::Admin => services::start_admin(ctx).await,
            Service::UserGateway => services::start_user_gateway(ctx).await,
            Service::PeerGateway => services::start_peer_gateway(ctx).await,
            Service::Tally => services::start_tally(ctx).await,
            Service::Console => services::start_console(ctx).await,
        }
    }
}

/// Runs a site's services and background tasks, and notices at once when
/// one of them ends before the site is asked to stop.
#[derive(Default)]
struct Supervisor {
    tasks: JoinSet<Result<(), SiteError>>,
    names: HashMap<tokio::task::Id, String>,
    /// Background tasks with nothing in flight: stopped at once on shutdown.
    background: Vec<tokio::task::AbortHandle>,
}

impl Supervisor {
    fn spawn(&mut self, name: String, task: impl Future<Output = Result<(), SiteError>> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// A background task that never ends by itself.
    fn watch(&mut self, name: String, task: Option<JoinHandle<()>>) {
        if let Some(task) = task {
            self.background.push(task.abort_handle());
            self.spawn(name, async move {
                match task.await {
                    // Aborted by `drain`: the site is stopping.
                    Err(e) if e.is_cancelled() => Ok(()),
                    ended => ended.map_err(|e| SiteError::Serve(e.to_string())),
                }
            });
        }
    }

    /// Wait for the first task to end (each should run until shutdown):
    /// which one, and why.
    async fn first_end(&mut self) -> (String, String) {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, why) = match ended {
            Ok((id, Ok(()))) => (id, "it stopped by itself".to_owned()),
            Ok((id, Err(e))) => (id, e.to_string()),
            Err(e) => (e.id(), format!("it failed: {e}")),
        };
        (self.names.remove(&id).unwrap_or_default(), why)
    }

    /// Let every task finish for up to `grace` after the stop signal.
    async fn drain(mut self, grace: Duration) {
        for task in &self.background {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(None) => return,
                Ok(Some(Ok((id, Ok(()))))) => {
                    self.names.remove(&id);
                }
                Ok(Some(Ok((id, Err(e))))) => {
                    let service = self.names.remove(&id).unwrap_or_default();
                    tracing::warn!(%service, error = %e, "service ended with an error");
                }
                Ok(Some(Err(e))) if e.is_cancelled() => {
                    self.names.remove(&e.id());
                }
                Ok(Some(Err(e))) => {
                    let service = self.names.remove(&e.id()).unwrap_or_default();
                    tracing::warn!(%service, error = %e, "service task failed");
                }
                Err(_) => {
                    let left: Vec<_> = self.names.values().cloned().collect();
                    tracing::warn!(?left, "not every service stopped within the grace period");
                    self.tasks.abort_all();
                    return;
                }
            }
        }
    }
}

/// How a site is launched: which services run in this process, where each
/// of their listeners is, and the site key pass phrase if any.
struct Launch {
    services: Vec<Service>,
    config: Config,
    listeners: HashMap<&'static str, Listen>,
    tls: HashMap<Service, Arc<ReloadableTls>>,
    passphrase: Option<Zeroizing<String>>,
    dev: bool,
    clock: chipsite_store::Clock,
    /// The ops port (`/livez`, `/readyz`, `/metrics`), if any.
    ops: Option<Listen>,
}

/// Start `launch`'s services in order, each under supervision, with the ops
/// port answering from the first moment (not ready until all have started).
async fn launch(l: Launch) -> Result<(Supervisor, watch::Sender<bool>, Report), SiteError> {
    let (stop, stop_rx) = watch::channel(false);
    let mut supervisor = Supervisor::default();
    let mut report = Report::default();
    let ready = ops::Readiness::new(Shutdown(stop_rx.clone()));
    if let Some(listen) = l.ops {
        let listener = listen.bind().await?;
        tracing::info!(addr = ?listener.local_addr().ok(), "ops port (/livez, /readyz, /metrics)");
        supervisor.spawn(
            "ops port".into(),
            ops::serve(listener, ready.clone(), Shutdown(stop_rx.clone())),
        );
    }
    let mut listeners = l.listeners;
    if l.config.internal_tcp {
        // Process-wide: every internal call of this process takes TCP and TLS.
        chipsite_tls::local::set_enabled(false);
    }
    for service in l.services {
        let tls = l
            .tls
            .get(&service)
            .cloned()
            .ok_or_else(|| SiteError::Config(format!("no certificate for {}", service.identity())))?;
        supervisor.watch(
            format!("{} certificate watcher", service.identity()),
            tls.spawn_watcher(CERT_POLL),
        );
        let ctx = Ctx {
            config: l.config.clone(),
            tls,
            listeners: service
                .listeners()
                .iter()
                .filter_map(|name| Some((*name, listeners.remove(name)?)))
                .collect(),
            shutdown: Shutdown(stop_rx.clone()),
            // Only key-vault ever sees the pass phrase.
            passphrase: (service == Service::KeyVault)
                .then(|| l.passphrase.clone())
                .flatten(),
            dev: l.dev,
            clock: l.clock.clone(),
            ready: ready.clone(),
        };
        let started = service.start(ctx).await?;
        report.created_site_key |= started.report.created_site_key;
        report.unsealed = report.unsealed.or(started.report.unsealed);
        report.init_scripts_ran.extend(started.report.init_scripts_ran);
        supervisor.spawn(service.identity().to_owned(), started.serving);
    }
    ready.started();
    Ok((supervisor, stop, report))
}

/// A running site (every service in this process).
pub struct Site {
    pub endpoints: Endpoints,
    /// Whether this start created the site key (first launch).
    pub created_site_key: bool,
    /// Init scripts that ran during this start.
    pub init_scripts_ran: Vec<String>,
    /// Whether the vault is unsealed (dev unseals with its pass phrase file).
    pub unsealed: bool,
    /// The clock every service of this site judges time by: the system's,
    /// unless a test moves it forward.
    pub clock: chipsite_store::Clock,
    stop: watch::Sender<bool>,
    supervisor: Supervisor,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Site {
    /// Start every service of a dev site: PKI and pass phrase in the data
    /// directory, first launch (tables, init scripts, site key), then serve.
    pub async fn start_dev(config: &Config) -> Result<Site, SiteError> {
        chipsite_tls::install_crypto_provider();
        let data = &config.data_dir;
        chipsite_model::files::private_dir(data)
            .map_err(|e| SiteError::Io(format!("{}: {e}", data.display())))?;
        dev::ensure_pki(data, "dev")?;
        let passphrase = dev::ensure_passphrase(data)?;

        // Every listener first, so that each service is told where the
        // others really listen (port 0 resolved).
        let mut config = config.clone();
        let mut listeners = HashMap::new();
        for service in Service::ALL {
            for name in service.listeners() {
                let addr = config.addresses.named(name).to_owned();
                if addr.is_empty() {
                    continue;
                }
                let l = bind(&addr).await?;
                *config.addresses.named_mut(name) = local_addr(&l)?.to_string();
                listeners.insert(*name, Listen::Bound(l));
            }
        }
        // Dev always has an ops port.
        let ops = match config.addresses.ops.as_str() {
            "" => config::DEV_OPS.to_owned(),
            addr => addr.to_owned(),
        };
        let l = bind(&ops).await?;
        config.addresses.ops = local_addr(&l)?.to_string();
        let ops = Some(Listen::Bound(l));
        let tls = Service::ALL
            .into_iter()
            .map(|s| Ok((s, ReloadableTls::from_files(dev::cert_paths(data, s.identity()))?)))
            .collect::<Result<HashMap<_, _>, SiteError>>()?;
        let clock = chipsite_store::Clock::default();
        let (supervisor, stop, report) = launch(Launch {
            services: START_ORDER.to_vec(),
            config: config.clone(),
            listeners,
            tls,
            passphrase: Some(Zeroizing::new(passphrase)),
            dev: true,
            clock: clock.clone(),
            ops,
        })
        .await?;

        let a = &config.addresses;
        let client = dev::cert_paths(data, id::ADMIN_CLIENT);
        let endpoints = Endpoints {
            admin: a.admin.clone(),
            key_vault: a.key_vault.clone(),
            ticket: a.ticket.clone(),
            user_gateway: a.user_gateway.clone(),
            peer_gateway: a.peer_gateway.clone(),
            peer: a.peer.clone(),
            tally: a.tally.clone(),
            console: format!("http://{}", a.console),
            console_https: match a.console_https.as_str() {
                "" => String::new(),
                https => format!("https://{https}"),
            },
            ops: match a.ops.as_str() {
                "" => String::new(),
                ops => format!("http://{ops}"),
            },
            ca: client.ca.clone(),
            admin_client_cert: client.cert,
            admin_client_key: client.key,
            data_dir: data.clone(),
            pid: std::process::id(),
        };
        let json = serde_json::to_string_pretty(&endpoints).map_err(|e| SiteError::Io(e.to_string()))?;
        // Atomically, so chipsctl never reads half a file.
        let tmp = Endpoints::path(data).with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| SiteError::Io(e.to_string()))?;
        std::fs::rename(&tmp, Endpoints::path(data)).map_err(|e| SiteError::Io(e.to_string()))?;
        Ok(Site {
            endpoints,
            created_site_key: report.created_site_key,
            init_scripts_ran: report.init_scripts_ran,
            unsealed: report.unsealed.unwrap_or(false),
            clock,
            stop,
            supervisor,
        })
    }

    /// An AdminService client with the operator's certificate.
    pub fn admin_client(&self) -> Result<AdminServiceClient<Channel>, SiteError> {
        admin_client(
            &self.endpoints.admin,
            &self.endpoints.cert_paths(id::ADMIN_CLIENT),
        )
    }

    /// Serve until `stop` resolves, then stop cleanly; or, if a service or a
    /// background task ends first, log it at once, stop the rest and return
    /// the error (so `chipsite dev` exits non-zero).
    pub async fn run_until(
        mut self,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<(), SiteError> {
        tokio::select! {
            () = stop => self.shutdown(grace).await,
            (task, why) = self.supervisor.first_end() => {
                tracing::error!(%task, error = %why, "a service of the site ended; stopping the site");
                self.shutdown(grace).await?;
                Err(SiteError::Ended { task, why })
            }
        }
    }

    /// Stop every server, letting in-flight calls finish for up to `grace`.
    pub async fn shutdown(self, grace: Duration) -> Result<(), SiteError> {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(Endpoints::path(&self.endpoints.data_dir));
        self.supervisor.drain(grace).await;
        Ok(())
    }
}

/// The order services start in: admin first (its init scripts run before
/// anything else happens on a first launch, the site key included), then
/// the stores' other owners, then the gateway and console, which call them.
/// Channels between services connect lazily, so an early service never
/// waits for a later one.
const START_ORDER: [Service; 7] = [
    Service::Admin,
    Service::Ticket,
    Service::KeyVault,
    Service::Tally,
    Service::PeerGateway,
    Service::UserGateway,
    Service::Console,
];

/// `chipsite serve <service>`: one service, configured from file and
/// environment, until `shutdown` resolves; an error if the service (or one of
/// its background tasks) ends before that.
pub async fn serve_one(
    config: &Config,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SiteError> {
    chipsite_tls::install_crypto_provider();
    let files = config.tls.clone().ok_or_else(|| {
        SiteError::Config(
            "serve needs certificate files: set tls.cert, tls.key and tls.ca (CHIPSITE_TLS__CERT, ...)"
                .into(),
        )
    })?;
    let tls = ReloadableTls::from_files(CertPaths {
        cert: files.cert,
        key: files.key,
        ca: files.ca,
    })?;
    let mut listeners = HashMap::new();
    for (i, name) in service.listeners().iter().enumerate() {
        let addr = match (i, config.listen) {
            (0, Some(a)) => a.to_string(),
            _ => config.addresses.named(name).to_owned(),
        };
        if !addr.is_empty() {
            listeners.insert(*name, Listen::At(addr));
        }
    }
    // Before anything is migrated or served: a second admin, key-vault or
    // tally against the same database stops here, naming why.
    let single = if service.must_run_alone() {
        chipsite_store::claim_single(&config.database_url_for(service), service.identity()).await?
    } else {
        None
    };
    let (mut supervisor, stop, _) = launch(Launch {
        services: vec![service],
        config: config.clone(),
        listeners,
        tls: [(service, tls)].into(),
        passphrase: match service {
            Service::KeyVault => passphrase_from_env()?,
            _ => None,
        },
        dev: false,
        clock: chipsite_store::Clock::default(),
        ops: match config.addresses.ops.as_str() {
            "" => None,
            addr => Some(Listen::At(addr.to_owned())),
        },
    })
    .await?;
    if let Some(single) = single {
        supervisor.watch(
            "single-instance lock".into(),
            Some(tokio::spawn(async move {
                if let Err(e) = single.hold(Duration::from_secs(5)).await {
                    tracing::error!(error = %e, "stopping");
                }
            })),
        );
    }
    tokio::select! {
        () = shutdown => {
            let _ = stop.send(true);
            supervisor.drain(Duration::from_secs(15)).await;
            Ok(())
        }
        (task, why) = supervisor.first_end() => {
            tracing::error!(%task, error = %why, "the service ended; stopping");
            let _ = stop.send(true);
            supervisor.drain(Duration::from_secs(15)).await;
            Err(SiteError::Ended { task, why })
        }
    }
}

/// The operator's site key pass phrase for `serve`: from
/// `CHIPSITE_SITE_KEY_PASSPHRASE_FILE` (a mounted secret) or
/// `CHIPSITE_SITE_KEY_PASSPHRASE`; never from a flag, never written anywhere.
fn passphrase_from_env() -> Result<Option<Zeroizing<String>>, SiteError> {
    if let Some(path) = std::env::var_os("CHIPSITE_SITE_KEY_PASSPHRASE_FILE") {
        let fail = |e: String| {
            SiteError::Config(format!(
                "CHIPSITE_SITE_KEY_PASSPHRASE_FILE {}: {e}",
                Path::new(&path).display()
            ))
        };
        let bytes =
            chipsite_model::files::read_private(Path::new(&path), chipsite_model::files::Strictness::Mounted)
                .map_err(|e| fail(e.to_string()))?;
        let text = Zeroizing::new(String::from_utf8(bytes).map_err(|_| fail("not UTF-8".into()))?);
        return Ok(Some(Zeroizing::new(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        )));
    }
    Ok(std::env::var("CHIPSITE_SITE_KEY_PASSPHRASE")
        .ok()
        .map(Zeroizing::new))
}

/// Admin's store, with its user events on PostgreSQL LISTEN/NOTIFY when
/// the store is PostgreSQL.
async fn open_admin(config: &Config) -> Result<Admin, SiteError> {
    let url = config.database_url_for(Service::Admin);
    let db = chipsite_store::connect(&url).await?;
    let hub = chipsite_admin::Hub::for_database(&url, &db).await?;
    Ok(Admin::open(db).await?.with_hub(hub))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The first task to end is named at once, whether it returned an error,
    /// returned at all, or panicked; the rest are stopped within the grace.
    #[tokio::test]
    async fn the_supervisor_names_the_first_task_to_end() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let mut s = Supervisor::default();
        s.spawn("forever".into(), std::future::pending());
        s.spawn("broken".into(), async move {
            let _ = released.await;
            Err(SiteError::Serve("the port went away".into()))
        });
        s.spawn("stopping".into(), async { Ok(()) });
        let (task, why) = s.first_end().await;
        assert_eq!(
            (task.as_str(), why.as_str()),
            ("stopping", "it stopped by itself")
        );
        let _ = release.send(());
        let (task, why) = s.first_end().await;
        assert_eq!(
            (task.as_str(), why.as_str()),
            ("broken", "server: the port went away")
        );
        s.watch(
            "sweeper".into(),
            Some(tokio::spawn(async { panic!("a bug in a background task") })),
        );
        let (task, why) = s.first_end().await;
        assert_eq!(task, "sweeper");
        assert!(why.contains("panicked"), "{why}");
        // `forever` never ends by itself: drain gives up after the grace.
        tokio::time::timeout(Duration::from_secs(5), s.drain(Duration::from_millis(50)))
            .await
            .unwrap();
    }
}
