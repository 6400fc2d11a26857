//! Two whole sites side by side, each with its own store: a tally ticket
//! issued on site A and handed in by a user of site B links the two users
//! (docs/protocol.md section 14), over real TLS pinned both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_app::{AppError, Session};
use chipsite_e2e::{Store, TestSite, eventually, store_test};
use chipsite_proto::{admin::v1 as ad, events::v1 as ev, keyvault::v1 as kv};
use chipsite_tls::identity as id;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two sites whose peer servers run, with alice enrolled on A and bob on B,
/// each in a session.
pub(crate) struct Pair {
    pub(crate) a: TestSite,
    pub(crate) b: TestSite,
    pub(crate) alice: Session,
    pub(crate) bob: Session,
    pub(crate) alice_key: chipsite_app::AppKey,
    pub(crate) bob_key: chipsite_app::AppKey,
}

pub(crate) async fn pair(store: &Store) -> Pair {
    pair_with(store, |_| {}, |_| {}).await
}

/// [`pair`] with each site's configuration changed first.
pub(crate) async fn pair_with(
    store: &Store,
    adjust_a: impl FnOnce(&mut chipsite_site::Config),
    adjust_b: impl FnOnce(&mut chipsite_site::Config),
) -> Pair {
    let a = TestSite::start_with(store, adjust_a).await;
    let b = TestSite::start_with(&store.another().await, adjust_b).await;
    for site in [&a, &b] {
        // Ready (the peer gateway certified), then the port open: the dev
        // site's peer server runs.
        let ops = site.site.endpoints.ops.trim_start_matches("http://").to_owned();
        assert!(
            eventually(Duration::from_secs(10), || async {
                chipsite_e2e::http_get(&ops, "/readyz").await.0 == 200
            })
            .await
        );
        assert!(eventually(Duration::from_secs(10), || site.peer_port_open()).await);
    }
    let alice_key = a.enrolled("alice").await;
    let bob_key = b.enrolled("bob").await;
    let alice = a.session("alice", &alice_key).await.unwrap();
    let bob = b.session("bob", &bob_key).await.unwrap();
    Pair {
        a,
        b,
        alice,
        bob,
        alice_key,
        bob_key,
    }
}

impl Pair {
    async fn finish(self) {
        self.alice.close().await;
        self.bob.close().await;
        self.a.finish().await;
        self.b.finish().await;
    }
}

async fn tally_ticket(session: &Session) -> String {
    let t = session.call("tally_ticket", json!({})).await.unwrap();
    t["uri"].as_str().unwrap().to_owned()
}

