//! Tallies between two whole sites, each with its own store: users sign
//! every step with their app's key, each site checks every signature and
//! keeps the signed documents, and steps reach the other site exactly once
//! through the durable outbox (docs/protocol.md sections 9 and 14.5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chipsite_app::{AppError, AppKey, Session};
use chipsite_e2e::{Store, TestSite, eventually, store_test};
use chipsite_model::tally::{self, Kind, Party};
use chipsite_proto::{admin::v1 as ad, tally::v1 as tl};
use serde_json::{Value, json};

/// Two running sites with alice on A and bob on B, linked by a tally
/// ticket, each in a session.
struct Linked {
    a: TestSite,
    b: TestSite,
    alice: Session,
    bob: Session,
    alice_key: AppKey,
    bob_key: AppKey,
    alice_at: Party,
    bob_at: Party,
}

async fn linked(store: &Store) -> Linked {
    linked_with(store, |_| {}, |_| {}).await
}

async fn linked_with(
    store: &Store,
    adjust_a: impl FnOnce(&mut chipsite_site::Config),
    adjust_b: impl FnOnce(&mut chipsite_site::Config),
) -> Linked {
    let crate::peers::Pair {
        a,
        b,
        alice,
        bob,
        alice_key,
        bob_key,
    } = crate::peers::pair_with(store, adjust_a, adjust_b).await;
    let ticket = alice.call("tally_ticket", json!({})).await.unwrap();
    bob.redeem_tally_ticket(ticket["uri"].as_str().unwrap())
        .await
        .unwrap();
    let alice_at = Party {
        chip_id: "alice".into(),
        site: chipsite_model::pin_of_spki(&a.site_key().await),
    };
    let bob_at = Party {
        chip_id: "bob".into(),
        site: chipsite_model::pin_of_spki(&b.site_key().await),
    };
    Linked {
        a,
        b,
        alice,
        bob,
        alice_key,
        bob_key,
        alice_at,
        bob_at,
    }
}

impl Linked {
    /// Stop site B and start it again (same store, same peer port), with
    /// bob in a new session.
    async fn restart_b(self) -> Self {
        self.bob.close().await;
        let b = self.b.restart().await;
        let bob = b.session("bob", &self.bob_key).await.unwrap();
        Self { b, bob, ..self }
    }

    async fn finish(self) {
        self.alice.close().await;
        self.bob.close().await;
        self.a.finish().await;
        self.b.finish().await;
    }
}

/// `doc` signed with `key`, handed to its site through `session` as `kind`.
async fn submit(session: &Session, kind: Kind, key: &AppKey, doc: &Value) -> Result<Value, AppError> {
    session.submit_step(kind, &key.signed_step(doc).unwrap()).await
}

