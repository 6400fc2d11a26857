//! The admin web console in a real browser: headless Chromium driven over
//! WebDriver (ChromeDriver), against a whole site started in-process, on
//! every store. Signs in with a console ticket, creates a user, issues a
//! ticket and checks its QR code rendered, locks the user down and lifts it,
//! unseals the site key, and reads the audit log. Screenshots of the main
//! pages go to `target/screenshots/console/<store>/` (or
//! `$CHIPSITE_SCREENSHOTS/<store>/`).
//!
//! Debian's `chromium` and `chromium-driver` are installed by `.ci/run`, or
//! by this test when they are missing and it may (as root, with apt-get).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_proto::admin::v1 as pb;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// ChromeDriver on a port it picked; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Debian's chromium and chromium-driver, installed if missing.
fn ensure_chromium() -> PathBuf {
    // The SQLite and PostgreSQL cases run at once in one process: one apt-get at a time.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let (Some(_), Some(driver)) = (on_path("chromium"), on_path("chromedriver")) {
        return driver;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium", "chromium-driver"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        assert!(
            install(),
            "the browser tests need Debian's chromium and chromium-driver: \
             apt-get install chromium chromium-driver"
        );
    }
    on_path("chromedriver").expect("chromedriver after installing chromium-driver")
}