fn code(r: Result<Value, AppError>) -> i64 {
    match r {
        Err(AppError::Rpc { code, .. }) => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

pub(crate) async fn alarms(site: &TestSite, chip_id: &str) -> Vec<String> {
    site.events()
        .list_alarms(ev::ListAlarmsRequest {
            chip_id: chip_id.into(),
            include_acked: true,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alarms
        .into_iter()
        .map(|a| a.text)
        .collect()
}

async fn peer_key(site: &TestSite, chip_id: &str, host: &str) -> Option<Vec<u8>> {
    site.key_vault_as(id::PEER_GATEWAY)
        .get_peer_key(kv::GetPeerKeyRequest {
            peer_chip_id: chip_id.into(),
            peer_host: host.into(),
        })
        .await
        .ok()
        .map(|k| k.into_inner().public_key)
}

/// A genuine chain `[leaf, site certificate]` of `site`'s key, as its peer
/// gateway would hold it, with the leaf's key (PKCS#8).
async fn site_chain(site: &TestSite) -> (Vec<Vec<u8>>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issued = site
        .key_vault_as(id::PEER_GATEWAY)
        .issue_service_certificate(kv::IssueServiceCertificateRequest {
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            subject_alt_names: vec!["127.0.0.1".into()],
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    (issued.chain, key.serialize_der())
}

/// The outcome of the newest ticket audit record on a site.
async fn last_outcome(site: &TestSite) -> String {
    site.ticket_audit()
        .await
        .first()
        .map(|r| r.outcome.clone())
        .unwrap_or_default()
}

store_test!(a_tally_ticket_links_users_of_two_sites);
async fn a_tally_ticket_links_users_of_two_sites(store: Store) {
    let p = pair(&store).await;
    let (a_key, b_key) = (p.a.site_key().await, p.b.site_key().await);
    let host = p.a.peer_addr().ip().to_string();

    let uri = tally_ticket(&p.alice).await;
    let r = p.bob.redeem_tally_ticket(&uri).await.unwrap();
    assert_eq!(r["linked"]["chip_id"], "alice", "{r}");
    assert_eq!(r["linked"]["port"], p.a.peer_addr().port(), "{r}");
    assert_eq!(
        r["linked"]["site_pin"],
        chipsite_model::pin_of_spki(&a_key),
        "{r}"
    );

    // Site A learned B's key for bob, and the link; site B, A's for alice.
    let on_a = p.a.peer_links("alice").await;
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(
        (on_a[0].peer_chip_id.as_str(), on_a[0].via.as_str()),
        ("bob", "issued")
    );
    assert_eq!(on_a[0].peer_site_key, b_key);
    assert_eq!(on_a[0].peer_port, u32::from(p.b.peer_addr().port()));
    let on_b = p.b.peer_links("bob").await;
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(
        (on_b[0].peer_chip_id.as_str(), on_b[0].via.as_str()),
        ("alice", "redeemed")
    );
    assert_eq!(on_b[0].peer_site_key, a_key);
    assert_eq!(peer_key(&p.a, "bob", &host).await, Some(b_key.clone()));
    assert_eq!(peer_key(&p.b, "alice", &host).await, Some(a_key.clone()));
    assert_eq!(last_outcome(&p.a).await, "redeemed");

    // Operators see the peer site, its pin, the link and the contact: through
    // AdminService (what `chipsctl peer list` prints) and the console.
    let peers =
        p.a.admin()
            .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
            .await
            .unwrap()
            .into_inner()
            .sites;
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].site_pin, chipsite_model::pin_of_spki(&b_key));
    assert_eq!(
        (peers[0].port, peers[0].last_outcome.as_str()),
        (u32::from(p.b.peer_addr().port()), "ok")
    );
    assert_eq!(
        (
            peers[0].links[0].chip_id.as_str(),
            peers[0].links[0].peer_chip_id.as_str()
        ),
        ("alice", "bob")
    );
    let (cookie, _) = crate::console::sign_in(&p.a).await;
    let page = crate::console::http(&p.a, "GET", "/peer", Some(&cookie), None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(&peers[0].site_pin) && page.body.contains("bob"),
        "{}",
        page.body
    );

    // Both users were told.
    assert!(alarms(&p.a, "alice").await.iter().any(|t| t.contains("bob")));
    assert!(alarms(&p.b, "bob").await.iter().any(|t| t.contains("alice")));

    // The token is dead: a second hand-in is refused and records nothing.
    assert_eq!(code(p.bob.redeem_tally_ticket(&uri).await), -32001);
    assert_eq!(last_outcome(&p.a).await, "refused_used");
    assert_eq!(p.a.peer_links("").await.len(), 1);
    assert_eq!(p.b.peer_links("").await.len(), 1);

    // Bad tickets are the caller's fault, said plainly; the own site's too.
    assert_eq!(
        code(p.bob.redeem_tally_ticket("chipsite:tally?c=x").await),
        -32602
    );
    let own = tally_ticket(&p.bob).await;
    assert_eq!(code(p.bob.redeem_tally_ticket(&own).await), -32602);
    p.finish().await;
}

store_test!(refused_introductions_record_nothing_and_burn_the_ticket);
async fn refused_introductions_record_nothing_and_burn_the_ticket(store: Store) {
    let p = pair(&store).await;

    // Expired on site A's clock (site B cannot tell): refused, burned.
    let t = p
        .alice
        .call("tally_ticket", json!({"ttl_seconds": 60}))
        .await
        .unwrap();
    let uri = t["uri"].as_str().unwrap().to_owned();
    p.a.site.clock.advance(Duration::from_secs(120));
    assert_eq!(code(p.bob.redeem_tally_ticket(&uri).await), -32001);
    assert_eq!(last_outcome(&p.a).await, "refused_expired");

    // Another user's CHIP ID in the ticket: refused, and the token is dead
    // for its rightful user too.
    let mut ticket: Value = tally_ticket_json(&p.alice).await;
    let genuine = ticket.clone();
    ticket["chip_id"] = json!("carol");
    assert_eq!(code(p.bob.redeem_tally_ticket(&ticket.to_string()).await), -32001);
    assert_eq!(last_outcome(&p.a).await, "refused_chip_id");
    assert_eq!(
        code(p.bob.redeem_tally_ticket(&genuine.to_string()).await),
        -32001
    );
    assert_eq!(last_outcome(&p.a).await, "refused_used");

    assert!(p.a.peer_links("").await.is_empty());
    assert!(p.b.peer_links("").await.is_empty());
    let host = p.a.peer_addr().ip().to_string();
    assert_eq!(peer_key(&p.a, "bob", &host).await, None);
    assert_eq!(peer_key(&p.b, "alice", &host).await, None);

    // A user lockdown, then a site lockdown, on A: refused, burned, audited
    // as such (the operator issues the tickets: a locked user has no session).
    for who in ["alice", ""] {
        lockdown(&p.a, who, true).await;
        let uri = tally_ticket_uri_as_operator(&p.a, "alice").await;
        assert_eq!(code(p.bob.redeem_tally_ticket(&uri).await), -32001);
        assert_eq!(last_outcome(&p.a).await, "refused_locked");
        lockdown(&p.a, who, false).await;
    }
    assert!(p.a.peer_links("").await.is_empty());

    // Nothing was left half done: a fresh ticket still links them.
    let uri = tally_ticket_uri_as_operator(&p.a, "alice").await;
    p.bob.redeem_tally_ticket(&uri).await.unwrap();
    assert_eq!(p.a.peer_links("alice").await.len(), 1);
    assert_eq!(p.b.peer_links("bob").await.len(), 1);
    p.finish().await;
}

async fn tally_ticket_json(session: &Session) -> Value {
    session.call("tally_ticket", json!({})).await.unwrap()["ticket"].clone()
}

/// A tally ticket for a user of `site`, issued by the operator (a locked
/// user cannot open a session to ask for one).
async fn tally_ticket_uri_as_operator(site: &TestSite, chip_id: &str) -> String {
    let cfg = site
        .admin()
        .get_site_config(ad::GetSiteConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .values;
    let issued = site
        .tickets_as(id::USER_GATEWAY)
        .issue_ticket(chipsite_proto::ticket::v1::IssueTicketRequest {
            kind: chipsite_proto::ticket::v1::TicketKind::Tally as i32,
            chip_id: chip_id.into(),
            ttl_seconds: 600,
            host: cfg["peer_gateway.host"].clone(),
            port: cfg["peer_gateway.port"].parse().unwrap(),
            issuer: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let info = issued.info.unwrap();
    chipsite_model::PublishedTicket::new(
        chipsite_model::TicketKind::Tally,
        chip_id,
        &info.host,
        u16::try_from(info.port).unwrap(),
        &issued.token,
        &issued.site_public_key,
        info.expires_at_ms,
    )
    .to_uri()
}

async fn lockdown(site: &TestSite, chip_id: &str, locked: bool) {
    site.admin()
        .set_lockdown(ad::SetLockdownRequest {
            chip_id: chip_id.into(),
            locked,
        })
        .await
        .unwrap();
}

store_test!(a_stopped_or_sealed_site_takes_no_peer_work);
async fn a_stopped_or_sealed_site_takes_no_peer_work(store: Store) {
    let p = pair(&store).await;
    let uri = tally_ticket(&p.alice).await;

    // A's peer server stopped: its port closes; B cannot reach it, and
    // the ticket is not spent (it never arrived).
    p.a.admin()
        .stop_peer_server(ad::StopPeerServerRequest {})
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || async { !p.a.peer_port_open().await }).await);
    assert_eq!(code(p.bob.redeem_tally_ticket(&uri).await), -32005);

    // B's own peer server stopped: refused before anything is sent.
    p.b.admin()
        .stop_peer_server(ad::StopPeerServerRequest {})
        .await
        .unwrap();
    p.a.admin()
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: p.a.passphrase(),
        })
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || p.a.peer_port_open()).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(p.bob.redeem_tally_ticket(&uri).await, Err(AppError::Rpc { code: -32005, ref message }) if message.contains("stopped"))
        })
        .await
    );
    p.b.admin()
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: p.b.passphrase(),
        })
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || p.b.peer_port_open()).await);

    // A's vault sealed: every peer refused (the ticket burns).
    p.a.admin().seal_vault(ad::SealVaultRequest {}).await.unwrap();
    let sealed = eventually(Duration::from_secs(10), || async {
        matches!(
            p.bob.redeem_tally_ticket(&uri).await,
            Err(AppError::Rpc { code: -32001, .. })
        )
    })
    .await;
    assert!(sealed);
    // The first attempt that reached A was refused as stopped and burned
    // the ticket (an attempt B gave up on under load is followed by one
    // that finds the ticket used).
    let outcomes: Vec<String> = p.a.ticket_audit().await.into_iter().map(|r| r.outcome).collect();
    assert!(outcomes.iter().any(|o| o == "refused_stopped"), "{outcomes:?}");
    assert!(p.a.peer_links("").await.is_empty());
    p.finish().await;
}

