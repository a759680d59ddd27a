//! A simulated IPv4/UDP network with NATs, on a virtual clock, shared by the simulation tests
//! (`mod simnet;`).
//!
//! Two layers:
//!
//! - [`Net`] is the network: realms (the internet and LANs), hosts (one UDP socket each; a node's
//!   extra sockets are hosts at the same IP on other ports, see [`Net::open_socket`]), NAT boxes
//!   between realms, per-link latency, seeded loss (everywhere, and per direction of a link:
//!   [`LinkLoss`]) and the datagrams in flight. It knows nothing about mesh.
//! - [`Sim`] puts real [`mesh_core::Node`]s (and any other [`Service`], such as a relay) on hosts
//!   of a [`Net`] and runs them on the virtual clock: the clock jumps to the next delivery or the
//!   earliest timer, so minutes of virtual time take well under a second, and the same seed gives
//!   the same run.
//!
//! Addressing: every delivery is keyed by (realm, address). Realm [`INTERNET`] holds public
//! hosts (203.0.113.0/24) and the WAN side of NATs (198.51.100.0/24). Every NAT has its own LAN
//! realm behind it, and every LAN uses the private 192.168.1.0/24 (so two LANs reuse the same
//! addresses, as real ones do, and nodes see LAN candidates as private). A datagram from a LAN
//! host to an address outside 192.168.1.0/24 goes through the LAN's NAT (and the NAT above it,
//! for double NAT); a datagram arriving at a NAT's public address is translated back or
//! dropped. Hairpinning (an inside host sending to its own NAT's public address) is not
//! supported: such datagrams are dropped.
//!
//! NAT port allocation: endpoint-independent NATs hand out ports sequentially from 40000 (or
//! keep the inside port, with [`NatConfig::port_preservation`]); symmetric NATs pick a random
//! free port in 1024..=65535 for every new mapping (seeded), like Linux `masquerade random`.
//!
//! Relay: [`Sim::add_relay`] puts a relay on the internet that runs the real relay code
//! ([`relay`]): mesh-relay's forwarding rules, and mesh-proto's framing and reassembly on the
//! nodes, in frames of at most [`relay::MAX_DATAGRAM`] bytes. Its UDP datagrams stand for QUIC
//! datagrams (QUIC itself, its encryption included, is not simulated). Nodes reach it from their
//! main socket through their NATs; a node takes what comes from the relay's address on that
//! socket as relay traffic (for real, QUIC is told apart by its first byte). UDP-blocking
//! firewalls let the relay through, and every node keeps its mapping toward it alive (as a QUIC
//! keepalive would); each node is admitted when it first connects (see [`relay`]).
//!
//! Adding a relay (or any other server) is one [`Service`] impl and one call:
//! `sim.add_service(INTERNET, relay_addr, Box::new(relay))`. The service gets every datagram
//! sent to its address with the source as NATs rewrote it, and its answers go back through the
//! same NATs, so they pass exactly when the node sent to the relay recently enough. Nodes learn
//! the relay from whatever the peer list carries ([`Sim::peer_configs`] gives the controller's
//! candidates; add to them and hand them out with [`Sim::set_peers`]). A UDP-blocked site can be
//! opened to the relay only with [`Net::allow_udp`].
//!
//! Nodes tick at seeded random phases (real nodes are not synchronised; nodes created at one
//! instant would retransmit handshakes in lockstep and cross every time).
//!
//! Caveat: boringtun runs its own timers (persistent and passive keepalive, rekey, session
//! expiry, its own handshake retransmission) on the wall clock, not on the virtual one. A run
//! shorter than about 5 s of wall time never sees them fire, whatever its virtual length; a
//! longer one may, which makes it depend on machine speed. Its handshake rate limiter (10
//! initiations per peer per wall second, then cookie replies) is on the wall clock too, so it
//! trips far sooner in virtual time than it would for real.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

mod relay;

pub use relay::SimRelay;

use mesh_core::{
    Destination, Event, Node, NodeConfig, Output, PeerConfig, SocketId, Source, Transmit,
};
use mesh_proto::control::NatKind;
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Index of a realm (an addressing domain). Realm `r > 0` is the LAN behind NAT `r`.
pub type Realm = usize;
/// Index of a host (one UDP socket at one address in one realm).
pub type HostId = usize;

/// The public internet.
pub const INTERNET: Realm = 0;
/// Where the controller is; nodes' reflexive addresses are what it sees.
pub const CONTROLLER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 7443));
/// UDP port of every node's socket.
pub const NODE_PORT: u16 = 51820;
/// Idle timeout of NAT mappings unless a test says otherwise.
pub const DEFAULT_NAT_TIMEOUT: Duration = Duration::from_secs(30);
/// One-way latency inside a LAN.
pub const LAN_LATENCY: Duration = Duration::from_millis(1);

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
/// First port a NAT hands out (then sequentially upward).
const FIRST_NAT_PORT: u16 = 40000;
/// Lowest port a NAT with random allocation hands out.
const LOWEST_RANDOM_PORT: u16 = 1024;
/// First local port of a node's extra sockets (then upward).
const FIRST_EPHEMERAL_PORT: u16 = 32768;
/// Where [`Sim::add_relay`] puts the relay.
pub const RELAY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 4), 443));
/// How often a node refreshes its mapping toward the relay (a QUIC keepalive).
pub const RELAY_KEEPALIVE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// NAT behaviour
// ---------------------------------------------------------------------------------------------

/// How a NAT picks the external port of an outbound flow (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One external port per inside ip:port, whatever the destination (EIM).
    EndpointIndependent,
    /// A new external port per inside ip:port and destination ip:port ("symmetric").
    EndpointDependent,
}

/// Which inbound datagrams a NAT lets through to a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Anyone may send to a live mapping ("full cone").
    EndpointIndependent,
    /// Only remote ip:ports the inside host sent to (and not longer than the timeout ago).
    AddressAndPortDependent,
}

/// One NAT box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Idle timeout of each mapping and each filter entry; refreshed by outbound traffic only.
    pub timeout: Duration,
    /// A firewall that drops all UDP except to and from `allow`.
    pub blocks_udp: bool,
    /// With `blocks_udp`: the remote ip:ports UDP may still be exchanged with (e.g. a relay).
    pub allow: Vec<SocketAddr>,
    /// Reuse the inside source port as the external port when it is free (Linux MASQUERADE
    /// does); otherwise ports are handed out sequentially, so a mapping that expired comes back
    /// on a different port.
    pub port_preservation: bool,
    /// Hand out a random free port in 1024..=65535 for every new mapping (Linux `masquerade
    /// random`) instead of sequential ones.
    pub random_ports: bool,
    /// A plain Linux gateway (`masquerade`, no input filter): Linux connection tracking instead
    /// of mappings and filters, see [`Conntrack`]. `mapping`, `filtering`, `timeout` and the
    /// port options are then unused.
    pub linux_gateway: bool,
}

impl NatConfig {
    fn new(mapping: Mapping, filtering: Filtering, timeout: Duration) -> NatConfig {
        NatConfig {
            mapping,
            filtering,
            timeout,
            blocks_udp: false,
            allow: Vec::new(),
            port_preservation: false,
            random_ports: false,
            linux_gateway: false,
        }
    }

    /// A plain Linux gateway: `masquerade` and no input filter (see [`Conntrack`]).
    pub fn linux_gateway() -> NatConfig {
        NatConfig {
            linux_gateway: true,
            ..NatConfig::port_restricted(CT_REPLIED_TIMEOUT)
        }
    }

    /// EIM, endpoint-independent filtering.
    pub fn full_cone(timeout: Duration) -> NatConfig {
        NatConfig::new(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            timeout,
        )
    }

    /// EIM, address-and-port-dependent filtering.
    pub fn port_restricted(timeout: Duration) -> NatConfig {
        NatConfig::new(
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
            timeout,
        )
    }

    /// Endpoint-dependent mapping with random ports, address-and-port-dependent filtering
    /// (Linux `masquerade random`).
    pub fn symmetric(timeout: Duration) -> NatConfig {
        NatConfig {
            random_ports: true,
            ..NatConfig::new(
                Mapping::EndpointDependent,
                Filtering::AddressAndPortDependent,
                timeout,
            )
        }
    }

