//! The site as a whole: first launch, internal authorization, certificates
//! from another CA, health.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_proto::{admin::v1 as pb, keyvault::v1 as kv, ticket::v1 as tk};
use chipsite_tls::{CertificateAuthority, ReloadableTls, TlsMaterial, identity as id};
use sea_orm::ConnectionTrait;
use tonic::Code;

store_test!(first_launch_is_idempotent);
async fn first_launch_is_idempotent(store: Store) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let init = dir.path().join("init.d");
    std::fs::create_dir_all(&init).unwrap();
    std::fs::write(
        init.join("001-table.sql"),
        "CREATE TABLE site_notes (note VARCHAR(100) NOT NULL);",
    )
    .unwrap();
    std::fs::write(
        init.join("002-row.sql"),
        "INSERT INTO site_notes (note) VALUES ('hello');",
    )
    .unwrap();
    std::fs::write(init.join("README.txt"), "not a script").unwrap();

    let first = TestSite::start_in(dir.clone(), &store).await;
    assert!(first.site.created_site_key);
    assert_eq!(first.site.init_scripts_ran, ["001-table.sql", "002-row.sql"]);
    let pin = first.site_key_pin().await;
    first
        .admin()
        .create_user(pb::CreateUserRequest {
            chip_id: "kept".into(),
            name: "Kept".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = first.stop().await;

    let second = TestSite::start_in(dir.clone(), &store).await;
    assert!(!second.site.created_site_key, "the site key is not replaced");
    assert!(second.site.init_scripts_ran.is_empty(), "init scripts run once");
    assert!(second.site.unsealed);
    let mut admin = second.admin();
    assert_eq!(
        admin
            .get_vault_status(pb::GetVaultStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .site_key_pin,
        pin
    );
    admin
        .get_user(pb::GetUserRequest {
            chip_id: "kept".into(),
        })
        .await
        .expect("data survives a restart");

    let url = match &store {
        chipsite_e2e::Store::Sqlite => chipsite_store::sqlite_url(&dir.path().join("db/admin.sqlite")),
        _ => store.url(),
    };
    let db = chipsite_store::connect(&url).await.unwrap();
    let n = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM site_notes",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(n, 1, "the insert script ran once");
    drop(db);

    // A failing script stops the launch with a clear error and is not recorded.
    std::fs::write(dir.path().join("init.d/003-broken.sql"), "THIS IS NOT SQL;").unwrap();
    let dir = second.stop().await;
    let err = chipsite_site::Site::start_dev(&chipsite_e2e::config_for(dir.path(), &store))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("003-broken.sql"), "{err}");
    std::fs::remove_file(dir.path().join("init.d/003-broken.sql")).unwrap();
    TestSite::start_in(dir, &store).await.finish().await;
}

store_test!(internal_callers_are_authorized_per_rpc);
async fn internal_callers_are_authorized_per_rpc(store: Store) {
    let site = TestSite::start(&store).await;
    // A valid certificate of the wrong service is refused.
    let e = site
        .admin_as(id::USER_GATEWAY)
        .create_user(pb::CreateUserRequest {
            chip_id: "x".into(),
            name: "X".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("user-gateway may not call"),
        "{}",
        e.message()
    );
    let e = site
        .key_vault_as(id::TICKET)
        .seal(kv::SealRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = site
        .tickets_as(id::PEER_GATEWAY)
        .list_tickets(tk::ListTicketsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = site
        .key_vault_as(id::ADMIN_CLIENT)
        .export_site_key(kv::ExportSiteKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "even the operator gets keys only through AdminService"
    );
    // A gateway issues tally tickets for its users, never connection tickets.
    let issue = |kind: tk::TicketKind| tk::IssueTicketRequest {
        kind: kind as i32,
        chip_id: "someone".into(),
        ttl_seconds: 60,
        host: "127.0.0.1".into(),
        port: 1,
        issuer: String::new(),
    };
    let mut gateway_tickets = site.tickets_as(id::USER_GATEWAY);
    let e = gateway_tickets
        .issue_ticket(issue(tk::TicketKind::User))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    gateway_tickets
        .issue_ticket(issue(tk::TicketKind::Tally))
        .await
        .expect("tally tickets are the gateway's");
    let mut odd = issue(tk::TicketKind::Tally);
    odd.host = "evil\0host".into();
    let e = gateway_tickets.issue_ticket(odd).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "a clear error on both engines: {}",
        e.message()
    );
    // ...while the allowed callers get through.
    site.admin_as(id::USER_GATEWAY)
        .get_lockdown(pb::GetLockdownRequest {
            chip_id: String::new(),
        })
        .await
        .expect("gateways may read lockdown state");
    site.key_vault_as(id::TICKET)
        .get_status(kv::GetStatusRequest {})
        .await
        .expect("ticket reads the site key");

    // A certificate from another CA is refused at the handshake.
    let rogue_ca = CertificateAuthority::generate("rogue").unwrap();
    let rogue = rogue_ca
        .issue(id::ADMIN_CLIENT, &[], Duration::from_secs(3600))
        .unwrap();
    // Trust the real CA (so the server is accepted) but present the rogue certificate.
    let real_ca = std::fs::read_to_string(&site.site.endpoints.ca).unwrap();
    let tls = ReloadableTls::from_material(
        &TlsMaterial::from_pem(&rogue.cert_pem, &rogue.key_pem, &real_ca).unwrap(),
    )
    .unwrap();
    let channel = chipsite_tls::connect_lazy(&site.site.endpoints.admin, id::ADMIN, tls).unwrap();
    let e = chipsite_proto::admin::v1::admin_service_client::AdminServiceClient::new(channel)
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap_err();
    // TLS 1.3: the server refuses the client certificate after the
    // client's side of the handshake, so the client sees the connection close.
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Cancelled | Code::Unknown),
        "{e:?}"
    );
    // The server logs its refusal as the client sees the close: possibly
    // a moment after.
    assert!(
        chipsite_e2e::eventually(Duration::from_secs(5), || async {
            chipsite_e2e::captured_logs().contains("internal TLS handshake refused")
        })
        .await,
        "the server refused the handshake"
    );

    // A server with a certificate from another CA is refused by our clients.
    let rogue_tls = ReloadableTls::from_material(
        &TlsMaterial::from_pem(&rogue.cert_pem, &rogue.key_pem, rogue_ca.cert_pem()).unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = chipsite_tls::tls_incoming(
        listener,
        rogue_tls,
        chipsite_tls::Admission::new(chipsite_tls::AdmissionLimits::INTERNAL),
    );
    // Were the handshake accepted, this server would answer UNIMPLEMENTED.
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    let channel = chipsite_tls::connect_lazy(&addr, id::ADMIN, site.tls(id::ADMIN_CLIENT)).unwrap();
    let e = chipsite_proto::admin::v1::admin_service_client::AdminServiceClient::new(channel)
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown), "{e:?}");
    site.finish().await;
}

