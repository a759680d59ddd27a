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

use crate::sockets::{Owner, SocketId, Sockets};
use mesh_proto::control::NatKind;
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::collections::VecDeque;
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
/// How often a batch of spray probes goes ([`BirthdayConfig::probes_per_tick`] each).
pub const SPRAY_PACE: Duration = Duration::from_millis(250);
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

/// Attempts a node runs within [`ATTEMPT_BUDGET_WINDOW`] by default, over all peers, whether
/// it started them or joined a peer's ([`BirthdayConfig::attempts`]; the controller may set
/// another for the whole network).
pub const ATTEMPT_BUDGET: u16 = 8;
/// The most attempts per window any setting allows.
pub const MAX_ATTEMPTS: u16 = mesh_proto::control::MAX_BIRTHDAY_BUDGET;
/// The window of [`ATTEMPT_BUDGET`].
pub const ATTEMPT_BUDGET_WINDOW: Duration = Duration::from_secs(600);

/// Which parts of an attempt a node runs toward one peer, from the two NAT kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Open the extra sockets (the endpoint-dependent side: each gets a mapping of its own).
    pub sockets: bool,
    /// Spray random ports of the peer's IP from the main socket (the other side: each probe
    /// opens its own NAT's filter for that port).
    pub spray: bool,
}

impl Roles {
    /// What to do toward a peer, or `None` when birthday punching cannot help or is not for
    /// this pair: neither side maps per destination (plain candidate probes connect such a
    /// pair, or nothing does), or both do (two random ports do not meet). A side whose kind is
    /// unknown while the other's is known (its UDP reaches the controller's QUIC port but not
    /// the observer: a firewall that lets little through) is not punched at all. With both
    /// kinds unknown (an older controller), both roles run on both sides, as before the kinds
    /// were known.
    pub fn for_pair(own: Option<NatKind>, peer: Option<NatKind>) -> Option<Roles> {
        use NatKind::EndpointDependent as Dep;
        match (own, peer) {
            (Some(Dep), Some(Dep)) => None,
            (Some(Dep), Some(_)) => Some(Roles {
                sockets: true,
                spray: false,
            }),
            (Some(_), Some(Dep)) => Some(Roles {
                sockets: false,
                spray: true,
            }),
            (None, None) => Some(Roles {
                sockets: true,
                spray: true,
            }),
            _ => None,
        }
    }
}

/// What an attempt toward one peer is to do: probe these targets, in these roles; started on
/// our own schedule (`initiator`: the peer is told to join) or on the peer's request.
#[derive(Debug, Clone)]
pub(crate) struct Start {
    pub(crate) targets: Vec<SocketAddr>,
    pub(crate) roles: Roles,
    pub(crate) initiator: bool,
}

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
    /// Attempts within [`ATTEMPT_BUDGET_WINDOW`], started or joined (capped at
    /// [`MAX_ATTEMPTS`]; 0: none, the node only probes candidates).
    pub attempts: u16,
}

impl Default for BirthdayConfig {
    fn default() -> Self {
        BirthdayConfig {
            sockets: DEFAULT_SOCKETS,
            probes: DEFAULT_PROBES,
            probes_per_tick: DEFAULT_PROBES_PER_TICK,
            attempts: ATTEMPT_BUDGET,
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
            attempts: self.attempts.min(MAX_ATTEMPTS),
        }
    }

    /// Probability that one attempt finds a symmetric NAT's mapping, for a NAT that hands out
    /// ports at random from 1024..=65535.
    pub fn hit_probability(&self) -> f64 {
        let range = f64::from(u16::MAX - LOWEST_PORT + 1);
        1.0 - (1.0 - f64::from(self.sockets) / range).powi(i32::from(self.probes))
    }
}

