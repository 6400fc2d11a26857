//! The admin web console without a browser: every route refuses without a
//! session, a POST refuses without the session's CSRF token, a console
//! ticket signs in once, and hostile input shows as text. On every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_e2e::{TestSite, stores};
use chipsite_proto::admin::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pages that need a session.
const GETS: [&str; 6] = [
    "/",
    "/?q=x",
    "/users/alice",
    "/users/alice/lockdown?locked=true",
    "/lockdown?locked=true",
    "/anything",
];
/// Forms that need a session and its CSRF token.
const POSTS: [&str; 6] = [
    "/users",
    "/users/alice/edit",
    "/users/alice/ticket",
    "/users/alice/lockdown",
    "/lockdown",
    "/signout",
];
/// A form that would do something with the right CSRF token.
const FORM: &str = "csrf=wrong&locked=true&chip_id=zed&name=Zed&status=active";

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request on its own connection.
async fn http(site: &TestSite, method: &str, path: &str, cookie: Option<&str>, form: Option<&str>) -> Reply {
    let addr = site
        .site
        .endpoints
        .console
        .trim_start_matches("http://")
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
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
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = vec![];
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
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

#[tokio::test]
async fn console_sessions_csrf_and_escaping() {
    for store in stores().await {
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
}
