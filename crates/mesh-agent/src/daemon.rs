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
use mesh_proto::control::ClientMsg;
use mesh_proto::token::JoinToken;
use mesh_proto::PublicKey;
use mesh_sys::netlink::InterfaceConfig;
use mesh_sys::socket::UdpPort;
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
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
    let tun = mesh_sys::tun::create(&opts.interface)?;
    let bind: SocketAddr = (Ipv4Addr::UNSPECIFIED, opts.port).into();
    let port = UdpPort::bind(bind).with_context(|| {
        format!(
            "cannot bind UDP port {} (is another mesh agent running? choose another with --port)",
            opts.port
        )
    })?;
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

async fn configure_interface(opts: &Settings, m: &Membership) -> anyhow::Result<()> {
    mesh_sys::netlink::configure(&InterfaceConfig {
        name: opts.interface.clone(),
        address: m.address,
        prefix_len: m.prefix_len,
        mtu: opts.mtu,
    })
    .await
    .with_context(|| format!("cannot configure {}", opts.interface))
}

/// `mesh join`: joins with a token, saves the membership, closes the connection and returns
/// the membership. The caller then starts the daemon as `mesh up` (a process of its own that
/// never held the token), or stops there (`--no-daemon`).
pub async fn join(
    opts: Options,
    token: JoinToken,
    name: String,
    connect_timeout: Duration,
) -> anyhow::Result<Membership> {
    opts.state.create()?;
    // Joining again keeps the saved port and interface unless flags say otherwise.
    let saved = opts.state.load_membership().ok();
    let opts = opts.settle(saved.as_ref())?;
    let node_key = opts.state.load_or_create_key()?;
    let running = start(&opts, &node_key, Ipv4Addr::UNSPECIFIED, None)?;
    let port = running.port.local_addr()?.port();
    let first = ClientMsg::Join {
        token_id: token.id.clone(),
        token_secret: token.secret_hex(),
        name,
        endpoints: candidates::report(
            &control::local_addresses(&opts.interface, None).await,
            &opts.endpoint_interfaces,
            port,
            candidates::Mappings::default(),
        ),
        exact_name: false,
    };
    tracing::debug!(controller = %token.controller, "joining");
    let target = Target::new(
        &token.controller,
        token.controller_tcp.as_deref(),
        "mesh-controller",
    );
    let (session, welcome) = match control::open(
        &running.dialer,
        &target,
        &token.controller_key,
        &node_key,
        &first,
        connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = running.shutdown_tx.send(true);
            return Err(match e {
                control::ControlError::Refused { message, .. } => {
                    anyhow::anyhow!("join refused: {message}")
                }
                e => e.into(),
            });
        }
    };
    let membership = Membership {
        controller: token.controller.clone(),
        controller_tcp: token.controller_tcp.clone(),
        controller_key: token.controller_key,
        network: welcome.network.clone(),
        name: welcome.name.clone(),
        address: welcome.address,
        prefix_len: welcome.prefix_len,
        mtu: opts.mtu,
        port,
        interface: opts.interface.clone(),
        endpoint_interfaces: Options::saved_list(&opts),
        port_mapping: opts.port_mapping,
    };
    opts.state.save_membership(&membership)?;
    // `mesh up`, next, goes straight to TCP where QUIC did not get through.
    opts.state
        .save_tcp_only(session.transport() == mesh_control::Transport::Tcp)?;
    opts.state.save_peers(&welcome.peers)?;
    opts.state.save_relays(&welcome.relays)?;
    let _ = running
        .data_tx
        .send(DataCmd::SetAddress(membership.address))
        .await;
    info!(network = %membership.network, name = %membership.name, address = %membership.address, "joined");
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

/// `mesh up`: runs the daemon from saved state; works while the controller is down.
pub async fn up(opts: Options) -> anyhow::Result<()> {
    let mut membership = opts.state.load_membership()?;
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
    ) != (
        opts.port,
        opts.mtu,
        &opts.interface,
        &list,
        opts.port_mapping,
    ) {
        membership.port = opts.port;
        membership.mtu = opts.mtu;
        membership.interface = opts.interface.clone();
        membership.endpoint_interfaces = list;
        membership.port_mapping = opts.port_mapping;
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
    let _ = running.data_tx.send(DataCmd::SetPeers(cached)).await;
    run(opts, membership, node_key, running).await
}

