//! End-to-end test harness of mesh: real `mesh` and `mesh-controller` binaries in network
//! namespaces on a private L2 network.
//!
//! - [`Lab`]: a switch namespace with a bridge and hosts on it (192.0.2.0/24); [`Netns`] is one
//!   namespace, deleted with everything in it on drop.
//! - [`Proc`]: a daemon in a namespace with its output in log files; [`run`]: a one-shot command
//!   with a timeout.
//! - [`Controller`] and [`Agent`]: the product's daemons, started and polled until ready.
//! - [`wait_until`] / [`wait_for`]: poll a condition against a deadline; the tests never sleep to
//!   wait for readiness.
//!
//! Binaries come from `$MESH_BIN_DIR`, else `<workspace>/target/debug`: run `cargo build --bins`
//! before `cargo test -p mesh-e2e`. The tests need root (namespaces, TUN) and `ip`, `ping`, `ss`.
//! Set `MESH_E2E_KEEP=1` to keep each lab's temp dir (state dirs and logs).

pub mod cni;
pub mod daemons;
pub mod natlab;
pub mod netns;
pub mod process;

pub use daemons::{wait_all_pairs_ping, Agent, Controller, AGENT_PORT, CONTROL_PORT};
pub use netns::{Host, Lab, Netns};
pub use process::{run, run_with_timeout, Output, Proc};

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Interval between two checks of a polled condition.
pub const POLL: Duration = Duration::from_millis(100);
/// Timeout of one `ping -c 1 -W 1` run.
pub const RUN_TIMEOUT_PING: Duration = Duration::from_secs(5);

/// Polls `f` every [`POLL`] until it returns true (→ true) or `timeout` passes (→ false). `f` is
/// called at least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || f().then_some(())).is_some()
}

/// Polls `f` every [`POLL`] until it returns `Some` or `timeout` passes (→ `None`).
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(POLL.min(deadline - now));
    }
}

/// Where the product binaries are: `$MESH_BIN_DIR`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("MESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest
                .parent()
                .unwrap_or(manifest)
                .join("target")
                .join("debug")
        }
    }
}

fn product_bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: run `cargo build --bins` first (or point MESH_BIN_DIR at the directory \
             holding `mesh` and `mesh-controller`)",
            p.display()
        );
    }
    Ok(p)
}

/// Path of the agent binary `mesh`.
pub fn mesh_bin() -> Result<PathBuf> {
    product_bin("mesh")
}

/// Path of the controller binary `mesh-controller`.
pub fn controller_bin() -> Result<PathBuf> {
    product_bin("mesh-controller")
}

/// Fetches `http://127.0.0.1:<port>/metrics` from inside namespace `ns` (with python3, which the
/// test set-up installs); `None` if nothing answered.
pub fn scrape_metrics(ns: &str, port: u16) -> Option<String> {
    let script = format!(
        "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    );
    let out = run(ns, "python3", ["-c", script.as_str()]);
    out.success().then_some(out.stdout)
}

/// The value of the first sample in a Prometheus text exposition whose line starts with
/// `prefix` (a metric name, optionally with labels).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Asserts that a command failed the way a user should see it fail: it exited by itself with a
/// non-zero code, wrote exactly one non-empty line on stderr and no panic, and that line contains
/// (case-insensitively) one of `any_of`. Returns the line.
pub fn assert_clean_failure(out: &Output, any_of: &[&str]) -> String {
    assert!(
        !out.timed_out,
        "expected a quick failure, but the command was still running after {:?}: {out}",
        out.elapsed
    );
    match out.code() {
        Some(0) => panic!("expected a failure, but it succeeded: {out}"),
        None => panic!("expected a non-zero exit, but it did not exit by itself: {out}"),
        Some(_) => {}
    }
    assert!(
        !out.stderr.contains("panicked"),
        "the command panicked: {out}"
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {out}");
    let line = lines[0].to_string();
    let lower = line.to_lowercase();
    assert!(
        any_of.iter().any(|w| lower.contains(&w.to_lowercase())),
        "the error line should mention one of {any_of:?}: {line:?} ({out})"
    );
    line
}

/// TCP throughput in Mbit/s (receiver side) of `iperf3 -c to_ip` from `from` for `secs`
/// seconds, against a one-shot server started in `to` on `port`; `None` when either side
/// failed (the output is in the lab's command log).
pub fn iperf3(from: &Host, to: &Host, to_ip: &str, port: u16, secs: u32) -> Option<f64> {
    let port = port.to_string();
    let server = run_with_timeout(
        &to.ns,
        "iperf3",
        ["-s", "-1", "-D", "-p", port.as_str()],
        Duration::from_secs(5),
    );
    if !server.success() {
        return None;
    }
    thread::sleep(Duration::from_millis(300));
    let secs_arg = secs.to_string();
    let out = run_with_timeout(
        &from.ns,
        "iperf3",
        [
            "-c",
            to_ip,
            "-p",
            port.as_str(),
            "-t",
            secs_arg.as_str(),
            "-J",
        ],
        Duration::from_secs(u64::from(secs) + 20),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
}
