//! Path MTU discovery inside the tunnel.
//!
//! A probe is a tiny IPv4 packet (protocol 253, reserved for experiments by RFC 3692) from this
//! node's overlay address to the peer's, carrying [`MAGIC`], a kind, an id and the probed size.
//! It is padded with zeros to the probed size before encryption, so the datagram on the wire
//! is as large as a full inner packet of that size. The receiving boringtun trims the padding
//! back to the IP total length, and the peer's node answers every probe with a small ack. The
//! largest size that gets an ack is the path MTU for inner packets. The outer datagram is sent
//! with DF set (quinn-udp sets it), so a too-small link drops it instead of fragmenting it.
//!
//! [`Search`] is the per-peer state machine: it first tries the configured MTU, then searches
//! down by bisection, giving each size [`ATTEMPTS`] tries spaced [`PROBE_TIMEOUT`] apart.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// IP protocol number of probes (RFC 3692 experimental).
pub const PROTO: u8 = 253;
/// Marks a mesh probe.
pub const MAGIC: &[u8; 8] = b"meshpmtu";
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
const HEADER: usize = 20;
const BODY: usize = MAGIC.len() + 1 + 2 + 2;

/// Probe or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "Did this size arrive?"
    Probe = 1,
    /// "It did."
    Ack = 2,
    /// "I am starting a birthday attempt toward you now: join it" (see [`crate::birthday`]).
    /// Not a path MTU message, but the same small in-tunnel format.
    Birthday = 3,
}

/// A parsed probe packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Probe or ack.
    pub kind: Kind,
    /// Matches an ack to its probe.
    pub id: u16,
    /// Size that was probed.
    pub size: u16,
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_header(p: &mut [u8], total_len: u16, proto: u8, src: Ipv4Addr, dst: Ipv4Addr) {
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total_len.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..HEADER]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Builds a probe or ack, padded with zeros to `pad_to` bytes (at least its own length).
pub fn build(src: Ipv4Addr, dst: Ipv4Addr, msg: Message, pad_to: usize) -> Vec<u8> {
    let len = HEADER + BODY;
    let mut p = vec![0u8; pad_to.max(len)];
    ipv4_header(&mut p, len as u16, PROTO, src, dst);
    let b = &mut p[HEADER..len];
    b[..8].copy_from_slice(MAGIC);
    b[8] = msg.kind as u8;
    b[9..11].copy_from_slice(&msg.id.to_be_bytes());
    b[11..13].copy_from_slice(&msg.size.to_be_bytes());
    p
}

/// Recognises a probe or ack; `None` for any other packet.
pub fn parse(packet: &[u8]) -> Option<Message> {
    if packet.len() < HEADER + BODY || packet[0] != 0x45 || packet[9] != PROTO {
        return None;
    }
    let b = &packet[HEADER..HEADER + BODY];
    if &b[..8] != MAGIC {
        return None;
    }
    let kind = match b[8] {
        1 => Kind::Probe,
        2 => Kind::Ack,
        3 => Kind::Birthday,
        _ => return None,
    };
    Some(Message {
        kind,
        id: u16::from_be_bytes([b[9], b[10]]),
        size: u16::from_be_bytes([b[11], b[12]]),
    })
}

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
    let total = HEADER + 8 + quoted.len();
    let mut p = vec![0u8; total];
    ipv4_header(&mut p, total as u16, 1, from, src);
    let icmp = &mut p[HEADER..];
    icmp[0] = 3;
    icmp[1] = 4;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(quoted);
    let c = checksum(icmp);
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
    fn probe_round_trip_and_padding() {
        let m = Message {
            kind: Kind::Probe,
            id: 7,
            size: 1420,
        };
        let p = build(A, B, m, 1420);
        assert_eq!(p.len(), 1420);
        assert_eq!(
            u16::from_be_bytes([p[2], p[3]]),
            33,
            "IP length excludes padding"
        );
        assert_eq!(checksum(&p[..20]), 0, "valid header checksum");
        assert_eq!(parse(&p), Some(m));
        assert_eq!(parse(&p[..33]), Some(m), "trimmed as boringtun delivers it");
        let mut other = p.clone();
        other[9] = 17;
        assert_eq!(parse(&other), None);
        assert_eq!(parse(&[0x45; 10]), None);
    }

    #[test]
    fn frag_needed_is_a_valid_icmp_for_the_sender() {
        let mut orig = vec![0u8; 1420];
        ipv4_header(&mut orig, 1420, 6, A, B);
        let icmp = frag_needed(&orig, 1340, A).unwrap();
        assert_eq!(icmp.len(), 20 + 8 + 28);
        assert_eq!(&icmp[16..20], &A.octets(), "addressed to the sender");
        assert_eq!((icmp[20], icmp[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1340);
        assert_eq!(checksum(&icmp[..20]), 0);
        assert_eq!(checksum(&icmp[20..]), 0);
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
