//! The node-wide gate in front of every handshake's Diffie-Hellman.
//!
//! A WireGuard handshake message costs X25519 operations before the node knows who sent it: an
//! initiation needs one just to find out which key it claims, a member's initiation about five
//! in all, a response two. A stranger who knows the node's public key can therefore make the node
//! burn a core with a stream of cheap datagrams. [`HandshakeGuard`] runs first, on every datagram
//! [`crate::Node`] receives, and decides with symmetric crypto only (BLAKE2s, and XChaCha20-Poly1305
//! for a cookie reply) whether the DH may happen:
//!
//! 1. Anything that is not a well-formed handshake initiation (type 1, 148 bytes) or response
//!    (type 2, 92 bytes) passes at once: data, cookie replies, and garbage the session layer
//!    counts as malformed without any DH.
//! 2. A handshake must carry a valid mac1 for this node's public key (only someone who knows the
//!    key can make one); otherwise [`Verdict::BadMac1`].
//! 3. A node-wide token bucket on the caller's clock bounds handshake DH
//!    ([`GuardConfig::burst`], [`GuardConfig::rate`]). Handshakes that came straight over UDP may
//!    use it down to [`GuardConfig::relay_reserve`]; the rest is kept for handshakes that came
//!    through the relay, which authenticates members and cannot carry a cookie round trip.
//! 4. Over that, the node is under load. A direct handshake without a valid mac2 is answered with
//!    a WireGuard cookie reply ([`Verdict::Cookie`]), bound to its source address; the
//!    initiator's WireGuard stores the cookie and puts mac2 on its next initiation. A handshake
//!    with a valid mac2 proves its source address and passes under a small budget per source
//!    address (a bounded table). Cookie replies are limited per source (hashed into a fixed set
//!    of slots, so spoofed sources cannot grow a table) and node-wide; beyond that, and for
//!    relayed handshakes over budget, [`Verdict::OverBudget`].
//!
//! Every budget decision runs on the `now` the caller passes, so the deterministic simulation
//! stays deterministic (and, with the defaults, never reaches the budget: see
//! [`GuardConfig::default`]). The mac checks and the cookie itself are boringtun's
//! `RateLimiter` (one that never reports load, for mac1 only, and one that always does, for
//! mac2 and the cookie reply); its wall-clock parts (the cookie secret changes every two
//! minutes of wall time, as WireGuard specifies) decide whether a cookie is still valid, never
//! whether the node is under load.

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

/// Size of a WireGuard cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
const INITIATION: ([u8; 4], usize) = ([1, 0, 0, 0], 148);
const RESPONSE: ([u8; 4], usize) = ([2, 0, 0, 0], 92);
/// How often a full source table may be swept for idle entries.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The guard's sizes. The defaults are what [`crate::Node`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// Handshakes the node takes in at once before it is under load. Default 2048: a 300-node
    /// network's start-up storm brings each node at most 299 initiations and as many responses,
    /// and 1,000 peers that came up together rekey together (REKEY_AFTER_TIME, 120 s) with at
    /// most one initiation or response each; both fit with room for retries.
    pub burst: u32,
    /// Handshakes per second the budget refills. Default 200: the dearest handshake it admits,
    /// a member's initiation (identify, consume, respond: five X25519 operations), took
    /// 0.47 ms on the 2-core bench machine (`cargo bench -p mesh-benches --bench handshake`,
    /// one X25519 0.084 ms), so the sustained rate costs at most about 9 % of one core; a
    /// stranger's initiation (one DH, 0.095 ms) about 2 %. 1,000 peers rekeying every 120 s
    /// need about 17 per second.
    pub rate: u32,
    /// Part of the budget that only relayed handshakes may use. Default 256.
    pub relay_reserve: u32,
    /// Under load, handshakes with a valid mac2 each source address may start at once.
    /// Default 8.
    pub source_burst: u32,
    /// ... and per second. Default 4 (a source address may be a NAT with several members).
    pub source_rate: u32,
    /// Source addresses tracked with a proven cookie. Default 1024; when the table is full and
    /// none is idle, new sources are over budget.
    pub max_sources: usize,
    /// Cookie replies the node sends at once. Default 512.
    pub cookie_burst: u32,
    /// ... and per second. Default 5000 (each is 64 bytes and about 2 µs of symmetric crypto).
    pub cookie_rate: u32,
    /// Slots that source addresses hash into for their own cookie allowance. Default 4096.
    pub cookie_slots: usize,
    /// Cookie replies one slot gets at once. Default 4.
    pub cookie_slot_burst: u32,
    /// ... and per second. Default 2: a cookie stays valid for two minutes, so a member needs
    /// few.
    pub cookie_slot_rate: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            burst: 2048,
            rate: 200,
            relay_reserve: 256,
            source_burst: 8,
            source_rate: 4,
            max_sources: 1024,
            cookie_burst: 512,
            cookie_rate: 5000,
            cookie_slots: 4096,
            cookie_slot_burst: 4,
            cookie_slot_rate: 2,
        }
    }
}