fn code(r: Result<Value, AppError>) -> i64 {
    match r {
        Err(AppError::Rpc { code, .. }) => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The tally `id` on `site` for `chip_id`, once it is in `state` (a
/// retrying check with a deadline).
async fn in_state(site: &TestSite, chip_id: &str, id: &str, state: &str) -> tl::Tally {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let found = site.tallies(chip_id).await.into_iter().find(|t| t.id == id);
        if let Some(t) = &found
            && t.state == state
        {
            return t.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tally {id} of {chip_id} never became {state}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What both sites must agree on: each step's number, signer, canonical
/// document, signature and hash.
fn signed_steps(t: &tl::Tally) -> Vec<(u32, String, String, String, String)> {
    let mut s: Vec<_> = t
        .steps
        .iter()
        .map(|s| {
            (
                s.seq,
                s.signer_chip_id.clone(),
                s.doc.clone(),
                s.sig.clone(),
                s.hash.clone(),
            )
        })
        .collect();
    s.sort();
    s
}

async fn outbox_depth(site: &TestSite) -> u32 {
    site.admin()
        .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .sites
        .iter()
        .map(|s| s.outbox_depth)
        .sum()
}

store_test!(a_tally_is_offered_accepted_and_closed_between_two_sites);
async fn a_tally_is_offered_accepted_and_closed_between_two_sites(store: Store) {
    let p = linked(&store).await;
    let terms = json!({"limit": 100000, "units": "mCHIP", "note": "Grüße"});
    let offered = p
        .alice
        .offer_tally(&p.alice_at, &p.bob_at, &terms, &p.alice_key)
        .await
        .unwrap();
    let id = offered["id"].as_str().unwrap().to_owned();
    assert_eq!(offered["state"], "offered", "{offered}");
    assert_eq!(offered["role"], "offerer", "{offered}");
    assert_eq!(offered["terms"], terms, "{offered}");

    // Bob's site has it, signed by alice, and bob is told.
    let on_b = in_state(&p.b, "bob", &id, "offered").await;
    assert_eq!(
        (on_b.role.as_str(), on_b.peer_chip_id.as_str()),
        ("recipient", "alice")
    );
    assert_eq!(on_b.peer_site_pin, p.alice_at.site);
    assert!(
        eventually(Duration::from_secs(10), || async {
            crate::peers::alarms(&p.b, "bob")
                .await
                .iter()
                .any(|t| t.contains("offers you a tally") && t.contains(&id))
        })
        .await
    );
    let listed = p.bob.tallies().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["steps"][0]["doc"]["terms"], terms);

    // Bob accepts; both sites hold the same signed steps.
    let accepted = p
        .bob
        .answer_tally(&id, Kind::Accept, &p.bob_at, &p.bob_key)
        .await
        .unwrap();
    assert_eq!(accepted["state"], "open", "{accepted}");
    let on_a = in_state(&p.a, "alice", &id, "open").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.b.tallies("bob").await[0].delivery == "delivered"
        })
        .await
    );
    let on_b = in_state(&p.b, "bob", &id, "open").await;
    assert_eq!(signed_steps(&on_a), signed_steps(&on_b));
    assert_eq!(on_a.steps.len(), 2);
    // Every signature holds against its signer's app key, checked here
    // with nothing of the site.
    for s in &on_a.steps {
        let key = if s.signer_chip_id == "alice" {
            p.alice_key.spki_der()
        } else {
            p.bob_key.spki_der()
        };
        assert_eq!(s.signer_key, key);
        let doc: Value = serde_json::from_str(&s.doc).unwrap();
        chipsite_model::signed::verify(&doc, &s.sig, &key).unwrap();
        assert_eq!(s.hash, tally::hash_of(s.doc.as_bytes()));
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            crate::peers::alarms(&p.a, "alice")
                .await
                .iter()
                .any(|t| t.contains("accepted your tally"))
        })
        .await
    );
    // Operators see it: AdminService (chipsctl tally list) and the user's
    // console page.
    let seen =
        p.a.admin()
            .list_tallies(tl::ListTalliesRequest {
                chip_id: "alice".into(),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .tallies;
    assert_eq!(signed_steps(&seen[0]), signed_steps(&on_a));
    let (cookie, _) = crate::console::sign_in(&p.b).await;
    let page = crate::console::http(&p.b, "GET", "/users/bob", Some(&cookie), None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(&id) && page.body.contains("recipient") && page.body.contains("offer, accept"),
        "{}",
        page.body
    );
    let status = p.alice.call("status", json!({})).await.unwrap();
    assert_eq!(status["tallies"][0]["id"], id.as_str(), "{status}");
    assert_eq!(status["tallies"][0]["state"], "open", "{status}");

    // Both close at the same moment: each site dials the other at once;
    // both end closed with both closes, and agree.
    let (x, y) = tokio::join!(
        p.alice.answer_tally(&id, Kind::Close, &p.alice_at, &p.alice_key),
        p.bob.answer_tally(&id, Kind::Close, &p.bob_at, &p.bob_key),
    );
    assert_eq!(x.unwrap()["state"], "closed");
    assert_eq!(y.unwrap()["state"], "closed");
    let agreed = eventually(Duration::from_secs(20), || async {
        let (a, b) = (p.a.tallies("alice").await, p.b.tallies("bob").await);
        a[0].steps.len() == 4 && signed_steps(&a[0]) == signed_steps(&b[0])
    })
    .await;
    assert!(
        agreed,
        "{:?}\n{:?}",
        p.a.tallies("alice").await,
        p.b.tallies("bob").await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            outbox_depth(&p.a).await == 0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            outbox_depth(&p.b).await == 0
        })
        .await
    );
    // A closed tally takes no more steps.
    assert_eq!(
        code(
            p.alice
                .answer_tally(&id, Kind::Accept, &p.alice_at, &p.alice_key)
                .await
        ),
        -32006
    );
    p.finish().await;
}

