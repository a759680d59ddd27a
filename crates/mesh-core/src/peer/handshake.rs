//! When a peer's WireGuard handshakes start, on the node's clock.
//!
//! boringtun runs the handshake itself; this part decides when the node forces one:
//! proactively for a new peer (the lower key at once, the higher key after
//! [`PROACTIVE_FALLBACK`]), again every [`REKEY_TIMEOUT`] (plus a per-peer jitter) while data
//! waits for a session, until [`REKEY_ATTEMPT_TIME`] gives up, and when a session goes stale
//! (data sent and nothing authenticated back for [`STALE_SESSION`]).

use std::time::{Duration, Instant};

/// WireGuard's REKEY_TIMEOUT: retransmit a handshake initiation after this long without answer.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// WireGuard's REKEY_ATTEMPT_TIME: give up retransmitting after this long.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// WireGuard's KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: data sent without any authenticated packet
/// back for this long means the session is stale, so a new handshake starts.
pub const STALE_SESSION: Duration = Duration::from_secs(15);
/// How long the higher key waits for a new peer's proactive handshake before starting one itself
/// (the peer's first initiation may have arrived before this node knew the peer).
pub const PROACTIVE_FALLBACK: Duration = Duration::from_secs(1);

/// Peers a node handshakes with before any traffic: every pair of a network of up to this many
/// nodes and one more. A node that learns a larger network does so with the this-many peers of
/// the lowest overlay addresses (the controller hands out the lowest free address, so those
/// joined first: usually a cluster's control plane); a peer learned later, only while the node
/// has fewer. Every other session starts when a packet first needs it, as Tailscale, Nebula and
/// kernel WireGuard do for all peers. Beyond the bound, a proactive handshake costs each join
/// one handshake and one NAT traversal per existing node, retried for 90 s toward offline ones,
/// and every node about 11 KB of WireGuard state per peer.
pub const PROACTIVE_PEERS: usize = 128;

/// What the node is waiting for, handshake-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Nothing: a session exists, or nobody asked for one.
    Idle,
    /// A new peer (or a relay that just came up) and the higher key: start a handshake at this
    /// time unless the peer's arrived or data started one first.
    Proactive(Instant),
    /// Data waits for a session: retransmit the initiation on our clock.
    Waiting {
        /// When the wait began (gives up after [`REKEY_ATTEMPT_TIME`]).
        started: Instant,
        /// When the last initiation went out.
        last_sent: Instant,
    },
}

/// What one timer pass decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing to do.
    Nothing,
    /// Retransmit: force a new handshake (the per-REKEY_TIMEOUT bound does not apply).
    Retransmit,
    /// Retransmissions ran out: the peer is unreachable.
    GaveUp,
    /// The proactive wait is over: start a handshake if still without one.
    Proactive,
}

/// A peer's handshake schedule.
#[derive(Debug, Clone)]
pub(crate) struct Handshake {
    pub(crate) wait: Wait,
    /// Last handshake we forced (bounds forced handshakes to one per REKEY_TIMEOUT).
    last_forced: Option<Instant>,
    /// First data sent since the last authenticated packet from the peer (stale-session rule).
    awaiting_reply_since: Option<Instant>,
}

impl Handshake {
    /// A new peer; `proactive_at` for the higher key.
    pub(crate) fn new(proactive_at: Option<Instant>) -> Handshake {
        Handshake {
            wait: proactive_at.map_or(Wait::Idle, Wait::Proactive),
            last_forced: None,
            awaiting_reply_since: None,
        }
    }

    /// Whether a forced handshake may go now (one per REKEY_TIMEOUT); if so, records it and
    /// starts (or continues) the wait for a session.
    pub(crate) fn force(&mut self, now: Instant) -> bool {
        if self
            .last_forced
            .is_some_and(|t| now.duration_since(t) < REKEY_TIMEOUT)
        {
            return false;
        }
        self.last_forced = Some(now);
        let started = match self.wait {
            Wait::Waiting { started, .. } => started,
            _ => now,
        };
        self.wait = Wait::Waiting {
            started,
            last_sent: now,
        };
        true
    }

    /// Lets the next [`Handshake::force`] through whenever it comes.
    pub(crate) fn allow_force(&mut self) {
        self.last_forced = None;
    }

    /// The higher key's wait for the peer's handshake (re)starts.
    pub(crate) fn expect_proactive(&mut self, at: Instant) {
        if !matches!(self.wait, Wait::Waiting { .. }) {
            self.wait = Wait::Proactive(at);
        }
    }

    /// Data was queued or sent without a session: wait for one.
    pub(crate) fn data_waits(&mut self, now: Instant) {
        if !matches!(self.wait, Wait::Waiting { .. }) {
            self.wait = Wait::Waiting {
                started: now,
                last_sent: now,
            };
        }
    }

    /// Whether data is waiting for a session.
    pub(crate) fn waiting(&self) -> bool {
        matches!(self.wait, Wait::Waiting { .. })
    }

    /// Data went out: from now on an authenticated answer is expected.
    pub(crate) fn data_sent(&mut self, now: Instant) {
        self.awaiting_reply_since.get_or_insert(now);
    }

    /// Something authenticated came from the peer.
    pub(crate) fn heard(&mut self, established: bool) {
        self.awaiting_reply_since = None;
        if established && self.waiting() {
            self.wait = Wait::Idle;
        }
    }

    /// The retransmission and proactive rules at `now`. `jitter` spreads retransmissions.
    pub(crate) fn poll(&mut self, established: bool, jitter: Duration, now: Instant) -> Due {
        match self.wait {
            Wait::Waiting { .. } if established => {
                self.wait = Wait::Idle;
                Due::Nothing
            }
            Wait::Waiting { started, .. } if now.duration_since(started) >= REKEY_ATTEMPT_TIME => {
                self.wait = Wait::Idle;
                Due::GaveUp
            }
            Wait::Waiting { last_sent, .. }
                if now.duration_since(last_sent) >= REKEY_TIMEOUT + jitter =>
            {
                self.last_forced = None;
                Due::Retransmit
            }
            Wait::Proactive(at) if at <= now => {
                self.wait = Wait::Idle;
                if established {
                    Due::Nothing
                } else {
                    Due::Proactive
                }
            }
            _ => Due::Nothing,
        }
    }

    /// When [`Handshake::poll`] next has something to do.
    pub(crate) fn deadline(&self, established: bool, jitter: Duration) -> Option<Instant> {
        match self.wait {
            Wait::Idle => None,
            Wait::Proactive(at) => Some(at),
            // Cleared at the next poll; nothing is due for it.
            Wait::Waiting { .. } if established => None,
            Wait::Waiting { started, last_sent } => {
                Some((last_sent + REKEY_TIMEOUT + jitter).min(started + REKEY_ATTEMPT_TIME))
            }
        }
    }

    /// When the stale-session rule fires unless something authenticated comes first.
    pub(crate) fn stale_at(&self) -> Option<Instant> {
        self.awaiting_reply_since.map(|t| t + STALE_SESSION)
    }

    /// The stale-session rule: data has gone unanswered for [`STALE_SESSION`]; if so, the wait
    /// restarts from now and a handshake is due.
    pub(crate) fn stale(&mut self, now: Instant) -> bool {
        if self
            .awaiting_reply_since
            .is_some_and(|t| now.duration_since(t) >= STALE_SESSION)
        {
            self.awaiting_reply_since = Some(now);
            return true;
        }
        false
    }
}
