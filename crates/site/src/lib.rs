//! A chipsite site in-process: `chipsite dev` (every service, one process,
//! internal mutual TLS on loopback, SQLite in a data directory) and
//! `chipsite serve <service>` (one service, for containers). Tests use the
//! same entry points.

pub mod config;
pub mod dev;
pub mod services;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use chipsite_admin::Admin;
use chipsite_console::Console;
use chipsite_key_vault::KeyVault;
use chipsite_proto::admin::v1::admin_service_client::AdminServiceClient;
use chipsite_ticket::Tickets;
use chipsite_tls::{CertPaths, ReloadableTls, identity as id};
use chipsite_user_gateway::{Clients as GatewayClients, Settings as GatewaySettings, UserGateway};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::Channel;

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
    #[error("no dev site found: {0}")]
    NoSite(String),
}

/// Where a running dev site listens and how to reach it; written to
/// `<data_dir>/endpoints.json` for `chipsctl` and scripts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub admin: String,
    pub key_vault: String,
    pub ticket: String,
    /// The user gateway's external port (apps connect here).
    pub user_gateway: String,
    /// The admin web console (`http://…`).
    pub console: String,
    /// The console's HTTPS port for the admin client certificate
    /// (`https://…`; empty when none).
    #[serde(default)]
    pub console_https: String,
    pub ca: PathBuf,
    pub admin_client_cert: PathBuf,
    pub admin_client_key: PathBuf,
    pub data_dir: PathBuf,
    pub pid: u32,
}

impl Endpoints {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("endpoints.json")
    }

    pub fn read(data_dir: &Path) -> Result<Self, SiteError> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SiteError::NoSite(format!(
                "{}: {e} (start one with `chipsite dev`, or pass --data-dir)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| SiteError::NoSite(format!("{}: {e}", path.display())))
    }

    /// Certificate files of an identity in this site's data directory.
    pub fn cert_paths(&self, identity: &str) -> CertPaths {
        dev::cert_paths(&self.data_dir, identity)
    }
}

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

async fn bind(addr: &str) -> Result<TcpListener, SiteError> {
    TcpListener::bind(addr).await.map_err(|e| SiteError::Bind {
        addr: addr.to_owned(),
        message: e.to_string(),
    })
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, SiteError> {
    l.local_addr().map_err(|e| SiteError::Io(e.to_string()))
}

fn channel(addr: &str, identity: &str, tls: &Arc<ReloadableTls>) -> Result<Channel, SiteError> {
    chipsite_tls::connect_lazy(addr, identity, tls.clone()).map_err(|e| SiteError::Config(e.to_string()))
}

/// A shutdown signal shared by every server of a site.
#[derive(Debug, Clone)]
struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// A running site (every service in this process).
#[derive(Debug)]
pub struct Site {
    pub endpoints: Endpoints,
    /// Whether this start created the site key (first launch).
    pub created_site_key: bool,
    /// Init scripts that ran during this start.
    pub init_scripts_ran: Vec<String>,
    /// Whether the vault is unsealed (dev unseals with its pass phrase file).
    pub unsealed: bool,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), SiteError>>)>,
}

impl Site {
    /// Start every service of a dev site: PKI and pass phrase in the data
    /// directory, first launch (tables, init scripts, site key), then serve.
    pub async fn start_dev(config: &Config) -> Result<Site, SiteError> {
        chipsite_tls::install_crypto_provider();
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|e| SiteError::Io(format!("{}: {e}", data.display())))?;
        dev::ensure_pki(data, "dev")?;
        let passphrase = dev::ensure_passphrase(data)?;

        let listeners = [
            bind(&config.addresses.admin).await?,
            bind(&config.addresses.key_vault).await?,
            bind(&config.addresses.ticket).await?,
            bind(&config.addresses.user_gateway).await?,
            bind(&config.addresses.console).await?,
        ];
        let console_https_l = match config.addresses.console_https.as_str() {
            "" => None,
            a => Some(bind(a).await?),
        };
        let console_https = match &console_https_l {
            Some(l) => format!("https://{}", local_addr(l)?),
            None => String::new(),
        };
        let addrs = listeners.iter().map(local_addr).collect::<Result<Vec<_>, _>>()?;
        let [admin_l, vault_l, ticket_l, gateway_l, console_l] = listeners;
        let (admin_addr, vault_addr, ticket_addr, gateway_addr) = (
            addrs[0].to_string(),
            addrs[1].to_string(),
            addrs[2].to_string(),
            addrs[3],
        );
        let console_url = format!("http://{}", addrs[4]);

        let tls = |identity: &str| -> Result<Arc<ReloadableTls>, SiteError> {
            let t = ReloadableTls::from_files(dev::cert_paths(data, identity))?;
            t.spawn_watcher(CERT_POLL);
            Ok(t)
        };
        let (admin_tls, vault_tls, ticket_tls, gateway_tls, console_tls) = (
            tls(id::ADMIN)?,
            tls(id::KEY_VAULT)?,
            tls(id::TICKET)?,
            tls(id::USER_GATEWAY)?,
            tls(id::CONSOLE)?,
        );

