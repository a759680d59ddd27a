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
//!
//! A packet from the TUN device larger than the path MTU is answered as a router would answer
//! it, back into the TUN device, so the sender (local or forwarded) lowers its path MTU at once:
//! an IPv4 packet with DF set gets ICMP "fragmentation needed" ([`frag_needed`]), an IPv6
//! packet an ICMPv6 "packet too big" ([`packet_too_big`]; IPv6 routers never fragment).

use crate::packet::{self, IPV6_HEADER};
use mesh_proto::tunnel::{internet_checksum, write_ipv4_header, IPV4_HEADER};
use std::net::{Ipv4Addr, Ipv6Addr};
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

/// IPv6 next header number of ICMPv6.
const ICMPV6: u8 = 58;
/// ICMPv6 type of "packet too big" (RFC 4443 §3.2); types below 128 are errors.
const PACKET_TOO_BIG: u8 = 2;
/// ICMPv6 error header: type, code, checksum, then a 32-bit field (here the MTU).
const ICMPV6_ERROR_HEADER: usize = 8;
/// IPv6's minimum link MTU: an ICMPv6 error is never larger (RFC 4443 §2.4(c)).
const IPV6_MIN_MTU: usize = 1280;
/// Hop limit of the ICMPv6 messages the node writes, as the TTL of its IPv4 ones.
const HOP_LIMIT: u8 = 64;

/// An ICMPv6 "packet too big" (type 2 code 0) telling the sender of `original` that the next
/// hop carries at most `mtu` bytes, as a router would send it, from `from` (the node's IPv6
/// overlay address). It quotes as much of `original` as fits in 1280 bytes and goes back into
/// the TUN device, like [`frag_needed`].
///
/// `None` for bytes that are not an IPv6 packet and for those RFC 4443 §2.4(e) says never to
/// answer: an unspecified or multicast source. Nor for a multicast destination (the RFC allows a
/// packet too big there, but mesh never carries multicast), nor for an ICMPv6 error or a packet
/// whose headers cannot be followed to tell, so that errors never answer errors.
pub fn packet_too_big(original: &[u8], mtu: u16, from: Ipv6Addr) -> Option<Vec<u8>> {
    let (src, dst) = packet::ipv6_addrs(original)?;
    if src.is_unspecified() || src.is_multicast() || dst.is_multicast() {
        return None;
    }
    if let (ICMPV6, at) = packet::ipv6_upper_layer(original)? {
        if *original.get(at)? < 128 {
            return None;
        }
    }
    let room = IPV6_MIN_MTU - IPV6_HEADER - ICMPV6_ERROR_HEADER;
    let quoted = original.get(..original.len().min(room))?;
    let len = u16::try_from(ICMPV6_ERROR_HEADER + quoted.len()).ok()?;
    let mut p = vec![0u8; IPV6_HEADER + usize::from(len)];
    let (header, icmp) = p.split_first_chunk_mut::<IPV6_HEADER>()?;
    icmp[0] = PACKET_TOO_BIG;
    icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    icmp[ICMPV6_ERROR_HEADER..].copy_from_slice(quoted);
    // The checksum covers a pseudo-header as long as the real header: sum it in the real
    // header's place, then write the real one over it.
    *header = pseudo_header(from, src, len, ICMPV6);
    let checksum = internet_checksum(&p);
    let (header, icmp) = p.split_first_chunk_mut::<IPV6_HEADER>()?;
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    write_ipv6_header(header, len, ICMPV6, from, src);
    Some(p)
}

/// The pseudo-header an upper-layer checksum over IPv6 covers (RFC 8200 §8.1).
fn pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, len: u16, next: u8) -> [u8; IPV6_HEADER] {
    let mut h = [0; IPV6_HEADER];
    h[..16].copy_from_slice(&src.octets());
    h[16..32].copy_from_slice(&dst.octets());
    h[32..36].copy_from_slice(&u32::from(len).to_be_bytes());
    h[39] = next;
    h
}

