//! An independent peer site, written from docs/protocol.md section 14 alone
//! (Python's `ssl` + `cryptography`: tests/python/peer_client.py), redeems a
//! tally ticket of a real site and opens a peer session to it, on every
//! store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_e2e::{Store, TestSite, store_test};
use serde_json::json;

/// Run the client: its exit code and what it printed.
async fn client(args: Vec<String>) -> (i32, String) {
    let out = chipsite_e2e::python("peer_client.py", args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

store_test!(a_python_peer_site_redeems_a_tally_ticket_and_opens_a_session);
async fn a_python_peer_site_redeems_a_tally_ticket_and_opens_a_session(store: Store) {
    let site = TestSite::start(&store).await;
    let key = site.enrolled("alice").await;
    let alice = site.session("alice", &key).await.unwrap();
    let uri = alice.call("tally_ticket", json!({})).await.unwrap()["uri"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out) = client(vec![uri.clone(), "--chip-id".into(), "pybob".into()]).await;
    assert_eq!(code, 0, "[{}] {out}", store.label());
    assert!(!out.contains("FAIL"), "{out}");
    let links = site.peer_links("alice").await;
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].peer_chip_id, "pybob");

    // The ticket is spent: a second introduction gets no answer.
    let (code, out) = client(vec![uri, "--chip-id".into(), "pybob2".into()]).await;
    assert_ne!(code, 0, "{out}");
    assert_eq!(site.peer_links("alice").await.len(), 1);
    alice.close().await;
    site.finish().await;
}

store_test!(a_python_peer_site_offers_a_tally_with_signed_steps);
async fn a_python_peer_site_offers_a_tally_with_signed_steps(store: Store) {
    let site = TestSite::start(&store).await;
    let key = site.enrolled("alice").await;
    let alice = site.session("alice", &key).await.unwrap();
    let uri = alice.call("tally_ticket", json!({})).await.unwrap()["uri"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out) = client(vec![
        uri,
        "--chip-id".into(),
        "pycarol".into(),
        "--tally".into(),
        "--extra".into(),
    ])
    .await;
    assert_eq!(code, 0, "[{}] {out}", store.label());
    assert!(!out.lines().any(|l| l.starts_with("FAIL")), "{out}");
    // Requests sent without waiting (a batch at the site) were answered in order.
    for n in [1, 2] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("ok extra tally pipelined {n}:"))),
            "{out}"
        );
    }
    let line = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line: {out}"))
            .to_owned()
    };
    // Site A recorded exactly the offer the independent site signed, and
    // nothing of the refused steps.
    let tallies = site.tallies("alice").await;
    let ours: Vec<_> = tallies.iter().filter(|t| t.id == line("tally")).collect();
    assert_eq!(ours.len(), 1, "{tallies:?}");
    let t = ours[0];
    assert_eq!(
        (t.role.as_str(), t.state.as_str(), t.peer_chip_id.as_str()),
        ("recipient", "offered", "pycarol")
    );
    assert_eq!(t.steps.len(), 1);
    assert_eq!(t.steps[0].hash, line("offer-hash"));
    let user_key = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        line("user-key"),
    )
    .unwrap();
    assert_eq!(t.steps[0].signer_key, user_key);
    alice.close().await;
    site.finish().await;
}
