//! One peer: its WireGuard session and the parts that decide when it handshakes
//! ([`handshake`]), how traffic reaches it ([`path`]), what its probes measured ([`probes`]),
//! how well each path carries packets ([`quality`], fed by loss reports both ways, [`loss`]),
//! which path carries the traffic when both work ([`choice`]), which address family a direct
//! path takes when the peer has both ([`family`]) and when it is punched
//! ([`crate::birthday::PeerPunch`]).
//!
//! Each part owns its state and rules; [`Peer`] combines them where one event touches several
//! (a handshake forgets the direct path, a send marks the path as owing an answer).

pub(crate) mod choice;
pub(crate) mod family;
pub(crate) mod handshake;
pub(crate) mod loss;
pub(crate) mod path;
pub(crate) mod probes;
pub(crate) mod quality;

use crate::birthday::PeerPunch;
use crate::io::{PathQuality, QualityConfig};
use crate::node::{Event, Path};
use crate::outbox::{Ctx, Endpoint, Via};
use ipnet::IpNet;

use crate::pmtu;
use crate::session::{Output, Session, SessionError};
use crate::sockets::SocketId;
use choice::Switch;
use handshake::{Due, Handshake};
use mesh_proto::control::{NatKind, MAX_ENDPOINTS};
use mesh_proto::tunnel::{self, LossReport};
use mesh_proto::PublicKey;
use path::{
    DirectDue, PathState, ACTIVE_TRAFFIC, PATH_PROBE_INTERVAL, PATH_TIMEOUT, PREDICTED_PORTS,
};
use probes::{Probes, Purpose};
use quality::{Leg, Measure};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// One peer as the node needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's key.
    pub key: PublicKey,
    /// The peer's name, for status and logs.
    pub name: String,
    /// The peer's overlay address; packets to it go to this peer, and the peer may only send
    /// packets from it.
    pub address: Ipv4Addr,
    /// The peer's IPv6 overlay address, if the network has an IPv6 overlay: IPv6 packets to it
    /// go to this peer, and the peer may send IPv6 packets from it.
    pub address6: Option<Ipv6Addr>,
    /// Where the peer may be reached, best first.
    pub endpoints: Vec<SocketAddr>,
    /// The peer's address as the controller saw it (its public mapping), if known. Birthday
    /// punching sprays only this IP.
    pub observed: Option<SocketAddr>,
    /// The peer's NAT kind as it reported it, if known: birthday punching runs only toward a
    /// pair where one side maps per destination (see [`crate::birthday::Roles`]).
    pub nat: Option<NatKind>,
    /// Prefixes the peer routes (its pod subnet, say), as the controller approved them: packets
    /// to them go to this peer, and the peer may send packets from them (besides its address).
    /// IPv4 and IPv6 prefixes alike.
    pub routes: Vec<IpNet>,
}

/// Why the node wants to run a peer's timers (for debug logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// WireGuard's own timers (rekey, its keepalives, expiry) need their tick.
    WireGuard,
    /// A handshake is due: the proactive one, or a retransmission while data waits.
    Handshake,
    /// Data went unanswered: the stale-session rule.
    StaleSession,
    /// A quiet direct path gets a liveness probe.
    PathProbe,
    /// A direct path owed an answer too long: fall back to the relay.
    PathTimeout,
    /// A candidate probe round while on the relay.
    CandidateRound,
    /// A birthday attempt of our own.
    Punch,
    /// The RTT of a new session or path.
    Rtt,
    /// The path MTU search.
    Mtu,
    /// Persistent keepalive.
    Keepalive,
    /// A socket kept from a won attempt that the path no longer uses.
    KeptSocket,
    /// Birthday sprays, or the end of an attempt.
    Spray,
    /// A quality probe is due, or one timed out.
    Quality,
    /// Loss reports to the peer are due.
    LossReport,
    /// A family round: the direct path against the other address family's candidates.
    Family,
}

/// What a peer's deadlines depend on besides the peer itself.
pub(crate) struct TimerEnv {
    pub(crate) now: Instant,
    pub(crate) relay_up: bool,
    pub(crate) keepalive: Option<u16>,
    /// Punching is on and free for a new attempt.
    pub(crate) punch_free: bool,
    /// When the attempt budget allows the next attempt (`now` if it does).
    pub(crate) punch_budget_at: Instant,
    /// This node's NAT kind, if known.
    pub(crate) own_nat: Option<NatKind>,
    /// A point of the node's tick grid (see [`crate::node::snap`]).
    pub(crate) origin: Instant,
    /// How paths are measured and chosen.
    pub(crate) quality: QualityConfig,
}

/// WireGuard's timers of an active peer (traffic or a handshake within [`ACTIVE_WIREGUARD`])
/// run every [`crate::node::TICK`]. An idle peer's timers are coarse and known in advance: they
/// act only at the tunnel's next deadline (a rekey 120 s after the session, the keys' end), so
/// an idle peer is woken only then, on a grid of this step (at most this late: 10 s of margin
/// are left), and a node with a thousand idle peers does no work for them between keepalives.
/// Traffic brings the fast tick back at once ([`Peer::wake_wireguard`]).
pub const IDLE_WIREGUARD_TICK: Duration = Duration::from_secs(5);
/// Keepalives go on this grid: those of many peers share a wake-up, at most a second late
/// (NAT mappings that expire after 30 s still see one every 26 s).
pub const KEEPALIVE_GRID: Duration = Duration::from_secs(1);
/// A peer counts as active for WireGuard's ticks this long after its last traffic: covers
/// WireGuard's passive keepalive (10 s after data received) and stale-session rule (15 s).
pub const ACTIVE_WIREGUARD: Duration = Duration::from_secs(16);

/// What came out of one authenticated datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Not authenticated (or not for this session): dropped and counted.
    Refused,
    /// Authenticated; carried this in-tunnel message for the node, if any.
    Authenticated(Option<InTunnel>),
}

/// An in-tunnel message from the peer (`mesh_proto::tunnel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InTunnel {
    /// A probe, an ack, a join, a punch or its ack.
    Message(pmtu::Message),
    /// What the peer received of our data on one path.
    Report(LossReport),
}

