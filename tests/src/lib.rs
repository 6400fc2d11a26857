//! Test support: a fresh database per test on every store, whole dev sites
//! in-process on loopback port 0, mutual-TLS clients for any identity, and
//! a capture of everything the site logs.
//!
//! Every store test runs on SQLite; it also runs on PostgreSQL when
//! `CHIPSITE_TEST_POSTGRES_URL` names a server's maintenance database (for
//! example `postgres://postgres@127.0.0.1:5432/postgres`). CI sets it, and
//! then an unreachable PostgreSQL fails the suite rather than skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use chipsite_app::{AppKey, Session};
use chipsite_proto::{
    admin::v1::admin_service_client::AdminServiceClient, events::v1::user_events_client::UserEventsClient,
    keyvault::v1::key_vault_client::KeyVaultClient, peer::v1::peer_gateway_client::PeerGatewayClient,
    ticket::v1::tickets_client::TicketsClient,
};
use chipsite_site::{Config, Site, config::Addresses};
use chipsite_ticket::render::PublishedTicket;
use chipsite_tls::{ReloadableTls, identity as id};
use sea_orm::ConnectionTrait;
use tempfile::TempDir;
use tonic::transport::Channel;

pub const POSTGRES_ENV: &str = "CHIPSITE_TEST_POSTGRES_URL";

/// A database for one test: SQLite files in the site's data directory, or a
/// fresh PostgreSQL database dropped afterwards.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite,
    Postgres { server: String, name: String },
}

impl Store {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// The database URL a site uses (empty: SQLite per service in its data dir).
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite => String::new(),
            Self::Postgres { server, name } => {
                let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(server);
                format!("{base}/{name}")
            }
        }
    }

    /// Drop a PostgreSQL test database (best effort).
    pub async fn drop_database(&self) {
        if let Self::Postgres { server, name } = self
            && let Ok(db) = chipsite_store::connect(server).await
        {
            let _ = db
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Which store a store test runs on; [`store_test!`] makes one test of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// A store of `kind` for one test: SQLite, or a fresh PostgreSQL database
/// when `CHIPSITE_TEST_POSTGRES_URL` is set (a failure to reach it fails the
/// test). `None`: PostgreSQL was not asked for.
pub async fn fresh_store(kind: StoreKind) -> Option<Store> {
    match kind {
        StoreKind::Sqlite => Some(Store::Sqlite),
        StoreKind::Postgres => {
            let server = std::env::var(POSTGRES_ENV).ok()?;
            let db = chipsite_store::connect(&server)
                .await
                .unwrap_or_else(|e| panic!("{POSTGRES_ENV} is set but PostgreSQL is unreachable: {e}"));
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).unwrap();
            let name = format!(
                "chipsite_t_{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            db.execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
            Some(Store::Postgres { server, name })
        }
    }
}

impl Store {
    /// Another fresh store of the same kind (a second site in one test).
    pub async fn another(&self) -> Store {
        let kind = match self {
            Self::Sqlite => StoreKind::Sqlite,
            Self::Postgres { .. } => StoreKind::Postgres,
        };
        fresh_store(kind).await.expect("a store of the same kind")
    }
}

/// Run one store test on its own runtime, with its own log capture and a
/// fresh store of `kind`; its PostgreSQL database is dropped afterwards.
/// Without `CHIPSITE_TEST_POSTGRES_URL` the PostgreSQL case says so on
/// stderr and passes (CI always sets it, and then a failure to reach
/// PostgreSQL fails the test).
pub fn run_store_test<F, Fut>(kind: StoreKind, test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    run_test(async move {
        let Some(store) = fresh_store(kind).await else {
            eprintln!("not run on PostgreSQL: set {POSTGRES_ENV} (CI does)");
            return;
        };
        test(store.clone()).await;
        store.drop_database().await;
    });
}

/// Run a test on a runtime of its own (two workers) whose threads carry a
/// test id, so that [`captured_logs`] holds this test's lines and no other's.
pub fn run_test(test: impl std::future::Future<Output = ()>) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    capture_logs();
    TEST_ID.with(|t| t.set(id));
    log_buffers()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id)
        .or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || TEST_ID.with(|t| t.set(id)))
        .build()
        .expect("a test runtime");
    runtime.block_on(test);
    runtime.shutdown_timeout(Duration::from_secs(5));
    log_buffers().lock().unwrap().remove(&id);
    TEST_ID.with(|t| t.set(0));
}

