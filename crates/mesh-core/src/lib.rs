//! The sans-IO heart of a mesh node.
//!
//! [`Node`] owns the node's WireGuard sessions with every peer and decides where each packet
//! goes. It never touches a socket, a TUN device or the clock. The driver feeds it
//!
//! - IP packets read from the TUN device ([`Node::handle_tun_packet`]),
//! - datagrams, each with its [`Source`]: one of the node's UDP sockets (the main one, or an
//!   extra socket it asked for, see [`birthday`]) or the relay, which names the sending node
//!   ([`Node::handle_datagram`]),
//! - the passage of time ([`Node::handle_timeout`]) and
//! - the peer list from the controller ([`Node::set_peers`]),
//!
//! each with a `now: Instant`, and carries out what the node wants done, in the order
//! [`Node::poll_output`] gives it: events (things to log or report, and extra sockets to open
//! or close), [`Transmit`]s (one datagram or a GSO batch, to a UDP socket and address or
//! through the relay to a node: the [`Destination`]) and packets for the TUN device. Buffers go
//! back with [`Node::recycle`], so a warm data path allocates nothing. [`Node::poll_timeout`]
//! says when to call `handle_timeout` next; [`Node::status`] reports peers, counters and
//! punching.
//!
//! Inside, [`node`] only dispatches ([`io`] holds its input and output types); the peer table is `peers`, each peer's parts are in
//! `peer` (handshake schedule, path, probes, the quality of its paths from probes and loss
//! reports, and the choice between them: [`QualityConfig`]), punching in [`birthday`], socket
//! ownership in [`sockets`], the drop counters in [`counters`](mod@counters).
//!
//! What it does not do: control-plane I/O (QUIC, Noise), device configuration, persistence.
//! Those live in `mesh-sys`, `mesh-control` and `mesh-agent`.
//!
//! WireGuard itself is boringtun's `noise::Tunn`, wrapped by [`session::Session`] so that no
//! boringtun type leaks out of this crate.

pub mod birthday;
mod budget;
pub mod counters;
pub mod guard;
pub mod io;
pub mod node;
mod opening;
mod outbox;
pub mod packet;
mod peer;
mod peers;
pub mod pmtu;
pub mod session;
pub mod sockets;

pub use birthday::{BirthdayConfig, BirthdayStats};
pub use counters::Counters;
pub use node::{
    Destination, Event, Node, NodeConfig, Output, Path, PathQuality, PeerConfig, PeerStatus,
    QualityConfig, SocketId, Source, Status, Transmit, Unsealed,
};
pub use opening::{Opened, Unopened, OPEN_BATCH_MAX, OPEN_INLINE_BYTES, OPEN_INLINE_MAX};
pub use outbox::LARGE_BUFFER;
pub use peer::handshake::PROACTIVE_PEERS;
