//! One WireGuard session with one peer.
//!
//! This is the only module that touches the WireGuard state machine (mesh's own, `mesh-wg`;
//! [`crate::guard`] uses boringtun's mac and cookie checks). It exposes a small surface in mesh's
//! own types so that the engine stays swappable without touching [`crate::Node`].
//!
//! Everything runs on the `Instant`s the driver passes in: `mesh_wg::Tunnel` reads no clock, so
//! WireGuard's timers (rekey, keepalive, expiry) follow the simulation's clock as everything
//! else does. The one wall-clock reading is the node's, once, for the timestamp initiations
//! carry ([`WallClock`]).
//!
//! There is no per-peer handshake rate limit here: that is served node-wide, before any DH, by
//! [`crate::guard`]: every handshake reaching [`address_of`] (which does the DH that identifies
//! the sender's key) or a session has passed a mac1 check and a handshake budget on the
//! injected clock, and under load a direct sender has proven its address with a cookie.

use mesh_proto::PublicKey;
pub use mesh_wg::handshake::Opened;
use mesh_wg::{Action, Tunnel};
pub use mesh_wg::{LocalKeys, OpenKey, OpenedData, SealKey};
use rand::rngs::OsRng;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use x25519_dalek::PublicKey as XPublic;

/// Smallest buffer any session call may write into: a handshake initiation is 148 bytes and a
/// data packet is the plaintext plus 32.
pub const MIN_BUFFER: usize = 148;
/// WireGuard transport overhead over the inner packet (header 16 + tag 16).
pub const DATA_OVERHEAD: usize = mesh_wg::DATA_OVERHEAD;

/// What a session call produced. Slices borrow the caller's buffer.
#[derive(Debug)]
pub enum Output<'a> {
    /// Nothing to do.
    Done,
    /// Send these bytes to the peer. After `decapsulate`, call [`Session::flush_queued`] until it
    /// returns `Done`: more may be waiting.
    Network(&'a [u8]),
    /// Write this IPv4 packet to the TUN device; it claims to come from `source`.
    TunnelV4(&'a [u8], Ipv4Addr),
    /// Write this IPv6 packet to the TUN device; it claims to come from `source`.
    TunnelV6(&'a [u8], Ipv6Addr),
    /// The datagram or timer event was refused.
    Error(SessionError),
}

/// Why a session refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    /// No handshake for too long; the session is gone until traffic starts a new one.
    Expired,
    /// Authentication failed, replay, wrong index, or any other bad datagram.
    Rejected,
}

/// Which local session a received datagram belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressed {
    /// A handshake initiation from this key (already authenticated against our static key).
    Initiation(PublicKey),
    /// A response, cookie or data packet for the session with this local peer index.
    Index(u32),
}

/// Works out which session a datagram is for, without touching any session state.
/// `None` for anything that is not a well-formed WireGuard message addressed to us.
pub fn address_of(local: &LocalKeys, datagram: &[u8]) -> Option<Addressed> {
    address_opened(local, datagram).map(|(to, _)| to)
}

/// [`address_of`] for the node: an initiation comes with its first half opened
/// ([`mesh_wg::handshake::open_initiation`]), for [`Session::decapsulate_opened`], so that
/// taking it does not repeat that Diffie-Hellman. (Boxed: every data message passes through
/// here and should not carry an initiation's state around.)
pub fn address_opened(
    local: &LocalKeys,
    datagram: &[u8],
) -> Option<(Addressed, Option<Box<Opened>>)> {
    match datagram.first()? {
        1 => mesh_wg::handshake::open_initiation(local, datagram)
            .ok()
            .map(|o| {
                let key = Addressed::Initiation(PublicKey(o.peer().to_bytes()));
                (key, Some(Box::new(o)))
            }),
        2..=4 => mesh_wg::receiver_index(datagram).map(|i| (Addressed::Index(i >> 8), None)),
        _ => None,
    }
}

/// The wall-clock time (since the Unix epoch) at an `Instant`, read once by the node: what
/// handshake initiations are stamped from (a responder accepts only ever later ones).
pub type WallClock = (Duration, Instant);

