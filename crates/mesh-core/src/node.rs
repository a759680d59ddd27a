//! The node: peers, routing by overlay address, and the dispatch of every input to the part of
//! the peer it concerns.
//!
//! A datagram goes through a short chain: is its source allowed (not through the overlay, the
//! extra socket's own peer) → the handshake guard (mac1 and DH budget before any DH) → find the
//! peer (handshake initiation by key, everything else by receiver index) → check the sender
//! (the relay's word and the socket's owner agree with WireGuard's) → decapsulate → an
//! in-tunnel message or a packet for the TUN device → tell the peer's path what was
//! authenticated, and on which path. The peer's parts live in `peer`, the table in
//! `peers`, punching in [`crate::birthday`].

use crate::birthday::{self, BirthdayConfig, Intent, PeerState, Punching, Roles, Start};
pub use crate::counters::Counters;
use crate::guard::{GuardConfig, HandshakeGuard, Verdict};
pub use crate::io::{
    Destination, Event, NodeConfig, Output, Path, PathQuality, PeerStatus, QualityConfig, Source,
    Status, Transmit, Unsealed,
};
use crate::opening::{Item, Next, Opened, Opening, Pending, State};
use crate::outbox::{Ctx, Endpoint, Outbox, Via};
use crate::packet;
use crate::peer::probes::Purpose;
pub use crate::peer::Timer;
use crate::peer::{InTunnel, Peer, Received, TimerEnv};
use crate::peers::{PeerTable, Slot};
use crate::pmtu;
use crate::session::{self, Addressed, Output as Sealed, Session};
use crate::sockets::Owner;
use ipnet::IpNet;
use mesh_proto::PublicKey;
use mesh_wg::LocalKeys;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

pub use crate::outbox::{MAX_BATCH, MAX_BATCH_BYTES, SEAL_INLINE_BYTES, SEAL_INLINE_MAX};
pub use crate::peer::handshake::{
    PROACTIVE_FALLBACK, PROACTIVE_PEERS, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, STALE_SESSION,
};
pub use crate::peer::path::{
    ACTIVE_CANDIDATE_PROBE_INTERVAL, ACTIVE_TRAFFIC, CANDIDATE_PROBE_INTERVAL,
    MAX_CANDIDATE_PROBE_INTERVAL, PATH_PROBE_INTERVAL, PATH_TIMEOUT, PREDICTED_PORTS,
};
pub use crate::peer::probes::{PING_IDS, RTT_PROBE_SPACING};
pub use crate::peer::quality::PROBE_LOSS_TIMEOUT;
pub use crate::peer::PeerConfig;
pub use crate::sockets::SocketId;

/// How often WireGuard's own timers run (boringtun's device used the same cadence).
pub const TICK: Duration = Duration::from_millis(250);
/// Most datagrams the node sends to one IP address that is not a confirmed endpoint (candidate
/// probes, handshakes to candidates, birthday probes and sprays) per [`PROBE_BUDGET_WINDOW`]:
/// a member that reports someone else's address cannot aim the network's probes at it beyond
/// this. One birthday attempt (about 1,300 datagrams) fits.
pub const PROBE_BUDGET: u32 = 4096;
/// The window of [`PROBE_BUDGET`].
pub const PROBE_BUDGET_WINDOW: Duration = Duration::from_secs(60);
/// Default persistent keepalive, seconds: keeps NAT mappings open.
pub const DEFAULT_KEEPALIVE: u16 = 25;
/// Largest datagram the node handles: an inner packet of up to 65535 bytes plus overhead.
pub const MAX_DATAGRAM: usize = 65535 + session::DATA_OVERHEAD;
/// Most transmits or TUN packets queued before the oldest are dropped (bounds memory when the
/// driver does not drain).
pub const MAX_QUEUE: usize = 4096;

/// A mesh node. See the crate docs for the input/output contract.
pub struct Node {
    /// The static key, with its public half and the mac1 key derived once.
    local: LocalKeys,
    public: XPublic,
    /// The wall-clock time at an `Instant`, read once: what handshake initiations are stamped
    /// from.
    wall: session::WallClock,
    config: NodeConfig,
    peers: PeerTable,
    out: Outbox,
    /// A point of the node's tick grid: WireGuard's ticks fall on `origin + k * TICK`, so the
    /// ticks of many peers come in one wake-up (and a simulated node's phase is its own).
    origin: Instant,
    /// The latest time the driver gave (for calls that take none).
    now: Instant,
    /// The earliest peer or punching deadline, as last computed (never later than the real
    /// one: waking early only costs a check).
    wake: Option<(Instant, Timer)>,
    buf: Vec<u8>,
    next_ping: u16,
    punching: Punching,
    /// This node's NAT kind, once the driver learned it (see [`Node::set_nat`]).
    own_nat: Option<mesh_proto::control::NatKind>,
    /// What punching asked for and the node has not yet carried out (kept to reuse its memory).
    intents: Vec<(PublicKey, Intent)>,
    /// Checks every handshake's mac1 and DH budget before any DH.
    guard: HandshakeGuard,
    /// This node's IPv6 overlay address, once the controller assigned one
    /// ([`Node::set_address6`]).
    address6: Option<Ipv6Addr>,
    /// Destinations reached only through the overlay: never a peer's endpoint.
    excluded: Vec<IpNet>,
    /// The prefixes this node routes for its peers ([`Node::set_routes`]).
    routes: Vec<IpNet>,
    /// Who may send from which source address (rebuilt whenever the peer table changes).
    sources: crate::peers::Sources,
    /// How paths are measured and chosen ([`Node::set_quality`]).
    quality: QualityConfig,
    /// Data messages left to the driver to open, and what waits behind them
    /// ([`Node::set_deferred_opening`]).
    opening: Opening,
}

