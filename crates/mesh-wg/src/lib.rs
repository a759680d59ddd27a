//! WireGuard's messages, sans-IO, with the session keys in mesh's hands.
//!
//! boringtun's `Tunn` keeps a session's keys to itself: every data message is copied into the
//! message it seals, every received datagram is parsed again behind the node, and one session
//! can only be used by one thread at a time. This crate implements the protocol from the
//! WireGuard paper (Noise_IKpsk2 with X25519, BLAKE2s and ChaCha20-Poly1305) so that the node can
//! seal a packet in place where it already lies, open a message it has already looked up by
//! index, and hand the keys to more than one core.
//!
//! - [`handshake`]: the initiation and the response, mac1, and the cookie reply and mac2 that
//!   a responder under load asks for.
//! - [`transport`]: a session's keys: sealing and opening data messages in place, the counter,
//!   and the replay window.
//! - [`tunnel`]: one peer's state: the handshake in progress, current, previous and next
//!   sessions, packets waiting for a handshake, and WireGuard's timers on the caller's clock.
//!
//! Nothing here reads a clock or draws random numbers: the caller passes the ephemeral key's
//! bytes and the initiation's timestamp ([`tai64n`]), and [`Tunnel`] takes `now` in every call,
//! so that the simulation stays deterministic.

pub mod handshake;
mod noise;
pub mod transport;
pub mod tunnel;

pub use handshake::{Initiated, LocalKeys, Received};
pub use transport::{OpenKey, OpenedData, ReplayWindow, SealKey, Transport};
pub use tunnel::{Action, Tunnel};

/// Message type of a handshake initiation.
pub const TYPE_INITIATION: u8 = 1;
/// Message type of a handshake response.
pub const TYPE_RESPONSE: u8 = 2;
/// Message type of a cookie reply.
pub const TYPE_COOKIE_REPLY: u8 = 3;
/// Message type of a transport data message.
pub const TYPE_DATA: u8 = 4;

/// Length of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Length of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// A data message's header: type, reserved, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 16;
/// A data message's authentication tag.
pub const TAG_LEN: usize = 16;
/// What a data message adds to the packet it carries.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// Why a message was refused. Nothing is changed by a refused message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Too short, too long, or not the message type expected.
    Malformed,
    /// mac1 does not match our public key: not meant for us, or damaged.
    Mac1,
    /// Decryption failed: wrong key, or the message was altered.
    Decrypt,
    /// A Diffie-Hellman result was all zeros (a low-order point).
    WeakKey,
    /// A data message for another session (receiver index).
    WrongIndex,
    /// A data message whose counter was seen before or is too old for the window.
    Replay,
    /// The session's counter is used up: a new handshake is needed.
    Exhausted,
    /// The buffer is too small for what was asked.
    Buffer,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Error::Malformed => "malformed WireGuard message",
            Error::Mac1 => "mac1 does not match this node's key",
            Error::Decrypt => "decryption failed",
            Error::WeakKey => "Diffie-Hellman result is all zeros",
            Error::WrongIndex => "data message for another session",
            Error::Replay => "counter replayed or outside the window",
            Error::Exhausted => "session counter used up",
            Error::Buffer => "buffer too small",
        })
    }
}

impl std::error::Error for Error {}

/// The 12-byte TAI64N timestamp of `t` (seconds since the Unix epoch plus 2^62, big-endian,
/// then nanoseconds, big-endian): what an initiation carries and a responder compares, so that
/// an old initiation cannot be replayed.
pub fn tai64n(since_unix_epoch: std::time::Duration) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&((1u64 << 62) + since_unix_epoch.as_secs()).to_be_bytes());
    out[8..].copy_from_slice(&since_unix_epoch.subsec_nanos().to_be_bytes());
    out
}

/// The receiver index of a response, cookie reply or data message of its type's length
/// (`None` for anything else): what a node looks its session up by.
pub fn receiver_index(message: &[u8]) -> Option<u32> {
    let (at, fits) = match *message.first()? {
        TYPE_RESPONSE => (8, message.len() == RESPONSE_LEN),
        TYPE_COOKIE_REPLY => (4, message.len() == COOKIE_REPLY_LEN),
        TYPE_DATA => (4, message.len() >= DATA_OVERHEAD),
        _ => return None,
    };
    if !fits {
        return None;
    }
    if message.get(1..4)? != [0, 0, 0] {
        return None;
    }
    let b = message.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
