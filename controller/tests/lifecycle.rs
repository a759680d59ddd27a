//! The controller binary over its life on one machine: who owns a state directory, what admin
//! commands need, backups. Real processes, traffic on loopback only.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ctl, serving, text, Daemon, TempDir, A_KEY, BIN};

#[test]
fn a_second_serve_on_one_state_directory_is_refused() {
    let (mut first, addr, dir, _tmp) = serving("two-serves");
    assert!(
        first
            .log()
            .contains(&format!("created a new controller in {}", dir.display())),
        "{}",
        first.log()
    );
    let mut second = Daemon::spawn(&dir, "second");
    let status = second.wait_exit(Duration::from_secs(30));
    let log = second.log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second serve did not exit with an error ({status:?}):\n{log}"
    );
    let expected = format!(
        "a controller already runs for state directory {} (pid {})",
        dir.display(),
        first.child.id()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the first serve stopped:\n{}",
        first.log()
    );
    let now = std::fs::read_to_string(dir.join("listen.addr")).unwrap();
    assert_eq!(now.trim(), addr, "listen.addr was overwritten");
    // Admin commands share the directory with the running `serve`.
    let out = ctl(
        &dir,
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn admin_commands_without_a_controller_are_refused_and_create_nothing() {
    let tmp = TempDir::new("no-controller");
    let empty = tmp.0.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let typo = tmp.0.join("typo");
    let commands: &[&[&str]] = &[
        &["key"],
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
        &["network", "set", "prod", "--birthday-budget", "1"],
        &["network", "list"],
        &["token", "create", "prod", "--controller", "192.0.2.1:7443"],
        &["token", "list"],
        &["token", "revoke", "abcd"],
        &["node", "list", "prod"],
        &["node", "remove", "prod", "web"],
        &["region", "list"],
        &["region", "remove", "eu-1"],
        &["backup", "/nonexistent/backup.db"],
    ];
    for dir in [&empty, &typo] {
        for args in commands {
            let out = ctl(dir, args);
            let err = String::from_utf8_lossy(&out.stderr);
            let expected = format!(
                "no controller in {d}: start one with `mesh-controller serve --state-dir {d}`, or pass the right --state-dir",
                d = dir.display()
            );
            assert!(
                !out.status.success() && err.contains(&expected),
                "{args:?}: {}",
                text(&out)
            );
        }
    }
    assert!(!typo.exists(), "a mistyped directory was created");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "files created"
    );
}

