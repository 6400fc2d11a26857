//! Two `chipsite dev` processes with a tally stream between them, each
//! killed with SIGKILL mid-stream and started again: every step arrives,
//! and is applied exactly once (docs/protocol.md section 14.5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chipsite_app::{AppKey, Session};
use chipsite_e2e::{Store, store_test};
use chipsite_model::{
    endpoints::Endpoints,
    tally::{Kind, Party},
};
use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    tally::v1 as tl,
};
use chipsite_tls::{ReloadableTls, identity as id};
use serde_json::json;

/// How many tallies stream at once.
const TALLIES: usize = 12;

/// One `chipsite dev` process, its data directory and its store.
struct Proc {
    dir: PathBuf,
    peer: String,
    database_url: String,
    child: Child,
}

impl Proc {
    fn start(dir: &Path, peer: &str, database_url: &str) -> Self {
        let _ = std::fs::remove_file(Endpoints::path(dir));
        let child = Command::new(env!("CARGO_BIN_EXE_chipsite"))
            .args(["dev", "--data-dir"])
            .arg(dir)
            .envs(chipsite_site::config::Addresses::ephemeral_env())
            // The peer port stays where the other site recorded it.
            .env("CHIPSITE_ADDRESSES__PEER", peer)
            .env("CHIPSITE_DATABASE_URL", database_url)
            // Site B's services call each other over mutual TLS, as separate
            // processes would; site A's in-process (chipsite_tls::local).
            .env(
                "CHIPSITE_INTERNAL_TCP",
                if dir.ends_with("b") { "true" } else { "false" },
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            dir: dir.to_path_buf(),
            peer: peer.to_owned(),
            database_url: database_url.to_owned(),
            child,
        }
    }

