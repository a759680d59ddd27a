//! Assembling and running the daemon: TUN, the shared UDP socket, QUIC on it, the data plane,
//! the control loop and the local API.

use crate::api::{self, Request};
use crate::candidates::{self, EndpointInterfaces};
use crate::control::{self, ControlCmd, ControlCtx, ControlStatus};
use crate::dataplane::{self, DataCmd, DataStatus, DriverCounters};
use crate::dial::{Dialer, ProxyEnv, Target};
use crate::state::{Membership, StateDir};
use anyhow::Context as _;
use mesh_control::quic;
use mesh_core::{Counters, Node, NodeConfig};
use mesh_proto::control::{ClientMsg, NatKind};
use mesh_proto::token::{ControllerRef, JoinToken, NetworkId};
use mesh_proto::PublicKey;
use mesh_sys::netlink::InterfaceConfig;
use mesh_sys::socket::UdpPort;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

/// Options shared by `join` and `up`. `None` means: what the node saved at join, else the
/// built-in default.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directory.
    pub state: StateDir,
    /// UDP port.
    pub port: Option<u16>,
    /// MTU of the TUN device.
    pub mtu: Option<u32>,
    /// TUN device name.
    pub interface: Option<String>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Which interfaces' addresses are offered as endpoint candidates.
    pub endpoint_interfaces: Option<EndpointInterfaces>,
    /// Whether to ask the router to forward the UDP port.
    pub port_mapping: Option<bool>,
    /// The prefixes to advertise as subnet routes.
    pub advertise_routes: Option<Vec<ipnet::IpNet>>,
    /// Whether to answer node names on the overlay address.
    pub dns: Option<bool>,
    /// Whether to keep the node names in /etc/hosts.
    pub hosts_file: Option<bool>,
    /// The prefixes to offer as an exit.
    pub advertise_exits: Option<Vec<ipnet::IpNet>>,
    /// The prefixes to send through a peer's exit.
    pub use_exits: Option<Vec<crate::exits::ExitUse>>,
    /// Whether to advertise the pod subnet found on the node as well (`auto`).
    pub advertise_auto: Option<bool>,
    /// Where that pod subnet is looked for: the CNI config directory, flannel's subnet file
    /// (`None`: as saved, else the defaults).
    pub pod_cidr_sources: (Option<std::path::PathBuf>, Option<std::path::PathBuf>),
}

/// Options with every value decided.
#[derive(Debug, Clone)]
pub struct Settings {
    state: StateDir,
    port: u16,
    mtu: u32,
    interface: String,
    metrics_listen: Option<SocketAddr>,
    endpoint_interfaces: EndpointInterfaces,
    port_mapping: bool,
    advertise_routes: Vec<ipnet::IpNet>,
    dns: bool,
    hosts_file: bool,
    advertise_exits: Vec<ipnet::IpNet>,
    use_exits: Vec<crate::exits::ExitUse>,
    auto_routes: Option<crate::podcidr::AutoRoutes>,
}

impl Options {
    fn settle(self, saved: Option<&Membership>) -> anyhow::Result<Settings> {
        use crate::config::defaults;
        let endpoint_interfaces = match (self.endpoint_interfaces, saved) {
            (Some(list), _) => list,
            (None, Some(Membership {
                endpoint_interfaces: Some(list),
                ..
            })) => list.parse().with_context(|| {
                format!(
                    "the endpoint interface list {list:?} saved in {} is invalid; give another with --endpoint-interfaces (\"\" for the defaults)",
                    self.state.path().display()
                )
            })?,
            (None, _) => EndpointInterfaces::default(),
        };
        // `auto` on: the prefix found last stays advertised until the sources say otherwise,
        // also when the explicit prefixes beside it are given anew.
        let saved_auto = saved.and_then(|m| m.auto_routes.clone());
        let mut auto_routes = match self.advertise_auto {
            Some(true) => Some(saved_auto.unwrap_or_default()),
            Some(false) => None,
            None => saved_auto,
        };
        if let Some(a) = auto_routes.as_mut() {
            let (cni, flannel) = self.pod_cidr_sources;
            a.cni_conf_dir = cni.or(a.cni_conf_dir.take());
            a.flannel_subnet_env = flannel.or(a.flannel_subnet_env.take());
        }
        let mut advertise_routes = self
            .advertise_routes
            .or(saved.map(|m| m.advertise_routes.clone()))
            .unwrap_or_default();
        if let Some(found) = auto_routes.as_ref().and_then(|a| a.found) {
            if !advertise_routes.contains(&ipnet::IpNet::V4(found)) {
                advertise_routes.push(ipnet::IpNet::V4(found));
            }
        }
        Ok(Settings {
            port: self
                .port
                .or(saved.map(|m| m.port))
                .unwrap_or(defaults::PORT),
            mtu: self.mtu.or(saved.map(|m| m.mtu)).unwrap_or(defaults::MTU),
            interface: self
                .interface
                .or(saved.map(|m| m.interface.clone()))
                .unwrap_or_else(|| defaults::INTERFACE.to_owned()),
            metrics_listen: self.metrics_listen,
            endpoint_interfaces,
            port_mapping: self
                .port_mapping
                .or(saved.map(|m| m.port_mapping))
                .unwrap_or(true),
            advertise_routes,
            auto_routes,
            dns: self.dns.or(saved.map(|m| m.dns)).unwrap_or(true),
            hosts_file: self
                .hosts_file
                .or(saved.map(|m| m.hosts_file))
                .unwrap_or(false),
            advertise_exits: self
                .advertise_exits
                .or(saved.map(|m| m.advertise_exits.clone()))
                .unwrap_or_default(),
            use_exits: self
                .use_exits
                .or(saved.map(|m| m.use_exits.clone()))
                .unwrap_or_default(),
            state: self.state,
        })
    }

    /// The endpoint interface list as `node.json` keeps it (`None`: the defaults).
    fn saved_list(settings: &Settings) -> Option<String> {
        (!settings.endpoint_interfaces.is_default())
            .then(|| settings.endpoint_interfaces.to_string())
    }
}

struct Running {
    path_rx: mpsc::UnboundedReceiver<dataplane::PathEvent>,
    port: UdpPort,
    tun: Arc<mesh_sys::tun::Tun>,
    endpoint: quinn::Endpoint,
    /// Opens links to the controller and relays over QUIC or TCP.
    dialer: Dialer,
    data_tx: mpsc::Sender<DataCmd>,
    shutdown_tx: watch::Sender<bool>,
    data_task: tokio::task::JoinHandle<()>,
    /// Whether the shared socket carries the bypass mark.
    marked: bool,
}

/// What `mesh status` shows about keeping the overlay off itself.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct OverlayStatus {
    /// The firewall mark on mesh's own sockets.
    bypass_mark: String,
    /// Whether the sockets carry it (needs CAP_NET_ADMIN).
    sockets_marked: bool,
    /// Whether the policy rules that keep marked packets off the overlay are installed.
    bypass_rule: bool,
    /// Interfaces found stacked on the overlay interface (never endpoints).
    stacked: Vec<String>,
    /// Destinations the overlay reaches (never endpoints).
    excluded: Vec<String>,
}

/// What `mesh status` shows about which interfaces' addresses are offered to peers.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct EndpointInterfacesStatus {
    /// The operator's list in effect; empty: the defaults alone.
    list: String,
    /// Interfaces whose addresses are offered.
    offered: Vec<String>,
    /// The local addresses offered to peers, per underlay family.
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    /// Interfaces whose addresses are not offered, with why.
    skipped: Vec<candidates::Skipped>,
}

fn public_of(secret: &[u8; 32]) -> PublicKey {
    PublicKey(x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes())
}

/// Creates the TUN device and the shared socket, and starts the data plane (so QUIC works).
fn start(
    opts: &Settings,
    node_key: &[u8; 32],
    address: Ipv4Addr,
    overlay: Option<ipnet::Ipv4Net>,
) -> anyhow::Result<Running> {
    let (tun, offload) = mesh_sys::tun::create(&opts.interface)?;
    match &offload {
        // The normal case: shown by `mesh status`, not logged on every start.
        mesh_sys::tun::Offload::On => {
            debug!(
                "{} opened with offloads (TCP segmentation, batched reads and writes)",
                opts.interface
            )
        }
        mesh_sys::tun::Offload::Off(why) => {
            warn!(
                "{} opened without offloads, one packet per read and write (slower): {why}",
                opts.interface
            )
        }
    }
    // Both families on one port (IPv4 alone where the kernel has no IPv6).
    let port = mesh_control::net::with_ipv4_fallback(
        mesh_control::net::any(opts.port),
        mesh_control::net::bind_udp,
    )
    .and_then(UdpPort::from_std)
    .with_context(|| {
        format!(
            "cannot bind UDP port {} (is another mesh agent running? choose another with --port)",
            opts.port
        )
    })?;
    let buffers = port.size_buffers(mesh_sys::socket::SOCKET_BUFFER);
    if buffers.short_of(mesh_sys::socket::SOCKET_BUFFER) > 0 {
        warn!(
            recv = buffers.recv,
            send = buffers.send,
            "the kernel gave the UDP socket smaller buffers than the {} MiB asked (no CAP_NET_ADMIN to pass net.core.rmem_max/wmem_max): bursts may be dropped; raise them with sysctl -w net.core.rmem_max=7340032 net.core.wmem_max=7340032",
            mesh_sys::socket::SOCKET_BUFFER >> 20
        );
    }
    let marked = match port.set_bypass_mark() {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "cannot mark mesh's own packets (SO_MARK needs CAP_NET_ADMIN): they are kept off {} by endpoint filtering alone", opts.interface);
            false
        }
    };
    let (inbox, quic_socket) = port.quic();
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quic::endpoint_config(),
        None,
        quic_socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(quic::client_config()?);
    let dialer = Dialer {
        endpoint: endpoint.clone(),
        mark: marked.then_some(mesh_sys::bypass::MARK),
        proxy: ProxyEnv::from_env(),
        interface: opts.interface.clone(),
        overlay,
        tcp_first: Arc::new(std::sync::atomic::AtomicBool::new(
            opts.state.load_tcp_only(),
        )),
        lossy: Default::default(),
    };
    if let Some(p) = &dialer.proxy.https {
        info!(proxy = %p.addr, "HTTPS_PROXY set: used for TCP to the controller and relays where UDP does not get through");
    }
    let seed = rand::random::<u32>();
    let node = Node::new(
        NodeConfig {
            private_key: *node_key,
            address,
            keepalive: Some(mesh_core::node::DEFAULT_KEEPALIVE),
            mtu: u16::try_from(opts.mtu).unwrap_or(1420),
        },
        seed,
        Instant::now(),
    );
    let (data_tx, data_rx) = mpsc::channel(64);
    let (path_tx, path_rx) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tun = Arc::new(tun);
    let devices = dataplane::Devices {
        port: port.clone(),
        tun: tun.clone(),
        quic: inbox,
        offload: offload == mesh_sys::tun::Offload::On,
        buffers,
    };
    let data_task = tokio::spawn(dataplane::run(node, devices, data_rx, path_tx, shutdown_rx));
    Ok(Running {
        path_rx,
        port,
        tun,
        endpoint,
        dialer,
        data_tx,
        shutdown_tx,
        data_task,
        marked,
    })
}

