//! A per-target cap on datagrams sent to addresses that are not confirmed endpoints.
//!
//! Candidate probes, handshakes to candidates and birthday sprays go to addresses that peers
//! reported, which nobody has proven yet. The controller hands out only addresses it observed
//! (or LAN addresses to peers behind the same NAT), and this cap is the node's own second line:
//! whatever it is told, it sends at most [`crate::node::PROBE_BUDGET`] such datagrams to one IP
//! address per [`crate::node::PROBE_BUDGET_WINDOW`], so the network cannot be aimed at a third
//! party.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most distinct target addresses tracked in one window; past that, new targets are refused
/// until the window turns (a node has far fewer peers' addresses than this).
const MAX_TARGETS: usize = 16_384;

/// Counts datagrams per target IP in fixed windows on the injected clock.
#[derive(Debug)]
pub(crate) struct ProbeBudget {
    limit: u32,
    window: Duration,
    started: Option<Instant>,
    sent: HashMap<IpAddr, u32>,
}

impl ProbeBudget {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        ProbeBudget {
            limit,
            window,
            started: None,
            sent: HashMap::new(),
        }
    }

    /// Takes one datagram to `target` from the budget; false when its budget is spent.
    pub(crate) fn take(&mut self, target: IpAddr, now: Instant) -> bool {
        let turned = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if turned {
            self.started = Some(now);
            self.sent.clear();
        }
        if !self.sent.contains_key(&target) && self.sent.len() >= MAX_TARGETS {
            return false;
        }
        let n = self.sent.entry(target).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_gets_its_budget_per_window() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(3, Duration::from_secs(60));
        let victim: IpAddr = "192.0.2.99".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert!((0..3).all(|_| b.take(victim, t0)));
        assert!(!b.take(victim, t0 + Duration::from_secs(59)));
        assert!(b.take(other, t0), "another target has its own budget");
        assert!(b.take(victim, t0 + Duration::from_secs(60)), "a new window");
    }
}
