//! The administrator's side of subnet routes, on the real binary: the networks' auto-approve
//! prefixes and the route list, approve and reject commands. Real processes, traffic on
//! loopback only. (Routes themselves are advertised by nodes over the wire; the store's unit
//! tests cover their rules.)

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
            "mesh-routes-{label}-{}-{}",
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

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `mesh-controller ARGS` and expects success.
fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = ctl(dir, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// Runs `mesh-controller ARGS`, expects failure, and returns what it said on stderr.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = ctl(dir, args);
    assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
    stderr(&out)
}

/// A state directory with a controller key that has never served: enough for admin commands.
fn unserved(label: &str) -> (PathBuf, TempDir) {
    let tmp = TempDir::new(label);
    let dir = tmp.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("controller.key"), A_KEY).unwrap();
    (dir, tmp)
}

/// A `mesh-controller serve` on loopback, killed (by its pid) when dropped, also when the test
/// fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// `serve` on a loopback port the kernel picks, without TCP or STUN; returns once it
    /// listens (it has written the address it bound), or panics with its log.
    fn serving(dir: &Path) -> Daemon {
        let log = dir.with_extension("serve.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--listen-tcp", "off"])
            .args(["--observer-listen", "off"])
            .arg("--state-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "serve exited ({status}) before listening:\n{}",
                    daemon.log()
                );
            }
            if let Ok(addr) = std::fs::read_to_string(dir.join("listen.addr")) {
                if !addr.trim().ends_with(":0") {
                    return daemon;
                }
            }
            assert!(
                Instant::now() < deadline,
                "serve not listening after 30 s:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `network list --json`, the entry of network `name`.
fn listed(dir: &Path, name: &str) -> serde_json::Value {
    let json: Vec<serde_json::Value> =
        serde_json::from_slice(&ok(dir, &["network", "list", "--json"]).stdout).unwrap();
    json.into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no network {name} listed"))
}

#[test]
fn auto_approve_routes_are_set_at_creation_changed_and_listed() {
    let tmp = TempDir::new("policy");
    let dir = tmp.0.join("state");
    let _serve = Daemon::serving(&dir);
    let out = ok(
        &dir,
        &[
            "network",
            "create",
            "prod",
            "--auto-approve-routes",
            "10.245.0.0/16,10.244.0.0/16",
        ],
    );
    assert!(
        stderr(&out).contains(
            "subnet routes inside 10.244.0.0/16,10.245.0.0/16 are approved automatically"
        ),
        "{}",
        text(&out)
    );
    ok(
        &dir,
        &["network", "create", "dev", "--cidr", "100.65.0.0/24"],
    );
    let prod = listed(&dir, "prod");
    assert_eq!(
        prod["auto_approve_routes"],
        serde_json::json!(["10.244.0.0/16", "10.245.0.0/16"])
    );
    assert!(prod["id"].is_string(), "{prod}");
    assert_eq!(
        listed(&dir, "dev")["auto_approve_routes"],
        serde_json::json!([])
    );
    let list = stdout(&ok(&dir, &["network", "list"]));
    assert!(
        list.lines()
            .next()
            .unwrap()
            .contains(" AUTO-APPROVE ROUTES "),
        "{list}"
    );
    let row = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {list}"))
            .split_whitespace()
            .nth(5)
            .unwrap()
            .to_owned()
    };
    assert_eq!(row("prod"), "10.244.0.0/16,10.245.0.0/16");
    assert_eq!(row("dev"), "-");
    // Changed, then back to none.
    let out = ok(
        &dir,
        &[
            "network",
            "set",
            "dev",
            "--auto-approve-routes",
            "10.0.0.0/8",
        ],
    );
    assert!(
        stdout(&out)
            .contains("network dev: subnet routes inside 10.0.0.0/8 are approved automatically"),
        "{}",
        text(&out)
    );
    assert_eq!(
        listed(&dir, "dev")["auto_approve_routes"],
        serde_json::json!(["10.0.0.0/8"])
    );
    let out = ok(
        &dir,
        &["network", "set", "prod", "--auto-approve-routes", "none"],
    );
    assert!(
        stdout(&out).contains(
            "network prod: the administrator approves each subnet route (`mesh-controller route approve prod PREFIX`)"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(
        listed(&dir, "prod")["auto_approve_routes"],
        serde_json::json!([])
    );
    let e = fails(&dir, &["network", "set", "prod"]);
    assert!(e.contains("--auto-approve-routes PREFIX,...|none"), "{e}");
    let e = fails(
        &dir,
        &["network", "set", "nope", "--auto-approve-routes", "none"],
    );
    assert!(e.contains("no network named \"nope\""), "{e}");
}

#[test]
fn bad_prefixes_in_flags_are_refused_with_what_to_type() {
    let (dir, _tmp) = unserved("flags");
    let create = |value: &str| {
        fails(
            &dir,
            &["network", "create", "prod", "--auto-approve-routes", value],
        )
    };
    let e = create("10.244.1.0/33");
    assert!(
        e.contains("10.244.1.0/33 is not an IPv4 prefix (expected e.g. 10.244.0.0/16)"),
        "{e}"
    );
    let e = create("10.244.1.0/16");
    assert!(
        e.contains("10.244.1.0/16 has host bits set; did you mean 10.244.0.0/16?"),
        "{e}"
    );
    let e = create("10.244.0.0/16,pods");
    assert!(e.contains("pods is not an IPv4 prefix"), "{e}");
    let json = stdout(&ok(&dir, &["network", "list", "--json"]));
    assert_eq!(json.trim(), "[]", "no network was created");
    ok(&dir, &["network", "create", "prod"]);
    let e = fails(
        &dir,
        &[
            "network",
            "set",
            "prod",
            "--auto-approve-routes",
            "10.244.1.7/24",
        ],
    );
    assert!(e.contains("did you mean 10.244.1.0/24?"), "{e}");
    assert_eq!(
        listed(&dir, "prod")["auto_approve_routes"],
        serde_json::json!([])
    );
}

#[test]
fn a_network_without_routes_lists_none_and_says_where_to_look() {
    let (dir, _tmp) = unserved("empty");
    ok(&dir, &["network", "create", "prod"]);
    let out = ok(&dir, &["route", "list", "prod", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    let out = ok(&dir, &["route", "list", "prod"]);
    assert!(stdout(&out).is_empty(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no routes advertised in prod"),
        "{}",
        text(&out)
    );
    let e = fails(&dir, &["route", "list", "nope"]);
    assert!(
        e.contains("no network named \"nope\" (see `mesh-controller network list`)"),
        "{e}"
    );
    let see = "see `mesh-controller route list prod`";
    for verb in ["approve", "reject"] {
        let e = fails(&dir, &["route", verb, "prod", "10.244.1.0/24"]);
        assert!(
            e.contains(&format!(
                "no node advertises 10.244.1.0/24 in network \"prod\"; {see}"
            )),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "node-b"]);
        assert!(
            e.contains(&format!(
                "no route or node with routes matches \"node-b\" in network \"prod\"; {see}"
            )),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "10.244.1.0/33"]);
        assert!(
            e.contains("10.244.1.0/33 is not an IPv4 prefix (expected e.g. 10.244.0.0/16)"),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "--all"]);
        assert!(
            e.contains(&format!(
                "no pending routes in network \"prod\" to {verb}; {see}"
            )),
            "{e}"
        );
        // Prefixes and nodes, or --all: exactly one of them.
        let e = fails(&dir, &["route", verb, "prod"]);
        assert!(e.contains("--all"), "{e}");
        let e = fails(&dir, &["route", verb, "prod", "node-b", "--all"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = fails(&dir, &["route", verb, "nope", "--all"]);
        assert!(e.contains("no network named \"nope\""), "{e}");
    }
}
