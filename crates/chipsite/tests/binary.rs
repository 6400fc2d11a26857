//! The `chipsite` binary itself: `dev` starts, writes its endpoints, keeps
//! its data across restarts and stops cleanly on Ctrl-C (SIGINT); `config`
//! layers file and environment and masks secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn start_dev(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["dev", "--data-dir"])
        .arg(dir)
        .env("CHIPSITE_ADDRESSES__ADMIN", "127.0.0.1:0")
        .env("CHIPSITE_ADDRESSES__KEY_VAULT", "127.0.0.1:0")
        .env("CHIPSITE_ADDRESSES__TICKET", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn interrupt_and_wait(mut child: Child) -> (bool, String) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
            return (status.success(), out);
        }
        assert!(Instant::now() < deadline, "chipsite dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_starts_persists_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.json");

    let first = start_dev(dir.path());
    assert!(wait_for(&endpoints), "endpoints.json written");
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&endpoints).unwrap()).unwrap();
    assert!(e["admin"].as_str().unwrap().starts_with("127.0.0.1:"));
    let key = std::fs::read(dir.path().join("db/key-vault.sqlite")).unwrap();
    let (ok, out) = interrupt_and_wait(first);
    assert!(ok, "exit status 0 on Ctrl-C");
    assert!(!endpoints.exists(), "endpoints.json removed on shutdown");
    for expected in [
        "admin ",
        "key-vault ",
        "ticket ",
        "endpoints",
        "first launch: created the site key",
        "WARNING",
        "Try:",
    ] {
        assert!(out.contains(expected), "{expected:?} printed:\n{out}");
    }
    assert!(!out.contains(&std::fs::read_to_string(dir.path().join("site-key.passphrase")).unwrap()));

    let second = start_dev(dir.path());
    assert!(wait_for(&endpoints));
    let (ok, out) = interrupt_and_wait(second);
    assert!(ok);
    assert!(
        !out.contains("created the site key"),
        "the second launch keeps the key:\n{out}"
    );
    assert!(out.contains("vault: unsealed"));
    assert!(
        std::fs::read(dir.path().join("db/key-vault.sqlite"))
            .unwrap()
            .len()
            >= key.len().min(1)
    );
}

#[test]
fn config_layers_file_then_environment_and_masks_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chipsite.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://site:hunter2@db.internal/chipsite\"\nlisten = \"0.0.0.0:7000\"\n[addresses]\nkey_vault = \"kv:1\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["--config"])
        .arg(&file)
        .arg("config")
        .env("CHIPSITE_ADDRESSES__TICKET", "tk:2")
        .env("CHIPSITE_LISTEN", "127.0.0.1:7001")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("postgres://site:***@db.internal/chipsite"),
        "{text}"
    );
    assert!(!text.contains("hunter2"));
    assert!(
        text.contains("\"127.0.0.1:7001\""),
        "environment overrides the file: {text}"
    );
    assert!(text.contains("\"kv:1\"") && text.contains("\"tk:2\""), "{text}");

    let bad = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["--config", "/nonexistent/chipsite.toml", "config"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not exist"));
    let bad = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["serve", "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown service"));
}
