//! How traffic reaches a peer: a direct endpoint with its liveness, or the relay while candidate
//! probe rounds look for a direct path.
//!
//! A direct path is confirmed only by an authenticated message from the peer's address. While
//! we send on it and hear nothing back, it is probed after [`PATH_PROBE_INTERVAL`] (through the
//! relay too) and given up after [`PATH_TIMEOUT`] once the peer is heard some other way, so the
//! path, not the peer, is what failed; a peer silent everywhere (stalled at full CPU, or gone)
//! keeps its path until [`SILENT_PEER_TIMEOUT`]: the relay could not reach it either, and a
//! node that wakes late from a stall must not drop every path before it reads what waited in
//! its socket. Then traffic falls back to the relay. Without one, every candidate gets an
//! authenticated probe each round, the rounds backing off from [`CANDIDATE_PROBE_INTERVAL`] to
//! [`MAX_CANDIDATE_PROBE_INTERVAL`] (or [`ACTIVE_CANDIDATE_PROBE_INTERVAL`] while traffic flows).
//!
//! A round toward a peer behind a NAT is coordinated ([`coordinated`]): a plain Linux gateway
//! that accepts unsolicited input takes the first probe that reaches it before its own host has
//! sent anything to the prober, and conntrack then moves the host's flow to that prober onto
//! another port: a probe that arrives too early spoils the pair. So the node first primes its
//! own NAT (probes with [`crate::outbox::PRIMER_TTL`], which die past its gateway) and asks the
//! peer through the tunnel to probe now (`Punch`); the peer probes the node's candidates, which
//! find the node's gateway expecting them, and acknowledges (`PunchAck`); then the node probes
//! the peer's candidates, through the holes the peer's probes opened.
//!
//! While both a direct path and the relay work, [`PathState::choice`] says which one carries
//! the traffic (the direct one unless its measured quality made the relay better, see
//! [`super::choice`]). The direct path stays confirmed, and its liveness tracked, while the
//! relay carries the traffic; a relay that goes down sends everything direct again.

use super::choice::Choice;
use super::quality::Leg;
use crate::node::Destination;
use crate::outbox::{Endpoint, Outbox};
use crate::peer::PeerConfig;
use crate::sockets::SocketId;
use mesh_proto::control::{NatKind, MAX_ENDPOINTS};
use std::time::{Duration, Instant};

/// A direct path that stays silent this long while we send on it (and its liveness probes go
/// unanswered) is dead: traffic falls back to the relay. Short enough that a TCP stream's
/// retransmission after its second timeout (about 1.4 s after the loss) already takes the relay.
pub const PATH_TIMEOUT: Duration = Duration::from_secs(1);
/// A direct path silent this long while the peer is not heard by any other way either is given
/// up all the same (the relay may reach a peer whose direct path died and whose answers
/// through the relay were lost).
pub const SILENT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// On a direct path we send on and hear nothing back from, a liveness probe goes out once it
/// has been quiet this long, and again this often. Idle peers get none: only traffic that
/// expects an answer starts them (WireGuard's own rule for "no reply since we sent").
pub const PATH_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// While on the relay, every candidate gets an authenticated probe this often at first (hole
/// punching); the interval doubles after each unanswered round up to
/// [`MAX_CANDIDATE_PROBE_INTERVAL`], and starts over when candidates change.
pub const CANDIDATE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait between probe rounds for a peer that no direct path reaches.
pub const MAX_CANDIDATE_PROBE_INTERVAL: Duration = Duration::from_secs(32);
/// Longest wait between probe rounds while traffic to the peer flows over the relay, so that a
/// direct path that comes back is used again within seconds.
pub const ACTIVE_CANDIDATE_PROBE_INTERVAL: Duration = Duration::from_secs(4);
/// Data sent to a peer within this long counts as traffic flowing.
pub const ACTIVE_TRAFFIC: Duration = Duration::from_secs(10);
/// Ports above the peer's observed one probed while on the relay (port prediction).
pub const PREDICTED_PORTS: u16 = 4;
/// A peer's acknowledgement of our punch counts this long after we sent the punch.
pub const PUNCH_ACK_WINDOW: Duration = Duration::from_secs(5);
/// The node answers a peer's punches at most this often (each answer probes every candidate).
pub const PUNCH_ANSWER_SPACING: Duration = Duration::from_millis(500);

