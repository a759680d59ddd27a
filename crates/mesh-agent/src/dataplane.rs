//! The data-plane driver: one task that owns the [`mesh_core::Node`] and does its I/O.
//!
//! It reads the shared UDP socket in batches (recvmmsg/GRO), hands QUIC datagrams to the quinn
//! endpoint and everything else to the node, reads the TUN device (draining up to a batch per
//! wake-up), runs the node's timers, and carries out what the node produced, in the order
//! [`Node::poll_output`] gives it: events, datagrams (GSO batches the node grouped, or relayed
//! messages framed for the relay's QUIC connection), packets to the TUN device. Buffers go back
//! to the node ([`Node::recycle`]) once written.
//!
//! The TUN device is read and written through [`TunIo`]: with offloads (see
//! [`mesh_sys::tun::Offload`]) one read brings a TCP super-packet of up to 64 KB, split into
//! packets of the MTU, and the packets one wake-up decrypted are written together, segments of
//! one TCP flow coalesced into one write.
//!
//! Writes to the main UDP socket and to the TUN device never hold up the loop: each has a
//! writer task fed by a bounded queue ([`UDP_PENDING`] datagrams; [`TUN_WRITE_QUEUE`]
//! batches, behind which packets gather into one growing batch up to [`TUN_PENDING`]), which
//! hands the buffers back once written ([`Written`]). The back-pressure rule: what does not fit
//! is dropped and counted (`udp_queue_drops`, `tun_queue_drops`), as a router drops at a full
//! interface queue, and the loop goes on reading. So a slow TUN write no longer stalls UDP
//! receive, and the system calls of one direction run on the runtime's other thread while the
//! loop encrypts or decrypts. A lone datagram or packet while its writer is idle (an
//! interactive exchange, a ping) the loop writes itself without blocking, sparing the wake-up
//! of the other thread; anything the kernel does not take at once goes to the writer. Where the
//! machine has a second core, batches for the main socket are encrypted on a thread of their
//! own ([`Sealer`]) on their way to the UDP writer; with `MESH_OPEN_THREAD=1`, batches from it
//! are decrypted on another ([`Opener`]) and come back to the loop, which takes them in the
//! order they came.

use futures_util::FutureExt;
use mesh_core::node::MAX_BATCH_BYTES;
use mesh_core::{
    Destination, Event, Node, Opened, Output, Path, PeerConfig, PeerStatus, SocketId, Source,
    Transmit, Unopened, Unsealed,
};
use mesh_proto::control::{NatKind, PeerInfo};
use mesh_proto::demux::{classify, DatagramKind};
use mesh_proto::relay::Framer;
use mesh_proto::PublicKey;
use mesh_sys::socket::{Batch, QuicInbox, UdpPort};
use mesh_sys::tun::{Tun, TunPacket};
use quinn::udp::RecvMeta;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

// A TUN buffer the writer grew for a coalesced super-packet goes back to the node, which keeps
// it among its large buffers only if it is at least their size.
const _: () = assert!(mesh_sys::tun::COALESCE_CAPACITY >= mesh_core::LARGE_BUFFER);

/// Datagrams per receive call.
const RECV_BATCH: usize = 32;
/// Bytes per receive buffer (room for a GRO batch).
const RECV_BUF: usize = 65536;
/// TUN packets handled per wake-up before the node's output is flushed.
const TUN_BATCH: usize = 64;
/// Bytes per packet buffer of a TUN read: the largest MTU mesh0 may have (9000), with room.
const TUN_PACKET_BUF: usize = 9216;
/// Datagrams queued for the UDP writer (about 6 MB at full size, in the node's transmits);
/// a transmit that would pass it is dropped.
const UDP_PENDING: usize = 4096;
/// Write batches queued for the TUN writer. While they are all taken, packets wait in the next
/// batch, which grows (so a busy writer gets bigger batches to coalesce) up to
/// [`TUN_PENDING`] packets; past that, new packets are dropped.
const TUN_WRITE_QUEUE: usize = 8;
/// Packets waiting for the TUN writer beyond its queue.
const TUN_PENDING: usize = 2048;
/// Batches at the opening thread (of up to 64 datagrams each). With that many out, the loop
/// waits for the oldest to come back before it hands out another: received datagrams then
/// wait in the socket's buffer, and the kernel drops what does not fit, as at any full queue.
const OPEN_PENDING: usize = 32;

/// Requests to the data plane.
pub enum DataCmd {
    /// Replace the peer list.
    SetPeers(Vec<PeerInfo>),
    /// The node's overlay address (known after the join).
    SetAddress(std::net::Ipv4Addr),
    /// The node's IPv6 overlay address and the network's IPv6 prefix (`None`: IPv4 only).
    SetAddress6(Option<(std::net::Ipv6Addr, ipnet::Ipv6Net)>),
    /// Report status.
    Status(oneshot::Sender<DataStatus>),
    /// The relay connection (the control connection, whose controller embeds the relay), or
    /// `None` when it is gone.
    Relay(Option<mesh_control::Link>),
    /// A standalone relay's connection (by region name), or `None` when it is gone.
    RelayRegion(String, Option<mesh_control::Link>),
    /// Ping a peer inside the tunnel; answers with the path and round-trip time.
    Ping(PublicKey, PingReply),
    /// Destinations the overlay itself reaches (see [`Node::set_excluded`]); the IPv6 overlay
    /// prefix of [`DataCmd::SetAddress6`] joins them.
    SetExcluded(Vec<ipnet::IpNet>),
    /// The prefixes the controller approved for this node (see [`Node::set_routes`]).
    SetRoutes(Vec<ipnet::IpNet>),
    /// Whether this node is behind a NAT (as the controller sees it): birthday punching runs
    /// only then. `kind`: how the NAT maps, when two observations told.
    Nat {
        /// The controller sees the node at an address that is not its own.
        natted: bool,
        /// How it maps, if known.
        kind: Option<NatKind>,
    },
    /// The network's birthday budget (attempts per 10 minutes; `None`: the default).
    BirthdayBudget(Option<u16>),
    /// Ask the STUN observer at `to` from the main socket how it sees this node; the answer
    /// (or `None` after [`OBSERVE_TIMEOUT`]) goes to `reply`.
    Observe(SocketAddr, oneshot::Sender<Option<SocketAddr>>),
}

/// Where the answer to a ping goes.
type PingReply = oneshot::Sender<Result<(Path, Duration), String>>;
/// A ping in flight: peer, deadline, reply.
type PendingPing = (PublicKey, Instant, PingReply);

/// How long `mesh ping` waits for an answer.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Relay frames queued from the relay reader to the data plane.
const RELAY_INBOX: usize = 1024;
/// Datagrams queued from the extra (birthday) sockets to the data plane.
const EXTRA_INBOX: usize = 1024;

