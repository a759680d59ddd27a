//! Processes inside network namespaces: daemons ([`Proc`]) and one-shot commands ([`run`]).
//!
//! Both go through `ip netns exec NS BIN ARGS`, which enters the namespace and then `exec`s the
//! program, so the PID we hold is the program's own and signals reach it directly.

use crate::wait_for;
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a one-shot command may run before [`run`] kills it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Proc::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// What a one-shot command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when the command could not be started.
    pub status: Option<ExitStatus>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// The command ran past its timeout and was killed.
    pub timed_out: bool,
    /// Wall time from start to exit.
    pub elapsed: Duration,
}

impl Output {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// The exit code, if it exited (not killed by a signal, not timed out).
    pub fn code(&self) -> Option<i32> {
        if self.timed_out {
            return None;
        }
        self.status.and_then(|s| s.code())
    }

    /// `Ok(self)` when it succeeded, else an error that shows everything.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow::anyhow!("command failed: {self}"))
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {} after {:.1?}",
            self.command,
            describe_status(self.status, self.timed_out),
            self.elapsed
        )?;
        write!(f, "\n  stdout: {}", indent(&self.stdout))?;
        write!(f, "\n  stderr: {}", indent(&self.stderr))
    }
}

fn indent(s: &str) -> String {
    if s.trim().is_empty() {
        return "(empty)".into();
    }
    s.trim_end().replace('\n', "\n          ")
}

/// "exit 1", "killed by signal 9", "timed out", "not started".
pub fn describe_status(status: Option<ExitStatus>, timed_out: bool) -> String {
    match status {
        _ if timed_out => "timed out (killed)".into(),
        None => "not started".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("{s}"),
        },
    }
}

fn netns_command<I, S>(ns: &str, bin: &OsStr, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(bin).args(args);
    cmd.stdin(Stdio::null());
    cmd
}

fn command_line(ns: &str, bin: &OsStr, args: &[OsString]) -> String {
    let name = Path::new(bin)
        .file_name()
        .unwrap_or(bin)
        .to_string_lossy()
        .into_owned();
    let mut s = format!("[{ns}] {name}");
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `bin args` inside namespace `ns`, waits for it (at most [`RUN_TIMEOUT`]) and returns what
/// it printed. `RUST_LOG` and `MESH_LOG` are removed from its environment so that the CLI is seen
/// as a user sees it.
pub fn run<I, S>(ns: &str, bin: impl AsRef<OsStr>, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_timeout(ns, bin, args, RUN_TIMEOUT)
}

/// [`run`] with its own timeout.
pub fn run_with_timeout<I, S>(
    ns: &str,
    bin: impl AsRef<OsStr>,
    args: I,
    timeout: Duration,
) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = bin.as_ref();
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = command_line(ns, bin, &args);
    let mut cmd = netns_command(ns, bin, &args);
    cmd.env_remove("RUST_LOG")
        .env_remove("MESH_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Output {
                command,
                status: None,
                stdout: String::new(),
                stderr: format!("cannot start `ip netns exec`: {e}"),
                timed_out: false,
                elapsed: start.elapsed(),
            }
        }
    };
    let stdout = child
        .stdout
        .take()
        .map(|s| thread::spawn(move || read_all(s)));
    let stderr = child
        .stderr
        .take()
        .map(|s| thread::spawn(move || read_all(s)));
    let mut timed_out = false;
    let deadline = start + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Err(_) => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    let elapsed = start.elapsed();
    let join = |h: Option<thread::JoinHandle<String>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    Output {
        command,
        status,
        stdout: join(stdout),
        stderr: join(stderr),
        timed_out,
        elapsed,
    }
}

fn read_all(mut r: impl Read) -> String {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends `signal` to `pid`. Returns false if the process does not exist.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes two integers and reads or writes no memory of this process.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// A long-running process in a namespace (a daemon), with its stdout and stderr in log files.
///
/// Dropping it stops it ([`Proc::stop`]): SIGTERM, then SIGKILL after [`STOP_GRACE`].
pub struct Proc {
    label: String,
    command: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
}

impl Proc {
    /// Starts `bin args` in namespace `ns`; logs go to `log_dir/<label>.{stdout,stderr}.log`
    /// (the label gets a suffix if those files exist already).
    ///
    /// `RUST_BACKTRACE=1` is set; the log filter (`MESH_LOG`) comes from the caller's environment.
    pub fn spawn<I, S>(
        ns: &str,
        log_dir: &Path,
        label: &str,
        bin: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let bin = bin.as_ref();
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        fs::create_dir_all(log_dir)
            .with_context(|| format!("creating log dir {}", log_dir.display()))?;
        let label = unique_label(log_dir, label);
        let stdout_log = log_dir.join(format!("{label}.stdout.log"));
        let stderr_log = log_dir.join(format!("{label}.stderr.log"));
        let out = File::create(&stdout_log)
            .with_context(|| format!("creating {}", stdout_log.display()))?;
        let err = File::create(&stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        let command = command_line(ns, bin, &args);
        fs::write(log_dir.join(format!("{label}.cmd")), format!("{command}\n"))
            .with_context(|| format!("writing command of {label}"))?;
        let mut cmd = netns_command(ns, bin, &args);
        cmd.stdout(out).stderr(err).env("RUST_BACKTRACE", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{command}`"))?;
        Ok(Proc {
            label,
            command,
            child,
            status: None,
            stdout_log,
            stderr_log,
        })
    }

    /// The label its log files are named after.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The command line.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited (and reaps it), `None` while it runs.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    /// Still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.try_status())
    }

    /// Sends it `signal` if it still runs. Returns whether the signal was sent.
    pub fn signal(&mut self, signal: libc::c_int) -> bool {
        // Not reaped yet, so the PID cannot have been reused.
        self.is_running() && send_signal(self.pid(), signal)
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; reaps it. Returns its exit status
    /// (`signal() == Some(9)` means it ignored SIGTERM).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(STOP_GRACE)
    }

    /// [`Proc::stop`] with another grace time.
    pub fn stop_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.signal(libc::SIGTERM) {
            if let Some(s) = self.wait_exit(grace) {
                return Some(s);
            }
        }
        self.kill9()
    }

    /// SIGKILL now; reaps it.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// What it wrote on stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_log)
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_log)
    }

    /// Command line, status, stdout and stderr, for failure messages.
    pub fn log(&mut self) -> String {
        let status = describe_status(self.try_status(), false);
        let status = if self.status.is_none() {
            "running".to_string()
        } else {
            status
        };
        format!(
            "--- {} ({status}): {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.label,
            self.command,
            tail(&self.stdout(), 200),
            tail(&self.stderr(), 200)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish()
    }
}

fn unique_label(dir: &Path, label: &str) -> String {
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let taken = |l: &str| dir.join(format!("{l}.cmd")).exists();
    if !taken(&label) {
        return label;
    }
    (2..)
        .map(|n| format!("{label}-{n}"))
        .find(|l| !taken(l))
        .unwrap_or(label)
}

pub(crate) fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `s`, with a note of how many were cut.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= n {
        return s.trim_end().to_string();
    }
    format!(
        "[... {} earlier lines cut ...]\n{}",
        lines.len() - n,
        lines[lines.len() - n..].join("\n")
    )
}
