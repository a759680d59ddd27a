//! Birthday-paradox hole punching: a direct path to a peer behind a NAT with endpoint-dependent
//! ("symmetric") mapping and random port allocation, from a peer behind a NAT with
//! endpoint-independent mapping (EIM) and address-and-port-dependent filtering.
//!
//! Regular candidate probing cannot connect such a pair: every destination gets a new random
//! port on the symmetric side, and the EIM side's NAT only lets in ports it has sent to. The
//! technique (as described in Tailscale's "How NAT traversal works") makes the two sides meet
//! by chance, with odds set by the birthday paradox:
//!
//! - **Socket role.** The node opens [`BirthdayConfig::sockets`] (K) extra UDP sockets and sends
//!   one authenticated probe from each to the peer's public candidate (its EIM mapping M). A
//!   symmetric NAT gives each socket a mapping of its own, on a random port, that accepts
//!   replies from M.
//! - **Spray role.** The node sends [`BirthdayConfig::probes`] (N) authenticated probes from its
//!   main socket to random ports (1024..=65535) of the peer's public IP, paced
//!   [`BirthdayConfig::probes_per_tick`] per tick. Each one also opens the node's own filter for
//!   that port.
//!
//! A spray probe that lands on one of the K mappings reaches socket k; the node answers from k,
//! the answer passes the EIM side's filter (it sprayed that port), and both sides upgrade to the
//! direct path: the EIM side to (its main socket, the symmetric side's port k), the symmetric side
//! to (socket k, M). Per attempt, P(hit) = 1 - (1 - K/64512)^N, about 98 % for K = 256 and
//! N = 1024. The other K - 1 sockets close at once; socket k stays with the peer for as long as
//! that direct path lives.
//!
//! Nodes do not know their NAT type, so both sides of a pair that is still on the relay after
//! [`AFTER_FAILED_ROUNDS`] unanswered candidate rounds run both roles. The side that starts
//! tells the other through the tunnel (a [`crate::pmtu::Kind::Birthday`] message), which joins
//! at once, so the socket side's mappings exist when the spray arrives. A node busy with an
//! attempt toward another peer answers a join with the spray role only (up to
//! [`MAX_SIDE_SPRAYS`] at once): if it is the EIM side, that is all the attempt needs from it,
//! and in a cluster a symmetric node may be punching toward many peers at the same time.
//!
//! Bounds: at most one attempt in flight per node (so at most K extra sockets, plus one kept
//! per peer that won); an attempt ends after [`ATTEMPT_TIMEOUT`] and closes its sockets; attempts
//! toward one peer back off from [`FIRST_RETRY`] doubling to [`MAX_RETRY`] and start over when
//! the peer's candidates change or its direct path dies; never toward peers whose candidates are
//! all private addresses. Probes are WireGuard keepalives of the session the pair already has
//! through the relay, so nothing unauthenticated is ever answered.

use crate::node::SocketId;
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::Rng;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Default K: extra sockets per attempt.
pub const DEFAULT_SOCKETS: u16 = 256;
/// Default N: spray probes per attempt.
pub const DEFAULT_PROBES: u16 = 1024;
/// Default spray pace: probes per tick (250 ms), so one attempt sprays for one second.
pub const DEFAULT_PROBES_PER_TICK: u16 = 256;
/// Largest K [`crate::Node::set_birthday`] accepts.
pub const MAX_SOCKETS: u16 = 1024;
/// Largest N [`crate::Node::set_birthday`] accepts (half the port range, so that picking fresh
/// random ports stays cheap).
pub const MAX_PROBES: u16 = 32768;
/// Largest pace [`crate::Node::set_birthday`] accepts (a quarter of the transmit queue).
pub const MAX_PROBES_PER_TICK: u16 = 1024;
/// Unanswered candidate probe rounds (2 s, then 4 s apart) before a peer gets an attempt.
pub const AFTER_FAILED_ROUNDS: u8 = 2;
/// An attempt that has not found a direct path this long after it started gives up.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Spraying starts this long after the attempt, so the peer (told through the relay) has opened
/// its sockets by the time the first probes arrive.
pub const SPRAY_DELAY: Duration = Duration::from_millis(250);
/// Wait before the second attempt toward a peer; doubles after each attempt.
pub const FIRST_RETRY: Duration = Duration::from_secs(30);
/// Longest wait between attempts toward one peer.
pub const MAX_RETRY: Duration = Duration::from_secs(600);
/// A peer's request to join an attempt is honoured at most this often (bounds what a peer can
/// make this node send).
pub const MIN_JOIN_SPACING: Duration = Duration::from_secs(5);
/// Spray-only answers (a join while busy) running at once, over all peers.
pub const MAX_SIDE_SPRAYS: usize = 8;
/// A socket kept for a peer closes this long after the peer's direct path stopped using it.
pub const KEPT_SOCKET_GRACE: Duration = Duration::from_secs(5);
/// Most public candidates of a peer probed from each extra socket.
pub const MAX_TARGETS: usize = 2;
/// Lowest port sprayed (ports below are rarely handed out by NATs).
pub const LOWEST_PORT: u16 = 1024;

