//! Flannel-style pod networking on top of `mesh0`, the way a Kubernetes cluster runs it over
//! the mesh: what a user does after `mesh join`, built with `ip` and `bridge` only (no flannel
//! daemon).
//!
//! Flannel's VXLAN backend, reproduced: the pod network is 10.244.0.0/16; node `N` gets
//! 10.244.N.0/24. Each node has a kernel vxlan device `flannel.1` (VNI 1, UDP port 8472) over
//! `mesh0`, whose local address is the node's overlay address, with 10.244.N.0/32 on it; for
//! every other node `M` it has a permanent neighbour entry (10.244.M.0 → M's VTEP MAC), a
//! forwarding entry (that MAC → M's overlay address) and the route `10.244.M.0/24 via 10.244.M.0
//! dev flannel.1 onlink`. A node that runs pods has the bridge `cni0` with 10.244.N.1/24, and a
//! pod is a namespace with a veth on that bridge. So pod traffic between nodes is VXLAN between
//! overlay addresses, inside WireGuard: exactly what the mesh must carry without ever carrying
//! its own packets.
//!
//! Everything lives inside namespaces of the lab; the pod range is never used outside them.

use crate::netns::{ip, Host, Netns};
use crate::process::run;
use anyhow::{bail, Result};
use std::net::Ipv4Addr;

/// Name of the vxlan device, as flannel names it.
pub const VXLAN_DEV: &str = "flannel.1";
/// Flannel's VXLAN network identifier.
pub const VXLAN_ID: u32 = 1;
/// Flannel's VXLAN UDP port (the Linux default, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// Name of the CNI bridge.
pub const BRIDGE_DEV: &str = "cni0";

/// Whether `addr` lies in the pod network 10.244.0.0/16.
pub fn in_pod_network(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    a == 10 && b == 244
}

/// Whether `addr` lies in the mesh's overlay range 100.64.0.0/10.
pub fn in_overlay_range(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    a == 100 && (64..128).contains(&b)
}

/// One node of the pod network: its host, its index `N` (its pod subnet is 10.244.N.0/24) and
/// its overlay address (the VTEP address flannel would take from `mesh0`).
#[derive(Debug, Clone)]
pub struct FlannelNode {
    /// The host it runs in.
    pub host: Host,
    /// Its subnet index, 1..=254.
    pub index: u8,
    /// Its overlay address on `mesh0`.
    pub overlay: Ipv4Addr,
}

impl FlannelNode {
    /// The address of its `flannel.1`: 10.244.N.0.
    pub fn vtep_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 0)
    }

    /// The MAC of its `flannel.1` (locally administered, unicast), fixed so that peers can be
    /// told it up front, as flannel publishes it in the node's annotations.
    pub fn vtep_mac(&self) -> String {
        format!("0a:58:0a:f4:{:02x}:00", self.index)
    }

    /// Its pod subnet, 10.244.N.0/24.
    pub fn subnet(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
}

fn bridge_cmd(ns: &str, args: &[&str]) -> Result<()> {
    let out = run(ns, "bridge", args);
    if !out.success() {
        bail!("`bridge {}` failed in {ns}: {out}", args.join(" "));
    }
    Ok(())
}