/// Configures the overlay interface: the IPv4 address (a failure is fatal), then the IPv6
/// overlay address, if the network has one: without IPv6 on this host the node still works
/// over IPv4 (warned; returned for `mesh status`, `node.address6_error`).
async fn configure_interface(opts: &Settings, m: &Membership) -> anyhow::Result<Option<String>> {
    let address6 = m.address6.zip(m.prefix6.map(|p| p.prefix_len()));
    mesh_sys::netlink::configure(&InterfaceConfig {
        name: opts.interface.clone(),
        address: m.address,
        prefix_len: m.prefix_len,
        address6,
        mtu: opts.mtu,
    })
    .await
    .with_context(|| format!("cannot configure {}", opts.interface))?;
    let error = match address6 {
        Some((a, len)) => mesh_sys::netlink::configure_ipv6(&opts.interface, a, len)
            .await
            .err()
            .map(|e| {
                warn!(address6 = %a, error = %e, "no IPv6 overlay address on {}: peers reach this node over IPv4 only", opts.interface);
                e.to_string()
            }),
        None => None,
    };
    Ok(error)
}

/// Pause between join attempts while the controller does not answer.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// The name a node asks for at its join.
#[derive(Debug, Clone)]
pub struct NameChoice {
    /// The name.
    pub name: String,
    /// Given with `--name`: taken means refused, not renamed.
    pub explicit: bool,
}

/// What a join, by token or by network id, starts from: the state directory taken, the node
/// key, and the socket, QUIC and the TUN device up, without an address yet.
struct Joining {
    opts: Settings,
    _lock: mesh_service::DirLock,
    node_key: [u8; 32],
    running: Running,
    port: u16,
}

impl Joining {
    fn begin(opts: Options) -> anyhow::Result<Joining> {
        opts.state.create()?;
        opts.state.check_writable().map_err(fatal)?;
        let lock = opts.state.lock()?;
        // Joining again keeps the saved port and interface unless flags say otherwise.
        let saved = opts.state.load_membership().ok();
        let opts = opts.settle(saved.as_ref())?;
        let node_key = opts.state.load_or_create_key()?;
        let running = start(&opts, &node_key, Ipv4Addr::UNSPECIFIED, None)?;
        let port = running.port.local_addr()?.port();
        Ok(Joining {
            opts,
            _lock: lock,
            node_key,
            running,
            port,
        })
    }
}

/// `mesh join`: joins with a token, saves the membership, closes the connection and returns
/// the membership. The caller then starts the daemon as `mesh up` (a process of its own that
/// never held the token), or stops there (`--no-daemon`).
pub async fn join(
    opts: Options,
    token: JoinToken,
    name: NameChoice,
    connect_timeout: Duration,
    wait: Duration,
) -> anyhow::Result<Membership> {
    let Joining {
        opts,
        _lock,
        node_key,
        running,
        port,
    } = Joining::begin(opts)?;
    let first = ClientMsg::Join {
        token_id: token.id.clone(),
        token_secret: token.secret_hex(),
        name: name.name.clone(),
        endpoints: join_candidates(&opts, port).await,
        exact_name: name.explicit,
    };
    tracing::debug!(controller = %token.controller, name = %name.name, "joining");
    // The token's address first, then its others (the other address family, say), each
    // tried when the one before does not answer.
    let targets: Vec<Target> = std::iter::once(&token.controller)
        .chain(&token.controller_others)
        .map(|a| Target::new(a, token.controller_tcp.as_deref(), "mesh-controller"))
        .collect();
    let mut next = 0;
    // A controller that does not answer yet may be booting (cloud-init starts every VM at
    // once): keep trying until `wait` is over. A refusal or a wrong key is final at once.
    let deadline = tokio::time::Instant::now() + wait.max(connect_timeout);
    let mut told = false;
    let (session, welcome) = loop {
        let target = &targets[next % targets.len()];
        next += 1;
        let attempt = control::open(
            &running.dialer,
            target,
            &token.controller_key,
            &node_key,
            &first,
            connect_timeout,
        )
        .await;
        let e = match attempt {
            Ok(s) => break s,
            Err(e) => e,
        };
        let retry = matches!(
            e,
            control::ControlError::Unreachable { .. } | control::ControlError::Failed { .. }
        ) && tokio::time::Instant::now() + JOIN_RETRY < deadline;
        if !retry {
            let _ = running.shutdown_tx.send(true);
            return Err(match e {
                control::ControlError::Refused { message, .. } => {
                    anyhow::anyhow!("join refused: {message}")
                }
                e if told => anyhow::Error::from(e).context(format!(
                    "gave up after waiting {} for the controller (--wait-controller)",
                    humantime::format_duration(wait)
                )),
                e => e.into(),
            });
        }
        if next < targets.len() {
            // Another address of the controller is still untried: at once.
            debug!(controller = %target.quic, error = %e, "no answer; trying the controller's next address");
            continue;
        }
        if !told {
            told = true;
            warn!(controller = %token.controller, error = %e, "the controller does not answer yet; trying again until --wait-controller ({}) is over", humantime::format_duration(wait));
        } else {
            debug!(error = %e, "still no answer from the controller");
        }
        next = 0;
        tokio::time::sleep(JOIN_RETRY).await;
    };
    if told {
        info!(controller = %token.controller, "the controller answers now");
    }
    let controller = ControllerRef {
        addr: token.controller.clone(),
        key: token.controller_key,
        tcp: token.controller_tcp.clone(),
        others: token.controller_others.clone(),
    };
    let membership = save_welcome(&opts, &controller, &welcome, &session, port)?;
    close_joined(membership, &name.name, session, running).await
}

/// After a welcome at a join: the membership, saved with the peer and relay lists.
fn save_welcome(
    opts: &Settings,
    controller: &ControllerRef,
    welcome: &mesh_proto::control::Welcome,
    session: &control::Session,
    port: u16,
) -> anyhow::Result<Membership> {
    let mut controllers = controller.others.clone();
    for c in &welcome.controllers {
        if !controllers.contains(c) && *c != controller.addr {
            controllers.push(c.clone());
        }
    }
    let membership = Membership {
        controller: controller.addr.clone(),
        controller_tcp: controller.tcp.clone(),
        controller_key: controller.key,
        controllers,
        network: welcome.network.clone(),
        name: welcome.name.clone(),
        address: welcome.address,
        prefix_len: welcome.prefix_len,
        address6: welcome.address6,
        prefix6: welcome.prefix6.filter(|_| welcome.address6.is_some()),
        mtu: opts.mtu,
        port,
        interface: opts.interface.clone(),
        endpoint_interfaces: Options::saved_list(opts),
        port_mapping: opts.port_mapping,
        advertise_routes: opts.advertise_routes.clone(),
        dns: opts.dns,
        hosts_file: opts.hosts_file,
        advertise_exits: opts.advertise_exits.clone(),
        use_exits: opts.use_exits.clone(),
        auto_routes: opts.auto_routes.clone(),
    };
    opts.state.save_membership(&membership)?;
    // A node removed before and now joined again is a member again; a request is answered.
    opts.state.clear_removed()?;
    opts.state.clear_request()?;
    // `mesh up`, next, goes straight to TCP where QUIC did not get through.
    opts.state
        .save_tcp_only(session.transport() == mesh_control::Transport::Tcp)?;
    opts.state.save_peers(&welcome.peers)?;
    opts.state.save_relays(&welcome.relays)?;
    Ok(membership)
}

/// The end of a join in this process: says where the node is, closes the session, the QUIC
/// endpoint and the data plane (the daemon starts afresh as `mesh up`).
async fn close_joined(
    membership: Membership,
    asked: &str,
    session: control::Session,
    running: Running,
) -> anyhow::Result<Membership> {
    let _ = running
        .data_tx
        .send(DataCmd::SetAddress(membership.address))
        .await;
    info!(network = %membership.network, name = %membership.name, address = %membership.address, "joined");
    warn_renamed(&membership, asked);
    warn_overlaps(&membership).await;
    let over_quic = session.transport() == mesh_control::Transport::Quic;
    drop(session);
    running.endpoint.close(0u32.into(), b"joined");
    // Over QUIC, let the close reach the controller. Over TCP, the endpoint holds only the QUIC
    // attempt that lost the race, whose packets go nowhere: no reason to wait for it.
    if over_quic {
        let _ = tokio::time::timeout(Duration::from_secs(2), running.endpoint.wait_idle()).await;
    }
    let _ = running.shutdown_tx.send(true);
    Ok(membership)
}

/// Warns when the network's overlay range overlaps a route or address of this host that is
/// not on the overlay interface: packets for those addresses would go one way or the other.
async fn warn_overlaps(membership: &Membership) {
    let Ok(local) = mesh_sys::netlink::local_networks().await else {
        return;
    };
    let range = overlay_range(membership);
    let found = crate::doctor::overlay_conflicts(range, &membership.interface, &local);
    if !found.is_empty() {
        let list: Vec<String> = found.iter().map(crate::doctor::describe).collect();
        warn!(
            "network {}'s range {range} overlaps this host's {}: traffic to those addresses may take the wrong way; move that network, or use a network with another range (mesh-controller network create NAME --cidr ...); `mesh doctor` checks this and more",
            membership.network,
            list.join(", ")
        );
    }
}

/// Warns when the node was registered under another name than the one it asked for.
fn warn_renamed(membership: &Membership, asked: &str) {
    if membership.name != asked {
        // Only an implicit name gets here (an explicit one is refused when taken).
        warn!(
            "the name {:?} is taken in network {} by another node, so this node is registered as {:?}; kubeadm names the node after the hostname, so the two now differ. If the holder is this machine's old entry (a reinstall, a lost key), remove it with `mesh-controller node remove {} {}` and join again; otherwise give this node its own --name",
            asked, membership.network, membership.name, membership.network, asked
        );
    }
}

