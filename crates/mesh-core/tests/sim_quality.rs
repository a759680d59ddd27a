#![allow(clippy::unwrap_used)]
//! Path choice by measured quality on the simulated network (`simnet`): two public nodes with a
//! direct path and a relay, steady traffic both ways, and loss models on single links
//! ([`simnet::LinkLoss`]): random loss, loss in bursts, loss in one direction only, a rate limit
//! that passes sparse packets and drops bulk. Each scenario runs over several seeds and prints
//! its figures (time to switch, delivered fractions, switches) with `--nocapture`.
//!
//! What is asserted is the behaviour `mesh_core::QualityConfig` documents: a direct path that
//! loses 10 % or more over a 10 s window gives way to a clean relay within about 10-15 s, the
//! traffic delivered improves, the direct path is taken back once it recovers, and a pair whose
//! two paths both lose a little (5 %) never changes path.

mod simnet;

use mesh_core::{Counters, Path, PeerStatus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use simnet::{LinkLoss, Sim, INTERNET, NODE_PORT, RELAY};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const SEEDS: std::ops::RangeInclusive<u64> = 1..=5;
const A_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Packets per second each way, and their size (one relay frame each).
const RATE: u32 = 50;
const SIZE: usize = 400;

fn relay_ip() -> Ipv4Addr {
    match RELAY.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => unreachable!(),
    }
}

/// Two public nodes and a relay, with a direct path between them (clean network).
struct Pair {
    sim: Sim,
    a: usize,
    b: usize,
    /// Packets each side sent so far (the next sequence numbers).
    sent: [u64; 2],
    /// When each side sends its next packet.
    next: [Instant; 2],
    /// The gaps between packets vary (real traffic is not a metronome, and a rate limit's
    /// bucket would otherwise lock to its phase).
    rng: SmallRng,
}

impl Pair {
    fn new(seed: u64) -> Pair {
        Pair::connected(seed, false)
    }

