//! The relay: the path of last resort between two nodes.
//!
//! A node keeps a QUIC connection to a relay; a WireGuard message for a peer travels as QUIC
//! datagrams `(destination key, message)` ([`mesh_proto::relay`] frames). The relay forwards a
//! frame only to a node of the sender's network, rewriting the key to the sender's so that nobody
//! can pose as another node, and never sees plaintext (WireGuard is end to end).
//!
//! The forwarding rules are [`route::Routes`], without I/O, so mesh-core's simulation runs them
//! too; [`Forwarder`] drives them with quinn connections, and the same [`Forwarder`] runs in two
//! places:
//! - inside `mesh-controller serve`, where nodes are admitted by the control channel itself;
//! - alone, as `mesh-controller relay` ([`server::serve`]), one per region. There a node proves
//!   its key with a Noise handshake pinned to the relay's key and shows a [`ticket`] the
//!   controller made for that relay. The relay needs no database and no connection to the
//!   controller: the ticket key comes from a Diffie-Hellman between the controller's and the
//!   relay's static keys, so only public keys are exchanged when a relay is set up.
//!
//! One connection per node key: a node that connects again replaces its older connection. A
//! removed node loses the relay at once: the embedded relay takes it out of the table when the
//! controller sees the removal; a standalone relay gets the controller's revocation (MAC'd like
//! tickets, see [`ticket`]) from any connected member, closes the node's connection and refuses
//! its old tickets.
//!
//! What one node may have queued is bounded by the QUIC datagram buffers of its connection
//! ([`mesh_control::quic::RELAY_BUFFER`] each way); beyond that the oldest datagrams go.

pub mod client;
pub mod forward;
pub mod route;
pub mod server;
pub mod ticket;

pub use forward::{Forwarder, RelayCounters};
pub use ticket::TicketKey;