#[test]
fn every_service_reports_health_and_the_admin_api_reflects() {
    chipsite_e2e::run_test(health_and_reflection());
}

async fn health_and_reflection() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let store = chipsite_e2e::Store::Sqlite;
    let site = TestSite::start(&store).await;
    let e = &site.site.endpoints;
    for (addr, server, service) in [
        (&e.admin, id::ADMIN, "chipsite.admin.v1.AdminService"),
        (&e.key_vault, id::KEY_VAULT, "chipsite.keyvault.v1.KeyVault"),
        (&e.ticket, id::TICKET, "chipsite.ticket.v1.Tickets"),
    ] {
        // Any internal identity may ask for health.
        let channel = chipsite_tls::connect_lazy(addr, server, site.tls(id::PEER_GATEWAY)).unwrap();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let list = |identity: &'static str| {
        let channel = chipsite_tls::connect_lazy(&e.admin, id::ADMIN, site.tls(identity)).unwrap();
        async move {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = ServerReflectionClient::new(channel)
                .server_reflection_info(futures::stream::iter([request]))
                .await?
                .into_inner();
            let mut names = vec![];
            while let Some(r) = stream.message().await? {
                if let Some(MessageResponse::ListServicesResponse(l)) = r.message_response {
                    names.extend(l.service.into_iter().map(|s| s.name));
                }
            }
            Ok::<_, tonic::Status>(names)
        }
    };
    let names = list(id::ADMIN_CLIENT).await.unwrap();
    assert!(
        names.contains(&"chipsite.admin.v1.AdminService".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("keyvault")),
        "each server advertises only its own API: {names:?}"
    );
    let e = list(id::USER_GATEWAY).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    site.finish().await;
}

