//! The admin web console without a browser: every route refuses without a
//! session, a POST refuses without the session's CSRF token, a console
//! ticket signs in once, and hostile input shows as text. On every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_proto::admin::v1 as pb;
use chipsite_tls::identity as id;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pages that need a session.
const GETS: [&str; 14] = [
    "/",
    "/tickets/x/revoke",
    "/key/seal",
    "/?q=x",
    "/users/alice",
    "/users/alice/lockdown?locked=true",
    "/lockdown?locked=true",
    "/tickets",
    "/key",
    "/peer",
    "/config",
    "/audit?q=x",
    "/health",
    "/anything",
];
/// Forms that need a session and its CSRF token.
const POSTS: [&str; 19] = [
    "/users",
    "/users/load",
    "/users/alice/edit",
    "/users/alice/ticket",
    "/users/alice/alarm",
    "/users/alice/dump",
    "/users/alice/lockdown",
    "/lockdown",
    "/tickets/x/revoke",
    "/key/unseal",
    "/key/seal",
    "/key/create",
    "/key/passphrase",
    "/key/export",
    "/key/import",
    "/peer/start",
    "/peer/stop",
    "/config",
    "/signout",
];
/// A form that would do something with the right CSRF token.
const FORM: &str = "csrf=wrong&locked=true&chip_id=zed&name=Zed&status=active&passphrase=p&old=p&new=q&confirm=q\
                    &key=ticket.ttl_seconds&value=77";

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