store_test!(forged_and_altered_steps_are_refused_and_nothing_is_recorded);
async fn forged_and_altered_steps_are_refused_and_nothing_is_recorded(store: Store) {
    let p = linked(&store).await;
    let doc = tally::doc(
        Kind::Offer,
        "tly_forged1",
        &p.alice_at,
        &p.bob_at,
        None,
        Some(&json!({"limit": 10})),
        1,
    );
    // Altered after alice signed it.
    let mut altered = p.alice_key.signed_step(&doc).unwrap();
    altered["doc"]["terms"]["limit"] = json!(10_000);
    assert_eq!(code(p.alice.submit_step(Kind::Offer, &altered).await), -32001);
    // Signed by a key that is not alice's registered key (its signature
    // holds, the key is not hers).
    let stranger = AppKey::generate().unwrap();
    let other = stranger.signed_step(&doc).unwrap();
    assert_eq!(code(p.alice.submit_step(Kind::Offer, &other).await), -32001);
    // A signature swapped in from another document.
    let mut swapped = p.alice_key.signed_step(&doc).unwrap();
    let mut doc2 = doc.clone();
    doc2["tally"] = json!("tly_forged2");
    swapped["sig"] = p.alice_key.signed_step(&doc2).unwrap()["sig"].clone();
    assert_eq!(code(p.alice.submit_step(Kind::Offer, &swapped).await), -32001);
    // In someone else's name, to an unlinked user, of the wrong type.
    let mut as_bob = doc.clone();
    as_bob["from"]["chip_id"] = json!("carol");
    let r = submit(&p.alice, Kind::Offer, &p.alice_key, &as_bob).await;
    assert_eq!(code(r), -32602);
    let mut unlinked = doc.clone();
    unlinked["to"]["chip_id"] = json!("dave");
    let r = submit(&p.alice, Kind::Offer, &p.alice_key, &unlinked).await;
    assert_eq!(code(r), -32004);
    let signed = p.alice_key.signed_step(&doc).unwrap();
    assert_eq!(code(p.alice.submit_step(Kind::Accept, &signed).await), -32602);
    // An answer to a tally that does not exist.
    let accept = tally::doc(
        Kind::Accept,
        "tly_nothing",
        &p.alice_at,
        &p.bob_at,
        Some(&tally::hash_of(b"x")),
        None,
        1,
    );
    let r = submit(&p.alice, Kind::Accept, &p.alice_key, &accept).await;
    assert_eq!(code(r), -32004);
    assert!(p.a.tallies("alice").await.is_empty());
    assert_eq!(outbox_depth(&p.a).await, 0);

    // The good offer goes through; alice cannot answer her own offer, and
    // the same offer again is the same tally.
    let good = p.alice.submit_step(Kind::Offer, &signed).await.unwrap();
    assert_eq!(good["id"], "tly_forged1");
    let again = p.alice.submit_step(Kind::Offer, &signed).await.unwrap();
    assert_eq!(again["steps"].as_array().unwrap().len(), 1);
    let hash = good["steps"][0]["hash"].as_str().unwrap().to_owned();
    let own = tally::doc(
        Kind::Accept,
        "tly_forged1",
        &p.alice_at,
        &p.bob_at,
        Some(&hash),
        None,
        2,
    );
    let r = submit(&p.alice, Kind::Accept, &p.alice_key, &own).await;
    assert_eq!(code(r), -32006);
    // A different offer under the same tally id.
    let mut twin = doc.clone();
    twin["terms"] = json!({"limit": 11});
    let r = submit(&p.alice, Kind::Offer, &p.alice_key, &twin).await;
    assert_eq!(code(r), -32006);
    in_state(&p.b, "bob", "tly_forged1", "offered").await;
    // Bob's accept naming the wrong previous step is refused by his own site.
    let wrong = tally::doc(
        Kind::Accept,
        "tly_forged1",
        &p.bob_at,
        &p.alice_at,
        Some(&tally::hash_of(b"x")),
        None,
        2,
    );
    let r = submit(&p.bob, Kind::Accept, &p.bob_key, &wrong).await;
    assert_eq!(code(r), -32006);
    assert_eq!(p.b.tallies("bob").await[0].steps.len(), 1);
    p.finish().await;
}