        // First launch: tables, init scripts, site key.
        let vault = Arc::new(
            KeyVault::open(chipsite_store::connect(&config.database_url_for(Service::KeyVault)).await?)
                .await?,
        );
        let tickets = Arc::new(
            Tickets::open(chipsite_store::connect(&config.database_url_for(Service::Ticket)).await?).await?,
        );
        let admin = Arc::new(open_admin(config).await?);
        let init_scripts_ran = admin.run_init_scripts(&config.init_dir()).await?;
        // A dev site knows where its user gateway listens: tickets name it.
        admin
            .update_config(
                &[
                    ("user_gateway.host".to_owned(), gateway_addr.ip().to_string()),
                    ("user_gateway.port".to_owned(), gateway_addr.port().to_string()),
                    ("console.url".to_owned(), console_url.clone()),
                ]
                .into(),
                &[],
            )
            .await?;
        let created_site_key = vault.ensure_site_key(&passphrase).await?;
        let unsealed = created_site_key
            || match vault.unseal(&passphrase).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "the dev pass phrase file does not open the site key; the vault stays sealed (unseal it with chipsctl)");
                    false
                }
            };

        let (stop, stop_rx) = watch::channel(false);
        let shutdown = Shutdown(stop_rx);
        let ticket_to_vault = channel(&vault_addr, id::KEY_VAULT, &ticket_tls)?;
        let admin_to_vault = channel(&vault_addr, id::KEY_VAULT, &admin_tls)?;
        let admin_to_ticket = channel(&ticket_addr, id::TICKET, &admin_tls)?;
        let gateway = UserGateway::new(
            GatewayClients {
                key_vault: channel(&vault_addr, id::KEY_VAULT, &gateway_tls)?,
                tickets: channel(&ticket_addr, id::TICKET, &gateway_tls)?,
                admin: channel(&admin_addr, id::ADMIN, &gateway_tls)?,
            },
            GatewaySettings::default(),
        );
        let tasks: Vec<(&'static str, JoinHandle<Result<(), SiteError>>)> = vec![
            (
                "key-vault",
                tokio::spawn(services::serve_key_vault(
                    vault,
                    vault_l,
                    vault_tls,
                    shutdown.clone().wait(),
                )),
            ),
            (
                "ticket",
                tokio::spawn(services::serve_ticket(
                    tickets,
                    ticket_to_vault,
                    ticket_l,
                    ticket_tls,
                    shutdown.clone().wait(),
                )),
            ),
            (
                "admin",
                tokio::spawn(services::serve_admin(
                    admin,
                    admin_to_vault,
                    admin_to_ticket,
                    admin_l,
                    admin_tls,
                    shutdown.clone().wait(),
                )),
            ),
            (
                "user-gateway",
                tokio::spawn(serve_gateway(gateway, gateway_l, shutdown.clone().wait())),
            ),
            (
                "console",
                tokio::spawn(serve_console(
                    console(
                        &Addresses {
                            admin: admin_addr.clone(),
                            key_vault: vault_addr.clone(),
                            ticket: ticket_addr.clone(),
                            user_gateway: gateway_addr.to_string(),
                            console: addrs[4].to_string(),
                            console_https: console_https.trim_start_matches("https://").to_owned(),
                        },
                        &console_tls,
                    )?,
                    console_l,
                    console_https_l.map(|l| (l, console_tls.clone())),
                    shutdown.clone().wait(),
                )),
            ),
        ];

        let client = dev::cert_paths(data, id::ADMIN_CLIENT);
        let endpoints = Endpoints {
            admin: admin_addr,
            key_vault: vault_addr,
            ticket: ticket_addr,
            user_gateway: gateway_addr.to_string(),
            console: console_url,
            console_https,
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
            created_site_key,
            init_scripts_ran,
            unsealed,
            stop,
            tasks,
        })
    }

    /// An AdminService client with the operator's certificate.
    pub fn admin_client(&self) -> Result<AdminServiceClient<Channel>, SiteError> {
        admin_client(
            &self.endpoints.admin,
            &self.endpoints.cert_paths(id::ADMIN_CLIENT),
        )
    }

    /// Stop every server, letting in-flight calls finish for up to `grace`.
    pub async fn shutdown(self, grace: Duration) -> Result<(), SiteError> {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(Endpoints::path(&self.endpoints.data_dir));
        for (name, task) in self.tasks {
            match tokio::time::timeout(grace, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(service = name, error = %e, "service ended with an error"),
                Ok(Err(e)) => tracing::warn!(service = name, error = %e, "service task failed"),
                Err(_) => tracing::warn!(service = name, "service did not stop within the grace period"),
            }
        }
        Ok(())
    }
}