    /// No UDP at all (a port-restricted NAT behind a firewall that drops UDP); see
    /// [`Net::allow_udp`] for the exceptions.
    pub fn udp_blocked(timeout: Duration) -> NatConfig {
        NatConfig {
            blocks_udp: true,
            ..NatConfig::port_restricted(timeout)
        }
    }
}

/// Where a node sits, with the names the end-to-end NAT lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Behaviour {
    /// On the internet, no NAT.
    Public,
    /// Behind a full-cone NAT.
    FullCone,
    /// Behind a port-restricted-cone NAT.
    PortRestricted,
    /// Behind a symmetric NAT.
    Symmetric,
    /// Behind a firewall that drops all UDP.
    UdpBlocked,
    /// Behind a port-restricted home router behind a port-restricted carrier-grade NAT.
    DoubleNat,
    /// Behind a plain Linux gateway (`masquerade`, no input filter), see [`Conntrack`]. Not in
    /// [`Behaviour::ALL`]: its tests say how far apart the gateways are ([`Net::core_hops`]).
    LinuxGateway,
}

impl Behaviour {
    /// Every behaviour, in a fixed order.
    pub const ALL: [Behaviour; 6] = [
        Behaviour::Public,
        Behaviour::FullCone,
        Behaviour::PortRestricted,
        Behaviour::Symmetric,
        Behaviour::UdpBlocked,
        Behaviour::DoubleNat,
    ];

    /// Short label for matrices.
    pub fn label(self) -> &'static str {
        match self {
            Behaviour::Public => "pub",
            Behaviour::FullCone => "fc",
            Behaviour::PortRestricted => "pr",
            Behaviour::Symmetric => "sym",
            Behaviour::UdpBlocked => "blk",
            Behaviour::DoubleNat => "dbl",
            Behaviour::LinuxGateway => "lnx",
        }
    }
}

/// An inside flow: the inside ip:port and, for endpoint-dependent mapping, the destination.
type FlowKey = (SocketAddr, Option<SocketAddr>);

/// How long Linux keeps a UDP conntrack entry that has seen no reply (`nf_conntrack_udp_timeout`).
pub const CT_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Linux keeps a UDP conntrack entry that has seen traffic both ways
/// (`nf_conntrack_udp_timeout_stream`).
pub const CT_REPLIED_TIMEOUT: Duration = Duration::from_secs(120);

/// A (source, destination) pair: one direction of a conntrack entry.
type Tuple = (SocketAddr, SocketAddr);

/// One conntrack entry.
#[derive(Debug, Clone)]
struct CtEntry {
    /// The direction its first packet went.
    orig: Tuple,
    /// What the answer looks like (for a masqueraded flow: from the remote to the gateway's
    /// address and the port it picked).
    reply: Tuple,
    /// Created by a datagram to the gateway itself (nothing listens; it is dropped there).
    local: bool,
    /// A packet matched the reply direction.
    replied: bool,
    /// Last packet either way.
    last: Instant,
}

impl CtEntry {
    fn alive(&self, now: Instant) -> bool {
        let timeout = if self.replied {
            CT_REPLIED_TIMEOUT
        } else {
            CT_UNREPLIED_TIMEOUT
        };
        now < self.last + timeout
    }
}

/// Linux connection tracking as a plain `masquerade` gateway without an input filter uses it
/// (a minimal Debian router, a cloud NAT instance, a tutorial's homelab box):
///
/// - An outbound flow keeps its source port when the entry that results is unique, that is when
///   no other entry already holds the reply tuple (remote -> gateway:port); otherwise it gets
///   another port.
/// - An inbound datagram that answers an entry goes to the inside host. One that answers none
///   is addressed to the gateway itself: with no input filter it is accepted there (nothing
///   listens) and conntrack confirms an UNREPLIED entry for it. That entry holds the tuple: an
///   inside host that now sends to that remote from that port gets another port, and the
///   remote's next datagrams keep landing on the gateway. This is what defeats naive hole
///   punching through such gateways: whichever side's probe arrives first poisons the flow.
/// - Entries live [`CT_UNREPLIED_TIMEOUT`] without a reply and [`CT_REPLIED_TIMEOUT`] with one,
///   refreshed by every packet either way.
#[derive(Debug, Clone, Default)]
struct Conntrack {
    entries: BTreeMap<u64, CtEntry>,
    /// Both tuples of every entry.
    by_tuple: HashMap<Tuple, u64>,
    next: u64,
}

impl Conntrack {
    /// The live entry holding `tuple` (either direction); forgets it if it timed out.
    fn find(&mut self, tuple: Tuple, now: Instant) -> Option<u64> {
        let id = *self.by_tuple.get(&tuple)?;
        if self.entries.get(&id).is_some_and(|e| e.alive(now)) {
            return Some(id);
        }
        if let Some(e) = self.entries.remove(&id) {
            self.by_tuple.remove(&e.orig);
            self.by_tuple.remove(&e.reply);
        }
        None
    }

    fn insert(&mut self, e: CtEntry) {
        let id = self.next;
        self.next += 1;
        self.by_tuple.insert(e.orig, id);
        self.by_tuple.insert(e.reply, id);
        self.entries.insert(id, e);
    }

    /// Masquerades `src -> dst` behind `public`; returns the source port it leaves from.
    fn outbound(
        &mut self,
        public: Ipv4Addr,
        src: SocketAddr,
        dst: SocketAddr,
        rng: &mut SmallRng,
        now: Instant,
    ) -> u16 {
        if let Some(id) = self.find((src, dst), now) {
            let e = self.entries.get_mut(&id).unwrap();
            if e.orig == (src, dst) && !e.local {
                e.last = now;
                return e.reply.1.port();
            }
        }
        let at = |p: u16| SocketAddr::new(IpAddr::V4(public), p);
        let mut port = src.port();
        while self.find((dst, at(port)), now).is_some() {
            port = rng.gen_range(LOWEST_RANDOM_PORT..=u16::MAX);
        }
        self.insert(CtEntry {
            orig: (src, dst),
            reply: (dst, at(port)),
            local: false,
            replied: false,
            last: now,
        });
        port
    }

    /// A datagram from `from` to `to` (the gateway's address): the inside address it answers,
    /// or `None` when it went to the gateway itself (`true`: it created a new entry there).
    fn inbound(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        now: Instant,
    ) -> Result<SocketAddr, bool> {
        if let Some(id) = self.find((from, to), now) {
            let e = self.entries.get_mut(&id).unwrap();
            e.last = now;
            if !e.local && e.reply == (from, to) {
                e.replied = true;
                return Ok(e.orig.0);
            }
            return Err(false);
        }
        self.insert(CtEntry {
            orig: (from, to),
            reply: (to, from),
            local: true,
            replied: false,
            last: now,
        });
        Err(true)
    }

    /// Live entries.
    fn live(&self, now: Instant) -> usize {
        self.entries.values().filter(|e| e.alive(now)).count()
    }
}

/// One live mapping of a NAT.
#[derive(Debug, Clone)]
struct Binding {
    key: FlowKey,
    /// Last outbound datagram on this mapping.
    last_out: Instant,
    /// Remote ip:ports the inside host sent to on this mapping, with the last time it did.
    remotes: BTreeMap<SocketAddr, Instant>,
}

#[derive(Debug, Clone)]
struct NatBox {
    config: NatConfig,
    /// The realm the public side is in.
    outside: Realm,
    /// The NAT's address in `outside`.
    public: Ipv4Addr,
    next_port: u16,
    by_port: BTreeMap<u16, Binding>,
    by_flow: BTreeMap<FlowKey, u16>,
    /// Picks random ports (seeded from the network's rng when the NAT is added).
    rng: SmallRng,
    /// Last time expired mappings were swept.
    swept: Option<Instant>,
    /// With [`NatConfig::linux_gateway`]: connection tracking instead of mappings.
    conntrack: Conntrack,
}

impl NatBox {
    fn alive(&self, t: Instant, now: Instant) -> bool {
        now < t + self.config.timeout
    }

