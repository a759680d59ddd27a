//! The agent's side of the control channel: join or hello, then peer-list updates and
//! heartbeats, reconnecting with backoff while the daemon runs.

use crate::candidates::{self, EndpointInterfaces};
use crate::dataplane::DataCmd;
use crate::dial::{Dialer, Target};
use crate::relays::RelayShared;
use crate::state::StateDir;
use mesh_control::channel::{self, ChannelError};
use mesh_control::Link;
use mesh_proto::control::{
    decode_server, ClientMsg, ErrorCode, IpNet, NatKind, PeerInfo, RelayInfo, RouteState,
    RouteStatus, ServerMsg, Welcome,
};
use mesh_proto::PublicKey;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// How often the node reports that it is alive (and its endpoints).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Why talking to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing answered.
    #[error("cannot reach the controller at {addr} (no answer within {}; {detail}); check the address in the token, that `mesh-controller serve` runs there, and that UDP to it, or TCP to {tcp}, is allowed", humantime::format_duration(*timeout))]
    Unreachable {
        /// Controller address.
        addr: String,
        /// Its TCP address.
        tcp: String,
        /// How long we waited.
        timeout: Duration,
        /// What each transport said.
        detail: String,
    },
    /// The controller could not prove the pinned key.
    #[error("the controller at {addr} did not prove the key in the token: the token is for another controller, or the controller's key changed (its state directory was replaced); ask the controller admin for a new token")]
    KeyMismatch {
        /// Controller address.
        addr: String,
    },
    /// The controller refused.
    #[error("{message}")]
    Refused {
        /// Wire code.
        code: ErrorCode,
        /// Controller's explanation.
        message: String,
    },
    /// The connection broke or the controller spoke nonsense.
    #[error("control connection to {addr} failed: {reason}")]
    Failed {
        /// Controller address.
        addr: String,
        /// What happened.
        reason: String,
    },
}

/// An open, authenticated control session.
pub struct Session {
    conn: Link,
    tx: channel::Sender,
    rx: channel::Receiver,
}

/// What `mesh status` shows about the controller.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlStatus {
    /// Controller address.
    pub address: String,
    /// Whether a control session is up.
    pub connected: bool,
    /// The transport of the session: `quic`, or `tcp` where UDP does not get through.
    pub transport: Option<String>,
    /// Last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// This node's public mapping as the controller saw it at the last connection.
    pub observed: Option<SocketAddr>,
    /// The same socket as the controller's STUN observer saw it.
    pub observer_saw: Option<SocketAddr>,
    /// How this node's NAT maps, from the two observations.
    pub nat: Option<NatKind>,
    /// The network's birthday budget (attempts per node per 10 minutes), if it sets one.
    pub birthday_budget: Option<u16>,
    /// The controller's clock minus this node's, in milliseconds, as measured at the last
    /// welcome (off by up to the one-way delay); `None` when the controller did not send its
    /// time (an older controller).
    pub clock_offset_ms: Option<i64>,
}

/// The controller's clock (`now`, ms since the Unix epoch) minus this host's, in ms.
fn clock_offset_ms(now: u64) -> i64 {
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(local)
}

/// Connects (QUIC, or TCP where QUIC does not answer: see [`crate::dial`]), authenticates
/// both sides and sends `first` (join or hello); waits for the welcome.
pub async fn open(
    dialer: &Dialer,
    target: &Target,
    controller_key: &PublicKey,
    node_key: &[u8; 32],
    first: &ClientMsg,
    timeout: Duration,
) -> Result<(Session, Welcome), ControlError> {
    let answer = ask(dialer, target, controller_key, node_key, first, timeout).await?;
    welcome_only(&target.quic, answer)
}

/// A welcome, where `Pending` cannot be the answer (a token join, a hello).
fn welcome_only(
    controller: &str,
    answer: (Session, Reply),
) -> Result<(Session, Welcome), ControlError> {
    match answer {
        (session, Reply::Welcome(w)) => Ok((session, *w)),
        (session, Reply::Pending { .. }) => {
            session.conn.close(0, b"unexpected");
            Err(ControlError::Failed {
                addr: controller.to_owned(),
                reason: "the controller answered `pending` to a request that cannot wait".into(),
            })
        }
    }
}

/// [`open`] on a link already up.
pub async fn open_on(
    conn: Link,
    controller: &str,
    controller_key: &PublicKey,
    node_key: &[u8; 32],
    first: &ClientMsg,
    timeout: Duration,
) -> Result<(Session, Welcome), ControlError> {
    let answer = first_reply(conn, controller, controller_key, node_key, first, timeout).await?;
    welcome_only(controller, answer)
}