/// Creates `flannel.1` on `node` over `underlay` (the mesh interface, `mesh0`) with MTU `mtu`,
/// and the neighbour, forwarding and route entries toward every other node of `all`.
pub fn flannel_up(node: &FlannelNode, all: &[FlannelNode], underlay: &str, mtu: u32) -> Result<()> {
    let ns = node.host.ns.as_str();
    let (id, port, mtu) = (
        VXLAN_ID.to_string(),
        VXLAN_PORT.to_string(),
        mtu.to_string(),
    );
    let (local, mac) = (node.overlay.to_string(), node.vtep_mac());
    ip([
        "-n",
        ns,
        "link",
        "add",
        VXLAN_DEV,
        "address",
        &mac,
        "mtu",
        &mtu,
        "type",
        "vxlan",
        "id",
        &id,
        "dstport",
        &port,
        "dev",
        underlay,
        "local",
        &local,
        "nolearning",
    ])?;
    let vtep = format!("{}/32", node.vtep_ip());
    ip(["-n", ns, "addr", "add", &vtep, "dev", VXLAN_DEV])?;
    ip(["-n", ns, "link", "set", VXLAN_DEV, "up"])?;
    for peer in all.iter().filter(|p| p.index != node.index) {
        let (peer_vtep, peer_mac) = (peer.vtep_ip().to_string(), peer.vtep_mac());
        ip([
            "-n",
            ns,
            "neigh",
            "replace",
            &peer_vtep,
            "lladdr",
            &peer_mac,
            "dev",
            VXLAN_DEV,
            "nud",
            "permanent",
        ])?;
        bridge_cmd(
            ns,
            &[
                "fdb",
                "append",
                &peer_mac,
                "dev",
                VXLAN_DEV,
                "dst",
                &peer.overlay.to_string(),
                "self",
                "permanent",
            ],
        )?;
        ip([
            "-n",
            ns,
            "route",
            "replace",
            &peer.subnet(),
            "via",
            &peer_vtep,
            "dev",
            VXLAN_DEV,
            "onlink",
        ])?;
    }
    Ok(())
}

/// A CNI bridge `cni0` on a node with the node's pod gateway address 10.244.N.1/24, and one pod
/// (a namespace of its own, deleted on drop) at 10.244.N.2 behind it. The node forwards
/// (`ip_forward=1`, as Kubernetes requires).
#[derive(Debug)]
pub struct CniBridge {
    /// The bridge's address, the pods' gateway: 10.244.N.1.
    pub gateway: Ipv4Addr,
    /// The pod's address: 10.244.N.2.
    pub pod_ip: Ipv4Addr,
    /// The pod, as a host (to run commands in it).
    pub pod: Host,
    _pod_ns: Netns,
}

