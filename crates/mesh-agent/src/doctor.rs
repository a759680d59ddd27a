//! `mesh doctor`: checks what kubeadm and a CNI need on this node and says what to fix.
//!
//! Two halves, kept apart so that the judgement is testable without a host:
//! - [`Facts`]: what was read from the system (sysctls, modules, swaps, routes and addresses,
//!   the daemon's status, the kubelet extra-args file, CNI configs, the forward chains, host
//!   firewalls, proxy variables). Gathering ([`gather`]) never fails: what cannot be read is
//!   recorded as unknown, with why, and every external command runs under a timeout.
//! - [`judge`]: a pure function from facts to one [`Check`] per line of output, each with a
//!   stable name, a status and a message that says what is wrong and the command that fixes it.
//!
//! [`overlay_conflicts`] is the piece `mesh join` reuses: which local routes and addresses
//! overlap the network's overlay range.

use crate::kubeadm;
use ipnet::Ipv4Net;
use mesh_sys::netlink::LocalNetwork;
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// kubeadm's default pod range (flannel's default network).
pub const DEFAULT_POD_CIDR: &str = "10.244.0.0/16";
/// kubeadm's default service range.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
/// Where CNI plugins' configurations live.
pub const DEFAULT_CNI_DIR: &str = "/etc/cni/net.d";
/// Where flannel writes the node's pod subnet and MTU.
pub const DEFAULT_FLANNEL_ENV: &str = "/run/flannel/subnet.env";
/// How long one external command (nft, iptables, firewall-cmd, ufw) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to answer the status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// A clock this far from the controller's is fine (the measurement itself is off by up to the
/// one-way delay).
const CLOCK_OK_MS: i64 = 2_000;
/// Beyond this, certificates and tokens checked against wall-clock times start to fail
/// ("certificate is not yet valid" at `kubeadm join`).
const CLOCK_FAIL_MS: i64 = 60_000;
/// Interfaces a CNI creates for the pod network: routes and addresses of the pod range on
/// them are the pod network itself, not a conflict.
const POD_INTERFACES: &[&str] = &[
    "cni0",
    "cbr0",
    "flannel.",
    "cali",
    "tunl0",
    "vxlan.calico",
    "cilium_",
    "lxc",
    "kube-bridge",
    "weave",
];
/// Bridges pods hang off: their forwarded traffic must pass the FORWARD chain too.
const POD_BRIDGES: &[&str] = &["cni0", "cbr0", "kube-bridge"];
/// kube-proxy's IPVS dummy holds service addresses.
const SERVICE_INTERFACES: &[&str] = &["kube-ipvs0"];

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but may bite later; the message says when.
    Warn,
    /// kubeadm or the CNI will not work until this is fixed.
    Fail,
    /// Not checked; the message says why (no root, no daemon, nothing to check).
    Skip,
}