/// What to do with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it on to the sessions (the DH, if any, may happen).
    Pass,
    /// A handshake without a valid mac1 for this node: drop it and count it.
    BadMac1,
    /// A handshake over budget: drop it and count it.
    OverBudget,
    /// A handshake over budget from a direct source without a valid mac2: send this cookie
    /// reply back to the source address it came from, drop the handshake, count the reply.
    Cookie([u8; COOKIE_REPLY_LEN]),
}

/// Tokens on the caller's clock: up to `burst`, one more every `interval`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    last: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Refill {
    burst: u32,
    interval: Duration,
}

impl Refill {
    fn new(burst: u32, per_second: u32) -> Refill {
        let interval = match per_second {
            0 => Duration::MAX,
            n => Duration::from_secs(1) / n,
        };
        Refill {
            burst,
            interval: interval.max(Duration::from_nanos(1)),
        }
    }

    fn full(&self, now: Instant) -> Bucket {
        Bucket {
            tokens: self.burst,
            last: now,
        }
    }
}

impl Bucket {
    fn refill(&mut self, r: Refill, now: Instant) {
        if self.tokens >= r.burst {
            self.last = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.last);
        let due = elapsed.as_nanos() / r.interval.as_nanos();
        let add = u32::try_from(due)
            .unwrap_or(u32::MAX)
            .min(r.burst - self.tokens);
        if add == 0 {
            return;
        }
        self.tokens += add;
        self.last = if self.tokens >= r.burst {
            now
        } else {
            self.last + r.interval * add
        };
    }