#[test]
fn serve_mode_picks_up_replaced_certificate_files_without_a_restart() {
    chipsite_e2e::run_test(replaced_certificate_files());
}

async fn replaced_certificate_files() {
    use chipsite_site::config::{Config, TlsFiles};
    use chipsite_tls::CertPaths;

    let dir = tempfile::tempdir().unwrap();
    let write = |ca: &CertificateAuthority, who: &str| {
        let issued = ca.issue(who, &[], Duration::from_secs(3600)).unwrap();
        let paths = CertPaths {
            cert: dir.path().join(format!("{who}.pem")),
            key: dir.path().join(format!("{who}.key")),
            ca: dir.path().join(format!("{who}-ca.pem")),
        };
        std::fs::write(&paths.cert, &issued.cert_pem).unwrap();
        std::fs::write(&paths.key, &issued.key_pem).unwrap();
        std::fs::write(&paths.ca, &issued.ca_pem).unwrap();
        paths
    };
    let (old_ca, new_ca) = (
        CertificateAuthority::generate("old").unwrap(),
        CertificateAuthority::generate("new").unwrap(),
    );
    let server = write(&old_ca, id::ADMIN);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: Some(addr),
        tls: Some(TlsFiles {
            cert: server.cert.clone(),
            key: server.key.clone(),
            ca: server.ca.clone(),
        }),
        ..Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        chipsite_site::serve_one(&config, chipsite_site::Service::Admin, async {
            let _ = stopped.await;
        })
        .await
    });

    let client_of = |ca: &CertificateAuthority| {
        let issued = ca
            .issue(id::ADMIN_CLIENT, &[], Duration::from_secs(3600))
            .unwrap();
        let tls = ReloadableTls::from_material(
            &TlsMaterial::from_pem(&issued.cert_pem, &issued.key_pem, ca.cert_pem()).unwrap(),
        )
        .unwrap();
        let channel = chipsite_tls::connect_lazy(&addr.to_string(), id::ADMIN, tls).unwrap();
        chipsite_proto::admin::v1::admin_service_client::AdminServiceClient::new(channel)
    };
    let works = |ca: &CertificateAuthority| {
        let mut client = client_of(ca);
        async move { client.get_site_config(pb::GetSiteConfigRequest {}).await.is_ok() }
    };
    assert!(
        chipsite_e2e::eventually(Duration::from_secs(10), || works(&old_ca)).await,
        "serves with the old files"
    );
    assert!(!works(&new_ca).await);

    // Replace the files in place, as a certificate manager would.
    let replaced = new_ca.issue(id::ADMIN, &[], Duration::from_secs(3600)).unwrap();
    std::fs::write(&server.key, &replaced.key_pem).unwrap();
    std::fs::write(&server.cert, &replaced.cert_pem).unwrap();
    std::fs::write(&server.ca, &replaced.ca_pem).unwrap();
    assert!(
        chipsite_e2e::eventually(Duration::from_secs(15), || works(&new_ca)).await,
        "new connections use the replaced files"
    );
    assert!(!works(&old_ca).await, "and the old CA is no longer trusted");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// Replicas of every stored service starting at once against one fresh
