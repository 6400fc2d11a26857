//! An independent client, written from docs/protocol.md alone (Python's
//! `ssl` + `cryptography`: tests/python/app_client.py), walks the user
//! dialogs against a real site on every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_e2e::{Store, TestSite, store_test};
use serde_json::Value;

/// Run the client: its exit code and the JSON object it printed.
async fn client(args: Vec<String>) -> (i32, Value) {
    let out = chipsite_e2e::python("app_client.py", args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

fn args(a: &[&str], state: &Path) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(|s| (*s).to_owned()).collect();
    v.push("--state".into());
    v.push(state.display().to_string());
    v
}

store_test!(the_python_client_enrolls_calls_and_follows);
async fn the_python_client_enrolls_calls_and_follows(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("alice.json");

    // A ticket whose site key is another key: the client refuses the
    // server before sending, and the real ticket still works after.
    let ticket = site.user_ticket("alice", 0).await;
    let mut forged = ticket.clone();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    forged.site_key = URL_SAFE_NO_PAD.encode(rcgen::PublicKeyData::subject_public_key_info(&other));
    let (code, _) = client(args(
        &["enroll", "--ticket", &forged.to_uri(), "--chip-id", "alice"],
        &state,
    ))
    .await;
    assert_eq!(
        code,
        3,
        "[{}] a server with another key is refused",
        store.label()
    );

    let (code, out) = client(args(
        &["enroll", "--ticket", &ticket.to_uri(), "--chip-id", "alice"],
        &state,
    ))
    .await;
    assert_eq!((code, &out["enrolled"]), (0, &Value::Bool(true)), "{out}");
    let spent = dir.path().join("again.json");
    let (code, out) = client(args(
        &["enroll", "--ticket", &ticket.to_json(), "--chip-id", "alice"],
        &spent,
    ))
    .await;
    assert_eq!((code, &out["enrolled"]), (2, &Value::Bool(false)), "{out}");

    let (code, out) = client(args(&["call", "status"], &state)).await;
    assert_eq!((code, &out["chip_id"]), (0, &Value::from("alice")), "{out}");
    let (code, out) = client(args(&["call", "no.such.method"], &state)).await;
    assert_eq!((code, &out["error"]["code"]), (4, &Value::from(-32601)), "{out}");

    // Follow: alarms are raised until the client has received one.
    let follow = tokio::spawn(client(args(
        &["follow", "--count", "1", "--timeout", "30"],
        &state,
    )));
    let mut tries = 0;
    while !follow.is_finished() && tries < 60 {
        site.raise_alarm("alice", "from the Rust side ✓").await;
        tries += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, out) = follow.await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["alarms"][0]["text"], "from the Rust side ✓");

    // Locked down: refused with the documented code.
    site.admin()
        .set_lockdown(chipsite_proto::admin::v1::SetLockdownRequest {
            chip_id: "alice".into(),
            locked: true,
        })
        .await
        .unwrap();
    let (code, out) = client(args(&["call", "status"], &state)).await;
    assert_eq!((code, &out["error"]["code"]), (4, &Value::from(-32002)), "{out}");
    site.finish().await;
}