/// The context a peer acts in, built from the node's fields (a macro, so that the borrows of
/// `peers` and of the context's fields stay disjoint).
macro_rules! cx {
    ($node:ident, $now:expr) => {
        Ctx {
            now: $now,
            me: $node.config.address,
            me6: $node.address6,
            me_key: $node.public.as_bytes(),
            mtu: $node.config.mtu,
            buf: &mut $node.buf,
            out: &mut $node.out,
            next_ping: &mut $node.next_ping,
            own_nat: $node.own_nat,
            quality: &$node.quality,
            routes: &$node.routes,
            sources: &$node.sources,
        }
    };
}

impl Node {
    /// Creates a node with no peers. `index_seed` varies the WireGuard session indices between
    /// runs (any value works; tests pass a fixed one).
    pub fn new(config: NodeConfig, index_seed: u32, now: Instant) -> Self {
        let secret = StaticSecret::from(config.private_key);
        let public = XPublic::from(&secret);
        let mut key_bits = [0u8; 8];
        key_bits.copy_from_slice(&public.as_bytes()[..8]);
        let seed = u64::from_le_bytes(key_bits) ^ u64::from(index_seed);
        let guard = HandshakeGuard::new(&secret, GuardConfig::default(), now);
        Node {
            wall: session::wall_clock(now),
            local: LocalKeys::new(secret),
            public,
            config,
            peers: PeerTable::new(index_seed),
            out: Outbox::default(),
            origin: now + TICK,
            now,
            wake: None,
            buf: vec![0u8; MAX_DATAGRAM],
            next_ping: PING_IDS.start,
            own_nat: None,
            punching: Punching::new(seed),
            intents: Vec::new(),
            guard,
            address6: None,
            excluded: Vec::new(),
            routes: Vec::new(),
            sources: crate::peers::Sources::default(),
            quality: QualityConfig::default(),
            opening: Opening::default(),
        }
    }

    /// Sets how the node measures its paths to peers and when it moves a peer's traffic
    /// between its direct path and the relay for quality (see [`QualityConfig`]; on by default
    /// with [`QualityConfig::default`]). Values are kept within [`QualityConfig::bounded`].
    /// What was measured so far is dropped (it was measured over the old window); with
    /// switching off, peers on the relay for quality go back to their direct path at once.
    pub fn set_quality(&mut self, config: QualityConfig) {
        self.quality = config.bounded();
        let relay_up = self.out.relay_up;
        for (key, peer) in self.peers.iter_mut() {
            peer.measure = None;
            if !self.quality.switching && peer.path.choice.prefers_relay() {
                peer.path.choice = Default::default();
                if let Some(e) = peer.path.sending_direct(relay_up) {
                    self.out.events.push_back(Event::PathChanged {
                        key: *key,
                        path: Path::Direct(e.addr),
                    });
                }
            }
        }
        self.rearm_all(self.now);
    }

    /// Sets the prefixes this node routes for its peers (its pod subnet, say), as the
    /// controller approved them: packets from peers addressed inside them are delivered (the host
    /// routes them on), where otherwise only packets to the node's own address are.
    pub fn set_routes(&mut self, routes: Vec<IpNet>) {
        self.routes = routes;
    }

    /// Sets the destinations that the overlay itself reaches: the overlay range, addresses and
    /// routes of interfaces stacked on the overlay (a CNI's vxlan device), subnets routed over
    /// it, and this host's own addresses. No candidate inside them is ever probed and no
    /// datagram from inside them is taken as a peer's (WireGuard inside WireGuard is a routing
    /// loop); a peer whose direct path is inside them falls back to the relay at once.
    pub fn set_excluded(&mut self, excluded: Vec<IpNet>) {
        if excluded == self.excluded {
            return;
        }
        self.excluded = excluded;
        let relay_up = self.out.relay_up;
        let now = self.now;
        let mut cx = cx!(self, now);
        for (_, peer) in self.peers.iter_mut() {
            cx.out.counters.refused_candidates +=
                refuse_excluded(&self.excluded, &mut peer.config.endpoints);
            if peer
                .path
                .endpoint()
                .is_some_and(|e| is_excluded(&self.excluded, e.addr.ip()))
            {
                peer.drop_path_through_overlay(relay_up, &mut cx);
            }
        }
        self.rearm_all(now);
    }

    /// Sets the sizes of birthday hole punching (see [`crate::birthday`]; on by default with
    /// [`BirthdayConfig::default`]), or turns it off with `None`. Sizes are capped as
    /// [`BirthdayConfig::bounded`] says. An attempt in flight stops (its sockets close); sockets
    /// that carry a peer's direct path stay.
    pub fn set_birthday(&mut self, config: Option<BirthdayConfig>) {
        self.punching.configure(config, &mut self.intents);
        self.carry_out_intents(self.now);
        self.rearm_all(self.now);
    }

    /// This node's NAT kind, as the driver found it from two observations of its socket
    /// (`None`: unknown). With both kinds known, birthday punching runs only toward pairs where
    /// one side maps per destination, each side in its own role (see
    /// [`crate::birthday::Roles`]).
    pub fn set_nat(&mut self, kind: Option<mesh_proto::control::NatKind>) {
        self.own_nat = kind;
        self.rearm_all(self.now);
    }

    /// The local socket of the peer's direct path; `None` while it has none.
    pub fn local_socket(&self, key: &PublicKey) -> Option<SocketId> {
        self.peers.get(key)?.path.endpoint().map(|e| e.socket)
    }