/// How long a direct path may owe an answer since `since` before it is given up, the peer
/// last heard (by any path) at `heard`.
pub(crate) fn timeout(since: Instant, heard: Option<Instant>) -> Duration {
    if heard_after(heard, since) {
        PATH_TIMEOUT
    } else {
        SILENT_PEER_TIMEOUT
    }
}

/// Whether the peer, last heard (by any path) at `heard`, was heard after `since`.
pub(crate) fn heard_after(heard: Option<Instant>, since: Instant) -> bool {
    heard.is_some_and(|h| h > since)
}

/// Whether direct probes to the peer's candidates wait for its word (see the module docs): yes
/// unless it reported that it is not behind a NAT (then no gateway of its own can take a probe).
pub(crate) fn coordinated(peer: &PeerConfig) -> bool {
    peer.nat != Some(NatKind::Public)
}

/// A confirmed direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Direct {
    /// Our socket and the peer's address on it.
    pub(crate) endpoint: Endpoint,
    /// Last authenticated message from this endpoint.
    pub(crate) last_rx: Instant,
    /// The first message sent on it since the peer was last heard directly: the path has owed
    /// an answer since then (liveness probes and the fallback count from here, so an idle path
    /// is not judged by how long it was idle).
    pub(crate) unanswered_since: Option<Instant>,
    /// Last liveness probe.
    pub(crate) last_probe: Option<Instant>,
}

/// The candidate probe rounds that run while the peer has no direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rounds {
    /// When the last round went out; `None`: the next one is due at once.
    pub(crate) last: Option<Instant>,
    /// Current wait between rounds.
    pub(crate) interval: Duration,
    /// The punch of the last coordinated round (its id, when it went) until acknowledged.
    pub(crate) punch: Option<(u16, Instant)>,
    /// Id of the next punch.
    pub(crate) next_punch: u16,
    /// When the node last answered a punch of the peer's.
    pub(crate) answered: Option<Instant>,
}

impl Rounds {
    /// A punch goes out now: its id.
    pub(crate) fn punch(&mut self, now: Instant) -> u16 {
        let id = self.next_punch;
        self.next_punch = id.wrapping_add(1);
        self.punch = Some((id, now));
        id
    }

    /// The peer acknowledged punch `id`: whether it is ours, in flight and recent (then it is
    /// done).
    pub(crate) fn acknowledged(&mut self, id: u16, now: Instant) -> bool {
        let ours = self
            .punch
            .is_some_and(|(p, t)| p == id && now.saturating_duration_since(t) < PUNCH_ACK_WINDOW);
        if ours {
            self.punch = None;
        }
        ours
    }

    /// Whether the node may answer a punch now (at most one per [`PUNCH_ANSWER_SPACING`]); if
    /// so, records it.
    pub(crate) fn may_answer(&mut self, now: Instant) -> bool {
        let ok = self
            .answered
            .is_none_or(|t| now.saturating_duration_since(t) >= PUNCH_ANSWER_SPACING);
        if ok {
            self.answered = Some(now);
        }
        ok
    }

    /// New candidates, or the direct path died: the next round goes now, then every
    /// [`CANDIDATE_PROBE_INTERVAL`].
    pub(crate) fn restart(&mut self) {
        self.last = None;
        self.interval = CANDIDATE_PROBE_INTERVAL;
    }
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            last: None,
            interval: CANDIDATE_PROBE_INTERVAL,
            punch: None,
            next_punch: 0,
            answered: None,
        }
    }
}

/// What [`PathState::poll`] decided for a direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirectDue {
    /// Nothing owed, or not yet.
    Nothing,
    /// Send a liveness probe on the path.
    Probe,
    /// The path is dead: it was dropped; traffic goes to the relay.
    Dead {
        /// How long it went unanswered.
        quiet: Duration,
    },
}

