//! The control channel between an agent and the controller.
//!
//! QUIC (quinn) carries it; TLS there uses a throwaway self-signed certificate and proves
//! nothing by itself. Identity comes from a Noise IK handshake (snow) on the first bidirectional
//! stream: the node must already know the controller's x25519 key (it is in the join token), and
//! the controller learns the node's key from the handshake. The Noise prologue carries keying
//! material exported from the QUIC/TLS session, so a man in the middle that terminates QUIC
//! cannot relay the Noise handshake.
//!
//! - [`quic`]: endpoint, client and server configurations.
//! - [`channel`]: the Noise channel: handshake, then length-bounded encrypted messages.

pub mod channel;
pub mod quic;

pub use channel::{ChannelError, Receiver, Sender};