    fn expire(&mut self, now: Instant) {
        // Once per instant is enough (a spray allocates hundreds of mappings at one instant).
        if self.swept == Some(now) {
            return;
        }
        self.swept = Some(now);
        let timeout = self.config.timeout;
        let dead: Vec<u16> = self
            .by_port
            .iter()
            .filter(|(_, b)| now >= b.last_out + timeout)
            .map(|(p, _)| *p)
            .collect();
        for p in dead {
            if let Some(b) = self.by_port.remove(&p) {
                self.by_flow.remove(&b.key);
            }
        }
    }

    fn allocate(&mut self, key: FlowKey, now: Instant) -> u16 {
        self.expire(now);
        let port = if self.config.port_preservation && !self.by_port.contains_key(&key.0.port()) {
            key.0.port()
        } else if self.config.random_ports && self.by_port.len() < 60000 {
            loop {
                let p = self.rng.gen_range(LOWEST_RANDOM_PORT..=u16::MAX);
                if !self.by_port.contains_key(&p) {
                    break p;
                }
            }
        } else {
            loop {
                let p = self.next_port;
                self.next_port = if p == u16::MAX { FIRST_NAT_PORT } else { p + 1 };
                if !self.by_port.contains_key(&p) {
                    break p;
                }
            }
        };
        self.by_port.insert(
            port,
            Binding {
                key,
                last_out: now,
                remotes: BTreeMap::new(),
            },
        );
        self.by_flow.insert(key, port);
        port
    }

    /// Translates an outbound datagram's source, creating or refreshing the mapping.
    fn outbound(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        stats: &mut NetStats,
    ) -> Option<SocketAddr> {
        if self.config.blocks_udp && !self.config.allow.contains(&dst) {
            stats.blocked += 1;
            return None;
        }
        if dst.ip() == IpAddr::V4(self.public) {
            stats.hairpin += 1;
            return None;
        }
        if self.config.linux_gateway {
            let port = self
                .conntrack
                .outbound(self.public, src, dst, &mut self.rng, now);
            return Some(SocketAddr::new(IpAddr::V4(self.public), port));
        }
        let key = match self.config.mapping {
            Mapping::EndpointIndependent => (src, None),
            Mapping::EndpointDependent => (src, Some(dst)),
        };
        let live = self
            .by_flow
            .get(&key)
            .copied()
            .filter(|p| self.alive(self.by_port[p].last_out, now));
        let port = match live {
            Some(p) => p,
            None => self.allocate(key, now),
        };
        let timeout = self.config.timeout;
        let b = self.by_port.get_mut(&port).unwrap();
        b.last_out = now;
        b.remotes.retain(|_, t| now < *t + timeout);
        b.remotes.insert(dst, now);
        Some(SocketAddr::new(IpAddr::V4(self.public), port))
    }

    /// Translates an inbound datagram to `port` back to the inside address, or drops it.
    fn inbound(
        &mut self,
        from: SocketAddr,
        port: u16,
        now: Instant,
        stats: &mut NetStats,
    ) -> Option<SocketAddr> {
        if self.config.blocks_udp && !self.config.allow.contains(&from) {
            stats.blocked += 1;
            return None;
        }
        if self.config.linux_gateway {
            let to = SocketAddr::new(IpAddr::V4(self.public), port);
            return match self.conntrack.inbound(from, to, now) {
                Ok(inside) => Some(inside),
                Err(created) => {
                    stats.accepted_locally += 1;
                    stats.poisoned += u64::from(created);
                    None
                }
            };
        }
        let Some(b) = self.by_port.get(&port) else {
            stats.no_mapping += 1;
            return None;
        };
        if !self.alive(b.last_out, now) {
            stats.no_mapping += 1;
            return None;
        }
        if self.config.filtering == Filtering::AddressAndPortDependent
            && !b.remotes.get(&from).is_some_and(|t| self.alive(*t, now))
        {
            stats.filtered += 1;
            return None;
        }
        Some(b.key.0)
    }
}

// ---------------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------------

/// What happened to datagrams, for assertions and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to [`Net::send`].
    pub sent: u64,
    /// Lost to random loss, or to a link's own loss model ([`Net::set_link_loss`]).
    pub lost: u64,
    /// Delivered to a host.
    pub delivered: u64,
    /// Nobody at the destination (or no route out of a LAN without a NAT).
    pub no_route: u64,
    /// Sent from inside a NAT to that NAT's own public address.
    pub hairpin: u64,
    /// Arrived at a NAT port with no live mapping.
    pub no_mapping: u64,
    /// Arrived at a live mapping from a remote the inside host has not sent to.
    pub filtered: u64,
    /// Dropped by a UDP-blocking firewall.
    pub blocked: u64,
    /// Accepted by a Linux gateway itself (no entry answered it; nothing listens there).
    pub accepted_locally: u64,
    /// Of those, the ones that created a conntrack entry: a tuple an inside host's flow can no
    /// longer have.
    pub poisoned: u64,
    /// Dropped by a router because the IP TTL ran out.
    pub ttl_expired: u64,
}

/// How one direction of a link loses datagrams, on top of the network's random [`Net::loss`]
/// ([`Net::set_link_loss`]). Each link draws from a generator of its own, seeded from the
/// network's, so the same seed gives the same losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkLoss {
    /// Every datagram is lost with this probability.
    Random(f64),
    /// Loss in bursts (the Gilbert-Elliott model with a lossless good state and a bad state
    /// that loses everything): a datagram in the good state starts a burst with probability
    /// `enter`; each datagram in a burst is lost, and the burst ends after it with probability
    /// `leave`. Mean loss `enter / (enter + leave)`, mean burst `1 / leave` datagrams.
    Bursts {
        /// Chance that a burst starts.
        enter: f64,
        /// Chance that a burst ends after each of its datagrams.
        leave: f64,
    },
    /// A token bucket, as a carrier's UDP rate limit: `rate` datagrams per second with bursts
    /// of up to `burst`; what comes over it is dropped. Sparse datagrams (probes, keepalives)
    /// all pass; bulk above the rate loses the excess.
    RateLimit {
        /// Datagrams per second it lets through.
        rate: f64,
        /// Bucket size.
        burst: f64,
    },
}

/// A [`LinkLoss`] and its state.
struct Link {
    model: LinkLoss,
    rng: SmallRng,
    in_burst: bool,
    tokens: f64,
    refilled: Option<Instant>,
}

impl Link {
    /// Whether the datagram sent now is lost.
    fn loses(&mut self, now: Instant) -> bool {
        match self.model {
            LinkLoss::Random(p) => self.rng.gen_bool(p.clamp(0.0, 1.0)),
            LinkLoss::Bursts { enter, leave } => {
                if !self.in_burst {
                    self.in_burst = self.rng.gen_bool(enter.clamp(0.0, 1.0));
                }
                if !self.in_burst {
                    return false;
                }
                if self.rng.gen_bool(leave.clamp(0.0, 1.0)) {
                    self.in_burst = false;
                }
                true
            }
            LinkLoss::RateLimit { rate, burst } => {
                let since = self
                    .refilled
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                self.tokens = (self.tokens + since.as_secs_f64() * rate).min(burst);
                self.refilled = Some(now);
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    false
                } else {
                    true
                }
            }
        }
    }
}

struct RealmInfo {
    /// The NAT this realm is the inside of (`None` for the internet).
    nat: Option<NatBox>,
    /// Next host number to try when allocating an address.
    next_host: u8,
    /// Next NAT WAN number to try (internet only).
    next_wan: u8,
}

#[derive(Debug, Clone, Copy)]
struct HostInfo {
    realm: Realm,
    addr: SocketAddr,
    /// Cleared by [`Net::close_socket`]: nothing is delivered to it any more.
    open: bool,
    /// Next local port to try for an extra socket at this host's IP.
    next_ephemeral: u16,
}

/// A datagram in flight: from `from` to `to` inside `realm` (sources already translated).
struct InFlight {
    at: Instant,
    seq: u64,
    realm: Realm,
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
    /// IP TTL left.
    ttl: u8,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A datagram that reached a host.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When it arrived.
    pub at: Instant,
    /// Which host got it.
    pub host: HostId,
    /// Its source as the host sees it (after every NAT on the way).
    pub from: SocketAddr,
    /// The host's own address.
    pub to: SocketAddr,
    /// Bytes.
    pub payload: Vec<u8>,
}

