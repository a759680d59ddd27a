//! Authenticated probes inside a peer's tunnel: pings with a purpose (the user's `mesh ping`,
//! the node's own RTT measurement, the liveness of a direct path), the RTT they measure per
//! path, and the path MTU search.

use crate::node::Path;
use crate::outbox::Endpoint;
use crate::pmtu;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Ids of pings and path probes (path MTU probes use the ids below).
pub const PING_IDS: std::ops::Range<u16> = 0x8000..0xffff;
/// The node measures a peer's RTT by itself (new session, new path) at most this often.
pub const RTT_PROBE_SPACING: Duration = Duration::from_secs(5);
/// Most pings in flight per peer.
const MAX_PINGS: usize = 16;

/// Why a ping was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The user asked ([`crate::Node::ping`]): the answer becomes an [`crate::Event::Pong`].
    User,
    /// The node measures the RTT of a new session or path.
    Rtt,
    /// A direct path we send on went quiet: is it alive?
    Liveness,
    /// A family round: the direct path's and the other family's RTT (see
    /// [`super::family`]).
    Family,
}

#[derive(Debug, Clone, Copy)]
struct Ping {
    id: u16,
    sent: Instant,
    purpose: Purpose,
}

/// A peer's probes and what they measured.
#[derive(Debug)]
pub(crate) struct Probes {
    /// Pings in flight, oldest first.
    pings: VecDeque<Ping>,
    /// Round-trip time of the last answered ping, and the path it was measured on.
    pub(crate) rtt: Option<(Duration, Path)>,
    /// When the node last probed the RTT on its own (a new session or a new path).
    last_rtt_probe: Option<Instant>,
    /// Path MTU search.
    pub(crate) mtu: pmtu::Search,
    /// Last path MTU reported in an event.
    pub(crate) reported_mtu: Option<u16>,
    /// The endpoint the path MTU search ran (or runs) on.
    pub(crate) mtu_endpoint: Option<Endpoint>,
}

impl Probes {
    /// Nothing measured yet; the MTU search starts from `mtu`.
    pub(crate) fn new(mtu: u16) -> Probes {
        Probes {
            pings: VecDeque::new(),
            rtt: None,
            last_rtt_probe: None,
            mtu: pmtu::Search::new(mtu),
            reported_mtu: None,
            mtu_endpoint: None,
        }
    }

    /// Remembers a ping sent now with `id`.
    pub(crate) fn sent(&mut self, id: u16, purpose: Purpose, now: Instant) {
        if self.pings.len() >= MAX_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back(Ping {
            id,
            sent: now,
            purpose,
        });
    }

    /// The answer to ping `id` came back on `path`: records the RTT; returns it and the ping's
    /// purpose, or `None` for an id not in flight.
    pub(crate) fn answered(
        &mut self,
        id: u16,
        path: Path,
        now: Instant,
    ) -> Option<(Duration, Purpose)> {
        let pos = self.pings.iter().position(|p| p.id == id)?;
        let ping = self.pings.remove(pos)?;
        let rtt = now.saturating_duration_since(ping.sent);
        // A family round's pings measure candidates traffic may not take: status shows the
        // path in use.
        if ping.purpose != Purpose::Family {
            self.rtt = Some((rtt, path));
        }
        Some((rtt, ping.purpose))
    }

    /// When the node will want to measure the RTT of `path` by itself, if it will.
    pub(crate) fn rtt_at(&self, path: Path, now: Instant) -> Option<Instant> {
        let stale = self.rtt.is_none_or(|(_, p)| p != path);
        if !stale || path == Path::None {
            return None;
        }
        Some(
            self.last_rtt_probe
                .map_or(now, |t| (t + RTT_PROBE_SPACING).max(now)),
        )
    }

    /// Whether the node should measure the RTT of `path` now (never measured there, and no own
    /// measurement within [`RTT_PROBE_SPACING`]); if so, records it.
    pub(crate) fn rtt_due(&mut self, path: Path, now: Instant) -> bool {
        let stale = self.rtt.is_none_or(|(_, p)| p != path);
        let quiet = self
            .last_rtt_probe
            .is_none_or(|t| now.saturating_duration_since(t) >= RTT_PROBE_SPACING);
        if stale && quiet && path != Path::None {
            self.last_rtt_probe = Some(now);
            return true;
        }
        false
    }
}

/// Hands out ping ids, node-wide, round [`PING_IDS`].
pub(crate) fn next_ping_id(next: &mut u16) -> u16 {
    let id = *next;
    *next = match next.checked_add(1) {
        Some(n) if PING_IDS.contains(&n) => n,
        _ => PING_IDS.start,
    };
    id
}
