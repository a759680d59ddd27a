//! Wire formats of mesh.
//!
//! This crate holds every message that crosses the network between agents, the controller and
//! (later) relays, plus the rules for telling apart the protocols that share a node's one UDP
//! socket. It does no I/O: it turns bytes into typed values and back, and every decoder is bounded
//! and total (it returns an error, never panics, on any input).
//!
//! - [`demux`]: classify a UDP datagram as WireGuard, QUIC or STUN by its first bytes.
//! - [`control`]: the control messages exchanged inside the Noise channel with the controller.
//! - [`hex`]: hex text for secrets and MACs.
//! - [`token`]: the join token string an admin hands to a node.
//! - [`key`]: the node / controller public key type and its text form.
//! - [`relay`]: relay frames (WireGuard messages as QUIC datagrams, with fragmentation).
//! - [`relay_session`]: admission of a node at a standalone relay (tickets, observed address).
//! - [`stun`]: STUN binding requests and answers (the controller's second observation).
//! - [`tunnel`]: messages between two nodes inside their WireGuard session (path MTU probes,
//!   pings, birthday joins).
//!
//! See `proto/PROTOCOL.md` for the byte-level description.

pub mod control;
pub mod demux;
pub mod hex;
pub mod key;
pub mod relay;
pub mod relay_session;
pub mod stun;
pub mod token;
pub mod tunnel;

pub use key::PublicKey;

/// Version of the control protocol carried in every control envelope.
pub const PROTOCOL_VERSION: u16 = 1;
