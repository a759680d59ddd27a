//! What goes into a [`crate::Node`] and what comes out: the datagram's [`Source`], the
//! [`Transmit`] and its [`Destination`], the [`Output`] a driver carries out in order, the
//! [`Event`]s, and the [`Status`] it reports. The node itself is in [`crate::node`].

use crate::birthday::BirthdayStats;
use crate::counters::Counters;
use crate::sockets::SocketId;
use mesh_proto::PublicKey;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[cfg(doc)]
use crate::Node;

/// How a node is set up.
#[derive(Clone)]
pub struct NodeConfig {
    /// The node's x25519 private key (its identity and WireGuard static key).
    pub private_key: [u8; 32],
    /// The node's overlay address.
    pub address: Ipv4Addr,
    /// Persistent keepalive in seconds (`None` disables it).
    pub keepalive: Option<u16>,
    /// MTU of the overlay interface: the largest inner packet; every path is probed for it.
    pub mtu: u16,
}

/// How a node measures its paths to a peer and when it moves a peer's traffic between its
/// direct path and the relay for quality ([`Node::set_quality`]; the defaults are
/// [`QualityConfig::default`]).
///
/// A direct path stays in use while it is alive. While the node sends data to a peer whose
/// direct path has lost at least `switch_loss` over a whole `window`, it probes the relay every
/// `probe_interval`, and moves the peer's traffic there once the relay has lost at most
/// `recover_loss` (and less than half of what the direct path lost). It keeps probing the direct
/// path, and takes it back once that has lost less than `recover_loss` over a whole window. A
/// peer changes path for quality at most once per `hold`; a return to the direct path that had
/// to be undone within twice `hold` doubles the next stay on the relay (up to `max_hold`), so a
/// path that passes sparse probes but drops bulk (a rate limit) is retried ever more rarely. A
/// direct path that dies still gives way at once (liveness, see `PATH_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityConfig {
    /// Whether the node switches paths for quality at all (it measures and reports either way).
    pub switching: bool,
    /// The sliding window loss and round-trip time are measured over (it moves on in tenths of
    /// itself). Default 10 s; 1 s to 60 s.
    pub window: Duration,
    /// A direct path that loses at least this fraction of packets over a window gives way to a
    /// clean relay. Default 0.10.
    pub switch_loss: f64,
    /// A direct path that loses less than this is taken back; a relay that loses at most this is
    /// clean. Default 0.03 (at most `switch_loss`).
    pub recover_loss: f64,
    /// A window with fewer samples (probes plus data messages the peer reported on) says nothing
    /// about its path. Default 20.
    pub min_samples: u32,
    /// Least time between two quality switches of one peer. Default 30 s.
    pub hold: Duration,
    /// Longest stay on the relay before the direct path is tried again, when returns keep
    /// failing. Default 480 s (at least `hold`).
    pub max_hold: Duration,
    /// How often the path being weighed is probed (the relay while the direct path loses, the
    /// direct path while the peer is on the relay for quality). Default 200 ms.
    pub probe_interval: Duration,
    /// How often the path in use is probed while data flows to the peer (round-trip time, and
    /// loss where little data flows). Default 2 s.
    pub active_probe_interval: Duration,
    /// How often a node reports to a peer what it received of its data, while data comes.
    /// Default 1 s.
    pub report_interval: Duration,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            switching: true,
            window: Duration::from_secs(10),
            switch_loss: 0.10,
            recover_loss: 0.03,
            min_samples: 20,
            hold: Duration::from_secs(30),
            max_hold: Duration::from_secs(480),
            probe_interval: Duration::from_millis(200),
            active_probe_interval: Duration::from_secs(2),
            report_interval: Duration::from_secs(1),
        }
    }
}

impl QualityConfig {
    /// The same settings within their bounds: a window of 1 to 60 s, losses within 0..=1 with
    /// `recover_loss` at most `switch_loss`, at least one sample, `max_hold` at least `hold`,
    /// probes and reports at least 50 ms apart.
    pub fn bounded(self) -> QualityConfig {
        let fraction = |f: f64| if f.is_nan() { 1.0 } else { f.clamp(0.0, 1.0) };
        let switch_loss = fraction(self.switch_loss);
        let floor = Duration::from_millis(50);
        QualityConfig {
            switching: self.switching,
            window: self
                .window
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
            switch_loss,
            recover_loss: fraction(self.recover_loss).min(switch_loss),
            min_samples: self.min_samples.max(1),
            hold: self.hold,
            max_hold: self.max_hold.max(self.hold),
            probe_interval: self.probe_interval.max(floor),
            active_probe_interval: self.active_probe_interval.max(floor),
            report_interval: self.report_interval.max(floor),
        }
    }
}

