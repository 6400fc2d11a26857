//! The `chipsite` binary itself: `dev` starts, writes its endpoints, keeps
//! its data across restarts and stops cleanly on Ctrl-C (SIGINT); `config`
//! layers file and environment and masks secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::OsStr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// `chipsite config` with these variables set.
fn config_with(vars: &[(&str, &OsStr)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .arg("config")
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

fn start_dev(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["dev", "--data-dir"])
        .arg(dir)
        .envs(chipsite_site::config::Addresses::ephemeral_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn interrupt_and_wait(mut child: Child) -> (bool, String) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
            return (status.success(), out);
        }
        assert!(Instant::now() < deadline, "chipsite dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_starts_persists_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.json");

    let first = start_dev(dir.path());
    assert!(wait_for(&endpoints), "endpoints.json written");
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&endpoints).unwrap()).unwrap();
    assert!(e["admin"].as_str().unwrap().starts_with("127.0.0.1:"));
    let (ok, out) = interrupt_and_wait(first);
    assert!(ok, "exit status 0 on Ctrl-C");
    assert!(!endpoints.exists(), "endpoints.json removed on shutdown");
    for expected in [
        "admin ",
        "key-vault ",
        "ticket ",
        "endpoints",
        "first launch: created the site key",
        "WARNING",
        "Try:",
    ] {
        assert!(out.contains(expected), "{expected:?} printed:\n{out}");
    }
    assert!(!out.contains(&std::fs::read_to_string(dir.path().join("site-key.passphrase")).unwrap()));

    let second = start_dev(dir.path());
    assert!(wait_for(&endpoints));
    let (ok, out) = interrupt_and_wait(second);
    assert!(ok);
    assert!(
        !out.contains("created the site key"),
        "the second launch keeps the key:\n{out}"
    );
    assert!(out.contains("vault: unsealed"));
}

#[test]
fn config_layers_file_then_environment_and_masks_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chipsite.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://site:hunter2@db.internal/chipsite\"\nlisten = \"0.0.0.0:7000\"\n[addresses]\nkey_vault = \"kv:1\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["--config"])
        .arg(&file)
        .arg("config")
        .env("CHIPSITE_ADDRESSES__TICKET", "tk:2")
        .env("CHIPSITE_LISTEN", "127.0.0.1:7001")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("postgres://site:***@db.internal/chipsite"),
        "{text}"
    );
    assert!(!text.contains("hunter2"));
    assert!(
        text.contains("\"127.0.0.1:7001\""),
        "environment overrides the file: {text}"
    );
    assert!(text.contains("\"kv:1\"") && text.contains("\"tk:2\""), "{text}");

    let bad = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["--config", "/nonexistent/chipsite.toml", "config"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not exist"));
    // An unknown key, in the file or the environment, stops the start and is named.
    std::fs::write(&file, "[addresses]\nkey_valt = \"kv:1\"\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .arg("--config")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("key_valt"),
        "{bad:?}"
    );
    let bad = config_with(&[("CHIPSITE_DATABSE_URL", OsStr::new("postgres://db/chipsite"))]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("databse_url"),
        "{bad:?}"
    );
    // A secret setting from a file (a mounted secret): it wins, and stays masked.
    let secret = dir.path().join("database-url");
    std::fs::write(&secret, "postgres://fileuser:from-a-file@db.internal/chipsite\n").unwrap();
    let from_file = config_with(&[
        (
            "CHIPSITE_DATABASE_URL",
            OsStr::new("postgres://site:from-env@db.internal/chipsite"),
        ),
        ("CHIPSITE_DATABASE_URL_FILE", secret.as_os_str()),
    ]);
    let shown = String::from_utf8_lossy(&from_file.stdout);
    assert!(from_file.status.success(), "{from_file:?}");
    assert!(
        shown.contains("postgres://fileuser:***@db.internal/chipsite\""),
        "{shown}"
    );
    assert!(
        !shown.contains("from-a-file") && !shown.contains("from-env"),
        "{shown}"
    );
    let missing = config_with(&[(
        "CHIPSITE_DATABASE_URL_FILE",
        dir.path().join("no-such-file").as_os_str(),
    )]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("CHIPSITE_DATABASE_URL_FILE"),
        "{missing:?}"
    );
    // What Kubernetes and Docker links set for a Service named chipsite… is not a setting.
    let linked = config_with(&[
        ("CHIPSITE_SERVICE_HOST", OsStr::new("10.0.0.7")),
        ("CHIPSITE_PORT", OsStr::new("tcp://10.0.0.7:44310")),
        ("CHIPSITE_ADMIN_SERVICE_PORT_GRPC", OsStr::new("44310")),
        ("CHIPSITE_ADMIN_PORT_44310_TCP_ADDR", OsStr::new("10.0.0.8")),
    ]);
    assert!(linked.status.success(), "{linked:?}");
    // Limits are settings with ranges.
    let ok = config_with(&[("CHIPSITE_GATEWAY__MAX_HANDSHAKES", OsStr::new("64"))]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("max_handshakes = 64"),
        "{ok:?}"
    );
    let bad = config_with(&[("CHIPSITE_GATEWAY__HANDSHAKE_TIMEOUT_MS", OsStr::new("0"))]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("gateway.handshake_timeout_ms = 0 is out of range"),
        "{bad:?}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["serve", "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("invalid value 'nonsense'"), "{said}");
    // `serve --help`, the refusal and `Service::parse` name the same services.
    let help = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for name in chipsite_site::Service::names() {
        assert!(said.contains(name), "{name}: {said}");
        assert!(help.contains(name), "{name}: {help}");
        assert_eq!(
            chipsite_site::Service::parse(name).map(|s| s.identity()),
            Some(name)
        );
    }
}

