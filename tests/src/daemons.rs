//! The product's two daemons as test objects: [`Controller`] (`mesh-controller serve` plus its
//! admin CLI) and [`Agent`] (`mesh join` / `mesh up` plus its CLI).
//!
//! Readiness is always polled: the controller is ready when its UDP port is bound; an agent is ready when `mesh status --json` succeeds and the address it reports
//! is on its TUN interface.

use crate::netns::{ip, Host, Lab};
use crate::process::{describe_status, run, Output, Proc};
use crate::{controller_bin, mesh_bin, wait_for};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

/// The controller's QUIC port in the tests.
pub const CONTROL_PORT: u16 = 7443;
/// The agents' UDP port (the product's default).
pub const AGENT_PORT: u16 = 51820;
/// How long a daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn record(transcript: &Path, out: &Output) {
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(transcript)
    {
        let _ = writeln!(f, "{out}");
    }
}

fn with_state_dir<I, S>(args: I, state_dir: &Path) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut v: Vec<OsString> = args.into_iter().map(Into::into).collect();
    v.push("--state-dir".into());
    v.push(state_dir.into());
    v
}

/// Whether some UDP socket in `ns` is bound to `port`.
pub fn udp_port_bound(ns: &str, port: u16) -> bool {
    let out = run(ns, "ss", ["-H", "-n", "-u", "-a"]);
    let suffix = format!(":{port}");
    out.success()
        && out.stdout.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|local| local.ends_with(&suffix))
        })
}

/// `mesh-controller serve` in a host of the lab, with its state dir.
#[derive(Debug)]
pub struct Controller {
    /// The host it runs in.
    pub host: Host,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
    /// Its `--listen` address (for a dual-stack one, the host's IPv4 address and the port: it
    /// listens on `[::]`, which includes it).
    pub listen: SocketAddrV4,
    /// `--listen` when it is not [`Controller::listen`] (`[::]:7443` for a dual-stack one).
    listen_wildcard: Option<SocketAddr>,
    /// Extra arguments for every `serve` (e.g. `--announce`).
    pub extra: Vec<String>,
    log_dir: PathBuf,
    transcript: PathBuf,
    proc: Option<Proc>,
}

impl Controller {
    /// Starts `serve` on `host:7443` with state dir `state/<host name>`, and waits until ready.
    pub fn start(lab: &Lab, host: &Host) -> Result<Controller> {
        let state_dir = lab.state_dir(&host.name)?;
        Self::start_with(lab, host, &state_dir, CONTROL_PORT)
    }

    /// Starts `serve` on `host:port` with the given state dir, and waits until ready.
    pub fn start_with(lab: &Lab, host: &Host, state_dir: &Path, port: u16) -> Result<Controller> {
        Self::start_with_args(lab, host, state_dir, port, &[])
    }

    /// [`Controller::start_with`], with extra arguments for `serve`.
    pub fn start_with_args(
        lab: &Lab,
        host: &Host,
        state_dir: &Path,
        port: u16,
        extra: &[&str],
    ) -> Result<Controller> {
        let mut c = Controller {
            host: host.clone(),
            state_dir: state_dir.to_path_buf(),
            listen: SocketAddrV4::new(host.ip, port),
            listen_wildcard: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            log_dir: lab.log_dir(),
            transcript: lab.transcript(),
            proc: None,
        };
        c.serve()?;
        Ok(c)
    }

