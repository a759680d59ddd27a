//! Which address family carries a direct path when the peer has candidates of both.
//!
//! Whichever candidate answers first becomes the direct path ([`super::path`]); on a
//! dual-stack pair that is a race between IPv4 and IPv6. So while a direct path works and the
//! peer offers candidates of the other family, the node measures both now and then: one
//! round pings (in the tunnel, [`super::probes::Purpose::Family`]) the direct endpoint and
//! each candidate of the other family, and the answers' round-trip times decide
//! ([`prefers`]):
//! - IPv6 takes over from IPv4 when its RTT is at most IPv4's plus a margin (a tie goes to
//!   IPv6: no NAT mapping on the way that can expire or move);
//! - IPv4 takes over from IPv6 only when it beats IPv6 by twice the margin, so RTTs near the
//!   line do not send the traffic back and forth;
//! - the margin is a tenth of the RTT, at least [`MIN_MARGIN`].
//!
//! The first round goes [`FIRST_ROUND`] after a direct path is confirmed, then one every
//! [`ROUND_INTERVAL`] while traffic flows (idle peers get none). A candidate of the other
//! family that answered within [`FRESH`] is also where traffic goes at once when the direct
//! path dies, instead of the relay ([`Families::fallback`]).

use crate::outbox::Endpoint;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The first family round after a direct path is confirmed: both families' first probes
/// have been answered by then.
pub const FIRST_ROUND: Duration = Duration::from_secs(1);
/// Between family rounds while traffic flows.
pub const ROUND_INTERVAL: Duration = Duration::from_secs(10);
/// A measured candidate of the other family is trusted as a fallback this long.
pub const FRESH: Duration = Duration::from_secs(25);
/// The smallest RTT margin between families (see the module docs).
pub const MIN_MARGIN: Duration = Duration::from_millis(1);
/// Most candidates of the other family pinged per round.
pub const MAX_PROBED: usize = 4;

/// A ping of the current round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    id: u16,
    to: Endpoint,
}

/// The family rounds of one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Families {
    /// The direct endpoint the rounds are for: a new one schedules a first round.
    for_path: Option<Endpoint>,
    /// When the next round is due.
    next: Option<Instant>,
    /// Pings of the last round still unanswered.
    pending: Vec<Pending>,
    /// RTT of the direct endpoint in the last round.
    current: Option<Duration>,
    /// The fastest candidate of the other family in the last round, and its RTT: only a
    /// round's own measurements are weighed against each other.
    round_best: Option<(Endpoint, Duration)>,
    /// The best candidate of the other family answered lately, its RTT and when (the
    /// fallback when the direct path dies).
    best: Option<(Endpoint, Duration, Instant)>,
}

/// Whether a candidate of family `other` with RTT `theirs` should carry the traffic instead of
/// the direct path of the other family with RTT `ours` (see the module docs).
pub fn prefers(other: SocketAddr, theirs: Duration, ours: Duration) -> bool {
    if other.is_ipv6() {
        theirs <= ours + margin(ours)
    } else {
        theirs + 2 * margin(ours) < ours
    }
}

fn margin(rtt: Duration) -> Duration {
    (rtt / 10).max(MIN_MARGIN)
}

/// The candidates among `endpoints` of the other family than `path` (at most [`MAX_PROBED`]).
pub(crate) fn others(
    path: SocketAddr,
    endpoints: &[SocketAddr],
) -> impl Iterator<Item = &SocketAddr> {
    endpoints
        .iter()
        .filter(move |e| e.is_ipv6() != path.is_ipv6())
        .take(MAX_PROBED)
}

impl Families {
    /// When a round is due for direct path `path` (`flowing`: traffic to the peer flows), if
    /// the peer has candidates of the other family: at once for a new path (to schedule its
    /// first round).
    pub(crate) fn deadline(
        &self,
        path: Endpoint,
        endpoints: &[SocketAddr],
        flowing: bool,
        now: Instant,
    ) -> Option<Instant> {
        others(path.addr, endpoints).next()?;
        if self.for_path != Some(path) {
            return Some(now);
        }
        let next = self.next?;
        (flowing || self.current.is_none()).then_some(next)
    }

    /// Whether a round is due now on direct path `path`; if so, starts it (the caller sends
    /// the pings and reports them with [`Families::sent`]).
    pub(crate) fn poll(&mut self, path: Endpoint, flowing: bool, now: Instant) -> bool {
        if self.for_path != Some(path) {
            self.for_path = Some(path);
            self.next = Some(now + FIRST_ROUND);
            self.new_round();
            if self
                .best
                .is_some_and(|(e, _, _)| e.addr.is_ipv6() == path.addr.is_ipv6())
            {
                // The path took it (or its family): it is no fallback any more.
                self.best = None;
            }
            return false;
        }
        let due = self.next.is_some_and(|t| now >= t) && (flowing || self.current.is_none());
        if due {
            self.next = Some(now + ROUND_INTERVAL);
            self.new_round();
        }
        due
    }

    fn new_round(&mut self) {
        self.pending.clear();
        self.current = None;
        self.round_best = None;
    }

    /// Ping `id` of the current round went to `to`.
    pub(crate) fn sent(&mut self, id: u16, to: Endpoint) {
        self.pending.push(Pending { id, to });
    }