/// `chipsite serve <service>`: one service, configured from file and
/// environment, until `shutdown` resolves.
pub async fn serve_one(
    config: &Config,
    service: Service,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
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
    tls.spawn_watcher(CERT_POLL);
    let listen = match config.listen {
        Some(a) => a.to_string(),
        None => config.addresses.of(service).to_owned(),
    };
    if service == Service::Console {
        let console = console(&config.addresses, &tls)?;
        let listener = bind(&listen).await?;
        let https = match config.addresses.console_https.as_str() {
            "" => None,
            a => Some((bind(a).await?, tls.clone())),
        };
        tracing::info!(service = service.identity(), addr = %listen, https = %config.addresses.console_https, "serving");
        return serve_console(console, listener, https, shutdown).await;
    }
    if service == Service::UserGateway {
        let gateway = UserGateway::new(
            GatewayClients {
                key_vault: channel(&config.addresses.key_vault, id::KEY_VAULT, &tls)?,
                tickets: channel(&config.addresses.ticket, id::TICKET, &tls)?,
                admin: channel(&config.addresses.admin, id::ADMIN, &tls)?,
            },
            GatewaySettings::default(),
        );
        // Nothing listens before key-vault has certified the gateway.
        let shutdown = Box::pin(shutdown);
        let mut shutdown = shutdown;
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = gateway.certify_first() => {}
        }
        let listener = bind(&listen).await?;
        tracing::info!(service = service.identity(), addr = %listen, "serving");
        return serve_gateway(gateway, listener, shutdown).await;
    }
    let listener = bind(&listen).await?;
    tracing::info!(service = service.identity(), addr = %listen, "serving");
    let db = chipsite_store::connect(&config.database_url_for(service)).await?;
    match service {
        Service::KeyVault => {
            let vault = Arc::new(KeyVault::open(db).await?);
            // Operator-supplied pass phrase (for example a mounted secret):
            // create the key on first launch, unseal on every start. It is
            // read from the environment and never written anywhere.
            if let Ok(p) = std::env::var("CHIPSITE_SITE_KEY_PASSPHRASE") {
                if !vault.ensure_site_key(&p).await? {
                    vault.unseal(&p).await?;
                }
            } else if !vault.status().await?.has_key {
                tracing::warn!("no site key yet: create one with `chipsctl key create`");
            }
            services::serve_key_vault(vault, listener, tls, shutdown).await
        }
        Service::Ticket => {
            let tickets = Arc::new(Tickets::open(db).await?);
            let kv = channel(&config.addresses.key_vault, id::KEY_VAULT, &tls)?;
            services::serve_ticket(tickets, kv, listener, tls, shutdown).await
        }
        Service::Admin => {
            drop(db);
            let admin = Arc::new(open_admin(config).await?);
            admin.run_init_scripts(&config.init_dir()).await?;
            let kv = channel(&config.addresses.key_vault, id::KEY_VAULT, &tls)?;
            let tk = channel(&config.addresses.ticket, id::TICKET, &tls)?;
            services::serve_admin(admin, kv, tk, listener, tls, shutdown).await
        }
        Service::UserGateway | Service::Console => Ok(()),
    }
}

/// Admin's store, with its user events on PostgreSQL LISTEN/NOTIFY when
/// the store is PostgreSQL.
async fn open_admin(config: &Config) -> Result<Admin, SiteError> {
    let url = config.database_url_for(Service::Admin);
    let db = chipsite_store::connect(&url).await?;
    let hub = chipsite_admin::Hub::for_database(&url, &db).await?;
    Ok(Admin::open(db).await?.with_hub(hub))
}

/// The console, with the services its health page checks and where they listen.
fn console(at: &Addresses, tls: &Arc<ReloadableTls>) -> Result<Arc<Console>, SiteError> {
    use chipsite_console::{Check, Probe};
    let grpc = |name: &'static str, addr: &str, identity: &str| -> Result<Probe, SiteError> {
        Ok(Probe {
            name,
            addr: addr.to_owned(),
            check: Check::Grpc(channel(addr, identity, tls)?),
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
        channel(&at.admin, id::ADMIN, tls)?,
        channel(&at.ticket, id::TICKET, tls)?,
        probes,
    ))
}

/// The console on its plain port and, when it has one, its HTTPS port
/// (client certificates of the internal CA required; `tls` is the console's
/// own internal certificate).
async fn serve_console(
    console: std::sync::Arc<Console>,
    listener: TcpListener,
    https: Option<(TcpListener, Arc<ReloadableTls>)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), SiteError> {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let plain = chipsite_console::serve(console.clone(), listener, shutdown.clone());
    let secure = async {
        match https {
            Some((l, tls)) => chipsite_console::serve_https(console, l, tls, shutdown).await,
            None => Ok(()),
        }
    };
    tokio::try_join!(plain, secure)
        .map(|_| ())
        .map_err(|e| SiteError::Serve(format!("console: {e}")))
}

async fn serve_gateway(
    gateway: UserGateway,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    Ok(gateway.serve(listener, shutdown).await?)
}