    /// Starts `serve --listen [::]:7443` (one socket for both families) in `host` with state
    /// dir `state/<host name>`, announcing `announce` (`--announce`, so that tokens name those
    /// addresses, tried in turn by the agents), and waits until ready.
    pub fn start_dual_stack(lab: &Lab, host: &Host, announce: &[SocketAddr]) -> Result<Controller> {
        let announce: Vec<String> = announce.iter().map(|a| a.to_string()).collect();
        let mut c = Controller {
            host: host.clone(),
            state_dir: lab.state_dir(&host.name)?,
            listen: SocketAddrV4::new(host.ip, CONTROL_PORT),
            listen_wildcard: Some(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                CONTROL_PORT,
            ))),
            extra: vec!["--announce".into(), announce.join(",")],
            log_dir: lab.log_dir(),
            transcript: lab.transcript(),
            proc: None,
        };
        c.serve()?;
        Ok(c)
    }

    /// (Re)starts `serve` (after [`Controller::stop`] or [`Controller::kill9`]) and waits until
    /// it is ready.
    pub fn serve(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("controller in {} is already running", self.host.name);
        }
        let bin = controller_bin()?;
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            self.listen_wildcard
                .map_or_else(|| self.listen.to_string(), |w| w.to_string()),
        ];
        args.extend(self.extra.iter().cloned());
        let args = with_state_dir(args, &self.state_dir);
        let label = format!("{}-serve", self.host.name);
        self.proc = Some(Proc::spawn(
            &self.host.ns,
            &self.log_dir,
            &label,
            bin,
            args,
        )?);
        self.wait_ready(READY_TIMEOUT)
    }

    /// Ready = its UDP port is bound. (The harness does not poll the admin CLI meanwhile: that
    /// would race with `serve` opening its database, which is not what a test is about.)
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let ns = self.host.ns.clone();
        let port = self.listen.port();
        let Some(proc) = self.proc.as_mut() else {
            bail!("controller is not started");
        };
        let ready = wait_for(timeout, || {
            if let Some(status) = proc.try_status() {
                return Some(Err(status));
            }
            udp_port_bound(&ns, port).then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => Ok(()),
            Some(Err(status)) => Err(anyhow!(
                "mesh-controller serve exited ({}) before it was ready\n{}",
                describe_status(Some(status), false),
                proc.log()
            )),
            None => Err(anyhow!(
                "mesh-controller serve was not ready after {timeout:?} (UDP port {port} not \
                 bound)\n{}",
                proc.log()
            )),
        }
    }

    /// Whether `serve` runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.is_running())
    }

    /// SIGTERM (then SIGKILL after 3 s).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(|p| p.stop())
    }

    /// SIGKILL.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(|p| p.kill9())
    }

    /// The log of the current (or last) `serve`.
    pub fn log(&mut self) -> String {
        self.proc
            .as_mut()
            .map(|p| p.log())
            .unwrap_or_else(|| "(controller never started)".into())
    }

    /// `mesh-controller ARGS --state-dir DIR` in the controller's host.
    pub fn admin<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let out = match controller_bin() {
            Ok(bin) => run(&self.host.ns, bin, with_state_dir(args, &self.state_dir)),
            Err(e) => not_started("mesh-controller", &e),
        };
        record(&self.transcript, &out);
        out
    }

    /// `mesh-controller --database URL ARGS --state-dir DIR` in the controller's host.
    pub fn admin_db(&self, url: &str, args: &[&str]) -> Output {
        let mut all = vec!["--database", url];
        all.extend_from_slice(args);
        self.admin(all)
    }

    /// `network create NAME`.
    pub fn create_network(&self, name: &str) -> Result<()> {
        self.admin(["network", "create", name]).ok()?;
        Ok(())
    }

    /// `token create NETWORK EXTRA...`; returns the token (checked to be one `mesh1_` line).
    pub fn create_token(&self, network: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create", network];
        args.extend_from_slice(extra);
        let out = self.admin(args).ok()?;
        let token = out.stdout.trim();
        if !token.starts_with("mesh1_") || token.lines().count() != 1 {
            bail!("`token create` printed something else than one token: {out}");
        }
        Ok(token.to_string())
    }

    /// `network id NAME`: the network id (checked to be one `meshnet1_` line).
    pub fn network_id(&self, network: &str) -> Result<String> {
        let out = self.admin(["network", "id", network]).ok()?;
        let id = out.stdout.trim();
        if !id.starts_with("meshnet1_") || id.lines().count() != 1 {
            bail!("`network id` printed something else than one network id: {out}");
        }
        Ok(id.to_string())
    }

    /// `node pending NETWORK --json`.
    pub fn pending(&self, network: &str) -> Result<Vec<Value>> {
        json_array(self.admin(["node", "pending", network, "--json"]))
    }

    /// `token list --json`.
    pub fn tokens(&self) -> Result<Vec<Value>> {
        json_array(self.admin(["token", "list", "--json"]))
    }

    /// `node list NETWORK --json`.
    pub fn nodes(&self, network: &str) -> Result<Vec<Value>> {
        json_array(self.admin(["node", "list", network, "--json"]))
    }
}