mesh_core::counters! {
    /// Counters kept by the driver itself (the node keeps its own).
    pub struct DriverCounters {
        /// Datagrams received on the UDP socket.
        udp_rx: Counter("udp_rx_datagrams"),
        /// Datagrams sent on the UDP socket.
        udp_tx: Counter("udp_tx_datagrams"),
        /// Of those, datagrams the loop sent itself, the writer being idle (see `send_inline`).
        udp_inline: Counter("udp_tx_inline_datagrams"),
        /// Send calls on the UDP socket that failed.
        udp_send_errors: Counter("udp_send_errors"),
        /// Datagrams whose first bytes match no protocol.
        unknown_datagrams: Drop("unknown_protocol"),
        /// QUIC datagrams dropped because the QUIC endpoint was behind.
        quic_drops: Drop("quic_behind"),
        /// Packets written to TUN.
        tun_tx: Counter("tun_tx_packets"),
        /// Of those, packets the loop wrote itself, the writer being idle (see `send_inline`).
        tun_inline: Counter("tun_tx_inline_packets"),
        /// Packets read from TUN.
        tun_rx: Counter("tun_rx_packets"),
        /// Failed TUN writes.
        tun_write_errors: Counter("tun_write_errors"),
        /// Reads from TUN (one may bring a super-packet of many packets).
        tun_reads: Counter("tun_read_calls"),
        /// Reads from TUN whose packet could not be taken apart (a malformed offload header, or
        /// more segments than a batch holds).
        tun_read_drops: Drop("tun_unsplittable"),
        /// 1 when mesh0 was opened with offloads (see `mesh_sys::tun::Offload`).
        tun_offload: Gauge("tun_offload"),
        /// 1 when batches are encrypted on the sealing thread ([`Sealer`]), 0 when the loop
        /// encrypts everything itself.
        seal_thread: Gauge("seal_thread"),
        /// Datagrams encrypted on the sealing thread rather than in the loop.
        sealed_off_loop: Counter("sealed_off_loop_datagrams"),
        /// 1 when batches received are decrypted on the opening thread ([`Opener`]), 0 when
        /// the loop decrypts everything itself.
        open_thread: Gauge("open_thread"),
        /// Datagrams decrypted on the opening thread rather than in the loop.
        opened_off_loop: Counter("opened_off_loop_datagrams"),
        /// 1 when TUN batches are written on a thread of their own ([`start_tun_writer`]), 0
        /// when the writer is a task of the runtime.
        tun_write_thread: Gauge("tun_write_thread"),
        /// Datagrams dropped because the UDP writer's queue was full.
        udp_queue_drops: Drop("udp_write_queue_full"),
        /// Packets dropped because the TUN writer's queue was full.
        tun_queue_drops: Drop("tun_write_queue_full"),
        /// The UDP socket's receive buffer, bytes, as the kernel granted it.
        udp_recv_buffer: Gauge("udp_recv_buffer_bytes"),
        /// The UDP socket's send buffer, bytes.
        udp_send_buffer: Gauge("udp_send_buffer_bytes"),
        /// How many of the two buffers the kernel gave less than mesh asked for (see
        /// `mesh_sys::socket::SOCKET_BUFFER`).
        udp_buffers_refused: Gauge("udp_buffers_refused"),
        /// Relay frames received.
        relay_rx: Counter("relay_rx_frames"),
        /// Relay frames sent.
        relay_tx: Counter("relay_tx_frames"),
        /// Relay frames dropped (malformed, too big, or the relay connection full or gone).
        relay_drops: Drop("relay_frame"),
        /// Relayed messages given up on before all their fragments came (expired, or evicted to
        /// bound the reassembly's memory).
        relay_reassembly_drops: Drop("relay_reassembly"),
        /// Relay frames dropped on arrival because the data plane was behind (its inbox of
        /// `RELAY_INBOX` frames full).
        relay_inbox_drops: Drop("relay_inbox_full"),
        /// Datagrams on extra sockets dropped on arrival because the data plane was behind (its
        /// inbox of `EXTRA_INBOX` datagrams full).
        extra_inbox_drops: Drop("extra_inbox_full"),
        /// Extra sockets open now (hole punching toward endpoint-dependent NATs, and the ones kept
        /// for peers reached that way).
        extra_sockets: Gauge("extra_sockets_open"),
        /// Extra sockets the system refused to open.
        extra_socket_errors: Counter("extra_socket_errors"),
        /// Datagrams received on extra sockets.
        extra_rx: Counter("extra_rx_datagrams"),
        /// Datagrams sent on extra sockets.
        extra_tx: Counter("extra_tx_datagrams"),
    }
}