/// What a join by network id came to.
pub enum Requested {
    /// Admitted at once (approved before, or the network approves automatically).
    Joined(Box<Membership>),
    /// Recorded (and saved in `request.json`): the administrator must approve.
    Pending(crate::approval::WaitStatus),
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The join request by network id, as sent.
async fn request_msg(opts: &Settings, id: &NetworkId, name: &NameChoice, port: u16) -> ClientMsg {
    ClientMsg::RequestJoin {
        network: id.network.clone(),
        name: name.name.clone(),
        hostname: crate::config::hostname(),
        endpoints: join_candidates(opts, port).await,
        exact_name: name.explicit,
    }
}

/// The candidates a node reports when it joins (by token or by network id): its local
/// addresses with its port; nothing is known yet of the overlay or of mappings.
async fn join_candidates(opts: &Settings, port: u16) -> Vec<SocketAddr> {
    candidates::report(
        &control::local_addresses(&opts.interface, None).await,
        &opts.endpoint_interfaces,
        port,
        candidates::Mappings::default(),
    )
}

fn wait_status(
    id: &NetworkId,
    name: &str,
    node_key: &[u8; 32],
    since: u64,
) -> crate::approval::WaitStatus {
    let key = public_of(node_key);
    crate::approval::WaitStatus {
        network: id.network.clone(),
        name: name.to_owned(),
        key,
        fingerprint: key.fingerprint(),
        controller: id.controller.addr.clone(),
        controller_answers: false,
        last_error: None,
        since,
    }
}

/// `mesh join NETWORK-ID`: asks the controller to admit this node. Returns the membership when
/// the controller admits it at once; else saves the request (`request.json`), which `mesh up`
/// keeps asking with until the administrator decides.
pub async fn request(
    opts: Options,
    id_text: &str,
    name: NameChoice,
    connect_timeout: Duration,
    wait: Option<Duration>,
) -> anyhow::Result<Requested> {
    let id: NetworkId = id_text.parse()?;
    let Joining {
        opts,
        _lock,
        node_key,
        running,
        port,
    } = Joining::begin(opts)?;
    let since = unix_now();
    let status = Mutex::new(wait_status(&id, &name.name, &node_key, since));
    let asking = crate::approval::Asking {
        dialer: &running.dialer,
        id: &id,
        node_key: &node_key,
        request: request_msg(&opts, &id, &name, port).await,
        connect_timeout,
    };
    let limits = crate::approval::Limits {
        unreachable: Some(wait.unwrap_or(DEFAULT_CONTROLLER_WAIT)),
        total: wait,
    };
    match crate::approval::ask_until(&asking, &status, limits, true).await {
        Err(e) => {
            let _ = running.shutdown_tx.send(true);
            Err(e)
        }
        Ok(crate::approval::Answer::Approved(session, welcome)) => {
            let m = save_welcome(&opts, &id.controller, &welcome, &session, port)?;
            close_joined(m, &name.name, session, running)
                .await
                .map(|m| Requested::Joined(Box::new(m)))
        }
        Ok(crate::approval::Answer::Pending(session)) => {
            let status = status
                .lock()
                .map(|s| s.clone())
                .map_err(|_| anyhow::anyhow!("internal error: the request's status is poisoned"))?;
            let settings = Membership {
                controller: id.controller.addr.clone(),
                controller_tcp: id.controller.tcp.clone(),
                controller_key: id.controller.key,
                controllers: id.controller.others.clone(),
                network: id.network.clone(),
                name: status.name.clone(),
                address: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                address6: None,
                prefix6: None,
                mtu: opts.mtu,
                port,
                interface: opts.interface.clone(),
                endpoint_interfaces: Options::saved_list(&opts),
                port_mapping: opts.port_mapping,
                advertise_routes: opts.advertise_routes.clone(),
                dns: opts.dns,
                hosts_file: opts.hosts_file,
                advertise_exits: opts.advertise_exits.clone(),
                use_exits: opts.use_exits.clone(),
                auto_routes: opts.auto_routes.clone(),
            };
            opts.state.save_request(&crate::state::PendingJoin {
                id: id_text.trim().to_owned(),
                name: name.name.clone(),
                exact_name: name.explicit,
                since,
                settings,
            })?;
            opts.state.clear_removed()?;
            session.close();
            running.endpoint.close(0u32.into(), b"asked");
            let _ = running.shutdown_tx.send(true);
            Ok(Requested::Pending(status))
        }
    }
}

/// How long `mesh join` waits for a controller that does not answer, unless `--wait` says.
pub const DEFAULT_CONTROLLER_WAIT: Duration = Duration::from_secs(60);

/// `mesh status` of a node that waits for approval.
fn pending_status_json(s: &crate::approval::WaitStatus, interface: &str) -> serde_json::Value {
    json!({
        "state": "waiting_for_approval",
        "version": env!("CARGO_PKG_VERSION"),
        "node": {
            "name": s.name,
            "key": s.key.to_string(),
            "fingerprint": s.fingerprint,
            "network": s.network,
            "interface": interface,
        },
        "controller": {
            "address": s.controller,
            "connected": s.controller_answers,
            "last_error": s.last_error,
        },
        "waiting_since": humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(s.since)
        ).to_string(),
        "approve_with": s.approve_command(),
    })
}

/// How often the daemon tells systemd, while it waits for approval, to wait longer for it
/// (`EXTEND_TIMEOUT_USEC`, by twice this), so the unit's start does not time out.
const EXTEND_EVERY: Duration = Duration::from_secs(30);

/// `mesh up` of a node whose join request waits for approval: asks until the administrator
/// decides, serving `mesh status` meanwhile, then goes on as a member in this process.
async fn up_pending(
    opts: Options,
    pending: crate::state::PendingJoin,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    opts.state.check_writable().map_err(fatal)?;
    let lock = opts.state.lock()?;
    let node_key = opts.state.load_key()?.context(
        "the node key is missing from the state directory; ask again with `mesh join NETWORK-ID`",
    )?;
    let id = pending.network_id().map_err(fatal)?;
    let opts = opts.settle(Some(&pending.settings))?;
    let mut running = start(&opts, &node_key, Ipv4Addr::UNSPECIFIED, None)?;
    let port = running.port.local_addr()?.port();
    let sockets = (
        api::bind(&opts.state.socket_path())?,
        api::bind_read_only(&opts.state.read_only_socket_path())?,
    );
    let name = NameChoice {
        name: pending.name.clone(),
        explicit: pending.exact_name,
    };
    let status = Mutex::new(wait_status(&id, &pending.name, &node_key, pending.since));
    let dialer = running.dialer.clone();
    let asking = crate::approval::Asking {
        dialer: &dialer,
        id: &id,
        node_key: &node_key,
        request: request_msg(&opts, &id, &name, port).await,
        connect_timeout: Duration::from_secs(10),
    };
    let limits = crate::approval::Limits {
        unreachable: wait,
        total: wait,
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!(
        "asking the controller at {} to join network {}",
        id.controller.addr, id.network
    ))]);
    let waiting = crate::approval::ask_until(&asking, &status, limits, false);
    tokio::pin!(waiting);
    let mut extend = tokio::time::interval(EXTEND_EVERY);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (listener, read_only) = &sockets;
    enum Stop {
        Signal,
        Down,
        Withdrawn,
    }
    let outcome = loop {
        tokio::select! {
            r = &mut waiting => break Ok(r),
            _ = extend.tick() => {
                let line = status.lock().map(|s| if s.controller_answers {
                    s.line()
                } else {
                    format!("asking the controller at {} to join network {} ({})", s.controller, s.network, s.last_error.as_deref().unwrap_or("connecting"))
                }).unwrap_or_default();
                let extend_usec = u32::try_from((EXTEND_EVERY * 2).as_micros()).unwrap_or(u32::MAX);
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::ExtendTimeoutUsec(extend_usec),
                    sd_notify::NotifyState::Status(&line),
                ]);
            }
            _ = tokio::signal::ctrl_c() => break Err(Stop::Signal),
            _ = term.recv() => break Err(Stop::Signal),
            accepted = async {
                tokio::select! {
                    a = listener.accept() => a.map(|(s, ())| (s, false)),
                    a = read_only.accept() => a.map(|(s, ())| (s, true)),
                }
            } => {
                let Ok((mut stream, ro)) = accepted else { continue };
                let snapshot = status.lock().map(|s| s.clone());
                let Ok(snapshot) = snapshot else { continue };
                match api::read_request(&mut stream).await {
                    Some(r) if ro && !r.read_only() => {
                        api::write_response(&mut stream, &json!({
                            "error": format!("permission denied: this command changes the node and needs root (or the group of {}); run it with sudo", opts.state.socket_path().display()),
                            "denied": true,
                        })).await;
                    }
                    Some(Request::Status) => {
                        api::write_response(&mut stream, &pending_status_json(&snapshot, &opts.interface)).await;
                    }
                    Some(Request::Ping { .. }) => {
                        api::write_response(&mut stream, &json!({"error": format!("this node has no peers yet: {}", snapshot.line())})).await;
                    }
                    Some(Request::Routes { .. }) => {
                        api::write_response(&mut stream, &json!({"error": format!("this node is not a member yet, so it advertises nothing: {}; once approved, `mesh routes advertise` works (or give --advertise-routes to `mesh up`)", snapshot.line())})).await;
                    }
                    Some(Request::Down) => {
                        api::write_response(&mut stream, &json!({"ok": true, "network": snapshot.network, "interface": opts.interface, "pending": true})).await;
                        break Err(Stop::Down);
                    }
                    Some(Request::Leave { .. }) => {
                        api::write_response(&mut stream, &json!({
                            "ok": true,
                            "network": snapshot.network,
                            "name": snapshot.name,
                            "pending": true,
                            "controller_told": false,
                            "reason": "the node was still waiting for approval; its request stays listed until it lapses (24 h) or the administrator rejects it",
                        })).await;
                        break Err(Stop::Withdrawn);
                    }
                    None => api::write_response(&mut stream, &json!({"error": "malformed request"})).await,
                }
            }
        }
    };
    let stop_waiting = |running: Running| async move {
        let _ = running.shutdown_tx.send(true);
        running.endpoint.close(0u32.into(), b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(3), running.data_task).await;
    };
    let remove_sockets = || {
        let _ = std::fs::remove_file(opts.state.socket_path());
        let _ = std::fs::remove_file(opts.state.read_only_socket_path());
    };
    let answer = match outcome {
        Ok(answer) => answer,
        Err(stop) => {
            stop_waiting(running).await;
            remove_sockets();
            match stop {
                Stop::Signal => info!("stopping; the join request is kept (`mesh up` asks again)"),
                Stop::Down => info!("down: the join request is kept; `mesh up` asks again"),
                Stop::Withdrawn => {
                    opts.state.wipe()?;
                    info!("join request withdrawn; local state deleted");
                }
            }
            drop(lock);
            return Ok(());
        }
    };
    let (session, welcome) = match answer {
        Ok(crate::approval::Answer::Approved(session, welcome)) => (session, *welcome),
        Ok(crate::approval::Answer::Pending(_)) => unreachable!("asked until approved"),
        Err(e) => {
            stop_waiting(running).await;
            remove_sockets();
            if e.downcast_ref::<Fatal>().is_some() {
                // Rejected, or the network is gone: asking again cannot help.
                opts.state.clear_request()?;
            }
            return Err(e);
        }
    };
    let membership = save_welcome(&opts, &id.controller, &welcome, &session, port)?;
    info!(network = %membership.network, name = %membership.name, address = %membership.address, "approved: joined");
    warn_renamed(&membership, &pending.name);
    warn_overlaps(&membership).await;
    // The daemon goes on in this process; its control loop says hello on its own connection.
    session.close();
    running.dialer.overlay = Some(overlay_range(&membership));
    let _ = running
        .data_tx
        .send(DataCmd::SetAddress(membership.address))
        .await;
    let _ = running
        .data_tx
        .send(DataCmd::SetPeers(crate::exits::with_exits(
            welcome.peers.clone(),
            &opts.use_exits,
        )))
        .await;
    let result = run(opts, membership, node_key, running, Some(sockets)).await;
    drop(lock);
    result
}