store_test!(a_man_in_the_middle_never_sees_the_token);
async fn a_man_in_the_middle_never_sees_the_token(store: Store) {
    let p = pair(&store).await;
    // The impostor serves a genuine site chain, but of site B's key, at an
    // address of its own; the ticket pins site A's key.
    let (chain, pkcs8) = site_chain(&p.b).await;
    let config = chipsite_external_tls::server_config(
        chain,
        pkcs8,
        chipsite_external_tls::SiteChainVerifier::expecting(None),
    )
    .unwrap();
    let impostor = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = impostor.local_addr().unwrap().port();
    let seen = tokio::spawn(async move {
        let (tcp, _) = impostor.accept().await.unwrap();
        let mut received = Vec::new();
        if let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(tcp)
            .await
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut received)).await;
        }
        received
    });
    let mut ticket = tally_ticket_json(&p.alice).await;
    ticket["port"] = json!(port);
    assert_eq!(code(p.bob.redeem_tally_ticket(&ticket.to_string()).await), -32005);
    let received = seen.await.unwrap();
    assert!(received.is_empty(), "the impostor got {} bytes", received.len());

    // The token never left site B: the genuine site still takes it.
    ticket["port"] = json!(p.a.peer_addr().port());
    p.bob.redeem_tally_ticket(&ticket.to_string()).await.unwrap();
    p.finish().await;
}

