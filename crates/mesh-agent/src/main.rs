//! `mesh`: the node agent and its CLI.

mod api;
mod approval;
mod candidates;
mod config;
mod control;
mod daemon;
mod dataplane;
mod dial;
mod dns;
mod doctor;
mod exits;
mod handover;
mod hosts;
mod kubeadm;
mod metrics;
mod names;
mod podcidr;
mod portmap;
mod relays;
mod state;
mod token_source;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_proto::token::JoinArg;
use state::StateDir;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use token_source::TokenSource;

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "mesh node agent: a stable overlay IP on every machine"
)]
struct Cli {
    /// State directory (node key, membership, peer cache, control socket) [default: /var/lib/mesh].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Configuration file; flags win over it [default: /etc/mesh/mesh.toml if present].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Daemon flags shared by `join` and `up`; each overrides the config file.
#[derive(clap::Args, Clone, Default)]
struct DaemonFlags {
    /// UDP port for WireGuard and control traffic [default: 51820].
    #[arg(long)]
    port: Option<u16>,
    /// MTU of the overlay interface [default: 1420].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    mtu: Option<u32>,
    /// Name of the TUN device [default: mesh0].
    #[arg(long)]
    interface: Option<String>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9101 [default: off].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Interfaces whose addresses peers may try as this node's endpoints: comma-separated glob
    /// patterns on interface names (`*` any characters, `?` one); a leading `!` denies.
    ///
    /// `eth0,ens*`: only those interfaces. `!docker*,!eth1`: the defaults, and these denied as
    /// well. Deny wins over allow. Quote the list for the shell ('!eth1'). By default every
    /// interface is used except bridges, dummies and tunnels (docker0, kube-ipvs0, wg0, ...)
    /// and container, pod-network and VPN devices by name (veth*, cali*, tailscale*, ...),
    /// but never the interface of the default route. Saved with the node's state, so a
    /// later `mesh up` keeps it; an empty LIST ("") goes back to the defaults. `mesh status
    /// --json` lists the interfaces left out and why (`endpoint_interfaces.skipped`).
    #[arg(long, value_name = "LIST")]
    endpoint_interfaces: Option<String>,
    /// IPv4 and IPv6 prefixes this node routes and offers its peers (subnet routes),
    /// comma-separated, e.g. its pod subnets `10.244.1.0/24,fd00:10:244:1::/64`. The controller approves them (by network policy or
    /// `mesh-controller route approve`); peers then route them through mesh0. Saved with the
    /// node's state; "" advertises none. At run time: `mesh routes advertise|withdraw`.
    ///
    /// `auto` (alone or beside prefixes) advertises the node's pod subnet as the cluster
    /// assigns it, and follows it when it changes: from flannel's /run/flannel/subnet.env, else
    /// from the host-local range of the first CNI config in /etc/cni/net.d (such as the one
    /// `mesh kubeadm cni --write` writes).
    #[arg(long, value_name = "PREFIX,...|auto")]
    advertise_routes: Option<String>,
    /// Where `--advertise-routes auto` looks for CNI configs [default: /etc/cni/net.d].
    #[arg(long, value_name = "DIR", hide = true)]
    cni_conf_dir: Option<PathBuf>,
    /// Where `--advertise-routes auto` looks for flannel's subnet file [default:
    /// /run/flannel/subnet.env].
    #[arg(long, value_name = "PATH", hide = true)]
    flannel_subnet_env: Option<PathBuf>,
    /// Do not ask the router to forward the UDP port (UPnP IGD, NAT-PMP, PCP).
    ///
    /// By default the agent asks the default gateway for a mapping of its port, renews it and
    /// removes it when it stops; peers then reach the node at the mapped address. Saved with
    /// the node's state, so a later `mesh up` keeps it; `--port-mapping` turns it back on.
    #[arg(long, overrides_with = "port_mapping")]
    no_port_mapping: bool,
    /// Ask the router to forward the UDP port (the default; undoes a saved
    /// --no-port-mapping).
    #[arg(long, overrides_with = "no_port_mapping")]
    port_mapping: bool,
    /// Prefixes this node offers as an exit, comma-separated: `0.0.0.0/0,::/0` for everything
    /// (a site whose uplink reaches registries and mirrors others cannot). Approved like
    /// routes; peers use an exit only when they choose it (--exit-node). The node masquerades
    /// what it forwards there and needs net.ipv4.ip_forward=1 (net.ipv6.conf.all.forwarding=1
    /// for IPv6 prefixes). Saved; "" offers none.
    #[arg(long, value_name = "PREFIX,...")]
    advertise_exit: Option<String>,
    /// Send everything without a more specific route through NODE's exit (which it offers
    /// with --advertise-exit 0.0.0.0/0 and the controller approved; IPv6 too where it offers
    /// ::/0); mesh's own traffic keeps the underlay. Saved; "" stops.
    #[arg(long, value_name = "NODE")]
    exit_node: Option<String>,
    /// Send these prefixes through a peer's exit: comma-separated "PREFIX via NODE" (e.g.
    /// "198.51.100.0/24 via site-a"). Saved; "" for none.
    #[arg(long, value_name = "\"PREFIX via NODE\",...")]
    use_routes: Option<String>,
    /// Do not answer node names on the overlay address (by default the agent answers
    /// `<node>`, `<node>.<network>.mesh` and the network's names for several nodes there, on
    /// port 53, and refuses every other name). Saved with the node's state; `--dns` turns it
    /// back on.
    #[arg(long, overrides_with = "dns")]
    no_dns: bool,
    /// Answer node names on the overlay address (the default; undoes a saved --no-dns).
    #[arg(long, overrides_with = "no_dns")]
    dns: bool,
    /// Keep every node's name in a block of /etc/hosts (between `# BEGIN mesh <network>` and
    /// `# END mesh <network>`; nothing else in the file is touched; the block goes when the
    /// node leaves), for hosts whose resolver cannot be pointed at the overlay address.
    /// Saved with the node's state; `--no-hosts-file` turns it off.
    #[arg(long, overrides_with = "no_hosts_file")]
    hosts_file: bool,
    /// Do not keep node names in /etc/hosts (the default; undoes a saved --hosts-file).
    #[arg(long, overrides_with = "hosts_file")]
    no_hosts_file: bool,
    /// Run the daemon in this process even where systemd runs mesh.service (by default the
    /// unit runs it there, and the command returns once the node is online).
    #[arg(long)]
    foreground: bool,
}

impl DaemonFlags {
    /// Whether any flag only a foreground daemon would apply was given.
    fn any_run_flag(&self) -> bool {
        self.port.is_some()
            || self.mtu.is_some()
            || self.interface.is_some()
            || self.metrics_listen.is_some()
            || self.endpoint_interfaces.is_some()
            || self.no_port_mapping
            || self.port_mapping
            || self.advertise_routes.is_some()
            || self.advertise_exit.is_some()
            || self.exit_node.is_some()
            || self.use_routes.is_some()
            || self.dns
            || self.no_dns
            || self.hosts_file
            || self.no_hosts_file
            || self.cni_conf_dir.is_some()
            || self.flannel_subnet_env.is_some()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Join a network by its id (the administrator approves the node) or with a join token
    /// (approved in advance, for automation), then run the daemon: where systemd runs and
    /// mesh.service is installed, the unit runs it and the command returns once the node is
    /// online; elsewhere (or with --foreground) it runs in the foreground, as `mesh up`.
    ///
    /// A network id (`meshnet1_...`, from `mesh-controller network id NETWORK`) holds no secret:
    /// pass it as the argument. The node waits until the administrator runs `mesh-controller
    /// node approve NETWORK NAME`, for ever unless --wait says otherwise.
    ///
    /// Give a token with --token-file PATH, on standard input (`mesh join -`) or in the
    /// MESH_TOKEN environment variable. The daemon does not keep it: once the node has joined
    /// and saved its state, the process continues as `mesh up` (same PID).
    Join {
        /// The network id from `mesh-controller network id NETWORK`; or a join token from
        /// `mesh-controller token create`, or `-` to read one from standard input
        /// (discouraged for tokens: every local user can read a token given here while mesh
        /// runs).
        #[arg(value_name = "NETWORK-ID|TOKEN")]
        token: Option<String>,
        /// Read the join token from this file (`-`: standard input).
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Node name (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        daemon: DaemonFlags,
        /// How long one connection attempt to the controller may take [default: 10s].
        #[arg(long)]
        connect_timeout: Option<String>,
        /// Give up after this long: while the controller does not answer (it may still be
        /// booting; default 60s), and, joining by network id, while the administrator has not
        /// approved the node (default: wait for ever). A refusal ends the join at once.
        #[arg(long, value_name = "DURATION", alias = "wait-controller")]
        wait: Option<String>,
        /// Join, save the state and exit, instead of running the daemon (then start it with
        /// `systemctl enable --now mesh` or `mesh up`).
        #[arg(long)]
        no_daemon: bool,
    },
    /// Run the daemon from saved state (after a join): through mesh.service where systemd
    /// runs it (returning once online), else (or with --foreground) in the foreground.
    Up {
        #[command(flatten)]
        daemon: DaemonFlags,
        /// While the node's join request waits for approval: give up after this long
        /// [default: wait for ever].
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// kubeadm pre-step: kubelet's --node-ip, kubeadm config, CNI MTU.
    #[command(subcommand)]
    Kubeadm(KubeadmCmd),
    /// Subnet routes: the prefixes this node advertises (its pod subnet), where each stands at
    /// the controller, and the prefixes its peers route through mesh0.
    #[command(subcommand)]
    Routes(RoutesCmd),
    /// Wait until the overlay address is on the interface (and, with --peers, N peers answer).
    WaitOnline {
        /// Give up after this long.
        #[arg(long, default_value = "60s")]
        timeout: String,
        /// Also wait until this many peers have answered within the last 30 s.
        #[arg(long, default_value_t = 0)]
        peers: usize,
    },
    /// Print this node's overlay IPv4 address and nothing else; with PEER, that peer's.
    Ip {
        /// A peer's name, overlay address or key.
        peer: Option<String>,
        /// The IPv6 overlay address instead (in the network's ULA prefix).
        #[arg(short = '6', long = "ipv6")]
        ipv6: bool,
    },
    /// Show the node, the controller connection and every peer.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer inside the tunnel: which path answered (direct or relay) and how fast.
    Ping {
        /// Peer name, overlay address or key.
        peer: String,
        /// How many pings.
        #[arg(long, short = 'c', default_value_t = 3)]
        count: u32,
    },
    /// Leave the network: the controller deletes the node; the agent stops, mesh0 and the
    /// local state are deleted.
    Leave {
        /// Leave even if the controller cannot be told (it is down, or the node was removed
        /// there): the agent stops and mesh0 and the local state go all the same.
        #[arg(long)]
        force: bool,
    },
    /// Check what kubeadm and a CNI need on this node, one line per check (ok, warn, FAIL,
    /// skip), each failure with the command that fixes it; exits 1 when a check fails.
    ///
    /// Looks at: the overlay address on mesh0, ip_forward, br_netfilter and
    /// bridge-nf-call-iptables, swap, kubelet's --node-ip, the CNI's MTU, the controller
    /// connection and clock, the NAT mapping, each peer's path, overlaps between the overlay,
    /// pod and service ranges and local routes, forward chains that drop, firewalld/ufw, and
    /// proxy variables. Runs without root; what needs root says so and is skipped.
    Doctor {
        /// JSON output: {"checks": [{"name", "status", "message"}], "ok": bool}.
        #[arg(long)]
        json: bool,
        /// The cluster's pod range [default: from the CNI config, else 10.244.0.0/16].
        #[arg(long, value_name = "CIDR")]
        pod_cidr: Option<ipnet::Ipv4Net>,
        /// The cluster's service range.
        #[arg(long, value_name = "CIDR", default_value = doctor::DEFAULT_SERVICE_CIDR)]
        service_cidr: ipnet::Ipv4Net,
        /// Where the CNI configs are.
        #[arg(long, value_name = "DIR", default_value = doctor::DEFAULT_CNI_DIR)]
        cni_dir: PathBuf,
        /// flannel's subnet file.
        #[arg(long, value_name = "PATH", default_value = doctor::DEFAULT_FLANNEL_ENV)]
        flannel_env: PathBuf,
        /// The kubelet extra-args file [default: detected from /etc/os-release].
        #[arg(long, value_name = "PATH")]
        kubelet_file: Option<PathBuf>,
    },
    /// Stop the agent without leaving: mesh0 goes, the membership and key stay, and `mesh up`
    /// (or `systemctl start mesh`) brings the node back with the same address.
    Down,
}

#[derive(Subcommand)]
enum RoutesCmd {
    /// What this node advertises (with the controller's word on each) and what peers route.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Advertise more prefixes (added to the saved list; the controller approves them).
    Advertise {
        /// IPv4 or IPv6 prefixes, e.g. 10.244.1.0/24 or fd00:10:244:1::/64.
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
    },
    /// Stop advertising prefixes (peers remove their routes to them).
    Withdraw {
        /// IPv4 or IPv6 prefixes.
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KubeadmCmd {
    /// Write --node-ip=<overlay ip> into kubelet's extra args (/etc/default/kubelet or
    /// /etc/sysconfig/kubelet), keeping every other argument.
    NodeIp {
        /// Show the change without writing it.
        #[arg(long)]
        dry_run: bool,
        /// The kubelet defaults file [default: detected from /etc/os-release].
        #[arg(long)]
        file: Option<PathBuf>,
        /// For a dual-stack cluster: --node-ip=<IPv4>,<IPv6> with both overlay addresses
        /// (a single-stack cluster refuses two, so the default is the IPv4 address alone).
        #[arg(long)]
        dual_stack: bool,
    },
    /// Print a kubeadm InitConfiguration (control plane) or JoinConfiguration (worker) that uses
    /// the overlay address.
    Config {
        /// control-plane or worker.
        #[arg(long)]
        role: kubeadm::Role,
        /// A dual-stack cluster: kubelet gets both overlay addresses, and the control plane's
        /// ClusterConfiguration an IPv6 pod and service range beside the IPv4 ones (the API
        /// server stays on the IPv4 overlay address).
        #[arg(long)]
        dual_stack: bool,
        /// With --dual-stack: the cluster's IPv6 pod range, a /48 to a /63.
        #[arg(long, value_name = "CIDR", requires = "dual_stack", default_value = kubeadm::DEFAULT_POD_CIDR6)]
        pod_cidr6: ipnet::Ipv6Net,
        /// With --dual-stack: the cluster's IPv6 service range, a /108 or smaller.
        #[arg(long, value_name = "CIDR", requires = "dual_stack", default_value = kubeadm::DEFAULT_SERVICE_CIDR6)]
        service_cidr6: ipnet::Ipv6Net,
    },
    /// Print the MTU and interface settings a CNI should use on top of mesh0.
    CniMtu {
        /// flannel, calico or cilium.
        #[arg(long, default_value = "flannel")]
        cni: kubeadm::Cni,
    },
    /// Print (or, with --write, install) a CNI config for the standard bridge, host-local and
    /// portmap plugins: pods on a bridge with addresses from this node's pod subnet, which mesh
    /// routes to the other nodes over mesh0 (subnet routes), with no second encapsulation.
    ///
    /// The plugins come with the distribution (`containernetworking-plugins`, in /usr/lib/cni)
    /// or from github.com/containernetworking/plugins (in /opt/cni/bin).
    Cni {
        /// The node's pod subnet [default: the first prefix this node advertises].
        #[arg(long, value_name = "CIDR")]
        pod_cidr: Option<ipnet::Ipv4Net>,
        /// The bridge the pods hang on.
        #[arg(long, default_value = kubeadm::DEFAULT_CNI_BRIDGE)]
        bridge: String,
        /// The pods' MTU [default: mesh0's MTU].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=9000))]
        mtu: Option<u32>,
        /// Write the config to DIR/10-mesh.conflist (atomically) instead of printing it.
        #[arg(long)]
        write: bool,
        /// The directory kubelet reads CNI configs from.
        #[arg(long, value_name = "DIR", default_value = podcidr::DEFAULT_CNI_CONF_DIR)]
        dir: PathBuf,
        /// With --write: replace an existing 10-mesh.conflist that says something else.
        #[arg(long, requires = "write")]
        force: bool,
    },
}

/// `mesh kubeadm cni`: renders the conflist, prints or installs it.
fn kubeadm_cni(
    state: &StateDir,
    pod_cidr: Option<ipnet::Ipv4Net>,
    bridge: &str,
    mtu: Option<u32>,
    write_to: Option<(&std::path::Path, bool)>,
) -> anyhow::Result<()> {
    if !kubeadm::valid_interface_name(bridge) {
        anyhow::bail!(
            "invalid --bridge {bridge:?}: an interface name has 1 to 15 characters, without spaces, quotes, `/` or `:`"
        );
    }
    // The first IPv4 prefix this node advertises (the bridge's host-local range is IPv4) and
    // its MTU: from node.json, else from the running agent.
    let (advertised, node_mtu) = match state.load_membership() {
        Ok(m) => (
            m.advertise_routes.iter().find_map(|p| match p {
                ipnet::IpNet::V4(p) => Some(*p),
                ipnet::IpNet::V6(_) => None,
            }),
            Some(m.mtu),
        ),
        Err(_) => match runtime()?.block_on(ask(state, api::Request::Status)) {
            Ok(v) => (
                v["routes"]["advertised"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|r| r["prefix"].as_str()?.parse::<ipnet::Ipv4Net>().ok()),
                v["node"]["mtu"]
                    .as_u64()
                    .and_then(|m| u32::try_from(m).ok()),
            ),
            Err(_) => (None, None),
        },
    };
    let pod_cidr = pod_cidr
        .or(advertised)
        .context("no pod CIDR: pass --pod-cidr or advertise one with `mesh routes advertise`")?;
    if pod_cidr.trunc() != pod_cidr {
        anyhow::bail!(
            "--pod-cidr {pod_cidr} has host bits set; did you mean {}?",
            pod_cidr.trunc()
        );
    }
    let mtu = mtu.or(node_mtu).unwrap_or(config::defaults::MTU);
    let text = kubeadm::cni_conflist(pod_cidr, bridge, mtu);
    let Some((dir, force)) = write_to else {
        out(text.trim_end_matches('\n'));
        return Ok(());
    };
    let path = dir.join(kubeadm::CNI_CONFLIST_FILE);
    match std::fs::read_to_string(&path) {
        Ok(old) if old == text => {
            out(&format!(
                "{} already holds this config (pod subnet {pod_cidr})",
                path.display()
            ));
            return Ok(());
        }
        Ok(_) if !force => anyhow::bail!(
            "{} exists and says something else; compare it with `mesh kubeadm cni` and pass --force to replace it",
            path.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    state::write_file(&path, text.as_bytes(), 0o644)?;
    out(&format!(
        "wrote {} (bridge {bridge}, pod subnet {pod_cidr}, MTU {mtu})",
        path.display()
    ));
    if let Some(first) = podcidr::first_cni_config(dir).filter(|f| *f != path) {
        warn_user(&format!(
            "kubelet uses the first CNI config by name, which is {}, not this one; remove it or rename ours",
            first.display()
        ));
    }
    Ok(())
}

fn kubeadm_cmd(state: &StateDir, cmd: KubeadmCmd) -> anyhow::Result<()> {
    if let KubeadmCmd::Cni {
        pod_cidr,
        bridge,
        mtu,
        write,
        dir,
        force,
    } = &cmd
    {
        let write_to = write.then_some((dir.as_path(), *force));
        return kubeadm_cni(state, *pod_cidr, bridge, *mtu, write_to);
    }
    let m = state.load_membership()?;
    match cmd {
        KubeadmCmd::NodeIp {
            dry_run,
            file,
            dual_stack,
        } => {
            let node_ip = if dual_stack {
                let dual = kubeadm::DualStack::new(m.address6, m.prefix6, None, None)
                    .map_err(anyhow::Error::msg)?;
                kubeadm::NodeIp {
                    v4: m.address,
                    v6: Some(dual.address6),
                }
            } else {
                kubeadm::NodeIp::from(m.address)
            };
            let path = match file {
                Some(p) => p,
                None => {
                    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
                    kubeadm::KubeletDefaults::detect(&os).path().to_owned()
                }
            };
            let old = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            let new = kubeadm::set_node_ip(&old, node_ip);
            if new == old {
                out(&format!(
                    "{} already sets --node-ip={node_ip}",
                    path.display()
                ));
            } else if dry_run {
                out(&kubeadm::preview(&path, &old, &new));
            } else {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                // Replaced whole (never half-written), keeping the file's mode; through a
                // symlink, the file it points to is replaced.
                let target = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                let mode = std::fs::metadata(&target)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0o644);
                state::write_file(&target, new.as_bytes(), mode)?;
                out(&format!(
                    "wrote --node-ip={node_ip} to {}; restart kubelet to apply (systemctl restart kubelet)",
                    path.display()
                ));
            }
            Ok(())
        }
        KubeadmCmd::Config {
            role,
            dual_stack,
            pod_cidr6,
            service_cidr6,
        } => {
            let dual = if dual_stack {
                Some(
                    kubeadm::DualStack::new(
                        m.address6,
                        m.prefix6,
                        Some(pod_cidr6),
                        Some(service_cidr6),
                    )
                    .map_err(anyhow::Error::msg)?,
                )
            } else {
                None
            };
            out(&kubeadm::kubeadm_config(
                role,
                m.address,
                &m.name,
                dual.as_ref(),
            ));
            Ok(())
        }
        KubeadmCmd::Cni { .. } => Ok(()),
        KubeadmCmd::CniMtu { cni } => {
            let a = kubeadm::cni_advice(cni, m.mtu);
            out(&format!(
                "{cni} pod MTU: {} ({} on {} minus {} bytes of {cni} encapsulation)",
                a.mtu, m.mtu, m.interface, a.overhead
            ));
            for line in a.lines {
                out(&line);
            }
            Ok(())
        }
    }
}

/// One line on stdout. A closed pipe (`mesh status | grep -q ...`) ends the output quietly
/// instead of panicking.
fn out(s: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{s}").is_err() {
        std::process::exit(0);
    }
}

/// One warning line on stderr, in the form of the error lines.
fn warn_user(s: &str) {
    eprintln!("mesh: warning: {s}");
}

/// Replaces this process (same PID) with the same command line minus the token argument, the
/// token moved into `MESH_TOKEN`. Returns only on failure.
fn exec_without_arg_token(token: &str) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    let mut argv = std::env::args_os();
    let argv0 = argv.next().unwrap_or_else(|| "mesh".into());
    let mut removed = false;
    let rest: Vec<std::ffi::OsString> = argv
        .filter(|a| {
            let drop = !removed && a.as_os_str() == token;
            removed |= drop;
            !drop
        })
        .collect();
    if !removed {
        return std::io::Error::other("token argument not found");
    }
    std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(rest)
        .env(token_source::ENV, token)
        .exec()
}

/// After a join: replaces this process (same PID, so systemd's Type=notify and other
/// supervisors keep tracking it) with `mesh up` on the state just saved, so that the daemon
/// carries no token in its argv, its environment or its memory. Returns only on failure.
fn exec_up(
    state_dir: &std::path::Path,
    config: Option<&std::path::Path>,
    m: &state::Membership,
    metrics_listen: Option<std::net::SocketAddr>,
    wait: Option<Duration>,
) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let mut args: Vec<std::ffi::OsString> = vec![
        "up".into(),
        "--state-dir".into(),
        state_dir.into(),
        "--port".into(),
        m.port.to_string().into(),
        "--mtu".into(),
        m.mtu.to_string().into(),
        "--interface".into(),
        m.interface.clone().into(),
    ];
    if let Some(c) = config {
        args.extend(["--config".into(), c.into()]);
    }
    if let Some(a) = metrics_listen {
        args.extend(["--metrics-listen".into(), a.to_string().into()]);
    }
    if let Some(list) = &m.endpoint_interfaces {
        args.extend(["--endpoint-interfaces".into(), list.into()]);
    }
    if let Some(w) = wait {
        args.extend(["--wait".into(), format!("{}s", w.as_secs().max(1)).into()]);
    }
    if !m.port_mapping {
        args.push("--no-port-mapping".into());
    }
    let argv0 = std::env::args_os().next().unwrap_or_else(|| "mesh".into());
    tracing::info!("continuing as `mesh up`; the join token is not kept");
    // /proc/self/exe is this very binary even if the file was replaced meanwhile; argv[0]
    // (looked up in PATH) if /proc is not mounted.
    let first = std::process::Command::new("/proc/self/exe")
        .arg0(&argv0)
        .args(&args)
        .env_remove(token_source::ENV)
        .exec();
    let second = std::process::Command::new(&argv0)
        .args(&args)
        .env_remove(token_source::ENV)
        .exec();
    anyhow::anyhow!(
        "joined network {} as {} with address {}, but cannot start the daemon ({first}; {second}); start it with `mesh up` or `systemctl enable --now mesh`",
        m.network,
        m.name,
        m.address
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn print_status(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    if v["state"] == "waiting_for_approval" {
        let node = &v["node"];
        let ctl = &v["controller"];
        out(&format!(
            "mesh      {}\nstate     waiting for the administrator to approve this node\nnode      {}\nnetwork   {}\nkey       {}\nfingerprint {}\nwaiting since {}\ncontroller {} {}\napprove with: {}",
            s(&v["version"]),
            s(&node["name"]),
            s(&node["network"]),
            s(&node["key"]),
            s(&node["fingerprint"]),
            s(&v["waiting_since"]),
            s(&ctl["address"]),
            if ctl["connected"].as_bool() == Some(true) {
                "holds the request".to_owned()
            } else {
                format!("not answering ({})", ctl["last_error"].as_str().unwrap_or("connecting"))
            },
            s(&v["approve_with"]),
        ));
        return;
    }
    let node = &v["node"];
    let ctl = &v["controller"];
    out(&format!(
        "mesh      {}\nnode      {} (udp port {})\naddress   {}/{} on {} (mtu {})\nnetwork   {}\nkey       {}\ncontroller {} {}",
        s(&v["version"]),
        s(&node["name"]),
        node["port"],
        s(&node["address"]),
        node["prefix_len"],
        s(&node["interface"]),
        node["mtu"],
        s(&node["network"]),
        s(&node["key"]),
        s(&ctl["address"]),
        if ctl["connected"].as_bool() == Some(true) {
            match ctl["transport"].as_str() {
                Some("tcp") => "connected over tcp (TLS; UDP does not get through)".to_owned(),
                Some(t) => format!("connected over {t}"),
                None => "connected".to_owned(),
            }
        } else {
            format!("disconnected ({})", ctl["last_error"].as_str().unwrap_or("connecting"))
        }
    ));
    if let Some(a6) = node["address6"].as_str() {
        let len = node["prefix6"]
            .as_str()
            .and_then(|p| p.split_once('/'))
            .map_or("?", |(_, len)| len);
        out(&format!(
            "address6  {a6}/{len} on {}",
            s(&node["interface"])
        ));
    }
    let nat = &v["nat"];
    let observed: Vec<&str> = nat["observed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .collect();
    out(&format!(
        "public    {} (mapping {})",
        if observed.is_empty() {
            "-".to_owned()
        } else {
            observed.join(", ")
        },
        match nat["mapping"].as_str() {
            Some("unknown") => "unknown: the controller's STUN observer did not answer, and no standalone relay saw this node".to_owned(),
            _ => s(&nat["mapping"]),
        }
    ));
    if let Some(line) = port_mapping_line(&v["port_mapping"]) {
        out(&format!("portmap   {line}"));
    }
    if let Some(line) = datapath_line(&v["counters"]) {
        out(&format!("datapath  {line}"));
    }
    for u in v["exits"]["using"].as_array().into_iter().flatten() {
        out(&format!(
            "exit      {} via {}{}",
            s(&u["prefix"]),
            s(&u["node"]),
            if u["active"].as_bool() == Some(true) {
                ""
            } else {
                " (not in use: that node offers no approved exit covering it)"
            }
        ));
    }
    for p in v["exits"]["offered"].as_array().into_iter().flatten() {
        out(&format!("exit      {} offered to peers", s(p)));
    }
    let dns = &v["dns"];
    if dns.is_object() {
        let how = [
            dns["resolver"].as_str().map(|r| format!("via {r}")),
            (dns["hosts_file"].as_bool() == Some(true)).then(|| "in /etc/hosts".to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        out(&format!(
            "names     {}",
            match dns["listening"].as_str() {
                Some(a) if how.is_empty() => format!("answered on {a}"),
                Some(a) => format!("answered on {a}, {how}"),
                None => format!("not answered: {}", s(&dns["error"])),
            }
        ));
    }
    for r in v["relays"].as_array().into_iter().flatten() {
        let state = if r["connected"].as_bool() == Some(true) {
            format!(
                "connected over {}, rtt {} ms{}",
                r["transport"].as_str().unwrap_or("quic"),
                r["rtt_ms"].as_u64().unwrap_or(0),
                if r["home"].as_bool() == Some(true) {
                    ", home"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "not connected ({})",
                r["last_error"].as_str().unwrap_or("connecting")
            )
        };
        out(&format!(
            "relay     {} {} {state}",
            s(&r["name"]),
            s(&r["addr"])
        ));
    }
    out(&format!(
        "\n{:<20} {:<16} {:<39} {:<18} {:<28} {:>8} {:>10} {:>12} {:>12}  QUALITY",
        "PEER", "ADDRESS", "ADDRESS6", "PATH", "ENDPOINT", "RTT", "HANDSHAKE", "RX", "TX"
    ));
    for p in v["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs_ago"]
            .as_u64()
            .map_or("never".to_owned(), |s| format!("{s}s ago"));
        let path = match (p["path"].as_str(), p["relay"].as_str()) {
            // No session until a packet needs one (a network past mesh_core::PROACTIVE_PEERS).
            _ if p["on_demand"] == true => "on demand".to_owned(),
            // Not heard from lately: whatever path it had, it answers on none.
            _ if p["online"] == false => "offline".to_owned(),
            (Some("relay"), Some(r)) => format!("relay {r}"),
            (Some("direct"), _) if p["family"] == "ipv6" => "direct (IPv6)".to_owned(),
            (Some("direct"), _) if p["family"] == "ipv4" => "direct (IPv4)".to_owned(),
            (Some(path), _) => path.to_owned(),
            (None, _) => "-".to_owned(),
        };
        let endpoint = if p["path"] == "direct" {
            p["endpoint"].as_str().unwrap_or("-")
        } else {
            "-"
        };
        out(&format!(
            "{:<20} {:<16} {:<39} {:<18} {:<28} {:>8} {:>10} {:>12} {:>12}  {}",
            s(&p["name"]),
            s(&p["address"]),
            s(&p["address6"]),
            path,
            endpoint,
            p["rtt_ms"]
                .as_f64()
                .map_or("-".to_owned(), |r| format!("{r:.2} ms")),
            hs,
            p["rx_bytes"].as_u64().unwrap_or(0),
            p["tx_bytes"].as_u64().unwrap_or(0),
            quality_text(&p["quality"])
        ));
    }
}

/// Each measured path's loss and RTT, e.g. `direct 12% loss 3 ms, relay 0% loss 9 ms`; `-`
/// while nothing is measured (no data flowing).
fn quality_text(q: &serde_json::Value) -> String {
    let parts: Vec<String> = ["direct", "relay"]
        .iter()
        .filter_map(|path| {
            let loss = q[path]["loss"].as_f64();
            let rtt = q[path]["rtt_ms"].as_f64();
            if loss.is_none() && rtt.is_none() {
                return None;
            }
            let loss = loss.map_or("?".to_owned(), |l| format!("{:.0}%", l * 100.0));
            let rtt = rtt.map_or(String::new(), |r| format!(" {r:.0} ms"));
            Some(format!("{path} {loss} loss{rtt}"))
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The `portmap` line of `mesh status`: the router's mapping of the UDP port, or why there is
/// none. `None` when the daemon did not say (an older daemon).
/// The data plane's setup from the status counters: TUN offloads and the UDP socket's buffers.
fn datapath_line(counters: &serde_json::Value) -> Option<String> {
    let offload = counters["tun_offload"].as_u64()?;
    let mib = |k: &str| {
        counters[k]
            .as_u64()
            .map(|b| b as f64 / f64::from(1u32 << 20))
    };
    let mut line = if offload == 1 {
        "mesh0 with offloads (TCP segments in batches)".to_owned()
    } else {
        "mesh0 without offloads, one packet per read (the log says why)".to_owned()
    };
    match (
        counters["seal_thread"].as_u64() == Some(1),
        counters["open_thread"].as_u64() == Some(1),
    ) {
        (true, true) => line += "; batches encrypted and decrypted on threads of their own",
        (true, false) => line += "; batches encrypted on a thread of their own",
        (false, true) => line += "; batches decrypted on a thread of their own",
        (false, false) => {}
    }
    if counters["tun_write_thread"].as_u64() == Some(1) {
        line += "; TUN writes on a thread of their own";
    }
    if let (Some(rx), Some(tx)) = (mib("udp_recv_buffer"), mib("udp_send_buffer")) {
        line += &format!("; UDP buffers {rx:.1} MiB in, {tx:.1} MiB out");
        if counters["udp_buffers_refused"].as_u64().unwrap_or(0) > 0 {
            line += " (less than asked: raise net.core.rmem_max/wmem_max)";
        }
    }
    Some(line)
}

fn port_mapping_line(pm: &serde_json::Value) -> Option<String> {
    let text = |k: &str| pm[k].as_str().unwrap_or("-");
    Some(match pm["state"].as_str()? {
        "mapped" => {
            let expiry = match (pm["expires_in_secs"].as_u64(), pm["expires_at"].as_str()) {
                (Some(secs), Some(at)) => format!(
                    ", lease expires in {} ({at})",
                    humantime::format_duration(Duration::from_secs(secs))
                ),
                _ => String::new(),
            };
            format!(
                "{} {} at gateway {}{expiry}",
                text("protocol"),
                text("external"),
                text("gateway")
            )
        }
        "off" => "off (--no-port-mapping)".to_owned(),
        "searching" => "none yet (asking the router)".to_owned(),
        state => match pm["last_error"].as_str() {
            Some(e) => format!("none ({state}: {e})"),
            None => format!("none ({state})"),
        },
    })
}

/// Resolves daemon options: flag, else config file, else (in the daemon) saved state or default.
/// `--wait DURATION` of `mesh join` and `mesh up`, if given.
fn parse_wait(wait: Option<String>) -> anyhow::Result<Option<Duration>> {
    wait.map(|w| {
        humantime::parse_duration(&w)
            .with_context(|| format!("invalid --wait {w:?}; use e.g. 60s, 10m or 2h"))
    })
    .transpose()
}

/// A comma-separated list of IPv4 and IPv6 prefixes ("" for none), each checked, and whether
/// `auto` was among them.
fn parse_prefixes(list: &str) -> anyhow::Result<(Vec<ipnet::IpNet>, bool)> {
    let mut out: Vec<ipnet::IpNet> = Vec::new();
    let mut auto = false;
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item.eq_ignore_ascii_case("auto") {
            auto = true;
            continue;
        }
        let net: ipnet::IpNet = item.parse().map_err(|_| {
            anyhow::anyhow!(
                "{item:?} is not an IP prefix (expected e.g. 10.244.1.0/24 or fd00:10:244:1::/64)"
            )
        })?;
        if net.trunc() != net {
            anyhow::bail!("{item} has host bits set; did you mean {}?", net.trunc());
        }
        if !out.contains(&net) {
            out.push(net);
        }
    }
    if out.len() > mesh_proto::control::MAX_ROUTES {
        anyhow::bail!(
            "{} prefixes; a node advertises at most {}",
            out.len(),
            mesh_proto::control::MAX_ROUTES
        );
    }
    Ok((out, auto))
}

fn daemon_options(
    state: StateDir,
    flags: DaemonFlags,
    file: &config::FileConfig,
) -> anyhow::Result<daemon::Options> {
    let metrics_listen =
        match flags.metrics_listen.or_else(|| file.metrics_listen.clone()) {
            Some(s) if !s.trim().is_empty() => Some(s.parse().with_context(|| {
                format!("invalid metrics address {s:?}; use e.g. 127.0.0.1:9101")
            })?),
            _ => None,
        };
    let mtu = flags.mtu.or(file.mtu);
    if let Some(m) = mtu {
        if !(1280..=9000).contains(&m) {
            anyhow::bail!("invalid mtu {m}: use 1280 to 9000");
        }
    }
    let endpoint_interfaces =
        match (flags.endpoint_interfaces, &file.endpoint_interfaces) {
            (Some(list), _) => Some(
                list.parse::<candidates::EndpointInterfaces>()
                    .with_context(|| format!("invalid --endpoint-interfaces {list:?}"))?,
            ),
            (None, Some(list)) => Some(list.parse().with_context(|| {
                format!("invalid endpoint_interfaces {list:?} in the config file")
            })?),
            (None, None) => None,
        };
    let (advertise_routes, advertise_auto) = match (flags.advertise_routes, &file.advertise_routes)
    {
        (Some(list), _) => {
            let (l, auto) = parse_prefixes(&list).context("invalid --advertise-routes")?;
            (Some(l), Some(auto))
        }
        (None, Some(list)) => {
            let (l, auto) =
                parse_prefixes(list).context("invalid advertise_routes in the config file")?;
            (Some(l), Some(auto))
        }
        (None, None) => (None, None),
    };
    let pod_cidr_sources = (
        flags.cni_conf_dir.or_else(|| file.cni_conf_dir.clone()),
        flags
            .flannel_subnet_env
            .or_else(|| file.flannel_subnet_env.clone()),
    );
    let port_mapping = match (flags.port_mapping, flags.no_port_mapping) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => file.port_mapping,
    };
    let dns = match (flags.dns, flags.no_dns) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => file.dns,
    };
    let hosts_file = match (flags.hosts_file, flags.no_hosts_file) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => file.hosts_file,
    };
    let advertise_exits = match flags
        .advertise_exit
        .or_else(|| file.advertise_exits.clone())
    {
        Some(list) => {
            let (prefixes, auto) = parse_prefixes(&list).context("invalid --advertise-exit")?;
            if auto {
                anyhow::bail!(
                    "invalid --advertise-exit: `auto` applies to --advertise-routes only"
                );
            }
            Some(prefixes)
        }
        None => None,
    };
    let exit_node = flags.exit_node.or_else(|| file.exit_node.clone());
    let use_routes = flags.use_routes.or_else(|| file.use_routes.clone());
    let use_exits = if exit_node.is_none() && use_routes.is_none() {
        None
    } else {
        let mut uses = crate::exits::parse_uses(use_routes.as_deref().unwrap_or(""))
            .map_err(|e| anyhow::anyhow!("invalid --use-routes: {e}"))?;
        if let Some(node) = exit_node
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            // Everything of both families: IPv6 goes through the exit only where it offers
            // ::/0 (see `exits::active`).
            uses.retain(|u| u.prefix.prefix_len() != 0);
            for everything in [
                ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
                ipnet::IpNet::V6(ipnet::Ipv6Net::default()),
            ] {
                uses.push(crate::exits::ExitUse {
                    prefix: everything,
                    node: node.to_owned(),
                });
            }
        }
        Some(uses)
    };
    Ok(daemon::Options {
        advertise_exits,
        use_exits,
        advertise_routes,
        dns,
        hosts_file,
        advertise_auto,
        pod_cidr_sources,
        state,
        port: flags.port.or(file.port),
        mtu,
        interface: flags.interface.or_else(|| file.interface.clone()),
        metrics_listen,
        endpoint_interfaces,
        port_mapping,
    })
}

/// A read-only request to the daemon of `state`, on whichever of its sockets this user may
/// use (see [`api::query`]).
async fn ask(state: &StateDir, req: api::Request) -> anyhow::Result<serde_json::Value> {
    api::query(&state.socket_path(), &state.read_only_socket_path(), req).await
}

/// Whether this `mesh join`/`mesh up` hands the daemon to mesh.service (see [`handover`]).
fn hand_over(
    cli_state_dir: Option<&PathBuf>,
    cli_config: Option<&PathBuf>,
    flags: &DaemonFlags,
    join: bool,
) -> bool {
    handover::decide(
        handover::Host::detect(),
        handover::Request {
            foreground: flags.foreground,
            default_state_dir: cli_state_dir.is_none(),
            default_config: cli_config
                .is_none_or(|c| c.as_path() == std::path::Path::new(config::DEFAULT_PATH)),
            run_flags: !join && flags.any_run_flag(),
        },
    )
}

/// After the unit was started: waits until the node is online, and says so.
fn handed_over(state: &StateDir, what: &str) -> anyhow::Result<()> {
    runtime()?
        .block_on(wait_online(state, handover::ONLINE_TIMEOUT, 0))
        .map_err(|e| {
            e.context(format!(
                "{} started but the node is not online; see `systemctl status {}` and `journalctl -u {}`",
                handover::UNIT,
                handover::UNIT,
                handover::UNIT
            ))
        })?;
    let m = state.load_membership()?;
    out(&format!(
        "{what} network {} as {} with address {}; the agent runs as {} (systemctl status {})",
        m.network,
        m.name,
        m.address,
        handover::UNIT,
        handover::UNIT
    ));
    Ok(())
}

/// After a join that admitted the node: hand the daemon to the unit, stop (`--no-daemon`), or
/// continue as `mesh up` in this process.
fn after_join(
    state: &StateDir,
    m: &state::Membership,
    handing_over: bool,
    no_daemon: bool,
    config: Option<&std::path::Path>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    if handing_over && !no_daemon {
        handover::start_after_join()?;
        return handed_over(state, "joined");
    }
    if no_daemon {
        out(&format!(
            "joined network {} as {} with address {}; start the agent with `systemctl enable --now mesh` (or `mesh up`)",
            m.network, m.name, m.address
        ));
        return Ok(());
    }
    Err(exec_up(state.path(), config, m, metrics_listen, None))
}

/// While mesh.service waits for the administrator's approval: waits until the node is online
/// (or the request ends, or `wait` is over), and says so.
async fn wait_approved(state: &StateDir, wait: Option<Duration>) -> anyhow::Result<()> {
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        if let Ok(m) = state.load_membership() {
            if state.load_request()?.is_none()
                && mesh_sys::netlink::has_address(&m.interface, m.address)
                    .await
                    .unwrap_or(false)
            {
                return handed_over(state, "joined");
            }
        } else if state.load_request()?.is_none() {
            anyhow::bail!(
                "the join request ended without approval (rejected, or the network is gone); `systemctl status {}` and `journalctl -u {}` say why",
                handover::UNIT,
                handover::UNIT
            );
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            anyhow::bail!(
                "not approved within --wait; {} keeps waiting (`mesh status` shows the request; `mesh leave` withdraws it)",
                handover::UNIT
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let file = match &cli.config {
        Some(p) => config::FileConfig::load(p, true)?,
        None => config::FileConfig::load(std::path::Path::new(config::DEFAULT_PATH), false)?,
    };
    let state_dir = cli
        .state_dir
        .clone()
        .or_else(|| file.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(config::defaults::STATE_DIR));
    let state = StateDir::new(&state_dir);
    let log = file
        .log
        .clone()
        .unwrap_or_else(|| config::defaults::LOG.to_owned());
    match cli.command {
        Command::Join {
            token,
            token_file,
            name,
            daemon: flags,
            connect_timeout,
            wait,
            no_daemon,
        } => {
            let wait = parse_wait(wait)?;
            let connect_timeout = connect_timeout
                .or_else(|| file.connect_timeout.clone())
                .unwrap_or_else(|| config::defaults::CONNECT_TIMEOUT.to_owned());
            let connect_timeout =
                humantime::parse_duration(&connect_timeout).with_context(|| {
                    format!("invalid connect timeout {connect_timeout:?}; use e.g. 10s")
                })?;
            // The default is the hostname as kubelet takes it for the node name (lowercase).
            let name = daemon::NameChoice {
                explicit: name.is_some(),
                name: name.unwrap_or_else(|| {
                    mesh_proto::control::node_name_like(&config::hostname())
                }),
            };
            if !mesh_proto::control::valid_node_name(&name.name) {
                anyhow::bail!(
                    "invalid node name {:?}: node names are DNS names, as Kubernetes requires: 1-63 lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit (e.g. --name {})",
                    name.name,
                    mesh_proto::control::node_name_like(&name.name)
                );
            }
            // A network id holds no secret: it is the argument, and the join is a request.
            let network_id = match token.as_deref().filter(|t| *t != "-") {
                Some(arg) => match arg.parse::<JoinArg>()? {
                    JoinArg::Network(_) => Some(arg.trim().to_owned()),
                    JoinArg::Token(_) => None,
                },
                None => None,
            };
            if let Some(id) = network_id {
                let handing_over =
                    hand_over(cli.state_dir.as_ref(), cli.config.as_ref(), &flags, true);
                let opts = daemon_options(state.clone(), flags, &file)?;
                let metrics_listen = opts.metrics_listen;
                mesh_service::init_logging(&log);
                let rt = runtime()?;
                let asked = rt.block_on(daemon::request(opts, &id, name, connect_timeout, wait));
                rt.shutdown_timeout(Duration::from_secs(2));
                let started = std::time::Instant::now();
                return match asked? {
                    daemon::Requested::Joined(m) => after_join(
                        &state,
                        &m,
                        handing_over,
                        no_daemon,
                        cli.config.as_deref(),
                        metrics_listen,
                    ),
                    daemon::Requested::Pending(status) => {
                        warn_user(&status.line());
                        if no_daemon {
                            out(&format!(
                                "asked to join network {} as {}; start the agent with `systemctl enable --now mesh` (or `mesh up`): it waits for the approval, then brings the node up",
                                status.network, status.name
                            ));
                            return Ok(());
                        }
                        if handing_over {
                            handover::start_after_join_no_block()?;
                            return runtime()?.block_on(wait_approved(&state, wait));
                        }
                        let settings = state
                            .load_request()?
                            .context("the join request was not saved")?
                            .settings;
                        let left = wait.map(|w| w.saturating_sub(started.elapsed()));
                        Err(exec_up(
                            &state_dir,
                            cli.config.as_deref(),
                            &settings,
                            metrics_listen,
                            left,
                        ))
                    }
                };
            }
            let wait = wait.unwrap_or(daemon::DEFAULT_CONTROLLER_WAIT);
            let source =
                TokenSource::choose(token, token_file, std::env::var(token_source::ENV).ok())?;
            if source == TokenSource::Stdin && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("paste the join token and press Enter: ");
            }
            let (token, warnings) = source.read(std::io::stdin().lock())?;
            for w in warnings {
                warn_user(&w);
            }
            if let TokenSource::Arg(text) = &source {
                // Out of the command line at once: run again with the token in the
                // environment, which only this user and root can read. Returns on failure
                // only; then the join goes on as it is.
                let _ = exec_without_arg_token(text);
            }
            let handing_over = hand_over(cli.state_dir.as_ref(), cli.config.as_ref(), &flags, true);
            let opts = daemon_options(state.clone(), flags, &file)?;
            let metrics_listen = opts.metrics_listen;
            mesh_service::init_logging(&log);
            // Join and save the state, then close everything (sockets, TUN) so that the daemon
            // can start afresh without the token.
            let rt = runtime()?;
            let joined = rt.block_on(daemon::join(opts, token, name, connect_timeout, wait));
            rt.shutdown_timeout(Duration::from_secs(2));
            let m = joined?;
            after_join(
                &state,
                &m,
                handing_over,
                no_daemon,
                cli.config.as_deref(),
                metrics_listen,
            )
        }
        Command::Up {
            daemon: flags,
            wait,
        } => {
            let wait = parse_wait(wait)?;
            if hand_over(cli.state_dir.as_ref(), cli.config.as_ref(), &flags, false) {
                if state.load_request()?.is_some() {
                    handover::start_no_block()?;
                    return runtime()?.block_on(wait_approved(&state, wait));
                }
                // The saved state must be there; the unit's start says nothing about it.
                state.load_membership()?;
                handover::start()?;
                return handed_over(&state, "up in");
            }
            let opts = daemon_options(state, flags, &file)?;
            mesh_service::init_logging(&log);
            runtime()?.block_on(daemon::up(opts, wait))
        }
        Command::Kubeadm(cmd) => kubeadm_cmd(&state, cmd),
        Command::Routes(RoutesCmd::List { json }) => {
            let v = runtime()?.block_on(ask(&state, api::Request::Status))?;
            let routes = &v["routes"];
            if json {
                out(&serde_json::to_string_pretty(routes)?);
                return Ok(());
            }
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
            out(&format!("{:<20} {:<10} REASON", "ADVERTISED", "STATE"));
            for r in routes["advertised"].as_array().into_iter().flatten() {
                out(&format!(
                    "{:<20} {:<10} {}",
                    s(&r["prefix"]),
                    s(&r["state"]),
                    r["reason"].as_str().unwrap_or("")
                ));
            }
            let auto = &routes["auto"]["found"];
            if routes["auto"]["enabled"] == true {
                let from = match auto["source"].as_str() {
                    Some(f) => format!("from {f}"),
                    None => "kept from the last run".to_owned(),
                };
                match auto["prefix"].as_str() {
                    Some(p) => out(&format!("\nauto: pod subnet {p} {from}")),
                    None => out("\nauto: no pod subnet found yet"),
                }
                if let Some(note) = auto["note"].as_str() {
                    out(&format!("auto: {note}"));
                }
            }
            out(&format!("\n{:<20} VIA PEER", "PEER ROUTE"));
            for r in routes["peers"].as_array().into_iter().flatten() {
                out(&format!("{:<20} {}", s(&r["prefix"]), s(&r["peer"])));
            }
            Ok(())
        }
        Command::Routes(RoutesCmd::Advertise { prefixes }) => runtime()?.block_on(async {
            let v = api::request(
                &state.socket_path(),
                api::Request::Routes {
                    advertise: prefixes,
                    withdraw: Vec::new(),
                },
            )
            .await?;
            out(&format!(
                "advertising {}; the controller approves each (see `mesh routes list`)",
                v["advertised"]
            ));
            Ok(())
        }),
        Command::Routes(RoutesCmd::Withdraw { prefixes }) => runtime()?.block_on(async {
            let v = api::request(
                &state.socket_path(),
                api::Request::Routes {
                    advertise: Vec::new(),
                    withdraw: prefixes,
                },
            )
            .await?;
            out(&format!("advertising {}", v["advertised"]));
            Ok(())
        }),
        Command::Doctor {
            json,
            pod_cidr,
            service_cidr,
            cni_dir,
            flannel_env,
            kubelet_file,
        } => {
            let kubelet_file = kubelet_file.unwrap_or_else(|| {
                let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
                kubeadm::KubeletDefaults::detect(&os).path().to_owned()
            });
            let sources = doctor::Sources {
                cni_dir,
                flannel_env,
                kubelet_file,
                pod_cidr: pod_cidr.map(|p| p.trunc()),
                service_cidr: service_cidr.trunc(),
            };
            let facts = runtime()?.block_on(async {
                let status = doctor::status(&state).await;
                doctor::gather(&sources, status).await
            });
            let checks = doctor::judge(&facts);
            if json {
                out(&serde_json::to_string_pretty(&doctor::to_json(&checks))?);
            } else {
                for c in &checks {
                    out(&doctor::line(c));
                }
            }
            let failed = checks
                .iter()
                .filter(|c| c.status == doctor::Status::Fail)
                .count();
            if failed > 0 {
                return Err(doctor::Failed(failed).into());
            }
            Ok(())
        }
        Command::Ping { peer, count } => runtime()?.block_on(async {
            let mut answered = 0;
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let req = api::Request::Ping { peer: peer.clone() };
                match ask(&state, req).await {
                    Ok(v) => {
                        answered += 1;
                        let via = match (v["endpoint"].as_str(), v["relay"].as_str()) {
                            (Some(e), _) => format!("direct {e}"),
                            (None, Some(r)) => format!("relay {r}"),
                            (None, None) => v["path"].as_str().unwrap_or("?").to_owned(),
                        };
                        out(&format!(
                            "pong from {} ({}) via {via} in {:.2} ms",
                            v["peer"].as_str().unwrap_or("?"),
                            v["address"].as_str().unwrap_or("?"),
                            v["rtt_ms"].as_f64().unwrap_or(0.0)
                        ));
                    }
                    Err(e)
                        if e.downcast_ref::<api::NotRunning>().is_some()
                            || e.downcast_ref::<api::NotAllowed>().is_some() =>
                    {
                        return Err(e)
                    }
                    Err(e) => out(&format!("{e:#}")),
                }
            }
            if answered == 0 {
                anyhow::bail!("{peer} did not answer");
            }
            Ok(())
        }),
        Command::WaitOnline { timeout, peers } => {
            let timeout = humantime::parse_duration(&timeout)
                .with_context(|| format!("invalid --timeout {timeout:?}; use e.g. 60s"))?;
            runtime()?.block_on(wait_online(&state, timeout, peers))
        }
        Command::Ip {
            peer: None,
            ipv6: true,
        } => {
            let address6 = match state.load_membership() {
                Ok(m) => m.address6.map(|a| a.to_string()),
                // node.json is root's: a user asks the running daemon (read-only socket).
                Err(e) => {
                    let v = runtime()?
                        .block_on(ask(&state, api::Request::Status))
                        .map_err(|_| e)?;
                    v["node"]["address6"].as_str().map(str::to_owned)
                }
            };
            match address6 {
                Some(a) => {
                    out(&a);
                    Ok(())
                }
                None => anyhow::bail!(
                    "this node has no IPv6 overlay address: its network has none (created with `--cidr6 off`), or the controller has not given it one yet (an older controller, or the node has not connected since the upgrade); `mesh ip` prints the IPv4 one"
                ),
            }
        }
        Command::Ip {
            peer: None,
            ipv6: false,
        } => {
            if let (Err(_), Ok(Some(r))) = (state.load_membership(), state.load_request()) {
                anyhow::bail!(
                    "this node has no address yet: its request to join network {} waits for approval (on the controller: mesh-controller node approve {} {})",
                    r.settings.network,
                    r.settings.network,
                    r.name
                );
            }
            let address = match state.load_membership() {
                Ok(m) => m.address.to_string(),
                // node.json is root's: a user asks the running daemon (read-only socket).
                Err(e) => runtime()?
                    .block_on(ask(&state, api::Request::Status,
                    ))
                    .ok()
                    .and_then(|v| v["node"]["address"].as_str().map(str::to_owned))
                    .ok_or(e)?,
            };
            out(&address);
            Ok(())
        }
        Command::Ip {
            peer: Some(peer),
            ipv6,
        } => {
            let v =
                runtime()?.block_on(ask(&state, api::Request::Status))?;
            let found = v["peers"].as_array().into_iter().flatten().find(|p| {
                ["name", "address", "address6", "key"]
                    .iter()
                    .any(|k| p[*k].as_str() == Some(peer.as_str()))
            });
            let field = if ipv6 { "address6" } else { "address" };
            match found.map(|p| p[field].as_str()) {
                Some(Some(a)) => {
                    out(a);
                    Ok(())
                }
                Some(None) => anyhow::bail!(
                    "peer {peer:?} has no IPv6 overlay address (its network has none, or the controller is older); `mesh ip {peer}` prints the IPv4 one"
                ),
                None => anyhow::bail!(
                    "no peer named {peer:?} in network {} (see `mesh status`)",
                    v["node"]["network"].as_str().unwrap_or("?")
                ),
            }
        }
        Command::Status { json } => {
            let v =
                runtime()?.block_on(ask(&state, api::Request::Status))?;
            if json {
                out(&serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Command::Down => runtime()?.block_on(async {
            let v = api::request(&state.socket_path(), api::Request::Down).await?;
            // The daemon takes mesh0 away as it stops; wait until it has.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while state.running_agent().is_some() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            out(&format!(
                "mesh is down: {} removed, membership of network {} kept; `mesh up` (or `systemctl start mesh`) brings the node back with the same address",
                v["interface"].as_str().unwrap_or("mesh0"),
                v["network"].as_str().unwrap_or("?")
            ));
            Ok(())
        }),
        Command::Leave { force } => runtime()?.block_on(async {
            match api::request(&state.socket_path(), api::Request::Leave { force }).await {
                Ok(v) => {
                    // The daemon deletes the state as it stops; wait for that.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while state.load_membership().is_ok() && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let network = v["network"].as_str().unwrap_or("?");
                    out(&format!(
                        "left network {network}; mesh0 and the local state in {} deleted",
                        state.path().display()
                    ));
                    if v["pending"] == true {
                        warn_user(&format!(
                            "the node was still waiting for approval; its request stays listed on the controller until it lapses (24 h): reject it there with `mesh-controller node reject {network} {}`",
                            v["name"].as_str().unwrap_or("NAME"),
                        ));
                    } else if v["controller_told"] == false {
                        warn_user(&format!(
                            "the controller was not told ({}), so it may still list this node: remove it there with `mesh-controller node remove {network} {}`",
                            v["reason"].as_str().unwrap_or("no answer"),
                            v["name"].as_str().unwrap_or("NAME"),
                        ));
                    }
                    Ok(())
                }
                Err(e) if e.downcast_ref::<api::NotRunning>().is_some() => {
                    let left = daemon::leave_offline(&state, force).await?;
                    out(&format!(
                        "left network {}; mesh0 and the local state in {} deleted",
                        left.network,
                        state.path().display()
                    ));
                    if left.pending {
                        warn_user(&format!(
                            "the node was still waiting for approval; its request stays listed on the controller until it lapses (24 h): reject it there with `mesh-controller node reject {} {}`",
                            left.network, left.name
                        ));
                    } else if let Some(reason) = left.not_told {
                        warn_user(&format!(
                            "the controller was not told ({reason}), so it may still list this node: remove it there with `mesh-controller node remove {} {}`",
                            left.network, left.name
                        ));
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh: error: {e:#}");
            if e.downcast_ref::<daemon::Fatal>().is_some() {
                ExitCode::from(daemon::EXIT_FATAL)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Polls until the address is on the interface and `peers` peers answered recently.
async fn wait_online(state: &StateDir, timeout: Duration, peers: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let waiting_for = match state.load_membership() {
            Err(_) if matches!(state.load_request(), Ok(Some(_))) => {
                "the administrator to approve this node's join request (`mesh status` shows it)"
                    .to_owned()
            }
            Err(_) => format!(
                "a membership in {} (run `mesh join --token-file FILE`)",
                state.path().display()
            ),
            Ok(m) => {
                let present = mesh_sys::netlink::has_address(&m.interface, m.address)
                    .await
                    .unwrap_or(false);
                if !present {
                    format!("address {} on {}", m.address, m.interface)
                } else if peers == 0 {
                    return Ok(());
                } else {
                    match ask(state, api::Request::Status).await {
                        Ok(v) => {
                            let answering = v["peers"]
                                .as_array()
                                .map(|ps| {
                                    ps.iter()
                                        .filter(|p| {
                                            p["last_rx_secs_ago"].as_u64().is_some_and(|s| s <= 30)
                                        })
                                        .count()
                                })
                                .unwrap_or(0);
                            if answering >= peers {
                                return Ok(());
                            }
                            format!("{peers} answering peers ({answering} so far)")
                        }
                        Err(_) => "the mesh daemon to answer".to_owned(),
                    }
                }
            }
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "not online after {}: still waiting for {waiting_for}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