/// Sizes of a birthday attempt. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthdayConfig {
    /// K: extra sockets opened per attempt (capped at [`MAX_SOCKETS`]).
    pub sockets: u16,
    /// N: probes sprayed to random ports of the peer's public IP per attempt (capped at
    /// [`MAX_PROBES`]).
    pub probes: u16,
    /// Spray probes per tick (capped at [`MAX_PROBES_PER_TICK`], at least 1).
    pub probes_per_tick: u16,
}

impl Default for BirthdayConfig {
    fn default() -> Self {
        BirthdayConfig {
            sockets: DEFAULT_SOCKETS,
            probes: DEFAULT_PROBES,
            probes_per_tick: DEFAULT_PROBES_PER_TICK,
        }
    }
}

impl BirthdayConfig {
    /// The same sizes within the documented caps.
    pub fn bounded(self) -> BirthdayConfig {
        BirthdayConfig {
            sockets: self.sockets.min(MAX_SOCKETS),
            probes: self.probes.min(MAX_PROBES),
            probes_per_tick: self.probes_per_tick.clamp(1, MAX_PROBES_PER_TICK),
        }
    }

    /// Probability that one attempt finds a symmetric NAT's mapping, for a NAT that hands out
    /// ports at random from 1024..=65535.
    pub fn hit_probability(&self) -> f64 {
        let range = f64::from(u16::MAX - LOWEST_PORT + 1);
        1.0 - (1.0 - f64::from(self.sockets) / range).powi(i32::from(self.probes))
    }
}

/// What birthday attempts have cost and won so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BirthdayStats {
    /// Attempts this node started on its own schedule.
    pub attempts: u64,
    /// Attempts this node started because the peer asked it to join.
    pub joined: u64,
    /// Attempts (of either kind) that ended with a direct path to the peer.
    pub succeeded: u64,
    /// Extra sockets opened.
    pub sockets_opened: u64,
    /// Probes sent (from extra sockets and sprayed from the main socket).
    pub probes_sent: u64,
    /// Joins answered by spraying only, because an attempt toward another peer was in flight.
    pub side_sprays: u64,
}

/// Who an extra socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// One of the sockets of the attempt toward this peer.
    Attempt(PublicKey),
    /// The socket of this peer's direct path (it won an attempt).
    Peer(PublicKey),
}

impl Owner {
    /// The peer the socket is for.
    pub(crate) fn peer(self) -> PublicKey {
        match self {
            Owner::Attempt(k) | Owner::Peer(k) => k,
        }
    }
}

/// The node's open extra sockets. Ids go round 1..=65535, skipping open ones, so an id is not
/// used again until all the others were.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    owners: BTreeMap<SocketId, Owner>,
    last: u16,
}

impl Sockets {
    /// Allocates an id for a new socket; `None` when every id is in use.
    pub(crate) fn open(&mut self, owner: Owner) -> Option<SocketId> {
        if self.owners.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last = self.last.checked_add(1).unwrap_or(1);
            if let Entry::Vacant(slot) = self.owners.entry(SocketId(self.last)) {
                let id = *slot.key();
                slot.insert(owner);
                return Some(id);
            }
        }
    }

    /// Forgets a socket; whether it was open.
    pub(crate) fn close(&mut self, id: SocketId) -> bool {
        self.owners.remove(&id).is_some()
    }

    pub(crate) fn owner(&self, id: SocketId) -> Option<Owner> {
        self.owners.get(&id).copied()
    }

    pub(crate) fn set_owner(&mut self, id: SocketId, owner: Owner) {
        if let Some(o) = self.owners.get_mut(&id) {
            *o = owner;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.owners.len()
    }
}