fn json_array(out: Output) -> Result<Vec<Value>> {
    let out = out.ok()?;
    let v: Value =
        serde_json::from_str(&out.stdout).with_context(|| format!("output is not JSON: {out}"))?;
    match v {
        Value::Array(a) => Ok(a),
        _ => bail!("expected a JSON array: {out}"),
    }
}

/// The agent `mesh` of one host, with its state dir.
#[derive(Debug)]
pub struct Agent {
    /// The host it runs in.
    pub host: Host,
    /// Its node name (`--name`).
    pub name: String,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
    /// Its overlay address, as found when it last became ready.
    pub address: Ipv4Addr,
    log_dir: PathBuf,
    transcript: PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    /// `mesh join --token-file FILE --name NAME --state-dir state/NAME` in `host` (the token
    /// in a 0600 file beside the state dir, the form the docs recommend), waiting until ready.
    pub fn join(lab: &Lab, host: &Host, name: &str, token: &str) -> Result<Agent> {
        Self::join_with(lab, host, name, token, &[])
    }

    /// [`Agent::join`] with extra arguments for `mesh join`.
    pub fn join_with(
        lab: &Lab,
        host: &Host,
        name: &str,
        token: &str,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut agent = Agent {
            host: host.clone(),
            name: name.to_string(),
            state_dir: lab.state_dir(name)?,
            address: Ipv4Addr::UNSPECIFIED,
            log_dir: lab.log_dir(),
            transcript: lab.transcript(),
            proc: None,
        };
        let token_file = write_token_file(&agent.state_dir, token)?;
        let token_file = token_file.to_string_lossy().into_owned();
        let mut args = vec!["join", "--token-file", &token_file, "--name", name];
        args.extend_from_slice(extra);
        agent.start(&args, "join")?;
        Ok(agent)
    }

    /// `mesh join NETWORK-ID --name NAME EXTRA...` in `host`, without waiting: the node may
    /// wait for the administrator's approval (see [`Agent::wait_pending`], [`Agent::wait_ready`]).
    pub fn ask(lab: &Lab, host: &Host, name: &str, id: &str, extra: &[&str]) -> Result<Agent> {
        let mut agent = Agent::idle(lab, host, name)?;
        let mut args = vec!["join", id, "--name", name];
        args.extend_from_slice(extra);
        agent.spawn_daemon(&args, "ask")?;
        Ok(agent)
    }

    /// Starts `mesh ARGS` as this agent's daemon without waiting for anything.
    pub fn spawn_daemon(&mut self, args: &[&str], what: &str) -> Result<()> {
        if self.is_running() {
            bail!("agent {} is already running", self.name);
        }
        let label = format!("{}-{what}", self.name);
        self.proc = Some(Proc::spawn(
            &self.host.ns,
            &self.log_dir,
            &label,
            mesh_bin()?,
            with_state_dir(args.iter().copied(), &self.state_dir),
        )?);
        Ok(())
    }

