//! Path MTU discovery inside the tunnel.
//!
//! The search sends probes, in-tunnel messages of the format in [`mesh_proto::tunnel`]
//! (re-exported here), each padded with zeros to the size it probes before encryption, so the
//! datagram on the wire is as large as a full inner packet of that size. The peer's node
//! answers every probe with a small ack. The largest size that gets an ack is the path MTU for
//! inner packets. The outer datagram is sent with DF set (quinn-udp sets it), so a too-small
//! link drops it instead of fragmenting it.
//!
//! [`Search`] is the per-peer state machine: it first tries the configured MTU, then searches
//! down by bisection, giving each size [`ATTEMPTS`] tries spaced [`PROBE_TIMEOUT`] apart.

use mesh_proto::tunnel::{internet_checksum, write_ipv4_header, IPV4_HEADER};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub use mesh_proto::tunnel::{build, build_into, parse, Kind, Message, MAGIC, PROTO};

/// IPv4's minimum MTU for mesh: the search never goes below it.
pub const MIN_MTU: u16 = 1280;
/// How long to wait for an ack.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Tries per size before it counts as too large.
pub const ATTEMPTS: u8 = 3;
/// Search again this long after a result (paths change).
pub const RESEARCH_AFTER: Duration = Duration::from_secs(600);
/// The search stops when the bracket is this narrow.
const RESOLUTION: u16 = 8;

/// Whether an IPv4 packet has Don't Fragment set.
pub fn dont_fragment(packet: &[u8]) -> bool {
    packet.len() > 6 && packet[6] & 0x40 != 0
}

/// An ICMP "fragmentation needed" (type 3 code 4) telling the sender of `original` that the
/// next hop carries at most `mtu` bytes, as a router would send it. It goes back into the TUN
/// device, so the sender's kernel lowers its path MTU at once instead of waiting on a timeout.
pub fn frag_needed(original: &[u8], mtu: u16, from: Ipv4Addr) -> Option<Vec<u8>> {
    let (src, _) = crate::packet::ipv4_addrs(original)?;
    let ihl = usize::from(original[0] & 0x0f) * 4;
    let quoted = &original[..original.len().min(ihl + 8)];
    let total = IPV4_HEADER + 8 + quoted.len();
    let mut p = vec![0u8; total];
    let (header, icmp) = p.split_first_chunk_mut::<IPV4_HEADER>()?;
    write_ipv4_header(header, total as u16, 1, from, src);
    icmp[0] = 3;
    icmp[1] = 4;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(quoted);
    let c = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    size: u16,
    id: u16,
    attempts: u8,
    sent_at: Instant,
}

/// Path MTU search for one peer.
#[derive(Debug, Clone)]
pub struct Search {
    target: u16,
    /// Largest size known (or assumed, for MIN_MTU) to pass.
    lo: u16,
    /// Smallest size known to fail.
    hi: u16,
    in_flight: Option<InFlight>,
    next_id: u16,
    result: Option<u16>,
    next_search: Option<Instant>,
}

impl Search {
    /// A search for inner packets up to `target` bytes (the interface MTU).
    pub fn new(target: u16) -> Search {
        Search {
            target: target.max(MIN_MTU),
            lo: MIN_MTU,
            hi: target.max(MIN_MTU) + 1,
            in_flight: None,
            next_id: 1,
            result: None,
            next_search: None,
        }
    }

    /// The last result: the largest inner packet the path carries.
    pub fn result(&self) -> Option<u16> {
        self.result
    }

    /// Starts (or restarts) a search now.
    pub fn start(&mut self, now: Instant) {
        self.lo = MIN_MTU;
        self.hi = self.target + 1;
        self.in_flight = None;
        self.next_search = Some(now);
    }

    fn next_size(&self) -> u16 {
        if self.hi > self.target {
            self.target
        } else {
            self.lo + (self.hi - self.lo) / 2
        }
    }

