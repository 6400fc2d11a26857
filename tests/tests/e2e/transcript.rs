//! docs/protocol.md section 11, replayed: its shell blocks run as written,
//! with `openssl s_client`, against a real site on every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_e2e::{Store, TestSite, store_test};
use serde_json::Value;

/// The ```sh blocks of the transcript section, in order.
fn transcript_blocks() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("11. "))
        .expect("section 11 of docs/protocol.md");
    let mut blocks = vec![];
    let mut rest = section;
    while let Some(start) = rest.find("```sh\n") {
        let body = &rest[start + 6..];
        let end = body.find("```").unwrap();
        blocks.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    blocks
}

/// Run a script (off the runtime's thread: the site runs in this process).
async fn sh(dir: &std::path::Path, env: &[(&str, String)], script: &str) -> (bool, String) {
    let (dir, script) = (dir.to_owned(), script.to_owned());
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    tokio::task::spawn_blocking(move || sh_blocking(&dir, &env, &script))
        .await
        .unwrap()
}

fn sh_blocking(dir: &std::path::Path, env: &[(String, String)], script: &str) -> (bool, String) {
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script]).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

/// Run a script that must succeed; its output.
async fn sh_ok(dir: &std::path::Path, env: &[(&str, String)], script: &str) -> String {
    let (ok, out) = sh(dir, env, script).await;
    assert!(ok, "{script}\nfailed; output: {out}");
    out
}

fn lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

store_test!(the_openssl_transcript_replays);
async fn the_openssl_transcript_replays(store: Store) {
    let blocks = transcript_blocks();
    assert_eq!(blocks.len(), 3, "three shell blocks in section 11");
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let ticket = site.user_ticket("alice", 0).await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("HOST", ticket.host.clone()),
        ("PORT", ticket.port.to_string()),
        ("TOKEN", ticket.token.clone()),
        ("KEY", ticket.site_key.clone()),
    ];

    // 1. The site certificate's key is the ticket's.
    let key = sh_ok(dir.path(), &env, &blocks[0]).await;
    assert_eq!(key.trim(), ticket.site_key, "[{}]", store.label());

    // 2. Enrollment answers once; the spent token gets silence.
    let enrolled = lines(&sh_ok(dir.path(), &env, &blocks[1]).await);
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    assert_eq!(enrolled[0]["id"], 1);
    assert_eq!(enrolled[0]["result"]["enrolled"], true);
    assert_eq!(enrolled[0]["result"]["chip_id"], "alice");
    // (openssl then reports the connection closed without close_notify.)
    // (In a directory of its own: the block makes a new app key.)
    let again = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("site.pem"), again.path().join("site.pem")).unwrap();
    let (ok, out) = sh(again.path(), &env, &blocks[1]).await;
    assert!(!ok && out.trim().is_empty(), "{out}");

    // 3. A session: status, subscribe, an unknown method, bad JSON.
    let answers = lines(&sh_ok(dir.path(), &env, &blocks[2]).await);
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert_eq!(answers[0]["result"]["chip_id"], "alice");
    assert_eq!(answers[0]["result"]["status"], "active");
    assert_eq!(answers[1]["result"]["subscribed"], true);
    assert_eq!(answers[2]["error"]["code"], -32601);
    assert_eq!(answers[3]["id"], Value::Null);
    assert_eq!(answers[3]["error"]["code"], -32700);
    site.finish().await;
}