/// `store_test!(name)` after `async fn name(store: Store)`: the tests
/// `name::sqlite` and `name::postgres`, so a failure names its store and the
/// two run in parallel.
#[macro_export]
macro_rules! store_test {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                $crate::run_store_test($crate::StoreKind::Sqlite, super::$name)
            }
            #[test]
            fn postgres() {
                $crate::run_store_test($crate::StoreKind::Postgres, super::$name)
            }
        }
    };
}

/// A dev site in a temporary data directory, listening on loopback port 0.
pub struct TestSite {
    pub site: Site,
    pub dir: Arc<TempDir>,
    pub store: Store,
}

pub fn config_for(data_dir: &Path, store: &Store) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        database_url: store.url(),
        addresses: Addresses::ephemeral(),
        ..Config::default()
    }
}

impl TestSite {
    pub async fn start(store: &Store) -> TestSite {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in(dir, store).await
    }

    /// Start a site whose configuration `adjust` changed first.
    pub async fn start_with(store: &Store, adjust: impl FnOnce(&mut Config)) -> TestSite {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut config = config_for(dir.path(), store);
        adjust(&mut config);
        capture_logs();
        let site = Site::start_dev(&config).await.expect("start dev site");
        TestSite {
            site,
            dir,
            store: store.clone(),
        }
    }

    /// Stop the site and start it again in the same data directory, with
    /// the same peer port (peer sites recorded where it listens).
    pub async fn restart(self) -> TestSite {
        let (store, peer) = (self.store.clone(), self.site.endpoints.peer.clone());
        let dir = self.stop().await;
        capture_logs();
        let mut config = config_for(dir.path(), &store);
        config.addresses.peer = peer;
        let site = Site::start_dev(&config).await.expect("restart dev site");
        TestSite { site, dir, store }
    }

    /// Start (or restart) a site in an existing data directory.
    pub async fn start_in(dir: Arc<TempDir>, store: &Store) -> TestSite {
        capture_logs();
        let site = Site::start_dev(&config_for(dir.path(), store))
            .await
            .expect("start dev site");
        TestSite {
            site,
            dir,
            store: store.clone(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn tls(&self, identity: &str) -> Arc<ReloadableTls> {
        ReloadableTls::from_files(self.site.endpoints.cert_paths(identity)).expect("load test certificates")
    }

    /// A client's channel: mutual TLS, as a separate process would call.
    fn channel(&self, addr: &str, server: &str, as_identity: &str) -> Channel {
        chipsite_tls::connect_tls_lazy(addr, server, self.tls(as_identity)).expect("channel")
    }

    /// A service's channel: in-process when the server is in this process.
    fn service_channel(&self, addr: &str, server: &str, as_identity: &str) -> chipsite_tls::InternalChannel {
        chipsite_tls::connect_lazy(addr, server, self.tls(as_identity)).expect("channel")
    }

    /// AdminService as the operator.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        self.admin_as(id::ADMIN_CLIENT)
    }

    pub fn admin_as(&self, identity: &str) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel(&self.site.endpoints.admin, id::ADMIN, identity))
    }

    pub fn tickets_as(&self, identity: &str) -> TicketsClient<Channel> {
        TicketsClient::new(self.channel(&self.site.endpoints.ticket, id::TICKET, identity))
    }

    pub fn key_vault_as(&self, identity: &str) -> KeyVaultClient<Channel> {
        KeyVaultClient::new(self.channel(&self.site.endpoints.key_vault, id::KEY_VAULT, identity))
    }

    pub fn peer_gateway_as(&self, identity: &str) -> PeerGatewayClient<Channel> {
        PeerGatewayClient::new(self.channel(&self.site.endpoints.peer_gateway, id::PEER_GATEWAY, identity))
    }

    /// The peer links of a local user (all users: empty), as admin reads them.
    pub fn tally_as(
        &self,
        identity: &str,
    ) -> chipsite_proto::tally::v1::tallies_client::TalliesClient<Channel> {
        chipsite_proto::tally::v1::tallies_client::TalliesClient::new(self.channel(
            &self.site.endpoints.tally,
            id::TALLY,
            identity,
        ))
    }

