//! One WireGuard session with one peer.
//!
//! This is the only module that touches boringtun's WireGuard state machine ([`crate::guard`]
//! uses its mac and cookie checks). It exposes a small surface in mesh's own types
//! so that the WireGuard engine can be swapped (GotaTun, or a time-injected engine) without
//! touching [`crate::Node`].
//!
//! boringtun reads its own clock inside `update_timers`; everything else in mesh-core runs on the
//! `Instant`s the driver passes in. Handshake retransmission while data is waiting is driven by
//! [`crate::Node`] on that injected clock (see `force_handshake`), so the simulation does not
//! depend on wall time for a session to come up.
//!
//! boringtun's per-peer handshake rate limiter is sized out of the way ([`Session::new`]): it
//! only checks mac1 here. It counts on the wall clock (10 per second by default), so in the
//! simulation a burst of retries within one wall second refused handshakes depending on how fast
//! the machine ran, and when it trips it asks for a cookie round trip, which is impossible through
//! the relay. Its purpose is served node-wide, before any DH, by [`crate::guard`]: every
//! handshake reaching [`address_of`] (which does the DH that identifies the sender's key) or a
//! session has passed a mac1 check and a handshake budget on the injected clock, and under load
//! a direct sender has proven its address with a cookie.

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use mesh_proto::PublicKey;
use std::net::IpAddr;
use std::time::Duration;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

/// Smallest buffer any session call may write into: a handshake initiation is 148 bytes and a
/// data packet is the plaintext plus 32.
pub const MIN_BUFFER: usize = 148;
/// WireGuard transport overhead over the inner packet (header 16 + tag 16).
pub const DATA_OVERHEAD: usize = 32;