/// The controller's first answer to a join request by network id.
#[derive(Debug)]
pub enum Reply {
    /// Admitted (approved before, or the network approves automatically).
    Welcome(Box<Welcome>),
    /// Recorded; the administrator must approve. A `Welcome` or an `Error` follows on the
    /// session (see [`Session::recv`]).
    Pending {
        /// The name the request is recorded under.
        name: String,
    },
}

/// Connects like [`open`] and sends `first` (a join request by network id), taking
/// `Pending` as an answer as well as `Welcome`.
pub async fn ask(
    dialer: &Dialer,
    target: &Target,
    controller_key: &PublicKey,
    node_key: &[u8; 32],
    first: &ClientMsg,
    timeout: Duration,
) -> Result<(Session, Reply), ControlError> {
    let started = std::time::Instant::now();
    let link = dialer
        .connect(target, timeout)
        .await
        .map_err(|e| ControlError::Unreachable {
            addr: target.quic.clone(),
            tcp: target.tcp.clone(),
            timeout,
            detail: e.to_string(),
        })?;
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(2));
    first_reply(link, &target.quic, controller_key, node_key, first, left).await
}

/// The handshake, `first`, and the controller's answer to it.
async fn first_reply(
    conn: Link,
    controller: &str,
    controller_key: &PublicKey,
    node_key: &[u8; 32],
    first: &ClientMsg,
    timeout: Duration,
) -> Result<(Session, Reply), ControlError> {
    let failed = |reason: String| ControlError::Failed {
        addr: controller.to_owned(),
        reason,
    };
    let attempt = async {
        let (mut tx, mut rx) = channel::initiate(&conn, node_key, controller_key)
            .await
            .map_err(|e| match e {
                ChannelError::KeyMismatch => ControlError::KeyMismatch {
                    addr: controller.to_owned(),
                },
                e => failed(e.to_string()),
            })?;
        tx.send(&first.encode())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let reply = rx.recv().await.map_err(|e| failed(e.to_string()))?;
        let reply = match decode_server(&reply).map_err(|e| failed(e.to_string()))? {
            ServerMsg::Welcome(welcome) => Reply::Welcome(Box::new(welcome)),
            ServerMsg::Pending { name, .. } => Reply::Pending { name },
            ServerMsg::Error { code, message } => {
                conn.close(0, b"refused");
                return Err(ControlError::Refused { code, message });
            }
            other => return Err(failed(format!("unexpected first message {other:?}"))),
        };
        let mut session = Session {
            conn: conn.clone(),
            tx,
            rx,
        };
        let reply = match reply {
            Reply::Welcome(mut w) => {
                session.rest_of_welcome(&mut w).await?;
                Reply::Welcome(w)
            }
            other => other,
        };
        Ok((session, reply))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => {
            conn.close(0, b"timed out");
            Err(failed(format!(
                "connected over {}, but no answer to the handshake within {}",
                conn.transport(),
                humantime::format_duration(timeout)
            )))
        }
    }
}