    /// A probe to send now, if any: (id, size).
    pub fn poll_probe(&mut self, now: Instant) -> Option<(u16, u16)> {
        match self.in_flight {
            Some(f) if now.duration_since(f.sent_at) < PROBE_TIMEOUT => None,
            Some(f) if f.attempts < ATTEMPTS => {
                let id = self.take_id();
                self.in_flight = Some(InFlight {
                    id,
                    attempts: f.attempts + 1,
                    sent_at: now,
                    ..f
                });
                Some((id, f.size))
            }
            Some(f) => {
                // This size does not pass.
                self.hi = f.size;
                self.in_flight = None;
                if self.hi - self.lo <= RESOLUTION {
                    self.conclude(now);
                    return None;
                }
                self.send_next(now)
            }
            None if self.next_search.is_some_and(|t| t <= now) => {
                self.next_search = None;
                self.send_next(now)
            }
            None => None,
        }
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        // Ids from 0x8000 up belong to pings (see `node::PING_IDS`).
        self.next_id = if self.next_id >= 0x7fff {
            1
        } else {
            self.next_id + 1
        };
        id
    }

    fn send_next(&mut self, now: Instant) -> Option<(u16, u16)> {
        let size = self.next_size();
        let id = self.take_id();
        self.in_flight = Some(InFlight {
            size,
            id,
            attempts: 1,
            sent_at: now,
        });
        Some((id, size))
    }

    fn conclude(&mut self, now: Instant) {
        self.result = Some(self.lo);
        self.in_flight = None;
        self.next_search = Some(now + RESEARCH_AFTER);
    }

    /// An ack arrived. Returns the new result when the search concluded.
    pub fn on_ack(&mut self, id: u16, size: u16, now: Instant) -> Option<u16> {
        let f = self.in_flight?;
        // Acks of earlier attempts at the same size count too.
        if size != f.size || id > f.id {
            return None;
        }
        self.lo = size;
        self.in_flight = None;
        if size >= self.target || self.hi - self.lo <= RESOLUTION {
            self.conclude(now);
            return self.result;
        }
        self.next_search = Some(now);
        None
    }

    /// When [`Search::poll_probe`] may have something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.in_flight {
            Some(f) => Some(f.sent_at + PROBE_TIMEOUT),
            None => self.next_search,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    #[test]
    fn frag_needed_is_a_valid_icmp_for_the_sender() {
        let mut orig = vec![0u8; 1420];
        let header = orig.first_chunk_mut().unwrap();
        write_ipv4_header(header, 1420, 6, A, B);
        let icmp = frag_needed(&orig, 1340, A).unwrap();
        assert_eq!(icmp.len(), 20 + 8 + 28);
        assert_eq!(&icmp[16..20], &A.octets(), "addressed to the sender");
        assert_eq!((icmp[20], icmp[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1340);
        assert_eq!(internet_checksum(&icmp[..20]), 0);
        assert_eq!(internet_checksum(&icmp[20..]), 0);
        assert_eq!(&icmp[28..], &orig[..28], "quotes header + 8 bytes");
        assert!(dont_fragment(&orig));
    }

    /// Runs a search against a path that carries inner packets up to `limit`.
    fn search(target: u16, limit: u16) -> (u16, u32) {
        let mut s = Search::new(target);
        let mut now = Instant::now();
        s.start(now);
        let mut probes = 0;
        for _ in 0..500 {
            if let Some((id, size)) = s.poll_probe(now) {
                probes += 1;
                if size <= limit {
                    if let Some(r) = s.on_ack(id, size, now) {
                        return (r, probes);
                    }
                    continue;
                }
            }
            if let Some(r) = s.result() {
                return (r, probes);
            }
            now = s.poll_timeout().unwrap_or(now + PROBE_TIMEOUT).max(now);
        }
        panic!("search did not finish");
    }

    #[test]
    fn full_path_confirmed_with_one_probe() {
        assert_eq!(search(1420, 1500), (1420, 1));
    }

    #[test]
    fn smaller_path_found_within_resolution() {
        for limit in [1280u16, 1300, 1340, 1372, 1400, 1419] {
            let (r, probes) = search(1420, limit);
            assert!(
                r <= limit && limit - r <= RESOLUTION,
                "limit {limit} gave {r}"
            );
            assert!(probes <= 30, "{probes} probes");
        }
    }
}