    /// A local user's tallies, as the tally service holds them.
    pub async fn tallies(&self, chip_id: &str) -> Vec<chipsite_proto::tally::v1::Tally> {
        self.tally_as(id::ADMIN)
            .list_tallies(chipsite_proto::tally::v1::ListTalliesRequest {
                chip_id: chip_id.into(),
                limit: 1000,
            })
            .await
            .expect("list tallies")
            .into_inner()
            .tallies
    }

    pub async fn peer_links(&self, chip_id: &str) -> Vec<chipsite_proto::peer::v1::PeerLink> {
        self.peer_gateway_as(id::ADMIN)
            .list_links(chipsite_proto::peer::v1::ListLinksRequest {
                chip_id: chip_id.into(),
                limit: 1000,
            })
            .await
            .expect("the peer links")
            .into_inner()
            .links
    }

    /// The peer port (peer sites connect here).
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.site.endpoints.peer.parse().expect("peer address")
    }

    /// Whether the peer port takes connections now (the peer server runs).
    pub async fn peer_port_open(&self) -> bool {
        tokio::net::TcpStream::connect(self.peer_addr()).await.is_ok()
    }

    /// The site's pass phrase (dev keeps it in a file).
    pub fn passphrase(&self) -> String {
        std::fs::read_to_string(chipsite_site::dev::passphrase_path(&self.data_dir()))
            .expect("the dev pass phrase")
    }

    /// Create a user (ignoring "already exists").
    pub async fn create_user(&self, chip_id: &str) {
        let _ = self
            .admin()
            .create_user(chipsite_proto::admin::v1::CreateUserRequest {
                chip_id: chip_id.into(),
                name: format!("User {chip_id}"),
                ..Default::default()
            })
            .await;
    }

    /// A user's connection ticket, as the operator hands it out.
    pub async fn user_ticket(&self, chip_id: &str, ttl_seconds: u32) -> PublishedTicket {
        let view = self
            .admin()
            .issue_user_ticket(chipsite_proto::admin::v1::IssueUserTicketRequest {
                chip_id: chip_id.into(),
                ttl_seconds,
            })
            .await
            .expect("issue a user ticket")
            .into_inner();
        PublishedTicket::from_uri(&view.uri).expect("a ticket URI")
    }

    /// Create the user (if needed) and enroll a fresh app key for it.
    pub async fn enrolled(&self, chip_id: &str) -> AppKey {
        self.create_user(chip_id).await;
        let ticket = self.user_ticket(chip_id, 0).await;
        let key = AppKey::generate().unwrap();
        chipsite_app::enroll(&ticket, chip_id, &key)
            .await
            .expect("enrollment");
        key
    }

    /// Another user-gateway replica in this process, watching the admin
    /// service at `admin_addr`; it serves on the returned port until the
    /// returned sender says stop.
    pub async fn extra_gateway(&self, admin_addr: &str) -> (u16, tokio::sync::watch::Sender<bool>) {
        self.extra_gateway_with(admin_addr, chipsite_user_gateway::Settings::default())
            .await
    }

    /// [`TestSite::extra_gateway`] with its own settings.
    pub async fn extra_gateway_with(
        &self,
        admin_addr: &str,
        settings: chipsite_user_gateway::Settings,
    ) -> (u16, tokio::sync::watch::Sender<bool>) {
        use chipsite_user_gateway::{Clients, UserGateway};
        let e = &self.site.endpoints;
        let gateway = UserGateway::new(
            Clients {
                key_vault: self.service_channel(&e.key_vault, id::KEY_VAULT, id::USER_GATEWAY),
                tickets: self.service_channel(&e.ticket, id::TICKET, id::USER_GATEWAY),
                admin: self.service_channel(admin_addr, id::ADMIN, id::USER_GATEWAY),
                peer_gateway: self.service_channel(&e.peer_gateway, id::PEER_GATEWAY, id::USER_GATEWAY),
                tally: self.service_channel(&e.tally, id::TALLY, id::USER_GATEWAY),
            },
            settings,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(gateway.serve(listener, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        (port, stop)
    }

    /// Another admin process in this one, serving `admin` (opened on a
    /// store of this site's) on the returned address until the returned
    /// sender says stop; it calls this site's services, but key-vault at
    /// `key_vault_addr` (this site's, or somewhere nothing answers).
    pub async fn extra_admin(
        &self,
        admin: Arc<chipsite_admin::Admin>,
        key_vault_addr: &str,
    ) -> (String, tokio::sync::watch::Sender<bool>) {
        let e = &self.site.endpoints;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(chipsite_admin::serve(
            admin,
            chipsite_admin::Calls {
                key_vault: self.service_channel(key_vault_addr, id::KEY_VAULT, id::ADMIN),
                tickets: self.service_channel(&e.ticket, id::TICKET, id::ADMIN),
                peer_gateway: self.service_channel(&e.peer_gateway, id::PEER_GATEWAY, id::ADMIN),
                tally: self.service_channel(&e.tally, id::TALLY, id::ADMIN),
            },
            listener,
            self.tls(id::ADMIN),
            false,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        (addr, stop)
    }

    /// The ticket service's audit records, newest first (up to 1,000).
    pub async fn ticket_audit(&self) -> Vec<chipsite_proto::ticket::v1::AuditRecord> {
        self.tickets_as(id::ADMIN)
            .list_audit(chipsite_proto::ticket::v1::ListAuditRequest {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("the ticket audit")
            .into_inner()
            .records
    }

    /// UserEvents (alarms) as the operator.
    pub fn events(&self) -> UserEventsClient<Channel> {
        UserEventsClient::new(self.channel(&self.site.endpoints.admin, id::ADMIN, id::ADMIN_CLIENT))
    }

    /// Raise one alarm for a user, as the operator.
    pub async fn raise_alarm(&self, chip_id: &str, text: &str) {
        self.events()
            .raise_alarms(chipsite_proto::events::v1::RaiseAlarmsRequest {
                alarms: vec![chipsite_proto::events::v1::NewAlarm {
                    chip_id: chip_id.into(),
                    kind: "notice".into(),
                    text: text.into(),
                }],
            })
            .await
            .expect("raise an alarm");
    }

    /// The site public key (SPKI DER), as tickets carry it.
    /// The site key's pin, as admin shows it.
    pub async fn site_key_pin(&self) -> String {
        self.admin()
            .get_vault_status(chipsite_proto::admin::v1::GetVaultStatusRequest {})
            .await
            .expect("vault status")
            .into_inner()
            .site_key_pin
    }

    pub async fn site_key(&self) -> Vec<u8> {
        self.key_vault_as(id::ADMIN)
            .get_status(chipsite_proto::keyvault::v1::GetStatusRequest {})
            .await
            .expect("vault status")
            .into_inner()
            .site_public_key
    }

    /// Host and port of the user gateway.
    pub fn gateway(&self) -> (String, u16) {
        let addr: std::net::SocketAddr = self.site.endpoints.user_gateway.parse().unwrap();
        (addr.ip().to_string(), addr.port())
    }

    /// Open a session as `chip_id` with `key`.
    pub async fn session(&self, chip_id: &str, key: &AppKey) -> Result<Session, chipsite_app::AppError> {
        let (host, port) = self.gateway();
        Session::connect(&host, port, &self.site_key().await, chip_id, key).await
    }

    pub async fn stop(self) -> Arc<TempDir> {
        self.site
            .shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
        self.dir
    }

    /// Stop the site and drop its PostgreSQL database.
    pub async fn finish(self) {
        let store = self.store.clone();
        self.stop().await;
        store.drop_database().await;
    }

    /// Every byte the site's stores hold, as text where possible: the SQLite
    /// files (with their WAL), or every row of every chipsite table.
    pub async fn stored_bytes(&self) -> Vec<u8> {
        match &self.store {
            Store::Sqlite => {
                let mut all = vec![];
                for e in std::fs::read_dir(self.dir.path().join("db")).unwrap().flatten() {
                    all.extend(std::fs::read(e.path()).unwrap_or_default());
                }
                all
            }
            Store::Postgres { .. } => {
                let db = chipsite_store::connect(&self.store.url()).await.unwrap();
                let tables = db
                    .query_all_raw(sea_orm::Statement::from_string(
                        sea_orm::DbBackend::Postgres,
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                    ))
                    .await
                    .unwrap();
                let mut all = vec![];
                for t in tables {
                    let name: String = t.try_get("", "tablename").unwrap();
                    let rows = db
                        .query_all_raw(sea_orm::Statement::from_string(
                            sea_orm::DbBackend::Postgres,
                            format!("SELECT t::text AS row FROM \"{name}\" t"),
                        ))
                        .await
                        .unwrap();
                    for r in rows {
                        let row: String = r.try_get("", "row").unwrap();
                        all.extend(row.into_bytes());
                    }
                }
                all
            }
        }
    }
}

thread_local! {
    /// The test whose runtime this thread belongs to (0: none).
    static TEST_ID: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Each test's log lines, by test id. Lines from threads of no test's
/// runtime (the SQLite driver's own threads) go to every running test, so
/// that a "no secret in the logs" check sees them too.
fn log_buffers() -> &'static Mutex<std::collections::HashMap<u64, Vec<u8>>> {
    static LOGS: OnceLock<Mutex<std::collections::HashMap<u64, Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let id = TEST_ID.with(|t| t.get());
        let mut logs = log_buffers().lock().unwrap_or_else(|p| p.into_inner());
        if id != 0 {
            logs.entry(id).or_default().extend_from_slice(buf);
        } else {
            for lines in logs.values_mut() {
                lines.extend_from_slice(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Route every log line of this test process (at trace level) into the
/// buffer of the test whose runtime logged it.
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace,h2=info,hyper=info,tower=info,sqlx=debug,rustls=debug")
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .try_init();
    });
}

/// Everything this test (see [`run_test`]) has logged so far.
pub fn captured_logs() -> String {
    let id = TEST_ID.with(|t| t.get());
    assert_ne!(id, 0, "captured_logs is for tests run by run_test or store_test!");
    let logs = log_buffers().lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(logs.get(&id).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// Fail the running test over `what`, with the warnings and errors this
/// test has logged so far (the services' own account of why), which a bare
/// panic would leave out.
pub fn fail_with_logs(what: &str) -> ! {
    let logs = captured_logs();
    let noted: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    panic!(
        "{what}\nwarnings and errors logged by this test:\n{}",
        noted.join("\n")
    )
}

/// Retry `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run the `openssl` command; returns its output whether or not it succeeded.
pub fn openssl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command is installed")
}

/// Run the `openssl` command, failing the test unless it succeeds; returns stdout.
pub fn openssl_ok(args: &[&str]) -> Vec<u8> {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A real SMTP server on loopback (Python's aiosmtpd, installed with pip if
/// missing) that prints every message it receives; [`SmtpSink::text`] is
/// all of it so far.
pub struct SmtpSink {
    pub port: u16,
    child: std::process::Child,
    out: Arc<Mutex<String>>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        // The SQLite and PostgreSQL cases may start at once: one pip at a time.
        static INSTALLING: Mutex<()> = Mutex::new(());
        let installing = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
        let has = |m: &str| {
            std::process::Command::new("python3")
                .args(["-c", &format!("import {m}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !has("aiosmtpd") {
            let ok = std::process::Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "aiosmtpd",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok && has("aiosmtpd"),
                "the e-mail tests need python3 with aiosmtpd (pip install aiosmtpd)"
            );
        }
        drop(installing);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Debugging",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        let stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let up = eventually(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "aiosmtpd did not start");
        SmtpSink { port, child, out }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real HTTP listener on loopback standing in for an SMS gateway: answers
/// 200 to every POST and keeps each request body.
pub struct WebhookSink {
    pub port: u16,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl WebhookSink {
    pub async fn start() -> WebhookSink {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(vec![]));
        let sink = bodies.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut buf = vec![];
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = tcp.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() < len {
                            continue;
                        }
                        if let Ok(v) = serde_json::from_str(&body[..len]) {
                            sink.lock().unwrap().push(v);
                        }
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                });
            }
        });
        WebhookSink { port, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/sms", self.port)
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// `GET path` over plain HTTP/1.1 to `addr` (`host:port`): the status code
/// and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut reply = vec![];
    tcp.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Run a Python script of `tests/python` with `args` off the runtime's
/// thread (the site runs in this process).
pub async fn python(script: &'static str, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python").join(script))
            .args(&args)
            .output()
            .expect("python3")
    })
    .await
    .expect("the python task")
}