/// What a session call produced. Slices borrow the caller's buffer.
#[derive(Debug)]
pub enum Output<'a> {
    /// Nothing to do.
    Done,
    /// Send these bytes to the peer. After `decapsulate`, call [`Session::flush_queued`] until it
    /// returns `Done`: more may be waiting.
    Network(&'a [u8]),
    /// Write this IPv4 packet to the TUN device; it claims to come from `source`.
    TunnelV4(&'a [u8], std::net::Ipv4Addr),
    /// Write this IPv6 packet to the TUN device; it claims to come from `source`.
    TunnelV6(&'a [u8], std::net::Ipv6Addr),
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
pub fn address_of(secret: &StaticSecret, public: &XPublic, datagram: &[u8]) -> Option<Addressed> {
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => parse_handshake_anon(secret, public, &init)
            .ok()
            .map(|half| Addressed::Initiation(PublicKey(half.peer_static_public))),
        Packet::HandshakeResponse(p) => Some(Addressed::Index(p.receiver_idx >> 8)),
        Packet::PacketCookieReply(p) => Some(Addressed::Index(p.receiver_idx >> 8)),
        Packet::PacketData(p) => Some(Addressed::Index(p.receiver_idx >> 8)),
    }
}

/// A handshake rate limiter as sessions share it.
pub type Limiter = std::sync::Arc<RateLimiter>;

/// The handshake rate limiter every session of a node shares: one that never reports load (see
/// the module docs), so it only checks mac1 against `secret`'s public key.
pub fn limiter(secret: &StaticSecret) -> Limiter {
    std::sync::Arc::new(RateLimiter::new(&XPublic::from(secret), u64::MAX))
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SessionStats {
    /// Time since the last completed handshake (boringtun's clock).
    pub since_handshake: Option<Duration>,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Round-trip time measured by the last handshake.
    pub rtt: Option<Duration>,
}

/// A WireGuard session with one peer.
pub struct Session {
    /// boringtun's state, made when a packet or a handshake first needs it: about 11 KB (its
    /// eight session slots are inline), which a peer nobody talks to does not need. A node with
    /// 1,000 peers held 11 MB of it before any traffic.
    tunn: Option<Box<Tunn>>,
    /// What makes `tunn`.
    make: Make,
    /// Whether a session key exists, as last known; `None`: ask boringtun (which reads its
    /// clock to answer, so the data path does not ask: a data message sealed or opened proves
    /// the key).
    established: std::cell::Cell<Option<bool>>,
}

/// The arguments of `Tunn::new`, kept until the session is first needed.
struct Make {
    secret: StaticSecret,
    peer: XPublic,
    keepalive: Option<u16>,
    index: u32,
    limiter: Limiter,
}

impl Session {
    /// `index` is this side's 24-bit peer index; received packets carry it back.
    /// `limiter`: the node's one [`limiter`] (a session of its own for each peer cost 190
    /// bytes apiece). boringtun's state is made when first needed.
    pub fn new(
        secret: StaticSecret,
        peer: PublicKey,
        keepalive: Option<u16>,
        index: u32,
        limiter: Limiter,
    ) -> Self {
        Session {
            tunn: None,
            make: Make {
                secret,
                peer: XPublic::from(peer.0),
                keepalive,
                index: index & 0x00ff_ffff,
                limiter,
            },
            established: std::cell::Cell::new(Some(false)),
        }
    }

    /// boringtun's state, made now if this is its first use.
    fn tunn(&mut self) -> &mut Tunn {
        let m = &self.make;
        self.tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                m.secret.clone(),
                m.peer,
                None,
                m.keepalive,
                m.index,
                Some(m.limiter.clone()),
            ))
        })
    }

    /// Whether boringtun's state was made (a packet or a handshake needed it).
    pub fn in_use(&self) -> bool {
        self.tunn.is_some()
    }

    /// Encrypts one IP packet. Queues it and starts a handshake when there is no session yet.
    /// `dst` must be at least `src.len() + 32` and at least [`MIN_BUFFER`] bytes.
    pub fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> Output<'a> {
        if dst.len() < (src.len() + DATA_OVERHEAD).max(MIN_BUFFER) {
            return Output::Error(SessionError::Rejected);
        }
        let out = convert(self.tunn().encapsulate(src, dst));
        let data = matches!(out, Output::Network(b) if b.first() == Some(&4));
        self.established.set(data.then_some(true));
        out
    }

    /// Decrypts or processes one datagram received from `from`.
    pub fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> Output<'a> {
        if datagram.is_empty() || dst.len() < datagram.len().max(MIN_BUFFER) {
            return Output::Error(SessionError::Rejected);
        }
        // Without state, only an initiation can be meant for this session (there is no
        // initiation of ours to respond to, no key to open data with): anything else is refused
        // without making the state.
        if self.tunn.is_none() && datagram[0] != 1 {
            return Output::Error(SessionError::Rejected);
        }
        let out = convert(self.tunn().decapsulate(from, datagram, dst));
        let data = datagram[0] == 4 && !matches!(out, Output::Error(_));
        self.established.set(data.then_some(true));
        out
    }

    /// Emits packets queued while the handshake was in progress, one per call.
    pub fn flush_queued<'a>(&mut self, dst: &'a mut [u8]) -> Output<'a> {
        self.established.set(None);
        match &mut self.tunn {
            Some(t) => convert(t.decapsulate(None, &[], dst)),
            None => Output::Done,
        }
    }

    /// Runs WireGuard's own timers (keepalive, rekey, expiry).
    pub fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> Output<'a> {
        self.established.set(None);
        match &mut self.tunn {
            Some(t) => convert(t.update_timers(dst)),
            None => Output::Done,
        }
    }

    /// Sends a fresh handshake initiation even if one is in flight (retransmission).
    pub fn force_handshake<'a>(&mut self, dst: &'a mut [u8]) -> Output<'a> {
        self.established.set(None);
        convert(self.tunn().format_handshake_initiation(dst, true))
    }

    /// Whether a handshake has completed (a session key exists).
    pub fn established(&self) -> bool {
        if let Some(known) = self.established.get() {
            return known;
        }
        let known = self.tunn.as_ref().is_some_and(|t| t.stats().0.is_some());
        self.established.set(Some(known));
        known
    }

    /// Counters of this session.
    pub fn stats(&self) -> SessionStats {
        let Some(tunn) = &self.tunn else {
            return SessionStats::default();
        };
        let (since, tx, rx, _, rtt_ms) = tunn.stats();
        SessionStats {
            since_handshake: since,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            rtt: rtt_ms.map(|ms| Duration::from_millis(u64::from(ms))),
        }
    }
}

fn convert(r: TunnResult<'_>) -> Output<'_> {
    use boringtun::noise::errors::WireGuardError;
    match r {
        TunnResult::Done => Output::Done,
        TunnResult::WriteToNetwork(b) => Output::Network(b),
        TunnResult::WriteToTunnelV4(b, src) => Output::TunnelV4(b, src),
        TunnResult::WriteToTunnelV6(b, src) => Output::TunnelV6(b, src),
        TunnResult::Err(WireGuardError::ConnectionExpired) => Output::Error(SessionError::Expired),
        TunnResult::Err(_) => Output::Error(SessionError::Rejected),
    }
}
