//! The user gateway end to end: enrollment with a pinned site key, mutual-TLS
//! sessions, commands, refusals and hostile input, over real TLS and real
//! sockets, on every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::IpAddr, sync::Arc, time::Duration};

use chipsite_app::{AppError, AppKey, PinnedSiteKey, enroll, enroll_from};
use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_ticket::render::PublishedTicket;
use chipsite_tls::identity as id;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn refused(r: Result<(), AppError>) {
    assert!(
        matches!(r, Err(AppError::Refused)),
        "expected a silent refusal, got {r:?}"
    );
}

/// The site's error for a session it would not open or had to end, then the close.
async fn ended_with(s: &chipsite_app::Session, method: &str, code: i64) {
    let note = tokio::time::timeout(Duration::from_secs(5), s.next_notification())
        .await
        .expect("a notification in time")
        .expect("a notification before the close");
    assert_eq!(note.method, method, "{note:?}");
    assert_eq!(note.params["code"], code, "{note:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), s.next_notification())
        .await
        .expect("the session ends");
    assert!(end.is_none(), "{end:?}");
}

store_test!(enroll_then_session_dialog);
async fn enroll_then_session_dialog(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let ticket = site.user_ticket("alice", 0).await;
    assert_eq!((ticket.host.clone(), ticket.port), site.gateway());
    let key = AppKey::generate().unwrap();
    enroll(&ticket, "alice", &key).await.unwrap();
    // The token is dead now.
    refused(enroll(&ticket, "alice", &AppKey::generate().unwrap()).await);

    let s = site.session("alice", &key).await.unwrap();
    let status = s.call("status", json!({})).await.unwrap();
    assert_eq!(status["chip_id"], "alice", "{}", store.label());
    assert_eq!(status["name"], "User alice");
    assert_eq!(status["status"], "active");

    let t = s.call("tally_ticket", json!({"ttl_seconds": 600})).await.unwrap();
    let tally = PublishedTicket::from_uri(t["uri"].as_str().unwrap()).unwrap();
    assert_eq!(tally.kind, "tally");
    assert_eq!(tally.chip_id.as_deref(), Some("alice"));
    assert_eq!(
        PublishedTicket::from_json(&t["ticket"].to_string()).unwrap(),
        tally
    );

    // Errors about a message leave the session open.
    let e = s.call("statsu", json!({})).await.unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32601));
    let e = s.call("status", json!({"extra": 1})).await.unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32602));
    let e = s
        .call("tally_ticket", json!({"ttl_seconds": "soon"}))
        .await
        .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32602));
    s.send_raw(b"{not json\n").await.unwrap();
    let note = s.next_notification().await.unwrap();
    assert_eq!(
        (note.method.as_str(), note.params["code"].clone()),
        ("error", json!(-32700))
    );
    s.send_raw(b"[1,2]\n").await.unwrap();
    assert_eq!(s.next_notification().await.unwrap().params["code"], -32600);
    // A notification from the app gets no answer; the next call still works.
    s.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\"}\n")
        .await
        .unwrap();
    assert_eq!(s.call("status", Value::Null).await.unwrap()["chip_id"], "alice");
    s.close().await;
    site.finish().await;
}