    /// Takes a token if more than `floor` are left.
    fn take_above(&mut self, floor: u32, r: Refill, now: Instant) -> bool {
        self.refill(r, now);
        if self.tokens > floor {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }

    fn take(&mut self, r: Refill, now: Instant) -> bool {
        self.take_above(0, r, now)
    }

    fn is_full(&self, r: Refill, now: Instant) -> bool {
        let mut b = *self;
        b.refill(r, now);
        b.tokens >= r.burst
    }
}

/// Budgets of source addresses that proved themselves with a valid mac2.
struct Sources {
    refill: Refill,
    max: usize,
    table: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
}

impl Sources {
    fn take(&mut self, ip: IpAddr, now: Instant) -> bool {
        if let Some(b) = self.table.get_mut(&ip) {
            return b.take(self.refill, now);
        }
        if self.table.len() >= self.max {
            if self
                .last_sweep
                .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
            {
                return false;
            }
            self.last_sweep = Some(now);
            let refill = self.refill;
            self.table.retain(|_, b| !b.is_full(refill, now));
            if self.table.len() >= self.max {
                return false;
            }
        }
        let mut b = self.refill.full(now);
        let ok = b.take(self.refill, now);
        self.table.insert(ip, b);
        ok
    }
}

/// The gate in front of handshake DH. See the module docs.
pub struct HandshakeGuard {
    config: GuardConfig,
    /// Never under load: checks mac1 only.
    mac1: RateLimiter,
    /// Always under load: checks mac2 and formats cookie replies.
    cookies: RateLimiter,
    budget: Bucket,
    budget_refill: Refill,
    cookie_budget: Bucket,
    cookie_refill: Refill,
    cookie_slots: Vec<Bucket>,
    slot_refill: Refill,
    /// Keys the hash of a source address to its cookie slot (derived from the private key, so
    /// a stranger cannot aim at a member's slot, and a run is the same for the same key).
    slot_key: u64,
    sources: Sources,
}

impl HandshakeGuard {
    /// A guard for the node with this private key, with every budget full at `now`.
    pub fn new(secret: &StaticSecret, config: GuardConfig, now: Instant) -> Self {
        let public = XPublic::from(secret);
        let mut h = DefaultHasher::new();
        b"mesh cookie slots".hash(&mut h);
        secret.to_bytes().hash(&mut h);
        let budget_refill = Refill::new(config.burst, config.rate);
        let cookie_refill = Refill::new(config.cookie_burst, config.cookie_rate);
        let slot_refill = Refill::new(config.cookie_slot_burst, config.cookie_slot_rate);
        let source_refill = Refill::new(config.source_burst, config.source_rate);
        HandshakeGuard {
            mac1: RateLimiter::new(&public, u64::MAX),
            cookies: RateLimiter::new(&public, 0),
            budget: budget_refill.full(now),
            budget_refill,
            cookie_budget: cookie_refill.full(now),
            cookie_refill,
            cookie_slots: vec![slot_refill.full(now); config.cookie_slots.max(1)],
            slot_refill,
            slot_key: h.finish(),
            sources: Sources {
                refill: source_refill,
                max: config.max_sources,
                table: HashMap::new(),
                last_sweep: None,
            },
            config,
        }
    }

    /// Decides about one received datagram before any DH. `source` is the address it came
    /// from straight over UDP, `None` when it came through the relay.
    pub fn check(&mut self, source: Option<IpAddr>, datagram: &[u8], now: Instant) -> Verdict {
        let kind = (datagram.get(..4), datagram.len());
        if kind != (Some(&INITIATION.0[..]), INITIATION.1)
            && kind != (Some(&RESPONSE.0[..]), RESPONSE.1)
        {
            return Verdict::Pass;
        }
        let mut scratch = [0u8; COOKIE_REPLY_LEN];
        if self
            .mac1
            .verify_packet(None, datagram, &mut scratch)
            .is_err()
        {
            return Verdict::BadMac1;
        }
        let floor = match source {
            Some(_) => self.config.relay_reserve,
            None => 0,
        };
        if self.budget.take_above(floor, self.budget_refill, now) {
            return Verdict::Pass;
        }
        let Some(ip) = source else {
            return Verdict::OverBudget;
        };
        // Under load: the source must prove its address with a cookie. An all-zero mac2 is
        // "no cookie yet": check the cookie allowance before formatting a reply.
        let has_mac2 = datagram[datagram.len() - 16..].iter().any(|b| *b != 0);
        if !has_mac2 && !self.cookie_allowed(ip, now) {
            return Verdict::OverBudget;
        }
        match self.cookies.verify_packet(Some(ip), datagram, &mut scratch) {
            Ok(_) if self.sources.take(ip, now) => Verdict::Pass,
            Ok(_) => Verdict::OverBudget,
            Err(TunnResult::WriteToNetwork(reply)) if reply.len() == COOKIE_REPLY_LEN => {
                if has_mac2 && !self.cookie_allowed(ip, now) {
                    return Verdict::OverBudget;
                }
                let mut out = [0u8; COOKIE_REPLY_LEN];
                out.copy_from_slice(reply);
                Verdict::Cookie(out)
            }
            Err(_) => Verdict::OverBudget,
        }
    }