    /// The name of the peer with this key (for logs), if it is a peer.
    pub fn peer_name(&self, key: &PublicKey) -> Option<&str> {
        self.peers.get(key).map(|p| p.config.name.as_str())
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    /// This node's overlay address.
    pub fn address(&self) -> Ipv4Addr {
        self.config.address
    }

    /// Sets the overlay address once the controller assigned it (a node that joins starts
    /// before it knows it). Packets it originates (path MTU probes) carry this source.
    pub fn set_address(&mut self, address: Ipv4Addr) {
        self.config.address = address;
    }

    /// This node's IPv6 overlay address, if it has one.
    pub fn address6(&self) -> Option<Ipv6Addr> {
        self.address6
    }

    /// Sets the IPv6 overlay address (`None`: the network has no IPv6 overlay). Decrypted IPv6
    /// packets are delivered only when addressed to it (or into a prefix this node routes).
    pub fn set_address6(&mut self, address6: Option<Ipv6Addr>) {
        self.address6 = address6;
    }

    /// Replaces the whole peer list. Peers that stay keep their sessions; a peer whose key is
    /// ours is ignored; when two peers claim one address the first wins.
    pub fn set_peers(&mut self, peers: &[PeerConfig], now: Instant) {
        let wanted: HashMap<PublicKey, &PeerConfig> = peers
            .iter()
            .filter(|p| p.key != self.public_key())
            .map(|p| (p.key, p))
            .collect();
        let gone: Vec<PublicKey> = self
            .peers
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_peer(&key);
        }
        // In a network larger than PROACTIVE_PEERS, the handshakes ahead of traffic go to the
        // peers with the lowest overlay addresses: the first to join (the controller hands
        // addresses out in order), usually a cluster's control plane.
        let cutoff = (wanted.len() > PROACTIVE_PEERS).then(|| {
            let mut addresses: Vec<Ipv4Addr> = wanted.values().map(|p| p.address).collect();
            *addresses.select_nth_unstable(PROACTIVE_PEERS - 1).1
        });
        for p in peers {
            let ahead = cutoff.is_none_or(|c| p.address <= c);
            self.upsert(p.clone(), ahead, now);
        }
    }

    /// Adds a peer or updates its address, name and candidates. Candidates inside the
    /// destinations set with [`Node::set_excluded`] are refused and counted.
    /// A peer new to the node gets a handshake ahead of traffic while the node has fewer than
    /// [`PROACTIVE_PEERS`](crate::PROACTIVE_PEERS) peers.
    pub fn upsert_peer(&mut self, config: PeerConfig, now: Instant) {
        let ahead = self.peers.len() < PROACTIVE_PEERS;
        self.upsert(config, ahead, now);
    }

    /// [`Node::upsert_peer`]; `ahead`: a new peer gets a handshake before any traffic.
    fn upsert(&mut self, mut config: PeerConfig, ahead: bool, now: Instant) {
        if config.key == self.public_key() {
            return;
        }
        self.out.counters.refused_candidates +=
            refuse_excluded(&self.excluded, &mut config.endpoints);
        if let Some(owner) = self.peers.key_by_address(&config.address) {
            if owner != config.key {
                tracing::warn!(peer = %config.name, key = %config.key.short(), address = %config.address, "address already used by another peer; ignoring");
                return;
            }
        }
        if let Some(address6) = config.address6 {
            if self
                .peers
                .key_by_address6(&address6)
                .is_some_and(|owner| owner != config.key)
            {
                tracing::warn!(peer = %config.name, key = %config.key.short(), %address6, "IPv6 address already used by another peer; ignoring");
                return;
            }
        }
        let config_key = config.key;
        if self.peers.contains(&config.key) {
            self.peers
                .readdress(&config.key, config.address, config.address6);
            if let Some(peer) = self.peers.get_mut(&config.key) {
                if peer.config.endpoints != config.endpoints {
                    // New candidates from the controller, which tells both sides at the same
                    // moment: probe them at once, so the two sides punch their NATs together.
                    peer.path.rounds.restart();
                    peer.punch.schedule.reset();
                }
                peer.config = config;
            }
            self.peers.reroute(&config_key);
            self.sources = self.peers.sources();
            self.rearm(&config_key, now);
            return;
        }
        let index = self.peers.allocate_index();
        let session = Session::new(
            self.local.clone(),
            config.key,
            // Persistent keepalive runs in the node, on the injected clock (see handle_timeout).
            None,
            index,
            self.wall,
        );
        // A new peer gets a handshake right away, so that the path is known and warm before the
        // first packet. Only the lower key starts it: both sides learn of each other at the same
        // moment, and crossed initiations would cost a round of recovery. Not `ahead` (past
        // PROACTIVE_PEERS), the session waits for the first packet.
        let initiate = ahead && self.public.to_bytes() < config.key.0;
        let key = config.key;
        let proactive_at = (ahead && !initiate).then_some(now + PROACTIVE_FALLBACK);
        self.peers.insert(Peer::new(
            config,
            session,
            index,
            proactive_at,
            self.config.mtu,
            // Its first WireGuard tick: the node's next one.
            snap(self.origin, now + Duration::from_nanos(1), TICK),
        ));
        self.sources = self.peers.sources();
        if initiate {
            let mut cx = cx!(self, now);
            if let Some(peer) = self.peers.get_mut(&key) {
                peer.force_handshake(&mut cx);
            }
        }
        self.rearm(&key, now);
    }

    /// Removes a peer and its session.
    pub fn remove_peer(&mut self, key: &PublicKey) {
        if let Some(peer) = self.peers.remove(key) {
            self.sources = self.peers.sources();
            self.punching
                .peer_removed(*key, &peer.punch, &mut self.intents);
            self.carry_out_intents(self.now);
            self.rearm_all(self.now);
        }
    }