/// PostgreSQL database (each its own connection pool, as separate processes
/// would be): the migrations take turns under an advisory lock, every
/// replica starts, and each migration is recorded once. (SQLite databases
/// belong to one process, so this case is PostgreSQL's alone.)
#[test]
fn replicas_starting_together_migrate_once_postgres() {
    chipsite_e2e::run_store_test(chipsite_e2e::StoreKind::Postgres, |store| async move {
        let url = store.url();
        let mut starts = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let url = url.clone();
            starts.spawn(async move {
                let connect = || async { chipsite_store::connect(&url).await.unwrap() };
                let (vault, tickets, admin) = tokio::join!(
                    async {
                        chipsite_key_vault::KeyVault::open(connect().await)
                            .await
                            .err()
                            .map(|e| e.to_string())
                    },
                    async {
                        chipsite_ticket::Tickets::open(connect().await)
                            .await
                            .err()
                            .map(|e| e.to_string())
                    },
                    async {
                        chipsite_admin::Admin::open(connect().await)
                            .await
                            .err()
                            .map(|e| e.to_string())
                    },
                );
                [vault, tickets, admin]
            });
        }
        while let Some(started) = starts.join_next().await {
            assert_eq!(started.unwrap(), [None, None, None], "every replica starts");
        }
        let db = chipsite_store::connect(&url).await.unwrap();
        use sea_orm_migration::MigratorTrait;
        for (table, migrations) in [
            (
                "admin_migrations",
                chipsite_admin::store::Migrator::migrations().len(),
            ),
            (
                "keyvault_migrations",
                chipsite_key_vault::store::Migrator::migrations().len(),
            ),
            (
                "ticket_migrations",
                chipsite_ticket::store::Migrator::migrations().len(),
            ),
        ] {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    format!("SELECT count(*) AS n, count(DISTINCT version) AS once FROM {table}"),
                ))
                .await
                .unwrap()
                .unwrap();
            let n: i64 = row.try_get("", "n").unwrap();
            let once: i64 = row.try_get("", "once").unwrap();
            assert_eq!(n, once);
            assert_eq!(
                usize::try_from(n).unwrap(),
                migrations,
                "{table}: every migration applied"
            );
        }
    });
}

/// The value of one sample line of the Prometheus text (`name{labels}`), 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