impl CniBridge {
    /// Creates the bridge, the pod and its veth (MTU `mtu`, the pod MTU) on `node`.
    pub fn new(node: &FlannelNode, mtu: u32) -> Result<CniBridge> {
        let ns = node.host.ns.as_str();
        let gateway = Ipv4Addr::new(10, 244, node.index, 1);
        let pod_ip = Ipv4Addr::new(10, 244, node.index, 2);
        let mtu = mtu.to_string();
        ip(["-n", ns, "link", "add", BRIDGE_DEV, "type", "bridge"])?;
        ip([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            BRIDGE_DEV,
        ])?;
        ip(["-n", ns, "link", "set", BRIDGE_DEV, "mtu", &mtu, "up"])?;
        let pod_ns = Netns::new()?;
        let pod = Host {
            name: format!("{}-pod", node.host.name),
            ns: pod_ns.name().to_string(),
            ip: pod_ip,
            ip6: None,
        };
        ip([
            "-n", ns, "link", "add", "vethpod", "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "netns", &pod.ns,
        ])?;
        ip([
            "-n", ns, "link", "set", "vethpod", "master", BRIDGE_DEV, "up",
        ])?;
        ip([
            "-n",
            &pod.ns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(["-n", &pod.ns, "link", "set", "eth0", "up"])?;
        ip([
            "-n",
            &pod.ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        let out = run(ns, "sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
        if !out.success() {
            bail!("enabling forwarding on {}: {out}", node.host.name);
        }
        Ok(CniBridge {
            gateway,
            pod_ip,
            pod,
            _pod_ns: pod_ns,
        })
    }
}

/// Where Debian's `containernetworking-plugins` installs the reference CNI plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Whether the reference plugins this module runs are installed in [`CNI_PATH`].
pub fn plugins_installed() -> bool {
    ["bridge", "host-local", "portmap"]
        .iter()
        .all(|p| std::path::Path::new(CNI_PATH).join(p).is_file())
}

/// A pod made by the real CNI plugins, the way kubelet (through the container runtime) makes
/// one: a namespace of its own, then each plugin of the node's conflist run in the node's
/// namespace with `CNI_COMMAND=ADD`, the list's `name` and `cniVersion` put into each plugin's
/// config and the previous plugin's result passed on as `prevResult`. [`CniPod::del`] runs DEL in
/// reverse order; dropping the pod runs it if the test did not, then deletes the namespace.
#[derive(Debug)]
pub struct CniPod {
    /// The pod, as a host (to run commands in it); `ip` is its address from host-local.
    pub pod: Host,
    node: Host,
    container_id: String,
    /// Each plugin's config as passed to ADD (without `prevResult`).
    plugins: Vec<serde_json::Value>,
    /// The last plugin's result.
    result: serde_json::Value,
    deleted: bool,
    _ns: Netns,
}

/// Runs the CNI plugin `conf["type"]` in namespace `node_ns` with `conf` on its stdin.
fn run_plugin(
    node_ns: &str,
    command: &str,
    container_id: &str,
    pod_ns: &str,
    conf: &serde_json::Value,
) -> Result<serde_json::Value> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let Some(kind) = conf["type"].as_str() else {
        bail!("a plugin config without \"type\": {conf}");
    };
    let bin = std::path::Path::new(CNI_PATH).join(kind);
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(&bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI {command} of {kind} in {node_ns} failed ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_str(&stdout)?)
}

impl CniPod {
    /// Adds a pod named `name` on `node` with the network config list `conflist` (its text).
    /// `data_dir` becomes host-local's `dataDir`, so that the lab's nodes, which share this
    /// machine's file system, keep their address leases apart.
    pub fn add(
        node: &Host,
        conflist: &str,
        name: &str,
        data_dir: &std::path::Path,
    ) -> Result<CniPod> {
        let list: serde_json::Value = serde_json::from_str(conflist)?;
        let ns = Netns::new()?;
        let container_id = format!("{}-{}", node.name, name);
        let mut plugins = Vec::new();
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            if conf["ipam"]["type"] == "host-local" {
                conf["ipam"]["dataDir"] = data_dir.to_string_lossy().into_owned().into();
            }
            plugins.push(conf);
        }
        let mut pod = CniPod {
            pod: Host {
                name: format!("{}-{name}", node.name),
                ns: ns.name().to_string(),
                ip: Ipv4Addr::UNSPECIFIED,
                ip6: None,
            },
            node: node.clone(),
            container_id,
            plugins,
            result: serde_json::Value::Null,
            deleted: false,
            _ns: ns,
        };
        let mut prev = serde_json::Value::Null;
        for conf in &pod.plugins {
            let mut conf = conf.clone();
            if !prev.is_null() {
                conf["prevResult"] = prev.clone();
            }
            prev = run_plugin(&node.ns, "ADD", &pod.container_id, &pod.pod.ns, &conf)?;
        }
        let address = prev["ips"][0]["address"].as_str().unwrap_or_default();
        pod.pod.ip = address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| anyhow::anyhow!("the CNI result has no IPv4 address: {prev}"))?;
        pod.result = prev;
        Ok(pod)
    }

    /// The final result of ADD (interfaces, ips, routes).
    pub fn result(&self) -> &serde_json::Value {
        &self.result
    }

    /// CNI DEL: every plugin in reverse order, each with the ADD result as `prevResult`.
    pub fn del(&mut self) -> Result<()> {
        self.deleted = true;
        for conf in self.plugins.iter().rev() {
            let mut conf = conf.clone();
            conf["prevResult"] = self.result.clone();
            run_plugin(
                &self.node.ns,
                "DEL",
                &self.container_id,
                &self.pod.ns,
                &conf,
            )?;
        }
        Ok(())
    }
}

impl Drop for CniPod {
    fn drop(&mut self) {
        if !self.deleted {
            if let Err(e) = self.del() {
                eprintln!("mesh-e2e: CNI DEL of {}: {e:#}", self.pod.name);
            }
        }
    }
}