/// `mesh up`: runs the daemon from saved state; works while the controller is down. A node
/// whose join request waits for approval keeps asking (for `wait` at most; `None`: for ever).
pub async fn up(opts: Options, wait: Option<Duration>) -> anyhow::Result<()> {
    if let Some(pending) = opts.state.load_request()? {
        return up_pending(opts, pending, wait).await;
    }
    // Before anything touches the interface: a state directory it can write, one agent per
    // state directory, and a membership the controller has not ended.
    let mut membership = opts.state.load_membership()?;
    if let Some(r) = opts.state.load_removed() {
        return Err(fatal(anyhow::anyhow!(
            "this node was removed from network {} (the controller said: {}); its address {} may now belong to another node, so mesh does not bring it up. Join again with a new token (`mesh join --token-file FILE`), or clean up with `mesh leave --force`",
            r.network,
            r.message,
            r.address
        )));
    }
    opts.state.check_writable().map_err(fatal)?;
    let lock = opts.state.lock()?;
    let node_key = opts.state.load_key()?.context(
        "the node key is missing from the state directory; join again with `mesh join --token-file FILE`",
    )?;
    let opts = opts.settle(Some(&membership))?;
    let list = Options::saved_list(&opts);
    if (
        membership.port,
        membership.mtu,
        &membership.interface,
        &membership.endpoint_interfaces,
        membership.port_mapping,
        &membership.advertise_routes,
        (membership.dns, membership.hosts_file),
        (&membership.advertise_exits, &membership.use_exits),
        &membership.auto_routes,
    ) != (
        opts.port,
        opts.mtu,
        &opts.interface,
        &list,
        opts.port_mapping,
        &opts.advertise_routes,
        (opts.dns, opts.hosts_file),
        (&opts.advertise_exits, &opts.use_exits),
        &opts.auto_routes,
    ) {
        membership.port = opts.port;
        membership.mtu = opts.mtu;
        membership.interface = opts.interface.clone();
        membership.endpoint_interfaces = list;
        membership.port_mapping = opts.port_mapping;
        membership.advertise_routes = opts.advertise_routes.clone();
        membership.dns = opts.dns;
        membership.hosts_file = opts.hosts_file;
        membership.advertise_exits = opts.advertise_exits.clone();
        membership.use_exits = opts.use_exits.clone();
        membership.auto_routes = opts.auto_routes.clone();
        opts.state.save_membership(&membership)?;
    }
    let running = start(
        &opts,
        &node_key,
        membership.address,
        Some(overlay_range(&membership)),
    )?;
    let cached = opts.state.load_peers();
    info!(peers = cached.len(), "starting from saved state");
    let _ = running
        .data_tx
        .send(DataCmd::SetPeers(crate::exits::with_exits(
            cached,
            &opts.use_exits,
        )))
        .await;
    let result = run(opts, membership, node_key, running, None).await;
    drop(lock);
    result
}

/// A state that restarting the agent cannot fix (the node was removed, the state directory is
/// read-only): `mesh` exits with [`EXIT_FATAL`], which the unit does not restart on.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Fatal(anyhow::Error);

/// Exit status for [`Fatal`] (`RestartPreventExitStatus=` in mesh.service; sysexits' EX_CONFIG).
pub const EXIT_FATAL: u8 = 78;

/// Wraps `e` as [`Fatal`].
pub(crate) fn fatal(e: anyhow::Error) -> anyhow::Error {
    Fatal(e).into()
}

/// The node's IPv6 overlay address with the network's prefix, as saved (`None`: IPv4 only).
fn overlay6_of(m: &Membership) -> Option<(std::net::Ipv6Addr, ipnet::Ipv6Net)> {
    m.address6.zip(m.prefix6)
}

/// Why the daemon's loop ended.
enum Exit {
    /// SIGTERM or Ctrl-C: stop, keep the interface (a restart takes it over).
    Signal,
    /// `mesh leave`: the interface and the state go.
    Left,
    /// `mesh down`: the interface goes, the state stays.
    Down,
    /// The controller says the node is no longer a member: the interface goes (its address may
    /// be given to another node), the removal is recorded, the agent fails.
    Removed(String),
}