impl Status {
    /// The word at the start of an output line.
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One line of `mesh doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id (`ip_forward`, `route_overlap`, ...): scripts match on it.
    pub name: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found; when not ok, also the command that fixes it.
    pub message: String,
}

fn check(name: &'static str, status: Status, message: impl Into<String>) -> Check {
    Check {
        name,
        status,
        message: message.into(),
    }
}

/// What the running daemon said (its `mesh status --json`), as far as doctor needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Daemon {
    /// Up, with an address.
    Online(Box<DaemonView>),
    /// Waiting for the administrator's approval; the text says how to approve.
    Pending(String),
    /// No daemon answers on the socket (the text is the error).
    NotRunning(String),
    /// The socket is there but this user may not use it.
    NotAllowed(String),
    /// It answered something else (the text says what went wrong).
    Broken(String),
}

/// The running daemon's view of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonView {
    /// Overlay address.
    pub address: Ipv4Addr,
    /// IPv6 overlay address, on a network with an IPv6 overlay.
    pub address6: Option<std::net::Ipv6Addr>,
    /// Prefix length of the network.
    pub prefix_len: u8,
    /// MTU of the overlay interface.
    pub mtu: u32,
    /// Overlay interface name.
    pub interface: String,
    /// The node's UDP port.
    pub port: u16,
    /// Controller address.
    pub controller: String,
    /// Whether the control connection is up.
    pub connected: bool,
    /// `quic` or `tcp`.
    pub transport: Option<String>,
    /// Why the control connection is down.
    pub last_error: Option<String>,
    /// The controller's clock minus this node's, in ms, at the last welcome.
    pub clock_offset_ms: Option<i64>,
    /// `endpoint-independent`, `endpoint-dependent` or `unknown`.
    pub mapping: String,
    /// The router forwards the port (UPnP, NAT-PMP, PCP).
    pub port_mapped: bool,
    /// The IPv6 addresses offered to peers as candidates.
    pub ipv6: Vec<String>,
    /// Every peer.
    pub peers: Vec<PeerView>,
}

impl DaemonView {
    /// The network's overlay range.
    pub fn overlay(&self) -> Ipv4Net {
        Ipv4Net::new(self.address, self.prefix_len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| Ipv4Net::from(self.address))
    }
}

/// One peer in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Name.
    pub name: String,
    /// `direct`, `relay` or `none`.
    pub path: String,
    /// Heard from lately.
    pub online: bool,
    /// The relay carrying it, on `relay`.
    pub relay: Option<String>,
    /// The endpoint, on `direct`.
    pub endpoint: Option<String>,
}

/// Reads the parts of `mesh status --json` doctor uses.
pub fn daemon_from_status(v: &serde_json::Value) -> Daemon {
    match v["state"].as_str() {
        Some("online") => {}
        Some("waiting_for_approval") => {
            return Daemon::Pending(format!(
                "this node waits for the administrator to approve it: {}",
                v["approve_with"]
                    .as_str()
                    .unwrap_or("mesh-controller node approve NETWORK NAME")
            ))
        }
        _ => {
            return Daemon::Broken(format!(
                "the daemon's status has no node: {}",
                v["error"].as_str().unwrap_or("unexpected answer")
            ))
        }
    }
    let node = &v["node"];
    let ctl = &v["controller"];
    let address = node["address"].as_str().and_then(|a| a.parse().ok());
    let (Some(address), Some(prefix_len)) = (
        address,
        node["prefix_len"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok()),
    ) else {
        return Daemon::Broken("the daemon's status names no overlay address".into());
    };
    let text = |x: &serde_json::Value| x.as_str().map(str::to_owned);
    let peers = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| PeerView {
            name: text(&p["name"]).unwrap_or_else(|| "?".into()),
            path: text(&p["path"]).unwrap_or_else(|| "none".into()),
            online: p["online"].as_bool().unwrap_or(true),
            relay: text(&p["relay"]),
            endpoint: text(&p["endpoint"]),
        })
        .collect();
    Daemon::Online(Box::new(DaemonView {
        address,
        address6: node["address6"].as_str().and_then(|a| a.parse().ok()),
        prefix_len,
        mtu: node["mtu"]
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(1420),
        interface: text(&node["interface"]).unwrap_or_else(|| "mesh0".into()),
        port: node["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(51820),
        controller: text(&ctl["address"]).unwrap_or_default(),
        connected: ctl["connected"].as_bool().unwrap_or(false),
        transport: text(&ctl["transport"]),
        last_error: text(&ctl["last_error"]),
        clock_offset_ms: ctl["clock_offset_ms"].as_i64(),
        mapping: text(&v["nat"]["mapping"]).unwrap_or_else(|| "unknown".into()),
        port_mapped: v["port_mapping"]["state"] == "mapped",
        ipv6: v["endpoint_interfaces"]["ipv6"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(text)
            .collect(),
        peers,
    }))
}

/// A CNI configuration found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    /// The file it came from.
    pub path: String,
    /// The first plugin's `type` (`bridge`, `flannel`, `calico`, ...).
    pub kind: String,
    /// The `mtu` it sets, if any.
    pub mtu: Option<u32>,
    /// The pod ranges it names (`ipam.subnet`, `ipam.ranges`, flannel's network).
    pub ranges: Vec<Ipv4Net>,
}

/// The kubelet extra-args file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletFile {
    /// Its path.
    pub path: PathBuf,
    /// Its text; `None` when it does not exist; `Err` when it cannot be read.
    pub text: Result<Option<String>, String>,
}

/// One base chain on the forward hook.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ForwardChain {
    /// How to name it in a command (`ip filter FORWARD` for nft, `FORWARD` for iptables).
    pub name: String,
    /// Its policy is drop.
    pub drops: bool,
    /// It accepts everything at some point (a rule with no condition).
    pub accepts_all: bool,
    /// Interfaces whose incoming traffic a plain `iifname X accept` lets through.
    pub accepts_in: Vec<String>,
    /// Interfaces whose outgoing traffic a plain `oifname X accept` lets through.
    pub accepts_out: Vec<String>,
}

/// What the packet filter says about forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Not read; why.
    Unknown(String),
    /// Read with `nft` or `iptables`.
    Read {
        /// `nft` or `iptables`.
        tool: &'static str,
        /// Every base chain on the forward hook.
        chains: Vec<ForwardChain>,
    },
}

/// A host firewall's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallState {
    /// Not installed.
    Absent,
    /// Installed, not running.
    Inactive,
    /// Running; whether it lets the overlay interface's traffic through, and what says so.
    Active {
        /// The overlay interface is trusted (firewalld's trusted zone, a ufw rule on it).
        allows: bool,
        /// Zone or rule found.
        detail: String,
    },
    /// Could not tell; why.
    Unknown(String),
}

/// Everything `mesh doctor` judges, read from the system (or made by hand in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The daemon.
    pub daemon: Daemon,
    /// Overlay interface name to judge (the daemon's, else `mesh0`).
    pub interface: String,
    /// Whether the overlay address is on the interface; `None`: not known.
    pub address_present: Option<bool>,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Option<String>,
    /// The br_netfilter module is loaded (or built in).
    pub br_netfilter: bool,
    /// `net.bridge.bridge-nf-call-iptables`, where it exists.
    pub bridge_nf_call_iptables: Option<String>,
    /// Active swap devices; `Err`: /proc/swaps unreadable.
    pub swaps: Result<Vec<String>, String>,
    /// The kubelet extra-args file.
    pub kubelet: KubeletFile,
    /// The CNI directory looked at.
    pub cni_dir: PathBuf,
    /// CNI configs found (and flannel's subnet.env).
    pub cni: Vec<CniConfig>,
    /// CNI files that could not be parsed, with why.
    pub cni_errors: Vec<String>,
    /// `--pod-cidr`, when given.
    pub pod_cidr: Option<Ipv4Net>,
    /// The service range.
    pub service_cidr: Ipv4Net,
    /// Routes and addresses of this host; `Err`: unreadable.
    pub local: Result<Vec<LocalNetwork>, String>,
    /// The forward chains.
    pub forward: Forward,
    /// firewalld and ufw.
    pub firewalls: Vec<(&'static str, FirewallState)>,
    /// Proxy variables set (name, value).
    pub proxy: Vec<(String, String)>,
    /// `NO_PROXY` / `no_proxy`.
    pub no_proxy: Option<String>,
}

/// The pod ranges to judge: `--pod-cidr`, else what the CNI configs name, else kubeadm's
/// default; with where they came from.
pub fn pod_ranges(f: &Facts) -> (Vec<Ipv4Net>, String) {
    if let Some(p) = f.pod_cidr {
        return (vec![p], "--pod-cidr".into());
    }
    let mut found: Vec<Ipv4Net> = Vec::new();
    for c in &f.cni {
        for r in &c.ranges {
            // A node's subnet inside the cluster's range adds nothing.
            if !found.iter().any(|x| x.contains(r)) {
                found.retain(|x| !r.contains(x));
                found.push(*r);
            }
        }
    }
    if found.is_empty() {
        let default = DEFAULT_POD_CIDR.parse().unwrap_or_default();
        (
            vec![default],
            "kubeadm's default; --pod-cidr sets another".into(),
        )
    } else {
        (found, "the CNI config".into())
    }
}

fn has_prefix(name: &str, list: &[&str]) -> bool {
    list.iter().any(|p| name.starts_with(p))
}

/// The local routes and addresses (not on `interface`, the overlay's) that overlap `range`.
/// An address and the route the kernel adds for its subnet count once.
pub fn overlay_conflicts(
    range: Ipv4Net,
    interface: &str,
    local: &[LocalNetwork],
) -> Vec<LocalNetwork> {
    conflicts(range, local, |n| n.interface == interface)
}

fn conflicts(
    range: Ipv4Net,
    local: &[LocalNetwork],
    expected: impl Fn(&LocalNetwork) -> bool,
) -> Vec<LocalNetwork> {
    let mut out: Vec<LocalNetwork> = Vec::new();
    // Addresses first, so that their subnet's route is recognised as the same thing.
    let mut sorted: Vec<&LocalNetwork> = local.iter().collect();
    sorted.sort_by_key(|n| !n.address);
    for n in sorted {
        if n.network.prefix_len() == 0 || expected(n) || !overlaps(range, n.network) {
            continue;
        }
        let same = out
            .iter()
            .any(|o| o.interface == n.interface && o.network.trunc() == n.network.trunc());
        if !same {
            out.push(n.clone());
        }
    }
    out
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.trunc()) || b.trunc().contains(&a)
}

/// How a conflicting local network reads in a message.
pub fn describe(n: &LocalNetwork) -> String {
    let what = if n.address { "address" } else { "route" };
    let on = if n.interface.is_empty() {
        String::new()
    } else {
        format!(" on {}", n.interface)
    };
    format!("{what} {}{on}", n.network)
}

/// Judges every check. Pure: same facts, same checks.
pub fn judge(f: &Facts) -> Vec<Check> {
    let mut out = vec![
        overlay_address(f),
        ip_forward(f),
        br_netfilter(f),
        bridge_nf(f),
        swap(f),
        kubelet_node_ip(f),
        cni_mtu(f),
        controller(f),
        clock(f),
        nat(f),
        underlay(f),
    ];
    out.extend(peer_paths(f));
    out.extend(range_overlap(f));
    out.extend(route_overlap(f));
    out.extend(forward_policy(f));
    out.push(host_firewall(f));
    out.push(proxy(f));
    out
}

fn online(f: &Facts) -> Option<&DaemonView> {
    match &f.daemon {
        Daemon::Online(v) => Some(v),
        _ => None,
    }
}

/// Why a check that needs the daemon was skipped.
fn no_daemon(f: &Facts) -> String {
    match &f.daemon {
        Daemon::Online(_) => String::new(),
        Daemon::Pending(_) => "skipped: the node has no address yet (waiting for approval)".into(),
        Daemon::NotRunning(_) => "skipped: needs the running mesh daemon".into(),
        Daemon::NotAllowed(_) => {
            "skipped: needs the mesh daemon's status, which this user may not read (run with sudo)"
                .into()
        }
        Daemon::Broken(e) => format!("skipped: {e}"),
    }
}

fn overlay_address(f: &Facts) -> Check {
    const N: &str = "overlay_address";
    match (&f.daemon, f.address_present) {
        (Daemon::Online(v), Some(true)) => check(
            N,
            Status::Ok,
            format!("{}/{} is on {}", v.address, v.prefix_len, v.interface),
        ),
        (Daemon::Online(v), Some(false)) => check(
            N,
            Status::Fail,
            format!(
                "the daemon runs but {} is not on {}: restart it (systemctl restart mesh) and see why in journalctl -u mesh",
                v.address, v.interface
            ),
        ),
        (Daemon::Online(v), None) => check(
            N,
            Status::Skip,
            format!("cannot read the addresses of {}", v.interface),
        ),
        (Daemon::NotRunning(e), _) => check(
            N,
            Status::Fail,
            format!("{e}; where mesh.service is installed: systemctl start mesh"),
        ),
        (Daemon::Pending(how), _) => check(N, Status::Fail, how.clone()),
        (Daemon::NotAllowed(e), _) => check(N, Status::Skip, format!("skipped: {e}")),
        (Daemon::Broken(e), _) => check(
            N,
            Status::Fail,
            format!("{e}: restart the agent (systemctl restart mesh)"),
        ),
    }
}

fn ip_forward(f: &Facts) -> Check {
    const N: &str = "ip_forward";
    match f.ip_forward.as_deref() {
        Some("1") => check(N, Status::Ok, "net.ipv4.ip_forward is 1"),
        Some(v) => check(
            N,
            Status::Fail,
            format!("net.ipv4.ip_forward is {v}: pods cannot reach other nodes; sysctl -w net.ipv4.ip_forward=1 and persist it: echo net.ipv4.ip_forward=1 >> /etc/sysctl.d/99-kubernetes.conf"),
        ),
        None => check(N, Status::Skip, "cannot read /proc/sys/net/ipv4/ip_forward"),
    }
}

fn br_netfilter(f: &Facts) -> Check {
    const N: &str = "br_netfilter";
    if f.br_netfilter {
        check(N, Status::Ok, "the br_netfilter module is loaded")
    } else {
        check(
            N,
            Status::Fail,
            "the br_netfilter module is not loaded: kube-proxy's rules miss traffic between pods on one bridge; modprobe br_netfilter and persist it: echo br_netfilter > /etc/modules-load.d/k8s.conf",
        )
    }
}

fn bridge_nf(f: &Facts) -> Check {
    const N: &str = "bridge_nf_call_iptables";
    match f.bridge_nf_call_iptables.as_deref() {
        Some("1") => check(N, Status::Ok, "net.bridge.bridge-nf-call-iptables is 1"),
        Some(v) => check(
            N,
            Status::Fail,
            format!("net.bridge.bridge-nf-call-iptables is {v}: sysctl -w net.bridge.bridge-nf-call-iptables=1 and persist it: echo net.bridge.bridge-nf-call-iptables=1 >> /etc/sysctl.d/99-kubernetes.conf"),
        ),
        None if !f.br_netfilter => check(
            N,
            Status::Skip,
            "skipped: the sysctl exists once br_netfilter is loaded (see br_netfilter)",
        ),
        None => check(
            N,
            Status::Skip,
            "cannot read /proc/sys/net/bridge/bridge-nf-call-iptables",
        ),
    }
}

fn swap(f: &Facts) -> Check {
    const N: &str = "swap";
    match &f.swaps {
        Ok(s) if s.is_empty() => check(N, Status::Ok, "swap is off"),
        Ok(s) => check(
            N,
            Status::Warn,
            format!("swap is on ({}): kubelet refuses to start with swap unless its failSwapOn is false; swapoff -a and remove the swap line from /etc/fstab", s.join(", ")),
        ),
        Err(e) => check(N, Status::Skip, format!("cannot read /proc/swaps: {e}")),
    }
}

fn kubelet_node_ip(f: &Facts) -> Check {
    const N: &str = "kubelet_node_ip";
    let path = f.kubelet.path.display();
    let text = match &f.kubelet.text {
        Ok(Some(t)) => t,
        Ok(None) => {
            return check(
                N,
                Status::Skip,
                format!("no kubelet extra-args file at {path} yet: `mesh kubeadm node-ip` writes --node-ip there before kubeadm join"),
            )
        }
        Err(e) => return check(N, Status::Skip, format!("cannot read {path}: {e}")),
    };
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    // The file is right when setting the flag would change nothing: the IPv4 overlay address
    // alone, or both overlay addresses for a dual-stack cluster.
    let dual = v.address6.map(|v6| kubeadm::NodeIp {
        v4: v.address,
        v6: Some(v6),
    });
    let set = std::iter::once(kubeadm::NodeIp::from(v.address))
        .chain(dual)
        .find(|ip| kubeadm::set_node_ip(text, *ip) == *text);
    if let Some(ip) = set {
        check(N, Status::Ok, format!("{path} sets --node-ip={ip}"))
    } else {
        check(
            N,
            Status::Fail,
            format!("{path} does not set --node-ip={}: kubelet would register another address; run `mesh kubeadm node-ip` and restart kubelet (systemctl restart kubelet)", v.address),
        )
    }
}

fn cni_mtu(f: &Facts) -> Check {
    const N: &str = "cni_mtu";
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    let flannel_mtu = kubeadm::cni_advice(kubeadm::Cni::Flannel, v.mtu).mtu;
    if f.cni.is_empty() {
        let errors = if f.cni_errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.cni_errors.join("; "))
        };
        return check(
            N,
            Status::Skip,
            format!(
                "no CNI config in {}{errors}: when you install the CNI, give it MTU {flannel_mtu} with VXLAN over {} (`mesh kubeadm cni-mtu`)",
                f.cni_dir.display(),
                v.interface
            ),
        );
    }
    let mut bad = Vec::new();
    let mut unset = Vec::new();
    for c in &f.cni {
        // flannel encapsulates in VXLAN over mesh0: its pods must leave room for 50 bytes.
        let flannel = c.kind == "flannel";
        let limit = if flannel { flannel_mtu } else { v.mtu };
        match c.mtu {
            Some(m) if m > limit => bad.push(format!(
                "{} sets MTU {m}, above {limit} ({} on {}{}): set \"mtu\": {limit} there{}",
                c.path,
                v.mtu,
                v.interface,
                if flannel {
                    " minus 50 bytes of VXLAN"
                } else {
                    ""
                },
                if flannel {
                    " (flannel: run it with --iface=mesh0 and it derives the MTU)"
                } else {
                    ""
                }
            )),
            Some(_) => {}
            // flannel's own conflist carries no MTU: its subnet.env does.
            None if flannel => {}
            None => unset.push(c.path.clone()),
        }
    }
    if !bad.is_empty() {
        return check(N, Status::Fail, bad.join("; "));
    }
    if !unset.is_empty() {
        return check(
            N,
            Status::Warn,
            format!(
                "{} set no MTU, so pods get 1500, above {}'s {}: add \"mtu\": {} (no encapsulation) or {flannel_mtu} (VXLAN on top)",
                unset.join(", "),
                v.interface,
                v.mtu,
                v.mtu
            ),
        );
    }
    check(
        N,
        Status::Ok,
        format!("the CNI's MTU fits in {}'s {}", v.interface, v.mtu),
    )
}

fn controller(f: &Facts) -> Check {
    const N: &str = "controller";
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    match (v.connected, v.transport.as_deref()) {
        (true, Some("tcp")) => check(
            N,
            Status::Warn,
            format!("connected to {} over TCP only: UDP to the controller does not get through (a firewall or proxy), so direct paths to peers are unlikely too; allow outbound UDP to {}", v.controller, v.controller),
        ),
        (true, t) => check(
            N,
            Status::Ok,
            format!("connected to {} over {}", v.controller, t.unwrap_or("quic")),
        ),
        (false, _) => check(
            N,
            Status::Fail,
            format!(
                "not connected to {} ({}): check that mesh-controller runs there and that UDP (QUIC) or TCP to it gets through; journalctl -u mesh says more",
                v.controller,
                v.last_error.as_deref().unwrap_or("connecting")
            ),
        ),
    }
}

fn clock(f: &Facts) -> Check {
    const N: &str = "clock";
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    let Some(off) = v.clock_offset_ms else {
        return check(
            N,
            Status::Skip,
            "skipped: the controller did not send its time (an older mesh-controller, or no connection since the agent started)",
        );
    };
    let secs = off as f64 / 1000.0;
    let side = if off > 0 { "behind" } else { "ahead of" };
    let text = format!("this clock is {:.1} s {side} the controller's", secs.abs());
    let fix = "enable time sync: timedatectl set-ntp true (or chronyc makestep)";
    match off.unsigned_abs() {
        d if d <= CLOCK_OK_MS.unsigned_abs() => check(N, Status::Ok, text),
        d if d <= CLOCK_FAIL_MS.unsigned_abs() => {
            check(N, Status::Warn, format!("{text}: {fix}"))
        }
        _ => check(
            N,
            Status::Fail,
            format!("{text}: kubeadm's certificates and tokens will look expired or not yet valid; {fix}"),
        ),
    }
}

/// Which underlay families carry this node's direct paths.
fn underlay(f: &Facts) -> Check {
    const N: &str = "underlay";
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    let direct = |v6: bool| {
        v.peers
            .iter()
            .filter(|p| {
                p.online
                    && p.path == "direct"
                    && p.endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with('[') == v6)
            })
            .count()
    };
    let (over4, over6) = (direct(false), direct(true));
    if v.ipv6.is_empty() {
        check(
            N,
            Status::Ok,
            format!("IPv4 only: this host offers peers no IPv6 address (none global, or none on an offered interface), so direct paths use IPv4 ({over4} peers direct); with global IPv6 on the uplink, pairs behind IPv4 NATs could go direct over IPv6"),
        )
    } else {
        check(
            N,
            Status::Ok,
            format!("IPv4 and IPv6 ({}): direct paths take the family with the better round trip, IPv6 on a tie; {over6} peers direct over IPv6, {over4} over IPv4", v.ipv6.join(", ")),
        )
    }
}

fn nat(f: &Facts) -> Check {
    const N: &str = "nat";
    let Some(v) = online(f) else {
        return check(N, Status::Skip, no_daemon(f));
    };
    match v.mapping.as_str() {
        "endpoint-independent" => check(
            N,
            Status::Ok,
            "endpoint-independent mapping (or no NAT): peers can reach this node directly",
        ),
        _ if v.port_mapped => check(
            N,
            Status::Ok,
            format!("{} mapping, but the router forwards UDP port {}: peers can reach this node directly", v.mapping, v.port),
        ),
        "endpoint-dependent" => check(
            N,
            Status::Warn,
            format!("endpoint-dependent mapping: a direct path works only to peers with an endpoint-independent mapping or a public address; between two such nodes traffic goes through a relay; forward UDP port {} on the router to this host, or turn on UPnP/NAT-PMP/PCP there", v.port),
        ),
        other => check(
            N,
            Status::Warn,
            format!("mapping {other}: neither the controller's STUN observer nor a relay saw this node, so whether direct paths work is not known; allow outbound UDP to the controller"),
        ),
    }
}

fn peer_paths(f: &Facts) -> Vec<Check> {
    const N: &str = "peer_path";
    let Some(v) = online(f) else {
        return vec![check(N, Status::Skip, no_daemon(f))];
    };
    if v.peers.is_empty() {
        return vec![check(N, Status::Ok, "no peers yet")];
    }
    v.peers
        .iter()
        .map(|p| match p.path.as_str() {
            _ if !p.online => check(
                N,
                Status::Warn,
                format!("{}: not heard from lately: is its agent up? (mesh status there)", p.name),
            ),
            "direct" => check(
                N,
                Status::Ok,
                format!(
                    "{}: direct{}{}",
                    p.name,
                    match p.endpoint.as_deref() {
                        Some(e) if e.starts_with('[') => " over IPv6",
                        Some(_) => " over IPv4",
                        None => "",
                    },
                    p.endpoint.as_deref().map(|e| format!(" {e}")).unwrap_or_default()
                ),
            ),
            "relay" => {
                let why = if v.mapping == "endpoint-dependent" {
                    format!("this node's mapping is endpoint-dependent, and the peer's likely is too; forward UDP port {} on one side's router", v.port)
                } else {
                    "this node's mapping is not the obstacle, so the peer's NAT or a firewall on its side is: run mesh doctor there".to_owned()
                };
                check(
                    N,
                    Status::Warn,
                    format!("{}: relayed via {} (slower): no direct path; {why}", p.name, p.relay.as_deref().unwrap_or("the relay")),
                )
            }
            other => check(
                N,
                Status::Fail,
                format!("{}: no path ({other}): neither direct nor relayed packets get through; check that both agents are connected to the controller (mesh status) and that UDP leaves both hosts", p.name),
            ),
        })
        .collect()
}

/// The ranges doctor compares: overlay (if known), pods, services, each with a label.
fn ranges(f: &Facts) -> Vec<(String, Ipv4Net)> {
    let mut out = Vec::new();
    if let Some(v) = online(f) {
        out.push(("overlay range".to_owned(), v.overlay()));
    }
    let (pods, _) = pod_ranges(f);
    for p in pods {
        out.push(("pod range".to_owned(), p));
    }
    out.push(("service range".to_owned(), f.service_cidr));
    out
}

fn fix_for(label: &str) -> &'static str {
    match label {
        "overlay range" => "create the network with another --cidr on the controller (mesh-controller network create NAME --cidr ...)",
        "pod range" => "choose another pod range: kubeadm init --pod-network-cidr=... and the same in the CNI's config (flannel's net-conf.json Network)",
        _ => "choose another service range: kubeadm init --service-cidr=...",
    }
}

fn range_overlap(f: &Facts) -> Vec<Check> {
    const N: &str = "range_overlap";
    let all = ranges(f);
    let mut out = Vec::new();
    for (i, (la, a)) in all.iter().enumerate() {
        for (lb, b) in &all[i + 1..] {
            if la == lb || !overlaps(*a, *b) {
                continue;
            }
            out.push(check(
                N,
                Status::Fail,
                format!("the {la} {a} overlaps the {lb} {b}: {}", fix_for(lb)),
            ));
        }
    }
    if out.is_empty() {
        let list: Vec<String> = all.iter().map(|(l, r)| format!("{l} {r}")).collect();
        out.push(check(
            N,
            Status::Ok,
            format!("{} do not overlap", list.join(", ")),
        ));
    }
    out
}

fn route_overlap(f: &Facts) -> Vec<Check> {
    const N: &str = "route_overlap";
    let local = match &f.local {
        Ok(l) => l,
        Err(e) => {
            return vec![check(
                N,
                Status::Skip,
                format!("cannot read routes and addresses: {e}"),
            )]
        }
    };
    let mut out = Vec::new();
    for (label, range) in ranges(f) {
        let found = conflicts(range, local, |n| {
            n.interface == f.interface
                || (label == "pod range" && has_prefix(&n.interface, POD_INTERFACES))
                || (label == "service range" && has_prefix(&n.interface, SERVICE_INTERFACES))
        });
        if found.is_empty() {
            continue;
        }
        let list: Vec<String> = found.iter().map(describe).collect();
        out.push(check(
            N,
            Status::Fail,
            format!(
                "the {label} {range} overlaps this host's {}: packets for it would go to the wrong place; move that network or {}",
                list.join(", "),
                fix_for(&label)
            ),
        ));
    }
    if out.is_empty() {
        out.push(check(
            N,
            Status::Ok,
            "no local route or address overlaps the overlay, pod or service range",
        ));
    }
    out
}

fn forward_policy(f: &Facts) -> Vec<Check> {
    const N: &str = "forward_policy";
    let (tool, chains) = match &f.forward {
        Forward::Unknown(why) => return vec![check(N, Status::Skip, format!("skipped: {why}"))],
        Forward::Read { tool, chains } => (*tool, chains),
    };
    let mut needed: Vec<String> = vec![f.interface.clone()];
    if let Ok(local) = &f.local {
        for n in local {
            if POD_BRIDGES.contains(&n.interface.as_str()) && !needed.contains(&n.interface) {
                needed.push(n.interface.clone());
            }
        }
    }
    let mut out = Vec::new();
    for c in chains.iter().filter(|c| c.drops && !c.accepts_all) {
        let mut missing: Vec<(&str, &str)> = Vec::new();
        for i in &needed {
            if !c.accepts_in.contains(i) {
                missing.push(("in", i));
            }
            if !c.accepts_out.contains(i) {
                missing.push(("out", i));
            }
        }
        if missing.is_empty() {
            continue;
        }
        let fix: Vec<String> = missing
            .iter()
            .map(|(dir, i)| match tool {
                "nft" => {
                    let key = if *dir == "in" { "iifname" } else { "oifname" };
                    format!("nft insert rule {} {key} \"{i}\" accept", c.name)
                }
                _ => {
                    let flag = if *dir == "in" { "-i" } else { "-o" };
                    format!("iptables -I {} {flag} {i} -j ACCEPT", c.name)
                }
            })
            .collect();
        let names: Vec<String> = missing.iter().map(|(d, i)| format!("{d} {i}")).collect();
        out.push(check(
            N,
            Status::Fail,
            format!(
                "forward chain {} drops by default (Docker sets this) and does not accept {}: pod and overlay traffic is dropped; {} (and persist it)",
                c.name,
                names.join(", "),
                fix.join("; ")
            ),
        ));
    }
    if out.is_empty() {
        out.push(check(
            N,
            Status::Ok,
            format!(
                "no forward chain drops traffic of {} ({tool})",
                needed.join(", ")
            ),
        ));
    }
    out
}

fn host_firewall(f: &Facts) -> Check {
    const N: &str = "host_firewall";
    let i = &f.interface;
    let mut fails = Vec::new();
    let mut unknown = Vec::new();
    let mut running = Vec::new();
    for (tool, state) in &f.firewalls {
        match state {
            FirewallState::Absent | FirewallState::Inactive => {}
            FirewallState::Active { allows: true, detail } => {
                running.push(format!("{tool} ({detail})"))
            }
            FirewallState::Active { allows: false, detail } => fails.push(match *tool {
                "firewalld" => format!("firewalld runs and {i} is in {detail}, so its traffic is filtered: firewall-cmd --permanent --zone=trusted --add-interface={i} && firewall-cmd --reload"),
                _ => format!("ufw is active with no rule for {i} ({detail}): ufw allow in on {i} && ufw route allow in on {i} && ufw route allow out on {i}"),
            }),
            FirewallState::Unknown(why) => unknown.push(format!("{tool}: {why}")),
        }
    }
    if !fails.is_empty() {
        check(N, Status::Fail, fails.join("; "))
    } else if !unknown.is_empty() {
        check(N, Status::Skip, format!("skipped: {}", unknown.join("; ")))
    } else if running.is_empty() {
        check(N, Status::Ok, "neither firewalld nor ufw is running")
    } else {
        check(
            N,
            Status::Ok,
            format!("{} lets {i} through", running.join(", ")),
        )
    }
}

/// Whether one `NO_PROXY` entry covers `range`.
fn no_proxy_covers(entry: &str, range: Ipv4Net) -> bool {
    let entry = entry.trim();
    entry == "*"
        || entry
            .parse::<Ipv4Net>()
            .is_ok_and(|n| n.trunc().contains(&range))
}

fn proxy(f: &Facts) -> Check {
    const N: &str = "proxy";
    if f.proxy.is_empty() {
        return check(N, Status::Ok, "no proxy variables set");
    }
    let vars: Vec<&str> = f.proxy.iter().map(|(k, _)| k.as_str()).collect();
    let entries: Vec<&str> = f
        .no_proxy
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .collect();
    let missing: Vec<String> = ranges(f)
        .into_iter()
        .filter(|(_, r)| !entries.iter().any(|e| no_proxy_covers(e, *r)))
        .map(|(_, r)| r.to_string())
        .collect();
    if missing.is_empty() {
        return check(
            N,
            Status::Ok,
            format!(
                "{} set, and NO_PROXY covers the overlay, pod and service ranges",
                vars.join(", ")
            ),
        );
    }
    let current = f.no_proxy.as_deref().unwrap_or("");
    let new = if current.is_empty() {
        missing.join(",")
    } else {
        format!("{current},{}", missing.join(","))
    };
    check(
        N,
        Status::Fail,
        format!(
            "{} set but NO_PROXY misses {}: kubeadm, kubelet and containerd would send that traffic to the proxy; set NO_PROXY={new} (also in containerd's and kubelet's systemd Environment=)",
            vars.join(", "),
            missing.join(", ")
        ),
    )
}

/// `mesh doctor --json`.
pub fn to_json(checks: &[Check]) -> serde_json::Value {
    serde_json::json!({
        "checks": checks,
        "ok": !checks.iter().any(|c| c.status == Status::Fail),
    })
}

/// One output line: status word, name, message.
pub fn line(c: &Check) -> String {
    format!("{:<4} {:<24} {}", c.status.word(), c.name, c.message)
}

/// `mesh doctor` found at least one failure (the exit status says so; the output said what).
#[derive(Debug, thiserror::Error)]
#[error("{0} check(s) failed; each FAIL line says how to fix it")]
pub struct Failed(pub usize);

// ---------------------------------------------------------------------------------------
// Gathering.

/// Where gathering looks; every path can be set.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The CNI config directory.
    pub cni_dir: PathBuf,
    /// flannel's subnet.env.
    pub flannel_env: PathBuf,
    /// The kubelet extra-args file.
    pub kubelet_file: PathBuf,
    /// `--pod-cidr`.
    pub pod_cidr: Option<Ipv4Net>,
    /// `--service-cidr`.
    pub service_cidr: Ipv4Net,
}

/// Reads a file under /proc/sys, trimmed.
fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Active swap devices from the text of /proc/swaps.
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// One CNI file: a `.conf` (one plugin) or a `.conflist` (`plugins`).
pub fn parse_cni(path: &str, text: &str) -> Result<CniConfig, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{path}: not JSON ({e})"))?;
    let plugins: Vec<&serde_json::Value> = match v["plugins"].as_array() {
        Some(p) => p.iter().collect(),
        None => vec![&v],
    };
    let kind = plugins
        .first()
        .and_then(|p| p["type"].as_str())
        .unwrap_or("")
        .to_owned();
    let mut mtu = None;
    let mut ranges = Vec::new();
    let mut add = |s: &serde_json::Value| {
        if let Some(net) = s.as_str().and_then(|s| s.parse::<Ipv4Net>().ok()) {
            if !ranges.contains(&net.trunc()) {
                ranges.push(net.trunc());
            }
        }
    };
    for p in &plugins {
        if mtu.is_none() {
            mtu = p["mtu"].as_u64().and_then(|m| u32::try_from(m).ok());
        }
        let ipam = &p["ipam"];
        add(&ipam["subnet"]);
        for set in ipam["ranges"].as_array().into_iter().flatten() {
            for r in set.as_array().into_iter().flatten() {
                add(&r["subnet"]);
            }
        }
    }
    Ok(CniConfig {
        path: path.to_owned(),
        kind,
        mtu,
        ranges,
    })
}

/// flannel's subnet.env: FLANNEL_NETWORK (the cluster's pod range) and FLANNEL_MTU.
pub fn parse_flannel_env(path: &str, text: &str) -> CniConfig {
    let mut c = CniConfig {
        path: path.to_owned(),
        kind: "flannel".into(),
        mtu: None,
        ranges: Vec::new(),
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k.trim() {
            "FLANNEL_NETWORK" => c
                .ranges
                .extend(v.trim().parse::<Ipv4Net>().ok().map(|n| n.trunc())),
            "FLANNEL_MTU" => c.mtu = v.trim().parse().ok(),
            _ => {}
        }
    }
    c
}

/// Reads a forward chain's rules from `nft -j list ruleset`.
pub fn parse_nft(json: &str) -> Result<Vec<ForwardChain>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft printed no JSON ({e})"))?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    // (family, table, chain) -> rules; base chains on the forward hook with their policy.
    type Key = (String, String, String);
    let mut rules: std::collections::HashMap<Key, Vec<serde_json::Value>> = Default::default();
    let mut bases: Vec<(Key, bool)> = Vec::new();
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
    for item in &items {
        if let Some(c) = item.get("chain") {
            if c["hook"] == "forward" && c["type"] == "filter" {
                bases.push((
                    (s(&c["family"]), s(&c["table"]), s(&c["name"])),
                    c["policy"] == "drop",
                ));
            }
        } else if let Some(r) = item.get("rule") {
            rules
                .entry((s(&r["family"]), s(&r["table"]), s(&r["chain"])))
                .or_default()
                .push(r["expr"].clone());
        }
    }
    let mut out = Vec::new();
    for (key, drops) in bases {
        let mut chain = ForwardChain {
            name: format!("{} {} {}", key.0, key.1, key.2),
            drops,
            ..ForwardChain::default()
        };
        let mut seen = vec![key.clone()];
        nft_walk(&key, &rules, &mut seen, &mut chain, 0);
        out.push(chain);
    }
    Ok(out)
}

/// Adds what the rules of chain `key` (and the chains they jump to) accept to `chain`.
fn nft_walk(
    key: &(String, String, String),
    rules: &std::collections::HashMap<(String, String, String), Vec<serde_json::Value>>,
    seen: &mut Vec<(String, String, String)>,
    chain: &mut ForwardChain,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    for expr in rules.get(key).into_iter().flatten() {
        let mut iif = Vec::new();
        let mut oif = Vec::new();
        let mut other = false;
        let mut verdict: Option<String> = None;
        let mut target: Option<String> = None;
        for e in expr.as_array().into_iter().flatten() {
            if let Some(m) = e.get("match") {
                let names: Vec<String> = match &m["right"] {
                    serde_json::Value::String(n) => vec![n.clone()],
                    r => r["set"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect(),
                };
                match m["left"]["meta"]["key"].as_str() {
                    Some("iifname") if m["op"] == "==" || m["op"] == "in" => iif.extend(names),
                    Some("oifname") if m["op"] == "==" || m["op"] == "in" => oif.extend(names),
                    _ => other = true,
                }
            } else if e.get("accept").is_some() {
                verdict = Some("accept".into());
            } else if let Some(j) = e.get("jump").or_else(|| e.get("goto")) {
                target = j["target"].as_str().map(str::to_owned);
            } else if e.get("counter").is_none() && e.get("log").is_none() {
                other = true;
            }
        }
        if other {
            continue;
        }
        if verdict.is_some() {
            record(chain, &iif, &oif);
        } else if let Some(t) = target {
            // Only a jump every packet of these interfaces takes says anything.
            let next = (key.0.clone(), key.1.clone(), t);
            if !seen.contains(&next) {
                seen.push(next.clone());
                let mut sub = ForwardChain::default();
                nft_walk(&next, rules, seen, &mut sub, depth + 1);
                merge(chain, &sub, &iif, &oif);
            }
        }
    }
}

/// A plain accept for these interfaces (none named: everything).
fn record(chain: &mut ForwardChain, iif: &[String], oif: &[String]) {
    match (iif.is_empty(), oif.is_empty()) {
        (true, true) => chain.accepts_all = true,
        (false, true) => chain.accepts_in.extend(iif.iter().cloned()),
        (true, false) => chain.accepts_out.extend(oif.iter().cloned()),
        // iif X and oif Y: only between the two; counts for neither alone.
        (false, false) => {}
    }
}

/// What a jumped-to chain accepts, under the jump's own interface condition.
fn merge(chain: &mut ForwardChain, sub: &ForwardChain, iif: &[String], oif: &[String]) {
    if sub.accepts_all {
        record(chain, iif, oif);
    }
    if oif.is_empty() {
        chain.accepts_in.extend(
            sub.accepts_in
                .iter()
                .filter(|i| iif.is_empty() || iif.contains(i))
                .cloned(),
        );
    }
    if iif.is_empty() {
        chain.accepts_out.extend(
            sub.accepts_out
                .iter()
                .filter(|i| oif.is_empty() || oif.contains(i))
                .cloned(),
        );
    }
}

/// Reads the FORWARD chain from `iptables -S` (the filter table, every chain).
pub fn parse_iptables(text: &str) -> Vec<ForwardChain> {
    let mut policy_drop = None;
    let mut rules: std::collections::HashMap<String, Vec<Vec<String>>> = Default::default();
    for line in text.lines() {
        let w: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match w.as_slice() {
            [p, c, pol] if p == "-P" && c == "FORWARD" => policy_drop = Some(pol == "DROP"),
            [a, c, rest @ ..] if a == "-A" => {
                rules.entry(c.clone()).or_default().push(rest.to_vec())
            }
            _ => {}
        }
    }
    let Some(drops) = policy_drop else {
        return Vec::new();
    };
    let mut chain = ForwardChain {
        name: "FORWARD".into(),
        drops,
        ..ForwardChain::default()
    };
    let mut seen = vec!["FORWARD".to_owned()];
    iptables_walk("FORWARD", &rules, &mut seen, &mut chain, 0);
    vec![chain]
}

fn iptables_walk(
    name: &str,
    rules: &std::collections::HashMap<String, Vec<Vec<String>>>,
    seen: &mut Vec<String>,
    chain: &mut ForwardChain,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    for r in rules.get(name).into_iter().flatten() {
        let (mut iif, mut oif, mut target, mut other) = (Vec::new(), Vec::new(), None, false);
        let mut i = 0;
        while i < r.len() {
            let value = r.get(i + 1).cloned();
            match r[i].as_str() {
                "-i" | "--in-interface" => iif.extend(value),
                "-o" | "--out-interface" => oif.extend(value),
                "-j" | "-g" | "--jump" | "--goto" => target = value,
                "-c" => i += 1,
                _ => {
                    other = true;
                    break;
                }
            }
            i += 2;
        }
        if other {
            continue;
        }
        match target.as_deref() {
            Some("ACCEPT") => record(chain, &iif, &oif),
            Some(t) if rules.contains_key(t) && !seen.iter().any(|s| s == t) => {
                seen.push(t.to_owned());
                let mut sub = ForwardChain::default();
                iptables_walk(t, rules, seen, &mut sub, depth + 1);
                merge(chain, &sub, &iif, &oif);
            }
            _ => {}
        }
    }
}

/// Runs a command with a timeout; `Err` says why it gave nothing (not installed, timed out).
async fn run(bin: &str, args: &[&str]) -> Result<std::process::Output, String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{bin} is not installed"))
        }
        Ok(Err(e)) => Err(format!("cannot run {bin}: {e}")),
        Err(_) => Err(format!(
            "{bin} did not answer within {} s",
            COMMAND_TIMEOUT.as_secs()
        )),
    }
}

fn needs_root(stderr: &[u8]) -> bool {
    let s = String::from_utf8_lossy(stderr).to_ascii_lowercase();
    s.contains("permission denied") || s.contains("not permitted") || s.contains("root")
}

async fn gather_forward() -> Forward {
    match run("nft", &["-j", "list", "ruleset"]).await {
        Ok(out) if out.status.success() => {
            return match parse_nft(&String::from_utf8_lossy(&out.stdout)) {
                Ok(chains) => Forward::Read {
                    tool: "nft",
                    chains,
                },
                Err(e) => Forward::Unknown(e),
            }
        }
        Ok(out) if needs_root(&out.stderr) => {
            return Forward::Unknown(
                "reading the nftables ruleset needs root (run with sudo)".into(),
            )
        }
        Ok(out) => {
            return Forward::Unknown(format!(
                "nft -j list ruleset failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(_) => {}
    }
    match run("iptables", &["-S"]).await {
        Ok(out) if out.status.success() => Forward::Read {
            tool: "iptables",
            chains: parse_iptables(&String::from_utf8_lossy(&out.stdout)),
        },
        Ok(out) if needs_root(&out.stderr) => {
            Forward::Unknown("reading iptables needs root (run with sudo)".into())
        }
        Ok(out) => Forward::Unknown(format!(
            "iptables -S failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Forward::Unknown(format!("neither nft nor iptables is installed ({e})")),
    }
}

async fn gather_firewalld(interface: &str) -> FirewallState {
    let state = match run("firewall-cmd", &["--state"]).await {
        Err(e) if e.ends_with("not installed") => return FirewallState::Absent,
        Err(e) => return FirewallState::Unknown(e),
        Ok(o) => o,
    };
    if !state.status.success() {
        return FirewallState::Inactive;
    }
    let arg = format!("--get-zone-of-interface={interface}");
    match run("firewall-cmd", &[&arg]).await {
        Ok(o) => {
            let zone = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if o.status.success() && !zone.is_empty() {
                FirewallState::Active {
                    allows: zone == "trusted",
                    detail: format!("zone {zone}"),
                }
            } else {
                FirewallState::Active {
                    allows: false,
                    detail: "no zone (so the default zone)".into(),
                }
            }
        }
        Err(e) => FirewallState::Unknown(e),
    }
}

/// ufw's state from `ufw status`.
pub fn parse_ufw(text: &str, interface: &str) -> FirewallState {
    if !text.contains("Status: active") {
        return FirewallState::Inactive;
    }
    let on = format!("on {interface}");
    let rule = text
        .lines()
        .find(|l| l.contains(&on) && l.contains("ALLOW"));
    match rule {
        Some(r) => FirewallState::Active {
            allows: true,
            detail: r.split_whitespace().collect::<Vec<_>>().join(" "),
        },
        None => FirewallState::Active {
            allows: false,
            detail: format!("no ALLOW rule on {interface}"),
        },
    }
}

async fn gather_ufw(interface: &str) -> FirewallState {
    match run("ufw", &["status"]).await {
        Err(e) if e.ends_with("not installed") => FirewallState::Absent,
        Err(e) => FirewallState::Unknown(e),
        Ok(o) if o.status.success() => parse_ufw(&String::from_utf8_lossy(&o.stdout), interface),
        Ok(o) if needs_root(&o.stderr) || needs_root(&o.stdout) => {
            FirewallState::Unknown("ufw status needs root (run with sudo)".into())
        }
        Ok(o) => FirewallState::Unknown(format!(
            "ufw status failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

fn gather_cni(dir: &Path, flannel_env: &Path) -> (Vec<CniConfig>, Vec<String>) {
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            errors.push(format!("cannot read {}: {e}", dir.display()));
            Vec::new()
        }
    };
    files.sort();
    for p in files {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "conf" | "conflist" | "json") {
            continue;
        }
        let name = p.display().to_string();
        match std::fs::read_to_string(&p) {
            Ok(t) => match parse_cni(&name, &t) {
                Ok(c) => configs.push(c),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(format!("cannot read {name}: {e}")),
        }
    }
    if let Ok(t) = std::fs::read_to_string(flannel_env) {
        configs.push(parse_flannel_env(&flannel_env.display().to_string(), &t));
    }
    (configs, errors)
}

/// Reads everything [`judge`] needs. `status` is the daemon's answer to a status request.
pub async fn gather(sources: &Sources, status: anyhow::Result<serde_json::Value>) -> Facts {
    let daemon = match status {
        Ok(v) => daemon_from_status(&v),
        Err(e) if e.downcast_ref::<crate::api::NotRunning>().is_some() => {
            Daemon::NotRunning(format!("{e:#}"))
        }
        Err(e) if e.downcast_ref::<crate::api::NotAllowed>().is_some() => {
            Daemon::NotAllowed(format!("{e:#}"))
        }
        Err(e) => Daemon::Broken(format!("the daemon did not answer: {e:#}")),
    };
    let interface = match &daemon {
        Daemon::Online(v) => v.interface.clone(),
        _ => "mesh0".to_owned(),
    };
    let address_present = match &daemon {
        Daemon::Online(v) => mesh_sys::netlink::has_address(&v.interface, v.address)
            .await
            .ok(),
        _ => None,
    };
    let (cni, cni_errors) = gather_cni(&sources.cni_dir, &sources.flannel_env);
    let kubelet = KubeletFile {
        path: sources.kubelet_file.clone(),
        text: match std::fs::read_to_string(&sources.kubelet_file) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        },
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let proxy = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]
        .iter()
        .filter_map(|k| env(k).map(|v| ((*k).to_owned(), v)))
        .collect();
    let no_proxy = env("NO_PROXY").or_else(|| env("no_proxy"));
    let (forward, firewalld, ufw) = tokio::join!(
        gather_forward(),
        gather_firewalld(&interface),
        gather_ufw(&interface)
    );
    Facts {
        address_present,
        ip_forward: sysctl("/proc/sys/net/ipv4/ip_forward"),
        br_netfilter: Path::new("/sys/module/br_netfilter").exists()
            || Path::new("/proc/sys/net/bridge").exists(),
        bridge_nf_call_iptables: sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        swaps: std::fs::read_to_string("/proc/swaps")
            .map(|t| parse_swaps(&t))
            .map_err(|e| e.to_string()),
        kubelet,
        cni_dir: sources.cni_dir.clone(),
        cni,
        cni_errors,
        pod_cidr: sources.pod_cidr,
        service_cidr: sources.service_cidr,
        local: mesh_sys::netlink::local_networks()
            .await
            .map_err(|e| e.to_string()),
        forward,
        firewalls: vec![("firewalld", firewalld), ("ufw", ufw)],
        proxy,
        no_proxy,
        daemon,
        interface,
    }
}

/// The daemon's status, bounded in time.
pub async fn status(state: &crate::state::StateDir) -> anyhow::Result<serde_json::Value> {
    match tokio::time::timeout(
        STATUS_TIMEOUT,
        crate::api::query(
            &state.socket_path(),
            &state.read_only_socket_path(),
            crate::api::Request::Status,
        ),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "the mesh daemon did not answer within {} s",
            STATUS_TIMEOUT.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn local(n: &str, interface: &str, address: bool) -> LocalNetwork {
        LocalNetwork {
            network: net(n),
            interface: interface.into(),
            address,
        }
    }

    fn view() -> DaemonView {
        DaemonView {
            address: Ipv4Addr::new(100, 64, 0, 7),
            address6: Some("fd12:3456:789a::7".parse().expect("address6")),
            prefix_len: 16,
            mtu: 1420,
            interface: "mesh0".into(),
            port: 51820,
            controller: "192.0.2.1:7443".into(),
            connected: true,
            transport: Some("quic".into()),
            last_error: None,
            clock_offset_ms: Some(150),
            mapping: "endpoint-independent".into(),
            port_mapped: false,
            ipv6: Vec::new(),
            peers: vec![PeerView {
                name: "node-b".into(),
                path: "direct".into(),
                online: true,
                relay: None,
                endpoint: Some("198.51.100.2:51820".into()),
            }],
        }
    }

    /// A node where every check passes.
    fn good() -> Facts {
        Facts {
            daemon: Daemon::Online(Box::new(view())),
            interface: "mesh0".into(),
            address_present: Some(true),
            ip_forward: Some("1".into()),
            br_netfilter: true,
            bridge_nf_call_iptables: Some("1".into()),
            swaps: Ok(vec![]),
            kubelet: KubeletFile {
                path: "/etc/default/kubelet".into(),
                text: Ok(Some("KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n".into())),
            },
            cni_dir: "/etc/cni/net.d".into(),
            cni: vec![CniConfig {
                path: "/etc/cni/net.d/10-flannel.conflist".into(),
                kind: "flannel".into(),
                mtu: None,
                ranges: vec![],
            }],
            cni_errors: vec![],
            pod_cidr: None,
            service_cidr: net("10.96.0.0/12"),
            local: Ok(vec![
                local("192.168.1.20/24", "eth0", true),
                local("192.168.1.0/24", "eth0", false),
                local("172.17.0.1/16", "docker0", true),
                local("100.64.0.7/16", "mesh0", true),
                local("100.64.0.0/16", "mesh0", false),
                // The pod network itself and kube-proxy's service addresses.
                local("10.244.1.1/24", "cni0", true),
                local("10.244.2.0/24", "flannel.1", false),
                local("10.96.0.1/32", "kube-ipvs0", true),
            ]),
            forward: Forward::Read {
                tool: "nft",
                chains: vec![ForwardChain {
                    name: "ip filter FORWARD".into(),
                    drops: false,
                    ..ForwardChain::default()
                }],
            },
            firewalls: vec![
                ("firewalld", FirewallState::Absent),
                ("ufw", FirewallState::Inactive),
            ],
            proxy: vec![],
            no_proxy: None,
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> Vec<&'a Check> {
        checks.iter().filter(|c| c.name == name).collect()
    }

    /// The one check called `name`.
    fn one(f: &Facts, name: &str) -> Check {
        let checks = judge(f);
        let found = find(&checks, name);
        assert_eq!(found.len(), 1, "{name}: {checks:#?}");
        found[0].clone()
    }

    fn fails_with(f: &Facts, name: &str, fix: &str) {
        let c = one(f, name);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.message.contains(fix),
            "{name}: {:?} lacks {fix:?}",
            c.message
        );
    }

    #[test]
    fn a_good_node_passes_every_check() {
        let checks = judge(&good());
        for c in &checks {
            assert_eq!(c.status, Status::Ok, "{c:?}");
        }
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "overlay_address",
                "ip_forward",
                "br_netfilter",
                "bridge_nf_call_iptables",
                "swap",
                "kubelet_node_ip",
                "cni_mtu",
                "controller",
                "clock",
                "nat",
                "underlay",
                "peer_path",
                "range_overlap",
                "route_overlap",
                "forward_policy",
                "host_firewall",
                "proxy"
            ]
        );
        assert_eq!(to_json(&checks)["ok"], true);
    }

    #[test]
    fn overlay_address_missing_or_no_daemon() {
        let mut f = good();
        f.address_present = Some(false);
        fails_with(&f, "overlay_address", "systemctl restart mesh");
        f.daemon = Daemon::NotRunning("not running".into());
        fails_with(&f, "overlay_address", "systemctl start mesh");
        assert_eq!(
            one(&f, "overlay_address").message,
            "not running; where mesh.service is installed: systemctl start mesh"
        );
        // Everything that needs the daemon is skipped, saying so; the host checks still run.
        let checks = judge(&f);
        for name in [
            "controller",
            "clock",
            "nat",
            "peer_path",
            "cni_mtu",
            "kubelet_node_ip",
        ] {
            let c = find(&checks, name)[0];
            assert_eq!(c.status, Status::Skip, "{c:?}");
            assert!(c.message.contains("daemon"), "{c:?}");
        }
        assert_eq!(one(&f, "ip_forward").status, Status::Ok);
        f.daemon = Daemon::NotAllowed("permission denied".into());
        assert_eq!(one(&f, "overlay_address").status, Status::Skip);
        assert!(one(&f, "clock").message.contains("sudo"));
        f.daemon = Daemon::Pending("approve with mesh-controller node approve k8s a".into());
        fails_with(&f, "overlay_address", "node approve");
    }

    #[test]
    fn sysctls_modules_and_swap() {
        let mut f = good();
        f.ip_forward = Some("0".into());
        fails_with(&f, "ip_forward", "sysctl -w net.ipv4.ip_forward=1");
        f.ip_forward = None;
        assert_eq!(one(&f, "ip_forward").status, Status::Skip);

        let mut f = good();
        f.bridge_nf_call_iptables = Some("0".into());
        fails_with(
            &f,
            "bridge_nf_call_iptables",
            "sysctl -w net.bridge.bridge-nf-call-iptables=1",
        );
        f.br_netfilter = false;
        f.bridge_nf_call_iptables = None;
        fails_with(&f, "br_netfilter", "modprobe br_netfilter");
        let c = one(&f, "bridge_nf_call_iptables");
        assert_eq!(c.status, Status::Skip);
        assert!(c.message.contains("br_netfilter"));

        let mut f = good();
        f.swaps = Ok(vec!["/dev/sda2".into()]);
        let c = one(&f, "swap");
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("swapoff -a") && c.message.contains("/dev/sda2"));
        assert_eq!(
            parse_swaps("Filename\tType\tSize\tUsed\tPriority\n/swap.img file 1 0 -2\n"),
            ["/swap.img"]
        );
        assert!(parse_swaps("Filename\tType\tSize\tUsed\tPriority\n").is_empty());
    }

    #[test]
    fn kubelet_file_must_name_the_overlay_address() {
        let mut f = good();
        f.kubelet.text = Ok(Some(
            "KUBELET_EXTRA_ARGS=\"--node-ip=10.0.0.5 --max-pods=200\"\n".into(),
        ));
        fails_with(&f, "kubelet_node_ip", "mesh kubeadm node-ip");
        f.kubelet.text = Ok(Some("# nothing yet\n".into()));
        fails_with(&f, "kubelet_node_ip", "mesh kubeadm node-ip");
        f.kubelet.text = Ok(Some(
            "KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip 100.64.0.7\"\n".into(),
        ));
        assert_eq!(one(&f, "kubelet_node_ip").status, Status::Ok);
        // Both overlay addresses (`mesh kubeadm node-ip --dual-stack`) are right too.
        f.kubelet.text = Ok(Some(
            "KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7,fd12:3456:789a::7\n".into(),
        ));
        let c = one(&f, "kubelet_node_ip");
        assert_eq!(c.status, Status::Ok, "{}", c.message);
        assert!(c.message.contains("100.64.0.7,fd12:3456:789a::7"));
        // Another IPv6 address is not.
        f.kubelet.text = Ok(Some(
            "KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7,fd12:3456:789a::8\n".into(),
        ));
        fails_with(&f, "kubelet_node_ip", "mesh kubeadm node-ip");
        f.kubelet.text = Ok(None);
        let c = one(&f, "kubelet_node_ip");
        assert_eq!(c.status, Status::Skip);
        assert!(c.message.contains("mesh kubeadm node-ip"));
        f.kubelet.text = Err("permission denied".into());
        assert_eq!(one(&f, "kubelet_node_ip").status, Status::Skip);
    }

    #[test]
    fn cni_mtu_must_fit_in_mesh0() {
        let mut f = good();
        f.cni = vec![CniConfig {
            path: "/etc/cni/net.d/10-bridge.conf".into(),
            kind: "bridge".into(),
            mtu: Some(1500),
            ranges: vec![],
        }];
        fails_with(&f, "cni_mtu", "\"mtu\": 1420");
        f.cni[0].mtu = Some(1420);
        assert_eq!(one(&f, "cni_mtu").status, Status::Ok);
        f.cni[0].mtu = None;
        let c = one(&f, "cni_mtu");
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("\"mtu\": 1420"), "{c:?}");
        // flannel's VXLAN needs 50 bytes: subnet.env's MTU must leave them.
        f.cni = vec![parse_flannel_env(
            "/run/flannel/subnet.env",
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n",
        )];
        fails_with(&f, "cni_mtu", "\"mtu\": 1370");
        f.cni[0].mtu = Some(1370);
        assert_eq!(one(&f, "cni_mtu").status, Status::Ok);
        f.cni.clear();
        let c = one(&f, "cni_mtu");
        assert_eq!(c.status, Status::Skip);
        assert!(c.message.contains("mesh kubeadm cni-mtu"), "{c:?}");
    }

    #[test]
    fn cni_files_parse() {
        let list = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
            {"type":"bridge","bridge":"cni0","mtu":1400,
             "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.3.0/24"}]]}},
            {"type":"portmap"}]}"#;
        let c = parse_cni("a.conflist", list).unwrap();
        assert_eq!(c.kind, "bridge");
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.ranges, [net("10.244.3.0/24")]);
        let conf = r#"{"type":"bridge","ipam":{"type":"host-local","subnet":"10.250.0.0/16"}}"#;
        let c = parse_cni("b.conf", conf).unwrap();
        assert_eq!(
            (c.mtu, c.ranges.clone()),
            (None, vec![net("10.250.0.0/16")])
        );
        assert!(parse_cni("c.conf", "{not json")
            .unwrap_err()
            .contains("c.conf"));
        let env = parse_flannel_env("s", "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_MTU=1370\n");
        assert_eq!(
            (env.mtu, env.ranges),
            (Some(1370), vec![net("10.42.0.0/16")])
        );
    }

    #[test]
    fn pod_range_comes_from_flag_then_cni_then_default() {
        let mut f = good();
        assert_eq!(pod_ranges(&f).0, [net("10.244.0.0/16")]);
        f.cni[0].ranges = vec![net("10.42.0.0/16")];
        f.cni.push(CniConfig {
            path: "x".into(),
            kind: "bridge".into(),
            mtu: Some(1370),
            ranges: vec![net("10.42.7.0/24")],
        });
        assert_eq!(pod_ranges(&f).0, [net("10.42.0.0/16")]);
        f.pod_cidr = Some(net("10.200.0.0/16"));
        assert_eq!(pod_ranges(&f).0, [net("10.200.0.0/16")]);
    }

    #[test]
    fn controller_clock_nat_and_peers() {
        let with = |change: &dyn Fn(&mut DaemonView)| {
            let mut f = good();
            let mut v = view();
            change(&mut v);
            f.daemon = Daemon::Online(Box::new(v));
            f
        };
        let f = with(&|v| v.transport = Some("tcp".into()));
        assert_eq!(one(&f, "controller").status, Status::Warn);
        let f = with(&|v| {
            v.connected = false;
            v.last_error = Some("timed out".into());
        });
        fails_with(&f, "controller", "timed out");

        let f = with(&|v| v.clock_offset_ms = None);
        assert_eq!(one(&f, "clock").status, Status::Skip);
        let f = with(&|v| v.clock_offset_ms = Some(-10_000));
        let c = one(&f, "clock");
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("10.0 s ahead of") && c.message.contains("timedatectl"));
        let f = with(&|v| v.clock_offset_ms = Some(300_000));
        fails_with(&f, "clock", "timedatectl set-ntp true");

        let f = with(&|v| v.mapping = "endpoint-dependent".into());
        let c = one(&f, "nat");
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("forward UDP port 51820"));
        let f = with(&|v| {
            v.mapping = "endpoint-dependent".into();
            v.port_mapped = true;
        });
        assert_eq!(one(&f, "nat").status, Status::Ok);
        let f = with(&|v| v.mapping = "unknown".into());
        assert_eq!(one(&f, "nat").status, Status::Warn);

        let f = with(&|v| {
            v.mapping = "endpoint-dependent".into();
            v.peers.push(PeerView {
                name: "node-c".into(),
                path: "relay".into(),
                online: true,
                relay: Some("eu-1".into()),
                endpoint: None,
            });
            v.peers.push(PeerView {
                name: "node-d".into(),
                path: "none".into(),
                online: true,
                relay: None,
                endpoint: None,
            });
            v.peers.push(PeerView {
                name: "node-e".into(),
                path: "direct".into(),
                online: false,
                relay: None,
                endpoint: None,
            });
        });
        let checks = judge(&f);
        let peers = find(&checks, "peer_path");
        let status: Vec<Status> = peers.iter().map(|c| c.status).collect();
        assert_eq!(
            status,
            [Status::Ok, Status::Warn, Status::Fail, Status::Warn]
        );
        assert!(
            peers[1].message.contains("eu-1") && peers[1].message.contains("endpoint-dependent")
        );
        assert!(peers[2].message.contains("node-d"));
        let f = with(&|v| v.peers.clear());
        assert_eq!(one(&f, "peer_path").status, Status::Ok);
    }

    #[test]
    fn ranges_overlapping_each_other() {
        let mut f = good();
        f.pod_cidr = Some(net("10.96.0.0/16"));
        fails_with(&f, "range_overlap", "--service-cidr");
        let mut f = good();
        f.pod_cidr = Some(net("100.64.0.0/16"));
        fails_with(&f, "range_overlap", "--pod-network-cidr");
    }

    #[test]
    fn ranges_overlapping_local_routes_and_addresses() {
        // A homelab LAN in 10.244/16: one finding (address and its kernel route count once).
        let mut f = good();
        if let Ok(l) = &mut f.local {
            l.push(local("10.244.5.1/24", "eth1", true));
            l.push(local("10.244.5.0/24", "eth1", false));
        }
        let c = one(&f, "route_overlap");
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("address 10.244.5.1/24 on eth1"), "{c:?}");
        assert!(!c.message.contains("route 10.244.5.0/24"), "{c:?}");
        assert!(c.message.contains("--pod-network-cidr"), "{c:?}");
        // docker0 in the overlay range; a route of the service range.
        let mut f = good();
        f.local = Ok(vec![
            local("100.64.0.1/16", "docker0", true),
            local("10.100.0.0/16", "eth0", false),
            local("0.0.0.0/0", "eth0", false),
        ]);
        let checks = judge(&f);
        let found = find(&checks, "route_overlap");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].message.contains("overlay range") && found[0].message.contains("docker0"));
        assert!(
            found[1].message.contains("service range")
                && found[1].message.contains("--service-cidr")
        );
        f.local = Err("no netlink".into());
        assert_eq!(one(&f, "route_overlap").status, Status::Skip);
    }

    #[test]
    fn overlay_conflicts_for_join() {
        let l = vec![
            local("100.64.0.7/16", "mesh0", true),
            local("100.64.3.0/24", "wg0", false),
            local("192.168.1.2/24", "eth0", true),
        ];
        let found = overlay_conflicts(net("100.64.0.0/16"), "mesh0", &l);
        assert_eq!(found, [local("100.64.3.0/24", "wg0", false)]);
        assert_eq!(describe(&found[0]), "route 100.64.3.0/24 on wg0");
        // A wider local route covers the overlay too.
        let l = vec![local("100.0.0.0/8", "eth0", false)];
        assert_eq!(
            overlay_conflicts(net("100.64.0.0/16"), "mesh0", &l).len(),
            1
        );
    }

    #[test]
    fn forward_chain_dropping_without_accepts() {
        let mut f = good();
        f.forward = Forward::Read {
            tool: "nft",
            chains: vec![ForwardChain {
                name: "ip filter FORWARD".into(),
                drops: true,
                accepts_in: vec!["mesh0".into()],
                ..ForwardChain::default()
            }],
        };
        let c = one(&f, "forward_policy");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message
                .contains("nft insert rule ip filter FORWARD oifname \"mesh0\" accept"),
            "{c:?}"
        );
        // cni0 exists in the good facts: it needs accepting too.
        assert!(c.message.contains("iifname \"cni0\""), "{c:?}");
        assert!(!c.message.contains("iifname \"mesh0\""), "{c:?}");
        f.forward = Forward::Read {
            tool: "iptables",
            chains: vec![ForwardChain {
                name: "FORWARD".into(),
                drops: true,
                ..ForwardChain::default()
            }],
        };
        fails_with(
            &f,
            "forward_policy",
            "iptables -I FORWARD -i mesh0 -j ACCEPT",
        );
        f.forward = Forward::Read {
            tool: "iptables",
            chains: vec![ForwardChain {
                name: "FORWARD".into(),
                drops: true,
                accepts_in: vec!["mesh0".into(), "cni0".into()],
                accepts_out: vec!["mesh0".into(), "cni0".into()],
                ..ForwardChain::default()
            }],
        };
        assert_eq!(one(&f, "forward_policy").status, Status::Ok);
        f.forward = Forward::Unknown("needs root".into());
        assert_eq!(one(&f, "forward_policy").status, Status::Skip);
    }

    #[test]
    fn nft_json_is_read_through_jumps() {
        let json = r#"{"nftables":[
          {"metainfo":{"version":"1.0.9"}},
          {"table":{"family":"ip","name":"filter","handle":1}},
          {"chain":{"family":"ip","table":"filter","name":"FORWARD","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
          {"chain":{"family":"ip","table":"filter","name":"DOCKER-USER","handle":2}},
          {"chain":{"family":"inet","table":"mesh","name":"guard","handle":3,"type":"filter","hook":"forward","prio":0,"policy":"accept"}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":4,"expr":[{"counter":{"packets":0,"bytes":0}},{"jump":{"target":"DOCKER-USER"}}]}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":5,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"docker0"}},{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":6,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"mesh0"}},{"accept":null}]}},
          {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":7,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":{"set":["mesh0","cni0"]}}},{"counter":null},{"accept":null}]}},
          {"rule":{"family":"inet","table":"mesh","chain":"guard","handle":8,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"mesh0"}},{"drop":null}]}}
        ]}"#;
        let chains = parse_nft(json).unwrap();
        assert_eq!(chains.len(), 2);
        let fwd = &chains[0];
        assert_eq!(fwd.name, "ip filter FORWARD");
        assert!(fwd.drops && !fwd.accepts_all);
        assert_eq!(fwd.accepts_in, ["mesh0", "cni0"]);
        // docker0's accept holds only for established traffic: not a plain accept.
        assert_eq!(fwd.accepts_out, ["mesh0"]);
        assert!(!chains[1].drops);
        assert!(parse_nft("nope").is_err());
    }

    #[test]
    fn iptables_rules_are_read_through_jumps() {
        let text = "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N DOCKER-USER\n-N MESH\n\
                    -A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                    -A FORWARD -i mesh0 -j MESH\n-A FORWARD -o mesh0 -j ACCEPT\n-A DOCKER-USER -j RETURN\n-A MESH -j ACCEPT\n";
        let chains = parse_iptables(text);
        assert_eq!(chains.len(), 1);
        assert!(chains[0].drops && !chains[0].accepts_all);
        assert_eq!(chains[0].accepts_in, ["mesh0"]);
        assert_eq!(chains[0].accepts_out, ["mesh0"]);
        assert!(!parse_iptables("-P FORWARD ACCEPT\n")[0].drops);
        assert!(parse_iptables("").is_empty());
    }

    #[test]
    fn host_firewalls() {
        let mut f = good();
        f.firewalls = vec![(
            "firewalld",
            FirewallState::Active {
                allows: false,
                detail: "zone public".into(),
            },
        )];
        fails_with(
            &f,
            "host_firewall",
            "firewall-cmd --permanent --zone=trusted --add-interface=mesh0",
        );
        f.firewalls = vec![(
            "ufw",
            parse_ufw(
                "Status: active\n\nTo Action From\n22/tcp ALLOW Anywhere\n",
                "mesh0",
            ),
        )];
        fails_with(&f, "host_firewall", "ufw allow in on mesh0");
        f.firewalls = vec![(
            "ufw",
            parse_ufw("Status: active\n\nTo                         Action      From\nAnywhere on mesh0          ALLOW       Anywhere\n", "mesh0"),
        )];
        assert_eq!(one(&f, "host_firewall").status, Status::Ok);
        assert_eq!(
            parse_ufw("Status: inactive\n", "mesh0"),
            FirewallState::Inactive
        );
        f.firewalls = vec![(
            "ufw",
            FirewallState::Unknown("ufw status needs root".into()),
        )];
        assert_eq!(one(&f, "host_firewall").status, Status::Skip);
    }

    #[test]
    fn proxy_needs_no_proxy_for_every_range() {
        let mut f = good();
        f.proxy = vec![("HTTPS_PROXY".into(), "http://proxy:3128".into())];
        f.no_proxy = Some("localhost,10.0.0.0/8".into());
        let c = one(&f, "proxy");
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("misses 100.64.0.0/16"), "{c:?}");
        assert!(
            c.message
                .contains("NO_PROXY=localhost,10.0.0.0/8,100.64.0.0/16"),
            "{c:?}"
        );
        assert!(!c.message.contains("10.244.0.0/16,"), "{c:?}");
        f.no_proxy = Some("localhost, 10.0.0.0/8 ,100.64.0.0/10".into());
        assert_eq!(one(&f, "proxy").status, Status::Ok);
        f.no_proxy = Some("*".into());
        assert_eq!(one(&f, "proxy").status, Status::Ok);
        f.no_proxy = None;
        fails_with(
            &f,
            "proxy",
            "NO_PROXY=100.64.0.0/16,10.244.0.0/16,10.96.0.0/12",
        );
    }

    #[test]
    fn status_json_is_read() {
        let v = serde_json::json!({
            "state": "online",
            "node": {"address": "100.64.0.7", "prefix_len": 16, "mtu": 1400, "interface": "mesh0", "port": 51821},
            "controller": {"address": "192.0.2.1:7443", "connected": true, "transport": "tcp", "clock_offset_ms": -42},
            "nat": {"mapping": "endpoint-dependent"},
            "port_mapping": {"state": "mapped"},
            "peers": [{"name": "b", "path": "relay", "online": true, "relay": "eu-1", "endpoint": null}],
        });
        let Daemon::Online(d) = daemon_from_status(&v) else {
            panic!("not online");
        };
        assert_eq!(d.overlay(), net("100.64.0.0/16"));
        assert_eq!((d.mtu, d.port, d.clock_offset_ms), (1400, 51821, Some(-42)));
        assert_eq!(d.transport.as_deref(), Some("tcp"));
        assert!(d.port_mapped && d.connected);
        assert_eq!(d.peers[0].relay.as_deref(), Some("eu-1"));
        let pending = serde_json::json!({"state": "waiting_for_approval", "approve_with": "mesh-controller node approve k8s a"});
        assert!(
            matches!(daemon_from_status(&pending), Daemon::Pending(m) if m.contains("node approve k8s a"))
        );
        assert!(matches!(
            daemon_from_status(&serde_json::json!({"error": "x"})),
            Daemon::Broken(_)
        ));
    }

    #[test]
    fn output_lines_and_json() {
        let c = check("swap", Status::Fail, "swap is on");
        assert_eq!(line(&c), format!("FAIL {:<24} swap is on", "swap"));
        let j = to_json(&[c, check("nat", Status::Ok, "fine")]);
        assert_eq!(j["ok"], false);
        assert_eq!(j["checks"][0]["status"], "fail");
        assert_eq!(j["checks"][1]["name"], "nat");
    }
}