/// What a node measured of one path to a peer over the last quality window
/// ([`QualityConfig::window`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathQuality {
    /// Fraction of packets lost on the way to the peer (0 to 1): from the peer's loss reports
    /// where enough data flowed, else from probes and reports together. `None` until the window
    /// holds [`QualityConfig::min_samples`].
    pub loss: Option<f64>,
    /// Mean round-trip time of the probes answered on this path in the window.
    pub rtt: Option<Duration>,
}

/// How traffic reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight over UDP to this endpoint.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
    /// No path known yet (no relay, no direct answer).
    None,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(_) => f.write_str("direct"),
            Path::Relay => f.write_str("relay"),
            Path::None => f.write_str("none"),
        }
    }
}

/// Where a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One of the node's UDP sockets: [`SocketId::MAIN`], or an extra socket opened with
    /// [`Event::OpenSocket`]; `from` is the sender's address as the socket saw it.
    Udp {
        /// The socket it arrived on.
        socket: SocketId,
        /// The sender.
        from: SocketAddr,
    },
    /// The relay, which names the node that sent it.
    Relay {
        /// The sending node, as the relay authenticated it.
        from: PublicKey,
    },
}

impl Source {
    /// A datagram on the node's main socket from `from`.
    pub fn main(from: SocketAddr) -> Source {
        Source::Udp {
            socket: SocketId::MAIN,
            from,
        }
    }
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Out of one of the node's UDP sockets. A transmit on a socket the driver could not open
    /// (or has closed) is dropped.
    Udp {
        /// [`SocketId::MAIN`], or an extra socket announced by [`Event::OpenSocket`].
        socket: SocketId,
        /// The address to send to.
        dst: SocketAddr,
    },
    /// Through the relay (the driver frames it, see `mesh_proto::relay`), to this node.
    Relay {
        /// The destination node.
        to: PublicKey,
    },
}

/// Datagrams the driver must send: one, or a run of datagrams to one UDP destination (a GSO
/// batch) that the driver sends with one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where they go.
    pub destination: Destination,
    /// The bytes: one datagram, or with `segment_size` the datagrams one after the other.
    pub contents: Vec<u8>,
    /// `Some(n)`: `contents` holds datagrams of `n` bytes each (the last may be shorter, though
    /// the node only batches equal sizes). `None`: one datagram.
    pub segment_size: Option<usize>,
    /// `Some(n)`: send with IP TTL `n` instead of the system's default. A primer: it opens the
    /// node's own NAT toward the destination and dies on the way, before it can reach (and
    /// poison) the far side's gateway. Never set on a batch.
    pub ttl: Option<u8>,
    /// Datagrams whose encryption was left for later ([`Node::set_deferred_sealing`]): never
    /// set on a transmit that reaches the driver as one.
    pub(crate) pending: Vec<PendingSeal>,
}

/// Datagrams `first..end` of a transmit, reserved under `key` but not yet encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingSeal {
    pub(crate) first: usize,
    pub(crate) end: usize,
    pub(crate) key: mesh_wg::SealKey,
}

/// A batch whose encryption the node left to the driver ([`Node::set_deferred_sealing`]), so
/// that it runs on another thread than the node's. Its bytes are not to be read: only
/// [`Unsealed::seal`] turns it into a [`Transmit`] that may be sent. The order of messages was
/// fixed when the node reserved their counters; sealing in another order changes nothing on
/// the wire, sending in another order reorders as the network would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsealed(pub(crate) Transmit);

impl Unsealed {
    /// Where the datagrams go.
    pub fn destination(&self) -> Destination {
        self.0.destination
    }

    /// How many datagrams it holds.
    pub fn datagrams(&self) -> usize {
        self.0.datagrams()
    }

    /// Encrypts every datagram the node reserved: now it may be sent.
    pub fn seal(mut self) -> Transmit {
        self.0.seal_pending();
        self.0
    }

    /// The buffer, to give back to the node ([`Node::recycle`]) when the batch is dropped
    /// unsent.
    pub fn into_buffer(self) -> Vec<u8> {
        self.0.contents
    }
}