    /// SIGKILL: no shutdown of any kind.
    fn kill9(mut self) -> (PathBuf, String, String) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.dir.clone(), self.peer.clone(), self.database_url.clone())
    }

    async fn endpoints(&self) -> Endpoints {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(e) = Endpoints::read(&self.dir)
                && e.pid == self.child.id()
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "chipsite dev did not write its endpoints"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn channel(&self, addr: &str, server: &str, identity: &str) -> tonic::transport::Channel {
        let e = self.endpoints().await;
        let tls = ReloadableTls::from_files(e.cert_paths(identity)).unwrap();
        chipsite_tls::connect_tls_lazy(addr, server, tls).unwrap()
    }

    async fn admin(&self) -> AdminServiceClient<tonic::transport::Channel> {
        let e = self.endpoints().await;
        AdminServiceClient::new(self.channel(&e.admin, id::ADMIN, id::ADMIN_CLIENT).await)
    }

    async fn tallies(&self, chip_id: &str) -> Vec<tl::Tally> {
        self.admin()
            .await
            .list_tallies(tl::ListTalliesRequest {
                chip_id: chip_id.into(),
                limit: 1000,
            })
            .await
            .map(|r| r.into_inner().tallies)
            .unwrap_or_default()
    }

    async fn outbox_depth(&self) -> Option<u32> {
        let sites = self
            .admin()
            .await
            .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
            .await
            .ok()?
            .into_inner()
            .sites;
        Some(sites.iter().map(|s| s.outbox_depth).sum())
    }

    /// The site key's pin (from the admin client's view of the vault).
    async fn pin(&self) -> String {
        let status = self
            .admin()
            .await
            .get_vault_status(ad::GetVaultStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        status.site_key_pin
    }

    /// A user enrolled through the site's own gateway, and a session.
    async fn enrolled(&self, chip_id: &str) -> (AppKey, Session, Vec<u8>) {
        let mut admin = self.admin().await;
        let ready = Instant::now() + Duration::from_secs(60);
        while admin
            .create_user(ad::CreateUserRequest {
                chip_id: chip_id.into(),
                name: chip_id.into(),
                ..Default::default()
            })
            .await
            .is_err()
        {
            assert!(Instant::now() < ready, "admin never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let uri = admin
            .issue_user_ticket(ad::IssueUserTicketRequest {
                chip_id: chip_id.into(),
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .uri;
        let ticket = chipsite_model::PublishedTicket::from_uri(&uri).unwrap();
        let key = AppKey::generate().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // The gateway listens once key-vault certified it.
        while chipsite_app::enroll(&ticket, chip_id, &key).await.is_err() {
            assert!(Instant::now() < deadline, "enrollment never succeeded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let site_key = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            &ticket.site_key,
        )
        .unwrap();
        let session = self.session(chip_id, &key, &site_key).await;
        (key, session, site_key)
    }

    async fn session(&self, chip_id: &str, key: &AppKey, site_key: &[u8]) -> Session {
        let e = self.endpoints().await;
        let addr: std::net::SocketAddr = e.user_gateway.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Session::connect(&addr.ip().to_string(), addr.port(), site_key, chip_id, key).await {
                Ok(s) => return s,
                Err(e) => assert!(Instant::now() < deadline, "no session: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Wait until `check` holds (a retrying assert with a deadline).
async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        chipsite_e2e::eventually(Duration::from_secs(90), check).await,
        "never happened: {what}"
    );
}

/// Each tally of `chip_id` on `site` is in `state` with `steps` steps: none
/// lost, none doubled.
async fn all_in(site: &Proc, chip_id: &str, state: &str, steps: usize) -> bool {
    let t = site.tallies(chip_id).await;
    t.len() == TALLIES && t.iter().all(|t| t.state == state && t.steps.len() == steps)
}

store_test!(tally_steps_survive_kill_9_of_either_site);
async fn tally_steps_survive_kill_9_of_either_site(store: Store) {
    let other = store.another().await;
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    for dir in [&dir_a, &dir_b] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let a = Proc::start(&dir_a, &free_addr(), &store.url());
    let mut b = Proc::start(&dir_b, &free_addr(), &other.url());
    let (alice_key, alice, _) = a.enrolled("alice").await;
    let (bob_key, bob, b_key) = b.enrolled("bob").await;
    let ticket = alice.call("tally_ticket", json!({})).await.unwrap();
    let uri = ticket["uri"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    // B's peer gateway may still be getting certified.
    while let Err(e) = bob.redeem_tally_ticket(&uri).await {
        assert!(Instant::now() < deadline, "no link: {e}");
        assert_eq!(e.rpc_code(), Some(-32005), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice_at = Party {
        chip_id: "alice".into(),
        site: a.pin().await,
    };
    let bob_at = Party {
        chip_id: "bob".into(),
        site: b.pin().await,
    };

    // Alice offers a stream of tallies; B is killed while they arrive.
    for i in 0..TALLIES {
        alice
            .offer_tally(&alice_at, &bob_at, &json!({"limit": i}), &alice_key)
            .await
            .unwrap();
        if i == TALLIES / 3 {
            let (dir, peer, url) = b.kill9();
            b = Proc::start(&dir, &peer, &url);
        }
    }
    until("every offer reached B once", || all_in(&b, "bob", "offered", 1)).await;
    until("A's outbox emptied", || async {
        a.outbox_depth().await == Some(0)
    })
    .await;

    // Bob accepts them all; B (now the sender) is killed mid-stream.
    let bob = b.session("bob", &bob_key, &b_key).await;
    let ids: Vec<String> = b.tallies("bob").await.into_iter().map(|t| t.id).collect();
    for (i, id) in ids.iter().enumerate() {
        bob.answer_tally(id, Kind::Accept, &bob_at, &bob_key)
            .await
            .unwrap();
        if i == TALLIES / 2 {
            let (dir, peer, url) = b.kill9();
            b = Proc::start(&dir, &peer, &url);
            let bob = b.session("bob", &bob_key, &b_key).await;
            for id in &ids[i + 1..] {
                bob.answer_tally(id, Kind::Accept, &bob_at, &bob_key)
                    .await
                    .unwrap();
            }
            break;
        }
    }
    until("every accept reached A once", || all_in(&a, "alice", "open", 2)).await;
    until("B's outbox emptied", || async {
        b.outbox_depth().await == Some(0)
    })
    .await;
    // And the two sites hold the same signed steps.
    let (on_a, on_b) = (a.tallies("alice").await, b.tallies("bob").await);
    for t in &on_a {
        let mine: Vec<_> = t.steps.iter().map(|s| (&s.doc, &s.sig)).collect();
        let theirs = on_b.iter().find(|u| u.id == t.id).unwrap();
        let their: Vec<_> = theirs.steps.iter().map(|s| (&s.doc, &s.sig)).collect();
        assert_eq!(mine, their);
    }
    a.kill9();
    b.kill9();
    other.drop_database().await;
}
