//! How well each of a peer's two paths carries packets lately: loss and round-trip time over a
//! sliding window ([`Window`]), one per [`Leg`], and what feeds them while traffic flows
//! ([`Measure`]).
//!
//! Two sources fill a window:
//! - authenticated probes inside the tunnel (`Kind::Probe`, answered by an ack on the path it
//!   came in on): an answer gives a round-trip time, no answer within [`PROBE_LOSS_TIMEOUT`] a
//!   loss. They measure both directions at once, and pass where a rate limit lets sparse packets
//!   through;
//! - the peer's loss reports (`mesh_proto::tunnel::LossReport`), which count what arrived of
//!   our WireGuard data messages on the path against what we sent there (see [`super::loss`]):
//!   one direction only, ours, and the data itself, so a limit that drops bulk shows.
//!
//! Where the reports covered enough messages ([`crate::QualityConfig::min_samples`]) the loss
//! is theirs alone; otherwise reports and probes count together, a probe's round-trip loss
//! taken as the one-way loss that, both ways, loses as much (`1 - sqrt(1 - r)`: 10 % of probes
//! lost is about 5 % each way). A window holds a fixed ring of [`BUCKETS`] buckets, each a
//! tenth of the window: memory does not grow with traffic.
//!
//! [`Estimate::surely_above`] says whether a loss is above a threshold with confidence (the
//! lower bound of its Wilson score interval at two standard deviations), so that a few unlucky
//! samples of a path that loses little do not move its traffic.
//!
//! A peer keeps a [`Measure`] only while data flows to or from it (boxed: an idle peer pays
//! one pointer).

use super::loss::{SentLog, Tally};
use crate::io::{PathQuality, QualityConfig};
use crate::outbox::Endpoint;
use std::time::{Duration, Instant};

/// Buckets of a window: it slides by a tenth of its length.
pub(crate) const BUCKETS: usize = 10;
/// A probe not answered within this long counts as lost (as long as a direct path may stay
/// unanswered before it is given up, `PATH_TIMEOUT`).
pub const PROBE_LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// Most quality probes in flight per peer (at the fastest default pace, 200 ms apart with a 1 s
/// timeout, about 6 are).
const MAX_PROBES: usize = 12;

/// One of a peer's two paths, as quality sees them: straight over UDP, or through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Leg {
    Direct = 0,
    Relay = 1,
}

impl Leg {
    pub(crate) const BOTH: [Leg; 2] = [Leg::Direct, Leg::Relay];

    /// The leg a message came on.
    pub(crate) fn of(via: crate::outbox::Via) -> Leg {
        match via {
            crate::outbox::Via::Direct(_) => Leg::Direct,
            crate::outbox::Via::Relay => Leg::Relay,
        }
    }

    pub(crate) fn other(self) -> Leg {
        match self {
            Leg::Direct => Leg::Relay,
            Leg::Relay => Leg::Direct,
        }
    }
}

/// What one bucket of a window counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    /// The slot of time it holds (counted in bucket widths from the window's origin); a bucket
    /// whose slot left the window is stale and counts for nothing.
    slot: u32,
    /// Probes resolved (answered or timed out) and, of those, lost.
    probes: u16,
    probes_lost: u16,
    /// Data messages the peer's reports covered, and how many of them it received.
    expected: u32,
    received: u32,
    /// Round-trip times of answered probes: their sum in microseconds, and how many.
    rtt_micros: u32,
    rtts: u16,
}

/// What a window says of its path now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Estimate {
    /// Fraction lost one way, once the window holds enough samples.
    pub(crate) loss: Option<f64>,
    /// How many samples (reported messages and probes) the loss rests on.
    pub(crate) samples: u64,
    /// Mean round-trip time of the probes answered in the window.
    pub(crate) rtt: Option<Duration>,
    /// The path has been measured for a whole window (a judgement may rest on it).
    pub(crate) full: bool,
}