store_test!(steps_wait_for_a_site_that_is_away_and_arrive_once);
async fn steps_wait_for_a_site_that_is_away_and_arrive_once(store: Store) {
    let p = linked(&store).await;
    // B's peer server stopped: alice's offer waits in A's outbox.
    p.b.admin()
        .stop_peer_server(ad::StopPeerServerRequest {})
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || async { !p.b.peer_port_open().await }).await);
    let offered = p
        .alice
        .offer_tally(&p.alice_at, &p.bob_at, &json!({"limit": 5}), &p.alice_key)
        .await
        .unwrap();
    let id = offered["id"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.a.tallies("alice").await[0].delivery.starts_with("retrying")
        })
        .await
    );
    assert_eq!(outbox_depth(&p.a).await, 1);
    assert!(p.b.tallies("bob").await.is_empty());
    // Back: delivered (the backoff is short after one failure).
    p.b.admin()
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: p.b.passphrase(),
        })
        .await
        .unwrap();
    in_state(&p.b, "bob", &id, "offered").await;

    // Alice locked down on A: A refuses peer steps for her until the
    // lockdown ends, so bob's accept waits in B's outbox.
    p.a.admin()
        .set_lockdown(ad::SetLockdownRequest {
            chip_id: "alice".into(),
            locked: true,
        })
        .await
        .unwrap();
    p.bob
        .answer_tally(&id, Kind::Accept, &p.bob_at, &p.bob_key)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.b.tallies("bob").await[0].delivery.starts_with("retrying")
        })
        .await
    );
    assert_eq!(p.a.tallies("alice").await[0].state, "offered");

    // B restarts with the accept still in its outbox: the outbox is in
    // its store, and the accept arrives once alice's lockdown ends.
    let p = p.restart_b().await;
    assert!(eventually(Duration::from_secs(10), || p.b.peer_port_open()).await);
    assert_eq!(p.b.tallies("bob").await[0].steps.len(), 2);
    p.a.admin()
        .set_lockdown(ad::SetLockdownRequest {
            chip_id: "alice".into(),
            locked: false,
        })
        .await
        .unwrap();
    let on_a = in_state(&p.a, "alice", &id, "open").await;
    assert_eq!(on_a.steps.len(), 2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            outbox_depth(&p.b).await == 0
        })
        .await
    );
    // Each step applied once: one alarm each.
    let count = |texts: Vec<String>, what: &str| texts.iter().filter(|t| t.contains(what)).count();
    assert_eq!(count(crate::peers::alarms(&p.b, "bob").await, "offers you"), 1);
    assert_eq!(
        count(crate::peers::alarms(&p.a, "alice").await, "accepted your"),
        1
    );
    assert_eq!(
        signed_steps(&p.a.tallies("alice").await[0]),
        signed_steps(&p.b.tallies("bob").await[0])
    );
    p.finish().await;
}

/// Sessions open now with the other site: (opened by this site, by it).
async fn sessions(site: &TestSite) -> (u32, u32) {
    site.admin()
        .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .sites
        .iter()
        .fold((0, 0), |(o, i), s| (o + s.sessions_out, i + s.sessions_in))
}

store_test!(idle_sessions_close_and_the_next_step_opens_another);
async fn idle_sessions_close_and_the_next_step_opens_another(store: Store) {
    // A closes the sessions it opened after 1 s without work; B keeps its
    // own open a minute, but A closes sessions B opened after 1 s of silence.
    let p = linked_with(
        &store,
        |c| {
            c.peer.session_idle_s = 1;
            c.peer.idle_s = 1;
        },
        |c| c.peer.session_idle_s = 60,
    )
    .await;
    let offered = p
        .alice
        .offer_tally(&p.alice_at, &p.bob_at, &json!({}), &p.alice_key)
        .await
        .unwrap();
    let id = offered["id"].as_str().unwrap().to_owned();
    in_state(&p.b, "bob", &id, "offered").await;
    // A's idle session closes on A's side, and B sees it end.
    assert!(eventually(Duration::from_secs(10), || async { sessions(&p.a).await.0 == 0 }).await);
    assert!(eventually(Duration::from_secs(10), || async { sessions(&p.b).await.1 == 0 }).await);

    // B's session to A: A closes it after 1 s of silence, while B still
    // holds it for its next step.
    p.bob
        .answer_tally(&id, Kind::Accept, &p.bob_at, &p.bob_key)
        .await
        .unwrap();
    in_state(&p.a, "alice", &id, "open").await;
    assert!(eventually(Duration::from_secs(10), || async { sessions(&p.a).await.1 == 0 }).await);
    assert_eq!(sessions(&p.b).await.0, 1, "B keeps its session for a minute");
    // The next step finds it closed and opens another at once (no backoff:
    // delivered, never "retrying").
    p.bob
        .answer_tally(&id, Kind::Close, &p.bob_at, &p.bob_key)
        .await
        .unwrap();
    let on_a = in_state(&p.a, "alice", &id, "closed").await;
    assert_eq!(on_a.steps.len(), 3);
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.b.tallies("bob").await[0].delivery == "delivered"
        })
        .await
    );
    assert_eq!(signed_steps(&on_a), signed_steps(&p.b.tallies("bob").await[0]));
    let logs = chipsite_e2e::captured_logs();
    assert!(!logs.contains("tally step not delivered"), "{logs}");
    p.finish().await;
}

