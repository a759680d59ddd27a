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
}

/// The next thing the driver must do, in the order the node needs them done
/// ([`Node::poll_output`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Log or act on an event. Events come first: an [`Event::OpenSocket`] must be carried out
    /// before the transmits on that socket.
    Event(Event),
    /// Send these datagrams.
    Transmit(Transmit),
    /// Write this IP packet to the TUN device.
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
}