/// An HTTP/1.1 request that closes its connection; `form` url-encoded.
fn request(addr: &str, method: &str, path: &str, cookie: Option<&str>, form: Option<&str>) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    let body = form.unwrap_or("");
    if form.is_some() {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

/// What came back on a connection (status 0 and no body when it was no HTTP answer).
fn reply(out: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// One HTTP/1.1 request on its own connection.
pub(crate) async fn http(
    site: &TestSite,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Reply {
    let addr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(request(&addr, method, path, cookie, form).as_bytes())
        .await
        .unwrap();
    let mut out = vec![];
    tcp.read_to_end(&mut out).await.unwrap();
    reply(&out)
}

/// A header's value (names compare without case).
fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn link(site: &TestSite) -> String {
    let url = site
        .admin()
        .issue_console_ticket(pb::IssueConsoleTicketRequest { ttl_seconds: 0 })
        .await
        .unwrap()
        .into_inner()
        .url;
    url.split_once("/signin?t=").unwrap().1.to_owned()
}

store_test!(console_sessions_csrf_and_escaping);
async fn console_sessions_csrf_and_escaping(store: Store) {
    let site = TestSite::start(&store).await;
    site.admin()
        .create_user(pb::CreateUserRequest {
            chip_id: "mallory".into(),
            name: "<script>alert(1)</script>".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Nothing without a session.
    let r = http(&site, "GET", "/", None, None).await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, Some("/signin")),
        "[{}]",
        store.label()
    );
    assert!(
        header(&r, "content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );
    for path in GETS {
        assert_eq!(http(&site, "GET", path, None, None).await.status, 303, "{path}");
    }
    for path in POSTS {
        let r = http(&site, "POST", path, None, Some(FORM)).await;
        assert_eq!(r.status, 403, "{path}");
    }
    let forged = http(&site, "GET", "/", Some("__Host-chipsite_console=forged"), None).await;
    assert_eq!(forged.status, 303);

    // A bad ticket, then a good one (once).
    let bad = http(&site, "POST", "/signin", None, Some("t=bm90LWEtdG9rZW4")).await;
    assert_eq!(bad.status, 403);
    assert!(header(&bad, "set-cookie").is_none());
    let token = link(&site).await;
    let form = http(&site, "GET", &format!("/signin?t={token}"), None, None).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("method=\"post\""));
    let ok = http(&site, "POST", "/signin", None, Some(&format!("t={token}"))).await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let set = header(&ok, "set-cookie").unwrap().to_owned();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let again = http(&site, "POST", "/signin", None, Some(&format!("t={token}"))).await;
    assert_eq!(again.status, 403, "a console ticket signs in once");
    // The cookie as the browser sends it back.
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-chipsite_console="), "{cookie}");

    // Signed in: the users page, hostile text escaped.
    let home = http(&site, "GET", "/", Some(&cookie), None).await;
    assert_eq!(home.status, 200, "{}", home.body);
    assert!(
        home.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        home.body
    );
    assert!(!home.body.contains("<script>"));
    let csrf = home
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();

    // Every form refuses a wrong CSRF token, and nothing happens.
    for path in POSTS {
        let r = http(&site, "POST", path, Some(&cookie), Some(FORM)).await;
        assert_eq!(r.status, 403, "{path}");
    }
    assert_eq!(
        http(&site, "GET", "/users/zed", Some(&cookie), None).await.status,
        404
    );
    let mut admin = site.admin();
    let vault = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(vault.has_key && !vault.sealed, "{vault:?}");
    let config = admin
        .get_site_config(pb::GetSiteConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(config.values["ticket.ttl_seconds"], "77", "nothing was changed");
    let peer = admin
        .get_peer_server(pb::GetPeerServerRequest {})
        .await
        .unwrap()
        .into_inner();
    // As the dev site started it: no forged request stopped it.
    assert_eq!(peer.desired, "running");

    // Create a user, issue a ticket (QR, URI, JSON), lock down and lift.
    let f = |rest: &str| format!("csrf={csrf}&{rest}");
    let r = http(
        &site,
        "POST",
        "/users",
        Some(&cookie),
        Some(&f("chip_id=alice&name=Alice+Example&email=")),
    )
    .await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, Some("/users/alice")),
        "{}",
        r.body
    );
    let page = http(&site, "GET", "/users/alice", Some(&cookie), None).await;
    assert!(page.body.contains("Alice Example"));
    let t = http(&site, "POST", "/users/alice/ticket", Some(&cookie), Some(&f(""))).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert!(t.body.contains("data:image/svg+xml;base64,") && t.body.contains("chipsite:user?"));
    let r = http(
        &site,
        "POST",
        "/users",
        Some(&cookie),
        Some(&f("chip_id=alice&name=Again")),
    )
    .await;
    assert_eq!(r.status, 422, "an existing CHIP ID is a clear refusal");
    assert!(r.body.contains("already exists"), "{}", r.body);
    let confirm = http(
        &site,
        "GET",
        "/users/alice/lockdown?locked=true",
        Some(&cookie),
        None,
    )
    .await;
    assert!(confirm.body.contains("Lock down user alice?"), "{}", confirm.body);
    let r = http(
        &site,
        "POST",
        "/users/alice/lockdown",
        Some(&cookie),
        Some(&f("locked=true")),
    )
    .await;
    assert_eq!(r.status, 303);
    assert!(
        http(&site, "GET", "/users/alice", Some(&cookie), None)
            .await
            .body
            .contains("LOCKED DOWN")
    );
    http(
        &site,
        "POST",
        "/users/alice/lockdown",
        Some(&cookie),
        Some(&f("locked=false")),
    )
    .await;
    let r = http(&site, "POST", "/lockdown", Some(&cookie), Some(&f("locked=true"))).await;
    assert_eq!(r.status, 303);
    for path in ["/", "/users/alice"] {
        let p = http(&site, "GET", path, Some(&cookie), None).await;
        assert!(
            p.body.contains("The whole site is LOCKED DOWN"),
            "{path}: the banner on every page"
        );
    }
    http(
        &site,
        "POST",
        "/lockdown",
        Some(&cookie),
        Some(&f("locked=false")),
    )
    .await;
    assert!(
        !http(&site, "GET", "/", Some(&cookie), None)
            .await
            .body
            .contains("The whole site is LOCKED DOWN")
    );

    // A POST without, or with a wrong, CSRF token is refused; the session stays.
    assert_eq!(
        http(&site, "POST", "/signout", Some(&cookie), Some(""))
            .await
            .status,
        403
    );
    assert_eq!(
        http(&site, "POST", "/signout", Some(&cookie), Some("csrf=wrong"))
            .await
            .status,
        403
    );
    assert_eq!(http(&site, "GET", "/", Some(&cookie), None).await.status, 200);
    // With it: signed out, and the cookie no longer opens anything.
    let out = http(
        &site,
        "POST",
        "/signout",
        Some(&cookie),
        Some(&format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(out.status, 303);
    assert_eq!(http(&site, "GET", "/", Some(&cookie), None).await.status, 303);
    site.finish().await;
}

/// A sign-in post with these extra headers, as a browser sends them.
async fn signin_post(site: &TestSite, headers: &[(&str, &str)], form: &str) -> Reply {
    let addr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .to_owned();
    let mut req = format!(
        "POST /signin HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        form.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(form);
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = vec![];
    tcp.read_to_end(&mut out).await.unwrap();
    reply(&out)
}

store_test!(a_web_page_cannot_spend_the_sign_in_limit);
/// Sign-in posts another web site makes the operator's browser send are
/// refused before they count: after many of them, the operator's own
/// sign-in (same origin) still goes through on the same address.
async fn a_web_page_cannot_spend_the_sign_in_limit(store: Store) {
    let site = TestSite::start(&store).await;
    let own = format!(
        "http://{}",
        site.site.endpoints.console.trim_start_matches("http://")
    );
    for headers in [
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
    ] {
        for _ in 0..15 {
            let r = signin_post(&site, &headers, "t=bm9wZQ").await;
            assert_eq!(r.status, 403, "{headers:?}: {}", r.body);
            assert!(r.body.contains("sent by another web site"), "{}", r.body);
        }
    }
    // The operator's own junk and own link, from the same address: counted
    // as usual (403 for the junk, not 429), and the link signs in.
    let r = signin_post(&site, &[("Origin", own.as_str())], "t=bm9wZQ").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("not valid"), "{}", r.body);
    let token = link(&site).await;
    let r = signin_post(
        &site,
        &[("Sec-Fetch-Site", "same-origin"), ("Origin", own.as_str())],
        &format!("t={token}"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    // The audit page says in words what the junk was (the code stays in
    // the cell's title and in the API), each time on one line.
    let (cookie, _) = sign_in(&site).await;
    let a = http(&site, "GET", "/audit?source=ticket", Some(&cookie), None).await;
    assert!(
        a.body
            .contains("title=\"refused_unknown\">refused: no such ticket<"),
        "{}",
        a.body
    );
    assert!(a.body.contains("<td class=\"when\">"), "{}", a.body);
    site.finish().await;
}

store_test!(the_audit_names_the_operator_behind_each_console_action);
/// An operator named when the sign-in link was issued is named on every
/// audit row the console session causes, and on the sign-in itself; a bad
/// name is refused, and only the console records console sign-ins.
async fn the_audit_names_the_operator_behind_each_console_action(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    let as_alice = |msg| {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("chipsite-operator", "alice".parse().unwrap());
        r
    };
    let url = admin
        .issue_console_ticket(as_alice(pb::IssueConsoleTicketRequest { ttl_seconds: 0 }))
        .await
        .unwrap()
        .into_inner()
        .url;
    let token = url.split_once("/signin?t=").unwrap().1;
    let (cookie, csrf) = sign_in_with(&site, token).await;
    let made = http(
        &site,
        "POST",
        "/users",
        Some(&cookie),
        Some(&format!("csrf={csrf}&chip_id=zoe&name=Zoe")),
    )
    .await;
    assert!(made.status < 400, "{}", made.body);

    let audit = admin_audit(&site, "", 50).await;
    let row = |action: &str| {
        audit
            .iter()
            .find(|e| e.action == action)
            .unwrap_or_else(|| panic!("no {action} in {audit:?}"))
    };
    assert_eq!(row("issue_console_ticket").actor, "admin-client (alice)");
    let signed_in = row("console_sign_in");
    assert_eq!(
        (signed_in.actor.as_str(), signed_in.subject.as_str()),
        ("console (alice)", "ticket")
    );
    assert_eq!(row("create_user").actor, "console (alice)");

    let mut bad = tonic::Request::new(pb::GetSiteConfigRequest {});
    bad.metadata_mut()
        .insert("chipsite-operator", "two words".parse().unwrap());
    let e = admin.get_site_config(bad).await;
    assert!(e.is_ok(), "reads are not audited, so the name is not read");
    let mut bad = tonic::Request::new(pb::SetLockdownRequest {
        chip_id: "zoe".into(),
        locked: true,
    });
    bad.metadata_mut()
        .insert("chipsite-operator", "two words".parse().unwrap());
    let e = admin.set_lockdown(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = admin
        .record_console_sign_in(pb::RecordConsoleSignInRequest {
            method: "ticket".into(),
            source: "127.0.0.1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    site.finish().await;
}

/// A signed-in session: (cookie, CSRF token).
pub(crate) async fn sign_in(site: &TestSite) -> (String, String) {
    sign_in_with(site, &link(site).await).await
}

/// A session signed in with this console ticket: (cookie, CSRF token).
async fn sign_in_with(site: &TestSite, token: &str) -> (String, String) {
    let ok = http(site, "POST", "/signin", None, Some(&format!("t={token}"))).await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let cookie = header(&ok, "set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let home = http(site, "GET", "/", Some(&cookie), None).await;
    let csrf = home
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    (cookie, csrf)
}

/// A multipart/form-data upload of `file` with the CSRF token.
async fn upload(site: &TestSite, cookie: &str, csrf: &str, file: &[u8]) -> Reply {
    multipart(
        site,
        cookie,
        "/users/load",
        &[("csrf", csrf.as_bytes()), ("file", file)],
    )
    .await
}

/// A multipart/form-data POST of `fields` (the one named "file" as a file).
async fn multipart(site: &TestSite, cookie: &str, path: &str, fields: &[(&str, &[u8])]) -> Reply {
    let addr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .to_owned();
    let b = "XyZzyBoundary7";
    let file_name = if path == "/users/load" {
        "u.json"
    } else {
        "key.pem"
    };
    let mut body = vec![];
    for (name, value) in fields {
        let head = if *name == "file" {
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
        } else {
            format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
        };
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nCookie: {cookie}\r\n\
         Content-Type: multipart/form-data; boundary={b}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    let mut out = vec![];
    tcp.read_to_end(&mut out).await.unwrap();
    reply(&out)
}

/// admin's audit rows with `contains` in them, newest first.
async fn admin_audit(site: &TestSite, contains: &str, limit: u32) -> Vec<pb::AuditEntry> {
    site.admin()
        .list_audit(pb::ListAuditRequest {
            limit,
            source: "admin".into(),
            contains: contains.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The "Next page" link of a list page, unescaped.
fn next_link(body: &str) -> Option<String> {
    let before = body
        .split(" rel=\"next\"")
        .next()
        .filter(|b| b.len() < body.len())?;
    let href = before.rsplit("href=\"").next()?.trim_end_matches('"');
    Some(href.replace("&amp;", "&"))
}

async fn user_count(site: &TestSite) -> usize {
    site.admin()
        .list_users(pb::ListUsersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .users
        .len()
}

store_test!(console_pages_do_what_they_say);
/// Dump and load, tickets, the site key, the peer server, configuration,
/// the audit log, health, paging, and the sign-in rate limit.
async fn console_pages_do_what_they_say(store: Store) {
    chipsite_e2e::capture_logs();
    let site = TestSite::start(&store).await;
    let label = store.label();
    let (cookie, csrf) = sign_in(&site).await;
    let c = Some(cookie.as_str());
    let f = |rest: &str| format!("csrf={csrf}&{rest}");
    let passphrase = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();
    let passphrase = passphrase.trim();

    // Users: paging through 60.
    for i in 0..60 {
        site.create_user(&format!("u{i:02}")).await;
    }
    let first = http(&site, "GET", "/", c, None).await;
    assert!(
        first.body.contains("u00") && !first.body.contains("u55"),
        "[{label}]"
    );
    assert!(
        first.body.contains("<strong>60</strong> users"),
        "[{label}] the total"
    );
    let next = next_link(&first.body).unwrap();
    let second = http(&site, "GET", &next, c, None).await;
    assert!(
        second.body.contains("u55") && !second.body.contains(">u00<"),
        "{}",
        second.body
    );
    assert!(next_link(&second.body).is_none(), "the last page");
    // Sorted the other way and searched: the next page keeps both.
    let first = http(&site, "GET", "/?q=u&sort=-chip_id", c, None).await;
    assert!(first.body.contains(">u59<") && !first.body.contains(">u09<"));
    let next = next_link(&first.body).unwrap();
    assert!(next.contains("q=u&") && next.contains("sort=-chip_id"), "{next}");
    let second = http(&site, "GET", &next, c, None).await;
    let body = &second.body;
    let (at9, at0) = (body.find(">u09<").unwrap(), body.find(">u00<").unwrap());
    assert!(at9 < at0 && !body.contains(">u10<"), "{body}");
    // Filters: three locked down, counted.
    for chip_id in ["u07", "u17", "u27"] {
        site.admin()
            .set_lockdown(pb::SetLockdownRequest {
                chip_id: chip_id.into(),
                locked: true,
            })
            .await
            .unwrap();
    }
    let locked = http(&site, "GET", "/?lock=locked&status=active", c, None).await;
    assert!(
        locked.body.contains("<strong>3</strong> users match") && locked.body.contains(">u17<"),
        "{}",
        locked.body
    );
    assert!(!locked.body.contains(">u08<"));
    // A bad filter or sort: a page that says so, the navigation kept.
    for (path, why) in [
        ("/?lock=maybe", "lock must be locked or open"),
        ("/?sort=age", "sort must be"),
        ("/?status=asleep", "status must be"),
        ("/?after=nonsense:x", "page_token"),
    ] {
        let r = http(&site, "GET", path, c, None).await;
        assert!(r.status == 400 || r.status == 422, "{path}: {}", r.status);
        assert!(
            r.body.contains(why) && r.body.contains("href=\"/audit\""),
            "{path}: {}",
            r.body
        );
    }

    // Dump (a download) and load (an upload); a bad file writes nothing.
    let d = http(&site, "POST", "/users/u01/dump", c, Some(&f(""))).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(
        header(&d, "content-disposition"),
        Some("attachment; filename=\"u01.json\"")
    );
    let dump: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(dump["chip_id"], "u01");
    let users = user_count(&site).await;
    for (bad, why) in [
        (b"not json".to_vec(), "bad user dump"),
        (vec![0xff, 0xfe, 0x00], "not UTF-8"),
        (
            d.body.replace("\"u01\"", "\"Bad Id!\"").into_bytes(),
            "bad user dump",
        ),
        (
            d.body
                .replace("\"name\":", "\"name\":\"Not U01\",\"was\":")
                .into_bytes(),
            "bad user dump",
        ),
        (
            {
                let mut other: serde_json::Value = serde_json::from_str(&d.body).unwrap();
                other["name"] = "Not U01".into();
                other.to_string().into_bytes()
            },
            "already exists",
        ),
        (vec![], "u.json is empty"),
        (
            d.body.replace("\"u01\"", "7").into_bytes(),
            "`chip_id` must be a string, not integer `7`",
        ),
    ] {
        let r = upload(&site, &cookie, &csrf, &bad).await;
        assert_eq!(r.status, 422, "{why}: {}", r.body);
        assert!(r.body.contains(why), "{why}: {}", r.body);
    }
    assert_eq!(user_count(&site).await, users, "a bad file writes nothing");
    let r = upload(
        &site,
        &cookie,
        "wrong",
        d.body.replace("\"u01\"", "\"copy\"").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "an upload checks the CSRF token too");
    let r = upload(
        &site,
        &cookie,
        &csrf,
        d.body.replace("\"u01\"", "\"copy\"").as_bytes(),
    )
    .await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, Some("/users/copy")),
        "{}",
        r.body
    );

    // Tickets: issue, list, revoke.
    // Alarms: raised from the user's page (audited as the console's
    // operator), listed there, the text shown as text.
    let before = http(&site, "GET", "/users/u01", c, None).await;
    assert!(before.body.contains("No alarms."), "{}", before.body);
    let r = http(
        &site,
        "POST",
        "/users/u01/alarm",
        c,
        Some(&f("text=Please+call+%3Cb%3Ethe+office%3C%2Fb%3E")),
    )
    .await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, Some("/users/u01#alarms")),
        "{}",
        r.body
    );
    let page = http(&site, "GET", "/users/u01", c, None).await;
    assert!(
        page.body.contains("Please call &lt;b&gt;the office&lt;/b&gt;"),
        "{}",
        page.body
    );
    let r = http(&site, "POST", "/users/nobody/alarm", c, Some(&f("text=hello"))).await;
    assert!(r.status >= 400, "{}", r.body);
    let raised = admin_audit(&site, "raise_alarms", 20).await;
    assert!(
        raised
            .iter()
            .any(|e| e.action == "raise_alarms" && e.actor == "console (admin-client)" && e.subject == "u01"),
        "{raised:?}"
    );
    assert!(!before.body.contains("already has"), "{}", before.body);
    let t = http(&site, "POST", "/users/u01/ticket", c, Some(&f(""))).await;
    assert_eq!(t.status, 200);
    assert!(
        t.body.contains("The new connection ticket") && t.body.contains("Issue a connection ticket"),
        "two cards, two titles: {}",
        t.body
    );
    assert!(
        !t.body.contains("already has"),
        "the new one is not a warning: {}",
        t.body
    );
    let page = http(&site, "GET", "/users/u01", c, None).await;
    assert!(
        page.body.contains("already has 1 outstanding connection ticket:"),
        "{}",
        page.body
    );
    let t2 = http(&site, "POST", "/users/u01/ticket", c, Some(&f(""))).await;
    assert!(t2.body.contains("already has 1 outstanding"), "{}", t2.body);
    let page = http(&site, "GET", "/users/u01", c, None).await;
    assert!(
        page.body.contains("already has 2 outstanding connection tickets"),
        "{}",
        page.body
    );
    let list = http(&site, "GET", "/tickets", c, None).await;
    let id = list
        .body
        .split("href=\"/tickets/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(list.body.contains("u01"), "{}", list.body);
    // An operator's sign-in link is listed as one, with no user to link to.
    let _unused_link = link(&site).await;
    let list = http(&site, "GET", "/tickets", c, None).await;
    assert!(list.body.contains("console sign-in"), "{}", list.body);
    assert!(
        !list.body.contains("/users/console") && !list.body.contains(">unknown<"),
        "{}",
        list.body
    );
    // Revoking asks first, and asking changes nothing.
    let ask = http(&site, "GET", &format!("/tickets/{id}/revoke"), c, None).await;
    assert_eq!(ask.status, 200, "{}", ask.body);
    assert!(
        ask.body.contains(&format!("Revoke ticket {id}?"))
            && ask.body.contains(&format!("action=\"/tickets/{id}/revoke\"")),
        "{}",
        ask.body
    );
    let still = http(&site, "GET", "/tickets", c, None).await;
    assert!(
        still.body.contains(&format!("/tickets/{id}/revoke")),
        "still outstanding"
    );
    let r = http(&site, "POST", &format!("/tickets/{id}/revoke"), c, Some(&f(""))).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("revoked"), "{}", r.body);
    assert!(
        !r.body.contains(&format!("/tickets/{id}/revoke")),
        "no longer outstanding"
    );
    let all = http(&site, "GET", "/tickets?chip_id=u01&all=true", c, None).await;
    assert!(
        all.body.contains(&id) && all.body.contains("revoked"),
        "{}",
        all.body
    );

    // The site key: seal (asked first), a wrong pass phrase (never shown
    // back), unseal.
    let key = http(&site, "GET", "/key", c, None).await;
    assert!(key.body.contains("href=\"/key/seal\""), "{}", key.body);
    let ask = http(&site, "GET", "/key/seal", c, None).await;
    assert!(
        ask.body.contains("Seal the site key?") && ask.body.contains("action=\"/key/seal\""),
        "{}",
        ask.body
    );
    let key = http(&site, "GET", "/key", c, None).await;
    assert!(
        key.body.contains("unsealed"),
        "asking changes nothing: {}",
        key.body
    );
    let r = http(&site, "POST", "/key/seal", c, Some(&f(""))).await;
    assert!(r.body.contains("site key SEALED"), "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/key/unseal",
        c,
        Some(&f("passphrase=Wrong-Phrase-xyzzy")),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        !r.body.contains("Wrong-Phrase-xyzzy"),
        "a pass phrase never comes back"
    );
    let r = http(
        &site,
        "POST",
        "/key/unseal",
        c,
        Some(&f(&format!("passphrase={passphrase}"))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("site key unsealed") && !r.body.contains(passphrase));
    // Change the pass phrase: a mismatch and a wrong old one change nothing.
    let r = http(
        &site,
        "POST",
        "/key/passphrase",
        c,
        Some(&f(&format!(
            "old={passphrase}&new=apple-berry-cherry-1&confirm=apple-berry-cherry-2"
        ))),
    )
    .await;
    assert!(r.status == 422 && r.body.contains("differ"), "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/key/passphrase",
        c,
        Some(&f(
            "old=nope-nope-nope&new=apple-berry-cherry-1&confirm=apple-berry-cherry-1",
        )),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/key/passphrase",
        c,
        Some(&f(&format!(
            "old={passphrase}&new=apple-berry-cherry-1&confirm=apple-berry-cherry-1"
        ))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("apple-berry-cherry-1"));
    let mut admin = site.admin();
    admin.seal_vault(pb::SealVaultRequest {}).await.unwrap();
    admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: "apple-berry-cherry-1".into(),
        })
        .await
        .expect("the new pass phrase opens the key");

    // Export: a download under the current pass phrase, and only under it.
    let before = site.site_key_pin().await;
    let r = http(
        &site,
        "POST",
        "/key/export",
        c,
        Some(&f("passphrase=not-it-at-all")),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body.contains("href=\"/audit\"") && !r.body.contains("BEGIN"),
        "{}",
        r.body
    );
    let r = http(
        &site,
        "POST",
        "/key/export",
        c,
        Some(&f("passphrase=apple-berry-cherry-1")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        header(&r, "content-disposition"),
        Some("attachment; filename=\"chipsite-site-key.pem\"")
    );
    assert!(
        r.body.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "{}",
        r.body
    );
    let exported = r.body.clone();
    // Import: refusals leave the key as it was, and say why.
    for (fields, why) in [
        (vec![("file", &b""[..])], "empty file holds no key"),
        (
            vec![
                ("file", &b"not a key"[..]),
                ("passphrase", &b"apple-berry-cherry-1"[..]),
                ("old", &b"apple-berry-cherry-1"[..]),
            ],
            "",
        ),
        (
            vec![
                ("file", exported.as_bytes()),
                ("passphrase", &b"apple-berry-cherry-1"[..]),
                ("old", &b"wrong-current-one"[..]),
            ],
            "",
        ),
        (
            vec![
                ("file", exported.as_bytes()),
                ("passphrase", &b"not-the-files-phrase"[..]),
                ("old", &b"apple-berry-cherry-1"[..]),
            ],
            "",
        ),
        (vec![("file", &vec![b'k'; 70 * 1024][..])], "larger than 64 KiB"),
    ] {
        let mut all = vec![("csrf", csrf.as_bytes())];
        all.extend(fields);
        let r = multipart(&site, &cookie, "/key/import", &all).await;
        assert_eq!(r.status, 422, "{why}: {}", r.body);
        assert!(
            r.body.contains(why) && r.body.contains("role=\"alert\""),
            "{why}: {}",
            r.body
        );
        assert!(!r.body.contains("apple-berry-cherry-1"), "never echoed");
        assert_eq!(site.site_key_pin().await, before, "{why}");
    }
    // The exported file comes back in: the same key, the same pin.
    let r = multipart(
        &site,
        &cookie,
        "/key/import",
        &[
            ("csrf", csrf.as_bytes()),
            ("file", exported.as_bytes()),
            ("passphrase", b"apple-berry-cherry-1"),
            ("old", b"apple-berry-cherry-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("was imported") && r.body.contains(&before),
        "{}",
        r.body
    );
    // Without the CSRF token: refused before anything.
    let r = multipart(&site, &cookie, "/key/import", &[("file", exported.as_bytes())]).await;
    assert_eq!(r.status, 403, "{}", r.body);

    // The peer server (a dev site starts it): stop, then start, which asks
    // for the pass phrase.
    let r = http(&site, "POST", "/peer/stop", c, Some(&f(""))).await;
    assert!(r.body.contains("stopped"), "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/peer/start",
        c,
        Some(&f("passphrase=nope-nope-nope")),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/peer/start",
        c,
        Some(&f("passphrase=apple-berry-cherry-1")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        http(&site, "GET", "/peer", c, None)
            .await
            .body
            .contains("running")
    );
    let r = http(&site, "POST", "/peer/stop", c, Some(&f(""))).await;
    assert!(r.body.contains("stopped"), "{}", r.body);

    // Configuration: validated, saved, reset.
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f("key=ticket.ttl_seconds&value=abc")),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("ticket.ttl_seconds must be"), "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f("key=ticket.ttl_seconds&value=600")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("value=\"600\""));
    let changed = |body: &str, key: &str| {
        let row = body
            .split("<tr>")
            .find(|r| r.contains(&format!("<code>{key}</code>")))
            .unwrap_or("");
        row.contains("<strong>changed</strong>")
    };
    assert!(changed(&r.body, "ticket.ttl_seconds"), "{}", r.body);
    assert!(!changed(&r.body, "site.name"), "{}", r.body);
    // A password inside a value is shown masked, and saving the form as
    // shown keeps it.
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f(
            "key=alarm.smtp_url&value=smtp%3A%2F%2Fmailer%3Ahunter2%40relay%3A25",
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("hunter2"), "{}", r.body);
    assert!(r.body.contains("smtp://mailer:****@relay:25"), "{}", r.body);
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f(
            "key=alarm.smtp_url&value=smtp%3A%2F%2Fmailer%3A****%40relay%3A25",
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = site.stored_bytes().await;
    assert!(
        !stored.windows(17).any(|w| w == b"mailer:****@relay"),
        "the mask was stored"
    );
    assert!(
        stored.windows(20).any(|w| w == b"mailer:hunter2@relay"),
        "the secret was lost"
    );
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f("key=ticket.ttl_seconds&reset=true")),
    )
    .await;
    assert!(r.body.contains("value=\"86400\""), "{}", r.body);
    let r = http(&site, "POST", "/config", c, Some(&f("key=no.such.key&value=1"))).await;
    assert_eq!(r.status, 422, "{}", r.body);
    // A refused value stays in its field, to be corrected.
    let r = http(
        &site,
        "POST",
        "/config",
        c,
        Some(&f("key=ticket.ttl_seconds&value=59")),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("value=\"59\""), "{}", r.body);

    // Query strings a page does not take: a page that says which, not the
    // framework's plain text.
    for (path, which) in [
        ("/audit?limit=-1", "limit"),
        ("/audit?limit=lots", "limit"),
        ("/tickets?all=maybe", "all"),
        ("/lockdown?locked=2", "locked"),
    ] {
        let r = http(&site, "GET", path, c, None).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(
            r.body.contains("<html")
                && r.body.contains("does not take")
                && r.body.contains(which)
                && r.body.contains("href=\"/health\""),
            "{path}: {}",
            r.body
        );
    }

    // The audit log: newest first, filtered.
    let a = http(&site, "GET", "/audit?q=PASSPHRASE", c, None).await;
    assert!(
        a.body.contains("change_passphrase") && !a.body.contains("create_user"),
        "{}",
        a.body
    );
    assert!(!a.body.contains("apple-berry-cherry-1") && !a.body.contains(passphrase));
    let a = http(&site, "GET", "/audit?source=ticket", c, None).await;
    assert!(
        a.body.contains("revoked") && !a.body.contains("create_user"),
        "{}",
        a.body
    );
    let a = http(&site, "GET", "/audit", c, None).await;
    let (seal, create) = (
        a.body.find("seal_vault").unwrap(),
        a.body.find("create_user").unwrap(),
    );
    assert!(seal < create, "newest first");
    // Pages of five by the cursor: the same rows as one long page.
    let rows = |body: &str| -> Vec<String> {
        body.split("<td class=\"when\">")
            .skip(1)
            .map(|r| r.split("</tr>").next().unwrap_or("").to_owned())
            .collect()
    };
    let whole = rows(&http(&site, "GET", "/audit?limit=1000", c, None).await.body);
    let (mut paged, mut path) = (vec![], "/audit?limit=5".to_owned());
    for _ in 0..200 {
        let page = http(&site, "GET", &path, c, None).await;
        assert_eq!(page.status, 200, "{path}");
        let got = rows(&page.body);
        assert!(got.len() <= 5);
        paged.extend(got);
        match next_link(&page.body) {
            Some(next) => {
                assert!(
                    next.contains("limit=5") && page.body.contains(">Newest<") == path.contains("after=")
                );
                path = next;
            }
            None => break,
        }
    }
    assert!(whole.len() > 10);
    assert_eq!(paged, whole, "[{label}] the pages make up the log");
    assert!(
        http(&site, "GET", "/audit?q=100%25_", c, None)
            .await
            .body
            .contains("Nothing matches")
    );

    // Health: every service, where it listens.
    let h = http(&site, "GET", "/health", c, None).await;
    let e = &site.site.endpoints;
    for (name, addr) in [
        ("admin", e.admin.as_str()),
        ("key-vault", e.key_vault.as_str()),
        ("ticket", e.ticket.as_str()),
        ("user-gateway", e.user_gateway.as_str()),
        ("peer-gateway", e.peer_gateway.as_str()),
        ("tally", e.tally.as_str()),
    ] {
        assert!(
            h.body.contains(name) && h.body.contains(addr),
            "{name}: {}",
            h.body
        );
    }
    assert_eq!(h.body.matches(">up<").count(), 8, "{}", h.body);
    assert!(!h.body.contains("DOWN"));

    // Sign-in attempts from one address are limited.
    let mut codes = vec![];
    for _ in 0..12 {
        codes.push(
            http(&site, "POST", "/signin", None, Some("t=bm9wZQ"))
                .await
                .status,
        );
    }
    assert!(codes[0] == 403 && codes[11] == 429, "{codes:?}");
    // A new site key: a new pin.
    let before = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let r = http(
        &site,
        "POST",
        "/key/create",
        c,
        Some(&f(
            "old=apple-berry-cherry-1&new=zebra-yak-xerus-1&confirm=zebra-yak-xerus-1",
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("A new site key was created") && !r.body.contains("zebra-yak-xerus-1"));
    let after = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(before.site_key_pin, after.site_key_pin);
    assert!(r.body.contains(&after.site_key_pin), "the page shows the new pin");
    // No pass phrase in any log line, at trace level.
    let logs = chipsite_e2e::captured_logs();
    assert!(logs.contains("console sign-in"), "the logs were captured");
    for secret in [
        passphrase,
        "apple-berry-cherry-1",
        "zebra-yak-xerus-1",
        "Wrong-Phrase-xyzzy",
        "nope-nope-nope",
    ] {
        assert!(!logs.contains(secret), "a pass phrase in the logs");
    }
    assert_eq!(
        http(&site, "GET", "/", c, None).await.status,
        200,
        "a session is not affected"
    );
    site.finish().await;
}

/// One HTTP/1.1 request over the console's HTTPS port, presenting the
/// certificate of `identity` (None: no client certificate). None back when
/// the connection gives no HTTP answer.
async fn https(
    site: &TestSite,
    identity: Option<&str>,
    method: &str,
    path: &str,
    form: Option<&str>,
) -> Option<Reply> {
    let addr = site
        .site
        .endpoints
        .console_https
        .trim_start_matches("https://")
        .to_owned();
    let mut config = match identity {
        Some(i) => (*site.tls(i).client_config()).clone(),
        None => {
            let ca = site.site.endpoints.cert_paths(id::ADMIN_CLIENT).ca;
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(ca).unwrap();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.unwrap()).unwrap();
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    // A plain HTTP/1.1 client (the port speaks h2 too, as browsers prefer).
    config.alpn_protocols = vec![];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("console.chipsite.internal").unwrap();
    let mut tls = connector.connect(name, tcp).await.ok()?;
    tls.write_all(request(&addr, method, path, None, form).as_bytes())
        .await
        .ok()?;
    let mut out = vec![];
    let _ = tls.read_to_end(&mut out).await;
    Some(reply(&out)).filter(|r| r.status != 0)
}

store_test!(the_admin_certificate_signs_in_over_https);
/// The admin client certificate signs in over the console's HTTPS port;
/// another internal identity does not, and no certificate gets no answer.
async fn the_admin_certificate_signs_in_over_https(store: Store) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let site = TestSite::start(&store).await;
    let label = store.label();
    assert!(
        site.site
            .endpoints
            .console_https
            .starts_with("https://127.0.0.1:"),
        "[{label}]"
    );

    let page = https(&site, Some(id::ADMIN_CLIENT), "GET", "/signin", None)
        .await
        .unwrap();
    assert_eq!(page.status, 200, "[{label}] {}", page.body);
    assert!(
        page.body.contains("action=\"/signin/certificate\""),
        "{}",
        page.body
    );
    let ok = https(
        &site,
        Some(id::ADMIN_CLIENT),
        "POST",
        "/signin/certificate",
        Some(""),
    )
    .await
    .unwrap();
    assert_eq!(
        (ok.status, header(&ok, "location")),
        (303, Some("/")),
        "{}",
        ok.body
    );
    let cookie = header(&ok, "set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // The session is the console's: it opens the plain port's pages too.
    assert_eq!(http(&site, "GET", "/", Some(&cookie), None).await.status, 200);
    // Pages are reachable without a session on neither port.
    let r = https(&site, Some(id::ADMIN_CLIENT), "GET", "/", None)
        .await
        .unwrap();
    assert_eq!(r.status, 303);

    // Another internal identity: told so, and refused.
    let page = https(&site, Some(id::USER_GATEWAY), "GET", "/signin", None)
        .await
        .unwrap();
    assert!(page.body.contains("does not open the console"), "{}", page.body);
    assert!(!page.body.contains("action=\"/signin/certificate\""));
    let no = https(
        &site,
        Some(id::USER_GATEWAY),
        "POST",
        "/signin/certificate",
        Some(""),
    )
    .await
    .unwrap();
    assert_eq!(no.status, 403);
    assert!(header(&no, "set-cookie").is_none());
    // The plain port never signs in by certificate.
    let plain = http(&site, "POST", "/signin/certificate", None, Some("")).await;
    assert_eq!(plain.status, 403);
    assert!(header(&plain, "set-cookie").is_none());

    // No client certificate: the handshake is refused, nothing is served.
    assert!(https(&site, None, "GET", "/signin", None).await.is_none());
    // The certificate sign-in is in the audit, once: the refused ones are not.
    let audit = admin_audit(&site, "console_sign_in", 50).await;
    let rows: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e.action == "console_sign_in")
        .map(|e| (e.actor.as_str(), e.subject.as_str()))
        .collect();
    assert_eq!(rows, [("console (admin-client)", "certificate")], "{audit:?}");
    site.finish().await;
}

/// One raw request from `source` to the plain port, with this `Host`.
async fn raw_from(site: &TestSite, source: &str, host: &str, path: &str) -> Reply {
    let addr: std::net::SocketAddr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut out = vec![];
    let _ = tcp.read_to_end(&mut out).await;
    reply(&out)
}

store_test!(the_console_guards_its_plain_port);
async fn the_console_guards_its_plain_port(store: Store) {
    let site = TestSite::start_with(&store, |c| {
        c.console.idle_s = 5;
        c.console.hosts = "console.example.org".into();
    })
    .await;
    let port = site.site.endpoints.console.rsplit(':').next().unwrap().to_owned();

    // DNS rebinding: a page on another name that resolves to 127.0.0.1
    // reads nothing; the console's own names work.
    let r = raw_from(&site, "127.0.0.1", &format!("attacker.example:{port}"), "/signin").await;
    assert_eq!(r.status, 421, "{}", r.body);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("console.example.org:{port}"),
        "[::1]".to_owned(),
    ] {
        let r = raw_from(&site, "127.0.0.1", &host, "/signin").await;
        assert_eq!(r.status, 200, "{host}: {}", r.head);
    }

    let addr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .to_owned();

    // One address holds at most 32 connections; past that they are closed
    // at once, and another address is still served.
    let mut held = vec![];
    for _ in 0..32 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
        held.push(socket.connect(addr.parse().unwrap()).await.unwrap());
    }
    let shed = raw_from(&site, "127.0.0.6", &addr, "/signin").await;
    assert_eq!(shed.status, 0, "closed without an answer: {}", shed.head);
    let served = raw_from(&site, "127.0.0.7", &addr, "/signin").await;
    assert_eq!(served.status, 200);
    drop(held);

    // A connection that says nothing is closed once idle (5 s here).
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the console closes an idle connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // A client that trickles its headers, a line every half second (never
    // idle), is cut off at the header-read deadline (10 s).
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut cut_off = false;
    for i in 0..60 {
        if slow
            .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            cut_off = true;
            break;
        }
        // The pace of the slow client, and the moment to see if it was cut off.
        match tokio::time::timeout(Duration::from_millis(500), slow.read(&mut buf)).await {
            Err(_) => {}
            Ok(_) => {
                cut_off = true;
                break;
            }
        }
    }
    assert!(
        cut_off,
        "a trickled request is cut off at the header-read deadline"
    );
    site.finish().await;
}

#[test]
fn the_plain_console_port_stays_on_loopback_unless_allowed() {
    chipsite_e2e::run_test(async {
        let dir = tempfile::tempdir().unwrap();
        let store = chipsite_e2e::Store::Sqlite;
        let mut config = chipsite_e2e::config_for(dir.path(), &store);
        config.addresses.console = "0.0.0.0:0".into();
        let e = chipsite_site::Site::start_dev(&config)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback only"), "{e}");
    });
}