    /// Waits until `mesh status --json` says the node waits for approval with the controller
    /// holding its request; returns that status. Fails early, with the log, if the daemon exits.
    pub fn wait_pending(&mut self, timeout: Duration) -> Result<Value> {
        let mut last = String::from("(no status yet)");
        let (ns, state_dir) = (self.host.ns.clone(), self.state_dir.clone());
        let mut proc = self.proc.as_mut();
        let found = wait_for(timeout, || {
            if let Some(status) = proc.as_mut().and_then(|p| p.try_status()) {
                return Some(Err(status));
            }
            let out = mesh_cli(&ns, &state_dir, ["status", "--json"]);
            let Ok(status) = serde_json::from_str::<Value>(&out.stdout) else {
                last = out.to_string();
                return None;
            };
            if status["state"] == "waiting_for_approval"
                && status["controller"]["connected"] == true
            {
                return Some(Ok(status));
            }
            last = out.to_string();
            None
        });
        let name = self.name.clone();
        match found {
            Some(Ok(v)) => Ok(v),
            Some(Err(status)) => Err(anyhow!(
                "agent {name} exited ({}) instead of waiting for approval\n{}",
                describe_status(Some(status), false),
                self.log()
            )),
            None => Err(anyhow!(
                "agent {name} not waiting for approval after {timeout:?}; last check: {last}\n{}",
                self.log()
            )),
        }
    }

    /// An agent on `host` with its state dir and no daemon running yet: for one-shot CLI
    /// commands such as `mesh join --no-daemon`, followed by [`Agent::up`].
    pub fn idle(lab: &Lab, host: &Host, name: &str) -> Result<Agent> {
        Ok(Agent {
            host: host.clone(),
            name: name.to_string(),
            state_dir: lab.state_dir(name)?,
            address: Ipv4Addr::UNSPECIFIED,
            log_dir: lab.log_dir(),
            transcript: lab.transcript(),
            proc: None,
        })
    }

