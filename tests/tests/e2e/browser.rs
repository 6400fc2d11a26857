//! The admin web console in a real browser: headless Chromium driven over
//! WebDriver (ChromeDriver), against a whole site started in-process, on
//! every store. Signs in with a console ticket, creates a user (and sees a
//! refused one come back as typed, with the navigation), sorts, filters and
//! pages the users, loads a bad dump file, issues a ticket and checks its QR
//! code rendered, locks the user down and lifts it, raises an alarm, sees a
//! refused edit kept, revokes a ticket and seals the key (each asks first),
//! unseals, exports and imports the site key, reads the configuration
//! (secrets masked) and the audit log (operators named, paged by cursor),
//! and has a sign-in post from another web site refused. Screenshots of the
//! main pages go to `target/screenshots/console/<store>/` (or
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

/// ChromeDriver on a port it picked, in a process group of its own; the
/// whole group (the Chromium it started included) is killed when dropped,
/// also when the test fails before it closes the browser.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
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
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(driver)
        .arg("--port=0")
        .process_group(0)
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
    text_of(b, "body").await
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

/// The value of a form field as the browser holds it.
async fn value(b: &Client, css: &str) -> String {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The text of the first element `css` finds.
async fn text_of(b: &Client, css: &str) -> String {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Choose a file in the file input `css` finds.
async fn choose_file(b: &Client, css: &str, path: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(path)
        .await
        .unwrap();
}

/// The users page's count line.
async fn total(b: &Client) -> String {
    text_of(b, "#total").await
}

/// A page on another origin (another loopback port) with a form that
/// posts a junk sign-in token to the console, as a hostile page would.
async fn other_site(console: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let html = format!(
        "<!DOCTYPE html><html><body><form method=post action=\"{console}/signin\">\
         <input type=hidden name=t value=junk-token><button type=submit>Win a prize</button></form></body></html>"
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
            let _ = tcp.write_all(reply.as_bytes()).await;
        }
    });
    format!("http://{addr}/")
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

    // A refused form comes back with the reason, the navigation bar and
    // what was typed.
    b.goto(&format!("{console}/")).await.unwrap();
    type_into(&b, "form[action='/users'] input[name=chip_id]", "Not An Id").await;
    type_into(&b, "form[action='/users'] input[name=name]", "Typed Name").await;
    click(&b, "form[action='/users'] button").await;
    let alert = text_of(&b, "p.error[role=alert]").await;
    assert!(alert.to_lowercase().contains("chip"), "{alert}");
    assert_eq!(
        value(&b, "form[action='/users'] input[name=chip_id]").await,
        "Not An Id"
    );
    assert_eq!(
        value(&b, "form[action='/users'] input[name=name]").await,
        "Typed Name"
    );
    assert!(
        b.find(Locator::Css("header nav a[href='/audit']")).await.is_ok(),
        "the navigation stays"
    );
    shot(&b, &dir, "02a-refused-form").await;
    // A page with no form to go back to: the navigation, and "Back".
    b.goto(&format!("{console}/users/nobody")).await.unwrap();
    assert!(text(&b).await.contains("not found"), "{}", text(&b).await);
    click(&b, "main a[href='/']").await;
    assert_eq!(b.current_url().await.unwrap().path(), "/");

    // The users page: a total, sorting, filters, paging that keeps them.
    let mut admin = site.admin();
    for i in 0..55 {
        let chip_id = format!("user{i:02}");
        admin
            .create_user(pb::CreateUserRequest {
                chip_id: chip_id.clone(),
                name: format!("{} Person", ["Kim", "Lee", "Ann", "Bo", "Cy"][i % 5]),
                ..Default::default()
            })
            .await
            .unwrap();
        if i % 11 == 0 {
            admin
                .set_lockdown(pb::SetLockdownRequest {
                    chip_id,
                    locked: true,
                })
                .await
                .unwrap();
        }
    }
    b.goto(&format!("{console}/")).await.unwrap();
    assert!(total(&b).await.starts_with("56 users"), "{}", total(&b).await);
    click(&b, "th a[href*='sort=name']").await;
    let url = b.current_url().await.unwrap();
    assert!(url.query().unwrap_or("").contains("sort=name"), "{url}");
    let first = text_of(&b, "tbody tr td:nth-child(2)").await;
    assert!(
        first.starts_with("Alice") || first.starts_with("Ann"),
        "sorted by name: {first}"
    );
    shot(&b, &dir, "02-users").await;
    // Locked-down users only, still sorted by name.
    b.find(Locator::Css("select[name=lock]"))
        .await
        .unwrap()
        .select_by_value("locked")
        .await
        .unwrap();
    click(&b, "form[action='/'] button").await;
    assert!(
        total(&b).await.starts_with("5 users match"),
        "{}",
        total(&b).await
    );
    let url = b.current_url().await.unwrap();
    assert!(url.query().unwrap_or("").contains("sort=name"), "{url}");
    // A search past one page: the next page keeps the search and order.
    b.goto(&format!("{console}/?q=user&sort=-chip_id")).await.unwrap();
    assert!(total(&b).await.starts_with("55 users match"));
    click(&b, "a[rel=next]").await;
    let url = b.current_url().await.unwrap();
    let query = url.query().unwrap_or("").to_owned();
    assert!(
        query.contains("q=user") && query.contains("sort=-chip_id"),
        "{query}"
    );
    let rows = b.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 5, "55 = 50 + 5");
    assert!(text(&b).await.contains("user00") && !text(&b).await.contains("user54"));
    click(&b, "p.paging a").await;
    assert!(text(&b).await.contains("user54"), "First page");

    // A bad dump file: the reason in an operator's words, on the users page.
    let files = tempfile::tempdir().unwrap();
    let bad = files.path().join("bad.json");
    std::fs::write(&bad, "{\n  \"chip_id\": 7\n}\n").unwrap();
    choose_file(
        &b,
        "form[action='/users/load'] input[name=file]",
        bad.to_str().unwrap(),
    )
    .await;
    click(&b, "form[action='/users/load'] button").await;
    let alert = text_of(&b, "p.error[role=alert]").await;
    assert!(
        alert.contains("line 2") && alert.contains("`chip_id` must be"),
        "{alert}"
    );
    assert!(alert.contains("choose the file again"), "{alert}");

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

    // The ticket issued above is still outstanding: the page says so.
    assert!(
        text(&b)
            .await
            .contains("already has 1 outstanding connection ticket"),
        "{}",
        text(&b).await
    );
    // An alarm raised from the console is listed with how it went.
    type_into(
        &b,
        "form[action='/users/alice/alarm'] input[name=text]",
        "Please call the office",
    )
    .await;
    click(&b, "form[action='/users/alice/alarm'] button").await;
    let alarms = text_of(&b, "#alarms table").await;
    assert!(
        alarms.contains("Please call the office") && alarms.contains("notice"),
        "{alarms}"
    );
    // A refused edit keeps what was typed.
    type_into(
        &b,
        "form[action='/users/alice/edit'] input[name=name]",
        "Alice Edited",
    )
    .await;
    type_into(
        &b,
        "form[action='/users/alice/edit'] input[name=phone]",
        "call me maybe",
    )
    .await;
    click(&b, "form[action='/users/alice/edit'] button").await;
    assert!(
        text(&b).await.contains("phone may hold digits"),
        "{}",
        text(&b).await
    );
    assert_eq!(
        value(&b, "form[action='/users/alice/edit'] input[name=name]").await,
        "Alice Edited"
    );
    assert_eq!(
        value(&b, "form[action='/users/alice/edit'] input[name=phone]").await,
        "call me maybe"
    );
    shot(&b, &dir, "04a-user-refused-edit").await;

    // Revoking the ticket asks first.
    b.goto(&format!("{console}/tickets?all=true")).await.unwrap();
    let page = text(&b).await;
    assert!(
        page.contains("console sign-in"),
        "the console's own ticket: {page}"
    );
    b.goto(&format!("{console}/tickets")).await.unwrap();
    click(&b, "a[href$='/revoke']").await;
    assert!(text(&b).await.contains("Revoke ticket"), "{}", text(&b).await);
    click(&b, "main form button").await;
    assert!(text(&b).await.contains("revoked."), "{}", text(&b).await);

    // Seal the site key (it asks first), then unseal it with the pass phrase.
    b.goto(&format!("{console}/key")).await.unwrap();
    click(&b, "a[href='/key/seal']").await;
    assert!(text(&b).await.contains("Seal the site key?"));
    click(&b, "form[action='/key/seal'] button").await;
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

    // Export refuses a wrong pass phrase; import takes an exported file.
    let pin_before = site.site_key_pin().await;
    type_into(
        &b,
        "form[action='/key/export'] input[name=passphrase]",
        "not the pass phrase",
    )
    .await;
    click(&b, "form[action='/key/export'] button").await;
    assert!(
        b.find(Locator::Css("p.error[role=alert]")).await.is_ok(),
        "{}",
        text(&b).await
    );
    let pem = site
        .admin()
        .export_site_key(pb::ExportSiteKeyRequest {
            passphrase: passphrase.trim().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .encrypted_pem;
    let key_file = files.path().join("site-key.pem");
    std::fs::write(&key_file, pem).unwrap();
    choose_file(
        &b,
        "form[action='/key/import'] input[name=file]",
        key_file.to_str().unwrap(),
    )
    .await;
    type_into(
        &b,
        "form[action='/key/import'] input[name=passphrase]",
        passphrase.trim(),
    )
    .await;
    type_into(
        &b,
        "form[action='/key/import'] input[name=old]",
        passphrase.trim(),
    )
    .await;
    click(&b, "form[action='/key/import'] button").await;
    let page = text(&b).await;
    assert!(
        page.contains("was imported") && page.contains(&pin_before),
        "{page}"
    );
    assert!(
        !b.source().await.unwrap().contains(passphrase.trim()),
        "never echoed"
    );
    shot(&b, &dir, "05a-site-key-imported").await;

    // The configuration marks what changed and masks secrets in values.
    site.admin()
        .update_site_config(pb::UpdateSiteConfigRequest {
            set: [(
                "alarm.smtp_url".to_owned(),
                "smtp://mailer:s3cret-pw@127.0.0.1:25".to_owned(),
            )]
            .into(),
            reset: vec![],
        })
        .await
        .unwrap();

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
    // Who acted, in words; and a page of older entries by the cursor.
    let mut who = vec![];
    for cell in b
        .find_all(Locator::Css("tbody tr td:nth-child(3)"))
        .await
        .unwrap()
    {
        who.push(cell.text().await.unwrap());
    }
    assert!(
        who.iter().any(|w| w.starts_with("console (")),
        "the operator is named: {who:?}"
    );
    assert!(page.contains("done") && page.contains("redeemed"), "{page}");
    shot(&b, &dir, "06-audit").await;
    b.goto(&format!("{console}/audit?limit=5")).await.unwrap();
    let newest = text(&b).await;
    click(&b, "a[rel=next]").await;
    let older = text(&b).await;
    assert!(older.contains("Newest") && older != newest, "{older}");
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
        (
            "/config",
            "09-config",
            "value=\"smtp://mailer:****@127.0.0.1:25\"",
        ),
        ("/health", "10-health", "key-vault"),
    ] {
        b.goto(&format!("{console}{path}")).await.unwrap();
        // The source: a value shown in a form field is not page text.
        let source = b.source().await.unwrap();
        assert!(source.contains(expect), "{path}: {source}");
        assert!(!source.contains("s3cret-pw"), "{path}");
        shot(&b, &dir, name).await;
    }
    // A query string a page does not take: a page that says which, with
    // the navigation.
    b.goto(&format!("{console}/audit?limit=-1")).await.unwrap();
    let page = text(&b).await;
    assert!(page.contains("limit") && page.contains("does not take"), "{page}");
    assert!(b.find(Locator::Css("header nav a[href='/audit']")).await.is_ok());

    // Another web site's page cannot post sign-ins (nor spend the limit).
    let other = other_site(&console).await;
    b.goto(&other).await.unwrap();
    click(&b, "form button").await;
    let page = text(&b).await;
    assert!(page.contains("sent by another web site"), "{page}");
    b.goto(&format!("{console}/")).await.unwrap();
    assert_eq!(b.current_url().await.unwrap().path(), "/", "still signed in");

    // Sign out: the session is over.
    click(&b, "form[action='/signout'] button").await;
    b.goto(&format!("{console}/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/signin"));
    b.close().await.unwrap();
    eprintln!("[{label}] screenshots in {}", dir.display());
    site.finish().await;
}
