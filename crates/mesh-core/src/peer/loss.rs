//! Loss read from the data itself: WireGuard numbers every data message of a session (the
//! counter in bytes 8..16 of a type-4 message), so the receiver of a stream sees what it did not
//! get, and tells the sender (`mesh_proto::tunnel::LossReport`).
//!
//! - [`Tally`] (receiver side, one per [`Leg`]): the session it counts (the receiver index in
//!   bytes 4..8), the span of counters seen since the last report and how many messages arrived.
//!   It reads a message only after it decrypted: a forged counter never reaches it.
//! - [`SentLog`] (sender side): which counters went on which leg, as runs of consecutive
//!   counters in a fixed ring. A report spans counters of both legs (a probe of the relay in the
//!   middle of direct data, keepalives sprayed at candidates); only those the log has on the
//!   report's leg were expected there. So the leg that carries few messages (probes) is judged
//!   on those alone, and messages sent nowhere in particular (candidate probes, birthday
//!   sprays: not logged) are expected nowhere. Path MTU probes, meant to be lost when too
//!   large, count on neither side.
//!
//! Reordering: a message that arrives after a later one still counts as received, in the
//! report it arrives in; its counter belongs to the previous report's span. Over a window the
//! two even out ([`super::quality::Window`] never turns a surplus into a gain). Rekeys: a new
//! receiver index starts a tally over; messages of the session before are ignored from then
//! on. Path switches: the log and the tallies are per leg, so a switch needs nothing.

use super::quality::Leg;
use mesh_proto::tunnel::{LossReport, ReportPath, MAX_REPORT_SPAN};

/// Runs kept in a [`SentLog`]: about two seconds of the busiest mix (data on one leg with a
/// probe of the other every 200 ms, and the peer's probes answered) fits, and a report spans
/// about one.
pub(crate) const RUNS: usize = 64;

/// The receiver index and counter of a WireGuard data message (type 4), or `None` for any
/// other message.
#[inline]
pub(crate) fn data_header(datagram: &[u8]) -> Option<(u32, u64)> {
    let [4, _, _, _, i0, i1, i2, i3, c0, c1, c2, c3, c4, c5, c6, c7] =
        *datagram.first_chunk::<16>()?
    else {
        return None;
    };
    Some((
        u32::from_le_bytes([i0, i1, i2, i3]),
        u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
    ))
}

impl From<ReportPath> for Leg {
    fn from(p: ReportPath) -> Leg {
        match p {
            ReportPath::Direct => Leg::Direct,
            ReportPath::Relay => Leg::Relay,
        }
    }
}

impl From<Leg> for ReportPath {
    fn from(l: Leg) -> ReportPath {
        match l {
            Leg::Direct => ReportPath::Direct,
            Leg::Relay => ReportPath::Relay,
        }
    }
}

/// What a receiver counted on one leg since its last report. See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// The session counted.
    index: Option<u32>,
    /// The session before it: its late messages are ignored, not taken for a new one.
    previous: Option<u32>,
    /// First counter of the next report's span.
    first: u64,
    /// Highest counter seen (the span is empty while below `first`).
    last: u64,
    /// Messages that arrived since the last report.
    received: u32,
}

impl Tally {
    /// A data message of session `index` with `counter` arrived (and decrypted).
    #[inline]
    pub(crate) fn note(&mut self, index: u32, counter: u64) {
        if self.index != Some(index) {
            self.other_session(index, counter);
            return;
        }
        if counter > self.last {
            self.last = counter;
        }
        self.received = self.received.saturating_add(1);
    }

    /// The first message of another session than the one counted: a new session starts the
    /// tally over; the one before is ignored.
    #[cold]
    fn other_session(&mut self, index: u32, counter: u64) {
        if self.previous == Some(index) {
            return;
        }
        *self = Tally {
            index: Some(index),
            previous: self.index,
            first: counter,
            last: counter,
            received: 1,
        };
    }