store_test!(refusals_are_silent_and_burn_the_ticket);
async fn refusals_are_silent_and_burn_the_ticket(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    site.create_user("bob").await;

    // Another user's CHIP ID: refused, and the ticket is dead.
    let ticket = site.user_ticket("alice", 0).await;
    refused(enroll(&ticket, "bob", &AppKey::generate().unwrap()).await);
    refused(enroll(&ticket, "alice", &AppKey::generate().unwrap()).await);

    // Expired (judged at redemption).
    let ticket = site.user_ticket("alice", 1).await;
    site.site.clock.advance(Duration::from_millis(1001));
    refused(enroll(&ticket, "alice", &AppKey::generate().unwrap()).await);

    // Unknown token.
    let mut forged = site.user_ticket("alice", 0).await;
    forged.token = "bm90LWEtdG9rZW4tYXQtYWxsLXJlYWxseS1ub3QtYXQtYWxs".into();
    refused(enroll(&forged, "alice", &AppKey::generate().unwrap()).await);

    // A valid ticket in a request the gateway refuses (a malformed key, a
    // locked user): burned, and audited as refused, not as redeemed.
    let bad_key = site.user_ticket("alice", 0).await;
    let mut c = raw_enrollment(&site).await;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "enroll",
        "params": {"token": bad_key.token, "chip_id": "alice", "public_key": "bm90IGEga2V5"}});
    c.write_all(format!("{request}\n").as_bytes()).await.unwrap();
    assert!(read_all(c).await.is_empty());
    site.create_user("carol").await;
    let locked = site.user_ticket("carol", 0).await;
    site.admin()
        .set_lockdown(chipsite_proto::admin::v1::SetLockdownRequest {
            chip_id: "carol".into(),
            locked: true,
        })
        .await
        .unwrap();
    refused(enroll(&locked, "carol", &AppKey::generate().unwrap()).await);
    let tickets = site
        .admin()
        .list_tickets(chipsite_proto::admin::v1::ListTicketsRequest {
            chip_id: String::new(),
            include_closed: true,
        })
        .await
        .unwrap()
        .into_inner()
        .tickets;
    let audit = site.ticket_audit().await;
    for (ticket, outcome) in [(&bad_key, "refused_request"), (&locked, "refused_locked")] {
        let row = tickets.iter().find(|t| {
            t.state == "burned" && audit.iter().any(|r| r.ticket_id == t.id && r.outcome == outcome)
        });
        assert!(
            row.is_some(),
            "{} {outcome}: {audit:?}",
            ticket.chip_id.clone().unwrap_or_default()
        );
    }
    assert!(!audit.iter().any(|r| r.outcome == "redeemed"), "{audit:?}");
    // Tickets say who issued them.
    assert!(
        tickets.iter().all(|t| t.issued_by == id::ADMIN_CLIENT),
        "{tickets:?}"
    );

    // Sessions: a key that is not registered, another user's CHIP ID
    // with one's own key, and a CHIP ID nobody has.
    let alice = site.enrolled("alice").await;
    let bob = site.enrolled("bob").await;
    let stranger = AppKey::generate().unwrap();
    for (chip, key) in [("alice", &stranger), ("alice", &bob), ("nobody", &alice)] {
        let s = site.session(chip, key).await.unwrap();
        ended_with(&s, "error", -32001).await;
    }

    // A new enrollment replaces the key: sessions with the old one close,
    // the old key no longer opens one.
    let old = site.session("alice", &alice).await.unwrap();
    assert_eq!(old.call("status", json!({})).await.unwrap()["chip_id"], "alice");
    let renewed = site.enrolled("alice").await;
    ended_with(&old, "closed", -32001).await;
    ended_with(&site.session("alice", &alice).await.unwrap(), "error", -32001).await;
    let s = site.session("alice", &renewed).await.unwrap();
    assert_eq!(s.call("status", json!({})).await.unwrap()["chip_id"], "alice");
    // Bob is untouched.
    let s = site.session("bob", &bob).await.unwrap();
    assert_eq!(s.call("status", json!({})).await.unwrap()["chip_id"], "bob");
    site.finish().await;
}

/// An impostor that holds another key, and records every byte it receives
/// after a TLS handshake.
/// A TLS server with a key of its own on a loopback port; the task ends with
/// what a client sent it after a completed handshake (`None`: no handshake).
async fn impostor() -> (u16, tokio::task::JoinHandle<Option<Vec<u8>>>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(tcp)
            .await
            .ok()?;
        let mut got = vec![];
        let _ = tls.read_to_end(&mut got).await;
        Some(got)
    });
    (port, seen)
}

store_test!(a_man_in_the_middle_never_sees_the_token);
async fn a_man_in_the_middle_never_sees_the_token(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let ticket = site.user_ticket("alice", 0).await;
    let (port, seen) = impostor().await;
    let mut diverted = ticket.clone();
    diverted.port = port;
    let r = enroll(&diverted, "alice", &AppKey::generate().unwrap()).await;
    assert!(matches!(r, Err(AppError::Handshake { .. })), "{r:?}");
    let seen = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .expect("the impostor's side ends with the client's")
        .unwrap();
    assert_eq!(seen, None, "the impostor completed a handshake");
    // The ticket was never spent.
    enroll(&ticket, "alice", &AppKey::generate().unwrap())
        .await
        .unwrap();
    site.finish().await;
}

/// A raw TLS connection to the gateway that checks the pin but presents no
/// client certificate (an enrollment connection).
async fn raw_enrollment(site: &TestSite) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(PinnedSiteKey::new(&site.site_key().await).unwrap())
            .with_no_client_auth();
    let (host, port) = site.gateway();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(host.try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Everything the site sends until it closes (an error counts as a close).
async fn read_all(mut s: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut got = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got))
        .await
        .expect("the site closes");
    got
}

store_test!(hostile_input);
async fn hostile_input(store: Store) {
    let site = TestSite::start(&store).await;
    let alice = site.enrolled("alice").await;

    // Enrollment connections: garbage, a session method, an oversized
    // frame: closed without a byte.
    for bad in [
        b"hello\n".to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}\n".to_vec(),
        vec![b'{'; 70_000],
        b"\xff\xfe\n".to_vec(),
    ] {
        let mut c = raw_enrollment(&site).await;
        let _ = c.write_all(&bad).await;
        assert!(read_all(c).await.is_empty());
    }

    // Sessions: an oversized frame or broken UTF-8 gets one error, then the close.
    let s = site.session("alice", &alice).await.unwrap();
    s.send_raw(&vec![b'a'; 70_000]).await.unwrap();
    ended_with(&s, "error", -32600).await;
    let s = site.session("alice", &alice).await.unwrap();
    s.send_raw(b"{\"a\":\"\xff\"}\n").await.unwrap();
    ended_with(&s, "error", -32700).await;

    // A line that never ends is timed out (10 s per frame) without a word.
    let s = site.session("alice", &alice).await.unwrap();
    s.send_raw(b"{\"jsonrpc\":\"2.0\",").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), s.next_notification())
        .await
        .expect("timed out by the site");
    assert!(end.is_none(), "{end:?}");
    site.finish().await;
}