/// The simulated network. See the module docs.
pub struct Net {
    realms: Vec<RealmInfo>,
    hosts: Vec<HostInfo>,
    by_addr: HashMap<(Realm, SocketAddr), HostId>,
    /// NATs by their public address: (outside realm, ip) -> inside realm.
    nat_by_ip: HashMap<(Realm, Ipv4Addr), Realm>,
    used_ips: HashSet<(Realm, Ipv4Addr)>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// The run's only randomness (keys and loss), seeded.
    pub rng: SmallRng,
    /// Probability that any one datagram is lost.
    pub loss: f64,
    /// Counters.
    pub stats: NetStats,
    /// When `Some`, one line per datagram event (sent, lost, dropped and why, delivered), for
    /// debugging a run.
    pub trace: Option<Vec<String>>,
    /// The run's start, for trace timestamps.
    epoch: Instant,
    /// Routers between any two sites on the internet (each takes one from the IP TTL). 0 puts
    /// every NAT's WAN and every public host on one segment.
    pub core_hops: u8,
    /// Loss models of single directions of links: (source IP, destination IP) as the
    /// datagram travels in the destination's realm (after the sender's NATs).
    links: HashMap<(Ipv4Addr, Ipv4Addr), Link>,
}

/// The IP TTL of a datagram sent without one.
pub const DEFAULT_TTL: u8 = 64;

/// One router hop: the datagram goes on with one less TTL, or `false` where it dies.
fn hop(ttl: &mut u8, stats: &mut NetStats) -> bool {
    if *ttl <= 1 {
        stats.ttl_expired += 1;
        return false;
    }
    *ttl -= 1;
    true
}

fn in_lan_prefix(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    (o[0], o[1], o[2]) == (192, 168, 1)
}

fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => panic!("simnet is IPv4 only: {addr}"),
    }
}

impl Net {
    /// An empty internet.
    pub fn new(seed: u64, loss: f64) -> Net {
        Net {
            realms: vec![RealmInfo {
                nat: None,
                next_host: 10,
                next_wan: 1,
            }],
            hosts: Vec::new(),
            by_addr: HashMap::new(),
            nat_by_ip: HashMap::new(),
            used_ips: HashSet::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            rng: SmallRng::seed_from_u64(seed),
            loss,
            stats: NetStats::default(),
            trace: None,
            epoch: Instant::now(),
            core_hops: 0,
            links: HashMap::new(),
        }
    }

    /// Datagrams from `from` to `to` (IPs as the destination's realm sees them: a NATed
    /// sender's public address) are lost by `model` from now on, besides [`Net::loss`]; `None`
    /// makes the direction clean again.
    pub fn set_link_loss(&mut self, from: Ipv4Addr, to: Ipv4Addr, model: Option<LinkLoss>) {
        match model {
            Some(model) => {
                let rng = SmallRng::seed_from_u64(self.rng.gen());
                let tokens = match model {
                    LinkLoss::RateLimit { burst, .. } => burst,
                    _ => 0.0,
                };
                self.links.insert(
                    (from, to),
                    Link {
                        model,
                        rng,
                        in_burst: false,
                        tokens,
                        refilled: None,
                    },
                );
            }
            None => {
                self.links.remove(&(from, to));
            }
        }
    }

    /// [`Net::set_link_loss`] in both directions (each with its own state).
    pub fn set_path_loss(&mut self, a: Ipv4Addr, b: Ipv4Addr, model: Option<LinkLoss>) {
        self.set_link_loss(a, b, model);
        self.set_link_loss(b, a, model);
    }

    fn log(&mut self, at: Instant, what: std::fmt::Arguments<'_>) {
        if let Some(t) = self.trace.as_mut() {
            let ms = at.saturating_duration_since(self.epoch).as_millis();
            t.push(format!("{ms:>7} {what}"));
        }
    }

    fn free_ip(&mut self, realm: Realm, wan: bool) -> Ipv4Addr {
        loop {
            let r = &mut self.realms[realm];
            let ip = if realm == INTERNET && wan {
                let h = r.next_wan;
                r.next_wan = h.checked_add(1).expect("out of NAT WAN addresses");
                Ipv4Addr::new(198, 51, 100, h)
            } else if realm == INTERNET {
                let h = r.next_host;
                r.next_host = h.checked_add(1).expect("out of public addresses");
                Ipv4Addr::new(203, 0, 113, h)
            } else {
                let h = r.next_host;
                r.next_host = h.checked_add(1).expect("out of LAN addresses");
                Ipv4Addr::new(192, 168, 1, h)
            };
            if !self.used_ips.contains(&(realm, ip)) && ip.octets()[3] != 255 {
                return ip;
            }
        }
    }

    /// Adds a NAT whose public side is in `outside` (the internet, or the LAN of another NAT
    /// for double NAT). Returns the new LAN realm behind it.
    pub fn add_nat(&mut self, outside: Realm, config: NatConfig) -> Realm {
        let public = self.free_ip(outside, true);
        self.used_ips.insert((outside, public));
        let realm = self.realms.len();
        let rng = SmallRng::seed_from_u64(self.rng.gen());
        self.realms.push(RealmInfo {
            nat: Some(NatBox {
                config,
                outside,
                public,
                next_port: FIRST_NAT_PORT,
                by_port: BTreeMap::new(),
                by_flow: BTreeMap::new(),
                rng,
                swept: None,
                conntrack: Conntrack::default(),
            }),
            next_host: 2,
            next_wan: 0,
        });
        self.nat_by_ip.insert((outside, public), realm);
        realm
    }

    /// Adds a host at the next free address of `realm`, port [`NODE_PORT`].
    pub fn add_host(&mut self, realm: Realm) -> HostId {
        let ip = self.free_ip(realm, false);
        self.add_host_at(realm, SocketAddr::from((ip, NODE_PORT)))
    }

    /// Adds a host at a given address.
    pub fn add_host_at(&mut self, realm: Realm, addr: SocketAddr) -> HostId {
        assert!(realm < self.realms.len(), "no realm {realm}");
        assert!(
            !self.nat_by_ip.contains_key(&(realm, v4(addr))),
            "{addr} is a NAT's address"
        );
        let id = self.hosts.len();
        let old = self.by_addr.insert((realm, addr), id);
        assert!(old.is_none(), "{addr} is taken in realm {realm}");
        self.used_ips.insert((realm, v4(addr)));
        self.hosts.push(HostInfo {
            realm,
            addr,
            open: true,
            next_ephemeral: FIRST_EPHEMERAL_PORT,
        });
        id
    }

    /// Opens another UDP socket on `host`'s machine: a new host at the same IP in the same
    /// realm, on the next free local port from 32768 (so NATs map it separately).
    pub fn open_socket(&mut self, host: HostId) -> HostId {
        let HostInfo { realm, addr, .. } = self.hosts[host];
        loop {
            let port = self.hosts[host].next_ephemeral;
            self.hosts[host].next_ephemeral = match port.checked_add(1) {
                Some(p) => p,
                None => FIRST_EPHEMERAL_PORT,
            };
            let candidate = SocketAddr::new(addr.ip(), port);
            if port != addr.port() && !self.by_addr.contains_key(&(realm, candidate)) {
                let id = self.hosts.len();
                self.by_addr.insert((realm, candidate), id);
                self.hosts.push(HostInfo {
                    realm,
                    addr: candidate,
                    open: true,
                    next_ephemeral: FIRST_EPHEMERAL_PORT,
                });
                return id;
            }
        }
    }

    /// Closes a socket opened with [`Net::open_socket`]: datagrams to it find nobody.
    pub fn close_socket(&mut self, host: HostId) {
        let h = &mut self.hosts[host];
        if h.open {
            h.open = false;
            self.by_addr.remove(&(h.realm, h.addr));
        }
    }

    /// Whether a host (socket) is open.
    pub fn is_open(&self, host: HostId) -> bool {
        self.hosts[host].open
    }

    /// A host's own address.
    pub fn addr(&self, host: HostId) -> SocketAddr {
        self.hosts[host].addr
    }

    /// A host's realm.
    pub fn realm_of(&self, host: HostId) -> Realm {
        self.hosts[host].realm
    }

