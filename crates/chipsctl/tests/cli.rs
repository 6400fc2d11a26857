//! The real `chipsctl` binary against a real dev site, on every store:
//! every admin command, text and JSON output, and one clear line per mistake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command};

use chipsite_e2e::{Store, TestSite, store_test};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn chipsctl(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chipsctl"));
    cmd.arg("--data-dir").arg(data_dir).args(args);
    cmd.env_remove("CHIPSCTL_PASSPHRASE")
        .env_remove("CHIPSCTL_NEW_PASSPHRASE");
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// chipsctl on a terminal (a pseudo-terminal made by Python's `pty`), with
/// `typed` answering its prompt once the prompt has appeared; everything
/// the terminal showed, and whether chipsctl succeeded.
fn at_terminal(data_dir: &Path, args: &[&str], typed: &str) -> (bool, String) {
    const DRIVER: &str = r#"
import os, pty, select, sys, termios, time
argv, typed = sys.argv[1:-1], sys.argv[-1]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
seen, deadline = b"", time.time() + 30
def more():
    global seen
    r, _, _ = select.select([fd], [], [], 0.05)
    if r:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return False
        if not chunk:
            return False
        seen += chunk
    return True
def echoing():
    return termios.tcgetattr(fd)[3] & termios.ECHO
# Type once the prompt is there and the terminal has stopped echoing (as a
# person would, later); if it never stops, type anyway and the echo shows.
while (b"pass phrase: " not in seen or echoing()) and time.time() < deadline - 20 and more():
    pass
os.write(fd, typed.encode() + b"\n")
while time.time() < deadline and more():
    pass
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = Command::new("python3")
        .args(["-c", DRIVER, env!("CARGO_BIN_EXE_chipsctl"), "--data-dir"])
        .arg(data_dir)
        .args(args)
        .arg(typed)
        .env_remove("CHIPSCTL_PASSPHRASE")
        .env_remove("CHIPSCTL_NEW_PASSPHRASE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ok(data_dir: &Path, args: &[&str]) -> String {
    let r = chipsctl(data_dir, args, None);
    assert!(r.ok, "chipsctl {args:?} failed: {}", r.stderr);
    r.stdout
}

fn fails(data_dir: &Path, args: &[&str], stdin: Option<&str>, message: &str) {
    let r = chipsctl(data_dir, args, stdin);
    assert!(!r.ok, "chipsctl {args:?} should fail");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    assert!(r.stderr.starts_with("chipsctl: error: "), "{}", r.stderr);
    assert!(
        r.stderr.contains(message),
        "{:?} should mention {message:?}",
        r.stderr
    );
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

store_test!(every_admin_command_through_chipsctl);
async fn every_admin_command_through_chipsctl(store: Store) {
    let site = TestSite::start(&store).await;
    let dir = site.data_dir();
    let d = dir.as_path();
    let pass = std::fs::read_to_string(chipsite_site::dev::passphrase_path(d)).unwrap();
    let pass_file = d.join("pass.txt");
    std::fs::write(&pass_file, &pass).unwrap();
    let pass_arg = pass_file.to_str().unwrap();

    // Users.
    assert_eq!(
        ok(
            d,
            &[
                "user",
                "create",
                "alice",
                "--name",
                "Alice",
                "--email",
                "alice@example.com"
            ]
        ),
        "created user alice\n"
    );
    let u = json(&ok(d, &["--json", "user", "show", "alice"]));
    assert_eq!(
        (u["name"].as_str(), u["contact"]["email"].as_str()),
        (Some("Alice"), Some("alice@example.com"))
    );
    assert!(ok(d, &["user", "show", "alice"]).contains("status   active"));
    ok(d, &["user", "create", "bob", "--name", "Bob"]);
    let list = json(&ok(d, &["--json", "user", "list"]));
    assert_eq!(list["users"].as_array().unwrap().len(), 2);
    assert_eq!(list["total"], 2);
    assert!(ok(d, &["user", "list", "--query", "Bo"]).starts_with("bob"));
    // Sorted newest first, one a page: the token leads to the other.
    let first = json(&ok(
        d,
        &["--json", "user", "list", "--sort", "-chip_id", "--page-size", "1"],
    ));
    assert_eq!(first["users"][0]["chip_id"], "bob");
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    let text = ok(
        d,
        &[
            "user",
            "list",
            "--sort=-chip_id",
            "--page-size",
            "1",
            "--page-token",
            &token,
        ],
    );
    assert!(text.starts_with("alice") && text.contains("(2 in all)"), "{text}");
    let locked = ok(d, &["user", "list", "--locked", "true"]);
    assert!(locked.starts_with("(0 in all)"), "{locked}");
    let edited = json(&ok(
        d,
        &[
            "--json",
            "user",
            "edit",
            "bob",
            "--phone",
            "+1 555 0199",
            "--status",
            "suspended",
        ],
    ));
    assert_eq!(edited["status"], "suspended");
    fails(d, &["user", "show", "nobody"], None, "user \"nobody\" not found");
    fails(
        d,
        &["user", "create", "Bad Id", "--name", "X"],
        None,
        "invalid CHIP ID",
    );
    fails(
        d,
        &["user", "create", "alice", "--name", "X"],
        None,
        "already exists",
    );
    fails(d, &["user", "create", "carol"], None, "needs --name");
    fails(
        d,
        &["user", "edit", "bob", "--status", "gone"],
        None,
        "status must be one of",
    );

    // Dump and load.
    let dump_file = d.join("alice.json");
    ok(d, &["user", "dump", "alice", "-o", dump_file.to_str().unwrap()]);
    let dumped = std::fs::read_to_string(&dump_file).unwrap();
    assert_eq!(json(&dumped)["format"], "chipsite.user.v1");
    // The same dump again is a retry: it succeeds. Another user of that
    // CHIP ID is refused.
    ok(d, &["user", "load", dump_file.to_str().unwrap()]);
    let mut other = json(&dumped);
    other["name"] = "Not Alice".into();
    let other_file = d.join("other-alice.json");
    std::fs::write(&other_file, other.to_string()).unwrap();
    fails(
        d,
        &["user", "load", other_file.to_str().unwrap()],
        None,
        "already exists",
    );
    let bad = d.join("bad.json");
    std::fs::write(&bad, "{\"format\": \"chipsite.user.v1\", \"chip_id\": 7}").unwrap();
    fails(d, &["user", "load", bad.to_str().unwrap()], None, "bad user dump");
    fails(
        d,
        &["user", "load", d.join("missing.json").to_str().unwrap()],
        None,
        "missing.json",
    );
    let moved = dumped.replace("\"alice\"", "\"alice2\"");
    let r = chipsctl(d, &["user", "load", "-"], Some(&moved));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "loaded user alice2\n");

    // Lockdown of a user and of the site.
    assert!(ok(d, &["user", "lock", "alice"]).contains("user alice LOCKED DOWN"));
    assert!(
        json(&ok(d, &["--json", "user", "show", "alice"]))["locked"]
            .as_bool()
            .unwrap()
    );
    fails(d, &["ticket", "issue", "alice"], None, "locked down");
    assert!(ok(d, &["user", "unlock", "alice"]).contains("user alice open"));
    assert_eq!(ok(d, &["site", "lock"]), "site LOCKED DOWN\n");
    assert_eq!(ok(d, &["site", "status"]), "site LOCKED DOWN\n");
    assert_eq!(ok(d, &["site", "unlock"]), "site open\n");
    fails(d, &["user", "lock", "nobody"], None, "not found");

    // Tickets.
    let svg = d.join("qr.svg");
    let t = ok(
        d,
        &["ticket", "issue", "alice", "--qr", "--svg", svg.to_str().unwrap()],
    );
    assert!(t.contains("chipsite:user?") && t.contains('█'), "{t}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    let t = json(&ok(d, &["--json", "ticket", "issue", "alice", "--ttl", "600"]));
    let id = t["ticket_id"].as_str().unwrap().to_owned();
    assert!(t["ticket"]["token"].as_str().unwrap().len() >= 43);
    assert!(t["ticket"].get("chip_id").is_none() && t["ticket"].get("expires").is_none());
    let listed = json(&ok(d, &["--json", "ticket", "list", "--user", "alice"]));
    assert_eq!(listed["tickets"].as_array().unwrap().len(), 2);
    assert_eq!(ok(d, &["ticket", "revoke", &id]), format!("revoked {id}\n"));
    fails(d, &["ticket", "revoke", &id], None, "already revoked");
    fails(d, &["ticket", "revoke", "tkt_nope"], None, "not found");
    fails(d, &["ticket", "issue", "bob"], None, "suspended");
    assert!(ok(d, &["ticket", "list", "--all"]).contains("revoked"));
    // An operator's console sign-in link is listed as one, for no user.
    ok(d, &["console", "link"]);
    let listed = json(&ok(d, &["--json", "ticket", "list"]));
    let console: Vec<_> = listed["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "console")
        .collect();
    assert!(
        !console.is_empty() && console.iter().all(|t| t["chip_id"] == ""),
        "{listed}"
    );
    assert!(
        listed["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["kind"] != "unknown"),
        "{listed}"
    );

    // Site key.
    assert!(ok(d, &["key", "status"]).starts_with("site key unsealed"));
    let exported = d.join("site-key.pem");
    // Export asks for the current pass phrase.
    fails(
        d,
        &["key", "export", "-o", exported.to_str().unwrap()],
        Some("not the pass phrase\n"),
        "wrong pass phrase",
    );
    assert!(!exported.exists());
    ok(
        d,
        &[
            "key",
            "export",
            "-o",
            exported.to_str().unwrap(),
            "--passphrase-file",
            pass_arg,
        ],
    );
    assert!(
        std::fs::read_to_string(&exported)
            .unwrap()
            .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    );
    assert!(ok(d, &["key", "seal"]).starts_with("site key SEALED"));
    fails(
        d,
        &["key", "unseal"],
        Some("wrong pass phrase\n"),
        "wrong pass phrase",
    );
    // Typed at a terminal: asked for, and not echoed.
    let (unsealed, screen) = at_terminal(d, &["key", "unseal"], &pass);
    assert!(unsealed, "{screen}");
    assert!(
        screen.contains("site key pass phrase: ") && screen.contains("site key unsealed"),
        "{screen}"
    );
    assert!(
        !screen.contains(pass.as_str()),
        "the pass phrase was echoed: {screen}"
    );
    assert!(ok(d, &["key", "seal"]).starts_with("site key SEALED"));
    assert!(ok(d, &["key", "unseal", "--passphrase-file", pass_arg]).starts_with("site key unsealed"));
    let r = chipsctl(
        d,
        &["key", "passphrase"],
        Some(&format!("{pass}\nnew pass phrase 123\n")),
    );
    assert!(r.ok, "{}", r.stderr);
    fails(
        d,
        &["key", "passphrase", "--passphrase-file", pass_arg],
        Some("whatever it is\n"),
        "wrong pass phrase",
    );
    let before = json(&ok(d, &["--json", "key", "status"]))["site_key_pin"]
        .as_str()
        .unwrap()
        .to_owned();
    // Replacing the key takes the current pass phrase, then the new one.
    fails(
        d,
        &["key", "create"],
        Some("not the current one\na brand new pass phrase\n"),
        "wrong pass phrase",
    );
    let r = chipsctl(
        d,
        &["--json", "key", "create"],
        Some("new pass phrase 123\na brand new pass phrase\n"),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_ne!(json(&r.stdout)["site_key_pin"].as_str().unwrap(), before);
    fails(
        d,
        &["key", "create"],
        Some("a brand new pass phrase\nshort\n"),
        "at least 12 characters",
    );
    fails(
        d,
        &["key", "create"],
        Some("a brand new pass phrase\nPassword123!\n"),
        "well-known",
    );
    fails(d, &["key", "unseal"], Some(""), "no pass phrase");
    // The exported (old) key comes back under its own pass phrase.
    fails(
        d,
        &["key", "import", exported.to_str().unwrap()],
        Some("a brand new pass phrase\nnot the pass phrase\n"),
        "cannot open the key",
    );
    fails(
        d,
        &["key", "import", exported.to_str().unwrap()],
        Some(&format!("not the current one\n{pass}\n")),
        "wrong pass phrase",
    );
    let r = chipsctl(
        d,
        &["--json", "key", "import", exported.to_str().unwrap()],
        Some(&format!("a brand new pass phrase\n{pass}\n")),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(json(&r.stdout)["site_key_pin"].as_str().unwrap(), before);

    // Peer server.
    // A dev site starts its peer server on its first launch.
    assert!(ok(d, &["peer", "status"]).starts_with("peer server running"));
    assert!(ok(d, &["peer", "stop"]).starts_with("peer server stopped"));
    assert!(ok(d, &["peer", "list"]).starts_with("no peer sites yet"));
    // Tallies of a user (two sites and a tally: tests/tests/e2e/tallies.rs).
    assert_eq!(ok(d, &["tally", "list", "bob"]), "bob has no tallies\n");
    assert_eq!(
        json(&ok(d, &["--json", "tally", "list", "bob"])),
        serde_json::json!([])
    );
    let r = chipsctl(d, &["tally", "list", "Not A CHIP ID"], None);
    assert!(!r.ok && r.stderr.contains("CHIP ID"), "{}", r.stderr);
    assert_eq!(json(&ok(d, &["--json", "peer", "list"])), serde_json::json!([]));
    fails(
        d,
        &["peer", "start"],
        Some("not it at all\n"),
        "wrong pass phrase",
    );
    let r = chipsctl(d, &["peer", "start"], Some(&format!("{pass}\n")));
    assert!(
        r.ok && r.stdout.starts_with("peer server running"),
        "{}",
        r.stderr
    );
    assert!(ok(d, &["peer", "stop"]).starts_with("peer server stopped"));

    // Configuration.
    assert!(ok(d, &["config", "show"]).contains("ticket.ttl_seconds = 86400"));
    let c = json(&ok(
        d,
        &[
            "--json",
            "config",
            "set",
            "ticket.ttl_seconds=3600",
            "site.name=Example",
        ],
    ));
    assert_eq!(c["site.name"], "Example");
    fails(
        d,
        &["config", "set", "ticket.ttl_seconds=1"],
        None,
        "from 60 to 2592000",
    );
    fails(d, &["config", "set", "nonsense"], None, "is not key=value");
    fails(
        d,
        &["config", "set", "no.such=1"],
        None,
        "unknown configuration key",
    );
    let reset = ok(d, &["config", "reset", "site.name"]);
    assert!(reset.contains("site.name = chipsite\n"), "{reset}");
    assert!(reset.contains("ticket.ttl_seconds = 3600  (changed)"), "{reset}");
    let smtp = ok(
        d,
        &["config", "set", "alarm.smtp_url=smtp://mailer:hunter2@relay:25"],
    );
    assert!(
        smtp.contains("alarm.smtp_url = smtp://mailer:****@relay:25  (changed)") && !smtp.contains("hunter2"),
        "{smtp}"
    );

    // Who did what: --operator (or $USER) is named in the audit.
    ok(d, &["--operator", "bob", "config", "set", "site.name=Bob's"]);
    fails(
        d,
        &["--operator", "two words", "config", "show"],
        None,
        "--operator must be",
    );
    let as_user = Command::new(env!("CARGO_BIN_EXE_chipsctl"))
        .arg("--data-dir")
        .arg(d)
        .args(["config", "reset", "site.name"])
        .env("USER", "carol")
        .env_remove("CHIPSCTL_OPERATOR")
        .output()
        .unwrap();
    assert!(
        as_user.status.success(),
        "{}",
        String::from_utf8_lossy(&as_user.stderr)
    );
    let named = json(&ok(d, &["--json", "audit", "--limit", "5"]));
    let actors: Vec<&str> = named["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "update_site_config")
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(
        actors[..2],
        ["admin-client (carol)", "admin-client (bob)"],
        "{named}"
    );
    // The next page goes on where this one stopped.
    let token = named["next_page_token"].as_str().unwrap().to_owned();
    let older = json(&ok(
        d,
        &["--json", "audit", "--limit", "5", "--page-token", &token],
    ));
    let (a, b) = (&named["entries"][4], &older["entries"][0]);
    assert!(a["at_ms"].as_i64() >= b["at_ms"].as_i64(), "{a} then {b}");
    assert_ne!((&a["source"], &a["id"]), (&b["source"], &b["id"]));

    // Audit.
    let audit = ok(d, &["audit", "--limit", "500"]);
    for action in [
        "create_user",
        "load_user",
        "lockdown",
        "issue_user_ticket",
        "revoke_ticket",
        "seal_vault",
        "unseal_vault",
        "change_passphrase",
        "create_site_key",
        "export_site_key",
        "import_site_key",
        "start_peer_server",
        "stop_peer_server",
        "update_site_config",
        "dump_user",
        "update_user",
    ] {
        assert!(audit.contains(action), "{action} missing from the audit log");
    }
    let entries = json(&ok(d, &["--json", "audit", "--source", "ticket"]));
    assert!(
        entries["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"] == "revoked")
    );
    assert!(!audit.contains(pass.as_str()), "no pass phrase in the audit log");

    // Alarms: raised for a user (who has no session: it waits for e-mail
    // or text), listed; a user that does not exist is a clear line.
    let raised = json(&ok(
        d,
        &["--json", "alarm", "raise", "alice", "Please call the office"],
    ));
    assert_eq!(raised["chip_id"], "alice");
    let listed = ok(d, &["alarm", "list", "alice"]);
    assert!(listed.contains("Please call the office"), "{listed}");
    let listed = json(&ok(d, &["--json", "alarm", "list", "alice"]));
    assert_eq!(listed["alarms"][0]["id"], raised["id"]);
    fails(d, &["alarm", "raise", "nobody", "hi"], None, "not found");
    fails(
        d,
        &["alarm", "raise", "alice", "hi", "--kind", "Bad Kind"],
        None,
        "kind",
    );
    assert!(ok(d, &["audit"]).contains("raise_alarms"));

    // The site is gone: a clear line, not a hang.
    site.finish().await;
    fails(d, &["user", "list"], None, "no dev site found");
}

#[test]
fn an_unreachable_admin_service_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chipsite_site::dev::ensure_pki(d, "test").unwrap();
    let certs = chipsite_site::dev::cert_paths(d, "admin-client");
    let r = Command::new(env!("CARGO_BIN_EXE_chipsctl"))
        .args(["--admin", "127.0.0.1:9", "--cert"])
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key)
        .arg("--ca")
        .arg(&certs.ca)
        .args(["user", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        stderr.starts_with("chipsctl: error: cannot reach the admin service at 127.0.0.1:9"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
}

/// The help says what the commands require (issue 16): `user create` needs
/// `--name` (a missing one is refused in one line, `every_admin_command_…`),
/// and `ticket issue` states its lifetime's range and that a locked-down
/// user gets no ticket.
#[test]
fn the_help_says_what_commands_require() {
    let run = |args: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_chipsctl"))
            .args(args)
            .output()
            .unwrap();
        (
            r.status.success(),
            String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr),
        )
    };
    let (ok, help) = run(&["user", "create", "--help"]);
    assert!(ok, "{help}");
    assert!(
        help.lines()
            .any(|l| l.trim_start().starts_with("--name <NAME>") && l.contains("(required)")),
        "{help}"
    );
    let (ok, help) = run(&["ticket", "issue", "--help"]);
    assert!(ok, "{help}");
    assert!(
        help.contains("2592000 (30 days)") && help.contains("locked down"),
        "{help}"
    );
}