    /// The pair, on its direct path; or with the direct path cut both ways from the start
    /// (`cut`), on the relay.
    fn connected(seed: u64, cut: bool) -> Pair {
        let mut sim = Sim::empty(seed, 0.0);
        sim.add_relay();
        let a = sim.add_node_at(INTERNET, SocketAddr::from((A_IP, NODE_PORT)));
        let b = sim.add_node_at(INTERNET, SocketAddr::from((B_IP, NODE_PORT)));
        if cut {
            for (from, to) in [(A_IP, B_IP), (B_IP, A_IP)] {
                sim.net.set_link_loss(from, to, Some(LinkLoss::Random(1.0)));
            }
        }
        sim.connect();
        if cut {
            sim.run_for(Duration::from_secs(10));
        } else {
            let took = sim.time_to_direct(a, b, Duration::from_secs(10));
            assert!(took.is_some(), "seed {seed}: no direct path");
        }
        let now = sim.now;
        Pair {
            sim,
            a,
            b,
            sent: [0, 0],
            next: [now, now],
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Runs `d` of traffic: `RATE` packets per second on average from each side (or from `a`
    /// only), 0.5 to 1.5 times the mean gap apart. Returns the fraction of the packets sent
    /// meanwhile that were delivered each way, (a to b, b to a), as counted at the receivers
    /// (the last few may still be on their way).
    fn traffic(&mut self, d: Duration, both_ways: bool) -> (f64, f64) {
        let before = self.delivered();
        let sent = self.sent;
        let gap = Duration::from_secs(1) / RATE;
        let end = self.sim.now + d;
        let sides = if both_ways { 2 } else { 1 };
        for side in 0..2 {
            self.next[side] = self.next[side].max(self.sim.now);
        }
        loop {
            let side = (0..sides).min_by_key(|&s| self.next[s]).unwrap_or(0);
            let at = self.next[side];
            if at >= end {
                break;
            }
            self.sim.run_until(at);
            let (from, to) = if side == 0 {
                (self.a, self.b)
            } else {
                (self.b, self.a)
            };
            self.sim.send_data(from, to, self.sent[side] as u16, SIZE);
            self.sent[side] += 1;
            self.next[side] = at + gap.mul_f64(self.rng.gen_range(0.5..1.5));
        }
        self.sim.run_until(end);
        let after = self.delivered();
        (
            fraction(after.0 - before.0, self.sent[0] - sent[0]),
            fraction(after.1 - before.1, self.sent[1] - sent[1]),
        )
    }

    /// Packets delivered so far: (a to b, b to a).
    fn delivered(&self) -> (u64, u64) {
        let from = |x: usize, y: usize| {
            let o = self.sim.nodes[x].overlay;
            self.sim.nodes[y]
                .replies
                .iter()
                .filter(|(src, _)| *src == o)
                .count() as u64
        };
        (from(self.a, self.b), from(self.b, self.a))
    }

    fn status(&self, of: usize, peer: usize) -> PeerStatus {
        let o = self.sim.nodes[peer].overlay;
        self.sim.nodes[of]
            .node
            .status(self.sim.now)
            .peers
            .into_iter()
            .find(|p| p.address == o)
            .unwrap()
    }

    fn peer_of(&self, x: usize) -> usize {
        if x == self.a {
            self.b
        } else {
            self.a
        }
    }

    fn path(&self, of: usize, peer: usize) -> Path {
        self.status(of, peer).path
    }

    fn counters(&self, of: usize) -> Counters {
        self.sim.nodes[of].node.status(self.sim.now).counters
    }

    fn switches(&self, of: usize) -> (u64, u64) {
        let c = self.counters(of);
        (c.quality_switches_to_relay, c.quality_switches_to_direct)
    }

    /// Runs traffic in half-second steps until `want` holds for node `of`, at most `max`; how
    /// long it took.
    fn traffic_until(
        &mut self,
        of: usize,
        want: fn(&Pair, usize) -> bool,
        max: Duration,
        both_ways: bool,
    ) -> Option<Duration> {
        let t0 = self.sim.now;
        let step = Duration::from_millis(500);
        while self.sim.now.duration_since(t0) < max {
            if want(self, of) {
                return Some(self.sim.now.duration_since(t0));
            }
            self.traffic(step, both_ways);
        }
        None
    }

    /// Loss on the direct path, in one direction or both.
    fn direct_loss(&mut self, a_to_b: Option<LinkLoss>, b_to_a: Option<LinkLoss>) {
        self.sim.net.set_link_loss(A_IP, B_IP, a_to_b);
        self.sim.net.set_link_loss(B_IP, A_IP, b_to_a);
    }

    /// Loss on every link to and from the relay.
    fn relay_loss(&mut self, each_link: Option<LinkLoss>) {
        let r = relay_ip();
        for ip in [A_IP, B_IP] {
            self.sim.net.set_path_loss(ip, r, each_link);
        }
    }
}

fn is_direct(p: &Path) -> bool {
    matches!(p, Path::Direct(_))
}

/// Node `x` moved its traffic to the relay for quality (not because the direct path died: a
/// burst of loss longer than a second does that too, by the liveness rules) and stays there.
fn on_relay_for_quality(p: &Pair, x: usize) -> bool {
    let (to_relay, to_direct) = p.switches(x);
    p.path(x, p.peer_of(x)) == Path::Relay && to_relay > to_direct
}

/// Node `x` moved its traffic back to the direct path for quality.
fn back_direct(p: &Pair, x: usize) -> bool {
    let (to_relay, to_direct) = p.switches(x);
    is_direct(&p.path(x, p.peer_of(x))) && to_direct >= 1 && to_direct == to_relay
}

fn fraction(delivered: u64, sent: u64) -> f64 {
    delivered as f64 / sent.max(1) as f64
}

/// A direct path with this loss (both ways) and a clean relay: the pair moves to the relay in
/// time, and delivers more there. Returns (time to switch, delivered before, after).
fn lossy_direct_moves_to_relay(
    seed: u64,
    loss: LinkLoss,
    within: Duration,
) -> (Duration, f64, f64) {
    let mut p = Pair::new(seed);
    p.traffic(Duration::from_secs(15), true);
    assert_eq!(p.switches(p.a), (0, 0), "seed {seed}: a clean path stays");
    p.direct_loss(Some(loss), Some(loss));
    // What the direct path delivers from the start of the loss to the switch.
    let (sent, delivered) = (p.sent[0], p.delivered().0);
    let took = p
        .traffic_until(p.a, on_relay_for_quality, Duration::from_secs(30), true)
        .unwrap_or_else(|| panic!("seed {seed}: still direct after 30 s of {loss:?}"));
    let before = fraction(p.delivered().0 - delivered, p.sent[0] - sent);
    assert!(
        took <= within,
        "seed {seed}: took {took:?} to move to the relay"
    );
    // The other side sees the same loss from its own reports.
    p.traffic_until(p.b, on_relay_for_quality, Duration::from_secs(20), true)
        .unwrap_or_else(|| panic!("seed {seed}: b stayed direct"));
    let d = Duration::from_secs(20);
    let after = p.traffic(d, true).0;
    assert!(on_relay_for_quality(&p, p.a) && on_relay_for_quality(&p, p.b));
    assert_eq!(p.switches(p.a), (1, 0), "seed {seed}: one switch");
    assert!(after > 0.99, "seed {seed}: {after} delivered on the relay");
    assert!(after > before + 0.05, "seed {seed}: {before} -> {after}");
    (took, before, after)
}

#[test]
fn twenty_percent_random_loss_moves_the_pair_to_a_clean_relay() {
    for seed in SEEDS {
        let (took, before, after) =
            lossy_direct_moves_to_relay(seed, LinkLoss::Random(0.2), Duration::from_secs(15));
        eprintln!(
            "seed {seed}: 20 % random loss: relay after {took:?}; delivered {before:.3} direct, {after:.3} relayed"
        );
    }
}

#[test]
fn loss_in_bursts_moves_the_pair_to_a_clean_relay() {
    // Bursts of 10 packets on average, 1/6 of the packets lost.
    let bursts = LinkLoss::Bursts {
        enter: 0.02,
        leave: 0.1,
    };
    for seed in SEEDS {
        let (took, before, after) =
            lossy_direct_moves_to_relay(seed, bursts, Duration::from_secs(20));
        eprintln!(
            "seed {seed}: loss in bursts: relay after {took:?}; delivered {before:.3} direct, {after:.3} relayed"
        );
    }
}

#[test]
fn loss_in_one_direction_moves_only_the_side_that_sends_into_it() {
    for seed in SEEDS {
        let mut p = Pair::new(seed);
        p.traffic(Duration::from_secs(15), true);
        // a's packets to b are lost; b's reach a. b's probes lose their acks (a to b), so only
        // a's loss reports can tell b that its own direction is clean, and a that its is not.
        p.direct_loss(Some(LinkLoss::Random(0.25)), None);
        let took = p
            .traffic_until(p.a, on_relay_for_quality, Duration::from_secs(30), true)
            .unwrap_or_else(|| panic!("seed {seed}: a stayed direct"));
        p.traffic(Duration::from_secs(60), true);
        let (a, b) = (p.status(p.a, p.b), p.status(p.b, p.a));
        eprintln!(
            "seed {seed}: one-way loss: a on the relay after {took:?}; a sees {:?}, b sees {:?}",
            a.direct_quality, b.direct_quality
        );
        assert!(
            took <= Duration::from_secs(15),
            "seed {seed}: took {took:?}"
        );
        assert_eq!(a.path, Path::Relay, "seed {seed}");
        assert!(is_direct(&b.path), "seed {seed}: b moved too");
        assert_eq!(p.switches(p.b), (0, 0), "seed {seed}");
        assert!(p.counters(p.a).loss_reports_received > 0);
        // b's own view of its direct path is clean: it comes from a's reports, not from its
        // probes (whose acks the lossy direction eats).
        let b_loss = b.direct_quality.loss.unwrap();
        assert!(
            b_loss < 0.03,
            "seed {seed}: b thinks its direct path loses {b_loss}"
        );
        let a_loss = a.direct_quality.loss.unwrap();
        assert!(
            a_loss > 0.15,
            "seed {seed}: a thinks its direct path loses {a_loss}"
        );
    }
}

#[test]
fn a_rate_limited_direct_path_with_bulk_traffic_moves_to_the_relay() {
    // The carrier passes 20 packets per second (bursts of 10) each way: probes and keepalives
    // get through, 50 packets per second do not.
    let limit = LinkLoss::RateLimit {
        rate: 20.0,
        burst: 10.0,
    };
    for seed in SEEDS {
        let mut p = Pair::new(seed);
        p.traffic(Duration::from_secs(15), true);
        p.direct_loss(Some(limit), Some(limit));
        let before = p.traffic(Duration::from_secs(5), true).0;
        let took = p
            .traffic_until(p.a, on_relay_for_quality, Duration::from_secs(30), true)
            .unwrap_or_else(|| panic!("seed {seed}: still direct"))
            + Duration::from_secs(5);
        assert!(
            took <= Duration::from_secs(15),
            "seed {seed}: took {took:?}"
        );
        // From the relay the direct path looks clean (sparse probes pass): it is tried again,
        // fails, and each failure doubles the next stay on the relay (30, 60, 120, 240 s...),
        // while every return costs a hold (30 s) on the limited path.
        let d = Duration::from_secs(300);
        let first = p.traffic(d, true).0;
        let first_switches = p.switches(p.a);
        let second = p.traffic(d, true).0;
        let (to_relay, to_direct) = p.switches(p.a);
        eprintln!(
            "seed {seed}: rate limit: relay after {took:?}; delivered {before:.3} direct, then {first:.3} and {second:.3} over the next two 5-minute spans; switches to the relay and back {first_switches:?}, then {:?}",
            (to_relay, to_direct)
        );
        assert!(before < 0.6, "seed {seed}: the limit lets {before} through");
        assert!(first > 0.75, "seed {seed}: {first} delivered");
        assert!(second > 0.9, "seed {seed}: {second} delivered");
        assert!(first_switches.1 <= 3, "seed {seed}: {first_switches:?}");
        assert!(
            to_direct - first_switches.1 <= 1,
            "seed {seed}: {to_direct} returns"
        );
    }
}

/// The direct path is cut for 20 s (longer than the quality window) under traffic, then comes
/// back whole: the pair goes back to it at once, and the probes that failed during the outage
/// do not send it away again for quality (the e2e `path_recovery` test saw that happen under
/// load: direct again, then the relay for a whole hold time).
#[test]
fn a_path_back_from_a_long_outage_is_not_judged_by_the_outage() {
    for seed in SEEDS {
        back_from_an_outage(seed, Duration::from_secs(20));
    }
}

/// A firewall that blocks the direct path for a few seconds (the relay e2e test does this): the
/// losses until liveness gave the path up are in its window when it returns, and were already
/// acted on by falling back.
#[test]
fn a_path_back_from_a_short_outage_is_not_judged_by_the_outage() {
    for seed in SEEDS {
        back_from_an_outage(seed, Duration::from_secs(4));
    }
}

/// Cuts the direct path both ways for `outage` under steady traffic, then restores it: the pair
/// falls back to the relay, returns to the direct path within 15 s, and stays there for 30 s
/// with no switch for quality.
fn back_from_an_outage(seed: u64, outage: Duration) {
    let mut p = Pair::new(seed);
    p.traffic(Duration::from_secs(15), true);
    p.direct_loss(Some(LinkLoss::Random(1.0)), Some(LinkLoss::Random(1.0)));
    p.traffic(outage, true);
    assert_eq!(
        p.path(p.a, p.b),
        Path::Relay,
        "seed {seed}: the cut moves a to the relay"
    );
    p.direct_loss(None, None);
    let took = p
        .traffic_until(
            p.a,
            |p, x| is_direct(&p.path(x, p.peer_of(x))),
            Duration::from_secs(15),
            true,
        )
        .unwrap_or_else(|| panic!("seed {seed}: not direct within 15 s of the path's return"));
    p.traffic(Duration::from_secs(30), true);
    assert!(
        is_direct(&p.path(p.a, p.b)) && is_direct(&p.path(p.b, p.a)),
        "seed {seed}: left the direct path again"
    );
    assert_eq!(
        p.switches(p.a).0,
        0,
        "seed {seed}: a switched to the relay for quality"
    );
    assert_eq!(
        p.switches(p.b).0,
        0,
        "seed {seed}: b switched to the relay for quality"
    );
    eprintln!("seed {seed}: direct again {took:?} after an outage of {outage:?}");
}

/// What the relay e2e test does to a pair under a TCP stream: the direct path is blocked from
/// the start, opens, is blocked again a moment after the pair took it (before a window of clean
/// traffic went over it), and opens again two seconds after the fallback. The loss of the
/// second block fills most of the direct window; the path that returns is clean, and taken.
#[test]
fn a_path_blocked_just_after_it_opened_is_taken_again_when_it_reopens() {
    fn direct(p: &Pair, x: usize) -> bool {
        is_direct(&p.path(x, p.peer_of(x)))
    }
    let cut = Some(LinkLoss::Random(1.0));
    for seed in SEEDS {
        let mut p = Pair::connected(seed, true);
        p.traffic(Duration::from_secs(5), true);
        assert_eq!(p.path(p.a, p.b), Path::Relay, "seed {seed}");
        p.direct_loss(None, None);
        p.traffic_until(p.a, direct, Duration::from_secs(15), true)
            .unwrap_or_else(|| panic!("seed {seed}: no direct path when it opened"));
        p.traffic(Duration::from_millis(300), true);
        p.direct_loss(cut, cut);
        p.traffic_until(p.a, |p, x| !direct(p, x), Duration::from_secs(10), true)
            .unwrap_or_else(|| panic!("seed {seed}: no fallback"));
        p.traffic(Duration::from_secs(2), true);
        p.direct_loss(None, None);
        let took = p
            .traffic_until(p.a, direct, Duration::from_secs(15), true)
            .unwrap_or_else(|| panic!("seed {seed}: not direct within 15 s of the reopening"));
        p.traffic(Duration::from_secs(20), true);
        assert!(
            direct(&p, p.a) && direct(&p, p.b),
            "seed {seed}: left the direct path again"
        );
        assert_eq!(p.switches(p.a).0, 0, "seed {seed}: a switched for quality");
        assert_eq!(p.switches(p.b).0, 0, "seed {seed}: b switched for quality");
        eprintln!("seed {seed}: direct again {took:?} after the reopening");
    }
}

#[test]
fn a_recovered_direct_path_is_taken_back() {
    for seed in SEEDS {
        let mut p = Pair::new(seed);
        p.traffic(Duration::from_secs(15), true);
        p.direct_loss(Some(LinkLoss::Random(0.2)), Some(LinkLoss::Random(0.2)));
        p.traffic_until(p.a, on_relay_for_quality, Duration::from_secs(30), true)
            .unwrap_or_else(|| panic!("seed {seed}: still direct"));
        p.traffic(Duration::from_secs(5), true);
        p.direct_loss(None, None);
        let took = p
            .traffic_until(p.a, back_direct, Duration::from_secs(60), true)
            .unwrap_or_else(|| panic!("seed {seed}: stayed on the relay"));
        // The hold (30 s from the switch) and a clean window (10 s) both pass.
        assert!(
            took <= Duration::from_secs(40),
            "seed {seed}: took {took:?}"
        );
        p.traffic_until(p.b, back_direct, Duration::from_secs(30), true)
            .unwrap_or_else(|| panic!("seed {seed}: b stayed on the relay"));
        p.traffic(Duration::from_secs(60), true);
        eprintln!("seed {seed}: direct again {took:?} after the loss ended");
        assert!(is_direct(&p.path(p.a, p.b)) && is_direct(&p.path(p.b, p.a)));
        assert_eq!(p.switches(p.a), (1, 1), "seed {seed}");
        assert_eq!(p.switches(p.b), (1, 1), "seed {seed}");
    }
}

#[test]
fn five_percent_loss_on_both_paths_never_flaps() {
    for seed in SEEDS {
        let mut p = Pair::new(seed);
        // Direct: 5 % each way. Relay: 2.5 % on each of its links, so about 5 % each way too.
        p.direct_loss(Some(LinkLoss::Random(0.05)), Some(LinkLoss::Random(0.05)));
        p.relay_loss(Some(LinkLoss::Random(0.025)));
        let d = Duration::from_secs(300);
        let (ab, _) = p.traffic(d, true);
        // Sparse traffic too (a ping a second or so), where probes weigh more.
        for _ in 0..120 {
            p.traffic(Duration::from_millis(20), false);
            p.sim.run_for(Duration::from_millis(980));
        }
        let a = p.status(p.a, p.b);
        eprintln!(
            "seed {seed}: 5 % on both paths: {:?} / {:?} switches; delivered {:.3}; a sees direct {:?}, relay {:?}",
            p.switches(p.a),
            p.switches(p.b),
            ab,
            a.direct_quality,
            a.relay_quality
        );
        assert_eq!(p.switches(p.a), (0, 0), "seed {seed}: a flapped");
        assert_eq!(p.switches(p.b), (0, 0), "seed {seed}: b flapped");
        assert!(is_direct(&a.path));
    }
}

#[test]
fn a_clean_network_never_switches_and_measures_no_loss() {
    for seed in SEEDS {
        let mut p = Pair::new(seed);
        let d = Duration::from_secs(120);
        let (ab, ba) = p.traffic(d, true);
        assert!(ab > 0.999 && ba > 0.999, "seed {seed}: {ab} {ba}");
        for (x, y) in [(p.a, p.b), (p.b, p.a)] {
            let s = p.status(x, y);
            assert_eq!(p.switches(x), (0, 0));
            assert_eq!(s.direct_quality.loss, Some(0.0), "seed {seed}");
            assert!(s.direct_quality.rtt.is_some());
            let c = p.counters(x);
            assert!(c.loss_reports_sent >= 100, "seed {seed}: {c:?}");
            assert_eq!(c.loss_reports_unmatched, 0, "seed {seed}");
            assert_eq!(c.malformed_loss_reports, 0);
        }
    }
}