/// Writes an IPv6 header without extension headers: traffic class and flow label 0, hop
/// limit [`HOP_LIMIT`].
fn write_ipv6_header(
    header: &mut [u8; IPV6_HEADER],
    payload_len: u16,
    next: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
) {
    *header = [0; IPV6_HEADER];
    header[0] = 0x60;
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    header[6] = next;
    header[7] = HOP_LIMIT;
    header[8..24].copy_from_slice(&src.octets());
    header[24..40].copy_from_slice(&dst.octets());
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

    /// A pod behind the node (a forwarded source) and a peer's IPv6 overlay address.
    fn pod() -> Ipv6Addr {
        "fd00:10:244:1::5".parse().unwrap()
    }
    fn peer6() -> Ipv6Addr {
        "fd12:3456:789a::b".parse().unwrap()
    }
    fn me6() -> Ipv6Addr {
        "fd12:3456:789a::a".parse().unwrap()
    }

    /// An IPv6 packet of `len` bytes, `next` after the header, with a recognisable body.
    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let header = p.first_chunk_mut().unwrap();
        write_ipv6_header(header, (len - IPV6_HEADER) as u16, next, src, dst);
        p
    }

    /// The ICMPv6 checksum of `reply` checked as a receiver checks it: over a pseudo-header
    /// written out here by hand, and the message with its checksum field.
    fn icmpv6_checksum_holds(reply: &[u8]) -> bool {
        let message = &reply[40..];
        let mut sum = Vec::new();
        sum.extend_from_slice(&reply[8..24]);
        sum.extend_from_slice(&reply[24..40]);
        sum.extend_from_slice(&(message.len() as u32).to_be_bytes());
        sum.extend_from_slice(&[0, 0, 0, 58]);
        sum.extend_from_slice(message);
        internet_checksum(&sum) == 0
    }

    #[test]
    fn packet_too_big_is_a_valid_icmpv6_for_the_sender() {
        let orig = ipv6(pod(), peer6(), 17, 200);
        let reply = packet_too_big(&orig, 1340, me6()).unwrap();
        assert_eq!(reply.len(), 40 + 8 + 200, "quotes all of a short packet");
        assert_eq!(reply[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([reply[4], reply[5]]), 8 + 200);
        assert_eq!((reply[6], reply[7]), (58, 64), "ICMPv6, hop limit 64");
        assert_eq!(&reply[8..24], &me6().octets(), "from the node");
        assert_eq!(&reply[24..40], &pod().octets(), "to the sender");
        assert_eq!((reply[40], reply[41]), (2, 0), "packet too big");
        assert_eq!(&reply[44..48], &1340u32.to_be_bytes());
        assert!(icmpv6_checksum_holds(&reply));
        assert_eq!(&reply[48..], &orig[..]);
        // The checksum is not the zero an unchecked one would have.
        assert_ne!(&reply[42..44], &[0, 0]);
    }

    #[test]
    fn packet_too_big_never_exceeds_the_ipv6_minimum_mtu() {
        let orig = ipv6(pod(), peer6(), 6, 9000);
        let reply = packet_too_big(&orig, 1420, me6()).unwrap();
        assert_eq!(reply.len(), 1280);
        assert_eq!(u16::from_be_bytes([reply[4], reply[5]]), 1280 - 40);
        assert_eq!(&reply[48..], &orig[..1280 - 48], "as much as fits");
        assert!(icmpv6_checksum_holds(&reply));
        // An odd-length quote is summed with its last byte padded.
        let reply = packet_too_big(&orig[..301], 1420, me6()).unwrap();
        assert!(icmpv6_checksum_holds(&reply));
    }

    #[test]
    fn packet_too_big_answers_no_one_it_must_not() {
        let me = me6();
        let v4 = {
            let mut p = vec![0u8; 1420];
            write_ipv4_header(p.first_chunk_mut().unwrap(), 1420, 6, A, B);
            p
        };
        assert_eq!(packet_too_big(&v4, 1340, me), None, "IPv4");
        let mut v5 = ipv6(pod(), peer6(), 17, 1420);
        v5[0] = 0x50;
        assert_eq!(packet_too_big(&v5, 1340, me), None, "version 5");
        let multicast: Ipv6Addr = "ff05::2".parse().unwrap();
        for (src, dst) in [
            (Ipv6Addr::UNSPECIFIED, peer6()),
            (multicast, peer6()),
            (pod(), multicast),
        ] {
            let p = ipv6(src, dst, 17, 1420);
            assert_eq!(packet_too_big(&p, 1340, me), None, "{src} -> {dst}");
        }
        // ICMPv6 errors (types below 128) get none, even behind a hop-by-hop header; other
        // ICMPv6 messages (echo request 128) do.
        for (icmp_type, answered) in [
            (1, false),
            (2, false),
            (4, false),
            (127, false),
            (128, true),
        ] {
            let mut p = ipv6(pod(), peer6(), 58, 1420);
            p[40] = icmp_type;
            assert_eq!(
                packet_too_big(&p, 1340, me).is_some(),
                answered,
                "{icmp_type}"
            );
            let mut p = ipv6(pod(), peer6(), 0, 1420);
            p[40..48].copy_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
            p[48] = icmp_type;
            assert_eq!(
                packet_too_big(&p, 1340, me).is_some(),
                answered,
                "{icmp_type}"
            );
        }
    }

    #[test]
    fn packet_too_big_takes_any_prefix_without_panic() {
        // UDP; an ICMPv6 echo request; the same behind a hop-by-hop header. Each is answered
        // from the first prefix that shows it is not an error on.
        let mut udp = ipv6(pod(), peer6(), 17, 1420);
        udp[40] = 0;
        let mut echo = ipv6(pod(), peer6(), 58, 1420);
        echo[40] = 128;
        let mut hop_by_hop = ipv6(pod(), peer6(), 0, 1420);
        hop_by_hop[40..49].copy_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0, 128]);
        for (orig, answered_from) in [(udp, 40), (echo, 41), (hop_by_hop, 49)] {
            for n in 0..=orig.len() {
                let reply = packet_too_big(&orig[..n], 1340, me6());
                assert_eq!(reply.is_some(), n >= answered_from, "{n} bytes");
                if let Some(reply) = reply {
                    assert!(reply.len() <= 1280 && icmpv6_checksum_holds(&reply));
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn packet_too_big_never_panics(
            mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1600),
        ) {
            if let Some(b) = bytes.first_mut() {
                *b = 0x60 | (*b & 0x0f);
            }
            if let Some(reply) = packet_too_big(&bytes, 1280, me6()) {
                proptest::prop_assert!(reply.len() <= 1280 && icmpv6_checksum_holds(&reply));
            }
        }
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