store_test!(hostile_peers_are_closed_and_others_still_served);
async fn hostile_peers_are_closed_and_others_still_served(store: Store) {
    let p = pair(&store).await;
    let a_key = p.a.site_key().await;
    // A client with a genuine chain of site B, speaking as it pleases.
    let (chain, pkcs8) = site_chain(&p.b).await;
    let chain: Vec<_> = chain
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    let addr = p.a.peer_addr();
    let dial = |with_cert: bool| {
        let chain = chain.clone();
        let a_key = a_key.clone();
        let pkcs8 = pkcs8.clone();
        async move {
            let identity = with_cert.then(|| (chain, rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into())));
            let config = chipsite_external_tls::client_config(&a_key, identity).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        }
    };
    /// What the site sends back before closing.
    async fn answer(mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, send: &[u8]) -> Vec<u8> {
        let _ = tls.write_all(send).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut got)).await;
        got
    }
    let uri = tally_ticket(&p.alice).await;
    let token = chipsite_model::PublishedTicket::from_uri(&uri).unwrap().token;
    let introduce = |site_key: &[u8]| {
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 1, "method": "introduce", "params": {
                "token": token, "user": "alice", "chip_id": "mallory",
                "site_key": URL_SAFE_NO_PAD.encode(site_key), "host": "127.0.0.1", "port": 1}})
        )
    };

    // No client certificate: the handshake fails (the client may only see
    // it on its first read).
    if let Ok(tls) = dial(false).await {
        assert!(answer(tls, b"{}\n").await.is_empty());
    }
    // Junk, an unknown method (no token: nothing spent), an oversized
    // frame: closed without a byte.
    for junk in [
        b"not json\n".to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"chits.send\",\"params\":{}}\n".to_vec(),
        vec![b'x'; 70 * 1024],
    ] {
        assert!(answer(dial(true).await.unwrap(), &junk).await.is_empty());
    }
    // A site key other than the one that certified the chain: refused,
    // and the token is spent.
    assert!(
        answer(dial(true).await.unwrap(), introduce(&a_key).as_bytes())
            .await
            .is_empty()
    );
    assert_eq!(last_outcome(&p.a).await, "refused_request");
    // A peer that connects and never sends: closed at the deadline.
    let mut silent = dial(true).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut got)).await;
    assert!(closed.is_ok() && got.is_empty(), "{closed:?} {got:?}");

    assert!(p.a.peer_links("").await.is_empty());
    // The gateway still serves others.
    let uri = tally_ticket(&p.alice).await;
    p.bob.redeem_tally_ticket(&uri).await.unwrap();
    p.finish().await;
}