/// A key-vault's certificate files, from a CA of its own, and the material
/// of a client (the ticket identity) of that CA.
struct KeyVaultFiles {
    dir: tempfile::TempDir,
    client: chipsite_tls::IssuedCertificate,
}

impl KeyVaultFiles {
    fn new() -> Self {
        use chipsite_tls::{CertificateAuthority, identity as id};
        chipsite_tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("serve-test").unwrap();
        let server = ca.issue(id::KEY_VAULT, &[], Duration::from_secs(3600)).unwrap();
        let client = ca.issue(id::TICKET, &[], Duration::from_secs(3600)).unwrap();
        for (name, body) in [
            ("kv.pem", &server.cert_pem),
            ("kv.key", &server.key_pem),
            ("ca.pem", &server.ca_pem),
        ] {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        Self { dir, client }
    }

    /// `chipsite serve key-vault` on `addr` with `database_url`, without
    /// any pass phrase from this test's environment.
    fn serve(&self, addr: &str, database_url: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chipsite"));
        cmd.args(["serve", "key-vault"])
            .env("CHIPSITE_LISTEN", addr)
            .env("CHIPSITE_DATABASE_URL", database_url)
            .env("CHIPSITE_TLS__CERT", self.dir.path().join("kv.pem"))
            .env("CHIPSITE_TLS__KEY", self.dir.path().join("kv.key"))
            .env("CHIPSITE_TLS__CA", self.dir.path().join("ca.pem"))
            .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE")
            .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd
    }

    /// key-vault's status at `addr`, asked again until it answers or
    /// `within` passes.
    fn status(
        &self,
        runtime: &tokio::runtime::Runtime,
        addr: &str,
        within: Duration,
    ) -> Result<chipsite_proto::keyvault::v1::VaultStatus, tonic::Status> {
        use chipsite_proto::keyvault::v1::{GetStatusRequest, key_vault_client::KeyVaultClient};
        use chipsite_tls::{ReloadableTls, TlsMaterial, identity as id};
        let c = &self.client;
        runtime.block_on(async {
            let tls = ReloadableTls::from_material(
                &TlsMaterial::from_pem(&c.cert_pem, &c.key_pem, &c.ca_pem).unwrap(),
            )
            .unwrap();
            let channel = chipsite_tls::connect_lazy(addr, id::KEY_VAULT, tls).unwrap();
            let deadline = Instant::now() + within;
            loop {
                match KeyVaultClient::new(channel.clone())
                    .get_status(GetStatusRequest {})
                    .await
                {
                    Ok(s) => return Ok(s.into_inner()),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    }
}

/// A loopback address no one listens on (yet).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// A runtime that keeps running between calls, so a client answers a
/// server's shutdown (GOAWAY, PING) as a real client would.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `chipsite serve key-vault` with the pass phrase in its environment: the
/// key is created on first launch and unsealed on the next; without the
/// variable the vault starts sealed; the pass phrase is written nowhere.
#[test]
fn serve_key_vault_takes_its_pass_phrase_from_the_environment_only() {
    let files = KeyVaultFiles::new();
    let dir = files.dir.path();
    let addr = free_addr();
    let database_url = format!("sqlite://{}/kv.sqlite?mode=rwc", dir.display());
    let passphrase = "environment-only pass phrase";
    // A mounted secret: a file elsewhere, with the usual final newline.
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("site-key-passphrase");
    std::fs::write(&secret_file, format!("{passphrase}\n")).unwrap();
    let serve = |with_passphrase: Option<&str>| {
        let mut cmd = files.serve(&addr, &database_url);
        match with_passphrase {
            Some("file") => {
                cmd.env("CHIPSITE_SITE_KEY_PASSPHRASE_FILE", &secret_file);
            }
            Some(_) => {
                cmd.env("CHIPSITE_SITE_KEY_PASSPHRASE", passphrase);
            }
            None => {}
        }
        cmd.spawn().unwrap()
    };
    let runtime = client_runtime();
    let status = || {
        files
            .status(&runtime, &addr, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("key-vault did not answer: {e}"))
    };

    let first = serve(Some("variable"));
    let created = status();
    assert!(
        created.has_key && !created.sealed,
        "first launch creates the key and unseals"
    );
    assert!(interrupt_and_wait(first).0);

    let second = serve(Some("file"));
    let again = status();
    assert!(
        !again.sealed && again.site_key_pin == created.site_key_pin,
        "same key, unsealed again with the pass phrase from CHIPSITE_SITE_KEY_PASSPHRASE_FILE"
    );
    assert!(interrupt_and_wait(second).0);

    let third = serve(None);
    let sealed = status();
    assert!(
        sealed.has_key && sealed.sealed,
        "without the pass phrase the vault starts sealed"
    );
    assert!(interrupt_and_wait(third).0);

    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        assert!(
            !bytes
                .windows(passphrase.len())
                .any(|w| w == passphrase.as_bytes()),
            "the pass phrase is in {}",
            entry.path().display()
        );
    }
}

/// `chipsite serve <service>` with the files `chipsite pki init` made, its
/// store at `database_url`, its ops port at `ops`.
fn serve_from_pki(service: &str, pki: &Path, database_url: &str, ops: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chipsite"));
    cmd.args(["serve", service])
        .env("CHIPSITE_LISTEN", free_addr())
        .env("CHIPSITE_ADDRESSES__OPS", ops)
        .env("CHIPSITE_DATABASE_URL", database_url)
        .env("CHIPSITE_TLS__CERT", pki.join(format!("{service}.pem")))
        .env("CHIPSITE_TLS__KEY", pki.join(format!("{service}.key")))
        .env("CHIPSITE_TLS__CA", pki.join("ca.pem"))
        .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE")
        .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

fn pki_init(dir: &Path) {
    let made = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["pki", "init"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

/// Until `chipsite health` passes for the ops port `ops` (or 30 s pass).
fn until_ready(ops: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = health(&[], Some(ops));
        if ready.status.success() {
            return;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("never ready: {}", String::from_utf8_lossy(&ready.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Against one fresh PostgreSQL database: two `serve ticket` replicas
/// started together both serve (their migrations take turns under the
/// advisory lock); a second key-vault, which must run alone, stops at once
/// saying why, and once the first has stopped another one serves. (Without
/// `CHIPSITE_TEST_POSTGRES_URL` this says so and passes; CI sets it.)
#[test]
fn replicas_share_one_postgres_and_a_single_service_refuses_a_second() {
    let runtime = client_runtime();
    let Some(store) = runtime.block_on(chipsite_e2e::fresh_store(chipsite_e2e::StoreKind::Postgres)) else {
        eprintln!("not run: set CHIPSITE_TEST_POSTGRES_URL (CI does)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    pki_init(&pki);
    let url = store.url();

    let ops: Vec<String> = (0..2).map(|_| free_addr()).collect();
    let mut replicas: Vec<Child> = ops
        .iter()
        .map(|o| serve_from_pki("ticket", &pki, &url, o).spawn().unwrap())
        .collect();
    for (o, r) in ops.iter().zip(replicas.iter_mut()) {
        until_ready(o, r);
    }

    let first_ops = free_addr();
    let mut first = serve_from_pki("key-vault", &pki, &url, &first_ops)
        .spawn()
        .unwrap();
    until_ready(&first_ops, &mut first);
    let second = serve_from_pki("key-vault", &pki, &url, &free_addr())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second key-vault served");
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(
        why.contains("another key-vault process already runs against this database"),
        "{why}"
    );
    assert!(interrupt_and_wait(first).0, "a clean stop");
    // The claim went with the process: a new key-vault serves.
    let third_ops = free_addr();
    let mut third = serve_from_pki("key-vault", &pki, &url, &third_ops)
        .spawn()
        .unwrap();
    until_ready(&third_ops, &mut third);
    assert!(interrupt_and_wait(third).0, "a clean stop");
    for replica in replicas {
        assert!(interrupt_and_wait(replica).0, "a clean stop");
    }
    runtime.block_on(store.drop_database());
}

/// `chipsite health` as a container runtime runs it.
fn health(args: &[&str], ops: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chipsite"));
    cmd.arg("health").args(args).env_remove("CHIPSITE_ADDRESSES__OPS");
    if let Some(ops) = ops {
        cmd.env("CHIPSITE_ADDRESSES__OPS", ops);
    }
    cmd.output().unwrap()
}

/// `chipsite pki init` makes the files `serve` runs with, and `chipsite
/// health` (the containers' health check) passes while the service is
/// ready and fails, saying why, when no one answers or nothing is set.
#[test]
fn pki_init_makes_what_serve_needs_and_health_checks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let made = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["pki", "init"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let out = String::from_utf8_lossy(&made.stdout);
    assert!(
        out.contains("made the internal CA") && out.contains("admin-client"),
        "{out}"
    );
    assert!(!out.contains("bench"), "{out}");
    assert!(pki.join("ca").join("ca.key").exists() && !pki.join("ca.key").exists());

    let (addr, ops) = (free_addr(), free_addr());
    let mut child = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["serve", "key-vault"])
        .env("CHIPSITE_LISTEN", &addr)
        .env("CHIPSITE_ADDRESSES__OPS", &ops)
        .env(
            "CHIPSITE_DATABASE_URL",
            format!("sqlite://{}/kv.sqlite?mode=rwc", tmp.path().display()),
        )
        .env("CHIPSITE_TLS__CERT", pki.join("key-vault.pem"))
        .env("CHIPSITE_TLS__KEY", pki.join("key-vault.key"))
        .env("CHIPSITE_TLS__CA", pki.join("ca.pem"))
        .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE")
        .env_remove("CHIPSITE_SITE_KEY_PASSPHRASE_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = health(&[], Some(&ops));
        if ready.status.success() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("never ready: {}", String::from_utf8_lossy(&ready.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The ops address as a container sets it: every interface, asked on loopback.
    let port = ops.rsplit_once(':').unwrap().1;
    assert!(
        health(&["--live"], Some(&format!("0.0.0.0:{port}")))
            .status
            .success()
    );
    assert!(interrupt_and_wait(child).0);

    let gone = health(&["--addr", &ops, "--timeout-ms", "2000"], None);
    assert_eq!(gone.status.code(), Some(1));
    let why = String::from_utf8_lossy(&gone.stderr);
    assert!(why.contains(&ops) && why.contains("/readyz"), "{why}");
    let unset = health(&[], None);
    assert_eq!(unset.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unset.stderr).contains("no ops port"));
}