crate::counters! {
    /// What birthday attempts have cost and won so far. Shown with the other counters in
    /// `mesh status --json` and Prometheus.
    pub struct BirthdayStats {
        /// Birthday attempts this node started on its own schedule.
        birthday_attempts: Counter("birthday_attempts"),
        /// Birthday attempts this node started because the peer asked it to join.
        birthday_joined: Counter("birthday_joined"),
        /// Birthday attempts (of either kind) that ended with a direct path to the peer.
        birthday_succeeded: Counter("birthday_succeeded"),
        /// Extra sockets opened for birthday attempts.
        birthday_sockets_opened: Counter("birthday_sockets_opened"),
        /// Birthday probes sent (from extra sockets and sprayed from the main socket).
        birthday_probes_sent: Counter("birthday_probes_sent"),
        /// Birthday joins answered by spraying only, because an attempt toward another peer
        /// was in flight.
        birthday_side_sprays: Counter("birthday_side_sprays"),
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

    /// When an attempt of our own becomes due (after enough failed rounds), if it will.
    pub(crate) fn due_at(&self, now: Instant) -> Option<Instant> {
        (self.failed_rounds >= AFTER_FAILED_ROUNDS)
            .then(|| self.not_before.map_or(now, |t| t.max(now)))
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
    /// Whether this node sprays in this attempt (see [`Roles`]).
    spray: bool,
    /// When the next spray probes go (spraying starts [`SPRAY_DELAY`] after the sockets open,
    /// then [`BirthdayConfig::probes_per_tick`] every [`SPRAY_PACE`]).
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
            spray: true,
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
        if !self.spray || now < self.spray_from {
            return Vec::new();
        }
        self.spray_from = now + SPRAY_PACE;
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

    /// When this attempt next has something to do: spray, or end.
    fn deadline(&self, config: &BirthdayConfig) -> Instant {
        if self.spray && self.sprayed.len() < usize::from(config.probes) {
            self.spray_from.min(self.ends)
        } else {
            self.ends
        }
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

/// What punching asks the node to do, in order. The node carries out each at once with the
/// peer's session: probes are keepalives of the session the pair already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Tell the peer, inside the tunnel, to join the attempt starting now.
    Join,
    /// Ask the driver for a new extra socket under this id.
    Open(SocketId),
    /// The node is done with this extra socket.
    Close(SocketId),
    /// Send an authenticated keepalive to `dst` from `socket`; if the probe budget lets it
    /// go, count it ([`Punching::probe_sent`]).
    Probe {
        /// From this socket.
        socket: SocketId,
        /// To this address.
        dst: SocketAddr,
    },
}

/// A peer's share of punching: when it gets its next attempt, and the socket that won its
/// direct path, if one did.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerPunch {
    pub(crate) schedule: Schedule,
    /// The extra socket that won a birthday attempt for this peer, and since when the direct
    /// path no longer uses it (it closes [`KEPT_SOCKET_GRACE`] later).
    kept: Option<(SocketId, Option<Instant>)>,
}

impl PeerPunch {
    /// When [`Punching::retire_kept`] next has something to do for this peer.
    pub(crate) fn kept_deadline(
        &self,
        path_socket: Option<SocketId>,
        now: Instant,
    ) -> Option<Instant> {
        let (id, idle_since) = self.kept?;
        if path_socket == Some(id) {
            return None;
        }
        Some(idle_since.map_or(now, |t| t + KEPT_SOCKET_GRACE))
    }

    /// The socket the peer kept from a won attempt.
    pub(crate) fn kept_socket(&self) -> Option<SocketId> {
        self.kept.map(|(id, _)| id)
    }
}

/// How a peer stands, as punching needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerState {
    /// Gone from the peer list.
    Gone,
    /// It has a direct path.
    Direct,
    /// Still without one.
    Waiting,
}

/// The node's birthday hole punching: settings, the attempt in flight and the extra sockets.
pub(crate) struct Punching {
    /// `None`: disabled.
    config: Option<BirthdayConfig>,
    /// Spray ports; seeded, so a simulated run is the same for a given seed.
    rng: SmallRng,
    pub(crate) sockets: Sockets,
    attempt: Option<Attempt>,
    /// Spray-only answers to joins that came while `attempt` was busy with another peer: the
    /// endpoint-independent side of a pair needs nothing but its spray, so a node whose
    /// sockets are taken can still do its part for everyone else.
    side_sprays: Vec<Attempt>,
    /// When the attempts within [`ATTEMPT_BUDGET_WINDOW`] started (ours and those joined).
    recent: VecDeque<Instant>,
    pub(crate) stats: BirthdayStats,
}

impl Punching {
    /// On with the default sizes; `seed` drives the spray ports.
    pub(crate) fn new(seed: u64) -> Punching {
        Punching {
            config: Some(BirthdayConfig::default()),
            rng: SmallRng::seed_from_u64(seed),
            sockets: Sockets::default(),
            attempt: None,
            side_sprays: Vec::new(),
            recent: VecDeque::new(),
            stats: BirthdayStats::default(),
        }
    }

    /// New sizes, or off with `None`; an attempt in flight stops.
    pub(crate) fn configure(
        &mut self,
        config: Option<BirthdayConfig>,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        self.config = config.map(BirthdayConfig::bounded);
        self.finish(false, out);
    }

    /// Puts an attempt in flight (tests).
    #[cfg(test)]
    pub(crate) fn set_attempt(&mut self, attempt: Attempt) {
        self.attempt = Some(attempt);
    }

    /// Whether punching is on.
    pub(crate) fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// When [`Punching::advance`] next has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let config = self.config?;
        self.attempt
            .iter()
            .chain(self.side_sprays.iter())
            .map(|a| a.deadline(&config))
            .min()
    }

    /// Whether the node-wide budget allows another attempt at `now`.
    pub(crate) fn within_budget(&self, now: Instant) -> bool {
        self.budget_at(now) <= now
    }

    /// When the budget allows the next attempt: `now` if it does, else when the oldest start
    /// inside the window leaves it (starts are kept in time order). With a budget of 0, a
    /// window from now (and again then: never).
    pub(crate) fn budget_at(&self, now: Instant) -> Instant {
        let budget = self.config.map_or(0, |c| usize::from(c.attempts));
        let in_window = || {
            self.recent
                .iter()
                .filter(move |t| now.saturating_duration_since(**t) < ATTEMPT_BUDGET_WINDOW)
        };
        if in_window().count() < budget {
            return now;
        }
        in_window()
            .next()
            .map_or(now + ATTEMPT_BUDGET_WINDOW, |t| *t + ATTEMPT_BUDGET_WINDOW)
    }

    /// Whether an attempt is in flight.
    pub(crate) fn busy(&self) -> bool {
        self.attempt.is_some()
    }

    /// The peer of the attempt in flight.
    pub(crate) fn attempt_peer(&self) -> Option<PublicKey> {
        self.attempt.as_ref().map(|a| a.peer)
    }

    /// A probe of an intent went out.
    pub(crate) fn probe_sent(&mut self) {
        self.stats.birthday_probes_sent += 1;
    }

    /// Ends the attempt in flight: closes every socket of it that no peer kept.
    pub(crate) fn finish(&mut self, success: bool, out: &mut Vec<(PublicKey, Intent)>) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        if success {
            self.stats.birthday_succeeded += 1;
        }
        tracing::debug!(peer = %attempt.peer, success, sprayed = attempt.sprayed(), "birthday attempt over");
        for id in attempt.sockets {
            if matches!(self.sockets.owner(id), Some(Owner::Attempt(_))) {
                self.sockets.close(id);
                out.push((attempt.peer, Intent::Close(id)));
            }
        }
    }

    /// Closes one extra socket.
    pub(crate) fn close(
        &mut self,
        key: PublicKey,
        id: SocketId,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        if self.sockets.close(id) {
            out.push((key, Intent::Close(id)));
        }
    }

    /// A peer left: its kept socket closes, and so does an attempt toward it.
    pub(crate) fn peer_removed(
        &mut self,
        key: PublicKey,
        punch: &PeerPunch,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        if let Some(id) = punch.kept_socket() {
            self.close(key, id, out);
        }
        if self.attempt_peer() == Some(key) {
            self.finish(false, out);
        }
    }

    /// Starts an attempt toward `key` now, both roles: opens the extra sockets and sends one
    /// probe from each to the peer's public candidates; the spray from the main socket follows
    /// in [`Punching::advance`]. `initiator`: started on our own schedule (the peer is told to
    /// join), not on the peer's request. Returns whether it started (not when disabled, busy,
    /// or the peer has no public IPv4 candidate).
    pub(crate) fn start(
        &mut self,
        key: PublicKey,
        punch: &mut PeerPunch,
        how: Start,
        now: Instant,
        out: &mut Vec<(PublicKey, Intent)>,
    ) -> bool {
        let Start {
            targets,
            roles,
            initiator,
        } = how;
        let Some(config) = self.config else {
            return false;
        };
        if self.attempt.is_some() || !self.within_budget(now) {
            return false;
        }
        let Some(spray_ip) = spray_ip(&targets) else {
            return false;
        };
        punch.schedule.started(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= ATTEMPT_BUDGET_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if initiator {
            self.stats.birthday_attempts += 1;
            out.push((key, Intent::Join));
        } else {
            self.stats.birthday_joined += 1;
        }
        let n_sockets = if roles.sockets { config.sockets } else { 0 };
        tracing::debug!(peer = %key, initiator, sockets = n_sockets, spray = roles.spray, probes = config.probes, %spray_ip, "birthday attempt");
        let mut sockets = Vec::with_capacity(usize::from(n_sockets));
        for _ in 0..n_sockets {
            let Some(id) = self.sockets.open(Owner::Attempt(key)) else {
                break;
            };
            out.push((key, Intent::Open(id)));
            self.stats.birthday_sockets_opened += 1;
            sockets.push(id);
            for dst in &targets {
                out.push((
                    key,
                    Intent::Probe {
                        socket: id,
                        dst: *dst,
                    },
                ));
            }
        }
        let mut attempt = Attempt::new(key, sockets, spray_ip, now);
        attempt.spray = roles.spray;
        self.attempt = Some(attempt);
        true
    }

    /// The peer asked us to join its attempt: start ours now unless we have a direct path to
    /// it or joined one too recently ([`MIN_JOIN_SPACING`]). With an attempt toward another
    /// peer in flight, spray toward this one from the main socket only: if we are the
    /// endpoint-independent side, that is all the peer's attempt needs from us, and the peer
    /// cannot know when we will be free.
    pub(crate) fn join(
        &mut self,
        key: PublicKey,
        punch: &mut PeerPunch,
        targets: Vec<SocketAddr>,
        roles: Roles,
        now: Instant,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        if self.config.is_none() {
            return;
        }
        if self.attempt.is_none() && punch.schedule.may_join(now) {
            let how = Start {
                targets,
                roles,
                initiator: false,
            };
            self.start(key, punch, how, now, out);
            return;
        }
        if !roles.spray {
            return;
        }
        if self.attempt_peer() == Some(key)
            || self.side_sprays.iter().any(|s| s.peer == key)
            || self.side_sprays.len() >= MAX_SIDE_SPRAYS
        {
            return;
        }
        let Some(spray_ip) = spray_ip(&targets) else {
            return;
        };
        if punch.schedule.take_side_spray(now) {
            self.stats.birthday_side_sprays += 1;
            tracing::debug!(peer = %key, %spray_ip, "birthday join while busy: spraying only");
            self.side_sprays
                .push(Attempt::new(key, Vec::new(), spray_ip, now));
        }
    }

    /// A socket of the attempt in flight won `key`'s direct path: it stays with the peer (its
    /// mapping is the hole), and a socket the peer kept before closes.
    pub(crate) fn won(
        &mut self,
        key: PublicKey,
        socket: SocketId,
        punch: &mut PeerPunch,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        self.sockets.set_owner(socket, Owner::Peer(key));
        if let Some((old, _)) = punch.kept.replace((socket, None)) {
            if old != socket {
                self.close(key, old, out);
            }
        }
    }

    /// Closes the socket a peer kept from a won attempt once its direct path (now on
    /// `path_socket`) has not used it for [`KEPT_SOCKET_GRACE`] (the path died, or moved to the
    /// main socket).
    pub(crate) fn retire_kept(
        &mut self,
        key: PublicKey,
        punch: &mut PeerPunch,
        path_socket: Option<SocketId>,
        now: Instant,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        let Some((id, idle_since)) = punch.kept.as_mut() else {
            return;
        };
        if path_socket == Some(*id) {
            *idle_since = None;
            return;
        }
        let since = *idle_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= KEPT_SOCKET_GRACE {
            let id = *id;
            tracing::debug!(peer = %key, socket = %id, "closing the socket of a dead direct path");
            punch.kept = None;
            self.close(key, id, out);
        }
    }

    /// Moves the attempt in flight and the spray-only answers on: sprays what is due, or ends
    /// them once their peer has a direct path (success), is gone, or they timed out.
    pub(crate) fn advance(
        &mut self,
        state: impl Fn(&PublicKey) -> PeerState,
        now: Instant,
        out: &mut Vec<(PublicKey, Intent)>,
    ) {
        if let (Some(attempt), Some(config)) = (self.attempt.as_mut(), self.config) {
            let outcome = match state(&attempt.peer) {
                PeerState::Gone => Some(false),
                PeerState::Direct => Some(true),
                PeerState::Waiting if now >= attempt.ends => Some(false),
                PeerState::Waiting => {
                    spray_due(attempt, &config, &mut self.rng, now, out);
                    None
                }
            };
            if let Some(success) = outcome {
                self.finish(success, out);
            }
        }
        let Some(config) = self.config else {
            self.side_sprays.clear();
            return;
        };
        let rng = &mut self.rng;
        self.side_sprays.retain_mut(|spray| {
            if state(&spray.peer) != PeerState::Waiting || now >= spray.ends {
                return false;
            }
            spray_due(spray, &config, rng, now, out);
            true
        });
    }
}