/// What keeps a site from taking or sending peer work for a while.
#[derive(Debug, Clone, Copy)]
enum Pause {
    /// The receiving site's vault sealed.
    Sealed,
    /// The receiving site locked down.
    SiteLocked,
    /// The sending site's own peer server stopped: it sends nothing.
    SenderStopped,
}

async fn pause(p: &Linked, how: Pause, on: bool) {
    match (how, on) {
        (Pause::Sealed, true) => {
            p.b.admin().seal_vault(ad::SealVaultRequest {}).await.unwrap();
        }
        (Pause::Sealed, false) => {
            p.b.admin()
                .unseal_vault(ad::UnsealVaultRequest {
                    passphrase: p.b.passphrase(),
                })
                .await
                .unwrap();
        }
        (Pause::SiteLocked, locked) => {
            p.b.admin()
                .set_lockdown(ad::SetLockdownRequest {
                    chip_id: String::new(),
                    locked,
                })
                .await
                .unwrap();
        }
        (Pause::SenderStopped, true) => {
            p.a.admin()
                .stop_peer_server(ad::StopPeerServerRequest {})
                .await
                .unwrap();
            // The peer gateway has seen it once its port is closed.
            assert!(eventually(Duration::from_secs(10), || async { !p.a.peer_port_open().await }).await);
        }
        (Pause::SenderStopped, false) => {
            p.a.admin()
                .start_peer_server(ad::StartPeerServerRequest {
                    passphrase: p.a.passphrase(),
                })
                .await
                .unwrap();
        }
    }
}

store_test!(no_peer_work_while_sealed_locked_or_stopped_and_queued_steps_follow);
async fn no_peer_work_while_sealed_locked_or_stopped_and_queued_steps_follow(store: Store) {
    let p = linked(&store).await;
    for how in [Pause::Sealed, Pause::SiteLocked, Pause::SenderStopped] {
        pause(&p, how, true).await;
        if matches!(how, Pause::Sealed) {
            // B's peer gateway reuses what it knows of the vault for up to
            // a second: once it refuses a new session, it refuses steps.
            let refused = eventually(Duration::from_secs(10), || async {
                p.a.peer_gateway_as(chipsite_tls::identity::ADMIN)
                    .ping(chipsite_proto::peer::v1::PingRequest {
                        chip_id: "alice".into(),
                        peer_chip_id: "bob".into(),
                    })
                    .await
                    .is_err()
            })
            .await;
            assert!(refused);
        }
        let offered = p
            .alice
            .offer_tally(
                &p.alice_at,
                &p.bob_at,
                &json!({"while": format!("{how:?}")}),
                &p.alice_key,
            )
            .await
            .unwrap();
        let id = offered["id"].as_str().unwrap().to_owned();
        let waiting = eventually(Duration::from_secs(10), || async {
            let t =
                p.a.tallies("alice")
                    .await
                    .into_iter()
                    .find(|t| t.id == id)
                    .unwrap();
            match how {
                // Refused by the other site: A keeps trying.
                Pause::Sealed | Pause::SiteLocked => t.delivery.starts_with("retrying"),
                // A's delivery is paused: not tried, or (taken from the
                // outbox just before the stop) held back by A itself.
                Pause::SenderStopped => {
                    t.delivery == "pending" || t.delivery == "retrying: the peer server is stopped"
                }
            }
        })
        .await;
        assert!(waiting, "{how:?}: {:?}", p.a.tallies("alice").await);
        // Watched for a while: the step does not reach B.
        let reached = eventually(Duration::from_millis(1500), || async {
            p.b.tallies("bob").await.iter().any(|t| t.id == id)
        })
        .await;
        assert!(!reached, "{how:?}: B took the step");
        pause(&p, how, false).await;
        let on_b = in_state(&p.b, "bob", &id, "offered").await;
        assert_eq!(on_b.steps.len(), 1, "{how:?}");
    }
    p.finish().await;
}