async fn run(
    opts: Settings,
    mut membership: Membership,
    node_key: [u8; 32],
    running: Running,
    sockets: Option<(api::Listener, api::Listener)>,
) -> anyhow::Result<()> {
    let address6_error = configure_interface(&opts, &membership).await?;
    let _ = running
        .data_tx
        .send(DataCmd::SetAddress6(overlay6_of(&membership)))
        .await;
    // Subnet routes from the caches until the controller speaks: what this node may route for
    // its peers, and what its peers route.
    let cached_states = opts.state.load_route_states();
    // The cached peer list, read once: the routes, names and exits it gives until the
    // controller speaks.
    let cached_peers = opts.state.load_peers();
    let own_routes = approved(&cached_states);
    let (routed, exits) = split_exits(&cached_states);
    match mesh_sys::firewall::clamp_mss(&opts.interface, &routed, &exits) {
        Ok(()) => debug!(interface = %opts.interface, "TCP MSS clamped to the route MTU"),
        Err(e) => warn!(error = %e, "no MSS clamping"),
    }
    let _ = running
        .data_tx
        .send(DataCmd::SetRoutes(own_routes.clone()))
        .await;
    let (advertised_tx, advertised_rx) = watch::channel(membership.advertise_routes.clone());
    // `--advertise-routes auto`: the pod subnet found on the node, followed while it changes.
    let (mut auto_rx, auto_task) = match crate::podcidr::start(
        membership.auto_routes.as_ref(),
        running.shutdown_tx.subscribe(),
    ) {
        Some((rx, task)) => (Some(rx), Some(task)),
        None => (None, None),
    };
    let (route_states_tx, route_states_rx) = watch::channel(cached_states);
    let (peer_routes_tx, peer_routes_rx) = watch::channel(control::routes_of(&cached_peers));
    let routes_task = tokio::spawn(sync_routes(
        opts.interface.clone(),
        (membership.address, membership.address6),
        overlay_ranges(&membership),
        peer_routes_rx,
        (route_states_rx.clone(), own_routes),
        running.data_tx.clone(),
    ));
    if let Err(e) = mesh_sys::tun::persist(&running.tun) {
        warn!(error = %e, "cannot make {} persistent; it will vanish while the agent restarts", opts.interface);
    }
    info!(interface = %opts.interface, address = %membership.address, prefix = membership.prefix_len, mtu = opts.mtu, "interface up");
    // systemd (Type=notify): ready only now that the address is on the interface, so that
    // kubelet, ordered after mesh.service, finds its --node-ip.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "{} on {} in network {}",
            membership.address, opts.interface, membership.network
        )),
    ]);
    let (listener, read_only) = match sockets {
        Some(s) => s,
        None => (
            api::bind(&opts.state.socket_path())?,
            api::bind_read_only(&opts.state.read_only_socket_path())?,
        ),
    };
    let status = Arc::new(Mutex::new(ControlStatus {
        address: membership.controller.clone(),
        connected: false,
        transport: None,
        last_error: None,
        observed: None,
        observer_saw: None,
        nat: None,
        birthday_budget: None,
        clock_offset_ms: None,
    }));
    let (control_tx, control_rx) = mpsc::channel(4);
    // Relays from the cache until the controller speaks: their tickets last for hours.
    let (relay_list, relay_list_rx) = watch::channel(opts.state.load_relays());
    let (home_tx, home_rx) = watch::channel(None);
    let relay_shared = crate::relays::RelayShared::default();
    let relay_task = tokio::spawn(crate::relays::run(
        crate::relays::RelayCtx {
            dialer: running.dialer.clone(),
            node_key,
            data: running.data_tx.clone(),
            shared: relay_shared.clone(),
        },
        relay_list_rx,
        home_tx,
        running.shutdown_tx.subscribe(),
    ));
    // The router's mapping of the UDP port: asked for in the background, never waited for.
    let (mapped_tx, mapped_rx) = watch::channel(None);
    let port_mapping = crate::portmap::PortMapShared::new(if opts.port_mapping {
        crate::portmap::State::Searching
    } else {
        crate::portmap::State::Off
    });
    let portmap_task = if opts.port_mapping {
        let bound = running.port.local_addr()?.port();
        Some(tokio::spawn(crate::portmap::run(
            bound,
            port_mapping.clone(),
            mapped_tx,
            running.shutdown_tx.subscribe(),
        )))
    } else {
        info!("port mapping is off: the router is not asked to forward the UDP port");
        None
    };
    // Node names: the peers' and the network's names for several nodes, from the caches until
    // the controller speaks; the responder on the overlay address and the hosts block follow.
    let (peer_names_tx, peer_names_rx) = watch::channel(control::names_of(&cached_peers));
    let (aliases_tx, aliases_rx) = watch::channel(opts.state.load_names());
    let (names_tx, names_rx) = watch::channel(Arc::new(crate::dns::NameTable::default()));
    let (overlay6_tx, mut overlay6_rx) = watch::channel(overlay6_of(&membership));
    let names_task = tokio::spawn(crate::names::run(
        crate::names::Sources {
            network: membership.network.clone(),
            own: (membership.name.clone(), membership.address),
            own6: overlay6_tx.subscribe(),
            peers: peer_names_rx,
            aliases: aliases_rx,
        },
        names_tx,
        opts.hosts_file
            .then(|| std::path::PathBuf::from(crate::names::HOSTS_FILE)),
        running.shutdown_tx.subscribe(),
    ));
    let dns_stats = Arc::new(crate::dns::DnsStats::default());
    let dns_status = if opts.dns {
        let addr = SocketAddr::from((membership.address, crate::dns::PORT));
        match crate::dns::Responder::bind(addr).await {
            Ok(r) => {
                let listening = r.local_addr();
                // The same names on the IPv6 overlay address, where it is on mesh0.
                let mut listening6 = None;
                if let Some(a6) = membership.address6.filter(|_| address6_error.is_none()) {
                    let addr6 = SocketAddr::from((a6, crate::dns::PORT));
                    match crate::dns::Responder::bind(addr6).await {
                        Ok(r6) => {
                            listening6 = Some(r6.local_addr().to_string());
                            tokio::spawn(r6.run(
                                names_rx.clone(),
                                dns_stats.clone(),
                                running.shutdown_tx.subscribe(),
                            ));
                        }
                        Err(e) => {
                            warn!(error = %e, "node names are not answered on the IPv6 overlay address")
                        }
                    }
                }
                tokio::spawn(r.run(names_rx, dns_stats.clone(), running.shutdown_tx.subscribe()));
                let resolver = match crate::names::tell_resolved(
                    &opts.interface,
                    membership.address,
                    &membership.network,
                )
                .await
                {
                    Ok(true) => {
                        info!(interface = %opts.interface, "systemd-resolved asks the responder for .mesh names");
                        json!("systemd-resolved")
                    }
                    Ok(false) => json!(null),
                    Err(e) => {
                        warn!(error = %e, "cannot point systemd-resolved at the responder; names resolve with dig @address or --hosts-file");
                        json!(null)
                    }
                };
                json!({"listening": listening.to_string(), "listening6": listening6, "resolver": resolver})
            }
            Err(e) => {
                warn!(error = %e, "node names are not answered on the overlay address");
                json!({"listening": null, "error": e.to_string()})
            }
        }
    } else {
        json!({"listening": null, "error": "off (--no-dns)"})
    };
    // Exits this node chose: routed from the cached peer list until the controller speaks.
    let initial_exits = crate::exits::in_use(&opts.use_exits, &cached_peers);
    let (exit_routes_tx, exit_routes_rx) = watch::channel(initial_exits);
    let exits_task = tokio::spawn(crate::exits::run(
        opts.interface.clone(),
        (membership.address, membership.address6),
        exit_routes_rx,
    ));
    let ctx = ControlCtx {
        exits: opts.advertise_exits.clone(),
        uses: opts.use_exits.clone(),
        exit_routes: exit_routes_tx,
        peer_names: peer_names_tx,
        aliases: aliases_tx,
        dialer: running.dialer.clone(),
        target: Target::new(
            &membership.controller,
            membership.controller_tcp.as_deref(),
            "mesh-controller",
        ),
        state: opts.state.clone(),
        network: membership.network.clone(),
        controller_key: membership.controller_key,
        node_key,
        port: membership.port,
        interface: opts.interface.clone(),
        endpoint_interfaces: opts.endpoint_interfaces.clone(),
        overlay: overlay_range(&membership),
        status: status.clone(),
        relays: relay_shared.clone(),
        relay_list,
        home: home_rx,
        port_mapping: mapped_rx,
        advertised: advertised_rx,
        route_states: route_states_tx,
        peer_routes: peer_routes_tx,
        overlay6: overlay6_tx,
    };
    let mut control_task = tokio::spawn(control::run(
        ctx,
        running.data_tx.clone(),
        control_rx,
        running.shutdown_tx.subscribe(),
    ));
    let metrics_task = match opts.metrics_listen {
        Some(addr) => {
            let src = crate::metrics::Source {
                data: running.data_tx.clone(),
                control: status.clone(),
                port_mapping: port_mapping.clone(),
            };
            // Bind now, so that a taken port is an error at start, not a log line later.
            let listener_check = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            drop(listener_check);
            info!(%addr, "serving Prometheus metrics at /metrics");
            Some(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, src).await {
                    warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
                }
            }))
        }
        None => None,
    };
    // mesh's own packets never enter the overlay: the marked sockets' rule, and the view of
    // what the overlay reaches, refreshed while interfaces come and go (a CNI's vxlan device).
    let overlay_status = Arc::new(Mutex::new(OverlayStatus {
        bypass_mark: format!("{:#x}", mesh_sys::bypass::MARK),
        sockets_marked: running.marked,
        ..OverlayStatus::default()
    }));
    // Without the mark (start-up already said why) a rule would match nothing.
    let installed = running.marked
        && match mesh_sys::bypass::install(&opts.interface).await {
            Ok(()) => {
                info!(
                    mark = format_args!("{:#x}", mesh_sys::bypass::MARK),
                    "policy rule keeps mesh's own packets off {}", opts.interface
                );
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot install the policy rule that keeps mesh's own packets off {}; relying on endpoint filtering", opts.interface);
                false
            }
        };
    if let Ok(mut o) = overlay_status.lock() {
        o.bypass_rule = installed;
    }
    let endpoint_status = Arc::new(Mutex::new(EndpointInterfacesStatus {
        list: opts.endpoint_interfaces.to_string(),
        ..EndpointInterfacesStatus::default()
    }));
    let overlay_task = tokio::spawn(watch_overlay(
        opts.interface.clone(),
        overlay_range(&membership),
        running.port.clone(),
        running.data_tx.clone(),
        overlay_status.clone(),
        (opts.endpoint_interfaces.clone(), endpoint_status.clone()),
    ));
    let route_task = tokio::spawn(apply_path_events(
        running.path_rx,
        opts.interface.clone(),
        membership.address,
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut node_info = json!({
        "name": membership.name,
        "key": public_of(&node_key).to_string(),
        "fingerprint": public_of(&node_key).fingerprint(),
        "address": membership.address.to_string(),
        "prefix_len": membership.prefix_len,
        "address6": membership.address6.map(|a| a.to_string()),
        "address6_error": address6_error,
        "prefix6": membership.prefix6.map(|p| p.to_string()),
        "mtu": opts.mtu,
        "interface": opts.interface,
        "port": membership.port,
        "network": membership.network,
    });
    let mut control_done = false;
    let exit = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Exit::Signal,
            _ = term.recv() => break Exit::Signal,
            changed = async {
                match auto_rx.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                let found = auto_rx.as_ref().filter(|_| changed).and_then(|rx| rx.borrow().prefix);
                if !changed {
                    auto_rx = None;
                }
                match found.map(|p| crate::podcidr::adopt(&mut membership, p)) {
                    Some(Ok(Some(list))) => {
                        info!(routes = ?list, "pod subnet found: advertised routes changed");
                        if let Err(e) = opts.state.save_membership(&membership) {
                            warn!(error = %format!("{e:#}"), "cannot save the advertised routes");
                        }
                        advertised_tx.send_replace(list);
                    }
                    Some(Err(e)) => warn!("{e}"),
                    Some(Ok(None)) | None => {}
                }
            }
            changed = overlay6_rx.changed() => {
                let given = *overlay6_rx.borrow_and_update();
                if changed.is_ok() && given.is_some() && given != overlay6_of(&membership) {
                    // The controller gave this node an IPv6 overlay address it did not have
                    // (a network that got one at an upgrade) or moved it: saved for restarts
                    // during an outage, and put on the interface.
                    membership.address6 = given.map(|(a, _)| a);
                    membership.prefix6 = given.map(|(_, p)| p);
                    info!(address6 = ?membership.address6, prefix6 = ?membership.prefix6, "IPv6 overlay address from the controller");
                    if let Err(e) = opts.state.save_membership(&membership) {
                        warn!(error = %format!("{e:#}"), "cannot save the IPv6 overlay address");
                    }
                    match configure_interface(&opts, &membership).await {
                        Ok(error) => node_info["address6_error"] = json!(error),
                        Err(e) => warn!(error = %format!("{e:#}"), "cannot put the IPv6 overlay address on the interface"),
                    }
                    let _ = running.data_tx.send(DataCmd::SetAddress6(given)).await;
                    node_info["address6"] = json!(membership.address6.map(|a| a.to_string()));
                    node_info["prefix6"] = json!(membership.prefix6.map(|p| p.to_string()));
                }
            }
            ended = &mut control_task, if !control_done => {
                control_done = true;
                if let Ok(Some(reason)) = ended {
                    break Exit::Removed(reason);
                }
            }
            accepted = async {
                tokio::select! {
                    a = listener.accept() => a.map(|(s, ())| (s, false)),
                    a = read_only.accept() => a.map(|(s, ())| (s, true)),
                }
            } => {
                let Ok((mut stream, ro)) = accepted else { continue };
                let request = match api::read_request(&mut stream).await {
                    Some(r) if ro && !r.read_only() => {
                        api::write_response(&mut stream, &json!({
                            "error": format!("permission denied: this command changes the node and needs root (or the group of {}); run it with sudo", opts.state.socket_path().display()),
                            "denied": true,
                        })).await;
                        continue;
                    }
                    r => r,
                };
                match request {
                    Some(Request::Status) => {
                        let mut reply = status_json(&node_info, &status, &relay_shared, &running.data_tx).await;
                        let v = &mut reply.rest;
                        if let (Some(obj), Ok(o)) = (v.as_object_mut(), overlay_status.lock()) {
                            obj.insert("overlay".into(), json!(*o));
                        }
                        if let (Some(obj), Ok(e)) = (v.as_object_mut(), endpoint_status.lock()) {
                            obj.insert("endpoint_interfaces".into(), json!(*e));
                        }
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("port_mapping".into(), port_mapping.snapshot().to_json(Instant::now()));
                            let (advertised, states) = (advertised_tx.borrow().clone(), route_states_rx.borrow().clone());
                            let mut routes = routes_json(&advertised, &states, &opts.state.load_peers());
                            routes["auto"] = match &auto_rx {
                                Some(rx) => json!({"enabled": true, "found": *rx.borrow()}),
                                None => json!({"enabled": false}),
                            };
                            obj.insert("routes".into(), routes);
                            let mut dns = dns_status.clone();
                            dns["stats"] = json!(dns_stats.snapshot());
                            dns["hosts_file"] = json!(opts.hosts_file);
                            obj.insert("dns".into(), dns);
                            let using: Vec<_> = crate::exits::active(&opts.use_exits, &opts.state.load_peers())
                                .into_iter()
                                .map(|(u, key)| json!({"prefix": u.prefix, "node": u.node, "active": key.is_some()}))
                                .collect();
                            obj.insert("exits".into(), json!({"offered": opts.advertise_exits, "using": using}));
                        }
                        api::write_response(&mut stream, &reply).await;
                    }
                    Some(Request::Leave { force }) => {
                        let (tx, rx) = oneshot::channel();
                        let told = async {
                            if control_tx.send(ControlCmd::Leave(tx)).await.is_err() {
                                return Err("the control connection is not running".to_owned());
                            }
                            rx.await.unwrap_or_else(|_| Err("control loop stopped".into()))
                        };
                        // Forced: the controller gets a few seconds, then the node leaves anyway.
                        let told = if force {
                            tokio::time::timeout(FORCED_LEAVE_WAIT, told)
                                .await
                                .unwrap_or_else(|_| Err(format!("no answer within {}", humantime::format_duration(FORCED_LEAVE_WAIT))))
                        } else {
                            told.await
                        };
                        match told {
                            Ok(()) => {
                                api::write_response(&mut stream, &json!({"ok": true, "network": membership.network, "controller_told": true})).await;
                                break Exit::Left;
                            }
                            Err(e) if force => {
                                warn!(error = %e, "the controller was not told that this node leaves; leaving anyway (--force)");
                                api::write_response(&mut stream, &json!({"ok": true, "network": membership.network, "name": membership.name, "controller_told": false, "reason": e})).await;
                                break Exit::Left;
                            }
                            Err(e) => api::write_response(&mut stream, &json!({"error": format!("could not leave: the controller was not told ({e}); retry when it answers, or leave anyway with `mesh leave --force` (the controller then still lists the node until `mesh-controller node remove {} {}`)", membership.network, membership.name)})).await,
                        }
                    }
                    Some(Request::Down) => {
                        api::write_response(&mut stream, &json!({"ok": true, "network": membership.network, "interface": opts.interface})).await;
                        break Exit::Down;
                    }
                    Some(Request::Routes { advertise, withdraw }) => {
                        // A copy: the watch's read guard must be gone before the send below.
                        let current = advertised_tx.borrow().clone();
                        let v = match change_routes(&current, &advertise, &withdraw) {
                            Ok(list) => {
                                membership.advertise_routes = list.clone();
                                match opts.state.save_membership(&membership) {
                                    Ok(()) => {
                                        info!(routes = ?list, "advertised routes changed");
                                        advertised_tx.send_replace(list.clone());
                                        json!({"ok": true, "advertised": list})
                                    }
                                    Err(e) => json!({"error": format!("cannot save the advertised routes: {e:#}")}),
                                }
                            }
                            Err(e) => json!({"error": e}),
                        };
                        api::write_response(&mut stream, &v).await;
                    }
                    Some(Request::Ping { peer }) => {
                        let v = ping(&running.data_tx, &peer).await;
                        api::write_response(&mut stream, &v).await;
                    }
                    None => api::write_response(&mut stream, &json!({"error": "malformed request"})).await,
                }
            }
        }
    };
    info!("stopping");
    names_task.abort();
    exits_task.abort();
    if !opts.use_exits.is_empty() {
        // Nothing may be routed into an interface nobody serves.
        if let Err(e) = mesh_sys::exits::remove().await {
            warn!(error = %e, "cannot remove the exit routes");
        }
    }
    route_task.abort();
    routes_task.abort();
    if let Some(t) = auto_task {
        t.abort();
    }
    overlay_task.abort();
    if let Err(e) = mesh_sys::bypass::remove().await {
        warn!(error = %e, "cannot remove the policy rule for mesh's own packets");
    }
    relay_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = running.shutdown_tx.send(true);
    if !control_done {
        let _ = tokio::time::timeout(Duration::from_secs(3), control_task).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), running.data_task).await;
    if let Some(t) = portmap_task {
        // It removes the router's mapping (bounded by its own timeout) before it ends.
        let _ =
            tokio::time::timeout(crate::portmap::REMOVE_TIMEOUT + Duration::from_secs(1), t).await;
    }
    running.endpoint.close(0u32.into(), b"agent stopping");
    let _ = std::fs::remove_file(opts.state.socket_path());
    let _ = std::fs::remove_file(opts.state.read_only_socket_path());
    if matches!(exit, Exit::Signal) {
        return Ok(());
    }
    // Every other way out takes the interface, its address and its routes away.
    drop(running.tun);
    if let Err(e) = mesh_sys::netlink::delete_link(&opts.interface).await {
        warn!(error = %e, "cannot delete {}", opts.interface);
    }
    let _ = mesh_sys::firewall::remove(&opts.interface);
    if opts.hosts_file {
        crate::names::remove_hosts_block(&membership.network);
    }
    match exit {
        Exit::Signal => Ok(()),
        Exit::Left => {
            opts.state.wipe()?;
            info!("left the network; local state deleted");
            Ok(())
        }
        Exit::Down => {
            info!(interface = %opts.interface, "down: {} removed, state kept; `mesh up` resumes", opts.interface);
            Ok(())
        }
        Exit::Removed(message) => {
            let removed = crate::state::Removed {
                network: membership.network.clone(),
                address: membership.address,
                message: message.clone(),
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            if let Err(e) = opts.state.save_removed(&removed) {
                warn!(error = %format!("{e:#}"), "cannot record the removal");
            }
            Err(fatal(anyhow::anyhow!(
                "the controller says this node is no longer a member of network {} ({message}); {} and its address {} were removed, because the controller may give that address to another node. Join again with a new token (`mesh join --token-file FILE`)",
                membership.network,
                opts.interface,
                membership.address
            )))
        }
    }
}