    /// An IP packet read from the TUN device: IPv4, or IPv6 to a peer's IPv6 overlay address
    /// or a prefix it routes. Link-scoped IPv6 (the kernel's router and neighbour
    /// solicitations) and anything else is counted and dropped.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        let dst = match packet::ip_addrs(packet) {
            Some((_, IpAddr::V6(dst))) if packet::link_scoped_v6(dst) => None,
            other => other.map(|(_, dst)| dst),
        };
        let Some(dst) = dst else {
            self.out.counters.non_ipv4_packets += 1;
            return;
        };
        if packet.len() + session::DATA_OVERHEAD > self.buf.len() {
            self.out.counters.malformed_packets += 1;
            return;
        }
        let Some(slot) = self.peers.route(&dst) else {
            self.out.counters.no_route_packets += 1;
            return;
        };
        let key = self.peers.key_at(slot);
        let mut cx = cx!(self, now);
        let peer = self.peers.at_mut(slot);
        if let Some(mtu) = peer.probes.mtu.result() {
            if packet.len() > usize::from(mtu) {
                // The path cannot carry it: answer like a router would rather than send it
                // to die silently on the way. IPv6 routers never fragment, so every IPv6
                // packet is answered, from the node's IPv6 overlay address if it has one.
                cx.out.counters.too_big_packets += 1;
                let answer = match dst {
                    IpAddr::V4(_) if pmtu::dont_fragment(packet) => {
                        pmtu::frag_needed(packet, mtu, cx.me)
                    }
                    IpAddr::V4(_) => None,
                    IpAddr::V6(_) => cx
                        .me6
                        .and_then(|me6| pmtu::packet_too_big(packet, mtu, me6)),
                };
                if let Some(answer) = answer {
                    cx.out.deliver(&answer);
                }
                return;
            }
        }
        peer.last_data = Some(now);
        let woke = peer.wake_wireguard(now);
        if peer.seal_data(packet, &mut cx) {
            // Sent (or, rarely, queued behind a handshake): see the bottom.
        } else {
            match peer.session.encapsulate(packet, cx.buf, cx.now) {
                Sealed::Network(bytes) => {
                    if !peer.session.established() {
                        peer.handshake.data_waits(now);
                    }
                    peer.handshake.data_sent(now);
                    peer.path.send(&peer.config, bytes, true, now, cx.out);
                }
                Sealed::Done => {
                    // Queued behind a handshake in progress.
                    peer.handshake.data_waits(now);
                }
                Sealed::Error(_) | Sealed::TunnelV4(..) | Sealed::TunnelV6(..) => {}
            }
        }
        // What a send arms (a path probe, a retransmission, the stale rule) comes no sooner
        // than a path probe interval from now: a peer that wakes by then is re-checked anyway,
        // so a stream of packets costs one comparison each.
        if woke || peer.wake.0 > now + PATH_PROBE_INTERVAL {
            self.rearm(&key, now);
        }
    }

    /// A datagram that is not QUIC: from one of the node's UDP sockets, or a WireGuard
    /// message the relay carried. Datagrams on an extra socket the node has closed (or from
    /// another peer than the socket's) are counted and dropped.
    pub fn handle_datagram(&mut self, source: Source, datagram: &[u8], now: Instant) {
        if self.opening.on {
            if let Some(item) = self.set_aside(source, datagram, now) {
                self.opening.queue.push_back(Pending::Data(item));
                return;
            }
            if self.opening.busy() {
                // Behind the messages still to open, in the order it came.
                let mut copy = self.out.buffer();
                copy.clear();
                copy.extend_from_slice(datagram);
                self.opening.queue.push_back(Pending::Other {
                    source,
                    datagram: copy,
                    now,
                });
                return;
            }
        }
        self.take_datagram(source, datagram, now);
    }

    /// A data message on the main socket for a session that can open it, set aside for the
    /// driver to open (`None`, nothing changed: anything else, which the node takes itself).
    fn set_aside(&mut self, source: Source, datagram: &[u8], now: Instant) -> Option<Item> {
        let Source::Udp { socket, from } = source else {
            return None;
        };
        if socket != SocketId::MAIN
            || datagram.first() != Some(&mesh_wg::TYPE_DATA)
            || datagram.len() > self.buf.len()
            || is_excluded(&self.excluded, from.ip())
        {
            return None;
        }
        let index = mesh_wg::receiver_index(datagram)?;
        let slot = self.peers.by_index(index >> 8)?;
        let key = self.peers.at(slot).session.open_key(datagram, now)?;
        let (header, sealed) = datagram.split_first_chunk::<{ mesh_wg::DATA_HEADER_LEN }>()?;
        let room = self.out.tun_headroom;
        let mut buf = self.out.buffer();
        buf.resize(room + sealed.len(), 0);
        buf[..room].fill(0);
        buf[room..].copy_from_slice(sealed);
        Some(Item {
            from: Endpoint { socket, addr: from },
            now,
            header: *header,
            buf,
            room,
            state: State::Sealed(key),
        })
    }

    /// Takes back data messages the driver opened ([`Output::Unopened`]), in the order they
    /// were handed out; then poll for what they made. A batch given back out of order (one
    /// handed out before it never came back) is dropped and counted.
    pub fn handle_opened(&mut self, opened: Opened) {
        let Opened(batch) = opened;
        if !self.opening.back(batch.batch) {
            self.out.counters.rejected_packets += batch.items.len() as u64;
            for item in batch.items {
                self.out.recycle(item.buf);
            }
            return;
        }
        for item in batch.items {
            self.take_opened(item);
        }
    }

    /// A data message opened away from the node (or by it, just now): the rest of
    /// [`Node::handle_datagram`].
    fn take_opened(&mut self, item: Item) {
        let now = item.now;
        let slot = crate::peer::loss::data_header(&item.header)
            .and_then(|(index, _)| self.peers.by_index(index >> 8));
        let Some(slot) = slot else {
            self.out.counters.unknown_peer_packets += 1;
            self.out.recycle(item.buf);
            return;
        };
        let key = self.peers.key_at(slot);
        let via = Via::Direct(item.from);
        self.take_from(key, slot, via, None, now, |peer, cx| {
            peer.receive_opened(via, item, cx)
        });
    }

    /// Takes what waited behind messages to open (or such a message, opened).
    fn take_pending(&mut self, next: Pending) {
        match next {
            Pending::Data(item) => self.take_opened(item),
            Pending::Other {
                source,
                datagram,
                now,
            } => {
                self.take_datagram(source, &datagram, now);
                self.out.recycle(datagram);
            }
        }
    }

    /// Batches of [`Output::Unopened`] handed out and not yet given back. A driver gives
    /// them back before it runs the timers ([`Node::handle_timeout`]), which take what came
    /// before them first.
    pub fn unopened_at_driver(&self) -> usize {
        self.opening.at_driver.len()
    }

    /// Leaves the decryption of data messages on the main socket to the driver: the node sets
    /// each aside with its session's key, and [`Node::poll_output`] hands a run of more than
    /// [`crate::OPEN_INLINE_MAX`] carrying at least [`crate::OPEN_INLINE_BYTES`] out as
    /// [`Output::Unopened`] for the driver to open on another thread and give back
    /// ([`Node::handle_opened`]); the node takes everything else about them (replay window,
    /// timers, paths, source checks) then, in the order they came, and whatever came in
    /// meanwhile after them. A smaller run it opens itself. Needs a driver that polls with
    /// [`Node::poll_output`]; set it before traffic flows. Off unless set.
    pub fn set_deferred_opening(&mut self, on: bool) {
        self.opening.on = on;
    }

    /// What came in, taken now.
    fn take_datagram(&mut self, source: Source, datagram: &[u8], now: Instant) {
        let (via, relayed_from, owner) = match source {
            Source::Udp { socket, from } => {
                if is_excluded(&self.excluded, from.ip()) {
                    // It came through the overlay (a vxlan device or a routed subnet on top of
                    // it): taking it as the peer's endpoint would carry WireGuard inside
                    // WireGuard.
                    self.out.counters.overlay_sources += 1;
                    return;
                }
                let owner = if socket == SocketId::MAIN {
                    None
                } else {
                    match self.punching.sockets.owner(socket) {
                        Some(o) => Some(o),
                        None => {
                            self.out.counters.unknown_socket_packets += 1;
                            return;
                        }
                    }
                };
                (Via::Direct(Endpoint { socket, addr: from }), None, owner)
            }
            Source::Relay { from } => (Via::Relay, Some(from), None),
        };
        self.receive(via, relayed_from, owner, datagram, now);
    }

    /// Puts every packet for the TUN device `bytes` into its buffer, behind zeroed room (a
    /// driver whose device takes a virtio-net header before each packet writes it there, and
    /// the packet, without a copy). 0 unless set.
    pub fn set_tun_headroom(&mut self, bytes: usize) {
        self.out.tun_headroom = bytes;
    }

    /// Leaves the encryption of data messages to the driver: the node takes each message's
    /// counter and writes its header where it decides the order, as always, and
    /// [`Node::poll_output`] hands batches of more than [`SEAL_INLINE_MAX`] such messages and
    /// at least [`SEAL_INLINE_BYTES`] out as [`Output::Unsealed`] for the driver to seal on
    /// another thread than the node's (a smaller one the node seals itself). Decisions,
    /// counters and what goes on the wire are the same either way; [`Node::poll_transmit`]
    /// always seals. Off unless set.
    pub fn set_deferred_sealing(&mut self, on: bool) {
        self.out.defer = on;
    }

    /// Tells the node whether the driver has a relay connection (traffic to peers without a
    /// direct path goes there).
    pub fn set_relay(&mut self, up: bool, now: Instant) {
        self.now = self.now.max(now);
        let was_up = self.out.relay_up;
        self.out.relay_up = up;
        if was_up != up {
            // Candidate rounds run only with a relay; a dead direct path falls back only to one.
            self.rearm_all(now);
        }
        if !up || was_up {
            return;
        }
        // A path appeared: peers still without a session try again now, lower key first (the
        // higher key follows after PROACTIVE_FALLBACK, as for a new peer); peers left to the
        // first packet stay so.
        let me = self.public.to_bytes();
        let mut cx = cx!(self, now);
        for (key, peer) in self.peers.iter_mut() {
            if peer.session.established() || peer.on_demand() {
                continue;
            }
            if me < key.0 {
                peer.handshake.allow_force();
                peer.force_handshake(&mut cx);
            } else {
                peer.handshake.expect_proactive(now + PROACTIVE_FALLBACK);
            }
        }
        self.rearm_all(now);
    }

    /// Sends an authenticated ping inside the tunnel to `key` on its current path; the answer
    /// comes back as [`Event::Pong`]. Returns false for an unknown peer or no session yet (a
    /// handshake with a known peer starts then).
    pub fn ping(&mut self, key: &PublicKey, now: Instant) -> bool {
        let mut cx = cx!(self, now);
        match self.peers.get_mut(key) {
            Some(peer) if peer.session.established() => {
                peer.ping(Purpose::User, &mut cx);
                self.rearm(key, now);
                true
            }
            Some(peer) => {
                // A handshake starts now, as a packet would start one (a peer left to its
                // first packet has none yet): a ping a moment later finds the session.
                peer.force_handshake(&mut cx);
                self.rearm(key, now);
                false
            }
            None => false,
        }
    }

    /// One WireGuard message in, from `via` (`relayed_from`: the sender the relay named;
    /// `owner`: the owner of the extra socket it came in on).
    fn receive(
        &mut self,
        via: Via,
        relayed_from: Option<PublicKey>,
        owner: Option<Owner>,
        datagram: &[u8],
        now: Instant,
    ) {
        if !self.guard_passes(via, datagram, now) {
            return;
        }
        let Some((key, slot, opened)) = self.find_peer(datagram) else {
            return;
        };
        // The relay names the sender; WireGuard must agree.
        if relayed_from.is_some_and(|k| k != key) {
            self.out.counters.rejected_packets += 1;
            return;
        }
        // An extra socket carries one peer's messages only.
        if owner.is_some_and(|o| o.peer() != key) {
            self.out.counters.unknown_socket_packets += 1;
            return;
        }
        if datagram.len() > self.buf.len() {
            self.out.counters.malformed_packets += 1;
            return;
        }
        let Some(slot) = slot else {
            self.out.counters.unknown_peer_packets += 1;
            return;
        };
        self.take_from(key, slot, via, owner, now, |peer, cx| {
            peer.decapsulate(via, datagram, opened, cx)
        });
    }

    /// One message from the peer `key` at `slot`, from `via` (`owner`: of the extra socket it
    /// came in on): `decapsulate` has its session take it; then its paths, timers and in-tunnel
    /// messages.
    fn take_from(
        &mut self,
        key: PublicKey,
        slot: Slot,
        via: Via,
        owner: Option<Owner>,
        now: Instant,
        decapsulate: impl FnOnce(&mut Peer, &mut Ctx<'_>) -> Received,
    ) {
        let mut cx = cx!(self, now);
        let peer = self.peers.at_mut(slot);
        let was_established = peer.session.established();
        let was_busy = self.punching.busy();
        let Received::Authenticated(message) = decapsulate(peer, &mut cx) else {
            self.rearm(&key, now);
            return;
        };
        // Heard through the relay while the direct path owes an answer: the path, not the
        // peer, is silent, so the path's shorter timeout applies from now.
        let proves_alive = via == Via::Relay
            && peer.path.direct.is_some_and(|d| {
                d.unanswered_since
                    .is_some_and(|s| !crate::peer::path::heard_after(peer.last_rx, s))
            });
        peer.heard(now);
        // Data came in: WireGuard's passive keepalive and rekey rules need the fast tick.
        let woke = peer.last_data_rx == Some(now) && peer.wake_wireguard(now);
        match message {
            Some(InTunnel::Message(m)) if m.kind == pmtu::Kind::Birthday => {
                join_attempt(peer, &mut self.punching, &mut self.intents, &mut cx);
            }
            Some(InTunnel::Message(m)) => peer.on_probe(m, via, &mut cx),
            Some(InTunnel::Report(r)) => peer.on_loss_report(r, &mut cx),
            None => {}
        }
        let mut switched = false;
        if let Via::Direct(from) = via {
            // The main socket and the socket the peer kept may carry its path; a socket of the
            // attempt in flight may while the peer has no direct path (it won).
            let won = matches!(owner, Some(Owner::Attempt(_)));
            switched = peer.heard_direct(from, won, &mut cx);
            if switched && won {
                // This socket's mapping is the hole: it stays with the peer.
                self.punching
                    .won(key, from.socket, &mut peer.punch, &mut self.intents);
            }
            if peer.path.direct.is_some() && self.punching.attempt_peer() == Some(key) {
                self.punching.finish(true, &mut self.intents);
            }
            carry_out(&mut self.intents, peer, &mut self.punching, &mut cx);
        }
        // A data packet only clears timers (the path and the session were heard from); a
        // handshake, an in-tunnel message or a new path may bring one forward.
        if was_busy != self.punching.busy() {
            self.rearm_all(now);
        } else if message.is_some() || switched || !was_established || woke || proves_alive {
            self.rearm(&key, now);
        }
    }

    /// mac1 and the handshake DH budget first: nothing after this may cost a DH before it.
    fn guard_passes(&mut self, via: Via, datagram: &[u8], now: Instant) -> bool {
        let source = match via {
            Via::Direct(from) => Some(from.addr.ip()),
            Via::Relay => None,
        };
        match self.guard.check(source, datagram, now) {
            Verdict::Pass => true,
            Verdict::BadMac1 => {
                self.out.counters.bad_mac1_packets += 1;
                false
            }
            Verdict::OverBudget => {
                self.out.counters.over_budget_handshakes += 1;
                false
            }
            Verdict::Cookie(reply) => {
                if let Via::Direct(from) = via {
                    self.out.udp(from.socket, from.addr, &reply);
                    self.out.counters.cookie_replies_sent += 1;
                }
                false
            }
        }
    }

    /// The peer a datagram is for, and where it sits if it is ours: a handshake initiation
    /// names its sender's key (after a DH), everything else our receiver index.
    /// (An initiation comes with its first half opened, for the session to finish.)
    fn find_peer(
        &mut self,
        datagram: &[u8],
    ) -> Option<(PublicKey, Option<Slot>, Option<Box<session::Opened>>)> {
        match session::address_opened(&self.local, datagram) {
            Some((Addressed::Initiation(key), opened)) => {
                Some((key, self.peers.slot(&key), opened))
            }
            Some((Addressed::Index(index), _)) => match self.peers.by_index(index) {
                Some(slot) => Some((self.peers.key_at(slot), Some(slot), None)),
                None => {
                    self.out.counters.unknown_peer_packets += 1;
                    None
                }
            },
            None => {
                self.out.counters.malformed_packets += 1;
                None
            }
        }
    }

    /// Runs the timers that are due at `now`: those of every peer whose deadline has come (in
    /// key order, so a simulated run is the same for a given seed), then punching's.
    pub fn handle_timeout(&mut self, now: Instant) {
        // What came before the deadline goes first: a timer run ahead of an answer waiting
        // to be opened would take a path that works for dead.
        while let Some(next) = self.opening.next_here() {
            self.take_pending(next);
        }
        self.now = self.now.max(now);
        let keepalive = self.config.keepalive;
        let was_busy = self.punching.busy();
        let mut cx = cx!(self, now);
        for (key, peer) in self.peers.iter_mut() {
            if peer.wake.0 > now {
                continue;
            }
            cx.out.counters.peer_timer_runs += 1;
            if let Some(every) = peer.wireguard_timers(&mut cx) {
                // On the node's grid (of the idle tick for idle peers), so the ticks of many
                // peers come in one wake-up, even when this one came late.
                peer.wireguard_at = snap(self.origin, peer.wireguard_at, every);
            }
            peer.handshake_timers(&mut cx);
            if peer.session.established() {
                peer.mtu_timers(&mut cx);
                peer.path_timers(&mut cx);
                peer.family_timers(&mut cx);
                let wanted = peer.path.direct.is_none()
                    && cx.out.relay_up
                    && !self.punching.busy()
                    && peer.punch.schedule.due(now);
                // (An attempt over the node's budget is refused by `start` itself.)
                if let Some(roles) =
                    Roles::for_pair(self.own_nat, peer.config.nat).filter(|_| wanted)
                {
                    let how = Start {
                        targets: birthday::spray_targets(
                            &peer.config.endpoints,
                            peer.config.observed,
                        ),
                        roles,
                        initiator: true,
                    };
                    self.punching
                        .start(*key, &mut peer.punch, how, now, &mut self.intents);
                    carry_out(&mut self.intents, peer, &mut self.punching, &mut cx);
                }
                peer.rtt_timer(&mut cx);
            }
            peer.quality_timers(&mut cx);
            let path_socket = peer.path.endpoint().map(|e| e.socket);
            self.punching
                .retire_kept(*key, &mut peer.punch, path_socket, now, &mut self.intents);
            carry_out(&mut self.intents, peer, &mut self.punching, &mut cx);
            peer.keepalive_timer(keepalive, &mut cx);
            peer.stale_timer(&mut cx);
            peer.wake = (now, Timer::WireGuard); // recomputed below
        }
        let peers = &self.peers;
        self.punching.advance(
            |key| match peers.get(key) {
                None => PeerState::Gone,
                Some(p) if p.path.direct.is_some() => PeerState::Direct,
                Some(_) => PeerState::Waiting,
            },
            now,
            &mut self.intents,
        );
        self.carry_out_intents(now);
        if was_busy && !self.punching.busy() {
            // Peers whose attempt waited for the one in flight may start theirs.
            self.rearm_all(now);
        } else {
            self.rearm_due(now);
        }
    }

    /// The context a peer's deadlines are computed in.
    fn timer_env(&self, now: Instant) -> TimerEnv {
        TimerEnv {
            now,
            relay_up: self.out.relay_up,
            keepalive: self.config.keepalive,
            punch_free: self.punching.enabled() && !self.punching.busy(),
            punch_budget_at: self.punching.budget_at(now),
            own_nat: self.own_nat,
            origin: self.origin,
            quality: self.quality,
        }
    }

    /// Recomputes one peer's deadline after an input touched it (it may only have come
    /// sooner; a later one is found when the earlier wake-up re-checks).
    fn rearm(&mut self, key: &PublicKey, now: Instant) {
        let env = self.timer_env(now);
        if let Some(peer) = self.peers.get_mut(key) {
            peer.wake = peer.deadline(&env);
            if self.wake.is_none_or(|w| peer.wake.0 < w.0) {
                self.wake = Some(peer.wake);
            }
        }
    }

    /// Recomputes the deadlines of the peers that just ran, then the node's earliest.
    fn rearm_due(&mut self, now: Instant) {
        let env = self.timer_env(now);
        for (_, peer) in self.peers.iter_mut() {
            if peer.wake.0 <= now {
                peer.wake = floor(peer.deadline(&env), now);
            }
        }
        self.rewake();
    }

    /// Recomputes every deadline (something node-wide changed: the relay, punching, the
    /// excluded destinations).
    fn rearm_all(&mut self, now: Instant) {
        let env = self.timer_env(now);
        for (_, peer) in self.peers.iter_mut() {
            peer.wake = peer.deadline(&env);
        }
        self.rewake();
    }

    /// The node's earliest deadline from the peers' and punching's.
    fn rewake(&mut self) {
        let peers = self.peers.iter().map(|(_, p)| p.wake);
        let punching = self.punching.deadline().map(|t| (t, Timer::Spray));
        self.wake = peers.chain(punching).min_by_key(|w| w.0);
    }

    /// Carries out what punching asked for, each with its peer's session.
    fn carry_out_intents(&mut self, now: Instant) {
        let mut cx = cx!(self, now);
        let mut intents = std::mem::take(&mut self.intents);
        for (key, intent) in intents.drain(..) {
            match (intent, self.peers.get_mut(&key)) {
                (Intent::Open(id), _) => cx.out.open_socket(id),
                (Intent::Close(id), _) => cx.out.close_socket(id),
                (intent, Some(peer)) => carry_out_one(intent, peer, &mut self.punching, &mut cx),
                (_, None) => {}
            }
        }
        self.intents = intents;
    }

    /// When [`Node::handle_timeout`] should be called next: the earliest real deadline of any
    /// peer (WireGuard's tick, a handshake, a path probe, a candidate round...) or of punching.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake.map(|w| w.0)
    }

    /// [`Node::poll_timeout`] with the reason, for debug logs.
    pub fn next_timer(&self) -> Option<(Instant, Timer)> {
        self.wake
    }

    /// Next datagrams to send. Transmits on a new extra socket are held back until its
    /// [`Event::OpenSocket`] has been polled (so poll events first, or use
    /// [`Node::poll_output`]); the others pass them.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let mut t = self.out.pop_transmit()?;
        t.seal_pending();
        Some(t)
    }

    /// Next packet to write to the TUN device.
    pub fn poll_tun_packet(&mut self) -> Option<Vec<u8>> {
        self.out.to_tun.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.out.events.pop_front()?;
        if let Event::OpenSocket(id) = event {
            self.out.unannounced.remove(&id);
        }
        Some(event)
    }

    /// The next thing to do, in the one order a driver must follow: events, then transmits,
    /// then packets for the TUN device. A driver calls this until `None` after every input
    /// (writing a TUN packet may make the node answer, so keep polling).
    pub fn poll_output(&mut self) -> Option<Output> {
        // Messages set aside to open go first (what they make comes out below, in order).
        loop {
            match self.opening.next() {
                Next::Wait => break,
                Next::HandOut(batch) => return Some(Output::Unopened(batch)),
                Next::Take(next) => self.take_pending(next),
            }
        }
        if let Some(e) = self.poll_event() {
            return Some(Output::Event(e));
        }
        if let Some(mut t) = self.out.pop_transmit() {
            if t.unsealed() > SEAL_INLINE_MAX && t.contents.len() >= SEAL_INLINE_BYTES {
                return Some(Output::Unsealed(Unsealed(t)));
            }
            t.seal_pending();
            return Some(Output::Transmit(t));
        }
        self.poll_tun_packet().map(Output::Tun)
    }

    /// Gives back the buffer of a sent [`Transmit`] or a written TUN packet, so the node can
    /// reuse it instead of allocating (optional, but the data path allocates nothing once
    /// warm when the driver does it).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.out.recycle(buf);
    }

    /// Peers, counters and punching, for `mesh status` and metrics.
    pub fn status(&self, now: Instant) -> Status {
        Status {
            peers: self.peer_status(now),
            counters: self.out.counters,
            birthday: self.punching.stats,
            extra_sockets: self.punching.sockets.len(),
        }
    }

    /// Status of every peer, sorted by overlay address.
    fn peer_status(&self, now: Instant) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(_, p)| {
                let stats = p.session.stats(now);
                let (direct_quality, relay_quality) = p.quality_status(&self.quality, now);
                PeerStatus {
                    key: p.config.key,
                    name: p.config.name.clone(),
                    address: p.config.address,
                    address6: p.config.address6,
                    endpoint: p.path.endpoint().map(|e| e.addr),
                    candidates: p.config.endpoints.clone(),
                    since_handshake: stats.since_handshake,
                    rx_bytes: stats.rx_bytes,
                    tx_bytes: stats.tx_bytes,
                    since_last_rx: p.last_rx.map(|t| now.saturating_duration_since(t)),
                    rtt: p.probes.rtt.map(|(rtt, _)| rtt).or(stats.rtt),
                    path_mtu: p.probes.mtu.result(),
                    path: p.route(self.out.relay_up),
                    direct_quality,
                    relay_quality,
                    on_demand: p.on_demand(),
                }
            })
            .collect();
        out.sort_by_key(|p| p.address);
        out
    }
}