/// The spray probes of `attempt` due now: keepalives from the main socket to fresh random
/// ports of the peer's public IP.
fn spray_due(
    attempt: &mut Attempt,
    config: &BirthdayConfig,
    rng: &mut SmallRng,
    now: Instant,
    out: &mut Vec<(PublicKey, Intent)>,
) {
    for dst in attempt.next_sprays(config, rng, now) {
        out.push((
            attempt.peer,
            Intent::Probe {
                socket: SocketId::MAIN,
                dst,
            },
        ));
    }
}

/// Whether a peer with these candidates can be punched at all (it has a public IPv4 target).
/// (The answer [`spray_targets`] gives, without allocating: the timers ask it often.)
pub(crate) fn punchable(candidates: &[SocketAddr], observed: Option<SocketAddr>) -> bool {
    let mut seen: [Option<SocketAddr>; MAX_TARGETS] = [None; MAX_TARGETS];
    let mut n = 0;
    for c in candidates {
        if n == MAX_TARGETS {
            break;
        }
        let IpAddr::V4(ip) = c.ip() else {
            continue;
        };
        if !is_public(ip) || seen[..n].contains(&Some(*c)) {
            continue;
        }
        seen[n] = Some(*c);
        n += 1;
        if observed.is_none_or(|o| o.ip() == c.ip()) {
            return true;
        }
    }
    false
}