    /// The report of what arrived since the last one, if the span moved on; the next span
    /// starts after it. (Messages that only filled in the old span stay counted for the next.)
    pub(crate) fn take(&mut self, leg: Leg) -> Option<LossReport> {
        let index = self.index?;
        if self.last < self.first {
            return None;
        }
        // Within the wire's bounds whatever came (a jump past 2^24 counters only shortens
        // the span to its end).
        let first = self
            .first
            .max(self.last.saturating_sub(MAX_REPORT_SPAN - 1));
        let received = u64::from(self.received).min(MAX_REPORT_SPAN) as u32;
        let report = LossReport {
            path: leg.into(),
            index,
            first,
            last: self.last,
            received,
        };
        self.first = self.last.saturating_add(1);
        self.received = 0;
        Some(report)
    }
}

/// Counters `first..first + len` of session `index`, all sent on one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    index: u32,
    /// The length (below [`Run::MAX_LEN`]) and, in the top bit, the leg.
    len_leg: u32,
}

impl Run {
    const RELAY: u32 = 1 << 31;
    const MAX_LEN: u64 = (Run::RELAY - 1) as u64;
    const EMPTY: Run = Run {
        first: 0,
        index: 0,
        len_leg: 0,
    };

    fn new(leg: Leg, index: u32, first: u64, len: u64) -> Run {
        let leg_bit = match leg {
            Leg::Direct => 0,
            Leg::Relay => Run::RELAY,
        };
        Run {
            first,
            index,
            len_leg: leg_bit | len.min(Run::MAX_LEN) as u32,
        }
    }

    fn len(&self) -> u64 {
        u64::from(self.len_leg & !Run::RELAY)
    }

    fn leg(&self) -> Leg {
        if self.len_leg & Run::RELAY == 0 {
            Leg::Direct
        } else {
            Leg::Relay
        }
    }

    /// How many of `first..=last` of session `index` on `leg` it holds.
    fn overlap(&self, leg: Leg, index: u32, first: u64, last: u64) -> u64 {
        if self.len() == 0 || self.leg() != leg || self.index != index {
            return 0;
        }
        let end = self.first + self.len() - 1;
        let (from, to) = (self.first.max(first), end.min(last));
        if from > to {
            0
        } else {
            to - from + 1
        }
    }
}

/// Which of our data messages went on which leg: the run being extended, and the runs before
/// it in a ring of [`RUNS`]. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct SentLog {
    /// The open run: its leg, session, first counter, and the counter that extends it.
    leg: Leg,
    index: u32,
    first: u64,
    next: u64,
    /// Closed runs, the newest at `newest`.
    runs: [Run; RUNS],
    newest: usize,
    /// Per leg, the session and last counter of the newest run that left the ring: a report
    /// reaching back into it cannot be judged.
    evicted: [Option<(u32, u64)>; 2],
}

impl Default for SentLog {
    fn default() -> Self {
        SentLog {
            leg: Leg::Direct,
            index: 0,
            first: 0,
            next: 0,
            runs: [Run::EMPTY; RUNS],
            newest: 0,
            evicted: [None; 2],
        }
    }
}

impl SentLog {
    /// Data message `datagram` (sealed) goes on `leg`; other messages are not logged.
    #[inline]
    pub(crate) fn note_message(&mut self, leg: Leg, datagram: &[u8]) {
        if let Some((index, counter)) = data_header(datagram) {
            self.note(leg, index, counter);
        }
    }

    /// Counter `counter` of session `index` went on `leg`.
    #[inline]
    pub(crate) fn note(&mut self, leg: Leg, index: u32, counter: u64) {
        // The data path's case: the next message of the open run.
        if counter == self.next && leg == self.leg && index == self.index {
            self.next += 1;
        } else {
            self.start(leg, index, counter);
        }
    }

    /// Closes the open run into the ring and opens another at `counter`.
    #[cold]
    fn start(&mut self, leg: Leg, index: u32, counter: u64) {
        let mut len = self.next.saturating_sub(self.first);
        let mut first = self.first;
        while len > 0 {
            // (A run longer than a ring entry holds takes several.)
            let part = len.min(Run::MAX_LEN);
            self.push(Run::new(self.leg, self.index, first, part));
            first += part;
            len -= part;
        }
        self.leg = leg;
        self.index = index;
        self.first = counter;
        self.next = counter.saturating_add(1);
    }