store_test!(the_ops_port_answers_probes_and_metrics);
/// The plain-HTTP ops port: liveness, readiness that follows the stores and
/// the gateway's certificate, and metrics that count calls by method and
/// status code and the gateway's sessions, handshakes and enrollments.
/// (Metrics are per process, and other tests run in this one: each check is
/// on growth this test caused, which only working counters can show.)
async fn the_ops_port_answers_probes_and_metrics(store: Store) {
    use chipsite_e2e::{eventually, http_get};
    let site = TestSite::start(&store).await;
    let ops = site.site.endpoints.ops.trim_start_matches("http://").to_owned();
    assert_eq!(http_get(&ops, "/livez").await, (200, "ok\n".to_owned()));
    let ready = eventually(Duration::from_secs(20), || async {
        http_get(&ops, "/readyz").await.0 == 200
    })
    .await;
    let (_, checks) = http_get(&ops, "/readyz").await;
    assert!(ready, "{checks}");
    for check in [
        "ok admin store",
        "ok key-vault store",
        "ok ticket store",
        "ok user-gateway certified by the site key",
    ] {
        assert!(checks.contains(check), "{check}: {checks}");
    }

    let (_, before) = http_get(&ops, "/metrics").await;
    let get_user =
        "chipsite_grpc_server_requests_total{method=\"/chipsite.admin.v1.AdminService/GetUser\",code=\"5\"}";
    let enrolled = "chipsite_gateway_enrollments_total{outcome=\"enrolled\"}";
    let handshakes = "chipsite_gateway_handshakes_total{outcome=\"ok\"}";
    for _ in 0..3 {
        let e = site
            .admin()
            .get_user(pb::GetUserRequest {
                chip_id: "nobody-here".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let key = site.enrolled("alice").await;
    let session = site.session("alice", &key).await.unwrap();
    session.call("status", serde_json::json!({})).await.unwrap();
    let (status, after) = http_get(&ops, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        sample(&after, get_user) >= sample(&before, get_user) + 3.0,
        "{after}"
    );
    assert!(
        sample(&after, enrolled) >= sample(&before, enrolled) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, handshakes) >= sample(&before, handshakes) + 2.0,
        "{after}"
    );
    assert!(sample(&after, "chipsite_gateway_sessions") >= 1.0, "{after}");
    assert!(
        after.contains("chipsite_grpc_server_seconds_bucket{le=")
            || after.contains("chipsite_grpc_server_seconds_bucket{method="),
        "latency histograms: {after}"
    );

    // Not ready while the store is unreachable (PostgreSQL: the database
    // refuses connections and the site's are ended), ready again after.
    if let chipsite_e2e::Store::Postgres { server, name } = &store {
        let pg = chipsite_store::connect(server).await.unwrap();
        pg.execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .await
            .unwrap();
        pg.execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();
        let down = eventually(Duration::from_secs(20), || async {
            http_get(&ops, "/readyz").await.0 == 503
        })
        .await;
        let (_, checks) = http_get(&ops, "/readyz").await;
        assert!(down, "{checks}");
        assert!(checks.contains("not ready admin store"), "{checks}");
        assert_eq!(http_get(&ops, "/livez").await.0, 200, "alive all the same");
        pg.execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            .await
            .unwrap();
        let up = eventually(Duration::from_secs(30), || async {
            http_get(&ops, "/readyz").await.0 == 200
        })
        .await;
        assert!(up, "{}", http_get(&ops, "/readyz").await.1);
    }
    drop(session);
    site.finish().await;
}

/// When the site stops, every gRPC server's health turns NOT_SERVING before
/// it drains: a watcher (a load balancer, a replica) hears it at once.
#[test]
fn health_turns_not_serving_when_a_server_drains() {
    chipsite_e2e::run_test(async {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let site = TestSite::start(&chipsite_e2e::Store::Sqlite).await;
        let e = site.site.endpoints.clone();
        let mut watches = vec![];
        for (addr, server, service) in [
            (&e.admin, id::ADMIN, "chipsite.admin.v1.AdminService"),
            (&e.key_vault, id::KEY_VAULT, "chipsite.keyvault.v1.KeyVault"),
            (&e.ticket, id::TICKET, "chipsite.ticket.v1.Tickets"),
        ] {
            let channel = chipsite_tls::connect_lazy(addr, server, site.tls(id::ADMIN_CLIENT)).unwrap();
            let mut stream = HealthClient::new(channel)
                .watch(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            assert_eq!(first.status, ServingStatus::Serving as i32, "{service}");
            watches.push((service, stream));
        }
        let stopping = tokio::spawn(site.stop());
        for (service, mut stream) in watches {
            let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("a health update while draining");
            let status = next.ok().flatten().map(|m| m.status);
            assert_eq!(status, Some(ServingStatus::NotServing as i32), "{service}");
        }
        stopping.await.unwrap();
    });
}

store_test!(a_dev_sites_files_are_owner_only);
async fn a_dev_sites_files_are_owner_only(store: Store) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("site");
    let config = chipsite_e2e::config_for(&data, &store);
    chipsite_e2e::capture_logs();
    let site = chipsite_site::Site::start_dev(&config).await.unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("pki")), 0o700);
    assert_eq!(mode(&data.join("site-key.passphrase")), 0o600);
    assert_eq!(mode(&data.join("pki").join("ca.key")), 0o600);
    if matches!(store, Store::Sqlite) {
        assert_eq!(mode(&data.join("db")), 0o700);
        let files: Vec<_> = std::fs::read_dir(data.join("db")).unwrap().flatten().collect();
        assert!(files.len() >= 4, "{files:?}");
        for f in files {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }
    site.shutdown(Duration::from_secs(5)).await.unwrap();

    // A pass phrase file someone made readable by others is refused, with the fix named.
    let phrase = data.join("site-key.passphrase");
    std::fs::set_permissions(&phrase, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = chipsite_site::Site::start_dev(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("site-key.passphrase") && e.contains("chmod 600"),
        "{e}"
    );
    // Put right, the site starts again.
    std::fs::set_permissions(&phrase, std::fs::Permissions::from_mode(0o600)).unwrap();
    let site = chipsite_site::Site::start_dev(&config).await.unwrap();
    site.shutdown(Duration::from_secs(5)).await.unwrap();
    store.drop_database().await;
}