impl Estimate {
    /// Whether the path loses more than `threshold` with confidence: the lower bound of the
    /// Wilson score interval of its loss, at two standard deviations, is at least `threshold`.
    pub(crate) fn surely_above(&self, threshold: f64) -> bool {
        let Some(p) = self.loss else {
            return false;
        };
        let n = self.samples as f64;
        let z2 = 4.0;
        let centre = p + z2 / (2.0 * n);
        let spread = 2.0 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
        (centre - spread) / (1.0 + z2 / n) >= threshold
    }
}

/// Loss and round-trip time of one path over a sliding window. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    buckets: [Bucket; BUCKETS],
    /// Slot 0 starts here.
    origin: Instant,
    /// A tenth of the window.
    width: Duration,
    /// Since when the window measures this path (a new path starts it over).
    since: Instant,
}

impl Window {
    /// An empty window of length `window`, measuring from `now`.
    pub(crate) fn new(window: Duration, now: Instant) -> Window {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Window {
            buckets: [Bucket::default(); BUCKETS],
            origin: now,
            width,
            since: now,
        }
    }

    /// The path changed (a new direct endpoint): forget everything measured.
    pub(crate) fn restart(&mut self, now: Instant) {
        self.buckets = [Bucket::default(); BUCKETS];
        self.origin = now;
        self.since = now;
    }

    /// How long the window is.
    pub(crate) fn length(&self) -> Duration {
        self.width * BUCKETS as u32
    }

    fn slot(&self, now: Instant) -> u32 {
        let n = now.saturating_duration_since(self.origin).as_nanos() / self.width.as_nanos();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The bucket of `now`, emptied first if it still held an older slot.
    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let slot = self.slot(now);
        let b = &mut self.buckets[slot as usize % BUCKETS];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b
    }

    /// A probe on this path was answered (`lost` false) or timed out now.
    pub(crate) fn probe(&mut self, lost: bool, now: Instant) {
        let b = self.bucket(now);
        b.probes = b.probes.saturating_add(1);
        b.probes_lost = b.probes_lost.saturating_add(u16::from(lost));
    }

    /// A probe's round trip on this path took `rtt`.
    pub(crate) fn rtt(&mut self, rtt: Duration, now: Instant) {
        let micros = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
        let b = self.bucket(now);
        b.rtt_micros = b.rtt_micros.saturating_add(micros);
        b.rtts = b.rtts.saturating_add(1);
    }

    /// The peer reported `received` of `expected` data messages sent on this path.
    pub(crate) fn reported(&mut self, expected: u64, received: u64, now: Instant) {
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let b = self.bucket(now);
        b.expected = b.expected.saturating_add(clamp(expected));
        b.received = b.received.saturating_add(clamp(received));
    }

    /// Loss and round-trip time over the window ending now; a loss only with `min_samples`.
    pub(crate) fn estimate(&self, min_samples: u32, now: Instant) -> Estimate {
        let slot = self.slot(now);
        let (mut probes, mut lost, mut expected, mut received) = (0u64, 0u64, 0u64, 0u64);
        let (mut rtt_micros, mut rtts) = (0u64, 0u64);
        for b in &self.buckets {
            if b.slot > slot || slot - b.slot >= BUCKETS as u32 {
                continue;
            }
            probes += u64::from(b.probes);
            lost += u64::from(b.probes_lost);
            expected += u64::from(b.expected);
            received += u64::from(b.received);
            rtt_micros += u64::from(b.rtt_micros);
            rtts += u64::from(b.rtts);
        }
        // Late messages counted in one report and expected in another even out over the
        // window; what is left over is no gain.
        let missing = expected - received.min(expected);
        let min = u64::from(min_samples);
        let (loss, samples) = if expected >= min {
            (Some(missing as f64 / expected as f64), expected)
        } else if expected + probes >= min {
            let round_trip = lost as f64 / probes.max(1) as f64;
            let one_way = 1.0 - (1.0 - round_trip).sqrt();
            let n = expected + probes;
            let loss = (missing as f64 + one_way * probes as f64) / n as f64;
            (Some(loss), n)
        } else {
            (None, expected + probes)
        };
        Estimate {
            loss,
            samples,
            rtt: (rtts > 0).then(|| Duration::from_micros(rtt_micros / rtts)),
            full: now.saturating_duration_since(self.since) >= self.width * BUCKETS as u32,
        }
    }
}