pub(crate) struct Peer {
    pub(crate) config: PeerConfig,
    pub(crate) session: Session,
    /// Our WireGuard index for this peer's sessions.
    pub(crate) index: u32,
    pub(crate) handshake: Handshake,
    pub(crate) path: PathState,
    pub(crate) families: family::Families,
    pub(crate) probes: Probes,
    pub(crate) punch: PeerPunch,
    /// Last authenticated packet from the peer.
    pub(crate) last_rx: Option<Instant>,
    /// Last inner packet from the TUN device sent to the peer (traffic flowing).
    pub(crate) last_data: Option<Instant>,
    /// Last inner packet from the peer delivered to the TUN device (not a keepalive, not an
    /// in-tunnel message).
    pub(crate) last_data_rx: Option<Instant>,
    /// When WireGuard's timers next need a tick.
    pub(crate) wireguard_at: Instant,
    /// `wireguard_at` is an idle peer's far tick (a session age), which traffic brings forward.
    idle_tick: bool,
    /// When the node runs this peer's timers next (the earliest deadline, as last computed;
    /// inputs only ever bring it forward, so waking early re-evaluates and is harmless).
    pub(crate) wake: (Instant, Timer),
    /// What the peer's paths measured, while traffic flows (`None` while idle).
    pub(crate) measure: Option<Box<Measure>>,
}

impl Peer {
    pub(crate) fn new(
        config: PeerConfig,
        session: Session,
        index: u32,
        proactive_at: Option<Instant>,
        mtu: u16,
        first_tick: Instant,
    ) -> Peer {
        Peer {
            config,
            session,
            index,
            handshake: Handshake::new(proactive_at),
            path: PathState::default(),
            families: family::Families::default(),
            probes: Probes::new(mtu),
            punch: PeerPunch::default(),
            last_rx: None,
            last_data: None,
            last_data_rx: None,
            wireguard_at: first_tick,
            idle_tick: false,
            wake: (first_tick, Timer::WireGuard),
            measure: None,
        }
    }

    /// The earliest of this peer's deadlines, and why. Mirrors the rules of the timer methods
    /// below, which re-check their own conditions: waking early only costs a check.
    pub(crate) fn deadline(&self, env: &TimerEnv) -> (Instant, Timer) {
        let now = env.now;
        let mut next = (self.wireguard_at, Timer::WireGuard);
        let mut at = |t: Option<Instant>, why: Timer| {
            if let Some(t) = t {
                if t < next.0 {
                    next = (t, why);
                }
            }
        };
        let established = self.session.established();
        at(
            self.handshake
                .deadline(established, retry_jitter(self.index)),
            Timer::Handshake,
        );
        at(self.handshake.stale_at(), Timer::StaleSession);
        if established {
            let endpoint = self.path.sending_direct(env.relay_up);
            if endpoint.is_some() && self.probes.mtu_endpoint != endpoint {
                at(Some(now), Timer::Mtu);
            } else if endpoint.is_some() {
                at(self.probes.mtu.poll_timeout(), Timer::Mtu);
            }
            if let Some(d) = self.path.direct {
                at(
                    self.families.deadline(
                        d.endpoint,
                        &self.config.endpoints,
                        self.flowing(now),
                        now,
                    ),
                    Timer::Family,
                );
                if let Some(since) = d.unanswered_since {
                    let probe = d.last_probe.map_or(since, |t| t.max(since)) + PATH_PROBE_INTERVAL;
                    at(Some(probe), Timer::PathProbe);
                    if env.relay_up {
                        let timeout = path::timeout(since, self.last_rx);
                        at(Some(since + timeout), Timer::PathTimeout);
                    }
                }
            } else if env.relay_up {
                let wait = self
                    .path
                    .rounds
                    .interval
                    .min(path::longest_wait(self.flowing(now)));
                at(
                    Some(self.path.rounds.last.map_or(now, |t| t + wait)),
                    Timer::CandidateRound,
                );
                let roles = crate::birthday::Roles::for_pair(env.own_nat, self.config.nat);
                if env.punch_free
                    && roles.is_some()
                    && crate::birthday::punchable(&self.config.endpoints, self.config.observed)
                {
                    let due = self.punch.schedule.due_at(now);
                    at(due.map(|t| t.max(env.punch_budget_at)), Timer::Punch);
                }
            }
            let route = self.route(env.relay_up);
            at(self.probes.rtt_at(route, now), Timer::Rtt);
            if let Some(k) = env.keepalive {
                // On a grid: the keepalives of many peers go in one wake-up, at most a
                // second late.
                let every = Duration::from_secs(k.into());
                let due = self.path.last_tx.map_or(now, |t| t + every);
                let due = crate::node::snap(env.origin, due, KEEPALIVE_GRID);
                at(Some(due), Timer::Keepalive);
            }
            if let Some(m) = self.measure.as_deref() {
                at(
                    m.report_at(self.last_data_rx, &env.quality),
                    Timer::LossReport,
                );
                at(m.expiry(), Timer::Quality);
                for (leg, every) in self
                    .probe_plan(m, env.relay_up, &env.quality, now)
                    .into_iter()
                    .flatten()
                {
                    at(Some(m.probe_at(leg, every, now)), Timer::Quality);
                }
            }
        }
        let path_socket = self.path.endpoint().map(|e| e.socket);
        at(
            self.punch.kept_deadline(path_socket, now),
            Timer::KeptSocket,
        );
        next
    }