impl Session {
    /// Reads the rest of a large network's peer list into `welcome`: the `PeersChanged`
    /// messages that follow it ([`Welcome::more_peers`]), so that the welcome is whole before
    /// anything uses it (a partial list would drop the peers not yet read).
    pub async fn rest_of_welcome(&mut self, welcome: &mut Welcome) -> Result<(), ControlError> {
        while welcome.more_peers > 0 {
            let msg = self.recv().await?;
            welcome
                .take_rest(msg)
                .map_err(|reason| ControlError::Failed {
                    addr: self.conn.remote_address().to_string(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// The next message from the controller (waits as long as the connection lives).
    pub async fn recv(&mut self) -> Result<ServerMsg, ControlError> {
        let failed = |reason: String| ControlError::Failed {
            addr: self.conn.remote_address().to_string(),
            reason,
        };
        let bytes = self.rx.recv().await.map_err(|e| failed(e.to_string()))?;
        decode_server(&bytes).map_err(|e| failed(e.to_string()))
    }

    /// Closes the session at once.
    pub fn close(&self) {
        self.conn.close(0, b"done");
    }

    /// The transport the session runs on.
    pub fn transport(&self) -> mesh_control::Transport {
        self.conn.transport()
    }

    /// Asks the controller to delete this node; waits for the confirmation.
    pub async fn leave(mut self) -> Result<(), ControlError> {
        let failed = |reason: String| ControlError::Failed {
            addr: self.conn.remote_address().to_string(),
            reason,
        };
        self.tx
            .send(&ClientMsg::Leave.encode())
            .await
            .map_err(|e| failed(e.to_string()))?;
        loop {
            let bytes = self.rx.recv().await.map_err(|e| failed(e.to_string()))?;
            match decode_server(&bytes) {
                Ok(ServerMsg::Left) => {
                    self.conn.close(0, b"left");
                    return Ok(());
                }
                Ok(ServerMsg::Error { code, message }) => {
                    return Err(ControlError::Refused { code, message })
                }
                _ => continue,
            }
        }
    }
}

/// Everything the control loop needs.
pub struct ControlCtx {
    /// Opens links (QUIC on the node's shared UDP socket, or TCP).
    pub dialer: Dialer,
    /// Where the controller listens.
    pub target: Target,
    /// State directory (peer cache).
    pub state: StateDir,
    /// Network name.
    pub network: String,
    /// Controller key.
    pub controller_key: PublicKey,
    /// Node private key.
    pub node_key: [u8; 32],
    /// UDP port (for the endpoints the node reports).
    pub port: u16,
    /// TUN device name (excluded from reported endpoints).
    pub interface: String,
    /// The operator's endpoint interface list (which interfaces' addresses are reported).
    pub endpoint_interfaces: EndpointInterfaces,
    /// The network's overlay range (never reported as an endpoint).
    pub overlay: ipnet::Ipv4Net,
    /// Status shared with the local API.
    pub status: Arc<Mutex<ControlStatus>>,
    /// Standalone relays: the addresses they observe for this node.
    pub relays: RelayShared,
    /// Where the relay list from the controller goes.
    pub relay_list: watch::Sender<Vec<RelayInfo>>,
    /// The home relay chosen by the relay task.
    pub home: watch::Receiver<Option<String>>,
    /// The address at which the router forwards the UDP port (see [`crate::portmap`]).
    pub port_mapping: watch::Receiver<Option<SocketAddr>>,
    /// The prefixes this node advertises (`--advertise-routes`, `mesh routes advertise`).
    pub advertised: watch::Receiver<Vec<IpNet>>,
    /// Where the controller's word on them goes (see [`ServerMsg::Routes`]).
    pub route_states: watch::Sender<Vec<RouteState>>,
    /// The prefixes the peers route, as approved (the daemon installs a route for each).
    pub peer_routes: watch::Sender<Vec<IpNet>>,
    /// The node's IPv6 overlay address and the network's prefix, as the last welcome gave
    /// them (the daemon saves and configures a change).
    pub overlay6: watch::Sender<Option<(std::net::Ipv6Addr, mesh_proto::control::Ipv6Net)>>,
    /// The peers' names and overlay addresses (the name responder answers them).
    pub peer_names: watch::Sender<Vec<crate::dns::Node>>,
    /// The network's names for several nodes (see [`ServerMsg::Names`]).
    pub aliases: watch::Sender<Vec<mesh_proto::control::NameAlias>>,
    /// The prefixes this node offers as an exit.
    pub exits: Vec<IpNet>,
    /// The prefixes it sends through a peer's exit, by choice.
    pub uses: Vec<crate::exits::ExitUse>,
    /// Those of them an approved exit of the named peer covers now (the daemon routes them).
    pub exit_routes: watch::Sender<Vec<IpNet>>,
}

/// Endpoint candidates: the local addresses of the interfaces that can carry a path, then the
/// router's mapping of the port and the public mappings the relays observe, each of which has
/// a place (see [`candidates::report`]).
async fn endpoints(ctx: &ControlCtx) -> Vec<SocketAddr> {
    let controller_observed = ctx.status.lock().ok().and_then(|s| s.observed);
    let router_mapped = *ctx.port_mapping.borrow();
    candidates::report(
        &local_addresses(&ctx.interface, Some(ctx.overlay)).await,
        &ctx.endpoint_interfaces,
        ctx.port,
        candidates::Mappings {
            router: router_mapped,
            relays: &ctx.relays.observed(),
            controller: controller_observed,
        },
    )
}

/// A heartbeat as it stands now (candidates, home relay, NAT kind, advertised routes), encoded.
async fn heartbeat_now(ctx: &ControlCtx, nat: Option<NatKind>) -> Vec<u8> {
    ClientMsg::Heartbeat {
        endpoints: endpoints(ctx).await,
        home_relay: ctx.home.borrow().clone(),
        nat,
        routes: ctx.advertised.borrow().clone(),
        exits: ctx.exits.clone(),
    }
    .encode()
}

/// Takes the controller's word on this node's advertised prefixes: caches it (a restart while
/// the controller is down keeps routing the approved ones) and passes it on.
fn set_route_states(ctx: &ControlCtx, states: Vec<RouteState>) {
    if let Err(e) = ctx.state.save_route_states(&states) {
        warn!(error = %format!("{e:#}"), "cannot cache the route states");
    }
    for s in &states {
        if s.state == RouteStatus::Refused || s.state == RouteStatus::Rejected {
            warn!(prefix = %s.prefix, state = ?s.state, reason = s.reason.as_deref().unwrap_or(""), "the controller does not route this prefix to this node");
        }
    }
    ctx.route_states.send_replace(states);
}

fn set_relays(ctx: &ControlCtx, relays: Vec<RelayInfo>) {
    if let Err(e) = ctx.state.save_relays(&relays) {
        warn!(error = %format!("{e:#}"), "cannot cache the relay list");
    }
    ctx.relay_list.send_replace(relays);
}

/// The node's own addresses outside the overlay, with their interfaces. Addresses of the
/// overlay interface, of interfaces stacked on it (a CNI's vxlan device) and inside
/// destinations routed through it are left out (see [`mesh_sys::netlink::overlay_view`]).
pub async fn local_addresses(
    interface: &str,
    overlay: Option<ipnet::Ipv4Net>,
) -> Vec<mesh_sys::netlink::LocalAddress> {
    match mesh_sys::netlink::overlay_view(interface, overlay).await {
        Ok(view) => view.candidates,
        Err(e) => {
            warn!(error = %e, "cannot list local addresses");
            Vec::new()
        }
    }
}

/// Every one of the node's own addresses outside the overlay with its UDP port, on whatever
/// interface (not only those reported as candidates): a mapping that the controller observes
/// at one of them means the node is not behind a NAT.
pub async fn local_endpoints(
    port: u16,
    interface: &str,
    overlay: Option<ipnet::Ipv4Net>,
) -> Vec<SocketAddr> {
    local_addresses(interface, overlay)
        .await
        .into_iter()
        .map(|a| SocketAddr::from((a.address, port)))
        .collect()
}

fn set_status(ctx: &ControlCtx, connected: bool, error: Option<String>) {
    if let Ok(mut s) = ctx.status.lock() {
        s.connected = connected;
        s.last_error = error;
    }
}

async fn publish(
    ctx: &ControlCtx,
    peers: &BTreeMap<PublicKey, PeerInfo>,
    data: &mpsc::Sender<DataCmd>,
) {
    let list: Vec<PeerInfo> = peers.values().cloned().collect();
    if let Err(e) = ctx.state.save_peers(&list) {
        warn!(error = %format!("{e:#}"), "cannot cache the peer list");
    }
    ctx.peer_routes.send_replace(routes_of(&list));
    ctx.peer_names.send_if_modified(|names| {
        let now = names_of(&list);
        let changed = *names != now;
        *names = now;
        changed
    });
    let active = crate::exits::in_use(&ctx.uses, &list);
    ctx.exit_routes.send_if_modified(|now| {
        let changed = *now != active;
        *now = active;
        changed
    });
    let list = crate::exits::with_exits(list, &ctx.uses);
    let _ = data.send(DataCmd::SetPeers(list)).await;
}

/// The peers' names and overlay addresses, by name.
pub fn names_of(peers: &[PeerInfo]) -> Vec<crate::dns::Node> {
    let mut names: Vec<_> = peers
        .iter()
        .map(|p| crate::dns::Node {
            name: p.name.clone(),
            address: p.address,
            address6: p.address6,
        })
        .collect();
    names.sort();
    names
}

/// Every prefix the peers route, once each.
pub fn routes_of(peers: &[PeerInfo]) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = peers
        .iter()
        .flat_map(|p| p.routes.iter().copied())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Asks the STUN observer (`observer`; an unspecified IP means the controller's, `controller`)
/// from the node's main socket how it sees the node.
async fn observe(
    data: &mpsc::Sender<DataCmd>,
    observer: SocketAddr,
    controller: SocketAddr,
) -> Option<SocketAddr> {
    let to = if observer.ip().is_unspecified() {
        SocketAddr::new(controller.ip(), observer.port())
    } else {
        observer
    };
    let (tx, rx) = oneshot::channel();
    data.send(DataCmd::Observe(to, tx)).await.ok()?;
    rx.await.ok().flatten()
}

/// Requests the control loop takes from the local API.
pub enum ControlCmd {
    /// Leave the network; answer when the controller confirmed.
    Leave(oneshot::Sender<Result<(), String>>),
}

/// Keeps a control session up until `shutdown` flips: applies peer updates, sends heartbeats,
/// reconnects with backoff. Returns the controller's words when it says that this node is no
/// longer a member (removed by the admin): retrying cannot help, and the old address may
/// already belong to another node, so the daemon stops. `None` after `shutdown`.
pub async fn run(
    ctx: ControlCtx,
    data: mpsc::Sender<DataCmd>,
    mut cmds: mpsc::Receiver<ControlCmd>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<String> {
    let mut backoff = Duration::from_secs(1);
    let mut pending_leave: Option<oneshot::Sender<Result<(), String>>> = None;
    // What the last connection found out about this node's NAT, told in every Hello and
    // heartbeat.
    let mut nat: Option<NatKind> = None;
    // The router's mapping: every Hello and heartbeat carries it, and a change is told at once.
    let mut mapped = ctx.port_mapping.clone();
    let mut advertised = ctx.advertised.clone();
    // A session opened on a better transport, to go on with (see `crate::dial`).
    let mut switched: Option<(Session, Welcome)> = None;
    // The address in use: the token's, or one the controller announced (tried in turn while
    // the one in use does not answer).
    let mut target = ctx.target.clone();
    // Whether the last session was lost (rather than never opened).
    let mut lost = false;
    loop {
        // The address just lost goes last in the next race: it is likely down (a replica
        // killed), and if it is not, it answers a few staggers later.
        let avoid = std::mem::take(&mut lost).then(|| target.quic.clone());
        // What the Hello is about to tell counts as told.
        mapped.borrow_and_update();
        advertised.borrow_and_update();
        let (session, welcome) = if let Some(s) = switched.take() {
            s
        } else {
            let hello = ClientMsg::Hello {
                network: ctx.network.clone(),
                endpoints: endpoints(&ctx).await,
                home_relay: ctx.home.borrow().clone(),
                nat,
                routes: ctx.advertised.borrow().clone(),
                exits: ctx.exits.clone(),
            };
            let attempt = open_any(&ctx, &target, &hello, avoid.as_deref());
            let (answered, result) = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => return None,
            };
            if result.is_ok() && answered.quic != target.quic {
                info!(controller = %answered.quic, previous = %target.quic, "connected through another controller address");
            }
            target = answered;
            match result {
                Ok(s) => s,
                Err(ControlError::Refused {
                    code: ErrorCode::NodeUnknown,
                    message,
                }) => {
                    if let Some(reply) = pending_leave.take() {
                        // Nothing left to leave on the controller.
                        let _ = reply.send(Ok(()));
                    }
                    return Some(message);
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "controller connection failed");
                    set_status(&ctx, false, Some(e.to_string()));
                    if let Some(reply) = pending_leave.take() {
                        let _ = reply.send(Err(e.to_string()));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return None,
                        Some(ControlCmd::Leave(reply)) = cmds.recv() => pending_leave = Some(reply),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        };
        backoff = Duration::from_secs(1);
        set_status(&ctx, true, None);
        let transport = session.conn.transport();
        // Where only TCP got through, the next connection attempt starts it at once.
        let tcp_only = transport == mesh_control::Transport::Tcp;
        ctx.dialer
            .tcp_first
            .store(tcp_only, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = ctx.state.save_tcp_only(tcp_only) {
            warn!(error = %format!("{e:#}"), "cannot remember the transport");
        }
        if let Ok(mut s) = ctx.status.lock() {
            s.address = target.quic.clone();
            s.transport = Some(transport.to_string());
            s.observed = welcome.observed;
            s.birthday_budget = welcome.birthday_budget;
            s.clock_offset_ms = welcome.now.map(clock_offset_ms);
        }
        let _ = data
            .send(DataCmd::BirthdayBudget(welcome.birthday_budget))
            .await;
        // A node the controller sees at one of its own addresses is not behind a NAT: peers
        // reach its socket as it is, and birthday punching from it only costs (DESIGN: never
        // punch from a node that is not NATed).
        info!(network = %welcome.network, address = %welcome.address, peers = welcome.peers.len(), %transport, controller = %target.quic, "connected to controller");
        remember_announced(&ctx, &welcome.controllers);
        if let Some(given) = welcome.address6.zip(welcome.prefix6) {
            ctx.overlay6.send_if_modified(|o| {
                let changed = *o != Some(given);
                *o = Some(given);
                changed
            });
        }
        let mut peers: BTreeMap<PublicKey, PeerInfo> =
            welcome.peers.into_iter().map(|p| (p.key, p)).collect();
        publish(&ctx, &peers, &data).await;
        set_relays(&ctx, welcome.relays);
        let mut home = ctx.home.clone();

        let Session {
            conn,
            mut tx,
            mut rx,
        } = session;
        // The controller embeds the relay: the same connection carries relayed traffic.
        let _ = data.send(DataCmd::Relay(Some(conn.clone()))).await;

        // After the peers and the relay are in place: the observer's answer takes a round trip,
        // and up to OBSERVE_TIMEOUT when its port is blocked (a node that needs the relay most).
        if let Some(observed) = welcome.observed {
            let own = local_endpoints(ctx.port, &ctx.interface, Some(ctx.overlay)).await;
            // The observer, a second destination, says whether the mapping depends on it.
            let second = match welcome.observer {
                Some(observer) => observe(&data, observer, conn.remote_address()).await,
                None => None,
            };
            let kind = second.map(|second| NatKind::from_observations(&own, observed, second));
            if let Ok(mut s) = ctx.status.lock() {
                s.observer_saw = second;
                s.nat = kind;
            }
            match (kind, welcome.observer, second) {
                (Some(k), _, _) => info!(nat = %k, %observed, second = ?second, "NAT kind"),
                (None, Some(o), None) => {
                    warn!(observer = %o, "the controller's STUN observer did not answer (is its UDP port open?); the NAT kind stays unknown")
                }
                _ => {}
            }
            let natted = !own.contains(&observed);
            let _ = data.send(DataCmd::Nat { natted, kind }).await;
            nat = kind.or(nat);
        }

        let (in_tx, mut in_rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            loop {
                let r = rx.recv().await;
                let end = r.is_err();
                if in_tx.send(r).await.is_err() || end {
                    break;
                }
            }
        });
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        if nat.is_none() {
            // Nothing new to tell before the first interval.
            heartbeat.tick().await;
        }
        if let Some(reply) = pending_leave.take() {
            let r = leave_on(&mut tx, &mut in_rx).await;
            let _ = reply.send(r);
        }
        // A better transport, when one shows up: QUIC that went quiet gets TCP beside it, and
        // TCP gets QUIC back when it answers again.
        let better = ctx.dialer.better(&target, &conn);
        tokio::pin!(better);
        // A server that leaves the node's keepalives unanswered is gone (killed, its host
        // down): on to another replica, without waiting for QUIC's idle timeout.
        let gone = conn.unanswered(mesh_control::quic::ANSWER_WITHIN);
        tokio::pin!(gone);
        let reason = loop {
            tokio::select! {
                _ = &mut gone => break format!(
                    "the controller left the node's packets unanswered for {:.2} s",
                    mesh_control::quic::ANSWER_WITHIN.as_secs_f64()
                ),
                link = &mut better => {
                    let (to, hello) = (link.transport(), ClientMsg::Hello {
                        network: ctx.network.clone(),
                        endpoints: endpoints(&ctx).await,
                        home_relay: ctx.home.borrow().clone(),
                        nat,
                        routes: ctx.advertised.borrow().clone(),
                        exits: ctx.exits.clone(),
                    });
                    match open_on(link, &target.quic, &ctx.controller_key, &ctx.node_key, &hello, Duration::from_secs(5)).await {
                        Ok(s) => {
                            info!(from = %transport, %to, "control session moved to another transport");
                            switched = Some(s);
                            break format!("moved from {transport} to {to}");
                        }
                        Err(e) => {
                            warn!(error = %e, %to, "the other transport connected but the session did not open; staying");
                            better.set(ctx.dialer.better(&target, &conn));
                        }
                    }
                }
                msg = in_rx.recv() => {
                    let bytes = match msg {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => break e.to_string(),
                        None => break "reader stopped".to_owned(),
                    };
                    match decode_server(&bytes) {
                        Ok(ServerMsg::PeersChanged { upsert, remove }) => {
                            for k in remove {
                                peers.remove(&k);
                            }
                            for p in upsert {
                                peers.insert(p.key, p);
                            }
                            info!(peers = peers.len(), "peer list updated");
                            publish(&ctx, &peers, &data).await;
                        }
                        Ok(ServerMsg::Relays { relays }) => {
                            info!(relays = relays.len(), "relay list updated");
                            set_relays(&ctx, relays);
                        }
                        Ok(ServerMsg::Routes { routes }) => {
                            info!(routes = routes.len(), "route states updated");
                            set_route_states(&ctx, routes);
                        }
                        Ok(ServerMsg::Names { names }) => {
                            info!(names = names.len(), "names for several nodes updated");
                            if let Err(e) = ctx.state.save_names(&names) {
                                warn!(error = %format!("{e:#}"), "cannot cache the names");
                            }
                            ctx.aliases.send_replace(names);
                        }
                        Ok(ServerMsg::Settings { birthday_budget }) => {
                            if let Ok(mut s) = ctx.status.lock() {
                                s.birthday_budget = birthday_budget;
                            }
                            let _ = data.send(DataCmd::BirthdayBudget(birthday_budget)).await;
                        }
                        Ok(ServerMsg::Error { code: ErrorCode::NodeUnknown, message }) => {
                            conn.close(0, b"removed");
                            reader.abort();
                            return Some(message);
                        }
                        Ok(ServerMsg::Error { message, .. }) => {
                            warn!(%message, "controller closed the session");
                            break message;
                        }
                        Ok(other) => tracing::debug!(?other, "ignored"),
                        Err(e) => break format!("malformed message from controller: {e}"),
                    }
                }
                // A new home relay is told at once, so peers switch to it.
                _ = async { if home.changed().await.is_err() { std::future::pending::<()>().await } } => {
                    home.borrow_and_update();
                    if let Err(e) = tx.send(&heartbeat_now(&ctx, nat).await).await {
                        break e.to_string();
                    }
                }
                // Routes advertised or withdrawn at run time (`mesh routes`) are told at once.
                _ = async { if advertised.changed().await.is_err() { std::future::pending::<()>().await } } => {
                    advertised.borrow_and_update();
                    if let Err(e) = tx.send(&heartbeat_now(&ctx, nat).await).await {
                        break e.to_string();
                    }
                }
                // A new, moved or lost router mapping is told at once, so peers try it.
                _ = async { if mapped.changed().await.is_err() { std::future::pending::<()>().await } } => {
                    mapped.borrow_and_update();
                    if let Err(e) = tx.send(&heartbeat_now(&ctx, nat).await).await {
                        break e.to_string();
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(e) = tx.send(&heartbeat_now(&ctx, nat).await).await {
                        break e.to_string();
                    }
                }
                Some(ControlCmd::Leave(reply)) = cmds.recv() => {
                    let r = leave_on(&mut tx, &mut in_rx).await;
                    let ok = r.is_ok();
                    let _ = reply.send(r);
                    if ok {
                        conn.close(0, b"left");
                        reader.abort();
                        // The daemon stops after a leave; wait for it.
                        let _ = shutdown.changed().await;
                        return None;
                    }
                }
                _ = shutdown.changed() => {
                    conn.close(0, b"agent stopping");
                    reader.abort();
                    return None;
                }
            }
        };
        reader.abort();
        if switched.is_some() {
            // The new session's welcome hands the data plane its relay link.
            conn.close(0, b"moved to another transport");
            continue;
        }
        let _ = data.send(DataCmd::Relay(None)).await;

        conn.close(0, b"reconnecting");
        warn!(%reason, "control connection lost; peers stay as they are, reconnecting");
        set_status(&ctx, false, Some(reason));
        lost = true;
        // A lost session is retried almost at once; backoff grows only while attempts fail.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// How long a connection attempt waits before the next address joins the race.
const RACE_STAGGER: Duration = Duration::from_millis(300);

/// Opens a session on the first of the controller's addresses that answers: `first` (the one that
/// answered last), then every other the token named or the controllers announced, each
/// [`RACE_STAGGER`] after the one before, all racing; `last` (the one just lost) at the end. A
/// controller that is down (killed, its host gone) costs a stagger, not a whole timeout: a node
/// whose controller died is on another replica a few hundred milliseconds after it gave up on it
/// ([`mesh_control::quic::ANSWER_WITHIN`]). A refusal is an answer and ends the race. Gives back
/// the address that answered (or failed first) and the result.
async fn open_any(
    ctx: &ControlCtx,
    first: &Target,
    hello: &ClientMsg,
    last: Option<&str>,
) -> (Target, Result<(Session, Welcome), ControlError>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut targets = vec![first.clone()];
    for a in addresses(ctx) {
        if targets.iter().all(|t| t.quic != a) {
            targets.push(if a == ctx.target.quic {
                ctx.target.clone()
            } else {
                Target::new(&a, None, "mesh-controller")
            });
        }
    }
    // A name with several addresses (one A record per replica) races as several controllers.
    let mut expanded: Vec<Target> = Vec::with_capacity(targets.len());
    for t in targets {
        for one in spread(t).await {
            if expanded.iter().all(|e| e.quic != one.quic) {
                expanded.push(one);
            }
        }
    }
    if let Some(last) = last {
        // Stable: the others keep their order.
        expanded.sort_by_key(|t| t.quic == last);
    }
    let mut attempts: FuturesUnordered<_> = expanded
        .into_iter()
        .enumerate()
        .map(|(i, target)| async move {
            tokio::time::sleep(RACE_STAGGER * i as u32).await;
            let r = open(
                &ctx.dialer,
                &target,
                &ctx.controller_key,
                &ctx.node_key,
                hello,
                Duration::from_secs(5),
            )
            .await;
            (target, r)
        })
        .collect();
    let mut failed = None;
    while let Some((target, r)) = attempts.next().await {
        match r {
            Ok(_) | Err(ControlError::Refused { .. }) => return (target, r),
            Err(e) => {
                if failed.is_none() {
                    failed = Some((target, Err(e)));
                }
            }
        }
    }
    failed.unwrap_or_else(|| {
        let e = ControlError::Failed {
            addr: first.quic.clone(),
            reason: "no address to try".into(),
        };
        (first.clone(), Err(e))
    })
}

/// `target` as one target per address its host name resolves to, when it has several (its
/// TCP side on the same address); as it is otherwise, an IP address, or a name that does not
/// resolve now (its attempt says why).
async fn spread(target: Target) -> Vec<Target> {
    let Some((host, _)) = target.quic.rsplit_once(':') else {
        return vec![target];
    };
    if host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok()
    {
        return vec![target];
    }
    let Ok(found) = tokio::net::lookup_host(&target.quic).await else {
        return vec![target];
    };
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in found.map(mesh_control::net::canonical) {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.len() < 2 {
        return vec![target];
    }
    let tcp_port = target.tcp.rsplit_once(':').map(|(_, p)| p.to_owned());
    addrs
        .into_iter()
        .map(|a| {
            let tcp = tcp_port
                .as_deref()
                .map(|p| SocketAddr::new(a.ip(), p.parse().unwrap_or(a.port())).to_string());
            Target::new(&a.to_string(), tcp.as_deref(), target.server_name)
        })
        .collect()
}

/// Every address the controller may be reached at: the one from the token, then the ones it
/// announced (saved with the membership).
fn addresses(ctx: &ControlCtx) -> Vec<String> {
    let mut all = vec![ctx.target.quic.clone()];
    if let Ok(m) = ctx.state.load_membership() {
        for a in m.controllers {
            if !all.contains(&a) {
                all.push(a);
            }
        }
    }
    all
}

/// Saves the addresses the controller announced in its Welcome, when they changed (an empty
/// list, from a controller that announces none, changes nothing).
fn remember_announced(ctx: &ControlCtx, announced: &[String]) {
    if announced.is_empty() {
        return;
    }
    let Ok(mut m) = ctx.state.load_membership() else {
        return;
    };
    if m.controllers == announced {
        return;
    }
    m.controllers = announced.to_vec();
    match ctx.state.save_membership(&m) {
        Ok(()) => {
            info!(addresses = ?announced, "the controller announced where else it can be reached; saved")
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot save the controller's announced addresses")
        }
    }
}

async fn leave_on(
    tx: &mut channel::Sender,
    in_rx: &mut mpsc::Receiver<Result<Vec<u8>, ChannelError>>,
) -> Result<(), String> {
    tx.send(&ClientMsg::Leave.encode())
        .await
        .map_err(|e| e.to_string())?;
    let wait = async {
        while let Some(msg) = in_rx.recv().await {
            match msg.map(|b| decode_server(&b)) {
                Ok(Ok(ServerMsg::Left)) => return Ok(()),
                Ok(Ok(ServerMsg::Error { message, .. })) => return Err(message),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("control connection closed".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| Err("controller did not confirm within 10 s".to_owned()))
}
