//! The sans-IO heart of a mesh node.
//!
//! [`Node`] owns the node's WireGuard sessions with every peer and decides where each packet
//! goes. It never touches a socket, a TUN device or the clock: the driver feeds it
//!
//! - IP packets read from the TUN device ([`Node::handle_tun_packet`]),
//! - UDP datagrams received on the node's main socket ([`Node::handle_datagram`]) or on one of
//!   the extra sockets it asked for ([`Node::handle_datagram_on`]; see [`birthday`]),
//! - the passage of time ([`Node::handle_timeout`]) and
//! - the peer list from the controller ([`Node::set_peers`]),
//!
//! each with a `now: Instant`, and drains what the node wants done:
//! [`Node::poll_transmit`] (datagrams to send, each on a [`SocketId`]), [`Node::poll_tun_packet`]
//! (packets to write to TUN), [`Node::poll_event`] (things to log or report, and extra sockets
//! to open or close: poll events before transmits) and [`Node::poll_timeout`] (when to call
//! `handle_timeout` next).
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
pub mod node;
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
    Event, Node, NodeConfig, Path, PeerConfig, PeerStatus, RelayTransmit, SocketId, Transmit,
};