    /// The public address of the NAT in front of `realm` (in its outside realm).
    pub fn nat_public(&self, realm: Realm) -> Option<Ipv4Addr> {
        self.realms[realm].nat.as_ref().map(|n| n.public)
    }

    /// Changes the idle timeout of the NAT in front of `realm`.
    pub fn set_nat_timeout(&mut self, realm: Realm, timeout: Duration) {
        if let Some(n) = self.realms[realm].nat.as_mut() {
            n.config.timeout = timeout;
        }
    }

    /// Lets UDP to and from `remote` through the UDP-blocking firewall in front of `realm`
    /// (for a relay).
    pub fn allow_udp(&mut self, realm: Realm, remote: SocketAddr) {
        if let Some(n) = self.realms[realm].nat.as_mut() {
            n.config.allow.push(remote);
        }
    }

    /// Lets UDP to and from `remote` through every UDP-blocking firewall.
    pub fn allow_udp_everywhere(&mut self, remote: SocketAddr) {
        for r in &mut self.realms {
            if let Some(n) = r.nat.as_mut().filter(|n| n.config.blocks_udp) {
                n.config.allow.push(remote);
            }
        }
    }

    /// The NAT in front of `realm` reboots: every mapping is forgotten.
    pub fn reset_nat(&mut self, realm: Realm) {
        if let Some(n) = self.realms[realm].nat.as_mut() {
            n.by_port.clear();
            n.by_flow.clear();
            n.conntrack = Conntrack::default();
        }
    }

    /// Live mappings of the NAT in front of `realm`.
    pub fn live_mappings(&self, realm: Realm, now: Instant) -> usize {
        self.realms[realm].nat.as_ref().map_or(0, |n| {
            if n.config.linux_gateway {
                return n.conntrack.live(now);
            }
            n.by_port
                .values()
                .filter(|b| n.alive(b.last_out, now))
                .count()
        })
    }

    fn is_local(&self, realm: Realm, ip: Ipv4Addr) -> bool {
        realm == INTERNET || in_lan_prefix(ip)
    }

    /// Carries a datagram out of LANs until it is in the realm where `dst` is local.
    /// Returns that realm and the source as seen there, or `None` when a NAT dropped it.
    /// Each NAT is a router hop: `ttl` loses one at each, and the datagram dies (after the NAT
    /// translated it, as Linux's conntrack sees it before routing does) where it runs out; then
    /// on the internet it crosses [`Net::core_hops`] more routers.
    fn route_out(
        &mut self,
        mut realm: Realm,
        mut src: SocketAddr,
        dst: SocketAddr,
        ttl: &mut u8,
        now: Instant,
    ) -> Option<(Realm, SocketAddr)> {
        let ip = v4(dst);
        let mut crossed = false;
        loop {
            if self.is_local(realm, ip) {
                if realm == INTERNET && crossed {
                    for _ in 0..self.core_hops {
                        if !hop(ttl, &mut self.stats) {
                            return None;
                        }
                    }
                }
                return Some((realm, src));
            }
            let nat = self.realms[realm].nat.as_mut()?;
            if *ttl <= 1 {
                self.stats.ttl_expired += 1;
                return None;
            }
            src = nat.outbound(src, dst, now, &mut self.stats)?;
            *ttl -= 1;
            realm = nat.outside;
            crossed = true;
        }
    }

    /// The address a datagram from `host` to `dst` would come from as `dst` sees it, creating
    /// the NAT mappings on the way as if it had been sent now (never lost). This is how the
    /// controller learns a node's reflexive address. `None` if no NAT lets it out.
    pub fn observe(&mut self, host: HostId, dst: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let h = self.hosts[host];
        let mut ttl = DEFAULT_TTL;
        self.route_out(h.realm, h.addr, dst, &mut ttl, now)
            .map(|(_, src)| src)
    }

    fn latency(&self, realm: Realm, a: SocketAddr, b: SocketAddr) -> Duration {
        if realm != INTERNET {
            return LAN_LATENCY;
        }
        // Deterministic per link: 5..45 ms from the two addresses.
        let h = a.ip().to_string().len() * 7 + b.ip().to_string().len() * 13;
        let o = usize::from(v4(a).octets()[3]) + usize::from(v4(b).octets()[3]);
        Duration::from_millis(5 + ((h + o) % 40) as u64)
    }

    /// `host` sends a datagram to `dst` now. It may be lost, dropped by a NAT, or arrive later.
    pub fn send(&mut self, host: HostId, dst: SocketAddr, payload: Vec<u8>, now: Instant) {
        self.send_with_ttl(host, dst, payload, DEFAULT_TTL, now);
    }