/// The advertised list after `mesh routes advertise|withdraw`, or what is wrong with the
/// request.
fn change_routes(
    current: &[ipnet::IpNet],
    advertise: &[String],
    withdraw: &[String],
) -> Result<Vec<ipnet::IpNet>, String> {
    let parse = |t: &String| -> Result<ipnet::IpNet, String> {
        let net: ipnet::IpNet = t.trim().parse().map_err(|_| {
            format!("{t:?} is not an IP prefix (expected e.g. 10.244.1.0/24 or fd00:10:244:1::/64)")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{t} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(net)
    };
    let mut list = current.to_vec();
    for t in withdraw {
        let net = parse(t)?;
        if !list.contains(&net) {
            return Err(format!("{net} is not advertised (see `mesh routes list`)"));
        }
        list.retain(|n| *n != net);
    }
    for t in advertise {
        let net = parse(t)?;
        if !list.contains(&net) {
            list.push(net);
        }
    }
    if list.len() > mesh_proto::control::MAX_ROUTES {
        return Err(format!(
            "a node advertises at most {} prefixes",
            mesh_proto::control::MAX_ROUTES
        ));
    }
    Ok(list)
}

/// `mesh status`'s `routes`: what this node advertises and where each stands, and what its
/// peers route.
fn routes_json(
    advertised: &[ipnet::IpNet],
    states: &[mesh_proto::control::RouteState],
    peers: &[mesh_proto::control::PeerInfo],
) -> serde_json::Value {
    let advertised: Vec<serde_json::Value> = advertised
        .iter()
        .map(|p| {
            let s = states.iter().find(|s| s.prefix == *p);
            json!({
                "prefix": p.to_string(),
                "state": s.map_or("unknown".to_owned(), |s| {
                    serde_json::to_value(s.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                }),
                "reason": s.and_then(|s| s.reason.clone()),
            })
        })
        .collect();
    let via: Vec<serde_json::Value> = peers
        .iter()
        .flat_map(|p| {
            p.routes
                .iter()
                .map(move |r| json!({"prefix": r.to_string(), "peer": p.name}))
        })
        .collect();
    json!({"advertised": advertised, "peers": via})
}

/// The approved prefixes among `states`.
fn approved(states: &[mesh_proto::control::RouteState]) -> Vec<ipnet::IpNet> {
    states
        .iter()
        .filter(|s| s.state == mesh_proto::control::RouteStatus::Approved)
        .map(|s| s.prefix)
        .collect()
}

/// The approved prefixes of this node: those of its site, and those it offers as an exit.
fn split_exits(
    states: &[mesh_proto::control::RouteState],
) -> (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>) {
    let approved = states
        .iter()
        .filter(|s| s.state == mesh_proto::control::RouteStatus::Approved);
    let (exits, routed): (Vec<_>, Vec<_>) = approved.partition(|s| s.exit);
    (
        routed.iter().map(|s| s.prefix).collect(),
        exits.iter().map(|s| s.prefix).collect(),
    )
}

/// Whether the kernel forwards IPv4 (what an exit needs).
fn ip_forward_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}

/// Whether the kernel forwards IPv6 (what an IPv6 exit needs).
fn ip6_forward_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "1")
}

/// Keeps the kernel's routes through the overlay interface equal to the prefixes the peers
/// route (added with the node's overlay address of their family as source, removed when
/// withdrawn), and the node's own approved prefixes in the data plane and the forwarding guard
/// (`own`: their states, and the prefixes already put there at start, from the cache).
/// `overlay`: the overlay ranges (IPv4, and IPv6 when the network has one), never routed so.
async fn sync_routes(
    interface: String,
    source: (Ipv4Addr, Option<std::net::Ipv6Addr>),
    overlay: Vec<ipnet::IpNet>,
    mut peer_routes: watch::Receiver<Vec<ipnet::IpNet>>,
    own: (
        watch::Receiver<Vec<mesh_proto::control::RouteState>>,
        Vec<ipnet::IpNet>,
    ),
    data: mpsc::Sender<DataCmd>,
) {
    let (mut own, applied) = own;
    // What an earlier run installed (mesh0 outlives agent restarts) counts as installed.
    let mut installed: std::collections::BTreeSet<ipnet::IpNet> =
        match mesh_sys::netlink::routes_via(&interface, &overlay).await {
            Ok(r) => r.into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot list the routes through {interface}");
                Default::default()
            }
        };
    let mut own_applied = applied;
    let mine = |r: &ipnet::IpNet| {
        r.contains(&IpAddr::V4(source.0)) || source.1.is_some_and(|a| r.contains(&IpAddr::V6(a)))
    };
    let source_of = |r: &ipnet::IpNet| match r {
        ipnet::IpNet::V4(_) => Some(IpAddr::V4(source.0)),
        ipnet::IpNet::V6(_) => source.1.map(IpAddr::V6),
    };
    loop {
        let wanted: std::collections::BTreeSet<ipnet::IpNet> = peer_routes
            .borrow_and_update()
            .iter()
            .copied()
            .filter(|r| !mine(r) && !overlay.contains(r))
            .collect();
        for gone in installed.difference(&wanted).copied().collect::<Vec<_>>() {
            match mesh_sys::netlink::set_route(&interface, gone, source_of(&gone), false).await {
                Ok(()) => {
                    info!(prefix = %gone, "subnet route removed");
                    installed.remove(&gone);
                }
                Err(e) => warn!(prefix = %gone, error = %e, "cannot remove a subnet route"),
            }
        }
        for new in wanted.difference(&installed).copied().collect::<Vec<_>>() {
            match mesh_sys::netlink::set_route(&interface, new, source_of(&new), true).await {
                Ok(()) => {
                    info!(prefix = %new, "subnet route added through {interface}");
                    installed.insert(new);
                }
                Err(e) => warn!(prefix = %new, error = %e, "cannot add a subnet route"),
            }
        }
        let states = own.borrow_and_update().clone();
        let mine = approved(&states);
        if own_applied != mine {
            let (routed, exits) = split_exits(&states);
            if let Err(e) = mesh_sys::firewall::clamp_mss(&interface, &routed, &exits) {
                warn!(error = %e, "cannot let the approved prefixes through the forwarding guard");
            }
            if exits.iter().any(|e| e.addr().is_ipv4()) && !ip_forward_on() {
                warn!(exits = ?exits, "this node is an approved exit but IPv4 forwarding is off, so peers' packets go nowhere: sysctl -w net.ipv4.ip_forward=1");
            }
            if exits.iter().any(|e| e.addr().is_ipv6()) && !ip6_forward_on() {
                warn!(exits = ?exits, "this node is an approved IPv6 exit but IPv6 forwarding is off, so peers' IPv6 packets go nowhere: sysctl -w net.ipv6.conf.all.forwarding=1");
            }
            if !mine.is_empty() {
                info!(prefixes = ?mine, "routing the approved prefixes for the peers");
            }
            let _ = data.send(DataCmd::SetRoutes(mine.clone())).await;
            own_applied = mine;
        }
        tokio::select! {
            r = peer_routes.changed() => if r.is_err() { return },
            r = own.changed() => if r.is_err() { return },
        }
    }
}

/// How long a forced `mesh leave` waits for the controller's confirmation.
const FORCED_LEAVE_WAIT: Duration = Duration::from_secs(5);