/// The peer starts a birthday attempt toward us: run ours at the same time (unless a direct
/// path exists), so that whichever side has the symmetric NAT has its sockets open while the
/// other sprays.
fn join_attempt(
    peer: &mut Peer,
    punching: &mut Punching,
    intents: &mut Vec<(PublicKey, Intent)>,
    cx: &mut Ctx<'_>,
) {
    if peer.path.direct.is_some() {
        return;
    }
    let Some(roles) = Roles::for_pair(cx.own_nat, peer.config.nat) else {
        return;
    };
    let targets = birthday::spray_targets(&peer.config.endpoints, peer.config.observed);
    punching.join(peer.key(), &mut peer.punch, targets, roles, cx.now, intents);
    carry_out(intents, peer, punching, cx);
}

/// The first point at or after `t` of the grid of step `every` through `origin`.
pub(crate) fn snap(origin: Instant, t: Instant, every: Duration) -> Instant {
    if t <= origin || every.is_zero() {
        return t.max(origin);
    }
    let steps = (t - origin).as_nanos().div_ceil(every.as_nanos());
    origin + every * u32::try_from(steps).unwrap_or(u32::MAX)
}

/// A deadline that has already passed after its timers ran would spin the driver: it can only
/// come from a rule that did not move its own state on; wait a moment instead.
fn floor(deadline: (Instant, Timer), now: Instant) -> (Instant, Timer) {
    if deadline.0 <= now {
        tracing::debug!(timer = ?deadline.1, "timer still due after it ran");
        (now + Duration::from_millis(1), deadline.1)
    } else {
        deadline
    }
}