    /// Whether ping `id` is one of the round's.
    pub(crate) fn owns(&self, id: u16) -> bool {
        self.pending.iter().any(|p| p.id == id)
    }

    /// Ping `id` of the round was answered from `from` after `rtt`. Returns the endpoint
    /// traffic should move to, when the round now says so.
    pub(crate) fn answered(
        &mut self,
        id: u16,
        from: Endpoint,
        rtt: Duration,
        now: Instant,
    ) -> Option<Endpoint> {
        let pos = self.pending.iter().position(|p| p.id == id)?;
        let ping = self.pending.swap_remove(pos);
        if ping.to != from {
            // Answered from elsewhere than it went: it says nothing about that candidate.
            return None;
        }
        let path = self.for_path?;
        if from == path {
            self.current = Some(rtt);
        } else {
            if self.round_best.is_none_or(|(_, r)| rtt < r) {
                self.round_best = Some((from, rtt));
            }
            if self.best.is_none_or(|(e, r, t)| {
                e == from || rtt < r || now.saturating_duration_since(t) >= FRESH
            }) {
                self.best = Some((from, rtt, now));
            }
        }
        let ours = self.current?;
        let (other, theirs) = self.round_best?;
        prefers(other.addr, theirs, ours).then_some(other)
    }

    /// The direct path died: a candidate of the other family answered within [`FRESH`], if
    /// one did (traffic goes there at once).
    pub(crate) fn fallback(&self, dead: Endpoint, now: Instant) -> Option<Endpoint> {
        self.best
            .filter(|(e, _, t)| {
                *e != dead
                    && e.addr.is_ipv6() != dead.addr.is_ipv6()
                    && now.saturating_duration_since(*t) < FRESH
            })
            .map(|(e, _, _)| e)
    }

    /// The candidate measured lately is gone (not among the peer's candidates any more).
    pub(crate) fn retain(&mut self, endpoints: &[SocketAddr]) {
        if self
            .best
            .is_some_and(|(e, _, _)| !endpoints.contains(&e.addr))
        {
            self.best = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::SocketId;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn e(s: &str) -> Endpoint {
        Endpoint {
            socket: SocketId::MAIN,
            addr: s.parse().unwrap(),
        }
    }

    #[test]
    fn ipv6_wins_ties_and_ipv4_must_beat_it_clearly() {
        let v4: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        // On IPv4: IPv6 takes over when about as fast.
        assert!(prefers(v6, ms(20), ms(20)));
        assert!(prefers(v6, ms(22), ms(20)));
        assert!(!prefers(v6, ms(23), ms(20)));
        // On IPv6: IPv4 takes over only when clearly faster.
        assert!(!prefers(v4, ms(20), ms(22)));
        assert!(!prefers(v4, ms(20), ms(25)));
        assert!(prefers(v4, ms(20), ms(26)));
        // Sub-millisecond LAN paths: the 1 ms floor keeps them on IPv6.
        assert!(!prefers(
            v4,
            Duration::from_micros(100),
            Duration::from_micros(900)
        ));
        // 40 ms of extra delay on IPv6 sends the traffic to IPv4.
        assert!(prefers(v4, ms(1), ms(41)));
    }

    #[test]
    fn a_round_measures_both_families_and_names_the_better_one() {
        let t0 = Instant::now();
        let path = e("192.0.2.1:51820");
        let alt = e("[2001:db8::1]:51820");
        let endpoints = [path.addr, alt.addr];
        let mut f = Families::default();
        assert_eq!(f.deadline(path, &endpoints, true, t0), Some(t0));
        assert!(!f.poll(path, true, t0), "a new path only schedules");
        assert_eq!(
            f.deadline(path, &endpoints, false, t0),
            Some(t0 + FIRST_ROUND)
        );
        assert!(
            f.poll(path, false, t0 + FIRST_ROUND),
            "the first round even while idle"
        );
        let t1 = t0 + FIRST_ROUND;
        f.sent(1, path);
        f.sent(2, alt);
        assert_eq!(
            f.answered(2, alt, ms(5), t1 + ms(5)),
            None,
            "IPv4 not measured yet"
        );
        assert_eq!(f.answered(1, path, ms(6), t1 + ms(6)), Some(alt));
        assert_eq!(f.fallback(path, t1 + ms(6)), Some(alt));
        assert_eq!(
            f.fallback(path, t1 + ms(5) + FRESH),
            None,
            "too old to trust"
        );
        // Idle: no more rounds; flowing: one every ROUND_INTERVAL.
        assert_eq!(f.deadline(path, &endpoints, false, t1), None);
        assert_eq!(
            f.deadline(path, &endpoints, true, t1),
            Some(t1 + ROUND_INTERVAL)
        );
        // An answer from another address than the ping went to proves nothing.
        assert!(f.poll(path, true, t1 + ROUND_INTERVAL));
        f.sent(3, alt);
        f.sent(4, path);
        assert_eq!(f.answered(3, e("[2001:db8::9]:51820"), ms(1), t1), None);
        assert!(!f.owns(3));
        // A peer without candidates of the other family gets no rounds.
        assert_eq!(f.deadline(path, &[path.addr], true, t1), None);
    }
}