/// The network's overlay ranges: IPv4, and IPv6 when the network has one.
fn overlay_ranges(m: &Membership) -> Vec<ipnet::IpNet> {
    std::iter::once(ipnet::IpNet::V4(overlay_range(m)))
        .chain(m.prefix6.map(|p| ipnet::IpNet::V6(p.trunc())))
        .collect()
}

/// The network's IPv4 overlay range, from the node's address and prefix.
fn overlay_range(m: &Membership) -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(m.address, m.prefix_len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::Ipv4Net::from(m.address))
}

/// How often the agent looks again at which destinations the overlay reaches.
const OVERLAY_VIEW_INTERVAL: Duration = Duration::from_secs(2);

/// Tells the data plane which destinations the overlay itself reaches, at start and whenever
/// that changes (a CNI adds its vxlan device or pod routes after mesh is up). Also keeps
/// `mesh status` and the log told which interfaces' addresses the endpoint interface list
/// (`endpoints`: the list and where to show the result) leaves out.
async fn watch_overlay(
    interface: String,
    overlay: ipnet::Ipv4Net,
    port: UdpPort,
    data: mpsc::Sender<DataCmd>,
    status: Arc<Mutex<OverlayStatus>>,
    endpoints: (EndpointInterfaces, Arc<Mutex<EndpointInterfacesStatus>>),
) {
    let (list, endpoint_status) = endpoints;
    let mut last: Option<mesh_sys::netlink::OverlayView> = None;
    loop {
        match mesh_sys::netlink::overlay_view(&interface, Some(overlay)).await {
            Ok(view) if last.as_ref() != Some(&view) => {
                if !view.stacked.is_empty()
                    && last.as_ref().is_none_or(|l| l.stacked != view.stacked)
                {
                    info!(interfaces = ?view.stacked, "interfaces stacked on {interface}: never used as endpoints");
                }
                if let Ok(mut s) = status.lock() {
                    s.stacked = view.stacked.clone();
                    s.excluded = view.excluded.iter().map(|n| n.to_string()).collect();
                }
                let skipped = candidates::skipped(&view.candidates, &list);
                let before = last
                    .as_ref()
                    .map(|l| candidates::skipped(&l.candidates, &list));
                if !skipped.is_empty() && before.as_ref() != Some(&skipped) {
                    let summary: Vec<String> = skipped
                        .iter()
                        .map(|s| {
                            let n = s.addresses;
                            let plural = if n == 1 { "" } else { "es" };
                            format!("{} ({n} address{plural}; {})", s.interface, s.reason)
                        })
                        .collect();
                    info!(interfaces = %summary.join(", "), "addresses not offered to peers as endpoints");
                }
                let offered_addresses = candidates::offered(&view.candidates, &list);
                if let Ok(mut e) = endpoint_status.lock() {
                    let mut offered: Vec<String> = Vec::new();
                    e.ipv4.clear();
                    e.ipv6.clear();
                    for a in &offered_addresses {
                        if !offered.contains(&a.interface) {
                            offered.push(a.interface.clone());
                        }
                        let family = if a.address.is_ipv6() {
                            &mut e.ipv6
                        } else {
                            &mut e.ipv4
                        };
                        family.push(a.address.to_string());
                    }
                    e.offered = offered;
                    e.skipped = skipped;
                }
                // Datagrams to IPv6 peers leave from an address they were told about.
                port.set_ipv6_sources(
                    offered_addresses
                        .iter()
                        .filter_map(|a| match a.address {
                            std::net::IpAddr::V6(v6) if !a.temporary => Some(v6),
                            _ => None,
                        })
                        .collect(),
                );
                if data
                    .send(DataCmd::SetExcluded(view.excluded.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
                last = Some(view);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read interfaces and routes"),
        }
        tokio::time::sleep(OVERLAY_VIEW_INTERVAL).await;
    }
}

/// Keeps a host route with the path MTU for every peer whose path carries less than the
/// interface MTU, so the kernel never hands the agent a packet the path cannot carry.
async fn apply_path_events(
    mut rx: mpsc::UnboundedReceiver<dataplane::PathEvent>,
    interface: String,
    source: Ipv4Addr,
) {
    while let Some(dataplane::PathEvent::Mtu {
        peer,
        peer6,
        mtu,
        configured,
    }) = rx.recv().await
    {
        let limit = (mtu < configured).then_some(u32::from(mtu));
        if let Some(peer6) = peer6 {
            if let Err(e) = mesh_sys::netlink::set_peer_mtu6(&interface, peer6, limit).await {
                warn!(%peer6, error = %e, "cannot set the peer's IPv6 route MTU");
            }
        }
        match mesh_sys::netlink::set_peer_mtu(&interface, peer, source, limit).await {
            Ok(()) if limit.is_some() => {
                warn!(%peer, mtu, configured, "path MTU below the interface MTU: route to the peer limited")
            }
            Ok(()) => debug!(%peer, mtu, "path carries the full MTU"),
            Err(e) => warn!(%peer, error = %e, "cannot set the peer's route MTU"),
        }
    }
}

/// Resolves `peer` (name, overlay address or key) and pings it inside the tunnel.
async fn ping(data: &mpsc::Sender<DataCmd>, peer: &str) -> serde_json::Value {
    let (tx, rx) = oneshot::channel();
    let _ = data.send(DataCmd::Status(tx)).await;
    let Ok(status) = rx.await else {
        return json!({"error": "the data plane is not running"});
    };
    let Some(p) = status
        .peers
        .iter()
        .find(|p| p.name == peer || p.address.to_string() == peer || p.key.to_string() == peer)
    else {
        return json!({"error": format!("no peer {peer:?} (see `mesh status`)")});
    };
    let (tx, rx) = oneshot::channel();
    let _ = data.send(DataCmd::Ping(p.key, tx)).await;
    match rx.await {
        Ok(Ok((path, rtt))) => json!({
            "peer": p.name,
            "address": p.address.to_string(),
            "path": path.to_string(),
            "endpoint": match path { mesh_core::Path::Direct(e) => Some(e.to_string()), _ => None },
            "relay": matches!(path, mesh_core::Path::Relay).then(|| status.relay_of.get(&p.key)).flatten(),
            "rtt_ms": rtt.as_secs_f64() * 1000.0,
        }),
        Ok(Err(e)) => json!({"error": format!("ping {}: {e}", p.name)}),
        Err(_) => json!({"error": "the data plane stopped"}),
    }
}

/// What the addresses that the controller and the relays observe for this node's one socket
/// say about its NAT: one mapping for every destination, or one per destination (a
/// "symmetric" NAT, which only the hard-NAT hole punching can cross).
/// How the node's NAT maps its socket: `endpoint-independent` (or no NAT), `endpoint-dependent`,
/// or `unknown` (the controller's STUN observer did not answer, and no standalone relay saw the
/// node): from the NAT kind found at the last connection, else from the observations.
fn mapping_kind(kind: Option<NatKind>, observed: &[std::net::SocketAddr]) -> &'static str {
    match (kind, observed) {
        (Some(NatKind::Public | NatKind::EndpointIndependent), _) => "endpoint-independent",
        (Some(NatKind::EndpointDependent), _) => "endpoint-dependent",
        (None, [] | [_]) => "unknown",
        (None, [first, rest @ ..]) if rest.iter().all(|a| a == first) => "endpoint-independent",
        (None, _) => "endpoint-dependent",
    }
}

/// A peer heard from within this long is online (keepalives come every 25 s at most, and a
/// handshake takes up to REKEY_TIMEOUT more).
const PEER_ONLINE_WINDOW: Duration = Duration::from_secs(45);

fn secs(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_secs())
}

/// The `counters` of `mesh status --json`: every node and driver counter under its field name.
pub(crate) fn counters_json(
    node: &Counters,
    driver: &DriverCounters,
    birthday: &mesh_core::BirthdayStats,
) -> serde_json::Value {
    node.entries()
        .iter()
        .chain(driver.entries().iter())
        .chain(birthday.entries().iter())
        .map(|e| (e.name.to_owned(), json!(e.value)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Loss (0 to 1) and RTT of one path, where measured.
#[derive(serde::Serialize)]
struct QualityJson {
    loss: Option<f64>,
    rtt_ms: Option<f64>,
}

impl From<&mesh_core::io::PathQuality> for QualityJson {
    fn from(q: &mesh_core::io::PathQuality) -> Self {
        QualityJson {
            loss: q.loss,
            rtt_ms: q.rtt.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}

#[derive(serde::Serialize)]
struct PathsQualityJson {
    direct: QualityJson,
    relay: QualityJson,
}

/// One peer in `mesh status --json`. A struct, not a `json!` tree: with a thousand peers the
/// trees of one status call held about 8 MB at once (the process kept that memory after).
#[derive(serde::Serialize)]
struct PeerJson<'a> {
    name: &'a str,
    key: String,
    address: std::net::Ipv4Addr,
    address6: Option<std::net::Ipv6Addr>,
    endpoint: Option<std::net::SocketAddr>,
    candidates: &'a [std::net::SocketAddr],
    last_handshake_secs_ago: Option<u64>,
    last_rx_secs_ago: Option<u64>,
    /// Heard from lately (every peer sends a keepalive at least every 25 s).
    online: bool,
    /// No session yet, and none until a packet goes to or comes from the peer: a network
    /// larger than `mesh_core::PROACTIVE_PEERS` shakes hands with the rest on demand.
    on_demand: bool,
    rtt_ms: Option<f64>,
    path: String,
    /// The underlay family of the direct path ("ipv4", "ipv6"); null off it.
    family: Option<&'static str>,
    relay: Option<&'a String>,
    path_mtu: Option<u16>,
    /// Loss (0 to 1) and RTT of each path where measured (while data flows).
    quality: PathsQualityJson,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl<'a> PeerJson<'a> {
    fn new(
        p: &'a mesh_core::PeerStatus,
        relay_of: &'a std::collections::HashMap<PublicKey, String>,
    ) -> Self {
        PeerJson {
            name: &p.name,
            key: p.key.to_string(),
            address: p.address,
            address6: p.address6,
            endpoint: p.endpoint,
            candidates: &p.candidates,
            last_handshake_secs_ago: secs(p.since_handshake),
            last_rx_secs_ago: secs(p.since_last_rx),
            online: p.since_last_rx.is_some_and(|d| d <= PEER_ONLINE_WINDOW),
            on_demand: p.on_demand,
            rtt_ms: p.rtt.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
            path: p.path.to_string(),
            family: match p.path {
                mesh_core::Path::Direct(e) if e.is_ipv6() => Some("ipv6"),
                mesh_core::Path::Direct(_) => Some("ipv4"),
                _ => None,
            },
            relay: relay_of.get(&p.key),
            path_mtu: p.path_mtu,
            quality: PathsQualityJson {
                direct: (&p.direct_quality).into(),
                relay: (&p.relay_quality).into(),
            },
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        }
    }
}

/// `mesh status --json` of a running node: the peers apart from the rest, so that they are
/// written straight from the data plane's status (see [`PeerJson`]).
#[derive(serde::Serialize)]
struct StatusReply {
    #[serde(flatten)]
    rest: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    peers: Option<PeersJson>,
}

/// The peers of a [`StatusReply`], serialised on demand.
struct PeersJson {
    peers: Vec<mesh_core::PeerStatus>,
    relay_of: std::collections::HashMap<PublicKey, String>,
}

impl serde::Serialize for PeersJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.peers.iter().map(|p| PeerJson::new(p, &self.relay_of)))
    }
}

async fn status_json(
    node: &serde_json::Value,
    control: &Arc<Mutex<ControlStatus>>,
    relays: &crate::relays::RelayShared,
    data: &mpsc::Sender<DataCmd>,
) -> StatusReply {
    let (tx, rx) = oneshot::channel();
    let _ = data.send(DataCmd::Status(tx)).await;
    let Ok(DataStatus {
        peers,
        node: c,
        driver,
        birthday,
        relay_of,
    }) = rx.await
    else {
        return StatusReply {
            rest: json!({"error": "the data plane is not running"}),
            peers: None,
        };
    };
    let control = control.lock().map(|c| c.clone()).unwrap_or_default();
    let observed: Vec<std::net::SocketAddr> = control
        .observed
        .into_iter()
        .chain(control.observer_saw)
        .chain(relays.observed())
        .collect();
    let relays: Vec<crate::relays::RelayStatus> = relays
        .status
        .lock()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    let rest = json!({
        "state": "online",
        "version": env!("CARGO_PKG_VERSION"),
        "node": node,
        "controller": control,
        "relays": relays,
        "nat": {
            "observed": observed.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            // One of three fixed values, for scripts.
            "mapping": mapping_kind(control.nat, &observed),
            "kind": control.nat,
            "birthday_budget": control.birthday_budget.unwrap_or(mesh_core::birthday::ATTEMPT_BUDGET),
        },
        "counters": counters_json(&c, &driver, &birthday),
    });
    StatusReply {
        rest,
        peers: Some(PeersJson { peers, relay_of }),
    }
}

/// What `mesh leave` without a running daemon did.
pub struct LeftOffline {
    /// The network left.
    pub network: String,
    /// The node's name there.
    pub name: String,
    /// Why the controller was not told, when it was not (`--force`).
    pub not_told: Option<String>,
    /// The node only asked to join and was waiting for approval.
    pub pending: bool,
}

/// `mesh leave` without a running daemon: tell the controller directly, then delete the
/// interface and the state.
pub async fn leave_offline(state: &StateDir, force: bool) -> anyhow::Result<LeftOffline> {
    if let (Err(_), Some(r)) = (state.load_membership(), state.load_request()?) {
        // Only asked, never admitted: nothing to take down but the local state.
        let _lock = state.lock()?;
        state.wipe()?;
        return Ok(LeftOffline {
            network: r.settings.network,
            name: r.name,
            not_told: None,
            pending: true,
        });
    }
    let m = state.load_membership()?;
    // A daemon that started meanwhile (or one the socket did not answer for) keeps its state.
    let _lock = state.lock()?;
    let key = state
        .load_key()?
        .context("the node key is missing; nothing to tell the controller")?;
    let result: anyhow::Result<()> = async {
        let endpoint = quic::bind_client((Ipv4Addr::UNSPECIFIED, 0).into())?;
        let dialer = Dialer {
            endpoint: endpoint.clone(),
            mark: None,
            proxy: ProxyEnv::from_env(),
            interface: m.interface.clone(),
            overlay: Some(overlay_range(&m)),
            tcp_first: Arc::new(std::sync::atomic::AtomicBool::new(state.load_tcp_only())),
            lossy: Default::default(),
        };
        let target = Target::new(
            &m.controller,
            m.controller_tcp.as_deref(),
            "mesh-controller",
        );
        let hello = ClientMsg::Hello {
            network: m.network.clone(),
            endpoints: vec![],
            home_relay: None,
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        };
        let (session, _) = control::open(
            &dialer,
            &target,
            &m.controller_key,
            &key,
            &hello,
            Duration::from_secs(if force { 5 } else { 10 }),
        )
        .await?;
        session.leave().await?;
        endpoint.wait_idle().await;
        Ok(())
    }
    .await;
    let not_told = match result {
        Ok(()) => None,
        // Removed on the controller already: nothing left to tell it.
        Err(e)
            if matches!(
                e.downcast_ref::<control::ControlError>(),
                Some(control::ControlError::Refused {
                    code: mesh_proto::control::ErrorCode::NodeUnknown,
                    ..
                })
            ) =>
        {
            None
        }
        Err(e) if force => Some(format!("{e:#}")),
        Err(e) => {
            return Err(e.context(format!(
                "the controller was not told, so the node is still listed there; retry when it answers, or leave anyway with `mesh leave --force` (then remove the node on the controller: `mesh-controller node remove {} {}`)",
                m.network, m.name
            )))
        }
    };
    // What a stopped daemon left on the host: the persistent interface, mesh's nftables table,
    // the policy rules and the names in the hosts file.
    if m.hosts_file {
        crate::names::remove_hosts_block(&m.network);
    }
    if let Err(e) = mesh_sys::netlink::delete_link(&m.interface).await {
        warn!(error = %e, "cannot delete {}", m.interface);
    }
    let _ = mesh_sys::firewall::remove(&m.interface);
    let _ = mesh_sys::bypass::remove().await;
    state.wipe()?;
    Ok(LeftOffline {
        network: m.network,
        name: m.name,
        not_told,
        pending: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_routes_change_by_prefix_and_say_what_is_wrong() {
        let pods: ipnet::IpNet = "10.244.1.0/24".parse().unwrap();
        let list = change_routes(&[], &["10.244.1.0/24".into()], &[]).unwrap();
        assert_eq!(list, vec![pods]);
        // Advertising again changes nothing; withdrawing removes it.
        assert_eq!(
            change_routes(&list, &["10.244.1.0/24".into()], &[]).unwrap(),
            list
        );
        assert!(change_routes(&list, &[], &["10.244.1.0/24".into()])
            .unwrap()
            .is_empty());
        let e = change_routes(&list, &["10.244.1.5/24".into()], &[]).unwrap_err();
        assert!(e.contains("did you mean 10.244.1.0/24"), "{e}");
        let e = change_routes(&list, &["pods".into()], &[]).unwrap_err();
        assert!(e.contains("not an IP prefix"), "{e}");
        let e = change_routes(&list, &[], &["10.9.0.0/16".into()]).unwrap_err();
        assert!(e.contains("not advertised"), "{e}");
    }

    fn options(list: Option<&str>) -> Options {
        Options {
            state: StateDir::new(std::path::Path::new("/nonexistent/mesh")),
            port: None,
            mtu: None,
            interface: None,
            metrics_listen: None,
            endpoint_interfaces: list.map(|l| l.parse().unwrap()),
            port_mapping: None,
            advertise_routes: None,
            dns: None,
            hosts_file: None,
            advertise_exits: None,
            use_exits: None,
            advertise_auto: None,
            pod_cidr_sources: (None, None),
        }
    }

    /// Port mapping: flag or config file, else what the node saved, else on.
    #[test]
    fn port_mapping_is_on_unless_turned_off_and_stays_as_saved() {
        let settle = |flag: Option<bool>, saved_off: Option<bool>| {
            let saved = saved_off.map(|off| Membership {
                port_mapping: !off,
                ..crate::state::sample_membership()
            });
            Options {
                port_mapping: flag,
                ..options(None)
            }
            .settle(saved.as_ref())
            .unwrap()
            .port_mapping
        };
        assert!(settle(None, None), "on by default");
        assert!(settle(None, Some(false)));
        assert!(
            !settle(None, Some(true)),
            "a saved --no-port-mapping is kept"
        );
        assert!(!settle(Some(false), None));
        assert!(settle(Some(true), Some(true)), "--port-mapping undoes it");
        assert!(!settle(Some(false), Some(false)));
    }

    /// `auto`: on by flag or as saved; the prefix found last stays advertised beside new
    /// explicit prefixes; the source paths are kept as saved unless given.
    #[test]
    fn auto_routes_keep_the_found_prefix_and_the_sources() {
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let saved = Membership {
            advertise_routes: vec![net("10.244.1.0/24")],
            auto_routes: Some(crate::podcidr::AutoRoutes {
                found: Some("10.244.1.0/24".parse().unwrap()),
                cni_conf_dir: Some("/srv/cni".into()),
                flannel_subnet_env: None,
            }),
            ..crate::state::sample_membership()
        };
        let settle = |auto: Option<bool>, list: Option<Vec<ipnet::IpNet>>| {
            Options {
                advertise_auto: auto,
                advertise_routes: list,
                ..options(None)
            }
            .settle(Some(&saved))
            .unwrap()
        };
        let s = settle(None, None);
        assert_eq!(s.advertise_routes, vec![net("10.244.1.0/24")]);
        let sources = s.auto_routes.unwrap().sources();
        assert_eq!(sources.cni_conf_dir, std::path::Path::new("/srv/cni"));
        assert_eq!(
            sources.flannel_subnet_env,
            std::path::Path::new(crate::podcidr::DEFAULT_FLANNEL_SUBNET_ENV)
        );
        let s = settle(Some(true), Some(vec![net("192.168.7.0/24")]));
        assert_eq!(
            s.advertise_routes,
            vec![net("192.168.7.0/24"), net("10.244.1.0/24")]
        );
        let s = settle(Some(false), Some(vec![net("192.168.7.0/24")]));
        assert_eq!(s.advertise_routes, vec![net("192.168.7.0/24")]);
        assert_eq!(s.auto_routes, None);
    }

    fn saved(list: Option<&str>) -> Membership {
        Membership {
            endpoint_interfaces: list.map(str::to_owned),
            ..crate::state::sample_membership()
        }
    }

    /// The endpoint interface list: flag or config file, else what the node saved, else the
    /// defaults; and what is saved back.
    #[test]
    fn the_endpoint_interface_list_is_kept_across_runs() {
        let settle = |flag, saved: Option<Membership>| {
            let s = options(flag).settle(saved.as_ref()).unwrap();
            (s.endpoint_interfaces.to_string(), Options::saved_list(&s))
        };
        assert_eq!(settle(None, None), (String::new(), None));
        assert_eq!(
            settle(Some("!eth1"), None),
            ("!eth1".into(), Some("!eth1".into()))
        );
        assert_eq!(
            settle(None, Some(saved(Some("!eth1")))),
            ("!eth1".into(), Some("!eth1".into()))
        );
        assert_eq!(
            settle(Some("eth0"), Some(saved(Some("!eth1")))),
            ("eth0".into(), Some("eth0".into()))
        );
        // An empty list given goes back to the defaults, and nothing is saved.
        assert_eq!(
            settle(Some(""), Some(saved(Some("!eth1")))),
            (String::new(), None)
        );
        // A damaged saved list is an error that says where it is and what to do.
        let err = options(None)
            .settle(Some(&saved(Some("eth[0]"))))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("/nonexistent/mesh") && text.contains("--endpoint-interfaces"),
            "{text}"
        );
    }
}