/// The next thing the driver must do, in the order the node needs them done
/// ([`Node::poll_output`]).
#[derive(Debug)]
pub enum Output {
    /// Log or act on an event. Events come first: an [`Event::OpenSocket`] must be carried out
    /// before the transmits on that socket.
    Event(Event),
    /// Send these datagrams.
    Transmit(Transmit),
    /// Seal these datagrams ([`Unsealed::seal`], on any thread), then send them, in the order
    /// given with the transmits.
    Unsealed(Unsealed),
    /// Open these data messages ([`crate::Unopened::open`], on any thread) and give them back
    /// with [`Node::handle_opened`], in the order they were handed out (only with
    /// [`Node::set_deferred_opening`]).
    Unopened(crate::Unopened),
    /// Write this IP packet to the TUN device. It starts [`Node::set_tun_headroom`] bytes
    /// into the buffer (zeroed room before it; none unless the driver asked).
    Tun(Vec<u8>),
}

/// What [`Node::status`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Every peer, sorted by overlay address.
    pub peers: Vec<PeerStatus>,
    /// Drop counters.
    pub counters: Counters,
    /// What birthday hole punching has cost and won.
    pub birthday: BirthdayStats,
    /// Extra sockets open now.
    pub extra_sockets: usize,
}

/// Something the driver may want to log or report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Handshake retransmissions for a peer ran out without an answer.
    PeerUnreachable {
        /// Which peer.
        key: PublicKey,
    },
    /// Traffic to a peer now takes another path (a direct endpoint confirmed by an authenticated
    /// packet from there, or a fallback to the relay).
    PathChanged {
        /// Which peer.
        key: PublicKey,
        /// The new path.
        path: Path,
    },
    /// The answer to [`Node::ping`].
    Pong {
        /// Which peer.
        key: PublicKey,
        /// Round-trip time.
        rtt: Duration,
        /// The path the answer came back on.
        path: Path,
    },
    /// Path MTU discovery concluded for a peer (first result, or a change).
    PathMtu {
        /// Which peer.
        key: PublicKey,
        /// The peer's overlay address (for a per-peer route MTU).
        address: Ipv4Addr,
        /// The peer's IPv6 overlay address, if it has one (its route gets the MTU too).
        address6: Option<std::net::Ipv6Addr>,
        /// Largest inner packet the path carries.
        mtu: u16,
        /// The configured interface MTU.
        configured: u16,
    },
    /// The driver must bind a new UDP socket (IPv4, any address, a port of the system's
    /// choosing) under this id, and deliver what it receives with [`Node::handle_datagram`]
    /// ([`Source::Udp`] with this id).
    /// Ids are never [`SocketId::MAIN`] and are not reused while open. A transmit on the socket
    /// is never returned by [`Node::poll_transmit`] before this event was returned by
    /// [`Node::poll_event`]. If the socket cannot be bound, dropping its transmits is enough.
    OpenSocket(SocketId),
    /// The node is done with this extra socket: the driver closes it and drops anything still
    /// queued for it.
    CloseSocket(SocketId),
}

/// Status of one peer, for `mesh status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    /// Key.
    pub key: PublicKey,
    /// Name.
    pub name: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// IPv6 overlay address, if the peer has one.
    pub address6: Option<std::net::Ipv6Addr>,
    /// Endpoint in use (confirmed by an authenticated packet), if any.
    pub endpoint: Option<SocketAddr>,
    /// Candidates from the controller.
    pub candidates: Vec<SocketAddr>,
    /// Time since the last handshake.
    pub since_handshake: Option<Duration>,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Time since the last authenticated packet from the peer.
    pub since_last_rx: Option<Duration>,
    /// Round-trip time measured by the last handshake.
    pub rtt: Option<Duration>,
    /// Largest inner packet the path carries, once probed.
    pub path_mtu: Option<u16>,
    /// How traffic reaches the peer now.
    pub path: Path,
    /// What the direct path measured lately (nothing while the peer is idle).
    pub direct_quality: PathQuality,
    /// What the relay path measured lately (nothing while the peer is idle).
    pub relay_quality: PathQuality,
    /// No session and none asked for: a peer past
    /// [`PROACTIVE_PEERS`](crate::PROACTIVE_PEERS) that no packet went to or came from yet.
    pub on_demand: bool,
}