store_test!(a_flood_of_bad_tokens_is_throttled_per_source);
async fn a_flood_of_bad_tokens_is_throttled_per_source(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let flood: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut forged = site.user_ticket("alice", 0).await;
    for i in 0..12 {
        forged.token = format!("Zm9yZ2VkLXRva2VuLW51bWJlci0{i}AAAAAAAAAAAAAAAAAAA");
        refused(enroll_from(&forged, "alice", &AppKey::generate().unwrap(), Some(flood)).await);
    }
    // A valid ticket from the flooding source is refused, before the
    // gateway calls anything, and not spent: from another source (its owner
    // behind the same NAT would be the same after the throttle refills) it
    // still enrolls.
    let ticket = site.user_ticket("alice", 0).await;
    refused(enroll_from(&ticket, "alice", &AppKey::generate().unwrap(), Some(flood)).await);
    enroll_from(&ticket, "alice", &AppKey::generate().unwrap(), Some(other))
        .await
        .unwrap();
    let audit = site.ticket_audit().await;
    // The gateway let ten failures through to the ticket service (one
    // collapsed record); the rest it refused itself.
    let flooded: Vec<_> = audit.iter().filter(|r| r.source == "127.0.0.1").collect();
    assert_eq!(flooded.len(), 1, "{flooded:?}");
    assert_eq!(
        (flooded[0].outcome.as_str(), flooded[0].count),
        ("refused_unknown", 10)
    );
    assert!(
        audit
            .iter()
            .any(|r| r.source == "127.0.0.2" && r.outcome == "redeemed"),
        "{audit:?}"
    );
    site.finish().await;
}

store_test!(a_gateway_serves_only_once_key_vault_certified_it);
async fn a_gateway_serves_only_once_key_vault_certified_it(store: Store) {
    let site = TestSite::start(&store).await;
    let alice = site.enrolled("alice").await;
    let mut admin = site.admin();
    admin
        .seal_vault(chipsite_proto::admin::v1::SealVaultRequest {})
        .await
        .unwrap();
    // A new replica cannot get a certificate from a sealed vault: it
    // accepts nothing (the handshake never starts).
    let (port, stop) = site.extra_gateway(&site.site.endpoints.admin).await;
    let site_key = site.site_key().await;
    let connect = || chipsite_app::Session::connect("127.0.0.1", port, &site_key, "alice", &alice);
    let early = tokio::time::timeout(Duration::from_secs(2), connect()).await;
    assert!(
        !matches!(early, Ok(Ok(_))),
        "[{}] served before it was certified",
        store.label()
    );
    // Unsealed: it is certified and serves.
    let passphrase = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();
    admin
        .unseal_vault(chipsite_proto::admin::v1::UnsealVaultRequest {
            passphrase: passphrase.trim().to_owned(),
        })
        .await
        .unwrap();
    let mut served = false;
    for _ in 0..50 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), connect()).await
            && s.call("ping", json!({})).await.is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "served once unsealed");
    let _ = stop.send(true);
    site.finish().await;
}

store_test!(session_methods_keep_the_documented_bounds);
/// docs/protocol.md section 9: params are an object or nothing (an array is
/// −32602), `tally_ticket`'s `ttl_seconds` is 60 … 2,592,000 and
/// `alarms.list`'s `limit` 1 … 1000; the session stays open after each.
async fn session_methods_keep_the_documented_bounds(store: Store) {
    let site = TestSite::start(&store).await;
    let key = site.enrolled("alice").await;
    let s = site.session("alice", &key).await.unwrap();
    let code = |r: Result<serde_json::Value, AppError>| match r {
        Err(AppError::Rpc { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    for (method, params) in [
        ("status", json!([])),
        ("tally_ticket", json!([600])),
        ("tally_ticket", json!({"ttl_seconds": 59})),
        ("tally_ticket", json!({"ttl_seconds": 2_592_001})),
        ("alarms.list", json!({"limit": 0})),
        ("alarms.list", json!({"limit": 1001})),
        ("alarms.list", json!(["x"])),
    ] {
        assert_eq!(
            code(s.call(method, params.clone()).await),
            -32602,
            "{method} {params}"
        );
    }
    s.call("tally_ticket", json!({"ttl_seconds": 60})).await.unwrap();
    s.call("alarms.list", json!({"limit": 1000})).await.unwrap();
    s.call("status", json!({})).await.unwrap();
    site.finish().await;
}