    /// Whether WireGuard's timers need the fast tick: data waits for a handshake, traffic
    /// lately, or, without a session, anything sent or heard lately (a handshake WireGuard may
    /// be retransmitting). (Data, not keepalives, for an established session: those start none
    /// of WireGuard's timers.) A peer without a session and without any of these (its keys
    /// expired, or it never answered) has nothing for WireGuard to do but wait.
    fn wireguard_active(&self, now: Instant) -> bool {
        let lately = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WIREGUARD)
        };
        self.handshake.waiting()
            || lately(self.last_data)
            || lately(self.last_data_rx)
            || (!self.session.established() && (lately(self.path.last_tx) || lately(self.last_rx)))
    }

    pub(crate) fn key(&self) -> PublicKey {
        self.config.key
    }

    /// The path traffic to this peer takes now.
    pub(crate) fn route(&self, relay_up: bool) -> Path {
        match self.path.sending_direct(relay_up) {
            Some(e) => Path::Direct(e.addr),
            None if relay_up => Path::Relay,
            None => Path::None,
        }
    }

    /// A peer past [`handshake::PROACTIVE_PEERS`] that nothing has asked a session of yet: no
    /// WireGuard state, no handshake planned. The first packet either way starts one.
    pub(crate) fn on_demand(&self) -> bool {
        !self.session.in_use() && self.handshake.wait == handshake::Wait::Idle
    }

    /// Whether traffic to the peer flows (data sent within [`ACTIVE_TRAFFIC`]).
    pub(crate) fn flowing(&self, now: Instant) -> bool {
        self.last_data
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_TRAFFIC)
    }

    /// Starts a new handshake now, to every candidate, unless one was forced within
    /// REKEY_TIMEOUT.
    pub(crate) fn force_handshake(&mut self, cx: &mut Ctx<'_>) {
        if !self.handshake.force(cx.now) {
            return;
        }
        let previous = self.path.forget();
        if let Output::Network(bytes) = self.session.force_handshake(cx.buf, cx.now) {
            self.path.send(&self.config, bytes, true, cx.now, cx.out);
            // The endpoint that worked last is often the only one that can (a symmetric NAT's
            // port toward us is in no candidate list, and an extra socket's mapping is the only
            // one the peer's NAT lets in): try it too.
            if let Some(p) = previous
                .filter(|p| p.socket != SocketId::MAIN || !self.config.endpoints.contains(&p.addr))
            {
                cx.out.probe(p.socket, p.addr, bytes, cx.now);
            }
        }
    }

    /// Encrypts `inner` (empty: a keepalive) and sends it by the best path there is; see
    /// [`PathState::send`]. `tracked`: the direct path owes an answer to it (not so for path MTU probes,
    /// which are meant to be lost when too large).
    pub(crate) fn seal_and_send(&mut self, inner: &[u8], tracked: bool, cx: &mut Ctx<'_>) {
        if let Output::Network(bytes) = self.session.encapsulate(inner, cx.buf, cx.now) {
            let leg = self.path.send(&self.config, bytes, tracked, cx.now, cx.out);
            log_sent(&mut self.measure, leg, bytes);
        }
    }

    /// An in-tunnel message (`mesh_proto::tunnel`) from this node to the peer, padded to
    /// `pad_to` bytes.
    pub(crate) fn message(
        &self,
        me: Ipv4Addr,
        kind: pmtu::Kind,
        id: u16,
        size: u16,
        pad_to: usize,
    ) -> Vec<u8> {
        pmtu::build(
            me,
            self.config.address,
            pmtu::Message { kind, id, size },
            pad_to,
        )
    }

    /// Sends a small probe inside the tunnel on the peer's current path and remembers it.
    pub(crate) fn ping(&mut self, purpose: Purpose, cx: &mut Ctx<'_>) {
        let id = probes::next_ping_id(cx.next_ping);
        let p = self.message(cx.me, pmtu::Kind::Probe, id, 0, 0);
        self.probes.sent(id, purpose, cx.now);
        self.seal_and_send(&p, true, cx);
    }

    /// Sends a small probe inside the tunnel on `leg` (the direct path, or through the relay),
    /// whichever path traffic takes, and remembers it; the answer comes back the same way.
    fn ping_on(&mut self, leg: Leg, purpose: Purpose, cx: &mut Ctx<'_>) {
        let direct = self.path.endpoint().filter(|_| leg == Leg::Direct);
        if leg == Leg::Direct && direct.is_none() {
            return;
        }
        let id = probes::next_ping_id(cx.next_ping);
        let p = self.message(cx.me, pmtu::Kind::Probe, id, 0, 0);
        self.probes.sent(id, purpose, cx.now);
        if let Output::Network(bytes) = self.session.encapsulate(&p, cx.buf, cx.now) {
            match direct {
                Some(e) => cx.out.udp(e.socket, e.addr, bytes),
                None => cx.out.relay(self.config.key, bytes),
            }
            self.path.sent(Some(leg), true, cx.now);
            log_sent(&mut self.measure, Some(leg), bytes);
        }
    }

    /// One datagram from this peer (already known to be addressed to its session), from `via`.
    /// Replies (handshake responses, queued packets) go back the way it came; inner packets
    /// addressed to this node go to the TUN device.
    /// (`opened`: the datagram is an initiation whose first half the node opened.)
    pub(crate) fn decapsulate(
        &mut self,
        via: Via,
        datagram: &[u8],
        opened: Option<Box<crate::session::Opened>>,
        cx: &mut Ctx<'_>,
    ) -> Received {
        // Opened straight into a buffer that can go to the TUN device as it is (behind the
        // room the driver asked for).
        let room = cx.out.tun_headroom;
        let mut buf = cx.out.buffer();
        buf.resize(room + datagram.len().max(crate::session::MIN_BUFFER), 0);
        self.take(
            via,
            datagram,
            buf,
            room,
            cx,
            |session, dst, now| match opened {
                Some(o) => session.decapsulate_opened(*o, datagram, dst, now),
                None => session.decapsulate(datagram, dst, now),
            },
        )
    }

    /// [`Peer::decapsulate`] of a data message the driver opened
    /// ([`crate::Node::set_deferred_opening`]): its packet lies in the item's buffer already.
    pub(crate) fn receive_opened(
        &mut self,
        via: Via,
        item: crate::opening::Item,
        cx: &mut Ctx<'_>,
    ) -> Received {
        let crate::opening::Item {
            header,
            buf,
            room,
            state,
            ..
        } = item;
        self.take(
            via,
            &header,
            buf,
            room,
            cx,
            |session, dst, now| match &state {
                crate::opening::State::Opened(o) => session.accept_opened(o, dst, now),
                _ => Output::Error(SessionError::Rejected),
            },
        )
    }

    /// What the session made of `datagram` (`decapsulate` writes into `buf[room..]`): replies
    /// go back the way it came, packets to the TUN device in `buf`, in-tunnel messages to the
    /// caller.
    fn take(
        &mut self,
        via: Via,
        datagram: &[u8],
        mut buf: Vec<u8>,
        room: usize,
        cx: &mut Ctx<'_>,
        decapsulate: impl for<'b> FnOnce(&mut Session, &'b mut [u8], Instant) -> Output<'b>,
    ) -> Received {
        let key = self.key();
        let leg = match via {
            Via::Direct(_) => Leg::Direct,
            Via::Relay => Leg::Relay,
        };
        let decapsulated = decapsulate(&mut self.session, &mut buf[room..], cx.now);
        let received = match decapsulated {
            Output::Network(bytes) => {
                self.path.last_tx = Some(cx.now);
                cx.out.reply(via, key, bytes);
                // Packets queued during the handshake follow the response.
                while let Output::Network(bytes) = self.session.flush_queued(cx.buf, cx.now) {
                    cx.out.reply(via, key, bytes);
                    log_sent(&mut self.measure, Some(leg), bytes);
                }
                Received::Authenticated(None)
            }
            out @ (Output::TunnelV4(..) | Output::TunnelV6(..)) => {
                let (inner, source, dst) = match out {
                    Output::TunnelV4(inner, source) => (
                        inner,
                        IpAddr::V4(source),
                        crate::packet::ipv4_addrs(inner).map(|(_, d)| IpAddr::V4(d)),
                    ),
                    Output::TunnelV6(inner, source) => (
                        inner,
                        IpAddr::V6(source),
                        crate::packet::ipv6_addrs(inner).map(|(_, d)| IpAddr::V6(d)),
                    ),
                    _ => return Received::Authenticated(None),
                };
                if let Some(m) = self.measure.as_deref_mut() {
                    // (Path MTU probes count neither here nor at their sender: a probe too
                    // large for the path is meant to be lost.)
                    if !is_path_mtu_probe(inner) {
                        m.received(leg, datagram);
                    }
                }
                let to_us = dst.is_some_and(|dst| {
                    dst == IpAddr::V4(cx.me)
                        || cx.me6.is_some_and(|me6| dst == IpAddr::V6(me6))
                        || cx.routes.iter().any(|r| r.contains(&dst))
                });
                let len = inner.len();
                if !cx.sources.may_send(
                    &self.config.key,
                    self.config.address,
                    self.config.address6,
                    source,
                ) {
                    cx.out.counters.spoofed_packets += 1;
                } else if !to_us {
                    // A member may only reach this node and the prefixes it routes (approved
                    // by the controller), not use it as a router into its LAN, its cloud's
                    // metadata service or any other network.
                    cx.out.counters.misdirected_packets += 1;
                } else if let Some(message) = in_tunnel(inner) {
                    cx.out.recycle(buf);
                    let Ok(message) = message else {
                        cx.out.counters.malformed_loss_reports += 1;
                        return Received::Authenticated(None);
                    };
                    return Received::Authenticated(Some(message));
                } else {
                    // Traffic (not an in-tunnel probe, which needs none of WireGuard's timers).
                    self.last_data_rx = Some(cx.now);
                    if self.measure.is_none() {
                        self.measure = Some(start_measuring(cx.quality, self.index, cx.now));
                    }
                    // The session opened the packet at the start of the room's end.
                    buf[..room].fill(0);
                    buf.truncate(room + len);
                    cx.out.deliver_buffer(buf);
                    return Received::Authenticated(None);
                }
                Received::Authenticated(None)
            }
            Output::Done => {
                // A keepalive (or a cookie reply, which has no counter).
                if let Some(m) = self.measure.as_deref_mut() {
                    m.received(leg, datagram);
                }
                Received::Authenticated(None)
            }
            Output::Error(_) => {
                cx.out.counters.rejected_packets += 1;
                // Transport data under a session we do not have: the two sides disagree on the
                // current session (crossed handshakes). The side with the lower key starts over
                // at once; the other waits for the stale-session rule, so they do not cross
                // again.
                if datagram[0] == 4 && cx.me_key < &key.0 {
                    self.force_handshake(cx);
                }
                Received::Refused
            }
        };
        cx.out.recycle(buf);
        received
    }

    /// Encrypts an inner packet from the TUN device straight into the transmit queue when the
    /// session is up and the path is one place (direct or relay); returns false when it could
    /// not (no session or no single path yet), and the caller takes the general way.
    pub(crate) fn seal_data(&mut self, packet: &[u8], cx: &mut Ctx<'_>) -> bool {
        if !self.session.established() {
            return false;
        }
        let Some(destination) = self.path.destination(&self.config, cx.out.relay_up) else {
            return false;
        };
        let room =
            (packet.len() + crate::session::DATA_OVERHEAD + 16).max(crate::session::MIN_BUFFER);
        let leg = match destination {
            crate::node::Destination::Udp { .. } => Leg::Direct,
            crate::node::Destination::Relay { .. } => Leg::Relay,
        };
        let (quality, index, now) = (cx.quality, self.index, cx.now);
        let log = &mut self
            .measure
            .get_or_insert_with(|| start_measuring(quality, index, now))
            .sent;
        let session = &mut self.session;
        let mut other: Option<Vec<u8>> = None;
        let mut queued = false;
        // The driver seals UDP batches on another thread when it asked to: here the message
        // only gets its counter and header.
        let defer = cx.out.defer && leg == Leg::Direct;
        let mut reserved = None;
        let sealed = cx.out.seal(destination, room, |buf| {
            if defer {
                if let Some((n, key)) = session.reserve(packet, buf, now) {
                    log.note_message(leg, &buf[..n]);
                    reserved = Some(key);
                    return Some(n);
                }
            }
            match session.encapsulate(packet, buf, now) {
                Output::Network(b) if b.first() == Some(&4) => {
                    log.note_message(leg, b);
                    Some(b.len())
                }
                // The session was gone after all (a handshake initiation instead).
                Output::Network(b) => {
                    other = Some(b.to_vec());
                    None
                }
                Output::Done => {
                    queued = true;
                    None
                }
                _ => None,
            }
        });
        if let Some(key) = reserved {
            cx.out.defer_last(key);
        }
        if queued {
            // Queued behind a handshake in progress.
            self.handshake.data_waits(cx.now);
        }
        if let Some(bytes) = other {
            self.handshake.data_waits(cx.now);
            self.handshake.data_sent(cx.now);
            self.path.send(&self.config, &bytes, true, cx.now, cx.out);
            return true;
        }
        if sealed.is_some() {
            self.handshake.data_sent(cx.now);
            self.path.sent(Some(leg), true, cx.now);
        }
        true
    }

    /// Something authenticated came from the peer.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_rx = Some(now);
        self.handshake.heard(self.session.established());
    }

    /// An in-tunnel probe or answer, or a punch (not a birthday join, which the node handles)
    /// from `via`.
    pub(crate) fn on_probe(&mut self, m: pmtu::Message, via: Via, cx: &mut Ctx<'_>) {
        let key = self.key();
        if m.kind == pmtu::Kind::Punch {
            // The peer primed its NAT toward us: probe it now (unless a path already works),
            // then say so.
            if self.path.rounds.may_answer(cx.now) {
                if self.path.direct.is_none() {
                    self.fire(cx);
                }
                let ack = self.message(cx.me, pmtu::Kind::PunchAck, m.id, 0, 0);
                self.seal_and_send(&ack, false, cx);
                cx.out.counters.punch_answers += 1;
            }
        } else if m.kind == pmtu::Kind::PunchAck {
            // The peer's probes opened its NAT toward us: ours pass now.
            if self.path.rounds.acknowledged(m.id, cx.now) && self.path.direct.is_none() {
                self.fire(cx);
            }
        } else if m.kind == pmtu::Kind::Probe {
            let ack = self.message(cx.me, pmtu::Kind::Ack, m.id, m.size, 0);
            if let Output::Network(bytes) = self.session.encapsulate(&ack, cx.buf, cx.now) {
                cx.out.reply(via, key, bytes);
                log_sent(&mut self.measure, Some(Leg::of(via)), bytes);
            }
        } else if probes::PING_IDS.contains(&m.id) && self.families.owns(m.id) {
            let (Via::Direct(from), Some((rtt, _))) = (
                via,
                self.probes
                    .answered(m.id, Path::Direct(via_addr(via)), cx.now),
            ) else {
                return;
            };
            if let Some(to) = self.families.answered(m.id, from, rtt, cx.now) {
                if self.path.endpoint() != Some(to) {
                    tracing::debug!(peer = %self.config.name, key = %self.config.key.short(), to = %to.addr, rtt_us = rtt.as_micros() as u64, "the other address family is the better direct path");
                    self.path.switch(to, cx.now);
                    if self.path.sending_direct(cx.out.relay_up).is_some() {
                        cx.out.events.push_back(Event::PathChanged {
                            key,
                            path: Path::Direct(to.addr),
                        });
                    }
                }
            }
        } else if probes::PING_IDS.contains(&m.id) {
            let (path, leg) = match via {
                Via::Direct(from) => (Path::Direct(from.addr), Leg::Direct),
                Via::Relay => (Path::Relay, Leg::Relay),
            };
            match self.probes.answered(m.id, path, cx.now) {
                Some((rtt, purpose)) => {
                    if let Some(q) = self.measure.as_deref_mut() {
                        q.window(leg).rtt(rtt, cx.now);
                    }
                    if purpose == Purpose::User {
                        cx.out.events.push_back(Event::Pong { key, rtt, path });
                    }
                }
                None => {
                    if let Some(q) = self.measure.as_deref_mut() {
                        q.answered(m.id, cx.now);
                    }
                }
            }
        } else if let Some(mtu) = self.probes.mtu.on_ack(m.id, m.size, cx.now) {
            self.report_mtu(mtu, cx);
        }
    }

    /// An authenticated message came straight from `from`. Makes it the direct path unless a
    /// live one exists (or `won`, a socket of the attempt in flight, came while a path exists);
    /// answers at once where that makes the peer upgrade too. Returns whether the path switched
    /// to `from`.
    pub(crate) fn heard_direct(&mut self, from: Endpoint, won: bool, cx: &mut Ctx<'_>) -> bool {
        let now = cx.now;
        if self.path.heard_again(from, now) {
            return false;
        }
        // A path that is alive keeps the peer: a second one that also works (the socket a
        // birthday attempt won beside the main one, a LAN path beside the public one) would
        // otherwise take turns with it on every packet. A path quiet for PATH_PROBE_INTERVAL
        // gives way (the peer roamed, its NAT rebound).
        let current_alive = self.path.other_alive(from, now);
        let heard_before = self.path.heard_direct(from, now);
        let had_path = self.path.direct.is_some();
        let may_switch = (!won || !had_path) && !current_alive;
        let switched = may_switch && self.path.endpoint() != Some(from);
        if switched {
            self.path.switch(from, now);
            tracing::debug!(peer = %self.config.name, key = %self.config.key.short(), from = %from.addr, socket = %from.socket, "direct path confirmed");
            // (While the relay carries the traffic for quality, it goes on doing so.)
            if self.path.sending_direct(cx.out.relay_up).is_some() {
                cx.out.events.push_back(Event::PathChanged {
                    key: self.config.key,
                    path: Path::Direct(from.addr),
                });
            }
            // A probe got through: answer on the same path at once, so that the peer upgrades
            // to it too instead of waiting for its own traffic.
            if !had_path && self.session.established() {
                if let Output::Network(bytes) = self.session.encapsulate(&[], cx.buf, cx.now) {
                    cx.out.udp(from.socket, from.addr, bytes);
                    self.path.last_direct_tx = Some(now);
                    log_sent(&mut self.measure, Some(Leg::Direct), bytes);
                }
            }
        }
        // The peer went quiet on this path and now reaches us on it again: it may have fallen
        // back to the relay and be probing its candidates while we still use the path. Answer
        // at once (at most once per PATH_PROBE_INTERVAL), so it upgrades again without waiting
        // for our next keepalive.
        // (Instants compared against one bound: cheaper per packet than two durations.)
        let lately = now.checked_sub(PATH_PROBE_INTERVAL);
        let recent = |t: Instant| lately.is_none_or(|l| t > l);
        let was_quiet = heard_before.is_none_or(|t| !recent(t));
        let sent_lately = self.path.last_direct_tx.is_some_and(recent);
        if was_quiet
            && !sent_lately
            && self.path.endpoint() == Some(from)
            && self.session.established()
        {
            if let Output::Network(bytes) = self.session.encapsulate(&[], cx.buf, cx.now) {
                cx.out.udp(from.socket, from.addr, bytes);
                self.path.last_direct_tx = Some(now);
                log_sent(&mut self.measure, Some(Leg::Direct), bytes);
            }
        }
        switched
    }

    /// Drops the direct path because it runs through the overlay itself.
    pub(crate) fn drop_path_through_overlay(&mut self, relay_up: bool, cx_events: &mut Ctx<'_>) {
        tracing::warn!(peer = %self.config.name, key = %self.config.key.short(), "direct path goes through the overlay itself; dropping it");
        self.path.direct = None;
        self.path.rounds.last = None;
        cx_events.out.events.push_back(Event::PathChanged {
            key: self.config.key,
            path: if relay_up { Path::Relay } else { Path::None },
        });
    }

    // ---- timers, in the order the node runs them -------------------------------------------

    /// WireGuard's own timers (rekey, its keepalives, session expiry), when their tick is due.
    /// Returns the wait until the next tick when this one ran (the node puts it on its grid).
    pub(crate) fn wireguard_timers(&mut self, cx: &mut Ctx<'_>) -> Option<Duration> {
        if cx.now < self.wireguard_at {
            return None;
        }
        self.run_wireguard_timers(cx);
        self.idle_tick = !self.wireguard_active(cx.now);
        if !self.idle_tick {
            self.wireguard_at = cx.now + crate::node::TICK;
            return Some(crate::node::TICK);
        }
        self.wireguard_at = self.next_wireguard_deadline(cx.now);
        Some(IDLE_WIREGUARD_TICK)
    }

    /// One run of WireGuard's timers; what they send goes by the best path.
    fn run_wireguard_timers(&mut self, cx: &mut Ctx<'_>) {
        match self.session.update_timers(cx.buf, cx.now) {
            Output::Network(bytes) => {
                let leg = self.path.send(&self.config, bytes, true, cx.now, cx.out);
                log_sent(&mut self.measure, leg, bytes);
            }
            Output::Error(SessionError::Expired) => {
                // Forget the endpoint: the next handshake tries every candidate again.
                self.path.direct = None;
            }
            _ => {}
        }
    }

    /// When WireGuard's timers next act on an idle peer: the tunnel's own earliest deadline
    /// (a rekey, the keys' end), or a coarse tick when it has none.
    fn next_wireguard_deadline(&self, now: Instant) -> Instant {
        self.session
            .next_deadline()
            .map_or(now + IDLE_WIREGUARD_TICK, |t| t.max(now))
    }

    /// Traffic to or from the peer: WireGuard's timers need the fast tick again from now.
    /// Returns whether that brought the tick forward (the node then recomputes the wake-up).
    #[inline]
    pub(crate) fn wake_wireguard(&mut self, now: Instant) -> bool {
        if !self.idle_tick {
            // (The data path's case: one check per packet.)
            return false;
        }
        self.wake_idle(now);
        true
    }

    /// [`Peer::wake_wireguard`] for an idle peer.
    #[cold]
    fn wake_idle(&mut self, now: Instant) {
        self.idle_tick = false;
        self.wireguard_at = self.wireguard_at.min(now + crate::node::TICK);
    }

    /// Handshake retransmission while data waits, and the proactive handshake.
    pub(crate) fn handshake_timers(&mut self, cx: &mut Ctx<'_>) {
        let jitter = retry_jitter(self.index);
        match self
            .handshake
            .poll(self.session.established(), jitter, cx.now)
        {
            Due::Nothing => {}
            Due::GaveUp => cx
                .out
                .events
                .push_back(Event::PeerUnreachable { key: self.key() }),
            Due::Retransmit | Due::Proactive => self.force_handshake(cx),
        }
    }

    /// Path MTU: start a search on a new direct path, send its probes, report results.
    pub(crate) fn mtu_timers(&mut self, cx: &mut Ctx<'_>) {
        let endpoint = self.path.sending_direct(cx.out.relay_up);
        if endpoint.is_some() && self.probes.mtu_endpoint != endpoint {
            // A new path (or the first one): find out what it carries.
            self.probes.mtu_endpoint = endpoint;
            self.probes.mtu.start(cx.now);
        }
        // The search measures the direct path it started on; while traffic is on the relay (or
        // another path) it waits.
        let on_probed_path = endpoint.is_some() && endpoint == self.probes.mtu_endpoint;
        if let Some((id, size)) = on_probed_path
            .then(|| self.probes.mtu.poll_probe(cx.now))
            .flatten()
        {
            let p = self.message(cx.me, pmtu::Kind::Probe, id, size, usize::from(size));
            // Not logged for loss reports: a probe larger than the path carries is meant to be
            // lost, which is no loss of the path's.
            if let Output::Network(bytes) = self.session.encapsulate(&p, cx.buf, cx.now) {
                self.path.send(&self.config, bytes, false, cx.now, cx.out);
            }
        }
        if let Some(mtu) = self.probes.mtu.result() {
            if self.probes.reported_mtu != Some(mtu) {
                self.report_mtu(mtu, cx);
            }
        }
    }

    /// Keeps the peer on the best path: probes a quiet direct path and falls back to the relay
    /// when it dies; while on the relay, probes every candidate so a direct path can open.
    pub(crate) fn path_timers(&mut self, cx: &mut Ctx<'_>) {
        let relay_up = cx.out.relay_up;
        let on_direct = self.path.sending_direct(relay_up).is_some();
        let was = self.path.endpoint();
        match self.path.poll_direct(relay_up, self.last_rx, cx.now) {
            DirectDue::Dead { quiet } => {
                self.families.retain(&self.config.endpoints);
                let other = was.and_then(|dead| self.families.fallback(dead, cx.now));
                if let Some(to) = other {
                    // The other family answered lately: it carries the traffic at once.
                    tracing::debug!(peer = %self.config.name, key = %self.config.key.short(), quiet_ms = quiet.as_millis() as u64, to = %to.addr, "direct path silent; moving to the other address family");
                    self.path.switch(to, cx.now);
                    if self.path.sending_direct(relay_up).is_some() {
                        cx.out.events.push_back(Event::PathChanged {
                            key: self.key(),
                            path: Path::Direct(to.addr),
                        });
                    }
                    return;
                }
                tracing::debug!(peer = %self.config.name, key = %self.config.key.short(), quiet_ms = quiet.as_millis() as u64, "direct path silent; falling back to the relay");
                self.punch.schedule.reset();
                if on_direct {
                    cx.out.events.push_back(Event::PathChanged {
                        key: self.key(),
                        path: Path::Relay,
                    });
                }
                return;
            }
            DirectDue::Probe => {
                // The direct path's liveness, whichever path the traffic takes; and, half-way
                // to the timeout and until the peer is heard some other way, the peer's through
                // the relay: what tells a dead path from a silent peer. (Not sooner: a lost
                // packet or two on a lossy path should not send probes to the relay.)
                self.ping_on(Leg::Direct, Purpose::Liveness, cx);
                let since = self.path.direct.and_then(|d| d.unanswered_since);
                let relay_probe = since.is_some_and(|s| {
                    cx.now.saturating_duration_since(s) >= PATH_TIMEOUT / 2
                        && !path::heard_after(self.last_rx, s)
                });
                if relay_up && relay_probe {
                    self.ping_on(Leg::Relay, Purpose::Liveness, cx);
                }
                return;
            }
            DirectDue::Nothing if self.path.direct.is_some() => return,
            DirectDue::Nothing => {}
        }
        let Some(failed) = self.path.poll_round(relay_up, self.flowing(cx.now), cx.now) else {
            return;
        };
        if failed {
            self.punch.schedule.round_failed();
        }
        if path::coordinated(&self.config) {
            // Open our NAT toward the peer's candidates, then ask the peer to probe ours.
            self.prime(cx);
            let id = self.path.rounds.punch(cx.now);
            let punch = self.message(cx.me, pmtu::Kind::Punch, id, 0, 0);
            self.seal_and_send(&punch, false, cx);
            cx.out.counters.punch_rounds += 1;
        } else {
            self.fire(cx);
        }
    }

    /// A family round when one is due (see [`family`]): an RTT ping on the direct path and one
    /// to each candidate of the other address family.
    pub(crate) fn family_timers(&mut self, cx: &mut Ctx<'_>) {
        let Some(path) = self.path.endpoint() else {
            return;
        };
        if family::others(path.addr, &self.config.endpoints)
            .next()
            .is_none()
        {
            return;
        }
        if !self.families.poll(path, self.flowing(cx.now), cx.now) {
            return;
        }
        let others: Vec<SocketAddr> = family::others(path.addr, &self.config.endpoints)
            .copied()
            .collect();
        let targets = std::iter::once(path).chain(others.into_iter().map(|addr| Endpoint {
            socket: SocketId::MAIN,
            addr,
        }));
        for to in targets {
            let id = probes::next_ping_id(cx.next_ping);
            let p = self.message(cx.me, pmtu::Kind::Probe, id, 0, 0);
            let Output::Network(bytes) = self.session.encapsulate(&p, cx.buf, cx.now) else {
                continue;
            };
            let went = if to == path {
                cx.out.udp(to.socket, to.addr, bytes);
                true
            } else {
                cx.out.probe(to.socket, to.addr, bytes, cx.now)
            };
            if went {
                self.probes.sent(id, Purpose::Family, cx.now);
                self.families.sent(id, to);
            }
        }
    }

    /// Primers to every candidate of the peer: keepalives with a TTL that opens our own NAT
    /// toward them and dies before the peer's gateway (they reach a peer on our LAN).
    fn prime(&mut self, cx: &mut Ctx<'_>) {
        if let Output::Network(bytes) = self.session.encapsulate(&[], cx.buf, cx.now) {
            for dst in self.config.endpoints.iter().take(MAX_ENDPOINTS) {
                cx.out.primer(SocketId::MAIN, *dst, bytes, cx.now);
            }
        }
    }

    /// Probes (keepalives) to every candidate of the peer and a few predicted ports.
    fn fire(&mut self, cx: &mut Ctx<'_>) {
        if let Output::Network(bytes) = self.session.encapsulate(&[], cx.buf, cx.now) {
            for dst in self.config.endpoints.iter().take(MAX_ENDPOINTS) {
                cx.out.probe(SocketId::MAIN, *dst, bytes, cx.now);
            }
            // Cheap port prediction: a NAT that maps each destination to the next free port
            // gives the mapping toward us a port just above the one the controller saw (the
            // first candidate). Bounded: PREDICTED_PORTS extra packets per round.
            if let Some(first) = self.config.endpoints.first() {
                for step in 1..=PREDICTED_PORTS {
                    if let Some(port) = first.port().checked_add(step) {
                        let dst = SocketAddr::new(first.ip(), port);
                        cx.out.probe(SocketId::MAIN, dst, bytes, cx.now);
                    }
                }
            }
        }
    }

    /// Status shows the RTT of the path in use: measure it once per session and path.
    pub(crate) fn rtt_timer(&mut self, cx: &mut Ctx<'_>) {
        let path = self.route(cx.out.relay_up);
        if self.probes.rtt_due(path, cx.now) {
            self.ping(Purpose::Rtt, cx);
        }
    }

    /// Persistent keepalive: keeps NAT mappings (ours and the peer's filters) open.
    pub(crate) fn keepalive_timer(&mut self, keepalive: Option<u16>, cx: &mut Ctx<'_>) {
        let Some(k) = keepalive else {
            return;
        };
        let idle = self
            .path
            .last_tx
            .is_none_or(|t| cx.now.saturating_duration_since(t) >= Duration::from_secs(k.into()));
        if self.session.established() && idle {
            self.seal_and_send(&[], false, cx);
        }
    }

    /// Stale session: we keep sending and nothing authenticated comes back.
    pub(crate) fn stale_timer(&mut self, cx: &mut Ctx<'_>) {
        if self.handshake.stale(cx.now) {
            self.force_handshake(cx);
        }
    }

    /// Quality: loss reports to the peer, quality probes and their timeouts, the choice of
    /// path; and an idle peer's measurements go.
    pub(crate) fn quality_timers(&mut self, cx: &mut Ctx<'_>) {
        if self.measure.is_none() {
            return;
        }
        let now = cx.now;
        let config = *cx.quality;
        let flowing = self.flowing(now);
        let receiving = self
            .last_data_rx
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_TRAFFIC);
        if !flowing && !receiving {
            // Idle: what was measured is stale by the time traffic comes again. (The choice
            // of path stays.)
            self.measure = None;
            return;
        }
        if !self.session.established() {
            return;
        }
        let relay_up = cx.out.relay_up;
        let direct = self.path.endpoint();
        let Some(m) = self.measure.as_deref_mut() else {
            return;
        };
        m.direct_is(direct, now);
        m.expire(now);
        let mut reports = [None, None];
        if m.report_at(self.last_data_rx, &config)
            .is_some_and(|t| t <= now)
        {
            m.reported_at = Some(now);
            for (slot, leg) in reports.iter_mut().zip(Leg::BOTH) {
                if let Some(r) = m.tally(leg).take(leg) {
                    *slot = Some((m.next_report, r));
                    m.next_report = m.next_report.wrapping_add(1);
                }
            }
        }
        let Some(m) = self.measure.as_deref() else {
            return;
        };
        if flowing && config.switching && relay_up {
            if let Some(endpoint) = direct {
                let d = m.estimate(Leg::Direct, &config, now);
                let r = m.estimate(Leg::Relay, &config, now);
                if let Some(switch) = self.path.choice.decide(&d, &r, &config, now) {
                    let (path, loss) = match switch {
                        Switch::ToRelay => {
                            cx.out.counters.quality_switches_to_relay += 1;
                            (Path::Relay, d.loss)
                        }
                        Switch::ToDirect => {
                            cx.out.counters.quality_switches_to_direct += 1;
                            (Path::Direct(endpoint.addr), d.loss)
                        }
                    };
                    tracing::info!(peer = %self.config.name, key = %self.config.key.short(), %path, direct_loss = ?loss, relay_loss = ?r.loss, "path changed for quality");
                    cx.out.events.push_back(Event::PathChanged {
                        key: self.config.key,
                        path,
                    });
                }
            }
        }
        let plan = self.probe_plan(m, relay_up, &config, now);
        let due = plan.map(|p| p.filter(|(leg, every)| m.probe_at(*leg, *every, now) <= now));
        for (id, r) in reports.into_iter().flatten() {
            let p = tunnel::build_report(cx.me, self.config.address, id, &r);
            self.seal_and_send(&p, false, cx);
            cx.out.counters.loss_reports_sent += 1;
        }
        for (leg, _) in due.into_iter().flatten() {
            self.probe_on(leg, cx);
        }
    }

    /// Which legs get quality probes now, and how often: the leg in use every
    /// `active_probe_interval` if data went to the peer since its last probe; while data flows
    /// and a switch is weighed, the other one every `probe_interval` (the relay while the direct
    /// path loses, the direct path while the relay carries the traffic for quality).
    fn probe_plan(
        &self,
        m: &Measure,
        relay_up: bool,
        config: &QualityConfig,
        now: Instant,
    ) -> [Option<(Leg, Duration)>; 2] {
        if !self.flowing(now) {
            return [None, None];
        }
        let in_use = if self.path.sending_direct(relay_up).is_some() {
            Leg::Direct
        } else if relay_up {
            Leg::Relay
        } else {
            return [None, None];
        };
        let weighing = config.switching
            && relay_up
            && self.path.endpoint().is_some()
            && match in_use {
                Leg::Direct => m
                    .estimate(Leg::Direct, config, now)
                    .loss
                    .is_some_and(|l| l >= config.switch_loss),
                Leg::Relay => self.path.choice.prefers_relay(),
            };
        let sent_since = self
            .last_data
            .is_some_and(|t| m.last_probe(in_use).is_none_or(|p| t > p));
        [
            sent_since.then_some((in_use, config.active_probe_interval)),
            weighing.then_some((in_use.other(), config.probe_interval)),
        ]
    }

    /// A quality probe on `leg`, whichever leg the traffic takes.
    fn probe_on(&mut self, leg: Leg, cx: &mut Ctx<'_>) {
        let now = cx.now;
        let Some(m) = self.measure.as_deref_mut() else {
            return;
        };
        let id = probes::next_ping_id(cx.next_ping);
        m.probe_sent(id, leg, now);
        cx.out.counters.quality_probes_sent += 1;
        let probe = pmtu::Message {
            kind: pmtu::Kind::Probe,
            id,
            size: 0,
        };
        let p = pmtu::build(cx.me, self.config.address, probe, 0);
        let Output::Network(bytes) = self.session.encapsulate(&p, cx.buf, cx.now) else {
            return;
        };
        match leg {
            Leg::Direct => {
                let Some(e) = self.path.endpoint() else {
                    return;
                };
                cx.out.udp(e.socket, e.addr, bytes);
            }
            Leg::Relay => {
                if !cx.out.relay_up {
                    return;
                }
                cx.out.relay(self.config.key, bytes);
            }
        }
        self.path.sent(Some(leg), true, now);
        m.sent.note_message(leg, bytes);
    }

    /// The peer reported what it received of our data on one leg: what we sent there of that
    /// span tells the loss.
    pub(crate) fn on_loss_report(&mut self, report: LossReport, cx: &mut Ctx<'_>) {
        cx.out.counters.loss_reports_received += 1;
        let leg = Leg::from(report.path);
        let Some(m) = self.measure.as_deref_mut() else {
            cx.out.counters.loss_reports_unmatched += 1;
            return;
        };
        match m
            .sent
            .expected(leg, report.index, report.first, report.last)
        {
            Some(expected) if expected > 0 => {
                m.window(leg)
                    .reported(expected, u64::from(report.received), cx.now);
            }
            _ => cx.out.counters.loss_reports_unmatched += 1,
        }
    }

    /// What status shows of each leg: (direct, relay).
    pub(crate) fn quality_status(
        &self,
        config: &QualityConfig,
        now: Instant,
    ) -> (PathQuality, PathQuality) {
        match self.measure.as_deref() {
            Some(m) => (
                m.status(Leg::Direct, config, now),
                m.status(Leg::Relay, config, now),
            ),
            None => Default::default(),
        }
    }

    fn report_mtu(&mut self, mtu: u16, cx: &mut Ctx<'_>) {
        self.probes.reported_mtu = Some(mtu);
        let configured = cx.mtu;
        if mtu < configured {
            tracing::warn!(peer = %self.config.name, key = %self.config.key.short(), mtu, configured, "path carries smaller packets than the interface MTU");
        }
        cx.out.events.push_back(Event::PathMtu {
            key: self.config.key,
            address: self.config.address,
            address6: self.config.address6,
            mtu,
            configured,
        });
    }
}