async fn run(
    opts: Settings,
    membership: Membership,
    node_key: [u8; 32],
    running: Running,
) -> anyhow::Result<()> {
    configure_interface(&opts, &membership).await?;
    match mesh_sys::firewall::clamp_mss(&opts.interface) {
        Ok(()) => debug!(interface = %opts.interface, "TCP MSS clamped to the route MTU"),
        Err(e) => warn!(error = %e, "no MSS clamping"),
    }
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
    let listener = api::bind(&opts.state.socket_path())?;
    let status = Arc::new(Mutex::new(ControlStatus {
        address: membership.controller.clone(),
        connected: false,
        transport: None,
        last_error: None,
        observed: None,
        observer_saw: None,
        nat: None,
        birthday_budget: None,
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
    let ctx = ControlCtx {
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
    };
    let control_task = tokio::spawn(control::run(
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
    let node_info = json!({
        "name": membership.name,
        "key": public_of(&node_key).to_string(),
        "address": membership.address.to_string(),
        "prefix_len": membership.prefix_len,
        "mtu": opts.mtu,
        "interface": opts.interface,
        "port": membership.port,
        "network": membership.network,
    });
    let mut left = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                match api::read_request(&mut stream).await {
                    Some(Request::Status) => {
                        let mut v = status_json(&node_info, &status, &relay_shared, &running.data_tx).await;
                        if let (Some(obj), Ok(o)) = (v.as_object_mut(), overlay_status.lock()) {
                            obj.insert("overlay".into(), json!(*o));
                        }
                        if let (Some(obj), Ok(e)) = (v.as_object_mut(), endpoint_status.lock()) {
                            obj.insert("endpoint_interfaces".into(), json!(*e));
                        }
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("port_mapping".into(), port_mapping.snapshot().to_json(Instant::now()));
                        }
                        api::write_response(&mut stream, &v).await;
                    }
                    Some(Request::Leave) => {
                        let (tx, rx) = oneshot::channel();
                        let _ = control_tx.send(ControlCmd::Leave(tx)).await;
                        match rx.await.unwrap_or_else(|_| Err("control loop stopped".into())) {
                            Ok(()) => {
                                api::write_response(&mut stream, &json!({"ok": true, "network": membership.network})).await;
                                left = true;
                                break;
                            }
                            Err(e) => api::write_response(&mut stream, &json!({"error": format!("could not leave: {e}")})).await,
                        }
                    }
                    Some(Request::Ping { peer }) => {
                        let v = ping(&running.data_tx, &peer).await;
                        api::write_response(&mut stream, &v).await;
                    }
                    None => api::write_response(&mut stream, &json!({"error": "malformed request"})).await,
                }
            }
        }
    }
    info!("stopping");
    route_task.abort();
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
    let _ = tokio::time::timeout(Duration::from_secs(3), control_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), running.data_task).await;
    if let Some(t) = portmap_task {
        // It removes the router's mapping (bounded by its own timeout) before it ends.
        let _ =
            tokio::time::timeout(crate::portmap::REMOVE_TIMEOUT + Duration::from_secs(1), t).await;
    }
    running.endpoint.close(0u32.into(), b"agent stopping");
    let _ = std::fs::remove_file(opts.state.socket_path());
    if left {
        drop(running.tun);
        if let Err(e) = mesh_sys::netlink::delete_link(&opts.interface).await {
            warn!(error = %e, "cannot delete {}", opts.interface);
        }
        let _ = mesh_sys::firewall::remove(&opts.interface);
        opts.state.wipe()?;
        info!("left the network; local state deleted");
    }
    Ok(())
}

