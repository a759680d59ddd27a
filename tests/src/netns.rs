//! Network namespaces and the flat L2 lab network the tests run in.
//!
//! Nothing here touches the interfaces of the root namespace: every link is created with
//! `ip -n NS` inside a namespace of ours.

use crate::process::{read_lossy, run_with_timeout, tail, Output, Proc};
use crate::{wait_until, RUN_TIMEOUT_PING};
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

/// Counter that makes namespace and directory names unique inside this test process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);
/// `ip netns add/del` mount things under /run/netns; keep them one at a time.
static NETNS_LOCK: Mutex<()> = Mutex::new(());
static STALE_CLEANUP: Once = Once::new();

/// Prefix of every namespace this harness creates: `mt<pid>x<n>`.
const NS_PREFIX: &str = "mt";

fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ip ARGS` (in the root namespace, to manage namespaces or reach into one with `-n`).
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new("ip")
        .args(&args)
        .output()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace named `mt<pid>x<n>` with `lo` up. Dropping it kills every process still
/// inside and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace.
    pub fn new() -> Result<Netns> {
        STALE_CLEANUP.call_once(remove_stale_namespaces);
        let name = format!("{NS_PREFIX}{}x{}", std::process::id(), next_id());
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ip(["netns", "add", &name]).context(
                "creating a network namespace failed; the end-to-end tests must run as root",
            )?;
        }
        let ns = Netns { name };
        ip(["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PIDs of the processes inside.
    pub fn pids(&self) -> Vec<u32> {
        pids_of(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

fn pids_of(ns: &str) -> Vec<u32> {
    ip(["netns", "pids", ns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn delete_namespace(name: &str) {
    for pid in pids_of(name) {
        crate::process::send_signal(pid, libc::SIGKILL);
    }
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = ip(["netns", "del", name]) {
        eprintln!("mesh-e2e: could not delete namespace {name}: {e:#}");
    }
}

/// Deletes namespaces left by an earlier test process that died without cleaning up (its PID,
/// part of the name, no longer runs).
fn remove_stale_namespaces() {
    let Ok(list) = ip(["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('x') else {
            continue;
        };
        if pid.parse::<u32>().is_err() || n.parse::<u32>().is_err() {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("mesh-e2e: removing stale namespace {name}");
            delete_namespace(name);
        }
    }
}

/// One machine of the lab: a namespace with `eth0` on the lab switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name, used for log file names.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Underlay address on `eth0` (in 192.0.2.0/24); `0.0.0.0` for a host without IPv4 (an
    /// IPv6-only host of the NAT lab).
    pub ip: Ipv4Addr,
    /// Global IPv6 address on `eth0`, for hosts the NAT lab gave one (in 2001:db8::/32).
    pub ip6: Option<Ipv6Addr>,
}

impl Host {
    /// Runs a one-shot command in this host (see [`crate::run`]).
    pub fn run<I, S>(&self, bin: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        crate::run(&self.ns, bin, args)
    }

    /// One `ping -c 1 -W 1` to `to`; true if it was answered.
    pub fn ping(&self, to: Ipv4Addr) -> bool {
        run_with_timeout(
            &self.ns,
            "ping",
            ["-n", "-c", "1", "-W", "1", &to.to_string()],
            RUN_TIMEOUT_PING,
        )
        .success()
    }

    /// Pings `to` until it answers or `timeout` passes.
    pub fn wait_ping(&self, to: Ipv4Addr, timeout: Duration) -> bool {
        wait_until(timeout, || self.ping(to))
    }

    /// One `ping -6 -c 1 -W 1` to `to`; true if it was answered.
    pub fn ping6(&self, to: Ipv6Addr) -> bool {
        run_with_timeout(
            &self.ns,
            "ping",
            ["-6", "-n", "-c", "1", "-W", "1", &to.to_string()],
            RUN_TIMEOUT_PING,
        )
        .success()
    }

    /// Whether some TCP socket in this host listens on `port` (any address).
    pub fn tcp_listening(&self, port: u16) -> bool {
        let suffix = format!(":{port}");
        crate::run(&self.ns, "ss", ["-H", "-l", "-t", "-n"])
            .stdout
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|local| local.ends_with(&suffix))
            })
    }

    /// Runs `nft RULES` in this host: `rules` is one nftables command, e.g. a whole `table { .. }`.
    pub fn nft(&self, rules: &str) -> Result<()> {
        let out = crate::run(&self.ns, "nft", [rules]);
        if !out.success() {
            bail!("nft in {} refused the rules: {out}", self.name);
        }
        Ok(())
    }

    /// Sends each payload as one UDP datagram to `to`, with the helper binary `udp_helper`
    /// (`mesh-e2e-udp`, which integration tests find as `env!("CARGO_BIN_EXE_mesh-e2e-udp")`).
    pub fn send_udp(&self, udp_helper: &Path, to: SocketAddrV4, payloads: &[&[u8]]) -> Output {
        let mut args = vec![to.to_string()];
        args.extend(payloads.iter().map(|p| hex(p)));
        crate::run(&self.ns, udp_helper, args)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP receiver in a host's namespace that counts the bytes of one connection (for checking
/// that a stream got through whole). Started with [`Host::tcp_sink`].
#[derive(Debug)]
pub struct TcpSink {
    child: Option<std::process::Child>,
}

impl TcpSink {
    /// Waits for the connection to end and returns how many bytes it carried (0 if the receiver
    /// failed or timed out).
    pub fn received(mut self) -> u64 {
        self.child
            .take()
            .and_then(|c| c.wait_with_output().ok())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Host {
    /// Starts a TCP receiver on `port` (one connection, at most `timeout_secs`) and waits until
    /// it listens.
    pub fn tcp_sink(&self, port: u16, timeout_secs: u32) -> Result<TcpSink> {
        let script = format!(
            "import socket\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', {port})); s.listen(1); s.settimeout({timeout_secs})\n\
             c,_=s.accept(); c.settimeout(30); n=0\n\
             while True:\n\
             \x20   d=c.recv(65536)\n\
             \x20   if not d: break\n\
             \x20   n+=len(d)\n\
             print(n)\n"
        );
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns.as_str(), "timeout"])
            .arg((timeout_secs + 30).to_string())
            .args(["python3", "-c", script.as_str()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the TCP receiver")?;
        let sink = TcpSink { child: Some(child) };
        let listening = format!(":{port}");
        if !crate::wait_until(std::time::Duration::from_secs(10), || {
            ip([
                "netns",
                "exec",
                self.ns.as_str(),
                "ss",
                "-H",
                "-l",
                "-t",
                "-n",
            ])
            .map(|o| o.contains(&listening))
            .unwrap_or(false)
        }) {
            bail!("the TCP receiver in {} did not listen on {port}", self.name);
        }
        Ok(sink)
    }
}

/// A flat L2 network: one "switch" namespace holding bridge `br0`, and hosts hanging off it by
/// veth pairs, with addresses 192.0.2.N/24. Everything (namespaces, temp dir) is unique to the
/// lab, so labs can run in parallel.
///
/// Dropping the lab prints every process log if the thread is panicking, deletes the namespaces
/// (killing what still runs in them) and removes its temp dir (kept if `MESH_E2E_KEEP` is set).
#[derive(Debug)]
pub struct Lab {
    label: String,
    dir: PathBuf,
    hosts: Vec<Netns>,
    switch: Option<Netns>,
    used_octets: Vec<u8>,
    next_octet: u8,
}

/// Last octet of the controller host's address.
pub const CONTROLLER_OCTET: u8 = 1;
/// Last octet of the first ordinary host.
pub const FIRST_HOST_OCTET: u8 = 11;

impl Lab {
    /// A new empty lab; `label` (the test name) is part of its temp dir name.
    pub fn new(label: &str) -> Result<Lab> {
        for tool in ["ip", "ss", "ping"] {
            if find_in_path(tool).is_none() {
                bail!(
                    "`{tool}` is not installed; the end-to-end tests need iproute2 (ip, ss) and \
                     iputils-ping (ping)"
                );
            }
        }
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "mesh-e2e-{}-{}-{safe}",
            std::process::id(),
            next_id()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Readable by all: one test runs the agent as `nobody` on a state dir inside.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let mut lab = Lab {
            label: label.to_string(),
            dir,
            hosts: Vec::new(),
            switch: None,
            used_octets: Vec::new(),
            next_octet: FIRST_HOST_OCTET,
        };
        fs::create_dir_all(lab.log_dir())
            .with_context(|| format!("creating {}", lab.log_dir().display()))?;
        let switch = Netns::new()?;
        ip(["-n", switch.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(["-n", switch.name(), "link", "set", "br0", "up"])?;
        lab.switch = Some(switch);
        Ok(lab)
    }

    /// The lab's temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where process logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The file every CLI call of the lab's daemons is recorded in.
    pub fn transcript(&self) -> PathBuf {
        self.log_dir().join("commands.log")
    }

    /// A fresh (or existing) state dir `DIR/state/<name>`.
    pub fn state_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join("state").join(name);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        fs::set_permissions(self.dir.join("state"), fs::Permissions::from_mode(0o755))?;
        Ok(d)
    }

    /// Adds a host with the next free address 192.0.2.11, .12, ...
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        while self.used_octets.contains(&self.next_octet) {
            self.next_octet += 1;
        }
        let octet = self.next_octet;
        self.next_octet += 1;
        self.add_host_at(name, octet)
    }

    /// Sets the MTU of `host`'s link to the switch, on both ends: a path that silently drops
    /// larger frames toward the host (a bridge neither fragments nor answers with ICMP).
    pub fn set_link_mtu(&self, host: &Host, mtu: u32) -> Result<()> {
        let Some(switch) = &self.switch else {
            bail!("lab {} has no switch", self.label);
        };
        let port = format!("v{}", host.ip.octets()[3]);
        let mtu = mtu.to_string();
        // veth and bridge check the MTU only for packets that are not GSO: a UDP GSO batch
        // from another host would cross whole, as no real link lets it. gso_max_segs 1 makes
        // the kernel segment before these devices, so each datagram meets the MTU.
        ip([
            "-n",
            switch.name(),
            "link",
            "set",
            port.as_str(),
            "mtu",
            mtu.as_str(),
            "gso_max_segs",
            "1",
        ])?;
        ip([
            "-n",
            host.ns.as_str(),
            "link",
            "set",
            "eth0",
            "mtu",
            mtu.as_str(),
            "gso_max_segs",
            "1",
        ])?;
        Ok(())
    }

    /// Gives every one of `hosts` a permanent neighbour entry for every other one.
    ///
    /// Labs of many hosts need this, and only because they share one kernel: Linux keeps the
    /// neighbour entries of all namespaces in one table, and past `gc_thresh3` (1,024 by
    /// default) entries in total it refuses new ones ("neighbor table overflow" in dmesg), so
    /// packets to hosts not yet resolved are dropped. 40 hosts that all talk to each other
    /// need 1,600. On 40 real machines each kernel holds its own 40. Permanent entries are
    /// exempt from that limit, and the host settings stay untouched.
    pub fn pin_neighbours(&self, hosts: &[&Host]) -> Result<()> {
        let mut macs = Vec::new();
        for h in hosts {
            let link = ip(["-n", &h.ns, "-o", "link", "show", "eth0"])?;
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .with_context(|| format!("no MAC address on eth0 of {}: {link}", h.name))?
                .to_string();
            macs.push(mac);
        }
        for h in hosts {
            let batch: String = hosts
                .iter()
                .zip(&macs)
                .filter(|(o, _)| o.ip != h.ip)
                .map(|(o, mac)| {
                    format!(
                        "neigh replace {} lladdr {mac} dev eth0 nud permanent\n",
                        o.ip
                    )
                })
                .collect();
            let file = self.dir.join(format!("neigh-{}.batch", h.name));
            fs::write(&file, batch).with_context(|| format!("writing {}", file.display()))?;
            ip([
                "-n",
                h.ns.as_str(),
                "-batch",
                file.to_str().unwrap_or_default(),
            ])?;
        }
        Ok(())
    }

    /// Adds the controller's host, 192.0.2.1.
    pub fn add_controller_host(&mut self, name: &str) -> Result<Host> {
        self.add_host_at(name, CONTROLLER_OCTET)
    }

    /// Adds a host with address 192.0.2.`octet`.
    pub fn add_host_at(&mut self, name: &str, octet: u8) -> Result<Host> {
        if !(1..=254).contains(&octet) || self.used_octets.contains(&octet) {
            bail!(
                "address 192.0.2.{octet} is invalid or taken in lab {}",
                self.label
            );
        }
        let Some(switch) = &self.switch else {
            bail!("lab {} has no switch", self.label);
        };
        let sw = switch.name().to_string();
        let ns = Netns::new()?;
        let port = format!("v{octet}");
        let addr = Ipv4Addr::new(192, 0, 2, octet);
        let host = Host {
            name: name.to_string(),
            ns: ns.name().to_string(),
            ip: addr,
            ip6: None,
        };
        self.hosts.push(ns);
        self.used_octets.push(octet);
        ip([
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ])?;
        ip(["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        ip([
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(["-n", &host.ns, "link", "set", "eth0", "up"])?;
        let up = wait_until(Duration::from_secs(5), || {
            ip(["-n", &host.ns, "-o", "link", "show", "eth0"]).is_ok_and(|s| s.contains("LOWER_UP"))
        });
        if !up {
            bail!("eth0 of {} ({}) did not come up", host.name, host.ns);
        }
        Ok(host)
    }

    /// Starts a daemon in `host`, logging into the lab's log dir.
    pub fn spawn<I, S>(
        &self,
        host: &Host,
        label: &str,
        bin: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn(&host.ns, &self.log_dir(), label, bin, args)
    }

    /// Names of the lab's namespaces (switch first).
    pub fn namespaces(&self) -> Vec<String> {
        self.switch
            .iter()
            .chain(self.hosts.iter())
            .map(|n| n.name().to_string())
            .collect()
    }

    /// Prints every log file of the lab on stderr (the last 200 lines of each).
    pub fn print_logs(&self) {
        let Ok(entries) = fs::read_dir(self.log_dir()) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        eprintln!(
            "======== logs of lab {} ({}) ========",
            self.label,
            self.dir.display()
        );
        for f in files {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let cmd = [".stdout.log", ".stderr.log"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .map(|label| read_lossy(&f.with_file_name(format!("{label}.cmd"))))
                .unwrap_or_default();
            let body = read_lossy(&f);
            if body.trim().is_empty() {
                eprintln!("---- {name}: (empty)");
                continue;
            }
            if cmd.trim().is_empty() {
                eprintln!("---- {name}");
            } else {
                eprintln!("---- {name}: {}", cmd.trim());
            }
            eprintln!("{}", tail(&body, 200));
        }
        eprintln!("======== end of logs of lab {} ========", self.label);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        self.hosts.clear();
        self.switch = None;
        if std::env::var_os("MESH_E2E_KEEP").is_some() {
            eprintln!("mesh-e2e: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