#[test]
fn a_database_without_its_key_is_not_given_a_new_identity() {
    let (serve, _, dir, _tmp) = serving("lost-key");
    drop(serve);
    std::fs::remove_file(dir.join("controller.key")).unwrap();
    let out = ctl(&dir, &["network", "list"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restore controller.key"),
        "{}",
        text(&out)
    );
    let mut again = Daemon::spawn(&dir, "again");
    let status = again.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{}", again.log());
    assert!(
        again.log().contains("restore controller.key"),
        "{}",
        again.log()
    );
    assert!(!dir.join("controller.key").exists());
}

/// `serve` and many admin commands started at the same moment on a new database: one of them
/// creates the schema, the others wait for it (before, the losers failed with "duplicate
/// column name").
#[test]
fn processes_opening_a_new_database_at_once_all_succeed() {
    let tmp = TempDir::new("migrate");
    let dir = tmp.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    // A controller whose key exists but whose database does not yet.
    std::fs::write(dir.join("controller.key"), A_KEY).unwrap();
    let admins: Vec<Child> = (0..10)
        .map(|_| {
            Command::new(BIN)
                .args(["network", "list", "--state-dir"])
                .arg(&dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut serve = Daemon::spawn(&dir, "serve");
    for child in admins {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    serve.wait_listening(&dir);
}

/// The quickstart as typed: `serve ... &` on a fresh directory, then at once `network create`
/// and `token create`. The admin commands wait for the controller `serve` is creating.
#[test]
fn the_quickstart_works_typed_as_it_is() {
    let tmp = TempDir::new("quickstart");
    let dir = tmp.0.join("state");
    let mut serve = Daemon::spawn(&dir, "serve");
    let out = ctl(&dir, &["network", "create", "prod"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl(&dir, &["token", "create", "prod"]);
    assert!(out.status.success(), "{}", text(&out));
    serve.wait_listening(&dir);
}

#[test]
fn tokens_say_where_they_point() {
    let (_serve, addr, dir, _tmp) = serving("tokens");
    let out = ctl(
        &dir,
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl(&dir, &["token", "create", "prod"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("mesh1_") && stdout.trim().lines().count() == 1,
        "the token alone on stdout: {}",
        text(&out)
    );
    let expected = format!("dial the controller at {addr} (QUIC/UDP)");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&expected),
        "{}",
        text(&out)
    );
    let out = ctl(
        &dir,
        &[
            "token",
            "create",
            "prod",
            "--controller",
            "192.0.2.1:7443",
            "--controller-tcp",
            "192.0.2.1:443",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("dial the controller at 192.0.2.1:7443 (QUIC/UDP), 192.0.2.1:443 (TCP)"),
        "{}",
        text(&out)
    );
    let out = ctl(&dir, &["token", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines().next().unwrap().ends_with("CONTROLLER"),
        "{list}"
    );
    assert!(list.contains(&format!("{addr} (QUIC/UDP)")), "{list}");
    assert!(list.contains("192.0.2.1:443 (TCP)"), "{list}");
    let out = ctl(&dir, &["token", "list", "--json"]);
    // Both made in the same second: their order is the ids'.
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let explicit = rows
        .iter()
        .find(|r| r["controller"] == "192.0.2.1:7443")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(explicit["controller_tcp"], "192.0.2.1:443");
    assert!(
        rows.iter().any(|r| r["controller"] == addr.as_str()),
        "{rows:?}"
    );
}

#[test]
fn a_backup_taken_while_serving_restores() {
    let (mut serve, _, dir, tmp) = serving("backup");
    let out = ctl(
        &dir,
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let file = tmp.0.join("controller-backup.db");
    let out = ctl(&dir, &["backup", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 networks, 0 nodes"), "{said}");
    assert!(said.contains("controller.key too"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Not over an existing file unless asked.
    let out = ctl(&dir, &["backup", file.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        text(&out)
    );
    let out = ctl(&dir, &["backup", file.to_str().unwrap(), "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    // Restore: stop serve, put the copy in place of controller.db, start again.
    let out = ctl(
        &dir,
        &["network", "create", "later", "--cidr", "100.65.0.0/24"],
    );
    assert!(out.status.success(), "{}", text(&out));
    serve.stop();
    // Files of the replaced database must not be applied to the restored one.
    for side in ["controller.db-wal", "controller.db-shm"] {
        let _ = std::fs::remove_file(dir.join(side));
    }
    std::fs::copy(&file, dir.join("controller.db")).unwrap();
    let mut serve = Daemon::spawn(&dir, "restored");
    serve.wait_listening(&dir);
    let out = ctl(&dir, &["network", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("prod") && !list.contains("later"), "{list}");
}

/// An admin command run just after `serve` started (as in `serve & network create`) waits for
/// the controller `serve` is creating instead of refusing.
#[test]
fn admin_commands_wait_for_a_serve_that_is_starting() {
    let tmp = TempDir::new("starting");
    let dir = tmp.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    // What `serve` holds from its first moments, before it has created the key.
    let _lock = mesh_service::DirLock::acquire(&dir, "controller.lock", "a controller").unwrap();
    let admin = Command::new(BIN)
        .args(["network", "list", "--state-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.join("controller.key"), A_KEY).unwrap();
    let out = admin.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_second_relay_on_one_state_directory_is_refused() {
    let tmp = TempDir::new("two-relays");
    let dir = tmp.0.join("relay");
    let args = ["relay", "--listen", "127.0.0.1:0", "--listen-tcp", "off"];
    let key = ["--controller-key", A_KEY.trim()];
    let mut first = Daemon::spawn_with(&args, &key, &dir, "first");
    // Its pid in the lock file: it holds the directory.
    let pid = first.child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(dir.join("relay.lock")).map_or(true, |p| p.trim() != pid) {
        assert!(first.child.try_wait().unwrap().is_none(), "{}", first.log());
        assert!(Instant::now() < deadline, "{}", first.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = Daemon::spawn_with(&args, &key, &dir, "second");
    let status = second.wait_exit(Duration::from_secs(30));
    let log = second.log();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {log}");
    let expected = format!(
        "a relay already runs for state directory {} (pid {pid})",
        dir.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(first.child.try_wait().unwrap().is_none(), "{}", first.log());
}
