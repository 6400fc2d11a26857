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