/// Reads the wall clock now, paired with `now`.
pub fn wall_clock(now: Instant) -> WallClock {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (since_epoch, now)
}

/// Counters of one session (the tunnel's own).
pub type SessionStats = mesh_wg::tunnel::Stats;

/// A WireGuard session with one peer.
pub struct Session {
    /// The WireGuard state, made when a packet or a handshake first needs it: a peer nobody
    /// talks to does not need its buffers and sessions.
    tunnel: Option<Box<Tunnel>>,
    /// What makes `tunnel`.
    make: Make,
}

/// The arguments of `Tunnel::new`, kept until the session is first needed.
struct Make {
    local: LocalKeys,
    peer: XPublic,
    keepalive: Option<u16>,
    index: u32,
    wall: WallClock,
}

impl Session {
    /// `local`: this side's static key (a [`LocalKeys`], or a `StaticSecret` it is derived
    /// from); `index` is this side's 24-bit peer index; received packets carry it back. `wall`:
    /// the node's [`wall_clock`].
    pub fn new(
        local: impl Into<LocalKeys>,
        peer: PublicKey,
        keepalive: Option<u16>,
        index: u32,
        wall: WallClock,
    ) -> Self {
        Session {
            tunnel: None,
            make: Make {
                local: local.into(),
                peer: XPublic::from(peer.0),
                keepalive,
                index: index & 0x00ff_ffff,
                wall,
            },
        }
    }

    /// The WireGuard state, made now if this is its first use.
    fn tunnel(&mut self) -> &mut Tunnel {
        let m = &self.make;
        self.tunnel.get_or_insert_with(|| {
            Box::new(Tunnel::new(
                m.local.clone(),
                m.peer,
                None,
                m.keepalive.map(|s| Duration::from_secs(u64::from(s))),
                m.index,
                m.wall,
            ))
        })
    }

    /// Whether the WireGuard state was made (a packet or a handshake needed it).
    pub fn in_use(&self) -> bool {
        self.tunnel.is_some()
    }