    /// Takes a cookie reply from the source's slot and from the node-wide allowance.
    fn cookie_allowed(&mut self, ip: IpAddr, now: Instant) -> bool {
        let mut h = DefaultHasher::new();
        self.slot_key.hash(&mut h);
        ip.hash(&mut h);
        let slot = (h.finish() % self.cookie_slots.len() as u64) as usize;
        let Some(bucket) = self.cookie_slots.get_mut(slot) else {
            return false;
        };
        let mut tried = *bucket;
        if !tried.take(self.slot_refill, now) {
            *bucket = tried;
            return false;
        }
        if !self.cookie_budget.take(self.cookie_refill, now) {
            return false;
        }
        *bucket = tried;
        true
    }

    /// Handshake tokens left in the node-wide budget at `now`.
    pub fn budget_left(&mut self, now: Instant) -> u32 {
        self.budget.refill(self.budget_refill, now);
        self.budget.tokens
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::session::{Output, Session};
    use mesh_proto::PublicKey;
    use std::net::Ipv4Addr;

    const DIRECT: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));

    fn small() -> GuardConfig {
        GuardConfig {
            burst: 4,
            rate: 2,
            relay_reserve: 1,
            source_burst: 2,
            source_rate: 1,
            max_sources: 2,
            cookie_burst: 100,
            cookie_rate: 100,
            cookie_slots: 4096,
            cookie_slot_burst: 2,
            cookie_slot_rate: 1,
        }
    }

    struct Victim {
        secret: StaticSecret,
        guard: HandshakeGuard,
    }

    fn victim(config: GuardConfig, now: Instant) -> Victim {
        let secret = StaticSecret::from([7u8; 32]);
        let guard = HandshakeGuard::new(&secret, config, now);
        Victim { secret, guard }
    }

    fn initiator(to: &StaticSecret, seed: u8) -> Session {
        let peer = PublicKey(XPublic::from(to).to_bytes());
        let secret = StaticSecret::from([seed; 32]);
        Session::new(
            secret,
            peer,
            None,
            u32::from(seed),
            crate::session::wall_clock(std::time::Instant::now()),
        )
    }