/// The IPv4 address an attempt sprays: that of its first target.
fn spray_ip(targets: &[SocketAddr]) -> Option<Ipv4Addr> {
    targets.first().and_then(|t| match t.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    })
}

/// The candidates a birthday attempt toward a peer probes: its public ones, and only at the IP
/// the controller observed when it says which (a reported address elsewhere is nobody's NAT
/// that we know of, and spraying it would aim a thousand datagrams at a stranger).
pub(crate) fn spray_targets(
    candidates: &[SocketAddr],
    observed: Option<SocketAddr>,
) -> Vec<SocketAddr> {
    let mut targets = targets(candidates);
    if let Some(observed) = observed {
        targets.retain(|t| t.ip() == observed.ip());
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn roles_follow_the_two_nat_kinds() {
        use NatKind::*;
        let both = Some(Roles {
            sockets: true,
            spray: true,
        });
        let sockets = Some(Roles {
            sockets: true,
            spray: false,
        });
        let spray = Some(Roles {
            sockets: false,
            spray: true,
        });
        // Nothing to punch where neither side maps per destination, or both do.
        for (a, b) in [
            (Public, Public),
            (Public, EndpointIndependent),
            (EndpointIndependent, EndpointIndependent),
            (EndpointDependent, EndpointDependent),
        ] {
            assert_eq!(Roles::for_pair(Some(a), Some(b)), None, "{a:?} {b:?}");
            assert_eq!(Roles::for_pair(Some(b), Some(a)), None, "{b:?} {a:?}");
        }
        // The dependent side opens sockets, the other sprays; a public node never opens any.
        assert_eq!(
            Roles::for_pair(Some(EndpointDependent), Some(Public)),
            sockets
        );
        assert_eq!(Roles::for_pair(Some(EndpointDependent), None), None);
        assert_eq!(
            Roles::for_pair(Some(Public), Some(EndpointDependent)),
            spray
        );
        assert_eq!(
            Roles::for_pair(Some(EndpointIndependent), Some(EndpointDependent)),
            spray
        );
        assert_eq!(Roles::for_pair(None, Some(EndpointDependent)), None);
        // A side of unknown kind, with the other known, is not punched.
        assert_eq!(Roles::for_pair(Some(Public), None), None);
        assert_eq!(Roles::for_pair(None, Some(EndpointIndependent)), None);
        // Nothing known (an older controller): both roles, as before kinds.
        assert_eq!(Roles::for_pair(None, None), both);
    }

    #[test]
    fn attempts_of_our_own_keep_to_the_node_budget() {
        let mut p = Punching::new(1);
        let mut out = Vec::new();
        let t0 = Instant::now();
        let target: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let roles = Roles {
            sockets: false,
            spray: true,
        };
        let mut started = 0;
        for i in 0..(u32::from(ATTEMPT_BUDGET) + 3) {
            let now = t0 + Duration::from_secs(10) * i;
            p.finish(false, &mut out);
            let mut punch = PeerPunch::default();
            let how = Start {
                targets: vec![target],
                roles,
                initiator: true,
            };
            if p.start(PublicKey([i as u8; 32]), &mut punch, how, now, &mut out) {
                started += 1;
            }
        }
        assert_eq!(started, ATTEMPT_BUDGET);
        let later = t0 + Duration::from_secs(10) * (u32::from(ATTEMPT_BUDGET) + 3);
        assert!(!p.within_budget(later));
        assert_eq!(p.budget_at(later), t0 + ATTEMPT_BUDGET_WINDOW);
        assert!(p.within_budget(t0 + ATTEMPT_BUDGET_WINDOW));
        // Without the socket role, no socket opened. A join the peer asks for counts too: over
        // the budget it is refused, once the window moves on it runs.
        assert_eq!(p.stats.birthday_sockets_opened, 0);
        p.finish(false, &mut out);
        let join = || Start {
            targets: vec![target],
            roles,
            initiator: false,
        };
        let mut punch = PeerPunch::default();
        assert!(!p.start(PublicKey([99; 32]), &mut punch, join(), later, &mut out));
        let mut punch = PeerPunch::default();
        let then = t0 + ATTEMPT_BUDGET_WINDOW;
        assert!(p.start(PublicKey([99; 32]), &mut punch, join(), then, &mut out));

        // A network that sets the budget to 0: no attempt at all, started or joined.
        let mut p = Punching::new(1);
        p.configure(
            Some(BirthdayConfig {
                attempts: 0,
                ..BirthdayConfig::default()
            }),
            &mut out,
        );
        assert!(!p.within_budget(t0));
        for initiator in [true, false] {
            let how = Start {
                targets: vec![target],
                roles,
                initiator,
            };
            let mut punch = PeerPunch::default();
            assert!(!p.start(PublicKey([7; 32]), &mut punch, how, t0, &mut out));
        }
    }

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
        // The allocation-free check agrees with the targets it stands for.
        let other: SocketAddr = "203.0.113.9:1".parse().unwrap();
        for (cands, observed) in [
            (c.clone(), None),
            (with.clone(), None),
            (with.clone(), Some(public)),
            (with.clone(), Some(other)),
            (vec![other, public], Some(public)),
            (vec![other, other, public], Some(public)),
        ] {
            let expected = !spray_targets(&cands, observed).is_empty();
            assert_eq!(
                punchable(&cands, observed),
                expected,
                "{cands:?} {observed:?}"
            );
        }
    }

    #[test]
    fn sprays_are_paced_distinct_and_bounded() {
        let config = BirthdayConfig {
            sockets: 4,
            probes: 600,
            probes_per_tick: 256,
            attempts: ATTEMPT_BUDGET,
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
        let sizes: Vec<usize> = (0..4u32)
            .map(|k| a.next_sprays(&config, &mut rng, t + SPRAY_PACE * k).len())
            .collect();
        assert_eq!(sizes, vec![256, 256, 88, 0]);
        let mut b = Attempt::new(
            PublicKey([2; 32]),
            Vec::new(),
            Ipv4Addr::new(198, 51, 100, 2),
            now,
        );
        assert_eq!(b.next_sprays(&config, &mut rng, t).len(), 256);
        assert!(b.next_sprays(&config, &mut rng, t).is_empty(), "paced");
        assert_eq!(a.sprayed(), 600);
        assert!(a.sprayed.iter().all(|p| *p >= LOWEST_PORT));
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