/// Carries out the intents punching produced for `peer` (all of them are for it).
fn carry_out(
    intents: &mut Vec<(PublicKey, Intent)>,
    peer: &mut Peer,
    punching: &mut Punching,
    cx: &mut Ctx<'_>,
) {
    for (_, intent) in intents.drain(..) {
        carry_out_one(intent, peer, punching, cx);
    }
}

/// One punching intent, with the peer's session: socket events, the join message, probes
/// (keepalives) within the probe budget.
fn carry_out_one(intent: Intent, peer: &mut Peer, punching: &mut Punching, cx: &mut Ctx<'_>) {
    match intent {
        Intent::Open(id) => cx.out.open_socket(id),
        Intent::Close(id) => cx.out.close_socket(id),
        Intent::Join => {
            let signal = peer.message(cx.me, pmtu::Kind::Birthday, 0, 0, 0);
            peer.seal_and_send(&signal, false, cx);
        }
        Intent::Probe { socket, dst } => {
            if let Sealed::Network(bytes) = peer.session.encapsulate(&[], cx.buf, cx.now) {
                if cx.out.probe(socket, dst, bytes, cx.now) {
                    punching.probe_sent();
                }
            }
        }
    }
}

/// Whether `ip` is inside one of `excluded` (an IPv4-mapped IPv6 address as its IPv4 one).
fn is_excluded(excluded: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    excluded.iter().any(|n| n.contains(&ip))
}