    fn initiation(s: &mut Session) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match s.force_handshake(&mut buf, std::time::Instant::now()) {
            Output::Network(b) => b.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// Spends the whole node-wide budget with relayed handshakes (no cookie allowance used).
    fn exhaust(v: &mut Victim, now: Instant) {
        let mut s = initiator(&v.secret, 200);
        let init = initiation(&mut s);
        while v.guard.check(None, &init, now) == Verdict::Pass {}
    }

    #[test]
    fn non_handshakes_pass_at_once() {
        let now = Instant::now();
        let mut v = victim(small(), now);
        for d in [
            &[4u8, 0, 0, 0, 1, 2, 3][..],
            &[3u8; 64][..],
            &[][..],
            &[1u8, 0, 0, 0, 9][..], // too short for an initiation: malformed later
            &[1u8, 0, 0, 1][..],    // reserved bytes set
            &[0u8; 148][..],        // type 0
            &[2u8, 0, 0, 0, 0, 0][..], // short response
        ] {
            assert_eq!(v.guard.check(DIRECT, d, now), Verdict::Pass);
        }
        assert_eq!(v.guard.budget_left(now), 4, "nothing was charged");
    }

    #[test]
    fn bad_mac1_is_dropped_without_charge() {
        let now = Instant::now();
        let mut v = victim(small(), now);
        // Made for another node's key: its mac1 is wrong for us.
        let other = StaticSecret::from([9u8; 32]);
        let mut s = initiator(&other, 1);
        let init = initiation(&mut s);
        for _ in 0..100 {
            assert_eq!(v.guard.check(DIRECT, &init, now), Verdict::BadMac1);
            assert_eq!(v.guard.check(None, &init, now), Verdict::BadMac1);
        }
        let mut init = initiation(&mut initiator(&v.secret, 1));
        init[20] ^= 1;
        assert_eq!(v.guard.check(DIRECT, &init, now), Verdict::BadMac1);
        let mut response = vec![2u8, 0, 0, 0];
        response.resize(92, 0xaa);
        assert_eq!(v.guard.check(DIRECT, &response, now), Verdict::BadMac1);
        assert_eq!(v.guard.budget_left(now), 4, "bad mac1 costs no budget");
    }

    #[test]
    fn budget_exhausts_and_refills_on_the_injected_clock() {
        let t0 = Instant::now();
        let mut v = victim(small(), t0);
        let init = initiation(&mut initiator(&v.secret, 1));
        // Relayed handshakes may use the whole burst (4), then they are over budget.
        for _ in 0..4 {
            assert_eq!(v.guard.check(None, &init, t0), Verdict::Pass);
        }
        assert_eq!(v.guard.check(None, &init, t0), Verdict::OverBudget);
        // Nothing refills while the clock stands still, whatever the wall clock does.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(v.guard.check(None, &init, t0), Verdict::OverBudget);
        // Rate 2/s: one token after 500 ms, not before.
        let t = t0 + Duration::from_millis(499);
        assert_eq!(v.guard.check(None, &init, t), Verdict::OverBudget);
        let t = t0 + Duration::from_millis(500);
        assert_eq!(v.guard.check(None, &init, t), Verdict::Pass);
        assert_eq!(v.guard.check(None, &init, t), Verdict::OverBudget);
        // A long pause refills up to the burst, no more.
        let t = t0 + Duration::from_secs(3600);
        assert_eq!(v.guard.budget_left(t), 4);
    }

    #[test]
    fn direct_handshakes_leave_the_relay_reserve() {
        let now = Instant::now();
        let mut v = victim(small(), now);
        let init = initiation(&mut initiator(&v.secret, 1));
        // Burst 4, reserve 1: three direct handshakes pass.
        for _ in 0..3 {
            assert_eq!(v.guard.check(DIRECT, &init, now), Verdict::Pass);
        }
        assert!(matches!(
            v.guard.check(DIRECT, &init, now),
            Verdict::Cookie(_)
        ));
        // The reserve is the relay's.
        assert_eq!(v.guard.check(None, &init, now), Verdict::Pass);
        assert_eq!(v.guard.check(None, &init, now), Verdict::OverBudget);
    }

    #[test]
    fn over_budget_direct_gets_a_cookie_and_its_mac2_retry_passes() {
        let now = Instant::now();
        let mut v = victim(small(), now);
        exhaust(&mut v, now);
        let mut member = initiator(&v.secret, 1);
        let first = initiation(&mut member);
        let Verdict::Cookie(reply) = v.guard.check(DIRECT, &first, now) else {
            panic!("expected a cookie reply");
        };
        assert_eq!(reply[..4], [3, 0, 0, 0]);
        assert_eq!(
            reply[4..8],
            first[4..8],
            "addressed to the initiation's sender index"
        );
        // The initiator's WireGuard takes the cookie; its next initiation carries mac2.
        let mut buf = vec![0u8; 256];
        assert!(matches!(
            member.decapsulate(&reply, &mut buf, now),
            Output::Done
        ));
        let retry = initiation(&mut member);
        assert_ne!(retry[132..], [0u8; 16], "mac2 is set");
        assert_eq!(v.guard.check(DIRECT, &retry, now), Verdict::Pass);
        // The cookie is bound to the address: from elsewhere it proves nothing.
        let elsewhere = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8)));
        assert!(matches!(
            v.guard.check(elsewhere, &retry, now),
            Verdict::Cookie(_)
        ));
    }

    #[test]
    fn relayed_over_budget_is_dropped() {
        let now = Instant::now();
        let mut v = victim(small(), now);
        let init = initiation(&mut initiator(&v.secret, 1));
        while v.guard.check(None, &init, now) == Verdict::Pass {}
        for _ in 0..10 {
            assert_eq!(v.guard.check(None, &init, now), Verdict::OverBudget);
        }
    }

    #[test]
    fn proven_sources_have_a_budget_each_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut v = victim(small(), t0);
        exhaust(&mut v, t0);
        let ip = |n: u8| Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)));
        // A mac2-carrying initiation for each of three source addresses.
        let mut proven = Vec::new();
        for n in 1..=3u8 {
            let mut s = initiator(&v.secret, n);
            let first = initiation(&mut s);
            let Verdict::Cookie(reply) = v.guard.check(ip(n), &first, t0) else {
                panic!("expected a cookie reply");
            };
            let mut buf = vec![0u8; 256];
            s.decapsulate(&reply, &mut buf, t0);
            proven.push(initiation(&mut s));
        }
        // Source 1: burst 2, then over budget until a second has passed.
        assert_eq!(v.guard.check(ip(1), &proven[0], t0), Verdict::Pass);
        assert_eq!(v.guard.check(ip(1), &proven[0], t0), Verdict::Pass);
        assert_eq!(v.guard.check(ip(1), &proven[0], t0), Verdict::OverBudget);
        // Source 2 has its own budget; the table (2 entries) is then full.
        assert_eq!(v.guard.check(ip(2), &proven[1], t0), Verdict::Pass);
        assert_eq!(
            v.guard.check(ip(3), &proven[2], t0),
            Verdict::OverBudget,
            "no room for a third source while the others are busy"
        );
        // Once the entries are idle (refilled), a sweep makes room.
        let t = t0 + Duration::from_secs(3);
        exhaust(&mut v, t);
        assert_eq!(v.guard.check(ip(3), &proven[2], t), Verdict::Pass);
        assert!(v.guard.sources.table.len() <= 2);
    }

    #[test]
    fn cookie_replies_are_limited_per_source_and_node_wide() {
        let now = Instant::now();
        let mut v = victim(
            GuardConfig {
                cookie_burst: 5,
                cookie_rate: 1,
                ..small()
            },
            now,
        );
        exhaust(&mut v, now);
        let init = initiation(&mut initiator(&v.secret, 1));
        // One source: its slot allows 2.
        let n = (0..50)
            .filter(|_| matches!(v.guard.check(DIRECT, &init, now), Verdict::Cookie(_)))
            .count();
        assert_eq!(n, 2);
        // Many sources: the node-wide allowance (5, 3 left) caps them.
        let n = (10..60u8)
            .filter(|i| {
                let src = Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, *i)));
                matches!(v.guard.check(src, &init, now), Verdict::Cookie(_))
            })
            .count();
        assert_eq!(n, 3);
        // Garbage in mac2 is no way around either limit.
        let mut forged = init.clone();
        forged[140] = 1;
        assert_eq!(v.guard.check(DIRECT, &forged, now), Verdict::OverBudget);
    }

    #[test]
    fn default_budget_holds_a_300_node_start_up_storm() {
        let now = Instant::now();
        let c = GuardConfig::default();
        let mut v = victim(c, now);
        let init = initiation(&mut initiator(&v.secret, 1));
        // 299 initiations and 299 responses' worth, all at one instant, straight over UDP,
        // then a full synchronized rekey of 1,000 peers over the next ten seconds.
        for _ in 0..598 {
            assert_eq!(v.guard.check(DIRECT, &init, now), Verdict::Pass);
        }
        for i in 0..1000u32 {
            let t = now + Duration::from_millis(u64::from(i) * 10);
            assert_eq!(v.guard.check(DIRECT, &init, t), Verdict::Pass);
        }
    }
}