/// How traffic reaches the peer, and when it last went straight to it and back.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathState {
    /// The confirmed direct path, if any.
    pub(crate) direct: Option<Direct>,
    /// Candidate probe rounds (they run while `direct` is `None` and a relay is up).
    pub(crate) rounds: Rounds,
    /// Last authenticated message straight from the peer (any endpoint).
    pub(crate) last_direct_rx: Option<Instant>,
    /// Last message we sent straight to the peer (any endpoint).
    pub(crate) last_direct_tx: Option<Instant>,
    /// Last message of any kind sent to the peer, by any path (for persistent keepalive).
    pub(crate) last_tx: Option<Instant>,
    /// Which path carries the traffic while both work.
    pub(crate) choice: Choice,
}

impl PathState {
    /// The direct endpoint in use.
    pub(crate) fn endpoint(&self) -> Option<Endpoint> {
        self.direct.map(|d| d.endpoint)
    }

    /// Drops the direct path (the next handshake tries every candidate); returns it.
    pub(crate) fn forget(&mut self) -> Option<Endpoint> {
        self.direct.take().map(|d| d.endpoint)
    }

    /// The direct endpoint traffic goes to now: the confirmed one, unless the relay (up)
    /// carries the traffic for quality.
    pub(crate) fn sending_direct(&self, relay_up: bool) -> Option<Endpoint> {
        self.endpoint()
            .filter(|_| !relay_up || !self.choice.prefers_relay())
    }

    /// Sends one WireGuard message to `peer` by the best path there is:
    /// - the direct endpoint traffic goes to ([`PathState::sending_direct`]);
    /// - else the relay (if there is one), and, while no direct path is confirmed, handshake
    ///   initiations also to every candidate directly, so a direct path can be found while
    ///   traffic already flows (as primers where the rounds are [`coordinated`]: they open our
    ///   NAT, and reach a peer on our own LAN);
    /// - else every candidate (the first that answers becomes the endpoint).
    ///
    /// `tracked`: the direct path owes an answer to it (not so for keepalives and path MTU
    /// probes, which are meant to be lost when too large). Returns the leg it went on, if one.
    pub(crate) fn send(
        &mut self,
        peer: &PeerConfig,
        bytes: &[u8],
        tracked: bool,
        now: Instant,
        out: &mut Outbox,
    ) -> Option<Leg> {
        if let Some(e) = self.sending_direct(out.relay_up) {
            self.sent(Some(Leg::Direct), tracked, now);
            out.udp(e.socket, e.addr, bytes);
            return Some(Leg::Direct);
        }
        self.sent(None, tracked, now);
        let initiation = bytes.first() == Some(&1);
        if out.relay_up {
            out.relay(peer.key, bytes);
            if !initiation || self.direct.is_some() {
                return Some(Leg::Relay);
            }
            if coordinated(peer) {
                for dst in peer.endpoints.iter().take(MAX_ENDPOINTS) {
                    out.primer(SocketId::MAIN, *dst, bytes, now);
                }
                return Some(Leg::Relay);
            }
        }
        for dst in peer.endpoints.iter().take(MAX_ENDPOINTS) {
            out.probe(SocketId::MAIN, *dst, bytes, now);
        }
        out.relay_up.then_some(Leg::Relay)
    }

    /// A message went to the peer now, on `leg` if one (`tracked`: one the direct path owes
    /// an answer to, when it went there).
    pub(crate) fn sent(&mut self, leg: Option<Leg>, tracked: bool, now: Instant) {
        let direct = leg == Some(Leg::Direct) && tracked;
        if let Some(d) = self.direct.as_mut().filter(|_| direct) {
            self.last_direct_tx = Some(now);
            d.unanswered_since.get_or_insert(now);
        }
        self.last_tx = Some(now);
    }

    /// Where a data message to the peer goes when there is exactly one place: the direct
    /// endpoint traffic goes to, else the relay (`None` with neither: it goes to every
    /// candidate).
    pub(crate) fn destination(&self, peer: &PeerConfig, relay_up: bool) -> Option<Destination> {
        match self.sending_direct(relay_up) {
            Some(e) => Some(Destination::Udp {
                socket: e.socket,
                dst: e.addr,
            }),
            None if relay_up => Some(Destination::Relay { to: peer.key }),
            None => None,
        }
    }