/// The node's extra UDP sockets (see [`mesh_core::birthday`]): plain sockets without batching,
/// each with a reader feeding one inbox.
#[derive(Default)]
struct ExtraSockets {
    /// Each open socket: a handle to send on, and the reader task (which owns the tokio side).
    open: std::collections::HashMap<SocketId, (std::net::UdpSocket, tokio::task::JoinHandle<()>)>,
    /// Datagrams the readers dropped because the inbox was full.
    inbox_drops: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A datagram received on an extra socket.
type ExtraDatagram = (SocketId, std::net::SocketAddr, Vec<u8>);

impl ExtraSockets {
    fn open(&mut self, id: SocketId, inbox: &mpsc::Sender<ExtraDatagram>) -> std::io::Result<()> {
        let std_socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        std_socket.set_nonblocking(true)?;
        // Like the main socket, never routed into the overlay (fails without CAP_NET_ADMIN,
        // which the main socket's start-up has already reported).
        let _ = mesh_sys::bypass::mark_socket(&std_socket);
        // The socket a birthday attempt won carries all of its peer's traffic: the main
        // socket's buffers, or a burst overflows the kernel's default (208 KiB) and is lost.
        // (Limits, not allocations: an idle socket of an attempt costs nothing for them.)
        mesh_sys::socket::size_buffers(&std_socket, mesh_sys::socket::SOCKET_BUFFER);
        // Sends go through a plain non-blocking handle: tokio's try_send_to refuses until the
        // reactor has seen the new socket writable, and the first probe goes out at once.
        let sender = std_socket.try_clone()?;
        let reader = tokio::net::UdpSocket::from_std(std_socket)?;
        let (tx, drops) = (inbox.clone(), self.inbox_drops.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = reader.recv_from(&mut buf).await {
                // Full inbox: drop, as a congested link would, and count it.
                if tx.try_send((id, from, buf[..n].to_vec())).is_err() {
                    drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        if let Some((_, old)) = self.open.insert(id, (sender, task)) {
            old.abort();
        }
        Ok(())
    }

    fn close(&mut self, id: SocketId) {
        if let Some((_, task)) = self.open.remove(&id) {
            task.abort();
        }
    }

    /// Sends a transmit on extra socket `id` (a GSO batch in as few system calls as the kernel
    /// takes, see [`mesh_sys::socket::send_plain`]); how many datagrams went (0 if the socket
    /// is not open). (The node sends primers, the only transmits with a TTL of their own, on the
    /// main socket only.)
    fn send(&self, id: SocketId, dst: std::net::SocketAddr, t: &Transmit) -> usize {
        let Some((s, _)) = self.open.get(&id) else {
            return 0;
        };
        let sent = mesh_sys::socket::send_plain(s, dst, &t.contents, t.segment_size);
        if sent < t.datagrams() {
            debug!(socket = %id, %dst, lost = t.datagrams() - sent, "UDP send on an extra socket failed");
        }
        sent
    }
}

/// A status snapshot.
#[derive(Debug, Clone)]
pub struct DataStatus {
    /// Every peer.
    pub peers: Vec<PeerStatus>,
    /// Node drop counters.
    pub node: mesh_core::Counters,
    /// Driver counters.
    pub driver: DriverCounters,
    /// What birthday punching has cost and won.
    pub birthday: mesh_core::BirthdayStats,
    /// The relay each peer's relayed traffic goes through now (`controller` or a region).
    pub relay_of: std::collections::HashMap<PublicKey, String>,
}

/// Name shown for the controller's embedded relay.
pub const CONTROLLER_RELAY: &str = "controller";

/// The relay connections and which one reaches each peer.
#[derive(Default)]
struct Relays {
    /// The control connection (the controller embeds a relay).
    controller: Option<mesh_control::Link>,
    /// Standalone relays by region.
    regions: std::collections::BTreeMap<String, mesh_control::Link>,
    /// Readers feeding received frames to the data plane, by relay (`None`: the controller).
    readers: std::collections::HashMap<Option<String>, tokio::task::JoinHandle<()>>,
    /// Each peer's home relay, from the peer list.
    home: std::collections::HashMap<PublicKey, String>,
    /// Frames the readers dropped because the data plane's inbox was full.
    inbox_drops: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relays {
    /// Replaces one relay connection (`region` `None`: the controller's).
    fn set(
        &mut self,
        region: Option<String>,
        conn: Option<mesh_control::Link>,
        inbox: &mpsc::Sender<bytes::Bytes>,
    ) {
        if let Some(r) = self.readers.remove(&region) {
            r.abort();
        }
        if let Some(c) = &conn {
            let (c2, tx, drops) = (c.clone(), inbox.clone(), self.inbox_drops.clone());
            self.readers.insert(
                region.clone(),
                tokio::spawn(async move {
                    while let Ok(d) = c2.read_datagram().await {
                        // Full inbox: drop and count, as a congested link would.
                        if tx.try_send(d).is_err() {
                            drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }),
            );
        }
        match (region, conn) {
            (None, c) => self.controller = c,
            (Some(r), Some(c)) => {
                self.regions.insert(r, c);
            }
            (Some(r), None) => {
                self.regions.remove(&r);
            }
        }
    }

    fn any(&self) -> bool {
        self.controller.is_some() || !self.regions.is_empty()
    }

    /// The relay to reach `peer` by. A node listens on every relay it is connected to, so:
    /// the peer's home relay when we are connected there; for a peer homed on a standalone
    /// relay we cannot use, the nearest standalone relay (the peer is connected to those it can
    /// reach, and the controller may be the thing that is down); for a peer homed on the
    /// controller, the controller, else any.
    fn pick(&self, peer: &PublicKey) -> Option<(&str, &mesh_control::Link)> {
        let nearest = || {
            self.regions
                .iter()
                .min_by_key(|(_, c)| c.rtt())
                .map(|(n, c)| (n.as_str(), c))
        };
        let controller = || self.controller.as_ref().map(|c| (CONTROLLER_RELAY, c));
        match self.home.get(peer) {
            Some(home) => self
                .regions
                .get_key_value(home)
                .map(|(n, c)| (n.as_str(), c))
                .or_else(nearest)
                .or_else(controller),
            None => controller().or_else(nearest),
        }
    }
}

fn to_config(p: &PeerInfo) -> PeerConfig {
    PeerConfig {
        routes: p.routes.clone(),
        key: p.key,
        name: p.name.clone(),
        address: p.address,
        address6: p.address6,
        endpoints: p.endpoints.clone(),
        observed: p.observed,
        nat: p.nat,
    }
}

/// Path changes the daemon acts on outside the data plane (route configuration).
#[derive(Debug, Clone)]
pub enum PathEvent {
    /// A peer's path carries at most `mtu` bytes (inner); `configured` is the interface MTU.
    Mtu {
        /// The peer's overlay address.
        peer: std::net::Ipv4Addr,
        /// The peer's IPv6 overlay address, if it has one.
        peer6: Option<std::net::Ipv6Addr>,
        /// Path MTU.
        mtu: u16,
        /// Interface MTU.
        configured: u16,
    },
}

/// What the data plane reads and writes: the node's UDP socket, the TUN device, and the inbox
/// of the QUIC endpoint that shares the socket.
pub struct Devices {
    /// The one UDP socket.
    pub port: UdpPort,
    /// The overlay interface.
    pub tun: std::sync::Arc<Tun>,
    /// Whether it was opened with offloads.
    pub offload: bool,
    /// The UDP socket's buffers, as the kernel granted them.
    pub buffers: mesh_sys::socket::BufferSizes,
    /// Where QUIC datagrams read from the socket go.
    pub quic: QuicInbox,
}

/// How long a STUN observation waits for its answer.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the request is repeated meanwhile.
const OBSERVE_RESEND: Duration = Duration::from_millis(400);

/// A STUN observation in flight.
struct Observation {
    id: [u8; 12],
    to: SocketAddr,
    next_send: Instant,
    gives_up: Instant,
    reply: oneshot::Sender<Option<SocketAddr>>,
}

impl Observation {
    /// When it next needs the loop.
    fn deadline(&self) -> Instant {
        self.next_send.min(self.gives_up)
    }
}

/// Batches of received datagrams handled before the timers when they come due (see `run`).
const LATE_DRAIN_BATCHES: usize = 8;

/// One batch from the UDP socket: QUIC to the endpoint, the answer to a STUN observation in
/// flight to its asker, the rest to the node.
fn udp_batch(
    node: &mut Node,
    quic: &QuicInbox,
    counters: &mut DriverCounters,
    observation: &mut Option<Observation>,
    bufs: &[Vec<u8>],
    meta: &[RecvMeta],
) {
    let now = Instant::now();
    for (buf, m) in bufs.iter().zip(meta) {
        let stride = m.stride.max(1);
        for datagram in buf[..m.len].chunks(stride) {
            counters.udp_rx += 1;
            match classify(datagram) {
                DatagramKind::Quic => {
                    if !quic.deliver(m.addr, datagram) {
                        counters.quic_drops += 1;
                    }
                }
                DatagramKind::WireGuard => {
                    node.handle_datagram(Source::main(m.addr), datagram, now)
                }
                DatagramKind::Stun | DatagramKind::Unknown => {
                    if let Some(seen) = answer_to(observation.as_ref(), m.addr, datagram) {
                        if let Some(o) = observation.take() {
                            let _ = o.reply.send(Some(seen));
                        }
                        continue;
                    }
                    counters.unknown_datagrams += 1;
                    // The node counts it as malformed too; kept in one place.
                    node.handle_datagram(Source::main(m.addr), datagram, now);
                }
            }
        }
    }
}

/// What the observation in flight was told, if `datagram` from `from` is its answer.
fn answer_to(
    observation: Option<&Observation>,
    from: SocketAddr,
    datagram: &[u8],
) -> Option<SocketAddr> {
    let o = observation.filter(|o| o.to == from)?;
    let (id, seen) = mesh_proto::stun::parse_answer(datagram)?;
    (id == o.id).then_some(seen)
}

/// One datagram from an extra (birthday) socket, to the node.
fn extra_datagram(node: &mut Node, counters: &mut DriverCounters, d: ExtraDatagram) {
    counters.extra_rx += 1;
    let (socket, from, datagram) = d;
    node.handle_datagram(Source::Udp { socket, from }, &datagram, Instant::now());
}

/// One datagram from a relay connection: reassembled, then to the node.
fn relay_datagram(
    node: &mut Node,
    link: &mut Framer,
    counters: &mut DriverCounters,
    d: &bytes::Bytes,
) {
    let now = Instant::now();
    counters.relay_rx += 1;
    match link.receive(d, now) {
        Ok(Some((from, msg))) => node.handle_datagram(Source::Relay { from }, &msg, now),
        Ok(None) => {}
        Err(_) => counters.relay_drops += 1,
    }
}

/// Runs the data plane until `shutdown` flips.
pub async fn run(
    mut node: Node,
    devices: Devices,
    mut cmds: mpsc::Receiver<DataCmd>,
    events: mpsc::UnboundedSender<PathEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Devices {
        port,
        tun,
        quic,
        offload,
        buffers,
    } = devices;
    let mut counters = DriverCounters {
        tun_offload: u64::from(offload),
        udp_recv_buffer: buffers.recv as u64,
        udp_send_buffer: buffers.send as u64,
        udp_buffers_refused: buffers.short_of(mesh_sys::socket::SOCKET_BUFFER) as u64,
        ..Default::default()
    };
    // Decrypted packets come behind room for the virtio-net header the writer puts there, so
    // they go to the TUN device in the buffer they were opened into.
    node.set_tun_headroom(mesh_sys::tun::VIRTIO_NET_HDR_LEN);
    let mut tio = TunIo::new();
    let (written_tx, mut written) = mpsc::unbounded_channel::<Written>();
    // Bounded by the datagrams in it (`udp_pending`), not by its length.
    let (udp_jobs, udp_queue) = mpsc::unbounded_channel();
    let mut udp_pending: usize = 0;
    let sealer = Sealer::start(udp_jobs.clone());
    node.set_deferred_sealing(sealer.is_some());
    counters.seal_thread = u64::from(sealer.is_some());
    let (opened_tx, mut opened) = mpsc::unbounded_channel::<Opened>();
    let opener = Opener::start(opened_tx);
    node.set_deferred_opening(opener.is_some());
    counters.open_thread = u64::from(opener.is_some());
    let (tun_jobs, tun_queue) = mpsc::channel(TUN_WRITE_QUEUE);
    tokio::spawn(udp_writer(port.clone(), udp_queue, written_tx.clone()));
    counters.tun_write_thread = u64::from(start_tun_writer(tun_writer(
        tun.clone(),
        tun_queue,
        written_tx,
    )));
    let mut recv_bufs = zeroed_buffers(RECV_BATCH, RECV_BUF);
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let far = Duration::from_secs(3600);
    let mut relays = Relays::default();
    let mut extra = ExtraSockets::default();
    let (extra_in_tx, mut extra_in) = mpsc::channel::<ExtraDatagram>(EXTRA_INBOX);
    let (relay_in_tx, mut relay_in) = mpsc::channel::<bytes::Bytes>(RELAY_INBOX);
    let mut relay_link = Framer::default();
    let mut relay_tails = RelayTails::default();
    let mut pings: Vec<PendingPing> = Vec::new();
    // The last peer list, applied again when the excluded destinations change.
    let mut configs: Vec<PeerConfig> = Vec::new();
    // What the overlay reaches: the daemon's view (both families), and the IPv6 overlay
    // prefix (also in the view once it is on mesh0; here from the start).
    let mut excluded_view: Vec<ipnet::IpNet> = Vec::new();
    let mut overlay6: Option<ipnet::Ipv6Net> = None;
    let excluded = |view: &[ipnet::IpNet], v6: Option<ipnet::Ipv6Net>| -> Vec<ipnet::IpNet> {
        let mut all = view.to_vec();
        if let Some(p) = v6.map(ipnet::IpNet::from).filter(|p| !all.contains(p)) {
            all.push(p);
        }
        all
    };
    // Birthday punching is on (the node's default) until the controller says there is no NAT.
    let mut punching = true;
    // The network's birthday budget, as the controller last said.
    let mut budget: Option<u16> = None;
    let mut observation: Option<Observation> = None;
    loop {
        let mut deadline = node.poll_timeout().unwrap_or_else(|| Instant::now() + far);
        if let Some(first) = pings.iter().map(|p| p.1).min() {
            deadline = deadline.min(first);
        }
        if let Some(o) = &observation {
            deadline = deadline.min(o.deadline());
        }
        tokio::select! {
            Some(o) = opened.recv() => {
                node.handle_opened(o);
                while let Ok(o) = opened.try_recv() {
                    node.handle_opened(o);
                }
            }
            Some(w) = written.recv() => {
                finished(&mut node, &mut tio, &mut counters, &mut udp_pending, w);
                while let Ok(w) = written.try_recv() {
                    finished(&mut node, &mut tio, &mut counters, &mut udp_pending, w);
                }
            }
            Some(d) = extra_in.recv() => extra_datagram(&mut node, &mut counters, d),
            Some(d) = relay_in.recv() => {
                relay_datagram(&mut node, &mut relay_link, &mut counters, &d);
            }
            r = async {
                let mut slices: Vec<IoSliceMut<'_>> =
                    recv_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                port.recv(&mut slices, &mut meta).await
            } => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                udp_batch(&mut node, &quic, &mut counters, &mut observation, &recv_bufs, &meta[..n]);
            }
            r = tun.recv_multiple(&mut tio.original, &mut tio.bufs, &mut tio.sizes, 0) => {
                let now = Instant::now();
                match r {
                    Ok(n) => {
                        let mut packets = tio.handle(&mut node, &mut counters, n, now);
                        // Drain what else is waiting, so sends can be batched.
                        while packets < TUN_BATCH {
                            let more = tun
                                .recv_multiple(&mut tio.original, &mut tio.bufs, &mut tio.sizes, 0)
                                .now_or_never();
                            match more {
                                Some(Ok(n)) => packets += tio.handle(&mut node, &mut counters, n, now),
                                Some(Err(e)) if e.raw_os_error().is_none() => {
                                    counters.tun_read_drops += 1;
                                    debug!(error = %e, "TUN packet not taken apart");
                                }
                                _ => break,
                            }
                        }
                    }
                    // Not the system's error but the offload header's: that packet is lost.
                    Err(e) if e.raw_os_error().is_none() => {
                        counters.tun_read_drops += 1;
                        debug!(error = %e, "TUN packet not taken apart");
                    }
                    Err(e) => {
                        warn!(error = %e, "TUN read failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                tracing::trace!(timer = ?node.next_timer().map(|t| t.1), "node timers due");
                // What arrived before the deadline goes first. When the agent itself ran late
                // (a node at 100 % CPU), the answers to what it sent wait in the socket, and
                // timers run before them would take a path that works for dead.
                for _ in 0..LATE_DRAIN_BATCHES {
                    let mut slices: Vec<IoSliceMut<'_>> =
                        recv_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    match port.try_recv(&mut slices, &mut meta) {
                        Ok(n) => udp_batch(&mut node, &quic, &mut counters, &mut observation, &recv_bufs, &meta[..n]),
                        Err(_) => break,
                    }
                }
                while let Ok(d) = extra_in.try_recv() {
                    extra_datagram(&mut node, &mut counters, d);
                }
                while let Ok(d) = relay_in.try_recv() {
                    relay_datagram(&mut node, &mut relay_link, &mut counters, &d);
                }
                // So do the batches at the opening thread (the node takes the rest of what
                // came before the timers).
                take_back_opened(&mut node, &mut opened, 0).await;
                node.handle_timeout(Instant::now());
            }
            cmd = cmds.recv() => match cmd {
                Some(DataCmd::SetPeers(peers)) => {
                    relays.home = peers
                        .iter()
                        .filter_map(|p| Some((p.key, p.relay.clone()?)))
                        .collect();
                    configs = peers.iter().map(to_config).collect();
                    node.set_peers(&configs, Instant::now());
                }
                Some(DataCmd::Nat { natted, kind }) => {
                    if natted != punching {
                        punching = natted;
                        if natted {
                            node.set_birthday(Some(birthday_config(budget)));
                        } else {
                            tracing::info!("the controller sees this node at its own address (no NAT): no birthday punching from here");
                            node.set_birthday(None);
                        }
                    }
                    node.set_nat(kind);
                }
                Some(DataCmd::BirthdayBudget(b)) => {
                    if b != budget {
                        budget = b;
                        tracing::info!(attempts = birthday_config(budget).attempts, "birthday budget per 10 minutes (the network's setting)");
                        if punching {
                            node.set_birthday(Some(birthday_config(budget)));
                        }
                    }
                }
                Some(DataCmd::Observe(to, reply)) => {
                    let now = Instant::now();
                    let id: [u8; 12] = rand::random();
                    // A newer request replaces one in flight (its asker hears `None`).
                    observation = Some(Observation {
                        id,
                        to,
                        next_send: now,
                        gives_up: now + OBSERVE_TIMEOUT,
                        reply,
                    });
                }
                Some(DataCmd::SetRoutes(routes)) => {
                    node.set_routes(routes);
                }
                Some(DataCmd::SetExcluded(view)) => {
                    excluded_view = view;
                    node.set_excluded(excluded(&excluded_view, overlay6));
                    // Candidates refused before may be fine now (an interface went away).
                    node.set_peers(&configs, Instant::now());
                }
                Some(DataCmd::SetAddress(a)) => node.set_address(a),
                Some(DataCmd::SetAddress6(v6)) => {
                    node.set_address6(v6.map(|(a, _)| a));
                    overlay6 = v6.map(|(_, p)| p);
                    node.set_excluded(excluded(&excluded_view, overlay6));
                }
                Some(DataCmd::Relay(conn)) => {
                    relays.set(None, conn, &relay_in_tx);
                    node.set_relay(relays.any(), Instant::now());
                }
                Some(DataCmd::RelayRegion(region, conn)) => {
                    relays.set(Some(region), conn, &relay_in_tx);
                    node.set_relay(relays.any(), Instant::now());
                }
                Some(DataCmd::Ping(key, reply)) => {
                    let now = Instant::now();
                    if node.ping(&key, now) {
                        pings.push((key, now + PING_TIMEOUT, reply));
                    } else {
                        let _ = reply.send(Err("no session with that peer yet; a handshake was started now: try again in a second (if it still fails, the peer is offline or unreachable)".into()));
                    }
                }
                Some(DataCmd::Status(reply)) => {
                    let status = node.status(Instant::now());
                    let relay_of = status
                        .peers
                        .iter()
                        .filter_map(|p| Some((p.key, relays.pick(&p.key)?.0.to_owned())))
                        .collect();
                    counters.relay_reassembly_drops = relay_link.dropped();
                    counters.relay_inbox_drops = relays
                        .inbox_drops
                        .load(std::sync::atomic::Ordering::Relaxed);
                    counters.extra_inbox_drops = extra
                        .inbox_drops
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let _ = reply.send(DataStatus {
                        peers: status.peers,
                        node: status.counters,
                        driver: counters,
                        birthday: status.birthday,
                        relay_of,
                    });
                }
                None => return,
            },
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pings.len() {
            if pings[i].1 <= now {
                let (_, _, reply) = pings.swap_remove(i);
                let _ = reply.send(Err(format!("no answer within {}s", PING_TIMEOUT.as_secs())));
            } else {
                i += 1;
            }
        }
        if observation.as_ref().is_some_and(|o| o.gives_up <= now) {
            if let Some(o) = observation.take() {
                let _ = o.reply.send(None);
            }
        }
        if let Some(o) = observation.as_mut().filter(|o| o.next_send <= now) {
            o.next_send = now + OBSERVE_RESEND;
            let request = mesh_proto::stun::request(o.id);
            let batch = Batch {
                dst: o.to,
                contents: &request,
                segment_size: None,
            };
            if let Err(e) = port.send(&batch).await {
                tracing::debug!(to = %o.to, error = %e, "STUN request not sent");
            }
        }
        // Sends the loop may make itself this drain (see `send_inline`).
        let mut inline_budget = INLINE_SENDS;
        while let Some(output) = node.poll_output() {
            // Only batches for the main socket go to the sealing thread; anything else the
            // node left unsealed (for a birthday socket) is sealed here.
            let output = match output {
                Output::Unsealed(u)
                    if sealer.is_none()
                        || !matches!(
                            u.destination(),
                            Destination::Udp {
                                socket: SocketId::MAIN,
                                ..
                            }
                        ) =>
                {
                    Output::Transmit(u.seal())
                }
                other => other,
            };
            match output {
                Output::Event(ev) => on_event(
                    ev,
                    &node,
                    &mut extra,
                    &extra_in_tx,
                    &mut pings,
                    &events,
                    &mut counters,
                ),
                Output::Unsealed(u) => {
                    let (Destination::Udp { dst, .. }, Some(sealer)) = (u.destination(), &sealer)
                    else {
                        unreachable!("only batches for the sealing thread are left unsealed");
                    };
                    // To the sealing thread, which passes it on to the writer; a full queue
                    // drops the batch (see the module docs).
                    let datagrams = u.datagrams();
                    if udp_pending + datagrams > UDP_PENDING {
                        counters.udp_queue_drops += datagrams as u64;
                        node.recycle(u.into_buffer());
                    } else if let Err(back) = sealer.seal(dst, u) {
                        node.recycle(back);
                    } else {
                        udp_pending += datagrams;
                        counters.sealed_off_loop += datagrams as u64;
                    }
                }
                Output::Unopened(u) => {
                    // To the opening thread, back through `opened`; without it, here.
                    if opener.is_some() {
                        take_back_opened(&mut node, &mut opened, OPEN_PENDING).await;
                    }
                    let datagrams = u.datagrams();
                    let back = match &opener {
                        Some(o) => o.open(u).err(),
                        None => Some(u),
                    };
                    match back {
                        None => counters.opened_off_loop += datagrams as u64,
                        Some(u) => node.handle_opened(u.open()),
                    }
                }
                Output::Transmit(t) => {
                    match t.destination {
                        Destination::Udp {
                            socket: SocketId::MAIN,
                            dst,
                        } => {
                            if udp_pending == 0 && inline_budget > 0 {
                                inline_budget -= 1;
                                if send_inline(&port, dst, &t, &mut counters).is_some() {
                                    node.recycle(t.contents);
                                    continue;
                                }
                            }
                            // To the writer; a full queue drops the batch (see the module docs).
                            // Behind batches still at the sealing thread, it goes that way too,
                            // so that the datagrams of a flow leave in order.
                            let datagrams = t.datagrams();
                            if udp_pending + datagrams > UDP_PENDING {
                                counters.udp_queue_drops += datagrams as u64;
                                node.recycle(t.contents);
                                continue;
                            }
                            let queued = match &sealer {
                                Some(sealer) if sealer.busy() => sealer.pass(dst, t),
                                _ => udp_jobs.send((dst, t)).map_err(|e| e.0 .1.contents),
                            };
                            match queued {
                                Ok(()) => udp_pending += datagrams,
                                Err(back) => node.recycle(back),
                            }
                            continue;
                        }
                        _ => send_other(
                            &t,
                            &extra,
                            &relays,
                            &mut relay_link,
                            &mut relay_tails,
                            &mut counters,
                        ),
                    }
                    node.recycle(t.contents);
                }
                Output::Tun(pkt) => {
                    if tio.out.len() < TUN_PENDING {
                        tio.out.push(TunPacket(pkt));
                    } else {
                        counters.tun_queue_drops += 1;
                        node.recycle(pkt);
                    }
                    if tio.out.len() >= mesh_sys::tun::IDEAL_BATCH_SIZE {
                        tio.flush(&tun_jobs);
                    }
                }
            }
        }
        if !tio.write_inline(&tun, &mut node, &mut counters) {
            tio.flush(&tun_jobs);
        }
        relay_tails.flush(&mut counters);
    }
}

/// Most sends the loop makes itself in one drain while the UDP writer is idle.
const INLINE_SENDS: usize = 4;

/// Sends a lone datagram from the loop itself, if the socket takes it at once: `Some` when it
/// is done with (sent, or failed and counted), `None` when it must go to the writer (a GSO
/// batch or a primer, or a full socket buffer).
///
/// Only called while the writer has nothing queued, so order is kept. Handing a single
/// datagram to the writer task costs a wake-up of the other thread, which is most of what an
/// idle ping pays over the plain path in each direction; bulk traffic (GSO batches) still goes
/// to the writer, so encryption and the system calls of sending still overlap.
fn send_inline(
    port: &UdpPort,
    dst: SocketAddr,
    t: &Transmit,
    counters: &mut DriverCounters,
) -> Option<()> {
    if t.segment_size.is_some() || t.ttl.is_some() {
        return None;
    }
    let batch = Batch {
        dst,
        contents: &t.contents,
        segment_size: None,
    };
    match port.try_send(&batch) {
        Ok(()) => {
            counters.udp_tx += 1;
            counters.udp_inline += 1;
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
        Err(e) => {
            counters.udp_send_errors += 1;
            debug!(%dst, error = %e, "UDP send failed");
        }
    }
    Some(())
}

/// The TUN device's buffers: one for a read (a super-packet with its virtio-net header), the
/// packets it splits into, and the packets waiting to be written, each behind room for the
/// virtio-net header that the node left when it opened them (written as a batch by
/// [`TunIo::flush`], coalescing TCP segments of one flow where the device has offloads).
struct TunIo {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets waiting to be written: the node's buffers, opened behind the header's room
    /// (each grows to a super-packet if the writer coalesces a flow into it).
    out: Vec<TunPacket>,
    /// Emptied batch vectors back from the writer, for the next [`TunIo::out`].
    batches: Vec<Vec<TunPacket>>,
    /// Batches the writer has not handed back yet.
    in_flight: usize,
}

impl TunIo {
    fn new() -> TunIo {
        TunIo {
            original: vec![0; mesh_sys::tun::VIRTIO_NET_HDR_LEN + 65535],
            bufs: zeroed_buffers(mesh_sys::tun::IDEAL_BATCH_SIZE, TUN_PACKET_BUF),
            sizes: vec![0; mesh_sys::tun::IDEAL_BATCH_SIZE],
            out: Vec::with_capacity(mesh_sys::tun::IDEAL_BATCH_SIZE),
            batches: Vec::new(),
            in_flight: 0,
        }
    }

    /// Hands the `n` packets of the last read to the node; returns `n`.
    fn handle(
        &self,
        node: &mut Node,
        counters: &mut DriverCounters,
        n: usize,
        now: Instant,
    ) -> usize {
        counters.tun_reads += 1;
        for (buf, &len) in self.bufs.iter().zip(&self.sizes).take(n) {
            counters.tun_rx += 1;
            node.handle_tun_packet(&buf[..len], now);
        }
        n
    }

    /// Hands the queued packets to the TUN writer as one batch; while its queue is full they
    /// stay queued (the writer hands a batch back, which wakes the loop to try again).
    fn flush(&mut self, jobs: &mpsc::Sender<Vec<TunPacket>>) {
        if self.out.is_empty() {
            return;
        }
        let permit = match jobs.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => return,
            Err(mpsc::error::TrySendError::Closed(())) => {
                // The writer is gone (shutting down): nothing more will be written.
                self.out.clear();
                return;
            }
        };
        let next = self
            .batches
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(mesh_sys::tun::IDEAL_BATCH_SIZE));
        permit.send(std::mem::replace(&mut self.out, next));
        self.in_flight += 1;
    }

    /// Writes a lone queued packet from the loop itself while the writer is idle (order is
    /// kept), if the device takes it at once: true when it is done with (written, or failed
    /// and counted). As with [`send_inline`], the writer's wake-up is what a ping would pay.
    fn write_inline(&mut self, tun: &Tun, node: &mut Node, counters: &mut DriverCounters) -> bool {
        if self.out.len() != 1 || self.in_flight > 0 {
            return false;
        }
        // With the virtio-net header the zeroed room in front is the header (no offload asked
        // of the kernel); without it, the packet starts after the room.
        let start = if tun.tcp_gso() {
            0
        } else {
            mesh_sys::tun::VIRTIO_NET_HDR_LEN
        };
        let packet = &self.out[0].0;
        match tun.try_send(packet.get(start..).unwrap_or_default()) {
            Ok(_) => {
                counters.tun_tx += 1;
                counters.tun_inline += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                debug!(error = %e, "TUN write failed");
                counters.tun_write_errors += 1;
            }
        }
        if let Some(p) = self.out.pop() {
            node.recycle(p.0);
        }
        true
    }

    /// Gives the buffers of a written batch back to the node, which opens the next packets
    /// into them (and seals GSO batches into those that coalescing grew to a super-packet).
    fn take_back(&mut self, node: &mut Node, mut batch: Vec<TunPacket>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        for b in batch.drain(..) {
            node.recycle(b.0);
        }
        if self.batches.len() < TUN_WRITE_QUEUE {
            self.batches.push(batch);
        }
    }
}

/// What a writer task hands back once it has written a batch: the buffers, and how it went.
enum Written {
    /// A transmit on the main UDP socket: its buffer, the datagrams it held, datagrams sent,
    /// failed send calls.
    Udp {
        contents: Vec<u8>,
        datagrams: usize,
        sent: u64,
        errors: u64,
    },
    /// A batch of TUN packets: the buffers, packets written, failed writes.
    Tun {
        batch: Vec<TunPacket>,
        written: u64,
        errors: u64,
    },
}

/// Counts a finished write and takes its buffers back.
fn finished(
    node: &mut Node,
    tio: &mut TunIo,
    counters: &mut DriverCounters,
    udp_pending: &mut usize,
    w: Written,
) {
    match w {
        Written::Udp {
            contents,
            datagrams,
            sent,
            errors,
        } => {
            *udp_pending = udp_pending.saturating_sub(datagrams);
            counters.udp_tx += sent;
            counters.udp_send_errors += errors;
            node.recycle(contents);
        }
        Written::Tun {
            batch,
            written,
            errors,
        } => {
            counters.tun_tx += written;
            counters.tun_write_errors += errors;
            tio.take_back(node, batch);
        }
    }
}

/// Sends a transmit that is not for the main socket, from the loop: on a birthday socket, or
/// framed for the relay.
fn send_other(
    t: &Transmit,
    extra: &ExtraSockets,
    relays: &Relays,
    relay_link: &mut Framer,
    relay_tails: &mut RelayTails,
    counters: &mut DriverCounters,
) {
    match t.destination {
        Destination::Udp { socket, dst } => {
            let sent = extra.send(socket, dst, t);
            counters.extra_tx += sent as u64;
            counters.udp_send_errors += (t.datagrams() - sent) as u64;
        }
        Destination::Relay { to } => {
            send_relayed(relays, relay_link, relay_tails, to, &t.contents, counters)
        }
    }
}

/// What the sealing thread is asked to do, in order.
enum SealJob {
    /// Seal the batch, then queue it for the writer.
    Seal(SocketAddr, Unsealed),
    /// Queue this sealed transmit for the writer behind the batches before it.
    Pass(SocketAddr, Transmit),
}

/// The sealing thread: encrypts the node's batches for the main socket ([`Output::Unsealed`])
/// on a core of its own and queues them for the UDP writer, in the order it got them. The loop
/// decides everything (paths, sessions, each message's counter) and decrypts; the thread only
/// encrypts. A transmit the node sealed itself goes to the writer straight, unless batches are
/// still at the thread: then it follows them through it, so nothing overtakes.
///
/// Started only where the machine has more than one core and `MESH_SEAL_THREAD` is not `0`.
struct Sealer {
    jobs: std::sync::mpsc::Sender<SealJob>,
    /// Jobs sent and not yet handed to the writer.
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether the agent may use only one core: then the data plane's threads (sealing, opening,
/// TUN writes) would only take turns with the loop, and the loop does their work itself.
fn one_core() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) < 2
}

/// Turns the sealing thread off (`0`).
const SEAL_THREAD_ENV: &str = "MESH_SEAL_THREAD";

impl Sealer {
    fn start(writer: mpsc::UnboundedSender<(SocketAddr, Transmit)>) -> Option<Sealer> {
        if std::env::var(SEAL_THREAD_ENV).is_ok_and(|v| v == "0") {
            tracing::info!("{SEAL_THREAD_ENV}=0: the data plane's loop encrypts everything itself");
            return None;
        }
        if one_core() {
            tracing::info!("one core: the data plane's loop encrypts everything itself");
            return None;
        }
        let (jobs, rx) = std::sync::mpsc::channel::<SealJob>();
        let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("mesh-seal".into())
            .spawn(move || {
                // Ends when the loop drops its sender.
                while let Ok(job) = rx.recv() {
                    let t = match job {
                        SealJob::Seal(dst, u) => (dst, u.seal()),
                        SealJob::Pass(dst, t) => (dst, t),
                    };
                    // The writer is gone only when the loop is: nothing to give back to.
                    let _ = writer.send(t);
                    count.fetch_sub(1, std::sync::atomic::Ordering::Release);
                }
            });
        match spawned {
            Ok(_) => Some(Sealer { jobs, in_flight }),
            Err(e) => {
                warn!(error = %e, "no sealing thread: the data plane's loop encrypts everything itself");
                None
            }
        }
    }

    /// Whether jobs are still at the thread (a transmit sent now must follow them).
    fn busy(&self) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Hands a batch over; its buffer back if the thread is gone.
    fn seal(&self, dst: SocketAddr, u: Unsealed) -> Result<(), Vec<u8>> {
        self.send(SealJob::Seal(dst, u))
    }

    /// Queues a sealed transmit behind the batches at the thread.
    fn pass(&self, dst: SocketAddr, t: Transmit) -> Result<(), Vec<u8>> {
        self.send(SealJob::Pass(dst, t))
    }

    fn send(&self, job: SealJob) -> Result<(), Vec<u8>> {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.jobs.send(job).map_err(|e| {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            match e.0 {
                SealJob::Seal(_, u) => u.into_buffer(),
                SealJob::Pass(_, t) => t.contents,
            }
        })
    }
}

/// The opening thread: decrypts the batches of data messages the node set aside
/// ([`Output::Unopened`]) on a core of its own and gives them back to the loop, in the order it
/// got them. The loop does the rest (the replay window, timers, paths, source checks, the TUN
/// writes) in the order the messages came; a lone message the node opens itself.
///
/// Off unless `MESH_OPEN_THREAD=1`, and only where the machine has more than one core: on the
/// two cores this was measured on (both ends of a bench on one machine) the thread's two
/// wake-ups per batch cost more than the decryption it takes off the loop (benches/README.md).
struct Opener {
    jobs: std::sync::mpsc::Sender<Unopened>,
}

/// Turns the opening thread on (`1`).
const OPEN_THREAD_ENV: &str = "MESH_OPEN_THREAD";

impl Opener {
    fn start(back: mpsc::UnboundedSender<Opened>) -> Option<Opener> {
        if std::env::var(OPEN_THREAD_ENV).map_or(true, |v| v != "1") {
            return None;
        }
        if one_core() {
            tracing::info!("{OPEN_THREAD_ENV}=1 but one core: the data plane's loop decrypts everything itself");
            return None;
        }
        let (jobs, rx) = std::sync::mpsc::channel::<Unopened>();
        let spawned = std::thread::Builder::new()
            .name("mesh-open".into())
            .spawn(move || {
                // Ends when the loop drops its sender (or its receiver: nothing to give to).
                while let Ok(u) = rx.recv() {
                    if back.send(u.open()).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => {
                // (`mesh status` says so; a log line would stand beside a failed join's error.)
                debug!(
                    "{OPEN_THREAD_ENV}=1: batches received are decrypted on a thread of their own"
                );
                Some(Opener { jobs })
            }
            Err(e) => {
                warn!(error = %e, "no opening thread: the data plane's loop decrypts everything itself");
                None
            }
        }
    }

    /// Hands a batch over; the batch back if the thread is gone.
    fn open(&self, u: Unopened) -> Result<(), Unopened> {
        self.jobs.send(u).map_err(|e| e.0)
    }
}

/// Waits for the opening thread's batches, oldest first, and gives them back to the node until
/// at most `left` are still out (or the thread is gone).
async fn take_back_opened(
    node: &mut Node,
    opened: &mut mpsc::UnboundedReceiver<Opened>,
    left: usize,
) {
    while node.unopened_at_driver() > left {
        match opened.recv().await {
            Some(o) => node.handle_opened(o),
            None => return,
        }
    }
}

/// Sends the transmits queued for the main UDP socket, in order, until the loop goes away.
async fn udp_writer(
    port: UdpPort,
    mut jobs: mpsc::UnboundedReceiver<(SocketAddr, Transmit)>,
    done: mpsc::UnboundedSender<Written>,
) {
    while let Some((dst, t)) = jobs.recv().await {
        let mut c = DriverCounters::default();
        send_udp(&port, dst, &t, &mut c).await;
        let w = Written::Udp {
            datagrams: t.datagrams(),
            contents: t.contents,
            sent: c.udp_tx,
            errors: c.udp_send_errors,
        };
        if done.send(w).is_err() {
            return;
        }
    }
}

/// Keeps the TUN writer a task of the runtime (`0`).
const TUN_THREAD_ENV: &str = "MESH_TUN_THREAD";

/// Runs the TUN writer on a thread of its own (`mesh-tun-write`, a runtime of one thread;
/// the device stays registered with the agent's runtime) where the machine has more than one
/// core and `MESH_TUN_THREAD` is not `0`, else as a task: true for the thread.
///
/// A write to mesh0 is where the kernel delivers the packets to their socket (the TCP receive
/// path of the application behind mesh0 runs in that call), so on a task it took a runtime
/// worker from the loop for as long; on a thread the kernel schedules it beside both.
/// Measured on 2 cores: four TCP streams 4-11 % faster, one stream within the noise, 3-8 %
/// more CPU per GB (benches/README.md).
fn start_tun_writer(writer: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    if one_core() || std::env::var(TUN_THREAD_ENV).is_ok_and(|v| v == "0") {
        tokio::spawn(writer);
        return false;
    }
    // Handed over through a slot, so that a thread that cannot start leaves it to a task.
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(writer)));
    let taken = slot.clone();
    let agent = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("mesh-tun-write".into())
        .spawn(move || {
            let Some(writer) = taken.lock().ok().and_then(|mut w| w.take()) else {
                return;
            };
            match tokio::runtime::Builder::new_current_thread().build() {
                Ok(runtime) => runtime.block_on(writer),
                Err(e) => {
                    warn!(error = %e, "no runtime for the TUN writer's thread: it runs as a task");
                    agent.spawn(writer);
                }
            }
        });
    match spawned {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "no thread for TUN writes: the writer runs as a task");
            if let Some(writer) = slot.lock().ok().and_then(|mut w| w.take()) {
                tokio::spawn(writer);
            }
            false
        }
    }
}

/// Writes the packet batches queued for the TUN device, in order, coalescing TCP segments of
/// one flow where the device has offloads (into large buffers it keeps for the flows' first
/// packets, [`mesh_sys::tun::Heads`]), until the loop goes away.
async fn tun_writer(
    tun: std::sync::Arc<Tun>,
    mut jobs: mpsc::Receiver<Vec<TunPacket>>,
    done: mpsc::UnboundedSender<Written>,
) {
    let mut gro = mesh_sys::tun::GROTable::default();
    let mut heads = mesh_sys::tun::Heads::default();
    let offset = mesh_sys::tun::VIRTIO_NET_HDR_LEN;
    // Without offloads every packet is a write of its own: no flow head to give a large buffer.
    let coalesces = tun.tcp_gso();
    while let Some(mut batch) = jobs.recv().await {
        let packets = batch.len() as u64;
        if coalesces {
            heads.prepare(&mut batch, offset);
        }
        let sent = tun.send_multiple(&mut gro, &mut batch, offset).await;
        if coalesces {
            heads.restore(&mut batch);
        }
        let (written, errors) = match sent {
            Ok(_) => (packets, 0),
            Err(e) => {
                debug!(error = %e, "TUN write failed");
                (0, 1)
            }
        };
        if done
            .send(Written::Tun {
                batch,
                written,
                errors,
            })
            .is_err()
        {
            return;
        }
    }
}

/// `count` zeroed buffers of `len` bytes, each allocated zeroed on its own: memory the
/// allocator hands out zeroed is only touched (and resident) once packets fill it, where
/// `vec![vec![0; len]; count]` copies the first buffer into every other one and so makes all
/// of them resident at once (3 MB of an idle agent's memory).
fn zeroed_buffers(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|_| vec![0u8; len]).collect()
}

/// Birthday punching's sizes with the network's budget (`None`: the node's default).
fn birthday_config(budget: Option<u16>) -> mesh_core::BirthdayConfig {
    let default = mesh_core::BirthdayConfig::default();
    mesh_core::BirthdayConfig {
        attempts: budget.unwrap_or(default.attempts),
        ..default
    }
}

/// Carries out one of the node's events: extra sockets open and close, answers to pings go to
/// whoever asked, path MTU results go to the daemon.
fn on_event(
    ev: Event,
    node: &Node,
    extra: &mut ExtraSockets,
    extra_in: &mpsc::Sender<ExtraDatagram>,
    pings: &mut Vec<PendingPing>,
    events: &mpsc::UnboundedSender<PathEvent>,
    counters: &mut DriverCounters,
) {
    match ev {
        Event::OpenSocket(id) => {
            if let Err(e) = extra.open(id, extra_in) {
                counters.extra_socket_errors += 1;
                debug!(socket = %id, error = %e, "cannot open an extra socket");
            }
            counters.extra_sockets = extra.open.len() as u64;
            return;
        }
        Event::CloseSocket(id) => {
            extra.close(id);
            counters.extra_sockets = extra.open.len() as u64;
            return;
        }
        _ => {}
    }
    debug!(?ev, "node event");
    match ev {
        Event::Pong { key, rtt, path } => {
            if let Some(pos) = pings.iter().position(|p| p.0 == key) {
                let (_, _, reply) = pings.swap_remove(pos);
                let _ = reply.send(Ok((path, rtt)));
            }
        }
        Event::PathChanged { key, path } => {
            let name = node.peer_name(&key).unwrap_or("?");
            tracing::info!(peer = %name, key = %key.short(), %path, "path changed");
        }
        Event::PathMtu {
            address,
            address6,
            mtu,
            configured,
            ..
        } => {
            let _ = events.send(PathEvent::Mtu {
                peer: address,
                peer6: address6,
                mtu,
                configured,
            });
        }
        _ => {}
    }
}

/// Sends a transmit on the main socket: one datagram, or the node's GSO batch, split where the
/// socket takes fewer segments per call.
async fn send_udp(
    port: &UdpPort,
    dst: std::net::SocketAddr,
    t: &Transmit,
    counters: &mut DriverCounters,
) {
    if let Some(ttl) = t.ttl {
        // A primer: one datagram that must die past our gateway.
        match port.send_with_ttl(dst, &t.contents, ttl).await {
            Ok(()) => counters.udp_tx += 1,
            Err(e) => {
                counters.udp_send_errors += 1;
                debug!(%dst, ttl, error = %e, "UDP send failed");
            }
        }
        return;
    }
    let per_call = match t.segment_size {
        Some(size) => {
            size * port
                .max_gso_segments()
                .max(1)
                .min(MAX_BATCH_BYTES / size.max(1))
        }
        None => t.contents.len(),
    };
    for chunk in t.contents.chunks(per_call.max(1)) {
        let segment_size = t.segment_size.filter(|s| chunk.len() > *s);
        let datagrams = segment_size.map_or(1, |s| chunk.len().div_ceil(s)) as u64;
        let batch = Batch {
            dst,
            contents: chunk,
            segment_size,
        };
        match port.send(&batch).await {
            Ok(()) => counters.udp_tx += datagrams,
            Err(e) => {
                counters.udp_send_errors += 1;
                debug!(%dst, error = %e, "UDP send failed");
            }
        }
    }
}

/// Messages whose later fragments [`RelayTails`] holds back at most: the receiver keeps up to
/// [`mesh_proto::relay::MAX_PENDING_PER_SENDER`] incomplete messages of one sender, so this
/// stays well under it.
const RELAY_TAIL_BATCH: usize = 16;

/// The later fragments of relayed messages, held back until the end of the drain.
///
/// A full-size WireGuard message (1452 bytes) does not fit one QUIC datagram on a 1500-byte
/// path: its first fragment fills a QUIC packet and the rest is a few dozen bytes. Sent in
/// order, every message costs two QUIC packets. Sending the first fragments of a run of
/// messages first and their tails after lets QUIC put a dozen tails in one packet (it packs
/// queued datagrams while they fit), and keeps the full packets the same size for one GSO
/// send. The receiver reassembles in any order; each message is whole when its tail arrives,
/// so messages still complete in the order they were sent.
#[derive(Default)]
struct RelayTails {
    held: Vec<(mesh_control::Link, bytes::Bytes)>,
    messages: usize,
}

impl RelayTails {
    /// Sends what is held back.
    fn flush(&mut self, counters: &mut DriverCounters) {
        for (conn, f) in self.held.drain(..) {
            send_frame(&conn, f, counters);
        }
        self.messages = 0;
    }
}

/// Sends one relay frame and counts it as sent or dropped.
fn send_frame(conn: &mesh_control::Link, frame: bytes::Bytes, counters: &mut DriverCounters) {
    if conn.send_datagram(frame).is_ok() {
        counters.relay_tx += 1;
    } else {
        counters.relay_drops += 1;
    }
}

/// Frames a WireGuard message for the relay that reaches `to` and sends its first datagram;
/// the others wait in `tails` (see [`RelayTails`]).
fn send_relayed(
    relays: &Relays,
    link: &mut Framer,
    tails: &mut RelayTails,
    to: PublicKey,
    message: &[u8],
    counters: &mut DriverCounters,
) {
    let Some((_, conn)) = relays.pick(&to) else {
        counters.relay_drops += 1;
        return;
    };
    let max = conn.max_datagram_size().unwrap_or(0);
    let Ok(frames) = link.frame(&to, message, max) else {
        counters.relay_drops += 1;
        return;
    };
    let mut frames = frames.into_iter();
    if let Some(first) = frames.next() {
        send_frame(conn, first.into(), counters);
    }
    let before = tails.held.len();
    tails
        .held
        .extend(frames.map(|f| (conn.clone(), bytes::Bytes::from(f))));
    if tails.held.len() > before {
        tails.messages += 1;
        if tails.messages >= RELAY_TAIL_BATCH {
            tails.flush(counters);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A socket a birthday attempt opens (and may keep, to carry a peer's whole traffic) gets
    /// the buffers the main socket gets, not the kernel's default; and when the data plane
    /// falls behind, what its reader drops is counted.
    #[tokio::test]
    async fn extra_sockets_get_the_main_sockets_buffers_and_count_what_they_drop() {
        let main = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        let wanted = mesh_sys::socket::size_buffers(&main, mesh_sys::socket::SOCKET_BUFFER);
        let plain = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        let default = mesh_sys::socket::buffer_sizes(&plain).recv;
        let mut extra = ExtraSockets::default();
        // An inbox of one datagram, never read: every datagram after the first is dropped.
        let (tx, _rx) = mpsc::channel::<ExtraDatagram>(1);
        extra.open(SocketId(7), &tx).unwrap();
        let (socket, _) = &extra.open[&SocketId(7)];
        let got = mesh_sys::socket::buffer_sizes(socket).recv;
        assert_eq!(got, wanted.recv, "the kernel's default is {default}");
        assert!(got > default, "{got} <= the default {default}");
        let port = socket.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        for i in 0..10u8 {
            sender
                .send_to(&[i; 100], (std::net::Ipv4Addr::LOCALHOST, port))
                .unwrap();
        }
        let drops = extra.inbox_drops.clone();
        let counted = async {
            while drops.load(Ordering::Relaxed) < 9 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .unwrap_or_else(|_| panic!("{} drops counted", drops.load(Ordering::Relaxed)));
        extra.close(SocketId(7));
    }
}
