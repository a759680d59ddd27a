//! The controller binary over its life on one machine: who owns a state directory, what admin
//! commands need, backups. Real processes, traffic on loopback only.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-controller");

/// A controller key file's contents (base64 of 32 zero bytes).
const A_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mesh-ctl-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `mesh-controller serve` (or `relay`) on loopback, killed (by its pid) when dropped, also
/// when the test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(dir: &Path, log_name: &str) -> Daemon {
        let args = ["serve", "--listen", "127.0.0.1:0", "--listen-tcp", "off"];
        Daemon::spawn_with(&args, &["--observer-listen", "off"], dir, log_name)
    }

    /// `mesh-controller ARGS MORE --state-dir DIR`, logging to a file beside DIR.
    fn spawn_with(args: &[&str], more: &[&str], dir: &Path, log_name: &str) -> Daemon {
        let log = dir.with_extension(format!("{log_name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .args(more)
            .arg("--state-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it listens (it has written the address it bound), or panics with its log.
    fn wait_listening(&mut self, dir: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("serve exited ({status}) before listening:\n{}", self.log());
            }
            if let Ok(addr) = std::fs::read_to_string(dir.join("listen.addr")) {
                if !addr.trim().ends_with(":0") {
                    return addr.trim().to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "serve not listening after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as systemd stops it, and waits for it to exit.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let out = Command::new("kill").args(["-TERM", &pid]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(status.is_some(), "serve did not stop:\n{}", self.log());
    }

    /// Waits (bounded) for it to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A `serve` listening in a new state directory: it, the address it listens on, the directory,
/// and the temporary directory around it (removed after the `serve` is killed).
fn serving(label: &str) -> (Daemon, String, PathBuf, TempDir) {
    let tmp = TempDir::new(label);
    let dir = tmp.0.join("state");
    let mut serve = Daemon::spawn(&dir, "serve");
    let addr = serve.wait_listening(&dir);
    (serve, addr, dir, tmp)
}

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