    /// [`Net::send`] with this IP TTL: the datagram dies at the router where it runs out.
    pub fn send_with_ttl(
        &mut self,
        host: HostId,
        dst: SocketAddr,
        payload: Vec<u8>,
        mut ttl: u8,
        now: Instant,
    ) {
        self.stats.sent += 1;
        let h = self.hosts[host];
        assert!(h.open, "send on closed socket {}", h.addr);
        // Loss happens on the way, after the sender's NATs translated (and so refreshed) it.
        let lose = self.rng.gen_bool(self.loss);
        let before = self.stats;
        let Some((realm, from)) = self.route_out(h.realm, h.addr, dst, &mut ttl, now) else {
            if self.stats == before {
                self.stats.no_route += 1;
            }
            let why = self.why(before);
            let len = payload.len();
            self.log(
                now,
                format_args!("{} -> {dst} {len}B dropped going out: {why}", h.addr),
            );
            return;
        };
        let len = payload.len();
        if lose {
            self.stats.lost += 1;
            self.log(
                now,
                format_args!("{} -> {dst} {len}B (as {from}) lost", h.addr),
            );
            return;
        }
        if let Some(link) = self.links.get_mut(&(v4(from), v4(dst))) {
            if link.loses(now) {
                self.stats.lost += 1;
                self.log(
                    now,
                    format_args!("{} -> {dst} {len}B (as {from}) lost on its link", h.addr),
                );
                return;
            }
        }
        self.log(
            now,
            format_args!("{} -> {dst} {len}B sent as {from}", h.addr),
        );
        let at = now + self.latency(realm, from, dst);
        self.seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            seq: self.seq,
            realm,
            from,
            to: dst,
            payload,
            ttl,
        }));
    }

    /// Which counter moved since `before`.
    fn why(&self, before: NetStats) -> &'static str {
        let s = self.stats;
        if s.hairpin > before.hairpin {
            "no hairpinning"
        } else if s.no_mapping > before.no_mapping {
            "no mapping"
        } else if s.filtered > before.filtered {
            "filtered"
        } else if s.blocked > before.blocked {
            "UDP blocked"
        } else if s.poisoned > before.poisoned {
            "taken by the gateway itself (conntrack entry created)"
        } else if s.accepted_locally > before.accepted_locally {
            "taken by the gateway itself"
        } else if s.ttl_expired > before.ttl_expired {
            "TTL expired"
        } else {
            "no route"
        }
    }

    /// When the next datagram arrives somewhere (it may still be dropped there).
    pub fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.peek().map(|r| r.0.at)
    }

    /// The next datagram due by `now` that reaches a host; drops the ones that do not.
    pub fn pop_arrival(&mut self, now: Instant) -> Option<Arrival> {
        while self.in_flight.peek().is_some_and(|r| r.0.at <= now) {
            let Reverse(d) = self.in_flight.pop()?;
            let (mut realm, mut to, mut ttl) = (d.realm, d.to, d.ttl);
            loop {
                if let Some(&host) = self.by_addr.get(&(realm, to)) {
                    self.stats.delivered += 1;
                    self.log(
                        d.at,
                        format_args!(
                            "{} -> {} {}B delivered to {to}",
                            d.from,
                            d.to,
                            d.payload.len()
                        ),
                    );
                    return Some(Arrival {
                        at: d.at,
                        host,
                        from: d.from,
                        to,
                        payload: d.payload,
                    });
                }
                let before = self.stats;
                let Some(&inside) = self.nat_by_ip.get(&(realm, v4(to))) else {
                    self.stats.no_route += 1;
                    self.log(
                        d.at,
                        format_args!(
                            "{} -> {} {}B dropped at {to}: no route",
                            d.from,
                            d.to,
                            d.payload.len()
                        ),
                    );
                    break;
                };
                let nat = self.realms[inside].nat.as_mut().unwrap();
                let forwarded = nat
                    .inbound(d.from, to.port(), d.at, &mut self.stats)
                    .filter(|_| hop(&mut ttl, &mut self.stats));
                match forwarded {
                    Some(internal) => {
                        realm = inside;
                        to = internal;
                    }
                    None => {
                        let why = self.why(before);
                        self.log(
                            d.at,
                            format_args!(
                                "{} -> {} {}B dropped at {to}: {why}",
                                d.from,
                                d.to,
                                d.payload.len()
                            ),
                        );
                        break;
                    }
                }
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes and services on the network
// ---------------------------------------------------------------------------------------------

/// A datagram a [`Service`] sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Destination.
    pub dst: SocketAddr,
    /// Bytes.
    pub payload: Vec<u8>,
}

/// Anything other than a mesh node that sits on a host: a relay, a STUN server, a sink.
pub trait Service {
    /// A datagram arrived; push any answers to `out`.
    fn handle_datagram(
        &mut self,
        from: SocketAddr,
        payload: &[u8],
        now: Instant,
        out: &mut Vec<Datagram>,
    );

    /// When [`Service::handle_timeout`] should run next; it must move past the current time
    /// once handled (or the clock cannot advance).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Timers that are due.
    fn handle_timeout(&mut self, _now: Instant, _out: &mut Vec<Datagram>) {}
}

/// A mesh node on a host.
pub struct SimNode {
    /// The real node.
    pub node: Node,
    /// Its host in the network.
    pub host: HostId,
    /// Its name in peer lists.
    pub name: String,
    /// Its overlay address.
    pub overlay: Ipv4Addr,
    /// Echo replies received: (peer overlay address, sequence number).
    pub replies: Vec<(Ipv4Addr, u16)>,
    /// The node's extra sockets open now, and their hosts.
    pub sockets: BTreeMap<SocketId, HostId>,
    /// Socket accounting, from the node's events and transmits.
    pub io: NodeIo,
    /// Messages sent through the relay, by destination.
    pub relayed_to: HashMap<PublicKey, u64>,
}

/// What a node asked of its driver, counted by the simulated one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeIo {
    /// Datagrams sent on the main socket.
    pub sent_main: u64,
    /// Datagrams sent on extra sockets.
    pub sent_extra: u64,
    /// Transmits on a socket that was not open (dropped, as a real driver would).
    pub dropped: u64,
    /// Messages sent through the relay.
    pub relayed: u64,
    /// Extra sockets opened and closed.
    pub sockets_opened: u64,
    /// See `sockets_opened`.
    pub sockets_closed: u64,
    /// Most extra sockets open at once.
    pub max_sockets: usize,
    /// Times the node's timers ran ([`Node::handle_timeout`] calls at its deadlines).
    pub wakes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Agent {
    /// A node's socket.
    Node(usize, SocketId),
    Service(usize),
    Relay,
}

/// Nodes and services on a [`Net`], run on a virtual clock.
pub struct Sim {
    /// When the run started.
    pub start: Instant,
    /// Virtual now.
    pub now: Instant,
    /// The network.
    pub net: Net,
    /// Nodes, by index (node `i` has overlay address [`overlay`]`(i)`).
    pub nodes: Vec<SimNode>,
    /// Services and their hosts.
    pub services: Vec<(HostId, Box<dyn Service>)>,
    agents: HashMap<HostId, Agent>,
    /// Keepalive for nodes added from now on.
    pub keepalive: Option<u16>,
    /// Idle timeout of NATs added by [`Sim::add_site`] from now on.
    pub nat_timeout: Duration,
    /// (virtual ms, from, to, bytes) of every datagram delivered.
    pub transcript: Vec<(u128, SocketAddr, SocketAddr, usize)>,
    /// (virtual ms, node, event) of every event a node returned, in order.
    pub events: Vec<(u128, usize, Event)>,
    /// How often each node's control connection (which shares the node's UDP socket) sends to
    /// the controller, refreshing the node's mapping towards it; `None` models no control
    /// traffic. See [`Sim::set_controller_keepalive`].
    controller_keepalive: Option<Duration>,
    next_controller: Option<Instant>,
    relay: Option<SimRelay>,
}

/// Overlay address of node `i` (100.64.0.0/10).
pub fn overlay(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::new(100, 64, (n >> 8) as u8, n as u8)
}

fn echo(kind: u8, src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28 + 32];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20] = kind;
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p
}

fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
    )
}

impl Sim {
    /// No hosts yet; nodes get keepalive 25 s, new NATs a 30 s timeout.
    pub fn empty(seed: u64, loss: f64) -> Sim {
        let start = Instant::now();
        let mut net = Net::new(seed, loss);
        net.epoch = start;
        Sim {
            start,
            now: start,
            net,
            nodes: Vec::new(),
            services: Vec::new(),
            agents: HashMap::new(),
            keepalive: Some(mesh_core::node::DEFAULT_KEEPALIVE),
            nat_timeout: DEFAULT_NAT_TIMEOUT,
            transcript: Vec::new(),
            events: Vec::new(),
            controller_keepalive: None,
            next_controller: None,
            relay: None,
        }
    }

    /// Puts a relay at [`RELAY`] (UDP-blocking firewalls let it through) and tells every node,
    /// present and future, that it has a relay connection.
    pub fn add_relay(&mut self) {
        assert!(self.relay.is_none(), "one relay per simulation");
        let host = self.net.add_host_at(INTERNET, RELAY);
        self.agents.insert(host, Agent::Relay);
        self.net.allow_udp_everywhere(RELAY);
        self.relay = Some(SimRelay::new(host, self.now + RELAY_KEEPALIVE));
        for i in 0..self.nodes.len() {
            self.join_relay(i);
        }
    }