/// When a peer gets its next attempt.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    /// Candidate probe rounds that went unanswered since the last reset.
    failed_rounds: u8,
    /// No attempt of our own before this.
    not_before: Option<Instant>,
    /// Wait after the next attempt.
    backoff: Duration,
    /// When the last attempt toward the peer (own or joined) started.
    last_started: Option<Instant>,
    /// When the last spray-only answer to the peer's join started.
    last_side_spray: Option<Instant>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            failed_rounds: 0,
            not_before: None,
            backoff: FIRST_RETRY,
            last_started: None,
            last_side_spray: None,
        }
    }
}

impl Schedule {
    /// A candidate probe round went unanswered.
    pub(crate) fn round_failed(&mut self) {
        self.failed_rounds = self.failed_rounds.saturating_add(1);
    }

    /// New candidates, or the direct path died: start over (regular rounds first).
    pub(crate) fn reset(&mut self) {
        self.failed_rounds = 0;
        self.not_before = None;
        self.backoff = FIRST_RETRY;
    }

    /// Whether this node should start an attempt toward the peer now.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.failed_rounds >= AFTER_FAILED_ROUNDS && self.not_before.is_none_or(|t| now >= t)
    }

    /// Whether the peer's request to join may be honoured now.
    pub(crate) fn may_join(&self, now: Instant) -> bool {
        self.last_started
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_JOIN_SPACING)
    }

    /// Whether a spray-only answer to the peer's join may start now (at most one per
    /// [`MIN_JOIN_SPACING`]), and if so, records it.
    pub(crate) fn take_side_spray(&mut self, now: Instant) -> bool {
        let ok = self
            .last_side_spray
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_JOIN_SPACING);
        if ok {
            self.last_side_spray = Some(now);
        }
        ok
    }

    /// An attempt toward the peer starts now.
    pub(crate) fn started(&mut self, now: Instant) {
        self.last_started = Some(now);
        self.not_before = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    #[cfg(test)]
    pub(crate) fn hold_off(&mut self, until: Instant) {
        self.not_before = Some(until);
    }
}

/// The attempt in flight.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// Toward which peer.
    pub(crate) peer: PublicKey,
    /// Its extra sockets.
    pub(crate) sockets: Vec<SocketId>,
    /// The peer's public IP, sprayed.
    pub(crate) spray_ip: Ipv4Addr,
    /// When spraying starts.
    pub(crate) spray_from: Instant,
    /// When the attempt gives up.
    pub(crate) ends: Instant,
    /// Ports sprayed so far (each port at most once per attempt).
    sprayed: HashSet<u16>,
}

impl Attempt {
    pub(crate) fn new(
        peer: PublicKey,
        sockets: Vec<SocketId>,
        spray_ip: Ipv4Addr,
        now: Instant,
    ) -> Attempt {
        Attempt {
            peer,
            sockets,
            spray_ip,
            spray_from: now + SPRAY_DELAY,
            ends: now + ATTEMPT_TIMEOUT,
            sprayed: HashSet::new(),
        }
    }

    /// The next spray destinations due now: up to `config.probes_per_tick` fresh random ports,
    /// until `config.probes` were sprayed in all.
    pub(crate) fn next_sprays(
        &mut self,
        config: &BirthdayConfig,
        rng: &mut SmallRng,
        now: Instant,
    ) -> Vec<SocketAddr> {
        if now < self.spray_from {
            return Vec::new();
        }
        let left = usize::from(config.probes).saturating_sub(self.sprayed.len());
        let n = left.min(usize::from(config.probes_per_tick));
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let port = rng.gen_range(LOWEST_PORT..=u16::MAX);
            if self.sprayed.insert(port) {
                out.push(SocketAddr::new(IpAddr::V4(self.spray_ip), port));
            }
        }
        out
    }

    /// Probes sprayed so far.
    pub(crate) fn sprayed(&self) -> usize {
        self.sprayed.len()
    }
}