    /// An agent started by any command line in `host` (which must pass `--state-dir` as
    /// [`Agent::state_dir`] of `name`, e.g. through `env` or `sh -c`), waiting until ready:
    /// for the ways of giving `mesh join` its token.
    pub fn spawn<I, S>(
        lab: &Lab,
        host: &Host,
        name: &str,
        bin: impl AsRef<std::ffi::OsStr>,
        args: I,
    ) -> Result<Agent>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut agent = Agent::idle(lab, host, name)?;
        let label = format!("{name}-spawn");
        agent.proc = Some(Proc::spawn(&host.ns, &agent.log_dir, &label, bin, args)?);
        agent.address = agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// The PID of the daemon (the process the harness started), if one was started.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// What the daemon wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.as_ref().map(|p| p.stderr()).unwrap_or_default()
    }

    /// `mesh up`: runs the daemon again from its saved state, waiting until ready.
    pub fn up(&mut self) -> Result<Ipv4Addr> {
        self.up_with(&[])
    }

    /// [`Agent::up`] with extra arguments for `mesh up`.
    pub fn up_with(&mut self, extra: &[&str]) -> Result<Ipv4Addr> {
        let mut args = vec!["up"];
        args.extend_from_slice(extra);
        self.start(&args, "up")?;
        Ok(self.address)
    }

    fn start(&mut self, args: &[&str], what: &str) -> Result<()> {
        if self.is_running() {
            bail!("agent {} is already running", self.name);
        }
        let bin = mesh_bin()?;
        let label = format!("{}-{what}", self.name);
        self.proc = Some(Proc::spawn(
            &self.host.ns,
            &self.log_dir,
            &label,
            bin,
            with_state_dir(args.iter().copied(), &self.state_dir),
        )?);
        self.address = self.wait_ready(READY_TIMEOUT)?;
        Ok(())
    }

    /// Waits until `mesh status --json` works and the address it reports is on the interface it
    /// reports (`mesh0` if it names none). Fails early, with the log, if the daemon exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ipv4Addr> {
        let mut last = String::from("(no status yet)");
        let (ns, state_dir) = (self.host.ns.clone(), self.state_dir.clone());
        let mut proc = self.proc.as_mut();
        let ready = wait_for(timeout, || {
            if let Some(status) = proc.as_mut().and_then(|p| p.try_status()) {
                return Some(Err(status));
            }
            let out = mesh_cli(&ns, &state_dir, ["status", "--json"]);
            if !out.success() {
                last = out.to_string();
                return None;
            }
            let Ok(status) = serde_json::from_str::<Value>(&out.stdout) else {
                last = format!("status is not JSON: {out}");
                return None;
            };
            let Some(addr) = status["node"]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                last = format!("status has no node.address yet: {out}");
                return None;
            };
            let iface = status["node"]["interface"].as_str().unwrap_or("mesh0");
            let on_iface = ip(["-n", &ns, "-4", "-o", "addr", "show", "dev", iface])
                .is_ok_and(|s| s.contains(&format!(" {addr}/")));
            if !on_iface {
                last = format!("{addr} is not on {iface} yet");
                return None;
            }
            Some(Ok(addr))
        });
        match ready {
            Some(Ok(addr)) => Ok(addr),
            Some(Err(status)) => {
                let log = self.log();
                Err(anyhow!(
                    "agent {} exited ({}) before it was ready\n{log}",
                    self.name,
                    describe_status(Some(status), false),
                ))
            }
            None => {
                let log = self.log();
                Err(anyhow!(
                    "agent {} not ready after {timeout:?}; last check: {last}\n{log}",
                    self.name,
                ))
            }
        }
    }

    /// Whether the daemon runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.is_running())
    }

    /// SIGTERM (then SIGKILL after 3 s); its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(|p| p.stop())
    }

    /// SIGKILL.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(|p| p.kill9())
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(|p| p.wait_exit(timeout))
    }

    /// The log of the current (or last) daemon run.
    pub fn log(&mut self) -> String {
        self.proc
            .as_mut()
            .map(|p| p.log())
            .unwrap_or_else(|| "(agent never started)".into())
    }

    /// `mesh ARGS --state-dir DIR` in the agent's host.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let out = mesh_cli(&self.host.ns, &self.state_dir, args);
        record(&self.transcript, &out);
        out
    }

    /// `mesh ip`, parsed.
    pub fn ip(&self) -> Result<Ipv4Addr> {
        let out = self.cli(["ip"]).ok()?;
        out.stdout
            .trim()
            .parse()
            .with_context(|| format!("`mesh ip` did not print an IPv4 address: {out}"))
    }

    /// `mesh status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.cli(["status", "--json"]).ok()?;
        serde_json::from_str(&out.stdout).with_context(|| format!("status is not JSON: {out}"))
    }

    /// The names of the peers `mesh status` lists (none while it does not answer).
    pub fn peer_names(&self) -> Vec<String> {
        self.status()
            .ok()
            .and_then(|v| {
                v["peers"].as_array().map(|peers| {
                    peers
                        .iter()
                        .filter_map(|p| p["name"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// The status entry of the peer named `name`.
    pub fn peer(&self, name: &str) -> Result<Value> {
        let status = self.status()?;
        status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow!("{} does not list peer {name}: {status:#}", self.name))
    }

    /// The underlay address of its UDP socket (host address, port 51820).
    pub fn underlay(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.host.ip, AGENT_PORT)
    }
}

/// A lab with a controller (192.0.2.1) serving `network`, hosts named `hosts`, and a reusable
/// token for it: what most tests start from.
pub fn lab_with_network(
    label: &str,
    network: &str,
    hosts: &[&str],
) -> Result<(Lab, Controller, Vec<Host>, String)> {
    let mut lab = Lab::new(label)?;
    let ctl_host = lab.add_controller_host("ctl")?;
    let hosts = hosts
        .iter()
        .map(|h| lab.add_host(h))
        .collect::<Result<Vec<_>>>()?;
    let ctl = Controller::start(&lab, &ctl_host)?;
    ctl.create_network(network)?;
    let token = ctl.create_token(network, &["--reusable"])?;
    Ok((lab, ctl, hosts, token))
}

/// Writes `token` to `<state_dir>.token` (mode 0600, created so before the token is written)
/// and returns the path.
pub fn write_token_file(state_dir: &Path, token: &str) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.with_extension("token");
    let _ = std::fs::remove_file(&path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `mesh ARGS --state-dir DIR` in namespace `ns`.
fn mesh_cli<I, S>(ns: &str, state_dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    match mesh_bin() {
        Ok(bin) => run(ns, bin, with_state_dir(args, state_dir)),
        Err(e) => not_started("mesh", &e),
    }
}

fn not_started(command: &str, e: &anyhow::Error) -> Output {
    Output {
        command: command.into(),
        status: None,
        stdout: String::new(),
        stderr: format!("{e:#}"),
        timed_out: false,
        elapsed: Duration::ZERO,
    }
}

/// Pings every ordered pair of `agents` (overlay addresses) until all have answered once or
/// `timeout` passes; the error lists the pairs that never got an answer.
pub fn wait_all_pairs_ping(agents: &[&Agent], timeout: Duration) -> Result<()> {
    let mut pending: Vec<(usize, usize)> = (0..agents.len())
        .flat_map(|a| (0..agents.len()).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    crate::wait_until(timeout, || {
        pending.retain(|&(a, b)| !agents[a].host.ping(agents[b].address));
        pending.is_empty()
    });
    if pending.is_empty() {
        return Ok(());
    }
    let failed: Vec<String> = pending
        .iter()
        .map(|&(a, b)| {
            format!(
                "{} -> {} ({})",
                agents[a].name, agents[b].name, agents[b].address
            )
        })
        .collect();
    bail!(
        "no ping answer within {timeout:?} for: {}",
        failed.join(", ")
    )
}

/// Controllers sharing one PostgreSQL database, as an operator runs them for high
/// availability: the server runs in lab host `db` (192.0.2.50, started by the test as an
/// unprivileged user), the controllers in hosts `c1`.. (192.0.2.61..) on port 7443; the first
/// makes the key, the others get a copy of it (`--key-file`).
pub struct Replicas {
    /// The controllers, in order.
    pub controllers: Vec<Controller>,
    /// Their database's connection string.
    pub url: String,
    /// The database server (stop and start it with `restart`).
    pub postgres: mesh_testpg::Postgres,
}

impl Replicas {
    /// Starts the database and `n` controllers on it.
    pub fn start(lab: &mut Lab, n: u8) -> Result<Replicas> {
        let db = lab.add_host_at("db", 50)?;
        let postgres = mesh_testpg::Postgres::start_in(&db.ns, db.ip).map_err(|e| anyhow!(e))?;
        let url = postgres.new_database();
        let key = lab.dir().join("controller.key");
        let mut controllers = Vec::new();
        for i in 1..=n {
            let host = lab.add_host_at(&format!("c{i}"), 60 + i)?;
            let dir = lab.state_dir(&host.name)?;
            let mut args = vec!["--database", url.as_str()];
            let key_arg = key.to_string_lossy().into_owned();
            if i > 1 {
                args.extend_from_slice(&["--key-file", &key_arg]);
            }
            let c = Controller::start_with_args(lab, &host, &dir, CONTROL_PORT, &args)?;
            if i == 1 {
                std::fs::copy(dir.join("controller.key"), &key)?;
            }
            controllers.push(c);
        }
        Ok(Replicas {
            controllers,
            url,
            postgres,
        })
    }

    /// `mesh-controller --database URL ARGS` on controller `i`'s host.
    pub fn admin(&self, i: usize, args: &[&str]) -> Output {
        self.controllers[i].admin_db(&self.url, args)
    }

    /// The controllers' addresses, in order.
    pub fn addrs(&self) -> Vec<String> {
        self.controllers
            .iter()
            .map(|c| c.listen.to_string())
            .collect()
    }
}
