//! The `chipapp` binary walks the app's dialogs against a real site on
//! every store: enroll from a ticket URI, status, tally ticket, alarms,
//! follow, and one clear line for each mistake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use chipsite_e2e::{Store, TestSite, store_test};

/// Run chipapp off the runtime's thread: (success, stdout, stderr).
async fn chipapp(state: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chipapp"));
    cmd.arg("--state")
        .arg(state)
        .args(args)
        .env_remove("CHIPAPP_STATE");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

store_test!(chipapp_plays_the_app);
async fn chipapp_plays_the_app(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("app.json");
    let uri = site.user_ticket("alice", 0).await.to_uri();

    let (ok, out, err) = chipapp(&state, &["enroll", &uri, "--chip-id", "alice"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("enrolled alice"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file holds the private key");
    }
    // Mistakes: an existing state, a spent ticket, no state.
    let (ok, _, err) = chipapp(&state, &["enroll", &uri, "--chip-id", "alice"]).await;
    assert!(!ok && err.contains("exists"), "{err}");
    let other = dir.path().join("other.json");
    let (ok, _, err) = chipapp(&other, &["enroll", &uri, "--chip-id", "alice"]).await;
    assert!(!ok && err.contains("refused"), "{err}");
    assert!(!other.exists());
    let (ok, _, err) = chipapp(&other, &["status"]).await;
    assert!(!ok && err.contains("chipapp enroll"), "{err}");

    let (ok, out, err) = chipapp(&state, &["status"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["chip_id"], "alice");
    let (ok, out, err) = chipapp(&state, &["tally-ticket"]).await;
    assert!(ok && out.starts_with("chipsite:tally?"), "{out}{err}");
    let (ok, _, err) = chipapp(&state, &["call", "nope"]).await;
    assert!(!ok && err.contains("-32601"), "{err}");

    // follow prints alarms as they come (raised until one is seen).
    let follow_state = state.clone();
    let follow = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chipapp"))
            .arg("--state")
            .arg(&follow_state)
            .arg("follow")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = std::io::BufReader::new(stdout)
            .lines()
            .next()
            .and_then(Result::ok);
        let _ = child.kill();
        let _ = child.wait();
        line
    });
    for _ in 0..40 {
        if follow.is_finished() {
            break;
        }
        site.raise_alarm("alice", "call the office").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let line = follow.await.unwrap().expect("an alarm line");
    assert!(
        line.contains("\"alarm\"") && line.contains("call the office"),
        "{line}"
    );
    let (ok, out, _) = chipapp(&state, &["alarms"]).await;
    assert!(ok && out.contains("call the office"), "{out}");
    site.finish().await;
}