/// Traffic started: measure the paths while it flows (`index`: the peer's).
#[cold]
fn start_measuring(config: &QualityConfig, index: u32, now: Instant) -> Box<Measure> {
    Box::new(Measure::new(config, index, now))
}

/// Logs a data message sealed for the peer on `leg` (if it went on one), while measuring.
#[inline]
fn log_sent(measure: &mut Option<Box<Measure>>, leg: Option<Leg>, bytes: &[u8]) {
    if let (Some(m), Some(leg)) = (measure.as_deref_mut(), leg) {
        m.sent.note_message(leg, bytes);
    }
}

/// Whether a decrypted packet is a path MTU probe (padded to the size it probes).
#[inline]
/// The address a message came from (unspecified for the relay, which family rounds never use).
fn via_addr(via: Via) -> SocketAddr {
    match via {
        Via::Direct(e) => e.addr,
        Via::Relay => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

fn is_path_mtu_probe(inner: &[u8]) -> bool {
    inner.get(9) == Some(&pmtu::PROTO)
        && pmtu::parse(inner)
            .is_some_and(|m| m.kind == pmtu::Kind::Probe && !probes::PING_IDS.contains(&m.id))
}

/// An in-tunnel message in a decrypted packet: `None` for ordinary traffic, `Some(Err)` for a
/// malformed loss report.
#[inline]
fn in_tunnel(inner: &[u8]) -> Option<Result<InTunnel, tunnel::ReportError>> {
    if inner.get(9) != Some(&pmtu::PROTO) {
        return None;
    }
    if let Some(m) = pmtu::parse(inner) {
        return Some(Ok(InTunnel::Message(m)));
    }
    let report = tunnel::parse_report(inner)?;
    Some(report.map(|(_, r)| InTunnel::Report(r)))
}

/// 0..=333 ms added to handshake retransmissions (WireGuard's REKEY_TIMEOUT_JITTER), fixed per
/// peer so a run stays deterministic, different between peers so retries do not march in
/// lockstep.
fn retry_jitter(index: u32) -> Duration {
    Duration::from_millis(u64::from(index.wrapping_mul(2_654_435_761) % 334))
}
