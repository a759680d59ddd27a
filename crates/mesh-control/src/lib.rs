//! The control channel between an agent and a server (the controller or a relay), and the
//! transports that carry it.
//!
//! QUIC (quinn) on the node's one UDP socket is the first transport; TLS over TCP after an
//! HTTP/1.1 Upgrade ([`tcp`]) is the second, for networks where UDP does not get through. On
//! either, TLS uses a throwaway self-signed certificate and proves nothing by itself. Identity
//! comes from a Noise IK handshake (snow) on the link: the node must already know the server's
//! x25519 key (it is in the join token or the relay list), and the server learns the node's key
//! from the handshake. The Noise prologue carries keying material exported from the QUIC or
//! TLS session, so a man in the middle that terminates QUIC or TLS cannot relay the Noise
//! handshake.
//!
//! - [`link`]: one connection of either transport, as the rest of mesh sees it.
//! - [`quic`]: endpoint, client and server configurations.
//! - [`tcp`]: the TCP transport: dialing (directly or through an HTTP proxy), listening,
//!   framing.
//! - [`channel`]: the Noise channel: handshake, then length-bounded encrypted messages.
//! - [`net`]: sockets of both address families (dual-stack binds, canonical addresses).

pub mod channel;
pub mod link;
pub mod net;
pub mod quic;
pub mod tcp;

pub use channel::{ChannelError, Receiver, Sender};
pub use link::{Link, LinkClosed, Transport};