/// Whether an address can be a NAT's public side: not private (RFC 1918), shared (RFC 6598,
/// carrier-grade NAT inside), loopback, link-local, multicast, broadcast or unspecified.
pub fn is_public(ip: Ipv4Addr) -> bool {
    let shared = ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64;
    !(ip.is_private()
        || shared
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified())
}

/// The candidates an attempt probes: public IPv4 ones, in order, at most [`MAX_TARGETS`].
/// (Extra sockets are IPv4, and IPv6 needs no NAT traversal of this kind.)
pub(crate) fn targets(candidates: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for c in candidates {
        if let IpAddr::V4(ip) = c.ip() {
            if is_public(ip) && !out.contains(c) {
                out.push(*c);
            }
        }
        if out.len() == MAX_TARGETS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn default_attempt_hits_about_98_percent() {
        let p = BirthdayConfig::default().hit_probability();
        assert!((0.97..0.99).contains(&p), "{p}");
    }

    #[test]
    fn private_candidates_are_no_targets() {
        let c: Vec<SocketAddr> = [
            "192.168.1.2:51820",
            "10.1.2.3:1",
            "172.16.0.1:1",
            "100.64.3.4:1",
            "127.0.0.1:1",
            "169.254.1.1:1",
            "[2001:db8::1]:1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert!(targets(&c).is_empty());
        let public: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut with = c.clone();
        with.insert(3, public);
        with.push(public);
        assert_eq!(targets(&with), vec![public]);
    }

    #[test]
    fn sprays_are_paced_distinct_and_bounded() {
        let config = BirthdayConfig {
            sockets: 4,
            probes: 600,
            probes_per_tick: 256,
        };
        let now = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut a = Attempt::new(
            PublicKey([1; 32]),
            Vec::new(),
            Ipv4Addr::new(198, 51, 100, 1),
            now,
        );
        assert!(a.next_sprays(&config, &mut rng, now).is_empty(), "delayed");
        let t = now + SPRAY_DELAY;
        let sizes: Vec<usize> = (0..4)
            .map(|_| a.next_sprays(&config, &mut rng, t).len())
            .collect();
        assert_eq!(sizes, vec![256, 256, 88, 0]);
        assert_eq!(a.sprayed(), 600);
        assert!(a.sprayed.iter().all(|p| *p >= LOWEST_PORT));
    }

    #[test]
    fn socket_ids_skip_main_and_open_ones() {
        let mut s = Sockets::default();
        let k = PublicKey([1; 32]);
        let a = s.open(Owner::Attempt(k)).unwrap();
        assert_eq!(a, SocketId(1));
        s.last = u16::MAX - 1;
        assert_eq!(s.open(Owner::Attempt(k)), Some(SocketId(u16::MAX)));
        // Wraps past MAIN (0) and past the open id 1.
        assert_eq!(s.open(Owner::Attempt(k)), Some(SocketId(2)));
        assert!(s.close(a));
        assert!(!s.close(a));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn schedule_waits_for_rounds_then_backs_off_and_resets() {
        let now = Instant::now();
        let mut s = Schedule::default();
        assert!(!s.due(now));
        s.round_failed();
        assert!(!s.due(now));
        s.round_failed();
        assert!(s.due(now));
        let mut t = now;
        let mut waits = Vec::new();
        for _ in 0..7 {
            s.started(t);
            assert!(!s.due(t));
            let next = s.not_before.unwrap();
            waits.push(next.duration_since(t).as_secs());
            t = next;
        }
        assert_eq!(waits, vec![30, 60, 120, 240, 480, 600, 600]);
        let started = s.last_started.unwrap();
        assert!(!s.may_join(started + MIN_JOIN_SPACING - Duration::from_millis(1)));
        assert!(s.may_join(started + MIN_JOIN_SPACING));
        s.reset();
        assert!(!s.due(t), "regular rounds first");
        s.round_failed();
        s.round_failed();
        assert!(s.due(t));
    }
}