/// A factor from 0.5 to 1.5, fixed by `seed` and `n`, for the gap before the `n`th probe or
/// report. Gaps of exactly one interval would keep probes and reports at one phase of any
/// periodic process on the path; a token-bucket rate limit under bulk traffic has a token only
/// at certain phases, and would drop every one of them (or pass every one). So the gaps vary, as
/// RTCP's do (RFC 3550, 6.3.1), on a deterministic sequence (a run stays repeatable).
pub(crate) fn spread(seed: u32, n: u32) -> f64 {
    // SplitMix64's finaliser over (seed, n).
    let mut x = (u64::from(seed) << 32 | u64::from(n)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    0.5 + (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A quality probe in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u16,
    leg: Leg,
    sent: Instant,
}

/// Everything a peer measures of its paths while traffic flows: a window per leg, the log of
/// what it sent where and the tally of what it received where (for loss reports both ways),
/// its quality probes in flight, and when it last probed each leg and reported.
#[derive(Debug)]
pub(crate) struct Measure {
    windows: [Window; 2],
    /// Our WireGuard data messages, by the leg they went on.
    pub(crate) sent: SentLog,
    /// The peer's WireGuard data messages, by the leg they came on.
    tallies: [Tally; 2],
    probes: [Option<InFlight>; MAX_PROBES],
    last_probe: [Option<Instant>; 2],
    /// Quality probes sent per leg (they pick the spread of the next gap).
    probes_sent: [u32; 2],
    /// Varies the gaps between probes and between reports from peer to peer.
    seed: u32,
    /// When measuring started.
    started: Instant,
    /// When the last loss reports went, if any did.
    pub(crate) reported_at: Option<Instant>,
    /// Number of the next loss report.
    pub(crate) next_report: u16,
    /// The direct endpoint the direct window measures (`None`: none yet, or the path died).
    direct_endpoint: Option<Endpoint>,
    /// Since when the direct path is dead, while it is.
    died_at: Option<Instant>,
    /// When the direct path last came back from an outage.
    returned_at: Option<Instant>,
}

impl Measure {
    /// Nothing measured yet; `seed` (any value: the peer's index) varies the gaps between
    /// probes and reports ([`spread`]).
    pub(crate) fn new(config: &QualityConfig, seed: u32, now: Instant) -> Measure {
        Measure {
            windows: [
                Window::new(config.window, now),
                Window::new(config.window, now),
            ],
            sent: SentLog::default(),
            tallies: [Tally::default(), Tally::default()],
            probes: [None; MAX_PROBES],
            last_probe: [None; 2],
            probes_sent: [0; 2],
            seed,
            started: now,
            reported_at: None,
            next_report: 0,
            direct_endpoint: None,
            died_at: None,
            returned_at: None,
        }
    }

    pub(crate) fn window(&mut self, leg: Leg) -> &mut Window {
        &mut self.windows[leg as usize]
    }

    pub(crate) fn tally(&mut self, leg: Leg) -> &mut Tally {
        &mut self.tallies[leg as usize]
    }

    /// A data message from the peer decrypted after it came on `leg`.
    #[inline]
    pub(crate) fn received(&mut self, leg: Leg, datagram: &[u8]) {
        if let Some((index, counter)) = super::loss::data_header(datagram) {
            self.tally(leg).note(index, counter);
        }
    }

    pub(crate) fn estimate(&self, leg: Leg, config: &QualityConfig, now: Instant) -> Estimate {
        self.windows[leg as usize].estimate(config.min_samples, now)
    }

    /// What status shows of `leg`.
    pub(crate) fn status(&self, leg: Leg, config: &QualityConfig, now: Instant) -> PathQuality {
        let e = self.estimate(leg, config, now);
        PathQuality {
            loss: e.loss,
            rtt: e.rtt,
        }
    }

    /// The direct path is `endpoint` now (`None`: it is dead). A new endpoint starts the direct
    /// window over. So does the same endpoint coming back from an outage: what the window holds
    /// of it (the packets lost until liveness gave the path up) was already acted on by falling
    /// back, and is not the quality of the path that returned; kept, it would send a recovered
    /// path to the relay for a whole hold time right after its return (a firewall that blocked
    /// it for two seconds did that in the relay e2e test). Only a path that dies again within a
    /// window of its last return keeps its window: its outages come in bursts, and the bursts
    /// are its quality.
    pub(crate) fn direct_is(&mut self, endpoint: Option<Endpoint>, now: Instant) {
        let Some(endpoint) = endpoint else {
            if self.direct_endpoint.is_some() && self.died_at.is_none() {
                self.died_at = Some(now);
            }
            return;
        };
        let died_at = self.died_at.take();
        let window = self.windows[Leg::Direct as usize].length();
        match self.direct_endpoint {
            Some(old) if old != endpoint => self.start_direct_over(now),
            Some(_) => {
                if let Some(died) = died_at {
                    let flapping = now.saturating_duration_since(died) < window
                        && self
                            .returned_at
                            .is_some_and(|r| now.saturating_duration_since(r) < window);
                    if !flapping {
                        self.start_direct_over(now);
                    }
                    self.returned_at = Some(now);
                }
            }
            None => {}
        }
        self.direct_endpoint = Some(endpoint);
    }

    /// Forgets what was measured of the direct path, and what was sent on it: the peer's first
    /// loss report after an outage spans the messages sent into it (its span starts after the
    /// last one it reported), and they would count as lost again.
    fn start_direct_over(&mut self, now: Instant) {
        self.windows[Leg::Direct as usize].restart(now);
        self.sent.forget(Leg::Direct);
    }

    /// A quality probe with `id` went on `leg` now. (With all slots taken, the oldest is
    /// forgotten: it counts neither way.)
    pub(crate) fn probe_sent(&mut self, id: u16, leg: Leg, now: Instant) {
        self.last_probe[leg as usize] = Some(now);
        self.probes_sent[leg as usize] = self.probes_sent[leg as usize].wrapping_add(1);
        let slot = match self.probes.iter().position(Option::is_none) {
            Some(free) => free,
            None => self
                .probes
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.map(|p| p.sent))
                .map_or(0, |(i, _)| i),
        };
        self.probes[slot] = Some(InFlight { id, leg, sent: now });
    }

    /// The ack of probe `id` came now: records its round trip on the leg it went on. Returns
    /// whether it was one of ours.
    pub(crate) fn answered(&mut self, id: u16, now: Instant) -> bool {
        let Some(slot) = self
            .probes
            .iter_mut()
            .find(|p| p.is_some_and(|p| p.id == id))
        else {
            return false;
        };
        let Some(p) = slot.take() else {
            return false;
        };
        let w = &mut self.windows[p.leg as usize];
        w.probe(false, now);
        w.rtt(now.saturating_duration_since(p.sent), now);
        true
    }

    /// Probes unanswered for [`PROBE_LOSS_TIMEOUT`] are lost.
    pub(crate) fn expire(&mut self, now: Instant) {
        for slot in &mut self.probes {
            if let Some(p) =
                slot.filter(|p| now.saturating_duration_since(p.sent) >= PROBE_LOSS_TIMEOUT)
            {
                *slot = None;
                self.windows[p.leg as usize].probe(true, now);
            }
        }
    }

    /// When the next probe in flight times out.
    pub(crate) fn expiry(&self) -> Option<Instant> {
        self.probes
            .iter()
            .flatten()
            .map(|p| p.sent + PROBE_LOSS_TIMEOUT)
            .min()
    }

    /// When `leg` last had a quality probe.
    pub(crate) fn last_probe(&self, leg: Leg) -> Option<Instant> {
        self.last_probe[leg as usize]
    }

    /// When `leg`, probed about every `every` ([`spread`]), is due next.
    pub(crate) fn probe_at(&self, leg: Leg, every: Duration, now: Instant) -> Instant {
        let n = self.probes_sent[leg as usize].wrapping_mul(2) | leg as u32;
        let gap = every.mul_f64(spread(self.seed, n));
        self.last_probe[leg as usize].map_or(now, |t| (t + gap).max(now))
    }

    /// When loss reports are due: about a report interval ([`spread`]) after the last ones, if
    /// data came since.
    pub(crate) fn report_at(
        &self,
        last_data_rx: Option<Instant>,
        config: &QualityConfig,
    ) -> Option<Instant> {
        let gap = config
            .report_interval
            .mul_f64(spread(!self.seed, u32::from(self.next_report)));
        let data_since = match self.reported_at {
            Some(t) => last_data_rx.is_some_and(|d| d > t),
            None => last_data_rx.is_some(),
        };
        data_since.then(|| self.reported_at.unwrap_or(self.started) + gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn window(t0: Instant) -> Window {
        Window::new(Duration::from_secs(10), t0)
    }

    #[test]
    fn an_empty_window_knows_nothing() {
        let t0 = Instant::now();
        let w = window(t0);
        let e = w.estimate(20, t0 + SEC);
        assert_eq!(e.loss, None);
        assert_eq!(e.rtt, None);
        assert!(!e.full);
        assert!(w.estimate(20, t0 + 10 * SEC).full, "full after one window");
    }

    #[test]
    fn probes_give_loss_and_rtt() {
        let t0 = Instant::now();
        let mut w = window(t0);
        for i in 0..20u32 {
            let now = t0 + i * 100 * MS;
            let lost = i % 5 == 0;
            w.probe(lost, now);
            if !lost {
                w.rtt(Duration::from_millis(20 + u64::from(i % 2) * 20), now);
            }
        }
        let e = w.estimate(20, t0 + 2 * SEC);
        let one_way = 1.0 - 0.8f64.sqrt();
        assert!((e.loss.unwrap() - one_way).abs() < 1e-9, "{e:?}");
        assert!(
            (0.105..0.106).contains(&one_way),
            "a fifth of round trips: a tenth each way"
        );
        assert_eq!(e.samples, 20);
        assert_eq!(e.rtt, Some(Duration::from_millis(30)));
        assert_eq!(w.estimate(21, t0 + 2 * SEC).loss, None, "too few samples");
    }

    #[test]
    fn enough_reported_data_outweighs_probes() {
        let t0 = Instant::now();
        let mut w = window(t0);
        // Sparse probes all pass a rate limit that drops half of the bulk.
        for i in 0..10u32 {
            w.probe(false, t0 + i * 200 * MS);
        }
        w.reported(1000, 500, t0 + SEC);
        assert_eq!(w.estimate(20, t0 + 2 * SEC).loss, Some(0.5));
        // With few reported messages, both count.
        let mut w = window(t0);
        for i in 0..10u32 {
            w.probe(i < 2, t0 + i * 200 * MS);
        }
        w.reported(10, 8, t0 + SEC);
        let e = w.estimate(20, t0 + 2 * SEC);
        let want = (2.0 + 10.0 * (1.0 - 0.8f64.sqrt())) / 20.0;
        assert!((e.loss.unwrap() - want).abs() < 1e-9, "{e:?}");
        assert_eq!(e.samples, 20);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut w = window(t0);
        w.reported(100, 50, t0);
        assert_eq!(w.estimate(20, t0 + 9 * SEC).loss, Some(0.5));
        w.reported(100, 100, t0 + 9 * SEC);
        assert_eq!(w.estimate(20, t0 + 9 * SEC).loss, Some(0.25));
        assert_eq!(
            w.estimate(20, t0 + 10 * SEC).loss,
            Some(0.0),
            "the first second has left"
        );
        assert_eq!(w.estimate(20, t0 + 19 * SEC).loss, None, "all of it has");
        // A bucket is reused for a later slot without its old counts.
        w.reported(40, 40, t0 + 20 * SEC);
        assert_eq!(w.estimate(20, t0 + 20 * SEC).loss, Some(0.0));
    }

    #[test]
    fn late_messages_even_out_and_never_make_a_gain() {
        let t0 = Instant::now();
        let mut w = window(t0);
        // One message counted a report late.
        w.reported(50, 49, t0);
        w.reported(50, 51, t0 + SEC);
        assert_eq!(w.estimate(20, t0 + SEC).loss, Some(0.0));
        let mut w = window(t0);
        w.reported(50, 80, t0);
        assert_eq!(w.estimate(20, t0).loss, Some(0.0));
    }

    #[test]
    fn a_restart_forgets_the_old_path() {
        let t0 = Instant::now();
        let mut w = window(t0);
        w.reported(100, 0, t0);
        w.restart(t0 + 20 * SEC);
        let e = w.estimate(1, t0 + 21 * SEC);
        assert_eq!(e.loss, None);
        assert!(!e.full);
        assert!(w.estimate(1, t0 + 30 * SEC).full);
    }

    #[test]
    fn a_loss_is_surely_above_a_threshold_only_with_enough_samples() {
        let e = |loss: f64, samples: u64| Estimate {
            loss: Some(loss),
            samples,
            rtt: None,
            full: true,
        };
        assert!(e(0.2, 1000).surely_above(0.1));
        assert!(e(0.13, 1000).surely_above(0.1));
        assert!(!e(0.11, 1000).surely_above(0.1), "within the noise");
        assert!(!e(0.2, 25).surely_above(0.1), "5 of 25");
        assert!(e(0.5, 40).surely_above(0.1));
        assert!(!e(0.05, 100_000).surely_above(0.1));
        let unknown = Estimate {
            loss: None,
            ..e(0.0, 3)
        };
        assert!(!unknown.surely_above(0.0));
    }

    #[test]
    fn memory_does_not_grow_with_traffic() {
        let t0 = Instant::now();
        let mut w = window(t0);
        for i in 0..100_000u32 {
            w.reported(1_000_000, 999_000, t0 + i * MS);
        }
        let e = w.estimate(20, t0 + 100 * SEC);
        let loss = e.loss.unwrap_or(1.0);
        assert!((loss - 0.001).abs() < 1e-6, "{loss}");
        assert_eq!(std::mem::size_of::<Window>(), std::mem::size_of_val(&w));
        assert!(std::mem::size_of::<Window>() <= 320);
    }

    #[test]
    fn quality_probes_are_matched_and_expire() {
        let t0 = Instant::now();
        let config = QualityConfig {
            min_samples: 1,
            ..QualityConfig::default()
        };
        let mut m = Measure::new(&config, 7, t0);
        m.probe_sent(0x8001, Leg::Relay, t0);
        m.probe_sent(0x8002, Leg::Direct, t0);
        m.probe_sent(0x8003, Leg::Direct, t0 + 100 * MS);
        assert!(m.answered(0x8001, t0 + 40 * MS));
        assert!(!m.answered(0x8001, t0 + 50 * MS), "answered once");
        assert!(!m.answered(0x9999, t0 + 50 * MS), "not ours");
        assert_eq!(m.expiry(), Some(t0 + PROBE_LOSS_TIMEOUT));
        m.expire(t0 + PROBE_LOSS_TIMEOUT);
        assert_eq!(m.expiry(), Some(t0 + 100 * MS + PROBE_LOSS_TIMEOUT));
        let now = t0 + 2 * SEC;
        m.expire(now);
        assert_eq!(m.expiry(), None, "none in flight");
        let relay = m.estimate(Leg::Relay, &config, now);
        assert_eq!(relay.loss, Some(0.0));
        assert_eq!(relay.rtt, Some(Duration::from_millis(40)));
        assert_eq!(
            m.estimate(Leg::Direct, &config, now).loss,
            Some(1.0),
            "every probe lost"
        );
        // More in flight than slots: the oldest is forgotten.
        for i in 0..(MAX_PROBES as u16 + 3) {
            m.probe_sent(i, Leg::Direct, now + u32::from(i) * MS);
        }
        assert!(!m.answered(0, now + SEC / 2), "forgotten");
        assert!(m.answered(MAX_PROBES as u16 + 2, now + SEC / 2));
    }

    /// What a peer carries while traffic flows (an idle one: a null pointer).
    #[test]
    fn the_measurements_of_a_busy_peer_stay_small() {
        let size = std::mem::size_of::<Measure>();
        eprintln!("Measure: {size} bytes");
        assert!(size <= 2_560, "{size} bytes");
        assert_eq!(std::mem::size_of::<Option<Box<Measure>>>(), 8);
    }

    #[test]
    fn gaps_spread_evenly_and_repeatably() {
        let factors: Vec<f64> = (0..10_000).map(|n| spread(42, n)).collect();
        assert!(factors.iter().all(|f| (0.5..1.5).contains(f)));
        let mean = factors.iter().sum::<f64>() / factors.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        let low = factors.iter().filter(|f| **f < 1.0).count();
        assert!((4_800..5_200).contains(&low), "{low}");
        assert_eq!(spread(42, 7), spread(42, 7));
        assert_ne!(spread(42, 7), spread(43, 7));
    }

    #[test]
    fn a_new_direct_endpoint_starts_its_window_over() {
        let t0 = Instant::now();
        let config = QualityConfig::default();
        let mut m = Measure::new(&config, 7, t0);
        let a = Endpoint {
            socket: crate::SocketId::MAIN,
            addr: "192.0.2.1:1".parse().unwrap(),
        };
        let b = Endpoint {
            addr: "192.0.2.2:1".parse().unwrap(),
            ..a
        };
        m.direct_is(Some(a), t0);
        m.window(Leg::Direct).reported(100, 50, t0);
        // The same endpoint, still alive: the window goes on.
        m.direct_is(Some(a), t0 + SEC);
        assert_eq!(m.estimate(Leg::Direct, &config, t0 + SEC).loss, Some(0.5));
        // Dead for a second and back: the outage was acted on, the window starts over.
        m.direct_is(None, t0 + SEC);
        m.direct_is(Some(a), t0 + 2 * SEC);
        assert_eq!(m.estimate(Leg::Direct, &config, t0 + 2 * SEC).loss, None);
        m.window(Leg::Direct).reported(100, 50, t0 + 2 * SEC);
        // Dead again within a window of that return (outages in bursts): the window goes on.
        m.direct_is(None, t0 + 3 * SEC);
        m.direct_is(Some(a), t0 + 4 * SEC);
        assert_eq!(
            m.estimate(Leg::Direct, &config, t0 + 4 * SEC).loss,
            Some(0.5)
        );
        // Dead for a whole window (the probes of the outage fail) and back: the window starts
        // over, the outage is not its quality.
        let back = t0 + 4 * SEC + config.window;
        m.direct_is(None, t0 + 4 * SEC);
        m.window(Leg::Direct).reported(100, 0, back - SEC);
        m.direct_is(Some(a), back);
        assert_eq!(m.estimate(Leg::Direct, &config, back).loss, None);
        m.window(Leg::Direct).reported(100, 50, back);
        // Another endpoint: over again.
        m.direct_is(Some(b), back + SEC);
        assert_eq!(m.estimate(Leg::Direct, &config, back + SEC).loss, None);
    }
}