    fn push(&mut self, run: Run) {
        self.newest = (self.newest + 1) % RUNS;
        let old = self.runs[self.newest];
        if old.len() != 0 {
            self.evicted[old.leg() as usize] = Some((old.index, old.first + old.len() - 1));
        }
        self.runs[self.newest] = run;
    }

    /// Forgets what went on `leg` so far: those messages are expected nowhere from now on.
    pub(crate) fn forget(&mut self, leg: Leg) {
        if self.leg == leg {
            self.first = self.next;
        }
        for run in &mut self.runs {
            if run.len() != 0 && run.leg() == leg {
                *run = Run::EMPTY;
            }
        }
        self.evicted[leg as usize] = None;
    }

    /// How many of the counters `first..=last` of session `index` went on `leg`, or `None` when
    /// the log no longer holds all of that span.
    pub(crate) fn expected(&self, leg: Leg, index: u32, first: u64, last: u64) -> Option<u64> {
        if self.evicted[leg as usize].is_some_and(|(i, end)| i == index && end >= first) {
            return None;
        }
        let open = Run::new(
            self.leg,
            self.index,
            self.first,
            self.next.saturating_sub(self.first),
        );
        let sum = self
            .runs
            .iter()
            .chain(std::iter::once(&open))
            .map(|r| r.overlap(leg, index, first, last))
            .sum();
        Some(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(index: u32, counter: u64) -> Vec<u8> {
        let mut m = vec![0u8; 32];
        m[0] = 4;
        m[4..8].copy_from_slice(&index.to_le_bytes());
        m[8..16].copy_from_slice(&counter.to_le_bytes());
        m
    }

    #[test]
    fn the_header_is_read_from_data_messages_only() {
        assert_eq!(
            data_header(&message(0x0102_0304, 77)),
            Some((0x0102_0304, 77))
        );
        let mut init = message(1, 1);
        init[0] = 1;
        assert_eq!(data_header(&init), None);
        assert_eq!(data_header(&message(1, 1)[..15]), None, "short");
        assert_eq!(data_header(&[]), None);
    }

    #[test]
    fn a_tally_counts_gaps_and_late_messages() {
        let mut t = Tally::default();
        assert_eq!(t.take(Leg::Direct), None, "nothing yet");
        for c in [10, 11, 13, 14, 12, 17] {
            t.note(7, c);
        }
        let r = t.take(Leg::Direct).unwrap();
        assert_eq!(
            (r.path, r.index, r.first, r.last, r.received),
            (ReportPath::Direct, 7, 10, 17, 6),
            "15 and 16 missing"
        );
        assert_eq!(t.take(Leg::Direct), None, "the span did not move");
        // 16 comes late: counted in the next report, whose span starts at 18.
        t.note(7, 16);
        assert_eq!(t.take(Leg::Direct), None);
        t.note(7, 18);
        let r = t.take(Leg::Relay).unwrap();
        assert_eq!(
            (r.path, r.first, r.last, r.received),
            (ReportPath::Relay, 18, 18, 2)
        );
    }

    #[test]
    fn a_rekey_starts_over_and_ignores_the_old_session() {
        let mut t = Tally::default();
        t.note(7, 100);
        t.note(7, 101);
        t.note(9, 0);
        t.note(7, 102);
        t.note(9, 1);
        let r = t.take(Leg::Direct).unwrap();
        assert_eq!((r.index, r.first, r.last, r.received), (9, 0, 1, 2));
        // A third session: the second one's stragglers are ignored now.
        t.note(11, 5);
        t.note(9, 2);
        let r = t.take(Leg::Direct).unwrap();
        assert_eq!((r.index, r.first, r.last, r.received), (11, 5, 5, 1));
    }

    #[test]
    fn a_report_stays_within_the_wire_bounds() {
        let mut t = Tally::default();
        t.note(1, 0);
        t.note(1, 3 * MAX_REPORT_SPAN);
        let r = t.take(Leg::Direct).unwrap();
        assert_eq!(r.last - r.first, MAX_REPORT_SPAN - 1);
        assert_eq!(r.received, 2);
    }

    #[test]
    fn the_log_knows_what_went_where() {
        let mut log = SentLog::default();
        for c in 0..100 {
            // Every tenth message a probe of the relay; 50..53 sprayed at candidates (not
            // logged).
            if (50..53).contains(&c) {
                continue;
            }
            let leg = if c % 10 == 5 { Leg::Relay } else { Leg::Direct };
            log.note_message(leg, &message(3, c));
        }
        assert_eq!(log.expected(Leg::Direct, 3, 0, 99), Some(100 - 10 - 3));
        assert_eq!(log.expected(Leg::Relay, 3, 0, 99), Some(10));
        assert_eq!(log.expected(Leg::Relay, 3, 40, 60), Some(2), "45 and 55");
        assert_eq!(
            log.expected(Leg::Direct, 3, 48, 54),
            Some(4),
            "48, 49, 53 and 54"
        );
        assert_eq!(log.expected(Leg::Direct, 3, 200, 300), Some(0));
        assert_eq!(
            log.expected(Leg::Direct, 4, 0, 99),
            Some(0),
            "another session"
        );
    }

    #[test]
    fn messages_sent_into_an_outage_are_forgotten_when_the_path_returns() {
        let mut log = SentLog::default();
        // 0..50 direct (the last 20 into a blocked path), 50..60 on the relay after the
        // fallback, 60..70 direct again; the path returned at 60, and the log forgot.
        for c in 0..60 {
            log.note(if c < 50 { Leg::Direct } else { Leg::Relay }, 1, c);
        }
        log.forget(Leg::Direct);
        for c in 60..70 {
            log.note(Leg::Direct, 1, c);
        }
        // The peer's first report since 29 spans the outage: only 60..70 were expected.
        assert_eq!(log.expected(Leg::Direct, 1, 30, 69), Some(10));
        assert_eq!(log.expected(Leg::Relay, 1, 30, 69), Some(10), "relay kept");
        // Forgetting the leg of the open run closes it.
        log.forget(Leg::Direct);
        log.note(Leg::Direct, 1, 70);
        assert_eq!(log.expected(Leg::Direct, 1, 0, 70), Some(1));
    }

    #[test]
    fn a_report_into_forgotten_runs_is_not_judged() {
        let mut log = SentLog::default();
        // Alternating legs: every message its own run.
        for c in 0..(RUNS as u64 + 10) {
            let leg = if c % 2 == 0 { Leg::Direct } else { Leg::Relay };
            log.note(leg, 1, c);
        }
        assert_eq!(log.expected(Leg::Direct, 1, 0, 20), None, "forgotten");
        assert_eq!(log.expected(Leg::Relay, 1, 0, 20), None, "forgotten");
        let newest = RUNS as u64 + 9;
        assert_eq!(log.expected(Leg::Relay, 1, newest - 9, newest), Some(5));
        // Another session is unaffected by this one's eviction.
        log.note(Leg::Direct, 2, 0);
        assert_eq!(log.expected(Leg::Direct, 2, 0, 0), Some(1));
    }

    #[test]
    fn a_long_run_stays_one_entry() {
        let mut log = SentLog::default();
        for c in 0..200_000u64 {
            log.note(Leg::Direct, 1, c);
        }
        log.note(Leg::Relay, 1, 200_000);
        assert_eq!(log.expected(Leg::Direct, 1, 0, 199_999), Some(200_000));
        assert_eq!(log.expected(Leg::Relay, 1, 0, 200_000), Some(1));
        assert_eq!(log.runs.iter().filter(|r| r.len() != 0).count(), 1);
        // (Packed: the ring is 1 KiB.)
        assert_eq!(std::mem::size_of::<Run>(), 16);
    }
}