/// Removes the candidates inside `excluded`; returns how many went.
fn refuse_excluded(excluded: &[IpNet], candidates: &mut Vec<SocketAddr>) -> u64 {
    let before = candidates.len();
    candidates.retain(|e| !is_excluded(excluded, e.ip()));
    (before - candidates.len()) as u64
}

/// Test views of the output: UDP datagrams and relayed messages one at a time, as two
/// queues (the order within each is the node's).
#[cfg(test)]
impl Node {
    fn poll_udp(&mut self) -> Option<tests::Sent> {
        let unannounced = &self.out.unannounced;
        let pos = self
            .out
            .transmits
            .iter()
            .position(|t| match t.destination {
                Destination::Udp { socket, .. } => !unannounced.contains(&socket),
                Destination::Relay { .. } => false,
            })?;
        let t = &mut self.out.transmits[pos];
        t.seal_pending();
        let Destination::Udp { socket, dst } = t.destination else {
            return None;
        };
        let size = t.segment_size.unwrap_or(t.contents.len());
        let payload: Vec<u8> = t.contents.drain(..size.min(t.contents.len())).collect();
        let ttl = t.ttl;
        if t.contents.is_empty() {
            self.out.transmits.remove(pos);
        }
        Some(tests::Sent {
            socket,
            dst,
            payload,
            ttl,
        })
    }

    fn poll_relayed(&mut self) -> Option<tests::RelaySent> {
        let pos = self
            .out
            .transmits
            .iter()
            .position(|t| matches!(t.destination, Destination::Relay { .. }))?;
        let t = self.out.transmits.remove(pos)?;
        let Destination::Relay { to } = t.destination else {
            return None;
        };
        Some(tests::RelaySent {
            to,
            payload: t.contents,
        })
    }

    fn counters(&self) -> Counters {
        self.out.counters
    }
}

#[cfg(test)]
mod tests;