fn start_driver() -> Driver {
    let driver = ensure_chromium();
    let mut child = Command::new(driver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // "ChromeDriver was started successfully on port 40123."
    let port = loop {
        let line = lines.next().expect("chromedriver said where it listens").unwrap();
        if let Some(rest) = line.split("started successfully on port ").nth(1) {
            break rest.trim_end_matches('.').trim().parse().unwrap();
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": on_path("chromium").unwrap(),
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000", "--lang=en-US"],
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

fn screenshots(store: &str) -> PathBuf {
    let base = std::env::var_os("CHIPSITE_SCREENSHOTS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots/console"),
        PathBuf::from,
    );
    let dir = base.join(store);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(b: &Client, dir: &Path, name: &str) {
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The text of the whole page.
async fn text(b: &Client) -> String {
    b.find(Locator::Css("body")).await.unwrap().text().await.unwrap()
}

/// Click something that leads to another page, and wait for that page.
async fn click(b: &Client, css: &str) {
    b.execute("window.__chipsite_old_page = true; return true;", vec![])
        .await
        .unwrap();
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
    for _ in 0..200 {
        let loaded = b
            .execute(
                "return !window.__chipsite_old_page && document.readyState === 'complete';",
                vec![],
            )
            .await;
        if loaded.is_ok_and(|v| v == json!(true)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{css}: no new page within 10 s");
}

async fn type_into(b: &Client, css: &str, value: &str) {
    let e = b
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

store_test!(the_console_in_a_real_browser);
async fn the_console_in_a_real_browser(store: Store) {
    let driver = tokio::task::spawn_blocking(start_driver).await.unwrap();
    let label = store.label();
    let dir = screenshots(label);
    let site = TestSite::start(&store).await;
    let b = browser(&driver).await;
    let console = site.site.endpoints.console.clone();

    // Nothing without a session: the sign-in page.
    b.goto(&format!("{console}/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/signin"));

    // Sign in with a one-time console link.
    let link = site
        .admin()
        .issue_console_ticket(pb::IssueConsoleTicketRequest { ttl_seconds: 0 })
        .await
        .unwrap()
        .into_inner()
        .url;
    b.goto(&link).await.unwrap();
    shot(&b, &dir, "01-sign-in").await;
    click(&b, "form[action='/signin'] button").await;
    assert_eq!(b.current_url().await.unwrap().path(), "/", "[{label}]");
    assert!(text(&b).await.contains("site key unsealed"));

    // Create a user (its name is hostile: it shows as text).
    type_into(&b, "form[action='/users'] input[name=chip_id]", "alice").await;
    type_into(
        &b,
        "form[action='/users'] input[name=name]",
        "Alice <b>Example</b>",
    )
    .await;
    type_into(&b, "form[action='/users'] input[name=email]", "alice@example.org").await;
    click(&b, "form[action='/users'] button").await;
    assert_eq!(b.current_url().await.unwrap().path(), "/users/alice");
    assert!(
        text(&b).await.contains("alice — Alice <b>Example</b>"),
        "{}",
        text(&b).await
    );
    b.goto(&format!("{console}/")).await.unwrap();
    shot(&b, &dir, "02-users").await;

    // Issue a ticket: the QR code is drawn, big enough to scan.
    b.goto(&format!("{console}/users/alice")).await.unwrap();
    click(&b, "form[action='/users/alice/ticket'] button").await;
    let qr = b.find(Locator::Css("img.qr")).await.unwrap();
    let drawn = b
        .execute(
            "const i = arguments[0]; return [i.complete, i.naturalWidth, i.getBoundingClientRect().width];",
            vec![serde_json::to_value(&qr).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(drawn[0], json!(true), "{drawn}");
    assert!(drawn[1].as_f64().unwrap() > 0.0, "the QR image decoded: {drawn}");
    assert!(
        drawn[2].as_f64().unwrap() >= 300.0,
        "the QR is shown large: {drawn}"
    );
    assert!(text(&b).await.contains("chipsite:user?"));
    shot(&b, &dir, "03-ticket").await;

    // Lock the user down (with a confirmation step) and lift it.
    click(&b, "a[href='/users/alice/lockdown?locked=true']").await;
    assert!(text(&b).await.contains("Lock down user alice?"));
    shot(&b, &dir, "04-confirm-lockdown").await;
    click(&b, "form[action='/users/alice/lockdown'] button").await;
    assert!(text(&b).await.contains("LOCKED DOWN"));
    assert!(
        site.admin()
            .get_user(pb::GetUserRequest {
                chip_id: "alice".into()
            })
            .await
            .unwrap()
            .into_inner()
            .locked
    );
    click(&b, "a[href='/users/alice/lockdown?locked=false']").await;
    click(&b, "form[action='/users/alice/lockdown'] button").await;
    assert!(!text(&b).await.contains("LOCKED DOWN"));

    // Unseal the site key with the pass phrase.
    site.admin().seal_vault(pb::SealVaultRequest {}).await.unwrap();
    b.goto(&format!("{console}/key")).await.unwrap();
    assert!(text(&b).await.contains("site key SEALED"));
    shot(&b, &dir, "05-site-key-sealed").await;
    let passphrase = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();
    type_into(
        &b,
        "form[action='/key/unseal'] input[name=passphrase]",
        passphrase.trim(),
    )
    .await;
    click(&b, "form[action='/key/unseal'] button").await;
    let page = text(&b).await;
    assert!(page.contains("The site key is unsealed."), "{page}");
    assert!(
        !b.source().await.unwrap().contains(passphrase.trim()),
        "never echoed"
    );
    assert!(
        !site
            .admin()
            .get_vault_status(pb::GetVaultStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .sealed
    );

    // The audit log, newest first, then filtered.
    b.goto(&format!("{console}/audit")).await.unwrap();
    let page = text(&b).await;
    for action in [
        "unseal_vault",
        "lift_lockdown",
        "issue_user_ticket",
        "create_user",
        "redeemed",
    ] {
        assert!(page.contains(action), "{action}: {page}");
    }
    assert!(
        page.find("unseal_vault") < page.find("create_user"),
        "newest first"
    );
    shot(&b, &dir, "06-audit").await;
    type_into(&b, "form[action='/audit'] input[name=q]", "lockdown").await;
    click(&b, "form[action='/audit'] button").await;
    let page = text(&b).await;
    assert!(
        page.contains("lift_lockdown") && !page.contains("create_user"),
        "{page}"
    );

    // The other pages render.
    for (path, name, expect) in [
        ("/tickets?all=true", "07-tickets", "redeemed"),
        ("/peer", "08-peer", "Peer server"),
        ("/config", "09-config", "ticket.ttl_seconds"),
        ("/health", "10-health", "key-vault"),
    ] {
        b.goto(&format!("{console}{path}")).await.unwrap();
        assert!(text(&b).await.contains(expect), "{path}");
        shot(&b, &dir, name).await;
    }

    // Sign out: the session is over.
    click(&b, "form[action='/signout'] button").await;
    b.goto(&format!("{console}/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/signin"));
    b.close().await.unwrap();
    eprintln!("[{label}] screenshots in {}", dir.display());
    site.finish().await;
}