/// The network's overlay range, from the node's address and prefix.
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
                if let Ok(mut e) = endpoint_status.lock() {
                    let mut offered: Vec<String> = Vec::new();
                    for a in candidates::offered(&view.candidates, &list) {
                        if !offered.contains(&a.interface) {
                            offered.push(a.interface.clone());
                        }
                    }
                    e.offered = offered;
                    e.skipped = skipped;
                }
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
        mtu,
        configured,
    }) = rx.recv().await
    {
        let limit = (mtu < configured).then_some(u32::from(mtu));
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
fn mapping_kind(observed: &[std::net::SocketAddr]) -> &'static str {
    match observed {
        [] | [_] => "unknown (the controller's STUN observer did not answer, and no standalone relay saw this node)",
        [first, rest @ ..] if rest.iter().all(|a| a == first) => "endpoint-independent",
        _ => "endpoint-dependent",
    }
}

fn secs(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| json!(d.as_secs()))
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

fn quality_json(q: &mesh_core::io::PathQuality) -> serde_json::Value {
    json!({
        "loss": q.loss,
        "rtt_ms": q.rtt.map(|d| d.as_secs_f64() * 1000.0),
    })
}

async fn status_json(
    node: &serde_json::Value,
    control: &Arc<Mutex<ControlStatus>>,
    relays: &crate::relays::RelayShared,
    data: &mpsc::Sender<DataCmd>,
) -> serde_json::Value {
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
        return json!({"error": "the data plane is not running"});
    };
    let control = control.lock().map(|c| c.clone()).unwrap_or_default();
    let peers: Vec<serde_json::Value> = peers
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "key": p.key.to_string(),
                "address": p.address.to_string(),
                "endpoint": p.endpoint.map(|e| e.to_string()),
                "candidates": p.candidates.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "last_handshake_secs_ago": secs(p.since_handshake),
                "last_rx_secs_ago": secs(p.since_last_rx),
                "rtt_ms": p.rtt.map(|d| d.as_millis() as u64),
                "path": p.path.to_string(),
                "relay": relay_of.get(&p.key),
                "path_mtu": p.path_mtu,
                // Loss (0 to 1) and RTT of each path where measured (while data flows).
                "quality": {
                    "direct": quality_json(&p.direct_quality),
                    "relay": quality_json(&p.relay_quality),
                },
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            })
        })
        .collect();
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
    json!({
        "node": node,
        "controller": control,
        "relays": relays,
        "nat": {
            "observed": observed.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "mapping": control.nat.map_or_else(|| mapping_kind(&observed).to_owned(), |k| k.to_string()),
            "kind": control.nat,
            "birthday_budget": control.birthday_budget.unwrap_or(mesh_core::birthday::ATTEMPT_BUDGET),
        },
        "peers": peers,
        "counters": counters_json(&c, &driver, &birthday),
    })
}

/// `mesh leave` without a running daemon: tell the controller directly, then delete the state.
pub async fn leave_offline(state: &StateDir, force: bool) -> anyhow::Result<String> {
    let m = state.load_membership()?;
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
        };
        let (session, _) = control::open(
            &dialer,
            &target,
            &m.controller_key,
            &key,
            &hello,
            Duration::from_secs(10),
        )
        .await?;
        session.leave().await?;
        endpoint.wait_idle().await;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {}
        Err(e) if force => warn!(error = %format!("{e:#}"), "controller not told; deleting local state anyway (--force)"),
        Err(e) => {
            return Err(e.context(
                "the controller was not told, so the node is still listed there; retry, or pass --force to delete the local state anyway",
            ))
        }
    }
    // What a stopped daemon left on the host: the persistent interface, mesh's nftables table
    // and the policy rules.
    if let Err(e) = mesh_sys::netlink::delete_link(&m.interface).await {
        warn!(error = %e, "cannot delete {}", m.interface);
    }
    let _ = mesh_sys::firewall::remove(&m.interface);
    let _ = mesh_sys::bypass::remove().await;
    state.wipe()?;
    Ok(m.network)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(list: Option<&str>) -> Options {
        Options {
            state: StateDir::new(std::path::Path::new("/nonexistent/mesh")),
            port: None,
            mtu: None,
            interface: None,
            metrics_listen: None,
            endpoint_interfaces: list.map(|l| l.parse().unwrap()),
            port_mapping: None,
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