    /// Whether the current endpoint (another than `from`) was heard within
    /// [`PATH_PROBE_INTERVAL`]: a live path keeps the peer.
    pub(crate) fn other_alive(&self, from: Endpoint, now: Instant) -> bool {
        let lately = now.checked_sub(PATH_PROBE_INTERVAL);
        self.direct
            .is_some_and(|d| d.endpoint != from && lately.is_none_or(|l| d.last_rx > l))
    }

    /// The case of nearly every data packet: `from` is the direct path and the peer was heard
    /// directly within PATH_PROBE_INTERVAL. Records it and returns true (there is nothing to
    /// decide); otherwise changes nothing and returns false.
    pub(crate) fn heard_again(&mut self, from: Endpoint, now: Instant) -> bool {
        let Some(d) = self.direct.as_mut() else {
            return false;
        };
        let Some(last) = self.last_direct_rx else {
            return false;
        };
        if d.endpoint != from
            || now
                .checked_sub(PATH_PROBE_INTERVAL)
                .is_some_and(|l| last <= l)
        {
            return false;
        }
        d.unanswered_since = None;
        d.last_rx = now;
        self.last_direct_rx = Some(now);
        true
    }

    /// An authenticated message came straight from `from`; returns when the peer was last heard
    /// directly before it.
    pub(crate) fn heard_direct(&mut self, from: Endpoint, now: Instant) -> Option<Instant> {
        let before = self.last_direct_rx.replace(now);
        if let Some(d) = self.direct.as_mut() {
            d.unanswered_since = None;
            if d.endpoint == from {
                d.last_rx = now;
            }
        }
        before
    }

    /// Makes `to` the direct path.
    pub(crate) fn switch(&mut self, to: Endpoint, now: Instant) {
        match self.direct.as_mut() {
            Some(d) => {
                d.endpoint = to;
                d.last_rx = now;
            }
            None => {
                self.direct = Some(Direct {
                    endpoint: to,
                    last_rx: now,
                    unanswered_since: None,
                    last_probe: None,
                })
            }
        }
    }

    /// The liveness rule of a direct path at `now` (`relay_up`: there is somewhere to fall back
    /// to; `heard`: when the peer was last heard by any path).
    pub(crate) fn poll_direct(
        &mut self,
        relay_up: bool,
        heard: Option<Instant>,
        now: Instant,
    ) -> DirectDue {
        let Some(d) = self.direct.as_mut() else {
            return DirectDue::Nothing;
        };
        // Nothing sent since the peer was last heard: nothing is owed, nothing to probe.
        let Some(since) = d.unanswered_since else {
            return DirectDue::Nothing;
        };
        let quiet = now.saturating_duration_since(since);
        if relay_up && quiet >= timeout(since, heard) {
            self.direct = None;
            self.rounds.restart();
            DirectDue::Dead { quiet }
        } else if quiet >= PATH_PROBE_INTERVAL
            && d.last_probe
                .is_none_or(|t| now.saturating_duration_since(t) >= PATH_PROBE_INTERVAL)
        {
            d.last_probe = Some(now);
            DirectDue::Probe
        } else {
            DirectDue::Nothing
        }
    }

    /// Whether a candidate round is due at `now` (no direct path, a relay up); if so, records
    /// it and returns whether the previous round went unanswered (the interval then doubled).
    /// `flowing`: traffic to the peer flows, so rounds stay short.
    pub(crate) fn poll_round(
        &mut self,
        relay_up: bool,
        flowing: bool,
        now: Instant,
    ) -> Option<bool> {
        if self.direct.is_some() || !relay_up {
            return None;
        }
        let longest = longest_wait(flowing);
        let due = self
            .rounds
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.rounds.interval.min(longest));
        if !due {
            return None;
        }
        let failed = self.rounds.last.is_some();
        if failed {
            // The last round went unanswered (we are still on the relay): back off.
            self.rounds.interval = (self.rounds.interval * 2).min(longest);
        }
        self.rounds.last = Some(now);
        Some(failed)
    }
}

/// The longest wait between candidate probe rounds: short while traffic flows (a direct path
/// that comes back is used soon), long for an idle peer.
pub(crate) fn longest_wait(flowing: bool) -> Duration {
    if flowing {
        ACTIVE_CANDIDATE_PROBE_INTERVAL
    } else {
        MAX_CANDIDATE_PROBE_INTERVAL
    }
}