    /// Node `i` connects to the relay and is admitted (or, connected already, refreshes its
    /// mapping toward it).
    fn join_relay(&mut self, i: usize) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        let host = self.nodes[i].host;
        if let Some(seen) = self.net.observe(host, RELAY, self.now) {
            relay.connect(self.nodes[i].node.public_key(), seen);
        }
        self.nodes[i].node.set_relay(true, self.now);
        self.flush(i);
    }

    /// A datagram arrived at the relay: it forwards what its rules let through.
    fn relay_datagram(&mut self, from: SocketAddr, payload: &[u8]) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        if let Some((to, datagram)) = relay.forward(from, payload) {
            self.net.send(relay.host, to, datagram, self.now);
        }
    }

    /// The relay, if [`Sim::add_relay`] put one.
    pub fn relay(&self) -> Option<&SimRelay> {
        self.relay.as_ref()
    }

    /// Models the control connection: every `interval` each node sends a datagram to
    /// [`CONTROLLER`] from its one socket (with endpoint-independent mapping this keeps the
    /// node's external port, not its filter entries for peers). `None` stops it.
    pub fn set_controller_keepalive(&mut self, interval: Option<Duration>) {
        self.controller_keepalive = interval;
        self.next_controller = interval.map(|d| self.now + d);
    }

    /// A new site for a node of the given behaviour: the internet for `Public`, otherwise a new
    /// LAN behind new NAT(s) with [`Sim::nat_timeout`]. More nodes may be added to the same LAN.
    pub fn add_site(&mut self, behaviour: Behaviour) -> Realm {
        let t = self.nat_timeout;
        match behaviour {
            Behaviour::Public => INTERNET,
            Behaviour::FullCone => self.net.add_nat(INTERNET, NatConfig::full_cone(t)),
            Behaviour::PortRestricted => self.net.add_nat(INTERNET, NatConfig::port_restricted(t)),
            Behaviour::Symmetric => self.net.add_nat(INTERNET, NatConfig::symmetric(t)),
            Behaviour::UdpBlocked => {
                let lan = self.net.add_nat(INTERNET, NatConfig::udp_blocked(t));
                if self.relay.is_some() {
                    self.net.allow_udp(lan, RELAY);
                }
                lan
            }
            Behaviour::DoubleNat => {
                let cgnat = self.net.add_nat(INTERNET, NatConfig::port_restricted(t));
                self.net.add_nat(cgnat, NatConfig::port_restricted(t))
            }
            Behaviour::LinuxGateway => self.net.add_nat(INTERNET, NatConfig::linux_gateway()),
        }
    }

    /// A node on a new site of this behaviour. Returns its index.
    pub fn add_node_behind(&mut self, behaviour: Behaviour) -> usize {
        let realm = self.add_site(behaviour);
        self.add_node(realm)
    }

    /// A node at the next free address of `realm`. Returns its index.
    pub fn add_node(&mut self, realm: Realm) -> usize {
        let host = self.net.add_host(realm);
        self.place_node(host)
    }

    /// A node at a given address. Returns its index.
    pub fn add_node_at(&mut self, realm: Realm, addr: SocketAddr) -> usize {
        let host = self.net.add_host_at(realm, addr);
        self.place_node(host)
    }

    fn place_node(&mut self, host: HostId) -> usize {
        let i = self.nodes.len();
        let mut sk = [0u8; 32];
        self.net.rng.fill(&mut sk);
        // Real nodes tick (every 250 ms) at unrelated phases; nodes created at one instant
        // would all tick, and so retransmit handshakes, in lockstep.
        let phase = Duration::from_millis(self.net.rng.gen_range(0..250));
        let node = Node::new(
            NodeConfig {
                private_key: sk,
                address: overlay(i),
                keepalive: self.keepalive,
                mtu: 1420,
            },
            (i as u32) * 4099 + 1,
            self.now + phase,
        );
        self.agents.insert(host, Agent::Node(i, SocketId::MAIN));
        self.nodes.push(SimNode {
            node,
            host,
            name: format!("node-{i}"),
            overlay: overlay(i),
            replies: Vec::new(),
            sockets: BTreeMap::new(),
            io: NodeIo::default(),
            relayed_to: HashMap::new(),
        });
        self.join_relay(i);
        i
    }

    /// A service at a given address (a relay: `add_service(INTERNET, addr, ...)`).
    pub fn add_service(
        &mut self,
        realm: Realm,
        addr: SocketAddr,
        service: Box<dyn Service>,
    ) -> HostId {
        let host = self.net.add_host_at(realm, addr);
        self.agents
            .insert(host, Agent::Service(self.services.len()));
        self.services.push((host, service));
        host
    }

    /// The node's key.
    pub fn key(&self, i: usize) -> PublicKey {
        self.nodes[i].node.public_key()
    }

    /// Node `i`'s own (LAN or public) address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.net.addr(self.nodes[i].host)
    }

    /// The candidates the controller would hand out for node `i`: the reflexive address it sees
    /// (this sends the node's "first datagram to the controller" now, so the mappings exist and
    /// start timing out from now), then the node's own address if that differs.
    pub fn candidates(&mut self, i: usize) -> Vec<SocketAddr> {
        let own = self.addr(i);
        let mut c = Vec::new();
        if let Some(r) = self.reflexive(i) {
            c.push(r);
        }
        if !c.contains(&own) {
            c.push(own);
        }
        c
    }

    /// Node `i`'s reflexive address as the controller sees it (refreshing that mapping now), or
    /// `None` when no UDP gets out.
    pub fn reflexive(&mut self, i: usize) -> Option<SocketAddr> {
        let host = self.nodes[i].host;
        self.net.observe(host, CONTROLLER, self.now)
    }

    /// Every node's peer entry as the controller would send it.
    pub fn peer_configs(&mut self) -> Vec<PeerConfig> {
        (0..self.nodes.len())
            .map(|i| PeerConfig {
                routes: Vec::new(),
                key: self.key(i),
                name: self.nodes[i].name.clone(),
                address: self.nodes[i].overlay,
                address6: None,
                endpoints: self.candidates(i),
                observed: None,
                nat: None,
            })
            .collect()
    }

    /// Gives every node this peer list (its own entry is ignored) and sends what they start.
    pub fn set_peers(&mut self, peers: &[PeerConfig]) {
        for n in &mut self.nodes {
            n.node.set_peers(peers, self.now);
        }
        for i in 0..self.nodes.len() {
            self.flush(i);
        }
    }

    /// The controller introduces everyone to everyone.
    pub fn connect(&mut self) {
        let peers = self.peer_configs();
        self.set_peers(&peers);
    }

    /// Moves everything node `i` wants to do into the network or back into the node. Events
    /// first, as a real driver must: they open the sockets the transmits go out on.
    pub fn flush(&mut self, i: usize) {
        while let Some(output) = self.nodes[i].node.poll_output() {
            match output {
                Output::Event(ev) => self.event(i, ev),
                Output::Transmit(t) => {
                    self.transmit(i, &t);
                    self.nodes[i].node.recycle(t.contents);
                }
                Output::Unsealed(u) => {
                    // A driver seals it on another thread; here, at once.
                    let t = u.seal();
                    self.transmit(i, &t);
                    self.nodes[i].node.recycle(t.contents);
                }
                Output::Unopened(u) => {
                    // Likewise opened at once, and given back.
                    self.nodes[i].node.handle_opened(u.open());
                }
                Output::Tun(pkt) => {
                    // Play the node's IP stack: answer echo requests, record replies.
                    let (src, dst) = addrs(&pkt);
                    let seq = u16::from_be_bytes([pkt[26], pkt[27]]);
                    if pkt[20] == ECHO_REQUEST {
                        let reply = echo(ECHO_REPLY, dst, src, seq);
                        self.nodes[i].node.handle_tun_packet(&reply, self.now);
                    } else {
                        self.nodes[i].replies.push((src, seq));
                    }
                    self.nodes[i].node.recycle(pkt);
                }
            }
        }
    }

    /// Carries out an event of node `i`: extra sockets open and close.
    fn event(&mut self, i: usize, ev: Event) {
        let at = self.now.duration_since(self.start).as_millis();
        self.events.push((at, i, ev.clone()));
        match ev {
            Event::OpenSocket(id) => {
                assert_ne!(id, SocketId::MAIN, "node {i} opened MAIN");
                let host = self.net.open_socket(self.nodes[i].host);
                let old = self.nodes[i].sockets.insert(id, host);
                assert!(old.is_none(), "node {i} reopened open socket {id:?}");
                self.agents.insert(host, Agent::Node(i, id));
                let n = &mut self.nodes[i];
                n.io.sockets_opened += 1;
                n.io.max_sockets = n.io.max_sockets.max(n.sockets.len());
            }
            Event::CloseSocket(id) => {
                let host = self.nodes[i].sockets.remove(&id);
                let host = host.unwrap_or_else(|| panic!("node {i} closed {id:?}"));
                self.net.close_socket(host);
                self.agents.remove(&host);
                self.nodes[i].io.sockets_closed += 1;
            }
            _ => {}
        }
    }

    /// Sends a transmit of node `i`: each datagram of it on its socket, or through the relay.
    fn transmit(&mut self, i: usize, t: &Transmit) {
        match t.destination {
            Destination::Udp { socket, dst } => {
                let n = &mut self.nodes[i];
                let host = if socket == SocketId::MAIN {
                    n.host
                } else if let Some(h) = n.sockets.get(&socket) {
                    *h
                } else {
                    n.io.dropped += t.datagrams() as u64;
                    return;
                };
                for d in t.segments() {
                    if socket == SocketId::MAIN {
                        n.io.sent_main += 1;
                    } else {
                        n.io.sent_extra += 1;
                    }
                    let ttl = t.ttl.unwrap_or(DEFAULT_TTL);
                    self.net.send_with_ttl(host, dst, d.to_vec(), ttl, self.now);
                }
            }
            Destination::Relay { to } => {
                let Some(relay) = self.relay.as_mut() else {
                    return;
                };
                let n = &mut self.nodes[i];
                n.io.relayed += 1;
                *n.relayed_to.entry(to).or_default() += 1;
                for datagram in relay.node_sends(&n.node.public_key(), &to, &t.contents) {
                    self.net.send(n.host, RELAY, datagram, self.now);
                }
            }
        }
    }

    fn send_all(&mut self, host: HostId, out: Vec<Datagram>) {
        for d in out {
            self.net.send(host, d.dst, d.payload, self.now);
        }
    }

    /// Node `from` sends node `to` an IP packet of `len` bytes (at least 60) into its TUN side:
    /// an echo reply, which `to` records in its `replies` (with `seq`) and answers nothing.
    pub fn send_data(&mut self, from: usize, to: usize, seq: u16, len: usize) {
        let mut p = echo(
            ECHO_REPLY,
            self.nodes[from].overlay,
            self.nodes[to].overlay,
            seq,
        );
        p.resize(len.max(p.len()), 0);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        self.nodes[from].node.handle_tun_packet(&p, self.now);
        self.flush(from);
    }

    /// Node `from` pings node `to` (an ICMP echo request into its TUN side).
    pub fn ping(&mut self, from: usize, to: usize, seq: u16) {
        let p = echo(
            ECHO_REQUEST,
            self.nodes[from].overlay,
            self.nodes[to].overlay,
            seq,
        );
        self.nodes[from].node.handle_tun_packet(&p, self.now);
        self.flush(from);
    }

    /// Advances virtual time up to `until`, processing deliveries and timers in order.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let next_delivery = self.net.next_arrival();
            let next_timer = self
                .nodes
                .iter()
                .filter_map(|n| n.node.poll_timeout())
                .chain(self.services.iter().filter_map(|(_, s)| s.poll_timeout()))
                .chain(self.next_controller)
                .chain(self.relay.as_ref().map(|r| r.next_keepalive))
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => {
                    self.now = self.now.max(until);
                    return;
                }
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            while let Some(a) = self.net.pop_arrival(self.now) {
                self.transcript.push((
                    a.at.duration_since(self.start).as_millis(),
                    a.from,
                    a.to,
                    a.payload.len(),
                ));
                match self.agents.get(&a.host).copied() {
                    Some(Agent::Node(j, socket)) => {
                        if socket == SocketId::MAIN && a.from == RELAY {
                            // The node's relay connection takes it and reassembles.
                            let key = self.nodes[j].node.public_key();
                            let now = self.now;
                            let relayed = self
                                .relay
                                .as_mut()
                                .and_then(|r| r.node_receives(&key, &a.payload, now));
                            if let Some((from, message)) = relayed {
                                let source = Source::Relay { from };
                                self.nodes[j].node.handle_datagram(source, &message, now);
                            }
                        } else {
                            let source = Source::Udp {
                                socket,
                                from: a.from,
                            };
                            self.nodes[j]
                                .node
                                .handle_datagram(source, &a.payload, self.now);
                        }
                        self.flush(j);
                    }
                    Some(Agent::Relay) => self.relay_datagram(a.from, &a.payload),
                    Some(Agent::Service(k)) => {
                        let mut out = Vec::new();
                        self.services[k]
                            .1
                            .handle_datagram(a.from, &a.payload, self.now, &mut out);
                        self.send_all(a.host, out);
                    }
                    None => {}
                }
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .node
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.nodes[i].node.handle_timeout(self.now);
                    self.nodes[i].io.wakes += 1;
                    self.flush(i);
                }
            }
            if self
                .relay
                .as_ref()
                .is_some_and(|r| r.next_keepalive <= self.now)
            {
                for i in 0..self.nodes.len() {
                    self.join_relay(i);
                }
                if let Some(r) = self.relay.as_mut() {
                    r.next_keepalive = self.now + RELAY_KEEPALIVE;
                }
            }
            if let (Some(t), Some(d)) = (self.next_controller, self.controller_keepalive) {
                if t <= self.now {
                    for i in 0..self.nodes.len() {
                        let host = self.nodes[i].host;
                        self.net.observe(host, CONTROLLER, self.now);
                    }
                    self.next_controller = Some(self.now + d);
                }
            }
            for k in 0..self.services.len() {
                if self.services[k]
                    .1
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    let mut out = Vec::new();
                    self.services[k].1.handle_timeout(self.now, &mut out);
                    let host = self.services[k].0;
                    self.send_all(host, out);
                }
            }
        }
    }

    /// Advances virtual time by `d`.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    /// Whether node `from` ever got an echo reply from node `to`.
    pub fn replied(&self, from: usize, to: usize) -> bool {
        let o = self.nodes[to].overlay;
        self.nodes[from].replies.iter().any(|(src, _)| *src == o)
    }

    /// Forgets every echo reply received so far.
    pub fn clear_replies(&mut self) {
        for n in &mut self.nodes {
            n.replies.clear();
        }
    }

    /// The endpoint node `a` uses for node `b` (confirmed by an authenticated packet).
    pub fn endpoint(&self, a: usize, b: usize) -> Option<SocketAddr> {
        let o = self.nodes[b].overlay;
        self.nodes[a]
            .node
            .status(self.now)
            .peers
            .into_iter()
            .find(|p| p.address == o)
            .and_then(|p| p.endpoint)
    }

    /// The local socket of node `a`'s direct path to node `b`.
    pub fn local_socket(&self, a: usize, b: usize) -> Option<SocketId> {
        let key = self.key(b);
        self.nodes[a].node.local_socket(&key)
    }

    /// Messages node `a` has sent to node `b` through the relay.
    pub fn relayed(&self, a: usize, b: usize) -> u64 {
        let key = self.key(b);
        self.nodes[a].relayed_to.get(&key).copied().unwrap_or(0)
    }

    /// Whether both `a` and `b` have a direct path to each other.
    pub fn direct(&self, a: usize, b: usize) -> bool {
        self.endpoint(a, b).is_some() && self.endpoint(b, a).is_some()
    }

    /// Runs in 250 ms steps until `a` and `b` have a direct path to each other; how long it
    /// took.
    pub fn time_to_direct(&mut self, a: usize, b: usize, max: Duration) -> Option<Duration> {
        let t0 = self.now;
        while self.now.duration_since(t0) < max {
            if self.direct(a, b) {
                return Some(self.now.duration_since(t0));
            }
            self.run_for(Duration::from_millis(250));
        }
        None
    }

    /// Tells every node its own NAT kind and every peer's, as the agent and the controller do
    /// once the observer answered.
    pub fn tell_kinds(&mut self, kinds: &[(usize, NatKind)]) {
        for &(i, k) in kinds {
            self.nodes[i].node.set_nat(Some(k));
        }
        let mut peers = self.peer_configs();
        for &(i, k) in kinds {
            peers[i].nat = Some(k);
        }
        self.set_peers(&peers);
    }
}

