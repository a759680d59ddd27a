//! What the controller's integration tests share: the binary, temporary state directories,
//! admin commands, and `serve` run as a process that is killed when dropped.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-controller");

/// A controller key file's contents (base64 of 32 zero bytes).
pub const A_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
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

pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `mesh-controller serve` (or `relay`) on loopback, killed (by its pid) when dropped, also
/// when the test fails.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(dir: &Path, log_name: &str) -> Daemon {
        let args = ["serve", "--listen", "127.0.0.1:0", "--listen-tcp", "off"];
        Daemon::spawn_with(&args, &["--observer-listen", "off"], dir, log_name)
    }

    /// `mesh-controller ARGS MORE --state-dir DIR`, logging to a file beside DIR.
    pub fn spawn_with(args: &[&str], more: &[&str], dir: &Path, log_name: &str) -> Daemon {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it listens (it has written the address it bound), or panics with its log.
    pub fn wait_listening(&mut self, dir: &Path) -> String {
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
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let out = Command::new("kill").args(["-TERM", &pid]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(status.is_some(), "serve did not stop:\n{}", self.log());
    }

    /// Waits (bounded) for it to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
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
pub fn serving(label: &str) -> (Daemon, String, PathBuf, TempDir) {
    let tmp = TempDir::new(label);
    let dir = tmp.0.join("state");
    let mut serve = Daemon::spawn(&dir, "serve");
    let addr = serve.wait_listening(&dir);
    (serve, addr, dir, tmp)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `mesh-controller ARGS` and expects success.
pub fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = ctl(dir, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// Runs `mesh-controller ARGS`, expects failure, and returns what it said on stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = ctl(dir, args);
    assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
    stderr(&out)
}

/// A state directory with a controller key that has never served: enough for admin commands.
pub fn unserved(label: &str) -> (PathBuf, TempDir) {
    let tmp = TempDir::new(label);
    let dir = tmp.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("controller.key"), A_KEY).unwrap();
    (dir, tmp)
}