/// A peer session's TLS by hand: the server name presents `user`, the
/// chain is `chain`.
async fn session_by_hand(
    site: &TestSite,
    user: &str,
    chain: &(Vec<Vec<u8>>, Vec<u8>),
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let certs = chain
        .0
        .iter()
        .cloned()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(chain.1.clone().into());
    let config = chipsite_external_tls::client_config(&site.site_key().await, Some((certs, key))).unwrap();
    let tcp = tokio::net::TcpStream::connect(site.peer_addr()).await?;
    let name = rustls::pki_types::ServerName::try_from(chipsite_peer_gateway::session_name(user)).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// A peer session by hand: the server name presents `user`, the chain is
/// `chain`; sends `frames` and returns the first line answered (empty when
/// the site refused the session or closed without a word).
async fn by_hand(site: &TestSite, user: &str, chain: &(Vec<Vec<u8>>, Vec<u8>), frames: &[u8]) -> String {
    let Ok(mut tls) = session_by_hand(site, user, chain).await else {
        return String::new();
    };
    let _ = tls.write_all(frames).await;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte)).await {
        if byte[0] == b'\n' {
            break;
        }
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn ping(site: &TestSite, chip_id: &str, peer: &str) -> Result<(), tonic::Status> {
    site.peer_gateway_as(id::ADMIN)
        .ping(chipsite_proto::peer::v1::PingRequest {
            chip_id: chip_id.into(),
            peer_chip_id: peer.into(),
        })
        .await
        .map(|_| ())
}

store_test!(peer_sessions_admit_only_the_key_learned_for_the_user);
async fn peer_sessions_admit_only_the_key_learned_for_the_user(store: Store) {
    let p = pair(&store).await;
    let uri = tally_ticket(&p.alice).await;
    p.bob.redeem_tally_ticket(&uri).await.unwrap();

    // Either site opens a session to the other, both at once too.
    ping(&p.b, "bob", "alice").await.unwrap();
    ping(&p.a, "alice", "bob").await.unwrap();
    let (x, y) = tokio::join!(ping(&p.b, "bob", "alice"), ping(&p.a, "alice", "bob"));
    x.unwrap();
    y.unwrap();
    assert_eq!(
        ping(&p.a, "alice", "carol").await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // By hand against site A: bob's sessions must be certified by B's key.
    let b_chain = site_chain(&p.b).await;
    let a_chain = site_chain(&p.a).await;
    let ping_frame = b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"ping\"}\n";
    let pong: Value = serde_json::from_str(&by_hand(&p.a, "bob", &b_chain, ping_frame).await).unwrap();
    assert_eq!(pong, json!({"jsonrpc": "2.0", "id": 7, "result": {"pong": true}}));
    assert_eq!(
        by_hand(&p.a, "mallory", &b_chain, ping_frame).await,
        "",
        "an unknown user"
    );
    assert_eq!(
        by_hand(&p.a, "bob", &a_chain, ping_frame).await,
        "",
        "another site key"
    );
    // An unknown method is answered and the session goes on.
    let two = [
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"chits.send\"}\n".as_slice(),
        ping_frame,
    ]
    .concat();
    let first: Value = serde_json::from_str(&by_hand(&p.a, "bob", &b_chain, &two).await).unwrap();
    assert_eq!(first["error"]["code"], -32601, "{first}");
    // An oversized frame: one error, then the close.
    let big: Value =
        serde_json::from_str(&by_hand(&p.a, "bob", &b_chain, &vec![b'x'; 70 * 1024]).await).unwrap();
    assert_eq!(big["error"]["code"], -32600, "{big}");

    // A peer that never reads: its answers pile up until the site's write
    // times out (10 s) and it closes the session; others are served
    // meanwhile.
    let mut hog = session_by_hand(&p.a, "bob", &b_chain).await.unwrap();
    let pings = ping_frame.repeat(1000);
    let writer = tokio::spawn(async move { while hog.write_all(&pings).await.is_ok() {} });
    assert!(
        by_hand(&p.a, "bob", &b_chain, ping_frame).await.contains("pong"),
        "others are served"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(40), writer)
            .await
            .is_ok(),
        "the site closed the peer that never reads"
    );

    // A site lockdown on A refuses every peer session; alice's lockdown
    // stops A from acting for her.
    // (The peer gateway reuses the site's state for up to a second.)
    lockdown(&p.a, "", true).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            by_hand(&p.a, "bob", &b_chain, ping_frame).await.is_empty()
        })
        .await,
        "a locked site"
    );
    lockdown(&p.a, "", false).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            by_hand(&p.a, "bob", &b_chain, ping_frame).await.contains("pong")
        })
        .await
    );
    lockdown(&p.a, "alice", true).await;
    assert!(ping(&p.a, "alice", "bob").await.is_err());
    lockdown(&p.a, "alice", false).await;
    ping(&p.a, "alice", "bob").await.unwrap();

    // A stopped peer server, then a sealed vault: no session.
    p.a.admin()
        .stop_peer_server(ad::StopPeerServerRequest {})
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ping(&p.b, "bob", "alice").await.is_err()
        })
        .await
    );
    p.a.admin()
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: p.a.passphrase(),
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ping(&p.b, "bob", "alice").await.is_ok()
        })
        .await
    );
    p.a.admin().seal_vault(ad::SealVaultRequest {}).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            by_hand(&p.a, "bob", &b_chain, ping_frame).await.is_empty()
        })
        .await,
        "a sealed site"
    );
    assert!(ping(&p.b, "bob", "alice").await.is_err());
    p.finish().await;
}