/// Pings every ordered pair (with application retries each second, as `ping` does) and returns
/// the pairs that never got an answer.
pub fn all_pairs(sim: &mut Sim, attempts: u16) -> Vec<(usize, usize)> {
    pairs_among(sim, &(0..sim.nodes.len()).collect::<Vec<_>>(), attempts)
}

/// Like [`all_pairs`], among the given nodes only.
pub fn pairs_among(sim: &mut Sim, nodes: &[usize], attempts: u16) -> Vec<(usize, usize)> {
    for attempt in 0..attempts {
        for &a in nodes {
            for &b in nodes {
                if a != b && !sim.replied(a, b) {
                    sim.ping(a, b, attempt);
                }
            }
        }
        sim.run_for(Duration::from_secs(1));
    }
    let mut missing = Vec::new();
    for &a in nodes {
        for &b in nodes {
            if a != b && !sim.replied(a, b) {
                missing.push((a, b));
            }
        }
    }
    missing
}

/// Like [`pairs_among`], but stops as soon as every ordered pair has answered. Returns how
/// long that took (whole virtual seconds) and the pairs still missing after `max_secs`.
pub fn pairs_until_answered(
    sim: &mut Sim,
    nodes: &[usize],
    max_secs: u16,
) -> (Duration, Vec<(usize, usize)>) {
    let t0 = sim.now;
    let mut missing = Vec::new();
    for attempt in 0..max_secs {
        missing.clear();
        for &a in nodes {
            for &b in nodes {
                if a != b && !sim.replied(a, b) {
                    missing.push((a, b));
                    sim.ping(a, b, attempt);
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        sim.run_for(Duration::from_secs(1));
    }
    missing.retain(|&(a, b)| !sim.replied(a, b));
    (sim.now.duration_since(t0), missing)
}