    /// Encrypts one IP packet. Queues it and starts a handshake when there is no session yet.
    /// `dst` must be at least `src.len() + 32` and at least [`MIN_BUFFER`] bytes.
    pub fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8], now: Instant) -> Output<'a> {
        if dst.len() < (src.len() + DATA_OVERHEAD).max(MIN_BUFFER) {
            return Output::Error(SessionError::Rejected);
        }
        let action = self.tunnel().send(src, dst, now, &mut OsRng);
        network(action, dst)
    }

    /// [`Session::encapsulate`] of a packet for a session that can seal now, without the
    /// encryption: the message's header is written and the packet copied behind it, and the
    /// returned key must seal it ([`SealKey::seal`]) before it leaves. `None`, nothing changed,
    /// when no session can seal: take [`Session::encapsulate`].
    pub fn reserve(
        &mut self,
        src: &[u8],
        dst: &mut [u8],
        now: Instant,
    ) -> Option<(usize, SealKey)> {
        self.tunnel.as_mut()?.reserve(src, dst, now)
    }

    /// Decrypts or processes one datagram received from the peer.
    pub fn decapsulate<'a>(
        &mut self,
        datagram: &[u8],
        dst: &'a mut [u8],
        now: Instant,
    ) -> Output<'a> {
        if datagram.is_empty() || dst.len() < datagram.len().max(MIN_BUFFER) {
            return Output::Error(SessionError::Rejected);
        }
        // Without state, only an initiation can be meant for this session (there is no
        // initiation of ours to respond to, no key to open data with): anything else is refused
        // without making the state.
        if self.tunnel.is_none() && datagram[0] != 1 {
            return Output::Error(SessionError::Rejected);
        }
        // A data message is opened into `dst` (the packet at its start, one copy); a handshake
        // answer is written there.
        match self.tunnel().receive(datagram, dst, now, &mut OsRng) {
            Action::Deliver(n) => tunnel_packet(&dst[..n]),
            other => network(other, dst),
        }
    }

    /// The key that opens the data message `datagram` away from the session, when one of its
    /// sessions that may still receive is the one it names ([`mesh_wg::Tunnel::open_key`]).
    pub fn open_key(&self, datagram: &[u8], now: Instant) -> Option<OpenKey> {
        self.tunnel.as_ref()?.open_key(datagram, now)
    }

    /// [`Session::decapsulate`] of a data message opened away from the session with a key
    /// from [`Session::open_key`]: `dst` holds the packet it carried, at its start.
    pub fn accept_opened<'a>(
        &mut self,
        opened: &OpenedData,
        dst: &'a mut [u8],
        now: Instant,
    ) -> Output<'a> {
        let Some(tunnel) = self.tunnel.as_mut() else {
            return Output::Error(SessionError::Rejected);
        };
        match tunnel.accept_opened(opened, dst, now) {
            Action::Deliver(n) => tunnel_packet(&dst[..n]),
            other => network(other, dst),
        }
    }

    /// [`Session::decapsulate`] for an initiation already opened with this session's local keys
    /// ([`address_opened`]).
    pub fn decapsulate_opened<'a>(
        &mut self,
        opened: Opened,
        datagram: &[u8],
        dst: &'a mut [u8],
        now: Instant,
    ) -> Output<'a> {
        if dst.len() < datagram.len().max(MIN_BUFFER) {
            return Output::Error(SessionError::Rejected);
        }
        network(
            self.tunnel()
                .receive_opened(opened, datagram, dst, now, &mut OsRng),
            dst,
        )
    }

    /// Emits packets queued while the handshake was in progress, one per call.
    pub fn flush_queued<'a>(&mut self, dst: &'a mut [u8], now: Instant) -> Output<'a> {
        match &mut self.tunnel {
            Some(t) => network(t.flush_queued(dst, now), dst),
            None => Output::Done,
        }
    }

    /// Runs WireGuard's timers (keepalive, rekey, expiry).
    pub fn update_timers<'a>(&mut self, dst: &'a mut [u8], now: Instant) -> Output<'a> {
        match &mut self.tunnel {
            Some(t) => network(t.update_timers(dst, now, &mut OsRng), dst),
            None => Output::Done,
        }
    }

    /// Sends a fresh handshake initiation even if one is in flight (retransmission).
    pub fn force_handshake<'a>(&mut self, dst: &'a mut [u8], now: Instant) -> Output<'a> {
        let action = self.tunnel().initiate(dst, now, &mut OsRng);
        network(action, dst)
    }

    /// Whether a handshake has completed (a session key exists; it may be too old to use, in
    /// which case sending starts a new handshake).
    pub fn established(&self) -> bool {
        self.tunnel.as_ref().is_some_and(|t| t.has_session())
    }

    /// The earliest time [`Session::update_timers`] may have something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tunnel.as_ref().and_then(|t| t.next_deadline())
    }

    /// Counters of this session.
    pub fn stats(&self, now: Instant) -> SessionStats {
        self.tunnel
            .as_ref()
            .map_or_else(SessionStats::default, |t| t.stats(now))
    }
}

/// What a call that may send produced, its bytes in `dst`.
fn network(action: Action, dst: &[u8]) -> Output<'_> {
    match action {
        Action::Send(n) => match dst.get(..n) {
            Some(b) => Output::Network(b),
            None => Output::Error(SessionError::Rejected),
        },
        Action::Done | Action::Keepalive => Output::Done,
        Action::Deliver(_) | Action::Refused(_) => Output::Error(SessionError::Rejected),
        Action::Expired => Output::Error(SessionError::Expired),
    }
}

/// A decrypted packet with the source address its header names.
fn tunnel_packet(p: &[u8]) -> Output<'_> {
    match crate::packet::ip_addrs(p) {
        Some((IpAddr::V4(src), _)) => Output::TunnelV4(p, src),
        Some((IpAddr::V6(src), _)) => Output::TunnelV6(p, src),
        None => Output::Error(SessionError::Rejected),
    }
}
